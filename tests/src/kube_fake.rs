//! A fake Kubernetes API that speaks the real HTTP/JSON shapes: Argo CD Applications, Velero
//! objects and the core and apps resources a restore drill touches, with small controllers
//! standing in for Argo CD, Velero and the kubelet; and for a rolling upgrade, Nodes, Pods on
//! them, PodDisruptionBudgets and the eviction subresource, with the ReplicaSet and StatefulSet
//! controllers and the scheduler replacing evicted pods.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use chrono::Utc;
use serde_json::{Value, json};

use crate::fakes::{Recorded, serve};

// ---------------------------------------------------------------------------------------------
// Kubernetes: Argo CD Applications and Velero objects

#[derive(Default)]
struct KubeState {
    /// `plural/namespace/name` → object.
    objects: BTreeMap<String, Value>,
    requests: Vec<Recorded>,
    /// How the fake Argo CD controller ends a sync, and the message it records.
    controller_phase: String,
    controller_message: String,
    /// The `status` the fake Velero controller gives a backup when it ends.
    backup_outcome: Value,
    next_uid: u64,
    /// Every object created, by a client or by the fake Velero restore, in order.
    created: Vec<Value>,
    /// Deployments (by name) that never become available.
    never_available: std::collections::BTreeSet<String>,
    /// The next restores complete having restored nothing.
    restores_nothing: bool,
    /// Restores stay `InProgress` while set.
    hold_restores: bool,
    /// What a GET through the service proxy answers.
    proxy_status: u16,
    /// Evicted pods stay terminating (on their node, with a deletionTimestamp) while set.
    hold_pod_termination: bool,
    /// The fake LB IPAM's addresses, handed to LoadBalancer Services in order; none: no
    /// Service gets an address.
    lb_addresses: Vec<String>,
    /// The fake provisioner binds no new claim while set.
    withhold_claims: bool,
}

#[derive(Clone)]
pub struct FakeKube {
    pub url: String,
    state: Arc<Mutex<KubeState>>,
}

fn object_key(plural: &str, namespace: &str, name: &str) -> String {
    format!("{plural}/{namespace}/{name}")
}

