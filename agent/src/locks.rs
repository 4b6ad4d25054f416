//! One lock manager across job kinds.
//!
//! A lock is a lease: one KV entry per resource lists its holders with an expiry; the holder
//! renews it while its job runs, and a holder that dies simply stops renewing. Read holders
//! share a resource, a write holder excludes everyone. All changes are compare-and-set on the
//! entry's revision, so two agents racing for a resource cannot both win.
//!
//! A job takes all its locks or none (no hold-and-wait, so no deadlock), and the runner also
//! leases the job itself (`job:<id>`), so a job redelivered while its first agent still runs it
//! (a partition, a stalled process) waits instead of running twice at once.
//!
//! Expiry compares wall clocks of the agents; keep them in NTP sync (see docs/architecture.md).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use infraflux_handlers::{LockMode, LockRequest};
use serde::{Deserialize, Serialize};

/// Who holds a lock: one attempt of one job. A redelivered job is a new attempt with a new
/// token, so it never mistakes the lease of its dead predecessor for its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub token: String,
    pub job_id: String,
}

impl Owner {
    pub fn new(job_id: &str, agent_id: &str) -> Self {
        Self {
            token: format!(
                "{agent_id}/{}",
                ulid::Ulid::new().to_string().to_ascii_lowercase()
            ),
            job_id: job_id.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub owner: String,
    pub job_id: String,
    pub agent: String,
    pub mode: LockMode,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LockEntry {
    holders: Vec<Holder>,
    /// Writers waiting for the readers to leave. While one waits, no new reader comes in, so a
    /// stream of overlapping readers cannot starve a writer. A waiter renews its place each
    /// time it tries again; a writer that gave up or died drops out when its place expires.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    waiting: Vec<Holder>,
}

/// Who stands in the way of `owner` taking `mode` on a resource with `entry`, at `now`: a
/// writer blocks everyone, a reader blocks writers, and a writer waiting for readers blocks
/// new readers. Expired holders and waiters block nobody.
fn conflict<'a>(
    entry: &'a LockEntry,
    mode: LockMode,
    owner: &str,
    now: DateTime<Utc>,
) -> Option<&'a Holder> {
    let live = |h: &&Holder| h.owner != owner && h.expires_at > now;
    entry
        .holders
        .iter()
        .filter(live)
        .find(|h| mode == LockMode::Write || h.mode == LockMode::Write)
        .or_else(|| match mode {
            LockMode::Read => entry.waiting.iter().find(live),
            LockMode::Write => None,
        })
}

/// A held lock as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HeldLock {
    pub resource: String,
    #[serde(flatten)]
    pub holder: Holder,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    Acquired,
    Busy { resource: String, holder: Holder },
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("lock store unavailable: {0}")]
    Unavailable(String),
    #[error("lock {0} was lost: its lease expired and was taken over")]
    Lost(String),
    #[error("invalid resource name {0:?}")]
    InvalidResource(String),
}

/// How often a release re-reads an entry that changed under it before giving up (the lease
/// expires anyway).
const MAX_RELEASE_RACES: u32 = 5;

/// How long an untouched lock entry is kept: far longer than any lease, since a holder rewrites
/// its entry every third of the lease; what this removes is the markers of released locks.
pub fn bucket_max_age(lease_ttl: std::time::Duration) -> std::time::Duration {
    (lease_ttl * 20).max(std::time::Duration::from_secs(3600))
}

#[derive(Clone)]
pub struct LockManager {
    kv: kv::Store,
    agent_id: String,
    ttl: Duration,
    /// The entry this manager last wrote to each key it holds, with the revision the write got:
    /// a renewal or a release starts from it instead of reading the key first. Its
    /// compare-and-set is refused if anyone wrote since, and the key is then read.
    written: Arc<Mutex<HashMap<String, (LockEntry, u64)>>>,
}

impl LockManager {
    pub fn new(kv: kv::Store, agent_id: String, ttl: Duration) -> Self {
        Self {
            kv,
            agent_id,
            ttl,
            written: Arc::default(),
        }
    }

    fn remember(&self, key: &str, entry: LockEntry, revision: u64) {
        if let Ok(mut written) = self.written.lock() {
            written.insert(key.to_string(), (entry, revision));
        }
    }

