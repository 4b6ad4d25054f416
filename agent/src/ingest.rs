//! Turning a job envelope into a durable, deduplicated job, in four JetStream writes.
//!
//! The order of writes is what makes "202 means stored" and "nothing twice" hold together:
//!
//! 1. claim the idempotency key in the dedup bucket (`create`: exactly one claimant wins, and
//!    the claim names the job id for good);
//! 2. send the record, the `queued` event and the job back to back, then wait for JetStream's
//!    acks: once the job's ack is in, the job is durable, and only now is the caller told so.
//!
//! A later submission of the same key (a redelivery, the poller seeing the same commit) is a
//! duplicate of the claimed job id. Whether the first submission got its job stored is not
//! written down (that was a fifth write): the duplicate reads the job's record, and unless it
//! shows the job has started, publishes the job again under the same id. That is harmless:
//! `Nats-Msg-Id` is the job id, so JetStream stores it once within the jobs stream's duplicate
//! window, the record is created only if absent, and the runner runs a job id at most once
//! (its record is checked first), also if a message carrying it were stored twice outside the
//! window. So a submission whose job's acknowledgement never came (the caller got
//! "unavailable", a webhook 503, and GitHub redelivers), or whose agent died mid-way, is
//! completed by the next submission of its key, at once and with the same job id.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use infraflux_handlers::JobEnvelope;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::records::{JobRecord, JobState, Records};
use crate::store::{Store, kv_key};
use crate::telemetry;

/// How long a submission retries a claim that keeps vanishing under it (an operator purging
/// the dedup bucket) before answering "unavailable".
const CLAIM_PATIENCE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    Created { job_id: String },
    Duplicate { job_id: String },
}

impl Submitted {
    pub fn job_id(&self) -> &str {
        match self {
            Submitted::Created { job_id } | Submitted::Duplicate { job_id } => job_id,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("job store unavailable: {}", explain_store_error(.0))]
    Unavailable(String),
}

/// NATS reports a full store as "insufficient resources" deep in a nested error; the sender
/// (GitHub's delivery log, a chat reply) should read what it means and what to do.
fn explain_store_error(error: &str) -> String {
    const FULL: [&str; 4] = [
        "insufficient resources",
        "insufficient storage",
        "error code 10023",
        "error code 10047",
    ];
    if FULL.iter().any(|sign| error.contains(sign)) {
        format!(
            "JetStream storage is full: a server or account limit is reached (free space, or raise max_file_store or the account's limit); {error}"
        )
    } else {
        error.to_string()
    }
}

/// What the dedup bucket holds per idempotency key. Claims written by older agents also
/// carry a `status`, which is not read any more.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claim {
    job_id: String,
    at: DateTime<Utc>,
}

#[derive(Clone)]
pub struct Ingestor {
    store: Store,
    records: Records,
}

impl Ingestor {
    pub fn new(store: Store, records: Records) -> Self {
        Self { store, records }
    }

