//! The verdicts of the read-only checks, from the objects as the API serves them (JSON): pure,
//! so every pass and failure is tested without a cluster.

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use serde_json::Value;

use crate::checks::Check;

/// `namespace/name` (or `name` for a cluster-scoped object).
pub fn object_name(object: &Value) -> String {
    let name = object["metadata"]["name"].as_str().unwrap_or("?");
    match object["metadata"]["namespace"].as_str() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_string(),
    }
}

/// The condition `kind` of `status.conditions`: `(status, "reason: message")`.
pub fn condition(object: &Value, kind: &str) -> Option<(String, String)> {
    let found = object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)?;
    Some((
        found["status"].as_str().unwrap_or("Unknown").to_string(),
        reason_of(found),
    ))
}

fn reason_of(condition: &Value) -> String {
    let reason = condition["reason"].as_str().unwrap_or_default();
    let message = condition["message"].as_str().unwrap_or_default();
    match (reason.is_empty(), message.is_empty()) {
        (false, false) => format!("{reason}: {message}"),
        (false, true) => reason.to_string(),
        (true, false) => message.to_string(),
        (true, true) => "no reason given".to_string(),
    }
}

/// Condition `kind` is `True`, else why not.
fn holds(object: &Value, kind: &str) -> Result<(), String> {
    match condition(object, kind) {
        Some((status, _)) if status == "True" => Ok(()),
        Some((status, why)) => Err(format!("{kind}={status} ({why})")),
        None => Err(format!("no {kind} condition yet")),
    }
}

/// `a, b, c and 4 more`: a failure line stays readable when many objects fail.
fn listed(items: &[String]) -> String {
    const SHOWN: usize = 5;
    if items.len() <= SHOWN {
        items.join("; ")
    } else {
        format!(
            "{}; and {} more",
            items[..SHOWN].join("; "),
            items.len() - SHOWN
        )
    }
}

/// `nodes.ready`: every Node's condition `Ready` is `True`.
pub fn nodes_ready(nodes: &[Value]) -> Check {
    const NAME: &str = "nodes.ready";
    if nodes.is_empty() {
        return Check::fail(
            NAME,
            "no Node is registered with the API server",
            "check the kubelets: talosctl -n <node> service kubelet, talosctl -n <node> logs kubelet",
        );
    }
    let not_ready: Vec<String> = nodes
        .iter()
        .filter_map(|n| {
            holds(n, "Ready")
                .err()
                .map(|why| format!("node {} is not Ready: {why}", object_name(n)))
        })
        .collect();
    if not_ready.is_empty() {
        Check::pass(NAME, format!("{0}/{0} nodes Ready", nodes.len()))
    } else {
        Check::fail(
            NAME,
            listed(&not_ready),
            "kubectl describe node <name>; on Talos: talosctl -n <node> service kubelet and talosctl -n <node> logs kubelet",
        )
    }
}

/// `pods.crashloop`: no container of the pods in `namespaces` waits in CrashLoopBackOff, or
/// restarted `max_restarts` times or more with its last exit within `recent` (a pod that
/// restarted a lot weeks ago and is fine now does not fail the check).
pub fn pods_crashloop(
    pods: &[Value],
    namespaces: &[String],
    max_restarts: u64,
    recent: ChronoDuration,
    now: DateTime<Utc>,
) -> Check {
    const NAME: &str = "pods.crashloop";
    let mut looping = Vec::new();
    let mut first_fix = None;
    for pod in pods {
        let statuses = ["initContainerStatuses", "containerStatuses"]
            .iter()
            .filter_map(|k| pod["status"][k].as_array())
            .flatten();
        for status in statuses {
            let container = status["name"].as_str().unwrap_or("?");
            let restarts = status["restartCount"].as_u64().unwrap_or(0);
            let waiting = status["state"]["waiting"]["reason"].as_str();
            let last_exit = status["lastState"]["terminated"]["finishedAt"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc));
            let restarting = restarts >= max_restarts
                && last_exit.is_none_or(|at| now.signed_duration_since(at) < recent);
            let why = if waiting == Some("CrashLoopBackOff") {
                format!("in CrashLoopBackOff ({restarts} restarts)")
            } else if restarting {
                format!("restarting in a loop ({restarts} restarts)")
            } else {
                continue;
            };
            let name = object_name(pod);
            looping.push(format!("pod {name} container {container} {why}"));
            if first_fix.is_none() {
                let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
                let pod_name = pod["metadata"]["name"].as_str().unwrap_or("?");
                first_fix = Some(format!(
                    "read why it exits: kubectl -n {ns} logs {pod_name} -c {container} --previous; kubectl -n {ns} describe pod {pod_name}"
                ));
            }
        }
    }
    match first_fix {
        None => Check::pass(
            NAME,
            format!(
                "{} pods in {} without a crash loop",
                pods.len(),
                namespaces.join(", ")
            ),
        ),
        Some(fix) => Check::fail(NAME, listed(&looping), fix),
    }
}

