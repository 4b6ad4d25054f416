//! `reconcile`: a push to the default branch (or `plan [ref]` / `reconcile` from ChatOps, a
//! schedule, the poller) runs terraform plan at an exact commit; a plan with changes is saved
//! and waits for `apply <job-id>`; a plan without changes, or an apply, is followed by an Argo
//! CD sync of the root Application. Pull requests get a speculative plan as a comment, never an
//! apply. The commit status `infraflux/reconcile` tells GitHub where each commit stands.

pub mod apply;
pub mod argocd;
pub mod preflight;
pub mod report;
pub mod secret_scan;
pub mod terraform;
pub mod workspace;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::kv;
use async_trait::async_trait;
use bytes::Bytes;
use chrono::Utc;
use serde::Deserialize;
use serde_json::Value;

use crate::command::{self, Args, CommandError, Verb};
use crate::context::Context;
use crate::descriptor::{KindDescriptor, Requirement};
use crate::github::StatusState;
use crate::handler::{Handler, HandlerError, JobContext, LockRequest, Outcome};
use crate::job::JobEnvelope;
use crate::kind::JobKind;
use crate::secret::SecretKey;
use crate::secret::SecretRef;
use crate::sections::Section;
use crate::settings::HumanDuration;
use terraform::{PlanSummary, Terraform};
use workspace::Remote;

/// The commit status context on GitHub.
pub const STATUS_CONTEXT: &str = "infraflux/reconcile";

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
    /// How long a sync may take to reach Synced and Healthy.
    #[serde(default = "default_argocd_timeout")]
    pub argocd_timeout: HumanDuration,
    /// Keep one GitHub issue open while drift is detected.
    #[serde(default)]
    pub drift_issue: bool,
    /// Handed to terraform only; values may be secret references.
    #[serde(default)]
    pub env_vars: BTreeMap<String, SecretRef>,
    /// Which pull requests get a speculative plan.
    #[serde(default)]
    pub pr_plans: PrPlans,
    /// What pull requests' plans get instead of `env_vars`: read-only credentials. Without it,
    /// only trusted pull requests are planned.
    #[serde(default)]
    pub plan_env_vars: Option<BTreeMap<String, SecretRef>>,
    /// GitHub logins whose `/infraflux apply` comments approve plans; absent: anyone with
    /// write permission on the repository.
    #[serde(default)]
    pub approvers: Option<Vec<String>>,
    /// Whether ChatOps `apply` may approve: its requester is whatever the NATS client says.
    #[serde(default = "default_true")]
    pub chatops_approvals: bool,
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_true() -> bool {
    true
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
fn default_argocd_timeout() -> HumanDuration {
    HumanDuration::from_secs(600)
}
fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(3600)
}

/// `[reconcile] pr_plans`: which pull requests get a speculative plan. Planning runs the pull
/// request's code (providers, external data sources, local-exec) on the runner host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PrPlans {
    Off,
    /// Same repository, and the author is an owner, member or collaborator.
    #[default]
    Trusted,
    /// Any pull request, forks included: needs `plan_env_vars`.
    All,
}

/// The authors GitHub marks as trusted in `author_association`.
const TRUSTED_ASSOCIATIONS: &[&str] = &["OWNER", "MEMBER", "COLLABORATOR"];

/// Who opened a pull request, as its event tells.
#[derive(Debug, Clone, Copy)]
pub struct PullRequestAuthor<'a> {
    /// The head repository is the base repository: not a fork.
    pub same_repository: bool,
    /// GitHub's `author_association` of the pull request.
    pub association: &'a str,
}

impl PullRequestAuthor<'_> {
    pub fn trusted(&self) -> bool {
        self.same_repository && TRUSTED_ASSOCIATIONS.contains(&self.association)
    }
}

/// Whether a pull request is planned under `pr_plans`: `Err` says why not. Without
/// `plan_env_vars`, only trusted pull requests are planned (with `env_vars`), whatever
/// `pr_plans` says: check-config refuses `all` without them, and this holds if it did not.
pub fn may_plan_pull_request(
    pr_plans: PrPlans,
    has_plan_env_vars: bool,
    author: PullRequestAuthor<'_>,
) -> Result<(), String> {
    let why_untrusted = || {
        if author.same_repository {
            format!(
                "its author is {}, not an owner, member or collaborator",
                author.association
            )
        } else {
            "it comes from a fork".to_string()
        }
    };
    match pr_plans {
        PrPlans::Off => Err("pull request plans are off ([reconcile] pr_plans = \"off\")".into()),
        PrPlans::All if has_plan_env_vars => Ok(()),
        PrPlans::Trusted | PrPlans::All if author.trusted() => Ok(()),
        PrPlans::Trusted => Err(format!(
            "pull request not planned: {} ([reconcile] pr_plans = \"trusted\")",
            why_untrusted()
        )),
        PrPlans::All => Err(format!(
            "pull request not planned: {}, and there is no [reconcile.plan_env_vars] for untrusted plans",
            why_untrusted()
        )),
    }
}

