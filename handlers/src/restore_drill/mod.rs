//! `restore-drill`: prove that the backups restore, without a person, and say how long it took
//! (RTO) and how old the restored data was.
//!
//! A Velero drill ([`velero`]) restores the newest `Completed` backup of a namespace into a
//! scratch namespace, waits for its workloads and runs the configured checks; an etcd drill
//! ([`etcd`]) restores the newest good snapshot with `etcdctl` and reads it with a throwaway
//! `etcd`. Targets run one after the other; each ends with a [`TargetResult`] whose details are
//! the contract's (`backup`, `backup_created_at`, `data_age_seconds`, `rto_seconds`,
//! `scratch_namespace`, `cleaned_up`, `checks`). The job succeeds only when every target does.
//! Whatever a drill created is removed at its end, also on failure, timeout and cancel.

pub mod etcd;
pub mod velero;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::command::{self, Args, CommandError, Verb};
use crate::context::Context;
use crate::descriptor::{KindDescriptor, Requirement};
use crate::handler::{
    Handler, HandlerError, JobContext, JobQuery, LockRequest, Outcome, TargetResult,
};
use crate::job::JobEnvelope;
use crate::kind::JobKind;
use crate::secret::SecretRef;
use crate::sections::{HandlerConfigs, Section};
use crate::settings::HumanDuration;

/// `[restore_drill]`
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// What a bare `drill` restores.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// The newest usable backup older than this: the target fails.
    #[serde(default = "default_max_data_age")]
    pub max_data_age: HumanDuration,
    /// A Velero restore reaching a terminal phase.
    #[serde(default = "default_restore_timeout")]
    pub restore_timeout: HumanDuration,
    /// The scratch namespace's workloads available, its PVCs bound.
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout: HumanDuration,
    /// Left out of every Velero drill: what would take an address, a DNS record or a
    /// certificate from production.
    #[serde(default = "default_excluded_resources")]
    pub excluded_resources: Vec<String>,
    /// Decrypts age-encrypted etcd snapshots; absent: the etcd drill checks the stored object
    /// against its manifest and says the restore itself was not tried.
    #[serde(default)]
    pub age_identity: Option<SecretRef>,
    /// Per namespace, run in the scratch namespace.
    #[serde(default)]
    pub checks: Vec<Check>,
    /// A target whose last successful drill is newer than this is skipped.
    #[serde(default)]
    pub skip_if_newer_than: Option<HumanDuration>,
    #[serde(default = "default_velero_namespace")]
    pub velero_namespace: String,
    #[serde(default = "default_etcdctl_bin")]
    pub etcdctl_bin: String,
    #[serde(default = "default_etcd_bin")]
    pub etcd_bin: String,
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

/// `[[restore_drill.checks]]`: one check of one namespace's scratch copy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub namespace: String,
    #[serde(default)]
    pub http: Option<HttpCheck>,
    #[serde(default)]
    pub min_objects: Option<MinObjects>,
}

/// A GET through the API server's service proxy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub service: String,
    pub port: u16,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
}

/// At least `count` objects of `kind` in the scratch namespace.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinObjects {
    pub kind: String,
    pub count: u64,
}

fn default_max_data_age() -> HumanDuration {
    HumanDuration::from_secs(48 * 3600)
}
fn default_restore_timeout() -> HumanDuration {
    HumanDuration::from_secs(30 * 60)
}
fn default_ready_timeout() -> HumanDuration {
    HumanDuration::from_secs(10 * 60)
}
fn default_excluded_resources() -> Vec<String> {
    [
        "httproutes.gateway.networking.k8s.io",
        "gateways.gateway.networking.k8s.io",
        "certificates.cert-manager.io",
        "issuers.cert-manager.io",
        "externalsecrets.external-secrets.io",
    ]
    .map(String::from)
    .to_vec()
}
fn default_velero_namespace() -> String {
    "velero".to_string()
}
fn default_etcdctl_bin() -> String {
    "etcdctl".to_string()
}
fn default_etcd_bin() -> String {
    "etcd".to_string()
}
fn default_path() -> String {
    "/".to_string()
}
fn default_expect_status() -> u16 {
    200
}
fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(7200)
}

pub const SECTION: Section<Config> = Section::new("restore_drill");

pub const KIND: JobKind = JobKind::RESTORE_DRILL;

/// The etcd drill's target name.
pub const ETCD_TARGET: &str = "etcd";

