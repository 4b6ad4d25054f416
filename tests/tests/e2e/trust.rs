//! Trust end to end, with the reconcile lab (real terraform and S3, the GitHub fake): which
//! pull requests are planned and with which credentials, secrets in any encoding, and approvals
//! that GitHub authenticates.

use std::time::Duration;

use futures::StreamExt;
use infraflux_tests::fakes::GithubFault;
use infraflux_tests::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::reconcile::{API_TOKEN, Lab, LabOptions, WORKDIR, lab};

/// What `[reconcile.plan_env_vars]` hands a pull request's plan instead of `env_vars`.
const PLAN_TOKEN: &str = "read-only-plan-token-4417";

/// GitHub's `pull_request opened` for lab/infra, by `association`, from `head_repo`.
fn pull_request(number: u64, sha: &str, association: &str, head_repo: &str) -> Vec<u8> {
    let mut p: Value =
        serde_json::from_slice(&fixture("github/pull_request/opened.payload.json")).expect("json");
    p["number"] = json!(number);
    p["repository"]["full_name"] = json!("lab/infra");
    p["pull_request"]["number"] = json!(number);
    p["pull_request"]["author_association"] = json!(association);
    p["pull_request"]["head"]["sha"] = json!(sha);
    p["pull_request"]["head"]["ref"] = json!("feature");
    p["pull_request"]["head"]["repo"]["full_name"] = json!(head_repo);
    p["pull_request"]["base"]["repo"]["full_name"] = json!("lab/infra");
    serde_json::to_vec(&p).expect("json")
}

/// A webhook answered `200 {"ignored": ...}` with `why` in the reason.
fn assert_ignored(status: u16, reply: &Value, why: &str) {
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["ignored"].as_str().unwrap_or_default().contains(why),
        "{reply}"
    );
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

impl Lab {
    async fn pull_request(
        &self,
        number: u64,
        sha: &str,
        association: &str,
        head: &str,
    ) -> (u16, Value) {
        post_webhook(
            &self.agent.http,
            "pull_request",
            &format!("pr-{number}-{sha}"),
            &pull_request(number, sha, association, head),
        )
        .await
    }

