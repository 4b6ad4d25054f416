//! The Velero drill: the newest `Completed` backup of a namespace, restored into a scratch
//! namespace, its workloads waited for and its checks run, then the scratch namespace deleted.
//!
//! Nothing of production is taken: the scratch namespace has its own name, the resources of
//! `excluded_resources` (routes, gateways, certificates, ExternalSecrets) are left out, and a
//! Velero resource modifier turns every LoadBalancer or NodePort Service into a ClusterIP one,
//! so no address, DNS record, node port or certificate is claimed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use serde_json::{Value, json};

use super::{CheckResult, DrillReport, RestoreDrillHandler};
use crate::handler::JobContext;

/// The label every object a drill creates carries; leftovers are found by it.
pub const DRILL_LABEL: &str = "infraflux.dev/drill";
/// The namespace a drill restores, on its scratch namespace (leftovers are per target).
pub const TARGET_LABEL: &str = "infraflux.dev/drill-target";
const JOB_LABEL: &str = "infraflux.dev/drill-job";

const POLL: Duration = Duration::from_secs(2);
/// How long a deleted scratch namespace may take to go away before the drill says it did not.
const CLEANUP_WAIT: Duration = Duration::from_secs(120);

/// The resource modifier (Velero ≥ 1.12: JSON patches, `test` as the condition): LoadBalancer
/// and NodePort Services become ClusterIP, without the fields the API server refuses on a
/// ClusterIP Service. A field is removed with `add` then `remove`, since a `remove` of a field
/// that is not there fails the patch. Velero's own Service restore action drops node ports
/// that were assigned automatically (`preserveNodePorts: false`).
pub const SERVICE_MODIFIER: &str = r#"version: v1
resourceModifierRules:
- conditions:
    groupResource: services
  patches:
  - operation: test
    path: "/spec/type"
    value: "LoadBalancer"
  - operation: replace
    path: "/spec/type"
    value: "ClusterIP"
  - operation: add
    path: "/spec/externalTrafficPolicy"
    value: "Cluster"
  - operation: remove
    path: "/spec/externalTrafficPolicy"
  - operation: add
    path: "/spec/allocateLoadBalancerNodePorts"
    value: "false"
  - operation: remove
    path: "/spec/allocateLoadBalancerNodePorts"
  - operation: add
    path: "/spec/loadBalancerClass"
    value: "none"
  - operation: remove
    path: "/spec/loadBalancerClass"
  - operation: add
    path: "/spec/loadBalancerIP"
    value: "none"
  - operation: remove
    path: "/spec/loadBalancerIP"
  - operation: add
    path: "/spec/healthCheckNodePort"
    value: "0"
  - operation: remove
    path: "/spec/healthCheckNodePort"
- conditions:
    groupResource: services
  patches:
  - operation: test
    path: "/spec/type"
    value: "NodePort"
  - operation: replace
    path: "/spec/type"
    value: "ClusterIP"
  - operation: add
    path: "/spec/externalTrafficPolicy"
    value: "Cluster"
  - operation: remove
    path: "/spec/externalTrafficPolicy"
"#;

/// The scratch namespace of a drill of `namespace`: `drill-<ns>-<suffix>`, at most 63
/// characters (a DNS label), the source name shortened if it must be.
pub fn scratch_namespace(namespace: &str, job_id: &str) -> String {
    let suffix: String = job_id
        .chars()
        .rev()
        .filter(char::is_ascii_alphanumeric)
        .take(6)
        .collect::<String>()
        .to_ascii_lowercase();
    let room = 63 - "drill-".len() - 1 - suffix.len();
    let source: String = namespace.chars().take(room).collect();
    format!("drill-{}-{suffix}", source.trim_end_matches('-'))
}

/// A Velero Backup, as far as the drill cares.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupInfo {
    pub name: String,
    pub completed_at: DateTime<Utc>,
}

