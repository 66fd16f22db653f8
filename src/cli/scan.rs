//! `regguard scan`: reach the registry (explaining why not), check catalog access, scan with a
//! token per scope, then name what was found (attestations after their image) and say how to
//! repair each broken reference.
//!
//! The scan itself is [`crate::scan`]'s; this module knows how to reach, authenticate and
//! report, not how to walk.

use std::collections::HashMap;
use std::sync::Arc;

use http::StatusCode;
use serde::Serialize;

use super::access::{Problem, RegistryAccess};
use super::check::base_url;
use super::credentials::Credentials;
use crate::checker::{OutcomeKind, RefKind};
use crate::inspect::{at, attestation_labels, registry_words, repair_hint};
use crate::oci::Manifest;

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
            b.outcome == OutcomeKind::Mismatch,
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

/// `--registry`'s scheme (if given) and host.
pub(crate) fn split_registry(registry: &str) -> Result<(Option<&'static str>, &str), Problem> {
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
    Ok((scheme, host))
}

/// `regguard scan`: reaches the registry (explaining why not), checks catalog access, scans.
pub async fn scan_registry(
    registry: &str,
    insecure: bool,
    credentials: &Credentials,
    page_size: u32,
    concurrency: usize,
) -> Result<ScanOutcome, Problem> {
    let (scheme, host) = split_registry(registry)?;
    let base = base_url(scheme, host, insecure).await?;
    let login = credentials.for_host(host)?;
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
        super::access::Challenge::Bearer { .. } => None,
        _ => access.authorization("").await?,
    };
    let source: Arc<dyn crate::scan::ScanAuth> = access.clone();
    let once = crate::scan::scan_once(&base, insecure, basic, Some(source), page_size, concurrency)
        .await
        .map_err(|e| Problem::Other(registry_words(&e.to_string())))?;
    let broken = findings(&access, host, once.broken).await;
    Ok(ScanOutcome {
        registry: once.registry,
        report: once.report,
        broken,
    })
}