    /// What this manager last wrote to `key`, if anything; `forget` drops it.
    fn recall(&self, key: &str, forget: bool) -> Option<(LockEntry, u64)> {
        let mut written = self.written.lock().ok()?;
        if forget {
            written.remove(key)
        } else {
            written.get(key).cloned()
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Takes every lock in `requests` for `job_id`, or none of them.
    pub async fn try_acquire_all(
        &self,
        requests: &[LockRequest],
        owner: &Owner,
    ) -> Result<Acquire, LockError> {
        let mut sorted = requests.to_vec();
        sorted.sort_by(|a, b| a.resource.cmp(&b.resource));
        sorted.dedup_by(|a, b| a.resource == b.resource);
        let mut taken: Vec<LockRequest> = Vec::new();
        for request in &sorted {
            match self.try_acquire(request, owner).await {
                Ok(Acquire::Acquired) => taken.push(request.clone()),
                other => {
                    self.release_all(&taken, owner).await;
                    return other;
                }
            }
        }
        Ok(Acquire::Acquired)
    }

    /// Takes one lock; a writer that finds readers takes a place in the line (see
    /// [`LockEntry::waiting`]) and is told `Busy`.
    pub async fn try_acquire(
        &self,
        request: &LockRequest,
        owner: &Owner,
    ) -> Result<Acquire, LockError> {
        self.acquire(request, owner, true).await
    }

    /// Takes a job's lease, or says who holds it; nobody lines up for a lease (a redelivery
    /// finding it held is put back to the queue instead).
    pub async fn try_lease(
        &self,
        request: &LockRequest,
        owner: &Owner,
    ) -> Result<Acquire, LockError> {
        self.acquire(request, owner, false).await
    }

    async fn acquire(
        &self,
        request: &LockRequest,
        owner: &Owner,
        line_up: bool,
    ) -> Result<Acquire, LockError> {
        let key = resource_key(&request.resource)?;
        // First as if the key had never been written, as a job's lease never was: a create,
        // no read. A key that exists (held, or a released lock's purge marker) refuses it and
        // is read, as always: one round trip more for a lock released within the bucket's age.
        let mut unread = Some((LockEntry::default(), 0));
        loop {
            let (mut entry, revision) = match unread.take() {
                Some(unread) => unread,
                None => self.read(&key).await?,
            };
            let now = Utc::now();
            entry
                .holders
                .retain(|h| h.expires_at > now || h.owner == owner.token);
            entry.waiting.retain(|h| h.expires_at > now);
            let me = Holder {
                owner: owner.token.clone(),
                job_id: owner.job_id.clone(),
                agent: self.agent_id.clone(),
                mode: request.mode,
                acquired_at: now,
                expires_at: now + chrono::Duration::from_std(self.ttl).unwrap_or_default(),
            };
            if let Some(holder) = conflict(&entry, request.mode, &owner.token, now).cloned() {
                if line_up && request.mode == LockMode::Write {
                    // Take (or keep) a place in the line, so that no new reader comes in.
                    entry.waiting.retain(|h| h.owner != owner.token);
                    entry.waiting.push(me);
                    match self.write(&key, &entry, revision).await? {
                        Some(revision) => self.remember(&key, entry, revision),
                        None => continue,
                    }
                }
                return Ok(Acquire::Busy {
                    resource: request.resource.clone(),
                    holder,
                });
            }
            entry.holders.retain(|h| h.owner != owner.token);
            entry.waiting.retain(|h| h.owner != owner.token);
            entry.holders.push(me);
            if let Some(revision) = self.write(&key, &entry, revision).await? {
                self.remember(&key, entry, revision);
                return Ok(Acquire::Acquired);
            }
        }
    }

    /// Extends every lock of `job_id` by one ttl. `Lost` if another job holds one now.
    pub async fn renew_all(
        &self,
        requests: &[LockRequest],
        owner: &Owner,
    ) -> Result<(), LockError> {
        for request in requests {
            let key = resource_key(&request.resource)?;
            let mut recalled = self.recall(&key, false);
            loop {
                let from_memory = recalled.is_some();
                let (mut entry, revision) = match recalled.take() {
                    Some(written) => written,
                    None => self.read(&key).await?,
                };
                let now = Utc::now();
                let others_hold = entry.holders.iter().any(|h| {
                    h.owner != owner.token
                        && h.expires_at > now
                        && (request.mode == LockMode::Write || h.mode == LockMode::Write)
                });
                let mine = entry.holders.iter_mut().find(|h| h.owner == owner.token);
                let Some(mine) = mine.filter(|_| !others_hold) else {
                    // Lost is judged on the store's entry, never on a remembered one.
                    if from_memory {
                        continue;
                    }
                    return Err(LockError::Lost(request.resource.clone()));
                };
                mine.expires_at = now + chrono::Duration::from_std(self.ttl).unwrap_or_default();
                if let Some(revision) = self.write(&key, &entry, revision).await? {
                    self.remember(&key, entry, revision);
                    break;
                }
            }
        }
        Ok(())
    }

    /// Releases every lock of `job_id`; errors are logged (the lease expires anyway).
    pub async fn release_all(&self, requests: &[LockRequest], owner: &Owner) {
        for request in requests {
            if let Err(e) = self.release(&request.resource, &owner.token).await {
                tracing::warn!(resource = %request.resource, job_id = %owner.job_id, error = %e, "Lock not released; it expires with its lease");
            }
        }
    }

    async fn release(&self, resource: &str, owner_token: &str) -> Result<(), LockError> {
        let key = resource_key(resource)?;
        // A lock is released from what its taking or its last renewal wrote, without a read.
        let mut recalled = self.recall(&key, true);
        let mut lost_races = 0;
        loop {
            let from_memory = recalled.is_some();
            let (mut entry, revision) = match recalled.take() {
                Some(written) => written,
                None => self.read(&key).await?,
            };
            let before = entry.holders.len() + entry.waiting.len();
            let now = Utc::now();
            entry
                .holders
                .retain(|h| h.owner != owner_token && h.expires_at > now);
            entry
                .waiting
                .retain(|h| h.owner != owner_token && h.expires_at > now);
            let unchanged = before == 0 || entry.holders.len() + entry.waiting.len() == before;
            if unchanged && from_memory {
                // Nothing to do is judged on the store's entry, never on a remembered one.
                continue;
            }
            if before == 0 {
                return Ok(());
            }
            if entry.holders.is_empty() && entry.waiting.is_empty() {
                // Nobody holds it any more: remove the key, so finished jobs leave no entry
                // behind for every agent's status cache to replay. Compare-and-set, like a
                // write: a holder that came in meanwhile keeps its entry.
                match self.kv.purge_expect_revision(&key, Some(revision)).await {
                    Ok(()) => return Ok(()),
                    // Someone wrote since this manager did: read it.
                    Err(_) if from_memory => continue,
                    Err(e) => {
                        // The purge error does not say whether the revision moved; read again,
                        // a bounded number of times.
                        lost_races += 1;
                        if lost_races >= MAX_RELEASE_RACES {
                            return Err(LockError::Unavailable(e.to_string()));
                        }
                        continue;
                    }
                }
            }
            if unchanged {
                return Ok(());
            }
            if self.write(&key, &entry, revision).await?.is_some() {
                return Ok(());
            }
        }
    }

    /// Every unexpired holder of every resource, for `status`.
    pub async fn held(&self) -> Result<Vec<HeldLock>, LockError> {
        let mut listing = self
            .kv
            .keys()
            .await
            .map_err(|e| LockError::Unavailable(e.to_string()))?;
        // The listing repeats a key updated while it runs.
        let mut keys = std::collections::BTreeSet::new();
        while let Some(key) = listing.next().await {
            keys.insert(key.map_err(|e| LockError::Unavailable(e.to_string()))?);
        }
        let mut out = Vec::new();
        let now = Utc::now();
        for key in keys {
            if let Some(e) = self
                .kv
                .entry(key.as_str())
                .await
                .map_err(|e| LockError::Unavailable(e.to_string()))?
                .filter(|e| e.operation == kv::Operation::Put)
            {
                out.extend(held_in(&key, &e.value, now));
            }
        }
        Ok(out)
    }

    async fn read(&self, key: &str) -> Result<(LockEntry, u64), LockError> {
        match self
            .kv
            .entry(key)
            .await
            .map_err(|e| LockError::Unavailable(e.to_string()))?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                let entry = serde_json::from_slice(&e.value).unwrap_or_default();
                Ok((entry, e.revision))
            }
            Some(e) => Ok((LockEntry::default(), e.revision)),
            None => Ok((LockEntry::default(), 0)),
        }
    }

