//! Heal: what regguard does with the vault when the registry has lost something. Two parts:
//! serving (a client's 404 answered with the vault's bytes; the proxy asks, see
//! `proxy::vault`) and repair (the registry given back what it lost, verified by GET;
//! [`repair::Repairer`], run in the background by `serve` and whole-registry by
//! `regguard heal`).
//!
//! It knows the vault, the integrity state and the registry's API; not the request path.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};

use crate::integrity::Integrity;
use crate::oci::RefKind;
use crate::vault::Vault;

mod plan;
pub mod repair;
pub mod run;
pub use repair::{Outcome, Plan, RepairError, Repairer, Step};

/// Heal's metrics.
pub struct HealMetrics {
    served: IntCounterVec,
    repairs: IntCounterVec,
}

impl HealMetrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let served = IntCounterVec::new(
            Opts::new(
                "regguard_heal_served_total",
                "Client requests the registry answered 404 that regguard answered from the vault, by kind (manifest, blob)",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(served.clone()))?;
        let repairs = IntCounterVec::new(
            Opts::new(
                "regguard_heal_repairs_total",
                "Repairs of lost registry content, by result (repaired, unrepairable, failed)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(repairs.clone()))?;
        for kind in [RefKind::Manifest, RefKind::Blob] {
            served.with_label_values(&[kind.as_str()]);
        }
        for r in [
            repair::Result_::Repaired,
            repair::Result_::Unrepairable,
            repair::Result_::Failed,
        ] {
            repairs.with_label_values(&[r.as_str()]);
        }
        Ok(HealMetrics { served, repairs })
    }

    pub fn repaired(&self, result: repair::Result_) {
        self.repairs.with_label_values(&[result.as_str()]).inc();
    }
}

/// Serving from the vault, as the proxy sees it.
pub struct Serving {
    pub vault: Arc<Vault>,
    pub metrics: Arc<HealMetrics>,
    integrity: Option<Arc<Integrity>>,
    /// Where served losses go to be repaired (with `[heal] repair`).
    repairs: Option<tokio::sync::mpsc::Sender<(String, String, RefKind)>>,
    /// (repository, digest) logged in the last hour: one WARN per digest, not per pull.
    logged: moka::sync::Cache<(String, String), ()>,
}

impl Serving {
    pub fn new(
        vault: Arc<Vault>,
        metrics: Arc<HealMetrics>,
        integrity: Option<Arc<Integrity>>,
    ) -> Self {
        Serving {
            vault,
            metrics,
            integrity,
            repairs: None,
            logged: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
        }
    }

    /// Sends each loss served from now on to `repairs` (a full queue drops it: the
    /// integrity state still holds it, and the repairer reads that too).
    pub fn with_repairs(
        mut self,
        repairs: tokio::sync::mpsc::Sender<(String, String, RefKind)>,
    ) -> Self {
        self.repairs = Some(repairs);
        self
    }

    /// Counts, logs (once per digest an hour) and notes a response served from the vault.
    pub fn served(&self, repository: &str, digest: &str, kind: RefKind) {
        self.metrics
            .served
            .with_label_values(&[kind.as_str()])
            .inc();
        if let Some(i) = &self.integrity {
            i.mark_served(repository, digest);
        }
        let key = (repository.to_owned(), digest.to_owned());
        if let Some(tx) = &self.repairs {
            let _ = tx.try_send((repository.to_owned(), digest.to_owned(), kind));
        }
        if !self.logged.contains_key(&key) {
            self.logged.insert(key, ());
            tracing::warn!(
                %repository,
                %digest,
                kind = kind.as_str(),
                "the registry lost this: served from regguard's vault (the registry is still damaged)"
            );
        }
    }
}
