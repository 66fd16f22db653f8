//! A lean HTTP/1.1 client for the bodiless requests of the request path (manifest, tag and
//! catalog GETs, every HEAD) to a plain-HTTP registry.
//!
//! Why it exists: a manifest GET is small, and on that path hyper-util's pooled client was
//! the largest single cost of a proxied request (measured with callgrind: checkout and
//! return, the hand-over to the connection's own task and back, about 15,000 instructions
//! of 55,000). Here the task that serves the client writes the request head and reads the
//! response itself, on a connection it took from a pool of its own thread; the response
//! head is parsed by `httparse` (as hyper does). Bodies stream: the response body reads from
//! the socket as the client takes it, and the connection goes back to the pool only when the
//! body has been read to its end with nothing left over.
//!
//! What it does not do: request bodies, TLS, upgrades, HTTP/2. Those go through hyper-util
//! (see `upstream`). It knows nothing of routes, registries or metrics.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Response, StatusCode, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head accepted (hyper's default ceiling is about 400 KiB; a registry's
/// heads are well under 1 KiB, and a head this large is a broken or hostile upstream).
pub const MAX_HEAD: usize = 64 * 1024;
/// Header fields accepted in one response head (hyper's default).
const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// What one read asks for: a manifest response (head and body) fits in one.
const READ_SIZE: usize = 16 * 1024;
/// Idle connections kept per pool (per serving thread); more are closed.
const MAX_IDLE: usize = 256;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("connection closed before the response head")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error("no response head within {0:?}")]
    HeadTimeout(Duration),
}

impl Error {
    /// Whether the connect step failed on its deadline.
    pub fn is_connect_timeout(&self) -> bool {
        matches!(self, Error::ConnectTimeout(_))
    }
}

