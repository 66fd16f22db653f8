//! The checker: one answer to "is this reference present in this repository,
//! with this size and digest?", shared by serve-time validation (and, later,
//! the push gate, the scan and the CLI).
//!
//! It asks the upstream with `HEAD`, sending all four manifest types in
//! `Accept` (registry 2.8 answers 404 for existing OCI content otherwise) and
//! the credentials of whoever caused the question, so a check never sees more
//! than that client could. What the upstream said is cached per
//! (repository, digest, kind): presence is per repository. The cache stores
//! facts, not verdicts, so the same entry answers descriptors of any size.
//! Concurrent questions for one key share one upstream request.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use moka::future::Cache;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

use crate::body::UpstreamBody;
use crate::config::Upstream;
use crate::oci::{self, Descriptor, Manifest, ManifestKind, MAX_MANIFEST_BYTES};
use crate::upstream::{user_agent, UpstreamClient};
use crate::watch::UpstreamWatch;

/// What kind of reference a descriptor is: a manifest (`/manifests/`) or a blob (`/blobs/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RefKind {
    Manifest,
    Blob,
}

impl RefKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefKind::Manifest => "manifest",
            RefKind::Blob => "blob",
        }
    }
    fn path(self) -> &'static str {
        match self {
            RefKind::Manifest => "manifests",
            RefKind::Blob => "blobs",
        }
    }
}

/// Default for the references one walk may ask about (`gate.max_references`,
/// `validate.max_references`). A real multi-platform image is far below it: 30
/// platforms with 60 layers each, plus attestations, is about 2,000 references.
/// A crafted index can list ~25,000 distinct digests in 4 MiB; each costs the
/// registry a request (and, with htpasswd, a bcrypt check), so the bound is
/// also the worst amplification one push or pull can cause.
pub const DEFAULT_MAX_REFERENCES: usize = 4096;

/// Steps between yields to the scheduler: a walk answered from caches never
/// awaits anything else, and must not hold an executor thread for long.
const YIELD_EVERY: usize = 16;

/// A walk asked about more distinct references than its budget allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the manifest tree references more than {0} distinct manifests and blobs")]
pub struct OverBudget(pub usize);

/// How a descriptor relates to what a walk has already met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    /// The first descriptor of this (kind, digest): check it, and walk into it.
    First,
    /// The digest was met before, but this descriptor declares another size or media
    /// type: judge it too (the answer is cached), but do not walk into the content again.
    Variant,
    /// The same descriptor again: nothing new to learn.
    Repeat,
}

/// Bounds one walk over a manifest tree (serve-time validation, the gate, the
/// scan, `check`): each distinct (kind, digest) is walked into once, each distinct
/// descriptor (digest, size, media type) is judged once, at most `budget`
/// descriptors are judged, and the walk yields to the scheduler every few steps.
/// An index of 1000 copies of an index of 1000 copies of an image is a handful
/// of references, not a billion; a copy that lies about its size is still judged.
pub struct Walk {
    manifests: HashSet<String>,
    blobs: HashSet<String>,
    judged: HashSet<(RefKind, String, u64, String)>,
    budget: usize,
    steps: usize,
}

impl Walk {
    pub fn new(budget: usize) -> Self {
        Walk {
            manifests: HashSet::new(),
            blobs: HashSet::new(),
            judged: HashSet::new(),
            budget,
            steps: 0,
        }
    }

    /// Where `d` stands in this walk; [`OverBudget`] when judging it would exceed the budget.
    pub async fn visit(&mut self, kind: RefKind, d: &Descriptor) -> Result<Visit, OverBudget> {
        self.steps += 1;
        if self.steps % YIELD_EVERY == 0 {
            tokio::task::yield_now().await;
        }
        let key = (kind, d.digest.clone(), d.size, d.media_type.clone());
        if self.judged.contains(&key) {
            return Ok(Visit::Repeat);
        }
        if self.judged.len() >= self.budget {
            return Err(OverBudget(self.budget));
        }
        self.judged.insert(key);
        let seen = match kind {
            RefKind::Manifest => &mut self.manifests,
            RefKind::Blob => &mut self.blobs,
        };
        if seen.insert(d.digest.clone()) {
            Ok(Visit::First)
        } else {
            Ok(Visit::Variant)
        }
    }

