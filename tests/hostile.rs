//! Hostile input against the real registry: crafted images, the registry's own
//! reading rules (Go), amplification, memory, leaks and long uploads. Each test
//! is an attack that worked before regguard defended against it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use common::http::{self, send, sha256_digest};
use common::oci::{self, Blob, OCI_INDEX, OCI_MANIFEST};
use common::{poll_until, Regguard, RegguardOptions, Registry, RegistryOptions};
use serde_json::{json, Value};

fn with_env(reg: &Registry, env: &[(&str, &str)]) -> Regguard {
    Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        },
    )
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// Asks the registry itself whether `repo:reference` exists (200) or not (404).
fn registry_has(reg: &Registry, repo: &str, reference: &str, auth: &[(&str, &str)]) -> u16 {
    let mut headers = auth.to_vec();
    headers.push(("accept", oci::ACCEPT_ALL));
    send(
        "HEAD",
        &format!("{}/v2/{repo}/manifests/{reference}", reg.url()),
        &headers,
        Bytes::new(),
    )
    .status
}

/// One small image (config + one layer), pushed straight to the registry.
fn base_image(reg: &Registry, repo: &str, seed: &str, auth: &[(&str, &str)]) -> Blob {
    let (layer, diff) = oci::layer("f.txt", seed.as_bytes());
    let config = Blob::json(
        "application/vnd.oci.image.config.v1+json",
        &json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff]}}),
    );
    oci::push_blob(&reg.url(), repo, &config, auth);
    oci::push_blob(&reg.url(), repo, &layer, auth);
    let manifest = Blob::json(
        OCI_MANIFEST,
        &json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": config.descriptor(), "layers": [layer.descriptor()]}),
    );
    let r = oci::put_manifest(&reg.url(), repo, &manifest.digest, &manifest, auth);
    assert_eq!(r.status, 201, "{}", r.text());
    manifest
}

fn index_of(children: &[Value]) -> Blob {
    Blob::json(
        OCI_INDEX,
        &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}),
    )
}

fn child_desc(m: &Blob, size: usize) -> Value {
    json!({"mediaType": m.media_type, "digest": m.digest, "size": size,
           "platform": {"os": "linux", "architecture": "amd64"}})
}

/// GET with a deadline on a fresh connection; Err when no full answer came in time.
fn get_within(url: &str, limit: Duration) -> Result<u16, String> {
    let url = url.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(http::get(&url).status);
    });
    rx.recv_timeout(limit)
        .map_err(|_| format!("no answer within {limit:?}"))
}

