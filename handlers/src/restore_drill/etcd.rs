//! The etcd drill: the newest good snapshot from S3, restored with `etcdctl snapshot restore`
//! and read by a throwaway `etcd` on loopback.
//!
//! The stored object is streamed from S3 through age decryption and zstd decompression into a
//! file of the job's working directory (bounded buffers: memory stays flat whatever the size),
//! checked against etcd's own SHA-256 trailer and the manifest's digests, restored into a data
//! directory next to it and served by an `etcd` on free loopback ports, whose `/registry/` keys
//! are then counted and looked up. The server is stopped and the directory deleted at the end,
//! also on failure, timeout and cancel.
//!
//! Without `[restore_drill] age_identity` an encrypted snapshot cannot be read: the drill then
//! downloads the stored object, checks it against the manifest's `stored_sha256`, and says that
//! the restore itself was not tried.

use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use chrono::Utc;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::aws::AmazonS3;
use object_store::path::Path as ObjectPath;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{CheckResult, DrillReport, RestoreDrillHandler, human};
use crate::etcd_snapshot::pipeline::{Verified, Verifier};
use crate::etcd_snapshot::{self, Manifest};
use crate::handler::JobContext;
use crate::process::{Background, ChildOutput, run_cancellable};
use crate::secret::SecretKey;

/// Keys every Kubernetes cluster has.
pub const WELL_KNOWN_KEYS: [&str; 2] = [
    "/registry/namespaces/default",
    "/registry/namespaces/kube-system",
];
/// Downloaded chunks waiting for the decoder: with S3's chunks of at most a few hundred KiB,
/// a few MiB at most.
const CHUNKS_IN_FLIGHT: usize = 8;
/// The decoder's read and write buffers.
const DECODE_BUFFER: usize = 1 << 20;
/// etcd's member name in the throwaway cluster.
const MEMBER: &str = "drill";

/// Drills the newest good etcd snapshot.
pub async fn drill(drill: &RestoreDrillHandler, ctx: &JobContext) -> DrillReport {
    let mut report = DrillReport::default();
    let scratch = ctx.work_dir.join("etcd-drill");
    let mut server = None;
    if let Err(why) = run(drill, ctx, &scratch, &mut report, &mut server).await {
        report.fail(why);
    }
    match clean_up(server, &scratch, ctx.kill_grace).await {
        Ok(()) => report.cleaned_up = true,
        Err(why) => report.fail(why),
    }
    report
}

/// Stops the throwaway etcd and deletes everything the drill wrote.
async fn clean_up(
    server: Option<Background>,
    scratch: &Path,
    grace: Duration,
) -> Result<(), String> {
    if let Some(server) = server {
        let stopped = server.stop(grace).await;
        if stopped.forced {
            tracing::warn!("The drill's etcd ignored SIGINT and was killed");
        }
    }
    match tokio::fs::remove_dir_all(scratch).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!(
            "could not delete the drill's data in {}: {e}",
            scratch.display()
        )),
    }
}

/// Soft cancel: stop before the next step.
fn step(ctx: &JobContext, next: &str) -> Result<(), String> {
    if ctx.stop_requested.is_cancelled() {
        Err(format!("cancelled before {next}"))
    } else {
        Ok(())
    }
}