    /// Distinct descriptors judged so far.
    pub fn visited(&self) -> usize {
        self.judged.len()
    }
}

/// What the upstream said about a reference (cached).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// 2xx, with the size and digest it reported (size unknown on a redirect).
    Found {
        size: Option<u64>,
        digest: Option<String>,
        /// Content-Type of a manifest (blobs are served as octet-stream: not recorded).
        media_type: Option<String>,
    },
    /// 404.
    NotFound,
    /// 401/403: this client may not see it. Never cached, never "broken".
    Unauthorized(u16),
    /// Anything else: 5xx, timeout, connection failure. Never cached.
    Error(String),
}

/// The verdict on one descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Missing,
    Mismatch {
        what: &'static str,
        expected: String,
        found: String,
    },
    Unauthorized(u16),
    Error(String),
}

impl Outcome {
    /// The `result` label.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Missing => "missing",
            Outcome::Mismatch { .. } => "mismatch",
            Outcome::Unauthorized(_) => "unauthorized",
            Outcome::Error(_) => "error",
        }
    }

    /// Missing or mismatched: a client pulling it would fail.
    pub fn is_broken(&self) -> bool {
        matches!(self, Outcome::Missing | Outcome::Mismatch { .. })
    }

    /// What the upstream said, in words for logs and `/integrity`.
    pub fn describe(&self, kind: RefKind) -> String {
        match self {
            Outcome::Ok => "present".into(),
            Outcome::Missing => format!(
                "404 {}",
                if kind == RefKind::Manifest {
                    "MANIFEST_UNKNOWN"
                } else {
                    "BLOB_UNKNOWN"
                }
            ),
            Outcome::Mismatch {
                what,
                expected,
                found,
            } => {
                format!("{what} mismatch: descriptor says {expected}, registry says {found}")
            }
            Outcome::Unauthorized(s) => format!("{s} (not authorized)"),
            Outcome::Error(e) => e.clone(),
        }
    }
}

/// Compares what the upstream said with what the descriptor promises. With `strict_media`,
/// a manifest descriptor's `mediaType` must also match what the registry serves it as.
pub fn judge(presence: &Presence, desc: &Descriptor, strict_media: bool) -> Outcome {
    match presence {
        Presence::Found {
            size,
            digest,
            media_type,
        } => {
            if let (true, Some(found)) = (strict_media && !desc.media_type.is_empty(), media_type) {
                if !oci::same_media_type(found, &desc.media_type) {
                    return Outcome::Mismatch {
                        what: "media type",
                        expected: desc.media_type.clone(),
                        found: found.clone(),
                    };
                }
            }
            if let Some(d) = digest {
                if *d != desc.digest {
                    return Outcome::Mismatch {
                        what: "digest",
                        expected: desc.digest.clone(),
                        found: d.clone(),
                    };
                }
            }
            match size {
                Some(s) if *s != desc.size => Outcome::Mismatch {
                    what: "size",
                    expected: desc.size.to_string(),
                    found: s.to_string(),
                },
                _ => Outcome::Ok,
            }
        }
        Presence::NotFound => Outcome::Missing,
        Presence::Unauthorized(s) => Outcome::Unauthorized(*s),
        Presence::Error(e) => Outcome::Error(e.clone()),
    }
}

/// Why a manifest could not be fetched and read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("upstream answered {0}")]
    Status(u16),
    #[error("not authorized ({0})")]
    Unauthorized(u16),
    #[error("{0}")]
    Upstream(String),
    #[error("body digest {found} does not match {expected}")]
    DigestMismatch { expected: String, found: String },
    #[error(transparent)]
    Parse(#[from] oci::ParseError),
}

/// Cache lifetimes and limits.
#[derive(Debug, Clone)]
pub struct CheckerSettings {
    pub ok_ttl: Duration,
    pub missing_ttl: Duration,
    pub check_timeout: Duration,
    /// Bound of the parsed-manifest cache, in (approximate) bytes.
    pub manifest_cache_bytes: u64,
    /// Bound of the presence cache, in entries.
    pub presence_entries: u64,
}

