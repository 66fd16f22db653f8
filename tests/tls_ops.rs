//! What operators expect from an nginx front, shown against the real registry and the
//! regguard binary: certificates reloaded on SIGHUP and on file change without
//! dropping a connection, `https://` upstreams verified against `--upstream-ca`, and
//! the client address a trusted proxy names in the access log and the gate's WARN.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::http::{self, rt};
use common::oci;
use common::{poll_until, skopeo_round_trip, Proc, Regguard, RegguardOptions, Registry, TestCert};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// A self-signed pair for `127.0.0.1`/`localhost` expiring on 1 January of `year`.
struct Pair {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
    not_after: i64,
}

fn pair(year: i32) -> Pair {
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    params.not_after = rcgen::date_time_ymd(year, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    // Days from 1970-01-01 to 1 January of `year` (Gregorian).
    let days: i64 = (1970..year)
        .map(|y| {
            if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 {
                366
            } else {
                365
            }
        })
        .sum();
    Pair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
        not_after: days * 86_400,
    }
}

/// The files regguard serves from, replaced as cert-manager does: written beside, renamed over.
struct Live {
    dir: tempfile::TempDir,
}

impl Live {
    fn new(p: &Pair) -> Self {
        let live = Live {
            dir: tempfile::tempdir().unwrap(),
        };
        live.install(&p.cert_pem, &p.key_pem);
        live
    }
    fn cert(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }
    fn key(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }
    fn install(&self, cert: &str, key: &str) {
        for (path, text) in [(self.cert(), cert), (self.key(), key)] {
            let tmp = path.with_extension("new");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        }
    }
}

fn client_config(roots: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store
            .add(rustls_pki_types::CertificateDer::from(r.to_vec()))
            .unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// The certificate a new handshake with regguard gets (trusting either pair).
fn served_cert(addr: std::net::SocketAddr, a: &Pair, b: &Pair) -> Vec<u8> {
    rt().block_on(async {
        let connector = tokio_rustls::TlsConnector::from(client_config(&[&a.der, &b.der]));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    })
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// An HTTP/1.1 keep-alive connection over TLS trusting `root` only.
fn open_keepalive(addr: std::net::SocketAddr, root: &[u8]) -> Sender {
    rt().block_on(async {
        let connector = tokio_rustls::TlsConnector::from(client_config(&[root]));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    })
}

fn get_on(send: &mut Sender) -> (u16, Bytes) {
    rt().block_on(async {
        send.ready()
            .await
            .expect("the kept-alive connection is still open");
        let req = ::http::Request::get("/")
            .header("host", "127.0.0.1")
            .body(Empty::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    })
}

fn reloads(rg: &Regguard, result: &str) -> f64 {
    rg.metric(&format!(
        "regguard_tls_reloads_total{{result=\"{result}\"}}"
    ))
}

fn expiry(rg: &Regguard) -> f64 {
    rg.metric("regguard_tls_certificate_expiry_seconds")
}

/// JSON log lines whose `message` is `msg`.
fn log_lines(rg: &Regguard, msg: &str) -> Vec<serde_json::Value> {
    rg.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == msg)
        .collect()
}

#[test]
fn sighup_swaps_the_certificate_for_new_handshakes_and_keeps_open_connections() {
    let reg = Registry::start();
    let (a, b) = (pair(2040), pair(2041));
    let live = Live::new(&a);
    let rg = Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            tls: Some((live.cert(), live.key())),
            // Only SIGHUP reloads in this test: the file poll must not get there first.
            args: vec!["--tls-reload-interval".into(), "1h".into()],
            ..Default::default()
        },
    );
    assert_eq!(served_cert(rg.public, &a, &b), a.der);
    assert_eq!(expiry(&rg), a.not_after as f64);
    let mut kept = open_keepalive(rg.public, &a.der);
    assert_eq!(get_on(&mut kept), (200, Bytes::from_static(b"ok")));

    // The files are replaced; nothing happens until SIGHUP.
    live.install(&b.cert_pem, &b.key_pem);
    assert_eq!(served_cert(rg.public, &a, &b), a.der);
    rg.proc.signal("HUP");
    poll_until(Duration::from_secs(10), "the SIGHUP reload", || {
        (reloads(&rg, "ok") == 1.0).then_some(())
    });
    assert_eq!(
        served_cert(rg.public, &a, &b),
        b.der,
        "new handshakes get B"
    );
    assert_eq!(expiry(&rg), b.not_after as f64);
    // The connection opened under A keeps its session and keeps working.
    assert_eq!(get_on(&mut kept), (200, Bytes::from_static(b"ok")));
    // And a client that trusts only B now connects.
    let mut fresh = open_keepalive(rg.public, &b.der);
    assert_eq!(get_on(&mut fresh).0, 200);

    // A broken pair: B's certificate with A's key, then an unparseable certificate.
    for (cert, key, why) in [
        (
            b.cert_pem.as_str(),
            a.key_pem.as_str(),
            "key does not match",
        ),
        (
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
            b.key_pem.as_str(),
            "unparseable",
        ),
    ] {
        let errors = reloads(&rg, "error");
        live.install(cert, key);
        rg.proc.signal("HUP");
        poll_until(Duration::from_secs(10), "the refused reload", || {
            (reloads(&rg, "error") == errors + 1.0).then_some(())
        });
        assert_eq!(served_cert(rg.public, &a, &b), b.der, "{why}: B kept");
        assert_eq!(expiry(&rg), b.not_after as f64, "{why}: gauge kept");
    }
    let refused = log_lines(
        &rg,
        "TLS certificate reload refused; keeping the certificate in use",
    );
    assert_eq!(refused.len(), 2, "{}", rg.log_text());
    assert!(refused.iter().all(|l| l["level"] == "ERROR"));
    assert!(
        refused[0]["error"]
            .as_str()
            .unwrap()
            .contains("do not form a pair"),
        "{refused:?}"
    );
    assert!(
        refused[1]["error"].as_str().unwrap().contains("tls_cert"),
        "{refused:?}"
    );
    assert_eq!(reloads(&rg, "ok"), 1.0);
    // Through all of it, the first connection stayed up.
    assert_eq!(get_on(&mut kept).0, 200);
}