async fn run(
    drill: &RestoreDrillHandler,
    ctx: &JobContext,
    scratch: &Path,
    report: &mut DrillReport,
    server: &mut Option<Background>,
) -> Result<(), String> {
    let snapshots = drill.snapshots.as_ref().ok_or(
        "the etcd drill needs the [etcd_snapshot] section: it restores the snapshots of its bucket",
    )?;
    if drill.context.s3.is_none() {
        return Err("the etcd drill needs the [s3] section: the snapshots are in S3".into());
    }
    let store = drill
        .context
        .s3_bucket(&snapshots.bucket)
        .map_err(|e| e.to_string())?;
    let dir = etcd_snapshot::cluster_dir(snapshots, &drill.context.cluster);
    let (_, newest) = etcd_snapshot::inventory(&store, &dir)
        .await
        .map_err(|e| e.to_string())?;
    let manifest = newest.ok_or_else(|| {
        format!(
            "no good snapshot (one with its manifest) in s3://{}/{dir}",
            snapshots.bucket
        )
    })?;
    report.backup = Some(manifest.key.clone());
    report.backup_created_at = Some(manifest.created_at);
    report.extra.insert(
        "snapshot_talos_version".into(),
        Value::from(manifest.talos_version.clone()),
    );
    let age = (Utc::now() - manifest.created_at)
        .to_std()
        .unwrap_or_default();
    report.data_age_seconds = Some(age.as_secs());
    let max_age = drill.config.max_data_age.get();
    if age > max_age {
        return Err(format!(
            "the newest snapshot, {}, is {} old: older than max_data_age ({})",
            manifest.key,
            human(age),
            drill.config.max_data_age
        ));
    }
    let compressed = match manifest.compression.as_str() {
        "zstd" => true,
        "none" => false,
        other => {
            return Err(format!(
                "the manifest of {} names an unknown compression {other:?}",
                manifest.key
            ));
        }
    };
    let identity = if manifest.encrypted {
        match &drill.config.age_identity {
            Some(_) => Some(identity(drill)?),
            None => None,
        }
    } else {
        None
    };
    let restore = !manifest.encrypted || identity.is_some();
    report
        .extra
        .insert("restore_tried".into(), Value::from(restore));
    step(ctx, "the download")?;
    tokio::fs::create_dir_all(scratch)
        .await
        .map_err(|e| format!("creating {}: {e}", scratch.display()))?;
    let started = Instant::now();
    ctx.progress
        .report(&format!("etcd drill: downloading {}", manifest.key))
        .await;
    let file = scratch.join("snapshot.db");
    let decode = restore.then(|| Decode {
        identity,
        compressed,
        out: file.clone(),
    });
    let downloaded = download(&store, &manifest, decode, &ctx.cancel).await?;
    let stored_ok = check_stored(&manifest, &downloaded, report);
    if !restore {
        report.checks.push(CheckResult::new(
            "restore: not tried (no [restore_drill] age_identity)",
            true,
            "the snapshot is age-encrypted and the drill holds no identity to decrypt it: only the stored object was checked, the restore itself was not tried",
        ));
        report.extra.insert(
            "snapshot_etcd_version".into(),
            Value::from("unknown (not decrypted)"),
        );
        return stored_ok;
    }
    stored_ok?;
    let Some(decoded) = downloaded.decoded else {
        return Err("internal error: the snapshot was not decoded".into());
    };
    report.extra.insert(
        "snapshot_etcd_version".into(),
        Value::from(decoded.versions.describe()),
    );
    let verified = match decoded.verified {
        Ok(v) => {
            report.checks.push(CheckResult::new(
                "etcd sha256 trailer",
                true,
                format!("{} bytes, the database hashes to its trailer", v.size),
            ));
            v
        }
        Err(why) => {
            report
                .checks
                .push(CheckResult::new("etcd sha256 trailer", false, why.clone()));
            return Err(why);
        }
    };
    let digests_match = verified.file_sha256 == manifest.sha256
        && verified.db_sha256 == manifest.db_sha256
        && verified.size == manifest.size_bytes;
    report.checks.push(CheckResult::new(
        "manifest checksums",
        digests_match,
        if digests_match {
            "size, file and database SHA-256 as the manifest says".to_string()
        } else {
            format!(
                "the decrypted snapshot ({} bytes, sha256 {}) is not the one the manifest describes ({} bytes, sha256 {})",
                verified.size, verified.file_sha256, manifest.size_bytes, manifest.sha256
            )
        },
    ));
    if !digests_match {
        return Err("the decrypted snapshot does not match its manifest".into());
    }

    step(ctx, "the restore")?;
    let tools = Tools::of(drill, ctx);
    let etcdctl_version = tools.version(&tools.etcdctl, &["version"]).await?;
    let etcd_version = tools.version(&tools.etcd, &["--version"]).await?;
    report
        .extra
        .insert("etcd_version".into(), Value::from(etcd_version));
    report.extra.insert(
        "etcdctl_version".into(),
        Value::from(etcdctl_version.clone()),
    );
    report.extra.insert(
        "restored_with".into(),
        Value::from(format!("etcdctl {etcdctl_version}")),
    );
    let (client_port, peer_port) = (free_port()?, free_port()?);
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let client_url = format!("http://127.0.0.1:{client_port}");
    let data_dir = scratch.join("data");
    ctx.progress
        .report("etcd drill: etcdctl snapshot restore")
        .await;
    let restored = tools
        .run(
            &tools.etcdctl,
            &[
                "snapshot".as_ref(),
                "restore".as_ref(),
                file.as_os_str(),
                "--data-dir".as_ref(),
                data_dir.as_os_str(),
                "--name".as_ref(),
                MEMBER.as_ref(),
                "--initial-cluster".as_ref(),
                format!("{MEMBER}={peer_url}").as_ref(),
                "--initial-advertise-peer-urls".as_ref(),
                peer_url.as_ref(),
            ],
            drill.config.restore_timeout.get(),
        )
        .await;
    let restored = restored.and_then(|out| succeeded("etcdctl snapshot restore", out));
    report.checks.push(CheckResult::new(
        "restore",
        restored.is_ok(),
        match &restored {
            Ok(()) => format!("etcdctl {etcdctl_version} restored it"),
            Err(why) => why.clone(),
        },
    ));
    if let Err(why) = restored {
        return Err(format!("the restore failed: {why}"));
    }
    // The data directory holds a copy: the downloaded file is no longer needed.
    let _ = tokio::fs::remove_file(&file).await;

    step(ctx, "starting etcd")?;
    let mut cmd = tools.command(&tools.etcd);
    cmd.args(["--name", MEMBER, "--data-dir"])
        .arg(&data_dir)
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("{MEMBER}={peer_url}")]);
    let started_server = Background::spawn(cmd).map_err(|e| e.to_string())?;
    ctx.progress
        .report("etcd drill: waiting for the restored etcd to answer")
        .await;
    let mut ready = tools
        .wait_ready(
            server.insert(started_server),
            &client_url,
            drill.config.ready_timeout.get(),
        )
        .await;
    if let Err(why) = &mut ready {
        // What etcd said is why it did not serve: stop it now to read its output.
        if let Some(stopped) = server.take() {
            let said = last_lines(&stopped.stop(ctx.kill_grace).await.stderr);
            if !said.is_empty() {
                why.push_str(&format!("; etcd said: {said}"));
            }
        }
    }
    report.checks.push(CheckResult::new(
        "etcd serves the restored data",
        ready.is_ok(),
        match &ready {
            Ok(()) => format!("etcd answered on {client_url}"),
            Err(why) => why.clone(),
        },
    ));
    ready?;

    step(ctx, "reading the keys")?;
    let count = tools.count(&client_url, "/registry/", true).await?;
    report.checks.push(CheckResult::new(
        format!("registry keys: {count}"),
        count > 0,
        if count > 0 {
            format!("{count} keys under /registry/")
        } else {
            "no key under /registry/: an empty etcd, or not a Kubernetes one".to_string()
        },
    ));
    for key in WELL_KNOWN_KEYS {
        let found = tools.count(&client_url, key, false).await? == 1;
        let name = key.rsplit('/').next().unwrap_or(key);
        report.checks.push(CheckResult::new(
            format!("namespace {name}"),
            found,
            if found {
                format!("{key} is there")
            } else {
                format!("{key} is missing")
            },
        ));
    }
    report.rto_seconds = Some(started.elapsed().as_secs_f64());
    if let Some(failed) = report.checks.iter().find(|c| !c.ok) {
        return Err(format!("the restored etcd failed a check: {}", failed.name));
    }
    Ok(())
}

