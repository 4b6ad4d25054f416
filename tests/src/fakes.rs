//! Fakes of the APIs no real peer can run here: GitHub's REST API and the Kubernetes API with
//! an Argo CD Application. They speak the real wire shapes (paths, methods, JSON), record what
//! they were asked, and let the test move state. The product does not know they are fakes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
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

pub(crate) async fn serve(router: Router) -> SocketAddr {
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
    /// The tokens GitHub knows. Empty: every request is accepted, whatever it carries.
    tokens: BTreeMap<String, FakeToken>,
    /// How the next requests are answered instead of served, one each, in order.
    /// Faults to answer with, each for the next request whose `"METHOD /path"` contains its
    /// filter (any request without one).
    faults: std::collections::VecDeque<(Option<String>, GithubFault)>,
    /// The requests answered with a fault: (method path, status, when).
    faulted: Vec<(String, u16, std::time::Instant)>,
}

/// An answer GitHub gives when it is not serving a request, with its real headers and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GithubFault {
    /// 500, 502, 503: GitHub having an incident.
    ServerError(u16),
    /// The primary rate limit: 403 (or 429) with `x-ratelimit-remaining: 0` and
    /// `x-ratelimit-reset` `reset_in` seconds from now.
    RateLimited { status: u16, reset_in: u64 },
    /// A secondary rate limit: 403 (or 429) with `retry-after`.
    SecondaryRateLimit { status: u16, retry_after: u64 },
    /// The request is carried out, then answered with this 5xx, as when GitHub's gateway
    /// times out after the write: the client cannot tell it from one that did nothing.
    LostAnswer(u16),
}

/// What a token registered with [`FakeGithub::set_token`] may do on the fake's repositories,
/// which are all private.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeToken {
    /// A classic personal access token: its scopes come back in `X-OAuth-Scopes`; without
    /// `repo` a private repository is not found (404), as GitHub hides what a token cannot see.
    Classic { scopes: Vec<String> },
    /// A fine-grained token with the repository selected (Metadata: read always);
    /// `contents_read` is Contents: read, needed to list commits.
    FineGrained { contents_read: bool },
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
                get(gh_list_commit_comments).post(gh_create_commit_comment),
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
            .route("/repos/{o}/{r}", get(gh_repository))
            .route("/repos/{o}/{r}/commits", get(gh_list_commits))
            .fallback(gh_not_found)
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                gh_authenticate,
            ))
            .layer(axum::middleware::from_fn_with_state(
                state.clone(),
                gh_faults,
            ))
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

    /// Registers a token. Once one is, requests with any other token (or none) are refused
    /// with GitHub's 401 "Bad credentials".
    pub fn set_token(&self, token: &str, kind: FakeToken) {
        self.lock().tokens.insert(token.to_string(), kind);
    }

    /// Answers the next requests (whatever they ask) with `faults`, one each, in order.
    pub fn fail_next(&self, faults: impl IntoIterator<Item = GithubFault>) {
        self.lock()
            .faults
            .extend(faults.into_iter().map(|f| (None, f)));
    }

    /// Answers the next requests whose `"METHOD /path"` contains `request` with `faults`,
    /// one each.
    pub fn fail_next_on(&self, request: &str, faults: impl IntoIterator<Item = GithubFault>) {
        self.lock()
            .faults
            .extend(faults.into_iter().map(|f| (Some(request.to_string()), f)));
    }

    /// Faults not answered yet.
    pub fn faults_left(&self) -> usize {
        self.lock().faults.len()
    }

    /// The requests answered with a fault, as `(method path, status, when)`.
    pub fn faulted(&self) -> Vec<(String, u16, std::time::Instant)> {
        self.lock().faulted.clone()
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

async fn gh_list_commit_comments(
    State(s): GhState,
    Path((_o, _r, sha)): Path<(String, String, String)>,
) -> Response {
    let st = s.lock().unwrap_or_else(|p| p.into_inner());
    let list: Vec<Value> = st
        .commit_comments
        .iter()
        .filter(|c| c["commit_id"] == sha.as_str())
        .cloned()
        .collect();
    axum::Json(list).into_response()
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

/// GitHub's token handling, in front of every route: unknown tokens get 401 once any token is
/// registered; a classic token's answers carry its scopes, and without `repo` the (private)
/// repository is not found; a fine-grained token without Contents: read cannot list commits.
async fn gh_authenticate(
    State(s): GhState,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let token = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("token "))
        })
        .map(str::to_string);
    // Some(None): tokens are registered and this one is not among them.
    let known = {
        let st = s.lock().unwrap_or_else(|p| p.into_inner());
        (!st.tokens.is_empty()).then(|| token.and_then(|t| st.tokens.get(&t).cloned()))
    };
    let kind = match known {
        None => return next.run(request).await,
        Some(Some(kind)) => kind,
        Some(None) => {
            return gh_error(
                StatusCode::UNAUTHORIZED,
                "Bad credentials",
                &[("www-authenticate", "Bearer realm=\"GitHub\"")],
            );
        }
    };
    let segments: Vec<&str> = request.uri().path().split('/').skip(1).collect();
    let on_repository = segments.first() == Some(&"repos") && segments.len() >= 3;
    let listing_commits = on_repository && segments.len() == 4 && segments[3] == "commits";
    match kind {
        FakeToken::Classic { scopes } => {
            let joined = scopes.join(", ");
            let mut response = if on_repository && !scopes.iter().any(|s| s == "repo") {
                gh_404()
            } else {
                next.run(request).await
            };
            let headers = response.headers_mut();
            if let Ok(v) = axum::http::HeaderValue::from_str(&joined) {
                headers.insert("x-oauth-scopes", v);
            }
            headers.insert(
                "x-accepted-oauth-scopes",
                axum::http::HeaderValue::from_static("repo"),
            );
            response
        }
        FakeToken::FineGrained { contents_read } => {
            if listing_commits && !contents_read {
                return gh_error(
                    StatusCode::FORBIDDEN,
                    "Resource not accessible by personal access token",
                    &[("x-accepted-github-permissions", "contents=read")],
                );
            }
            next.run(request).await
        }
    }
}

