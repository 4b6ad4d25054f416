//! `etcd-snapshot`: a Talos etcd snapshot streamed from one healthy control-plane node (the next
//! one on failure) straight into an S3 multipart upload, verified against etcd's own SHA-256
//! trailer before the upload completes, optionally compressed (zstd) and encrypted (age), then
//! old snapshots pruned by retention.
//!
//! Each snapshot object has a manifest next to it (`<object>.json`: size, checksums, node, Talos
//! version). S3 takes object metadata only when an upload starts, and a streamed snapshot's
//! size and checksum are known only at its end; the manifest is written after the upload
//! completed, so its presence also marks the snapshot as good.

pub mod pipeline;
pub mod retention;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use object_store::aws::AmazonS3;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, PutMultipartOptions, PutPayload,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::command::Verb;
use crate::context::Context;
use crate::descriptor::{KindDescriptor, Requirement, no_option_requires};
use crate::handler::{
    Handler, HandlerError, JobContext, LockRequest, Outcome, RetryPolicy, TargetResult,
};
use crate::job::JobEnvelope;
use crate::kind::JobKind;
use crate::sections::Section;
use crate::settings::HumanDuration;
use crate::talos::proto::machine::EtcdSnapshotRequest;
use crate::talos::{TalosClient, status_message, to_node};
use pipeline::{PART_SIZE, PartBuffer, PartUploader, Verifier, chain};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    Zstd,
    None,
}

/// `[etcd_snapshot.retention]`: an object is kept when any present rule keeps it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Retention {
    #[serde(default)]
    pub keep_last: Option<u32>,
    #[serde(default)]
    pub max_age: Option<HumanDuration>,
    #[serde(default)]
    pub daily: Option<u32>,
    #[serde(default)]
    pub weekly: Option<u32>,
    #[serde(default)]
    pub monthly: Option<u32>,
}

/// `[etcd_snapshot]`
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub bucket: String,
    #[serde(default)]
    pub prefix: String,
    /// Absent: not encrypted.
    #[serde(default)]
    pub age_recipients: Vec<String>,
    #[serde(default = "default_compression")]
    pub compression: Compression,
    /// A snapshot smaller than this fraction of the previous one fails the job.
    #[serde(default = "default_min_size_ratio")]
    pub min_size_ratio: f64,
    /// Absent: nothing is pruned.
    #[serde(default)]
    pub retention: Option<Retention>,
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
}

fn default_compression() -> Compression {
    Compression::Zstd
}
fn default_min_size_ratio() -> f64 {
    0.5
}
fn default_timeout() -> HumanDuration {
    HumanDuration::from_secs(1800)
}

/// What the manifest next to a snapshot says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The snapshot object this manifest describes.
    pub key: String,
    pub cluster: String,
    pub node: String,
    pub talos_version: String,
    pub created_at: DateTime<Utc>,
    /// The etcd snapshot file's size, trailer included.
    pub size_bytes: u64,
    /// What is stored (after compression and encryption).
    pub stored_bytes: u64,
    pub sha256: String,
    pub db_sha256: String,
    /// SHA-256 of the stored object (after compression and encryption): what a download can
    /// be checked against without the age identity. Absent in manifests written before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_sha256: Option<String>,
    pub compression: String,
    pub encrypted: bool,
    pub job_id: String,
}

pub const KIND: JobKind = JobKind::ETCD_SNAPSHOT;
pub const SECTION: Section<Config> = Section::new("etcd_snapshot");

pub static DESCRIPTOR: KindDescriptor = KindDescriptor {
    kind: KIND,
    verbs: &[Verb {
        name: "snapshot",
        aliases: &["etcd-snapshot"],
        usage: "snapshot",
        summary: "Talos etcd snapshot to S3",
        kind: Some(KIND),
        params: Some(|_| Ok(serde_json::Map::new())),
    }],
    config: SECTION.descriptor(),
    requires: &[
        Requirement {
            section: "talos",
            why: "snapshots are taken through the Talos API",
        },
        Requirement {
            section: "s3",
            why: "snapshots are stored in S3",
        },
    ],
    option_requires: no_option_requires,
    build: |configs, context| {
        Some(std::sync::Arc::new(EtcdSnapshotHandler {
            config: SECTION.get(configs)?.clone(),
            context: context.clone(),
        }))
    },
};