    /// Every text the agent sent out: comments, statuses, issues, records and events.
    async fn everything_sent(&self) -> String {
        let mut all = String::new();
        for r in self.gh.requests() {
            all.push_str(&r.body.to_string());
        }
        for r in all_records(&self.client).await {
            all.push_str(&r.to_string());
        }
        for e in stored_events(&self.client).await {
            all.push_str(&e.to_string());
        }
        all
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_pull_requests_are_never_fetched_and_a_members_plan_gets_plan_env_vars() {
    let lab = lab(LabOptions {
        reconcile: r#"
[reconcile.plan_env_vars]
AWS_ACCESS_KEY_ID = "env:TEST_AWS_KEY"
AWS_SECRET_ACCESS_KEY = "env:TEST_AWS_SECRET"
TF_VAR_api_token = "env:TEST_PLAN_TOKEN"
"#,
        env: vec![("TEST_PLAN_TOKEN", PLAN_TOKEN.to_string())],
        ..Default::default()
    })
    .await;
    lab.repo.checkout_new_branch("feature");
    // Proves which token the plan saw, without printing either.
    lab.repo.write(
        &format!("{WORKDIR}/probe.tf"),
        "resource \"terraform_data\" \"credential_probe\" {\n  input = sha256(var.api_token)\n}\n",
    );
    let head = lab.repo.commit("Probe the credentials");

    let (status, reply) = lab.pull_request(7, &head, "OWNER", "someone/infra").await;
    assert_ignored(status, &reply, "fork");
    let (status, reply) = lab.pull_request(8, &head, "CONTRIBUTOR", "lab/infra").await;
    assert_ignored(status, &reply, "CONTRIBUTOR");
    // No job, and nothing fetched: the agent has no copy of the repository at all.
    assert!(all_records(&lab.client).await.is_empty());
    let cache = lab.agent.dir.path().join("reconcile");
    assert!(!cache.exists(), "{} exists", cache.display());

    let (status, reply) = lab.pull_request(9, &head, "MEMBER", "lab/infra").await;
    assert_eq!(status, 202, "{reply}");
    let job = reply["jobs"][0].as_str().expect("job").to_string();
    let planned = lab.settled(&job).await;
    assert_eq!(planned["state"], "succeeded", "{planned}");
    let comments: String = lab
        .gh
        .comments()
        .iter()
        .filter(|c| c["issue"] == 9)
        .map(|c| c["body"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        comments.contains("terraform_data.credential_probe"),
        "{comments}"
    );
    assert!(comments.contains(&sha256_hex(PLAN_TOKEN)), "{comments}");
    assert!(!comments.contains(&sha256_hex(API_TOKEN)), "{comments}");
    let sent = lab.everything_sent().await;
    assert!(!sent.contains(PLAN_TOKEN) && !sent.contains(API_TOKEN));
    lab.agent.stop().await;
}

/// A secret with bytes that base64, hex, URL and JSON encodings all change.
const LEAKY: &str = "p@ss w/rd+Z?9&x<tok>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_printing_a_secrets_encodings_leaks_none_of_them() {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
    let lab = lab(LabOptions {
        env: vec![("TEST_API_TOKEN", LEAKY.to_string())],
        ..Default::default()
    })
    .await;
    lab.repo.checkout_new_branch("feature");
    // Terraform has no hex function: each character's code from a printable-ASCII table.
    lab.repo.write(
        &format!("{WORKDIR}/encodings.tf"),
        r##"
locals {
  ascii = " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~"
}

resource "terraform_data" "encodings" {
  input = {
    base64    = base64encode(var.api_token)
    base64url = replace(replace(trimsuffix(base64encode(var.api_token), "="), "+", "-"), "/", "_")
    embedded  = base64encode("user:${var.api_token}@host")
    hex       = join("", [for c in split("", var.api_token) : format("%02x", index(split("", local.ascii), c) + 32)])
    url       = urlencode(var.api_token)
    json      = jsonencode({ token = var.api_token })
  }
}
"##,
    );
    let head = lab.repo.commit("Print the token, encoded");
    let (status, reply) = lab.pull_request(11, &head, "OWNER", "lab/infra").await;
    assert_eq!(status, 202, "{reply}");
    let job = reply["jobs"][0].as_str().expect("job").to_string();
    let planned = lab.settled(&job).await;
    assert_eq!(planned["state"], "succeeded", "{planned}");
    let comment: String = lab
        .gh
        .comments()
        .iter()
        .map(|c| c["body"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(comment.contains("terraform_data.encodings"), "{comment}");
    // Each attribute is there, scrubbed.
    for attribute in ["base64", "base64url", "embedded", "hex", "url", "json"] {
        assert!(
            comment.contains(&format!("{attribute} ")),
            "{attribute}: {comment}"
        );
    }
    let sent = lab.everything_sent().await;
    let forms = [
        LEAKY.to_string(),
        STANDARD.encode(LEAKY),
        URL_SAFE.encode(LEAKY),
        URL_SAFE_NO_PAD.encode(LEAKY),
        hex::encode(LEAKY),
        "p%40ss+w%2Frd%2BZ%3F9%26x%3Ctok%3E".to_string(),
        "p@ss w/rd+Z?9\\u0026x\\u003ctok\\u003e".to_string(),
        // The middle of the secret, as it sits base64-encoded inside the larger blob.
        STANDARD.encode("user:p@ss w/rd+Z?9&x<tok>@host")[8..24].to_string(),
    ];
    for form in &forms {
        assert!(!sent.contains(form.as_str()), "{form} leaked");
        assert!(
            !comment.contains(form.as_str()),
            "{form} leaked in the comment"
        );
    }
    assert!(comment.contains("[REDACTED]"), "{comment}");
    lab.agent.stop().await;
}

/// A comment command as GitHub delivers it: on a commit, or on pull request `number`.
fn comment_payload(event: &str, id: u64, login: &str, body: &str, on: &str) -> Vec<u8> {
    let base: Value = serde_json::from_slice(&fixture(
        "github/issue_comment/pull-request-issue-comment.json",
    ))
    .expect("json");
    let mut p = base.clone();
    p["repository"]["full_name"] = json!("lab/infra");
    p["sender"]["login"] = json!(login);
    p["comment"]["id"] = json!(id);
    p["comment"]["body"] = json!(body);
    p["comment"]["user"]["login"] = json!(login);
    if event == "commit_comment" {
        p.as_object_mut().expect("object").remove("issue");
        p["comment"]["commit_id"] = json!(on);
    } else {
        p["issue"]["number"] = json!(on.parse::<u64>().expect("number"));
    }
    serde_json::to_vec(&p).expect("json")
}

impl Lab {
    async fn comment(
        &self,
        event: &str,
        id: u64,
        login: &str,
        body: &str,
        on: &str,
    ) -> (u16, Value) {
        post_webhook(
            &self.agent.http,
            event,
            &format!("comment-{id}-{}", infraflux_handlers::new_job_id()),
            &comment_payload(event, id, login, body, on),
        )
        .await
    }

    fn answers(&self) -> Vec<String> {
        let mut all: Vec<Value> = self.gh.commit_comments();
        all.extend(self.gh.comments());
        all.iter()
            .map(|c| c["body"].as_str().unwrap_or_default().to_string())
            .filter(|b| b.contains("infraflux:approval"))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_comments_from_a_non_approver_the_pusher_and_an_approver() {
    let lab = lab(LabOptions {
        reconcile: "approvers = [\"alice\", \"Carol\"]\ntwo_person_rule = true",
        ..Default::default()
    })
    .await;
    let c1 = lab.repo.commit("Add the control plane");
    let plan = lab.push(&c1, "alice").await;
    assert_eq!(lab.settled(&plan).await["state"], "awaiting_approval");
    let command = format!("/infraflux apply {plan}");

    let (status, reply) = lab
        .comment("commit_comment", 501, "mallory", &command, &c1)
        .await;
    assert_ignored(status, &reply, "not one of [reconcile] approvers");
    let (status, reply) = lab
        .comment("commit_comment", 502, "alice", &command, &c1)
        .await;
    assert_ignored(status, &reply, "two-person rule");
    let answers = lab.answers();
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(
        answers[0].contains("Not applied") && answers[0].contains("mallory"),
        "{answers:?}"
    );
    assert!(answers[1].contains("two-person rule"), "{answers:?}");
    assert!(
        all_records(&lab.client)
            .await
            .iter()
            .all(|r| r["kind"] != "apply"),
        "a refused approval queues nothing"
    );

    // An approver (logins are case-insensitive), on the pull request that brought c1:
    // `/infraflux apply` alone means that pull request's newest plan.
    lab.gh.add_pull_request(4, &c1, None);
    let (status, reply) = lab
        .comment("issue_comment", 503, "carol", "/infraflux apply", "4")
        .await;
    assert_eq!(status, 202, "{reply}");
    let apply = reply["jobs"][0].as_str().expect("apply job").to_string();
    let applied = lab.settled(&apply).await;
    assert_eq!(applied["state"], "succeeded", "{applied}");
    assert_eq!(applied["kind"], "apply");
    assert_eq!(applied["requested_by"], "carol");
    assert_eq!(applied["params"]["plan_job"], plan.as_str());
    let answers = lab.answers();
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(
        answers[2].contains(&format!("apply job `{apply}`")),
        "{answers:?}"
    );

    // The same comment again (GitHub redelivers; the runner forwards it too): the same job,
    // no second answer.
    let (status, reply) = lab
        .comment("issue_comment", 503, "carol", "/infraflux apply", "4")
        .await;
    assert!(status == 200 || status == 202, "{reply}");
    assert_eq!(lab.answers().len(), 3);
    let applies: Vec<Value> = all_records(&lab.client)
        .await
        .into_iter()
        .filter(|r| r["kind"] == "apply")
        .collect();
    assert_eq!(applies.len(), 1, "{applies:?}");
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_approvers_github_write_permission_decides_and_chatops_approvals_can_be_off() {
    let lab = lab(LabOptions {
        reconcile: "chatops_approvals = false",
        ..Default::default()
    })
    .await;
    lab.gh.set_permission("dave", "maintain");
    lab.gh.set_permission("erin", "read");
    let c1 = lab.repo.commit("Add the control plane");
    let plan = lab.push(&c1, "alice").await;
    assert_eq!(lab.settled(&plan).await["state"], "awaiting_approval");

    let chatops = lab.apply(&plan, "bob").await;
    assert_eq!(chatops["ok"], false, "{chatops}");
    assert!(
        chatops["error"]
            .as_str()
            .unwrap_or_default()
            .contains("chatops_approvals"),
        "{chatops}"
    );
    let command = format!("/infraflux apply {plan}");
    for (id, login, why) in [
        (601, "erin", "read permission"),
        (602, "zed", "none permission"),
    ] {
        let (status, reply) = lab
            .comment("commit_comment", id, login, &command, &c1)
            .await;
        assert_ignored(status, &reply, why);
    }
    // A plan of another commit is not approved from this one.
    let elsewhere = "0123456789abcdef0123456789abcdef01234567";
    let (status, reply) = lab
        .comment("commit_comment", 603, "dave", &command, elsewhere)
        .await;
    assert_ignored(status, &reply, "not of commit");

    let (status, reply) = lab
        .comment("commit_comment", 604, "dave", &command, &c1)
        .await;
    assert_eq!(status, 202, "{reply}");
    let apply = reply["jobs"][0].as_str().expect("apply job").to_string();
    assert_eq!(lab.settled(&apply).await["state"], "succeeded");
    lab.agent.stop().await;
}

/// Connects as `user` and collects the server's errors (permission violations).
async fn connect_as(
    nats: &Nats,
    user: &str,
) -> (
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client =
        async_nats::ConnectOptions::with_user_and_password(user.into(), format!("{user}-pw"))
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        let _ = tx.send(e.to_string());
                    }
                }
            })
            .connect(&nats.url)
            .await
            .unwrap_or_else(|e| panic!("connect as {user}: {e}"));
    (client, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nats_permissions_let_only_the_chat_bridge_and_admins_approve() {
    init();
    let authorization = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/nats-cluster/nats-authorization.conf"),
    )
    .expect("deploy/nats-cluster/nats-authorization.conf");
    let passwords = [
        ("INFRAFLUX_NATS_AGENT_PASSWORD", "agent-pw"),
        ("INFRAFLUX_NATS_CHAT_PASSWORD", "chat-pw"),
        ("INFRAFLUX_NATS_ADMIN_PASSWORD", "admin-pw"),
        ("INFRAFLUX_NATS_FORWARDER_PASSWORD", "forwarder-pw"),
    ];
    let nats = Nats::start_with_config(
        "include authorization.conf\n",
        &[("authorization.conf", &authorization)],
        &passwords,
    );
    // The agents serve every verb.
    let (agent, _) = connect_as(&nats, "agent").await;
    let mut served = agent.subscribe("infraflux.cmd.>").await.expect("subscribe");
    agent.flush().await.expect("flush");
    let verbs = ["apply", "upgrade", "cancel", "plan"];
    // (user, verb, allowed)
    let mut cases = Vec::new();
    for verb in verbs {
        cases.push(("admin", verb, true));
        cases.push(("chat", verb, matches!(verb, "apply" | "plan")));
        cases.push(("forwarder", verb, false));
    }
    for (user, verb, allowed) in cases {
        let (client, mut errors) = connect_as(&nats, user).await;
        let subject = format!("infraflux.cmd.{verb}");
        client
            .publish(subject.clone(), format!("{verb} from {user}").into())
            .await
            .expect("publish");
        client.flush().await.expect("flush");
        if allowed {
            let message = tokio::time::timeout(std::time::Duration::from_secs(5), served.next())
                .await
                .unwrap_or_else(|_| panic!("{user} could not publish {subject}"))
                .expect("message");
            assert_eq!(message.subject.as_str(), subject);
            assert_eq!(message.payload, format!("{verb} from {user}").as_bytes());
        } else {
            let error = tokio::time::timeout(std::time::Duration::from_secs(5), errors.recv())
                .await
                .unwrap_or_else(|_| panic!("{user} published {subject} without a violation"))
                .expect("error");
            assert!(
                error.to_lowercase().contains("permissions violation"),
                "{error}"
            );
            assert!(error.contains(&subject), "{error}");
        }
    }
}

impl Lab {
    /// The comment as the runner's workflow step forwards it over NATS.
    async fn forward_comment(
        &self,
        event: &str,
        id: u64,
        login: &str,
        body: &str,
        on: &str,
    ) -> Value {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("X-GitHub-Event", event);
        headers.insert(
            "Nats-Msg-Id",
            format!("actions-{id}-{}", infraflux_handlers::new_job_id()).as_str(),
        );
        let reply = self
            .client
            .request_with_headers(
                format!("infraflux.github.{event}"),
                headers,
                comment_payload(event, id, login, body, on).into(),
            )
            .await
            .expect("reply");
        serde_json::from_slice(&reply.payload).expect("json")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comment_forwarded_over_nats_approves_only_as_github_holds_it() {
    let lab = lab(LabOptions {
        reconcile: "approvers = [\"carol\"]",
        ..Default::default()
    })
    .await;
    let c1 = lab.repo.commit("Add the control plane");
    let plan = lab.push(&c1, "alice").await;
    assert_eq!(lab.settled(&plan).await["state"], "awaiting_approval");
    let command = format!("/infraflux apply {plan}");

    // Whoever holds the forwarder's credential could claim any login: GitHub is asked.
    let forged = lab
        .forward_comment("commit_comment", 701, "carol", &command, &c1)
        .await;
    assert!(
        forged["ignored"]
            .as_str()
            .unwrap_or_default()
            .contains("GitHub has no such comment"),
        "{forged}"
    );
    lab.gh.add_comment_by(true, 702, "mallory", &command);
    let borrowed = lab
        .forward_comment("commit_comment", 702, "carol", &command, &c1)
        .await;
    assert!(
        borrowed["ignored"]
            .as_str()
            .unwrap_or_default()
            .contains("another login"),
        "{borrowed}"
    );
    lab.gh.add_comment_by(true, 703, "carol", "LGTM");
    let rewritten = lab
        .forward_comment("commit_comment", 703, "carol", &command, &c1)
        .await;
    assert!(
        rewritten["ignored"]
            .as_str()
            .unwrap_or_default()
            .contains("different text"),
        "{rewritten}"
    );
    assert!(
        all_records(&lab.client)
            .await
            .iter()
            .all(|r| r["kind"] != "apply")
    );

    lab.gh.add_comment_by(true, 704, "carol", &command);
    let real = lab
        .forward_comment("commit_comment", 704, "carol", &command, &c1)
        .await;
    assert_eq!(real["ok"], true, "{real}");
    let apply = real["job_id"].as_str().expect("apply job").to_string();
    assert_eq!(lab.settled(&apply).await["state"], "succeeded");
    lab.agent.stop().await;
}

/// GitHub failing when the agent answers an approval comment: the apply is queued and runs
/// regardless; the answer is retried in the background and lands once, also when one try was
/// carried out by GitHub and its answer lost (the retry finds that comment and posts no other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_answer_github_fails_to_take_is_posted_later_and_once() {
    let lab = lab(LabOptions {
        reconcile: "approvers = [\"alice\"]",
        ..Default::default()
    })
    .await;
    let c1 = lab.repo.commit("Add the control plane");
    let plan = lab.push(&c1, "bob").await;
    assert_eq!(lab.settled(&plan).await["state"], "awaiting_approval");
    let comments = format!("/commits/{c1}/comments");
    // The first look for an earlier answer fails; the post after it is carried out and its
    // answer lost.
    lab.gh.fail_next_on(
        &format!("GET /repos/lab/infra{comments}"),
        [GithubFault::ServerError(503)],
    );
    lab.gh.fail_next_on(
        &format!("POST /repos/lab/infra{comments}"),
        [GithubFault::LostAnswer(502)],
    );
    let (status, reply) = lab
        .comment(
            "commit_comment",
            701,
            "alice",
            &format!("/infraflux apply {plan}"),
            &c1,
        )
        .await;
    assert_eq!(status, 202, "{reply}");
    let apply = reply["jobs"][0].as_str().expect("apply job").to_string();
    assert_eq!(lab.settled(&apply).await["state"], "succeeded");

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(lab.gh.faults_left() == 0 && lab.answers().len() == 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the answer did not land: {} faults left, met {:?}, answers {:?}, requests {:?}",
            lab.gh.faults_left(),
            lab.gh.faulted(),
            lab.answers(),
            lab.gh
                .requests()
                .iter()
                .map(|r| format!("{r:?}").chars().take(120).collect::<String>())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Later tries (if any were still due) find the answer and post nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let answers = lab.answers();
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert!(
        answers[0].contains(&format!("apply job `{apply}`")),
        "{answers:?}"
    );
    let faulted: Vec<String> = lab
        .gh
        .faulted()
        .into_iter()
        .map(|(what, ..)| what)
        .collect();
    assert_eq!(
        faulted,
        [
            format!("GET /repos/lab/infra{comments}"),
            format!("POST /repos/lab/infra{comments}")
        ],
        "both faults were met"
    );
    lab.agent.stop().await;
}
