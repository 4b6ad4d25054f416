//! Job records (one KV entry per job) and job events (one stream message per state change).
//!
//! Every state change goes through [`Records::transition`]: a compare-and-set on the record,
//! then the event on `<prefix>.events.job.<id>`. Several agents and the `cancel` command may
//! write one record; the revision check makes their writes serial.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use infraflux_handlers::{Interruption, JobEnvelope, JobKind, JobQuery, Source, TargetResult};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::store::Names;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Waiting,
    Running,
    AwaitingApproval,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Waiting,
        JobState::Running,
        JobState::AwaitingApproval,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Waiting => "waiting",
            JobState::Running => "running",
            JobState::AwaitingApproval => "awaiting_approval",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Nothing will run for this job again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// The runner is done with the job's queue message (an approval-pending job waits for a
    /// new `apply` job, not for its own message).
    pub fn is_settled(self) -> bool {
        self.is_terminal() || self == JobState::AwaitingApproval
    }
}

/// What `job <id>` shows. CONTRACT.md lists the fields a record holds at least.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub kind: JobKind,
    pub state: JobState,
    pub source: Source,
    pub requested_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Handler starts, the interrupted ones included.
    pub attempts: u32,
    pub message: String,
    pub trace_id: String,
    pub params: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub idempotency_key: String,
    /// The agent that runs or ran the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Attempts that ended because their agent died or stopped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interruptions: Vec<Interruption>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested_by: Option<String>,
    /// The handler's structured result (a plan summary, a backup's size).
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub result: Value,
    /// The job found nothing to do: `succeeded`, but no success of its targets.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Set while the job is `waiting` for a time (a maintenance window), not for a lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// What the handler saved of its progress, for an attempt that resumes the job.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub checkpoint: Value,
    /// The acceptance job queued behind this one (`[acceptance] after`), and how it ended:
    /// a change that broke the platform shows on the change itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acceptance: Option<FollowUpNote>,
}

/// A follow-up job as its parent's record notes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FollowUpNote {
    pub job_id: String,
    pub state: JobState,
    pub message: String,
}

impl JobRecord {
    pub fn new(envelope: &JobEnvelope, trace_id: &str) -> Self {
        Self {
            job_id: envelope.job_id.clone(),
            kind: envelope.kind,
            state: JobState::Queued,
            source: envelope.source,
            requested_by: envelope.requested_by.clone(),
            created_at: envelope.created_at,
            updated_at: envelope.created_at,
            attempts: 0,
            message: format!("queued {} job", envelope.kind),
            trace_id: trace_id.to_string(),
            params: envelope.params.clone(),
            commit: envelope.commit.clone(),
            idempotency_key: envelope.idempotency_key.clone(),
            agent: None,
            started_at: None,
            finished_at: None,
            interruptions: Vec::new(),
            cancel_requested_by: None,
            result: Value::Null,
            skipped: false,
            not_before: None,
            checkpoint: Value::Null,
            acceptance: None,
        }
    }

    /// Still as ingest wrote it (never changed since: a job put back in the queue by a
    /// stopping agent was), so whether it may run at all is decided by its key's claim (see
    /// `ingest`).
    pub fn never_started(&self) -> bool {
        self.state == JobState::Queued
            && self.attempts == 0
            && self.interruptions.is_empty()
            && self.updated_at == self.created_at
    }
}

/// One state change, as published on `<prefix>.events.job.<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub job_id: String,
    pub kind: JobKind,
    pub state: JobState,
    pub at: DateTime<Utc>,
    pub message: String,
    pub source: Source,
    pub requested_by: String,
    pub trace_id: String,
}

impl From<&JobRecord> for JobEvent {
    fn from(r: &JobRecord) -> Self {
        Self {
            job_id: r.job_id.clone(),
            kind: r.kind,
            state: r.state,
            at: r.updated_at,
            message: r.message.clone(),
            source: r.source,
            requested_by: r.requested_by.clone(),
            trace_id: r.trace_id.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("job store unavailable: {0}")]
    Unavailable(String),
    #[error("job {0} not found")]
    NotFound(String),
    #[error("record of job {0} is unreadable: {1}")]
    Corrupt(String, String),
}

/// A change decided by the closure given to [`Records::transition`].
pub enum Change {
    /// Write the record (and publish an event if the state or message changed).
    Write,
    /// Leave it as it is.
    Keep,
}

/// The last result of a job kind, or of one target of a kind, kept for `status` and metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastResult {
    /// Absent for the kind's own entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    pub job_id: String,
    pub state: JobState,
    pub at: DateTime<Utc>,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_at: Option<DateTime<Utc>>,
    /// What the last success stored (`size_bytes`) and how many items (`items`), so every agent
    /// exports them, not only the one that ran the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_items: Option<u64>,
    /// The kind's own figures of the last success (a drill's RTO and data age).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub last_success_figures: BTreeMap<String, f64>,
}