#[test]
fn nested_index_bomb_neither_stalls_the_proxy_nor_holds_its_exit() {
    let reg = Registry::start();
    let mut rg = Regguard::start(&reg.url());
    let repo = "bomb/app";
    let image = base_image(&reg, repo, "bomb", &[]);
    // Three levels of 1000 copies: 10^9 paths to a walker that does not de-duplicate.
    let mut level = image.clone();
    for depth in 0..3 {
        let copies = vec![child_desc(&level, level.data.len()); 1000];
        let index = index_of(&copies);
        let tag = format!("level{depth}");
        let r = oci::put_manifest(&reg.url(), repo, &tag, &index, &[]);
        assert_eq!(r.status, 201, "{}", r.text());
        let r = oci::put_manifest(&reg.url(), repo, &index.digest, &index, &[]);
        assert_eq!(r.status, 201, "{}", r.text());
        level = index;
    }
    let ok_before = rg.metric("regguard_index_checks_total{result=\"ok\"}");

    // Pull the bomb through regguard (validation walks it), and push it through the gate.
    let pull = {
        let url = format!("{}/v2/{repo}/manifests/level2", rg.url());
        std::thread::spawn(move || {
            http::send("GET", &url, &[("accept", oci::ACCEPT_ALL)], Bytes::new()).status
        })
    };
    let push = {
        let (base, bomb) = (rg.url(), level.clone());
        std::thread::spawn(move || oci::put_manifest(&base, repo, "again", &bomb, &[]).status)
    };
    // Throughout, the API and the metrics keep answering within a second.
    for _ in 0..10 {
        assert_eq!(
            get_within(&format!("{}/v2/", rg.url()), Duration::from_secs(1)),
            Ok(200)
        );
        assert_eq!(
            get_within(
                &format!("http://{}/metrics", rg.admin),
                Duration::from_secs(1)
            ),
            Ok(200)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(pull.join().unwrap(), 200);
    assert_eq!(
        push.join().unwrap(),
        201,
        "the bomb is healthy: the gate accepts it"
    );
    // Each distinct reference was checked once: the validation finished, and ok.
    poll_until(Duration::from_secs(20), "the bomb's validation", || {
        (rg.metric("regguard_index_checks_total{result=\"ok\"}") > ok_before).then_some(())
    });
    for task in ["dispatcher", "recheck"] {
        let series = format!("regguard_background_task_up{{task=\"{task}\"}}");
        assert_eq!(rg.metric(&series), 1.0, "{series}");
    }
    rg.proc.signal("TERM");
    assert!(
        rg.proc.wait_exit(Duration::from_secs(10)).is_some(),
        "regguard did not exit promptly on SIGTERM"
    );
}

#[test]
fn a_walk_over_its_reference_budget_is_refused_at_push_and_an_error_at_serve_time() {
    let reg = Registry::start();
    let rg = with_env(
        &reg,
        &[
            ("REGGUARD_GATE_MAX_REFERENCES", "10"),
            ("REGGUARD_VALIDATE_MAX_REFERENCES", "10"),
        ],
    );
    let repo = "budget/app";
    let children: Vec<Blob> = (0..12)
        .map(|i| base_image(&reg, repo, &format!("child {i}"), &[]))
        .collect();
    let descs: Vec<Value> = children
        .iter()
        .map(|c| child_desc(c, c.data.len()))
        .collect();
    let index = index_of(&descs);

    let r = oci::put_manifest(&rg.url(), repo, "wide", &index, &[]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["errors"][0]["code"], "MANIFEST_INVALID");
    assert!(r.text().contains("max_references"), "{}", r.text());
    assert_eq!(registry_has(&reg, repo, "wide", &[]), 404);

    // Pushed past regguard, then pulled through it: the validation says `error`.
    assert_eq!(
        oci::put_manifest(&reg.url(), repo, "wide", &index, &[]).status,
        201
    );
    let errors_before = rg.metric("regguard_index_checks_total{result=\"error\"}");
    let r = send(
        "GET",
        &format!("{}/v2/{repo}/manifests/wide", rg.url()),
        &[("accept", oci::ACCEPT_ALL)],
        Bytes::new(),
    );
    assert_eq!(r.status, 200);
    poll_until(Duration::from_secs(10), "an error verdict", || {
        (rg.metric("regguard_index_checks_total{result=\"error\"}") > errors_before).then_some(())
    });
}

/// The registry routes these spellings of `/v2/<repo>/manifests/<tag>` to its manifest
/// handler (gorilla/mux matches the decoded path); regguard must gate every one of them.
#[test]
fn every_spelling_the_registry_routes_to_manifests_is_gated() {
    let reg = Registry::start();
    let rg = Regguard::start(&reg.url());
    let repo = "spell/app";
    let child = base_image(&reg, repo, "spelling", &[]);
    // A child size the registry does not check and the gate refuses.
    let broken = index_of(&[child_desc(&child, child.data.len() + 1)]);
    let spellings: [fn(&str, &str) -> String; 6] = [
        |r, t| format!("/v2/{r}/manifests/{t}"),
        |r, t| format!("/v2/{r}/manifests%2F{t}"),
        |r, t| format!("/v2/{r}/%6Danifests/{t}"),
        |r, t| format!("/v2/{r}/%6d%61nifests/{t}"),
        |r, t| format!("/v2/{}/manifests/{t}", r.replace('/', "%2F")),
        |r, t| format!("/v2/{r}/manifests/%{:02X}{}", t.as_bytes()[0], &t[1..]),
    ];
    let mut routed = 0;
    for (i, spell) in spellings.iter().enumerate() {
        let put = |base: &str, tag: &str| {
            send(
                "PUT",
                &format!("{base}{}", spell(repo, tag)),
                &[("content-type", OCI_INDEX)],
                broken.data.clone(),
            )
        };
        let direct_tag = format!("direct{i}");
        let direct = put(&reg.url(), &direct_tag);
        if direct.status != 201 || registry_has(&reg, repo, &direct_tag, &[]) != 200 {
            continue; // the registry does not route this spelling to its manifest handler
        }
        routed += 1;
        let via_tag = format!("via{i}");
        let via = put(&rg.url(), &via_tag);
        assert_eq!(via.status, 400, "spelling {i}: {}", via.text());
        assert_eq!(
            registry_has(&reg, repo, &via_tag, &[]),
            404,
            "spelling {i} reached the registry past the gate"
        );
    }
    assert!(
        routed >= 4,
        "only {routed} spellings reached the manifest handler"
    );
    // A malformed escape is refused by regguard with an OCI error.
    let r = send(
        "GET",
        &format!("{}/v2/{repo}/manifests/%zz", rg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 400);
    assert!(r.json()["errors"][0]["code"].is_string());
}

#[test]
fn capitalised_content_types_and_go_style_keys_do_not_blind_the_gate_or_validation() {
    let reg = Registry::start();
    let rg = Regguard::start(&reg.url());
    let repo = "golang/app";
    let child = base_image(&reg, repo, "go rules", &[]);
    let size = child.data.len();

    // 1. A Content-Type in capitals, no mediaType in the body, a wrong child size.
    let no_media_type = Blob::json(
        OCI_INDEX,
        &json!({"schemaVersion": 2, "manifests": [child_desc(&child, size + 1)]}),
    );
    let shouting = "Application/VND.OCI.Image.Index.v1+JSON";
    let put = |base: &str, tag: &str| {
        send(
            "PUT",
            &format!("{base}/v2/{repo}/manifests/{tag}"),
            &[("content-type", shouting)],
            no_media_type.data.clone(),
        )
    };
    assert_eq!(
        put(&reg.url(), "direct-caps").status,
        201,
        "the registry takes it"
    );
    let r = put(&rg.url(), "via-caps");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(registry_has(&reg, repo, "via-caps", &[]), 404);

    // 2. "size" then "Size": Go reads the last (wrong) one; the gate refuses the ambiguity.
    let text = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":{size},"Size":{}}}]}}"#,
        child.digest,
        size + 1
    );
    let two_sizes = Blob::new(OCI_INDEX, text.into_bytes());
    let r = oci::put_manifest(&rg.url(), repo, "via-size", &two_sizes, &[]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["errors"][0]["code"], "MANIFEST_INVALID");
    assert!(r.text().contains("Size"), "{}", r.text());
    assert_eq!(registry_has(&reg, repo, "via-size", &[]), 404);

    // 3. An empty "manifests" and the real list under "Manifests".
    let text = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[],"Manifests":[{}]}}"#,
        child_desc(&child, size + 1)
    );
    let hidden = Blob::new(OCI_INDEX, text.into_bytes());
    let r = oci::put_manifest(&rg.url(), repo, "via-hidden", &hidden, &[]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(registry_has(&reg, repo, "via-hidden", &[]), 404);

    // 4. Serve-time: the two-sizes index pushed past regguard is read as Go reads it.
    assert_eq!(
        oci::put_manifest(&reg.url(), repo, "direct-size", &two_sizes, &[]).status,
        201
    );
    let r = send(
        "GET",
        &format!("{}/v2/{repo}/manifests/direct-size", rg.url()),
        &[("accept", oci::ACCEPT_ALL)],
        Bytes::new(),
    );
    assert_eq!(r.status, 200);
    poll_until(
        Duration::from_secs(10),
        "the size mismatch recorded",
        || {
            let text = http::get_text(&format!("http://{}/integrity", rg.admin));
            (text.contains(&two_sizes.digest) && text.contains(&child.digest)).then_some(())
        },
    );
}

