//! The push gate: a manifest PUT is checked before the registry sees it.
//!
//! Registry 2.8 checks only that an index's direct children and an image's
//! blobs are linked; it accepts children whose layers are gone and descriptors
//! whose sizes or media types lie. The gate asks the shared [`Checker`] about
//! every reference (with the pusher's credentials, never trusting a cached
//! 404), and, in `deep` mode, about each child image's config and layers too.
//! A `subject` is never required to exist (the OCI spec says a registry MUST
//! accept it); layers with `urls` are skipped; unknown media types pass.
//!
//! It decides and counts; it knows nothing of HTTP. The push path (`proxy/push.rs`) reads
//! the body within the budget, turns the verdict into an answer, and forwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use prometheus::{Histogram, HistogramOpts, Registry};

use crate::metrics::CounterSet;
use serde::Serialize;

use futures_util::future::join_all;

use crate::budget::MemoryBudget;
use crate::checker::{
    Checker, FetchError, Mismatched, Outcome, OverBudget, RefKind, Visit, Walk, OFF_THREAD_BYTES,
};
use crate::oci::{self, Descriptor, Manifest, ManifestKind, ParseError};

pub use crate::config::features::{GateDepth, GateMode, GateSettings, OnCheckError};

/// Why a reference of a pushed manifest is refused (`reason` in the rejection's detail).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Not in the repository.
    Missing,
    /// Present with another size than the descriptor says.
    SizeMismatch,
    /// Served as another media type than the descriptor says.
    MediaTypeMismatch,
    /// Served under another digest than the descriptor says.
    DigestMismatch,
}

impl From<Mismatched> for Reason {
    fn from(what: Mismatched) -> Self {
        match what {
            Mismatched::Size => Reason::SizeMismatch,
            Mismatched::MediaType => Reason::MediaTypeMismatch,
            Mismatched::Digest => Reason::DigestMismatch,
        }
    }
}

/// One thing wrong with a pushed manifest.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub digest: String,
    pub reason: Reason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub found: Option<String>,
    /// Platform of the child the reference belongs to (or is).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// The child image manifest a blob belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub child: Option<String>,
    /// `manifest` or `blob`.
    pub kind: RefKind,
    /// What is wrong, in words a person can act on.
    #[serde(skip)]
    pub message: String,
}

/// The gate's decision on one push.
#[derive(Debug)]
pub enum Verdict {
    /// Every reference is present with the right size (and media type).
    Accept,
    /// Not a manifest type the gate reads: forwarded untouched.
    Passthrough,
    /// The body is not a valid manifest of the type it claims (400 `MANIFEST_INVALID`).
    Invalid(String),
    /// References missing or wrong.
    Reject(Vec<Problem>),
    /// A reference could not be checked (timeout, 5xx).
    CheckError(String),
    /// The registry refused this pusher's credentials for reading the repository: the push
    /// is forwarded untouched, so the registry answers (and challenges) the client itself,
    /// and the client learns nothing from regguard's caches.
    Unauthorized(u16),
    /// More distinct references than `gate.max_references` (400 `MANIFEST_INVALID`).
    TooManyReferences(usize),
}

crate::metrics::labels! {
    /// What became of one push: the `result` label of `regguard_push_gate_total`.
    pub enum GateResult {
        Accepted => "accepted",
        Rejected => "rejected",
        /// Audit mode: it would have been rejected, and was forwarded.
        AuditWouldReject => "audit_would_reject",
        CheckError => "check_error",
        Passthrough => "passthrough",
        Unauthorized => "unauthorized",
    }
}

impl Verdict {
    /// The result this verdict counts as when the gate enforces it.
    pub fn result(&self) -> GateResult {
        match self {
            Verdict::Accept => GateResult::Accepted,
            Verdict::Passthrough => GateResult::Passthrough,
            Verdict::Invalid(_) | Verdict::Reject(_) | Verdict::TooManyReferences(_) => {
                GateResult::Rejected
            }
            Verdict::CheckError(_) => GateResult::CheckError,
            Verdict::Unauthorized(_) => GateResult::Unauthorized,
        }
    }
}

