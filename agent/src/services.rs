//! Building what handlers share from the config: the GitHub client, the Kubernetes client, and
//! the environment child processes start from.

use std::collections::HashMap;

use infraflux_handlers::Context;
use infraflux_handlers::clients::TalosConfig;
use infraflux_handlers::github::GitHub;
use infraflux_handlers::secret::Secrets;
use infraflux_handlers::talos::{TalosClient, TalosError};

use infraflux_handlers::secret::SecretKey;

use crate::config::{Config, Loaded, Problems};

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
) -> Result<Context, Problems> {
    let (context, problems) = build_each(config, secrets, env).await;
    if problems.is_empty() {
        Ok(context)
    } else {
        Err(problems)
    }
}

/// Like [`build`], but with what could be built when some client could not, and a problem for
/// each that could not (`preflight` checks the rest, and names these).
pub async fn build_each(
    config: &Config,
    secrets: &Secrets,
    env: &HashMap<String, String>,
) -> (Context, Problems) {
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
    let (kube, kube_config) = match infraflux_handlers::clients::KUBERNETES.get(&config.handlers) {
        Some(section) => match kube_client(section, env).await {
            Ok((client, config)) => (Some(client), Some(config)),
            Err(e) => {
                problems.push("kubernetes.kubeconfig", e);
                (None, None)
            }
        },
        None => (None, None),
    };
    if let Some(talos) = infraflux_handlers::clients::TALOS.get(&config.handlers)
        && let Err(e) = check_talosconfig(talos, secrets)
    {
        problems.push("talos.talosconfig", e);
    }
    let mut tool_env: Vec<(String, String)> = TOOL_ENV
        .iter()
        .filter_map(|k| env.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect();
    if !env.contains_key("PATH") {
        tool_env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    let context = Context {
        secrets: secrets.clone(),
        github,
        kube,
        kube_config,
        talos: infraflux_handlers::clients::TALOS
            .get(&config.handlers)
            .cloned(),
        s3: infraflux_handlers::clients::S3
            .get(&config.handlers)
            .cloned(),
        state_dir: config.agent.state_dir.clone(),
        cluster: infraflux_handlers::clients::TALOS
            .get(&config.handlers)
            .map(|t| t.cluster.clone())
            .or_else(|| {
                infraflux_handlers::clients::KUBERNETES
                    .get(&config.handlers)
                    .and_then(|k| k.context.clone())
            })
            .unwrap_or_else(|| "default".to_string()),
        default_branch: config
            .github
            .as_ref()
            .map_or_else(|| "main".to_string(), |g| g.default_branch.clone()),
        tool_env,
    };
    (context, problems)
}

/// A client for `[kubernetes]`: its kubeconfig, else `$KUBECONFIG`, else in-cluster; and the
/// config it was built from, for clients with another stack.
async fn kube_client(
    section: &infraflux_handlers::clients::KubernetesConfig,
    env: &HashMap<String, String>,
) -> Result<(kube::Client, kube::Config), String> {
    let path = section
        .kubeconfig
        .clone()
        .or_else(|| env.get("KUBECONFIG").cloned());
    let config = match path {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(&path).map_err(|e| {
                // The YAML parser quotes the lines around an error, and they may hold a token:
                // only the position and the reason are kept.
                let message = e.to_string();
                format!(
                    "cannot read {path}: {}",
                    message.lines().next().unwrap_or_default()
                )
            })?;
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
    let client = kube::Client::try_from(config.clone()).map_err(|e| e.to_string())?;
    Ok((client, config))
}

/// Reads and parses the talosconfig once at start, so a missing or broken one stops the agent
/// instead of failing every snapshot. Jobs read a path again each time (renewed certificates).
fn check_talosconfig(talos: &TalosConfig, secrets: &Secrets) -> Result<(), String> {
    let (source, text) = match (&talos.talosconfig_ref, secrets.of(&SecretKey::Talosconfig)) {
        (None, _) => (
            talos.talosconfig.clone(),
            std::fs::read_to_string(&talos.talosconfig)
                .map_err(|e| format!("cannot read {}: {e}", talos.talosconfig))?,
        ),
        (Some(reference), Some(secret)) => (reference.describe(), secret.expose().to_string()),
        // Not resolved: reported with the other secrets.
        (Some(_), None) => return Ok(()),
    };
    match TalosClient::from_talosconfig(&text, talos.context.as_deref()) {
        Ok(_) => Ok(()),
        Err(TalosError::Config(reason)) => Err(format!("{source}: {reason}")),
        Err(e) => Err(format!("{source}: {e}")),
    }
}

/// What every enabled kind needs of the other sections (its descriptor's requirements, and
/// those of the options it uses) and lacks. A section that is present but could not be read is
/// not reported again. `run` and `check-config` check this, not [`build`]: tests and embedders
/// may replace a kind's handler with one that needs none of it.
pub fn missing_sections(loaded: &Loaded) -> Problems {
    let mut problems = Problems::default();
    let configs = &loaded.config.handlers;
    let mut reported = std::collections::BTreeSet::new();
    for descriptor in infraflux_handlers::KINDS {
        if !loaded.sections.contains(descriptor.section()) {
            continue;
        }
        for (key, r) in descriptor.requirements(configs) {
            if !loaded.sections.contains(r.section) && reported.insert((key, r.section)) {
                problems.push(key, format!("needs the [{}] section: {}", r.section, r.why));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(toml: &str) -> Loaded {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, toml).expect("write");
        Config::load_all(&path, std::iter::empty()).0
    }

    #[test]
    fn a_handler_section_without_what_it_needs_names_the_missing_section() {
        let problems = missing_sections(&loaded(
            r#"
[backup]
[etcd_snapshot]
bucket = "b"
[talos]
talosconfig = 7
[reconcile]
repo_url = "file:///r"
workdir = "tf"
env = "prod"
argocd_app = "root"
drift_issue = true
"#,
        ));
        let found: Vec<String> = problems
            .0
            .iter()
            .map(|p| format!("{} {}", p.key, p.message))
            .collect();
        for expected in [
            "backup needs the [kubernetes] section",
            "etcd_snapshot needs the [s3] section",
            "reconcile.argocd_app needs the [kubernetes] section",
            "reconcile.drift_issue needs the [github] section",
        ] {
            assert!(
                found.iter().any(|f| f.starts_with(expected)),
                "{expected} missing from {found:?}"
            );
        }
        // [talos] is there, only unreadable: that is reported where it is read.
        assert_eq!(found.len(), 4, "{found:?}");

        let problems = missing_sections(&loaded(
            "[reconcile]\nrepo_url = \"file:///r\"\nworkdir = \"tf\"\nenv = \"prod\"\n[kubernetes]\n[acceptance]\n",
        ));
        assert!(problems.is_empty(), "{problems}");
    }
}
