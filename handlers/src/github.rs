//! The GitHub API as the agent uses it: commit statuses, pull request comments, issues, and
//! webhook deliveries. Built on octocrab (auth, base URL for GitHub Enterprise or a test
//! server); responses are read as JSON values so that only the fields we use must be present.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use http::Method;
use octocrab::Octocrab;
use octocrab::service::middleware::retry::RetryConfig;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::secret::{Redactor, Secret, redact_credentials};

/// GitHub refuses a comment body longer than this many characters.
pub const MAX_COMMENT_CHARS: usize = 65_536;
/// GitHub truncates a status description at 140 characters.
const MAX_STATUS_DESCRIPTION: usize = 140;

#[derive(Debug, thiserror::Error)]
pub enum GitHubError {
    #[error("GitHub API {what}: {status} {message}")]
    Api {
        what: String,
        status: u16,
        message: String,
        /// How long GitHub asked us to wait (`Retry-After`, or until `X-RateLimit-Reset` when
        /// `X-RateLimit-Remaining` is 0), when it said.
        retry_after: Option<Duration>,
    },
    #[error("GitHub API {what}: {message}")]
    Transport { what: String, message: String },
    #[error("GitHub client: {0}")]
    Setup(String),
}

impl GitHubError {
    /// Worth trying again later: GitHub failing (5xx), rate limiting (429, or 403 with the
    /// rate-limit headers or message), or not reached. A refusal (401, 404, 422) is not.
    pub fn is_transient(&self) -> bool {
        match self {
            GitHubError::Transport { .. } => true,
            GitHubError::Api {
                status,
                message,
                retry_after,
                ..
            } => {
                *status >= 500
                    || *status == 429
                    || (*status == 403
                        && (retry_after.is_some()
                            || message.to_ascii_lowercase().contains("rate limit")))
            }
            GitHubError::Setup(_) => false,
        }
    }

    /// The wait GitHub asked for, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GitHubError::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// What GitHub's headers ask a client to wait: `Retry-After` (secondary rate limits), else,
/// when `X-RateLimit-Remaining` is 0, until `X-RateLimit-Reset` (primary rate limit).
fn asked_wait(headers: &http::HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let number =
        |name: &str| -> Option<i64> { headers.get(name)?.to_str().ok()?.trim().parse().ok() };
    if let Some(seconds) = number("retry-after") {
        return Some(Duration::from_secs(seconds.max(0) as u64));
    }
    if number("x-ratelimit-remaining") == Some(0) {
        let reset = number("x-ratelimit-reset")?;
        return Some(Duration::from_secs((reset - now.timestamp()).max(1) as u64));
    }
    None
}

fn map_err(what: &str, e: octocrab::Error) -> GitHubError {
    match e {
        octocrab::Error::GitHub { source, .. } => GitHubError::Api {
            what: what.to_string(),
            status: source.status_code.as_u16(),
            message: source.message.clone(),
            retry_after: None,
        },
        // Other variants' Display carries a backtrace; keep the first line.
        other => GitHubError::Transport {
            what: what.to_string(),
            message: other
                .to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
        },
    }
}

/// A commit status state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusState {
    Pending,
    Success,
    Failure,
    Error,
}

impl StatusState {
    fn as_str(self) -> &'static str {
        match self {
            StatusState::Pending => "pending",
            StatusState::Success => "success",
            StatusState::Failure => "failure",
            StatusState::Error => "error",
        }
    }
}

/// One webhook delivery as GitHub lists it.
#[derive(Debug, Clone, Deserialize)]
pub struct Delivery {
    pub id: u64,
    pub guid: String,
    pub delivered_at: DateTime<Utc>,
    #[serde(default)]
    pub redelivery: bool,
    #[serde(default)]
    pub status_code: u16,
    #[serde(default)]
    pub event: String,
}

impl Delivery {
    pub fn succeeded(&self) -> bool {
        (200..300).contains(&self.status_code)
    }
}