/// The next fault, if any, instead of the request: GitHub's bodies and headers as it sends them.
async fn gh_faults(
    State(s): GhState,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let fault = {
        let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
        let what = format!("{} {}", request.method(), request.uri().path());
        let fault = st
            .faults
            .iter()
            .position(|(filter, _)| filter.as_ref().is_none_or(|f| what.contains(f.as_str())))
            .and_then(|i| st.faults.remove(i))
            .map(|(_, fault)| fault);
        if let Some(f) = &fault {
            let status = match f {
                GithubFault::ServerError(status)
                | GithubFault::LostAnswer(status)
                | GithubFault::RateLimited { status, .. }
                | GithubFault::SecondaryRateLimit { status, .. } => *status,
            };
            st.faulted.push((what, status, std::time::Instant::now()));
        }
        fault
    };
    let Some(fault) = fault else {
        return next.run(request).await;
    };
    let status_of = |code: u16| StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = match &fault {
        GithubFault::LostAnswer(code) => {
            let _done = next.run(request).await;
            return (
                status_of(*code),
                axum::Json(json!({"message": "Server Error"})),
            )
                .into_response();
        }
        GithubFault::ServerError(code) => (
            status_of(*code),
            axum::Json(json!({"message": "Server Error"})),
        )
            .into_response(),
        GithubFault::RateLimited { status, .. } => (
            status_of(*status),
            axum::Json(json!({
                "message": "API rate limit exceeded for user ID 1. If you reach out to GitHub Support for help, please include the request ID 0000:0000:0000000:0000000:00000000.",
                "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api",
                "status": status.to_string(),
            })),
        )
            .into_response(),
        GithubFault::SecondaryRateLimit { status, .. } => (
            status_of(*status),
            axum::Json(json!({
                "message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again. If you reach out to GitHub Support for help, please include the request ID 0000:0000:0000000:0000000:00000000.",
                "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api#about-secondary-rate-limits",
                "status": status.to_string(),
            })),
        )
            .into_response(),
    };
    let headers = response.headers_mut();
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = axum::http::HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    match fault {
        GithubFault::ServerError(_) | GithubFault::LostAnswer(_) => {}
        GithubFault::RateLimited { reset_in, .. } => {
            set("x-ratelimit-limit", "5000".into());
            set("x-ratelimit-remaining", "0".into());
            set("x-ratelimit-used", "5000".into());
            set("x-ratelimit-resource", "core".into());
            set(
                "x-ratelimit-reset",
                (Utc::now().timestamp() + reset_in as i64).to_string(),
            );
        }
        GithubFault::SecondaryRateLimit { retry_after, .. } => {
            set("retry-after", retry_after.to_string());
        }
    }
    response
}

