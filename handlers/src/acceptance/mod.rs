//! `acceptance`: prove the platform works after a change. Each check is named ([`Check`]),
//! reads the Kubernetes API, and says on failure which object is wrong and what to do. Two
//! checks create temporary objects (a LoadBalancer Service, a PVC and maybe a pod), labelled
//! [`ACCEPTANCE_LABEL`] and deleted at their end, also when the check fails, times out or the
//! job is cancelled; what a dead agent left behind is deleted at the start of the next run.
//!
//! The result is the contract's (`checks`, `passed`, `failed`, `skipped`); the job fails when
//! a check fails. With `after`, an acceptance job follows every successful job of those kinds
//! (the runner queues it, see [`follows`]).

mod cluster;
pub mod hostnames;
mod temporary;
pub mod verdicts;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use crate::checks::{Check, Report};
use crate::command::{Args, CommandError, Verb};
use crate::context::Context;
use crate::descriptor::{KindDescriptor, Requirement};
use crate::handler::{Handler, HandlerError, JobContext, LockRequest, Outcome};
use crate::job::JobEnvelope;
use crate::kind::JobKind;
use crate::sections::{HandlerConfigs, Section};
use crate::settings::HumanDuration;

pub use temporary::{ACCEPTANCE_LABEL, temporary_name};

/// `[acceptance]`
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// No pod in CrashLoopBackOff (or restarting in a loop) in these.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// A temporary LoadBalancer Service must get an address inside this CIDR; absent: the
    /// `lb_pool` check is skipped.
    #[serde(default)]
    pub lb_pool: Option<String>,
    /// `namespace/name` of HTTPRoutes: Accepted by their Gateway, their certificate Ready.
    #[serde(default)]
    pub http_routes: Vec<String>,
    /// `host` or `host:port`: each resolves from this host and answers HTTPS with a
    /// certificate valid for it for at least `cert_min_days`.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// A PEM CA trusted for `hostnames` besides the system's roots (a lab CA).
    #[serde(default)]
    pub ca_cert: Option<String>,
    /// A certificate valid for fewer days than this fails.
    #[serde(default = "default_cert_min_days")]
    pub cert_min_days: u32,
    /// Namespaces allowed to enforce less than Pod Security `restricted`.
    #[serde(default)]
    pub pod_security_exceptions: Vec<String>,
    /// Kinds whose successful jobs are followed by an acceptance job (by name, as the
    /// configuration reference's key walk needs plain strings).
    #[serde(default)]
    pub after: Vec<String>,
    /// A container with this many restarts, the last within `restart_window`, is looping.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u64,
    #[serde(default = "default_restart_window")]
    pub restart_window: HumanDuration,
    /// Where the temporary objects are created.
    #[serde(default = "default_test_namespace")]
    pub test_namespace: String,
    /// The temporary Service getting its address.
    #[serde(default = "default_lb_timeout")]
    pub lb_timeout: HumanDuration,
    /// The temporary claim binding.
    #[serde(default = "default_storage_timeout")]
    pub storage_timeout: HumanDuration,
    /// `false` skips the `storage` check (a cluster without a default StorageClass yet).
    #[serde(default = "default_true")]
    pub storage: bool,
    #[serde(default = "default_storage_size")]
    pub storage_size: String,
    /// The pod that consumes the claim when its class binds on first consumer; it only sleeps.
    #[serde(default = "default_pod_image")]
    pub pod_image: String,
    #[serde(default = "default_velero_namespace")]
    pub velero_namespace: String,
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_cert_min_days() -> u32 {
    14
}
fn default_max_restarts() -> u64 {
    5
}
fn default_restart_window() -> HumanDuration {
    HumanDuration::from_secs(3600)
}
fn default_test_namespace() -> String {
    "default".to_string()
}
fn default_lb_timeout() -> HumanDuration {
    HumanDuration::from_secs(120)
}
fn default_storage_timeout() -> HumanDuration {
    HumanDuration::from_secs(300)
}
fn default_true() -> bool {
    true
}
fn default_storage_size() -> String {
    "1Gi".to_string()
}
fn default_pod_image() -> String {
    "registry.k8s.io/pause:3.10".to_string()
}
fn default_velero_namespace() -> String {
    "velero".to_string()
}
fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(1800)
}