impl FakeKube {
    /// A Kubernetes API holding namespaced custom objects, with two small controllers:
    /// Argo CD's (a requested sync completes after a moment: `operation` cleared,
    /// `operationState` recorded, sync and health set) and Velero's (a new Backup goes
    /// `InProgress`, then ends with the outcome the test set).
    pub async fn start(namespace: &str) -> FakeKube {
        let state = Arc::new(Mutex::new(KubeState {
            controller_phase: "Succeeded".into(),
            controller_message: "successfully synced (all tasks run)".into(),
            backup_outcome: json!({"phase": "Completed", "progress": {"itemsBackedUp": 42, "totalItems": 42}, "warnings": 0, "errors": 0}),
            proxy_status: 200,
            ..Default::default()
        }));
        let router = Router::new()
            .route(
                "/apis/{group}/{version}/namespaces/{ns}/{plural}",
                any(kube_collection),
            )
            .route(
                "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}",
                any(kube_object),
            )
            // Cluster-scoped custom objects, and namespaced ones listed across namespaces.
            .route(
                "/apis/{group}/{version}/{plural}",
                any(kube_cluster_collection),
            )
            .route(
                "/apis/{group}/{version}/{plural}/{name}",
                any(kube_cluster_object),
            )
            .route("/api/v1/nodes", any(core_nodes))
            .route("/api/v1/nodes/{name}", any(core_node))
            .route("/api/v1/pods", any(core_all_pods))
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}/eviction",
                any(pod_eviction),
            )
            .route("/api/v1/namespaces", any(core_namespaces))
            .route("/api/v1/namespaces/{name}", any(core_namespace))
            .route("/api/v1/namespaces/{ns}/{plural}", any(core_collection))
            .route("/api/v1/namespaces/{ns}/{plural}/{name}", any(core_object))
            .route(
                "/api/v1/namespaces/{ns}/services/{service}/proxy",
                any(service_proxy),
            )
            .route(
                "/api/v1/namespaces/{ns}/services/{service}/proxy/",
                any(service_proxy),
            )
            .route(
                "/api/v1/namespaces/{ns}/services/{service}/proxy/{*rest}",
                any(service_proxy_path),
            )
            .route("/version", any(kube_version))
            .fallback(kube_not_found)
            .with_state(state.clone());
        let addr = serve(router).await;
        let controller = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut st = controller.lock().unwrap_or_else(|p| p.into_inner());
                let phase = st.controller_phase.clone();
                let message = st.controller_message.clone();
                let outcome = st.backup_outcome.clone();
                let never_available = st.never_available.clone();
                let held = claims_held(&st);
                lb_ipam_controller(&mut st);
                for (key, obj) in st.objects.iter_mut() {
                    if key.starts_with("applications/")
                        && obj.get("operation").is_some_and(|o| !o.is_null())
                    {
                        let op = obj["operation"].clone();
                        obj["operation"] = Value::Null;
                        obj["status"]["operationState"] = json!({
                            "phase": phase, "message": message,
                            "operation": op, "startedAt": Utc::now().to_rfc3339(), "finishedAt": Utc::now().to_rfc3339(),
                        });
                        if phase == "Succeeded" {
                            obj["status"]["sync"]["status"] = json!("Synced");
                            obj["status"]["health"]["status"] = json!("Healthy");
                        }
                    }
                    if key.starts_with("backups/") {
                        match obj["status"]["phase"].as_str() {
                            None | Some("New") => {
                                obj["status"] = json!({"phase": "InProgress", "startTimestamp": Utc::now().to_rfc3339()});
                            }
                            Some("InProgress") => {
                                let mut status = outcome.clone();
                                status["startTimestamp"] = obj["status"]["startTimestamp"].clone();
                                status["completionTimestamp"] = json!(Utc::now().to_rfc3339());
                                obj["status"] = status;
                            }
                            _ => {}
                        }
                    }
                    let never = is_never_available(&never_available, key, obj);
                    if !held.contains(key) {
                        workload_controller(key, obj, never);
                    }
                }
                restore_controller(&mut st);
                pod_controller(&mut st);
            }
        });
        let _ = namespace;
        FakeKube {
            url: format!("http://{addr}"),
            state,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KubeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_object(&self, plural: &str, namespace: &str, name: &str, object: Value) {
        self.lock()
            .objects
            .insert(object_key(plural, namespace, name), object);
    }

    /// A namespace with `labels`.
    pub fn add_namespace(&self, name: &str, labels: Value) {
        let ns = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels, "uid": format!("uid-ns-{name}"), "resourceVersion": "1"},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"},
        });
        self.add_object("namespaces", "", name, ns);
    }

    /// The namespaces, by name.
    pub fn namespace_names(&self) -> Vec<String> {
        self.objects("namespaces")
            .iter()
            .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_string))
            .collect()
    }

    /// A `Completed` Velero Backup in `velero_ns` of `namespaces`, completed `ago` ago. The fake
    /// restore controller restores a namespace from what it holds *now*: the objects the test
    /// put in it stand for the backup's contents.
    pub fn add_backup(
        &self,
        velero_ns: &str,
        name: &str,
        namespaces: &[&str],
        ago: chrono::Duration,
    ) {
        let done = Utc::now() - ago;
        let backup = json!({
            "apiVersion": "velero.io/v1", "kind": "Backup",
            "metadata": {"name": name, "namespace": velero_ns, "uid": format!("uid-backup-{name}"), "resourceVersion": "1"},
            "spec": {"includedNamespaces": namespaces, "storageLocation": "default", "ttl": "720h0m0s"},
            "status": {"phase": "Completed", "startTimestamp": (done - chrono::Duration::minutes(3)).to_rfc3339(),
                       "completionTimestamp": done.to_rfc3339(), "progress": {"itemsBackedUp": 12, "totalItems": 12}},
        });
        self.add_object("backups", velero_ns, name, backup);
    }

    /// Deployment `name` never becomes available.
    pub fn set_never_available(&self, name: &str) {
        self.lock().never_available.insert(name.to_string());
    }

    /// The next restores complete having restored nothing.
    pub fn set_restores_nothing(&self, nothing: bool) {
        self.lock().restores_nothing = nothing;
    }

    /// Restores stay `InProgress` while `hold` is set.
    pub fn hold_restores(&self, hold: bool) {
        self.lock().hold_restores = hold;
    }

    /// What a GET through the service proxy answers.
    pub fn set_proxy_status(&self, status: u16) {
        self.lock().proxy_status = status;
    }

    /// Every object created so far, by clients or by a restore.
    pub fn created(&self) -> Vec<Value> {
        self.lock().created.clone()
    }

    pub fn object(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&object_key(plural, namespace, name))
            .cloned()
    }

    /// Every object of a kind, for assertions.
    pub fn objects(&self, plural: &str) -> Vec<Value> {
        let prefix = format!("{plural}/");
        self.lock()
            .objects
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// How the next Argo CD syncs end: their `operationState` phase and message.
    pub fn set_sync_outcome(&self, phase: &str, message: &str) {
        let mut st = self.lock();
        st.controller_phase = phase.to_string();
        st.controller_message = message.to_string();
    }

    /// The `status` the next backups end with.
    pub fn set_backup_outcome(&self, status: Value) {
        self.lock().backup_outcome = status;
    }

    /// Adds an Application `name` in `namespace` with the given sync and health, and the child
    /// Applications it manages.
    pub fn add_app(
        &self,
        namespace: &str,
        name: &str,
        sync: &str,
        health: &str,
        children: &[&str],
    ) {
        let resources: Vec<Value> = children
            .iter()
            .map(|c| json!({"group": "argoproj.io", "version": "v1alpha1", "kind": "Application", "namespace": namespace, "name": c, "status": "Synced"}))
            .collect();
        let app = json!({
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Application",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "resourceVersion": "1", "generation": 1},
            "spec": {"project": "default", "source": {"repoURL": "https://github.com/lab/infra.git", "path": format!("apps/{name}"), "targetRevision": "main"}, "destination": {"server": "https://kubernetes.default.svc", "namespace": namespace}},
            "status": {"sync": {"status": sync}, "health": {"status": health}, "resources": resources},
        });
        self.add_object("applications", namespace, name, app);
    }

    pub fn app(&self, namespace: &str, name: &str) -> Option<Value> {
        self.object("applications", namespace, name)
    }

    /// A Velero BackupStorageLocation in `phase`, validated `validated_ago` ago.
    pub fn add_storage_location(
        &self,
        namespace: &str,
        name: &str,
        phase: &str,
        validated_ago: chrono::Duration,
    ) {
        let bsl = json!({
            "apiVersion": "velero.io/v1",
            "kind": "BackupStorageLocation",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-bsl-{name}"), "resourceVersion": "1"},
            "spec": {"provider": "aws", "objectStorage": {"bucket": "infraflux-velero"}, "default": true},
            "status": {
                "phase": phase,
                "lastValidationTime": (Utc::now() - validated_ago).to_rfc3339(),
                "message": if phase == "Available" { "" } else { "BackupStorageLocation \"default\" is unavailable: rpc error: code = Unknown desc = InvalidAccessKeyId" },
            },
        });
        self.add_object("backupstoragelocations", namespace, name, bsl);
    }

    /// A Talos node: the control-plane role label when `control_plane`, Ready, its
    /// `InternalIP`, and `status.nodeInfo` with the kubelet's version and Talos's in the OS
    /// image (`Talos (v1.12.5)`).
    pub fn add_node(
        &self,
        name: &str,
        control_plane: bool,
        internal_ip: &str,
        talos_version: &str,
        kubelet_version: &str,
    ) {
        let mut labels = json!({
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
        });
        let mut spec = json!({"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]});
        if control_plane {
            labels["node-role.kubernetes.io/control-plane"] = json!("");
            // Talos's default: workloads stay off control planes.
            spec["taints"] =
                json!([{"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]);
        }
        let now = Utc::now().to_rfc3339();
        let condition = |kind: &str, status: &str, reason: &str, message: &str| {
            json!({"type": kind, "status": status, "reason": reason, "message": message,
                   "lastHeartbeatTime": now, "lastTransitionTime": now})
        };
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": format!("uid-node-{name}"), "resourceVersion": "1",
                         "creationTimestamp": now, "labels": labels, "annotations": {}},
            "spec": spec,
            "status": {
                "conditions": [
                    condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                    condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                    condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                    condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
                ],
                "addresses": [{"type": "InternalIP", "address": internal_ip}, {"type": "Hostname", "address": name}],
                "nodeInfo": {
                    "architecture": "amd64", "bootID": format!("boot-{name}"), "containerRuntimeVersion": "containerd://2.1.4",
                    "kernelVersion": "6.12.48-talos", "kubeProxyVersion": "", "kubeletVersion": kubelet_version,
                    "machineID": format!("machine-{name}"), "operatingSystem": "linux",
                    "osImage": format!("Talos ({talos_version})"), "systemUUID": format!("uuid-{name}"),
                },
            },
        });
        self.add_object("nodes", "", name, node);
    }

    fn update_node(&self, name: &str, change: impl FnOnce(&mut Value)) {
        let mut st = self.lock();
        if let Some(node) = st.objects.get_mut(&object_key("nodes", "", name)) {
            change(node);
            bump_resource_version(node);
        }
    }

    /// The node's `Ready` condition: `True`, or `False` (a rebooting node).
    pub fn set_node_ready(&self, name: &str, ready: bool) {
        self.update_node(name, |node| {
            for c in node["status"]["conditions"]
                .as_array_mut()
                .into_iter()
                .flatten()
            {
                if c["type"] == "Ready" {
                    c["status"] = json!(if ready { "True" } else { "False" });
                    c["reason"] = json!(if ready {
                        "KubeletReady"
                    } else {
                        "KubeletNotReady"
                    });
                    c["lastTransitionTime"] = json!(Utc::now().to_rfc3339());
                }
            }
        });
    }

    /// Talos `version` in the node's OS image, as after an upgrade.
    pub fn set_node_talos(&self, name: &str, version: &str) {
        self.update_node(name, |node| {
            node["status"]["nodeInfo"]["osImage"] = json!(format!("Talos ({version})"));
        });
    }

    /// `spec.unschedulable`, set as a person with kubectl would (no annotation).
    pub fn set_node_unschedulable(&self, name: &str, unschedulable: bool) {
        self.update_node(name, |node| {
            node["spec"]["unschedulable"] = json!(unschedulable);
        });
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.object("nodes", "", name)
    }

    /// A Running pod on `node`. `owner_kind` is its controller: `ReplicaSet`, `StatefulSet`
    /// or `DaemonSet` (named after the pod without its last `-suffix`), or `Node` for a
    /// static pod's mirror (owned by the node, with the `kubernetes.io/config.mirror`
    /// annotation); `None` for a bare pod.
    pub fn add_pod(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        labels: Value,
        owner_kind: Option<&str>,
    ) {
        let mut metadata = json!({
            "name": name, "namespace": namespace, "uid": format!("uid-pod-{namespace}-{name}"),
            "resourceVersion": "1", "creationTimestamp": Utc::now().to_rfc3339(), "labels": labels,
        });
        match owner_kind {
            Some("Node") => {
                metadata["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Node", "name": node,
                    "uid": format!("uid-node-{node}"), "controller": true}]);
                metadata["annotations"] = json!({
                    "kubernetes.io/config.mirror": format!("mirror-{name}"),
                    "kubernetes.io/config.source": "file",
                });
            }
            Some(kind) => {
                let owner = name.rsplit_once('-').map_or(name, |(owner, _)| owner);
                metadata["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": kind, "name": owner,
                    "uid": format!("uid-{}-{owner}", kind.to_lowercase()), "controller": true, "blockOwnerDeletion": true}]);
            }
            None => {}
        }
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.example/app:1"}],
                     "restartPolicy": "Always", "terminationGracePeriodSeconds": 30},
            "status": running_status(),
        });
        self.add_object("pods", namespace, name, pod);
    }

    /// The pod's `status.phase` (`Succeeded`, `Failed`: a finished pod).
    pub fn set_pod_phase(&self, namespace: &str, name: &str, phase: &str) {
        if let Some(pod) = self
            .lock()
            .objects
            .get_mut(&object_key("pods", namespace, name))
        {
            pod["status"]["phase"] = json!(phase);
            bump_resource_version(pod);
        }
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Value> {
        self.object("pods", namespace, name)
    }

    /// The pods bound to `node` (terminating ones included), as `namespace/name`.
    pub fn pods_on(&self, node: &str) -> Vec<String> {
        self.objects("pods")
            .iter()
            .filter(|p| p["spec"]["nodeName"] == node)
            .map(|p| {
                format!(
                    "{}/{}",
                    p["metadata"]["namespace"].as_str().unwrap_or_default(),
                    p["metadata"]["name"].as_str().unwrap_or_default()
                )
            })
            .collect()
    }

    /// Evicted pods stay terminating on their node while `hold` is set.
    pub fn hold_pod_termination(&self, hold: bool) {
        self.lock().hold_pod_termination = hold;
    }

    /// A policy/v1 PodDisruptionBudget over the pods with `match_labels`, keeping
    /// `min_available` of them: equal to their number, it allows no eviction at all.
    pub fn add_pdb(&self, namespace: &str, name: &str, match_labels: Value, min_available: i64) {
        let pdb = json!({
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-pdb-{name}"), "resourceVersion": "1"},
            "spec": {"minAvailable": min_available, "selector": {"matchLabels": match_labels}},
        });
        self.add_object("poddisruptionbudgets", namespace, name, pdb);
    }

    /// An apps/v1 DaemonSet (kube-proxy, Cilium's agent).
    pub fn add_daemonset(&self, namespace: &str, name: &str) {
        let labels = json!({"k8s-app": name});
        let ds = json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-ds-{name}"), "resourceVersion": "1", "labels": labels},
            "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels},
                     "spec": {"containers": [{"name": name, "image": format!("registry.k8s.io/{name}:v1.34.1")}]}}},
            "status": {"currentNumberScheduled": 3, "desiredNumberScheduled": 3, "numberMisscheduled": 0, "numberReady": 3},
        });
        self.add_object("daemonsets", namespace, name, ds);
    }

    /// A ConfigMap with `data` (string values).
    pub fn add_config_map(&self, namespace: &str, name: &str, data: Value) {
        let cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-cm-{name}"), "resourceVersion": "1"},
            "data": data,
        });
        self.add_object("configmaps", namespace, name, cm);
    }

    /// The fake LB IPAM (Cilium's) hands these addresses to new LoadBalancer Services, in
    /// order; empty: Services stay without an address.
    pub fn set_lb_addresses(&self, addresses: &[&str]) {
        let mut st = self.lock();
        st.lb_addresses = addresses.iter().map(|a| a.to_string()).collect();
    }

    /// A StorageClass; `default` carries the default-class annotation, `binding_mode` is
    /// `Immediate` or `WaitForFirstConsumer` (the fake provisioner binds such a claim once a
    /// pod names it).
    pub fn add_storage_class(&self, name: &str, default: bool, binding_mode: &str) {
        let class = json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": name, "uid": format!("uid-sc-{name}"), "resourceVersion": "1",
                         "annotations": {"storageclass.kubernetes.io/is-default-class": default.to_string()}},
            "provisioner": "driver.longhorn.io", "reclaimPolicy": "Delete",
            "volumeBindingMode": binding_mode, "allowVolumeExpansion": true,
            "parameters": {"numberOfReplicas": "3"},
        });
        self.add_object("storageclasses", "", name, class);
    }

    /// The fake provisioner binds no new claim while `withhold` is set (a broken Longhorn).
    pub fn withhold_claims(&self, withhold: bool) {
        self.lock().withhold_claims = withhold;
    }

    /// Removes an object, as a `kubectl delete` would.
    pub fn remove_object(&self, plural: &str, namespace: &str, name: &str) {
        self.lock()
            .objects
            .remove(&object_key(plural, namespace, name));
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// A kubeconfig pointing at this API server.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n",
            self.url
        );
        std::fs::write(&path, text).expect("kubeconfig");
        path
    }
}

