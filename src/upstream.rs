//! The connection pools to the registry.
//!
//! Two hyper-util clients with different read-buffer ceilings share one
//! connector. Their connector resolves the upstream host name for every new
//! connection, so a recreated registry container is found at its new address
//! once the old pooled connections close; pooled connections are dropped after
//! `POOL_IDLE` of disuse.
//!
//! Why two: relaying a blob costs CPU mostly in the kernel, per read and write
//! syscall, so large reads roughly halve the CPU per GiB (measured on loopback:
//! about 0.27 CPU-s/GiB with reads of up to 1 MiB, 0.45 with 64-128 KiB). But a
//! large buffer per stream multiplies by the number of streams. So large reads
//! are a budget: up to [`BULK_STREAMS`] blob downloads at a time use the bulk
//! pool; beyond that, and for everything else (manifests, uploads, tags), the
//! lean pool. Memory stays bounded with hundreds of concurrent pulls, and the
//! common case (a few large pulls) gets the cheap path.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::UpstreamBody;

/// The upstream client type.
pub type UpstreamClient = Client<HttpConnector, UpstreamBody>;

/// How long an unused pooled connection is kept. Proxies and load balancers
/// between regguard and the registry commonly close idle connections after
/// 60 s; staying under that means we rarely pick a connection being closed.
const POOL_IDLE: Duration = Duration::from_secs(50);

/// TCP keepalive probes on upstream connections, so a silently vanished peer
/// (container gone without a RST) is noticed during a long idle transfer.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Read-buffer ceiling of the bulk pool: reads of up to 1 MiB. Beyond this the
/// gain flattens (2 MiB: 0.25 CPU-s/GiB; 4 MiB: 0.28) while memory per stream grows.
pub const BULK_READ_BUF: usize = 1024 * 1024;

/// Read-buffer ceiling of the lean pool. hyper grows its read buffer from 8 KiB
/// up to this as reads fill it; 64 KiB keeps a stream's footprint near 80 KiB.
pub const LEAN_READ_BUF: usize = 64 * 1024;

/// Blob downloads that may use the bulk pool at once (about 1.5 MiB each at full speed).
pub const BULK_STREAMS: usize = 8;

/// The `User-Agent` of requests regguard makes on its own behalf.
pub fn user_agent() -> http::HeaderValue {
    http::HeaderValue::from_static(concat!("regguard/", env!("CARGO_PKG_VERSION")))
}

/// The two pools and the bulk budget.
#[derive(Clone)]
pub struct Pools {
    lean: UpstreamClient,
    bulk: UpstreamClient,
    bulk_in_use: Arc<AtomicUsize>,
}

/// A claim on one bulk stream; released when dropped (when the response body ends).
pub struct BulkPermit(Arc<AtomicUsize>);

impl Drop for BulkPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pools {
    /// Builds both pools.
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_keepalive(Some(TCP_KEEPALIVE));
        connector.enforce_http(true);
        Pools {
            lean: build(connector.clone(), LEAN_READ_BUF),
            bulk: build(connector, BULK_READ_BUF),
            bulk_in_use: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The client for small exchanges and for regguard's own requests.
    pub fn lean(&self) -> &UpstreamClient {
        &self.lean
    }

    /// The bulk client with a permit, if the budget allows; else `None`.
    pub fn try_bulk(&self) -> Option<(&UpstreamClient, BulkPermit)> {
        let prev = self.bulk_in_use.fetch_add(1, Ordering::Relaxed);
        let permit = BulkPermit(self.bulk_in_use.clone());
        (prev < BULK_STREAMS).then_some((&self.bulk, permit))
    }
}

fn build(connector: HttpConnector, read_buf_max: usize) -> UpstreamClient {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE)
        // The proxy sets Host itself: the client's, with its port (see proxy::rewrite_request_headers).
        .set_host(false)
        .http1_max_buf_size(read_buf_max)
        .build(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bulk_budget_is_bounded_and_released_on_drop() {
        let pools = Pools::new(Duration::from_secs(1));
        let permits: Vec<_> = (0..BULK_STREAMS)
            .map(|_| pools.try_bulk().unwrap().1)
            .collect();
        assert!(pools.try_bulk().is_none(), "budget exhausted");
        drop(permits);
        assert!(pools.try_bulk().is_some(), "budget released");
    }
}