fn gh_error(
    status: StatusCode,
    message: &str,
    headers: &[(&'static str, &'static str)],
) -> Response {
    let mut response = (
        status,
        axum::Json(json!({
            "message": message,
            "documentation_url": "https://docs.github.com/rest",
            "status": status.as_u16().to_string(),
        })),
    )
        .into_response();
    for (name, value) in headers {
        response
            .headers_mut()
            .insert(*name, axum::http::HeaderValue::from_static(value));
    }
    response
}

/// `GET /repos/{o}/{r}`: every repository exists, private, with `main` as its default branch.
async fn gh_repository(
    State(s): GhState,
    Path((o, r)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    record(
        &s,
        "GET",
        &format!("/repos/{o}/{r}"),
        &headers,
        &Bytes::new(),
    );
    axum::Json(json!({
        "id": 1296269,
        "node_id": "MDEwOlJlcG9zaXRvcnkxMjk2MjY5",
        "name": r,
        "full_name": format!("{o}/{r}"),
        "private": true,
        "visibility": "private",
        "owner": {"login": o, "id": 1, "node_id": "MDQ6VXNlcjE=", "type": "Organization", "site_admin": false},
        "html_url": format!("https://github.com/{o}/{r}"),
        "description": "The platform's infrastructure",
        "fork": false,
        "url": format!("https://api.github.com/repos/{o}/{r}"),
        "default_branch": "main",
        "archived": false,
        "disabled": false,
        "created_at": "2024-03-01T09:00:00Z",
        "updated_at": Utc::now().to_rfc3339(),
        "pushed_at": Utc::now().to_rfc3339(),
        "permissions": {"admin": false, "maintain": false, "push": true, "triage": true, "pull": true},
    }))
    .into_response()
}

/// `GET /repos/{o}/{r}/commits`: the default branch's commits, newest first, `per_page` of them.
async fn gh_list_commits(
    State(s): GhState,
    Path((o, r)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = match uri.query() {
        Some(q) => format!("/repos/{o}/{r}/commits?{q}"),
        None => format!("/repos/{o}/{r}/commits"),
    };
    record(&s, "GET", &path, &headers, &Bytes::new());
    let per_page = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("per_page="))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(30);
    let commits: Vec<Value> = [
        ("9f2c1e4b7a0d3c5e8f1a2b4c6d8e0f1a3b5c7d9e", "talos: v1.13.2 on the workers"),
        ("4b1d3f5a7c9e0b2d4f6a8c0e2b4d6f8a0c2e4b6d", "apps: home web with two replicas"),
    ]
    .iter()
    .take(per_page)
    .map(|(sha, message)| {
        let author = json!({"name": "Alice", "email": "alice@example.com", "date": "2026-11-30T18:04:12Z"});
        json!({
            "sha": sha,
            "node_id": "C_kwDOABCD",
            "url": format!("https://api.github.com/repos/{o}/{r}/commits/{sha}"),
            "html_url": format!("https://github.com/{o}/{r}/commit/{sha}"),
            "commit": {
                "author": author,
                "committer": author,
                "message": message,
                "tree": {"sha": "6dcb09b5b57875f334f61aebed695e2e4193db5e", "url": format!("https://api.github.com/repos/{o}/{r}/git/trees/6dcb09b5b57875f334f61aebed695e2e4193db5e")},
                "url": format!("https://api.github.com/repos/{o}/{r}/git/commits/{sha}"),
                "comment_count": 0,
            },
            "author": user("alice"),
            "committer": user("alice"),
            "parents": [],
        })
    })
    .collect();
    axum::Json(commits).into_response()
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

pub use crate::kube_fake::FakeKube;
