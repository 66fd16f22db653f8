//! Bodies on the forwarding path.
//!
//! Bodies are never buffered: [`Metered`] hands each frame on as it arrives,
//! counting bytes and enforcing the idle timeout (the longest silence between
//! two frames, nginx's `proxy_read_timeout`/`proxy_send_timeout`); there is no
//! total deadline. Frames are `Bytes` split off hyper's read buffer, so passing
//! one on is a reference-count bump, not a copy.
//!
//! It knows nothing of exchanges or validation: a body's end reaches whoever keeps the
//! record through the [`ExchangeRecord`] hook, and a tapped manifest reaches validation
//! through a [`Deliver`] callback.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

mod tee;
pub use tee::{Tee, TeeReceiver};

/// The error type bodies carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pin_project_lite::pin_project! {
    /// A response body from the registry: hyper's, or the lean client's (`h1`).
    #[project = InboundProj]
    pub enum Inbound {
        Pooled { #[pin] body: Incoming },
        Direct { #[pin] body: crate::h1::Body },
    }
}

impl Body for Inbound {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            InboundProj::Pooled { body } => body.poll_frame(cx).map_err(Into::into),
            InboundProj::Direct { body } => body.poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Inbound::Pooled { body } => body.is_end_stream(),
            Inbound::Direct { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Inbound::Pooled { body } => body.size_hint(),
            Inbound::Direct { body } => body.size_hint(),
        }
    }
}

/// Which way a metered body flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → upstream (request body).
    Request,
    /// Upstream → client (response body).
    Response,
}

/// Counters one exchange's two bodies share with its log record.
#[derive(Debug, Default)]
pub struct Tally {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// The client's request body failed or stalled (client gone mid-upload).
    pub request_failed: AtomicBool,
    /// The upstream's response body failed or stalled.
    pub response_failed: AtomicBool,
    /// The response body reached its end.
    pub response_complete: AtomicBool,
    /// Signalled once the request body has been read to its end (and so handed to
    /// the upstream): the wait for the response head starts then, as nginx's
    /// `proxy_read_timeout` does, so a long upload is never cut while data flows.
    pub request_done: tokio::sync::Notify,
}

/// A body stalled longer than the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("no data for {0:?} (idle timeout)")]
pub struct IdleTimeout(pub Duration);

pin_project_lite::pin_project! {
    /// A streaming body that counts bytes and fails after `idle` without a frame.
    pub struct Metered<B> {
        #[pin]
        inner: B,
        // Boxed so the body is Unpin, as hyper's client requires of request bodies. Made on
        // the first poll that has to wait: a body that never waits (an empty GET's, most
        // manifests') allocates and registers no timer.
        timer: Option<Pin<Box<Sleep>>>,
        idle: Duration,
        last_frame: Instant,
        tally: Arc<Tally>,
        direction: Direction,
    }
}

impl<B> Metered<B> {
    pub fn new(inner: B, idle: Duration, tally: Arc<Tally>, direction: Direction) -> Self {
        let now = Instant::now();
        Metered {
            inner,
            timer: None,
            idle,
            last_frame: now,
            tally,
            direction,
        }
    }
}

impl<B> Body for Metered<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let failed_flag = match this.direction {
            Direction::Request => &this.tally.request_failed,
            Direction::Response => &this.tally.response_failed,
        };
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let counter = match this.direction {
                        Direction::Request => &this.tally.bytes_in,
                        Direction::Response => &this.tally.bytes_out,
                    };
                    counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                // A body with a known length ends with its last data frame; hyper
                // never polls it again for the `None`.
                if this.inner.is_end_stream() {
                    match this.direction {
                        Direction::Response => {
                            this.tally.response_complete.store(true, Ordering::Relaxed)
                        }
                        Direction::Request => this.tally.request_done.notify_one(),
                    }
                }
                // One clock read per frame; the timer itself is only re-armed when it fires.
                *this.last_frame = Instant::now();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                failed_flag.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                match this.direction {
                    Direction::Response => {
                        this.tally.response_complete.store(true, Ordering::Relaxed)
                    }
                    Direction::Request => this.tally.request_done.notify_one(),
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                let (last_frame, idle) = (*this.last_frame, *this.idle);
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(last_frame + idle)));
                loop {
                    ready!(timer.as_mut().poll(cx));
                    let deadline = last_frame + idle;
                    if Instant::now() >= deadline {
                        failed_flag.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(IdleTimeout(idle)))));
                    }
                    timer.as_mut().reset(deadline);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pub(crate) fn poll_full(data: &mut Option<Bytes>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    Poll::Ready(
        data.take()
            .filter(|d| !d.is_empty())
            .map(|d| Ok(Frame::data(d))),
    )
}

