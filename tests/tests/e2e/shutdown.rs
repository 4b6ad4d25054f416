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

/// SIGTERM while NATS hangs (its process stopped, connections open, nothing answering), with a
/// stranded-job sweep due: every request the agent makes on the way out would wait its full
/// timeout, one after another. It still exits within seconds, so systemd does not have to kill
/// it, and what it was doing is left as a crash would leave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_asked_to_stop_while_nats_hangs_exits_within_seconds() {
    init();
    let nats = Nats::start();
    let a = start_agent_with_env(
        &nats,
        "hung-a",
        "[acceptance]\n",
        // The first sweep for stranded jobs comes a quarter to a half of this after start.
        &[("INFRAFLUX_AGENT__REQUEUE_AFTER", "2s")],
        |_| {},
    )
    .await;
    nats.freeze();
    // Let the sweep, the heartbeat and the readiness probe start requests that hang.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let asked = std::time::Instant::now();
    a.handle.shutdown();
    let joined = tokio::time::timeout(Duration::from_secs(30), a.handle.join()).await;
    let took = asked.elapsed();
    nats.thaw();
    assert!(joined.is_ok(), "still running 30 s after shutdown");
    // shutdown_timeout (2 s in tests) bounds the runner; the rest gets 2 s plus 2 s for the
    // presence. Before, each hung request waited its 5 s timeout in turn.
    assert!(
        took < Duration::from_secs(7),
        "took {took:?} to stop with NATS hung"
    );
    eprintln!("stopped in {took:?} with NATS hung");
}
