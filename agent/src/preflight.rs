//! `infraflux-agent preflight --config FILE`: the preflight checks from the command line,
//! before anything exists and without NATS. Exit 0 every check passed (or was skipped), 1 a
//! check failed, 2 the config is invalid.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::ExitCode;

use infraflux_handlers::checks::{Check, Report};
use infraflux_handlers::preflight::{self, Preflight};

use crate::config::Config;
use crate::{secrets, services};

/// Runs every check the config allows and prints one line each, then the summary.
pub async fn run(path: &Path, env: &HashMap<String, String>) -> ExitCode {
    let Some(report) = checks(path, env).await else {
        return ExitCode::from(2);
    };
    for check in &report.checks {
        println!("{}", check.line());
    }
    println!("{}", report.summary(preflight::NAME));
    if report.failed() > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The report, or `None` (with the problems on stderr) when the config is invalid. Secret
/// references that do not resolve and clients that cannot be built are checks that fail, not
/// an invalid config: the preflight is where they are found.
pub async fn checks(path: &Path, env: &HashMap<String, String>) -> Option<Report> {
    let (loaded, mut problems) = Config::load_all(path, env.clone());
    problems.0.extend(services::missing_sections(&loaded).0);
    if !problems.is_empty() {
        eprintln!("{}: {} problem(s)", path.display(), problems.0.len());
        for p in &problems.0 {
            eprintln!("error: {p}");
        }
        return None;
    }
    let total = loaded.config.secret_refs().len();
    let (resolved, unresolved) = secrets::resolve_each(&loaded.config, env).await;
    let failed: Vec<(String, String)> = unresolved
        .0
        .iter()
        .map(|p| (p.key.clone(), p.message.clone()))
        .collect();
    let secrets_check = preflight::secrets_check(total, &failed);
    let (context, client_problems) = services::build_each(&loaded.config, &resolved, env).await;
    let mut by_key: BTreeMap<String, String> = client_problems
        .0
        .into_iter()
        .map(|p| (p.key, p.message))
        .collect();
    if failed.iter().any(|(k, _)| k == "github.token") {
        by_key.insert(
            "github.token".into(),
            "does not resolve (see the secrets check)".into(),
        );
    }
    let mut preflight = Preflight::from_configs(&loaded.config.handlers, &context);
    preflight.client_problems = by_key;
    let nats = Check::skip("nats", "the command line does not use NATS");
    Some(preflight.run(secrets_check, nats).await)
}
