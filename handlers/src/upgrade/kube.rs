//! The Kubernetes side of a rolling upgrade: the nodes as the rollout sees them, cordon and
//! uncordon owned by the job, a drain through the eviction API that honours disruption
//! budgets, the kube-proxy guard, and the wait for a node to come back Ready.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use k8s_openapi::api::policy::v1::Eviction;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::plan::Role;
use crate::settings::HumanDuration;

/// The annotation naming the job that cordoned a node: only that job uncordons it.
pub const CORDONED_BY: &str = "infraflux.dev/cordoned-by";
const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";
/// Static pods' API mirrors: the kubelet owns them, evicting one does nothing.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// Between rounds of evictions a disruption budget refused.
const EVICTION_RETRY: Duration = Duration::from_secs(2);
/// Between reads while waiting for pods to go or a node to be Ready.
const POLL: Duration = Duration::from_secs(1);
/// Reads and patches of a Node that changed in between (409) before giving up.
const CONFLICT_ATTEMPTS: usize = 5;

/// A Node as the rollout needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    /// Control plane iff the node carries the `node-role.kubernetes.io/control-plane` label.
    pub role: Role,
    pub internal_ip: Option<String>,
    /// Condition `Ready` is `True`.
    pub ready: bool,
    pub unschedulable: bool,
    /// The [`CORDONED_BY`] annotation.
    pub cordoned_by: Option<String>,
    /// `status.nodeInfo.kubeletVersion`.
    pub kubelet_version: String,
    /// `status.nodeInfo.osImage`, e.g. `Talos (v1.12.5)`.
    pub os_image: String,
}

impl From<&Node> for NodeView {
    fn from(node: &Node) -> Self {
        let meta = &node.metadata;
        let status = node.status.as_ref();
        let is_control_plane = meta
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(CONTROL_PLANE_LABEL));
        let info = status.and_then(|s| s.node_info.as_ref());
        NodeView {
            name: meta.name.clone().unwrap_or_default(),
            role: if is_control_plane {
                Role::ControlPlane
            } else {
                Role::Worker
            },
            internal_ip: status
                .and_then(|s| s.addresses.as_ref())
                .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
                .map(|a| a.address.clone()),
            ready: status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
            unschedulable: node
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false),
            cordoned_by: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(CORDONED_BY))
                .cloned(),
            kubelet_version: info.map(|i| i.kubelet_version.clone()).unwrap_or_default(),
            os_image: info.map(|i| i.os_image.clone()).unwrap_or_default(),
        }
    }
}

/// `what: <code> <message>` for an API answer, `what: <error>` for anything else.
fn api_error(what: &str, e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{what}: {} {}", s.code, s.message),
        other => format!("{what}: {other}"),
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Every Node of the cluster.
pub async fn nodes(client: &kube::Client) -> Result<Vec<NodeView>, String> {
    let api: Api<Node> = Api::all(client.clone());
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error("listing nodes", &e))?;
    Ok(list.items.iter().map(NodeView::from).collect())
}

/// One Node.
pub async fn node(client: &kube::Client, name: &str) -> Result<NodeView, String> {
    read_node(&Api::all(client.clone()), name)
        .await
        .map(|n| NodeView::from(&n))
}

async fn read_node(api: &Api<Node>, name: &str) -> Result<Node, String> {
    match api.get(name).await {
        Ok(node) => Ok(node),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(format!("no node {name} in the cluster")),
        Err(e) => Err(api_error(&format!("reading node {name}"), &e)),
    }
}

/// What [`cordon`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cordon {
    /// Cordoned now, by this job.
    Now,
    /// Cordoned earlier by this same job (the annotation names it): a resumed rollout.
    Already,
    /// Unschedulable already, not by this job: leave it cordoned afterwards.
    ByOther,
}

/// A merge patch of a Node's cordon, with its `resourceVersion` as a precondition: a Node
/// changed since it was read answers 409 instead of being overwritten.
fn cordon_patch(resource_version: Option<&str>, unschedulable: Value, owner: Value) -> Value {
    let mut annotations = Map::new();
    annotations.insert(CORDONED_BY.to_string(), owner);
    serde_json::json!({
        "metadata": {"resourceVersion": resource_version, "annotations": annotations},
        "spec": {"unschedulable": unschedulable},
    })
}