/// The object changed: its `resourceVersion` moves on.
fn bump_resource_version(object: &mut Value) {
    let rv = object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1)
        + 1;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in p {
                if v.is_null() {
                    if let Some(t) = target.as_object_mut() {
                        t.remove(k);
                    }
                } else if let Some(t) = target.as_object_mut() {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

type KubeShared = State<Arc<Mutex<KubeState>>>;

fn kube_record(
    st: &mut KubeState,
    method: &Method,
    path: String,
    headers: &HeaderMap,
    body: &Bytes,
) {
    st.requests.push(Recorded {
        method: method.to_string(),
        path,
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    });
}

/// Where a request went: the group (`""` for core), version, namespace, plural and name.
struct Target {
    group: String,
    version: String,
    ns: String,
    plural: String,
}

impl Target {
    fn path(&self) -> String {
        let base = if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        };
        if self.ns.is_empty() {
            format!("{base}/{}", self.plural)
        } else {
            format!("{base}/namespaces/{}/{}", self.ns, self.plural)
        }
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// `key=value,key2=value2`: the equality selectors kube-rs sends.
fn matches_selector(object: &Value, selector: Option<&str>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    selector.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => object["metadata"]["labels"][k.trim()].as_str() == Some(v.trim()),
        None => object["metadata"]["labels"].get(term.trim()).is_some(),
    })
}

/// `spec.nodeName=w-1,status.phase!=Failed`: a field selector, over the object's JSON (a
/// missing field reads as empty, as the API server's do).
fn matches_fields(object: &Value, selector: Option<&str>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    selector.split(',').all(|term| {
        let (path, wanted, equal) = if let Some((p, v)) = term.split_once("!=") {
            (p, v, false)
        } else if let Some((p, v)) = term.split_once("==") {
            (p, v, true)
        } else if let Some((p, v)) = term.split_once('=') {
            (p, v, true)
        } else {
            return false;
        };
        let actual = path
            .trim()
            .split('.')
            .fold(object, |at, part| &at[part])
            .as_str()
            .unwrap_or_default();
        (actual == wanted.trim()) == equal
    })
}

/// `%XX` escapes and `+` (form encoding, as kube-rs builds queries) decoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn collection(
    st: &mut KubeState,
    target: &Target,
    method: &Method,
    headers: &HeaderMap,
    body: &Bytes,
    uri: &Uri,
) -> Response {
    kube_record(st, method, target.path(), headers, body);
    let (group, ns, plural) = (&target.group, &target.ns, &target.plural);
    match *method {
        Method::POST => {
            let mut object: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return kube_status(400, "BadRequest", &e.to_string()),
            };
            let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
                return kube_status(422, "Invalid", "metadata.name: Required value");
            };
            if let Some(problem) = schema_problem(group, plural, &object) {
                return kube_status(422, "Invalid", &problem);
            }
            if !ns.is_empty() && plural != "namespaces" && !namespace_exists(st, ns) {
                return kube_status(404, "NotFound", &format!("namespaces \"{ns}\" not found"));
            }
            if plural == "services"
                && let Some(problem) = service_problem(&object)
            {
                return kube_status(422, "Invalid", &problem);
            }
            let key = object_key(plural, ns, &name);
            if st.objects.contains_key(&key) {
                return kube_status(
                    409,
                    "AlreadyExists",
                    &format!("{plural}.{group} \"{name}\" already exists"),
                );
            }
            st.next_uid += 1;
            object["metadata"]["uid"] = json!(format!("uid-{}", st.next_uid));
            object["metadata"]["resourceVersion"] = json!("1");
            object["metadata"]["creationTimestamp"] = json!(Utc::now().to_rfc3339());
            if !ns.is_empty() {
                object["metadata"]["namespace"] = json!(ns);
            }
            if plural == "namespaces" {
                object["status"] = json!({"phase": "Active"});
            }
            st.objects.insert(key, object.clone());
            st.created.push(object.clone());
            (StatusCode::CREATED, axum::Json(object)).into_response()
        }
        Method::GET => {
            // Without a namespace: a cluster-scoped kind, or a namespaced one in all namespaces.
            let prefix = if ns.is_empty() {
                format!("{plural}/")
            } else {
                format!("{plural}/{ns}/")
            };
            let labels = query_param(uri, "labelSelector");
            let fields = query_param(uri, "fieldSelector");
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, v)| {
                    k.starts_with(&prefix)
                        && matches_selector(v, labels.as_deref())
                        && matches_fields(v, fields.as_deref())
                })
                .map(|(_, v)| v.clone())
                .collect();
            axum::Json(json!({"apiVersion": target.api_version(), "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items})).into_response()
        }
        _ => kube_status(405, "MethodNotAllowed", "method not allowed"),
    }
}

