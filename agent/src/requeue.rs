//! Jobs left `queued` with nothing to run them, queued again.
//!
//! Ingest writes a job's record just before its queue message. When the message's
//! acknowledgement does not come (a stream leader election, NATS going away) the sender is
//! told "unavailable" and the message may or may not be stored; when the agent dies between
//! the two writes, there is no message at all. Either way the record says `queued`, and until
//! the sender tries again nothing would ever run it. So every agent looks, shortly after it
//! starts and then every `agent.requeue_after`, for records still `queued` that long after
//! their creation, and publishes their job again under its own id (`Nats-Msg-Id`): JetStream
//! keeps one copy within its duplicate window, and the runner runs a job id at most once (its
//! record is read first), so a job that was only slow to be picked up is not run twice.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use infraflux_handlers::JobEnvelope;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::records::{JobRecord, RecordError};

/// Looks now and then for stranded jobs until `stop`.
pub async fn run(app: Arc<App>, stop: CancellationToken) {
    let every = app.config.agent.requeue_after.get();
    // The first look soon after start, where an agent that died mid-ingest left its jobs;
    // agents started together look at different moments.
    let mut wait = every / 4 + jitter(every / 4);
    // Records before this key had all ended at the last look: they are not read again. (A job
    // id made on an agent whose clock runs `requeue_after` behind could sort before it; clocks
    // are assumed NTP-synchronized, as for leases.)
    let mut from: Option<String> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        // A sweep reads every record a new agent has not yet seen end: on SIGTERM it stops
        // where it is (publishing again is idempotent, the next agent's sweep starts over).
        let swept = tokio::select! {
            () = stop.cancelled() => return,
            swept = sweep(&app, &mut from) => swept,
        };
        match swept {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                jobs = n,
                "Queued again jobs left queued without a queue message"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "Looking for stranded jobs failed; trying again later")
            }
        }
        wait = every + jitter(every / 4);
    }
}

fn jitter(up_to: Duration) -> Duration {
    let millis = u64::try_from(up_to.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(rand::random_range(0..=millis))
}

/// Publishes again every job whose record is still `queued` `agent.requeue_after` after it
/// was created, reading records from `from` on (and moving it on); returns how many.
pub async fn sweep(app: &App, from: &mut Option<String>) -> Result<usize, RecordError> {
    let age = chrono::Duration::from_std(app.config.agent.requeue_after.get())
        .unwrap_or(chrono::Duration::MAX);
    let (stranded, next) = app
        .records
        .stranded(Utc::now() - age, from.as_deref())
        .await?;
    *from = next;
    let mut queued = 0;
    for record in stranded {
        let envelope = envelope_of(&record);
        match app.ingest.requeue(&envelope).await {
            Ok(()) => {
                tracing::info!(job_id = %record.job_id, kind = record.kind.as_str(), "Stranded job queued again");
                queued += 1;
            }
            Err(e) => {
                return Err(RecordError::Unavailable(e.to_string()));
            }
        }
    }
    Ok(queued)
}

/// The envelope a record was made from (its trace continues under the record's trace id).
pub fn envelope_of(record: &JobRecord) -> JobEnvelope {
    let traceparent = (record.trace_id.len() == 32
        && record.trace_id.chars().all(|c| c.is_ascii_hexdigit()))
    .then(|| {
        format!(
            "00-{}-{:016x}-01",
            record.trace_id,
            rand::random::<u64>().max(1)
        )
    });
    JobEnvelope {
        job_id: record.job_id.clone(),
        kind: record.kind,
        params: record.params.clone(),
        source: record.source,
        requested_by: record.requested_by.clone(),
        idempotency_key: record.idempotency_key.clone(),
        traceparent,
        commit: record.commit.clone(),
        created_at: record.created_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infraflux_handlers::{JobKind, Source};

    #[test]
    fn the_envelope_is_the_records_own() {
        let original = JobEnvelope {
            job_id: "01m8rymzbxr659nxtzk53wcb17".into(),
            kind: JobKind::RECONCILE,
            params: serde_json::from_str(r#"{"ref": "main"}"#).expect("params"),
            source: Source::Webhook,
            requested_by: "octocat".into(),
            idempotency_key: "reconcile.o/r.abc".into(),
            traceparent: None,
            commit: Some("abc".into()),
            created_at: Utc::now(),
        };
        let record = JobRecord::new(&original, "b8aeb8ba745484b35b2312d96b337691");
        let again = envelope_of(&record);
        assert_eq!(
            JobEnvelope {
                traceparent: None,
                ..again.clone()
            },
            original
        );
        let traceparent = again.traceparent.expect("traceparent");
        assert!(
            traceparent.starts_with("00-b8aeb8ba745484b35b2312d96b337691-")
                && traceparent.ends_with("-01"),
            "{traceparent}"
        );
        assert_eq!(
            envelope_of(&JobRecord::new(&original, "")).traceparent,
            None
        );
    }
}
