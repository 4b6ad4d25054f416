//! `preflight`: is the platform ready to be built? The Proxmox token's privileges, S3 (MinIO)
//! buckets and lock file support, secret references, the GitHub token, NATS, and once the
//! cluster exists the Talos and Kubernetes APIs. One named [`Check`] each: pass, fail with the
//! fix, or skipped with why. Also run from the command line (`infraflux-agent preflight`),
//! without NATS; see `docs/acceptance.md`, "Preflight".

pub mod github;
pub mod proxmox;
pub mod s3;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use crate::checks::{Check, Report};
use crate::clients::ProxmoxConfig;
use crate::command::{Args, CommandError, Verb};
use crate::context::Context;
use crate::descriptor::KindDescriptor;
use crate::handler::{Handler, HandlerError, HandlerStore, JobContext, Outcome};
use crate::job::JobEnvelope;
use crate::kind::JobKind;
use crate::sections::{HandlerConfigs, Section};
use crate::settings::HumanDuration;

/// `[preflight]`
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Each check gives up after this long (an address that does not answer).
    #[serde(default = "default_check_timeout")]
    pub check_timeout: HumanDuration,
    /// What the Proxmox token must be allowed, by Proxmox's privilege names.
    #[serde(default = "default_proxmox_privileges")]
    pub proxmox_privileges: Vec<String>,
    /// Buckets to probe besides `[etcd_snapshot] bucket` (Velero's, Longhorn's, ...).
    #[serde(default)]
    pub buckets: Vec<String>,
    /// The Terraform state bucket: probed, and checked for lock file support. Absent: the
    /// lock file check uses the first bucket probed.
    #[serde(default)]
    pub state_bucket: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            timeout: default_timeout(),
            check_timeout: default_check_timeout(),
            proxmox_privileges: default_proxmox_privileges(),
            buckets: Vec::new(),
            state_bucket: None,
        }
    }
}

fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(600)
}

fn default_check_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}

/// What a Terraform VM module (bpg/proxmox, Telmate) needs to clone, configure, start and stop
/// VMs on a datastore and an SDN zone.
pub fn default_proxmox_privileges() -> Vec<String> {
    [
        "Datastore.AllocateSpace",
        "Datastore.Audit",
        "SDN.Use",
        "Sys.Audit",
        "VM.Allocate",
        "VM.Audit",
        "VM.Clone",
        "VM.Config.CDROM",
        "VM.Config.CPU",
        "VM.Config.Cloudinit",
        "VM.Config.Disk",
        "VM.Config.HWType",
        "VM.Config.Memory",
        "VM.Config.Network",
        "VM.Config.Options",
        "VM.PowerMgmt",
    ]
    .map(String::from)
    .to_vec()
}

pub const SECTION: Section<Config> = Section::new("preflight");

pub const KIND: JobKind = JobKind::PREFLIGHT;

/// The kind's name in summaries and metrics.
pub const NAME: &str = "preflight";

pub static DESCRIPTOR: KindDescriptor = KindDescriptor {
    kind: KIND,
    verbs: &[Verb {
        name: "preflight",
        aliases: &[],
        usage: "preflight",
        summary: "check the platform before it is built: Proxmox token, S3 buckets, secrets, GitHub token, APIs",
        kind: Some(KIND),
        params: Some(params),
    }],
    config: SECTION.descriptor(),
    requires: &[],
    option_requires: crate::descriptor::no_option_requires,
    build,
};

/// `preflight`: no arguments.
fn params(_: &mut Args) -> Result<serde_json::Map<String, serde_json::Value>, CommandError> {
    Ok(serde_json::Map::new())
}

fn build(configs: &HandlerConfigs, context: &Context) -> Option<Arc<dyn Handler>> {
    Some(Arc::new(PreflightHandler {
        preflight: Preflight::from_configs(configs, context),
    }))
}

/// One bucket to probe, and the config key that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub name: String,
    pub key: String,
}

/// Everything the checks read; the job and the command line build it from the same config.
#[derive(Clone)]
pub struct Preflight {
    pub config: Config,
    pub proxmox: Option<ProxmoxConfig>,
    pub buckets: Vec<Bucket>,
    /// The Terraform state bucket, or the first probed: the lock file check's.
    pub lock_bucket: Option<Bucket>,
    pub context: Context,
    /// Clients the command line could not build, by config key (`kubernetes.kubeconfig`,
    /// `talos.talosconfig`, `github.token`) and why: their checks fail with it.
    pub client_problems: BTreeMap<String, String>,
}

