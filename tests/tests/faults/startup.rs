//! Three agents started together on a fresh cluster: each creates or finds the streams,
//! buckets and consumer at once. On nats-server 2.9 a stream update or a duplicate create
//! while the stream has no leader can go unanswered; an agent that re-proposed every setting
//! and restarted its whole setup on each lost answer took a minute to be ready.

use std::time::Duration;

use crate::{Lab, SERIAL};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_started_together_on_a_fresh_cluster_are_ready_soon() {
    let _serial = SERIAL.lock().await;
    for round in 1..=2 {
        let (lab, ready) = Lab::start(3).await;
        eprintln!("round {round}: agents ready after {ready:?}");
        // Far above a healthy start (seconds), far below the minute a lost-answer loop took.
        assert!(
            ready.iter().all(|d| *d < Duration::from_secs(30)),
            "round {round}: readiness took {ready:?}"
        );
        // Every stream and bucket has the three replicas asked for, and bucket reads go to
        // the stream leader.
        let client = lab.client().await;
        let js = async_nats::jetstream::new(client.clone());
        for name in STREAMS {
            let mut stream = js.get_stream(name).await.expect(name);
            let info = stream.info().await.expect("info");
            assert_eq!(info.config.num_replicas, 3, "{name}");
            if name.starts_with("KV_") {
                assert!(!info.config.allow_direct, "{name} serves direct gets");
            }
        }
        // `status` lists every agent, whichever agent answers, once its cache has followed
        // the others' heartbeats.
        infraflux_tests::wait_for(
            Duration::from_secs(15),
            "status to list all three agents",
            || async {
                let status = infraflux_tests::command(&client, "status").await;
                let message = status["message"].as_str().unwrap_or_default().to_string();
                ["fault-0", "fault-1", "fault-2"]
                    .iter()
                    .all(|id| message.contains(id))
                    .then_some(())
            },
        )
        .await;
    }
}

const STREAMS: [&str; 8] = [
    "INFRAFLUX_JOBS",
    "INFRAFLUX_EVENTS",
    "KV_infraflux-jobs",
    "KV_infraflux-locks",
    "KV_infraflux-dedup",
    "KV_infraflux-agents",
    "KV_infraflux-state",
    "OBJ_infraflux-artifacts",
];

/// A cluster first run with `replicas = 1` (one server's worth of data, as a lab starts),
/// then `replicas = 3`: the next start applies it to every stream, bucket and the object
/// store, and turns off the direct gets a single replica may serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_replica_count_is_applied_to_everything_at_start() {
    let _serial = SERIAL.lock().await;
    let (lab, _) = Lab::start_with(1, 1).await;
    let client = lab.client().await;
    let js = async_nats::jetstream::new(client.clone());
    for name in STREAMS {
        let mut stream = js.get_stream(name).await.expect(name);
        let info = stream.info().await.expect("info");
        assert_eq!(info.config.num_replicas, 1, "{name}");
        // The only replica is the leader: its direct gets cannot be stale.
        if name.starts_with("KV_") {
            assert!(info.config.allow_direct, "{name} has no direct gets");
        }
    }
    lab.kill9(0);
    lab.set_replicas(3);
    lab.spawn(0);
    lab.wait_ready(0, Duration::from_secs(60)).await;
    for name in STREAMS {
        let mut stream = js.get_stream(name).await.expect(name);
        let info = stream.info().await.expect("info");
        assert_eq!(info.config.num_replicas, 3, "{name}");
        assert!(
            !info.config.allow_direct || !name.starts_with("KV_"),
            "{name}"
        );
    }
}