#[derive(Clone)]
pub struct GitHub {
    /// Reads, retried by octocrab on 5xx.
    octo: Octocrab,
    /// Writes, tried once.
    writes: Octocrab,
    /// As configured, for requests octocrab does not make (the preflight's token probes).
    api_url: String,
    owner: String,
    repo: String,
    /// Scrubs what this client writes where everyone with read access sees it: commit status
    /// descriptions and issues (plan comments are scrubbed as they are rendered).
    redactor: Redactor,
    /// Feedback GitHub has not taken yet, retried in the background.
    backlog: Arc<Mutex<HashMap<String, FeedbackSend>>>,
    feedback_retry: FeedbackRetry,
}

/// One delivery of feedback, which may be sent again.
pub type FeedbackSend = Arc<dyn Fn() -> BoxFuture<'static, Result<(), GitHubError>> + Send + Sync>;

/// How feedback GitHub did not take is tried again: waits doubling from `first_wait` up to
/// `max_wait`, or as long as GitHub asks (up to `max_asked_wait`); given up after `give_up_after`.
#[derive(Debug, Clone, Copy)]
pub struct FeedbackRetry {
    pub first_wait: Duration,
    pub max_wait: Duration,
    pub max_asked_wait: Duration,
    pub give_up_after: Duration,
}

impl Default for FeedbackRetry {
    fn default() -> Self {
        Self {
            first_wait: Duration::from_secs(2),
            max_wait: Duration::from_secs(60),
            // GitHub's primary rate limit resets within the hour.
            max_asked_wait: Duration::from_secs(15 * 60),
            give_up_after: Duration::from_secs(60 * 60),
        }
    }
}

impl FeedbackRetry {
    /// The wait before try `tries + 1`, after `error`.
    fn wait(&self, error: &GitHubError, tries: u32) -> Duration {
        match error.retry_after() {
            Some(asked) => asked.clamp(Duration::from_secs(1), self.max_asked_wait),
            None => self
                .first_wait
                .saturating_mul(1u32 << tries.saturating_sub(1).min(16))
                .min(self.max_wait),
        }
    }
}

impl std::fmt::Debug for GitHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GitHub({}/{})", self.owner, self.repo)
    }
}

impl GitHub {
    pub fn new(
        api_url: &str,
        token: Option<&Secret>,
        repo: &str,
        redactor: Redactor,
    ) -> Result<Self, GitHubError> {
        let (owner, name) = repo
            .split_once('/')
            .ok_or_else(|| GitHubError::Setup(format!("{repo:?} is not owner/name")))?;
        let client = |retry: RetryConfig| {
            let mut builder = Octocrab::builder()
                .base_uri(api_url)
                .map_err(|e| GitHubError::Setup(format!("api_url {api_url:?}: {e}")))?
                .set_connect_timeout(Some(Duration::from_secs(10)))
                .set_read_timeout(Some(Duration::from_secs(30)))
                .add_retry_config(retry);
            if let Some(token) = token {
                builder = builder.personal_token(token.expose().to_string());
            }
            builder
                .build()
                .map_err(|e| GitHubError::Setup(e.to_string()))
        };
        Ok(Self {
            octo: client(RetryConfig::Simple(3))?,
            // octocrab retries any 5xx at once, a POST too: a comment whose answer was lost
            // (GitHub's gateway timing out after the write) was posted twice. Writes are tried
            // once here; feedback is retried by `deliver`, which looks before it posts again.
            writes: client(RetryConfig::None)?,
            api_url: api_url.trim_end_matches('/').to_string(),
            owner: owner.to_string(),
            repo: name.to_string(),
            redactor,
            backlog: Arc::default(),
            feedback_retry: FeedbackRetry::default(),
        })
    }

    /// This client with feedback retried by `retry`.
    pub fn with_feedback_retry(mut self, retry: FeedbackRetry) -> Self {
        self.feedback_retry = retry;
        self
    }

