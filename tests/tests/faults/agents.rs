//! kill -9 of one of three agents, twenty times at random moments under load, each restarted:
//! the jobs it held are redelivered after their lease, run elsewhere, and none is lost, run
//! twice at once, or left holding a lock.

use std::time::Duration;

use rand::Rng;

use crate::{Lab, Load, SERIAL, assert_nothing_lost};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_agents_twenty_times_under_load_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let (lab, _) = Lab::start(3).await;
    let load = Load::start(&lab).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut rng = rand::rng();
    for _ in 0..20 {
        let victim = rng.random_range(0..lab.agents());
        lab.kill9(victim);
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..1500))).await;
        lab.spawn(victim);
        lab.wait_ready(victim, Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..1500))).await;
    }
    let sent = load.stop().await;
    for i in 0..lab.agents() {
        assert!(lab.is_running(i));
    }
    assert_nothing_lost(&lab, &sent, Duration::from_secs(120)).await;
}