pub(crate) fn full_hint(data: &Option<Bytes>) -> SizeHint {
    SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
}

pin_project_lite::pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind {
        Upstream { #[pin] body: Metered<Inbound> },
        Full { data: Option<Bytes> },
        Relayed { relay: Relay },
        Stream { #[pin] body: http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError> },
    }
}

/// An upstream body read by a task of its own and handed over one frame at a time.
/// HTTP/2 multiplexes streams on one socket: a client that withholds one stream's flow
/// control leaves the socket writable, so no socket deadline sees the stall, and hyper
/// simply stops polling the body. The relay task does see it (its hand-over waits), and
/// after `idle` it drops the upstream body (closing that connection) and whatever it
/// keeps alive (the bulk-read permit).
pub struct Relay {
    rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
    hint: SizeHint,
    done: bool,
    /// Set by the task when the upstream body ended: an end without it is a cut.
    finished: Arc<AtomicBool>,
    idle: Duration,
}

/// Frames read ahead of the client by a relay: one, as hyper itself would buffer.
const RELAY_FRAMES: usize = 1;

impl Relay {
    /// Starts the relay task over `body`. `keep` lives as long as the task; `on_stall`
    /// runs if the client stops taking frames for `idle`.
    pub fn start(
        body: Metered<Inbound>,
        idle: Duration,
        keep: Option<Box<dyn std::any::Any + Send>>,
        mut tee: Option<Tee>,
        on_stall: impl FnOnce() + Send + 'static,
    ) -> Self {
        use http_body_util::BodyExt as _;
        let hint = body.size_hint();
        let (tx, rx) = tokio::sync::mpsc::channel(RELAY_FRAMES);
        let finished = Arc::new(AtomicBool::new(false));
        let done = finished.clone();
        tokio::spawn(async move {
            let _keep = keep;
            let mut body = body;
            while let Some(frame) = body.frame().await {
                if let Some(tee) = tee.as_mut() {
                    match &frame {
                        Ok(f) => {
                            if let Some(d) = f.data_ref() {
                                tee.push(d);
                            }
                        }
                        Err(_) => tee.finish(false),
                    }
                }
                match tokio::time::timeout(idle, tx.send(frame)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return, // the client's stream is gone
                    Err(_) => {
                        on_stall();
                        return;
                    }
                }
            }
            if let Some(tee) = tee.as_mut() {
                tee.finish(true);
            }
            done.store(true, Ordering::Release);
        });
        Relay {
            rx,
            hint,
            done: false,
            finished,
            idle,
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match ready!(self.rx.poll_recv(cx)) {
            Some(frame) => Poll::Ready(Some(frame)),
            None => {
                self.done = true;
                if self.finished.load(Ordering::Acquire) {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Err(Box::new(IdleTimeout(self.idle)))))
                }
            }
        }
    }
}

/// What a [`Tap`] does with its copy when the body ends: `Some` with the whole body,
/// `None` when it is not whole (the client left, or it outgrew the tap's limit).
pub type Deliver = Box<dyn FnOnce(Option<Bytes>) + Send>;