/// `argocd.apps`: every Application `Synced` and `Healthy`.
pub fn argocd_apps(apps: &[Value]) -> Check {
    const NAME: &str = "argocd.apps";
    let bad: Vec<String> = apps
        .iter()
        .filter_map(|app| {
            let sync = app["status"]["sync"]["status"]
                .as_str()
                .unwrap_or("Unknown");
            let health = app["status"]["health"]["status"]
                .as_str()
                .unwrap_or("Unknown");
            (sync != "Synced" || health != "Healthy")
                .then(|| format!("Application {} is {sync}/{health}", object_name(app)))
        })
        .collect();
    if bad.is_empty() {
        Check::pass(
            NAME,
            format!("{0}/{0} Applications Synced and Healthy", apps.len()),
        )
    } else {
        Check::fail(
            NAME,
            listed(&bad),
            "argocd app get <name> shows the resources out of sync or unhealthy; fix them in Git or sync the app",
        )
    }
}

/// Namespaces exempt from the Pod Security check whatever the config says: `kube-system`
/// runs the control plane's static pods and node agents that need host access, which
/// `restricted` refuses; `kube-public` and `kube-node-lease` are made by Kubernetes itself
/// and hold no pods (a ConfigMap, node leases).
pub const SYSTEM_NAMESPACES: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];

const ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";

/// `pod_security`: every namespace enforces Pod Security `restricted`, except the system
/// namespaces and `exceptions`.
pub fn pod_security(namespaces: &[Value], exceptions: &[String]) -> Check {
    const NAME: &str = "pod_security";
    let mut checked = 0;
    let mut lax = Vec::new();
    for ns in namespaces {
        let name = object_name(ns);
        if SYSTEM_NAMESPACES.contains(&name.as_str()) || exceptions.contains(&name) {
            continue;
        }
        checked += 1;
        match ns["metadata"]["labels"][ENFORCE_LABEL].as_str() {
            Some("restricted") => {}
            Some(level) => lax.push(format!("namespace {name} enforces {level}")),
            None => lax.push(format!("namespace {name} enforces nothing")),
        }
    }
    if lax.is_empty() {
        Check::pass(
            NAME,
            format!(
                "{checked} namespaces enforce restricted (exempt: system namespaces and pod_security_exceptions)"
            ),
        )
    } else {
        Check::fail(
            NAME,
            format!("{} (want {ENFORCE_LABEL}=restricted)", listed(&lax)),
            format!(
                "label it: kubectl label namespace <name> {ENFORCE_LABEL}=restricted --overwrite (in Git), or list it in [acceptance] pod_security_exceptions if its workloads need more"
            ),
        )
    }
}

/// `velero.location`: every BackupStorageLocation `Available`.
pub fn velero_locations(locations: &[Value], velero_namespace: &str) -> Check {
    const NAME: &str = "velero.location";
    if locations.is_empty() {
        return Check::fail(
            NAME,
            format!("no Velero BackupStorageLocation in namespace {velero_namespace}"),
            "install Velero with a backupStorageLocation (its Helm values' configuration.backupStorageLocation)",
        );
    }
    let unavailable: Vec<String> = locations
        .iter()
        .filter_map(|l| {
            let phase = l["status"]["phase"].as_str().unwrap_or("Unknown");
            (phase != "Available").then(|| {
                let message = l["status"]["message"].as_str().unwrap_or_default();
                let mut line = format!("BackupStorageLocation {} is {phase}", object_name(l));
                if !message.is_empty() {
                    line.push_str(&format!(": {message}"));
                }
                line
            })
        })
        .collect();
    if unavailable.is_empty() {
        Check::pass(
            NAME,
            format!(
                "{0}/{0} backup storage locations Available",
                locations.len()
            ),
        )
    } else {
        Check::fail(
            NAME,
            listed(&unavailable),
            "check the bucket, the endpoint and the credentials Secret the location names (velero backup-location get)",
        )
    }
}

