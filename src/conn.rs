//! Client connections: how many may be open, and the deadlines that close idle
//! and stalled ones.
//!
//! [`Slots`] caps the connections open at once. [`ClientIo`] wraps a client's
//! stream (plain or TLS) and enforces two deadlines that hyper does not:
//!
//! - **idle**: no request in flight for `header_read_timeout` (the wait for a
//!   first byte, a TLS connection silent after its handshake, an HTTP/1.1
//!   keep-alive wait, an HTTP/2 connection without open streams) and the next
//!   read that would wait fails, closing the connection. "In flight" runs from
//!   the moment the service gets a request until its response body is dropped
//!   (see [`Activity::begin`] and [`Tracked`]).
//! - **write stall**: a write to the client that makes no progress for
//!   `idle_timeout` fails. The connection ends, which drops the response body,
//!   which releases the upstream connection and any bulk permit it held.
//!
//! Both cost nothing on the fast path: a read or write that completes touches no
//! timer; only one that would wait arms (or re-arms) one.
//!
//! It knows nothing of HTTP or of what a connection carries.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The cap on open client connections, and their gauge.
pub struct Slots {
    open: AtomicUsize,
    max: usize,
    gauge: IntGauge,
}

/// One open connection's claim on a slot; released (and the gauge lowered) when dropped.
pub struct Slot(Arc<Slots>);

impl Slots {
    /// At most `max` connections at once, mirrored in `gauge`.
    pub fn new(max: usize, gauge: IntGauge) -> Arc<Self> {
        Arc::new(Slots {
            open: AtomicUsize::new(0),
            max,
            gauge,
        })
    }

