//! Argo CD sync through the Kubernetes API: set the root Application's `operation` (as Argo
//! CD's own API server and `kubectl patch` do), wait for the operation to finish, then for the
//! app to be `Synced` and `Healthy`; report the child Applications that are not.

use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::handler::HandlerError;

const POLL: Duration = Duration::from_secs(2);

fn applications(client: kube::Client, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("argoproj.io", "v1alpha1", "Application");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "applications");
    Api::namespaced_with(client, namespace, &resource)
}

fn kube_error(what: &str, e: kube::Error) -> HandlerError {
    match e {
        kube::Error::Api(status) if status.code == 404 => {
            HandlerError::Failed(format!("{what}: not found ({})", status.message))
        }
        kube::Error::Api(status) => HandlerError::Retryable(format!(
            "{what}: the Kubernetes API answered {} {}",
            status.code, status.message
        )),
        other => HandlerError::Retryable(format!("{what}: {other}")),
    }
}

/// Sync and health of one Application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppState {
    pub name: String,
    pub sync: String,
    pub health: String,
}

impl AppState {
    fn of(app: &DynamicObject) -> Self {
        let status = &app.data["status"];
        Self {
            name: app.metadata.name.clone().unwrap_or_default(),
            sync: status["sync"]["status"]
                .as_str()
                .unwrap_or("Unknown")
                .to_string(),
            health: status["health"]["status"]
                .as_str()
                .unwrap_or("Unknown")
                .to_string(),
        }
    }

    pub fn ok(&self) -> bool {
        self.sync == "Synced" && self.health == "Healthy"
    }
}

/// The outcome of a sync: the root app's state and the children that are not synced and
/// healthy.
#[derive(Debug, Clone)]
pub struct SyncReport {
    pub root: AppState,
    pub unhealthy_children: Vec<AppState>,
}

impl SyncReport {
    pub fn describe(&self) -> String {
        let mut s = format!(
            "Argo CD {} is {}/{}",
            self.root.name, self.root.sync, self.root.health
        );
        if !self.unhealthy_children.is_empty() {
            let children: Vec<String> = self
                .unhealthy_children
                .iter()
                .map(|c| format!("{} {}/{}", c.name, c.sync, c.health))
                .collect();
            s.push_str(&format!(
                "; not synced and healthy: {}",
                children.join(", ")
            ));
        }
        s
    }
}

/// The Application's sync and health now, without asking for a sync: the upgrade's gate.
pub async fn state(
    client: kube::Client,
    namespace: &str,
    app: &str,
) -> Result<AppState, HandlerError> {
    let what = format!("Application {namespace}/{app}");
    let current = applications(client, namespace)
        .get(app)
        .await
        .map_err(|e| kube_error(&what, e))?;
    Ok(AppState::of(&current))
}

/// Requests a sync of `app` and waits up to `timeout` for it to be synced and healthy.
pub async fn sync(
    client: kube::Client,
    namespace: &str,
    app: &str,
    job_id: &str,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<SyncReport, HandlerError> {
    let api = applications(client, namespace);
    let started = Instant::now();
    let what = format!("Application {namespace}/{app}");
    // Another operation in progress (a manual sync, auto-sync): wait for it rather than refuse.
    loop {
        let current = api.get(app).await.map_err(|e| kube_error(&what, e))?;
        if current.data.get("operation").is_none_or(Value::is_null) {
            break;
        }
        wait(
            started,
            timeout,
            cancel,
            &format!("another operation on {what} to finish"),
        )
        .await?;
    }
    let patch = json!({
        "operation": {
            "initiatedBy": {"username": "infraflux-agent"},
            "info": [{"name": "job", "value": job_id}],
            "sync": {"syncStrategy": {"hook": {}}}
        }
    });
    api.patch(app, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| kube_error(&format!("sync {what}"), e))?;
    // The controller clears `operation` when the operation completes and records its phase.
    let finished = loop {
        wait(
            started,
            timeout,
            cancel,
            &format!("the sync of {what} to finish"),
        )
        .await?;
        let current = api.get(app).await.map_err(|e| kube_error(&what, e))?;
        let phase = current.data["status"]["operationState"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let pending = current.data.get("operation").is_some_and(|o| !o.is_null());
        if !pending && matches!(phase.as_str(), "Succeeded" | "Failed" | "Error") {
            break (current, phase);
        }
    };
    let (mut current, phase) = finished;
    if phase != "Succeeded" {
        let message = current.data["status"]["operationState"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        return Err(HandlerError::Failed(format!(
            "Argo CD sync of {app} ended {phase}: {message}"
        )));
    }
    while !AppState::of(&current).ok() {
        if started.elapsed() >= timeout {
            break;
        }
        wait(started, timeout, cancel, "").await.ok();
        current = api.get(app).await.map_err(|e| kube_error(&what, e))?;
    }
    let root = AppState::of(&current);
    let mut unhealthy_children = Vec::new();
    let children: Vec<String> = current.data["status"]["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["kind"] == "Application")
        .filter_map(|r| r["name"].as_str().map(str::to_string))
        .collect();
    for child in children {
        match api.get(&child).await {
            Ok(c) => {
                let state = AppState::of(&c);
                if !state.ok() {
                    unhealthy_children.push(state);
                }
            }
            Err(e) => unhealthy_children.push(AppState {
                name: child,
                sync: "Unknown".into(),
                health: format!(
                    "unreadable ({})",
                    e.to_string().lines().next().unwrap_or_default()
                ),
            }),
        }
    }
    let report = SyncReport {
        root,
        unhealthy_children,
    };
    if report.root.ok() && report.unhealthy_children.is_empty() {
        Ok(report)
    } else {
        Err(HandlerError::Failed(format!(
            "{} after {}s",
            report.describe(),
            timeout.as_secs()
        )))
    }
}

async fn wait(
    started: Instant,
    timeout: Duration,
    cancel: &CancellationToken,
    what: &str,
) -> Result<(), HandlerError> {
    if started.elapsed() >= timeout {
        return Err(HandlerError::Failed(format!(
            "timed out after {}s waiting for {what}",
            timeout.as_secs()
        )));
    }
    tokio::select! {
        () = cancel.cancelled() => Err(HandlerError::Cancelled),
        () = tokio::time::sleep(POLL) => Ok(()),
    }
}
