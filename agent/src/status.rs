//! What `status` shows, kept in memory: agents, locks and last results follow their KV buckets
//! through watches (pushed by NATS as they change), the queue depth is asked once a second. A
//! `status` command then costs one NATS round trip, as a chat user expects of a status line.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use infraflux_handlers::JobKind;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::locks::{self, HeldLock};
use crate::records::{Deferred, LastResult};
use crate::store::{PRESENCE_TTL, Store};

/// An agent's presence entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Presence {
    pub agent: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub seen_at: DateTime<Utc>,
    pub concurrency: usize,
    pub running: Vec<String>,
    /// The agent runs a job only if its key's claim names it (see `ingest`); agents before
    /// this field do not, and while one is alive, submissions claim before sending the job.
    #[serde(default)]
    pub checks_claims: bool,
}

impl Presence {
    /// Heartbeated within the presence TTL.
    fn is_live(&self, now: DateTime<Utc>) -> bool {
        now - self.seen_at < chrono::Duration::from_std(PRESENCE_TTL).unwrap_or_default()
    }
}

#[derive(Default)]
struct Inner {
    agents: BTreeMap<String, Presence>,
    /// Raw lock entries by KV key; expiry is judged when read.
    locks: BTreeMap<String, Vec<u8>>,
    last: BTreeMap<JobKind, LastResult>,
    /// The last result of each target of a kind (a drill's namespaces, etcd).
    targets: BTreeMap<(JobKind, String), LastResult>,
    /// Jobs waiting for a time (a maintenance window), by job id.
    deferred: BTreeMap<String, Deferred>,
    queue: Option<(u64, u64)>,
}

/// A snapshot for one `status` reply.
pub struct Snapshot {
    pub agents: Vec<Presence>,
    pub locks: Vec<HeldLock>,
    pub last: Vec<(JobKind, LastResult)>,
    pub targets: Vec<(JobKind, LastResult)>,
    pub deferred: Vec<Deferred>,
    pub queue: Option<(u64, u64)>,
}

#[derive(Clone, Default)]
pub struct StatusCache {
    inner: Arc<RwLock<Inner>>,
}

impl StatusCache {
    /// Whether every live agent checks a job's claim before its first start; false while no
    /// agent has been seen yet.
    pub fn every_agent_checks_claims(&self) -> bool {
        let Ok(inner) = self.inner.read() else {
            return false;
        };
        let now = Utc::now();
        let mut live = inner.agents.values().filter(|p| p.is_live(now)).peekable();
        live.peek().is_some() && live.all(|p| p.checks_claims)
    }

    pub fn snapshot(&self) -> Snapshot {
        let Ok(inner) = self.inner.read() else {
            return Snapshot {
                agents: vec![],
                locks: vec![],
                last: vec![],
                targets: vec![],
                deferred: vec![],
                queue: None,
            };
        };
        let now = Utc::now();
        let agents = inner
            .agents
            .values()
            .filter(|p| p.is_live(now))
            .cloned()
            .collect();
        let locks = inner
            .locks
            .iter()
            .flat_map(|(key, value)| locks::held_in(key, value, now))
            .collect();
        let last = inner.last.iter().map(|(k, l)| (*k, l.clone())).collect();
        let targets = inner
            .targets
            .iter()
            .map(|((k, _), l)| (*k, l.clone()))
            .collect();
        let deferred = inner.deferred.values().cloned().collect();
        Snapshot {
            agents,
            locks,
            last,
            targets,
            deferred,
            queue: inner.queue,
        }
    }

    fn update(&self, change: impl FnOnce(&mut Inner)) {
        if let Ok(mut inner) = self.inner.write() {
            change(&mut inner);
        }
    }
}

/// Keeps `cache` current until `stop`.
pub async fn run(store: Store, cache: StatusCache, stop: CancellationToken) {
    let agents = {
        let cache = cache.clone();
        watch(store.agents.clone(), "agents", stop.clone(), move |entry| {
            cache.update(|i| match entry.operation {
                kv::Operation::Put => {
                    if let Ok(p) = serde_json::from_slice::<Presence>(&entry.value) {
                        i.agents.insert(entry.key.clone(), p);
                    }
                }
                _ => {
                    i.agents.remove(&entry.key);
                }
            })
        })
    };
    let locks = {
        let cache = cache.clone();
        watch(store.locks.clone(), "locks", stop.clone(), move |entry| {
            cache.update(|i| match entry.operation {
                kv::Operation::Put => {
                    i.locks.insert(entry.key.clone(), entry.value.to_vec());
                }
                _ => {
                    i.locks.remove(&entry.key);
                }
            })
        })
    };
    let last = {
        let cache = cache.clone();
        watch(store.state.clone(), "state", stop.clone(), move |entry| {
            if let Some(job_id) = entry.key.strip_prefix("deferred.") {
                let job_id = job_id.to_string();
                match entry.operation {
                    kv::Operation::Put => {
                        if let Ok(d) = serde_json::from_slice::<Deferred>(&entry.value) {
                            cache.update(|i| {
                                i.deferred.insert(job_id, d);
                            });
                        }
                    }
                    _ => cache.update(|i| {
                        i.deferred.remove(&job_id);
                    }),
                }
                return;
            }
            let Some(rest) = entry.key.strip_prefix("last.") else {
                return;
            };
            let Ok(l) = serde_json::from_slice::<LastResult>(&entry.value) else {
                return;
            };
            if let Ok(kind) = rest.parse::<JobKind>() {
                cache.update(|i| {
                    i.last.insert(kind, l);
                });
            } else if let Some((kind, target)) = rest.split_once('.')
                && let Ok(kind) = kind.parse::<JobKind>()
                && l.target.is_some()
            {
                let target = target.to_string();
                cache.update(|i| {
                    i.targets.insert((kind, target), l);
                });
            }
        })
    };
    let queue = async {
        loop {
            if let Ok(info) = store.consumer.get_info().await {
                cache.update(|i| i.queue = Some((info.num_pending, info.num_ack_pending as u64)));
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    };
    tokio::join!(agents, locks, last, queue);
}

/// Follows every key of a bucket (current values first, then changes), restarting the watch
/// when it ends, as it does when NATS goes away.
async fn watch(
    store: kv::Store,
    what: &'static str,
    stop: CancellationToken,
    apply: impl Fn(kv::Entry),
) {
    loop {
        match store.watch_with_history(">").await {
            Ok(mut entries) => loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    entry = entries.next() => match entry {
                        Some(Ok(e)) => apply(e),
                        Some(Err(e)) => {
                            tracing::debug!(bucket = what, error = %e, "Watch interrupted");
                            break;
                        }
                        None => break,
                    },
                }
            },
            Err(e) => tracing::debug!(bucket = what, error = %e, "Watch not started"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
