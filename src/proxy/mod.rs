//! The forwarding path.
//!
//! One request goes through these phases, in order, over one [`Exchange`]:
//!
//! 1. **classify** the path (`route::classify`);
//! 2. **answer locally** what regguard owns (`GET /`, the nginx liveness answer);
//! 3. **forward**: rewrite the request head like the nginx front did (Host kept
//!    with its port, X-Forwarded-* set, client-chosen forwarding hosts dropped,
//!    hop-by-hop headers removed) and stream the body to the pooled upstream;
//! 4. **relay** the response head and stream its body back;
//! 5. **log and count** when the response body ends or is dropped.
//!
//! Nothing here waits on anything but the client and the upstream.
//!
//! It knows nothing of how manifests are judged: the tap hands them to validation through
//! the validator's queue, and the push path needs only the gate's verdict.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::Tap;
use crate::body::{Direction, Metered, ResponseBody, Tally};
use crate::checker::RefKind;
use crate::config::Upstream;
use crate::error::ForwardError;
use crate::gate::{Gate, GateMode, OnCheckError, Verdict};
use crate::metrics::{method_index, ErrorKind, Metrics};
use crate::oci::{self, ManifestKind};
use crate::route::{self, RouteKind};
use crate::upstream::UpstreamBody;
use crate::upstream::{BulkPermit, Pools};
use crate::validate::{Job, Validator};

mod headers;
mod push;
mod send;
mod tap;
use send::Via;
mod upload;
mod vault;

use crate::watch::UpstreamWatch;
pub use headers::{remove_hop_by_hop, rewrite_request_headers, Forwarding};
pub use vault::SERVED_FROM;

/// What the proxy knows about the client connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub tls: bool,
    /// The peer is a proxy listed in `trusted_proxies`: its X-Forwarded-Proto and X-Real-IP stand.
    pub trusted: bool,
}

/// Who a request is from, as logged: the peer, or, behind a trusted proxy, the
/// client that proxy names (nginx's `real_ip_header` with `set_real_ip_from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAddr {
    /// The peer of the connection.
    Peer(SocketAddr),
    /// Named by a trusted proxy in `X-Real-IP` or `X-Forwarded-For`.
    Forwarded(IpAddr),
}

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientAddr::Peer(a) => a.fmt(f),
            ClientAddr::Forwarded(ip) => ip.fmt(f),
        }
    }
}

impl ClientAddr {
    /// The client of a request on `conn`. Only a peer in `trusted` is believed: its
    /// `X-Real-IP`, else the last `X-Forwarded-For` address that is not itself a
    /// trusted proxy (the ones before it are the client's to invent).
    pub fn of(conn: ConnInfo, headers: &http::HeaderMap, trusted: &[IpAddr]) -> Self {
        if !conn.trusted {
            return ClientAddr::Peer(conn.remote);
        }
        let real_ip = headers
            .get("x-real-ip")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<IpAddr>().ok());
        let forwarded = || {
            let mut hops: Vec<&str> = headers
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .collect();
            hops.reverse();
            hops.into_iter()
                .map(|h| h.trim().parse::<IpAddr>())
                .take_while(Result::is_ok)
                .flatten()
                .find(|ip| !trusted.contains(ip))
        };
        real_ip
            .or_else(forwarded)
            .map_or(ClientAddr::Peer(conn.remote), ClientAddr::Forwarded)
    }
}

/// The forwarding path's shared state.
pub struct Proxy {
    upstream: Upstream,
    pools: Pools,
    metrics: Arc<Metrics>,
    idle_timeout: Duration,
    access_log: bool,
    connect_timeout: Duration,
    validation: Option<Validation>,
    gate: Option<Arc<Gate>>,
    /// Told when the upstream cannot be reached, and when it answers.
    watch: Option<Arc<UpstreamWatch>>,
    /// Peers whose forwarding headers name the client (`trusted_proxies`).
    trusted_proxies: Arc<[IpAddr]>,
    /// Keeps what passes through (pushed and pulled manifests).
    vault: Option<Arc<crate::vault::Vault>>,
    /// Answers the registry's 404s from the vault (`[heal] serve`).
    serving: Option<Arc<crate::heal::Serving>>,
    /// Small uploads in progress, copied for the vault.
    uploads: Option<upload::Uploads>,
}

