//! Listeners, TLS handshakes, connection serving and graceful shutdown.
//!
//! The public listener speaks HTTP/1.1 and HTTP/2 (ALPN over TLS, prior
//! knowledge in plain text); the admin listener speaks HTTP/1.1. On shutdown
//! both stop accepting, idle connections close, and in-flight exchanges get up
//! to `drain_timeout` to finish.
//!
//! At most `max_connections` client connections are open at once (see
//! `conn::Slots`); each is wrapped in `conn::ClientIo`, which closes it when no
//! request has been in flight for `header_read_timeout` or a write to the
//! client has made no progress for `idle_timeout`.
//!
//! It builds the components and wires them together (see `wire`), knowing none of their
//! internals; the request path is `proxy`'s.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::admin::Admin;
use crate::config::Settings;
use crate::conn::{AcceptBackoff, Activity, ClientIo, Deadlines, Slot, Slots, Tracked};
use crate::metrics::Metrics;
use crate::proxy::{ConnInfo, Proxy};

/// hyper's per-connection buffer ceiling on client connections: the read buffer
/// for uploads, and the queue of response frames waiting for a slow client.
/// 256 KiB reads keep a blob push cheap (CPU per GiB is the same as with 1 MiB
/// on loopback), and bound what one slow client can pin.
const CLIENT_BUF_MAX: usize = 256 * 1024;

/// HTTP/2 flow-control windows. The 64 KiB protocol default caps a single
/// upload stream at one window per round trip; 4 MiB per stream keeps a blob
/// push moving without letting one stream hold more than that in memory.
const H2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const H2_CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;
const H2_MAX_STREAMS: u32 = 256;

/// Says, once per serving thread, that it no longer accepts (its copy of the listener is closed).
type StoppedAccepting = tokio::sync::mpsc::UnboundedReceiver<()>;

/// How long a serving runtime waits, once drained, for blocking work it started.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// Connections over the cap being answered at once. Each holds a descriptor for at
/// most [`REFUSAL_DEADLINE`]; beyond this many, a refused connection is closed at
/// once, so a flood over the cap cannot take the descriptors the cap protects.
const REFUSALS_AT_ONCE: usize = 64;
/// Longest a refused plain-HTTP client gets to send its request head and read the 503.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(5);
/// `Retry-After` of the refusal: connections free up as transfers end, so soon is likely fine.
const REFUSAL_RETRY_AFTER: &str = "2";

/// Why `serve` could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Heal(#[from] crate::heal::run::StartError),
    #[error("cannot start a serving thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The addresses a running server actually bound (useful with port 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub public: SocketAddr,
    pub admin: SocketAddr,
}

/// Binds both listeners and serves until `shutdown` resolves, then drains. Phases:
/// `upstream_pools`, `listen`, `wire` the components, start the serving threads (each
/// accepts until shutdown, then drains its own connections), and wait for them.
pub async fn serve(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
    on_bound: impl FnOnce(Bound) + Send,
) -> Result<(), ServeError> {
    let metrics = Arc::new(Metrics::new()?);
    let workers = serving_threads();
    let pools = upstream_pools(&settings)?.with_workers(workers, &settings.upstream);
    let Listeners { public, admin, tls } = listen(&settings, &metrics, on_bound).await?;
    let (proxy, admin_service) = wire(&settings, &metrics, &pools)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let admin_task = tokio::spawn(admin_loop(
        admin,
        admin_service,
        stop_rx.clone(),
        AcceptBackoff::new("admin", metrics.admin_accept_errors.clone()),
    ));
    let front = Arc::new(Front::new(&settings, &metrics, proxy, tls));
    let (threads, mut closed) = start_serving(workers, public, front, stop_rx).await?;
    shutdown.await;
    let _ = stop_tx.send(true);
    // The listening socket closes when the last thread's copy of it does: only then is
    // a new connection refused.
    for _ in 0..workers {
        if closed.recv().await.is_none() {
            break;
        }
    }
    tracing::info!(
        drain_timeout = ?settings.drain_timeout,
        "shutting down: no new connections; waiting for in-flight requests"
    );
    let drained = tokio::task::spawn_blocking(move || {
        // Every thread is joined, whatever the others say.
        let each: Vec<bool> = threads
            .into_iter()
            .map(|t| t.join().unwrap_or(false))
            .collect();
        each.into_iter().all(|drained| drained)
    })
    .await
    .unwrap_or(false);
    if drained {
        tracing::info!("all connections drained");
    } else {
        tracing::warn!(
            drain_timeout = ?settings.drain_timeout,
            "drain timeout reached; cutting the remaining connections"
        );
    }
    let _ = admin_task.await;
    Ok(())
}

