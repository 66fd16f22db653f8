//! Configuration: one set of keys, four sources.
//!
//! Every `serve` setting is a command-line flag, a `REGGUARD_<NAME>` environment
//! variable and a key of the TOML file; flags beat the environment, which beats
//! the file, which beats the defaults. Everything is validated once, at start-up,
//! into [`Settings`]; a bad value fails with a message naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use serde::Deserialize;

/// Defaults, in one place so the help text, the README and the code agree.
pub mod defaults {
    pub const LISTEN: &str = "0.0.0.0:5050";
    pub const UPSTREAM: &str = "http://registry-private:5000";
    pub const ADMIN_LISTEN: &str = "127.0.0.1:9090";
    /// nginx's `proxy_read_timeout 900` / `proxy_send_timeout 900`.
    pub const IDLE_TIMEOUT: &str = "900s";
    /// nginx's `client_header_timeout` default.
    pub const HEADER_READ_TIMEOUT: &str = "60s";
    /// Client connections open at once. Far above what a registry front serves (a few
    /// connections per pulling node or CI job), and each needs about two descriptors
    /// (client and upstream), so 4096 fit a 10,000-descriptor limit with room for the
    /// registry's own; it stops a flood of idle sockets long before the process runs out.
    pub const MAX_CONNECTIONS: usize = 4096;
    pub const CONNECT_TIMEOUT: &str = "10s";
    pub const DRAIN_TIMEOUT: &str = "120s";
    pub const VALIDATE_OK_TTL: &str = "5m";
    pub const VALIDATE_MISSING_TTL: &str = "30s";
    pub const VALIDATE_CHECK_TIMEOUT: &str = "10s";
    pub const VALIDATE_QUEUE_CAPACITY: usize = 1024;
    pub const VALIDATE_WORKERS: usize = 4;
    pub const VALIDATE_MAX_DEPTH: u32 = 4;
    pub const MAX_BROKEN_SERIES: usize = 500;
    /// Manifest bytes held at once (pushes being gated, responses being tapped). 256 MiB
    /// is 64 manifests of the registry's 4 MiB maximum (real ones are a few KiB), and
    /// keeps a flood of maximal pushes from taking more than that from a small host.
    pub const GATE_MAX_BUFFERED_MIB: usize = 256;
}

/// A configuration problem, naming the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("`{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of `regguard serve`. Each also reads `REGGUARD_<NAME>` and the TOML key of the same name.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML configuration file (keys as the flags below, with underscores).
    #[arg(long, env = "REGGUARD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Public listener address [default: 0.0.0.0:5050].
    #[arg(long, env = "REGGUARD_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// The registry to forward to, http://host:port; the host name is resolved again for every new
    /// connection [default: http://registry-private:5000].
    #[arg(long, env = "REGGUARD_UPSTREAM", value_name = "URL")]
    pub upstream: Option<String>,
    /// Admin listener for /metrics, /healthz, /readyz; never the public one [default: 127.0.0.1:9090].
    #[arg(long, env = "REGGUARD_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// PEM certificate chain; with --tls-key turns on TLS (1.2 and 1.3, ALPN h2 and http/1.1).
    #[arg(
        long,
        env = "REGGUARD_TLS_CERT",
        value_name = "PEM",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(
        long,
        env = "REGGUARD_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// How often the TLS files are checked for a change (they are also reloaded on SIGHUP)
    /// [default: 5s].
    #[arg(long, env = "REGGUARD_TLS_RELOAD_INTERVAL", value_name = "DURATION")]
    pub tls_reload_interval: Option<String>,
    /// PEM CA bundle an https:// upstream's certificate must chain to (nginx's
    /// proxy_ssl_trusted_certificate) [default: the system's CA store].
    #[arg(long, env = "REGGUARD_UPSTREAM_CA", value_name = "PEM")]
    pub upstream_ca: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, env = "REGGUARD_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Longest silence between two reads or writes of a body, on either side, and the longest wait
    /// for the upstream's response headers (nginx's proxy_read/send_timeout) [default: 900s].
    #[arg(long, env = "REGGUARD_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Longest time a client may take to send its request headers (slow-loris guard) [default: 60s].
    #[arg(long, env = "REGGUARD_HEADER_READ_TIMEOUT", value_name = "DURATION")]
    pub header_read_timeout: Option<String>,
    /// Client connections open at once; beyond it plain HTTP gets 503 with Retry-After and TLS
    /// is closed [default: 4096].
    #[arg(long, env = "REGGUARD_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Longest time to open a connection to the upstream [default: 10s].
    #[arg(long, env = "REGGUARD_CONNECT_TIMEOUT", value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// On SIGTERM/SIGINT, how long in-flight transfers may run before they are cut [default: 120s].
    #[arg(long, env = "REGGUARD_DRAIN_TIMEOUT", value_name = "DURATION")]
    pub drain_timeout: Option<String>,
    /// One log line per request (true|false) [default: true].
    #[arg(long, env = "REGGUARD_ACCESS_LOG", value_name = "BOOL")]
    pub access_log: Option<bool>,
    /// Peers (IP addresses, comma-separated) whose X-Forwarded-Proto and X-Real-IP are kept: a
    /// TLS-terminating proxy in front of regguard [default: none].
    #[arg(
        long,
        env = "REGGUARD_TRUSTED_PROXIES",
        value_name = "IPS",
        value_delimiter = ','
    )]
    pub trusted_proxies: Option<Vec<String>>,
}

