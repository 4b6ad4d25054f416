//! Running terraform (or tofu): a clean environment with only what it needs, cancellation by
//! SIGINT (so it releases its state lock), output scrubbed of secrets before it goes anywhere.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::handler::HandlerError;
use crate::process::{ChildOutput, ProcessError, run_cancellable};
use crate::secret::Redactor;

/// How long terraform waits for its state lock before giving up.
const LOCK_TIMEOUT: &str = "-lock-timeout=120s";

pub struct Terraform {
    pub bin: String,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
    pub cancel: CancellationToken,
    pub grace: Duration,
    pub redactor: Redactor,
}

/// What a plan would do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PlanSummary {
    pub add: usize,
    pub change: usize,
    pub destroy: usize,
    /// `+ terraform_data.vm`, `~ module.x.y`, `-/+ z`: each changed address with its action.
    pub addresses: Vec<String>,
    pub outputs_changed: usize,
}

impl PlanSummary {
    pub fn has_changes(&self) -> bool {
        self.add + self.change + self.destroy + self.outputs_changed > 0
    }

    pub fn headline(&self) -> String {
        format!(
            "{} to add, {} to change, {} to destroy",
            self.add, self.change, self.destroy
        )
    }
}

impl Terraform {
    async fn run(&self, args: &[&str]) -> Result<ChildOutput, HandlerError> {
        let span = tracing::info_span!("terraform", command = args.first().copied().unwrap_or(""));
        let mut cmd = Command::new(&self.bin);
        cmd.current_dir(&self.dir)
            .args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        // terraform continues the trace from this step's span.
        if let Some(tp) = span.in_scope(crate::trace::current_traceparent) {
            cmd.env("TRACEPARENT", tp);
        }
        match run_cancellable(cmd, &self.cancel, self.grace)
            .instrument(span)
            .await
        {
            Ok(out) => Ok(out),
            Err(ProcessError::Cancelled { .. }) => Err(HandlerError::Cancelled),
            Err(ProcessError::Spawn { program, source }) => Err(HandlerError::Failed(format!(
                "cannot run {program} ({}): is it installed and on PATH?",
                source.kind()
            ))),
            Err(e) => Err(HandlerError::Internal(e.to_string())),
        }
    }

    /// The last lines of a failed command's output, scrubbed.
    fn failure(&self, step: &str, out: &ChildOutput) -> HandlerError {
        let text = if out.stderr.trim().is_empty() {
            &out.stdout
        } else {
            &out.stderr
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(12)..].join("\n");
        HandlerError::Failed(format!(
            "terraform {step} failed ({}):\n{}",
            out.status,
            self.redactor
                .redact(&crate::secret::redact_credentials(&tail))
        ))
    }

    async fn step(&self, step: &str, args: &[&str]) -> Result<ChildOutput, HandlerError> {
        let out = self.run(args).await?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(self.failure(step, &out))
        }
    }

    pub async fn fmt_check(&self) -> Result<(), HandlerError> {
        let out = self
            .run(&["fmt", "-check", "-recursive", "-no-color"])
            .await?;
        if out.status.success() {
            Ok(())
        } else {
            let files: Vec<&str> = out.stdout.lines().filter(|l| !l.is_empty()).collect();
            Err(HandlerError::Failed(format!(
                "terraform fmt -check: not formatted: {}",
                if files.is_empty() {
                    "(see terraform fmt)".to_string()
                } else {
                    files.join(", ")
                }
            )))
        }
    }

    pub async fn init(&self) -> Result<(), HandlerError> {
        self.step("init", &["init", "-input=false", "-no-color", LOCK_TIMEOUT])
            .await
            .map(|_| ())
    }

    pub async fn validate(&self) -> Result<(), HandlerError> {
        self.step("validate", &["validate", "-no-color"])
            .await
            .map(|_| ())
    }

    /// Plans into `out`; `true` when there are changes.
    pub async fn plan(&self, out: &Path) -> Result<bool, HandlerError> {
        let out_arg = format!("-out={}", out.display());
        let result = self
            .run(&[
                "plan",
                "-input=false",
                "-no-color",
                "-detailed-exitcode",
                LOCK_TIMEOUT,
                &out_arg,
            ])
            .await?;
        match result.status.code() {
            Some(0) => Ok(false),
            Some(2) => Ok(true),
            _ => Err(self.failure("plan", &result)),
        }
    }

    /// The saved plan as JSON.
    pub async fn show_json(&self, plan: &Path) -> Result<Value, HandlerError> {
        let plan = plan.display().to_string();
        let out = self
            .step("show", &["show", "-json", "-no-color", &plan])
            .await?;
        serde_json::from_str(&out.stdout)
            .map_err(|e| HandlerError::Internal(format!("terraform show -json: {e}")))
    }

    /// The saved plan as text, sensitive values masked by terraform itself.
    pub async fn show_text(&self, plan: &Path) -> Result<String, HandlerError> {
        let plan = plan.display().to_string();
        Ok(self
            .step("show", &["show", "-no-color", &plan])
            .await?
            .stdout)
    }

    pub async fn apply(&self, plan: &Path) -> Result<String, HandlerError> {
        let plan = plan.display().to_string();
        let out = self
            .step(
                "apply",
                &[
                    "apply",
                    "-input=false",
                    "-no-color",
                    "-auto-approve",
                    LOCK_TIMEOUT,
                    &plan,
                ],
            )
            .await?;
        Ok(out.stdout)
    }
}

