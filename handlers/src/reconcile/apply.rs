//! `apply`: runs the saved plan of a reconcile job awaiting approval, under the
//! `terraform:<env>` lock, then syncs Argo CD.
//!
//! Refusals happen when the command arrives (a refused apply is a rejected command, not a failed
//! job): the plan must exist and await approval, be younger than `plan_ttl`, be the newest plan
//! of its env, its branch must not have moved past it, nobody may be applying it already, and
//! with the two-person rule its requester may not approve it. An apply is never silently
//! retried: an interrupted one fails and says what to check.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use async_trait::async_trait;
use bytes::Bytes;
use chrono::Utc;
use serde_json::{Map, Value, json};
use tokio::io::AsyncReadExt;

use crate::command::{self, Args, CommandError, Verb};
use crate::descriptor::KindDescriptor;
use crate::github::StatusState;
use crate::handler::{Admission, Handler, HandlerError, JobContext, LockRequest, Outcome};
use crate::job::JobEnvelope;
use crate::kind::JobKind;
use crate::reconcile::{PlanRecord, Reconciler, plan_record, short};

pub const KIND: JobKind = JobKind::APPLY;

pub static DESCRIPTOR: KindDescriptor = KindDescriptor {
    kind: KIND,
    verbs: &[Verb {
        name: "apply",
        aliases: &[],
        usage: "apply <job-id>",
        summary: "apply the saved plan of a reconcile job awaiting approval",
        kind: Some(KIND),
        params: Some(params),
    }],
    // It runs reconcile's saved plans: the same section enables both.
    config: super::SECTION.descriptor(),
    requires: &[],
    // Reconcile's descriptor reports what the shared section's options need.
    option_requires: crate::descriptor::no_option_requires,
    build: |configs, context| {
        let config = super::SECTION.get(configs)?.clone();
        Some(Arc::new(ApplyHandler {
            reconciler: Arc::new(Reconciler {
                config,
                context: context.clone(),
            }),
        }))
    },
};

/// `apply <job-id>`.
fn params(args: &mut Args) -> Result<Map<String, Value>, CommandError> {
    let id = command::validate_job_id(&args.required_positional("the job id of a plan")?)?;
    let mut params = Map::new();
    params.insert("plan_job".into(), Value::from(id));
    Ok(params)
}

pub struct ApplyHandler {
    pub reconciler: Arc<Reconciler>,
}