/// The directory of one cluster's snapshots: `<prefix><cluster>/`.
pub fn cluster_dir(config: &Config, cluster: &str) -> String {
    format!("{}{cluster}/", config.prefix)
}

/// Every snapshot in `cluster_dir`, and the manifest of the newest good one: the snapshot job
/// compares with it and prunes from the list, the restore drill restores it.
pub async fn inventory(
    store: &AmazonS3,
    cluster_dir: &str,
) -> Result<(Vec<retention::Stored>, Option<Manifest>), HandlerError> {
    let prefix = ObjectPath::from(cluster_dir);
    let mut objects = Vec::new();
    let mut listing = store.list(Some(&prefix));
    while let Some(meta) = listing.next().await {
        let meta = meta.map_err(|e| crate::s3::error("listing the bucket", &e))?;
        objects.push(meta.location.to_string());
    }
    let mut stored = Vec::new();
    for key in objects.iter().filter(|k| !k.ends_with(".json")) {
        let name = key.rsplit('/').next().unwrap_or_default();
        let Some(at) = name
            .get(..16)
            .and_then(|t| chrono::NaiveDateTime::parse_from_str(t, "%Y%m%dT%H%M%SZ").ok())
        else {
            continue; // not ours: never touched
        };
        stored.push(retention::Stored {
            key: key.clone(),
            at: at.and_utc(),
            good: objects.contains(&format!("{key}.json")),
        });
    }
    let newest = stored.iter().filter(|s| s.good).max_by_key(|s| s.at);
    let manifest = match newest {
        Some(s) => {
            let bytes = store
                .get(&ObjectPath::from(format!("{}.json", s.key)))
                .await
                .map_err(|e| crate::s3::error("reading a manifest", &e))?
                .bytes()
                .await
                .map_err(|e| crate::s3::error("reading a manifest", &e))?;
            serde_json::from_slice(&bytes).ok()
        }
        None => None,
    };
    Ok((stored, manifest))
}

/// `e` with `note` added to its message (for what was left behind).
fn with_note(e: HandlerError, note: &str) -> HandlerError {
    if note.is_empty() {
        return e;
    }
    match e {
        HandlerError::Failed(m) => HandlerError::Failed(format!("{m}{note}")),
        HandlerError::Retryable(m) => HandlerError::Retryable(format!("{m}{note}")),
        HandlerError::Internal(m) => HandlerError::Internal(format!("{m}{note}")),
        other => other,
    }
}

pub struct EtcdSnapshotHandler {
    pub config: Config,
    pub context: Context,
}

/// Why one node's attempt ended.
enum Attempt {
    /// Try the next node.
    Next(String),
    Cancelled,
    /// Not a node's fault: stop.
    Stop(HandlerError),
}

impl EtcdSnapshotHandler {
    fn cluster_dir(&self) -> String {
        cluster_dir(&self.config, &self.context.cluster)
    }

    fn talos_client(&self) -> Result<TalosClient, HandlerError> {
        self.context.talos_client()
    }

    fn store(&self) -> Result<Arc<AmazonS3>, HandlerError> {
        self.context.s3_bucket(&self.config.bucket)
    }

    /// The S3 endpoint, for messages: which server failed.
    fn s3_at(&self) -> &str {
        self.context
            .s3
            .as_ref()
            .map_or("(no [s3] section)", |s3| s3.endpoint.as_str())
    }

    /// Aborts a failed upload, trying again while S3 is away (see [`PartUploader::abort`]);
    /// what the job's message should add: nothing, or that parts were left behind.
    async fn abandon(&self, ctx: &JobContext, upload: PartUploader, key: &str) -> String {
        match upload.abort(pipeline::ABORT_RETRY_FOR, &ctx.cancel).await {
            Ok(aborted) => {
                tracing::info!(%key, attempts = aborted.attempts, took = ?aborted.took, "Upload aborted");
                String::new()
            }
            Err(e) => {
                tracing::warn!(%key, error = %e, "Aborting the upload failed; its parts stay until an S3 lifecycle rule removes them");
                format!(
                    "; aborting the upload failed too, its parts stay in the bucket until an S3 lifecycle rule removes them ({e})"
                )
            }
        }
    }

