//! The HTTP listener: GitHub webhooks, health, readiness and metrics.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use infraflux_handlers::Source;
use infraflux_handlers::secret::Secret;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::App;
use crate::config::{GithubSection, HttpSection};
use crate::github::{self, Accepted};
use crate::metrics::Metrics;
use crate::webhook::Verdict;

/// GitHub caps webhook payloads at 25 MiB; anything larger is not from GitHub.
pub const MAX_WEBHOOK_BYTES: usize = 25 * 1024 * 1024;

/// What `/readyz` answers from, without a round trip: the connection state and the last
/// background JetStream probe (a JetStream request to a dead server takes seconds to fail).
#[derive(Default)]
pub struct Readiness {
    pub client: OnceLock<async_nats::Client>,
    /// Ingest's own connection, which webhooks are stored through.
    pub ingest_client: OnceLock<async_nats::Client>,
    pub jetstream_ok: AtomicBool,
    pub jetstream_error: Mutex<String>,
}

impl Readiness {
    /// `Ok` when NATS is connected and JetStream answered the last probe.
    pub fn check(&self, app_ready: bool) -> Result<(), String> {
        let Some(client) = self.client.get() else {
            return Err("connecting to NATS".into());
        };
        let connected = |c: &async_nats::Client| {
            c.connection_state() == async_nats::connection::State::Connected
        };
        if !connected(client) || !self.ingest_client.get().is_some_and(connected) {
            return Err("disconnected from NATS; reconnecting".into());
        }
        if !app_ready {
            return Err("setting up JetStream streams and buckets".into());
        }
        if !self.jetstream_ok.load(Ordering::Relaxed) {
            let reason = self
                .jetstream_error
                .lock()
                .map(|e| e.clone())
                .unwrap_or_default();
            return Err(format!("JetStream is not answering: {reason}"));
        }
        Ok(())
    }
}

/// After shutdown, how long open requests may take to finish before their connections are
/// dropped: the rest of the agent has stopped by then, and a stalled client must not keep the
/// process from exiting.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// What keeps slow or too many clients from exhausting the listener (`[http]`).
#[derive(Clone)]
pub struct Limits {
    /// Webhooks handled at once; one more is refused with 503.
    pub max_in_flight: usize,
    /// Connections open at once: a burst beyond waits in the accept queue (back-pressure on
    /// the senders) instead of costing a file descriptor and a task each.
    pub max_connections: usize,
    /// A request's head must arrive within this (from the connection's start, or from the end
    /// of the previous response: the idle timeout of a kept-alive connection), and a webhook's
    /// body within this again.
    pub read_timeout: Duration,
    /// One permit per webhook being handled. Webhooks are what hold memory (bodies up to
    /// [`MAX_WEBHOOK_BYTES`]) and wait on JetStream; health and metrics answer from memory at
    /// once, so they stay answerable while webhooks are refused.
    pub webhook_slots: Arc<Semaphore>,
}

impl Limits {
    pub fn new(http: &HttpSection) -> Self {
        let max_in_flight = http.max_in_flight.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            max_in_flight,
            max_connections: http.max_connections.max(1),
            read_timeout: http.read_timeout.get(),
            webhook_slots: Arc::new(Semaphore::new(max_in_flight)),
        }
    }

    pub fn webhooks_in_flight(&self) -> usize {
        self.max_in_flight
            .saturating_sub(self.webhook_slots.available_permits())
    }
}

#[derive(Clone)]
pub struct HttpState {
    pub app: Arc<OnceLock<Arc<App>>>,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<Metrics>,
    /// Shared, not copied: axum clones the state for every request.
    pub github: Option<Arc<GithubSection>>,
    pub webhook_secrets: Arc<Vec<Secret>>,
    pub limits: Limits,
}

pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/webhooks/github", post(webhook))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BYTES))
        .with_state(state)
}

/// Serves HTTP/1.1 until `shutdown` fires; open requests then get [`DRAIN_GRACE`] to finish.
///
/// Each connection is its own task, so clients that connect and send nothing (or half a
/// request) hold only their socket, and hyper closes them after `read_timeout`. axum::serve
/// cannot set that timeout, hence the loop here. HTTP/2 is not offered: GitHub, Prometheus and
/// probes speak HTTP/1.1, and an HTTP/2 connection has no head timeout to close it when idle.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: CancellationToken,
) {
    let read_timeout = state.limits.read_timeout;
    let max_connections = state.limits.max_connections;
    serve_router(
        listener,
        router(state),
        read_timeout,
        max_connections,
        shutdown,
    )
    .await;
}