impl Config {
    /// What `check-config` refuses, by key: a kind `after` cannot follow, a pool that is no
    /// CIDR, a route that is not `namespace/name`, a hostname that is no DNS name.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        for (i, name) in self.after.iter().enumerate() {
            let key = format!("acceptance.after[{i}]");
            match name.parse::<JobKind>() {
                Ok(KIND) => problems.push((key, "acceptance cannot follow itself".to_string())),
                Ok(_) => {}
                Err(e) => problems.push((key, e)),
            }
        }
        if let Some(pool) = &self.lb_pool
            && let Err(e) = verdicts::in_cidr("0.0.0.0", pool)
        {
            problems.push(("acceptance.lb_pool".to_string(), e));
        }
        for (i, route) in self.http_routes.iter().enumerate() {
            let valid = route.split_once('/').is_some_and(|(ns, name)| {
                !ns.is_empty() && !name.is_empty() && !name.contains('/')
            });
            if !valid {
                problems.push((
                    format!("acceptance.http_routes[{i}]"),
                    format!("{route:?} is not namespace/name"),
                ));
            }
        }
        for (i, entry) in self.hostnames.iter().enumerate() {
            if let Err(e) = hostnames::Hostname::parse(entry) {
                problems.push((format!("acceptance.hostnames[{i}]"), e));
            }
        }
        problems
    }
}

pub const SECTION: Section<Config> = Section::new("acceptance");

pub const KIND: JobKind = JobKind::ACCEPTANCE;

pub static DESCRIPTOR: KindDescriptor = KindDescriptor {
    kind: KIND,
    verbs: &[Verb {
        name: "acceptance",
        aliases: &[],
        usage: "acceptance",
        summary: "platform acceptance checks: nodes, pods, Argo CD, certificates, a LoadBalancer address, a PVC",
        kind: Some(KIND),
        params: Some(params),
    }],
    config: SECTION.descriptor(),
    requires: &[Requirement {
        section: "kubernetes",
        why: "every acceptance check reads the Kubernetes API",
    }],
    option_requires: crate::descriptor::no_option_requires,
    build,
};

/// `acceptance`: no arguments.
fn params(_: &mut Args) -> Result<serde_json::Map<String, serde_json::Value>, CommandError> {
    Ok(serde_json::Map::new())
}

/// Whether a successful job of `kind` is followed by an acceptance job (`[acceptance] after`).
pub fn follows(configs: &HandlerConfigs, kind: JobKind) -> bool {
    SECTION
        .get(configs)
        .is_some_and(|c| c.after.iter().any(|k| k == kind.as_str()))
}

pub struct AcceptanceHandler {
    pub config: Config,
    pub context: Context,
    /// `[restore_drill] namespaces`: the targets whose newest drill must have passed.
    pub drill_targets: Vec<String>,
}

#[async_trait]
impl Handler for AcceptanceHandler {
    fn kind(&self) -> JobKind {
        KIND
    }

    /// One run at a time (the temporary objects have per-job names, but two runs would only
    /// measure each other); it reads the cluster, as a drill does.
    fn locks(&self, _job: &JobEnvelope) -> Vec<LockRequest> {
        vec![
            LockRequest::write("acceptance".to_string()),
            LockRequest::read(format!("cluster:{}", self.context.cluster)),
        ]
    }

    fn timeout(&self) -> Duration {
        self.config.timeout.get()
    }

    /// Time to delete the temporary objects after `cancel`.
    fn cancel_grace(&self) -> Duration {
        Duration::from_secs(60)
    }

