//! The vault: the verified bytes of what regguard has seen, so that a lost manifest or blob
//! can still be served, and the registry repaired.
//!
//! What it keeps, per repository it was seen in: every manifest and index that passes through
//! (pushed, pulled, or fetched by validation, scan or the CLI), each one's config blob (up to
//! `max_blob_size`), and with `layers` every layer. Manifests are handed over whole by their
//! callers; the blobs they reference are then fetched from the registry by a background
//! filler (a pusher that skipped a blob the registry already had, or mounted it from another
//! repository, never streamed it through regguard). Nothing is written before its sha256 is
//! checked; nothing is served before it is checked again.
//!
//! It knows nothing of the request path: the proxy asks it for bytes after a 404, the healer
//! asks it for what to re-upload. Storage is behind [`store::Store`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::HeaderValue;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::mpsc;

use crate::config::{Upstream, VaultSettings};
use crate::oci::{ManifestKind, RefKind};
use crate::upstream::UpstreamClient;

mod fill;
mod intake;
pub mod store;

pub use store::{Location, Seen, Store, StoreError};

/// How long a (repository, digest) recorded is not written again: its record's time is
/// "last seen", refreshed at most this often (retention is counted in days).
const REFRESH: Duration = Duration::from_secs(3600);
/// Pending fill work at most; past it work is dropped and counted (a pull never waits).
const QUEUE: usize = 4096;
/// Fill workers: each holds one registry request (and for a blob one upload) at a time.
const WORKERS: usize = 2;
/// How long a blob's verification stands before it is hashed again for the next serve.
const VERIFIED_FOR: Duration = Duration::from_secs(600);

/// The vault's metrics.
pub struct VaultMetrics {
    pub objects: IntGauge,
    pub bytes: IntGauge,
    writes: IntCounterVec,
    hits: IntCounterVec,
    pub verification_failures: IntCounter,
    pub dropped: IntCounter,
    pub errors: IntCounter,
    pub pruned: IntCounter,
    /// Manifests and blobs the filler read from the registry (not handed over or copied).
    fetches: IntCounterVec,
}

impl VaultMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let objects = IntGauge::new(
            "regguard_vault_objects",
            "Content objects (manifests and blobs) in the vault, as of the last listing plus writes since",
        )?;
        let bytes = IntGauge::new(
            "regguard_vault_bytes",
            "Content bytes in the vault, as of the last listing plus writes since",
        )?;
        let writes = IntCounterVec::new(
            Opts::new(
                "regguard_vault_writes_total",
                "Content objects written to the vault after their digest verified, by kind (manifest, blob)",
            ),
            &["kind"],
        )?;
        let hits = IntCounterVec::new(
            Opts::new(
                "regguard_vault_hits_total",
                "Vault lookups that found verified content for the repository asked, by kind",
            ),
            &["kind"],
        )?;
        let verification_failures = IntCounter::new(
            "regguard_vault_verification_failures_total",
            "Vault objects whose bytes did not match their digest when read (never served), or content that did not match its digest when written (never kept)",
        )?;
        let dropped = IntCounter::new(
            "regguard_vault_dropped_total",
            "Manifests and blobs not kept because the vault's queue was full",
        )?;
        let errors = IntCounter::new(
            "regguard_vault_errors_total",
            "Vault storage or fill failures (the log says which)",
        )?;
        let pruned = IntCounter::new(
            "regguard_vault_pruned_total",
            "Content objects removed by retention or the size cap",
        )?;
        let fetches = IntCounterVec::new(
            Opts::new(
                "regguard_vault_fetches_total",
                "Manifests and blobs the vault's filler read back from the registry because they did not stream through regguard, by kind",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(fetches.clone()))?;
        for m in [&objects, &bytes] {
            registry.register(Box::new(m.clone()))?;
        }
        registry.register(Box::new(writes.clone()))?;
        registry.register(Box::new(hits.clone()))?;
        for c in [&verification_failures, &dropped, &errors, &pruned] {
            registry.register(Box::new(c.clone()))?;
        }
        for kind in [RefKind::Manifest, RefKind::Blob] {
            writes.with_label_values(&[kind.as_str()]);
            hits.with_label_values(&[kind.as_str()]);
            fetches.with_label_values(&[kind.as_str()]);
        }
        Ok(VaultMetrics {
            objects,
            bytes,
            writes,
            hits,
            verification_failures,
            dropped,
            errors,
            pruned,
            fetches,
        })
    }

    fn hit(&self, kind: RefKind) {
        self.hits.with_label_values(&[kind.as_str()]).inc();
    }

    fn fetched(&self, kind: RefKind) {
        self.fetches.with_label_values(&[kind.as_str()]).inc();
    }

    fn wrote(&self, kind: RefKind, size: u64) {
        self.writes.with_label_values(&[kind.as_str()]).inc();
        self.objects.inc();
        self.bytes.add(i64::try_from(size).unwrap_or(i64::MAX));
    }
}

