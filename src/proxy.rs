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

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::body::Tap;
use crate::body::{Direction, Metered, ResponseBody, Tally, UpstreamBody};
use crate::checker::RefKind;
use crate::config::Upstream;
use crate::error::ForwardError;
use crate::gate::{Gate, GateMode, OnCheckError, Verdict};
use crate::metrics::{method_index, Metrics};
use crate::oci::{self, ManifestKind};
use crate::route::{self, RouteKind};
use crate::upstream::{BulkPermit, Pools};
use crate::validate::{Job, Validator};
use crate::watch::UpstreamWatch;

/// What the proxy knows about the client connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub tls: bool,
    /// The peer is a proxy listed in `trusted_proxies`: its X-Forwarded-Proto and X-Real-IP stand.
    pub trusted: bool,
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

/// What the response tap needs to know about a manifest or blob read
/// (the repository is the exchange's own copy).
struct ReadCtx {
    kind: RefKind,
    reference: String,
    auth: Option<HeaderValue>,
    /// The client's `Accept`: a 404 for an OCI manifest is conclusive only if it names the type.
    accept: Option<HeaderValue>,
    /// The client's `If-None-Match`: a 304 carries no digest, but matched one of these.
    if_none_match: Option<HeaderValue>,
    head: bool,
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
        }
    }

    /// Reports the upstream's reachability to `watch`.
    pub fn with_watch(mut self, watch: Arc<UpstreamWatch>) -> Self {
        self.watch = Some(watch);
        self
    }

    /// Handles one client request; never fails (failures become OCI error responses).
    pub async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<ResponseBody> {
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
        let mut exchange = Exchange {
            metrics: self.metrics.clone(),
            tally: Arc::new(Tally::default()),
            method: req.method().clone(),
            route: route.kind,
            repository: route.repository.map(str::to_owned),
            client: conn.remote,
            started,
            status: None,
            error: None,
            access_log: self.access_log,
            _bulk: None,
        };

        let read = self.read_ctx(&req, &route).filter(|_| named);
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
                    self.gated_push(&gate, &reference, req, conn, &mut exchange)
                        .await
                }
                None => self.forward(req, conn, &mut exchange).await,
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
                    resp
                }
                Err(e) => {
                    self.metrics.upstream_error(e.kind());
                    exchange.error = Some(e.kind());
                    tracing::warn!(
                        route = route_kind.as_str(),
                        client = %conn.remote,
                        error = %e,
                        "forwarding failed"
                    );
                    e.to_response()
                }
            }
        };
        exchange.status = Some(response.status());
        self.metrics
            .observe_header_latency(exchange.route, started.elapsed().as_secs_f64());
        response.body_mut().attach(exchange);
        response
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        exchange: &mut Exchange,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        let tally = exchange.tally.clone();
        // Blob downloads get large upstream reads while the bulk budget lasts (see `upstream`).
        let client = match (exchange.route, req.method()) {
            (RouteKind::Blob, &Method::GET) => match self.pools.try_bulk() {
                Some((client, permit)) => {
                    exchange._bulk = Some(permit);
                    client
                }
                None => self.pools.lean(),
            },
            _ => self.pools.lean(),
        };
        let (head, body) = req.into_parts();
        if http_body::Body::is_end_stream(&body) {
            tally.request_done.notify_one(); // nothing to send: the wait starts now
        }
        let h2_download = head.version == Version::HTTP_2
            && exchange.route == RouteKind::Blob
            && head.method == Method::GET;
        let body = UpstreamBody::Client {
            body: Metered::new(body, self.idle_timeout, tally.clone(), Direction::Request),
        };
        let resp = self.send(client, head, body, conn, tally).await?;
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

    /// Sends a request head and body upstream and relays the response head.
    async fn send(
        &self,
        client: &crate::upstream::UpstreamClient,
        mut head: http::request::Parts,
        body: UpstreamBody,
        conn: ConnInfo,
        tally: Arc<Tally>,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        let path_and_query = head.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let uri = self
            .upstream
            .uri_for(path_and_query)
            .map_err(|e| ForwardError::Unreachable(format!("cannot build upstream URI: {e}")))?;
        rewrite_request_headers(
            &mut head.headers,
            head.uri.authority(),
            conn,
            &self.upstream,
        );
        head.uri = uri;
        head.version = Version::HTTP_11;

        // The wait for the response head starts when the request body has been sent
        // (nginx's proxy_read_timeout); while it streams, the body's own idle timeout
        // guards against a stalled client. A 6 s upload with a 2 s idle timeout works.
        let request = client.request(Request::from_parts(head, body));
        let idle = self.idle_timeout;
        let head_deadline = async {
            tally.request_done.notified().await;
            tokio::time::sleep(idle).await;
        };
        let sent = tokio::select! {
            r = request => Ok(r),
            () = head_deadline => Err(()),
        };
        let response = match sent {
            Err(_) => {
                return Err(ForwardError::Timeout {
                    stage: "response headers",
                    after: self.idle_timeout,
                })
            }
            Ok(Err(e)) => {
                let error = self.classify_client_error(&e, &tally);
                if let (Some(w), ForwardError::Unreachable(_) | ForwardError::Timeout { .. }) =
                    (&self.watch, &error)
                {
                    w.unreachable();
                }
                return Err(error);
            }
            Ok(Ok(r)) => {
                if let Some(w) = &self.watch {
                    w.answered();
                }
                r
            }
        };

        let (mut head, body) = response.into_parts();
        remove_hop_by_hop(&mut head.headers);
        let body = Metered::new(body, self.idle_timeout, tally, Direction::Response);
        Ok(Response::from_parts(head, ResponseBody::upstream(body)))
    }
}