fn namespace_exists(st: &KubeState, ns: &str) -> bool {
    st.objects.contains_key(&object_key("namespaces", "", ns))
        // Namespaces the tests never declared (Argo CD's, Velero's) exist implicitly.
        || !st.objects.keys().any(|k| k.starts_with("namespaces/"))
        || ["argocd", "velero", "default", "kube-system"].contains(&ns)
}

fn object(
    st: &mut KubeState,
    target: &Target,
    name: &str,
    method: &Method,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    kube_record(
        st,
        method,
        format!("{}/{name}", target.path()),
        headers,
        body,
    );
    let (group, ns, plural) = (&target.group, &target.ns, &target.plural);
    let key = object_key(plural, ns, name);
    if *method == Method::DELETE && plural == "namespaces" {
        // The namespace controller's work, at once: everything in it goes with it.
        let inside = format!("/{name}/");
        st.objects
            .retain(|k, _| !k.contains(&inside) || k.starts_with("namespaces/"));
    }
    let Some(object) = st.objects.get_mut(&key) else {
        return kube_status(
            404,
            "NotFound",
            &format!("{plural}.{group} \"{name}\" not found"),
        );
    };
    match *method {
        Method::GET => axum::Json(object.clone()).into_response(),
        Method::PATCH => {
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if content_type != "application/merge-patch+json" {
                return kube_status(
                    415,
                    "UnsupportedMediaType",
                    &format!("the fake accepts merge patches, got {content_type}"),
                );
            }
            let patch: Value = serde_json::from_slice(body).unwrap_or_default();
            // A resourceVersion in the patch is a precondition, as the API server reads it.
            if let Some(expected) = patch["metadata"]["resourceVersion"].as_str()
                && object["metadata"]["resourceVersion"].as_str() != Some(expected)
            {
                return kube_status(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on {plural} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                );
            }
            let mut patched = object.clone();
            merge(&mut patched, &patch);
            if let Some(problem) = schema_problem(group, plural, &patched) {
                return kube_status(422, "Invalid", &problem);
            }
            *object = patched;
            bump_resource_version(object);
            axum::Json(object.clone()).into_response()
        }
        Method::DELETE => {
            let removed = st.objects.remove(&key);
            axum::Json(removed.unwrap_or(Value::Null)).into_response()
        }
        _ => kube_status(405, "MethodNotAllowed", "method not allowed"),
    }
}

