//! nginx parity: the nginx :5050 front (`front.conf`, verbatim) and regguard,
//! each in front of its own fresh real registry, get the same scripted request
//! sequence; every step must give the same status, the same registry-set
//! headers and the same body through both.
//!
//! Run by `cargo test` (registered as the `nginx_parity` test target).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::http::{self, send, send_body, Resp};
use common::oci::{self, ACCEPT_ALL};
use common::{Nginx, Regguard, Registry};

/// Headers the registry sets and a client may depend on.
const COMPARED: &[&str] = &[
    "content-type",
    "content-length",
    "content-range",
    "accept-ranges",
    "docker-content-digest",
    "docker-distribution-api-version",
    "docker-upload-uuid",
    "location",
    "range",
    "etag",
    "www-authenticate",
    "x-content-type-options",
];

#[derive(Debug, PartialEq)]
struct Step {
    name: String,
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// Replaces what legitimately differs between two runs: the front's own host:port,
/// upload session ids and their opaque `_state`.
fn normalize(value: &str, front_host: &str) -> String {
    let v = value.replace(front_host, "<front>");
    let mut out = String::new();
    for part in v.split('/') {
        if !out.is_empty() || v.starts_with('/') {
            out.push('/');
        }
        let (path, query) = part
            .split_once('?')
            .map_or((part, None), |(p, q)| (p, Some(q)));
        let is_uuid = path.len() == 36 && path.chars().filter(|c| *c == '-').count() == 4;
        out.push_str(if is_uuid { "<uuid>" } else { path });
        if let Some(q) = query {
            out.push('?');
            let q: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some(("_state", _)) => "_state=<state>".to_string(),
                    _ => kv.to_string(),
                })
                .collect();
            out.push_str(&q.join("&"));
        }
    }
    out.trim_start_matches('/').to_string()
}

fn observe(name: &str, r: &Resp, front_host: &str) -> Step {
    let mut headers = BTreeMap::new();
    for h in COMPARED {
        if let Some(v) = r.header(h) {
            let v = if *h == "docker-upload-uuid" {
                "<uuid>".to_string()
            } else {
                normalize(v, front_host)
            };
            headers.insert(h.to_string(), v);
        }
    }
    Step {
        name: name.to_string(),
        status: r.status,
        headers,
        body: normalize(&r.text(), front_host),
    }
}

