//! Serve-time validation: every index (and image manifest) a client is served
//! is checked in the background against what it references.
//!
//! The forwarding path only hands over a [`Job`] through a bounded queue
//! ([`Validator::submit`] never waits: when the queue is full the job is dropped
//! and counted). Workers resolve the manifest (the bytes the client got, if
//! complete and matching `Docker-Content-Digest`, else fetched by digest), ask
//! the shared [`Checker`] about every child (and, with `blobs`, every child
//! image's config and layers), and record what is broken in [`Integrity`].
//! A re-check loop revisits broken references every `missing_ttl`, so the
//! gauge heals without anyone pulling.
//!
//! It knows nothing of HTTP or the forwarding path beyond the [`Job`] it is handed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::CounterSet;
use bytes::Bytes;
use http::HeaderValue;
use moka::sync::Cache;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::{mpsc, Semaphore};

use crate::checker::{Checker, FetchError, OverBudget, RefKind, Walk};
use crate::config::ValidateSettings;
use crate::integrity::Integrity;
use crate::oci::{Manifest, ManifestKind};
use crate::supervise::Supervisor;

mod evidence;
mod recent;
mod walk;
pub use evidence::Witness;
use futures_util::FutureExt as _;

/// One manifest a client was served, to validate. No `Debug`: it holds credentials.
pub struct Job {
    pub repository: String,
    /// The tag or digest the client asked for.
    pub reference: String,
    /// `Docker-Content-Digest` of the response, if the upstream sent one.
    pub digest: Option<String>,
    /// The body the client received, when it was complete and under the manifest cap.
    pub body: Option<Bytes>,
    /// The body's share of the manifest memory budget, given back when the job is done.
    pub held: Option<crate::budget::Held>,
    pub kind: ManifestKind,
    /// The requesting client's credentials: checks see no more than the client could.
    pub auth: Option<HeaderValue>,
    /// When the response headers went to the client (detection latency starts here).
    pub seen_at: Instant,
    /// Also check the images' config and layers (`validate.blobs` for served manifests,
    /// `scan.blobs` for the scan).
    pub blobs: bool,
}

struct ValidateMetrics {
    index_checks: CounterSet<IndexCheck>,
    queue_depth: IntGauge,
    dropped: IntCounter,
    detection: Histogram,
    /// `regguard_client_not_found_total`, indexed `[kind: manifest, blob][referenced: false, true]`.
    not_found: [[IntCounter; 2]; 2],
}

/// Bytes the referenced map may hold (see its construction).
const REFERENCED_BYTES: u64 = 256 * 1024 * 1024;

/// The validator: the queue the forwarding path submits to, and its workers.
pub struct Validator {
    shared: Arc<Shared>,
    inspector: Arc<Inspector>,
}

/// What the validator and its inspector share: the queue, metrics and what has been seen.
struct Shared {
    tx: mpsc::Sender<Job>,
    /// Where re-checks the request path asks for run (see `supervise::Background`).
    background: crate::supervise::Background,
    metrics: ValidateMetrics,
    /// (repository, digest) of every child and blob of a manifest seen, with the indexes
    /// that reference it: a 404 for one of these is a real hole, and those indexes are broken.
    referenced: evidence::Referenced,
    /// (repository, manifest digest, with blobs) validated ok within `ok_ttl`: served again,
    /// it is counted from this verdict without a job (its references' presence is cached as
    /// long). A validation without blob checks does not stand in for one with them.
    recent_ok: recent::RecentOk,
    /// (repository, index digest) → the reference it was served under: the indexes to
    /// validate again when something in their repository is deleted.
    indexes: Cache<(Arc<str>, Arc<str>), Arc<str>>,
    /// Losses handled within the last [`evidence::LOSS_DEDUP`].
    recent_loss: Cache<(Arc<str>, Arc<str>), ()>,
    /// Client 404s for digests no walked index referenced yet, with the client's `Accept`.
    orphan_loss: Cache<(Arc<str>, Arc<str>), evidence::Orphan>,
}

