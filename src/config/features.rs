//! The settings types of the features above config (the push gate, the scan): config
//! builds them, the features read them, and so config never names a feature's module.

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
