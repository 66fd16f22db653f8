//! The `regguard` binary: parses the command line, sets up logging, and calls the library.
#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use regguard::config::{LogFormat, ServeArgs, Settings};

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
    Serve(Box<ServeArgs>),
    /// Scan a whole registry once: every tag of every repository, index children, and each
    /// image's config and layers. Exit 0: healthy; 1: broken references found; 2: could not scan.
    Scan(ScanArgs),
    /// Check images deeply (index -> children -> config and layers, sizes and digests) and print
    /// a tree with each platform and what is missing. Exit 0: healthy; 1: broken; 2: could not check.
    Check(CheckArgs),
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// Images, e.g. registry.example:5050/infra-ci:latest or host:port/repo@sha256:...
    #[arg(required = true, value_name = "REF")]
    refs: Vec<String>,
    /// Credentials as USER:PASSWORD (also REGGUARD_USER / REGGUARD_PASSWORD; else the docker
    /// config file's `auths`, from $DOCKER_CONFIG or ~/.docker/config.json).
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

#[derive(Debug, clap::Args)]
struct ScanArgs {
    /// The registry, e.g. http://registry-private:5000.
    #[arg(long, env = "REGGUARD_REGISTRY", value_name = "URL")]
    registry: String,
    /// Credentials as USER:PASSWORD (also REGGUARD_USER / REGGUARD_PASSWORD).
    #[arg(long, value_name = "USER:PASSWORD")]
    user: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: OutputFormat,
    /// Allow plain HTTP (required for http:// registries) and skip TLS certificate verification.
    #[arg(long)]
    insecure: bool,
    /// Catalog and tag-list page size.
    #[arg(long, default_value_t = 100)]
    page_size: u32,
    /// Tags checked at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
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
    }
}

fn env_user() -> Option<String> {
    let u = std::env::var("REGGUARD_USER").ok()?;
    let p = std::env::var("REGGUARD_PASSWORD").ok()?;
    Some(format!("{u}:{p}"))
}

fn check(args: CheckArgs) -> ExitCode {
    let fail = |msg: &str| {
        eprintln!("regguard check: {msg}");
        ExitCode::from(2)
    };
    let mut refs = Vec::new();
    for r in &args.refs {
        match regguard::inspect::ImageRef::parse(r) {
            Ok(p) => refs.push((r.clone(), p)),
            Err(e) => return fail(&e),
        }
    }
    let explicit = match args
        .user
        .clone()
        .or_else(env_user)
        .map(|u| regguard::config::basic_auth(&u))
        .transpose()
    {
        Ok(a) => a,
        Err(e) => return fail(&format!("--user: {e}")),
    };
    let docker_config = std::env::var("DOCKER_CONFIG")
        .map(|d| std::path::PathBuf::from(d).join("config.json"))
        .or_else(|_| {
            std::env::var("HOME").map(|h| std::path::PathBuf::from(h).join(".docker/config.json"))
        })
        .ok()
        .and_then(|p| std::fs::read_to_string(p).ok());
    let auth_for = |host: &str| {
        explicit.clone().or_else(|| {
            docker_config
                .as_deref()
                .and_then(|c| regguard::inspect::docker_config_auth(c, host))
        })
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    let results = runtime.block_on(regguard::inspect::check_all(&refs, args.insecure, auth_for));
    match args.format {
        OutputFormat::Json => match serde_json::to_string_pretty(&results) {
            Ok(j) => println!("{j}"),
            Err(e) => return fail(&e.to_string()),
        },
        OutputFormat::Text => {
            for r in &results {
                match (&r.tree, &r.error) {
                    (Some(tree), _) => {
                        let mut out = String::new();
                        tree.render(&mut out, "", true, true);
                        println!("{}", r.image);
                        print!("{out}");
                        let verdict = if r.healthy {
                            "healthy".to_string()
                        } else {
                            format!("{} broken, {} not checked", r.broken, r.unchecked)
                        };
                        println!("=> {verdict}\n");
                    }
                    (None, Some(e)) => eprintln!("regguard check: {}: {e}", r.image),
                    (None, None) => {}
                }
            }
        }
    }
    if results.iter().any(|r| r.broken > 0) {
        ExitCode::from(1)
    } else if results.iter().any(|r| !r.healthy) {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn scan(args: ScanArgs) -> ExitCode {
    let fail = |msg: &str| {
        eprintln!("regguard scan: {msg}");
        ExitCode::from(2)
    };
    if args.registry.starts_with("http://") && !args.insecure {
        return fail("refusing plain HTTP without --insecure (credentials and results would cross the network in clear text)");
    }
    let user = args.user.clone().or_else(env_user);
    let auth = match user.map(|u| regguard::config::basic_auth(&u)).transpose() {
        Ok(a) => a,
        Err(e) => return fail(&format!("--user: {e}")),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the async runtime: {e}")),
    };
    let result = runtime.block_on(regguard::scan::scan_once(
        &args.registry,
        args.insecure,
        auth,
        args.page_size,
        args.concurrency,
    ));
    let result = match result {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    match args.format {
        OutputFormat::Json => match serde_json::to_string_pretty(&result) {
            Ok(j) => println!("{j}"),
            Err(e) => return fail(&e.to_string()),
        },
        OutputFormat::Text => {
            let r = &result.report;
            println!("registry        {}", result.registry);
            println!(
                "catalog         {}",
                if r.catalog_accessible {
                    "readable"
                } else {
                    "NOT readable"
                }
            );
            println!("repositories    {}", r.repositories);
            println!("tags            {}", r.tags);
            println!("indexes         {}", r.indexes);
            println!("broken refs     {}", r.broken_references);
            println!("errors          {}", r.errors);
            println!("took            {:.1}s", r.duration_seconds);
            for b in &result.broken {
                println!(
                    "BROKEN {}:{} index {} -> {} {} ({}): {}",
                    b.repository,
                    b.reference,
                    b.index_digest,
                    b.kind.as_str(),
                    b.child_digest,
                    if b.platform.is_empty() {
                        "-"
                    } else {
                        &b.platform
                    },
                    b.upstream_said
                );
            }
        }
    }
    if !result.report.catalog_accessible {
        ExitCode::from(2)
    } else if !result.broken.is_empty() {
        ExitCode::from(1)
    } else if result.report.errors > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let settings = match Settings::load(&args) {
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
    match runtime.block_on(regguard::server::serve(settings, shutdown_signal(), |_| {})) {
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
