//! The fault matrix: three agents as child processes on a real 3-server NATS JetStream
//! cluster (`replicas = 3`), a steady load of signed webhooks and ChatOps commands whose jobs
//! run for two seconds, one fault at a time, and afterwards the same invariants:
//! - every delivery answered `202` is a job, and every job reaches an end (none left `queued`);
//! - no delivery (no commit) got two jobs;
//! - no job ran on two agents at the same time, and one ran twice only after its first
//!   agent died (recorded as an interruption);
//! - no lock or lease is left once every job has ended;
//! - no secret in any agent's output.
//!
//! The tests run one at a time (each starts a cluster and three agents on this 2-core
//! machine) and print what they measured: readiness, the write gap of a leader election.

mod agents;
mod leaders;
mod outage;
mod startup;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use infraflux_tests::cluster::NatsCluster;
use infraflux_tests::process::AgentProcess;
use infraflux_tests::*;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// How long each job's handler runs.
const JOB_MS: u64 = 2000;
/// A webhook every this often, a ChatOps command every fifth tick.
const TICK: Duration = Duration::from_millis(300);

/// One test at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn test_agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_infraflux-test-agent"))
}

pub struct Lab {
    pub cluster: NatsCluster,
    pub dir: tempfile::TempDir,
    pub markers: PathBuf,
    pub http: Vec<String>,
    ports: Vec<u16>,
    configs: Vec<PathBuf>,
    agents: Mutex<Vec<Option<AgentProcess>>>,
    /// Per agent: whether it runs (the load sends only to those).
    alive: Arc<Mutex<Vec<bool>>>,
    spawns: Mutex<Vec<u32>>,
    /// `nats.replicas` of the agents started from now on.
    replicas: Mutex<usize>,
    /// More environment for the agents started from now on.
    extra_env: Mutex<Vec<(&'static str, String)>>,
}

impl Lab {
    /// A fresh cluster and `n` agents started at once; returns once each is ready, and how
    /// long each took.
    pub async fn start(n: usize) -> (Lab, Vec<Duration>) {
        Self::start_with(n, 3).await
    }

    /// As [`Lab::start`], the agents asking for `replicas`.
    pub async fn start_with(n: usize, replicas: usize) -> (Lab, Vec<Duration>) {
        init();
        let cluster = NatsCluster::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let markers = dir.path().join("markers");
        std::fs::create_dir_all(&markers).expect("markers");
        let mut configs = Vec::new();
        let mut ports = Vec::new();
        let mut http = Vec::new();
        for i in 0..n {
            let id = format!("fault-{i}");
            let path = dir.path().join(format!("{id}.toml"));
            std::fs::write(
                &path,
                agent_config(
                    &cluster.url,
                    &id,
                    &dir.path().join(&id),
                    &acceptance_stand_in(),
                ),
            )
            .expect("config");
            configs.push(path);
            let port = free_port();
            ports.push(port);
            http.push(format!("http://127.0.0.1:{port}"));
        }
        let lab = Lab {
            cluster,
            markers,
            http,
            ports,
            configs,
            agents: Mutex::new((0..n).map(|_| None).collect()),
            alive: Arc::new(Mutex::new(vec![false; n])),
            spawns: Mutex::new(vec![0; n]),
            replicas: Mutex::new(replicas),
            extra_env: Mutex::default(),
            dir,
        };
        let started = Instant::now();
        for i in 0..n {
            lab.spawn(i);
        }
        let mut ready = Vec::new();
        for i in 0..n {
            lab.wait_ready(i, Duration::from_secs(60)).await;
            ready.push(started.elapsed());
        }
        (lab, ready)
    }

    pub fn agents(&self) -> usize {
        self.configs.len()
    }

    /// Starts agent `i` (again), logging to its own file per start.
    pub fn spawn(&self, i: usize) {
        let start = {
            let mut spawns = self.spawns.lock().expect("lock");
            spawns[i] += 1;
            spawns[i]
        };
        let mut env = vec![
            ("IFX_TEST_MARKERS", self.markers.display().to_string()),
            ("IFX_TEST_SLEEP_MS", JOB_MS.to_string()),
            ("IFX_TEST_RECONCILE", "1".to_string()),
            (
                "INFRAFLUX_NATS__REPLICAS",
                self.replicas.lock().expect("lock").to_string(),
            ),
            ("INFRAFLUX_AGENT__ACK_WAIT", "5s".to_string()),
            ("INFRAFLUX_AGENT__LEASE_TTL", "6s".to_string()),
            ("INFRAFLUX_AGENT__REQUEUE_AFTER", "15s".to_string()),
            (
                "INFRAFLUX_HTTP__LISTEN",
                format!("127.0.0.1:{}", self.ports[i]),
            ),
        ];
        env.extend(self.extra_env.lock().expect("lock").iter().cloned());
        let log = self.dir.path().join(format!("fault-{i}.{start}.log"));
        let process = AgentProcess::spawn(&test_agent_bin(), &self.configs[i], &env, &log);
        self.agents.lock().expect("lock")[i] = Some(process);
    }

