//! `backup`: a Velero backup through the Kubernetes API, checked before and watched after.
//!
//! Before: the BackupStorageLocation must be `Available` and validated recently (a wrong MinIO
//! credential shows up there, instead of as a backup that silently never lands). Then a
//! `velero.io/v1 Backup` named after the job is created (an interrupted job finds it again and
//! keeps waiting), and the job waits for a terminal phase and reports items, warnings and
//! errors. `PartiallyFailed` fails the job unless `partially_failed = "warn"`. An empty backup,
//! or one far smaller than the previous, fails too.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::command::{self, Args, CommandError, Verb};
use crate::context::Context;
use crate::descriptor::{KindDescriptor, Requirement, no_option_requires};
use crate::handler::{
    Handler, HandlerError, JobContext, LockRequest, Outcome, RetryPolicy, TargetResult,
};
use crate::job::JobEnvelope;
use crate::kind::JobKind;
use crate::sections::Section;
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
    /// The storage location must have been validated by Velero within this long.
    #[serde(default = "default_location_max_age")]
    pub location_max_age: HumanDuration,
    /// A backup with fewer items than this fraction of the previous one fails the job.
    #[serde(default = "default_min_items_ratio")]
    pub min_items_ratio: f64,
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
fn default_location_max_age() -> HumanDuration {
    HumanDuration::from_secs(15 * 60)
}
fn default_min_items_ratio() -> f64 {
    0.5
}
fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(3600)
}

const POLL: Duration = Duration::from_secs(2);
/// Where the item count of the last good backup of a target is kept.
fn last_items_key(target: &str) -> String {
    format!("backup.last-items.{}", TargetResult::state_key(target))
}

/// A backup's target: its namespaces, sorted, or `all`.
pub fn target_of(namespaces: &[Value]) -> String {
    let mut names: Vec<&str> = namespaces
        .iter()
        .filter_map(Value::as_str)
        .filter(|n| *n != "*")
        .collect();
    names.sort_unstable();
    names.dedup();
    if names.is_empty() {
        "all".into()
    } else {
        names.join(",")
    }
}

