//! The Kubernetes side of a rolling upgrade (`upgrade::kube`) against the fake Kubernetes API:
//! nodes as the rollout reads them, cordons owned by a job, drains through the eviction API
//! and disruption budgets, the kube-proxy guard, and the wait for a node to be Ready.

use std::time::{Duration, Instant};

use infraflux_handlers::upgrade::kube::{
    self as upgrade_kube, CORDONED_BY, Cordon, EvictOutcome, Evictor,
};
use infraflux_handlers::upgrade::plan::Role;
use infraflux_tests::fakes::FakeKube;
use infraflux_tests::*;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Lab {
    kube: FakeKube,
    config: kube::Config,
    client: kube::Client,
    evictor: Evictor,
    _dir: tempfile::TempDir,
}

/// One control plane and three workers on Talos v1.12.5, all Ready, and clients for them as
/// the agent builds them from a kubeconfig.
async fn lab() -> Lab {
    init();
    let kube = FakeKube::start("default").await;
    kube.add_node("cp-1", true, "10.0.0.11", "v1.12.5", "v1.34.1");
    for (i, name) in ["w-1", "w-2", "w-3"].iter().enumerate() {
        kube.add_node(
            name,
            false,
            &format!("10.0.0.2{}", i + 1),
            "v1.12.5",
            "v1.34.1",
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = kube::config::Kubeconfig::read_from(kube.kubeconfig(dir.path())).expect("read");
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .expect("kubeconfig");
    let client = kube::Client::try_from(config.clone()).expect("client");
    let evictor = Evictor::from_config(config.clone()).expect("evictor");
    Lab {
        kube,
        config,
        client,
        evictor,
        _dir: dir,
    }
}

fn sorted(mut items: Vec<String>) -> Vec<String> {
    items.sort();
    items
}

/// The eviction requests the fake saw for `namespace/pod`.
fn evictions(kube: &FakeKube, namespace: &str, pod: &str) -> usize {
    let path = format!("/api/v1/namespaces/{namespace}/pods/{pod}/eviction");
    kube.requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == path)
        .count()
}

fn eviction_paths(kube: &FakeKube) -> Vec<String> {
    sorted(
        kube.requests()
            .into_iter()
            .filter(|r| r.path.ends_with("/eviction"))
            .map(|r| r.path)
            .collect(),
    )
}

#[tokio::test]
async fn nodes_are_read_with_their_roles_addresses_readiness_and_versions() {
    let lab = lab().await;
    lab.kube.set_node_ready("w-2", false);
    lab.kube.set_node_talos("w-3", "v1.13.2");
    let nodes = upgrade_kube::nodes(&lab.client).await.expect("nodes");
    let seen: Vec<(&str, Role, Option<&str>, bool, &str)> = nodes
        .iter()
        .map(|n| {
            (
                n.name.as_str(),
                n.role,
                n.internal_ip.as_deref(),
                n.ready,
                n.os_image.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (
                "cp-1",
                Role::ControlPlane,
                Some("10.0.0.11"),
                true,
                "Talos (v1.12.5)"
            ),
            (
                "w-1",
                Role::Worker,
                Some("10.0.0.21"),
                true,
                "Talos (v1.12.5)"
            ),
            (
                "w-2",
                Role::Worker,
                Some("10.0.0.22"),
                false,
                "Talos (v1.12.5)"
            ),
            (
                "w-3",
                Role::Worker,
                Some("10.0.0.23"),
                true,
                "Talos (v1.13.2)"
            ),
        ]
    );
    assert!(nodes.iter().all(|n| n.kubelet_version == "v1.34.1"));
    assert!(
        nodes
            .iter()
            .all(|n| !n.unschedulable && n.cordoned_by.is_none())
    );

    let w3 = upgrade_kube::node(&lab.client, "w-3").await.expect("w-3");
    assert_eq!(w3.os_image, "Talos (v1.13.2)");
    let missing = upgrade_kube::node(&lab.client, "w-9")
        .await
        .expect_err("no such node");
    assert!(missing.contains("no node w-9"), "{missing}");
}

#[tokio::test]
async fn a_cordon_belongs_to_the_job_that_made_it() {
    let lab = lab().await;
    let (client, kube) = (&lab.client, &lab.kube);
    assert_eq!(
        upgrade_kube::cordon(client, "w-1", "job-a").await,
        Ok(Cordon::Now)
    );
    let node = kube.node("w-1").expect("w-1");
    assert_eq!(node["spec"]["unschedulable"], true);
    assert_eq!(node["metadata"]["annotations"][CORDONED_BY], "job-a");
    // One merge patch, made against the version read (a precondition).
    let patches: Vec<Value> = kube
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path == "/api/v1/nodes/w-1")
        .map(|r| r.body)
        .collect();
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert!(patches[0]["metadata"]["resourceVersion"].is_string());

    // A resumed job finds its own cordon; another job may not lift it.
    assert_eq!(
        upgrade_kube::cordon(client, "w-1", "job-a").await,
        Ok(Cordon::Already)
    );
    assert_eq!(
        upgrade_kube::cordon(client, "w-1", "job-b").await,
        Ok(Cordon::ByOther)
    );
    assert_eq!(
        upgrade_kube::uncordon(client, "w-1", "job-b").await,
        Ok(false)
    );
    assert_eq!(
        kube.node("w-1").expect("w-1")["spec"]["unschedulable"],
        true
    );
    assert_eq!(
        upgrade_kube::uncordon(client, "w-1", "job-a").await,
        Ok(true)
    );
    let node = kube.node("w-1").expect("w-1");
    assert!(node["spec"]["unschedulable"].is_null(), "{node}");
    assert!(node["metadata"]["annotations"].get(CORDONED_BY).is_none());
    let view = upgrade_kube::node(client, "w-1").await.expect("w-1");
    assert!(!view.unschedulable && view.cordoned_by.is_none());

    // Cordoned by a person: left as it is, before and after.
    kube.set_node_unschedulable("w-2", true);
    assert_eq!(
        upgrade_kube::cordon(client, "w-2", "job-a").await,
        Ok(Cordon::ByOther)
    );
    assert!(
        kube.node("w-2").expect("w-2")["metadata"]["annotations"]
            .get(CORDONED_BY)
            .is_none()
    );
    assert_eq!(
        upgrade_kube::uncordon(client, "w-2", "job-a").await,
        Ok(false)
    );
    assert_eq!(
        kube.node("w-2").expect("w-2")["spec"]["unschedulable"],
        true
    );
    let err = upgrade_kube::cordon(client, "w-9", "job-a")
        .await
        .expect_err("no such node");
    assert!(err.contains("no node w-9"), "{err}");
}

#[tokio::test]
async fn a_drain_evicts_what_controllers_replace_and_leaves_what_belongs_to_the_node() {
    let lab = lab().await;
    let kube = &lab.kube;
    kube.add_pod(
        "home",
        "web-7d9f8-abc12",
        "w-1",
        json!({"app": "web"}),
        Some("ReplicaSet"),
    );
    kube.add_pod(
        "home",
        "web-7d9f8-def34",
        "w-2",
        json!({"app": "web"}),
        Some("ReplicaSet"),
    );
    kube.add_pod(
        "home",
        "db-0",
        "w-1",
        json!({"app": "db"}),
        Some("StatefulSet"),
    );
    kube.add_pod(
        "kube-system",
        "cilium-x1",
        "w-1",
        json!({"k8s-app": "cilium"}),
        Some("DaemonSet"),
    );
    kube.add_pod(
        "kube-system",
        "kube-apiserver-w-1",
        "w-1",
        json!({"tier": "control-plane"}),
        Some("Node"),
    );
    kube.add_pod("batch", "report-done", "w-1", json!({}), None);
    kube.set_pod_phase("batch", "report-done", "Succeeded");
    // A budget that allows one of the two web pods to go.
    kube.add_pdb("home", "web-pdb", json!({"app": "web"}), 1);

    assert_eq!(
        upgrade_kube::cordon(&lab.client, "w-1", "job-a").await,
        Ok(Cordon::Now)
    );
    let report = upgrade_kube::drain(
        &lab.evictor,
        "w-1",
        Duration::from_secs(20),
        &CancellationToken::new(),
    )
    .await
    .expect("drain");
    assert_eq!(
        sorted(report.evicted),
        ["home/db-0", "home/web-7d9f8-abc12"]
    );
    assert_eq!(
        sorted(report.left),
        ["kube-system/cilium-x1", "kube-system/kube-apiserver-w-1"]
    );
    // Only the evicted pods were asked for, and they are gone from the node; the finished
    // pod stays where it was.
    assert_eq!(
        eviction_paths(kube),
        [
            "/api/v1/namespaces/home/pods/db-0/eviction",
            "/api/v1/namespaces/home/pods/web-7d9f8-abc12/eviction"
        ]
    );
    assert_eq!(
        sorted(kube.pods_on("w-1")),
        [
            "batch/report-done",
            "kube-system/cilium-x1",
            "kube-system/kube-apiserver-w-1"
        ]
    );
    // The StatefulSet's pod is back under its name, elsewhere; the ReplicaSet's under a new
    // one. Both Running on a Ready, schedulable node.
    let db = kube.pod("home", "db-0").expect("db-0 recreated");
    assert_ne!(db["metadata"]["uid"], "uid-pod-home-db-0");
    let web: Vec<Value> = kube
        .objects("pods")
        .into_iter()
        .filter(|p| {
            p["metadata"]["labels"]["app"] == "web"
                && !["web-7d9f8-abc12", "web-7d9f8-def34"]
                    .contains(&p["metadata"]["name"].as_str().unwrap_or_default())
        })
        .collect();
    assert_eq!(web.len(), 1, "{web:?}");
    for pod in [&db, &web[0]] {
        let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
        assert!(["w-2", "w-3"].contains(&node), "{pod}");
        assert_eq!(pod["status"]["phase"], "Running");
    }
    // Draining again finds nothing to evict.
    let again = upgrade_kube::drain(
        &lab.evictor,
        "w-1",
        Duration::from_secs(5),
        &CancellationToken::new(),
    )
    .await
    .expect("drain again");
    assert!(again.evicted.is_empty());
}

#[tokio::test]
async fn a_drain_waits_for_evicted_pods_to_leave_the_node() {
    let lab = lab().await;
    let kube = lab.kube.clone();
    kube.add_pod(
        "home",
        "api-5c6d-aa111",
        "w-1",
        json!({"app": "api"}),
        Some("ReplicaSet"),
    );
    kube.hold_pod_termination(true);
    let err = upgrade_kube::drain(
        &lab.evictor,
        "w-1",
        Duration::from_secs(2),
        &CancellationToken::new(),
    )
    .await
    .expect_err("still terminating");
    assert_eq!(
        err,
        "drain of w-1 timed out after 2s: 1 evicted pod still terminating: home/api-5c6d-aa111"
    );

    // Terminating pods are evicted again without harm, and the drain ends when they go.
    let releaser = kube.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        releaser.hold_pod_termination(false);
    });
    let started = Instant::now();
    let report = upgrade_kube::drain(
        &lab.evictor,
        "w-1",
        Duration::from_secs(20),
        &CancellationToken::new(),
    )
    .await
    .expect("drain");
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert_eq!(report.evicted, ["home/api-5c6d-aa111"]);
    assert!(kube.pods_on("w-1").is_empty());
}