#[test]
fn a_wrong_password_costs_the_registry_one_check_and_anonymous_pushers_learn_nothing() {
    let reg = Registry::start_with(RegistryOptions {
        auth: Some(("alice".into(), "s3cret".into())),
    });
    let rg = Regguard::start(&reg.url());
    let good = basic("alice", "s3cret");
    let auth = [("authorization", good.as_str())];
    let repo = "private/app";
    let img = oci::multi_arch("leak");
    // An authorised, healthy push through regguard: the caches now know this repository.
    oci::push_multi_arch(&rg.url(), repo, "v1", &img, &auth);

    // 25,000 references with a wrong password: one check, then the registry's own 401.
    let many: Vec<Value> = (0..25_000u32)
        .map(|i| {
            json!({"mediaType": OCI_MANIFEST, "digest": sha256_digest(&i.to_be_bytes()), "size": 1})
        })
        .collect();
    let flood = index_of(&many);
    let checks_before = rg.metric("regguard_validation_cache_misses_total");
    let wrong = basic("alice", "wrong");
    let r = oci::put_manifest(
        &rg.url(),
        repo,
        "flood",
        &flood,
        &[("authorization", wrong.as_str())],
    );
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.header("www-authenticate").is_some());
    let asked = rg.metric("regguard_validation_cache_misses_total") - checks_before;
    assert!(
        asked <= 1.0,
        "{asked} upstream checks for one unauthorised push"
    );

    // An anonymous push of a broken index gets the registry's challenge, nothing cached.
    let child = &img.images[0].manifest;
    let broken = index_of(&[child_desc(child, child.data.len() + 1)]);
    let r = oci::put_manifest(&rg.url(), repo, "broken", &broken, &[]);
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.header("www-authenticate").is_some());
    assert!(
        !r.text().contains(&child.data.len().to_string()),
        "an anonymous pusher learned a size: {}",
        r.text()
    );
    // The same push with credentials is refused by the gate; a healthy one lands.
    let r = oci::put_manifest(&rg.url(), repo, "broken", &broken, &auth);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(registry_has(&reg, repo, "broken", &auth), 404);
    let r = oci::put_manifest(&rg.url(), repo, "v2", &img.index, &auth);
    assert_eq!(r.status, 201, "{}", r.text());
}

