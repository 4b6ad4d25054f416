//! `restore-drill`: restore the newest backups somewhere harmless and prove they hold data.

use serde::Deserialize;

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
