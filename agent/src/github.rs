//! GitHub events, from the webhook or from NATS, mapped to jobs.
//!
//! Both paths end in [`accept`], so they dedup against each other: a push's idempotency key is
//! its commit, whichever path sees it first.

use std::fmt;
use std::marker::PhantomData;

use chrono::Utc;
use infraflux_handlers::reconcile::{self, MAX_TITLE_CHARS, PrPlans, PullRequestAuthor};
use infraflux_handlers::{JobEnvelope, JobKind, Source, new_job_id};
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value, json};

use crate::config::GithubSection;
use crate::ingest::{IngestError, Submitted};
use crate::telemetry;

/// What an event means for us.
#[derive(Debug, Clone, PartialEq)]
pub enum Mapping {
    Ping,
    Ignored(String),
    Job {
        kind: JobKind,
        params: Map<String, Value>,
        commit: String,
        idempotency_key: String,
        requested_by: String,
    },
    /// A `/infraflux ...` comment: an approval, answered by [`crate::approval`].
    Command(CommentCommand),
}

/// A `/infraflux apply [job-id]` comment on a commit or a pull request. Who wrote it is
/// GitHub's word (the event is signed, or came over NATS from the runner).
#[derive(Debug, Clone, PartialEq)]
pub struct CommentCommand {
    pub login: String,
    pub on: CommentedOn,
    /// The comment's id: one comment is one approval, however often it is delivered.
    pub comment_id: u64,
    /// The plan's job id, when the comment names one.
    pub plan_job: Option<String>,
    /// Why the command cannot be read (answered with a comment, like a refusal).
    pub problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommentedOn {
    Commit(String),
    PullRequest(u64),
}

impl CommentedOn {
    /// `commit` or `pull_request`, for idempotency keys and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            CommentedOn::Commit(_) => "commit",
            CommentedOn::PullRequest(_) => "pull_request",
        }
    }
}

/// What the reconcile config says about pull requests, for mapping them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullRequestPolicy {
    pub pr_plans: PrPlans,
    pub has_plan_env_vars: bool,
}

impl PullRequestPolicy {
    pub fn of(config: Option<&reconcile::Config>) -> Self {
        config.map_or_else(Self::default, |c| Self {
            pr_plans: c.pr_plans,
            has_plan_env_vars: c.plan_env_vars.is_some(),
        })
    }
}

/// Why a payload could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct BadPayload(pub String);

/// The few fields of an event that mapping reads; everything else in the payload is skipped
/// unparsed, which is most of the cost of a webhook (a push is several KiB of JSON).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct EventView {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    after: Option<String>,
    deleted: Option<bool>,
    forced: Option<bool>,
    action: Option<String>,
    number: Option<u64>,
    repository: Option<RepositoryView>,
    pusher: Option<NameView>,
    sender: Option<LoginView>,
    /// `null` when the push deleted the branch. Read loosely: what it says is only shown, so
    /// an odd field in it must not refuse the push.
    head_commit: Loose<HeadCommitView>,
    pull_request: Option<PullRequestView>,
    comment: Option<CommentView>,
    issue: Option<IssueView>,
}

