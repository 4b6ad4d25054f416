//! What every handler is built with: the resolved secrets and the clients of the platform, made
//! once at start and shared by every kind (Kubernetes, GitHub), or made from their sections on
//! demand (Talos, S3), so that a new kind asks the context instead of building its own.

use std::path::PathBuf;
use std::sync::Arc;

use object_store::aws::AmazonS3;

use crate::clients::{S3Config, TalosConfig};
use crate::github::GitHub;
use crate::handler::HandlerError;
use crate::secret::{SecretKey, Secrets};
use crate::talos::TalosClient;

#[derive(Clone, Default)]
pub struct Context {
    pub secrets: Secrets,
    pub github: Option<GitHub>,
    pub kube: Option<kube::Client>,
    /// What `kube` was built from, for clients with another stack (evictions answered without
    /// the default client's retries: [`crate::upgrade::kube::Evictor`]).
    pub kube_config: Option<kube::Config>,
    /// `[talos]`, when present.
    pub talos: Option<TalosConfig>,
    /// `[s3]`, when present.
    pub s3: Option<S3Config>,
    /// `[agent] state_dir`: working trees and caches live below it.
    pub state_dir: PathBuf,
    /// The repository's default branch (`[github] default_branch`).
    pub default_branch: String,
    /// The cluster's name in locks (`cluster:<name>`) and object names: `[talos] cluster`.
    pub cluster: String,
    /// The environment child processes (git, terraform) start from: PATH, HOME, proxies,
    /// TF_CLI_CONFIG_FILE. Nothing else of the agent's environment reaches them.
    pub tool_env: Vec<(String, String)>,
}

impl Context {
    /// A Talos API client from `[talos]`. A talosconfig given as a reference was resolved at
    /// start; a path is read now, so renewed certificates are used.
    pub fn talos_client(&self) -> Result<TalosClient, HandlerError> {
        let talos = self
            .talos
            .as_ref()
            .ok_or_else(|| HandlerError::Failed("this needs a [talos] section".into()))?;
        let text = match self.secrets.of(&SecretKey::Talosconfig) {
            Some(secret) => secret.expose().to_string(),
            None => std::fs::read_to_string(&talos.talosconfig).map_err(|e| {
                HandlerError::Failed(format!("cannot read {}: {e}", talos.talosconfig))
            })?,
        };
        TalosClient::from_talosconfig(&text, talos.context.as_deref())
            .map_err(|e| HandlerError::Failed(e.to_string()))
    }

    /// A client for one bucket of `[s3]`.
    pub fn s3_bucket(&self, bucket: &str) -> Result<Arc<AmazonS3>, HandlerError> {
        let s3 = self
            .s3
            .as_ref()
            .ok_or_else(|| HandlerError::Failed("this needs an [s3] section".into()))?;
        crate::s3::bucket(s3, &self.secrets, bucket).map_err(HandlerError::Failed)
    }
}
