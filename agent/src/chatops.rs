//! ChatOps: request/reply on `<prefix>.cmd.<verb>`, served by a queue group of all agents.
//!
//! One subject per verb lets the NATS server's permissions decide who may run what; the verb
//! in the subject must therefore be the verb of the command, or the command is refused.

use std::sync::Arc;

use async_nats::Message;
use chrono::Utc;
use futures::StreamExt;
use infraflux_handlers::command::{self, Request};
use infraflux_handlers::{JobEnvelope, JobKind, Source, new_job_id};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::App;
use crate::ingest::Submitted;
use crate::records::{Change, JobRecord, JobState, LastResult};
use crate::telemetry;

/// A reply: `{"ok": true, "job_id", "message", "trace_id", ...}` or `{"ok": false, "error"}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Ok {
        message: String,
        job_id: Option<String>,
        trace_id: Option<String>,
        extra: Map<String, Value>,
    },
    Err(String),
}

impl Reply {
    fn ok(message: impl Into<String>) -> Self {
        Reply::Ok {
            message: message.into(),
            job_id: None,
            trace_id: None,
            extra: Map::new(),
        }
    }

    fn with(mut self, key: &str, value: Value) -> Self {
        if let Reply::Ok { extra, .. } = &mut self {
            extra.insert(key.to_string(), value);
        }
        self
    }

    pub fn to_json(&self) -> Value {
        match self {
            Reply::Ok {
                message,
                job_id,
                trace_id,
                extra,
            } => {
                let mut body = Map::new();
                body.insert("ok".into(), json!(true));
                if let Some(id) = job_id {
                    body.insert("job_id".into(), json!(id));
                }
                body.insert("message".into(), json!(message));
                if let Some(t) = trace_id {
                    body.insert("trace_id".into(), json!(t));
                }
                body.extend(extra.clone());
                Value::Object(body)
            }
            Reply::Err(error) => json!({"ok": false, "error": error}),
        }
    }
}

#[derive(Deserialize)]
struct JsonCommand {
    command: String,
    #[serde(default)]
    requested_by: Option<String>,
}

/// Serves commands until `shutdown` fires.
pub async fn serve(
    app: Arc<App>,
    shutdown: CancellationToken,
    subscribed: Subscribed,
) -> Result<(), async_nats::Error> {
    let subject = app.store.names.cmd_subject("*");
    serve_queue(app, subject, shutdown, subscribed, answer).await
}

/// Told once a server's subscription is in place: the agent says it is ready only after every
/// subscription it answers on is, or a command right after READY finds no responder.
pub type Subscribed = tokio::sync::mpsc::UnboundedSender<()>;

/// Serves request/reply on `subject` in the agents' queue group until `shutdown`: each request
/// is answered by `answer` in its own task, and requests already delivered to this agent are
/// still answered after shutdown starts.
pub async fn serve_queue<F, Fut>(
    app: Arc<App>,
    subject: String,
    shutdown: CancellationToken,
    subscribed: Subscribed,
    answer: F,
) -> Result<(), async_nats::Error>
where
    F: Fn(Arc<App>, Message) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = Value> + Send + 'static,
{
    let mut requests = app
        .store
        .client
        .queue_subscribe(subject, app.store.names.queue_group.clone())
        .await?;
    let _ = subscribed.send(());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            message = requests.next() => {
                let Some(message) = message else { break };
                let app = app.clone();
                tokio::spawn(async move {
                    let reply_to = message.reply.clone();
                    let body = answer(app.clone(), message).await;
                    if let Some(to) = reply_to {
                        let bytes = serde_json::to_vec(&body).unwrap_or_default();
                        if let Err(e) = app.store.client.publish(to, bytes.into()).await {
                            tracing::warn!(error = %e, "Reply not sent");
                        }
                    }
                });
            }
        }
    }
    let _ = requests.drain().await;
    Ok(())
}

