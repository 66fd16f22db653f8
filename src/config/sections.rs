//! One builder per section: reads its keys from the merged sources and checks what one key
//! alone cannot (pairs, files that must exist, limits between keys).
//!
//! Each line reads one row of the key table by name; the row holds the default, so a default
//! is written once. Nothing here knows which source a value came from.

use std::net::SocketAddr;

use super::sources::Merged;
use super::upstream::{basic_auth, Upstream};
use super::{invalid, ConfigError, MetricsSettings, Settings, TlsFiles, ValidateSettings};

/// The top level, then each section.
pub(crate) fn settings(m: &Merged) -> Result<Settings, ConfigError> {
    let validate = validate(m)?;
    let settings = Settings {
        listen: addr("listen", m)?,
        upstream: Upstream::parse(&m.text("upstream")?.unwrap_or_default())?,
        admin_listen: addr("admin_listen", m)?,
        tls: tls(m)?,
        tls_reload_interval: m.duration("tls_reload_interval")?,
        upstream_ca: m.path("upstream_ca")?,
        log_format: m.choice("log_format")?,
        idle_timeout: m.duration("idle_timeout")?,
        header_read_timeout: m.duration("header_read_timeout")?,
        max_connections: m.count("max_connections")?,
        connect_timeout: m.duration("connect_timeout")?,
        drain_timeout: m.duration("drain_timeout")?,
        access_log: m.bool("access_log")?,
        trusted_proxies: m
            .list("trusted_proxies")?
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|_| invalid("trusted_proxies", format!("`{s}` is not an IP address")))
            })
            .collect::<Result<_, _>>()?,
        gate: gate(m, validate.max_depth)?,
        scan: scan(m)?,
        vault: vault(m)?,
        heal: heal(m)?,
        metrics: metrics(m)?,
        validate,
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

fn addr(key: &'static str, m: &Merged) -> Result<SocketAddr, ConfigError> {
    let value = m.text(key)?.unwrap_or_default();
    value.trim().parse().map_err(|_| {
        invalid(
            key,
            format!(
                "`{value}` is not an address of the form IP:PORT (e.g. 0.0.0.0:5050 or [::]:5050)"
            ),
        )
    })
}

/// Both files or neither.
fn tls(m: &Merged) -> Result<Option<TlsFiles>, ConfigError> {
    match (m.path("tls_cert")?, m.path("tls_key")?) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(invalid("tls_key", "tls_cert is set but tls_key is not")),
        (None, Some(_)) => Err(invalid("tls_cert", "tls_key is set but tls_cert is not")),
    }
}

/// The TLS files must be files regguard can read: checked when starting (not when a file is
/// merely parsed, as for a config meant for another machine), so that a wrong path stops
/// start-up with the key named rather than failing in the listener.
pub(crate) fn check_files(settings: &Settings) -> Result<(), ConfigError> {
    let Some(files) = &settings.tls else {
        return Ok(());
    };
    for (key, path) in [("tls_cert", &files.cert), ("tls_key", &files.key)] {
        std::fs::File::open(path)
            .and_then(|f| f.metadata())
            .and_then(|meta| match meta.is_file() {
                true => Ok(()),
                false => Err(std::io::Error::other("not a file")),
            })
            .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    }
    Ok(())
}

fn validate(m: &Merged) -> Result<ValidateSettings, ConfigError> {
    Ok(ValidateSettings {
        enabled: m.bool("validate.enabled")?,
        blobs: m.bool("validate.blobs")?,
        ok_ttl: m.duration("validate.ok_ttl")?,
        missing_ttl: m.duration("validate.missing_ttl")?,
        queue_capacity: m.count("validate.queue_capacity")?,
        workers: m.count("validate.workers")?,
        max_depth: m.count("validate.max_depth")?,
        max_references: m.count("validate.max_references")?,
        check_timeout: m.duration("validate.check_timeout")?,
    })
}