/// Cordons `node` for `job_id`: `spec.unschedulable=true` plus the annotation
/// [`CORDONED_BY`]`=job_id` in one merge patch, unless the node is unschedulable already.
pub async fn cordon(client: &kube::Client, node: &str, job_id: &str) -> Result<Cordon, String> {
    let api: Api<Node> = Api::all(client.clone());
    for _ in 0..CONFLICT_ATTEMPTS {
        let current = read_node(&api, node).await?;
        let view = NodeView::from(&current);
        if view.unschedulable {
            return Ok(if view.cordoned_by.as_deref() == Some(job_id) {
                Cordon::Already
            } else {
                Cordon::ByOther
            });
        }
        let patch = cordon_patch(
            current.metadata.resource_version.as_deref(),
            Value::Bool(true),
            Value::from(job_id),
        );
        match api
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(Cordon::Now),
            // Someone changed the Node between the read and the patch (maybe cordoned it).
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(api_error(&format!("cordoning {node}"), &e)),
        }
    }
    Err(format!(
        "cordoning {node}: the Node kept changing while it was patched"
    ))
}

/// Uncordons `node` only when the [`CORDONED_BY`] annotation names `job_id`, and removes the
/// annotation; `Ok(false)` when it does not (a node someone else cordoned stays cordoned).
pub async fn uncordon(client: &kube::Client, node: &str, job_id: &str) -> Result<bool, String> {
    let api: Api<Node> = Api::all(client.clone());
    for _ in 0..CONFLICT_ATTEMPTS {
        let current = read_node(&api, node).await?;
        if NodeView::from(&current).cordoned_by.as_deref() != Some(job_id) {
            return Ok(false);
        }
        let patch = cordon_patch(
            current.metadata.resource_version.as_deref(),
            Value::Null,
            Value::Null,
        );
        match api
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(true),
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(api_error(&format!("uncordoning {node}"), &e)),
        }
    }
    Err(format!(
        "uncordoning {node}: the Node kept changing while it was patched"
    ))
}

/// Makes this job the owner of a cordon an earlier upgrade job left (a halted rollout run
/// again), so this job uncordons the node when it is done. `Ok(false)` when the annotation no
/// longer names `earlier` or the node is schedulable: nothing is taken over.
pub async fn take_over(
    client: &kube::Client,
    node: &str,
    earlier: &str,
    job_id: &str,
) -> Result<bool, String> {
    let api: Api<Node> = Api::all(client.clone());
    for _ in 0..CONFLICT_ATTEMPTS {
        let current = read_node(&api, node).await?;
        let view = NodeView::from(&current);
        if !view.unschedulable || view.cordoned_by.as_deref() != Some(earlier) {
            return Ok(false);
        }
        let patch = cordon_patch(
            current.metadata.resource_version.as_deref(),
            Value::Bool(true),
            Value::from(job_id),
        );
        match api
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(true),
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(api_error(&format!("taking over {node}'s cordon"), &e)),
        }
    }
    Err(format!(
        "taking over {node}'s cordon: the Node kept changing while it was patched"
    ))
}

/// A client for evictions that returns every answer as it comes. kube-rs's default client
/// retries 429 (a disruption budget's refusal) with backoff for minutes, inside one call; the
/// drain retries refusals itself, on its own clock, and reports the pods still blocked.
#[derive(Clone)]
pub struct Evictor {
    client: kube::Client,
}

/// How one eviction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvictOutcome {
    /// Accepted: the pod is being deleted.
    Evicted,
    /// The pod is not there (any more).
    Gone,
    /// Not now: a disruption budget (`budget`, its name, when the API named it), throttling,
    /// or the API server unavailable. Worth retrying.
    Blocked { why: String, budget: Option<String> },
}

impl Evictor {
    /// The default client stack (TLS, auth, base URI, proxy, headers, tracing) without its
    /// retry layer.
    pub fn from_config(mut config: kube::Config) -> Result<Self, String> {
        config.default_retry = false;
        let client = kube::client::ClientBuilder::try_from(config)
            .map_err(|e| format!("building the Kubernetes client for evictions: {e}"))?
            .build();
        Ok(Evictor { client })
    }

