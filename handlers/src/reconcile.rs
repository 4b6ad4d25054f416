//! `reconcile`: a push to the default branch (or `plan`/`reconcile` from ChatOps) runs
//! terraform plan; a plan with changes waits for `apply`; then Argo CD syncs.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::secret::SecretRef;
use crate::settings::HumanDuration;

/// `[reconcile]`; also enables `apply`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// `https://github.com/owner/infra.git`, or `file:///path`.
    pub repo_url: String,
    /// The Terraform directory inside the repository.
    pub workdir: String,
    /// The environment name; the lock is `terraform:<env>`.
    pub env: String,
    #[serde(default = "default_terraform_bin")]
    pub terraform_bin: String,
    #[serde(default)]
    pub auto_apply: bool,
    #[serde(default = "default_plan_ttl")]
    pub plan_ttl: HumanDuration,
    #[serde(default)]
    pub two_person_rule: bool,
    #[serde(default = "default_poll_interval")]
    pub poll_interval: HumanDuration,
    #[serde(default)]
    pub argocd_app: Option<String>,
    #[serde(default = "default_argocd_namespace")]
    pub argocd_namespace: String,
    /// Handed to terraform only; values may be secret references.
    #[serde(default)]
    pub env_vars: BTreeMap<String, SecretRef>,
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_terraform_bin() -> String {
    "terraform".to_string()
}
fn default_plan_ttl() -> HumanDuration {
    HumanDuration::from_secs(24 * 3600)
}
fn default_poll_interval() -> HumanDuration {
    HumanDuration::from_secs(300)
}
fn default_argocd_namespace() -> String {
    "argocd".to_string()
}
fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(3600)
}
