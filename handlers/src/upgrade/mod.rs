//! `upgrade`: a rolling Talos upgrade, one node at a time, with drain and health gates.
//!
//! The version policy ([`policy`]) and the order ([`plan`]) are pure; [`kube`] cordons, drains
//! and watches Nodes, [`talos`] upgrades a node through the API its running version offers,
//! [`window`] says when a rollout may start, and [`rollout`] is the job: gates, node after
//! node, halt and resume (see `docs/upgrades.md`).

pub mod kube;
pub mod plan;
pub mod policy;
pub mod rollout;
pub mod talos;
pub mod window;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use crate::command::{self, Args, CommandError, Verb};
use crate::context::Context;
use crate::descriptor::{KindDescriptor, Requirement};
use crate::handler::{Deferral, Handler, HandlerError, JobContext, LockRequest, Outcome};
use crate::job::JobEnvelope;
use crate::kind::JobKind;
use crate::sections::{HandlerConfigs, Section};
use crate::settings::HumanDuration;

/// `[upgrade]`
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// The installer image repository; the image is `<installer>/<schematic>:<version>`.
    #[serde(default = "default_installer")]
    pub installer: String,
    /// The Image Factory schematic id (extensions, kernel arguments); needed to run an
    /// upgrade, not to read the section.
    #[serde(default)]
    pub schematic: String,
    /// Workers upgraded at once, after the canary worker.
    #[serde(default = "default_max_parallel")]
    pub max_parallel: usize,
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: HumanDuration,
    /// A node back, Ready, on the new version.
    #[serde(default = "default_node_timeout")]
    pub node_timeout: HumanDuration,
    /// The newest good etcd snapshot must be younger; else the job takes and verifies one.
    #[serde(default = "default_snapshot_max_age")]
    pub snapshot_max_age: HumanDuration,
    /// After the canary worker, before the rest.
    #[serde(default = "default_soak")]
    pub soak: HumanDuration,
    /// When upgrades may run; absent: any time.
    #[serde(default)]
    pub window: Option<window::Window>,
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_installer() -> String {
    "factory.talos.dev/installer".to_string()
}
fn default_max_parallel() -> usize {
    1
}
fn default_drain_timeout() -> HumanDuration {
    HumanDuration::from_secs(600)
}
fn default_node_timeout() -> HumanDuration {
    HumanDuration::from_secs(900)
}
fn default_snapshot_max_age() -> HumanDuration {
    HumanDuration::from_secs(3600)
}
fn default_soak() -> HumanDuration {
    HumanDuration::from_secs(600)
}
fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(14400)
}

impl Config {
    /// The installer image of `version`.
    pub fn image(&self, version: &str) -> String {
        format!(
            "{}/{}:{version}",
            self.installer.trim_end_matches('/'),
            self.schematic
        )
    }
}

pub const SECTION: Section<Config> = Section::new("upgrade");

pub const KIND: JobKind = JobKind::UPGRADE;

pub static DESCRIPTOR: KindDescriptor = KindDescriptor {
    kind: KIND,
    verbs: &[Verb {
        name: "upgrade",
        aliases: &[],
        usage: "upgrade talos <version> [nodes=a,b] [force=true reason=<word>]",
        summary: "rolling Talos upgrade with drain and health gates",
        kind: Some(KIND),
        params: Some(params),
    }],
    config: SECTION.descriptor(),
    requires: &[
        Requirement {
            section: "kubernetes",
            why: "nodes are listed, cordoned and drained through the Kubernetes API",
        },
        Requirement {
            section: "talos",
            why: "nodes are upgraded through the Talos API",
        },
        Requirement {
            section: "etcd_snapshot",
            why: "no upgrade starts without a fresh verified etcd snapshot",
        },
    ],
    option_requires: crate::descriptor::no_option_requires,
    build,
};

pub struct UpgradeHandler {
    pub config: Config,
    pub context: Context,
    /// Where the snapshots the gate looks for are.
    pub snapshots: Option<crate::etcd_snapshot::Config>,
    /// The Argo CD root app (namespace, name), shared with `[reconcile]`.
    pub argocd: Option<(String, String)>,
}

