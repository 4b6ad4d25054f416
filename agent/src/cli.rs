//! The command line. `main` stays thin: it parses flags and calls into the library, and tests
//! and embedders can do the same with their own handlers registered.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use infraflux_handlers::secret::Secrets;
use infraflux_handlers::{Context, Registry};
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{self, Config, LogFormat, Problems};
use crate::{agent, ctl, secrets, telemetry};

const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("INFRAFLUX_GIT_SHA"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "infraflux-agent",
    version = LONG_VERSION,
    about = "The lab platform's operator outside the cluster: GitHub, ChatOps and cron events become durable jobs on NATS JetStream."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        #[arg(long, value_enum)]
        log_format: Option<LogFormatArg>,
    },
    /// Load and validate the whole config and resolve every secret reference (values are
    /// never printed). Exit 0 valid, 2 invalid.
    CheckConfig {
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Check the platform before it is built (Proxmox token, S3 buckets, secrets, GitHub
    /// token, APIs), without NATS: one line per check. Exit 0 all passed, 1 a check failed,
    /// 2 config invalid.
    Preflight {
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Send a ChatOps command over NATS and print the reply.
    Ctl(ctl::CtlArgs),
    /// Print each schedule's next fire times in its time zone.
    Schedules {
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        #[arg(long, default_value_t = 5)]
        next: usize,
    },
}

/// The whole program. `customize` may register extra or replacement handlers.
pub fn main_with(customize: fn(&mut Registry)) -> ExitCode {
    // Two rustls crypto providers are linked in (ring and aws-lc-rs); pick one explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    crate::allocator::tune();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run { config, log_format } => run(config, log_format, customize).await,
            Command::CheckConfig { config } => check_config(config).await,
            Command::Preflight { config } => crate::preflight::run(&config, &process_env()).await,
            Command::Ctl(args) => ExitCode::from(ctl::run(args).await),
            Command::Schedules { config, next } => schedules(config, next),
        }
    })
}

fn process_env() -> HashMap<String, String> {
    std::env::vars().collect()
}

/// The config, and what the daemon is built from or every problem that stops it: the config's
/// shape, sections a handler cannot work without, secret references, and the clients built from
/// them (kubeconfig, talosconfig). `run` and `check-config` share it, so one run of either names
/// every problem and check-config passes exactly the configs the daemon starts with.
async fn prepare(
    path: &Path,
    env: &HashMap<String, String>,
) -> (config::Loaded, Result<(Secrets, Context), Problems>) {
    let (loaded, mut problems) = Config::load_all(path, env.clone());
    problems
        .0
        .extend(crate::services::missing_sections(&loaded).0);
    // Sections that could not be read are left out of these checks; their problem is reported.
    let (secrets, unresolved) = secrets::resolve_each(&loaded.config, env).await;
    problems.0.extend(unresolved.0);
    let prepared = match crate::services::build(&loaded.config, &secrets, env).await {
        Ok(services) if problems.is_empty() => Ok((secrets, services)),
        Ok(_) => Err(problems),
        Err(more) => {
            problems.0.extend(more.0);
            Err(problems)
        }
    };
    (loaded, prepared)
}

/// Plain lines on stderr: logging is not set up yet (under systemd they go to the journal).
fn report_problems(path: &Path, problems: &Problems) {
    eprintln!("{}: {} problem(s)", path.display(), problems.0.len());
    for p in &problems.0 {
        eprintln!("error: {p}");
    }
}

async fn run(
    path: PathBuf,
    log_format: Option<LogFormatArg>,
    customize: fn(&mut Registry),
) -> ExitCode {
    let env = process_env();
    // Everything is checked before logging starts: the trace exporter's headers are secrets.
    let (loaded, prepared) = prepare(&path, &env).await;
    let (secrets, services) = match prepared {
        Ok(p) => p,
        Err(problems) => {
            report_problems(&path, &problems);
            return ExitCode::from(2);
        }
    };
    let format = log_format.map(|f| match f {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    });
    let otlp_headers: HashMap<String, String> = loaded
        .config
        .telemetry
        .otlp_headers
        .keys()
        .filter_map(|name| {
            secrets
                .of(&infraflux_handlers::secret::SecretKey::OtlpHeader(
                    name.clone(),
                ))
                .map(|v| (name.clone(), v.expose().to_string()))
        })
        .collect();
    let telemetry = match telemetry::init(
        &loaded.config.telemetry,
        &otlp_headers,
        format,
        &env,
        secrets.redactor().clone(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    for w in &loaded.warnings.0 {
        tracing::warn!(key = %w.key, "{}", w.message);
    }
    let mut registry = Registry::from_sections(&loaded.config.handlers, &services);
    customize(&mut registry);
    let handle = match agent::start(loaded.config, services, registry).await {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "Agent did not start");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = handle.shutdown_token();
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("Cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("Shutting down: finishing running jobs; signal again to exit at once");
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("Second signal: exiting now; unfinished jobs will be redelivered");
        std::process::exit(130);
    });
    let result = handle.join().await;
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "Agent failed");
            ExitCode::FAILURE
        }
    }
}

async fn check_config(path: PathBuf) -> ExitCode {
    let env = process_env();
    let (loaded, prepared) = prepare(&path, &env).await;
    if let Err(problems) = &prepared {
        report_problems(&path, problems);
    }
    for w in &loaded.warnings.0 {
        eprintln!("warning: {w}");
    }
    if prepared.is_err() {
        return ExitCode::from(2);
    }
    let enabled: Vec<&str> = infraflux_handlers::JobKind::all()
        .filter(|k| loaded.config.handlers.enables(*k))
        .map(|k| k.as_str())
        .collect();
    println!(
        "{}: valid; agent {}, {} schedule(s), handlers enabled: {}",
        path.display(),
        loaded.config.agent_id(),
        loaded.config.schedules.len(),
        if enabled.is_empty() {
            "none".to_string()
        } else {
            enabled.join(", ")
        }
    );
    ExitCode::SUCCESS
}

fn schedules(path: PathBuf, next: usize) -> ExitCode {
    let loaded = match Config::load(&path, process_env()) {
        Ok(l) => l,
        Err(problems) => {
            for p in &problems.0 {
                eprintln!("error: {p}");
            }
            return ExitCode::from(2);
        }
    };
    let now = chrono::Utc::now();
    if loaded.config.schedules.is_empty() {
        println!("no schedules");
    }
    for section in &loaded.config.schedules {
        let Ok(schedule) = loaded.config.parse_schedule(section) else {
            continue; // refused by load() already
        };
        println!(
            "{}  \"{}\"  {}  -> {}",
            section.name, section.cron, section.timezone, section.command
        );
        for fire in schedule.upcoming(now, next) {
            println!("  {}", infraflux_schedules::format_fire(&fire));
        }
    }
    ExitCode::SUCCESS
}
