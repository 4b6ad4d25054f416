//! Turning a job envelope into a durable, deduplicated job: three JetStream writes in one
//! round trip, then the `queued` event.
//!
//! A submission sends, back to back, the claim of its idempotency key in the dedup bucket
//! (`create`: exactly one claimant wins, and the claim names the job id for good), the job's
//! record and the job itself, then waits for the three acknowledgements. The caller is told
//! "stored" only when both the claim and the job are acknowledged. The `queued` event follows,
//! not awaited: it is published only for a job whose claim is its own (a subscriber never
//! hears of a job that does not exist), and stored only if the job has no event yet, so the
//! audit trail never has it after the runner's first event. Subscribers hear it first too: on
//! the agent that ingested the job, the runner's first event waits until the store answered
//! `queued` (`Records::announcing`); on another agent the runner's few round trips (lease,
//! record, locks) before it make it come later in practice. If the agent died before sending
//! it, the trail starts at the runner's first event (the record is complete).
//!
//! The claim goes with the job only where a sender waits (webhooks, ChatOps) and only while
//! every live agent checks claims (an older agent would run a losing job); otherwise the
//! claim is written first and a loser stores nothing (see `Ingestor::claims_with_job`).
//!
//! Sending the job before knowing the claim's fate means a submission that loses the claim
//! (a redelivery, the poller seeing a pushed commit, two deliveries racing) has stored a job
//! nobody may run. One rule keeps "nothing twice": **a job runs only if its key's claim names
//! it.** The runner reads the claim beside the record before a job's first start (one more
//! read, in parallel; none for a job this agent's ingest stored and hands it, see
//! `Records::take_fresh`) and drops a job whose claim names another; a key nobody claimed (the
//! claim's write failed, the dedup entry expired) it claims itself. The losing submission also
//! takes back its record and job message and answers as a duplicate of the winner.
//!
//! A later submission of the same key is a duplicate of the claimed job id. Whether the first
//! submission got its job stored is not written down: the duplicate reads the job's record,
//! and unless it shows the job has started, publishes the job again under the same id. That
//! is harmless: `Nats-Msg-Id` is the job id, so JetStream stores it once within the jobs
//! stream's duplicate window, the record is created only if absent, and the runner runs a job
//! id at most once (its record is checked first), also if a message carrying it were stored
//! twice outside the window. So a submission whose job's acknowledgement never came (the
//! caller got "unavailable", a webhook 503, and GitHub redelivers), or whose agent died
//! mid-way, is completed by the next submission of its key, at once and with the same job id.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::kv;
use async_nats::jetstream::publish::PublishAck;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use infraflux_handlers::{JobEnvelope, Source};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::records::{JobRecord, JobState, Records};
use crate::status::StatusCache;
use crate::store::{Store, kv_key, start_kv_create};
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

/// How a claim sent with its job fared.
#[derive(Debug)]
enum Claimed {
    Stored,
    /// The key was claimed before (or deleted since).
    Taken,
    Failed(String),
}

/// What one round trip of `send` stored, as JetStream answered.
struct Sent {
    envelope: JobEnvelope,
    record: JobRecord,
    claim: Option<Claimed>,
    /// The new record's revision; `Ok(None)`: a record existed under the job id.
    recorded: Result<Option<u64>, String>,
    job: Result<PublishAck, String>,
    /// Held from before the job was sent until its `queued` event is answered (or will not be
    /// sent).
    announcement: Option<crate::records::Announcement>,
}

/// What the dedup bucket holds per idempotency key. Claims written by older agents also
/// carry a `status`, which is not read any more.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Claim {
    job_id: String,
    at: DateTime<Utc>,
}

/// Whose an idempotency key is, as the dedup bucket says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimant {
    Job {
        job_id: String,
        at: DateTime<Utc>,
    },
    /// Not valid JSON of a claim: written by something else. Ingest refuses the key's new
    /// submissions until the entry is deleted.
    Unreadable,
    Nobody,
}

#[derive(Clone)]
pub struct Ingestor {
    /// The store seen through ingest's own connection (`Store::through`): its reads, writes
    /// and answers do not queue behind the store traffic of running jobs in one socket and
    /// one client task.
    store: Store,
    /// `records`, read and written through that connection.
    records: Records,
    /// Which agents are alive and what they can do.
    fleet: StatusCache,
}

impl Ingestor {
    pub fn new(store: Store, records: &Records, fleet: StatusCache) -> Self {
        Self {
            records: records.through(&store),
            store,
            fleet,
        }
    }