/// Where the filler fetches blobs: the registry, with the credentials of whoever caused it
/// (else `fallback`, the heal credentials).
#[derive(Clone)]
pub struct Source {
    pub client: UpstreamClient,
    pub upstream: Upstream,
    pub fallback: Option<HeaderValue>,
    pub timeout: Duration,
}

/// Work for the filler.
pub(crate) enum Work {
    /// A manifest's bytes, seen in `repository`.
    Manifest {
        repository: String,
        digest: String,
        media_type: String,
        body: Bytes,
        auth: Option<HeaderValue>,
        depth: u32,
        /// Pushed through regguard (the registry answered 201): lifts tombstones.
        pushed: bool,
    },
    /// A blob's bytes, copied as they were uploaded to `repository`.
    Blob {
        repository: String,
        digest: String,
        body: Bytes,
    },
    /// A reference a kept manifest makes, to be kept too.
    Reference {
        repository: String,
        digest: String,
        media_type: String,
        kind: RefKind,
        size: u64,
        auth: Option<HeaderValue>,
        depth: u32,
        /// Named by a manifest pushed through regguard: lifts tombstones.
        pushed: bool,
        /// A layer the filler should leave a client's pull to copy first (see [`LAYER_DELAY`]);
        /// false once it has waited.
        wait_for_pull: bool,
    },
}

/// The vault.
pub struct Vault {
    /// Where the writes the request path hands over run (see `supervise::Background`).
    background: crate::supervise::Background,
    store: Store,
    settings: VaultSettings,
    /// (repository, digest) recorded within [`REFRESH`], or queued.
    known: moka::sync::Cache<(Arc<str>, Arc<str>), ()>,
    /// Blobs verified recently (hashing a layer on every Range request would be wasteful).
    verified: moka::sync::Cache<Arc<str>, u64>,
    queue: mpsc::Sender<Work>,
    /// Bytes of bodies waiting in `queue` (bounded by [`QUEUED_BYTES`]).
    queued_bytes: std::sync::atomic::AtomicUsize,
    /// Layers being copied from a client's pull right now.
    teeing: moka::sync::Cache<(Arc<str>, Arc<str>), ()>,
    /// Layers waiting out [`LAYER_DELAY`] at most; past it they are fetched at once.
    delayed: Arc<tokio::sync::Semaphore>,
    /// Deletes seen in the last minutes, by (repository, digest).
    deleted: moka::sync::Cache<(Arc<str>, Arc<str>), ()>,
    /// Damaged objects logged within the hour.
    complained: moka::sync::Cache<Arc<str>, ()>,
    /// Layers the filler put off for a client's pull to copy (see [`LAYER_DELAY`]).
    awaiting_pull: moka::sync::Cache<(Arc<str>, Arc<str>), ()>,
    /// Layer copies being written as clients pull them, at most [`TEE_COPIES`] at once.
    tee_slots: Arc<tokio::sync::Semaphore>,
    /// Blobs copied from uploads, waiting for a manifest to say they are configs (with
    /// `layers` off, only configs are kept; the rest expire here unwritten).
    pending: moka::sync::Cache<(Arc<str>, Arc<str>), Bytes>,
    pub metrics: VaultMetrics,
}

/// Layers copied into the vault as clients pull them, at once at most; each copy may fall
/// [`TEE_BYTES`] behind its client (bytes relayed and not yet written) before it is
/// abandoned (to the filler). At most 4 × 8 MiB held for copies.
const TEE_COPIES: usize = 4;
const TEE_BYTES: usize = 8 << 20;
/// With `layers` on, the filler waits this long before fetching a layer a kept manifest
/// names: a client pulling the image usually streams it through regguard first, and that
/// copy saves reading it from the registry twice.
pub const LAYER_DELAY: Duration = Duration::from_secs(30);

