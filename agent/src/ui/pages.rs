//! The pages, rendered with maud (every `(value)` is HTML-escaped). What they show comes from
//! the status cache, the job records and the events stream, the same sources as `ctl status`,
//! `ctl jobs` and `ctl job`.

use std::collections::BTreeMap;
use std::str::FromStr;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use infraflux_handlers::{JobKind, TargetResult};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;
use serde_json::Value;

use super::chart::{self, Unit};
use super::events::{self, valid_job_id};
use super::{UiState, app_of, starting};
use crate::app::App;
use crate::records::{JobRecord, JobState, LastResult, RecordError};

/// Jobs per page of the job list.
const PAGE_SIZE: usize = 25;
/// Finished jobs of a kind a chart draws at most (newest).
const CHART_JOBS: usize = 200;
/// Nested results deeper than this show as JSON text.
const MAX_DEPTH: usize = 4;
/// The overview reloads itself this often (seconds), without script.
const OVERVIEW_REFRESH: &str = "30";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Nav {
    Overview,
    Jobs,
    Drills,
    Backups,
    None,
}

fn layout(title: &str, nav: Nav, refresh: Option<&str>, body: Markup) -> Markup {
    let link = |target: Nav, href: &str, text: &str| {
        html! {
            a href=(href) class=(if nav == target { "active" } else { "" }) { (text) }
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                @if let Some(seconds) = refresh {
                    meta http-equiv="refresh" content=(seconds);
                }
                title { (title) " · infraflux" }
                link rel="stylesheet" href="/static/ui.css";
            }
            body {
                header class="top" {
                    a class="brand" href="/" { "infraflux" }
                    nav {
                        (link(Nav::Overview, "/", "Overview"))
                        (link(Nav::Jobs, "/jobs", "Jobs"))
                        (link(Nav::Drills, "/drills", "Drills"))
                        (link(Nav::Backups, "/backups", "Backups"))
                    }
                }
                main { (body) }
                footer { "Read-only. Act with ChatOps or " code { "infraflux-agent ctl" } "." }
            }
        }
    }
}

fn html_response(status: StatusCode, markup: Markup) -> Response {
    (status, Html(markup.into_string())).into_response()
}

pub fn error_page(status: StatusCode, title: &str, text: &str) -> Response {
    html_response(
        status,
        layout(
            title,
            Nav::None,
            None,
            html! { h1 { (title) } p { (text) } },
        ),
    )
}

pub async fn not_found() -> Response {
    error_page(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is no such page here.",
    )
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> Response {
    error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Job store unavailable",
        &format!("The records could not be read: {e}"),
    )
}

pub fn time_text(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

fn ago(now: DateTime<Utc>, t: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds();
    let (secs, suffix) = if secs < 0 {
        (-secs, "from now")
    } else {
        (secs, "ago")
    };
    let amount = match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    };
    format!("{amount} {suffix}")
}

fn when(now: DateTime<Utc>, t: DateTime<Utc>) -> Markup {
    html! { time datetime=(t.to_rfc3339()) title=(time_text(t)) { (ago(now, t)) } }
}

fn badge(state: JobState) -> Markup {
    html! { span class={ "badge state-" (state.as_str()) } { (state.as_str()) } }
}

fn job_link(job_id: &str) -> Markup {
    html! { a class="mono" href={ "/jobs/" (job_id) } { (job_id) } }
}

