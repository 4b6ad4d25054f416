//! `upgrade`: a rolling Talos upgrade, one node at a time, with drain and health gates.
//!
//! Not available yet: the version policy ([`policy`]), the rollout order ([`plan`]) and the
//! Talos API calls ([`talos`]) are built; the gates, the per-node drain, halt and resume are not.

pub mod kube;
pub mod plan;
pub mod policy;
pub mod talos;
pub mod window;

use serde::Deserialize;

use crate::command::{self, Args, CommandError, Verb};
use crate::descriptor::KindDescriptor;
use crate::kind::JobKind;
use crate::sections::Section;
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

/// Not implemented yet: a job fails with "not available yet" (see [`crate::unavailable`]).
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
    requires: &[],
    option_requires: crate::descriptor::no_option_requires,
    build: crate::unavailable::not_yet,
};

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
