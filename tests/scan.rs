//! The whole-registry scan against the real registry: pagination, findings in
//! repositories nobody pulled, the cron probe's metric contract, auth, and the CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::oci;
use common::{metric_in, poll_until, Regguard, RegguardOptions, Registry, RegistryOptions};

/// Fills a registry: 30 repositories (multi-arch in even ones, single-platform in odd ones),
/// one of them with 25 tags. Returns (tags in total, multi-arch tags in total).
fn fill(reg: &Registry, auth: &[(&str, &str)]) -> (usize, usize) {
    let img = oci::multi_arch("scan");
    let (mut tags, mut indexes) = (0, 0);
    for i in 0..30 {
        let repo = format!("team{}/app{i:02}", i % 3);
        if i % 2 == 0 {
            oci::push_multi_arch(&reg.url(), &repo, "v1", &img, auth);
            indexes += 1;
        } else {
            let one = img.image("amd64");
            for b in std::iter::once(&one.config).chain(&one.layers) {
                oci::push_blob(&reg.url(), &repo, b, auth);
            }
            assert_eq!(
                oci::put_manifest(&reg.url(), &repo, "v1", &one.manifest, auth).status,
                201
            );
        }
        tags += 1;
    }
    // Many tags on one index, more than one tag-list page.
    for t in 0..24 {
        assert_eq!(
            oci::put_manifest(
                &reg.url(),
                "team0/app00",
                &format!("build-{t}"),
                &img.index,
                auth
            )
            .status,
            201
        );
        tags += 1;
        indexes += 1;
    }
    (tags, indexes)
}

fn scanning(reg: &Registry, extra: &[(&str, &str)]) -> Regguard {
    let mut env = vec![
        (
            "REGGUARD_METRICS_INSTANCE".to_string(),
            "scan-test".to_string(),
        ),
        ("REGGUARD_SCAN_ENABLED".to_string(), "true".to_string()),
        ("REGGUARD_SCAN_INTERVAL".to_string(), "1h".to_string()),
        ("REGGUARD_SCAN_PAGE_SIZE".to_string(), "7".to_string()),
        ("REGGUARD_SCAN_RATE".to_string(), "500".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            env,
            ..Default::default()
        },
    )
}

fn probe(m: &str, name: &str) -> f64 {
    metric_in(m, &format!("{name}{{instance=\"scan-test\"}}"))
}