/// The TOML file: the same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    upstream: Option<String>,
    admin_listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_reload_interval: Option<DurationValue>,
    upstream_ca: Option<PathBuf>,
    log_format: Option<LogFormat>,
    idle_timeout: Option<DurationValue>,
    header_read_timeout: Option<DurationValue>,
    max_connections: Option<usize>,
    connect_timeout: Option<DurationValue>,
    drain_timeout: Option<DurationValue>,
    access_log: Option<bool>,
    trusted_proxies: Option<Vec<String>>,
    #[serde(default)]
    validate: ValidateFile,
    #[serde(default)]
    metrics: MetricsFile,
    #[serde(default)]
    gate: GateFile,
    #[serde(default)]
    scan: ScanFile,
}

/// `[scan]`: the background whole-registry scan.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScanFile {
    enabled: Option<bool>,
    interval: Option<DurationValue>,
    concurrency: Option<usize>,
    rate: Option<u32>,
    page_size: Option<u32>,
    blobs: Option<bool>,
    /// A file holding `user:password` for the scan's requests.
    credentials_file: Option<PathBuf>,
}

/// `[gate]`: the push gate.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GateFile {
    mode: Option<crate::gate::GateMode>,
    on_check_error: Option<crate::gate::OnCheckError>,
    depth: Option<crate::gate::GateDepth>,
    max_references: Option<usize>,
    max_buffered_mib: Option<usize>,
}

fn gate_env<T: serde::de::DeserializeOwned>(
    key: &'static str,
    name: &str,
) -> Result<Option<T>, ConfigError> {
    match section_env("gate", name) {
        None => Ok(None),
        Some(v) => T::deserialize(
            serde::de::value::StrDeserializer::<serde::de::value::Error>::new(v.trim()),
        )
        .map(Some)
        .map_err(|e| invalid(key, format!("REGGUARD_GATE_{}: {e}", name.to_uppercase()))),
    }
}

/// `[validate]`: serve-time index validation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ValidateFile {
    enabled: Option<bool>,
    blobs: Option<bool>,
    ok_ttl: Option<DurationValue>,
    missing_ttl: Option<DurationValue>,
    queue_capacity: Option<usize>,
    workers: Option<usize>,
    max_depth: Option<u32>,
    max_references: Option<usize>,
    check_timeout: Option<DurationValue>,
}

/// `[metrics]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsFile {
    instance: Option<String>,
    max_broken_series: Option<usize>,
}

/// A duration in the file: `"900s"`, `"15m"`, or a number of seconds.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DurationValue {
    Seconds(u64),
    Text(String),
}

impl DurationValue {
    fn into_text(self) -> String {
        match self {
            DurationValue::Seconds(s) => format!("{s}s"),
            DurationValue::Text(t) => t,
        }
    }
}

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