impl Proxy {
    /// Phase 2½, the push gate: read the manifest (≤ 4 MiB), check what it references,
    /// and forward the exact bytes only if it passes (or in audit mode).
    async fn gated_push(
        &self,
        gate: &Gate,
        reference: &str,
        req: Request<Incoming>,
        conn: ConnInfo,
        exchange: &mut Exchange,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        let repo = exchange.repository.clone().unwrap_or_default();
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > DRAIN_LIMIT) {
            gate.count("rejected");
            return Ok(too_large());
        }
        let auth = req.headers().get(header::AUTHORIZATION).cloned();
        // Read as bytes: Go's mime.ParseMediaType accepts quoted non-ASCII parameters
        // (`; x="é"`), where `to_str` would fail and the type would look absent.
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()))
            .map(|ct| oci::media_type_essence(&ct).to_owned());
        // Room in the manifest memory budget before a byte is read: a flood of maximal
        // pushes waits briefly, then is told to come back, instead of exhausting memory.
        let want = declared.map_or(oci::MAX_MANIFEST_BYTES, |n| {
            usize::try_from(n).map_or(oci::MAX_MANIFEST_BYTES, |n| n.min(oci::MAX_MANIFEST_BYTES))
        });
        let Some(_held) = gate.budget.hold(want, BUDGET_WAIT).await else {
            gate.count("check_error");
            return Ok(busy(
                "too many manifest pushes are being checked at once; retry the push",
            ));
        };
        let (head, body) = req.into_parts();
        let bytes = match read_manifest(body, self.idle_timeout).await {
            Ok(b) => b,
            Err(ManifestRead::TooLarge) => {
                gate.count("rejected");
                return Ok(too_large());
            }
            Err(ManifestRead::Failed(why)) => {
                exchange.tally.request_failed.store(true, Ordering::Relaxed);
                return Err(ForwardError::ClientAborted(why));
            }
        };
        exchange
            .tally
            .bytes_in
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let digest = crate::gate::digest_off_thread(&bytes).await;
        if oci::is_sha256_digest(reference) && digest != reference {
            gate.count("rejected");
            return Ok(crate::error::oci_error(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                &format!(
                    "the manifest's sha256 is {digest}, not the digest {reference} it was pushed under"
                ),
            ));
        }

        let verdict = gate
            .inspect(&repo, &bytes, content_type.as_deref(), auth.as_ref())
            .await;
        let audit = gate.settings.mode == GateMode::Audit;
        match &verdict {
            Verdict::Accept | Verdict::Passthrough => gate.count(verdict.label()),
            Verdict::Invalid(why) => {
                if audit {
                    gate.count("audit_would_reject");
                } else {
                    gate.count("rejected");
                    return Ok(crate::error::oci_error(
                        StatusCode::BAD_REQUEST,
                        "MANIFEST_INVALID",
                        &format!("manifest invalid: {why}"),
                    ));
                }
            }
            Verdict::Reject(problems) => {
                tracing::warn!(
                    repository = %repo,
                    reference,
                    client = %conn.remote,
                    user = basic_user(auth.as_ref()).as_deref().unwrap_or(""),
                    mode = if audit { "audit" } else { "enforce" },
                    problems = %problems.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join(" | "),
                    "push gate: manifest references missing or wrong content"
                );
                if audit {
                    gate.count("audit_would_reject");
                } else {
                    gate.count("rejected");
                    return Ok(rejection(problems));
                }
            }
            Verdict::Unauthorized(status) => {
                // Forwarded untouched: the registry answers (and challenges) this client.
                gate.count(verdict.label());
                tracing::debug!(repository = %repo, reference, status, "push gate: pusher may not read the repository; forwarding");
            }
            Verdict::TooManyReferences(max) => {
                tracing::warn!(
                    repository = %repo,
                    reference,
                    client = %conn.remote,
                    max_references = max,
                    "push gate: manifest references too much to check"
                );
                if audit {
                    gate.count("audit_would_reject");
                } else {
                    gate.count("rejected");
                    return Ok(crate::error::oci_error(
                        StatusCode::BAD_REQUEST,
                        "MANIFEST_INVALID",
                        &format!(
                            "{}; gate.max_references bounds what one push may reference",
                            crate::checker::OverBudget(*max)
                        ),
                    ));
                }
            }
            Verdict::CheckError(why) => {
                gate.count("check_error");
                tracing::warn!(repository = %repo, reference, error = %why, "push gate could not check references");
                if gate.settings.on_check_error == OnCheckError::Reject && !audit {
                    return Ok(busy(&format!(
                        "the references of this manifest could not be checked ({why}); retry the push"
                    )));
                }
            }
        }
        exchange.tally.request_done.notify_one(); // the body is in memory: sent at once
        let body = UpstreamBody::Full {
            data: Some(bytes.clone()),
        };
        let resp = self
            .send(self.pools.lean(), head, body, conn, exchange.tally.clone())
            .await?;
        if resp.status() == StatusCode::CREATED {
            gate.accepted(&repo, &digest, &bytes, content_type).await;
        }
        Ok(resp)
    }

    /// For GET/HEAD of a manifest or blob with validation on: what the tap will need.
    fn read_ctx(&self, req: &Request<Incoming>, route: &route::Route<'_>) -> Option<ReadCtx> {
        self.validation.as_ref()?;
        let kind = match route.kind {
            RouteKind::Manifest => RefKind::Manifest,
            RouteKind::Blob => RefKind::Blob,
            _ => return None,
        };
        let head = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return None,
        };
        route.repository?;
        Some(ReadCtx {
            kind,
            reference: route.reference?.to_owned(),
            auth: req.headers().get(header::AUTHORIZATION).cloned(),
            accept: req.headers().get(header::ACCEPT).cloned(),
            if_none_match: req.headers().get(header::IF_NONE_MATCH).cloned(),
            head,
        })
    }

    /// Phase 4½: hand a served manifest to validation; count 404s by digest.
    /// Never delays the response: a HEAD's job is queued now, a GET's body is copied as it streams.
    fn tap_response(&self, read: ReadCtx, repository: &str, resp: &mut Response<ResponseBody>) {
        let Some(v) = &self.validation else { return };
        let status = resp.status();
        if status == StatusCode::NOT_FOUND && oci::is_sha256_digest(&read.reference) {
            let accept = read.accept.as_ref().and_then(|a| a.to_str().ok());
            v.validator.client_not_found(
                read.kind,
                repository,
                &read.reference,
                read.auth.as_ref(),
                |media_type| {
                    !media_type.is_empty()
                        && accept.is_some_and(|a| {
                            a.split(',').any(|t| oci::same_media_type(t, media_type))
                        })
                },
            );
            return;
        }
        if read.kind != RefKind::Manifest {
            return;
        }
        if status == StatusCode::NOT_MODIFIED {
            // A conditional GET the client already had the body for: still validated. The
            // registry's 304 names no digest; it matched the one the client sent (its ETag
            // is `"<digest>"`), and the worker fetches the manifest by it.
            let digest = ["docker-content-digest", "etag"]
                .iter()
                .filter_map(|h| resp.headers().get(*h))
                .chain(read.if_none_match.as_ref())
                .find_map(|v| {
                    let v = v
                        .to_str()
                        .ok()?
                        .trim()
                        .trim_start_matches("W/")
                        .trim_matches('"');
                    oci::is_sha256_digest(v).then(|| v.to_owned())
                });
            if let Some(d) = digest {
                if !v
                    .validator
                    .recently_ok(repository, &d, ManifestKind::Index, v.blobs)
                {
                    v.validator.submit(Job {
                        digest: Some(d),
                        repository: repository.to_owned(),
                        reference: read.reference,
                        body: None,
                        held: None,
                        kind: ManifestKind::Index,
                        auth: read.auth,
                        seen_at: Instant::now().into_std(),
                        blobs: v.blobs,
                    });
                }
            }
            return;
        }
        if status != StatusCode::OK {
            return;
        }
        let kind = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|ct| ct.to_str().ok())
            .and_then(oci::manifest_kind);
        match kind {
            Some(ManifestKind::Index) => {}
            Some(ManifestKind::Image) if v.blobs => {}
            _ => return,
        }
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|d| d.to_str().ok())
            .filter(|d| oci::is_sha256_digest(d))
            .map(str::to_owned);
        let kind = kind.unwrap_or(ManifestKind::Index);
        if let Some(d) = &digest {
            if v.validator.recently_ok(repository, d, kind, v.blobs) {
                return;
            }
        }
        let job = Job {
            digest,
            repository: repository.to_owned(),
            reference: read.reference,
            body: None,
            held: None,
            kind,
            auth: read.auth,
            seen_at: Instant::now().into_std(),
            blobs: v.blobs,
        };
        if read.head {
            v.validator.submit(job);
            return;
        }
        // The copy counts against the manifest memory budget; with no room (or no known
        // length) the job goes now without a body, and validation fetches the manifest.
        let length = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n <= oci::MAX_MANIFEST_BYTES);
        let held = match (length, &self.gate) {
            (Some(n), Some(gate)) => gate.budget.try_hold(n),
            _ => None,
        };
        match held {
            Some(held) => resp
                .body_mut()
                .tap(Tap::new(job, held, v.validator.clone())),
            None => v.validator.submit(job),
        }
    }

    fn classify_client_error(
        &self,
        e: &hyper_util::client::legacy::Error,
        tally: &Tally,
    ) -> ForwardError {
        if tally.request_failed.load(Ordering::Relaxed) {
            return ForwardError::ClientAborted(error_chain(e));
        }
        if e.is_connect() && has_timeout(e) {
            return ForwardError::Timeout {
                stage: "connect",
                after: self.connect_timeout,
            };
        }
        ForwardError::Unreachable(error_chain(e))
    }
}