/// Parsed manifests kept by digest (content never changes); ~64 MiB of parsed form.
const MANIFEST_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Presence answers kept per (repository, digest); an entry is ~200 bytes.
const PRESENCE_CACHE_ENTRIES: u64 = 200_000;

impl CheckerSettings {
    /// Lifetimes from `[validate]`, cache bounds from the constants above.
    pub fn from_validate(v: &crate::config::ValidateSettings) -> Self {
        CheckerSettings {
            ok_ttl: v.ok_ttl,
            missing_ttl: v.missing_ttl,
            check_timeout: v.check_timeout,
            manifest_cache_bytes: MANIFEST_CACHE_BYTES,
            presence_entries: PRESENCE_CACHE_ENTRIES,
        }
    }
}

/// A checker of its own, for the CLI (outside `serve`): the registry at `base`
/// (`http://` or `https://`), default lifetimes, and the client it uses.
pub struct Standalone {
    pub checker: Arc<Checker>,
    pub client: UpstreamClient,
    pub upstream: Upstream,
}

impl Standalone {
    /// `insecure` skips certificate verification (plain HTTP is the caller's decision).
    pub fn new(base: &str, insecure: bool, registry: &Registry) -> Result<Self, String> {
        let upstream = Upstream::parse_registry(base).map_err(|e| e.to_string())?;
        let defaults = crate::config::Settings::from_toml("").map_err(|e| e.to_string())?;
        let verify = if insecure {
            crate::upstream::TlsVerify::None
        } else {
            crate::upstream::TlsVerify::System
        };
        let pools = crate::upstream::Pools::with_tls(Duration::from_secs(10), verify);
        let client = pools.lean().clone();
        let checker = Checker::new(
            client.clone(),
            upstream.clone(),
            CheckerSettings::from_validate(&defaults.validate),
            registry,
        )
        .map_err(|e| e.to_string())?;
        Ok(Standalone {
            checker: Arc::new(checker),
            client,
            upstream,
        })
    }
}

struct PresenceExpiry {
    ok: Duration,
    missing: Duration,
}

/// A cached answer and when the upstream gave it.
#[derive(Debug, Clone)]
struct Cached {
    presence: Presence,
    at: Instant,
}

impl Cached {
    fn now(presence: Presence) -> Self {
        Cached {
            presence,
            at: Instant::now(),
        }
    }
}

impl moka::Expiry<PresenceKey, Cached> for PresenceExpiry {
    fn expire_after_create(&self, _: &PresenceKey, value: &Cached, _: Instant) -> Option<Duration> {
        Some(match &value.presence {
            Presence::Found { .. } => self.ok,
            Presence::NotFound => self.missing,
            // Unauthorized depends on who asked; errors are transient: never reuse either.
            Presence::Unauthorized(_) | Presence::Error(_) => Duration::ZERO,
        })
    }
}

type PresenceKey = (Arc<str>, Arc<str>, RefKind);

struct CheckerMetrics {
    checks: Vec<IntCounter>,
    duration: Histogram,
    hits: IntCounter,
    misses: IntCounter,
}

const RESULTS: [&str; 5] = ["ok", "missing", "mismatch", "unauthorized", "error"];

/// The shared checker.
pub struct Checker {
    client: UpstreamClient,
    upstream: Upstream,
    settings: CheckerSettings,
    presence: Cache<PresenceKey, Cached>,
    manifests: Cache<Arc<str>, Arc<Manifest>>,
    metrics: CheckerMetrics,
    /// Told when the upstream cannot be reached, and when it answers (see `watch`).
    watch: std::sync::OnceLock<Arc<UpstreamWatch>>,
}

