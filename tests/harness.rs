//! The test harness itself, held to what the other tests rely on: servers report the
//! addresses they really listen on, stopping a server leaves no process behind (and a
//! process left behind fails the test), and a metric that is not exported never reads 0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use common::http;
use common::process::ProcInfo;
use common::{metric_value, poll_until, ClosedPort, Nginx, Regguard, Registry};

/// The text of a caught panic.
fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// nginx's workers, once the master has started them.
fn workers(nginx: &Nginx) -> Vec<ProcInfo> {
    poll_until(Duration::from_secs(10), "nginx workers", || {
        let d = nginx.proc.descendants();
        (!d.is_empty()).then_some(d)
    })
}

#[test]
fn servers_listen_where_the_harness_says_they_do() {
    let reg = Registry::start();
    assert_eq!(
        reg.proc.listening(),
        vec![reg.addr],
        "registry's own sockets"
    );
    assert_ne!(reg.addr.port(), 0);
    assert_eq!(http::get(&format!("{}/v2/", reg.url())).status, 200);

    let rg = Regguard::start(&reg.url());
    let mut bound = rg.proc.listening();
    bound.sort();
    let mut said = vec![rg.public, rg.admin];
    said.sort();
    assert_eq!(bound, said, "regguard's own sockets");
    assert_eq!(http::get(&format!("{}/", rg.url())).text(), "ok");
    assert_eq!(
        http::get(&format!("http://{}/healthz", rg.admin)).status,
        200
    );

    let nginx = Nginx::start("front.conf", reg.addr);
    assert_eq!(
        nginx.proc.listening(),
        vec![nginx.addr],
        "nginx master's sockets"
    );
    assert_eq!(http::get(&format!("{}/v2/", nginx.url())).status, 200);

    // A closed port refuses connections for as long as it is held.
    let closed = ClosedPort::reserve();
    assert!(std::net::TcpStream::connect(closed.addr).is_err());
}

#[test]
fn stopping_nginx_leaves_no_nginx_process_behind() {
    let reg = Registry::start();
    let mut nginx = Nginx::start("front.conf", reg.addr);
    let master = ProcInfo::of(nginx.proc.pid()).unwrap();
    assert!(
        master.cmdline.starts_with("nginx: master process"),
        "{master}"
    );
    // Traffic through it, so the workers hold connections to the registry.
    for _ in 0..4 {
        assert_eq!(http::get(&format!("{}/v2/", nginx.url())).status, 200);
    }
    // A worker just forked still carries the master's title until it sets its own (on a
    // machine busy with the rest of the suite, that can take a while).
    let workers = poll_until(
        Duration::from_secs(30),
        "nginx's workers to name themselves",
        || {
            let w = workers(&nginx);
            (!w.is_empty() && w.iter().all(|w| w.cmdline == "nginx: worker process")).then_some(w)
        },
    );

    nginx.stop();

    assert!(!master.is_alive(), "master {master} survived");
    let alive: Vec<String> = workers
        .iter()
        .filter(|w| w.is_alive())
        .map(ToString::to_string)
        .collect();
    assert!(alive.is_empty(), "workers survived: {alive:?}");
    assert!(nginx.proc.child.is_none(), "the master was reaped");
}

#[test]
fn a_worker_orphaned_by_killing_its_master_fails_the_test_and_is_killed() {
    let reg = Registry::start();
    let mut nginx = Nginx::start("front.conf", reg.addr);
    let workers = workers(&nginx);
    // What the harness used to do (Child::kill): the workers are reparented to init and live on.
    nginx.proc.signal("KILL");
    let caught = catch_unwind(AssertUnwindSafe(|| {
        nginx.proc.wait_exit(Duration::from_secs(10));
    }));
    let msg = panic_text(&*caught.expect_err("an orphaned worker must fail the test"));
    assert!(msg.contains("outlived it"), "{msg}");
    for w in &workers {
        assert!(
            msg.contains(&format!("pid {} ", w.pid)),
            "{w} not named: {msg}"
        );
        assert!(!w.is_alive(), "{w} was not killed");
    }
}

#[test]
fn a_series_that_is_not_exported_is_absent_not_zero() {
    let text =
        "# HELP a_total A.\n# TYPE a_total counter\na_total{k=\"x\"} 0\na_total{k=\"y\"} 3\n";
    assert_eq!(metric_value(text, r#"a_total{k="x"}"#), Some(0.0));
    assert_eq!(metric_value(text, r#"a_total{k="y"}"#), Some(3.0));
    assert_eq!(metric_value(text, r#"a_total{k="z"}"#), None);
    assert_eq!(
        metric_value(text, "a_total"),
        None,
        "a family is not a series"
    );
    let msg =
        panic_text(&*catch_unwind(|| common::metric_in(text, r#"a_total{k="z"}"#)).unwrap_err());
    assert!(
        msg.contains(r#"a_total{k="z"}"#) && msg.contains("a_total{k=\"x\"} 0"),
        "{msg}"
    );

    let reg = Registry::start();
    let rg = Regguard::start(&reg.url());
    let real = r#"regguard_upstream_errors_total{kind="unreachable"}"#;
    assert_eq!(rg.metric(real), 0.0);
    assert_eq!(rg.metric_opt(real), Some(0.0));
    let typo = r#"regguard_upstream_error_total{kind="unreachable"}"#;
    assert_eq!(rg.metric_opt(typo), None);
    let msg = panic_text(&*catch_unwind(AssertUnwindSafe(|| rg.metric(typo))).unwrap_err());
    assert!(msg.contains(typo), "{msg}");
    assert!(
        msg.contains("regguard_upstream_errors_total"),
        "names the families present: {msg}"
    );
}
