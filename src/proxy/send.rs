//! Phase 3's last step: the request goes upstream, by the serving thread's lean client
//! (`h1`: bodiless requests to a plain-HTTP registry) or its pooled hyper-util client, and a
//! failure becomes the `ForwardError` the client is answered with.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{Method, Request, Response, Version};

use super::{ConnInfo, Forwarding, Proxy};
use crate::body::{Direction, Inbound, Metered, ResponseBody, Tally};
use crate::error::ForwardError;
use crate::proxy::{remove_hop_by_hop, rewrite_request_headers};
use crate::upstream::UpstreamBody;

impl Proxy {
    /// Sends a request head and body upstream by hyper-util's pooled client and relays the
    /// response head.
    pub(super) async fn send_pooled(
        &self,
        client: &crate::upstream::UpstreamClient,
        mut head: http::request::Parts,
        body: UpstreamBody,
        conn: ConnInfo,
        tally: Arc<Tally>,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        head.version = Version::HTTP_11;
        rewrite_request_headers(
            &mut head.headers,
            head.uri.authority(),
            conn,
            &self.upstream,
        );
        let path_and_query = head.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let sent = match self.upstream.uri_for(path_and_query) {
            Err(e) => Err(SendError::Uri(e)),
            Ok(uri) => {
                head.uri = uri;
                let request = client.request(Request::from_parts(head, body));
                // The wait for the response head starts when the request body has been
                // sent (nginx's proxy_read_timeout); while it streams, the body's own idle
                // timeout guards against a stalled client. A 6 s upload with a 2 s idle
                // timeout works.
                let head_deadline = async {
                    tally.request_done.notified().await;
                    tokio::time::sleep(self.idle_timeout).await;
                };
                tokio::select! {
                    r = request => r
                        .map(|r| r.map(|body| Inbound::Pooled { body }))
                        .map_err(SendError::Pooled),
                    () = head_deadline => Err(SendError::HeadTimeout),
                }
            }
        };
        self.relay_head(sent, tally)
    }

    /// Sends a bodiless GET or HEAD by this serving thread's lean client (see `h1`) and
    /// relays the response head. The wait for the response head starts at once, bounded by
    /// the lean client's own timer.
    // A plain fn returning an `async move` block: see `Proxy::handle`.
    #[allow(clippy::manual_async_fn)] // deliberate: see the comment above
    pub(super) fn send_direct<'a>(
        &'a self,
        direct: &'a crate::h1::Pool,
        mut head: http::request::Parts,
        conn: ConnInfo,
        tally: Arc<Tally>,
    ) -> impl std::future::Future<Output = Result<Response<ResponseBody>, ForwardError>> + Send + 'a
    {
        async move {
            // Fields a `Connection` field names go first; the rest of the rewrite goes straight
            // into the head the lean client writes.
            remove_hop_by_hop(&mut head.headers);
            let forwarding =
                Forwarding::of(&head.headers, head.uri.authority(), conn, &self.upstream);
            let path_and_query = head.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let sent = direct
                .send_with(head.method == Method::HEAD, self.idle_timeout, |out| {
                    forwarding.encode(&head.method, path_and_query, &head.headers, out)
                })
                .await
                .map(|r| r.map(|body| Inbound::Direct { body }))
                .map_err(|e| match e {
                    crate::h1::Error::HeadTimeout(_) => SendError::HeadTimeout,
                    e => SendError::Direct(e),
                });
            self.relay_head(sent, tally)
        }
    }

    /// The response head as the client gets it (hop-by-hop fields removed, the body metered),
    /// or the error it is answered with; the upstream watch hears either way.
    fn relay_head(
        &self,
        sent: Result<Response<Inbound>, SendError>,
        tally: Arc<Tally>,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        let response = match sent {
            Err(e) => {
                let error = self.classify_client_error(&e, &tally);
                // A registry slow to answer one request has not gone away: only a failed
                // connect or a lost connection tells the watch (whose "came back" drops
                // every cached answer).
                if let (Some(w), ForwardError::Unreachable(_) | ForwardError::Timeout { .. }) =
                    (&self.watch, &error)
                {
                    if !matches!(e, SendError::HeadTimeout) {
                        w.unreachable();
                    }
                }
                return Err(error);
            }
            Ok(r) => {
                if let Some(w) = &self.watch {
                    w.answered();
                }
                r
            }
        };
        let (mut head, body) = response.into_parts();
        remove_hop_by_hop(&mut head.headers);
        let body = Metered::new(body, self.idle_timeout, tally, Direction::Response);
        Ok(Response::from_parts(head, ResponseBody::upstream(body)))
    }
}

impl Proxy {
    fn classify_client_error(&self, e: &SendError, tally: &Tally) -> ForwardError {
        let e = match e {
            SendError::HeadTimeout => {
                return ForwardError::Timeout {
                    stage: "response headers",
                    after: self.idle_timeout,
                }
            }
            SendError::Uri(e) => {
                return ForwardError::Unreachable(format!("cannot build upstream URI: {e}"))
            }
            SendError::Pooled(e) => e,
            SendError::Direct(e) if e.is_connect_timeout() => {
                return ForwardError::Timeout {
                    stage: "connect",
                    after: self.connect_timeout,
                }
            }
            SendError::Direct(e) => return ForwardError::Unreachable(error_chain(e)),
        };
        if tally.request_failed.load(Ordering::Relaxed) {
            return ForwardError::ClientAborted(error_chain(e));
        }
        if e.is_connect() && has_timeout(e) {
            return ForwardError::Timeout {
                stage: "connect",
                after: self.connect_timeout,
            };
        }
        if let Some(tls) = tls_error(e) {
            return ForwardError::UpstreamTls(tls.to_string());
        }
        ForwardError::Unreachable(error_chain(e))
    }
}

/// Which client carries a request upstream.
pub(super) enum Via<'a> {
    /// hyper-util's pooled client (anything with a body, blob downloads, `https://`).
    Pooled(&'a crate::upstream::UpstreamClient),
    /// This serving thread's lean HTTP/1.1 client (see `h1`).
    Direct(&'a crate::h1::Pool),
}

/// Why a request got no response head, by the client that carried it.
enum SendError {
    Uri(http::Error),
    /// No response head within the idle timeout after the request was sent (either client).
    HeadTimeout,
    Pooled(hyper_util::client::legacy::Error),
    Direct(crate::h1::Error),
}

/// The rustls error behind a failed `https://` connect, if that is why it failed.
/// tokio-rustls wraps it in an `io::Error` (and hyper-rustls that in another), whose
/// `source` skips the wrapped error: look inside with `get_ref`.
fn tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        cur = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

fn has_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// The error and its sources on one line: hyper's top-level errors are terse.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}