#[test]
fn manifest_memory_is_bounded_and_a_full_budget_answers_503_with_retry_after() {
    let reg = Registry::start();
    let rg = with_env(&reg, &[("REGGUARD_GATE_MAX_BUFFERED_MIB", "4")]);
    // A push that declares the registry's maximum and sends half of it holds the budget.
    let mut holder = TcpStream::connect(rg.public).unwrap();
    write!(
        holder,
        "PUT /v2/mem/app/manifests/big HTTP/1.1\r\nHost: {}\r\nContent-Type: {OCI_INDEX}\r\nContent-Length: {}\r\n\r\n",
        rg.host(),
        4 * 1024 * 1024
    )
    .unwrap();
    holder.write_all(&vec![b' '; 2 * 1024 * 1024]).unwrap();
    poll_until(Duration::from_secs(5), "the budget taken", || {
        (rg.metric("regguard_manifest_bytes_held") >= 4.0 * 1024.0 * 1024.0).then_some(())
    });
    let index = index_of(&[]);
    let r = oci::put_manifest(&rg.url(), "mem/app", "small", &index, &[]);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert_eq!(r.json()["errors"][0]["code"], "UNAVAILABLE");
    assert!(rg.metric("regguard_manifest_budget_refusals_total") >= 1.0);
    // The holder leaves: its share comes back and pushes are served again.
    drop(holder);
    poll_until(Duration::from_secs(5), "the budget released", || {
        (rg.metric("regguard_manifest_bytes_held") == 0.0).then_some(())
    });
    let r = oci::put_manifest(&rg.url(), "mem/app", "small", &index, &[]);
    assert_eq!(r.status, 201, "{}", r.text());
}

#[test]
fn requests_without_host_are_refused_and_secrets_without_a_colon_are_never_logged() {
    let reg = Registry::start();
    let rg = Regguard::start(&reg.url());
    let mut s = TcpStream::connect(rg.public).unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"errors\""), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("location:"),
        "{answer}"
    );

    // A broken push (logged by the gate) with a Basic credential that has no colon.
    let repo = "secret/app";
    let child = base_image(&reg, repo, "secret", &[]);
    let broken = index_of(&[child_desc(&child, child.data.len() + 1)]);
    let token = "Zm9yZ2V0LW1lLXRva2Vu"; // a bearer-like secret, sent as Basic
    let header = format!("Basic {token}");
    let r = oci::put_manifest(
        &rg.url(),
        repo,
        "x",
        &broken,
        &[("authorization", header.as_str())],
    );
    assert_eq!(r.status, 400, "{}", r.text());
    poll_until(Duration::from_secs(5), "the gate's log line", || {
        rg.log_text().contains("push gate").then_some(())
    });
    let log = rg.log_text();
    assert!(!log.contains("forget-me-token"), "the secret was logged");
    assert!(!log.contains(token), "the secret was logged");
}

