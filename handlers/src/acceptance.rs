//! `acceptance`: end-to-end checks of the platform after a change.

use serde::Deserialize;

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