/// What a record keeps of a commit message or a pull request title: its first line, bounded.
fn first_line(text: &str) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default();
    line.chars().take(MAX_TITLE_CHARS).collect()
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CommentView {
    id: Option<u64>,
    body: Option<String>,
    user: Option<LoginView>,
    /// Set on a commit comment.
    commit_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct IssueView {
    number: Option<u64>,
    /// Present when the issue is a pull request.
    pull_request: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RepositoryView {
    full_name: Option<String>,
    default_branch: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NameView {
    name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct LoginView {
    login: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PullRequestView {
    head: Option<HeadView>,
    base: Option<HeadView>,
    author_association: Option<String>,
    /// Only shown (the status page), so read loosely.
    title: Loose<Option<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct HeadView {
    sha: Option<String>,
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    /// `null` when the head's fork was deleted.
    repo: Option<RepositoryView>,
}

/// A value that is only shown (a commit's title and author, a pull request's title), read
/// loosely: one of another JSON type, or an object that is not as expected, is skipped, never
/// a reason to refuse the event. Read as it streams by, without building a JSON tree of it (a
/// push's head commit is several hundred bytes of every webhook).
#[derive(Debug, Default)]
struct Loose<T>(T);

/// What a [`Loose`] value takes from a string or an object; any other JSON value leaves it at
/// its default.
trait LooseRead: Default {
    fn from_text(_text: &str) -> Self {
        Self::default()
    }

    fn from_object<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        IgnoredAny.visit_map(map).map(|_| Self::default())
    }
}

impl<'de, T: LooseRead> Deserialize<'de> for Loose<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AnyValue<T>(PhantomData<T>);
        impl<'de, T: LooseRead> Visitor<'de> for AnyValue<T> {
            type Value = Loose<T>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Loose::default())
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Loose::default())
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Loose::default())
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Loose::default())
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(Loose::default())
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
                Ok(Loose::default())
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_any(self)
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Loose(T::from_text(text)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| Loose::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::from_object(map).map(Loose)
            }
        }
        deserializer.deserialize_any(AnyValue(PhantomData))
    }
}

impl LooseRead for Option<String> {
    fn from_text(text: &str) -> Self {
        Some(text.to_owned())
    }
}

/// A key of an object read loosely: the index of one of the names, or `None` for another.
struct KeyAmong(&'static [&'static str]);

impl<'de> DeserializeSeed<'de> for KeyAmong {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl<'de> Visitor<'de> for KeyAmong {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.0.iter().position(|name| *name == key))
    }
}

/// Two fields of an object, each read loosely, the last of a repeated key winning (as in a
/// JSON value); every other field is skipped.
fn loose_pair<'de, A: MapAccess<'de>, X: LooseRead, Y: LooseRead>(
    mut map: A,
    names: &'static [&'static str; 2],
) -> Result<(X, Y), A::Error> {
    let (mut first, mut second) = (X::default(), Y::default());
    while let Some(key) = map.next_key_seed(KeyAmong(names))? {
        match key {
            Some(0) => first = map.next_value::<Loose<X>>()?.0,
            Some(_) => second = map.next_value::<Loose<Y>>()?.0,
            None => {
                map.next_value::<IgnoredAny>()?;
            }
        }
    }
    Ok((first, second))
}

/// What the status page shows of a push's head commit.
#[derive(Debug, Default)]
struct HeadCommitView {
    message: Option<String>,
    /// The author's GitHub login, else their name.
    author: Option<String>,
}

impl LooseRead for HeadCommitView {
    fn from_object<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        let (message, author): (_, AuthorView) = loose_pair(map, &["message", "author"])?;
        Ok(Self {
            message,
            author: author.username.or(author.name),
        })
    }
}

#[derive(Debug, Default)]
struct AuthorView {
    username: Option<String>,
    name: Option<String>,
}

impl LooseRead for AuthorView {
    fn from_object<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        let (username, name) = loose_pair(map, &["username", "name"])?;
        Ok(Self { username, name })
    }
}

fn need<'a>(value: Option<&'a String>, path: &str, event: &str) -> Result<&'a str, BadPayload> {
    value
        .map(String::as_str)
        .ok_or_else(|| BadPayload(format!("{event} payload has no {path}")))
}

/// Checks that `body` is one JSON object, and reads the fields mapping needs (if `wanted`);
/// an error names the field that was wrong.
fn read_payload(body: &[u8], wanted: bool) -> Result<EventView, BadPayload> {
    let malformed = |e: serde_json::Error| BadPayload(format!("malformed JSON: {e}"));
    let mut de = serde_json::Deserializer::from_slice(body);
    let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let view = if object && wanted {
        // Read untracked: tracking the path costs a string per key of a push's several KiB,
        // and is only wanted for an error, so a payload with a wrong field is read again.
        match EventView::deserialize(&mut de) {
            Ok(view) => view,
            Err(e) if e.is_data() => {
                let mut again = serde_json::Deserializer::from_slice(body);
                return Err(
                    match serde_path_to_error::deserialize::<_, EventView>(&mut again) {
                        Err(tracked) if tracked.inner().is_data() => BadPayload(format!(
                            "payload field {}: {}",
                            tracked.path(),
                            tracked.inner()
                        )),
                        _ => BadPayload(format!("payload field: {e}")),
                    },
                );
            }
            Err(e) => return Err(malformed(e)),
        }
    } else {
        serde::de::IgnoredAny::deserialize(&mut de).map_err(malformed)?;
        EventView::default()
    };
    de.end().map_err(malformed)?;
    if !object {
        return Err(BadPayload("payload is not a JSON object".into()));
    }
    Ok(view)
}