    /// The client without retries, for reads that must not stall either.
    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// One eviction of `namespace/pod` (policy/v1 Eviction), answered as the API server
    /// answered: no retry here.
    pub async fn evict(&self, namespace: &str, pod: &str) -> Result<EvictOutcome, String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let eviction = Eviction {
            metadata: ObjectMeta {
                name: Some(pod.to_string()),
                namespace: Some(namespace.to_string()),
                ..ObjectMeta::default()
            },
            delete_options: None,
        };
        let answer = api
            .create_subresource::<_, Value>("eviction", pod, &PostParams::default(), &eviction)
            .await;
        match answer {
            Ok(_) => Ok(EvictOutcome::Evicted),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(EvictOutcome::Gone),
            Err(kube::Error::Api(s)) if s.code == 429 || s.code >= 500 => {
                let budget = s.details.as_ref().and_then(|d| {
                    d.causes
                        .iter()
                        .filter(|c| c.reason == "DisruptionBudget")
                        .find_map(|c| budget_name(&c.message))
                });
                let why = match &budget {
                    Some(name) => {
                        format!("PodDisruptionBudget {namespace}/{name} allows no disruption")
                    }
                    None => format!("{} {}", s.code, s.message),
                };
                Ok(EvictOutcome::Blocked { why, budget })
            }
            Err(e @ kube::Error::Api(_)) => {
                Err(api_error(&format!("evicting {namespace}/{pod}"), &e))
            }
            // Not answered at all (connection refused, reset): the API server may be restarting.
            Err(e) => Ok(EvictOutcome::Blocked {
                why: e.to_string(),
                budget: None,
            }),
        }
    }
}

/// The budget's name in the API server's cause: "The disruption budget web-pdb needs 2
/// healthy pods and has 2 currently" (or "... is still being processed by the server.").
fn budget_name(cause: &str) -> Option<String> {
    let rest = cause.strip_prefix("The disruption budget ")?;
    rest.split_whitespace()
        .next()
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

/// What a drain did: the pods it evicted and those it left in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// `namespace/name`.
    pub evicted: Vec<String>,
    /// DaemonSet and mirror pods, left in place: they belong to the node.
    pub left: Vec<String>,
}

/// Why a bounded wait ended early.
enum Interrupt {
    Cancelled,
    TimedOut,
}

/// `work`, unless `cancel` fires or `deadline` passes first.
async fn within<F: Future>(
    work: F,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Result<F::Output, Interrupt> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(Interrupt::Cancelled),
        () = tokio::time::sleep_until(deadline) => Err(Interrupt::TimedOut),
        out = work => Ok(out),
    }
}

/// A pod to evict.
struct Evictee {
    namespace: String,
    name: String,
    uid: String,
}

impl Evictee {
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn is_daemonset_pod(pod: &Pod) -> bool {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.kind == "DaemonSet")
}

