//! One lock manager across kinds: jobs on one resource run one after the other.

use std::sync::Arc;
use std::time::Duration;

use infraflux_handlers::{JobKind, LockRequest};
use infraflux_tests::handlers::{Behaviour, RunLog, TestHandler};
use infraflux_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_on_one_resource_run_one_after_the_other_and_the_second_waits_visibly() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    // Different kinds, one resource: an upgrade's write lock excludes a backup's read lock.
    let handlers = |log: RunLog| {
        move |r: &mut infraflux_handlers::Registry| {
            r.register(Arc::new(
                TestHandler::new(
                    JobKind::UPGRADE,
                    Behaviour::Sleep(Duration::from_secs(2)),
                    log.clone(),
                )
                .with_locks(vec![LockRequest::write("cluster:lab")]),
            ));
            r.register(Arc::new(
                TestHandler::new(
                    JobKind::BACKUP,
                    Behaviour::Sleep(Duration::from_millis(300)),
                    log,
                )
                .with_locks(vec![LockRequest::read("cluster:lab")]),
            ));
        }
    };
    let sections = "[upgrade]\n[backup]\n";
    let a = start_agent(&nats, "lock-a", sections, handlers(log.clone())).await;
    let b = start_agent(&nats, "lock-b", sections, handlers(log.clone())).await;
    let client = nats.client().await;
    let events = EventLog::subscribe(&client).await;

    let first = submit(&client, "upgrade talos v1.13.0").await;
    wait_state(&client, &first, "running").await;
    // Status shows the holder.
    status_showing(&client, "cluster:lab").await;
    let second = submit(&client, "backup").await;
    let waiting = wait_for(Duration::from_secs(10), "the backup to wait", || async {
        let r = record(&client, &second).await;
        (r["state"] == "waiting").then_some(r)
    })
    .await;
    assert!(
        waiting["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("held by job {first}")),
        "{waiting}"
    );

    let done = wait_settled(&client, &second, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded");
    assert_eq!(record(&client, &first).await["state"], "succeeded");
    let upgrade = &log.runs_of(&first)[0];
    let backup = &log.runs_of(&second)[0];
    assert!(
        backup.started >= upgrade.ended.expect("upgrade ended"),
        "the backup started only after the upgrade ended"
    );
    let states = events.states_of(&second);
    assert!(states.contains(&"waiting".to_string()), "{states:?}");
    status_showing(&client, "locks: none held").await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_locks_share_a_resource() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let l = log.clone();
    let a = start_agent(&nats, "read-a", "[backup]\n", move |r| {
        r.register(Arc::new(
            TestHandler::new(JobKind::BACKUP, Behaviour::Sleep(Duration::from_secs(1)), l)
                .with_locks(vec![LockRequest::read("cluster:lab")]),
        ))
    })
    .await;
    let client = nats.client().await;
    let one = submit(&client, "backup ns=a").await;
    let two = submit(&client, "backup ns=b").await;
    wait_settled(&client, &one, Duration::from_secs(20)).await;
    wait_settled(&client, &two, Duration::from_secs(20)).await;
    let (r1, r2) = (&log.runs_of(&one)[0], &log.runs_of(&two)[0]);
    let overlap = r1.started < r2.ended.expect("ended") && r2.started < r1.ended.expect("ended");
    assert!(overlap, "two readers ran at the same time");
    a.stop().await;
}

/// The keys of the locks bucket that hold a value (deleted and purged keys are not listed).
async fn lock_keys(client: &async_nats::Client) -> Vec<String> {
    use futures::StreamExt;
    let js = async_nats::jetstream::new(client.clone());
    let kv = js
        .get_key_value("infraflux-locks")
        .await
        .expect("locks bucket");
    let mut keys = kv.keys().await.expect("keys");
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        out.push(key.expect("key"));
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_its_job_releases_its_locks_and_the_agent_goes_on() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let l = log.clone();
    let agent = start_agent(&nats, "panic-a", "[backup]\n[upgrade]\n", move |r| {
        r.register(Arc::new(
            TestHandler::new(
                JobKind::BACKUP,
                Behaviour::Panic("a bug in the backup handler".into()),
                l.clone(),
            )
            .with_locks(vec![LockRequest::write("cluster:lab")]),
        ));
        r.register(Arc::new(
            TestHandler::new(
                JobKind::UPGRADE,
                Behaviour::Sleep(Duration::from_millis(100)),
                l,
            )
            .with_locks(vec![LockRequest::write("cluster:lab")]),
        ));
    })
    .await;
    let client = nats.client().await;
    let panicked = submit(&client, "backup").await;
    let failed = wait_settled(&client, &panicked, Duration::from_secs(20)).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("internal error"), "{failed}");
    assert!(
        !message.contains("a bug in"),
        "panic detail is for the logs: {failed}"
    );

    // The lock is free: a job on the same resource runs, on the same (still running) agent.
    let next = submit(&client, "upgrade talos v1.13.0").await;
    let done = wait_settled(&client, &next, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(log.runs_of(&next)[0].agent, "panic-a");
    // Nothing is left behind in the lock bucket: no entry per finished job or resource.
    wait_for(
        Duration::from_secs(10),
        "the lock bucket to be empty",
        || async {
            let keys = lock_keys(&client).await;
            keys.is_empty().then_some(()).or_else(|| {
                eprintln!("lock keys still present: {keys:?}");
                None
            })
        },
    )
    .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_writer_is_not_starved_by_readers_that_keep_coming() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let l = log.clone();
    let agent = start_agent(&nats, "fair-a", "[backup]\n[upgrade]\n", move |r| {
        r.register(Arc::new(
            TestHandler::new(
                JobKind::BACKUP,
                Behaviour::Sleep(Duration::from_secs(2)),
                l.clone(),
            )
            .with_locks(vec![LockRequest::read("cluster:lab")]),
        ));
        r.register(Arc::new(
            TestHandler::new(
                JobKind::UPGRADE,
                Behaviour::Sleep(Duration::from_millis(500)),
                l,
            )
            .with_locks(vec![LockRequest::write("cluster:lab")]),
        ));
    })
    .await;
    let client = nats.client().await;
    let first_reader = submit(&client, "backup ns=a").await;
    wait_state(&client, &first_reader, "running").await;
    let writer = submit(&client, "upgrade talos v1.13.0").await;
    wait_state(&client, &writer, "waiting").await;
    // A reader that comes while the writer waits would share the lock with the first reader;
    // it must wait for the writer instead.
    let late_reader = submit(&client, "backup ns=b").await;
    for job in [&first_reader, &writer, &late_reader] {
        let done = wait_settled(&client, job, Duration::from_secs(30)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
    }
    let (w, late) = (&log.runs_of(&writer)[0], &log.runs_of(&late_reader)[0]);
    assert!(
        late.started >= w.ended.expect("writer ended"),
        "the late reader started before the waiting writer ran"
    );
    let first = &log.runs_of(&first_reader)[0];
    assert!(w.started >= first.ended.expect("first reader ended"));
    agent.stop().await;
}

/// A lock manager renews and releases from what it last wrote, without reading first; what
/// another agent wrote since is never lost by it: the compare-and-set is refused and the
/// entry read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_or_releasing_from_memory_never_loses_what_another_agent_wrote_since() {
    use infraflux_agent::locks::{Acquire, LockError, LockManager, Owner};
    init();
    let nats = Nats::start();
    // An agent creates the locks bucket as in production; its own jobs touch no lock here.
    let agent = start_agent(&nats, "lock-memory", "", |_| {}).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let kv = js.get_key_value("infraflux-locks").await.expect("bucket");
    let holders = |kv: async_nats::jetstream::kv::Store, key: &'static str| async move {
        match kv.entry(key).await.expect("entry") {
            Some(e) if e.operation == async_nats::jetstream::kv::Operation::Put => {
                let v: serde_json::Value = serde_json::from_slice(&e.value).expect("json");
                let mut owners: Vec<String> = v["holders"]
                    .as_array()
                    .expect("holders")
                    .iter()
                    .map(|h| h["job_id"].as_str().expect("job id").to_string())
                    .collect();
                owners.sort();
                owners
            }
            _ => vec![],
        }
    };
    let a = LockManager::new(kv.clone(), "agent-a".into(), Duration::from_secs(30));
    let b = LockManager::new(kv.clone(), "agent-b".into(), Duration::from_secs(30));

    // A reader on each agent; a leaves after b came in: b keeps its place.
    let shared = [LockRequest::read("cluster:lab")];
    let (reader_a, reader_b) = (
        Owner::new("job-a", "agent-a"),
        Owner::new("job-b", "agent-b"),
    );
    assert_eq!(
        a.try_acquire_all(&shared, &reader_a).await.expect("a"),
        Acquire::Acquired
    );
    assert_eq!(
        b.try_acquire_all(&shared, &reader_b).await.expect("b"),
        Acquire::Acquired
    );
    a.renew_all(&shared, &reader_a)
        .await
        .expect("a renews beside b");
    assert_eq!(holders(kv.clone(), "cluster.lab").await, ["job-a", "job-b"]);
    a.release_all(&shared, &reader_a).await;
    assert_eq!(holders(kv.clone(), "cluster.lab").await, ["job-b"]);
    b.release_all(&shared, &reader_b).await;
    assert!(holders(kv.clone(), "cluster.lab").await.is_empty());

    // A lease that expired and was taken over: its first holder's renewal is refused as lost,
    // and its release leaves the new holder's lease alone.
    let short = LockManager::new(kv.clone(), "agent-a".into(), Duration::from_millis(300));
    let lease = [LockRequest::write("job:lease-1")];
    let (first, second) = (
        Owner::new("first", "agent-a"),
        Owner::new("second", "agent-b"),
    );
    assert_eq!(
        short.try_lease(&lease[0], &first).await.expect("lease"),
        Acquire::Acquired
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        b.try_lease(&lease[0], &second).await.expect("take over"),
        Acquire::Acquired
    );
    let renewed = short.renew_all(&lease, &first).await;
    assert!(matches!(renewed, Err(LockError::Lost(_))), "{renewed:?}");
    short.release_all(&lease, &first).await;
    assert_eq!(holders(kv.clone(), "job.lease-1").await, ["second"]);
    b.release_all(&lease, &second).await;
    assert!(holders(kv, "job.lease-1").await.is_empty());
    agent.stop().await;
}
