//! Client connections against the real registry and the regguard binary: idle
//! and stalled connections are closed, the connection cap refuses clearly.
//!
//! Bounds are generous on purpose (these run on a loaded 2-core machine): each
//! test asserts on what happens (EOF, a 503, a gauge back at its baseline), and
//! a bound only decides how long to wait for it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use common::http::{self, rt};
use common::oci;
use common::{
    poll_until, regguard_bound, require_tool, Regguard, RegguardOptions, Registry, TestCert,
};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;

/// How long a connection regguard should close may take to close: many times the 1 s timeout.
const CLOSE_BOUND: Duration = Duration::from_secs(30);

const OPEN: &str = r#"regguard_client_connections{listener="public"}"#;

/// One exact series of the exposition, or `None` when it is absent (so a renamed
/// metric fails the test instead of reading as 0).
fn metric(rg: &Regguard, series: &str) -> Option<f64> {
    rg.metrics()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().unwrap())
        })
}

fn wait_metric(rg: &Regguard, series: &str, want: f64, limit: Duration) {
    poll_until(limit, &format!("{series} == {want}"), || {
        (metric(rg, series) == Some(want)).then_some(())
    });
}

fn with_args(args: &[&str]) -> RegguardOptions {
    RegguardOptions {
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Reads until the peer closes (EOF or reset) and returns what it sent first;
/// fails if the connection is still open after `limit`.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) => panic!(
                "connection still open after {limit:?} ({e}); received {} bytes",
                got.len()
            ),
        }
    }
}

/// Reads one HTTP/1.1 response (head and a Content-Length body) off a raw stream.
fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    s.set_read_timeout(Some(CLOSE_BOUND)).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let len: usize = header(&head, "content-length")
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (head, body)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn plain_connections_that_never_send_a_byte_are_closed() {
    let reg = Registry::start();
    let rg = Regguard::start_with(&reg.url(), with_args(&["--header-read-timeout", "1s"]));
    let mut idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(rg.public).unwrap())
        .collect();
    for (i, s) in idle.iter_mut().enumerate() {
        let got = read_until_closed(s, CLOSE_BOUND);
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
            "connection {i} got {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    wait_metric(&rg, OPEN, 0.0, CLOSE_BOUND);
    assert_eq!(
        metric(
            &rg,
            r#"regguard_client_connection_timeouts_total{reason="idle"}"#
        ),
        Some(40.0)
    );
    // Still serving.
    assert_eq!(http::get(&format!("{}/v2/", rg.url())).status, 200);
}

#[test]
fn keep_alive_connection_idle_after_a_request_is_closed() {
    let reg = Registry::start();
    let rg = Regguard::start_with(&reg.url(), with_args(&["--header-read-timeout", "1s"]));
    let mut s = TcpStream::connect(rg.public).unwrap();
    // Two requests on one connection: the timeout applies to each keep-alive wait.
    for _ in 0..2 {
        write!(s, "GET /v2/ HTTP/1.1\r\nHost: {}\r\n\r\n", rg.host()).unwrap();
        let (head, _) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let got = read_until_closed(&mut s, CLOSE_BOUND);
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn http2_connection_without_open_streams_is_closed() {
    let reg = Registry::start();
    let rg = Regguard::start_with(&reg.url(), with_args(&["--header-read-timeout", "1s"]));
    let addr = rg.public;
    let closed = rt().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let req = ::http::Request::get(format!("http://{addr}/v2/"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
        // The client keeps its end open and answers pings; only regguard can end it.
        tokio::time::timeout(CLOSE_BOUND, conn).await.is_ok()
    });
    assert!(
        closed,
        "HTTP/2 connection with no open stream still open after {CLOSE_BOUND:?}"
    );
}

#[test]
fn tls_connection_idle_after_the_handshake_is_closed() {
    let reg = Registry::start();
    let cert = TestCert::generate();
    let rg = Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            tls: Some((cert.cert_pem.clone(), cert.key_pem.clone())),
            args: vec!["--header-read-timeout".into(), "1s".into()],
            ..Default::default()
        },
    );
    let addr = rg.public;
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let connector = http::tls_connector(&cert.cert_der, alpn);
        let outcome = rt().block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            let mut buf = [0u8; 1024];
            let mut got = Vec::new();
            tokio::time::timeout(CLOSE_BOUND, async {
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return got,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
            })
            .await
        });
        let alpn = String::from_utf8_lossy(alpn);
        match outcome {
            // An HTTP/2 server may say goodbye (SETTINGS, GOAWAY) before closing.
            Ok(got) => assert!(
                alpn == "h2" || got.is_empty(),
                "{alpn}: {:?}",
                String::from_utf8_lossy(&got)
            ),
            Err(_) => panic!(
                "{alpn}: TLS connection idle after the handshake still open after {CLOSE_BOUND:?}"
            ),
        }
    }
}

