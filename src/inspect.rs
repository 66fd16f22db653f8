//! `regguard check`: one image, deeply, as a tree: the index, each child with its platform,
//! and each child image's config and layers, every reference asked through the shared
//! [`Checker`] (same requests, same verdicts as validation and the gate). Also the words of
//! the CLI's results: references as people paste them, attestations named after the image
//! they describe, and the runbook's repair step beside each broken reference.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderValue, StatusCode};
use serde::Serialize;

use crate::checker::{Checker, Outcome, OverBudget, RefKind, Walk};
use crate::cli_auth::{registry_words, Credentials, Problem, RegistryAccess};
use crate::oci::{Descriptor, Manifest};

/// An image reference as people paste it: `[http[s]://]host[:port]/repo[:tag|@digest]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `http` or `https` when the reference said so.
    pub scheme: Option<&'static str>,
    pub host: String,
    pub repository: String,
    /// A tag or a digest (`sha256:<64 hex>`).
    pub reference: String,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self, String> {
        let trimmed = s.trim();
        let lower = trimmed.to_ascii_lowercase();
        let (scheme, rest) = if lower.starts_with("https://") {
            (Some("https"), trimmed.get(8..).unwrap_or(""))
        } else if lower.starts_with("http://") {
            (Some("http"), trimmed.get(7..).unwrap_or(""))
        } else if lower.starts_with("docker://") {
            (None, trimmed.get(9..).unwrap_or(""))
        } else {
            (None, trimmed)
        };
        let rest = rest.trim_end_matches('/');
        let usage = "expected [http[s]://]HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST]";
        let (host, path) = rest
            .split_once('/')
            .ok_or_else(|| format!("`{s}`: names no repository; {usage}"))?;
        if host.is_empty() {
            return Err(format!("`{s}`: no registry host; {usage}"));
        }
        if scheme.is_none() && !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(format!("`{s}`: the first component `{host}` is not a registry host (add the host, e.g. registry.example:5050/{s})"));
        }
        let (name, reference) = match path.split_once('@') {
            Some((name, digest)) => {
                check_digest(digest).map_err(|e| format!("`{s}`: {e}"))?;
                // `repo:tag@digest`: the digest decides, as docker does.
                let name = match name.rsplit_once(':') {
                    Some((n, _)) => n,
                    None => name,
                };
                (name, digest.to_string())
            }
            None => match path.rsplit_once(':') {
                Some((name, tag)) if !tag.contains('/') => {
                    // `repo:sha256:<hex>`, the form the issue saw printed: say where `@` goes.
                    if let Some((name, hex)) = name
                        .strip_suffix(":sha256")
                        .map(|n| (n, tag))
                        .or_else(|| (tag == "sha256").then_some((name, "")))
                    {
                        return Err(format!(
                            "`{s}`: a digest follows `@`, not `:` ({host}/{name}@sha256:{hex})"
                        ));
                    }
                    check_tag(tag).map_err(|e| format!("`{s}`: {e}"))?;
                    (name, tag.to_string())
                }
                _ => (path, "latest".to_string()),
            },
        };
        check_repository(name).map_err(|e| format!("`{s}`: {e}"))?;
        Ok(ImageRef {
            scheme,
            host: host.to_string(),
            repository: name.to_string(),
            reference,
        })
    }

    pub fn is_digest(&self) -> bool {
        self.reference.contains(':')
    }

    /// `repo:tag` or `repo@sha256:…`.
    pub fn name(&self) -> String {
        at(&self.repository, &self.reference)
    }

    /// `host/repo:tag` or `host/repo@sha256:…`.
    pub fn display(&self) -> String {
        format!("{}/{}", self.host, self.name())
    }
}

/// `repo:tag` or `repo@digest`, whichever `reference` is.
pub fn at(repo: &str, reference: &str) -> String {
    if reference.contains(':') {
        format!("{repo}@{reference}")
    } else {
        format!("{repo}:{reference}")
    }
}

