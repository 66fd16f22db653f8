//! Repair: give the registry back what it lost, from the vault, and prove it by reading it back.
//!
//! A plan is made per lost reference (a child manifest, or a blob of an image): what the
//! registry no longer serves intact is found by GET (a HEAD can lie: registry 2.8's in-memory
//! blob descriptor cache answers 200 for blobs a garbage collection deleted), and each piece is
//! taken from the vault as seen in that repository. Blobs go first (plain POST + PUT
//! `?digest=`: a mount would need another repository that still has them), then manifests,
//! children before parents, each PUT by digest with its exact bytes and media type. Every
//! piece is then read back by GET and hashed. PUTting the same bytes twice is harmless, so
//! several replicas repairing at once do no damage; one process repairs a (repository,
//! digest) once at a time.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{header, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use sha2::{Digest as _, Sha256};

use crate::config::Upstream;
use crate::oci::{Manifest, RefKind, MAX_MANIFEST_BYTES};
use crate::upstream::{own_request, UpstreamBody, UpstreamClient};
use crate::vault::{StoreError, Vault};

/// Nested indexes followed at most.
const MAX_DEPTH: u32 = 8;

pub use super::plan::{Lost, Plan, Result_, Role, Step};

/// What one repair came to.
#[derive(Debug)]
pub enum Outcome {
    /// The registry serves it intact: nothing done.
    Intact,
    /// Every step done and read back.
    Repaired(Plan),
    /// Nothing done: the vault lacks what the plan names.
    Unrepairable(Plan),
    /// Another repair of the same reference is running in this process.
    Busy,
    Failed(RepairError),
}

impl Outcome {
    /// The counted result (`None`: nothing to count).
    pub fn result(&self) -> Option<Result_> {
        match self {
            Outcome::Repaired(_) => Some(Result_::Repaired),
            Outcome::Unrepairable(_) => Some(Result_::Unrepairable),
            Outcome::Failed(_) => Some(Result_::Failed),
            Outcome::Intact | Outcome::Busy => None,
        }
    }
}

/// Why a repair could not be made or finished.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(transparent)]
    Vault(#[from] StoreError),
    #[error("registry: {0}")]
    Registry(String),
    #[error("the registry refused the repair credentials ({0}): set [heal] credentials_file to an account allowed to push")]
    Unauthorized(u16),
    #[error("read back after repair: {0}")]
    Verify(String),
}

/// Repairs references in one registry from one vault.
pub struct Repairer {
    vault: Arc<Vault>,
    client: UpstreamClient,
    upstream: Upstream,
    auth: Option<HeaderValue>,
    timeout: Duration,
    busy: Mutex<HashSet<(String, String)>>,
}

/// Releases a (repository, digest) when its repair ends.
struct Claim<'a> {
    busy: &'a Mutex<HashSet<(String, String)>>,
    key: (String, String),
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

impl Repairer {
    pub fn new(
        vault: Arc<Vault>,
        client: UpstreamClient,
        upstream: Upstream,
        auth: Option<HeaderValue>,
        timeout: Duration,
    ) -> Self {
        Repairer {
            vault,
            client,
            upstream,
            auth,
            timeout,
            busy: Mutex::new(HashSet::new()),
        }
    }

    /// Plans and, unless `dry_run`, carries out the repair of `digest` in `repository`.
    /// `on_step` hears each step before it runs.
    pub async fn repair(
        &self,
        repository: &str,
        digest: &str,
        kind: RefKind,
        dry_run: bool,
        mut on_step: impl FnMut(&Step),
    ) -> Outcome {
        let key = (repository.to_owned(), digest.to_owned());
        if !self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
        {
            return Outcome::Busy;
        }
        let _claim = Claim {
            busy: &self.busy,
            key,
        };
        let plan = match self.plan(repository, digest, kind).await {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(e),
        };
        if !plan.lost.is_empty() {
            return Outcome::Unrepairable(plan);
        }
        if plan.steps.is_empty() {
            return Outcome::Intact;
        }
        if dry_run {
            for step in &plan.steps {
                on_step(step);
            }
            return Outcome::Repaired(plan);
        }
        for step in &plan.steps {
            on_step(step);
            if let Err(e) = self.execute(repository, step).await {
                return Outcome::Failed(e);
            }
        }
        Outcome::Repaired(plan)
    }

