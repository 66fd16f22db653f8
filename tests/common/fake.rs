//! A misbehaving upstream for tests: answers what a handler says, and forwards
//! everything else to a real registry. Lets a test make the registry lie
//! (wrong digests, non-JSON manifests, 401 to regguard's own checks).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::http::{client, full, rt};

/// A canned answer: status, headers, body.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

pub type Handler = Arc<dyn Fn(&Method, &str, &HeaderMap) -> Option<Answer> + Send + Sync>;

pub struct FakeUpstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUpstream {
    /// Starts the fake; requests the handler declines go to `fallback` (a registry URL).
    pub fn start(handler: Handler, fallback: Option<String>) -> Self {
        let listener = rt()
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let task = rt().spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let (handler, fallback) = (handler.clone(), fallback.clone());
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let (handler, fallback) = (handler.clone(), fallback.clone());
                            async move { Ok::<_, Infallible>(serve(req, handler, fallback).await) }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        FakeUpstream { addr, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve(
    req: Request<hyper::body::Incoming>,
    handler: Handler,
    fallback: Option<String>,
) -> Response<Full<Bytes>> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if let Some(a) = handler(req.method(), req.uri().path(), req.headers()) {
        let mut resp = Response::builder().status(a.status);
        for (k, v) in &a.headers {
            resp = resp.header(k, v);
        }
        return resp.body(Full::new(a.body)).unwrap();
    }
    let Some(base) = fallback else {
        return Response::builder()
            .status(404)
            .body(Full::new(Bytes::new()))
            .unwrap();
    };
    let (parts, body) = req.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    let mut up = Request::builder()
        .method(parts.method)
        .uri(format!("{base}{pq}"));
    for (k, v) in &parts.headers {
        if k != "host" {
            up = up.header(k, v);
        }
    }
    let resp = client()
        .request(up.body(full(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, Full::new(body))
}
