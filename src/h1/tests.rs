//! The lean client against a scripted in-process upstream.

use super::*;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpListener;

/// A scripted upstream: every request head read is answered with the next canned
/// response; `close_after` closes a connection after that many answers. Counts accepts.
struct Upstream {
    port: u16,
    accepts: Arc<AtomicUsize>,
}

async fn upstream(responses: Vec<&'static [u8]>, close_after: usize) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepts = Arc::new(AtomicUsize::new(0));
    let counted = accepts.clone();
    let script = Arc::new(Mutex::new(VecDeque::from(responses)));
    tokio::spawn(async move {
        loop {
            let (mut io, _) = listener.accept().await.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            let script = script.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut answered = 0;
                loop {
                    let mut chunk = [0u8; 1024];
                    let n = match io.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let next = script.lock().unwrap().pop_front();
                        let Some(resp) = next else { return };
                        io.write_all(resp).await.unwrap();
                        answered += 1;
                        if answered == close_after {
                            return;
                        }
                    }
                }
            });
        }
    });
    Upstream { port, accepts }
}

fn pool(port: u16) -> Pool {
    Pool::new(
        "127.0.0.1",
        port,
        Duration::from_secs(2),
        Duration::from_secs(60),
        Duration::from_secs(50),
    )
}

fn get_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(http::header::HOST, HeaderValue::from_static("registry"));
    h
}

async fn get(pool: &Pool, method: Method) -> Result<(Response<()>, Bytes), Error> {
    let resp = pool
        .send(&method, "/v2/", &get_headers(), Duration::from_secs(30))
        .await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((Response::from_parts(parts, ()), body))
}

const OK_CL: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDocker-Content-Digest: sha256:x\r\n\r\nhello";

#[tokio::test]
async fn a_content_length_body_is_read_whole_and_its_connection_reused() {
    let up = upstream(vec![OK_CL, OK_CL, OK_CL], usize::MAX).await;
    let p = pool(up.port);
    for _ in 0..3 {
        let (resp, body) = get(&p, Method::GET).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(&body[..], b"hello");
        assert_eq!(resp.headers()["docker-content-digest"], "sha256:x");
    }
    assert_eq!(
        up.accepts.load(Ordering::SeqCst),
        1,
        "one connection for three requests"
    );
}

