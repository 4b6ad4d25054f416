//! ChatOps over NATS: every builtin, refusals that name the problem, nothing reaches a shell.

use std::time::Duration;

use infraflux_handlers::JobKind;
use infraflux_tests::handlers::{Behaviour, RunLog, TestHandler};
use infraflux_tests::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_builtin_answers() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let l = log.clone();
    let agent = start_agent(
        &nats,
        "chat-1",
        "[backup]\n",
        TestHandler::new(
            JobKind::BACKUP,
            Behaviour::Sleep(Duration::from_millis(100)),
            l,
        )
        .install(),
    )
    .await;
    let client = nats.client().await;

    let help = command(&client, "help").await;
    assert_eq!(help["ok"], true);
    for verb in [
        "status",
        "jobs",
        "job <id>",
        "cancel <id>",
        "backup [ns=a,b] [ttl=72h]",
        "upgrade talos <version>",
    ] {
        assert!(
            help["message"].as_str().unwrap_or_default().contains(verb),
            "help lacks {verb}: {help}"
        );
    }
    let help_backup = command(&client, "help backup").await;
    assert!(
        help_backup["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("backup [ns=a,b]")
    );

    let queued = command_as(&client, "backup ns=media,home ttl=72h", "alice").await;
    assert_eq!(queued["ok"], true, "{queued}");
    let job_id = queued["job_id"].as_str().expect("job id").to_string();
    assert_eq!(
        queued["trace_id"].as_str().map(str::len),
        Some(32),
        "{queued}"
    );
    let done = wait_settled(&client, &job_id, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["requested_by"], "alice");
    assert_eq!(done["source"], "chatops");
    assert_eq!(
        done["params"],
        json!({"namespaces": ["media", "home"], "ttl_seconds": 259200})
    );
    assert_eq!(done["trace_id"], queued["trace_id"]);

    let jobs = command(&client, "jobs kind=backup limit=5").await;
    assert_eq!(jobs["ok"], true);
    assert_eq!(jobs["jobs"][0]["job_id"], job_id.as_str(), "{jobs}");
    let none = command(&client, "jobs kind=upgrade").await;
    assert_eq!(none["jobs"], json!([]));

    let job = command(&client, &format!("job {job_id}")).await;
    assert_eq!(job["job"]["state"], "succeeded");
    assert!(
        job["message"]
            .as_str()
            .unwrap_or_default()
            .contains("state: succeeded")
    );

    let status = status_showing(&client, "backup: succeeded").await;
    assert_eq!(status["ok"], true, "{status}");
    let s = &status["status"];
    assert_eq!(s["agents"][0]["agent"], "chat-1", "{status}");
    assert_eq!(s["last"]["backup"]["state"], "succeeded", "{status}");
    assert_eq!(s["last"]["backup"]["job_id"], job_id.as_str());
    assert!(s["queue"]["pending"].is_u64());
    assert!(
        status["message"]
            .as_str()
            .unwrap_or_default()
            .contains("agents alive: 1")
    );

    // Cancel: a finished job refuses, a queued one is cancelled.
    let refused = command(&client, &format!("cancel {job_id}")).await;
    assert_eq!(refused["ok"], false);
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or_default()
            .contains("already succeeded"),
        "{refused}"
    );
    let missing = command(&client, "cancel 01jd0000000000000000000000").await;
    assert!(
        missing["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not found")
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_problem_and_nothing_reaches_a_shell() {
    init();
    let nats = Nats::start();
    let agent = start_agent(&nats, "chat-2", "[backup]\n", |_| {}).await;
    let client = nats.client().await;
    let marker = agent.dir.path().join("pwned");
    let cases: Vec<(String, &str)> = vec![
        ("frobnicate".into(), "unknown command \"frobnicate\""),
        ("bakup".into(), "did you mean `backup`"),
        ("backup ns=Media".into(), "\"Media\""),
        ("backup ttl=later".into(), "invalid ttl \"later\""),
        ("backup pool=fast".into(), "no option \"pool\""),
        ("upgrade talos 1.x".into(), "invalid version \"1.x\""),
        ("snapshot".into(), "etcd-snapshot is not configured"),
        (format!("backup ns=$(touch {})", marker.display()), "'$'"),
        (format!("backup ns=a;touch {}", marker.display()), "';'"),
        (format!("backup `touch {}`", marker.display()), "'`'"),
        (format!("backup ns=a|touch {}", marker.display()), "'|'"),
    ];
    for (text, needle) in &cases {
        // Sent to the subject of its own first word, as a chat bridge would.
        let verb = text
            .split(|c: char| !c.is_ascii_alphanumeric())
            .next()
            .unwrap_or_default();
        let reply = client
            .request(
                format!("infraflux.cmd.{verb}"),
                text.clone().into_bytes().into(),
            )
            .await
            .expect("reply");
        let reply: Value = serde_json::from_slice(&reply.payload).expect("json");
        assert_eq!(reply["ok"], false, "{text}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(needle),
            "{text:?}: {error:?} should contain {needle:?}"
        );
    }
    assert!(!marker.exists(), "a command reached a shell");

    // An alias is answered on its verb's subject, and only there.
    for (subject, text, accepted) in [
        ("infraflux.cmd.snapshot", "etcd-snapshot", true),
        ("infraflux.cmd.etcd-snapshot", "etcd-snapshot", false),
    ] {
        let reply = client.request(subject, text.into()).await.expect("reply");
        let reply: Value = serde_json::from_slice(&reply.payload).expect("json");
        let error = reply["error"].as_str().unwrap_or_default();
        if accepted {
            assert!(error.contains("etcd-snapshot is not configured"), "{reply}");
        } else {
            assert!(
                error.contains("send it to infraflux.cmd.snapshot"),
                "{reply}"
            );
        }
    }

    // The verb in the subject is the verb of the command: permissions on subjects hold.
    let smuggled = client
        .request("infraflux.cmd.status", "backup ns=media".into())
        .await
        .expect("reply");
    let smuggled: Value = serde_json::from_slice(&smuggled.payload).expect("json");
    assert_eq!(smuggled["ok"], false);
    assert!(
        smuggled["error"]
            .as_str()
            .unwrap_or_default()
            .contains("infraflux.cmd.backup"),
        "{smuggled}"
    );

    let jobs = command(&client, "jobs").await;
    assert_eq!(jobs["jobs"], json!([]), "no refused command made a job");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retryable_failure_is_retried_with_backoff_and_recorded() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let l = log.clone();
    let agent = start_agent(
        &nats,
        "retry-1",
        "[acceptance]\n",
        TestHandler::new(JobKind::ACCEPTANCE, Behaviour::FlakyUntil(3), l).install(),
    )
    .await;
    let client = nats.client().await;
    let events = EventLog::subscribe(&client).await;
    let queued = command(&client, "acceptance").await;
    let job_id = queued["job_id"].as_str().expect("job").to_string();
    let done = wait_settled(&client, &job_id, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 3);
    assert_eq!(log.runs_of(&job_id).len(), 3);
    let retries: Vec<String> = events
        .of(&job_id)
        .into_iter()
        .filter(|e| e.message.contains("retrying in"))
        .map(|e| e.message)
        .collect();
    assert_eq!(retries.len(), 2, "{retries:?}");
    agent.stop().await;
}
