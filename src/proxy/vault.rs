//! Phase 4¾: the registry answered a client's GET or HEAD of a manifest or blob by digest
//! with 404, and the vault holds that digest as seen in that repository: answer 200 (or 206
//! for a blob range) with the vault's verified bytes instead.
//!
//! Only ever after the registry itself said 404 to this client, so the client passed the
//! registry's auth (a 401/403 is passed through untouched and never reaches here).

use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};

use super::*;
use crate::vault::StoreError;

/// The header that says a response came from regguard's vault, not the registry.
pub const SERVED_FROM: &str = "x-regguard-served-from";

/// What the vault phase needs of the request.
pub(super) struct VaultAsk {
    kind: RefKind,
    digest: String,
    head: bool,
    accept: Option<HeaderValue>,
    range: Option<HeaderValue>,
}

impl Proxy {
    /// For GET/HEAD of a manifest or blob by digest with serving on: what the phase needs.
    pub(super) fn vault_ask(
        &self,
        req: &Request<Incoming>,
        route: &route::Route<'_>,
    ) -> Option<VaultAsk> {
        self.serving.as_ref()?;
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
        let digest = route.reference.filter(|r| oci::is_sha256_digest(r))?;
        Some(VaultAsk {
            kind,
            digest: digest.to_owned(),
            head,
            accept: req.headers().get(header::ACCEPT).cloned(),
            range: req.headers().get(header::RANGE).cloned(),
        })
    }

    /// The vault's answer to a request the registry answered 404, if it has one.
    pub(super) async fn answer_from_vault(
        &self,
        ask: VaultAsk,
        repository: &str,
    ) -> Option<Response<ResponseBody>> {
        let serving = self.serving.as_ref()?;
        let vault = &serving.vault;
        let answer = match ask.kind {
            RefKind::Manifest => {
                let (seen, bytes) = report(
                    vault.manifest(repository, &ask.digest).await,
                    repository,
                    &ask.digest,
                )?;
                // As the registry does: an OCI manifest only to a client that accepts its type
                // (without it, 2.8 answers 404 even when it has the manifest).
                if !accepts(ask.accept.as_ref(), &seen.media_type) {
                    return None;
                }
                manifest_response(&ask, &seen.media_type, bytes)
            }
            RefKind::Blob => {
                let (_, size) = report(
                    vault.blob(repository, &ask.digest).await,
                    repository,
                    &ask.digest,
                )?;
                self.blob_response(&ask, size).await?
            }
        };
        serving.served(repository, &ask.digest, ask.kind);
        Some(answer)
    }

    async fn blob_response(&self, ask: &VaultAsk, size: u64) -> Option<Response<ResponseBody>> {
        let vault = &self.serving.as_ref()?.vault;
        let range = match ask
            .range
            .as_ref()
            .map(|r| parse_range(r.to_str().unwrap_or(""), size))
        {
            None | Some(Range::Ignored) => None,
            Some(Range::Unsatisfiable) => {
                let mut resp = Response::new(ResponseBody::full(Bytes::new()));
                *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    resp.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return Some(resp);
            }
            Some(Range::Bytes(r)) => Some(r),
        };
        let length = range.as_ref().map_or(size, |r| r.end - r.start);
        let body = if ask.head {
            ResponseBody::full(Bytes::new())
        } else {
            let (stream, _) = vault
                .store()
                .stream(&ask.digest, range.clone())
                .await
                .ok()??;
            // The whole blob is hashed again as it goes: bytes that changed since they were
            // verified end the response with an error, never a complete wrong body.
            let check = range.is_none().then(|| (Sha256::new(), ask.digest.clone()));
            ResponseBody::stream(http_body_util::BodyExt::boxed_unsync(
                http_body_util::StreamBody::new(checked(stream, check)),
            ))
        };
        let mut resp = Response::new(body);
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        common_headers(h, &ask.digest);
        if let Some(r) = range {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            if let Ok(v) = HeaderValue::from_str(&format!(
                "bytes {}-{}/{size}",
                r.start,
                r.end.saturating_sub(1)
            )) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
        }
        Some(resp)
    }
}

/// The value of a vault lookup, or `None` (logged when the vault failed, counted by it).
fn report<T>(found: Result<Option<T>, StoreError>, repository: &str, digest: &str) -> Option<T> {
    match found {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(%repository, %digest, error = %e, "vault: cannot serve");
            None
        }
    }
}