/// The identity from `[restore_drill] age_identity`: an age identity file (comments allowed)
/// or a bare `AGE-SECRET-KEY-1...`. No error names the value.
fn identity(drill: &RestoreDrillHandler) -> Result<age::x25519::Identity, String> {
    let secret = drill
        .context
        .secrets
        .of(&SecretKey::DrillAgeIdentity)
        .ok_or("restore_drill.age_identity is not resolved")?;
    parse_identity(secret.expose())
}

pub fn parse_identity(text: &str) -> Result<age::x25519::Identity, String> {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| l.parse::<age::x25519::Identity>().ok())
        .ok_or_else(|| {
            "restore_drill.age_identity is not an age X25519 identity (AGE-SECRET-KEY-1...)"
                .to_string()
        })
}

/// How to turn the stored bytes back into the snapshot file.
struct Decode {
    identity: Option<age::x25519::Identity>,
    compressed: bool,
    out: PathBuf,
}

struct Downloaded {
    stored_bytes: u64,
    stored_sha256: String,
    /// Present when the snapshot was decoded to a file.
    decoded: Option<Decoded>,
}

struct Decoded {
    /// etcd's own check of the file.
    verified: Result<Verified, String>,
    versions: SnapshotVersions,
}

/// Streams the stored object, hashing it; with `decode`, through age and zstd into a file.
async fn download(
    store: &AmazonS3,
    manifest: &Manifest,
    decode: Option<Decode>,
    cancel: &CancellationToken,
) -> Result<Downloaded, String> {
    let got = store
        .get(&ObjectPath::from(manifest.key.clone()))
        .await
        .map_err(|e| format!("downloading {}: {e}", manifest.key))?;
    let mut stream = got.into_stream();
    let (mut tx, decoder) = match decode {
        Some(decode) => {
            let (tx, rx) = mpsc::channel::<Bytes>(CHUNKS_IN_FLIGHT);
            let reader = ChannelReader {
                rx,
                current: Bytes::new(),
            };
            (
                Some(tx),
                Some(tokio::task::spawn_blocking(move || {
                    decode_to_file(reader, decode)
                })),
            )
        }
        None => (None, None),
    };
    let mut hasher = Sha256::new();
    let mut stored_bytes = 0u64;
    let fed: Result<(), String> = loop {
        let next = tokio::select! {
            () = cancel.cancelled() => break Err("cancelled during the download".into()),
            next = stream.next() => next,
        };
        let chunk = match next {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => break Err(format!("downloading {}: {e}", manifest.key)),
            None => break Ok(()),
        };
        hasher.update(&chunk);
        stored_bytes += chunk.len() as u64;
        if let Some(sender) = &tx {
            let sent = tokio::select! {
                () = cancel.cancelled() => break Err("cancelled during the download".into()),
                sent = sender.send(chunk) => sent,
            };
            if sent.is_err() {
                // The decoder stopped: its error says why. The digest still needs every byte.
                tx = None;
            }
        }
    };
    // The end of the stream for the decoder; after a cancel it ends at once on a short read.
    drop(tx);
    let decoded = match decoder {
        Some(task) => Some(
            task.await
                .map_err(|e| format!("the decoder stopped: {e}"))
                .and_then(|r| r),
        ),
        None => None,
    };
    fed?;
    let decoded = match decoded {
        Some(Ok(d)) => Some(d),
        Some(Err(why)) => return Err(why),
        None => None,
    };
    Ok(Downloaded {
        stored_bytes,
        stored_sha256: hex::encode(hasher.finalize()),
        decoded,
    })
}