    /// A slot, unless `max` are taken.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        self.gauge.inc();
        Some(Slot(self.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.gauge.dec();
    }
}

/// Which requests of one connection are in flight, shared by its IO and its service.
pub struct Activity {
    /// When the connection was accepted; `idle_since_ms` counts from here.
    base: Instant,
    in_flight: AtomicUsize,
    idle_since_ms: AtomicU64,
}

impl Activity {
    /// A connection accepted at `accepted`, idle from then on.
    pub fn new(accepted: Instant) -> Arc<Self> {
        Arc::new(Activity {
            base: accepted,
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    /// A request is in flight until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// When the connection becomes too idle, or `None` while a request is in flight.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.base + since + idle)
    }
}

/// A request in flight on a connection; see [`Activity::begin`].
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Stored before the count drops, so whoever sees 0 sees the new idle start.
        a.idle_since_ms.store(ms, Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until hyper drops it.
    pub struct Tracked<B> {
        #[pin]
        inner: B,
        _in_flight: InFlight,
    }
}

impl<B> Tracked<B> {
    pub fn new(inner: B, in_flight: InFlight) -> Self {
        Tracked {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The deadlines every client connection gets, and the counters of what they cut.
pub struct Deadlines {
    /// No request in flight for this long closes the connection (`header_read_timeout`).
    pub idle: Duration,
    /// A write to the client without progress for this long cuts it (`idle_timeout`).
    pub write_stall: Duration,
    pub idle_closed: IntCounter,
    pub write_stalled: IntCounter,
}

pin_project_lite::pin_project! {
    /// A client stream with the idle and write-stall deadlines (see the module docs).
    pub struct ClientIo<I> {
        #[pin]
        inner: I,
        #[pin]
        read_timer: Sleep,
        // Where `read_timer` is set, so it is reset only when that changes.
        read_deadline: Instant,
        #[pin]
        write_timer: Sleep,
        // A write is waiting and `write_timer` runs for it.
        write_waiting: bool,
        // A deadline has passed: every further read or write fails.
        timed_out: bool,
        activity: Arc<Activity>,
        deadlines: Arc<Deadlines>,
    }
}

fn timed_out(what: &str, after: Duration) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("{what} for {after:?}"))
}

impl<I> ClientIo<I> {
    /// Wraps `inner`, a connection whose requests `activity` tracks.
    pub fn new(inner: I, activity: Arc<Activity>, deadlines: Arc<Deadlines>) -> Self {
        let read_deadline = activity.base + deadlines.idle;
        ClientIo {
            inner,
            read_timer: tokio::time::sleep_until(read_deadline),
            read_deadline,
            // Armed (reset) by the first write that has to wait.
            write_timer: tokio::time::sleep_until(read_deadline),
            write_waiting: false,
            timed_out: false,
            activity,
            deadlines,
        }
    }
}

impl<I> ClientIo<I> {
    /// A read would wait: fails once the connection has been idle too long, else
    /// leaves the read timer set to wake the task when it should look again.
    fn poll_idle(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        let idle = this.deadlines.idle;
        loop {
            let now = Instant::now();
            let deadline = match this.activity.idle_deadline(idle) {
                Some(deadline) if deadline <= now => {
                    *this.timed_out = true;
                    this.deadlines.idle_closed.inc();
                    return Poll::Ready(Err(timed_out("no request", idle)));
                }
                Some(deadline) => deadline,
                // A request is in flight (its own timeouts govern it); look again one
                // period later, in case it ended without this task being woken.
                None if *this.read_deadline > now => *this.read_deadline,
                None => now + idle,
            };
            if deadline != *this.read_deadline {
                this.read_timer.as_mut().reset(deadline);
                *this.read_deadline = deadline;
            }
            if this.read_timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// A write would wait: fails once writes have waited `write_stall` in a row.
    fn poll_stall<T>(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let mut this = self.project();
        let stall = this.deadlines.write_stall;
        if !*this.write_waiting {
            *this.write_waiting = true;
            this.write_timer.as_mut().reset(Instant::now() + stall);
        }
        match this.write_timer.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                *this.timed_out = true;
                this.deadlines.write_stalled.inc();
                Poll::Ready(Err(timed_out("client not reading", stall)))
            }
        }
    }

    /// Passes on a finished write (progress: the stall timer stops) or waits on the stall timer.
    fn after_write<T>(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Pending => self.poll_stall(cx),
            ready => {
                *self.as_mut().project().write_waiting = false;
                ready
            }
        }
    }
}

impl<I: AsyncRead> AsyncRead for ClientIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.timed_out {
            return Poll::Ready(Err(timed_out("closed", Duration::ZERO)));
        }
        match self.as_mut().project().inner.poll_read(cx, buf) {
            Poll::Pending => self.poll_idle(cx),
            ready => ready,
        }
    }
}

impl<I: AsyncWrite> AsyncWrite for ClientIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.timed_out {
            return Poll::Ready(Err(timed_out("closed", Duration::ZERO)));
        }
        let polled = self.as_mut().project().inner.poll_write(cx, buf);
        self.after_write(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.timed_out {
            return Poll::Ready(Err(timed_out("closed", Duration::ZERO)));
        }
        let polled = self.as_mut().project().inner.poll_write_vectored(cx, bufs);
        self.after_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.timed_out {
            return Poll::Ready(Err(timed_out("closed", Duration::ZERO)));
        }
        let polled = self.as_mut().project().inner.poll_flush(cx);
        self.after_write(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.timed_out {
            // Nothing more is sent to a client that was cut; dropping the stream closes it.
            return Poll::Ready(Ok(()));
        }
        let polled = self.as_mut().project().inner.poll_shutdown(cx);
        self.after_write(cx, polled)
    }
}

/// How accept errors back off: 5 ms doubling to 1 s, back to 5 ms after a success.
/// EMFILE (out of descriptors) is the usual cause; retrying at once cannot succeed
/// until a connection closes, and would only spin a core and flood the log.
pub struct AcceptBackoff {
    delay: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
    errors: IntCounter,
    listener: &'static str,
}

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per this period; the errors in between are counted in it.
const BACKOFF_LOG_EVERY: Duration = Duration::from_secs(1);

impl AcceptBackoff {
    pub fn new(listener: &'static str, errors: IntCounter) -> Self {
        AcceptBackoff {
            delay: BACKOFF_MIN,
            last_log: None,
            suppressed: 0,
            errors,
            listener,
        }
    }