async fn kube_collection(
    State(s): KubeShared,
    Path((group, version, ns, plural)): Path<(String, String, String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    let target = Target {
        group,
        version,
        ns,
        plural,
    };
    collection(&mut st, &target, &method, &headers, &body, &uri)
}

/// `/apis/{group}/{version}/{plural}`: a cluster-scoped kind, or a namespaced one across
/// namespaces.
async fn kube_cluster_collection(
    State(s): KubeShared,
    Path((group, version, plural)): Path<(String, String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    let target = Target {
        group,
        version,
        ns: String::new(),
        plural,
    };
    collection(&mut st, &target, &method, &headers, &body, &uri)
}

async fn kube_cluster_object(
    State(s): KubeShared,
    Path((group, version, plural, name)): Path<(String, String, String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    let target = Target {
        group,
        version,
        ns: String::new(),
        plural,
    };
    object(&mut st, &target, &name, &method, &headers, &body)
}

async fn kube_object(
    State(s): KubeShared,
    Path((group, version, ns, plural, name)): Path<(String, String, String, String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    let target = Target {
        group,
        version,
        ns,
        plural,
    };
    object(&mut st, &target, &name, &method, &headers, &body)
}

fn core(ns: &str, plural: &str) -> Target {
    Target {
        group: String::new(),
        version: "v1".into(),
        ns: ns.to_string(),
        plural: plural.to_string(),
    }
}

async fn core_namespaces(
    State(s): KubeShared,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    collection(
        &mut st,
        &core("", "namespaces"),
        &method,
        &headers,
        &body,
        &uri,
    )
}

async fn core_namespace(
    State(s): KubeShared,
    Path(name): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    object(
        &mut st,
        &core("", "namespaces"),
        &name,
        &method,
        &headers,
        &body,
    )
}

async fn core_collection(
    State(s): KubeShared,
    Path((ns, plural)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    collection(&mut st, &core(&ns, &plural), &method, &headers, &body, &uri)
}

async fn core_object(
    State(s): KubeShared,
    Path((ns, plural, name)): Path<(String, String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    object(
        &mut st,
        &core(&ns, &plural),
        &name,
        &method,
        &headers,
        &body,
    )
}

async fn core_nodes(
    State(s): KubeShared,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    collection(&mut st, &core("", "nodes"), &method, &headers, &body, &uri)
}

async fn core_node(
    State(s): KubeShared,
    Path(name): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    object(&mut st, &core("", "nodes"), &name, &method, &headers, &body)
}

/// Pods of every namespace (`GET /api/v1/pods`, with label and field selectors).
async fn core_all_pods(
    State(s): KubeShared,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    if method != Method::GET {
        return kube_status(405, "MethodNotAllowed", "method not allowed");
    }
    collection(&mut st, &core("", "pods"), &method, &headers, &body, &uri)
}

/// `POST /api/v1/namespaces/{ns}/pods/{name}/eviction` with a policy/v1 Eviction.
async fn pod_eviction(
    State(s): KubeShared,
    Path((ns, name)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    let path = format!("/api/v1/namespaces/{ns}/pods/{name}/eviction");
    kube_record(&mut st, &method, path, &headers, &body);
    if method != Method::POST {
        return kube_status(405, "MethodNotAllowed", "method not allowed");
    }
    let eviction: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return kube_status(400, "BadRequest", &e.to_string()),
    };
    if eviction["kind"].as_str().is_some_and(|k| k != "Eviction") {
        return kube_status(400, "BadRequest", "the body is not an Eviction");
    }
    if eviction["metadata"]["name"].as_str() != Some(name.as_str()) {
        return kube_status(
            400,
            "BadRequest",
            "name in URL does not match name in Eviction object",
        );
    }
    evict(&mut st, &ns, &name)
}

fn is_terminal_pod(pod: &Value) -> bool {
    matches!(
        pod["status"]["phase"].as_str(),
        Some("Succeeded" | "Failed")
    )
}

fn is_deleting(object: &Value) -> bool {
    object["metadata"]["deletionTimestamp"].is_string()
}

/// Running and Ready, not on its way out: what a disruption budget counts as healthy.
fn is_healthy_pod(pod: &Value) -> bool {
    let ready = pod["status"]["conditions"].as_array().is_none_or(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    });
    pod["status"]["phase"] == "Running" && ready && !is_deleting(pod)
}

/// A `metav1.LabelSelector` over `labels`: matchLabels and matchExpressions. An empty selector
/// selects everything (policy/v1), a missing one nothing.
fn selector_matches(selector: &Value, labels: &Value) -> bool {
    if !selector.is_object() {
        return false;
    }
    let match_labels = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels[k] == *v);
    let expressions = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let value = labels.get(key);
            let values = e["values"].as_array().cloned().unwrap_or_default();
            match e["operator"].as_str() {
                Some("In") => value.is_some_and(|v| values.contains(v)),
                Some("NotIn") => value.is_none_or(|v| !values.contains(v)),
                Some("Exists") => value.is_some(),
                Some("DoesNotExist") => value.is_none(),
                _ => false,
            }
        });
    match_labels && expressions
}

/// An int-or-string budget field: `2`, or `"50%"` of `of`, rounded up.
fn scaled(value: &Value, of: i64) -> Option<i64> {
    if let Some(n) = value.as_i64() {
        return Some(n);
    }
    let percent: i64 = value.as_str()?.strip_suffix('%')?.parse().ok()?;
    Some((percent * of + 99) / 100)
}

/// A budget's pods now: (healthy, desired healthy), as the disruption controller computes
/// them, with the pods that exist standing in for the controller's scale.
fn budget_health(st: &KubeState, ns: &str, pdb: &Value) -> (i64, i64) {
    let prefix = format!("pods/{ns}/");
    let pods: Vec<&Value> = st
        .objects
        .iter()
        .filter(|(k, p)| {
            k.starts_with(&prefix)
                && !is_terminal_pod(p)
                && !is_deleting(p)
                && selector_matches(&pdb["spec"]["selector"], &p["metadata"]["labels"])
        })
        .map(|(_, p)| p)
        .collect();
    let expected = i64::try_from(pods.len()).unwrap_or(i64::MAX);
    let healthy = i64::try_from(pods.iter().filter(|p| is_healthy_pod(p)).count()).unwrap_or(0);
    let spec = &pdb["spec"];
    let desired = if let Some(min) = scaled(&spec["minAvailable"], expected) {
        min
    } else if let Some(max) = scaled(&spec["maxUnavailable"], expected) {
        expected - max
    } else {
        // Neither: the API server defaults minAvailable to 1.
        1
    };
    (healthy, desired.max(0))
}

/// The API server's eviction: refused (429) when the pod's disruption budget allows no
/// disruption, else the pod starts terminating and its controller replaces it.
fn evict(st: &mut KubeState, ns: &str, name: &str) -> Response {
    let key = object_key("pods", ns, name);
    let Some(pod) = st.objects.get(&key).cloned() else {
        return kube_status(404, "NotFound", &format!("pods \"{name}\" not found"));
    };
    let accepted = || {
        (
            StatusCode::CREATED,
            axum::Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201})),
        )
            .into_response()
    };
    // Terminating already, or finished: no budget to honour.
    if is_deleting(&pod) {
        return accepted();
    }
    if !is_terminal_pod(&pod) {
        let budgets: Vec<(String, Value)> = st
            .objects
            .iter()
            .filter(|(k, b)| {
                k.starts_with(&format!("poddisruptionbudgets/{ns}/"))
                    && selector_matches(&b["spec"]["selector"], &pod["metadata"]["labels"])
            })
            .map(|(_, b)| {
                (
                    b["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    b.clone(),
                )
            })
            .collect();
        if budgets.len() > 1 {
            return kube_status(
                500,
                "InternalError",
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            );
        }
        if let Some((budget, pdb)) = budgets.first() {
            let (healthy, desired) = budget_health(st, ns, pdb);
            // An unhealthy pod may go while the budget is met (IfHealthyBudget, the default).
            let refused = if is_healthy_pod(&pod) {
                healthy - desired <= 0
            } else {
                healthy < desired
            };
            if refused {
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    axum::Json(json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": "Cannot evict pod as it would violate the pod's disruption budget.",
                        "reason": "TooManyRequests",
                        "details": {"causes": [{"reason": "DisruptionBudget", "message": format!("The disruption budget {budget} needs {desired} healthy pods and has {healthy} currently")}]},
                        "code": 429,
                    })),
                )
                    .into_response();
            }
        }
    }
    if let Some(pod) = st.objects.get_mut(&key) {
        pod["metadata"]["deletionTimestamp"] = json!(Utc::now().to_rfc3339());
        pod["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        bump_resource_version(pod);
    }
    // A ReplicaSet replaces a terminating pod at once, under a new name; a StatefulSet waits
    // until it is gone to create it again under the same name (see `pod_controller`).
    if controller_kind(&pod) == Some("ReplicaSet") {
        let owner = pod["metadata"]["ownerReferences"][0]["name"]
            .as_str()
            .unwrap_or(name)
            .to_string();
        st.next_uid += 1;
        let replacement_name = format!("{owner}-r{:04}", st.next_uid);
        let replacement = replacement(st, &pod, &replacement_name);
        st.objects
            .insert(object_key("pods", ns, &replacement_name), replacement);
    }
    accepted()
}

