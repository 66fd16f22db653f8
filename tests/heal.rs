//! Heal: a client asking for content the registry lost gets the exact bytes from regguard's
//! vault, and the registry is repaired behind it. Against the real registry (2.8.2), its real
//! `garbage-collect`, real skopeo, and for the vault's object-store backend a real
//! S3-protocol server (moto). The vault suite runs against both backends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::http::{self, send};
use common::oci::{self, ACCEPT_ALL};
use common::{
    basic_auth, poll_until, run_cli, skopeo, Regguard, RegguardOptions, Registry, RegistryOptions,
    S3Server,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);
const FROM_VAULT: &str = "x-regguard-served-from";

/// Where a test's vault lives.
enum Backend {
    Dir(tempfile::TempDir),
    S3(S3Server),
}

impl Backend {
    fn dir() -> Self {
        Backend::Dir(tempfile::tempdir().unwrap())
    }
    fn s3() -> Self {
        Backend::S3(S3Server::start("regguard-vault"))
    }
    fn env(&self) -> Vec<(String, String)> {
        match self {
            Backend::Dir(d) => vec![(
                "REGGUARD_VAULT_URL".into(),
                d.path().join("vault").display().to_string(),
            )],
            Backend::S3(s3) => s3.env("vault"),
        }
    }
    fn key(digest: &str) -> String {
        let hex = digest.strip_prefix("sha256:").unwrap();
        format!("blobs/sha256/{}/{hex}", &hex[..2])
    }
    fn path(&self, digest: &str) -> PathBuf {
        match self {
            Backend::Dir(d) => d.path().join("vault").join(Self::key(digest)),
            Backend::S3(_) => unreachable!("a directory vault only"),
        }
    }
    /// Whether the vault holds `digest`'s content, asked of the storage itself.
    fn holds(&self, digest: &str) -> bool {
        match self {
            Backend::Dir(_) => self.path(digest).exists(),
            Backend::S3(s3) => {
                // A listing (moto answers unsigned listings; unsigned object reads get 403).
                let key = format!("vault/{}", Self::key(digest));
                let url = format!("{}/{}?list-type=2&prefix={key}", s3.url, s3.bucket);
                let r = send("GET", &url, &[], Bytes::new());
                assert_eq!(r.status, 200, "{}", r.text());
                r.text().contains(&format!("<Key>{key}</Key>"))
            }
        }
    }
    /// Overwrites `digest`'s content with other bytes, behind regguard's back.
    fn corrupt(&self, digest: &str) {
        match self {
            Backend::Dir(_) => {
                std::fs::write(self.path(digest), b"not what the digest says").unwrap()
            }
            Backend::S3(s3) => {
                // A signed overwrite (moto refuses unsigned ones), with boto3, which moto needs.
                let key = format!("vault/{}", Self::key(digest));
                let script = format!(
                    "import boto3; boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
                     aws_access_key_id='test', aws_secret_access_key='test')\
                     .put_object(Bucket='{}', Key='{key}', Body=b'not what the digest says')",
                    s3.url, s3.bucket
                );
                let out = std::process::Command::new("python3")
                    .args(["-c", &script])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

fn regguard(upstream: &str, vault: &Backend, env: &[(&str, &str)]) -> Regguard {
    let mut all = vault.env();
    all.push(("REGGUARD_METRICS_INSTANCE".into(), "test".into()));
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Regguard::start_with(
        upstream,
        RegguardOptions {
            env: all,
            ..Default::default()
        },
    )
}

fn integrity(rg: &Regguard) -> Value {
    http::get(&format!("http://{}/integrity", rg.admin)).json()
}

fn entries_for(rg: &Regguard, child: &str) -> Vec<Value> {
    integrity(rg)["broken"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["child_digest"] == child)
        .cloned()
        .collect()
}

/// Every digest of the image: index, children, configs and (with `layers`) layers.
fn digests(img: &oci::MultiArch, layers: bool) -> Vec<String> {
    let mut all = vec![img.index.digest.clone()];
    for c in img.children() {
        all.push(c.manifest.digest.clone());
        all.push(c.config.digest.clone());
        if layers {
            all.extend(c.layers.iter().map(|l| l.digest.clone()));
        }
    }
    all
}

/// Waits until the vault holds every one of `digests`.
fn wait_kept(vault: &Backend, digests: &[String]) {
    poll_until(WAIT, "the vault to keep the image", || {
        digests.iter().all(|d| vault.holds(d)).then_some(())
    });
}

/// Pushes `img` with skopeo to `dest`; returns the source layout (to compare pulls with).
fn skopeo_push(img: &oci::MultiArch, dest: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    oci::write_layout(img, &dir.path().join("src"), "v1");
    let src = format!("oci:{}:v1", dir.path().join("src").display());
    skopeo(&[
        "copy",
        "--all",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &src,
        dest,
    ]);
    dir
}

/// Pulls `src` with skopeo (`--all`); Ok(the pulled blobs) or Err(skopeo's output).
fn skopeo_pull(src: &str) -> Result<std::collections::BTreeMap<String, u64>, String> {
    let bin = common::require_tool("skopeo", "skopeo");
    let dir = tempfile::tempdir().unwrap();
    let dst = format!("oci:{}:v1", dir.path().join("dst").display());
    let out = std::process::Command::new(bin)
        .args(["copy", "--all", "--src-tls-verify=false", src, &dst])
        .env("HOME", std::env::temp_dir())
        .output()
        .unwrap();
    if out.status.success() {
        Ok(oci::layout_blobs(&dir.path().join("dst")))
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn src_blobs(layout: &tempfile::TempDir) -> std::collections::BTreeMap<String, u64> {
    oci::layout_blobs(&layout.path().join("src"))
}

fn get_child(base: &str, repo: &str, digest: &str, headers: &[(&str, &str)]) -> http::Resp {
    let mut h = vec![("accept", ACCEPT_ALL)];
    h.extend_from_slice(headers);
    send(
        "GET",
        &format!("{base}/v2/{repo}/manifests/{digest}"),
        &h,
        Bytes::new(),
    )
}

// ---- the vault suite, on both backends ----

fn a_lost_child_is_pulled_from_the_vault_digest_identical(vault: Backend) {
    let reg = Registry::start();
    let rg = regguard(&reg.url(), &vault, &[]);
    let img = oci::multi_arch("lost-link");
    let pushed = skopeo_push(&img, &format!("docker://{}/app/web:v1", rg.host()));
    wait_kept(&vault, &digests(&img, false));

    let child = img.image("amd64").manifest.digest.clone();
    reg.remove_revision_link("app/web", &child);
    assert!(!reg.has_manifest("app/web", &child), "the link is gone");

    let pulled = skopeo_pull(&format!("docker://{}/app/web:v1", rg.host()))
        .expect("a pull through regguard of an image whose child the registry lost");
    assert_eq!(pulled, src_blobs(&pushed), "digest-identical");

    let r = get_child(&rg.url(), "app/web", &child, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header(FROM_VAULT), Some("vault"));
    assert_eq!(r.header("docker-content-digest"), Some(child.as_str()));
    assert_eq!(
        r.header("content-type"),
        Some(img.image("amd64").manifest.media_type.as_str())
    );
    assert_eq!(r.body, img.image("amd64").manifest.data);
    let head = send(
        "HEAD",
        &format!("{}/v2/app/web/manifests/{child}", rg.url()),
        &[("accept", ACCEPT_ALL)],
        Bytes::new(),
    );
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(img.image("amd64").manifest.data.len().to_string().as_str())
    );
    assert!(rg.metric(r#"regguard_heal_served_total{kind="manifest"}"#) >= 2.0);
    // The registry is still damaged, and /integrity says a client was served anyway.
    let listed = poll_until(WAIT, "the loss noted as served from the vault", || {
        let e = entries_for(&rg, &child);
        e.iter()
            .any(|b| b["served_from_vault"] == true)
            .then_some(e)
    });
    assert!(listed.iter().all(|b| b["repository"] == "app/web"));
    assert!(!reg.has_manifest("app/web", &child), "repair is off");
    assert!(rg.log_text().contains("served from regguard's vault"));
}

fn with_repair_the_registry_gets_the_child_back_and_integrity_empties(vault: Backend) {
    let reg = Registry::start();
    let rg = regguard(&reg.url(), &vault, &[("REGGUARD_HEAL_REPAIR", "true")]);
    let img = oci::multi_arch("repair");
    oci::push_multi_arch(&rg.url(), "app/api", "v1", &img, &[]);
    wait_kept(&vault, &digests(&img, false));

    let child = img.image("arm64").manifest.digest.clone();
    reg.remove_revision_link("app/api", &child);
    // A client pulls: the index, then the child. The registry's 404 is the evidence, the
    // vault answers, and the repairer puts the child back.
    let index = send(
        "GET",
        &format!("{}/v2/app/api/manifests/v1", rg.url()),
        &[("accept", ACCEPT_ALL)],
        Bytes::new(),
    );
    assert_eq!(index.status, 200);
    let r = get_child(&rg.url(), "app/api", &child, &[]);
    assert_eq!((r.status, r.header(FROM_VAULT)), (200, Some("vault")));
    let back = (0..600).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        reg.has_manifest("app/api", &child)
    });
    assert!(
        back,
        "the registry does not serve the child again; regguard's log:\n{}",
        rg.log_text()
    );
    let direct = get_child(&reg.url(), "app/api", &child, &[]);
    assert_eq!(direct.status, 200);
    assert_eq!(
        direct.body,
        img.image("arm64").manifest.data,
        "the exact bytes"
    );
    poll_until(WAIT, "/integrity to empty", || {
        integrity(&rg)["broken"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });
    assert!(rg.metric(r#"regguard_heal_repairs_total{result="repaired"}"#) >= 1.0);
}

fn a_vault_object_that_does_not_match_its_digest_is_never_served(vault: Backend) {
    let reg = Registry::start();
    let rg = regguard(&reg.url(), &vault, &[]);
    let img = oci::multi_arch("corrupt");
    oci::push_multi_arch(&rg.url(), "app/db", "v1", &img, &[]);
    wait_kept(&vault, &digests(&img, false));
    let child = img.image("amd64").manifest.digest.clone();
    reg.remove_revision_link("app/db", &child);
    vault.corrupt(&child);

    let r = get_child(&rg.url(), "app/db", &child, &[]);
    assert_eq!(r.status, 404, "the registry's answer stands");
    assert_eq!(r.header(FROM_VAULT), None);
    assert!(rg.metric("regguard_vault_verification_failures_total") >= 1.0);
    assert_eq!(
        rg.metric(r#"regguard_heal_served_total{kind="manifest"}"#),
        0.0
    );
}

fn content_seen_in_one_repository_is_never_served_for_another(vault: Backend) {
    let reg = Registry::start();
    let rg = regguard(&reg.url(), &vault, &[]);
    let img = oci::multi_arch("isolation");
    oci::push_multi_arch(&rg.url(), "team-a/app", "v1", &img, &[]);
    wait_kept(&vault, &digests(&img, false));
    let child = img.image("amd64").manifest.digest.clone();
    let config = img.image("amd64").config.digest.clone();

    // team-b never had it: the registry's 404 stands, for the manifest and for its config.
    let r = get_child(&rg.url(), "team-b/app", &child, &[]);
    assert_eq!((r.status, r.header(FROM_VAULT)), (404, None));
    let r = send(
        "GET",
        &format!("{}/v2/team-b/app/blobs/{config}", rg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!((r.status, r.header(FROM_VAULT)), (404, None));
    // Where it was seen, it is served.
    reg.remove_revision_link("team-a/app", &child);
    let r = get_child(&rg.url(), "team-a/app", &child, &[]);
    assert_eq!((r.status, r.header(FROM_VAULT)), (200, Some("vault")));
}

#[test]
fn dir_vault_a_lost_child_is_pulled_from_the_vault_digest_identical() {
    a_lost_child_is_pulled_from_the_vault_digest_identical(Backend::dir());
}
#[test]
fn s3_vault_a_lost_child_is_pulled_from_the_vault_digest_identical() {
    a_lost_child_is_pulled_from_the_vault_digest_identical(Backend::s3());
}
#[test]
fn dir_vault_with_repair_the_registry_gets_the_child_back_and_integrity_empties() {
    with_repair_the_registry_gets_the_child_back_and_integrity_empties(Backend::dir());
}
#[test]
fn s3_vault_with_repair_the_registry_gets_the_child_back_and_integrity_empties() {
    with_repair_the_registry_gets_the_child_back_and_integrity_empties(Backend::s3());
}
#[test]
fn dir_vault_an_object_that_does_not_match_its_digest_is_never_served() {
    a_vault_object_that_does_not_match_its_digest_is_never_served(Backend::dir());
}
#[test]
fn s3_vault_an_object_that_does_not_match_its_digest_is_never_served() {
    a_vault_object_that_does_not_match_its_digest_is_never_served(Backend::s3());
}
#[test]
fn dir_vault_content_seen_in_one_repository_is_never_served_for_another() {
    content_seen_in_one_repository_is_never_served_for_another(Backend::dir());
}
#[test]
fn s3_vault_content_seen_in_one_repository_is_never_served_for_another() {
    content_seen_in_one_repository_is_never_served_for_another(Backend::s3());
}

#[test]
fn small_blobs_pushed_through_regguard_are_kept_as_they_stream_not_read_back() {
    let reg = Registry::start();
    let vault = Backend::dir();
    let rg = regguard(&reg.url(), &vault, &[]);
    // Monolithic uploads (POST, then PUT with the body) ...
    let img = oci::multi_arch("copy-put");
    oci::push_multi_arch(&rg.url(), "app/put", "v1", &img, &[]);
    wait_kept(&vault, &digests(&img, false));
    // ... and skopeo's (POST, PATCH with the body, PUT ?digest= without one).
    let img2 = oci::multi_arch("copy-patch");
    skopeo_push(&img2, &format!("docker://{}/app/patch:v1", rg.host()));
    wait_kept(&vault, &digests(&img2, false));
    assert_eq!(
        rg.metric(r#"regguard_vault_fetches_total{kind="blob"}"#),
        0.0,
        "every config came from its upload, none was read back from the registry"
    );
    // Layers (vault.layers off) were not kept.
    let layer = &img.image("amd64").layers[0].digest;
    assert!(!vault.holds(layer));
}

// ---- the real garbage collection ----

/// Pushes through regguard, waits for the vault, then stops the registry, runs its real
/// `garbage-collect --delete-untagged` and starts it again.
fn push_then_collect(
    reg: &mut Registry,
    rg: &Regguard,
    vault: &Backend,
    img: &oci::MultiArch,
    repo: &str,
    layers: bool,
) -> tempfile::TempDir {
    let pushed = skopeo_push(img, &format!("docker://{}/{repo}:v1", rg.host()));
    wait_kept(vault, &digests(img, layers));
    reg.stop();
    reg.garbage_collect();
    reg.start_again(None);
    poll_until(WAIT, "regguard to see the registry back", || {
        (rg.metric("regguard_upstream_up") == 1.0).then_some(())
    });
    let child = img.image("amd64").manifest.digest.clone();
    assert!(!reg.has_manifest(repo, &child), "GC left the child");
    pushed
}

#[test]
fn after_a_real_gc_with_layers_kept_pulls_work_and_repair_restores_direct_pulls() {
    let mut reg = Registry::start();
    let vault = Backend::dir();
    let rg = regguard(
        &reg.url(),
        &vault,
        &[
            ("REGGUARD_VAULT_LAYERS", "true"),
            ("REGGUARD_HEAL_REPAIR", "true"),
        ],
    );
    let img = oci::multi_arch("gc-layers");
    let pushed = push_then_collect(&mut reg, &rg, &vault, &img, "ci/runner", true);

    let pulled = skopeo_pull(&format!("docker://{}/ci/runner:v1", rg.host()))
        .expect("a pull through regguard right after the GC");
    assert_eq!(pulled, src_blobs(&pushed));
    // Repairs follow; then a pull straight from the registry works too.
    let direct = poll_until(Duration::from_secs(90), "a direct pull to work", || {
        skopeo_pull(&format!("docker://{}/ci/runner:v1", reg.addr)).ok()
    });
    assert_eq!(direct, src_blobs(&pushed), "repaired digest-identical");
    assert!(rg.metric(r#"regguard_heal_repairs_total{result="repaired"}"#) >= 1.0);
    assert!(rg.metric(r#"regguard_heal_served_total{kind="blob"}"#) >= 1.0);
}

#[test]
fn after_a_real_gc_without_layers_manifests_are_served_and_the_lost_layer_is_named() {
    let mut reg = Registry::start();
    let vault = Backend::dir();
    let rg = regguard(&reg.url(), &vault, &[("REGGUARD_HEAL_REPAIR", "true")]);
    let img = oci::multi_arch("gc-nolayers");
    push_then_collect(&mut reg, &rg, &vault, &img, "ci/builder", false);
    let amd64 = img.image("amd64");
    let child = amd64.manifest.digest.clone();

    let failed = skopeo_pull(&format!("docker://{}/ci/builder:v1", rg.host()))
        .expect_err("the layers are lost everywhere");
    assert!(
        img.children()
            .iter()
            .flat_map(|c| &c.layers)
            .any(|l| failed.contains(&l.digest[7..19])),
        "skopeo fails on a lost layer, not on a manifest:\n{failed}"
    );
    let r = get_child(&rg.url(), "ci/builder", &child, &[]);
    assert_eq!((r.status, r.header(FROM_VAULT)), (200, Some("vault")));
    let config = send(
        "GET",
        &format!("{}/v2/ci/builder/blobs/{}", rg.url(), amd64.config.digest),
        &[],
        Bytes::new(),
    );
    assert_eq!(
        (config.status, config.body.clone()),
        (200, amd64.config.data.clone())
    );

    // What cannot be repaired is said precisely: which layer to re-push.
    let word = poll_until(WAIT, "the repair verdict in /integrity", || {
        entries_for(&rg, &child)
            .iter()
            .find_map(|b| b["repair"].as_str().map(str::to_owned))
    });
    assert!(
        word.starts_with("unrepairable: layer sha256:") && word.contains(&amd64.layers[0].digest),
        "{word}"
    );
    assert!(rg.log_text().contains("re-push the image that contains it"));
    assert!(rg.metric(r#"regguard_heal_repairs_total{result="unrepairable"}"#) >= 1.0);
    assert!(!reg.has_manifest("ci/builder", &child), "nothing half-done");
}

#[test]
fn heal_cli_plans_with_dry_run_then_repairs_a_registry_after_an_offline_gc() {
    let mut reg = Registry::start();
    let vault = Backend::dir();
    let rg = regguard(&reg.url(), &vault, &[("REGGUARD_VAULT_LAYERS", "true")]);
    let img = oci::multi_arch("cli-heal");
    let pushed = push_then_collect(&mut reg, &rg, &vault, &img, "tools/cli", true);
    let Backend::Dir(dir) = &vault else {
        unreachable!()
    };
    let vault_dir = dir.path().join("vault").display().to_string();
    let child = img.image("amd64").manifest.digest.clone();

    let registry = reg.url();
    // `check` says the lost child is in the vault, and what puts it back.
    let image = format!("{}/tools/cli:v1", reg.addr);
    let (code, out, err) = run_cli(&["check", "--insecure", "--vault", &vault_dir, &image], &[]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains(&format!("repairable: {child} is in the vault")),
        "{out}"
    );
    assert!(out.contains("regguard heal --registry"), "{out}");
    let args = [
        "heal",
        "--registry",
        &registry,
        "--vault",
        &vault_dir,
        "--insecure",
    ];
    let mut dry = args.to_vec();
    dry.push("--dry-run");
    let (code, out, err) = run_cli(&dry, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("dry run") && out.contains("WOULD REPAIR"),
        "{out}"
    );
    assert!(
        out.contains("upload layer") && out.contains(&format!("put manifest {child}")),
        "{out}"
    );
    assert!(
        !reg.has_manifest("tools/cli", &child),
        "a dry run changes nothing"
    );

    let (code, out, err) = run_cli(&args, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("REPAIRED"), "{out}");
    let direct = skopeo_pull(&format!("docker://{}/tools/cli:v1", reg.addr))
        .expect("a direct pull after `regguard heal`");
    assert_eq!(direct, src_blobs(&pushed));

    // Nothing left to do: a second run finds the registry healthy.
    let (code, out, _) = run_cli(&args, &[]);
    assert_eq!(code, Some(0));
    assert!(out.contains("broken refs     0"), "{out}");
}

#[test]
fn heal_cli_exits_1_and_names_the_layer_when_the_vault_lacks_it() {
    let mut reg = Registry::start();
    let vault = Backend::dir();
    let rg = regguard(&reg.url(), &vault, &[]);
    let img = oci::multi_arch("cli-lacks");
    push_then_collect(&mut reg, &rg, &vault, &img, "tools/lacks", false);
    let Backend::Dir(dir) = &vault else {
        unreachable!()
    };
    let vault_dir = dir.path().join("vault").display().to_string();
    let registry = reg.url();
    let (code, out, err) = run_cli(
        &[
            "heal",
            "--registry",
            &registry,
            "--vault",
            &vault_dir,
            "--insecure",
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("UNREPAIRABLE") && out.contains("not in vault"),
        "{out}"
    );
    let (code, _, err) = run_cli(
        &[
            "heal",
            "--registry",
            &registry,
            "--vault",
            "ftp://nowhere",
            "--insecure",
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
}

// ---- security and operations ----

#[test]
fn a_client_without_credentials_gets_the_registrys_401_never_vault_bytes() {
    let reg = Registry::start_with(RegistryOptions {
        auth: Some(("ci".into(), "s3cret".into())),
    });
    let vault = Backend::dir();
    let rg = regguard(&reg.url(), &vault, &[]);
    let auth = basic_auth("ci", "s3cret");
    let creds = [("authorization", auth.as_str())];
    let img = oci::multi_arch("auth");
    oci::push_multi_arch(&rg.url(), "private/app", "v1", &img, &creds);
    wait_kept(&vault, &digests(&img, false));
    let child = img.image("amd64").manifest.digest.clone();
    reg.remove_revision_link("private/app", &child);

    let r = get_child(&rg.url(), "private/app", &child, &[]);
    assert_eq!(r.status, 401, "the registry's challenge");
    assert_eq!(r.header(FROM_VAULT), None);
    assert!(!r.body.windows(16).any(|w| img
        .image("amd64")
        .manifest
        .data
        .windows(16)
        .any(|m| m == w)));
    let wrong = basic_auth("ci", "wrong");
    let r = get_child(
        &rg.url(),
        "private/app",
        &child,
        &[("authorization", wrong.as_str())],
    );
    assert_eq!((r.status, r.header(FROM_VAULT)), (401, None));
    let r = get_child(&rg.url(), "private/app", &child, &creds);
    assert_eq!((r.status, r.header(FROM_VAULT)), (200, Some("vault")));
}

#[test]
fn a_delete_through_regguard_is_not_undone_by_the_vault() {
    let reg = Registry::start();
    let vault = Backend::dir();
    let rg = regguard(&reg.url(), &vault, &[]);
    let img = oci::multi_arch("deleted");
    oci::push_multi_arch(&rg.url(), "app/old", "v1", &img, &[]);
    wait_kept(&vault, &digests(&img, false));
    let child = img.image("amd64").manifest.digest.clone();
    let r = send(
        "DELETE",
        &format!("{}/v2/app/old/manifests/{child}", rg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let r = get_child(&rg.url(), "app/old", &child, &[]);
    assert_eq!(
        (r.status, r.header(FROM_VAULT)),
        (404, None),
        "deleted on purpose"
    );
}

#[test]
fn an_image_deleted_through_regguard_is_neither_served_nor_repaired_after_a_gc() {
    let mut reg = Registry::start();
    let vault = Backend::dir();
    let rg = regguard(&reg.url(), &vault, &[("REGGUARD_HEAL_REPAIR", "true")]);
    let img = oci::multi_arch("secret");
    oci::push_multi_arch(&rg.url(), "team/secret", "v1", &img, &[]);
    wait_kept(&vault, &digests(&img, false));
    let index = img.index.digest.clone();
    let r = send(
        "DELETE",
        &format!("{}/v2/team/secret/manifests/{index}", rg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    reg.stop();
    reg.garbage_collect();
    reg.start_again(None);
    poll_until(WAIT, "regguard to see the registry back", || {
        (rg.metric("regguard_upstream_up") == 1.0).then_some(())
    });
    let amd64 = img.image("amd64");
    let config = &amd64.config.digest;
    assert!(
        !reg.blob_data_exists(config),
        "the GC took the deleted image's config"
    );
    // Neither its config nor its children come back through regguard ...
    let r = send(
        "GET",
        &format!("{}/v2/team/secret/blobs/{config}", rg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!((r.status, r.header(FROM_VAULT)), (404, None));
    let r = get_child(&rg.url(), "team/secret", &amd64.manifest.digest, &[]);
    assert_eq!((r.status, r.header(FROM_VAULT)), (404, None));
    // ... nor into the registry.
    std::thread::sleep(Duration::from_secs(3));
    assert!(!reg.has_blob("team/secret", config));
    assert_eq!(
        rg.metric(r#"regguard_heal_repairs_total{result="repaired"}"#),
        0.0
    );
}

#[test]
fn deleting_one_image_keeps_what_another_image_in_the_repository_still_references() {
    let reg = Registry::start();
    let vault = Backend::dir();
    let rg = regguard(&reg.url(), &vault, &[]);
    let img = oci::multi_arch("shared");
    oci::push_multi_arch(&rg.url(), "team/shared", "a", &img, &[]);
    // Tag b: an index of the amd64 child alone (the same child manifest, config and layers).
    let amd64 = img.image("amd64");
    let mut child = amd64.manifest.descriptor();
    child["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let only = oci::Blob::json(
        oci::OCI_INDEX,
        &serde_json::json!({"schemaVersion": 2, "mediaType": oci::OCI_INDEX, "manifests": [child]}),
    );
    assert_eq!(
        oci::put_manifest(&rg.url(), "team/shared", "b", &only, &[]).status,
        201
    );
    let mut all = digests(&img, false);
    all.push(only.digest.clone());
    wait_kept(&vault, &all);
    let Backend::Dir(dir) = &vault else {
        unreachable!()
    };
    let seen = dir
        .path()
        .join("vault/repositories/team/shared/_seen/sha256");
    let recorded = |d: &str| seen.join(&d[7..]).exists();

    let r = send(
        "DELETE",
        &format!("{}/v2/team/shared/manifests/{}", rg.url(), img.index.digest),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let arm64 = img.image("arm64");
    poll_until(
        WAIT,
        "the deleted image's own parts to be forgotten",
        || (!recorded(&arm64.config.digest) && !recorded(&img.index.digest)).then_some(()),
    );
    for d in [&amd64.manifest.digest, &amd64.config.digest, &only.digest] {
        assert!(recorded(d), "{d}, still referenced by tag b, was forgotten");
    }
}

#[test]
fn a_blob_deleted_through_regguard_is_not_recorded_again_by_a_later_pull() {
    let reg = Registry::start();
    let vault = Backend::dir();
    let rg = regguard(&reg.url(), &vault, &[]);
    let img = oci::multi_arch("unlinked");
    oci::push_multi_arch(&rg.url(), "team/app", "v1", &img, &[]);
    wait_kept(&vault, &digests(&img, false));
    let config = img.image("amd64").config.digest.clone();
    let r = send(
        "DELETE",
        &format!("{}/v2/team/app/blobs/{config}", rg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    drop(rg);
    // A fresh regguard (nothing in memory) on the same vault; a pull walks the image again:
    // the child's record is refreshed (its mtime moves), its config is not recorded again.
    let Backend::Dir(dir) = &vault else {
        unreachable!()
    };
    let seen = dir.path().join("vault/repositories/team/app/_seen/sha256");
    let child = img.image("amd64").manifest.digest.clone();
    let mtime = |d: &str| {
        std::fs::metadata(seen.join(&d[7..]))
            .and_then(|m| m.modified())
            .ok()
    };
    let before = mtime(&child);
    // The delete's own record may still be there (its cascade runs in the background and the
    // process was stopped): what matters is that nothing records it again.
    let config_before = mtime(&config);
    std::thread::sleep(Duration::from_millis(1100)); // a later mtime, on any filesystem
    let rg = regguard(&reg.url(), &vault, &[]);
    let r = send(
        "GET",
        &format!("{}/v2/team/app/manifests/{child}", rg.url()),
        &[("accept", ACCEPT_ALL)],
        Bytes::new(),
    );
    assert_eq!(r.status, 200);
    poll_until(WAIT, "the pulled child to be recorded again", || {
        (mtime(&child) != before).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500)); // its references follow it in the queue
    assert_eq!(
        mtime(&config),
        config_before,
        "the deleted config was recorded again"
    );
    let r = send(
        "GET",
        &format!("{}/v2/team/app/blobs/{config}", rg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!((r.status, r.header(FROM_VAULT)), (404, None));
}

#[test]
fn blobs_from_the_vault_honour_range_requests() {
    let reg = Registry::start();
    let vault = Backend::dir();
    let rg = regguard(&reg.url(), &vault, &[("REGGUARD_VAULT_LAYERS", "true")]);
    let img = oci::multi_arch("range");
    oci::push_multi_arch(&rg.url(), "app/range", "v1", &img, &[]);
    wait_kept(&vault, &digests(&img, true));
    let layer = img.image("amd64").layers[0].clone();
    reg.remove_layer_link("app/range", &layer.digest);
    let url = format!("{}/v2/app/range/blobs/{}", rg.url(), layer.digest);

    let whole = send("GET", &url, &[], Bytes::new());
    assert_eq!(
        (whole.status, whole.header(FROM_VAULT)),
        (200, Some("vault"))
    );
    assert_eq!(whole.body, layer.data);
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    let part = send("GET", &url, &[("range", "bytes=2-9")], Bytes::new());
    assert_eq!(part.status, 206);
    assert_eq!(part.body, layer.data.slice(2..10));
    let total = layer.data.len();
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 2-9/{total}").as_str())
    );
    let past = send(
        "GET",
        &url,
        &[("range", &format!("bytes={total}-"))],
        Bytes::new(),
    );
    assert_eq!(past.status, 416);
    assert_eq!(
        past.header("content-range"),
        Some(format!("bytes */{total}").as_str())
    );
}

/// Files whose name marks an upload in progress (object_store's local staging files).
fn staging_files(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains('#'))
            {
                found.push(p);
            }
        }
    }
    found
}

#[test]
fn sigkill_while_a_large_layer_streams_into_the_vault_leaves_nothing_partial_to_serve() {
    const SIZE: u64 = 768 * 1024 * 1024;
    let reg = Registry::start();
    let vault = Backend::dir();
    let repo = "big/image";
    let layer = oci::push_pattern_blob(&reg.url(), repo, SIZE);
    let config = oci::Blob::json(
        oci::OCI_CONFIG,
        &serde_json::json!({"architecture": "amd64", "os": "linux"}),
    );
    oci::push_blob(&reg.url(), repo, &config, &[]);
    let manifest = oci::Blob::json(
        oci::OCI_MANIFEST,
        &serde_json::json!({
            "schemaVersion": 2, "mediaType": oci::OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": [{"mediaType": oci::OCI_LAYER, "digest": layer, "size": SIZE}]
        }),
    );
    assert_eq!(
        oci::put_manifest(&reg.url(), repo, "v1", &manifest, &[]).status,
        201
    );

    let mut rg = regguard(&reg.url(), &vault, &[("REGGUARD_VAULT_LAYERS", "true")]);
    // A client pulls the layer and reads it slowly: the vault's copy streams with it. Its
    // small receive buffer and short first read keep what regguard relays ahead of the copy
    // small: a copy that falls 8 MiB behind is abandoned (by design), and on a machine
    // busy with the rest of the suite the copy's writer can start late.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.connect(&rg.public.into()).unwrap();
    let mut client: std::net::TcpStream = socket.into();
    let request = format!(
        "GET /v2/{repo}/blobs/{layer} HTTP/1.1\r\nHost: {}\r\n\r\n",
        rg.host()
    );
    std::io::Write::write_all(&mut client, request.as_bytes()).unwrap();
    let mut first = vec![0u8; 256 << 10];
    std::io::Read::read_exact(&mut client, &mut first).unwrap();
    let Backend::Dir(dir) = &vault else {
        unreachable!()
    };
    let root = dir.path().join("vault");
    poll_until(WAIT, "the layer to be streaming into the vault", || {
        (!staging_files(&root).is_empty()).then_some(())
    });
    rg.proc.signal("KILL");
    rg.proc.wait_exit(Duration::from_secs(10));
    drop(client);
    assert!(
        !vault.holds(&layer),
        "the partial layer is not visible under its digest"
    );

    // The registry loses the layer; a restarted regguard on the same vault does not serve it.
    reg.remove_layer_link(repo, &layer);
    let rg = regguard(&reg.url(), &vault, &[]);
    let r = send(
        "HEAD",
        &format!("{}/v2/{repo}/blobs/{layer}", rg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!((r.status, r.header(FROM_VAULT)), (404, None));
}

#[test]
fn with_layers_on_a_pulled_layer_is_kept_from_the_stream_not_read_back() {
    let reg = Registry::start();
    let vault = Backend::dir();
    // Pushed straight to the registry: regguard sees the image first when a client pulls it.
    let img = oci::multi_arch("pulled-layers");
    oci::push_multi_arch(&reg.url(), "app/pulled", "v1", &img, &[]);
    let rg = regguard(&reg.url(), &vault, &[("REGGUARD_VAULT_LAYERS", "true")]);
    skopeo_pull(&format!("docker://{}/app/pulled:v1", rg.host())).expect("a pull through regguard");
    // Well within the filler's 30 s wait for layers: these came from the client's stream.
    let all = digests(&img, true);
    poll_until(Duration::from_secs(20), "the layers to be kept", || {
        all.iter().all(|d| vault.holds(d)).then_some(())
    });
    let configs = img.children().len() as f64;
    assert!(
        rg.metric(r#"regguard_vault_fetches_total{kind="blob"}"#) <= configs,
        "no layer was read back from the registry"
    );
}

#[test]
fn a_layer_pulled_over_http2_is_copied_into_the_vault_too() {
    let reg = Registry::start();
    let vault = Backend::dir();
    let img = oci::multi_arch("h2-layers");
    oci::push_multi_arch(&reg.url(), "app/h2", "v1", &img, &[]);
    let cert = common::TestCert::generate();
    let mut env = vault.env();
    env.push(("REGGUARD_VAULT_LAYERS".into(), "true".into()));
    let rg = Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            env,
            tls: Some((cert.cert_pem.clone(), cert.key_pem.clone())),
            ..Default::default()
        },
    );
    let layer = img.image("arm64").layers[1].clone();
    let req = ::http::Request::get(format!(
        "https://{}/v2/app/h2/blobs/{}",
        rg.host(),
        layer.digest
    ))
    .header("host", rg.host())
    .body(http_body_util::Full::new(Bytes::new()))
    .unwrap();
    let (alpn, r) = http::https_send(rg.public, &cert.cert_der, true, req);
    assert_eq!((alpn.as_str(), r.status), ("h2", 200));
    assert_eq!(r.body, layer.data);
    // Within the filler's 30 s wait: the copy came from the HTTP/2 stream.
    poll_until(Duration::from_secs(20), "the layer to be kept", || {
        vault.holds(&layer.digest).then_some(())
    });
    assert_eq!(
        rg.metric(r#"regguard_vault_fetches_total{kind="blob"}"#),
        0.0
    );
}

#[test]
fn abandoned_uploads_never_take_the_room_manifest_pushes_need() {
    let reg = Registry::start();
    let vault = Backend::dir();
    let rg = regguard(&reg.url(), &vault, &[]);
    // 70 uploads of 4 MiB each, started and never finished: more than the gate's whole
    // manifest memory budget (256 MiB) if their copies took from it.
    let chunk = Bytes::from(vec![7u8; 4 << 20]);
    for i in 0..70 {
        let r = send(
            "POST",
            &format!("{}/v2/app/abandoned/blobs/uploads/", rg.url()),
            &[],
            Bytes::new(),
        );
        assert_eq!(r.status, 202, "upload {i}: {}", r.text());
        let url = http::location_url(&rg.url(), r.header("location").unwrap(), "");
        let r = send(
            "PATCH",
            &url,
            &[("content-type", "application/octet-stream")],
            chunk.clone(),
        );
        assert_eq!(r.status, 202, "patch {i}: {}", r.text());
    }
    assert!(rg.metric("regguard_manifest_bytes_held") < (4 << 20) as f64);
    let img = oci::multi_arch("after-abandoned");
    oci::push_multi_arch(&rg.url(), "app/abandoned", "v1", &img, &[]);
    assert!(reg.has_manifest("app/abandoned", "v1"));
}

#[test]
fn a_default_vault_location_that_cannot_be_written_is_a_warning_not_a_failed_start() {
    let reg = Registry::start();
    let blocked = tempfile::tempdir().unwrap();
    // A file where the state directory should be: nothing can be created under it.
    let state = blocked.path().join("state");
    std::fs::write(&state, b"").unwrap();
    let rg = Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            env: vec![("STATE_DIRECTORY".into(), state.display().to_string())],
            ..Default::default()
        },
    );
    assert!(rg.log_text().contains("no vault"), "{}", rg.log_text());
    assert_eq!(http::get(&format!("{}/v2/", rg.url())).status, 200);
    assert!(rg.metric_opt("regguard_vault_objects").is_none());
}