/// What one finished job says about one of its targets' last success.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetFigures {
    pub target: String,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_success_size_bytes: Option<u64>,
    pub last_success_items: Option<u64>,
    pub figures: BTreeMap<String, f64>,
}

/// The targets a job's result names; a job that names none has one unnamed target (`""`).
pub fn targets_of(record: &JobRecord) -> Vec<String> {
    let named: Vec<String> = TargetResult::all_in(&record.result)
        .into_iter()
        .map(|t| t.target)
        .collect();
    if named.is_empty() {
        vec![String::new()]
    } else {
        named
    }
}

/// The targets a finished job succeeded on, with what it stored: none for a skipped job or a
/// failed one without per-target results; a job without targets counts as one unnamed target
/// whose figures are the result's own `size_bytes` and `items`.
pub fn target_figures(record: &JobRecord) -> Vec<TargetFigures> {
    if record.skipped || !matches!(record.state, JobState::Succeeded | JobState::Failed) {
        return Vec::new();
    }
    let targets = TargetResult::all_in(&record.result);
    if targets.is_empty() {
        if record.state != JobState::Succeeded {
            return Vec::new();
        }
        let field = |name: &str| record.result.get(name).and_then(Value::as_u64);
        return vec![TargetFigures {
            target: String::new(),
            last_success_at: Some(record.updated_at),
            last_success_size_bytes: field("size_bytes"),
            last_success_items: field("items"),
            figures: BTreeMap::new(),
        }];
    }
    targets
        .into_iter()
        .filter(|t| t.ok && !t.skipped)
        .map(|t| TargetFigures {
            figures: t.figures(),
            target: t.target,
            last_success_at: Some(record.updated_at),
            last_success_size_bytes: t.size_bytes,
            last_success_items: t.items,
        })
        .collect()
}

/// A job waiting for a time, as `status` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deferred {
    pub job_id: String,
    pub kind: JobKind,
    pub until: DateTime<Utc>,
    pub message: String,
}

pub fn deferred_key(job_id: &str) -> String {
    format!("deferred.{job_id}")
}

/// What a last-result entry becomes when `ours` is written over `stored`: the newer result,
/// and the newer last success of the two. A retried write (ours already stored) changes nothing.
fn merge_last(stored: Option<LastResult>, ours: LastResult) -> LastResult {
    let Some(stored) = stored else {
        return ours;
    };
    let (mut newer, older) = if stored.at > ours.at {
        (stored, ours)
    } else {
        (ours, stored)
    };
    if older.last_success_at > newer.last_success_at {
        newer.last_success_at = older.last_success_at;
        newer.last_success_size_bytes = older.last_success_size_bytes;
        newer.last_success_items = older.last_success_items;
        newer.last_success_figures = older.last_success_figures;
    }
    newer
}

/// `last.<kind>.<target>`: the target's own last result.
pub fn last_target_key(kind: JobKind, target: &str) -> String {
    format!("last.{}.{}", kind.as_str(), TargetResult::state_key(target))
}

#[derive(Clone)]
pub struct Records {
    kv: kv::Store,
    js: jetstream::Context,
    names: Names,
    /// Where the last result per kind is kept, for `status`.
    state: kv::Store,
    announcing: Announcing,
    fresh: Fresh,
    last_written: LastWritten,
}

/// How long a runner's first event of a job waits for this process's `queued` event of it.
const ANNOUNCE_PATIENCE: Duration = Duration::from_secs(2);

/// Jobs whose `queued` event this process is sending, until the store answers it: by then the
/// server has passed the event to its subscribers. Ingest and the runner use connections of
/// their own, so without this a runner quick to start a job it was just handed could be heard
/// `running` before ingest's `queued`.
#[derive(Clone, Default)]
struct Announcing(Arc<Mutex<std::collections::HashMap<String, tokio::sync::watch::Receiver<()>>>>);