/// Maps one event (its raw JSON body) to a job, a comment command, "ignored" with a reason, or
/// a ping.
pub fn map_event(
    event: &str,
    body: &[u8],
    github: &GithubSection,
    pull_requests: PullRequestPolicy,
) -> Result<Mapping, BadPayload> {
    let wanted = matches!(
        event,
        "push" | "pull_request" | "commit_comment" | "issue_comment"
    );
    let payload = read_payload(body, wanted)?;
    match event {
        "ping" => Ok(Mapping::Ping),
        "push" => map_push(&payload, github),
        "pull_request" => map_pull_request(&payload, github, pull_requests),
        "commit_comment" | "issue_comment" => map_comment(event, &payload, github),
        other => Ok(Mapping::Ignored(format!("{other} events start nothing"))),
    }
}

/// The command word of a comment: its first non-empty line must start with it.
pub const COMMENT_COMMAND: &str = "/infraflux";

fn map_comment(
    event: &str,
    payload: &EventView,
    github: &GithubSection,
) -> Result<Mapping, BadPayload> {
    let action = need(payload.action.as_ref(), "action", event)?;
    if let Some(reason) = repo_matches(payload, github, event)? {
        return Ok(Mapping::Ignored(reason));
    }
    // An edit could turn an old comment into an approval after the fact: only new ones count.
    if action != "created" {
        return Ok(Mapping::Ignored(format!("{event} {action} starts nothing")));
    }
    let comment = payload.comment.as_ref();
    let body = comment.and_then(|c| c.body.as_deref()).unwrap_or_default();
    let Some(words) = command_words(body) else {
        return Ok(Mapping::Ignored(format!(
            "the comment is not a {COMMENT_COMMAND} command"
        )));
    };
    let comment_id = comment
        .and_then(|c| c.id)
        .ok_or_else(|| BadPayload(format!("{event} payload has no comment.id")))?;
    let login = need(
        comment
            .and_then(|c| c.user.as_ref())
            .and_then(|u| u.login.as_ref())
            .or_else(|| payload.sender.as_ref().and_then(|s| s.login.as_ref())),
        "comment.user.login",
        event,
    )?
    .to_string();
    let on = if event == "commit_comment" {
        let sha = need(
            comment.and_then(|c| c.commit_id.as_ref()),
            "comment.commit_id",
            event,
        )?;
        if !is_sha(sha) {
            return Err(BadPayload(format!(
                "commit_comment's commit_id {sha:?} is not a commit sha"
            )));
        }
        CommentedOn::Commit(sha.to_ascii_lowercase())
    } else {
        let issue = payload.issue.as_ref();
        if issue.is_none_or(|i| i.pull_request.is_none()) {
            return Ok(Mapping::Ignored(
                "a comment on an issue, not on a pull request, approves nothing".into(),
            ));
        }
        let number = issue
            .and_then(|i| i.number)
            .ok_or_else(|| BadPayload("issue_comment payload has no issue.number".into()))?;
        CommentedOn::PullRequest(number)
    };
    let (plan_job, problem) = match words.as_slice() {
        ["apply"] => (None, None),
        ["apply", id] => match infraflux_handlers::command::validate_job_id(id) {
            Ok(id) => (Some(id), None),
            Err(e) => (None, Some(e.to_string())),
        },
        _ => (
            None,
            Some(format!(
                "`{COMMENT_COMMAND} {}` is not a command here; approve a plan with `{COMMENT_COMMAND} apply <job-id>`{}",
                words.join(" "),
                if matches!(on, CommentedOn::PullRequest(_)) {
                    ", or `/infraflux apply` for the newest plan of this pull request"
                } else {
                    ""
                }
            )),
        ),
    };
    Ok(Mapping::Command(CommentCommand {
        login,
        on,
        comment_id,
        plan_job,
        problem,
    }))
}