/// PEM files for TLS termination.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Validated settings of `regguard serve`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub upstream: Upstream,
    pub admin_listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    /// How often the TLS files are checked for a change.
    pub tls_reload_interval: Duration,
    /// CA bundle for an `https://` upstream (else the system's store).
    pub upstream_ca: Option<PathBuf>,
    pub log_format: LogFormat,
    pub idle_timeout: Duration,
    pub header_read_timeout: Duration,
    /// Client connections open at once.
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub drain_timeout: Duration,
    pub access_log: bool,
    /// Peers whose forwarding headers are trusted.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    pub validate: ValidateSettings,
    pub metrics: MetricsSettings,
    pub gate: crate::gate::GateSettings,
    pub scan: crate::scan::ScanSettings,
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

/// Validated `[validate]` settings.
#[derive(Debug, Clone)]
pub struct ValidateSettings {
    /// Validate every index served (default true).
    pub enabled: bool,
    /// Also check image manifests' config and layer blobs (default true).
    pub blobs: bool,
    /// How long a present reference is trusted (default 5m).
    pub ok_ttl: Duration,
    /// How long a missing reference is trusted, and how often broken ones are re-checked (default 30s).
    pub missing_ttl: Duration,
    /// Validation jobs waiting at most; more are dropped and counted (default 1024).
    pub queue_capacity: usize,
    /// Validation jobs running at once (default 4).
    pub workers: usize,
    /// Nesting depth of indexes followed (default 4).
    pub max_depth: u32,
    /// Distinct references one validation may ask about.
    pub max_references: usize,
    /// Longest wait for one upstream check (default 10s).
    pub check_timeout: Duration,
}

/// Validated `[metrics]` settings.
#[derive(Debug, Clone)]
pub struct MetricsSettings {
    /// The `instance` label of the probe-compatible gauges (default: the host name).
    pub instance: String,
    /// At most this many `regguard_broken_reference_info` series (default 500).
    pub max_broken_series: usize,
}

/// `REGGUARD_<SECTION>_<KEY>` from the environment, for keys that have no flag.
fn section_env(section: &str, key: &str) -> Option<String> {
    std::env::var(format!("REGGUARD_{section}_{key}").to_uppercase()).ok()
}

fn parse_env<T: std::str::FromStr>(
    key: &'static str,
    section: &str,
    name: &str,
) -> Result<Option<T>, ConfigError> {
    match section_env(section, name) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            invalid(
                key,
                format!(
                    "REGGUARD_{}_{}=`{v}` is not valid",
                    section.to_uppercase(),
                    name.to_uppercase()
                ),
            )
        }),
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "regguard".to_string())
}