/// What reconcile and apply share: the repository, terraform, GitHub feedback, Argo CD.
pub const KIND: JobKind = JobKind::RECONCILE;
pub const SECTION: Section<Config> = Section::new("reconcile");

pub static DESCRIPTOR: KindDescriptor = KindDescriptor {
    kind: KIND,
    verbs: &[
        Verb {
            name: "plan",
            aliases: &[],
            usage: "plan [ref] [env=E]",
            summary: "terraform plan of a ref (default: the default branch); apply needs approval",
            kind: Some(KIND),
            params: Some(params),
        },
        Verb {
            name: "reconcile",
            aliases: &[],
            usage: "reconcile [env=E]",
            summary: "plan the default branch's head, apply after approval, sync Argo CD",
            kind: Some(KIND),
            params: Some(params),
        },
    ],
    config: SECTION.descriptor(),
    requires: &[],
    option_requires,
    build: |configs, context| {
        let config = SECTION.get(configs)?.clone();
        Some(std::sync::Arc::new(ReconcileHandler {
            reconciler: std::sync::Arc::new(Reconciler {
                config,
                context: context.clone(),
            }),
        }))
    },
};

/// GitHub statuses and comments are optional; two options are not.
fn option_requires(configs: &crate::sections::HandlerConfigs) -> Vec<(&'static str, Requirement)> {
    let mut needs = Vec::new();
    if let Some(config) = SECTION.get(configs) {
        if config.argocd_app.is_some() {
            needs.push((
                "reconcile.argocd_app",
                Requirement {
                    section: "kubernetes",
                    why: "Argo CD is synced through the Kubernetes API",
                },
            ));
        }
        if config.drift_issue {
            needs.push((
                "reconcile.drift_issue",
                Requirement {
                    section: "github",
                    why: "the drift issue is kept on GitHub",
                },
            ));
        }
    }
    needs
}

/// `plan [ref] [env=E]` and `reconcile [env=E]`.
fn params(args: &mut Args) -> Result<serde_json::Map<String, Value>, CommandError> {
    let mut params = serde_json::Map::new();
    let verb = args.verb_name();
    params.insert("trigger".into(), Value::from(verb));
    if verb == "plan"
        && let Some(r) = args.optional_positional()?
    {
        params.insert("ref".into(), Value::from(command::validate_git_ref(&r)?));
    }
    // An explicit environment must be the one this agent reconciles.
    if let Some(env) = args.take("env") {
        params.insert(
            "env".into(),
            Value::from(command::validate_label("env", &env)?),
        );
    }
    Ok(params)
}

pub struct Reconciler {
    pub config: Config,
    pub context: Context,
}

/// What a record keeps of a commit's first line, its author or a pull request's title, in
/// characters: they are only shown.
pub const MAX_TITLE_CHARS: usize = 200;

/// A reconcile job's result, as stored in its record; `apply` reads it back.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct PlanRecord {
    pub env: String,
    pub commit: String,
    #[serde(default)]
    pub git_ref: Option<String>,
    pub summary_headline: String,
    pub addresses: Vec<String>,
    pub changes: bool,
    /// The saved plan in the artifact store, when there is something to apply.
    #[serde(default)]
    pub plan_object: Option<String>,
    pub planned_at: chrono::DateTime<Utc>,
    /// Set when the plan tells whether infrastructure drifted from the applied commit: `true`
    /// for changes with no new commit, `false` for no changes; absent otherwise (a push).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<bool>,
    /// The commit's first line and author, read from the checkout: a job the poller or a
    /// command started has no webhook payload to take them from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_author: Option<String>,
}

impl Reconciler {
    pub fn lock(&self) -> LockRequest {
        LockRequest::write(format!("terraform:{}", self.config.env))
    }

    pub fn remote(&self) -> Remote {
        Remote {
            url: self.config.repo_url.clone(),
            token: self.context.secrets.of(&SecretKey::GithubToken).cloned(),
            env: self.context.tool_env.clone(),
        }
    }

    fn base_dir(&self) -> PathBuf {
        self.context.state_dir.join("reconcile")
    }

    fn job_dir(&self, job_id: &str) -> PathBuf {
        self.base_dir().join("jobs").join(job_id)
    }

    pub fn latest_plan_key(&self) -> String {
        format!("reconcile.latest.{}", self.config.env)
    }

    pub fn applied_commit_key(&self) -> String {
        format!("reconcile.applied.{}", self.config.env)
    }

    pub fn apply_claim_key(plan_job: &str) -> String {
        format!("reconcile.apply-claim.{plan_job}")
    }

