//! How `regguard check` and `regguard scan` reach a registry the way a person's tools do: the
//! token flow of registries that answer `WWW-Authenticate: Bearer`, Basic otherwise, and every
//! failure explained as what was sent, what the registry said and what to do about it.
//!
//! Only the CLI uses this module: `serve` forwards its clients' own credentials.
//!
//! It knows nothing of checks or scans: it sends requests and explains their answers.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Limited};

use super::credentials::{CredentialError, Login};
use crate::checker::SetupError;
use crate::inspect::{registry_words, ImageError};
use crate::oci::MAX_MANIFEST_BYTES;
use crate::upstream::UpstreamBody;
use crate::upstream::{user_agent, TlsVerify, UpstreamClient};

/// How long one request of the CLI may take, head and body.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// How long a connection attempt may take before the host is called unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A token is not used in its last seconds: a request made with it may arrive after it expired.
const TOKEN_MARGIN: Duration = Duration::from_secs(10);

/// Token lifetime when the token server does not say (the distribution token spec's default).
const DEFAULT_TOKEN_SECONDS: u64 = 60;

/// Why the CLI could not do what was asked. Every kind exits 2; `NotFound` reads "not found"
/// (and is `not_found` in `check --json`). The library's errors arrive typed and are put in
/// people's words here; the explanations the CLI writes itself are text.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// The registry, repository or reference does not exist (a typo, a wrong port).
    #[error("not found: {0}")]
    NotFound(String),
    /// Could not connect, resolve, or speak TLS.
    #[error("{0}")]
    Unreachable(String),
    /// Credentials refused, or missing where the registry requires them.
    #[error("{0}")]
    Auth(String),
    /// Credentials that could not be read or used (`--user`, the docker config, a helper).
    #[error(transparent)]
    Credentials(#[from] CredentialError),
    /// The checker for the registry could not be set up.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The image's manifest could not be read.
    #[error("{}", registry_words(&.0.to_string()))]
    Image(#[from] ImageError),
    /// Anything else the registry answered.
    #[error("{0}")]
    Other(String),
}

/// How a registry asks for credentials, from its answer to `GET /v2/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `GET /v2/` answered 200: credentials, if given, are sent as Basic.
    Open,
    Basic,
    Bearer {
        realm: String,
        service: String,
    },
}

/// The parameters of a `WWW-Authenticate` value: its scheme and its `key="value"` pairs.
pub fn parse_challenge(value: &str) -> (String, HashMap<String, String>) {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_ascii_lowercase();
        if key.is_empty() {
            break;
        }
        let mut val = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.extend(chars.next()),
                    '"' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                val.push(*c);
                chars.next();
            }
        }
        params.insert(key, val.trim().to_owned());
    }
    (scheme.to_ascii_lowercase(), params)
}

/// The `host[:port]` of an absolute URL: the client regguard shares with the proxy keeps the
/// Host header it is given (the proxy passes its client's), so requests here set their own.
fn authority_of(url: &str) -> String {
    url.split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(url)
        .split(['/', '?'])
        .next()
        .unwrap_or("")
        .to_owned()
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One answer, body read (manifest-sized at most).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The first OCI error code of the body (`MANIFEST_UNKNOWN`, `NAME_UNKNOWN`, ...).
    pub fn error_code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        Some(v.get("errors")?.get(0)?.get("code")?.as_str()?.to_owned())
    }
}

/// A registry as the CLI reaches it.
pub struct RegistryAccess {
    /// `http://host:port` or `https://host:port`.
    pub base: String,
    /// `host:port` as written.
    pub host: String,
    insecure: bool,
    client: UpstreamClient,
    login: Option<Login>,
    challenge: std::sync::OnceLock<Challenge>,
    tokens: tokio::sync::Mutex<HashMap<String, (HeaderValue, Instant)>>,
}