#[test]
fn background_scan_walks_every_page_and_finds_what_nobody_pulled() {
    let reg = Registry::start();
    let (tags, indexes) = fill(&reg, &[]);
    let img = oci::multi_arch("scan");
    // Two faults, in two repositories no client ever pulled through regguard.
    let child = img.image("arm64").manifest.digest.clone();
    reg.remove_revision_link("team2/app08", &child);
    let layer = img.image("amd64").layers[0].digest.clone();
    reg.remove_layer_link("team1/app04", &layer);

    let started = common::http::get(&format!("{}/v2/", reg.url())); // registry is up
    assert_eq!(started.status, 200);
    let rg = scanning(&reg, &[]);
    let m = poll_until(Duration::from_secs(120), "the first scan to finish", || {
        let m = rg.metrics();
        (probe(&m, "registry_manifest_integrity_last_run_timestamp") > 0.0).then_some(m)
    });

    // The registry's own listing, in one page, is the reference.
    let catalog = common::http::get(&format!("{}/v2/_catalog?n=1000", reg.url())).json();
    assert_eq!(catalog["repositories"].as_array().unwrap().len(), 30);
    let listed =
        common::http::get(&format!("{}/v2/team0/app00/tags/list?n=1000", reg.url())).json();
    assert_eq!(listed["tags"].as_array().unwrap().len(), 25);

    assert_eq!(
        probe(&m, "registry_manifest_integrity_catalog_accessible"),
        1.0
    );
    assert_eq!(probe(&m, "registry_manifest_integrity_repos_checked"), 30.0);
    assert_eq!(
        probe(&m, "registry_manifest_integrity_tags_checked"),
        tags as f64
    );
    assert_eq!(
        probe(&m, "registry_manifest_integrity_indexes_checked"),
        indexes as f64
    );
    assert_eq!(
        probe(&m, "registry_manifest_integrity_failures"),
        2.0,
        "{m}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - probe(&m, "registry_manifest_integrity_last_run_timestamp")).abs() < 300.0);
    assert_eq!(metric_in(&m, "regguard_scan_duration_seconds_count"), 1.0);
    assert_eq!(metric_in(&m, "regguard_scan_errors_total"), 0.0);
    let info: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("regguard_broken_reference_info{"))
        .collect();
    assert_eq!(info.len(), 2, "{info:?}");
    assert!(info.iter().any(|l| l.contains(&child)
        && l.contains(r#"repository="team2/app08""#)
        && l.contains(r#"platform="linux/arm64""#)));
    assert!(info.iter().any(|l| l.contains(&layer)
        && l.contains(r#"repository="team1/app04""#)
        && l.contains(r#"kind="blob""#)));
    // The scan asked for every tag's manifest, through the pages.
    let log = reg.log_text();
    assert!(log.contains("GET /v2/_catalog?n=7 "), "first catalog page");
    assert!(
        log.contains("GET /v2/_catalog?last="),
        "later catalog pages"
    );
    // Registry 2.8 ignores `n` on tag lists and sends every tag in one page (pagination came
    // in v3); the scan asked with its page size and would have followed a `Link`.
    assert!(
        log.contains("GET /v2/team0/app00/tags/list?n=7 "),
        "tag list asked with the page size"
    );
}

#[test]
fn scan_with_service_credentials_never_logs_or_exports_them() {
    let password = "Sc4n-s3cret-pw";
    let reg = Registry::start_with(RegistryOptions {
        auth: Some(("scanner".into(), password.into())),
    });
    let basic = "Basic c2Nhbm5lcjpTYzRuLXMzY3JldC1wdw=="; // scanner:Sc4n-s3cret-pw
    let auth = [("authorization", basic)];
    let img = oci::multi_arch("scan-auth");
    oci::push_multi_arch(&reg.url(), "priv/one", "v1", &img, &auth);
    oci::push_multi_arch(&reg.url(), "priv/two", "v1", &img, &auth);
    reg.remove_revision_link("priv/two", &img.image("amd64").manifest.digest);

    let rg = scanning(
        &reg,
        &[
            ("REGGUARD_SCAN_USER", "scanner"),
            ("REGGUARD_SCAN_PASSWORD", password),
        ],
    );
    let m = poll_until(Duration::from_secs(60), "the scan to finish", || {
        let m = rg.metrics();
        (probe(&m, "registry_manifest_integrity_last_run_timestamp") > 0.0).then_some(m)
    });
    assert_eq!(probe(&m, "registry_manifest_integrity_tags_checked"), 2.0);
    assert_eq!(probe(&m, "registry_manifest_integrity_failures"), 1.0);
    let logs = rg.log_text();
    for secret in [password, "c2Nhbm5lcjpTYzRuLXMzY3JldC1wdw=="] {
        assert!(!logs.contains(secret), "credentials in the log");
        assert!(!m.contains(secret), "credentials in the metrics");
    }

    // Without credentials, the catalog is not accessible and the gauge says so.
    let anon = Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            env: vec![
                ("REGGUARD_METRICS_INSTANCE".into(), "scan-test".into()),
                ("REGGUARD_SCAN_ENABLED".into(), "true".into()),
            ],
            ..Default::default()
        },
    );
    let m = poll_until(Duration::from_secs(60), "the anonymous scan", || {
        let m = anon.metrics();
        (probe(&m, "registry_manifest_integrity_last_run_timestamp") > 0.0).then_some(m)
    });
    assert_eq!(
        probe(&m, "registry_manifest_integrity_catalog_accessible"),
        0.0
    );
}

fn cli_scan(args: &[&str]) -> (Option<i32>, String, String) {
    let all: Vec<&str> = std::iter::once("scan")
        .chain(args.iter().copied())
        .collect();
    common::run_cli(&all, &[])
}

#[test]
fn scan_command_exits_0_healthy_1_broken_2_unreachable() {
    let reg = Registry::start();
    let img = oci::multi_arch("cli");
    oci::push_multi_arch(&reg.url(), "cli/app", "v1", &img, &[]);
    let url = reg.url();

    let (code, out, err) = cli_scan(&["--registry", &url, "--insecure"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("broken refs     0"), "{out}");

    let child = img.image("amd64").manifest.digest.clone();
    reg.remove_revision_link("cli/app", &child);
    let (code, out, err) = cli_scan(&["--registry", &url, "--insecure", "--format", "json"]);
    assert_eq!(code, Some(1), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["report"]["tags"], 1);
    assert_eq!(v["broken"][0]["child_digest"], child.as_str());
    assert_eq!(v["broken"][0]["platform"], "linux/amd64");

    let closed = common::ClosedPort::reserve();
    let dead = closed.url();
    let (code, _, err) = cli_scan(&["--registry", &dead, "--insecure"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("connection refused"), "{err}");
    let (code, _, err) = cli_scan(&["--registry", &url]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--insecure"), "{err}");
    // https:// against the plain-HTTP port: the TLS failure and the fix.
    let (code, _, err) = cli_scan(&["--registry", &url.replace("http://", "https://")]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("does not speak TLS") && err.contains(&format!("use {url} with --insecure")),
        "{err}"
    );
    let (code, _, err) = cli_scan(&["--registry", "https://nosuch.invalid:5000"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot resolve `nosuch.invalid`"), "{err}");
}

#[test]
fn scan_command_says_why_it_cannot_scan_and_how_to_repair() {
    let reg = Registry::start_with(RegistryOptions {
        auth: Some(("scanner".into(), "pw".into())),
    });
    let auth = [("authorization", "Basic c2Nhbm5lcjpwdw==")]; // scanner:pw
    let img = oci::multi_arch("scan-says");
    oci::push_multi_arch(&reg.url(), "att/app", "v1", &img, &auth);
    let attestation = img.attestations[1].manifest.digest.clone(); // describes linux/arm64
    reg.remove_revision_link("att/app", &attestation);
    let url = reg.url();

    let (code, out, err) = cli_scan(&["--registry", &url, "--insecure"]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("401 Unauthorized from GET /v2/")
            && err.contains("no credentials were sent")
            && err.contains("--user USER:PASSWORD"),
        "{err}"
    );
    let (code, _, err) = cli_scan(&["--registry", &url, "--insecure", "--user", "scanner:nope"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("sent user `scanner` (from --user), and the registry refused it"),
        "{err}"
    );
    let (code, _, err) = cli_scan(&["--registry", &url, "--insecure", "--user", "scanner"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("expected USER:PASSWORD"), "{err}");

    let (code, out, err) = cli_scan(&["--registry", &url, "--insecure", "--user", "scanner:pw"]);
    assert_eq!(code, Some(1), "{out}{err}");
    let line = out.lines().position(|l| l.starts_with("BROKEN ")).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[line].contains(&attestation) && lines[line].contains("(attestation for linux/arm64)"),
        "{out}"
    );
    assert!(
        lines[line + 1].trim_start().starts_with("repair: push ")
            && lines[line + 1].contains("--preserve-digests"),
        "{out}"
    );
}

#[test]
fn scan_blobs_off_checks_manifests_only() {
    let reg = Registry::start();
    let img = oci::multi_arch("scan-blobs");
    oci::push_multi_arch(&reg.url(), "blobs/app", "v1", &img, &[]);
    reg.remove_layer_link("blobs/app", &img.image("amd64").layers[0].digest);
    for (blobs, failures) in [("false", 0.0), ("true", 1.0)] {
        let rg = scanning(
            &reg,
            &[
                ("REGGUARD_SCAN_BLOBS", blobs),
                ("REGGUARD_VALIDATE_ENABLED", "false"),
            ],
        );
        let m = poll_until(Duration::from_secs(60), "the scan", || {
            let m = rg.metrics();
            (probe(&m, "registry_manifest_integrity_last_run_timestamp") > 0.0).then_some(m)
        });
        assert_eq!(
            probe(&m, "registry_manifest_integrity_failures"),
            failures,
            "scan.blobs={blobs}"
        );
        let blob_checks: f64 = ["ok", "missing"]
            .iter()
            .map(|r| {
                metric_in(
                    &m,
                    &format!("regguard_reference_checks_total{{kind=\"blob\",result=\"{r}\"}}"),
                )
            })
            .sum();
        assert_eq!(
            blob_checks > 0.0,
            blobs == "true",
            "scan.blobs={blobs}: {blob_checks} blob checks"
        );
    }
}
