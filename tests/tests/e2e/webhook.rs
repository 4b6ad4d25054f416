//! `POST /webhooks/github` as CONTRACT.md describes it.

use std::time::Duration;

use infraflux_handlers::JobKind;
use infraflux_tests::handlers::{Behaviour, RunLog, TestHandler};
use infraflux_tests::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_push_becomes_one_job_that_runs_to_success_and_duplicates_start_nothing() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let handler_log = log.clone();
    let agent = start_agent(
        &nats,
        "a1",
        "",
        TestHandler::new(
            JobKind::RECONCILE,
            Behaviour::Sleep(Duration::from_millis(200)),
            handler_log,
        )
        .install(),
    )
    .await;
    let client = nats.client().await;
    let events = EventLog::subscribe(&client).await;
    let body = fixture("github/push/push.json");
    let payload: Value = serde_json::from_slice(&body).expect("json");

    let (status, reply) = post_webhook(&agent.http, "push", "delivery-1", &body).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(reply["delivery"], "delivery-1");
    let job_id = reply["jobs"][0].as_str().expect("job id").to_string();

    let done = wait_settled(&client, &job_id, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["kind"], "reconcile");
    assert_eq!(done["source"], "webhook");
    assert_eq!(done["commit"], payload["after"]);
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["trace_id"].as_str().map(str::len), Some(32));
    for field in [
        "job_id",
        "requested_by",
        "created_at",
        "updated_at",
        "message",
        "params",
    ] {
        assert!(!done[field].is_null(), "record lacks {field}: {done}");
    }
    wait_for(Duration::from_secs(5), "the succeeded event", || async {
        events
            .states_of(&job_id)
            .contains(&"succeeded".to_string())
            .then_some(())
    })
    .await;
    assert_eq!(
        events.states_of(&job_id),
        ["queued", "running", "running", "succeeded"],
        "queued, running, a progress report, succeeded"
    );
    assert!(
        events
            .of(&job_id)
            .iter()
            .all(|e| e.trace_id == done["trace_id"])
    );

    // The same delivery again: duplicate, no second job.
    let (status, reply) = post_webhook(&agent.http, "push", "delivery-1", &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["duplicate"], true);
    assert_eq!(reply["job"], job_id.as_str());
    // The same commit from another delivery (another path saw it first): still one job.
    let (status, reply) = post_webhook(&agent.http, "push", "delivery-2", &body).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["job"], job_id.as_str());
    // ...and over NATS, as the workflow step forwards it.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("X-GitHub-Event", "push");
    headers.insert("Nats-Msg-Id", "actions-77-1");
    let forwarded = client
        .request_with_headers("infraflux.github.push", headers, body.clone().into())
        .await
        .expect("nats github reply");
    let forwarded: Value = serde_json::from_slice(&forwarded.payload).expect("json");
    assert_eq!(forwarded["duplicate"], true, "{forwarded}");
    assert_eq!(forwarded["job"], job_id.as_str());

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(log.runs().len(), 1, "exactly one run: {:?}", log.runs());
    let jobs = command(&client, "jobs").await;
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(1), "{jobs}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_store_nothing() {
    init();
    let nats = Nats::start();
    let agent = start_agent(&nats, "a1", "", |_| {}).await;
    let client = nats.client().await;
    let body = fixture("github/push/push.json");

    // Wrong signature, missing signature.
    let bad = sign("not-the-secret", &body);
    let (status, reply) = post_webhook_raw(
        &agent.http,
        Some("push"),
        Some("d-1"),
        Some(&bad),
        body.clone(),
    )
    .await;
    assert_eq!(status, 401, "{reply}");
    let (status, _) =
        post_webhook_raw(&agent.http, Some("push"), Some("d-1"), None, body.clone()).await;
    assert_eq!(status, 401);
    // Signed, but headers missing.
    let sig = sign(WEBHOOK_SECRET, &body);
    let (status, reply) =
        post_webhook_raw(&agent.http, None, Some("d-1"), Some(&sig), body.clone()).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("X-GitHub-Event")
    );
    let (status, _) =
        post_webhook_raw(&agent.http, Some("push"), None, Some(&sig), body.clone()).await;
    assert_eq!(status, 400);
    // Malformed JSON, correctly signed.
    let junk = b"{\"ref\": ".to_vec();
    let (status, reply) = post_webhook(&agent.http, "push", "d-2", &junk).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("malformed JSON"),
        "{reply}"
    );
    // 26 MiB: larger than anything GitHub sends.
    let huge = vec![b' '; 26 * 1024 * 1024];
    let (status, _) = post_webhook(&agent.http, "push", "d-3", &huge).await;
    assert_eq!(status, 413);
    // Ping, and events that start nothing.
    let ping = fixture("github/ping/payload.json");
    let (status, reply) = post_webhook(&agent.http, "ping", "d-4", &ping).await;
    assert_eq!(status, 200, "{reply}");
    // go-scm's fixtures come from another repository; point them at ours so the ref is judged.
    let ours = |path: &str| {
        let mut v: Value = serde_json::from_slice(&fixture(path)).expect("json");
        v["repository"]["full_name"] = Value::from("Codertocat/Hello-World");
        serde_json::to_vec(&v).expect("json")
    };
    let tag = ours("github/push/push_tag.json");
    let (status, reply) = post_webhook(&agent.http, "push", "d-5", &tag).await;
    assert_eq!(status, 200);
    assert!(
        reply["ignored"]
            .as_str()
            .unwrap_or_default()
            .contains("not a branch"),
        "{reply}"
    );
    let feature = ours("github/push/push_branch_create.json");
    let (status, reply) = post_webhook(&agent.http, "push", "d-6", &feature).await;
    assert_eq!(status, 200);
    assert!(
        reply["ignored"]
            .as_str()
            .unwrap_or_default()
            .contains("default branch master"),
        "{reply}"
    );
    let foreign = fixture("github/push/push_tag.json");
    let (status, reply) = post_webhook(&agent.http, "push", "d-7", &foreign).await;
    assert_eq!(status, 200);
    assert!(
        reply["ignored"]
            .as_str()
            .unwrap_or_default()
            .contains("not the configured"),
        "{reply}"
    );

    let jobs = command(&client, "jobs").await;
    assert_eq!(
        jobs["jobs"],
        serde_json::json!([]),
        "nothing was stored: {jobs}"
    );
    let metrics = metrics_text(&agent.http).await;
    assert!(
        metrics.contains("infraflux_webhook_requests_total{result=\"unauthorized\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("infraflux_webhook_requests_total{result=\"too_large\"} 1"),
        "{metrics}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn githubs_documented_signature_vector_is_accepted() {
    init();
    let nats = Nats::start();
    let extra = "";
    let dir = tempfile::tempdir().expect("tempdir");
    // The agent holds GitHub's documented test secret; the body is the documented payload,
    // which is not JSON: passing the signature check shows as a 400 about JSON, not a 401.
    let toml = base_toml(&nats.url, "vector", dir.path())
        .replace("env:TEST_WEBHOOK_SECRET", "env:DOC_SECRET");
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, format!("{toml}\n{extra}")).expect("write");
    let env = std::collections::HashMap::from([(
        "DOC_SECRET".to_string(),
        "It's a Secret to Everybody".to_string(),
    )]);
    let loaded = infraflux_agent::Config::load(&path, env.clone()).expect("config");
    let secrets = infraflux_agent::secrets::resolve_all(&loaded.config, &env)
        .await
        .expect("secrets");
    let services = infraflux_agent::services::build(&loaded.config, &secrets, &env)
        .await
        .expect("services");
    let registry = infraflux_handlers::Registry::from_sections(&loaded.config.handlers, &services);
    let mut handle = infraflux_agent::start(loaded.config, services, registry)
        .await
        .expect("start");
    assert!(handle.ready().await);
    let http = format!("http://{}", handle.http_addr);
    let documented = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
    let (status, reply) = post_webhook_raw(
        &http,
        Some("push"),
        Some("v-1"),
        Some(documented),
        b"Hello, World!".to_vec(),
    )
    .await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("malformed JSON")
    );
    let (status, _) = post_webhook_raw(
        &http,
        Some("push"),
        Some("v-2"),
        Some(documented),
        b"Hello, World?".to_vec(),
    )
    .await;
    assert_eq!(status, 401);
    handle.shutdown();
    let _ = handle.join().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_for_an_unconfigured_handler_still_becomes_a_visible_failed_job() {
    init();
    let nats = Nats::start();
    let agent = start_agent(&nats, "a1", "", |_| {}).await;
    let client = nats.client().await;
    let body = fixture("github/push/with-new-branch.payload.json");
    let (status, reply) = post_webhook(&agent.http, "push", "nc-1", &body).await;
    assert_eq!(status, 202, "{reply}");
    let job_id = reply["jobs"][0].as_str().expect("job").to_string();
    let done = wait_settled(&client, &job_id, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "failed");
    assert!(
        done["message"]
            .as_str()
            .unwrap_or_default()
            .contains("not configured"),
        "{done}"
    );
    assert!(
        done["message"]
            .as_str()
            .unwrap_or_default()
            .contains("[reconcile]"),
        "{done}"
    );
    // Counted once, as failed.
    let metrics = metrics_text(&agent.http).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"infraflux_jobs_total{kind="reconcile",outcome="failed"} 1"#),
        "{metrics}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_publish_ack_and_the_senders_retry_make_one_job_with_one_id() {
    init();
    let nats = Nats::start();
    let proxy = infraflux_tests::nats_proxy::NatsProxy::start(nats.port, "INFRAFLUX_JOBS").await;
    let log = RunLog::default();
    let agent = start_agent_at(
        &proxy.url,
        "a1",
        "",
        &[],
        TestHandler::new(
            JobKind::RECONCILE,
            Behaviour::Sleep(Duration::from_millis(100)),
            log.clone(),
        )
        .install(),
    )
    .await;
    let client = nats.client().await;
    let body = fixture("github/push/push.json");

    // The server stores the job; its acknowledgement never reaches the agent.
    proxy.drop_next_acks(1);
    let (status, reply) = post_webhook(&agent.http, "push", "delivery-lost-ack", &body).await;
    assert_eq!(status, 503, "{reply}");
    assert_eq!(proxy.dropped(), 1, "the ack was not dropped");

    // GitHub redelivers the same delivery: the job already stored keeps its id.
    let (status, reply) = post_webhook(&agent.http, "push", "delivery-lost-ack", &body).await;
    assert!(status == 202 || status == 200, "{status} {reply}");
    let job_id = reply["jobs"][0]
        .as_str()
        .or_else(|| reply["job"].as_str())
        .unwrap_or_else(|| panic!("no job id in {reply}"))
        .to_string();
    let done = wait_settled(&client, &job_id, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");

    let reconciles: Vec<Value> = all_records(&client)
        .await
        .into_iter()
        .filter(|r| r["kind"] == "reconcile")
        .collect();
    assert_eq!(reconciles.len(), 1, "{reconciles:?}");
    assert_eq!(reconciles[0]["job_id"], job_id.as_str());
    // Once more after a moment: a second job would have run by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(log.runs().len(), 1, "{:?}", log.runs());
    // The redelivery's own job message, sent with its claim before the claim was known to be
    // lost, was taken back: nothing is left to run.
    assert_eq!(queued_messages(&client).await, 0);
    agent.stop().await;
}

/// Messages left in the jobs stream (a work queue: a job's message goes when it is done).
async fn queued_messages(client: &async_nats::Client) -> u64 {
    async_nats::jetstream::new(client.clone())
        .get_stream("INFRAFLUX_JOBS")
        .await
        .expect("jobs stream")
        .info()
        .await
        .expect("jobs stream info")
        .state
        .messages
}

/// Ingest sends a delivery's claim and its job in one round trip, so a delivery that loses
/// the claim has stored a job of its own first. Deliveries of one commit racing each other,
/// and redeliveries after the job ran, are all answered with the one job; the losers leave no
/// record, no event (not even one heard live) and no queue message; each job runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_that_lose_the_claim_leave_nothing_behind_and_run_nothing() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let agent = start_agent(
        &nats,
        "a1",
        "",
        TestHandler::new(
            JobKind::RECONCILE,
            Behaviour::Sleep(Duration::from_millis(300)),
            log.clone(),
        )
        .install(),
    )
    .await;
    let client = nats.client().await;
    let events = EventLog::subscribe(&client).await;
    let mut payload: Value =
        serde_json::from_slice(&fixture("github/push/push.json")).expect("json");
    let mut winners = std::collections::BTreeSet::new();
    for round in 0..5u32 {
        payload["after"] = format!("{:040x}", 0xc0ffee + round).into();
        let body = serde_json::to_vec(&payload).expect("json");
        let replies = futures::future::join_all((0..8).map(|i| {
            let (http, body) = (agent.http.clone(), body.clone());
            async move { post_webhook(&http, "push", &format!("race-{round}-{i}"), &body).await }
        }))
        .await;
        let mut jobs = std::collections::BTreeSet::new();
        for (status, reply) in &replies {
            let job = match status {
                202 => reply["jobs"][0].as_str(),
                200 => reply["job"].as_str(),
                _ => panic!("round {round}: {status} {reply}"),
            };
            jobs.insert(job.expect("a job id").to_string());
        }
        assert_eq!(jobs.len(), 1, "round {round}: {replies:?}");
        assert_eq!(
            replies.iter().filter(|(status, _)| *status == 202).count(),
            1,
            "round {round}: one delivery created the job: {replies:?}"
        );
        winners.extend(jobs);
    }
    for job_id in &winners {
        let done = wait_settled(&client, job_id, Duration::from_secs(20)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
    // Redeliveries after the run: answered with the job, nothing stored.
    let body = serde_json::to_vec(&payload).expect("json");
    for i in 0..3 {
        let (status, reply) = post_webhook(&agent.http, "push", &format!("late-{i}"), &body).await;
        assert_eq!(status, 200, "{reply}");
        assert!(
            winners.contains(reply["job"].as_str().unwrap_or_default()),
            "{reply}"
        );
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    let records: std::collections::BTreeSet<String> = all_records(&client)
        .await
        .iter()
        .filter_map(|r| r["job_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(records, winners, "records of the winners only");
    assert_eq!(
        events.job_ids(),
        winners,
        "events heard of the winners only"
    );
    let stored: std::collections::BTreeSet<String> = stored_events(&client)
        .await
        .iter()
        .filter_map(|e| e["job_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(stored, winners, "events stored of the winners only");
    for job_id in &winners {
        assert_eq!(
            events.states_of(job_id).first().map(String::as_str),
            Some("queued"),
            "{job_id}: {:?}",
            events.states_of(job_id)
        );
        assert_eq!(log.runs_of(job_id).len(), 1, "{job_id} ran once");
    }
    assert_eq!(log.runs().len(), winners.len(), "{:?}", log.runs());
    assert_eq!(queued_messages(&client).await, 0, "no job message left");
    agent.stop().await;
}

/// The runner runs a job only if its key's claim names it: a job message whose key is claimed
/// by another job (left by a submission that lost the claim and died before taking it back)
/// is dropped with its record, unannounced; a job whose key nobody claimed (its claim's write
/// failed) is claimed by the runner and runs, announced `queued` first; a job accepted long
/// before the key's present claim (its own expired) ends `cancelled`, naming the newer job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_runs_a_job_only_if_its_keys_claim_names_it() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let agent = start_agent(
        &nats,
        "a1",
        "",
        TestHandler::new(
            JobKind::RECONCILE,
            Behaviour::Sleep(Duration::from_millis(100)),
            log.clone(),
        )
        .install(),
    )
    .await;
    let client = nats.client().await;
    let events = EventLog::subscribe(&client).await;
    let js = async_nats::jetstream::new(client.clone());
    let (status, reply) = post_webhook(
        &agent.http,
        "push",
        "d-1",
        &fixture("github/push/push.json"),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
    let winner = reply["jobs"][0].as_str().expect("job id").to_string();
    let done = wait_settled(&client, &winner, Duration::from_secs(20)).await;
    let claimed_key = done["idempotency_key"].as_str().expect("key").to_string();

    let envelope = |key: &str| infraflux_handlers::JobEnvelope {
        job_id: infraflux_handlers::new_job_id(),
        kind: JobKind::RECONCILE,
        params: Default::default(),
        source: infraflux_handlers::Source::Webhook,
        requested_by: "tester".into(),
        idempotency_key: key.into(),
        traceparent: None,
        commit: None,
        created_at: chrono::Utc::now(),
    };
    let loser = envelope(&claimed_key);
    let unclaimed = envelope("test.unclaimed.1");
    // Accepted an hour ago; its claim expired meanwhile and a newer job claimed the key.
    let mut expired = envelope("test.expired.1");
    expired.created_at = chrono::Utc::now() - chrono::Duration::hours(1);
    let newer_claim = serde_json::json!({"job_id": "01newerjob", "at": chrono::Utc::now()});
    js.get_key_value("infraflux-dedup")
        .await
        .expect("dedup bucket")
        .create(
            "test.expired.1",
            serde_json::to_vec(&newer_claim).expect("json").into(),
        )
        .await
        .expect("claim");
    // The loser's and the expired one's records, as ingest wrote them.
    let records = js
        .get_key_value("infraflux-jobs")
        .await
        .expect("records bucket");
    for job in [&loser, &expired] {
        let record = infraflux_agent::records::JobRecord::new(job, "");
        records
            .create(
                &job.job_id,
                serde_json::to_vec(&record).expect("json").into(),
            )
            .await
            .expect("record");
    }
    for job in [&loser, &unclaimed, &expired] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", job.job_id.as_str());
        js.publish_with_headers(
            "infraflux.jobs.reconcile",
            headers,
            serde_json::to_vec(job).expect("json").into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
    }

    wait_for(
        Duration::from_secs(10),
        "the runner to record the unclaimed job",
        || async {
            let records = all_records(&client).await;
            records
                .iter()
                .any(|r| r["job_id"] == unclaimed.job_id.as_str())
                .then_some(())
        },
    )
    .await;
    let done = wait_settled(&client, &unclaimed.job_id, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let claim = js
        .get_key_value("infraflux-dedup")
        .await
        .expect("dedup bucket")
        .get("test.unclaimed.1")
        .await
        .expect("read claim")
        .expect("the runner claimed the key");
    let claim: Value = serde_json::from_slice(&claim).expect("claim json");
    assert_eq!(claim["job_id"], unclaimed.job_id.as_str(), "{claim}");
    wait_for(
        Duration::from_secs(10),
        "the loser's record to go",
        || async {
            let records = all_records(&client).await;
            (!records.iter().any(|r| r["job_id"] == loser.job_id.as_str())).then_some(())
        },
    )
    .await;
    wait_for(Duration::from_secs(10), "the queue to empty", || async {
        (queued_messages(&client).await == 0).then_some(())
    })
    .await;
    let superseded = wait_settled(&client, &expired.job_id, Duration::from_secs(20)).await;
    assert_eq!(superseded["state"], "cancelled", "{superseded}");
    assert!(
        superseded["message"]
            .as_str()
            .unwrap_or_default()
            .contains("superseded by job 01newerjob"),
        "{superseded}"
    );
    assert!(log.runs_of(&expired.job_id).is_empty());
    assert!(log.runs_of(&loser.job_id).is_empty(), "{:?}", log.runs());
    assert_eq!(log.runs_of(&unclaimed.job_id).len(), 1);
    assert_eq!(log.runs_of(&winner).len(), 1);
    assert!(
        events.of(&loser.job_id).is_empty(),
        "{:?}",
        events.of(&loser.job_id)
    );
    assert_eq!(
        events.states_of(&unclaimed.job_id),
        ["queued", "running", "running", "succeeded"],
        "announced before its first start"
    );
    agent.stop().await;
}

/// The claim goes with the job only while every live agent checks claims before running a
/// job: with an agent of an earlier version alive (its presence has no `checks_claims`), a
/// redelivery's claim is written first and stores no job message of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_older_agent_alive_a_losing_delivery_stores_no_job() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let agent = start_agent(
        &nats,
        "a1",
        "",
        TestHandler::new(
            JobKind::RECONCILE,
            Behaviour::Sleep(Duration::from_millis(50)),
            log.clone(),
        )
        .install(),
    )
    .await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let last_job_sequence = || async {
        js.get_stream("INFRAFLUX_JOBS")
            .await
            .expect("jobs stream")
            .info()
            .await
            .expect("info")
            .state
            .last_sequence
    };
    let body = fixture("github/push/push.json");
    let (status, reply) = post_webhook(&agent.http, "push", "d-1", &body).await;
    assert_eq!(status, 202, "{reply}");
    let job_id = reply["jobs"][0].as_str().expect("job id").to_string();
    wait_settled(&client, &job_id, Duration::from_secs(20)).await;

    // Only agents that check claims: a redelivery sends its job with its claim, then takes
    // it back.
    let before = last_job_sequence().await;
    let (status, reply) = post_webhook(&agent.http, "push", "d-2", &body).await;
    assert_eq!(
        (status, reply["job"].as_str()),
        (200, Some(job_id.as_str())),
        "{reply}"
    );
    assert_eq!(
        last_job_sequence().await,
        before + 1,
        "the job went with the claim"
    );

    // An agent of an earlier version comes up.
    let old = serde_json::json!({
        "agent": "old-1",
        "version": "0.0.9",
        "started_at": chrono::Utc::now(),
        "seen_at": chrono::Utc::now(),
        "concurrency": 1,
        "running": [],
    });
    js.get_key_value("infraflux-agents")
        .await
        .expect("agents bucket")
        .put("old-1", serde_json::to_vec(&old).expect("json").into())
        .await
        .expect("presence");
    status_showing(&client, "old-1").await;
    let before = last_job_sequence().await;
    for delivery in ["d-3", "d-4"] {
        let (status, reply) = post_webhook(&agent.http, "push", delivery, &body).await;
        assert_eq!(
            (status, reply["job"].as_str()),
            (200, Some(job_id.as_str())),
            "{reply}"
        );
    }
    assert_eq!(
        last_job_sequence().await,
        before,
        "claimed first: no job message stored"
    );
    // A new job is still created, claim first.
    let mut payload: Value = serde_json::from_slice(&body).expect("json");
    payload["after"] = "b".repeat(40).into();
    let (status, reply) = post_webhook(
        &agent.http,
        "push",
        "d-5",
        &serde_json::to_vec(&payload).expect("json"),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
    let second = reply["jobs"][0].as_str().expect("job id").to_string();
    let done = wait_settled(&client, &second, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(log.runs().len(), 2, "{:?}", log.runs());
    agent.stop().await;
}

/// Accepting a delivery does not wait for the agent's main runtime: with every one of its
/// workers held (as jobs' tasks can hold them), a new signed push is still stored and answered
/// `202`, and a redelivery (the claim read, the loser taken back, the winner's record read) is
/// answered as a duplicate, all over HTTP and ingest's own NATS connection; the job runs once
/// the workers are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_is_stored_and_answered_while_every_main_worker_is_held() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let agent = start_agent(
        &nats,
        "a1",
        "",
        TestHandler::new(
            JobKind::RECONCILE,
            Behaviour::Sleep(Duration::from_millis(10)),
            log.clone(),
        )
        .install(),
    )
    .await;
    let client = nats.client().await;
    // Until the agent sees itself alive, a claim goes first (the other path, also ingest's).
    wait_for(Duration::from_secs(10), "the agent in status", || async {
        let status = command(&client, "status").await;
        (status["status"]["agents"][0]["agent"] == "a1").then_some(())
    })
    .await;
    let first = fixture("github/push/push.json");
    let (status, reply) = post_webhook(&agent.http, "push", "before-held", &first).await;
    assert_eq!(status, 202, "{reply}");
    let first_job = reply["jobs"][0].as_str().expect("job id").to_string();
    let mut payload: Value = serde_json::from_slice(&first).expect("json");
    payload["after"] = "d".repeat(40).into();
    let second = serde_json::to_vec(&payload).expect("json");

    // The test body runs on its own thread, not on a worker: it holds both and sends the
    // requests with blocking I/O.
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let (started, all_started) = std::sync::mpsc::channel::<()>();
    let release = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
    for _ in 0..workers {
        let (started, release) = (started.clone(), release.clone());
        tokio::spawn(async move {
            let _ = started.send(());
            let (released, wake) = &*release;
            let guard = released.lock().unwrap_or_else(|e| e.into_inner());
            let _ = wake.wait_timeout_while(guard, Duration::from_secs(60), |r| !*r);
        });
    }
    let held = (0..workers).all(|_| all_started.recv_timeout(Duration::from_secs(10)).is_ok());
    let answers = held.then(|| {
        let addr = agent.handle.http_addr;
        (
            post_webhook_blocking(addr, "held-1", &second),
            post_webhook_blocking(addr, "before-held", &first),
        )
    });
    {
        let (released, wake) = &*release;
        *released.lock().unwrap_or_else(|e| e.into_inner()) = true;
        wake.notify_all();
    }
    assert!(
        held,
        "the main runtime's {workers} workers were not all held"
    );
    let (new, redelivered) = answers.expect("held");
    let new = new.expect("a new push answered while the main runtime's workers were held");
    assert!(new.starts_with("HTTP/1.1 202"), "{new}");
    let job_id = body_of(&new)["jobs"][0]
        .as_str()
        .expect("job id")
        .to_string();
    let redelivered =
        redelivered.expect("a redelivery answered while the main runtime's workers were held");
    assert!(redelivered.starts_with("HTTP/1.1 200"), "{redelivered}");
    assert_eq!(body_of(&redelivered)["job"], first_job.as_str());

    for job in [&first_job, &job_id] {
        let done = wait_settled(&client, job, Duration::from_secs(20)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
    assert_eq!(log.runs().len(), 2, "{:?}", log.runs());
    agent.stop().await;
}

/// The JSON body of a whole HTTP answer.
fn body_of(answer: &str) -> Value {
    serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {answer}"))
}

/// A signed push, sent and answered with blocking I/O (no runtime needed); the whole answer.
fn post_webhook_blocking(
    addr: std::net::SocketAddr,
    delivery: &str,
    body: &[u8],
) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        stream,
        "POST /webhooks/github HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: push\r\nX-GitHub-Delivery: {delivery}\r\nX-Hub-Signature-256: {}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        sign(WEBHOOK_SECRET, body),
        body.len()
    )?;
    stream.write_all(body)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}
