//! The vault's storage: content by digest, and per repository a record of each digest seen
//! there, on a local directory or an S3-compatible object store (one interface, `object_store`).
//!
//! Layout, the same on both backends:
//! - `blobs/sha256/<2 hex>/<hex>`: the bytes of a manifest or blob, written only once their
//!   sha256 is known to match (a whole put, or a multipart upload completed only after the
//!   hash checked out; a crash leaves at most an uncompleted upload, which no read sees);
//! - `repositories/<name>/_seen/sha256/<hex>`: a small JSON record (media type, size, kind)
//!   whose modification time is when the digest was last seen in that repository. `_seen`
//!   cannot be a repository path component (those start with a letter or digit).
//!
//! It knows nothing of HTTP, the registry or metrics: the vault above it decides what to keep.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::oci::RefKind;

pub use crate::config::VaultLocation as Location;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open vault {location}: {reason}")]
    Open { location: String, reason: String },
    #[error("vault storage: {0}")]
    Backend(#[from] object_store::Error),
    #[error("`{0}` is not a sha256 digest")]
    BadDigest(String),
    #[error("vault object {digest} does not match its digest (its bytes hash to {found})")]
    Corrupt { digest: String, found: String },
    #[error("content for {digest} hashed to {found}: not kept")]
    Mismatch { digest: String, found: String },
    #[error("vault object {digest} is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        digest: String,
        size: u64,
        limit: u64,
    },
}

/// The record of a digest seen in one repository.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Seen {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub size: u64,
    pub kind: RefKind,
}

/// One stored content object, as listed.
#[derive(Debug, Clone)]
pub struct ContentEntry {
    pub digest: String,
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub modified: i64,
}

/// One seen record, as listed.
#[derive(Debug, Clone)]
pub struct SeenEntry {
    pub repository: String,
    pub digest: String,
    /// Seconds since the Unix epoch: when it was last seen there.
    pub last_seen: i64,
}

/// Multipart parts for S3 must be at least 5 MiB (but the last); two in flight at most.
const PART_BYTES: usize = 5 * 1024 * 1024;
const PARTS_IN_FLIGHT: usize = 2;

/// The storage of one vault.
#[derive(Clone)]
pub struct Store {
    inner: Arc<dyn ObjectStore>,
    location: Location,
}

fn hex_of(digest: &str) -> Result<&str, StoreError> {
    if !crate::oci::is_sha256_digest(digest) {
        return Err(StoreError::BadDigest(
            crate::oci::bounded(digest).to_owned(),
        ));
    }
    digest
        .strip_prefix("sha256:")
        .ok_or_else(|| StoreError::BadDigest(crate::oci::bounded(digest).to_owned()))
}

fn content_path(digest: &str) -> Result<Path, StoreError> {
    let hex = hex_of(digest)?;
    let fan = hex.get(..2).unwrap_or("00");
    Ok(Path::from_iter(["blobs", "sha256", fan, hex]))
}

fn seen_path(repository: &str, digest: &str) -> Result<Path, StoreError> {
    let hex = hex_of(digest)?;
    Ok(Path::from_iter(
        std::iter::once("repositories")
            .chain(repository.split('/'))
            .chain(["_seen", "sha256", hex]),
    ))
}

