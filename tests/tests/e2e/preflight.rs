//! `infraflux-agent preflight --config FILE`: the checks against a fake Proxmox API over HTTPS
//! with its own CA, a real S3 server, the fake GitHub API with classic and fine-grained tokens,
//! the fake Talos API, the fake Kubernetes API and a fake 1Password CLI, each shown passing and
//! failing with its fix; secret canaries never printed; exit 0, 1 and 2.

use std::path::{Path, PathBuf};
use std::process::Command;

use infraflux_tests::fakes::{FakeGithub, FakeKube, FakeToken};
use infraflux_tests::kube_fake::FAKE_KUBE_VERSION;
use infraflux_tests::peers::S3Server;
use infraflux_tests::proxmox_fake::FakeProxmox;
use infraflux_tests::talos_fake::{FAKE_NODE, FakeTalos, SnapshotSource};

const TOKEN_ID: &str = "terraform@pve!infraflux";
/// The token's secret: it must appear in no output.
const CANARY: &str = "pve-canary-5b0e1c2d-9f4a-4e7b-a3c1";
const ALL_PRIVILEGES: &[&str] = &[
    "Datastore.AllocateSpace",
    "Datastore.Audit",
    "SDN.Use",
    "Sys.Audit",
    "VM.Allocate",
    "VM.Audit",
    "VM.Clone",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Cloudinit",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.PowerMgmt",
];

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn line(&self, prefix: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?}:\n{}", self.stdout))
    }
}

/// Runs the binary's preflight with `config`, the token secret in `IFX_PVE_SECRET`.
async fn preflight(dir: &Path, config: &str, secret: &str) -> Run {
    preflight_with(
        dir,
        config,
        Launch {
            vars: vec![("IFX_PVE_SECRET", secret.to_string())],
            ..Launch::default()
        },
    )
    .await
}

/// The preflight process's surroundings besides its config.
#[derive(Default)]
struct Launch {
    /// Environment variables to set.
    vars: Vec<(&'static str, String)>,
    /// A directory put first on the PATH (where a fake `op` waits).
    path_first: Option<PathBuf>,
    /// Values that must appear in no output, besides [`CANARY`].
    never_printed: Vec<String>,
}

/// Runs the binary's preflight with `config` as `launch` says.
async fn preflight_with(dir: &Path, config: &str, launch: Launch) -> Run {
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).expect("config");
    let mut command = Command::new(crate::test_agent_bin());
    command
        .args(["preflight", "--config", path.to_str().expect("path")])
        .env_remove("INFRAFLUX_NATS__URL")
        .env("IFX_S3_KEY", "preflight-access-key")
        .env("IFX_S3_SECRET", "preflight-secret-key")
        .env_remove("IFX_MISSING_HEADER")
        .env_remove("ONEPASSWORD_CLI")
        .envs(launch.vars.iter().map(|(k, v)| (k, v)));
    if let Some(first) = &launch.path_first {
        let rest = std::env::var_os("PATH").unwrap_or_default();
        let joined = std::env::join_paths(
            std::iter::once(first.clone()).chain(std::env::split_paths(&rest)),
        )
        .expect("PATH");
        command.env("PATH", joined);
    }
    let mut never_printed = launch.never_printed;
    never_printed.push(CANARY.to_string());
    tokio::task::spawn_blocking(move || {
        let out = command.output().expect("run the binary");
        let run = Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        for text in [&run.stdout, &run.stderr] {
            for secret in &never_printed {
                assert!(!text.contains(secret.as_str()), "a secret leaked:\n{text}");
            }
        }
        run
    })
    .await
    .expect("blocking")
}

