//! The admin listener: `/metrics`, `/healthz`, `/readyz`.
//!
//! Never the public listener, so metrics and probes are not reachable by
//! registry clients. Plain HTTP/1.1: Prometheus and kubelets speak it.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::body::UpstreamBody;
use crate::config::Upstream;
use crate::metrics::Metrics;
use crate::upstream::{user_agent, UpstreamClient};

/// How long `/readyz` waits for the upstream's `GET /v2/`.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// State the admin endpoints read.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub client: UpstreamClient,
    pub upstream: Upstream,
    pub integrity: Arc<crate::integrity::Integrity>,
    pub supervisor: Arc<crate::supervise::Supervisor>,
}

impl Admin {
    /// Routes one admin request.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"));
        }
        Ok(match req.uri().path() {
            "/metrics" => {
                let mut resp = Response::new(Full::new(Bytes::from(self.metrics.render())));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/integrity" => {
                let broken = self.integrity.snapshot();
                let body = serde_json::json!({ "broken": broken, "count": broken.len() });
                let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                resp
            }
            "/readyz" if !self.supervisor.down().is_empty() => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!(
                    "not ready: background task down (restarting): {}\n",
                    self.supervisor.down().join(", ")
                ),
            ),
            "/readyz" => match self.probe_upstream().await {
                Ok(status) => text(
                    StatusCode::OK,
                    &format!("ready: upstream answered {status}\n"),
                ),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("not ready: upstream {why}\n"),
                ),
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz, /readyz or /integrity\n",
            ),
        })
    }

    /// `GET /v2/` upstream: any HTTP status (200, or 401 with auth) means the registry is there.
    async fn probe_upstream(&self) -> Result<StatusCode, String> {
        let uri = self.upstream.uri_for("/v2/").map_err(|e| e.to_string())?;
        let req = Request::get(uri)
            .header(header::HOST, self.upstream.host_header.clone())
            .header(header::USER_AGENT, user_agent())
            .body(UpstreamBody::empty())
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(READY_PROBE_TIMEOUT, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp.status()),
            Ok(Err(e)) => Err(format!("unreachable: {e}")),
            Err(_) => Err(format!("did not answer within {READY_PROBE_TIMEOUT:?}")),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