impl Checker {
    pub fn new(
        client: UpstreamClient,
        upstream: Upstream,
        settings: CheckerSettings,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let checks = IntCounterVec::new(
            Opts::new(
                "regguard_reference_checks_total",
                "References checked, by kind (manifest, blob) and result (ok, missing, mismatch, unauthorized, error)",
            ),
            &["kind", "result"],
        )?;
        registry.register(Box::new(checks.clone()))?;
        let mut handles = Vec::new();
        for kind in [RefKind::Manifest, RefKind::Blob] {
            for r in RESULTS {
                handles.push(checks.get_metric_with_label_values(&[kind.as_str(), r])?);
            }
        }
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "regguard_check_duration_seconds",
                "Upstream check requests (HEAD), duration",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        registry.register(Box::new(duration.clone()))?;
        let hits = IntCounter::new(
            "regguard_validation_cache_hits_total",
            "Checks answered from the presence cache",
        )?;
        registry.register(Box::new(hits.clone()))?;
        let misses = IntCounter::new(
            "regguard_validation_cache_misses_total",
            "Checks that asked the upstream",
        )?;
        registry.register(Box::new(misses.clone()))?;

        let presence = Cache::builder()
            .max_capacity(settings.presence_entries)
            .support_invalidation_closures()
            .expire_after(PresenceExpiry {
                ok: settings.ok_ttl,
                missing: settings.missing_ttl,
            })
            .build();
        let manifests = Cache::builder()
            .max_capacity(settings.manifest_cache_bytes)
            .weigher(|_: &Arc<str>, m: &Arc<Manifest>| m.weight())
            .build();
        Ok(Checker {
            client,
            upstream,
            settings,
            presence,
            manifests,
            watch: std::sync::OnceLock::new(),
            metrics: CheckerMetrics {
                checks: handles,
                duration,
                hits,
                misses,
            },
        })
    }

    /// Reports reachability to `watch` from now on.
    pub fn watch(&self, watch: Arc<UpstreamWatch>) {
        let _ = self.watch.set(watch);
    }

    /// Checks one descriptor in `repo`, from the cache when it can.
    pub async fn check(
        &self,
        repo: &str,
        desc: &Descriptor,
        kind: RefKind,
        auth: Option<&HeaderValue>,
    ) -> Outcome {
        self.check_with(repo, desc, kind, auth, false).await
    }

    /// [`Checker::check`], optionally also comparing a manifest's media type.
    pub async fn check_with(
        &self,
        repo: &str,
        desc: &Descriptor,
        kind: RefKind,
        auth: Option<&HeaderValue>,
        strict_media: bool,
    ) -> Outcome {
        let key: PresenceKey = (Arc::from(repo), Arc::from(desc.digest.as_str()), kind);
        let entry = self
            .presence
            .entry(key)
            .or_insert_with(async { Cached::now(self.ask(repo, &desc.digest, kind, auth).await) })
            .await;
        if entry.is_fresh() {
            self.metrics.misses.inc();
        } else {
            self.metrics.hits.inc();
        }
        let outcome = judge(&entry.value().presence, desc, strict_media);
        self.count(kind, &outcome);
        outcome
    }

    /// Asks the upstream now, never from the cache, and caches the answer. The gate's
    /// first question of every push: it also shows whether the pusher may read the
    /// repository at all, before any cached answer is given to it.
    pub async fn check_fresh(
        &self,
        repo: &str,
        desc: &Descriptor,
        kind: RefKind,
        auth: Option<&HeaderValue>,
        strict_media: bool,
    ) -> Outcome {
        let presence = self.ask(repo, &desc.digest, kind, auth).await;
        self.metrics.misses.inc();
        if matches!(presence, Presence::Found { .. } | Presence::NotFound) {
            let key: PresenceKey = (Arc::from(repo), Arc::from(desc.digest.as_str()), kind);
            self.presence
                .insert(key, Cached::now(presence.clone()))
                .await;
        }
        let outcome = judge(&presence, desc, strict_media);
        self.count(kind, &outcome);
        outcome
    }

    /// Checks without trusting a cached negative answer (a reference may have just appeared).
    pub async fn recheck(
        &self,
        repo: &str,
        desc: &Descriptor,
        kind: RefKind,
        auth: Option<&HeaderValue>,
        strict_media: bool,
    ) -> Outcome {
        let key: PresenceKey = (Arc::from(repo), Arc::from(desc.digest.as_str()), kind);
        if let Some(c) = self.presence.get(&key).await {
            if !matches!(c.presence, Presence::Found { .. }) {
                self.presence.invalidate(&key).await;
            }
        }
        self.check_with(repo, desc, kind, auth, strict_media).await
    }