    /// What repairing `digest` in `repository` takes (nothing is changed).
    pub async fn plan(
        &self,
        repository: &str,
        digest: &str,
        kind: RefKind,
    ) -> Result<Plan, RepairError> {
        let mut plan = Plan {
            repository: repository.to_owned(),
            digest: digest.to_owned(),
            ..Plan::default()
        };
        let mut visited = HashSet::new();
        match kind {
            RefKind::Manifest => {
                let mut manifests = Vec::new();
                self.plan_manifest(
                    repository,
                    digest,
                    0,
                    &mut plan,
                    &mut manifests,
                    &mut visited,
                )
                .await?;
                plan.steps.extend(manifests);
            }
            RefKind::Blob => {
                self.plan_blob(repository, digest, 0, Role::Blob, &mut plan, &mut visited)
                    .await?
            }
        }
        Ok(plan)
    }

    /// Plans a manifest: its blobs go to `plan.steps` as found, its own PUT (after its
    /// children's) to `manifests`.
    async fn plan_manifest(
        &self,
        repository: &str,
        digest: &str,
        depth: u32,
        plan: &mut Plan,
        manifests: &mut Vec<Step>,
        visited: &mut HashSet<String>,
    ) -> Result<(), RepairError> {
        if !visited.insert(digest.to_owned()) || depth > MAX_DEPTH {
            return Ok(());
        }
        let in_registry = self.registry_manifest(repository, digest).await?;
        let kept = match self.vault.manifest(repository, digest).await {
            Ok(found) => found,
            // Counted and logged by the vault; a damaged copy is no copy.
            Err(StoreError::Corrupt { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        let (bytes, media_type) = match (in_registry, kept) {
            (Some((bytes, media_type)), _) => (bytes, media_type),
            (None, Some((seen, bytes))) => {
                // Its children first, then it.
                let body = bytes.clone();
                self.plan_children(
                    repository,
                    &body,
                    &seen.media_type,
                    depth,
                    plan,
                    manifests,
                    visited,
                )
                .await?;
                manifests.push(Step::PutManifest {
                    digest: digest.to_owned(),
                    media_type: seen.media_type,
                });
                return Ok(());
            }
            (None, None) => {
                plan.lost.push(Lost {
                    digest: digest.to_owned(),
                    role: Role::Manifest,
                });
                return Ok(());
            }
        };
        self.plan_children(
            repository,
            &bytes,
            &media_type,
            depth,
            plan,
            manifests,
            visited,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn plan_children(
        &self,
        repository: &str,
        body: &Bytes,
        media_type: &str,
        depth: u32,
        plan: &mut Plan,
        manifests: &mut Vec<Step>,
        visited: &mut HashSet<String>,
    ) -> Result<(), RepairError> {
        let Ok(manifest) = Manifest::parse(body, crate::oci::manifest_kind(media_type)) else {
            return Ok(());
        };
        match manifest {
            Manifest::Index {
                manifests: children,
            } => {
                for child in children
                    .iter()
                    .filter(|c| crate::oci::is_sha256_digest(&c.digest))
                {
                    Box::pin(self.plan_manifest(
                        repository,
                        &child.digest,
                        depth + 1,
                        plan,
                        manifests,
                        visited,
                    ))
                    .await?;
                }
            }
            Manifest::Image { config, layers } => {
                let blobs = std::iter::once((config, Role::Config))
                    .chain(layers.into_iter().map(|l| (l, Role::Layer)))
                    .filter(|(d, _)| d.urls.is_empty() && crate::oci::is_sha256_digest(&d.digest));
                for (d, role) in blobs {
                    self.plan_blob(repository, &d.digest, d.size, role, plan, visited)
                        .await?;
                }
            }
        }
        Ok(())
    }

    async fn plan_blob(
        &self,
        repository: &str,
        digest: &str,
        size: u64,
        role: Role,
        plan: &mut Plan,
        visited: &mut HashSet<String>,
    ) -> Result<(), RepairError> {
        if !visited.insert(digest.to_owned()) || self.registry_blob(repository, digest).await? {
            return Ok(());
        }
        if self.vault.holds(repository, digest).await? {
            let size = match self.vault.store().content_size(digest).await? {
                Some(s) => s,
                None => size,
            };
            plan.steps.push(Step::UploadBlob {
                digest: digest.to_owned(),
                size,
                role,
            });
        } else {
            plan.lost.push(Lost {
                digest: digest.to_owned(),
                role,
            });
        }
        Ok(())
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: UpstreamBody,
    ) -> Result<http::Request<UpstreamBody>, RepairError> {
        own_request(&self.upstream, method, path, self.auth.as_ref(), body)
            .map_err(|e| RepairError::Registry(e.to_string()))
    }

    async fn send(
        &self,
        req: http::Request<UpstreamBody>,
        timeout: Duration,
    ) -> Result<http::Response<hyper::body::Incoming>, RepairError> {
        let what = format!("{} {}", req.method(), req.uri().path());
        let resp = tokio::time::timeout(timeout, self.client.request(req))
            .await
            .map_err(|_| RepairError::Registry(format!("{what}: no answer within {timeout:?}")))?
            .map_err(|e| RepairError::Registry(format!("{what}: {e}")))?;
        match resp.status() {
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                Err(RepairError::Unauthorized(s.as_u16()))
            }
            _ => Ok(resp),
        }
    }

    /// The registry's copy of a manifest, if it serves it intact: (bytes, media type).
    async fn registry_manifest(
        &self,
        repository: &str,
        digest: &str,
    ) -> Result<Option<(Bytes, String)>, RepairError> {
        let mut req = self.request(
            Method::GET,
            &format!("/v2/{repository}/manifests/{digest}"),
            UpstreamBody::empty(),
        )?;
        req.headers_mut()
            .insert(header::ACCEPT, crate::oci::accept_all());
        let resp = self.send(req, self.timeout).await?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            s => {
                return Err(RepairError::Registry(format!(
                    "GET manifest {digest} answered {s}"
                )))
            }
        }
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| crate::oci::media_type_essence(v).to_owned())
            .unwrap_or_default();
        let body = tokio::time::timeout(
            self.timeout,
            Limited::new(resp.into_body(), MAX_MANIFEST_BYTES).collect(),
        )
        .await
        .map_err(|_| RepairError::Registry("manifest body too slow".into()))?
        .map_err(|e| RepairError::Registry(format!("reading manifest: {e}")))?
        .to_bytes();
        Ok((crate::oci::sha256_digest(&body) == digest).then_some((body, media_type)))
    }

    /// Whether the registry serves this blob intact: HEAD, then (because a HEAD can lie) a
    /// GET whose bytes are hashed.
    async fn registry_blob(&self, repository: &str, digest: &str) -> Result<bool, RepairError> {
        let path = format!("/v2/{repository}/blobs/{digest}");
        let head = self
            .send(
                self.request(Method::HEAD, &path, UpstreamBody::empty())?,
                self.timeout,
            )
            .await?;
        if head.status() == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        // A storage backend that redirects blob reads (S3, GCS, the redirect middleware):
        // the registry has the blob; its bytes live behind the redirect.
        if head.status().is_redirection() {
            return Ok(true);
        }
        let resp = self
            .send(
                self.request(Method::GET, &path, UpstreamBody::empty())?,
                self.timeout,
            )
            .await?;
        if resp.status() != StatusCode::OK {
            return Ok(false);
        }
        let mut body = resp.into_body();
        let mut hasher = Sha256::new();
        loop {
            match tokio::time::timeout(self.timeout, body.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        hasher.update(d);
                    }
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(RepairError::Registry(format!("GET {digest}: {e}")))
                }
                Err(_) => return Err(RepairError::Registry(format!("GET {digest} stalled"))),
            }
        }
        Ok(format!("sha256:{:x}", hasher.finalize()) == digest)
    }

