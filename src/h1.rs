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
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
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
    ) -> Result<Response<Body>, Error> {
        self.send_with(*method == Method::HEAD, |out| {
            encode_head(method, path_and_query, headers, out)
        })
        .await
    }

    /// Sends the bodiless request that `encode` writes (request line, header fields, blank
    /// line; see [`encode_head`]); `head_only` for HEAD. A pooled connection that turns out
    /// to be closed (nothing was received on it) is replaced once by a new one: GET and
    /// HEAD are safe to repeat.
    pub async fn send_with(
        &self,
        head_only: bool,
        encode: impl Fn(&mut BytesMut),
    ) -> Result<Response<Body>, Error> {
        if let Some(conn) = self.inner.checkout() {
            match self.exchange(conn, &encode, head_only).await {
                Err(Attempt::Stale(_)) => {}
                Err(Attempt::Failed(e)) => return Err(e),
                Ok(resp) => return Ok(resp),
            }
        }
        let conn = self.inner.connect().await?;
        match self.exchange(conn, &encode, head_only).await {
            Ok(resp) => Ok(resp),
            Err(Attempt::Stale(e) | Attempt::Failed(e)) => Err(e),
        }
    }

    async fn exchange(
        &self,
        conn: Conn,
        encode: &impl Fn(&mut BytesMut),
        head_only: bool,
    ) -> Result<Response<Body>, Attempt> {
        let Conn { mut io, mut buf } = conn;
        // The connection's buffer carries the request head out, then the response in; the
        // frames of the last response are gone by now, so no new allocation is needed.
        buf.clear();
        buf.reserve(READ_SIZE);
        encode(&mut buf);
        if let Err(e) = io.write_all(&buf).await {
            return Err(Attempt::Stale(e.into()));
        }
        buf.clear();
        // Nothing at all back means a pooled connection the registry had closed.
        match io.read_buf(&mut buf).await {
            Ok(0) => return Err(Attempt::Stale(Error::Closed)),
            Ok(_) => {}
            Err(e) => return Err(Attempt::Stale(e.into())),
        }
        loop {
            match parse_head(&mut buf, head_only).map_err(Attempt::Failed)? {
                Parsed::Partial if buf.len() > MAX_HEAD => {
                    return Err(Attempt::Failed(Error::Malformed("response head too large")))
                }
                Parsed::Partial => {
                    if buf.capacity() - buf.len() < 1024 {
                        buf.reserve(READ_SIZE);
                    }
                    match io.read_buf(&mut buf).await {
                        Ok(0) => return Err(Attempt::Failed(Error::Malformed("truncated head"))),
                        Ok(_) => {}
                        Err(e) => return Err(Attempt::Failed(e.into())),
                    }
                }
                // 1xx before the answer (100 Continue, 103 Early Hints): skipped; what
                // follows it may already be in the buffer.
                Parsed::Interim => {}
                Parsed::Done(head, framing, keep_alive) => {
                    let body = Body {
                        conn: Some(io),
                        buf,
                        framing,
                        keep_alive,
                        pool: self.inner.clone(),
                    };
                    let mut resp = Response::new(body);
                    *resp.status_mut() = head.status;
                    *resp.version_mut() = head.version;
                    *resp.headers_mut() = head.headers;
                    // An empty body is complete now: give the connection back at once.
                    resp.body_mut().finish_if_done();
                    return Ok(resp);
                }
            }
        }
    }
}

/// A connection and its buffer, which it keeps while idle.
struct Conn {
    io: TcpStream,
    buf: BytesMut,
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

