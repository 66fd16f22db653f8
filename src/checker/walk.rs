//! The bound on one walk over a manifest tree, shared by every walker (validation,
//! the gate, the scan, `check`): which descriptors are new, which repeat, and when
//! the walk has judged enough. Knows nothing of the registry.

use std::collections::HashSet;

use super::RefKind;
use crate::oci::Descriptor;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci;

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
}