/// The words after `/infraflux` on the comment's first non-empty line, if it starts with it.
pub(crate) fn command_words(body: &str) -> Option<Vec<&str>> {
    let line = body.lines().map(str::trim).find(|l| !l.is_empty())?;
    let mut words = line.split_whitespace();
    (words.next()? == COMMENT_COMMAND).then(|| words.take(8).collect())
}

fn repo_matches(
    payload: &EventView,
    github: &GithubSection,
    event: &str,
) -> Result<Option<String>, BadPayload> {
    let full_name = need(
        payload
            .repository
            .as_ref()
            .and_then(|r| r.full_name.as_ref()),
        "repository.full_name",
        event,
    )?;
    if full_name.eq_ignore_ascii_case(&github.repo) {
        Ok(None)
    } else {
        Ok(Some(format!(
            "repository {full_name} is not the configured {}",
            github.repo
        )))
    }
}

fn map_push(payload: &EventView, github: &GithubSection) -> Result<Mapping, BadPayload> {
    let git_ref = need(payload.git_ref.as_ref(), "ref", "push")?;
    if let Some(reason) = repo_matches(payload, github, "push")? {
        return Ok(Mapping::Ignored(reason));
    }
    if payload.deleted == Some(true) {
        return Ok(Mapping::Ignored(format!("{git_ref} was deleted")));
    }
    let Some(branch) = git_ref.strip_prefix("refs/heads/") else {
        return Ok(Mapping::Ignored(format!("{git_ref} is not a branch")));
    };
    // The configured branch decides, as it does for the poller and for `plan`: the payload's
    // default branch may differ (a rename the config has not followed yet), and reconciling
    // two branches of one repository would make them fight over the same state.
    let configured = github.default_branch.as_str();
    if branch != configured {
        let payload_default = payload
            .repository
            .as_ref()
            .and_then(|r| r.default_branch.as_deref());
        return Ok(Mapping::Ignored(if payload_default == Some(branch) {
            format!(
                "push to {branch}, the repository's default branch on GitHub, but the agent reconciles [github] default_branch {configured}"
            )
        } else {
            format!("push to {branch}, not to the default branch {configured}")
        }));
    }
    let commit = need(payload.after.as_ref(), "after", "push")?;
    if !is_sha(commit) {
        return Err(BadPayload(format!(
            "push payload's after {commit:?} is not a commit sha"
        )));
    }
    // The GitHub login, as the two-person rule compares it with an approver's login.
    let requested_by = payload
        .sender
        .as_ref()
        .and_then(|s| s.login.clone())
        .or_else(|| payload.pusher.as_ref().and_then(|p| p.name.clone()))
        .unwrap_or_else(|| "github".into());
    let mut params = Map::new();
    params.insert("trigger".into(), json!("push"));
    params.insert("ref".into(), json!(branch));
    if payload.forced == Some(true) {
        params.insert("forced".into(), json!(true));
    }
    // Shown by the status page: which change this is, in the author's words.
    let head_commit = &payload.head_commit.0;
    if let Some(message) = &head_commit.message {
        params.insert("commit_title".into(), json!(first_line(message)));
    }
    if let Some(author) = &head_commit.author {
        params.insert("commit_author".into(), json!(first_line(author)));
    }
    Ok(Mapping::Job {
        kind: JobKind::RECONCILE,
        params,
        commit: commit.to_string(),
        idempotency_key: commit_key(&github.repo, commit),
        requested_by,
    })
}