fn gate(m: &Merged, max_depth: u32) -> Result<super::features::GateSettings, ConfigError> {
    Ok(super::features::GateSettings {
        mode: m.choice("gate.mode")?,
        on_check_error: m.choice("gate.on_check_error")?,
        depth: m.choice("gate.depth")?,
        max_depth,
        max_references: m.count("gate.max_references")?,
        max_buffered_bytes: m
            .count::<usize>("gate.max_buffered_mib")?
            .saturating_mul(1024 * 1024),
    })
}

fn vault(m: &Merged) -> Result<super::features::VaultSettings, ConfigError> {
    use super::features::VaultLocation;
    let configured = m.text("vault.url")?;
    let (location, default_location) = match configured.as_deref().map(str::trim) {
        Some("none") | Some("") => (None, false),
        Some(url) => (
            Some(VaultLocation::parse(url).map_err(|e| invalid("vault.url", e))?),
            false,
        ),
        None => match m.env.get("STATE_DIRECTORY") {
            // systemd may list several directories, separated by colons: the first is ours.
            Some(dirs) => {
                let dir = dirs.split(':').next().unwrap_or(dirs);
                (
                    Some(VaultLocation::Dir(std::path::Path::new(dir).join("vault"))),
                    true,
                )
            }
            None => (None, false),
        },
    };
    let max_bytes: u64 = m.count("vault.max_bytes")?;
    Ok(super::features::VaultSettings {
        location,
        default_location,
        layers: m.bool("vault.layers")?,
        max_blob_size: m.count("vault.max_blob_size")?,
        retention: m.duration("vault.retention")?,
        max_bytes: (max_bytes > 0).then_some(max_bytes),
        aws: m.env.aws(),
    })
}

fn heal(m: &Merged) -> Result<super::features::HealSettings, ConfigError> {
    let serve = match m.text("heal.serve")? {
        None => true,
        Some(_) => m.bool("heal.serve")?,
    };
    Ok(super::features::HealSettings {
        serve,
        repair: m.bool("heal.repair")?,
        auth: credentials(
            m,
            "heal.credentials_file",
            ("REGGUARD_HEAL_USER", "REGGUARD_HEAL_PASSWORD"),
        )?,
    })
}

/// `user:password` from a pair of variables, else from a file.
fn credentials(
    m: &Merged,
    key: &'static str,
    (user, password): (&str, &str),
) -> Result<Option<http::HeaderValue>, ConfigError> {
    let file = m.path(key)?;
    match ((m.env.get(user), m.env.get(password)), &file) {
        ((Some(u), Some(p)), _) => Ok(Some(
            basic_auth(&format!("{u}:{p}")).map_err(|e| invalid(key, e))?,
        )),
        (_, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid(key, format!("{}: {e}", path.display())))?;
            if !text.contains(':') {
                return Err(invalid(
                    key,
                    format!("{}: expected user:password", path.display()),
                ));
            }
            Ok(Some(basic_auth(text.trim()).map_err(|e| invalid(key, e))?))
        }
        _ => Ok(None),
    }
}

fn scan(m: &Merged) -> Result<super::features::ScanSettings, ConfigError> {
    let auth = credentials(
        m,
        "scan.credentials_file",
        ("REGGUARD_SCAN_USER", "REGGUARD_SCAN_PASSWORD"),
    )?;
    Ok(super::features::ScanSettings {
        enabled: m.bool("scan.enabled")?,
        interval: m.duration("scan.interval")?,
        concurrency: m.count("scan.concurrency")?,
        rate: m.count("scan.rate")?,
        page_size: m.count("scan.page_size")?,
        blobs: m.bool("scan.blobs")?,
        auth,
    })
}

fn metrics(m: &Merged) -> Result<MetricsSettings, ConfigError> {
    Ok(MetricsSettings {
        instance: m.text("metrics.instance")?.unwrap_or_else(host_name),
        max_broken_series: m.count("metrics.max_broken_series")?,
    })
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "regguard".to_string())
}
