//! The runner: pulls jobs from the shared durable consumer and runs them.
//!
//! Guarantees, and how they are kept:
//! - at most `agent.concurrency` jobs per agent: a permit is taken before a message is pulled;
//! - a long job is not redelivered: in-progress acks every third of `ack_wait`;
//! - a job whose agent died is redelivered (its acks stop) and its record shows the
//!   interruption; the handler is told through `JobContext::interrupted`;
//! - a job never runs twice at once: each attempt leases `job:<id>`; a redelivery that finds
//!   the lease held waits; an attempt that cannot renew its lease stops;
//! - a job id runs at most once to an end: a delivery of a settled job is only acknowledged;
//! - a terminal failure is recorded and published once, then acknowledged, never retried.

use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use chrono::Utc;
use futures::{FutureExt, StreamExt};
use infraflux_handlers::{
    Deferral, Handler, HandlerError, Interruption, JobContext, JobEnvelope, LockRequest, Outcome,
    Progress,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::Instrument;

use crate::app::{App, CancelReason, RunningJob};
use crate::ingest::Claimant;
use crate::locks::{self, Acquire, Owner};
use crate::records::{Change, FollowUpNote, JobRecord, JobState, KnownRecord, RecordError};
use crate::store::kv_key;
use crate::telemetry;

/// How long one pull request waits for a job before asking again.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How often a job waiting for locks tries again.
const LOCK_RETRY: Duration = Duration::from_millis(500);
/// How often the runner loop proves it is alive (for the systemd watchdog).
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A deferred job is looked at again at least this often, however far its time is.
const DEFER_RECHECK: Duration = Duration::from_secs(3600);
/// A handler gets this long after its token fires before it is dropped.
const HANDLER_GRACE_EXTRA: Duration = Duration::from_secs(5);

/// Pulls and runs jobs until `stop` fires, then lets running jobs finish within
/// `agent.shutdown_timeout`; jobs still running then are cancelled and left for redelivery.
pub async fn run(app: Arc<App>, stop: CancellationToken) {
    let permits = Arc::new(Semaphore::new(app.config.agent.concurrency));
    let tracker = TaskTracker::new();
    // The loop beats while it waits, so the systemd watchdog sees a live runner even when every
    // permit is held by a long job, and a stalled runtime stops the beats.
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    'pulling: loop {
        let acquire = permits.clone().acquire_owned();
        tokio::pin!(acquire);
        let permit = loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break 'pulling,
                permit = &mut acquire => match permit {
                    Ok(p) => break p,
                    Err(_) => break 'pulling,
                },
                _ = beat.tick() => app.runner_beat(),
            }
        };
        let pull = pull_one(&app.store.consumer);
        tokio::pin!(pull);
        let pulled = loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break 'pulling,
                pulled = &mut pull => break pulled,
                _ = beat.tick() => app.runner_beat(),
            }
        };
        app.runner_beat();
        match pulled {
            Ok(Some(message)) => {
                // Boxed: a task's future is copied whole when spawned and when it ends, and a
                // job's (its handler's steps inline) is several KiB.
                let delivery = Box::pin(run_delivery(app.clone(), message));
                tracker.spawn(async move {
                    delivery.await;
                    drop(permit);
                });
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "Pull failed; retrying");
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    tracker.close();
    let deadline = tokio::time::Instant::now() + app.config.agent.shutdown_timeout.get();
    let drained = loop {
        tokio::select! {
            () = tracker.wait() => break true,
            () = tokio::time::sleep_until(deadline) => break false,
            _ = beat.tick() => app.runner_beat(),
        }
    };
    if !drained {
        let n = app.cancel_all(CancelReason::Shutdown);
        tracing::warn!(
            jobs = n,
            "Shutdown deadline reached; cancelling running jobs for redelivery"
        );
        let grace = app.config.agent.kill_grace.get() + HANDLER_GRACE_EXTRA;
        let _ = tokio::time::timeout(grace, tracker.wait()).await;
    }
}

async fn pull_one(
    consumer: &jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
) -> Result<Option<jetstream::Message>, async_nats::Error> {
    let mut batch = consumer
        .batch()
        .max_messages(1)
        .expires(PULL_EXPIRES)
        .messages()
        .await?;
    match batch.next().await {
        Some(Ok(message)) => Ok(Some(message)),
        Some(Err(e)) => Err(e),
        None => Ok(None),
    }
}

async fn run_delivery(app: Arc<App>, message: jetstream::Message) {
    let envelope = match serde_json::from_slice::<JobEnvelope>(&message.payload) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(subject = %message.subject, error = %e, "Unreadable job message terminated");
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
    let span = tracing::info_span!(
        "job",
        job_id = %envelope.job_id,
        kind = %envelope.kind,
        delivery = delivered,
    );
    if let Some(tp) = &envelope.traceparent {
        telemetry::set_parent(&span, tp);
    }
    let delivery = Delivery {
        owner: Owner::new(&envelope.job_id, &app.agent_id),
        app,
        message: Arc::new(message),
        envelope,
        job: RunningJob::new(),
        held: Arc::new(Mutex::new(Vec::new())),
        known: KnownRecord::default(),
    };
    delivery.run().instrument(span).await;
}

/// One delivery of one job message to this agent.
struct Delivery {
    app: Arc<App>,
    message: Arc<jetstream::Message>,
    envelope: JobEnvelope,
    owner: Owner,
    job: RunningJob,
    /// Locks held by this attempt, the job lease first; renewed by the keepalive.
    held: Arc<Mutex<Vec<LockRequest>>>,
    /// The job's record as this delivery last read or wrote it: its next write goes without a
    /// read first.
    known: KnownRecord,
}