    /// Sends one request and reads the answer as JSON. Unlike octocrab's typed calls, a
    /// refusal keeps what GitHub's headers say about waiting.
    async fn send(
        &self,
        method: Method,
        what: &str,
        route: String,
        body: Option<&Value>,
    ) -> Result<Value, GitHubError> {
        let response = match method {
            Method::GET => self.octo._get(route).await,
            Method::PATCH => self.writes._patch(route, body).await,
            _ => self.writes._post(route, body).await,
        }
        .map_err(|e| map_err(what, e))?;
        let status = response.status();
        let retry_after = asked_wait(response.headers(), Utc::now());
        let text = self
            .octo
            .body_to_string(response)
            .await
            .map_err(|e| map_err(what, e))?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| text.chars().take(200).collect());
            return Err(GitHubError::Api {
                what: what.to_string(),
                status: status.as_u16(),
                message,
                retry_after,
            });
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Delivers feedback (a commit status, a plan comment) without holding up the job: one
    /// try here; if GitHub fails or rate-limits, it is tried again in the background, waiting
    /// as GitHub asks. `key` names what it sets: a newer delivery with the same key replaces
    /// one still waiting, so an older status never lands after a newer one.
    pub async fn deliver(&self, key: String, send: FeedbackSend) {
        {
            let mut backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(waiting) = backlog.get_mut(&key) {
                // Whoever is sending this key sends the newest at its next try.
                *waiting = send;
                return;
            }
            backlog.insert(key.clone(), send.clone());
        }
        let first_wait = match send().await {
            Err(e) if e.is_transient() => {
                let wait = self.feedback_retry.wait(&e, 1);
                tracing::warn!(error = %e, %key, retry_in = ?wait, "GitHub did not take the feedback; trying again in the background");
                wait
            }
            result => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, %key, "GitHub refused the feedback");
                }
                if self.settled(&key, &send) {
                    return;
                }
                Duration::ZERO
            }
        };
        tokio::spawn(self.clone().retry_feedback(key, first_wait));
    }

    /// Removes `key` from the backlog if `sent` is still its newest delivery; false if a newer
    /// one came meanwhile (it still has to be sent).
    fn settled(&self, key: &str, sent: &FeedbackSend) -> bool {
        let mut backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        match backlog.get(key) {
            Some(newest) if !Arc::ptr_eq(newest, sent) => false,
            _ => {
                backlog.remove(key);
                true
            }
        }
    }

    async fn retry_feedback(self, key: String, mut wait: Duration) {
        let started = tokio::time::Instant::now();
        let mut tries = 1u32;
        loop {
            tokio::time::sleep(wait).await;
            let newest = self
                .backlog
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&key)
                .cloned();
            let Some(send) = newest else { return };
            tries += 1;
            match send().await {
                Err(e) if e.is_transient() => {
                    if started.elapsed() >= self.feedback_retry.give_up_after {
                        tracing::warn!(error = %e, %key, tries, "GitHub did not take the feedback; giving up");
                        self.backlog
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&key);
                        return;
                    }
                    wait = self.feedback_retry.wait(&e, tries);
                    tracing::info!(error = %e, %key, tries, retry_in = ?wait, "GitHub did not take the feedback yet");
                }
                result => {
                    match result {
                        Ok(()) => {
                            tracing::info!(%key, tries, waited = ?started.elapsed(), "Feedback delivered after GitHub recovered")
                        }
                        Err(e) => tracing::warn!(error = %e, %key, "GitHub refused the feedback"),
                    }
                    if self.settled(&key, &send) {
                        return;
                    }
                    wait = Duration::ZERO;
                }
            }
        }
    }

    /// [`GitHub::set_status`], delivered even if GitHub fails for a while ([`GitHub::deliver`]).
    pub async fn set_status_eventually(
        &self,
        sha: &str,
        context: &str,
        state: StatusState,
        description: &str,
    ) {
        let key = format!("status {sha} {context}");
        let (gh, sha, context, description) = (
            self.clone(),
            sha.to_string(),
            context.to_string(),
            description.to_string(),
        );
        let send: FeedbackSend = Arc::new(move || {
            let (gh, sha, context, description) = (
                gh.clone(),
                sha.clone(),
                context.clone(),
                description.clone(),
            );
            Box::pin(async move { gh.set_status(&sha, &context, state, &description).await })
        });
        self.deliver(key, send).await;
    }

    /// [`GitHub::upsert_comments`], delivered even if GitHub fails for a while
    /// ([`GitHub::deliver`]); a retry finds what an earlier try posted by its marker.
    pub async fn upsert_comments_eventually(&self, number: u64, marker: &str, parts: Vec<String>) {
        let key = format!("comments #{number} {marker}");
        let (gh, marker, parts) = (self.clone(), marker.to_string(), Arc::new(parts));
        let send: FeedbackSend = Arc::new(move || {
            let (gh, marker, parts) = (gh.clone(), marker.clone(), parts.clone());
            Box::pin(async move { gh.upsert_comments(number, &marker, &parts).await })
        });
        self.deliver(key, send).await;
    }

    /// Posts `body` on `target` once, even while GitHub fails for a while: retried in the
    /// background ([`GitHub::deliver`]). A try first looks for the comment an earlier try may
    /// have posted before its answer was lost, by `marker` (kept in the body as an HTML
    /// comment), so a retry never posts it twice.
    pub async fn comment_once_eventually(&self, target: CommentTarget, marker: &str, body: &str) {
        let key = format!("comment {marker}");
        let tag = format!("<!-- {marker} -->");
        let body = format!("{tag}\n{body}");
        let (gh, target, tag, body) = (
            self.clone(),
            Arc::new(target),
            Arc::new(tag),
            Arc::new(body),
        );
        let send: FeedbackSend = Arc::new(move || {
            let (gh, target, tag, body) = (gh.clone(), target.clone(), tag.clone(), body.clone());
            Box::pin(async move { gh.comment_once(&target, &tag, &body).await })
        });
        self.deliver(key, send).await;
    }

    async fn comment_once(
        &self,
        target: &CommentTarget,
        tag: &str,
        body: &str,
    ) -> Result<(), GitHubError> {
        let route = match target {
            CommentTarget::Commit(sha) => self.route(&format!("commits/{sha}/comments")),
            CommentTarget::Issue(number) => self.route(&format!("issues/{number}/comments")),
        };
        let posted = self
            .list_pages(&route)
            .await?
            .iter()
            .any(|c| c["body"].as_str().is_some_and(|b| b.contains(tag)));
        if posted {
            return Ok(());
        }
        match target {
            CommentTarget::Commit(sha) => self.comment_on_commit(sha, body).await,
            CommentTarget::Issue(number) => self.comment_on_issue(*number, body).await,
        }
    }

    /// [`GitHub::upsert_issue`], retried in the background while GitHub fails; a newer state
    /// of the same issue replaces one still waiting.
    pub async fn upsert_issue_eventually(&self, marker: &str, title: &str, body: &str, open: bool) {
        let key = format!("issue {marker}");
        let (gh, marker, title, body) = (
            self.clone(),
            Arc::new(marker.to_string()),
            Arc::new(title.to_string()),
            Arc::new(body.to_string()),
        );
        let send: FeedbackSend = Arc::new(move || {
            let (gh, marker, title, body) =
                (gh.clone(), marker.clone(), title.clone(), body.clone());
            Box::pin(async move { gh.upsert_issue(&marker, &title, &body, open).await })
        });
        self.deliver(key, send).await;
    }

    /// The API's base URL, without a trailing `/`.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// `owner/name`.
    pub fn repo_name(&self) -> String {
        format!("{}/{}", self.owner, self.repo)
    }

    fn route(&self, rest: &str) -> String {
        format!("/repos/{}/{}/{rest}", self.owner, self.repo)
    }

    /// Sets the commit status `context` on `sha`.
    pub async fn set_status(
        &self,
        sha: &str,
        context: &str,
        state: StatusState,
        description: &str,
    ) -> Result<(), GitHubError> {
        let description = status_description(&scrub(&self.redactor, description));
        let body = json!({"state": state.as_str(), "context": context, "description": description});
        self.send(
            Method::POST,
            "create status",
            self.route(&format!("statuses/{sha}")),
            Some(&body),
        )
        .await
        .map(|_| ())
    }

    /// Every comment of an issue or pull request, oldest first.
    async fn comments(&self, number: u64) -> Result<Vec<Value>, GitHubError> {
        self.list_pages(&self.route(&format!("issues/{number}/comments")))
            .await
    }

    /// Every item of a paged list (comments), oldest first.
    async fn list_pages(&self, route: &str) -> Result<Vec<Value>, GitHubError> {
        let mut all = Vec::new();
        for page in 1..=50u32 {
            let listed = self
                .send(
                    Method::GET,
                    "list comments",
                    format!("{route}?per_page=100&page={page}"),
                    None,
                )
                .await?;
            let batch = match listed {
                Value::Array(batch) => batch,
                _ => Vec::new(),
            };
            let n = batch.len();
            all.extend(batch);
            if n < 100 {
                break;
            }
        }
        Ok(all)
    }

    /// Keeps one comment per part, recognised by `marker` (an HTML comment in the body): edits
    /// the existing ones in place, creates missing parts, deletes surplus parts of an older,
    /// longer version.
    pub async fn upsert_comments(
        &self,
        number: u64,
        marker: &str,
        parts: &[String],
    ) -> Result<(), GitHubError> {
        let existing: Vec<(u64, usize)> = self
            .comments(number)
            .await?
            .iter()
            .filter_map(|c| {
                let body = c.get("body")?.as_str()?;
                let id = c.get("id")?.as_u64()?;
                part_index(body, marker).map(|i| (id, i))
            })
            .collect();
        for (i, part) in parts.iter().enumerate() {
            let body = format!("{}\n{part}", part_marker(marker, i));
            match existing.iter().find(|(_, idx)| *idx == i) {
                Some((id, _)) => {
                    self.send(
                        Method::PATCH,
                        "update comment",
                        self.route(&format!("issues/comments/{id}")),
                        Some(&json!({"body": body})),
                    )
                    .await?;
                }
                None => {
                    self.send(
                        Method::POST,
                        "create comment",
                        self.route(&format!("issues/{number}/comments")),
                        Some(&json!({"body": body})),
                    )
                    .await?;
                }
            }
        }
        for (id, idx) in existing.iter().filter(|(_, idx)| *idx >= parts.len()) {
            let _ = idx;
            let response = self
                .octo
                ._delete(self.route(&format!("issues/comments/{id}")), None::<&()>)
                .await
                .map_err(|e| map_err("delete comment", e))?;
            if !response.status().is_success() {
                return Err(GitHubError::Api {
                    what: "delete comment".into(),
                    status: response.status().as_u16(),
                    message: String::new(),
                    retry_after: None,
                });
            }
        }
        Ok(())
    }

    /// Opens, updates or closes the one issue whose body carries `marker`.
    pub async fn upsert_issue(
        &self,
        marker: &str,
        title: &str,
        body: &str,
        open: bool,
    ) -> Result<(), GitHubError> {
        let issues: Vec<Value> = self
            .octo
            .get(
                self.route("issues"),
                Some(&json!({"state": "open", "per_page": 100, "labels": "infraflux"})),
            )
            .await
            .map_err(|e| map_err("list issues", e))?;
        let title = scrub(&self.redactor, title);
        let full = format!("<!-- {marker} -->\n{}", scrub(&self.redactor, body));
        let found = issues.iter().find(|i| {
            i.get("body")
                .and_then(Value::as_str)
                .is_some_and(|b| b.contains(&format!("<!-- {marker} -->")))
        });
        match (
            found.and_then(|i| i.get("number")).and_then(Value::as_u64),
            open,
        ) {
            (Some(number), true) => self
                .octo
                .patch::<Value, _, _>(
                    self.route(&format!("issues/{number}")),
                    Some(&json!({"title": title, "body": full})),
                )
                .await
                .map(|_| ())
                .map_err(|e| map_err("update issue", e)),
            (Some(number), false) => self
                .octo
                .patch::<Value, _, _>(
                    self.route(&format!("issues/{number}")),
                    Some(&json!({"state": "closed", "body": full})),
                )
                .await
                .map(|_| ())
                .map_err(|e| map_err("close issue", e)),
            (None, true) => self
                .octo
                .post::<_, Value>(
                    self.route("issues"),
                    Some(&json!({"title": title, "body": full, "labels": ["infraflux"]})),
                )
                .await
                .map(|_| ())
                .map_err(|e| map_err("create issue", e)),
            (None, false) => Ok(()),
        }
    }

    /// Posts a new comment on a commit.
    pub async fn comment_on_commit(&self, sha: &str, body: &str) -> Result<(), GitHubError> {
        let body = json!({"body": scrub(&self.redactor, body)});
        self.writes
            .post::<_, Value>(self.route(&format!("commits/{sha}/comments")), Some(&body))
            .await
            .map(|_| ())
            .map_err(|e| map_err("create commit comment", e))
    }

    /// Posts a new comment on an issue or pull request.
    pub async fn comment_on_issue(&self, number: u64, body: &str) -> Result<(), GitHubError> {
        let body = json!({"body": scrub(&self.redactor, body)});
        self.writes
            .post::<_, Value>(
                self.route(&format!("issues/{number}/comments")),
                Some(&body),
            )
            .await
            .map(|_| ())
            .map_err(|e| map_err("create comment", e))
    }

    /// `login`'s permission on the repository (`admin`, `maintain`, `write`, `triage`, `read`
    /// or `none`), from GitHub's collaborator permission API; a login GitHub does not know
    /// has `none`.
    pub async fn permission(&self, login: &str) -> Result<String, GitHubError> {
        if login.is_empty() || !login.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Ok("none".into());
        }
        let response: Result<Value, _> = self
            .octo
            .get(
                self.route(&format!("collaborators/{login}/permission")),
                None::<&()>,
            )
            .await;
        match response {
            Ok(v) => Ok(v
                .get("role_name")
                .or_else(|| v.get("permission"))
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string()),
            Err(octocrab::Error::GitHub { source, .. }) if source.status_code.as_u16() == 404 => {
                Ok("none".into())
            }
            Err(e) => Err(map_err("read collaborator permission", e)),
        }
    }

    /// A comment as GitHub holds it: its author's login and its body. `on_commit` for a
    /// commit comment, else an issue or pull request comment.
    pub async fn comment(&self, on_commit: bool, id: u64) -> Result<(String, String), GitHubError> {
        let path = if on_commit {
            format!("comments/{id}")
        } else {
            format!("issues/comments/{id}")
        };
        let comment: Value = self
            .octo
            .get(self.route(&path), None::<&()>)
            .await
            .map_err(|e| map_err("read comment", e))?;
        let text = |pointer: &str| {
            comment
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Ok((text("/user/login"), text("/body")))
    }

    /// The commits a pull request stands for: its head, and its merge commit once merged.
    pub async fn pull_request_commits(&self, number: u64) -> Result<Vec<String>, GitHubError> {
        let pr: Value = self
            .octo
            .get(self.route(&format!("pulls/{number}")), None::<&()>)
            .await
            .map_err(|e| map_err("read pull request", e))?;
        let mut commits = Vec::new();
        if pr.get("merged").and_then(Value::as_bool) == Some(true)
            && let Some(sha) = pr.get("merge_commit_sha").and_then(Value::as_str)
        {
            commits.push(sha.to_string());
        }
        if let Some(sha) = pr.pointer("/head/sha").and_then(Value::as_str) {
            commits.push(sha.to_string());
        }
        Ok(commits)
    }

    /// The repository's webhooks.
    pub async fn hooks(&self) -> Result<Vec<Value>, GitHubError> {
        self.octo
            .get(self.route("hooks"), Some(&json!({"per_page": 100})))
            .await
            .map_err(|e| map_err("list hooks", e))
    }

    /// Deliveries of a webhook, newest first, back to `since`.
    pub async fn deliveries(
        &self,
        hook_id: u64,
        since: DateTime<Utc>,
    ) -> Result<Vec<Delivery>, GitHubError> {
        let mut all: Vec<Delivery> = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..30 {
            let mut params = json!({"per_page": 100});
            if let Some(c) = &cursor {
                params["cursor"] = json!(c);
            }
            let response = self
                .octo
                ._get(
                    format!(
                        "{}?{}",
                        self.route(&format!("hooks/{hook_id}/deliveries")),
                        query(&params)
                    )
                    .as_str(),
                )
                .await
                .map_err(|e| map_err("list deliveries", e))?;
            let status = response.status();
            let next = next_cursor(response.headers());
            let body = self
                .octo
                .body_to_string(response)
                .await
                .map_err(|e| map_err("list deliveries", e))?;
            if !status.is_success() {
                return Err(GitHubError::Api {
                    what: "list deliveries".into(),
                    status: status.as_u16(),
                    message: body.chars().take(200).collect(),
                    retry_after: None,
                });
            }
            let batch: Vec<Delivery> =
                serde_json::from_str(&body).map_err(|e| GitHubError::Transport {
                    what: "list deliveries".into(),
                    message: e.to_string(),
                })?;
            let reached_end = batch.iter().any(|d| d.delivered_at < since);
            all.extend(batch.into_iter().filter(|d| d.delivered_at >= since));
            match next {
                Some(c) if !reached_end => cursor = Some(c),
                _ => break,
            }
        }
        Ok(all)
    }

    /// Asks GitHub to deliver a delivery again.
    pub async fn redeliver(&self, hook_id: u64, delivery_id: u64) -> Result<(), GitHubError> {
        let response = self
            .writes
            ._post(
                self.route(&format!(
                    "hooks/{hook_id}/deliveries/{delivery_id}/attempts"
                )),
                None::<&()>,
            )
            .await
            .map_err(|e| map_err("redeliver", e))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(GitHubError::Api {
                what: "redeliver".into(),
                status: response.status().as_u16(),
                message: String::new(),
                retry_after: None,
            })
        }
    }
}

