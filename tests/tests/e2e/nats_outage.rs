//! NATS stops and restarts while deliveries arrive: 503 while down, nothing acknowledged is
//! lost, the agent reconnects by itself and `/readyz` recovers. And a full JetStream store:
//! 503 with the reason, then recovery.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use infraflux_handlers::JobKind;
use infraflux_tests::handlers::{Behaviour, RunLog, TestHandler};
use infraflux_tests::*;
use serde_json::Value;

/// The push fixture with a different commit, so each delivery is a different job.
fn push_for(n: u32) -> Vec<u8> {
    let mut payload: Value =
        serde_json::from_slice(&fixture("github/push/push.json")).expect("json");
    payload["after"] = Value::String(format!("{:040x}", u64::from(n) + 1));
    serde_json::to_vec(&payload).expect("json")
}

async fn readyz(http: &str) -> u16 {
    match reqwest::Client::new()
        .get(format!("{http}/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
    {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_during_a_nats_restart_are_refused_or_kept_never_lost() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let l = log.clone();
    let agent = start_agent(
        &nats,
        "outage",
        "",
        TestHandler::new(
            JobKind::RECONCILE,
            Behaviour::Sleep(Duration::from_millis(20)),
            l,
        )
        .install(),
    )
    .await;
    assert_eq!(readyz(&agent.http).await, 200);

    // Senders that never stop during the outage: one new delivery every 100 ms, each in its
    // own task, as GitHub sends them.
    let results: Arc<Mutex<Vec<(u32, u16, Value)>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let sender = {
        let (results, stop, http) = (results.clone(), stop.clone(), agent.http.clone());
        tokio::spawn(async move {
            let mut n = 1u32;
            let mut inflight = Vec::new();
            while !stop.is_cancelled() {
                let (results, http) = (results.clone(), http.clone());
                inflight.push(tokio::spawn(async move {
                    let (status, reply) =
                        post_webhook(&http, "push", &format!("outage-{n}"), &push_for(n)).await;
                    results.lock().expect("lock").push((n, status, reply));
                }));
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for task in inflight {
                let _ = task.await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.stop();
    let down = wait_for(
        Duration::from_secs(10),
        "readyz to report the outage",
        || async {
            let s = readyz(&agent.http).await;
            (s == 503).then_some(s)
        },
    )
    .await;
    assert_eq!(down, 503);
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart();
    wait_for(Duration::from_secs(30), "readyz to recover", || async {
        (readyz(&agent.http).await == 200).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    sender.await.expect("sender");

    let results = results.lock().expect("lock").clone();
    let accepted: Vec<(u32, String)> = results
        .iter()
        .filter(|(_, s, _)| *s == 202)
        .map(|(n, _, r)| (*n, r["jobs"][0].as_str().expect("job").to_string()))
        .collect();
    let refused = results.iter().filter(|(_, s, _)| *s == 503).count();
    let other: Vec<_> = results
        .iter()
        .filter(|(_, s, _)| *s != 202 && *s != 503)
        .collect();
    assert!(
        other.is_empty(),
        "only 202 or 503 while NATS comes and goes: {other:?}"
    );
    assert!(
        refused > 0,
        "deliveries during the outage were refused with 503: {:?}",
        results.iter().map(|(n, s, _)| (*n, *s)).collect::<Vec<_>>()
    );
    assert!(
        accepted.len() >= 5,
        "deliveries before and after were accepted: {}",
        accepted.len()
    );

    // Every accepted delivery has its job, and it runs.
    let client = nats.client().await;
    for (n, job_id) in &accepted {
        let done = wait_settled(&client, job_id, Duration::from_secs(30)).await;
        assert_eq!(done["state"], "succeeded", "delivery {n}: {done}");
    }
    // A refused delivery was not stored: sending it again now makes its job.
    let (n, _, _) = results
        .iter()
        .find(|(_, s, _)| *s == 503)
        .expect("a refused delivery");
    let (status, reply) =
        post_webhook(&agent.http, "push", &format!("outage-{n}"), &push_for(*n)).await;
    assert!(
        status == 202 || (status == 200 && reply["duplicate"] == true),
        "{status} {reply}"
    );
    agent.stop().await;
}

/// The server's JetStream store full (`max_file_store` reached): a delivery is answered `503`
/// naming the reason, nothing of it is kept half-written, and once there is room again the
/// same delivery (GitHub's redelivery) makes exactly one job, which runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_jetstream_store_refuses_deliveries_with_the_reason_and_recovers() {
    init();
    let nats = Nats::start_with_config("jetstream {\n  max_file_store: 8388608\n}\n", &[], &[]);
    let log = RunLog::default();
    let agent = start_agent(
        &nats,
        "store-full",
        "",
        TestHandler::new(
            JobKind::RECONCILE,
            Behaviour::Sleep(Duration::from_millis(20)),
            log.clone(),
        )
        .install(),
    )
    .await;
    let client = nats.client().await;
    let (status, reply) = post_webhook(&agent.http, "push", "full-1", &push_for(1)).await;
    assert_eq!(status, 202, "{reply}");
    let before = reply["jobs"][0].as_str().expect("job").to_string();

    // Something else on the same server fills its store.
    let js = async_nats::jetstream::new(client.clone());
    let filler = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "FILLER".into(),
            subjects: vec!["filler".into()],
            ..Default::default()
        })
        .await
        .expect("filler stream");
    let chunk = bytes::Bytes::from(vec![7u8; 256 * 1024]);
    let mut refused = None;
    for _ in 0..64 {
        match js.publish("filler", chunk.clone()).await {
            Ok(ack) => match ack.await {
                Ok(_) => continue,
                Err(e) => refused = Some(e.to_string()),
            },
            Err(e) => refused = Some(e.to_string()),
        }
        break;
    }
    let refused = refused.expect("the store never filled up");
    eprintln!("the filler was refused: {refused}");

    let (status, reply) = post_webhook(&agent.http, "push", "full-2", &push_for(2)).await;
    assert_eq!(status, 503, "{reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(error.contains("JetStream storage is full"), "{error}");
    let ready = reqwest::get(format!("{}/readyz", agent.http))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200, "the agent itself is fine");

    // Room again: the refused delivery, sent again, makes one job that runs.
    filler.purge().await.expect("purge the filler");
    let (status, reply) = post_webhook(&agent.http, "push", "full-2", &push_for(2)).await;
    assert_eq!(status, 202, "{reply}");
    let after = reply["jobs"][0].as_str().expect("job").to_string();
    for job in [&before, &after] {
        let done = wait_settled(&client, job, Duration::from_secs(30)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
    let records = all_records(&client).await;
    assert_eq!(records.len(), 2, "one job per delivery: {records:?}");
    assert!(records.iter().all(|r| r["attempts"] == 1), "{records:?}");
    agent.stop().await;
}