/// The gate.
pub struct Gate {
    checker: Arc<Checker>,
    pub settings: GateSettings,
    /// Manifest bytes in memory, shared with the response taps.
    pub budget: Arc<MemoryBudget>,
    results: CounterSet<GateResult>,
    duration: Histogram,
}

/// What a push's checks found.
#[derive(Default)]
struct Findings {
    problems: Vec<Problem>,
    /// References that could not be checked.
    errors: Vec<String>,
}

/// Where a reference sits, for messages.
#[derive(Clone, Copy)]
struct Place<'a> {
    platform: Option<&'a str>,
    child: Option<&'a str>,
}

impl Gate {
    pub fn new(
        checker: Arc<Checker>,
        settings: GateSettings,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let results = CounterSet::new(
            registry,
            "regguard_push_gate_total",
            "Manifest pushes by gate result (accepted, rejected, audit_would_reject, check_error, passthrough, unauthorized)",
            "result",
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "regguard_push_gate_duration_seconds",
                "Time the gate spent checking one manifest push",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
        )?;
        registry.register(Box::new(duration.clone()))?;
        let budget = Arc::new(MemoryBudget::new(settings.max_buffered_bytes, registry)?);
        Ok(Gate {
            checker,
            budget,
            settings,
            results,
            duration,
        })
    }

    /// Remembers a manifest the registry just accepted as present in `repo`, and its
    /// parsed form, so an index pushed next needs no GET of it. Only now: a push the
    /// registry refused (an anonymous one, say) must not decide how regguard reads
    /// these bytes later.
    pub async fn accepted(
        &self,
        repo: &str,
        digest: &str,
        body: &Bytes,
        content_type: Option<String>,
    ) {
        if let Some(kind) = pushed_kind(body, content_type.as_deref()) {
            if let Ok(m) = parse_off_thread(body, kind).await {
                self.checker.cache_manifest(digest, Arc::new(m)).await;
            }
        }
        self.checker
            .remember_present(
                repo,
                digest,
                body.len() as u64,
                RefKind::Manifest,
                content_type,
            )
            .await;
    }

    /// Counts one push under `result`.
    pub fn count(&self, result: GateResult) {
        self.results.inc(result);
    }

    /// Checks a pushed manifest body. Its parsed form is cached only if the registry
    /// accepts the push (see [`Gate::accepted`]).
    pub async fn inspect(
        &self,
        repo: &str,
        body: &Bytes,
        content_type: Option<&str>,
        auth: Option<&HeaderValue>,
    ) -> Verdict {
        let started = Instant::now();
        let verdict = self.inspect_inner(repo, body, content_type, auth).await;
        self.duration.observe(started.elapsed().as_secs_f64());
        verdict
    }

