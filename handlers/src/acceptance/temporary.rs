//! The checks that create something: a LoadBalancer Service that must get an address from the
//! pool, and a PVC on the default StorageClass that must bind (with a pod consuming it when
//! the class binds on first consumer). Whatever a check creates is deleted at its end, also
//! when it fails, times out or the job is cancelled; everything carries [`ACCEPTANCE_LABEL`],
//! so what a dead agent left behind is found and deleted at the next run's start.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde::de::DeserializeOwned;
use serde_json::json;

use super::Config;
use super::verdicts;
use crate::checks::Check;
use crate::handler::JobContext;

/// Every temporary object carries it (`true`); leftovers are found by it.
pub const ACCEPTANCE_LABEL: &str = "infraflux.dev/acceptance";
const JOB_LABEL: &str = "infraflux.dev/acceptance-job";
const DEFAULT_CLASS_ANNOTATIONS: &[&str] = &[
    "storageclass.kubernetes.io/is-default-class",
    "storageclass.beta.kubernetes.io/is-default-class",
];

const POLL: Duration = Duration::from_secs(1);
/// How long a deleted object may take to go before the check says it was left behind.
const CLEANUP_WAIT: Duration = Duration::from_secs(30);

/// `infraflux-acceptance-<last 6 of the job id>`: the Service, the claim and the pod of one run.
pub fn temporary_name(job_id: &str) -> String {
    let suffix: String = job_id
        .chars()
        .rev()
        .filter(char::is_ascii_alphanumeric)
        .take(6)
        .collect::<String>()
        .chars()
        .rev()
        .collect::<String>()
        .to_ascii_lowercase();
    format!("infraflux-acceptance-{suffix}")
}

/// Why a wait ended without what it waited for.
enum Stop {
    Cancelled,
    TimedOut,
}

fn api_error(what: &str, e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{what}: {} {}", s.code, s.message),
        other => format!("{what}: {other}"),
    }
}

pub(super) struct Temporary<'a> {
    client: kube::Client,
    config: &'a Config,
    ctx: &'a JobContext,
    name: String,
}

impl<'a> Temporary<'a> {
    pub fn new(client: kube::Client, config: &'a Config, ctx: &'a JobContext) -> Self {
        Self {
            client,
            config,
            ctx,
            name: temporary_name(&ctx.job_id),
        }
    }