/// `home/web-0` on w-1 and `home/web-1` on w-2 under a budget that keeps both, and a pod
/// that may go, on w-1.
fn blocked_by_a_budget(kube: &FakeKube) {
    kube.add_pod(
        "home",
        "web-0",
        "w-1",
        json!({"app": "web"}),
        Some("StatefulSet"),
    );
    kube.add_pod(
        "home",
        "web-1",
        "w-2",
        json!({"app": "web"}),
        Some("StatefulSet"),
    );
    kube.add_pdb("home", "web-pdb", json!({"app": "web"}), 2);
    kube.add_pod(
        "home",
        "api-5c6d-aa111",
        "w-1",
        json!({"app": "api"}),
        Some("ReplicaSet"),
    );
}

#[tokio::test]
async fn a_budget_that_allows_no_disruption_stops_the_drain_at_its_timeout() {
    let lab = lab().await;
    blocked_by_a_budget(&lab.kube);
    let started = Instant::now();
    let err = upgrade_kube::drain(
        &lab.evictor,
        "w-1",
        Duration::from_secs(3),
        &CancellationToken::new(),
    )
    .await
    .expect_err("blocked");
    let elapsed = started.elapsed();
    assert_eq!(
        err,
        "drain of w-1 timed out after 3s: 1 pod could not be evicted: home/web-0 (PodDisruptionBudget home/web-pdb allows no disruption)"
    );
    assert!(
        elapsed >= Duration::from_millis(2900) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    // Refusals come back to the drain's own loop, every couple of seconds: at 0 s and 2 s.
    // The default client would have retried each one itself, many times over, with backoff.
    assert_eq!(evictions(&lab.kube, "home", "web-0"), 2);
    // What could go went; the blocked pod stays.
    assert!(lab.kube.pod("home", "api-5c6d-aa111").is_none());
    assert_eq!(
        lab.kube.pod("home", "web-0").expect("web-0")["spec"]["nodeName"],
        "w-1"
    );
}

#[tokio::test]
async fn a_refused_eviction_is_answered_at_once_not_retried_by_the_client() {
    let lab = lab().await;
    blocked_by_a_budget(&lab.kube);
    let started = Instant::now();
    let outcome = lab.evictor.evict("home", "web-0").await.expect("answer");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        outcome,
        EvictOutcome::Blocked {
            why: "PodDisruptionBudget home/web-pdb allows no disruption".into(),
            budget: Some("web-pdb".into()),
        }
    );
    assert_eq!(evictions(&lab.kube, "home", "web-0"), 1);
    assert_eq!(
        lab.evictor.evict("home", "gone").await,
        Ok(EvictOutcome::Gone)
    );
    assert_eq!(
        lab.evictor.evict("home", "api-5c6d-aa111").await,
        Ok(EvictOutcome::Evicted)
    );

    // The same eviction through the default client does not come back within a second: its
    // retry layer resends it on 429, which is what the Evictor leaves out.
    let default_client = kube::Client::try_from(lab.config.clone()).expect("client");
    let pods: Api<DynamicObject> = Api::namespaced_with(
        default_client,
        "home",
        &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Pod"), "pods"),
    );
    let eviction = json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "web-1", "namespace": "home"}});
    let answer = tokio::time::timeout(
        Duration::from_secs(1),
        pods.create_subresource::<_, Value>("eviction", "web-1", &PostParams::default(), &eviction),
    )
    .await;
    assert!(answer.is_err(), "answered: {answer:?}");
    assert!(evictions(&lab.kube, "home", "web-1") >= 3);
}

