//! `regguard heal`: scan a whole registry, then repair every broken reference from a vault
//! (e.g. right after an offline garbage collection), printing the plan and each action.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::access::{Problem, RegistryAccess};
use super::check::base_url;
use super::credentials::Credentials;
use super::scan::{scan_registry, split_registry};
use crate::checker::RefKind;
use crate::heal::{Outcome, Repairer};
use crate::vault::{Location, Vault};

/// What happened to one lost reference.
#[derive(Debug, Serialize)]
pub struct Action {
    pub repository: String,
    pub digest: String,
    pub kind: RefKind,
    /// `repaired`, `would repair` (dry run), `intact`, `unrepairable`, `failed`.
    pub result: &'static str,
    /// The steps taken (or planned), in order.
    pub steps: Vec<String>,
    /// Why not, when it was not repaired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What `regguard heal` did.
#[derive(Debug, Serialize)]
pub struct HealOutcome {
    pub registry: String,
    pub vault: String,
    pub dry_run: bool,
    /// Broken references the scan found.
    pub broken: usize,
    pub actions: Vec<Action>,
    /// The scan could not look at everything (its errors): the registry may hold more damage.
    pub scan_errors: usize,
}

impl HealOutcome {
    /// All repaired (or nothing to repair), and the scan saw everything.
    pub fn all_repaired(&self) -> bool {
        self.scan_errors == 0
            && self
                .actions
                .iter()
                .all(|a| matches!(a.result, "repaired" | "would repair" | "intact"))
    }

    pub fn render_text(&self) -> String {
        let mut out = format!(
            "registry        {}\nvault           {}\nbroken refs     {}\n{}",
            self.registry,
            self.vault,
            self.broken,
            if self.dry_run {
                "dry run: nothing is changed\n"
            } else {
                ""
            }
        );
        for a in &self.actions {
            out.push_str(&format!(
                "{} {}@{} ({})\n",
                a.result.to_uppercase(),
                a.repository,
                a.digest,
                a.kind.as_str()
            ));
            for s in &a.steps {
                out.push_str(&format!("  {s}\n"));
            }
            if let Some(r) = &a.reason {
                out.push_str(&format!("  {r}\n"));
            }
        }
        if self.scan_errors > 0 {
            out.push_str(&format!(
                "WARNING the scan met {} errors: run `regguard scan` to see them\n",
                self.scan_errors
            ));
        }
        out
    }
}

/// Scans `registry`, then repairs what is broken from the vault at `vault` (`aws`: the
/// `AWS_*` variables, for an S3 vault).
pub async fn heal_registry(
    registry: &str,
    vault: &str,
    insecure: bool,
    credentials: &Credentials,
    dry_run: bool,
    aws: Vec<(String, String)>,
) -> Result<HealOutcome, Problem> {
    let location = Location::parse(vault).map_err(|e| Problem::Other(format!("--vault: {e}")))?;
    let settings =
        crate::config::Settings::from_toml("").map_err(|e| Problem::Other(e.to_string()))?;
    let mut vault_settings = settings.vault.clone();
    vault_settings.location = Some(location.clone());
    vault_settings.aws = aws;
    let metrics = prometheus::Registry::new();
    let vault = Vault::open(vault_settings, None, &metrics)
        .map_err(|e| Problem::Other(format!("--vault: {e}")))?;

    let scanned = scan_registry(registry, insecure, credentials, 100, 4).await?;
    let (scheme, host) = split_registry(registry)?;
    let base = base_url(scheme, host, insecure).await?;
    let login = credentials.for_host(host)?;
    let access = RegistryAccess::new(&base, insecure, login);
    let standalone = crate::checker::Standalone::new(&base, insecure, &metrics)?;

    // One repair per (repository, lost digest), whatever index it was found under.
    let mut lost: BTreeMap<(String, String), RefKind> = BTreeMap::new();
    for b in &scanned.broken {
        lost.insert((b.repository.clone(), b.child_digest.clone()), b.kind);
    }
    let mut actions = Vec::new();
    let mut repairers: BTreeMap<String, Arc<Repairer>> = BTreeMap::new();
    for ((repository, digest), kind) in lost {
        let repairer = match repairers.get(&repository) {
            Some(r) => r.clone(),
            None => {
                let auth = access
                    .authorization(&format!("repository:{repository}:pull,push"))
                    .await?;
                let r = Arc::new(Repairer::new(
                    vault.clone(),
                    standalone.client.clone(),
                    standalone.upstream.clone(),
                    auth,
                    std::time::Duration::from_secs(30),
                ));
                repairers.insert(repository.clone(), r.clone());
                r
            }
        };
        let mut steps = Vec::new();
        let outcome = repairer
            .repair(&repository, &digest, kind, dry_run, |s| {
                steps.push(s.to_string())
            })
            .await;
        let (result, reason) = match outcome {
            Outcome::Repaired(_) if dry_run => ("would repair", None),
            Outcome::Repaired(_) => ("repaired", None),
            Outcome::Intact => ("intact", None),
            Outcome::Unrepairable(plan) => (
                "unrepairable",
                plan.unrepairable()
                    .map(|w| format!("{w}: re-push the image that contains it")),
            ),
            Outcome::Failed(e) => ("failed", Some(e.to_string())),
            Outcome::Busy => ("failed", Some("another repair of it is running".into())),
        };
        actions.push(Action {
            repository,
            digest,
            kind,
            result,
            steps,
            reason,
        });
    }
    Ok(HealOutcome {
        registry: scanned.registry,
        vault: location.to_string(),
        dry_run,
        broken: scanned.broken.len(),
        actions,
        scan_errors: scanned.report.errors,
    })
}

/// `regguard check --vault`: marks each broken digest the vault holds for its repository.
pub async fn mark_repairable(
    results: &mut [super::check::CheckResult],
    repositories: &[String],
    vault: &str,
    aws: Vec<(String, String)>,
) -> Result<(), Problem> {
    let store = open_vault(vault, aws)?;
    for (result, repository) in results.iter_mut().zip(repositories) {
        for digest in result.broken_digests() {
            if store
                .holds(repository, &digest)
                .await
                .map_err(|e| Problem::Other(format!("--vault: {e}")))?
            {
                result.repairable.push(digest);
            }
        }
        if !result.repairable.is_empty() {
            let host = result.image.split('/').next().unwrap_or("");
            result.repair.push(format!(
                "regguard heal --registry {host} --vault {vault} puts back what the vault holds"
            ));
        }
    }
    Ok(())
}

fn open_vault(vault: &str, aws: Vec<(String, String)>) -> Result<Arc<Vault>, Problem> {
    let location = Location::parse(vault).map_err(|e| Problem::Other(format!("--vault: {e}")))?;
    let settings =
        crate::config::Settings::from_toml("").map_err(|e| Problem::Other(e.to_string()))?;
    let mut vault_settings = settings.vault.clone();
    vault_settings.location = Some(location);
    vault_settings.aws = aws;
    Vault::open_existing(vault_settings, &prometheus::Registry::new())
        .map_err(|e| Problem::Other(format!("--vault: {e}")))
}
