//! Fakes of the APIs no real peer can run here: GitHub's REST API and the Kubernetes API with
//! an Argo CD Application. They speak the real wire shapes (paths, methods, JSON), record what
//! they were asked, and let the test move state. The product does not know they are fakes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, patch, post};
use chrono::Utc;
use serde_json::{Value, json};

/// One request a fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub body: Value,
    pub authorization: Option<String>,
}

async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind fake");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

// ---------------------------------------------------------------------------------------------
// GitHub

/// A webhook delivery the fake can list and redeliver.
#[derive(Debug, Clone)]
pub struct FakeDelivery {
    pub id: u64,
    pub guid: String,
    pub event: String,
    pub status_code: u16,
    pub delivered_at: chrono::DateTime<Utc>,
    pub payload: Vec<u8>,
}

#[derive(Default)]
struct GithubState {
    requests: Vec<Recorded>,
    statuses: BTreeMap<String, Vec<Value>>,
    comments: Vec<Value>,
    issues: Vec<Value>,
    deliveries: Vec<FakeDelivery>,
    /// Comments on commits: `{"commit_id", "body", ...}`.
    commit_comments: Vec<Value>,
    /// Pull requests the API answers for, by number.
    pull_requests: BTreeMap<u64, Value>,
    /// Comments people wrote, as `GET .../comments/{id}` answers: (on a commit, id) → comment.
    people_comments: BTreeMap<(bool, u64), Value>,
    /// Collaborator permissions by login; anyone else is not a collaborator (404).
    permissions: BTreeMap<String, String>,
    next_id: u64,
    /// Where redeliveries are sent, and the secret they are signed with.
    webhook: Option<(String, String)>,
}

#[derive(Clone)]
pub struct FakeGithub {
    pub url: String,
    state: Arc<Mutex<GithubState>>,
}

fn user(login: &str) -> Value {
    json!({"login": login, "id": 1, "node_id": "MDQ6VXNlcjE=", "type": "Bot", "site_admin": false})
}

impl FakeGithub {
    pub async fn start() -> FakeGithub {
        let state = Arc::new(Mutex::new(GithubState {
            next_id: 1000,
            ..Default::default()
        }));
        let router = Router::new()
            .route("/repos/{o}/{r}/statuses/{sha}", post(gh_status))
            .route(
                "/repos/{o}/{r}/issues/{n}/comments",
                get(gh_list_comments).post(gh_create_comment),
            )
            .route(
                "/repos/{o}/{r}/issues/comments/{id}",
                get(gh_issue_comment)
                    .patch(gh_update_comment)
                    .delete(gh_delete_comment),
            )
            .route("/repos/{o}/{r}/comments/{id}", get(gh_commit_comment))
            .route(
                "/repos/{o}/{r}/issues",
                get(gh_list_issues).post(gh_create_issue),
            )
            .route("/repos/{o}/{r}/issues/{n}", patch(gh_update_issue))
            .route(
                "/repos/{o}/{r}/commits/{sha}/comments",
                post(gh_create_commit_comment),
            )
            .route("/repos/{o}/{r}/pulls/{n}", get(gh_pull_request))
            .route(
                "/repos/{o}/{r}/collaborators/{login}/permission",
                get(gh_permission),
            )
            .route("/repos/{o}/{r}/hooks", get(gh_hooks))
            .route("/repos/{o}/{r}/hooks/{h}/deliveries", get(gh_deliveries))
            .route(
                "/repos/{o}/{r}/hooks/{h}/deliveries/{d}/attempts",
                post(gh_redeliver),
            )
            .fallback(gh_not_found)
            .with_state(state.clone());
        let addr = serve(router).await;
        FakeGithub {
            url: format!("http://{addr}"),
            state,
        }
    }

    /// Where redeliveries go (the agent's webhook) and how they are signed.
    pub fn set_webhook(&self, url: &str, secret: &str) {
        self.lock().webhook = Some((url.to_string(), secret.to_string()));
    }