fn config(proxmox: &FakeProxmox, ca: Option<&Path>, s3: &str, extra: &str) -> String {
    let ca = ca
        .map(|p| format!("ca_cert = \"{}\"\n", p.display()))
        .unwrap_or_default();
    format!(
        r#"
[proxmox]
api_url = "{api}"
token_id = "{TOKEN_ID}"
token_secret = "env:IFX_PVE_SECRET"
{ca}
[s3]
endpoint = "{s3}"
access_key_id = "env:IFX_S3_KEY"
secret_access_key = "env:IFX_S3_SECRET"

[preflight]
state_bucket = "tfstate"
{extra}
"#,
        api = proxmox.api_url,
    )
}

#[tokio::test]
async fn preflight_passes_against_proxmox_and_s3_and_never_prints_the_token() {
    infraflux_tests::init();
    let dir = tempfile::tempdir().expect("tempdir");
    let proxmox = FakeProxmox::start(TOKEN_ID, CANARY, ALL_PRIVILEGES);
    let ca = dir.path().join("pve-root-ca.pem");
    std::fs::write(&ca, &proxmox.ca_pem).expect("ca");
    let s3 = S3Server::start("tfstate").await;
    let run = preflight(
        dir.path(),
        &config(&proxmox, Some(&ca), &s3.endpoint, ""),
        CANARY,
    )
    .await;
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(run.line("PASS secrets:").contains("3/3"), "{}", run.stdout);
    assert!(
        run.line("PASS proxmox.api:").contains("Proxmox VE 8.3.0"),
        "{}",
        run.stdout
    );
    assert!(
        run.line("PASS proxmox.permissions:")
            .contains(&format!("{} required privileges", ALL_PRIVILEGES.len())),
        "{}",
        run.stdout
    );
    assert!(
        run.line("PASS s3.endpoint:").contains("plain http"),
        "{}",
        run.stdout
    );
    assert!(
        run.line("PASS s3.bucket.tfstate:")
            .contains("written and deleted")
    );
    assert!(run.line("PASS s3.lockfile:").contains("use_lockfile locks"));
    assert_eq!(
        run.line("SKIP nats:"),
        "SKIP nats: the command line does not use NATS"
    );
    run.line("SKIP github.token:");
    run.line("SKIP talos.api:");
    run.line("SKIP kubernetes.api:");
    assert!(
        run.stdout
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("preflight: 6/6 passed, 4 skipped")),
        "{}",
        run.stdout
    );
    // Probe objects are gone; every request carried the token.
    assert!(s3.keys("tfstate").await.is_empty(), "probe objects left");
    let requests = proxmox.requests();
    assert!(
        requests.iter().all(|(_, accepted)| *accepted),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|(path, _)| path == "/api2/json/access/permissions")
    );
}

