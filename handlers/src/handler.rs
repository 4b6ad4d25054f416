//! The handler contract: what the runner needs to know about a job kind, and what a handler
//! gets to do its work.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::job::JobEnvelope;
use crate::kind::JobKind;
use crate::secret::Redactor;

/// Read locks share a resource; a write lock excludes everyone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockMode {
    Read,
    Write,
}

/// A resource a job needs, such as `terraform:prod` or `cluster:prod`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LockRequest {
    pub resource: String,
    pub mode: LockMode,
}

impl LockRequest {
    pub fn read(resource: impl Into<String>) -> Self {
        Self {
            resource: resource.into(),
            mode: LockMode::Read,
        }
    }

    pub fn write(resource: impl Into<String>) -> Self {
        Self {
            resource: resource.into(),
            mode: LockMode::Write,
        }
    }
}

/// How often a retryable failure is tried again, and how long to wait in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total attempts, the first included. 1 means "never retry".
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    pub const fn never() -> Self {
        Self {
            max_attempts: 1,
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
        }
    }

    pub const fn exponential(max_attempts: u32, initial: Duration, max: Duration) -> Self {
        Self {
            max_attempts,
            initial_backoff: initial,
            max_backoff: max,
        }
    }

    /// The wait before attempt `next_attempt` (2 for the first retry): doubling, capped.
    pub fn backoff(&self, next_attempt: u32) -> Duration {
        let exp = next_attempt.saturating_sub(2).min(20);
        self.initial_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff)
    }
}

/// The previous attempt of this job ended without a result: its agent died or stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interruption {
    pub attempt: u32,
    pub agent: Option<String>,
    pub at: DateTime<Utc>,
    /// The state the job was in: `running` or `waiting`.
    pub state: String,
}

/// Where a handler reports progress; each report becomes a job event and updates the record's
/// message.
#[async_trait]
pub trait Progress: Send + Sync {
    async fn report(&self, message: &str);

    /// Records the full commit sha the job works on (reconcile and apply jobs).
    async fn set_commit(&self, _sha: &str) {}

    /// Saves how far the job got in its record, for an attempt that resumes it.
    async fn save_checkpoint(&self, value: Value) -> Result<(), String>;
}

/// "Not before `until`, because `reason`": a job that may not start yet (outside a maintenance
/// window). It waits holding no lock, its timeout not started, and is looked at again at
/// `until` by whichever agent gets it then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferral {
    pub until: DateTime<Utc>,
    pub reason: String,
}

/// What a look-up for another job asks: the newest job of `kind`, optionally in `state` and
/// naming `target` among its result's targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobQuery {
    pub kind: Option<JobKind>,
    pub state: Option<String>,
    pub target: Option<String>,
}

/// A job a handler asks for once it is done with its own (acceptance after an apply).
#[derive(Debug, Clone, PartialEq)]
pub struct FollowUp {
    pub kind: JobKind,
    pub params: serde_json::Map<String, Value>,
}

/// Another job, as a handler may see it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub job_id: String,
    pub kind: JobKind,
    /// `queued`, `waiting`, `running`, `awaiting_approval`, `succeeded`, `failed`, `cancelled`.
    pub state: String,
    pub requested_by: String,
    pub commit: Option<String>,
    pub params: serde_json::Map<String, Value>,
    pub result: Value,
    pub created_at: DateTime<Utc>,
}

/// Access to other jobs, for kinds that depend on each other (an `apply` on its plan).
#[async_trait]
pub trait JobBook: Send + Sync {
    async fn job(&self, job_id: &str) -> Result<Option<JobView>, String>;

    /// Ends a job that awaits approval: its plan was applied (`succeeded`) or its apply failed.
    async fn settle_approval(
        &self,
        job_id: &str,
        succeeded: bool,
        message: &str,
    ) -> Result<(), String>;

    /// The newest job that matches (a drill needs the newest good snapshot).
    async fn newest(&self, query: &JobQuery) -> Result<Option<JobView>, String>;

    /// Queues `follow_up` on behalf of job `parent`; once per parent and kind, so a retried
    /// parent does not queue it twice. Returns the follow-up's job id.
    async fn submit_follow_up(
        &self,
        parent: &JobEnvelope,
        follow_up: FollowUp,
    ) -> Result<String, String>;
}

/// NATS storage a handler may use: the state bucket (small keys) and the artifact object store
/// (saved plans).
#[derive(Clone)]
pub struct HandlerStore {
    pub state: async_nats::jetstream::kv::Store,
    pub artifacts: async_nats::jetstream::object_store::ObjectStore,
}

/// What a handler may check before a command (ChatOps, or an approval comment on GitHub)
/// becomes a job. A refusal here is a
/// rejected command (`ok: false`), not a failed job.
pub struct Admission<'a> {
    /// The id the job will have if admitted.
    pub job_id: &'a str,
    pub requested_by: &'a str,
    /// Where the request came from: a ChatOps requester is whatever its NATS client says, a
    /// GitHub login is authenticated by GitHub.
    pub source: crate::job::Source,
    pub jobs: &'a dyn JobBook,
    pub store: &'a HandlerStore,
}

