//! The benchmark suite behind `infraflux-bench all`: each figure against a baseline measured in
//! the same run on loopback, printed as one table. Benchmarks print numbers; nothing here
//! asserts a time.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use serde_json::Value;

use crate::cluster::NatsCluster;
use crate::peers::S3Server;
use crate::talos_fake::{FakeTalos, SnapshotSource};
use crate::{Nats, WEBHOOK_SECRET, agent_config, fixture, free_port, sign, test_env};

/// Where the measured agents' NATS runs: one server, or a 3-server cluster with `replicas = 3`.
pub trait NatsPeer: Sync {
    fn url(&self) -> &str;
    fn client(&self) -> impl std::future::Future<Output = async_nats::Client> + Send;
    /// The `nats.replicas` agents use here.
    fn replicas(&self) -> usize;
}

impl NatsPeer for Nats {
    fn url(&self) -> &str {
        &self.url
    }
    fn client(&self) -> impl std::future::Future<Output = async_nats::Client> + Send {
        Nats::client(self)
    }
    fn replicas(&self) -> usize {
        1
    }
}

impl NatsPeer for NatsCluster {
    fn url(&self) -> &str {
        &self.url
    }
    fn client(&self) -> impl std::future::Future<Output = async_nats::Client> + Send {
        NatsCluster::client(self)
    }
    fn replicas(&self) -> usize {
        3
    }
}

/// One line of the result table.
#[derive(Debug, Clone)]
pub struct Row {
    pub figure: String,
    pub value: String,
    pub baseline: String,
    pub ratio: String,
    pub target: String,
    pub met: Option<bool>,
}

impl Row {
    fn new(
        figure: &str,
        value: String,
        baseline: String,
        ratio: String,
        target: &str,
        met: Option<bool>,
    ) -> Row {
        Row {
            figure: figure.into(),
            value,
            baseline,
            ratio,
            target: target.into(),
            met,
        }
    }
}

pub fn print_table(rows: &[Row]) {
    println!("| figure | measured | baseline | ratio | target | met |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        println!(
            "| {} | {} | {} | {} | {} | {met} |",
            r.figure, r.value, r.baseline, r.ratio, r.target
        );
    }
}

/// Latencies in microseconds.
#[derive(Debug, Clone, Default)]
pub struct Latencies(Vec<u64>);

impl Latencies {
    pub fn push(&mut self, d: Duration) {
        self.0
            .push(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `q`-quantile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let mut v = self.0.clone();
        v.sort_unstable();
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        v[i.min(v.len() - 1)] as f64 / 1000.0
    }
}

/// The agent binary next to the running one (same profile).
pub fn agent_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("infraflux-agent")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("build the agent first: cargo build --release -p infraflux-agent")
        })
}

/// Fields of `/proc/<pid>/status` given in KiB (`VmRSS:`, ...); 0 for any not found.
fn status_kib<const N: usize>(pid: u32, names: [&str; N]) -> [u64; N] {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    names.map(|name| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    })
}

/// Resident set size now and at its peak (`VmRSS`, `VmHWM`), in KiB.
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let [now, peak] = status_kib(pid, ["VmRSS:", "VmHWM:"]);
    (now, peak)
}

/// `RssAnon` and `RssFile` in KiB.
pub fn rss_parts_kib(pid: u32) -> (u64, u64) {
    let [anon, file] = status_kib(pid, ["RssAnon:", "RssFile:"]);
    (anon, file)
}

/// The CPU time the processes sharing a closed loop's cores spend per delivery, each named:
/// the cores' time divided by that sum is the most the loop can reach at that cost, whatever
/// the latency, so a row's rate is read against it (a rate well under it means time spent
/// waiting, not working).
pub struct CpuMeter {
    processes: Vec<(&'static str, u32, Duration)>,
}

impl CpuMeter {
    /// Starts counting the CPU time of `processes` (name and pid) from now.
    pub fn start(processes: &[(&'static str, u32)]) -> Self {
        CpuMeter {
            processes: processes
                .iter()
                .map(|&(name, pid)| (name, pid, cpu_time(pid)))
                .collect(),
        }
    }

    /// Each process's CPU time since `start` per delivery, in µs.
    pub fn per_delivery(&self, deliveries: u64) -> Vec<(&'static str, f64)> {
        self.processes
            .iter()
            .map(|&(name, pid, before)| {
                let spent = cpu_time(pid).saturating_sub(before);
                (name, spent.as_secs_f64() * 1e6 / deliveries.max(1) as f64)
            })
            .collect()
    }

    /// One line: each process's CPU per delivery, their sum, and the rate this machine's cores
    /// allow at that cost beside the `rate` measured.
    pub fn report(&self, deliveries: u64, rate: f64) -> String {
        let shares = self.per_delivery(deliveries);
        let sum: f64 = shares.iter().map(|(_, us)| us).sum();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let allowed = cores as f64 * 1e6 / sum.max(f64::MIN_POSITIVE);
        let each: Vec<String> = shares
            .iter()
            .map(|(name, us)| format!("{name} {us:.0} µs"))
            .collect();
        format!(
            "CPU per delivery: {} (sum {sum:.0} µs); {cores} cores allow {allowed:.0} req/s at that cost, measured {rate:.0} ({:.0} %)",
            each.join(", "),
            100.0 * rate / allowed
        )
    }
}

/// CPU time used by a process so far (user + system), from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let hz = 100.0; // USER_HZ on Linux
    Duration::from_secs_f64(ticks as f64 / hz)
}

/// An agent process under measurement.
pub struct AgentProcess {
    pub child: Child,
    pub http: String,
    pub ready_after: Duration,
    _dir: tempfile::TempDir,
}

impl AgentProcess {
    /// Starts the agent with `extra` config; returns once it signalled READY=1 (timed).
    pub async fn start(
        nats: &impl NatsPeer,
        id: &str,
        extra: &str,
        env: &[(&str, String)],
    ) -> AgentProcess {
        Self::start_bin(agent_bin(), nats, id, extra, env).await
    }

    /// [`AgentProcess::start`] of the agent built with test handlers (`infraflux-test-agent`),
    /// whose `acceptance` jobs write a marker file and sleep `$IFX_TEST_SLEEP_MS`: what is
    /// measured is the agent's own work around a job, not a kind's.
    pub async fn start_test_agent(
        nats: &impl NatsPeer,
        id: &str,
        extra: &str,
        env: &[(&str, String)],
    ) -> AgentProcess {
        let bin = agent_bin().with_file_name("infraflux-test-agent");
        assert!(
            bin.exists(),
            "build it first: cargo build --release -p infraflux-tests"
        );
        Self::start_bin(bin, nats, id, extra, env).await
    }