/// Validates one manifest against what it references, and records the findings. Used by the
/// queue's workers, and directly by the scan, so every caller reaches the same verdicts.
pub struct Inspector {
    checker: Arc<Checker>,
    integrity: Arc<Integrity>,
    settings: ValidateSettings,
    shared: Arc<Shared>,
    /// The service credentials (the scan's): for re-checks and re-validations nobody asked for.
    service_auth: Option<HeaderValue>,
}

/// The summary of one validation.
#[derive(Debug, Default)]
struct Tally {
    broken: usize,
    unauthorized: usize,
    errors: usize,
    /// Digests judged present (healed at the end unless another descriptor broke).
    ok: Vec<String>,
    broken_digests: std::collections::HashSet<String>,
    /// The walk reached `validate.max_references` and stopped.
    over_budget: Option<OverBudget>,
}

crate::metrics::labels! {
    /// The verdict on one validated manifest: the `result` label of
    /// `regguard_index_checks_total` (counted for indexes only).
    pub enum IndexCheck {
        /// Every reference present and right.
        Ok => "ok",
        /// At least one reference missing or wrong.
        Broken => "broken",
        /// Some reference could not be read with the credentials at hand.
        Unauthorized => "unauthorized",
        /// Some reference could not be checked (timeout, 5xx, over budget).
        Error => "error",
    }
}

/// What one validation concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validated {
    /// The manifest was read and its references judged.
    Checked(IndexCheck),
    /// The manifest no longer exists (deleted after it was served): nothing to judge,
    /// and nothing counted.
    Gone,
}

/// What one validation found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub result: Validated,
    /// The manifest was an index (or manifest list).
    pub index: bool,
    /// Broken references found.
    pub broken: usize,
}

