//! The response tap: what a served manifest (or a 404 by digest, or a 304) tells
//! validation, handed over without delaying the client. Phase 4½ of the request.

use super::*;

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

impl Proxy {
    /// For GET/HEAD of a manifest or blob with validation on: what the tap will need.
    pub(super) fn read_ctx(
        &self,
        req: &Request<Incoming>,
        route: &route::Route<'_>,
    ) -> Option<ReadCtx> {
        self.validation.as_ref()?;
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

    /// Phase 4½: hand a served manifest to validation; count 404s by digest.
    /// Never delays the response: a HEAD's job is queued now, a GET's body is copied as it streams.
    pub(super) fn tap_response(
        &self,
        read: ReadCtx,
        repository: &str,
        resp: &mut Response<ResponseBody>,
    ) {
        let Some(v) = &self.validation else { return };
        let status = resp.status();
        if status == StatusCode::NOT_FOUND && oci::is_sha256_digest(&read.reference) {
            let accept = read.accept.as_ref().and_then(|a| a.to_str().ok());
            v.validator.client_not_found(
                read.kind,
                repository,
                &read.reference,
                read.auth.as_ref(),
                |media_type| {
                    !media_type.is_empty()
                        && accept.is_some_and(|a| {
                            a.split(',').any(|t| oci::same_media_type(t, media_type))
                        })
                },
            );
            return;
        }
        if read.kind != RefKind::Manifest {
            return;
        }
        if status == StatusCode::NOT_MODIFIED {
            // A conditional GET the client already had the body for: still validated. The
            // registry's 304 names no digest; it matched the one the client sent (its ETag
            // is `"<digest>"`), and the worker fetches the manifest by it.
            let digest = ["docker-content-digest", "etag"]
                .iter()
                .filter_map(|h| resp.headers().get(*h))
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
            return;
        }
        if status != StatusCode::OK {
            return;
        }
        let kind = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|ct| ct.to_str().ok())
            .and_then(oci::manifest_kind);
        match kind {
            Some(ManifestKind::Index) => {}
            Some(ManifestKind::Image) if v.blobs => {}
            _ => return,
        }
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|d| d.to_str().ok())
            .filter(|d| oci::is_sha256_digest(d))
            .map(str::to_owned);
        let kind = kind.unwrap_or(ManifestKind::Index);
        if let Some(d) = &digest {
            if v.validator.recently_ok(repository, d, kind, v.blobs) {
                return;
            }
        }
        let job = Job {
            digest,
            repository: repository.to_owned(),
            reference: read.reference,
            body: None,
            held: None,
            kind,
            auth: read.auth,
            seen_at: Instant::now().into_std(),
            blobs: v.blobs,
        };
        if read.head {
            v.validator.submit(job);
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
        match held {
            Some(held) => {
                let limit = held.bytes().min(oci::MAX_MANIFEST_BYTES);
                let validator = v.validator.clone();
                let deliver: crate::body::Deliver = Box::new(move |copy| {
                    let mut job = job;
                    if let Some(body) = copy {
                        job.body = Some(body);
                        job.held = Some(held); // given back when the job is done
                    }
                    validator.submit(job);
                });
                resp.body_mut().tap(Tap::new(limit, deliver))
            }
            None => v.validator.submit(job),
        }
    }
}
