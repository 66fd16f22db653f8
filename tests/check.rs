//! `regguard check` against the real registry: the tree, exit codes, JSON, credentials.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::oci;
use common::{Registry, RegistryOptions};

fn check(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_regguard"));
    cmd.arg("check")
        .args(args)
        .env_remove("REGGUARD_USER")
        .env_remove("REGGUARD_PASSWORD")
        .env("HOME", "/nonexistent");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
            && out.contains("unknown/unknown"),
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
    assert!(err.contains("unreachable"), "{err}");
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
    assert!(err.contains("not authorized"), "{err}");
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
    let (code, out, err) = check(
        &[&image],
        &[("SSL_CERT_FILE", cert.cert_pem.to_str().unwrap())],
    );
    assert_eq!(code, Some(0), "verified against the given CA: {out}{err}");
    let (code, out, err) = check(&["--insecure", &image], &[]);
    assert_eq!(code, Some(0), "unverified with --insecure: {out}{err}");
    assert!(out.contains("=> healthy"));
}
