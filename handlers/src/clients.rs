//! Sections that configure clients shared by several handlers.

use serde::Deserialize;

use crate::secret::SecretRef;
use crate::sections::{Section, SectionDescriptor};

pub const KUBERNETES: Section<KubernetesConfig> = Section::new("kubernetes");
pub const TALOS: Section<TalosConfig> = Section::new("talos");
pub const S3: Section<S3Config> = Section::new("s3");
pub const PROXMOX: Section<ProxmoxConfig> = Section::new("proxmox");

/// The sections of the clients that kinds share.
pub static SECTIONS: &[SectionDescriptor] = &[
    KUBERNETES.descriptor(),
    TALOS.descriptor(),
    S3.descriptor(),
    PROXMOX.descriptor(),
];

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
#[serde(from = "RawTalosConfig")]
pub struct TalosConfig {
    /// A path, or a secret reference (`env:`, `file:`, `cred:`, `op://`) holding the whole file.
    pub talosconfig: String,
    /// `talosconfig` as a reference, when it is one.
    pub talosconfig_ref: Option<SecretRef>,
    pub context: Option<String>,
    pub cluster: String,
}

#[derive(Deserialize)]
struct RawTalosConfig {
    talosconfig: String,
    #[serde(default)]
    pub context: Option<String>,
    /// The cluster's name in locks, object names and metrics.
    cluster: String,
}

impl From<RawTalosConfig> for TalosConfig {
    fn from(raw: RawTalosConfig) -> Self {
        let parsed = SecretRef::parse(&raw.talosconfig);
        Self {
            talosconfig_ref: (!parsed.is_literal()).then_some(parsed),
            talosconfig: raw.talosconfig,
            context: raw.context,
            cluster: raw.cluster,
        }
    }
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
    /// How long one S3 request is retried (connection refused, 5xx) before the operation
    /// fails; absent: object_store's 3 minutes. A shorter one fails a job sooner in an outage.
    #[serde(default)]
    pub retry_timeout: Option<crate::settings::HumanDuration>,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

fn default_true() -> bool {
    true
}

/// `[proxmox]`: the Proxmox VE API that Terraform's VM module uses (read by `preflight`).
#[derive(Debug, Clone, Deserialize)]
pub struct ProxmoxConfig {
    /// `https://10.0.0.10:8006/api2/json` (the `/api2/json` suffix may be left out).
    pub api_url: String,
    /// `user@realm!tokenname`
    pub token_id: String,
    pub token_secret: SecretRef,
    /// Proxmox's own CA (`/etc/pve/pve-root-ca.pem` on a node); absent: the system roots.
    #[serde(default)]
    pub ca_cert: Option<String>,
}