/// A digest's syntax, as the registry would judge it, checked before anything is sent.
fn check_digest(d: &str) -> Result<(), String> {
    let (algorithm, hex) = d
        .split_once(':')
        .ok_or_else(|| format!("`{d}` is not a digest (expected sha256:<64 hex digits>)"))?;
    let want = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        other => {
            return Err(format!(
                "digest algorithm `{other}` is not one a registry knows (sha256, sha384, sha512)"
            ))
        }
    };
    if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!(
            "`{d}`: a digest's hex part is lowercase 0-9a-f only"
        ));
    }
    if hex.len() != want {
        return Err(format!(
            "`{d}`: a {algorithm} digest has {want} hex digits, this one has {}",
            hex.len()
        ));
    }
    Ok(())
}

fn check_tag(t: &str) -> Result<(), String> {
    let ok = t.len() <= 128
        && t.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("`{t}` is not a valid tag (letters, digits, `_`, `.`, `-`; at most 128; not starting with `.` or `-`)"))
    }
}

fn check_repository(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty repository name".into());
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "repository names are lowercase: `{}`",
            name.to_ascii_lowercase()
        ));
    }
    for part in name.split('/') {
        let edges_ok = part
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
            && part
                .bytes()
                .last()
                .is_some_and(|b| b.is_ascii_alphanumeric());
        if !edges_ok
            || !part.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            })
        {
            return Err(format!("`{name}` is not a valid repository name (lowercase letters, digits and `._-` between them, components separated by `/`)"));
        }
    }
    Ok(())
}

/// One node of the checked tree.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    /// index | image | config | layer | manifest
    pub role: &'static str,
    pub digest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// ok | missing | mismatch | unauthorized | error
    pub result: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Node>,
}

impl Node {
    /// Counts (broken, could-not-check) in this subtree.
    pub fn tally(&self) -> (usize, usize) {
        let own = match self.result {
            "missing" | "mismatch" => (1, 0),
            "unauthorized" | "error" => (0, 1),
            _ => (0, 0),
        };
        self.children.iter().fold(own, |(b, e), c| {
            let (cb, ce) = c.tally();
            (b + cb, e + ce)
        })
    }

    /// Renders the tree, one line per node.
    pub fn render(&self, out: &mut String, prefix: &str, last: bool, root: bool) {
        let (branch, next) = if root {
            ("", "")
        } else if last {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        };
        let status = match self.result {
            "ok" => "ok".to_string(),
            other => format!("{} {}", other.to_uppercase(), self.detail),
        };
        let platform = self
            .platform
            .as_deref()
            .map(|p| format!(" {p}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "{prefix}{branch}{}{platform} {}  {status}\n",
            self.role, self.digest
        ));
        let child_prefix = format!("{prefix}{next}");
        for (i, c) in self.children.iter().enumerate() {
            c.render(out, &child_prefix, i + 1 == self.children.len(), false);
        }
    }
}

fn leaf(
    role: &'static str,
    d: &Descriptor,
    platform: Option<String>,
    outcome: &Outcome,
    kind: RefKind,
) -> Node {
    Node {
        role,
        digest: d.digest.clone(),
        platform,
        size: Some(d.size),
        result: outcome.label(),
        detail: if *outcome == Outcome::Ok {
            String::new()
        } else {
            registry_words(&outcome.describe(kind))
        },
        children: Vec::new(),
    }
}

/// Where a walk stopped because it reached its budget.
fn over_budget(d: &Descriptor, over: &OverBudget) -> Node {
    Node {
        role: "manifest",
        digest: d.digest.clone(),
        platform: None,
        size: Some(d.size),
        result: "error",
        detail: format!("not checked: {over}"),
        children: Vec::new(),
    }
}

