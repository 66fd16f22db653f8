//! OCI and Docker distribution vocabulary: media types, digests, descriptors,
//! and the two manifest shapes regguard reads (indexes and image manifests).
//!
//! Parsing is tolerant (unknown fields ignored) and bounded: manifests over
//! [`MAX_MANIFEST_BYTES`] are never read.
//!
//! It knows nothing of registries, HTTP or checks: data and parsing only.

use http::HeaderValue;
use serde::de::MapAccess;
use sha2::{Digest as _, Sha256};

use crate::gojson::{self, GoStruct, Notes};

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

/// What kind of reference a descriptor is: a manifest (`/manifests/`) or a blob (`/blobs/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefKind {
    Manifest,
    Blob,
}

impl RefKind {
    /// The metric and log label.
    pub fn as_str(self) -> &'static str {
        match self {
            RefKind::Manifest => "manifest",
            RefKind::Blob => "blob",
        }
    }
    /// The path segment the distribution API uses for it.
    pub fn path(self) -> &'static str {
        match self {
            RefKind::Manifest => "manifests",
            RefKind::Blob => "blobs",
        }
    }
}

/// What a media type says a manifest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    /// OCI image index or Docker manifest list.
    Index,
    /// OCI image manifest or Docker image manifest v2.
    Image,
}

/// Classifies a `Content-Type` (parameters ignored, case-insensitive: the
/// registry reads it through Go's `mime.ParseMediaType`, which lower-cases).
pub fn manifest_kind(content_type: &str) -> Option<ManifestKind> {
    let essence = media_type_essence(content_type);
    if essence.eq_ignore_ascii_case(OCI_INDEX) || essence.eq_ignore_ascii_case(DOCKER_LIST) {
        Some(ManifestKind::Index)
    } else if essence.eq_ignore_ascii_case(OCI_MANIFEST)
        || essence.eq_ignore_ascii_case(DOCKER_MANIFEST)
    {
        Some(ManifestKind::Image)
    } else {
        None
    }
}

/// A media type without its parameters and surrounding space (`type/subtype`).
pub fn media_type_essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// Two media types name the same type (case-insensitive, parameters ignored).
pub fn same_media_type(a: &str, b: &str) -> bool {
    media_type_essence(a).eq_ignore_ascii_case(media_type_essence(b))
}

/// Longest copy of a client-chosen string (a platform, a media type) regguard keeps in
/// its caches, logs and metric labels: real ones are under 100 bytes, and a crafted
/// 512 KiB platform must not be copied once per reference.
pub const MAX_KEPT_STRING: usize = 256;

/// `s` cut to at most [`MAX_KEPT_STRING`] bytes, on a character boundary.
pub fn bounded(s: &str) -> &str {
    let mut end = s.len().min(MAX_KEPT_STRING);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
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
        for nibble in [b >> 4, b & 15] {
            out.extend(char::from_digit(u32::from(nibble), 16));
        }
    }
    out
}

/// A platform, as in an index entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = self.variant.as_deref().filter(|v| !v.is_empty()) {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl GoStruct for Platform {
    const FIELDS: &'static [&'static str] = &["os", "architecture", "variant"];
    fn decode_field<'de, A: MapAccess<'de>>(
        &mut self,
        index: usize,
        map: &mut A,
        _: &Notes,
    ) -> Result<(), A::Error> {
        match index {
            0 => gojson::scalar(map, &mut self.os),
            1 => gojson::scalar(map, &mut self.architecture),
            _ => {
                if let Some(v) = map.next_value::<Option<String>>()? {
                    self.variant = Some(v);
                }
                Ok(())
            }
        }
    }
}

/// A content descriptor. Absent fields read as Go reads them: empty strings and size 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    pub platform: Option<Platform>,
    /// Non-distributable layers carry URLs and are not in the registry.
    pub urls: Vec<String>,
}

impl GoStruct for Descriptor {
    const FIELDS: &'static [&'static str] = &["mediaType", "digest", "size", "platform", "urls"];
    fn decode_field<'de, A: MapAccess<'de>>(
        &mut self,
        index: usize,
        map: &mut A,
        notes: &Notes,
    ) -> Result<(), A::Error> {
        match index {
            0 => gojson::scalar(map, &mut self.media_type),
            1 => gojson::scalar(map, &mut self.digest),
            2 => gojson::scalar(map, &mut self.size),
            3 => map.next_value_seed(gojson::IntoOption {
                target: &mut self.platform,
                notes,
            }),
            _ => map.next_value_seed(gojson::IntoSlice {
                target: &mut self.urls,
                notes,
            }),
        }
    }
}

/// The fields of any manifest regguard reads, decoded as the registry decodes them.
#[derive(Default)]
struct RawManifest {
    media_type: String,
    /// `None` until a `manifests` key is seen (its presence tells an index).
    manifests: Option<Vec<Descriptor>>,
    config: Option<Descriptor>,
    layers: Vec<Descriptor>,
}

impl GoStruct for RawManifest {
    const FIELDS: &'static [&'static str] = &["mediaType", "manifests", "config", "layers"];
    fn decode_field<'de, A: MapAccess<'de>>(
        &mut self,
        index: usize,
        map: &mut A,
        notes: &Notes,
    ) -> Result<(), A::Error> {
        match index {
            0 => gojson::scalar(map, &mut self.media_type),
            1 => map.next_value_seed(gojson::IntoSlice {
                target: self.manifests.get_or_insert_with(Vec::new),
                notes,
            }),
            2 => map.next_value_seed(gojson::IntoOption {
                target: &mut self.config,
                notes,
            }),
            _ => map.next_value_seed(gojson::IntoSlice {
                target: &mut self.layers,
                notes,
            }),
        }
    }
}

