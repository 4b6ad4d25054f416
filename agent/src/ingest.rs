//! Turning a job envelope into a durable, deduplicated job.
//!
//! The order of writes is what makes "202 means stored" and "nothing twice" hold together:
//!
//! 1. claim the idempotency key in the dedup bucket (`create`: exactly one claimant wins);
//! 2. write the record and publish the `queued` event;
//! 3. publish the job to the work-queue stream and wait for JetStream's ack: from here on the
//!    job is durable, and only now is the caller told so;
//! 4. mark the claim `enqueued`.
//!
//! If step 2 or 3 fails the claim and record are withdrawn and the caller gets "unavailable" (a
//! webhook answers 503, so GitHub can redeliver). If the agent dies before 4, the claim stays `pending`;
//! a later submission of the same key takes it over after [`STALE_CLAIM`] and republishes with
//! the same job id, and the runner runs a job id at most once (its record is checked first).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use infraflux_handlers::JobEnvelope;
use serde::{Deserialize, Serialize};

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
                Ok(revision) => return self.enqueue(envelope, &key, revision).await,
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
            if age >= STALE_CLAIM {
                // Take over with the same job id, so a job that did reach the queue is not
                // queued under a second id.
                envelope.job_id = existing.job_id.clone();
                let claim = Claim {
                    job_id: existing.job_id,
                    status: ClaimStatus::Pending,
                    at: Utc::now(),
                };
                match dedup.update(&key, encode(&claim), entry.revision).await {
                    Ok(revision) => return self.enqueue(envelope, &key, revision).await,
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
        envelope: JobEnvelope,
        key: &str,
        revision: u64,
    ) -> Result<Submitted, IngestError> {
        let job_id = envelope.job_id.clone();
        let trace_id = envelope
            .traceparent
            .as_deref()
            .and_then(telemetry::trace_id_of)
            .unwrap_or_default();
        // The record and its `queued` event come first, so that no agent can report the job
        // running before it is known as queued.
        let record = JobRecord::new(&envelope, &trace_id);
        let created = match self.records.create(&record).await {
            Ok(created) => created,
            Err(e) => {
                self.withdraw(key, revision).await;
                return Err(IngestError::Unavailable(e.to_string()));
            }
        };
        if created {
            self.records.publish_event(&record).await;
        }
        if let Err(e) = self.publish_job(&envelope).await {
            self.withdraw(key, revision).await;
            if created {
                let _ = self.store.records.delete(&job_id).await;
            }
            return Err(e);
        }
        let claim = Claim {
            job_id: job_id.clone(),
            status: ClaimStatus::Enqueued,
            at: Utc::now(),
        };
        if let Err(e) = self.store.dedup.update(key, encode(&claim), revision).await {
            tracing::warn!(%job_id, error = %e, "Job queued but its claim stayed pending");
        }
        Ok(Submitted::Created { job_id })
    }

    /// Withdraws a claim so a retry can succeed; if even that fails, the claim goes stale and
    /// the next submission of the key takes it over.
    async fn withdraw(&self, key: &str, revision: u64) {
        let _ = self
            .store
            .dedup
            .delete_expect_revision(key, Some(revision))
            .await;
    }

    async fn publish_job(&self, envelope: &JobEnvelope) -> Result<(), IngestError> {
        let payload = serde_json::to_vec(envelope)
            .map_err(|e| IngestError::Unavailable(format!("cannot encode job: {e}")))?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", envelope.job_id.as_str());
        if let Some(tp) = &envelope.traceparent {
            headers.insert("traceparent", tp.as_str());
        }
        let subject = self.store.names.job_subject(envelope.kind);
        let ack = self
            .store
            .js
            .publish_with_headers(subject, headers, Bytes::from(payload))
            .await
            .map_err(|e| IngestError::Unavailable(e.to_string()))?;
        ack.await
            .map_err(|e| IngestError::Unavailable(e.to_string()))?;
        Ok(())
    }

    /// Remembers that a GitHub delivery produced `job_id`, for the "same delivery again" answer.
    pub async fn remember_delivery(&self, delivery: &str, job_id: &str) {
        let key = kv_key(&format!("gh-delivery.{delivery}"));
        if let Err(e) = self
            .store
            .dedup
            .put(&key, Bytes::from(job_id.to_string()))
            .await
        {
            tracing::warn!(%delivery, error = %e, "Delivery id not remembered; its job dedups by content");
        }
    }

    /// The job a GitHub delivery produced before, if any.
    pub async fn delivery_job(&self, delivery: &str) -> Result<Option<String>, IngestError> {
        let key = kv_key(&format!("gh-delivery.{delivery}"));
        self.store
            .dedup
            .get(&key)
            .await
            .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
            .map_err(|e| IngestError::Unavailable(e.to_string()))
    }
}

fn encode(claim: &Claim) -> Bytes {
    Bytes::from(serde_json::to_vec(claim).unwrap_or_default())
}