    /// [`Checker::check_with`], but a cached answer older than `max_age` is asked again:
    /// for callers that act on the answer (the gate accepts a push on it).
    pub async fn check_recent(
        &self,
        repo: &str,
        desc: &Descriptor,
        kind: RefKind,
        auth: Option<&HeaderValue>,
        strict_media: bool,
        max_age: Duration,
    ) -> Outcome {
        let key: PresenceKey = (Arc::from(repo), Arc::from(desc.digest.as_str()), kind);
        match self.presence.get(&key).await {
            Some(c) if c.at.elapsed() > max_age => {
                self.check_fresh(repo, desc, kind, auth, strict_media).await
            }
            _ => self.check_with(repo, desc, kind, auth, strict_media).await,
        }
    }

    /// Forgets what is cached about `digest` in `repo` (both kinds): evidence of its loss.
    pub async fn forget(&self, repo: &str, digest: &str) {
        for kind in [RefKind::Manifest, RefKind::Blob] {
            let key: PresenceKey = (Arc::from(repo), Arc::from(digest), kind);
            self.presence.invalidate(&key).await;
        }
    }

    /// Forgets every cached answer about `repo` (a DELETE there passed through, or the
    /// registry said it deleted something).
    pub fn forget_repository(&self, repo: &str) {
        let repo: Arc<str> = Arc::from(repo);
        // Fails only when invalidation closures are not enabled, which the builder does.
        let _ = self
            .presence
            .invalidate_entries_if(move |k, _| k.0.as_ref() == repo.as_ref());
    }

    /// Forgets every cached answer (the upstream went away and came back: an offline
    /// garbage collection may have run).
    pub fn forget_all(&self) {
        self.presence.invalidate_all();
    }

    /// Asks the upstream directly (no cache, not counted): is `digest` there at all?
    pub async fn present(
        &self,
        repo: &str,
        digest: &str,
        kind: RefKind,
        auth: Option<&HeaderValue>,
    ) -> Presence {
        self.ask(repo, digest, kind, auth).await
    }

    /// Records that a reference is present (e.g. a manifest just accepted), so it is not asked again.
    pub async fn remember_present(
        &self,
        repo: &str,
        digest: &str,
        size: u64,
        kind: RefKind,
        media_type: Option<String>,
    ) {
        let key: PresenceKey = (Arc::from(repo), Arc::from(digest), kind);
        self.presence
            .insert(
                key,
                Cached::now(Presence::Found {
                    size: Some(size),
                    digest: Some(digest.to_string()),
                    media_type,
                }),
            )
            .await;
    }

    fn count(&self, kind: RefKind, outcome: &Outcome) {
        let k = match kind {
            RefKind::Manifest => 0,
            RefKind::Blob => 1,
        };
        let r = RESULTS
            .iter()
            .position(|r| *r == outcome.label())
            .unwrap_or(4);
        if let Some(c) = self.metrics.checks.get(k * RESULTS.len() + r) {
            c.inc();
        }
    }