/// Only the `mediaType` of a document, read as the registry reads it.
#[derive(Default)]
struct MediaTypeOnly(String);

impl GoStruct for MediaTypeOnly {
    const FIELDS: &'static [&'static str] = &["mediaType"];
    fn decode_field<'de, A: MapAccess<'de>>(
        &mut self,
        _: usize,
        map: &mut A,
        _: &Notes,
    ) -> Result<(), A::Error> {
        gojson::scalar(map, &mut self.0)
    }
}

/// The `mediaType` a manifest body names, if it is valid JSON and names one.
pub fn body_media_type(body: &[u8]) -> Option<String> {
    let (m, _) = gojson::from_slice::<MediaTypeOnly>(body).ok()?;
    (!m.0.is_empty()).then_some(m.0)
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
    /// One field named twice in one object (`"size"` and `"Size"`, or `"size"` twice). Go's
    /// `encoding/json` (the registry, containerd, docker) takes the last; other readers the
    /// first: such a manifest means different things to different tools.
    #[error("key {later:?} repeats {earlier:?} in one object (JSON keys are matched case-insensitively, and readers disagree on which one wins); remove one")]
    AmbiguousKey { later: String, earlier: String },
}

impl Manifest {
    /// Parses a manifest; `hint` is the Content-Type it was served or pushed with, used when
    /// the body names no `mediaType`.
    pub fn parse(body: &[u8], hint: Option<ManifestKind>) -> Result<Self, ParseError> {
        Self::parse_go(body, hint).map(|(m, _)| m)
    }

    /// Parses as the registry does, and refuses a manifest with a field named twice in one
    /// object ([`ParseError::AmbiguousKey`]): what the push gate accepts must mean one thing.
    pub fn parse_strict(body: &[u8], hint: Option<ManifestKind>) -> Result<Self, ParseError> {
        match Self::parse_go(body, hint)? {
            (_, Some((later, earlier))) => Err(ParseError::AmbiguousKey { later, earlier }),
            (m, None) => Ok(m),
        }
    }

    /// Parses with Go's `encoding/json` rules (see `gojson`), returning the first key pair
    /// that named one field twice, if any.
    pub fn parse_go(
        body: &[u8],
        hint: Option<ManifestKind>,
    ) -> Result<(Self, Option<(String, String)>), ParseError> {
        if body.len() > MAX_MANIFEST_BYTES {
            return Err(ParseError::TooLarge);
        }
        let (raw, ambiguous): (RawManifest, _) =
            gojson::from_slice(body).map_err(|e| ParseError::NotJson(e.to_string()))?;
        let media_type = (!raw.media_type.is_empty()).then_some(raw.media_type);
        let kind =
            media_type
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
                layers: raw.layers,
            },
            _ => return Err(ParseError::Shape(media_type)),
        };
        for d in parsed.references() {
            if !is_sha256_digest(&d.digest) {
                return Err(ParseError::BadDigest(d.digest.clone()));
            }
        }
        Ok((parsed, ambiguous))
    }

    /// Index or image.
    pub fn kind(&self) -> ManifestKind {
        match self {
            Manifest::Index { .. } => ManifestKind::Index,
            Manifest::Image { .. } => ManifestKind::Image,
        }
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
    fn fields_read_as_the_registry_reads_them() {
        let size_twice = format!(
            r#"{{"mediaType":"{OCI_INDEX}","manifests":[{{"digest":"{D}","size":418,"Size":1418}}]}}"#
        );
        let (m, amb) = Manifest::parse_go(size_twice.as_bytes(), None).unwrap();
        assert_eq!(m.references()[0].size, 1418, "Go: the last key wins");
        assert_eq!(amb, Some(("Size".into(), "size".into())));
        assert!(matches!(
            Manifest::parse_strict(size_twice.as_bytes(), None),
            Err(ParseError::AmbiguousKey { .. })
        ));
        // An empty list first, the real one under another spelling: Go sees the children.
        let hidden = format!(
            r#"{{"mediaType":"{OCI_INDEX}","manifests":[],"Manifests":[{{"digest":"{D}","size":1}}]}}"#
        );
        let (m, _) = Manifest::parse_go(hidden.as_bytes(), None).unwrap();
        assert_eq!(m.references().len(), 1);
        // Capitalised keys alone are no ambiguity: Go reads them, and so does regguard.
        let capitals = format!(
            r#"{{"MEDIATYPE":"{OCI_MANIFEST}","Config":{{"Digest":"{D}","SIZE":2}},"Layers":[]}}"#
        );
        let m = Manifest::parse_strict(capitals.as_bytes(), None).unwrap();
        assert!(matches!(m, Manifest::Image { ref config, .. } if config.size == 2));
        assert_eq!(
            body_media_type(capitals.as_bytes()).as_deref(),
            Some(OCI_MANIFEST)
        );
    }

    #[test]
    fn content_types_classify() {
        assert_eq!(
            manifest_kind("Application/VND.OCI.Image.Index.v1+JSON ; charset=x"),
            Some(ManifestKind::Index)
        );
        assert!(same_media_type(
            OCI_MANIFEST,
            "application/VND.oci.image.manifest.v1+json"
        ));
        assert_eq!(manifest_kind(DOCKER_LIST), Some(ManifestKind::Index));
        assert_eq!(
            manifest_kind("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
            Some(ManifestKind::Image)
        );
        assert_eq!(manifest_kind("application/json"), None);
    }
}