    /// Waits until agent `i` answers `/readyz` with 200, and lets the load reach it.
    pub async fn wait_ready(&self, i: usize, limit: Duration) {
        let http = self.http[i].clone();
        wait_for(limit, &format!("agent fault-{i} to be ready"), || async {
            reqwest::Client::new()
                .get(format!("{http}/readyz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
        })
        .await;
        self.alive.lock().expect("lock")[i] = true;
    }

    pub fn set_replicas(&self, replicas: usize) {
        *self.replicas.lock().expect("lock") = replicas;
    }

    /// Sets an environment variable for the agents started from now on.
    pub fn set_env(&self, key: &'static str, value: &str) {
        let mut env = self.extra_env.lock().expect("lock");
        env.retain(|(k, _)| *k != key);
        env.push((key, value.to_string()));
    }

    /// Sends agent `i` SIGTERM (the load stops sending to it first, as a load balancer
    /// would); its exit code, or `None` if it still runs after `limit`.
    pub fn sigterm(&self, i: usize, limit: Duration) -> Option<i32> {
        self.alive.lock().expect("lock")[i] = false;
        let mut agent = self.agents.lock().expect("lock")[i].take()?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(agent.pid()).expect("pid")),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        agent.exit_within(limit)
    }

    /// The jobs whose handler started on agent `i` and has not finished.
    pub fn running_on(&self, i: usize) -> Vec<String> {
        let agent = format!(".fault-{i}.start");
        std::fs::read_dir(&self.markers)
            .expect("markers")
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let stem = name.strip_suffix(".start")?.to_string();
                (name.ends_with(&agent) && !self.markers.join(format!("{stem}.done")).exists())
                    .then_some(stem)
            })
            .collect()
    }

    pub fn kill9(&self, i: usize) {
        self.alive.lock().expect("lock")[i] = false;
        if let Some(mut agent) = self.agents.lock().expect("lock")[i].take() {
            agent.kill9();
        }
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.agents.lock().expect("lock")[i].is_some()
    }

    /// The last `lines` lines of agent `i`'s output since its latest start.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let start = self.spawns.lock().expect("lock")[i];
        let log = std::fs::read_to_string(self.dir.path().join(format!("fault-{i}.{start}.log")))
            .unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Every agent's output so far.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.dir.path()).expect("dir").flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                all.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        all
    }

    pub async fn client(&self) -> async_nats::Client {
        self.cluster.client().await
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.agents() {
            self.kill9(i);
        }
    }
}

/// What the load sent and what it got back.
#[derive(Debug, Clone)]
pub struct Sent {
    pub what: String,
    pub at: Instant,
    /// The HTTP status; 0 for a command or a connection that failed.
    pub status: u16,
    /// The jobs the answer names.
    pub jobs: Vec<String>,
}