async fn answer(app: Arc<App>, message: Message) -> Value {
    let subject_verb = message
        .subject
        .as_str()
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_string();
    let span = tracing::info_span!("command", verb = %subject_verb);
    let reply = handle(&app, &subject_verb, &message).instrument(span).await;
    let result = match &reply {
        Reply::Ok { .. } => "ok",
        Reply::Err(_) => "rejected",
    };
    app.metrics.command(&subject_verb, result);
    reply.to_json()
}

/// Who sent a command: from the JSON body, else the `Requested-By` header, else "nats".
fn requester(explicit: Option<String>, message: &Message) -> String {
    let raw = explicit
        .or_else(|| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get("Requested-By"))
                .map(|v| v.as_str().to_string())
        })
        .unwrap_or_else(|| "nats".to_string());
    // It ends up in records, events and logs: keep it short and printable.
    let clean: String = raw.chars().filter(|c| !c.is_control()).take(64).collect();
    if clean.trim().is_empty() {
        "nats".to_string()
    } else {
        clean
    }
}

async fn handle(app: &Arc<App>, subject_verb: &str, message: &Message) -> Reply {
    let Ok(body) = std::str::from_utf8(&message.payload) else {
        return Reply::Err("the command is not UTF-8 text".into());
    };
    let (text, requested_by) = if body.trim_start().starts_with('{') {
        match serde_json::from_str::<JsonCommand>(body) {
            Ok(c) => (c.command, requester(c.requested_by, message)),
            Err(e) => {
                return Reply::Err(format!(
                    "malformed JSON command: {e} (expected {{\"command\": \"...\", \"requested_by\": \"...\"}})"
                ));
            }
        }
    } else {
        (body.to_string(), requester(None, message))
    };
    let request = match command::parse(&text) {
        Ok(r) => r,
        Err(e) => return Reply::Err(e.to_string()),
    };
    // An alias is served on its verb's own subject only, so that permissions on one subject
    // per verb cannot be side-stepped through another name of the same verb.
    let verb = command::tokenize(&text).map(|l| l.verb).unwrap_or_default();
    let canonical = command::verb(&verb).map_or(verb.as_str(), |v| v.name);
    if canonical != subject_verb {
        return Reply::Err(format!(
            "this is `{verb}`, sent to the subject of `{subject_verb}`; send it to {}",
            app.store.names.cmd_subject(canonical)
        ));
    }
    let idempotency = message
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_string());
    match request {
        Request::Help { topic } => Reply::ok(command::help(topic.as_deref())),
        Request::Status => status(app).await,
        Request::Jobs { kind, state, limit } => jobs(app, kind, state.as_deref(), limit).await,
        Request::Job { id } => match app.records.get(&id).await {
            Ok(Some((record, _))) => Reply::ok(describe(&record))
                .with("job", serde_json::to_value(&record).unwrap_or(Value::Null))
                .with_job(&record),
            Ok(None) => Reply::Err(format!("job {id} not found")),
            Err(e) => Reply::Err(e.to_string()),
        },
        Request::Cancel { id } => cancel(app, &id, &requested_by).await,
        Request::Submit { kind, params } => {
            submit(app, kind, params, requested_by, idempotency).await
        }
    }
}

impl Reply {
    fn with_job(mut self, record: &JobRecord) -> Self {
        if let Reply::Ok {
            job_id, trace_id, ..
        } = &mut self
        {
            *job_id = Some(record.job_id.clone());
            *trace_id = Some(record.trace_id.clone());
        }
        self
    }
}

