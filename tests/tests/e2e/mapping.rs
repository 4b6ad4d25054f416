//! The mapping of GitHub events to jobs, against GitHub's own payloads.

use infraflux_agent::config::GithubSection;
use infraflux_agent::github::{
    BadPayload, CommentCommand, CommentedOn, Mapping, PullRequestPolicy, commit_key,
};
use infraflux_handlers::JobKind;
use infraflux_handlers::reconcile::PrPlans;
use serde_json::{Value, json};

/// Maps under the default pull request policy (`pr_plans = "trusted"`, no `plan_env_vars`).
fn map_event(event: &str, body: &[u8], github: &GithubSection) -> Result<Mapping, BadPayload> {
    infraflux_agent::github::map_event(event, body, github, PullRequestPolicy::default())
}

fn fixture(path: &str) -> Value {
    serde_json::from_slice(&infraflux_tests::fixture(&format!("github/{path}")))
        .expect("fixture is JSON")
}

fn bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

/// The `[github]` section for `repo`, whose default branch is `master` as in go-scm's fixtures.
fn gh(repo: &str) -> GithubSection {
    gh_on(repo, "master")
}

fn gh_on(repo: &str, default_branch: &str) -> GithubSection {
    GithubSection {
        repo: repo.to_string(),
        default_branch: default_branch.into(),
        api_url: "https://api.github.com".into(),
        token: None,
        webhook_secret: infraflux_handlers::secret::SecretRefs(vec![]),
        webhook_id: None,
        redeliver: false,
    }
}

fn repo_of(payload: &Value) -> String {
    payload["repository"]["full_name"]
        .as_str()
        .expect("repo")
        .to_string()
}

#[test]
fn push_to_the_configured_default_branch_is_a_reconcile_of_its_commit() {
    for file in [
        "push/push.json",
        "push/with-new-branch.payload.json",
        "push/github-commit-event.json",
    ] {
        let p = fixture(file);
        let mapping = map_event("push", &bytes(&p), &gh(&repo_of(&p))).expect(file);
        let Mapping::Job {
            kind,
            commit,
            idempotency_key,
            ..
        } = mapping
        else {
            panic!("{file}: {mapping:?}");
        };
        assert_eq!(kind, JobKind::RECONCILE, "{file}");
        assert_eq!(commit, p["after"].as_str().expect("after"), "{file}");
        assert_eq!(idempotency_key, commit_key(&repo_of(&p), &commit));
    }
}

#[test]
fn the_configured_default_branch_decides_not_the_payloads() {
    // The repository's default branch was renamed to main in the config before GitHub's payload
    // caught up (or the agent follows another branch on purpose): the config counts.
    let mut p = fixture("push/push.json");
    p["ref"] = "refs/heads/main".into();
    let mapping = map_event("push", &bytes(&p), &gh_on(&repo_of(&p), "main")).expect("push");
    let Mapping::Job { commit, params, .. } = mapping else {
        panic!("{mapping:?}");
    };
    assert_eq!(commit, p["after"].as_str().expect("after"));
    assert_eq!(params["ref"], "main");

    // A push to the payload's default branch that is not the configured one starts nothing.
    let p = fixture("push/push.json");
    match map_event("push", &bytes(&p), &gh_on(&repo_of(&p), "main")).expect("push") {
        Mapping::Ignored(reason) => {
            assert!(
                reason.contains("push to master") && reason.contains("default_branch main"),
                "names both branches: {reason}"
            );
        }
        other => panic!("{other:?}"),
    }

    // The payload's default branch is not needed at all.
    let mut p = fixture("push/push.json");
    p["repository"]
        .as_object_mut()
        .expect("repository")
        .remove("default_branch");
    assert!(matches!(
        map_event("push", &bytes(&p), &gh(&repo_of(&p))),
        Ok(Mapping::Job { .. })
    ));
}