/// A request body that sends `chunks` chunks of `size` bytes, `gap` apart.
fn slow_body(chunks: usize, size: usize, gap: Duration) -> http::BoxBody {
    use http_body_util::BodyExt as _;
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::io::Error>>(1);
    http::rt().spawn(async move {
        for i in 0..chunks {
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            if tx
                .send(Ok(hyper::body::Frame::data(Bytes::from(vec![b'x'; size]))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    http_body_util::StreamBody::new(ReceiverStream(rx))
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        .boxed()
}

struct ReceiverStream<T>(tokio::sync::mpsc::Receiver<T>);

impl<T> futures_core::Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// A PUT whose connection may be cut: the status, or 0 when no response came.
fn try_put(url: &str, body: http::BoxBody) -> u16 {
    let req = hyper::Request::put(url)
        .header("content-type", "application/octet-stream")
        .body(body)
        .unwrap();
    http::rt().block_on(async {
        match http::client().request(req).await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    })
}

#[test]
fn a_long_steady_upload_succeeds_and_a_stalled_one_is_cut() {
    let reg = Registry::start();
    let rg = Regguard::start_with(
        &reg.url(),
        RegguardOptions {
            args: vec!["--idle-timeout".into(), "2s".into()],
            ..Default::default()
        },
    );
    let repo = "slow/app";
    let upload = |body: http::BoxBody, digest: &str| {
        let r = send(
            "POST",
            &format!("{}/v2/{repo}/blobs/uploads/", rg.url()),
            &[],
            Bytes::new(),
        );
        assert_eq!(r.status, 202, "{}", r.text());
        let url = http::location_url(
            &rg.url(),
            r.header("location").unwrap(),
            &format!("digest={digest}"),
        );
        let started = Instant::now();
        (try_put(&url, body), started.elapsed())
    };
    // 13 chunks, 0.5 s apart: 6 s in all, never 2 s without data.
    let steady = vec![b'x'; 13 * 1024];
    let digest = sha256_digest(&steady);
    let (status, took) = upload(slow_body(13, 1024, Duration::from_millis(500)), &digest);
    assert_eq!(status, 201, "a steady upload was cut after {took:?}");
    let head = send(
        "HEAD",
        &format!("{}/v2/{repo}/blobs/{digest}", reg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!(head.status, 200, "the registry has the blob");

    // Two chunks 6 s apart: a reading stall longer than the idle timeout is cut.
    let stalled = vec![b'x'; 2 * 1024];
    let digest = sha256_digest(&stalled);
    let (status, _) = upload(slow_body(2, 1024, Duration::from_secs(6)), &digest);
    assert_ne!(status, 201, "a stalled upload went through");
    let head = send(
        "HEAD",
        &format!("{}/v2/{repo}/blobs/{digest}", reg.url()),
        &[],
        Bytes::new(),
    );
    assert_eq!(head.status, 404, "the registry stored a cut upload");
}

/// A registry that misbehaves at the HTTP level, on a raw socket: the catalog's `Link`
/// points back at itself (or is malformed), and every manifest body stalls after its head.
fn misbehaving_registry(link: &'static str) -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    let Ok(n) = conn.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let (headers, body): (String, String) = if path.starts_with("/v2/_catalog") {
                        (
                            format!("Link: {link}\r\n"),
                            r#"{"repositories":["stall/app"]}"#.into(),
                        )
                    } else if path.contains("/tags/list") {
                        (
                            String::new(),
                            r#"{"name":"stall/app","tags":["v1"]}"#.into(),
                        )
                    } else if path.contains("/manifests/") {
                        // The head, a few bytes of a 1000-byte body, then nothing, ever.
                        let _ = conn.write_all(
                            format!("HTTP/1.1 200 OK\r\nContent-Type: {OCI_INDEX}\r\nContent-Length: 1000\r\n\r\n{{\"schema").as_bytes(),
                        );
                        std::thread::sleep(Duration::from_secs(600));
                        return;
                    } else {
                        (String::new(), "{}".into())
                    };
                    let _ = conn.write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    );
                }
            });
        }
    });
    addr
}