/// What a handler gets besides its job.
#[derive(Clone)]
pub struct JobContext {
    pub job_id: String,
    pub kind: JobKind,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Set when an earlier attempt was interrupted: resume or clean up before starting over.
    pub interrupted: Option<Interruption>,
    /// Stop now: triggered by a timeout, agent shutdown, or a `cancel` once the kind's
    /// [`Handler::cancel_grace`] has passed. Long steps must watch it.
    pub cancel: CancellationToken,
    /// `cancel` was asked for: stop at the next safe point (finish the node being upgraded,
    /// clean up the scratch namespace) and return [`HandlerError::Cancelled`]. Triggered before
    /// `cancel`, and also by whatever triggers `cancel`.
    pub stop_requested: CancellationToken,
    /// What an earlier, interrupted attempt saved with [`JobContext::checkpoint`].
    pub checkpoint: Option<Value>,
    pub progress: Arc<dyn Progress>,
    pub trace_id: String,
    pub traceparent: Option<String>,
    pub agent_id: String,
    /// This job's own directory under the agent's state_dir, empty at the start of each
    /// attempt and removed when the attempt ends, however it ends.
    pub work_dir: PathBuf,
    /// Scrubs secret values from anything the handler sends out.
    pub redactor: Redactor,
    pub store: HandlerStore,
    pub jobs: Arc<dyn JobBook>,
    /// Grace between SIGINT and SIGKILL for a cancelled child process.
    pub kill_grace: Duration,
}

impl JobContext {
    /// Saves progress in the job's record; an attempt that resumes the job after an
    /// interruption finds it in [`JobContext::checkpoint`].
    pub async fn checkpoint(&self, value: Value) -> Result<(), HandlerError> {
        self.progress
            .save_checkpoint(value)
            .await
            .map_err(HandlerError::Retryable)
    }
}

/// How a job ended without an error.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded {
        message: String,
        result: Value,
    },
    /// A plan with changes: the job stops here until `apply <job-id>`.
    AwaitingApproval {
        message: String,
        result: Value,
    },
    /// Nothing was done because nothing needed doing (a newer success of the same target
    /// exists). The job does not fail, but it is no success either: no "last success" moves.
    Skipped {
        message: String,
        result: Value,
    },
    /// The job ran to its end and found a target bad (a drill that did not restore): it
    /// fails, and its result still carries every target's figures.
    Failed {
        message: String,
        result: Value,
    },
}

impl Outcome {
    pub fn succeeded(message: impl Into<String>) -> Self {
        Outcome::Succeeded {
            message: message.into(),
            result: Value::Null,
        }
    }
}

/// What a job did to one target: a namespace set, a cluster, a node. A job's `result` lists
/// them under `targets`; "last success", last size and items, and the comparisons with the
/// previous run are kept per kind and target. A target name comes from config or from validated
/// command words, so metric labels stay bounded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetResult {
    pub target: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<u64>,
    /// The kind's own fields (a drill's RTO, a snapshot's object key).
    #[serde(flatten)]
    pub details: serde_json::Map<String, Value>,
}

impl TargetResult {
    pub fn ok(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            ok: true,
            skipped: false,
            size_bytes: None,
            items: None,
            details: serde_json::Map::new(),
        }
    }

    /// The details that are figures worth a metric: a drill's RTO and data age.
    pub const FIGURES: &[&str] = &["rto_seconds", "data_age_seconds"];

    /// This target's [`Self::FIGURES`], those it has.
    pub fn figures(&self) -> std::collections::BTreeMap<String, f64> {
        Self::FIGURES
            .iter()
            .filter_map(|name| {
                let value = self.details.get(*name)?.as_f64()?;
                Some((name.to_string(), value))
            })
            .collect()
    }

    /// The targets a job's `result` lists; none when it lists none or an unreadable one.
    pub fn all_in(result: &Value) -> Vec<TargetResult> {
        result
            .get("targets")
            .cloned()
            .and_then(|t| serde_json::from_value(t).ok())
            .unwrap_or_default()
    }

    /// `result` with `targets` set to these.
    pub fn put_into(targets: &[TargetResult], mut result: Value) -> Value {
        if !result.is_object() {
            result = Value::Object(serde_json::Map::new());
        }
        if let (Some(map), Ok(list)) = (result.as_object_mut(), serde_json::to_value(targets)) {
            map.insert("targets".into(), list);
        }
        result
    }

    /// A key for per-target state: KV keys take no commas or stars.
    pub fn state_key(target: &str) -> String {
        let key: String = target
            .chars()
            .map(|c| match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' => c,
                _ => '_',
            })
            .collect();
        if key.is_empty() { "_".into() } else { key }
    }
}