impl RegistryAccess {
    /// `base` is `http://host[:port]` or `https://host[:port]`; `insecure` skips certificate
    /// checks (plain HTTP is the caller's decision).
    pub fn new(base: &str, insecure: bool, login: Option<Login>) -> Self {
        let verify = if insecure {
            TlsVerify::None
        } else {
            TlsVerify::System
        };
        let pools = crate::upstream::Pools::with_tls(CONNECT_TIMEOUT, verify);
        let host = base
            .split_once("://")
            .map(|(_, h)| h)
            .unwrap_or(base)
            .trim_end_matches('/')
            .to_owned();
        RegistryAccess {
            base: base.trim_end_matches('/').to_owned(),
            host,
            insecure,
            client: pools.lean().clone(),
            login,
            challenge: std::sync::OnceLock::new(),
            tokens: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// What was sent, for messages: `no credentials` or `user `alice` (from --user)`.
    pub fn sent(&self) -> String {
        match &self.login {
            Some(l) => l.describe(),
            None => "no credentials".into(),
        }
    }

    fn how_to_log_in(&self) -> String {
        format!(
            "give --user USER:PASSWORD, set REGGUARD_USER and REGGUARD_PASSWORD, or run `docker login {}`",
            self.host
        )
    }

    /// One GET, with `auth`, body read. Transport failures are explained.
    async fn send(
        &self,
        url: &str,
        accept: Option<&str>,
        auth: Option<&HeaderValue>,
    ) -> Result<Reply, Problem> {
        let mut req = Request::get(url)
            .header(header::HOST, authority_of(url))
            .header(header::USER_AGENT, user_agent())
            .body(UpstreamBody::empty())
            .map_err(|e| Problem::Other(format!("GET {url}: {e}")))?;
        if let Some(a) = accept.and_then(|a| HeaderValue::from_str(a).ok()) {
            req.headers_mut().insert(header::ACCEPT, a);
        }
        if let Some(a) = auth {
            req.headers_mut().insert(header::AUTHORIZATION, a.clone());
        }
        self.exchange(req, &format!("GET {url}"), url).await
    }

    /// Sends `req` and reads the whole answer (at most 4 MiB) within [`REQUEST_DEADLINE`].
    /// `what` names the request in errors; `target` is what a transport error is about.
    async fn exchange(
        &self,
        req: Request<UpstreamBody>,
        what: &str,
        target: &str,
    ) -> Result<Reply, Problem> {
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| Problem::Unreachable(explain_transport(&e, target)))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_MANIFEST_BYTES)
                .collect()
                .await
                .map_err(|e| Problem::Other(format!("{what}: reading the answer: {e}")))?
                .to_bytes();
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(REQUEST_DEADLINE, exchange)
            .await
            .map_err(|_| {
                Problem::Unreachable(format!(
                    "{what}: no answer within {REQUEST_DEADLINE:?}; is the address right, and is the registry overloaded?"
                ))
            })?
    }