fn map_pull_request(
    payload: &EventView,
    github: &GithubSection,
    policy: PullRequestPolicy,
) -> Result<Mapping, BadPayload> {
    let action = need(payload.action.as_ref(), "action", "pull_request")?;
    if let Some(reason) = repo_matches(payload, github, "pull_request")? {
        return Ok(Mapping::Ignored(reason));
    }
    if !matches!(action, "opened" | "synchronize" | "reopened") {
        return Ok(Mapping::Ignored(format!(
            "pull_request {action} starts nothing"
        )));
    }
    let number = payload
        .number
        .ok_or_else(|| BadPayload("pull_request payload has no number".into()))?;
    let pull_request = payload.pull_request.as_ref();
    let head_view = pull_request.and_then(|p| p.head.as_ref());
    // Decided before anything is fetched: planning runs the pull request's code.
    let repo_of = |side: Option<&HeadView>| {
        side.and_then(|h| h.repo.as_ref())
            .and_then(|r| r.full_name.clone())
    };
    let head_repo = repo_of(head_view);
    let base_repo =
        repo_of(pull_request.and_then(|p| p.base.as_ref())).unwrap_or_else(|| github.repo.clone());
    let same_repository = head_repo
        .as_deref()
        .is_some_and(|h| h.eq_ignore_ascii_case(&base_repo));
    let association = pull_request
        .and_then(|p| p.author_association.as_deref())
        .unwrap_or("NONE");
    let author = PullRequestAuthor {
        same_repository,
        association,
    };
    if let Err(why) =
        reconcile::may_plan_pull_request(policy.pr_plans, policy.has_plan_env_vars, author)
    {
        return Ok(Mapping::Ignored(why));
    }
    let head = need(
        head_view.and_then(|h| h.sha.as_ref()),
        "pull_request.head.sha",
        "pull_request",
    )?;
    if !is_sha(head) {
        return Err(BadPayload(format!(
            "pull_request head sha {head:?} is not a commit sha"
        )));
    }
    let head_ref = head_view
        .and_then(|h| h.git_ref.clone())
        .unwrap_or_default();
    let requested_by = payload
        .sender
        .as_ref()
        .and_then(|s| s.login.clone())
        .unwrap_or_else(|| "github".into());
    let mut params = Map::new();
    params.insert("trigger".into(), json!("pull_request"));
    params.insert("plan_only".into(), json!(true));
    params.insert("pull_request".into(), json!(number));
    params.insert("ref".into(), json!(head_ref));
    params.insert("same_repository".into(), json!(same_repository));
    params.insert("author_association".into(), json!(association));
    if let Some(title) = pull_request.and_then(|p| p.title.0.as_deref()) {
        params.insert("pull_request_title".into(), json!(first_line(title)));
    }
    Ok(Mapping::Job {
        kind: JobKind::RECONCILE,
        params,
        commit: head.to_string(),
        idempotency_key: format!("pr.{}.{number}.{head}", github.repo.to_ascii_lowercase()),
        requested_by,
    })
}

/// One commit gets one reconcile job, whichever path (webhook, NATS, poller) saw it first.
pub fn commit_key(repo: &str, commit: &str) -> String {
    format!(
        "reconcile.{}.{}",
        repo.to_ascii_lowercase(),
        commit.to_ascii_lowercase()
    )
}

fn is_sha(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit()) && s.chars().any(|c| c != '0')
}

/// The answer to one GitHub event, whichever way it came.
#[derive(Debug, Clone, PartialEq)]
pub enum Accepted {
    Ping,
    Ignored(String),
    Created { job_id: String },
    Duplicate { job_id: String },
}

/// Maps, dedups and stores one event; the caller's span names the delivery.
pub(crate) async fn accept(
    app: &std::sync::Arc<crate::app::App>,
    github: &GithubSection,
    source: Source,
    event: &str,
    body: &[u8],
) -> Result<Result<Accepted, BadPayload>, IngestError> {
    let reconcile_config = reconcile::SECTION.get(&app.config.handlers);
    let policy = PullRequestPolicy::of(reconcile_config);
    let mapping = match map_event(event, body, github, policy) {
        Ok(m) => m,
        Err(bad) => return Ok(Err(bad)),
    };
    let (kind, params, commit, idempotency_key, requested_by) = match mapping {
        Mapping::Ping => return Ok(Ok(Accepted::Ping)),
        Mapping::Ignored(reason) => return Ok(Ok(Accepted::Ignored(reason))),
        Mapping::Command(command) => {
            return crate::approval::answer(app, github, source, command)
                .await
                .map(Ok);
        }
        Mapping::Job {
            kind,
            params,
            commit,
            idempotency_key,
            requested_by,
        } => (kind, params, commit, idempotency_key, requested_by),
    };
    let ingest = &app.ingest;
    // A redelivery maps to the same idempotency key as the first delivery, so the claim in
    // `submit` answers "duplicate" for it as for the same event from another source.
    ingest.ensure_connected()?;
    let envelope = JobEnvelope {
        job_id: new_job_id(),
        kind,
        params,
        source,
        requested_by,
        idempotency_key,
        traceparent: Some(telemetry::current_traceparent()),
        commit: Some(commit),
        created_at: Utc::now(),
    };
    let submitted = ingest.submit(envelope).await?;
    Ok(Ok(match submitted {
        Submitted::Created { job_id } => Accepted::Created { job_id },
        Submitted::Duplicate { job_id } => Accepted::Duplicate { job_id },
    }))
}