fn controller_kind(pod: &Value) -> Option<&str> {
    pod["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["controller"] == true)?["kind"]
        .as_str()
}

/// `pod` tolerates every NoSchedule and NoExecute taint of `node`.
fn tolerates(pod: &Value, node: &Value) -> bool {
    let tolerations = pod["spec"]["tolerations"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    node["spec"]["taints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["effect"] != "PreferNoSchedule")
        .all(|taint| {
            tolerations.iter().any(|t| {
                let key_fits = t["key"].is_null() || t["key"] == taint["key"];
                let value_fits = t["operator"] == "Exists" || t["value"] == taint["value"];
                let effect_fits = t["effect"].is_null() || t["effect"] == taint["effect"];
                key_fits && value_fits && effect_fits
            })
        })
}

/// The scheduler's choice for `pod`: a Ready, schedulable node whose taints it tolerates,
/// with the fewest pods (then by name).
fn schedule(st: &KubeState, pod: &Value) -> Option<String> {
    let load = |node: &str| {
        st.objects
            .iter()
            .filter(|(k, p)| k.starts_with("pods/") && p["spec"]["nodeName"] == node)
            .count()
    };
    st.objects
        .iter()
        .filter(|(k, n)| {
            k.starts_with("nodes/")
                && n["spec"]["unschedulable"] != true
                && tolerates(pod, n)
                && n["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        })
        .filter_map(|(_, n)| n["metadata"]["name"].as_str())
        .min_by_key(|name| (load(name), name.to_string()))
        .map(str::to_string)
}

/// A pod `name` made from `template` (the pod it replaces), placed by [`schedule`]: Running
/// there, or Pending with no node when none fits.
fn replacement(st: &mut KubeState, template: &Value, name: &str) -> Value {
    let mut pod = template.clone();
    st.next_uid += 1;
    if let Some(meta) = pod["metadata"].as_object_mut() {
        meta.remove("deletionTimestamp");
        meta.remove("deletionGracePeriodSeconds");
        meta.insert("name".into(), json!(name));
        meta.insert("uid".into(), json!(format!("uid-{}", st.next_uid)));
        meta.insert("resourceVersion".into(), json!("1"));
        meta.insert("creationTimestamp".into(), json!(Utc::now().to_rfc3339()));
    }
    place(st, &mut pod);
    pod
}

/// Binds `pod` to a node and runs it, or leaves it Pending and unscheduled.
fn place(st: &KubeState, pod: &mut Value) {
    match schedule(st, pod) {
        Some(node) => {
            pod["spec"]["nodeName"] = json!(node);
            pod["status"] = running_status();
        }
        None => {
            if let Some(spec) = pod["spec"].as_object_mut() {
                spec.remove("nodeName");
            }
            pod["status"] = json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/0 nodes are available: no node is Ready and schedulable."}]});
        }
    }
}

fn running_status() -> Value {
    let now = Utc::now().to_rfc3339();
    json!({"phase": "Running", "startTime": now, "conditions": [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        {"type": "Ready", "status": "True", "lastTransitionTime": now},
    ]})
}

/// The kubelet and the pod controllers, each tick: terminating pods are removed (unless held)
/// and a StatefulSet's recreated under the same name; Pending pods are scheduled once a node
/// fits.
fn pod_controller(st: &mut KubeState) {
    if !st.hold_pod_termination {
        let gone: Vec<(String, Value)> = st
            .objects
            .iter()
            .filter(|(k, p)| k.starts_with("pods/") && is_deleting(p))
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        for (key, pod) in gone {
            st.objects.remove(&key);
            if controller_kind(&pod) == Some("StatefulSet") {
                let name = pod["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let again = replacement(st, &pod, &name);
                st.objects.insert(key, again);
            }
        }
    }
    let unscheduled: Vec<String> = st
        .objects
        .iter()
        .filter(|(k, p)| {
            k.starts_with("pods/")
                && p["spec"]["nodeName"].is_null()
                && p["status"]["phase"] == "Pending"
                && !is_deleting(p)
        })
        .map(|(k, _)| k.clone())
        .collect();
    for key in unscheduled {
        let Some(mut pod) = st.objects.get(&key).cloned() else {
            continue;
        };
        place(st, &mut pod);
        if pod["spec"]["nodeName"].is_string() {
            st.objects.insert(key, pod);
        }
    }
}

/// The API server's service proxy: `<name>:<port>` of a Service in the namespace answers
/// with the status the test set; a Service that is not there answers 503, as a real proxy
/// with no endpoints does.
fn proxy(st: &mut KubeState, ns: &str, service: &str, rest: &str, headers: &HeaderMap) -> Response {
    let path = format!("/api/v1/namespaces/{ns}/services/{service}/proxy/{rest}");
    kube_record(st, &Method::GET, path, headers, &Bytes::new());
    let name = service
        .split(':')
        .find(|p| !matches!(*p, "http" | "https"))
        .unwrap_or(service);
    if !st.objects.contains_key(&object_key("services", ns, name)) {
        return kube_status(
            503,
            "ServiceUnavailable",
            &format!("no endpoints available for service \"{name}\""),
        );
    }
    let status = StatusCode::from_u16(st.proxy_status).unwrap_or(StatusCode::OK);
    (status, "served by the fake service proxy").into_response()
}

async fn service_proxy(
    State(s): KubeShared,
    Path((ns, service)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    proxy(&mut st, &ns, &service, "", &headers)
}

async fn service_proxy_path(
    State(s): KubeShared,
    Path((ns, service, rest)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    proxy(&mut st, &ns, &service, &rest, &headers)
}

/// What the API server refuses in a Service: a ClusterIP Service may carry none of the fields
/// of externally reachable ones.
fn service_problem(service: &Value) -> Option<String> {
    let spec = &service["spec"];
    let kind = spec["type"].as_str().unwrap_or("ClusterIP");
    if kind != "ClusterIP" {
        return None;
    }
    let name = service["metadata"]["name"].as_str().unwrap_or_default();
    for field in [
        "externalTrafficPolicy",
        "allocateLoadBalancerNodePorts",
        "loadBalancerClass",
        "healthCheckNodePort",
    ] {
        if spec.get(field).is_some_and(|v| !v.is_null()) {
            return Some(format!(
                "Service \"{name}\" is invalid: spec.{field}: Invalid value: may only be set for externally-accessible services"
            ));
        }
    }
    let node_port = spec["ports"].as_array().is_some_and(|ports| {
        ports
            .iter()
            .any(|p| p.get("nodePort").is_some_and(|v| !v.is_null()))
    });
    node_port.then(|| {
        format!("Service \"{name}\" is invalid: spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'")
    })
}

/// Deployments and StatefulSets become available and claims bound, as a kubelet and a
/// provisioner would make them; a Deployment named in `never` never does.
fn workload_controller(key: &str, obj: &mut Value, never: bool) {
    let replicas = obj["spec"]["replicas"].as_u64().unwrap_or(1);
    if key.starts_with("deployments/") && obj["status"]["availableReplicas"].is_null() && !never {
        obj["status"] = json!({"replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas, "updatedReplicas": replicas});
    }
    if key.starts_with("deployments/") && never {
        obj["status"] = json!({"replicas": replicas, "readyReplicas": 0, "availableReplicas": 0, "unavailableReplicas": replicas});
    }
    if key.starts_with("statefulsets/") && obj["status"]["readyReplicas"].is_null() {
        obj["status"] =
            json!({"replicas": replicas, "readyReplicas": replicas, "currentReplicas": replicas});
    }
    if key.starts_with("persistentvolumeclaims/") && obj["status"]["phase"].is_null() {
        obj["status"] = json!({"phase": "Bound"});
    }
}

/// Cilium's LB IPAM: a LoadBalancer Service without an address gets the next free one of
/// the pool the test set.
fn lb_ipam_controller(st: &mut KubeState) {
    let taken: std::collections::BTreeSet<String> = st
        .objects
        .iter()
        .filter(|(k, _)| k.starts_with("services/"))
        .filter_map(|(_, s)| s["status"]["loadBalancer"]["ingress"][0]["ip"].as_str())
        .map(str::to_string)
        .collect();
    let mut free = st
        .lb_addresses
        .iter()
        .filter(|a| !taken.contains(*a))
        .cloned()
        .collect::<Vec<_>>()
        .into_iter();
    for (key, service) in st.objects.iter_mut() {
        if key.starts_with("services/")
            && service["spec"]["type"] == "LoadBalancer"
            && service["status"]["loadBalancer"]["ingress"].is_null()
        {
            let Some(address) = free.next() else {
                return;
            };
            service["status"]["loadBalancer"] =
                json!({"ingress": [{"ip": address, "ipMode": "VIP"}]});
            bump_resource_version(service);
        }
    }
}

/// The claims the fake provisioner does not bind yet: all new ones while withheld, and those
/// of a `WaitForFirstConsumer` class (named, or the default) that no pod names.
fn claims_held(st: &KubeState) -> std::collections::BTreeSet<String> {
    let classes: Vec<&Value> = st
        .objects
        .iter()
        .filter(|(k, _)| k.starts_with("storageclasses/"))
        .map(|(_, c)| c)
        .collect();
    let default = classes.iter().find(|c| {
        c["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"] == "true"
    });
    let consumed = |ns: &str, claim: &str| {
        st.objects.iter().any(|(k, p)| {
            k.starts_with(&format!("pods/{ns}/"))
                && p["spec"]["volumes"].as_array().is_some_and(|volumes| {
                    volumes
                        .iter()
                        .any(|v| v["persistentVolumeClaim"]["claimName"] == claim)
                })
        })
    };
    st.objects
        .iter()
        .filter(|(k, c)| k.starts_with("persistentvolumeclaims/") && c["status"]["phase"].is_null())
        .filter(|(_, claim)| {
            if st.withhold_claims {
                return true;
            }
            let class = match claim["spec"]["storageClassName"].as_str() {
                Some(name) => classes.iter().find(|c| c["metadata"]["name"] == name),
                None => default,
            };
            let on_consumer =
                class.is_some_and(|c| c["volumeBindingMode"] == "WaitForFirstConsumer");
            on_consumer
                && !consumed(
                    claim["metadata"]["namespace"].as_str().unwrap_or_default(),
                    claim["metadata"]["name"].as_str().unwrap_or_default(),
                )
        })
        .map(|(k, _)| k.clone())
        .collect()
}

fn is_never_available(never: &std::collections::BTreeSet<String>, key: &str, obj: &Value) -> bool {
    key.starts_with("deployments/")
        && obj["metadata"]["name"]
            .as_str()
            .is_some_and(|n| never.contains(n))
}

/// Velero's restore controller, for what a drill asks: a new Restore goes `InProgress`, then
/// the namespaces it includes are copied from the objects they hold now (standing in for the
/// backup's contents) into their `namespaceMapping` targets, without `excludedResources`, each
/// Service through the `resourceModifier` rules and Velero's own Service action (node ports
/// dropped unless `preserveNodePorts`), then created as the API server would, or counted as an
/// error when it refuses.
fn restore_controller(st: &mut KubeState) {
    let keys: Vec<String> = st
        .objects
        .keys()
        .filter(|k| k.starts_with("restores/"))
        .cloned()
        .collect();
    for key in keys {
        let Some(restore) = st.objects.get(&key).cloned() else {
            continue;
        };
        let status = match restore["status"]["phase"].as_str() {
            None | Some("New") => {
                json!({"phase": "InProgress", "startTimestamp": Utc::now().to_rfc3339()})
            }
            Some("InProgress") if !st.hold_restores => {
                let mut status = perform_restore(st, &restore);
                status["startTimestamp"] = restore["status"]["startTimestamp"].clone();
                status["completionTimestamp"] = json!(Utc::now().to_rfc3339());
                status
            }
            _ => continue,
        };
        if let Some(r) = st.objects.get_mut(&key) {
            r["status"] = status;
        }
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn perform_restore(st: &mut KubeState, restore: &Value) -> Value {
    let velero_ns = restore["metadata"]["namespace"]
        .as_str()
        .unwrap_or("velero")
        .to_string();
    let spec = &restore["spec"];
    let backup_name = spec["backupName"].as_str().unwrap_or_default();
    let backup = st
        .objects
        .get(&object_key("backups", &velero_ns, backup_name));
    if backup.is_none_or(|b| b["status"]["phase"] != "Completed") {
        return json!({"phase": "FailedValidation", "validationErrors": [format!("backup {backup_name} not found or not Completed")]});
    }
    if st.restores_nothing {
        return json!({"phase": "Completed", "progress": {"itemsRestored": 0, "totalItems": 0}, "warnings": 0, "errors": 0});
    }
    let excluded = strings(&spec["excludedResources"]);
    let modifier: Option<Value> = spec["resourceModifier"]["name"]
        .as_str()
        .and_then(|name| st.objects.get(&object_key("configmaps", &velero_ns, name)))
        .and_then(|cm| {
            cm["data"]
                .as_object()
                .and_then(|d| d.values().next().cloned())
        })
        .and_then(|yaml| {
            yaml.as_str()
                .and_then(|y| serde_saphyr::from_str::<Value>(y).ok())
        });
    let preserve_node_ports = spec["preserveNodePorts"] == true;
    let mut restored = 0u64;
    let mut errors = 0u64;
    let mut total = 0u64;
    for source in strings(&spec["includedNamespaces"]) {
        let target = spec["namespaceMapping"][&source]
            .as_str()
            .unwrap_or(&source)
            .to_string();
        let inside = format!("/{source}/");
        let items: Vec<(String, Value)> = st
            .objects
            .iter()
            .filter(|(k, _)| k.contains(&inside) && !k.starts_with("namespaces/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (key, mut item) in items {
            let plural = key.split('/').next().unwrap_or_default().to_string();
            let api_version = item["apiVersion"].as_str().unwrap_or("v1");
            let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
            let resource = if group.is_empty() {
                plural.clone()
            } else {
                format!("{plural}.{group}")
            };
            if excluded.iter().any(|e| *e == resource || *e == plural) {
                continue;
            }
            total += 1;
            let name = item["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if let Some(meta) = item["metadata"].as_object_mut() {
                for server_owned in ["uid", "resourceVersion", "creationTimestamp"] {
                    meta.remove(server_owned);
                }
                meta.insert("namespace".into(), json!(target));
            }
            if let Some(map) = item.as_object_mut() {
                map.remove("status");
            }
            if plural == "services" {
                if let Some(modifier) = &modifier {
                    match apply_modifier(modifier, "services", &source, &item) {
                        Ok(modified) => item = modified,
                        Err(_) => {
                            errors += 1;
                            continue;
                        }
                    }
                }
                // Velero's Service restore action: cluster IPs always, node ports unless kept.
                if let Some(spec) = item["spec"].as_object_mut() {
                    spec.remove("clusterIP");
                    spec.remove("clusterIPs");
                    if !preserve_node_ports {
                        spec.remove("healthCheckNodePort");
                        if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
                            for port in ports {
                                if let Some(p) = port.as_object_mut() {
                                    p.remove("nodePort");
                                }
                            }
                        }
                    }
                }
                if service_problem(&item).is_some() {
                    errors += 1;
                    continue;
                }
            }
            st.objects
                .insert(object_key(&plural, &target, &name), item.clone());
            st.created.push(item);
            restored += 1;
        }
    }
    json!({
        "phase": if errors > 0 { "PartiallyFailed" } else { "Completed" },
        "progress": {"itemsRestored": restored, "totalItems": total},
        "warnings": 0,
        "errors": errors,
    })
}

/// Velero's resource modifier rules (JSON patches; a failed `test` skips a rule's patches for
/// the object, any other failure is an error for it), for objects of `group_resource` from
/// namespace `source`.
fn apply_modifier(
    modifier: &Value,
    group_resource: &str,
    source: &str,
    item: &Value,
) -> Result<Value, String> {
    let mut current = item.clone();
    for rule in modifier["resourceModifierRules"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let conditions = &rule["conditions"];
        if conditions["groupResource"].as_str() != Some(group_resource) {
            continue;
        }
        let namespaces = strings(&conditions["namespaces"]);
        if !namespaces.is_empty() && !namespaces.iter().any(|n| n == source) {
            continue;
        }
        let mut patched = current.clone();
        let mut skipped = false;
        for patch in rule["patches"].as_array().into_iter().flatten() {
            let op = patch["operation"].as_str().unwrap_or_default();
            let path = patch["path"].as_str().unwrap_or_default();
            let value = velero_value(patch["value"].as_str().unwrap_or_default());
            match json_patch(&mut patched, op, path, value) {
                Ok(()) => {}
                Err(PatchError::TestFailed) => {
                    skipped = true;
                    break;
                }
                Err(PatchError::Failed(e)) => return Err(e),
            }
        }
        if !skipped {
            current = patched;
        }
    }
    Ok(current)
}

/// How Velero reads a patch's string value: numbers, booleans, null, objects and arrays as
/// JSON; anything else (or a quoted value) as a string.
fn velero_value(raw: &str) -> Value {
    if let Some(quoted) = raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        return json!(quoted);
    }
    match serde_json::from_str::<Value>(raw) {
        Ok(v) if !v.is_string() => v,
        _ => json!(raw),
    }
}

enum PatchError {
    TestFailed,
    Failed(String),
}

/// One RFC 6902 operation on a JSON pointer path.
fn json_patch(doc: &mut Value, op: &str, path: &str, value: Value) -> Result<(), PatchError> {
    let (parent_path, last) = path
        .rsplit_once('/')
        .ok_or_else(|| PatchError::Failed(format!("bad path {path}")))?;
    let missing = || PatchError::Failed(format!("{op} {path}: no such path"));
    if op == "test" {
        return if doc.pointer(path) == Some(&value) {
            Ok(())
        } else {
            Err(PatchError::TestFailed)
        };
    }
    let parent = doc.pointer_mut(parent_path).ok_or_else(missing)?;
    match (op, parent) {
        ("add", Value::Object(map)) | ("replace", Value::Object(map)) => {
            if op == "replace" && !map.contains_key(last) {
                return Err(missing());
            }
            map.insert(last.to_string(), value);
            Ok(())
        }
        ("remove", Value::Object(map)) => map.remove(last).map(|_| ()).ok_or_else(missing),
        ("add", Value::Array(list)) => {
            let at = if last == "-" {
                list.len()
            } else {
                last.parse().map_err(|_| missing())?
            };
            if at > list.len() {
                return Err(missing());
            }
            list.insert(at, value);
            Ok(())
        }
        ("replace", Value::Array(list)) | ("remove", Value::Array(list)) => {
            let at: usize = last.parse().map_err(|_| missing())?;
            if at >= list.len() {
                return Err(missing());
            }
            if op == "remove" {
                list.remove(at);
            } else {
                list[at] = value;
            }
            Ok(())
        }
        _ => Err(PatchError::Failed(format!(
            "unsupported operation {op} at {path}"
        ))),
    }
}

/// The custom resource's schema from the real CRD in `tests/fixtures`, for the kinds the
/// agent writes (Velero, Argo CD).
fn crd_schema(group: &str, plural: &str) -> Option<Value> {
    let file = match (group, plural) {
        ("velero.io", _) => format!("velero-crds/{group}_{plural}.yaml"),
        ("argoproj.io", "applications") => "argocd/application-crd.yaml".to_string(),
        _ => return None,
    };
    let text = String::from_utf8(crate::fixture(&file)).ok()?;
    let crd: Value = serde_saphyr::from_str(&text).ok()?;
    crd["spec"]["versions"]
        .as_array()?
        .iter()
        .find(|v| v["served"] == true)
        .map(|v| v["schema"]["openAPIV3Schema"].clone())
}

/// What a strict API server (`fieldValidation=Strict`) would refuse in `object`: a field the CRD
/// does not declare, or a value of the wrong type. A real server with the default validation
/// drops unknown fields with a warning, so a misspelt field would vanish silently; the fake
/// refuses it so that a test fails.
fn schema_problem(group: &str, plural: &str, object: &Value) -> Option<String> {
    let schema = crd_schema(group, plural)?;
    let mut body = object.clone();
    if let Some(map) = body.as_object_mut() {
        // Server-owned or generic parts: metadata is ObjectMeta, status is the controller's.
        for generic in ["apiVersion", "kind", "metadata", "status"] {
            map.remove(generic);
        }
    }
    check_schema(&schema, &body, "")
}

fn check_schema(schema: &Value, value: &Value, at: &str) -> Option<String> {
    if schema["x-kubernetes-preserve-unknown-fields"] == true || value.is_null() {
        return None;
    }
    let expected = schema["type"].as_str().unwrap_or_default();
    let fits = match expected {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => true,
    };
    // int-or-string fields (durations in some CRDs) accept both.
    if !fits && schema["x-kubernetes-int-or-string"] != true {
        return Some(format!("{at}: expected {expected}, got {value}"));
    }
    match value {
        Value::Object(map) => {
            let properties = schema["properties"].as_object();
            for (key, item) in map {
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                let item_schema = match properties.and_then(|p| p.get(key)) {
                    Some(s) => s,
                    None if schema["additionalProperties"].is_object() => {
                        &schema["additionalProperties"]
                    }
                    None if properties.is_none() => continue,
                    None => return Some(format!("unknown field \"{path}\"")),
                };
                if let Some(problem) = check_schema(item_schema, item, &path) {
                    return Some(problem);
                }
            }
            None
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| check_schema(&schema["items"], item, &format!("{at}[{i}]"))),
        _ => None,
    }
}

fn kube_status(code: u16, reason: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})),
    )
        .into_response()
}

/// The version the fake API server reports at `GET /version`.
pub const FAKE_KUBE_VERSION: &str = "v1.34.1";

/// `GET /version`: the API server's build, as kube-apiserver answers it (every field of
/// `version.Info` is required by clients).
async fn kube_version() -> Response {
    axum::Json(json!({
        "major": "1",
        "minor": "34",
        "emulationMajor": "1",
        "emulationMinor": "34",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "33",
        "gitVersion": FAKE_KUBE_VERSION,
        "gitCommit": "93248f9ae092f571eb870b7664c534bfc7d00f03",
        "gitTreeState": "clean",
        "buildDate": "2025-09-09T19:44:50Z",
        "goVersion": "go1.24.6",
        "compiler": "gc",
        "platform": "linux/amd64"
    }))
    .into_response()
}

async fn kube_not_found(uri: Uri) -> Response {
    kube_status(
        404,
        "NotFound",
        &format!("the server could not find the requested resource ({uri})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fake_api_refuses_what_the_crd_does_not_declare() {
        let backup = |spec: Value| json!({"apiVersion": "velero.io/v1", "kind": "Backup", "metadata": {"name": "b"}, "spec": spec});
        let good = backup(
            json!({"includedNamespaces": ["*"], "ttl": "72h0m0s", "storageLocation": "default"}),
        );
        assert_eq!(schema_problem("velero.io", "backups", &good), None);
        let typo = backup(json!({"includeNamespaces": ["*"]}));
        assert_eq!(
            schema_problem("velero.io", "backups", &typo).as_deref(),
            Some("unknown field \"spec.includeNamespaces\"")
        );
        let wrong_type = backup(json!({"includedNamespaces": "media"}));
        assert!(
            schema_problem("velero.io", "backups", &wrong_type)
                .is_some_and(|p| p.starts_with("spec.includedNamespaces: expected array")),
        );
        let sync = json!({"metadata": {"name": "root"}, "operation": {"sync": {"revision": "HEAD"}, "initiatedBy": {"username": "infraflux"}}});
        assert_eq!(schema_problem("argoproj.io", "applications", &sync), None);
    }
}
