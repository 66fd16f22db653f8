//! The push gate: a manifest PUT is checked before the registry sees it.
//!
//! Registry 2.8 checks only that an index's direct children and an image's
//! blobs are linked; it accepts children whose layers are gone and descriptors
//! whose sizes or media types lie. The gate asks the shared [`Checker`] about
//! every reference (with the pusher's credentials, never trusting a cached
//! 404), and, in `deep` mode, about each child image's config and layers too.
//! A `subject` is never required to exist (the OCI spec says a registry MUST
//! accept it); layers with `urls` are skipped; unknown media types pass.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::HeaderValue;
use prometheus::{Histogram, HistogramOpts, Registry};

use crate::metrics::CounterSet;
use serde::{Deserialize, Serialize};

use crate::checker::{Checker, FetchError, Outcome, RefKind};
use crate::oci::{self, Descriptor, Manifest, ManifestKind};

/// `[gate] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateMode {
    /// Refuse what would be broken on the first pull.
    Enforce,
    /// Forward everything; count what enforce would have refused.
    Audit,
    /// No checks.
    Off,
}

/// `[gate] on_check_error`: what to do when a reference cannot be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCheckError {
    /// 503 `UNAVAILABLE` with `Retry-After`: a registry that cannot answer a HEAD would not
    /// store the manifest well either.
    Reject,
    /// Forward the push unchecked.
    Allow,
}

/// `[gate] depth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateDepth {
    /// Also each child image's config and layers, following nested indexes.
    Deep,
    /// Only the manifest's own references.
    Shallow,
}

/// Validated `[gate]` settings.
#[derive(Debug, Clone)]
pub struct GateSettings {
    pub mode: GateMode,
    pub on_check_error: OnCheckError,
    pub depth: GateDepth,
    pub max_depth: u32,
}

/// One thing wrong with a pushed manifest.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub digest: String,
    /// missing | size_mismatch | media_type_mismatch | digest_mismatch
    pub reason: &'static str,
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
    /// A reference could not be checked (timeout, 5xx, 401 to the check).
    CheckError(String),
}

impl Verdict {
    /// The `result` label.
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Accept => "accepted",
            Verdict::Passthrough => "passthrough",
            Verdict::Invalid(_) | Verdict::Reject(_) => "rejected",
            Verdict::CheckError(_) => "check_error",
        }
    }
}