    /// Takes the hold on `commit` before its automatic apply starts: `Ok(None)` when taken,
    /// `Ok(Some(job))` when an earlier automatic apply by `job` holds it.
    async fn hold_for_auto_apply(
        &self,
        ctx: &JobContext,
        commit: &str,
    ) -> Result<Option<String>, HandlerError> {
        let key = auto_apply_hold_key(&self.config.env, commit);
        let state = &ctx.store.state;
        let unavailable = |e: &dyn std::fmt::Display| {
            HandlerError::Retryable(format!("job store unavailable, nothing applied: {e}"))
        };
        match state.create(&key, Bytes::from(ctx.job_id.clone())).await {
            Ok(_) => Ok(None),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let holder = auto_apply_holder(state, &self.config.env, commit)
                    .await
                    .map_err(|e| unavailable(&e))?;
                // Released in between: still not ours to apply without a second look.
                Ok(Some(holder.unwrap_or_else(|| "another job".into())))
            }
            Err(e) => Err(unavailable(&e)),
        }
    }

    /// Releases the hold on `commit`: infrastructure now matches it.
    async fn release_auto_apply_hold(&self, ctx: &JobContext, commit: &str) {
        if let Err(e) = ctx
            .store
            .state
            .delete(auto_apply_hold_key(&self.config.env, commit))
            .await
        {
            tracing::warn!(error = %e, "Automatic-apply hold not released; later plans of this commit wait for approval");
        }
    }

    /// Why this job must stop: an earlier attempt of it started an automatic apply (it holds
    /// the commit it recorded), which must not run again without a person.
    async fn earlier_auto_apply(&self, ctx: &JobContext) -> Result<Option<String>, HandlerError> {
        let Some(commit) = ctx
            .jobs
            .job(&ctx.job_id)
            .await
            .map_err(HandlerError::Retryable)?
            .and_then(|view| view.commit)
        else {
            return Ok(None);
        };
        let holder = auto_apply_holder(&ctx.store.state, &self.config.env, &commit)
            .await
            .map_err(|e| {
                HandlerError::Retryable(format!("job store unavailable, nothing applied: {e}"))
            })?;
        Ok((holder.as_deref() == Some(ctx.job_id.as_str())).then_some(commit))
    }

    /// The credentials terraform gets: a pull request's speculative plan gets `plan_env_vars`
    /// when they exist, everything else `env_vars`.
    fn credentials(&self, speculative: bool) -> Vec<(String, SecretKey)> {
        match (&self.config.plan_env_vars, speculative) {
            (Some(plan_env_vars), true) => plan_env_vars
                .keys()
                .map(|name| (name.clone(), SecretKey::ReconcilePlanEnvVar(name.clone())))
                .collect(),
            _ => self
                .config
                .env_vars
                .keys()
                .map(|name| (name.clone(), SecretKey::ReconcileEnvVar(name.clone())))
                .collect(),
        }
    }

    fn terraform_env(&self, speculative: bool) -> Vec<(String, String)> {
        let mut env = self.context.tool_env.clone();
        let plugin_cache = self.base_dir().join("plugin-cache");
        let _ = std::fs::create_dir_all(&plugin_cache);
        env.push(("TF_IN_AUTOMATION".into(), "1".into()));
        env.push(("TF_INPUT".into(), "0".into()));
        env.push(("CHECKPOINT_DISABLE".into(), "1".into()));
        env.push((
            "TF_PLUGIN_CACHE_DIR".into(),
            plugin_cache.display().to_string(),
        ));
        for (name, key) in self.credentials(speculative) {
            if let Some(secret) = self.context.secrets.of(&key) {
                env.push((name, secret.expose().to_string()));
            }
        }
        env
    }

    /// A working tree of `commit`, the secret scan, the backend preflight, `terraform init`:
    /// ready to plan or apply.
    #[tracing::instrument(name = "prepare", skip_all, fields(commit = %short(commit)))]
    pub async fn prepare(
        &self,
        ctx: &JobContext,
        commit: &str,
        speculative: bool,
    ) -> Result<Terraform, HandlerError> {
        ctx.progress
            .report(&format!("checking out {}", short(commit)))
            .await;
        let dir = self
            .remote()
            .checkout(
                &self.base_dir().join("cache.git"),
                &self.job_dir(&ctx.job_id),
                commit,
                &ctx.cancel,
            )
            .await?;
        let tfdir = dir.join(&self.config.workdir);
        if !tfdir.is_dir() {
            return Err(HandlerError::Failed(format!(
                "{} does not exist at commit {}",
                self.config.workdir,
                short(commit)
            )));
        }
        self.scan_for_credentials(ctx, &dir).await?;
        self.preflight(&tfdir, speculative).await?;
        let tf = Terraform {
            bin: self.config.terraform_bin.clone(),
            dir: tfdir,
            env: self.terraform_env(speculative),
            cancel: ctx.cancel.clone(),
            grace: ctx.kill_grace,
            redactor: ctx.redactor.clone(),
        };
        ctx.progress.report("terraform init").await;
        tf.init().await?;
        Ok(tf)
    }

    #[tracing::instrument(name = "backend_preflight", skip_all)]
    async fn preflight(&self, tfdir: &Path, speculative: bool) -> Result<(), HandlerError> {
        let backend = preflight::find_backend(tfdir).map_err(HandlerError::Failed)?;
        let target = preflight::check(backend.as_ref()).map_err(|problems| {
            HandlerError::Failed(format!(
                "backend preflight failed:\n- {}",
                problems.join("\n- ")
            ))
        })?;
        // The credentials terraform will use: its env_vars (or plan_env_vars), else the [s3]
        // section's.
        let credentials = self.credentials(speculative);
        let secret = |name: &str, fallback: SecretKey| {
            credentials
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, key)| self.context.secrets.of(key))
                .or_else(|| self.context.secrets.of(&fallback))
                .map(|s| s.expose().to_string())
        };
        let id = secret("AWS_ACCESS_KEY_ID", SecretKey::S3AccessKeyId);
        let key = secret("AWS_SECRET_ACCESS_KEY", SecretKey::S3SecretAccessKey);
        preflight::reach_bucket(&target, id.as_deref(), key.as_deref())
            .await
            .map_err(|e| HandlerError::Failed(format!("backend preflight failed: {e}")))
    }

    /// Sets the commit status. A GitHub outage must neither fail nor hold up the job: the
    /// status is retried in the background until GitHub takes it.
    pub async fn status(&self, commit: &str, state: StatusState, description: &str) {
        if let Some(gh) = &self.context.github {
            gh.set_status_eventually(commit, STATUS_CONTEXT, state, description)
                .await;
        }
    }

    /// Syncs the root Application, if one is configured.
    #[tracing::instrument(name = "argocd_sync", skip_all)]
    pub async fn sync_argocd(&self, ctx: &JobContext) -> Result<Option<String>, HandlerError> {
        let Some(app) = &self.config.argocd_app else {
            return Ok(None);
        };
        let Some(client) = self.context.kube.clone() else {
            return Err(HandlerError::Failed(
                "reconcile.argocd_app is set but there is no [kubernetes] section".into(),
            ));
        };
        ctx.progress
            .report(&format!("syncing Argo CD application {app}"))
            .await;
        let report = argocd::sync(
            client,
            &self.config.argocd_namespace,
            app,
            &ctx.job_id,
            self.config.argocd_timeout.get(),
            &ctx.cancel,
        )
        .await?;
        Ok(Some(report.describe()))
    }

    /// Removes a job's working tree (the plan is in the artifact store).
    pub fn cleanup(&self, job_id: &str) {
        let dir = self.job_dir(job_id);
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "Working tree not removed");
        }
    }

    /// Applies a saved plan in a prepared working tree and records the applied commit.
    pub async fn apply_plan(
        &self,
        ctx: &JobContext,
        tf: &Terraform,
        plan: &Path,
        commit: &str,
    ) -> Result<(), HandlerError> {
        ctx.progress.report("terraform apply").await;
        tf.apply(plan).await?;
        if let Err(e) = ctx
            .store
            .state
            .put(self.applied_commit_key(), Bytes::from(commit.to_string()))
            .await
        {
            tracing::warn!(error = %e, "Applied commit not recorded; drift detection may misreport");
        }
        self.release_auto_apply_hold(ctx, commit).await;
        Ok(())
    }

    async fn plan(&self, ctx: &JobContext, job: &JobEnvelope) -> Result<Outcome, HandlerError> {
        // Checked before anything else, against the commit the earlier attempt recorded: the
        // branch may have moved since.
        if (ctx.interrupted.is_some() || ctx.attempt > 1)
            && let Some(held) = self.earlier_auto_apply(ctx).await?
        {
            let why = match &ctx.interrupted {
                Some(i) => format!(
                    "was interrupted (attempt {} on {} at {})",
                    i.attempt,
                    i.agent.as_deref().unwrap_or("an agent"),
                    i.at.to_rfc3339()
                ),
                None => "did not finish in an earlier attempt".to_string(),
            };
            let message = format!(
                "automatic apply of {} {why} and waits for a person: `plan {}`, then `apply <job-id>`. terraform may have changed infrastructure and left its state lock; it is never applied again on its own. Check with `terraform plan` and release a stale lock with `terraform force-unlock`",
                short(&held),
                held
            );
            self.status(
                &held,
                StatusState::Failure,
                "automatic apply interrupted; waits for a person",
            )
            .await;
            self.cleanup(&ctx.job_id);
            return Err(HandlerError::Failed(message));
        }
        let plan_only = job.params.get("plan_only").and_then(Value::as_bool) == Some(true);
        let trigger = job.param_str("trigger").unwrap_or("push").to_string();
        if trigger == "pull_request" {
            // Checked where the event was mapped; again here, with this agent's config, before
            // the pull request's code is fetched.
            let author = PullRequestAuthor {
                same_repository: job.params.get("same_repository").and_then(Value::as_bool)
                    == Some(true),
                association: job.param_str("author_association").unwrap_or("NONE"),
            };
            may_plan_pull_request(
                self.config.pr_plans,
                self.config.plan_env_vars.is_some(),
                author,
            )
            .map_err(HandlerError::Failed)?;
        }
        let git_ref = job.param_str("ref").map(str::to_string);
        let commit = match &job.commit {
            Some(c) => c.clone(),
            None => {
                let reference = git_ref
                    .clone()
                    .unwrap_or_else(|| self.context.default_branch.clone());
                self.remote().resolve(&reference, &ctx.cancel).await?
            }
        };
        ctx.progress.set_commit(&commit).await;
        if let Some(i) = &ctx.interrupted {
            // A plan changes nothing: planning again from the start is safe.
            ctx.progress
                .report(&format!(
                    "attempt {} was interrupted; planning again",
                    i.attempt
                ))
                .await;
        }
        self.status(
            &commit,
            StatusState::Pending,
            &format!("planning (job {})", ctx.job_id),
        )
        .await;
        let result = self
            .plan_at(ctx, job, &commit, plan_only, &trigger, git_ref)
            .await;
        match &result {
            Ok(_) => {}
            Err(HandlerError::Cancelled) => {
                self.status(&commit, StatusState::Error, "cancelled").await;
            }
            Err(e) => {
                self.status(
                    &commit,
                    StatusState::Failure,
                    &e.user_message(&ctx.trace_id),
                )
                .await;
            }
        }
        // The saved plan is in the artifact store; an apply checks the commit out again.
        self.cleanup(&ctx.job_id);
        result
    }

    async fn plan_at(
        &self,
        ctx: &JobContext,
        job: &JobEnvelope,
        commit: &str,
        plan_only: bool,
        trigger: &str,
        git_ref: Option<String>,
    ) -> Result<Outcome, HandlerError> {
        let tf = self.prepare(ctx, commit, plan_only).await?;
        let (commit_title, commit_author) = self
            .remote()
            .describe(&self.job_dir(&ctx.job_id), &ctx.cancel)
            .await
            .unzip();
        ctx.progress.report("terraform fmt -check, validate").await;
        tf.fmt_check().await?;
        tf.validate().await?;
        ctx.progress.report("terraform plan").await;
        let plan_path = tf.dir.join("infraflux.tfplan");
        let changes = tf.plan(&plan_path).await?;
        let json = tf.show_json(&plan_path).await?;
        for value in terraform::sensitive_values(&json) {
            ctx.redactor.register(&crate::secret::Secret::new(value));
        }
        let summary = terraform::summarize(&json);
        let changes = changes && summary.has_changes();
        let mut record = PlanRecord {
            env: self.config.env.clone(),
            commit: commit.to_string(),
            git_ref,
            summary_headline: if changes {
                summary.headline()
            } else {
                "no changes".into()
            },
            addresses: summary.addresses.clone(),
            changes,
            plan_object: None,
            planned_at: Utc::now(),
            drift: None,
            commit_title,
            commit_author,
        };

        let applied = ctx
            .store
            .state
            .get(self.applied_commit_key())
            .await
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let mut facts = PlanFacts {
            plan_only,
            changes,
            auto_apply: self.config.auto_apply,
            trigger,
            commit,
            applied: applied.as_deref(),
            hold: Hold::Untried,
        };
        record.drift = drift(&facts);
        if let Some(drift) = record.drift {
            if drift {
                ctx.progress
                    .report(&format!(
                        "drift detected at {}: {}",
                        short(commit),
                        summary.headline()
                    ))
                    .await;
            }
            self.report_drift(ctx, &record, drift).await;
        }
        loop {
            match next_step(&facts) {
                NextStep::Comment => {
                    let text = tf.show_text(&plan_path).await?;
                    self.comment_on_pull_request(ctx, job, commit, &summary, &text)
                        .await;
                    self.status(
                        commit,
                        StatusState::Success,
                        &format!("plan: {} (not applied)", record.summary_headline),
                    )
                    .await;
                    return Ok(Outcome::Succeeded {
                        message: format!("speculative plan: {}", record.summary_headline),
                        result: to_value(&record),
                    });
                }
                NextStep::Settle { release_hold } => {
                    if release_hold {
                        self.release_auto_apply_hold(ctx, commit).await;
                    }
                    let synced = self.sync_argocd(ctx).await?;
                    self.status(commit, StatusState::Success, "no changes")
                        .await;
                    let mut message = "plan: no changes".to_string();
                    if let Some(s) = synced {
                        message.push_str(&format!("; {s}"));
                    }
                    return Ok(Outcome::Succeeded {
                        message,
                        result: to_value(&record),
                    });
                }
                NextStep::TakeHold => {
                    facts.hold = match self.hold_for_auto_apply(ctx, commit).await? {
                        None => Hold::Taken,
                        Some(holder) => Hold::HeldBy(holder),
                    };
                }
                NextStep::AutoApply => {
                    self.status(commit, StatusState::Pending, "applying (auto_apply)")
                        .await;
                    let applied = self.apply_plan(ctx, &tf, &plan_path, commit).await;
                    self.cleanup(&ctx.job_id);
                    if let Err(e) = applied {
                        return Err(auto_apply_failed(ctx, commit, e));
                    }
                    let synced = self.sync_argocd(ctx).await?;
                    self.status(
                        commit,
                        StatusState::Success,
                        &format!("applied: {}", summary.headline()),
                    )
                    .await;
                    let mut message = format!(
                        "applied without approval (auto_apply): {}",
                        summary.headline()
                    );
                    if let Some(s) = synced {
                        message.push_str(&format!("; {s}"));
                    }
                    return Ok(Outcome::Succeeded {
                        message,
                        result: to_value(&record),
                    });
                }
                NextStep::AwaitApproval { held_by } => {
                    return self
                        .await_approval(ctx, commit, &plan_path, &summary, record, held_by)
                        .await;
                }
            }
        }
    }

    /// Saves the plan as the env's newest, for `apply <job-id>`.
    async fn await_approval(
        &self,
        ctx: &JobContext,
        commit: &str,
        plan_path: &Path,
        summary: &PlanSummary,
        mut record: PlanRecord,
        held_by: Option<String>,
    ) -> Result<Outcome, HandlerError> {
        let object = format!("plans/{}", ctx.job_id);
        let bytes = std::fs::read(plan_path)
            .map_err(|e| HandlerError::Internal(format!("reading the saved plan: {e}")))?;
        let mut reader = std::io::Cursor::new(bytes);
        ctx.store
            .artifacts
            .put(object.as_str(), &mut reader)
            .await
            .map_err(|e| HandlerError::Retryable(format!("storing the plan: {e}")))?;
        record.plan_object = Some(object);
        // The newest plan of this env: an older one can no longer be applied.
        ctx.store
            .state
            .put(self.latest_plan_key(), Bytes::from(ctx.job_id.clone()))
            .await
            .map_err(|e| HandlerError::Retryable(format!("recording the plan: {e}")))?;
        self.status(
            commit,
            StatusState::Pending,
            &format!("awaiting approval: apply {}", ctx.job_id),
        )
        .await;
        let not_automatic = held_by
            .map(|holder| {
                format!(
                    "; not applied automatically: the automatic apply of {} by job {holder} failed or was interrupted",
                    short(commit)
                )
            })
            .unwrap_or_default();
        Ok(Outcome::AwaitingApproval {
            message: format!(
                "plan: {}{not_automatic}; approve with `apply {}` within {}",
                summary.headline(),
                ctx.job_id,
                self.config.plan_ttl
            ),
            result: to_value(&record),
        })
    }

    #[tracing::instrument(name = "pull_request_comment", skip_all)]
    async fn comment_on_pull_request(
        &self,
        ctx: &JobContext,
        job: &JobEnvelope,
        commit: &str,
        summary: &PlanSummary,
        text: &str,
    ) {
        let (Some(gh), Some(number)) = (
            &self.context.github,
            job.params.get("pull_request").and_then(Value::as_u64),
        ) else {
            return;
        };
        let parts = report::PlanComment {
            env: &self.config.env,
            commit,
            job_id: &ctx.job_id,
            trace_id: &ctx.trace_id,
            summary,
            plan_text: text,
        }
        .render(&ctx.redactor);
        // Retried in the background while GitHub fails, as the status is.
        gh.upsert_comments_eventually(number, &report::marker(&self.config.env), parts)
            .await;
    }

    async fn report_drift(&self, ctx: &JobContext, record: &PlanRecord, drift: bool) {
        if !self.config.drift_issue {
            return;
        }
        let Some(gh) = &self.context.github else {
            return;
        };
        let title = format!("Drift detected in {}", self.config.env);
        let body = format!(
            "A plan of `{}` with no new commit has changes: {}.\n\n{}\n\nJob `{}`, trace `{}`. This issue is closed when a plan finds no drift.",
            short(&record.commit),
            record.summary_headline,
            record
                .addresses
                .iter()
                .map(|a| format!("- `{a}`"))
                .collect::<Vec<_>>()
                .join("\n"),
            ctx.job_id,
            ctx.trace_id
        );
        let marker = format!("infraflux:drift:{}", self.config.env);
        // Retried in the background while GitHub fails, as the status is.
        gh.upsert_issue_eventually(&marker, &title, &body, drift)
            .await;
    }
}