    async fn start_bin(
        bin: PathBuf,
        nats: &impl NatsPeer,
        id: &str,
        extra: &str,
        env: &[(&str, String)],
    ) -> AgentProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            agent_config(nats.url(), id, &dir.path().join("state"), extra),
        )
        .expect("config");
        let port = free_port();
        let socket_path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let started = Instant::now();
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .envs(test_env())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("INFRAFLUX_HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("INFRAFLUX_NATS__REPLICAS", nats.replicas().to_string())
            .env("NOTIFY_SOCKET", &socket_path)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the agent");
        let ready_after = tokio::task::block_in_place(|| {
            let mut buf = [0u8; 256];
            loop {
                let n = socket.recv(&mut buf).expect("READY=1 from the agent");
                if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                    return started.elapsed();
                }
            }
        });
        AgentProcess {
            child,
            http: format!("http://127.0.0.1:{port}"),
            ready_after,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Webhook ingest

/// The push fixture, serialized once, with the place of its `after` commit: each request copies
/// it and writes a unique commit there, so the load generator spends its share of the two cores
/// on sending, not on building JSON.
struct PushTemplate {
    bytes: Vec<u8>,
    after_at: usize,
}

impl PushTemplate {
    fn new() -> PushTemplate {
        const MARK: &str = "feedfacefeedfacefeedfacefeedfacefeedface";
        let mut push: Value =
            serde_json::from_slice(&fixture("github/push/push.json")).expect("fixture");
        push["after"] = Value::String(MARK.into());
        let bytes = serde_json::to_vec(&push).expect("json");
        let after_at = bytes
            .windows(MARK.len())
            .position(|w| w == MARK.as_bytes())
            .expect("the mark");
        PushTemplate { bytes, after_at }
    }

    /// The push with commit `n + 1`: each delivery is a new job, stored durably.
    fn body(&self, n: u64) -> Vec<u8> {
        let mut body = self.bytes.clone();
        let sha = format!("{:040x}", n + 1);
        body[self.after_at..self.after_at + 40].copy_from_slice(sha.as_bytes());
        body
    }
}

pub struct Load {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub latencies: Latencies,
}

impl Load {
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// `connections` keep-alive connections posting signed pushes to `url` for `duration`, each
/// sending its next as soon as the last is answered (a closed loop: it finds the saturation
/// rate, and its latency is the queue at that rate).
pub async fn webhook_load(
    url: &str,
    connections: usize,
    duration: Duration,
    unique: bool,
    start: u64,
) -> Load {
    load(url, connections, duration, unique, start, None, false).await
}

/// Signed pushes offered at `rate` a second over `connections`, whatever the answers take (an
/// open loop, as GitHub sends): each latency counts from the moment its request was due, so
/// a stall is not hidden by the requests it delayed.
pub async fn webhook_load_at(url: &str, rate: f64, duration: Duration, start: u64) -> Load {
    load(url, 16, duration, true, start, Some(rate), false).await
}

/// The HTTP floor beside [`webhook_load_at`]: the same senders and pacing, asking `GET url`
/// (the agent's `/healthz`, which touches nothing else).
pub async fn probe_load_at(url: &str, rate: f64, duration: Duration) -> Load {
    load(url, 16, duration, false, 0, Some(rate), true).await
}

async fn load(
    url: &str,
    connections: usize,
    duration: Duration,
    unique: bool,
    start: u64,
    rate: Option<f64>,
    probe: bool,
) -> Load {
    let target = SenderTarget::parse(url);
    // `IFX_BENCH_SLOW_MS=N` prints each answer slower than N ms and when it was sent, to line
    // a tail up with what else happened then.
    let slow_log = std::env::var("IFX_BENCH_SLOW_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map(Duration::from_millis);
    // The senders run on one thread of their own with a runtime of its own: the load generator
    // shares the two cores with the agent and nats-server, and every thread it keeps runnable
    // is one more in their CPU queue. Connected before the clock starts: a connection's set-up
    // is the load generator's (counted from the first requests' due moments, a client's set-up
    // added 15–40 ms to each run's first ~50 answers).
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-senders".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("sender runtime");
            let load = runtime.block_on(async move {
                let template = Arc::new(PushTemplate::new());
                let mut senders = Vec::new();
                for _ in 0..connections {
                    senders.push(Sender::connect(&target).await);
                }
                let counter = Arc::new(std::sync::atomic::AtomicU64::new(start));
                let deadline = Instant::now() + duration;
                let started = Instant::now();
                let mut tasks = Vec::new();
                for (worker, mut sender) in senders.into_iter().enumerate() {
                    let (template, counter) = (template.clone(), counter.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut lat = Latencies::default();
                        let (mut ok, mut errors) = (0u64, 0u64);
                        let mut sent_here = 0u64;
                        while Instant::now() < deadline {
                            // Paced: this worker's k-th request is due at
                            // (k·connections + worker) / rate.
                            let due = rate.map(|rate| {
                                let slot = sent_here * connections as u64 + worker as u64;
                                started + Duration::from_secs_f64(slot as f64 / rate)
                            });
                            sent_here += 1;
                            let t = match due {
                                Some(due) if due >= deadline => break,
                                Some(due) => paced_start(due).await,
                                None => Instant::now(),
                            };
                            let n = if unique {
                                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                            } else {
                                0
                            };
                            let answered = if probe {
                                sender.get().await
                            } else {
                                sender.post_push(&template, n).await
                            };
                            match answered {
                                Ok(status) if (200..300).contains(&status) => {
                                    let took = t.elapsed();
                                    if slow_log.is_some_and(|limit| took >= limit) {
                                        eprintln!(
                                            "slow: {:.2} ms, connection {worker}, sent {}",
                                            took.as_secs_f64() * 1e3,
                                            chrono::Utc::now()
                                                - chrono::Duration::from_std(took)
                                                    .unwrap_or_default()
                                        );
                                    }
                                    lat.push(took);
                                    ok += 1;
                                }
                                _ => errors += 1,
                            }
                        }
                        (ok, errors, lat)
                    }));
                }
                let mut load = gather(tasks).await;
                load.seconds = started.elapsed().as_secs_f64();
                load
            });
            let _ = done.send(load);
        })
        .expect("sender thread");
    finished
        .await
        .expect("the senders' thread ended without a result")
}

/// Where the senders connect and what path they ask: `http://host:port/path`.
#[derive(Clone)]
struct SenderTarget {
    address: String,
    path: String,
}

impl SenderTarget {
    fn parse(url: &str) -> SenderTarget {
        let rest = url
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("the load generator speaks plain HTTP: {url}"));
        let (address, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        SenderTarget {
            address: address.to_string(),
            path: if path.is_empty() {
                "/".into()
            } else {
                path.into()
            },
        }
    }
}

/// One keep-alive HTTP/1.1 connection that writes each request whole, in one write, and reads
/// its answer to the end of its body: what GitHub's sender does, without a general client's
/// per-request work (header maps, pool checkout, a task per connection) on the shared cores.
/// A refused or closed connection is connected again at the next request.
struct Sender {
    target: SenderTarget,
    stream: Option<tokio::net::TcpStream>,
    request: Vec<u8>,
    answer: Vec<u8>,
}

impl Sender {
    async fn connect(target: &SenderTarget) -> Sender {
        let mut sender = Sender {
            target: target.clone(),
            stream: None,
            request: Vec::with_capacity(8192),
            answer: Vec::with_capacity(4096),
        };
        // A refusal here shows as the first request's error, which connects again.
        let _ = sender.connected().await;
        sender
    }

    async fn connected(&mut self) -> std::io::Result<&mut tokio::net::TcpStream> {
        if self.stream.is_none() {
            let stream = tokio::net::TcpStream::connect(&self.target.address).await?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        self.stream
            .as_mut()
            .ok_or_else(|| std::io::ErrorKind::NotConnected.into())
    }

    /// A signed push with commit and delivery `n`; returns the answer's status.
    async fn post_push(&mut self, template: &PushTemplate, n: u64) -> std::io::Result<u16> {
        use std::io::Write;
        let body = template.body(n);
        let signature = sign(WEBHOOK_SECRET, &body);
        self.request.clear();
        write!(
            self.request,
            "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n\
             x-github-event: push\r\nx-github-delivery: bench-{n}\r\n\
             x-hub-signature-256: {signature}\r\ncontent-length: {}\r\n\r\n",
            self.target.path,
            self.target.address,
            body.len()
        )?;
        self.request.extend_from_slice(&body);
        self.exchange().await
    }

    /// `GET` of the target's path; returns the answer's status.
    async fn get(&mut self) -> std::io::Result<u16> {
        use std::io::Write;
        self.request.clear();
        write!(
            self.request,
            "GET {} HTTP/1.1\r\nhost: {}\r\n\r\n",
            self.target.path, self.target.address
        )?;
        self.exchange().await
    }

    async fn exchange(&mut self) -> std::io::Result<u16> {
        let answered = self.exchange_once().await;
        if answered.is_err() {
            // Whatever the connection held is lost with it; the next request connects anew.
            self.stream = None;
        }
        answered
    }

    async fn exchange_once(&mut self) -> std::io::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.connected().await?;
        let stream = self
            .stream
            .as_mut()
            .ok_or(std::io::ErrorKind::NotConnected)?;
        stream.write_all(&self.request).await?;
        self.answer.clear();
        let mut read_some = async |answer: &mut Vec<u8>| match stream.read_buf(answer).await? {
            0 => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            _ => Ok(()),
        };
        loop {
            if let Some((status, head, body_length, keep_alive)) = parse_answer(&self.answer)? {
                while self.answer.len() < head + body_length {
                    read_some(&mut self.answer).await?;
                }
                if !keep_alive {
                    self.stream = None;
                }
                return Ok(status);
            }
            read_some(&mut self.answer).await?;
        }
    }
}

/// An answer's status, head length, body length and whether the connection stays open, once
/// its head is complete. Both servers measured here (hyper, Go's net/http) give small answers a
/// `Content-Length`; another framing is refused rather than misread.
fn parse_answer(bytes: &[u8]) -> std::io::Result<Option<(u16, usize, usize, bool)>> {
    let Some(head_end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&bytes[..head_end])
        .map_err(|_| std::io::Error::other("an answer's head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    let (mut length, mut keep_alive) = (None, true);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(std::io::Error::other(format!("answer framed as {value}")));
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            keep_alive = false;
        }
    }
    let length = length.ok_or_else(|| std::io::Error::other("an answer without a length"))?;
    Ok(Some((status, head_end + 4, length, keep_alive)))
}

/// The store's floor for one accepted delivery: what ingest writes, without the agent. A plain
/// client sends a claim (KV create), a record (KV create) and a job (work-queue stream) of
/// ingest's sizes back to back and awaits the three acks (the latency: the agent answers
/// then), then the job's `queued` event (its subject's first message), as ingest does, and
/// awaits its ack too; offered at `rate` a second (open loop, 16 senders paced as
/// `webhook_load_at`'s), on buckets and streams of their own.
pub async fn store_floor_at(nats: &impl NatsPeer, rate: f64, duration: Duration) -> Load {
    store_floor(nats, Some(rate), duration).await
}

/// [`store_floor_at`] in a closed loop: 16 senders, each sending its next delivery's writes
/// as soon as the last four are acknowledged; the store's own saturation rate and latency
/// beside the agent's closed loop.
pub async fn store_floor_closed(nats: &impl NatsPeer, duration: Duration) -> Load {
    store_floor(nats, None, duration).await
}

/// The HTTP floor of a closed loop: `connections` senders asking `GET url` (the agent's
/// `/healthz`) back to back, as [`webhook_load`] posts.
pub async fn probe_load(url: &str, connections: usize, duration: Duration) -> Load {
    load(url, connections, duration, false, 0, None, true).await
}

async fn store_floor(nats: &impl NatsPeer, rate: Option<f64>, duration: Duration) -> Load {
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client);
    let replicas = nats.replicas();
    // Streams as the agent's buckets are (one message per subject, file storage), its work
    // queue and its events; the KV API's own create is not used, as nats-server 2.9 refuses its
    // newer fields.
    let stream = |name: &str, subject: &str, work_queue: bool, one_per_subject: bool| {
        async_nats::jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{subject}.>")],
            retention: if work_queue {
                async_nats::jetstream::stream::RetentionPolicy::WorkQueue
            } else {
                async_nats::jetstream::stream::RetentionPolicy::Limits
            },
            max_messages_per_subject: if one_per_subject { 1 } else { 0 },
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        }
    };
    for (name, subject, work_queue, one_per_subject) in [
        ("FLOOR_DEDUP", "floor.dedup", false, true),
        ("FLOOR_RECORDS", "floor.records", false, true),
        ("FLOOR_JOBS", "floor.jobs", true, false),
        ("FLOOR_EVENTS", "floor.events", false, false),
    ] {
        js.get_or_create_stream(stream(name, subject, work_queue, one_per_subject))
            .await
            .unwrap_or_else(|e| panic!("stream {name}: {e}"));
    }
    let claim = bytes::Bytes::from(vec![b'c'; 80]);
    let record = bytes::Bytes::from(vec![b'r'; 650]);
    let job = bytes::Bytes::from(vec![b'j'; 520]);
    let event = bytes::Bytes::from(vec![b'e'; 290]);
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Keys of their own per run: a key created by an earlier run would fail its create.
    let run = rand::random::<u32>();
    let started = Instant::now();
    let deadline = started + duration;
    let senders = 16u64;
    let mut tasks = Vec::new();
    for sender in 0..senders {
        let (js, counter) = (js.clone(), counter.clone());
        let (claim, record, job, event) =
            (claim.clone(), record.clone(), job.clone(), event.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Latencies::default();
            let (mut ok, mut errors) = (0u64, 0u64);
            for k in 0u64.. {
                let sent = match rate {
                    Some(rate) => {
                        let due =
                            started + Duration::from_secs_f64((k * senders + sender) as f64 / rate);
                        if due >= deadline {
                            break;
                        }
                        paced_start(due).await
                    }
                    None if Instant::now() >= deadline => break,
                    None => Instant::now(),
                };
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let key = format!("{run}-{n}");
                let create = |bucket: &str, value: bytes::Bytes| {
                    infraflux_agent::store::publish_if_first(
                        &js,
                        format!("floor.{bucket}.{key}"),
                        value,
                    )
                };
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", key.as_str());
                let acks = async {
                    let a = create("dedup", claim.clone()).await?;
                    let b = create("records", record.clone()).await?;
                    let c = js
                        .publish_with_headers("floor.jobs.bench", headers, job.clone())
                        .await?;
                    a.await?;
                    b.await?;
                    c.await?;
                    // The agent answers here; its `queued` event follows.
                    let took = sent.elapsed();
                    create("events", event.clone()).await?.await?;
                    Ok::<_, async_nats::Error>(took)
                };
                match acks.await {
                    Ok(took) => {
                        lat.push(took);
                        ok += 1;
                    }
                    Err(_) => errors += 1,
                }
            }
            (ok, errors, lat)
        }));
    }
    let mut load = gather(tasks).await;
    load.seconds = duration.as_secs_f64();
    load
}