/// How the delivery ends for the queue.
enum Settle {
    /// Done with the message: acknowledge it.
    Ack,
    /// Give it back, to be delivered again after `delay`.
    Nak(Option<Duration>),
    /// Leave it alone (another agent may own the job now).
    Nothing,
}

impl Delivery {
    fn job_id(&self) -> &str {
        &self.envelope.job_id
    }

    async fn run(self) {
        let lease = locks::job_lease(self.job_id());
        match self.app.locks.try_lease(&lease, &self.owner).await {
            Ok(Acquire::Acquired) => {}
            Ok(Acquire::Busy { holder, .. }) => {
                tracing::info!(agent = %holder.agent, "Job is still leased by another attempt; delivery deferred");
                let delay = self.app.locks.ttl() / 2;
                let _ = self.message.ack_with(AckKind::Nak(Some(delay))).await;
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Job lease unavailable; delivery deferred");
                let _ = self
                    .message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return;
            }
        }
        self.lock_held().push(lease);
        if let Ok(mut running) = self.app.running.lock() {
            running.insert(self.job_id().to_string(), self.job.clone());
        }
        self.app.metrics.jobs_running.inc();
        // Aborted when dropped: whatever ends this delivery, its leases stop being renewed.
        let keepalive = AbortOnDropHandle::new(tokio::spawn(keepalive(
            self.app.clone(),
            self.message.clone(),
            self.owner.clone(),
            self.held.clone(),
            self.job.clone(),
        )));

        let settle = self.execute().await;

        drop(keepalive);
        match settle {
            Settle::Ack => {
                // A confirmed ack: a lost one would only cause a harmless redelivery, but the
                // confirmation keeps `status` queue depth honest.
                if self.message.double_ack().await.is_err() {
                    let _ = self.message.ack().await;
                }
            }
            Settle::Nak(delay) => {
                let _ = self.message.ack_with(AckKind::Nak(delay)).await;
            }
            Settle::Nothing => {}
        }
        let held = std::mem::take(&mut *self.lock_held());
        self.app.locks.release_all(&held, &self.owner).await;
        if let Ok(mut running) = self.app.running.lock() {
            running.remove(self.job_id());
        }
        self.app.metrics.jobs_running.dec();
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, Vec<LockRequest>> {
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Everything between taking the lease and settling the message.
    async fn execute(&self) -> Settle {
        let record = match self.load_record().await {
            Ok(Admission::Run(r)) => *r,
            Ok(Admission::Lost) => return Settle::Ack,
            Ok(Admission::Superseded { by }) => {
                let message = format!(
                    "superseded by job {by}: its idempotency key's claim had expired before it started, and a new submission claimed the key"
                );
                return self.finish(JobState::Cancelled, message, None, None).await;
            }
            Err(RecordError::Corrupt(id, reason)) => {
                tracing::error!(job_id = %id, %reason, "Unreadable job record; job terminated");
                return Settle::Ack;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Job record unavailable; delivery deferred");
                return Settle::Nak(Some(Duration::from_secs(1)));
            }
        };
        if record.state.is_settled() {
            tracing::info!(
                state = record.state.as_str(),
                "Job already settled; duplicate delivery acknowledged"
            );
            return Settle::Ack;
        }
        if let Some(by) = record.cancel_requested_by.clone() {
            return self
                .finish(
                    JobState::Cancelled,
                    format!("cancelled by {by} before it started"),
                    None,
                    None,
                )
                .await;
        }
        // A job deferred to a time was held by nobody: its redelivery is no interruption.
        let held_by_an_agent = matches!(record.state, JobState::Running | JobState::Waiting)
            && record.not_before.is_none();
        let interrupted = if held_by_an_agent {
            Some(Interruption {
                attempt: record.attempts,
                agent: record.agent.clone(),
                at: record.updated_at,
                state: record.state.as_str().to_string(),
            })
        } else {
            None
        };
        if let Some(interruption) = &interrupted {
            let max = self.app.config.agent.max_deliveries;
            let previous_agent = interruption
                .agent
                .clone()
                .unwrap_or_else(|| "an agent".into());
            // Counted from the record, not from JetStream's delivery count, which also grows
            // with retries and with deliveries deferred while a lease was held.
            let interrupted_times =
                u32::try_from(record.interruptions.len()).unwrap_or(u32::MAX) + 1;
            if interrupted_times >= max {
                return self
                    .finish(
                        JobState::Failed,
                        format!(
                            "interrupted {} times (last on {previous_agent}); giving up",
                            record.interruptions.len() + 1
                        ),
                        None,
                        None,
                    )
                    .await;
            }
            let me = self.app.agent_id.clone();
            let interruption = interruption.clone();
            let written = self
                .transition(|r| {
                    r.interruptions.push(interruption.clone());
                    r.state = JobState::Queued;
                    r.message = format!(
                        "attempt {} was interrupted on {previous_agent} (its agent stopped or died); resuming on {me}",
                        interruption.attempt
                    );
                })
                .await;
            match written {
                Ok(r) if r.state.is_terminal() => return Settle::Ack,
                Ok(_) => {}
                Err(_) => return Settle::Nak(Some(Duration::from_secs(1))),
            }
            tracing::warn!(previous_agent = %previous_agent, "Job was interrupted; running it again");
        }

        let handler = match self.app.registry.get(self.envelope.kind) {
            Ok(h) => h,
            Err(e) => {
                // `finish` counts the failure: once.
                let message = e.user_message(&record.trace_id);
                return self.finish(JobState::Failed, message, None, None).await;
            }
        };

        // A job that saved progress has started (a rollout half done): it resumes, never waits
        // for the next window with a node cordoned.
        if record.checkpoint.is_null()
            && let Some(deferral) = handler.not_before(&self.envelope, Utc::now())
        {
            return self.defer(deferral).await;
        }
        if record.not_before.is_some() {
            let _ = self.app.records.forget_deferral(self.job_id()).await;
        }

        if let Some(settle) = self.acquire_locks(handler.as_ref()).await {
            return settle;
        }

        let me = self.app.agent_id.clone();
        let started = self
            .transition(|r| {
                r.attempts += 1;
                r.state = JobState::Running;
                r.not_before = None;
                r.agent = Some(me.clone());
                r.started_at = Some(Utc::now());
                r.message = format!("running on {me} (attempt {})", r.attempts);
            })
            .await;
        let record = match started {
            Ok(r) if r.state.is_terminal() => return Settle::Ack,
            Ok(r) => r,
            Err(_) => return Settle::Nak(Some(Duration::from_secs(1))),
        };
        self.run_handler(handler, record, interrupted).await
    }

    /// The job may not start before `deferral.until`: it waits holding nothing, and its message
    /// comes back then (at most [`DEFER_RECHECK`] later, so a changed window is seen), to
    /// whichever agent pulls it.
    async fn defer(&self, deferral: Deferral) -> Settle {
        let message = format!(
            "waiting until {}: {}",
            deferral
                .until
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            deferral.reason
        );
        let written = self
            .transition(|r| {
                r.state = JobState::Waiting;
                r.not_before = Some(deferral.until);
                r.message = message.clone();
            })
            .await;
        match written {
            Ok(r) if r.state.is_terminal() => return Settle::Ack,
            Ok(r) => self.app.records.note_deferral(&r).await,
            Err(_) => return Settle::Nak(Some(Duration::from_secs(1))),
        }
        let wait = (deferral.until - Utc::now())
            .to_std()
            .unwrap_or_default()
            .clamp(Duration::from_millis(100), DEFER_RECHECK);
        Settle::Nak(Some(wait))
    }

    /// Returns a settle decision if the job must not go on (cancelled, stopping).
    async fn acquire_locks(&self, handler: &dyn Handler) -> Option<Settle> {
        let requests = handler.locks(&self.envelope);
        if requests.is_empty() {
            return None;
        }
        let waiting_since = Instant::now();
        let mut announced = false;
        loop {
            match self.app.locks.try_acquire_all(&requests, &self.owner).await {
                Ok(Acquire::Acquired) => {
                    self.lock_held().extend(requests.iter().cloned());
                    self.app
                        .metrics
                        .lock_wait
                        .get_or_create(&crate::metrics::KindLabel {
                            kind: self.envelope.kind.as_str().to_string(),
                        })
                        .observe(waiting_since.elapsed().as_secs_f64());
                    return None;
                }
                Ok(Acquire::Busy { resource, holder }) => {
                    if !announced {
                        announced = true;
                        let mode = match requests.iter().find(|r| r.resource == resource) {
                            Some(r) if r.mode == infraflux_handlers::LockMode::Read => "read",
                            _ => "write",
                        };
                        let message = format!(
                            "waiting for {mode} lock {resource}, held by job {} on {}",
                            holder.job_id, holder.agent
                        );
                        match self
                            .transition(|r| {
                                r.state = JobState::Waiting;
                                r.not_before = None;
                                r.message = message.clone();
                            })
                            .await
                        {
                            Ok(r) if r.state.is_terminal() => return Some(Settle::Ack),
                            _ => {}
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "Lock store unavailable; still waiting"),
            }
            tokio::select! {
                () = self.job.token.cancelled() => {
                    return Some(match self.job.reason() {
                        Some(CancelReason::User) => {
                            self.finish(JobState::Cancelled, "cancelled while waiting for locks".into(), None, None).await
                        }
                        Some(CancelReason::LeaseLost) => Settle::Nothing,
                        _ => {
                            // Stopping: put it back as if it had never been picked up.
                            let _ = self.transition(|r| {
                                r.state = JobState::Queued;
                                r.message = "requeued: its agent is stopping".into();
                            }).await;
                            Settle::Nak(None)
                        }
                    });
                }
                () = tokio::time::sleep(LOCK_RETRY) => {}
            }
        }
    }

    async fn run_handler(
        &self,
        handler: Arc<dyn Handler>,
        record: JobRecord,
        interrupted: Option<Interruption>,
    ) -> Settle {
        let kind = self.envelope.kind;
        let work_dir = match JobDir::create(&self.app.config.agent.state_dir, self.job_id()) {
            Ok(dir) => dir,
            Err(e) => {
                return self
                    .finish(
                        JobState::Failed,
                        format!("cannot create the job's working directory: {e}"),
                        None,
                        None,
                    )
                    .await;
            }
        };
        let hard_stop = CancellationToken::new();
        let progress =
            RecordProgress::start(self.app.clone(), record.job_id.clone(), self.known.clone());
        let ctx = JobContext {
            job_id: record.job_id.clone(),
            kind,
            attempt: record.attempts,
            interrupted,
            cancel: hard_stop.clone(),
            stop_requested: self.job.token.clone(),
            checkpoint: Some(record.checkpoint.clone()).filter(|c| !c.is_null()),
            progress: progress.clone(),
            trace_id: record.trace_id.clone(),
            traceparent: telemetry::traceparent_of(&tracing::Span::current())
                .or_else(|| self.envelope.traceparent.clone()),
            agent_id: self.app.agent_id.clone(),
            work_dir: work_dir.path.clone(),
            redactor: self.app.secrets.redactor().clone(),
            store: self.app.handler_store(),
            jobs: Arc::new(self.app.job_book()),
            kill_grace: self.app.config.agent.kill_grace.get(),
        };
        let timeout = handler.timeout();
        let started = Instant::now();
        let result = {
            // A panicking handler is a bug in one job, not in the agent: its job fails, its
            // locks are released below, and the runner goes on.
            let mut run = pin!(
                AssertUnwindSafe(handler.run(&ctx, &self.envelope))
                    .catch_unwind()
                    .map(|caught| caught.unwrap_or_else(|panic| Err(panicked(panic.as_ref()))))
                    .instrument(tracing::info_span!("handler"))
            );
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let early = tokio::select! {
                result = &mut run => Some(result),
                () = &mut deadline => {
                    self.job.cancel(CancelReason::Timeout);
                    None
                }
                () = self.job.token.cancelled() => None,
            };
            // A `cancel` first lets the handler stop at a safe point, within the kind's grace
            // (and the timeout); anything else stops it at once.
            let early = match early {
                None if self.job.reason() == Some(CancelReason::User) => tokio::select! {
                    result = &mut run => Some(result),
                    () = tokio::time::sleep(handler.cancel_grace()) => None,
                    () = &mut deadline => None,
                },
                other => other,
            };
            match early {
                Some(result) => result,
                None => {
                    hard_stop.cancel();
                    let grace = self.app.config.agent.kill_grace.get() + HANDLER_GRACE_EXTRA;
                    tokio::time::timeout(grace, &mut run)
                        .await
                        .unwrap_or(Err(HandlerError::Cancelled))
                }
            }
        };
        drop(ctx);
        drop(work_dir);
        let elapsed = started.elapsed();
        progress.flush().await;
        let kind_label = kind.as_str();
        let redactor = self.app.secrets.redactor().clone();
        let ending = conclude(
            result,
            self.job.reason(),
            record.attempts,
            handler.retry_policy(),
            timeout,
            &record.trace_id,
            &|text| redactor.redact(text),
        );
        let (state, message, value, skipped) = match ending {
            Ending::Abandon => {
                tracing::error!("Job lease lost while running; leaving the job to its new owner");
                return Settle::Nothing;
            }
            Ending::Requeue => {
                let me = self.app.agent_id.clone();
                let _ = self
                    .transition(|r| {
                        r.message = format!(
                            "interrupted: {me} is shutting down; the job will be redelivered"
                        );
                    })
                    .await;
                return Settle::Nak(None);
            }
            Ending::Retry { delay, message } => {
                self.app.metrics.job_ended(kind_label, "retried");
                let message = with_disk_hint(message, &self.app.config.agent.state_dir);
                let _ = self
                    .transition(|r| {
                        r.state = JobState::Queued;
                        r.message = message.clone();
                    })
                    .await;
                return Settle::Nak(Some(delay));
            }
            Ending::CancelledByUser => {
                let by = match self.app.records.get(self.job_id()).await {
                    Ok(read) => self
                        .known
                        .remember(read)
                        .and_then(|r| r.cancel_requested_by),
                    Err(_) => None,
                }
                .unwrap_or_else(|| "a user".into());
                (
                    JobState::Cancelled,
                    format!("cancelled by {by}"),
                    serde_json::Value::Null,
                    false,
                )
            }
            Ending::Finish {
                state,
                message,
                result,
                skipped,
                internal,
            } => {
                if let Some(detail) = internal {
                    tracing::error!(error = %detail, "Job failed with an internal error");
                }
                let message = if state == JobState::Failed {
                    with_disk_hint(message, &self.app.config.agent.state_dir)
                } else {
                    message
                };
                (state, message, result, skipped)
            }
        };
        self.app
            .metrics
            .job_duration
            .get_or_create(&crate::metrics::KindLabel {
                kind: kind_label.to_string(),
            })
            .observe(elapsed.as_secs_f64());
        self.finish_with(
            state,
            message,
            Some(value),
            Some(elapsed.as_secs_f64()),
            skipped,
        )
        .await
    }

    async fn finish(
        &self,
        state: JobState,
        message: String,
        result: Option<serde_json::Value>,
        duration: Option<f64>,
    ) -> Settle {
        self.finish_with(state, message, result, duration, false)
            .await
    }

    /// Writes the job's end (retrying while the store is unreachable) and says how to settle.
    async fn finish_with(
        &self,
        state: JobState,
        message: String,
        result: Option<serde_json::Value>,
        duration: Option<f64>,
        skipped: bool,
    ) -> Settle {
        let message = self.app.secrets.redactor().redact(&message);
        let mut backoff = Duration::from_millis(200);
        for _ in 0..8 {
            let written = self
                .transition(|r| {
                    r.state = state;
                    r.message = message.clone();
                    r.finished_at = Some(Utc::now());
                    r.skipped = skipped;
                    if let Some(v) = &result {
                        r.result = v.clone();
                    }
                })
                .await;
            match written {
                Ok(record) => {
                    tracing::info!(state = record.state.as_str(), message = %record.message, "Job ended");
                    let outcome = if record.skipped {
                        "skipped"
                    } else {
                        record.state.as_str()
                    };
                    self.app.metrics.job_ended(record.kind.as_str(), outcome);
                    self.app
                        .metrics
                        .checks_of(record.kind.as_str(), &record.result);
                    for figures in crate::records::target_figures(&record) {
                        self.app.metrics.last_success_of(
                            record.kind.as_str(),
                            &figures.target,
                            figures.last_success_at,
                            figures.last_success_size_bytes,
                            figures.last_success_items,
                            &figures.figures,
                        );
                    }
                    if let (Some(drift), Some(env)) = (
                        record
                            .result
                            .get("drift")
                            .and_then(serde_json::Value::as_bool),
                        record.result.get("env").and_then(serde_json::Value::as_str),
                    ) {
                        self.app
                            .metrics
                            .drift
                            .get_or_create(&crate::metrics::EnvLabel {
                                env: env.to_string(),
                            })
                            .set(i64::from(drift));
                    }
                    self.app.records.record_last_result(&record, duration).await;
                    self.note_on_parent(&record).await;
                    self.follow_up(&record).await;
                    return Settle::Ack;
                }
                // A record that cannot be decoded never will be: the job ends here, logged.
                Err(RecordError::Corrupt(..)) => return Settle::Ack,
                // Not found is retried, never acknowledged: a record that seems missing was
                // read where it had not arrived yet, and acknowledging would leave the job
                // `queued` forever with nothing left to run it.
                Err(e) => {
                    tracing::warn!(error = %e, "Job end not recorded yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        // Not acknowledged: the job will be redelivered and seen as interrupted.
        tracing::error!(
            state = state.as_str(),
            "Job end could not be recorded; leaving it for redelivery"
        );
        Settle::Nothing
    }

    /// Queues the acceptance job that follows a successful job of a kind `[acceptance] after`
    /// lists; once per parent (the follow-up's idempotency key), so a redelivered end does
    /// not queue it twice. A skipped job changed nothing and is not followed.
    async fn follow_up(&self, record: &JobRecord) {
        let acceptance = infraflux_handlers::JobKind::ACCEPTANCE;
        if record.state != JobState::Succeeded
            || record.skipped
            || record.kind == acceptance
            || !self.app.registry.is_enabled(acceptance)
            || !infraflux_handlers::acceptance::follows(&self.app.config.handlers, record.kind)
        {
            return;
        }
        let envelope = JobEnvelope::follow_up_of(&self.envelope, acceptance, Default::default());
        match self.app.ingest.submit(envelope).await {
            Ok(submitted) => {
                tracing::info!(
                    follow_up = submitted.job_id(),
                    "Acceptance queued after the job"
                );
                let note = FollowUpNote {
                    job_id: submitted.job_id().to_string(),
                    state: JobState::Queued,
                    message: format!("acceptance {} queued", submitted.job_id()),
                };
                self.note(&record.job_id, note).await;
            }
            Err(e) => tracing::warn!(error = %e, "Acceptance after the job not queued"),
        }
    }

    /// An acceptance job that followed another notes how it ended on that job's record, so a
    /// change that broke the platform says so where the change is looked at.
    async fn note_on_parent(&self, record: &JobRecord) {
        if record.kind != infraflux_handlers::JobKind::ACCEPTANCE {
            return;
        }
        let Some(parent) =
            infraflux_handlers::job::follow_up_parent(record.source, &record.idempotency_key)
        else {
            return;
        };
        let note = FollowUpNote {
            job_id: record.job_id.clone(),
            state: record.state,
            message: record.message.clone(),
        };
        self.note(parent, note).await;
    }

    /// Writes `note` on job `parent`'s record (which has ended: no state changes, no event).
    /// A newer note of the same follow-up is never overwritten by an older one.
    async fn note(&self, parent: &str, note: FollowUpNote) {
        let written = self
            .app
            .records
            .transition(parent, |r| match &r.acceptance {
                Some(old) if old.job_id == note.job_id && old.state.is_terminal() => Change::Keep,
                _ => {
                    r.acceptance = Some(note.clone());
                    Change::Write
                }
            })
            .await;
        if let Err(e) = written {
            tracing::warn!(error = %e, parent, "Acceptance not noted on the job it followed");
        }
    }

    /// Applies `change` unless the record already ended (a concurrent `cancel`).
    async fn transition<F>(&self, mut change: F) -> Result<JobRecord, RecordError>
    where
        F: FnMut(&mut JobRecord),
    {
        // A job this agent just ingested: its `queued` event is heard first.
        self.app.records.announced(self.job_id()).await;
        self.app
            .records
            .transition_from(self.job_id(), &self.known, |r| {
                if r.state.is_terminal() {
                    Change::Keep
                } else {
                    change(r);
                    Change::Write
                }
            })
            .await
    }

    /// The job's record, written from the envelope if ingest could not write it, unless the
    /// job is not to run: its key's claim names another job (see `ingest`).
    async fn load_record(&self) -> Result<Admission, RecordError> {
        let job_id = self.job_id();
        // A job this agent just ingested, on its first delivery (no agent ran it before):
        // nothing to read back. Its ingest is through once its `queued` event is answered.
        if self.message.info().is_ok_and(|i| i.delivered == 1) {
            self.app.records.announced(job_id).await;
            if let Some(fresh) = self.app.records.take_fresh(job_id)
                && let Some(record) = self.known.remember(Some(fresh))
            {
                return Ok(Admission::Run(Box::new(record)));
            }
        }
        // The claim is read beside the record: a job's first start waits for one read only.
        let (record, claimant) = tokio::join!(
            self.app.records.get(job_id),
            self.app.ingest.claimant(&self.envelope.idempotency_key)
        );
        let mut record = self.known.remember(record?);
        if let Some(r) = record.take_if(|r| !r.never_started()) {
            return Ok(Admission::Run(Box::new(r)));
        }
        let unavailable = |e: crate::ingest::IngestError| RecordError::Unavailable(e.to_string());
        let claimant = match claimant.map_err(unavailable)? {
            Claimant::Job {
                job_id: claimant,
                at,
            } => Some((claimant, at)),
            // Nobody claimed the key (the claim's write failed, or it expired): this job does.
            Claimant::Nobody => Some((
                self.app
                    .ingest
                    .claim(&kv_key(&self.envelope.idempotency_key), job_id)
                    .await
                    .map_err(unavailable)?,
                Utc::now(),
            )),
            // Ingest takes no new submission of the key while its claim is unreadable: this
            // job is the only one.
            Claimant::Unreadable => {
                tracing::warn!(
                    "The claim of the job's idempotency key is unreadable; the job runs"
                );
                None
            }
        };
        if let Some((claimant, claimed_at)) = claimant.filter(|(c, _)| c != job_id) {
            // A job accepted before the key's present claim existed lost its own claim to
            // expiry: its sender was told of it, so it ends visibly. Otherwise it is a
            // submission that lost the claim, which nobody was told of: it leaves no trace.
            let margin = chrono::Duration::from_std(CLAIM_CLOCK_MARGIN).unwrap_or_default();
            if let Some(r) = &record
                && r.created_at + margin < claimed_at
            {
                return Ok(Admission::Superseded { by: claimant });
            }
            tracing::info!(
                %claimant,
                "Job lost its key's claim to another job (a concurrent submission of the same key); dropped"
            );
            if record.is_some() {
                self.known.forget();
                self.app.records.forget(job_id).await?;
            }
            return Ok(Admission::Lost);
        }
        if record.is_none() {
            // Ingest sends the record just before the job, to another stream: give it a moment.
            tokio::time::sleep(Duration::from_millis(50)).await;
            record = self.known.remember(self.app.records.get(job_id).await?);
        }
        if let Some(record) = record {
            return Ok(Admission::Run(Box::new(record)));
        }
        let trace_id = self
            .envelope
            .traceparent
            .as_deref()
            .and_then(telemetry::trace_id_of)
            .unwrap_or_default();
        let record = JobRecord::new(&self.envelope, &trace_id);
        if self.app.records.create(&record).await? {
            self.app.records.announce(&record, None).await;
        }
        self.known
            .remember(self.app.records.get(job_id).await?)
            .map(|r| Admission::Run(Box::new(r)))
            .ok_or_else(|| RecordError::NotFound(job_id.to_string()))
    }
}

/// Whether a delivery may run its job, by its key's claim.
enum Admission {
    Run(Box<JobRecord>),
    /// A submission that lost the claim: dropped without a trace.
    Lost,
    /// Accepted, but its claim expired before it started and another job claimed the key.
    Superseded {
        by: String,
    },
}

/// How much earlier than a key's present claim a job's record must be to count as accepted
/// before that claim existed: a losing submission writes its record within its claim
/// patience of the winner's claim, on agents whose clocks may differ a little.
const CLAIM_CLOCK_MARGIN: Duration = Duration::from_secs(120);

/// A value with every string in it scrubbed of secrets: records are shown to users.
pub(crate) fn redact_value(
    redactor: &infraflux_handlers::secret::Redactor,
    value: serde_json::Value,
) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::String(s) => Value::String(redactor.redact(&s)),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|v| redact_value(redactor, v))
                .collect(),
        ),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, redact_value(redactor, v)))
                .collect(),
        ),
        other => other,
    }
}

/// How one attempt of a job ends.
/// Below this much free space in `state_dir`, a failure says so.
const LOW_DISK_BYTES: u64 = 16 << 20;

/// A job that fails while `state_dir` is (nearly) full says so: "No space left on device" deep
/// in a git or terraform error is easy to miss, and freeing the disk is the operator's fix.
// The statvfs fields are u64 here but narrower on 32-bit targets.
#[allow(clippy::useless_conversion)]
fn with_disk_hint(message: String, state_dir: &std::path::Path) -> String {
    let free = nix::sys::statvfs::statvfs(state_dir)
        .ok()
        .map(|s| u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size())));
    match free {
        Some(free) if free < LOW_DISK_BYTES => format!(
            "{message} (state_dir {} is full: {} KiB free)",
            state_dir.display(),
            free / 1024
        ),
        _ => message,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Ending {
    /// Record this end and acknowledge the message.
    Finish {
        state: JobState,
        message: String,
        result: serde_json::Value,
        skipped: bool,
        /// An internal error's detail, for the log only (already redacted).
        internal: Option<String>,
    },
    /// `cancel <id>`: ends `cancelled`, naming who asked.
    CancelledByUser,
    /// Worth another attempt after `delay`.
    Retry { delay: Duration, message: String },
    /// Another agent owns the job now: touch nothing.
    Abandon,
    /// This agent is stopping: give the job back for redelivery.
    Requeue,
}

/// Decides how an attempt ends from what happened alone: the handler's result, why its token
/// was cancelled, how many attempts were made and the kind's retry policy. Pure, so every
/// combination is tested in a table; the runner only carries the decision out.
fn conclude(
    result: Result<Outcome, HandlerError>,
    reason: Option<CancelReason>,
    attempts: u32,
    policy: infraflux_handlers::RetryPolicy,
    timeout: Duration,
    trace_id: &str,
    redact: &dyn Fn(&str) -> String,
) -> Ending {
    let finish = |state, message: String, result, skipped| Ending::Finish {
        state,
        message,
        result,
        skipped,
        internal: None,
    };
    if reason == Some(CancelReason::LeaseLost) {
        return Ending::Abandon;
    }
    if reason == Some(CancelReason::Shutdown) && result.is_err() {
        return Ending::Requeue;
    }
    match result {
        Ok(Outcome::Succeeded { message, result }) => {
            finish(JobState::Succeeded, message, result, false)
        }
        Ok(Outcome::AwaitingApproval { message, result }) => {
            finish(JobState::AwaitingApproval, message, result, false)
        }
        Ok(Outcome::Skipped { message, result }) => {
            finish(JobState::Succeeded, message, result, true)
        }
        Ok(Outcome::Failed { message, result }) => {
            finish(JobState::Failed, redact(&message), result, false)
        }
        Err(_) if reason == Some(CancelReason::User) => Ending::CancelledByUser,
        Err(_) if reason == Some(CancelReason::Timeout) => finish(
            JobState::Failed,
            format!("timed out after {}", humantime::format_duration(timeout)),
            serde_json::Value::Null,
            false,
        ),
        Err(e) if e.is_retryable() && attempts < policy.max_attempts => {
            let delay = policy.backoff(attempts + 1);
            Ending::Retry {
                delay,
                message: format!(
                    "attempt {attempts} failed: {}; retrying in {}",
                    redact(&e.to_string()),
                    humantime::format_duration(delay)
                ),
            }
        }
        Err(HandlerError::Cancelled) => finish(
            JobState::Cancelled,
            "cancelled".into(),
            serde_json::Value::Null,
            false,
        ),
        Err(e) => Ending::Finish {
            state: JobState::Failed,
            message: redact(&e.user_message(trace_id)),
            result: serde_json::Value::Null,
            skipped: false,
            internal: match &e {
                HandlerError::Internal(detail) => Some(redact(detail)),
                _ => None,
            },
        },
    }
}

/// The error of a handler that panicked; the panic's text goes to the log only.
fn panicked(panic: &(dyn std::any::Any + Send)) -> HandlerError {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    HandlerError::Internal(format!("handler panicked: {text}"))
}

/// Keeps one delivery alive: in-progress acks so JetStream does not redeliver, lease renewals
/// so no other agent starts the job, and a look at the record for a `cancel` that the
/// broadcast may have missed.
async fn keepalive(
    app: Arc<App>,
    message: Arc<jetstream::Message>,
    owner: Owner,
    held: Arc<Mutex<Vec<LockRequest>>>,
    job: RunningJob,
) {
    let ack_wait = app.config.agent.ack_wait.get();
    let ttl = app.locks.ttl();
    let tick = (ack_wait.min(ttl) / 3).max(Duration::from_millis(200));
    let mut last_renewed = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        if let Err(e) = message.ack_with(AckKind::Progress).await {
            tracing::debug!(error = %e, "In-progress ack failed");
        }
        let requests = held.lock().map(|h| h.clone()).unwrap_or_default();
        match app.locks.renew_all(&requests, &owner).await {
            Ok(()) => last_renewed = Instant::now(),
            Err(crate::locks::LockError::Lost(resource)) => {
                tracing::error!(%resource, "Lease lost; stopping the job");
                job.cancel(CancelReason::LeaseLost);
                return;
            }
            Err(e) => {
                // Unreachable store: the lease runs out on the store's side too. Stop before
                // another agent could take the job over.
                if last_renewed.elapsed() >= ttl {
                    tracing::error!(error = %e, "Lease not renewed within its ttl; stopping the job");
                    job.cancel(CancelReason::LeaseLost);
                    return;
                }
            }
        }
        if let Ok(Some((record, _))) = app.records.get(&owner.job_id).await
            && record.cancel_requested_by.is_some()
            && !job.token.is_cancelled()
        {
            job.cancel(CancelReason::User);
        }
    }
}