/// The record of one exchange that a response body carries, finished (logged and
/// counted) when dropped: a hook, so bodies know nothing of who keeps the record.
pub trait ExchangeRecord: Send {
    /// The counters the exchange's bodies share.
    fn tally(&self) -> &Tally;
}

/// Copies a manifest response aside as it streams to the client, then hands the copy
/// on. Frames are `Bytes` clones (reference counts, no copy) until the end; nothing is
/// held back from the client. Over `limit`, or if the client leaves early, there is no
/// copy to hand on.
pub struct Tap {
    parts: Vec<Bytes>,
    len: usize,
    overflow: bool,
    limit: usize,
    deliver: Option<Deliver>,
}

impl Tap {
    pub fn new(limit: usize, deliver: Deliver) -> Self {
        Tap {
            parts: Vec::new(),
            len: 0,
            overflow: false,
            limit,
            deliver: Some(deliver),
        }
    }

    pub(crate) fn push(&mut self, data: &Bytes) {
        if self.overflow {
            return;
        }
        self.len += data.len();
        // Never more than its limit, whatever the upstream sends.
        if self.len > self.limit {
            self.overflow = true;
            self.parts = Vec::new();
        } else {
            self.parts.push(data.clone());
        }
    }

    pub(crate) fn finish(&mut self, complete: bool) {
        let Some(deliver) = self.deliver.take() else {
            return;
        };
        let copy = (complete && !self.overflow).then(|| {
            let mut body = bytes::BytesMut::with_capacity(self.len);
            for p in self.parts.drain(..) {
                body.extend_from_slice(&p);
            }
            body.freeze()
        });
        self.parts = Vec::new();
        deliver(copy);
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.finish(false);
    }
}

pin_project_lite::pin_project! {
    /// The body of a response to a client: the upstream's, streamed, or regguard's own.
    ///
    /// It carries the exchange's log record; when the body is finished or dropped
    /// (client gone), the record is written. A manifest response may carry a [`Tap`].
    pub struct ResponseBody {
        #[pin]
        kind: ResponseKind,
        exchange: Option<Box<dyn ExchangeRecord>>,
        tap: Option<Tap>,
        tee: Option<Tee>,
    }
}

impl ResponseBody {
    /// A body regguard produced itself.
    pub fn full(data: Bytes) -> Self {
        ResponseBody {
            kind: ResponseKind::Full { data: Some(data) },
            exchange: None,
            tap: None,
            tee: None,
        }
    }

    /// The upstream's body, streamed through.
    pub fn upstream(body: Metered<Inbound>) -> Self {
        ResponseBody {
            kind: ResponseKind::Upstream { body },
            exchange: None,
            tap: None,
            tee: None,
        }
    }

    /// A stream regguard produces itself (content served from the vault).
    pub fn stream(body: http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>) -> Self {
        ResponseBody {
            kind: ResponseKind::Stream { body },
            exchange: None,
            tap: None,
            tee: None,
        }
    }

    /// Hands the upstream body to a [`Relay`] task (HTTP/2 downloads: see there).
    pub fn relayed(
        self,
        idle: Duration,
        keep: Option<Box<dyn std::any::Any + Send>>,
        on_stall: impl FnOnce() + Send + 'static,
    ) -> Self {
        let ResponseBody {
            kind,
            exchange,
            tap,
            tee,
        } = self;
        // A side copy goes with the body into the relay task.
        let (kind, tee) = match kind {
            ResponseKind::Upstream { body } => (
                ResponseKind::Relayed {
                    relay: Relay::start(body, idle, keep, tee, on_stall),
                },
                None,
            ),
            other => (other, tee),
        };
        ResponseBody {
            kind,
            exchange,
            tap,
            tee,
        }
    }

    /// Copies this (manifest) body aside for validation as it streams.
    pub fn tap(&mut self, tap: Tap) {
        self.tap = Some(tap);
    }

    /// Streams a copy of this (blob) body aside as it passes (see [`Tee`]).
    pub fn tee(&mut self, tee: Tee) {
        self.tee = Some(tee);
    }