    async fn inspect_inner(
        &self,
        repo: &str,
        body: &Bytes,
        content_type: Option<&str>,
        auth: Option<&HeaderValue>,
    ) -> Verdict {
        let Some(kind) = pushed_kind(body, content_type) else {
            return Verdict::Passthrough;
        };
        let manifest = match parse_off_thread(body, kind).await {
            Ok(m) => Arc::new(m),
            Err(e) => return Verdict::Invalid(e.to_string()),
        };
        let mut walk = Walk::new(self.settings.max_references);
        let mut found = Findings::default();
        let top = Place {
            platform: None,
            child: None,
        };
        let (mut level, over) = self.items(&mut walk, &manifest, top, 1).await;
        // The first question of a push is never answered from the cache: it also shows
        // whether this pusher may read the repository. On 401/403 the walk stops, and the
        // push goes to the registry, which challenges the client itself; a wrong password
        // costs the registry one check, not one per reference.
        if let Some(first) = level.first() {
            let strict = first.kind == RefKind::Manifest;
            let outcome = self
                .checker
                .check_fresh(repo, &first.desc, first.kind, auth, strict)
                .await;
            if let Outcome::Unauthorized(status) = outcome {
                return Verdict::Unauthorized(status);
            }
        }
        // Only a pusher the registry lets read the repository hears about the budget.
        if let Some(over) = over {
            return Verdict::TooManyReferences(over.0);
        }
        while !level.is_empty() {
            let mut outcomes: Vec<Outcome> = Vec::with_capacity(level.len());
            for batch in level.chunks(PUSH_CONCURRENCY) {
                let checks: Vec<_> = batch
                    .iter()
                    .map(|item| self.check_item(repo, item, auth))
                    .collect();
                outcomes.extend(join_all(checks).await);
            }
            if let Some(Outcome::Unauthorized(status)) = outcomes
                .iter()
                .find(|o| matches!(o, Outcome::Unauthorized(_)))
            {
                return Verdict::Unauthorized(*status);
            }
            let mut present = Vec::new();
            for (item, outcome) in level.into_iter().zip(outcomes) {
                if note(repo, &item, outcome, &mut found)
                    && item.kind == RefKind::Manifest
                    && item.walk_into
                {
                    present.push(item);
                }
            }
            level = Vec::new();
            if self.settings.depth == GateDepth::Shallow {
                break;
            }
            let mut fetched = Vec::with_capacity(present.len());
            for batch in present.chunks(PUSH_CONCURRENCY) {
                let reads: Vec<_> = batch
                    .iter()
                    .map(|item| self.checker.manifest(repo, &item.desc.digest, auth))
                    .collect();
                fetched.extend(join_all(reads).await);
            }
            for (item, fetched) in present.iter().zip(fetched) {
                let child = match fetched {
                    Ok(m) => m,
                    Err(FetchError::Unauthorized(status)) => return Verdict::Unauthorized(status),
                    Err(e) => {
                        found
                            .errors
                            .push(format!("manifest {}: {e}", item.desc.digest));
                        continue;
                    }
                };
                if matches!(child.as_ref(), Manifest::Index { .. })
                    && item.depth >= self.settings.max_depth
                {
                    found.errors.push(format!(
                        "index {} nests deeper than gate max depth {}",
                        item.desc.digest, self.settings.max_depth
                    ));
                    continue;
                }
                let place = Place {
                    platform: item.platform.as_deref(),
                    child: Some(&item.desc.digest),
                };
                let (more, over) = self.items(&mut walk, &child, place, item.depth + 1).await;
                if let Some(over) = over {
                    return Verdict::TooManyReferences(over.0);
                }
                level.extend(more);
            }
        }
        if !found.problems.is_empty() {
            Verdict::Reject(found.problems)
        } else if !found.errors.is_empty() {
            Verdict::CheckError(found.errors.join("; "))
        } else {
            Verdict::Accept
        }
    }

    /// The references of `m` not yet visited in this walk, as items to check, and
    /// whether the walk's budget ran out before all of them.
    async fn items(
        &self,
        walk: &mut Walk,
        m: &Manifest,
        place: Place<'_>,
        depth: u32,
    ) -> (Vec<Item>, Option<OverBudget>) {
        let mut out = Vec::new();
        match self.collect(walk, m, place, depth, &mut out).await {
            Ok(()) => (out, None),
            Err(over) => (out, Some(over)),
        }
    }