/// Waits for a paced request's due moment; returns the moment its latency counts from. A
/// sender still waiting for its last answer at `due` is late because of the system: the
/// latency counts from `due` (a stall is not hidden by the requests it delayed). One that
/// slept counts from its waking: how late the generator's own timer woke (tokio's is
/// millisecond-grained) is not the system's.
async fn paced_start(due: Instant) -> Instant {
    if due > Instant::now() {
        tokio::time::sleep_until(due.into()).await;
        Instant::now()
    } else {
        due
    }
}

/// One load from its senders' counts (answered, failed) and latencies; the caller sets its
/// seconds.
async fn gather(tasks: Vec<tokio::task::JoinHandle<(u64, u64, Latencies)>>) -> Load {
    let mut load = Load {
        requests: 0,
        errors: 0,
        seconds: 0.0,
        latencies: Latencies::default(),
    };
    for t in tasks {
        if let Ok((ok, errors, lat)) = t.await {
            load.requests += ok;
            load.errors += errors;
            load.latencies.extend(lat);
        }
    }
    load
}

/// Debian's `webhook` (adnanh/webhook) with a payload-hmac-sha256 rule running /bin/true.
pub struct WebhookTool {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl WebhookTool {
    pub async fn start() -> WebhookTool {
        let dir = tempfile::tempdir().expect("tempdir");
        let hooks = dir.path().join("hooks.json");
        let rule = serde_json::json!([{
            "id": "github",
            "execute-command": "/bin/true",
            "trigger-rule": {"match": {
                "type": "payload-hmac-sha256",
                "secret": WEBHOOK_SECRET,
                "parameter": {"source": "header", "name": "X-Hub-Signature-256"},
            }},
        }]);
        std::fs::write(&hooks, serde_json::to_vec(&rule).expect("json")).expect("hooks");
        let port = free_port();
        let child = Command::new("webhook")
            .args([
                "-hooks",
                &hooks.display().to_string(),
                "-ip",
                "127.0.0.1",
                "-port",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start webhook ({e}); apt-get install webhook"));
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        WebhookTool {
            child,
            url: format!("http://127.0.0.1:{port}/hooks/github"),
            _dir: dir,
        }
    }
}

impl Drop for WebhookTool {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Webhook ingest against the baseline; also returns the agent's peak RSS during the run.
pub async fn bench_ingest(
    nats: &impl NatsPeer,
    connections: usize,
    duration: Duration,
) -> (Load, Load, u64) {
    let (ours, peak) = bench_ingest_alone(nats, connections, duration).await;
    let tool = WebhookTool::start().await;
    webhook_load(&tool.url, connections, Duration::from_secs(1), false, 0).await;
    let theirs = webhook_load(&tool.url, connections, duration, false, 0).await;
    (ours, theirs, peak)
}

/// Waits until the agents' job queue holds no message, run or not (at most
/// `limit`); returns how long that took. A paced load measured behind a backlog measures the
/// runner draining it, not ingest beside jobs that run at the offered rate.
pub async fn queue_drained(nats: &impl NatsPeer, limit: Duration) -> Duration {
    let js = async_nats::jetstream::new(nats.client().await);
    let names = infraflux_agent::store::Names::new("infraflux");
    let started = Instant::now();
    while started.elapsed() < limit {
        let pending = async {
            // A work queue: a job's message stays until its run acknowledges it.
            let mut stream = js.get_stream(&names.jobs_stream).await.ok()?;
            Some(stream.info().await.ok()?.state.messages)
        }
        .await;
        if pending == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    started.elapsed()
}

/// Webhook ingest offered at `rate` a second to a fresh agent, after a second's warm-up.
pub async fn bench_ingest_at(nats: &impl NatsPeer, rate: f64, duration: Duration) -> Load {
    let agent = AgentProcess::start(nats, "ingest-paced", "", &[]).await;
    let url = format!("{}/webhooks/github", agent.http);
    webhook_load_at(&url, rate, Duration::from_secs(1), 2_000_000_000).await;
    webhook_load_at(&url, rate, duration, 3_000_000_000).await
}

/// Webhook ingest alone, and the agent's peak RSS.
pub async fn bench_ingest_alone(
    nats: &impl NatsPeer,
    connections: usize,
    duration: Duration,
) -> (Load, u64) {
    let agent = AgentProcess::start(nats, "ingest", "", &[]).await;
    // Warm both up, then measure.
    webhook_load(
        &format!("{}/webhooks/github", agent.http),
        connections,
        Duration::from_secs(1),
        true,
        1_000_000_000,
    )
    .await;
    let ours = webhook_load(
        &format!("{}/webhooks/github", agent.http),
        connections,
        duration,
        true,
        0,
    )
    .await;
    let (_, peak) = rss_kib(agent.pid());
    (ours, peak)
}

// ---------------------------------------------------------------------------------------------
// 2. ChatOps round trip

pub async fn bench_chatops(nats: &Nats, n: usize) -> (Latencies, Latencies) {
    let agent = AgentProcess::start(nats, "chatops", "", &[]).await;
    let client = nats.client().await;
    // The floor: a bare responder on the same server.
    let mut echo = client.subscribe("bench.echo").await.expect("subscribe");
    let responder = client.clone();
    tokio::spawn(async move {
        while let Some(m) = echo.next().await {
            if let Some(reply) = m.reply {
                let _ = responder.publish(reply, m.payload).await;
            }
        }
    });
    client.flush().await.expect("flush");
    let body = bytes::Bytes::from_static(br#"{"command":"status","requested_by":"bench"}"#);
    for _ in 0..20 {
        let _ = client.request("infraflux.cmd.status", body.clone()).await;
        let _ = client.request("bench.echo", body.clone()).await;
    }
    let (mut status, mut floor) = (Latencies::default(), Latencies::default());
    for _ in 0..n {
        let t = Instant::now();
        client
            .request("infraflux.cmd.status", body.clone())
            .await
            .expect("status reply");
        status.push(t.elapsed());
        let t = Instant::now();
        client
            .request("bench.echo", body.clone())
            .await
            .expect("echo");
        floor.push(t.elapsed());
    }
    drop(agent);
    (status, floor)
}

// ---------------------------------------------------------------------------------------------
// 3. Dispatch latency

/// Submits `n` jobs one at a time, `gap` apart; the time from the accepting reply to the
/// handler's start (the record's `started_at`). A gap shorter than a job's own store round
/// trips divided by `agent.concurrency` measures the queue, not the dispatch.
pub async fn bench_dispatch(
    nats: &impl NatsPeer,
    agents: usize,
    n: usize,
    gap: Duration,
) -> Latencies {
    // Jobs that take no time: the latency is the agent's (queue, lease, record), not a
    // kind's run, and jobs never wait behind `agent.concurrency`.
    let markers = tempfile::tempdir().expect("markers");
    let env = [
        ("IFX_TEST_MARKERS", markers.path().display().to_string()),
        ("IFX_TEST_SLEEP_MS", "0".to_string()),
    ];
    let mut running = Vec::new();
    for i in 0..agents {
        running.push(
            AgentProcess::start_test_agent(
                nats,
                &format!("dispatch-{i}"),
                &crate::acceptance_stand_in(),
                &env,
            )
            .await,
        );
    }
    let client = nats.client().await;
    let kv = async_nats::jetstream::new(client.clone())
        .get_key_value("infraflux-jobs")
        .await
        .expect("records");
    let mut accepted: Vec<(String, chrono::DateTime<Utc>)> = Vec::new();
    for _ in 0..n {
        let reply = client
            .request("infraflux.cmd.acceptance", "acceptance".into())
            .await
            .expect("reply");
        let at = Utc::now();
        let v: Value = serde_json::from_slice(&reply.payload).expect("json");
        if let Some(id) = v["job_id"].as_str() {
            accepted.push((id.to_string(), at));
        }
        tokio::time::sleep(gap).await;
    }
    // Every accepted job's start, waiting (up to a minute) for those still queued.
    let mut lat = Latencies::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    let accepted_ids = accepted.clone();
    for (id, at) in accepted {
        loop {
            let started = match kv.get(&id).await {
                Ok(Some(bytes)) => serde_json::from_slice::<Value>(&bytes).ok().and_then(|r| {
                    r["started_at"]
                        .as_str()
                        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                }),
                _ => None,
            };
            if let Some(started) = started {
                lat.push(
                    (started.with_timezone(&Utc) - at)
                        .to_std()
                        .unwrap_or_default(),
                );
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Where a job's time goes once started: its run (the handler and the store writes
    // around it), and how many needed a second attempt. Printed, for reading the latency.
    let mut runs = Latencies::default();
    let mut again = 0;
    let times = |r: &Value, field: &str| {
        r[field]
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
    };
    for (id, _) in &accepted_ids {
        if let Ok(Some(bytes)) = kv.get(id).await
            && let Ok(r) = serde_json::from_slice::<Value>(&bytes)
        {
            if let (Some(start), Some(end)) = (times(&r, "started_at"), times(&r, "finished_at")) {
                runs.push((end - start).to_std().unwrap_or_default());
            }
            again += usize::from(r["attempts"].as_u64().unwrap_or(0) > 1);
        }
    }
    eprintln!(
        "dispatch with {agents} agent(s): run time (started to ended) p50 {:.1} ms, p99 {:.1} ms over {} jobs; {again} needed more than one attempt",
        runs.ms(0.5),
        runs.ms(0.99),
        runs.len()
    );
    drop(running);
    lat
}

// ---------------------------------------------------------------------------------------------
// 3b. Limits under load, and the cluster

pub struct Burst {
    pub deliveries: usize,
    pub accepted: usize,
    pub refused: usize,
    /// Neither 202 nor 503: a connection that failed or timed out.
    pub failed: usize,
    pub seconds: f64,
    pub rss_before_kib: u64,
    pub peak_rss_kib: u64,
    pub peak_fds: usize,
    pub fds_before: usize,
    pub fds_after: usize,
    pub peak_threads: u64,
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// `deliveries` signed pushes sent at the same moment, each on its own connection: what the
/// agent answers (202, or 503 beyond `max_in_flight`; connections beyond `max_connections`
/// wait in the accept queue) and the most memory, file descriptors and threads it used.
pub async fn bench_burst(nats: &impl NatsPeer, deliveries: usize) -> Burst {
    let agent = AgentProcess::start(nats, "burst", "", &[]).await;
    let pid = agent.pid();
    let url = format!("{}/webhooks/github", agent.http);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_before, _) = rss_kib(pid);
    let fds_before = open_fds(pid);
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let (mut fds, mut threads) = (0usize, 0u64);
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                fds = fds.max(open_fds(pid));
                threads = threads.max(status_kib(pid, ["Threads:"])[0]);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (fds, threads)
        })
    };
    let template = PushTemplate::new();
    let client = reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client");
    let started = Instant::now();
    let statuses = futures::future::join_all((0..deliveries).map(|n| {
        let body = template.body(7_000_000_000 + n as u64);
        let signature = sign(WEBHOOK_SECRET, &body);
        let request = client
            .post(&url)
            .header("Content-Type", "application/json")
            .header("X-GitHub-Event", "push")
            .header("X-GitHub-Delivery", format!("burst-{n}"))
            .header("X-Hub-Signature-256", signature)
            .body(body);
        async move { request.send().await.map_or(0, |r| r.status().as_u16()) }
    }))
    .await;
    let seconds = started.elapsed().as_secs_f64();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let (peak_fds, peak_threads) = sampler.await.unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let count = |code: u16| statuses.iter().filter(|s| **s == code).count();
    Burst {
        deliveries,
        accepted: count(202),
        refused: count(503),
        failed: statuses.iter().filter(|s| **s != 202 && **s != 503).count(),
        seconds,
        rss_before_kib: rss_before,
        peak_rss_kib: rss_kib(pid).1,
        peak_fds,
        fds_before,
        fds_after: open_fds(pid),
        peak_threads,
    }
}

pub fn burst_rows(b: &Burst) -> Vec<Row> {
    vec![
        Row::new(
            &format!("burst of {} deliveries at once: answers", b.deliveries),
            format!(
                "{} × 202, {} × 503 (retry), {} failed, in {:.1} s",
                b.accepted, b.refused, b.failed, b.seconds
            ),
            "—".into(),
            "—".into(),
            "202 or 503, none lost",
            Some(b.failed == 0),
        ),
        Row::new(
            "burst: agent RSS before / peak",
            format!(
                "{:.1} / {:.1} MiB",
                mib(b.rss_before_kib),
                mib(b.peak_rss_kib)
            ),
            "—".into(),
            "—".into(),
            "< 64 MiB",
            Some(mib(b.peak_rss_kib) < 64.0),
        ),
        Row::new(
            "burst: agent open files before / peak / after; threads peak",
            format!(
                "{} / {} / {}; {} threads",
                b.fds_before, b.peak_fds, b.fds_after, b.peak_threads
            ),
            "—".into(),
            "—".into(),
            "≤ max_connections (512) + 64",
            Some(b.peak_fds <= 512 + 64),
        ),
    ]
}

/// A dispatch figure against its target.
fn dispatch_row(figure: &str, lat: &Latencies) -> Row {
    Row::new(
        figure,
        format!(
            "{:.2} / {:.2} ms ({} jobs)",
            lat.ms(0.5),
            lat.ms(0.99),
            lat.len()
        ),
        "—".into(),
        "—".into(),
        "p99 < 10 ms",
        Some(lat.ms(0.99) < 10.0),
    )
}

/// Ingest and dispatch against a 3-server cluster with `replicas = 3`, beside the
/// single-server ingest figure when given.
pub async fn run_cluster(
    quick: bool,
    connections: usize,
    duration: Duration,
    single_server: Option<&Load>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    eprintln!("bench: webhook ingest on a 3-server cluster, replicas = 3");
    let cluster = NatsCluster::start().await;
    let (load, _) = bench_ingest_alone(&cluster, connections, duration).await;
    drop(cluster);
    let baseline = |f: &dyn Fn(&Load) -> String| single_server.map_or("—".into(), f);
    rows.push(Row::new(
        "cluster (3 servers, replicas 3): webhook ingest",
        format!("{:.0} req/s ({} errors)", load.rate(), load.errors),
        baseline(&|s| format!("{:.0} req/s (one server)", s.rate())),
        single_server.map_or("—".into(), |s| format!("{:.2}×", load.rate() / s.rate())),
        "(observed)",
        None,
    ));
    rows.push(Row::new(
        "cluster: webhook ingest latency p50 / p99",
        format!(
            "{:.2} / {:.2} ms",
            load.latencies.ms(0.5),
            load.latencies.ms(0.99)
        ),
        baseline(&|s| {
            format!(
                "{:.2} / {:.2} ms (one server)",
                s.latencies.ms(0.5),
                s.latencies.ms(0.99)
            )
        }),
        "—".into(),
        "(observed)",
        None,
    ));
    for agents in [1, 3] {
        eprintln!("bench: dispatch latency on the cluster, {agents} agent(s)");
        let cluster = NatsCluster::start().await;
        // Each job's record, event and lock writes go through Raft on three servers: spaced
        // wider than on one server, so that the figure is the dispatch, not a queue.
        let lat = bench_dispatch(
            &cluster,
            agents,
            if quick { 100 } else { 300 },
            Duration::from_millis(50),
        )
        .await;
        rows.push(dispatch_row(
            &format!("cluster: dispatch latency, {agents} agent(s), a job every 50 ms, p50 / p99"),
            &lat,
        ));
    }
    rows
}

// ---------------------------------------------------------------------------------------------
// 4. Footprint

pub struct Footprint {
    pub ready: Duration,
    pub idle_rss_kib: u64,
    /// Heap and stacks (`RssAnon`) and mapped files, mostly the binary's code (`RssFile`).
    pub idle_anon_kib: u64,
    pub idle_file_kib: u64,
    pub idle_cpu_percent: f64,
}

pub async fn bench_footprint(nats: &Nats, schedules: usize, idle: Duration) -> Footprint {
    let mut extra = crate::acceptance_stand_in();
    for i in 0..schedules {
        extra.push_str(&format!(
            "\n[[schedules]]\nname = \"s{i}\"\ncron = \"{} {} {} * * *\"\ntimezone = \"Europe/Berlin\"\ncommand = \"acceptance\"\n",
            i % 60,
            (i / 60) % 60,
            (i / 3600 + 3) % 24
        ));
    }
    let agent = AgentProcess::start(nats, "footprint", &extra, &[]).await;
    // Let every schedule load its cursor, then watch it idle.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let cpu_before = cpu_time(agent.pid());
    let t = Instant::now();
    tokio::time::sleep(idle).await;
    let cpu = cpu_time(agent.pid()) - cpu_before;
    let (rss, _) = rss_kib(agent.pid());
    let (anon, file) = rss_parts_kib(agent.pid());
    Footprint {
        ready: agent.ready_after,
        idle_rss_kib: rss,
        idle_anon_kib: anon,
        idle_file_kib: file,
        idle_cpu_percent: cpu.as_secs_f64() / t.elapsed().as_secs_f64() * 100.0,
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Snapshot streaming

pub struct Streamed {
    pub seconds: f64,
    pub peak_rss_kib: u64,
}

/// An etcd-snapshot-shaped stream of `size` bytes through the agent into the S3 server.
pub async fn bench_snapshot(nats: &Nats, s3: &S3Server, size: u64) -> Streamed {
    let talos = FakeTalos::start(SnapshotSource::Synthetic { size }, &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let talosconfig = dir.path().join("talosconfig");
    std::fs::write(&talosconfig, talos.talosconfig()).expect("talosconfig");
    let extra = format!(
        "[talos]\ntalosconfig = \"{}\"\ncluster = \"bench\"\n\n[s3]\nendpoint = \"{}\"\naccess_key_id = \"env:BENCH_KEY\"\nsecret_access_key = \"env:BENCH_SECRET\"\n\n[etcd_snapshot]\nbucket = \"etcd\"\nprefix = \"{}/\"\ncompression = \"none\"\nmin_size_ratio = 0.0\ntimeout = \"1h\"\n",
        talosconfig.display(),
        s3.endpoint,
        size
    );
    let env = [
        ("BENCH_KEY", "bench".to_string()),
        ("BENCH_SECRET", "bench-secret".to_string()),
    ];
    let agent = AgentProcess::start(nats, &format!("snap-{size}"), &extra, &env).await;
    let client = nats.client().await;
    let started = Instant::now();
    let job = crate::submit(&client, "snapshot").await;
    let done = loop {
        let r = crate::record(&client, &job).await;
        if matches!(
            r["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(done["state"], "succeeded", "{done}");
    let (_, peak) = rss_kib(agent.pid());
    Streamed {
        seconds,
        peak_rss_kib: peak,
    }
}

/// `aws s3 cp` of a file of the same size to the same server: the baseline.
pub async fn bench_awscli(s3: &S3Server, size: u64) -> f64 {
    // The same kind of bytes the fake Talos server makes, made while aws reads them from a
    // pipe: both sides get their bytes generated on the fly by this process.
    let started = Instant::now();
    let mut child = Command::new("aws")
        .args([
            "s3",
            "cp",
            "--only-show-errors",
            "--endpoint-url",
            &s3.endpoint,
            "-",
        ])
        .arg(format!("s3://etcd/awscli/{size}.bin"))
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench-secret")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run aws ({e}); pip install awscli"));
    let mut stdin = child.stdin.take().expect("stdin");
    let status = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            for b in buf.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = (state >> 24) as u8;
            }
            let n = left.min(buf.len() as u64) as usize;
            stdin.write_all(&buf[..n]).expect("write to aws");
            left -= n as u64;
        }
        drop(stdin);
        child.wait().expect("aws")
    })
    .await
    .expect("aws task");
    assert!(status.success(), "aws s3 cp failed");
    started.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// 6. Growth

pub struct Growth {
    pub drain_jobs_per_second: f64,
    pub drain_peak_rss_kib: u64,
    pub ingest: Load,
    pub dispatch: Latencies,
    pub records: usize,
}

/// 10,000 jobs queued before the agent starts (and their records), then: how fast the agent
/// drains them and how much memory that takes; then ingest and dispatch with that history.
pub async fn bench_growth(
    nats: &Nats,
    jobs: usize,
    connections: usize,
    duration: Duration,
) -> Growth {
    let client = nats.client().await;
    // Queue the jobs through the real ingest path, with no agent running.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        agent_config(
            &nats.url,
            "preload",
            &dir.path().join("state"),
            &crate::acceptance_stand_in(),
        ),
    )
    .expect("config");
    let loaded = infraflux_agent::Config::load(&path, test_env()).expect("config");
    let store = infraflux_agent::store::bootstrap(client.clone(), &loaded.config)
        .await
        .expect("bootstrap");
    let records = infraflux_agent::records::Records::new(
        store.records.clone(),
        store.js.clone(),
        store.names.clone(),
        store.state.clone(),
    );
    // No agent is seen by this status cache: claims are written before the jobs.
    let ingest = infraflux_agent::ingest::Ingestor::new(
        store.clone(),
        &records,
        infraflux_agent::StatusCache::default(),
    );
    futures::stream::iter(0..jobs)
        .for_each_concurrent(64, |i| {
            let ingest = ingest.clone();
            async move {
                let envelope = infraflux_handlers::JobEnvelope {
                    job_id: infraflux_handlers::new_job_id(),
                    kind: infraflux_handlers::JobKind::ACCEPTANCE,
                    params: Default::default(),
                    source: infraflux_handlers::Source::Chatops,
                    requested_by: "bench".into(),
                    idempotency_key: format!("bench.preload.{i}"),
                    traceparent: None,
                    commit: None,
                    created_at: Utc::now(),
                };
                let _ = ingest.submit(envelope).await;
            }
        })
        .await;
    // Jobs that take no time (the test agent's markers): the drain measures the agent's work
    // per job, not the stand-in acceptance checks against a cluster that is not there.
    let markers = tempfile::tempdir().expect("markers");
    let env = [
        ("IFX_TEST_MARKERS", markers.path().display().to_string()),
        ("IFX_TEST_SLEEP_MS", "0".to_string()),
    ];
    let agent =
        AgentProcess::start_test_agent(nats, "growth", &crate::acceptance_stand_in(), &env).await;
    let started = Instant::now();
    loop {
        let info = store.consumer.get_info().await.expect("consumer");
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain = jobs as f64 / started.elapsed().as_secs_f64();
    let (_, peak) = rss_kib(agent.pid());
    let ingest_load = webhook_load(
        &format!("{}/webhooks/github", agent.http),
        connections,
        duration,
        true,
        5_000_000_000,
    )
    .await;
    // The pushes made reconcile jobs (failed here: no [reconcile]); let them drain first, so
    // dispatch is measured with a long history, not behind a long queue.
    let drained_by = Instant::now() + Duration::from_secs(300);
    while Instant::now() < drained_by {
        let info = store.consumer.get_info().await.expect("consumer");
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(agent);
    let dispatch = bench_dispatch(nats, 1, 100, Duration::from_millis(5)).await;
    Growth {
        drain_jobs_per_second: drain,
        drain_peak_rss_kib: peak,
        ingest: ingest_load,
        dispatch,
        records: jobs,
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Secret scan

pub struct SecretScan {
    pub files: usize,
    pub bytes: u64,
    pub findings: usize,
    /// The median scan.
    pub scan: Duration,
    /// The median of the same walk reading every file, searching nothing: the floor.
    pub read_only: Duration,
    pub runs: usize,
}

impl SecretScan {
    pub fn files_per_second(&self) -> f64 {
        self.files as f64 / self.scan.as_secs_f64()
    }

    pub fn mib(&self) -> f64 {
        self.bytes as f64 / 1048576.0
    }
}

/// One file of a generated infra repository, about `size` bytes: Terraform with references to
/// its secrets (`var.`, `data.`), Kubernetes and Talos YAML, Markdown that names token prefixes.
/// Each kind of file comes close to a rule without matching it, so the patterns do real work.
fn generated_file(kind: usize, n: usize, size: usize) -> (String, String) {
    let mut out = String::with_capacity(size + 512);
    let mut i = 0;
    let (path, block): (String, fn(usize, usize) -> String) = match kind % 3 {
        0 => (
            format!("terraform/modules/m{}/main_{n}.tf", n % 40),
            |n, i| {
                format!(
                    "resource \"proxmox_virtual_environment_vm\" \"vm_{n}_{i}\" {{\n  node_name = \"pve-{i}\"\n  vm_id     = {}\n  smbios {{ uuid = \"5b0a9ad6-2f7d-4d2c-9f3e-0d2a7b1c{:04x}\" }}\n  initialization {{\n    user_account {{\n      password = data.onepassword_item.vm.password\n    }}\n  }}\n}}\n\nprovider \"minio\" {{\n  alias      = \"m{i}\"\n  secret_key = var.minio_secret_key\n}}\n\n",
                    1000 + i,
                    i % 65536
                )
            },
        ),
        1 => (
            format!("kubernetes/apps/app{}/manifest_{n}.yaml", n % 60),
            |n, i| {
                format!(
                    "---\napiVersion: external-secrets.io/v1beta1\nkind: ExternalSecret\nmetadata:\n  name: app-{n}-{i}\nspec:\n  secretStoreRef:\n    name: onepassword\n  data:\n    - secretKey: MINIO_ROOT_PASSWORD\n      remoteRef:\n        key: minio-{i}\n        property: password\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg-{i}\ndata:\n  token: ${{TOKEN}}\n  ca.crt: LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0t\n"
                )
            },
        ),
        _ => (format!("docs/runbook_{n}.md"), |n, i| {
            format!(
                "## Step {i} of runbook {n}\n\nRotate the `ghp_` token and the `AKIA` key in 1Password, never in Git; the \nkubeconfig's `client-key-data:` stays on the admin's machine. Run `talosctl gen secrets` \nonly on a workstation, and keep `-----BEGIN` blocks out of this repository.\n\n"
            )
        }),
    };
    while out.len() < size {
        out.push_str(&block(n, i));
        i += 1;
    }
    (path, out)
}

/// A repository of `files` files of 1–8 KiB (a fixed pseudo-random mix of .tf, .yaml and .md),
/// scanned `runs` times; and the same walk reading the files without searching them, as the
/// floor. The files are in the page cache, as a fresh checkout's are.
pub fn bench_secret_scan(files: usize, runs: usize) -> SecretScan {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for n in 0..files {
        // xorshift: the same repository every run.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let size = 1024 + (seed % (7 * 1024)) as usize;
        let (path, content) = generated_file(n, n, size);
        let file = dir.path().join(path);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
        std::fs::write(file, content).expect("write");
    }
    let mut scans = Vec::new();
    let mut reads = Vec::new();
    let mut report = None;
    for _ in 0..runs {
        let started = Instant::now();
        let bytes = read_every_file(dir.path());
        reads.push(started.elapsed());
        std::hint::black_box(bytes);
        let started = Instant::now();
        let r = infraflux_handlers::reconcile::secret_scan::scan(dir.path()).expect("scan");
        scans.push(started.elapsed());
        report = Some(r);
    }
    let report = report.expect("at least one run");
    let median = |mut v: Vec<Duration>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    SecretScan {
        files: report.files,
        bytes: report.bytes,
        findings: report.findings.len(),
        scan: median(scans),
        read_only: median(reads),
        runs,
    }
}

fn read_every_file(dir: &std::path::Path) -> u64 {
    let mut bytes = 0;
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let entry = entry.expect("entry");
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            bytes += read_every_file(&entry.path());
        } else if kind.is_file() {
            bytes += std::fs::read(entry.path()).expect("read").len() as u64;
        }
    }
    bytes
}

/// The table row of a secret scan benchmark.
pub fn secret_scan_row(s: &SecretScan) -> Row {
    Row::new(
        &format!("secret scan, {} files ({:.1} MiB)", s.files, s.mib()),
        format!(
            "{:.0} ms (median of {}; {:.0} files/s, {:.0} MiB/s; {} findings)",
            s.scan.as_secs_f64() * 1000.0,
            s.runs,
            s.files_per_second(),
            s.mib() / s.scan.as_secs_f64(),
            s.findings
        ),
        format!(
            "{:.0} ms (the same walk reading every file)",
            s.read_only.as_secs_f64() * 1000.0
        ),
        format!("{:.2}×", s.scan.as_secs_f64() / s.read_only.as_secs_f64()),
        "< 1 s",
        Some(s.scan < Duration::from_secs(1)),
    )
}

// ---------------------------------------------------------------------------------------------
// 8. etcd restore drill

pub struct EtcdDrillBench {
    /// The etcd snapshot file (trailer included) and what the snapshot job stored of it.
    pub snapshot_bytes: u64,
    pub stored_bytes: u64,
    pub keys: u64,
    /// The drill's own RTO (download start to the keys read) and the whole job, submit to end.
    pub drill_rto: f64,
    pub drill_job: f64,
    pub drill_peak_rss_kib: u64,
    /// The same steps by hand, one after the other: download, decrypt+decompress, restore,
    /// serve and read.
    pub floor: [f64; 4],
}

impl EtcdDrillBench {
    pub fn floor_total(&self) -> f64 {
        self.floor.iter().sum()
    }
}

/// One MiB values for the bench's etcd: half pseudo-random bytes, half repeated text, so the
/// snapshot compresses about as much as a cluster's protobuf objects do (neither nothing nor
/// everything).
fn drill_value(i: u64) -> Vec<u8> {
    let mut value = Vec::with_capacity(1 << 20);
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15 ^ i.wrapping_mul(0x2545_f491_4f6c_dd1d);
    while value.len() < 1 << 19 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        value.extend_from_slice(&state.to_le_bytes());
    }
    let text = format!(
        "{{\"kind\":\"ConfigMap\",\"apiVersion\":\"v1\",\"metadata\":{{\"name\":\"bench-{i}\",\"namespace\":\"default\"}}}}\n"
    );
    while value.len() < 1 << 20 {
        value.extend_from_slice(text.as_bytes());
    }
    value.truncate(1 << 20);
    value
}

/// Until the job ends; its record.
async fn settled(client: &async_nats::Client, job: &str) -> Value {
    loop {
        let r = crate::record(client, job).await;
        if matches!(
            r["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The etcd drill of a real snapshot of about `size` bytes, stored by the real snapshot job
/// (zstd, age), against the same steps by hand measured in the same run.
pub async fn bench_etcd_drill(nats: &Nats, s3: &S3Server, size: u64) -> EtcdDrillBench {
    use crate::peers::{Etcd, restore_snapshot};
    let dir = tempfile::tempdir().expect("tempdir");
    // A real etcd filled through its API: `snapshot restore` and a real etcd must accept what
    // the drill restores, which a padded or synthetic file would not be.
    let snapshot = dir.path().join("snapshot.db");
    let values = (size >> 20).max(1);
    {
        let source = dir.path().join("source");
        let etcd = Etcd::start(&source, "bench", free_port()).await;
        etcd.put("/registry/namespaces/default", "default");
        etcd.put("/registry/namespaces/kube-system", "kube-system");
        for i in 0..values {
            etcd.put_bytes(
                &format!("/registry/configmaps/default/bench-{i:06}"),
                &drill_value(i),
            );
            if i % 128 == 127 {
                eprintln!("bench: etcd filled with {} MiB", i + 1);
            }
        }
        etcd.snapshot(&snapshot);
        drop(etcd);
        let _ = std::fs::remove_dir_all(&source);
    }
    let snapshot_bytes = std::fs::metadata(&snapshot).map_or(0, |m| m.len());
    let talos = FakeTalos::start(SnapshotSource::File(snapshot.clone()), &[]).await;
    let talosconfig = dir.path().join("talosconfig");
    std::fs::write(&talosconfig, talos.talosconfig()).expect("talosconfig");
    let identity = age::x25519::Identity::generate();
    let identity_text = {
        use age::secrecy::ExposeSecret;
        identity.to_string().expose_secret().to_string()
    };
    let extra = format!(
        "[talos]\ntalosconfig = \"{}\"\ncluster = \"bench\"\n\n[s3]\nendpoint = \"{}\"\naccess_key_id = \"env:BENCH_KEY\"\nsecret_access_key = \"env:BENCH_SECRET\"\n\n[etcd_snapshot]\nbucket = \"etcd\"\nprefix = \"drill/\"\ncompression = \"zstd\"\nage_recipients = [\"{}\"]\nmin_size_ratio = 0.0\ntimeout = \"1h\"\n\n[restore_drill]\nage_identity = \"env:BENCH_AGE_IDENTITY\"\ntimeout = \"2h\"\n",
        talosconfig.display(),
        s3.endpoint,
        identity.to_public()
    );
    let env = [
        ("BENCH_KEY", "bench".to_string()),
        ("BENCH_SECRET", "bench-secret".to_string()),
        ("BENCH_AGE_IDENTITY", identity_text.clone()),
    ];
    let client = nats.client().await;
    let key = {
        let snapper = AgentProcess::start(nats, "drill-snapshot", &extra, &env).await;
        let job = crate::submit(&client, "snapshot").await;
        let done = settled(&client, &job).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        drop(snapper);
        done["result"]["object"]
            .as_str()
            .expect("object key")
            .to_string()
    };
    let _ = std::fs::remove_file(&snapshot);
    drop(talos);

    // A fresh agent: its peak RSS is the drill's alone.
    let driller = AgentProcess::start(nats, "drill", &extra, &env).await;
    let started = Instant::now();
    let job = crate::submit(&client, "drill etcd").await;
    let done = settled(&client, &job).await;
    let drill_job = started.elapsed().as_secs_f64();
    assert_eq!(done["state"], "succeeded", "{done}");
    let target = &done["result"]["targets"][0];
    let (_, drill_peak_rss_kib) = rss_kib(driller.pid());
    drop(driller);
    let keys = target["checks"]
        .as_array()
        .and_then(|c| {
            c.iter().find_map(|c| {
                c["name"]
                    .as_str()?
                    .strip_prefix("registry keys: ")?
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0);

    // The floor, by hand: aws s3 cp, decryption and decompression in a process of its own
    // (no age binary here: the same crates, see `decrypt_file`), etcdctl snapshot restore,
    // then etcd started on the result and the same key count read.
    let stored = dir.path().join("stored.db.zst.age");
    let t = Instant::now();
    let status = Command::new("aws")
        .args([
            "s3",
            "cp",
            "--only-show-errors",
            "--endpoint-url",
            &s3.endpoint,
        ])
        .arg(format!("s3://etcd/{key}"))
        .arg(&stored)
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench-secret")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .status()
        .unwrap_or_else(|e| panic!("cannot run aws ({e}); pip install awscli"));
    assert!(status.success(), "aws s3 cp failed");
    let download = t.elapsed().as_secs_f64();
    let stored_bytes = std::fs::metadata(&stored).map_or(0, |m| m.len());
    let identity_file = dir.path().join("identity.txt");
    std::fs::write(&identity_file, &identity_text).expect("identity file");
    let restored_file = dir.path().join("restored.db");
    let t = Instant::now();
    let status = Command::new(std::env::current_exe().expect("this binary"))
        .args(["decrypt", "--identity"])
        .arg(&identity_file)
        .arg("--in")
        .arg(&stored)
        .arg("--out")
        .arg(&restored_file)
        .status()
        .expect("the decrypt floor");
    assert!(status.success(), "decrypting by hand failed");
    let decrypt = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&stored);
    let data_dir = dir.path().join("restored-etcd");
    let peer = free_port();
    let t = Instant::now();
    restore_snapshot(&restored_file, &data_dir, "bench", peer).expect("etcdctl snapshot restore");
    let restore = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&restored_file);
    let t = Instant::now();
    let etcd = Etcd::start(&data_dir, "bench", peer).await;
    let floor_keys = etcd.count("/registry/");
    let serve = t.elapsed().as_secs_f64();
    assert_eq!(
        floor_keys, keys,
        "the drill and the floor read the same data"
    );
    drop(etcd);
    EtcdDrillBench {
        snapshot_bytes,
        stored_bytes,
        keys,
        drill_rto: target["rto_seconds"].as_f64().unwrap_or(f64::NAN),
        drill_job,
        drill_peak_rss_kib,
        floor: [download, decrypt, restore, serve],
    }
}

/// The floor's decryption: age, then zstd, file to file, streaming, in a process of its own.
pub fn decrypt_file(
    identity_file: &std::path::Path,
    input: &std::path::Path,
    output: &std::path::Path,
) -> std::io::Result<u64> {
    use std::io::{BufReader, BufWriter};
    let text = std::fs::read_to_string(identity_file)?;
    let identity: age::x25519::Identity = text
        .lines()
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no age identity in the file"))?;
    let decryptor = age::Decryptor::new_buffered(BufReader::with_capacity(
        1 << 20,
        std::fs::File::open(input)?,
    ))
    .map_err(std::io::Error::other)?;
    let reader = decryptor
        .decrypt(std::iter::once(&identity as &dyn age::Identity))
        .map_err(std::io::Error::other)?;
    let mut decoder = zstd::stream::read::Decoder::new(reader)?;
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(output)?);
    let n = std::io::copy(&mut decoder, &mut out)?;
    std::io::Write::flush(&mut out)?;
    Ok(n)
}

/// The drill's rows of the table.
pub fn etcd_drill_rows(b: &EtcdDrillBench) -> Vec<Row> {
    let floor = b.floor_total();
    let ratio = b.drill_rto / floor;
    vec![
        Row::new(
            &format!(
                "etcd drill, {} MiB snapshot ({} MiB stored, {} keys)",
                b.snapshot_bytes >> 20,
                b.stored_bytes >> 20,
                b.keys
            ),
            format!(
                "{:.1} s RTO ({:.1} s the whole job)",
                b.drill_rto, b.drill_job
            ),
            format!(
                "{floor:.1} s by hand (aws s3 cp {:.1} + decrypt {:.1} + restore {:.1} + serve and read {:.1})",
                b.floor[0], b.floor[1], b.floor[2], b.floor[3]
            ),
            format!("{ratio:.2}×"),
            "≤ 1.2×",
            Some(ratio <= 1.2),
        ),
        Row::new(
            "agent peak RSS during the etcd drill",
            format!("{:.1} MiB", mib(b.drill_peak_rss_kib)),
            "—".into(),
            "—".into(),
            "< 64 MiB",
            Some(mib(b.drill_peak_rss_kib) < 64.0),
        ),
    ]
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------
// Rolling upgrade: the agent's own time per node

/// A rollout of the five-node lab by an agent process; what the fake nodes spent rebooting is
/// taken out, what is left is the agent's (and the fakes' API answers').
pub struct UpgradeBench {
    pub nodes: usize,
    pub total: Duration,
    /// The sum of the nodes' down intervals (one node down at a time).
    pub rebooting: Duration,
}

impl UpgradeBench {
    pub fn per_node(&self) -> Duration {
        self.total.saturating_sub(self.rebooting) / self.nodes.max(1) as u32
    }
}

pub async fn bench_upgrade(reboot: Duration) -> UpgradeBench {
    use crate::upgrade_lab::{S3_ENV, TARGET, upgrade_lab};
    let lab = upgrade_lab(["v1.12.5"; 5], "soak = \"0s\"\n").await;
    lab.set_reboot_duration(reboot);
    let env: Vec<(&str, String)> = S3_ENV.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let _agent = AgentProcess::start(&lab.nats, "bench-upgrade", &lab.toml, &env).await;
    let started = Instant::now();
    let done = lab.run(&format!("upgrade talos {TARGET}")).await;
    let total = started.elapsed();
    assert_eq!(
        done["state"], "succeeded",
        "the benchmark's rollout failed: {done}"
    );
    let rebooting = lab.rebooting();
    UpgradeBench {
        nodes: lab.upgraded().len(),
        total,
        rebooting,
    }
}

pub fn upgrade_row(b: &UpgradeBench) -> Row {
    let per_node = b.per_node().as_secs_f64();
    Row::new(
        "rolling upgrade, agent time per node (5 nodes)",
        format!("{per_node:.2} s"),
        format!(
            "{:.1} s rollout, {:.1} s of it rebooting",
            b.total.as_secs_f64(),
            b.rebooting.as_secs_f64()
        ),
        "—".into(),
        "< 5 s",
        Some(per_node < 5.0),
    )
}

/// Run every benchmark; the table rows.
pub async fn run_all(quick: bool) -> Vec<Row> {
    let mut rows = Vec::new();
    let (duration, snapshot_sizes, growth_jobs): (Duration, Vec<u64>, usize) = if quick {
        (Duration::from_secs(3), vec![64 << 20, 256 << 20], 1000)
    } else {
        (Duration::from_secs(10), vec![1 << 30, 4 << 30], 10_000)
    };
    let connections = 16;

    eprintln!("bench: webhook ingest ({connections} connections, {duration:?} each)");
    let nats = Nats::start();
    let (ours, theirs, peak) = bench_ingest(&nats, connections, duration).await;
    let ratio = ours.rate() / theirs.rate();
    rows.push(Row::new(
        "webhook ingest, signed pushes stored durably",
        format!("{:.0} req/s ({} errors)", ours.rate(), ours.errors),
        format!("{:.0} req/s (webhook 2.8, /bin/true)", theirs.rate()),
        format!("{ratio:.2}×"),
        "≥ 3×",
        Some(ratio >= 3.0),
    ));
    rows.push(Row::new(
        "webhook ingest latency p50 / p99",
        format!(
            "{:.2} / {:.2} ms",
            ours.latencies.ms(0.5),
            ours.latencies.ms(0.99)
        ),
        format!(
            "{:.2} / {:.2} ms",
            theirs.latencies.ms(0.5),
            theirs.latencies.ms(0.99)
        ),
        format!(
            "{:.2}×",
            ours.latencies.ms(0.99) / theirs.latencies.ms(0.99)
        ),
        "p99 < 5 ms",
        Some(ours.latencies.ms(0.99) < 5.0),
    ));
    // The same agent offered a fixed rate, as GitHub sends (the closed loop above measures
    // the queue at saturation); far above any lab's push rate.
    let paced = bench_ingest_at(&nats, 1000.0, duration).await;
    rows.push(Row::new(
        "webhook ingest latency at 1,000 req/s offered (open loop) p50 / p99",
        format!(
            "{:.2} / {:.2} ms ({} errors)",
            paced.latencies.ms(0.5),
            paced.latencies.ms(0.99),
            paced.errors
        ),
        "—".into(),
        "—".into(),
        "p99 < 5 ms",
        Some(paced.errors == 0 && paced.latencies.ms(0.99) < 5.0),
    ));
    rows.push(Row::new(
        "agent RSS during ingest (peak)",
        format!("{:.1} MiB", mib(peak)),
        "—".into(),
        "—".into(),
        "< 40 MiB",
        Some(mib(peak) < 40.0),
    ));
    drop(nats);

    rows.extend(run_cluster(quick, connections, duration, Some(&ours)).await);

    let deliveries = if quick { 1000 } else { 5000 };
    eprintln!("bench: a burst of {deliveries} deliveries at once");
    let nats = Nats::start();
    rows.extend(burst_rows(&bench_burst(&nats, deliveries).await));
    drop(nats);

    eprintln!("bench: ChatOps round trip");
    let nats = Nats::start();
    let (status, floor) = bench_chatops(&nats, if quick { 200 } else { 1000 }).await;
    let ratio = status.ms(0.99) / floor.ms(0.99);
    rows.push(Row::new(
        "ChatOps `status` round trip p50 / p99",
        format!("{:.2} / {:.2} ms", status.ms(0.5), status.ms(0.99)),
        format!(
            "{:.2} / {:.2} ms (bare NATS echo)",
            floor.ms(0.5),
            floor.ms(0.99)
        ),
        format!("{ratio:.2}× (p99)"),
        "≤ 1.5×",
        Some(ratio <= 1.5),
    ));
    drop(nats);

    for agents in [1, 3] {
        eprintln!("bench: dispatch latency, {agents} agent(s)");
        let nats = Nats::start();
        let lat = bench_dispatch(
            &nats,
            agents,
            if quick { 100 } else { 300 },
            Duration::from_millis(5),
        )
        .await;
        rows.push(dispatch_row(
            &format!("dispatch latency, {agents} agent(s), p50 / p99"),
            &lat,
        ));
    }

    eprintln!("bench: footprint with 1,000 schedules");
    let nats = Nats::start();
    let fp = bench_footprint(
        &nats,
        1000,
        if quick {
            Duration::from_secs(10)
        } else {
            Duration::from_secs(30)
        },
    )
    .await;
    rows.push(Row::new(
        "idle RSS, 1,000 schedules",
        format!(
            "{:.1} MiB (heap {:.1}, code and files {:.1})",
            mib(fp.idle_rss_kib),
            mib(fp.idle_anon_kib),
            mib(fp.idle_file_kib)
        ),
        "—".into(),
        "—".into(),
        "< 20 MiB",
        Some(mib(fp.idle_rss_kib) < 20.0),
    ));
    rows.push(Row::new(
        "idle CPU, 1,000 schedules",
        format!("{:.2} % of a core", fp.idle_cpu_percent),
        "—".into(),
        "—".into(),
        "< 0.5 %",
        Some(fp.idle_cpu_percent < 0.5),
    ));
    rows.push(Row::new(
        "start to READY",
        format!("{:.0} ms", fp.ready.as_secs_f64() * 1000.0),
        "—".into(),
        "—".into(),
        "< 200 ms",
        Some(fp.ready < Duration::from_millis(200)),
    ));
    drop(nats);

    let nats = Nats::start();
    let s3 = S3Server::start_s3s_fs("etcd", "bench", "bench-secret").await;
    let mut peaks = Vec::new();
    for size in &snapshot_sizes {
        eprintln!("bench: snapshot streaming, {} MiB", size >> 20);
        let ours = bench_snapshot(&nats, &s3, *size).await;
        s3.empty_files("etcd");
        let aws = bench_awscli(&s3, *size).await;
        s3.empty_files("etcd");
        let (our_rate, aws_rate) = (
            *size as f64 / ours.seconds / 1048576.0,
            *size as f64 / aws / 1048576.0,
        );
        let ratio = our_rate / aws_rate;
        rows.push(Row::new(
            &format!("snapshot streaming, {} MiB", size >> 20),
            format!("{our_rate:.1} MiB/s"),
            format!("{aws_rate:.1} MiB/s (aws s3 cp)"),
            format!("{:.0} %", ratio * 100.0),
            "≥ 90 %",
            Some(ratio >= 0.9),
        ));
        peaks.push((*size, ours.peak_rss_kib));
    }
    let max_peak = peaks.iter().map(|(_, p)| *p).max().unwrap_or(0);
    let min_peak = peaks.iter().map(|(_, p)| *p).min().unwrap_or(0);
    rows.push(Row::new(
        "agent peak RSS while streaming",
        peaks
            .iter()
            .map(|(s, p)| format!("{:.1} MiB at {} MiB", mib(*p), s >> 20))
            .collect::<Vec<_>>()
            .join(", "),
        "—".into(),
        format!(
            "{:.2}× between sizes",
            max_peak as f64 / min_peak.max(1) as f64
        ),
        "< 64 MiB, same for both",
        Some(mib(max_peak) < 64.0 && (max_peak as f64) < min_peak as f64 * 1.25),
    ));
    drop(s3);
    drop(nats);

    eprintln!("bench: growth with {growth_jobs} queued jobs");
    let nats = Nats::start();
    let g = bench_growth(&nats, growth_jobs, connections, duration).await;
    let fresh_rate = ours.rate();
    rows.push(Row::new(
        &format!("growth: drain {} queued jobs", g.records),
        format!(
            "{:.0} jobs/s, peak RSS {:.1} MiB",
            g.drain_jobs_per_second,
            mib(g.drain_peak_rss_kib)
        ),
        "—".into(),
        "—".into(),
        "(observed)",
        None,
    ));
    rows.push(Row::new(
        &format!("growth: ingest with {} records", g.records),
        format!(
            "{:.0} req/s, p99 {:.2} ms",
            g.ingest.rate(),
            g.ingest.latencies.ms(0.99)
        ),
        format!("{fresh_rate:.0} req/s (empty store)"),
        format!("{:.2}×", g.ingest.rate() / fresh_rate),
        "(observed)",
        None,
    ));
    rows.push(Row::new(
        &format!("growth: dispatch with {} records, p50 / p99", g.records),
        format!("{:.2} / {:.2} ms", g.dispatch.ms(0.5), g.dispatch.ms(0.99)),
        "—".into(),
        "—".into(),
        "(observed)",
        None,
    ));
    drop(nats);

    let drill_size: u64 = if quick { 128 << 20 } else { 1 << 30 };
    eprintln!("bench: etcd drill of a {} MiB snapshot", drill_size >> 20);
    let nats = Nats::start();
    let s3 = S3Server::start_s3s_fs("etcd", "bench", "bench-secret").await;
    rows.extend(etcd_drill_rows(
        &bench_etcd_drill(&nats, &s3, drill_size).await,
    ));
    drop(s3);
    drop(nats);

    eprintln!("bench: secret scan of 5,000 files");
    rows.push(secret_scan_row(&bench_secret_scan(5000, 5)));

    eprintln!("bench: rolling upgrade of 5 fake nodes (2 s reboots)");
    rows.push(upgrade_row(&bench_upgrade(Duration::from_secs(2)).await));
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_meter_divides_what_each_process_spent_by_the_deliveries() {
        let me = std::process::id();
        let meter = CpuMeter::start(&[("this test", me)]);
        // Busy until the kernel has counted at least 50 ms of this process's CPU time (its
        // clock ticks every 10 ms), or give up after 10 s of wall time.
        let started = Instant::now();
        let before = cpu_time(me);
        let mut spin = 0u64;
        while cpu_time(me) < before + Duration::from_millis(50) {
            spin = std::hint::black_box(spin.wrapping_add(1));
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "no CPU time counted"
            );
        }
        let shares = meter.per_delivery(10);
        assert_eq!(shares.len(), 1);
        assert_eq!(shares[0].0, "this test");
        // At least 50 ms over 10 deliveries: 5,000 µs each.
        assert!(shares[0].1 >= 5_000.0, "{shares:?}");
        let line = meter.report(10, 1.0);
        assert!(line.starts_with("CPU per delivery: this test "), "{line}");
        assert!(line.contains("cores allow"), "{line}");
    }

    #[test]
    fn an_answer_is_read_once_its_head_is_whole_and_framed_by_its_length() {
        let answer = b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"job\":\"x\"}";
        assert_eq!(parse_answer(&answer[..40]).expect("a part"), None);
        assert_eq!(
            parse_answer(answer).expect("whole"),
            Some((202, answer.len() - 11, 11, true))
        );
        let closing =
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        assert_eq!(
            parse_answer(closing).expect("whole"),
            Some((503, closing.len(), 0, false))
        );
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(parse_answer(chunked).is_err());
        let unframed = b"HTTP/1.1 200 OK\r\n\r\n";
        assert!(parse_answer(unframed).is_err());
    }

    /// The sender's pushes are what a webhook receiver checks: signed over the exact body,
    /// each a delivery and a commit of its own, on one connection kept alive.
    #[tokio::test]
    async fn a_sender_posts_signed_pushes_on_one_connection_and_reads_each_answer() {
        use axum::extract::ConnectInfo;
        use axum::http::HeaderMap;
        use std::net::SocketAddr;
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = seen.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |ConnectInfo(peer): ConnectInfo<SocketAddr>,
                      headers: HeaderMap,
                      body: axum::body::Bytes| {
                    let seen = kept.clone();
                    async move {
                        let header = |name: &str| {
                            headers
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_string()
                        };
                        let push: Value = serde_json::from_slice(&body).expect("json");
                        seen.lock().expect("seen").push((
                            peer,
                            header("x-github-delivery"),
                            header("x-hub-signature-256") == sign(WEBHOOK_SECRET, &body),
                            push["after"].as_str().unwrap_or_default().to_string(),
                        ));
                        (axum::http::StatusCode::ACCEPTED, "{}")
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
        });

        let target = SenderTarget::parse(&format!("http://{address}/hook"));
        let template = PushTemplate::new();
        let mut sender = Sender::connect(&target).await;
        for n in 0..3 {
            assert_eq!(sender.post_push(&template, n).await.expect("answered"), 202);
        }
        let seen = seen.lock().expect("seen").clone();
        assert!(
            seen.iter().all(|(peer, ..)| *peer == seen[0].0),
            "one connection: {seen:?}"
        );
        assert_eq!(
            seen.into_iter()
                .map(|(_, delivery, signed, commit)| (delivery, signed, commit))
                .collect::<Vec<_>>(),
            (0..3u64)
                .map(|n| (format!("bench-{n}"), true, format!("{:040x}", n + 1)))
                .collect::<Vec<_>>()
        );
        let mut unknown =
            Sender::connect(&SenderTarget::parse(&format!("http://{address}/nope"))).await;
        assert_eq!(unknown.get().await.expect("answered"), 404);
    }
}
