//! The read-only status page (`[ui]`): overview, jobs, one job with its live timeline, and
//! charts of drills and backups. Rendered on the server from the records, events and status
//! cache `ctl` reads; nothing here writes anything.
//!
//! Safety: every value goes through maud's escaping, every string from a record through the
//! secret redactor, and the Content-Security-Policy allows only this origin's script and
//! style (no inline script), so a commit message cannot run code in an operator's browser.

mod auth;
mod chart;
mod events;
mod pages;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use infraflux_handlers::secret::Secret;
use tokio_util::sync::CancellationToken;

use crate::app::App;

/// Connections the page's listener keeps open at once (each live timeline holds one).
pub const MAX_CONNECTIONS: usize = 256;
/// A request's head must arrive within this.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Script and style from this origin only: an injected `<script>` or `onerror=` does not run.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

const STYLE: &str = include_str!("ui.css");
const SCRIPT: &str = include_str!("ui.js");

#[derive(Clone)]
pub struct UiState {
    /// Set once the agent has its job store; pages answer 503 until then.
    pub app: Arc<OnceLock<Arc<App>>>,
    /// `[ui] auth_token`, resolved.
    pub auth_token: Option<Secret>,
    /// Ends live timelines when the agent stops.
    pub stop: CancellationToken,
}

pub fn router(state: UiState) -> Router {
    Router::new()
        .route("/", get(pages::overview))
        .route("/jobs", get(pages::jobs))
        .route("/jobs/{job_id}", get(pages::job))
        .route("/jobs/{job_id}/events", get(events::stream))
        .route("/drills", get(pages::drills))
        .route("/backups", get(pages::backups))
        .route("/static/ui.css", get(|| static_file("text/css", STYLE)))
        .route(
            "/static/ui.js",
            get(|| static_file("text/javascript", SCRIPT)),
        )
        .fallback(pages::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth::require))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn static_file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// Headers every answer carries, refusals included.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// The app, once the agent has its job store.
fn app_of(state: &UiState) -> Option<Arc<App>> {
    state.app.get().cloned()
}

/// What a page answers before [`app_of`] has an app.
fn starting() -> Response {
    pages::error_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "Starting",
        "The agent is still connecting to its job store; reload in a moment.",
    )
}

pub async fn bind(listen: &str) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    crate::http::bind(listen).await
}

/// Serves the page until `shutdown`, as the HTTP listener is served.
pub async fn serve(listener: tokio::net::TcpListener, state: UiState, shutdown: CancellationToken) {
    crate::http::serve_router(
        listener,
        router(state),
        READ_TIMEOUT,
        MAX_CONNECTIONS,
        shutdown,
    )
    .await;
}
