//! Building what handlers share from the config: the GitHub client, the Kubernetes client, and
//! the environment child processes start from.

use std::collections::HashMap;

use infraflux_handlers::Services;
use infraflux_handlers::github::GitHub;
use infraflux_handlers::secret::Secrets;

use crate::config::{Config, Problems};
use infraflux_handlers::secret::SecretKey;

/// Variables of the agent's environment that git and terraform may see; nothing else of it
/// (credentials of the agent's own, unrelated settings) reaches a child process.
const TOOL_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "TF_CLI_CONFIG_FILE",
    "TF_LOG",
    "TF_LOG_PATH",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "GIT_SSH_COMMAND",
    "SSH_AUTH_SOCK",
];

pub async fn build(
    config: &Config,
    secrets: &Secrets,
    env: &HashMap<String, String>,
) -> Result<Services, Problems> {
    let mut problems = Problems::default();
    let github = match &config.github {
        Some(gh) => match GitHub::new(
            &gh.api_url,
            secrets.of(&SecretKey::GithubToken),
            &gh.repo,
            secrets.redactor().clone(),
        ) {
            Ok(client) => Some(client),
            Err(e) => {
                problems.push("github.api_url", e.to_string());
                None
            }
        },
        None => None,
    };
    let kube = match &config.handlers.kubernetes {
        Some(section) => match kube_client(section, env).await {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push("kubernetes.kubeconfig", e);
                None
            }
        },
        None => None,
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let mut tool_env: Vec<(String, String)> = TOOL_ENV
        .iter()
        .filter_map(|k| env.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect();
    if !env.contains_key("PATH") {
        tool_env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    Ok(Services {
        secrets: secrets.clone(),
        github,
        kube,
        state_dir: config.agent.state_dir.clone(),
        cluster: config
            .handlers
            .talos
            .as_ref()
            .map(|t| t.cluster.clone())
            .or_else(|| {
                config
                    .handlers
                    .kubernetes
                    .as_ref()
                    .and_then(|k| k.context.clone())
            })
            .unwrap_or_else(|| "default".to_string()),
        default_branch: config
            .github
            .as_ref()
            .map_or_else(|| "main".to_string(), |g| g.default_branch.clone()),
        tool_env,
    })
}

/// A client for `[kubernetes]`: its kubeconfig, else `$KUBECONFIG`, else in-cluster.
async fn kube_client(
    section: &infraflux_handlers::clients::KubernetesConfig,
    env: &HashMap<String, String>,
) -> Result<kube::Client, String> {
    let path = section
        .kubeconfig
        .clone()
        .or_else(|| env.get("KUBECONFIG").cloned());
    let config = match path {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(&path)
                .map_err(|e| format!("cannot read {path}: {e}"))?;
            let options = kube::config::KubeConfigOptions {
                context: section.context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| format!("{path}: {e}"))?
        }
        None => kube::Config::incluster()
            .map_err(|e| format!("no kubeconfig given and not in a cluster: {e}"))?,
    };
    kube::Client::try_from(config).map_err(|e| e.to_string())
}
