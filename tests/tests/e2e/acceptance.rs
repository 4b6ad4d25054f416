//! Acceptance end to end, against the fake Kubernetes API: a healthy platform passes every
//! check; a broken one fails each check with the object named; the temporary Service, claim
//! and pod are gone either way; `after` queues an acceptance job behind a successful job.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use infraflux_handlers::JobKind;
use infraflux_tests::fakes::FakeKube;
use infraflux_tests::handlers::{Behaviour, RunLog, TestHandler};
use infraflux_tests::*;
use serde_json::{Value, json};

struct Lab {
    _nats: Nats,
    kube: FakeKube,
    agent: TestAgent,
    client: async_nats::Client,
    _dir: tempfile::TempDir,
}

fn condition(kind: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": kind, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": Utc::now().to_rfc3339()})
}

/// The platform as the plan builds it, healthy.
fn seed_platform(kube: &FakeKube) {
    kube.add_node("cp1", true, "10.0.0.11", "v1.12.5", "v1.34.1");
    kube.add_node("w1", false, "10.0.0.21", "v1.12.5", "v1.34.1");
    let restricted = json!({"pod-security.kubernetes.io/enforce": "restricted"});
    for ns in ["default", "cilium", "apps", "gateway", "argocd", "velero"] {
        kube.add_namespace(ns, restricted.clone());
    }
    kube.add_namespace("kube-system", json!({}));
    kube.add_namespace(
        "longhorn-system",
        json!({"pod-security.kubernetes.io/enforce": "privileged"}),
    );
    kube.add_pod("cilium", "cilium-x7k2p", "w1", json!({}), Some("DaemonSet"));
    kube.add_app("argocd", "root", "Synced", "Healthy", &["apps"]);
    kube.add_app("argocd", "apps", "Synced", "Healthy", &[]);
    kube.add_config_map(
        "kube-system",
        "cilium-config",
        json!({"kube-proxy-replacement": "true"}),
    );
    kube.add_daemonset("cilium", "cilium");
    kube.add_storage_location(
        "velero",
        "default",
        "Available",
        chrono::Duration::minutes(1),
    );
    kube.add_object(
        "externalsecrets",
        "apps",
        "db",
        json!({"apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
               "metadata": {"name": "db", "namespace": "apps"},
               "spec": {"secretStoreRef": {"name": "onepassword", "kind": "ClusterSecretStore"}, "target": {"name": "db"}},
               "status": {"conditions": [condition("Ready", "True", "SecretSynced", "secret synced")]}}),
    );
    kube.add_object(
        "clustersecretstores",
        "",
        "onepassword",
        json!({"apiVersion": "external-secrets.io/v1", "kind": "ClusterSecretStore",
               "metadata": {"name": "onepassword"},
               "spec": {"provider": {"onepassword": {"connectHost": "http://onepassword-connect:8080"}}},
               "status": {"conditions": [condition("Ready", "True", "Valid", "store validated")]}}),
    );
    kube.add_object(
        "gatewayclasses",
        "",
        "cilium",
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
               "metadata": {"name": "cilium"}, "spec": {"controllerName": "io.cilium/gateway-controller"},
               "status": {"conditions": [condition("Accepted", "True", "Accepted", "Valid GatewayClass")]}}),
    );
    kube.add_object(
        "gateways",
        "gateway",
        "gw",
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "gw", "namespace": "gateway"},
               "spec": {"gatewayClassName": "cilium", "listeners": [
                   {"name": "http", "protocol": "HTTP", "port": 80},
                   {"name": "https", "protocol": "HTTPS", "port": 443, "hostname": "*.lab.example",
                    "tls": {"mode": "Terminate", "certificateRefs": [{"kind": "Secret", "name": "wildcard-tls"}]},
                    "allowedRoutes": {"namespaces": {"from": "All"}}}]}}),
    );
    kube.add_object(
        "httproutes",
        "apps",
        "home",
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"name": "home", "namespace": "apps"},
               "spec": {"hostnames": ["home.lab.example"], "parentRefs": [{"name": "gw", "namespace": "gateway"}],
                        "rules": [{"backendRefs": [{"name": "home", "port": 8080}]}]},
               "status": {"parents": [{"parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw", "namespace": "gateway"},
                   "controllerName": "io.cilium/gateway-controller",
                   "conditions": [condition("Accepted", "True", "Accepted", "Accepted HTTPRoute"),
                                  condition("ResolvedRefs", "True", "ResolvedRefs", "Service reference is valid")]}]}}),
    );
    set_certificate(kube, chrono::Duration::days(60));
    kube.add_object(
        "clusterissuers",
        "",
        "letsencrypt",
        json!({"apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer",
               "metadata": {"name": "letsencrypt"},
               "spec": {"acme": {"server": "https://acme-v02.api.letsencrypt.org/directory", "privateKeySecretRef": {"name": "le"},
                        "solvers": [{"dns01": {"cloudflare": {"apiTokenSecretRef": {"name": "cloudflare", "key": "api-token"}}}}]}},
               "status": {"conditions": [condition("Ready", "True", "ACMEAccountRegistered", "registered")]}}),
    );
    kube.add_storage_class("longhorn", true, "WaitForFirstConsumer");
    kube.set_lb_addresses(&["10.0.0.241", "10.0.0.242"]);
}

