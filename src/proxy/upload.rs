//! Phase 3¼: a side copy of small blob uploads for the vault (configs, mostly), so the vault
//! keeps them as they stream instead of reading them back from the registry after the push.
//!
//! An upload is `POST` then any number of `PATCH`es then `PUT ?digest=` (or one `PUT` with the
//! whole body). Each request body that keeps the upload within `vault.max_blob_size` (and
//! 4 MiB) is copied aside as it streams, within a 32 MiB cap of its own for all copies (never
//! the gate's budget: an upload abandoned half way must not hold room pushes need) (frames are reference-counted: no second buffer of the client's stream, and it is
//! never held back). A `PATCH` the registry accepted (202) adds its copy to the upload's; a
//! `PUT ?digest=` it accepted (201) hands the whole to the vault, which keeps it only if it
//! hashes to the digest. Anything larger, chunked, refused or abandoned is left to the vault's
//! filler, which fetches what a kept manifest references.

use std::sync::atomic::AtomicUsize;
use std::sync::Mutex;

use super::*;

/// The largest upload copied aside (configs are kilobytes; layers go to the filler).
const MAX_COPY: u64 = 4 * 1024 * 1024;
/// Uploads in progress remembered at most, and for how long between their requests.
const SESSIONS: u64 = 4096;
const SESSION_IDLE: Duration = Duration::from_secs(60);
/// Bytes all upload copies (in flight and between requests) may hold at once.
const COPY_BYTES: usize = 32 * 1024 * 1024;

/// Room taken in the copies' cap; given back when dropped.
pub(super) struct Reserved {
    n: usize,
    pool: Arc<AtomicUsize>,
}