/// What [`serve`] does for any router: the status page's listener is served the same way.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
    read_timeout: Duration,
    max_connections: usize,
    shutdown: CancellationToken,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    let service = TowerToHyperService::new(router);
    let mut connections = JoinSet::new();
    loop {
        let full = connections.len() >= max_connections;
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            // Reaps finished connections so the set holds only open ones.
            Some(_) = connections.join_next() => continue,
            accepted = listener.accept(), if !full => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, most likely: connections closing will free some.
                    tracing::warn!(error = %e, "Accepting an HTTP connection failed; retrying in 1s");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        let connection = builder.serve_connection(TokioIo::new(stream), service.clone());
        let stop = shutdown.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop.cancelled() => {
                    // Closes an idle connection now, a busy one after its response.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                // Timeouts and clients going away: routine, and one per connection.
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        });
    }
    // New connections are refused rather than left waiting in the backlog.
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "HTTP connections still open {DRAIN_GRACE:?} after shutdown; closing them"
        );
    }
}

/// An error about one incoming connection (it went away before it was accepted), not about
/// the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

pub async fn bind(listen: &str) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

async fn readyz(State(s): State<HttpState>) -> Response {
    match s.readiness.check(s.app.get().is_some()) {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")).into_response(),
    }
}

/// OpenMetrics for a scraper that asks for it (Prometheus does); the classic text format for
/// everyone else (curl, promtool), as Prometheus' own client libraries do.
async fn metrics(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let connected = s
        .readiness
        .client
        .get()
        .is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected);
    s.metrics.nats_connected.set(i64::from(connected));
    s.metrics
        .webhooks_in_flight
        .set(i64::try_from(s.limits.webhooks_in_flight()).unwrap_or(i64::MAX));
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let (content_type, body) = if openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            s.metrics.encode(),
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            crate::metrics::to_classic_text(&s.metrics.encode()),
        )
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

async fn webhook(State(s): State<HttpState>, headers: HeaderMap, request: Request) -> Response {
    // Taken before the body is read: buffered bodies are what the limit bounds. Refused at
    // once rather than queued: GitHub waits 10 s for an answer, and the deliveries it shows as
    // failed are redelivered.
    let Ok(_slot) = s.limits.webhook_slots.clone().try_acquire_owned() else {
        s.metrics.webhook("overloaded");
        let mut response = reply(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "too many webhook requests at once; retry later"}),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    };
    let read_timeout = s.limits.read_timeout;
    let Ok(body) = tokio::time::timeout(read_timeout, Bytes::from_request(request, &s)).await
    else {
        s.metrics.webhook("timeout");
        let mut response = reply(
            StatusCode::REQUEST_TIMEOUT,
            json!({"error": format!(
                "request body not received within {}",
                humantime::format_duration(read_timeout)
            )}),
        );
        // The rest of the body may still come; the connection cannot carry another request.
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return response;
    };
    let (status, result, body) = webhook_inner(&s, &headers, body).await;
    s.metrics.webhook(result);
    reply(status, body)
}

async fn webhook_inner(
    s: &HttpState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> (StatusCode, &'static str, serde_json::Value) {
    let Some(github) = &s.github else {
        return (
            StatusCode::NOT_FOUND,
            "not_configured",
            json!({"error": "webhooks are off: the agent config has no [github] section"}),
        );
    };
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            let status = rejection.status();
            let result = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "too_large"
            } else {
                "bad_request"
            };
            return (
                status,
                result,
                json!({"error": format!("request body refused: {}", rejection.body_text())}),
            );
        }
    };
    // The same checks the fuzz targets run: headers as (name, value) pairs, in order.
    let header_list: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_bytes()))
        .collect();
    let (event, delivery) = match crate::webhook::check(&s.webhook_secrets, &header_list, &body) {
        Verdict::Refused {
            status,
            result,
            body,
        } => return (status, result, body),
        Verdict::Verified { event, delivery } => (event, delivery),
    };
    let Some(app) = s.app.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            json!({"error": "the agent is still connecting to its job store"}),
        );
    };
    let span = tracing::info_span!("webhook", event, delivery);
    // On the heap: inline, this future (mapping, the claim, the store's round trip) made the
    // handler's several KiB, copied whole each time axum and tokio moved the request's future.
    let accepted = Box::pin(github::accept(app, github, Source::Webhook, event, &body))
        .instrument(span)
        .await;
    match accepted {
        Ok(Ok(Accepted::Ping)) => (StatusCode::OK, "ping", json!({"ok": true, "pong": true})),
        Ok(Ok(Accepted::Ignored(reason))) => {
            (StatusCode::OK, "ignored", json!({"ignored": reason}))
        }
        Ok(Ok(Accepted::Created { job_id })) => (
            StatusCode::ACCEPTED,
            "accepted",
            json!({"delivery": delivery, "jobs": [job_id]}),
        ),
        Ok(Ok(Accepted::Duplicate { job_id })) => (
            StatusCode::OK,
            "duplicate",
            json!({"duplicate": true, "job": job_id, "delivery": delivery}),
        ),
        Ok(Err(bad)) => (
            StatusCode::BAD_REQUEST,
            "bad_request",
            json!({"error": bad.to_string()}),
        ),
        Err(e) => {
            tracing::warn!(%delivery, error = %e, "Webhook not stored; GitHub will show it failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                json!({"error": e.to_string()}),
            )
        }
    }
}
