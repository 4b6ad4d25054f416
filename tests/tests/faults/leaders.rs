//! kill -9 of the JetStream meta leader, then of the jobs stream's leader, under load: the
//! cluster re-elects, writes resume, and nothing accepted is lost or run twice.

use std::time::{Duration, Instant};

use crate::{Lab, Load, SERIAL, assert_nothing_lost, recovery};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_meta_leader_and_a_stream_leader_under_load_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (lab, _) = Lab::start(3).await;
    let client = lab.client().await;
    let load = Load::start(&lab).await;
    tokio::time::sleep(Duration::from_secs(4)).await;

    let meta = lab
        .cluster
        .wait_for_meta_leader(Duration::from_secs(10))
        .await;
    let killed_at = Instant::now();
    lab.cluster.kill9(meta);
    tokio::time::sleep(Duration::from_secs(5)).await;
    lab.cluster.restart(meta);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (gap, refused) = recovery(&load.so_far(), killed_at);
    eprintln!(
        "meta leader {} killed: first 202 after {gap:?}, {refused} deliveries answered 503 before it",
        lab.cluster.name(meta)
    );
    assert!(
        gap.is_some(),
        "no delivery accepted after the meta leader died"
    );

    let leader = crate::wait_for_stream_leader(&lab, &client, "INFRAFLUX_JOBS").await;
    let killed_at = Instant::now();
    lab.cluster.kill9(leader);
    tokio::time::sleep(Duration::from_secs(5)).await;
    lab.cluster.restart(leader);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let sent = load.stop().await;
    let (gap, refused) = recovery(&sent, killed_at);
    eprintln!(
        "jobs stream leader {} killed: first 202 after {gap:?}, {refused} deliveries answered 503 before it",
        lab.cluster.name(leader)
    );
    assert!(
        gap.is_some(),
        "no delivery accepted after the stream leader died"
    );
    assert_nothing_lost(&lab, &sent, Duration::from_secs(120)).await;
}