impl Preflight {
    pub fn from_configs(configs: &HandlerConfigs, context: &Context) -> Self {
        let config = SECTION.get(configs).cloned().unwrap_or_default();
        let mut buckets: Vec<Bucket> = Vec::new();
        let mut add = |name: &str, key: String| {
            if !name.is_empty() && !buckets.iter().any(|b| b.name == name) {
                buckets.push(Bucket {
                    name: name.to_string(),
                    key,
                });
            }
        };
        if let Some(state) = &config.state_bucket {
            add(state, "preflight.state_bucket".into());
        }
        if let Some(snapshots) = crate::etcd_snapshot::SECTION.get(configs) {
            add(&snapshots.bucket, "etcd_snapshot.bucket".into());
        }
        for (i, name) in config.buckets.iter().enumerate() {
            add(name, format!("preflight.buckets[{i}]"));
        }
        let lock_bucket = buckets.first().cloned();
        Self {
            config,
            proxmox: crate::clients::PROXMOX.get(configs).cloned(),
            buckets,
            lock_bucket,
            context: context.clone(),
            client_problems: BTreeMap::new(),
        }
    }

    /// Every check, in a fixed order. `secrets` and `nats` are the caller's: the job and the
    /// command line know different things about them.
    pub async fn run(&self, secrets: Check, nats: Check) -> Report {
        let mut report = Report::default();
        report.push(secrets);
        let (api, permissions) = match &self.proxmox {
            None => (
                Check::skip("proxmox.api", "no [proxmox] section"),
                Check::skip("proxmox.permissions", "no [proxmox] section"),
            ),
            Some(proxmox) => {
                let secret = self
                    .context
                    .secrets
                    .of(&crate::secret::SecretKey::ProxmoxTokenSecret);
                proxmox::check(
                    proxmox,
                    secret,
                    &self.config.proxmox_privileges,
                    self.check_timeout(),
                )
                .await
            }
        };
        report.push(api);
        report.push(permissions);
        for check in s3::checks(self).await {
            report.push(check);
        }
        report.push(self.bounded("github.token", github::check(self)).await);
        report.push(nats);
        report.push(self.bounded("talos.api", self.talos()).await);
        report.push(self.bounded("kubernetes.api", self.kubernetes()).await);
        // Nothing here holds a value, but what a server answered is quoted: scrub it anyway.
        let redactor = self.context.secrets.redactor();
        for check in &mut report.checks {
            check.message = redactor.redact(&check.message);
            check.fix = redactor.redact(&check.fix);
        }
        report
    }

    fn check_timeout(&self) -> Duration {
        self.config.check_timeout.get()
    }

    /// `check`, failed when it takes longer than the check timeout.
    async fn bounded(&self, name: &str, check: impl Future<Output = Check>) -> Check {
        match tokio::time::timeout(self.check_timeout(), check).await {
            Ok(check) => check,
            Err(_) => Check::fail(
                name,
                format!("no answer within {}", self.config.check_timeout),
                "check that this host reaches the address (firewall, routes, DNS), or raise preflight.check_timeout",
            ),
        }
    }

    async fn talos(&self) -> Check {
        const NAME: &str = "talos.api";
        if let Some(why) = self.client_problems.get("talos.talosconfig") {
            return Check::fail(
                NAME,
                format!("talos.talosconfig: {why}"),
                "point [talos] talosconfig at the cluster's talosconfig (talosctl gen config writes one)",
            );
        }
        if self.context.talos.is_none() {
            return Check::skip(NAME, "no [talos] section (the cluster may not exist yet)");
        }
        let client = match self.context.talos_client() {
            Ok(c) => c,
            Err(e) => {
                return Check::fail(
                    NAME,
                    e.to_string(),
                    "point [talos] talosconfig at the cluster's talosconfig",
                );
            }
        };
        let Some((_, node)) = client.targets().into_iter().next() else {
            return Check::fail(
                NAME,
                format!("talosconfig context {} has no endpoint", client.context),
                "add the control plane addresses to the context's endpoints",
            );
        };
        match crate::upgrade::talos::version_of(&client, &client.endpoints, &node).await {
            Ok(version) => Check::pass(NAME, format!("Talos {version} on {node}")),
            Err(e) => Check::fail(
                NAME,
                e,
                "check that apid (port 50000) is reachable from this host and that the talosconfig's CA and client certificate are the cluster's",
            ),
        }
    }

    async fn kubernetes(&self) -> Check {
        const NAME: &str = "kubernetes.api";
        if let Some(why) = self.client_problems.get("kubernetes.kubeconfig") {
            return Check::fail(
                NAME,
                format!("kubernetes.kubeconfig: {why}"),
                "point [kubernetes] kubeconfig at a readable kubeconfig (talosctl kubeconfig writes one)",
            );
        }
        let Some(kube) = &self.context.kube else {
            return Check::skip(
                NAME,
                "no [kubernetes] section (the cluster may not exist yet)",
            );
        };
        // Which server, and the deepest cause (a refused connection, a TLS alert): kube's own
        // message is only "client error (Connect)".
        let server = self
            .context
            .kube_config
            .as_ref()
            .map(|c| format!(" at {}", c.cluster_url))
            .unwrap_or_default();
        match kube.apiserver_version().await {
            Ok(info) => Check::pass(
                NAME,
                format!("Kubernetes {} ({})", info.git_version, info.platform),
            ),
            Err(e) => Check::fail(
                NAME,
                format!("the Kubernetes API{server} does not answer: {}", cause(&e)),
                "check the kubeconfig's server address and credentials, and that this host reaches it (port 6443)",
            ),
        }
    }
}

