//! The read-only checks: list what they judge through the Kubernetes API and hand it to
//! [`super::verdicts`]. A kind the cluster does not serve (its CRD not installed) skips its
//! check, saying so; an API error fails it, naming what could not be read.

use chrono::{Duration as ChronoDuration, Utc};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use serde_json::Value;

use super::Config;
use super::verdicts;
use crate::checks::Check;
use crate::handler::{JobContext, JobQuery};
use crate::kind::JobKind;

/// A kind as the API serves it.
#[derive(Clone, Copy)]
struct Kind {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
}

const fn kind(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
) -> Kind {
    Kind {
        group,
        version,
        kind,
        plural,
    }
}

const NODES: Kind = kind("", "v1", "Node", "nodes");
const PODS: Kind = kind("", "v1", "Pod", "pods");
const NAMESPACES: Kind = kind("", "v1", "Namespace", "namespaces");
const APPLICATIONS: Kind = kind("argoproj.io", "v1alpha1", "Application", "applications");
const STORAGE_LOCATIONS: Kind = kind(
    "velero.io",
    "v1",
    "BackupStorageLocation",
    "backupstoragelocations",
);
const EXTERNAL_SECRETS: Kind = kind(
    "external-secrets.io",
    "v1",
    "ExternalSecret",
    "externalsecrets",
);
const SECRET_STORES: Kind = kind("external-secrets.io", "v1", "SecretStore", "secretstores");
const CLUSTER_SECRET_STORES: Kind = kind(
    "external-secrets.io",
    "v1",
    "ClusterSecretStore",
    "clustersecretstores",
);
const GATEWAY_CLASSES: Kind = kind(
    "gateway.networking.k8s.io",
    "v1",
    "GatewayClass",
    "gatewayclasses",
);
const HTTP_ROUTES: Kind = kind("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes");
const GATEWAYS: Kind = kind("gateway.networking.k8s.io", "v1", "Gateway", "gateways");
const CERTIFICATES: Kind = kind("cert-manager.io", "v1", "Certificate", "certificates");
const CLUSTER_ISSUERS: Kind = kind("cert-manager.io", "v1", "ClusterIssuer", "clusterissuers");
const ISSUERS: Kind = kind("cert-manager.io", "v1", "Issuer", "issuers");

/// External Secrets before 0.16 serve only `v1beta1`.
const EXTERNAL_SECRETS_OLD: &str = "v1beta1";

/// `what: <code> <message>` for an API answer, `what: <error>` for anything else.
fn api_error(what: &str, e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{what}: {} {}", s.code, s.message),
        other => format!("{what}: {other}"),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// The fix of a check whose objects could not be read.
fn read_fix(what: &Kind) -> String {
    format!(
        "check the agent's access to the API server and that its RBAC allows listing {}",
        if what.group.is_empty() {
            what.plural.to_string()
        } else {
            format!("{}.{}", what.plural, what.group)
        }
    )
}

pub(super) struct Reader<'a> {
    pub client: kube::Client,
    pub config: &'a Config,
    pub ctx: &'a JobContext,
    pub drill_targets: &'a [String],
}

