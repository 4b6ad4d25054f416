//! The binary's subcommands and exit codes, as operators and workflows use them.

use std::process::{Command, Output};
use std::time::Duration;

use infraflux_handlers::JobKind;
use infraflux_tests::handlers::{Behaviour, RunLog, TestHandler};
use infraflux_tests::*;
use serde_json::Value;

fn bin(args: &[&str]) -> Output {
    Command::new(crate::test_agent_bin())
        .args(args)
        .env_remove("INFRAFLUX_NATS__URL")
        .output()
        .expect("run the binary")
}

async fn bin_async(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        bin(&args)
    })
    .await
    .expect("blocking")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn version_names_the_commit() {
    let out = bin(&["--version"]);
    assert!(out.status.success());
    let v = text(&out.stdout);
    assert!(v.starts_with("infraflux-agent 0."), "{v}");
    assert!(v.contains("(git "), "{v}");
}

#[test]
fn check_config_reports_every_problem_and_never_a_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[agent]
concurrency = 0
[nats]
url = "http://nope"
[github]
repo = "owner/infra"
webhook_secret = ["env:MISSING_SECRET_VAR", "hunter2-literal"]
[[schedules]]
name = "nightly"
cron = "0 3 * * *"
command = "backup"
[surprise]
"#,
    )
    .expect("write");
    let out = bin(&["check-config", "--config", bad.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    for key in [
        "agent.concurrency",
        "nats.url",
        "schedules[0].cron",
        "schedules[0].command",
        "surprise",
    ] {
        assert!(err.contains(key), "{key} not reported:\n{err}");
    }
    // Secret references are checked in the same run, in the sections that could be read.
    assert!(
        err.contains("github.webhook_secret.0: environment variable MISSING_SECRET_VAR is not set"),
        "{err}"
    );
    assert!(!err.contains("hunter2-literal"));

    // Valid shape, but a secret reference that does not resolve.
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[github]\nrepo = \"owner/infra\"\nwebhook_secret = [\"env:MISSING_SECRET_VAR\", \"hunter2-literal\"]\n",
    )
    .expect("write");
    let out = bin(&["check-config", "--config", good.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("github.webhook_secret.0: environment variable MISSING_SECRET_VAR is not set"),
        "{err}"
    );
    assert!(
        err.contains("warning: github.webhook_secret.1: holds a literal secret"),
        "{err}"
    );
    assert!(!err.contains("hunter2-literal"), "{err}");
    let out = Command::new(crate::test_agent_bin())
        .args(["check-config", "--config", good.to_str().expect("path")])
        .env("MISSING_SECRET_VAR", "resolved-value-xyz")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(all.contains("valid"), "{all}");
    assert!(!all.contains("resolved-value-xyz"));
}

/// Runs the binary with its output in files; a daemon that did not refuse its config is
/// killed after a while (it would wait for NATS forever), and fails the test.
fn run_to_exit(mut command: Command, dir: &std::path::Path) -> (Option<i32>, String) {
    let stderr = dir.join("stderr");
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("run the binary");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&stderr).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("still running after 60s:\n{err}"));
    (status.code(), err)
}