/// Timeouts and logging of the forwarding path.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    pub access_log: bool,
}

/// Serve-time validation, as the forwarding path sees it: where to hand jobs.
#[derive(Clone)]
pub struct Validation {
    pub validator: Arc<Validator>,
    /// Also validate image manifests (their config and layers), not only indexes.
    pub blobs: bool,
}

impl Proxy {
    pub fn new(
        upstream: Upstream,
        pools: Pools,
        metrics: Arc<Metrics>,
        timing: Timing,
        validation: Option<Validation>,
        gate: Option<Arc<Gate>>,
    ) -> Self {
        let Timing {
            idle_timeout,
            connect_timeout,
            access_log,
        } = timing;
        Proxy {
            upstream,
            pools,
            metrics,
            idle_timeout,
            access_log,
            connect_timeout,
            validation,
            gate,
            watch: None,
            trusted_proxies: Arc::new([]),
            vault: None,
            serving: None,
            uploads: None,
        }
    }

    /// Keeps pushed and pulled manifests in `vault`; with `serving`, answers 404s from it.
    pub fn with_vault(
        mut self,
        vault: Arc<crate::vault::Vault>,
        serving: Option<Arc<crate::heal::Serving>>,
    ) -> Self {
        self.vault = Some(vault);
        self.serving = serving;
        self.uploads = Some(upload::uploads());
        self
    }

    /// Logs the client a trusted proxy names rather than the proxy (see [`ClientAddr::of`]).
    pub fn with_trusted_proxies(mut self, trusted: &[IpAddr]) -> Self {
        self.trusted_proxies = trusted.into();
        self
    }

    /// Reports the upstream's reachability to `watch`.
    pub fn with_watch(mut self, watch: Arc<UpstreamWatch>) -> Self {
        self.watch = Some(watch);
        self
    }

