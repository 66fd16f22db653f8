//! Evidence of loss wins over a cached positive, at once.
//!
//! Serve-time validation trusts what it checked for `ok_ttl`. These are the
//! events that end that trust early:
//!
//! - a 404 for a digest that a known index references, whether a client got it
//!   (the tap) or a check of regguard's own did: the broken reference is
//!   recorded against every referencing index now, cached positives about the
//!   digest are dropped, and those indexes are validated again;
//! - a DELETE by digest that passed through regguard, or a registry
//!   notification of one: everything cached about the repository is dropped and
//!   the indexes regguard knows there are validated again;
//! - the upstream going away and coming back (an offline garbage collection is
//!   a stopped registry): every cached positive is dropped.
//!
//! It knows the validator's shared state and the checker; nothing of HTTP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use moka::sync::Cache;

use super::{Inspector, Job, Shared};
use crate::checker::RefKind;
use crate::integrity::{now_epoch, BrokenRef};
use crate::oci::ManifestKind;

/// Indexes remembered as referencing one digest. Real images share layers across
/// a handful of tags; past this the oldest parent is forgotten (it is still found
/// broken by its own next validation).
const MAX_PARENTS: usize = 8;

/// One index that references a digest, and how.
#[derive(Clone)]
pub(super) struct Parent {
    /// The digest of the index (or image manifest) whose walk met the reference: the
    /// integrity state's key.
    pub index: Arc<str>,
    /// The tag or digest that index was served under.
    pub reference: Arc<str>,
    pub platform: Arc<str>,
    pub kind: RefKind,
    pub size: u64,
    /// The media type the descriptor declares (decides whether a client's 404 is conclusive).
    pub media_type: Arc<str>,
}

pub(super) type Parents = Arc<Vec<Parent>>;

/// Approximate bytes one referenced-map entry holds, for its byte-weighted bound.
pub(super) fn weight(key: &(Arc<str>, Arc<str>), parents: &Parents) -> u32 {
    let strings: usize = parents
        .iter()
        .map(|p| p.index.len() + p.reference.len() + p.platform.len() + p.media_type.len() + 100)
        .sum();
    u32::try_from(key.0.len() + key.1.len() + 64 + strings).unwrap_or(u32::MAX)
}

/// (repository, digest) → the indexes that reference it.
pub(super) type Referenced = Cache<(Arc<str>, Arc<str>), Parents>;

/// How a 404 reached regguard.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Witness {
    /// A check regguard made itself (all four manifest types accepted): conclusive.
    Check,
    /// A 404 passed to a client. For a manifest it is conclusive only when the client
    /// accepted the child's media type: registry 2.8 answers 404 for an existing OCI
    /// manifest to a client that does not accept OCI types.
    Client { accepts_media_type: bool },
}

impl Shared {
    /// Remembers that `root` (served as `reference`) references `digest` in `repo`.
    pub(super) fn remember_parent(&self, repo: &str, digest: &str, parent: Parent) {
        self.referenced
            .entry((Arc::from(repo), Arc::from(digest)))
            .and_upsert_with(|old| {
                let mut parents: Vec<Parent> =
                    old.map(|e| e.into_value().to_vec()).unwrap_or_default();
                if let Some(p) = parents.iter_mut().find(|p| p.index == parent.index) {
                    *p = parent;
                } else {
                    if parents.len() >= MAX_PARENTS {
                        parents.remove(0);
                    }
                    parents.push(parent);
                }
                Arc::new(parents)
            });
    }

    pub(super) fn parents(&self, repo: &str, digest: &str) -> Option<Parents> {
        self.referenced.get(&(Arc::from(repo), Arc::from(digest)))
    }
}

/// A client's 404 for a digest no walked index referenced yet (see `Shared::orphan_loss`).
#[derive(Clone)]
pub(crate) struct Orphan {
    /// The client's `Accept`: the 404 of a manifest is conclusive only if it named its type.
    pub accept: Arc<str>,
}

/// How long such a 404 waits for a walk to meet its digest.
pub(super) const ORPHAN_FOR: Duration = Duration::from_secs(30);

/// Whether a client's `Accept` names `media_type` (registry 2.8 answers 404 for an existing
/// OCI manifest to a client that does not accept OCI types).
pub(super) fn accepts(accept: &str, media_type: &str) -> bool {
    !media_type.is_empty()
        && accept
            .split(',')
            .any(|t| crate::oci::same_media_type(t, media_type))
}

/// How long one digest's loss is handled once: a client that keeps asking for a lost
/// digest causes one eviction and one re-validation per period, not one per request.
pub(super) const LOSS_DEDUP: Duration = Duration::from_secs(2);