/// A job's own working directory, `<state_dir>/jobs/<job id>`: made empty for each attempt
/// and removed when the attempt ends, whatever ends it. What an attempt must hand on to the
/// next goes in a checkpoint, since the next attempt may run on another agent.
struct JobDir {
    path: std::path::PathBuf,
}

impl JobDir {
    fn create(state_dir: &std::path::Path, job_id: &str) -> std::io::Result<Self> {
        let path = jobs_dir(state_dir).join(job_id);
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "Job directory not removed");
        }
    }
}

/// Where the jobs' own directories live.
pub fn jobs_dir(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("jobs")
}

/// Removes what attempts of an earlier run of this agent left behind (it was killed): no job
/// runs yet when this is called.
pub fn remove_stale_job_dirs(state_dir: &std::path::Path) {
    let dir = jobs_dir(state_dir);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {
            tracing::info!(path = %dir.display(), "Removed job directories of an earlier run")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %dir.display(), error = %e, "Job directories of an earlier run not removed")
        }
    }
}

/// A progress line and when it was reported.
type ProgressLine = (String, chrono::DateTime<Utc>);

/// How many progress lines may wait for the writer before a report waits for it.
const PROGRESS_BACKLOG: usize = 256;
/// How long the end of a job waits for its last progress lines to be written.
const PROGRESS_FLUSH: Duration = Duration::from_secs(10);