/// How a job ended badly. User-visible failures carry a message meant for the requester;
/// internal ones are logged in full and shown only as "internal error" with the trace id.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("{kind} is not configured: the [{section}] section of the agent config is absent")]
    NotConfigured {
        kind: JobKind,
        section: &'static str,
    },
    #[error("{0} is not available yet in this version of infraflux-agent")]
    NotAvailable(JobKind),
    #[error("{0}")]
    Failed(String),
    /// Worth trying again (a network error, a busy API); the runner backs off and retries
    /// within the kind's [`RetryPolicy`].
    #[error("{0}")]
    Retryable(String),
    #[error("cancelled")]
    Cancelled,
    #[error("internal error: {0}")]
    Internal(String),
}

impl HandlerError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, HandlerError::Retryable(_))
    }

    /// What the requester sees. Internal detail stays in the logs and the trace.
    pub fn user_message(&self, trace_id: &str) -> String {
        match self {
            HandlerError::Internal(_) => {
                format!("internal error; see the agent's logs for trace {trace_id}")
            }
            other => other.to_string(),
        }
    }

    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            HandlerError::NotConfigured { .. } => "not_configured",
            HandlerError::NotAvailable(_) => "not_available",
            HandlerError::Failed(_) => "failed",
            HandlerError::Retryable(_) => "retryable",
            HandlerError::Cancelled => "cancelled",
            HandlerError::Internal(_) => "internal",
        }
    }
}

/// A job kind's implementation.
///
/// Adding a kind: a module with its config section, a type implementing this trait and a
/// descriptor that names its verbs and builds it, listed in [`crate::KINDS`] (see
/// `docs/architecture.md`, "Adding a kind"). The registry and descriptor tests then check that
/// the kind resolves from the command language and the config.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    fn kind(&self) -> JobKind;

    /// The resources this job needs; the runner holds them all for the whole run, and a job
    /// whose locks are held waits (state `waiting`) instead of failing.
    fn locks(&self, _job: &JobEnvelope) -> Vec<LockRequest> {
        Vec::new()
    }

    /// After this long the job is cancelled and fails with a timeout.
    fn timeout(&self) -> Duration;

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::never()
    }

    /// Asked before any lock is taken, at every delivery: `Some` makes the job wait until then.
    fn not_before(&self, _job: &JobEnvelope, _now: DateTime<Utc>) -> Option<Deferral> {
        None
    }

    /// How long a `cancel` waits for the handler to stop at a safe point (it watches
    /// [`JobContext::stop_requested`]) before stopping it hard. Zero: at once.
    fn cancel_grace(&self) -> Duration {
        Duration::ZERO
    }

    /// Checks a ChatOps request before it becomes a job; may add parameters.
    async fn admit(
        &self,
        _admission: &Admission<'_>,
        _params: &mut serde_json::Map<String, Value>,
    ) -> Result<(), String> {
        Ok(())
    }

    async fn run(&self, ctx: &JobContext, job: &JobEnvelope) -> Result<Outcome, HandlerError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy::exponential(5, Duration::from_secs(2), Duration::from_secs(10));
        assert_eq!(p.backoff(2), Duration::from_secs(2));
        assert_eq!(p.backoff(3), Duration::from_secs(4));
        assert_eq!(p.backoff(4), Duration::from_secs(8));
        assert_eq!(p.backoff(5), Duration::from_secs(10));
        assert_eq!(p.backoff(60), Duration::from_secs(10));
    }

    #[test]
    fn targets_round_trip_through_a_result_with_the_kinds_own_fields() {
        let mut home = TargetResult::ok("home");
        home.items = Some(12);
        home.details.insert("rto_seconds".into(), json!(252));
        let failed = TargetResult {
            ok: false,
            ..TargetResult::ok("media")
        };
        let result = TargetResult::put_into(&[home.clone(), failed.clone()], json!({"x": 1}));
        assert_eq!(result["x"], 1);
        assert_eq!(result["targets"][0]["rto_seconds"], 252);
        assert_eq!(result["targets"][1]["ok"], false);
        assert_eq!(TargetResult::all_in(&result), vec![home, failed]);
        assert!(TargetResult::all_in(&json!({"targets": "nope"})).is_empty());
        assert!(TargetResult::all_in(&Value::Null).is_empty());
        assert_eq!(TargetResult::state_key("home,media"), "home_media");
        assert_eq!(TargetResult::state_key(""), "_");
    }

    #[test]
    fn internal_detail_is_not_user_visible() {
        let e = HandlerError::Internal("db password mismatch at 10.0.0.5".into());
        let shown = e.user_message("abc123");
        assert!(!shown.contains("10.0.0.5"));
        assert!(shown.contains("abc123"));
        let e = HandlerError::NotConfigured {
            kind: JobKind::BACKUP,
            section: "backup",
        };
        assert!(e.user_message("t").contains("[backup]"));
    }
}