fn deleted_path(repository: &str, digest: &str) -> Result<Path, StoreError> {
    let hex = hex_of(digest)?;
    Ok(Path::from_iter(
        std::iter::once("repositories")
            .chain(repository.split('/'))
            .chain(["_deleted", "sha256", hex]),
    ))
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl Store {
    /// Opens (for a directory: creates) the vault at `location`. `aws` are the process's
    /// `AWS_*` variables (credentials, region, endpoint, `AWS_ALLOW_HTTP`), for S3.
    pub fn open(location: &Location, aws: &[(String, String)]) -> Result<Self, StoreError> {
        Self::open_with(location, aws, true)
    }

    /// Opens an existing vault to read from (`regguard heal`, `check --vault`): a directory
    /// that does not exist is an error, not created, and need not be writable.
    pub fn open_existing(
        location: &Location,
        aws: &[(String, String)],
    ) -> Result<Self, StoreError> {
        Self::open_with(location, aws, false)
    }

    fn open_with(
        location: &Location,
        aws: &[(String, String)],
        create: bool,
    ) -> Result<Self, StoreError> {
        let failed = |reason: String| StoreError::Open {
            location: location.to_string(),
            reason,
        };
        let inner: Arc<dyn ObjectStore> = match location {
            Location::Dir(dir) if !create => {
                if !dir.is_dir() {
                    return Err(failed("no such directory".into()));
                }
                Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(dir)
                        .map_err(|e| failed(e.to_string()))?,
                )
            }
            Location::Dir(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| failed(e.to_string()))?;
                // Writable? A read-only default location must be found out now, not at the
                // first write.
                let probe = dir.join(".regguard-write-probe");
                std::fs::write(&probe, b"").map_err(|e| failed(e.to_string()))?;
                let _ = std::fs::remove_file(&probe);
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| failed(e.to_string()))?
                    .with_automatic_cleanup(true);
                Arc::new(fs)
            }
            Location::S3 { bucket, prefix } => {
                let mut builder = object_store::aws::AmazonS3Builder::new();
                for (key, value) in aws {
                    if let Ok(k) = key.to_ascii_lowercase().parse() {
                        builder = builder.with_config(k, value);
                    }
                }
                let s3 = builder
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| failed(e.to_string()))?;
                if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(object_store::prefix::PrefixStore::new(
                        s3,
                        Path::from(prefix.as_str()),
                    ))
                }
            }
        };
        Ok(Store {
            inner,
            location: location.clone(),
        })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The stored size of `digest`, if the vault holds it.
    pub async fn content_size(&self, digest: &str) -> Result<Option<u64>, StoreError> {
        match self.inner.head(&content_path(digest)?).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Keeps `bytes` as `digest`, after checking that they hash to it.
    pub async fn put_bytes(&self, digest: &str, bytes: Bytes) -> Result<(), StoreError> {
        let path = content_path(digest)?;
        let found = crate::oci::sha256_digest(&bytes);
        if found != digest {
            return Err(StoreError::Mismatch {
                digest: digest.to_owned(),
                found,
            });
        }
        self.inner.put(&path, PutPayload::from(bytes)).await?;
        Ok(())
    }

    /// Starts writing `digest` from a stream; nothing is visible until [`Upload::finish`]
    /// has checked the hash.
    pub async fn upload(&self, digest: &str) -> Result<Upload, StoreError> {
        let path = content_path(digest)?;
        let multipart = self.inner.put_multipart(&path).await?;
        Ok(Upload {
            digest: digest.to_owned(),
            writer: WriteMultipart::new_with_chunk_size(multipart, PART_BYTES),
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// The bytes of `digest` (at most `limit`), checked against the digest.
    pub async fn read_verified(
        &self,
        digest: &str,
        limit: u64,
    ) -> Result<Option<Bytes>, StoreError> {
        let path = content_path(digest)?;
        let got = match self.inner.get(&path).await {
            Ok(g) => g,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if got.meta.size > limit {
            return Err(StoreError::TooLarge {
                digest: digest.to_owned(),
                size: got.meta.size,
                limit,
            });
        }
        let bytes = got.bytes().await?;
        let found = crate::oci::sha256_digest(&bytes);
        if found != digest {
            return Err(StoreError::Corrupt {
                digest: digest.to_owned(),
                found,
            });
        }
        Ok(Some(bytes))
    }

    /// Reads all of `digest` once, hashing: its size if it is intact.
    pub async fn verify(&self, digest: &str) -> Result<Option<u64>, StoreError> {
        let Some((mut stream, size)) = self.stream(digest, None).await? else {
            return Ok(None);
        };
        let mut hasher = Sha256::new();
        while let Some(chunk) = stream.next().await {
            hasher.update(&chunk?);
        }
        let found = format!("sha256:{:x}", hasher.finalize());
        if found != digest {
            return Err(StoreError::Corrupt {
                digest: digest.to_owned(),
                found,
            });
        }
        Ok(Some(size))
    }

    /// A stream of `digest`'s bytes (or of `range` of them) and the object's whole size.
    /// Unverified: callers that serve it verify first (see [`Store::verify`]).
    pub async fn stream(
        &self,
        digest: &str,
        range: Option<Range<u64>>,
    ) -> Result<Option<(BoxStream<'static, Result<Bytes, StoreError>>, u64)>, StoreError> {
        let path = content_path(digest)?;
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..GetOptions::default()
        };
        match self.inner.get_opts(&path, options).await {
            Ok(got) => {
                let size = got.meta.size;
                let stream = got
                    .into_stream()
                    .map(|r| r.map_err(StoreError::from))
                    .boxed();
                Ok(Some((stream, size)))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes `digest`'s content (absent is fine).
    pub async fn delete_content(&self, digest: &str) -> Result<(), StoreError> {
        match self.inner.delete(&content_path(digest)?).await {
            Err(e) if !is_not_found(&e) => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// The record of `digest` in `repository`, if it was seen there.
    pub async fn seen(&self, repository: &str, digest: &str) -> Result<Option<Seen>, StoreError> {
        let got = match self.inner.get(&seen_path(repository, digest)?).await {
            Ok(g) => g,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let bytes = got.bytes().await?;
        // A record that does not parse (written by a future version, or damaged) is no record.
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// Records (or refreshes) that `digest` was seen in `repository`.
    pub async fn mark_seen(
        &self,
        repository: &str,
        digest: &str,
        seen: &Seen,
    ) -> Result<(), StoreError> {
        let body = serde_json::to_vec(seen).unwrap_or_default();
        self.inner
            .put(&seen_path(repository, digest)?, PutPayload::from(body))
            .await?;
        Ok(())
    }

    /// Forgets that `digest` was seen in `repository` (absent is fine).
    pub async fn forget_seen(&self, repository: &str, digest: &str) -> Result<(), StoreError> {
        match self.inner.delete(&seen_path(repository, digest)?).await {
            Err(e) if !is_not_found(&e) => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Records that `digest` was deleted from `repository` on purpose: it is not recorded
    /// there again until a push through regguard brings it back.
    pub async fn tombstone(&self, repository: &str, digest: &str) -> Result<(), StoreError> {
        self.inner
            .put(
                &deleted_path(repository, digest)?,
                PutPayload::from_static(b"{}"),
            )
            .await?;
        Ok(())
    }

    /// Whether `digest` was deleted from `repository` on purpose (see [`Store::tombstone`]).
    pub async fn is_tombstoned(&self, repository: &str, digest: &str) -> Result<bool, StoreError> {
        match self.inner.head(&deleted_path(repository, digest)?).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Lifts a tombstone: `digest` was pushed to `repository` again.
    pub async fn clear_tombstone(&self, repository: &str, digest: &str) -> Result<(), StoreError> {
        match self.inner.delete(&deleted_path(repository, digest)?).await {
            Err(e) if !is_not_found(&e) => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Removes staging files (`<name>#<n>`) older than `age` that a crash left in a directory
    /// vault: no read sees them, and nothing else would ever remove them. Returns how many.
    pub fn sweep_staging(&self, age: std::time::Duration) -> usize {
        let Location::Dir(root) = &self.location else {
            return 0;
        };
        let mut removed = 0;
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let staged = entry.file_name().to_string_lossy().contains('#');
                let old = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_some_and(|e| e > age);
                if staged && old && std::fs::remove_file(&path).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// Every stored content object.
    pub fn list_content(&self) -> BoxStream<'static, Result<ContentEntry, StoreError>> {
        let prefix = Path::from_iter(["blobs", "sha256"]);
        self.inner
            .list(Some(&prefix))
            .filter_map(|r| async move {
                match r {
                    Err(e) => Some(Err(StoreError::from(e))),
                    Ok(meta) => {
                        let hex = meta.location.filename()?.to_owned();
                        let digest = format!("sha256:{hex}");
                        crate::oci::is_sha256_digest(&digest).then_some(Ok(ContentEntry {
                            digest,
                            size: meta.size,
                            modified: meta.last_modified.timestamp(),
                        }))
                    }
                }
            })
            .boxed()
    }

    /// Every seen record, in every repository.
    pub fn list_seen(&self) -> BoxStream<'static, Result<SeenEntry, StoreError>> {
        self.list_seen_under(Path::from("repositories"))
    }

    /// The seen records of one repository (and, by prefix, of those nested under its name:
    /// callers filter on [`SeenEntry::repository`]).
    pub fn list_seen_in(
        &self,
        repository: &str,
    ) -> BoxStream<'static, Result<SeenEntry, StoreError>> {
        self.list_seen_under(Path::from_iter(
            std::iter::once("repositories").chain(repository.split('/')),
        ))
    }

    fn list_seen_under(&self, prefix: Path) -> BoxStream<'static, Result<SeenEntry, StoreError>> {
        self.inner
            .list(Some(&prefix))
            .filter_map(|r| async move {
                match r {
                    Err(e) => Some(Err(StoreError::from(e))),
                    Ok(meta) => {
                        let parts: Vec<String> = meta
                            .location
                            .parts()
                            .map(|p| p.as_ref().to_owned())
                            .collect();
                        // repositories/<name...>/_seen/sha256/<hex>
                        let n = parts.len();
                        if n < 5 || parts.get(n - 3).map(String::as_str) != Some("_seen") {
                            return None;
                        }
                        let repository = parts.get(1..n - 3)?.join("/");
                        let digest = format!("sha256:{}", parts.get(n - 1)?);
                        crate::oci::is_sha256_digest(&digest).then_some(Ok(SeenEntry {
                            repository,
                            digest,
                            last_seen: meta.last_modified.timestamp(),
                        }))
                    }
                }
            })
            .boxed()
    }
}

/// A content object being written from a stream; see [`Store::upload`].
pub struct Upload {
    digest: String,
    writer: WriteMultipart,
    hasher: Sha256,
    written: u64,
}

impl Upload {
    /// Appends a chunk (waits while earlier parts are still being sent).
    pub async fn write(&mut self, chunk: &Bytes) -> Result<(), StoreError> {
        self.writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
        self.hasher.update(chunk);
        self.writer.put(chunk.clone());
        self.written += chunk.len() as u64;
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Makes the object visible if what was written hashes to its digest; else discards it.
    pub async fn finish(self) -> Result<u64, StoreError> {
        let found = format!("sha256:{:x}", self.hasher.finalize());
        if found != self.digest {
            let _ = self.writer.abort().await;
            return Err(StoreError::Mismatch {
                digest: self.digest,
                found,
            });
        }
        self.writer.finish().await?;
        Ok(self.written)
    }

    /// Discards what was written.
    pub async fn abort(self) {
        let _ = self.writer.abort().await;
    }
}
