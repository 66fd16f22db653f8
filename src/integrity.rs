//! Integrity state: what is broken right now.
//!
//! One entry per (repository, index digest, child digest) known broken, from
//! any caller. Entries leave when a re-check finds the reference again or the
//! index itself is gone. The state is exported three ways: the cron probe's
//! gauge `registry_manifest_integrity_failures{instance}`, one
//! `regguard_broken_reference_info` series per entry (bounded), and `/integrity`.
//!
//! It knows nothing of how references are checked or who found them: callers report,
//! it remembers and exports.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use http::HeaderValue;
use prometheus::{IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use serde::Serialize;

use crate::checker::OutcomeKind;
use crate::oci::RefKind;

/// One broken reference. No `Debug`: it holds credentials.
#[derive(Clone, Serialize)]
pub struct BrokenRef {
    pub repository: String,
    /// The tag or digest the client asked for when this was found.
    pub reference: String,
    pub index_digest: String,
    pub child_digest: String,
    /// Platform of the child (or of the child image a blob belongs to); empty if none.
    pub platform: String,
    pub kind: RefKind,
    /// What the upstream said.
    pub upstream_said: String,
    /// `Missing` or `Mismatch`: what the repair is (not serialised; `upstream_said` says it in words).
    #[serde(skip)]
    pub outcome: OutcomeKind,
    /// Seconds since the Unix epoch when first seen broken.
    pub since: u64,
    /// Credentials of the client whose request found it, for re-checks. Never serialised or logged.
    #[serde(skip)]
    pub auth: Option<HeaderValue>,
    /// The descriptor's size, for re-checks.
    #[serde(skip)]
    pub size: u64,
    /// What the vault did about it (absent when there is no vault).
    #[serde(flatten)]
    pub heal: HealNote,
}

/// What healing knows of a broken reference: shown in `/integrity` beside it.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct HealNote {
    /// A client asked for the lost content and was answered from the vault.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub served_from_vault: bool,
    /// The last repair's word on it, e.g. `unrepairable: layer sha256:… not in vault`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repair: Option<String>,
}

type Key = (String, String, String);

struct Inner {
    entries: HashMap<Key, BrokenRef>,
    /// Heal notes by (repository, child digest): a note may come before the entry does.
    notes: HashMap<(String, String), HealNote>,
}

/// Broken references remembered at most. An entry is under 1 KiB, so this bounds the
/// map near 100 MiB even if crafted images (each bounded by its walk's reference
/// budget) keep adding broken references; past it they are counted, not kept.
const MAX_ENTRIES: usize = 100_000;

/// The state and its metrics.
pub struct Integrity {
    inner: Mutex<Inner>,
    failures: IntGauge,
    info: IntGaugeVec,
    overflow: IntCounter,
    untracked: IntCounter,
    max_series: usize,
}

const INFO_LABELS: [&str; 6] = [
    "repository",
    "reference",
    "index_digest",
    "child_digest",
    "platform",
    "kind",
];

fn info_values(b: &BrokenRef) -> [&str; 6] {
    [
        &b.repository,
        &b.reference,
        &b.index_digest,
        &b.child_digest,
        &b.platform,
        b.kind.as_str(),
    ]
}

