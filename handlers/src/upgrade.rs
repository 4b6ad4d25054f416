//! `upgrade`: a rolling Talos upgrade, one node at a time, with drain and health gates.

use serde::Deserialize;

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
