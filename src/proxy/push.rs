//! The push path: a manifest PUT read within the memory budget, checked by the gate,
//! and forwarded (exact bytes) or refused with an OCI error. Phase 2½ of the request.
//!
//! It knows how to read and answer a push; what is wrong with one is the gate's to say.

use std::ops::ControlFlow;

use super::*;
use crate::gate::GateResult;

impl Proxy {
    /// Phase 2½, the push gate: read the manifest (≤ 4 MiB), check what it references,
    /// and forward the exact bytes only if it passes (or in audit mode). Three phases:
    /// [`Proxy::read_push`], [`judge_push`], [`Proxy::forward_push`].
    pub(super) async fn gated_push(
        &self,
        gate: &Gate,
        reference: &str,
        req: Request<Incoming>,
        conn: ConnInfo,
        exchange: &mut Exchange,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        let pushed = match self.read_push(gate, reference, req, exchange).await? {
            ControlFlow::Continue(pushed) => pushed,
            ControlFlow::Break(refusal) => return Ok(refusal),
        };
        if let Some(refusal) = judge_push(gate, reference, &pushed, exchange).await {
            return Ok(refusal);
        }
        self.forward_push(gate, pushed, conn, exchange).await
    }

    /// Reads the pushed manifest within the memory budget and checks it is what it was
    /// pushed under. Breaks with the answer when the push is refused before any check
    /// (too large, no room in the budget, a digest that does not match).
    async fn read_push(
        &self,
        gate: &Gate,
        reference: &str,
        req: Request<Incoming>,
        exchange: &mut Exchange,
    ) -> Result<ControlFlow<Response<ResponseBody>, Pushed>, ForwardError> {
        let repo = exchange.repository.clone().unwrap_or_default();
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > DRAIN_LIMIT) {
            gate.count(GateResult::Rejected);
            return Ok(ControlFlow::Break(too_large()));
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
        let Some(held) = gate.budget.hold(want, BUDGET_WAIT).await else {
            gate.count(GateResult::CheckError);
            return Ok(ControlFlow::Break(busy(
                "too many manifest pushes are being checked at once; retry the push",
            )));
        };
        let (head, body) = req.into_parts();
        let bytes = match read_manifest(body, self.idle_timeout).await {
            Ok(b) => b,
            Err(ManifestRead::TooLarge) => {
                gate.count(GateResult::Rejected);
                return Ok(ControlFlow::Break(too_large()));
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
            gate.count(GateResult::Rejected);
            return Ok(ControlFlow::Break(crate::error::oci_error(
                StatusCode::BAD_REQUEST,
                "DIGEST_INVALID",
                &format!(
                    "the manifest's sha256 is {digest}, not the digest {reference} it was pushed under"
                ),
            )));
        }
        Ok(ControlFlow::Continue(Pushed {
            repo,
            head,
            bytes,
            digest,
            auth,
            content_type,
            _held: held,
        }))
    }

    /// Sends the exact bytes on, and tells the gate when the registry took them.
    async fn forward_push(
        &self,
        gate: &Gate,
        pushed: Pushed,
        conn: ConnInfo,
        exchange: &mut Exchange,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        exchange.tally.request_done.notify_one(); // the body is in memory: sent at once
        let body = UpstreamBody::Full {
            data: Some(pushed.bytes.clone()),
        };
        let resp = self
            .send_pooled(
                self.pools.lean(),
                pushed.head,
                body,
                conn,
                exchange.tally.clone(),
            )
            .await?;
        if resp.status() == StatusCode::CREATED {
            if let Some(vault) = &self.vault {
                let media_type = pushed.content_type.as_deref().unwrap_or("");
                vault.keep_pushed_manifest(
                    &pushed.repo,
                    &pushed.digest,
                    media_type,
                    pushed.bytes.clone(),
                    pushed.auth.as_ref(),
                );
            }
            gate.accepted(
                &pushed.repo,
                &pushed.digest,
                &pushed.bytes,
                pushed.content_type,
            )
            .await;
        }
        Ok(resp)
    }
}

/// A pushed manifest, read into memory: what the phases of one push share.
struct Pushed {
    repo: String,
    head: http::request::Parts,
    bytes: Bytes,
    /// The sha256 of `bytes`.
    digest: String,
    auth: Option<HeaderValue>,
    content_type: Option<String>,
    /// The body's share of the manifest memory budget, given back when the push is done.
    _held: crate::budget::Held,
}

/// Asks the gate about a pushed manifest and counts its verdict. Returns the refusal to
/// send instead of forwarding, or `None` to forward (an accepted push, one the gate does
/// not read, audit mode, or a check error that does not refuse).
async fn judge_push(
    gate: &Gate,
    reference: &str,
    pushed: &Pushed,
    exchange: &Exchange,
) -> Option<Response<ResponseBody>> {
    let repo = &pushed.repo;
    let auth = pushed.auth.as_ref();
    let verdict = gate
        .inspect(repo, &pushed.bytes, pushed.content_type.as_deref(), auth)
        .await;
    let audit = gate.settings.mode == GateMode::Audit;
    // A refusal is counted as one, or, in audit mode, as one that would have been.
    let refuse = |answer: Response<ResponseBody>| {
        if audit {
            gate.count(GateResult::AuditWouldReject);
            None
        } else {
            gate.count(GateResult::Rejected);
            Some(answer)
        }
    };
    match &verdict {
        Verdict::Accept | Verdict::Passthrough => {
            gate.count(verdict.result());
            None
        }
        Verdict::Invalid(why) => refuse(crate::error::oci_error(
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
            &format!("manifest invalid: {why}"),
        )),
        Verdict::Reject(problems) => {
            tracing::warn!(
                repository = %repo,
                reference,
                client = %exchange.client,
                user = basic_user(auth).as_deref().unwrap_or(""),
                mode = if audit { "audit" } else { "enforce" },
                problems = %problems.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join(" | "),
                "push gate: manifest references missing or wrong content"
            );
            refuse(rejection(problems))
        }
        Verdict::Unauthorized(status) => {
            // Forwarded untouched: the registry answers (and challenges) this client.
            gate.count(verdict.result());
            tracing::debug!(repository = %repo, reference, status, "push gate: pusher may not read the repository; forwarding");
            None
        }
        Verdict::TooManyReferences(max) => {
            tracing::warn!(
                repository = %repo,
                reference,
                client = %exchange.client,
                max_references = max,
                "push gate: manifest references too much to check"
            );
            refuse(crate::error::oci_error(
                StatusCode::BAD_REQUEST,
                "MANIFEST_INVALID",
                &format!(
                    "{}; gate.max_references bounds what one push may reference",
                    crate::checker::OverBudget(*max)
                ),
            ))
        }
        Verdict::CheckError(why) => {
            gate.count(GateResult::CheckError);
            tracing::warn!(repository = %repo, reference, error = %why, "push gate could not check references");
            (gate.settings.on_check_error == OnCheckError::Reject && !audit).then(|| {
                busy(&format!(
                    "the references of this manifest could not be checked ({why}); retry the push"
                ))
            })
        }
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