async fn submit(
    app: &Arc<App>,
    kind: JobKind,
    params: Map<String, Value>,
    requested_by: String,
    idempotency: Option<String>,
) -> Reply {
    let traceparent = telemetry::current_traceparent();
    let trace_id = telemetry::trace_id_of(&traceparent);
    let job = Command {
        kind,
        params,
        requested_by,
        source: Source::Chatops,
        // A client that retries with the same Nats-Msg-Id gets the same job, not a second one.
        idempotency: idempotency.map(|id| format!("cmd.{id}")),
        traceparent,
    };
    match submit_command(app, job).await {
        Ok(Submitted::Created { job_id }) => Reply::Ok {
            message: format!("queued {kind} job {job_id}"),
            job_id: Some(job_id),
            trace_id,
            extra: Map::new(),
        },
        Ok(Submitted::Duplicate { job_id }) => Reply::Ok {
            message: format!("already queued as {kind} job {job_id}"),
            job_id: Some(job_id),
            trace_id,
            extra: Map::new(),
        },
        Err(CommandRejected::Refused(e) | CommandRejected::Unavailable(e)) => Reply::Err(e),
    }
}

/// A request for a job from a person: a ChatOps command, or an approval comment on GitHub.
pub(crate) struct Command {
    pub kind: JobKind,
    pub params: Map<String, Value>,
    pub requested_by: String,
    pub source: Source,
    /// The same key gets the same job; absent: each command is new.
    pub idempotency: Option<String>,
    pub traceparent: String,
}

/// Why a command did not become a job.
#[derive(Debug)]
pub(crate) enum CommandRejected {
    /// Not configured here, or refused by its kind's admission: the requester is told why.
    Refused(String),
    /// The job store is unreachable: worth asking again.
    Unavailable(String),
}

/// Runs the kind's admission (an apply's plan must be current), then stores the job.
pub(crate) async fn submit_command(
    app: &Arc<App>,
    command: Command,
) -> Result<Submitted, CommandRejected> {
    let Command {
        kind,
        mut params,
        requested_by,
        source,
        idempotency,
        traceparent,
    } = command;
    let Ok(handler) = app.registry.get(kind) else {
        return Err(CommandRejected::Refused(format!(
            "{kind} is not configured on this agent: add a [{}] section to enable it",
            kind.config_section()
        )));
    };
    let job_id = new_job_id();
    let store = app.handler_store();
    let book = app.job_book();
    let admission = infraflux_handlers::Admission {
        job_id: &job_id,
        requested_by: &requested_by,
        source,
        jobs: &book,
        store: &store,
    };
    handler
        .admit(&admission, &mut params)
        .await
        .map_err(CommandRejected::Refused)?;
    let envelope = JobEnvelope {
        idempotency_key: idempotency.unwrap_or_else(|| format!("cmd.{job_id}")),
        job_id,
        kind,
        params,
        source,
        requested_by,
        traceparent: Some(traceparent),
        commit: None,
        created_at: Utc::now(),
    };
    app.ingest
        .submit(envelope)
        .await
        .map_err(|e| CommandRejected::Unavailable(e.to_string()))
}

/// `home: succeeded 3h ago (job …); last success 3h ago, RTO 4 m 12 s, data age 26 h 0 m`.
fn target_line(last: &LastResult, now: chrono::DateTime<Utc>) -> String {
    let mut line = format!(
        "{}: {} {} ago (job {})",
        last.target.as_deref().unwrap_or_default(),
        last.state.as_str(),
        age(now - last.at),
        last.job_id
    );
    match last.last_success_at {
        Some(at) => line.push_str(&format!("; last success {} ago", age(now - at))),
        None => line.push_str("; never succeeded"),
    }
    for (name, label) in [("rto_seconds", "RTO"), ("data_age_seconds", "data age")] {
        if let Some(seconds) = last.last_success_figures.get(name) {
            line.push_str(&format!(
                ", {label} {}",
                age(chrono::Duration::seconds(*seconds as i64))
            ));
        }
    }
    line
}

