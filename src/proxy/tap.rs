//! The response tap: what a served manifest (or a 404 by digest, or a 304) tells
//! validation, handed over without delaying the client. Phase 4½ of the request.

use super::*;

static DOCKER_CONTENT_DIGEST: header::HeaderName =
    header::HeaderName::from_static("docker-content-digest");

/// What the response tap needs to know about a manifest or blob read
/// (the repository is the exchange's own copy).
pub(super) struct ReadCtx {
    kind: RefKind,
    reference: String,
    auth: Option<HeaderValue>,
    /// The client's `Accept`: a 404 for an OCI manifest is conclusive only if it names the type.
    accept: Option<HeaderValue>,
    /// The client's `If-None-Match`: a 304 carries no digest, but matched one of these.
    if_none_match: Option<HeaderValue>,
    head: bool,
}

/// A served manifest the vault wants, and how to hand it over.
struct VaultKeep {
    vault: Arc<crate::vault::Vault>,
    repository: String,
    digest: String,
    media_type: String,
    auth: Option<HeaderValue>,
}

impl VaultKeep {
    /// With the body copied as it streamed.
    fn with_body(self, body: Bytes) {
        let auth = self.auth.as_ref();
        (self.vault).keep_manifest(&self.repository, &self.digest, &self.media_type, body, auth);
    }

    /// Without a copy: the vault's filler fetches the manifest by digest.
    fn fetch(self) {
        let auth = self.auth.as_ref();
        let kind = RefKind::Manifest;
        (self.vault).keep_reference(&self.repository, &self.digest, &self.media_type, kind, auth);
    }
}

