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

/// Events shown on a job's page at most, the newest (a long upgrade reports per node and step).
pub const MAX_HISTORY: usize = 1_000;
/// Events read for a job's page at most: the page stays quick for a job that reported a lot.
const MAX_HISTORY_READ: usize = 20_000;
/// A job already ended when its timeline connected: how long to wait for its last events
/// (the record is written before its event is published) before saying it ended.
const ENDED_QUIET: Duration = Duration::from_secs(2);
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
    let deliver_policy = match after.checked_add(1) {
        Some(start_sequence) if after > 0 => DeliverPolicy::ByStartSequence { start_sequence },
        _ => DeliverPolicy::All,
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

/// A job's stored events as its page shows them.
#[derive(Default)]
pub struct History {
    /// The newest [`MAX_HISTORY`], oldest first, each with its stream sequence.
    pub events: std::collections::VecDeque<(u64, JobEvent)>,
    /// Older events not shown.
    pub earlier: usize,
}

/// The job's stored events (see [`History`]).
pub async fn history(app: &App, job_id: &str) -> Result<History, String> {
    let mut consumer = follow(app, job_id, 0).await?;
    let pending = consumer
        .info()
        .await
        .map(|i| i.num_pending)
        .map_err(|e| e.to_string())?;
    let mut out = History::default();
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    for _ in 0..MAX_HISTORY_READ {
        let Ok(Some(Ok(message))) = tokio::time::timeout(HISTORY_WAIT, messages.next()).await
        else {
            break;
        };
        let Ok(info) = message.info() else { break };
        let (sequence, remaining) = (info.stream_sequence, info.pending);
        if let Ok(event) = serde_json::from_slice::<JobEvent>(&message.payload) {
            if out.events.len() == MAX_HISTORY {
                out.events.pop_front();
                out.earlier += 1;
            }
            out.events.push_back((sequence, redacted(app, event)));
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
    // Any answer but 200 stops the browser's reconnects: one at shutdown would only make
    // a consumer the stop ends again at once.
    if state.stop.is_cancelled() {
        return pages::error_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Agent stopping",
            "The agent is stopping; reload the page once it is back.",
        );
    }
    if !valid_job_id(&job_id) {
        return pages::error_page(StatusCode::NOT_FOUND, "No such job", "Not a job id.");
    }
    let ended = match app.records.get(&job_id).await {
        Ok(Some((record, _))) => record.state.is_terminal(),
        Ok(None) => {
            return pages::error_page(StatusCode::NOT_FOUND, "No such job", "No record.");
        }
        Err(e) => return pages::unavailable(e),
    };
    let reconnected = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let after = reconnected.or(query.after).unwrap_or(0);
    let messages = match follow(&app, &job_id, after).await {
        Ok(consumer) => consumer.messages().await.map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let messages = match messages {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(%job_id, error = %e, "Live timeline not started");
            return pages::unavailable(e);
        }
    };
    let (sender, receiver) = tokio::sync::mpsc::channel(32);
    tokio::spawn(pump(app, messages, ended, sender, state.stop.clone()));
    Sse::new(ReceiverStream::new(receiver))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Forwards the job's events until it ends, the browser goes away, [`LIVE_LIMIT`] passes or
/// the agent stops. A job that had `ended` when the browser connected (its end maybe already
/// shown) gets its remaining events and then `end`, so the browser stops asking.
async fn pump(
    app: std::sync::Arc<App>,
    mut messages: consumer::pull::Ordered,
    ended: bool,
    sender: tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
    stop: CancellationToken,
) {
    let deadline = tokio::time::sleep(LIVE_LIMIT);
    tokio::pin!(deadline);
    let quiet = tokio::time::sleep(if ended { ENDED_QUIET } else { LIVE_LIMIT });
    tokio::pin!(quiet);
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            () = &mut deadline => return,
            () = sender.closed() => return,
            () = &mut quiet, if ended => {
                let _ = sender
                    .send(Ok(Event::default().event("end").data("ended")))
                    .await;
                return;
            }
            message = messages.next() => message,
        };
        if ended {
            quiet
                .as_mut()
                .reset(tokio::time::Instant::now() + ENDED_QUIET);
        }
        let Some(Ok(message)) = message else { return };
        let Ok(info) = message.info() else { continue };
        let sequence = info.stream_sequence;
        let Ok(event) = serde_json::from_slice::<JobEvent>(&message.payload) else {
            continue;
        };
        let event = redacted(&app, event);
        let last = event.state.is_terminal();
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
        if last {
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
