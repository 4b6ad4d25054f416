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
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use tokio::io::AsyncReadExt;

use crate::command::{self, Args, CommandError, Verb};
use crate::descriptor::KindDescriptor;
use crate::github::StatusState;
use crate::handler::{Admission, Handler, HandlerError, JobContext, JobView, LockRequest, Outcome};
use crate::job::{JobEnvelope, Source};
use crate::kind::JobKind;
use crate::reconcile::{Config, PlanRecord, Reconciler, plan_record, short};
use crate::settings::HumanDuration;

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

    /// Asks [`verdict`], reading the head of the plan's branch when it asks for it: a refusal
    /// is `Ok(Err(_))`, `Err` when the head cannot be read.
    async fn judge(
        &self,
        facts: ApplyFacts<'_>,
        moment: Moment<'_>,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<Result<PlanRecord, Refusal>, String> {
        let r = &self.reconciler;
        let now = Utc::now();
        let mut head = None;
        loop {
            let facts = ApplyFacts {
                head: head.as_deref(),
                ..facts
            };
            match verdict(&facts, moment, &r.config, &r.context.default_branch, now) {
                Verdict::Admit(plan) => return Ok(Ok(plan)),
                Verdict::Refuse(refusal) => return Ok(Err(refusal)),
                Verdict::ReadHead(branch) => {
                    let resolved = r
                        .remote()
                        .resolve(&branch, cancel)
                        .await
                        .map_err(|e| format!("cannot read the head of {branch}: {e}"))?;
                    head = Some(resolved);
                }
            }
        }
    }
}

/// When an apply is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment<'a> {
    /// The command arrived from `requested_by`: a refusal rejects it.
    Request { requested_by: &'a str },
    /// The apply took its locks and terraform is next; `claimed` while it still holds the
    /// plan's claim.
    Run { claimed: bool },
}

/// What an apply is judged on, all read before [`verdict`] is asked.
#[derive(Debug, Clone, Copy)]
struct ApplyFacts<'a> {
    plan_job: &'a str,
    /// The plan's job as the job book holds it; `None` when there is no such job.
    job: Option<&'a JobView>,
    /// The newest plan of the env, from the state bucket.
    latest: Option<&'a str>,
    /// The head of the plan's branch, once read: reading it needs the repository, so
    /// [`Verdict::ReadHead`] asks for it only when nothing else refuses.
    head: Option<&'a str>,
}

/// Why a plan may not be applied; the message is the one the requester sees.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Refusal {
    /// Not this plan, not now, or not by this requester.
    Refused(String),
    /// The plan no longer describes what would be applied: it aged past `plan_ttl` or its
    /// branch moved on. An apply that waited for the lock closes the plan then.
    Outdated(String),
}