/// Counts and addresses of a plan from `terraform show -json`.
pub fn summarize(plan: &Value) -> PlanSummary {
    let mut summary = PlanSummary::default();
    for rc in plan["resource_changes"].as_array().into_iter().flatten() {
        let actions: Vec<&str> = rc["change"]["actions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let address = rc["address"].as_str().unwrap_or("?");
        let symbol = match actions.as_slice() {
            ["create"] => {
                summary.add += 1;
                "+"
            }
            ["update"] => {
                summary.change += 1;
                "~"
            }
            ["delete"] => {
                summary.destroy += 1;
                "-"
            }
            ["delete", "create"] | ["create", "delete"] => {
                summary.add += 1;
                summary.destroy += 1;
                "-/+"
            }
            _ => continue, // no-op, read
        };
        summary.addresses.push(format!("{symbol} {address}"));
    }
    summary.outputs_changed = plan["output_changes"]
        .as_object()
        .map(|o| {
            o.values()
                .filter(|c| {
                    c["actions"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|x| x != "no-op"))
                })
                .count()
        })
        .unwrap_or(0);
    summary
}

/// Values of variables marked `sensitive`, so they can be scrubbed from any text terraform
/// printed without masking them.
pub fn sensitive_values(plan: &Value) -> Vec<String> {
    let declared = &plan["configuration"]["root_module"]["variables"];
    let mut out = Vec::new();
    for (name, decl) in declared.as_object().into_iter().flatten() {
        if decl["sensitive"] != Value::Bool(true) {
            continue;
        }
        collect_strings(&plan["variables"][name]["value"], &mut out);
    }
    out
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| collect_strings(x, out)),
        Value::Number(n) => out.push(n.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn summary_counts_actions_like_terraform() {
        let plan = json!({
            "resource_changes": [
                {"address": "a.one", "change": {"actions": ["create"]}},
                {"address": "a.two", "change": {"actions": ["update"]}},
                {"address": "a.three", "change": {"actions": ["delete", "create"]}},
                {"address": "a.four", "change": {"actions": ["delete"]}},
                {"address": "a.five", "change": {"actions": ["no-op"]}},
            ],
            "output_changes": {"x": {"actions": ["create"]}, "y": {"actions": ["no-op"]}}
        });
        let s = summarize(&plan);
        assert_eq!(
            (s.add, s.change, s.destroy, s.outputs_changed),
            (2, 1, 2, 1)
        );
        assert_eq!(
            s.addresses,
            ["+ a.one", "~ a.two", "-/+ a.three", "- a.four"]
        );
        assert_eq!(s.headline(), "2 to add, 1 to change, 2 to destroy");
        assert!(!summarize(&json!({})).has_changes());
    }

    #[test]
    fn sensitive_variable_values_are_found() {
        let plan = json!({
            "variables": {"db_password": {"value": "s3cr3t"}, "name": {"value": "vm"}, "keys": {"value": {"a": "k1", "b": ["k2"]}}},
            "configuration": {"root_module": {"variables": {
                "db_password": {"sensitive": true}, "name": {}, "keys": {"sensitive": true}
            }}}
        });
        let mut v = sensitive_values(&plan);
        v.sort();
        assert_eq!(v, ["k1", "k2", "s3cr3t"]);
    }
}