impl Integrity {
    pub fn new(
        registry: &Registry,
        instance: &str,
        max_series: usize,
    ) -> Result<Self, prometheus::Error> {
        let failures = IntGaugeVec::new(
            Opts::new(
                "registry_manifest_integrity_failures",
                "References (repository, index, child) currently known broken; same meaning as the cron probe's gauge",
            ),
            &["instance"],
        )?;
        registry.register(Box::new(failures.clone()))?;
        let info = IntGaugeVec::new(
            Opts::new(
                "regguard_broken_reference_info",
                "1 for each reference currently known broken",
            ),
            &INFO_LABELS,
        )?;
        registry.register(Box::new(info.clone()))?;
        let overflow = IntCounter::new(
            "regguard_broken_reference_overflow_total",
            "Broken references not exported as an info series because metrics.max_broken_series was reached",
        )?;
        registry.register(Box::new(overflow.clone()))?;
        let untracked = IntCounter::new(
            "regguard_broken_reference_untracked_total",
            "Broken references found but not remembered because the integrity state holds its maximum (100,000)",
        )?;
        registry.register(Box::new(untracked.clone()))?;
        Ok(Integrity {
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                notes: HashMap::new(),
            }),
            failures: failures.get_metric_with_label_values(&[instance])?,
            info,
            overflow,
            untracked,
            max_series,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock means a panic elsewhere; the map itself is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether (repository, index, child) is known broken now.
    pub fn is_broken(&self, repository: &str, index_digest: &str, child_digest: &str) -> bool {
        let key = (
            repository.to_string(),
            index_digest.to_string(),
            child_digest.to_string(),
        );
        self.lock().entries.contains_key(&key)
    }

    /// Records a broken reference. Returns true when it was not known before.
    pub fn report_broken(&self, b: BrokenRef) -> bool {
        self.report_broken_then(b, || {})
    }

    /// [`Self::report_broken`], calling `on_new` under the same lock when the reference
    /// is newly recorded and before the gauges show it: two walks racing on the same
    /// reference run `on_new` once between them, and whoever sees the gauge rise sees
    /// what `on_new` did. With the table full (the reference is counted as untracked) it is
    /// not run.
    pub fn report_broken_then(&self, mut b: BrokenRef, on_new: impl FnOnce()) -> bool {
        let key = (
            b.repository.clone(),
            b.index_digest.clone(),
            b.child_digest.clone(),
        );
        let mut inner = self.lock();
        if let Some(existing) = inner.entries.get_mut(&key) {
            existing.upstream_said = b.upstream_said;
            existing.outcome = b.outcome;
            if b.auth.is_some() {
                existing.auth = b.auth;
            }
            return false;
        }
        if inner.entries.len() >= MAX_ENTRIES {
            self.untracked.inc();
            return false;
        }
        if let Some(note) = inner
            .notes
            .get(&(b.repository.clone(), b.child_digest.clone()))
        {
            b.heal = note.clone();
        }
        on_new();
        tracing::warn!(
            repository = %b.repository,
            reference = %b.reference,
            index_digest = %b.index_digest,
            child_digest = %b.child_digest,
            platform = %b.platform,
            kind = b.kind.as_str(),
            upstream_said = %b.upstream_said,
            "broken reference: a client pulling this image will fail"
        );
        if inner.entries.len() < self.max_series {
            self.info.with_label_values(&info_values(&b)).set(1);
        } else {
            self.overflow.inc();
        }
        inner.entries.insert(key, b);
        self.failures.set(inner.entries.len() as i64);
        true
    }

    /// Forgets the credentials captured with a broken reference (the registry refused them).
    pub fn drop_auth(&self, b: &BrokenRef) {
        let key = (
            b.repository.clone(),
            b.index_digest.clone(),
            b.child_digest.clone(),
        );
        if let Some(e) = self.lock().entries.get_mut(&key) {
            e.auth = None;
        }
    }

    /// Notes that a client was answered from the vault for `digest` in `repository`.
    pub fn mark_served(&self, repository: &str, digest: &str) {
        self.note(repository, digest, |n| n.served_from_vault = true);
    }

    /// Notes the last repair's word on `digest` in `repository` (`None`: nothing to say).
    pub fn note_repair(&self, repository: &str, digest: &str, word: Option<String>) {
        self.note(repository, digest, |n| n.repair = word.clone());
    }

    fn note(&self, repository: &str, digest: &str, change: impl Fn(&mut HealNote)) {
        let mut inner = self.lock();
        let key = (repository.to_owned(), digest.to_owned());
        if !inner.notes.contains_key(&key) && inner.notes.len() >= MAX_ENTRIES {
            return;
        }
        change(inner.notes.entry(key).or_default());
        for b in inner.entries.values_mut() {
            if b.repository == repository && b.child_digest == digest {
                change(&mut b.heal);
            }
        }
    }

    /// Records that a reference is present again; removes it if it was broken.
    pub fn report_ok(&self, repository: &str, index_digest: &str, child_digest: &str) {
        let key = (
            repository.to_string(),
            index_digest.to_string(),
            child_digest.to_string(),
        );
        let mut inner = self.lock();
        inner
            .notes
            .remove(&(repository.to_owned(), child_digest.to_owned()));
        if let Some(b) = inner.entries.remove(&key) {
            // Good news, not a warning: INFO, so alerting on WARN does not page for a repair.
            self.forget(
                &b,
                tracing::Level::INFO,
                "healed: the reference is present again",
            );
            self.failures.set(inner.entries.len() as i64);
        }
    }

    /// Removes every entry of an index that no longer exists.
    pub fn remove_index(&self, repository: &str, index_digest: &str) {
        let mut inner = self.lock();
        let gone: Vec<Key> = inner
            .entries
            .keys()
            .filter(|(r, i, _)| r == repository && i == index_digest)
            .cloned()
            .collect();
        for key in gone {
            if let Some(b) = inner.entries.remove(&key) {
                self.forget(
                    &b,
                    tracing::Level::WARN,
                    "cleared: the index itself is gone",
                );
            }
        }
        self.failures.set(inner.entries.len() as i64);
    }

    fn forget(&self, b: &BrokenRef, level: tracing::Level, why: &str) {
        // Removing a series that was never exported (overflow) is a harmless error.
        let _ = self.info.remove_label_values(&info_values(b));
        // A callsite's level is fixed at compile time: one macro per level.
        macro_rules! log {
            ($mac:ident) => {
                tracing::$mac!(
                    repository = %b.repository,
                    index_digest = %b.index_digest,
                    child_digest = %b.child_digest,
                    platform = %b.platform,
                    kind = b.kind.as_str(),
                    "{why}"
                )
            };
        }
        if level == tracing::Level::INFO {
            log!(info);
        } else {
            log!(warn);
        }
    }

    /// Every broken reference, for `/integrity` and re-checks.
    pub fn snapshot(&self) -> Vec<BrokenRef> {
        let mut v: Vec<BrokenRef> = self.lock().entries.values().cloned().collect();
        v.sort_by(|a, b| {
            (&a.repository, &a.index_digest, &a.child_digest).cmp(&(
                &b.repository,
                &b.index_digest,
                &b.child_digest,
            ))
        });
        v
    }

    /// Number of broken references.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for BrokenRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokenRef")
            .field("repository", &self.repository)
            .field("index_digest", &self.index_digest)
            .field("child_digest", &self.child_digest)
            .field("kind", &self.kind)
            .field("upstream_said", &self.upstream_said)
            .finish_non_exhaustive()
    }
}

