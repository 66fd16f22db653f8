//! Configuration: one set of keys, four sources.
//!
//! Every `serve` setting is a key of the TOML file and a `REGGUARD_<SECTION>_<KEY>` environment
//! variable (`REGGUARD_<KEY>` at the top level, where each key is also a flag); flags beat the
//! environment, which beats the file, which beats the defaults. The keys live in one table
//! ([`keys::KEYS`]), from which help, the README's table and the unknown-name checks come.
//! Everything is validated once, at start-up, into [`Settings`]; a bad value fails with a
//! message naming the key.
//!
//! Adding a key: a row in [`keys::KEYS`], a field in its section's settings struct, and the
//! line in `sections.rs` that reads it (a unit test fails while a row is unread). Then
//! `CONFIG_TABLE_BLESS=1 cargo test --test config` rewrites the README's table.
//!
//! It must not know about requests, listeners or the process environment (the binary passes
//! the `REGGUARD_*` variables in as an [`Environment`]).

pub mod features;
pub mod keys;
mod sections;
mod sources;
mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use features::{HealSettings, VaultLocation, VaultSettings};
pub use sources::{Environment, ServeArgs, Source};
pub use upstream::{basic_auth, Upstream};

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
    #[error(
        "unknown environment variable {name}{hint}; `regguard serve --help` lists the ones regguard reads"
    )]
    UnknownEnv { name: String, hint: String },
}

pub(crate) fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
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
    pub gate: features::GateSettings,
    pub scan: features::ScanSettings,
    pub vault: features::VaultSettings,
    pub heal: features::HealSettings,
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

impl Settings {
    /// Merges flags over the environment over `--config`'s file over the defaults, and
    /// validates. An unknown `REGGUARD_*` variable is an error.
    pub fn load(args: &ServeArgs, env: &Environment) -> Result<Self, ConfigError> {
        let text = read_config(args)?;
        let file = text.as_ref().map(|(p, t)| (p.as_path(), t.as_str()));
        let settings = Self::from_sources(args, env, file)?;
        sections::check_files(&settings)?;
        Ok(settings)
    }

    /// Parses settings from TOML text alone (file over defaults; no environment; TLS files are
    /// not opened).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_sources(
            &ServeArgs::default(),
            &Environment::default(),
            Some((Path::new("<inline>"), text)),
        )
    }

    /// Flags over `env` over the file's text over the defaults.
    pub fn from_sources(
        args: &ServeArgs,
        env: &Environment,
        file: Option<(&Path, &str)>,
    ) -> Result<Self, ConfigError> {
        sections::settings(&merged(args, env, file)?)
    }
}

/// One line of the effective settings: a key, its value as TOML (secrets masked; `None` when
/// unset) and where the value came from.
pub type Effective = (&'static keys::Key, Option<toml::Value>, Source);

/// Validates like [`Settings::load`] and returns, for each key, the value in effect.
pub fn effective(args: &ServeArgs, env: &Environment) -> Result<Vec<Effective>, ConfigError> {
    let text = read_config(args)?;
    let m = merged(
        args,
        env,
        text.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
    )?;
    sections::check_files(&sections::settings(&m)?)?;
    Ok(m.effective())
}

/// The effective settings as a TOML file an operator can read (and reuse), each value
/// followed by its source; scan credentials from the environment are named, never shown.
pub fn render_effective(lines: &[Effective], env: &Environment) -> String {
    let mut out =
        String::from("# effective settings: flag > REGGUARD_* environment > file > default\n");
    let mut section = None;
    for (key, value, source) in lines {
        if key.section() != section {
            section = key.section();
            out.push_str(&format!("\n[{}]\n", section.unwrap_or_default()));
        }
        let from = match source {
            Source::Default => "default".to_string(),
            Source::File => "file".to_string(),
            Source::Env => key.env(),
            Source::Flag => format!("--{}", key.flag.unwrap_or(key.key)),
        };
        match value {
            Some(v) => out.push_str(&format!("{} = {v}  # {from}\n", key.name())),
            None => out.push_str(&format!(
                "# {} is unset: {}\n",
                key.name(),
                unset_means(key)
            )),
        }
    }
    for name in ["REGGUARD_SCAN_USER", "REGGUARD_SCAN_PASSWORD"] {
        if let Some(v) = env.get(name) {
            let shown = match name.ends_with("PASSWORD") {
                true => "********".to_string(),
                false => v.to_string(),
            };
            out.push_str(&format!("# {name} = {shown}\n"));
        }
    }
    out
}

fn unset_means(key: &keys::Key) -> &'static str {
    match key.default {
        keys::Default::Unset(what) | keys::Default::Value(what) => what,
    }
}

fn read_config(args: &ServeArgs) -> Result<Option<(PathBuf, String)>, ConfigError> {
    match &args.config {
        None => Ok(None),
        Some(path) => std::fs::read_to_string(path)
            .map(|text| Some((path.clone(), text)))
            .map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            }),
    }
}

