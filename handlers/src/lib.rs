//! The handler contract, the command language and one module per job kind.
//!
//! This crate knows nothing of the agent: the agent depends on it, never the other way.
//! A handler receives a [`JobEnvelope`] and a [`JobContext`] and returns an [`Outcome`] or a
//! [`HandlerError`]; the runner owns queueing, locks, retries, timeouts and records.

pub mod clients;
pub mod command;
pub mod descriptor;
pub mod github;
pub mod handler;
pub mod job;
pub mod kind;
pub mod process;
pub mod registry;
pub mod s3;
pub mod schema;
pub mod secret;
pub mod sections;
pub mod settings;
pub mod talos;
pub mod trace;
pub mod unavailable;

pub mod acceptance;
pub mod backup;
pub mod etcd_snapshot;
pub mod reconcile;
pub mod restore_drill;
pub mod upgrade;

pub use handler::{
    Admission, Deferral, FollowUp, Handler, HandlerError, HandlerStore, Interruption, JobBook,
    JobContext, JobQuery, JobView, LockMode, LockRequest, Outcome, Progress, RetryPolicy,
    TargetResult,
};
pub use job::{JobEnvelope, Source, new_job_id};
pub use kind::JobKind;
pub use registry::{Registry, Services};
pub use sections::HandlerConfigs;