fn cli_scan_within(url: &str, limit: Duration) -> Option<(Option<i32>, String)> {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_regguard"))
        .args(["scan", "--registry", url, "--insecure", "--format", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            let mut out = String::new();
            child
                .stdout
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut out)
                .unwrap();
            return Some((status.code(), out));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn a_registry_that_loops_its_pages_or_stalls_its_bodies_cannot_hang_a_scan() {
    let scans: Vec<_> = [
        r#"</v2/_catalog?n=100>; rel="next""#,
        r#">; rel="next" <"#,
        r#"<https://elsewhere.example/not-v2>; rel="next""#,
    ]
    .into_iter()
    .map(|link| {
        let addr = misbehaving_registry(link);
        // Every request the scan makes has a total deadline (30 s): a stalled manifest
        // body ends as an error, and a Link back to the same page ends the listing.
        let scan = std::thread::spawn(move || {
            cli_scan_within(&format!("http://{addr}"), Duration::from_secs(120))
        });
        (link, scan)
    })
    .collect();
    for (link, scan) in scans {
        let finished = scan.join().unwrap();
        let (code, out) = finished.unwrap_or_else(|| panic!("the scan hung (Link {link})"));
        assert!(
            matches!(code, Some(1) | Some(2)),
            "Link {link}: {code:?} {out}"
        );
    }
}

#[test]
fn a_huge_platform_string_is_not_copied_per_reference() {
    let reg = Registry::start();
    let rg = Regguard::start(&reg.url());
    let repo = "huge/app";
    // A child image with 1000 tiny layers, pushed through regguard.
    let layers: Vec<Blob> = (0..1000u32)
        .map(|i| Blob::new(oci::OCI_LAYER, i.to_be_bytes().to_vec()))
        .collect();
    for l in &layers {
        oci::push_blob(&rg.url(), repo, l, &[]);
    }
    let config = Blob::json(
        "application/vnd.oci.image.config.v1+json",
        &json!({"architecture": "amd64", "os": "linux"}),
    );
    oci::push_blob(&rg.url(), repo, &config, &[]);
    let child = Blob::json(
        OCI_MANIFEST,
        &json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.descriptor(),
                "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>()}),
    );
    assert_eq!(
        oci::put_manifest(&rg.url(), repo, &child.digest, &child, &[]).status,
        201
    );
    let before_kib = rg.proc.peak_rss_kib();
    // One index entry whose platform variant is 512 KiB.
    let mut desc = child_desc(&child, child.data.len());
    desc["platform"]["variant"] = json!("v".repeat(512 * 1024));
    let index = index_of(&[desc]);
    let r = oci::put_manifest(&rg.url(), repo, "huge", &index, &[]);
    assert_eq!(r.status, 201, "{}", r.text());
    let r = send(
        "GET",
        &format!("{}/v2/{repo}/manifests/huge", rg.url()),
        &[("accept", oci::ACCEPT_ALL)],
        Bytes::new(),
    );
    assert_eq!(r.status, 200);
    poll_until(Duration::from_secs(30), "the validation", || {
        (rg.metric("regguard_index_checks_total{result=\"ok\"}") >= 1.0).then_some(())
    });
    // 1001 references × 512 KiB would be 500 MiB; kept copies are cut to 256 bytes.
    let grew_mib = (rg.proc.peak_rss_kib().saturating_sub(before_kib)) / 1024;
    assert!(grew_mib < 100, "peak RSS grew by {grew_mib} MiB");
}

#[test]
fn a_content_type_with_a_non_ascii_parameter_is_still_gated() {
    let reg = Registry::start();
    let rg = Regguard::start(&reg.url());
    let repo = "ct/app";
    let child = base_image(&reg, repo, "non-ascii", &[]);
    let body =
        json!({"schemaVersion": 2, "manifests": [child_desc(&child, child.data.len() + 1000)]});
    let ct = format!("{OCI_INDEX}; x=\"\u{e9}\"");
    let put = |base: &str, tag: &str| {
        send(
            "PUT",
            &format!("{base}/v2/{repo}/manifests/{tag}"),
            &[("content-type", ct.as_str())],
            serde_json::to_vec(&body).unwrap(),
        )
    };
    assert_eq!(
        put(&reg.url(), "direct").status,
        201,
        "the registry reads it as an index"
    );
    let r = put(&rg.url(), "via");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(registry_has(&reg, repo, "via", &[]), 404);
}

#[test]
fn every_descriptor_is_judged_even_when_its_digest_repeats() {
    let reg = Registry::start();
    let rg = Regguard::start(&reg.url());
    let repo = "dup/app";
    let child = base_image(&reg, repo, "duplicates", &[]);
    let size = child.data.len();
    // The right entry first, then the same digest with a wrong size.
    let index = index_of(&[child_desc(&child, size), child_desc(&child, size + 1000)]);
    let r = oci::put_manifest(&rg.url(), repo, "via", &index, &[]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("size_mismatch"), "{}", r.text());
    assert_eq!(registry_has(&reg, repo, "via", &[]), 404);
    // The same index pushed past regguard is found broken when served, and stays so.
    assert_eq!(
        oci::put_manifest(&reg.url(), repo, "direct", &index, &[]).status,
        201
    );
    let r = send(
        "GET",
        &format!("{}/v2/{repo}/manifests/direct", rg.url()),
        &[("accept", oci::ACCEPT_ALL)],
        Bytes::new(),
    );
    assert_eq!(r.status, 200);
    poll_until(Duration::from_secs(10), "the wrong size recorded", || {
        (rg.metric("regguard_index_checks_total{result=\"broken\"}") >= 1.0).then_some(())
    });
    let text = http::get_text(&format!("http://{}/integrity", rg.admin));
    assert!(text.contains(&child.digest), "{text}");

    // An image listing one layer twice, the second time with a wrong size.
    let v: Value = serde_json::from_slice(&child.data).unwrap();
    let layer = v["layers"][0].clone();
    let mut wrong = layer.clone();
    wrong["size"] = json!(999_999);
    let twice = Blob::json(
        OCI_MANIFEST,
        &json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": v["config"],
                "layers": [layer, wrong]}),
    );
    let r = oci::put_manifest(&rg.url(), repo, "twice", &twice, &[]);
    assert_eq!(r.status, 400, "{}", r.text());
}