    /// Stores `envelope` as a job unless its idempotency key was seen; see the module docs.
    pub async fn submit(&self, envelope: JobEnvelope) -> Result<Submitted, IngestError> {
        self.ensure_connected()?;
        let key = kv_key(&envelope.idempotency_key);
        let ingress_traceparent = envelope.traceparent.clone();
        let (claimant, envelope) = if self.claims_with_job(&envelope) {
            let sent = self.enqueue(envelope, Some(&key)).await?;
            match &sent.claim {
                Some(Claimed::Stored) => return self.conclude(sent).await,
                // The job may be stored without its claim: the runner claims it then, and the
                // sender's retry is a duplicate of it (or wins the claim, and this job is
                // dropped).
                Some(Claimed::Failed(e)) => return Err(IngestError::Unavailable(e.clone())),
                Some(Claimed::Taken) | None => {}
            }
            // Claimed before (or deleted since, which `claim` tells apart).
            let claimant = self.claim(&key, &sent.envelope.job_id).await?;
            // Our own claim: a deleted key claimed now, or a create stored whose answer was
            // lost (a leader election).
            if claimant == sent.envelope.job_id {
                return self.conclude(sent).await;
            }
            self.withdraw(&sent).await;
            (claimant, sent.envelope)
        } else {
            let claimant = self.claim(&key, &envelope.job_id).await?;
            if claimant == envelope.job_id {
                let sent = self.enqueue(envelope, None).await?;
                return self.conclude(sent).await;
            }
            (claimant, envelope)
        };
        let mut envelope = envelope;
        envelope.job_id = claimant.clone();
        envelope.traceparent = ingress_traceparent;
        match self.records.get(&claimant).await {
            // Started or ended: its job was stored.
            Ok(Some((record, _))) if record.state != JobState::Queued => {}
            // Maybe stored, maybe in flight: publish it again under its own id, JetStream
            // keeps one.
            Ok(Some(_)) => {
                let sent = self.enqueue(envelope, None).await?;
                self.conclude(sent).await?;
            }
            // Its submission stored nothing visible (it died, or was answered "unavailable"):
            // this one stores the job, under the claimed id, and answers "created" (nobody
            // was told of the job before).
            Ok(None) => {
                let sent = self.enqueue(envelope, None).await?;
                return self.conclude(sent).await;
            }
            Err(e) => return Err(IngestError::Unavailable(e.to_string())),
        }
        Ok(Submitted::Duplicate { job_id: claimant })
    }

    /// Whether the claim goes out with the job (one round trip) or first (two): together where
    /// a sender waits for the answer and a key's second submission is rare (a redelivery),
    /// and only while every live agent checks claims before running a job. Schedules (every
    /// agent submits each fire), the poller (it mostly sees commits a webhook brought) and
    /// follow-ups claim first, so their routine losers store nothing.
    fn claims_with_job(&self, envelope: &JobEnvelope) -> bool {
        matches!(
            envelope.source,
            Source::Webhook | Source::NatsGithub | Source::Chatops
        ) && self.fleet.every_agent_checks_claims()
    }

    /// Who holds the claim of `idempotency_key`, for the runner's check before a first start.
    pub async fn claimant(&self, idempotency_key: &str) -> Result<Claimant, IngestError> {
        self.ensure_connected()?;
        let entry = self
            .store
            .dedup
            .entry(kv_key(idempotency_key))
            .await
            .map_err(|e| IngestError::Unavailable(e.to_string()))?;
        Ok(match entry.filter(|e| e.operation == kv::Operation::Put) {
            None => Claimant::Nobody,
            Some(entry) => match serde_json::from_slice::<Claim>(&entry.value) {
                Ok(claim) => Claimant::Job {
                    job_id: claim.job_id,
                    at: claim.at,
                },
                Err(_) => Claimant::Unreadable,
            },
        })
    }