#[tokio::test]
async fn a_chunked_body_with_extensions_and_trailers_is_decoded_and_its_connection_reused() {
    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n";
    let up = upstream(vec![CHUNKED, OK_CL], usize::MAX).await;
    let p = pool(up.port);
    let (_, body) = get(&p, Method::GET).await.unwrap();
    assert_eq!(&body[..], b"hello, world");
    let (_, body) = get(&p, Method::GET).await.unwrap();
    assert_eq!(&body[..], b"hello");
    assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn connection_close_is_honoured() {
    const CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
    let up = upstream(vec![CLOSE, OK_CL], usize::MAX).await;
    let p = pool(up.port);
    get(&p, Method::GET).await.unwrap();
    get(&p, Method::GET).await.unwrap();
    assert_eq!(up.accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_replaced_without_an_error() {
    // The upstream closes after each answer without saying so.
    let up = upstream(vec![OK_CL, OK_CL, OK_CL], 1).await;
    let p = pool(up.port);
    for _ in 0..3 {
        let (_, body) = get(&p, Method::GET).await.unwrap();
        assert_eq!(&body[..], b"hello");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up.accepts.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_head_response_has_no_body_and_keeps_its_connection() {
    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 1245\r\n\r\n";
    let up = upstream(vec![HEAD, OK_CL], usize::MAX).await;
    let p = pool(up.port);
    let resp = p
        .send(
            &Method::HEAD,
            "/v2/",
            &get_headers(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(http_body::Body::is_end_stream(resp.body()));
    assert_eq!(resp.headers()["content-length"], "1245");
    let (_, body) = get(&p, Method::GET).await.unwrap();
    assert_eq!(&body[..], b"hello");
    assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn interim_responses_are_skipped() {
    const EARLY: &[u8] = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
    let up = upstream(vec![EARLY], usize::MAX).await;
    let (resp, body) = get(&pool(up.port), Method::GET).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(&body[..], b"hello");
}

#[tokio::test]
async fn a_body_until_close_is_read_to_the_close() {
    const UNTIL_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\n\r\nall of it";
    let up = upstream(vec![UNTIL_CLOSE], 1).await;
    let (_, body) = get(&pool(up.port), Method::GET).await.unwrap();
    assert_eq!(&body[..], b"all of it");
}

#[tokio::test]
async fn malformed_responses_are_errors_not_guesses() {
    for bad in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\n\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let up = upstream(vec![bad], usize::MAX).await;
        let p = pool(up.port);
        assert!(
            get(&p, Method::GET).await.is_err(),
            "{:?} was accepted",
            String::from_utf8_lossy(bad)
        );
    }
}

#[tokio::test]
async fn a_head_larger_than_the_limit_is_refused() {
    let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
    while big.len() <= MAX_HEAD {
        big.extend_from_slice(
            b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
        );
    }
    big.extend_from_slice(b"\r\n");
    let big: &'static [u8] = Box::leak(big.into_boxed_slice());
    let up = upstream(vec![big], usize::MAX).await;
    assert!(matches!(
        get(&pool(up.port), Method::GET).await,
        Err(Error::Malformed(_))
    ));
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_and_its_connection_is_not_reused() {
    const SHORT: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello";
    let up = upstream(vec![SHORT, OK_CL], 1).await;
    let p = pool(up.port);
    assert!(get(&p, Method::GET).await.is_err());
    let (_, body) = get(&p, Method::GET).await.unwrap();
    assert_eq!(&body[..], b"hello");
    assert_eq!(up.accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_body_dropped_before_its_end_closes_its_connection() {
    const LONG: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nhello";
    let up = upstream(vec![LONG, OK_CL], usize::MAX).await;
    let p = pool(up.port);
    let resp = p
        .send(
            &Method::GET,
            "/v2/",
            &get_headers(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    drop(resp);
    let (_, body) = get(&p, Method::GET).await.unwrap();
    assert_eq!(&body[..], b"hello");
    assert_eq!(up.accepts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_upstream_that_refuses_connections_is_a_connect_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    assert!(matches!(
        get(&pool(port), Method::GET).await,
        Err(Error::Connect { .. })
    ));
}

#[test]
fn the_request_head_is_written_as_given() {
    let mut out = BytesMut::new();
    let mut h = HeaderMap::new();
    h.insert(http::header::HOST, HeaderValue::from_static("r:5050"));
    h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
    encode_head(&Method::GET, "/v2/a/manifests/v1?x=1", &h, &mut out);
    assert_eq!(
        &out[..],
        b"GET /v2/a/manifests/v1?x=1 HTTP/1.1\r\nhost: r:5050\r\nx-forwarded-for: 10.0.0.1\r\n\r\n"
    );
}

#[tokio::test]
async fn chunk_sizes_with_leading_zeros_and_trailing_blanks_are_read() {
    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0000000000000000005 ;x=y\r\nhello\r\n000\r\n\r\n";
    let up = upstream(vec![CHUNKED], usize::MAX).await;
    let (_, body) = get(&pool(up.port), Method::GET).await.unwrap();
    assert_eq!(&body[..], b"hello");
}

#[tokio::test]
async fn only_get_and_head_are_sent() {
    let up = upstream(vec![OK_CL], usize::MAX).await;
    let p = pool(up.port);
    assert!(p
        .send(
            &Method::DELETE,
            "/v2/",
            &get_headers(),
            Duration::from_secs(30)
        )
        .await
        .is_err());
    assert_eq!(up.accepts.load(Ordering::SeqCst), 0, "nothing was sent");
}

#[tokio::test]
async fn idle_connections_the_upstream_closed_are_swept_without_traffic() {
    let up = upstream(vec![OK_CL], 1).await;
    let p = Pool::new(
        "127.0.0.1",
        up.port,
        Duration::from_secs(2),
        Duration::from_secs(60),
        Duration::from_secs(2),
    );
    get(&p, Method::GET).await.unwrap();
    assert_eq!(
        p.inner.idle.lock().unwrap().len(),
        1,
        "kept after its response"
    );
    // The upstream closed it; the sweep (every second here) lets it go with no request.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(p.inner.idle.lock().unwrap().len(), 0);
}

#[tokio::test]
async fn a_host_name_is_resolved_and_connected_to() {
    let up = upstream(vec![OK_CL], usize::MAX).await;
    let p = Pool::new(
        "localhost",
        up.port,
        Duration::from_secs(2),
        Duration::from_secs(60),
        Duration::from_secs(50),
    );
    let (_, body) = get(&p, Method::GET).await.unwrap();
    assert_eq!(&body[..], b"hello");
}

#[tokio::test]
async fn an_upstream_that_never_answers_is_a_head_timeout() {
    // Accepts and reads, never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut io, _) = listener.accept().await.unwrap();
        let mut sink = Vec::new();
        let _ = io.read_to_end(&mut sink).await;
    });
    let p = pool(port);
    let err = p
        .send(
            &Method::GET,
            "/v2/",
            &get_headers(),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::HeadTimeout(t) if t == Duration::from_millis(200)),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_pooled_connection_whose_last_deadline_passed_while_idle_serves_the_next_request() {
    // The connection's timer was armed for the first exchange; its deadline passes while the
    // connection sits in the pool. The next exchange must get a fresh deadline, not the
    // fired one.
    let up = upstream(vec![OK_CL, OK_CL], usize::MAX).await;
    let p = pool(up.port);
    let timeout = Duration::from_millis(300);
    let first = p
        .send(&Method::GET, "/v2/", &get_headers(), timeout)
        .await
        .unwrap();
    first.into_body().collect().await.unwrap();
    tokio::time::sleep(timeout * 3).await;
    let second = p
        .send(&Method::GET, "/v2/", &get_headers(), timeout)
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(
        up.accepts.load(Ordering::SeqCst),
        1,
        "the same connection, reused"
    );
}

#[test]
fn header_names_are_matched_case_insensitively_and_invalid_ones_refused() {
    for (raw, want) in [
        (&b"Docker-Content-Digest"[..], "docker-content-digest"),
        (
            b"DOCKER-DISTRIBUTION-API-VERSION",
            "docker-distribution-api-version",
        ),
        (b"Content-Type", "content-type"),
        (b"X-Registry-Own", "x-registry-own"),
    ] {
        assert_eq!(
            header_name(raw).map(|n| n.to_string()).as_deref(),
            Some(want)
        );
    }
    assert_eq!(header_name(b"bad name"), None);
    assert_eq!(
        header_name(b"Docker-Content-Digest2")
            .map(|n| n.to_string())
            .as_deref(),
        Some("docker-content-digest2")
    );
}