impl ApplyHandler {
    fn plan_job(params: &Map<String, Value>) -> Result<String, String> {
        params
            .get("plan_job")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| "apply needs the job id of a plan".to_string())
    }

    /// Every refusal that does not depend on who else is applying.
    async fn check_plan(
        &self,
        plan_job: &str,
        requested_by: &str,
        jobs: &dyn crate::handler::JobBook,
        state: &kv::Store,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<PlanRecord, String> {
        let config = &self.reconciler.config;
        let view = jobs
            .job(plan_job)
            .await?
            .ok_or_else(|| format!("job {plan_job} not found"))?;
        if view.kind != JobKind::RECONCILE {
            return Err(format!("job {plan_job} is a {} job, not a plan", view.kind));
        }
        let plan = plan_record(&view.result);
        match view.state.as_str() {
            "awaiting_approval" => {}
            "succeeded" if plan.as_ref().is_some_and(|p| p.changes) => {
                return Err(format!("plan {plan_job} was already applied"));
            }
            other => {
                return Err(format!(
                    "job {plan_job} is {other}; only a plan awaiting approval can be applied"
                ));
            }
        }
        let plan = plan.ok_or_else(|| format!("job {plan_job} holds no plan"))?;
        if plan.env != config.env {
            return Err(format!(
                "plan {plan_job} is for env {}, this agent applies {}",
                plan.env, config.env
            ));
        }
        self.unexpired(plan_job, &plan)?;
        let latest = state
            .get(self.reconciler.latest_plan_key())
            .await
            .map_err(|e| format!("job store unavailable: {e}"))?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        if let Some(latest) = latest.filter(|l| l != plan_job) {
            return Err(format!(
                "plan {plan_job} was superseded by a newer plan, {latest}"
            ));
        }
        if config.two_person_rule && view.requested_by == requested_by {
            return Err(format!(
                "two-person rule: {requested_by} requested plan {plan_job} and cannot approve it"
            ));
        }
        if let Some(moved) = self.moved_since(plan_job, &plan, cancel).await? {
            return Err(moved);
        }
        Ok(plan)
    }

    fn unexpired(&self, plan_job: &str, plan: &PlanRecord) -> Result<(), String> {
        let ttl = self.reconciler.config.plan_ttl;
        let age = (Utc::now() - plan.planned_at).to_std().unwrap_or_default();
        if age > ttl.get() {
            return Err(format!(
                "plan {plan_job} expired: it is {} old and plans may be applied within {ttl}; run `plan` again",
                humantime::format_duration(Duration::from_secs(age.as_secs())),
            ));
        }
        Ok(())
    }

    /// Why the plan no longer describes its branch, if the branch moved past it; `Err` when the
    /// head cannot be read.
    async fn moved_since(
        &self,
        plan_job: &str,
        plan: &PlanRecord,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<String>, String> {
        let branch = plan
            .git_ref
            .clone()
            .unwrap_or_else(|| self.reconciler.context.default_branch.clone());
        let head = self
            .reconciler
            .remote()
            .resolve(&branch, cancel)
            .await
            .map_err(|e| format!("cannot read the head of {branch}: {e}"))?;
        Ok((head != plan.commit).then(|| {
            format!(
                "{branch} moved from {} to {} since plan {plan_job}; plan again",
                short(&plan.commit),
                short(&head)
            )
        }))
    }
}

#[async_trait]
impl Handler for ApplyHandler {
    fn kind(&self) -> JobKind {
        JobKind::APPLY
    }

    /// The state lock, and a read lock on the cluster: an apply changes what runs on it, so a
    /// rolling upgrade (which writes the cluster lock) and an apply never overlap.
    fn locks(&self, _job: &JobEnvelope) -> Vec<LockRequest> {
        vec![
            self.reconciler.lock(),
            LockRequest::read(format!("cluster:{}", self.reconciler.context.cluster)),
        ]
    }

    fn timeout(&self) -> Duration {
        self.reconciler.config.timeout.get()
    }

    async fn admit(
        &self,
        admission: &Admission<'_>,
        params: &mut Map<String, Value>,
    ) -> Result<(), String> {
        let plan_job = Self::plan_job(params)?;
        let cancel = tokio_util::sync::CancellationToken::new();
        let plan = self
            .check_plan(
                &plan_job,
                admission.requested_by,
                admission.jobs,
                &admission.store.state,
                &cancel,
            )
            .await?;
        // One apply per plan: the claim is taken atomically; a claim whose job never started
        // or ended badly may be taken over.
        let key = Reconciler::apply_claim_key(&plan_job);
        let state = &admission.store.state;
        let mine = Bytes::from(admission.job_id.to_string());
        loop {
            match state.create(&key, mine.clone()).await {
                Ok(_) => break,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("job store unavailable: {e}")),
            }
            let entry = state
                .entry(&key)
                .await
                .map_err(|e| format!("job store unavailable: {e}"))?;
            let Some(entry) = entry else { continue };
            let holder = String::from_utf8_lossy(&entry.value).into_owned();
            let live = match admission.jobs.job(&holder).await? {
                Some(j) => !matches!(j.state.as_str(), "failed" | "cancelled"),
                None => false,
            };
            if live {
                return Err(format!(
                    "plan {plan_job} is already being applied by job {holder}"
                ));
            }
            match state.update(&key, mine.clone(), entry.revision).await {
                Ok(_) => break,
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(format!("job store unavailable: {e}")),
            }
        }
        params.insert("commit".into(), json!(plan.commit));
        params.insert("env".into(), json!(plan.env));
        Ok(())
    }

    async fn run(&self, ctx: &JobContext, job: &JobEnvelope) -> Result<Outcome, HandlerError> {
        let r = &self.reconciler;
        let plan_job = Self::plan_job(&job.params).map_err(HandlerError::Failed)?;
        if let Some(i) = &ctx.interrupted {
            let message = format!(
                "an earlier attempt of this apply was interrupted (attempt {} on {} at {}): terraform may have changed infrastructure and left its state lock; an apply is never retried on its own. Check with `terraform plan`, release a stale lock with `terraform force-unlock`, then plan again",
                i.attempt,
                i.agent.as_deref().unwrap_or("an agent"),
                i.at.to_rfc3339()
            );
            let _ = ctx
                .jobs
                .settle_approval(
                    &plan_job,
                    false,
                    &format!("apply {} was interrupted", ctx.job_id),
                )
                .await;
            return Err(HandlerError::Failed(message));
        }
        // Re-check at run time: the plan may have been superseded while this job queued.
        let view = ctx
            .jobs
            .job(&plan_job)
            .await
            .map_err(HandlerError::Retryable)?
            .ok_or_else(|| HandlerError::Failed(format!("job {plan_job} not found")))?;
        let plan = plan_record(&view.result)
            .ok_or_else(|| HandlerError::Failed(format!("job {plan_job} holds no plan")))?;
        let claim = ctx
            .store
            .state
            .get(Reconciler::apply_claim_key(&plan_job))
            .await
            .map_err(|e| HandlerError::Retryable(e.to_string()))?;
        if claim.as_deref() != Some(ctx.job_id.as_bytes()) {
            return Err(HandlerError::Failed(format!(
                "plan {plan_job} is claimed by another apply"
            )));
        }
        let latest = ctx
            .store
            .state
            .get(r.latest_plan_key())
            .await
            .ok()
            .flatten();
        if latest.as_deref().is_some_and(|l| l != plan_job.as_bytes()) {
            return Err(HandlerError::Failed(format!(
                "plan {plan_job} was superseded while this apply waited"
            )));
        }
        // The lock wait can be long: the approval holds only for a plan still young and still
        // describing its branch when terraform is about to run.
        let stale = match self.unexpired(&plan_job, &plan) {
            Err(expired) => Some(expired),
            Ok(()) => self
                .moved_since(&plan_job, &plan, &ctx.cancel)
                .await
                .map_err(HandlerError::Retryable)?,
        };
        if let Some(why) = stale {
            let _ = ctx
                .jobs
                .settle_approval(
                    &plan_job,
                    false,
                    &format!("apply {} refused: {why}", ctx.job_id),
                )
                .await;
            return Err(HandlerError::Failed(format!(
                "refused while this apply waited: {why}"
            )));
        }
        ctx.progress.set_commit(&plan.commit).await;
        let object = plan
            .plan_object
            .clone()
            .ok_or_else(|| HandlerError::Failed(format!("plan {plan_job} has nothing to apply")))?;
        r.status(
            &plan.commit,
            StatusState::Pending,
            &format!("applying (job {})", ctx.job_id),
        )
        .await;
        let result = self.apply(ctx, &plan, &object).await;
        r.cleanup(&ctx.job_id);
        match result {
            Ok(synced) => {
                let _ = ctx
                    .jobs
                    .settle_approval(
                        &plan_job,
                        true,
                        &format!(
                            "applied by job {} ({} approved)",
                            ctx.job_id, job.requested_by
                        ),
                    )
                    .await;
                r.status(
                    &plan.commit,
                    StatusState::Success,
                    &format!("applied: {}", plan.summary_headline),
                )
                .await;
                let mut message = format!("applied plan {plan_job}: {}", plan.summary_headline);
                if let Some(s) = synced {
                    message.push_str(&format!("; {s}"));
                }
                Ok(Outcome::Succeeded {
                    message,
                    result: json!({"plan_job": plan_job, "commit": plan.commit, "env": plan.env}),
                })
            }
            Err(e) => {
                let reason = e.user_message(&ctx.trace_id);
                let _ = ctx
                    .jobs
                    .settle_approval(
                        &plan_job,
                        false,
                        &format!("apply {} ended: {reason}", ctx.job_id),
                    )
                    .await;
                let state = if matches!(e, HandlerError::Cancelled) {
                    StatusState::Error
                } else {
                    StatusState::Failure
                };
                r.status(&plan.commit, state, &format!("apply: {reason}"))
                    .await;
                Err(e)
            }
        }
    }
}

impl ApplyHandler {
    async fn apply(
        &self,
        ctx: &JobContext,
        plan: &PlanRecord,
        object: &str,
    ) -> Result<Option<String>, HandlerError> {
        let r = &self.reconciler;
        let tf = r.prepare(ctx, &plan.commit).await?;
        let mut stored =
            ctx.store.artifacts.get(object).await.map_err(|e| {
                HandlerError::Failed(format!("the saved plan {object} is gone: {e}"))
            })?;
        let mut bytes = Vec::new();
        stored
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| HandlerError::Retryable(format!("reading the saved plan: {e}")))?;
        let path = tf.dir.join("infraflux.tfplan");
        std::fs::write(&path, bytes).map_err(|e| HandlerError::Internal(e.to_string()))?;
        r.apply_plan(ctx, &tf, &path, &plan.commit).await?;
        r.sync_argocd(ctx).await
    }
}
