//! The end-to-end test harness: a real `nats-server` per test on a free loopback port, agents
//! started in process through the library (or as child processes for crash tests), and
//! helpers to speak to them the way users do (signed webhooks, NATS commands).
//!
//! A missing `nats-server` fails the test loudly; nothing here skips.

pub mod bench;
pub mod browser;
pub mod clock;
pub mod cluster;
pub mod fakes;
pub mod handlers;
pub mod kube_fake;
pub mod nats_proxy;
pub mod otlp;
pub mod peers;
pub mod process;
pub mod proxmox_fake;
pub mod talos_fake;
pub mod tcp_proxy;
pub mod tls;
pub mod upgrade_lab;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hmac::{Hmac, KeyInit, Mac};
use infraflux_agent::config::Config;
use infraflux_agent::records::JobEvent;
use infraflux_agent::{AgentHandle, secrets};
use infraflux_handlers::Registry;
use serde_json::{Value, json};
use sha2::Sha256;

/// The webhook secret test agents are configured with.
pub const WEBHOOK_SECRET: &str = "test-webhook-secret-0123";

/// Installs the rustls provider and test logging once per test binary.
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    infraflux_agent::telemetry::init_for_tests();
}

/// `tests/fixtures` of this repository: upstream data copied in unchanged, with its sources in
/// `tests/fixtures/SOURCES.md`, so a clone alone runs the suite.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn fixture(path: &str) -> Vec<u8> {
    let file = fixtures_dir().join(path);
    std::fs::read(&file).unwrap_or_else(|e| panic!("fixture {} is missing ({e})", file.display()))
}

/// A free loopback port for a peer to listen on, below the kernel's ephemeral range: a port
/// from that range (what binding port 0 gives) can be taken as the source port of any
/// outgoing connection between this check and the peer's bind, or while a killed peer is
/// down, and the peer then fails to listen. Each port is handed out once per process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 10_000;
    if ephemeral_from > LOWEST + 1_000 {
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        for _ in 0..1_000 {
            let port = rand::random_range(LOWEST..ephemeral_from);
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.insert(port);
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A real nats-server with JetStream, on a free port, with its own store directory.
pub struct Nats {
    pub port: u16,
    pub url: String,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
    config: Option<NatsConfig>,
}

/// A nats-server config file (users, permissions) and the environment it reads passwords from.
type NatsConfig = (PathBuf, Vec<(String, String)>);

impl Nats {
    pub fn start() -> Nats {
        Self::start_configured(tempfile::tempdir().expect("tempdir"), None)
    }

    /// A server whose config file is `config` (written next to its store; it may `include`
    /// files written there too), reading `env`; port and store come from the command line.
    pub fn start_with_config(config: &str, files: &[(&str, &str)], env: &[(&str, &str)]) -> Nats {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write nats file");
        }
        let path = dir.path().join("nats-server.conf");
        std::fs::write(&path, config).expect("write nats config");
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_configured(dir, Some((path, env)))
    }

    fn start_configured(dir: tempfile::TempDir, config: Option<NatsConfig>) -> Nats {
        let mut nats = Nats {
            port: 0,
            url: String::new(),
            dir,
            child: Mutex::new(None),
            config,
        };
        // A free port may be taken by another test's server between the probe and the bind:
        // then ours exits while the port answers, and this test would talk to the other one.
        for _ in 0..5 {
            nats.port = free_port();
            nats.url = format!("nats://127.0.0.1:{}", nats.port);
            nats.spawn();
            std::thread::sleep(Duration::from_millis(100));
            let exited = nats
                .child
                .lock()
                .expect("lock")
                .as_mut()
                .is_none_or(|c| !matches!(c.try_wait(), Ok(None)));
            if !exited {
                return nats;
            }
        }
        panic!("nats-server kept exiting at start: no free port?");
    }

    fn spawn(&self) {
        let mut command = Command::new("nats-server");
        if let Some((path, env)) = &self.config {
            command.arg("-c").arg(path).envs(env.iter().cloned());
        }
        let child = command
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.dir.path().join("store"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server ({e}); install it (Debian: apt-get install nats-server)")
            });
        *self.child.lock().expect("lock") = Some(child);
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("nats-server did not listen on {} within 5s", self.port);
    }

    /// The running server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().expect("lock").as_ref().map(Child::id)
    }

    /// Stops the server (its JetStream store stays on disk).
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().expect("lock").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers, as with a
    /// hung host. `thaw` resumes it.
    pub fn freeze(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(child) = self.child.lock().expect("lock").as_ref() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
            nix::sys::signal::kill(pid, signal).expect("signal nats-server");
        }
    }

    /// Starts it again on the same port with the same store.
    pub fn restart(&self) {
        self.stop();
        self.spawn();
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(&self.url)
            .await
            .expect("connect to test nats")
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        // A frozen server does not die of SIGKILL until it is resumed.
        self.thaw();
        self.stop();
    }
}

