//! Starting and stopping one agent: the order of things is the guarantee.
//!
//! Start: bind HTTP (health answers at once, readiness says why it is not ready), connect to
//! NATS in the background (reconnecting forever), create or update streams and buckets, then
//! serve commands, GitHub events, schedules and the runner. READY is signalled once NATS and
//! the HTTP listener are up.
//!
//! HTTP and ingest's own NATS connection run on a runtime of their own (`IngestRuntime`): a
//! delivery is accepted without waiting for a worker busy with running jobs, or behind their
//! store traffic on one connection.
//!
//! Stop (SIGTERM): stop pulling jobs and firing schedules, stop taking commands, let running
//! jobs finish within `agent.shutdown_timeout`, leave the rest unacknowledged for redelivery,
//! then drop presence, flush NATS and close HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use infraflux_handlers::{Context, Registry};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, UI_AUTH_TOKEN_KEY};
use crate::http::{self, HttpState, Readiness};
use crate::metrics::Metrics;
use crate::status::Presence;
use crate::store::{self, HEARTBEAT_EVERY};
use crate::{chatops, github, poller, runner, scheduler, ui};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// How long background tasks get to stop once the runner has drained.
const BACKGROUND_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on {listen}: {source}")]
    Listen {
        listen: String,
        source: std::io::Error,
    },
    #[error("cannot listen on ui.listen {listen}: {source}")]
    UiListen {
        listen: String,
        source: std::io::Error,
    },
    #[error("ui.auth_token is configured but its secret was not loaded")]
    UiTokenMissing,
    #[error("cannot start the HTTP and ingest runtime: {0}")]
    IngestRuntime(std::io::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// A started agent, for `run` and for tests that start agents in process.
pub struct AgentHandle {
    pub http_addr: SocketAddr,
    /// The status page's address; `None` when `[ui] listen` is empty.
    pub ui_addr: Option<SocketAddr>,
    pub agent_id: String,
    ready: watch::Receiver<bool>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), AgentError>>,
}

impl AgentHandle {
    /// Waits until NATS is connected, streams exist and work is being served.
    pub async fn ready(&mut self) -> bool {
        self.ready.wait_for(|r| *r).await.is_ok()
    }

    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits for the agent to stop.
    pub async fn join(self) -> Result<(), AgentError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "Agent task failed");
                Ok(())
            }
        }
    }

    /// Stops the agent abruptly, as a crash would: nothing is acknowledged or released.
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Binds the HTTP listener and starts the agent in the background.
pub async fn start(
    config: Config,
    services: Context,
    registry: Registry,
) -> Result<AgentHandle, AgentError> {
    start_with_clock(config, services, registry, Arc::new(SystemClock)).await
}

/// [`start`] with the wall clock its schedules fire by.
pub async fn start_with_clock(
    config: Config,
    services: Context,
    registry: Registry,
    clock: Arc<dyn Clock>,
) -> Result<AgentHandle, AgentError> {
    // A configured token whose secret is missing must not leave the page open.
    if config.ui.enabled()
        && config.ui.auth_token.is_some()
        && services.secrets.get(UI_AUTH_TOKEN_KEY).is_none()
    {
        return Err(AgentError::UiTokenMissing);
    }
    let ingest = IngestRuntime::start().map_err(AgentError::IngestRuntime)?;
    // Bound on the ingest runtime, which then drives the listener and its connections.
    let listen = config.http.listen.clone();
    let bound = ingest
        .run(async move { http::bind(&listen).await })
        .await
        .map_err(AgentError::IngestRuntime)?;
    let (listener, http_addr) = bound.map_err(|source| AgentError::Listen {
        listen: config.http.listen.clone(),
        source,
    })?;
    let ui = if config.ui.enabled() {
        let (listener, addr) =
            ui::bind(&config.ui.listen)
                .await
                .map_err(|source| AgentError::UiListen {
                    listen: config.ui.listen.clone(),
                    source,
                })?;
        tracing::info!(address = %format!("http://{addr}/"), "Status page listening");
        Some((listener, addr))
    } else {
        None
    };
    let ui_addr = ui.as_ref().map(|(_, addr)| *addr);
    let shutdown = CancellationToken::new();
    let (ready_tx, ready) = watch::channel(false);
    let agent_id = config.agent_id();
    let task = tokio::spawn(run(
        config,
        services,
        registry,
        Listeners {
            http: listener,
            ingest,
            ui: ui.map(|(listener, _)| listener),
        },
        shutdown.clone(),
        ready_tx,
        clock,
    ));
    Ok(AgentHandle {
        http_addr,
        ui_addr,
        agent_id,
        ready,
        shutdown,
        task,
    })
}