/// The scripted sequence a registry client runs, against `base` (a front).
fn sequence(base: &str) -> Vec<Step> {
    let host = base.trim_start_matches("http://");
    let mut steps = Vec::new();
    let mut step = |name: &str, r: Resp| steps.push(observe(name, &r, host));
    let repo = "parity/app";
    let img = oci::multi_arch("parity");

    step("liveness /", http::get(&format!("{base}/")));
    step("base check", http::get(&format!("{base}/v2/")));

    // Push: every blob by POST + PUT ?digest=, one by POST + chunked PATCH + PUT.
    let blobs = img.blobs();
    for (i, b) in blobs.iter().enumerate() {
        let r = send(
            "POST",
            &format!("{base}/v2/{repo}/blobs/uploads/"),
            &[],
            Bytes::new(),
        );
        let loc = http::location_url(base, r.header("location").unwrap(), "");
        step(&format!("blob {i} POST upload"), r);
        if i == 0 {
            let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
                futures_once(b.data.clone()),
            ));
            let r = send_body(
                "PATCH",
                &loc,
                &[("content-type", "application/octet-stream")],
                body,
            );
            let loc = http::location_url(base, r.header("location").unwrap(), "");
            step(&format!("blob {i} PATCH chunked"), r);
            let url = http::location_url(base, &loc, &format!("digest={}", b.digest));
            step(
                &format!("blob {i} PUT close"),
                send("PUT", &url, &[], Bytes::new()),
            );
        } else {
            let url = http::location_url(base, &loc, &format!("digest={}", b.digest));
            step(
                &format!("blob {i} PUT monolithic"),
                send("PUT", &url, &[], b.data.clone()),
            );
        }
    }
    // Cross-repository mount of an existing blob.
    let mount = format!(
        "{base}/v2/parity/other/blobs/uploads/?mount={}&from={repo}",
        blobs[0].digest
    );
    step("blob mount", send("POST", &mount, &[], Bytes::new()));
    for (i, c) in img.children().iter().enumerate() {
        let r = oci::put_manifest(base, repo, &c.manifest.digest, &c.manifest, &[]);
        step(&format!("child {i} PUT by digest"), r);
    }
    step(
        "index PUT by tag",
        oci::put_manifest(base, repo, "v1", &img.index, &[]),
    );

    step(
        "tags list",
        http::get(&format!("{base}/v2/{repo}/tags/list")),
    );
    step(
        "tags list paged",
        http::get(&format!("{base}/v2/{repo}/tags/list?n=1")),
    );
    step("catalog", http::get(&format!("{base}/v2/_catalog?n=10")));
    let accept = [("accept", ACCEPT_ALL)];
    let by_tag = format!("{base}/v2/{repo}/manifests/v1");
    let by_digest = format!("{base}/v2/{repo}/manifests/{}", img.index.digest);
    step(
        "manifest GET by tag",
        send("GET", &by_tag, &accept, Bytes::new()),
    );
    step(
        "manifest HEAD by tag",
        send("HEAD", &by_tag, &accept, Bytes::new()),
    );
    step(
        "manifest GET by digest",
        send("GET", &by_digest, &accept, Bytes::new()),
    );
    step(
        "manifest HEAD by digest",
        send("HEAD", &by_digest, &accept, Bytes::new()),
    );
    step(
        "manifest GET without OCI accept (registry quirk: 404)",
        send("GET", &by_tag, &[], Bytes::new()),
    );
    let layer = &img.images[0].layers[0];
    let blob_url = format!("{base}/v2/{repo}/blobs/{}", layer.digest);
    step("blob GET", http::get(&blob_url));
    step("blob HEAD", send("HEAD", &blob_url, &[], Bytes::new()));
    step(
        "blob GET range",
        send("GET", &blob_url, &[("range", "bytes=3-17")], Bytes::new()),
    );
    let unknown = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    step(
        "unknown manifest",
        send(
            "GET",
            &format!("{base}/v2/{repo}/manifests/{unknown}"),
            &accept,
            Bytes::new(),
        ),
    );
    step(
        "unknown tag",
        send(
            "GET",
            &format!("{base}/v2/{repo}/manifests/nope"),
            &accept,
            Bytes::new(),
        ),
    );
    step(
        "unknown blob",
        http::get(&format!("{base}/v2/{repo}/blobs/{unknown}")),
    );
    step(
        "unknown repository tags",
        http::get(&format!("{base}/v2/nothing/here/tags/list")),
    );
    step(
        "DELETE manifest",
        send("DELETE", &by_digest, &[], Bytes::new()),
    );
    step(
        "manifest GET after DELETE",
        send("GET", &by_digest, &accept, Bytes::new()),
    );
    step("DELETE blob", send("DELETE", &blob_url, &[], Bytes::new()));
    step("blob GET after DELETE", http::get(&blob_url));
    steps
}

/// A one-frame stream with no size hint, so the body goes chunked.
fn futures_once(
    data: Bytes,
) -> impl futures_core::Stream<
    Item = Result<http_body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>,
> {
    struct Once(Option<Bytes>);
    impl futures_core::Stream for Once {
        type Item = Result<http_body::Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready(self.0.take().map(|d| Ok(http_body::Frame::data(d))))
        }
    }
    Once(Some(data))
}

