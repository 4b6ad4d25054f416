//! NATS JetStream as the durable queue and the state store.
//!
//! At start the agent creates or updates, idempotently: a work-queue stream for jobs, a limits
//! stream for job events (the audit trail), and KV buckets for job records, locks, dedup keys,
//! agent presence and small state (schedule cursors, last result per kind).
//!
//! Everything here works with nats-server 2.9: KV buckets are created as plain streams with the
//! KV conventions, because async-nats' `create_key_value` asks for account info first, which
//! fails against 2.9.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use async_nats::{Client, ConnectOptions};
use bytes::Bytes;
use infraflux_handlers::JobKind;
use infraflux_handlers::secret::Secrets;

use crate::config::{Config, NatsSection};
use infraflux_handlers::secret::SecretKey;

/// How long one JetStream request may take before the store counts as unreachable.
pub const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Agent presence entries expire this long after their last heartbeat.
pub const PRESENCE_TTL: Duration = Duration::from_secs(20);
/// Every agent heartbeats this often.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("cannot set up {what}: {reason}")]
    Setup { what: String, reason: String },
}

/// Subject, stream and bucket names, all derived from the subject prefix.
#[derive(Debug, Clone)]
pub struct Names {
    pub prefix: String,
    pub jobs_stream: String,
    pub events_stream: String,
    pub consumer: String,
    pub bucket_records: String,
    pub bucket_locks: String,
    pub bucket_dedup: String,
    pub bucket_agents: String,
    pub bucket_state: String,
    pub bucket_artifacts: String,
    pub queue_group: String,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        let upper: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        let lower = upper.to_ascii_lowercase();
        Self {
            prefix: prefix.to_string(),
            jobs_stream: format!("{upper}_JOBS"),
            events_stream: format!("{upper}_EVENTS"),
            consumer: "runner".to_string(),
            bucket_records: format!("{lower}-jobs"),
            bucket_locks: format!("{lower}-locks"),
            bucket_dedup: format!("{lower}-dedup"),
            bucket_agents: format!("{lower}-agents"),
            bucket_state: format!("{lower}-state"),
            bucket_artifacts: format!("{lower}-artifacts"),
            queue_group: format!("{lower}-agents"),
        }
    }

    pub fn job_subject(&self, kind: JobKind) -> String {
        format!("{}.jobs.{}", self.prefix, kind.as_str())
    }

    pub fn jobs_wildcard(&self) -> String {
        format!("{}.jobs.>", self.prefix)
    }

    pub fn event_subject(&self, job_id: &str) -> String {
        format!("{}.events.job.{job_id}", self.prefix)
    }

    pub fn events_wildcard(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    pub fn cmd_subject(&self, verb: &str) -> String {
        format!("{}.cmd.{verb}", self.prefix)
    }

    pub fn github_subject(&self, event: &str) -> String {
        format!("{}.github.{event}", self.prefix)
    }

    /// Broadcast (no queue group): every agent hears every cancel and acts if it runs the job.
    pub fn cancel_subject(&self) -> String {
        format!("{}.internal.cancel", self.prefix)
    }
}

/// Handles on everything the agent keeps in NATS.
#[derive(Clone)]
pub struct Store {
    pub client: Client,
    pub js: jetstream::Context,
    pub names: Names,
    pub jobs: stream::Stream,
    pub consumer: consumer::Consumer<consumer::pull::Config>,
    pub records: kv::Store,
    pub locks: kv::Store,
    pub dedup: kv::Store,
    pub agents: kv::Store,
    pub state: kv::Store,
    /// Saved plans and other artifacts handlers keep between jobs.
    pub artifacts: async_nats::jetstream::object_store::ObjectStore,
}