/// The newest `Completed` backup that holds `namespace`: it lists the namespace, or includes
/// every namespace (`*` or none listed) without excluding it.
pub fn newest_backup_holding(backups: &[Value], namespace: &str) -> Option<BackupInfo> {
    let listed = |v: &Value, key: &str| -> Vec<String> {
        v.pointer(&format!("/spec/{key}"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    backups
        .iter()
        .filter(|b| b.pointer("/status/phase").and_then(Value::as_str) == Some("Completed"))
        .filter(|b| {
            let included = listed(b, "includedNamespaces");
            let excluded = listed(b, "excludedNamespaces");
            let holds = included.is_empty() || included.iter().any(|n| n == "*" || n == namespace);
            holds && !excluded.iter().any(|n| n == namespace)
        })
        .filter_map(|b| {
            let name = b.pointer("/metadata/name")?.as_str()?.to_string();
            let completed_at = b
                .pointer("/status/completionTimestamp")
                .and_then(Value::as_str)
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())?
                .with_timezone(&Utc);
            Some(BackupInfo { name, completed_at })
        })
        .max_by_key(|b| b.completed_at)
}

/// A workload or claim of the scratch namespace, and whether it is ready.
#[derive(Debug, Clone, PartialEq)]
pub struct Readiness {
    pub what: String,
    pub ready: bool,
}

fn deployment_ready(d: &Deployment) -> bool {
    let want = d.spec.replicas.unwrap_or(1);
    let available = d
        .status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0);
    available >= want
}

fn statefulset_ready(s: &StatefulSet) -> bool {
    let want = s.spec.replicas.unwrap_or(1);
    let ready = s
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    ready >= want
}

fn pvc_bound(p: &PersistentVolumeClaim) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
}

/// The API path of a kind's objects in `namespace`, for `min_objects`.
fn collection_path(kind: &str, namespace: &str) -> Option<String> {
    let core = |plural: &str| format!("/api/v1/namespaces/{namespace}/{plural}");
    let apps = |plural: &str| format!("/apis/apps/v1/namespaces/{namespace}/{plural}");
    Some(match kind {
        "ConfigMap" => core("configmaps"),
        "Secret" => core("secrets"),
        "Service" => core("services"),
        "PersistentVolumeClaim" => core("persistentvolumeclaims"),
        "Pod" => core("pods"),
        "ServiceAccount" => core("serviceaccounts"),
        "Deployment" => apps("deployments"),
        "StatefulSet" => apps("statefulsets"),
        "DaemonSet" => apps("daemonsets"),
        _ => return None,
    })
}

struct Drill<'a> {
    handler: &'a RestoreDrillHandler,
    ctx: &'a JobContext,
    client: kube::Client,
    namespace: &'a str,
    scratch: String,
}

/// Why a wait ended early.
enum Stop {
    Cancelled,
    Failed(String),
}

