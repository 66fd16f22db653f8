//! OCI and Docker distribution vocabulary: media types, digests, descriptors,
//! and the two manifest shapes regguard reads (indexes and image manifests).
//!
//! Parsing is tolerant (unknown fields ignored) and bounded: manifests over
//! [`MAX_MANIFEST_BYTES`] are never read.

use http::HeaderValue;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// The registry rejects manifests over 4 MiB; regguard never holds more than this per manifest.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// All four manifest types. Registry 2.8 answers 404 for an existing OCI manifest
/// unless the OCI types are accepted, so every check regguard makes sends this.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// [`ACCEPT_ALL`] as a header value.
pub fn accept_all() -> HeaderValue {
    HeaderValue::from_static(ACCEPT_ALL)
}

/// What a media type says a manifest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// OCI image index or Docker manifest list.
    Index,
    /// OCI image manifest or Docker image manifest v2.
    Image,
}

/// Classifies a `Content-Type` (parameters ignored).
pub fn manifest_kind(content_type: &str) -> Option<ManifestKind> {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    match essence {
        OCI_INDEX | DOCKER_LIST => Some(ManifestKind::Index),
        OCI_MANIFEST | DOCKER_MANIFEST => Some(ManifestKind::Image),
        _ => None,
    }
}

/// `sha256:<64 lowercase hex>`: the only algorithm distribution 2.8 serves.
pub fn is_sha256_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// The `sha256:<hex>` digest of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    let sum = Sha256::digest(data);
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in sum {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    out
}

/// A platform, as in an index entry.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Platform {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A content descriptor.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    /// Non-distributable layers carry URLs and are not in the registry.
    #[serde(default)]
    pub urls: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// A parsed manifest: what it references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    Index {
        manifests: Vec<Descriptor>,
    },
    Image {
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
}

/// Why bytes are not a manifest regguard can read.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("manifest is larger than {MAX_MANIFEST_BYTES} bytes")]
    TooLarge,
    #[error("manifest is not JSON: {0}")]
    NotJson(String),
    #[error("manifest has neither `manifests` nor `config` (media type {0:?})")]
    Shape(Option<String>),
    #[error("descriptor digest {0:?} is not a sha256 digest")]
    BadDigest(String),
}

impl Manifest {
    /// Parses a manifest; `hint` is the Content-Type it was served or pushed with, used when
    /// the body names no `mediaType`.
    pub fn parse(body: &[u8], hint: Option<ManifestKind>) -> Result<Self, ParseError> {
        if body.len() > MAX_MANIFEST_BYTES {
            return Err(ParseError::TooLarge);
        }
        let raw: RawManifest =
            serde_json::from_slice(body).map_err(|e| ParseError::NotJson(e.to_string()))?;
        let kind = raw
            .media_type
            .as_deref()
            .and_then(manifest_kind)
            .or(hint)
            .or(if raw.manifests.is_some() {
                Some(ManifestKind::Index)
            } else if raw.config.is_some() {
                Some(ManifestKind::Image)
            } else {
                None
            });
        let parsed = match (kind, raw.manifests, raw.config) {
            (Some(ManifestKind::Index), Some(manifests), _) => Manifest::Index { manifests },
            (Some(ManifestKind::Image), _, Some(config)) => Manifest::Image {
                config,
                layers: raw.layers.unwrap_or_default(),
            },
            _ => return Err(ParseError::Shape(raw.media_type)),
        };
        for d in parsed.references() {
            if !is_sha256_digest(&d.digest) {
                return Err(ParseError::BadDigest(d.digest.clone()));
            }
        }
        Ok(parsed)
    }

    /// Every descriptor this manifest references directly.
    pub fn references(&self) -> Vec<&Descriptor> {
        match self {
            Manifest::Index { manifests } => manifests.iter().collect(),
            Manifest::Image { config, layers } => std::iter::once(config).chain(layers).collect(),
        }
    }

    /// Approximate memory held by the parsed form, for byte-weighted caches.
    pub fn weight(&self) -> u32 {
        let n = self.references().len();
        u32::try_from(64 + n * 256).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_of_empty_input() {
        assert_eq!(sha256_digest(b""), D);
        assert!(is_sha256_digest(D));
        assert!(!is_sha256_digest("sha256:E3B0"));
        assert!(!is_sha256_digest("sha512:00"));
    }

    #[test]
    fn parses_index_with_platforms_and_unknown_fields() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":7,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}},"x-new":1}}],"annotations":{{}}}}"#
        );
        let m = Manifest::parse(body.as_bytes(), None).unwrap();
        let Manifest::Index { manifests } = m else {
            panic!("index")
        };
        assert_eq!(manifests[0].size, 7);
        assert_eq!(
            manifests[0].platform.as_ref().unwrap().to_string(),
            "linux/arm64/v8"
        );
    }

    #[test]
    fn image_manifest_without_media_type_uses_the_hint_or_shape() {
        let body =
            format!(r#"{{"schemaVersion":2,"config":{{"digest":"{D}","size":2}},"layers":[]}}"#);
        assert!(matches!(
            Manifest::parse(body.as_bytes(), None),
            Ok(Manifest::Image { .. })
        ));
        assert!(matches!(
            Manifest::parse(body.as_bytes(), Some(ManifestKind::Image)),
            Ok(Manifest::Image { .. })
        ));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            Manifest::parse(b"not json", None),
            Err(ParseError::NotJson(_))
        ));
        let no_manifests = format!(r#"{{"mediaType":"{OCI_INDEX}"}}"#);
        assert!(matches!(
            Manifest::parse(no_manifests.as_bytes(), None),
            Err(ParseError::Shape(_))
        ));
        let bad =
            format!(r#"{{"mediaType":"{OCI_INDEX}","manifests":[{{"digest":"md5:x","size":1}}]}}"#);
        assert!(matches!(
            Manifest::parse(bad.as_bytes(), None),
            Err(ParseError::BadDigest(_))
        ));
        let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert_eq!(Manifest::parse(&big, None), Err(ParseError::TooLarge));
    }

    #[test]
    fn content_types_classify() {
        assert_eq!(manifest_kind(DOCKER_LIST), Some(ManifestKind::Index));
        assert_eq!(
            manifest_kind("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
            Some(ManifestKind::Image)
        );
        assert_eq!(manifest_kind("application/json"), None);
    }
}