impl Reserved {
    fn take(pool: &Arc<AtomicUsize>, n: usize) -> Option<Self> {
        let mut now = pool.load(Ordering::Relaxed);
        loop {
            if now + n > COPY_BYTES {
                return None;
            }
            match pool.compare_exchange_weak(now, now + n, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    return Some(Reserved {
                        n,
                        pool: pool.clone(),
                    })
                }
                Err(actual) => now = actual,
            }
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.pool.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// An upload's bytes so far, with the room they take.
pub(super) struct SoFar {
    bytes: Bytes,
    /// Taken by the next request (the cache may still hold the entry a moment after removal).
    held: Mutex<Option<Reserved>>,
}

/// Uploads in progress, by (repository, upload id).
pub(super) type Sessions = moka::sync::Cache<(String, String), Arc<SoFar>>;

/// The state of upload copies: sessions, and the room all copies take.
pub(super) struct Uploads {
    sessions: Sessions,
    room: Arc<AtomicUsize>,
}

pub(super) fn uploads() -> Uploads {
    Uploads {
        sessions: moka::sync::Cache::builder()
            .max_capacity(SESSIONS)
            .time_to_idle(SESSION_IDLE)
            .build(),
        room: Arc::new(AtomicUsize::new(0)),
    }
}

/// One upload request being copied.
pub(super) struct UploadCopy {
    repository: String,
    id: String,
    /// `?digest=` of a closing request.
    digest: Option<String>,
    /// Filled when the request body has been read to its end.
    slot: Arc<Mutex<Option<Bytes>>>,
    held: Option<Reserved>,
}

impl Proxy {
    /// For a `PATCH`/`PUT` of an upload with a vault: the copy to make, and the tap that makes it.
    pub(super) fn upload_copy(
        &self,
        req: &Request<Incoming>,
        route: &route::Route<'_>,
    ) -> Option<(UploadCopy, Option<Tap>)> {
        let vault = self.vault.as_ref()?;
        if route.kind != RouteKind::Upload || !matches!(*req.method(), Method::PATCH | Method::PUT)
        {
            return None;
        }
        let repository = route.repository?.to_owned();
        let id = route.reference?.to_owned();
        let digest = req.uri().query().and_then(query_digest);
        let uploads = self.uploads.as_ref()?;
        let sessions = &uploads.sessions;
        let key = (repository.clone(), id.clone());
        let so_far = sessions.get(&key).map_or(0, |s| s.bytes.len() as u64);
        let limit = vault.settings().max_blob_size.min(MAX_COPY);
        let length = match req.headers().get(header::CONTENT_LENGTH) {
            Some(v) => v.to_str().ok().and_then(|v| v.parse::<u64>().ok()),
            None if http_body::Body::is_end_stream(req.body()) => Some(0),
            None => None, // chunked: of unknown size
        };
        let room = limit.saturating_sub(so_far);
        // A part that is not copied makes the copy of the whole useless.
        let give_up = || {
            sessions.invalidate(&key);
            None
        };
        let slot = Arc::new(Mutex::new(None));
        let filled = slot.clone();
        let deliver: crate::body::Deliver = Box::new(move |copy| {
            *filled.lock().unwrap_or_else(|p| p.into_inner()) = copy;
        });
        let (tap, held) = match length {
            Some(0) => {
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Bytes::new());
                (None, None)
            }
            Some(n) if n > room => return give_up(),
            Some(n) => {
                let n = usize::try_from(n).ok()?;
                match Reserved::take(&uploads.room, n) {
                    Some(held) => (Some(Tap::new(n, deliver)), Some(held)),
                    None => return give_up(),
                }
            }
            // Chunked: as much as the upload may still grow; overflowing it ends the copy
            // (and frees what it had) at once, so a layer holds it only briefly.
            None => {
                let n = usize::try_from(room).ok()?;
                match Reserved::take(&uploads.room, n) {
                    Some(held) => (Some(Tap::new(n, deliver)), Some(held)),
                    None => return give_up(),
                }
            }
        };
        Some((
            UploadCopy {
                repository,
                id,
                digest,
                slot,
                held,
            },
            tap,
        ))
    }

    /// After the registry answered an upload request: keep the copy, or hand the finished
    /// blob to the vault.
    pub(super) fn upload_answered(
        &self,
        copy: UploadCopy,
        status: StatusCode,
        range: Option<&HeaderValue>,
    ) {
        let (Some(vault), Some(uploads)) = (&self.vault, &self.uploads) else {
            return;
        };
        let sessions = &uploads.sessions;
        let key = (copy.repository.clone(), copy.id.clone());
        let Some(body) = copy.slot.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            sessions.invalidate(&key);
            return;
        };
        // A closing PUT without a body closes an upload whose parts were copied: without
        // them there is nothing to keep.
        if body.is_empty() && !sessions.contains_key(&key) {
            return;
        }
        // Taken out while it grows: the room it took is given back, and taken again for
        // the whole below.
        let before = match sessions.remove(&key) {
            Some(s) => {
                drop(s.held.lock().unwrap_or_else(|p| p.into_inner()).take());
                s.bytes.clone()
            }
            None => Bytes::new(),
        };
        drop(copy.held);
        let whole = if before.is_empty() {
            body
        } else {
            let mut all = bytes::BytesMut::with_capacity(before.len() + body.len());
            all.extend_from_slice(&before);
            all.extend_from_slice(&body);
            all.freeze()
        };
        match (status, copy.digest) {
            (StatusCode::CREATED, Some(digest)) => {
                vault.keep_blob(&copy.repository, &digest, whole)
            }
            (StatusCode::ACCEPTED, None) => {
                // The registry says how much it holds (`Range: 0-<last>`): the copy must agree.
                let holds = range
                    .and_then(|r| r.to_str().ok())
                    .and_then(|r| r.trim().strip_prefix("0-"))
                    .and_then(|last| last.parse::<u64>().ok())
                    .map(|last| last + 1);
                if holds != Some(whole.len() as u64) {
                    return;
                }
                let Some(held) = Reserved::take(&uploads.room, whole.len()) else {
                    return;
                };
                sessions.insert(
                    key,
                    Arc::new(SoFar {
                        bytes: whole,
                        held: Mutex::new(Some(held)),
                    }),
                );
            }
            _ => {}
        }
    }
}

/// The `digest` parameter of an upload's query, percent-decoded (`sha256%3A…`).
fn query_digest(query: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let value = kv.strip_prefix("digest=")?;
        let value = value.replace("%3A", ":").replace("%3a", ":");
        oci::is_sha256_digest(&value).then_some(value)
    })
}

#[cfg(test)]
mod tests {
    use super::query_digest;

    #[test]
    fn the_digest_of_a_closing_upload_is_read_encoded_or_not() {
        let hex = "a".repeat(64);
        assert_eq!(
            query_digest(&format!("_state=x&digest=sha256:{hex}")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(
            query_digest(&format!("digest=sha256%3A{hex}&_state=y")),
            Some(format!("sha256:{hex}"))
        );
        assert_eq!(query_digest("_state=x"), None);
        assert_eq!(query_digest("digest=md5:abc"), None);
    }
}
