//! What the webhook and map_event targets share: the `[github]` section an input selects, and
//! the invariants of a mapped event.

use infraflux_agent::config::GithubSection;
use infraflux_agent::github::{
    self, BadPayload, CommentedOn, Mapping, PullRequestPolicy, commit_key,
};
use infraflux_handlers::JobKind;
use infraflux_handlers::reconcile::PrPlans;
use infraflux_handlers::secret::SecretRefs;
use serde_json::Value;

/// The repository the fuzzed payloads are compared with when they name none.
pub const DEFAULT_REPO: &str = "Codertocat/Hello-World";

/// The `[github]` section and the pull request policy that the bits of `flags` choose. The
/// configured repository is the payload's own when bit 0 is set, so that mutated payloads get
/// past the repository check, and the branch is `master` (the fixtures') or `main`.
pub fn settings(flags: u8, body: &[u8]) -> (GithubSection, PullRequestPolicy) {
    let payload_repo = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        v.pointer("/repository/full_name")
            .and_then(Value::as_str)
            .map(str::to_string)
    });
    let repo = match payload_repo {
        Some(repo) if flags & 1 == 1 => repo,
        _ => DEFAULT_REPO.to_string(),
    };
    let github = GithubSection {
        repo,
        default_branch: if flags & 16 == 0 { "master" } else { "main" }.into(),
        api_url: "https://api.github.com".into(),
        token: None,
        webhook_secret: SecretRefs(vec![]),
        webhook_id: None,
        redeliver: false,
    };
    let policy = PullRequestPolicy {
        pr_plans: match (flags >> 1) & 3 {
            0 => PrPlans::Off,
            2 => PrPlans::All,
            _ => PrPlans::Trusted,
        },
        has_plan_env_vars: flags & 8 != 0,
    };
    (github, policy)
}

fn is_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
}

/// Maps `event` and checks what the mapping promises; panics (a crash for libFuzzer) when a
/// promise is broken.
pub fn map_and_check(
    event: &str,
    body: &[u8],
    github: &GithubSection,
    policy: PullRequestPolicy,
) -> Result<Mapping, BadPayload> {
    let result = github::map_event(event, body, github, policy);
    assert_eq!(
        result,
        github::map_event(event, body, github, policy),
        "mapping is not deterministic"
    );
    let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let value = serde_json::from_slice::<Value>(body).ok();
    match &result {
        Err(BadPayload(message)) => assert!(!message.is_empty(), "an error without a message"),
        Ok(mapping) => {
            assert!(
                object,
                "a body that is no JSON object was mapped: {mapping:?}"
            );
            assert!(
                serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok(),
                "malformed JSON was mapped: {mapping:?}"
            );
            check_mapping(event, github, mapping);
            // Another repository's events start nothing and approve nothing.
            if matches!(mapping, Mapping::Job { .. } | Mapping::Command(_))
                && let Some(value) = &value
            {
                let repo = value
                    .pointer("/repository/full_name")
                    .and_then(Value::as_str);
                assert!(
                    repo.is_some_and(|r| r.eq_ignore_ascii_case(&github.repo)),
                    "{mapping:?} from repository {repo:?}, not {}",
                    github.repo
                );
            }
            // Only what the JSON says counts, not how it is written: the same value written
            // again by serde_json maps the same.
            if let Some(value) = &value {
                let rewritten = serde_json::to_vec(value).expect("a JSON value serializes");
                assert_eq!(
                    github::map_event(event, &rewritten, github, policy).as_ref(),
                    Ok(mapping),
                    "the same JSON written differently maps differently"
                );
            }
        }
    }
    // Events that start nothing need nothing from the payload but that it is an object.
    let wanted = matches!(
        event,
        "push" | "pull_request" | "commit_comment" | "issue_comment"
    );
    if !wanted && value.as_ref().is_some_and(Value::is_object) {
        match (&result, event) {
            (Ok(Mapping::Ping), "ping") | (Ok(Mapping::Ignored(_)), _) => {}
            (other, _) => panic!("{event} with an object payload mapped to {other:?}"),
        }
    }
    result
}

fn check_mapping(event: &str, github: &GithubSection, mapping: &Mapping) {
    match mapping {
        Mapping::Ping => assert_eq!(event, "ping"),
        Mapping::Ignored(reason) => assert!(!reason.is_empty(), "ignored without a reason"),
        Mapping::Job {
            kind,
            params,
            commit,
            idempotency_key,
            requested_by,
        } => {
            assert!(
                event == "push" || event == "pull_request",
                "{event} started a job"
            );
            assert_eq!(*kind, JobKind::RECONCILE);
            assert!(
                is_sha(commit),
                "job on {commit:?}, which is not a commit sha"
            );
            assert_eq!(params.get("trigger").and_then(Value::as_str), Some(event));
            assert!(!requested_by.is_empty(), "a job requested by nobody");
            if event == "push" {
                assert_eq!(*idempotency_key, commit_key(&github.repo, commit));
                let branch = params.get("ref").and_then(Value::as_str);
                assert_eq!(branch, Some(github.default_branch.as_str()));
            } else {
                assert_eq!(params.get("plan_only"), Some(&Value::Bool(true)));
                assert!(idempotency_key.starts_with("pr."), "{idempotency_key}");
                assert!(
                    idempotency_key.ends_with(commit.as_str()),
                    "{idempotency_key}"
                );
            }
        }
        Mapping::Command(command) => {
            assert!(
                event == "commit_comment" || event == "issue_comment",
                "{event} made a comment command"
            );
            assert!(!command.login.is_empty(), "a command by nobody");
            match &command.on {
                CommentedOn::Commit(sha) => {
                    assert_eq!(event, "commit_comment");
                    assert!(is_sha(sha) && *sha == sha.to_ascii_lowercase(), "{sha:?}");
                }
                CommentedOn::PullRequest(_) => assert_eq!(event, "issue_comment"),
            }
            if let Some(job) = &command.plan_job {
                assert!(
                    infraflux_handlers::command::validate_job_id(job).is_ok(),
                    "approves {job:?}, which is not a job id"
                );
                assert!(command.problem.is_none(), "a plan job and a problem");
            }
        }
    }
}
