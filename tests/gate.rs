//! The push gate against the real registry and real clients: broken manifests
//! are refused before the registry sees them; healthy pushes land unchanged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bytes::Bytes;
use common::http::{self, send, send_body, sha256_digest};
use common::oci::{self, Blob, ACCEPT_ALL, OCI_INDEX, OCI_MANIFEST};
use common::{skopeo, skopeo_round_trip, Regguard, RegguardOptions, Registry};
use serde_json::{json, Value};

fn gated(reg: &Registry, mode: &str) -> Regguard {
    Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            env: vec![("REGGUARD_GATE_MODE".into(), mode.into())],
            ..Default::default()
        },
    )
}

fn gate_count(rg: &Regguard, result: &str) -> f64 {
    rg.metric(&format!("regguard_push_gate_total{{result=\"{result}\"}}"))
}

fn errors(r: &http::Resp) -> Vec<Value> {
    r.json()["errors"].as_array().unwrap().clone()
}

/// Pushes blobs and the children of `img` (not the index) straight to the registry.
fn push_children(reg: &Registry, repo: &str, img: &oci::MultiArch, skip: Option<&str>) {
    for b in img.blobs() {
        oci::push_blob(&reg.url(), repo, b, &[]);
    }
    for c in img.children() {
        if Some(c.manifest.digest.as_str()) == skip {
            continue;
        }
        assert_eq!(
            oci::put_manifest(&reg.url(), repo, &c.manifest.digest, &c.manifest, &[]).status,
            201
        );
    }
}

#[test]
fn healthy_pushes_of_every_shape_are_accepted_unchanged() {
    let reg = Registry::start();
    let rg = gated(&reg, "enforce");
    let work = tempfile::tempdir().unwrap();

    // Multi-arch with attestations, by skopeo, and back.
    let img = oci::multi_arch("gate-ok");
    let dest = format!("docker://{}/gate/multi:v1", rg.host());
    skopeo_round_trip(
        &img,
        &dest,
        &["--dest-tls-verify=false"],
        &["--src-tls-verify=false"],
    );
    assert_eq!(gate_count(&rg, "accepted"), 5.0, "4 children + the index");

    // A single-platform image, by skopeo.
    let single = work.path().join("single");
    oci::write_image_layout(img.image("arm64"), &single, "v1");
    skopeo(&[
        "copy",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", single.display()),
        &format!("docker://{}/gate/single:v1", rg.host()),
    ]);
    let r = send(
        "GET",
        &format!("{}/v2/gate/single/manifests/v1", reg.url()),
        &[("accept", ACCEPT_ALL)],
        Bytes::new(),
    );
    assert_eq!(
        r.header("docker-content-digest"),
        Some(img.image("arm64").manifest.digest.as_str())
    );

    // A Docker manifest list, through regguard's own API calls.
    let list = oci::docker_list("gate-docker");
    oci::push_multi_arch(&rg.url(), "gate/docker", "v1", &list, &[]);
    let r = send(
        "GET",
        &format!("{}/v2/gate/docker/manifests/v1", reg.url()),
        &[("accept", ACCEPT_ALL)],
        Bytes::new(),
    );
    assert_eq!(r.body, list.index.data);
    assert_eq!(gate_count(&rg, "rejected"), 0.0);
    assert_eq!(gate_count(&rg, "accepted"), 5.0 + 1.0 + 3.0);
}

#[test]
fn index_with_a_child_never_pushed_is_refused_before_the_registry_sees_it() {
    let reg = Registry::start();
    let rg = gated(&reg, "enforce");
    let img = oci::multi_arch("gate-missing");
    let missing = img.image("arm64").manifest.digest.clone();
    push_children(&reg, "gate/app", &img, Some(&missing));

    let r = oci::put_manifest(&rg.url(), "gate/app", "v1", &img.index, &[]);
    assert_eq!(r.status, 400);
    let errs = errors(&r);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0]["code"], "MANIFEST_BLOB_UNKNOWN");
    assert_eq!(errs[0]["detail"]["digest"], missing.as_str());
    assert_eq!(errs[0]["detail"]["reason"], "missing");
    assert_eq!(errs[0]["detail"]["platform"], "linux/arm64");
    assert!(errs[0]["message"]
        .as_str()
        .unwrap()
        .contains("push it to this repository first"));
    // The registry holds neither the tag nor the index (asked by HEAD).
    assert!(
        !reg.has_manifest("gate/app", "v1"),
        "the registry stored the tag"
    );
    assert!(
        !reg.has_manifest("gate/app", &img.index.digest),
        "the registry stored the index"
    );
    assert_eq!(gate_count(&rg, "rejected"), 1.0);
    assert!(rg
        .log_text()
        .contains("push gate: manifest references missing or wrong content"));

    // Pushing the child first makes the same index land: a cached 404 does not stick.
    let child = img.image("arm64");
    assert_eq!(
        oci::put_manifest(&reg.url(), "gate/app", &missing, &child.manifest, &[]).status,
        201
    );
    assert_eq!(
        oci::put_manifest(&rg.url(), "gate/app", "v1", &img.index, &[]).status,
        201
    );
    // The same HEADs see it now: their "absent" above was an answer, not a blind spot.
    assert!(reg.has_manifest("gate/app", "v1"));
    assert!(reg.has_manifest("gate/app", &img.index.digest));
}