impl Settings {
    /// Merges flags/env (already merged by clap) over the file over the defaults, and validates.
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args.clone(), file)
    }

    /// Parses settings from TOML text alone (file over defaults).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let file = parse_file(Path::new("<inline>"), text)?;
        Self::merge(ServeArgs::default(), file)
    }

    fn merge(args: ServeArgs, file: FileConfig) -> Result<Self, ConfigError> {
        let pick = |flag: Option<String>, file: Option<String>, default: &str| {
            flag.or(file).unwrap_or_else(|| default.to_string())
        };
        let listen = pick(args.listen, file.listen, defaults::LISTEN);
        let upstream = pick(args.upstream, file.upstream, defaults::UPSTREAM);
        let admin_listen = pick(args.admin_listen, file.admin_listen, defaults::ADMIN_LISTEN);
        let duration = |key: &'static str,
                        flag: Option<String>,
                        file: Option<DurationValue>,
                        default: &str|
         -> Result<Duration, ConfigError> {
            let text = flag
                .or(file.map(DurationValue::into_text))
                .unwrap_or_else(|| default.to_string());
            let d = humantime::parse_duration(text.trim()).map_err(|e| {
                invalid(
                    key,
                    format!("`{text}` is not a duration ({e}); try \"30s\" or \"15m\""),
                )
            })?;
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
            Ok(d)
        };
        let tls = match (
            args.tls_cert.or(file.tls_cert),
            args.tls_key.or(file.tls_key),
        ) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid("tls_key", "tls_cert is set but tls_key is not"))
            }
            (None, Some(_)) => {
                return Err(invalid("tls_cert", "tls_key is set but tls_cert is not"))
            }
        };
        let v = file.validate;
        let env_duration =
            |key: &'static str, name: &str, file: Option<DurationValue>, default: &str| {
                duration(key, section_env("validate", name), file, default)
            };
        let validate = ValidateSettings {
            enabled: parse_env("validate.enabled", "validate", "enabled")?
                .or(v.enabled)
                .unwrap_or(true),
            blobs: parse_env("validate.blobs", "validate", "blobs")?
                .or(v.blobs)
                .unwrap_or(true),
            ok_ttl: env_duration(
                "validate.ok_ttl",
                "ok_ttl",
                v.ok_ttl,
                defaults::VALIDATE_OK_TTL,
            )?,
            missing_ttl: env_duration(
                "validate.missing_ttl",
                "missing_ttl",
                v.missing_ttl,
                defaults::VALIDATE_MISSING_TTL,
            )?,
            queue_capacity: parse_env("validate.queue_capacity", "validate", "queue_capacity")?
                .or(v.queue_capacity)
                .unwrap_or(defaults::VALIDATE_QUEUE_CAPACITY),
            workers: parse_env("validate.workers", "validate", "workers")?
                .or(v.workers)
                .unwrap_or(defaults::VALIDATE_WORKERS),
            max_depth: parse_env("validate.max_depth", "validate", "max_depth")?
                .or(v.max_depth)
                .unwrap_or(defaults::VALIDATE_MAX_DEPTH),
            max_references: parse_env("validate.max_references", "validate", "max_references")?
                .or(v.max_references)
                .unwrap_or(crate::checker::DEFAULT_MAX_REFERENCES),
            check_timeout: env_duration(
                "validate.check_timeout",
                "check_timeout",
                v.check_timeout,
                defaults::VALIDATE_CHECK_TIMEOUT,
            )?,
        };
        if validate.queue_capacity == 0 {
            return Err(invalid("validate.queue_capacity", "must be at least 1"));
        }
        if validate.workers == 0 {
            return Err(invalid("validate.workers", "must be at least 1"));
        }
        if validate.max_depth == 0 {
            return Err(invalid("validate.max_depth", "must be at least 1"));
        }
        if validate.max_references == 0 {
            return Err(invalid("validate.max_references", "must be at least 1"));
        }
        let m = file.metrics;
        let metrics = MetricsSettings {
            instance: section_env("metrics", "instance")
                .or(m.instance)
                .unwrap_or_else(host_name),
            max_broken_series: parse_env(
                "metrics.max_broken_series",
                "metrics",
                "max_broken_series",
            )?
            .or(m.max_broken_series)
            .unwrap_or(defaults::MAX_BROKEN_SERIES),
        };
        let g = file.gate;
        let gate = crate::gate::GateSettings {
            mode: gate_env("gate.mode", "mode")?
                .or(g.mode)
                .unwrap_or(crate::gate::GateMode::Enforce),
            on_check_error: gate_env("gate.on_check_error", "on_check_error")?
                .or(g.on_check_error)
                .unwrap_or(crate::gate::OnCheckError::Reject),
            depth: gate_env("gate.depth", "depth")?
                .or(g.depth)
                .unwrap_or(crate::gate::GateDepth::Deep),
            max_depth: validate.max_depth,
            max_references: parse_env("gate.max_references", "gate", "max_references")?
                .or(g.max_references)
                .unwrap_or(crate::checker::DEFAULT_MAX_REFERENCES),
            max_buffered_bytes: parse_env("gate.max_buffered_mib", "gate", "max_buffered_mib")?
                .or(g.max_buffered_mib)
                .unwrap_or(defaults::GATE_MAX_BUFFERED_MIB)
                .saturating_mul(1024 * 1024),
        };
        if gate.max_references == 0 {
            return Err(invalid("gate.max_references", "must be at least 1"));
        }
        if gate.max_buffered_bytes < crate::oci::MAX_MANIFEST_BYTES {
            return Err(invalid(
                "gate.max_buffered_mib",
                "must be at least 4 (one manifest of the registry's maximum size)",
            ));
        }
        let sc = file.scan;
        let scan_auth = match (
            section_env("scan", "user"),
            section_env("scan", "password"),
            &sc.credentials_file,
        ) {
            (Some(u), Some(p), _) => Some(
                basic_auth(&format!("{u}:{p}")).map_err(|e| invalid("scan.credentials_file", e))?,
            ),
            (_, _, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    invalid("scan.credentials_file", format!("{}: {e}", path.display()))
                })?;
                if !text.contains(':') {
                    return Err(invalid(
                        "scan.credentials_file",
                        format!("{}: expected user:password", path.display()),
                    ));
                }
                Some(basic_auth(text.trim()).map_err(|e| invalid("scan.credentials_file", e))?)
            }
            _ => None,
        };
        let scan = crate::scan::ScanSettings {
            enabled: parse_env("scan.enabled", "scan", "enabled")?
                .or(sc.enabled)
                .unwrap_or(false),
            interval: duration(
                "scan.interval",
                section_env("scan", "interval"),
                sc.interval,
                "15m",
            )?,
            concurrency: parse_env("scan.concurrency", "scan", "concurrency")?
                .or(sc.concurrency)
                .unwrap_or(4),
            rate: parse_env("scan.rate", "scan", "rate")?
                .or(sc.rate)
                .unwrap_or(50),
            page_size: parse_env("scan.page_size", "scan", "page_size")?
                .or(sc.page_size)
                .unwrap_or(100),
            blobs: parse_env("scan.blobs", "scan", "blobs")?
                .or(sc.blobs)
                .unwrap_or(true),
            auth: scan_auth,
        };
        if scan.concurrency == 0 || scan.rate == 0 || scan.page_size == 0 {
            return Err(invalid(
                "scan",
                "concurrency, rate and page_size must be at least 1",
            ));
        }
        let trusted_proxies = args
            .trusted_proxies
            .or(file.trusted_proxies)
            .unwrap_or_default()
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim()
                    .parse()
                    .map_err(|_| invalid("trusted_proxies", format!("`{s}` is not an IP address")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let settings = Settings {
            trusted_proxies,
            scan,
            gate,
            validate,
            metrics,
            listen: parse_addr("listen", &listen)?,
            upstream: Upstream::parse(&upstream)?,
            admin_listen: parse_addr("admin_listen", &admin_listen)?,
            tls,
            tls_reload_interval: duration(
                "tls_reload_interval",
                args.tls_reload_interval,
                file.tls_reload_interval,
                "5s",
            )?,
            upstream_ca: args.upstream_ca.or(file.upstream_ca),
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            idle_timeout: duration(
                "idle_timeout",
                args.idle_timeout,
                file.idle_timeout,
                defaults::IDLE_TIMEOUT,
            )?,
            header_read_timeout: duration(
                "header_read_timeout",
                args.header_read_timeout,
                file.header_read_timeout,
                defaults::HEADER_READ_TIMEOUT,
            )?,
            max_connections: match args.max_connections.or(file.max_connections) {
                Some(0) => return Err(invalid("max_connections", "must be at least 1")),
                n => n.unwrap_or(defaults::MAX_CONNECTIONS),
            },
            connect_timeout: duration(
                "connect_timeout",
                args.connect_timeout,
                file.connect_timeout,
                defaults::CONNECT_TIMEOUT,
            )?,
            drain_timeout: duration(
                "drain_timeout",
                args.drain_timeout,
                file.drain_timeout,
                defaults::DRAIN_TIMEOUT,
            )?,
            access_log: args.access_log.or(file.access_log).unwrap_or(true),
        };
        // Port 0 twice means two ephemeral ports, which always differ.
        if settings.listen == settings.admin_listen && settings.listen.port() != 0 {
            return Err(invalid(
                "admin_listen",
                "must differ from `listen`: metrics are never served on the public listener",
            ));
        }
        Ok(settings)
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(path, &text)
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn parse_addr(key: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            key,
            format!(
                "`{value}` is not an address of the form IP:PORT (e.g. 0.0.0.0:5050 or [::]:5050)"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_nginx_front() {
        let s = Settings::from_toml("").unwrap();
        assert_eq!(s.listen.to_string(), "0.0.0.0:5050");
        assert_eq!(s.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(s.upstream.authority.as_str(), "registry-private:5000");
        assert_eq!(s.idle_timeout, Duration::from_secs(900));
        assert!(s.tls.is_none());
        assert!(s.access_log);
    }

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let file: FileConfig = toml::from_str(
            "listen = \"127.0.0.1:7000\"\nupstream = \"http://reg:5000\"\nidle_timeout = 30\n",
        )
        .unwrap();
        let args = ServeArgs {
            listen: Some("127.0.0.1:7001".into()),
            ..Default::default()
        };
        let s = Settings::merge(args, file).unwrap();
        assert_eq!(s.listen.port(), 7001);
        assert_eq!(s.upstream.authority.as_str(), "reg:5000");
        assert_eq!(s.idle_timeout, Duration::from_secs(30));
    }

    #[test]
    fn validate_section_defaults_and_overrides() {
        let s = Settings::from_toml("").unwrap();
        assert!(s.validate.enabled && s.validate.blobs);
        assert_eq!(s.validate.ok_ttl, Duration::from_secs(300));
        assert_eq!(s.validate.missing_ttl, Duration::from_secs(30));
        assert_eq!(s.validate.max_depth, 4);
        assert_eq!(s.metrics.max_broken_series, 500);
        let s = Settings::from_toml("[validate]\nenabled = false\nmissing_ttl = \"2s\"\nworkers = 9\n[metrics]\ninstance = \"a\"\n").unwrap();
        assert!(!s.validate.enabled);
        assert_eq!(s.validate.missing_ttl, Duration::from_secs(2));
        assert_eq!(s.validate.workers, 9);
        assert_eq!(s.metrics.instance, "a");
        let err = Settings::from_toml("[validate]\nworkers = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("`validate.workers`"), "{err}");
        let err = Settings::from_toml("[validate]\nwokers = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("wokers"), "{err}");
    }

    #[test]
    fn gate_section_defaults_and_values() {
        use crate::gate::{GateDepth, GateMode, OnCheckError};
        let s = Settings::from_toml("").unwrap();
        assert_eq!(s.gate.mode, GateMode::Enforce);
        assert_eq!(s.gate.on_check_error, OnCheckError::Reject);
        assert_eq!(s.gate.depth, GateDepth::Deep);
        let s = Settings::from_toml(
            "[gate]\nmode = \"audit\"\non_check_error = \"allow\"\ndepth = \"shallow\"\n",
        )
        .unwrap();
        assert_eq!(s.gate.mode, GateMode::Audit);
        assert_eq!(s.gate.on_check_error, OnCheckError::Allow);
        assert_eq!(s.gate.depth, GateDepth::Shallow);
        assert!(Settings::from_toml("[gate]\nmode = \"strict\"\n").is_err());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Settings::from_toml("listne = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listne"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = Settings::from_toml("listen = \"nope\"")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("`listen`"), "{err}");
        let err = Settings::from_toml("upstream = \"ftp://r:5000\"")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("`upstream`"), "{err}");
        let err = Settings::from_toml("idle_timeout = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("`idle_timeout`"), "{err}");
        let err = Settings::from_toml("tls_cert = \"/c.pem\"")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("`tls_key`"), "{err}");
        let err = Settings::from_toml("admin_listen = \"0.0.0.0:5050\"")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("`admin_listen`"), "{err}");
    }

    #[test]
    fn upstream_uri_keeps_path_and_query_bytes() {
        let up = Upstream::parse("http://reg:5000").unwrap();
        let uri = up
            .uri_for("/v2/a/blobs/uploads/x?_state=AbC%3D%3D&digest=sha256%3A00")
            .unwrap();
        assert_eq!(
            uri.to_string(),
            "http://reg:5000/v2/a/blobs/uploads/x?_state=AbC%3D%3D&digest=sha256%3A00"
        );
    }
}