/// How much of an oversized manifest body is read and discarded before the 413 is sent.
/// A client still sending when the server closes gets a reset instead of the answer;
/// reading on (up to this bound) lets it see the 413. Beyond it, the connection is cut.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;

enum ManifestRead {
    TooLarge,
    Failed(String),
}

/// Reads a pushed manifest body: at most 4 MiB kept; an oversized body is drained up to
/// [`DRAIN_LIMIT`] so the client gets its 413; every frame must arrive within `idle`.
async fn read_manifest(mut body: Incoming, idle: Duration) -> Result<Bytes, ManifestRead> {
    use http_body_util::BodyExt;
    let mut kept = bytes::BytesMut::new();
    let mut seen: u64 = 0;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => {
                return Err(ManifestRead::Failed(
                    "manifest body stalled (idle timeout)".into(),
                ))
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ManifestRead::Failed(e.to_string())),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if seen <= oci::MAX_MANIFEST_BYTES as u64 {
            kept.extend_from_slice(&data);
        } else if seen > DRAIN_LIMIT {
            return Err(ManifestRead::TooLarge);
        }
    }
    if seen > oci::MAX_MANIFEST_BYTES as u64 {
        return Err(ManifestRead::TooLarge);
    }
    Ok(kept.freeze())
}

/// How long a push waits for room in the manifest memory budget before its 503.
const BUDGET_WAIT: Duration = Duration::from_secs(2);