async fn cancel(app: &Arc<App>, id: &str, by: &str) -> Reply {
    let before = match app.records.get(id).await {
        Ok(Some((r, _))) => r,
        Ok(None) => return Reply::Err(format!("job {id} not found")),
        Err(e) => return Reply::Err(e.to_string()),
    };
    if before.state.is_terminal() {
        return Reply::Err(format!("job {id} already {}", before.state.as_str()));
    }
    let by = by.to_string();
    let written = app
        .records
        .transition(id, |r| {
            if r.state.is_terminal() {
                return Change::Keep;
            }
            r.cancel_requested_by = Some(by.clone());
            // Nobody holds a queued, approval-pending or deferred job (one waiting for a time,
            // not a lock): end it here. Jobs waiting for locks and running jobs are ended by
            // the agent that holds them, once their handler has stopped.
            let deferred = r.state == JobState::Waiting && r.not_before.is_some();
            if deferred || matches!(r.state, JobState::Queued | JobState::AwaitingApproval) {
                r.state = JobState::Cancelled;
                r.message = format!("cancelled by {by}");
                r.finished_at = Some(Utc::now());
            } else {
                r.message = format!("cancel requested by {by}");
            }
            Change::Write
        })
        .await;
    let record = match written {
        Ok(r) => r,
        Err(e) => return Reply::Err(e.to_string()),
    };
    if record.state.is_terminal() && before.not_before.is_some() {
        let _ = app.records.forget_deferral(id).await;
    }
    if !record.state.is_terminal() {
        let notice = json!({"job_id": id, "by": by});
        if let Err(e) = app
            .store
            .client
            .publish(
                app.store.names.cancel_subject(),
                serde_json::to_vec(&notice).unwrap_or_default().into(),
            )
            .await
        {
            tracing::warn!(error = %e, "Cancel broadcast not sent; the running agent sees the record");
        }
    }
    let message = if record.state == JobState::Cancelled {
        format!("job {id} cancelled")
    } else {
        format!(
            "cancel requested for job {id} ({} on {})",
            record.state.as_str(),
            record.agent.as_deref().unwrap_or("an agent")
        )
    };
    Reply::ok(message).with_job(&record)
}

async fn jobs(app: &Arc<App>, kind: Option<JobKind>, state: Option<&str>, limit: usize) -> Reply {
    match app.records.list(kind, state, limit).await {
        Ok(records) => {
            let lines: Vec<String> = records.iter().map(summary_line).collect();
            let message = if lines.is_empty() {
                "no jobs".to_string()
            } else {
                lines.join("\n")
            };
            Reply::ok(message).with(
                "jobs",
                serde_json::to_value(&records).unwrap_or(Value::Array(vec![])),
            )
        }
        Err(e) => Reply::Err(e.to_string()),
    }
}

pub fn summary_line(r: &JobRecord) -> String {
    format!(
        "{}  {:<13}  {:<17}  {}  {}",
        r.job_id,
        r.kind.as_str(),
        r.state.as_str(),
        r.created_at.format("%Y-%m-%d %H:%M:%S"),
        r.message
    )
}

pub fn describe(r: &JobRecord) -> String {
    let mut lines = vec![
        format!("job {} ({})", r.job_id, r.kind),
        format!("state: {}", r.state.as_str()),
        format!("message: {}", r.message),
        format!("source: {} by {}", r.source.as_str(), r.requested_by),
        format!(
            "created: {}  updated: {}",
            r.created_at.to_rfc3339(),
            r.updated_at.to_rfc3339()
        ),
        format!("attempts: {}", r.attempts),
        format!("trace: {}", r.trace_id),
    ];
    if let Some(c) = &r.commit {
        lines.push(format!("commit: {c}"));
    }
    if let Some(a) = &r.agent {
        lines.push(format!("agent: {a}"));
    }
    for i in &r.interruptions {
        lines.push(format!(
            "interrupted: attempt {} on {} at {} (while {})",
            i.attempt,
            i.agent.as_deref().unwrap_or("?"),
            i.at.to_rfc3339(),
            i.state
        ));
    }
    lines.join("\n")
}