/// Checks the image at `digest` (already resolved, see [`resolve`]) deeply. `labels` names
/// index children by digest ("attestation for linux/amd64"); others keep their platform.
pub async fn check_image(
    checker: &Arc<Checker>,
    repo: &str,
    digest: &str,
    auth: Option<&HeaderValue>,
    max_depth: u32,
    labels: &HashMap<String, String>,
) -> Result<Node, String> {
    let manifest = checker
        .manifest(repo, digest, auth)
        .await
        .map_err(|e| registry_words(&format!("{}: {e}", at(repo, digest))))?;
    let mut root = Node {
        role: "index",
        digest: digest.to_string(),
        platform: None,
        size: None,
        result: "ok",
        detail: String::new(),
        children: Vec::new(),
    };
    let mut walk = Walk::new(crate::checker::DEFAULT_MAX_REFERENCES);
    match manifest.as_ref() {
        Manifest::Index { manifests } => {
            let place = Place {
                checker,
                repo,
                auth,
                max_depth,
                labels,
            };
            root.children = Box::pin(index_children(&place, manifests, 1, &mut walk)).await;
        }
        Manifest::Image { .. } => {
            root.role = "image";
            root.children = image_blobs(checker, repo, &manifest, auth, &mut walk).await;
        }
    }
    Ok(root)
}

/// What stays the same down one image's tree.
struct Place<'a> {
    checker: &'a Arc<Checker>,
    repo: &'a str,
    auth: Option<&'a HeaderValue>,
    max_depth: u32,
    labels: &'a HashMap<String, String>,
}

async fn index_children(
    place: &Place<'_>,
    children: &[Descriptor],
    depth: u32,
    walk: &mut Walk,
) -> Vec<Node> {
    let Place {
        checker,
        repo,
        auth,
        max_depth,
        labels,
    } = *place;
    let mut out = Vec::new();
    for child in children {
        match walk.visit(RefKind::Manifest, &child.digest).await {
            Ok(true) => {}
            Ok(false) => continue, // listed (and checked) once, where it first appears
            Err(over) => {
                out.push(over_budget(child, &over));
                return out;
            }
        }
        let platform = labels
            .get(&child.digest)
            .cloned()
            .or_else(|| child.platform.as_ref().map(ToString::to_string));
        let outcome = checker.check(repo, child, RefKind::Manifest, auth).await;
        let mut node = leaf("image", child, platform, &outcome, RefKind::Manifest);
        if outcome == Outcome::Ok {
            match checker.manifest(repo, &child.digest, auth).await {
                Ok(m) => match m.as_ref() {
                    Manifest::Index { manifests } if depth < max_depth => {
                        node.role = "index";
                        node.children =
                            Box::pin(index_children(place, manifests, depth + 1, walk)).await;
                    }
                    Manifest::Index { .. } => {
                        node.role = "index";
                        node.result = "error";
                        node.detail = format!("nested deeper than {max_depth}");
                    }
                    Manifest::Image { .. } => {
                        node.children = image_blobs(checker, repo, &m, auth, walk).await
                    }
                },
                Err(e) => {
                    node.result = "error";
                    node.detail = registry_words(&e.to_string());
                }
            }
        }
        out.push(node);
    }
    out
}

async fn image_blobs(
    checker: &Arc<Checker>,
    repo: &str,
    image: &Manifest,
    auth: Option<&HeaderValue>,
    walk: &mut Walk,
) -> Vec<Node> {
    let mut out = Vec::new();
    let Manifest::Image { config, layers } = image else {
        return out;
    };
    match walk.visit(RefKind::Blob, &config.digest).await {
        Ok(true) => {
            let outcome = checker.check(repo, config, RefKind::Blob, auth).await;
            out.push(leaf("config", config, None, &outcome, RefKind::Blob));
        }
        Ok(false) => {}
        Err(over) => {
            out.push(over_budget(config, &over));
            return out;
        }
    }
    for l in layers {
        if !l.urls.is_empty() {
            continue;
        }
        match walk.visit(RefKind::Blob, &l.digest).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(over) => {
                out.push(over_budget(l, &over));
                return out;
            }
        }
        let outcome = checker.check(repo, l, RefKind::Blob, auth).await;
        out.push(leaf("layer", l, None, &outcome, RefKind::Blob));
    }
    out
}