/// 503 `UNAVAILABLE` with `Retry-After`: regguard cannot take this push right now.
fn busy(message: &str) -> Response<ResponseBody> {
    let mut resp = crate::error::oci_error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", message);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
    resp
}

fn too_large() -> Response<ResponseBody> {
    crate::error::oci_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "MANIFEST_INVALID",
        "manifest is larger than 4 MiB; the registry does not store manifests that large",
    )
}

/// 400 with one `MANIFEST_BLOB_UNKNOWN` error per problem (the OCI spec's code for missing references).
fn rejection(problems: &[crate::gate::Problem]) -> Response<ResponseBody> {
    let errors = problems
        .iter()
        .map(|p| {
            serde_json::json!({
                "code": "MANIFEST_BLOB_UNKNOWN",
                "message": p.message,
                "detail": p,
            })
        })
        .collect();
    crate::error::oci_errors(StatusCode::BAD_REQUEST, errors)
}

/// The user name of a Basic `Authorization` header, for logs (never the password).
fn basic_user(auth: Option<&HeaderValue>) -> Option<String> {
    use base64::Engine as _;
    let v = auth?.to_str().ok()?;
    let encoded = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    // Without a colon the whole credential is a secret, not a user name: log nothing of it.
    text.split_once(':').map(|(user, _)| user.to_owned())
}

