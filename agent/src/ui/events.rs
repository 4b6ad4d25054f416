//! A job's events: read from the events stream for the page, and followed live as
//! server-sent events for the timeline (`/jobs/<id>/events`).

use std::convert::Infallible;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::{UiState, app_of, pages, starting};
use crate::app::App;
use crate::records::JobEvent;

/// Events shown on a job's page at most (a long upgrade reports per node and step).
pub const MAX_HISTORY: usize = 1_000;
/// A live timeline ends after this even if its job has not (the browser reconnects).
const LIVE_LIMIT: Duration = Duration::from_secs(30 * 60);
/// How long reading the stored events may wait for the next one.
const HISTORY_WAIT: Duration = Duration::from_secs(2);

/// A job id as records key it; anything else cannot name a subject of ours.
pub fn valid_job_id(job_id: &str) -> bool {
    !job_id.is_empty()
        && job_id.len() <= 64
        && job_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The events stream consumer of one job's subject, from after `after` (a stream sequence).
async fn follow(
    app: &App,
    job_id: &str,
    after: u64,
) -> Result<consumer::Consumer<consumer::pull::OrderedConfig>, String> {
    let stream = app
        .store
        .js
        .get_stream(&app.store.names.events_stream)
        .await
        .map_err(|e| e.to_string())?;
    let deliver_policy = if after == 0 {
        DeliverPolicy::All
    } else {
        DeliverPolicy::ByStartSequence {
            start_sequence: after + 1,
        }
    };
    stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: app.store.names.event_subject(job_id),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())
}

/// The job's stored events, oldest first, each with its stream sequence.
pub async fn history(app: &App, job_id: &str) -> Result<Vec<(u64, JobEvent)>, String> {
    let mut consumer = follow(app, job_id, 0).await?;
    let pending = consumer
        .info()
        .await
        .map(|i| i.num_pending)
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    while out.len() < MAX_HISTORY {
        let Ok(Some(Ok(message))) = tokio::time::timeout(HISTORY_WAIT, messages.next()).await
        else {
            break;
        };
        let Ok(info) = message.info() else { break };
        let (sequence, remaining) = (info.stream_sequence, info.pending);
        if let Ok(event) = serde_json::from_slice::<JobEvent>(&message.payload) {
            out.push((sequence, redacted(app, event)));
        }
        if remaining == 0 {
            break;
        }
    }
    Ok(out)
}

fn redacted(app: &App, mut event: JobEvent) -> JobEvent {
    event.message = app.secrets.redactor().redact(&event.message);
    event.requested_by = app.secrets.redactor().redact(&event.requested_by);
    event
}

#[derive(Deserialize)]
pub struct After {
    #[serde(default)]
    after: Option<u64>,
}

/// `text/event-stream` of the job's events after `?after=` (or `Last-Event-ID` when the
/// browser reconnects): `job` events, then `end` once the job has ended.
pub async fn stream(
    State(state): State<UiState>,
    Path(job_id): Path<String>,
    Query(query): Query<After>,
    headers: HeaderMap,
) -> Response {
    let Some(app) = app_of(&state) else {
        return starting();
    };
    if !valid_job_id(&job_id) {
        return pages::error_page(StatusCode::NOT_FOUND, "No such job", "Not a job id.");
    }
    let reconnected = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let after = reconnected.or(query.after).unwrap_or(0);
    let (sender, receiver) = tokio::sync::mpsc::channel(32);
    tokio::spawn(pump(app, job_id, after, sender, state.stop.clone()));
    Sse::new(ReceiverStream::new(receiver))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Forwards the job's events until it ends, the browser goes away, [`LIVE_LIMIT`] passes or
/// the agent stops.
async fn pump(
    app: std::sync::Arc<App>,
    job_id: String,
    after: u64,
    sender: tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
    stop: CancellationToken,
) {
    let consumer = match follow(&app, &job_id, after).await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%job_id, error = %e, "Live timeline not started");
            return;
        }
    };
    let Ok(mut messages) = consumer.messages().await else {
        return;
    };
    let deadline = tokio::time::sleep(LIVE_LIMIT);
    tokio::pin!(deadline);
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            () = &mut deadline => return,
            () = sender.closed() => return,
            message = messages.next() => message,
        };
        let Some(Ok(message)) = message else { return };
        let Ok(info) = message.info() else { continue };
        let sequence = info.stream_sequence;
        let Ok(event) = serde_json::from_slice::<JobEvent>(&message.payload) else {
            continue;
        };
        let event = redacted(&app, event);
        let ended = event.state.is_terminal();
        let data = json!({
            "state": event.state.as_str(),
            "at": event.at.to_rfc3339(),
            "at_text": pages::time_text(event.at),
            "message": event.message,
        });
        let sse = Event::default()
            .event("job")
            .id(sequence.to_string())
            .data(data.to_string());
        if sender.send(Ok(sse)).await.is_err() {
            return;
        }
        if ended {
            let _ = sender
                .send(Ok(Event::default().event("end").data("ended")))
                .await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_ids_name_a_subject() {
        assert!(valid_job_id("01JABCDEF0123456789XYZ"));
        assert!(!valid_job_id("a.>"));
        assert!(!valid_job_id("*"));
        assert!(!valid_job_id(""));
    }
}