/// How long a record this process's ingest created stays known to its runner (see
/// [`Records::take_fresh`]): long enough for a job run at once, far shorter than a claim lives.
const FRESH_FOR: Duration = Duration::from_secs(10);
/// At most this many are known at once; a backlog beyond is read from the store.
const FRESH_MAX: usize = 1024;

/// Records this process's ingest created moments ago, with their revisions, until the runner
/// starts their jobs: a job ingested and run by the same agent starts without reading its
/// record and its key's claim back from the store.
#[derive(Clone, Default)]
struct Fresh(Arc<Mutex<FreshRecords>>);

#[derive(Default)]
struct FreshRecords {
    by_job: std::collections::HashMap<String, (JobRecord, u64, tokio::time::Instant)>,
    /// Oldest first, for expiry.
    order: std::collections::VecDeque<(tokio::time::Instant, String)>,
}

/// The last-result entries this process wrote, with the revisions they got: the next job of
/// that kind or target writes with a compare-and-set on it instead of reading the entry first.
/// Another agent's write since makes it refused, and the entry is then read. This process's
/// own writes to one key take turns, so they never refuse each other.
#[derive(Clone, Default)]
struct LastWritten(Arc<Mutex<std::collections::HashMap<String, LastSlot>>>);

type LastSlot = Arc<tokio::sync::Mutex<Option<(LastResult, u64)>>>;

/// Keys remembered at most; a kind's and its targets' are a handful in a lab.
const LAST_WRITTEN_MAX: usize = 1024;
/// Compare-and-set attempts on one last-result entry before it is left as it is (logged).
const LAST_ATTEMPTS: usize = 4;

impl LastWritten {
    fn slot(&self, key: &str) -> LastSlot {
        let Ok(mut slots) = self.0.lock() else {
            return LastSlot::default();
        };
        if slots.len() >= LAST_WRITTEN_MAX && !slots.contains_key(key) {
            // A slot still in use stays with its writer; the compare-and-set keeps it right.
            slots.clear();
        }
        slots.entry(key.to_string()).or_default().clone()
    }
}

/// A `queued` event on its way; dropping it tells a waiting runner to go on.
pub struct Announcement {
    job_id: String,
    announcing: Announcing,
    receiver: tokio::sync::watch::Receiver<()>,
    _sender: tokio::sync::watch::Sender<()>,
}

impl Drop for Announcement {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.announcing.0.lock()
            && pending
                .get(&self.job_id)
                .is_some_and(|r| r.same_channel(&self.receiver))
        {
            pending.remove(&self.job_id);
        }
    }
}

/// Records scanned at most per `jobs` listing (newest first), so a filter that matches little
/// cannot make one command read the whole history.
const MAX_SCAN: usize = 2_000;

impl Records {
    pub fn new(kv: kv::Store, js: jetstream::Context, names: Names, state: kv::Store) -> Self {
        Self {
            kv,
            js,
            names,
            state,
            announcing: Announcing::default(),
            fresh: Fresh::default(),
            last_written: LastWritten::default(),
        }
    }

    /// Marks `job_id`'s `queued` event as on its way, before its job is sent; see
    /// [`Records::announced`].
    pub fn announcing(&self, job_id: &str) -> Announcement {
        let (sender, receiver) = tokio::sync::watch::channel(());
        if let Ok(mut pending) = self.announcing.0.lock() {
            pending.insert(job_id.to_string(), receiver.clone());
        }
        Announcement {
            job_id: job_id.to_string(),
            announcing: self.announcing.clone(),
            receiver,
            _sender: sender,
        }
    }

    /// Returns once this process's `queued` event of `job_id` is answered (at once when none
    /// is on its way), or after [`ANNOUNCE_PATIENCE`].
    pub async fn announced(&self, job_id: &str) {
        let pending = self
            .announcing
            .0
            .lock()
            .ok()
            .and_then(|p| p.get(job_id).cloned());
        if let Some(mut pending) = pending {
            // Nothing is ever sent: it ends when the announcement is dropped.
            let _ = tokio::time::timeout(ANNOUNCE_PATIENCE, pending.changed()).await;
        }
    }