/// The `secrets` check: `total` references, of which `failed` (config key, why) did not
/// resolve. The reasons name sources (a variable, a file, a 1Password item), never values.
pub fn secrets_check(total: usize, failed: &[(String, String)]) -> Check {
    const NAME: &str = "secrets";
    if failed.is_empty() {
        return Check::pass(NAME, format!("{total}/{total} secret references resolve"));
    }
    let named: Vec<String> = failed
        .iter()
        .map(|(k, why)| format!("{k} ({why})"))
        .collect();
    let one_password = failed.iter().any(|(_, why)| why.contains("1Password"));
    let mut fix =
        "fix each reference named: set the variable, create the file, or correct the reference"
            .to_string();
    if one_password {
        fix.push_str(
            "; for op:// references sign the 1Password CLI in (OP_SERVICE_ACCOUNT_TOKEN for a service account) and check the vault, item and field",
        );
    }
    Check::fail(
        NAME,
        format!(
            "{} of {total} secret references do not resolve: {}",
            failed.len(),
            named.join("; ")
        ),
        fix,
    )
}

/// The `nats` check inside a job: it came over NATS, so NATS answers; JetStream is asked for
/// the state bucket's status.
pub async fn nats_check(store: &HandlerStore) -> Check {
    const NAME: &str = "nats";
    match tokio::time::timeout(Duration::from_secs(10), store.state.status()).await {
        Ok(Ok(status)) => Check::pass(
            NAME,
            format!(
                "NATS and JetStream answer (key-value bucket {}, {} values)",
                status.bucket(),
                status.values()
            ),
        ),
        Ok(Err(e)) => Check::fail(
            NAME,
            format!("JetStream does not answer for the state bucket: {e}"),
            "check nats-server's JetStream (jetstream: enabled, its store's disk) and the agent's permissions on $JS.API",
        ),
        Err(_) => Check::fail(
            NAME,
            "JetStream did not answer within 10s",
            "check nats-server's JetStream (jetstream: enabled, its store's disk)",
        ),
    }
}

pub struct PreflightHandler {
    pub preflight: Preflight,
}

#[async_trait]
impl Handler for PreflightHandler {
    fn kind(&self) -> JobKind {
        KIND
    }

    fn timeout(&self) -> Duration {
        self.preflight.config.timeout.get()
    }

    async fn run(&self, ctx: &JobContext, _job: &JobEnvelope) -> Result<Outcome, HandlerError> {
        // The agent does not start unless every reference resolved.
        let resolved = self.preflight.context.secrets.len();
        let secrets = Check::pass(
            "secrets",
            format!("{resolved}/{resolved} secret references resolved at the agent's start"),
        );
        let nats = nats_check(&ctx.store).await;
        let report = tokio::select! {
            report = self.preflight.run(secrets, nats) => report,
            _ = ctx.cancel.cancelled() => return Err(HandlerError::Cancelled),
        };
        Ok(report.outcome(NAME))
    }
}

/// The deepest cause of an error: the TLS alert, the refused connection.
pub(crate) fn cause(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    let mut deepest = None;
    while let Some(s) = source {
        deepest = Some(s.to_string());
        source = s.source();
    }
    if let Some(d) = deepest
        && !message.contains(&d)
    {
        message = format!("{message}: {d}");
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_come_from_the_state_bucket_the_snapshots_and_the_list_once_each() {
        let mut configs = HandlerConfigs::default();
        SECTION.set(
            &mut configs,
            serde_json::from_str(r#"{"state_bucket":"tfstate","buckets":["velero","tfstate"]}"#)
                .expect("preflight"),
        );
        crate::etcd_snapshot::SECTION.set(
            &mut configs,
            serde_json::from_str(r#"{"bucket":"snapshots"}"#).expect("etcd_snapshot"),
        );
        let preflight = Preflight::from_configs(&configs, &Context::default());
        let names: Vec<(&str, &str)> = preflight
            .buckets
            .iter()
            .map(|b| (b.name.as_str(), b.key.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("tfstate", "preflight.state_bucket"),
                ("snapshots", "etcd_snapshot.bucket"),
                ("velero", "preflight.buckets[0]"),
            ]
        );
        assert_eq!(
            preflight.lock_bucket.map(|b| b.name).as_deref(),
            Some("tfstate")
        );
        assert!(
            preflight
                .config
                .proxmox_privileges
                .contains(&"VM.Allocate".to_string())
        );
    }

    #[test]
    fn the_secrets_check_names_keys_and_counts() {
        assert_eq!(
            secrets_check(3, &[]).line(),
            "PASS secrets: 3/3 secret references resolve"
        );
        let failed = secrets_check(
            3,
            &[(
                "proxmox.token_secret".into(),
                "1Password CLI could not read op://v/p/t: item not found".into(),
            )],
        );
        assert!(failed.failed());
        assert!(
            failed
                .message
                .starts_with("1 of 3 secret references do not resolve: proxmox.token_secret")
        );
        assert!(failed.fix.contains("op://"), "{}", failed.fix);
    }
}
