//! `regguard check`: one image, deeply, as a tree: the index, each child with its platform,
//! and each child image's config and layers, every reference asked through the shared
//! [`Checker`] (same requests, same verdicts as validation and the gate).

use std::sync::Arc;

use http::HeaderValue;
use serde::Serialize;

use crate::checker::{Checker, FetchError, Outcome, OverBudget, Presence, RefKind, Visit, Walk};
use crate::oci::{Descriptor, Manifest};

/// An image reference: `host[:port]/repo[:tag]` or `host[:port]/repo@sha256:…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub host: String,
    pub repository: String,
    /// A tag or a digest.
    pub reference: String,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (host, rest) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}`: expected HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]"))?;
        if !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(format!("`{s}`: the first component `{host}` is not a registry host (add the host, e.g. registry.example:5050/{s})"));
        }
        let (repository, reference) = if let Some((r, d)) = rest.split_once('@') {
            (r.to_string(), d.to_string())
        } else {
            match rest.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r.to_string(), t.to_string()),
                _ => (rest.to_string(), "latest".to_string()),
            }
        };
        if repository.is_empty() || reference.is_empty() {
            return Err(format!("`{s}`: empty repository or reference"));
        }
        Ok(ImageRef {
            host: host.to_string(),
            repository,
            reference,
        })
    }
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
            outcome.describe(kind)
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

/// Checks one image deeply. Errors only when the image itself cannot be resolved.
pub async fn check_image(
    checker: &Arc<Checker>,
    repo: &str,
    reference: &str,
    auth: Option<&HeaderValue>,
    max_depth: u32,
) -> Result<Node, String> {
    let digest = if crate::oci::is_sha256_digest(reference) {
        reference.to_string()
    } else {
        match checker
            .present(repo, reference, RefKind::Manifest, auth)
            .await
        {
            Presence::Found {
                digest: Some(d), ..
            } => d,
            Presence::Found { digest: None, .. } => {
                return Err(format!(
                    "{repo}:{reference}: the registry sent no Docker-Content-Digest"
                ))
            }
            Presence::NotFound => {
                return Ok(Node {
                    role: "manifest",
                    digest: reference.to_string(),
                    platform: None,
                    size: None,
                    result: "missing",
                    detail: "404 MANIFEST_UNKNOWN".into(),
                    children: vec![],
                })
            }
            Presence::Unauthorized(s) => {
                return Err(format!(
                    "{repo}:{reference}: not authorized ({s}); give --user or a docker config"
                ))
            }
            Presence::Error(e) => return Err(format!("{repo}:{reference}: {e}")),
        }
    };
    let manifest = checker
        .manifest(repo, &digest, auth)
        .await
        .map_err(|e| match e {
            FetchError::Unauthorized(s) => format!("{repo}@{digest}: not authorized ({s})"),
            other => format!("{repo}@{digest}: {other}"),
        })?;
    let mut root = Node {
        role: "index",
        digest: digest.clone(),
        platform: None,
        size: None,
        result: "ok",
        detail: String::new(),
        children: Vec::new(),
    };
    let mut walk = Walk::new(crate::checker::DEFAULT_MAX_REFERENCES);
    match manifest.as_ref() {
        Manifest::Index { manifests } => {
            root.children = Box::pin(index_children(
                checker, repo, manifests, auth, 1, max_depth, &mut walk,
            ))
            .await;
        }
        Manifest::Image { .. } => {
            root.role = "image";
            root.children = image_blobs(checker, repo, &manifest, auth, &mut walk).await;
        }
    }
    Ok(root)
}

async fn index_children(
    checker: &Arc<Checker>,
    repo: &str,
    children: &[Descriptor],
    auth: Option<&HeaderValue>,
    depth: u32,
    max_depth: u32,
    walk: &mut Walk,
) -> Vec<Node> {
    let mut out = Vec::new();
    for child in children {
        let walk_into = match walk.visit(RefKind::Manifest, child).await {
            Ok(Visit::First) => true,
            Ok(Visit::Variant) => false, // judged, listed once more, not walked again
            Ok(Visit::Repeat) => continue, // listed (and checked) where it first appears
            Err(over) => {
                out.push(over_budget(child, &over));
                return out;
            }
        };
        let platform = child.platform.as_ref().map(ToString::to_string);
        let outcome = checker.check(repo, child, RefKind::Manifest, auth).await;
        let mut node = leaf("image", child, platform, &outcome, RefKind::Manifest);
        if outcome == Outcome::Ok && walk_into {
            match checker.manifest(repo, &child.digest, auth).await {
                Ok(m) => match m.as_ref() {
                    Manifest::Index { manifests } if depth < max_depth => {
                        node.role = "index";
                        node.children = Box::pin(index_children(
                            checker,
                            repo,
                            manifests,
                            auth,
                            depth + 1,
                            max_depth,
                            walk,
                        ))
                        .await;
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
                    node.detail = e.to_string();
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
    match walk.visit(RefKind::Blob, config).await {
        Ok(Visit::First | Visit::Variant) => {
            let outcome = checker.check(repo, config, RefKind::Blob, auth).await;
            out.push(leaf("config", config, None, &outcome, RefKind::Blob));
        }
        Ok(Visit::Repeat) => {}
        Err(over) => {
            out.push(over_budget(config, &over));
            return out;
        }
    }
    for l in layers {
        if !l.urls.is_empty() {
            continue;
        }
        match walk.visit(RefKind::Blob, l).await {
            Ok(Visit::First | Visit::Variant) => {}
            Ok(Visit::Repeat) => continue,
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

/// Where the CLI's credentials come from: `--user`, else `REGGUARD_USER` + `REGGUARD_PASSWORD`,
/// else the docker config file's entry for the registry's host.
pub struct Credentials {
    explicit: Option<HeaderValue>,
    docker_config: Option<String>,
}

impl Credentials {
    /// Reads `--user` / the environment, and the docker config file if there is one.
    pub fn from_cli(user: Option<&str>) -> Result<Self, String> {
        let user = user.map(str::to_owned).or_else(|| {
            let u = std::env::var("REGGUARD_USER").ok()?;
            let p = std::env::var("REGGUARD_PASSWORD").ok()?;
            Some(format!("{u}:{p}"))
        });
        let explicit = user
            .map(|u| crate::config::basic_auth(&u))
            .transpose()
            .map_err(|e| format!("--user: {e}"))?;
        let docker_config = std::env::var("DOCKER_CONFIG")
            .map(|d| std::path::PathBuf::from(d).join("config.json"))
            .or_else(|_| {
                std::env::var("HOME")
                    .map(|h| std::path::PathBuf::from(h).join(".docker/config.json"))
            })
            .ok()
            .and_then(|p| std::fs::read_to_string(p).ok());
        Ok(Credentials {
            explicit,
            docker_config,
        })
    }

    /// The `Authorization` to send to `host`, if any.
    pub fn for_host(&self, host: &str) -> Option<HeaderValue> {
        self.explicit.clone().or_else(|| {
            self.docker_config
                .as_deref()
                .and_then(|c| docker_config_auth(c, host))
        })
    }
}

/// Credentials for `host` from a docker config file (`auths.<host>.auth`, or username/password).
pub fn docker_config_auth(config_json: &str, host: &str) -> Option<HeaderValue> {
    let v: serde_json::Value = serde_json::from_str(config_json).ok()?;
    let entry = v.get("auths")?.get(host)?;
    if let Some(auth) = entry
        .get("auth")
        .and_then(|a| a.as_str())
        .filter(|a| !a.is_empty())
    {
        let mut h = HeaderValue::from_str(&format!("Basic {auth}")).ok()?;
        h.set_sensitive(true);
        return Some(h);
    }
    let user = entry.get("username")?.as_str()?;
    let pass = entry.get("password")?.as_str()?;
    crate::config::basic_auth(&format!("{user}:{pass}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_with_tags_digests_and_ports() {
        let r = ImageRef::parse("registry.example:5050/infra-ci:latest").unwrap();
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("registry.example:5050", "infra-ci", "latest")
        );
        let r = ImageRef::parse("127.0.0.1:5000/team/app@sha256:abc").unwrap();
        assert_eq!(
            (r.repository.as_str(), r.reference.as_str()),
            ("team/app", "sha256:abc")
        );
        let r = ImageRef::parse("reg.example/team/app").unwrap();
        assert_eq!(r.reference, "latest");
        assert!(ImageRef::parse("team/app:v1").is_err(), "no registry host");
    }

    #[test]
    fn docker_config_auth_reads_auth_and_user_password() {
        let cfg =
            r#"{"auths":{"reg:5050":{"auth":"dTpw"},"other":{"username":"u","password":"p"}}}"#;
        assert_eq!(docker_config_auth(cfg, "reg:5050").unwrap(), "Basic dTpw");
        assert_eq!(docker_config_auth(cfg, "other").unwrap(), "Basic dTpw");
        assert!(docker_config_auth(cfg, "nope").is_none());
    }
}

/// The result of checking one image.
#[derive(Debug, Serialize)]
pub struct CheckResult {
    pub image: String,
    pub healthy: bool,
    pub broken: usize,
    pub unchecked: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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

impl CheckResult {
    /// The tree and a one-line verdict, for people (errors go to stderr separately).
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
        out.push_str(&format!("=> {verdict}\n\n"));
        out
    }
}

/// Checks each image; `auth_for(host)` gives the credentials to use.
pub async fn check_all(
    refs: &[(String, ImageRef)],
    insecure: bool,
    auth_for: impl Fn(&str) -> Option<HeaderValue>,
) -> Vec<CheckResult> {
    let mut out = Vec::new();
    for (text, r) in refs {
        let auth = auth_for(&r.host);
        let base = registry_url(&r.host, insecure).await;
        let result =
            match crate::checker::Standalone::new(&base, insecure, &prometheus::Registry::new()) {
                Ok(crate::checker::Standalone { checker, .. }) => {
                    check_image(&checker, &r.repository, &r.reference, auth.as_ref(), 4).await
                }
                Err(e) => Err(e),
            };
        out.push(match result {
            Ok(tree) => {
                let (broken, unchecked) = tree.tally();
                CheckResult {
                    image: text.clone(),
                    healthy: broken == 0 && unchecked == 0,
                    broken,
                    unchecked,
                    error: None,
                    tree: Some(tree),
                }
            }
            Err(e) => CheckResult {
                image: text.clone(),
                healthy: false,
                broken: 0,
                unchecked: 1,
                error: Some(if e.contains("unreachable") && !insecure {
                    format!("{e} ({INSECURE_HINT})")
                } else {
                    e
                }),
                tree: None,
            },
        });
    }
    out
}
