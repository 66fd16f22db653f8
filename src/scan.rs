//! The whole-registry scan: every tag of every repository, validated through
//! the same [`Inspector`] (and so the same checker, cache and integrity state)
//! as serve-time validation. It exports the cron probe's gauges, with the same
//! names and meaning, so the existing alerts keep working and the CronJob can go.
//!
//! The walk follows pagination (`n` and the `Link` header) for the catalog and
//! for each tag list, bounds its concurrency, and paces its requests, so a scan
//! never starves client traffic.
//!
//! It knows nothing of the command line: credentials per scope arrive through
//! [`ScanAuth`], and a progress bar is handed in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use serde::Serialize;
use tokio::sync::{Mutex, Semaphore};

use crate::checker::SetupError;
use crate::config::Upstream;
use crate::oci::{self, ManifestKind, MAX_MANIFEST_BYTES};
use crate::upstream::UpstreamBody;
use crate::upstream::{user_agent, UpstreamClient};
use crate::validate::{IndexCheck, Inspector, Job, Validated};

pub use crate::config::features::ScanSettings;

/// What one scan found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScanReport {
    pub catalog_accessible: bool,
    pub repositories: usize,
    pub tags: usize,
    pub indexes: usize,
    /// Tags whose manifest has at least one broken reference.
    pub broken_tags: usize,
    /// Broken references found by this scan.
    pub broken_references: usize,
    pub errors: usize,
    pub duration_seconds: f64,
    /// What the first errors were (at most [`MAX_PROBLEMS`]), for the CLI's report.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// Errors a report spells out; the rest are only counted.
pub const MAX_PROBLEMS: usize = 10;

impl ScanReport {
    fn problem(&mut self, what: String) {
        self.errors += 1;
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(what);
        }
    }
}

/// Why one request of a scan (a listing page or a manifest) failed. Said in the report.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The path does not make a valid request.
    #[error("{0}")]
    Request(#[source] http::Error),
    #[error("GET {path}: {error}")]
    Unreachable {
        path: String,
        #[source]
        error: hyper_util::client::legacy::Error,
    },
    #[error("GET {path}: reading body: {error}")]
    Body {
        path: String,
        #[source]
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("GET {path}: not answered within {REQUEST_DEADLINE:?}")]
    Deadline { path: String },
    /// A `Link` that points back at a page already read.
    #[error("GET {path}: pagination returned to a page already read")]
    PageLoop { path: String },
    #[error("more than {MAX_PAGES} pages; listing stopped")]
    TooManyPages,
    #[error("GET {path}: {status}")]
    Status { path: String, status: StatusCode },
    #[error("GET {path}: {error}")]
    Json {
        path: String,
        #[source]
        error: serde_json::Error,
    },
}

/// Credentials per scope (`registry:catalog:*`, `repository:<name>:pull`), for registries
/// with token auth: the CLI's token flow plugs in here, the scanner never names it.
pub trait ScanAuth: Send + Sync {
    fn authorization<'a>(
        &'a self,
        scope: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<HeaderValue>> + Send + 'a>>;
}

/// The token scope a scan request needs.
fn scope_of(path: &str) -> String {
    let rest = path.strip_prefix("/v2/").unwrap_or(path);
    if rest.starts_with("_catalog") {
        return "registry:catalog:*".into();
    }
    let repo = ["/tags/list", "/manifests/"]
        .iter()
        .find_map(|m| rest.split_once(m).map(|(r, _)| r))
        .unwrap_or(rest);
    format!("repository:{repo}:pull")
}

struct ScanMetrics {
    catalog_accessible: IntGauge,
    repos: IntGauge,
    tags: IntGauge,
    indexes: IntGauge,
    last_run: IntGauge,
    duration: Histogram,
    errors: IntCounter,
}

