//! The checker's vocabulary: what kind of reference, what the registry said about it,
//! and the verdict on a descriptor (`judge`). Pure values and functions; no I/O.
//!
//! It names the `result` label values ([`OutcomeKind`]) but registers no metric and knows
//! nothing of caches or callers.

use std::sync::Arc;
use std::time::Duration;

use crate::oci::{self, Descriptor, RefKind};

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

/// Which property of a present reference differs from what its descriptor says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatched {
    /// The manifest is served as another media type (checked only when asked: the gate).
    MediaType,
    Digest,
    Size,
}

impl Mismatched {
    /// In words, for `describe`: "size mismatch: …".
    pub fn as_str(self) -> &'static str {
        match self {
            Mismatched::MediaType => "media type",
            Mismatched::Digest => "digest",
            Mismatched::Size => "size",
        }
    }
}

/// The verdict on one descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Missing,
    Mismatch {
        what: Mismatched,
        expected: String,
        found: String,
    },
    Unauthorized(u16),
    Error(String),
}

crate::metrics::labels! {
    /// An [`Outcome`] without its details: the `result` label of
    /// `regguard_reference_checks_total`, and the `result` of `regguard check --json`.
    pub enum OutcomeKind {
        Ok => "ok",
        Missing => "missing",
        Mismatch => "mismatch",
        Unauthorized => "unauthorized",
        Error => "error",
    }
}

impl OutcomeKind {
    /// Missing or mismatched: a client pulling it would fail.
    pub fn is_broken(self) -> bool {
        matches!(self, OutcomeKind::Missing | OutcomeKind::Mismatch)
    }
}

impl Outcome {
    /// What kind of outcome this is (its `result` label).
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Ok => OutcomeKind::Ok,
            Outcome::Missing => OutcomeKind::Missing,
            Outcome::Mismatch { .. } => OutcomeKind::Mismatch,
            Outcome::Unauthorized(_) => OutcomeKind::Unauthorized,
            Outcome::Error(_) => OutcomeKind::Error,
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
                let what = what.as_str();
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
                        what: Mismatched::MediaType,
                        expected: desc.media_type.clone(),
                        found: found.clone(),
                    };
                }
            }
            if let Some(d) = digest {
                if *d != desc.digest {
                    return Outcome::Mismatch {
                        what: Mismatched::Digest,
                        expected: desc.digest.clone(),
                        found: d.clone(),
                    };
                }
            }
            match size {
                Some(s) if *s != desc.size => Outcome::Mismatch {
                    what: Mismatched::Size,
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

/// Why a request to the upstream could not even be built.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The repository or digest does not make a valid URI path.
    #[error("bad reference: {0}")]
    BadReference(#[source] http::Error),
    #[error("{0}")]
    Build(#[source] http::Error),
}

/// Why a manifest could not be fetched and read. Cloned out of the shared fetch (the
/// content cache hands one failure to every waiter), so non-`Clone` sources sit in `Arc`s.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("upstream answered {0}")]
    Status(u16),
    #[error("not authorized ({0})")]
    Unauthorized(u16),
    #[error(transparent)]
    Request(Arc<RequestError>),
    /// No response head within the check timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("upstream unreachable: {0}")]
    Unreachable(#[source] Arc<hyper_util::client::legacy::Error>),
    /// The body did not arrive within the check timeout.
    #[error("manifest body too slow")]
    BodyTimeout,
    #[error("reading manifest: {0}")]
    Body(#[source] Arc<dyn std::error::Error + Send + Sync>),
    /// Served bytes without `Docker-Content-Digest`, and a tag to fetch by (not a digest).
    #[error("response had no Docker-Content-Digest")]
    NoDigest,
    #[error("body digest {found} does not match {expected}")]
    DigestMismatch { expected: String, found: String },
    #[error(transparent)]
    Parse(#[from] oci::ParseError),
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
            Outcome::Mismatch {
                what: Mismatched::Size,
                ..
            }
        ));
        assert!(matches!(
            judge(&found(5, "sha256:00"), &d, false),
            Outcome::Mismatch {
                what: Mismatched::Digest,
                ..
            }
        ));
        assert!(matches!(
            judge(&found(5, &d.digest), &d, true),
            Outcome::Mismatch {
                what: Mismatched::MediaType,
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
