//! The registry regguard forwards to (and the CLI talks to), and `Basic` credentials.

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};

use super::{invalid, ConfigError};

/// Where the upstream registry is.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    /// `Host` to send when the client sent none (HTTP/1.0 without Host).
    pub host_header: HeaderValue,
}

impl Upstream {
    /// Parses `http://host:port` or `https://host:port` (verified against `upstream_ca`
    /// or the system's CA store, by the host name given here).
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let uri: Uri = url
            .parse()
            .map_err(|e| invalid("upstream", format!("`{url}` is not a URL: {e}")))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            _ => {
                return Err(invalid(
                    "upstream",
                    format!("`{url}`: give an http:// or https:// URL"),
                ))
            }
        };
        let Some(authority) = uri.authority().cloned() else {
            return Err(invalid("upstream", format!("`{url}` has no host")));
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(invalid(
                "upstream",
                format!("`{url}`: give only scheme, host and port; the registry API lives at /v2/"),
            ));
        }
        let host_header = HeaderValue::from_str(authority.as_str())
            .map_err(|e| invalid("upstream", e.to_string()))?;
        Ok(Upstream {
            scheme,
            authority,
            host_header,
        })
    }

    /// Parses a registry URL for the CLI: `http://` or `https://`.
    pub fn parse_registry(url: &str) -> Result<Self, ConfigError> {
        match url.strip_prefix("https://") {
            Some(rest) => {
                let mut up = Self::parse(&format!("http://{rest}"))?;
                up.scheme = Scheme::HTTPS;
                Ok(up)
            }
            None => Self::parse(url),
        }
    }

    /// The upstream URI for a client's path and query, kept byte for byte.
    pub fn uri_for(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
    }
}

/// `Basic` credentials from `user:password`.
pub fn basic_auth(user_colon_password: &str) -> Result<HeaderValue, String> {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD
        .encode(user_colon_password.trim_end_matches(['\n', '\r']));
    let mut v = HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|e| e.to_string())?;
    v.set_sensitive(true);
    Ok(v)
}
