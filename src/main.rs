//! The `regguard` binary: parses the command line, sets up logging, and calls the library.
//!
//! It holds no behaviour of its own beyond exit codes; everything else is the library's.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use regguard::config::{Environment, LogFormat, ServeArgs, Settings};

/// regguard: a streaming reverse proxy that fronts a Docker/OCI registry and
/// guards the integrity of what it serves.
#[derive(Debug, Parser)]
#[command(name = "regguard", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the registry front: stream every request to the upstream registry, like the nginx
    /// :5050 block it replaces. Every flag is also a REGGUARD_<NAME> environment variable and a
    /// key of the --config TOML file; flags beat the environment, which beats the file.
    #[command(
        after_help = regguard::config::keys::help_text(false),
        after_long_help = regguard::config::keys::help_text(true)
    )]
    Serve(Box<ServeArgs>),
    /// Configuration: every key with its environment variable and default (--help), and
    /// `config check` to validate a file.
    #[command(
        subcommand,
        after_help = regguard::config::keys::help_text(false),
        after_long_help = regguard::config::keys::help_text(true)
    )]
    Config(ConfigCommand),
    /// Scan a whole registry once: every tag of every repository, index children, and each
    /// image's config and layers. Exit 0: healthy; 1: broken references found; 2: could not
    /// scan (the message says why and what to do).
    Scan(ScanArgs),
    /// Check images deeply (index -> children -> config and layers, sizes and digests) and print
    /// a tree with each platform and what is missing. Exit 0: healthy; 1: broken; 2: not found,
    /// or could not check (the message says why and what to do).
    Check(CheckArgs),
    /// Repair a whole registry from a vault (e.g. right after an offline garbage collection):
    /// scan it, then for each broken reference re-upload lost blobs and re-PUT lost manifests
    /// from the vault, reading each back. Prints the plan and each action. Exit 0: everything
    /// repaired (or nothing broken); 1: something could not be (the output says what to
    /// re-push); 2: could not run.
    Heal(HealArgs),
}

#[derive(Debug, clap::Args)]
struct HealArgs {
    /// The registry, e.g. https://registry.example:5050 or http://registry-private:5000.
    #[arg(long, env = "REGGUARD_REGISTRY", value_name = "URL")]
    registry: String,
    /// The vault: the directory `serve` keeps it in ([vault] url), or s3://bucket/prefix
    /// (with the usual AWS_* variables).
    #[arg(long, value_name = "URL")]
    vault: String,
    /// Print the plan; change nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    access: Access,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file together with the REGGUARD_* environment and the flags
    /// given, as `serve` would, and print the effective settings (secrets masked) with where
    /// each came from. Exit 0: valid; 2: not (the message names the key).
    Check(ConfigCheckArgs),
}

#[derive(Debug, clap::Args)]
struct ConfigCheckArgs {
    /// The TOML file to check (else --config or REGGUARD_CONFIG; with none, the environment
    /// and flags over the defaults).
    #[arg(value_name = "FILE")]
    file: Option<std::path::PathBuf>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Images as people paste them: registry.example:5050/infra-ci:latest,
    /// https://host/repo@sha256:..., http://host:port/repo:tag, host/repo (tag latest).
    #[arg(required = true, value_name = "REF")]
    refs: Vec<String>,
    /// A vault (the directory `serve` keeps, or s3://bucket/prefix): say which broken
    /// references it holds, so `regguard heal` can put them back.
    #[arg(long, value_name = "URL")]
    vault: Option<String>,
    #[command(flatten)]
    access: Access,
}

#[derive(Debug, clap::Args)]
struct ScanArgs {
    /// The registry, e.g. https://registry.example:5050 or http://registry-private:5000.
    #[arg(long, env = "REGGUARD_REGISTRY", value_name = "URL")]
    registry: String,
    /// Catalog and tag-list page size.
    #[arg(long, default_value_t = 100)]
    page_size: u32,
    /// Tags checked at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[command(flatten)]
    access: Access,
}

/// How the CLI reaches a registry and reports, shared by `check` and `scan`.
#[derive(Debug, clap::Args)]
struct Access {
    /// Credentials as USER:PASSWORD (also REGGUARD_USER / REGGUARD_PASSWORD; else the docker
    /// config file, $DOCKER_CONFIG/config.json or ~/.docker/config.json: its `credHelpers`,
    /// `credsStore` or `auths` entry for the registry's host). Registries with token auth
    /// (`WWW-Authenticate: Bearer`) get a token with these credentials, or anonymously.
    #[arg(long, value_name = "USER:PASSWORD")]
    user: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: OutputFormat,
    /// Allow plain HTTP and skip TLS certificate verification (self-signed registries).
    /// Without it, registries are reached over HTTPS verified against the system's CA store
    /// (SSL_CERT_FILE / SSL_CERT_DIR are honoured).
    #[arg(long)]
    insecure: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REGGUARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Scan(args) => scan(args),
        Command::Check(args) => check(args),
        Command::Heal(args) => heal(args),
        Command::Config(ConfigCommand::Check(args)) => config_check(args),
    }
}

