//! What the handler platform gives every kind: a directory per job, deferral to a time,
//! checkpoints across agents, soft cancel, follow-ups and look-ups.

use std::sync::Arc;
use std::time::{Duration, Instant};

use infraflux_handlers::{JobKind, LockRequest};
use infraflux_tests::handlers::{Behaviour, RunLog, TestHandler};
use infraflux_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_has_its_own_directory_removed_when_it_ends() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let l = log.clone();
    let agent = start_agent(&nats, "dir-a", "[backup]\n", move |r| {
        r.register(Arc::new(TestHandler::new(
            JobKind::BACKUP,
            Behaviour::FlakyUntil(2),
            l,
        )))
    })
    .await;
    let client = nats.client().await;
    let one = submit(&client, "backup ns=a").await;
    let two = submit(&client, "backup ns=b").await;
    for job in [&one, &two] {
        let done = wait_settled(&client, job, Duration::from_secs(20)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
    let runs = log.runs();
    assert_eq!(runs.len(), 4, "two attempts each: {runs:?}");
    for run in &runs {
        assert!(run.work_dir_usable, "{run:?}");
        assert!(run.work_dir.ends_with(&run.job_id), "{run:?}");
        assert!(!run.work_dir.exists(), "left behind: {run:?}");
    }
    assert_ne!(log.runs_of(&one)[0].work_dir, log.runs_of(&two)[0].work_dir);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_job_waits_holding_nothing_and_runs_at_its_time() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let (l1, l2) = (log.clone(), log.clone());
    let sections = "[upgrade]\n[backup]\n";
    let agent = start_agent(&nats, "defer-a", sections, move |r| {
        r.register(Arc::new(
            TestHandler::new(
                JobKind::UPGRADE,
                Behaviour::Sleep(Duration::from_millis(100)),
                l1,
            )
            .with_locks(vec![LockRequest::write("cluster:lab")])
            .deferred(Duration::from_secs(4), "outside the maintenance window"),
        ));
        r.register(Arc::new(
            TestHandler::new(
                JobKind::BACKUP,
                Behaviour::Sleep(Duration::from_millis(100)),
                l2,
            )
            .with_locks(vec![LockRequest::read("cluster:lab")]),
        ));
    })
    .await;
    let client = nats.client().await;
    let submitted = Instant::now();
    let upgrade = submit(&client, "upgrade talos v1.13.0").await;
    let waiting = wait_state(&client, &upgrade, "waiting").await;
    assert!(
        waiting["message"]
            .as_str()
            .unwrap_or_default()
            .contains("outside the maintenance window"),
        "{waiting}"
    );
    assert!(waiting["not_before"].is_string(), "{waiting}");
    assert_eq!(
        waiting["attempts"], 0,
        "its timeout has not started: {waiting}"
    );
    let status = status_showing(&client, "deferred: upgrade").await;
    assert!(
        status["message"]
            .as_str()
            .unwrap_or_default()
            .contains("locks: none held"),
        "a deferred job holds no lock: {status}"
    );
    // It holds no lock: a job on the same resource runs meanwhile.
    let backup = submit(&client, "backup").await;
    let done = wait_settled(&client, &backup, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(record(&client, &upgrade).await["state"], "waiting");

    let done = wait_settled(&client, &upgrade, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 1, "a deferral is no interruption: {done}");
    assert!(done["not_before"].is_null(), "{done}");
    let run = &log.runs_of(&upgrade)[0];
    assert!(!run.interrupted, "{run:?}");
    assert!(
        run.started >= submitted + Duration::from_secs(3),
        "ran before its time"
    );
    status_showing(&client, "last results").await;
    let status = command(&client, "status").await;
    assert!(
        !status["message"]
            .as_str()
            .unwrap_or_default()
            .contains("deferred:"),
        "{status}"
    );

    // Cancelling a deferred job ends it at once: nobody holds it.
    let later = submit(&client, "upgrade talos v1.13.1").await;
    wait_state(&client, &later, "waiting").await;
    let reply = command(&client, &format!("cancel {later}")).await;
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(record(&client, &later).await["state"], "cancelled");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_lets_another_agent_resume_an_interrupted_job() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let handler = |log: RunLog| {
        move |r: &mut infraflux_handlers::Registry| {
            r.register(Arc::new(TestHandler::new(
                JobKind::UPGRADE,
                Behaviour::Checkpointed,
                log,
            )))
        }
    };
    let first = start_agent(&nats, "ckpt-a", "[upgrade]\n", handler(log.clone())).await;
    let client = nats.client().await;
    let job = submit(&client, "upgrade talos v1.13.0").await;
    wait_for(Duration::from_secs(20), "the checkpoint", || async {
        let r = record(&client, &job).await;
        (r["checkpoint"] == json!({"step": 1})).then_some(())
    })
    .await;
    first.stop().await;
    let second = start_agent(&nats, "ckpt-b", "[upgrade]\n", handler(log.clone())).await;
    let done = wait_settled(&client, &job, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["message"], r#"resumed from {"step":1}"#, "{done}");
    let runs = log.runs_of(&job);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[1].agent, "ckpt-b");
    assert!(runs[1].interrupted);
    assert_eq!(runs[1].checkpoint, Some(json!({"step": 1})));
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_lets_a_handler_stop_at_a_safe_point_then_stops_it_hard() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let (l1, l2) = (log.clone(), log.clone());
    let agent = start_agent(&nats, "soft-a", "[upgrade]\n[backup]\n", move |r| {
        // Stops at its next step boundary, well within its grace.
        r.register(Arc::new(
            TestHandler::new(
                JobKind::UPGRADE,
                Behaviour::SafePoints(Duration::from_millis(300)),
                l1,
            )
            .with_cancel_grace(Duration::from_secs(30)),
        ));
        // Never looks at the soft request: stopped hard once its grace is over.
        r.register(Arc::new(
            TestHandler::new(
                JobKind::BACKUP,
                Behaviour::Sleep(Duration::from_secs(120)),
                l2,
            )
            .with_cancel_grace(Duration::from_secs(1)),
        ));
    })
    .await;
    let client = nats.client().await;
    let soft = submit(&client, "upgrade talos v1.13.0").await;
    let hard = submit(&client, "backup").await;
    wait_state(&client, &soft, "running").await;
    wait_state(&client, &hard, "running").await;
    for job in [&soft, &hard] {
        let reply = command(&client, &format!("cancel {job}")).await;
        assert_eq!(reply["ok"], true, "{reply}");
    }
    for job in [&soft, &hard] {
        let done = wait_settled(&client, job, Duration::from_secs(20)).await;
        assert_eq!(done["state"], "cancelled", "{done}");
    }
    let soft_run = &log.runs_of(&soft)[0];
    assert!(soft_run.stopped_softly, "{soft_run:?}");
    let hard_run = &log.runs_of(&hard)[0];
    assert!(
        hard_run.cancelled && !hard_run.stopped_softly,
        "{hard_run:?}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_looks_up_the_newest_job_and_queues_one_follow_up_across_retries() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let (l1, l2, l3) = (log.clone(), log.clone(), log.clone());
    let sections = "[backup]\n[upgrade]\n[acceptance]\n";
    let agent = start_agent(&nats, "follow-a", sections, move |r| {
        r.register(Arc::new(TestHandler::new(
            JobKind::BACKUP,
            Behaviour::Sleep(Duration::from_millis(50)),
            l1,
        )));
        r.register(Arc::new(TestHandler::new(
            JobKind::UPGRADE,
            Behaviour::FollowUp {
                look_for: JobKind::BACKUP,
                follow: JobKind::ACCEPTANCE,
            },
            l2,
        )));
        r.register(Arc::new(TestHandler::new(
            JobKind::ACCEPTANCE,
            Behaviour::Sleep(Duration::from_millis(50)),
            l3,
        )));
    })
    .await;
    let client = nats.client().await;
    let older = submit(&client, "backup ns=a").await;
    wait_settled(&client, &older, Duration::from_secs(20)).await;
    let newest = submit(&client, "backup ns=b").await;
    wait_settled(&client, &newest, Duration::from_secs(20)).await;

    let parent = submit(&client, "upgrade talos v1.13.0").await;
    let done = wait_settled(&client, &parent, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["result"]["found"], newest.as_str(), "{done}");
    let follow_up = done["result"]["follow_up"]
        .as_str()
        .expect("id")
        .to_string();
    let runs = log.runs_of(&parent);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(
        runs[0].follow_ups, runs[1].follow_ups,
        "one follow-up across retries"
    );

    let child = wait_settled(&client, &follow_up, Duration::from_secs(20)).await;
    assert_eq!(child["state"], "succeeded", "{child}");
    assert_eq!(child["kind"], "acceptance");
    assert_eq!(child["source"], "follow-up");
    assert_eq!(child["requested_by"], format!("upgrade {parent}"));
    assert_eq!(child["trace_id"], done["trace_id"], "the parent's trace");
    let acceptances = all_records(&client)
        .await
        .into_iter()
        .filter(|r| r["kind"] == "acceptance")
        .count();
    assert_eq!(acceptances, 1);
    agent.stop().await;
}