    fn namespaced<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.config.test_namespace)
    }

    fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (ACCEPTANCE_LABEL.to_string(), "true".to_string()),
            (JOB_LABEL.to_string(), self.ctx.job_id.clone()),
        ])
    }

    fn where_(&self) -> String {
        format!("{}/{}", self.config.test_namespace, self.name)
    }

    /// Sleeps one poll, unless the job is asked to stop or `deadline` passed.
    async fn pause(&self, deadline: Instant) -> Result<(), Stop> {
        if Instant::now() >= deadline {
            return Err(Stop::TimedOut);
        }
        tokio::select! {
            () = self.ctx.stop_requested.cancelled() => Err(Stop::Cancelled),
            () = self.ctx.cancel.cancelled() => Err(Stop::Cancelled),
            () = tokio::time::sleep(POLL) => Ok(()),
        }
    }

    /// Deletes what earlier runs left in the test namespace (an agent that died mid-check).
    pub async fn remove_leftovers(&self) -> Result<usize, String> {
        let selector = format!("{ACCEPTANCE_LABEL}=true");
        let lp = ListParams::default().labels(&selector);
        let mut removed = 0;
        // Pods first: a claim in use by a pod is not released before the pod is gone.
        let pods: Api<Pod> = self.namespaced();
        for pod in pods
            .list(&lp)
            .await
            .map_err(|e| api_error("listing leftover pods", &e))?
        {
            if let Some(name) = pod.metadata.name {
                remove(&pods, &name).await?;
                removed += 1;
            }
        }
        let claims: Api<PersistentVolumeClaim> = self.namespaced();
        for claim in claims
            .list(&lp)
            .await
            .map_err(|e| api_error("listing leftover claims", &e))?
        {
            if let Some(name) = claim.metadata.name {
                remove(&claims, &name).await?;
                removed += 1;
            }
        }
        let services: Api<Service> = self.namespaced();
        for service in services
            .list(&lp)
            .await
            .map_err(|e| api_error("listing leftover services", &e))?
        {
            if let Some(name) = service.metadata.name {
                remove(&services, &name).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// `lb_pool`: a temporary LoadBalancer Service gets an address inside the pool within
    /// `lb_timeout`, then is deleted.
    pub async fn lb_pool(&self) -> Check {
        const NAME: &str = "lb_pool";
        let Some(pool) = self.config.lb_pool.as_deref() else {
            return Check::skip(NAME, "no [acceptance] lb_pool");
        };
        if let Err(e) = verdicts::in_cidr("0.0.0.0", pool) {
            return Check::fail(
                NAME,
                e,
                "set [acceptance] lb_pool to a CIDR such as 10.0.0.240/28",
            );
        }
        let services: Api<Service> = self.namespaced();
        let service: Result<Service, _> = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": self.name, "labels": self.labels()},
            "spec": {
                "type": "LoadBalancer",
                // Takes an address only: no node ports, no endpoints.
                "allocateLoadBalancerNodePorts": false,
                "selector": {ACCEPTANCE_LABEL: "no-such-pod"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            },
        }));
        let service = match service {
            Ok(s) => s,
            Err(e) => return Check::fail(NAME, format!("temporary Service: {e}"), ""),
        };
        let verdict = match services.create(&PostParams::default(), &service).await {
            Ok(_) => self.wait_address(&services, pool).await,
            Err(e) => Check::fail(
                NAME,
                api_error(&format!("creating Service {}", self.where_()), &e),
                "check the agent's RBAC: create and delete services in the test namespace",
            ),
        };
        self.cleaned(
            verdict,
            &[remove_and_wait(&services, &self.name, "Service").await],
        )
    }

    async fn wait_address(&self, services: &Api<Service>, pool: &str) -> Check {
        const NAME: &str = "lb_pool";
        let timeout = self.config.lb_timeout.get();
        let deadline = Instant::now() + timeout;
        let address = loop {
            let current = match services.get(&self.name).await {
                Ok(s) => s,
                Err(e) => {
                    return Check::fail(
                        NAME,
                        api_error(&format!("reading Service {}", self.where_()), &e),
                        "",
                    );
                }
            };
            let ingress = current
                .status
                .and_then(|s| s.load_balancer)
                .and_then(|lb| lb.ingress)
                .and_then(|i| i.into_iter().next());
            if let Some(ip) = ingress.and_then(|i| i.ip) {
                break ip;
            }
            match self.pause(deadline).await {
                Ok(()) => {}
                Err(Stop::Cancelled) => return Check::skip(NAME, "cancelled"),
                Err(Stop::TimedOut) => {
                    return Check::fail(
                        NAME,
                        format!(
                            "LoadBalancer Service {} got no address within {}",
                            self.where_(),
                            humantime::format_duration(timeout)
                        ),
                        format!(
                            "check Cilium's LB IPAM: a CiliumLoadBalancerIPPool covering {pool} must exist and have free addresses (kubectl get ciliumloadbalancerippools; kubectl describe service shows the controller's events)"
                        ),
                    );
                }
            }
        };
        match verdicts::in_cidr(&address, pool) {
            Ok(true) => Check::pass(
                NAME,
                format!("a LoadBalancer Service got {address}, inside {pool}"),
            ),
            Ok(false) => Check::fail(
                NAME,
                format!(
                    "LoadBalancer Service {} got {address}, outside lb_pool {pool}",
                    self.where_()
                ),
                format!(
                    "the cluster's LB IP pool does not match the plan: make the CiliumLoadBalancerIPPool hand out {pool}, or correct [acceptance] lb_pool"
                ),
            ),
            Err(e) => Check::fail(NAME, e, ""),
        }
    }

    /// `storage`: a temporary PVC on the default StorageClass binds, with a pod consuming it
    /// when the class binds on first consumer; both are deleted.
    pub async fn storage(&self) -> Check {
        const NAME: &str = "storage";
        if !self.config.storage {
            return Check::skip(NAME, "[acceptance] storage = false");
        }
        let classes: Api<StorageClass> = Api::all(self.client.clone());
        let classes = match classes.list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(e) => {
                return Check::fail(
                    NAME,
                    api_error("listing StorageClasses", &e),
                    "check the agent's RBAC: list storageclasses.storage.k8s.io",
                );
            }
        };
        let default = classes.iter().find(|c| {
            c.metadata.annotations.as_ref().is_some_and(|a| {
                DEFAULT_CLASS_ANNOTATIONS
                    .iter()
                    .any(|k| a.get(*k).map(String::as_str) == Some("true"))
            })
        });
        let Some(default) = default else {
            return Check::fail(
                NAME,
                "no default StorageClass: a PVC without storageClassName never binds",
                "mark one default: kubectl annotate storageclass longhorn storageclass.kubernetes.io/is-default-class=true",
            );
        };
        let class = default.metadata.name.clone().unwrap_or_default();
        let on_first_consumer =
            default.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
        let claims: Api<PersistentVolumeClaim> = self.namespaced();
        let pods: Api<Pod> = self.namespaced();
        let mut created_pod = false;
        let verdict = match self.create_claim(&claims).await {
            Err(e) => Check::fail(
                NAME,
                e,
                "check the agent's RBAC: create and delete persistentvolumeclaims and pods in the test namespace",
            ),
            Ok(()) => {
                let consumer = if on_first_consumer {
                    created_pod = true;
                    self.create_consumer(&pods).await
                } else {
                    Ok(())
                };
                match consumer {
                    Err(e) => Check::fail(
                        NAME,
                        e,
                        "check the agent's RBAC and the test namespace's Pod Security level",
                    ),
                    Ok(()) => self.wait_bound(&claims, &class, on_first_consumer).await,
                }
            }
        };
        let mut cleanup = Vec::new();
        if created_pod {
            cleanup.push(remove_and_wait(&pods, &self.name, "Pod").await);
        }
        cleanup.push(remove_and_wait(&claims, &self.name, "PersistentVolumeClaim").await);
        self.cleaned(verdict, &cleanup)
    }

    async fn create_claim(&self, claims: &Api<PersistentVolumeClaim>) -> Result<(), String> {
        // No storageClassName: the default class is what is being tested.
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": self.name, "labels": self.labels()},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": self.config.storage_size}}},
        }))
        .map_err(|e| format!("temporary claim: {e}"))?;
        claims
            .create(&PostParams::default(), &claim)
            .await
            .map(|_| ())
            .map_err(|e| {
                api_error(
                    &format!("creating PersistentVolumeClaim {}", self.where_()),
                    &e,
                )
            })
    }

    /// A pod that mounts the claim and only sleeps, admitted under Pod Security `restricted`.
    async fn create_consumer(&self, pods: &Api<Pod>) -> Result<(), String> {
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.name, "labels": self.labels()},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 0,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": "consumer", "image": self.config.pod_image,
                    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                                        "capabilities": {"drop": ["ALL"]}},
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "16Mi"}},
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                }],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": self.name}}],
            },
        }))
        .map_err(|e| format!("temporary pod: {e}"))?;
        pods.create(&PostParams::default(), &pod)
            .await
            .map(|_| ())
            .map_err(|e| api_error(&format!("creating Pod {}", self.where_()), &e))
    }

    async fn wait_bound(
        &self,
        claims: &Api<PersistentVolumeClaim>,
        class: &str,
        on_first_consumer: bool,
    ) -> Check {
        const NAME: &str = "storage";
        let timeout = self.config.storage_timeout.get();
        let deadline = Instant::now() + timeout;
        let how = if on_first_consumer {
            " (WaitForFirstConsumer: with a pod using it)"
        } else {
            ""
        };
        loop {
            let phase = match claims.get(&self.name).await {
                Ok(c) => c.status.and_then(|s| s.phase),
                Err(e) => {
                    return Check::fail(
                        NAME,
                        api_error(
                            &format!("reading PersistentVolumeClaim {}", self.where_()),
                            &e,
                        ),
                        "",
                    );
                }
            };
            if phase.as_deref() == Some("Bound") {
                return Check::pass(
                    NAME,
                    format!("a PersistentVolumeClaim on default StorageClass {class} bound{how}"),
                );
            }
            match self.pause(deadline).await {
                Ok(()) => {}
                Err(Stop::Cancelled) => return Check::skip(NAME, "cancelled"),
                Err(Stop::TimedOut) => {
                    return Check::fail(
                        NAME,
                        format!(
                            "PersistentVolumeClaim {} on StorageClass {class} not Bound within {}{how}",
                            self.where_(),
                            humantime::format_duration(timeout)
                        ),
                        format!(
                            "kubectl -n {} describe pvc {} shows the provisioner's events; check that the provisioner of {class} runs (Longhorn: kubectl -n longhorn-system get pods) and has room",
                            self.config.test_namespace, self.name
                        ),
                    );
                }
            }
        }
    }

    /// The verdict, failed when something created was not deleted.
    fn cleaned(&self, verdict: Check, cleanup: &[Result<(), String>]) -> Check {
        let left: Vec<&str> = cleanup
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(String::as_str)
            .collect();
        if left.is_empty() {
            return verdict;
        }
        let left = left.join("; ");
        let fix = format!(
            "delete them: kubectl -n {} delete pod,pvc,service -l {ACCEPTANCE_LABEL}=true (the next run also tries)",
            self.config.test_namespace
        );
        if verdict.skipped || verdict.ok {
            Check::fail(
                verdict.name,
                format!("{}; but {left}", verdict.message),
                fix,
            )
        } else {
            Check::fail(
                verdict.name,
                format!("{}; and {left}", verdict.message),
                format!("{}; {fix}", verdict.fix),
            )
        }
    }
}