    /// Accepts the next connection, backing off (and counting) on errors.
    pub async fn accept(
        &mut self,
        listener: &tokio::net::TcpListener,
    ) -> (tokio::net::TcpStream, std::net::SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(accepted) => {
                    self.delay = BACKOFF_MIN;
                    return accepted;
                }
                Err(e) => {
                    self.errors.inc();
                    let now = Instant::now();
                    if self
                        .last_log
                        .is_none_or(|t| now.duration_since(t) >= BACKOFF_LOG_EVERY)
                    {
                        tracing::error!(
                            listener = self.listener,
                            error = %e,
                            retry_in = ?self.delay,
                            errors_since_last_log = self.suppressed,
                            "accept failed"
                        );
                        self.last_log = Some(now);
                        self.suppressed = 0;
                    } else {
                        self.suppressed += 1;
                    }
                    tokio::time::sleep(self.delay).await;
                    self.delay = (self.delay * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn deadlines(idle: u64, stall: u64) -> Arc<Deadlines> {
        Arc::new(Deadlines {
            idle: Duration::from_millis(idle),
            write_stall: Duration::from_millis(stall),
            idle_closed: IntCounter::new("i", "i").unwrap(),
            write_stalled: IntCounter::new("w", "w").unwrap(),
        })
    }

    #[test]
    fn slots_cap_and_release() {
        let gauge = IntGauge::new("g", "g").unwrap();
        let slots = Slots::new(2, gauge.clone());
        let a = slots.try_acquire().unwrap();
        let _b = slots.try_acquire().unwrap();
        assert!(slots.try_acquire().is_none());
        assert_eq!(gauge.get(), 2);
        drop(a);
        assert_eq!(gauge.get(), 1);
        assert!(slots.try_acquire().is_some());
    }

    #[tokio::test]
    async fn idle_read_fails_only_while_no_request_is_in_flight() {
        let (client, server) = tokio::io::duplex(64);
        let activity = Activity::new(Instant::now());
        let d = deadlines(100, 100);
        let mut io = Box::pin(ClientIo::new(server, activity.clone(), d.clone()));
        let guard = activity.begin();
        let mut buf = [0u8; 8];
        // In flight: a silent client is not idle.
        assert!(
            tokio::time::timeout(Duration::from_millis(500), io.read(&mut buf))
                .await
                .is_err()
        );
        assert_eq!(d.idle_closed.get(), 0);
        drop(guard);
        let err = tokio::time::timeout(Duration::from_secs(10), io.read(&mut buf))
            .await
            .expect("an idle read fails")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(d.idle_closed.get(), 1);
        drop(client);
    }

    #[tokio::test]
    async fn stalled_write_fails_and_progress_resets_the_stall() {
        let (mut client, server) = tokio::io::duplex(16);
        let activity = Activity::new(Instant::now());
        let _guard = activity.begin();
        // Slow progress (every 100 ms) never trips a 400 ms stall.
        let d = deadlines(1000, 400);
        let mut io = Box::pin(ClientIo::new(server, activity, d.clone()));
        // The reader drains slowly (every 500 ms): writes keep progressing.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = client.read(&mut buf).await;
            }
            client
        });
        io.write_all(&[7u8; 16 * 8]).await.unwrap();
        let _client = reader.await.unwrap();
        // Nobody reads any more: the next writes stall and fail.
        let err = io.write_all(&[7u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(d.write_stalled.get(), 1);
        assert!(io.write(&[1]).await.is_err(), "stays failed");
        assert_eq!(d.write_stalled.get(), 1, "counted once");
    }
}