    /// `GET /v2/`: is this a registry, and how does it want credentials? Checks the
    /// credentials once, so a wrong password is said before anything else is asked.
    pub async fn ping(&self) -> Result<Challenge, Problem> {
        let url = format!("{}/v2/", self.base);
        let reply = self.send(&url, None, None).await?;
        let challenge = match reply.status {
            s if s.is_success() => Challenge::Open,
            StatusCode::UNAUTHORIZED => {
                let www = reply
                    .headers
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let (scheme, params) = parse_challenge(www);
                match scheme.as_str() {
                    "bearer" => Challenge::Bearer {
                        realm: params.get("realm").cloned().unwrap_or_default(),
                        service: params.get("service").cloned().unwrap_or_default(),
                    },
                    _ => Challenge::Basic,
                }
            }
            StatusCode::NOT_FOUND => {
                return Err(Problem::NotFound(format!(
                    "{} answered 404 to GET /v2/: no registry API there (a typo in the host or port, or regguard's admin port instead of its public one?)",
                    self.host
                )))
            }
            s => {
                return Err(Problem::Other(format!(
                    "{} answered {s} to GET /v2/: not a registry answer{}",
                    self.host,
                    if s.is_server_error() {
                        " (is the registry behind it down?)"
                    } else {
                        ""
                    }
                )))
            }
        };
        let _ = self.challenge.set(challenge.clone());
        match (&challenge, &self.login) {
            (Challenge::Basic, Some(_)) => {
                let auth = self.authorization("").await?;
                let again = self.send(&url, None, auth.as_ref()).await?;
                if again.status == StatusCode::UNAUTHORIZED {
                    return Err(Problem::Auth(format!(
                        "401 Unauthorized from GET /v2/ on {}: sent {}, and the registry refused it; check the user name and password",
                        self.host,
                        self.sent()
                    )));
                }
            }
            (Challenge::Basic, None) => {
                return Err(Problem::Auth(format!(
                    "401 Unauthorized from GET /v2/ on {}: no credentials were sent and the registry requires them; {}",
                    self.host,
                    self.how_to_log_in()
                )))
            }
            // A token without scope checks the credentials with the token server, as `docker login` does.
            (Challenge::Bearer { .. }, Some(_)) => {
                self.authorization("").await?;
            }
            _ => {}
        }
        Ok(challenge)
    }

    /// The `Authorization` for `scope` (`repository:team/app:pull`, `registry:catalog:*`, or
    /// empty): Basic with the login, or a token from the token server, cached until it expires.
    pub async fn authorization(&self, scope: &str) -> Result<Option<HeaderValue>, Problem> {
        let bearer = match self.challenge.get() {
            Some(Challenge::Bearer { realm, service }) => (realm.clone(), service.clone()),
            _ => {
                return self
                    .login
                    .as_ref()
                    .map(|l| l.basic())
                    .transpose()
                    .map_err(|e| Problem::Auth(format!("{}: {e}", self.sent())))
            }
        };
        let mut tokens = self.tokens.lock().await;
        if let Some((t, until)) = tokens.get(scope) {
            if Instant::now() < *until {
                return Ok(Some(t.clone()));
            }
        }
        let (token, until) = self.fetch_token(&bearer.0, &bearer.1, scope).await?;
        tokens.insert(scope.to_owned(), (token.clone(), until));
        Ok(Some(token))
    }

    async fn fetch_token(
        &self,
        realm: &str,
        service: &str,
        scope: &str,
    ) -> Result<(HeaderValue, Instant), Problem> {
        if realm.is_empty() {
            return Err(Problem::Auth(format!(
                "{} asks for a token (WWW-Authenticate: Bearer) but names no realm to get it from",
                self.host
            )));
        }
        if realm.starts_with("http://") && self.login.is_some() && !self.insecure {
            return Err(Problem::Auth(format!(
                "the token server {realm} speaks plain HTTP: refusing to send {} there without --insecure",
                self.sent()
            )));
        }
        let mut url = format!(
            "{realm}{}service={}",
            if realm.contains('?') { '&' } else { '?' },
            query_escape(service)
        );
        if !scope.is_empty() {
            url.push_str(&format!("&scope={}", query_escape(scope)));
        }
        if let Some(l) = &self.login {
            if !l.identity_token {
                url.push_str(&format!("&account={}", query_escape(&l.user)));
            }
        }
        let reply = match &self.login {
            Some(l) if l.identity_token => self.refresh_token_grant(realm, service, scope, l).await,
            Some(l) => {
                let basic = l.basic()?;
                self.send(&url, None, Some(&basic)).await
            }
            None => self.send(&url, None, None).await,
        }
        .map_err(|p| match p {
            Problem::Unreachable(m) => Problem::Unreachable(format!("the token server: {m}")),
            other => other,
        })?;
        let what = if scope.is_empty() {
            "a token".to_owned()
        } else {
            format!("a token for `{scope}`")
        };
        if reply.status == StatusCode::UNAUTHORIZED || reply.status == StatusCode::FORBIDDEN {
            return Err(Problem::Auth(match &self.login {
                Some(_) => format!(
                    "{} from the token server {realm} asked for {what}: sent {}, and it was refused; check the user name and password",
                    reply.status,
                    self.sent()
                ),
                None => format!(
                    "{} from the token server {realm} asked for {what} anonymously; {}",
                    reply.status,
                    self.how_to_log_in()
                ),
            }));
        }
        if !reply.status.is_success() {
            return Err(Problem::Other(format!(
                "the token server {realm} answered {} when asked for {what}",
                reply.status
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&reply.body)
            .map_err(|e| Problem::Other(format!("the token server {realm} sent no JSON: {e}")))?;
        let token = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Problem::Other(format!("the token server {realm} sent no `token`")))?;
        let seconds = v
            .get("expires_in")
            .and_then(|e| e.as_u64())
            .unwrap_or(DEFAULT_TOKEN_SECONDS);
        let lifetime = Duration::from_secs(seconds).saturating_sub(TOKEN_MARGIN);
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            Problem::Other(format!(
                "the token server {realm} sent a token that is not a header value"
            ))
        })?;
        value.set_sensitive(true);
        Ok((value, Instant::now() + lifetime.max(Duration::from_secs(1))))
    }