/// Serves `<prefix>.github.<event>`: a workflow step on the self-hosted runner forwards the
/// event payload (`infraflux-agent ctl github-event`), for LANs that no webhook reaches.
/// Authentication is the NATS server's: who may publish there is set in its permissions.
pub async fn serve_nats(
    app: std::sync::Arc<crate::app::App>,
    shutdown: tokio_util::sync::CancellationToken,
    subscribed: crate::chatops::Subscribed,
) -> Result<(), async_nats::Error> {
    let subject = app.store.names.github_subject("*");
    crate::chatops::serve_queue(
        app,
        subject,
        shutdown,
        subscribed,
        |app, message| async move { nats_event(&app, &message).await },
    )
    .await
}

async fn nats_event(app: &std::sync::Arc<crate::app::App>, message: &async_nats::Message) -> Value {
    use tracing::Instrument;
    let Some(github) = &app.config.github else {
        return json!({"ok": false, "error": "GitHub events are off: the agent config has no [github] section"});
    };
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    };
    let subject_event = message
        .subject
        .as_str()
        .rsplit('.')
        .next()
        .unwrap_or_default()
        .to_string();
    let event = header("X-GitHub-Event").unwrap_or(subject_event);
    if !valid_event_name(&event) {
        return json!({"ok": false, "error": format!("{event:?} is not a GitHub event name")});
    }
    let Some(delivery) = header("X-GitHub-Delivery").or_else(|| header("Nats-Msg-Id")) else {
        return json!({"ok": false, "error": "missing X-GitHub-Delivery or Nats-Msg-Id header"});
    };
    let span = tracing::info_span!("github_event", event = %event, delivery = %delivery);
    let accepted = accept(app, github, Source::NatsGithub, &event, &message.payload)
        .instrument(span)
        .await;
    match accepted {
        Ok(Ok(Accepted::Ping)) => json!({"ok": true, "pong": true}),
        Ok(Ok(Accepted::Ignored(reason))) => json!({"ok": true, "ignored": reason}),
        Ok(Ok(Accepted::Created { job_id })) => {
            json!({"ok": true, "delivery": delivery, "jobs": [job_id], "job_id": job_id})
        }
        Ok(Ok(Accepted::Duplicate { job_id })) => {
            json!({"ok": true, "duplicate": true, "job": job_id, "job_id": job_id})
        }
        Ok(Err(bad)) => json!({"ok": false, "error": bad.to_string()}),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}