/// Serving threads: one per core this process may use (`available_parallelism` counts a
/// cgroup's CPU quota). Each runs a single-threaded runtime that accepts from the shared
/// listener and serves its connections start to end, with its own upstream connections
/// (`upstream::Pools`), as nginx's workers do. Against the multi-threaded runtime this
/// saves the work-stealing and cross-thread wake-ups of every request (measured in
/// `benches/e2e.rs`, `BENCH_ONLY=manifest`); background work (validation, scan, vault,
/// admin) stays on the main runtime.
fn serving_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Starts `workers` serving threads on `public`. Each accepts until `stop` says so, then
/// drains its connections for up to the drain timeout; its join handle says whether they
/// all finished in time. Returns once every thread is accepting.
async fn start_serving(
    workers: usize,
    public: TcpListener,
    front: Arc<Front>,
    stop: watch::Receiver<bool>,
) -> Result<(Vec<std::thread::JoinHandle<bool>>, StoppedAccepting), ServeError> {
    let listener = public.into_std().map_err(ServeError::Thread)?;
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel();
    let (closed_tx, closed_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut threads = Vec::with_capacity(workers);
    // Threads still draining. A connection in a shared pool (the checker's, the vault's S3
    // client) is a task on the runtime that dialled it, and a gate check on another thread
    // may be using it: no serving runtime goes away before every thread has drained.
    let draining = Arc::new((
        std::sync::atomic::AtomicUsize::new(workers),
        tokio::sync::Notify::new(),
    ));
    for worker in 0..workers {
        let listener = listener.try_clone().map_err(ServeError::Thread)?;
        let (front, mut stop, ready) = (front.clone(), stop.clone(), ready_tx.clone());
        let draining = draining.clone();
        let stopped_accepting = closed_tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("regguard-serve-{worker}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return true;
                    }
                };
                let drained = runtime.block_on(async move {
                    crate::upstream::Pools::enter_worker(worker);
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return true;
                        }
                    };
                    let _ = ready.send(Ok(()));
                    let graceful = GracefulShutdown::new();
                    let stopped = async move {
                        let _ = stop.wait_for(|stopped| *stopped).await;
                    };
                    accept_until(stopped, &listener, &front, &graceful).await;
                    drop(listener);
                    let _ = stopped_accepting.send(());
                    let drained = tokio::time::timeout(front.drain_timeout, graceful.shutdown())
                        .await
                        .is_ok();
                    let (left, all_drained) = &*draining;
                    if left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
                        all_drained.notify_waiters();
                    }
                    // Bounded: every thread drains within the same timeout.
                    let _ =
                        tokio::time::timeout(front.drain_timeout + Duration::from_secs(1), async {
                            loop {
                                let woken = all_drained.notified();
                                if left.load(std::sync::atomic::Ordering::Acquire) == 0 {
                                    break;
                                }
                                woken.await;
                            }
                        })
                        .await;
                    drained
                });
                // What the drain left running is cut; blocking work (a DNS lookup, a file
                // read) gets a moment, not a wait without end.
                runtime.shutdown_timeout(SHUTDOWN_GRACE);
                drained
            })
            .map_err(ServeError::Thread)?;
        threads.push(thread);
    }
    drop(ready_tx);
    drop(closed_tx);
    for _ in 0..workers {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(ServeError::Thread(e)),
            None => {
                return Err(ServeError::Thread(std::io::Error::other(
                    "a serving thread ended before it started",
                )))
            }
        }
    }
    Ok((threads, closed_rx))
}

