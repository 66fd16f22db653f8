//! The vault's filler: writes handed-over manifests (after checking their digest) and fetches
//! what they reference from the registry, a bounded number at a time, off the request path.
//!
//! A digest deleted from a repository on purpose (a tombstone) is never recorded there again
//! but by a push through regguard: the registry's 201 to a push is the only proof that it
//! belongs there again.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use http::{header, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use tokio::sync::{mpsc, Semaphore};

use super::{references, Seen, Source, Vault, Work};
use crate::oci::{RefKind, MAX_MANIFEST_BYTES};
use crate::upstream::{own_request, UpstreamBody};

/// Nested indexes followed at most (the registry itself accepts any depth; images use 1).
const MAX_DEPTH: u32 = 8;

/// Why one fill step failed (logged at debug, counted).
#[derive(Debug, thiserror::Error)]
enum FillError {
    #[error(transparent)]
    Store(#[from] super::StoreError),
    #[error("registry: {0}")]
    Registry(String),
    #[error("no registry to fetch from")]
    NoSource,
    #[error("{0} is larger than its descriptor or the vault's limit allows")]
    TooLarge(String),
}

pub(super) fn start(
    vault: Weak<Vault>,
    mut rx: mpsc::Receiver<Work>,
    source: Option<Source>,
    workers: usize,
) {
    let slots = Arc::new(Semaphore::new(workers));
    let source = Arc::new(source);
    tokio::spawn(async move {
        while let Some(work) = rx.recv().await {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let Some(vault) = vault.upgrade() else { return };
            vault.release(&work);
            let source = source.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let (repository, digest) = match &work {
                    Work::Manifest {
                        repository, digest, ..
                    }
                    | Work::Blob {
                        repository, digest, ..
                    }
                    | Work::Reference {
                        repository, digest, ..
                    } => (repository.clone(), digest.clone()),
                };
                if let Err(e) = process(&vault, (*source).as_ref(), work).await {
                    vault.known.invalidate(&Vault::key(&repository, &digest));
                    match &e {
                        FillError::Store(super::StoreError::Mismatch { .. }) => {
                            vault.metrics.verification_failures.inc();
                        }
                        _ => vault.metrics.errors.inc(),
                    }
                    tracing::debug!(%repository, %digest, error = %e, "vault: not kept");
                }
            });
        }
    });
}

/// Whether `digest` may be recorded in `repository`: not if it was deleted there on purpose,
/// unless this is a push (which lifts the tombstone).
async fn allowed(
    vault: &Vault,
    repository: &str,
    digest: &str,
    pushed: bool,
) -> Result<bool, FillError> {
    if !pushed && vault.just_deleted(repository, digest) {
        return Ok(false);
    }
    let tombstoned = vault.store.is_tombstoned(repository, digest).await?;
    if tombstoned && pushed {
        vault.store.clear_tombstone(repository, digest).await?;
        return Ok(true);
    }
    Ok(!tombstoned)
}