/// What a finished plan is, for [`next_step`] and [`drift`]; all read before they are asked.
#[derive(Debug, Clone)]
struct PlanFacts<'a> {
    /// A pull request's speculative plan.
    plan_only: bool,
    changes: bool,
    auto_apply: bool,
    /// What asked for the plan: `push`, `plan`, `reconcile`...
    trigger: &'a str,
    commit: &'a str,
    /// The commit last applied in this env.
    applied: Option<&'a str>,
    hold: Hold,
}

/// The automatic-apply hold on the planned commit.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hold {
    /// Not asked for yet: taking it is a write, done only when [`NextStep::TakeHold`] asks.
    Untried,
    /// Taken by this job: the commit is ours to apply.
    Taken,
    /// Held by this job, whose automatic apply of the commit failed or was interrupted (or
    /// still runs).
    HeldBy(String),
}

/// What follows a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NextStep {
    /// A pull request's plan: comment on it and succeed; it is never applied.
    Comment,
    /// Infrastructure matches the commit: release its automatic-apply hold when
    /// `release_hold`, sync Argo CD and succeed.
    Settle { release_hold: bool },
    /// Changes to apply on their own: take the commit's hold first, then ask again.
    TakeHold,
    /// Apply the plan now, without approval: the hold is this job's.
    AutoApply,
    /// Save the plan and wait for `apply <job-id>`; `held_by` names the job whose automatic
    /// apply of the commit failed or was interrupted.
    AwaitApproval { held_by: Option<String> },
}

