//! The response body of the lean client: read from its connection as it is polled, by its
//! framing (Content-Length, chunked, or until the upstream closes), and the connection handed
//! back to its pool when the body ended with nothing left over.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::net::TcpStream;

use super::{Conn, Error, Inner, MAX_CHUNK_LINE, READ_SIZE};

/// How the body's end is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// This many bytes still to come.
    Length(u64),
    /// Chunked transfer coding, in this state.
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Chunk {
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
    /// The connection's deadline timer, kept to go back to the pool with it.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
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
    pub(super) fn new(conn: Conn, framing: Framing, keep_alive: bool, pool: Arc<Inner>) -> Self {
        let Conn { io, buf, timer } = conn;
        Body {
            conn: Some(io),
            timer: Some(timer),
            buf,
            framing,
            keep_alive,
            pool,
        }
    }

    fn is_done(&self) -> bool {
        matches!(
            self.framing,
            Framing::Length(0) | Framing::Chunked(Chunk::Done)
        )
    }

    /// At the end: the connection goes back if it can carry another exchange.
    pub(super) fn finish_if_done(&mut self) {
        if self.is_done() {
            if let (Some(io), Some(timer)) = (self.conn.take(), self.timer.take()) {
                if self.keep_alive && self.buf.is_empty() {
                    let buf = std::mem::take(&mut self.buf);
                    self.pool.checkin(Conn { io, buf, timer });
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
                    let Some((data, rest)) = self.take(rest) else {
                        return Ok(Step::NeedMore);
                    };
                    self.framing = Framing::Length(rest);
                    return Ok(Step::Data(data));
                }
                Framing::UntilClose => {
                    if self.buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    return Ok(Step::Data(self.buf.split().freeze()));
                }
                Framing::Chunked(Chunk::Data(rest)) => {
                    let Some((data, rest)) = self.take(rest) else {
                        return Ok(Step::NeedMore);
                    };
                    self.framing = Framing::Chunked(if rest == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(rest)
                    });
                    return Ok(Step::Data(data));
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

    /// Up to `rest` bytes of what the buffer holds, and how many are still to come after
    /// them; `None` when the buffer is empty.
    fn take(&mut self, rest: u64) -> Option<(Bytes, u64)> {
        if self.buf.is_empty() {
            return None;
        }
        let n = self
            .buf
            .len()
            .min(usize::try_from(rest).unwrap_or(usize::MAX));
        Some((self.buf.split_to(n).freeze(), rest - n as u64))
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
    // Hex digits, then optional whitespace (spaces or tabs) before any extension.
    let digits = line.split(|b| *b == b';').next().unwrap_or_default();
    let end = digits
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(0, |i| i + 1);
    let digits = digits.get(..end).unwrap_or_default();
    let first = digits
        .iter()
        .position(|b| *b != b'0')
        .unwrap_or(digits.len());
    let significant = digits.get(first..).unwrap_or_default();
    if digits.is_empty() || significant.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(Error::Malformed("invalid chunk size"));
    }
    if significant.is_empty() {
        return Ok(0);
    }
    let s = std::str::from_utf8(significant).map_err(|_| Error::Malformed("invalid chunk size"))?;
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