    /// The job id `key`'s claim names: `job_id` when the key was never claimed (or its claim
    /// was deleted or expired) and this call claims it, else the existing claim's.
    pub async fn claim(&self, key: &str, job_id: &str) -> Result<String, IngestError> {
        let dedup = &self.store.dedup;
        let deadline = tokio::time::Instant::now() + CLAIM_PATIENCE;
        loop {
            let claim = Claim {
                job_id: job_id.to_string(),
                at: Utc::now(),
            };
            match dedup.create(key, encode(&claim)).await {
                Ok(_) => return Ok(job_id.to_string()),
                // Claimed already: read whose it is.
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(IngestError::Unavailable(e.to_string())),
            }
            let entry = dedup
                .entry(key)
                .await
                .map_err(|e| IngestError::Unavailable(e.to_string()))?;
            if let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) {
                return serde_json::from_slice::<Claim>(&entry.value)
                    .map(|claim| claim.job_id)
                    .map_err(|_| IngestError::Unavailable(format!("unreadable claim {key}")));
            }
            // Claimed and withdrawn again (an operator purging the bucket): not in a tight loop.
            if tokio::time::Instant::now() >= deadline {
                return Err(IngestError::Unavailable(format!(
                    "the claim of {key} keeps vanishing"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The job already stored (or being stored) under `idempotency_key`, if any: a request that
    /// must not be judged twice (an approval comment delivered again) asks this first.
    pub async fn submitted(&self, idempotency_key: &str) -> Result<Option<String>, IngestError> {
        Ok(match self.claimant(idempotency_key).await? {
            Claimant::Job { job_id, .. } => Some(job_id),
            Claimant::Unreadable | Claimant::Nobody => None,
        })
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

    /// Sends the claim of `claim_key` (if given), the record and the job, and waits for the
    /// answers.
    async fn enqueue(
        &self,
        mut envelope: JobEnvelope,
        claim_key: Option<&str>,
    ) -> Result<Sent, IngestError> {
        // The queue hop is its own span, the producer side: the runner's job span becomes its
        // child, so a trace reads ingress → enqueue → job → handler steps.
        let span = tracing::info_span!("enqueue", kind = envelope.kind.as_str(), job_id = %envelope.job_id);
        if let Some(tp) = envelope.traceparent.as_deref() {
            telemetry::set_parent(&span, tp);
        }
        if let Some(tp) = telemetry::traceparent_of(&span) {
            envelope.traceparent = Some(tp);
        }
        self.send(envelope, claim_key).instrument(span).await
    }

    async fn send(
        &self,
        envelope: JobEnvelope,
        claim_key: Option<&str>,
    ) -> Result<Sent, IngestError> {
        let trace_id = envelope
            .traceparent
            .as_deref()
            .and_then(telemetry::trace_id_of)
            .unwrap_or_default();
        let record = JobRecord::new(&envelope, &trace_id);
        let announcement = self.records.announcing(&envelope.job_id);
        // All go out back to back and their acks are awaited together: one round trip. The
        // claim goes first, the record before the job, so both are almost always stored
        // before an agent sees the job (the runner claims, or writes the record from the
        // envelope, if not). The `queued` event waits for the claim (see `conclude`).
        let claim_ack = match claim_key {
            Some(key) => {
                let claim = Claim {
                    job_id: envelope.job_id.clone(),
                    at: Utc::now(),
                };
                let dedup = &self.store.dedup;
                Some(start_kv_create(&self.store.js, dedup, key, encode(&claim)).await)
            }
            None => None,
        };
        let record_ack = self.records.start_create(&record).await;
        let job_ack = self.start_publish_job(&envelope).await;

        let claim = match claim_ack {
            Some(Ok(ack)) => Some(match ack.await {
                Ok(_) => Claimed::Stored,
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Claimed::Taken,
                Err(e) => Claimed::Failed(e.to_string()),
            }),
            Some(Err(e)) => Some(Claimed::Failed(e.to_string())),
            None => None,
        };
        let recorded = match record_ack {
            Ok(ack) => match ack.await {
                Ok(ack) => Ok(Some(ack.sequence)),
                // Already written: by the runner, or by a submission this one took over.
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        let job = match job_ack {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        Ok(Sent {
            envelope,
            record,
            claim,
            recorded,
            job,
            announcement: Some(announcement),
        })
    }

    /// The answer for what `send` stored under a job id that is the job's to run; its
    /// `queued` event is sent now, not awaited (see the module docs).
    async fn conclude(&self, mut sent: Sent) -> Result<Submitted, IngestError> {
        let job_id = &sent.envelope.job_id;
        if let Err(e) = &sent.job {
            // The job may be stored although its ack is missing: the claim stays, and the
            // sender's retry publishes the same job id again (see the module docs).
            return Err(IngestError::Unavailable(e.clone()));
        }
        match &sent.recorded {
            Ok(created) => {
                // Every caller's job is its key's claimant: the runner may start it as is.
                if let Some(revision) = created {
                    self.records.note_fresh(&sent.record, *revision);
                }
                self.records
                    .announce(&sent.record, sent.announcement.take())
                    .await
            }
            // The job is durable; the runner writes its record from the envelope.
            Err(e) => tracing::warn!(%job_id, error = %e, "Job queued without its record"),
        }
        Ok(Submitted::Created {
            job_id: job_id.clone(),
        })
    }

    /// Takes back what a submission that lost its key's claim stored under its own job id,
    /// which nobody was told. Best effort: what is left, the runner drops (the claim names
    /// another job). Only a record this submission wrote is removed, and the job message only
    /// after it: a record left behind would be queued again by the stranded-job sweep, so its
    /// message is left for the runner, which drops both.
    async fn withdraw(&self, sent: &Sent) {
        let job_id = &sent.envelope.job_id;
        if !matches!(sent.recorded, Ok(Some(_))) {
            return;
        }
        if let Err(e) = self.records.forget(job_id).await {
            tracing::warn!(%job_id, error = %e, "Record of a job that lost its claim not removed; the runner drops the job");
            return;
        }
        if let Ok(ack) = &sent.job
            && !ack.duplicate
            && let Err(e) = self.store.jobs.delete_message(ack.sequence).await
        {
            tracing::warn!(%job_id, error = %e, "Job that lost its claim not removed; the runner drops it");
        }
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