impl Inspector {
    /// A 404 for `digest` in `repo`: records the broken reference against every index
    /// that references it (except `exclude`, whose own walk records it), drops cached
    /// positives about it, and validates those indexes again. Returns at once: the
    /// record is synchronous, the eviction and re-validation run in the background.
    pub(super) fn loss(
        &self,
        repo: &str,
        digest: &str,
        parents: Option<Parents>,
        witness: Witness,
        exclude: Option<&str>,
        auth: Option<&HeaderValue>,
    ) {
        let key = (Arc::from(repo), Arc::from(digest));
        if self.shared.recent_loss.contains_key(&key) {
            return;
        }
        self.shared.recent_loss.insert(key, ());
        let Some(parents) = parents else {
            // No index walked so far references it: nothing to report yet. The index it
            // came from may still be queued (a client fetches the children right after
            // the index); a cached positive about the digest must not outlive this 404,
            // or that walk would take the cache's word for it and miss the loss.
            let checker = self.checker.clone();
            let (repo, digest) = (repo.to_owned(), digest.to_owned());
            self.shared.background.spawn(async move {
                checker.forget(&repo, &digest).await;
            });
            return;
        };
        let conclusive = |p: &Parent| match witness {
            Witness::Check => true,
            Witness::Client { accepts_media_type } => p.kind == RefKind::Blob || accepts_media_type,
        };
        let mut stale = Vec::new();
        for p in parents.iter() {
            if exclude == Some(p.index.as_ref()) {
                continue;
            }
            if conclusive(p) {
                self.integrity.report_broken(BrokenRef {
                    repository: repo.to_owned(),
                    reference: p.reference.to_string(),
                    index_digest: p.index.to_string(),
                    child_digest: digest.to_owned(),
                    platform: p.platform.to_string(),
                    kind: p.kind,
                    upstream_said: format!(
                        "{} (answered to a client)",
                        crate::checker::Outcome::Missing.describe(p.kind)
                    ),
                    outcome: crate::checker::OutcomeKind::Missing,
                    since: now_epoch(),
                    auth: auth.cloned().map(sensitive),
                    size: p.size,
                    heal: Default::default(),
                });
            }
            stale.push(p.clone());
        }
        if stale.is_empty() {
            return;
        }
        let (checker, shared) = (self.checker.clone(), self.shared.clone());
        let (service_auth, blobs) = (self.service_auth.clone(), self.settings.blobs);
        let (repo, digest) = (repo.to_owned(), digest.to_owned());
        let auth = auth.cloned().map(sensitive).or(service_auth);
        self.shared.background.spawn(async move {
            checker.forget(&repo, &digest).await;
            for p in stale {
                shared.forget_ok(&repo, &p.index);
                shared.revalidate(&repo, &p.index, &p.reference, auth.clone(), blobs);
            }
        });
    }

    /// A DELETE by digest in `repo` passed through, or the registry notified one: drops
    /// everything cached about the repository and validates the indexes known there.
    pub(crate) fn deleted(&self, repo: &str, auth: Option<&HeaderValue>) {
        self.checker.forget_repository(repo);
        self.shared.recent_ok.forget_repository(repo);
        let known: Vec<(Arc<str>, Arc<str>)> = self
            .shared
            .indexes
            .iter()
            .filter(|(k, _)| k.0.as_ref() == repo)
            .map(|(k, reference)| (k.1.clone(), reference))
            .collect();
        let auth = auth
            .cloned()
            .map(sensitive)
            .or_else(|| self.service_auth.clone());
        for (index, reference) in known {
            self.shared
                .revalidate(repo, &index, &reference, auth.clone(), self.settings.blobs);
        }
    }

    /// The upstream went away and came back: nothing it said before can be trusted.
    pub(crate) fn upstream_returned(&self) {
        self.checker.forget_all();
        self.shared.recent_ok.forget_all();
        tracing::warn!(
            "the registry went away and came back: cached answers dropped; every index is validated afresh"
        );
    }
}

impl Shared {
    fn forget_ok(&self, repo: &str, index: &str) {
        self.recent_ok.forget(repo, index);
    }

    fn revalidate(
        &self,
        repo: &str,
        index: &str,
        reference: &str,
        auth: Option<HeaderValue>,
        blobs: bool,
    ) {
        self.submit(Job {
            repository: repo.to_owned(),
            reference: reference.to_owned(),
            digest: Some(index.to_owned()),
            body: None,
            held: None,
            kind: ManifestKind::Index,
            auth,
            seen_at: Instant::now(),
            blobs,
        });
    }
}

/// Credentials held in memory are marked sensitive, so no `Debug` or log shows them.
pub(crate) fn sensitive(mut v: HeaderValue) -> HeaderValue {
    v.set_sensitive(true);
    v
}