    fn request(
        &self,
        method: Method,
        repo: &str,
        kind: RefKind,
        digest: &str,
        auth: Option<&HeaderValue>,
    ) -> Result<Request<UpstreamBody>, String> {
        let uri = self
            .upstream
            .uri_for(&format!("/v2/{repo}/{}/{digest}", kind.path()))
            .map_err(|e| format!("bad reference: {e}"))?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, self.upstream.host_header.clone())
            .header(header::USER_AGENT, user_agent())
            .header(header::ACCEPT, oci::accept_all())
            .body(UpstreamBody::empty())
            .map_err(|e| e.to_string())?;
        if let Some(a) = auth {
            req.headers_mut().insert(header::AUTHORIZATION, a.clone());
        }
        Ok(req)
    }

    /// One upstream HEAD.
    async fn ask(
        &self,
        repo: &str,
        digest: &str,
        kind: RefKind,
        auth: Option<&HeaderValue>,
    ) -> Presence {
        let req = match self.request(Method::HEAD, repo, kind, digest, auth) {
            Ok(r) => r,
            Err(e) => return Presence::Error(e),
        };
        let started = Instant::now();
        let sent =
            tokio::time::timeout(self.settings.check_timeout, self.client.request(req)).await;
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        let resp = match sent {
            Err(_) => {
                return Presence::Error(format!(
                    "no answer within {:?}",
                    self.settings.check_timeout
                ))
            }
            Ok(Err(e)) => {
                if let Some(w) = self.watch.get() {
                    w.unreachable();
                }
                return Presence::Error(format!("upstream unreachable: {e}"));
            }
            Ok(Ok(r)) => {
                if let Some(w) = self.watch.get() {
                    w.answered();
                }
                r
            }
        };
        let status = resp.status();
        let header_str = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        if status.is_success() {
            Presence::Found {
                size: header_str("content-length").and_then(|v| v.parse().ok()),
                digest: header_str("docker-content-digest"),
                media_type: (kind == RefKind::Manifest)
                    .then(|| header_str("content-type"))
                    .flatten()
                    .map(|ct| ct.split(';').next().unwrap_or("").trim().to_string()),
            }
        } else if status.is_redirection() && kind == RefKind::Blob {
            // Storage backends redirect blob reads to their own URLs: present, size unknown here.
            Presence::Found {
                size: None,
                digest: None,
                media_type: None,
            }
        } else if status == StatusCode::NOT_FOUND {
            Presence::NotFound
        } else if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            Presence::Unauthorized(status.as_u16())
        } else {
            Presence::Error(format!("upstream answered {status}"))
        }
    }

    /// A manifest by digest, parsed: from the content cache, else fetched, verified and cached.
    /// Concurrent requests for one digest share one fetch; failures are not cached.
    pub async fn manifest(
        &self,
        repo: &str,
        digest: &str,
        auth: Option<&HeaderValue>,
    ) -> Result<Arc<Manifest>, FetchError> {
        self.manifests
            .try_get_with(Arc::from(digest), self.fetch_manifest(repo, digest, auth))
            .await
            .map_err(|e| (*e).clone())
    }

    async fn fetch_manifest(
        &self,
        repo: &str,
        digest: &str,
        auth: Option<&HeaderValue>,
    ) -> Result<Arc<Manifest>, FetchError> {
        let req = self
            .request(Method::GET, repo, RefKind::Manifest, digest, auth)
            .map_err(FetchError::Upstream)?;
        let resp = tokio::time::timeout(self.settings.check_timeout, self.client.request(req))
            .await
            .map_err(|_| {
                FetchError::Upstream(format!(
                    "no answer within {:?}",
                    self.settings.check_timeout
                ))
            })?
            .map_err(|e| FetchError::Upstream(format!("upstream unreachable: {e}")))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(FetchError::Unauthorized(status.as_u16()));
        }
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        let hint = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(oci::manifest_kind);
        let body = tokio::time::timeout(
            self.settings.check_timeout,
            Limited::new(resp.into_body(), MAX_MANIFEST_BYTES).collect(),
        )
        .await
        .map_err(|_| FetchError::Upstream("manifest body too slow".into()))?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                FetchError::Parse(oci::ParseError::TooLarge)
            } else {
                FetchError::Upstream(format!("reading manifest: {e}"))
            }
        })?
        .to_bytes();
        let (found, parsed) = digest_and_parse(body, hint).await;
        if found != digest {
            return Err(FetchError::DigestMismatch {
                expected: digest.to_string(),
                found,
            });
        }
        Ok(Arc::new(parsed?))
    }

    /// Caches the parsed form of content whose sha256 the caller has computed.
    pub async fn cache_manifest(&self, digest: &str, manifest: Arc<Manifest>) {
        self.manifests.insert(Arc::from(digest), manifest).await;
    }

    /// Parses manifest bytes whose digest must be `digest`, and caches the result.
    pub async fn verified(
        &self,
        digest: &str,
        body: &Bytes,
        hint: Option<ManifestKind>,
    ) -> Result<Arc<Manifest>, FetchError> {
        if let Some(m) = self.manifests.get(digest).await {
            // Trusted only as the same kind as it is served now.
            let same_kind = hint.is_none_or(|h| m.kind() == h);
            if same_kind && (body.len() < OFF_THREAD_BYTES || oci::sha256_digest(body) == digest) {
                return Ok(m);
            }
        }
        let (found, parsed) = digest_and_parse(body.clone(), hint).await;
        if found != digest {
            return Err(FetchError::DigestMismatch {
                expected: digest.to_string(),
                found,
            });
        }
        let parsed = Arc::new(parsed?);
        self.manifests
            .insert(Arc::from(digest), parsed.clone())
            .await;
        Ok(parsed)
    }
}