fn is_mirror_pod(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

async fn pods_on(api: &Api<Pod>, node: &str) -> Result<Vec<Pod>, String> {
    api.list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map(|l| l.items)
        .map_err(|e| api_error(&format!("listing the pods on {node}"), &e))
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Evicts every pod on `node` through the eviction subresource, except DaemonSet pods and
/// mirror pods (reported as left) and pods already finished (left alone). An eviction a
/// disruption budget refuses (429) is retried every couple of seconds until `timeout`; then
/// the drain fails naming the pods and their budgets. Then it waits, within the same
/// `timeout`, until the evicted pods are gone from the node. `cancel` stops it at once, with
/// an error saying so; the node stays as it is (cordoned).
pub async fn drain(
    evictor: &Evictor,
    node: &str,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<DrainReport, String> {
    let deadline = Instant::now() + timeout;
    let timed_out = || format!("drain of {node} timed out after {}", HumanDuration(timeout));
    let cancelled = || format!("drain of {node} cancelled");
    let pods_api: Api<Pod> = Api::all(evictor.client.clone());
    let pods = match within(pods_on(&pods_api, node), deadline, cancel).await {
        Ok(pods) => pods?,
        Err(Interrupt::Cancelled) => return Err(cancelled()),
        Err(Interrupt::TimedOut) => {
            return Err(format!("{}: the pods were not listed", timed_out()));
        }
    };
    let mut report = DrainReport::default();
    let mut pending = Vec::new();
    for pod in &pods {
        if is_daemonset_pod(pod) || is_mirror_pod(pod) {
            report.left.push(pod_key(pod));
        } else if !is_terminal(pod) {
            pending.push(Evictee {
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                name: pod.metadata.name.clone().unwrap_or_default(),
                uid: pod.metadata.uid.clone().unwrap_or_default(),
            });
        }
    }
    // Why each pod still pending was last refused, for the message when time runs out.
    let mut refusals: BTreeMap<String, String> = BTreeMap::new();
    let mut evicted: Vec<Evictee> = Vec::new();
    let blocked_message = |pending: &[Evictee], refusals: &BTreeMap<String, String>| {
        let pods: Vec<String> = pending
            .iter()
            .map(|p| {
                let why = refusals
                    .get(&p.key())
                    .map_or("no answer to its eviction yet", String::as_str);
                format!("{} ({why})", p.key())
            })
            .collect();
        format!(
            "{}: {} could not be evicted: {}",
            timed_out(),
            plural(pending.len(), "pod", "pods"),
            pods.join(", ")
        )
    };
    while !pending.is_empty() {
        let mut still = Vec::new();
        let mut round = std::mem::take(&mut pending).into_iter();
        while let Some(pod) = round.next() {
            match within(evictor.evict(&pod.namespace, &pod.name), deadline, cancel).await {
                Err(Interrupt::Cancelled) => return Err(cancelled()),
                Err(Interrupt::TimedOut) => {
                    still.push(pod);
                    still.extend(round);
                    return Err(blocked_message(&still, &refusals));
                }
                Ok(Err(e)) => return Err(format!("drain of {node}: {e}")),
                Ok(Ok(EvictOutcome::Evicted)) => {
                    report.evicted.push(pod.key());
                    evicted.push(pod);
                }
                // Gone by itself (finished, deleted): nothing to evict or wait for.
                Ok(Ok(EvictOutcome::Gone)) => {}
                Ok(Ok(EvictOutcome::Blocked { why, .. })) => {
                    refusals.insert(pod.key(), why);
                    still.push(pod);
                }
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        match within(tokio::time::sleep(EVICTION_RETRY), deadline, cancel).await {
            Ok(()) => {}
            Err(Interrupt::Cancelled) => return Err(cancelled()),
            Err(Interrupt::TimedOut) => return Err(blocked_message(&pending, &refusals)),
        }
    }
    // Evicted pods terminate (grace period, preStop hooks) before they leave the node. A
    // StatefulSet's replacement has the same name, so pods are followed by uid.
    if evicted.is_empty() {
        return Ok(report);
    }
    let mut remaining: Vec<String> = evicted.iter().map(Evictee::key).collect();
    let mut last_error: Option<String> = None;
    let terminating = |remaining: &[String], last_error: &Option<String>| {
        let mut message = format!(
            "{}: {} still terminating: {}",
            timed_out(),
            plural(remaining.len(), "evicted pod", "evicted pods"),
            remaining.join(", ")
        );
        if let Some(e) = last_error {
            message.push_str(&format!(" (last read: {e})"));
        }
        message
    };
    loop {
        match within(pods_on(&pods_api, node), deadline, cancel).await {
            Err(Interrupt::Cancelled) => return Err(cancelled()),
            Err(Interrupt::TimedOut) => return Err(terminating(&remaining, &last_error)),
            Ok(Ok(pods)) => {
                last_error = None;
                remaining = evicted
                    .iter()
                    .filter(|e| {
                        pods.iter()
                            .any(|p| p.metadata.uid.as_deref() == Some(&e.uid))
                    })
                    .map(Evictee::key)
                    .collect();
                if remaining.is_empty() {
                    return Ok(report);
                }
            }
            // The API may blink; the deadline bounds the wait.
            Ok(Err(e)) => last_error = Some(e),
        }
        match within(tokio::time::sleep(POLL), deadline, cancel).await {
            Ok(()) => {}
            Err(Interrupt::Cancelled) => return Err(cancelled()),
            Err(Interrupt::TimedOut) => return Err(terminating(&remaining, &last_error)),
        }
    }
}

/// Cilium replaces kube-proxy: ConfigMap `kube-system/cilium-config` has
/// `kube-proxy-replacement` `true` (or the older `strict`), and there is no DaemonSet
/// `kube-system/kube-proxy`. `Ok(Err(why))` when the guard fails, `Err` on an API error.
pub async fn kube_proxy_replaced(client: &kube::Client) -> Result<Result<(), String>, String> {
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    let cilium = config_maps
        .get_opt("cilium-config")
        .await
        .map_err(|e| api_error("reading ConfigMap kube-system/cilium-config", &e))?;
    let Some(cilium) = cilium else {
        return Ok(Err(
            "ConfigMap kube-system/cilium-config not found: Cilium is not installed there, so nothing says it replaces kube-proxy".into(),
        ));
    };
    let setting = cilium
        .data
        .as_ref()
        .and_then(|d| d.get("kube-proxy-replacement"))
        .map(String::as_str);
    match setting {
        Some("true" | "strict") => {}
        Some(other) => {
            return Ok(Err(format!(
                "ConfigMap kube-system/cilium-config has kube-proxy-replacement \"{other}\", not \"true\": Cilium does not replace kube-proxy"
            )));
        }
        None => {
            return Ok(Err(
                "ConfigMap kube-system/cilium-config does not set kube-proxy-replacement: Cilium does not replace kube-proxy".into(),
            ));
        }
    }
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), "kube-system");
    let kube_proxy = daemonsets
        .get_opt("kube-proxy")
        .await
        .map_err(|e| api_error("reading DaemonSet kube-system/kube-proxy", &e))?;
    if kube_proxy.is_some() {
        return Ok(Err(
            "DaemonSet kube-system/kube-proxy exists: kube-proxy still runs beside Cilium's replacement".into(),
        ));
    }
    Ok(Ok(()))
}

/// Waits until `node` is Ready (condition `Ready=True`), reading it about every second, up to
/// `timeout`. Read errors are waited through: a rebooting control plane takes the API with it.
pub async fn wait_node_ready(
    client: &kube::Client,
    node: &str,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<NodeView, String> {
    let deadline = Instant::now() + timeout;
    let cancelled = || format!("waiting for {node} to be Ready: cancelled");
    let mut last = String::from("not read yet");
    loop {
        match within(self::node(client, node), deadline, cancel).await {
            Err(Interrupt::Cancelled) => return Err(cancelled()),
            Err(Interrupt::TimedOut) => break,
            Ok(Ok(view)) if view.ready => return Ok(view),
            Ok(Ok(_)) => last = "not Ready".into(),
            Ok(Err(e)) => last = e,
        }
        match within(tokio::time::sleep(POLL), deadline, cancel).await {
            Ok(()) => {}
            Err(Interrupt::Cancelled) => return Err(cancelled()),
            Err(Interrupt::TimedOut) => break,
        }
    }
    Err(format!(
        "{node} not Ready after {} (last: {last})",
        HumanDuration(timeout)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_as_the_rollout_reads_it() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cp-1", "labels": {CONTROL_PLANE_LABEL: ""},
                         "annotations": {CORDONED_BY: "job-1"}},
            "spec": {"unschedulable": true},
            "status": {
                "conditions": [{"type": "MemoryPressure", "status": "False"}, {"type": "Ready", "status": "True"}],
                "addresses": [{"type": "Hostname", "address": "cp-1"}, {"type": "InternalIP", "address": "10.0.0.11"}],
                "nodeInfo": {"kubeletVersion": "v1.34.1", "osImage": "Talos (v1.12.5)"},
            },
        }))
        .expect("node");
        let view = NodeView::from(&node);
        assert_eq!(
            view,
            NodeView {
                name: "cp-1".into(),
                role: Role::ControlPlane,
                internal_ip: Some("10.0.0.11".into()),
                ready: true,
                unschedulable: true,
                cordoned_by: Some("job-1".into()),
                kubelet_version: "v1.34.1".into(),
                os_image: "Talos (v1.12.5)".into(),
            }
        );
        let bare: Node =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "w-1"}})).expect("node");
        let view = NodeView::from(&bare);
        assert_eq!(view.role, Role::Worker);
        assert!(!view.ready && !view.unschedulable && view.internal_ip.is_none());
    }

    #[test]
    fn the_budget_is_read_from_the_api_servers_cause() {
        assert_eq!(
            budget_name("The disruption budget web-pdb needs 2 healthy pods and has 2 currently")
                .as_deref(),
            Some("web-pdb")
        );
        assert_eq!(
            budget_name("The disruption budget db is still being processed by the server.")
                .as_deref(),
            Some("db")
        );
        assert_eq!(budget_name("too many requests"), None);
    }

    #[test]
    fn the_cordon_patch_carries_its_precondition_and_owner() {
        let patch = cordon_patch(Some("41"), Value::Bool(true), Value::from("job-9"));
        assert_eq!(patch["metadata"]["resourceVersion"], "41");
        assert_eq!(patch["metadata"]["annotations"][CORDONED_BY], "job-9");
        assert_eq!(patch["spec"]["unschedulable"], true);
        // Uncordon removes both (merge patch null).
        let patch = cordon_patch(Some("42"), Value::Null, Value::Null);
        assert!(patch["metadata"]["annotations"][CORDONED_BY].is_null());
        assert!(patch["spec"]["unschedulable"].is_null());
    }
}