pub struct Load {
    stop: CancellationToken,
    sent: Arc<Mutex<Vec<Sent>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The push fixture with its own commit, so each delivery is a different job.
fn push_for(n: u32) -> Vec<u8> {
    let mut payload: Value =
        serde_json::from_slice(&fixture("github/push/push.json")).expect("json");
    payload["after"] = Value::String(format!("{:040x}", 0xfa17_0000_u64 + u64::from(n)));
    serde_json::to_vec(&payload).expect("json")
}

impl Load {
    /// Starts sending: a signed push to a running agent every [`TICK`], and an `acceptance`
    /// command over NATS every fifth tick, each in its own task as real senders are.
    pub async fn start(lab: &Lab) -> Load {
        let stop = CancellationToken::new();
        let sent: Arc<Mutex<Vec<Sent>>> = Arc::default();
        let client = lab.client().await;
        let (alive, http) = (lab.alive.clone(), lab.http.clone());
        let task = {
            let (stop, sent) = (stop.clone(), sent.clone());
            tokio::spawn(async move {
                let mut inflight = tokio::task::JoinSet::new();
                let mut n = 0u32;
                while !stop.is_cancelled() {
                    n += 1;
                    let running: Vec<usize> = alive
                        .lock()
                        .expect("lock")
                        .iter()
                        .enumerate()
                        .filter(|(_, a)| **a)
                        .map(|(i, _)| i)
                        .collect();
                    if let Some(target) = running.get(n as usize % running.len().max(1)) {
                        let (url, sent) = (http[*target].clone(), sent.clone());
                        inflight.spawn(async move {
                            let at = Instant::now();
                            // A connection cut by a kill is no answer: status 0.
                            let (status, reply) =
                                try_post_webhook(&url, "push", &format!("fault-{n}"), &push_for(n))
                                    .await
                                    .unwrap_or((0, Value::Null));
                            let jobs = job_ids(&reply["jobs"]);
                            sent.lock().expect("lock").push(Sent {
                                what: format!("delivery fault-{n}"),
                                at,
                                status,
                                jobs,
                            });
                        });
                    }
                    if n.is_multiple_of(5) {
                        let (client, sent) = (client.clone(), sent.clone());
                        inflight.spawn(async move {
                            let at = Instant::now();
                            let body = serde_json::json!({"command": "acceptance", "requested_by": "fault-load"});
                            let reply = tokio::time::timeout(
                                Duration::from_secs(10),
                                client.request(
                                    "infraflux.cmd.acceptance",
                                    serde_json::to_vec(&body).expect("json").into(),
                                ),
                            )
                            .await;
                            let job = match reply {
                                Ok(Ok(m)) => serde_json::from_slice::<Value>(&m.payload)
                                    .ok()
                                    .and_then(|v| v["job_id"].as_str().map(str::to_string)),
                                _ => None,
                            };
                            sent.lock().expect("lock").push(Sent {
                                what: format!("command {n}"),
                                at,
                                status: 0,
                                jobs: job.into_iter().collect(),
                            });
                        });
                    }
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = tokio::time::sleep(TICK) => {}
                    }
                }
                while inflight.join_next().await.is_some() {}
            })
        };
        Load { stop, sent, task }
    }

    /// Stops sending and waits for the answers still on their way.
    pub async fn stop(self) -> Vec<Sent> {
        self.stop.cancel();
        let sent = self.sent.clone();
        let _ = self.task.await;
        sent.lock().expect("lock").clone()
    }

    /// What was sent so far.
    pub fn so_far(&self) -> Vec<Sent> {
        self.sent.lock().expect("lock").clone()
    }
}

fn job_ids(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// After a fault: the first `202` sent after `since`, and how many `503`s came before it.
pub fn recovery(sent: &[Sent], since: Instant) -> (Option<Duration>, usize) {
    let mut after: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.at >= since && s.what.starts_with("delivery"))
        .collect();
    after.sort_by_key(|s| s.at);
    let first = after.iter().position(|s| s.status == 202);
    let refused = after
        .iter()
        .take(first.unwrap_or(after.len()))
        .filter(|s| s.status == 503)
        .count();
    (first.map(|i| after[i].at - since), refused)
}