/// `text` without any secret the agent knows or any string shaped like a credential.
fn scrub(redactor: &Redactor, text: &str) -> String {
    redactor.redact(&redact_credentials(text))
}

/// A scrubbed description cut to GitHub's limit. Cut after scrubbing, never before: a cut
/// through a secret would leave a prefix that no longer matches and so is not replaced.
fn status_description(scrubbed: &str) -> String {
    scrubbed.chars().take(MAX_STATUS_DESCRIPTION).collect()
}

fn query(params: &Value) -> String {
    params
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                    format!("{k}={}", url_encode(&v))
                })
                .collect::<Vec<_>>()
                .join("&")
        })
        .unwrap_or_default()
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The `cursor` of the `rel="next"` link, as GitHub paginates deliveries.
fn next_cursor(headers: &http::HeaderMap) -> Option<String> {
    let link = headers.get("link")?.to_str().ok()?;
    link.split(',')
        .find(|l| l.contains("rel=\"next\""))
        .and_then(|l| l.split("cursor=").nth(1))
        .map(|c| {
            c.chars()
                .take_while(|ch| *ch != '&' && *ch != '>')
                .collect()
        })
}

/// Where a one-off comment goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommentTarget {
    Commit(String),
    /// An issue or a pull request.
    Issue(u64),
}