/// What follows a plan. An automatic apply runs once per commit: the hold is taken before
/// terraform starts and stays if the apply fails or is interrupted, so a redelivery, a re-plan
/// or a retry never applies the commit again; it then waits for a person like any plan. Pure:
/// the edge reads the facts, takes the hold when asked, and acts on the answer.
fn next_step(facts: &PlanFacts<'_>) -> NextStep {
    if facts.plan_only {
        return NextStep::Comment;
    }
    if !facts.changes {
        return NextStep::Settle {
            release_hold: facts.auto_apply,
        };
    }
    if !facts.auto_apply {
        return NextStep::AwaitApproval { held_by: None };
    }
    match &facts.hold {
        Hold::Untried => NextStep::TakeHold,
        Hold::Taken => NextStep::AutoApply,
        Hold::HeldBy(holder) => NextStep::AwaitApproval {
            held_by: Some(holder.clone()),
        },
    }
}

/// Whether the plan tells that infrastructure drifted from the applied commit: no changes is
/// no drift; changes with no new commit behind them (a `plan` or `reconcile` of the applied
/// commit) mean someone changed infrastructure by hand. `None` when it cannot tell.
fn drift(facts: &PlanFacts<'_>) -> Option<bool> {
    if facts.plan_only {
        None
    } else if !facts.changes {
        Some(false)
    } else if matches!(facts.trigger, "plan" | "reconcile") {
        Some(facts.applied == Some(facts.commit))
    } else {
        None
    }
}

