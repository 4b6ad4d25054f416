//! No missed push, even on a LAN that no webhook reaches:
//!
//! - the poller asks the infra repository (outbound `git ls-remote`) for the default branch's
//!   head every `reconcile.poll_interval` and submits a reconcile of it under the commit's
//!   idempotency key, so a commit the webhook or the workflow step already brought starts
//!   nothing; a head whose plan failed is planned again, a few times;
//! - at start and hourly, the webhook's deliveries of the last three days (GitHub's redelivery
//!   window) are listed through the GitHub API, and those that never succeeded are redelivered;
//!   they then arrive as ordinary webhooks and dedup like any other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::Utc;
use infraflux_handlers::github::{Delivery, GitHub};
use infraflux_handlers::reconcile::auto_apply_holder;
use infraflux_handlers::reconcile::workspace::Remote;
use infraflux_handlers::{JobEnvelope, JobKind, Source, new_job_id};
use serde_json::{Map, json};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::github::commit_key;
use crate::ingest::Submitted;
use crate::records::JobState;
use crate::telemetry;
use infraflux_handlers::secret::SecretKey;

/// GitHub keeps deliveries, and lets them be redelivered, for three days.
const REDELIVERY_WINDOW: chrono::Duration = chrono::Duration::days(3);
const REDELIVER_EVERY: Duration = Duration::from_secs(3600);
/// A delivery is redelivered at most this many times by the agents together.
const MAX_REDELIVERIES: u32 = 3;
/// A head whose plan failed is planned again at most this many times.
const MAX_REPLANS: u32 = 3;

/// Polls the default branch until `shutdown`.
pub async fn poll(app: Arc<App>, shutdown: CancellationToken) {
    let Some(rc) = infraflux_handlers::reconcile::SECTION
        .get(&app.config.handlers)
        .cloned()
    else {
        return;
    };
    let remote = Remote {
        url: rc.repo_url.clone(),
        token: app.secrets.of(&SecretKey::GithubToken).cloned(),
        env: app.services.tool_env.clone(),
    };
    let branch = app.services.default_branch.clone();
    let repo_key = app
        .config
        .github
        .as_ref()
        .map_or_else(|| rc.repo_url.clone(), |g| g.repo.clone());
    let interval = rc.poll_interval.get();
    let mut last_seen: Option<String> = None;
    loop {
        // The webhook is the fast path; the poller is the safety net, one interval behind.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let head = match remote.resolve(&branch, &shutdown).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "Poller could not read the default branch");
                continue;
            }
        };
        if last_seen.as_deref() == Some(head.as_str()) {
            continue;
        }
        match reconcile_head(&app, &repo_key, &rc.env, &branch, &head).await {
            Ok(HeadPlan::Started(job_id)) => {
                tracing::info!(commit = %head, %job_id, "Poller started a reconcile of the head");
            }
            // Its plan may still fail; look again next interval.
            Ok(HeadPlan::InProgress) => {}
            Ok(HeadPlan::Settled) => last_seen = Some(head),
            Err(e) => tracing::warn!(error = %e, "Poller could not submit; retrying next interval"),
        }
    }
}

/// Makes sure the head has a plan: submits a reconcile under the commit's key (a duplicate of
/// whatever the webhook or the workflow step brought), and when that plan failed as a plan
/// (git, backend or terraform trouble, not an apply), submits it again, one poll interval
/// apart and at most [`MAX_REPLANS`] times. A failed automatic apply (the head is held for a
/// person) is never followed by a re-plan, so `auto_apply` cannot turn into a silent apply retry.
async fn reconcile_head(
    app: &App,
    repo_key: &str,
    env: &str,
    branch: &str,
    head: &str,
) -> Result<HeadPlan, String> {
    let base_key = commit_key(repo_key, head);
    for replan in 0..=MAX_REPLANS {
        let key = if replan == 0 {
            base_key.clone()
        } else {
            format!("{base_key}.replan-{replan}")
        };
        let mut params = Map::new();
        params.insert("trigger".into(), json!("poller"));
        params.insert("ref".into(), json!(branch));
        let span = tracing::info_span!("poller", commit = %head);
        let envelope = JobEnvelope {
            job_id: new_job_id(),
            kind: JobKind::RECONCILE,
            params,
            source: Source::Poller,
            requested_by: "poller".into(),
            idempotency_key: key,
            traceparent: Some(span.in_scope(telemetry::current_traceparent)),
            commit: Some(head.to_string()),
            created_at: Utc::now(),
        };
        let job_id = match app
            .ingest
            .submit(envelope)
            .await
            .map_err(|e| e.to_string())?
        {
            Submitted::Created { job_id } => return Ok(HeadPlan::Started(job_id)),
            Submitted::Duplicate { job_id } => job_id,
        };
        let Some((record, _)) = app.records.get(&job_id).await.map_err(|e| e.to_string())? else {
            // Accepted a moment ago; its record is on its way.
            return Ok(HeadPlan::InProgress);
        };
        match record.state {
            JobState::Queued | JobState::Waiting | JobState::Running => {
                return Ok(HeadPlan::InProgress);
            }
            JobState::Failed
                if infraflux_handlers::reconcile::plan_record(&record.result).is_none() =>
            {
                let held = auto_apply_holder(&app.store.state, env, head)
                    .await
                    .map_err(|e| e.to_string())?;
                if let Some(holder) = held {
                    tracing::info!(commit = %head, %holder, "The head's automatic apply failed; it waits for a person");
                    return Ok(HeadPlan::Settled);
                }
            }
            _ => return Ok(HeadPlan::Settled),
        }
    }
    tracing::warn!(commit = %head, "The head's plan failed {} times; waiting for a new commit or a `plan`", MAX_REPLANS + 1);
    Ok(HeadPlan::Settled)
}