    pub fn add_delivery(&self, delivery: FakeDelivery) {
        self.lock().deliveries.push(delivery);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GithubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// The statuses set on a commit, oldest first.
    pub fn statuses(&self, sha: &str) -> Vec<Value> {
        self.lock().statuses.get(sha).cloned().unwrap_or_default()
    }

    pub fn comments(&self) -> Vec<Value> {
        self.lock().comments.clone()
    }

    pub fn issues(&self) -> Vec<Value> {
        self.lock().issues.clone()
    }

    pub fn commit_comments(&self) -> Vec<Value> {
        self.lock().commit_comments.clone()
    }

    /// A pull request of `lab/infra` whose head is `head_sha`; `merge_commit` once merged.
    pub fn add_pull_request(&self, number: u64, head_sha: &str, merge_commit: Option<&str>) {
        let pr = json!({
            "url": format!("https://api.github.com/repos/lab/infra/pulls/{number}"),
            "id": 1_000_000 + number,
            "number": number,
            "state": if merge_commit.is_some() { "closed" } else { "open" },
            "merged": merge_commit.is_some(),
            "merge_commit_sha": merge_commit,
            "head": {"ref": "feature", "sha": head_sha, "repo": {"full_name": "lab/infra"}},
            "base": {"ref": "main", "repo": {"full_name": "lab/infra"}},
            "user": user("alice"),
            "author_association": "MEMBER",
        });
        self.lock().pull_requests.insert(number, pr);
    }

    /// A comment `login` wrote (on a commit when `on_commit`, else on an issue or pull
    /// request), as GitHub's API returns it.
    pub fn add_comment_by(&self, on_commit: bool, id: u64, login: &str, body: &str) {
        let comment = json!({
            "id": id,
            "body": body,
            "user": {"login": login, "id": 7, "type": "User"},
            "author_association": "MEMBER",
            "created_at": Utc::now().to_rfc3339(),
        });
        self.lock().people_comments.insert((on_commit, id), comment);
    }

    /// `login`'s permission on the repository (`admin`, `write`, `read`, ...).
    pub fn set_permission(&self, login: &str, permission: &str) {
        self.lock()
            .permissions
            .insert(login.to_ascii_lowercase(), permission.to_string());
    }
}

type GhState = State<Arc<Mutex<GithubState>>>;

fn record(
    state: &Arc<Mutex<GithubState>>,
    method: &str,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) {
    let body = serde_json::from_slice(body).unwrap_or(Value::Null);
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Ok(mut s) = state.lock() {
        s.requests.push(Recorded {
            method: method.into(),
            path: path.into(),
            body,
            authorization,
        });
    }
}

async fn gh_status(
    State(s): GhState,
    Path((o, r, sha)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(
        &s,
        "POST",
        &format!("/repos/{o}/{r}/statuses/{sha}"),
        &headers,
        &body,
    );
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    st.next_id += 1;
    let status = json!({
        "url": format!("https://api.github.com/repos/{o}/{r}/statuses/{sha}"),
        "id": st.next_id,
        "node_id": "SC_kwDO",
        "state": req["state"],
        "description": req["description"],
        "target_url": req["target_url"],
        "context": req["context"],
        "created_at": Utc::now().to_rfc3339(),
        "updated_at": Utc::now().to_rfc3339(),
        "creator": user("infraflux-bot"),
    });
    st.statuses.entry(sha).or_default().push(status.clone());
    (StatusCode::CREATED, axum::Json(status)).into_response()
}

fn comment_json(id: u64, issue: u64, body: &str) -> Value {
    json!({
        "id": id,
        "node_id": "IC_kwDO",
        "url": format!("https://api.github.com/repos/lab/infra/issues/comments/{id}"),
        "html_url": format!("https://github.com/lab/infra/pull/{issue}#issuecomment-{id}"),
        "issue_url": format!("https://api.github.com/repos/lab/infra/issues/{issue}"),
        "body": body,
        "user": user("infraflux-bot"),
        "created_at": Utc::now().to_rfc3339(),
        "updated_at": Utc::now().to_rfc3339(),
        "author_association": "NONE",
        "issue": issue,
    })
}

async fn gh_list_comments(
    State(s): GhState,
    Path((_o, _r, n)): Path<(String, String, u64)>,
) -> Response {
    let st = s.lock().unwrap_or_else(|p| p.into_inner());
    let list: Vec<Value> = st
        .comments
        .iter()
        .filter(|c| c["issue"] == n)
        .cloned()
        .collect();
    axum::Json(list).into_response()
}

async fn gh_create_comment(
    State(s): GhState,
    Path((o, r, n)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(
        &s,
        "POST",
        &format!("/repos/{o}/{r}/issues/{n}/comments"),
        &headers,
        &body,
    );
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    st.next_id += 1;
    let c = comment_json(st.next_id, n, req["body"].as_str().unwrap_or_default());
    st.comments.push(c.clone());
    (StatusCode::CREATED, axum::Json(c)).into_response()
}

async fn gh_create_commit_comment(
    State(s): GhState,
    Path((o, r, sha)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(
        &s,
        "POST",
        &format!("/repos/{o}/{r}/commits/{sha}/comments"),
        &headers,
        &body,
    );
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    st.next_id += 1;
    let comment = json!({
        "id": st.next_id,
        "node_id": "CC_kwDO",
        "html_url": format!("https://github.com/{o}/{r}/commit/{sha}#commitcomment-{}", st.next_id),
        "commit_id": sha,
        "body": req["body"],
        "user": user("infraflux-bot"),
        "created_at": Utc::now().to_rfc3339(),
        "author_association": "NONE",
    });
    st.commit_comments.push(comment.clone());
    (StatusCode::CREATED, axum::Json(comment)).into_response()
}

async fn gh_issue_comment(
    State(s): GhState,
    Path((_o, _r, id)): Path<(String, String, u64)>,
) -> Response {
    let st = s.lock().unwrap_or_else(|p| p.into_inner());
    let found = st
        .people_comments
        .get(&(false, id))
        .or_else(|| st.comments.iter().find(|c| c["id"] == id));
    match found {
        Some(c) => axum::Json(c.clone()).into_response(),
        None => gh_404(),
    }
}

async fn gh_commit_comment(
    State(s): GhState,
    Path((_o, _r, id)): Path<(String, String, u64)>,
) -> Response {
    let st = s.lock().unwrap_or_else(|p| p.into_inner());
    let found = st
        .people_comments
        .get(&(true, id))
        .or_else(|| st.commit_comments.iter().find(|c| c["id"] == id));
    match found {
        Some(c) => axum::Json(c.clone()).into_response(),
        None => gh_404(),
    }
}

async fn gh_pull_request(
    State(s): GhState,
    Path((_o, _r, n)): Path<(String, String, u64)>,
) -> Response {
    let st = s.lock().unwrap_or_else(|p| p.into_inner());
    match st.pull_requests.get(&n) {
        Some(pr) => axum::Json(pr.clone()).into_response(),
        None => gh_404(),
    }
}

/// GitHub's collaborator permission API: `permission` is the legacy level (`maintain` reads as
/// `write`), `role_name` the role.
async fn gh_permission(
    State(s): GhState,
    Path((_o, _r, login)): Path<(String, String, String)>,
) -> Response {
    let st = s.lock().unwrap_or_else(|p| p.into_inner());
    match st.permissions.get(&login.to_ascii_lowercase()) {
        Some(role) => {
            let permission = match role.as_str() {
                "maintain" => "write",
                "triage" => "read",
                other => other,
            };
            axum::Json(json!({
                "permission": permission,
                "role_name": role,
                "user": user(&login),
            }))
            .into_response()
        }
        None => gh_404(),
    }
}

async fn gh_update_comment(
    State(s): GhState,
    Path((o, r, id)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(
        &s,
        "PATCH",
        &format!("/repos/{o}/{r}/issues/comments/{id}"),
        &headers,
        &body,
    );
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    match st.comments.iter_mut().find(|c| c["id"] == id) {
        Some(c) => {
            c["body"] = req["body"].clone();
            c["updated_at"] = json!(Utc::now().to_rfc3339());
            axum::Json(c.clone()).into_response()
        }
        None => gh_404(),
    }
}

async fn gh_delete_comment(
    State(s): GhState,
    Path((o, r, id)): Path<(String, String, u64)>,
    headers: HeaderMap,
) -> Response {
    record(
        &s,
        "DELETE",
        &format!("/repos/{o}/{r}/issues/comments/{id}"),
        &headers,
        &Bytes::new(),
    );
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    st.comments.retain(|c| c["id"] != id);
    StatusCode::NO_CONTENT.into_response()
}

async fn gh_list_issues(State(s): GhState) -> Response {
    let st = s.lock().unwrap_or_else(|p| p.into_inner());
    let open: Vec<Value> = st
        .issues
        .iter()
        .filter(|i| i["state"] == "open")
        .cloned()
        .collect();
    axum::Json(open).into_response()
}

async fn gh_create_issue(
    State(s): GhState,
    Path((o, r)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(
        &s,
        "POST",
        &format!("/repos/{o}/{r}/issues"),
        &headers,
        &body,
    );
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    st.next_id += 1;
    let number = st.issues.len() as u64 + 1;
    let issue = json!({"id": st.next_id, "number": number, "state": "open", "title": req["title"], "body": req["body"], "labels": req["labels"], "user": user("infraflux-bot")});
    st.issues.push(issue.clone());
    (StatusCode::CREATED, axum::Json(issue)).into_response()
}

async fn gh_update_issue(
    State(s): GhState,
    Path((o, r, n)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(
        &s,
        "PATCH",
        &format!("/repos/{o}/{r}/issues/{n}"),
        &headers,
        &body,
    );
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    match st.issues.iter_mut().find(|i| i["number"] == n) {
        Some(issue) => {
            for (k, v) in req.as_object().into_iter().flatten() {
                issue[k] = v.clone();
            }
            axum::Json(issue.clone()).into_response()
        }
        None => gh_404(),
    }
}

async fn gh_hooks(State(s): GhState) -> Response {
    let st = s.lock().unwrap_or_else(|p| p.into_inner());
    let url = st
        .webhook
        .as_ref()
        .map(|(u, _)| u.clone())
        .unwrap_or_default();
    axum::Json(json!([{
        "type": "Repository", "id": 42, "name": "web", "active": true, "events": ["push", "pull_request"],
        "config": {"content_type": "json", "insecure_ssl": "0", "url": url},
    }]))
    .into_response()
}

async fn gh_deliveries(
    State(s): GhState,
    Path((_o, _r, h)): Path<(String, String, u64)>,
) -> Response {
    if h != 42 {
        return gh_404();
    }
    let st = s.lock().unwrap_or_else(|p| p.into_inner());
    let mut list: Vec<&FakeDelivery> = st.deliveries.iter().collect();
    list.sort_by_key(|d| std::cmp::Reverse(d.delivered_at));
    let body: Vec<Value> = list
        .iter()
        .map(|d| {
            json!({
                "id": d.id, "guid": d.guid, "delivered_at": d.delivered_at.to_rfc3339(),
                "redelivery": false, "duration": 0.2,
                "status": if (200..300).contains(&d.status_code) { "OK".to_string() } else { format!("Invalid HTTP Response: {}", d.status_code) },
                "status_code": d.status_code, "event": d.event, "action": null,
                "installation_id": null, "repository_id": 1,
            })
        })
        .collect();
    axum::Json(body).into_response()
}

/// GitHub redelivers a delivery with the same guid and payload; so does the fake, to the
/// configured webhook, signed like GitHub signs.
async fn gh_redeliver(
    State(s): GhState,
    Path((o, r, h, d)): Path<(String, String, u64, u64)>,
    headers: HeaderMap,
) -> Response {
    record(
        &s,
        "POST",
        &format!("/repos/{o}/{r}/hooks/{h}/deliveries/{d}/attempts"),
        &headers,
        &Bytes::new(),
    );
    let (delivery, webhook) = {
        let st = s.lock().unwrap_or_else(|p| p.into_inner());
        (
            st.deliveries.iter().find(|x| x.id == d).cloned(),
            st.webhook.clone(),
        )
    };
    let (Some(delivery), Some((url, secret))) = (delivery, webhook) else {
        return gh_404();
    };
    let signature = crate::sign(&secret, &delivery.payload);
    let sent = reqwest::Client::new()
        .post(&url)
        .header("X-GitHub-Event", &delivery.event)
        .header("X-GitHub-Delivery", &delivery.guid)
        .header("X-Hub-Signature-256", signature)
        .header("Content-Type", "application/json")
        .body(delivery.payload.clone())
        .send()
        .await;
    let code = sent.map(|r| r.status().as_u16()).unwrap_or(0);
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    st.next_id += 1;
    let id = st.next_id;
    st.deliveries.push(FakeDelivery {
        id,
        status_code: code,
        delivered_at: Utc::now(),
        ..delivery
    });
    (StatusCode::ACCEPTED, axum::Json(json!({}))).into_response()
}

fn gh_404() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"message": "Not Found", "documentation_url": "https://docs.github.com/rest", "status": "404"})),
    )
        .into_response()
}

async fn gh_not_found(method: Method, uri: Uri) -> Response {
    tracing::warn!(%method, %uri, "fake GitHub: no route");
    gh_404()
}

// ---------------------------------------------------------------------------------------------
// Kubernetes: Argo CD Applications and Velero objects

#[derive(Default)]
struct KubeState {
    /// `plural/namespace/name` → object.
    objects: BTreeMap<String, Value>,
    requests: Vec<Recorded>,
    /// How the fake Argo CD controller ends a sync, and the message it records.
    controller_phase: String,
    controller_message: String,
    /// The `status` the fake Velero controller gives a backup when it ends.
    backup_outcome: Value,
    next_uid: u64,
}

#[derive(Clone)]
pub struct FakeKube {
    pub url: String,
    state: Arc<Mutex<KubeState>>,
}

fn object_key(plural: &str, namespace: &str, name: &str) -> String {
    format!("{plural}/{namespace}/{name}")
}

impl FakeKube {
    /// A Kubernetes API holding namespaced custom objects, with two small controllers:
    /// Argo CD's (a requested sync completes after a moment: `operation` cleared,
    /// `operationState` recorded, sync and health set) and Velero's (a new Backup goes
    /// `InProgress`, then ends with the outcome the test set).
    pub async fn start(namespace: &str) -> FakeKube {
        let state = Arc::new(Mutex::new(KubeState {
            controller_phase: "Succeeded".into(),
            controller_message: "successfully synced (all tasks run)".into(),
            backup_outcome: json!({"phase": "Completed", "progress": {"itemsBackedUp": 42, "totalItems": 42}, "warnings": 0, "errors": 0}),
            ..Default::default()
        }));
        let router = Router::new()
            .route(
                "/apis/{group}/{version}/namespaces/{ns}/{plural}",
                any(kube_collection),
            )
            .route(
                "/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}",
                any(kube_object),
            )
            .fallback(kube_not_found)
            .with_state(state.clone());
        let addr = serve(router).await;
        let controller = state.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let mut st = controller.lock().unwrap_or_else(|p| p.into_inner());
                let phase = st.controller_phase.clone();
                let message = st.controller_message.clone();
                let outcome = st.backup_outcome.clone();
                for (key, obj) in st.objects.iter_mut() {
                    if key.starts_with("applications/")
                        && obj.get("operation").is_some_and(|o| !o.is_null())
                    {
                        let op = obj["operation"].clone();
                        obj["operation"] = Value::Null;
                        obj["status"]["operationState"] = json!({
                            "phase": phase, "message": message,
                            "operation": op, "startedAt": Utc::now().to_rfc3339(), "finishedAt": Utc::now().to_rfc3339(),
                        });
                        if phase == "Succeeded" {
                            obj["status"]["sync"]["status"] = json!("Synced");
                            obj["status"]["health"]["status"] = json!("Healthy");
                        }
                    }
                    if key.starts_with("backups/") {
                        match obj["status"]["phase"].as_str() {
                            None | Some("New") => {
                                obj["status"] = json!({"phase": "InProgress", "startTimestamp": Utc::now().to_rfc3339()});
                            }
                            Some("InProgress") => {
                                let mut status = outcome.clone();
                                status["startTimestamp"] = obj["status"]["startTimestamp"].clone();
                                status["completionTimestamp"] = json!(Utc::now().to_rfc3339());
                                obj["status"] = status;
                            }
                            _ => {}
                        }
                    }
                }
            }
        });
        let _ = namespace;
        FakeKube {
            url: format!("http://{addr}"),
            state,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KubeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_object(&self, plural: &str, namespace: &str, name: &str, object: Value) {
        self.lock()
            .objects
            .insert(object_key(plural, namespace, name), object);
    }

    pub fn object(&self, plural: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&object_key(plural, namespace, name))
            .cloned()
    }