/// `GET /` on the public listener, as the nginx front answered it.
fn liveness() -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(Bytes::from_static(b"ok")));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

fn has_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// The error and its sources on one line: hyper's top-level errors are terse.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}

static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes the hop-by-hop fields of RFC 9110 §7.6.1: those named by `Connection`,
/// and `Connection`, `Proxy-Connection`, `Keep-Alive`, `TE`, `Transfer-Encoding`, `Upgrade`.
/// Framing is hyper's job on each side (chunked or Content-Length as the body says).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
        headers.remove(header::CONNECTION);
    }
    for name in [
        &PROXY_CONNECTION,
        &KEEP_ALIVE,
        &header::TE,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// Rewrites a client's request head for the upstream, as the nginx front's
/// `proxy_set_header` lines did, minus its weakness: a client may not choose the
/// host the registry writes into `Location` (X-Forwarded-Host, Forwarded).
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    authority: Option<&http::uri::Authority>,
    conn: ConnInfo,
    upstream: &Upstream,
) {
    remove_hop_by_hop(headers);
    // hyper's server has already answered `100 Continue` when it started reading the body.
    headers.remove(header::EXPECT);
    headers.remove(&X_FORWARDED_HOST);
    headers.remove(&FORWARDED);

    // Host with its port (nginx's `Host $http_host`). HTTP/2 clients send :authority instead.
    if !headers.contains_key(header::HOST) {
        let host = authority
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .unwrap_or_else(|| upstream.host_header.clone());
        headers.insert(header::HOST, host);
    }

    let ip = conn.remote.ip().to_string();
    let forwarded_proto = headers
        .get(&X_FORWARDED_PROTO)
        .filter(|v| conn.trusted && (*v == "https" || *v == "http"))
        .cloned();
    let real_ip = headers.get(&X_REAL_IP).filter(|_| conn.trusted).cloned();
    // nginx's $proxy_add_x_forwarded_for: the client's list, then the peer address.
    let mut xff = String::new();
    for v in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(s) = v.to_str() {
            if !s.trim().is_empty() {
                xff.push_str(s.trim());
                xff.push_str(", ");
            }
        }
    }
    xff.push_str(&ip);
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(&X_FORWARDED_FOR, v);
    }
    match real_ip {
        Some(v) => {
            headers.insert(&X_REAL_IP, v);
        }
        None => {
            if let Ok(v) = HeaderValue::from_str(&ip) {
                headers.insert(&X_REAL_IP, v);
            }
        }
    }
    let proto = forwarded_proto
        .unwrap_or_else(|| HeaderValue::from_static(if conn.tls { "https" } else { "http" }));
    headers.insert(&X_FORWARDED_PROTO, proto);
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
    client: SocketAddr,
    started: Instant,
    status: Option<StatusCode>,
    error: Option<&'static str>,
    access_log: bool,
    /// Held for the life of a bulk blob download (released with the exchange).
    _bulk: Option<BulkPermit>,
}

