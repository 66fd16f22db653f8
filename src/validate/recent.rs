//! Manifests validated ok within `ok_ttl`, keyed so that the request path's lookup (one
//! per manifest served) allocates nothing: the key is one string, `<0|1><repository>@<digest>`
//! (with blob checks or without), built on the stack to be looked up. A repository name
//! cannot hold `@`, so the key splits one way only.
//!
//! It knows nothing of validation; the validator decides what goes in and comes out.

use std::time::Duration;

use moka::sync::Cache;

/// Keys up to this long are built on the stack; longer ones (a repository name near the
/// registry's 255-character limit with a long digest) are allocated.
const STACK_KEY: usize = 384;

pub(super) struct RecentOk {
    cache: Cache<String, ()>,
}

impl RecentOk {
    pub(super) fn new(capacity: u64, ttl: Duration) -> Self {
        RecentOk {
            cache: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .support_invalidation_closures()
                .build(),
        }
    }

    pub(super) fn contains(&self, repository: &str, digest: &str, blobs: bool) -> bool {
        with_key(repository, digest, blobs, |k| self.cache.contains_key(k))
    }

    pub(super) fn insert(&self, repository: &str, digest: &str, blobs: bool) {
        self.cache.insert(owned_key(repository, digest, blobs), ());
    }

    /// Forgets `digest` in `repository`, with and without blob checks.
    pub(super) fn forget(&self, repository: &str, digest: &str) {
        for blobs in [false, true] {
            with_key(repository, digest, blobs, |k| self.cache.invalidate(k));
        }
    }

    /// Forgets everything in `repository`.
    pub(super) fn forget_repository(&self, repository: &str) {
        let prefix = format!("{repository}@");
        let _ = self
            .cache
            .invalidate_entries_if(move |k, _| k.get(1..).is_some_and(|k| k.starts_with(&prefix)));
    }

    pub(super) fn forget_all(&self) {
        self.cache.invalidate_all();
    }
}

fn owned_key(repository: &str, digest: &str, blobs: bool) -> String {
    let mut k = String::with_capacity(2 + repository.len() + digest.len());
    k.push(if blobs { '1' } else { '0' });
    k.push_str(repository);
    k.push('@');
    k.push_str(digest);
    k
}

/// Calls `f` with the key of (`repository`, `digest`, `blobs`).
fn with_key<R>(repository: &str, digest: &str, blobs: bool, f: impl FnOnce(&str) -> R) -> R {
    use std::io::Write as _;
    let mut buf = [0u8; STACK_KEY];
    let mut rest: &mut [u8] = &mut buf;
    let fits = rest
        .write_all(if blobs { b"1" } else { b"0" })
        .and_then(|()| rest.write_all(repository.as_bytes()))
        .and_then(|()| rest.write_all(b"@"))
        .and_then(|()| rest.write_all(digest.as_bytes()))
        .is_ok();
    let len = STACK_KEY - rest.len();
    // Whole `str`s and ASCII bytes, joined: valid UTF-8.
    match buf.get(..len).map(std::str::from_utf8) {
        Some(Ok(k)) if fits => f(k),
        _ => f(&owned_key(repository, digest, blobs)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_and_heap_keys_are_the_same_key() {
        let long = "r/".repeat(200);
        for repo in ["library/alpine", long.as_str()] {
            let r = RecentOk::new(100, Duration::from_secs(60));
            r.insert(repo, "sha256:abc", false);
            assert!(r.contains(repo, "sha256:abc", false), "{}", repo.len());
            assert!(
                !r.contains(repo, "sha256:abc", true),
                "blobs or not: two keys"
            );
            r.forget(repo, "sha256:abc");
            assert!(!r.contains(repo, "sha256:abc", false));
        }
    }

    #[test]
    fn forgetting_a_repository_spares_others_sharing_its_prefix() {
        let r = RecentOk::new(100, Duration::from_secs(60));
        r.insert("app", "sha256:a", false);
        r.insert("app", "sha256:a", true);
        r.insert("app2", "sha256:a", false);
        r.insert("app/sub", "sha256:a", false);
        r.forget_repository("app");
        r.cache.run_pending_tasks();
        assert!(!r.contains("app", "sha256:a", false));
        assert!(!r.contains("app", "sha256:a", true));
        assert!(r.contains("app2", "sha256:a", false));
        assert!(r.contains("app/sub", "sha256:a", false));
    }
}