/// The README runbook's repair step for one broken reference, in one line. `image` is how
/// the image is pulled (`host/repo:tag`), `manifest` whether the broken reference is a manifest.
pub fn repair_hint(
    image: &str,
    repo: &str,
    digest: &str,
    manifest: bool,
    mismatch: bool,
) -> String {
    if mismatch {
        return format!(
            "repair: the manifest that lists {digest} describes it wrongly (size, digest or media type): rebuild {image} and push it again"
        );
    }
    if manifest {
        format!(
            "repair: push {image} again with its digests kept (skopeo copy --all --preserve-digests docker://<good-copy> docker://{image}); re-PUTting {digest}'s exact bytes by digest also recreates the link"
        )
    } else {
        format!(
            "repair: mount {digest} from a repository that has it (POST /v2/{repo}/blobs/uploads/?mount={digest}&from=<other-repo>), or push {image} again"
        )
    }
}

/// Names index children by digest: each attestation manifest (buildx marks it with
/// `vnd.docker.reference.type: attestation-manifest` and platform unknown/unknown) becomes
/// "attestation for <the platform of the image it describes>".
pub fn attestation_labels(index: &[u8]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(index) else {
        return out;
    };
    let Some(list) = v.get("manifests").and_then(|m| m.as_array()) else {
        return out;
    };
    let platform_of = |d: &serde_json::Value| -> Option<String> {
        let p = d.get("platform")?;
        let mut s = format!(
            "{}/{}",
            p.get("os")?.as_str()?,
            p.get("architecture")?.as_str()?
        );
        if let Some(v) = p
            .get("variant")
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
        {
            s.push('/');
            s.push_str(v);
        }
        Some(s)
    };
    let platforms: HashMap<&str, String> = list
        .iter()
        .filter_map(|d| Some((d.get("digest")?.as_str()?, platform_of(d)?)))
        .collect();
    for d in list {
        let annotation = |k: &str| {
            d.get("annotations")
                .and_then(|a| a.get(k))
                .and_then(|v| v.as_str())
        };
        if annotation("vnd.docker.reference.type") != Some("attestation-manifest") {
            continue;
        }
        let (Some(digest), Some(subject)) = (
            d.get("digest").and_then(|v| v.as_str()),
            annotation("vnd.docker.reference.digest"),
        ) else {
            continue;
        };
        let of = platforms
            .get(subject)
            .cloned()
            .unwrap_or_else(|| subject.to_string());
        out.insert(digest.to_string(), format!("attestation for {of}"));
    }
    out
}

/// The image a reference names, found: its digest and the names of its children.
pub struct Resolved {
    pub digest: String,
    pub labels: HashMap<String, String>,
}

/// GETs the manifest `image` names. 404 is [`Problem::NotFound`], saying whether the
/// repository or only the tag is missing, and which tags there are.
pub async fn resolve(access: &RegistryAccess, image: &ImageRef) -> Result<Resolved, Problem> {
    let scope = format!("repository:{}:pull", image.repository);
    let path = format!("/v2/{}/manifests/{}", image.repository, image.reference);
    let reply = access
        .get(&path, Some(crate::oci::ACCEPT_ALL), &scope)
        .await?;
    if reply.status == StatusCode::NOT_FOUND {
        return Err(not_found(access, image, &reply, &scope).await);
    }
    if !reply.status.is_success() {
        return Err(Problem::Other(format!(
            "{} from GET {path}{}",
            reply.status,
            reply
                .error_code()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default()
        )));
    }
    let digest = if image.is_digest() {
        image.reference.clone()
    } else {
        reply
            .headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| crate::oci::sha256_digest(&reply.body))
    };
    Ok(Resolved {
        digest,
        labels: attestation_labels(&reply.body),
    })
}