async fn process(vault: &Vault, source: Option<&Source>, work: Work) -> Result<(), FillError> {
    match work {
        Work::Manifest {
            repository,
            digest,
            media_type,
            body,
            auth,
            depth,
            pushed,
        } => {
            let kept = Kept {
                repository: &repository,
                digest: &digest,
                auth,
                depth,
                pushed,
            };
            keep_manifest(vault, kept, &media_type, body).await
        }
        Work::Blob {
            repository,
            digest,
            body,
        } => {
            // A blob upload the registry accepted: a push.
            allowed(vault, &repository, &digest, true).await?;
            let size = match vault.store.content_size(&digest).await? {
                Some(held) => held,
                None => {
                    let size = body.len() as u64;
                    vault.store.put_bytes(&digest, body).await?;
                    vault.metrics.wrote(RefKind::Blob, size);
                    size
                }
            };
            let seen = Seen {
                media_type: String::new(),
                size,
                kind: RefKind::Blob,
            };
            vault.store.mark_seen(&repository, &digest, &seen).await?;
            Ok(())
        }
        Work::Reference {
            repository,
            digest,
            media_type,
            kind: RefKind::Manifest,
            auth,
            depth,
            pushed,
            ..
        } => {
            if !allowed(vault, &repository, &digest, pushed).await? {
                return Ok(());
            }
            let (body, served_as) = match vault
                .store
                .read_verified(&digest, MAX_MANIFEST_BYTES as u64)
                .await
            {
                Ok(Some(body)) => (body, None),
                // Not held (or held damaged: fetch it again, which replaces it).
                Ok(None) | Err(super::StoreError::Corrupt { .. }) => {
                    vault.metrics.fetched(RefKind::Manifest);
                    let (body, served_as) =
                        fetch_manifest(source, &repository, &digest, auth.as_ref()).await?;
                    (body, Some(served_as))
                }
                Err(e) => return Err(e.into()),
            };
            // The type the registry serves it with, else the one the parent's descriptor
            // claims (keep_manifest prefers what the body itself says).
            let media_type = served_as.unwrap_or(media_type);
            let kept = Kept {
                repository: &repository,
                digest: &digest,
                auth,
                depth,
                pushed,
            };
            keep_manifest(vault, kept, &media_type, body).await
        }
        Work::Reference {
            repository,
            digest,
            media_type,
            kind: RefKind::Blob,
            size,
            auth,
            pushed,
            wait_for_pull,
            depth,
        } => {
            // Still being copied from a pull: wait another round rather than read it twice.
            let copying = vault.teeing.contains_key(&Vault::key(&repository, &digest));
            if wait_for_pull || copying {
                // A layer: a client pulling the image usually streams it through regguard
                // (and into the vault) first; try again later, off the queue meanwhile.
                let later = Work::Reference {
                    repository: repository.clone(),
                    digest: digest.clone(),
                    media_type,
                    kind: RefKind::Blob,
                    size,
                    auth,
                    depth,
                    pushed,
                    wait_for_pull: false,
                };
                let key = Vault::key(&repository, &digest);
                let Ok(permit) = vault.delayed.clone().try_acquire_owned() else {
                    if copying {
                        return Ok(()); // the copy records it, or forgets it if it fails
                    }
                    // Too many layers waiting already: fetch this one now.
                    return Box::pin(process(vault, source, later)).await;
                };
                let queue = vault.queue.clone();
                let (known, dropped) = (vault.known.clone(), vault.metrics.dropped.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(super::LAYER_DELAY).await;
                    drop(permit);
                    if queue.try_send(later).is_err() {
                        known.invalidate(&key);
                        dropped.inc();
                    }
                });
                return Ok(());
            }
            if !allowed(vault, &repository, &digest, pushed).await? {
                return Ok(());
            }
            if vault.store.content_size(&digest).await?.is_none() {
                // Copied as it was uploaded: no need to read it back (unless the copy is wrong).
                let copied = match vault.take_pending(&repository, &digest) {
                    Some(body) => {
                        let n = body.len() as u64;
                        match vault.store.put_bytes(&digest, body).await {
                            Ok(()) => Some(n),
                            Err(super::StoreError::Mismatch { .. }) => {
                                vault.metrics.verification_failures.inc();
                                None
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    None => None,
                };
                let written = match copied {
                    Some(n) => n,
                    None => {
                        vault.metrics.fetched(RefKind::Blob);
                        // No more than the descriptor says (and, for configs, the vault's
                        // limit): a descriptor that understates its blob keeps nothing.
                        let limit = if vault.settings.layers {
                            size
                        } else {
                            size.min(vault.settings.max_blob_size)
                        };
                        let got = (source, auth.as_ref());
                        fetch_blob(vault, got, &repository, &digest, limit).await?
                    }
                };
                vault.metrics.wrote(RefKind::Blob, written);
            }
            // A delete may have come while the blob was fetched.
            if !allowed(vault, &repository, &digest, pushed).await? {
                return Ok(());
            }
            let seen = Seen {
                media_type,
                size,
                kind: RefKind::Blob,
            };
            vault.store.mark_seen(&repository, &digest, &seen).await?;
            Ok(())
        }
    }
}

/// Where a manifest is being kept, and how it came.
struct Kept<'a> {
    repository: &'a str,
    digest: &'a str,
    auth: Option<HeaderValue>,
    depth: u32,
    pushed: bool,
}

/// The media type to record for a manifest: the one its body names, else the one it was
/// served or pushed with, else the one its parent's descriptor claims; and only a manifest
/// type (spelled as the specification spells it), or nothing.
fn manifest_media_type(body: &[u8], given: &str) -> String {
    let named = crate::oci::body_media_type(body).unwrap_or_default();
    let chosen = [named.as_str(), crate::oci::media_type_essence(given)]
        .into_iter()
        .find_map(canonical_manifest_type)
        .unwrap_or_default();
    chosen
}

fn canonical_manifest_type(media_type: &str) -> Option<String> {
    [
        crate::oci::OCI_INDEX,
        crate::oci::OCI_MANIFEST,
        crate::oci::DOCKER_LIST,
        crate::oci::DOCKER_MANIFEST,
    ]
    .into_iter()
    .find(|t| t.eq_ignore_ascii_case(media_type))
    .map(str::to_owned)
}

async fn keep_manifest(
    vault: &Vault,
    kept: Kept<'_>,
    media_type: &str,
    body: Bytes,
) -> Result<(), FillError> {
    let Kept {
        repository,
        digest,
        auth,
        depth,
        pushed,
    } = kept;
    if !allowed(vault, repository, digest, pushed).await? {
        return Ok(());
    }
    let media_type = manifest_media_type(&body, media_type);
    let (found, parsed) =
        crate::checker::digest_and_parse(body.clone(), super::hint(&media_type)).await;
    if found != digest {
        return Err(super::StoreError::Mismatch {
            digest: digest.to_owned(),
            found,
        }
        .into());
    }
    let size = body.len() as u64;
    if vault.store.content_size(digest).await?.is_none() {
        vault.store.put_bytes(digest, body).await?;
        vault.metrics.wrote(RefKind::Manifest, size);
    }
    let seen = Seen {
        media_type,
        size,
        kind: RefKind::Manifest,
    };
    vault.store.mark_seen(repository, digest, &seen).await?;
    let Ok(manifest) = parsed else { return Ok(()) };
    if depth >= MAX_DEPTH {
        return Ok(());
    }
    for (child, media_type, kind, size, layer) in references(&manifest, &vault.settings) {
        // Known means recorded within the hour, so not tombstoned (a delete forgets it).
        if !vault.wants(repository, &child) {
            continue;
        }
        vault.known.insert(Vault::key(repository, &child), ());
        if layer && vault.settings.layers {
            // A client's pull may copy it: from now on, not only once the filler gets to it.
            vault
                .awaiting_pull
                .insert(Vault::key(repository, &child), ());
        }
        let work = Work::Reference {
            repository: repository.to_owned(),
            digest: child.clone(),
            media_type,
            kind,
            size,
            auth: auth.clone(),
            depth: depth + 1,
            pushed,
            wait_for_pull: layer,
        };
        vault.enqueue(work, repository, &child);
    }
    Ok(())
}

/// Redirects followed at most (storage backends redirect blob reads to their own URLs).
const MAX_REDIRECTS: usize = 1;

/// GET from the registry as whoever caused the fill, else with the heal credentials; one
/// redirect is followed, without credentials if it leaves the registry's host.
async fn get(
    source: Option<&Source>,
    path: &str,
    auth: Option<&HeaderValue>,
) -> Result<http::Response<hyper::body::Incoming>, FillError> {
    let source = source.ok_or(FillError::NoSource)?;
    let mut tried = Vec::new();
    for a in [auth, source.fallback.as_ref()] {
        if tried.contains(&a) {
            continue;
        }
        tried.push(a);
        let mut req = own_request(
            &source.upstream,
            Method::GET,
            path,
            a,
            UpstreamBody::empty(),
        )
        .map_err(|e| FillError::Registry(e.to_string()))?;
        req.headers_mut()
            .insert(header::ACCEPT, crate::oci::accept_all());
        let mut resp = send(source, req).await?;
        for _ in 0..MAX_REDIRECTS {
            if !resp.status().is_redirection() {
                break;
            }
            let Some(next) = redirect(source, &resp, a) else {
                break;
            };
            resp = send(source, next).await?;
        }
        match resp.status() {
            StatusCode::OK => return Ok(resp),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => continue,
            s => return Err(FillError::Registry(format!("{path} answered {s}"))),
        }
    }
    Err(FillError::Registry(format!(
        "{path}: not authorised to read it"
    )))
}

async fn send(
    source: &Source,
    req: http::Request<UpstreamBody>,
) -> Result<http::Response<hyper::body::Incoming>, FillError> {
    tokio::time::timeout(source.timeout, source.client.request(req))
        .await
        .map_err(|_| FillError::Registry(format!("no answer within {:?}", source.timeout)))?
        .map_err(|e| FillError::Registry(e.to_string()))
}

/// The request a redirect points to: its `Location` (absolute, or a path on the registry),
/// with the credentials only if it stays on the registry's host.
fn redirect(
    source: &Source,
    resp: &http::Response<hyper::body::Incoming>,
    auth: Option<&HeaderValue>,
) -> Option<http::Request<UpstreamBody>> {
    let location = resp.headers().get(header::LOCATION)?.to_str().ok()?;
    if location.starts_with('/') {
        return own_request(
            &source.upstream,
            Method::GET,
            location,
            auth,
            UpstreamBody::empty(),
        )
        .ok();
    }
    let uri: http::Uri = location.parse().ok()?;
    let authority = uri.authority()?.clone();
    let same_host =
        authority == source.upstream.authority && uri.scheme() == Some(&source.upstream.scheme);
    let mut req = http::Request::get(uri)
        .header(header::HOST, authority.as_str())
        .header(header::USER_AGENT, crate::upstream::user_agent())
        .body(UpstreamBody::empty())
        .ok()?;
    if let (true, Some(a)) = (same_host, auth) {
        req.headers_mut().insert(header::AUTHORIZATION, a.clone());
    }
    Some(req)
}

/// A manifest from the registry, and the type it was served with.
async fn fetch_manifest(
    source: Option<&Source>,
    repository: &str,
    digest: &str,
    auth: Option<&HeaderValue>,
) -> Result<(Bytes, String), FillError> {
    let timeout = source.map_or(std::time::Duration::from_secs(30), |s| s.timeout);
    let resp = get(
        source,
        &format!("/v2/{repository}/manifests/{digest}"),
        auth,
    )
    .await?;
    let served_as = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| crate::oci::media_type_essence(v).to_owned())
        .unwrap_or_default();
    let body = tokio::time::timeout(
        timeout,
        Limited::new(resp.into_body(), MAX_MANIFEST_BYTES).collect(),
    )
    .await
    .map_err(|_| FillError::Registry("manifest body too slow".into()))?
    .map_err(|e| FillError::Registry(format!("reading manifest: {e}")))?;
    Ok((body.to_bytes(), served_as))
}