enum HeadPlan {
    Started(String),
    InProgress,
    Settled,
}

/// Redelivers failed webhook deliveries at start and hourly, until `shutdown`.
pub async fn redeliver(app: Arc<App>, shutdown: CancellationToken) {
    let (Some(gh), Some(section)) = (app.services.github.clone(), app.config.github.clone()) else {
        return;
    };
    if !section.redeliver || section.token.is_none() {
        return;
    }
    loop {
        match redeliver_once(&app, &gh, section.webhook_id).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                deliveries = n,
                "Asked GitHub to redeliver failed deliveries"
            ),
            Err(e) => tracing::warn!(error = %e, "Failed deliveries not checked"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(REDELIVER_EVERY) => {}
        }
    }
}

/// One pass: returns how many deliveries were redelivered.
pub async fn redeliver_once(
    app: &App,
    gh: &GitHub,
    webhook_id: Option<u64>,
) -> Result<usize, String> {
    let hook_id = match webhook_id {
        Some(id) => id,
        None => find_hook(gh).await?,
    };
    let since = Utc::now() - REDELIVERY_WINDOW;
    let deliveries = gh
        .deliveries(hook_id, since)
        .await
        .map_err(|e| e.to_string())?;
    let mut by_guid: BTreeMap<String, Vec<Delivery>> = BTreeMap::new();
    for d in deliveries {
        by_guid.entry(d.guid.clone()).or_default().push(d);
    }
    let mut redelivered = 0;
    for (guid, attempts) in by_guid {
        if attempts.iter().any(Delivery::succeeded) {
            continue;
        }
        let Some(newest) = attempts.iter().max_by_key(|d| d.delivered_at) else {
            continue;
        };
        if !claim_redelivery(app, &guid, newest.id).await {
            continue;
        }
        match gh.redeliver(hook_id, newest.id).await {
            Ok(()) => {
                tracing::info!(%guid, event = %newest.event, status = newest.status_code, "Redelivery requested");
                redelivered += 1;
            }
            Err(e) => tracing::warn!(%guid, error = %e, "Redelivery refused"),
        }
    }
    Ok(redelivered)
}

/// The repository webhook that points at an infraflux agent.
async fn find_hook(gh: &GitHub) -> Result<u64, String> {
    let hooks = gh.hooks().await.map_err(|e| e.to_string())?;
    hooks
        .iter()
        .find(|h| {
            h["config"]["url"]
                .as_str()
                .is_some_and(|u| u.trim_end_matches('/').ends_with("/webhooks/github"))
        })
        .and_then(|h| h["id"].as_u64())
        .ok_or_else(|| {
            "no repository webhook points at /webhooks/github; set github.webhook_id".into()
        })
}

/// One agent redelivers a given failed attempt, and no delivery more than [`MAX_REDELIVERIES`]
/// times: several agents, and one agent across restarts, share the count in the dedup bucket.
async fn claim_redelivery(app: &App, guid: &str, attempt_id: u64) -> bool {
    let key = crate::store::kv_key(&format!("gh-redelivery.{guid}"));
    let dedup = &app.store.dedup;
    for _ in 0..5 {
        match dedup.entry(&key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                let seen: serde_json::Value =
                    serde_json::from_slice(&entry.value).unwrap_or_default();
                let count = seen["count"].as_u64().unwrap_or(0) as u32;
                if seen["attempt"].as_u64() == Some(attempt_id) || count >= MAX_REDELIVERIES {
                    return false;
                }
                let next = json!({"attempt": attempt_id, "count": count + 1});
                match dedup
                    .update(&key, Bytes::from(next.to_string()), entry.revision)
                    .await
                {
                    Ok(_) => return true,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                    Err(_) => return false,
                }
            }
            Ok(_) => {
                let first = json!({"attempt": attempt_id, "count": 1});
                match dedup.create(&key, Bytes::from(first.to_string())).await {
                    Ok(_) => return true,
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Err(_) => return false,
                }
            }
            Err(_) => return false,
        }
    }
    false
}