fn build(configs: &HandlerConfigs, context: &Context) -> Option<Arc<dyn Handler>> {
    let argocd = crate::reconcile::SECTION.get(configs).and_then(|r| {
        r.argocd_app
            .clone()
            .map(|app| (r.argocd_namespace.clone(), app))
    });
    Some(Arc::new(UpgradeHandler {
        config: SECTION.get(configs)?.clone(),
        context: context.clone(),
        snapshots: crate::etcd_snapshot::SECTION.get(configs).cloned(),
        argocd,
    }))
}

#[async_trait]
impl Handler for UpgradeHandler {
    fn kind(&self) -> JobKind {
        KIND
    }

    /// The cluster alone: snapshots, backups and drills (read locks) wait for the rollout.
    fn locks(&self, _job: &JobEnvelope) -> Vec<LockRequest> {
        vec![LockRequest::write(format!(
            "cluster:{}",
            self.context.cluster
        ))]
    }

    fn timeout(&self) -> Duration {
        self.config.timeout.get()
    }

    /// Outside the window the job waits, holding nothing, unless forced.
    fn not_before(&self, job: &JobEnvelope, now: DateTime<Utc>) -> Option<Deferral> {
        if job.params.get("force").and_then(Value::as_bool) == Some(true) {
            return None;
        }
        let window = self.config.window.as_ref()?;
        match window.state_at(now) {
            Ok(window::WindowState::Closed { opens_at }) => Some(Deferral {
                until: opens_at,
                reason: format!(
                    "outside the upgrade window ({} for {}, {}); force=true reason=<word> overrides it",
                    window.cron, window.duration, window.timezone
                ),
            }),
            Ok(window::WindowState::Open { .. }) => None,
            // check-config names a window that cannot fire; the job does not wait forever.
            Err(e) => {
                tracing::warn!(error = %e, "The upgrade window cannot be read; not waiting for it");
                None
            }
        }
    }

    /// A cancel finishes the node in progress: it is drained, upgraded, back and uncordoned.
    fn cancel_grace(&self) -> Duration {
        self.config.drain_timeout.get() + self.config.node_timeout.get() * 2
    }

    async fn run(&self, ctx: &JobContext, job: &JobEnvelope) -> Result<Outcome, HandlerError> {
        self.rollout(ctx, job).await
    }
}

/// `upgrade talos <version> [nodes=a,b]`.
fn params(args: &mut Args) -> Result<serde_json::Map<String, serde_json::Value>, CommandError> {
    use serde_json::Value;
    let component = args.required_positional("a component (talos)")?;
    if component != "talos" {
        return Err(CommandError::Invalid {
            name: "component".into(),
            value: command::clip(&component),
            reason: "only `talos` can be upgraded".into(),
        });
    }
    let version = command::validate_version(&args.required_positional("a version")?)?;
    let mut params = serde_json::Map::new();
    params.insert("component".into(), Value::from(component));
    params.insert("version".into(), Value::from(version));
    if let Some(nodes) = args.take("nodes") {
        let list = nodes
            .split(',')
            .map(|n| command::validate_node(n).map(Value::from))
            .collect::<Result<Vec<_>, _>>()?;
        params.insert("nodes".into(), Value::Array(list));
    }
    // Outside the window only with a reason, which the record keeps with the requester.
    let force = args.take("force");
    let reason = args.take("reason");
    match (force.as_deref(), reason) {
        (None, None) => {}
        (Some("true"), Some(reason)) => {
            params.insert("force".into(), Value::from(true));
            params.insert(
                "reason".into(),
                Value::from(command::validate_label("reason", &reason)?),
            );
        }
        (Some("true"), None) => {
            return Err(CommandError::Invalid {
                name: "force".into(),
                value: "true".into(),
                reason: "force=true needs reason=<word>: why the window is overridden".into(),
            });
        }
        (Some(other), _) => {
            return Err(CommandError::Invalid {
                name: "force".into(),
                value: command::clip(other),
                reason: "only force=true is meaningful".into(),
            });
        }
        (None, Some(_)) => {
            return Err(CommandError::Invalid {
                name: "reason".into(),
                value: String::new(),
                reason: "reason= goes with force=true".into(),
            });
        }
    }
    Ok(params)
}