#[test]
fn index_whose_child_lost_a_layer_is_refused_naming_layer_child_and_platform() {
    let reg = Registry::start();
    let rg = gated(&reg, "enforce");
    let img = oci::multi_arch("gate-layer");
    push_children(&reg, "gate/layer", &img, None);
    let amd64 = img.image("amd64");
    let layer = amd64.layers[0].digest.clone();
    reg.remove_layer_link("gate/layer", &layer);

    let r = oci::put_manifest(&rg.url(), "gate/layer", "v1", &img.index, &[]);
    assert_eq!(r.status, 400, "{}", r.text());
    let errs = errors(&r);
    assert_eq!(errs.len(), 1, "{errs:?}");
    let d = &errs[0]["detail"];
    assert_eq!(d["digest"], layer.as_str());
    assert_eq!(d["child"], amd64.manifest.digest.as_str());
    assert_eq!(d["platform"], "linux/amd64");
    assert_eq!(d["kind"], "blob");
    // Registry 2.8 alone takes it: its check stops at the direct children.
    assert_eq!(
        oci::put_manifest(&reg.url(), "gate/layer", "v1", &img.index, &[]).status,
        201
    );
}

#[test]
fn wrong_sizes_in_index_and_image_descriptors_are_refused_with_both_values() {
    let reg = Registry::start();
    let rg = gated(&reg, "enforce");
    let img = oci::multi_arch("gate-size");
    push_children(&reg, "gate/size", &img, None);

    let mut index: Value = serde_json::from_slice(&img.index.data).unwrap();
    let real = index["manifests"][0]["size"].as_u64().unwrap();
    index["manifests"][0]["size"] = json!(real + 1);
    let bad_index = Blob::json(OCI_INDEX, &index);
    let r = oci::put_manifest(&rg.url(), "gate/size", "v1", &bad_index, &[]);
    assert_eq!(r.status, 400);
    let d = &errors(&r)[0]["detail"];
    assert_eq!(d["reason"], "size_mismatch");
    assert_eq!(d["expected"], (real + 1).to_string());
    assert_eq!(d["found"], real.to_string());

    let amd64 = img.image("amd64");
    let mut manifest: Value = serde_json::from_slice(&amd64.manifest.data).unwrap();
    let layer_size = manifest["layers"][1]["size"].as_u64().unwrap();
    manifest["layers"][1]["size"] = json!(layer_size - 1);
    let bad_image = Blob::json(OCI_MANIFEST, &manifest);
    let r = oci::put_manifest(&rg.url(), "gate/size", &bad_image.digest, &bad_image, &[]);
    assert_eq!(r.status, 400);
    let d = &errors(&r)[0]["detail"];
    assert_eq!(d["reason"], "size_mismatch");
    assert_eq!(d["digest"], amd64.layers[1].digest.as_str());
    assert_eq!(d["expected"], (layer_size - 1).to_string());
    assert_eq!(d["found"], layer_size.to_string());

    // Both are accepted by registry 2.8 on its own.
    assert_eq!(
        oci::put_manifest(&reg.url(), "gate/size", "v1", &bad_index, &[]).status,
        201
    );
    assert_eq!(
        oci::put_manifest(&reg.url(), "gate/size", &bad_image.digest, &bad_image, &[]).status,
        201
    );
}

