//! kill -9 of an agent mid-job: the job is redelivered, completes elsewhere, and its record and
//! its handler know it was interrupted.

use std::time::Duration;

use infraflux_tests::*;

pub use infraflux_tests::process::AgentProcess;

/// The test agent binary as a child process, so it can be killed like a crash kills it.
pub fn spawn_agent(
    config: &std::path::Path,
    env: &[(&str, String)],
    log: &std::path::Path,
) -> AgentProcess {
    AgentProcess::spawn(&crate::test_agent_bin(), config, env, log)
}

/// An agent whose acceptance jobs write markers and take 4 s.
fn with_markers(
    config: &std::path::Path,
    markers: &std::path::Path,
    log: &std::path::Path,
) -> AgentProcess {
    let env = [
        ("IFX_TEST_MARKERS", markers.display().to_string()),
        ("IFX_TEST_SLEEP_MS", "4000".to_string()),
    ];
    spawn_agent(config, &env, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_kill_9_of_its_agent_and_records_the_interruption() {
    init();
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let markers = dir.path().join("markers");
    std::fs::create_dir_all(&markers).expect("markers dir");
    let write_config = |id: &str| {
        let state = dir.path().join(id);
        let path = dir.path().join(format!("{id}.toml"));
        std::fs::write(
            &path,
            format!(
                "{}\n{}",
                base_toml(&nats.url, id, &state),
                acceptance_stand_in()
            ),
        )
        .expect("config");
        path
    };
    let first = write_config("crash-a");
    let second = write_config("crash-b");
    let mut a = with_markers(&first, &markers, &dir.path().join("a.log"));
    let client = nats.client().await;
    let reply = wait_for(Duration::from_secs(20), "agent a to answer", || async {
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            client.request("infraflux.cmd.acceptance", "acceptance".into()),
        )
        .await;
        match r {
            Ok(Ok(m)) => serde_json::from_slice::<serde_json::Value>(&m.payload).ok(),
            _ => None,
        }
    })
    .await;
    let job_id = reply["job_id"].as_str().expect("job id").to_string();
    let start_a = markers.join(format!("{job_id}.1.crash-a.start"));
    wait_for(
        Duration::from_secs(15),
        "the job to start on agent a",
        || async { start_a.exists().then_some(()) },
    )
    .await;
    a.kill9();

    let _b = with_markers(&second, &markers, &dir.path().join("b.log"));
    let done = wait_settled(&client, &job_id, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["agent"], "crash-b");
    assert_eq!(done["attempts"], 2, "{done}");
    let interruptions = done["interruptions"].as_array().expect("interruptions");
    assert_eq!(interruptions.len(), 1, "{done}");
    assert_eq!(interruptions[0]["agent"], "crash-a");
    assert_eq!(interruptions[0]["attempt"], 1);
    assert_eq!(interruptions[0]["state"], "running");
    // The handler was told, and the first attempt never finished.
    let told = std::fs::read_to_string(markers.join(format!("{job_id}.2.crash-b.start")))
        .expect("second attempt marker");
    assert_eq!(told, "interrupted=true previous_agent=crash-a\n");
    assert!(!markers.join(format!("{job_id}.1.crash-a.done")).exists());
    assert!(markers.join(format!("{job_id}.2.crash-b.done")).exists());
    let attempts = std::fs::read_dir(&markers)
        .expect("markers")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".start"))
        .count();
    assert_eq!(attempts, 2, "one interrupted attempt, one complete");
}

/// An agent killed between writing a job's record and its queue message (or a `503` during
/// a leader election) leaves a record `queued` with nothing to run it: agents publish such a
/// job again after `requeue_after`, under its own id, and it runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_left_queued_without_its_queue_message_is_queued_again_and_runs_once() {
    init();
    let nats = Nats::start();
    let client = nats.client().await;
    let log = infraflux_tests::handlers::RunLog::default();
    let handler = infraflux_tests::handlers::TestHandler::new(
        infraflux_handlers::JobKind::ACCEPTANCE,
        infraflux_tests::handlers::Behaviour::Sleep(Duration::from_millis(50)),
        log.clone(),
    );
    let agent = start_agent_with_env(
        &nats,
        "requeue",
        "[acceptance]\n",
        &[("INFRAFLUX_AGENT__REQUEUE_AFTER", "2s")],
        handler.install(),
    )
    .await;
    // The record as ingest writes it, created a minute ago, and no queue message.
    let envelope = infraflux_handlers::JobEnvelope {
        job_id: infraflux_handlers::new_job_id(),
        kind: infraflux_handlers::JobKind::ACCEPTANCE,
        params: Default::default(),
        source: infraflux_handlers::Source::Chatops,
        requested_by: "tester".into(),
        idempotency_key: "chatops.stranded-1".into(),
        traceparent: None,
        commit: None,
        created_at: chrono::Utc::now() - chrono::Duration::minutes(1),
    };
    let record = infraflux_agent::records::JobRecord::new(&envelope, "");
    async_nats::jetstream::new(client.clone())
        .get_key_value("infraflux-jobs")
        .await
        .expect("records bucket")
        .create(
            &envelope.job_id,
            serde_json::to_vec(&record).expect("json").into(),
        )
        .await
        .expect("record");
    let done = wait_settled(&client, &envelope.job_id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    // A second look finds nothing to do: it ran once.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(log.runs_of(&envelope.job_id).len(), 1);
    agent.stop().await;
}