/// Progress reports become job events, in order, and the newest the record's message. They
/// are written off the handler's path, a batch at a time: a handler reporting a line per check
/// waited, per line, for a record read, a record write and an event, which on a 3-server
/// cluster was most of a short job. Lines are as durable as before only once `flush`ed; a
/// checkpoint (what a resumed attempt relies on) is still written before `save_checkpoint`
/// returns.
struct RecordProgress {
    app: Arc<App>,
    job_id: String,
    /// Shared with the delivery's own record writes.
    known: KnownRecord,
    lines: Mutex<Option<tokio::sync::mpsc::Sender<ProgressLine>>>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl RecordProgress {
    fn start(app: Arc<App>, job_id: String, known: KnownRecord) -> Arc<Self> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(PROGRESS_BACKLOG);
        let writer = {
            let app = app.clone();
            let job_id = job_id.clone();
            let known = known.clone();
            tokio::spawn(
                async move {
                    let mut batch = Vec::new();
                    while rx.recv_many(&mut batch, PROGRESS_BACKLOG).await > 0 {
                        if let Err(e) = app.records.progress(&job_id, &known, &batch).await {
                            tracing::warn!(error = %e, lines = batch.len(), "Progress not recorded");
                        }
                        batch.clear();
                    }
                }
                .in_current_span(),
            )
        };
        Arc::new(Self {
            app,
            job_id,
            known,
            lines: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Writes what is still waiting (bounded), so the job's end comes after its progress.
    async fn flush(&self) {
        drop(self.lines.lock().ok().and_then(|mut l| l.take()));
        let writer = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(mut writer) = writer
            && tokio::time::timeout(PROGRESS_FLUSH, &mut writer)
                .await
                .is_err()
        {
            writer.abort();
            tracing::warn!("Last progress lines not recorded in time");
        }
    }
}

#[async_trait]
impl Progress for RecordProgress {
    async fn report(&self, message: &str) {
        let line = (self.app.secrets.redactor().redact(message), Utc::now());
        let lines = self.lines.lock().ok().and_then(|l| l.clone());
        match lines {
            Some(lines) => {
                if lines.send(line).await.is_err() {
                    tracing::debug!("Progress after the writer stopped; not recorded");
                }
            }
            // A task of the handler outliving it.
            None => tracing::debug!("Progress after the job ended; not recorded"),
        }
    }

    async fn save_checkpoint(&self, value: serde_json::Value) -> Result<(), String> {
        let value = redact_value(self.app.secrets.redactor(), value);
        self.app
            .records
            .transition_from(&self.job_id, &self.known, |r| {
                if r.state.is_terminal() {
                    Change::Keep
                } else {
                    r.checkpoint = value.clone();
                    Change::Write
                }
            })
            .await
            .map(|_| ())
            .map_err(|e| format!("checkpoint not saved: {e}"))
    }

    async fn set_commit(&self, sha: &str) {
        let result = self
            .app
            .records
            .transition_from(&self.job_id, &self.known, |r| {
                if r.commit.as_deref() == Some(sha) {
                    Change::Keep
                } else {
                    r.commit = Some(sha.to_string());
                    Change::Write
                }
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "Commit not recorded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infraflux_handlers::RetryPolicy;
    use serde_json::json;

    fn decide(
        result: Result<Outcome, HandlerError>,
        reason: Option<CancelReason>,
        attempts: u32,
    ) -> Ending {
        let policy = RetryPolicy::exponential(3, Duration::from_secs(2), Duration::from_secs(60));
        conclude(
            result,
            reason,
            attempts,
            policy,
            Duration::from_secs(90),
            "trace-1",
            &|t: &str| t.replace("hunter2", "[redacted]"),
        )
    }

    fn finished(state: JobState, message: &str, skipped: bool) -> Ending {
        Ending::Finish {
            state,
            message: message.into(),
            result: serde_json::Value::Null,
            skipped,
            internal: None,
        }
    }

    #[test]
    fn how_an_attempt_ends() {
        use CancelReason::*;
        let ok = || Ok(Outcome::succeeded("done"));
        let retryable = || Err(HandlerError::Retryable("busy with hunter2".into()));
        let failed = || Err(HandlerError::Failed("bad".into()));
        let cases: Vec<(&str, Ending, Ending)> = vec![
            (
                "success",
                decide(ok(), None, 1),
                finished(JobState::Succeeded, "done", false),
            ),
            (
                "a success that raced a shutdown still counts",
                decide(ok(), Some(Shutdown), 1),
                finished(JobState::Succeeded, "done", false),
            ),
            (
                "skipped is no failure, and marked",
                decide(
                    Ok(Outcome::Skipped {
                        message: "newer".into(),
                        result: json!(null),
                    }),
                    None,
                    1,
                ),
                finished(JobState::Succeeded, "newer", true),
            ),
            (
                "a failed outcome keeps its result",
                decide(
                    Ok(Outcome::Failed {
                        message: "media: hunter2".into(),
                        result: json!(null),
                    }),
                    None,
                    1,
                ),
                finished(JobState::Failed, "media: [redacted]", false),
            ),
            (
                "lease lost wins over anything",
                decide(ok(), Some(LeaseLost), 1),
                Ending::Abandon,
            ),
            (
                "stopping requeues an error",
                decide(failed(), Some(Shutdown), 1),
                Ending::Requeue,
            ),
            (
                "user cancel",
                decide(failed(), Some(User), 1),
                Ending::CancelledByUser,
            ),
            (
                "timeout",
                decide(failed(), Some(Timeout), 1),
                finished(JobState::Failed, "timed out after 1m 30s", false),
            ),
            (
                "retryable within the policy",
                decide(retryable(), None, 1),
                Ending::Retry {
                    delay: Duration::from_secs(2),
                    message: "attempt 1 failed: busy with [redacted]; retrying in 2s".into(),
                },
            ),
            (
                "retryable on the last attempt fails",
                decide(retryable(), None, 3),
                finished(JobState::Failed, "busy with [redacted]", false),
            ),
            (
                "a handler's own cancel",
                decide(Err(HandlerError::Cancelled), None, 1),
                finished(JobState::Cancelled, "cancelled", false),
            ),
            (
                "internal detail goes to the log only",
                decide(
                    Err(HandlerError::Internal("hunter2 at 10.0.0.5".into())),
                    None,
                    1,
                ),
                Ending::Finish {
                    state: JobState::Failed,
                    message: "internal error; see the agent's logs for trace trace-1".into(),
                    result: serde_json::Value::Null,
                    skipped: false,
                    internal: Some("[redacted] at 10.0.0.5".into()),
                },
            ),
        ];
        for (name, got, want) in cases {
            assert_eq!(got, want, "{name}");
        }
    }
}