/// The state-bucket key that holds `commit` once its automatic apply started: while it is set,
/// the commit is applied only by `apply <job-id>`. Cleared when an apply of it succeeds or a
/// plan of it finds no changes.
pub fn auto_apply_hold_key(env: &str, commit: &str) -> String {
    format!("reconcile.auto-apply.{env}.{commit}")
}

/// The job whose automatic apply of `commit` failed or was interrupted (or is running), if any.
pub async fn auto_apply_holder(
    state: &kv::Store,
    env: &str,
    commit: &str,
) -> Result<Option<String>, kv::EntryError> {
    Ok(state
        .get(auto_apply_hold_key(env, commit))
        .await?
        .map(|b| String::from_utf8_lossy(&b).into_owned()))
}

/// A failed automatic apply ends the job `failed`, saying that it waits for a person; one that
/// was cancelled stays cancelled. Never retryable: the runner must not run it again.
fn auto_apply_failed(ctx: &JobContext, commit: &str, e: HandlerError) -> HandlerError {
    if matches!(e, HandlerError::Cancelled) {
        return e;
    }
    if let HandlerError::Internal(detail) = &e {
        tracing::error!(error = %ctx.redactor.redact(detail), "Automatic apply failed with an internal error");
    }
    HandlerError::Failed(format!(
        "automatic apply of {} failed and waits for a person: `plan {commit}`, then `apply <job-id>`. {}",
        short(commit),
        e.user_message(&ctx.trace_id)
    ))
}