/// The scanner.
pub struct Scanner {
    client: UpstreamClient,
    upstream: Upstream,
    inspector: Arc<Inspector>,
    settings: ScanSettings,
    metrics: ScanMetrics,
    pacer: Mutex<Instant>,
    /// A terminal progress bar (CLI on a TTY only).
    progress: Option<indicatif::ProgressBar>,
    /// Credentials per scope (CLI with token auth); else `settings.auth` for everything.
    auth_source: Option<Arc<dyn ScanAuth>>,
}

fn probe_gauge(
    registry: &Registry,
    name: &str,
    help: &str,
    instance: &str,
) -> Result<IntGauge, prometheus::Error> {
    let v = IntGaugeVec::new(Opts::new(name, help), &["instance"])?;
    registry.register(Box::new(v.clone()))?;
    v.get_metric_with_label_values(&[instance])
}

impl Scanner {
    pub fn new(
        client: UpstreamClient,
        upstream: Upstream,
        inspector: Arc<Inspector>,
        settings: ScanSettings,
        registry: &Registry,
        instance: &str,
    ) -> Result<Self, prometheus::Error> {
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "regguard_scan_duration_seconds",
                "Duration of whole-registry scans",
            )
            .buckets(vec![
                1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
            ]),
        )?;
        registry.register(Box::new(duration.clone()))?;
        let errors = IntCounter::new(
            "regguard_scan_errors_total",
            "Listings or manifests a scan could not read",
        )?;
        registry.register(Box::new(errors.clone()))?;
        let metrics = ScanMetrics {
            catalog_accessible: probe_gauge(
                registry,
                "registry_manifest_integrity_catalog_accessible",
                "1 if the last scan could read the catalog",
                instance,
            )?,
            repos: probe_gauge(
                registry,
                "registry_manifest_integrity_repos_checked",
                "Repositories the last scan walked",
                instance,
            )?,
            tags: probe_gauge(
                registry,
                "registry_manifest_integrity_tags_checked",
                "Tags the last scan checked",
                instance,
            )?,
            indexes: probe_gauge(
                registry,
                "registry_manifest_integrity_indexes_checked",
                "Indexes the last scan validated",
                instance,
            )?,
            last_run: probe_gauge(
                registry,
                "registry_manifest_integrity_last_run_timestamp",
                "Unix time the last scan finished",
                instance,
            )?,
            duration,
            errors,
        };
        Ok(Scanner {
            client,
            upstream,
            inspector,
            settings,
            metrics,
            pacer: Mutex::new(Instant::now()),
            progress: None,
            auth_source: None,
        })
    }

    /// Shows progress on a terminal: repositories listed, tags checked.
    pub fn with_progress(mut self, bar: indicatif::ProgressBar) -> Self {
        self.progress = Some(bar);
        self
    }

    /// Asks `source` for the credentials of each request, by scope.
    pub fn with_auth_source(mut self, source: Arc<dyn ScanAuth>) -> Self {
        self.auth_source = Some(source);
        self
    }

    async fn auth_for(&self, scope: &str) -> Option<HeaderValue> {
        match &self.auth_source {
            Some(s) => s.authorization(scope).await,
            None => self.settings.auth.clone(),
        }
    }

    /// Runs scans every `interval`, forever.
    pub async fn run_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let r = self.scan().await;
            tracing::info!(
                repositories = r.repositories,
                tags = r.tags,
                indexes = r.indexes,
                broken_references = r.broken_references,
                errors = r.errors,
                duration_s = r.duration_seconds,
                "scan finished"
            );
        }
    }

    /// Waits for the next request slot (at most `rate` per second).
    async fn pace(&self) {
        let period = Duration::from_secs_f64(1.0 / f64::from(self.settings.rate.max(1)));
        let slot = {
            let mut next = self.pacer.lock().await;
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + period;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }

    async fn get(
        &self,
        path_and_query: &str,
        accept: Option<&'static str>,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), ScanError> {
        self.pace().await;
        let uri = self
            .upstream
            .uri_for(path_and_query)
            .map_err(ScanError::Request)?;
        let mut req = Request::get(uri)
            .header(header::HOST, self.upstream.host_header.clone())
            .header(header::USER_AGENT, user_agent())
            .body(UpstreamBody::empty())
            .map_err(ScanError::Request)?;
        if let Some(a) = accept {
            req.headers_mut()
                .insert(header::ACCEPT, HeaderValue::from_static(a));
        }
        if let Some(a) = self.auth_for(&scope_of(path_and_query)).await {
            req.headers_mut().insert(header::AUTHORIZATION, a);
        }
        // One deadline for the whole exchange, head and body: a registry that answers
        // the head and then stalls the body must not hold a scan slot forever.
        let exchange = async {
            let path = || path_and_query.to_owned();
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|error| ScanError::Unreachable {
                    path: path(),
                    error,
                })?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_MANIFEST_BYTES)
                .collect()
                .await
                .map_err(|error| ScanError::Body {
                    path: path(),
                    error,
                })?
                .to_bytes();
            Ok((parts.status, parts.headers, body))
        };
        tokio::time::timeout(REQUEST_DEADLINE, exchange)
            .await
            .map_err(|_| ScanError::Deadline {
                path: path_and_query.to_owned(),
            })?
    }

    /// Follows `n` + `Link` pagination, collecting `field` (a string array) from each page.
    async fn paged(&self, first: String, field: &str) -> Result<Vec<String>, ScanError> {
        let mut out = Vec::new();
        let mut next = Some(first);
        let mut seen = std::collections::HashSet::new();
        while let Some(path) = next.take() {
            // A registry whose Link points back at a page already read, or that never
            // stops paging, ends the listing here instead of looping forever.
            if !seen.insert(path.clone()) {
                return Err(ScanError::PageLoop { path });
            }
            if seen.len() > MAX_PAGES {
                return Err(ScanError::TooManyPages);
            }
            let (status, headers, body) = self.get(&path, None).await?;
            if !status.is_success() {
                return Err(ScanError::Status { path, status });
            }
            let v: serde_json::Value =
                serde_json::from_slice(&body).map_err(|error| ScanError::Json { path, error })?;
            if let Some(items) = v.get(field).and_then(|x| x.as_array()) {
                out.extend(items.iter().filter_map(|i| i.as_str().map(str::to_owned)));
            }
            next = headers
                .get(header::LINK)
                .and_then(|l| l.to_str().ok())
                .and_then(next_link);
        }
        Ok(out)
    }

    /// One whole scan; updates the probe gauges. Phases: read the catalog, list each
    /// repository's tags and check them (`Scanner::spawn_tags`), gather the results
    /// (`Scanner::gather`), set the gauges (`Scanner::finish`).
    pub async fn scan(self: &Arc<Self>) -> ScanReport {
        let started = Instant::now();
        let n = self.settings.page_size;
        let mut report = ScanReport::default();
        let repos = match self
            .paged(format!("/v2/_catalog?n={n}"), "repositories")
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "scan: cannot read the catalog");
                self.metrics.errors.inc();
                report.problem(format!("cannot read the catalog: {e}"));
                report.duration_seconds = started.elapsed().as_secs_f64();
                self.finish(&report, started);
                return report;
            }
        };
        report.catalog_accessible = true;
        let permits = Arc::new(Semaphore::new(self.settings.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for repo in repos {
            report.repositories += 1;
            let tags = match self
                .paged(format!("/v2/{repo}/tags/list?n={n}"), "tags")
                .await
            {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(repository = %repo, error = %e, "scan: cannot list tags");
                    self.metrics.errors.inc();
                    report.problem(format!("{repo}: cannot list tags: {e}"));
                    continue;
                }
            };
            if let Some(bar) = &self.progress {
                bar.inc_length(tags.len() as u64);
                bar.set_message(format!("{} repositories listed", report.repositories));
            }
            self.spawn_tags(&repo, tags, &permits, &mut tasks).await;
        }
        self.gather(tasks, &mut report).await;
        report.duration_seconds = started.elapsed().as_secs_f64();
        self.finish(&report, started);
        if let Some(bar) = &self.progress {
            bar.finish_and_clear();
        }
        report
    }

    /// Starts a check of each tag of `repo`, at most `concurrency` at once (waits for a
    /// permit before each; the semaphore is never closed, so none is skipped).
    async fn spawn_tags(
        self: &Arc<Self>,
        repo: &str,
        tags: Vec<String>,
        permits: &Arc<Semaphore>,
        tasks: &mut tokio::task::JoinSet<TagResult>,
    ) {
        for tag in tags {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let me = self.clone();
            let repo = repo.to_owned();
            tasks.spawn(async move {
                let r = me.tag(&repo, &tag).await;
                drop(permit);
                if let Some(bar) = &me.progress {
                    bar.inc(1);
                }
                r
            });
        }
    }

    /// Waits for every tag check and adds each result to the report.
    async fn gather(&self, mut tasks: tokio::task::JoinSet<TagResult>, report: &mut ScanReport) {
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(TagResult::Checked { index, broken }) => {
                    report.tags += 1;
                    report.indexes += usize::from(index);
                    report.broken_references += broken;
                    report.broken_tags += usize::from(broken > 0);
                }
                Ok(TagResult::Failed(why)) => {
                    report.tags += 1;
                    report.problem(why);
                    self.metrics.errors.inc();
                }
                Err(e) => {
                    report.tags += 1;
                    report.problem(format!("a tag check stopped: {e}"));
                    self.metrics.errors.inc();
                }
            }
        }
    }

    fn finish(&self, report: &ScanReport, started: Instant) {
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics.duration.observe(elapsed);
        self.metrics
            .catalog_accessible
            .set(i64::from(report.catalog_accessible));
        self.metrics.repos.set(report.repositories as i64);
        self.metrics.tags.set(report.tags as i64);
        self.metrics.indexes.set(report.indexes as i64);
        self.metrics
            .last_run
            .set(crate::integrity::now_epoch() as i64);
    }

    async fn tag(&self, repo: &str, tag: &str) -> TagResult {
        let path = format!("/v2/{repo}/manifests/{tag}");
        let (status, headers, body) = match self.get(&path, Some(oci::ACCEPT_ALL)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(repository = repo, tag, error = %e, "scan: cannot read manifest");
                return TagResult::Failed(format!("{repo}:{tag}: {e}"));
            }
        };
        if status != StatusCode::OK {
            tracing::warn!(
                repository = repo,
                tag,
                status = status.as_u16(),
                "scan: manifest by tag not served"
            );
            return TagResult::Failed(format!("{repo}:{tag}: GET {path}: {status}"));
        }
        let kind = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(oci::manifest_kind);
        let Some(kind) = kind else {
            // Schema 1 or an artifact type the validator does not read: checked as present.
            return TagResult::Checked {
                index: false,
                broken: 0,
            };
        };
        let job = Job {
            repository: repo.to_owned(),
            reference: tag.to_owned(),
            digest: headers
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body: Some(body),
            held: None,
            kind,
            auth: self.auth_for(&format!("repository:{repo}:pull")).await,
            seen_at: Instant::now(),
            blobs: self.settings.blobs,
        };
        let summary = self.inspector.validate(job).await;
        match summary.result {
            Validated::Checked(IndexCheck::Error) => {
                TagResult::Failed(format!("{repo}:{tag}: could not be checked"))
            }
            Validated::Checked(_) | Validated::Gone => TagResult::Checked {
                index: kind == ManifestKind::Index,
                broken: summary.broken,
            },
        }
    }
}

