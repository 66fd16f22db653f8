//! Heal inside `serve`: open the vault, hand it what the checker fetches, prune it hourly,
//! and (with `[heal] repair`) repair what the integrity state says is broken.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::Registry;

use super::{HealMetrics, Outcome, Repairer, Serving};
use crate::checker::Checker;
use crate::config::Settings;
use crate::integrity::Integrity;
use crate::oci::RefKind;
use crate::supervise::Supervisor;
use crate::upstream::Pools;
use crate::vault::{Source, Vault, VaultOpenError};

/// How often the repairer looks at the integrity state.
const REPAIR_EVERY: Duration = Duration::from_secs(2);
/// A reference the vault cannot repair is planned again after this long (the vault may have
/// gained what it lacked); one whose repair failed (the registry refused, or went away),
/// sooner.
const UNREPAIRABLE_RETRY: Duration = Duration::from_secs(300);
const FAILED_RETRY: Duration = Duration::from_secs(30);
/// A reference found intact (the registry has it again, or a 404 was not a loss) is not
/// planned again for this long: planning reads every blob of the image.
const INTACT_RETRY: Duration = Duration::from_secs(300);
/// From a client served a loss to the repairer reading the integrity state.
const SETTLE: Duration = Duration::from_millis(200);
/// How often the vault is pruned (and its gauges recounted).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Losses served from the vault waiting for the repairer.
const SERVED_QUEUE: usize = 1024;

/// What `serve` wires into the proxy and admin.
pub struct Running {
    pub vault: Arc<Vault>,
    pub serving: Option<Arc<Serving>>,
}