fn to_value(record: &PlanRecord) -> Value {
    serde_json::to_value(record).unwrap_or(Value::Null)
}

pub fn short(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// The `reconcile` job kind.
pub struct ReconcileHandler {
    pub reconciler: std::sync::Arc<Reconciler>,
}

#[async_trait]
impl Handler for ReconcileHandler {
    fn kind(&self) -> JobKind {
        JobKind::RECONCILE
    }

    fn locks(&self, _job: &JobEnvelope) -> Vec<LockRequest> {
        vec![self.reconciler.lock()]
    }

    fn timeout(&self) -> Duration {
        self.reconciler.config.timeout.get()
    }

    async fn admit(
        &self,
        _admission: &crate::handler::Admission<'_>,
        params: &mut serde_json::Map<String, Value>,
    ) -> Result<(), String> {
        let ours = &self.reconciler.config.env;
        match params.get("env").and_then(Value::as_str) {
            Some(env) if env != ours => Err(format!("this agent reconciles env {ours}, not {env}")),
            _ => {
                params.insert("env".into(), Value::from(ours.clone()));
                Ok(())
            }
        }
    }

    async fn run(&self, ctx: &JobContext, job: &JobEnvelope) -> Result<Outcome, HandlerError> {
        self.reconciler.plan(ctx, job).await
    }
}

/// Reads a stored plan back from a reconcile job's result.
pub fn plan_record(result: &Value) -> Option<PlanRecord> {
    serde_json::from_value(result.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "1111111111111111111111111111111111111111";
    const EARLIER: &str = "2222222222222222222222222222222222222222";

    /// A push of COMMIT with changes, auto_apply off, COMMIT not applied yet.
    fn push() -> PlanFacts<'static> {
        PlanFacts {
            plan_only: false,
            changes: true,
            auto_apply: false,
            trigger: "push",
            commit: COMMIT,
            applied: Some(EARLIER),
            hold: Hold::Untried,
        }
    }

    fn auto(hold: Hold) -> PlanFacts<'static> {
        PlanFacts {
            auto_apply: true,
            hold,
            ..push()
        }
    }

    fn awaiting(held_by: Option<&str>) -> NextStep {
        NextStep::AwaitApproval {
            held_by: held_by.map(str::to_string),
        }
    }

    #[test]
    fn what_follows_a_plan() {
        // (name, facts, next step, drift)
        let cases = [
            (
                "a pull request's plan is a comment",
                PlanFacts {
                    plan_only: true,
                    ..auto(Hold::Untried)
                },
                NextStep::Comment,
                None,
            ),
            (
                "a pull request's plan without changes is a comment too",
                PlanFacts {
                    plan_only: true,
                    changes: false,
                    trigger: "plan",
                    ..push()
                },
                NextStep::Comment,
                None,
            ),
            (
                "no changes: nothing drifted",
                PlanFacts {
                    changes: false,
                    ..push()
                },
                NextStep::Settle {
                    release_hold: false,
                },
                Some(false),
            ),
            (
                "no changes with auto_apply releases the commit's hold",
                PlanFacts {
                    changes: false,
                    ..auto(Hold::Untried)
                },
                NextStep::Settle { release_hold: true },
                Some(false),
            ),
            ("changes wait for approval", push(), awaiting(None), None),
            (
                "auto_apply takes the hold before anything",
                auto(Hold::Untried),
                NextStep::TakeHold,
                None,
            ),
            (
                "the hold taken: applied without approval",
                auto(Hold::Taken),
                NextStep::AutoApply,
                None,
            ),
            (
                "held by an earlier failed automatic apply: waits for a person",
                auto(Hold::HeldBy("01earlier".into())),
                awaiting(Some("01earlier")),
                None,
            ),
            (
                "without auto_apply a hold is not looked at",
                PlanFacts {
                    hold: Hold::HeldBy("01earlier".into()),
                    ..push()
                },
                awaiting(None),
                None,
            ),
            (
                "a plan of the applied commit with changes is drift",
                PlanFacts {
                    trigger: "plan",
                    applied: Some(COMMIT),
                    ..push()
                },
                awaiting(None),
                Some(true),
            ),
            (
                "so is a reconcile of it",
                PlanFacts {
                    trigger: "reconcile",
                    applied: Some(COMMIT),
                    ..auto(Hold::Untried)
                },
                NextStep::TakeHold,
                Some(true),
            ),
            (
                "a plan of a commit not yet applied is no drift",
                PlanFacts {
                    trigger: "plan",
                    ..push()
                },
                awaiting(None),
                Some(false),
            ),
            (
                "nothing applied yet is no drift",
                PlanFacts {
                    trigger: "reconcile",
                    applied: None,
                    ..push()
                },
                awaiting(None),
                Some(false),
            ),
            (
                "a push of the applied commit cannot tell",
                PlanFacts {
                    applied: Some(COMMIT),
                    ..push()
                },
                awaiting(None),
                None,
            ),
        ];
        for (name, facts, step, drifted) in cases {
            assert_eq!(next_step(&facts), step, "{name}");
            assert_eq!(drift(&facts), drifted, "{name}: drift");
        }
    }
}
