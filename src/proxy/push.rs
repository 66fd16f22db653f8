//! The push path: a manifest PUT read within the memory budget, checked by the gate,
//! and forwarded (exact bytes) or refused with an OCI error. Phase 2½ of the request.

use super::*;
use crate::gate::GateResult;

impl Proxy {
    /// Phase 2½, the push gate: read the manifest (≤ 4 MiB), check what it references,
    /// and forward the exact bytes only if it passes (or in audit mode).
    pub(super) async fn gated_push(
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
            gate.count(GateResult::Rejected);
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
            gate.count(GateResult::CheckError);
            return Ok(busy(
                "too many manifest pushes are being checked at once; retry the push",
            ));
        };
        let (head, body) = req.into_parts();
        let bytes = match read_manifest(body, self.idle_timeout).await {
            Ok(b) => b,
            Err(ManifestRead::TooLarge) => {
                gate.count(GateResult::Rejected);
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
            gate.count(GateResult::Rejected);
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
            Verdict::Accept | Verdict::Passthrough => gate.count(verdict.result()),
            Verdict::Invalid(why) => {
                if audit {
                    gate.count(GateResult::AuditWouldReject);
                } else {
                    gate.count(GateResult::Rejected);
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
                    client = %exchange.client,
                    user = basic_user(auth.as_ref()).as_deref().unwrap_or(""),
                    mode = if audit { "audit" } else { "enforce" },
                    problems = %problems.iter().map(|p| p.message.as_str()).collect::<Vec<_>>().join(" | "),
                    "push gate: manifest references missing or wrong content"
                );
                if audit {
                    gate.count(GateResult::AuditWouldReject);
                } else {
                    gate.count(GateResult::Rejected);
                    return Ok(rejection(problems));
                }
            }
            Verdict::Unauthorized(status) => {
                // Forwarded untouched: the registry answers (and challenges) this client.
                gate.count(verdict.result());
                tracing::debug!(repository = %repo, reference, status, "push gate: pusher may not read the repository; forwarding");
            }
            Verdict::TooManyReferences(max) => {
                tracing::warn!(
                    repository = %repo,
                    reference,
                    client = %exchange.client,
                    max_references = max,
                    "push gate: manifest references too much to check"
                );
                if audit {
                    gate.count(GateResult::AuditWouldReject);
                } else {
                    gate.count(GateResult::Rejected);
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
                gate.count(GateResult::CheckError);
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
