//! End-to-end tests: a real nats-server per test, agents in process or as child processes.

mod acceptance;
mod backups;
mod cancel;
mod chatops;
mod cli;
pub mod crash;
mod drills;
mod etcd_drill;
mod http_limits;
mod locks;
mod mapping;
mod multi_agent;
mod nats_outage;
mod operations;
mod platform;
mod preflight;
mod progress;
mod reconcile;
mod schedules;
mod secret_scan;
mod shutdown;
mod trust;
mod ui;
mod upgrade;
mod upgrade_kube;
mod upgrade_talos;
mod webhook;

use std::path::PathBuf;

/// The test agent binary: the real CLI plus the marker handler.
pub fn test_agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_infraflux-test-agent"))
}
