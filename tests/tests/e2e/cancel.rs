//! `cancel <id>` reaches whichever agent runs the job; a child process gets SIGINT.

use std::sync::Arc;
use std::time::Duration;

use infraflux_handlers::{JobKind, LockRequest};
use infraflux_tests::handlers::{Behaviour, RunLog, TestHandler};
use infraflux_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_sends_sigint_to_its_child_and_ends_it_cancelled() {
    init();
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let started = dir.path().join("started");
    let got_int = dir.path().join("got-int");
    let script = format!(
        "trap 'echo SIGINT > {int}; exit 130' INT; echo up > {up}; sleep 60 & wait",
        int = got_int.display(),
        up = started.display()
    );
    let log = RunLog::default();
    // Two agents: the cancel is sent to whichever answers the command, the job runs on either.
    let mk = |log: RunLog, script: String| {
        move |r: &mut infraflux_handlers::Registry| {
            r.register(Arc::new(TestHandler::new(
                JobKind::ACCEPTANCE,
                Behaviour::Child(script),
                log,
            )))
        }
    };
    let a = start_agent(
        &nats,
        "cancel-a",
        "[acceptance]\n",
        mk(log.clone(), script.clone()),
    )
    .await;
    let b = start_agent(&nats, "cancel-b", "[acceptance]\n", mk(log.clone(), script)).await;
    let client = nats.client().await;
    let job_id = submit(&client, "acceptance").await;
    wait_for(
        Duration::from_secs(15),
        "the child process to start",
        || async { started.exists().then_some(()) },
    )
    .await;
    let reply = command_as(&client, &format!("cancel {job_id}"), "bob").await;
    assert_eq!(reply["ok"], true, "{reply}");
    let done = wait_settled(&client, &job_id, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert_eq!(done["message"], "cancelled by bob");
    assert_eq!(
        std::fs::read_to_string(&got_int).expect("the child saw SIGINT"),
        "SIGINT\n"
    );
    assert_eq!(log.runs_of(&job_id).len(), 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_job_that_waits_for_a_lock_ends_it_without_running_it() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let l = log.clone();
    let agent = start_agent(&nats, "cancel-w", "[backup]\n", move |r| {
        r.register(Arc::new(
            TestHandler::new(JobKind::BACKUP, Behaviour::Sleep(Duration::from_secs(3)), l)
                .with_locks(vec![LockRequest::write("cluster:lab")]),
        ))
    })
    .await;
    let client = nats.client().await;
    let first = submit(&client, "backup ns=a").await;
    let second = submit(&client, "backup ns=b").await;
    wait_for(Duration::from_secs(10), "one job to wait", || async {
        let (r1, r2) = (
            record(&client, &first).await,
            record(&client, &second).await,
        );
        (r1["state"] == "waiting" || r2["state"] == "waiting").then_some(())
    })
    .await;
    let waiting = if record(&client, &first).await["state"] == "waiting" {
        first.clone()
    } else {
        second.clone()
    };
    let reply = command(&client, &format!("cancel {waiting}")).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let done = wait_settled(&client, &waiting, Duration::from_secs(10)).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(
        log.runs_of(&waiting).is_empty(),
        "a cancelled waiting job never ran"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_kinds_timeout_is_cancelled_and_fails() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let l = log.clone();
    let agent = start_agent(&nats, "timeout-1", "[acceptance]\n", move |r| {
        r.register(Arc::new(
            TestHandler::new(
                JobKind::ACCEPTANCE,
                Behaviour::Sleep(Duration::from_secs(30)),
                l,
            )
            .with_timeout(Duration::from_millis(500)),
        ))
    })
    .await;
    let client = nats.client().await;
    let job_id = submit(&client, "acceptance").await;
    let done = wait_settled(&client, &job_id, Duration::from_secs(15)).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["message"], "timed out after 500ms");
    assert!(
        log.runs_of(&job_id)[0].cancelled,
        "the handler saw its token fire"
    );
    agent.stop().await;
}

/// A child that ignores SIGINT and hangs: at the kind's timeout it gets SIGINT, then SIGKILL
/// (with everything it started) after `kill_grace`; the job fails as timed out and its lock is
/// free for the job waiting on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_child_that_ignores_sigint_is_killed_after_the_grace_and_its_lock_freed() {
    init();
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (shell_pid, sleep_pid) = (dir.path().join("shell"), dir.path().join("sleep"));
    let script = format!(
        "trap '' INT; sleep 600 & echo $! > {sleep}; echo $$ > {shell}; wait; wait",
        sleep = sleep_pid.display(),
        shell = shell_pid.display()
    );
    let log = RunLog::default();
    let (hung_log, waiting_log) = (log.clone(), log.clone());
    let agent = start_agent_with_env(
        &nats,
        "hung-1",
        "[backup]\n[acceptance]\n",
        &[("INFRAFLUX_AGENT__KILL_GRACE", "1s")],
        move |r| {
            r.register(Arc::new(
                TestHandler::new(JobKind::BACKUP, Behaviour::Child(script), hung_log)
                    .with_locks(vec![LockRequest::write("cluster:lab")])
                    .with_timeout(Duration::from_secs(2)),
            ));
            r.register(Arc::new(
                TestHandler::new(
                    JobKind::ACCEPTANCE,
                    Behaviour::Sleep(Duration::from_millis(50)),
                    waiting_log,
                )
                .with_locks(vec![LockRequest::write("cluster:lab")]),
            ));
        },
    )
    .await;
    let client = nats.client().await;
    let started = std::time::Instant::now();
    let hung = submit(&client, "backup ns=a").await;
    let pid = |path: std::path::PathBuf| async move {
        wait_for(Duration::from_secs(10), "the child's pid", || async {
            std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
        })
        .await
    };
    let (shell, sleep) = (pid(shell_pid).await, pid(sleep_pid).await);
    let waiting = submit(&client, "acceptance").await;
    wait_for(Duration::from_secs(5), "the second job to wait", || async {
        (record(&client, &waiting).await["state"] == "waiting").then_some(())
    })
    .await;
    assert!(process_alive(shell) && process_alive(sleep));

    let done = wait_settled(&client, &hung, Duration::from_secs(20)).await;
    let took = started.elapsed();
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["message"], "timed out after 2s");
    // SIGINT did nothing; SIGKILL came a grace later.
    assert!(took >= Duration::from_secs(3), "ended after {took:?}");
    wait_for(
        Duration::from_secs(5),
        "the child and its own child to die",
        || async { (!process_alive(shell) && !process_alive(sleep)).then_some(()) },
    )
    .await;
    let next = wait_settled(&client, &waiting, Duration::from_secs(10)).await;
    assert_eq!(next["state"], "succeeded", "{next}");
    agent.stop().await;
}

