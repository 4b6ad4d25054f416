//! infraflux-agent: the lab platform's operator, living outside the cluster.
//!
//! Events from GitHub (webhook, NATS, polling), ChatOps commands over NATS and cron schedules
//! become durable jobs on NATS JetStream; a runner shared by all agents executes them through
//! the handlers of `infraflux-handlers`. See `docs/architecture.md` for the flow and its
//! guarantees.

pub(crate) mod agent;
mod allocator;
pub(crate) mod app;
pub(crate) mod approval;
pub(crate) mod chatops;
pub mod cli;
pub mod clock;
pub mod config;
pub(crate) mod ctl;
pub mod github;
pub(crate) mod http;
pub mod ingest;
mod job_book;
pub mod locks;
pub(crate) mod metrics;
pub(crate) mod poller;
pub mod preflight;
pub mod records;
pub(crate) mod requeue;
pub(crate) mod runner;
pub(crate) mod scheduler;
#[cfg(test)]
mod schema;
pub mod secrets;
pub mod services;
pub(crate) mod status;
pub mod store;
pub mod telemetry;
pub(crate) mod ui;
pub mod webhook;

pub use agent::{AgentError, AgentHandle, start, start_with_clock};
pub use config::Config;
pub use status::StatusCache;