/// The pools every upstream request goes through. Both, and so the checker, scan and
/// probe that share them, dial an https:// upstream with the same verification.
fn upstream_pools(settings: &Settings) -> Result<crate::upstream::Pools, ServeError> {
    let verify = match &settings.upstream_ca {
        Some(path) => {
            crate::upstream::TlsVerify::Roots(Arc::new(crate::tls::upstream_roots(path)?))
        }
        None => crate::upstream::TlsVerify::System,
    };
    Ok(crate::upstream::Pools::with_tls(
        settings.connect_timeout,
        verify,
    ))
}

/// The bound listeners, and the TLS acceptor of the public one (if it speaks TLS).
struct Listeners {
    public: TcpListener,
    admin: TcpListener,
    tls: Option<TlsAcceptor>,
}

/// Loads the certificate (if any), binds both listeners, and says where it serves.
async fn listen(
    settings: &Settings,
    metrics: &Metrics,
    on_bound: impl FnOnce(Bound) + Send,
) -> Result<Listeners, ServeError> {
    let tls = settings
        .tls
        .as_ref()
        .map(|files| crate::tls::acceptor(files, settings.tls_reload_interval, metrics.registry()))
        .transpose()?;
    if tls.is_none() {
        // `systemctl reload` and habit send SIGHUP; without TLS there is nothing to reload,
        // and its default action (terminate) would drop every transfer.
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP received: no TLS certificate to reload");
                }
            });
        }
    }

    let public = bind("listen", settings.listen).await?;
    let admin = bind("admin_listen", settings.admin_listen).await?;
    let bound = Bound {
        public: public.local_addr().unwrap_or(settings.listen),
        admin: admin.local_addr().unwrap_or(settings.admin_listen),
    };
    tracing::info!(
        listen = %bound.public,
        admin = %bound.admin,
        upstream = %settings.upstream.authority,
        tls = tls.is_some(),
        version = crate::VERSION,
        "regguard serving"
    );
    on_bound(bound);
    Ok(Listeners { public, admin, tls })
}

/// Builds the components and connects them: the checker, the integrity state, the
/// validator and its re-checks, the upstream watch, the scan, the gate, the proxy, and
/// the admin service. Background tasks start here, under the supervisor.
fn wire(
    settings: &Settings,
    metrics: &Arc<Metrics>,
    pools: &crate::upstream::Pools,
) -> Result<(Arc<Proxy>, Arc<Admin>), ServeError> {
    let checker = Arc::new(crate::checker::Checker::new(
        pools.lean().clone(),
        settings.upstream.clone(),
        crate::checker::CheckerSettings::from_validate(&settings.validate),
        metrics.registry(),
    )?);
    let integrity = Arc::new(crate::integrity::Integrity::new(
        metrics.registry(),
        &settings.metrics.instance,
        settings.metrics.max_broken_series,
    )?);
    let supervisor = crate::supervise::Supervisor::new(metrics.registry())?;
    // The validator's inspector also serves the scan, so both reach the same verdicts.
    let validator = crate::validate::Validator::start(
        settings.validate.clone(),
        checker.clone(),
        integrity.clone(),
        metrics.registry(),
        &supervisor,
        settings.scan.auth.clone(),
    )?;
    // The registry going away and coming back (an offline garbage collection) voids
    // every cached positive answer.
    let upstream_watch = crate::watch::UpstreamWatch::new(metrics.registry())?;
    checker.watch(upstream_watch.clone());
    {
        let v = validator.clone();
        upstream_watch.on_return(move || v.upstream_returned());
        let (w, client, up) = (
            upstream_watch.clone(),
            pools.lean().clone(),
            settings.upstream.clone(),
        );
        supervisor.spawn("upstream_probe", move || {
            w.clone().probe(client.clone(), up.clone())
        });
    }
    let admin_validator = validator.clone();
    if settings.scan.enabled {
        let scanner = Arc::new(crate::scan::Scanner::new(
            pools.lean().clone(),
            settings.upstream.clone(),
            validator.inspector(),
            settings.scan.clone(),
            metrics.registry(),
            &settings.metrics.instance,
        )?);
        supervisor.spawn("scan", move || scanner.clone().run_forever());
    }
    let validation = settings.validate.enabled.then(|| crate::proxy::Validation {
        validator,
        blobs: settings.validate.blobs,
    });

    let gate = Arc::new(crate::gate::Gate::new(
        checker.clone(),
        settings.gate.clone(),
        metrics.registry(),
    )?);

    let heal = crate::heal::run::start(
        settings,
        pools,
        &checker,
        &integrity,
        &supervisor,
        metrics.registry(),
    )?;
    let proxy = Proxy::new(
        settings.upstream.clone(),
        pools.clone(),
        metrics.clone(),
        crate::proxy::Timing {
            idle_timeout: settings.idle_timeout,
            connect_timeout: settings.connect_timeout,
            access_log: settings.access_log,
        },
        validation,
        Some(gate),
    )
    .with_watch(upstream_watch)
    .with_trusted_proxies(&settings.trusted_proxies);
    let proxy = match &heal {
        Some(h) => proxy.with_vault(h.vault.clone(), h.serving.clone()),
        None => proxy,
    };
    let proxy = Arc::new(proxy);
    let admin = Arc::new(Admin {
        metrics: metrics.clone(),
        client: pools.lean().clone(),
        upstream: settings.upstream.clone(),
        integrity,
        supervisor,
        validator: admin_validator,
        vault: heal.as_ref().map(|h| h.vault.clone()),
    });
    Ok((proxy, admin))
}