impl Proxy {
    /// For GET/HEAD of a manifest or blob with validation on: what the tap will need.
    pub(super) fn read_ctx(
        &self,
        req: &Request<Incoming>,
        route: &route::Route<'_>,
    ) -> Option<ReadCtx> {
        if self.validation.is_none() && self.vault.is_none() {
            return None;
        }
        let kind = match route.kind {
            RouteKind::Manifest => RefKind::Manifest,
            RouteKind::Blob => RefKind::Blob,
            _ => return None,
        };
        let head = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return None,
        };
        route.repository?;
        Some(ReadCtx {
            kind,
            reference: route.reference?.to_owned(),
            auth: req.headers().get(header::AUTHORIZATION).cloned(),
            accept: req.headers().get(header::ACCEPT).cloned(),
            if_none_match: req.headers().get(header::IF_NONE_MATCH).cloned(),
            head,
        })
    }

    /// Phase 4½: hand a served manifest to validation and the vault; count 404s by digest.
    /// Never delays the response: a HEAD's job is queued now, a GET's body is copied as it streams.
    pub(super) fn tap_response(
        &self,
        read: ReadCtx,
        repository: &str,
        resp: &mut Response<ResponseBody>,
    ) {
        let status = resp.status();
        if let Some(v) = &self.validation {
            if status == StatusCode::NOT_FOUND && oci::is_sha256_digest(&read.reference) {
                self.client_not_found(v, &read, repository);
                return;
            }
            if read.kind == RefKind::Manifest && status == StatusCode::NOT_MODIFIED {
                self.not_modified(v, read, repository, resp);
                return;
            }
        }
        if status != StatusCode::OK || read.kind != RefKind::Manifest {
            return;
        }
        // Borrowed until it is known that something is to be done: a recently validated
        // index (the steady state of a pulled tag) allocates nothing here.
        let headers = resp.headers();
        let media_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|ct| ct.to_str().ok())
            .map_or("", oci::media_type_essence);
        let kind = oci::manifest_kind(media_type);
        let digest = headers
            .get(&DOCKER_CONTENT_DIGEST)
            .and_then(|d| d.to_str().ok())
            .filter(|d| oci::is_sha256_digest(d));
        // The vault wants each manifest once an hour per repository (its record's refresh).
        let keep = match (&self.vault, digest) {
            (Some(vault), Some(d)) if kind.is_some() && vault.wants(repository, d) => {
                Some(VaultKeep {
                    vault: vault.clone(),
                    repository: repository.to_owned(),
                    digest: d.to_owned(),
                    media_type: media_type.to_owned(),
                    auth: read.auth.clone(),
                })
            }
            _ => None,
        };
        let job = self.validation.as_ref().and_then(|v| {
            match kind {
                Some(ManifestKind::Index) => {}
                Some(ManifestKind::Image) if v.blobs => {}
                _ => return None,
            }
            let kind = kind.unwrap_or(ManifestKind::Index);
            if let Some(d) = digest {
                if v.validator.recently_ok(repository, d, kind, v.blobs) {
                    return None;
                }
            }
            Some((
                v.validator.clone(),
                Job {
                    digest: digest.map(str::to_owned),
                    repository: repository.to_owned(),
                    reference: read.reference.clone(),
                    body: None,
                    held: None,
                    kind,
                    auth: read.auth.clone(),
                    seen_at: Instant::now().into_std(),
                    blobs: v.blobs,
                },
            ))
        });
        if job.is_none() && keep.is_none() {
            return;
        }
        if read.head {
            if let Some((validator, job)) = job {
                validator.submit(job);
            }
            if let Some(k) = keep {
                k.fetch();
            }
            return;
        }
        // The copy counts against the manifest memory budget; with no room (or no known
        // length) the job goes now without a body, and validation fetches the manifest.
        let length = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|n| *n <= oci::MAX_MANIFEST_BYTES);
        let held = match (length, &self.gate) {
            (Some(n), Some(gate)) => gate.budget.try_hold(n),
            _ => None,
        };
        let Some(held) = held else {
            if let Some((validator, job)) = job {
                validator.submit(job);
            }
            if let Some(k) = keep {
                k.fetch();
            }
            return;
        };
        let limit = held.bytes().min(oci::MAX_MANIFEST_BYTES);
        let deliver: crate::body::Deliver = Box::new(move |copy| {
            if let Some(k) = keep {
                match &copy {
                    Some(body) => k.with_body(body.clone()),
                    None => k.fetch(),
                }
            }
            if let Some((validator, mut job)) = job {
                if let Some(body) = copy {
                    job.body = Some(body);
                    job.held = Some(held); // given back when the job is done
                }
                validator.submit(job);
            }
        });
        resp.body_mut().tap(Tap::new(limit, deliver))
    }

    /// A 404 by digest: evidence for validation (conclusive only if the client's `Accept`
    /// named the type it would have had).
    fn client_not_found(&self, v: &Validation, read: &ReadCtx, repository: &str) {
        let accept = read.accept.as_ref().and_then(|a| a.to_str().ok());
        v.validator.client_not_found(
            read.kind,
            repository,
            &read.reference,
            read.auth.as_ref(),
            accept.unwrap_or(""),
        );
    }

    /// A conditional GET the client already had the body for: still validated. The
    /// registry's 304 names no digest; it matched the one the client sent (its ETag
    /// is `"<digest>"`), and the worker fetches the manifest by it.
    fn not_modified(
        &self,
        v: &Validation,
        read: ReadCtx,
        repository: &str,
        resp: &Response<ResponseBody>,
    ) {
        let digest = [&DOCKER_CONTENT_DIGEST, &header::ETAG]
            .into_iter()
            .filter_map(|h| resp.headers().get(h))
            .chain(read.if_none_match.as_ref())
            .find_map(|v| {
                let v = v
                    .to_str()
                    .ok()?
                    .trim()
                    .trim_start_matches("W/")
                    .trim_matches('"');
                oci::is_sha256_digest(v).then(|| v.to_owned())
            });
        if let Some(d) = digest {
            if !v
                .validator
                .recently_ok(repository, &d, ManifestKind::Index, v.blobs)
            {
                v.validator.submit(Job {
                    digest: Some(d),
                    repository: repository.to_owned(),
                    reference: read.reference,
                    body: None,
                    held: None,
                    kind: ManifestKind::Index,
                    auth: read.auth,
                    seen_at: Instant::now().into_std(),
                    blobs: v.blobs,
                });
            }
        }
    }
}
