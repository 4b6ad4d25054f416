//! SIGTERM semantics: running jobs get until the deadline; unfinished ones are left for
//! redelivery, and the next agent is told of the interruption.

use std::time::Duration;

use infraflux_handlers::JobKind;
use infraflux_tests::handlers::{Behaviour, RunLog, TestHandler};
use infraflux_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_outlives_the_shutdown_deadline_is_redelivered_and_finishes_elsewhere() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let l = log.clone();
    let a = start_agent(
        &nats,
        "stop-a",
        "[acceptance]\n",
        TestHandler::new(
            JobKind::ACCEPTANCE,
            Behaviour::Sleep(Duration::from_secs(60)),
            l,
        )
        .install(),
    )
    .await;
    let client = nats.client().await;
    let job_id = submit(&client, "acceptance").await;
    wait_state(&client, &job_id, "running").await;
    // shutdown_timeout is 2s in test configs: the 60 s job cannot finish.
    a.stop().await;
    let left = record(&client, &job_id).await;
    assert_eq!(
        left["state"], "running",
        "left for redelivery, not failed: {left}"
    );
    assert!(
        left["message"]
            .as_str()
            .unwrap_or_default()
            .contains("shutting down"),
        "{left}"
    );
    assert!(
        log.runs_of(&job_id)[0].cancelled,
        "the handler's token fired"
    );

    let l = log.clone();
    let b = start_agent(
        &nats,
        "stop-b",
        "[acceptance]\n",
        TestHandler::new(
            JobKind::ACCEPTANCE,
            Behaviour::Sleep(Duration::from_millis(50)),
            l,
        )
        .install(),
    )
    .await;
    let done = wait_settled(&client, &job_id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["agent"], "stop-b");
    assert_eq!(done["interruptions"][0]["agent"], "stop-a", "{done}");
    let runs = log.runs_of(&job_id);
    assert_eq!(runs.len(), 2);
    assert!(runs[1].interrupted, "the second run was told");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_finishes_within_the_deadline_completes_during_shutdown() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let l = log.clone();
    let a = start_agent(
        &nats,
        "drain-a",
        "[acceptance]\n",
        TestHandler::new(
            JobKind::ACCEPTANCE,
            Behaviour::Sleep(Duration::from_millis(800)),
            l,
        )
        .install(),
    )
    .await;
    let client = nats.client().await;
    let job_id = submit(&client, "acceptance").await;
    wait_state(&client, &job_id, "running").await;
    a.stop().await;
    let done = record(&client, &job_id).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 1);
}