#[tokio::test]
async fn cancelling_stops_a_drain() {
    let lab = lab().await;
    blocked_by_a_budget(&lab.kube);
    let cancel = CancellationToken::new();
    let canceller = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        canceller.cancel();
    });
    let started = Instant::now();
    let err = upgrade_kube::drain(&lab.evictor, "w-1", Duration::from_secs(60), &cancel)
        .await
        .expect_err("cancelled");
    assert_eq!(err, "drain of w-1 cancelled");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn the_kube_proxy_guard_wants_cilium_to_replace_it_and_no_kube_proxy() {
    let lab = lab().await;
    let guard = || upgrade_kube::kube_proxy_replaced(&lab.client);
    let why = guard().await.expect("read").expect_err("no cilium-config");
    assert!(
        why.contains("ConfigMap kube-system/cilium-config not found"),
        "{why}"
    );

    lab.kube.add_config_map(
        "kube-system",
        "cilium-config",
        json!({"kube-proxy-replacement": "false", "tunnel-protocol": "vxlan"}),
    );
    let why = guard().await.expect("read").expect_err("setting off");
    assert!(why.contains("kube-proxy-replacement \"false\""), "{why}");

    lab.kube.add_config_map(
        "kube-system",
        "cilium-config",
        json!({"ipam": "kubernetes"}),
    );
    let why = guard().await.expect("read").expect_err("setting absent");
    assert!(why.contains("does not set kube-proxy-replacement"), "{why}");

    for replaced in ["true", "strict"] {
        lab.kube.add_config_map(
            "kube-system",
            "cilium-config",
            json!({"kube-proxy-replacement": replaced}),
        );
        assert_eq!(guard().await, Ok(Ok(())), "{replaced}");
    }

    lab.kube.add_daemonset("kube-system", "kube-proxy");
    let why = guard().await.expect("read").expect_err("kube-proxy runs");
    assert!(
        why.contains("DaemonSet kube-system/kube-proxy exists"),
        "{why}"
    );
    lab.kube
        .remove_object("daemonsets", "kube-system", "kube-proxy");
    assert_eq!(guard().await, Ok(Ok(())));
}