    #[tracing::instrument(name = "snapshot_node", skip_all, fields(endpoint = %endpoint, node = %node))]
    async fn snapshot_from(
        &self,
        ctx: &JobContext,
        talos: &TalosClient,
        endpoint: &str,
        node: &str,
        store: &AmazonS3,
        previous: Option<&Manifest>,
    ) -> Result<Manifest, Attempt> {
        let mut client = talos
            .machine(endpoint)
            .await
            .map_err(|e| Attempt::Next(e.to_string()))?;
        let status = client
            .etcd_status(to_node((), node))
            .await
            .map_err(|s| Attempt::Next(format!("{node}: etcd status: {}", status_message(&s))))?
            .into_inner();
        let unhealthy = status.messages.iter().find_map(|m| {
            let errors = m
                .member_status
                .as_ref()
                .map(|s| s.errors.clone())
                .unwrap_or_default();
            let node_error = m
                .metadata
                .as_ref()
                .map(|md| md.error.clone())
                .unwrap_or_default();
            (!errors.is_empty() || !node_error.is_empty()).then(|| {
                format!(
                    "{node}: etcd is not healthy: {}{}",
                    node_error,
                    errors.join("; ")
                )
            })
        });
        if let Some(reason) = unhealthy {
            return Err(Attempt::Next(reason));
        }
        let version = client
            .version(to_node((), node))
            .await
            .ok()
            .and_then(|r| r.into_inner().messages.into_iter().next())
            .and_then(|m| m.version)
            .map(|v| v.tag)
            .unwrap_or_else(|| "unknown".into());
        ctx.progress
            .report(&format!(
                "streaming an etcd snapshot from {node} (Talos {version})"
            ))
            .await;
        let mut stream = client
            .etcd_snapshot(to_node(EtcdSnapshotRequest {}, node))
            .await
            .map_err(|s| Attempt::Next(format!("{node}: etcd snapshot: {}", status_message(&s))))?
            .into_inner();

        let created_at = Utc::now();
        let encrypted = !self.config.age_recipients.is_empty();
        let mut key = format!(
            "{}{}-{}.db",
            self.cluster_dir(),
            created_at.format("%Y%m%dT%H%M%SZ"),
            node.replace([':', '/'], "-")
        );
        if self.config.compression == Compression::Zstd {
            key.push_str(".zst");
        }
        if encrypted {
            key.push_str(".age");
        }
        let compression = match self.config.compression {
            Compression::Zstd => "zstd",
            Compression::None => "none",
        };
        let mut attributes = Attributes::new();
        for (k, v) in [
            ("cluster", self.context.cluster.clone()),
            ("node", node.to_string()),
            ("talos-version", version.clone()),
            ("compression", compression.to_string()),
            (
                "encryption",
                if encrypted {
                    "age".into()
                } else {
                    "none".into()
                },
            ),
            ("job", ctx.job_id.clone()),
        ] {
            attributes.insert(Attribute::Metadata(k.into()), v.into());
        }
        // Before the upload starts: a bad recipient must not leave an upload open.
        let recipients = pipeline::recipients(&self.config.age_recipients)
            .map_err(|e| Attempt::Stop(HandlerError::Failed(e)))?;
        let path = ObjectPath::from(key.clone());
        let upload = store
            .put_multipart_opts(
                &path,
                PutMultipartOptions {
                    attributes,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| {
                Attempt::Stop(crate::s3::error(
                    &format!("starting the upload of {key} to S3 at {}", self.s3_at()),
                    &e,
                ))
            })?;

        let mut upload = PartUploader::new(upload);
        let buffer = PartBuffer::default();
        let level = (self.config.compression == Compression::Zstd).then_some(3);
        let uploading_part = format!("uploading a part of {key} to S3 at {}", self.s3_at());
        let streamed: Result<pipeline::Verified, Attempt> = async {
            let mut stage = chain(buffer.clone(), level, &recipients)
                .map_err(|e| Attempt::Stop(HandlerError::Internal(e.to_string())))?;
            let mut verifier = Verifier::default();
            loop {
                let next = tokio::select! {
                    () = ctx.cancel.cancelled() => return Err(Attempt::Cancelled),
                    next = stream.message() => next,
                };
                match next {
                    Ok(Some(data)) => {
                        if let Some(error) = data.metadata.as_ref().map(|m| m.error.clone()).filter(|e| !e.is_empty()) {
                            return Err(Attempt::Next(format!("{node}: {error}")));
                        }
                        verifier.update(&data.bytes);
                        stage.write_all(&data.bytes).map_err(|e| Attempt::Stop(HandlerError::Internal(e.to_string())))?;
                        upload.flush(&buffer, PART_SIZE)
                            .await
                            .map_err(|e| Attempt::Stop(crate::s3::error(&uploading_part, &e)))?;
                    }
                    Ok(None) => break,
                    Err(s) => return Err(Attempt::Next(format!("{node}: the stream broke: {}", status_message(&s)))),
                }
            }
            stage.finish().map_err(|e| Attempt::Stop(HandlerError::Internal(e.to_string())))?;
            upload.flush(&buffer, 1)
                .await
                .map_err(|e| Attempt::Stop(crate::s3::error(&uploading_part, &e)))?;
            let verified = verifier.verify().map_err(|e| Attempt::Next(format!("{node}: {e}")))?;
            if let Some(prev) = previous {
                let floor = prev.size_bytes as f64 * self.config.min_size_ratio;
                if (verified.size as f64) < floor {
                    return Err(Attempt::Stop(HandlerError::Failed(format!(
                        "the snapshot from {node} is {} bytes, less than {:.0}% of the previous one ({} bytes): refusing to store it as good",
                        verified.size,
                        self.config.min_size_ratio * 100.0,
                        prev.size_bytes
                    ))));
                }
            }
            Ok(verified)
        }
        .await;
        let verified = match streamed {
            Ok(v) => v,
            Err(e) => {
                let note = self.abandon(ctx, upload, &key).await;
                return Err(match e {
                    Attempt::Stop(e) => Attempt::Stop(with_note(e, &note)),
                    Attempt::Next(reason) => Attempt::Next(format!("{reason}{note}")),
                    Attempt::Cancelled => Attempt::Cancelled,
                });
            }
        };
        let stored = match upload.complete().await {
            Ok(stored) => stored,
            Err(e) => {
                let note = self.abandon(ctx, upload, &key).await;
                return Err(Attempt::Stop(with_note(
                    crate::s3::error(
                        &format!("completing the upload of {key} to S3 at {}", self.s3_at()),
                        &e,
                    ),
                    &note,
                )));
            }
        };
        let manifest = Manifest {
            key: key.clone(),
            cluster: self.context.cluster.clone(),
            node: node.to_string(),
            talos_version: version,
            created_at,
            size_bytes: verified.size,
            stored_bytes: stored.bytes,
            sha256: verified.file_sha256,
            db_sha256: verified.db_sha256,
            stored_sha256: Some(stored.sha256),
            compression: compression.to_string(),
            encrypted,
            job_id: ctx.job_id.clone(),
        };
        let body = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        store
            .put(
                &ObjectPath::from(format!("{key}.json")),
                PutPayload::from(body),
            )
            .await
            .map_err(|e| {
                Attempt::Stop(HandlerError::Retryable(format!(
                    "writing the manifest of {key}: {e}"
                )))
            })?;
        Ok(manifest)
    }

    /// Takes one snapshot, from the first control plane that gives a good one, verifies and
    /// stores it with its manifest. The upgrade calls it in process: a separate snapshot job
    /// would wait for the cluster lock the upgrade holds.
    pub async fn take(&self, ctx: &JobContext, store: &AmazonS3) -> Result<Manifest, HandlerError> {
        let talos = self.talos_client()?;
        let (_, previous) = inventory(store, &self.cluster_dir()).await?;
        let mut failures = Vec::new();
        for (endpoint, node) in talos.targets() {
            match self
                .snapshot_from(ctx, &talos, &endpoint, &node, store, previous.as_ref())
                .await
            {
                Ok(manifest) => return Ok(manifest),
                Err(Attempt::Next(reason)) => {
                    tracing::warn!(%endpoint, %reason, "Snapshot from this node failed; trying the next");
                    ctx.progress
                        .report(&format!("{reason}; trying the next node"))
                        .await;
                    failures.push(reason);
                }
                Err(Attempt::Cancelled) => return Err(HandlerError::Cancelled),
                Err(Attempt::Stop(e)) => return Err(e),
            }
        }
        let corrupt = failures
            .iter()
            .any(|f| f.contains("corrupt") || f.contains("trailer") || f.contains("empty"));
        let message = format!(
            "no control-plane node gave a good snapshot: {}",
            failures.join("; ")
        );
        // A corrupt snapshot is not fixed by asking again at once; an unreachable node may be.
        Err(if corrupt {
            HandlerError::Failed(message)
        } else {
            HandlerError::Retryable(message)
        })
    }

    #[tracing::instrument(name = "retention", skip_all)]
    async fn prune(&self, store: &AmazonS3) -> Result<usize, HandlerError> {
        let Some(rules) = &self.config.retention else {
            return Ok(0);
        };
        let (stored, _) = inventory(store, &self.cluster_dir()).await?;
        let doomed = retention::to_delete(&stored, rules, Utc::now());
        for key in &doomed {
            for object in [key.clone(), format!("{key}.json")] {
                match store.delete(&ObjectPath::from(object.clone())).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        return Err(HandlerError::Retryable(format!("pruning {object}: {e}")));
                    }
                }
            }
        }
        Ok(doomed.len())
    }
}

