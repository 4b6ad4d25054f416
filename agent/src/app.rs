//! What every part of a running agent shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use infraflux_handlers::secret::Secrets;
use infraflux_handlers::{JobKind, Registry};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingest::Ingestor;
use crate::locks::LockManager;
use crate::metrics::Metrics;
use crate::records::{JobRecord, JobState, Records};
use crate::store::Store;

/// Why a running job's token was cancelled; it decides how the job's record ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// `cancel <id>`: the job ends `cancelled`.
    User,
    /// The kind's timeout: the job ends `failed`.
    Timeout,
    /// The agent is stopping: the job is left for redelivery.
    Shutdown,
    /// Another agent may own the job now: touch nothing.
    LeaseLost,
}

/// A job this agent runs (or holds waiting for locks).
#[derive(Clone)]
pub struct RunningJob {
    pub token: CancellationToken,
    reason: Arc<Mutex<Option<CancelReason>>>,
}

impl RunningJob {
    pub fn new() -> Self {
        Self {
            token: CancellationToken::new(),
            reason: Arc::new(Mutex::new(None)),
        }
    }

    /// Cancels with `reason`; the first reason wins.
    pub fn cancel(&self, reason: CancelReason) {
        if let Ok(mut r) = self.reason.lock()
            && r.is_none()
        {
            *r = Some(reason);
        }
        self.token.cancel();
    }

    pub fn reason(&self) -> Option<CancelReason> {
        self.reason.lock().ok().and_then(|r| *r)
    }
}

impl Default for RunningJob {
    fn default() -> Self {
        Self::new()
    }
}

/// The last result of a job kind, kept for `status` and metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastResult {
    pub job_id: String,
    pub state: JobState,
    pub at: DateTime<Utc>,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_at: Option<DateTime<Utc>>,
}

/// An agent's presence entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Presence {
    pub agent: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub seen_at: DateTime<Utc>,
    pub concurrency: usize,
    pub running: Vec<String>,
}

pub struct App {
    pub config: Config,
    pub agent_id: String,
    pub secrets: Secrets,
    pub services: infraflux_handlers::Services,
    pub registry: Registry,
    pub store: Store,
    pub records: Records,
    pub locks: LockManager,
    pub ingest: Ingestor,
    pub metrics: Arc<Metrics>,
    pub running: Mutex<HashMap<String, RunningJob>>,
    pub started_at: DateTime<Utc>,
}

impl App {
    pub fn new(
        config: Config,
        services: infraflux_handlers::Services,
        registry: Registry,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Self {
        let secrets = services.secrets.clone();
        let agent_id = config.agent_id();
        let records = Records::new(store.records.clone(), store.js.clone(), store.names.clone());
        let locks = LockManager::new(
            store.locks.clone(),
            agent_id.clone(),
            config.agent.lease_ttl.get(),
        );
        let ingest = Ingestor::new(store.clone(), records.clone());
        Self {
            config,
            agent_id,
            secrets,
            services,
            registry,
            store,
            records,
            locks,
            ingest,
            metrics,
            running: Mutex::new(HashMap::new()),
            started_at: Utc::now(),
        }
    }

    /// The storage handlers may use.
    pub fn handler_store(&self) -> infraflux_handlers::HandlerStore {
        infraflux_handlers::HandlerStore {
            state: self.store.state.clone(),
            artifacts: self.store.artifacts.clone(),
        }
    }

    /// Cancels a job if this agent runs it; `true` if it did.
    pub fn cancel_local(&self, job_id: &str, reason: CancelReason) -> bool {
        let job = self
            .running
            .lock()
            .ok()
            .and_then(|r| r.get(job_id).cloned());
        match job {
            Some(job) => {
                job.cancel(reason);
                true
            }
            None => false,
        }
    }

    pub fn cancel_all(&self, reason: CancelReason) -> usize {
        let jobs: Vec<RunningJob> = self
            .running
            .lock()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default();
        for job in &jobs {
            job.cancel(reason);
        }
        jobs.len()
    }

    pub fn running_ids(&self) -> Vec<String> {
        self.running
            .lock()
            .map(|r| r.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Records a job's end for `status` (the newest result per kind).
    pub async fn record_last_result(&self, record: &JobRecord, duration_seconds: Option<f64>) {
        let key = format!("last.{}", record.kind.as_str());
        let previous: Option<LastResult> = self
            .store
            .state
            .get(&key)
            .await
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let last_success_at = if record.state == JobState::Succeeded {
            Some(record.updated_at)
        } else {
            previous.and_then(|p| p.last_success_at)
        };
        let last = LastResult {
            job_id: record.job_id.clone(),
            state: record.state,
            at: record.updated_at,
            message: record.message.clone(),
            duration_seconds,
            last_success_at,
        };
        if let Ok(bytes) = serde_json::to_vec(&last)
            && let Err(e) = self.store.state.put(&key, Bytes::from(bytes)).await
        {
            tracing::warn!(error = %e, "Last result not stored");
        }
    }

    /// The newest result of every kind.
    pub async fn last_results(&self) -> Vec<(JobKind, LastResult)> {
        let mut out = Vec::new();
        for kind in JobKind::ALL {
            let key = format!("last.{}", kind.as_str());
            if let Ok(Some(bytes)) = self.store.state.get(&key).await
                && let Ok(last) = serde_json::from_slice::<LastResult>(&bytes)
            {
                out.push((kind, last));
            }
        }
        out
    }
}