pub static DESCRIPTOR: KindDescriptor = KindDescriptor {
    kind: KIND,
    verbs: &[Verb {
        name: "drill",
        aliases: &[],
        usage: "drill [ns=a,b] [etcd]",
        summary: "restore drill: prove that backups restore (namespaces via Velero, etcd from its snapshots)",
        kind: Some(KIND),
        params: Some(params),
    }],
    config: SECTION.descriptor(),
    requires: &[],
    option_requires,
    build,
};

/// Namespaces are restored through Velero and Kubernetes; etcd from `[etcd_snapshot]`'s bucket.
fn option_requires(configs: &HandlerConfigs) -> Vec<(&'static str, Requirement)> {
    let mut needs = Vec::new();
    if let Some(config) = SECTION.get(configs) {
        if !config.namespaces.is_empty() {
            needs.push((
                "restore_drill.namespaces",
                Requirement {
                    section: "kubernetes",
                    why: "Velero drills restore through the Kubernetes API",
                },
            ));
        }
        if config.age_identity.is_some() {
            needs.push((
                "restore_drill.age_identity",
                Requirement {
                    section: "etcd_snapshot",
                    why: "the etcd drill restores the snapshots of [etcd_snapshot]'s bucket",
                },
            ));
        }
    }
    needs
}

/// `drill [ns=a,b] [etcd]`.
fn params(args: &mut Args) -> Result<Map<String, Value>, CommandError> {
    let mut params = Map::new();
    if let Some(ns) = args.take("ns") {
        params.insert("namespaces".into(), command::names_list("ns", &ns)?);
    }
    let mut etcd = false;
    while let Some(word) = args.optional_positional()? {
        if word == ETCD_TARGET {
            etcd = true;
        } else {
            return Err(args.unexpected(&word));
        }
    }
    params.insert("etcd".into(), Value::from(etcd));
    Ok(params)
}

/// A drill's verdict on one target, in the contract's shape.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DrillReport {
    /// The Velero Backup's name, or the snapshot's object key.
    pub backup: Option<String>,
    pub backup_created_at: Option<DateTime<Utc>>,
    pub data_age_seconds: Option<u64>,
    pub rto_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scratch_namespace: Option<String>,
    /// Whatever the drill created is gone.
    pub cleaned_up: bool,
    pub checks: Vec<CheckResult>,
    /// Why the target failed; absent when it passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The kind's own facts (the etcd versions a drill restored with).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    pub ok: bool,
    pub message: String,
}

impl CheckResult {
    pub fn new(name: impl Into<String>, ok: bool, message: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ok,
            message: message.into(),
        }
    }
}

impl DrillReport {
    /// Passed: no error, every check held, and nothing left behind.
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.cleaned_up && self.checks.iter().all(|c| c.ok)
    }

    /// Fails the target with `why`, keeping what is known so far.
    pub fn fail(&mut self, why: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(why.into());
        }
    }

    pub fn into_target(self, target: &str) -> TargetResult {
        let ok = self.ok();
        let details = match serde_json::to_value(&self) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        };
        TargetResult {
            details,
            ok,
            ..TargetResult::ok(target)
        }
    }

    /// One line for chat: "home: restored backup X (data age 26 h) in 4 m 12 s, 5/5 checks".
    pub fn summary(&self, target: &str) -> String {
        let what = self.backup.as_deref().unwrap_or("nothing");
        let age = self
            .data_age_seconds
            .map(|s| format!(" (data age {})", human(Duration::from_secs(s))))
            .unwrap_or_default();
        let held = self.checks.iter().filter(|c| c.ok).count();
        let checks = format!("{held}/{} checks", self.checks.len());
        match (&self.error, self.rto_seconds) {
            (None, Some(rto)) if self.cleaned_up => format!(
                "{target}: restored {what}{age} in {}, {checks}",
                human(Duration::from_secs_f64(rto))
            ),
            // Checked without a restore (an etcd drill holding no age identity).
            (None, None) if self.cleaned_up => {
                format!("{target}: checked {what}{age} without restoring it, {checks}")
            }
            (None, _) => format!("{target}: restored {what}{age}, {checks}; not cleaned up"),
            (Some(why), _) => format!("{target}: FAILED ({what}{age}): {why}"),
        }
    }
}