/// `[acceptance]` for an agent whose acceptance handler a test replaces (marker handlers,
/// sleepers), with the `[kubernetes]` section the kind requires: a kubeconfig naming a server
/// nothing contacts, since the replacement never reads the cluster.
pub fn acceptance_stand_in() -> String {
    static KUBECONFIG: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let path = KUBECONFIG.get_or_init(|| {
        let path = std::env::temp_dir().join(format!(
            "infraflux-stand-in-kubeconfig-{}",
            std::process::id()
        ));
        let text = "apiVersion: v1\nkind: Config\nclusters:\n- name: none\n  cluster:\n    server: http://127.0.0.1:9\ncontexts:\n- name: none\n  context:\n    cluster: none\n    user: none\ncurrent-context: none\nusers:\n- name: none\n  user:\n    token: none\n";
        std::fs::write(&path, text).expect("stand-in kubeconfig");
        path
    });
    format!(
        "[kubernetes]\nkubeconfig = \"{}\"\n[acceptance]\n",
        path.display()
    )
}

/// The `[agent]`, `[nats]`, `[http]` and `[github]` sections of a test agent; short timers so
/// redelivery and lease expiry happen within seconds.
pub fn base_toml(nats_url: &str, agent_id: &str, state_dir: &Path) -> String {
    format!(
        r#"
[agent]
id = "{agent_id}"
state_dir = "{state}"
concurrency = 4
ack_wait = "2s"
lease_ttl = "2s"
shutdown_timeout = "2s"
kill_grace = "1s"

[nats]
url = "{nats_url}"

[http]
listen = "127.0.0.1:0"

[ui]
listen = "127.0.0.1:0"

[github]
repo = "Codertocat/Hello-World"
default_branch = "master"
webhook_secret = "env:TEST_WEBHOOK_SECRET"
"#,
        state = state_dir.display()
    )
}

/// A whole test agent config: [`base_toml`] plus `extra`, which may bring its own `[github]`.
pub fn agent_config(nats_url: &str, agent_id: &str, state_dir: &Path, extra: &str) -> String {
    let mut base = base_toml(nats_url, agent_id, state_dir);
    if extra.contains("[github]") {
        base.truncate(base.find("[github]").unwrap_or(base.len()));
    }
    format!("{base}\n{extra}")
}

/// An agent running in this process.
pub struct TestAgent {
    pub handle: AgentHandle,
    pub http: String,
    /// The status page's base address (`http://127.0.0.1:<port>`).
    pub ui: String,
    pub dir: tempfile::TempDir,
}

impl TestAgent {
    /// Graceful stop, as on SIGTERM.
    pub async fn stop(self) {
        self.handle.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.handle.join()).await;
    }
}

/// Starts an agent with `extra` TOML appended to the base config and `customize` applied to
/// its registry (tests register their handlers there).
pub async fn start_agent(
    nats: &Nats,
    agent_id: &str,
    extra: &str,
    customize: impl FnOnce(&mut Registry),
) -> TestAgent {
    start_agent_with_env(nats, agent_id, extra, &[], customize).await
}

