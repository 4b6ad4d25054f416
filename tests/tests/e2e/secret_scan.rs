//! The secret scan end to end: a committed credential fails the plan before terraform runs,
//! names where it is and never what it is; an allowlist entry with a reason lets it plan.

use infraflux_tests::EventLog;

use crate::reconcile::{LabOptions, lab};

const KEY_PATH: &str = "keys/id_ed25519";

/// The first line of the key's body: what must appear nowhere the job reports to.
const KEY_BODY: &str = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW";

/// A well-formed but fake OpenSSH private key, assembled here so this file does not hold one.
fn private_key() -> String {
    let kind = "OPENSSH PRIVATE KEY";
    format!(
        "-----BEGIN {kind}-----\n{KEY_BODY}\nQyNTUxOQAAACDfakefakefakefakefakefakefakefakefakefakeQ==\n-----END {kind}-----\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_private_key_fails_the_plan_before_terraform_until_it_is_allowlisted() {
    let lab = lab(LabOptions::default()).await;
    let events = EventLog::subscribe(&lab.client).await;
    lab.repo.write(KEY_PATH, &private_key());
    let with_key = lab.repo.commit("Add the deploy key");
    let job = lab.push(&with_key, "alice").await;
    let failed = lab.settled(&job).await;
    assert_eq!(failed["state"], "failed", "{failed}");
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(&format!(
            "secret scan: 1 finding: {KEY_PATH}:1 private-key."
        )),
        "{message}"
    );
    assert!(message.contains("rotate"), "{message}");

    // Scanned, then failed: terraform never ran.
    let progress: Vec<String> = events.of(&job).into_iter().map(|e| e.message).collect();
    assert!(
        progress
            .iter()
            .any(|m| m == "scanning for committed credentials"),
        "{progress:?}"
    );
    assert!(
        !progress.iter().any(|m| m.contains("terraform")),
        "{progress:?}"
    );

    let statuses = lab.gh.statuses(&with_key);
    let last = statuses.last().expect("a status");
    assert_eq!(last["context"], "infraflux/reconcile");
    assert_eq!(last["state"], "failure", "{last}");
    let description = last["description"].as_str().unwrap_or_default();
    assert!(
        description.starts_with(&format!("secret scan: 1 finding: {KEY_PATH}:1 private-key")),
        "{description}"
    );

    let everything = format!(
        "{failed}\n{progress:?}\n{}",
        serde_json::Value::from(statuses)
    );
    assert!(!everything.contains(&KEY_BODY[..16]), "{everything}");

    lab.repo.write(
        ".infraflux/secret-scan-allowlist.toml",
        &format!(
            "[[allow]]\npath = \"{KEY_PATH}\"\nrule = \"private-key\"\nreason = \"a throwaway key for the lab, never installed anywhere\"\n"
        ),
    );
    let allowed = lab.repo.commit("Allowlist the lab's throwaway key");
    let job = lab.push(&allowed, "alice").await;
    let planned = lab.settled(&job).await;
    assert_eq!(planned["state"], "awaiting_approval", "{planned}");
    assert_eq!(
        planned["result"]["summary_headline"],
        "1 to add, 0 to change, 0 to destroy"
    );
    let progress: Vec<String> = events.of(&job).into_iter().map(|e| e.message).collect();
    assert!(
        progress.iter().any(|m| m.contains("(1 allowlisted)")),
        "{progress:?}"
    );
    assert!(
        progress.iter().any(|m| m == "terraform init"),
        "{progress:?}"
    );
    lab.agent.stop().await;
    drop(lab.nats);
}