/// Connects with the configured credentials and TLS, reconnecting forever with backoff.
/// The connection is made in the background: the agent starts (and answers `/readyz` with 503)
/// while NATS is still unreachable.
pub async fn connect(
    nats: &NatsSection,
    secrets: &Secrets,
    name: &str,
) -> Result<Client, StoreError> {
    let mut options = ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(JETSTREAM_TIMEOUT))
        .reconnect_delay_callback(reconnect_delay);
    let err = |reason: String| StoreError::Connect {
        url: nats.url.clone(),
        reason,
    };
    if let Some(creds) = secrets.of(&SecretKey::NatsCreds) {
        options = options.credentials(creds.expose()).map_err(|e| {
            err(format!(
                "nats.creds is not a valid .creds file ({})",
                e.kind()
            ))
        })?;
    }
    if let Some(seed) = secrets.of(&SecretKey::NatsNkey) {
        options = options.nkey(seed.expose().trim().to_string());
    }
    if let Some(token) = secrets.of(&SecretKey::NatsToken) {
        options = options.token(token.expose().to_string());
    }
    if let (Some(user), Some(password)) = (&nats.user, secrets.of(&SecretKey::NatsPassword)) {
        options = options.user_and_password(user.clone(), password.expose().to_string());
    }
    if let Some(ca) = &nats.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&nats.tls_cert, &nats.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if nats.tls_required {
        options = options.require_tls(true);
    }
    let servers: Vec<async_nats::ServerAddr> = nats
        .url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    options
        .connect(servers)
        .await
        .map_err(|e| err(e.to_string()))
}

/// JetStream through `client`, with the agent's request timeout.
pub fn jetstream_of(client: Client) -> jetstream::Context {
    let mut js = jetstream::new(client);
    js.set_timeout(JETSTREAM_TIMEOUT);
    js
}

/// No wait before the first attempt (the client counts it as attempt 1), then exponential
/// backoff from 100 ms to 5 s.
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exp = u32::try_from((attempts - 2).min(6)).unwrap_or(6);
    Duration::from_millis(100 * 2u64.pow(exp)).min(Duration::from_secs(5))
}