    async fn collect(
        &self,
        walk: &mut Walk,
        m: &Manifest,
        place: Place<'_>,
        depth: u32,
        out: &mut Vec<Item>,
    ) -> Result<(), OverBudget> {
        match m {
            Manifest::Index { manifests } => {
                for child in manifests {
                    let visit = walk.visit(RefKind::Manifest, child).await?;
                    if visit == Visit::Repeat {
                        continue;
                    }
                    out.push(Item {
                        desc: child.clone(),
                        kind: RefKind::Manifest,
                        platform: child
                            .platform
                            .as_ref()
                            .map(|p| Arc::from(oci::bounded(&p.to_string()))),
                        child: None,
                        depth,
                        walk_into: visit == Visit::First,
                    });
                }
            }
            Manifest::Image { config, layers } => {
                // One shared copy of where these blobs sit, however many there are.
                let platform: Option<Arc<str>> = place.platform.map(Arc::from);
                let owner: Option<Arc<str>> = place.child.map(Arc::from);
                // The config is always in the registry; only layers may live elsewhere.
                let distributable = layers.iter().filter(|l| l.urls.is_empty());
                for blob in std::iter::once(config).chain(distributable) {
                    if walk.visit(RefKind::Blob, blob).await? == Visit::Repeat {
                        continue;
                    }
                    out.push(Item {
                        desc: blob.clone(),
                        kind: RefKind::Blob,
                        platform: platform.clone(),
                        child: owner.clone(),
                        depth,
                        walk_into: false,
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks one reference; a cached 404 is asked again before it counts.
    async fn check_item(&self, repo: &str, item: &Item, auth: Option<&HeaderValue>) -> Outcome {
        let strict = item.kind == RefKind::Manifest;
        let outcome = self
            .checker
            .check_recent(repo, &item.desc, item.kind, auth, strict, GATE_MAX_AGE)
            .await;
        if outcome == Outcome::Missing {
            return self
                .checker
                .recheck(repo, &item.desc, item.kind, auth, strict)
                .await;
        }
        outcome
    }
}

/// The oldest cached "present" the gate accepts a push on; older answers are asked
/// again. A push's children were checked or pushed moments before its index, so
/// this costs a healthy push nothing, and a reference deleted directly on the
/// registry (where regguard cannot see it) is caught within this long.
const GATE_MAX_AGE: Duration = Duration::from_secs(5);

/// References of one push checked at once: enough to hide the registry's latency
/// for a many-platform index, few enough that one push cannot crowd out others.
const PUSH_CONCURRENCY: usize = 8;

/// Parses a pushed manifest as the registry will read it, refusing ambiguous keys.
async fn parse_off_thread(body: &Bytes, kind: ManifestKind) -> Result<Manifest, ParseError> {
    if body.len() < OFF_THREAD_BYTES {
        return Manifest::parse_strict(body, Some(kind));
    }
    let body = body.clone();
    tokio::task::spawn_blocking(move || Manifest::parse_strict(&body, Some(kind)))
        .await
        .unwrap_or_else(|e| Err(ParseError::NotJson(format!("parser task failed: {e}"))))
}

/// The sha256 digest of a pushed manifest, hashed on the blocking pool when large.
pub async fn digest_off_thread(body: &Bytes) -> String {
    if body.len() < OFF_THREAD_BYTES {
        return oci::sha256_digest(body);
    }
    let owned = body.clone();
    match tokio::task::spawn_blocking(move || oci::sha256_digest(&owned)).await {
        Ok(d) => d,
        Err(_) => oci::sha256_digest(body),
    }
}

/// One reference to check, and where it sits.
struct Item {
    desc: Descriptor,
    kind: RefKind,
    platform: Option<Arc<str>>,
    /// The child image a blob belongs to.
    child: Option<Arc<str>>,
    /// How deep the manifest holding this reference is (the pushed one is 1).
    depth: u32,
    /// The first descriptor of its digest in this push: its content is walked.
    walk_into: bool,
}

/// Records what a check found; true when the reference is present and right.
fn note(repo: &str, item: &Item, outcome: Outcome, found: &mut Findings) -> bool {
    let place = Place {
        platform: item.platform.as_deref(),
        child: item.child.as_deref(),
    };
    let d = &item.desc;
    let kind = item.kind;
    match outcome {
        Outcome::Ok => true,
        Outcome::Missing => {
            found
                .problems
                .push(problem(repo, d, kind, place, Reason::Missing, None, None));
            false
        }
        Outcome::Mismatch {
            what,
            expected,
            found: actual,
        } => {
            found.problems.push(problem(
                repo,
                d,
                kind,
                place,
                Reason::from(what),
                Some(expected),
                Some(actual),
            ));
            false
        }
        Outcome::Unauthorized(s) => {
            found.errors.push(format!(
                "{} {}: the check was answered {s}",
                kind.as_str(),
                d.digest
            ));
            false
        }
        Outcome::Error(e) => {
            found
                .errors
                .push(format!("{} {}: {e}", kind.as_str(), d.digest));
            false
        }
    }
}

/// The kind of a pushed manifest: from Content-Type, else (generic type) from the body's `mediaType`.
fn pushed_kind(body: &[u8], content_type: Option<&str>) -> Option<ManifestKind> {
    if let Some(k) = content_type.and_then(oci::manifest_kind) {
        return Some(k);
    }
    oci::body_media_type(body)
        .as_deref()
        .and_then(oci::manifest_kind)
}

fn problem(
    repo: &str,
    d: &Descriptor,
    kind: RefKind,
    place: Place<'_>,
    reason: Reason,
    expected: Option<String>,
    found: Option<String>,
) -> Problem {
    let what = match (kind, place.child) {
        (RefKind::Manifest, _) => match place.platform {
            Some(p) => format!("child manifest {} ({p})", d.digest),
            None => format!("manifest {}", d.digest),
        },
        (RefKind::Blob, Some(child)) => format!(
            "blob {} of child image {child}{}",
            d.digest,
            place
                .platform
                .map(|p| format!(" ({p})"))
                .unwrap_or_default()
        ),
        (RefKind::Blob, None) => format!("blob {}", d.digest),
    };
    let message = match reason {
        Reason::Missing => format!(
            "{what} is not in repository {repo}: push it to this repository first (or mount it from another), then push this manifest again"
        ),
        Reason::SizeMismatch => format!(
            "{what} has size {} in the manifest but {} in the registry: the manifest was edited or built against other content; rebuild and push again",
            expected.as_deref().unwrap_or("?"),
            found.as_deref().unwrap_or("?")
        ),
        Reason::MediaTypeMismatch => format!(
            "{what} is declared as {} but the registry serves it as {}: fix the descriptor's mediaType",
            expected.as_deref().unwrap_or("?"),
            found.as_deref().unwrap_or("?")
        ),
        Reason::DigestMismatch => format!("{what} does not match its digest in the registry"),
    };
    Problem {
        digest: d.digest.clone(),
        reason,
        expected,
        found,
        platform: place.platform.map(str::to_owned),
        child: place.child.map(str::to_owned),
        kind,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushed_kind_prefers_content_type_then_body_media_type() {
        let body = format!(r#"{{"mediaType":"{}","manifests":[]}}"#, oci::OCI_INDEX);
        assert_eq!(
            pushed_kind(body.as_bytes(), None),
            Some(ManifestKind::Index)
        );
        assert_eq!(
            pushed_kind(body.as_bytes(), Some("application/json")),
            Some(ManifestKind::Index)
        );
        assert_eq!(
            pushed_kind(b"{}", Some(oci::DOCKER_MANIFEST)),
            Some(ManifestKind::Image)
        );
        assert_eq!(
            pushed_kind(b"{}", Some("application/vnd.example+json")),
            None
        );
    }

    #[test]
    fn problem_messages_name_what_to_fix() {
        let d = Descriptor {
            media_type: String::new(),
            digest: "sha256:ab".into(),
            size: 3,
            platform: None,
            urls: vec![],
        };
        let p = problem(
            "team/app",
            &d,
            RefKind::Blob,
            Place {
                platform: Some("linux/amd64"),
                child: Some("sha256:cd"),
            },
            Reason::Missing,
            None,
            None,
        );
        assert!(p
            .message
            .contains("blob sha256:ab of child image sha256:cd (linux/amd64)"));
        assert!(p.message.contains("team/app"));
    }
}