async fn not_found(
    access: &RegistryAccess,
    image: &ImageRef,
    reply: &crate::cli_auth::Reply,
    scope: &str,
) -> Problem {
    let host = &access.host;
    let repo = &image.repository;
    let code = reply.error_code().unwrap_or_else(|| "404".into());
    let no_repo = || {
        Problem::NotFound(format!(
            "repository `{repo}` does not exist on {host} (a typo, or another registry?)"
        ))
    };
    if code == "NAME_UNKNOWN" {
        return no_repo();
    }
    let tags = match access
        .get(&format!("/v2/{repo}/tags/list"), None, scope)
        .await
    {
        Ok(r) if r.status == StatusCode::NOT_FOUND => return no_repo(),
        Ok(r) if r.status.is_success() => serde_json::from_slice::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| {
                v.get("tags")?.as_array().map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(str::to_owned))
                        .collect::<Vec<_>>()
                })
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    if image.is_digest() {
        return Problem::NotFound(format!(
            "manifest {} is not in `{repo}` on {host} ({code}); if an index lists it, check that index's tag to see it as a broken reference",
            image.reference
        ));
    }
    const SHOWN: usize = 10;
    let known = if tags.is_empty() {
        "the repository has no tags".to_string()
    } else {
        let mut t = tags
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if tags.len() > SHOWN {
            t.push_str(&format!(", … ({} in all)", tags.len()));
        }
        format!("tags there: {t}")
    };
    Problem::NotFound(format!(
        "tag `{}` is not in `{repo}` on {host} ({code}); {known}",
        image.reference
    ))
}

/// The result of checking one image.
#[derive(Debug, Serialize)]
pub struct CheckResult {
    /// `host/repo:tag` or `host/repo@sha256:…`.
    pub image: String,
    /// healthy | broken | incomplete (something could not be checked) | not_found | error
    pub status: &'static str,
    pub healthy: bool,
    pub broken: usize,
    pub unchecked: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// One runbook line per broken reference.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repair: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tree: Option<Node>,
}

/// The hint added to connection failures from the CLI.
pub const INSECURE_HINT: &str =
    "if the registry speaks plain HTTP or has a self-signed certificate, pass --insecure";

/// The base URL to reach `host`: `https://` always; with `insecure`, `https://` without
/// certificate verification if the host speaks TLS, else `http://`.
pub async fn registry_url(host: &str, insecure: bool) -> String {
    if !insecure {
        return format!("https://{host}");
    }
    let pools = crate::upstream::Pools::with_tls(
        std::time::Duration::from_secs(5),
        crate::upstream::TlsVerify::None,
    );
    let probe = http::Request::get(format!("https://{host}/v2/"))
        .header(http::header::USER_AGENT, crate::upstream::user_agent())
        .body(crate::body::UpstreamBody::empty());
    let speaks_tls = match probe {
        Ok(req) => matches!(
            tokio::time::timeout(std::time::Duration::from_secs(5), pools.lean().request(req))
                .await,
            Ok(Ok(_))
        ),
        Err(_) => false,
    };
    if speaks_tls {
        format!("https://{host}")
    } else {
        format!("http://{host}")
    }
}

/// The base URL for an explicit scheme, or a probe without one. Plain HTTP needs `insecure`.
async fn base_url(scheme: Option<&str>, host: &str, insecure: bool) -> Result<String, Problem> {
    match scheme {
        Some("http") if !insecure => Err(Problem::Other(format!(
            "refusing plain HTTP (http://{host}) without --insecure: credentials and results would cross the network in clear text"
        ))),
        Some(s) => Ok(format!("{s}://{host}")),
        None => Ok(registry_url(host, insecure).await),
    }
}

impl CheckResult {
    /// The tree, a one-line verdict and the repair steps, for people (errors go to stderr).
    pub fn render_text(&self) -> String {
        let Some(tree) = &self.tree else {
            return String::new();
        };
        let mut out = format!("{}\n", self.image);
        tree.render(&mut out, "", true, true);
        let verdict = if self.healthy {
            "healthy".to_string()
        } else {
            format!("{} broken, {} not checked", self.broken, self.unchecked)
        };
        out.push_str(&format!("=> {verdict}\n"));
        for r in &self.repair {
            out.push_str(&format!("{r}\n"));
        }
        out.push('\n');
        out
    }

