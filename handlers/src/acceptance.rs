//! `acceptance`: end-to-end checks of the platform after a change.

use serde::Deserialize;

use crate::command::{Args, CommandError, Verb};
use crate::descriptor::KindDescriptor;
use crate::kind::JobKind;
use crate::sections::Section;
use crate::settings::HumanDuration;

/// `[acceptance]`
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(1800)
}

pub const SECTION: Section<Config> = Section::new("acceptance");

pub const KIND: JobKind = JobKind::ACCEPTANCE;

/// Not implemented yet: a job fails with "not available yet" (see [`crate::unavailable`]).
pub static DESCRIPTOR: KindDescriptor = KindDescriptor {
    kind: KIND,
    verbs: &[Verb {
        name: "acceptance",
        aliases: &[],
        usage: "acceptance",
        summary: "platform acceptance checks",
        kind: Some(KIND),
        params: Some(params),
    }],
    config: SECTION.descriptor(),
    requires: &[],
    option_requires: crate::descriptor::no_option_requires,
    build: crate::unavailable::not_yet,
};

/// `acceptance`: no arguments.
fn params(_: &mut Args) -> Result<serde_json::Map<String, serde_json::Value>, CommandError> {
    Ok(serde_json::Map::new())
}