    /// Handles one client request; never fails (failures become OCI error responses).
    // A plain fn returning an `async move` block rather than an `async fn`: an async fn
    // keeps its arguments twice in its state (as passed and as moved into locals), and this
    // future is moved whole several times per request.
    #[allow(clippy::manual_async_fn)] // deliberate: see the comment above
    pub fn handle(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl std::future::Future<Output = Response<ResponseBody>> + Send + '_ {
        async move {
            let started = Instant::now();
            // Classified as the registry's router will see it (percent-decoded); forwarded as sent.
            let decoded = route::decode_path(req.uri().path());
            let route = match &decoded {
                Ok(path) => route::classify(path),
                Err(_) => route::classify(""),
            };
            let route_kind = route.kind;
            // A name outside the registry's grammar is the registry's to redirect or refuse:
            // neither gated nor validated (checks under it would only be redirected too).
            let named = route.repository.is_some_and(route::is_repository_name);
            let (upload, request_tap) =
                match named.then(|| self.upload_copy(&req, &route)).flatten() {
                    Some((copy, tap)) => (Some(copy), tap),
                    None => (None, None),
                };
            let mut exchange = Exchange {
                metrics: self.metrics.clone(),
                tally: Arc::new(Tally::default()),
                method: req.method().clone(),
                route: route.kind,
                repository: route.repository.map(str::to_owned),
                client: ClientAddr::of(conn, req.headers(), &self.trusted_proxies),
                started,
                status: None,
                error: None,
                access_log: self.access_log,
                _bulk: None,
            };

            let read = self.read_ctx(&req, &route).filter(|_| named);
            let ask = self.vault_ask(&req, &route).filter(|_| named);
            // A whole blob GET (no Range): with `vault.layers`, copied into the vault as it streams.
            let whole_blob = (named
                && route_kind == RouteKind::Blob
                && *req.method() == Method::GET
                && self.vault.as_ref().is_some_and(|v| v.settings().layers)
                && !req.headers().contains_key(header::RANGE))
            .then(|| route.reference.unwrap_or("").to_owned());
            // A DELETE by digest that the registry carries out takes it out of the vault too: it
            // was deleted on purpose and must not be served back.
            let forgetting = (*req.method() == Method::DELETE
                && matches!(route_kind, RouteKind::Manifest | RouteKind::Blob)
                && named
                && self.vault.is_some())
            .then(|| route.reference.unwrap_or("").to_owned())
            .filter(|r| oci::is_sha256_digest(r));
            // A DELETE by digest that the registry carries out is evidence for validation.
            let deleting = (*req.method() == Method::DELETE
                && matches!(route_kind, RouteKind::Manifest | RouteKind::Blob)
                && named
                && self.validation.is_some())
            .then(|| req.headers().get(header::AUTHORIZATION).cloned());
            let gated = match (&self.gate, route_kind, req.method()) {
                (Some(g), RouteKind::Manifest, &Method::PUT)
                    if g.settings.mode != GateMode::Off && named =>
                {
                    Some((g.clone(), route.reference.unwrap_or("").to_owned()))
                }
                _ => None,
            };
            // What waits on the vault after the registry answered (rare), done after the
            // answer's match so that no response is held across an await inside it.
            let mut follow_up = None;
            let mut response = if let Err(e) = &decoded {
                crate::error::oci_error(StatusCode::BAD_REQUEST, "NAME_INVALID", &e.to_string())
            } else if !req.headers().contains_key(header::HOST) && req.uri().authority().is_none() {
                // As nginx does: without Host the registry would mint Location URLs naming
                // its own internal address.
                crate::error::oci_error(
                    StatusCode::BAD_REQUEST,
                    "UNSUPPORTED",
                    "the request has no Host header",
                )
            } else if route_kind == RouteKind::Root
                && matches!(*req.method(), Method::GET | Method::HEAD)
            {
                liveness()
            } else {
                let forwarded = match gated {
                    Some((gate, reference)) => {
                        // Boxed, as are the other rare branches below: the request future
                        // is moved whole several times per request, and these states would
                        // make every manifest GET's future kilobytes larger.
                        Box::pin(self.gated_push(&gate, &reference, req, conn, &mut exchange)).await
                    }
                    None => {
                        let copies = Copies {
                            request: request_tap,
                            whole_blob: whole_blob.as_deref(),
                        };
                        self.forward(req, conn, &mut exchange, copies).await
                    }
                };
                match forwarded {
                    Ok(mut resp) => {
                        let repository = exchange.repository.as_deref().unwrap_or("");
                        if let Some(read) = read {
                            self.tap_response(read, repository, &mut resp);
                        }
                        if let (Some(auth), Some(v)) = (&deleting, &self.validation) {
                            if resp.status() == StatusCode::ACCEPTED {
                                v.validator.deleted(repository, auth.as_ref());
                            }
                        }
                        if let Some(copy) = upload {
                            let range = resp.headers().get(header::RANGE);
                            self.upload_answered(copy, resp.status(), range);
                        }
                        // What waits on the vault is rare (a DELETE it carried out, a 404
                        // it may answer) and runs boxed: no response is held across an await
                        // in this future, which would make every request's future larger.
                        let forget = forgetting.filter(|_| resp.status() == StatusCode::ACCEPTED);
                        let ask = ask.filter(|_| resp.status() == StatusCode::NOT_FOUND);
                        if forget.is_some() || ask.is_some() {
                            follow_up = Some((forget, ask));
                        }
                        resp
                    }
                    Err(e) => {
                        self.metrics.upstream_error(e.kind());
                        exchange.error = Some(e.kind());
                        tracing::warn!(
                            route = route_kind.as_str(),
                            client = %exchange.client,
                            error = %e,
                            "forwarding failed"
                        );
                        e.to_response()
                    }
                }
            };
            if let Some((forget, ask)) = follow_up {
                let repository = exchange.repository.as_deref().unwrap_or("");
                response = Box::pin(self.vault_after(response, forget, ask, repository)).await;
            }
            exchange.status = Some(response.status());
            self.metrics
                .observe_header_latency(exchange.route, started.elapsed().as_secs_f64());
            response.body_mut().attach(exchange);
            response
        }
    }

