//! Catch-up: a fire missed while no agent ran runs exactly once at start.

use std::time::Duration;

use chrono::{Timelike, Utc};
use infraflux_handlers::JobKind;
use infraflux_tests::handlers::{Behaviour, RunLog, TestHandler};
use infraflux_tests::*;

fn handler(log: RunLog) -> impl FnOnce(&mut infraflux_handlers::Registry) {
    TestHandler::new(
        JobKind::ACCEPTANCE,
        Behaviour::Sleep(Duration::from_millis(10)),
        log,
    )
    .install()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fires_missed_while_no_agent_ran_run_once_at_start() {
    init();
    let nats = Nats::start();
    // Three daily fires a few seconds from now, within one minute, all of which will pass
    // with no agent up.
    let now = Utc::now();
    if now.second() >= 50 {
        tokio::time::sleep(Duration::from_secs(u64::from(61 - now.second()))).await;
    }
    let t0 = Utc::now();
    let fires: Vec<_> = (4..=6).map(|s| t0 + chrono::Duration::seconds(s)).collect();
    let seconds: Vec<String> = fires.iter().map(|f| f.second().to_string()).collect();
    let (minute, hour) = (fires[0].minute(), fires[0].hour());
    let toml = format!(
        r#"
[acceptance]

[[schedules]]
name = "daily-check"
cron = "{} {minute} {hour} * * *"
timezone = "UTC"
catch_up = "1h"
command = "acceptance"
"#,
        seconds.join(",")
    );
    let log = RunLog::default();
    // The first agent starts watching the schedule, then stops before any fire.
    let a = start_agent(&nats, "catch-a", &toml, handler(log.clone())).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.stop().await;
    let client = nats.client().await;
    assert!(all_records(&client).await.is_empty());

    // All three fires pass while nothing runs.
    let after_last = fires[2] + chrono::Duration::seconds(1);
    tokio::time::sleep((after_last - Utc::now()).to_std().unwrap_or_default()).await;

    let b = start_agent(&nats, "catch-b", &toml, handler(log.clone())).await;
    let job = wait_for(Duration::from_secs(15), "the catch-up job", || async {
        all_records(&client).await.first().cloned()
    })
    .await;
    let done = wait_settled(
        &client,
        job["job_id"].as_str().expect("id"),
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["params"]["catch_up"], true, "{done}");
    let fired_at =
        chrono::DateTime::parse_from_rfc3339(done["params"]["fire_time"].as_str().expect("fire"))
            .expect("rfc3339");
    assert_eq!(
        fired_at.timestamp(),
        fires[2].timestamp(),
        "only the latest missed fire runs"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let jobs = all_records(&client).await;
    assert_eq!(jobs.len(), 1, "exactly once: {jobs:?}");
    // A restart right after does not fire it again.
    b.stop().await;
    let c = start_agent(&nats, "catch-c", &toml, handler(log.clone())).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let jobs = all_records(&client).await;
    assert_eq!(jobs.len(), 1, "still once: {jobs:?}");
    c.stop().await;
}