#[tokio::test]
async fn preflight_names_each_failure_with_the_object_and_the_fix() {
    infraflux_tests::init();
    let dir = tempfile::tempdir().expect("tempdir");
    let proxmox = FakeProxmox::start(TOKEN_ID, CANARY, ALL_PRIVILEGES);
    let ca = dir.path().join("pve-root-ca.pem");
    std::fs::write(&ca, &proxmox.ca_pem).expect("ca");
    let s3 = S3Server::start("tfstate").await;

    // A wrong token, a bucket that does not exist, a reference that does not resolve.
    let extra = "buckets = [\"velero\"]\n[telemetry]\notlp_headers = { x-api-key = \"env:IFX_MISSING_HEADER\" }\n";
    let wrong = "pve-wrong-secret-0000-1111";
    let run = preflight(
        dir.path(),
        &config(&proxmox, Some(&ca), &s3.endpoint, extra),
        wrong,
    )
    .await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert!(!run.stdout.contains(wrong), "{}", run.stdout);
    let api = run.line("FAIL proxmox.api:");
    assert!(
        api.contains(&format!("refused the API token {TOKEN_ID}"))
            && api.contains("(fix: check proxmox.token_id")
            && api.contains("env:IFX_PVE_SECRET"),
        "{api}"
    );
    run.line("SKIP proxmox.permissions: proxmox.api failed");
    let bucket = run.line("FAIL s3.bucket.velero:");
    assert!(
        bucket.contains("bucket velero (preflight.buckets[0]) does not exist")
            && bucket.contains("mc mb"),
        "{bucket}"
    );
    run.line("PASS s3.bucket.tfstate:");
    let secrets = run.line("FAIL secrets:");
    assert!(
        secrets.contains("1 of 4 secret references do not resolve: telemetry.otlp_headers.x-api-key (environment variable IFX_MISSING_HEADER is not set)"),
        "{secrets}"
    );
    assert!(
        run.stdout
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("preflight: ")
                && l.contains("failed: ")
                && l.contains("does not exist")),
        "{}",
        run.stdout
    );

    // The right token without two privileges: both named, with where they are needed.
    let mut some = ALL_PRIVILEGES.to_vec();
    some.retain(|p| *p != "Datastore.Audit" && *p != "VM.PowerMgmt");
    proxmox.set_privileges("/", &some);
    let run = preflight(
        dir.path(),
        &config(&proxmox, Some(&ca), &s3.endpoint, ""),
        CANARY,
    )
    .await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    run.line("PASS proxmox.api:");
    let permissions = run.line("FAIL proxmox.permissions:");
    assert!(
        permissions.contains(
            "lacks 2 of 16 required privileges: Datastore.Audit on /storage, VM.PowerMgmt on /vms"
        ) && permissions.contains(
            "pveum role modify InfrafluxTerraform -privs \"Datastore.Audit,VM.PowerMgmt\""
        ),
        "{permissions}"
    );

    // Without Proxmox's CA the self-signed certificate is refused, and the fix says so.
    let run = preflight(
        dir.path(),
        &config(&proxmox, None, &s3.endpoint, ""),
        CANARY,
    )
    .await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    let api = run.line("FAIL proxmox.api:");
    assert!(
        api.contains("cannot reach Proxmox") && api.contains("set proxmox.ca_cert"),
        "{api}"
    );
}