impl Drill<'_> {
    fn velero(&self, kind: &str, plural: &str) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk("velero.io", "v1", kind);
        Api::namespaced_with(
            self.client.clone(),
            &self.handler.config.velero_namespace,
            &ApiResource::from_gvk_with_plural(&gvk, plural),
        )
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (DRILL_LABEL.to_string(), "true".to_string()),
            (TARGET_LABEL.to_string(), self.namespace.to_string()),
            (JOB_LABEL.to_string(), self.ctx.job_id.clone()),
        ])
    }

    fn stopped(&self) -> bool {
        self.ctx.stop_requested.is_cancelled() || self.ctx.cancel.is_cancelled()
    }

    /// Sleeps one poll, unless the job is asked to stop.
    async fn pause(&self) -> Result<(), Stop> {
        tokio::select! {
            () = self.ctx.stop_requested.cancelled() => Err(Stop::Cancelled),
            () = self.ctx.cancel.cancelled() => Err(Stop::Cancelled),
            () = tokio::time::sleep(POLL) => Ok(()),
        }
    }

    /// Deletes what earlier drills of this namespace left behind (an agent that died mid-drill).
    async fn remove_leftovers(&self) -> Result<usize, String> {
        let selector = format!("{DRILL_LABEL}=true,{TARGET_LABEL}={}", self.namespace);
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let old = namespaces
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| format!("listing leftover scratch namespaces: {e}"))?;
        let mut removed = Vec::new();
        for ns in old.items {
            if let Some(name) = ns.metadata.name {
                delete_quietly(&namespaces, &name).await?;
                removed.push(name);
            }
        }
        // A retried job reuses its scratch name: the old namespace must be gone, not
        // terminating, before it is created again.
        for name in &removed {
            self.wait_gone(&namespaces, name).await?;
        }
        let restores = self.velero("Restore", "restores");
        let old = restores
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| format!("listing leftover drill restores: {e}"))?;
        for r in old.items {
            if let Some(name) = r.metadata.name {
                delete_quietly(&restores, &name).await?;
            }
        }
        let config_maps: Api<ConfigMap> =
            Api::namespaced(self.client.clone(), &self.handler.config.velero_namespace);
        let old = config_maps
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| format!("listing leftover drill modifiers: {e}"))?;
        for cm in old.items {
            if let Some(name) = cm.metadata.name {
                delete_quietly(&config_maps, &name).await?;
            }
        }
        Ok(removed.len())
    }

    async fn newest_backup(&self) -> Result<BackupInfo, String> {
        let backups = self
            .velero("Backup", "backups")
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing Velero backups: {e}"))?;
        let values: Vec<Value> = backups
            .items
            .iter()
            .filter_map(|b| serde_json::to_value(b).ok())
            .collect();
        newest_backup_holding(&values, self.namespace).ok_or_else(|| {
            format!(
                "no Completed Velero backup in {} holds namespace {}",
                self.handler.config.velero_namespace, self.namespace
            )
        })
    }

    /// The scratch namespace, with the source namespace's Pod Security labels so workloads are
    /// admitted as they are in production.
    async fn create_scratch(&self) -> Result<(), String> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let source = namespaces
            .get_opt(self.namespace)
            .await
            .map_err(|e| format!("reading namespace {}: {e}", self.namespace))?;
        let mut labels = self.labels();
        if let Some(source_labels) = source.and_then(|n| n.metadata.labels) {
            labels.extend(
                source_labels
                    .into_iter()
                    .filter(|(k, _)| k.starts_with("pod-security.kubernetes.io/")),
            );
        }
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": self.scratch, "labels": labels},
        }))
        .map_err(|e| format!("scratch namespace: {e}"))?;
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .map(|_| ())
            .map_err(|e| format!("creating scratch namespace {}: {e}", self.scratch))
    }

    async fn create_restore(&self, backup: &str) -> Result<(), String> {
        let velero_ns = &self.handler.config.velero_namespace;
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), velero_ns);
        let modifier: ConfigMap = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": self.scratch, "namespace": velero_ns, "labels": self.labels()},
            "data": {"modifiers.yaml": SERVICE_MODIFIER},
        }))
        .map_err(|e| format!("resource modifier: {e}"))?;
        config_maps
            .create(&PostParams::default(), &modifier)
            .await
            .map_err(|e| format!("creating the resource modifier ConfigMap: {e}"))?;
        let restore: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "velero.io/v1",
            "kind": "Restore",
            "metadata": {"name": self.scratch, "namespace": velero_ns, "labels": self.labels()},
            "spec": {
                "backupName": backup,
                "includedNamespaces": [self.namespace],
                "namespaceMapping": {self.namespace: self.scratch},
                "excludedResources": self.handler.config.excluded_resources,
                "resourceModifier": {"kind": "ConfigMap", "name": self.scratch},
                "preserveNodePorts": false,
                "restorePVs": true,
            },
        }))
        .map_err(|e| format!("restore: {e}"))?;
        self.velero("Restore", "restores")
            .create(&PostParams::default(), &restore)
            .await
            .map(|_| ())
            .map_err(|e| format!("creating Velero restore {}: {e}", self.scratch))
    }

    /// Waits for the restore's terminal phase; anything but `Completed` fails the drill.
    async fn wait_restored(&self) -> Result<u64, Stop> {
        let api = self.velero("Restore", "restores");
        let deadline = Instant::now() + self.handler.config.restore_timeout.get();
        loop {
            let restore = api
                .get(&self.scratch)
                .await
                .map_err(|e| Stop::Failed(format!("reading restore {}: {e}", self.scratch)))?;
            let status = restore.data.get("status").cloned().unwrap_or(Value::Null);
            let phase = status["phase"].as_str().unwrap_or("New");
            match phase {
                "Completed" => {
                    return Ok(status
                        .pointer("/progress/itemsRestored")
                        .and_then(Value::as_u64)
                        .unwrap_or(0));
                }
                "PartiallyFailed" | "Failed" | "FailedValidation" => {
                    let mut why = format!("restore {} ended {phase}", self.scratch);
                    if let Some(n) = status["errors"].as_u64().filter(|n| *n > 0) {
                        why.push_str(&format!(" with {n} error(s)"));
                    }
                    if let Some(reason) = status["failureReason"].as_str().filter(|r| !r.is_empty())
                    {
                        why.push_str(&format!(": {reason}"));
                    }
                    if let Some(list) = status["validationErrors"].as_array() {
                        let errors: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
                        if !errors.is_empty() {
                            why.push_str(&format!(": {}", errors.join("; ")));
                        }
                    }
                    why.push_str(&format!(
                        " (velero restore describe {} --details)",
                        self.scratch
                    ));
                    return Err(Stop::Failed(why));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(Stop::Failed(format!(
                    "restore {} still {phase} after restore_timeout {}",
                    self.scratch, self.handler.config.restore_timeout
                )));
            }
            self.pause().await?;
        }
    }

    /// What of the scratch namespace is not ready yet, once everything is listed.
    async fn readiness(&self) -> Result<Vec<Readiness>, String> {
        let mut all = self
            .readiness_of::<Deployment>("Deployment", deployment_ready)
            .await?;
        all.extend(
            self.readiness_of::<StatefulSet>("StatefulSet", statefulset_ready)
                .await?,
        );
        all.extend(
            self.readiness_of::<PersistentVolumeClaim>("PersistentVolumeClaim", pvc_bound)
                .await?,
        );
        Ok(all)
    }

    /// Each object of kind `K` in the scratch namespace, and whether `ready` holds for it.
    async fn readiness_of<K>(
        &self,
        kind: &str,
        ready: fn(&K) -> bool,
    ) -> Result<Vec<Readiness>, String>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.scratch);
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing {kind}s: {e}"))?;
        Ok(list
            .items
            .iter()
            .map(|o| Readiness {
                what: format!("{kind} {}", o.meta().name.clone().unwrap_or_default()),
                ready: ready(o),
            })
            .collect())
    }

    /// Waits until every Deployment and StatefulSet is available and every PVC bound.
    async fn wait_ready(&self, report: &mut DrillReport) -> Result<(), Stop> {
        let deadline = Instant::now() + self.handler.config.ready_timeout.get();
        loop {
            let all = self.readiness().await.map_err(Stop::Failed)?;
            let waiting: Vec<&str> = all
                .iter()
                .filter(|r| !r.ready)
                .map(|r| r.what.as_str())
                .collect();
            if waiting.is_empty() || Instant::now() >= deadline {
                let ready = all.len() - waiting.len();
                report.checks.push(CheckResult::new(
                    "workloads ready",
                    waiting.is_empty(),
                    if waiting.is_empty() {
                        format!("{ready}/{} available or bound", all.len())
                    } else {
                        format!(
                            "{ready}/{} ready after ready_timeout {}; not ready: {}",
                            all.len(),
                            self.handler.config.ready_timeout,
                            waiting.join(", ")
                        )
                    },
                ));
                return if waiting.is_empty() {
                    Ok(())
                } else {
                    Err(Stop::Failed(format!("not ready: {}", waiting.join(", "))))
                };
            }
            self.pause().await?;
        }
    }

    /// The configured checks of this namespace, against its scratch copy.
    async fn run_checks(&self, report: &mut DrillReport) {
        for check in self
            .handler
            .config
            .checks
            .iter()
            .filter(|c| c.namespace == self.namespace)
        {
            if let Some(http) = &check.http {
                let name = format!("http {}:{}{}", http.service, http.port, http.path);
                let path = format!(
                    "/api/v1/namespaces/{}/services/{}:{}/proxy/{}",
                    self.scratch,
                    http.service,
                    http.port,
                    http.path.trim_start_matches('/')
                );
                let result = match http::Request::get(&path).body(Vec::new()) {
                    Ok(request) => match self.client.send(request.map(Into::into)).await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            CheckResult::new(
                                name,
                                status == http.expect_status,
                                format!("status {status}, expected {}", http.expect_status),
                            )
                        }
                        Err(e) => CheckResult::new(name, false, format!("request failed: {e}")),
                    },
                    Err(e) => CheckResult::new(name, false, format!("bad request: {e}")),
                };
                report.checks.push(result);
            }
            if let Some(min) = &check.min_objects {
                let name = format!("at least {} {}", min.count, min.kind);
                let result = match collection_path(&min.kind, &self.scratch) {
                    None => CheckResult::new(
                        name,
                        false,
                        format!("kind {} is not one the drill can count", min.kind),
                    ),
                    Some(path) => match self.count(&path).await {
                        Ok(n) => CheckResult::new(
                            name,
                            n >= min.count,
                            format!("{n} {} restored", min.kind),
                        ),
                        Err(e) => CheckResult::new(name, false, e),
                    },
                };
                report.checks.push(result);
            }
        }
    }

    async fn count(&self, path: &str) -> Result<u64, String> {
        let request = http::Request::get(path)
            .body(Vec::new())
            .map_err(|e| format!("bad request: {e}"))?;
        let list: Value = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("listing {path}: {e}"))?;
        Ok(list["items"].as_array().map_or(0, |a| a.len() as u64))
    }

    /// Deletes the Restore, its modifier and the scratch namespace, and waits for the namespace
    /// to be gone. Runs whatever happened before, also after a cancel.
    async fn clean_up(&self) -> Result<(), String> {
        let velero_ns = &self.handler.config.velero_namespace;
        delete_quietly(&self.velero("Restore", "restores"), &self.scratch).await?;
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), velero_ns);
        delete_quietly(&config_maps, &self.scratch).await?;
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        delete_quietly(&namespaces, &self.scratch).await?;
        self.wait_gone(&namespaces, &self.scratch).await
    }

    /// Waits for a deleted namespace to be gone. Not cancellable: cleaning up is what a
    /// cancelled drill still owes (a timeout's hard stop may cut the wait; the next drill then
    /// removes the leftover).
    async fn wait_gone(&self, namespaces: &Api<Namespace>, name: &str) -> Result<(), String> {
        let deadline = Instant::now() + CLEANUP_WAIT;
        loop {
            let still = namespaces
                .get_opt(name)
                .await
                .map_err(|e| format!("reading namespace {name}: {e}"))?;
            if still.is_none() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "scratch namespace {name} still terminating after {}s; delete it by hand",
                    CLEANUP_WAIT.as_secs()
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Deletes `name`; already gone is fine.
async fn delete_quietly<K>(api: &Api<K>, name: &str) -> Result<(), String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(format!("deleting {name}: {e}")),
    }
}

