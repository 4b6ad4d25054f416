//! `restore-drill`: restore the newest backups somewhere harmless and prove they hold data.

use serde::Deserialize;

use crate::command::{self, Args, CommandError, Verb};
use crate::descriptor::KindDescriptor;
use crate::kind::JobKind;
use crate::sections::Section;
use crate::settings::HumanDuration;

/// `[restore_drill]`
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(7200)
}

pub const SECTION: Section<Config> = Section::new("restore_drill");

pub const KIND: JobKind = JobKind::RESTORE_DRILL;

/// Not implemented yet: a job fails with "not available yet" (see [`crate::unavailable`]).
pub static DESCRIPTOR: KindDescriptor = KindDescriptor {
    kind: KIND,
    verbs: &[Verb {
        name: "drill",
        aliases: &[],
        usage: "drill [ns=a,b] [etcd]",
        summary: "restore drill: prove that backups restore",
        kind: Some(KIND),
        params: Some(params),
    }],
    config: SECTION.descriptor(),
    requires: &[],
    option_requires: crate::descriptor::no_option_requires,
    build: crate::unavailable::not_yet,
};

/// `drill [ns=a,b] [etcd]`.
fn params(args: &mut Args) -> Result<serde_json::Map<String, serde_json::Value>, CommandError> {
    let mut params = serde_json::Map::new();
    if let Some(ns) = args.take("ns") {
        params.insert("namespaces".into(), command::names_list("ns", &ns)?);
    }
    let mut etcd = false;
    while let Some(word) = args.optional_positional()? {
        if word == "etcd" {
            etcd = true;
        } else {
            return Err(args.unexpected(&word));
        }
    }
    params.insert("etcd".into(), serde_json::Value::from(etcd));
    Ok(params)
}