/// How long one setup request may take: short, so a request lost in a leader election (which
/// nats-server 2.9 may leave unanswered) costs little before it is asked again.
const SETUP_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one setup step is retried before the whole setup is reported as failed (and
/// retried by the caller).
const SETUP_PATIENCE: Duration = Duration::from_secs(30);

/// Creates or updates every stream, bucket and the runner's consumer. Idempotent: every agent
/// runs it at every start, and a changed setting (a longer event retention, a new replica
/// count) is applied. A stream already as configured is not updated: on a cluster, an update
/// is a meta-group proposal that 2.9 answers only from a stream leader, and several agents
/// starting together would otherwise keep proposing. Steps run concurrently and each retries
/// on its own, so a lost request costs one short timeout, not a restart of the whole setup.
pub async fn bootstrap(client: Client, config: &Config) -> Result<Store, StoreError> {
    let js = jetstream_of(client.clone());
    let mut setup_js = jetstream::new(client.clone());
    setup_js.set_timeout(SETUP_REQUEST_TIMEOUT);
    let names = Names::new(&config.nats.subject_prefix);
    let replicas = config.nats.replicas;

    let jobs_config = stream::Config {
        name: names.jobs_stream.clone(),
        description: Some("infraflux jobs: work queue, one message per queued job".into()),
        subjects: vec![names.jobs_wildcard()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        // A second line of defence only: the dedup bucket remembers for days.
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    };
    let events_config = stream::Config {
        name: names.events_stream.clone(),
        description: Some("infraflux job events: the audit trail".into()),
        subjects: vec![names.events_wildcard()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_age: config.nats.events_max_age.get(),
        ..Default::default()
    };
    let buckets = [
        bucket_config(
            &names.bucket_records,
            "infraflux job records",
            config.nats.records_max_age.get(),
            replicas,
        ),
        bucket_config(
            &names.bucket_locks,
            "infraflux locks and job leases",
            crate::locks::bucket_max_age(config.agent.lease_ttl.get()),
            replicas,
        ),
        bucket_config(
            &names.bucket_dedup,
            "infraflux idempotency keys: deliveries, commits, schedule fires",
            config.nats.dedup_window.get(),
            replicas,
        ),
        bucket_config(
            &names.bucket_agents,
            "infraflux agents alive",
            PRESENCE_TTL,
            replicas,
        ),
        bucket_config(
            &names.bucket_state,
            "infraflux state: schedule cursors, last result per kind",
            Duration::ZERO,
            replicas,
        ),
    ];
    let mut wanted = vec![jobs_config, events_config];
    wanted.extend(buckets);
    futures::future::try_join_all(wanted.into_iter().map(|c| ensure_stream(&setup_js, c))).await?;
    ensure_object_store(&setup_js, &names.bucket_artifacts, replicas).await?;

    // The handles keep the context they were made with: the agent's, with its own timeout.
    let jobs = open_stream(&js, &names.jobs_stream).await?;
    let (records, locks, dedup, agents, state) = tokio::try_join!(
        open_bucket(&js, &names.bucket_records),
        open_bucket(&js, &names.bucket_locks),
        open_bucket(&js, &names.bucket_dedup),
        open_bucket(&js, &names.bucket_agents),
        open_bucket(&js, &names.bucket_state),
    )?;
    let artifacts = patiently(
        &format!("object store {}", names.bucket_artifacts),
        || async {
            js.get_object_store(&names.bucket_artifacts)
                .await
                .map_err(|e| e.to_string())
        },
    )
    .await?;
    let consumer = ensure_consumer(&jobs, &names, config.agent.ack_wait.get()).await?;

    Ok(Store {
        client,
        js,
        names,
        jobs,
        consumer,
        records,
        locks,
        dedup,
        agents,
        state,
        artifacts,
    })
}

impl Store {
    /// The same store seen through `client` (ingest's own connection): the handles ingest
    /// reads and writes with (the records and dedup buckets, the jobs stream) are bound to it;
    /// the others stay on this store's connection.
    pub async fn through(&self, client: Client) -> Result<Store, StoreError> {
        let js = jetstream_of(client.clone());
        let (jobs, records, dedup) = tokio::try_join!(
            open_stream(&js, &self.names.jobs_stream),
            open_bucket(&js, &self.names.bucket_records),
            open_bucket(&js, &self.names.bucket_dedup),
        )?;
        Ok(Store {
            client,
            js,
            jobs,
            records,
            dedup,
            ..self.clone()
        })
    }
}

/// A handle on stream `name`, bound to `js`'s connection.
async fn open_stream(js: &jetstream::Context, name: &str) -> Result<stream::Stream, StoreError> {
    patiently(&format!("stream {name}"), || async {
        js.get_stream(name).await.map_err(|e| e.to_string())
    })
    .await
}

/// A handle on KV bucket `name`, bound to `js`'s connection.
async fn open_bucket(js: &jetstream::Context, name: &str) -> Result<kv::Store, StoreError> {
    patiently(&format!("bucket {name}"), || async {
        js.get_key_value(name).await.map_err(|e| e.to_string())
    })
    .await
}

/// The runner's durable consumer, created when absent and updated only when its `ack_wait`
/// changed (nats-server 2.9 treats a create of an existing durable as an update of the
/// fields it allows to change).
async fn ensure_consumer(
    jobs: &stream::Stream,
    names: &Names,
    ack_wait: Duration,
) -> Result<consumer::Consumer<consumer::pull::Config>, StoreError> {
    let wanted = consumer::pull::Config {
        durable_name: Some(names.consumer.clone()),
        description: Some("infraflux runner, shared by every agent".into()),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait,
        // Redelivery is bounded by the runner (agent.max_deliveries), which records why it
        // gave up; a server-side limit would drop the message silently.
        max_deliver: -1,
        max_ack_pending: 10_000,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    };
    patiently(&format!("consumer {}", names.consumer), || async {
        match jobs
            .get_consumer::<consumer::pull::Config>(&names.consumer)
            .await
        {
            Ok(existing) if existing.cached_info().config.ack_wait == ack_wait => Ok(existing),
            _ => jobs
                .create_consumer(wanted.clone())
                .await
                .map_err(|e| e.to_string()),
        }
    })
    .await
}

/// Retries `step` with a short jittered backoff until it succeeds or [`SETUP_PATIENCE`]
/// passes; then the last error, naming `what`.
async fn patiently<T, F, Fut>(what: &str, mut step: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + SETUP_PATIENCE;
    let mut backoff = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        match step().await {
            Ok(value) => return Ok(value),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(setup(what, e)),
            Err(e) => {
                failures += 1;
                // A lost race with another agent fails once or twice; more is worth a look.
                if failures >= 3 {
                    tracing::warn!(what, error = %e, "JetStream setup step keeps failing; retrying");
                } else {
                    tracing::debug!(what, error = %e, "JetStream setup step failed; retrying");
                }
                // Agents that collided once should not collide again in step.
                let jitter = rand::random_range(0..=backoff.as_millis() as u64);
                tokio::time::sleep(backoff / 2 + Duration::from_millis(jitter / 2)).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// An object store bucket; artifacts older than a week are dropped (plans expire sooner).
/// Its backing stream takes a changed replica count like every other stream does.
async fn ensure_object_store(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<(), StoreError> {
    let name = format!("OBJ_{bucket}");
    patiently(&format!("object store {bucket}"), || async {
        match js.get_stream(&name).await {
            Ok(stream) => {
                let existing = stream.cached_info().config.clone();
                if existing.num_replicas != replicas {
                    js.update_stream(stream::Config {
                        num_replicas: replicas,
                        ..existing
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Err(e) if stream_missing(&e) => js
                .create_object_store(async_nats::jetstream::object_store::Config {
                    bucket: bucket.to_string(),
                    description: Some("infraflux artifacts: saved terraform plans".into()),
                    max_age: Duration::from_secs(7 * 86_400),
                    storage: stream::StorageType::File,
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .map(|_| ())
                // Another agent's create won: the next round finds it.
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

fn setup(what: &str, reason: impl Into<String>) -> StoreError {
    StoreError::Setup {
        what: what.to_string(),
        reason: reason.into(),
    }
}

fn stream_missing(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(ref j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Creates the stream, or updates it when a setting we own differs. A create that lost a race
/// with another agent's, or whose answer was lost, is settled by the next round's get.
async fn ensure_stream(js: &jetstream::Context, wanted: stream::Config) -> Result<(), StoreError> {
    let name = wanted.name.clone();
    patiently(&format!("stream {name}"), || async {
        match js.get_stream(&name).await {
            Ok(stream) if !differs(&stream.cached_info().config, &wanted) => Ok(()),
            Ok(_) => js
                .update_stream(wanted.clone())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) if stream_missing(&e) => {
                js.create_stream(wanted.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// Whether a setting this agent sets differs from what the server holds. Settings left at
/// their default are the server's to fill in (a duplicate window of 0 becomes 2 minutes, a
/// per-subject limit of 0 becomes -1).
fn differs(existing: &stream::Config, wanted: &stream::Config) -> bool {
    let mut have = existing.subjects.clone();
    let mut want = wanted.subjects.clone();
    have.sort();
    want.sort();
    have != want
        || existing.description != wanted.description
        || existing.retention != wanted.retention
        || existing.storage != wanted.storage
        || existing.num_replicas != wanted.num_replicas
        || existing.max_age != wanted.max_age
        || (wanted.max_messages_per_subject != 0
            && existing.max_messages_per_subject != wanted.max_messages_per_subject)
        || existing.allow_rollup != wanted.allow_rollup
        || existing.deny_delete != wanted.deny_delete
        || existing.allow_direct != wanted.allow_direct
        || existing.discard != wanted.discard
        || (wanted.duplicate_window != Duration::ZERO
            && existing.duplicate_window != wanted.duplicate_window)
}

/// A KV bucket's backing stream, with the KV conventions. With replicas, reads go to the
/// stream leader (`allow_direct: false`): with direct gets, nats-server 2.9 lets any replica
/// answer, and a replica still catching up after a restart answers with an old record (a job
/// `queued` that has run; nats-server #4162). A single replica is the leader, so it keeps the
/// cheaper direct get: a leader read is a JetStream API request answered in base64 JSON,
/// which halved webhook ingest on one server (every job reads its record and last results).
fn bucket_config(
    bucket: &str,
    description: &str,
    max_age: Duration,
    replicas: usize,
) -> stream::Config {
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_string()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: replicas <= 1,
        discard: stream::DiscardPolicy::New,
        duplicate_window: if max_age > Duration::ZERO && max_age < Duration::from_secs(120) {
            max_age
        } else {
            Duration::from_secs(120)
        },
        ..Default::default()
    }
}

/// Starts writing `key` in `kv` only if it was never written (or has expired), without waiting
/// for JetStream's answer, so the caller can send more in the same round trip: the subject and
/// header `kv::Store::create` uses first. A key deleted or purged since fails here like one that
/// exists; `kv::Store::create` tells the two apart.
pub async fn start_kv_create(
    js: &jetstream::Context,
    kv: &kv::Store,
    key: &str,
    value: Bytes,
) -> Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError> {
    let subject = format!("{}{key}", kv.put_prefix.as_ref().unwrap_or(&kv.prefix));
    publish_if_first(js, subject, value).await
}

/// Publishes `value` to be stored only if its subject holds no message yet (JetStream answers
/// "wrong last sequence" otherwise), without waiting for the answer.
pub async fn publish_if_first(
    js: &jetstream::Context,
    subject: String,
    value: Bytes,
) -> Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    js.publish_with_headers(subject, headers, value).await
}

/// Makes any string a valid KV key: kept as is when it already is one, else hashed.
pub fn kv_key(raw: &str) -> String {
    let valid = !raw.is_empty()
        && raw.len() <= 200
        && !raw.starts_with('.')
        && !raw.ends_with('.')
        && !raw.contains("..")
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '_' | '=' | '.'));
    if valid {
        raw.to_string()
    } else {
        use sha2::Digest;
        format!(
            "sha256.{}",
            hex::encode(sha2::Sha256::digest(raw.as_bytes()))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let n = Names::new("infraflux");
        assert_eq!(n.jobs_stream, "INFRAFLUX_JOBS");
        assert_eq!(n.bucket_records, "infraflux-jobs");
        assert_eq!(n.cmd_subject("backup"), "infraflux.cmd.backup");
        assert_eq!(n.event_subject("abc"), "infraflux.events.job.abc");
        let n = Names::new("lab.a-b");
        assert_eq!(n.jobs_stream, "LAB_A_B_JOBS");
        assert_eq!(n.bucket_locks, "lab_a_b-locks");
    }

    #[test]
    fn a_stream_as_configured_is_not_updated_but_a_changed_setting_is() {
        let wanted = bucket_config("infraflux-jobs", "records", Duration::ZERO, 3);
        // As the server answers: the defaults filled in.
        let mut held = wanted.clone();
        held.max_messages = -1;
        held.max_bytes = -1;
        assert!(!differs(&held, &wanted));
        let events = stream::Config {
            name: "INFRAFLUX_EVENTS".into(),
            subjects: vec!["infraflux.events.>".into()],
            num_replicas: 1,
            ..Default::default()
        };
        let mut held_events = events.clone();
        held_events.duplicate_window = Duration::from_secs(120);
        held_events.max_messages_per_subject = -1;
        assert!(!differs(&held_events, &events));
        let mut fewer = held.clone();
        fewer.num_replicas = 1;
        assert!(differs(&fewer, &wanted), "a new replica count is applied");
        let mut direct = held.clone();
        direct.allow_direct = true;
        assert!(
            differs(&direct, &wanted),
            "direct gets are switched off with replicas"
        );
        let single = bucket_config("infraflux-jobs", "records", Duration::ZERO, 1);
        assert!(single.allow_direct, "the only replica answers direct gets");
        let mut leader_reads = single.clone();
        leader_reads.allow_direct = false;
        assert!(
            differs(&leader_reads, &single),
            "a bucket made with replicas, now one, gets its direct gets back"
        );
    }

    #[test]
    fn the_first_connection_attempt_does_not_wait() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3), Duration::from_millis(200));
        assert_eq!(reconnect_delay(50), Duration::from_secs(5));
    }

    #[test]
    fn kv_keys_are_always_valid() {
        assert_eq!(
            kv_key("reconcile.owner/infra.abc123"),
            "reconcile.owner/infra.abc123"
        );
        let hashed = kv_key("cmd.some id with spaces");
        assert!(hashed.starts_with("sha256."));
        assert_eq!(hashed, kv_key("cmd.some id with spaces"));
        assert!(kv_key("a..b").starts_with("sha256."));
    }
}