impl Validator {
    /// Starts the workers and the re-check loop; returns the handle the proxy submits to.
    pub fn start(
        settings: ValidateSettings,
        checker: Arc<Checker>,
        integrity: Arc<Integrity>,
        registry: &Registry,
        supervisor: &Arc<Supervisor>,
        service_auth: Option<HeaderValue>,
    ) -> Result<Arc<Self>, prometheus::Error> {
        let index_checks = CounterSet::new(
            registry,
            "regguard_index_checks_total",
            "Index validations by result (ok, broken, unauthorized, error)",
            "result",
        )?;
        let queue_depth =
            IntGauge::new("regguard_validation_queue_depth", "Validation jobs waiting")?;
        registry.register(Box::new(queue_depth.clone()))?;
        let dropped = IntCounter::new(
            "regguard_validation_dropped_total",
            "Validation jobs dropped because the queue was full (clients never wait for validation)",
        )?;
        registry.register(Box::new(dropped.clone()))?;
        let detection = Histogram::with_opts(
            HistogramOpts::new(
                "regguard_detection_seconds",
                "From the index response reaching the client to its broken child being known",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        registry.register(Box::new(detection.clone()))?;
        let not_found = IntCounterVec::new(
            Opts::new(
                "regguard_client_not_found_total",
                "404s passed to clients for a manifest or blob by digest; referenced=\"true\" when an index or manifest regguard has seen references it",
            ),
            &["kind", "referenced"],
        )?;
        registry.register(Box::new(not_found.clone()))?;
        let nf = |k: &str, r: &str| not_found.get_metric_with_label_values(&[k, r]);
        let not_found = [
            [nf("manifest", "false")?, nf("manifest", "true")?],
            [nf("blob", "false")?, nf("blob", "true")?],
        ];

        let (tx, rx) = mpsc::channel(settings.queue_capacity);
        let shared = Arc::new(Shared {
            tx,
            background: crate::supervise::Background::here(),
            metrics: ValidateMetrics {
                index_checks,
                queue_depth,
                dropped,
                detection,
                not_found,
            },
            // Weighed in bytes (the strings kept, plus ~100 bytes of overhead per parent):
            // 256 MiB is over a million references of real images (a few hundred bytes
            // each), and crafted ones (long platforms are cut to 256 bytes, at most 8
            // parents) cannot take more; past it the least recently used go, and a 404
            // for one of those is counted as unreferenced.
            referenced: Cache::builder()
                .weigher(|k: &(Arc<str>, Arc<str>), v: &evidence::Parents| evidence::weight(k, v))
                .max_capacity(REFERENCED_BYTES)
                .time_to_idle(Duration::from_secs(24 * 3600))
                .build(),
            // Manifests validated ok within ok_ttl: one entry per (repository, digest)
            // served; 100,000 covers every index a registry serves in five minutes.
            recent_ok: recent::RecentOk::new(100_000, settings.ok_ttl),
            // Indexes served in the last day, per repository: 100,000 covers a large
            // registry's active tags; past it, the least recently served are forgotten
            // (a delete then re-validates them only when they are served again).
            indexes: Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(24 * 3600))
                .build(),
            recent_loss: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(evidence::LOSS_DEDUP)
                .build(),
            // A walk meets the children of the index just served within seconds.
            orphan_loss: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(evidence::ORPHAN_FOR)
                .build(),
        });
        let inspector = Arc::new(Inspector {
            checker,
            integrity,
            settings,
            shared: shared.clone(),
            service_auth: service_auth.map(evidence::sensitive),
        });
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let (w, sup) = (inspector.clone(), supervisor.clone());
        supervisor.spawn("dispatcher", move || {
            dispatch(rx.clone(), w.clone(), sup.clone())
        });
        let w = inspector.clone();
        supervisor.spawn("recheck", move || recheck_loop(w.clone()));
        Ok(Arc::new(Validator { shared, inspector }))
    }

    /// The inspector, for callers that validate synchronously (the scan).
    pub fn inspector(&self) -> Arc<Inspector> {
        self.inspector.clone()
    }

    /// Queues a job; never waits. A full queue drops the job and counts it.
    pub fn submit(&self, job: Job) {
        self.shared.submit(job);
    }

    /// True (and counted as an ok validation) when this manifest was validated ok within
    /// `ok_ttl`, with blob checks if `blobs`: the caller need not tap or queue anything.
    pub fn recently_ok(
        &self,
        repository: &str,
        digest: &str,
        kind: ManifestKind,
        blobs: bool,
    ) -> bool {
        let recent = &self.shared.recent_ok;
        // Without blob checks either entry will do; the one such a server inserts (`false`)
        // is looked up first, so the steady state costs one lookup, not two.
        let hit = if blobs {
            recent.contains(repository, digest, true)
        } else {
            recent.contains(repository, digest, false) || recent.contains(repository, digest, true)
        };
        if hit && kind == ManifestKind::Index {
            self.shared.metrics.index_checks.inc(IndexCheck::Ok);
        }
        hit
    }

    /// A DELETE by digest in `repository` was carried out (it passed through regguard, or
    /// the registry notified it): cached answers about the repository are dropped and the
    /// indexes regguard knows there are validated again, with `auth` (else the service
    /// credentials).
    pub fn deleted(&self, repository: &str, auth: Option<&HeaderValue>) {
        self.inspector.deleted(repository, auth);
    }

    /// The upstream went away and came back: every cached positive is dropped, so the
    /// first serve of each index afterwards is validated afresh.
    pub fn upstream_returned(&self) {
        self.inspector.upstream_returned();
    }

    /// A 404 passed to a client for a manifest or blob by digest: counted, and when a
    /// known index references the digest, evidence of loss (see `evidence`).
    /// `accepts_media_type` tells whether the client's `Accept` named the type the index
    /// declares for it (without it, registry 2.8 answers 404 for OCI content that exists).
    pub fn client_not_found(
        &self,
        kind: RefKind,
        repository: &str,
        digest: &str,
        auth: Option<&HeaderValue>,
        accept: &str,
    ) {
        let parents = self.shared.parents(repository, digest);
        let referenced = parents.is_some();
        let accepts_media_type = parents
            .as_ref()
            .is_some_and(|p| p.iter().any(|p| evidence::accepts(accept, &p.media_type)));
        if !referenced {
            // Unreferenced so far, it is still evidence: the walk of the index it came from
            // may be under way (a client fetches the children right after the index), and
            // takes it into account when it meets the digest (see `walk::record`).
            self.shared.orphan_loss.insert(
                (Arc::from(repository), Arc::from(digest)),
                evidence::Orphan {
                    accept: Arc::from(crate::oci::bounded(accept)),
                },
            );
        }
        // `loss` also drops what the cache says of it, referenced or not.
        self.inspector.loss(
            repository,
            digest,
            parents,
            Witness::Client { accepts_media_type },
            None,
            auth,
        );
        let k = usize::from(kind == RefKind::Blob);
        if let Some(c) = self
            .shared
            .metrics
            .not_found
            .get(k)
            .and_then(|row| row.get(usize::from(referenced)))
        {
            c.inc();
        }
    }
}

impl Shared {
    fn submit(&self, job: Job) {
        match self.tx.try_send(job) {
            Ok(()) => self.metrics.queue_depth.inc(),
            Err(_) => self.metrics.dropped.inc(),
        }
    }
}

/// Takes jobs off the queue and runs each as its own task, `workers` at a time. The
/// receiver is shared so a restarted dispatcher (see `supervise`) carries on with it;
/// a job that panics is counted and ends alone.
async fn dispatch(
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    worker: Arc<Inspector>,
    supervisor: Arc<Supervisor>,
) {
    let permits = Arc::new(Semaphore::new(worker.settings.workers));
    let mut rx = rx.lock().await;
    while let Some(job) = rx.recv().await {
        worker.shared.metrics.queue_depth.dec();
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let w = worker.clone();
        let sup = supervisor.clone();
        tokio::spawn(async move {
            let run = std::panic::AssertUnwindSafe(w.validate(job));
            if run.catch_unwind().await.is_err() {
                sup.panicked("validation");
                tracing::error!("a validation job panicked; it was dropped");
            }
            drop(permit);
        });
    }
}

/// A child being walked: where it sits in the tree.
struct Node<'a> {
    repository: &'a str,
    reference: &'a str,
    root_digest: &'a str,
    auth: Option<&'a HeaderValue>,
    seen_at: Instant,
    blobs: bool,
}

