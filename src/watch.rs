//! Watches whether the upstream is there: up, or gone away. Every cached
//! positive answer is about a registry that was running; an offline garbage
//! collection (`garbage-collect --delete-untagged`) needs the registry stopped,
//! so when the upstream goes away and comes back, nothing it said before can be
//! trusted. The watch notices it from failed requests (connects refused,
//! connections closed under regguard) and from its own probe of `/v2/` every
//! [`PROBE_EVERY`], and tells whoever registered with [`UpstreamWatch::on_return`].
//! Knows nothing about what the listeners do with that.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{header, Request};
use prometheus::{IntCounter, IntGauge, Registry};

use crate::config::Upstream;
use crate::upstream::UpstreamBody;
use crate::upstream::{user_agent, UpstreamClient};

/// How often the upstream is probed. A registry stopped for a garbage collection is
/// down for longer than this (the collection itself takes seconds), so a restart is
/// seen even when no client asks anything meanwhile.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How long one probe may take before it counts as the upstream being away.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

type Hook = Box<dyn Fn() + Send + Sync>;

fn probe_agent() -> http::HeaderValue {
    let agent = format!("{} (upstream probe)", crate::VERSION);
    http::HeaderValue::from_str(&format!("regguard/{agent}")).unwrap_or_else(|_| user_agent())
}

/// The watch.
pub struct UpstreamWatch {
    away: AtomicBool,
    up: IntGauge,
    returns: IntCounter,
    hooks: Mutex<Vec<Hook>>,
}

impl UpstreamWatch {
    pub fn new(registry: &Registry) -> Result<Arc<Self>, prometheus::Error> {
        let up = IntGauge::new(
            "regguard_upstream_up",
            "1 while the registry answers; 0 from a failed connect (or probe) until it answers again",
        )?;
        registry.register(Box::new(up.clone()))?;
        let returns = IntCounter::new(
            "regguard_upstream_returns_total",
            "Times the registry came back after being away; each drops every cached positive answer",
        )?;
        registry.register(Box::new(returns.clone()))?;
        up.set(1);
        Ok(Arc::new(UpstreamWatch {
            away: AtomicBool::new(false),
            up,
            returns,
            hooks: Mutex::new(Vec::new()),
        }))
    }

    /// Runs `f` each time the upstream comes back.
    pub fn on_return(&self, f: impl Fn() + Send + Sync + 'static) {
        if let Ok(mut hooks) = self.hooks.lock() {
            hooks.push(Box::new(f));
        }
    }

    /// The upstream could not be reached (connect refused or timed out, connection lost).
    pub fn unreachable(&self) {
        if !self.away.swap(true, Ordering::AcqRel) {
            self.up.set(0);
            tracing::warn!("the registry is unreachable");
        }
    }

    /// The upstream answered something. One atomic load while it is up.
    pub fn answered(&self) {
        if self.away.load(Ordering::Acquire) && self.away.swap(false, Ordering::AcqRel) {
            self.up.set(1);
            self.returns.inc();
            tracing::warn!("the registry answers again");
            if let Ok(hooks) = self.hooks.lock() {
                for hook in hooks.iter() {
                    hook();
                }
            }
        }
    }

    /// Probes `GET /v2/` every [`PROBE_EVERY`], forever (a supervised task).
    pub async fn probe(self: Arc<Self>, client: UpstreamClient, upstream: Upstream) {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Ok(uri) = upstream.uri_for("/v2/") else {
                return;
            };
            let Ok(req) = Request::get(uri)
                .header(header::HOST, upstream.host_header.clone())
                // Its own User-Agent, so the registry's access log tells probes from checks.
                .header(header::USER_AGENT, probe_agent())
                .body(UpstreamBody::empty())
            else {
                return;
            };
            match tokio::time::timeout(PROBE_TIMEOUT, client.request(req)).await {
                // Any status: 401 is a registry that is there.
                Ok(Ok(_)) => self.answered(),
                _ => self.unreachable(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn hooks_run_once_per_return_from_away() {
        let w = UpstreamWatch::new(&Registry::new()).unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        let m = n.clone();
        w.on_return(move || {
            m.fetch_add(1, Ordering::SeqCst);
        });
        w.answered();
        assert_eq!(n.load(Ordering::SeqCst), 0, "never away: nothing to drop");
        w.unreachable();
        w.unreachable();
        assert_eq!(w.up.get(), 0);
        w.answered();
        w.answered();
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert_eq!(w.up.get(), 1);
        assert_eq!(w.returns.get(), 1);
    }
}
