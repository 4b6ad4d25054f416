//! Several agents on one NATS: work is shared, nothing runs twice, schedules fire once.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use infraflux_handlers::JobKind;
use infraflux_tests::handlers::{Behaviour, RunLog, TestHandler};
use infraflux_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_commands_on_two_agents_run_exactly_once_each() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let handler = |log: RunLog| {
        move |r: &mut infraflux_handlers::Registry| {
            r.register(Arc::new(TestHandler::new(
                JobKind::BACKUP,
                Behaviour::Sleep(Duration::from_millis(5)),
                log,
            )))
        }
    };
    let a = start_agent(&nats, "agent-a", "[backup]\n", handler(log.clone())).await;
    let b = start_agent(&nats, "agent-b", "[backup]\n", handler(log.clone())).await;
    let client = nats.client().await;

    let mut sends = Vec::new();
    for i in 0..200 {
        let client = client.clone();
        sends.push(tokio::spawn(async move {
            command_as(&client, "backup ns=media", &format!("user-{i}")).await
        }));
    }
    let mut job_ids = HashSet::new();
    for send in sends {
        let reply = send.await.expect("task");
        assert_eq!(reply["ok"], true, "{reply}");
        job_ids.insert(reply["job_id"].as_str().expect("id").to_string());
    }
    assert_eq!(job_ids.len(), 200, "200 commands gave 200 distinct jobs");

    wait_for(Duration::from_secs(90), "all 200 jobs to run", || async {
        let done = log.runs().iter().filter(|r| r.ended.is_some()).count();
        (done >= 200).then_some(())
    })
    .await;
    // Let any stray redelivery show itself before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let runs = log.runs();
    let mut per_job: BTreeMap<String, usize> = BTreeMap::new();
    for r in &runs {
        *per_job.entry(r.job_id.clone()).or_default() += 1;
    }
    assert_eq!(per_job.len(), 200);
    assert!(
        per_job.values().all(|n| *n == 1),
        "a job ran more than once: {:?}",
        per_job.iter().filter(|(_, n)| **n > 1).collect::<Vec<_>>()
    );
    let agents: HashSet<&str> = runs.iter().map(|r| r.agent.as_str()).collect();
    assert_eq!(agents.len(), 2, "both agents took work: {agents:?}");
    for id in job_ids.iter().take(20) {
        assert_eq!(record(&client, id).await["state"], "succeeded");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_watched_by_two_agents_gives_one_job_per_fire() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    // Two schedules in one agent, one of them jittered: every fire of each, once.
    let schedule = r#"
[acceptance]

[[schedules]]
name = "every-two-seconds"
cron = "*/2 * * * * *"
command = "acceptance"

[[schedules]]
name = "every-three-seconds"
cron = "*/3 * * * * *"
jitter = "1s"
command = "acceptance"
"#;
    let handler = |log: RunLog| {
        move |r: &mut infraflux_handlers::Registry| {
            r.register(Arc::new(TestHandler::new(
                JobKind::ACCEPTANCE,
                Behaviour::Sleep(Duration::from_millis(10)),
                log,
            )))
        }
    };
    let a = start_agent(&nats, "sched-a", schedule, handler(log.clone())).await;
    let b = start_agent(&nats, "sched-b", schedule, handler(log.clone())).await;
    let client = nats.client().await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    a.stop().await;
    b.stop().await;

    let jobs = all_records(&client).await;
    for (name, period) in [("every-two-seconds", 2i64), ("every-three-seconds", 3)] {
        let mut per_fire: BTreeMap<i64, usize> = BTreeMap::new();
        for j in jobs
            .iter()
            .filter(|j| j["requested_by"] == format!("schedule:{name}"))
        {
            assert_eq!(j["source"], "schedule");
            let fire = chrono::DateTime::parse_from_rfc3339(
                j["params"]["fire_time"].as_str().expect("fire"),
            )
            .expect("rfc3339");
            let created =
                chrono::DateTime::parse_from_rfc3339(j["created_at"].as_str().expect("created_at"))
                    .expect("rfc3339");
            assert!(created >= fire, "submitted no earlier than its fire: {j}");
            *per_fire.entry(fire.timestamp()).or_default() += 1;
        }
        assert!(
            per_fire.len() as i64 >= 9 / period - 1,
            "{name} fires every {period}s for 9s: {per_fire:?}"
        );
        assert!(
            per_fire.values().all(|n| *n == 1),
            "{name}: one job per fire: {per_fire:?}"
        );
        let times: Vec<i64> = per_fire.keys().copied().collect();
        assert!(
            times.windows(2).all(|w| w[1] - w[0] == period),
            "{name}: no fire skipped: {times:?}"
        );
    }
    let runs = log.runs();
    let distinct: HashSet<&str> = runs.iter().map(|r| r.job_id.as_str()).collect();
    assert_eq!(distinct.len(), runs.len(), "each scheduled job ran once");
}