    async fn execute(&self, repository: &str, step: &Step) -> Result<(), RepairError> {
        match step {
            Step::UploadBlob { digest, .. } => {
                self.upload_blob(repository, digest).await?;
                if !self.registry_blob(repository, digest).await? {
                    return Err(RepairError::Verify(format!(
                        "{digest} does not read back intact"
                    )));
                }
            }
            Step::PutManifest { digest, .. } => {
                self.put_manifest(repository, digest).await?;
                if self.registry_manifest(repository, digest).await?.is_none() {
                    return Err(RepairError::Verify(format!(
                        "manifest {digest} does not read back intact"
                    )));
                }
            }
        }
        Ok(())
    }

    async fn upload_blob(&self, repository: &str, digest: &str) -> Result<(), RepairError> {
        let (_, size) =
            self.vault.blob(repository, digest).await?.ok_or_else(|| {
                RepairError::Verify(format!("the vault no longer holds {digest}"))
            })?;
        let mut start = self.request(
            Method::POST,
            &format!("/v2/{repository}/blobs/uploads/"),
            UpstreamBody::empty(),
        )?;
        start
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let resp = self.send(start, self.timeout).await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(RepairError::Registry(format!(
                "starting an upload of {digest} answered {}",
                resp.status()
            )));
        }
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(path_of_location)
            .ok_or_else(|| RepairError::Registry("upload answered without a Location".into()))?;
        let separator = if location.contains('?') { '&' } else { '?' };
        let path = format!("{location}{separator}digest={digest}");
        let Some((stream, _)) = self.vault.store().stream(digest, None).await? else {
            return Err(RepairError::Verify(format!(
                "the vault no longer holds {digest}"
            )));
        };
        let frames = stream.map(|r| {
            r.map(http_body::Frame::data)
                .map_err(|e| Box::new(e) as crate::body::BoxError)
        });
        let body = UpstreamBody::Stream {
            body: http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(frames)),
        };
        let mut put = self.request(Method::PUT, &path, body)?;
        put.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        put.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        // A large blob takes a while: allow a minute per 64 MiB beyond the usual deadline.
        let allowance = self.timeout + Duration::from_secs(60 * (size / (64 << 20)));
        let resp = self.send(put, allowance).await?;
        if resp.status() != StatusCode::CREATED {
            return Err(RepairError::Registry(format!(
                "uploading {digest} answered {}",
                resp.status()
            )));
        }
        Ok(())
    }

    async fn put_manifest(&self, repository: &str, digest: &str) -> Result<(), RepairError> {
        let (seen, bytes) = self
            .vault
            .manifest(repository, digest)
            .await?
            .ok_or_else(|| RepairError::Verify(format!("the vault no longer holds {digest}")))?;
        let mut put = self.request(
            Method::PUT,
            &format!("/v2/{repository}/manifests/{digest}"),
            UpstreamBody::Full { data: Some(bytes) },
        )?;
        let content_type = HeaderValue::from_str(&seen.media_type)
            .map_err(|_| RepairError::Registry(format!("unusable media type for {digest}")))?;
        put.headers_mut().insert(header::CONTENT_TYPE, content_type);
        let resp = self.send(put, self.timeout).await?;
        if resp.status() != StatusCode::CREATED {
            let status = resp.status();
            let body = Limited::new(resp.into_body(), 4096)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            return Err(RepairError::Registry(format!(
                "PUT manifest {digest} answered {status}: {}",
                body.trim()
            )));
        }
        let answered = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if answered != digest {
            return Err(RepairError::Verify(format!(
                "PUT manifest {digest}: the registry stored it as {answered:?}"
            )));
        }
        Ok(())
    }
}

/// The path and query of an upload `Location`, absolute (as registry 2.8 sends it) or not.
fn path_of_location(location: &str) -> Option<String> {
    if location.starts_with('/') {
        return Some(location.to_owned());
    }
    let uri: http::Uri = location.parse().ok()?;
    uri.path_and_query().map(|pq| pq.as_str().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_location_absolute_or_relative_gives_path_and_query() {
        assert_eq!(
            path_of_location("http://127.0.0.1:5000/v2/a/blobs/uploads/u?_state=x").as_deref(),
            Some("/v2/a/blobs/uploads/u?_state=x")
        );
        assert_eq!(
            path_of_location("/v2/a/blobs/uploads/u").as_deref(),
            Some("/v2/a/blobs/uploads/u")
        );
    }

    #[test]
    fn unrepairable_names_what_to_re_push() {
        let plan = Plan {
            lost: vec![Lost {
                digest: "sha256:ab".into(),
                role: Role::Layer,
            }],
            ..Plan::default()
        };
        assert_eq!(
            plan.unrepairable().as_deref(),
            Some("unrepairable: layer sha256:ab not in vault")
        );
    }
}
