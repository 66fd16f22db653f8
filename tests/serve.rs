//! `regguard serve` against the real registry and real clients: transparency,
//! streaming, auth, TLS, failures and shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use common::http::{self, get_hashed, pattern_digest, pattern_range, send, send_body, PatternBody};
use common::oci::{self, ACCEPT_ALL};
use common::{
    poll_until, skopeo_round_trip, Regguard, RegguardOptions, Registry, RegistryOptions, TestCert,
};

const GIB: u64 = 1024 * 1024 * 1024;

#[test]
fn skopeo_copy_all_through_regguard_round_trips_every_digest() {
    let reg = Registry::start();
    let rg = Regguard::start(&reg.url());
    let img = oci::multi_arch("round-trip");
    let dest = format!("docker://{}/test/multi:v1", rg.host());
    let pulled_dir = skopeo_round_trip(
        &img,
        &dest,
        &["--dest-tls-verify=false"],
        &["--src-tls-verify=false"],
    );
    let dst = pulled_dir.path().join("dst");
    let pulled: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.join("index.json")).unwrap()).unwrap();
    assert_eq!(pulled["manifests"][0]["digest"], img.index.digest.as_str());
    // The registry itself holds the index under the tag, unchanged.
    let direct = send(
        "GET",
        &format!("{}/v2/test/multi/manifests/v1", reg.url()),
        &[("accept", ACCEPT_ALL)],
        Bytes::new(),
    );
    assert_eq!(
        direct.header("docker-content-digest"),
        Some(img.index.digest.as_str())
    );
    assert_eq!(direct.body, img.index.data);
    // Every child manifest went through regguard's PUT path and was counted.
    let puts =
        rg.metric(r#"regguard_requests_total{method="PUT",route="manifest",status_class="2xx"}"#);
    assert!(
        puts >= 5.0,
        "4 children + index pushed through regguard, counted {puts}"
    );
}

#[test]
fn one_gib_blob_streams_chunked_both_ways_in_bounded_memory_with_ranges() {
    let reg = Registry::start();
    let rg = Regguard::start(&reg.url());
    let base = rg.url();
    let digest = pattern_digest(GIB);

    let r = send(
        "POST",
        &format!("{base}/v2/big/blob/blobs/uploads/"),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let loc = r.header("location").unwrap().to_string();
    // Chunked PATCH: no Content-Length anywhere, 1 GiB generated on the fly.
    let r = send_body(
        "PATCH",
        &http::location_url(&base, &loc, ""),
        &[("content-type", "application/octet-stream")],
        PatternBody::chunked(GIB),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.header("range"), Some(format!("0-{}", GIB - 1).as_str()));
    let loc = r.header("location").unwrap().to_string();
    let r = send(
        "PUT",
        &http::location_url(&base, &loc, &format!("digest={digest}")),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));

    let blob_url = format!("{base}/v2/big/blob/blobs/{digest}");
    let (status, len, got) = get_hashed(&blob_url, &[]);
    assert_eq!((status, len), (200, GIB));
    assert_eq!(got, digest, "pulled bytes identical to pushed");

    // A range across a 1 MiB chunk boundary.
    let (start, end) = (1024 * 1024 - 10, 1024 * 1024 + 9);
    let r = send(
        "GET",
        &blob_url,
        &[("range", &format!("bytes={start}-{end}"))],
        Bytes::new(),
    );
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes {start}-{end}/{GIB}").as_str())
    );
    assert_eq!(
        r.body.as_ref(),
        pattern_range(start, end - start + 1).as_slice()
    );

    let peak_mib = rg.proc.peak_rss_kib() / 1024;
    assert!(
        peak_mib < 64,
        "regguard peak RSS {peak_mib} MiB after relaying 2 GiB"
    );
    let metrics = rg.metrics();
    assert!(
        common::metric_in(
            &metrics,
            r#"regguard_request_body_bytes_total{route="upload"}"#
        ) >= GIB as f64
    );
    assert!(
        common::metric_in(
            &metrics,
            r#"regguard_response_body_bytes_total{route="blob"}"#
        ) >= GIB as f64
    );
}

#[test]
fn htpasswd_challenge_passes_unchanged_and_credentials_push_and_pull() {
    let reg = Registry::start_with(RegistryOptions {
        auth: Some(("ci".into(), "s3cret".into())),
    });
    let rg = Regguard::start(&reg.url());

    let direct = http::get(&format!("{}/v2/", reg.url()));
    let proxied = http::get(&format!("{}/v2/", rg.url()));
    assert_eq!(proxied.status, 401);
    assert_eq!(
        proxied.header("www-authenticate"),
        direct.header("www-authenticate")
    );
    assert!(proxied
        .header("www-authenticate")
        .unwrap()
        .starts_with("Basic realm="));
    assert_eq!(proxied.body, direct.body);

    let img = oci::multi_arch("auth");
    let dest = format!("docker://{}/secure/app:v1", rg.host());
    skopeo_round_trip(
        &img,
        &dest,
        &["--dest-tls-verify=false", "--dest-creds", "ci:s3cret"],
        &["--src-tls-verify=false", "--src-creds", "ci:s3cret"],
    );
}