#[test]
fn connections_over_the_cap_get_503_with_retry_after_then_service_resumes() {
    let reg = Registry::start();
    let rg = Regguard::start_with(&reg.url(), with_args(&["--max-connections", "3"]));
    // Three connections, each proven served (the harness's probe of the port may
    // still hold a slot for a moment, and then one of these is refused: try again).
    let mut held = Vec::new();
    while held.len() < 3 {
        let mut s = TcpStream::connect(rg.public).unwrap();
        write!(s, "GET /v2/ HTTP/1.1\r\nHost: {}\r\n\r\n", rg.host()).unwrap();
        if read_response(&mut s).0.starts_with("HTTP/1.1 200") {
            held.push(s);
        }
    }
    wait_metric(&rg, OPEN, 3.0, CLOSE_BOUND);
    let refused_before = metric(&rg, "regguard_client_connections_refused_total").unwrap();

    let mut s = TcpStream::connect(rg.public).unwrap();
    write!(s, "GET /v2/ HTTP/1.1\r\nHost: {}\r\n\r\n", rg.host()).unwrap();
    let (head, body) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    let retry: u64 = header(&head, "retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(retry >= 1, "{head}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["errors"][0]["code"], "UNAVAILABLE", "{v}");
    assert!(read_until_closed(&mut s, CLOSE_BOUND).is_empty());
    assert_eq!(
        metric(&rg, "regguard_client_connections_refused_total"),
        Some(refused_before + 1.0)
    );
    assert_eq!(
        metric(&rg, OPEN),
        Some(3.0),
        "a refusal is not an open connection"
    );

    // One slot frees up: the next client is served.
    drop(held.pop());
    wait_metric(&rg, OPEN, 2.0, CLOSE_BOUND);
    let mut s = TcpStream::connect(rg.public).unwrap();
    write!(s, "GET /v2/ HTTP/1.1\r\nHost: {}\r\n\r\n", rg.host()).unwrap();
    let (head, _) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[test]
fn tls_connection_over_the_cap_is_closed_and_counted() {
    let reg = Registry::start();
    let cert = TestCert::generate();
    let rg = Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            tls: Some((cert.cert_pem.clone(), cert.key_pem.clone())),
            // The environment's spelling of the setting.
            env: vec![("REGGUARD_MAX_CONNECTIONS".into(), "1".into())],
            ..Default::default()
        },
    );
    let connector = http::tls_connector(&cert.cert_der, b"http/1.1");
    let addr = rg.public;
    let handshake = || {
        rt().block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
            tokio::time::timeout(CLOSE_BOUND, connector.connect(name, tcp)).await
        })
    };
    // One connection, proven served by its handshake (retried while the harness's
    // probe of the port may still hold the only slot).
    let _held = poll_until(CLOSE_BOUND, "a TLS connection under the cap", || {
        handshake().ok()?.ok()
    });
    wait_metric(&rg, OPEN, 1.0, CLOSE_BOUND);
    let refused_before = metric(&rg, "regguard_client_connections_refused_total").unwrap();
    let handshake = handshake();
    match handshake {
        Ok(Err(_)) => {}
        Ok(Ok(_)) => panic!("a TLS connection over the cap completed its handshake"),
        Err(_) => panic!("a TLS connection over the cap was left hanging"),
    }
    assert_eq!(
        metric(&rg, "regguard_client_connections_refused_total"),
        Some(refused_before + 1.0)
    );
}