    /// Notes a record ingest has just created, as revision `revision`, whose job's key's claim
    /// names it: see [`Records::take_fresh`].
    pub fn note_fresh(&self, record: &JobRecord, revision: u64) {
        let Ok(mut fresh) = self.fresh.0.lock() else {
            return;
        };
        let now = tokio::time::Instant::now();
        while let Some((at, job_id)) = fresh.order.front().cloned() {
            if now.duration_since(at) < FRESH_FOR && fresh.order.len() < FRESH_MAX {
                break;
            }
            fresh.order.pop_front();
            if fresh
                .by_job
                .get(&job_id)
                .is_some_and(|(_, _, noted)| *noted == at)
            {
                fresh.by_job.remove(&job_id);
            }
        }
        fresh
            .by_job
            .insert(record.job_id.clone(), (record.clone(), revision, now));
        fresh.order.push_back((now, record.job_id.clone()));
    }

    /// The record of `job_id` and its revision as this process's ingest created it, if that
    /// was within [`FRESH_FOR`]. Its key's claim names the job, and (on a job's first
    /// delivery) only a cancel can have changed it since: it ends the job, and the runner's
    /// first write, a compare-and-set on this revision, then reads it.
    pub fn take_fresh(&self, job_id: &str) -> Option<(JobRecord, u64)> {
        let (record, revision, noted) = self.fresh.0.lock().ok()?.by_job.remove(job_id)?;
        (noted.elapsed() < FRESH_FOR).then_some((record, revision))
    }

    /// The same records, read and written through `store`'s connection (ingest's own).
    pub fn through(&self, store: &crate::store::Store) -> Self {
        Self {
            kv: store.records.clone(),
            js: store.js.clone(),
            ..self.clone()
        }
    }

    /// Records a job's end for `status` (the newest result per kind) and for each of its
    /// targets (what metrics export, and what the next run of that target compares with).
    pub async fn record_last_result(&self, record: &JobRecord, duration_seconds: Option<f64>) {
        let kind_success =
            (record.state == JobState::Succeeded && !record.skipped).then(|| TargetFigures {
                target: String::new(),
                last_success_at: Some(record.updated_at),
                last_success_size_bytes: None,
                last_success_items: None,
                figures: BTreeMap::new(),
            });
        self.put_last(
            &format!("last.{}", record.kind.as_str()),
            None,
            record,
            duration_seconds,
            kind_success,
        )
        .await;
        let succeeded: Vec<TargetFigures> = target_figures(record);
        for target in targets_of(record) {
            let success = succeeded.iter().find(|f| f.target == target).cloned();
            self.put_last(
                &last_target_key(record.kind, &target),
                Some(target),
                record,
                duration_seconds,
                success,
            )
            .await;
        }
    }

    /// Writes one last-result entry, merged with the one stored (see [`merge_last`]) by a
    /// compare-and-set: two agents ending jobs of one kind at once never lose a success.
    async fn put_last(
        &self,
        key: &str,
        target: Option<String>,
        record: &JobRecord,
        duration_seconds: Option<f64>,
        success: Option<TargetFigures>,
    ) {
        let ours = LastResult {
            target,
            job_id: record.job_id.clone(),
            state: record.state,
            at: record.updated_at,
            message: record.message.clone(),
            duration_seconds,
            last_success_at: success.as_ref().and_then(|s| s.last_success_at),
            last_success_size_bytes: success.as_ref().and_then(|s| s.last_success_size_bytes),
            last_success_items: success.as_ref().and_then(|s| s.last_success_items),
            last_success_figures: success.map(|s| s.figures).unwrap_or_default(),
        };
        let slot = self.last_written.slot(key);
        let mut known = slot.lock().await;
        for _ in 0..LAST_ATTEMPTS {
            let (stored, revision) = match known.take() {
                Some((last, revision)) => (Some(last), revision),
                None => match self.state.entry(key).await {
                    Ok(Some(e)) if e.operation == kv::Operation::Put => {
                        (serde_json::from_slice(&e.value).ok(), e.revision)
                    }
                    Ok(Some(e)) => (None, e.revision),
                    // Revision 0: only if nothing was ever written under the key.
                    Ok(None) => (None, 0),
                    Err(e) => {
                        tracing::warn!(error = %e, key, "Last result not stored");
                        return;
                    }
                },
            };
            let last = merge_last(stored, ours.clone());
            let Ok(bytes) = serde_json::to_vec(&last) else {
                return;
            };
            match self.state.update(key, Bytes::from(bytes), revision).await {
                Ok(revision) => {
                    *known = Some((last, revision));
                    return;
                }
                // Written since (or the write's answer was lost): read it, merge again.
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {}
                Err(e) => tracing::debug!(error = %e, key, "Last result write retried"),
            }
        }
        tracing::warn!(key, "Last result not stored: the entry kept changing");
    }

