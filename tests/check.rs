//! `regguard check` against the real registry: the tree, exit codes, JSON, credentials.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::oci;
use common::{Registry, RegistryOptions};

fn check(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let all: Vec<&str> = std::iter::once("check")
        .chain(args.iter().copied())
        .collect();
    common::run_cli(&all, env)
}

#[test]
fn healthy_image_exits_0_and_each_broken_one_exits_1_naming_digest_and_platform() {
    let reg = Registry::start();
    let img = oci::multi_arch("check");
    for repo in ["ok/app", "child/app", "layer/app"] {
        oci::push_multi_arch(&reg.url(), repo, "v1", &img, &[]);
    }
    let host = reg.addr.to_string();
    let child = img.image("amd64").manifest.digest.clone();
    reg.remove_revision_link("child/app", &child);
    let layer = img.image("arm64").layers[1].digest.clone();
    reg.remove_layer_link("layer/app", &layer);

    let (code, out, err) = check(&["--insecure", &format!("{host}/ok/app:v1")], &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("linux/amd64")
            && out.contains("linux/arm64")
            && out.contains("attestation for linux/amd64")
            && out.contains("attestation for linux/arm64")
            && !out.contains("unknown/unknown"),
        "{out}"
    );
    assert!(out.contains("=> healthy"), "{out}");

    let (code, out, _) = check(&["--insecure", &format!("{host}/child/app:v1")], &[]);
    assert_eq!(code, Some(1), "{out}");
    let line = out.lines().find(|l| l.contains(&child)).unwrap();
    assert!(
        line.contains("linux/amd64") && line.contains("MISSING"),
        "{line}"
    );

    let (code, out, _) = check(
        &[
            "--insecure",
            "--format",
            "json",
            &format!("{host}/layer/app@{}", img.index.digest),
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["broken"], 1);
    let arm = v[0]["tree"]["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["platform"] == "linux/arm64")
        .unwrap();
    let missing = arm["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["result"] == "missing")
        .unwrap();
    assert_eq!(missing["digest"], layer.as_str());
    assert_eq!(missing["role"], "layer");
}

#[test]
fn unreachable_registry_or_missing_credentials_exit_2_with_a_clear_message() {
    let closed = common::ClosedPort::reserve();
    let dead = closed.addr.to_string();
    let (code, _, err) = check(&["--insecure", &format!("{dead}/a/b:v1")], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("connection refused") && err.contains("is the registry running"),
        "{err}"
    );
    // Without --insecure, HTTPS only: a plain-HTTP registry is unreachable, with the hint.
    let plain = Registry::start();
    let (code, _, err) = check(&[&format!("{}/a/b:v1", plain.addr)], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--insecure"), "{err}");

    let reg = Registry::start_with(RegistryOptions {
        auth: Some(("ci".into(), "pw".into())),
    });
    let img = oci::multi_arch("check-auth");
    let basic = [("authorization", "Basic Y2k6cHc=")];
    oci::push_multi_arch(&reg.url(), "priv/app", "v1", &img, &basic);
    let image = format!("{}/priv/app:v1", reg.addr);
    let (code, _, err) = check(&["--insecure", &image], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("401 Unauthorized from GET /v2/")
            && err.contains("no credentials were sent")
            && err.contains("--user USER:PASSWORD"),
        "{err}"
    );
    // Credentials from a docker config file, as CI has them after `docker login`.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"Y2k6cHc="}}}}}}"#, reg.addr),
    )
    .unwrap();
    let (code, out, err) = check(
        &["--insecure", &image],
        &[("DOCKER_CONFIG", dir.path().to_str().unwrap())],
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, _) = check(&["--insecure", "--user", "ci:pw", &image], &[]);
    assert_eq!(code, Some(0));
}

#[test]
fn https_registry_is_checked_verified_with_a_trusted_ca_or_unverified_with_insecure() {
    let reg = Registry::start();
    let img = oci::multi_arch("check-tls");
    oci::push_multi_arch(&reg.url(), "tls/app", "v1", &img, &[]);
    let cert = common::TestCert::generate();
    // The TLS front: regguard itself, with a self-signed certificate.
    let rg = common::Regguard::start_with(
        &reg.url(),
        common::RegguardOptions {
            tls: Some((cert.cert_pem.clone(), cert.key_pem.clone())),
            ..Default::default()
        },
    );
    let image = format!("{}/tls/app:v1", rg.host());
    let (code, _, err) = check(&[&image], &[("SSL_CERT_FILE", "/nonexistent")]);
    assert_eq!(code, Some(2), "an untrusted certificate is refused: {err}");
    assert!(
        err.contains("signed by an unknown authority")
            && err.contains("SSL_CERT_FILE=")
            && err.contains("--insecure"),
        "{err}"
    );
    let (code, out, err) = check(
        &[&image],
        &[("SSL_CERT_FILE", cert.cert_pem.to_str().unwrap())],
    );
    assert_eq!(code, Some(0), "verified against the given CA: {out}{err}");
    let (code, out, err) = check(&["--insecure", &image], &[]);
    assert_eq!(code, Some(0), "unverified with --insecure: {out}{err}");
    assert!(out.contains("=> healthy"));
}

#[test]
fn wrong_or_malformed_credentials_say_what_was_sent() {
    let reg = Registry::start_with(RegistryOptions {
        auth: Some(("alice".into(), "right".into())),
    });
    let image = format!("{}/priv/app:v1", reg.addr);
    let (code, _, err) = check(&["--insecure", "--user", "alice:wrong", &image], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("401 Unauthorized from GET /v2/")
            && err.contains("sent user `alice` (from --user)")
            && err.contains("refused")
            && !err.contains("give --user"),
        "{err}"
    );
    let (code, _, err) = check(
        &["--insecure", &image],
        &[("REGGUARD_USER", "alice"), ("REGGUARD_PASSWORD", "nope")],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("(from REGGUARD_USER and REGGUARD_PASSWORD)"),
        "{err}"
    );

    // No colon: refused before anything is sent (a closed port would say "connection refused").
    let closed = common::ClosedPort::reserve();
    let (code, _, err) = check(
        &[
            "--insecure",
            "--user",
            "alice",
            &format!("{}/a/b:v1", closed.addr),
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--user: expected USER:PASSWORD") && !err.contains("refused"),
        "{err}"
    );
}

#[test]
fn references_are_read_as_people_paste_them() {
    let reg = Registry::start();
    let img = oci::multi_arch("paste");
    oci::push_multi_arch(&reg.url(), "team/app", "latest", &img, &[]);
    let host = reg.addr.to_string();
    let digest = img.index.digest.clone();
    for r in [
        format!("http://{host}/team/app:latest"),
        format!("http://{host}/team/app@{digest}"),
        format!("{host}/team/app"),
        format!("docker://{host}/team/app:latest"),
    ] {
        let (code, out, err) = check(&["--insecure", &r], &[]);
        assert_eq!(code, Some(0), "{r}: {out}{err}");
    }
    let (_, out, _) = check(&["--insecure", &format!("{host}/team/app@{digest}")], &[]);
    assert!(
        out.starts_with(&format!("{host}/team/app@{digest}\n")) && !out.contains(":sha256:"),
        "{out}"
    );

    // Digest syntax is checked before anything is sent.
    let before = reg.log_text().len();
    let (code, _, err) = check(&["--insecure", &format!("{host}/team/app@sha256:abc")], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("64 hex digits, this one has 3"), "{err}");
    assert_eq!(reg.log_text().len(), before, "nothing reached the registry");

    // https:// against a plain-HTTP port: the TLS failure, and the fix.
    let (code, _, err) = check(&[&format!("https://{host}/team/app:latest")], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("does not speak TLS") && err.contains(&format!("http://{host}")),
        "{err}"
    );
    // http:// without --insecure: refused, as `scan` refuses it.
    let (code, _, err) = check(&[&format!("http://{host}/team/app:latest")], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("refusing plain HTTP") && err.contains("--insecure"),
        "{err}"
    );
    // A name nobody can resolve.
    let (code, _, err) = check(&["--insecure", "nosuch.invalid:5000/team/app:v1"], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot resolve `nosuch.invalid`"), "{err}");
}

#[test]
fn references_that_do_not_exist_are_not_found_exit_2_never_broken() {
    let reg = Registry::start();
    let img = oci::multi_arch("missing");
    oci::push_multi_arch(&reg.url(), "team/app", "v1", &img, &[]);
    oci::push_multi_arch(&reg.url(), "team/app", "v2", &img, &[]);
    let host = reg.addr.to_string();

    let (code, out, err) = check(&["--insecure", &format!("{host}/team/app:v3")], &[]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(
        err.contains("not found: tag `v3` is not in `team/app`")
            && err.contains("tags there: v1, v2"),
        "{err}"
    );
    let (code, _, err) = check(&["--insecure", &format!("{host}/team/ap:v1")], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("not found: repository `team/ap` does not exist"),
        "{err}"
    );
    let absent = format!("sha256:{}", "0".repeat(64));
    let (code, _, err) = check(&["--insecure", &format!("{host}/team/app@{absent}")], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains(&format!("not found: manifest {absent}")),
        "{err}"
    );

    // regguard's admin port instead of its public one.
    let rg = common::Regguard::start(&reg.url());
    let (code, _, err) = check(&["--insecure", &format!("{}/team/app:v1", rg.admin)], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("not found") && err.contains("admin port"),
        "{err}"
    );

    // JSON says it too.
    let (code, out, _) = check(
        &[
            "--insecure",
            "--format",
            "json",
            &format!("{host}/team/app:v3"),
        ],
        &[],
    );
    assert_eq!(code, Some(2));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["status"], "not_found");
}

#[test]
fn broken_results_name_attestations_and_say_how_to_repair() {
    let reg = Registry::start();
    let img = oci::multi_arch("repair");
    oci::push_multi_arch(&reg.url(), "att/app", "v1", &img, &[]);
    oci::push_multi_arch(&reg.url(), "layer/app", "v1", &img, &[]);
    let host = reg.addr.to_string();
    let attestation = img.attestations[0].manifest.digest.clone(); // describes linux/amd64
    reg.remove_revision_link("att/app", &attestation);
    let layer = img.image("arm64").layers[0].digest.clone();
    reg.remove_layer_link("layer/app", &layer);

    let (code, out, _) = check(&["--insecure", &format!("{host}/att/app:v1")], &[]);
    assert_eq!(code, Some(1), "{out}");
    let line = out.lines().find(|l| l.contains(&attestation)).unwrap();
    assert!(
        line.contains("attestation for linux/amd64") && line.contains("MISSING"),
        "{line}"
    );
    let repair: Vec<&str> = out.lines().filter(|l| l.starts_with("repair: ")).collect();
    assert_eq!(repair.len(), 1, "{out}");
    assert!(
        repair[0].contains(&format!(
            "skopeo copy --all --preserve-digests docker://<good-copy> docker://{host}/att/app:v1"
        )),
        "{out}"
    );

    let (code, out, _) = check(&["--insecure", &format!("{host}/layer/app:v1")], &[]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "repair: mount {layer} from a repository that has it (POST /v2/layer/app/blobs/uploads/?mount={layer}&from=<other-repo>)"
        )),
        "{out}"
    );
}