/// The stored object against the manifest's size and `stored_sha256`, as checks.
fn check_stored(
    manifest: &Manifest,
    downloaded: &Downloaded,
    report: &mut DrillReport,
) -> Result<(), String> {
    let size_ok = downloaded.stored_bytes == manifest.stored_bytes;
    report.checks.push(CheckResult::new(
        "stored object size",
        size_ok,
        format!(
            "{} bytes downloaded, the manifest says {}",
            downloaded.stored_bytes, manifest.stored_bytes
        ),
    ));
    let sha_ok = match &manifest.stored_sha256 {
        Some(expected) => {
            let ok = *expected == downloaded.stored_sha256;
            report.checks.push(CheckResult::new(
                "stored object sha256",
                ok,
                if ok {
                    format!("{expected}, as the manifest says")
                } else {
                    format!(
                        "the download hashes to {}, the manifest says {expected}",
                        downloaded.stored_sha256
                    )
                },
            ));
            ok
        }
        None => {
            report.checks.push(CheckResult::new(
                "stored object sha256: not checked",
                true,
                "the manifest was written before manifests held stored_sha256: the check could not be made",
            ));
            true
        }
    };
    if size_ok && sha_ok {
        Ok(())
    } else {
        Err(format!(
            "the stored object {} is not what its manifest describes",
            manifest.key
        ))
    }
}