impl Inspector {
    /// Validates one manifest and records what it finds in the integrity state, in three
    /// phases: `Inspector::resolve` the manifest (a failure ends it in
    /// `Inspector::unreadable`), `Inspector::walk` its references, and
    /// `Inspector::conclude` (heal, remember, count).
    pub async fn validate(&self, job: Job) -> Summary {
        let (digest, manifest) = match self.resolve(&job).await {
            Ok(v) => v,
            Err(e) => return self.unreadable(&job, &e),
        };
        let tally = self.walk(&job, &digest, &manifest).await;
        self.conclude(&job, &digest, &manifest, tally)
    }

    /// The manifest could not be read: gone (its broken references go with it), not ours
    /// to read, or an error.
    fn unreadable(&self, job: &Job, e: &FetchError) -> Summary {
        let result = match e {
            FetchError::Unauthorized(_) => IndexCheck::Unauthorized,
            FetchError::Status(404) => {
                // The index is gone (deleted after it was served): nothing to validate.
                if let Some(d) = &job.digest {
                    self.integrity.remove_index(&job.repository, d);
                }
                return Summary {
                    result: Validated::Gone,
                    index: job.kind == ManifestKind::Index,
                    broken: 0,
                };
            }
            _ => IndexCheck::Error,
        };
        if result == IndexCheck::Error {
            tracing::warn!(
                repository = %job.repository,
                reference = %job.reference,
                digest = job.digest.as_deref().unwrap_or(""),
                error = %e,
                "cannot validate manifest"
            );
        }
        self.count_index(job.kind, result);
        Summary {
            result: Validated::Checked(result),
            index: job.kind == ManifestKind::Index,
            broken: 0,
        }
    }