impl Refusal {
    fn message(&self) -> &str {
        match self {
            Refusal::Refused(m) | Refusal::Outdated(m) => m,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    Refuse(Refusal),
    /// Read the head of this branch and ask again.
    ReadHead(String),
    Admit(PlanRecord),
}

/// Whether a plan may be applied, as the command arrives or once the apply holds its locks
/// (the plan may have been superseded, aged or overtaken by its branch while it queued). Pure:
/// the edge reads the facts, the repository only when asked, and acts on the answer.
fn verdict(
    facts: &ApplyFacts<'_>,
    moment: Moment<'_>,
    config: &Config,
    default_branch: &str,
    now: DateTime<Utc>,
) -> Verdict {
    let plan_job = facts.plan_job;
    let refused = |message: String| Verdict::Refuse(Refusal::Refused(message));
    let Some(view) = facts.job else {
        return refused(format!("job {plan_job} not found"));
    };
    let plan = plan_record(&view.result);
    if let Moment::Request { .. } = moment {
        if view.kind != JobKind::RECONCILE {
            return refused(format!("job {plan_job} is a {} job, not a plan", view.kind));
        }
        match view.state.as_str() {
            "awaiting_approval" => {}
            "succeeded" if plan.as_ref().is_some_and(|p| p.changes) => {
                return refused(format!("plan {plan_job} was already applied"));
            }
            other => {
                return refused(format!(
                    "job {plan_job} is {other}; only a plan awaiting approval can be applied"
                ));
            }
        }
    }
    let Some(plan) = plan else {
        return refused(format!("job {plan_job} holds no plan"));
    };
    let superseded = facts.latest.filter(|latest| *latest != plan_job);
    match moment {
        Moment::Request { requested_by } => {
            if plan.env != config.env {
                return refused(format!(
                    "plan {plan_job} is for env {}, this agent applies {}",
                    plan.env, config.env
                ));
            }
            if let Some(expired) = expired(plan_job, &plan, config.plan_ttl, now) {
                return Verdict::Refuse(expired);
            }
            if let Some(latest) = superseded {
                return refused(format!(
                    "plan {plan_job} was superseded by a newer plan, {latest}"
                ));
            }
            // GitHub logins are case-insensitive.
            if config.two_person_rule && view.requested_by.eq_ignore_ascii_case(requested_by) {
                return refused(format!(
                    "two-person rule: {requested_by} requested plan {plan_job} and cannot approve it"
                ));
            }
        }
        Moment::Run { claimed } => {
            if !claimed {
                return refused(format!("plan {plan_job} is claimed by another apply"));
            }
            if superseded.is_some() {
                return refused(format!(
                    "plan {plan_job} was superseded while this apply waited"
                ));
            }
            if let Some(expired) = expired(plan_job, &plan, config.plan_ttl, now) {
                return Verdict::Refuse(expired);
            }
        }
    }
    let branch = plan
        .git_ref
        .clone()
        .unwrap_or_else(|| default_branch.to_string());
    let Some(head) = facts.head else {
        return Verdict::ReadHead(branch);
    };
    if head != plan.commit {
        return Verdict::Refuse(Refusal::Outdated(format!(
            "{branch} moved from {} to {} since plan {plan_job}; plan again",
            short(&plan.commit),
            short(head)
        )));
    }
    Verdict::Admit(plan)
}

fn expired(
    plan_job: &str,
    plan: &PlanRecord,
    ttl: HumanDuration,
    now: DateTime<Utc>,
) -> Option<Refusal> {
    let age = (now - plan.planned_at).to_std().unwrap_or_default();
    (age > ttl.get()).then(|| {
        Refusal::Outdated(format!(
            "plan {plan_job} expired: it is {} old and plans may be applied within {ttl}; run `plan` again",
            humantime::format_duration(Duration::from_secs(age.as_secs())),
        ))
    })
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
        if admission.source == Source::Chatops && !self.reconciler.config.chatops_approvals {
            return Err("ChatOps approvals are off ([reconcile] chatops_approvals = false): approve with a `/infraflux apply <job-id>` comment on the commit or its pull request".into());
        }
        let plan_job = Self::plan_job(params)?;
        let view = admission.jobs.job(&plan_job).await?;
        let latest = admission
            .store
            .state
            .get(self.reconciler.latest_plan_key())
            .await
            .map_err(|e| format!("job store unavailable: {e}"))?
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let facts = ApplyFacts {
            plan_job: &plan_job,
            job: view.as_ref(),
            latest: latest.as_deref(),
            head: None,
        };
        let moment = Moment::Request {
            requested_by: admission.requested_by,
        };
        let cancel = tokio_util::sync::CancellationToken::new();
        let plan = self
            .judge(facts, moment, &cancel)
            .await?
            .map_err(|refusal| refusal.message().to_string())?;
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
        // Re-check at run time: the plan may have been superseded while this job queued, and
        // the lock wait can be long: the approval holds only for a plan still young and still
        // describing its branch when terraform is about to run.
        let view = ctx
            .jobs
            .job(&plan_job)
            .await
            .map_err(HandlerError::Retryable)?;
        let claim = ctx
            .store
            .state
            .get(Reconciler::apply_claim_key(&plan_job))
            .await
            .map_err(|e| HandlerError::Retryable(e.to_string()))?;
        let latest = ctx
            .store
            .state
            .get(r.latest_plan_key())
            .await
            .ok()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let facts = ApplyFacts {
            plan_job: &plan_job,
            job: view.as_ref(),
            latest: latest.as_deref(),
            head: None,
        };
        let moment = Moment::Run {
            claimed: claim.as_deref() == Some(ctx.job_id.as_bytes()),
        };
        let plan = match self
            .judge(facts, moment, &ctx.cancel)
            .await
            .map_err(HandlerError::Retryable)?
        {
            Ok(plan) => plan,
            Err(Refusal::Refused(why)) => return Err(HandlerError::Failed(why)),
            Err(Refusal::Outdated(why)) => {
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
        };
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
        let tf = r.prepare(ctx, &plan.commit, false).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const PLAN: &str = "01plan";
    const PLANNED: &str = "1111111111111111111111111111111111111111";
    const MOVED: &str = "2222222222222222222222222222222222222222";

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0)
            .single()
            .expect("a valid time")
    }

    fn config(two_person_rule: bool) -> Config {
        serde_json::from_value(json!({
            "repo_url": "file:///infra",
            "workdir": "terraform",
            "env": "prod",
            "plan_ttl": "24h",
            "two_person_rule": two_person_rule,
        }))
        .expect("a reconcile config")
    }

    fn plan(age_hours: i64) -> PlanRecord {
        PlanRecord {
            env: "prod".into(),
            commit: PLANNED.into(),
            git_ref: None,
            summary_headline: "1 to add, 0 to change, 0 to destroy".into(),
            addresses: vec!["null_resource.a".into()],
            changes: true,
            plan_object: Some(format!("plans/{PLAN}")),
            planned_at: now() - chrono::Duration::hours(age_hours),
            drift: None,
            commit_title: None,
            commit_author: None,
        }
    }

    /// The plan's job, requested by alice.
    fn job(kind: JobKind, state: &str, plan: Option<PlanRecord>) -> JobView {
        JobView {
            job_id: PLAN.into(),
            kind,
            state: state.into(),
            requested_by: "alice".into(),
            commit: Some(PLANNED.into()),
            params: Map::new(),
            result: plan.map_or(Value::Null, |p| json!(p)),
            created_at: now(),
        }
    }

    fn awaiting(plan: PlanRecord) -> Option<JobView> {
        Some(job(JobKind::RECONCILE, "awaiting_approval", Some(plan)))
    }

    fn refused(message: &str) -> Verdict {
        Verdict::Refuse(Refusal::Refused(message.into()))
    }

    fn outdated(message: &str) -> Verdict {
        Verdict::Refuse(Refusal::Outdated(message.into()))
    }

    #[test]
    fn whether_a_plan_may_be_applied() {
        let bob = Moment::Request {
            requested_by: "bob",
        };
        let alice = Moment::Request {
            requested_by: "alice",
        };
        let run = Moment::Run { claimed: true };
        let released = PlanRecord {
            git_ref: Some("release".into()),
            ..plan(1)
        };
        let elsewhere = PlanRecord {
            env: "staging".into(),
            ..plan(1)
        };
        let no_changes = PlanRecord {
            changes: false,
            plan_object: None,
            ..plan(1)
        };
        let moved = "main moved from 111111111111 to 222222222222 since plan 01plan; plan again";
        let expired = "plan 01plan expired: it is 1day 1h old and plans may be applied within 24h; run `plan` again";
        // (name, the plan's job, newest plan, branch head, when, two-person rule, verdict)
        let cases = [
            (
                "everything else holds: the head is read last",
                awaiting(plan(1)),
                Some(PLAN),
                None,
                bob,
                true,
                Verdict::ReadHead("main".into()),
            ),
            (
                "the plan's own ref is the branch that must not move",
                awaiting(released.clone()),
                Some(PLAN),
                None,
                bob,
                true,
                Verdict::ReadHead("release".into()),
            ),
            (
                "the head is still the planned commit",
                awaiting(plan(1)),
                Some(PLAN),
                Some(PLANNED),
                bob,
                true,
                Verdict::Admit(plan(1)),
            ),
            (
                "no newest plan recorded is no newer plan",
                awaiting(plan(1)),
                None,
                Some(PLANNED),
                bob,
                true,
                Verdict::Admit(plan(1)),
            ),
            (
                "the branch moved",
                awaiting(plan(1)),
                Some(PLAN),
                Some(MOVED),
                bob,
                true,
                outdated(moved),
            ),
            (
                "no such job",
                None,
                Some(PLAN),
                Some(PLANNED),
                bob,
                true,
                refused("job 01plan not found"),
            ),
            (
                "not a reconcile job",
                Some(job(JobKind::APPLY, "awaiting_approval", Some(plan(1)))),
                Some(PLAN),
                Some(PLANNED),
                bob,
                true,
                refused("job 01plan is a apply job, not a plan"),
            ),
            (
                "a plan with changes that succeeded was applied",
                Some(job(JobKind::RECONCILE, "succeeded", Some(plan(1)))),
                Some(PLAN),
                Some(PLANNED),
                bob,
                true,
                refused("plan 01plan was already applied"),
            ),
            (
                "a plan without changes never awaited approval",
                Some(job(JobKind::RECONCILE, "succeeded", Some(no_changes))),
                Some(PLAN),
                Some(PLANNED),
                bob,
                true,
                refused("job 01plan is succeeded; only a plan awaiting approval can be applied"),
            ),
            (
                "a plan still running",
                Some(job(JobKind::RECONCILE, "running", None)),
                Some(PLAN),
                Some(PLANNED),
                bob,
                true,
                refused("job 01plan is running; only a plan awaiting approval can be applied"),
            ),
            (
                "awaiting approval without a plan",
                Some(job(JobKind::RECONCILE, "awaiting_approval", None)),
                Some(PLAN),
                Some(PLANNED),
                bob,
                true,
                refused("job 01plan holds no plan"),
            ),
            (
                "another env's plan",
                awaiting(elsewhere),
                Some(PLAN),
                Some(PLANNED),
                bob,
                true,
                refused("plan 01plan is for env staging, this agent applies prod"),
            ),
            (
                "older than plan_ttl",
                awaiting(plan(25)),
                Some(PLAN),
                Some(PLANNED),
                bob,
                true,
                outdated(expired),
            ),
            (
                "exactly plan_ttl old is still in time",
                awaiting(plan(24)),
                Some(PLAN),
                None,
                bob,
                true,
                Verdict::ReadHead("main".into()),
            ),
            (
                "expiry is told before a newer plan",
                awaiting(plan(25)),
                Some("01newer"),
                Some(PLANNED),
                bob,
                true,
                outdated(expired),
            ),
            (
                "a newer plan supersedes it",
                awaiting(plan(1)),
                Some("01newer"),
                Some(PLANNED),
                bob,
                true,
                refused("plan 01plan was superseded by a newer plan, 01newer"),
            ),
            (
                "the requester may not approve under the two-person rule",
                awaiting(plan(1)),
                Some(PLAN),
                Some(PLANNED),
                alice,
                true,
                refused("two-person rule: alice requested plan 01plan and cannot approve it"),
            ),
            (
                "the requester may approve without the two-person rule",
                awaiting(plan(1)),
                Some(PLAN),
                Some(PLANNED),
                alice,
                false,
                Verdict::Admit(plan(1)),
            ),
            (
                "at run: the job is gone",
                None,
                Some(PLAN),
                Some(PLANNED),
                run,
                true,
                refused("job 01plan not found"),
            ),
            (
                "at run: no plan in it",
                Some(job(JobKind::RECONCILE, "awaiting_approval", None)),
                Some(PLAN),
                Some(PLANNED),
                run,
                true,
                refused("job 01plan holds no plan"),
            ),
            (
                "at run: another apply took the claim",
                awaiting(plan(1)),
                Some(PLAN),
                Some(PLANNED),
                Moment::Run { claimed: false },
                true,
                refused("plan 01plan is claimed by another apply"),
            ),
            (
                "at run: superseded while waiting",
                awaiting(plan(1)),
                Some("01newer"),
                Some(PLANNED),
                run,
                true,
                refused("plan 01plan was superseded while this apply waited"),
            ),
            (
                "at run: expired while waiting",
                awaiting(plan(25)),
                Some(PLAN),
                Some(PLANNED),
                run,
                true,
                outdated(expired),
            ),
            (
                "at run: the head is read last",
                awaiting(plan(1)),
                Some(PLAN),
                None,
                run,
                true,
                Verdict::ReadHead("main".into()),
            ),
            (
                "at run: the branch moved while waiting",
                awaiting(plan(1)),
                Some(PLAN),
                Some(MOVED),
                run,
                true,
                outdated(moved),
            ),
            (
                "at run: the requester is not asked again",
                awaiting(plan(1)),
                Some(PLAN),
                Some(PLANNED),
                run,
                true,
                Verdict::Admit(plan(1)),
            ),
        ];
        for (name, job, latest, head, moment, two_person_rule, want) in cases {
            let facts = ApplyFacts {
                plan_job: PLAN,
                job: job.as_ref(),
                latest,
                head,
            };
            let got = verdict(&facts, moment, &config(two_person_rule), "main", now());
            assert_eq!(got, want, "{name}");
        }
    }
}
