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

/// Each agent writes a kind's last result from the entry it last wrote, without reading it
/// first. A success another agent wrote since is never lost by it: the compare-and-set is
/// refused, the entry read and merged. A result older than the stored one never replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_success_written_by_another_agent_is_kept_by_a_failure_written_from_memory() {
    use infraflux_agent::records::{JobRecord, JobState, Records};
    use infraflux_agent::store::Names;
    use infraflux_handlers::{JobEnvelope, Source};
    init();
    let nats = Nats::start();
    // An agent creates the buckets as in production; it runs no job here.
    let _agent = start_agent(&nats, "last-memory", "", |_| {}).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let names = Names::new("infraflux");
    let records_kv = js.get_key_value(&names.bucket_records).await.expect("jobs");
    let state = js.get_key_value(&names.bucket_state).await.expect("state");
    let agent = || Records::new(records_kv.clone(), js.clone(), names.clone(), state.clone());
    let (a, b) = (agent(), agent());
    let t0 = chrono::Utc::now();
    let ended = |id: &str, state: JobState, seconds: i64| {
        let mut r = JobRecord::new(
            &JobEnvelope {
                job_id: id.to_string(),
                kind: JobKind::BACKUP,
                params: Default::default(),
                source: Source::Chatops,
                requested_by: "test".into(),
                idempotency_key: id.to_string(),
                traceparent: None,
                commit: None,
                created_at: t0,
            },
            "trace",
        );
        r.state = state;
        r.updated_at = t0 + chrono::Duration::seconds(seconds);
        r
    };
    let stored = || async {
        let v = state
            .get("last.backup")
            .await
            .expect("get")
            .expect("last.backup");
        serde_json::from_slice::<serde_json::Value>(&v).expect("json")
    };
    let success_at = |last: &serde_json::Value| {
        let at: chrono::DateTime<chrono::Utc> = last["last_success_at"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no last success: {last}"));
        (at - t0).num_seconds()
    };

    a.record_last_result(&ended("job-1", JobState::Succeeded, 1), None)
        .await;
    b.record_last_result(&ended("job-2", JobState::Succeeded, 2), None)
        .await;
    // a remembers job-1's entry; b wrote since.
    a.record_last_result(&ended("job-3", JobState::Failed, 3), None)
        .await;
    let last = stored().await;
    assert_eq!(last["job_id"], "job-3", "{last}");
    assert_eq!(last["state"], "failed", "{last}");
    assert_eq!(success_at(&last), 2, "b's success carried: {last}");

    // From memory, with nobody writing in between: still carried.
    a.record_last_result(&ended("job-4", JobState::Failed, 4), None)
        .await;
    let last = stored().await;
    assert_eq!(last["job_id"], "job-4", "{last}");
    assert_eq!(success_at(&last), 2, "{last}");

    // A job that ended before the stored one (a slow agent): the newer result stays, and its
    // success, newer than the stored one's, is taken.
    b.record_last_result(&ended("job-0", JobState::Succeeded, 3), None)
        .await;
    let last = stored().await;
    assert_eq!(last["job_id"], "job-4", "the newer result stays: {last}");
    assert_eq!(success_at(&last), 3, "{last}");
}
