//! Velero restore drills end to end, against the fake Kubernetes API and its fake Velero
//! restore controller: a namespace restored into a scratch namespace, verified, cleaned up.

use std::time::Duration;

use infraflux_tests::fakes::FakeKube;
use infraflux_tests::*;
use serde_json::{Value, json};

struct DrillLab {
    _nats: Nats,
    kube: FakeKube,
    agent: TestAgent,
    client: async_nats::Client,
    _dir: tempfile::TempDir,
}

/// The `home` namespace as production has it: a web Deployment behind a LoadBalancer Service
/// (with the fields the API server refuses on a ClusterIP one), a database StatefulSet with its
/// claim, three ConfigMaps, and what a drill must never take: an HTTPRoute and a Certificate.
fn seed_home(kube: &FakeKube) {
    kube.add_namespace(
        "home",
        json!({"pod-security.kubernetes.io/enforce": "baseline", "team": "home"}),
    );
    let add = |plural: &str, object: Value| {
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_string();
        kube.add_object(plural, "home", &name, object);
    };
    add(
        "deployments",
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "home-assistant", "namespace": "home"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "ha"}}, "template": {"metadata": {"labels": {"app": "ha"}}, "spec": {"containers": [{"name": "ha", "image": "ghcr.io/home-assistant/home-assistant:2026.11"}]}}}}),
    );
    add(
        "statefulsets",
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db", "namespace": "home"},
        "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}}, "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": [{"name": "pg", "image": "postgres:17"}]}}}}),
    );
    add(
        "persistentvolumeclaims",
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data-db-0", "namespace": "home"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "longhorn", "resources": {"requests": {"storage": "5Gi"}}},
        "status": {"phase": "Bound"}}),
    );
    for name in ["ha-config", "ha-automations", "db-init"] {
        add(
            "configmaps",
            json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "home"}, "data": {"k": "v"}}),
        );
    }
    add(
        "services",
        json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "home-assistant", "namespace": "home", "annotations": {"io.cilium/lb-ipam-ips": "192.168.10.40"}},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "io.cilium/l2-announcer", "externalTrafficPolicy": "Local",
                 "allocateLoadBalancerNodePorts": true, "healthCheckNodePort": 31999, "clusterIP": "10.96.4.4",
                 "selector": {"app": "ha"}, "ports": [{"name": "http", "port": 8123, "targetPort": 8123, "nodePort": 30123}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "192.168.10.40"}]}}}),
    );
    add(
        "services",
        json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "db", "namespace": "home"},
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.5.5", "selector": {"app": "db"}, "ports": [{"port": 5432}]}}),
    );
    add(
        "httproutes",
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "home-assistant", "namespace": "home"},
        "spec": {"hostnames": ["ha.lab.example"], "parentRefs": [{"name": "gw", "namespace": "gateway"}]}}),
    );
    add(
        "certificates",
        json!({"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
        "metadata": {"name": "ha-tls", "namespace": "home"},
        "spec": {"secretName": "ha-tls", "dnsNames": ["ha.lab.example"], "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}}}),
    );
}

async fn drill_lab(extra: &str) -> DrillLab {
    init();
    let nats = Nats::start();
    let kube = FakeKube::start("velero").await;
    seed_home(&kube);
    kube.add_backup(
        "velero",
        "daily-home",
        &["home"],
        chrono::Duration::hours(26),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        r#"
[kubernetes]
kubeconfig = "{kubeconfig}"

[restore_drill]
namespaces = ["home"]
restore_timeout = "30s"
ready_timeout = "20s"
{extra}

[[restore_drill.checks]]
namespace = "home"
http = {{ service = "home-assistant", port = 8123, path = "/", expect_status = 200 }}

[[restore_drill.checks]]
namespace = "home"
min_objects = {{ kind = "ConfigMap", count = 3 }}
"#,
        kubeconfig = kube.kubeconfig(dir.path()).display()
    );
    let agent = start_agent(&nats, "drill-agent", &toml, |_| {}).await;
    let client = nats.client().await;
    DrillLab {
        _nats: nats,
        kube,
        agent,
        client,
        _dir: dir,
    }
}

impl DrillLab {
    async fn drill(&self, text: &str) -> Value {
        let job = submit(&self.client, text).await;
        wait_settled(&self.client, &job, Duration::from_secs(90)).await
    }

    fn scratch_namespaces(&self) -> Vec<String> {
        self.kube
            .namespace_names()
            .into_iter()
            .filter(|n| n.starts_with("drill-"))
            .collect()
    }

    /// Nothing of the drill is left: no scratch namespace, Restore or modifier.
    fn assert_clean(&self) {
        assert_eq!(self.scratch_namespaces(), Vec::<String>::new());
        assert!(
            self.kube.objects("restores").is_empty(),
            "{:?}",
            self.kube.objects("restores")
        );
        let modifiers: Vec<Value> = self
            .kube
            .objects("configmaps")
            .into_iter()
            .filter(|c| c["metadata"]["namespace"] == "velero")
            .collect();
        assert!(modifiers.is_empty(), "{modifiers:?}");
    }
}

fn target(job: &Value, name: &str) -> Value {
    job["result"]["targets"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["target"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no target {name} in {job}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_restores_the_newest_backup_into_a_scratch_namespace_verifies_it_and_cleans_up() {
    let lab = drill_lab("").await;
    // An older backup, and a newer one that failed: neither is drilled.
    lab.kube.add_backup(
        "velero",
        "older-home",
        &["home"],
        chrono::Duration::hours(50),
    );
    let done = lab.drill("drill").await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let home = target(&done, "home");
    assert_eq!(home["ok"], true, "{home}");
    assert_eq!(home["backup"], "daily-home");
    let age = home["data_age_seconds"].as_u64().expect("data age");
    assert!((26 * 3600..26 * 3600 + 600).contains(&age), "{age}");
    assert!(home["rto_seconds"].as_f64().expect("rto") > 0.0, "{home}");
    let scratch = home["scratch_namespace"]
        .as_str()
        .expect("scratch")
        .to_string();
    assert!(
        scratch.starts_with("drill-home-") && scratch.len() <= 63,
        "{scratch}"
    );
    assert_eq!(home["cleaned_up"], true);
    let checks: Vec<String> = home["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| format!("{}={}", c["name"].as_str().unwrap_or_default(), c["ok"]))
        .collect();
    assert_eq!(
        checks,
        [
            "workloads ready=true",
            "http home-assistant:8123/=true",
            "at least 3 ConfigMap=true"
        ],
        "{home}"
    );
    let message = done["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("home: restored daily-home (data age 26 h")
            && message.contains(", 3/3 checks"),
        "{message}"
    );
    lab.assert_clean();

    // What was created: the scratch namespace with the source's Pod Security labels, and in it
    // no LoadBalancer, no node port, no route, no certificate.
    let created = lab.kube.created();
    let ns = created
        .iter()
        .find(|o| o["kind"] == "Namespace")
        .expect("a scratch namespace was created");
    assert_eq!(ns["metadata"]["name"], scratch.as_str());
    assert_eq!(ns["metadata"]["labels"]["infraflux.dev/drill"], "true");
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "baseline"
    );
    assert!(ns["metadata"]["labels"].get("team").is_none(), "{ns}");
    let in_scratch: Vec<&Value> = created
        .iter()
        .filter(|o| o["metadata"]["namespace"] == scratch.as_str())
        .collect();
    assert!(in_scratch.iter().any(|o| o["kind"] == "Deployment"));
    for o in &in_scratch {
        assert!(
            !matches!(o["kind"].as_str(), Some("HTTPRoute" | "Certificate")),
            "{o}"
        );
        if o["kind"] == "Service" {
            assert_eq!(o["spec"]["type"], "ClusterIP", "{o}");
            for field in [
                "externalTrafficPolicy",
                "allocateLoadBalancerNodePorts",
                "loadBalancerClass",
                "healthCheckNodePort",
                "clusterIP",
            ] {
                assert!(o["spec"].get(field).is_none(), "{field} in {o}");
            }
            assert!(o["spec"]["ports"][0].get("nodePort").is_none(), "{o}");
        }
    }
    // The Restore asked for exactly that.
    let restore = lab
        .kube
        .requests()
        .into_iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/restores"))
        .expect("a Restore was created");
    assert_eq!(restore.body["spec"]["backupName"], "daily-home");
    assert_eq!(
        restore.body["spec"]["namespaceMapping"]["home"],
        scratch.as_str()
    );
    assert!(
        restore.body["spec"]["excludedResources"]
            .as_array()
            .expect("excluded")
            .contains(&json!("httproutes.gateway.networking.k8s.io"))
    );

    // `status` shows the last drill of each target, with its RTO and data age.
    let status = status_showing(&lab.client, "    home: succeeded").await;
    let text = status["message"].as_str().unwrap_or_default();
    assert!(
        text.contains("RTO") && text.contains("data age 26h"),
        "{text}"
    );
    let metrics = metrics_text(&lab.agent.http).await;
    for metric in [
        "infraflux_drill_last_success_timestamp_seconds{target=\"home\"}",
        "infraflux_drill_rto_seconds{target=\"home\"}",
        "infraflux_drill_data_age_seconds{target=\"home\"}",
    ] {
        assert!(metrics.contains(metric), "{metric} missing");
    }
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_that_never_becomes_available_fails_the_drill_naming_it_and_is_cleaned_up() {
    let lab = drill_lab("").await;
    lab.kube.set_never_available("home-assistant");
    let done = lab.drill("drill ns=home").await;
    assert_eq!(done["state"], "failed", "{done}");
    let home = target(&done, "home");
    assert_eq!(home["ok"], false);
    assert_eq!(home["cleaned_up"], true);
    assert!(
        home["error"]
            .as_str()
            .unwrap_or_default()
            .contains("Deployment home-assistant"),
        "{home}"
    );
    assert!(home["rto_seconds"].is_null(), "{home}");
    lab.assert_clean();
    // A failed drill moves no last success.
    let metrics = metrics_text(&lab.agent.http).await;
    assert!(!metrics.contains("infraflux_drill_rto_seconds{target=\"home\"}"));
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_drill_still_deletes_its_scratch_namespace() {
    let lab = drill_lab("").await;
    lab.kube.hold_restores(true);
    let job = submit(&lab.client, "drill").await;
    wait_for(Duration::from_secs(30), "the scratch namespace", || async {
        (!lab.scratch_namespaces().is_empty()).then_some(())
    })
    .await;
    let reply = command(&lab.client, &format!("cancel {job}")).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let done = wait_settled(&lab.client, &job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    lab.assert_clean();
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_an_earlier_drill_are_removed_first() {
    let lab = drill_lab("").await;
    let labels = json!({"infraflux.dev/drill": "true", "infraflux.dev/drill-target": "home"});
    lab.kube.add_namespace("drill-home-0ld0ne", labels.clone());
    lab.kube.add_object(
        "restores",
        "velero",
        "drill-home-0ld0ne",
        json!({
        "apiVersion": "velero.io/v1", "kind": "Restore",
        "metadata": {"name": "drill-home-0ld0ne", "namespace": "velero", "labels": labels},
        "spec": {"backupName": "daily-home"}, "status": {"phase": "InProgress"}}),
    );
    // Another target's drill is not touched.
    lab.kube.add_namespace(
        "drill-media-running",
        json!({"infraflux.dev/drill": "true", "infraflux.dev/drill-target": "media"}),
    );
    let done = lab.drill("drill").await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(lab.scratch_namespaces(), ["drill-media-running"]);
    assert!(
        lab.kube
            .object("restores", "velero", "drill-home-0ld0ne")
            .is_none()
    );
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_older_than_max_data_age_or_one_that_restores_nothing_fails() {
    let lab = drill_lab("max_data_age = \"24h\"").await;
    let done = lab.drill("drill").await;
    assert_eq!(done["state"], "failed", "{done}");
    let home = target(&done, "home");
    let error = home["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("daily-home") && error.contains("max_data_age 24h"),
        "{error}"
    );
    assert!(error.contains("is 26 h 0 m old"), "{error}");
    assert!(
        lab.kube.created().is_empty(),
        "nothing is restored from a backup too old"
    );
    lab.agent.stop().await;

    let lab = drill_lab("").await;
    lab.kube.set_restores_nothing(true);
    let done = lab.drill("drill").await;
    assert_eq!(done["state"], "failed", "{done}");
    let home = target(&done, "home");
    assert!(
        home["error"]
            .as_str()
            .unwrap_or_default()
            .contains("restored nothing"),
        "{home}"
    );
    lab.assert_clean();
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_check_fails_the_drill_and_a_recent_success_skips_the_next() {
    let lab = drill_lab("skip_if_newer_than = \"1h\"").await;
    lab.kube.set_proxy_status(502);
    let done = lab.drill("drill").await;
    assert_eq!(done["state"], "failed", "{done}");
    let home = target(&done, "home");
    let http = home["checks"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["name"].as_str().unwrap_or_default().starts_with("http"))
        })
        .cloned()
        .expect("the http check");
    assert_eq!(http["ok"], false);
    assert!(
        http["message"]
            .as_str()
            .unwrap_or_default()
            .contains("status 502"),
        "{http}"
    );
    lab.assert_clean();

    lab.kube.set_proxy_status(200);
    let done = lab.drill("drill").await;
    assert_eq!(done["state"], "succeeded", "{done}");
    // Within skip_if_newer_than of that success: skipped, not a success.
    let skipped = lab.drill("drill").await;
    assert_eq!(skipped["state"], "succeeded", "{skipped}");
    assert_eq!(skipped["skipped"], true, "{skipped}");
    assert_eq!(target(&skipped, "home")["skipped"], true);
    assert!(
        skipped["message"]
            .as_str()
            .unwrap_or_default()
            .contains("skipped"),
        "{skipped}"
    );
    lab.agent.stop().await;
}