/// Deletes `name`; already gone is fine.
async fn remove<K>(api: &Api<K>, name: &str) -> Result<(), String>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(api_error(&format!("deleting {name}"), &e)),
    }
}

/// Deletes `name` and waits until it is gone (finalizers: a claim outlives its pod briefly).
/// Not cut short by a cancel: this is what a cancelled job must still do.
async fn remove_and_wait<K>(api: &Api<K>, name: &str, kind: &str) -> Result<(), String>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    remove(api, name)
        .await
        .map_err(|e| format!("temporary {kind} {name} not deleted: {e}"))?;
    let deadline = Instant::now() + CLEANUP_WAIT;
    loop {
        match api.get_opt(name).await {
            Ok(None) => return Ok(()),
            Ok(Some(_)) if Instant::now() >= deadline => {
                return Err(format!(
                    "temporary {kind} {name} still there {} after its deletion",
                    humantime::format_duration(CLEANUP_WAIT)
                ));
            }
            Ok(Some(_)) => {}
            Err(e) if Instant::now() >= deadline => {
                return Err(api_error(
                    &format!("temporary {kind} {name} not confirmed gone"),
                    &e,
                ));
            }
            Err(_) => {}
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_are_short_labels_per_job() {
        assert_eq!(
            temporary_name("01jb3x7k9qz2mfe4"),
            "infraflux-acceptance-z2mfe4"
        );
        assert!(temporary_name("01JB3X7K9QZ2MFE4").len() <= 63);
    }
}
