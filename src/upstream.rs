//! The connection pools to the registry.
//!
//! Two hyper-util clients with different read-buffer ceilings share one
//! connector. Their connector resolves the upstream host name for every new
//! connection, so a recreated registry container is found at its new address
//! once the old pooled connections close; pooled connections are dropped after
//! `POOL_IDLE` of disuse.
//!
//! Why two: relaying a blob costs CPU mostly in the kernel, per read and write
//! syscall, so large reads roughly halve the CPU per GiB (measured on loopback:
//! about 0.27 CPU-s/GiB with reads of up to 1 MiB, 0.45 with 64-128 KiB). But a
//! large buffer per stream multiplies by the number of streams. So large reads
//! are a budget: up to [`BULK_STREAMS`] blob downloads at a time use the bulk
//! pool; beyond that, and for everything else (manifests, uploads, tags), the
//! lean pool. Memory stays bounded with hundreds of concurrent pulls, and the
//! common case (a few large pulls) gets the cheap path.
//!
//! It knows nothing of routes, checks or validation: it carries requests and bodies.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::body::{full_hint, poll_full, BoxError, Metered};

pin_project_lite::pin_project! {
    /// The body of a request regguard sends upstream.
    #[project = UpstreamBodyProj]
    pub enum UpstreamBody {
        /// A client's body, streamed through.
        Client { #[pin] body: Metered<Incoming> },
        /// Bytes regguard holds (a manifest it has read, or nothing).
        Full { data: Option<Bytes> },
        /// A client's body, streamed through, with a copy taken aside (a small blob upload
        /// the vault keeps).
        Tapped { #[pin] body: Metered<Incoming>, tap: crate::body::Tap },
        /// A stream regguard produces (a blob re-uploaded from the vault).
        Stream { #[pin] body: http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError> },
    }
}

impl UpstreamBody {
    /// No body (HEAD/GET checks, readiness probes).
    pub fn empty() -> Self {
        UpstreamBody::Full { data: None }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            UpstreamBodyProj::Client { body } => body.poll_frame(cx),
            UpstreamBodyProj::Full { data } => poll_full(data),
            UpstreamBodyProj::Stream { body } => body.poll_frame(cx),
            UpstreamBodyProj::Tapped { mut body, tap } => {
                let polled = body.as_mut().poll_frame(cx);
                crate::body::feed(tap, &polled, body.is_end_stream());
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Client { body } => body.is_end_stream(),
            UpstreamBody::Full { data } => data.as_ref().is_none_or(|d| d.is_empty()),
            UpstreamBody::Stream { body } => body.is_end_stream(),
            UpstreamBody::Tapped { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Client { body } => body.size_hint(),
            UpstreamBody::Full { data } => full_hint(data),
            UpstreamBody::Stream { body } => body.size_hint(),
            UpstreamBody::Tapped { body, .. } => body.size_hint(),
        }
    }
}

/// The upstream client type. The connector speaks plain HTTP and, for `https://`
/// registries, TLS (rustls): SNI and certificate verification use the URL's host name.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, UpstreamBody>;

/// How a registry's certificate is verified.
#[derive(Debug, Clone)]
pub enum TlsVerify {
    /// The system's CA store.
    System,
    /// These roots only (`upstream_ca`, as nginx's `proxy_ssl_trusted_certificate`).
    Roots(Arc<rustls::RootCertStore>),
    /// No verification (`--insecure`): for registries with self-signed certificates.
    None,
}

/// How long an unused pooled connection is kept. Proxies and load balancers
/// between regguard and the registry commonly close idle connections after
/// 60 s; staying under that means we rarely pick a connection being closed.
const POOL_IDLE: Duration = Duration::from_secs(50);

/// TCP keepalive probes on upstream connections, so a silently vanished peer
/// (container gone without a RST) is noticed during a long idle transfer.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Read-buffer ceiling of the bulk pool: reads of up to 1 MiB. Beyond this the
/// gain flattens (2 MiB: 0.25 CPU-s/GiB; 4 MiB: 0.28) while memory per stream grows.
pub const BULK_READ_BUF: usize = 1024 * 1024;

/// Read-buffer ceiling of the lean pool. hyper grows its read buffer from 8 KiB
/// up to this as reads fill it; 64 KiB keeps a stream's footprint near 80 KiB.
pub const LEAN_READ_BUF: usize = 64 * 1024;

/// Blob downloads that may use the bulk pool at once (about 1.5 MiB each at full speed).
pub const BULK_STREAMS: usize = 8;

/// The `User-Agent` of requests regguard makes on its own behalf.
pub fn user_agent() -> http::HeaderValue {
    http::HeaderValue::from_static(concat!("regguard/", env!("CARGO_PKG_VERSION")))
}

/// A request regguard makes on its own behalf (checks, vault fills, repairs): the upstream's
/// URI and Host, regguard's User-Agent, and the credentials of whoever it acts for.
pub fn own_request(
    upstream: &crate::config::Upstream,
    method: http::Method,
    path_and_query: &str,
    auth: Option<&http::HeaderValue>,
    body: UpstreamBody,
) -> Result<http::Request<UpstreamBody>, http::Error> {
    let mut req = http::Request::builder()
        .method(method)
        .uri(upstream.uri_for(path_and_query)?)
        .header(http::header::HOST, upstream.host_header.clone())
        .header(http::header::USER_AGENT, user_agent())
        .body(body)?;
    if let Some(a) = auth {
        req.headers_mut()
            .insert(http::header::AUTHORIZATION, a.clone());
    }
    Ok(req)
}

/// The two pools and the bulk budget, once per serving thread.
///
/// A pooled connection is a task on the runtime that dialled it. Each serving thread runs
/// its own single-threaded runtime (see `server`), so each has its own pair of pools: a
/// request is written and its response read by the thread that serves the client, with no
/// wake-up of another thread in between (as nginx keeps upstream connections per worker).
/// Shard 0 belongs to every other thread (background work, the CLI).
#[derive(Clone)]
pub struct Pools {
    /// Shard 0: every thread that is not a serving thread.
    first: Shard,
    /// One shard per serving thread.
    workers: Arc<[Shard]>,
    bulk_in_use: Arc<AtomicUsize>,
    connector: HttpsConnector<HttpConnector>,
    connect_timeout: Duration,
}

#[derive(Clone)]
struct Shard {
    lean: UpstreamClient,
    bulk: UpstreamClient,
    /// The lean HTTP/1.1 client for bodiless requests, when the registry speaks plain HTTP.
    direct: Option<crate::h1::Pool>,
}

impl Shard {
    fn new(connector: &HttpsConnector<HttpConnector>) -> Self {
        Shard {
            lean: build(connector.clone(), LEAN_READ_BUF),
            bulk: build(connector.clone(), BULK_READ_BUF),
            direct: None,
        }
    }
}

std::thread_local! {
    /// Which shard this thread uses: 0 unless [`Pools::enter_worker`] said otherwise.
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A claim on one bulk stream; released when dropped (when the response body ends).
pub struct BulkPermit(Arc<AtomicUsize>);

impl Drop for BulkPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pools {
    /// Builds both pools (HTTPS verified against the system's CA store).
    pub fn new(connect_timeout: Duration) -> Self {
        Self::with_tls(connect_timeout, TlsVerify::System)
    }

    /// Builds both pools with the given certificate verification for `https://` upstreams.
    pub fn with_tls(connect_timeout: Duration, verify: TlsVerify) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(TCP_KEEPALIVE));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(verify))
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Pools {
            first: Shard::new(&connector),
            workers: Arc::new([]),
            bulk_in_use: Arc::new(AtomicUsize::new(0)),
            connector,
            connect_timeout,
        }
    }

    /// The same pools with a shard for each of `workers` serving threads besides shard 0,
    /// each with its own [`crate::h1`] client when `upstream` is plain HTTP. The bulk
    /// budget stays one budget across all of them.
    pub fn with_workers(self, workers: usize, upstream: &crate::config::Upstream) -> Self {
        let direct = || {
            (upstream.scheme == http::uri::Scheme::HTTP).then(|| {
                crate::h1::Pool::new(
                    upstream.authority.host(),
                    upstream.authority.port_u16().unwrap_or(80),
                    self.connect_timeout,
                    TCP_KEEPALIVE,
                    POOL_IDLE,
                )
            })
        };
        let workers = (0..workers)
            .map(|_| Shard {
                direct: direct(),
                ..Shard::new(&self.connector)
            })
            .collect();
        Pools { workers, ..self }
    }

    /// Makes the calling thread use shard `worker + 1` of every `Pools` from now on. Called
    /// once by each serving thread before it serves.
    pub fn enter_worker(worker: usize) {
        SHARD.with(|s| s.set(worker + 1));
    }

    fn shard(&self) -> &Shard {
        let i = SHARD.with(|s| s.get());
        i.checked_sub(1)
            .and_then(|w| self.workers.get(w))
            .unwrap_or(&self.first)
    }

    /// The lean client of this thread for bodiless requests, if there is one (serving
    /// threads, plain-HTTP registry).
    pub fn direct(&self) -> Option<&crate::h1::Pool> {
        self.shard().direct.as_ref()
    }

    /// The client for small exchanges and for regguard's own requests.
    pub fn lean(&self) -> &UpstreamClient {
        &self.shard().lean
    }

    /// The bulk client with a permit, if the budget allows; else `None`.
    pub fn try_bulk(&self) -> Option<(&UpstreamClient, BulkPermit)> {
        let prev = self.bulk_in_use.fetch_add(1, Ordering::Relaxed);
        let permit = BulkPermit(self.bulk_in_use.clone());
        (prev < BULK_STREAMS).then_some((&self.shard().bulk, permit))
    }
}

fn tls_config(verify: TlsVerify) -> rustls::ClientConfig {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = match rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b,
        // The ring provider supports the default versions; this branch is unreachable in practice.
        Err(_) => {
            return rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        }
    };
    match verify {
        TlsVerify::System => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        TlsVerify::Roots(roots) => builder.with_root_certificates(roots).with_no_client_auth(),
        TlsVerify::None => builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(NoVerify(provider)))
            .with_no_client_auth(),
    }
}

/// Accepts any certificate (`--insecure`); signatures are still checked for well-formedness.
#[derive(Debug)]
struct NoVerify(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn build(connector: HttpsConnector<HttpConnector>, read_buf_max: usize) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE)
        // The proxy sets Host itself: the client's, with its port (see proxy::rewrite_request_headers).
        .set_host(false)
        .http1_max_buf_size(read_buf_max)
        .build(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bulk_budget_is_bounded_and_released_on_drop() {
        let pools = Pools::new(Duration::from_secs(1));
        let permits: Vec<_> = (0..BULK_STREAMS)
            .map(|_| pools.try_bulk().unwrap().1)
            .collect();
        assert!(pools.try_bulk().is_none(), "budget exhausted");
        drop(permits);
        assert!(pools.try_bulk().is_some(), "budget released");
    }
}
