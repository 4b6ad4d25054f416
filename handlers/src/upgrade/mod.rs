//! `upgrade`: a rolling Talos upgrade, one node at a time, with drain and health gates.
//!
//! Not available yet: the version policy ([`policy`]) and the rollout order ([`plan`]) are
//! built; the gates, the per-node drain and upgrade, halt and resume are not.

pub mod plan;
pub mod policy;

use serde::Deserialize;

use crate::command::{self, Args, CommandError, Verb};
use crate::descriptor::KindDescriptor;
use crate::kind::JobKind;
use crate::sections::Section;
use crate::settings::HumanDuration;

/// `[upgrade]`
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(14400)
}

pub const SECTION: Section<Config> = Section::new("upgrade");

pub const KIND: JobKind = JobKind::UPGRADE;

/// Not implemented yet: a job fails with "not available yet" (see [`crate::unavailable`]).
pub static DESCRIPTOR: KindDescriptor = KindDescriptor {
    kind: KIND,
    verbs: &[Verb {
        name: "upgrade",
        aliases: &[],
        usage: "upgrade talos <version> [nodes=a,b]",
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
    Ok(params)
}