/// Sockets of process `pid` with an established TCP connection to `port`.
fn established_to(pid: u32, port: u16) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(inode)) = (cols.get(2), cols.get(3), cols.get(9))
            else {
                continue;
            };
            let rport = remote
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if rport == Some(port) && *state == "01" && inodes.iter().any(|i| i == inode) {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn stalled_reader_is_cut_after_the_idle_timeout_and_its_connections_released() {
    let reg = Registry::start();
    let size = 64 * 1024 * 1024u64;
    // Straight to the registry; only the download goes through regguard.
    let digest = oci::push_pattern_blob(&reg.url(), "stall/blob", size);
    let rg = Regguard::start_with(&reg.url(), with_args(&["--idle-timeout", "2s"]));
    let pid = rg.proc.pid();
    wait_metric(&rg, OPEN, 0.0, CLOSE_BOUND);
    // regguard's own upstream probe keeps one pooled connection of its own: count on top.
    poll_until(CLOSE_BOUND, "the first upstream probe", || {
        (rg.metric("regguard_upstream_up") == 1.0 && established_to(pid, reg.addr.port()) == 1)
            .then_some(())
    });
    let base = established_to(pid, reg.addr.port());

    let mut s = TcpStream::connect(rg.public).unwrap();
    write!(
        s,
        "GET /v2/stall/blob/blobs/{digest} HTTP/1.1\r\nHost: {}\r\n\r\n",
        rg.host()
    )
    .unwrap();
    s.set_read_timeout(Some(CLOSE_BOUND)).unwrap();
    let mut first = vec![0u8; 64 * 1024];
    let n = s.read(&mut first).unwrap();
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&first[..n.min(200)])
    );
    wait_metric(&rg, OPEN, 1.0, CLOSE_BOUND);
    assert_eq!(
        established_to(pid, reg.addr.port()),
        base + 1,
        "one upstream connection carries the download"
    );

    // Stop reading. The kernel buffers fill, regguard's writes stop making progress,
    // and after the idle timeout it cuts the client and the upstream connection.
    wait_metric(&rg, OPEN, 0.0, Duration::from_secs(60));
    poll_until(
        Duration::from_secs(30),
        "regguard's upstream connection to close",
        || (established_to(pid, reg.addr.port()) == base).then_some(()),
    );
    // What was buffered arrives, then the end: the download is cut short.
    let rest = read_until_closed(&mut s, CLOSE_BOUND);
    let received = (n + rest.len()) as u64;
    assert!(
        received < size,
        "the whole blob arrived ({received} bytes): the client was not cut"
    );
    assert_eq!(
        metric(
            &rg,
            r#"regguard_client_connection_timeouts_total{reason="write_stall"}"#
        ),
        Some(1.0)
    );
    // Still serving, and a full download still works.
    let (status, len, got) =
        http::get_hashed(&format!("{}/v2/stall/blob/blobs/{digest}", rg.url()), &[]);
    assert_eq!((status, len), (200, size));
    assert_eq!(got, digest);
}

#[test]
fn max_connections_of_zero_is_refused_at_start_naming_the_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_regguard"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--max-connections", "0"])
        .env_remove("REGGUARD_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_connections"), "{err}");
}

