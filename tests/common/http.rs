//! A small synchronous HTTP client for tests, over hyper, with streaming
//! bodies for GiB-sized blobs (generated and hashed on the fly, never held).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};

pub type BoxBody =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// The runtime the synchronous helpers drive.
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

pub fn client() -> &'static Client<HttpConnector, BoxBody> {
    static C: OnceLock<Client<HttpConnector, BoxBody>> = OnceLock::new();
    C.get_or_init(|| {
        let _guard = rt().enter();
        Client::builder(TokioExecutor::new()).build_http()
    })
}

pub fn full(b: impl Into<Bytes>) -> BoxBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A response with its whole body.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

/// Sends one request and reads the whole response.
pub fn send(method: &str, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Resp {
    send_body(method, url, headers, full(body))
}

pub fn send_body(method: &str, url: &str, headers: &[(&str, &str)], body: BoxBody) -> Resp {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).unwrap())
        .uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(body).unwrap();
    rt().block_on(async {
        let resp = client()
            .request(req)
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e:?}"));
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Resp {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    })
}

pub fn get(url: &str) -> Resp {
    send("GET", url, &[], Bytes::new())
}

pub fn get_text(url: &str) -> String {
    let r = get(url);
    assert_eq!(r.status, 200, "GET {url}: {}", r.text());
    r.text()
}

/// Deterministic blob content: 1 MiB chunks of a fixed pseudo-random pattern,
/// each stamped with its index so no two chunks are equal.
pub const CHUNK: usize = 1024 * 1024;

fn base_chunk() -> &'static [u8] {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..CHUNK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    })
}

/// Chunk `index` of the pattern.
pub fn pattern_chunk(index: u64) -> Bytes {
    let mut v = base_chunk().to_vec();
    v[..8].copy_from_slice(&index.to_le_bytes());
    Bytes::from(v)
}

/// The pattern's bytes in `[offset, offset + len)`.
pub fn pattern_range(offset: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut pos = offset;
    while pos < offset + len {
        let chunk = pattern_chunk(pos / CHUNK as u64);
        let start = (pos % CHUNK as u64) as usize;
        let take = ((offset + len - pos) as usize).min(CHUNK - start);
        out.extend_from_slice(&chunk[start..start + take]);
        pos += take as u64;
    }
    out
}

/// The sha256 digest (`sha256:<hex>`) of the first `total` bytes of the pattern.
pub fn pattern_digest(total: u64) -> String {
    let mut h = Sha256::new();
    let mut pos = 0;
    while pos < total {
        let c = pattern_chunk(pos / CHUNK as u64);
        let take = ((total - pos) as usize).min(CHUNK);
        h.update(&c[..take]);
        pos += take as u64;
    }
    format!("sha256:{}", hex(&h.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

/// A request body that generates the pattern as it is polled: no size hint
/// (so it goes chunked) unless `exact` is set.
pub struct PatternBody {
    pos: u64,
    total: u64,
    exact: bool,
}

impl PatternBody {
    pub fn chunked(total: u64) -> BoxBody {
        PatternBody {
            pos: 0,
            total,
            exact: false,
        }
        .boxed()
    }
    pub fn sized(total: u64) -> BoxBody {
        PatternBody {
            pos: 0,
            total,
            exact: true,
        }
        .boxed()
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.pos >= self.total {
            return Poll::Ready(None);
        }
        let c = pattern_chunk(self.pos / CHUNK as u64);
        let take = ((self.total - self.pos) as usize).min(CHUNK);
        self.pos += take as u64;
        Poll::Ready(Some(Ok(Frame::data(c.slice(..take)))))
    }
    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.total - self.pos)
        } else {
            SizeHint::default()
        }
    }
    fn is_end_stream(&self) -> bool {
        self.exact && self.pos >= self.total
    }
}

/// GETs `url` streaming, hashing as it goes; returns (status, byte count, digest).
pub fn get_hashed(url: &str, headers: &[(&str, &str)]) -> (u16, u64, String) {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(full(Bytes::new())).unwrap();
    rt().block_on(async {
        let resp = client().request(req).await.unwrap();
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut h = Sha256::new();
        let mut n = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                n += data.len() as u64;
                h.update(&data);
            }
        }
        (status, n, format!("sha256:{}", hex(&h.finalize())))
    })
}

/// Resolves a registry `Location` (absolute or relative) against `base`, and appends `extra` query.
pub fn location_url(base: &str, location: &str, extra: &str) -> String {
    let abs = if location.starts_with("http") {
        location.to_string()
    } else {
        format!("{base}{location}")
    };
    if extra.is_empty() {
        abs
    } else if abs.contains('?') {
        format!("{abs}&{extra}")
    } else {
        format!("{abs}?{extra}")
    }
}

/// An HTTPS request to `addr` trusting only `root_der`, over HTTP/1.1 or HTTP/2 (by ALPN).
pub fn https_send(
    addr: std::net::SocketAddr,
    root_der: &[u8],
    h2: bool,
    req: Request<Full<Bytes>>,
) -> (String, Resp) {
    rt().block_on(async move {
        let connector = tls_connector(root_der, if h2 { b"h2" } else { b"http/1.1" });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = connector.connect(name, tcp).await.unwrap();
        let alpn = tls
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let io = TokioIo::new(tls);
        let resp = if h2 {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            send.send_request(req).await.unwrap()
        };
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            alpn,
            Resp {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            },
        )
    })
}

/// A TLS client trusting only `root_der`, offering one ALPN protocol.
pub fn tls_connector(root_der: &[u8], alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(root_der.to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}
