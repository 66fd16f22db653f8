//! The vault's filler: writes handed-over manifests (after checking their digest) and fetches
//! what they reference from the registry, a bounded number at a time, off the request path.

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

async fn process(vault: &Vault, source: Option<&Source>, work: Work) -> Result<(), FillError> {
    match work {
        Work::Manifest {
            repository,
            digest,
            media_type,
            body,
            auth,
            depth,
        } => keep_manifest(vault, &repository, &digest, &media_type, body, auth, depth).await,
        Work::Blob {
            repository,
            digest,
            body,
        } => {
            let size = body.len() as u64;
            if vault.store.content_size(&digest).await?.is_none() {
                vault.store.put_bytes(&digest, body).await?;
                vault.metrics.wrote(RefKind::Blob, size);
            }
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
            ..
        } => {
            let body = match vault
                .store
                .read_verified(&digest, MAX_MANIFEST_BYTES as u64)
                .await
            {
                Ok(Some(body)) => body,
                // Not held (or held damaged: fetch it again, which replaces it).
                Ok(None) | Err(super::StoreError::Corrupt { .. }) => {
                    vault.metrics.fetches.with_label_values(&["manifest"]).inc();
                    fetch_manifest(source, &repository, &digest, auth.as_ref()).await?
                }
                Err(e) => return Err(e.into()),
            };
            keep_manifest(vault, &repository, &digest, &media_type, body, auth, depth).await
        }
        Work::Reference {
            repository,
            digest,
            media_type,
            kind: RefKind::Blob,
            size,
            auth,
            ..
        } => {
            if vault.store.content_size(&digest).await?.is_none() {
                // Copied as it was uploaded: no need to read it back (unless the copy is wrong).
                let copied = match vault.take_pending(&repository, &digest) {
                    Some(body) => {
                        let size = body.len() as u64;
                        match vault.store.put_bytes(&digest, body).await {
                            Ok(()) => Some(size),
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
                    Some(size) => size,
                    None => {
                        vault.metrics.fetches.with_label_values(&["blob"]).inc();
                        fetch_blob(vault, source, &repository, &digest, auth.as_ref()).await?
                    }
                };
                vault.metrics.wrote(RefKind::Blob, written);
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

async fn keep_manifest(
    vault: &Vault,
    repository: &str,
    digest: &str,
    media_type: &str,
    body: Bytes,
    auth: Option<HeaderValue>,
    depth: u32,
) -> Result<(), FillError> {
    let media_type = if media_type.is_empty() {
        crate::oci::body_media_type(&body).unwrap_or_default()
    } else {
        crate::oci::media_type_essence(media_type).to_owned()
    };
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
    for (child, media_type, kind, size) in references(&manifest, &vault.settings) {
        if !vault.wants(repository, &child) {
            continue;
        }
        vault.known.insert(Vault::key(repository, &child), ());
        let work = Work::Reference {
            repository: repository.to_owned(),
            digest: child.clone(),
            media_type,
            kind,
            size,
            auth: auth.clone(),
            depth: depth + 1,
        };
        vault.enqueue(work, repository, &child);
    }
    Ok(())
}

/// GET from the registry as whoever caused the fill, else with the heal credentials.
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
        let resp = tokio::time::timeout(source.timeout, source.client.request(req))
            .await
            .map_err(|_| FillError::Registry(format!("no answer within {:?}", source.timeout)))?
            .map_err(|e| FillError::Registry(e.to_string()))?;
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

async fn fetch_manifest(
    source: Option<&Source>,
    repository: &str,
    digest: &str,
    auth: Option<&HeaderValue>,
) -> Result<Bytes, FillError> {
    let timeout = source.map_or(std::time::Duration::from_secs(30), |s| s.timeout);
    let resp = get(
        source,
        &format!("/v2/{repository}/manifests/{digest}"),
        auth,
    )
    .await?;
    let body = tokio::time::timeout(
        timeout,
        Limited::new(resp.into_body(), MAX_MANIFEST_BYTES).collect(),
    )
    .await
    .map_err(|_| FillError::Registry("manifest body too slow".into()))?
    .map_err(|e| FillError::Registry(format!("reading manifest: {e}")))?;
    Ok(body.to_bytes())
}

/// Streams a blob from the registry into the vault; visible only if it hashes to `digest`.
async fn fetch_blob(
    vault: &Vault,
    source: Option<&Source>,
    repository: &str,
    digest: &str,
    auth: Option<&HeaderValue>,
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
            if let Err(e) = upload.write(&data).await {
                upload.abort().await;
                return Err(e.into());
            }
        }
    }
    Ok(upload.finish().await?)
}