/// [`start_agent`] with extra environment variables (secrets the config references).
pub async fn start_agent_with_env(
    nats: &Nats,
    agent_id: &str,
    extra: &str,
    extra_env: &[(&str, &str)],
    customize: impl FnOnce(&mut Registry),
) -> TestAgent {
    start_agent_at(&nats.url, agent_id, extra, extra_env, customize).await
}

/// [`start_agent_with_env`] connecting to `nats_url` (a proxy in front of the test server).
pub async fn start_agent_at(
    nats_url: &str,
    agent_id: &str,
    extra: &str,
    extra_env: &[(&str, &str)],
    customize: impl FnOnce(&mut Registry),
) -> TestAgent {
    launch_agent(
        nats_url,
        agent_id,
        extra,
        extra_env,
        Arc::new(infraflux_agent::clock::SystemClock),
        customize,
    )
    .await
}

/// [`start_agent`] whose schedules fire by `clock`.
pub async fn start_agent_with_clock(
    nats: &Nats,
    agent_id: &str,
    extra: &str,
    clock: Arc<dyn infraflux_agent::clock::Clock>,
    customize: impl FnOnce(&mut Registry),
) -> TestAgent {
    launch_agent(&nats.url, agent_id, extra, &[], clock, customize).await
}

async fn launch_agent(
    nats_url: &str,
    agent_id: &str,
    extra: &str,
    extra_env: &[(&str, &str)],
    clock: Arc<dyn infraflux_agent::clock::Clock>,
    customize: impl FnOnce(&mut Registry),
) -> TestAgent {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = agent_config(nats_url, agent_id, dir.path(), extra);
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, toml).expect("write config");
    let mut env = test_env();
    env.extend(
        extra_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let loaded =
        Config::load(&path, env.clone()).unwrap_or_else(|p| panic!("test config invalid:\n{p}"));
    let secrets = secrets::resolve_all(&loaded.config, &env)
        .await
        .unwrap_or_else(|p| panic!("test secrets: {p}"));
    let services = infraflux_agent::services::build(&loaded.config, &secrets, &env)
        .await
        .unwrap_or_else(|p| panic!("test services: {p}"));
    let mut registry = Registry::from_sections(&loaded.config.handlers, &services);
    customize(&mut registry);
    let mut handle = infraflux_agent::start_with_clock(loaded.config, services, registry, clock)
        .await
        .expect("agent starts");
    let ready = tokio::time::timeout(Duration::from_secs(20), handle.ready()).await;
    assert!(
        matches!(ready, Ok(true)),
        "agent {agent_id} not ready within 20s"
    );
    let http = format!("http://{}", handle.http_addr);
    let ui = handle
        .ui_addr
        .map(|addr| format!("http://{addr}"))
        .unwrap_or_default();
    TestAgent {
        handle,
        http,
        ui,
        dir,
    }
}

/// The environment a test agent sees: its webhook secret, and what git and terraform need.
pub fn test_env() -> HashMap<String, String> {
    let mut env = HashMap::from([
        (
            "TEST_WEBHOOK_SECRET".to_string(),
            WEBHOOK_SECRET.to_string(),
        ),
        (
            "TF_CLI_CONFIG_FILE".to_string(),
            peers::empty_cli_config().display().to_string(),
        ),
    ]);
    for key in ["PATH", "HOME"] {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.to_string(), v);
        }
    }
    env
}

/// `sha256=<hex>` of the body under the secret, as GitHub signs.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Posts a webhook signed with [`WEBHOOK_SECRET`].
pub async fn post_webhook(http: &str, event: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
    try_post_webhook(http, event, delivery, body)
        .await
        .expect("webhook request")
}

pub async fn post_webhook_raw(
    http: &str,
    event: Option<&str>,
    delivery: Option<&str>,
    signature: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value) {
    try_post_webhook_raw(http, event, delivery, signature, body)
        .await
        .expect("webhook request")
}

/// Posts a webhook signed with [`WEBHOOK_SECRET`]; a connection that fails (an agent killed
/// mid-request) is an error, not a panic.
pub async fn try_post_webhook(
    http: &str,
    event: &str,
    delivery: &str,
    body: &[u8],
) -> Result<(u16, Value), reqwest::Error> {
    try_post_webhook_raw(
        http,
        Some(event),
        Some(delivery),
        Some(&sign(WEBHOOK_SECRET, body)),
        body.to_vec(),
    )
    .await
}

