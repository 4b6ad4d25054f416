//! The real agent CLI with test handlers: `acceptance` jobs (and `reconcile` jobs with
//! `$IFX_TEST_RECONCILE`) write marker files under
//! `$IFX_TEST_MARKERS` and sleep `$IFX_TEST_SLEEP_MS`. Crash tests run this as a
//! child process and kill it with SIGKILL.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use infraflux_handlers::JobKind;
use infraflux_tests::handlers::MarkerHandler;

fn register(registry: &mut infraflux_handlers::Registry) {
    let Some(dir) = std::env::var_os("IFX_TEST_MARKERS") else {
        return;
    };
    let sleep_ms = std::env::var("IFX_TEST_SLEEP_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3_000);
    registry.register(Arc::new(MarkerHandler {
        kind: JobKind::ACCEPTANCE,
        dir: PathBuf::from(&dir),
        sleep: Duration::from_millis(sleep_ms),
    }));
    // Reconcile jobs (a webhook's push) run the same markers when asked to.
    if std::env::var_os("IFX_TEST_RECONCILE").is_some() {
        registry.register(Arc::new(MarkerHandler {
            kind: JobKind::RECONCILE,
            dir: PathBuf::from(&dir),
            sleep: Duration::from_millis(sleep_ms),
        }));
    }
}

fn main() -> ExitCode {
    infraflux_agent::cli::main_with(register)
}