fn merged(
    args: &ServeArgs,
    env: &Environment,
    file: Option<(&Path, &str)>,
) -> Result<sources::Merged, ConfigError> {
    env.check_known()?;
    let table = match file {
        None => None,
        Some((path, text)) => Some((
            path,
            text.parse::<toml::Table>()
                .map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?,
        )),
    };
    sources::Merged::new(args, env, table)
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
        let file =
            "listen = \"127.0.0.1:7000\"\nupstream = \"http://reg:5000\"\nidle_timeout = 30\n";
        let args = ServeArgs::default().with("listen", "127.0.0.1:7001");
        let s =
            Settings::from_sources(&args, &Environment::default(), Some((Path::new("f"), file)))
                .unwrap();
        assert_eq!(s.listen.port(), 7001);
        assert_eq!(s.upstream.authority.as_str(), "reg:5000");
        assert_eq!(s.idle_timeout, Duration::from_secs(30));
    }

    fn env(pairs: &[(&str, &str)]) -> Environment {
        Environment::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn environment_beats_file_in_every_section() {
        let file = "[validate]\nok_ttl = \"1m\"\n[gate]\nmode = \"off\"\n";
        let e = env(&[
            ("REGGUARD_VALIDATE_OK_TTL", "2m"),
            ("REGGUARD_GATE_MODE", "audit"),
            ("REGGUARD_SCAN_CREDENTIALS_FILE", "/nonexistent/creds"),
        ]);
        let s = Settings::from_sources(&ServeArgs::default(), &e, Some((Path::new("f"), file)));
        let err = s.unwrap_err().to_string();
        assert!(err.starts_with("`scan.credentials_file`"), "{err}");
        let e = env(&[
            ("REGGUARD_VALIDATE_OK_TTL", "2m"),
            ("REGGUARD_GATE_MODE", "audit"),
        ]);
        let s = Settings::from_sources(&ServeArgs::default(), &e, Some((Path::new("f"), file)))
            .unwrap();
        assert_eq!(s.validate.ok_ttl, Duration::from_secs(120));
        assert_eq!(s.gate.mode, super::features::GateMode::Audit);
    }

    #[test]
    fn every_key_is_read_and_every_default_is_valid() {
        let m = merged(&ServeArgs::default(), &Environment::default(), None).unwrap();
        sections::settings(&m).unwrap();
        assert_eq!(
            m.unread(),
            Vec::<&str>::new(),
            "table rows no section reads"
        );
        let gate_refs = keys::find("gate.max_references").unwrap().default;
        assert_eq!(
            gate_refs,
            keys::Default::Value("4096"),
            "checker::DEFAULT_MAX_REFERENCES is {}",
            crate::checker::DEFAULT_MAX_REFERENCES
        );
        assert_eq!(crate::checker::DEFAULT_MAX_REFERENCES, 4096);
    }

    #[test]
    fn every_choice_is_accepted() {
        for k in keys::KEYS {
            if let keys::Kind::Choice(words) = k.kind {
                for w in words {
                    let e = env(&[(&k.env(), w)]);
                    Settings::from_sources(&ServeArgs::default(), &e, None)
                        .unwrap_or_else(|err| panic!("{} = {w}: {err}", k.key));
                }
            }
        }
    }

    #[test]
    fn duration_errors_say_how_to_write_one() {
        let e = env(&[("REGGUARD_VALIDATE_OK_TTL", "-5")]);
        let err = Settings::from_sources(&ServeArgs::default(), &e, None)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "`validate.ok_ttl`: \"-5\" is not a duration (use 30s, 15m, 1h)"
        );
        let err = Settings::from_toml("[validate]\nok_ttl = -5\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("\"-5\" is not a duration (use 30s, 15m, 1h)"),
            "{err}"
        );
    }

    #[test]
    fn unknown_environment_variables_are_named() {
        let e = env(&[
            ("REGGUARD_VALIDATE_OK_TLL", "5m"),
            ("REGGUARD_LOG", "debug"),
        ]);
        let err = Settings::from_sources(&ServeArgs::default(), &e, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("REGGUARD_VALIDATE_OK_TLL"), "{err}");
        assert!(
            err.contains("did you mean REGGUARD_VALIDATE_OK_TTL"),
            "{err}"
        );
        let e = env(&[
            ("REGGUARD_LOG", "debug"),
            ("REGGUARD_SCAN_USER", "u"),
            ("PATH", "/x"),
        ]);
        Settings::from_sources(&ServeArgs::default(), &e, None).unwrap();
    }

    #[test]
    fn effective_settings_name_sources_and_mask_secrets() {
        let args = ServeArgs::default()
            .with("listen", "127.0.0.1:7001")
            .with("upstream", "http://bob:hunter2@reg:5000");
        let e = env(&[
            ("REGGUARD_GATE_MODE", "audit"),
            ("REGGUARD_SCAN_USER", "scanner"),
            ("REGGUARD_SCAN_PASSWORD", "s3cret"),
        ]);
        let text = render_effective(&effective(&args, &e).unwrap(), &e);
        assert!(
            text.contains("listen = \"127.0.0.1:7001\"  # --listen"),
            "{text}"
        );
        assert!(
            text.contains("[gate]\nmode = \"audit\"  # REGGUARD_GATE_MODE"),
            "{text}"
        );
        assert!(text.contains("workers = 4  # default"), "{text}");
        assert!(
            text.contains("# REGGUARD_SCAN_PASSWORD = ********"),
            "{text}"
        );
        assert!(
            !text.contains("s3cret") && !text.contains("hunter2"),
            "{text}"
        );
        // The output is a TOML file with the same settings.
        let reparsed = Settings::from_toml(&text).unwrap();
        assert_eq!(reparsed.gate.mode, super::features::GateMode::Audit);
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
        use super::features::{GateDepth, GateMode, OnCheckError};
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