#[test]
fn check_config_and_run_name_shape_section_client_and_secret_problems_in_one_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, "users: [\n  token: t0ken-never-shown\n").expect("kubeconfig");
    let missing_talosconfig = dir.path().join("no-such-talosconfig");
    let empty_secret_file = dir.path().join("empty-secret");
    std::fs::write(&empty_secret_file, "\n").expect("secret file");
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[agent]
concurrency = 0
[github]
repo = "owner/infra"
webhook_secret = ["env:IFX_EMPTY_WEBHOOK_SECRET", "file:{empty}", ""]
[kubernetes]
kubeconfig = "{kubeconfig}"
[talos]
talosconfig = "{talosconfig}"
cluster = "lab"
[etcd_snapshot]
bucket = "snapshots"
[backup]
"#,
            empty = empty_secret_file.display(),
            kubeconfig = kubeconfig.display(),
            talosconfig = missing_talosconfig.display(),
        ),
    )
    .expect("config");
    for subcommand in ["check-config", "run"] {
        let mut command = Command::new(crate::test_agent_bin());
        command
            .args([subcommand, "--config", path.to_str().expect("path")])
            .env_remove("INFRAFLUX_NATS__URL")
            .env("IFX_EMPTY_WEBHOOK_SECRET", "");
        let (code, err) = run_to_exit(command, dir.path());
        assert_eq!(code, Some(2), "{subcommand}:\n{err}");
        for expected in [
            "agent.concurrency: must be at least 1".to_string(),
            format!(
                "talos.talosconfig: cannot read {}",
                missing_talosconfig.display()
            ),
            format!(
                "kubernetes.kubeconfig: cannot read {}",
                kubeconfig.display()
            ),
            "etcd_snapshot: needs the [s3] section".to_string(),
            "github.webhook_secret.0: environment variable IFX_EMPTY_WEBHOOK_SECRET is empty"
                .to_string(),
            format!(
                "github.webhook_secret.1: {} is empty",
                empty_secret_file.display()
            ),
            "github.webhook_secret.2: is empty".to_string(),
        ] {
            assert!(
                err.contains(&expected),
                "{subcommand}: {expected:?} not reported:\n{err}"
            );
        }
        assert!(!err.contains("t0ken-never-shown"), "{subcommand}:\n{err}");
        // [talos] is present, only unreadable: its absence is not reported as well.
        assert!(!err.contains("needs the [talos]"), "{subcommand}:\n{err}");
        assert!(!err.contains("backup: needs"), "{subcommand}:\n{err}");
    }

    // A talosconfig that is there but not one, and a requirement left unmet.
    std::fs::write(&missing_talosconfig, "context: lab\ncontexts: []\n").expect("talosconfig");
    std::fs::write(
        &path,
        format!(
            "[talos]\ntalosconfig = \"{}\"\ncluster = \"lab\"\n[backup]\n",
            missing_talosconfig.display()
        ),
    )
    .expect("config");
    let out = bin(&["check-config", "--config", path.to_str().expect("path")]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "talos.talosconfig: {}: not a talosconfig: line 2",
            missing_talosconfig.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("backup: needs the [kubernetes] section"),
        "{err}"
    );
}

