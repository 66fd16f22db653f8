//! The memory budget for manifest bytes regguard holds: pushed manifests while
//! the gate reads and checks them, and copies of served manifests on their way
//! to validation. Each may be up to 4 MiB; without a global bound, a few
//! hundred clients pushing maximal manifests at once could take gigabytes.
//!
//! A holder takes a share of the budget before it reads and gives it back on
//! drop. Pushes wait briefly for room, then are answered 503 with
//! `Retry-After`; response taps never wait (validation then fetches the
//! manifest itself). Knows nothing of who holds it.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounter, IntGauge, Registry};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget is kept in KiB so that 4 GiB still fits a semaphore's permit count.
const UNIT: usize = 1024;

/// The shared budget.
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total_units: u32,
    held: IntGauge,
    refused: IntCounter,
}

/// A share of the budget, given back when dropped.
#[derive(Debug)]
pub struct Held {
    _permit: OwnedSemaphorePermit,
    units: u32,
    gauge: IntGauge,
}

impl Held {
    /// The bytes this share allows.
    pub fn bytes(&self) -> usize {
        self.units as usize * UNIT
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge.sub(i64::from(self.units) * UNIT as i64);
    }
}

impl MemoryBudget {
    pub fn new(bytes: usize, registry: &Registry) -> Result<Self, prometheus::Error> {
        let total_units = u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX);
        let held = IntGauge::new(
            "regguard_manifest_bytes_held",
            "Manifest bytes held in memory now (pushes being gated, served manifests being tapped)",
        )?;
        registry.register(Box::new(held.clone()))?;
        let refused = IntCounter::new(
            "regguard_manifest_budget_refusals_total",
            "Manifest pushes answered 503 (and taps that went without a copy) because the manifest memory budget was full",
        )?;
        registry.register(Box::new(refused.clone()))?;
        Ok(MemoryBudget {
            permits: Arc::new(Semaphore::new(total_units as usize)),
            total_units,
            held,
            refused,
        })
    }

    fn units(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_units.max(1))
    }

    fn held(&self, permit: OwnedSemaphorePermit, units: u32) -> Held {
        self.held.add(i64::from(units) * UNIT as i64);
        Held {
            _permit: permit,
            units,
            gauge: self.held.clone(),
        }
    }

    /// Room for `bytes` now, or `None` (counted).
    pub fn try_hold(&self, bytes: usize) -> Option<Held> {
        let units = self.units(bytes);
        match self.permits.clone().try_acquire_many_owned(units) {
            Ok(p) => Some(self.held(p, units)),
            Err(_) => {
                self.refused.inc();
                None
            }
        }
    }

    /// Room for `bytes`, waiting up to `wait` for others to finish; `None` (counted) after that.
    pub async fn hold(&self, bytes: usize, wait: Duration) -> Option<Held> {
        let units = self.units(bytes);
        match tokio::time::timeout(wait, self.permits.clone().acquire_many_owned(units)).await {
            Ok(Ok(p)) => Some(self.held(p, units)),
            _ => {
                self.refused.inc();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holders_share_one_budget_and_give_it_back_on_drop() {
        let b = MemoryBudget::new(8 * 1024 * 1024, &Registry::new()).unwrap();
        let first = b.try_hold(4 * 1024 * 1024).unwrap();
        let second = b.hold(4 * 1024 * 1024, Duration::from_millis(10)).await;
        assert!(second.is_some());
        assert!(b.try_hold(1).is_none(), "the budget is full");
        assert!(b.hold(1, Duration::from_millis(20)).await.is_none());
        assert_eq!(b.refused.get(), 2);
        assert_eq!(b.held.get(), 8 * 1024 * 1024);
        drop(first);
        assert!(b.try_hold(4 * 1024 * 1024).is_some());
        drop(second);
        assert!(b.held.get() <= 4 * 1024 * 1024);
    }
}
