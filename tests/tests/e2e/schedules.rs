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

/// The fire times of every scheduled job so far, oldest first.
async fn fire_times(client: &async_nats::Client) -> Vec<String> {
    let mut fires: Vec<String> = all_records(client)
        .await
        .iter()
        .filter_map(|r| r["params"]["fire_time"].as_str().map(str::to_string))
        .collect();
    fires.sort();
    fires
}

fn at(s: &str) -> chrono::DateTime<Utc> {
    s.parse().expect("rfc3339")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_jump_forward_or_back_neither_fires_twice_nor_loses_the_latest_fire() {
    init();
    let nats = Nats::start();
    let toml = r#"
[acceptance]

[[schedules]]
name = "minutely-check"
cron = "0 * * * * *"
timezone = "UTC"
catch_up = "5m"
command = "acceptance"
"#;
    let clock = infraflux_tests::clock::JumpClock::reading(at("2030-01-01T00:00:58Z"));
    let log = RunLog::default();
    let a =
        start_agent_with_clock(&nats, "clock-a", toml, clock.clone(), handler(log.clone())).await;
    let client = nats.client().await;
    let fired = |want: usize| {
        let client = client.clone();
        async move {
            wait_for(Duration::from_secs(15), "the scheduled jobs", || async {
                let fires = fire_times(&client).await;
                (fires.len() >= want).then_some(fires)
            })
            .await
        }
    };
    assert_eq!(fired(1).await, ["2030-01-01T00:01:00+00:00"]);

    // Forward ten minutes: nine fires passed unseen. Only the latest runs, once.
    clock.set_to(at("2030-01-01T00:11:02Z"));
    assert_eq!(
        fired(2).await,
        ["2030-01-01T00:01:00+00:00", "2030-01-01T00:11:00+00:00"]
    );

    // Back before that fire: when the clock passes it again it does not fire twice.
    clock.set_to(at("2030-01-01T00:10:58Z"));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(fire_times(&client).await.len(), 2, "no second 00:11:00");

    // An agent started while the clock reads the past again does not fire it either: the
    // cursor in the store remembers the newest fire.
    a.stop().await;
    clock.set_to(at("2030-01-01T00:10:59Z"));
    let b =
        start_agent_with_clock(&nats, "clock-b", toml, clock.clone(), handler(log.clone())).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fire_times(&client).await.len(),
        2,
        "no second 00:11:00 after a restart"
    );

    // Then the next fire comes, once.
    clock.set_to(at("2030-01-01T00:11:58Z"));
    assert_eq!(
        fired(3).await,
        [
            "2030-01-01T00:01:00+00:00",
            "2030-01-01T00:11:00+00:00",
            "2030-01-01T00:12:00+00:00"
        ]
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fire_times(&client).await.len(), 3, "each fire once");
    for record in all_records(&client).await {
        let id = record["job_id"].as_str().expect("id").to_string();
        let done = wait_settled(&client, &id, Duration::from_secs(15)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        assert!(done["params"].get("catch_up").is_none(), "{done}");
    }
    b.stop().await;
}