fn part_marker(marker: &str, index: usize) -> String {
    format!("<!-- {marker} part={index} -->")
}

fn part_index(body: &str, marker: &str) -> Option<usize> {
    let prefix = format!("<!-- {marker} part=");
    let rest = body.strip_prefix(&prefix)?;
    rest.split(' ').next()?.parse().ok()
}

/// Splits `text` into parts that each fit a GitHub comment after a header line, on line
/// boundaries where possible.
pub fn split_for_comments(text: &str, reserve: usize) -> Vec<String> {
    let limit = MAX_COMMENT_CHARS.saturating_sub(reserve).max(1024);
    let mut parts = Vec::new();
    let mut current = String::new();
    for line in text.split_inclusive('\n') {
        if current.chars().count() + line.chars().count() > limit && !current.is_empty() {
            parts.push(std::mem::take(&mut current));
        }
        if line.chars().count() > limit {
            let chars: Vec<char> = line.chars().collect();
            for chunk in chars.chunks(limit) {
                parts.push(chunk.iter().collect());
            }
        } else {
            current.push_str(line);
        }
    }
    if !current.is_empty() || parts.is_empty() {
        parts.push(current);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_splits_on_lines_within_the_limit() {
        let line = "x".repeat(99) + "\n";
        let text = line.repeat(2000); // 200,000 characters
        let parts = split_for_comments(&text, 500);
        assert!(parts.len() >= 4);
        assert!(
            parts
                .iter()
                .all(|p| p.chars().count() <= MAX_COMMENT_CHARS - 500)
        );
        assert_eq!(parts.concat(), text);
        assert!(parts[..parts.len() - 1].iter().all(|p| p.ends_with('\n')));
        let one = "y".repeat(MAX_COMMENT_CHARS * 2);
        let parts = split_for_comments(&one, 500);
        assert_eq!(parts.concat(), one);
        assert!(
            parts
                .iter()
                .all(|p| p.chars().count() <= MAX_COMMENT_CHARS - 500)
        );
    }

    #[test]
    fn status_descriptions_are_scrubbed_before_they_are_cut() {
        let redactor = Redactor::default();
        redactor.register(&Secret::new("api-token-value-7731"));
        // The secret straddles the 140-character cut.
        let text = format!("{}api-token-value-7731 and more", "x".repeat(130));
        let description = status_description(&scrub(&redactor, &text));
        assert_eq!(description.chars().count(), MAX_STATUS_DESCRIPTION);
        assert!(!description.contains("api-token"), "{description}");
        assert!(description.ends_with("[REDACTED]"), "{description}");
        let shaped = status_description(&scrub(&redactor, "key AKIAIOSFODNN7EXAMPLE refused"));
        assert_eq!(shaped, "key [REDACTED] refused");
    }

    #[test]
    fn part_markers_round_trip() {
        let m = part_marker("infraflux:plan:prod", 3);
        assert_eq!(
            part_index(&format!("{m}\nbody"), "infraflux:plan:prod"),
            Some(3)
        );
        assert_eq!(part_index("other comment", "infraflux:plan:prod"), None);
    }

    #[test]
    fn rate_limit_headers_say_how_long_to_wait_and_what_is_worth_retrying() {
        let now = Utc::now();
        let mut h = http::HeaderMap::new();
        h.insert("x-ratelimit-remaining", "0".parse().expect("header"));
        h.insert(
            "x-ratelimit-reset",
            (now.timestamp() + 42).to_string().parse().expect("header"),
        );
        assert_eq!(asked_wait(&h, now), Some(Duration::from_secs(42)));
        h.insert("retry-after", "7".parse().expect("header"));
        assert_eq!(asked_wait(&h, now), Some(Duration::from_secs(7)));
        let mut left = http::HeaderMap::new();
        left.insert("x-ratelimit-remaining", "12".parse().expect("header"));
        assert_eq!(asked_wait(&left, now), None);

        let api = |status, message: &str, retry_after| GitHubError::Api {
            what: "create status".into(),
            status,
            message: message.into(),
            retry_after,
        };
        assert!(api(502, "Server Error", None).is_transient());
        assert!(api(429, "", None).is_transient());
        assert!(api(403, "API rate limit exceeded for user ID 1.", None).is_transient());
        assert!(api(403, "", Some(Duration::from_secs(3))).is_transient());
        assert!(!api(403, "Resource not accessible by integration", None).is_transient());
        assert!(!api(422, "Validation Failed", None).is_transient());
        let retry = FeedbackRetry::default();
        assert_eq!(retry.wait(&api(502, "", None), 1), Duration::from_secs(2));
        assert_eq!(retry.wait(&api(502, "", None), 3), Duration::from_secs(8));
        assert_eq!(retry.wait(&api(502, "", None), 30), Duration::from_secs(60));
        assert_eq!(
            retry.wait(&api(403, "", Some(Duration::from_secs(7200))), 1),
            Duration::from_secs(15 * 60),
            "a wait GitHub asks for is bounded"
        );
    }

    #[test]
    fn link_header_cursor() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "link",
            "<https://api.github.com/repositories/1/hooks/2/deliveries?per_page=100&cursor=v1_123>; rel=\"next\"".parse().expect("header"),
        );
        assert_eq!(next_cursor(&h).as_deref(), Some("v1_123"));
    }
}