    /// OAuth2 `grant_type=refresh_token` with a docker identity token (distribution's token spec).
    async fn refresh_token_grant(
        &self,
        realm: &str,
        service: &str,
        scope: &str,
        login: &Login,
    ) -> Result<Reply, Problem> {
        let form = format!(
            "grant_type=refresh_token&client_id=regguard&service={}&scope={}&refresh_token={}",
            query_escape(service),
            query_escape(scope),
            query_escape(&login.secret)
        );
        let req = Request::post(realm)
            .header(header::HOST, authority_of(realm))
            .header(header::USER_AGENT, user_agent())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(UpstreamBody::Full {
                data: Some(Bytes::from(form)),
            })
            .map_err(|e| Problem::Other(format!("POST {realm}: {e}")))?;
        self.exchange(req, &format!("POST {realm}"), realm).await
    }

    /// `GET path` with the credentials for `scope`; 401 and 403 are explained (what was sent,
    /// what the registry said, what to do). Other statuses are the caller's to judge.
    pub async fn get(
        &self,
        path: &str,
        accept: Option<&str>,
        scope: &str,
    ) -> Result<Reply, Problem> {
        let auth = self.authorization(scope).await?;
        let reply = self
            .send(&format!("{}{path}", self.base), accept, auth.as_ref())
            .await?;
        if reply.status == StatusCode::UNAUTHORIZED || reply.status == StatusCode::FORBIDDEN {
            return Err(Problem::Auth(self.refused(path, scope, &reply)));
        }
        Ok(reply)
    }

    /// Explains a 401/403 answer to `GET path`.
    pub fn refused(&self, path: &str, scope: &str, reply: &Reply) -> String {
        let said = format!("{} from GET {path}", reply.status);
        let bearer = matches!(self.challenge.get(), Some(Challenge::Bearer { .. }));
        let (_, params) = parse_challenge(
            reply
                .headers
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
        );
        let fix = if path.starts_with("/v2/_catalog") {
            "reading the catalog needs an account with catalog access (registry:catalog:*)"
        } else {
            "the account needs pull access to that repository"
        };
        match (&self.login, bearer) {
            (None, _) => format!(
                "{said}: no credentials were sent; {}",
                self.how_to_log_in()
            ),
            (Some(_), true) => format!(
                "{said}: sent a token issued for {} with scope `{scope}`, and the registry refused it{}; {fix}",
                self.sent(),
                params
                    .get("error")
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ),
            (Some(_), false) if reply.status == StatusCode::FORBIDDEN => format!(
                "{said}: sent {}; the registry knows the user but refuses this; {fix}",
                self.sent()
            ),
            (Some(_), false) => format!(
                "{said}: sent {}, and the registry refused it; check the user name and password, or {fix}",
                self.sent()
            ),
        }
    }
}