    /// Judges every reference of the manifest at `digest` (see `walk.rs`), within the
    /// reference budget, and records the broken ones as it goes.
    async fn walk(&self, job: &Job, digest: &str, manifest: &Manifest) -> Tally {
        let node = Node {
            repository: &job.repository,
            reference: &job.reference,
            root_digest: digest,
            auth: job.auth.as_ref(),
            seen_at: job.seen_at,
            blobs: job.blobs,
        };
        let mut tally = Tally::default();
        let mut walk = Walk::new(self.settings.max_references);
        match manifest {
            Manifest::Index { manifests } => {
                self.walk_index(&node, manifests, 1, &mut tally, &mut walk)
                    .await
            }
            Manifest::Image { .. } => {
                if node.blobs {
                    let none: Arc<str> = Arc::from("");
                    self.check_image_blobs(&node, manifest, &none, &mut tally, &mut walk)
                        .await;
                }
            }
        }
        tally
    }

    /// Heals what the walk found present, decides the result, remembers an ok manifest
    /// (and every index, for re-validation after a delete), and counts it.
    fn conclude(&self, job: &Job, digest: &str, manifest: &Manifest, mut tally: Tally) -> Summary {
        for d in &tally.ok {
            if !tally.broken_digests.contains(d) {
                self.integrity.report_ok(&job.repository, digest, d);
            }
        }
        if let Some(over) = tally.over_budget {
            tally.errors += 1;
            tracing::warn!(
                repository = %job.repository,
                index_digest = %digest,
                error = %over,
                "validation stopped: validate.max_references reached"
            );
        }
        let result = if tally.broken > 0 {
            IndexCheck::Broken
        } else if tally.unauthorized > 0 {
            IndexCheck::Unauthorized
        } else if tally.errors > 0 {
            IndexCheck::Error
        } else {
            self.shared
                .recent_ok
                .insert(&job.repository, digest, job.blobs);
            IndexCheck::Ok
        };
        let is_index = matches!(manifest, Manifest::Index { .. });
        if is_index {
            self.shared.indexes.insert(
                (Arc::from(job.repository.as_str()), Arc::from(digest)),
                Arc::from(job.reference.as_str()),
            );
        }
        self.count_index(
            if is_index {
                ManifestKind::Index
            } else {
                ManifestKind::Image
            },
            result,
        );
        Summary {
            result: Validated::Checked(result),
            index: is_index,
            broken: tally.broken,
        }
    }

    fn count_index(&self, kind: ManifestKind, result: IndexCheck) {
        if kind == ManifestKind::Index {
            self.shared.metrics.index_checks.inc(result);
        }
    }

    /// The manifest's digest and parsed form: the served bytes if complete and true, else fetched.
    async fn resolve(&self, job: &Job) -> Result<(String, Arc<Manifest>), FetchError> {
        if let Some(body) = &job.body {
            let digest = job
                .digest
                .clone()
                .unwrap_or_else(|| crate::oci::sha256_digest(body));
            let m = self.checker.verified(&digest, body, Some(job.kind)).await?;
            return Ok((digest, m));
        }
        let digest = match &job.digest {
            Some(d) => d.clone(),
            None if crate::oci::is_sha256_digest(&job.reference) => job.reference.clone(),
            None => return Err(FetchError::NoDigest),
        };
        let m = self
            .checker
            .manifest(&job.repository, &digest, job.auth.as_ref())
            .await?;
        Ok((digest, m))
    }
}

/// Pause between two re-checks of broken references (at most 50 per second).
const RECHECK_PACE: Duration = Duration::from_millis(20);

async fn recheck_loop(worker: Arc<Inspector>) {
    let period = worker.settings.missing_ttl.max(Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for b in worker.integrity.snapshot() {
            worker.recheck(&b).await;
            // Paced: a registry with many broken references is not asked in one burst.
            tokio::time::sleep(RECHECK_PACE).await;
        }
    }
}