impl Reader<'_> {
    fn api(&self, what: &Kind, version: &str, namespace: Option<&str>) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk(what.group, version, what.kind);
        let resource = ApiResource::from_gvk_with_plural(&gvk, what.plural);
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        }
    }

    /// Every object of a kind (in `namespace`, or in all), as JSON with its `kind` set;
    /// `Ok(None)` when the cluster does not serve the kind.
    async fn list_version(
        &self,
        what: &Kind,
        version: &str,
        namespace: Option<&str>,
    ) -> Result<Option<Vec<Value>>, String> {
        let listed = self
            .api(what, version, namespace)
            .list(&ListParams::default())
            .await;
        let list = match listed {
            Ok(list) => list,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => {
                let place = namespace.map(|ns| format!(" in {ns}")).unwrap_or_default();
                return Err(api_error(&format!("listing {}{place}", what.plural), &e));
            }
        };
        Ok(Some(
            list.items
                .iter()
                .filter_map(|o| serde_json::to_value(o).ok())
                .map(|mut v| {
                    if v.get("kind").is_none_or(Value::is_null) {
                        v["kind"] = Value::from(what.kind);
                    }
                    v
                })
                .collect(),
        ))
    }

    async fn list(
        &self,
        what: &Kind,
        namespace: Option<&str>,
    ) -> Result<Option<Vec<Value>>, String> {
        self.list_version(what, what.version, namespace).await
    }

    async fn get(&self, what: &Kind, namespace: &str, name: &str) -> Result<Option<Value>, String> {
        let found = self
            .api(what, what.version, Some(namespace))
            .get_opt(name)
            .await
            .map_err(|e| api_error(&format!("reading {} {namespace}/{name}", what.kind), &e))?;
        Ok(found.and_then(|o| serde_json::to_value(o).ok()))
    }

    /// Every read-only check, in the order of the docs' table.
    pub async fn all(&self) -> Vec<Check> {
        vec![
            self.nodes_ready().await,
            self.pods_crashloop().await,
            self.argocd_apps().await,
            self.kube_proxy().await,
            self.pod_security().await,
            self.velero_location().await,
            self.drills().await,
            self.external_secrets().await,
            self.gateway_classes().await,
            self.http_routes().await,
            self.cloudflare().await,
        ]
    }

    /// Lists `what` and judges it, or says why it could not.
    async fn judged(
        &self,
        name: &str,
        what: Kind,
        namespace: Option<&str>,
        verdict: impl FnOnce(&[Value]) -> Check,
    ) -> Check {
        match self.list(&what, namespace).await {
            Ok(Some(items)) => verdict(&items),
            Ok(None) => Check::skip(
                name,
                format!(
                    "the cluster does not serve {}.{} (CRD not installed)",
                    what.plural, what.group
                ),
            ),
            Err(e) => Check::fail(name, e, read_fix(&what)),
        }
    }

    async fn nodes_ready(&self) -> Check {
        self.judged("nodes.ready", NODES, None, verdicts::nodes_ready)
            .await
    }

    async fn pods_crashloop(&self) -> Check {
        const NAME: &str = "pods.crashloop";
        if self.config.namespaces.is_empty() {
            return Check::skip(NAME, "no [acceptance] namespaces");
        }
        let mut pods = Vec::new();
        for ns in &self.config.namespaces {
            match self.list(&PODS, Some(ns)).await {
                Ok(found) => pods.extend(found.unwrap_or_default()),
                Err(e) => return Check::fail(NAME, e, read_fix(&PODS)),
            }
        }
        let window = ChronoDuration::from_std(self.config.restart_window.get())
            .unwrap_or(ChronoDuration::hours(1));
        verdicts::pods_crashloop(
            &pods,
            &self.config.namespaces,
            self.config.max_restarts,
            window,
            Utc::now(),
        )
    }

    async fn argocd_apps(&self) -> Check {
        self.judged("argocd.apps", APPLICATIONS, None, verdicts::argocd_apps)
            .await
    }

    async fn kube_proxy(&self) -> Check {
        const NAME: &str = "cilium.kube_proxy";
        match crate::upgrade::kube::kube_proxy_replaced(&self.client).await {
            Ok(Ok(())) => Check::pass(
                NAME,
                "Cilium replaces kube-proxy and no kube-proxy DaemonSet runs",
            ),
            Ok(Err(why)) => Check::fail(
                NAME,
                why,
                "set kubeProxyReplacement: true in Cilium's Helm values, disable kube-proxy in the Talos machine config (cluster.proxy.disabled: true) and delete DaemonSet kube-system/kube-proxy",
            ),
            Err(e) => Check::fail(
                NAME,
                e,
                "check the agent's RBAC: get configmaps and daemonsets in kube-system",
            ),
        }
    }

    async fn pod_security(&self) -> Check {
        let exceptions = &self.config.pod_security_exceptions;
        self.judged("pod_security", NAMESPACES, None, |ns| {
            verdicts::pod_security(ns, exceptions)
        })
        .await
    }

    async fn velero_location(&self) -> Check {
        let velero_ns = self.config.velero_namespace.as_str();
        self.judged(
            "velero.location",
            STORAGE_LOCATIONS,
            Some(velero_ns),
            |locations| verdicts::velero_locations(locations, velero_ns),
        )
        .await
    }

    /// `drills`: the newest finished restore drill of each target passed. The targets are
    /// `[restore_drill] namespaces`, and etcd once it was drilled.
    async fn drills(&self) -> Check {
        const NAME: &str = "drills";
        let mut targets: Vec<String> = self.drill_targets.to_vec();
        targets.push(crate::restore_drill::ETCD_TARGET.to_string());
        let mut passed = Vec::new();
        let mut failed = Vec::new();
        for target in &targets {
            let newest = |state: &str| JobQuery {
                kind: Some(JobKind::RESTORE_DRILL),
                state: Some(state.to_string()),
                target: Some(target.clone()),
            };
            let good = self.ctx.jobs.newest(&newest("succeeded")).await;
            let bad = self.ctx.jobs.newest(&newest("failed")).await;
            let (good, bad) = match (good, bad) {
                (Ok(good), Ok(bad)) => (good, bad),
                (Err(e), _) | (_, Err(e)) => {
                    return Check::fail(
                        NAME,
                        format!("reading the job records: {e}"),
                        "check the agent's NATS connection",
                    );
                }
            };
            match (good, bad) {
                (Some(g), Some(b)) if b.created_at > g.created_at => failed.push(format!(
                    "the newest drill of {target} (job {}) failed",
                    b.job_id
                )),
                (None, Some(b)) => failed.push(format!(
                    "the newest drill of {target} (job {}) failed",
                    b.job_id
                )),
                (Some(_), _) => passed.push(target.clone()),
                (None, None) => {}
            }
        }
        if passed.is_empty() && failed.is_empty() {
            return Check::skip(NAME, "no restore drill has run yet");
        }
        if failed.is_empty() {
            Check::pass(
                NAME,
                format!("the newest drill passed for {}", passed.join(", ")),
            )
        } else {
            Check::fail(
                NAME,
                failed.join("; "),
                "read the drill's result (`status <job>`) and run `drill ns=<target>` again once fixed",
            )
        }
    }

    async fn external_secrets(&self) -> Check {
        const NAME: &str = "external_secrets";
        let mut lists = Vec::new();
        for what in [EXTERNAL_SECRETS, SECRET_STORES, CLUSTER_SECRET_STORES] {
            let mut found = self.list(&what, None).await;
            if matches!(found, Ok(None)) {
                found = self.list_version(&what, EXTERNAL_SECRETS_OLD, None).await;
            }
            match found {
                Ok(Some(items)) => lists.push(items),
                Ok(None) if what.plural == "externalsecrets" => {
                    return Check::skip(
                        NAME,
                        "the cluster does not serve externalsecrets.external-secrets.io (External Secrets not installed)",
                    );
                }
                Ok(None) => lists.push(Vec::new()),
                Err(e) => return Check::fail(NAME, e, read_fix(&what)),
            }
        }
        verdicts::external_secrets(&lists[0], &lists[1], &lists[2])
    }

    async fn gateway_classes(&self) -> Check {
        self.judged(
            "gateway.classes",
            GATEWAY_CLASSES,
            None,
            verdicts::gateway_classes,
        )
        .await
    }

    /// `http_routes`: each configured route Accepted by its Gateways, and the certificate of
    /// the listeners it attaches to Ready and valid for `cert_min_days`.
    async fn http_routes(&self) -> Check {
        const NAME: &str = "http_routes";
        if self.config.http_routes.is_empty() {
            return Check::skip(NAME, "no [acceptance] http_routes");
        }
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for route in &self.config.http_routes {
            match self.http_route(route).await {
                Ok(line) => good.push(format!("{route}: {line}")),
                Err(why) => bad.push(format!("route {route}: {why}")),
            }
        }
        if bad.is_empty() {
            Check::pass(NAME, good.join("; "))
        } else {
            Check::fail(
                NAME,
                bad.join("; "),
                "kubectl describe the route, its Gateway and the Certificate named; a Certificate not Ready shows why in its CertificateRequest and Order (kubectl describe certificaterequest, cmctl status certificate)",
            )
        }
    }

    async fn http_route(&self, route: &str) -> Result<String, String> {
        let (ns, name) = route
            .split_once('/')
            .ok_or_else(|| "not namespace/name: fix [acceptance] http_routes".to_string())?;
        let object = self
            .get(&HTTP_ROUTES, ns, name)
            .await?
            .ok_or_else(|| format!("HTTPRoute {ns}/{name} not found"))?;
        verdicts::route_accepted(&object)?;
        let mut secrets = Vec::new();
        for parent in object["spec"]["parentRefs"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if parent["kind"].as_str().unwrap_or("Gateway") != "Gateway" {
                continue;
            }
            let gateway_name = parent["name"].as_str().unwrap_or_default();
            let gateway_ns = parent["namespace"].as_str().unwrap_or(ns);
            let gateway = self
                .get(&GATEWAYS, gateway_ns, gateway_name)
                .await?
                .ok_or_else(|| format!("Gateway {gateway_ns}/{gateway_name} not found"))?;
            secrets.extend(verdicts::serving_secrets(
                &gateway,
                parent["sectionName"].as_str(),
            ));
        }
        secrets.sort();
        secrets.dedup();
        if secrets.is_empty() {
            return Err(
                "its Gateway listeners name no TLS certificate (certificateRefs): it is not served over HTTPS"
                    .into(),
            );
        }
        let mut lines = vec!["Accepted".to_string()];
        for secret in &secrets {
            let secret_ns = secret.split('/').next().unwrap_or(ns);
            let certificates = self
                .list(&CERTIFICATES, Some(secret_ns))
                .await?
                .ok_or_else(|| {
                    "the cluster does not serve certificates.cert-manager.io (cert-manager not installed)"
                        .to_string()
                })?;
            lines.push(verdicts::certificate_verdict(
                &certificates,
                secret,
                self.config.cert_min_days,
                Utc::now(),
            )?);
        }
        Ok(lines.join(", "))
    }

    async fn cloudflare(&self) -> Check {
        const NAME: &str = "cert_manager.cloudflare";
        let mut issuers = Vec::new();
        for what in [CLUSTER_ISSUERS, ISSUERS] {
            match self.list(&what, None).await {
                Ok(found) => issuers.extend(found.unwrap_or_default()),
                Err(e) => return Check::fail(NAME, e, read_fix(&what)),
            }
        }
        verdicts::cloudflare_issuers(&issuers)
    }
}