impl crate::scan::ScanAuth for RegistryAccess {
    fn authorization<'a>(
        &'a self,
        scope: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<HeaderValue>> + Send + 'a>> {
        Box::pin(async move {
            RegistryAccess::authorization(self, scope)
                .await
                .ok()
                .flatten()
        })
    }
}

/// Says why a request never got an answer: the cause (connection refused, DNS, TLS) and the fix.
pub fn explain_transport(err: &(dyn StdError + 'static), url: &str) -> String {
    let host = url
        .split_once("://")
        .map(|(_, r)| r)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or(url);
    let mut chain = Vec::new();
    let mut refused = false;
    let mut dns = false;
    let mut timed_out = false;
    let mut tls: Option<&rustls::Error> = None;
    let mut next: Option<&(dyn StdError + 'static)> = Some(err);
    let mut steps = 0;
    while let Some(e) = next {
        steps += 1;
        if steps > 16 {
            break;
        }
        let text = e.to_string();
        if !text.is_empty() && !chain.contains(&text) {
            chain.push(text.clone());
        }
        // hyper-util's connector reports a failed lookup as a private `ConnectError` whose
        // only mark is its message, over an `io::Error` of no distinct kind: the words are
        // all there is to go on.
        if text.contains("dns error") || text.contains("failed to lookup address") {
            dns = true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => refused = true,
                std::io::ErrorKind::TimedOut => timed_out = true,
                _ => {}
            }
        }
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            tls = Some(r);
        }
        // A connect timeout may arrive as a message rather than `ErrorKind::TimedOut`.
        if text.contains("timed out") {
            timed_out = true;
        }
        // io::Error::source() skips the error it wraps (a rustls error, another io::Error):
        // walk into that one instead.
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    let cause = chain.last().cloned().unwrap_or_default();
    if let Some(t) = tls {
        return match t {
            rustls::Error::InvalidMessage(_) => format!(
                "TLS handshake with {host} failed: it does not speak TLS on that port ({t}); if it serves plain HTTP, use http://{host} with --insecure"
            ),
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => format!(
                "TLS: {host}'s certificate is signed by an unknown authority; trust its CA with SSL_CERT_FILE=/path/to/ca.pem, or pass --insecure to skip verification"
            ),
            rustls::Error::InvalidCertificate(c) => format!(
                "TLS: {host}'s certificate is not acceptable ({c:?}); fix the certificate or the name used, or pass --insecure to skip verification"
            ),
            other => format!("TLS handshake with {host} failed: {other}"),
        };
    }
    if refused {
        return format!(
            "cannot connect to {host}: connection refused (nothing listens there); is the registry running, and are the host and port right?"
        );
    }
    if dns {
        let name = host.rsplit_once(':').map(|(n, _)| n).unwrap_or(host);
        return format!(
            "cannot resolve `{name}` (DNS failure: {cause}); check the registry's host name"
        );
    }
    if timed_out {
        return format!(
            "cannot connect to {host}: timed out; is the address right, or is a firewall in the way?"
        );
    }
    format!("cannot reach {host}: {}", chain.join(": "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_quoted_commas_and_bare_values() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="reg",scope="repository:a/b:pull,push",error="insufficient_scope""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        assert_eq!(p["error"], "insufficient_scope");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(
            (s.as_str(), p["realm"].as_str()),
            ("basic", "Registry Realm")
        );
        let (_, p) = parse_challenge("Bearer realm=x, service=y");
        assert_eq!((p["realm"].as_str(), p["service"].as_str()), ("x", "y"));
        assert!(parse_challenge("").1.is_empty());
    }

    #[test]
    fn query_values_are_escaped() {
        assert_eq!(
            query_escape("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }
}
