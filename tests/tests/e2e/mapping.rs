//! The mapping of GitHub events to jobs, against GitHub's own payloads.

use infraflux_agent::config::GithubSection;
use infraflux_agent::github::{Mapping, commit_key, map_event};
use infraflux_handlers::JobKind;
use serde_json::{Value, json};

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