/// How long a DELETE waits for the vault to record it, at most.
const TOMBSTONE_WAIT: Duration = Duration::from_secs(2);

/// Manifests of a repository read at most to learn what a delete must leave in place.
const MAX_SIBLINGS: usize = 2000;

/// Manifest and blob bytes waiting in the filler's queue, at most; past it a manifest is
/// queued without its body (the filler fetches it) and a blob copy is dropped.
const QUEUED_BYTES: usize = 128 * 1024 * 1024;

/// Bytes of uploaded blobs waiting for their manifest, at most, and for how long.
const PENDING_BYTES: u64 = 64 * 1024 * 1024;
const PENDING_FOR: Duration = Duration::from_secs(120);

/// Seconds since the Unix epoch.
fn now_epoch() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Vault {
    /// Opens the vault and starts its filler (which fetches referenced blobs from `source`;
    /// without one, only what is handed over is kept).
    pub fn open(
        settings: VaultSettings,
        source: Option<Source>,
        registry: &Registry,
    ) -> Result<Arc<Self>, VaultOpenError> {
        let location = settings
            .location
            .clone()
            .ok_or(VaultOpenError::NotConfigured)?;
        let store = Store::open(&location, &settings.aws)?;
        Self::with_store(store, settings, source, registry)
    }

    /// Opens an existing vault only to read from it (the CLI): nothing is created.
    pub fn open_existing(
        settings: VaultSettings,
        registry: &Registry,
    ) -> Result<Arc<Self>, VaultOpenError> {
        let location = settings
            .location
            .clone()
            .ok_or(VaultOpenError::NotConfigured)?;
        let store = Store::open_existing(&location, &settings.aws)?;
        Self::with_store(store, settings, None, registry)
    }

    fn with_store(
        store: Store,
        settings: VaultSettings,
        source: Option<Source>,
        registry: &Registry,
    ) -> Result<Arc<Self>, VaultOpenError> {
        let metrics = VaultMetrics::new(registry)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let vault = Arc::new(Vault {
            background: crate::supervise::Background::here(),
            store,
            settings,
            known: moka::sync::Cache::builder()
                .max_capacity(500_000)
                .time_to_live(REFRESH)
                .build(),
            verified: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(VERIFIED_FOR)
                .build(),
            queue: tx,
            queued_bytes: std::sync::atomic::AtomicUsize::new(0),
            tee_slots: Arc::new(tokio::sync::Semaphore::new(TEE_COPIES)),
            delayed: Arc::new(tokio::sync::Semaphore::new(10_000)),
            teeing: moka::sync::Cache::builder().max_capacity(1024).build(),
            deleted: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
            complained: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            awaiting_pull: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(LAYER_DELAY)
                .build(),
            pending: moka::sync::Cache::builder()
                .max_capacity(PENDING_BYTES)
                .weigher(|_: &(Arc<str>, Arc<str>), b: &Bytes| {
                    u32::try_from(b.len()).unwrap_or(u32::MAX)
                })
                .time_to_live(PENDING_FOR)
                .build(),
            metrics,
        });
        fill::start(Arc::downgrade(&vault), rx, source, WORKERS);
        Ok(vault)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn settings(&self) -> &VaultSettings {
        &self.settings
    }

    fn key(repository: &str, digest: &str) -> (Arc<str>, Arc<str>) {
        (Arc::from(repository), Arc::from(digest))
    }

    /// Whether the vault should be handed this (repository, digest) now: false when it was
    /// recorded within the last hour. Lets callers skip copying a body they would hand over.
    pub fn wants(&self, repository: &str, digest: &str) -> bool {
        !self.known.contains_key(&Self::key(repository, digest))
    }

    /// Forgets that `digest` was seen in `repository`: it was deleted on purpose (a DELETE
    /// through regguard, or the registry's delete notification), and must not come back.
    /// Takes effect at once in memory (nothing is served or recorded for it); the digest's
    /// own tombstone is written before this returns (waiting [`TOMBSTONE_WAIT`] at most, so
    /// a restart right after the DELETE does not forget it), and what it references is
    /// worked out in the background.
    pub async fn forget(self: &Arc<Self>, repository: &str, digest: &str) {
        let key = Self::key(repository, digest);
        self.deleted.insert(key.clone(), ());
        self.known.invalidate(&key);
        self.pending.invalidate(&key);
        let vault = self.clone();
        let (repository, digest) = (repository.to_owned(), digest.to_owned());
        let (recorded, wait) = tokio::sync::oneshot::channel::<()>();
        self.background.spawn(async move {
            // The record stays until the cascade has read it (serving already skips it).
            let own = vault.store.tombstone(&repository, &digest).await;
            let _ = recorded.send(());
            let result = match own {
                Ok(()) => vault.forget_in_store(&repository, &digest).await,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                vault.metrics.errors.inc();
                tracing::warn!(%repository, %digest, error = %e, "vault: cannot record a delete");
            }
        });
        // The cascade may take longer; the digest's own tombstone is one write.
        let _ = tokio::time::timeout(TOMBSTONE_WAIT, wait).await;
    }

    /// A deleted manifest also takes what it references (children, configs, layers) out of
    /// `repository`'s records, except what another manifest recorded there still references;
    /// each is tombstoned, so nothing records it there again but a push through regguard.
    async fn forget_in_store(&self, repository: &str, digest: &str) -> Result<(), StoreError> {
        let gone = self.closure(repository, vec![digest.to_owned()]).await;
        // What the repository's other manifests still reference stays.
        let mut others = Vec::new();
        let mut records = self.store.list_seen_in(repository);
        while let Some(entry) = records.next().await {
            let entry = entry?;
            if entry.repository == repository && !gone.contains(&entry.digest) {
                others.push(entry.digest);
            }
            if others.len() >= MAX_SIBLINGS {
                break;
            }
        }
        let live = self.closure(repository, others).await;
        for d in gone.iter().filter(|d| *d == digest || !live.contains(*d)) {
            self.store.tombstone(repository, d).await?;
            self.store.forget_seen(repository, d).await?;
            let key = Self::key(repository, d);
            self.known.invalidate(&key);
            self.pending.invalidate(&key);
        }
        Ok(())
    }

    /// `roots` and everything the manifests among them reference, as recorded in
    /// `repository` (bounded by the walk budget).
    async fn closure(
        &self,
        repository: &str,
        roots: Vec<String>,
    ) -> std::collections::HashSet<String> {
        let mut all: std::collections::HashSet<String> = roots.iter().cloned().collect();
        let mut todo = roots;
        let mut walked = 0;
        while let Some(d) = todo.pop() {
            if walked >= crate::checker::DEFAULT_MAX_REFERENCES * 4 {
                break;
            }
            let Ok(Some(seen)) = self.store.seen(repository, &d).await else {
                continue;
            };
            if seen.kind != RefKind::Manifest {
                continue;
            }
            let Ok(Some(body)) = self
                .store
                .read_verified(&d, crate::oci::MAX_MANIFEST_BYTES as u64)
                .await
            else {
                continue;
            };
            if let Ok(m) = crate::oci::Manifest::parse(&body, hint(&seen.media_type)) {
                for r in m.references() {
                    walked += 1;
                    if all.insert(r.digest.clone()) {
                        todo.push(r.digest.clone());
                    }
                }
            }
        }
        all
    }

    /// Whether `digest` was deleted from `repository` within the last minutes (before the
    /// store's tombstone is written, and as a fast path after).
    pub(crate) fn just_deleted(&self, repository: &str, digest: &str) -> bool {
        self.deleted.contains_key(&Self::key(repository, digest))
    }

    /// The record of `digest` as a `kind` seen in `repository`, unless it was deleted on
    /// purpose (also when a record outlived a restart before the delete's cascade removed it).
    async fn servable(
        &self,
        repository: &str,
        digest: &str,
        kind: RefKind,
    ) -> Result<Option<Seen>, StoreError> {
        if self.just_deleted(repository, digest) {
            return Ok(None);
        }
        let Some(seen) = self.store.seen(repository, digest).await? else {
            return Ok(None);
        };
        if seen.kind != kind || self.store.is_tombstoned(repository, digest).await? {
            return Ok(None);
        }
        Ok(Some(seen))
    }

    /// The verified bytes of manifest `digest` as seen in `repository`, with its record.
    pub async fn manifest(
        &self,
        repository: &str,
        digest: &str,
    ) -> Result<Option<(Seen, Bytes)>, StoreError> {
        let Some(seen) = self.servable(repository, digest, RefKind::Manifest).await? else {
            return Ok(None);
        };
        match self
            .store
            .read_verified(digest, crate::oci::MAX_MANIFEST_BYTES as u64)
            .await
        {
            Ok(Some(bytes)) => {
                self.metrics.hit(RefKind::Manifest);
                Ok(Some((seen, bytes)))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                self.count_failure(&e);
                Err(e)
            }
        }
    }

    /// Blob `digest` as seen in `repository`, verified (within the last ten minutes): its
    /// record and size. Stream it with [`Store::stream`].
    pub async fn blob(
        &self,
        repository: &str,
        digest: &str,
    ) -> Result<Option<(Seen, u64)>, StoreError> {
        let Some(seen) = self.servable(repository, digest, RefKind::Blob).await? else {
            return Ok(None);
        };
        let size = match self.verified.get(digest) {
            Some(size) => Some(size),
            None => match self.store.verify(digest).await {
                Ok(Some(size)) => {
                    self.verified.insert(Arc::from(digest), size);
                    Some(size)
                }
                Ok(None) => None,
                Err(e) => {
                    self.count_failure(&e);
                    return Err(e);
                }
            },
        };
        Ok(size.map(|size| {
            self.metrics.hit(RefKind::Blob);
            (seen, size)
        }))
    }

    /// Whether the vault holds `digest` as seen in `repository` (no verification: for plans
    /// and reports; serving and repairs verify).
    pub async fn holds(&self, repository: &str, digest: &str) -> Result<bool, StoreError> {
        Ok(self.store.seen(repository, digest).await?.is_some()
            && self.store.content_size(digest).await?.is_some())
    }

    fn count_failure(&self, e: &StoreError) {
        match e {
            StoreError::Corrupt { digest, found } => {
                self.metrics.verification_failures.inc();
                self.verified.invalidate(digest.as_str());
                // Once an hour per object: a damaged object asked for in a loop is one line.
                if !self.complained.contains_key(digest.as_str()) {
                    self.complained.insert(Arc::from(digest.as_str()), ());
                    tracing::error!(%digest, %found, location = %self.store.location(),
                        "vault object does not match its digest: not served (remove it; it will be kept again when next seen)");
                }
            }
            _ => self.metrics.errors.inc(),
        }
    }

    /// Removes what retention and the size cap say must go; refreshes the object gauges.
    pub async fn prune(&self) -> Result<PruneReport, StoreError> {
        prune::run(self).await
    }
}

mod prune;
pub use prune::PruneReport;

/// Why a vault could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum VaultOpenError {
    #[error("no vault location is set")]
    NotConfigured,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("vault metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// What a manifest references that the vault keeps too (digest, media type, kind, size,
/// whether it is a layer): an index's children (manifests); an image's config, and with
/// `layers` its layers (non-distributable layers, which carry
/// `urls`, are not in the registry).
pub(crate) fn references(
    manifest: &crate::oci::Manifest,
    settings: &VaultSettings,
) -> Vec<(String, String, RefKind, u64, bool)> {
    match manifest {
        crate::oci::Manifest::Index { manifests } => manifests
            .iter()
            .filter(|d| crate::oci::is_sha256_digest(&d.digest))
            .map(|d| {
                (
                    d.digest.clone(),
                    d.media_type.clone(),
                    RefKind::Manifest,
                    d.size,
                    false,
                )
            })
            .collect(),
        crate::oci::Manifest::Image { config, layers } => {
            let config =
                std::iter::once((config, false)).filter(|(c, _)| c.size <= settings.max_blob_size);
            let layers = layers
                .iter()
                .filter(|_| settings.layers)
                .filter(|l| l.urls.is_empty())
                .map(|l| (l, true));
            config
                .chain(layers)
                .filter(|(d, _)| crate::oci::is_sha256_digest(&d.digest))
                .map(|(d, layer)| {
                    (
                        d.digest.clone(),
                        d.media_type.clone(),
                        RefKind::Blob,
                        d.size,
                        layer,
                    )
                })
                .collect()
        }
    }
}

/// The kind a manifest media type hints at, for parsing a kept manifest.
pub(crate) fn hint(media_type: &str) -> Option<ManifestKind> {
    crate::oci::manifest_kind(media_type)
}

/// For the gauges and logs: now, in seconds since the epoch.
pub(crate) fn epoch_now() -> i64 {
    now_epoch()
}