/// The blocking side of the download: downloaded chunks as a `Read`.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

/// age → zstd → file, verifying etcd's trailer and looking for the snapshot's etcd version on
/// the way. Runs on a blocking thread.
fn decode_to_file(input: impl Read + Send + 'static, decode: Decode) -> Result<Decoded, String> {
    let mut reader: Box<dyn Read + Send> = Box::new(input);
    if let Some(identity) = &decode.identity {
        let decryptor = age::Decryptor::new_buffered(io::BufReader::with_capacity(1 << 16, reader))
            .map_err(|e| format!("the stored object is not an age file: {e}"))?;
        reader = Box::new(
            decryptor
                .decrypt(std::iter::once(identity as &dyn age::Identity))
                .map_err(|e| format!("decrypting with restore_drill.age_identity: {e}"))?,
        );
    }
    if decode.compressed {
        reader =
            Box::new(zstd::stream::read::Decoder::new(reader).map_err(|e| format!("zstd: {e}"))?);
    }
    let file = std::fs::File::create(&decode.out)
        .map_err(|e| format!("creating {}: {e}", decode.out.display()))?;
    let mut out = BufWriter::with_capacity(DECODE_BUFFER, file);
    let mut verifier = Verifier::default();
    let mut versions = SnapshotVersions::default();
    let mut buf = vec![0u8; DECODE_BUFFER];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("decrypting and decompressing the snapshot: {e}")),
        };
        verifier.update(&buf[..n]);
        versions.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| format!("writing {}: {e}", decode.out.display()))?;
    }
    out.flush()
        .map_err(|e| format!("writing {}: {e}", decode.out.display()))?;
    Ok(Decoded {
        verified: verifier.verify(),
        versions,
    })
}

/// What a snapshot says of the etcd that wrote it. bbolt stores a key and its value side by
/// side in a leaf page, so the `cluster` bucket's `clusterVersion` (`3.4.0`: the cluster's
/// major.minor, written by etcd 3.4 and later) and the `meta` bucket's `storageVersion`
/// (written by etcd 3.6 and later) can be read off the bytes without a bbolt reader. A value
/// found more than once with different contents (a Kubernetes object that happens to hold the
/// same text) makes it unknown rather than a guess.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SnapshotVersions {
    cluster: Vec<String>,
    storage: Vec<String>,
    /// The end of the previous chunk, for a match across two.
    carry: Vec<u8>,
}

static VERSION_KEYS: LazyLock<Option<regex::bytes::Regex>> = LazyLock::new(|| {
    regex::bytes::Regex::new(r"(clusterVersion|storageVersion)([0-9]{1,2}\.[0-9]{1,3}\.[0-9]{1,3})")
        .ok()
});
/// Longer than a whole match.
const CARRY: usize = 40;

impl SnapshotVersions {
    pub fn update(&mut self, chunk: &[u8]) {
        let Some(re) = VERSION_KEYS.as_ref() else {
            return;
        };
        // A match seen both on the seam and in a chunk is the same value, kept once.
        if !self.carry.is_empty() {
            let mut seam = self.carry.clone();
            seam.extend_from_slice(&chunk[..chunk.len().min(CARRY)]);
            self.collect(re, &seam);
        }
        self.collect(re, chunk);
        let keep = chunk.len().min(CARRY);
        self.carry.extend_from_slice(&chunk[chunk.len() - keep..]);
        let excess = self.carry.len().saturating_sub(CARRY);
        self.carry.drain(..excess);
    }