#[test]
fn tls_location_names_regguard_over_https_and_ignores_client_forwarded_host() {
    let reg = Registry::start();
    let cert = TestCert::generate();
    let rg = Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            tls: Some((cert.cert_pem.clone(), cert.key_pem.clone())),
            ..Default::default()
        },
    );
    let expected_prefix = format!("https://{}/v2/tls/app/blobs/uploads/", rg.host());
    for h2 in [false, true] {
        let mut req = http_req(
            "POST",
            &format!("https://{}/v2/tls/app/blobs/uploads/", rg.host()),
        );
        req.headers_mut()
            .insert("x-forwarded-host", "evil.example:443".parse().unwrap());
        req.headers_mut()
            .insert("forwarded", "host=evil.example;proto=http".parse().unwrap());
        if !h2 {
            req.headers_mut().insert("host", rg.host().parse().unwrap());
        }
        let (alpn, r) = http::https_send(rg.public, &cert.cert_der, h2, req);
        assert_eq!(alpn, if h2 { "h2" } else { "http/1.1" });
        assert_eq!(r.status, 202, "{}", r.text());
        let loc = r.header("location").unwrap();
        assert!(
            loc.starts_with(&expected_prefix),
            "h2={h2}: Location {loc} should start with {expected_prefix}"
        );
    }

    // A real client over TLS: skopeo pushes and pulls, trusting the test CA.
    let certs = tempfile::tempdir().unwrap();
    std::fs::copy(&cert.cert_pem, certs.path().join("ca.crt")).unwrap();
    let img = oci::multi_arch("tls");
    let dest = format!("docker://{}/tls/app:v1", rg.host());
    let cert_dir = certs.path().display().to_string();
    skopeo_round_trip(
        &img,
        &dest,
        &["--dest-cert-dir", &cert_dir],
        &["--src-cert-dir", &cert_dir],
    );
}

fn http_req(method: &str, url: &str) -> ::http::Request<http_body_util::Full<Bytes>> {
    ::http::Request::builder()
        .method(method)
        .uri(url)
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap()
}

#[test]
fn upstream_down_answers_502_with_oci_error_envelope() {
    let closed = common::ClosedPort::reserve();
    let dead = closed.url();
    let rg = Regguard::start(&dead);
    let r = http::get(&format!("{}/v2/", rg.url()));
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["errors"][0]["code"], "UNAVAILABLE");
    assert_eq!(
        rg.metric(r#"regguard_upstream_errors_total{kind="unreachable"}"#),
        1.0
    );
    assert!(rg.log_text().contains("forwarding failed"));
    // Liveness of regguard itself does not depend on the upstream; readiness does.
    assert_eq!(http::get(&format!("{}/", rg.url())).text(), "ok");
    assert_eq!(
        http::get(&format!("http://{}/healthz", rg.admin)).status,
        200
    );
    assert_eq!(
        http::get(&format!("http://{}/readyz", rg.admin)).status,
        503
    );
}

#[test]
fn upstream_that_never_answers_gets_504_after_the_idle_timeout() {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let holder = std::thread::spawn(move || {
        // Accept and hold connections without ever answering.
        let mut held = Vec::new();
        for s in silent.incoming().take(2) {
            held.push(s.unwrap());
        }
        std::thread::sleep(Duration::from_secs(5));
    });
    let rg = Regguard::start_with(
        &format!("http://{addr}"),
        RegguardOptions {
            args: vec!["--idle-timeout".into(), "1s".into()],
            ..Default::default()
        },
    );
    let r = http::get(&format!("{}/v2/", rg.url()));
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["errors"][0]["code"], "UNAVAILABLE");
    assert_eq!(
        rg.metric(r#"regguard_upstream_errors_total{kind="timeout"}"#),
        1.0
    );
    drop(holder);
}

#[test]
fn one_request_the_registry_is_slow_to_answer_does_not_mark_it_gone() {
    // A registry that answers everything at once, except one manifest, which takes 3 s.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if String::from_utf8_lossy(&buf[..n]).contains("/manifests/slow") {
                        std::thread::sleep(Duration::from_secs(3));
                    }
                    let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
                    if conn.write_all(ok.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let rg = Regguard::start_with(
        &format!("http://{addr}"),
        RegguardOptions {
            args: vec!["--idle-timeout".into(), "1s".into()],
            ..Default::default()
        },
    );
    let slow = http::get(&format!("{}/v2/app/manifests/slow", rg.url()));
    assert_eq!(slow.status, 504, "the slow answer is a gateway timeout");
    assert_eq!(http::get(&format!("{}/v2/", rg.url())).status, 200);
    assert_eq!(rg.metric("regguard_upstream_up"), 1.0);
    assert_eq!(
        rg.metric("regguard_upstream_returns_total"),
        0.0,
        "no 'came back' (which drops every cached answer)"
    );
    assert!(
        !rg.log_text().contains("the registry is unreachable"),
        "{}",
        rg.log_text()
    );
}