#[test]
fn accept_errors_back_off_log_sparingly_and_service_resumes() {
    let prlimit = require_tool("prlimit", "util-linux");
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("regguard.log");
    // Few descriptors, so a burst of clients runs the process out of them (EMFILE).
    let out = std::fs::File::create(&log).unwrap();
    let child = std::process::Command::new(prlimit)
        .args(["--nofile=48:48", "--"])
        .arg(env!("CARGO_BIN_EXE_regguard"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(["--upstream", &reg.url(), "--log-format", "json"])
        .env_remove("REGGUARD_CONFIG")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let _proc = common::Proc::adopt(child, log.clone());
    let (public, admin) = poll_until(CLOSE_BOUND, "regguard's bound addresses", || {
        regguard_bound(&std::fs::read_to_string(&log).unwrap_or_default())
    });

    let held: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect(public).ok())
        .collect();
    let failing = std::time::Instant::now();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    poll_until(CLOSE_BOUND, "an accept error", || {
        log_text().contains("accept failed").then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let lines = log_text().matches("accept failed").count();
    let secs = failing.elapsed().as_secs_f64();
    assert!(
        (lines as f64) <= secs + 3.0,
        "{lines} accept-error lines in {secs:.1}s: not rate-limited"
    );
    drop(held);

    // Descriptors free again: the listener serves and the errors were counted.
    let status = poll_until(CLOSE_BOUND, "regguard to serve again", || {
        let mut s = TcpStream::connect(public).ok()?;
        write!(s, "GET /v2/ HTTP/1.1\r\nHost: {public}\r\n\r\n").ok()?;
        let (head, _) = read_response(&mut s);
        Some(head)
    });
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let metrics = http::get_text(&format!("http://{admin}/metrics"));
    let errors = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"regguard_accept_errors_total{listener="public"} "#))
        .map(|v| v.parse::<f64>().unwrap());
    assert!(matches!(errors, Some(n) if n >= 1.0), "{errors:?}");
}

#[test]
fn an_http2_stream_whose_client_stops_taking_data_is_cut_and_its_upstream_released() {
    let reg = Registry::start();
    let size = 64 * 1024 * 1024u64;
    let digest = oci::push_pattern_blob(&reg.url(), "stall/h2", size);
    let rg = Regguard::start_with(&reg.url(), with_args(&["--idle-timeout", "2s"]));
    let pid = rg.proc.pid();
    poll_until(CLOSE_BOUND, "the first upstream probe", || {
        (rg.metric("regguard_upstream_up") == 1.0 && established_to(pid, reg.addr.port()) == 1)
            .then_some(())
    });
    let base = established_to(pid, reg.addr.port());
    let stalls = r#"regguard_client_connection_timeouts_total{reason="write_stall"}"#;
    let before = metric(&rg, stalls).unwrap();
    let addr = rg.public;
    let path = format!("/v2/stall/h2/blobs/{digest}");
    // One HTTP/2 connection; the stream's body is never read, so the client never opens
    // its flow-control window again, while the connection itself stays healthy.
    let (held, conn) = rt().block_on(async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let req = ::http::Request::get(format!("http://{addr}{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        ((send, resp), conn)
    });
    poll_until(CLOSE_BOUND, "the download's upstream connection", || {
        (established_to(pid, reg.addr.port()) == base + 1).then_some(())
    });
    // regguard cuts the stream after the idle timeout: its upstream connection closes.
    poll_until(
        Duration::from_secs(60),
        "the stalled stream's upstream released",
        || (established_to(pid, reg.addr.port()) == base).then_some(()),
    );
    assert_eq!(metric(&rg, stalls), Some(before + 1.0));
    // The client's connection was not the problem: it is still open, and a new request
    // on it is served.
    assert!(!conn.is_finished(), "the whole connection was closed");
    let (mut send, _stalled) = held;
    let ok = rt().block_on(async move {
        let req = ::http::Request::get(format!("http://{addr}/v2/"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        send.send_request(req).await.map(|r| r.status().as_u16())
    });
    assert_eq!(ok.unwrap(), 200);
    conn.abort();
}
