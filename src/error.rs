//! Errors: typed inside, one OCI error envelope outside.
//!
//! Every response regguard produces by itself (as opposed to relaying the
//! registry's) is rendered by [`oci_error`], so clients always see the
//! distribution error shape `{"errors":[{"code","message","detail"}]}`.
//!
//! It knows nothing of the request path that raises these errors: only how each is
//! labelled ([`ErrorKind`]) and answered.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::ResponseBody;
use crate::metrics::ErrorKind;

/// Why forwarding a request failed, tagged with the side it came from.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The upstream could not be connected to (refused, unresolvable, reset before a response).
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    /// An `https://` upstream's TLS handshake failed (most often: its certificate is not trusted).
    #[error("upstream TLS handshake failed: {0}")]
    UpstreamTls(String),
    /// The upstream did not connect, or did not answer, within the configured timeout.
    #[error("upstream timed out ({stage}) after {after:?}")]
    Timeout {
        stage: &'static str,
        after: std::time::Duration,
    },
    /// The client went away or broke its request body before the upstream answered.
    #[error("client aborted the request: {0}")]
    ClientAborted(String),
}

impl ForwardError {
    /// Short, bounded label used in metrics and logs.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ForwardError::Unreachable(_) | ForwardError::UpstreamTls(_) => ErrorKind::Unreachable,
            ForwardError::Timeout { .. } => ErrorKind::Timeout,
            ForwardError::ClientAborted(_) => ErrorKind::ClientAborted,
        }
    }

    /// The response the client gets for this failure.
    pub fn to_response(&self) -> Response<ResponseBody> {
        match self {
            ForwardError::Unreachable(_) => oci_error(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                "the registry behind this proxy is unreachable",
            ),
            // An operator's configuration problem, so say which: the certificate's fault names no secret.
            ForwardError::UpstreamTls(why) => oci_error(
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
                &format!(
                    "the registry behind this proxy failed TLS verification ({why}); \
                     trust its CA with --upstream-ca"
                ),
            ),
            ForwardError::Timeout { .. } => oci_error(
                StatusCode::GATEWAY_TIMEOUT,
                "UNAVAILABLE",
                "the registry behind this proxy did not answer in time",
            ),
            // The client is most likely gone; if it is still listening, its request was bad.
            ForwardError::ClientAborted(_) => oci_error(
                StatusCode::BAD_REQUEST,
                "UNKNOWN",
                "the request body ended before it was complete",
            ),
        }
    }
}

/// Renders one OCI/distribution error envelope with the given status.
pub fn oci_error(status: StatusCode, code: &str, message: &str) -> Response<ResponseBody> {
    oci_errors(
        status,
        vec![serde_json::json!({ "code": code, "message": message, "detail": null })],
    )
}

/// Renders an envelope with several errors (each `{code, message, detail}`).
pub fn oci_errors(status: StatusCode, errors: Vec<serde_json::Value>) -> Response<ResponseBody> {
    let body = serde_json::json!({ "errors": errors });
    let bytes = Bytes::from(body.to_string());
    let mut resp = Response::new(ResponseBody::full(bytes));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn envelope_has_distribution_shape_and_status() {
        let resp = oci_error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", "down");
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNAVAILABLE");
        assert_eq!(v["errors"][0]["message"], "down");
    }

    #[test]
    fn timeout_maps_to_504_and_unreachable_to_502() {
        let t = ForwardError::Timeout {
            stage: "response",
            after: std::time::Duration::from_secs(1),
        }
        .to_response();
        assert_eq!(t.status(), StatusCode::GATEWAY_TIMEOUT);
        let u = ForwardError::Unreachable("x".into()).to_response();
        assert_eq!(u.status(), StatusCode::BAD_GATEWAY);
    }
}
