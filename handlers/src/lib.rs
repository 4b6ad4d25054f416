//! The handler contract, the command language and one module per job kind.
//!
//! This crate knows nothing of the agent: the agent depends on it, never the other way.
//! A handler receives a [`JobEnvelope`] and a [`JobContext`] and returns an [`Outcome`] or a
//! [`HandlerError`]; the runner owns queueing, locks, retries, timeouts and records.

pub mod checks;
pub mod clients;
pub mod command;
pub mod context;
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
mod sorted_value;
pub mod talos;
pub mod trace;
pub mod unavailable;

pub mod acceptance;
pub mod backup;
pub mod etcd_snapshot;
pub mod preflight;
pub mod reconcile;
pub mod restore_drill;
pub mod upgrade;

pub use context::Context;
pub use handler::{
    Admission, Deferral, FollowUp, Handler, HandlerError, HandlerStore, Interruption, JobBook,
    JobContext, JobQuery, JobView, LockMode, LockRequest, Outcome, Progress, RetryPolicy,
    TargetResult,
};
pub use job::{JobEnvelope, Source, new_job_id};
pub use kind::JobKind;
pub use registry::Registry;
pub use sections::HandlerConfigs;

/// Every kind, in the order `help` lists their verbs: the one list that the registry, config
/// loading, the command parser, `help`, records and metrics iterate. A new kind is one module
/// declaring its [`descriptor::KindDescriptor`], plus one line here.
pub static KINDS: &[&descriptor::KindDescriptor] = &[
    &reconcile::DESCRIPTOR,
    &reconcile::apply::DESCRIPTOR,
    &backup::DESCRIPTOR,
    &etcd_snapshot::DESCRIPTOR,
    &restore_drill::DESCRIPTOR,
    &upgrade::DESCRIPTOR,
    &acceptance::DESCRIPTOR,
    &preflight::DESCRIPTOR,
];

/// Every config section the handlers read, each once: the clients', then the kinds' in the
/// order of [`KINDS`].
pub fn config_sections() -> Vec<sections::SectionDescriptor> {
    let mut out: Vec<sections::SectionDescriptor> = clients::SECTIONS.to_vec();
    for kind in KINDS {
        if !out.iter().any(|s| s.name == kind.config.name) {
            out.push(kind.config);
        }
    }
    out
}
