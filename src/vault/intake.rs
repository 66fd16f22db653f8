//! What the vault is handed: manifests (pushed, served, fetched), blob uploads copied as
//! they streamed, layers copied as clients pull them, and references for the filler. Nothing
//! here waits: work is queued (bounded in items and bytes) or dropped and counted.

use std::sync::Arc;

use bytes::Bytes;
use http::HeaderValue;
use tokio::sync::mpsc;

use super::{Seen, StoreError, Vault, Work, QUEUED_BYTES, TEE_BYTES};
use crate::oci::RefKind;

impl Vault {
    /// Keeps a manifest seen in `repository` (served, or fetched by a check), and in time
    /// what it references. Never waits: the bytes are hashed and written by the filler.
    pub fn keep_manifest(
        &self,
        repository: &str,
        digest: &str,
        media_type: &str,
        body: Bytes,
        auth: Option<&HeaderValue>,
    ) {
        self.keep(repository, digest, media_type, body, auth, false);
    }

    /// Keeps a manifest the registry just accepted from a push through regguard: it, and what
    /// it references, are recorded even if they were deleted from `repository` before.
    pub fn keep_pushed_manifest(
        &self,
        repository: &str,
        digest: &str,
        media_type: &str,
        body: Bytes,
        auth: Option<&HeaderValue>,
    ) {
        self.known.invalidate(&Self::key(repository, digest));
        self.deleted.invalidate(&Self::key(repository, digest));
        self.keep(repository, digest, media_type, body, auth, true);
    }

    fn keep(
        &self,
        repository: &str,
        digest: &str,
        media_type: &str,
        body: Bytes,
        auth: Option<&HeaderValue>,
        pushed: bool,
    ) {
        let Some(key) = self.fresh(repository, digest) else {
            return;
        };
        self.known.insert(key, ());
        let work = if self.reserve(body.len()) {
            Work::Manifest {
                repository: repository.to_owned(),
                digest: digest.to_owned(),
                media_type: media_type.to_owned(),
                body,
                auth: auth.cloned(),
                depth: 0,
                pushed,
            }
        } else {
            // The queue holds enough bytes: the filler fetches this one by digest.
            fetch(
                repository,
                digest,
                media_type,
                RefKind::Manifest,
                auth,
                pushed,
            )
        };
        self.enqueue(work, repository, digest);
    }

    /// The key of a (repository, digest) the vault should be handed now: a name and digest
    /// the registry would accept, not recorded (or queued) within the hour.
    fn fresh(&self, repository: &str, digest: &str) -> Option<(Arc<str>, Arc<str>)> {
        if !crate::oci::is_sha256_digest(digest) || !crate::route::is_repository_name(repository) {
            return None;
        }
        let key = Self::key(repository, digest);
        (!self.known.contains_key(&key)).then_some(key)
    }

    /// Counts `n` body bytes into the queue, if there is room.
    pub(super) fn reserve(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        let mut now = self.queued_bytes.load(Ordering::Relaxed);
        loop {
            if now + n > QUEUED_BYTES {
                return false;
            }
            match self.queued_bytes.compare_exchange_weak(
                now,
                now + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => now = actual,
            }
        }
    }