    /// Compare-and-set; the new revision, or `None` when someone else wrote first.
    async fn write(
        &self,
        key: &str,
        entry: &LockEntry,
        revision: u64,
    ) -> Result<Option<u64>, LockError> {
        let value = Bytes::from(serde_json::to_vec(entry).unwrap_or_default());
        match self.kv.update(key, value, revision).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(LockError::Unavailable(e.to_string())),
        }
    }
}

/// `terraform:prod` is stored under the key `terraform.prod`.
fn resource_key(resource: &str) -> Result<String, LockError> {
    let valid = !resource.is_empty()
        && resource.len() <= 200
        && resource.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | ':' | '.')
        })
        && !resource.contains("..")
        && !resource.starts_with(['.', ':'])
        && !resource.ends_with(['.', ':']);
    if valid {
        Ok(resource.replace(':', "."))
    } else {
        Err(LockError::InvalidResource(resource.to_string()))
    }
}

fn key_resource(key: &str) -> String {
    key.replacen('.', ":", 1)
}

/// The unexpired holders recorded in one lock entry (KV `key`, raw `value`), for `status`.
pub fn held_in(key: &str, value: &[u8], now: DateTime<Utc>) -> Vec<HeldLock> {
    let entry: LockEntry = serde_json::from_slice(value).unwrap_or_default();
    entry
        .holders
        .into_iter()
        .filter(|h| h.expires_at > now)
        .map(|holder| HeldLock {
            resource: key_resource(key),
            holder,
        })
        .collect()
}