#[async_trait]
impl Handler for EtcdSnapshotHandler {
    fn kind(&self) -> JobKind {
        JobKind::ETCD_SNAPSHOT
    }

    /// A read lock: snapshots and backups run together; an upgrade's write lock excludes them.
    fn locks(&self, _job: &JobEnvelope) -> Vec<LockRequest> {
        vec![LockRequest::read(format!(
            "cluster:{}",
            self.context.cluster
        ))]
    }

    fn timeout(&self) -> Duration {
        self.config.timeout.get()
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::exponential(3, Duration::from_secs(30), Duration::from_secs(300))
    }

    async fn run(&self, ctx: &JobContext, _job: &JobEnvelope) -> Result<Outcome, HandlerError> {
        let started = std::time::Instant::now();
        let store = self.store()?;
        let manifest = self.take(ctx, &store).await?;
        // The snapshot is stored: a pruning error must not make the job retry and take another.
        let (pruned, prune_note) = match self.prune(&store).await {
            Ok(n) => (n, format!("{n} old snapshot(s) pruned")),
            Err(e) => {
                tracing::warn!(error = %e, "Pruning old snapshots failed; the next run tries again");
                (0, format!("pruning failed, the next run tries again: {e}"))
            }
        };
        Ok(Outcome::Succeeded {
            message: format!(
                "etcd snapshot of {} (Talos {}): {} bytes verified, {} bytes stored{}{}; {}",
                manifest.node,
                manifest.talos_version,
                manifest.size_bytes,
                manifest.stored_bytes,
                if manifest.compression == "zstd" {
                    ", zstd"
                } else {
                    ""
                },
                if manifest.encrypted {
                    ", age-encrypted"
                } else {
                    ""
                },
                prune_note
            ),
            result: TargetResult::put_into(
                &[TargetResult {
                    size_bytes: Some(manifest.size_bytes),
                    ..TargetResult::ok(self.context.cluster.clone())
                }],
                json!({
                    "bucket": self.config.bucket,
                    "object": manifest.key,
                    "node": manifest.node,
                    "talos_version": manifest.talos_version,
                    "size_bytes": manifest.size_bytes,
                    "stored_bytes": manifest.stored_bytes,
                    "sha256": manifest.sha256,
                    "db_sha256": manifest.db_sha256,
                    "stored_sha256": manifest.stored_sha256,
                    "pruned": pruned,
                    "duration_seconds": started.elapsed().as_secs_f64(),
                }),
            ),
        })
    }
}
