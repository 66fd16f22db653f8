//! Detection latency for each trigger of the integrity state, against the real
//! registry: how long from the event to the broken reference being listed on
//! `/integrity` (polled as fast as the admin listener answers), over 30
//! incidents each.
//!
//! `cargo bench --bench detection` (about two minutes). Triggers:
//! 1. first serve: an index with a lost child is pulled (t0: the index response);
//! 2. a client's 404 behind a warm cache (t0: the 404 response);
//! 3. an offline garbage collection (registry stopped, collected, started):
//!    t0 is each index's first GET after the restart;
//! 4. a DELETE of a child through regguard (t0: the 202).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::http::{self, send};
use common::oci::{self, ACCEPT_ALL, OCI_MANIFEST};
use common::{poll_until, Regguard, RegguardOptions, Registry};

const INCIDENTS: usize = 30;

fn get(url: &str, accept: &str) -> u16 {
    send("GET", url, &[("accept", accept)], Bytes::new()).status
}

/// Milliseconds from `t0` until `/integrity` lists `child`.
fn until_listed(rg: &Regguard, child: &str, t0: Instant) -> f64 {
    let url = format!("http://{}/integrity", rg.admin);
    loop {
        if http::get(&url).text().contains(child) {
            return t0.elapsed().as_secs_f64() * 1000.0;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{child} not detected"
        );
    }
}

/// Pulls the index and waits until its validation has finished ok.
fn warm(rg: &Regguard, repo: &str) {
    let ok = |rg: &Regguard| rg.metric(r#"regguard_index_checks_total{result="ok"}"#);
    let before = ok(rg);
    assert_eq!(
        get(&format!("{}/v2/{repo}/manifests/v1", rg.url()), ACCEPT_ALL),
        200
    );
    poll_until(Duration::from_secs(30), "a healthy validation", || {
        (ok(rg) > before).then_some(())
    });
}

fn percentiles(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} |",
        ms.len(),
        ms[ms.len() / 2],
        ms[(ms.len() * 99 / 100).min(ms.len() - 1)],
        ms[ms.len() - 1]
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut reg = Registry::start();
    let quiet = RegguardOptions {
        args: vec!["--access-log".into(), "false".into()],
        ..Default::default()
    };
    let rg = Regguard::start_with(&reg.url(), quiet);
    let push = |prefix: &str, i: usize| {
        let repo = format!("{prefix}/r{i}");
        let img = oci::multi_arch(&format!("{prefix}{i}"));
        oci::push_multi_arch(&reg.url(), &repo, "v1", &img, &[]);
        (repo, img.image("amd64").manifest.digest.clone())
    };

    // 1. First serve.
    let mut first = Vec::new();
    for i in 0..INCIDENTS {
        let (repo, child) = push("first", i);
        reg.remove_revision_link(&repo, &child);
        assert_eq!(
            get(&format!("{}/v2/{repo}/manifests/v1", rg.url()), ACCEPT_ALL),
            200
        );
        first.push(until_listed(&rg, &child, Instant::now()));
    }

    // 2. A client's 404 behind a warm cache.
    let mut client = Vec::new();
    for i in 0..INCIDENTS {
        let (repo, child) = push("client", i);
        warm(&rg, &repo);
        reg.remove_revision_link(&repo, &child);
        let url = format!("{}/v2/{repo}/manifests/{child}", rg.url());
        assert_eq!(get(&url, OCI_MANIFEST), 404);
        client.push(until_listed(&rg, &child, Instant::now()));
    }

    // 4. A DELETE through regguard.
    let mut delete = Vec::new();
    for i in 0..INCIDENTS {
        let (repo, child) = push("delete", i);
        warm(&rg, &repo);
        let url = format!("{}/v2/{repo}/manifests/{child}", rg.url());
        let r = send("DELETE", &url, &[], Bytes::new());
        assert_eq!(r.status, 202);
        delete.push(until_listed(&rg, &child, Instant::now()));
    }

    // 3. An offline garbage collection: every image warm, then one stop/collect/start.
    let gc: Vec<(String, String)> = (0..INCIDENTS).map(|i| push("gc", i)).collect();
    for (repo, _) in &gc {
        warm(&rg, repo);
    }
    reg.stop();
    poll_until(Duration::from_secs(30), "the registry seen away", || {
        (rg.metric("regguard_upstream_up") == 0.0).then_some(())
    });
    reg.garbage_collect();
    reg.start_again(None);
    poll_until(Duration::from_secs(30), "the registry seen back", || {
        (rg.metric("regguard_upstream_up") == 1.0).then_some(())
    });
    let mut restart = Vec::new();
    for (repo, child) in &gc {
        assert_eq!(
            get(&format!("{}/v2/{repo}/manifests/v1", rg.url()), ACCEPT_ALL),
            200
        );
        restart.push(until_listed(&rg, child, Instant::now()));
    }

    println!("\n### Detection latency by trigger (event → listed on /integrity)\n");
    println!("| trigger | incidents | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|");
    percentiles("first serve of a broken index", first);
    percentiles("client 404 behind a warm cache", client);
    percentiles(
        "first index GET after an offline GC (registry restarted)",
        restart,
    );
    percentiles("DELETE of a child through regguard", delete);
}
