//! Approvals from GitHub: a `/infraflux apply [job-id]` comment on a commit or on a pull
//! request. GitHub authenticates who wrote it (the event is signed, or came over NATS from the
//! runner); the agent checks that the login may approve (`[reconcile] approvers`, else write
//! permission on the repository), finds the plan, and queues the apply through the same
//! admission as ChatOps `apply` (plan current, two-person rule). Every command gets a comment
//! back: accepted, with the apply's job id, or refused, with why.
//!
//! One comment is one approval: its id is the apply's idempotency key, so a redelivery (or the
//! same comment over the webhook and over NATS) finds the job already queued and answers
//! nothing new.

use std::sync::Arc;

use bytes::Bytes;
use infraflux_handlers::github::CommentTarget;
use infraflux_handlers::reconcile::{self, short};
use infraflux_handlers::{JobKind, Source};
use serde_json::{Map, Value, json};
use tracing::Instrument;

use crate::app::App;
use crate::chatops::{Command, CommandRejected, submit_command};
use crate::config::GithubSection;
use crate::github::{Accepted, COMMENT_COMMAND, CommentCommand, CommentedOn};
use crate::ingest::{IngestError, Submitted};
use crate::records::JobState;
use crate::telemetry;

/// Marks the agent's answers; an answer never starts with [`COMMENT_COMMAND`], so it is never
/// read as a command itself.
const ANSWER_MARKER: &str = "<!-- infraflux:approval -->";

/// Permissions that may approve when `approvers` is absent.
const WRITE_PERMISSIONS: &[&str] = &["admin", "maintain", "write"];

/// How many plans awaiting approval are looked through for a pull request's newest one.
const PLANS_LOOKED_AT: usize = 50;

/// Judges one comment command and answers it on GitHub.
pub(crate) async fn answer(
    app: &Arc<App>,
    github: &GithubSection,
    source: Source,
    command: CommentCommand,
) -> Result<Accepted, IngestError> {
    let Some(config) = reconcile::SECTION.get(&app.config.handlers) else {
        return Ok(Accepted::Ignored(
            "reconcile is not configured on this agent: nothing to approve".into(),
        ));
    };
    let key = format!(
        "approval.{}.{}.{}",
        github.repo.to_ascii_lowercase(),
        command.on.kind(),
        command.comment_id
    );
    if let Some(job_id) = app.ingest.submitted(&key).await? {
        return Ok(Accepted::Duplicate { job_id });
    }
    let span = tracing::info_span!(
        "approval",
        login = %command.login,
        on = command.on.kind(),
        comment_id = command.comment_id
    );
    let judged = judge(app, config, source, &command, &key)
        .instrument(span)
        .await;
    match judged {
        Ok(Submitted::Created { job_id }) => {
            let body = format!(
                "{ANSWER_MARKER}\nApproved by @{}: apply job `{job_id}` is queued. Follow it with `job {job_id}`.",
                command.login
            );
            reply(app, &command.on, command.comment_id, &body).await;
            Ok(Accepted::Created { job_id })
        }
        Ok(Submitted::Duplicate { job_id }) => Ok(Accepted::Duplicate { job_id }),
        Err(CommandRejected::Unavailable(e)) => Err(IngestError::Unavailable(e)),
        Err(CommandRejected::Refused(why)) => {
            tracing::info!(login = %command.login, reason = %why, "Approval refused");
            // One answer per comment, also when it is delivered again.
            let answered = app
                .handler_store()
                .state
                .create(format!("{key}.refused"), Bytes::from_static(b"1"))
                .await
                .is_ok();
            if answered {
                let body = format!(
                    "{ANSWER_MARKER}\nNot applied: {why}. (`{COMMENT_COMMAND} apply` from @{})",
                    command.login
                );
                reply(app, &command.on, command.comment_id, &body).await;
            }
            Ok(Accepted::Ignored(format!("approval refused: {why}")))
        }
    }
}