#[test]
fn replaced_files_are_picked_up_without_a_signal() {
    let reg = Registry::start();
    let (a, b) = (pair(2040), pair(2042));
    let live = Live::new(&a);
    let rg = Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            tls: Some((live.cert(), live.key())),
            args: vec!["--tls-reload-interval".into(), "200ms".into()],
            ..Default::default()
        },
    );
    let mut kept = open_keepalive(rg.public, &a.der);
    assert_eq!(get_on(&mut kept).0, 200);
    live.install(&b.cert_pem, &b.key_pem);
    poll_until(Duration::from_secs(10), "the file-change reload", || {
        (served_cert(rg.public, &a, &b) == b.der).then_some(())
    });
    assert_eq!(reloads(&rg, "ok"), 1.0);
    assert_eq!(expiry(&rg), b.not_after as f64);
    assert_eq!(get_on(&mut kept).0, 200, "the old session survives");

    // A broken pair on disk is refused once, not every poll, and B stays.
    live.install(&a.cert_pem, &b.key_pem);
    poll_until(
        Duration::from_secs(10),
        "the refused file-change reload",
        || (reloads(&rg, "error") == 1.0).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(reloads(&rg, "error"), 1.0, "refused once, not per poll");
    assert_eq!(served_cert(rg.public, &a, &b), b.der);
}