#[tokio::test]
async fn waiting_for_a_node_ends_when_it_is_ready_or_at_the_timeout() {
    let lab = lab().await;
    let kube = lab.kube.clone();
    kube.set_node_ready("w-1", false);
    let flipper = kube.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        flipper.set_node_talos("w-1", "v1.13.2");
        flipper.set_node_ready("w-1", true);
    });
    let started = Instant::now();
    let view = upgrade_kube::wait_node_ready(
        &lab.client,
        "w-1",
        Duration::from_secs(10),
        &CancellationToken::new(),
    )
    .await
    .expect("ready");
    assert!(started.elapsed() >= Duration::from_millis(1100));
    assert!(view.ready);
    assert_eq!(view.os_image, "Talos (v1.13.2)");

    kube.set_node_ready("w-2", false);
    let started = Instant::now();
    let err = upgrade_kube::wait_node_ready(
        &lab.client,
        "w-2",
        Duration::from_secs(2),
        &CancellationToken::new(),
    )
    .await
    .expect_err("never ready");
    assert_eq!(err, "w-2 not Ready after 2s (last: not Ready)");
    assert!(started.elapsed() < Duration::from_secs(4));

    let cancel = CancellationToken::new();
    cancel.cancel();
    let err = upgrade_kube::wait_node_ready(&lab.client, "w-2", Duration::from_secs(30), &cancel)
        .await
        .expect_err("cancelled");
    assert!(err.contains("cancelled"), "{err}");
}