/// A record with every free-text field passed through the secret redactor, as `ctl job`
/// gets it. Field by field, not through JSON and back: a short secret that also occurs in a
/// timestamp would make the round trip fail, and a failure must not show the record unredacted.
fn redacted(app: &App, mut record: JobRecord) -> JobRecord {
    let redactor = app.secrets.redactor();
    let text = |s: &mut String| *s = redactor.redact(s);
    text(&mut record.requested_by);
    text(&mut record.message);
    text(&mut record.idempotency_key);
    for s in [
        &mut record.commit,
        &mut record.agent,
        &mut record.cancel_requested_by,
    ]
    .into_iter()
    .flatten()
    {
        text(s);
    }
    for interruption in &mut record.interruptions {
        if let Some(agent) = &mut interruption.agent {
            text(agent);
        }
    }
    if let Some(acceptance) = &mut record.acceptance {
        text(&mut acceptance.message);
    }
    record.params = std::mem::take(&mut record.params)
        .into_iter()
        .map(|(key, value)| (key, crate::runner::redact_value(redactor, value)))
        .collect();
    record.result = crate::runner::redact_value(redactor, record.result.take());
    record.checkpoint = crate::runner::redact_value(redactor, record.checkpoint.take());
    record
}

fn redact(app: &App, text: &str) -> String {
    app.secrets.redactor().redact(text)
}

// ---------------------------------------------------------------------------------------------
// Overview