/// The real registry serving TLS with `cert` (`http.tls`), on a port of its own choosing.
struct TlsRegistry {
    addr: std::net::SocketAddr,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

impl TlsRegistry {
    fn start(cert: &Path, key: &Path) -> Self {
        let bin = common::require_tool("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).unwrap();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:0\n  tls:\n    certificate: {}\n    key: {}\n",
                storage.display(),
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        let log = dir.path().join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut proc = Proc::adopt(child, log);
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            if let Some(a) = proc.listening().into_iter().find(|a| a.ip().is_loopback()) {
                break a;
            }
            assert!(
                proc.try_exit().is_none(),
                "registry exited: {}",
                proc.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "registry did not listen: {}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        TlsRegistry {
            addr,
            _proc: proc,
            _dir: dir,
        }
    }
}

#[test]
fn https_upstream_is_verified_against_upstream_ca_and_refused_without_it() {
    let cert = TestCert::generate();
    let reg = TlsRegistry::start(&cert.cert_pem, &cert.key_pem);
    let upstream = format!("https://localhost:{}", reg.addr.port());
    let rg = Regguard::start_with(
        &upstream,
        RegguardOptions {
            args: vec!["--upstream-ca".into(), cert.cert_pem.display().to_string()],
            ..Default::default()
        },
    );
    let img = oci::multi_arch("https-upstream");
    let dest = format!("docker://{}/tls/multi:v1", rg.host());
    skopeo_round_trip(
        &img,
        &dest,
        &["--dest-tls-verify=false"],
        &["--src-tls-verify=false"],
    );
    // Validation (the checker, over the same pools) reached the registry over TLS too.
    let r = http::send(
        "GET",
        &format!("{}/v2/tls/multi/manifests/v1", rg.url()),
        &[("accept", oci::ACCEPT_ALL)],
        Bytes::new(),
    );
    assert_eq!(r.status, 200);
    poll_until(Duration::from_secs(20), "an index check", || {
        (rg.metric("regguard_index_checks_total{result=\"ok\"}") >= 1.0).then_some(())
    });
    assert_eq!(
        rg.metric("regguard_index_checks_total{result=\"error\"}"),
        0.0
    );

    // Without --upstream-ca the system store does not know this CA: a 502 that says so.
    let rg = Regguard::start(&upstream);
    let r = http::get(&format!("{}/v2/", rg.url()));
    assert_eq!(r.status, 502, "{}", r.text());
    let message = r.json()["errors"][0]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("certificate") && message.contains("--upstream-ca"),
        "{message}\n{}",
        rg.log_text()
    );
}

#[test]
fn behind_a_trusted_proxy_the_logs_name_the_client_it_forwards_for() {
    let reg = Registry::start();
    let json = |trusted: &str| {
        Regguard::start_with(
            &reg.url(),
            RegguardOptions {
                args: vec!["--trusted-proxies".into(), trusted.into()],
                ..Default::default()
            },
        )
    };
    let img = oci::multi_arch("client-addr");
    // The peer (127.0.0.1) is trusted in the first, not in the second.
    for (rg, trusted) in [(json("127.0.0.1"), true), (json("10.9.9.9"), false)] {
        let base = rg.url();
        // X-Real-IP wins; X-Forwarded-For's last untrusted hop otherwise.
        http::send(
            "GET",
            &format!("{base}/v2/"),
            &[("x-real-ip", "203.0.113.7")],
            Bytes::new(),
        );
        http::send(
            "GET",
            &format!("{base}/v2/_catalog"),
            &[("x-forwarded-for", "198.51.100.1, 198.51.100.2, 127.0.0.1")],
            Bytes::new(),
        );
        // The gate refuses an index whose children were never pushed, and says who pushed it.
        let r = oci::put_manifest(
            &base,
            "client/addr",
            "v1",
            &img.index,
            &[("x-real-ip", "203.0.113.9")],
        );
        assert_eq!(r.status, 400, "{}", r.text());
        let access = poll_until(Duration::from_secs(5), "three access lines", || {
            let lines = log_lines(&rg, "request");
            (lines.len() >= 3).then_some(lines)
        });
        let client_of = |route: &str| {
            access
                .iter()
                .find(|l| l["route"] == route)
                .map(|l| l["client"].as_str().unwrap().to_owned())
                .unwrap()
        };
        let gate = log_lines(
            &rg,
            "push gate: manifest references missing or wrong content",
        );
        let gate_client = gate[0]["client"].as_str().unwrap().to_owned();
        if trusted {
            assert_eq!(client_of("base"), "203.0.113.7");
            assert_eq!(client_of("catalog"), "198.51.100.2");
            assert_eq!(client_of("manifest"), "203.0.113.9");
            assert_eq!(gate_client, "203.0.113.9");
        } else {
            for c in [client_of("base"), client_of("catalog"), gate_client] {
                assert!(
                    c.starts_with("127.0.0.1:"),
                    "untrusted peer logged as itself: {c}"
                );
            }
        }
    }
}

#[test]
fn sighup_without_tls_is_logged_and_changes_nothing() {
    let reg = Registry::start();
    let mut rg = Regguard::start(&reg.url());
    rg.proc.signal("HUP");
    common::poll_until(Duration::from_secs(10), "the SIGHUP log line", || {
        rg.log_text()
            .contains("no TLS certificate to reload")
            .then_some(())
    });
    assert!(rg.proc.try_exit().is_none(), "regguard exited on SIGHUP");
    assert_eq!(common::http::get(&format!("{}/v2/", rg.url())).status, 200);
}