#[test]
fn nginx_front_and_regguard_give_the_same_answers_to_the_same_sequence() {
    let reg_a = Registry::start();
    let nginx = Nginx::start("front.conf", reg_a.addr);
    let reg_b = Registry::start();
    let rg = Regguard::start(&reg_b.url());

    let through_nginx = sequence(&nginx.url());
    let through_regguard = sequence(&rg.url());
    assert_eq!(through_nginx.len(), through_regguard.len());
    let mut mismatches = Vec::new();
    for (n, r) in through_nginx.iter().zip(&through_regguard) {
        if n != r {
            mismatches.push(format!(
                "step `{}`:\n  nginx:    {n:?}\n  regguard: {r:?}",
                n.name
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} steps differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    // The sequence exercised what it claims to: statuses through regguard.
    let status = |name: &str| {
        through_regguard
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .status
    };
    assert_eq!(status("blob 0 PATCH chunked"), 202);
    assert_eq!(status("blob mount"), 201);
    assert_eq!(status("index PUT by tag"), 201);
    assert_eq!(
        status("manifest GET without OCI accept (registry quirk: 404)"),
        404
    );
    assert_eq!(status("blob GET range"), 206);
    assert_eq!(status("DELETE manifest"), 202);
    assert_eq!(status("unknown blob"), 404);
    // And the compared headers were there to compare.
    let step = |name: &str| through_regguard.iter().find(|s| s.name == name).unwrap();
    let post = &step("blob 0 POST upload").headers;
    assert!(
        post["location"]
            .starts_with("http://<front>/v2/parity/app/blobs/uploads/<uuid>?_state=<state>"),
        "{post:?}"
    );
    let head = &step("manifest HEAD by tag").headers;
    assert_eq!(
        head["docker-content-digest"],
        oci::multi_arch("parity").index.digest
    );
    assert!(head.contains_key("content-length"), "{head:?}");
    assert!(step("unknown manifest").body.contains("MANIFEST_UNKNOWN"));
}

/// The drop-in `nginx-in-front.conf`, as an operator installs it, inside the test skeleton
/// `tests/nginx/in-front.conf`: only its listen, certificate and upstream lines become the
/// harness's placeholders; every proxy directive runs as shipped. Returns the file's path
/// (absolute, so the harness reads it instead of a file in `nginx-compat/`).
fn in_front_template(dir: &std::path::Path) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut drop_in =
        std::fs::read_to_string(root.join("nginx-compat/nginx-in-front.conf")).unwrap();
    for (line, with) in [
        ("    server 127.0.0.1:5051;\n", "    server @UPSTREAM@;\n"),
        ("    listen 5050 ssl;\n", "    listen @LISTEN@ @SSL@;\n"),
        (
            "    ssl_certificate /etc/ssl/registry/fullchain.pem;\n",
            "    @TLS_LINES@\n",
        ),
        (
            "    ssl_certificate_key /etc/ssl/registry/privkey.pem;\n",
            "",
        ),
        ("    ssl_protocols TLSv1.2 TLSv1.3;\n", ""),
    ] {
        assert_eq!(
            drop_in.matches(line).count(),
            1,
            "nginx-in-front.conf should have the line {line:?} once"
        );
        drop_in = drop_in.replace(line, with);
    }
    let skeleton = std::fs::read_to_string(root.join("tests/nginx/in-front.conf")).unwrap();
    let marker = "    # the drop-in goes here\n";
    assert_eq!(skeleton.matches(marker).count(), 1);
    let path = dir.join("nginx-in-front.conf");
    std::fs::write(&path, skeleton.replace(marker, &drop_in)).unwrap();
    path
}

#[test]
fn nginx_in_front_of_regguard_keeps_https_location_when_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let in_front = in_front_template(dir.path());
    let reg = Registry::start();
    let cert = common::TestCert::generate();
    let tls = Some((cert.cert_pem.as_path(), cert.key_pem.as_path()));
    for (trusted, scheme) in [(true, "https"), (false, "http")] {
        let mut opts = common::RegguardOptions::default();
        if trusted {
            opts.args = vec!["--trusted-proxies".into(), "127.0.0.1".into()];
        }
        let rg = Regguard::start_with(&reg.url(), opts);
        let nginx = Nginx::start_with(&in_front.display().to_string(), rg.public, tls);
        let req = ::http::Request::builder()
            .method("POST")
            .uri("/v2/front/app/blobs/uploads/")
            .header("host", nginx.addr.to_string())
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap();
        let (_, r) = common::http::https_send(nginx.addr, &cert.cert_der, false, req);
        assert_eq!(r.status, 202, "{}", r.text());
        let loc = r.header("location").unwrap();
        let want = format!("{scheme}://{}/v2/front/app/blobs/uploads/", nginx.addr);
        assert!(
            loc.starts_with(&want),
            "trusted={trusted}: {loc} should start with {want}"
        );
    }
}