fn common_headers(h: &mut http::HeaderMap, digest: &str) {
    if let Ok(v) = HeaderValue::from_str(digest) {
        h.insert("docker-content-digest", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("\"{digest}\"")) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    h.insert(SERVED_FROM, HeaderValue::from_static("vault"));
}

fn manifest_response(ask: &VaultAsk, media_type: &str, bytes: Bytes) -> Response<ResponseBody> {
    let length = bytes.len() as u64;
    let body = if ask.head {
        ResponseBody::full(Bytes::new())
    } else {
        ResponseBody::full(bytes)
    };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    common_headers(h, &ask.digest);
    resp
}

/// Whether a client sending `accept` would get a manifest of `media_type` from the registry:
/// only the four manifest types at all; OCI types only when `Accept` names them, spelled
/// exactly (registry 2.8 compares them case-sensitively); Docker types always.
fn accepts(accept: Option<&HeaderValue>, media_type: &str) -> bool {
    match media_type {
        oci::DOCKER_LIST | oci::DOCKER_MANIFEST => true,
        oci::OCI_INDEX | oci::OCI_MANIFEST => {
            accept.and_then(|a| a.to_str().ok()).is_some_and(|a| {
                a.split(',')
                    .any(|t| oci::media_type_essence(t) == media_type)
            })
        }
        _ => false,
    }
}

/// A client's `Range`, read against a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
enum Range {
    /// One satisfiable range: `start..end` (end exclusive).
    Bytes(std::ops::Range<u64>),
    Unsatisfiable,
    /// Not a single byte range (several, or another unit): the whole body is sent, as RFC 9110 allows.
    Ignored,
}

fn parse_range(value: &str, size: u64) -> Range {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Range::Ignored;
    };
    let Some((first, last)) = spec.split_once('-') else {
        return Range::Ignored;
    };
    if spec.contains(',') {
        return Range::Ignored;
    }
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // bytes=-N: the last N bytes.
        return match last.parse::<u64>() {
            Ok(0) => Range::Unsatisfiable,
            Ok(n) if size > 0 => Range::Bytes(size.saturating_sub(n)..size),
            Ok(_) => Range::Unsatisfiable,
            Err(_) => Range::Ignored,
        };
    }
    let Ok(start) = first.parse::<u64>() else {
        return Range::Ignored;
    };
    let end = if last.is_empty() {
        size
    } else {
        match last.parse::<u64>() {
            Ok(l) if l >= start => l.saturating_add(1).min(size),
            _ => return Range::Ignored,
        }
    };
    if start >= size {
        return Range::Unsatisfiable;
    }
    Range::Bytes(start..end)
}

type Chunks = futures_util::stream::BoxStream<'static, Result<Bytes, StoreError>>;

/// Frames of a vault stream; with `check`, the bytes are hashed and a mismatch at the end
/// becomes an error (the client's transfer fails) instead of a clean end.
fn checked(
    stream: Chunks,
    check: Option<(Sha256, String)>,
) -> impl futures_util::Stream<Item = Result<http_body::Frame<Bytes>, crate::body::BoxError>> + Send
{
    futures_util::stream::unfold(
        (stream, check, false),
        |(mut stream, mut check, done)| async move {
            if done {
                return None;
            }
            match stream.next().await {
                Some(Ok(chunk)) => {
                    if let Some((h, _)) = check.as_mut() {
                        h.update(&chunk);
                    }
                    Some((Ok(http_body::Frame::data(chunk)), (stream, check, false)))
                }
                Some(Err(e)) => Some((
                    Err(Box::new(e) as crate::body::BoxError),
                    (stream, None, true),
                )),
                None => {
                    let (h, digest) = check?;
                    let found = format!("sha256:{:x}", h.finalize());
                    if found == digest {
                        return None;
                    }
                    tracing::error!(%digest, %found, "vault object changed while served: transfer cut");
                    let e = StoreError::Corrupt { digest, found };
                    Some((
                        Err(Box::new(e) as crate::body::BoxError),
                        (stream, None, true),
                    ))
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::{accepts, parse_range, Range};
    use crate::oci;
    use http::HeaderValue;

    #[test]
    fn a_manifest_goes_only_to_a_client_the_registry_would_give_it_to() {
        let values: Vec<HeaderValue> = [
            "*/*",
            "application/vnd.oci.image.manifest.v1+json; q=0.9, */*",
            "APPLICATION/VND.OCI.IMAGE.MANIFEST.V1+JSON",
            "text/html",
        ]
        .into_iter()
        .map(HeaderValue::from_static)
        .collect();
        let accept = |v: &str| values.iter().find(|h| h.to_str().ok() == Some(v));
        assert!(accepts(None, oci::DOCKER_MANIFEST));
        assert!(accepts(accept("*/*"), oci::DOCKER_LIST));
        assert!(!accepts(None, oci::OCI_MANIFEST));
        assert!(!accepts(accept("*/*"), oci::OCI_INDEX));
        assert!(accepts(
            accept("application/vnd.oci.image.manifest.v1+json; q=0.9, */*"),
            oci::OCI_MANIFEST
        ));
        // Registry 2.8 matches the type as spelled.
        assert!(!accepts(
            accept("APPLICATION/VND.OCI.IMAGE.MANIFEST.V1+JSON"),
            oci::OCI_MANIFEST
        ));
        // Never anything but a manifest type.
        assert!(!accepts(accept("text/html"), "text/html"));
        assert!(!accepts(None, ""));
    }

    #[test]
    fn byte_ranges_read_as_rfc_9110_says() {
        assert_eq!(parse_range("bytes=0-9", 100), Range::Bytes(0..10));
        assert_eq!(parse_range("bytes=90-", 100), Range::Bytes(90..100));
        assert_eq!(parse_range("bytes=-10", 100), Range::Bytes(90..100));
        assert_eq!(parse_range("bytes=-200", 100), Range::Bytes(0..100));
        assert_eq!(parse_range("bytes=50-500", 100), Range::Bytes(50..100));
        assert_eq!(parse_range("bytes=100-", 100), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=100-200", 100), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Range::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Range::Ignored);
        assert_eq!(parse_range("items=0-1", 100), Range::Ignored);
        assert_eq!(parse_range("bytes=9-3", 100), Range::Ignored);
        assert_eq!(parse_range("bytes=x-3", 100), Range::Ignored);
    }
}