    fn checkin(&self, conn: Conn) {
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

    async fn connect(&self) -> Result<Conn, Error> {
        let addr = || format!("{}:{}", self.host, self.port);
        let connecting = async {
            let mut last = None;
            for a in tokio::net::lookup_host((self.host.as_str(), self.port)).await? {
                match TcpStream::connect(a).await {
                    Ok(io) => return Ok((io, a)),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| io::Error::other("the host name resolved to no address")))
        };
        let (io, _): (TcpStream, SocketAddr) =
            match tokio::time::timeout(self.connect_timeout, connecting).await {
                Err(_) => return Err(Error::ConnectTimeout(self.connect_timeout)),
                Ok(Err(source)) => {
                    return Err(Error::Connect {
                        addr: addr(),
                        source,
                    })
                }
                Ok(Ok(c)) => c,
            };
        let _ = io.set_nodelay(true);
        let _ = socket2::SockRef::from(&io)
            .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(self.keepalive));
        Ok(Conn {
            io,
            buf: BytesMut::with_capacity(READ_SIZE),
        })
    }
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
            .and_then(|n| HeaderName::from_bytes(n).ok())
            .ok_or(Error::Malformed("invalid header name"))?;
        let value = head_bytes
            .get(v0..v1)
            .map(|_| head_bytes.slice(v0..v1))
            .and_then(|v| HeaderValue::from_maybe_shared(v).ok())
            .ok_or(Error::Malformed("invalid header value"))?;
        headers.append(name, value);
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

/// How the body's end is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes still to come.
    Length(u64),
    /// Chunked transfer coding, in this state.
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk: this many data bytes to come.
    Data(u64),
    /// After a chunk's data: expecting its CRLF.
    DataEnd,
    /// After the last chunk: trailer fields until a blank line.
    Trailers,
    /// The body has ended.
    Done,
}

/// A response body read from its connection as it is polled. Dropped before its end, it
/// closes the connection; read to its end with nothing left over, it returns it to the pool.
pub struct Body {
    conn: Option<TcpStream>,
    buf: BytesMut,
    framing: Framing,
    keep_alive: bool,
    pool: Arc<Inner>,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body")
            .field("framing", &self.framing)
            .finish()
    }
}

/// What a body poll found.
enum Step {
    Data(Bytes),
    End,
    NeedMore,
}

impl Body {
    fn is_done(&self) -> bool {
        matches!(
            self.framing,
            Framing::Length(0) | Framing::Chunked(Chunk::Done)
        )
    }

    /// At the end: the connection goes back if it can carry another exchange.
    fn finish_if_done(&mut self) {
        if self.is_done() {
            if let Some(io) = self.conn.take() {
                if self.keep_alive && self.buf.is_empty() {
                    let buf = std::mem::take(&mut self.buf);
                    self.pool.checkin(Conn { io, buf });
                }
            }
        }
    }

    /// Takes what the buffer holds of the body, by its framing.
    fn step(&mut self) -> Result<Step, Error> {
        loop {
            match self.framing {
                Framing::Length(0) | Framing::Chunked(Chunk::Done) => return Ok(Step::End),
                Framing::Length(rest) => {
                    if self.buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = self
                        .buf
                        .len()
                        .min(usize::try_from(rest).unwrap_or(usize::MAX));
                    self.framing = Framing::Length(rest - n as u64);
                    return Ok(Step::Data(self.buf.split_to(n).freeze()));
                }
                Framing::UntilClose => {
                    if self.buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    return Ok(Step::Data(self.buf.split().freeze()));
                }
                Framing::Chunked(Chunk::Data(rest)) => {
                    if self.buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let n = self
                        .buf
                        .len()
                        .min(usize::try_from(rest).unwrap_or(usize::MAX));
                    let rest = rest - n as u64;
                    self.framing = Framing::Chunked(if rest == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(rest)
                    });
                    return Ok(Step::Data(self.buf.split_to(n).freeze()));
                }
                Framing::Chunked(Chunk::DataEnd) => {
                    if self.buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if self.buf.get(..2) != Some(b"\r\n".as_slice()) {
                        return Err(Error::Malformed("chunk data not followed by CRLF"));
                    }
                    self.buf.advance(2);
                    self.framing = Framing::Chunked(Chunk::Size);
                }
                Framing::Chunked(Chunk::Size) => {
                    let Some(line) = self.line()? else {
                        return Ok(Step::NeedMore);
                    };
                    let size = chunk_size(&line)?;
                    self.framing = Framing::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                Framing::Chunked(Chunk::Trailers) => {
                    // Trailer fields are read and dropped (a registry sends none).
                    let Some(line) = self.line()? else {
                        return Ok(Step::NeedMore);
                    };
                    if line.is_empty() {
                        self.framing = Framing::Chunked(Chunk::Done);
                    }
                }
            }
        }
    }