enum TagResult {
    Checked {
        index: bool,
        broken: usize,
    },
    /// Why, in words for the report.
    Failed(String),
}

/// Total deadline of one request the scan makes (listing page or manifest).
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// Pages one listing may take: 10,000 pages of the default 100 entries is a
/// million repositories or tags, far past any registry this fronts.
const MAX_PAGES: usize = 10_000;

/// The target of `Link: <...>; rel="next"`, as a `/v2/` path and query. Anything
/// else (no angle brackets, a target outside `/v2/`) is no next page. Never panics.
pub fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.trim().strip_prefix('<')?.split_once('>')?;
        if !params.contains("rel=\"next\"") {
            return None;
        }
        // Registries send a path; some send an absolute URL: keep the path and query.
        let path = target.find("/v2/").and_then(|i| target.get(i..))?;
        Some(path.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_link_never_panics_on_malformed_headers() {
        for bad in [
            r#">; rel="next" <"#,
            r#"> </v2/x>; rel="next""#,
            "<",
            ">",
            r#"</elsewhere?n=1>; rel="next""#,
            "<\u{e9}>; rel=\"next\"",
        ] {
            assert_eq!(next_link(bad), None, "{bad}");
        }
    }

    #[test]
    fn next_link_reads_distribution_and_absolute_forms() {
        assert_eq!(
            next_link(r#"</v2/_catalog?last=b&n=2>; rel="next""#).as_deref(),
            Some("/v2/_catalog?last=b&n=2")
        );
        assert_eq!(
            next_link(r#"<https://reg.example/v2/a/tags/list?n=5&last=t4>; rel="next""#).as_deref(),
            Some("/v2/a/tags/list?n=5&last=t4")
        );
        assert_eq!(next_link(r#"</v2/x>; rel="prev""#), None);
    }
}

/// What `regguard scan` found: the report and every broken reference.
#[derive(Debug, Serialize)]
pub struct OnceResult {
    pub registry: String,
    pub report: ScanReport,
    pub broken: Vec<crate::integrity::BrokenRef>,
}

/// One scan of `registry` (an `http://` or `https://` URL) outside `serve`, for the CLI.
pub async fn scan_once(
    registry: &str,
    insecure: bool,
    auth: Option<HeaderValue>,
    auth_source: Option<Arc<dyn ScanAuth>>,
    page_size: u32,
    concurrency: usize,
) -> Result<OnceResult, SetupError> {
    let defaults = crate::config::Settings::from_toml("")?;
    let metrics = Registry::new();
    let crate::checker::Standalone {
        checker,
        client,
        upstream,
    } = crate::checker::Standalone::new(registry, insecure, &metrics)?;
    let integrity = Arc::new(crate::integrity::Integrity::new(
        &metrics,
        "cli",
        usize::MAX,
    )?);
    let supervisor = crate::supervise::Supervisor::new(&metrics)?;
    let validator = crate::validate::Validator::start(
        defaults.validate.clone(),
        checker,
        integrity.clone(),
        &metrics,
        &supervisor,
        auth.clone(),
    )?;
    // A progress bar only on a terminal; nothing on pipes, files or CI logs.
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} tags checked, {msg} [{elapsed}]",
        ) {
            bar.set_style(style);
        }
        bar
    });
    let scanner = Scanner::new(
        client,
        upstream,
        validator.inspector(),
        ScanSettings {
            enabled: false,
            interval: Duration::from_secs(3600),
            concurrency,
            rate: 1000,
            page_size,
            blobs: true,
            auth,
        },
        &metrics,
        "cli",
    )?;
    let scanner = match bar {
        Some(bar) => scanner.with_progress(bar),
        None => scanner,
    };
    let scanner = Arc::new(match auth_source {
        Some(source) => scanner.with_auth_source(source),
        None => scanner,
    });
    let report = scanner.scan().await;
    Ok(OnceResult {
        registry: registry.to_owned(),
        report,
        broken: integrity.snapshot(),
    })
}