/// Ends a CLI command that could not run: exit code 2 with the reason on stderr.
fn cannot(command: &str, msg: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("regguard {command}: {msg}");
    ExitCode::from(2)
}

/// 0 healthy, 1 broken references found, 2 something could not be checked.
fn verdict(broken: bool, unchecked: bool) -> ExitCode {
    match (broken, unchecked) {
        (true, _) => ExitCode::from(1),
        (false, true) => ExitCode::from(2),
        (false, false) => ExitCode::SUCCESS,
    }
}

/// Why a CLI command could not run at all (before or after its work).
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

fn cli_runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
}

/// Prints `value` as JSON, or `text()` for people.
fn report<T: serde::Serialize>(
    format: OutputFormat,
    value: &T,
    text: impl FnOnce() -> String,
) -> Result<(), CliError> {
    match format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(value)?),
        OutputFormat::Text => print!("{}", text()),
    }
    Ok(())
}

fn check(args: CheckArgs) -> ExitCode {
    let refs = match args
        .refs
        .iter()
        .map(|r| regguard::cli::reference::ImageRef::parse(r))
        .collect::<Result<Vec<_>, _>>()
    {
        Ok(r) => r,
        Err(e) => return cannot("check", &e),
    };
    let credentials =
        match regguard::cli::credentials::Credentials::from_cli(args.access.user.as_deref()) {
            Ok(c) => c,
            Err(e) => return cannot("check", &e),
        };
    let runtime = match cli_runtime() {
        Ok(rt) => rt,
        Err(e) => return cannot("check", &e),
    };
    let mut results = runtime.block_on(regguard::cli::check::check_all(
        &refs,
        args.access.insecure,
        &credentials,
    ));
    if let Some(vault) = &args.vault {
        let repositories: Vec<String> = refs.iter().map(|r| r.repository.clone()).collect();
        let aws = std::env::vars()
            .filter(|(k, _)| k.starts_with("AWS_"))
            .collect();
        if let Err(e) = runtime.block_on(regguard::cli::heal::mark_repairable(
            &mut results,
            &repositories,
            vault,
            aws,
        )) {
            return cannot("check", &e.to_string());
        }
    }
    for r in &results {
        if let Some(e) = &r.error {
            eprintln!("regguard check: {}: {e}", r.image);
        }
    }
    if let Err(e) = report(args.access.format, &results, || {
        results.iter().map(|r| r.render_text()).collect()
    }) {
        return cannot("check", &e);
    }
    verdict(
        results.iter().any(|r| r.broken > 0),
        results.iter().any(|r| !r.healthy),
    )
}

fn scan(args: ScanArgs) -> ExitCode {
    let credentials =
        match regguard::cli::credentials::Credentials::from_cli(args.access.user.as_deref()) {
            Ok(c) => c,
            Err(e) => return cannot("scan", &e),
        };
    let runtime = match cli_runtime() {
        Ok(rt) => rt,
        Err(e) => return cannot("scan", &e),
    };
    let result = runtime.block_on(regguard::cli::scan::scan_registry(
        &args.registry,
        args.access.insecure,
        &credentials,
        args.page_size,
        args.concurrency,
    ));
    let result = match result {
        Ok(r) => r,
        Err(e) => return cannot("scan", &format!("{}: {e}", args.registry)),
    };
    if let Err(e) = report(args.access.format, &result, || result.render_text()) {
        return cannot("scan", &e);
    }
    let r = &result.report;
    verdict(
        !result.broken.is_empty(),
        !r.catalog_accessible || r.errors > 0,
    )
}

fn heal(args: HealArgs) -> ExitCode {
    let credentials =
        match regguard::cli::credentials::Credentials::from_cli(args.access.user.as_deref()) {
            Ok(c) => c,
            Err(e) => return cannot("heal", &e),
        };
    let runtime = match cli_runtime() {
        Ok(rt) => rt,
        Err(e) => return cannot("heal", &e),
    };
    let aws = std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .collect();
    let result = runtime.block_on(regguard::cli::heal::heal_registry(
        &args.registry,
        &args.vault,
        args.access.insecure,
        &credentials,
        args.dry_run,
        aws,
    ));
    let result = match result {
        Ok(r) => r,
        Err(e) => return cannot("heal", &format!("{}: {e}", args.registry)),
    };
    if let Err(e) = report(args.access.format, &result, || result.render_text()) {
        return cannot("heal", &e);
    }
    if result.all_repaired() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn config_check(args: ConfigCheckArgs) -> ExitCode {
    let mut serve = args.serve;
    if let Some(file) = args.file {
        serve.config = Some(file);
    }
    let env = Environment::from_process();
    match regguard::config::effective(&serve, &env) {
        Ok(lines) => {
            print!("{}", regguard::config::render_effective(&lines, &env));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("regguard config check: configuration error: {e}");
            ExitCode::from(2)
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let settings = match Settings::load(&args, &Environment::from_process()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("regguard: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("regguard: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = runtime.block_on(regguard::server::serve(settings, shutdown_signal(), |_| {}));
    // Background work (validation walks, re-checks, the scan, parses on the blocking
    // pool) is cut, never waited for: shutdown is bounded by the drain alone.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "regguard cannot serve");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only SIGINT will stop regguard");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