/// `external_secrets`: every ExternalSecret `Ready=True` (synced), every SecretStore and
/// ClusterSecretStore `Ready=True`.
pub fn external_secrets(secrets: &[Value], stores: &[Value], cluster_stores: &[Value]) -> Check {
    const NAME: &str = "external_secrets";
    let mut bad = Vec::new();
    for store in stores {
        if let Err(why) = holds(store, "Ready") {
            bad.push(format!(
                "SecretStore {} not Ready: {why}",
                object_name(store)
            ));
        }
    }
    for store in cluster_stores {
        if let Err(why) = holds(store, "Ready") {
            bad.push(format!(
                "ClusterSecretStore {} not Ready: {why}",
                object_name(store)
            ));
        }
    }
    for secret in secrets {
        if let Err(why) = holds(secret, "Ready") {
            bad.push(format!(
                "ExternalSecret {} not synced: {why}",
                object_name(secret)
            ));
        }
    }
    if bad.is_empty() {
        Check::pass(
            NAME,
            format!(
                "{} ExternalSecrets synced, {} stores Ready",
                secrets.len(),
                stores.len() + cluster_stores.len()
            ),
        )
    } else {
        Check::fail(
            NAME,
            listed(&bad),
            "kubectl describe the object named; a store that is not Ready usually has a wrong or expired provider token (1Password Connect), an ExternalSecret a key that is not in the vault",
        )
    }
}

/// `gateway.classes`: each GatewayClass `Accepted` by its controller.
pub fn gateway_classes(classes: &[Value]) -> Check {
    const NAME: &str = "gateway.classes";
    if classes.is_empty() {
        return Check::skip(NAME, "no GatewayClass exists");
    }
    let bad: Vec<String> = classes
        .iter()
        .filter_map(|c| {
            holds(c, "Accepted").err().map(|why| {
                let controller = c["spec"]["controllerName"].as_str().unwrap_or("?");
                format!(
                    "GatewayClass {} (controller {controller}) not Accepted: {why}",
                    object_name(c)
                )
            })
        })
        .collect();
    if bad.is_empty() {
        Check::pass(
            NAME,
            format!("{0}/{0} GatewayClasses Accepted", classes.len()),
        )
    } else {
        Check::fail(
            NAME,
            listed(&bad),
            "the controller named in spec.controllerName must run and accept the class (Cilium: gatewayAPI.enabled=true and the Gateway API CRDs installed before Cilium started)",
        )
    }
}