/// Manifests at least this large are hashed and parsed on the blocking pool: a
/// 4 MiB manifest takes tens of milliseconds of CPU, which must not hold an
/// executor thread that serves clients.
pub const OFF_THREAD_BYTES: usize = 64 * 1024;

/// The sha256 of `body` and its parsed form (as the registry reads it), off the
/// executor threads when large.
pub async fn digest_and_parse(
    body: Bytes,
    hint: Option<ManifestKind>,
) -> (String, Result<Manifest, oci::ParseError>) {
    if body.len() < OFF_THREAD_BYTES {
        return (oci::sha256_digest(&body), Manifest::parse(&body, hint));
    }
    let work = move || (oci::sha256_digest(&body), Manifest::parse(&body, hint));
    match tokio::task::spawn_blocking(work).await {
        Ok(r) => r,
        Err(e) => (
            String::new(),
            Err(oci::ParseError::NotJson(format!("parser task failed: {e}"))),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(size: u64) -> Descriptor {
        Descriptor {
            media_type: oci::OCI_MANIFEST.into(),
            digest: oci::sha256_digest(b"x"),
            size,
            platform: None,
            urls: vec![],
        }
    }

    #[tokio::test]
    async fn a_walk_judges_each_descriptor_once_and_walks_each_digest_once() {
        let mut w = Walk::new(4);
        let d = |i: u8, size: u64| Descriptor {
            digest: oci::sha256_digest(&[i]),
            size,
            ..Descriptor::default()
        };
        assert_eq!(w.visit(RefKind::Manifest, &d(1, 5)).await, Ok(Visit::First));
        for _ in 0..1000 {
            assert_eq!(
                w.visit(RefKind::Manifest, &d(1, 5)).await,
                Ok(Visit::Repeat)
            );
        }
        // The same digest declared with another size is judged, not walked again.
        assert_eq!(
            w.visit(RefKind::Manifest, &d(1, 6)).await,
            Ok(Visit::Variant)
        );
        assert_eq!(w.visit(RefKind::Blob, &d(1, 5)).await, Ok(Visit::First));
        assert_eq!(w.visit(RefKind::Blob, &d(2, 5)).await, Ok(Visit::First));
        assert_eq!(w.visit(RefKind::Blob, &d(3, 5)).await, Err(OverBudget(4)));
        assert_eq!(w.visited(), 4);
    }

    #[test]
    fn judging_compares_size_and_digest_with_the_descriptor() {
        let d = desc(5);
        let found = |size, digest: &str| Presence::Found {
            size: Some(size),
            digest: Some(digest.into()),
            media_type: Some(oci::DOCKER_MANIFEST.into()),
        };
        assert_eq!(judge(&found(5, &d.digest), &d, false), Outcome::Ok);
        assert!(matches!(
            judge(&found(6, &d.digest), &d, false),
            Outcome::Mismatch { what: "size", .. }
        ));
        assert!(matches!(
            judge(&found(5, "sha256:00"), &d, false),
            Outcome::Mismatch { what: "digest", .. }
        ));
        assert!(matches!(
            judge(&found(5, &d.digest), &d, true),
            Outcome::Mismatch {
                what: "media type",
                ..
            }
        ));
        assert_eq!(judge(&Presence::NotFound, &d, false), Outcome::Missing);
        assert!(!judge(&Presence::Unauthorized(401), &d, false).is_broken());
        assert!(!judge(&Presence::Error("x".into()), &d, false).is_broken());
        let unknown = Presence::Found {
            size: None,
            digest: None,
            media_type: None,
        };
        assert_eq!(judge(&unknown, &d, true), Outcome::Ok);
    }
}
