//! The job envelope: every ingress (webhook, NATS GitHub events, ChatOps, schedules, pollers)
//! normalizes its input into this one shape before anything is stored.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::kind::JobKind;

/// Where a job came from. Bounded, so it can be a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// `POST /webhooks/github`
    Webhook,
    /// `<prefix>.github.<event>` published by a workflow step on the runner
    NatsGithub,
    /// `<prefix>.cmd.<verb>`
    Chatops,
    /// a `[[schedules]]` fire
    Schedule,
    /// the agent's own polling of GitHub
    Poller,
    /// queued by another job's handler once it was done (acceptance after an apply)
    FollowUp,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Webhook => "webhook",
            Source::NatsGithub => "nats-github",
            Source::Chatops => "chatops",
            Source::Schedule => "schedule",
            Source::Poller => "poller",
            Source::FollowUp => "follow-up",
        }
    }
}

/// A job as queued: what to do, for whom, from where, and how to recognise it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEnvelope {
    pub job_id: String,
    pub kind: JobKind,
    /// Validated parameters; each kind reads its own.
    #[serde(default)]
    pub params: Map<String, Value>,
    pub source: Source,
    pub requested_by: String,
    /// Equal keys mean the same request: a redelivered webhook, the same commit seen by the
    /// webhook and the poller, one schedule fire seen by every agent.
    pub idempotency_key: String,
    /// W3C `traceparent` of the span that accepted the event; the run continues that trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// For reconcile and apply: the full commit sha.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl JobEnvelope {
    /// A parameter as a string, if present.
    pub fn param_str(&self, key: &str) -> Option<&str> {
        self.params.get(key).and_then(Value::as_str)
    }
}

/// The job a follow-up was queued behind: its idempotency key is `follow-up/<parent>/<kind>`
/// ([`JobEnvelope::follow_up_of`]).
pub fn follow_up_parent(source: Source, idempotency_key: &str) -> Option<&str> {
    if source != Source::FollowUp {
        return None;
    }
    let mut parts = idempotency_key.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("follow-up"), Some(parent), Some(_kind), None) if !parent.is_empty() => Some(parent),
        _ => None,
    }
}

impl JobEnvelope {
    /// The follow-up `kind` of job `parent`: one per parent and kind (its idempotency key), in
    /// the parent's trace, requested by the parent.
    pub fn follow_up_of(parent: &JobEnvelope, kind: JobKind, params: Map<String, Value>) -> Self {
        Self {
            job_id: new_job_id(),
            kind,
            params,
            source: Source::FollowUp,
            requested_by: format!("{} {}", parent.kind, parent.job_id),
            idempotency_key: format!("follow-up/{}/{}", parent.job_id, kind),
            traceparent: parent.traceparent.clone(),
            commit: parent.commit.clone(),
            created_at: Utc::now(),
        }
    }
}

/// A new job id: a lower-case ULID, so ids sort by creation time and are safe in subjects,
/// KV keys and chat.
pub fn new_job_id() -> String {
    ulid::Ulid::new().to_string().to_ascii_lowercase()
}