async fn judge(
    app: &Arc<App>,
    config: &reconcile::Config,
    source: Source,
    command: &CommentCommand,
    key: &str,
) -> Result<Submitted, CommandRejected> {
    let refused = |why: String| Err(CommandRejected::Refused(why));
    if let Some(problem) = &command.problem {
        return refused(problem.clone());
    }
    if source != Source::Webhook {
        confirm_with_github(app, command).await?;
    }
    authorize(app, config, &command.login).await?;
    let commits = match &command.on {
        CommentedOn::Commit(sha) => vec![sha.clone()],
        CommentedOn::PullRequest(number) => {
            let Some(gh) = &app.services.github else {
                return refused(format!(
                    "pull request #{number} cannot be read: [github] has no token"
                ));
            };
            gh.pull_request_commits(*number)
                .await
                .map_err(|e| CommandRejected::Unavailable(e.to_string()))?
        }
    };
    let where_ = match &command.on {
        CommentedOn::Commit(sha) => format!("commit {}", short(sha)),
        CommentedOn::PullRequest(n) => format!("pull request #{n}"),
    };
    let plan_job = match &command.plan_job {
        Some(id) => {
            // The comment approves what it sits on: a plan of another commit is not approved
            // from here, so an approver never approves something other than what they read.
            let plan = app
                .records
                .get(id)
                .await
                .map_err(|e| CommandRejected::Unavailable(e.to_string()))?;
            if let Some((record, _)) = plan
                && let Some(commit) = plan_commit(&record)
                && !commits.iter().any(|c| c.eq_ignore_ascii_case(&commit))
            {
                return refused(format!(
                    "plan {id} is of commit {}, not of {where_}",
                    short(&commit)
                ));
            }
            id.clone()
        }
        None => {
            let waiting = app
                .records
                .list(
                    Some(JobKind::RECONCILE),
                    Some(JobState::AwaitingApproval.as_str()),
                    PLANS_LOOKED_AT,
                )
                .await
                .map_err(|e| CommandRejected::Unavailable(e.to_string()))?;
            let newest = waiting.iter().find(|r| {
                plan_commit(r).is_some_and(|c| commits.iter().any(|x| x.eq_ignore_ascii_case(&c)))
            });
            match newest {
                Some(record) => record.job_id.clone(),
                None => {
                    return refused(format!(
                        "no plan of {where_} awaits approval; name one with `{COMMENT_COMMAND} apply <job-id>`"
                    ));
                }
            }
        }
    };
    let mut params = Map::new();
    params.insert("plan_job".into(), Value::from(plan_job));
    params.insert(
        "approved_on".into(),
        json!({"on": command.on.kind(), "comment_id": command.comment_id}),
    );
    submit_command(
        app,
        Command {
            kind: JobKind::APPLY,
            params,
            requested_by: command.login.clone(),
            source,
            idempotency: Some(key.to_string()),
            traceparent: telemetry::current_traceparent(),
        },
    )
    .await
}

/// A webhook is signed by GitHub; an event forwarded over NATS is only as good as the
/// forwarder's credential. So a comment that came another way is read back from GitHub, and
/// approves only if GitHub holds it, written by that login, saying that command.
async fn confirm_with_github(
    app: &Arc<App>,
    command: &CommentCommand,
) -> Result<(), CommandRejected> {
    let refused = |why: &str| {
        Err(CommandRejected::Refused(format!(
            "the comment came over NATS and {why}, so it approves nothing"
        )))
    };
    let Some(gh) = &app.services.github else {
        return refused("the agent has no [github] token to confirm it with GitHub");
    };
    let on_commit = matches!(command.on, CommentedOn::Commit(_));
    let (login, body) = match gh.comment(on_commit, command.comment_id).await {
        Ok(found) => found,
        Err(infraflux_handlers::github::GitHubError::Api { status: 404, .. }) => {
            return refused("GitHub has no such comment");
        }
        Err(e) => return Err(CommandRejected::Unavailable(e.to_string())),
    };
    if !login.eq_ignore_ascii_case(&command.login) {
        return refused("GitHub says another login wrote it");
    }
    let words = crate::github::command_words(&body).unwrap_or_default();
    let apply = words.first() == Some(&"apply");
    let same_plan = words.get(1).copied() == command.plan_job.as_deref();
    if !(apply && same_plan && words.len() <= 2) {
        return refused("GitHub holds a different text for it");
    }
    Ok(())
}

/// Whether `login` may approve: one of `approvers`, or, without that list, a login with write
/// permission on the repository.
async fn authorize(
    app: &Arc<App>,
    config: &reconcile::Config,
    login: &str,
) -> Result<(), CommandRejected> {
    if let Some(approvers) = &config.approvers {
        return if approvers.iter().any(|a| a.eq_ignore_ascii_case(login)) {
            Ok(())
        } else {
            Err(CommandRejected::Refused(format!(
                "{login} is not one of [reconcile] approvers"
            )))
        };
    }
    let Some(gh) = &app.services.github else {
        return Err(CommandRejected::Refused(
            "there is no [reconcile] approvers list, and without a [github] token the agent cannot ask GitHub who has write permission".into(),
        ));
    };
    let permission = gh
        .permission(login)
        .await
        .map_err(|e| CommandRejected::Unavailable(e.to_string()))?;
    if WRITE_PERMISSIONS.contains(&permission.as_str()) {
        Ok(())
    } else {
        Err(CommandRejected::Refused(format!(
            "{login} has {permission} permission on the repository; approving needs write"
        )))
    }
}

/// The commit a reconcile job planned.
fn plan_commit(record: &crate::records::JobRecord) -> Option<String> {
    record.commit.clone().or_else(|| {
        record
            .result
            .get("commit")
            .and_then(Value::as_str)
            .map(str::to_string)
    })
}

/// Answers on the commit or pull request, once per approval comment; while GitHub fails the
/// answer is retried in the background and the apply is not held up.
async fn reply(app: &Arc<App>, on: &CommentedOn, comment_id: u64, body: &str) {
    let Some(gh) = &app.services.github else {
        return;
    };
    let target = match on {
        CommentedOn::Commit(sha) => CommentTarget::Commit(sha.clone()),
        CommentedOn::PullRequest(number) => CommentTarget::Issue(*number),
    };
    gh.comment_once_eventually(target, &format!("infraflux:reply-to:{comment_id}"), body)
        .await;
}
