//! Retention and the size cap: records not seen for `retention` go, then content no record
//! names, then (over `max_bytes`) the least recently seen content and its records.

use std::collections::HashMap;

use futures_util::StreamExt as _;

use super::{epoch_now, StoreError, Vault};

/// Content younger than this is never removed as unreferenced: its record may be in flight.
const GRACE_SECS: i64 = 3600;

/// What one prune did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PruneReport {
    pub records_removed: u64,
    pub objects_removed: u64,
    pub objects: u64,
    pub bytes: u64,
}

pub(super) async fn run(vault: &Vault) -> Result<PruneReport, StoreError> {
    let now = epoch_now();
    let retention = i64::try_from(vault.settings.retention.as_secs()).unwrap_or(i64::MAX);
    let mut report = PruneReport::default();

    // Records: drop the expired; remember, per digest, when it was last seen anywhere.
    let mut last_seen: HashMap<String, i64> = HashMap::new();
    let mut records: HashMap<String, Vec<String>> = HashMap::new();
    let mut seen = vault.store.list_seen();
    while let Some(entry) = seen.next().await {
        let entry = entry?;
        if now.saturating_sub(entry.last_seen) > retention {
            vault
                .store
                .forget_seen(&entry.repository, &entry.digest)
                .await?;
            vault
                .known
                .invalidate(&Vault::key(&entry.repository, &entry.digest));
            report.records_removed += 1;
            continue;
        }
        let at = last_seen
            .entry(entry.digest.clone())
            .or_insert(entry.last_seen);
        *at = (*at).max(entry.last_seen);
        records
            .entry(entry.digest)
            .or_default()
            .push(entry.repository);
    }

    // Content: drop what no record names (after a grace period); list the rest by last seen.
    let mut kept: Vec<(i64, String, u64)> = Vec::new();
    let mut content = vault.store.list_content();
    while let Some(entry) = content.next().await {
        let entry = entry?;
        match last_seen.get(&entry.digest) {
            Some(at) => kept.push((*at, entry.digest, entry.size)),
            None if now.saturating_sub(entry.modified) > GRACE_SECS => {
                vault.store.delete_content(&entry.digest).await?;
                report.objects_removed += 1;
            }
            None => kept.push((entry.modified, entry.digest, entry.size)),
        }
    }

    // The size cap: least recently seen first.
    let mut total: u64 = kept.iter().map(|(_, _, size)| size).sum();
    if let Some(cap) = vault.settings.max_bytes {
        kept.sort();
        let mut evict = 0;
        for (_, digest, size) in &kept {
            if total <= cap {
                break;
            }
            for repository in records.get(digest).into_iter().flatten() {
                vault.store.forget_seen(repository, digest).await?;
                vault.known.invalidate(&Vault::key(repository, digest));
                report.records_removed += 1;
            }
            vault.store.delete_content(digest).await?;
            report.objects_removed += 1;
            total = total.saturating_sub(*size);
            evict += 1;
        }
        kept.drain(..evict);
    }

    report.objects = kept.len() as u64;
    report.bytes = total;
    vault
        .metrics
        .objects
        .set(i64::try_from(report.objects).unwrap_or(i64::MAX));
    vault
        .metrics
        .bytes
        .set(i64::try_from(report.bytes).unwrap_or(i64::MAX));
    vault.metrics.pruned.inc_by(report.objects_removed);
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::{Duration, SystemTime};

    use bytes::Bytes;

    use crate::config::{VaultLocation, VaultSettings};
    use crate::oci::RefKind;
    use crate::vault::{Seen, Vault};

    fn vault(dir: &std::path::Path, max_bytes: Option<u64>) -> std::sync::Arc<Vault> {
        let settings = VaultSettings {
            location: Some(VaultLocation::Dir(dir.to_path_buf())),
            default_location: false,
            layers: false,
            max_blob_size: 1 << 20,
            retention: Duration::from_secs(30 * 86400),
            max_bytes,
            aws: Vec::new(),
        };
        Vault::open(settings, None, &prometheus::Registry::new()).unwrap()
    }

    async fn keep(v: &Vault, repo: &str, data: &'static [u8]) -> String {
        let digest = crate::oci::sha256_digest(data);
        v.store()
            .put_bytes(&digest, Bytes::from_static(data))
            .await
            .unwrap();
        let seen = Seen {
            media_type: "application/octet-stream".into(),
            size: data.len() as u64,
            kind: RefKind::Blob,
        };
        v.store().mark_seen(repo, &digest, &seen).await.unwrap();
        digest
    }

    /// Sets a file's modification time `days` ago (what object stores report as last modified).
    fn age(path: &std::path::Path, days: u64) {
        let when = SystemTime::now() - Duration::from_secs(days * 86400);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    fn seen_file(dir: &std::path::Path, repo: &str, digest: &str) -> std::path::PathBuf {
        dir.join("repositories")
            .join(repo)
            .join("_seen/sha256")
            .join(digest.trim_start_matches("sha256:"))
    }

    fn content_file(dir: &std::path::Path, digest: &str) -> std::path::PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        dir.join("blobs/sha256")
            .join(hex.get(..2).unwrap())
            .join(hex)
    }

    #[tokio::test]
    async fn records_past_retention_go_and_then_their_unreferenced_content() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path(), None);
        let old = keep(&v, "team/app", b"old blob").await;
        let fresh = keep(&v, "team/app", b"fresh blob").await;
        // Seen in two repositories: one expired record does not take the content.
        v.store()
            .mark_seen(
                "team/other",
                &old,
                &Seen {
                    media_type: String::new(),
                    size: 8,
                    kind: RefKind::Blob,
                },
            )
            .await
            .unwrap();
        age(&seen_file(dir.path(), "team/app", &old), 40);
        let r = v.prune().await.unwrap();
        assert_eq!((r.records_removed, r.objects_removed), (1, 0));
        assert!(v.store().seen("team/app", &old).await.unwrap().is_none());
        assert!(v.holds("team/other", &old).await.unwrap());

        age(&seen_file(dir.path(), "team/other", &old), 31);
        // Content younger than the grace period stays even unreferenced (a record may be in flight).
        let r = v.prune().await.unwrap();
        assert_eq!((r.records_removed, r.objects_removed), (1, 0));
        assert!(content_file(dir.path(), &old).exists());
        age(&content_file(dir.path(), &old), 2);
        let r = v.prune().await.unwrap();
        assert_eq!(r.objects_removed, 1);
        assert!(!content_file(dir.path(), &old).exists());
        assert!(v.holds("team/app", &fresh).await.unwrap());
        assert_eq!((r.objects, r.bytes), (1, 10));
        assert_eq!(v.metrics.objects.get(), 1);
    }

    #[tokio::test]
    async fn over_the_size_cap_the_least_recently_seen_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let v = vault(dir.path(), Some(20));
        let a = keep(&v, "r", b"aaaaaaaaaa").await;
        let b = keep(&v, "r", b"bbbbbbbbbb").await;
        let c = keep(&v, "r", b"cccccccccc").await;
        age(&seen_file(dir.path(), "r", &a), 3);
        age(&seen_file(dir.path(), "r", &b), 1);
        let r = v.prune().await.unwrap();
        assert_eq!(r.objects_removed, 1);
        assert!(!v.holds("r", &a).await.unwrap(), "the least recently seen");
        assert!(v.holds("r", &b).await.unwrap() && v.holds("r", &c).await.unwrap());
        assert_eq!(r.bytes, 20);
    }
}