/// The gate.
pub struct Gate {
    checker: Arc<Checker>,
    pub settings: GateSettings,
    results: CounterSet,
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
            "Manifest pushes by gate result (accepted, rejected, audit_would_reject, check_error, passthrough)",
            "result",
            &["accepted", "rejected", "audit_would_reject", "check_error", "passthrough"],
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
        Ok(Gate {
            checker,
            settings,
            results,
            duration,
        })
    }

    /// Remembers a manifest the registry just accepted as present in `repo`.
    /// Its parsed form is cached too, so an index pushed next needs no GET of this child.
    pub async fn accepted(&self, repo: &str, body: &Bytes, content_type: Option<String>) {
        let digest = oci::sha256_digest(body);
        let kind = pushed_kind(body, content_type.as_deref());
        if kind.is_some() {
            // Only caches; a parse failure here changes nothing about the accepted push.
            let _ = self.checker.verified(&digest, body, kind).await;
        }
        self.checker
            .remember_present(
                repo,
                &digest,
                body.len() as u64,
                RefKind::Manifest,
                content_type,
            )
            .await;
    }

    /// Counts one push under `result`.
    pub fn count(&self, result: &str) {
        self.results.inc(result);
    }

    /// Checks a pushed manifest body.
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
        let manifest = match Manifest::parse(body, Some(kind)) {
            Ok(m) => m,
            Err(e) => return Verdict::Invalid(e.to_string()),
        };
        let mut found = Findings::default();
        let top = Place {
            platform: None,
            child: None,
        };
        match &manifest {
            Manifest::Index { manifests } => self.index(repo, manifests, 1, auth, &mut found).await,
            Manifest::Image { .. } => self.image(repo, &manifest, top, auth, &mut found).await,
        }
        if !found.problems.is_empty() {
            Verdict::Reject(found.problems)
        } else if !found.errors.is_empty() {
            Verdict::CheckError(found.errors.join("; "))
        } else {
            Verdict::Accept
        }
    }

    /// Checks one reference; a cached 404 is asked again before it counts.
    async fn reference(
        &self,
        repo: &str,
        d: &Descriptor,
        kind: RefKind,
        place: Place<'_>,
        auth: Option<&HeaderValue>,
        found: &mut Findings,
    ) -> bool {
        let strict = kind == RefKind::Manifest;
        let mut outcome = self.checker.check_with(repo, d, kind, auth, strict).await;
        if outcome == Outcome::Missing {
            outcome = self.checker.recheck(repo, d, kind, auth, strict).await;
        }
        match outcome {
            Outcome::Ok => true,
            Outcome::Missing => {
                found
                    .problems
                    .push(problem(repo, d, kind, place, "missing", None, None));
                false
            }
            Outcome::Mismatch {
                what,
                expected,
                found: actual,
            } => {
                let reason = match what {
                    "size" => "size_mismatch",
                    "media type" => "media_type_mismatch",
                    _ => "digest_mismatch",
                };
                found.problems.push(problem(
                    repo,
                    d,
                    kind,
                    place,
                    reason,
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

    async fn index(
        &self,
        repo: &str,
        children: &[Descriptor],
        depth: u32,
        auth: Option<&HeaderValue>,
        found: &mut Findings,
    ) {
        for child in children {
            let platform = child.platform.as_ref().map(ToString::to_string);
            let place = Place {
                platform: platform.as_deref(),
                child: None,
            };
            let present = self
                .reference(repo, child, RefKind::Manifest, place, auth, found)
                .await;
            if !present || self.settings.depth == GateDepth::Shallow {
                continue;
            }
            match self.checker.manifest(repo, &child.digest, auth).await {
                Ok(m) => match m.as_ref() {
                    Manifest::Index { manifests } => {
                        if depth >= self.settings.max_depth {
                            found.errors.push(format!(
                                "index {} nests deeper than gate max depth {}",
                                child.digest, self.settings.max_depth
                            ));
                        } else {
                            Box::pin(self.index(repo, manifests, depth + 1, auth, found)).await;
                        }
                    }
                    Manifest::Image { .. } => {
                        let place = Place {
                            platform: platform.as_deref(),
                            child: Some(&child.digest),
                        };
                        self.image(repo, &m, place, auth, found).await;
                    }
                },
                Err(FetchError::Unauthorized(s)) => found.errors.push(format!(
                    "manifest {}: the check was answered {s}",
                    child.digest
                )),
                Err(e) => found.errors.push(format!("manifest {}: {e}", child.digest)),
            }
        }
    }

    async fn image(
        &self,
        repo: &str,
        image: &Manifest,
        place: Place<'_>,
        auth: Option<&HeaderValue>,
        found: &mut Findings,
    ) {
        for blob in image.references() {
            if !blob.urls.is_empty() {
                continue; // non-distributable layer: lives elsewhere by design
            }
            self.reference(repo, blob, RefKind::Blob, place, auth, found)
                .await;
        }
    }
}

/// The kind of a pushed manifest: from Content-Type, else (generic type) from the body's `mediaType`.
fn pushed_kind(body: &[u8], content_type: Option<&str>) -> Option<ManifestKind> {
    if let Some(k) = content_type.and_then(oci::manifest_kind) {
        return Some(k);
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Peek {
        media_type: Option<String>,
    }
    let peek: Peek = serde_json::from_slice(body).ok()?;
    peek.media_type.as_deref().and_then(oci::manifest_kind)
}

fn problem(
    repo: &str,
    d: &Descriptor,
    kind: RefKind,
    place: Place<'_>,
    reason: &'static str,
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
        "missing" => format!(
            "{what} is not in repository {repo}: push it to this repository first (or mount it from another), then push this manifest again"
        ),
        "size_mismatch" => format!(
            "{what} has size {} in the manifest but {} in the registry: the manifest was edited or built against other content; rebuild and push again",
            expected.as_deref().unwrap_or("?"),
            found.as_deref().unwrap_or("?")
        ),
        "media_type_mismatch" => format!(
            "{what} is declared as {} but the registry serves it as {}: fix the descriptor's mediaType",
            expected.as_deref().unwrap_or("?"),
            found.as_deref().unwrap_or("?")
        ),
        _ => format!("{what} does not match its digest in the registry"),
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
            "missing",
            None,
            None,
        );
        assert!(p
            .message
            .contains("blob sha256:ab of child image sha256:cd (linux/amd64)"));
        assert!(p.message.contains("team/app"));
    }
}