#[tokio::test]
async fn preflight_refuses_an_invalid_config_with_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = preflight(
        dir.path(),
        "[proxmox]\napi_url = \"https://pve:8006\"\ntoken_secret = \"env:IFX_PVE_SECRET\"\n[preflight]\ncheck_timeout = \"soon\"\n",
        CANARY,
    )
    .await;
    assert_eq!(run.code, Some(2), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr
            .contains("proxmox: missing configuration field \"token_id\""),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("preflight.check_timeout"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty(), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_preflight_job_checks_nats_and_fails_when_a_check_fails() {
    use infraflux_tests::{Nats, start_agent_with_env, submit, wait_settled};
    infraflux_tests::init();
    let nats = Nats::start();
    // Everything but Datastore.AllocateSpace.
    let proxmox = FakeProxmox::start(TOKEN_ID, CANARY, &ALL_PRIVILEGES[1..]);
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("pve-root-ca.pem");
    std::fs::write(&ca, &proxmox.ca_pem).expect("ca");
    let extra = format!(
        "[proxmox]\napi_url = \"{}\"\ntoken_id = \"{TOKEN_ID}\"\ntoken_secret = \"env:IFX_PVE_SECRET\"\nca_cert = \"{}\"\n[preflight]\n",
        proxmox.api_url,
        ca.display()
    );
    let _agent = start_agent_with_env(
        &nats,
        "preflight",
        &extra,
        &[("IFX_PVE_SECRET", CANARY)],
        |_| {},
    )
    .await;
    let client = nats.client().await;
    let job = submit(&client, "preflight").await;
    let record = wait_settled(&client, &job, std::time::Duration::from_secs(60)).await;
    assert!(!record.to_string().contains(CANARY), "{record}");
    assert_eq!(record["state"], "failed", "{record}");
    let checks = record["result"]["checks"].as_array().expect("checks");
    let check = |name: &str| {
        checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {record}"))
    };
    assert_eq!(check("nats")["ok"], true, "{record}");
    assert!(
        check("nats")["message"]
            .as_str()
            .is_some_and(|m| m.contains("JetStream answer")),
        "{record}"
    );
    assert_eq!(check("proxmox.api")["ok"], true, "{record}");
    let permissions = check("proxmox.permissions");
    assert_eq!(permissions["ok"], false);
    assert!(
        permissions["message"]
            .as_str()
            .is_some_and(|m| m.contains("Datastore.AllocateSpace on /storage")),
        "{record}"
    );
    assert_eq!(record["result"]["failed"], 1, "{record}");
    assert!(
        record["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("preflight: ") && m.contains("lacks 1 of 16")),
        "{record}"
    );
}

/// A classic token with `repo`, as 1Password holds it: printed nowhere.
const CLASSIC_TOKEN: &str = "ghp_opCanary0Classic1Token2Repo3Scope4x";
/// The webhook secret: printed nowhere.
const WEBHOOK_CANARY: &str = "webhook-canary-7d1e0f3a-2b4c";
const REPO: &str = "lab/infra";

/// A stand-in for the 1Password CLI in `dir/bin/op`: `op read --no-newline op://infra/github/token`
/// prints [`CLASSIC_TOKEN`] (no newline, as asked); any other reference is an item the vault
/// lacks, reported as op reports it. Returns the directory to put first on the PATH.
fn fake_op(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let op = bin.join("op");
    std::fs::write(
        &op,
        format!(
            r#"#!/bin/sh
if [ "$1" != read ] || [ "$2" != --no-newline ]; then
  echo "[ERROR] 2026/12/01 12:00:00 unknown command \"$1\" for \"op\"" >&2
  exit 1
fi
case "$3" in
  op://infra/github/token) printf '%s' '{CLASSIC_TOKEN}'; exit 0 ;;
esac
vault=$(echo "$3" | cut -d/ -f3)
item=$(echo "$3" | cut -d/ -f4)
echo "[ERROR] 2026/12/01 12:00:00 could not read secret '$3': could not get item $vault/$item: \"$item\" isn't an item in the \"$vault\" vault. Specify the item with its UUID, name, or domain." >&2
exit 1
"#
        ),
    )
    .expect("fake op");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&op, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

/// `[github]` against the fake, the token and webhook secret from these references.
fn github_section(github: &FakeGithub, token: &str, webhook_secret: &str) -> String {
    format!(
        "[github]\nrepo = \"{REPO}\"\napi_url = \"{}\"\ntoken = \"{token}\"\nwebhook_secret = \"{webhook_secret}\"\n",
        github.url
    )
}

/// `[talos]` with `talosconfig` written into `dir`.
fn talos_section(dir: &Path, talosconfig: &str) -> String {
    let path = dir.join("talosconfig");
    std::fs::write(&path, talosconfig).expect("talosconfig");
    format!(
        "[talos]\ntalosconfig = \"{}\"\ncluster = \"lab\"\n",
        path.display()
    )
}

fn kubernetes_section(kubeconfig: &Path) -> String {
    format!("[kubernetes]\nkubeconfig = \"{}\"\n", kubeconfig.display())
}

/// A loopback address where nothing listens (a port bound, then let go).
fn nothing_listening() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    addr.to_string()
}

#[tokio::test]
async fn preflight_checks_github_talos_and_kubernetes_once_the_cluster_exists() {
    infraflux_tests::init();
    let dir = tempfile::tempdir().expect("tempdir");
    let github = FakeGithub::start().await;
    github.set_token(
        CLASSIC_TOKEN,
        FakeToken::Classic {
            scopes: vec!["repo".into(), "workflow".into()],
        },
    );
    let talos = FakeTalos::start(SnapshotSource::Synthetic { size: 0 }, &[]).await;
    let kube = FakeKube::start("argocd").await;
    let config = [
        github_section(&github, "op://infra/github/token", "env:IFX_WEBHOOK_SECRET"),
        talos_section(dir.path(), talos.talosconfig()),
        kubernetes_section(&kube.kubeconfig(dir.path())),
    ]
    .concat();
    let run = preflight_with(
        dir.path(),
        &config,
        Launch {
            vars: vec![("IFX_WEBHOOK_SECRET", WEBHOOK_CANARY.into())],
            path_first: Some(fake_op(dir.path())),
            never_printed: vec![CLASSIC_TOKEN.into(), WEBHOOK_CANARY.into()],
        },
    )
    .await;
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    // The token came from the fake op: without it GitHub would have refused the request.
    assert_eq!(
        run.line("PASS secrets:"),
        "PASS secrets: 2/2 secret references resolve"
    );
    assert_eq!(
        run.line("PASS github.token:"),
        format!("PASS github.token: classic token reads {REPO}; scopes: repo, workflow")
    );
    assert_eq!(
        run.line("PASS talos.api:"),
        format!("PASS talos.api: Talos v1.13.9 on {FAKE_NODE}")
    );
    assert_eq!(
        run.line("PASS kubernetes.api:"),
        format!("PASS kubernetes.api: Kubernetes {FAKE_KUBE_VERSION} (linux/amd64)")
    );
    run.line("SKIP proxmox.api: no [proxmox] section");
    run.line("SKIP s3.endpoint: no [s3] section");
    assert_eq!(
        run.stdout.lines().last(),
        Some("preflight: 4/4 passed, 5 skipped"),
        "{}",
        run.stdout
    );
    // One read of the repository with the resolved token; a classic token's scopes say
    // enough, so the commits were not probed.
    let requests = github.requests();
    let paths: Vec<&str> = requests.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, [format!("/repos/{REPO}")], "{requests:?}");
    assert_eq!(
        requests[0].authorization.as_deref(),
        Some(format!("Bearer {CLASSIC_TOKEN}").as_str())
    );
}

#[tokio::test]
async fn preflight_names_the_github_token_talos_kubernetes_and_1password_failures_with_fixes() {
    infraflux_tests::init();
    let dir = tempfile::tempdir().expect("tempdir");
    let github = FakeGithub::start().await;
    let public_only = "ghp_publicRepoOnly0123456789abcdefABCD";
    let unknown = "ghp_revokedLongAgo0123456789abcdefABCDE";
    let fine_no_contents = "github_pat_11AAAAAAA0noContents_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWX";
    let fine_contents = "github_pat_11AAAAAAA0withContents_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUV";
    github.set_token(
        public_only,
        FakeToken::Classic {
            scopes: vec!["public_repo".into(), "read:org".into()],
        },
    );
    github.set_token(
        fine_no_contents,
        FakeToken::FineGrained {
            contents_read: false,
        },
    );
    github.set_token(
        fine_contents,
        FakeToken::FineGrained {
            contents_read: true,
        },
    );
    let tokens = [public_only, unknown, fine_no_contents, fine_contents];
    let op_dir = fake_op(dir.path());
    let launch = |token: &str| Launch {
        vars: vec![
            ("IFX_GH_TOKEN", token.to_string()),
            ("IFX_WEBHOOK_SECRET", WEBHOOK_CANARY.into()),
        ],
        path_first: Some(op_dir.clone()),
        never_printed: tokens
            .iter()
            .map(|t| t.to_string())
            .chain([CLASSIC_TOKEN.to_string(), WEBHOOK_CANARY.to_string()])
            .collect(),
    };

    // A classic token without `repo`, Talos and Kubernetes where nothing answers, and a
    // webhook secret in a 1Password item that does not exist.
    let talos = FakeTalos::start(SnapshotSource::Synthetic { size: 0 }, &[]).await;
    let dead_apid = nothing_listening();
    let dead_talosconfig = talos.talosconfig().replace(&talos.endpoint, &dead_apid);
    assert_ne!(dead_talosconfig, talos.talosconfig());
    let dead_apiserver = nothing_listening();
    let kubeconfig = dir.path().join("dead-kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://{dead_apiserver}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: admin\ncurrent-context: lab\nusers:\n- name: admin\n  user:\n    token: kube-canary-token-4f2a\n"
        ),
    )
    .expect("kubeconfig");
    let config = [
        github_section(&github, "env:IFX_GH_TOKEN", "op://infra/missing/webhook"),
        talos_section(dir.path(), &dead_talosconfig),
        kubernetes_section(&kubeconfig),
    ]
    .concat();
    let mut everything = launch(public_only);
    everything
        .never_printed
        .push("kube-canary-token-4f2a".into());
    let run = preflight_with(dir.path(), &config, everything).await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    let secrets = run.line("FAIL secrets:");
    assert!(
        secrets.contains("1 of 2 secret references do not resolve: github.webhook_secret.0 (1Password CLI could not read op://infra/missing/webhook: could not read secret 'op://infra/missing/webhook': could not get item infra/missing: \"missing\" isn't an item in the \"infra\" vault. Specify the item with its UUID, name, or domain.) (fix: ")
            && secrets.contains("sign the 1Password CLI in"),
        "{secrets}"
    );
    let token = run.line("FAIL github.token:");
    assert!(
        token.contains(&format!(
            "classic token cannot read {REPO} (404 Not Found): it lacks the scope(s) repo (it has: public_repo, read:org)"
        )) && token.contains("(fix: edit the token on GitHub (Settings, Developer settings) and add: repo)"),
        "{token}"
    );
    let talos_line = run.line("FAIL talos.api:");
    assert!(
        talos_line.contains(&format!("Talos API at {dead_apid}"))
            && talos_line.contains("Connection refused")
            && talos_line.contains("port 50000"),
        "{talos_line}"
    );
    let kube_line = run.line("FAIL kubernetes.api:");
    assert!(
        kube_line.contains(&format!("the Kubernetes API at http://{dead_apiserver}"))
            && kube_line.contains("does not answer")
            && kube_line.contains("Connection refused")
            && kube_line.contains("port 6443"),
        "{kube_line}"
    );
    assert!(
        run.stdout
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("preflight: 0/4 passed, 5 skipped; failed: ")),
        "{}",
        run.stdout
    );

    // Only GitHub from here: each token on its own.
    let config = github_section(&github, "env:IFX_GH_TOKEN", "env:IFX_WEBHOOK_SECRET");
    let run = preflight_with(dir.path(), &config, launch(unknown)).await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(
        run.line("FAIL github.token:"),
        "FAIL github.token: GitHub refused the token (401 Bad credentials): it is wrong, expired or revoked (fix: make a new token and store it where github.token points)"
    );

    let run = preflight_with(dir.path(), &config, launch(fine_no_contents)).await;
    assert_eq!(run.code, Some(1), "{}\n{}", run.stdout, run.stderr);
    let token = run.line("FAIL github.token:");
    assert!(
        token.contains(&format!(
            "fine-grained token cannot list the commits of {REPO} (403 Forbidden); GitHub accepts: contents=read"
        )) && token.contains(&format!("(fix: give the token Contents: read on {REPO}")),
        "{token}"
    );

    let before = github.requests().len();
    let run = preflight_with(dir.path(), &config, launch(fine_contents)).await;
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let token = run.line("PASS github.token:");
    assert!(
        token.contains(&format!("fine-grained token reads {REPO} and its commits"))
            && token.contains("Commit statuses: write"),
        "{token}"
    );
    // No scopes to read, so the commits were probed, one of them.
    let paths: Vec<String> = github.requests()[before..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        paths,
        [
            format!("/repos/{REPO}"),
            format!("/repos/{REPO}/commits?per_page=1")
        ]
    );
}