impl Exchange {
    /// The counters shared with this exchange's bodies.
    pub fn tally(&self) -> &Tally {
        &self.tally
    }

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
            self.metrics.upstream_error("upstream_body");
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
                duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
                client = %self.client,
                outcome,
                error = self.error.unwrap_or(""),
                "request"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(tls: bool) -> ConnInfo {
        ConnInfo {
            remote: "10.1.2.3:4444".parse().unwrap(),
            tls,
            trusted: false,
        }
    }

    #[test]
    fn forwarding_headers_follow_the_nginx_front_without_its_holes() {
        let up = Upstream::parse("http://reg:5000").unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::HOST,
            HeaderValue::from_static("public.example:5050"),
        );
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("192.0.2.1"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("192.0.2.2"));
        h.insert(&X_FORWARDED_HOST, HeaderValue::from_static("evil.example"));
        h.insert(&FORWARDED, HeaderValue::from_static("host=evil.example"));
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("gopher"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::EXPECT, HeaderValue::from_static("100-continue"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic eDp5"),
        );
        rewrite_request_headers(&mut h, None, conn(true), &up);
        assert_eq!(h[header::HOST], "public.example:5050");
        assert_eq!(h[&X_FORWARDED_FOR], "192.0.2.1, 192.0.2.2, 10.1.2.3");
        assert_eq!(h[&X_REAL_IP], "10.1.2.3");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert!(!h.contains_key(&X_FORWARDED_HOST));
        assert!(!h.contains_key(&FORWARDED));
        assert!(!h.contains_key(header::CONNECTION));
        assert!(!h.contains_key("x-hop"));
        assert!(!h.contains_key(header::EXPECT));
        assert_eq!(h[header::AUTHORIZATION], "Basic eDp5");
    }

    #[test]
    fn only_trusted_proxies_may_set_the_forwarded_scheme_and_client_ip() {
        let up = Upstream::parse("http://reg:5000").unwrap();
        for trusted in [false, true] {
            let mut h = HeaderMap::new();
            h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("https"));
            h.insert(&X_REAL_IP, HeaderValue::from_static("192.0.2.9"));
            let c = ConnInfo {
                trusted,
                ..conn(false)
            };
            rewrite_request_headers(&mut h, None, c, &up);
            let (proto, ip) = if trusted {
                ("https", "192.0.2.9")
            } else {
                ("http", "10.1.2.3")
            };
            assert_eq!(h[&X_FORWARDED_PROTO], proto);
            assert_eq!(h[&X_REAL_IP], ip);
        }
    }

    #[test]
    fn http2_authority_becomes_host() {
        let up = Upstream::parse("http://reg:5000").unwrap();
        let mut h = HeaderMap::new();
        let authority: http::uri::Authority = "public.example:5050".parse().unwrap();
        rewrite_request_headers(&mut h, Some(&authority), conn(false), &up);
        assert_eq!(h[header::HOST], "public.example:5050");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
    }

    #[test]
    fn response_hop_by_hop_fields_are_removed_and_registry_fields_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(&KEEP_ALIVE, HeaderValue::from_static("timeout=5"));
        h.insert(
            header::LOCATION,
            HeaderValue::from_static("http://x/v2/a/blobs/uploads/1"),
        );
        h.insert(
            "docker-content-digest",
            HeaderValue::from_static("sha256:00"),
        );
        remove_hop_by_hop(&mut h);
        assert!(!h.contains_key(header::TRANSFER_ENCODING));
        assert!(!h.contains_key(&KEEP_ALIVE));
        assert!(h.contains_key(header::LOCATION));
        assert!(h.contains_key("docker-content-digest"));
    }
}