fn velero(client: kube::Client, namespace: &str, kind: &str, plural: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("velero.io", "v1", kind);
    Api::namespaced_with(
        client,
        namespace,
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

fn kube_error(what: &str, e: kube::Error) -> HandlerError {
    match e {
        kube::Error::Api(s) if s.code == 404 => HandlerError::Failed(format!("{what}: not found")),
        kube::Error::Api(s) if s.code == 403 || s.code == 401 => {
            HandlerError::Failed(format!("{what}: forbidden ({})", s.message))
        }
        kube::Error::Api(s) => HandlerError::Retryable(format!("{what}: {} {}", s.code, s.message)),
        other => HandlerError::Retryable(format!("{what}: {other}")),
    }
}

/// Velero's duration format (`720h0m0s`).
fn go_duration(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}h{}m{}s", s / 3600, (s % 3600) / 60, s % 60)
}

pub const KIND: JobKind = JobKind::BACKUP;
pub const SECTION: Section<Config> = Section::new("backup");

pub static DESCRIPTOR: KindDescriptor = KindDescriptor {
    kind: KIND,
    verbs: &[Verb {
        name: "backup",
        aliases: &[],
        usage: "backup [ns=a,b] [ttl=72h]",
        summary: "Velero backup of namespaces (default: all)",
        kind: Some(KIND),
        params: Some(params),
    }],
    config: SECTION.descriptor(),
    requires: &[Requirement {
        section: "kubernetes",
        why: "Velero backups go through the Kubernetes API",
    }],
    option_requires: no_option_requires,
    build: |configs, context| {
        Some(std::sync::Arc::new(BackupHandler {
            config: SECTION.get(configs)?.clone(),
            context: context.clone(),
        }))
    },
};

/// `backup [ns=a,b] [ttl=72h]`.
fn params(args: &mut Args) -> Result<serde_json::Map<String, Value>, CommandError> {
    let mut params = serde_json::Map::new();
    if let Some(ns) = args.take("ns") {
        params.insert("namespaces".into(), command::names_list("ns", &ns)?);
    }
    if let Some(ttl) = args.take("ttl") {
        params.insert(
            "ttl_seconds".into(),
            Value::from(command::duration("ttl", &ttl)?.as_secs()),
        );
    }
    Ok(params)
}

pub struct BackupHandler {
    pub config: Config,
    pub context: Context,
}

impl BackupHandler {
    #[tracing::instrument(name = "storage_location_check", skip_all)]
    async fn check_location(&self, client: kube::Client) -> Result<(), HandlerError> {
        let cfg = &self.config;
        let what = format!(
            "BackupStorageLocation {}/{}",
            cfg.velero_namespace, cfg.storage_location
        );
        let bsl = velero(
            client,
            &cfg.velero_namespace,
            "BackupStorageLocation",
            "backupstoragelocations",
        )
        .get(&cfg.storage_location)
        .await
        .map_err(|e| kube_error(&what, e))?;
        let status = &bsl.data["status"];
        let phase = status["phase"].as_str().unwrap_or("unknown");
        if phase != "Available" {
            let message = status["message"].as_str().unwrap_or_default();
            return Err(HandlerError::Failed(format!(
                "{what} is {phase}{}: Velero cannot read or write its bucket; check its credentials and endpoint",
                if message.is_empty() {
                    String::new()
                } else {
                    format!(" ({message})")
                }
            )));
        }
        // Available but never validated: Velero has not yet checked it can reach the bucket.
        let validated = status["lastValidationTime"]
            .as_str()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .ok_or_else(|| {
                HandlerError::Failed(format!(
                    "{what} has never been validated by Velero: it may not be running; check the velero deployment"
                ))
            })?;
        let age = (Utc::now() - validated.with_timezone(&Utc))
            .to_std()
            .unwrap_or_default();
        if age > cfg.location_max_age.get() {
            return Err(HandlerError::Failed(format!(
                "{what} was last validated {} ago (more than {}): Velero may not be running",
                HumanDuration(Duration::from_secs(age.as_secs())),
                cfg.location_max_age
            )));
        }
        Ok(())
    }

    /// The item count of the previous good backup of the same namespaces: a backup of one
    /// small namespace is not compared with a full one.
    async fn previous_items(&self, ctx: &JobContext, target: &str) -> Option<u64> {
        let bytes = ctx
            .store
            .state
            .get(last_items_key(target))
            .await
            .ok()
            .flatten()?;
        String::from_utf8_lossy(&bytes).parse().ok()
    }
}

#[async_trait]
impl Handler for BackupHandler {
    fn kind(&self) -> JobKind {
        JobKind::BACKUP
    }

    fn locks(&self, _job: &JobEnvelope) -> Vec<LockRequest> {
        vec![LockRequest::read(format!(
            "cluster:{}",
            self.context.cluster
        ))]
    }

    fn timeout(&self) -> Duration {
        self.config.timeout.get()
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::exponential(3, Duration::from_secs(10), Duration::from_secs(120))
    }

    async fn run(&self, ctx: &JobContext, job: &JobEnvelope) -> Result<Outcome, HandlerError> {
        let cfg = &self.config;
        let client =
            self.context.kube.clone().ok_or_else(|| {
                HandlerError::Failed("backup needs a [kubernetes] section".into())
            })?;
        let started = Instant::now();
        self.check_location(client.clone()).await?;
        let backups = velero(client, &cfg.velero_namespace, "Backup", "backups");
        let name = format!("infraflux-{}", ctx.job_id);
        let namespaces: Vec<Value> = job
            .params
            .get("namespaces")
            .and_then(Value::as_array)
            .cloned()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| vec![json!("*")]);
        let ttl = job
            .params
            .get("ttl_seconds")
            .and_then(Value::as_u64)
            .map_or(cfg.ttl.get(), Duration::from_secs);
        // A restarted job finds its backup again instead of starting a second one.
        let existing = match backups.get_opt(&name).await {
            Ok(found) => found,
            Err(e) => return Err(kube_error(&format!("Backup {name}"), e)),
        };
        async {
        if existing.is_none() {
            let backup: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "velero.io/v1",
                "kind": "Backup",
                "metadata": {
                    "name": name,
                    "namespace": cfg.velero_namespace,
                    "labels": {"app.kubernetes.io/managed-by": "infraflux-agent", "infraflux.io/job": ctx.job_id},
                },
                "spec": {
                    "includedNamespaces": namespaces,
                    "ttl": go_duration(ttl),
                    "storageLocation": cfg.storage_location,
                },
            }))
            .map_err(|e| HandlerError::Internal(e.to_string()))?;
            backups
                .create(&PostParams::default(), &backup)
                .await
                .map_err(|e| kube_error(&format!("creating Backup {name}"), e))?;
            ctx.progress
                .report(&format!("Velero backup {name} created"))
                .await;
        } else {
            ctx.progress
                .report(&format!("Velero backup {name} exists; waiting for it"))
                .await;
        }
        Ok::<(), HandlerError>(())
        }
        .instrument(tracing::info_span!("velero_backup_create", backup = %name))
        .await?;

        let mut last_phase = String::new();
        let status = async {
            loop {
                tokio::select! {
                    () = ctx.cancel.cancelled() => return Err(HandlerError::Cancelled),
                    () = tokio::time::sleep(POLL) => {}
                }
                let current = backups
                    .get(&name)
                    .await
                    .map_err(|e| kube_error(&format!("Backup {name}"), e))?;
                let status = current.data["status"].clone();
                let phase = status["phase"].as_str().unwrap_or("New").to_string();
                if phase != last_phase {
                    ctx.progress
                        .report(&format!("Velero backup {name}: {phase}"))
                        .await;
                    last_phase = phase.clone();
                }
                if matches!(
                    phase.as_str(),
                    "Completed" | "PartiallyFailed" | "Failed" | "FailedValidation"
                ) {
                    break Ok::<Value, HandlerError>(status);
                }
            }
        }
        .instrument(tracing::info_span!("velero_backup_wait", backup = %name))
        .await?;
        let phase = status["phase"].as_str().unwrap_or_default();
        let Figures {
            items,
            total,
            warnings,
            errors,
        } = Figures::of(&status);
        let result = json!({
            "backup": name, "phase": phase, "items": items, "total_items": total,
            "warnings": warnings, "errors": errors,
            "duration_seconds": started.elapsed().as_secs_f64(),
        });
        let target = target_of(&namespaces);
        let previous = self.previous_items(ctx, &target).await;
        let message = match verdict(&name, &status, cfg, previous) {
            BackupVerdict::Succeeded(message) => message,
            BackupVerdict::Failed(message) => return Err(HandlerError::Failed(message)),
        };
        if let Err(e) = ctx
            .store
            .state
            .put(last_items_key(&target), Bytes::from(items.to_string()))
            .await
        {
            tracing::warn!(error = %e, "Backup size not recorded for the next comparison");
        }
        let figures = TargetResult {
            items: Some(items),
            ..TargetResult::ok(target)
        };
        Ok(Outcome::Succeeded {
            message,
            result: TargetResult::put_into(&[figures], result),
        })
    }
}

