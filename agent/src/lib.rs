//! infraflux-agent: the lab platform's operator, living outside the cluster.
//!
//! Events from GitHub (webhook, NATS, polling), ChatOps commands over NATS and cron schedules
//! become durable jobs on NATS JetStream; a runner shared by all agents executes them through
//! the handlers of `infraflux-handlers`. See `docs/architecture.md` for the flow and its
//! guarantees.

pub mod agent;
pub mod app;
pub mod chatops;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod github;
pub mod http;
pub mod ingest;
mod job_book;
pub mod locks;
pub mod metrics;
pub mod poller;
pub mod records;
pub mod runner;
pub mod scheduler;
pub mod schema;
pub mod secrets;
pub mod services;
pub mod status;
pub mod store;
pub mod telemetry;

pub use agent::{AgentError, AgentHandle, start};
pub use config::Config;
