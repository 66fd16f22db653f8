//! The checker: one answer to "is this reference present in this repository,
//! with this size and digest?", shared by serve-time validation, the push gate,
//! the scan and the CLI.
//!
//! It asks the upstream with `HEAD`, sending all four manifest types in
//! `Accept` (registry 2.8 answers 404 for existing OCI content otherwise) and
//! the credentials of whoever caused the question, so a check never sees more
//! than that client could. What the upstream said is cached per
//! (repository, digest, kind): presence is per repository. The cache stores
//! facts, not verdicts, so the same entry answers descriptors of any size.
//! Concurrent questions for one key share one upstream request.
//!
//! It knows nothing of who asks, of the integrity state, or of requests on the forwarding
//! path: callers pass the descriptor and the credentials, and act on the outcome.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use moka::future::Cache;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

use crate::config::Upstream;
use crate::metrics::Label as _;
use crate::oci::{self, Descriptor, Manifest, ManifestKind, MAX_MANIFEST_BYTES};
use crate::upstream::UpstreamBody;
use crate::upstream::{user_agent, UpstreamClient};
use crate::watch::UpstreamWatch;

mod outcome;
mod walk;
pub use crate::oci::RefKind;
pub use outcome::{judge, FetchError, Mismatched, Outcome, OutcomeKind, Presence, RequestError};
pub use walk::{OverBudget, Visit, Walk, DEFAULT_MAX_REFERENCES};

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

/// Why a standalone checker could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The registry address (or the built-in defaults) did not read as configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Metrics(#[from] prometheus::Error),
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
    pub fn new(base: &str, insecure: bool, registry: &Registry) -> Result<Self, SetupError> {
        let upstream = Upstream::parse_registry(base)?;
        let defaults = crate::config::Settings::from_toml("")?;
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
        )?;
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

/// What the presence cache knows a reference by: presence is per repository.
fn presence_key(repo: &str, digest: &str, kind: RefKind) -> PresenceKey {
    (Arc::from(repo), Arc::from(digest), kind)
}

struct CheckerMetrics {
    checks: Vec<IntCounter>,
    duration: Histogram,
    hits: IntCounter,
    misses: IntCounter,
}

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
    /// Told of every manifest fetched and verified (the vault keeps them).
    on_fetched: std::sync::OnceLock<FetchedHook>,
}

/// Called with (repository, digest, media type, bytes, credentials) of each manifest the
/// checker fetched and verified.
pub type FetchedHook = Arc<dyn Fn(&str, &str, &str, &Bytes, Option<&HeaderValue>) + Send + Sync>;

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
            for r in OutcomeKind::ALL {
                handles.push(checks.get_metric_with_label_values(&[kind.as_str(), r.as_str()])?);
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
            on_fetched: std::sync::OnceLock::new(),
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

    /// Tells `hook` of every manifest fetched and verified from now on.
    pub fn on_fetched(&self, hook: FetchedHook) {
        let _ = self.on_fetched.set(hook);
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
        let key = presence_key(repo, &desc.digest, kind);
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
        self.verdict(&entry.value().presence, desc, kind, strict_media)
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
            let key = presence_key(repo, &desc.digest, kind);
            self.presence
                .insert(key, Cached::now(presence.clone()))
                .await;
        }
        self.verdict(&presence, desc, kind, strict_media)
    }

    /// Judges `desc` by what the upstream said, and counts the outcome.
    fn verdict(
        &self,
        presence: &Presence,
        desc: &Descriptor,
        kind: RefKind,
        strict_media: bool,
    ) -> Outcome {
        let outcome = judge(presence, desc, strict_media);
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
        let key = presence_key(repo, &desc.digest, kind);
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
        let key = presence_key(repo, &desc.digest, kind);
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
            let key = presence_key(repo, digest, kind);
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
        let key = presence_key(repo, digest, kind);
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
        let r = outcome.kind().index();
        if let Some(c) = self.metrics.checks.get(k * OutcomeKind::ALL.len() + r) {
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
    ) -> Result<Request<UpstreamBody>, RequestError> {
        let uri = self
            .upstream
            .uri_for(&format!("/v2/{repo}/{}/{digest}", kind.path()))
            .map_err(RequestError::BadReference)?;
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, self.upstream.host_header.clone())
            .header(header::USER_AGENT, user_agent())
            .header(header::ACCEPT, oci::accept_all())
            .body(UpstreamBody::empty())
            .map_err(RequestError::Build)?;
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
            Err(e) => return Presence::Error(e.to_string()),
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
            .map_err(|e| FetchError::Request(Arc::new(e)))?;
        let resp = tokio::time::timeout(self.settings.check_timeout, self.client.request(req))
            .await
            .map_err(|_| FetchError::Timeout(self.settings.check_timeout))?
            .map_err(|e| FetchError::Unreachable(Arc::new(e)))?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(FetchError::Unauthorized(status.as_u16()));
        }
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|ct| oci::media_type_essence(ct).to_owned())
            .unwrap_or_default();
        let hint = oci::manifest_kind(&content_type);
        let body = tokio::time::timeout(
            self.settings.check_timeout,
            Limited::new(resp.into_body(), MAX_MANIFEST_BYTES).collect(),
        )
        .await
        .map_err(|_| FetchError::BodyTimeout)?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                FetchError::Parse(oci::ParseError::TooLarge)
            } else {
                FetchError::Body(Arc::from(e))
            }
        })?
        .to_bytes();
        let (found, parsed) = digest_and_parse(body.clone(), hint).await;
        if found != digest {
            return Err(FetchError::DigestMismatch {
                expected: digest.to_string(),
                found,
            });
        }
        if let Some(hook) = self.on_fetched.get() {
            hook(repo, digest, &content_type, &body, auth);
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