/// A job its own agent ingested is started from the record ingest handed over, not read
/// back; a cancel while it was queued still ends it without running it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_while_queued_never_runs_when_its_own_agent_picks_it_up() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let l = log.clone();
    let agent = start_agent(&nats, "cancel-queued", "[acceptance]\n", move |r| {
        r.register(Arc::new(TestHandler::new(
            JobKind::ACCEPTANCE,
            Behaviour::Sleep(Duration::from_secs(3)),
            l,
        )))
    })
    .await;
    let client = nats.client().await;
    // The agent's four slots (`concurrency = 4`) are busy: the fifth job stays queued.
    let mut busy = Vec::new();
    for _ in 0..4 {
        busy.push(submit(&client, "acceptance").await);
    }
    for job in &busy {
        wait_state(&client, job, "running").await;
    }
    let queued = submit(&client, "acceptance").await;
    let reply = command_as(&client, &format!("cancel {queued}"), "bob").await;
    assert_eq!(reply["ok"], true, "{reply}");
    for job in &busy {
        let done = wait_settled(&client, job, Duration::from_secs(20)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
    // Its message is delivered once the slots free up (within seconds of its ingest), and
    // acknowledged without a run.
    let js = async_nats::jetstream::new(client.clone());
    wait_for(
        Duration::from_secs(15),
        "the job queue to empty",
        || async {
            let mut stream = js.get_stream("INFRAFLUX_JOBS").await.ok()?;
            (stream.info().await.ok()?.state.messages == 0).then_some(())
        },
    )
    .await;
    let done = record(&client, &queued).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert_eq!(done["message"], "cancelled by bob", "{done}");
    assert_eq!(done["attempts"], 0, "{done}");
    assert!(log.runs_of(&queued).is_empty(), "the cancelled job ran");
    agent.stop().await;
}