    /// The newest result of every target of every kind (what metrics export).
    pub async fn last_target_results(&self) -> Vec<(JobKind, LastResult)> {
        let mut out = Vec::new();
        let Ok(mut keys) = self.state.keys().await else {
            return out;
        };
        while let Some(Ok(key)) = keys.next().await {
            let Some((kind, _)) = key
                .strip_prefix("last.")
                .and_then(|rest| rest.split_once('.'))
            else {
                continue;
            };
            let Ok(kind) = kind.parse::<JobKind>() else {
                continue;
            };
            if let Ok(Some(bytes)) = self.state.get(&key).await
                && let Ok(last) = serde_json::from_slice::<LastResult>(&bytes)
            {
                out.push((kind, last));
            }
        }
        out
    }

    pub async fn get(&self, job_id: &str) -> Result<Option<(JobRecord, u64)>, RecordError> {
        let entry = self
            .kv
            .entry(job_id)
            .await
            .map_err(|e| RecordError::Unavailable(e.to_string()))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let record = serde_json::from_slice(&e.value)
                    .map_err(|err| RecordError::Corrupt(job_id.to_string(), err.to_string()))?;
                Ok(Some((record, e.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Writes a new record; `false` when one exists already (the runner or an earlier ingest
    /// made it).
    pub async fn create(&self, record: &JobRecord) -> Result<bool, RecordError> {
        match self.kv.create(&record.job_id, encode(record)).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(RecordError::Unavailable(e.to_string())),
        }
    }

    /// Starts writing a new record (only if none exists under its id) without waiting for
    /// JetStream's answer, so the caller can send more in the same round trip.
    pub async fn start_create(
        &self,
        record: &JobRecord,
    ) -> Result<async_nats::jetstream::context::PublishAckFuture, RecordError> {
        crate::store::start_kv_create(&self.js, &self.kv, &record.job_id, encode(record))
            .await
            .map_err(|e| RecordError::Unavailable(e.to_string()))
    }

    /// Removes the record of a job that never started and never will (it lost its key's
    /// claim to another job): nobody was told its id.
    pub async fn forget(&self, job_id: &str) -> Result<(), RecordError> {
        self.kv
            .purge(job_id)
            .await
            .map_err(|e| RecordError::Unavailable(e.to_string()))
    }

    /// Publishes a job's first event, `queued`, unless the job has an event already; a task
    /// waits for the answer, so the caller does not. The check ("no message yet on the job's
    /// subject") keeps the stored events in order whoever sends it and when: ingest sends it
    /// once the job's claim is known to be its own, after the job (a job that loses its claim
    /// is never announced), and the runner when it writes a record ingest could not.
    pub async fn announce(&self, record: &JobRecord, announcement: Option<Announcement>) {
        let payload = match serde_json::to_vec(&JobEvent::from(record)) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::error!(job_id = %record.job_id, error = %e, "Cannot encode job event");
                return;
            }
        };
        let subject = self.names.event_subject(&record.job_id);
        match crate::store::publish_if_first(&self.js, subject, payload).await {
            Ok(ack) => {
                let job_id = record.job_id.clone();
                tokio::spawn(async move {
                    let answered = ack.await;
                    drop(announcement);
                    match answered {
                        Ok(_) => {}
                        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {}
                        Err(e) => {
                            tracing::warn!(%job_id, error = %e, "Job `queued` event not stored")
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(job_id = %record.job_id, error = %e, "Job `queued` event not published")
            }
        }
    }

    /// Reads, changes and writes a record with a revision check, retrying on conflict; then
    /// publishes the event if the state or the message changed. Returns the record as written.
    pub async fn transition<F>(&self, job_id: &str, change: F) -> Result<JobRecord, RecordError>
    where
        F: FnMut(&mut JobRecord) -> Change,
    {
        self.transition_from(job_id, &KnownRecord::default(), change)
            .await
    }

    /// [`Records::transition`] from what `known` holds: written against that copy's revision
    /// without a read first, and `known` then holds what was written.
    pub async fn transition_from<F>(
        &self,
        job_id: &str,
        known: &KnownRecord,
        change: F,
    ) -> Result<JobRecord, RecordError>
    where
        F: FnMut(&mut JobRecord) -> Change,
    {
        let (record, changed) = self.compare_and_set(job_id, known, change).await?;
        if changed {
            self.publish_event(&record).await;
        }
        Ok(record)
    }

    /// The record after `change`, written with compare-and-set (read again and retried when
    /// another writer came first), and whether its state or message changed. A `change` that
    /// answers `Keep` leaves the record untouched.
    async fn compare_and_set<F>(
        &self,
        job_id: &str,
        known: &KnownRecord,
        mut change: F,
    ) -> Result<(JobRecord, bool), RecordError>
    where
        F: FnMut(&mut JobRecord) -> Change,
    {
        let mut copy = known.take();
        loop {
            let from_known = copy.is_some();
            let (mut record, revision) = match copy.take() {
                Some(known) => known,
                None => self
                    .get(job_id)
                    .await?
                    .ok_or_else(|| RecordError::NotFound(job_id.to_string()))?,
            };
            let before = (record.state, record.message.clone());
            if let Change::Keep = change(&mut record) {
                if from_known {
                    // Kept is judged on what the store holds, not on a copy.
                    continue;
                }
                known.keep(&record, revision);
                return Ok((record, false));
            }
            record.updated_at = Utc::now();
            match self.kv.update(job_id, encode(&record), revision).await {
                Ok(revision) => {
                    known.keep(&record, revision);
                    let changed = before != (record.state, record.message.clone());
                    return Ok((record, changed));
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(RecordError::Unavailable(e.to_string())),
            }
        }
    }

    /// Progress lines of a running job, oldest first: the newest becomes the record's message
    /// (one write for the lot) and each is a job event, published together and then awaited,
    /// so a batch costs about two store round trips however many lines it holds. Nothing is
    /// written once the job has ended.
    pub async fn progress(
        &self,
        job_id: &str,
        known: &KnownRecord,
        lines: &[(String, DateTime<Utc>)],
    ) -> Result<(), RecordError> {
        let Some((newest, _)) = lines.last() else {
            return Ok(());
        };
        let (record, _) = self
            .compare_and_set(job_id, known, |r| {
                if r.state.is_terminal() {
                    Change::Keep
                } else {
                    r.message = newest.clone();
                    Change::Write
                }
            })
            .await?;
        // Ended meanwhile: its lines come too late for its timeline.
        if record.state.is_terminal() {
            return Ok(());
        }
        let subject = self.names.event_subject(job_id);
        let mut acks = Vec::with_capacity(lines.len());
        for (message, at) in lines {
            let event = JobEvent {
                at: *at,
                message: message.clone(),
                ..JobEvent::from(&record)
            };
            let Ok(payload) = serde_json::to_vec(&event) else {
                continue;
            };
            let payload = Bytes::from(payload);
            let ack = self.js.publish(subject.clone(), payload.clone()).await;
            acks.push((event, payload, ack));
        }
        for (event, payload, ack) in acks {
            let stored = match ack {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            };
            if !stored {
                // Kept in order only as far as the stream had them; a line retried here may
                // land after a later one, which its `at` still places.
                self.publish_payload(&subject, &event, payload).await;
            }
        }
        Ok(())
    }

    /// Publishes the record's current state as an event. A failure is logged, not returned:
    /// the record is the truth, the event stream its audit trail.
    pub async fn publish_event(&self, record: &JobRecord) {
        let event = JobEvent::from(record);
        let payload = match serde_json::to_vec(&event) {
            Ok(p) => Bytes::from(p),
            Err(e) => {
                tracing::error!(job_id = %record.job_id, error = %e, "Cannot encode job event");
                return;
            }
        };
        let subject = self.names.event_subject(&record.job_id);
        self.publish_payload(&subject, &event, payload).await;
    }

    async fn publish_payload(&self, subject: &str, event: &JobEvent, payload: Bytes) {
        for attempt in 1..=3u32 {
            match self.js.publish(subject.to_string(), payload.clone()).await {
                Ok(ack) => match ack.await {
                    Ok(_) => return,
                    Err(e) if attempt == 3 => {
                        tracing::warn!(job_id = %event.job_id, state = event.state.as_str(), error = %e, "Job event not stored");
                    }
                    Err(_) => {}
                },
                Err(e) if attempt == 3 => {
                    tracing::warn!(job_id = %event.job_id, state = event.state.as_str(), error = %e, "Job event not published");
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
        }
    }

    /// Notes a job deferred to a time, for `status` (key `deferred.<job id>`).
    pub async fn note_deferral(&self, record: &JobRecord) {
        let Some(until) = record.not_before else {
            return;
        };
        let note = Deferred {
            job_id: record.job_id.clone(),
            kind: record.kind,
            until,
            message: record.message.clone(),
        };
        if let Ok(bytes) = serde_json::to_vec(&note)
            && let Err(e) = self
                .state
                .put(deferred_key(&record.job_id), Bytes::from(bytes))
                .await
        {
            tracing::warn!(job_id = %record.job_id, error = %e, "Deferral not noted for status");
        }
    }

    /// Drops the note of a deferral once the job goes on (or ends).
    pub async fn forget_deferral(&self, job_id: &str) -> Result<(), RecordError> {
        self.state
            .purge(deferred_key(job_id))
            .await
            .map_err(|e| RecordError::Unavailable(e.to_string()))
    }

    /// Ends a job that awaits approval: its plan was applied (`succeeded`) or its apply failed.
    pub async fn settle_approval(
        &self,
        job_id: &str,
        succeeded: bool,
        message: &str,
    ) -> Result<(), RecordError> {
        let mut settled = false;
        let record = self
            .transition(job_id, |r| {
                if r.state != JobState::AwaitingApproval {
                    return Change::Keep;
                }
                r.state = if succeeded {
                    JobState::Succeeded
                } else {
                    JobState::Failed
                };
                r.message = message.to_string();
                r.finished_at = Some(Utc::now());
                settled = true;
                Change::Write
            })
            .await?;
        if settled {
            self.record_last_result(&record, None).await;
        }
        Ok(())
    }

    /// The newest job matching `query` (scanned like `jobs`, newest first).
    pub async fn newest(&self, query: &JobQuery) -> Result<Option<JobRecord>, RecordError> {
        let found = self
            .scan(
                |r| {
                    query.kind.is_none_or(|k| k == r.kind)
                        && query.state.as_deref().is_none_or(|s| s == r.state.as_str())
                        && query.target.as_deref().is_none_or(|t| {
                            TargetResult::all_in(&r.result)
                                .iter()
                                .any(|found| found.target == t)
                        })
                },
                1,
            )
            .await?;
        Ok(found.into_iter().next())
    }

    /// Jobs newest first (job ids sort by creation time), optionally filtered.
    pub async fn list(
        &self,
        kind: Option<JobKind>,
        state: Option<&str>,
        limit: usize,
    ) -> Result<Vec<JobRecord>, RecordError> {
        self.scan(
            |r| kind.is_none_or(|k| k == r.kind) && state.is_none_or(|s| s == r.state.as_str()),
            limit,
        )
        .await
    }

    /// Every record's key (a job id), each once, in ascending order. The bucket's key listing
    /// repeats a key that is updated while it runs, which a busy agent's records are.
    async fn keys(&self) -> Result<Vec<String>, RecordError> {
        let mut keys = std::collections::BTreeSet::new();
        let mut stream = self
            .kv
            .keys()
            .await
            .map_err(|e| RecordError::Unavailable(e.to_string()))?;
        while let Some(key) = stream.next().await {
            keys.insert(key.map_err(|e| RecordError::Unavailable(e.to_string()))?);
        }
        Ok(keys.into_iter().collect())
    }

    /// Records still `queued` that were created before `before` (by their job id, a ULID),
    /// oldest first: jobs whose queue message may never have been stored. Only keys from
    /// `from` on are read; the returned key is where the next look may start: every record
    /// before it had ended, and an ended record never changes again.
    pub async fn stranded(
        &self,
        before: DateTime<Utc>,
        from: Option<&str>,
    ) -> Result<(Vec<JobRecord>, Option<String>), RecordError> {
        let cutoff = std::time::SystemTime::from(before);
        let mut keys = self.keys().await?;
        keys.retain(|k| {
            from.is_none_or(|f| k.as_str() >= f)
                && ulid::Ulid::from_string(k).is_ok_and(|id| id.datetime() < cutoff)
        });
        let mut next = from.map(str::to_string);
        let mut all_ended = true;
        let mut out = Vec::new();
        for key in keys {
            let Some((record, _)) = self.get(&key).await? else {
                continue;
            };
            all_ended &= record.state.is_terminal();
            if all_ended {
                next = Some(key);
            }
            if record.state == JobState::Queued && record.created_at < before {
                out.push(record);
            }
        }
        Ok((out, next))
    }

    /// Up to `limit` records that `keep`, newest first, among the newest [`MAX_SCAN`].
    pub async fn scan(
        &self,
        keep: impl Fn(&JobRecord) -> bool,
        limit: usize,
    ) -> Result<Vec<JobRecord>, RecordError> {
        let keys = self.keys().await?;
        let mut out = Vec::new();
        for key in keys.iter().rev().take(MAX_SCAN) {
            if out.len() >= limit {
                break;
            }
            let Some((record, _)) = self.get(key).await? else {
                continue;
            };
            if keep(&record) {
                out.push(record);
            }
        }
        Ok(out)
    }
}

/// A job's record as its runner last read or wrote it, with the revision it was stored at,
/// shared by the writes of one delivery (its state, progress lines, checkpoint, commit): each
/// is written against that revision without a read first. Another writer (a cancel, an
/// approval, another delivery) makes the copy stale, which costs one refused write and a
/// read; a stale copy is never written.
#[derive(Clone, Default)]
pub struct KnownRecord(Arc<Mutex<Option<(JobRecord, u64)>>>);

impl KnownRecord {
    fn slot(&self) -> std::sync::MutexGuard<'_, Option<(JobRecord, u64)>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take(&self) -> Option<(JobRecord, u64)> {
        self.slot().take()
    }

    fn keep(&self, record: &JobRecord, revision: u64) {
        *self.slot() = Some((record.clone(), revision));
    }

    /// Holds what was just read (or nothing, if nothing was found); returns the record.
    pub fn remember(&self, read: Option<(JobRecord, u64)>) -> Option<JobRecord> {
        let record = read.as_ref().map(|(r, _)| r.clone());
        *self.slot() = read;
        record
    }

    /// Holds nothing: the next write reads first.
    pub fn forget(&self) {
        self.take();
    }
}

fn encode(record: &JobRecord) -> Bytes {
    // A record is plain data; serializing it cannot fail.
    Bytes::from(serde_json::to_vec(record).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last(job: &str, state: JobState, at: i64, success_at: Option<i64>) -> LastResult {
        let t = |s: i64| DateTime::<Utc>::from_timestamp(1_700_000_000 + s, 0).unwrap_or_default();
        LastResult {
            target: None,
            job_id: job.into(),
            state,
            at: t(at),
            message: String::new(),
            duration_seconds: None,
            last_success_at: success_at.map(t),
            last_success_size_bytes: success_at.map(|s| s as u64),
            last_success_items: None,
            last_success_figures: BTreeMap::new(),
        }
    }

    #[test]
    fn a_newer_failure_keeps_the_stored_success() {
        let stored = last("a", JobState::Succeeded, 1, Some(1));
        let merged = merge_last(Some(stored.clone()), last("b", JobState::Failed, 2, None));
        assert_eq!(merged.job_id, "b");
        assert_eq!(merged.last_success_at, stored.last_success_at);
        assert_eq!(merged.last_success_size_bytes, Some(1));
    }

    #[test]
    fn an_older_result_never_replaces_a_newer_one_but_its_newer_success_is_taken() {
        let merged = merge_last(
            Some(last("b", JobState::Failed, 5, Some(1))),
            last("a", JobState::Succeeded, 3, Some(3)),
        );
        assert_eq!(merged.job_id, "b");
        assert_eq!(merged.state, JobState::Failed);
        assert_eq!(merged.last_success_size_bytes, Some(3));
        let kept = merge_last(
            Some(last("b", JobState::Succeeded, 5, Some(5))),
            last("a", JobState::Succeeded, 3, Some(3)),
        );
        assert_eq!(kept.job_id, "b");
        assert_eq!(kept.last_success_size_bytes, Some(5));
    }

    #[test]
    fn writing_the_same_result_again_changes_nothing() {
        let ours = last("a", JobState::Failed, 2, None);
        let first = merge_last(
            Some(last("z", JobState::Succeeded, 1, Some(1))),
            ours.clone(),
        );
        let again = merge_last(Some(first.clone()), ours);
        assert_eq!(
            serde_json::to_value(&again).ok(),
            serde_json::to_value(&first).ok()
        );
    }
}
