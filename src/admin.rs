//! The admin listener: `/metrics`, `/healthz`, `/readyz`.
//!
//! Never the public listener, so metrics and probes are not reachable by
//! registry clients. Plain HTTP/1.1: Prometheus and kubelets speak it.
//!
//! It shows state kept elsewhere (metrics, the integrity state, the supervisor, the
//! validator for delete notifications) and knows nothing of the request path or of how that
//! state is kept.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::config::Upstream;
use crate::metrics::Metrics;
use crate::upstream::UpstreamBody;
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
    /// Told of the registry's delete notifications.
    pub validator: Arc<crate::validate::Validator>,
    /// Forgets what the registry says was deleted on purpose.
    pub vault: Option<Arc<crate::vault::Vault>>,
}

/// The largest notification envelope read (the registry sends a few events at a time).
const MAX_NOTIFICATION_BYTES: usize = 1024 * 1024;

/// distribution's notification envelope (`application/vnd.docker.distribution.events.v1+json`);
/// only what regguard acts on.
#[derive(serde::Deserialize)]
struct Envelope {
    #[serde(default)]
    events: Vec<Event>,
}

#[derive(serde::Deserialize)]
struct Event {
    #[serde(default)]
    action: String,
    #[serde(default)]
    target: Target,
}

#[derive(Default, serde::Deserialize)]
struct Target {
    #[serde(default)]
    repository: String,
    #[serde(default)]
    digest: String,
}

impl Admin {
    /// Routes one admin request.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        if *req.method() == Method::POST && req.uri().path() == "/notifications" {
            return Ok(self.notification(req).await);
        }
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

    /// `POST /notifications`: the registry's own event envelope (its `notifications.endpoints`).
    /// A delete made directly on the registry drops what regguard cached about that
    /// repository and re-validates the indexes it knows there, as a DELETE through regguard does.
    async fn notification(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        use http_body_util::BodyExt;
        let body = match http_body_util::Limited::new(req.into_body(), MAX_NOTIFICATION_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("cannot read body: {e}\n")),
        };
        let envelope: Envelope = match serde_json::from_slice(&body) {
            Ok(e) => e,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    &format!("not a notification envelope: {e}\n"),
                )
            }
        };
        if let Some(vault) = &self.vault {
            for e in envelope.events.iter().filter(|e| e.action == "delete") {
                if !e.target.repository.is_empty() && !e.target.digest.is_empty() {
                    vault.forget(&e.target.repository, &e.target.digest).await;
                }
            }
        }
        let mut repositories: Vec<&str> = envelope
            .events
            .iter()
            .filter(|e| e.action == "delete" && !e.target.repository.is_empty())
            .map(|e| e.target.repository.as_str())
            .collect();
        repositories.sort_unstable();
        repositories.dedup();
        for repo in &repositories {
            tracing::info!(repository = %repo, "registry notified a delete: re-validating");
            self.validator.deleted(repo, None);
        }
        text(StatusCode::OK, "ok\n")
    }

    /// `GET /v2/` upstream: any HTTP status (200, or 401 with auth) means the registry is there.
    async fn probe_upstream(&self) -> Result<StatusCode, ProbeError> {
        let uri = self.upstream.uri_for("/v2/").map_err(ProbeError::Request)?;
        let req = Request::get(uri)
            .header(header::HOST, self.upstream.host_header.clone())
            .header(header::USER_AGENT, user_agent())
            .body(UpstreamBody::empty())
            .map_err(ProbeError::Request)?;
        match tokio::time::timeout(READY_PROBE_TIMEOUT, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp.status()),
            Ok(Err(e)) => Err(ProbeError::Unreachable(e)),
            Err(_) => Err(ProbeError::Deadline),
        }
    }
}

/// Why the readiness probe found the upstream not there (said after "not ready: upstream").
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("{0}")]
    Request(#[source] http::Error),
    #[error("unreachable: {0}")]
    Unreachable(#[source] hyper_util::client::legacy::Error),
    #[error("did not answer within {READY_PROBE_TIMEOUT:?}")]
    Deadline,
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
