//! Progress lines: written off the handler's path, a batch at a time, yet every line is a job
//! event, in order, and all of them come before the job's end.

use std::time::Duration;

use infraflux_handlers::JobKind;
use infraflux_tests::handlers::{Behaviour, RunLog, TestHandler};
use infraflux_tests::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_progress_line_is_an_event_in_order_before_the_jobs_end() {
    init();
    let nats = Nats::start();
    // More lines than the writer's backlog, so the handler also waits on it once.
    const LINES: usize = 300;
    let a = start_agent(
        &nats,
        "progress-a",
        "[acceptance]\n",
        TestHandler::new(
            JobKind::ACCEPTANCE,
            Behaviour::Reports(LINES),
            RunLog::default(),
        )
        .install(),
    )
    .await;
    let client = nats.client().await;
    let job_id = submit(&client, "acceptance").await;
    let done = wait_settled(&client, &job_id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["message"], format!("reported {LINES} steps"), "{done}");

    let events: Vec<Value> = stored_events(&client)
        .await
        .into_iter()
        .filter(|e| e["job_id"] == job_id.as_str())
        .collect();
    let lines: Vec<&str> = events
        .iter()
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.starts_with("step "))
        .collect();
    let expected: Vec<String> = (1..=LINES)
        .map(|i| format!("step {i} of {LINES}"))
        .collect();
    assert_eq!(lines, expected, "every line, once, in order");
    assert!(
        events
            .iter()
            .filter(|e| e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("step ")))
            .all(|e| e["state"] == "running"),
        "a line is an event of the running job"
    );
    let last = events.last().expect("events");
    assert_eq!(last["state"], "succeeded", "the end comes last: {last}");
    let at = |e: &Value| {
        chrono::DateTime::parse_from_rfc3339(e["at"].as_str().expect("at")).expect("rfc3339")
    };
    assert!(
        events.windows(2).all(|w| at(&w[0]) <= at(&w[1])),
        "events' times never go back"
    );
    a.stop().await;
}

/// A job's runner writes its record from the copy it last read or wrote, without reading it
/// first. A copy another writer has changed since is never written: the write is refused and
/// made again on what the store holds, so the other writer's change (a cancel request) stays.
/// A "keep" is judged on the store's record, not on the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_write_from_a_stale_copy_keeps_the_other_writers_change() {
    use infraflux_agent::records::{Change, JobRecord, JobState, KnownRecord};
    use infraflux_handlers::{JobEnvelope, Source};

    init();
    let nats = Nats::start();
    // Creates the buckets; it runs nothing, as no job message is queued.
    let _agent = start_agent(&nats, "known-a", "", |_| {}).await;
    let client = nats.client().await;
    let records = crate::ui::records(&client).await;
    let job_id = ulid::Ulid::new().to_string().to_ascii_lowercase();
    let envelope = JobEnvelope {
        job_id: job_id.clone(),
        kind: JobKind::ACCEPTANCE,
        params: Default::default(),
        source: Source::Chatops,
        requested_by: "test".into(),
        idempotency_key: format!("known-{job_id}"),
        traceparent: None,
        commit: None,
        created_at: chrono::Utc::now(),
    };
    assert!(
        records
            .create(&JobRecord::new(&envelope, ""))
            .await
            .expect("create")
    );
    let stored = || async {
        records
            .get(&job_id)
            .await
            .expect("get")
            .expect("the record")
            .0
    };
    let known = KnownRecord::default();
    known.remember(records.get(&job_id).await.expect("get"));

    // Someone else asks to cancel the job after the runner read its record.
    records
        .transition(&job_id, |r| {
            r.cancel_requested_by = Some("ada".into());
            Change::Write
        })
        .await
        .expect("cancel request");
    let written = records
        .transition_from(&job_id, &known, |r| {
            r.message = "from the runner".into();
            Change::Write
        })
        .await
        .expect("the runner's write");
    assert_eq!(written.cancel_requested_by.as_deref(), Some("ada"));
    let now = stored().await;
    assert_eq!(now.cancel_requested_by.as_deref(), Some("ada"), "{now:?}");
    assert_eq!(now.message, "from the runner");

    // The copy says the job ended; the store, changed since, says it did not.
    records
        .transition_from(&job_id, &known, |r| {
            r.state = JobState::Cancelled;
            Change::Write
        })
        .await
        .expect("the runner's end");
    records
        .transition(&job_id, |r| {
            r.state = JobState::Queued;
            Change::Write
        })
        .await
        .expect("another writer");
    let after = records
        .transition_from(&job_id, &known, |r| {
            if r.state.is_terminal() {
                Change::Keep
            } else {
                r.message = "written: the store's record had not ended".into();
                Change::Write
            }
        })
        .await
        .expect("the runner's write");
    assert_eq!(after.state, JobState::Queued, "{after:?}");
    assert_eq!(
        stored().await.message,
        "written: the store's record had not ended"
    );
}