    fn collect(&mut self, re: &regex::bytes::Regex, bytes: &[u8]) {
        for found in re.captures_iter(bytes) {
            let (Some(key), Some(value)) = (found.get(1), found.get(2)) else {
                continue;
            };
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            let list = if key.as_bytes() == b"clusterVersion" {
                &mut self.cluster
            } else {
                &mut self.storage
            };
            if !list.contains(&value) {
                list.push(value);
            }
        }
    }

    /// `3.6.0 (storage version)`, `3.4 (cluster version)` or `unknown`.
    pub fn describe(&self) -> String {
        match (self.storage.as_slice(), self.cluster.as_slice()) {
            ([storage], _) => format!("{storage} (storage version)"),
            ([], [cluster]) => {
                let major_minor: Vec<&str> = cluster.split('.').take(2).collect();
                format!("{} (cluster version)", major_minor.join("."))
            }
            _ => "unknown".to_string(),
        }
    }
}

/// The etcd binaries and the environment they run in.
struct Tools<'a> {
    etcdctl: String,
    etcd: String,
    env: &'a [(String, String)],
    cancel: &'a CancellationToken,
    grace: Duration,
}

impl<'a> Tools<'a> {
    fn of(drill: &'a RestoreDrillHandler, ctx: &'a JobContext) -> Tools<'a> {
        Tools {
            etcdctl: drill.config.etcdctl_bin.clone(),
            etcd: drill.config.etcd_bin.clone(),
            env: &drill.context.tool_env,
            cancel: &ctx.cancel,
            grace: ctx.kill_grace,
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("ETCDCTL_API", "3");
        cmd
    }

    /// Runs `program args` to its end, at most `limit`; cancelled with the job.
    async fn run(
        &self,
        program: &str,
        args: &[&std::ffi::OsStr],
        limit: Duration,
    ) -> Result<ChildOutput, String> {
        let mut cmd = self.command(program);
        cmd.args(args);
        let stop = self.cancel.child_token();
        let timer = {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(limit).await;
                stop.cancel();
            })
        };
        let out = run_cancellable(cmd, &stop, self.grace).await;
        timer.abort();
        out.map_err(|e| {
            if stop.is_cancelled() && !self.cancel.is_cancelled() {
                format!(
                    "{program} took longer than {}",
                    humantime::format_duration(limit)
                )
            } else {
                e.to_string()
            }
        })
    }

    /// The version a binary prints (`etcd Version: 3.4.23`, `etcdctl version: 3.4.23`).
    async fn version(&self, program: &str, args: &[&str]) -> Result<String, String> {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        let out = self.run(program, &args, Duration::from_secs(30)).await?;
        parse_version(&out.stdout)
            .ok_or_else(|| format!("{program} printed no version: {}", last_lines(&out.stderr)))
    }

    /// Polls `endpoint health` until etcd answers, it exits, or `limit` passes.
    async fn wait_ready(
        &self,
        server: &mut Background,
        client_url: &str,
        limit: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = server.exited() {
                return Err(format!(
                    "etcd exited ({status}) before it served the restored data"
                ));
            }
            let health = self
                .run(
                    &self.etcdctl,
                    &[
                        "--endpoints".as_ref(),
                        client_url.as_ref(),
                        "--dial-timeout=1s".as_ref(),
                        "--command-timeout=2s".as_ref(),
                        "endpoint".as_ref(),
                        "health".as_ref(),
                    ],
                    Duration::from_secs(10),
                )
                .await;
            if self.cancel.is_cancelled() {
                return Err("cancelled while waiting for etcd".into());
            }
            if health.is_ok_and(|out| out.status.success()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "etcd did not answer on {client_url} within {} (ready_timeout)",
                    humantime::format_duration(limit)
                ));
            }
            tokio::select! {
                () = self.cancel.cancelled() => return Err("cancelled while waiting for etcd".into()),
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// How many keys `key` (with `prefix`, every key under it) names.
    async fn count(&self, client_url: &str, key: &str, prefix: bool) -> Result<u64, String> {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--endpoints".as_ref(),
            client_url.as_ref(),
            "get".as_ref(),
            key.as_ref(),
            "--keys-only".as_ref(),
            "--limit=1".as_ref(),
            "-w".as_ref(),
            "json".as_ref(),
        ];
        if prefix {
            args.push("--prefix".as_ref());
        }
        let out = self
            .run(&self.etcdctl, &args, Duration::from_secs(60))
            .await?;
        if !out.status.success() {
            return Err(format!("etcdctl get {key}: {}", last_lines(&out.stderr)));
        }
        parse_count(&out.stdout).ok_or_else(|| format!("etcdctl get {key} printed no count"))
    }
}