/// Whether `route` (an HTTPRoute) is Accepted by every Gateway it names in `spec.parentRefs`,
/// as `status.parents[].conditions` say; `Err(why)` names the Gateway that did not.
pub fn route_accepted(route: &Value) -> Result<(), String> {
    let route_ns = route["metadata"]["namespace"].as_str().unwrap_or("default");
    let refs = route["spec"]["parentRefs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if refs.is_empty() {
        return Err("it names no parent Gateway (spec.parentRefs)".into());
    }
    let parents = route["status"]["parents"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for parent in &refs {
        let name = parent["name"].as_str().unwrap_or("?");
        let ns = parent["namespace"].as_str().unwrap_or(route_ns);
        let status = parents.iter().find(|p| {
            p["parentRef"]["name"] == name
                && p["parentRef"]["namespace"].as_str().unwrap_or(route_ns) == ns
                && p["parentRef"]["sectionName"] == parent["sectionName"]
        });
        let Some(status) = status else {
            return Err(format!(
                "Gateway {ns}/{name} has not reported on it (no status.parents entry: is the Gateway's controller running?)"
            ));
        };
        // A parent's conditions sit in the entry itself, not under `status`.
        let status = &serde_json::json!({"status": {"conditions": status["conditions"].clone()}});
        if let Err(why) = holds(status, "Accepted") {
            return Err(format!("not Accepted by Gateway {ns}/{name}: {why}"));
        }
        if let Some((status_value, why)) = condition(status, "ResolvedRefs")
            && status_value != "True"
        {
            return Err(format!(
                "Gateway {ns}/{name}: ResolvedRefs={status_value} ({why})"
            ));
        }
    }
    Ok(())
}

/// The Secrets (`namespace/name`) that serve a route through the listeners of `gateway` it
/// attaches to: the listeners its `sectionName` names, else every HTTPS listener.
pub fn serving_secrets(gateway: &Value, section: Option<&str>) -> Vec<String> {
    let gateway_ns = gateway["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default");
    gateway["spec"]["listeners"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| match section {
            Some(name) => l["name"] == name,
            None => l["protocol"] == "HTTPS",
        })
        .flat_map(|l| {
            l["tls"]["certificateRefs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|r| r["kind"].as_str().unwrap_or("Secret") == "Secret")
        .filter_map(|r| {
            let name = r["name"].as_str()?;
            let ns = r["namespace"].as_str().unwrap_or(gateway_ns);
            Some(format!("{ns}/{name}"))
        })
        .collect()
}

/// The cert-manager Certificate that writes Secret `ns/name`, judged: Ready, and valid for at
/// least `min_days` more.
pub fn certificate_verdict(
    certificates: &[Value],
    secret: &str,
    min_days: u32,
    now: DateTime<Utc>,
) -> Result<String, String> {
    let (ns, name) = secret.split_once('/').unwrap_or(("default", secret));
    let Some(cert) = certificates.iter().find(|c| {
        c["metadata"]["namespace"] == ns && c["spec"]["secretName"].as_str() == Some(name)
    }) else {
        return Err(format!(
            "no cert-manager Certificate writes Secret {secret}"
        ));
    };
    let cert_name = object_name(cert);
    holds(cert, "Ready").map_err(|why| format!("certificate {cert_name} not Ready: {why}"))?;
    let not_after = cert["status"]["notAfter"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| format!("certificate {cert_name} has no status.notAfter"))?;
    let left = not_after.signed_duration_since(now);
    let days = left.num_days();
    if left < ChronoDuration::days(i64::from(min_days)) {
        let when = if left <= ChronoDuration::zero() {
            "has expired".to_string()
        } else {
            format!("expires in {days} days")
        };
        return Err(format!(
            "certificate {cert_name} {when} (at least {min_days} wanted)"
        ));
    }
    Ok(format!("certificate {cert_name} valid for {days} days"))
}

/// `cert_manager.cloudflare`: the (Cluster)Issuers solving DNS01 through Cloudflare
/// authenticate with an API token, not the global API key.
pub fn cloudflare_issuers(issuers: &[Value]) -> Check {
    const NAME: &str = "cert_manager.cloudflare";
    let mut using = 0;
    let mut keyed = Vec::new();
    for issuer in issuers {
        let solvers = issuer["spec"]["acme"]["solvers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for solver in solvers {
            let cloudflare = &solver["dns01"]["cloudflare"];
            if cloudflare.is_null() {
                continue;
            }
            using += 1;
            let kind = issuer["kind"].as_str().unwrap_or("Issuer");
            if !cloudflare["apiKeySecretRef"].is_null() {
                keyed.push(format!(
                    "{kind} {} uses the Cloudflare global API key (apiKeySecretRef)",
                    object_name(issuer)
                ));
            } else if cloudflare["apiTokenSecretRef"].is_null() {
                keyed.push(format!(
                    "{kind} {} names no apiTokenSecretRef for Cloudflare",
                    object_name(issuer)
                ));
            }
        }
    }
    if using == 0 {
        return Check::skip(NAME, "no issuer uses the Cloudflare DNS01 solver");
    }
    if keyed.is_empty() {
        Check::pass(
            NAME,
            format!("{using} Cloudflare DNS01 solvers use an API token"),
        )
    } else {
        Check::fail(
            NAME,
            listed(&keyed),
            "create a Cloudflare API token limited to Zone:DNS:Edit on the zone, store it in a Secret and use apiTokenSecretRef instead of apiKeySecretRef (and drop the email)",
        )
    }
}

/// Whether `ip` lies in `cidr` (`10.0.0.240/28`, `fd00::/64`).
pub fn in_cidr(ip: &str, cidr: &str) -> Result<bool, String> {
    use std::net::IpAddr;
    let (base, bits) = cidr
        .split_once('/')
        .ok_or_else(|| format!("lb_pool \"{cidr}\" is not a CIDR (address/prefix)"))?;
    let base: IpAddr = base
        .parse()
        .map_err(|_| format!("lb_pool \"{cidr}\" has no valid address"))?;
    let bits: u32 = bits
        .parse()
        .map_err(|_| format!("lb_pool \"{cidr}\" has no valid prefix length"))?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("\"{ip}\" is not an IP address"))?;
    let (ip, base, width) = match (ip, base) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u128::from(u32::from(a)), u128::from(u32::from(b)), 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return Ok(false),
    };
    if bits > width {
        return Err(format!(
            "lb_pool \"{cidr}\" has a prefix longer than {width}"
        ));
    }
    let shift = width - bits;
    Ok(bits == 0 || (ip >> shift) == (base >> shift))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn nodes_not_ready_are_named_with_the_kubelets_reason() {
        let ready = json!({"metadata": {"name": "cp1"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        let down = json!({"metadata": {"name": "w2"}, "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady", "message": "PLEG is not healthy"}]}});
        assert!(nodes_ready(std::slice::from_ref(&ready)).ok);
        let check = nodes_ready(&[ready, down]);
        assert!(check.failed());
        assert_eq!(
            check.message,
            "node w2 is not Ready: Ready=False (KubeletNotReady: PLEG is not healthy)"
        );
        assert!(nodes_ready(&[]).failed());
    }

    #[test]
    fn crash_loops_and_recent_restart_storms_fail_old_restarts_do_not() {
        let pod = |name: &str, status: Value| json!({"metadata": {"name": name, "namespace": "cilium"}, "status": {"containerStatuses": [status]}});
        let looping = pod(
            "cilium-x",
            json!({"name": "agent", "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}),
        );
        let storm = pod(
            "operator-y",
            json!({"name": "op", "restartCount": 12, "state": {"running": {}},
                   "lastState": {"terminated": {"finishedAt": "2026-12-01T09:50:00Z"}}}),
        );
        let old = pod(
            "hubble-z",
            json!({"name": "relay", "restartCount": 40, "state": {"running": {}},
                   "lastState": {"terminated": {"finishedAt": "2026-10-01T09:50:00Z"}}}),
        );
        let ns = vec!["cilium".to_string()];
        let hour = ChronoDuration::hours(1);
        assert!(pods_crashloop(std::slice::from_ref(&old), &ns, 5, hour, now()).ok);
        let check = pods_crashloop(&[looping, storm, old], &ns, 5, hour, now());
        assert!(check.failed());
        assert!(
            check
                .message
                .contains("pod cilium/cilium-x container agent in CrashLoopBackOff (3 restarts)"),
            "{}",
            check.message
        );
        assert!(
            check
                .message
                .contains("pod cilium/operator-y container op restarting in a loop (12 restarts)")
        );
        assert!(!check.message.contains("hubble"));
        assert!(
            check
                .fix
                .contains("kubectl -n cilium logs cilium-x -c agent --previous")
        );
    }

    #[test]
    fn applications_out_of_sync_or_unhealthy_are_named() {
        let app = |name: &str, sync: &str, health: &str| json!({"metadata": {"name": name, "namespace": "argocd"}, "status": {"sync": {"status": sync}, "health": {"status": health}}});
        assert!(argocd_apps(&[app("root", "Synced", "Healthy")]).ok);
        let check = argocd_apps(&[
            app("root", "Synced", "Healthy"),
            app("home", "OutOfSync", "Degraded"),
        ]);
        assert_eq!(
            check.message,
            "Application argocd/home is OutOfSync/Degraded"
        );
    }

    #[test]
    fn pod_security_exempts_system_namespaces_and_exceptions_only() {
        let ns = |name: &str, level: Option<&str>| match level {
            Some(l) => json!({"metadata": {"name": name, "labels": {ENFORCE_LABEL: l}}}),
            None => json!({"metadata": {"name": name, "labels": {}}}),
        };
        let all = [
            ns("kube-system", None),
            ns("longhorn-system", Some("privileged")),
            ns("apps", Some("restricted")),
        ];
        assert!(pod_security(&all, &["longhorn-system".into()]).ok);
        let check = pod_security(&[ns("media", Some("baseline")), ns("tmp", None)], &[]);
        assert!(check.message.contains("namespace media enforces baseline"));
        assert!(check.message.contains("namespace tmp enforces nothing"));
    }

    #[test]
    fn routes_need_an_accepting_parent() {
        let route = |parents: Value| {
            json!({"metadata": {"name": "home", "namespace": "apps"},
                   "spec": {"parentRefs": [{"name": "gw", "namespace": "gateway"}]},
                   "status": {"parents": parents}})
        };
        let accepted = route(
            json!([{"parentRef": {"name": "gw", "namespace": "gateway"}, "controllerName": "io.cilium/gateway-controller",
            "conditions": [{"type": "Accepted", "status": "True"}, {"type": "ResolvedRefs", "status": "True"}]}]),
        );
        assert_eq!(route_accepted(&accepted), Ok(()));
        let refused = route(json!([{"parentRef": {"name": "gw", "namespace": "gateway"},
            "conditions": [{"type": "Accepted", "status": "False", "reason": "NotAllowedByListeners", "message": "no listener allows the route's namespace"}]}]));
        assert_eq!(
            route_accepted(&refused).expect_err("refused"),
            "not Accepted by Gateway gateway/gw: Accepted=False (NotAllowedByListeners: no listener allows the route's namespace)"
        );
        assert!(
            route_accepted(&route(json!([])))
                .expect_err("silent")
                .contains("has not reported")
        );
    }

    #[test]
    fn certificates_are_found_by_secret_and_judged_by_expiry() {
        let cert = |not_after: &str| {
            json!({"metadata": {"name": "wildcard", "namespace": "gateway"}, "spec": {"secretName": "wildcard-tls"},
                   "status": {"notAfter": not_after, "conditions": [{"type": "Ready", "status": "True"}]}})
        };
        let good = [cert("2027-02-01T00:00:00Z")];
        assert!(certificate_verdict(&good, "gateway/wildcard-tls", 14, now()).is_ok());
        let soon = [cert("2026-12-04T12:00:00Z")];
        assert_eq!(
            certificate_verdict(&soon, "gateway/wildcard-tls", 14, now()).expect_err("soon"),
            "certificate gateway/wildcard expires in 3 days (at least 14 wanted)"
        );
        assert!(
            certificate_verdict(&good, "gateway/other", 14, now())
                .expect_err("none")
                .contains("no cert-manager Certificate writes Secret gateway/other")
        );
    }

    #[test]
    fn cloudflare_global_keys_fail_tokens_pass() {
        let issuer = |cloudflare: Value| {
            json!({"kind": "ClusterIssuer", "metadata": {"name": "letsencrypt"},
                   "spec": {"acme": {"solvers": [{"dns01": {"cloudflare": cloudflare}}]}}})
        };
        assert!(
            cloudflare_issuers(&[issuer(
                json!({"apiTokenSecretRef": {"name": "cf", "key": "token"}})
            )])
            .ok
        );
        let check = cloudflare_issuers(&[issuer(
            json!({"email": "a@b", "apiKeySecretRef": {"name": "cf", "key": "key"}}),
        )]);
        assert_eq!(
            check.message,
            "ClusterIssuer letsencrypt uses the Cloudflare global API key (apiKeySecretRef)"
        );
        assert!(cloudflare_issuers(&[]).skipped);
    }

    #[test]
    fn addresses_are_checked_against_the_pool() {
        assert_eq!(in_cidr("10.0.0.241", "10.0.0.240/28"), Ok(true));
        assert_eq!(in_cidr("10.0.0.1", "10.0.0.240/28"), Ok(false));
        assert_eq!(in_cidr("fd00::5", "fd00::/64"), Ok(true));
        assert_eq!(in_cidr("10.0.0.1", "fd00::/64"), Ok(false));
        assert!(in_cidr("10.0.0.1", "10.0.0.240").is_err());
        assert!(in_cidr("10.0.0.1", "10.0.0.240/33").is_err());
    }
}