    async fn run(&self, ctx: &JobContext, _job: &JobEnvelope) -> Result<Outcome, HandlerError> {
        let client = self.context.kube.clone().ok_or_else(|| {
            HandlerError::Failed("acceptance needs a [kubernetes] section".into())
        })?;
        let mut report = Report::default();
        let temp = temporary::Temporary::new(client.clone(), &self.config, ctx);
        match temp.remove_leftovers().await {
            Ok(0) => {}
            Ok(n) => {
                ctx.progress
                    .report(&format!(
                        "deleted {n} objects an earlier acceptance run left behind"
                    ))
                    .await
            }
            Err(e) => tracing::warn!(error = %e, "Leftover acceptance objects not deleted"),
        }
        let reader = cluster::Reader {
            client: client.clone(),
            config: &self.config,
            ctx,
            drill_targets: &self.drill_targets,
        };
        for check in reader.all().await {
            if ctx.stop_requested.is_cancelled() {
                return Err(HandlerError::Cancelled);
            }
            ctx.progress.report(&check.line()).await;
            report.push(check);
        }
        // Each cleans up after itself; a cancel ends the job once its objects are gone.
        let check = temp.lb_pool().await;
        if ctx.stop_requested.is_cancelled() {
            return Err(HandlerError::Cancelled);
        }
        ctx.progress.report(&check.line()).await;
        report.push(check);
        let check = temp.storage().await;
        if ctx.stop_requested.is_cancelled() {
            return Err(HandlerError::Cancelled);
        }
        ctx.progress.report(&check.line()).await;
        report.push(check);
        if self.config.hostnames.is_empty() {
            report.push(Check::skip("hostnames", "no [acceptance] hostnames"));
        }
        for entry in &self.config.hostnames {
            let check = hostnames::check(&self.config, entry, HOSTNAME_TIMEOUT).await;
            if ctx.stop_requested.is_cancelled() {
                return Err(HandlerError::Cancelled);
            }
            ctx.progress.report(&check.line()).await;
            report.push(check);
        }
        Ok(report.outcome("acceptance"))
    }
}

/// Resolving one hostname, and its HTTPS GET.
const HOSTNAME_TIMEOUT: Duration = Duration::from_secs(15);

/// Builds the handler from its section; `[restore_drill]` names the drill targets.
pub fn build(configs: &HandlerConfigs, context: &Context) -> Option<Arc<dyn Handler>> {
    Some(Arc::new(AcceptanceHandler {
        config: SECTION.get(configs)?.clone(),
        context: context.clone(),
        drill_targets: crate::restore_drill::SECTION
            .get(configs)
            .map(|c| c.namespaces.clone())
            .unwrap_or_default(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_names_kinds_and_only_they_are_followed() {
        let config: Config =
            serde_json::from_str(r#"{"after": ["apply", "upgrade"], "lb_pool": "10.0.0.240/28"}"#)
                .expect("config");
        assert_eq!(config.cert_min_days, 14);
        assert_eq!(config.test_namespace, "default");
        let mut configs = HandlerConfigs::default();
        SECTION.set(&mut configs, config);
        assert!(follows(&configs, JobKind::APPLY));
        assert!(follows(&configs, JobKind::UPGRADE));
        assert!(!follows(&configs, JobKind::BACKUP));
        assert!(!follows(&HandlerConfigs::default(), JobKind::APPLY));
    }

    #[test]
    fn problems_name_the_key_and_what_is_wrong() {
        let config: Config = serde_json::from_str(
            r#"{"after": ["apply", "aply", "acceptance"], "lb_pool": "10.0.0.240",
                "http_routes": ["apps/home", "home"], "hostnames": ["home.lab:443", "https://home.lab"]}"#,
        )
        .expect("config");
        let problems = config.problems();
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "acceptance.after[1]",
                "acceptance.after[2]",
                "acceptance.lb_pool",
                "acceptance.http_routes[1]",
                "acceptance.hostnames[1]"
            ],
            "{problems:?}"
        );
        assert!(
            problems[0].1.contains("unknown job kind \"aply\""),
            "{problems:?}"
        );
        assert!(problems[2].1.contains("not a CIDR"), "{problems:?}");
    }
}