/// `etcdctl get -w json` prints `count` (the keys in range, whatever `--limit`); none at all
/// when there are none.
pub fn parse_count(json: &str) -> Option<u64> {
    let value: Value = serde_json::from_str(json.trim()).ok()?;
    value.get("header")?;
    Some(value.get("count").and_then(Value::as_u64).unwrap_or(0))
}

/// The version in `etcd --version` or `etcdctl version` output.
pub fn parse_version(output: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let (label, version) = line.split_once(':')?;
        let version = version.trim();
        (label.trim().ends_with("ersion")
            && !label.contains("API")
            && !label.contains("Go")
            && version.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .then(|| version.to_string())
    })
}

fn succeeded(what: &str, out: ChildOutput) -> Result<(), String> {
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} exited with {}: {}",
            out.status,
            last_lines(&out.stderr)
        ))
    }
}

/// Where a tool's output says what went wrong: a Go `panic:` or an `Error:` line (a panic's
/// stack trace after it says nothing to an operator), else its last lines.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if let Some(said) = lines
        .iter()
        .find(|l| l.starts_with("panic:") || l.starts_with("Error:"))
    {
        return said.to_string();
    }
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// A free loopback port: bound and released, for etcd to bind next.
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use age::secrecy::ExposeSecret;

    #[test]
    fn counts_and_versions_are_read_from_etcdctl_output() {
        let some = r#"{"header":{"cluster_id":1,"revision":3},"kvs":[{"key":"L3JlZw=="}],"more":true,"count":1234}"#;
        assert_eq!(parse_count(some), Some(1234));
        assert_eq!(
            parse_count(r#"{"header":{"cluster_id":1,"revision":3}}"#),
            Some(0)
        );
        assert_eq!(parse_count("Error: context deadline exceeded"), None);
        assert_eq!(
            parse_version("etcd Version: 3.4.23\nGit SHA: x\nGo Version: go1.19.8\n").as_deref(),
            Some("3.4.23")
        );
        assert_eq!(
            parse_version("etcdctl version: 3.5.17\nAPI version: 3.5\n").as_deref(),
            Some("3.5.17")
        );
        assert_eq!(parse_version("usage: etcd"), None);
        assert_eq!(
            last_lines(
                "{\"level\":\"info\"}\npanic: page 3 already freed\n\ngoroutine 1 [running]:\nmain.main()\n"
            ),
            "panic: page 3 already freed"
        );
        assert_eq!(last_lines("a\nb\nc\nd\n"), "b | c | d");
    }

    #[test]
    fn an_identity_file_parses_and_a_bad_one_is_refused_without_its_text() {
        let identity = age::x25519::Identity::generate();
        let secret = identity.to_string();
        let file = format!(
            "# created: 2026-01-01\n# public key: {}\n{}\n",
            identity.to_public(),
            secret.expose_secret()
        );
        let parsed = parse_identity(&file).expect("an identity file");
        assert_eq!(
            parsed.to_public().to_string(),
            identity.to_public().to_string()
        );
        let err = parse_identity("AGE-SECRET-KEY-1NOTAKEY")
            .err()
            .expect("refused");
        assert!(!err.contains("NOTAKEY"), "{err}");
        assert!(err.contains("restore_drill.age_identity"), "{err}");
    }

    #[test]
    fn the_snapshots_etcd_version_is_found_whatever_the_chunking() {
        let mut bytes = vec![7u8; 5000];
        bytes.extend_from_slice(b"\x00clusterVersion3.5.0key");
        bytes.extend_from_slice(&[9u8; 3000]);
        for chunk in [1, 5, 17, 64, 4096, 100_000] {
            let mut v = SnapshotVersions::default();
            bytes.chunks(chunk).for_each(|c| v.update(c));
            assert_eq!(v.describe(), "3.5 (cluster version)", "chunk {chunk}");
        }
        let mut newer = bytes.clone();
        newer.extend_from_slice(b"storageVersion3.6.0");
        let mut v = SnapshotVersions::default();
        v.update(&newer);
        assert_eq!(v.describe(), "3.6.0 (storage version)");
        let mut ambiguous = bytes.clone();
        ambiguous.extend_from_slice(b"clusterVersion3.4.0");
        let mut v = SnapshotVersions::default();
        v.update(&ambiguous);
        assert_eq!(v.describe(), "unknown");
        assert_eq!(SnapshotVersions::default().describe(), "unknown");
    }

    #[test]
    fn a_stored_object_is_checked_against_its_manifest() {
        let manifest = Manifest {
            key: "prod/lab/x.db.zst.age".into(),
            cluster: "lab".into(),
            node: "10.5.0.2".into(),
            talos_version: "v1.13.9".into(),
            created_at: Utc::now(),
            size_bytes: 1056,
            stored_bytes: 3,
            sha256: "00".into(),
            db_sha256: "00".into(),
            stored_sha256: Some(hex::encode(Sha256::digest(b"abc"))),
            compression: "zstd".into(),
            encrypted: true,
            job_id: "j".into(),
        };
        let good = Downloaded {
            stored_bytes: 3,
            stored_sha256: hex::encode(Sha256::digest(b"abc")),
            decoded: None,
        };
        let mut report = DrillReport::default();
        assert!(check_stored(&manifest, &good, &mut report).is_ok());
        assert!(report.checks.iter().all(|c| c.ok), "{report:?}");
        let tampered = Downloaded {
            stored_sha256: hex::encode(Sha256::digest(b"abd")),
            ..good
        };
        let mut report = DrillReport::default();
        assert!(check_stored(&manifest, &tampered, &mut report).is_err());
        assert!(
            report
                .checks
                .iter()
                .any(|c| c.name == "stored object sha256" && !c.ok),
            "{report:?}"
        );
        let old = Manifest {
            stored_sha256: None,
            ..manifest
        };
        let mut report = DrillReport::default();
        assert!(check_stored(&old, &tampered, &mut report).is_ok());
        assert!(
            report
                .checks
                .iter()
                .any(|c| c.name.contains("not checked") && c.message.contains("could not be made")),
            "{report:?}"
        );
    }

    #[test]
    fn the_decoder_streams_age_and_zstd_back_into_the_snapshot() {
        use crate::etcd_snapshot::pipeline::{PartBuffer, chain};
        let identity = age::x25519::Identity::generate();
        let mut db: Vec<u8> = (0..512 * 300).map(|i| (i * 7 % 253) as u8).collect();
        db.extend_from_slice(b"clusterVersion3.4.0");
        db.resize(512 * 301, 0);
        let mut file = db.clone();
        file.extend_from_slice(&Sha256::digest(&db));
        let buffer = PartBuffer::default();
        let mut stage = chain(buffer.clone(), Some(3), &[identity.to_public()]).expect("chain");
        stage.write_all(&file).expect("write");
        stage.finish().expect("finish");
        let stored = buffer.take();
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("snapshot.db");
        let decoded = decode_to_file(
            io::Cursor::new(stored.clone()),
            Decode {
                identity: Some(identity),
                compressed: true,
                out: out.clone(),
            },
        )
        .expect("decoded");
        let verified = decoded.verified.expect("trailer holds");
        assert_eq!(verified.file_sha256, hex::encode(Sha256::digest(&file)));
        assert_eq!(std::fs::read(&out).expect("read"), file);
        assert_eq!(decoded.versions.describe(), "3.4 (cluster version)");
        // Another identity cannot read it, and says where the identity comes from.
        let err = decode_to_file(
            io::Cursor::new(stored),
            Decode {
                identity: Some(age::x25519::Identity::generate()),
                compressed: true,
                out,
            },
        )
        .err()
        .expect("refused");
        assert!(err.contains("restore_drill.age_identity"), "{err}");
    }
}
