//! Deterministic OCI test images, built in Rust the way buildx builds them:
//! an image index with linux/amd64 and linux/arm64 image manifests plus an
//! in-toto attestation manifest (`platform unknown/unknown`) per image.

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use serde_json::{json, Value};

use super::http::{self, sha256_digest};

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const IN_TOTO: &str = "application/vnd.in-toto+json";
/// All four manifest types: without the OCI ones, registry 2.8 answers 404 for OCI content.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Content-addressed bytes with their media type.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub digest: String,
    pub data: Bytes,
}

impl Blob {
    pub fn new(media_type: &str, data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Blob {
            media_type: media_type.to_string(),
            digest: sha256_digest(&data),
            data,
        }
    }
    pub fn json(media_type: &str, v: &Value) -> Self {
        Self::new(media_type, serde_json::to_vec(v).unwrap())
    }
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.data.len()})
    }
}

/// One platform image: its manifest, config and layers.
#[derive(Clone, Debug)]
pub struct PlatformImage {
    pub platform: (String, String),
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<Blob>,
}

/// A multi-arch image as buildx pushes it.
#[derive(Clone, Debug)]
pub struct MultiArch {
    pub index: Blob,
    pub images: Vec<PlatformImage>,
    pub attestations: Vec<PlatformImage>,
}

impl MultiArch {
    /// Every blob (configs and layers) of every child.
    pub fn blobs(&self) -> Vec<&Blob> {
        self.images
            .iter()
            .chain(&self.attestations)
            .flat_map(|i| std::iter::once(&i.config).chain(&i.layers))
            .collect()
    }
    /// Every child manifest.
    pub fn children(&self) -> Vec<&PlatformImage> {
        self.images.iter().chain(&self.attestations).collect()
    }
    pub fn image(&self, arch: &str) -> &PlatformImage {
        self.images.iter().find(|i| i.platform.1 == arch).unwrap()
    }
}

/// A gzip'd tar with one file; deterministic (fixed mtime, owner, gzip header).
pub fn layer(name: &str, contents: &[u8]) -> (Blob, String) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(contents.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_cksum();
    tar.append_data(&mut header, name, contents).unwrap();
    let raw = tar.into_inner().unwrap();
    let diff_id = sha256_digest(&raw);
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &raw).unwrap();
    (Blob::new(OCI_LAYER, gz.finish().unwrap()), diff_id)
}

fn platform_image(seed: &str, os: &str, arch: &str, layer_count: usize) -> PlatformImage {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for i in 0..layer_count {
        let (l, d) = layer(
            &format!("layer{i}.txt"),
            format!("{seed} {os}/{arch} layer {i}\n").as_bytes(),
        );
        layers.push(l);
        diff_ids.push(d);
    }
    let config = Blob::json(
        OCI_CONFIG,
        &json!({
            "architecture": arch, "os": os,
            "config": {"Cmd": ["/bin/true"], "Labels": {"test.seed": seed}},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "regguard test"}]
        }),
    );
    let manifest = Blob::json(
        OCI_MANIFEST,
        &json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>()
        }),
    );
    PlatformImage {
        platform: (os.to_string(), arch.to_string()),
        manifest,
        config,
        layers,
    }
}

fn attestation(seed: &str, subject: &PlatformImage) -> PlatformImage {
    let statement = Blob::json(
        IN_TOTO,
        &json!({
            "_type": "https://in-toto.io/Statement/v0.1",
            "predicateType": "https://slsa.dev/provenance/v0.2",
            "subject": [{"name": seed, "digest": {"sha256": subject.manifest.digest.trim_start_matches("sha256:")}}],
            "predicate": {"builder": {"id": "regguard-test"}}
        }),
    );
    let config = Blob::json(
        OCI_CONFIG,
        &json!({"architecture": "unknown", "os": "unknown", "config": {}, "rootfs": {"type": "layers", "diff_ids": [statement.digest]}}),
    );
    let mut layer_desc = statement.descriptor();
    layer_desc["annotations"] =
        json!({"in-toto.io/predicate-type": "https://slsa.dev/provenance/v0.2"});
    let manifest = Blob::json(
        OCI_MANIFEST,
        &json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": config.descriptor(),
            "layers": [layer_desc]
        }),
    );
    PlatformImage {
        platform: ("unknown".into(), "unknown".into()),
        manifest,
        config,
        layers: vec![statement],
    }
}

/// The standard test image: linux/amd64 + linux/arm64 + one attestation per platform.
/// `seed` makes distinct images with the same shape.
pub fn multi_arch(seed: &str) -> MultiArch {
    let images = vec![
        platform_image(seed, "linux", "amd64", 2),
        platform_image(seed, "linux", "arm64", 2),
    ];
    let attestations: Vec<_> = images.iter().map(|i| attestation(seed, i)).collect();
    let mut entries = Vec::new();
    for img in &images {
        let mut d = img.manifest.descriptor();
        d["platform"] = json!({"os": img.platform.0, "architecture": img.platform.1});
        entries.push(d);
    }
    for (att, img) in attestations.iter().zip(&images) {
        let mut d = att.manifest.descriptor();
        d["platform"] = json!({"os": "unknown", "architecture": "unknown"});
        d["annotations"] = json!({
            "vnd.docker.reference.digest": img.manifest.digest,
            "vnd.docker.reference.type": "attestation-manifest"
        });
        entries.push(d);
    }
    let index = Blob::json(
        OCI_INDEX,
        &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}),
    );
    MultiArch {
        index,
        images,
        attestations,
    }
}

