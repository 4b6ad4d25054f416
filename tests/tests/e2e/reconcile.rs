//! Reconcile end to end: a real terraform against a real S3 server, a git repository as the
//! infra repo, a fake GitHub API and a fake Kubernetes API holding Argo CD Applications.

use std::time::Duration;

use chrono::Utc;
use infraflux_tests::fakes::{FakeDelivery, FakeGithub, FakeKube, GithubFault};
use infraflux_tests::peers::{InfraRepo, S3Server, backend, resources};
use infraflux_tests::*;
use serde_json::Value;

pub(crate) const WORKDIR: &str = "terraform/envs/prod";
const SENSITIVE: &str = "s3cr3t-db-pass-0042";
pub(crate) const API_TOKEN: &str = "api-token-value-7731";
pub(crate) const AWS_SECRET: &str = "testing-secret-key-xyz";

pub(crate) struct Lab {
    pub(crate) nats: Nats,
    s3: S3Server,
    pub(crate) repo: InfraRepo,
    pub(crate) gh: FakeGithub,
    pub(crate) kube: FakeKube,
    pub(crate) agent: TestAgent,
    pub(crate) client: async_nats::Client,
    /// The agent's config sections and environment, for starting another agent like it.
    pub(crate) extra: String,
    pub(crate) env: Vec<(&'static str, String)>,
    pub(crate) _dir: tempfile::TempDir,
}

/// Runs before the agent starts, with the fake GitHub, the repository and the agent's webhook URL.
pub(crate) type BeforeStart<'a> = Box<dyn FnOnce(&FakeGithub, &InfraRepo, &str) + 'a>;

pub(crate) struct LabOptions<'a> {
    pub(crate) reconcile: &'a str,
    pub(crate) github: &'a str,
    pub(crate) env: Vec<(&'static str, String)>,
    pub(crate) slow_seconds: u32,
    pub(crate) before_start: Option<BeforeStart<'a>>,
}

impl Default for LabOptions<'_> {
    fn default() -> Self {
        Self {
            reconcile: "",
            github: "redeliver = false",
            env: Vec::new(),
            slow_seconds: 0,
            before_start: None,
        }
    }
}

/// Everything but the agent: NATS, S3, the infra repository, the GitHub and Kubernetes fakes.
struct Peers {
    nats: Nats,
    s3: S3Server,
    repo: InfraRepo,
    gh: FakeGithub,
    kube: FakeKube,
    dir: tempfile::TempDir,
}