    fn failed(image: String, p: &Problem) -> Self {
        CheckResult {
            image,
            status: match p {
                Problem::NotFound(_) => "not_found",
                _ => "error",
            },
            healthy: false,
            broken: 0,
            unchecked: 1,
            error: Some(p.to_string()),
            repair: Vec::new(),
            tree: None,
        }
    }
}

/// Repair lines for the broken nodes of `node`'s subtree.
fn repairs(node: &Node, image: &str, repo: &str, out: &mut Vec<String>) {
    if matches!(node.result, "missing" | "mismatch") {
        let line = repair_hint(
            image,
            repo,
            &node.digest,
            matches!(node.role, "image" | "index" | "manifest"),
            node.result == "mismatch",
        );
        if !out.contains(&line) {
            out.push(line);
        }
    }
    for c in &node.children {
        repairs(c, image, repo, out);
    }
}

/// Checks one image: reach the registry, log in, resolve the reference, walk the tree.
async fn check_one(
    r: &ImageRef,
    insecure: bool,
    credentials: &Credentials,
) -> Result<Node, Problem> {
    let base = base_url(r.scheme, &r.host, insecure).await?;
    let login = credentials.for_host(&r.host).map_err(Problem::Auth)?;
    let access = RegistryAccess::new(&base, insecure, login);
    access.ping().await?;
    let resolved = resolve(&access, r).await?;
    let auth = access
        .authorization(&format!("repository:{}:pull", r.repository))
        .await?;
    let crate::checker::Standalone { checker, .. } =
        crate::checker::Standalone::new(&base, insecure, &prometheus::Registry::new())
            .map_err(Problem::Other)?;
    check_image(
        &checker,
        &r.repository,
        &resolved.digest,
        auth.as_ref(),
        4,
        &resolved.labels,
    )
    .await
    .map_err(Problem::Other)
}

/// Checks each image with the credentials for its host.
pub async fn check_all(
    refs: &[ImageRef],
    insecure: bool,
    credentials: &Credentials,
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for r in refs {
        let image = r.display();
        out.push(match check_one(r, insecure, credentials).await {
            Ok(tree) => {
                let (broken, unchecked) = tree.tally();
                let mut repair = Vec::new();
                repairs(&tree, &image, &r.repository, &mut repair);
                CheckResult {
                    image,
                    status: match (broken, unchecked) {
                        (0, 0) => "healthy",
                        (0, _) => "incomplete",
                        _ => "broken",
                    },
                    healthy: broken == 0 && unchecked == 0,
                    broken,
                    unchecked,
                    error: None,
                    repair,
                    tree: Some(tree),
                }
            }
            Err(p) => CheckResult::failed(image, &p),
        });
    }
    out
}

/// One broken reference a scan found, named and with its repair step.
#[derive(Debug, Serialize)]
pub struct Finding {
    pub repository: String,
    /// The tag (or digest) the index was found under.
    pub reference: String,
    pub index_digest: String,
    pub child_digest: String,
    /// The child's platform as the index says it (empty if none).
    pub platform: String,
    /// The platform, or "attestation for linux/amd64".
    pub subject: String,
    pub kind: RefKind,
    /// What the registry answered for it.
    pub registry_said: String,
    /// Seconds since the Unix epoch when first seen broken.
    pub since: u64,
    pub repair: String,
}

/// What `regguard scan` found, for people and for JSON.
#[derive(Debug, Serialize)]
pub struct ScanOutcome {
    pub registry: String,
    pub report: crate::scan::ScanReport,
    pub broken: Vec<Finding>,
}

impl ScanOutcome {
    /// The summary, what went wrong, and every broken reference with its repair step.
    pub fn render_text(&self) -> String {
        let r = &self.report;
        let mut out = format!(
            "registry        {}\ncatalog         {}\nrepositories    {}\ntags            {}\nindexes         {}\nbroken refs     {}\nerrors          {}\ntook            {:.1}s\n",
            self.registry,
            if r.catalog_accessible { "readable" } else { "NOT readable" },
            r.repositories,
            r.tags,
            r.indexes,
            r.broken_references,
            r.errors,
            r.duration_seconds
        );
        for p in &r.problems {
            out.push_str(&format!("ERROR {}\n", registry_words(p)));
        }
        if r.errors > r.problems.len() {
            out.push_str(&format!(
                "ERROR … and {} more\n",
                r.errors - r.problems.len()
            ));
        }
        for b in &self.broken {
            out.push_str(&format!(
                "BROKEN {} index {} -> {} {} ({}): {}\n  {}\n",
                at(&b.repository, &b.reference),
                b.index_digest,
                b.kind.as_str(),
                b.child_digest,
                b.subject,
                b.registry_said,
                b.repair
            ));
        }
        out
    }
}

