//! The whole NATS cluster gone for 30 s under load: webhooks are answered `503` (GitHub
//! redelivers them), `/readyz` says not ready, commands get no job, and when the servers come
//! back the agents recover on their own and nothing accepted before is lost.

use std::time::{Duration, Instant};

use crate::{Lab, Load, SERIAL, assert_nothing_lost, recovery};

const OUTAGE: Duration = Duration::from_secs(30);

async fn readyz(http: &str) -> u16 {
    reqwest::Client::new()
        .get(format!("{http}/readyz"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_second_outage_of_the_whole_cluster_under_load_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (lab, _) = Lab::start(3).await;
    let load = Load::start(&lab).await;
    tokio::time::sleep(Duration::from_secs(4)).await;

    let down_at = Instant::now();
    for server in 0..3 {
        lab.cluster.kill9(server);
    }
    // Half-way through, every agent says it is not ready, and answers quickly.
    tokio::time::sleep(OUTAGE / 2).await;
    for http in &lab.http {
        let asked = Instant::now();
        assert_eq!(readyz(http).await, 503, "{http}/readyz during the outage");
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "/readyz took {:?}",
            asked.elapsed()
        );
    }
    tokio::time::sleep(OUTAGE - down_at.elapsed()).await;
    let up_at = Instant::now();
    for server in 0..3 {
        lab.cluster.restart(server);
    }
    tokio::time::sleep(Duration::from_secs(15)).await;
    let sent = load.stop().await;

    // Sent a second after the kill and answered before the restart: refused, never accepted,
    // never a dropped connection (the agents themselves were up).
    let during: Vec<_> = sent
        .iter()
        .filter(|s| {
            s.what.starts_with("delivery")
                && s.at >= down_at + Duration::from_secs(1)
                && s.at + Duration::from_secs(11) < up_at
        })
        .collect();
    assert!(
        during.len() > 20,
        "too few deliveries during the outage: {}",
        during.len()
    );
    for s in &during {
        assert_eq!(s.status, 503, "{} during the outage", s.what);
    }
    let commands_with_jobs = sent
        .iter()
        .filter(|s| {
            s.what.starts_with("command")
                && s.at >= down_at + Duration::from_secs(1)
                && s.at + Duration::from_secs(11) < up_at
                && !s.jobs.is_empty()
        })
        .count();
    assert_eq!(
        commands_with_jobs, 0,
        "a command got a job while NATS was down"
    );
    let (gap, refused) = recovery(&sent, up_at);
    eprintln!(
        "whole cluster down for {OUTAGE:?}: {} deliveries answered 503 during it; after the restart, first 202 after {gap:?} ({refused} more 503s)",
        during.len()
    );
    assert!(
        gap.is_some(),
        "no delivery accepted after the cluster came back"
    );
    for http in &lab.http {
        assert_eq!(readyz(http).await, 200, "{http}/readyz after the outage");
    }
    assert_nothing_lost(&lab, &sent, Duration::from_secs(120)).await;
}
