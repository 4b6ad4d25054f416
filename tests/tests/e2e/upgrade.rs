//! Rolling Talos upgrades end to end: the agent and NATS, a real S3 server for the snapshot
//! gate, the fake Kubernetes API (Nodes, pods, a PodDisruptionBudget, the eviction API, the Argo
//! CD root app) and the fake Talos API (five nodes on their own loopback addresses, both upgrade
//! APIs, reboots that take the fake Node down and bring it back on the new version).

use std::time::Duration;

use infraflux_handlers::upgrade::talos::UpgradeApi;
use infraflux_tests::upgrade_lab::{NODES, S3_ENV, TARGET, upgrade_lab};
use infraflux_tests::*;
use serde_json::{Value, json};

fn node_states(done: &Value) -> Vec<(String, String)> {
    done["result"]["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes in {done}"))
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or_default().to_string(),
                n["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_roll_in_order_one_down_at_a_time_through_both_apis() {
    // cp-3 and w-2 run v1.13.0 (the new API), the others v1.12.5 (the legacy one).
    let lab = upgrade_lab(["v1.12.5", "v1.12.5", "v1.13.0", "v1.12.5", "v1.13.0"], "").await;
    let _agent = lab.agent("upgrader").await;
    let events = EventLog::subscribe(&lab.client).await;
    let done = lab.run(&format!("upgrade talos {TARGET}")).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        node_states(&done),
        pairs(&[
            ("cp-1", "done"),
            ("cp-2", "done"),
            ("cp-3", "done"),
            ("w-1", "done"),
            ("w-2", "done")
        ])
    );
    assert_eq!(lab.upgraded(), ["cp-1", "cp-2", "cp-3", "w-1", "w-2"]);
    let apis: Vec<(String, UpgradeApi)> = lab
        .talos
        .upgrade_log()
        .into_iter()
        .map(|u| (u.node, u.api))
        .collect();
    let expected: Vec<(String, UpgradeApi)> = [
        ("cp-1", UpgradeApi::Legacy),
        ("cp-2", UpgradeApi::Legacy),
        ("cp-3", UpgradeApi::Lifecycle),
        ("w-1", UpgradeApi::Legacy),
        ("w-2", UpgradeApi::Lifecycle),
    ]
    .into_iter()
    .map(|(n, a)| (n.to_string(), a))
    .collect();
    assert_eq!(apis, expected);
    let image = format!(
        "factory.talos.dev/installer/376567988ad370138ad8b2698212367b8edcb69b5fd68c80be1f2ec7d603b4ba:{TARGET}"
    );
    assert_eq!(done["result"]["image"], image.as_str());
    assert!(lab.talos.upgrade_log().iter().all(|u| u.image == image));
    // Never two nodes down at once, and each was down once.
    assert_eq!(lab.talos.down_intervals().len(), 5);
    assert_eq!(lab.talos.most_down_at_once(), 1);
    for (name, _, _) in NODES {
        assert_eq!(lab.os_image(name), format!("Talos ({TARGET})"));
        assert!(!lab.cordoned(name), "{name} left cordoned");
        assert!(
            lab.node(name)["metadata"]["annotations"]
                .get("infraflux.dev/cordoned-by")
                .is_none(),
            "{name}: {}",
            lab.node(name)
        );
    }
    // The gate took a snapshot (none existed), and the result names it.
    let snapshot = done["result"]["snapshot"].as_str().expect("snapshot key");
    assert!(snapshot.starts_with("prod/lab/"), "{snapshot}");
    assert!(lab.s3.keys("etcd").await.contains(&snapshot.to_string()));
    // The web replicas were moved off each worker by eviction, and DaemonSet pods stayed.
    let job_id = done["job_id"].as_str().expect("job id");
    let messages: Vec<String> = events.of(job_id).into_iter().map(|e| e.message).collect();
    // The plan comes first, before anything moves.
    let plan_at = messages
        .iter()
        .position(|m| m.starts_with("plan: "))
        .expect("a plan event");
    let first_move = messages
        .iter()
        .position(|m| m.contains("cordoned"))
        .expect("a cordon event");
    assert!(plan_at < first_move, "{messages:?}");
    let plan = &messages[plan_at];
    assert!(
        plan.contains("cp-1 (control plane, v1.12.5 → v1.13.2)"),
        "{plan}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("w-1: drained (1 evicted, 1 DaemonSet or mirror pods left)")),
        "{messages:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_that_forbids_eviction_halts_with_the_node_cordoned_and_a_rerun_continues() {
    let lab = upgrade_lab(["v1.12.5"; 5], "drain_timeout = \"2s\"\n").await;
    // One database replica on w-1 that its budget must keep: it can never be evicted.
    lab.kube.add_pod(
        "home",
        "db-0",
        "w-1",
        json!({"app": "db"}),
        Some("StatefulSet"),
    );
    lab.kube.add_pdb("home", "db", json!({"app": "db"}), 1);
    let _agent = lab.agent("upgrader").await;
    let halted = lab.run(&format!("upgrade talos {TARGET}")).await;
    assert_eq!(halted["state"], "failed", "{halted}");
    assert_eq!(halted["result"]["halted_at"], "w-1", "{halted}");
    assert_eq!(
        node_states(&halted),
        pairs(&[
            ("cp-1", "done"),
            ("cp-2", "done"),
            ("cp-3", "done"),
            ("w-1", "halted"),
            ("w-2", "pending")
        ])
    );
    let message = halted["message"].as_str().expect("message");
    for needle in [
        "halted at w-1",
        "home/db-0",
        "PodDisruptionBudget home/db",
        "w-1 is left cordoned",
        "w-2 untouched",
        "`upgrade talos v1.13.2` continues",
    ] {
        assert!(message.contains(needle), "{needle:?} not in {message}");
    }
    // The halted node stays cordoned and on its version; the next one was never touched.
    assert!(lab.cordoned("w-1"));
    assert_eq!(lab.os_image("w-1"), "Talos (v1.12.5)");
    assert!(!lab.cordoned("w-2"));
    assert_eq!(lab.os_image("w-2"), "Talos (v1.12.5)");
    assert_eq!(lab.upgraded(), ["cp-1", "cp-2", "cp-3"]);

    // The budget fixed (the database moved to a second replica elsewhere), the same command
    // continues: the control planes are skipped, w-1's cordon is taken over and lifted.
    lab.kube.remove_object("poddisruptionbudgets", "home", "db");
    let rerun = lab.run(&format!("upgrade talos {TARGET}")).await;
    assert_eq!(rerun["state"], "succeeded", "{rerun}");
    assert_eq!(
        node_states(&rerun),
        pairs(&[
            ("cp-1", "skipped"),
            ("cp-2", "skipped"),
            ("cp-3", "skipped"),
            ("w-1", "done"),
            ("w-2", "done")
        ])
    );
    assert_eq!(lab.upgraded(), ["cp-1", "cp-2", "cp-3", "w-1", "w-2"]);
    assert!(!lab.cordoned("w-1") && !lab.cordoned("w-2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_comes_back_halts_the_rollout() {
    let lab = upgrade_lab(["v1.13.0"; 5], "node_timeout = \"3s\"\n").await;
    lab.talos.set_node("w-1", |b| b.comes_back = false);
    let _agent = lab.agent("upgrader").await;
    let halted = lab.run(&format!("upgrade talos {TARGET}")).await;
    assert_eq!(halted["state"], "failed", "{halted}");
    assert_eq!(halted["result"]["halted_at"], "w-1", "{halted}");
    let w1 = &halted["result"]["nodes"][3];
    assert_eq!(w1["state"], "halted");
    assert!(
        w1["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("back on the new version")),
        "{w1}"
    );
    assert!(lab.cordoned("w-1"));
    assert!(!lab.cordoned("w-2"));
    assert_eq!(lab.upgraded(), ["cp-1", "cp-2", "cp-3", "w-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downgrade_and_a_skipped_minor_are_refused_before_anything_moves() {
    let lab = upgrade_lab(["v1.11.5", "v1.12.5", "v1.12.5", "v1.12.5", "v1.12.5"], "").await;
    let _agent = lab.agent("upgrader").await;
    let skip = lab.run("upgrade talos v1.13.2").await;
    assert_eq!(skip["state"], "failed", "{skip}");
    let message = skip["message"].as_str().expect("message");
    assert!(
        message.contains("cp-1 runs Talos v1.11.5: going to v1.13.2 skips a minor version"),
        "{message}"
    );
    let down = lab.run("upgrade talos v1.11.0").await;
    assert_eq!(down["state"], "failed", "{down}");
    assert!(
        down["message"]
            .as_str()
            .is_some_and(|m| m.contains("would be a downgrade")),
        "{down}"
    );
    assert!(lab.upgraded().is_empty());
    for (name, _, _) in NODES {
        assert!(!lab.cordoned(name), "{name}");
    }
    // No snapshot was taken for a refused upgrade.
    assert!(lab.s3.keys("etcd").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_the_window_it_waits_holding_nothing_and_force_runs_with_its_reason() {
    // A window that opened on 1 January at 03:00 for a minute: closed now.
    let lab = upgrade_lab(
        ["v1.13.0"; 5],
        "window = { cron = \"0 0 3 1 1 *\", duration = \"1m\", timezone = \"Europe/Berlin\" }\n",
    )
    .await;
    let _agent = lab.agent("upgrader").await;
    let waiting = submit(&lab.client, &format!("upgrade talos {TARGET}")).await;
    let record = wait_for(Duration::from_secs(20), "the upgrade to wait", || async {
        let r = record(&lab.client, &waiting).await;
        (r["state"] == "waiting" && !r["not_before"].is_null()).then_some(r)
    })
    .await;
    let message = record["message"].as_str().expect("message");
    assert!(message.contains("outside the upgrade window"), "{message}");
    assert!(message.contains("force=true reason=<word>"), "{message}");
    // It holds no lock: a snapshot (a read lock on the cluster) runs meanwhile.
    let snapshot = lab.run("snapshot").await;
    assert_eq!(snapshot["state"], "succeeded", "{snapshot}");
    assert!(lab.upgraded().is_empty());

    let events = EventLog::subscribe(&lab.client).await;
    let forced_id = submit(
        &lab.client,
        &format!("upgrade talos {TARGET} force=true reason=cve-2026-1234"),
    )
    .await;
    let forced = wait_settled(&lab.client, &forced_id, Duration::from_secs(120)).await;
    assert_eq!(forced["state"], "succeeded", "{forced}");
    let requester = forced["requested_by"].as_str().expect("requester");
    assert_eq!(
        forced["result"]["force"],
        json!({"reason": "cve-2026-1234", "by": requester})
    );
    assert!(
        events
            .of(&forced_id)
            .iter()
            .any(|e| e.message.contains("force=true")
                && e.message.contains("cve-2026-1234")
                && e.message.contains(requester)),
        "{:?}",
        events.of(&forced_id)
    );
    // The snapshot the gate used is the one just taken (younger than snapshot_max_age).
    assert_eq!(forced["result"]["snapshot"], snapshot["result"]["object"]);
    assert_eq!(lab.upgraded().len(), 5);
    // The first job still waits for its window.
    assert_eq!(record_state(&lab.client, &waiting).await, "waiting");
    command(&lab.client, &format!("cancel {waiting}")).await;
}

async fn record_state(client: &async_nats::Client, job: &str) -> String {
    record(client, job).await["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_rollout_resumes_and_never_upgrades_a_node_twice() {
    let lab = upgrade_lab(["v1.12.5"; 5], "").await;
    // Slow reboots, so the kill lands while cp-2 is away.
    lab.set_reboot_duration(Duration::from_secs(3));
    let write_config = |id: &str| {
        let state = lab.dir.path().join(id);
        let path = lab.dir.path().join(format!("{id}.toml"));
        std::fs::write(&path, agent_config(&lab.nats.url, id, &state, &lab.toml)).expect("config");
        path
    };
    let env: Vec<(&str, String)> = S3_ENV.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let mut first =
        crate::crash::spawn_agent(&write_config("up-a"), &env, &lab.dir.path().join("a.log"));
    let job = wait_for(
        Duration::from_secs(20),
        "agent a to take the upgrade",
        || async {
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                lab.client.request(
                    "infraflux.cmd.upgrade",
                    format!("upgrade talos {TARGET}").into(),
                ),
            )
            .await;
            match r {
                Ok(Ok(m)) => serde_json::from_slice::<Value>(&m.payload)
                    .ok()
                    .and_then(|v| v["job_id"].as_str().map(str::to_string)),
                _ => None,
            }
        },
    )
    .await;
    wait_for(
        Duration::from_secs(60),
        "cp-2's upgrade to be asked for",
        || async { (lab.upgraded().len() == 2).then_some(()) },
    )
    .await;
    first.kill9();
    // cp-1 is done and uncordoned; cp-2 is away, cordoned by the job.
    assert!(!lab.cordoned("cp-1"));
    assert!(lab.cordoned("cp-2"));

    let _second =
        crate::crash::spawn_agent(&write_config("up-b"), &env, &lab.dir.path().join("b.log"));
    let done = wait_settled(&lab.client, &job, Duration::from_secs(120)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["agent"], "up-b");
    assert_eq!(done["attempts"], 2, "{done}");
    // Every node once: cp-1 was not upgraded again, cp-2's upgrade was not asked for twice.
    assert_eq!(lab.upgraded(), ["cp-1", "cp-2", "cp-3", "w-1", "w-2"]);
    for (name, _, _) in NODES {
        assert!(!lab.cordoned(name), "{name} left cordoned");
        assert_eq!(lab.os_image(name), format!("Talos ({TARGET})"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_gate_touches_nothing_and_says_which() {
    let lab = upgrade_lab(["v1.12.5"; 5], "").await;
    let _agent = lab.agent("upgrader").await;
    let refused = |done: &Value, needle: &str| {
        assert_eq!(done["state"], "failed", "{done}");
        let message = done["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("gate failed, nothing was touched") && message.contains(needle),
            "{needle:?} not in {message}"
        );
    };
    lab.kube
        .add_app("argocd", "root", "Synced", "Degraded", &[]);
    refused(
        &lab.run(&format!("upgrade talos {TARGET}")).await,
        "Argo CD argocd/root is Degraded",
    );
    lab.kube.add_app("argocd", "root", "Synced", "Healthy", &[]);
    lab.talos.set_node("cp-2", |b| {
        b.etcd_errors = vec!["etcdserver: no leader".into()]
    });
    refused(
        &lab.run(&format!("upgrade talos {TARGET}")).await,
        "etcdserver: no leader",
    );
    lab.talos.set_node("cp-2", |b| b.etcd_errors.clear());
    lab.kube.add_daemonset("kube-system", "kube-proxy");
    refused(
        &lab.run(&format!("upgrade talos {TARGET}")).await,
        "kube-proxy",
    );
    lab.kube.set_node_ready("w-2", false);
    lab.kube
        .remove_object("daemonsets", "kube-system", "kube-proxy");
    refused(
        &lab.run(&format!("upgrade talos {TARGET}")).await,
        "not Ready: w-2",
    );
    assert!(lab.upgraded().is_empty());
    for (name, _, _) in NODES {
        assert!(!lab.cordoned(name), "{name}");
    }
    // No snapshot is taken before the cheaper gates pass.
    assert!(lab.s3.keys("etcd").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_after_the_node_in_progress_is_back_and_uncordoned() {
    let lab = upgrade_lab(["v1.12.5"; 5], "").await;
    lab.set_reboot_duration(Duration::from_secs(2));
    let _agent = lab.agent("upgrader").await;
    let job = submit(&lab.client, &format!("upgrade talos {TARGET}")).await;
    wait_for(
        Duration::from_secs(60),
        "cp-1's upgrade to be asked for",
        || async { (lab.upgraded().len() == 1).then_some(()) },
    )
    .await;
    command(&lab.client, &format!("cancel {job}")).await;
    let done = wait_settled(&lab.client, &job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    // cp-1 was finished: back on the new version and uncordoned; nothing else was touched.
    assert_eq!(lab.upgraded(), ["cp-1"]);
    assert_eq!(lab.os_image("cp-1"), format!("Talos ({TARGET})"));
    for (name, _, _) in NODES {
        assert!(!lab.cordoned(name), "{name} left cordoned");
    }
    assert_eq!(lab.os_image("cp-2"), "Talos (v1.12.5)");
}