/// The resource that leases one job to one agent at a time.
pub fn job_lease(job_id: &str) -> LockRequest {
    LockRequest::write(format!("job:{job_id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(owner: &str, mode: LockMode, expires_in: i64) -> Holder {
        let now = Utc::now();
        Holder {
            owner: owner.into(),
            job_id: format!("job-{owner}"),
            agent: "a".into(),
            mode,
            acquired_at: now,
            expires_at: now + chrono::Duration::seconds(expires_in),
        }
    }

    #[test]
    fn who_stands_in_the_way() {
        use LockMode::{Read, Write};
        let now = Utc::now();
        let entry = |holders: Vec<Holder>, waiting: Vec<Holder>| LockEntry { holders, waiting };
        // (what is there, who asks, for what, who blocks them)
        let cases = [
            ("free", entry(vec![], vec![]), "me", Read, None),
            (
                "readers share",
                entry(vec![holder("r1", Read, 30)], vec![]),
                "me",
                Read,
                None,
            ),
            (
                "a reader blocks a writer",
                entry(vec![holder("r1", Read, 30)], vec![]),
                "me",
                Write,
                Some("r1"),
            ),
            (
                "a writer blocks a reader",
                entry(vec![holder("w1", Write, 30)], vec![]),
                "me",
                Read,
                Some("w1"),
            ),
            (
                "a writer blocks a writer",
                entry(vec![holder("w1", Write, 30)], vec![]),
                "me",
                Write,
                Some("w1"),
            ),
            (
                "my own hold is no conflict",
                entry(vec![holder("me", Write, 30)], vec![]),
                "me",
                Write,
                None,
            ),
            (
                "an expired holder blocks nobody",
                entry(vec![holder("w1", Write, -1)], vec![]),
                "me",
                Write,
                None,
            ),
            (
                "a waiting writer keeps new readers out",
                entry(vec![holder("r1", Read, 30)], vec![holder("w1", Write, 30)]),
                "me",
                Read,
                Some("w1"),
            ),
            (
                "a waiting writer does not block the next writer's check against holders",
                entry(vec![], vec![holder("w1", Write, 30)]),
                "me",
                Write,
                None,
            ),
            (
                "a waiter that gave up blocks nobody",
                entry(vec![holder("r1", Read, 30)], vec![holder("w1", Write, -1)]),
                "me",
                Read,
                None,
            ),
            (
                "my own waiting place does not block me",
                entry(vec![], vec![holder("me", Write, 30)]),
                "me",
                Write,
                None,
            ),
        ];
        for (name, entry, who, mode, expected) in cases {
            let got = conflict(&entry, mode, who, now).map(|h| h.owner.as_str());
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn resource_names_map_to_keys_and_back() {
        assert_eq!(
            resource_key("terraform:prod").expect("valid"),
            "terraform.prod"
        );
        assert_eq!(key_resource("terraform.prod"), "terraform:prod");
        assert_eq!(key_resource("job.01abc"), "job:01abc");
        assert!(resource_key("Terraform:prod").is_err());
        assert!(resource_key("a b").is_err());
        assert!(resource_key("").is_err());
    }
}