/// Writes the image as an OCI image layout (for skopeo's `oci:` transport).
pub fn write_layout(img: &MultiArch, dir: &Path, tag: &str) {
    let mut all: Vec<&Blob> = img.blobs();
    all.extend(img.children().iter().map(|c| &c.manifest));
    all.push(&img.index);
    write_layout_files(dir, &all, &img.index, tag);
}

/// An OCI image layout holding `blobs`, with `top` tagged `tag` in its index.json.
fn write_layout_files(dir: &Path, blobs: &[&Blob], top: &Blob, tag: &str) {
    let blob_dir = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blob_dir).unwrap();
    for b in blobs {
        std::fs::write(
            blob_dir.join(b.digest.trim_start_matches("sha256:")),
            &b.data,
        )
        .unwrap();
    }
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut d = top.descriptor();
    d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [d]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// Every blob file of an OCI layout, digest → size.
pub fn layout_blobs(dir: &Path) -> BTreeMap<String, u64> {
    std::fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let data = std::fs::read(e.path()).unwrap();
            let name = format!("sha256:{}", e.file_name().to_string_lossy());
            assert_eq!(
                sha256_digest(&data),
                name,
                "blob file content matches its name"
            );
            (name, data.len() as u64)
        })
        .collect()
}

/// Pushes a blob monolithically (POST, then PUT ?digest=) through `base`.
pub fn push_blob(base: &str, repo: &str, blob: &Blob, auth: &[(&str, &str)]) {
    let r = http::send(
        "POST",
        &format!("{base}/v2/{repo}/blobs/uploads/"),
        auth,
        Bytes::new(),
    );
    assert_eq!(r.status, 202, "start upload: {}", r.text());
    let loc = r.header("location").unwrap().to_string();
    let url = http::location_url(base, &loc, &format!("digest={}", blob.digest));
    let mut headers = auth.to_vec();
    headers.push(("content-type", "application/octet-stream"));
    let r = http::send("PUT", &url, &headers, blob.data.clone());
    assert_eq!(
        r.status,
        201,
        "finish upload of {}: {}",
        blob.digest,
        r.text()
    );
}

/// PUTs a manifest under `reference` (tag or digest); returns the response.
pub fn put_manifest(
    base: &str,
    repo: &str,
    reference: &str,
    m: &Blob,
    auth: &[(&str, &str)],
) -> http::Resp {
    let mut headers = auth.to_vec();
    headers.push(("content-type", m.media_type.as_str()));
    http::send(
        "PUT",
        &format!("{base}/v2/{repo}/manifests/{reference}"),
        &headers,
        m.data.clone(),
    )
}

/// Pushes the whole multi-arch image through `base` and tags the index.
pub fn push_multi_arch(base: &str, repo: &str, tag: &str, img: &MultiArch, auth: &[(&str, &str)]) {
    for b in img.blobs() {
        push_blob(base, repo, b, auth);
    }
    for c in img.children() {
        let r = put_manifest(base, repo, &c.manifest.digest, &c.manifest, auth);
        assert_eq!(r.status, 201, "put child manifest: {}", r.text());
    }
    let r = put_manifest(base, repo, tag, &img.index, auth);
    assert_eq!(r.status, 201, "put index: {}", r.text());
}

pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// A Docker-format multi-arch image: a manifest list of Docker image manifests (no attestations).
pub fn docker_list(seed: &str) -> MultiArch {
    let mut images = Vec::new();
    for arch in ["amd64", "arm64"] {
        let (mut l, diff) = layer("hello.txt", format!("{seed} docker {arch}\n").as_bytes());
        l.media_type = DOCKER_LAYER.into();
        let config = Blob::json(
            DOCKER_CONFIG,
            &json!({"architecture": arch, "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": [diff]}}),
        );
        let manifest = Blob::json(
            DOCKER_MANIFEST,
            &json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": config.descriptor(), "layers": [l.descriptor()]}),
        );
        images.push(PlatformImage {
            platform: ("linux".into(), arch.into()),
            manifest,
            config,
            layers: vec![l],
        });
    }
    let entries: Vec<Value> = images
        .iter()
        .map(|i| {
            let mut d = i.manifest.descriptor();
            d["platform"] = json!({"os": i.platform.0, "architecture": i.platform.1});
            d
        })
        .collect();
    let index = Blob::json(
        DOCKER_LIST,
        &json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": entries}),
    );
    MultiArch {
        index,
        images,
        attestations: vec![],
    }
}

/// Writes one platform image alone as an OCI layout (a single-platform image).
pub fn write_image_layout(img: &PlatformImage, dir: &Path, tag: &str) {
    let mut all: Vec<&Blob> = std::iter::once(&img.config).chain(&img.layers).collect();
    all.push(&img.manifest);
    write_layout_files(dir, &all, &img.manifest, tag);
}

/// Uploads the first `size` bytes of the test pattern as one blob (POST, then a streamed
/// PUT ?digest=), never holding it in memory. Returns its digest.
pub fn push_pattern_blob(base: &str, repo: &str, size: u64) -> String {
    let digest = http::pattern_digest(size);
    let r = http::send(
        "POST",
        &format!("{base}/v2/{repo}/blobs/uploads/"),
        &[],
        Bytes::new(),
    );
    assert_eq!(r.status, 202, "start upload: {}", r.text());
    let loc = http::location_url(
        base,
        r.header("location").unwrap(),
        &format!("digest={digest}"),
    );
    let r = http::send_body("PUT", &loc, &[], http::PatternBody::sized(size));
    assert_eq!(r.status, 201, "upload of {size} bytes: {}", r.text());
    digest
}