/// Drills the newest backup of `namespace`.
pub async fn drill(
    handler: &RestoreDrillHandler,
    ctx: &JobContext,
    namespace: &str,
) -> DrillReport {
    let mut report = DrillReport::default();
    let Some(client) = handler.context.kube.clone() else {
        report.fail("a Velero drill needs the [kubernetes] section");
        return report;
    };
    let drill = Drill {
        handler,
        ctx,
        client,
        namespace,
        scratch: scratch_namespace(namespace, &ctx.job_id),
    };
    match drill.remove_leftovers().await {
        Ok(0) => {}
        Ok(n) => {
            ctx.progress
                .report(&format!(
                    "removed {n} scratch namespace(s) left by earlier drills of {namespace}"
                ))
                .await;
        }
        Err(e) => {
            report.fail(e);
            return report;
        }
    }
    let backup = match drill.newest_backup().await {
        Ok(b) => b,
        Err(e) => {
            report.cleaned_up = true;
            report.fail(e);
            return report;
        }
    };
    let started = Utc::now();
    let age = (started - backup.completed_at).to_std().unwrap_or_default();
    report.backup = Some(backup.name.clone());
    report.backup_created_at = Some(backup.completed_at);
    report.data_age_seconds = Some(age.as_secs());
    if age > handler.config.max_data_age.get() {
        report.cleaned_up = true;
        report.fail(format!(
            "the newest backup holding {namespace}, {}, is {} old: more than max_data_age {}",
            backup.name,
            super::human(age),
            handler.config.max_data_age
        ));
        return report;
    }
    report.scratch_namespace = Some(drill.scratch.clone());
    ctx.progress
        .report(&format!(
            "restoring backup {} of {namespace} into {}",
            backup.name, drill.scratch
        ))
        .await;
    let clock = Instant::now();
    let outcome = restore_and_verify(&drill, &backup.name, &mut report).await;
    let verified = clock.elapsed();
    match outcome {
        Ok(()) => report.rto_seconds = Some(verified.as_secs_f64()),
        Err(Stop::Cancelled) => report.fail("cancelled"),
        Err(Stop::Failed(why)) => report.fail(why),
    }
    match drill.clean_up().await {
        Ok(()) => report.cleaned_up = true,
        Err(e) => {
            tracing::warn!(error = %e, "Drill not cleaned up");
            report.fail(e);
        }
    }
    report
}

