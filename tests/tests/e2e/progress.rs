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