    /// Gives back what [`Vault::reserve`] counted, when the work is taken off the queue.
    pub(crate) fn release(&self, work: &Work) {
        let n = match work {
            Work::Manifest { body, .. } | Work::Blob { body, .. } => body.len(),
            Work::Reference { .. } => 0,
        };
        self.queued_bytes
            .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Keeps a blob uploaded to `repository` whose bytes were copied as they streamed (written
    /// only if they hash to `digest`). With `layers` off it is written only once a kept
    /// manifest names it as its config.
    pub fn keep_blob(&self, repository: &str, digest: &str, body: Bytes) {
        let Some(key) = self.fresh(repository, digest) else {
            return;
        };
        self.deleted.invalidate(&key); // uploaded again: a push
        if !self.settings.layers {
            // A config or a layer? The manifest will say; until then it waits in memory.
            self.pending.insert(key, body);
            return;
        }
        if !self.reserve(body.len()) {
            return; // the filler fetches it when its manifest is kept
        }
        self.known.insert(key, ());
        let work = Work::Blob {
            repository: repository.to_owned(),
            digest: digest.to_owned(),
            body,
        };
        self.enqueue(work, repository, digest);
    }

    /// Keeps a manifest or blob seen in `repository` whose bytes the caller does not hold:
    /// the filler fetches it from the registry.
    pub fn keep_reference(
        &self,
        repository: &str,
        digest: &str,
        media_type: &str,
        kind: RefKind,
        auth: Option<&HeaderValue>,
    ) {
        let Some(key) = self.fresh(repository, digest) else {
            return;
        };
        self.known.insert(key, ());
        let work = fetch(repository, digest, media_type, kind, auth, false);
        self.enqueue(work, repository, digest);
    }

    /// A copy of blob `digest` as a client pulls it from `repository` (with `layers` on, when
    /// the vault lacks it and a copy slot is free), written as it streams and kept only if
    /// the whole body arrived and hashes to the digest.
    pub fn tee_blob(self: &Arc<Self>, repository: &str, digest: &str) -> Option<crate::body::Tee> {
        if !self.settings.layers
            || !crate::oci::is_sha256_digest(digest)
            || !crate::route::is_repository_name(repository)
        {
            return None;
        }
        let key = Self::key(repository, digest);
        // Not recorded within the hour, or queued by the filler for a pull to copy.
        if self.known.contains_key(&key) && !self.awaiting_pull.contains_key(&key) {
            return None;
        }
        let permit = self.tee_slots.clone().try_acquire_owned().ok()?;
        self.awaiting_pull.invalidate(&key);
        self.teeing.insert(key.clone(), ());
        self.known.insert(key.clone(), ());
        let (tee, mut rx) = crate::body::Tee::new(TEE_BYTES);
        let vault = self.clone();
        let (repository, digest) = (repository.to_owned(), digest.to_owned());
        self.background.spawn(async move {
            let _permit = permit;
            let written = async {
                if vault.store.is_tombstoned(&repository, &digest).await? {
                    return Ok(None);
                }
                let held = vault.store.content_size(&digest).await?;
                let size = match held {
                    // Held already (seen in another repository): only the record is new.
                    Some(size) => {
                        while rx.recv().await.is_some() {}
                        size
                    }
                    None => {
                        let mut upload = vault.store.upload(&digest).await?;
                        while let Some(chunk) = rx.recv().await {
                            if let Err(e) = upload.write(&chunk).await {
                                upload.abort().await;
                                return Err(e);
                            }
                        }
                        if !rx.complete() {
                            upload.abort().await;
                            return Ok(None);
                        }
                        let size = upload.finish().await?;
                        vault.metrics.wrote(RefKind::Blob, size);
                        size
                    }
                };
                // A delete may have come while the layer streamed.
                if !rx.complete()
                    || vault.just_deleted(&repository, &digest)
                    || vault.store.is_tombstoned(&repository, &digest).await?
                {
                    return Ok(None);
                }
                let seen = Seen {
                    media_type: String::new(),
                    size,
                    kind: RefKind::Blob,
                };
                vault.store.mark_seen(&repository, &digest, &seen).await?;
                Ok(Some(size))
            }
            .await;
            vault.teeing.invalidate(&key);
            match written {
                Ok(Some(_)) => {}
                Ok(None) => vault.known.invalidate(&key),
                Err(e) => {
                    vault.known.invalidate(&key);
                    vault.count_failure(&e);
                    if matches!(e, StoreError::Mismatch { .. }) {
                        vault.metrics.verification_failures.inc();
                    }
                    tracing::debug!(%repository, %digest, error = %e, "vault: pulled layer not kept");
                }
            }
        });
        Some(tee)
    }

    /// The copied upload of `digest` in `repository`, if one is waiting.
    pub(crate) fn take_pending(&self, repository: &str, digest: &str) -> Option<Bytes> {
        self.pending.remove(&Self::key(repository, digest))
    }

    pub(super) fn enqueue(&self, work: Work, repository: &str, digest: &str) {
        if let Err(e) = self.queue.try_send(work) {
            let work = match e {
                mpsc::error::TrySendError::Full(w) | mpsc::error::TrySendError::Closed(w) => w,
            };
            self.release(&work);
            self.metrics.dropped.inc();
            self.known.invalidate(&Self::key(repository, digest));
        }
    }
}

/// Work for the filler to fetch `digest` from the registry (its bytes are not at hand).
fn fetch(
    repository: &str,
    digest: &str,
    media_type: &str,
    kind: RefKind,
    auth: Option<&HeaderValue>,
    pushed: bool,
) -> Work {
    Work::Reference {
        repository: repository.to_owned(),
        digest: digest.to_owned(),
        media_type: media_type.to_owned(),
        kind,
        size: 0,
        auth: auth.cloned(),
        depth: 0,
        pushed,
        wait_for_pull: false,
    }
}
