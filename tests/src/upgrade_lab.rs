//! The rolling-upgrade lab shared by the upgrade tests and the benchmark: NATS, a real S3
//! server for the snapshot gate, the fake Kubernetes API (Nodes, pods, the eviction API, the
//! Argo CD root app, Cilium's config) and the fake Talos API (five nodes on their own loopback
//! addresses, both upgrade APIs, reboots that take the fake Node down and bring it back on the
//! new version).

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::fakes::FakeKube;
use crate::peers::S3Server;
use crate::talos_fake::{FakeNode, FakeTalos, RebootPhase};
use crate::{Nats, TestAgent, init, start_agent_with_env, submit, wait_settled};

/// name, control plane, Talos address.
pub const NODES: [(&str, bool, &str); 5] = [
    ("cp-1", true, "127.0.0.11"),
    ("cp-2", true, "127.0.0.12"),
    ("cp-3", true, "127.0.0.13"),
    ("w-1", false, "127.0.0.21"),
    ("w-2", false, "127.0.0.22"),
];

pub const TARGET: &str = "v1.13.2";
pub const KUBELET: &str = "v1.34.1";

pub struct UpgradeLab {
    pub nats: Nats,
    pub s3: S3Server,
    pub kube: Arc<FakeKube>,
    pub talos: FakeTalos,
    pub client: async_nats::Client,
    pub dir: tempfile::TempDir,
    /// The agent's config without its `[agent]`/`[nats]` sections.
    pub toml: String,
}

/// The lab: `versions` per node of [`NODES`], `extra` TOML in `[upgrade]`.
pub async fn upgrade_lab(versions: [&str; 5], extra: &str) -> UpgradeLab {
    init();
    let nats = Nats::start();
    let s3 = S3Server::start("etcd").await;
    let kube = Arc::new(FakeKube::start("argocd").await);
    let fake_nodes: Vec<FakeNode> = NODES
        .iter()
        .zip(versions)
        .map(|((name, cp, address), version)| {
            if *cp {
                FakeNode::control_plane(name, address, version)
            } else {
                FakeNode::worker(name, address, version)
            }
        })
        .collect();
    for node in &fake_nodes {
        kube.add_node(
            &node.name,
            node.control_plane,
            &node.address,
            &node.version,
            KUBELET,
        );
        // Cilium's agent on every node: a DaemonSet pod, which a drain leaves.
        kube.add_pod(
            "kube-system",
            &format!("cilium-{}", node.name),
            &node.name,
            json!({"k8s-app": "cilium"}),
            Some("DaemonSet"),
        );
    }
    // Two replicas of an app on the workers: each drain moves one to another node.
    kube.add_pod(
        "home",
        "web-a",
        "w-1",
        json!({"app": "web"}),
        Some("ReplicaSet"),
    );
    kube.add_pod(
        "home",
        "web-b",
        "w-2",
        json!({"app": "web"}),
        Some("ReplicaSet"),
    );
    kube.add_config_map(
        "kube-system",
        "cilium-config",
        json!({"kube-proxy-replacement": "true"}),
    );
    kube.add_app("argocd", "root", "Synced", "Healthy", &[]);

    let talos = FakeTalos::cluster(&fake_nodes).await;
    let coupled = kube.clone();
    talos.on_reboot(Box::new(move |name, phase| match phase {
        RebootPhase::Down => coupled.set_node_ready(name, false),
        RebootPhase::Up { version } => {
            coupled.set_node_talos(name, &version);
            coupled.set_node_ready(name, true);
        }
    }));

    let dir = tempfile::tempdir().expect("tempdir");
    let talosconfig = dir.path().join("talosconfig");
    std::fs::write(&talosconfig, talos.talosconfig()).expect("talosconfig");
    let toml = format!(
        r#"
[kubernetes]
kubeconfig = "{kubeconfig}"

[talos]
talosconfig = "{talosconfig}"
cluster = "lab"

[s3]
endpoint = "{endpoint}"
access_key_id = "env:TEST_S3_KEY"
secret_access_key = "env:TEST_S3_SECRET"
path_style = true

[etcd_snapshot]
bucket = "etcd"
prefix = "prod/"
compression = "zstd"

[reconcile]
repo_url = "file:///nonexistent"
workdir = "."
env = "lab"
argocd_app = "root"

[upgrade]
schematic = "376567988ad370138ad8b2698212367b8edcb69b5fd68c80be1f2ec7d603b4ba"
{extra}{defaults}
"#,
        kubeconfig = kube.kubeconfig(dir.path()).display(),
        talosconfig = talosconfig.display(),
        endpoint = s3.endpoint,
        // The lab's timings, unless `extra` sets its own.
        defaults = [
            ("drain_timeout", "5s"),
            ("node_timeout", "20s"),
            ("soak", "1s")
        ]
        .iter()
        .filter(|(key, _)| !extra.contains(&format!("{key} =")))
        .map(|(key, value)| format!("{key} = \"{value}\"\n"))
        .collect::<String>(),
    );
    let client = nats.client().await;
    UpgradeLab {
        nats,
        s3,
        kube,
        talos,
        client,
        dir,
        toml,
    }
}

pub const S3_ENV: [(&str, &str); 2] = [
    ("TEST_S3_KEY", "testing"),
    ("TEST_S3_SECRET", "testing-secret"),
];

impl UpgradeLab {
    pub async fn agent(&self, id: &str) -> TestAgent {
        start_agent_with_env(&self.nats, id, &self.toml, &S3_ENV, |_| {}).await
    }

    pub async fn run(&self, text: &str) -> Value {
        let job = submit(&self.client, text).await;
        wait_settled(&self.client, &job, Duration::from_secs(120)).await
    }

    pub fn node(&self, name: &str) -> Value {
        self.kube
            .node(name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn cordoned(&self, name: &str) -> bool {
        self.node(name)["spec"]["unschedulable"] == true
    }

    pub fn os_image(&self, name: &str) -> String {
        self.node(name)["status"]["nodeInfo"]["osImage"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Node names in the order their upgrades were asked for.
    pub fn upgraded(&self) -> Vec<String> {
        self.talos
            .upgrade_log()
            .into_iter()
            .map(|u| u.node)
            .collect()
    }

    /// How long each node stays away when it reboots.
    pub fn set_reboot_duration(&self, duration: Duration) {
        for (name, _, _) in NODES {
            self.talos.set_node(name, |b| b.reboot_duration = duration);
        }
    }

    /// The seconds the nodes spent rebooting, in total.
    pub fn rebooting(&self) -> Duration {
        self.talos
            .down_intervals()
            .iter()
            .filter_map(|d| d.until.map(|until| until.duration_since(d.from)))
            .sum()
    }
}