#[test]
fn a_config_that_carries_urls_is_still_checked() {
    let reg = Registry::start();
    let rg = Regguard::start(&reg.url());
    let repo = "urls/app";
    let (layer, _) = oci::layer("f.txt", b"urls");
    oci::push_blob(&reg.url(), repo, &layer, &[]);
    let missing = sha256_digest(b"a config that was never pushed");
    let image = Blob::json(
        OCI_MANIFEST,
        &json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": missing, "size": 30, "urls": ["https://example.com/x"]},
                "layers": [layer.descriptor()]}),
    );
    let r = oci::put_manifest(&rg.url(), repo, "via", &image, &[]);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains(&missing), "{}", r.text());
    assert_eq!(registry_has(&reg, repo, "via", &[]), 404);
}

#[test]
fn a_refused_anonymous_push_does_not_decide_how_regguard_reads_those_bytes() {
    let reg = Registry::start_with(RegistryOptions {
        auth: Some(("alice".into(), "s3cret".into())),
    });
    let rg = Regguard::start(&reg.url());
    let good = basic("alice", "s3cret");
    let auth = [("authorization", good.as_str())];
    let repo = "poison/app";
    let (layer, diff) = oci::layer("f.txt", b"poison");
    let config = Blob::json(
        "application/vnd.oci.image.config.v1+json",
        &json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff]}}),
    );
    oci::push_blob(&reg.url(), repo, &config, &auth);
    oci::push_blob(&reg.url(), repo, &layer, &auth);
    // An image without mediaType whose body also says "manifests": null.
    let text = format!(
        r#"{{"schemaVersion":2,"config":{},"layers":[{}],"manifests":null}}"#,
        config.descriptor(),
        layer.descriptor()
    );
    let image = Blob::new(OCI_MANIFEST, text.into_bytes());
    let r = oci::put_manifest(&reg.url(), repo, &image.digest, &image, &auth);
    assert_eq!(r.status, 201, "{}", r.text());
    // The same bytes, anonymously, claiming to be an index: the registry says 401.
    let as_index = Blob::new(OCI_INDEX, image.data.clone());
    let r = oci::put_manifest(&rg.url(), repo, &image.digest, &as_index, &[]);
    assert_eq!(r.status, 401, "{}", r.text());
    // The image loses its layer; once cached answers are stale, an index naming the image
    // is refused: regguard still reads it as an image with that layer.
    reg.remove_layer_link(repo, &layer.digest);
    std::thread::sleep(Duration::from_secs(6));
    let index = index_of(&[child_desc(&image, image.data.len())]);
    let r = oci::put_manifest(&rg.url(), repo, "v1", &index, &auth);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains(&layer.digest), "{}", r.text());
}