/// What every serving thread shares: the proxy, the TLS acceptor, and the limits and
/// deadlines of client connections.
struct Front {
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    tls: Option<TlsAcceptor>,
    builder: auto::Builder<TokioExecutor>,
    slots: Arc<Slots>,
    refusals: Arc<Semaphore>,
    deadlines: Arc<Deadlines>,
    header_read_timeout: Duration,
    max_connections: usize,
    trusted_proxies: Vec<std::net::IpAddr>,
    drain_timeout: Duration,
}

impl Front {
    fn new(
        settings: &Settings,
        metrics: &Arc<Metrics>,
        proxy: Arc<Proxy>,
        tls: Option<TlsAcceptor>,
    ) -> Self {
        Front {
            proxy,
            metrics: metrics.clone(),
            tls,
            builder: connection_builder(),
            slots: Slots::new(settings.max_connections, metrics.connections_open.clone()),
            refusals: Arc::new(Semaphore::new(REFUSALS_AT_ONCE)),
            deadlines: Arc::new(Deadlines {
                idle: settings.header_read_timeout,
                write_stall: settings.idle_timeout,
                idle_closed: metrics.connections_idle_closed.clone(),
                write_stalled: metrics.connections_write_stalled.clone(),
            }),
            header_read_timeout: settings.header_read_timeout,
            max_connections: settings.max_connections,
            trusted_proxies: settings.trusted_proxies.clone(),
            drain_timeout: settings.drain_timeout,
        }
    }
}

/// Accepts client connections until `shutdown` resolves: each within the connection cap
/// gets its own task (TLS handshake, then HTTP/1.1 or HTTP/2); one over the cap is
/// refused (with a 503 in plain HTTP, at most [`REFUSALS_AT_ONCE`] at a time).
async fn accept_until(
    shutdown: impl Future<Output = ()>,
    public: &TcpListener,
    front: &Front,
    graceful: &GracefulShutdown,
) {
    let metrics = &front.metrics;
    let mut backoff = AcceptBackoff::new("public", metrics.accept_errors.clone());
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = backoff.accept(public) => accepted,
        };
        let accepted_at = Instant::now();
        metrics.connections_total.inc();
        let Some(slot) = front.slots.try_acquire() else {
            metrics.connections_refused.inc();
            tracing::debug!(client = %remote, max = front.max_connections, "connection refused: too many open");
            // Over TLS there is no cheap way to say why: close at once.
            if front.tls.is_none() {
                if let Ok(permit) = front.refusals.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        refuse(stream).await;
                        drop(permit);
                    });
                }
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = ConnInfo {
            remote,
            tls: front.tls.is_some(),
            trusted: front.trusted_proxies.contains(&remote.ip()),
        };
        let task = ConnTask {
            proxy: front.proxy.clone(),
            metrics: metrics.clone(),
            builder: front.builder.clone(),
            watcher: graceful.watcher(),
            header_read_timeout: front.header_read_timeout,
            deadlines: front.deadlines.clone(),
            slot,
            accepted_at,
        };
        match &front.tls {
            Some(acceptor) => {
                tokio::spawn(task.serve_tls(acceptor.clone(), stream, conn));
            }
            None => {
                tokio::spawn(task.serve_io(stream, conn));
            }
        }
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { key, addr, source })
}

fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // `header_read_timeout` is enforced by `conn::ClientIo` (no request in flight for
        // that long closes the connection, a request head trickling in included). hyper's
        // own took a timer allocated, registered and dropped per request.
        .header_read_timeout(None)
        // A client that closes its end cancels its in-flight request: a push's gate walk
        // stops with it (tests/hostile.rs, a_push_abandoned_by_its_client_stops_its_checks).
        .half_close(false)
        .keep_alive(true)
        .max_buf_size(CLIENT_BUF_MAX);
    builder
        .http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20));
    builder
}

/// Everything one client connection's task needs.
struct ConnTask {
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    builder: auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    header_read_timeout: Duration,
    deadlines: Arc<Deadlines>,
    /// Held for the connection's life: its place under `max_connections`.
    slot: Slot,
    accepted_at: Instant,
}

impl ConnTask {
    async fn serve_tls(self, acceptor: TlsAcceptor, stream: TcpStream, conn: ConnInfo) {
        // The handshake counts against the header-read budget: a slow-loris TLS client is one too.
        match tokio::time::timeout(self.header_read_timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => self.serve_io(tls, conn).await,
            Ok(Err(e)) => {
                self.metrics.tls_handshake_failures.inc();
                tracing::debug!(client = %conn.remote, error = %e, "TLS handshake failed");
            }
            Err(_) => {
                self.metrics.tls_handshake_failures.inc();
                tracing::debug!(client = %conn.remote, "TLS handshake timed out");
            }
        }
    }

    async fn serve_io<I>(self, io: I, conn: ConnInfo)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Activity::new(self.accepted_at);
        let io = Box::pin(ClientIo::new(io, activity.clone(), self.deadlines.clone()));
        let proxy = self.proxy.clone();
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            // In flight from here until hyper drops the response body.
            let in_flight = activity.begin();
            async move {
                let resp = proxy.handle(req, conn).await;
                Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, in_flight)))
            }
        });
        let connection = self
            .builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        if let Err(e) = self.watcher.watch(connection).await {
            tracing::debug!(client = %conn.remote, error = %e, "client connection ended with an error");
        }
        drop(self.slot);
    }
}

/// Answers one HTTP/1.1 request on a connection over the cap with 503, then closes.
/// The request head is read first, so the client sees the answer rather than a reset.
async fn refuse(stream: TcpStream) {
    let service = service_fn(|_req| async {
        let mut resp = crate::error::oci_error(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "too many connections to this registry proxy; retry later",
        );
        resp.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static(REFUSAL_RETRY_AFTER),
        );
        Ok::<_, Infallible>(resp)
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSAL_DEADLINE)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(REFUSAL_DEADLINE, connection).await;
}

async fn admin_loop(
    listener: TcpListener,
    admin: Arc<Admin>,
    mut stop: watch::Receiver<bool>,
    mut backoff: AcceptBackoff,
) {
    let builder = hyper::server::conn::http1::Builder::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.changed() => return,
            accepted = backoff.accept(&listener) => accepted,
        };
        let admin = admin.clone();
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let admin = admin.clone();
                async move { admin.handle(req).await }
            }),
        );
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