async fn restore_and_verify(
    drill: &Drill<'_>,
    backup: &str,
    report: &mut DrillReport,
) -> Result<(), Stop> {
    drill.create_scratch().await.map_err(Stop::Failed)?;
    drill.create_restore(backup).await.map_err(Stop::Failed)?;
    let items = drill.wait_restored().await?;
    if items == 0 {
        return Err(Stop::Failed(format!(
            "restore {} completed but restored nothing from backup {backup}",
            drill.scratch
        )));
    }
    drill
        .ctx
        .progress
        .report(&format!(
            "{items} items restored; waiting for the workloads"
        ))
        .await;
    drill.wait_ready(report).await?;
    if drill.stopped() {
        return Err(Stop::Cancelled);
    }
    drill.run_checks(report).await;
    if let Some(failed) = report.checks.iter().find(|c| !c.ok) {
        return Err(Stop::Failed(format!(
            "check {} failed: {}",
            failed.name, failed.message
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_namespaces_are_dns_labels_with_the_job_in_them() {
        let job = "01jdzxk5w4v1q6v1c5m2r8g4bn";
        assert_eq!(scratch_namespace("home", job), "drill-home-nb4g8r");
        let long = "a".repeat(63);
        let scratch = scratch_namespace(&long, job);
        assert_eq!(scratch.len(), 63, "{scratch}");
        assert!(scratch.starts_with("drill-aaa") && scratch.ends_with("-nb4g8r"));
        // A cut that ends in a hyphen is trimmed: a label may not hold "--" there.
        let hyphens = format!("{}-b", "a".repeat(49));
        assert!(!scratch_namespace(&hyphens, job).contains("--"));
    }

    fn backup(name: &str, phase: &str, done: &str, included: Value, excluded: Value) -> Value {
        json!({
            "metadata": {"name": name},
            "spec": {"includedNamespaces": included, "excludedNamespaces": excluded},
            "status": {"phase": phase, "completionTimestamp": done},
        })
    }

    #[test]
    fn the_newest_completed_backup_that_holds_the_namespace_is_drilled() {
        let backups = vec![
            backup(
                "old-home",
                "Completed",
                "2026-11-28T03:00:00Z",
                json!(["home"]),
                json!([]),
            ),
            backup(
                "new-home",
                "Completed",
                "2026-11-30T03:00:00Z",
                json!(["home"]),
                json!([]),
            ),
            backup(
                "newer-failed",
                "PartiallyFailed",
                "2026-11-30T09:00:00Z",
                json!(["home"]),
                json!([]),
            ),
            backup(
                "media-only",
                "Completed",
                "2026-11-30T10:00:00Z",
                json!(["media"]),
                json!([]),
            ),
            backup(
                "all-but-home",
                "Completed",
                "2026-11-30T11:00:00Z",
                json!(["*"]),
                json!(["home"]),
            ),
        ];
        let found = newest_backup_holding(&backups, "home").expect("a backup");
        assert_eq!(found.name, "new-home");
        assert_eq!(
            newest_backup_holding(&backups, "media")
                .map(|b| b.name)
                .as_deref(),
            Some("all-but-home")
        );
        let everything = vec![backup(
            "full",
            "Completed",
            "2026-11-30T01:00:00Z",
            Value::Null,
            Value::Null,
        )];
        assert_eq!(
            newest_backup_holding(&everything, "home")
                .map(|b| b.name)
                .as_deref(),
            Some("full")
        );
        assert_eq!(newest_backup_holding(&backups[..1], "media"), None);
    }
}