#[test]
fn client_vanishing_mid_upload_leaves_no_completed_blob() {
    let reg = Registry::start();
    let rg = Regguard::start(&reg.url());
    let r = send(
        "POST",
        &format!("{}/v2/abort/me/blobs/uploads/", rg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 202);
    let loc = http::location_url(&rg.url(), r.header("location").unwrap(), "");
    // The client sends 4 MiB and claims (via ?digest=) that this is the whole blob, then
    // disappears before the terminating chunk. A proxy that ended the chunked body cleanly
    // would make the registry store exactly these bytes as a complete blob.
    let sent = 4 * 1024 * 1024u64;
    let digest = pattern_digest(sent);
    let path = loc.trim_start_matches(&rg.url()).to_string();
    let mut s = TcpStream::connect(rg.public).unwrap();
    write!(
        s,
        "PUT {path}&digest={digest} HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n",
        rg.host()
    )
    .unwrap();
    let data = pattern_range(0, sent);
    write!(s, "{:x}\r\n", data.len()).unwrap();
    s.write_all(&data).unwrap();
    s.write_all(b"\r\n").unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    drop(s);

    poll_until(
        Duration::from_secs(20),
        "regguard to count the aborted upload",
        || {
            (rg.metric(r#"regguard_upstream_errors_total{kind="client_aborted"}"#) >= 1.0)
                .then_some(())
        },
    );
    let head = send(
        "HEAD",
        &format!("{}/v2/abort/me/blobs/{digest}", reg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!(
        head.status, 404,
        "a truncated upload must not become a blob"
    );
    assert!(!reg.blob_data_exists(&digest));
}

/// Reads an HTTP/1.1 response head from a raw stream; returns (status line, content-length).
fn read_head(s: &mut TcpStream) -> (String, u64) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let text = String::from_utf8(head).unwrap();
    let len = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap();
    (text.lines().next().unwrap().to_string(), len)
}

#[test]
fn sigterm_lets_an_in_flight_download_finish_then_exits_zero() {
    let reg = Registry::start();
    let size = 256 * 1024 * 1024u64;
    // Upload straight to the registry; the download goes through regguard.
    let digest = oci::push_pattern_blob(&reg.url(), "drain/blob", size);

    let mut rg = Regguard::start(&reg.url());
    let mut s = TcpStream::connect(rg.public).unwrap();
    write!(
        s,
        "GET /v2/drain/blob/blobs/{digest} HTTP/1.1\r\nHost: {}\r\n\r\n",
        rg.host()
    )
    .unwrap();
    let (status, len) = read_head(&mut s);
    assert!(status.contains(" 200 "), "{status}");
    assert_eq!(len, size);
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let mut got = 0u64;
    // Take the first MiB, then ask regguard to stop.
    while got < 1024 * 1024 {
        let n = s.read(&mut buf).unwrap();
        sha2::Digest::update(&mut hasher, &buf[..n]);
        got += n as u64;
    }
    rg.proc.signal("TERM");
    poll_until(
        Duration::from_secs(10),
        "regguard to begin draining",
        || rg.log_text().contains("shutting down").then_some(()),
    );
    assert!(
        TcpStream::connect(rg.public).is_err(),
        "no new connections while draining"
    );
    while got < size {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "transfer cut at {got} of {size} bytes");
        sha2::Digest::update(&mut hasher, &buf[..n]);
        got += n as u64;
    }
    assert_eq!(
        format!("sha256:{}", http::hex(&sha2::Digest::finalize(hasher))),
        digest
    );
    drop(s);
    assert_eq!(rg.proc.wait_exit(Duration::from_secs(30)), Some(0));
    assert!(rg.log_text().contains("all connections drained"));
}

#[test]
fn a_request_head_trickling_in_is_cut_after_the_header_read_timeout() {
    let reg = Registry::start();
    let rg = Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            args: vec!["--header-read-timeout".into(), "1s".into()],
            ..Default::default()
        },
    );
    let s = TcpStream::connect(rg.public).unwrap();
    let mut writer = s.try_clone().unwrap();
    // One byte every 200 ms: every read completes, yet the head never does. 100 bytes
    // would take 20 s.
    let trickle = std::thread::spawn(move || {
        let head = format!("GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Pad: {}", "a".repeat(100));
        for (sent, b) in head.bytes().enumerate() {
            if writer.write_all(&[b]).is_err() {
                return sent;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        head.len()
    });
    let mut reader = s;
    reader
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut total = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&total);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    let sent = trickle.join().unwrap();
    let whole = "GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Pad: ".len() + 100;
    assert!(
        sent < whole,
        "the connection stayed open for the whole trickled head ({sent} bytes)"
    );
}

#[test]
fn slow_loris_client_is_cut_after_the_header_read_timeout() {
    let reg = Registry::start();
    let rg = Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            args: vec!["--header-read-timeout".into(), "1s".into()],
            ..Default::default()
        },
    );
    let mut s = TcpStream::connect(rg.public).unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 512];
    // The server closes the connection (EOF, possibly after a 408) instead of waiting forever.
    let mut total = Vec::new();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total.extend_from_slice(&buf[..n]),
            Err(e) => panic!("connection still open after 20s: {e}"),
        }
    }
    let text = String::from_utf8_lossy(&total);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}
