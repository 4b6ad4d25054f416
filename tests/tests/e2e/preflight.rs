//! `infraflux-agent preflight --config FILE`: the checks against a fake Proxmox API over HTTPS
//! with its own CA and a real S3 server, each shown passing and failing with its fix; a secret
//! canary never printed; exit 0, 1 and 2.

use std::path::Path;
use std::process::Command;

use infraflux_tests::peers::S3Server;
use infraflux_tests::proxmox_fake::FakeProxmox;

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
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).expect("config");
    let secret = secret.to_string();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(crate::test_agent_bin())
            .args(["preflight", "--config", path.to_str().expect("path")])
            .env_remove("INFRAFLUX_NATS__URL")
            .env("IFX_PVE_SECRET", secret)
            .env("IFX_S3_KEY", "preflight-access-key")
            .env("IFX_S3_SECRET", "preflight-secret-key")
            .env_remove("IFX_MISSING_HEADER")
            .output()
            .expect("run the binary");
        let run = Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        for text in [&run.stdout, &run.stderr] {
            assert!(!text.contains(CANARY), "the token secret leaked:\n{text}");
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