/// `4 m 12 s`, `26 h`: what a person reads in a chat line.
pub(crate) fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} m {} s", s / 60, s % 60),
        3600..172_800 => format!("{} h {} m", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

pub struct RestoreDrillHandler {
    pub config: Config,
    pub context: Context,
    /// Where the etcd snapshots are, when `[etcd_snapshot]` is configured.
    pub snapshots: Option<crate::etcd_snapshot::Config>,
}

/// The targets a job drills: its namespaces (or the configured ones), then etcd if asked.
pub fn targets_of(params: &Map<String, Value>, config: &Config) -> Vec<String> {
    let mut targets: Vec<String> = match params.get("namespaces").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        None => config.namespaces.clone(),
    };
    if params.get("etcd").and_then(Value::as_bool) == Some(true) {
        targets.push(ETCD_TARGET.to_string());
    }
    targets
}

impl RestoreDrillHandler {
    /// The newest fully successful drill that covered `target`, if `skip_if_newer_than` makes
    /// it recent enough to skip this one.
    async fn recent_success(
        &self,
        ctx: &JobContext,
        target: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<String>, HandlerError> {
        let Some(window) = self.config.skip_if_newer_than else {
            return Ok(None);
        };
        let newest = ctx
            .jobs
            .newest(&JobQuery {
                kind: Some(KIND),
                state: Some("succeeded".into()),
                target: Some(target.to_string()),
            })
            .await
            .map_err(HandlerError::Retryable)?;
        Ok(newest
            .filter(|job| {
                job.job_id != ctx.job_id
                    && (now - job.created_at).to_std().unwrap_or_default() < window.get()
            })
            .map(|job| job.job_id))
    }

    async fn drill(&self, ctx: &JobContext, target: &str) -> DrillReport {
        if target == ETCD_TARGET {
            etcd::drill(self, ctx).await
        } else {
            velero::drill(self, ctx, target).await
        }
    }
}

#[async_trait]
impl Handler for RestoreDrillHandler {
    fn kind(&self) -> JobKind {
        KIND
    }

    /// One drill of a target at a time; a drill reads the cluster (a rolling upgrade writes it).
    fn locks(&self, job: &JobEnvelope) -> Vec<LockRequest> {
        let mut locks: Vec<LockRequest> = targets_of(&job.params, &self.config)
            .iter()
            .map(|t| LockRequest::write(format!("drill:{t}")))
            .collect();
        locks.push(LockRequest::read(format!(
            "cluster:{}",
            self.context.cluster
        )));
        locks
    }

    fn timeout(&self) -> Duration {
        self.config.timeout.get()
    }

    /// Time to delete a scratch namespace or stop a throwaway etcd after `cancel`.
    fn cancel_grace(&self) -> Duration {
        Duration::from_secs(120)
    }

    async fn run(&self, ctx: &JobContext, job: &JobEnvelope) -> Result<Outcome, HandlerError> {
        let targets = targets_of(&job.params, &self.config);
        if targets.is_empty() {
            return Err(HandlerError::Failed(
                "nothing to drill: name namespaces (`drill ns=home`), add `etcd`, or set [restore_drill] namespaces".into(),
            ));
        }
        let mut results = Vec::new();
        let mut lines = Vec::new();
        let mut skipped = 0;
        for target in &targets {
            if ctx.stop_requested.is_cancelled() {
                return Err(HandlerError::Cancelled);
            }
            if let Some(newer) = self.recent_success(ctx, target, Utc::now()).await? {
                skipped += 1;
                lines.push(format!(
                    "{target}: skipped, drill {newer} succeeded within skip_if_newer_than"
                ));
                results.push(TargetResult {
                    skipped: true,
                    ..TargetResult::ok(target.clone())
                });
                continue;
            }
            ctx.progress.report(&format!("drilling {target}")).await;
            let report = self.drill(ctx, target).await;
            let line = report.summary(target);
            ctx.progress.report(&line).await;
            lines.push(line);
            results.push(report.into_target(target));
        }
        if ctx.stop_requested.is_cancelled() {
            return Err(HandlerError::Cancelled);
        }
        let message = lines.join("; ");
        let result = TargetResult::put_into(&results, json!({}));
        Ok(if results.iter().any(|r| !r.ok) {
            Outcome::Failed { message, result }
        } else if skipped == results.len() {
            Outcome::Skipped { message, result }
        } else {
            Outcome::Succeeded { message, result }
        })
    }
}

/// Builds the handler from its section, `[etcd_snapshot]` for where the snapshots are.
pub fn build(configs: &HandlerConfigs, context: &Context) -> Option<Arc<dyn Handler>> {
    Some(Arc::new(RestoreDrillHandler {
        config: SECTION.get(configs)?.clone(),
        context: context.clone(),
        snapshots: crate::etcd_snapshot::SECTION.get(configs).cloned(),
    }))
}