#[test]
fn malformed_pushes_get_the_right_code_and_nothing_is_forwarded() {
    let reg = Registry::start();
    let rg = gated(&reg, "enforce");
    let url = |r: &str| format!("{}/v2/gate/bad/manifests/{r}", rg.url());
    let ct = [("content-type", OCI_INDEX)];

    let body = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#
    ));
    let wrong = sha256_digest(b"other");
    let mut sent = vec![wrong.clone(), sha256_digest(&body)];
    let r = send("PUT", &url(&wrong), &ct, body);
    assert_eq!(
        (r.status, errors(&r)[0]["code"].as_str().unwrap()),
        (400, "DIGEST_INVALID")
    );

    sent.push(sha256_digest(b"not json {"));
    let r = send("PUT", &url("v1"), &ct, Bytes::from_static(b"not json {"));
    assert_eq!(
        (r.status, errors(&r)[0]["code"].as_str().unwrap()),
        (400, "MANIFEST_INVALID")
    );

    let no_manifests = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}"}}"#
    ));
    sent.push(sha256_digest(&no_manifests));
    let r = send("PUT", &url("v1"), &ct, no_manifests);
    assert_eq!(
        (r.status, errors(&r)[0]["code"].as_str().unwrap()),
        (400, "MANIFEST_INVALID")
    );

    let huge = Bytes::from(vec![b' '; 5 * 1024 * 1024]);
    sent.push(sha256_digest(&huge));
    let r = send("PUT", &url("v1"), &ct, huge.clone());
    assert_eq!(
        (r.status, errors(&r)[0]["code"].as_str().unwrap()),
        (413, "MANIFEST_INVALID")
    );
    // The same without Content-Length (chunked): cut off at 4 MiB.
    sent.push(http::pattern_digest(5 * 1024 * 1024));
    let r = send_body(
        "PUT",
        &url("v1"),
        &ct,
        http::PatternBody::chunked(5 * 1024 * 1024),
    );
    assert_eq!(
        (r.status, errors(&r)[0]["code"].as_str().unwrap()),
        (413, "MANIFEST_INVALID")
    );

    // The registry holds none of them, by tag or by digest (asked by HEAD).
    assert!(!reg.has_manifest("gate/bad", "v1"));
    for digest in &sent {
        assert!(!reg.has_manifest("gate/bad", digest), "{digest} stored");
    }
    // Control: the same HEAD finds a manifest the registry does hold in that repository.
    let img = oci::multi_arch("gate-bad-control");
    oci::push_multi_arch(&reg.url(), "gate/bad", "control", &img, &[]);
    assert!(reg.has_manifest("gate/bad", "control"));
    assert_eq!(gate_count(&rg, "rejected"), 5.0);
    assert_eq!(
        http::get(&format!("{}/v2/", rg.url())).status,
        200,
        "regguard keeps serving"
    );
}

#[test]
fn audit_mode_forwards_and_counts_what_enforce_would_refuse() {
    let reg = Registry::start();
    let rg = gated(&reg, "audit");
    let img = oci::multi_arch("gate-audit");
    let missing = img.image("amd64").manifest.digest.clone();
    push_children(&reg, "gate/audit", &img, Some(&missing));
    let direct = oci::put_manifest(&reg.url(), "gate/audit", "direct", &img.index, &[]);
    let r = oci::put_manifest(&rg.url(), "gate/audit", "v1", &img.index, &[]);
    // The PUT was forwarded: the registry's own refusal (it too refuses a missing direct
    // child) reaches the client byte for byte, not regguard's (whose detail names a reason).
    assert_eq!(r.status, direct.status);
    assert_eq!(r.status, 400);
    assert_eq!(r.body, direct.body, "{}", r.text());
    assert!(
        errors(&r)[0]["detail"].get("reason").is_none(),
        "{}",
        r.text()
    );
    assert_eq!(gate_count(&rg, "audit_would_reject"), 1.0);
    assert_eq!(gate_count(&rg, "rejected"), 0.0);
}

#[test]
fn a_subject_that_does_not_exist_is_accepted() {
    let reg = Registry::start();
    let rg = gated(&reg, "enforce");
    let img = oci::multi_arch("gate-subject");
    let amd64 = img.image("amd64");
    for b in std::iter::once(&amd64.config).chain(&amd64.layers) {
        oci::push_blob(&reg.url(), "gate/subject", b, &[]);
    }
    let mut m: Value = serde_json::from_slice(&amd64.manifest.data).unwrap();
    m["subject"] =
        json!({"mediaType": OCI_MANIFEST, "digest": sha256_digest(b"not pushed"), "size": 10});
    let referrer = Blob::json(OCI_MANIFEST, &m);
    let r = oci::put_manifest(&rg.url(), "gate/subject", &referrer.digest, &referrer, &[]);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(gate_count(&rg, "accepted"), 1.0);
}

#[test]
fn sixteen_parallel_skopeo_pushes_all_land() {
    let reg = Registry::start();
    let rg = gated(&reg, "enforce");
    let work = tempfile::tempdir().unwrap();
    let host = rg.host();
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let img = oci::multi_arch(&format!("parallel-{i}"));
            let dir = work.path().join(format!("img{i}"));
            oci::write_layout(&img, &dir, "v1");
            let host = host.clone();
            std::thread::spawn(move || {
                skopeo(&[
                    "copy",
                    "--all",
                    "--preserve-digests",
                    "--dest-tls-verify=false",
                    &format!("oci:{}:v1", dir.display()),
                    &format!("docker://{host}/par/app{i}:v1"),
                ]);
                img.index.digest
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let digest = h.join().unwrap();
        let r = send(
            "HEAD",
            &format!("{}/v2/par/app{i}/manifests/v1", reg.url()),
            &[("accept", ACCEPT_ALL)],
            Bytes::new(),
        );
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    }
    assert_eq!(gate_count(&rg, "accepted"), 16.0 * 5.0);
    assert_eq!(gate_count(&rg, "rejected"), 0.0);
}