    /// One CRLF-terminated line from the buffer (without its CRLF), if whole.
    fn line(&mut self) -> Result<Option<Bytes>, Error> {
        match self.buf.windows(2).position(|w| w == b"\r\n") {
            Some(i) if i > MAX_CHUNK_LINE => Err(Error::Malformed("chunk line too long")),
            Some(i) => {
                let line = self.buf.split_to(i).freeze();
                self.buf.advance(2);
                Ok(Some(line))
            }
            None if self.buf.len() > MAX_CHUNK_LINE => Err(Error::Malformed("chunk line too long")),
            None => Ok(None),
        }
    }

    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, io::Error>> {
        let Some(io) = self.conn.as_mut() else {
            return Poll::Ready(Ok(0));
        };
        if self.buf.capacity() - self.buf.len() < 1024 {
            let want = match self.framing {
                Framing::Length(rest) => usize::try_from(rest).unwrap_or(READ_SIZE).min(READ_SIZE),
                _ => READ_SIZE,
            };
            self.buf.reserve(want.max(1024));
        }
        tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut self.buf)
    }
}

/// The size of a chunk-size line: hex digits, then optional `;extensions`.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(Error::Malformed("invalid chunk size"));
    }
    let s = std::str::from_utf8(digits).map_err(|_| Error::Malformed("invalid chunk size"))?;
    u64::from_str_radix(s, 16).map_err(|_| Error::Malformed("invalid chunk size"))
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        loop {
            match this.step() {
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Step::Data(d)) => {
                    this.finish_if_done();
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Step::End) => {
                    this.finish_if_done();
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => match ready!(this.poll_more(cx)) {
                    Ok(0) if this.framing == Framing::UntilClose => {
                        this.conn = None;
                        return Poll::Ready(None);
                    }
                    Ok(0) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(Error::Io(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the upstream closed the connection before the body's end",
                        )))));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Chunked(Chunk::Done) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A scripted upstream: every request head read is answered with the next canned
    /// response; `close_after` closes a connection after that many answers. Counts accepts.
    struct Upstream {
        port: u16,
        accepts: Arc<AtomicUsize>,
    }

    async fn upstream(responses: Vec<&'static [u8]>, close_after: usize) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepts = Arc::new(AtomicUsize::new(0));
        let counted = accepts.clone();
        let script = Arc::new(Mutex::new(VecDeque::from(responses)));
        tokio::spawn(async move {
            loop {
                let (mut io, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut answered = 0;
                    loop {
                        let mut chunk = [0u8; 1024];
                        let n = match io.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let next = script.lock().unwrap().pop_front();
                            let Some(resp) = next else { return };
                            io.write_all(resp).await.unwrap();
                            answered += 1;
                            if answered == close_after {
                                return;
                            }
                        }
                    }
                });
            }
        });
        Upstream { port, accepts }
    }

    fn pool(port: u16) -> Pool {
        Pool::new(
            "127.0.0.1",
            port,
            Duration::from_secs(2),
            Duration::from_secs(60),
            Duration::from_secs(50),
        )
    }

    fn get_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, HeaderValue::from_static("registry"));
        h
    }

    async fn get(pool: &Pool, method: Method) -> Result<(Response<()>, Bytes), Error> {
        let resp = pool.send(&method, "/v2/", &get_headers()).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((Response::from_parts(parts, ()), body))
    }

    const OK_CL: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nDocker-Content-Digest: sha256:x\r\n\r\nhello";

    #[tokio::test]
    async fn a_content_length_body_is_read_whole_and_its_connection_reused() {
        let up = upstream(vec![OK_CL, OK_CL, OK_CL], usize::MAX).await;
        let p = pool(up.port);
        for _ in 0..3 {
            let (resp, body) = get(&p, Method::GET).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(&body[..], b"hello");
            assert_eq!(resp.headers()["docker-content-digest"], "sha256:x");
        }
        assert_eq!(
            up.accepts.load(Ordering::SeqCst),
            1,
            "one connection for three requests"
        );
    }

    #[tokio::test]
    async fn a_chunked_body_with_extensions_and_trailers_is_decoded_and_its_connection_reused() {
        const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n";
        let up = upstream(vec![CHUNKED, OK_CL], usize::MAX).await;
        let p = pool(up.port);
        let (_, body) = get(&p, Method::GET).await.unwrap();
        assert_eq!(&body[..], b"hello, world");
        let (_, body) = get(&p, Method::GET).await.unwrap();
        assert_eq!(&body[..], b"hello");
        assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connection_close_is_honoured() {
        const CLOSE: &[u8] =
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        let up = upstream(vec![CLOSE, OK_CL], usize::MAX).await;
        let p = pool(up.port);
        get(&p, Method::GET).await.unwrap();
        get(&p, Method::GET).await.unwrap();
        assert_eq!(up.accepts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_pooled_connection_the_upstream_closed_is_replaced_without_an_error() {
        // The upstream closes after each answer without saying so.
        let up = upstream(vec![OK_CL, OK_CL, OK_CL], 1).await;
        let p = pool(up.port);
        for _ in 0..3 {
            let (_, body) = get(&p, Method::GET).await.unwrap();
            assert_eq!(&body[..], b"hello");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(up.accepts.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_head_response_has_no_body_and_keeps_its_connection() {
        const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 1245\r\n\r\n";
        let up = upstream(vec![HEAD, OK_CL], usize::MAX).await;
        let p = pool(up.port);
        let resp = p.send(&Method::HEAD, "/v2/", &get_headers()).await.unwrap();
        assert!(http_body::Body::is_end_stream(resp.body()));
        assert_eq!(resp.headers()["content-length"], "1245");
        let (_, body) = get(&p, Method::GET).await.unwrap();
        assert_eq!(&body[..], b"hello");
        assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        const EARLY: &[u8] = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let up = upstream(vec![EARLY], usize::MAX).await;
        let (resp, body) = get(&pool(up.port), Method::GET).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(&body[..], b"hello");
    }

    #[tokio::test]
    async fn a_body_until_close_is_read_to_the_close() {
        const UNTIL_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\n\r\nall of it";
        let up = upstream(vec![UNTIL_CLOSE], 1).await;
        let (_, body) = get(&pool(up.port), Method::GET).await.unwrap();
        assert_eq!(&body[..], b"all of it");
    }

    #[tokio::test]
    async fn malformed_responses_are_errors_not_guesses() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let up = upstream(vec![bad], usize::MAX).await;
            let p = pool(up.port);
            assert!(
                get(&p, Method::GET).await.is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn a_head_larger_than_the_limit_is_refused() {
        let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
        while big.len() <= MAX_HEAD {
            big.extend_from_slice(
                b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        big.extend_from_slice(b"\r\n");
        let big: &'static [u8] = Box::leak(big.into_boxed_slice());
        let up = upstream(vec![big], usize::MAX).await;
        assert!(matches!(
            get(&pool(up.port), Method::GET).await,
            Err(Error::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_its_connection_is_not_reused() {
        const SHORT: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello";
        let up = upstream(vec![SHORT, OK_CL], 1).await;
        let p = pool(up.port);
        assert!(get(&p, Method::GET).await.is_err());
        let (_, body) = get(&p, Method::GET).await.unwrap();
        assert_eq!(&body[..], b"hello");
        assert_eq!(up.accepts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        const LONG: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nhello";
        let up = upstream(vec![LONG, OK_CL], usize::MAX).await;
        let p = pool(up.port);
        let resp = p.send(&Method::GET, "/v2/", &get_headers()).await.unwrap();
        drop(resp);
        let (_, body) = get(&p, Method::GET).await.unwrap();
        assert_eq!(&body[..], b"hello");
        assert_eq!(up.accepts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_upstream_that_refuses_connections_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        assert!(matches!(
            get(&pool(port), Method::GET).await,
            Err(Error::Connect { .. })
        ));
    }

    #[test]
    fn the_request_head_is_written_as_given() {
        let mut out = BytesMut::new();
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, HeaderValue::from_static("r:5050"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        encode_head(&Method::GET, "/v2/a/manifests/v1?x=1", &h, &mut out);
        assert_eq!(
            &out[..],
            b"GET /v2/a/manifests/v1?x=1 HTTP/1.1\r\nhost: r:5050\r\nx-forwarded-for: 10.0.0.1\r\n\r\n"
        );
    }
}