    /// Every object of a kind, for assertions.
    pub fn objects(&self, plural: &str) -> Vec<Value> {
        let prefix = format!("{plural}/");
        self.lock()
            .objects
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// How the next Argo CD syncs end: their `operationState` phase and message.
    pub fn set_sync_outcome(&self, phase: &str, message: &str) {
        let mut st = self.lock();
        st.controller_phase = phase.to_string();
        st.controller_message = message.to_string();
    }

    /// The `status` the next backups end with.
    pub fn set_backup_outcome(&self, status: Value) {
        self.lock().backup_outcome = status;
    }

    /// Adds an Application `name` in `namespace` with the given sync and health, and the child
    /// Applications it manages.
    pub fn add_app(
        &self,
        namespace: &str,
        name: &str,
        sync: &str,
        health: &str,
        children: &[&str],
    ) {
        let resources: Vec<Value> = children
            .iter()
            .map(|c| json!({"group": "argoproj.io", "version": "v1alpha1", "kind": "Application", "namespace": namespace, "name": c, "status": "Synced"}))
            .collect();
        let app = json!({
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Application",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "resourceVersion": "1", "generation": 1},
            "spec": {"project": "default", "source": {"repoURL": "https://github.com/lab/infra.git", "path": format!("apps/{name}"), "targetRevision": "main"}, "destination": {"server": "https://kubernetes.default.svc", "namespace": namespace}},
            "status": {"sync": {"status": sync}, "health": {"status": health}, "resources": resources},
        });
        self.add_object("applications", namespace, name, app);
    }

    pub fn app(&self, namespace: &str, name: &str) -> Option<Value> {
        self.object("applications", namespace, name)
    }

    /// A Velero BackupStorageLocation in `phase`, validated `validated_ago` ago.
    pub fn add_storage_location(
        &self,
        namespace: &str,
        name: &str,
        phase: &str,
        validated_ago: chrono::Duration,
    ) {
        let bsl = json!({
            "apiVersion": "velero.io/v1",
            "kind": "BackupStorageLocation",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-bsl-{name}"), "resourceVersion": "1"},
            "spec": {"provider": "aws", "objectStorage": {"bucket": "infraflux-velero"}, "default": true},
            "status": {
                "phase": phase,
                "lastValidationTime": (Utc::now() - validated_ago).to_rfc3339(),
                "message": if phase == "Available" { "" } else { "BackupStorageLocation \"default\" is unavailable: rpc error: code = Unknown desc = InvalidAccessKeyId" },
            },
        });
        self.add_object("backupstoragelocations", namespace, name, bsl);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// A kubeconfig pointing at this API server.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n",
            self.url
        );
        std::fs::write(&path, text).expect("kubeconfig");
        path
    }
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in p {
                if v.is_null() {
                    if let Some(t) = target.as_object_mut() {
                        t.remove(k);
                    }
                } else if let Some(t) = target.as_object_mut() {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

type KubeShared = State<Arc<Mutex<KubeState>>>;

fn kube_record(
    st: &mut KubeState,
    method: &Method,
    path: String,
    headers: &HeaderMap,
    body: &Bytes,
) {
    st.requests.push(Recorded {
        method: method.to_string(),
        path,
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    });
}

async fn kube_collection(
    State(s): KubeShared,
    Path((group, version, ns, plural)): Path<(String, String, String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    kube_record(
        &mut st,
        &method,
        format!("/apis/{group}/{version}/namespaces/{ns}/{plural}"),
        &headers,
        &body,
    );
    match method {
        Method::POST => {
            let mut object: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => return kube_status(400, "BadRequest", &e.to_string()),
            };
            let Some(name) = object["metadata"]["name"].as_str().map(str::to_string) else {
                return kube_status(422, "Invalid", "metadata.name: Required value");
            };
            if let Some(problem) = schema_problem(&group, &plural, &object) {
                return kube_status(422, "Invalid", &problem);
            }
            let key = object_key(&plural, &ns, &name);
            if st.objects.contains_key(&key) {
                return kube_status(
                    409,
                    "AlreadyExists",
                    &format!("{plural}.{group} \"{name}\" already exists"),
                );
            }
            st.next_uid += 1;
            object["metadata"]["uid"] = json!(format!("uid-{}", st.next_uid));
            object["metadata"]["resourceVersion"] = json!("1");
            object["metadata"]["creationTimestamp"] = json!(Utc::now().to_rfc3339());
            st.objects.insert(key, object.clone());
            (StatusCode::CREATED, axum::Json(object)).into_response()
        }
        Method::GET => {
            let prefix = format!("{plural}/{ns}/");
            let items: Vec<Value> = st
                .objects
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(_, v)| v.clone())
                .collect();
            axum::Json(json!({"apiVersion": format!("{group}/{version}"), "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items})).into_response()
        }
        _ => kube_status(405, "MethodNotAllowed", "method not allowed"),
    }
}

async fn kube_object(
    State(s): KubeShared,
    Path((group, version, ns, plural, name)): Path<(String, String, String, String, String)>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
    kube_record(
        &mut st,
        &method,
        format!("/apis/{group}/{version}/namespaces/{ns}/{plural}/{name}"),
        &headers,
        &body,
    );
    let key = object_key(&plural, &ns, &name);
    let Some(object) = st.objects.get_mut(&key) else {
        return kube_status(
            404,
            "NotFound",
            &format!("{plural}.{group} \"{name}\" not found"),
        );
    };
    match method {
        Method::GET => axum::Json(object.clone()).into_response(),
        Method::PATCH => {
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if content_type != "application/merge-patch+json" {
                return kube_status(
                    415,
                    "UnsupportedMediaType",
                    &format!("the fake accepts merge patches, got {content_type}"),
                );
            }
            let patch: Value = serde_json::from_slice(&body).unwrap_or_default();
            let mut patched = object.clone();
            merge(&mut patched, &patch);
            if let Some(problem) = schema_problem(&group, &plural, &patched) {
                return kube_status(422, "Invalid", &problem);
            }
            *object = patched;
            let rv = object["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
                + 1;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            axum::Json(object.clone()).into_response()
        }
        Method::DELETE => {
            let removed = st.objects.remove(&key);
            axum::Json(removed.unwrap_or(Value::Null)).into_response()
        }
        _ => kube_status(405, "MethodNotAllowed", "method not allowed"),
    }
}

/// The custom resource's schema from the real CRD in `tests/fixtures`, for the kinds the
/// agent writes (Velero, Argo CD).
fn crd_schema(group: &str, plural: &str) -> Option<Value> {
    let file = match (group, plural) {
        ("velero.io", _) => format!("velero-crds/{group}_{plural}.yaml"),
        ("argoproj.io", "applications") => "argocd/application-crd.yaml".to_string(),
        _ => return None,
    };
    let text = String::from_utf8(crate::fixture(&file)).ok()?;
    let crd: Value = serde_saphyr::from_str(&text).ok()?;
    crd["spec"]["versions"]
        .as_array()?
        .iter()
        .find(|v| v["served"] == true)
        .map(|v| v["schema"]["openAPIV3Schema"].clone())
}

/// What a strict API server (`fieldValidation=Strict`) would refuse in `object`: a field the CRD
/// does not declare, or a value of the wrong type. A real server with the default validation
/// drops unknown fields with a warning, so a misspelt field would vanish silently; the fake
/// refuses it so that a test fails.
fn schema_problem(group: &str, plural: &str, object: &Value) -> Option<String> {
    let schema = crd_schema(group, plural)?;
    let mut body = object.clone();
    if let Some(map) = body.as_object_mut() {
        // Server-owned or generic parts: metadata is ObjectMeta, status is the controller's.
        for generic in ["apiVersion", "kind", "metadata", "status"] {
            map.remove(generic);
        }
    }
    check_schema(&schema, &body, "")
}

fn check_schema(schema: &Value, value: &Value, at: &str) -> Option<String> {
    if schema["x-kubernetes-preserve-unknown-fields"] == true || value.is_null() {
        return None;
    }
    let expected = schema["type"].as_str().unwrap_or_default();
    let fits = match expected {
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => true,
    };
    // int-or-string fields (durations in some CRDs) accept both.
    if !fits && schema["x-kubernetes-int-or-string"] != true {
        return Some(format!("{at}: expected {expected}, got {value}"));
    }
    match value {
        Value::Object(map) => {
            let properties = schema["properties"].as_object();
            for (key, item) in map {
                let path = if at.is_empty() {
                    key.clone()
                } else {
                    format!("{at}.{key}")
                };
                let item_schema = match properties.and_then(|p| p.get(key)) {
                    Some(s) => s,
                    None if schema["additionalProperties"].is_object() => {
                        &schema["additionalProperties"]
                    }
                    None if properties.is_none() => continue,
                    None => return Some(format!("unknown field \"{path}\"")),
                };
                if let Some(problem) = check_schema(item_schema, item, &path) {
                    return Some(problem);
                }
            }
            None
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| check_schema(&schema["items"], item, &format!("{at}[{i}]"))),
        _ => None,
    }
}

fn kube_status(code: u16, reason: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code})),
    )
        .into_response()
}

async fn kube_not_found(uri: Uri) -> Response {
    kube_status(
        404,
        "NotFound",
        &format!("the server could not find the requested resource ({uri})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fake_api_refuses_what_the_crd_does_not_declare() {
        let backup = |spec: Value| json!({"apiVersion": "velero.io/v1", "kind": "Backup", "metadata": {"name": "b"}, "spec": spec});
        let good = backup(
            json!({"includedNamespaces": ["*"], "ttl": "72h0m0s", "storageLocation": "default"}),
        );
        assert_eq!(schema_problem("velero.io", "backups", &good), None);
        let typo = backup(json!({"includeNamespaces": ["*"]}));
        assert_eq!(
            schema_problem("velero.io", "backups", &typo).as_deref(),
            Some("unknown field \"spec.includeNamespaces\"")
        );
        let wrong_type = backup(json!({"includedNamespaces": "media"}));
        assert!(
            schema_problem("velero.io", "backups", &wrong_type)
                .is_some_and(|p| p.starts_with("spec.includedNamespaces: expected array")),
        );
        let sync = json!({"metadata": {"name": "root"}, "operation": {"sync": {"revision": "HEAD"}, "initiatedBy": {"username": "infraflux"}}});
        assert_eq!(schema_problem("argoproj.io", "applications", &sync), None);
    }
}
