//! The connection pool to the registry.
//!
//! One hyper-util client, shared by the forwarding path and regguard's own
//! requests (readiness probe, later the checker). Its connector resolves the
//! upstream host name for every new connection, so a recreated registry
//! container is found at its new address once the old pooled connections
//! close; pooled connections are dropped after `POOL_IDLE` of disuse.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::UpstreamBody;

/// The upstream client type.
pub type UpstreamClient = Client<HttpConnector, UpstreamBody>;

/// How long an unused pooled connection is kept. Shorter than the registry's own
/// idle close (Go's http.Server default: none, but proxies in between often use 60-120s),
/// so we rarely pick a connection the other side is closing.
const POOL_IDLE: Duration = Duration::from_secs(50);

/// TCP keepalive probes on upstream connections, so a silently vanished peer
/// (container gone without a RST) is noticed during a long idle transfer.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Upper bound of hyper's adaptive read buffer for upstream responses. Large reads mean
/// fewer syscalls and fewer, larger frames handed to the client side: each frame is written
/// with one (vectored) write. 1 MiB caps the memory one stalled stream can pin.
pub const READ_BUF_MAX: usize = 1024 * 1024;

/// The `User-Agent` of requests regguard makes on its own behalf.
pub fn user_agent() -> http::HeaderValue {
    http::HeaderValue::from_static(concat!("regguard/", env!("CARGO_PKG_VERSION")))
}

/// Builds the pooled upstream client.
pub fn client(connect_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(TCP_KEEPALIVE));
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE)
        // The proxy sets Host itself: the client's, with its port (see proxy::rewrite_request).
        .set_host(false)
        .http1_max_buf_size(READ_BUF_MAX)
        .build(connector)
}