#[test]
fn other_pushes_are_ignored_with_a_reason() {
    let cases = [
        (
            "push/github-commit-event-feature-branch.json",
            "not to the default branch",
        ),
        ("push/push_branch_create.json", "not to the default branch"),
        ("push/push_branch_delete.json", "deleted"),
        ("push/push_tag.json", "not a branch"),
        ("push/payload.json", "deleted"),
    ];
    for (file, why) in cases {
        let p = fixture(file);
        match map_event("push", &bytes(&p), &gh(&repo_of(&p))).expect(file) {
            Mapping::Ignored(reason) => assert!(reason.contains(why), "{file}: {reason}"),
            other => panic!("{file}: {other:?}"),
        }
    }
    let p = fixture("push/push.json");
    match map_event("push", &bytes(&p), &gh("someone/else")).expect("push") {
        Mapping::Ignored(reason) => assert!(reason.contains("someone/else"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn pull_requests_plan_only_and_closed_ones_start_nothing() {
    for file in [
        "pull_request/opened.payload.json",
        "pull_request/synchronize.payload.json",
    ] {
        let p = fixture(file);
        match map_event("pull_request", &bytes(&p), &gh(&repo_of(&p))).expect(file) {
            Mapping::Job { params, commit, .. } => {
                assert_eq!(params["plan_only"], true);
                assert_eq!(
                    commit,
                    p["pull_request"]["head"]["sha"].as_str().expect("sha")
                );
            }
            other => panic!("{file}: {other:?}"),
        }
    }
    let p = fixture("pull_request/closed.payload.json");
    assert!(matches!(
        map_event("pull_request", &bytes(&p), &gh(&repo_of(&p))).expect("closed"),
        Mapping::Ignored(_)
    ));
}

#[test]
fn ping_and_unmapped_events() {
    let p = fixture("ping/payload.json");
    assert_eq!(map_event("ping", &bytes(&p), &gh("a/b")), Ok(Mapping::Ping));
    let p = fixture("release/published.payload.json");
    assert!(matches!(
        map_event("release", &bytes(&p), &gh("a/b")),
        Ok(Mapping::Ignored(_))
    ));
}

#[test]
fn incomplete_payloads_are_bad_requests() {
    let e = map_event(
        "push",
        &bytes(&json!({"ref": "refs/heads/main"})),
        &gh("a/b"),
    )
    .expect_err("an error");
    assert!(e.0.contains("repository.full_name"), "{e}");
    let e = map_event("push", b"[1, 2]", &gh("a/b")).expect_err("not an object");
    assert!(
        e.0.contains("not a JSON object") || e.0.contains("malformed"),
        "{e}"
    );
    let e = map_event("release", b"[1, 2]", &gh("a/b")).expect_err("not an object");
    assert!(e.0.contains("not a JSON object"), "{e}");
    let e = map_event("release", b"{\"a\": ", &gh("a/b")).expect_err("malformed");
    assert!(e.0.contains("malformed JSON"), "{e}");
    // A field of the wrong type is named.
    let e = map_event(
        "push",
        &bytes(&json!({"ref": "refs/heads/main", "repository": {"full_name": 7}})),
        &gh("a/b"),
    )
    .expect_err("wrong type");
    assert!(e.0.contains("repository.full_name"), "{e}");
}

/// A pull request opened by `association` from `head_repo` (the base is the fixture's repo).
fn pull_request_by(association: &str, head_repo: Option<&str>) -> Value {
    let mut p = fixture("pull_request/opened.payload.json");
    p["pull_request"]["author_association"] = json!(association);
    p["pull_request"]["head"]["repo"] = match head_repo {
        Some(name) => json!({"full_name": name}),
        None => Value::Null,
    };
    p
}

#[test]
fn only_pull_requests_that_pr_plans_allows_are_planned() {
    let base = "Codertocat/Hello-World";
    let policy = |pr_plans, has_plan_env_vars| PullRequestPolicy {
        pr_plans,
        has_plan_env_vars,
    };
    let trusted = policy(PrPlans::Trusted, false);
    // (case, payload, policy, planned, why it is ignored)
    let cases = [
        (
            "an owner's own branch",
            pull_request_by("OWNER", Some(base)),
            trusted,
            true,
            "",
        ),
        (
            "a member's",
            pull_request_by("MEMBER", Some(base)),
            trusted,
            true,
            "",
        ),
        (
            "a collaborator's",
            pull_request_by("COLLABORATOR", Some(base)),
            trusted,
            true,
            "",
        ),
        (
            "a contributor's own branch",
            pull_request_by("CONTRIBUTOR", Some(base)),
            trusted,
            false,
            "CONTRIBUTOR",
        ),
        (
            "a stranger's",
            pull_request_by("NONE", Some(base)),
            trusted,
            false,
            "NONE",
        ),
        (
            "an owner's fork",
            pull_request_by("OWNER", Some("someone/Hello-World")),
            trusted,
            false,
            "fork",
        ),
        (
            "a deleted fork",
            pull_request_by("MEMBER", None),
            trusted,
            false,
            "fork",
        ),
        (
            "off",
            pull_request_by("OWNER", Some(base)),
            policy(PrPlans::Off, true),
            false,
            "off",
        ),
        (
            "all, but no plan_env_vars",
            pull_request_by("NONE", Some("someone/x")),
            policy(PrPlans::All, false),
            false,
            "plan_env_vars",
        ),
        (
            "all, but trusted without plan_env_vars",
            pull_request_by("MEMBER", Some(base)),
            policy(PrPlans::All, false),
            true,
            "",
        ),
        (
            "all, with plan_env_vars",
            pull_request_by("NONE", Some("someone/x")),
            policy(PrPlans::All, true),
            true,
            "",
        ),
    ];
    for (case, payload, policy, planned, why) in cases {
        let mapping =
            infraflux_agent::github::map_event("pull_request", &bytes(&payload), &gh(base), policy)
                .expect(case);
        match mapping {
            Mapping::Job { params, .. } if planned => {
                assert_eq!(params["plan_only"], true, "{case}");
                assert_eq!(
                    params["author_association"], payload["pull_request"]["author_association"],
                    "{case}"
                );
            }
            Mapping::Ignored(reason) if !planned => {
                assert!(reason.contains(why), "{case}: {reason}");
            }
            other => panic!("{case}: {other:?}"),
        }
    }
}

#[test]
fn pushes_are_requested_by_the_senders_login() {
    let p = fixture("push/push.json");
    let Mapping::Job { requested_by, .. } =
        map_event("push", &bytes(&p), &gh(&repo_of(&p))).expect("push")
    else {
        panic!("not a job");
    };
    assert_eq!(requested_by, p["sender"]["login"].as_str().expect("login"));
}

fn comment_on_pull_request(body: &str) -> Value {
    let mut p = fixture("issue_comment/pull-request-issue-comment.json");
    p["comment"]["body"] = json!(body);
    p
}

/// A commit comment as GitHub documents it, around the fixture's repository and sender.
fn comment_on_commit(body: &str, sha: &str) -> Value {
    let p = fixture("issue_comment/pull-request-issue-comment.json");
    json!({
        "action": "created",
        "comment": {"id": 991, "body": body, "commit_id": sha, "user": p["sender"].clone()},
        "repository": p["repository"].clone(),
        "sender": p["sender"].clone(),
    })
}

#[test]
fn infraflux_comments_are_commands_and_other_comments_start_nothing() {
    let repo = "chhsia0/knative-route-demo";
    let id = "01jdzxk5w4v1q6v1c5m2r8g4bn";
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let command = |event: &str, p: &Value| match map_event(event, &bytes(p), &gh(repo)) {
        Ok(Mapping::Command(c)) => c,
        other => panic!("{event}: {other:?}"),
    };
    let fixture_comment = fixture("issue_comment/pull-request-issue-comment.json");
    let number = fixture_comment["issue"]["number"].as_u64().expect("number");
    let comment_id = fixture_comment["comment"]["id"].as_u64().expect("id");
    assert_eq!(
        command(
            "issue_comment",
            &comment_on_pull_request("/infraflux apply")
        ),
        CommentCommand {
            login: "chhsia0".into(),
            on: CommentedOn::PullRequest(number),
            comment_id,
            plan_job: None,
            problem: None,
        }
    );
    let c = command(
        "issue_comment",
        &comment_on_pull_request(&format!("\n  /infraflux apply {id}\nlooks good")),
    );
    assert_eq!(c.plan_job.as_deref(), Some(id));
    let c = command(
        "commit_comment",
        &comment_on_commit(&format!("/infraflux apply {id}"), sha),
    );
    assert_eq!((c.on, c.comment_id), (CommentedOn::Commit(sha.into()), 991));
    // Unreadable commands are answered, not ignored.
    let c = command(
        "issue_comment",
        &comment_on_pull_request("/infraflux apply ../etc"),
    );
    assert!(c.problem.expect("problem").contains("job id"));
    let c = command(
        "issue_comment",
        &comment_on_pull_request("/infraflux destroy"),
    );
    assert!(
        c.problem
            .expect("problem")
            .contains("/infraflux apply <job-id>")
    );

    // What starts nothing.
    let ignored = |event: &str, p: &Value| match map_event(event, &bytes(p), &gh(repo)) {
        Ok(Mapping::Ignored(reason)) => reason,
        other => panic!("{event}: {other:?}"),
    };
    assert!(ignored("issue_comment", &fixture_comment).contains("not a /infraflux command"));
    assert!(
        ignored(
            "issue_comment",
            &comment_on_pull_request("please /infraflux apply")
        )
        .contains("not a")
    );
    let mut edited = comment_on_pull_request("/infraflux apply");
    edited["action"] = json!("edited");
    assert!(ignored("issue_comment", &edited).contains("edited"));
    let mut on_issue = fixture("issue_comment/created.payload.json");
    on_issue["comment"]["body"] = json!("/infraflux apply");
    let issue_repo = repo_of(&on_issue);
    match map_event("issue_comment", &bytes(&on_issue), &gh(&issue_repo)) {
        Ok(Mapping::Ignored(reason)) => {
            assert!(reason.contains("not on a pull request"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let other_repo = comment_on_pull_request("/infraflux apply");
    match map_event("issue_comment", &bytes(&other_repo), &gh("someone/else")) {
        Ok(Mapping::Ignored(reason)) => assert!(reason.contains("not the configured"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let e = map_event(
        "commit_comment",
        &bytes(&comment_on_commit("/infraflux apply", "HEAD")),
        &gh(repo),
    )
    .expect_err("not a sha");
    assert!(e.0.contains("commit_id"), "{e}");
}
