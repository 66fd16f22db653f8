//! `regguard check`'s tree: one image, deeply: the index, each child with its platform, and
//! each child image's config and layers, every reference asked through the shared [`Checker`]
//! (same requests, same verdicts as validation and the gate). Also the words of results:
//! attestations named after the image they describe, and the runbook's repair step for each
//! broken reference. Reaching the registry is the command line's part.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderValue;
use serde::Serialize;

use crate::checker::{Checker, FetchError, Outcome, OutcomeKind, OverBudget, RefKind, Visit, Walk};
use crate::oci::{Descriptor, Manifest};

/// `repo:tag` or `repo@digest`, whichever `reference` is.
pub fn at(repo: &str, reference: &str) -> String {
    if reference.contains(':') {
        format!("{repo}@{reference}")
    } else {
        format!("{repo}:{reference}")
    }
}

/// What a node of the checked tree is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Index,
    Image,
    Config,
    Layer,
    /// A manifest the walk stopped at before learning which kind it is.
    Manifest,
}

impl Role {
    /// As printed in the tree (and serialised).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Index => "index",
            Role::Image => "image",
            Role::Config => "config",
            Role::Layer => "layer",
            Role::Manifest => "manifest",
        }
    }

    /// A manifest of some kind, rather than a blob.
    pub fn is_manifest(self) -> bool {
        matches!(self, Role::Index | Role::Image | Role::Manifest)
    }
}

/// One node of the checked tree.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub role: Role,
    pub digest: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    pub result: OutcomeKind,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Node>,
}

impl Node {
    /// Counts (broken, could-not-check) in this subtree.
    pub fn tally(&self) -> (usize, usize) {
        let own = match self.result {
            OutcomeKind::Missing | OutcomeKind::Mismatch => (1, 0),
            OutcomeKind::Unauthorized | OutcomeKind::Error => (0, 1),
            OutcomeKind::Ok => (0, 0),
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
            OutcomeKind::Ok => "ok".to_string(),
            other => format!("{} {}", other.as_str().to_uppercase(), self.detail),
        };
        let platform = self
            .platform
            .as_deref()
            .map(|p| format!(" {p}"))
            .unwrap_or_default();
        out.push_str(&format!(
            "{prefix}{branch}{}{platform} {}  {status}\n",
            self.role.as_str(),
            self.digest
        ));
        let child_prefix = format!("{prefix}{next}");
        for (i, c) in self.children.iter().enumerate() {
            c.render(out, &child_prefix, i + 1 == self.children.len(), false);
        }
    }
}

fn leaf(
    role: Role,
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
        result: outcome.kind(),
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
        role: Role::Manifest,
        digest: d.digest.clone(),
        platform: None,
        size: Some(d.size),
        result: OutcomeKind::Error,
        detail: format!("not checked: {over}"),
        children: Vec::new(),
    }
}

/// The image to check could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{image}: {error}")]
pub struct ImageError {
    /// `repo@digest`.
    pub image: String,
    #[source]
    pub error: FetchError,
}

/// Checks the image at `digest` (already resolved by the caller) deeply. `labels` names
/// index children by digest ("attestation for linux/amd64"); others keep their platform.
pub async fn check_image(
    checker: &Arc<Checker>,
    repo: &str,
    digest: &str,
    auth: Option<&HeaderValue>,
    max_depth: u32,
    labels: &HashMap<String, String>,
) -> Result<Node, ImageError> {
    let manifest = checker
        .manifest(repo, digest, auth)
        .await
        .map_err(|error| ImageError {
            image: at(repo, digest),
            error,
        })?;
    let mut root = Node {
        role: Role::Index,
        digest: digest.to_string(),
        platform: None,
        size: None,
        result: OutcomeKind::Ok,
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
            root.role = Role::Image;
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
        let walk_into = match walk.visit(RefKind::Manifest, child).await {
            Ok(Visit::First) => true,
            Ok(Visit::Variant) => false, // judged, listed once more, not walked again
            Ok(Visit::Repeat) => continue, // listed (and checked) where it first appears
            Err(over) => {
                out.push(over_budget(child, &over));
                return out;
            }
        };
        let platform = labels
            .get(&child.digest)
            .cloned()
            .or_else(|| child.platform.as_ref().map(ToString::to_string));
        let outcome = checker.check(repo, child, RefKind::Manifest, auth).await;
        let mut node = leaf(Role::Image, child, platform, &outcome, RefKind::Manifest);
        if outcome == Outcome::Ok && walk_into {
            match checker.manifest(repo, &child.digest, auth).await {
                Ok(m) => match m.as_ref() {
                    Manifest::Index { manifests } if depth < max_depth => {
                        node.role = Role::Index;
                        node.children =
                            Box::pin(index_children(place, manifests, depth + 1, walk)).await;
                    }
                    Manifest::Index { .. } => {
                        node.role = Role::Index;
                        node.result = OutcomeKind::Error;
                        node.detail = format!("nested deeper than {max_depth}");
                    }
                    Manifest::Image { .. } => {
                        node.children = image_blobs(checker, repo, &m, auth, walk).await
                    }
                },
                Err(e) => {
                    node.result = OutcomeKind::Error;
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
    match walk.visit(RefKind::Blob, config).await {
        Ok(Visit::First | Visit::Variant) => {
            let outcome = checker.check(repo, config, RefKind::Blob, auth).await;
            out.push(leaf(Role::Config, config, None, &outcome, RefKind::Blob));
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
        out.push(leaf(Role::Layer, l, None, &outcome, RefKind::Blob));
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

/// Words for people: the checker and scanner speak of "the upstream" (right for the proxy's
/// logs); to a CLI user the thing at the other end is the registry.
pub fn registry_words(s: &str) -> String {
    s.replace("upstream", "registry")
        .replace("Upstream", "Registry")
}

#[cfg(test)]
mod tests {
    use super::*;

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
