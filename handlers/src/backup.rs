//! `backup`: a Velero backup through the Kubernetes API, checked and watched.

use serde::Deserialize;

use crate::settings::HumanDuration;

/// What a `PartiallyFailed` backup counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartiallyFailed {
    Fail,
    Warn,
}

/// `[backup]`
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default = "default_velero_namespace")]
    pub velero_namespace: String,
    #[serde(default = "default_storage_location")]
    pub storage_location: String,
    #[serde(default = "default_ttl")]
    pub ttl: HumanDuration,
    #[serde(default = "default_partially_failed")]
    pub partially_failed: PartiallyFailed,
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_velero_namespace() -> String {
    "velero".to_string()
}
fn default_storage_location() -> String {
    "default".to_string()
}
fn default_ttl() -> HumanDuration {
    HumanDuration::from_secs(720 * 3600)
}
fn default_partially_failed() -> PartiallyFailed {
    PartiallyFailed::Fail
}
fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(3600)
}