#[test]
fn schedules_prints_fire_times_in_their_zone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.toml");
    std::fs::write(
        &path,
        r#"
[backup]
[[schedules]]
name = "nightly-velero"
cron = "0 0 3 * * *"
timezone = "Europe/Berlin"
command = "backup ns=media,home"
"#,
    )
    .expect("write");
    let out = bin(&[
        "schedules",
        "--config",
        path.to_str().expect("path"),
        "--next",
        "3",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("nightly-velero"), "{s}");
    let fires: Vec<&str> = s.lines().filter(|l| l.contains("03:00:00")).collect();
    assert_eq!(fires.len(), 3, "{s}");
    assert!(
        fires
            .iter()
            .all(|l| l.contains("Europe/Berlin") && (l.contains("+01:00") || l.contains("+02:00"))),
        "{s}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_exit_codes_and_github_event_forwarding() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let l = log.clone();
    // No agent yet: no reply.
    let out = bin_async(vec![
        "ctl".into(),
        "--nats".into(),
        nats.url.clone(),
        "--timeout".into(),
        "1s".into(),
        "status".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));

    let agent = start_agent(
        &nats,
        "ctl-1",
        "[acceptance]\n",
        TestHandler::new(
            JobKind::ACCEPTANCE,
            Behaviour::Sleep(Duration::from_millis(300)),
            l,
        )
        .install(),
    )
    .await;
    let ctl = |words: &[&str]| {
        let mut args = vec!["ctl".to_string(), "--nats".to_string(), nats.url.clone()];
        args.extend(words.iter().map(|w| w.to_string()));
        bin_async(args)
    };
    let out = ctl(&["status"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("agents alive: 1"));

    let out = ctl(&["backup", "ns=Bad"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("\"Bad\""),
        "{}",
        text(&out.stderr)
    );

    let out = ctl(&["--wait", "acceptance"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let printed = text(&out.stdout);
    assert!(
        printed.contains("queued") && printed.contains("succeeded"),
        "{printed}"
    );

    // A job that ends cancelled makes --wait exit 1.
    let client = nats.client().await;
    let waiter = tokio::spawn(ctl(&["--wait", "--json", "acceptance"]));
    let job_id = wait_for(Duration::from_secs(10), "the job to start", || async {
        let jobs = command(&client, "jobs state=running").await;
        jobs["jobs"][0]["job_id"].as_str().map(str::to_string)
    })
    .await;
    command(&client, &format!("cancel {job_id}")).await;
    let out = waiter.await.expect("waiter");
    // Either the job was cancelled mid-run (exit 1) or it finished first (exit 0); with a
    // 300 ms job and an immediate cancel, cancellation is what happens.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let last: Value = serde_json::from_str(text(&out.stdout).lines().last().expect("events"))
        .expect("json event");
    assert_eq!(last["state"], "cancelled");

    let out = ctl(&["--json", "jobs"]).await;
    let jobs: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(jobs["ok"], true);
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(2));
    let out = ctl(&["--json", "job", &job_id]).await;
    let record: Value = serde_json::from_slice(&out.stdout).expect("json record");
    assert_eq!(record["job_id"], job_id.as_str());
    assert_eq!(record["state"], "cancelled");

    // The workflow step: forward $GITHUB_EVENT_PATH.
    let event = infraflux_tests::fixtures_dir().join("github/push/push.json");
    let event = event.to_str().expect("path");
    let out = ctl(&["github-event", "push", event, "run-1"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let first: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(first["jobs"][0].is_string(), "{first}");
    let out = ctl(&["github-event", "push", event, "run-2"]).await;
    let second: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(second["duplicate"], true, "{second}");
    assert_eq!(second["job"], first["jobs"][0]);
    agent.stop().await;
}

#[test]
fn the_shipped_example_config_passes_check_config_once_its_secrets_exist() {
    let dir = tempfile::tempdir().expect("tempdir");
    let credentials = dir.path().join("credentials");
    std::fs::create_dir_all(&credentials).expect("mkdir");
    for name in [
        "github-token",
        "github-webhook-secret",
        "nats-agent-password",
        "etcd-age-identity",
    ] {
        std::fs::write(credentials.join(name), format!("value-of-{name}\n")).expect("credential");
    }
    // The 1Password CLI as systemd would find it; it answers every reference of the example.
    let op = dir.path().join("op");
    std::fs::write(
        &op,
        "#!/bin/sh\n[ \"$1\" = read ] && printf 'from-1password' && exit 0\nexit 1\n",
    )
    .expect("op");
    std::process::Command::new("chmod")
        .args(["+x", &op.display().to_string()])
        .status()
        .expect("chmod");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://10.0.0.10:6443\ncontexts:\n- name: admin@infraflux\n  context:\n    cluster: lab\n    user: admin\ncurrent-context: admin@infraflux\nusers:\n- name: admin\n  user:\n    token: t\n",
    )
    .expect("kubeconfig");
    // A talosconfig with the example's context; check-config parses it and never connects.
    let talosconfig = dir.path().join("talosconfig");
    std::fs::write(
        &talosconfig,
        "context: infraflux\ncontexts:\n  infraflux:\n    endpoints: [10.0.0.11]\n    ca: dGVzdA==\n    crt: dGVzdA==\n    key: dGVzdA==\n",
    )
    .expect("talosconfig");
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
    let out = Command::new(crate::test_agent_bin())
        .args(["check-config", "--config", example.to_str().expect("path")])
        .env("CREDENTIALS_DIRECTORY", &credentials)
        .env("ONEPASSWORD_CLI", &op)
        .env("INFRAFLUX_KUBERNETES__KUBECONFIG", &kubeconfig)
        .env("INFRAFLUX_TALOS__TALOSCONFIG", &talosconfig)
        .output()
        .expect("run");
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        all.contains("valid; agent runner-1, 6 schedule(s)"),
        "{all}"
    );
    for secret in ["value-of-github-token", "from-1password"] {
        assert!(!all.contains(secret), "{all}");
    }
}