    /// After the registry answered: a digest it deleted leaves the vault (`forget`), and a
    /// 404 is answered from the vault if it holds the bytes (`ask`).
    async fn vault_after(
        &self,
        resp: Response<ResponseBody>,
        forget: Option<String>,
        ask: Option<vault::VaultAsk>,
        repository: &str,
    ) -> Response<ResponseBody> {
        if let (Some(digest), Some(vault)) = (forget, &self.vault) {
            vault.forget(repository, &digest).await;
        }
        if let Some(ask) = ask {
            if let Some(answer) = self.answer_from_vault(ask, repository).await {
                return answer;
            }
        }
        resp
    }

    /// Phase 3: forwards the request, taking the side copies the vault asked for.
    // A plain fn returning an `async move` block: see `handle`.
    #[allow(clippy::manual_async_fn)] // deliberate: see the comment above
    fn forward<'a>(
        &'a self,
        req: Request<Incoming>,
        conn: ConnInfo,
        exchange: &'a mut Exchange,
        copies: Copies<'a>,
    ) -> impl std::future::Future<Output = Result<Response<ResponseBody>, ForwardError>> + Send + 'a
    {
        // The synchronous part runs when the future is made, so the request itself is
        // not kept in the future's state next to its parts.
        let tally = exchange.tally.clone();
        let bodiless = http_body::Body::is_end_stream(req.body());
        let blob_get = exchange.route == RouteKind::Blob && req.method() == Method::GET;
        let via = match self.pools.direct() {
            // Bodiless requests other than blob downloads (manifests, tags, catalog, every
            // HEAD) take the lean client (see `h1`); blob downloads keep the large reads
            // and the HTTP/2 relay of the pooled client.
            Some(direct)
                if bodiless
                    && !blob_get
                    && copies.request.is_none()
                    && matches!(*req.method(), Method::GET | Method::HEAD) =>
            {
                Via::Direct(direct)
            }
            // Blob downloads get large upstream reads while the bulk budget lasts (see `upstream`).
            _ if blob_get => match self.pools.try_bulk() {
                Some((client, permit)) => {
                    exchange._bulk = Some(permit);
                    Via::Pooled(client)
                }
                None => Via::Pooled(self.pools.lean()),
            },
            _ => Via::Pooled(self.pools.lean()),
        };
        let (head, body) = req.into_parts();
        if bodiless {
            tally.request_done.notify_one(); // nothing to send: the wait starts now
        }
        let h2_download = head.version == Version::HTTP_2
            && exchange.route == RouteKind::Blob
            && head.method == Method::GET;
        async move {
            let mut resp = match via {
                // The manifest path: kept lean (its future is moved whole several times per
                // request), with no request body to carry.
                Via::Direct(direct) => {
                    drop(body); // bodiless: ended already
                    self.send_direct(direct, head, conn, tally).await?
                }
                // Boxed: the pooled path's state (a select over the request and its deadline)
                // would double the size of every request's future.
                Via::Pooled(client) => {
                    let body =
                        Metered::new(body, self.idle_timeout, tally.clone(), Direction::Request);
                    let body = match copies.request {
                        Some(tap) => UpstreamBody::Tapped { body, tap },
                        None => UpstreamBody::Client { body },
                    };
                    Box::pin(self.send_pooled(client, head, body, conn, tally)).await?
                }
            };
            // A whole blob the vault keeps (`vault.layers`): copied as it streams to the client
            // (attached before an HTTP/2 download is handed to its relay task, which feeds it).
            if let (Some(vault), Some(digest), Some(repository)) = (
                &self.vault,
                copies.whole_blob,
                exchange.repository.as_deref(),
            ) {
                if resp.status() == StatusCode::OK
                    && !resp.headers().contains_key(header::CONTENT_RANGE)
                {
                    if let Some(tee) = vault.tee_blob(repository, digest) {
                        resp.body_mut().tee(tee);
                    }
                }
            }
            if !h2_download {
                return Ok(resp);
            }
            // One HTTP/2 stream can stall while its connection stays busy: see `body::Relay`.
            let keep = exchange
                ._bulk
                .take()
                .map(|p| Box::new(p) as Box<dyn std::any::Any + Send>);
            let stalled = self.metrics.clone();
            let remote = conn.remote;
            Ok(resp.map(|b| {
                b.relayed(self.idle_timeout, keep, move || {
                    stalled.connections_write_stalled.inc();
                    tracing::debug!(client = %remote, "HTTP/2 stream stalled by its client: cut");
                })
            }))
        }
    }
}