/// Streams a blob from the registry into the vault; visible only if it hashes to `digest`,
/// and abandoned past `limit` bytes.
async fn fetch_blob(
    vault: &Vault,
    (source, auth): (Option<&Source>, Option<&HeaderValue>),
    repository: &str,
    digest: &str,
    limit: u64,
) -> Result<u64, FillError> {
    let timeout = source.map_or(std::time::Duration::from_secs(30), |s| s.timeout);
    let resp = get(source, &format!("/v2/{repository}/blobs/{digest}"), auth).await?;
    let mut body = resp.into_body();
    let mut upload = vault.store.upload(digest).await?;
    loop {
        // The timeout is per frame: a large layer may take long, a stalled one may not.
        let frame = match tokio::time::timeout(timeout, body.frame()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                upload.abort().await;
                return Err(FillError::Registry(format!("reading blob: {e}")));
            }
            Err(_) => {
                upload.abort().await;
                return Err(FillError::Registry("blob body stalled".into()));
            }
        };
        if let Ok(data) = frame.into_data() {
            if upload.written() + data.len() as u64 > limit {
                upload.abort().await;
                return Err(FillError::TooLarge(digest.to_owned()));
            }
            if let Err(e) = upload.write(&data).await {
                upload.abort().await;
                return Err(e.into());
            }
        }
    }
    Ok(upload.finish().await?)
}
