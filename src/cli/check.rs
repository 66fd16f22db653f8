//! `regguard check`: reach each image's registry, log in, resolve the reference (a missing one
//! is "not found", never "broken"), then walk its tree with [`crate::inspect::check_image`].
//!
//! The walk and its verdicts are `inspect`'s; this module knows how to reach a registry
//! and how to report, not how to judge.

use std::collections::HashMap;

use http::StatusCode;
use serde::Serialize;

use super::access::{Problem, RegistryAccess};
use super::credentials::Credentials;
use super::reference::ImageRef;
use crate::checker::OutcomeKind;
use crate::inspect::{attestation_labels, check_image, repair_hint, Node};

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
    reply: &super::access::Reply,
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

/// How one image fared, as `status` in `regguard check --json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Healthy,
    Broken,
    /// Nothing broken found, but something could not be checked.
    Incomplete,
    NotFound,
    /// The image could not be checked at all.
    Error,
}

/// The result of checking one image.
#[derive(Debug, Serialize)]
pub struct CheckResult {
    /// `host/repo:tag` or `host/repo@sha256:…`.
    pub image: String,
    pub status: Status,
    pub healthy: bool,
    pub broken: usize,
    pub unchecked: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// One runbook line per broken reference.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repair: Vec<String>,
    /// Broken digests the vault holds for this repository (`check --vault`): `regguard heal`
    /// can put them back.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repairable: Vec<String>,
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
        .body(crate::upstream::UpstreamBody::empty());
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
pub(crate) async fn base_url(
    scheme: Option<&str>,
    host: &str,
    insecure: bool,
) -> Result<String, Problem> {
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
        for d in &self.repairable {
            out.push_str(&format!("repairable: {d} is in the vault\n"));
        }
        out.push('\n');
        out
    }

    fn failed(image: String, p: &Problem) -> Self {
        CheckResult {
            image,
            status: match p {
                Problem::NotFound(_) => Status::NotFound,
                _ => Status::Error,
            },
            healthy: false,
            broken: 0,
            unchecked: 1,
            error: Some(p.to_string()),
            repair: Vec::new(),
            repairable: Vec::new(),
            tree: None,
        }
    }

    /// The digests of this result's broken nodes.
    pub fn broken_digests(&self) -> Vec<String> {
        fn walk(n: &Node, out: &mut Vec<String>) {
            if n.result.is_broken() && !out.contains(&n.digest) {
                out.push(n.digest.clone());
            }
            for c in &n.children {
                walk(c, out);
            }
        }
        let mut out = Vec::new();
        if let Some(t) = &self.tree {
            walk(t, &mut out);
        }
        out
    }
}

/// Repair lines for the broken nodes of `node`'s subtree.
fn repairs(node: &Node, image: &str, repo: &str, out: &mut Vec<String>) {
    if node.result.is_broken() {
        let line = repair_hint(
            image,
            repo,
            &node.digest,
            node.role.is_manifest(),
            node.result == OutcomeKind::Mismatch,
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
    let login = credentials.for_host(&r.host)?;
    let access = RegistryAccess::new(&base, insecure, login);
    access.ping().await?;
    let resolved = resolve(&access, r).await?;
    let auth = access
        .authorization(&format!("repository:{}:pull", r.repository))
        .await?;
    let crate::checker::Standalone { checker, .. } =
        crate::checker::Standalone::new(&base, insecure, &prometheus::Registry::new())?;
    check_image(
        &checker,
        &r.repository,
        &resolved.digest,
        auth.as_ref(),
        4,
        &resolved.labels,
    )
    .await
    .map_err(Problem::from)
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
                        (0, 0) => Status::Healthy,
                        (0, _) => Status::Incomplete,
                        _ => Status::Broken,
                    },
                    healthy: broken == 0 && unchecked == 0,
                    broken,
                    unchecked,
                    error: None,
                    repair,
                    repairable: Vec::new(),
                    tree: Some(tree),
                }
            }
            Err(p) => CheckResult::failed(image, &p),
        });
    }
    out
}