/// `GET /` on the public listener, as the nginx front answered it.
fn liveness() -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(Bytes::from_static(b"ok")));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

/// The side copies one forwarded request takes for the vault.
struct Copies<'a> {
    /// Of the request body (a small blob upload).
    request: Option<Tap>,
    /// Of the response body, if the registry answers 200 with the whole blob (this digest).
    whole_blob: Option<&'a str>,
}

/// One request/response exchange: counted and logged once, when it ends.
///
/// Created when the request arrives; moved into the response body once the
/// head is known. Dropped when the body has been sent, or earlier when the
/// client goes away; either way `Drop` writes the one log line and the counters.
pub struct Exchange {
    metrics: Arc<Metrics>,
    tally: Arc<Tally>,
    method: Method,
    route: RouteKind,
    repository: Option<String>,
    client: ClientAddr,
    started: Instant,
    status: Option<StatusCode>,
    error: Option<ErrorKind>,
    access_log: bool,
    /// Held for the life of a bulk blob download (released with the exchange).
    _bulk: Option<BulkPermit>,
}

impl crate::body::ExchangeRecord for Exchange {
    fn tally(&self) -> &Tally {
        &self.tally
    }
}

impl Exchange {
    fn outcome(&self) -> &'static str {
        if self.status.is_none() {
            return "client_closed";
        }
        if self.tally.request_failed.load(Ordering::Relaxed) {
            return "request_body_failed";
        }
        if self.tally.response_failed.load(Ordering::Relaxed) {
            return "response_body_failed";
        }
        if self.tally.response_complete.load(Ordering::Relaxed) {
            "complete"
        } else {
            "client_closed"
        }
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let bytes_in = self.tally.bytes_in.load(Ordering::Relaxed);
        let bytes_out = self.tally.bytes_out.load(Ordering::Relaxed);
        let outcome = self.outcome();
        self.metrics.observe_exchange(
            method_index(&self.method),
            self.route,
            self.status,
            bytes_in,
            bytes_out,
        );
        if self.tally.response_failed.load(Ordering::Relaxed) {
            self.metrics.upstream_error(ErrorKind::UpstreamBody);
        }
        if self.access_log {
            tracing::info!(
                target: "regguard::access",
                method = %self.method,
                route = self.route.as_str(),
                repository = self.repository.as_deref().unwrap_or(""),
                status = self.status.map_or(0, |s| s.as_u16()),
                bytes_in,
                bytes_out,
                duration_ms = millis(self.started.elapsed()),
                client = %self.client,
                outcome,
                error = self.error.map_or("", ErrorKind::as_str),
                "request"
            );
        }
    }
}

/// Milliseconds rounded to two decimals, for the access log: `2.71`, not `2.7143420000000003`.
/// Still a number, so the JSON log keeps a number for dashboards to sum.
fn millis(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 100_000.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::millis;
    use std::time::Duration;

    #[test]
    fn access_log_milliseconds_have_two_decimals() {
        assert_eq!(
            format!("{:?}", millis(Duration::from_nanos(2_714_342))),
            "2.71"
        );
        assert_eq!(format!("{:?}", millis(Duration::from_micros(1_500))), "1.5");
        assert_eq!(format!("{:?}", millis(Duration::from_secs(3))), "3000.0");
        assert_eq!(
            serde_json::to_string(&millis(Duration::from_nanos(999_999))).unwrap(),
            "1.0"
        );
    }
}