pub async fn overview(State(state): State<UiState>) -> Response {
    let Some(app) = app_of(&state) else {
        return starting();
    };
    let now = Utc::now();
    let snapshot = app.status.snapshot();
    let mut agents = snapshot.agents;
    agents.sort_by(|a, b| a.agent.cmp(&b.agent));
    let locks: Vec<_> = snapshot
        .locks
        .into_iter()
        .filter(|l| !l.resource.starts_with("job:"))
        .collect();
    let failing_checks = failing_acceptance_checks(&app, &snapshot.last).await;
    let schedules = next_fires(&app, now);
    let body = html! {
        h1 { "Overview" }
        section class="cards" {
            div class="card" {
                div class="figure" id="agents-alive" { (agents.len()) }
                div class="label" { "agents alive" }
            }
            div class="card" {
                div class="figure" { (snapshot.queue.map(|q| q.0.to_string()).unwrap_or_else(|| "?".into())) }
                div class="label" { "jobs waiting" }
            }
            div class="card" {
                div class="figure" { (snapshot.queue.map(|q| q.1.to_string()).unwrap_or_else(|| "?".into())) }
                div class="label" { "picked up" }
            }
            div class="card" {
                div class="figure" { (locks.len()) }
                div class="label" { "locks held" }
            }
        }
        @if !failing_checks.is_empty() {
            section class="alert" id="failing-checks" {
                h2 { "Failing acceptance checks" }
                ul {
                    @for (job_id, name, message) in &failing_checks {
                        li { strong { (name) } ": " (message) " (" (job_link(job_id)) ")" }
                    }
                }
            }
        }
        section {
            h2 { "Agents" }
            div class="scroll" {
                table id="agents" {
                    thead { tr { th { "Agent" } th { "Version" } th { "Up since" } th { "Running" } } }
                    tbody {
                        @for a in &agents {
                            tr {
                                td { (a.agent) }
                                td { (a.version) }
                                td { (when(now, a.started_at)) }
                                td {
                                    @if a.running.is_empty() { span class="muted" { "idle" } }
                                    @for id in &a.running { (job_link(id)) " " }
                                }
                            }
                        }
                        @if agents.is_empty() { tr { td colspan="4" class="muted" { "No agent alive." } } }
                    }
                }
            }
        }
        section {
            h2 { "Last results" }
            div class="scroll" {
                table id="last-results" {
                    thead { tr { th { "Kind" } th { "Last result" } th { "When" } th { "Job" } th { "Last success" } th { "Message" } } }
                    tbody {
                        @for (kind, last) in &snapshot.last {
                            tr {
                                td { (kind.as_str()) }
                                td { (badge(last.state)) }
                                td { (when(now, last.at)) }
                                td { (job_link(&last.job_id)) }
                                td { (last_success(now, last)) }
                                td class="message" { (redact(&app, &last.message)) }
                            }
                        }
                        @if snapshot.last.is_empty() { tr { td colspan="6" class="muted" { "No job has ended yet." } } }
                    }
                }
            }
            @let targets: Vec<&(JobKind, LastResult)> = snapshot.targets.iter().filter(|(_, l)| l.target.as_deref().is_some_and(|t| !t.is_empty())).collect();
            @if !targets.is_empty() {
                h3 { "Per target" }
                div class="scroll" {
                    table id="targets" {
                        thead { tr { th { "Kind" } th { "Target" } th { "Last result" } th { "Last success" } th { "Figures" } } }
                        tbody {
                            @for (kind, last) in targets {
                                tr {
                                    td { (kind.as_str()) }
                                    td { (redact(&app, last.target.as_deref().unwrap_or_default())) }
                                    td { (badge(last.state)) " " (when(now, last.at)) }
                                    td { (last_success(now, last)) }
                                    td { (figures(last)) }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if !snapshot.deferred.is_empty() {
            section {
                h2 { "Waiting for a window" }
                ul {
                    @for d in &snapshot.deferred {
                        li { (d.kind.as_str()) " " (job_link(&d.job_id)) " until " (time_text(d.until)) ": " (redact(&app, &d.message)) }
                    }
                }
            }
        }
        section {
            h2 { "Locks held" }
            @if locks.is_empty() {
                p class="muted" { "None." }
            } @else {
                div class="scroll" {
                    table id="locks" {
                        thead { tr { th { "Resource" } th { "Mode" } th { "Job" } th { "Agent" } th { "Until" } } }
                        tbody {
                            @for l in &locks {
                                tr {
                                    td { (redact(&app, &l.resource)) }
                                    td { (format!("{:?}", l.holder.mode).to_lowercase()) }
                                    td { (job_link(&l.holder.job_id)) }
                                    td { (l.holder.agent) }
                                    td { (when(now, l.holder.expires_at)) }
                                }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Schedules" }
            @if schedules.is_empty() {
                p class="muted" { "No schedule configured." }
            } @else {
                div class="scroll" {
                    table id="schedules" {
                        thead { tr { th { "Schedule" } th { "Command" } th { "Next fire" } } }
                        tbody {
                            @for (name, command, next) in &schedules {
                                tr { td { (name) } td { code { (redact(&app, command)) } } td { (next) } }
                            }
                        }
                    }
                }
            }
        }
    };
    html_response(
        StatusCode::OK,
        layout("Overview", Nav::Overview, Some(OVERVIEW_REFRESH), body),
    )
}

fn last_success(now: DateTime<Utc>, last: &LastResult) -> Markup {
    match last.last_success_at {
        Some(t) => when(now, t),
        None => html! { span class="muted" { "never" } },
    }
}

fn figures(last: &LastResult) -> Markup {
    html! {
        @if let Some(rto) = last.last_success_figures.get("rto_seconds") {
            span class="figure-inline" { "RTO " (chart::seconds(*rto)) }
            " "
        }
        @if let Some(age) = last.last_success_figures.get("data_age_seconds") {
            span class="figure-inline" { "data age " (chart::seconds(*age)) }
            " "
        }
        @if let Some(size) = last.last_success_size_bytes {
            span class="figure-inline" { (chart::bytes(size as f64)) }
        }
    }
}

/// The checks that failed in the newest acceptance job: (job id, check, message).
async fn failing_acceptance_checks(
    app: &App,
    last: &[(JobKind, LastResult)],
) -> Vec<(String, String, String)> {
    let Some((_, newest)) = last.iter().find(|(k, _)| *k == JobKind::ACCEPTANCE) else {
        return Vec::new();
    };
    let Ok(Some((record, _))) = app.records.get(&newest.job_id).await else {
        return Vec::new();
    };
    let record = redacted(app, record);
    record
        .result
        .get("checks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|c| c.get("ok") == Some(&Value::Bool(false)))
        .filter(|c| c.get("skipped") != Some(&Value::Bool(true)))
        .map(|c| {
            let text = |key: &str| c.get(key).and_then(Value::as_str).unwrap_or_default();
            (
                record.job_id.clone(),
                text("name").to_string(),
                text("message").to_string(),
            )
        })
        .collect()
}

/// Every schedule's next fire, in its own time zone: (name, command, when).
fn next_fires(app: &App, now: DateTime<Utc>) -> Vec<(String, String, String)> {
    app.config
        .schedules
        .iter()
        .map(|s| {
            let next = match app.config.parse_schedule(s) {
                Ok(schedule) => match schedule.next_after(now) {
                    Some(fire) => {
                        let local = fire.with_timezone(&schedule.timezone());
                        format!(
                            "{} ({})",
                            infraflux_schedules::format_fire(&local),
                            ago(now, fire)
                        )
                    }
                    None => "never again".to_string(),
                },
                Err(e) => format!("invalid: {e}"),
            };
            (s.name.clone(), redact(app, &s.command), next)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Jobs

#[derive(Deserialize, Default)]
pub struct JobFilter {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    page: Option<usize>,
}

pub async fn jobs(State(state): State<UiState>, Query(filter): Query<JobFilter>) -> Response {
    let Some(app) = app_of(&state) else {
        return starting();
    };
    let kind = filter
        .kind
        .as_deref()
        .filter(|k| !k.is_empty())
        .and_then(|k| JobKind::from_str(k).ok());
    let job_state = filter
        .state
        .as_deref()
        .and_then(|s| JobState::ALL.into_iter().find(|st| st.as_str() == s));
    let page = filter.page.unwrap_or(0).min(1_000);
    let wanted = (page + 1) * PAGE_SIZE + 1;
    let records = match app
        .records
        .list(kind, job_state.map(JobState::as_str), wanted)
        .await
    {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    let has_next = records.len() > (page + 1) * PAGE_SIZE;
    let shown: Vec<JobRecord> = records
        .into_iter()
        .skip(page * PAGE_SIZE)
        .take(PAGE_SIZE)
        .map(|r| redacted(&app, r))
        .collect();
    let mut kinds = app.registry.enabled_kinds();
    if let Some(k) = kind
        && !kinds.contains(&k)
    {
        kinds.push(k);
    }
    let page_link = |page: usize| {
        let mut query = vec![format!("page={page}")];
        if let Some(k) = kind {
            query.push(format!("kind={}", k.as_str()));
        }
        if let Some(s) = job_state {
            query.push(format!("state={}", s.as_str()));
        }
        format!("/jobs?{}", query.join("&"))
    };
    let now = Utc::now();
    let body = html! {
        h1 { "Jobs" }
        form class="filters" method="get" action="/jobs" {
            label { "Kind "
                select name="kind" {
                    option value="" { "any" }
                    @for k in &kinds {
                        option value=(k.as_str()) selected[kind == Some(*k)] { (k.as_str()) }
                    }
                }
            }
            label { "State "
                select name="state" {
                    option value="" { "any" }
                    @for s in JobState::ALL {
                        option value=(s.as_str()) selected[job_state == Some(s)] { (s.as_str()) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        div class="scroll" {
            table id="jobs" {
                thead { tr { th { "Job" } th { "Kind" } th { "State" } th { "Created" } th { "By" } th { "Message" } } }
                tbody {
                    @for r in &shown {
                        tr {
                            td { (job_link(&r.job_id)) }
                            td { (r.kind.as_str()) }
                            td { (badge(r.state)) }
                            td { (when(now, r.created_at)) }
                            td { (r.requested_by) }
                            td class="message" { (r.message) }
                        }
                    }
                    @if shown.is_empty() { tr { td colspan="6" class="muted" { "No job matches." } } }
                }
            }
        }
        nav class="pager" {
            @if page > 0 { a rel="prev" href=(page_link(page - 1)) { "← Newer" } }
            span { "Page " (page + 1) }
            @if has_next { a rel="next" href=(page_link(page + 1)) { "Older →" } }
        }
    };
    html_response(StatusCode::OK, layout("Jobs", Nav::Jobs, None, body))
}

// ---------------------------------------------------------------------------------------------
// One job

pub async fn job(State(state): State<UiState>, Path(job_id): Path<String>) -> Response {
    let Some(app) = app_of(&state) else {
        return starting();
    };
    if !valid_job_id(&job_id) {
        return not_found().await;
    }
    let record = match app.records.get(&job_id).await {
        Ok(Some((record, _))) => redacted(&app, record),
        Ok(None) => {
            return error_page(
                StatusCode::NOT_FOUND,
                "No such job",
                "No record has this job id (records expire after nats.records_max_age).",
            );
        }
        Err(e) => return unavailable(e),
    };
    let history = match events::history(&app, &job_id).await {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(%job_id, error = %e, "Job events not read for the page");
            events::History::default()
        }
    };
    let last_sequence = history.events.back().map(|(seq, _)| *seq).unwrap_or(0);
    // The job may have ended between reading its record and its events: then the timeline
    // already shows the end and there is nothing to follow.
    let ended = record.state.is_terminal()
        || history
            .events
            .back()
            .is_some_and(|(_, e)| e.state.is_terminal());
    let live = (!ended).then(|| format!("/jobs/{}/events?after={last_sequence}", record.job_id));
    let trace = trace_link(&app, &record.trace_id);
    let now = Utc::now();
    let param_text = |key: &str| {
        record
            .params
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    // A push brings them in its payload; a plan reads them from its checkout (the poller's
    // and a command's jobs have no payload).
    let commit_text = |key: &str| {
        param_text(key).or_else(|| {
            record
                .result
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
        })
    };
    let body = html! {
        h1 { (record.kind.as_str()) " job " span class="mono" { (record.job_id) } }
        p class="lead" {
            span id="job-state" class={ "badge state-" (record.state.as_str()) } { (record.state.as_str()) }
            " "
            span id="job-message" class="message" { (record.message) }
        }
        section {
            h2 { "Record" }
            div class="scroll" {
                table class="record" id="record" {
                    tbody {
                        tr { th { "Source" } td { (record.source.as_str()) " by " (record.requested_by) } }
                        tr { th { "Created" } td { (time_text(record.created_at)) " (" (ago(now, record.created_at)) ")" } }
                        @if let Some(t) = record.started_at { tr { th { "Started" } td { (time_text(t)) } } }
                        @if let Some(t) = record.finished_at {
                            tr { th { "Finished" } td { (time_text(t)) @if let Some(s) = record.started_at { " (took " (chart::seconds((t - s).num_milliseconds() as f64 / 1000.0)) ")" } } }
                        }
                        tr { th { "Updated" } td { (time_text(record.updated_at)) } }
                        tr { th { "Attempts" } td { (record.attempts) } }
                        @if let Some(a) = &record.agent { tr { th { "Agent" } td { (a) } } }
                        @if let Some(c) = &record.commit {
                            tr { th { "Commit" } td {
                                span class="mono" { (c) }
                                @if let Some(title) = commit_text("commit_title") { br; span id="commit-title" class="commit-title" { (title) } }
                                @if let Some(author) = commit_text("commit_author") { br; span class="muted" { "by " (author) } }
                            } }
                        }
                        @if let Some(title) = param_text("pull_request_title") { tr { th { "Pull request" } td { (title) } } }
                        @if let Some(t) = record.not_before { tr { th { "Not before" } td { (time_text(t)) } } }
                        @if let Some(by) = &record.cancel_requested_by { tr { th { "Cancel requested by" } td { (by) } } }
                        @if record.skipped { tr { th { "Skipped" } td { "nothing to do" } } }
                        tr { th { "Trace" } td {
                            @match &trace {
                                Some(url) => a id="trace-link" href=(url) rel="noreferrer" { span class="mono" { (record.trace_id) } },
                                None => span class="mono" { (record.trace_id) },
                            }
                        } }
                        @if let Some(follow) = &record.acceptance {
                            tr { th { "Acceptance" } td { (job_link(&follow.job_id)) " " (badge(follow.state)) " " (follow.message) } }
                        }
                    }
                }
            }
        }
        @if !record.params.is_empty() {
            section {
                h2 { "Parameters" }
                div class="scroll" { (value(&Value::Object(record.params.clone()), 0)) }
            }
        }
        @if !record.interruptions.is_empty() {
            section {
                h2 { "Interruptions" }
                div class="scroll" {
                    table {
                        thead { tr { th { "Attempt" } th { "Agent" } th { "At" } th { "While" } } }
                        tbody {
                            @for i in &record.interruptions {
                                tr { td { (i.attempt) } td { (i.agent.as_deref().unwrap_or("?")) } td { (time_text(i.at)) } td { (i.state) } }
                            }
                        }
                    }
                }
            }
        }
        @if !record.result.is_null() {
            section id="result" {
                h2 { "Result" }
                (result_summary(&record))
                div class="scroll" { (value(&record.result, 0)) }
            }
        }
        section {
            h2 { "Timeline" @if live.is_some() { " " span class="live" id="live-marker" { "live" } } }
            @if history.earlier > 0 {
                p class="muted" id="earlier-events" { (history.earlier) " earlier events not shown; the newest " (events::MAX_HISTORY) " are." }
            }
            ol id="timeline" class="timeline" data-live=[live.as_deref()] data-after=(last_sequence) {
                @for (seq, e) in &history.events {
                    li data-seq=(seq) class={ "event state-" (e.state.as_str()) } {
                        time datetime=(e.at.to_rfc3339()) { (time_text(e.at)) }
                        " " (badge(e.state)) " "
                        span class="message" { (e.message) }
                    }
                }
            }
            @if history.events.is_empty() { p class="muted" { "No events stored (they expire after nats.events_max_age)." } }
            @if live.is_some() {
                noscript { p class="muted" { "Reload to see new events." } }
            }
        }
        script src="/static/ui.js" defer {}
    };
    html_response(
        StatusCode::OK,
        layout(&format!("Job {}", record.job_id), Nav::Jobs, None, body),
    )
}

/// `[telemetry] trace_url` with the trace id in it; none for an id that is not hex.
fn trace_link(app: &App, trace_id: &str) -> Option<String> {
    let template = app.config.telemetry.trace_url.as_deref()?;
    (!trace_id.is_empty() && trace_id.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| template.replace(crate::config::TRACE_ID_PLACEHOLDER, trace_id))
}

/// The figures a person looks for first, by kind: a drill's RTO and data age per target, how
/// many checks passed.
fn result_summary(record: &JobRecord) -> Markup {
    let targets = TargetResult::all_in(&record.result);
    let count = |key: &str| record.result.get(key).and_then(Value::as_u64);
    html! {
        @if let (Some(passed), Some(failed)) = (count("passed"), count("failed")) {
            p class="summary" { (passed) " checks passed, " (failed) " failed"
                @if let Some(skipped) = count("skipped") { ", " (skipped) " skipped" } }
        }
        @if !targets.is_empty() {
            ul class="summary" {
                @for t in &targets {
                    li {
                        strong { (t.target) } ": "
                        @if t.skipped { "skipped" } @else if t.ok { "ok" } @else { span class="fail" { "failed" } }
                        @if let Some(rto) = t.figures().get("rto_seconds") { ", RTO " (chart::seconds(*rto)) }
                        @if let Some(age) = t.figures().get("data_age_seconds") { ", data age " (chart::seconds(*age)) }
                        @if let Some(size) = t.size_bytes { ", " (chart::bytes(size as f64)) }
                    }
                }
            }
        }
    }
}

/// Any JSON as HTML: objects as key/value tables, lists of objects as tables (one row each,
/// in their order: an upgrade's nodes in rollout order), a failed check's row marked.
fn value(v: &Value, depth: usize) -> Markup {
    if depth > MAX_DEPTH {
        return html! { code { (v.to_string()) } };
    }
    match v {
        Value::Null => html! { span class="muted" { "—" } },
        Value::Bool(b) => {
            html! { span class=(if *b { "ok" } else { "fail" }) { (if *b { "yes" } else { "no" }) } }
        }
        Value::Number(n) => html! { (n.to_string()) },
        Value::String(s) => html! { (s) },
        Value::Array(items) if items.iter().all(Value::is_object) && !items.is_empty() => {
            let mut columns: Vec<&str> = Vec::new();
            for item in items {
                for key in item.as_object().into_iter().flat_map(|o| o.keys()) {
                    if !columns.contains(&key.as_str()) {
                        columns.push(key);
                    }
                }
            }
            html! {
                table class="nested" {
                    thead { tr { @for c in &columns { th { (c) } } } }
                    tbody {
                        @for item in items {
                            tr class=(if item.get("ok") == Some(&Value::Bool(false)) && item.get("skipped") != Some(&Value::Bool(true)) { "failed" } else { "" }) {
                                @for c in &columns { td { (field(c, item.get(*c).unwrap_or(&Value::Null), depth)) } }
                            }
                        }
                    }
                }
            }
        }
        Value::Array(items) => html! {
            @if items.is_empty() { span class="muted" { "none" } }
            @for (i, item) in items.iter().enumerate() {
                @if i > 0 { ", " }
                (value(item, depth + 1))
            }
        },
        Value::Object(map) => html! {
            table class="nested kv" {
                tbody {
                    @for (k, v) in map {
                        tr { th { (k) } td { (field(k, v, depth)) } }
                    }
                }
            }
        },
    }
}

/// A value, read by its key's unit: `*_seconds` as a duration, `*_bytes` as a size.
fn field(key: &str, v: &Value, depth: usize) -> Markup {
    match v.as_f64() {
        Some(n) if key.ends_with("_seconds") => html! { (chart::seconds(n)) },
        Some(n) if key.ends_with("_bytes") => html! { (chart::bytes(n)) },
        _ => value(v, depth + 1),
    }
}

// ---------------------------------------------------------------------------------------------
// Charts

/// Figures over time, oldest first.
type Series = Vec<(DateTime<Utc>, f64)>;

/// When a finished job's figures count: when it finished.
fn finished(record: &JobRecord) -> DateTime<Utc> {
    record.finished_at.unwrap_or(record.updated_at)
}

/// Ended jobs of `kinds`, up to [`CHART_JOBS`] each, oldest first: one pass over the newest
/// records, as `ctl jobs` reads them.
async fn finished_jobs(app: &App, kinds: &[JobKind]) -> Result<Vec<JobRecord>, RecordError> {
    let ended = |r: &JobRecord| matches!(r.state, JobState::Succeeded | JobState::Failed);
    let mut records = app
        .records
        .scan(
            |r| kinds.contains(&r.kind) && ended(r),
            CHART_JOBS * kinds.len(),
        )
        .await?;
    let mut taken: BTreeMap<JobKind, usize> = BTreeMap::new();
    records.retain(|r| {
        let n = taken.entry(r.kind).or_default();
        *n += 1;
        *n <= CHART_JOBS
    });
    records.sort_by_key(finished);
    Ok(records)
}

pub async fn drills(State(state): State<UiState>) -> Response {
    let Some(app) = app_of(&state) else {
        return starting();
    };
    let records = match finished_jobs(&app, &[JobKind::RESTORE_DRILL]).await {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    // target → (finished, job id, ok, rto, data age), oldest first
    type Run = (DateTime<Utc>, String, bool, Option<f64>, Option<f64>);
    let mut by_target: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    for record in &records {
        for t in TargetResult::all_in(&record.result) {
            if t.skipped {
                continue;
            }
            let figures = t.figures();
            by_target.entry(redact(&app, &t.target)).or_default().push((
                finished(record),
                record.job_id.clone(),
                t.ok,
                figures.get("rto_seconds").copied(),
                figures.get("data_age_seconds").copied(),
            ));
        }
    }
    let now = Utc::now();
    let body = html! {
        h1 { "Restore drills" }
        @if by_target.is_empty() { p class="muted" { "No drill has finished yet." } }
        @for (target, runs) in &by_target {
            @let rto: Series = runs.iter().filter(|r| r.2).filter_map(|r| Some((r.0, r.3?))).collect();
            @let age: Series = runs.iter().filter(|r| r.2).filter_map(|r| Some((r.0, r.4?))).collect();
            section class="target" {
                h2 { (target) }
                div class="charts" {
                    figure {
                        figcaption { "RTO (time to restore)" }
                        (chart::line(&format!("{target}: RTO over time"), Unit::Seconds, &rto))
                    }
                    figure {
                        figcaption { "Data age (backup age at restore)" }
                        (chart::line(&format!("{target}: data age over time"), Unit::Seconds, &age))
                    }
                }
                details {
                    summary { "Runs (" (runs.len()) ")" }
                    div class="scroll" {
                        table {
                            thead { tr { th { "Finished" } th { "Job" } th { "Result" } th { "RTO" } th { "Data age" } } }
                            tbody {
                                @for run in runs.iter().rev() {
                                    tr {
                                        td { (when(now, run.0)) }
                                        td { (job_link(&run.1)) }
                                        td { @if run.2 { span class="ok" { "passed" } } @else { span class="fail" { "failed" } } }
                                        td { (run.3.map(chart::seconds).unwrap_or_default()) }
                                        td { (run.4.map(chart::seconds).unwrap_or_default()) }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    html_response(StatusCode::OK, layout("Drills", Nav::Drills, None, body))
}

pub async fn backups(State(state): State<UiState>) -> Response {
    let Some(app) = app_of(&state) else {
        return starting();
    };
    let mut series: BTreeMap<(String, String), Series> = BTreeMap::new();
    let records = match finished_jobs(&app, &[JobKind::BACKUP, JobKind::ETCD_SNAPSHOT]).await {
        Ok(r) => r,
        Err(e) => return unavailable(e),
    };
    for record in &records {
        let kind = record.kind;
        for figures in crate::records::target_figures(record) {
            if let Some(size) = figures.last_success_size_bytes {
                let target = if figures.target.is_empty() {
                    kind.as_str().to_string()
                } else {
                    redact(&app, &figures.target)
                };
                series
                    .entry((kind.as_str().to_string(), target))
                    .or_default()
                    .push((finished(record), size as f64));
            }
        }
    }
    let body = html! {
        h1 { "Backups and snapshots" }
        @if series.is_empty() { p class="muted" { "No backup or snapshot has a size recorded yet." } }
        div class="charts" {
            @for ((kind, target), points) in &series {
                figure {
                    figcaption { (kind) ": " (target) }
                    (chart::line(&format!("{kind} {target}: size over time"), Unit::Bytes, points))
                }
            }
        }
    };
    html_response(StatusCode::OK, layout("Backups", Nav::Backups, None, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_from_outside_are_text_not_markup() {
        let html = value(
            &json!({"message": "<script>alert(1)</script>", "checks": [{"name": "x", "ok": false, "message": "<img src=x onerror=alert(1)>"}]}),
            0,
        )
        .into_string();
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(html.contains("class=\"failed\""), "{html}");
    }

    #[test]
    fn figures_are_shown_in_their_units() {
        let html = value(&json!({"rto_seconds": 240, "size_bytes": 2048}), 0).into_string();
        assert!(html.contains("4.0 min"), "{html}");
        assert!(html.contains("2.0 KiB"), "{html}");
    }
}
