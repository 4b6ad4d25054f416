//! Turning a job envelope into a durable, deduplicated job.
//!
//! The order of writes is what makes "202 means stored" and "nothing twice" hold together:
//!
//! 1. claim the idempotency key in the dedup bucket (`create`: exactly one claimant wins);
//! 2. send the record, the `queued` event and the job back to back, then wait for JetStream's
//!    acks: once the job's ack is in, the job is durable, and only now is the caller told so;
//! 3. mark the claim `enqueued`, in the background.
//!
//! If the job's acknowledgement does not come, the job may be stored all the same (the ack was
//! lost, or came after the timeout): the caller gets "unavailable" (a webhook answers 503, so
//! GitHub can redeliver), and the claim is marked `unconfirmed` with the job id. The sender's
//! retry takes it over at once and publishes again with the same job id as `Nats-Msg-Id`, so
//! JetStream stores it once, and the sender is told that same id. If the agent dies before 3,
//! the claim stays `pending`; a later submission of the same key takes it over after
//! [`STALE_CLAIM`], the same way. The runner runs a job id at most once (its record is checked
//! first), also if a message carrying it were stored twice outside the duplicate window.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use infraflux_handlers::JobEnvelope;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::records::{JobRecord, Records};
use crate::store::{Store, kv_key};
use crate::telemetry;

/// A pending claim older than this belongs to a submission that died.
pub const STALE_CLAIM: Duration = Duration::from_secs(30);
/// How long a submission waits for a concurrent one with the same key to finish.
const CONCURRENT_WAIT: Duration = Duration::from_secs(5);

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
    #[error("job store unavailable: {0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ClaimStatus {
    Pending,
    Enqueued,
    /// Published, but JetStream's acknowledgement never came: stored or not, nobody knows.
    Unconfirmed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claim {
    job_id: String,
    status: ClaimStatus,
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
        let deadline = tokio::time::Instant::now() + CONCURRENT_WAIT;
        loop {
            let claim = Claim {
                job_id: envelope.job_id.clone(),
                status: ClaimStatus::Pending,
                at: Utc::now(),
            };
            match dedup.create(&key, encode(&claim)).await {
                Ok(revision) => return self.enqueue(envelope, &key, revision, false).await,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(IngestError::Unavailable(e.to_string())),
            }
            let entry = dedup
                .entry(&key)
                .await
                .map_err(|e| IngestError::Unavailable(e.to_string()))?;
            let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                continue; // withdrawn meanwhile: try to claim again
            };
            let Ok(existing) = serde_json::from_slice::<Claim>(&entry.value) else {
                return Err(IngestError::Unavailable(format!("unreadable claim {key}")));
            };
            if existing.status == ClaimStatus::Enqueued {
                return Ok(Submitted::Duplicate {
                    job_id: existing.job_id,
                });
            }
            let age = (Utc::now() - existing.at).to_std().unwrap_or_default();
            if existing.status == ClaimStatus::Unconfirmed || age >= STALE_CLAIM {
                // Take over with the same job id, so a job that did reach the queue is not
                // queued under a second id.
                envelope.job_id = existing.job_id.clone();
                let claim = Claim {
                    job_id: existing.job_id,
                    status: ClaimStatus::Pending,
                    at: Utc::now(),
                };
                match dedup.update(&key, encode(&claim), entry.revision).await {
                    Ok(revision) => return self.enqueue(envelope, &key, revision, true).await,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                    Err(e) => return Err(IngestError::Unavailable(e.to_string())),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(IngestError::Unavailable(format!(
                    "another submission of {} is in progress",
                    envelope.idempotency_key
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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

    async fn enqueue(
        &self,
        mut envelope: JobEnvelope,
        key: &str,
        revision: u64,
        takeover: bool,
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
        self.publish(envelope, key, revision, takeover)
            .instrument(span)
            .await
    }

    async fn publish(
        &self,
        envelope: JobEnvelope,
        key: &str,
        revision: u64,
        takeover: bool,
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
        // A takeover may find the record written and the job running: no second `queued`.
        let event_ack = if takeover {
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
            // The job may be stored although its ack is missing, and a runner may already hold
            // its record: keep both, and let a retry publish the same job id again.
            self.mark_unconfirmed(key, revision, &job_id).await;
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
        // Marking the claim is off the critical path: a claim left `pending` makes a later
        // duplicate wait and then take over with this same job id, which runs at most once.
        let dedup = self.store.dedup.clone();
        let key = key.to_string();
        let claim = Claim {
            job_id: job_id.clone(),
            status: ClaimStatus::Enqueued,
            at: Utc::now(),
        };
        tokio::spawn(async move {
            if let Err(e) = dedup.update(&key, encode(&claim), revision).await {
                tracing::warn!(job_id = %claim.job_id, error = %e, "Job queued but its claim stayed pending");
            }
        });
        Ok(Submitted::Created { job_id })
    }

    /// Marks a claim whose job may or may not be stored, so the next submission of the key
    /// takes it over at once with the same job id; if even that fails, the claim goes stale and
    /// is taken over later, also with the same job id.
    async fn mark_unconfirmed(&self, key: &str, revision: u64, job_id: &str) {
        let claim = Claim {
            job_id: job_id.to_string(),
            status: ClaimStatus::Unconfirmed,
            at: Utc::now(),
        };
        if let Err(e) = self.store.dedup.update(key, encode(&claim), revision).await {
            tracing::warn!(%job_id, error = %e, "Unconfirmed job's claim not marked; a retry waits for it to go stale");
        }
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