pub async fn try_post_webhook_raw(
    http: &str,
    event: Option<&str>,
    delivery: Option<&str>,
    signature: Option<&str>,
    body: Vec<u8>,
) -> Result<(u16, Value), reqwest::Error> {
    let client = reqwest::Client::new();
    let mut request = client
        .post(format!("{http}/webhooks/github"))
        .header("Content-Type", "application/json")
        .body(body);
    if let Some(e) = event {
        request = request.header("X-GitHub-Event", e);
    }
    if let Some(d) = delivery {
        request = request.header("X-GitHub-Delivery", d);
    }
    if let Some(s) = signature {
        request = request.header("X-Hub-Signature-256", s);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// Sends a ChatOps command the way a chat bridge does and returns the reply.
pub async fn command(client: &async_nats::Client, text: &str) -> Value {
    command_as(client, text, "tester").await
}

/// The `status` reply once its message contains `needle`: the agent serves status from a cache
/// that follows NATS, so a change shows up a moment after it happened.
pub async fn status_showing(client: &async_nats::Client, needle: &str) -> Value {
    wait_for(
        Duration::from_secs(10),
        &format!("status to show {needle:?}"),
        || async {
            let status = command(client, "status").await;
            status["message"]
                .as_str()
                .unwrap_or_default()
                .contains(needle)
                .then_some(status)
        },
    )
    .await
}

pub async fn command_as(client: &async_nats::Client, text: &str, who: &str) -> Value {
    let verb = text
        .split_whitespace()
        .next()
        .unwrap_or("help")
        .to_ascii_lowercase();
    let body = json!({"command": text, "requested_by": who});
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let reply = tokio::time::timeout(
            Duration::from_secs(15),
            client.request(
                format!("infraflux.cmd.{verb}"),
                serde_json::to_vec(&body).expect("json").into(),
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("no reply to {text:?} within 15s"));
        match reply {
            Ok(reply) => return serde_json::from_slice(&reply.payload).expect("reply is JSON"),
            // The test client's own connection may still be reconnecting on a loaded machine:
            // the agent is there, the request never reached it. Ask again, briefly.
            Err(e)
                if e.kind() == async_nats::client::RequestErrorKind::NoResponders
                    && std::time::Instant::now() < deadline =>
            {
                eprintln!("no responders for {text:?}; asking again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("request {text:?} failed: {e}"),
        }
    }
}

/// A job's record, read from the records bucket (so it works while no agent runs).
/// The agent's `/metrics` text at `http` (its base URL).
pub async fn metrics_text(http: &str) -> String {
    reqwest::get(format!("{http}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

pub async fn record(client: &async_nats::Client, job_id: &str) -> Value {
    let kv = async_nats::jetstream::new(client.clone())
        .get_key_value("infraflux-jobs")
        .await
        .expect("records bucket");
    let bytes = kv
        .get(job_id)
        .await
        .expect("read record")
        .unwrap_or_else(|| panic!("no record for job {job_id}"));
    serde_json::from_slice(&bytes).expect("record is JSON")
}

/// Every job record, newest first, read from the records bucket.
pub async fn all_records(client: &async_nats::Client) -> Vec<Value> {
    let kv = async_nats::jetstream::new(client.clone())
        .get_key_value("infraflux-jobs")
        .await
        .expect("records bucket");
    let mut keys: Vec<String> = kv
        .keys()
        .await
        .expect("keys")
        .filter_map(|k| async move { k.ok() })
        .collect()
        .await;
    keys.sort_unstable_by(|a, b| b.cmp(a));
    // A key updated while the listing runs is listed again.
    keys.dedup();
    let mut out = Vec::new();
    for key in keys {
        if let Ok(Some(bytes)) = kv.get(&key).await {
            out.push(serde_json::from_slice(&bytes).expect("record is JSON"));
        }
    }
    out
}

/// Sends a command that must start a job; returns the job id.
pub async fn submit(client: &async_nats::Client, text: &str) -> String {
    let reply = command(client, text).await;
    assert_eq!(reply["ok"], true, "{text}: {reply}");
    reply["job_id"].as_str().expect("job id").to_string()
}

/// Waits until a job's record is in `state` and returns the record.
pub async fn wait_state(client: &async_nats::Client, job_id: &str, state: &str) -> Value {
    wait_for(
        Duration::from_secs(15),
        &format!("job {job_id} to be {state}"),
        || async {
            let r = record(client, job_id).await;
            (r["state"] == state).then_some(r)
        },
    )
    .await
}

/// Polls `check` every 100 ms until it returns `Some`, or panics naming `what`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a job's record is in a settled state and returns it.
pub async fn wait_settled(client: &async_nats::Client, job_id: &str, limit: Duration) -> Value {
    wait_for(limit, &format!("job {job_id} to end"), || async {
        let r = record(client, job_id).await;
        let state = r["state"].as_str().unwrap_or_default().to_string();
        matches!(
            state.as_str(),
            "succeeded" | "failed" | "cancelled" | "awaiting_approval"
        )
        .then_some(r)
    })
    .await
}

/// Every job event stored in the events stream (the audit trail), oldest first, as JSON.
pub async fn stored_events(client: &async_nats::Client) -> Vec<Value> {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js
        .get_stream("INFRAFLUX_EVENTS")
        .await
        .expect("events stream");
    let last = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let mut out = Vec::new();
    for sequence in 1..=last {
        if let Ok(message) = stream.get_raw_message(sequence).await {
            out.push(serde_json::from_slice(&message.payload).unwrap_or(Value::Null));
        }
    }
    out
}

/// Every job event published while it lives (subscribe before causing them).
#[derive(Clone)]
pub struct EventLog {
    events: Arc<Mutex<Vec<JobEvent>>>,
}

impl EventLog {
    pub async fn subscribe(client: &async_nats::Client) -> EventLog {
        let mut sub = client
            .subscribe("infraflux.events.job.*")
            .await
            .expect("subscribe events");
        client.flush().await.expect("flush");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if let Ok(e) = serde_json::from_slice::<JobEvent>(&m.payload) {
                    sink.lock().expect("lock").push(e);
                }
            }
        });
        EventLog { events }
    }

    pub fn of(&self, job_id: &str) -> Vec<JobEvent> {
        self.events
            .lock()
            .expect("lock")
            .iter()
            .filter(|e| e.job_id == job_id)
            .cloned()
            .collect()
    }

    /// Every job id an event was heard of.
    pub fn job_ids(&self) -> std::collections::BTreeSet<String> {
        self.events
            .lock()
            .expect("lock")
            .iter()
            .map(|e| e.job_id.clone())
            .collect()
    }

    pub fn states_of(&self, job_id: &str) -> Vec<String> {
        self.of(job_id)
            .iter()
            .map(|e| e.state.as_str().to_string())
            .collect()
    }
}

/// Whether process `pid` runs (a zombie does not).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the command name, which is in parentheses and may hold spaces.
            let after = stat.rsplit_once(')')?.1;
            after
                .split_whitespace()
                .next()
                .map(|state| state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// A tiny tmpfs mounted over a directory and filled, so that writing below it fails with
/// "No space left on device"; unmounted when dropped. Needs root (CI runs as root); a test
/// that cannot mount fails and says so.
pub struct FullDisk {
    at: PathBuf,
}

impl FullDisk {
    pub fn mount_at(at: &Path) -> FullDisk {
        std::fs::create_dir_all(at).expect("mount point");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(
            mounted.success(),
            "cannot mount a tmpfs at {} (the state_dir-full test needs root)",
            at.display()
        );
        let full = FullDisk {
            at: at.to_path_buf(),
        };
        // Fill it: the write stops at the size limit.
        let _ = std::fs::write(at.join("filler"), vec![0u8; 128 * 1024]);
        full
    }
}

impl Drop for FullDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}