/// Idle connections to one upstream, used by one serving thread.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    host: String,
    port: u16,
    connect_timeout: Duration,
    keepalive: Duration,
    idle_for: Duration,
    idle: Mutex<VecDeque<Idle>>,
    /// Whether the task that closes expired and closed idle connections is running.
    sweeping: std::sync::atomic::AtomicBool,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl Pool {
    /// A pool for `host:port`. New connections get `connect_timeout`, TCP_NODELAY and TCP
    /// keepalive probes after `keepalive`; idle ones are dropped after `idle_for`.
    pub fn new(
        host: &str,
        port: u16,
        connect_timeout: Duration,
        keepalive: Duration,
        idle_for: Duration,
    ) -> Self {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Pool {
            inner: Arc::new(Inner {
                host,
                port,
                connect_timeout,
                keepalive,
                idle_for,
                idle: Mutex::new(VecDeque::new()),
                sweeping: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Sends a bodiless `method` request for `path_and_query` with `headers` (already
    /// rewritten by the caller, `Host` included) and returns the response head with a body
    /// that streams from the connection.
    pub async fn send(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        head_timeout: Duration,
    ) -> Result<Response<Body>, Error> {
        // It may send a request twice (see `send_with`): only safe methods.
        if *method != Method::GET && *method != Method::HEAD {
            return Err(Error::Malformed("the lean client sends GET and HEAD only"));
        }
        self.send_with(*method == Method::HEAD, head_timeout, |out| {
            encode_head(method, path_and_query, headers, out)
        })
        .await
    }

    /// Sends the bodiless request that `encode` writes (request line, header fields, blank
    /// line; see [`encode_head`]); `head_only` for HEAD. A pooled connection that turns out
    /// to be closed (nothing was received on it) is replaced once by a new one: GET and
    /// HEAD are safe to repeat. The response head must come within `head_timeout` of this
    /// call (nginx's `proxy_read_timeout`), both attempts and the connect between included.
    pub async fn send_with(
        &self,
        head_only: bool,
        head_timeout: Duration,
        encode: impl Fn(&mut BytesMut),
    ) -> Result<Response<Body>, Error> {
        // One deadline for the response head across both attempts (and the connect between).
        let deadline = tokio::time::Instant::now() + head_timeout;
        let timing = (deadline, head_timeout);
        if let Some(conn) = self.inner.checkout() {
            match self.exchange(conn, &encode, head_only, timing).await {
                Err(Attempt::Stale(_)) => {}
                Err(Attempt::Failed(e)) => return Err(e),
                Ok(resp) => return Ok(resp),
            }
        }
        // Rare (the pool was empty, or its connection stale): boxed, so that the state of
        // a connect does not make every request's future larger.
        let conn = Box::pin(self.inner.connect()).await?;
        match self.exchange(conn, &encode, head_only, timing).await {
            Ok(resp) => Ok(resp),
            Err(Attempt::Stale(e) | Attempt::Failed(e)) => Err(e),
        }
    }

    /// One attempt on `conn`, bounded by its deadline timer. The timer lives with the
    /// connection and is moved forward for each exchange: moving a registered timer later
    /// is one atomic operation, where a new timer per request is registered with the
    /// runtime's timer wheel and removed again.
    async fn exchange(
        &self,
        conn: Conn,
        encode: &impl Fn(&mut BytesMut),
        head_only: bool,
        (deadline, head_timeout): (tokio::time::Instant, Duration),
    ) -> Result<Response<Body>, Attempt> {
        let Conn {
            mut io,
            mut buf,
            mut timer,
        } = conn;
        timer.as_mut().reset(deadline);
        let head = tokio::select! {
            biased;
            head = Self::read_head(&mut io, &mut buf, encode, head_only) => head?,
            () = timer.as_mut() => return Err(Attempt::Failed(Error::HeadTimeout(head_timeout))),
        };
        let (head, framing, keep_alive) = head;
        let body = Body::new(
            Conn { io, buf, timer },
            framing,
            keep_alive,
            self.inner.clone(),
        );
        let mut resp = Response::new(body);
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        // An empty body is complete now: give the connection back at once.
        resp.body_mut().finish_if_done();
        Ok(resp)
    }

    /// Writes the request head and reads the response head; what follows the head stays
    /// in `buf`.
    async fn read_head(
        io: &mut TcpStream,
        buf: &mut BytesMut,
        encode: &impl Fn(&mut BytesMut),
        head_only: bool,
    ) -> Result<(Head, Framing, bool), Attempt> {
        // The connection's buffer carries the request head out, then the response in; the
        // frames of the last response are gone by now, so no new allocation is needed.
        buf.clear();
        buf.reserve(READ_SIZE);
        encode(buf);
        if let Err(e) = io.write_all(buf).await {
            return Err(Attempt::Stale(e.into()));
        }
        buf.clear();
        // Nothing at all back means a pooled connection the registry had closed.
        match io.read_buf(buf).await {
            Ok(0) => return Err(Attempt::Stale(Error::Closed)),
            Ok(_) => {}
            Err(e) => return Err(Attempt::Stale(e.into())),
        }
        loop {
            match parse_head(buf, head_only).map_err(Attempt::Failed)? {
                Parsed::Partial if buf.len() > MAX_HEAD => {
                    return Err(Attempt::Failed(Error::Malformed("response head too large")))
                }
                Parsed::Partial => {
                    if buf.capacity() - buf.len() < 1024 {
                        buf.reserve(READ_SIZE);
                    }
                    match io.read_buf(buf).await {
                        Ok(0) => return Err(Attempt::Failed(Error::Malformed("truncated head"))),
                        Ok(_) => {}
                        Err(e) => return Err(Attempt::Failed(e.into())),
                    }
                }
                // 1xx before the answer (100 Continue, 103 Early Hints): skipped; what
                // follows it may already be in the buffer.
                Parsed::Interim => {}
                Parsed::Done(head, framing, keep_alive) => return Ok((head, framing, keep_alive)),
            }
        }
    }
}

/// A connection, its buffer and its deadline timer, which it keeps while idle.
struct Conn {
    io: TcpStream,
    buf: BytesMut,
    timer: Pin<Box<tokio::time::Sleep>>,
}

/// How one attempt on a connection failed: `Stale` when nothing came back (a pooled
/// connection the registry had closed), so the request may be sent again.
enum Attempt {
    Stale(Error),
    Failed(Error),
}

impl Inner {
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop_back() {
            if c.since.elapsed() > self.idle_for {
                idle.clear(); // the rest are older still
                return None;
            }
            // A close (or stray bytes) the reactor has seen makes the socket readable.
            let mut probe = [0u8; 1];
            match c.conn.io.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(c.conn),
                _ => continue,
            }
        }
        None
    }

    /// Keeps an idle connection. The first one starts the sweep, on the runtime of the
    /// thread that uses this pool: a quiet thread does not hold sockets its registry closed.
    fn checkin(self: &Arc<Self>, conn: Conn) {
        if !self
            .sweeping
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while idle
            .front()
            .is_some_and(|c| c.since.elapsed() > self.idle_for)
        {
            idle.pop_front();
        }
        if idle.len() >= MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// Resolves the host (within the connect timeout) and tries its addresses in turn,
    /// each with an equal share of the timeout, as hyper-util's connector does: an address
    /// that swallows SYNs (a dead IPv6 route) leaves time for the next one.
    async fn connect(&self) -> Result<Conn, Error> {
        let addr = || format!("{}:{}", self.host, self.port);
        let started = tokio::time::Instant::now();
        let addrs: Vec<SocketAddr> = match tokio::time::timeout(
            self.connect_timeout,
            tokio::net::lookup_host((self.host.as_str(), self.port)),
        )
        .await
        {
            Err(_) => return Err(Error::ConnectTimeout(self.connect_timeout)),
            Ok(Err(source)) => {
                return Err(Error::Connect {
                    addr: addr(),
                    source,
                })
            }
            Ok(Ok(found)) => found.collect(),
        };
        let left = self.connect_timeout.saturating_sub(started.elapsed());
        let share = left / u32::try_from(addrs.len().max(1)).unwrap_or(u32::MAX);
        let mut last = None;
        let mut connected = None;
        for a in &addrs {
            match tokio::time::timeout(share, TcpStream::connect(a)).await {
                Ok(Ok(io)) => {
                    connected = Some(io);
                    break;
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => last = Some(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
            }
        }
        let io = match (connected, last) {
            (Some(io), _) => io,
            (None, Some(e)) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(Error::ConnectTimeout(self.connect_timeout))
            }
            (None, last) => {
                return Err(Error::Connect {
                    addr: addr(),
                    source: last.unwrap_or_else(|| {
                        io::Error::other("the host name resolved to no address")
                    }),
                })
            }
        };
        let _ = io.set_nodelay(true);
        let _ = socket2::SockRef::from(&io)
            .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(self.keepalive));
        Ok(Conn {
            io,
            buf: BytesMut::with_capacity(READ_SIZE),
            // Armed by each exchange (see `Pool::exchange`).
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        })
    }
}

/// Every half idle period, closes the idle connections that expired or that the registry
/// closed; ends with the pool.
async fn sweep(pool: std::sync::Weak<Inner>) {
    loop {
        let period = match pool.upgrade() {
            Some(p) => p.idle_for / 2,
            None => return,
        };
        tokio::time::sleep(period.max(Duration::from_secs(1))).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|c| {
            let mut probe = [0u8; 1];
            c.since.elapsed() <= pool.idle_for
                && matches!(c.conn.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        });
    }
}

/// The registry's own header names, which `http` does not know: taken as they are
/// rather than lower-cased into a new allocation for every response.
static REGISTRY_NAMES: [HeaderName; 2] = [
    HeaderName::from_static("docker-content-digest"),
    HeaderName::from_static("docker-distribution-api-version"),
];

/// A header name from a response head: a standard one or one of the registry's without
/// an allocation, any other valid token copied.
fn header_name(raw: &[u8]) -> Option<HeaderName> {
    REGISTRY_NAMES
        .iter()
        .find(|n| n.as_str().as_bytes().eq_ignore_ascii_case(raw))
        .cloned()
        .or_else(|| HeaderName::from_bytes(raw).ok())
}

/// Writes `METHOD path HTTP/1.1`, the header fields and the blank line. `http`'s types
/// cannot hold a CR or LF in a method, path, name or value, so nothing can be smuggled in.
pub fn encode_head(method: &Method, path_and_query: &str, headers: &HeaderMap, out: &mut BytesMut) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
}

enum Parsed {
    Partial,
    Interim,
    Done(Head, Framing, bool),
}

/// Parses a response head at the start of `buf`; on success removes it from `buf`, which
/// then holds whatever of the body has arrived. Framing follows RFC 9112 section 6.3.
fn parse_head(buf: &mut BytesMut, head_only: bool) -> Result<Parsed, Error> {
    let mut fields = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Error::Malformed("too many header fields"))
        }
        Err(_) => return Err(Error::Malformed("invalid response head")),
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| Error::Malformed("invalid status code"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(Error::Malformed("unexpected 101 Switching Protocols"));
    }
    if status.is_informational() {
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    let version = if resp.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    // Values are slices of the head's own bytes (no copy); names are interned or copied.
    if len > usize::from(u16::MAX) {
        return Err(Error::Malformed("response head too large"));
    }
    // Where each field lies in the head (offsets fit in u16: the head is shorter than 64
    // KiB), so the head can be split off the buffer and its values shared, not copied.
    let base = buf.as_ptr() as usize;
    let offset = |p: *const u8| u16::try_from(p as usize - base).unwrap_or(0);
    let mut spans = [(0u16, 0u16, 0u16, 0u16); MAX_HEADERS];
    let count = resp.headers.len();
    for (span, f) in spans.iter_mut().zip(resp.headers.iter()) {
        let (name, value) = (offset(f.name.as_ptr()), offset(f.value.as_ptr()));
        // Lengths within a head under 64 KiB fit as well.
        let (nl, vl) = (f.name.len() as u16, f.value.len() as u16);
        *span = (name, name + nl, value, value + vl);
    }
    let head_bytes = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    for &(n0, n1, v0, v1) in spans.iter().take(count) {
        let (n0, n1, v0, v1) = (n0.into(), n1.into(), v0.into(), v1.into());
        let name = head_bytes
            .get(n0..n1)
            .and_then(header_name)
            .ok_or(Error::Malformed("invalid header name"))?;
        let value = head_bytes
            .get(v0..v1)
            .map(|_| head_bytes.slice(v0..v1))
            .and_then(|v| HeaderValue::from_maybe_shared(v).ok())
            .ok_or(Error::Malformed("invalid header value"))?;
        headers.append(name, value);
    }
    if version == Version::HTTP_10 && headers.contains_key(TRANSFER_ENCODING) {
        return Err(Error::Malformed(
            "Transfer-Encoding in an HTTP/1.0 response",
        ));
    }
    let (framing, mut keep_alive) = framing(&headers, status, head_only)?;
    keep_alive &= version == Version::HTTP_11
        && !headers
            .get_all(CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"close"));
    Ok(Parsed::Done(
        Head {
            status,
            version,
            headers,
        },
        framing,
        keep_alive,
    ))
}

/// The body's framing, and whether it leaves the connection reusable.
fn framing(
    headers: &HeaderMap,
    status: StatusCode,
    head_only: bool,
) -> Result<(Framing, bool), Error> {
    if head_only || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Length(0), true));
    }
    if let Some(last) = headers.get_all(TRANSFER_ENCODING).iter().next_back() {
        // Transfer-Encoding overrides Content-Length; a message with both is suspect, so
        // its connection is not reused.
        let both = headers.contains_key(CONTENT_LENGTH);
        let chunked = last_token_is_chunked(last.as_bytes());
        return Ok(if chunked {
            (Framing::Chunked(Chunk::Size), !both)
        } else {
            (Framing::UntilClose, false)
        });
    }
    let mut length = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        for part in v.as_bytes().split(|b| *b == b',') {
            let n = parse_length(part).ok_or(Error::Malformed("invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Malformed("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(n) => (Framing::Length(n), true),
        None => (Framing::UntilClose, false),
    })
}

fn parse_length(s: &[u8]) -> Option<u64> {
    let s = s.trim_ascii();
    if s.is_empty() || s.len() > 19 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(s).ok()?.parse().ok()
}

fn last_token_is_chunked(v: &[u8]) -> bool {
    v.rsplit(|b| *b == b',')
        .next()
        .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

fn has_token(v: &[u8], token: &[u8]) -> bool {
    v.split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

mod body;
#[cfg(test)]
mod tests;

pub use body::Body;
use body::{Chunk, Framing};