    /// Stores `envelope` as a job unless its idempotency key was seen; see the module docs.
    pub async fn submit(&self, mut envelope: JobEnvelope) -> Result<Submitted, IngestError> {
        self.ensure_connected()?;
        let key = kv_key(&envelope.idempotency_key);
        let dedup = &self.store.dedup;
        let deadline = tokio::time::Instant::now() + CLAIM_PATIENCE;
        let existing = loop {
            let claim = Claim {
                job_id: envelope.job_id.clone(),
                at: Utc::now(),
            };
            match dedup.create(&key, encode(&claim)).await {
                Ok(_) => return self.enqueue(envelope, false).await,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(IngestError::Unavailable(e.to_string())),
            }
            let entry = dedup
                .entry(&key)
                .await
                .map_err(|e| IngestError::Unavailable(e.to_string()))?;
            if let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) {
                break serde_json::from_slice::<Claim>(&entry.value)
                    .map_err(|_| IngestError::Unavailable(format!("unreadable claim {key}")))?;
            }
            // Withdrawn meanwhile: claim again, not in a tight loop.
            if tokio::time::Instant::now() >= deadline {
                return Err(IngestError::Unavailable(format!(
                    "the claim of {} keeps vanishing",
                    envelope.idempotency_key
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Our own claim: the create was stored but its answer lost (a leader election).
        if existing.job_id == envelope.job_id {
            return self.enqueue(envelope, false).await;
        }
        let job_id = existing.job_id;
        envelope.job_id = job_id.clone();
        match self.records.get(&job_id).await {
            // Started or ended: its job was stored.
            Ok(Some((record, _))) if record.state != JobState::Queued => {}
            // Maybe stored, maybe in flight: publish it again under its own id, JetStream
            // keeps one.
            Ok(Some(_)) => {
                self.enqueue(envelope, true).await?;
            }
            // Its submission stored nothing visible (it died, or was answered "unavailable"):
            // this one stores the job, under the claimed id.
            Ok(None) => return self.enqueue(envelope, false).await,
            Err(e) => return Err(IngestError::Unavailable(e.to_string())),
        }
        Ok(Submitted::Duplicate { job_id })
    }

    /// The job already stored (or being stored) under `idempotency_key`, if any: a request that
    /// must not be judged twice (an approval comment delivered again) asks this first.
    pub async fn submitted(&self, idempotency_key: &str) -> Result<Option<String>, IngestError> {
        self.ensure_connected()?;
        let entry = self
            .store
            .dedup
            .entry(kv_key(idempotency_key))
            .await
            .map_err(|e| IngestError::Unavailable(e.to_string()))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| serde_json::from_slice::<Claim>(&e.value).ok())
            .map(|claim| claim.job_id))
    }

    /// Fails fast while disconnected: a request to a dead server would take its whole timeout,
    /// and the sender is better served by an immediate "unavailable" it can retry.
    pub fn ensure_connected(&self) -> Result<(), IngestError> {
        if self.store.client.connection_state() == async_nats::connection::State::Connected {
            Ok(())
        } else {
            Err(IngestError::Unavailable("not connected to NATS".into()))
        }
    }

    /// Stores the record, the `queued` event (not for a `duplicate`: the first submission
    /// sent it) and the job.
    async fn enqueue(
        &self,
        mut envelope: JobEnvelope,
        duplicate: bool,
    ) -> Result<Submitted, IngestError> {
        // The queue hop is its own span, the producer side: the runner's job span becomes its
        // child, so a trace reads ingress → enqueue → job → handler steps.
        let span = tracing::info_span!("enqueue", kind = envelope.kind.as_str(), job_id = %envelope.job_id);
        if let Some(tp) = envelope.traceparent.as_deref() {
            telemetry::set_parent(&span, tp);
        }
        if let Some(tp) = telemetry::traceparent_of(&span) {
            envelope.traceparent = Some(tp);
        }
        self.publish(envelope, duplicate).instrument(span).await
    }

    async fn publish(
        &self,
        envelope: JobEnvelope,
        duplicate: bool,
    ) -> Result<Submitted, IngestError> {
        let job_id = envelope.job_id.clone();
        let trace_id = envelope
            .traceparent
            .as_deref()
            .and_then(telemetry::trace_id_of)
            .unwrap_or_default();
        let record = JobRecord::new(&envelope, &trace_id);
        // Record, `queued` event and job go out back to back and their acks are awaited
        // together: one round trip instead of three. The record is sent first, so it is
        // almost always stored before an agent sees the job (the runner writes it from the
        // envelope if not), and the `queued` event precedes any later event of the job in
        // the events stream.
        let record_ack = self.records.start_create(&record).await;
        // A duplicate may find the record written and the job running: no second `queued`.
        let event_ack = if duplicate {
            None
        } else {
            Some(self.records.start_event(&record).await)
        };
        let job_ack = self.start_publish_job(&envelope).await;
        let recorded = match record_ack {
            Ok(ack) => match ack.await {
                Ok(_) => Ok(true),
                // Already written: by the runner, or by a submission this one took over.
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        let queued = match job_ack {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let event_ack = match event_ack {
            Some(Ok(ack)) => Some(ack.await.map(|_| ()).map_err(|e| e.to_string())),
            Some(Err(e)) => Some(Err(e.to_string())),
            None => None,
        };
        if let Some(Err(e)) = &event_ack {
            tracing::warn!(%job_id, error = %e, "Job `queued` event not stored");
        }
        if let Err(e) = queued {
            // The job may be stored although its ack is missing: the claim stays, and the
            // sender's retry publishes the same job id again (see the module docs).
            return Err(IngestError::Unavailable(e));
        }
        match recorded {
            Ok(true) => {
                if event_ack.is_none() {
                    self.records.publish_event(&record).await;
                }
            }
            Ok(false) => {}
            // The job is durable; the runner writes its record from the envelope.
            Err(e) => tracing::warn!(%job_id, error = %e, "Job queued without its record"),
        }
        Ok(Submitted::Created { job_id })
    }

    /// Publishes `envelope`'s job again under its own id, for a record left `queued` (see
    /// `requeue`); JetStream keeps one copy within its duplicate window.
    pub async fn requeue(&self, envelope: &JobEnvelope) -> Result<(), IngestError> {
        self.ensure_connected()?;
        self.start_publish_job(envelope)
            .await?
            .await
            .map(|_| ())
            .map_err(|e| IngestError::Unavailable(e.to_string()))
    }

    async fn start_publish_job(
        &self,
        envelope: &JobEnvelope,
    ) -> Result<PublishAckFuture, IngestError> {
        let payload = serde_json::to_vec(envelope)
            .map_err(|e| IngestError::Unavailable(format!("cannot encode job: {e}")))?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", envelope.job_id.as_str());
        if let Some(tp) = &envelope.traceparent {
            headers.insert("traceparent", tp.as_str());
        }
        let subject = self.store.names.job_subject(envelope.kind);
        self.store
            .js
            .publish_with_headers(subject, headers, Bytes::from(payload))
            .await
            .map_err(|e| IngestError::Unavailable(e.to_string()))
    }
}

fn encode(claim: &Claim) -> Bytes {
    Bytes::from(serde_json::to_vec(claim).unwrap_or_default())
}