    /// Hands the exchange record to the body, to be finished when the body is.
    pub fn attach(&mut self, exchange: impl ExchangeRecord + 'static) {
        if self.is_end_stream() {
            // HEAD, 204, 304, empty bodies: hyper will not poll the body at all.
            exchange
                .tally()
                .response_complete
                .store(true, Ordering::Relaxed);
        }
        self.exchange = Some(Box::new(exchange));
    }
}

/// A side copy of a response body: validation's [`Tap`] of a manifest, the vault's [`Tee`]
/// of a layer. Handed each data frame; told at the end whether the body was complete.
pub(crate) trait SideCopy {
    fn push(&mut self, data: &Bytes);
    fn finish(&mut self, complete: bool);
}

impl SideCopy for Tap {
    fn push(&mut self, data: &Bytes) {
        Tap::push(self, data)
    }
    fn finish(&mut self, complete: bool) {
        Tap::finish(self, complete)
    }
}

impl SideCopy for Tee {
    fn push(&mut self, data: &Bytes) {
        Tee::push(self, data)
    }
    fn finish(&mut self, complete: bool) {
        Tee::finish(self, complete)
    }
}

/// Hands what one poll of a body produced to a side copy; `ended` is whether the body
/// reached its end with that frame (a body with a known length is not polled for `None`).
pub(crate) fn feed(
    copy: &mut impl SideCopy,
    polled: &Poll<Option<Result<Frame<Bytes>, BoxError>>>,
    ended: bool,
) {
    match polled {
        Poll::Ready(Some(Ok(frame))) => {
            if let Some(d) = frame.data_ref() {
                copy.push(d);
            }
            if ended {
                copy.finish(true);
            }
        }
        Poll::Ready(None) => copy.finish(true),
        Poll::Ready(Some(Err(_))) => copy.finish(false),
        Poll::Pending => {}
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.kind.project() {
            ResponseKindProj::Upstream { mut body } => {
                let polled = body.as_mut().poll_frame(cx);
                let ended = body.is_end_stream();
                if let Some(tee) = this.tee.as_mut() {
                    feed(tee, &polled, ended);
                }
                if let Some(tap) = this.tap.as_mut() {
                    feed(tap, &polled, ended);
                }
                polled
            }
            ResponseKindProj::Relayed { relay } => relay.poll_frame(cx),
            ResponseKindProj::Stream { body } => {
                let polled = body.poll_frame(cx);
                if let Some(ex) = this.exchange.as_ref() {
                    match &polled {
                        Poll::Ready(Some(Ok(frame))) => {
                            if let Some(d) = frame.data_ref() {
                                ex.tally()
                                    .bytes_out
                                    .fetch_add(d.len() as u64, Ordering::Relaxed);
                            }
                        }
                        Poll::Ready(None) => {
                            ex.tally().response_complete.store(true, Ordering::Relaxed);
                        }
                        Poll::Ready(Some(Err(_))) => {
                            ex.tally().response_failed.store(true, Ordering::Relaxed);
                        }
                        Poll::Pending => {}
                    }
                }
                polled
            }
            ResponseKindProj::Full { data } => {
                if let (Some(ex), Some(d)) = (this.exchange.as_ref(), data.as_ref()) {
                    ex.tally()
                        .bytes_out
                        .fetch_add(d.len() as u64, Ordering::Relaxed);
                    ex.tally().response_complete.store(true, Ordering::Relaxed);
                }
                poll_full(data)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Upstream { body } => body.is_end_stream(),
            ResponseKind::Relayed { relay } => relay.done,
            ResponseKind::Stream { body } => body.is_end_stream(),
            ResponseKind::Full { data } => data.as_ref().is_none_or(|d| d.is_empty()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Upstream { body } => body.size_hint(),
            ResponseKind::Relayed { relay } => relay.hint,
            ResponseKind::Stream { body } => body.size_hint(),
            ResponseKind::Full { data } => full_hint(data),
        }
    }
}
