//! The first 404 is the truth: the integrity state cannot be fooled by a warm
//! cache, an upstream restart (an offline garbage collection), a delete, a
//! differently spelled repository, a conditional GET or a blob-less scan. Each
//! test breaks an image that regguard has already seen healthy, against the
//! real registry.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::http::{self, send};
use common::oci::{self, Blob, ACCEPT_ALL, OCI_INDEX, OCI_MANIFEST};
use common::{metric_in, poll_until, Regguard, RegguardOptions, Registry, RegistryOptions};
use serde_json::{json, Value};

const FAILURES: &str = r#"registry_manifest_integrity_failures{instance="test"}"#;
const WAIT: Duration = Duration::from_secs(30);

fn regguard(upstream: &str, env: &[(&str, &str)]) -> Regguard {
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

fn get(base: &str, path: &str, headers: &[(&str, &str)]) -> http::Resp {
    send("GET", &format!("{base}{path}"), headers, Bytes::new())
}

fn pull_index(rg: &Regguard, repo: &str, tag: &str, auth: &[(&str, &str)]) {
    let mut h = vec![("accept", ACCEPT_ALL)];
    h.extend_from_slice(auth);
    let r = get(&rg.url(), &format!("/v2/{repo}/manifests/{tag}"), &h);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Index validations with this result so far.
fn checks(rg: &Regguard, result: &str) -> f64 {
    rg.metric(&format!(
        "regguard_index_checks_total{{result=\"{result}\"}}"
    ))
}

/// Pulls the index through regguard until a validation of it has finished ok: the
/// cache is warm, and the index is trusted for `ok_ttl`.
fn warm(rg: &Regguard, repo: &str, tag: &str, auth: &[(&str, &str)]) {
    let before = checks(rg, "ok");
    pull_index(rg, repo, tag, auth);
    poll_until(WAIT, "a healthy validation", || {
        (checks(rg, "ok") > before).then_some(())
    });
    // Served again, it is answered from the recent verdict: no new check.
    pull_index(rg, repo, tag, auth);
    assert_eq!(rg.metric(FAILURES), 0.0);
}

fn integrity(rg: &Regguard) -> Value {
    http::get(&format!("http://{}/integrity", rg.admin)).json()
}

fn listed(rg: &Regguard, child: &str) -> Vec<Value> {
    integrity(rg)["broken"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["child_digest"] == child)
        .cloned()
        .collect()
}

fn wait_broken(rg: &Regguard, what: &str) {
    poll_until(WAIT, what, || (rg.metric(FAILURES) >= 1.0).then_some(()));
}

#[test]
fn a_client_404_behind_a_warm_cache_is_recorded_at_once_and_the_gate_believes_it() {
    let reg = Registry::start();
    let rg = regguard(&reg.url(), &[]);
    let img = oci::multi_arch("warm");
    oci::push_multi_arch(&reg.url(), "ci/runner", "latest", &img, &[]);
    warm(&rg, "ci/runner", "latest", &[]);

    // The incident: the child's revision link goes; the cache still says present.
    let child = img.image("arm64").manifest.digest.clone();
    reg.remove_revision_link("ci/runner", &child);
    let r = get(
        &rg.url(),
        &format!("/v2/ci/runner/manifests/{child}"),
        &[("accept", OCI_MANIFEST)],
    );
    assert_eq!(r.status, 404);
    // Recorded before the 404 left regguard: the very next look shows it, no waiting.
    assert!(rg.metric(FAILURES) >= 1.0, "the gauge did not move");
    let entries = listed(&rg, &child);
    assert_eq!(entries.len(), 1, "{}", integrity(&rg));
    assert_eq!(entries[0]["platform"], "linux/arm64");
    assert_eq!(entries[0]["index_digest"], img.index.digest.as_str());
    assert!(rg.log_text().contains("broken reference"));
    // ... and the index is validated again now, which confirms it.
    poll_until(WAIT, "the index re-validated as broken", || {
        (checks(&rg, "broken") >= 1.0).then_some(())
    });

    // The gate does not answer from the stale positive: a new index naming the lost child
    // is refused by regguard itself, as missing (not with a size from the old cache).
    let mut v: Value = serde_json::from_slice(&img.index.data).unwrap();
    v["annotations"] = json!({"rebuilt": "yes"});
    let again = Blob::json(OCI_INDEX, &v);
    let r = oci::put_manifest(&rg.url(), "ci/runner", "again", &again, &[]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("is not in repository"), "{}", r.text());
    assert!(!reg.has_manifest("ci/runner", "again"));
}

/// A client fetches the children right after the index, so a child's 404 can reach regguard
/// before the index's first validation has walked it (nothing known references the child
/// yet). That 404 must still void the positive the push left in the cache, or the walk
/// that follows takes the cache's word and calls the broken index healthy.
#[test]
fn a_client_404_before_the_index_is_first_walked_still_voids_the_cached_positive() {
    let reg = Registry::start();
    let rg = regguard(&reg.url(), &[]);
    let img = oci::multi_arch("early");
    // Pushed through regguard: the gate checked every child, so each is cached as present.
    oci::push_multi_arch(&rg.url(), "ci/early", "v1", &img, &[]);
    assert_eq!(
        checks(&rg, "ok") + checks(&rg, "broken"),
        0.0,
        "no index served yet"
    );

    let child = img.image("arm64").manifest.digest.clone();
    reg.remove_revision_link("ci/early", &child);
    let r = get(
        &rg.url(),
        &format!("/v2/ci/early/manifests/{child}"),
        &[("accept", OCI_MANIFEST)],
    );
    assert_eq!(r.status, 404);
    // The index is served for the first time now: its walk must ask the registry.
    pull_index(&rg, "ci/early", "v1", &[]);
    poll_until(WAIT, "the index's first validation", || {
        (checks(&rg, "ok") + checks(&rg, "broken") >= 1.0).then_some(())
    });
    assert_eq!(
        checks(&rg, "ok"),
        0.0,
        "the walk took the stale positive: {}",
        integrity(&rg)
    );
    wait_broken(&rg, "the lost child recorded");
    assert_eq!(listed(&rg, &child).len(), 1, "{}", integrity(&rg));
}

#[test]
fn a_404_to_a_client_that_did_not_accept_oci_is_not_taken_for_a_loss() {
    let reg = Registry::start();
    let rg = regguard(&reg.url(), &[]);
    let img = oci::multi_arch("accept");
    oci::push_multi_arch(&reg.url(), "team/app", "v1", &img, &[]);
    warm(&rg, "team/app", "v1", &[]);
    // Registry 2.8 answers 404 for an existing OCI manifest without OCI types in Accept.
    let child = img.image("amd64").manifest.digest.clone();
    let r = get(
        &rg.url(),
        &format!("/v2/team/app/manifests/{child}"),
        &[(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )],
    );
    assert_eq!(r.status, 404);
    assert_eq!(rg.metric(FAILURES), 0.0, "{}", integrity(&rg));
}

#[test]
fn an_offline_garbage_collection_is_seen_on_the_first_index_get_after_the_restart() {
    let mut reg = Registry::start();
    let rg = regguard(&reg.url(), &[]);
    let img = oci::multi_arch("gc");
    oci::push_multi_arch(&reg.url(), "ci/runner", "latest", &img, &[]);
    warm(&rg, "ci/runner", "latest", &[]);

    reg.stop();
    poll_until(WAIT, "regguard to see the registry gone", || {
        (rg.metric("regguard_upstream_up") == 0.0).then_some(())
    });
    reg.garbage_collect();
    reg.start_again(None);
    poll_until(WAIT, "regguard to see the registry back", || {
        (rg.metric("regguard_upstream_up") == 1.0).then_some(())
    });
    assert!(rg.metric("regguard_upstream_returns_total") >= 1.0);
    // The collector removed every child's revision link (2.8 marks only the index).
    let child = img.image("amd64").manifest.digest.clone();
    assert!(!reg.has_manifest("ci/runner", &child), "GC left the child");

    // The first GET of the index (nobody asks for a child) raises the gauge.
    pull_index(&rg, "ci/runner", "latest", &[]);
    wait_broken(&rg, "the broken children after the restart");
    assert!(!listed(&rg, &child).is_empty(), "{}", integrity(&rg));
    assert_eq!(
        rg.metric(r#"regguard_client_not_found_total{kind="manifest",referenced="true"}"#),
        0.0,
        "no client asked for a child"
    );
}

#[test]
fn a_delete_through_regguard_revalidates_the_indexes_it_knows_there() {
    let reg = Registry::start();
    let rg = regguard(&reg.url(), &[]);
    let img = oci::multi_arch("delete");
    oci::push_multi_arch(&reg.url(), "team/app", "v1", &img, &[]);
    warm(&rg, "team/app", "v1", &[]);
    let child = img.image("amd64").manifest.digest.clone();
    let r = send(
        "DELETE",
        &format!("{}/v2/team/app/manifests/{child}", rg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    // No client pulls anything: the delete alone re-validates the index.
    wait_broken(&rg, "the index re-validated after the delete");
    assert_eq!(listed(&rg, &child).len(), 1, "{}", integrity(&rg));
}

#[test]
fn a_delete_made_directly_on_the_registry_is_seen_through_its_notifications() {
    let mut reg = Registry::start();
    let rg = regguard(&reg.url(), &[]);
    // The registry's own notifications, to regguard's admin listener.
    reg.stop();
    reg.start_again(Some(&format!("http://{}/notifications", rg.admin)));
    let img = oci::multi_arch("notified");
    oci::push_multi_arch(&reg.url(), "team/app", "v1", &img, &[]);
    warm(&rg, "team/app", "v1", &[]);
    let layer = img.image("arm64").layers[0].digest.clone();
    let r = send(
        "DELETE",
        &format!("{}/v2/team/app/blobs/{layer}", reg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    wait_broken(&rg, "the index re-validated after the notified delete");
    assert_eq!(listed(&rg, &layer).len(), 1, "{}", integrity(&rg));
}

#[test]
fn the_gate_does_not_accept_on_a_stale_positive() {
    let reg = Registry::start();
    let rg = regguard(&reg.url(), &[]);
    let img = oci::multi_arch("stale");
    // Pushed through regguard: every reference is cached as present.
    oci::push_multi_arch(&rg.url(), "team/app", "v1", &img, &[]);
    let mut v: Value = serde_json::from_slice(&img.index.data).unwrap();

    // A layer deleted through regguard (202): an index naming its image is refused.
    let layer = img.image("amd64").layers[0].digest.clone();
    let r = send(
        "DELETE",
        &format!("{}/v2/team/app/blobs/{layer}", rg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 202);
    v["annotations"] = json!({"try": "1"});
    let index = Blob::json(OCI_INDEX, &v);
    let r = oci::put_manifest(&rg.url(), "team/app", "v2", &index, &[]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains(&layer), "{}", r.text());
    assert!(!reg.has_manifest("team/app", "v2"));

    // A layer deleted directly on the registry, where regguard cannot see it: once the
    // cached answer is older than the gate's bound (5 s), it is asked again.
    let layer = img.image("arm64").layers[0].digest.clone();
    let r = send(
        "DELETE",
        &format!("{}/v2/team/app/blobs/{layer}", reg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 202);
    std::thread::sleep(Duration::from_secs(6));
    v["annotations"] = json!({"try": "2"});
    let index = Blob::json(OCI_INDEX, &v);
    let r = oci::put_manifest(&rg.url(), "team/app", "v3", &index, &[]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains(&layer), "{}", r.text());
    assert!(!reg.has_manifest("team/app", "v3"));
}

#[test]
fn one_repository_is_one_entry_however_its_name_is_spelled() {
    let reg = Registry::start();
    let rg = regguard(&reg.url(), &[("REGGUARD_VALIDATE_BLOBS", "false")]);
    let img = oci::multi_arch("spelled");
    oci::push_multi_arch(&reg.url(), "team/app", "v1", &img, &[]);
    let child = img.image("amd64").manifest.digest.clone();
    reg.remove_revision_link("team/app", &child);
    for path in [
        "/v2/team/app/manifests/v1",
        "/v2/team%2Fapp/manifests/v1",
        "/v2/team%2fapp/manifests/v1",
        "/v2/t%65am/app/manifests/v1",
    ] {
        let r = get(&rg.url(), path, &[("accept", ACCEPT_ALL)]);
        assert_eq!(r.status, 200, "{path}");
    }
    wait_broken(&rg, "the broken child");
    poll_until(WAIT, "every spelling validated", || {
        (checks(&rg, "broken") >= 1.0).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let entries = listed(&rg, &child);
    assert_eq!(entries.len(), 1, "{}", integrity(&rg));
    assert_eq!(entries[0]["repository"], "team/app");
    assert_eq!(rg.metric(FAILURES), 1.0);
}

#[test]
fn a_304_to_a_conditional_get_still_gets_the_index_validated() {
    let reg = Registry::start();
    let rg = regguard(&reg.url(), &[]);
    let img = oci::multi_arch("etag");
    oci::push_multi_arch(&reg.url(), "team/app", "v1", &img, &[]);
    let child = img.image("amd64").manifest.digest.clone();
    reg.remove_revision_link("team/app", &child);
    let etag = format!("\"{}\"", img.index.digest);
    let r = get(
        &rg.url(),
        "/v2/team/app/manifests/v1",
        &[("accept", ACCEPT_ALL), ("if-none-match", etag.as_str())],
    );
    assert_eq!(r.status, 304, "{}", r.text());
    wait_broken(&rg, "the index validated from its 304");
    assert_eq!(listed(&rg, &child).len(), 1, "{}", integrity(&rg));
}

#[test]
fn a_blobless_scan_does_not_stand_in_for_the_blob_checks_of_a_pull() {
    let reg = Registry::start();
    let img = oci::multi_arch("scanned");
    oci::push_multi_arch(&reg.url(), "team/app", "v1", &img, &[]);
    let rg = regguard(
        &reg.url(),
        &[
            ("REGGUARD_SCAN_ENABLED", "true"),
            ("REGGUARD_SCAN_BLOBS", "false"),
            ("REGGUARD_SCAN_INTERVAL", "1h"),
        ],
    );
    poll_until(WAIT, "the first scan", || {
        let m = rg.metrics();
        (metric_in(
            &m,
            r#"registry_manifest_integrity_last_run_timestamp{instance="test"}"#,
        ) > 0.0)
            .then_some(())
    });
    assert!(checks(&rg, "ok") >= 1.0, "the scan found the index ok");
    let layer = img.image("amd64").layers[1].digest.clone();
    reg.remove_layer_link("team/app", &layer);
    // A pull validates blobs (validate.blobs = true): the scan's blob-less verdict does
    // not excuse it.
    pull_index(&rg, "team/app", "v1", &[]);
    wait_broken(&rg, "the lost layer found by the pull's validation");
    assert_eq!(listed(&rg, &layer).len(), 1, "{}", integrity(&rg));
}

#[test]
fn broken_references_heal_with_service_credentials_when_the_finders_expire() {
    let mut reg = Registry::start_with(RegistryOptions {
        auth: Some(("alice".into(), "first".into())),
    });
    let rg = regguard(
        &reg.url(),
        &[
            ("REGGUARD_SCAN_USER", "alice"),
            ("REGGUARD_SCAN_PASSWORD", "second"),
            ("REGGUARD_VALIDATE_MISSING_TTL", "1s"),
        ],
    );
    let first = common::basic_auth("alice", "first");
    let auth = [("authorization", first.as_str())];
    let img = oci::multi_arch("expiring");
    oci::push_multi_arch(&reg.url(), "team/app", "v1", &img, &auth);
    let child = img.image("amd64").manifest.digest.clone();
    reg.remove_revision_link("team/app", &child);
    pull_index(&rg, "team/app", "v1", &auth);
    wait_broken(&rg, "the broken child, found with the client's credentials");

    // The client's password changes (a token expires): only the service's works now.
    reg.stop();
    reg.set_password("alice", "second");
    reg.start_again(None);
    let second = common::basic_auth("alice", "second");
    let auth = [("authorization", second.as_str())];
    let amd64 = img.image("amd64");
    let r = oci::put_manifest(&reg.url(), "team/app", &child, &amd64.manifest, &auth);
    assert_eq!(r.status, 201, "{}", r.text());
    poll_until(WAIT, "the entry healed by a re-check", || {
        (rg.metric(FAILURES) == 0.0).then_some(())
    });
}
