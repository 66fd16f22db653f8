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