/// Seconds since the Unix epoch.
pub fn now_epoch() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broken(child: &str) -> BrokenRef {
        BrokenRef {
            repository: "r".into(),
            reference: "v1".into(),
            index_digest: "sha256:i".into(),
            child_digest: child.into(),
            platform: "linux/amd64".into(),
            kind: RefKind::Manifest,
            upstream_said: "404".into(),
            outcome: OutcomeKind::Missing,
            since: 0,
            auth: None,
            size: 1,
            heal: Default::default(),
        }
    }

    #[test]
    fn a_broken_reference_never_shows_its_credentials() {
        let mut b = broken("sha256:a");
        b.auth = Some(HeaderValue::from_static("Basic c2VjcmV0OnRva2Vu"));
        let shown = format!("{b:?} {}", serde_json::to_string(&b).unwrap());
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
        assert!(shown.contains("sha256:a"));
    }

    #[test]
    fn racing_reports_of_one_reference_run_the_first_report_hook_once_before_the_gauge() {
        let reg = Registry::new();
        let s = std::sync::Arc::new(Integrity::new(&reg, "test", 10).unwrap());
        let hooks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (s, hooks, barrier) = (s.clone(), hooks.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let gauge_before = s.failures.get();
                    s.report_broken_then(broken("sha256:a"), || {
                        assert_eq!(gauge_before, 0, "the hook runs before the gauge rises");
                        hooks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    })
                })
            })
            .collect();
        let firsts = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|first| *first)
            .count();
        assert_eq!(firsts, 1);
        assert_eq!(hooks.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(s.failures.get(), 1);
    }

    #[test]
    fn gauge_counts_entries_once_and_heals() {
        let reg = Registry::new();
        let s = Integrity::new(&reg, "test", 1).unwrap();
        assert!(s.report_broken(broken("sha256:a")));
        assert!(
            !s.report_broken(broken("sha256:a")),
            "same reference is not counted twice"
        );
        assert!(s.report_broken(broken("sha256:b")));
        assert_eq!(s.failures.get(), 2);
        assert_eq!(s.overflow.get(), 1, "only one info series allowed");
        s.report_ok("r", "sha256:i", "sha256:a");
        assert_eq!(s.failures.get(), 1);
        s.remove_index("r", "sha256:i");
        assert_eq!(s.failures.get(), 0);
        assert!(s.is_empty());
    }

    /// Captures what is logged while `f` runs, as the text format prints it.
    fn logged(f: impl FnOnce()) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
        text
    }

    #[test]
    fn healed_is_info_and_cleared_is_warn() {
        let s = Integrity::new(&Registry::new(), "test", 10).unwrap();
        s.report_broken(broken("sha256:a"));
        let text = logged(|| s.report_ok("r", "sha256:i", "sha256:a"));
        assert!(text.contains(" INFO ") && text.contains("healed"), "{text}");
        s.report_broken(broken("sha256:b"));
        let text = logged(|| s.remove_index("r", "sha256:i"));
        assert!(
            text.contains(" WARN ") && text.contains("cleared"),
            "{text}"
        );
    }
}