#[test]
fn a_push_to_a_path_the_registry_redirects_gets_the_registrys_answer() {
    let reg = Registry::start();
    let rg = Regguard::start(&reg.url());
    // A child to check: the checks would go to the same unroutable name.
    let index =
        index_of(&[json!({"mediaType": OCI_MANIFEST, "digest": sha256_digest(b"x"), "size": 1})]);
    for path in ["/v2/atk//path/manifests/t", "/v2/atk/./path/manifests/t"] {
        let put = |base: &str| {
            send(
                "PUT",
                &format!("{base}{path}"),
                &[("content-type", OCI_INDEX)],
                index.data.clone(),
            )
            .status
        };
        assert_eq!(put(&rg.url()), put(&reg.url()), "{path}");
    }
}

/// A registry that answers every manifest HEAD present and right, slowly, and counts them.
fn slow_registry(
    delay: Duration,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let heads = std::sync::Arc::new(AtomicUsize::new(0));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = heads.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let counter = counter.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let Ok(n) = conn.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    let head = String::from_utf8_lossy(&buf[..n]).to_string();
                    let mut words = head.split_whitespace();
                    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                    let answer = if method == "HEAD" && path.contains("/manifests/") {
                        counter.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(delay);
                        let digest = path.rsplit('/').next().unwrap_or("");
                        format!("HTTP/1.1 200 OK\r\nContent-Type: {OCI_MANIFEST}\r\nDocker-Content-Digest: {digest}\r\nContent-Length: 1\r\n\r\n")
                    } else if method == "PUT" {
                        "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n".to_string()
                    } else {
                        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_string()
                    };
                    if conn.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, heads)
}

#[test]
fn a_push_abandoned_by_its_client_stops_its_checks() {
    use std::sync::atomic::Ordering;
    let (registry, heads) = slow_registry(Duration::from_millis(300));
    let rg = Regguard::start(&format!("http://{registry}"));
    // 64 distinct children, each checked with a 300 ms HEAD, 8 at a time: about 2.4 s.
    let children: Vec<Value> = (0..64u32)
        .map(|i| json!({"mediaType": OCI_MANIFEST, "digest": sha256_digest(&i.to_be_bytes()), "size": 1}))
        .collect();
    let index = index_of(&children);
    let mut s = TcpStream::connect(rg.public).unwrap();
    write!(
        s,
        "PUT /v2/gone/app/manifests/v1 HTTP/1.1\r\nHost: {}\r\nContent-Type: {OCI_INDEX}\r\nContent-Length: {}\r\n\r\n",
        rg.host(),
        index.data.len()
    )
    .unwrap();
    s.write_all(&index.data).unwrap();
    poll_until(Duration::from_secs(10), "the gate's first checks", || {
        (heads.load(Ordering::SeqCst) >= 2).then_some(())
    });
    drop(s); // the pusher leaves
    std::thread::sleep(Duration::from_secs(2));
    let after_leaving = heads.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(2));
    let later = heads.load(Ordering::SeqCst);
    assert_eq!(later, after_leaving, "checks went on after the pusher left");
    assert!(
        after_leaving < 64,
        "all {after_leaving} checks ran for an abandoned push"
    );
}