async fn status(app: &Arc<App>) -> Reply {
    let snapshot = app.status.snapshot();
    let mut agents = snapshot.agents;
    agents.sort_by(|a, b| a.agent.cmp(&b.agent));
    // Until the cache has asked once, ask directly.
    let (pending, in_flight) = match snapshot.queue {
        Some(q) => q,
        None => match app.store.consumer.get_info().await {
            Ok(info) => (info.num_pending, info.num_ack_pending as u64),
            Err(e) => return Reply::Err(format!("queue unavailable: {e}")),
        },
    };
    let locks = snapshot.locks;
    let last: Vec<(JobKind, LastResult)> = snapshot.last;

    let mut text = vec![format!(
        "agents alive: {} ({})",
        agents.len(),
        agents
            .iter()
            .map(|a| if a.running.is_empty() {
                format!("{}: idle", a.agent)
            } else {
                format!("{}: running {}", a.agent, a.running.join(" "))
            })
            .collect::<Vec<_>>()
            .join(", ")
    )];
    text.push(format!(
        "queue: {pending} waiting to start, {in_flight} picked up"
    ));
    let user_locks: Vec<_> = locks
        .iter()
        .filter(|l| !l.resource.starts_with("job:"))
        .collect();
    if user_locks.is_empty() {
        text.push("locks: none held".into());
    } else {
        text.push("locks:".into());
        for l in &user_locks {
            text.push(format!(
                "  {} ({:?}) held by job {} on {} until {}",
                l.resource,
                l.holder.mode,
                l.holder.job_id,
                l.holder.agent,
                l.holder.expires_at.format("%H:%M:%S")
            ));
        }
    }
    for d in &snapshot.deferred {
        text.push(format!(
            "deferred: {} job {}: {}",
            d.kind, d.job_id, d.message
        ));
    }
    if last.is_empty() {
        text.push("last results: none yet".into());
    } else {
        text.push("last results:".into());
        let now = Utc::now();
        for (kind, l) in &last {
            let success = l
                .last_success_at
                .map(|t| format!("; last success {} ago", age(now - t)))
                .unwrap_or_else(|| "; never succeeded".into());
            text.push(format!(
                "  {kind}: {} {} ago (job {}){success}",
                l.state.as_str(),
                age(now - l.at),
                l.job_id
            ));
            // A drill's targets each have their own story: which namespace restores, how fast.
            if *kind == JobKind::RESTORE_DRILL {
                for (_, t) in snapshot.targets.iter().filter(|(k, _)| k == kind) {
                    text.push(format!("    {}", target_line(t, now)));
                }
            }
        }
    }
    let enabled: Vec<&str> = app
        .registry
        .enabled_kinds()
        .iter()
        .map(|k| k.as_str())
        .collect();
    text.push(format!(
        "handlers enabled here: {}",
        if enabled.is_empty() {
            "none".into()
        } else {
            enabled.join(", ")
        }
    ));
    let last_json: Map<String, Value> = last
        .iter()
        .map(|(k, l)| {
            (
                k.as_str().to_string(),
                serde_json::to_value(l).unwrap_or(Value::Null),
            )
        })
        .collect();
    Reply::ok(text.join("\n")).with(
        "status",
        json!({
            "agents": agents,
            "queue": {"pending": pending, "in_flight": in_flight},
            "locks": user_locks,
            "last": last_json,
            "enabled": enabled,
        }),
    )
}

fn age(d: chrono::Duration) -> String {
    let secs = d.num_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Listens for cancel broadcasts and cancels the job if this agent runs it.
pub async fn serve_cancels(
    app: Arc<App>,
    shutdown: CancellationToken,
    subscribed: Subscribed,
) -> Result<(), async_nats::Error> {
    let mut notices = app
        .store
        .client
        .subscribe(app.store.names.cancel_subject())
        .await?;
    let _ = subscribed.send(());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            notice = notices.next() => {
                let Some(notice) = notice else { break };
                let job_id = serde_json::from_slice::<Value>(&notice.payload)
                    .ok()
                    .and_then(|v| v.get("job_id").and_then(Value::as_str).map(str::to_string));
                if let Some(job_id) = job_id
                    && app.cancel_local(&job_id, crate::app::CancelReason::User) {
                        tracing::info!(%job_id, "Cancelling job on request");
                    }
            }
        }
    }
    Ok(())
}