/// The wildcard certificate serving the Gateway's HTTPS listener, valid for `left`.
fn set_certificate(kube: &FakeKube, left: chrono::Duration) {
    kube.add_object(
        "certificates",
        "gateway",
        "wildcard",
        json!({"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
               "metadata": {"name": "wildcard", "namespace": "gateway"},
               "spec": {"secretName": "wildcard-tls", "dnsNames": ["*.lab.example"], "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}},
               "status": {"notAfter": (Utc::now() + left).to_rfc3339(), "renewalTime": (Utc::now() + left / 3).to_rfc3339(),
                          "conditions": [condition("Ready", "True", "Ready", "Certificate is up to date and has not expired")]}}),
    );
}

const ACCEPTANCE: &str = r#"
[acceptance]
namespaces = ["kube-system", "cilium"]
lb_pool = "10.0.0.240/28"
http_routes = ["apps/home"]
cert_min_days = 14
pod_security_exceptions = ["longhorn-system"]
lb_timeout = "4s"
storage_timeout = "4s"
"#;

async fn lab(extra: &str, customize: impl FnOnce(&mut infraflux_handlers::Registry)) -> Lab {
    init();
    let nats = Nats::start();
    let kube = FakeKube::start("velero").await;
    seed_platform(&kube);
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "[kubernetes]\nkubeconfig = \"{}\"\n{extra}",
        kube.kubeconfig(dir.path()).display()
    );
    let agent = start_agent(&nats, "acceptance-agent", &toml, customize).await;
    let client = nats.client().await;
    Lab {
        _nats: nats,
        kube,
        agent,
        client,
        _dir: dir,
    }
}

impl Lab {
    async fn run(&self) -> Value {
        let job = submit(&self.client, "acceptance").await;
        wait_settled(&self.client, &job, Duration::from_secs(60)).await
    }

    /// The temporary objects of acceptance runs still in the cluster.
    fn temporary_objects(&self) -> Vec<String> {
        ["services", "persistentvolumeclaims", "pods"]
            .iter()
            .flat_map(|plural| {
                self.kube
                    .objects(plural)
                    .into_iter()
                    .filter(|o| o["metadata"]["labels"]["infraflux.dev/acceptance"] == "true")
                    .map(move |o| format!("{plural}/{}", o["metadata"]["name"]))
            })
            .collect()
    }