/// Names and repair steps for what a scan found: attestation children (and their blobs) are
/// named after the image they describe, from the index and attestation manifests.
async fn findings(
    access: &RegistryAccess,
    host: &str,
    broken: Vec<crate::integrity::BrokenRef>,
) -> Vec<Finding> {
    let mut labels: HashMap<(String, String), HashMap<String, String>> = HashMap::new();
    let mut out = Vec::new();
    for b in broken {
        let mut subject = if b.platform.is_empty() {
            "-".to_string()
        } else {
            b.platform.clone()
        };
        if b.platform == "unknown/unknown" && !b.index_digest.is_empty() {
            let key = (b.repository.clone(), b.index_digest.clone());
            if !labels.contains_key(&key) {
                let found = attestation_subjects(access, &b.repository, &b.index_digest).await;
                labels.insert(key.clone(), found);
            }
            if let Some(l) = labels.get(&key).and_then(|m| m.get(&b.child_digest)) {
                subject = l.clone();
            }
        }
        let image = format!("{host}/{}", at(&b.repository, &b.reference));
        let repair = repair_hint(
            &image,
            &b.repository,
            &b.child_digest,
            b.kind == RefKind::Manifest,
            b.upstream_said.contains("mismatch"),
        );
        out.push(Finding {
            registry_said: registry_words(&b.upstream_said),
            repository: b.repository,
            reference: b.reference,
            index_digest: b.index_digest,
            child_digest: b.child_digest,
            platform: b.platform,
            subject,
            kind: b.kind,
            since: b.since,
            repair,
        });
    }
    out
}

/// Attestation labels of an index's children, and of each attestation manifest's blobs.
async fn attestation_subjects(
    access: &RegistryAccess,
    repo: &str,
    index_digest: &str,
) -> HashMap<String, String> {
    let scope = format!("repository:{repo}:pull");
    let get = |digest: String| {
        let scope = scope.clone();
        async move {
            access
                .get(
                    &format!("/v2/{repo}/manifests/{digest}"),
                    Some(crate::oci::ACCEPT_ALL),
                    &scope,
                )
                .await
                .ok()
                .filter(|r| r.status.is_success())
                .map(|r| r.body)
        }
    };
    let Some(index) = get(index_digest.to_string()).await else {
        return HashMap::new();
    };
    let mut labels = attestation_labels(&index);
    let children: Vec<(String, String)> = labels.clone().into_iter().collect();
    for (child, label) in children {
        let Some(body) = get(child).await else {
            continue;
        };
        if let Ok(Manifest::Image { config, layers }) = Manifest::parse(&body, None) {
            for d in std::iter::once(&config).chain(&layers) {
                labels.insert(d.digest.clone(), label.clone());
            }
        }
    }
    labels
}

