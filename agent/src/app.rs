//! What every part of a running agent shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use infraflux_handlers::Registry;
use infraflux_handlers::secret::Secrets;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingest::Ingestor;
use crate::locks::LockManager;
use crate::metrics::Metrics;
use crate::records::Records;
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

pub struct App {
    pub config: Config,
    pub agent_id: String,
    pub secrets: Secrets,
    pub services: infraflux_handlers::Context,
    pub registry: Registry,
    pub store: Store,
    pub records: Records,
    pub locks: LockManager,
    pub ingest: Ingestor,
    pub metrics: Arc<Metrics>,
    pub running: Mutex<HashMap<String, RunningJob>>,
    pub started_at: DateTime<Utc>,
    /// What `status` answers from.
    pub status: crate::status::StatusCache,
    /// When the runner loop last beat (Unix milliseconds); the watchdog reads it.
    runner_beat_ms: std::sync::atomic::AtomicI64,
}

impl App {
    pub fn new(
        config: Config,
        services: infraflux_handlers::Context,
        registry: Registry,
        store: Store,
        metrics: Arc<Metrics>,
        ingest_store: Store,
    ) -> Self {
        let secrets = services.secrets.clone();
        let agent_id = config.agent_id();
        let records = Records::new(
            store.records.clone(),
            store.js.clone(),
            store.names.clone(),
            store.state.clone(),
        );
        let locks = LockManager::new(
            store.locks.clone(),
            agent_id.clone(),
            config.agent.lease_ttl.get(),
        );
        let status = crate::status::StatusCache::default();
        let ingest = Ingestor::new(ingest_store, &records, status.clone());
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
            status,
            runner_beat_ms: std::sync::atomic::AtomicI64::new(Utc::now().timestamp_millis()),
        }
    }

    pub fn runner_beat(&self) {
        self.runner_beat_ms.store(
            Utc::now().timestamp_millis(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// How long ago the runner loop last beat.
    pub fn runner_silence(&self) -> std::time::Duration {
        let last = self
            .runner_beat_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        let ms = (Utc::now().timestamp_millis() - last).max(0);
        std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    }

    /// How handlers see other jobs.
    pub(crate) fn job_book(&self) -> crate::job_book::Book {
        crate::job_book::Book {
            records: self.records.clone(),
            ingest: self.ingest.clone(),
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
}