/// What a finished Backup's status counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Figures {
    items: u64,
    total: u64,
    warnings: u64,
    errors: u64,
}

impl Figures {
    fn of(status: &Value) -> Self {
        let items = status["progress"]["itemsBackedUp"].as_u64().unwrap_or(0);
        Figures {
            items,
            total: status["progress"]["totalItems"].as_u64().unwrap_or(items),
            warnings: status["warnings"].as_u64().unwrap_or(0),
            errors: status["errors"].as_u64().unwrap_or(0),
        }
    }
}

/// How a finished backup ends the job, with the job's message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BackupVerdict {
    Succeeded(String),
    Failed(String),
}

/// Judges Backup `name` from its final `status` (a terminal phase), the config and the item
/// count of the previous good backup of the same target. Pure: the edge reads and records.
fn verdict(name: &str, status: &Value, config: &Config, previous: Option<u64>) -> BackupVerdict {
    let phase = status["phase"].as_str().unwrap_or_default();
    let Figures {
        items,
        total,
        warnings,
        errors,
    } = Figures::of(status);
    let counts = format!("{items}/{total} items, {warnings} warnings, {errors} errors");
    let failed = BackupVerdict::Failed;
    match phase {
        "Failed" => {
            let reason = status["failureReason"]
                .as_str()
                .unwrap_or("no reason given");
            return failed(format!("Velero backup {name} Failed: {reason} ({counts})"));
        }
        "FailedValidation" => {
            let reasons: Vec<&str> = status["validationErrors"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            return failed(format!(
                "Velero backup {name} FailedValidation: {}",
                reasons.join("; ")
            ));
        }
        "PartiallyFailed" if config.partially_failed == PartiallyFailed::Fail => {
            return failed(format!(
                "Velero backup {name} PartiallyFailed ({counts}); see `velero backup logs {name}`"
            ));
        }
        _ => {}
    }
    if items == 0 {
        return failed(format!("Velero backup {name} is empty: 0 items backed up"));
    }
    if let Some(previous) = previous
        && (items as f64) < previous as f64 * config.min_items_ratio
    {
        return failed(format!(
            "Velero backup {name} holds {items} items, less than {:.0}% of the previous backup's {previous}",
            config.min_items_ratio * 100.0
        ));
    }
    let warned = if phase == "PartiallyFailed" {
        " (PartiallyFailed, counted as a warning)"
    } else {
        ""
    };
    BackupVerdict::Succeeded(format!("Velero backup {name} {phase}{warned}: {counts}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(partially_failed: &str, min_items_ratio: f64) -> Config {
        serde_json::from_value(json!({
            "partially_failed": partially_failed,
            "min_items_ratio": min_items_ratio,
        }))
        .expect("a backup config")
    }

    fn status(phase: &str, items: u64, total: u64) -> Value {
        json!({
            "phase": phase,
            "progress": {"itemsBackedUp": items, "totalItems": total},
            "warnings": 2,
            "errors": 1,
        })
    }

    fn succeeded(message: &str) -> BackupVerdict {
        BackupVerdict::Succeeded(message.into())
    }

    fn failed(message: &str) -> BackupVerdict {
        BackupVerdict::Failed(message.into())
    }

    #[test]
    fn how_a_backup_counts() {
        let fail = config("fail", 0.5);
        let warn = config("warn", 0.5);
        // (name, final status, config, previous item count, verdict)
        let cases = [
            (
                "completed",
                status("Completed", 10, 10),
                &fail,
                None,
                succeeded("Velero backup b1 Completed: 10/10 items, 2 warnings, 1 errors"),
            ),
            (
                "no total reported: the items are the total",
                json!({"phase": "Completed", "progress": {"itemsBackedUp": 7}}),
                &fail,
                None,
                succeeded("Velero backup b1 Completed: 7/7 items, 0 warnings, 0 errors"),
            ),
            (
                "as large as the previous",
                status("Completed", 10, 10),
                &fail,
                Some(10),
                succeeded("Velero backup b1 Completed: 10/10 items, 2 warnings, 1 errors"),
            ),
            (
                "exactly the ratio of the previous still counts",
                status("Completed", 5, 5),
                &fail,
                Some(10),
                succeeded("Velero backup b1 Completed: 5/5 items, 2 warnings, 1 errors"),
            ),
            (
                "far smaller than the previous",
                status("Completed", 4, 4),
                &fail,
                Some(10),
                failed("Velero backup b1 holds 4 items, less than 50% of the previous backup's 10"),
            ),
            (
                "the ratio is the configured one",
                status("Completed", 8, 8),
                &config("fail", 0.9),
                Some(10),
                failed("Velero backup b1 holds 8 items, less than 90% of the previous backup's 10"),
            ),
            (
                "empty",
                status("Completed", 0, 0),
                &fail,
                None,
                failed("Velero backup b1 is empty: 0 items backed up"),
            ),
            (
                "failed, with Velero's reason",
                json!({"phase": "Failed", "failureReason": "bucket gone", "progress": {"itemsBackedUp": 3, "totalItems": 9}}),
                &fail,
                Some(10),
                failed("Velero backup b1 Failed: bucket gone (3/9 items, 0 warnings, 0 errors)"),
            ),
            (
                "failed without a reason",
                status("Failed", 0, 0),
                &warn,
                None,
                failed(
                    "Velero backup b1 Failed: no reason given (0/0 items, 2 warnings, 1 errors)",
                ),
            ),
            (
                "failed validation names every error",
                json!({"phase": "FailedValidation", "validationErrors": ["no such namespace", "bad ttl"]}),
                &fail,
                None,
                failed("Velero backup b1 FailedValidation: no such namespace; bad ttl"),
            ),
            (
                "failed validation without errors",
                json!({"phase": "FailedValidation"}),
                &fail,
                None,
                failed("Velero backup b1 FailedValidation: "),
            ),
            (
                "partially failed fails by default",
                status("PartiallyFailed", 9, 10),
                &fail,
                None,
                failed(
                    "Velero backup b1 PartiallyFailed (9/10 items, 2 warnings, 1 errors); see `velero backup logs b1`",
                ),
            ),
            (
                "partially failed may count as a warning",
                status("PartiallyFailed", 9, 10),
                &warn,
                Some(10),
                succeeded(
                    "Velero backup b1 PartiallyFailed (PartiallyFailed, counted as a warning): 9/10 items, 2 warnings, 1 errors",
                ),
            ),
            (
                "a partially failed warning that is empty still fails",
                status("PartiallyFailed", 0, 10),
                &warn,
                None,
                failed("Velero backup b1 is empty: 0 items backed up"),
            ),
            (
                "a partially failed warning far smaller than the previous still fails",
                status("PartiallyFailed", 2, 10),
                &warn,
                Some(10),
                failed("Velero backup b1 holds 2 items, less than 50% of the previous backup's 10"),
            ),
        ];
        for (name, status, config, previous, want) in cases {
            assert_eq!(verdict("b1", &status, config, previous), want, "{name}");
        }
    }
}
