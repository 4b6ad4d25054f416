//! The command line. `main` stays thin: it parses flags and calls into the library, and tests
//! and embedders can do the same with their own handlers registered.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use infraflux_handlers::Registry;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::{self, Config, LogFormat};
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
    tune_allocator();
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
            Command::Ctl(args) => ExitCode::from(ctl::run(args).await),
            Command::Schedules { config, next } => schedules(config, next),
        }
    })
}

/// The agent shares its host with a CI runner, so memory it no longer uses goes back: glibc
/// otherwise gives each thread its own arena and, after one large buffer is freed, raises its
/// mmap threshold, so later snapshot parts (8 MiB) come from the heap and stay resident.
/// Explicit `MALLOC_*` variables in the environment still win (glibc reads them first).
#[allow(unsafe_code)]
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (option, value, variable) in [
        (libc::M_ARENA_MAX, 2, "MALLOC_ARENA_MAX"),
        (
            libc::M_MMAP_THRESHOLD,
            1024 * 1024,
            "MALLOC_MMAP_THRESHOLD_",
        ),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: mallopt only changes allocator settings and is called before the
            // runtime starts any thread.
            unsafe {
                libc::mallopt(option, value);
            }
        }
    }
}

fn process_env() -> HashMap<String, String> {
    std::env::vars().collect()
}

async fn run(
    path: PathBuf,
    log_format: Option<LogFormatArg>,
    customize: fn(&mut Registry),
) -> ExitCode {
    let env = process_env();
    let loaded = match Config::load(&path, env.clone()) {
        Ok(l) => l,
        Err(problems) => {
            eprintln!("error: invalid configuration in {}:", path.display());
            for p in &problems.0 {
                eprintln!("  {p}");
            }
            return ExitCode::from(2);
        }
    };
    let format = log_format.map(|f| match f {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    });
    // Secrets first: the trace exporter's headers may be among them. Logging is not set up
    // yet, so these problems go to stderr (the journal under systemd) as plain lines.
    let secrets = match secrets::resolve_all(&loaded.config, &env).await {
        Ok(s) => s,
        Err(problems) => {
            for p in &problems.0 {
                eprintln!("error: secret not resolved: {p}");
            }
            return ExitCode::from(2);
        }
    };
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
    let telemetry = match telemetry::init(&loaded.config.telemetry, &otlp_headers, format, &env) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    for w in &loaded.warnings.0 {
        tracing::warn!(key = %w.key, "{}", w.message);
    }
    let services = match crate::services::build(&loaded.config, &secrets, &env).await {
        Ok(s) => s,
        Err(problems) => {
            for p in &problems.0 {
                tracing::error!(key = %p.key, "{}", p.message);
            }
            return ExitCode::from(2);
        }
    };
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
    // Everything that can be checked is, so one run names every problem: secret references
    // too, in the sections that could be read.
    let (loaded, shape) = Config::load_all(&path, env.clone());
    let mut failed = !shape.is_empty();
    if failed {
        eprintln!("{}: {} problem(s)", path.display(), shape.0.len());
        for p in &shape.0 {
            eprintln!("error: {p}");
        }
    }
    match secrets::resolve_all(&loaded.config, &env).await {
        Ok(resolved) if !failed => {
            if let Err(problems) = crate::services::build(&loaded.config, &resolved, &env).await {
                failed = true;
                for p in &problems.0 {
                    eprintln!("error: {p}");
                }
            }
        }
        Ok(_) => {}
        Err(problems) => {
            failed = true;
            for p in &problems.0 {
                eprintln!("error: {p}");
            }
        }
    }
    for w in &loaded.warnings.0 {
        eprintln!("warning: {w}");
    }
    if failed {
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