/// The invariants every fault must keep; `limit` is how long the jobs may take to end.
pub async fn assert_nothing_lost(lab: &Lab, sent: &[Sent], limit: Duration) {
    let client = lab.client().await;
    let accepted: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.status == 202 || (s.status == 0 && !s.jobs.is_empty()))
        .collect();
    assert!(
        accepted.len() > 10,
        "the load got too few jobs accepted to show anything: {}",
        accepted.len()
    );
    // Every delivery answered 202 names exactly one job, and no two deliveries the same one.
    let mut seen = BTreeSet::new();
    for s in &accepted {
        assert_eq!(s.jobs.len(), 1, "{} got {:?}", s.what, s.jobs);
        assert!(seen.insert(s.jobs[0].clone()), "{} reused a job", s.what);
    }

    // Every job reaches an end; a stuck one is named with its record.
    let deadline = tokio::time::Instant::now() + limit;
    let mut pending: BTreeSet<String> = seen.clone();
    let mut ended: BTreeMap<String, Value> = BTreeMap::new();
    while !pending.is_empty() {
        let records = all_records(&client).await;
        let by_id: BTreeMap<String, Value> = records
            .into_iter()
            .filter_map(|r| r["job_id"].as_str().map(|id| (id.to_string(), r.clone())))
            .collect();
        pending.retain(|id| match by_id.get(id) {
            Some(r) if is_terminal(r) => {
                ended.insert(id.clone(), r.clone());
                false
            }
            _ => true,
        });
        if pending.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let stuck: Vec<String> = pending
                .iter()
                .map(|id| match by_id.get(id) {
                    Some(r) => format!(
                        "{id}: {} ({}) attempts {}",
                        r["state"], r["message"], r["attempts"]
                    ),
                    None => format!("{id}: no record"),
                })
                .collect();
            panic!(
                "{} accepted jobs did not end within {limit:?}:\n{}",
                stuck.len(),
                stuck.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (id, r) in &ended {
        assert_eq!(r["state"], "succeeded", "{id}: {r}");
    }

    // Every record, accepted or not, ends: a delivery answered 503 may have left its record
    // `queued` without a queue message, and agents queue such a job again after
    // `requeue_after`. And no commit has two jobs.
    let records = wait_for(limit, "every job, accepted or not, to end", || async {
        let records = all_records(&client).await;
        records.iter().all(is_terminal).then_some(records)
    })
    .await;
    let mut by_commit: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &records {
        if r["kind"] == "reconcile"
            && let Some(commit) = r["commit"].as_str()
        {
            by_commit
                .entry(commit.to_string())
                .or_default()
                .push(r["job_id"].as_str().unwrap_or_default().to_string());
        }
    }
    for (commit, jobs) in &by_commit {
        assert_eq!(jobs.len(), 1, "commit {commit} got jobs {jobs:?}");
    }

    assert_no_overlap(&lab.markers, &records);

    // Once nothing runs, no lock or lease is held: an entry whose release was lost to a
    // leader election may stay in the bucket, but every holder in it has expired (an expired
    // holder blocks nobody).
    let held = || async {
        let kv = async_nats::jetstream::new(client.clone())
            .get_key_value("infraflux-locks")
            .await
            .ok()?;
        let keys: Vec<String> = futures::StreamExt::collect::<Vec<_>>(kv.keys().await.ok()?)
            .await
            .into_iter()
            .filter_map(Result::ok)
            .collect();
        let now = chrono::Utc::now();
        let mut held = Vec::new();
        for key in keys {
            let Ok(Some(value)) = kv.get(&key).await else {
                continue;
            };
            let entry: Value = serde_json::from_slice(&value).unwrap_or(Value::Null);
            let live = ["holders", "waiting"].iter().any(|list| {
                entry[*list].as_array().is_some_and(|holders| {
                    holders.iter().any(|h| {
                        h["expires_at"]
                            .as_str()
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            .is_none_or(|t| t > now)
                    })
                })
            });
            if live {
                held.push(format!("{key}: {entry}"));
            }
        }
        Some(held)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let still = held()
            .await
            .unwrap_or_else(|| vec!["the locks bucket is unreadable".into()]);
        if still.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "locks still held after every job ended:\n{}",
            still.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let logs = lab.logs();
    assert!(!logs.contains(WEBHOOK_SECRET), "the webhook secret leaked");
}

fn is_terminal(record: &Value) -> bool {
    matches!(
        record["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// From the handler's marker files (`<job>.<attempt>.<agent>.start|done`, stamped by the
/// file system): no two attempts of a job overlap, and a job whose handler finished twice had
/// its earlier attempt interrupted (its agent died after the work, before recording the end).
fn assert_no_overlap(markers: &Path, records: &[Value]) {
    let mut attempts: BTreeMap<String, Vec<(u32, SystemTime, Option<SystemTime>)>> =
        BTreeMap::new();
    let stamp = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    for entry in std::fs::read_dir(markers).expect("markers").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".start") else {
            continue;
        };
        let mut parts = stem.splitn(3, '.');
        let (Some(job), Some(attempt)) = (parts.next(), parts.next()) else {
            continue;
        };
        let attempt: u32 = attempt.parse().unwrap_or(0);
        let started = stamp(&entry.path()).expect("start stamp");
        let done = stamp(&markers.join(format!("{stem}.done")));
        attempts
            .entry(job.to_string())
            .or_default()
            .push((attempt, started, done));
    }
    let by_id: BTreeMap<&str, &Value> = records
        .iter()
        .filter_map(|r| r["job_id"].as_str().map(|id| (id, r)))
        .collect();
    for (job, mut runs) in attempts {
        runs.sort_by_key(|(attempt, started, _)| (*started, *attempt));
        for pair in runs.windows(2) {
            if let (Some(done), next) = (pair[0].2, pair[1].1) {
                assert!(
                    done <= next,
                    "job {job}: attempt {} started before attempt {} finished",
                    pair[1].0,
                    pair[0].0
                );
            }
        }
        let finished = runs.iter().filter(|r| r.2.is_some()).count();
        if finished > 1 {
            let interruptions = by_id
                .get(job.as_str())
                .and_then(|r| r["interruptions"].as_array())
                .map_or(0, Vec::len);
            assert!(
                interruptions >= finished - 1,
                "job {job} finished {finished} times with {interruptions} interruptions"
            );
        }
    }
}

/// The server leading `stream`, once it has one.
pub async fn wait_for_stream_leader(lab: &Lab, client: &async_nats::Client, stream: &str) -> usize {
    wait_for(
        Duration::from_secs(20),
        &format!("a leader of {stream}"),
        || async { lab.cluster.stream_leader(client, stream).await },
    )
    .await
}