async fn peers(slow_seconds: u32, root_children_health: &str) -> Peers {
    init();
    let nats = Nats::start();
    let s3 = S3Server::start("tfstate").await;
    let repo = InfraRepo::new();
    repo.write(&format!("{WORKDIR}/backend.tf"), &backend(&s3.endpoint));
    repo.write(
        &format!("{WORKDIR}/main.tf"),
        &resources(&["cp_1"], slow_seconds),
    );
    repo.commit("Initial platform");
    let gh = FakeGithub::start().await;
    let kube = FakeKube::start("argocd").await;
    kube.add_app(
        "argocd",
        "root",
        "OutOfSync",
        "Healthy",
        &["cilium", "longhorn"],
    );
    kube.add_app("argocd", "cilium", "Synced", "Healthy", &[]);
    kube.add_app("argocd", "longhorn", "Synced", root_children_health, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    Peers {
        nats,
        s3,
        repo,
        gh,
        kube,
        dir,
    }
}

/// The `[github]`, `[kubernetes]` and `[reconcile]` sections for the peers.
fn lab_toml(p: &Peers, github: &str, reconcile: &str) -> String {
    let kubeconfig = p.kube.kubeconfig(p.dir.path());
    format!(
        r#"
[github]
repo = "lab/infra"
default_branch = "main"
api_url = "{gh}"
token = "env:TEST_GITHUB_TOKEN"
webhook_secret = "env:TEST_WEBHOOK_SECRET"
{github}

[kubernetes]
kubeconfig = "{kubeconfig}"

[reconcile]
repo_url = "{repo}"
workdir = "{WORKDIR}"
env = "prod"
poll_interval = "1h"
argocd_app = "root"
argocd_timeout = "20s"
timeout = "5m"
{reconcile}

[reconcile.env_vars]
AWS_ACCESS_KEY_ID = "env:TEST_AWS_KEY"
AWS_SECRET_ACCESS_KEY = "env:TEST_AWS_SECRET"
TF_VAR_api_token = "env:TEST_API_TOKEN"
"#,
        gh = p.gh.url,
        kubeconfig = kubeconfig.display(),
        repo = p.repo.url(),
    )
}

/// The secrets the lab config references, and the fixed HTTP port.
fn lab_env(http_port: u16) -> Vec<(&'static str, String)> {
    vec![
        (
            "TEST_GITHUB_TOKEN",
            "ghp_fakeTokenForTests0123456789abcdefABCD".to_string(),
        ),
        ("TEST_AWS_KEY", "testing".to_string()),
        ("TEST_AWS_SECRET", AWS_SECRET.to_string()),
        ("TEST_API_TOKEN", API_TOKEN.to_string()),
        ("INFRAFLUX_HTTP__LISTEN", format!("127.0.0.1:{http_port}")),
    ]
}

pub(crate) async fn lab(options: LabOptions<'_>) -> Lab {
    lab_with(options, "Healthy").await
}

async fn lab_with(options: LabOptions<'_>, child_health: &str) -> Lab {
    let p = peers(options.slow_seconds, child_health).await;
    let http_port = free_port();
    if let Some(f) = options.before_start {
        f(
            &p.gh,
            &p.repo,
            &format!("http://127.0.0.1:{http_port}/webhooks/github"),
        );
    }
    let extra = lab_toml(&p, options.github, options.reconcile);
    let mut env = lab_env(http_port);
    env.extend(options.env);
    let agent = start_reconciler(&p.nats, "reconciler", &extra, &env).await;
    let client = p.nats.client().await;
    Lab {
        nats: p.nats,
        s3: p.s3,
        repo: p.repo,
        gh: p.gh,
        kube: p.kube,
        agent,
        client,
        extra,
        env,
        _dir: p.dir,
    }
}

async fn start_reconciler(
    nats: &Nats,
    id: &str,
    extra: &str,
    env: &[(&'static str, String)],
) -> TestAgent {
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    start_agent_with_env(nats, id, extra, &env_refs, |_| {}).await
}

/// GitHub's push payload, for our repository's main branch at `sha`, pushed by `pusher`.
pub(crate) fn push_payload(sha: &str, pusher: &str) -> Vec<u8> {
    let mut p: Value = serde_json::from_slice(&fixture("github/push/push.json")).expect("json");
    p["ref"] = "refs/heads/main".into();
    p["after"] = sha.into();
    p["repository"]["full_name"] = "lab/infra".into();
    p["repository"]["default_branch"] = "main".into();
    p["pusher"]["name"] = pusher.into();
    p["sender"]["login"] = pusher.into();
    serde_json::to_vec(&p).expect("json")
}

impl Lab {
    pub(crate) async fn push(&self, sha: &str, pusher: &str) -> String {
        let (status, reply) = post_webhook(
            &self.agent.http,
            "push",
            &format!("push-{sha}"),
            &push_payload(sha, pusher),
        )
        .await;
        assert_eq!(status, 202, "{reply}");
        reply["jobs"][0].as_str().expect("job").to_string()
    }

    pub(crate) async fn settled(&self, job_id: &str) -> Value {
        wait_settled(&self.client, job_id, Duration::from_secs(90)).await
    }

    pub(crate) async fn apply(&self, plan_job: &str, who: &str) -> Value {
        command_as(&self.client, &format!("apply {plan_job}"), who).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_plans_waits_for_approval_applies_and_syncs_argocd() {
    let lab = lab(LabOptions::default()).await;
    let c1 = lab.repo.commit("Add the control plane");
    let plan_job = lab.push(&c1, "alice").await;
    let planned = lab.settled(&plan_job).await;
    assert_eq!(planned["state"], "awaiting_approval", "{planned}");
    assert_eq!(planned["commit"], c1.as_str());
    assert_eq!(
        planned["result"]["summary_headline"],
        "1 to add, 0 to change, 0 to destroy"
    );
    assert!(
        planned["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("apply {plan_job}")),
        "{planned}"
    );
    let statuses = lab.gh.statuses(&c1);
    let last = statuses.last().expect("a status");
    assert_eq!(last["context"], "infraflux/reconcile");
    assert_eq!(last["state"], "pending");
    assert!(
        last["description"]
            .as_str()
            .unwrap_or_default()
            .contains("awaiting approval"),
        "{last}"
    );
    assert!(
        lab.s3.keys("tfstate").await.is_empty(),
        "a plan writes no state"
    );

    let reply = lab.apply(&plan_job, "bob").await;
    assert_eq!(reply["ok"], true, "{reply}");
    let apply_job = reply["job_id"].as_str().expect("id").to_string();
    let applied = lab.settled(&apply_job).await;
    assert_eq!(applied["state"], "succeeded", "{applied}");
    assert_eq!(applied["kind"], "apply");
    assert_eq!(applied["commit"], c1.as_str());
    assert!(
        applied["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Argo CD root is Synced/Healthy"),
        "{applied}"
    );

    let keys = lab.s3.keys("tfstate").await;
    assert!(
        keys.contains(&"prod/terraform.tfstate".to_string()),
        "state object in S3: {keys:?}"
    );
    assert!(
        !keys.iter().any(|k| k.ends_with(".tflock")),
        "lock released: {keys:?}"
    );
    let synced = lab.kube.requests().into_iter().any(|r| {
        r.method == "PATCH"
            && r.path.ends_with("/applications/root")
            && !r.body["operation"]["sync"].is_null()
    });
    assert!(synced, "a sync of the root Application was requested");
    assert_eq!(
        lab.kube.app("argocd", "root").expect("root")["status"]["sync"]["status"],
        "Synced"
    );
    let last = lab.gh.statuses(&c1).last().cloned().expect("status");
    assert_eq!(last["state"], "success", "{last}");
    let plan = record(&lab.client, &plan_job).await;
    assert_eq!(plan["state"], "succeeded");
    assert!(
        plan["message"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("applied by job {apply_job}")),
        "{plan}"
    );
    // The GitHub token went to GitHub only as an Authorization header.
    assert!(lab.gh.requests().iter().all(|r| {
        r.authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer "))
    }));

    let again = lab.apply(&plan_job, "bob").await;
    assert_eq!(again["ok"], false, "{again}");
    assert!(
        again["error"]
            .as_str()
            .unwrap_or_default()
            .contains("already applied"),
        "{again}"
    );
    lab.agent.stop().await;
    drop(lab.nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_superseded_self_approved_and_moved_plans_are_refused() {
    let lab = lab(LabOptions {
        reconcile: "plan_ttl = \"8s\"\ntwo_person_rule = true",
        ..Default::default()
    })
    .await;
    let c1 = lab.repo.commit("One");
    let first = lab.push(&c1, "alice").await;
    assert_eq!(lab.settled(&first).await["state"], "awaiting_approval");

    // main moves on with no webhook: the plan no longer describes what main would apply.
    lab.repo.write(
        &format!("{WORKDIR}/main.tf"),
        &resources(&["cp_1", "cp_2"], 0),
    );
    let c2 = lab.repo.commit("Two");
    let moved = lab.apply(&first, "bob").await;
    assert_eq!(moved["ok"], false);
    assert!(
        moved["error"]
            .as_str()
            .unwrap_or_default()
            .contains("main moved from"),
        "{moved}"
    );

    // Two pushes in a row: the second plan supersedes the first.
    let second = lab.push(&c2, "alice").await;
    let planned = lab.settled(&second).await;
    assert_eq!(planned["state"], "awaiting_approval");
    assert_eq!(
        planned["result"]["summary_headline"],
        "2 to add, 0 to change, 0 to destroy"
    );
    let superseded = lab.apply(&first, "bob").await;
    assert_eq!(superseded["ok"], false);
    assert!(
        superseded["error"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("superseded by a newer plan, {second}")),
        "{superseded}"
    );

    let own = lab.apply(&second, "alice").await;
    assert_eq!(own["ok"], false);
    assert!(
        own["error"]
            .as_str()
            .unwrap_or_default()
            .contains("two-person rule"),
        "{own}"
    );

    tokio::time::sleep(Duration::from_secs(9)).await;
    let stale = lab.apply(&second, "bob").await;
    assert_eq!(stale["ok"], false);
    assert!(
        stale["error"]
            .as_str()
            .unwrap_or_default()
            .contains("expired"),
        "{stale}"
    );
    // Refused applies are rejected commands: no apply job exists.
    let jobs = all_records(&lab.client).await;
    assert!(jobs.iter().all(|j| j["kind"] != "apply"), "{jobs:?}");
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_gets_one_plan_comment_without_secrets_edited_on_new_pushes() {
    let lab = lab(LabOptions::default()).await;
    lab.repo.checkout_new_branch("feature");
    lab.repo
        .write(&format!("{WORKDIR}/main.tf"), &resources(&["cp_1"], 0));
    let head = lab.repo.commit("Feature");
    let pr = |sha: &str, action: &str| {
        let mut p: Value =
            serde_json::from_slice(&fixture("github/pull_request/opened.payload.json"))
                .expect("json");
        p["action"] = action.into();
        p["repository"]["full_name"] = "lab/infra".into();
        p["pull_request"]["head"]["sha"] = sha.into();
        p["pull_request"]["head"]["ref"] = "feature".into();
        serde_json::to_vec(&p).expect("json")
    };
    let number =
        serde_json::from_slice::<Value>(&fixture("github/pull_request/opened.payload.json"))
            .expect("json")["number"]
            .as_u64()
            .expect("number");
    let (status, reply) = post_webhook(
        &lab.agent.http,
        "pull_request",
        "pr-1",
        &pr(&head, "opened"),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
    let job = reply["jobs"][0].as_str().expect("job").to_string();
    let done = lab.settled(&job).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(
        done["message"]
            .as_str()
            .unwrap_or_default()
            .contains("speculative plan: 1 to add"),
        "{done}"
    );

    let comments = lab.gh.comments();
    assert_eq!(comments.len(), 1, "{comments:?}");
    let body = comments[0]["body"].as_str().expect("body");
    assert_eq!(comments[0]["issue"], number);
    assert!(
        body.contains("1 to add, 0 to change, 0 to destroy"),
        "{body}"
    );
    assert!(
        body.contains(done["trace_id"].as_str().expect("trace")),
        "the trace id is in the comment"
    );
    assert!(
        body.contains("terraform_data.cp_1"),
        "the plan itself is in the comment: {body}"
    );
    for secret in [SENSITIVE, API_TOKEN, AWS_SECRET] {
        assert!(
            !body.contains(secret),
            "{secret} leaked into the PR comment:\n{body}"
        );
    }
    assert!(
        body.contains("[REDACTED]"),
        "the token terraform did not know as sensitive was scrubbed: {body}"
    );

    // A new push to the PR edits the same comment.
    lab.repo.write(
        &format!("{WORKDIR}/main.tf"),
        &resources(&["cp_1", "cp_2"], 0),
    );
    let head2 = lab.repo.commit("Feature, more");
    let (status, reply) = post_webhook(
        &lab.agent.http,
        "pull_request",
        "pr-2",
        &pr(&head2, "synchronize"),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
    lab.settled(reply["jobs"][0].as_str().expect("job")).await;
    let comments = lab.gh.comments();
    assert_eq!(
        comments.len(),
        1,
        "edited in place, not added: {comments:?}"
    );
    assert!(
        comments[0]["body"]
            .as_str()
            .unwrap_or_default()
            .contains("2 to add"),
        "{comments:?}"
    );
    assert_eq!(
        lab.gh.statuses(&head2).last().expect("status")["state"],
        "success"
    );
    assert!(
        lab.s3.keys("tfstate").await.is_empty(),
        "nothing was applied from a pull request"
    );
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_failing_then_rate_limiting_holds_up_no_plan_and_the_feedback_lands_once_later() {
    let lab = lab(LabOptions::default()).await;
    lab.repo.checkout_new_branch("feature");
    let head = lab.repo.commit("Feature");
    let mut payload: Value =
        serde_json::from_slice(&fixture("github/pull_request/opened.payload.json")).expect("json");
    payload["repository"]["full_name"] = "lab/infra".into();
    payload["pull_request"]["head"]["sha"] = head.as_str().into();
    payload["pull_request"]["head"]["ref"] = "feature".into();
    // An incident (5xx), then the primary rate limit (reset in 10 s), then a secondary one.
    let reset_in = 10;
    lab.gh.fail_next([
        GithubFault::ServerError(502),
        GithubFault::ServerError(503),
        GithubFault::ServerError(502),
        GithubFault::ServerError(503),
        GithubFault::ServerError(502),
        GithubFault::ServerError(503),
        GithubFault::RateLimited {
            status: 403,
            reset_in,
        },
        GithubFault::SecondaryRateLimit {
            status: 403,
            retry_after: 3,
        },
    ]);
    let started = std::time::Instant::now();
    let (status, reply) = post_webhook(
        &lab.agent.http,
        "pull_request",
        "pr-github-down",
        &serde_json::to_vec(&payload).expect("json"),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
    let job = reply["jobs"][0].as_str().expect("job").to_string();
    let done = lab.settled(&job).await;
    let settled_after = started.elapsed();
    // The plan ran and ended as it would with GitHub answering: GitHub's errors are not its.
    assert_eq!(done["state"], "succeeded", "{done}");
    let message = done["message"].as_str().unwrap_or_default();
    assert!(message.contains("speculative plan: 1 to add"), "{done}");
    assert!(!message.contains("GitHub"), "{done}");
    assert!(
        lab.gh.statuses(&head).is_empty() && lab.gh.comments().is_empty(),
        "the job ended while GitHub still refused its feedback: {:?}",
        lab.gh.faulted()
    );

    let landed_after = wait_for(Duration::from_secs(60), "the feedback to land", || async {
        let statuses = lab.gh.statuses(&head);
        (statuses.last().is_some_and(|s| s["state"] == "success") && lab.gh.comments().len() == 1)
            .then(|| started.elapsed())
    })
    .await;
    let faulted = lab.gh.faulted();
    assert_eq!(lab.gh.faults_left(), 0, "{faulted:?}");
    let primary = faulted
        .iter()
        .find(|(_, status, _)| *status == 403)
        .map(|(_, _, at)| at.duration_since(started))
        .expect("a rate-limited request");
    eprintln!(
        "GitHub faults: {faulted:?}; job settled after {settled_after:?}, primary rate limit hit at {primary:?}, feedback landed after {landed_after:?}"
    );
    // x-ratelimit-reset was honoured: nothing landed before the reset, and soon after it.
    assert!(
        landed_after + Duration::from_secs(1) >= primary + Duration::from_secs(reset_in),
        "landed {landed_after:?}, rate limited at {primary:?}"
    );
    assert!(
        landed_after <= primary + Duration::from_secs(reset_in + 15),
        "landed {landed_after:?}, rate limited at {primary:?}"
    );

    // Exactly once, and the final status last: an older one never lands after it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let statuses = lab.gh.statuses(&head);
    assert_eq!(
        statuses.iter().filter(|s| s["state"] == "success").count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(statuses.last().expect("status")["state"], "success");
    let comments = lab.gh.comments();
    assert_eq!(comments.len(), 1, "{comments:?}");
    assert!(
        comments[0]["body"]
            .as_str()
            .unwrap_or_default()
            .contains("1 to add, 0 to change, 0 to destroy"),
        "{comments:?}"
    );
    // The token went only to GitHub, in the Authorization header.
    let token = lab
        .env
        .iter()
        .find(|(k, _)| *k == "TEST_GITHUB_TOKEN")
        .map(|(_, v)| v.clone())
        .expect("token");
    let seen = format!(
        "{} {:?} {:?} {:?}",
        record(&lab.client, &job).await,
        statuses,
        comments,
        stored_events(&lab.client).await
    );
    assert!(!seen.contains(&token), "the GitHub token leaked");
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_preflight_refuses_a_local_backend_a_wrong_scheme_and_an_unreachable_bucket() {
    let lab = lab(LabOptions::default()).await;
    let endpoint = lab.s3.endpoint.clone();
    let cases = [
        (
            "terraform {\n  backend \"local\" {\n    path = \"terraform.tfstate\"\n  }\n}\n"
                .to_string(),
            "backend \"local\" is not \"s3\"",
        ),
        (
            backend(&endpoint).replace("http://", "s3://"),
            "must start with http:// or https://",
        ),
        (
            backend(&endpoint).replace(
                "use_lockfile                = true",
                "use_lockfile                = false",
            ),
            "use_lockfile = true is missing",
        ),
        (
            backend(&endpoint).replace("\"tfstate\"", "\"no-such-bucket\""),
            "bucket no-such-bucket is not reachable",
        ),
    ];
    for (backend_tf, expected) in cases {
        lab.repo
            .write(&format!("{WORKDIR}/backend.tf"), &backend_tf);
        let sha = lab.repo.commit("Backend change");
        let job = submit(&lab.client, &format!("plan {sha}")).await;
        let done = lab.settled(&job).await;
        assert_eq!(done["state"], "failed", "{done}");
        let message = done["message"].as_str().unwrap_or_default();
        assert!(message.contains("backend preflight failed"), "{message}");
        assert!(
            message.contains(expected),
            "{expected:?} not in {message:?}"
        );
        assert_eq!(
            lab.gh.statuses(&sha).last().expect("status")["state"],
            "failure"
        );
    }
    assert!(lab.s3.keys("tfstate").await.is_empty());
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_poller_catches_a_push_that_came_with_no_webhook() {
    let lab = lab(LabOptions {
        env: vec![("INFRAFLUX_RECONCILE__POLL_INTERVAL", "1s".to_string())],
        ..Default::default()
    })
    .await;
    let c2 = lab
        .repo
        .commit("Pushed while the webhook could not reach us");
    let job = wait_for(
        Duration::from_secs(30),
        "the poller's job for the new commit",
        || async {
            all_records(&lab.client)
                .await
                .into_iter()
                .find(|j| j["commit"] == c2.as_str() && j["source"] == "poller")
        },
    )
    .await;
    assert_eq!(job["kind"], "reconcile");
    // With no payload to take them from, the plan reads the commit's first line and author
    // from its checkout (the status page shows them).
    let job_id = job["job_id"].as_str().expect("job id").to_string();
    let planned = wait_for(Duration::from_secs(60), "the poller's plan", || async {
        let r = infraflux_tests::record(&lab.client, &job_id).await;
        r["result"]["commit_title"].is_string().then_some(r)
    })
    .await;
    assert_eq!(
        planned["result"]["commit_title"],
        "Pushed while the webhook could not reach us"
    );
    assert_eq!(planned["result"]["commit_author"], "Codertocat");
    assert!(planned["params"].get("commit_title").is_none());
    // The webhook arriving late (GitHub redelivered it) starts nothing new.
    let (status, reply) =
        post_webhook(&lab.agent.http, "push", "late", &push_payload(&c2, "alice")).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["duplicate"], true);
    assert_eq!(reply["job"], job["job_id"]);
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_that_failed_on_an_unreachable_repository_is_planned_again_once_by_the_poller() {
    let lab = lab(LabOptions {
        env: vec![("INFRAFLUX_RECONCILE__POLL_INTERVAL", "1s".to_string())],
        ..Default::default()
    })
    .await;
    let c1 = lab.repo.commit("One");
    // The repository is unreachable when the push arrives.
    let away = lab.repo.path.with_extension("away");
    std::fs::rename(&lab.repo.path, &away).expect("move the repository away");
    let (status, reply) = post_webhook(
        &lab.agent.http,
        "push",
        "push-unreachable",
        &push_payload(&c1, "alice"),
    )
    .await;
    // The poller may have seen the commit in the instant before the move: then it is its job.
    let first = job_of_webhook(status, &reply);
    let failed = lab.settled(&first).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or_default()
            .contains("git"),
        "{failed}"
    );

    std::fs::rename(&away, &lab.repo.path).expect("bring it back");
    let replanned = wait_for(
        Duration::from_secs(60),
        "the poller's second plan of the head",
        || async {
            all_records(&lab.client).await.into_iter().find(|j| {
                j["commit"] == c1.as_str()
                    && j["job_id"] != first.as_str()
                    && j["state"] == "awaiting_approval"
            })
        },
    )
    .await;
    assert_eq!(replanned["source"], "poller", "{replanned}");
    // Planned now: more poll intervals start nothing more.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let for_c1 = all_records(&lab.client)
        .await
        .into_iter()
        .filter(|j| j["commit"] == c1.as_str())
        .count();
    assert_eq!(for_c1, 2, "one failed plan and one good one");
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delivery_is_redelivered_and_a_successful_one_is_not() {
    let failed_commit = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let remember = failed_commit.clone();
    let lab = lab(LabOptions {
        github: "redeliver = true",
        before_start: Some(Box::new(move |gh, repo, webhook| {
            let sha = repo.commit("Pushed while the agent answered 503");
            *remember.lock().expect("lock") = sha.clone();
            gh.set_webhook(webhook, WEBHOOK_SECRET);
            gh.add_delivery(FakeDelivery {
                id: 1,
                guid: "4a7a5a70-0000-11f0-8000-000000000001".into(),
                event: "push".into(),
                status_code: 503,
                delivered_at: Utc::now() - chrono::Duration::hours(2),
                payload: push_payload(&sha, "alice"),
            });
            gh.add_delivery(FakeDelivery {
                id: 2,
                guid: "4a7a5a70-0000-11f0-8000-000000000002".into(),
                event: "ping".into(),
                status_code: 200,
                delivered_at: Utc::now() - chrono::Duration::hours(1),
                payload: fixture("github/ping/payload.json"),
            });
        })),
        ..Default::default()
    })
    .await;
    let sha = failed_commit.lock().expect("lock").clone();
    let job = wait_for(
        Duration::from_secs(30),
        "the redelivered push's job",
        || async {
            all_records(&lab.client)
                .await
                .into_iter()
                .find(|j| j["commit"] == sha.as_str())
        },
    )
    .await;
    assert_eq!(job["source"], "webhook");
    let paths: Vec<String> = lab
        .gh
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.path)
        .collect();
    assert!(
        paths
            .iter()
            .any(|p| p.ends_with("/hooks/42/deliveries/1/attempts")),
        "{paths:?}"
    );
    assert!(
        !paths.iter().any(|p| p.ends_with("/deliveries/2/attempts")),
        "a delivered one is left alone: {paths:?}"
    );
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_that_waited_for_the_lock_while_main_moved_is_refused_before_terraform_runs() {
    let lab = lab(LabOptions::default()).await;
    let c1 = lab.repo.commit("One");
    let plan_job = lab.push(&c1, "alice").await;
    assert_eq!(lab.settled(&plan_job).await["state"], "awaiting_approval");

    // Another job holds the env's terraform lock, so the approved apply queues behind it.
    let locks = async_nats::jetstream::new(lab.client.clone())
        .get_key_value("infraflux-locks")
        .await
        .expect("locks bucket");
    let now = Utc::now();
    let holder = serde_json::json!({"holders": [{
        "owner": "elsewhere/01holder",
        "job_id": "01holder",
        "agent": "elsewhere",
        "mode": "write",
        "acquired_at": now.to_rfc3339(),
        "expires_at": (now + chrono::Duration::minutes(10)).to_rfc3339(),
    }]});
    locks
        .put(
            "terraform.prod",
            serde_json::to_vec(&holder).expect("json").into(),
        )
        .await
        .expect("hold the lock");
    let reply = lab.apply(&plan_job, "bob").await;
    assert_eq!(
        reply["ok"], true,
        "admitted while main is at the plan: {reply}"
    );
    let apply_job = reply["job_id"].as_str().expect("id").to_string();
    wait_state(&lab.client, &apply_job, "waiting").await;

    // main moves on while the apply waits; then the lock is released.
    lab.repo.write(
        &format!("{WORKDIR}/main.tf"),
        &resources(&["cp_1", "cp_2"], 0),
    );
    lab.repo.commit("Two");
    locks.delete("terraform.prod").await.expect("release");

    let refused = lab.settled(&apply_job).await;
    assert_eq!(refused["state"], "failed", "{refused}");
    let why = refused["message"].as_str().unwrap_or_default();
    assert!(why.contains("main moved from"), "{refused}");
    assert!(
        lab.s3.keys("tfstate").await.is_empty(),
        "terraform never applied the stale plan"
    );
    let plan = record(&lab.client, &plan_job).await;
    assert_eq!(plan["state"], "failed", "the stale plan is closed: {plan}");
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terraform_and_what_it_runs_continue_the_apply_jobs_trace() {
    let lab = lab(LabOptions::default()).await;
    // A provisioner writes down the TRACEPARENT it inherits from terraform.
    let seen = lab._dir.path().join("traceparent-seen");
    let mut tf = resources(&["cp_1"], 0);
    tf.push_str(&format!(
        "\nresource \"terraform_data\" \"trace\" {{\n  provisioner \"local-exec\" {{\n    command = \"printf %s \\\"$TRACEPARENT\\\" > {}\"\n  }}\n}}\n",
        seen.display()
    ));
    lab.repo.write(&format!("{WORKDIR}/main.tf"), &tf);
    let c1 = lab.repo.commit("A provisioner that reports its trace");
    let plan_job = lab.push(&c1, "alice").await;
    assert_eq!(lab.settled(&plan_job).await["state"], "awaiting_approval");
    let reply = lab.apply(&plan_job, "bob").await;
    let apply_job = reply["job_id"].as_str().expect("id").to_string();
    let applied = lab.settled(&apply_job).await;
    assert_eq!(applied["state"], "succeeded", "{applied}");
    let traceparent = std::fs::read_to_string(&seen).expect("the provisioner ran");
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    assert_eq!(parts.len(), 4, "a W3C traceparent: {traceparent:?}");
    assert_eq!(
        parts[1],
        applied["trace_id"].as_str().expect("trace id"),
        "terraform's children are in the apply job's trace"
    );
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_slow_apply_interrupts_terraform_and_leaves_no_lock_behind() {
    let lab = lab(LabOptions {
        slow_seconds: 60,
        env: vec![("INFRAFLUX_AGENT__KILL_GRACE", "60s".to_string())],
        ..Default::default()
    })
    .await;
    let c1 = lab.repo.commit("Slow resource");
    let plan_job = lab.push(&c1, "alice").await;
    assert_eq!(lab.settled(&plan_job).await["state"], "awaiting_approval");
    let reply = lab.apply(&plan_job, "bob").await;
    let apply_job = reply["job_id"].as_str().expect("id").to_string();
    wait_for(
        Duration::from_secs(60),
        "terraform to hold its state lock",
        || async {
            lab.s3
                .keys("tfstate")
                .await
                .iter()
                .any(|k| k.ends_with(".tflock"))
                .then_some(())
        },
    )
    .await;
    let cancelled = command(&lab.client, &format!("cancel {apply_job}")).await;
    assert_eq!(cancelled["ok"], true, "{cancelled}");
    let done = lab.settled(&apply_job).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    let keys = lab.s3.keys("tfstate").await;
    assert!(
        !keys.iter().any(|k| k.ends_with(".tflock")),
        "terraform released its lock on SIGINT: {keys:?}"
    );
    let plan = record(&lab.client, &plan_job).await;
    assert_eq!(
        plan["state"], "failed",
        "a plan whose apply was cancelled cannot be applied again: {plan}"
    );
    assert_eq!(
        lab.gh.statuses(&c1).last().expect("status")["state"],
        "error"
    );
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_with_changes_and_no_new_commit_is_reported_as_drift() {
    let lab = lab(LabOptions {
        reconcile: "drift_issue = true",
        ..Default::default()
    })
    .await;
    let events = EventLog::subscribe(&lab.client).await;
    let c1 = lab.repo.commit("Baseline");
    let plan_job = lab.push(&c1, "alice").await;
    lab.settled(&plan_job).await;
    let apply = lab.apply(&plan_job, "bob").await;
    assert_eq!(
        lab.settled(apply["job_id"].as_str().expect("id")).await["state"],
        "succeeded"
    );

    // A scheduled `plan main` right after: nothing changed, no drift.
    let clean = submit(&lab.client, "plan main").await;
    let clean = lab.settled(&clean).await;
    assert_eq!(clean["state"], "succeeded", "{clean}");
    assert_eq!(clean["result"]["drift"], false);

    // Someone removes the state by hand: the same commit now plans changes.
    lab.s3.delete("tfstate", "prod/terraform.tfstate").await;
    assert!(lab.s3.keys("tfstate").await.is_empty());
    let drifted = submit(&lab.client, "plan main").await;
    let done = lab.settled(&drifted).await;
    assert_eq!(done["result"]["drift"], true, "{done}");
    assert!(
        events
            .of(&drifted)
            .iter()
            .any(|e| e.message.starts_with("drift detected at")),
        "a drift event was published"
    );
    let issues = lab.gh.issues();
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert!(
        issues[0]["title"]
            .as_str()
            .unwrap_or_default()
            .contains("Drift detected in prod")
    );
    let metrics = metrics_text(&lab.agent.http).await;
    assert!(
        metrics.contains("infraflux_drift_detected{env=\"prod\"} 1"),
        "{metrics}"
    );
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_that_leaves_a_child_app_degraded_fails_and_names_it() {
    let lab = lab_with(LabOptions::default(), "Degraded").await;
    // Nothing to change: the plan is clean, and Argo CD is synced right away.
    lab.repo
        .write(&format!("{WORKDIR}/main.tf"), &resources(&[], 0));
    let sha = lab.repo.commit("No resources");
    let job = lab.push(&sha, "alice").await;
    let done = lab.settled(&job).await;
    assert_eq!(done["state"], "failed", "{done}");
    let message = done["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("not synced and healthy: longhorn Synced/Degraded"),
        "{message}"
    );
    assert!(
        !message.contains("cilium"),
        "healthy children are not listed: {message}"
    );
    assert_eq!(
        lab.gh.statuses(&sha).last().expect("status")["state"],
        "failure"
    );
    lab.agent.stop().await;
}

/// The job a push webhook started (`202`), or the one it duplicates (`200`, when the poller saw
/// the commit first).
fn job_of_webhook(status: u16, reply: &Value) -> String {
    match status {
        202 => reply["jobs"][0].as_str(),
        200 => reply["job"].as_str(),
        other => panic!("unexpected {other}: {reply}"),
    }
    .expect("job")
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_status_descriptions_are_scrubbed_of_secrets_like_comments() {
    let lab = lab(LabOptions::default()).await;
    // Argo CD's error quotes a credential, as a repository URL with a token in it does.
    const CLOUD_KEY: &str = "AKIAIOSFODNN7EXAMPLE";
    lab.kube.set_sync_outcome(
        "Failed",
        &format!(
            "rpc error: key {CLOUD_KEY} refused fetching https://x:{API_TOKEN}@git.lab/infra.git"
        ),
    );
    lab.repo
        .write(&format!("{WORKDIR}/main.tf"), &resources(&[], 0));
    let sha = lab.repo.commit("No resources");
    let job = lab.push(&sha, "alice").await;
    let done = lab.settled(&job).await;
    assert_eq!(done["state"], "failed", "{done}");
    let statuses = lab.gh.statuses(&sha);
    let last = statuses.last().cloned().expect("status");
    assert_eq!(last["state"], "failure", "{last}");
    let description = last["description"].as_str().unwrap_or_default();
    assert!(
        description.contains("Argo CD sync of root ended Failed"),
        "{description}"
    );
    assert!(description.contains("[REDACTED]"), "{description}");
    for status in &statuses {
        let description = status["description"].as_str().unwrap_or_default();
        for secret in [API_TOKEN, CLOUD_KEY] {
            assert!(
                !description.contains(secret),
                "{secret} leaked into a commit status: {description}"
            );
        }
    }
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_whose_agent_dies_stops_terraform_releases_its_lock_and_is_never_retried() {
    let p = peers(0, "Healthy").await;
    // The apply's provisioner writes down terraform's pid (its parent) and its own, then becomes
    // a long sleep.
    let pids = p.dir.path().join("provisioner-pids");
    let mut tf = resources(&["cp_1"], 0);
    tf.push_str(&format!(
        "\nresource \"terraform_data\" \"slow\" {{\n  provisioner \"local-exec\" {{\n    command = \"echo $PPID $$ > {}; exec sleep 300\"\n  }}\n}}\n",
        pids.display()
    ));
    p.repo.write(&format!("{WORKDIR}/main.tf"), &tf);
    let http_port = free_port();
    let config = p.dir.path().join("agent.toml");
    std::fs::write(
        &config,
        agent_config(
            &p.nats.url,
            "crash-1",
            &p.dir.path().join("state"),
            &lab_toml(&p, "redeliver = false", ""),
        ),
    )
    .expect("config");
    let env = lab_env(http_port);
    let mut first = crate::crash::spawn_agent(&config, &env, &p.dir.path().join("1.log"));
    let http = format!("http://127.0.0.1:{http_port}");
    wait_for(
        Duration::from_secs(30),
        "the agent process to be ready",
        || async {
            reqwest::get(format!("{http}/readyz"))
                .await
                .ok()
                .filter(|r| r.status() == 200)
        },
    )
    .await;
    let client = p.nats.client().await;
    let c1 = p.repo.commit("Slow resource");
    let (status, reply) =
        post_webhook(&http, "push", "crash-push", &push_payload(&c1, "alice")).await;
    assert_eq!(status, 202, "{reply}");
    let plan_job = reply["jobs"][0].as_str().expect("job").to_string();
    assert_eq!(
        wait_settled(&client, &plan_job, Duration::from_secs(90)).await["state"],
        "awaiting_approval"
    );
    let apply_job = submit(&client, &format!("apply {plan_job}")).await;
    let (terraform, sleep) = wait_for(
        Duration::from_secs(60),
        "the apply's provisioner to run",
        || async {
            let text = std::fs::read_to_string(&pids).ok()?;
            let mut numbers = text.split_whitespace().map(str::parse::<u32>);
            match (numbers.next(), numbers.next()) {
                (Some(Ok(terraform)), Some(Ok(sleep))) => Some((terraform, sleep)),
                _ => None,
            }
        },
    )
    .await;
    assert!(
        p.s3.keys("tfstate")
            .await
            .iter()
            .any(|k| k.ends_with(".tflock")),
        "terraform apply holds the state lock"
    );
    assert!(process_alive(terraform) && process_alive(sleep));
    first.kill9();

    // The kernel sends terraform SIGTERM as its agent dies; terraform stops the provisioner,
    // saves its state and releases its lock, with no agent left to ask it to.
    wait_for(
        Duration::from_secs(30),
        "terraform and its provisioner to end with their agent",
        || async { (!process_alive(terraform) && !process_alive(sleep)).then_some(()) },
    )
    .await;
    let keys = p.s3.keys("tfstate").await;
    assert!(
        !keys.iter().any(|k| k.ends_with(".tflock")),
        "terraform released its state lock: {keys:?}"
    );

    let env2 = [
        env.clone(),
        vec![("INFRAFLUX_AGENT__ID", "crash-2".to_string())],
    ]
    .concat();
    let _second = crate::crash::spawn_agent(&config, &env2, &p.dir.path().join("2.log"));
    let done = wait_settled(&client, &apply_job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "failed", "{done}");
    let message = done["message"].as_str().unwrap_or_default();
    assert!(message.contains("was interrupted"), "{message}");
    assert!(message.contains("never retried"), "{message}");
    // terraform may still have been killed hard (power loss), so the message says what to check.
    assert!(
        message.contains("force-unlock"),
        "it says what to check: {message}"
    );
    assert_eq!(done["interruptions"][0]["agent"], "crash-1", "{done}");
    assert_eq!(record(&client, &plan_job).await["state"], "failed");
}

/// `resources` plus one resource whose provisioner appends a line to `runs` each time terraform
/// creates it, then runs `then` (which decides whether the apply fails or takes its time).
fn counted_resources(runs: &std::path::Path, then: &str) -> String {
    let mut tf = resources(&["cp_1"], 0);
    tf.push_str(&format!(
        "\nresource \"terraform_data\" \"counted\" {{\n  provisioner \"local-exec\" {{\n    command = \"echo run >> {}; {then}\"\n  }}\n}}\n",
        runs.display()
    ));
    tf
}

/// How many times the counted resource's provisioner ran, i.e. how many applies reached it.
fn provisioner_runs(runs: &std::path::Path) -> usize {
    std::fs::read_to_string(runs)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_apply_applies_a_plan_with_changes_without_approval() {
    let lab = lab(LabOptions {
        reconcile: "auto_apply = true",
        ..Default::default()
    })
    .await;
    let c1 = lab.repo.commit("Add the control plane");
    let job = lab.push(&c1, "alice").await;
    let done = lab.settled(&job).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let message = done["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("applied without approval (auto_apply): 1 to add"),
        "{message}"
    );
    assert!(
        message.contains("Argo CD root is Synced/Healthy"),
        "{message}"
    );
    let keys = lab.s3.keys("tfstate").await;
    assert!(
        keys.contains(&"prod/terraform.tfstate".to_string()),
        "state object in S3: {keys:?}"
    );
    assert!(
        !keys.iter().any(|k| k.ends_with(".tflock")),
        "lock released: {keys:?}"
    );
    let last = lab.gh.statuses(&c1).last().cloned().expect("status");
    assert_eq!(last["state"], "success", "{last}");
    // What was applied is what main describes: planning it again finds nothing to do.
    let again = submit(&lab.client, "plan main").await;
    let again = lab.settled(&again).await;
    assert_eq!(again["state"], "succeeded", "{again}");
    assert_eq!(again["result"]["changes"], false, "{again}");
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_automatic_apply_is_not_applied_again_by_a_redelivery_or_the_poller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runs = dir.path().join("runs");
    let allow = dir.path().join("allow");
    let head = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (r, a, h) = (runs.clone(), allow.clone(), head.clone());
    let lab = lab(LabOptions {
        reconcile: "auto_apply = true",
        env: vec![("INFRAFLUX_RECONCILE__POLL_INTERVAL", "1s".to_string())],
        // main's head fails to apply from the start, so the poller sees no other commit.
        before_start: Some(Box::new(move |_, repo, _| {
            repo.write(
                &format!("{WORKDIR}/main.tf"),
                &counted_resources(&r, &format!("test -e {}", a.display())),
            );
            *h.lock().expect("lock") = repo.commit("A resource whose provisioner fails");
        })),
        ..Default::default()
    })
    .await;
    let c1 = head.lock().expect("lock").clone();
    let (status, reply) = post_webhook(
        &lab.agent.http,
        "push",
        "push-1",
        &push_payload(&c1, "alice"),
    )
    .await;
    // The poller may have seen the commit first: then the push is its duplicate.
    let job = job_of_webhook(status, &reply);
    let failed = lab.settled(&job).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("automatic apply") && message.contains("waits for a person"),
        "{message}"
    );
    assert!(
        message.contains("local-exec"),
        "terraform's reason: {message}"
    );
    assert_eq!(provisioner_runs(&runs), 1);
    let last = lab.gh.statuses(&c1).last().cloned().expect("status");
    assert_eq!(last["state"], "failure", "{last}");
    assert!(
        last["description"]
            .as_str()
            .unwrap_or_default()
            .contains("waits for a person"),
        "{last}"
    );

    // GitHub redelivers the push, and the workflow step forwards it over NATS.
    let (status, reply) = post_webhook(
        &lab.agent.http,
        "push",
        "push-1",
        &push_payload(&c1, "alice"),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["job"], job.as_str(), "{reply}");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("X-GitHub-Event", "push");
    headers.insert("Nats-Msg-Id", "actions-1-1");
    let forwarded = lab
        .client
        .request_with_headers(
            "infraflux.github.push",
            headers,
            push_payload(&c1, "alice").into(),
        )
        .await
        .expect("nats github reply");
    let forwarded: Value = serde_json::from_slice(&forwarded.payload).expect("json");
    assert_eq!(forwarded["job"], job.as_str(), "{forwarded}");

    // The poller looks at the head every second; a failed plan would be planned again.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let for_c1: Vec<Value> = all_records(&lab.client)
        .await
        .into_iter()
        .filter(|j| j["commit"] == c1.as_str())
        .collect();
    assert_eq!(for_c1.len(), 1, "nothing planned it again: {for_c1:?}");
    assert_eq!(provisioner_runs(&runs), 1, "nothing applied it again");

    // A person plans it again: the plan waits for approval instead of applying itself.
    std::fs::write(&allow, "").expect("let the provisioner succeed");
    let replan = submit(&lab.client, &format!("plan {c1}")).await;
    let replanned = lab.settled(&replan).await;
    assert_eq!(replanned["state"], "awaiting_approval", "{replanned}");
    let message = replanned["message"].as_str().unwrap_or_default();
    assert!(message.contains(&job), "names the failed job: {message}");
    assert!(message.contains(&format!("apply {replan}")), "{message}");
    assert_eq!(provisioner_runs(&runs), 1);
    let reply = lab.apply(&replan, "bob").await;
    assert_eq!(reply["ok"], true, "{reply}");
    let applied = lab.settled(reply["job_id"].as_str().expect("id")).await;
    assert_eq!(applied["state"], "succeeded", "{applied}");
    assert_eq!(provisioner_runs(&runs), 2);
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automatic_apply_interrupted_by_its_agent_stopping_is_not_applied_again_when_redelivered()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let runs = dir.path().join("runs");
    let lab = lab(LabOptions {
        reconcile: "auto_apply = true",
        // terraform gets the time to stop gracefully and release its state lock.
        env: vec![("INFRAFLUX_AGENT__KILL_GRACE", "20s".to_string())],
        ..Default::default()
    })
    .await;
    lab.repo.write(
        &format!("{WORKDIR}/main.tf"),
        &counted_resources(&runs, "sleep 60"),
    );
    let c1 = lab.repo.commit("A slow resource");
    let job = lab.push(&c1, "alice").await;
    wait_for(
        Duration::from_secs(60),
        "the automatic apply to reach the slow provisioner",
        || async { (provisioner_runs(&runs) > 0).then_some(()) },
    )
    .await;
    // The agent stops mid-apply: the job is left for redelivery to the next agent.
    lab.agent.stop().await;
    let left = record(&lab.client, &job).await;
    assert_eq!(left["state"], "running", "left for redelivery: {left}");

    let mut env = lab.env.clone();
    env.retain(|(k, _)| *k != "INFRAFLUX_HTTP__LISTEN");
    env.push((
        "INFRAFLUX_HTTP__LISTEN",
        format!("127.0.0.1:{}", free_port()),
    ));
    let second = start_reconciler(&lab.nats, "reconciler-2", &lab.extra, &env).await;
    let done = wait_settled(&lab.client, &job, Duration::from_secs(90)).await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["agent"], "reconciler-2", "{done}");
    assert_eq!(done["interruptions"][0]["agent"], "reconciler", "{done}");
    let message = done["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("automatic apply") && message.contains("was interrupted"),
        "{message}"
    );
    assert!(message.contains("waits for a person"), "{message}");
    assert!(
        message.contains("force-unlock"),
        "it says what to check: {message}"
    );
    assert_eq!(provisioner_runs(&runs), 1, "terraform apply ran once");
    let last = lab.gh.statuses(&c1).last().cloned().expect("status");
    assert_eq!(last["state"], "failure", "{last}");
    second.stop().await;
}

/// `state_dir` full: the plan fails with an error that says so, the agent keeps serving, and
/// the next push plans once there is room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_dir_fails_the_plan_clearly_and_the_agent_keeps_serving() {
    let lab = lab(LabOptions::default()).await;
    let full = FullDisk::mount_at(lab.agent.dir.path());
    let c1 = lab.repo.commit("Add the control plane");
    let failed = lab.settled(&lab.push(&c1, "alice").await).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(message.contains("No space left on device"), "{message}");
    let hint = format!("state_dir {} is full", lab.agent.dir.path().display());
    assert!(message.contains(&hint), "{message}");
    let ready = reqwest::get(format!("{}/readyz", lab.agent.http))
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);

    drop(full);
    let c2 = lab.repo.commit("Add the workers");
    let planned = lab.settled(&lab.push(&c2, "alice").await).await;
    assert_eq!(planned["state"], "awaiting_approval", "{planned}");
}