/// Why heal could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Vault(#[from] VaultOpenError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Opens the vault (if one is configured) and starts its background tasks. A default vault
/// location that cannot be used is a warning and no vault; a configured one is an error.
pub fn start(
    settings: &Settings,
    pools: &Pools,
    checker: &Arc<Checker>,
    integrity: &Arc<Integrity>,
    supervisor: &Arc<Supervisor>,
    registry: &Registry,
) -> Result<Option<Running>, StartError> {
    if settings.vault.location.is_none() {
        if settings.heal.repair {
            tracing::warn!(
                "[heal] repair is on but there is no vault ([vault] url): nothing to repair from"
            );
        }
        return Ok(None);
    }
    let source = Source {
        client: pools.lean().clone(),
        upstream: settings.upstream.clone(),
        fallback: settings.heal.auth.clone(),
        timeout: settings.validate.check_timeout,
    };
    let vault = match Vault::open(settings.vault.clone(), Some(source), registry) {
        Ok(v) => v,
        Err(VaultOpenError::Store(e)) if settings.vault.default_location => {
            tracing::warn!(error = %e, "no vault: its default location cannot be used (set [vault] url)");
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    tracing::info!(
        location = %vault.store().location(),
        layers = settings.vault.layers,
        serve = settings.heal.serve,
        repair = settings.heal.repair,
        "vault open"
    );
    {
        let vault = vault.clone();
        checker.on_fetched(Arc::new(move |repo, digest, media_type, body, auth| {
            vault.keep_manifest(repo, digest, media_type, body.clone(), auth);
        }));
    }
    {
        let vault = vault.clone();
        supervisor.spawn("vault_prune", move || {
            let vault = vault.clone();
            async move {
                loop {
                    let swept = vault.store().sweep_staging(Duration::from_secs(3600));
                    if swept > 0 {
                        tracing::info!(swept, "vault: removed staging files a crash left behind");
                    }
                    match vault.prune().await {
                        Ok(r) => tracing::debug!(?r, "vault pruned"),
                        Err(e) => {
                            vault.metrics.errors.inc();
                            tracing::warn!(error = %e, "vault prune failed");
                        }
                    }
                    tokio::time::sleep(PRUNE_EVERY).await;
                }
            }
        });
    }
    let metrics = Arc::new(HealMetrics::new(registry)?);
    let (served_tx, served_rx) = tokio::sync::mpsc::channel(SERVED_QUEUE);
    let served_rx = Arc::new(tokio::sync::Mutex::new(served_rx));
    if settings.heal.repair {
        let repairer = Arc::new(Repairer::new(
            vault.clone(),
            pools.lean().clone(),
            settings.upstream.clone(),
            settings.heal.auth.clone(),
            settings.validate.check_timeout,
        ));
        let (integrity, checker, metrics) = (integrity.clone(), checker.clone(), metrics.clone());
        supervisor.spawn("heal_repair", move || {
            repair_loop(
                repairer.clone(),
                integrity.clone(),
                checker.clone(),
                metrics.clone(),
                served_rx.clone(),
            )
        });
    }
    let serving = settings.heal.serve.then(|| {
        let serving = Serving::new(vault.clone(), metrics.clone(), Some(integrity.clone()));
        Arc::new(if settings.heal.repair {
            serving.with_repairs(served_tx)
        } else {
            serving
        })
    });
    Ok(Some(Running { vault, serving }))
}

/// Repairs each (repository, lost digest) the integrity state holds, one at a time.
async fn repair_loop(
    repairer: Arc<Repairer>,
    integrity: Arc<Integrity>,
    checker: Arc<Checker>,
    metrics: Arc<HealMetrics>,
    served: Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<(String, String, RefKind)>>>,
) {
    let mut attempted: HashMap<(String, String), (Instant, Duration)> = HashMap::new();
    let mut served = served.lock().await;
    loop {
        // Every few seconds, or at once when a client was served a loss. Only what the
        // integrity state holds is repaired: a reference some live index (or image) makes.
        // A digest served from the vault that nothing references any more (an untagged
        // image a garbage collection took on purpose) is served, not pushed back.
        tokio::select! {
            () = tokio::time::sleep(REPAIR_EVERY) => {}
            Some(_) = served.recv() => {
                // Give the evidence of that 404 a moment to reach the integrity state.
                tokio::time::sleep(SETTLE).await;
            }
        }
        while served.try_recv().is_ok() {}
        let entries = integrity.snapshot();
        attempted.retain(|_, (at, wait)| at.elapsed() < *wait);
        let mut lost: Vec<(String, String, RefKind)> = entries
            .iter()
            .map(|b| (b.repository.clone(), b.child_digest.clone(), b.kind))
            .collect();
        lost.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        lost.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        for (repository, digest, kind) in lost {
            let key = (repository.clone(), digest.clone());
            if attempted.contains_key(&key) {
                continue;
            }
            let outcome = repairer
                .repair(&repository, &digest, kind, false, |step| {
                    tracing::info!(%repository, target = %digest, %step, "repair");
                })
                .await;
            if let Some(result) = outcome.result() {
                metrics.repaired(result);
            }
            match outcome {
                Outcome::Intact => {
                    tracing::debug!(%repository, %digest, "nothing to repair: the registry serves it intact");
                    attempted.insert(key, (Instant::now(), INTACT_RETRY));
                }
                Outcome::Repaired(_) => {
                    tracing::info!(%repository, %digest, "repaired from the vault and read back intact");
                    checker.forget(&repository, &digest).await;
                    integrity.note_repair(&repository, &digest, None);
                    for b in entries
                        .iter()
                        .filter(|b| b.repository == repository && b.child_digest == digest)
                    {
                        integrity.report_ok(&b.repository, &b.index_digest, &b.child_digest);
                    }
                }
                Outcome::Unrepairable(plan) => {
                    let word = plan.unrepairable();
                    tracing::warn!(%repository, %digest, what = word.as_deref().unwrap_or(""),
                        "cannot repair from the vault: re-push the image that contains it");
                    integrity.note_repair(&repository, &digest, word);
                    attempted.insert(key, (Instant::now(), UNREPAIRABLE_RETRY));
                }
                Outcome::Failed(e) => {
                    tracing::warn!(%repository, %digest, error = %e, "repair failed; will retry");
                    integrity.note_repair(
                        &repository,
                        &digest,
                        Some(format!("repair failed: {e}")),
                    );
                    attempted.insert(key, (Instant::now(), FAILED_RETRY));
                }
                Outcome::Busy => {}
            }
        }
    }
}
