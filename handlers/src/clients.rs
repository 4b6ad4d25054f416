//! Sections that configure clients shared by several handlers.

use serde::Deserialize;

use crate::secret::SecretRef;

/// `[kubernetes]`: how to reach the cluster's API.
#[derive(Debug, Clone, Deserialize)]
pub struct KubernetesConfig {
    /// Absent: `$KUBECONFIG`, then in-cluster.
    #[serde(default)]
    pub kubeconfig: Option<String>,
    #[serde(default)]
    pub context: Option<String>,
}

/// `[talos]`: how to reach the Talos machine API.
#[derive(Debug, Clone, Deserialize)]
pub struct TalosConfig {
    /// A path, or a secret reference (`file:`, `cred:`, `op://`) holding the whole file.
    pub talosconfig: String,
    #[serde(default)]
    pub context: Option<String>,
    /// The cluster's name in locks, object names and metrics.
    pub cluster: String,
}

/// `[s3]`: MinIO or any S3.
#[derive(Debug, Clone, Deserialize)]
pub struct S3Config {
    pub endpoint: String,
    #[serde(default = "default_region")]
    pub region: String,
    pub access_key_id: SecretRef,
    pub secret_access_key: SecretRef,
    #[serde(default = "default_true")]
    pub path_style: bool,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

fn default_true() -> bool {
    true
}