/// The sockets bound before the agent starts, so a port in use fails the start at once.
struct Listeners {
    /// Bound on `ingest`, which serves it.
    http: tokio::net::TcpListener,
    ingest: IngestRuntime,
    ui: Option<tokio::net::TcpListener>,
}

/// A runtime of its own for HTTP (webhooks, probes, metrics) and ingest's NATS connection.
/// On the main runtime a webhook's answer waited for a worker free of running jobs' tasks;
/// here the kernel schedules its threads as the mostly idle threads they are. Two workers, not
/// one: with one, a burst of deliveries was handled one at a time (the closed-loop benchmark
/// fell from about 4,600 to 3,400 req/s).
struct IngestRuntime {
    handle: tokio::runtime::Handle,
    stop: CancellationToken,
    /// Owns the runtime and shuts it down once `stop` fires.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IngestRuntime {
    const WORKERS: usize = 2;
    /// How long its blocking tasks (a reconnect's DNS lookup) may hold up the exit.
    const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

    fn start() -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let (started, handle) = std::sync::mpsc::channel();
        // Built on its own thread and dropped there: a runtime may not be dropped in async
        // code, where a failed thread start would otherwise drop it.
        let thread = std::thread::Builder::new()
            .name("infraflux-ingest".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(Self::WORKERS)
                    .thread_name("infraflux-ingest")
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = started.send(Err(e));
                        return;
                    }
                };
                let _ = started.send(Ok(runtime.handle().clone()));
                runtime.block_on(stopped.cancelled());
                runtime.shutdown_timeout(Self::SHUTDOWN_GRACE);
            })?;
        let handle = handle
            .recv()
            .map_err(|_| std::io::Error::other("the ingest runtime's thread ended at start"))??;
        Ok(Self {
            handle,
            stop,
            thread: Some(thread),
        })
    }

    /// Runs `task` on the runtime (what it spawns, connects or binds stays there).
    async fn run<F>(&self, task: F) -> std::io::Result<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(task)
            .await
            .map_err(|e| std::io::Error::other(format!("ingest runtime task failed: {e}")))
    }

    /// Ends the runtime, dropping what still runs there, and waits for its threads.
    async fn finish(mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for IngestRuntime {
    /// An agent task aborted (a crash, in tests) stops answering HTTP too.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn run(
    config: Config,
    services: Context,
    registry: Registry,
    listeners: Listeners,
    shutdown: CancellationToken,
    ready: watch::Sender<bool>,
    clock: Arc<dyn Clock>,
) -> Result<(), AgentError> {
    let agent_id = config.agent_id();
    let ingest = listeners.ingest;
    let metrics = Arc::new(Metrics::new());
    let readiness = Arc::new(Readiness::default());
    let app_cell = Arc::new(std::sync::OnceLock::new());
    let secrets = services.secrets.clone();
    let webhook_secrets: Vec<_> = secrets.webhook_secrets().cloned().collect();
    let http_state = HttpState {
        app: app_cell.clone(),
        readiness: readiness.clone(),
        metrics: metrics.clone(),
        github: config.github.clone().map(Arc::new),
        webhook_secrets: Arc::new(webhook_secrets),
        limits: http::Limits::new(&config.http),
    };
    // HTTP outlives everything else so health checks answer during shutdown.
    let http_stop = CancellationToken::new();
    let http_task = ingest
        .handle
        .spawn(http::serve(listeners.http, http_state, http_stop.clone()));
    // The status page stops with HTTP; its live timelines end at the start of shutdown.
    let ui_token = secrets.get(UI_AUTH_TOKEN_KEY).cloned();
    let ui_task = listeners.ui.map(|listener| {
        let state = ui::UiState {
            app: app_cell.clone(),
            auth_token: ui_token,
            stop: shutdown.clone(),
        };
        tokio::spawn(ui::serve(listener, state, http_stop.clone()))
    });

    let client = store::connect(
        &config.nats,
        &secrets,
        &format!("infraflux-agent {agent_id}"),
    )
    .await?;
    let _ = readiness.client.set(client.clone());
    let ingest_client = {
        let (nats, secrets) = (config.nats.clone(), secrets.clone());
        let name = format!("infraflux-agent {agent_id} ingest");
        ingest
            .run(async move { store::connect(&nats, &secrets, &name).await })
            .await
            .map_err(AgentError::IngestRuntime)??
    };
    let _ = readiness.ingest_client.set(ingest_client.clone());

    let mut backoff = Duration::from_millis(250);
    let (store, ingest_store) = loop {
        let set_up = async {
            let store = store::bootstrap(client.clone(), &config).await?;
            let ingest_store = store.through(ingest_client.clone()).await?;
            Ok::<_, store::StoreError>((store, ingest_store))
        };
        match set_up.await {
            Ok(stores) => break stores,
            Err(e) => {
                tracing::warn!(error = %e, "JetStream not ready; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => {
                        http_stop.cancel();
                        let _ = http_task.await;
                        if let Some(task) = ui_task {
                            let _ = task.await;
                        }
                        ingest.finish().await;
                        return Ok(());
                    }
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    };
    readiness.jetstream_ok.store(true, Ordering::Relaxed);

    let app = Arc::new(App::new(
        config,
        services,
        registry,
        store,
        metrics,
        ingest_store,
    ));
    let _ = app_cell.set(app.clone());

    // Everything but the runner stops as soon as shutdown starts.
    let mut background = JoinSet::new();
    let stop = shutdown.clone();
    // Commands, GitHub events and cancel notices.
    const SUBSCRIPTIONS: usize = 3;
    let (subscribed, mut subscriptions) = tokio::sync::mpsc::unbounded_channel();
    background.spawn(log_failure(
        "chatops",
        chatops::serve(app.clone(), stop.clone(), subscribed.clone()),
    ));
    background.spawn(log_failure(
        "github events",
        github::serve_nats(app.clone(), stop.clone(), subscribed.clone()),
    ));
    background.spawn(log_failure(
        "cancel notices",
        chatops::serve_cancels(app.clone(), stop.clone(), subscribed),
    ));
    background.spawn(scheduler::run(app.clone(), clock, stop.clone()));
    background.spawn(poller::poll(app.clone(), stop.clone()));
    background.spawn(poller::redeliver(app.clone(), stop.clone()));
    background.spawn(crate::requeue::run(app.clone(), stop.clone()));
    // Heartbeat and readiness keep going until the runner has drained.
    let housekeeping_stop = CancellationToken::new();
    background.spawn(heartbeat(app.clone(), housekeeping_stop.clone()));
    background.spawn(crate::status::run(
        app.store.clone(),
        app.status.clone(),
        housekeeping_stop.clone(),
    ));
    background.spawn(probe_jetstream(
        app.clone(),
        readiness.clone(),
        housekeeping_stop.clone(),
    ));

    // READY means commands are answered: every subscription is made (a failed one closes the
    // channel early and is logged) and the server has it.
    let wait_subscribed = async {
        for _ in 0..SUBSCRIPTIONS {
            if subscriptions.recv().await.is_none() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), wait_subscribed).await;
    subscriptions_registered(&app.store.client).await;
    tracing::info!(agent = %app.agent_id, version = VERSION, "Agent ready");
    let _ = ready.send(true);
    // No-op without systemd (no NOTIFY_SOCKET).
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    // Spawned after READY so systemd hears READY first.
    background.spawn(watchdog(app.clone(), housekeeping_stop.clone()));

    runner::remove_stale_job_dirs(&app.config.agent.state_dir);
    runner::run(app.clone(), shutdown.clone()).await;

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    housekeeping_stop.cancel();
    // Each task stops at its next await on the token; one stuck on a slow NATS or GitHub
    // request is dropped after a short grace, as a crash would, rather than hold the exit.
    let joined = tokio::time::timeout(BACKGROUND_GRACE, async {
        while background.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        tracing::warn!(
            tasks = background.len(),
            "Background tasks still busy at shutdown; dropped"
        );
        background.shutdown().await;
    }
    // Bounded: with NATS hung, the presence expires on its own anyway.
    match tokio::time::timeout(BACKGROUND_GRACE, app.store.agents.delete(&app.agent_id)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "Presence not removed; it expires"),
        Err(_) => tracing::debug!("Presence not removed in time; it expires"),
    }
    // Bounded too: while NATS is gone the client reconnects forever and a flush never ends.
    let _ = tokio::time::timeout(BACKGROUND_GRACE, app.store.client.flush()).await;
    http_stop.cancel();
    let _ = http_task.await;
    if let Some(task) = ui_task {
        let _ = task.await;
    }
    // The last `queued` events ingest sent, out of its client's buffer.
    let _ = tokio::time::timeout(BACKGROUND_GRACE, ingest_client.flush()).await;
    ingest.finish().await;
    tracing::info!(agent = %app.agent_id, "Agent stopped");
    Ok(())
}

async fn log_failure<F>(what: &'static str, fut: F)
where
    F: std::future::Future<Output = Result<(), async_nats::Error>>,
{
    if let Err(e) = fut.await {
        tracing::error!(error = %e, "{what} stopped");
    }
}

/// Presence for `status` (it expires on its own when the agent dies), and the gauges every
/// agent should show alike: the last success per kind and the queue depth come from NATS, not
/// from this process's memory, so a restarted agent or one that ran nothing reports them too.
async fn heartbeat(app: Arc<App>, stop: CancellationToken) {
    const METRICS_EVERY: u64 = 6;
    let mut beats = 0u64;
    loop {
        let presence = Presence {
            agent: app.agent_id.clone(),
            version: VERSION.to_string(),
            started_at: app.started_at,
            seen_at: Utc::now(),
            concurrency: app.config.agent.concurrency,
            running: app.running_ids(),
            checks_claims: true,
        };
        if let Ok(bytes) = serde_json::to_vec(&presence)
            && let Err(e) = app
                .store
                .agents
                .put(&app.agent_id, Bytes::from(bytes))
                .await
        {
            tracing::debug!(error = %e, "Heartbeat not stored");
        }
        if beats.is_multiple_of(METRICS_EVERY) {
            tokio::select! {
                () = stop.cancelled() => return,
                () = refresh_shared_metrics(&app) => {}
            }
            // What a burst of jobs or deliveries used, back to the host it shares.
            crate::allocator::give_back_freed();
        }
        beats += 1;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(HEARTBEAT_EVERY) => {}
        }
    }
}

async fn refresh_shared_metrics(app: &App) {
    for (kind, last) in app.records.last_target_results().await {
        app.metrics.last_success_of(
            kind.as_str(),
            last.target.as_deref().unwrap_or_default(),
            last.last_success_at,
            last.last_success_size_bytes,
            last.last_success_items,
            &last.last_success_figures,
        );
    }
    if let Ok(info) = app.store.consumer.get_info().await {
        app.metrics
            .queue_pending
            .set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
    }
}

/// Feeds systemd's watchdog (`WatchdogSec=`) while the runner loop beats; a runner that stops
/// beating (a stalled runtime, a deadlock) lets the watchdog expire and systemd restart us.
async fn watchdog(app: Arc<App>, stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    loop {
        if app.runner_silence() < interval {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        } else {
            tracing::error!(
                silent_for = ?app.runner_silence(),
                "Job runner loop stalled; not feeding the systemd watchdog"
            );
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval / 3) => {}
        }
    }
}

/// Returns once the server has registered every subscription this connection made: a message
/// to our own inbox comes back only after the server processed what we sent before it (a
/// flush only empties our socket buffer). Bounded, so a slow server delays READY, never stops it.
async fn subscriptions_registered(client: &async_nats::Client) {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let Ok(mut echo) = client.subscribe(inbox.clone()).await else {
        return;
    };
    if client.publish(inbox, bytes::Bytes::new()).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), echo.next()).await;
}

/// Asks JetStream for the jobs stream every two seconds so `/readyz` can answer from memory.
async fn probe_jetstream(app: Arc<App>, readiness: Arc<Readiness>, stop: CancellationToken) {
    loop {
        let connected =
            app.store.client.connection_state() == async_nats::connection::State::Connected;
        let result = if connected {
            match tokio::time::timeout(Duration::from_secs(2), app.store.jobs.get_info()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer within 2s".to_string()),
            }
        } else {
            Err("disconnected".to_string())
        };
        app.metrics.nats_connected.set(i64::from(connected));
        match result {
            Ok(()) => readiness.jetstream_ok.store(true, Ordering::Relaxed),
            Err(e) => {
                readiness.jetstream_ok.store(false, Ordering::Relaxed);
                if let Ok(mut slot) = readiness.jetstream_error.lock() {
                    *slot = e;
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