/// GitHub event names are lower-case words with underscores.
pub fn valid_event_name(event: &str) -> bool {
    !event.is_empty()
        && event.len() <= 64
        && event.chars().all(|c| c.is_ascii_lowercase() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn github_section() -> GithubSection {
        GithubSection {
            repo: "owner/infra".into(),
            default_branch: "main".into(),
            api_url: "https://api.github.com".into(),
            token: None,
            webhook_secret: infraflux_handlers::secret::SecretRefs(vec![]),
            webhook_id: None,
            redeliver: false,
        }
    }

    #[test]
    fn a_push_keeps_its_commit_title_and_author_for_the_status_page() {
        let github = github_section();
        let body = json!({
            "ref": "refs/heads/main",
            "after": "a".repeat(40),
            "repository": {"full_name": "owner/infra"},
            "head_commit": {
                "message": "\n  Bump <script>x</script> chart\n\nLong body",
                "author": {"name": "Ada L", "username": "ada"}
            }
        });
        let body = serde_json::to_vec(&body).expect("json");
        let mapping =
            map_event("push", &body, &github, PullRequestPolicy::default()).expect("mapped");
        let Mapping::Job { params, .. } = mapping else {
            panic!("not a job: {mapping:?}");
        };
        assert_eq!(params["commit_title"], "Bump <script>x</script> chart");
        assert_eq!(params["commit_author"], "ada");
        assert_eq!(first_line(&"x".repeat(500)).len(), MAX_TITLE_CHARS);
        // An odd head commit is not a reason to refuse the push.
        let odd = json!({
            "ref": "refs/heads/main",
            "after": "b".repeat(40),
            "repository": {"full_name": "owner/infra"},
            "head_commit": {"message": 5, "author": "someone"}
        });
        let odd = serde_json::to_vec(&odd).expect("json");
        let Ok(Mapping::Job { params, .. }) =
            map_event("push", &odd, &github, PullRequestPolicy::default())
        else {
            panic!("an odd head_commit refused the push");
        };
        assert!(params.get("commit_title").is_none());
    }

    /// The loose reading takes from a head commit what a JSON value of it gave, whatever its
    /// shape: the odd ones give nothing and refuse nothing, a repeated key's last value wins.
    #[test]
    fn a_head_commit_read_loosely_gives_what_its_json_value_gave() {
        fn from_value(head_commit: &Value) -> (Option<String>, Option<String>) {
            let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
            let author = head_commit.get("author");
            let login = text(author.and_then(|a| a.get("username")));
            let name = text(author.and_then(|a| a.get("name")));
            (text(head_commit.get("message")), login.or(name))
        }
        let shapes = [
            "null",
            r#""a string""#,
            "5",
            "-1.5",
            "true",
            r#"[1, {"message": "m"}]"#,
            "{}",
            r#"{"message": "m", "author": {"name": "n", "username": "u"}}"#,
            r#"{"message": "m", "author": {"name": "n"}}"#,
            r#"{"message": "m", "author": {"name": "n", "username": null}}"#,
            r#"{"message": 5, "author": "someone"}"#,
            r#"{"message": ["m"], "author": {"username": 7, "name": {"x": [1]}}}"#,
            r#"{"message": null, "author": null}"#,
            r#"{"message": "first", "message": "second"}"#,
            r#"{"message": "first", "message": 3}"#,
            r#"{"author": {"username": "a"}, "author": {"name": "b"}}"#,
            r#"{"id": "x", "message": "t\u00e9\n\nbody", "added": ["a"],
                "author": {"email": "e", "name": "n"}, "committer": {"name": "c"}}"#,
        ];
        for shape in shapes {
            let value: Value = serde_json::from_str(shape).expect("json");
            let loose: Loose<HeadCommitView> = serde_json::from_str(shape).expect(shape);
            assert_eq!(
                (loose.0.message, loose.0.author),
                from_value(&value),
                "{shape}"
            );
        }
        // A pull request's title likewise.
        for (shape, title) in [
            (r#""Fix it""#, Some("Fix it")),
            ("null", None),
            ("{}", None),
        ] {
            let loose: Loose<Option<String>> = serde_json::from_str(shape).expect(shape);
            assert_eq!(loose.0.as_deref(), title, "{shape}");
        }
    }

    #[test]
    fn a_payload_error_names_the_field_that_was_wrong() {
        let github = github_section();
        let map = |body: &str| map_event("push", body.as_bytes(), &github, Default::default());
        let wrong =
            r#"{"ref": "refs/heads/main", "repository": {"name": "infra", "full_name": 5}}"#;
        let Err(BadPayload(message)) = map(wrong) else {
            panic!("a wrong field was mapped");
        };
        assert!(
            message.starts_with("payload field repository.full_name: invalid type: integer `5`"),
            "{message}"
        );
        let Err(BadPayload(message)) = map(r#"{"ref": "refs/heads/main", "after": "#) else {
            panic!("malformed JSON was mapped");
        };
        assert!(message.starts_with("malformed JSON: "), "{message}");
    }
}