    /// The kinds of temporary objects created so far (by name prefix).
    fn created_temporary(&self) -> Vec<String> {
        self.kube
            .created()
            .iter()
            .filter(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("infraflux-acceptance-"))
            })
            .map(|o| o["kind"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

fn check<'a>(record: &'a Value, name: &str) -> &'a Value {
    record["result"]["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {record}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_platform_passes_every_check_and_leaves_nothing_behind() {
    let lab = lab(ACCEPTANCE, |_| {}).await;
    // What an agent killed mid-check left behind.
    lab.kube.add_object(
        "services",
        "default",
        "infraflux-acceptance-old",
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "infraflux-acceptance-old", "namespace": "default", "labels": {"infraflux.dev/acceptance": "true"}},
               "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}}),
    );
    let done = lab.run().await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let result = &done["result"];
    for name in [
        "nodes.ready",
        "pods.crashloop",
        "argocd.apps",
        "cilium.kube_proxy",
        "pod_security",
        "velero.location",
        "external_secrets",
        "gateway.classes",
        "http_routes",
        "cert_manager.cloudflare",
        "lb_pool",
        "storage",
    ] {
        let c = check(&done, name);
        assert_eq!(c["ok"], true, "{name}: {c}");
    }
    for name in ["drills", "hostnames"] {
        assert_eq!(check(&done, name)["skipped"], true, "{name}");
    }
    assert_eq!(
        (&result["passed"], &result["failed"], &result["skipped"]),
        (&json!(12), &json!(0), &json!(2)),
        "{result}"
    );
    assert_eq!(done["message"], "acceptance: 12/12 passed, 2 skipped");
    assert!(
        check(&done, "lb_pool")["message"]
            .as_str()
            .is_some_and(|m| m.contains("10.0.0.24")),
        "{done}"
    );
    assert!(
        check(&done, "storage")["message"]
            .as_str()
            .is_some_and(|m| m.contains("WaitForFirstConsumer")),
        "{done}"
    );
    let mut created = lab.created_temporary();
    created.sort();
    assert_eq!(
        created,
        ["PersistentVolumeClaim", "Pod", "Service"],
        "a Service, a claim and its consumer were made"
    );
    assert!(
        lab.temporary_objects().is_empty(),
        "{:?}",
        lab.temporary_objects()
    );
    let metrics = metrics_text(&lab.agent.http).await;
    assert!(
        metrics.contains(r#"infraflux_check_ok{kind="acceptance",check="lb_pool"} 1"#),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"check="hostnames""#),
        "a skipped check sets nothing"
    );
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_platform_fails_each_check_naming_the_object_and_the_fix() {
    let lab = lab(ACCEPTANCE, |_| {}).await;
    let kube = &lab.kube;
    kube.set_node_ready("w1", false);
    kube.add_object(
        "pods",
        "cilium",
        "cilium-operator-5d9f-abcde",
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "cilium-operator-5d9f-abcde", "namespace": "cilium"},
               "spec": {"nodeName": "w1", "containers": [{"name": "operator", "image": "quay.io/cilium/operator:v1.18"}]},
               "status": {"phase": "Running", "containerStatuses": [{"name": "operator", "ready": false, "restartCount": 7,
                   "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s restarting failed container"}},
                   "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": Utc::now().to_rfc3339()}}}]}}),
    );
    kube.add_app("argocd", "apps", "OutOfSync", "Degraded", &[]);
    kube.add_daemonset("kube-system", "kube-proxy");
    kube.add_namespace(
        "media",
        json!({"pod-security.kubernetes.io/enforce": "baseline"}),
    );
    kube.add_storage_location(
        "velero",
        "default",
        "Unavailable",
        chrono::Duration::minutes(1),
    );
    kube.add_object(
        "externalsecrets",
        "apps",
        "db",
        json!({"apiVersion": "external-secrets.io/v1", "kind": "ExternalSecret",
               "metadata": {"name": "db", "namespace": "apps"},
               "status": {"conditions": [condition("Ready", "False", "SecretSyncedError", "could not get secret data from provider")]}}),
    );
    kube.add_object(
        "gatewayclasses",
        "",
        "cilium",
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
               "metadata": {"name": "cilium"}, "spec": {"controllerName": "io.cilium/gateway-controller"},
               "status": {"conditions": [condition("Accepted", "Unknown", "Pending", "Waiting for controller")]}}),
    );
    set_certificate(kube, chrono::Duration::days(3) + chrono::Duration::hours(2));
    kube.add_object(
        "clusterissuers",
        "",
        "letsencrypt",
        json!({"apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer",
               "metadata": {"name": "letsencrypt"},
               "spec": {"acme": {"server": "https://acme-v02.api.letsencrypt.org/directory", "privateKeySecretRef": {"name": "le"},
                        "solvers": [{"dns01": {"cloudflare": {"email": "ops@lab.example", "apiKeySecretRef": {"name": "cloudflare", "key": "api-key"}}}}]}}}),
    );
    // The pool hands out addresses of another range; the provisioner binds nothing.
    kube.set_lb_addresses(&["192.168.1.50"]);
    kube.withhold_claims(true);

    let done = lab.run().await;
    assert_eq!(done["state"], "failed", "{done}");
    let expect = [
        (
            "nodes.ready",
            "node w1 is not Ready: Ready=False (KubeletNotReady: kubelet is posting ready status)",
        ),
        (
            "pods.crashloop",
            "pod cilium/cilium-operator-5d9f-abcde container operator in CrashLoopBackOff (7 restarts)",
        ),
        (
            "argocd.apps",
            "Application argocd/apps is OutOfSync/Degraded",
        ),
        (
            "cilium.kube_proxy",
            "DaemonSet kube-system/kube-proxy exists",
        ),
        ("pod_security", "namespace media enforces baseline"),
        (
            "velero.location",
            "BackupStorageLocation velero/default is Unavailable: BackupStorageLocation \"default\" is unavailable",
        ),
        (
            "external_secrets",
            "ExternalSecret apps/db not synced: Ready=False (SecretSyncedError: could not get secret data from provider)",
        ),
        (
            "gateway.classes",
            "GatewayClass cilium (controller io.cilium/gateway-controller) not Accepted: Accepted=Unknown",
        ),
        (
            "http_routes",
            "route apps/home: certificate gateway/wildcard expires in 3 days (at least 14 wanted)",
        ),
        (
            "cert_manager.cloudflare",
            "ClusterIssuer letsencrypt uses the Cloudflare global API key (apiKeySecretRef)",
        ),
        ("lb_pool", "got 192.168.1.50, outside lb_pool 10.0.0.240/28"),
        (
            "storage",
            "on StorageClass longhorn not Bound within 4s (WaitForFirstConsumer: with a pod using it)",
        ),
    ];
    for (name, message) in expect {
        let c = check(&done, name);
        assert_eq!(c["ok"], false, "{name}: {c}");
        assert_eq!(c["skipped"], false, "{name}: {c}");
        assert!(
            c["message"].as_str().is_some_and(|m| m.contains(message)),
            "{name}: want {message:?} in {c}"
        );
        assert!(
            c["fix"].as_str().is_some_and(|f| !f.is_empty()),
            "{name} says what to do: {c}"
        );
    }
    assert_eq!(done["result"]["failed"], 12, "{}", done["result"]);
    assert_eq!(done["result"]["passed"], 0, "{}", done["result"]);
    let message = done["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("acceptance: 0/12 passed, 2 skipped; failed: "),
        "{message}"
    );
    assert!(
        message.contains("certificate gateway/wildcard expires in 3 days"),
        "{message}"
    );
    assert_eq!(
        lab.created_temporary().len(),
        3,
        "{:?}",
        lab.created_temporary()
    );
    assert!(
        lab.temporary_objects().is_empty(),
        "deleted although the checks failed: {:?}",
        lab.temporary_objects()
    );
    let metrics = metrics_text(&lab.agent.http).await;
    assert!(
        metrics.contains(r#"infraflux_check_ok{kind="acceptance",check="http_routes"} 0"#),
        "{metrics}"
    );
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_deletes_its_temporary_objects() {
    let lab = lab(
        "[acceptance]\nlb_pool = \"10.0.0.240/28\"\nlb_timeout = \"60s\"\n",
        |_| {},
    )
    .await;
    // No address comes: the check waits until the cancel.
    lab.kube.set_lb_addresses(&[]);
    let job = submit(&lab.client, "acceptance").await;
    wait_for(Duration::from_secs(20), "the temporary Service", || async {
        (!lab.temporary_objects().is_empty()).then_some(())
    })
    .await;
    let reply = command(&lab.client, &format!("cancel {job}")).await;
    assert_eq!(reply["ok"], true, "{reply}");
    let done = wait_settled(&lab.client, &job, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(
        lab.temporary_objects().is_empty(),
        "{:?}",
        lab.temporary_objects()
    );
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_job_of_a_kind_in_after_is_followed_by_one_acceptance() {
    let log = RunLog::default();
    let upgrade_log = log.clone();
    let lab = lab(
        "[upgrade]\n[acceptance]\nafter = [\"upgrade\"]\nstorage = false\npod_security_exceptions = [\"longhorn-system\"]\n",
        move |r| {
            r.register(Arc::new(TestHandler::new(
                JobKind::UPGRADE,
                Behaviour::Sleep(Duration::from_millis(50)),
                upgrade_log,
            )))
        },
    )
    .await;
    let parent = submit(&lab.client, "upgrade talos v1.13.0").await;
    let done = wait_settled(&lab.client, &parent, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let follow_up = wait_for(Duration::from_secs(20), "the acceptance job", || async {
        all_records(&lab.client)
            .await
            .into_iter()
            .find(|r| r["kind"] == "acceptance")
    })
    .await;
    assert_eq!(follow_up["source"], "follow-up", "{follow_up}");
    assert_eq!(follow_up["requested_by"], format!("upgrade {parent}"));
    let id = follow_up["job_id"].as_str().expect("id").to_string();
    let child = wait_settled(&lab.client, &id, Duration::from_secs(30)).await;
    assert_eq!(child["state"], "succeeded", "{child}");
    assert_eq!(check(&child, "nodes.ready")["ok"], true, "{child}");
    // The upgrade's record says how its acceptance went.
    let noted = wait_for(
        Duration::from_secs(10),
        "the note on the upgrade",
        || async {
            let parent = record(&lab.client, &parent).await;
            (parent["acceptance"]["state"] == "succeeded").then_some(parent)
        },
    )
    .await;
    assert_eq!(noted["acceptance"]["job_id"], id.as_str(), "{noted}");
    assert_eq!(noted["state"], "succeeded", "{noted}");

    // An upgrade that leaves a node NotReady: its acceptance fails, and the upgrade's record
    // says so with the check that failed.
    lab.kube.set_node_ready("w1", false);
    let broken = submit(&lab.client, "upgrade talos v1.13.1").await;
    let done = wait_settled(&lab.client, &broken, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let noted = wait_for(Duration::from_secs(30), "the failure noted", || async {
        let parent = record(&lab.client, &broken).await;
        (parent["acceptance"]["state"] == "failed").then_some(parent)
    })
    .await;
    let message = noted["acceptance"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("failed") && message.contains("w1"),
        "{noted}"
    );
    assert_eq!(
        noted["state"], "succeeded",
        "the upgrade itself stays succeeded"
    );
    // Each successful upgrade got one acceptance; nothing else was followed.
    let acceptances = all_records(&lab.client)
        .await
        .into_iter()
        .filter(|r| r["kind"] == "acceptance")
        .count();
    assert_eq!(acceptances, 2);
    lab.agent.stop().await;
}

/// `hostnames`: resolved from this host, fetched over HTTPS, the certificate checked for the
/// name, the issuer and `cert_min_days`; each failure names the host and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hostname_resolves_and_serves_a_valid_certificate() {
    use infraflux_tests::tls::{TestCa, serve};
    let ca = TestCa::new("infraflux lab CA");
    let ok = |_: &infraflux_tests::tls::Request| ("200 OK".to_string(), "{}".to_string());
    let good = serve(ca.server_config(&["localhost"], 90), ok);
    let expiring = serve(ca.server_config(&["localhost"], 4), ok);
    let other_name = serve(ca.server_config(&["other.lab.example"], 90), ok);
    let failing = serve(ca.server_config(&["localhost"], 90), |_| {
        ("503 Service Unavailable".to_string(), "{}".to_string())
    });
    let stranger = TestCa::new("someone else's CA");
    let untrusted = serve(stranger.server_config(&["localhost"], 90), ok);
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_path = dir.path().join("lab-ca.pem");
    std::fs::write(&ca_path, &ca.pem).expect("ca");
    let hosts = [
        format!("localhost:{good}"),
        format!("localhost:{expiring}"),
        format!("localhost:{other_name}"),
        format!("localhost:{failing}"),
        format!("localhost:{untrusted}"),
        "nowhere.invalid".to_string(),
    ];
    let listed: Vec<String> = hosts.iter().map(|h| format!("{h:?}")).collect();
    let lab = lab(
        &format!(
            "[acceptance]\nstorage = false\npod_security_exceptions = [\"longhorn-system\"]\nhostnames = [{}]\nca_cert = \"{}\"\n",
            listed.join(", "),
            ca_path.display()
        ),
        |_| {},
    )
    .await;
    let done = lab.run().await;
    assert_eq!(done["state"], "failed", "{done}");
    let host = |i: usize| check(&done, &format!("hostname.{}", hosts[i]));
    let text = |c: &Value, key: &str| c[key].as_str().unwrap_or_default().to_string();

    assert_eq!(host(0)["ok"], true, "{}", host(0));
    let message = text(host(0), "message");
    assert!(
        message.contains("resolves to 127.0.0.1")
            && message.contains("answered 200 OK")
            && message.contains("certificate valid for 89 more days"),
        "{message}"
    );

    let expiring = host(1);
    assert_eq!(expiring["ok"], false);
    assert!(
        text(expiring, "message").contains("expires in 3 days")
            && text(expiring, "message").contains("cert_min_days = 14")
            && text(expiring, "fix").contains("kubectl get certificate"),
        "{expiring}"
    );
    let other = host(2);
    assert!(
        other["ok"] == false && text(other, "fix").contains("does not name localhost"),
        "{other}"
    );
    let failing = host(3);
    assert!(
        failing["ok"] == false && text(failing, "message").contains("503"),
        "{failing}"
    );
    let untrusted = host(4);
    assert!(
        untrusted["ok"] == false
            && text(untrusted, "fix").contains("neither a public CA nor acceptance.ca_cert"),
        "{untrusted}"
    );
    let nowhere = host(5);
    assert!(
        nowhere["ok"] == false
            && text(nowhere, "message").contains("nowhere.invalid does not resolve")
            && text(nowhere, "fix").contains("add a DNS record for nowhere.invalid"),
        "{nowhere}"
    );
    assert_eq!(done["result"]["failed"], 5, "{done}");
    let metrics = metrics_text(&lab.agent.http).await;
    assert!(
        metrics.contains(&format!(
            r#"infraflux_check_ok{{kind="acceptance",check="hostname.localhost:{good}"}} 1"#
        )) && metrics.contains(
            r#"infraflux_check_ok{kind="acceptance",check="hostname.nowhere.invalid"} 0"#
        ),
        "{metrics}"
    );
    lab.agent.stop().await;
}