/// `regguard scan`: reaches the registry (explaining why not), checks catalog access, scans.
pub async fn scan_registry(
    registry: &str,
    insecure: bool,
    credentials: &Credentials,
    page_size: u32,
    concurrency: usize,
) -> Result<ScanOutcome, Problem> {
    let trimmed = registry.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_suffix("/v2").unwrap_or(trimmed);
    let lower = trimmed.to_ascii_lowercase();
    let (scheme, host) = if lower.starts_with("https://") {
        (Some("https"), trimmed.get(8..).unwrap_or(""))
    } else if lower.starts_with("http://") {
        (Some("http"), trimmed.get(7..).unwrap_or(""))
    } else {
        (None, trimmed)
    };
    if host.is_empty() || host.contains('/') {
        return Err(Problem::Other(format!(
            "--registry `{registry}`: expected a registry address, e.g. https://registry.example:5050"
        )));
    }
    let base = base_url(scheme, host, insecure).await?;
    let login = credentials.for_host(host).map_err(Problem::Auth)?;
    let access = Arc::new(RegistryAccess::new(&base, insecure, login));
    let challenge = access.ping().await?;
    let catalog = access
        .get("/v2/_catalog?n=1", None, "registry:catalog:*")
        .await?;
    if !catalog.status.is_success() {
        return Err(Problem::Other(format!(
            "{} from GET /v2/_catalog: the registry does not list its repositories{}",
            catalog.status,
            if catalog.status == StatusCode::NOT_FOUND {
                " (a registry with the catalog turned off, or not a registry: check the address)"
            } else {
                ""
            }
        )));
    }
    let basic = match challenge {
        crate::cli_auth::Challenge::Bearer { .. } => None,
        _ => access.authorization("").await?,
    };
    let source: Arc<dyn crate::scan::ScanAuth> = access.clone();
    let once = crate::scan::scan_once(&base, insecure, basic, Some(source), page_size, concurrency)
        .await
        .map_err(|e| Problem::Other(registry_words(&e)))?;
    let broken = findings(&access, host, once.broken).await;
    Ok(ScanOutcome {
        registry: once.registry,
        report: once.report,
        broken,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_parse_as_people_paste_them() {
        let r = ImageRef::parse("registry.example:5050/infra-ci:latest").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("registry.example:5050", "infra-ci", "latest")
        );
        let r = ImageRef::parse(&format!("127.0.0.1:5000/team/app@{D}")).unwrap();
        assert_eq!(
            (r.repository.as_str(), r.reference.as_str()),
            ("team/app", D)
        );
        assert_eq!(r.display(), format!("127.0.0.1:5000/team/app@{D}"));
        let r = ImageRef::parse("reg.example/team/app").unwrap();
        assert_eq!((r.reference.as_str(), r.scheme), ("latest", None));
        let r = ImageRef::parse("http://127.0.0.1:5000/team/app:v1").unwrap();
        assert_eq!(
            (r.scheme, r.host.as_str(), r.name().as_str()),
            (Some("http"), "127.0.0.1:5000", "team/app:v1")
        );
        let r = ImageRef::parse(&format!("https://registry/app@{D}")).unwrap();
        assert_eq!((r.scheme, r.host.as_str()), (Some("https"), "registry"));
        let r = ImageRef::parse(&format!("reg.example/app:v1@{D}")).unwrap();
        assert_eq!(r.reference, D, "the digest decides");
        assert!(ImageRef::parse("team/app:v1").is_err(), "no registry host");
    }

    #[test]
    fn bad_digests_tags_and_names_are_refused_locally() {
        for (bad, says) in [
            ("reg.example/app@sha256:abc", "64 hex digits, this one has 3"),
            ("reg.example/app@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef", "lowercase"),
            ("reg.example/app@md5:00", "sha256"),
            ("reg.example/app:sha256:abc", "a digest follows `@`, not `:`"),
            ("reg.example/App:v1", "lowercase"),
            ("reg.example/app:-v1", "valid tag"),
            ("http://reg.example:5000", "names no repository"),
        ] {
            let e = ImageRef::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn attestations_are_named_after_their_image() {
        let index = serde_json::json!({"manifests": [
            {"digest": "sha256:a", "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
            {"digest": "sha256:b", "platform": {"os": "unknown", "architecture": "unknown"},
             "annotations": {"vnd.docker.reference.type": "attestation-manifest", "vnd.docker.reference.digest": "sha256:a"}}
        ]});
        let labels = attestation_labels(&serde_json::to_vec(&index).unwrap());
        assert_eq!(
            labels.get("sha256:b").map(String::as_str),
            Some("attestation for linux/arm/v7")
        );
        assert!(!labels.contains_key("sha256:a"));
    }
}
