//! The settings types of the features above config (the push gate, the scan): config
//! builds them, the features read them, and so config never names a feature's module.

use std::path::PathBuf;
use std::time::Duration;

use http::HeaderValue;
use serde::Deserialize;

/// `[gate] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateMode {
    /// Refuse what would be broken on the first pull.
    Enforce,
    /// Forward everything; count what enforce would have refused.
    Audit,
    /// No checks.
    Off,
}

/// `[gate] on_check_error`: what to do when a reference cannot be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnCheckError {
    /// 503 `UNAVAILABLE` with `Retry-After`: a registry that cannot answer a HEAD would not
    /// store the manifest well either.
    Reject,
    /// Forward the push unchecked.
    Allow,
}

/// `[gate] depth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateDepth {
    /// Also each child image's config and layers, following nested indexes.
    Deep,
    /// Only the manifest's own references.
    Shallow,
}

/// Validated `[gate]` settings.
#[derive(Debug, Clone)]
pub struct GateSettings {
    pub mode: GateMode,
    pub on_check_error: OnCheckError,
    pub depth: GateDepth,
    pub max_depth: u32,
    /// Distinct references one push may make the gate ask about.
    pub max_references: usize,
    /// Manifest bytes held in memory at once, by all pushes and response taps together.
    pub max_buffered_bytes: usize,
}

/// How a scan walks.
#[derive(Debug, Clone)]
pub struct ScanSettings {
    /// Run in the background every `interval` (serve only).
    pub enabled: bool,
    pub interval: Duration,
    /// Tags validated at once.
    pub concurrency: usize,
    /// Upstream listing/manifest requests per second at most (checks ride the shared cache).
    pub rate: u32,
    /// Page size for the catalog and tag lists.
    pub page_size: u32,
    /// Also check every image's config and layers.
    pub blobs: bool,
    /// `Authorization` for the scan's own requests (service credentials). Never logged.
    pub auth: Option<HeaderValue>,
}

/// Where a vault lives: a directory, or `s3://bucket/prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultLocation {
    Dir(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl VaultLocation {
    /// `s3://bucket[/prefix]`, else a filesystem path.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(format!(
                    "`{text}` names no bucket (expected s3://bucket/prefix)"
                ));
            }
            return Ok(VaultLocation::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            });
        }
        if text.contains("://") {
            return Err(format!(
                "`{text}`: a vault is a directory or s3://bucket/prefix"
            ));
        }
        if text.is_empty() {
            return Err("empty vault location".into());
        }
        Ok(VaultLocation::Dir(PathBuf::from(text)))
    }
}

impl std::fmt::Display for VaultLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VaultLocation::Dir(p) => p.display().fmt(f),
            VaultLocation::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            VaultLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// Validated `[vault]` settings.
#[derive(Debug, Clone)]
pub struct VaultSettings {
    /// Where; `None`: no vault.
    pub location: Option<VaultLocation>,
    /// The location is the built-in default (a failure to open it is a warning, not an error).
    pub default_location: bool,
    /// Keep every blob that passes through, not only configs.
    pub layers: bool,
    /// Blobs over this many bytes are not kept when `layers` is off (configs are small).
    pub max_blob_size: u64,
    /// Entries not seen for this long are pruned.
    pub retention: Duration,
    /// Content bytes kept at most (least recently seen evicted first); `None`: no cap.
    pub max_bytes: Option<u64>,
    /// The process's `AWS_*` variables, for an S3 vault.
    pub aws: Vec<(String, String)>,
}

/// Validated `[heal]` settings.
#[derive(Debug, Clone)]
pub struct HealSettings {
    /// Answer a client's 404 with the vault's bytes.
    pub serve: bool,
    /// Repair the registry from the vault.
    pub repair: bool,
    /// `Authorization` for repairs (push credentials). Never logged.
    pub auth: Option<HeaderValue>,
}
