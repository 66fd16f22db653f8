//! Serve-time validation against the real registry and real clients: a broken
//! index is known before the client asks for the missing child.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake::{Answer, FakeUpstream};
use common::http::{self, send, sha256_digest};
use common::oci::{self, ACCEPT_ALL, OCI_INDEX};
use common::{
    metric_in, metric_value, poll_until, skopeo, Regguard, RegguardOptions, Registry,
    RegistryOptions,
};

const FAILURES: &str = r#"registry_manifest_integrity_failures{instance="test"}"#;
const WAIT: Duration = Duration::from_secs(30);

fn validating(upstream: &str, env: &[(&str, &str)]) -> Regguard {
    let mut all = vec![("REGGUARD_METRICS_INSTANCE".to_string(), "test".to_string())];
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Regguard::start_with(
        upstream,
        RegguardOptions {
            env: all,
            ..Default::default()
        },
    )
}

/// Waits until `series` is exported and satisfies `pred`; returns the whole exposition then.
fn wait_metric(rg: &Regguard, series: &str, pred: impl Fn(f64) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = rg.metrics();
        let value = metric_value(&m, series);
        if value.is_some_and(&pred) {
            return m;
        }
        if Instant::now() > deadline {
            panic!(
                "{series} did not reach the expected value within {WAIT:?}; last: {}",
                value.map_or("not exported".into(), |v| v.to_string())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Index validations finished, whatever their result.
fn index_checks_total(metrics: &str) -> f64 {
    ["ok", "broken", "unauthorized", "error"]
        .iter()
        .map(|r| {
            metric_in(
                metrics,
                &format!("regguard_index_checks_total{{result=\"{r}\"}}"),
            )
        })
        .sum()
}

/// Lines of `regguard_broken_reference_info` naming `digest`.
/// Waits for one broken reference, and returns a scrape that shows both the gauge and its
/// info series. regguard sets the info series first, but a scrape reads the info family
/// before the gauge (by name), so the scrape that first sees the gauge at 1 may predate the
/// series; any scrape after it has both.
fn wait_one_broken(rg: &Regguard) -> String {
    wait_metric(rg, FAILURES, |v| v == 1.0);
    wait_metric(rg, FAILURES, |v| v == 1.0)
}

fn info_lines(metrics: &str, digest: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("regguard_broken_reference_info{") && l.contains(digest))
        .map(str::to_owned)
        .collect()
}

/// Requests regguard itself made to the registry, by "METHOD path", from its access log.
fn regguard_requests(reg: &Registry) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for line in reg
        .log_text()
        .lines()
        .filter(|l| l.ends_with("\"regguard/0.1.0\""))
    {
        if let Some(req) = line.split('"').nth(1) {
            let key: Vec<&str> = req.split(' ').take(2).collect();
            *out.entry(key.join(" ")).or_insert(0) += 1;
        }
    }
    out
}

fn get_manifest(base: &str, repo: &str, reference: &str, auth: &[(&str, &str)]) -> http::Resp {
    let mut h = vec![("accept", ACCEPT_ALL)];
    h.extend_from_slice(auth);
    send(
        "GET",
        &format!("{base}/v2/{repo}/manifests/{reference}"),
        &h,
        Bytes::new(),
    )
}

/// containerd's resolve: HEAD by tag with the index types and */*.
fn head_manifest(base: &str, repo: &str, reference: &str) -> http::Resp {
    let accept =
        format!("{OCI_INDEX}, application/vnd.docker.distribution.manifest.list.v2+json, */*");
    send(
        "HEAD",
        &format!("{base}/v2/{repo}/manifests/{reference}"),
        &[("accept", &accept)],
        Bytes::new(),
    )
}

#[test]
fn healthy_multi_arch_pull_checks_everything_ok_and_raises_nothing() {
    let reg = Registry::start();
    let img = oci::multi_arch("healthy");
    oci::push_multi_arch(&reg.url(), "team/app", "v1", &img, &[]);
    let rg = validating(&reg.url(), &[]);
    let out = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--all",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("docker://{}/team/app:v1", rg.host()),
        &format!("oci:{}:v1", out.path().display()),
    ]);
    // 4 children and 10 blobs (2 images x (config + 2 layers), 2 attestations x (config + statement)).
    let m = wait_metric(
        &rg,
        r#"regguard_reference_checks_total{kind="blob",result="ok"}"#,
        |v| v >= 10.0,
    );
    assert!(metric_in(&m, r#"regguard_index_checks_total{result="ok"}"#) >= 1.0);
    assert!(
        metric_in(
            &m,
            r#"regguard_reference_checks_total{kind="manifest",result="ok"}"#
        ) >= 4.0
    );
    assert_eq!(metric_in(&m, FAILURES), 0.0);
    assert_eq!(
        metric_in(&m, r#"regguard_index_checks_total{result="broken"}"#),
        0.0
    );
    assert_eq!(
        metric_in(
            &m,
            r#"regguard_client_not_found_total{kind="manifest",referenced="true"}"#
        ),
        0.0
    );
    assert_eq!(
        metric_in(
            &m,
            r#"regguard_client_not_found_total{kind="blob",referenced="true"}"#
        ),
        0.0
    );
    assert!(
        m.contains(&format!("{FAILURES} 0")),
        "the probe-compatible gauge is exported"
    );
}

#[test]
fn missing_child_is_known_before_the_client_asks_for_it() {
    let reg = Registry::start();
    let img = oci::multi_arch("incident");
    oci::push_multi_arch(&reg.url(), "ci/runner", "latest", &img, &[]);
    let amd64 = img.image("amd64").manifest.digest.clone();
    reg.remove_revision_link("ci/runner", &amd64);
    let rg = validating(&reg.url(), &[]);

    // containerd: HEAD by tag, then GET the index by digest.
    let head = head_manifest(&rg.url(), "ci/runner", "latest");
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("docker-content-digest"),
        Some(img.index.digest.as_str())
    );
    let index = get_manifest(&rg.url(), "ci/runner", &img.index.digest, &[]);
    assert_eq!(index.status, 200);
    assert_eq!(
        index.body, img.index.data,
        "the client's index is untouched"
    );

    // Before the client asks for the child, the metrics already say it is broken.
    let m = wait_one_broken(&rg);
    let info = info_lines(&m, &amd64);
    assert_eq!(info.len(), 1, "{m}");
    assert!(
        info[0].contains(r#"platform="linux/amd64""#) && info[0].contains(r#"kind="manifest""#),
        "{}",
        info[0]
    );
    assert!(
        info[0].contains(&format!(r#"index_digest="{}""#, img.index.digest)),
        "{}",
        info[0]
    );
    assert!(info[0].contains(r#"repository="ci/runner""#), "{}", info[0]);
    assert_eq!(metric_in(&m, "regguard_detection_seconds_count"), 1.0);
    assert_eq!(
        metric_in(
            &m,
            r#"regguard_client_not_found_total{kind="manifest",referenced="true"}"#
        ),
        0.0
    );
    assert!(
        rg.log_text().contains("broken reference"),
        "a WARN line names it"
    );
    let integrity = http::get(&format!("http://{}/integrity", rg.admin)).json();
    assert_eq!(integrity["count"], 1);
    assert_eq!(integrity["broken"][0]["child_digest"], amd64.as_str());
    assert_eq!(integrity["broken"][0]["platform"], "linux/amd64");

    // Now the client's own GET of the child: the registry's 404, unchanged, and counted.
    let direct = get_manifest(&reg.url(), "ci/runner", &amd64, &[]);
    let child = get_manifest(&rg.url(), "ci/runner", &amd64, &[]);
    assert_eq!(child.status, 404);
    assert_eq!(child.body, direct.body);
    assert!(child.text().contains("MANIFEST_UNKNOWN"));
    wait_metric(
        &rg,
        r#"regguard_client_not_found_total{kind="manifest",referenced="true"}"#,
        |v| v == 1.0,
    );
    // A probe for a digest nobody references is normal and does not alarm.
    let unknown = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    assert_eq!(
        send(
            "HEAD",
            &format!("{}/v2/ci/runner/blobs/{unknown}", rg.url()),
            &[],
            Bytes::new()
        )
        .status,
        404
    );
    wait_metric(
        &rg,
        r#"regguard_client_not_found_total{kind="blob",referenced="false"}"#,
        |v| v == 1.0,
    );
}

#[test]
fn missing_layer_link_of_a_child_image_is_a_broken_blob_reference() {
    let reg = Registry::start();
    let img = oci::multi_arch("layer");
    oci::push_multi_arch(&reg.url(), "lib/base", "v2", &img, &[]);
    let layer = img.image("arm64").layers[1].digest.clone();
    reg.remove_layer_link("lib/base", &layer);
    let rg = validating(&reg.url(), &[]);
    assert_eq!(get_manifest(&rg.url(), "lib/base", "v2", &[]).status, 200);
    let m = wait_one_broken(&rg);
    let info = info_lines(&m, &layer);
    assert_eq!(info.len(), 1, "{m}");
    assert!(
        info[0].contains(r#"kind="blob""#) && info[0].contains(r#"platform="linux/arm64""#),
        "{}",
        info[0]
    );
    assert!(
        metric_in(
            &m,
            r#"regguard_reference_checks_total{kind="blob",result="missing"}"#
        ) >= 1.0
    );
}

#[test]
fn re_pushing_the_child_heals_the_gauge_after_the_negative_ttl() {
    let reg = Registry::start();
    let img = oci::multi_arch("heal");
    oci::push_multi_arch(&reg.url(), "app/heal", "v1", &img, &[]);
    let child = img.image("amd64").manifest.clone();
    reg.remove_revision_link("app/heal", &child.digest);
    let rg = validating(&reg.url(), &[("REGGUARD_VALIDATE_MISSING_TTL", "1s")]);
    assert_eq!(get_manifest(&rg.url(), "app/heal", "v1", &[]).status, 200);
    let m = wait_one_broken(&rg);
    assert_eq!(info_lines(&m, &child.digest).len(), 1);

    // The repair that works on 2.8: re-PUT the child's exact bytes by digest.
    let r = oci::put_manifest(&reg.url(), "app/heal", &child.digest, &child, &[]);
    assert_eq!(r.status, 201);
    // No client pulls: the re-check loop finds it present again.
    let m = wait_metric(&rg, FAILURES, |v| v == 0.0);
    assert!(
        info_lines(&m, &child.digest).is_empty(),
        "info series removed: {m}"
    );
    assert!(rg.log_text().contains("healed"));
}

#[test]
fn fifty_pulls_of_a_healthy_image_ask_the_registry_once_per_reference() {
    let reg = Registry::start();
    let img = oci::multi_arch("cache");
    oci::push_multi_arch(&reg.url(), "hot/app", "v1", &img, &[]);
    let rg = validating(&reg.url(), &[]);
    for _ in 0..50 {
        assert_eq!(get_manifest(&rg.url(), "hot/app", "v1", &[]).status, 200);
    }
    let m = wait_metric(&rg, r#"regguard_index_checks_total{result="ok"}"#, |v| {
        v == 50.0
    });
    assert!(metric_in(&m, "regguard_validation_cache_hits_total") > 0.0);
    let asked = regguard_requests(&reg);
    for (req, n) in &asked {
        assert_eq!(*n, 1, "{req} asked {n} times: {asked:#?}");
    }
    let heads = asked.keys().filter(|k| k.starts_with("HEAD ")).count();
    assert_eq!(heads, 4 + 10, "one HEAD per child and per blob: {asked:#?}");
}

#[test]
fn checks_carry_the_clients_credentials_and_401s_are_never_broken() {
    let reg = Registry::start_with(RegistryOptions {
        auth: Some(("ci".into(), "pw".into())),
    });
    let basic = format!("Basic {}", "Y2k6cHc="); // ci:pw
    let auth = [("authorization", basic.as_str())];
    let img = oci::multi_arch("auth");
    oci::push_multi_arch(&reg.url(), "priv/app", "v1", &img, &auth);

    let rg = validating(&reg.url(), &[]);
    // Anonymous: 401 from the registry, passed through, and no checks.
    assert_eq!(get_manifest(&rg.url(), "priv/app", "v1", &[]).status, 401);
    // With credentials: the checks use them and find everything.
    assert_eq!(get_manifest(&rg.url(), "priv/app", "v1", &auth).status, 200);
    let m = wait_metric(&rg, r#"regguard_index_checks_total{result="ok"}"#, |v| {
        v == 1.0
    });
    let total = index_checks_total(&m);
    assert_eq!(total, 1.0, "the anonymous 401 caused no validation");
    assert!(
        metric_in(
            &m,
            r#"regguard_reference_checks_total{kind="manifest",result="ok"}"#
        ) >= 4.0
    );

    // An upstream that refuses regguard's checks (401) while serving the index: unauthorized, not broken.
    let refusing = FakeUpstream::start(
        Arc::new(|method, _path, headers| {
            let ua = headers
                .get("user-agent")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            (method == "HEAD" && ua.starts_with("regguard/")).then(|| Answer {
                status: 401,
                headers: vec![("www-authenticate".into(), "Basic realm=\"x\"".into())],
                body: Bytes::new(),
            })
        }),
        Some(reg.url()),
    );
    let rg2 = validating(&refusing.url(), &[]);
    assert_eq!(
        get_manifest(&rg2.url(), "priv/app", "v1", &auth).status,
        200
    );
    let m = wait_metric(
        &rg2,
        r#"regguard_index_checks_total{result="unauthorized"}"#,
        |v| v == 1.0,
    );
    assert_eq!(metric_in(&m, FAILURES), 0.0);
    assert_eq!(
        metric_in(&m, r#"regguard_index_checks_total{result="broken"}"#),
        0.0
    );
    assert!(
        metric_in(
            &m,
            r#"regguard_reference_checks_total{kind="manifest",result="unauthorized"}"#
        ) >= 1.0
    );
}

#[test]
fn a_flood_of_distinct_indexes_drops_validation_work_not_client_requests() {
    let reg = Registry::start();
    let img = oci::multi_arch("flood");
    oci::push_multi_arch(&reg.url(), "flood/app", "base", &img, &[]);
    let n = 2000;
    let base: serde_json::Value = serde_json::from_slice(&img.index.data).unwrap();
    for i in 0..n {
        let mut v = base.clone();
        v["annotations"] = serde_json::json!({ "n": i.to_string() });
        let blob = oci::Blob::json(OCI_INDEX, &v);
        let r = oci::put_manifest(&reg.url(), "flood/app", &format!("t{i}"), &blob, &[]);
        assert_eq!(r.status, 201);
    }
    let rg = validating(
        &reg.url(),
        &[
            ("REGGUARD_VALIDATE_QUEUE_CAPACITY", "4"),
            ("REGGUARD_VALIDATE_WORKERS", "1"),
        ],
    );
    let url = rg.url();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let url = url.clone();
            std::thread::spawn(move || {
                for i in (t..n).step_by(8) {
                    let r = get_manifest(&url, "flood/app", &format!("t{i}"), &[]);
                    assert_eq!(r.status, 200, "client request {i} failed");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // Every job was either validated or dropped and counted; the queue drains.
    let m = poll_until(WAIT, "the validation queue to drain", || {
        let m = rg.metrics();
        let done = index_checks_total(&m);
        (done + metric_in(&m, "regguard_validation_dropped_total") == n as f64).then_some(m)
    });
    assert!(
        metric_in(&m, "regguard_validation_dropped_total") > 0.0,
        "a 4-deep queue must overflow"
    );
    assert_eq!(metric_in(&m, "regguard_validation_queue_depth"), 0.0);
    assert_eq!(metric_in(&m, FAILURES), 0.0);
    let peak = rg.proc.peak_rss_kib() / 1024;
    assert!(peak < 64, "peak RSS {peak} MiB");
}

/// An index body whose digest header is honest, served by tag and by digest.
fn serve_index(
    map: &mut BTreeMap<String, (String, Bytes)>,
    repo: &str,
    tag: &str,
    body: Bytes,
    digest: &str,
) {
    map.insert(
        format!("/v2/{repo}/manifests/{tag}"),
        (digest.to_string(), body.clone()),
    );
    map.insert(
        format!("/v2/{repo}/manifests/{digest}"),
        (digest.to_string(), body),
    );
}

#[test]
fn lying_or_malformed_upstream_manifests_count_as_errors_and_reach_clients_untouched() {
    let mut map: BTreeMap<String, (String, Bytes)> = BTreeMap::new();
    let not_json = Bytes::from_static(b"this is not json {");
    serve_index(
        &mut map,
        "bad/app",
        "notjson",
        not_json.clone(),
        &sha256_digest(&not_json),
    );
    let honest = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#
    ));
    let lie = sha256_digest(b"something else");
    map.insert(
        "/v2/bad/app/manifests/liar".into(),
        (lie.clone(), honest.clone()),
    );
    let mut huge =
        format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[],"pad":""#)
            .into_bytes();
    huge.extend(std::iter::repeat_n(b'a', 5 * 1024 * 1024));
    huge.extend_from_slice(b"\"}");
    let huge = Bytes::from(huge);
    serve_index(
        &mut map,
        "bad/app",
        "huge",
        huge.clone(),
        &sha256_digest(&huge),
    );
    // An index nested six deep; validate.max_depth is 4.
    let mut child: Option<(String, usize)> = None;
    for level in (0..6).rev() {
        let manifests = match &child {
            Some((d, size)) => {
                format!(r#"[{{"mediaType":"{OCI_INDEX}","digest":"{d}","size":{size}}}]"#)
            }
            None => "[]".into(),
        };
        let body = Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":{manifests},"level":{level}}}"#
        ));
        let d = sha256_digest(&body);
        serve_index(
            &mut map,
            "bad/app",
            if level == 0 { "deep" } else { "unused" },
            body.clone(),
            &d,
        );
        child = Some((d, body.len()));
    }
    let map = Arc::new(map);
    let served = map.clone();
    let fake = FakeUpstream::start(
        Arc::new(move |_method, path, _headers| {
            served.get(path).map(|(digest, body)| Answer {
                status: 200,
                headers: vec![
                    ("content-type".into(), OCI_INDEX.into()),
                    ("docker-content-digest".into(), digest.clone()),
                    ("content-length".into(), body.len().to_string()),
                ],
                body: body.clone(),
            })
        }),
        None,
    );
    let rg = validating(&fake.url(), &[]);
    for tag in ["notjson", "liar", "huge", "deep"] {
        let r = get_manifest(&rg.url(), "bad/app", tag, &[]);
        assert_eq!(r.status, 200, "{tag}");
        assert_eq!(
            r.body,
            map[&format!("/v2/bad/app/manifests/{tag}")].1,
            "{tag}: body untouched"
        );
    }
    let m = wait_metric(&rg, r#"regguard_index_checks_total{result="error"}"#, |v| {
        v == 4.0
    });
    assert_eq!(
        metric_in(&m, r#"regguard_index_checks_total{result="ok"}"#),
        0.0
    );
    assert_eq!(metric_in(&m, FAILURES), 0.0);
    let log = rg.log_text();
    assert_eq!(log.matches("cannot validate manifest").count(), 3, "{log}");
    assert_eq!(
        log.matches("nests deeper than validate.max_depth").count(),
        1,
        "{log}"
    );
    // regguard keeps serving.
    assert_eq!(http::get(&format!("{}/", rg.url())).text(), "ok");
    assert_eq!(get_manifest(&rg.url(), "bad/app", "liar", &[]).status, 200);
}

#[test]
fn head_of_an_index_by_tag_alone_triggers_validation() {
    let reg = Registry::start();
    let img = oci::multi_arch("head");
    oci::push_multi_arch(&reg.url(), "only/head", "v1", &img, &[]);
    reg.remove_revision_link("only/head", &img.attestations[0].manifest.digest);
    let rg = validating(&reg.url(), &[]);
    let r = head_manifest(&rg.url(), "only/head", "v1");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    let m = wait_metric(
        &rg,
        r#"regguard_index_checks_total{result="broken"}"#,
        |v| v == 1.0,
    );
    let info = info_lines(&m, &img.attestations[0].manifest.digest);
    assert_eq!(info.len(), 1);
    assert!(
        info[0].contains(r#"platform="unknown/unknown""#),
        "{}",
        info[0]
    );
}
