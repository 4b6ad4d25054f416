//! Backups end to end: real etcd snapshots through a fake Talos API (mutual TLS) into a real S3
//! server, decrypted and restored with etcdctl; Velero backups against a fake Kubernetes API
//! whose fake controller moves the phases.

use std::io::Read;

use age::secrecy::ExposeSecret;
use std::path::PathBuf;
use std::time::Duration;

use infraflux_tests::fakes::FakeKube;
use infraflux_tests::peers::{Etcd, S3Server, restore_snapshot};
use infraflux_tests::talos_fake::{FAKE_NODE, FakeTalos, SnapshotSource};
use infraflux_tests::tcp_proxy::TcpProxy;
use infraflux_tests::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Shared with the restore drill's tests (etcd_drill.rs), which drill what this lab stores.
pub(crate) struct SnapLab {
    pub(crate) _nats: Nats,
    pub(crate) s3: S3Server,
    pub(crate) talos: FakeTalos,
    pub(crate) agent: TestAgent,
    pub(crate) client: async_nats::Client,
    pub(crate) identity: age::x25519::Identity,
    pub(crate) snapshot_file: PathBuf,
    pub(crate) dir: tempfile::TempDir,
}

/// The identity is also in the agent's environment as `TEST_AGE_IDENTITY`, for a config that
/// references it (`[restore_drill] age_identity = "env:TEST_AGE_IDENTITY"`).
pub(crate) const KEYS: [(&str, &str); 5] = [
    ("/registry/namespaces/media", "media"),
    ("/registry/namespaces/home", "home"),
    ("/registry/namespaces/default", "default"),
    ("/registry/namespaces/kube-system", "kube-system"),
    ("/infraflux/drill", "restorable"),
];

pub(crate) async fn snap_lab(extra: &str, dead_endpoint_first: bool) -> SnapLab {
    init();
    let s3 = S3Server::start("etcd").await;
    snap_lab_on(s3, "testing-secret", extra, dead_endpoint_first).await
}

/// The snapshot lab against `s3`, the agent signing with `s3_secret`.
async fn snap_lab_on(
    s3: S3Server,
    s3_secret: &str,
    extra: &str,
    dead_endpoint_first: bool,
) -> SnapLab {
    let endpoint = s3.endpoint.clone();
    snap_lab_at(s3, &endpoint, "", s3_secret, extra, dead_endpoint_first).await
}

/// [`snap_lab_on`] with the agent reaching S3 at `agent_endpoint` (a proxy in front of `s3`)
/// and `s3_extra` added to its `[s3]` section.
async fn snap_lab_at(
    s3: S3Server,
    agent_endpoint: &str,
    s3_extra: &str,
    s3_secret: &str,
    extra: &str,
    dead_endpoint_first: bool,
) -> SnapLab {
    init();
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    // A real etcd with real keys, and its real snapshot.
    let snapshot_file = dir.path().join("snapshot.db");
    {
        let etcd = Etcd::start(&dir.path().join("etcd"), "cp-1", free_port()).await;
        for (k, v) in KEYS {
            etcd.put(k, v);
        }
        etcd.snapshot(&snapshot_file);
    }
    let dead = if dead_endpoint_first {
        vec![format!("127.0.0.1:{}", free_port())]
    } else {
        vec![]
    };
    let talos = FakeTalos::start(SnapshotSource::File(snapshot_file.clone()), &dead).await;
    let talosconfig = dir.path().join("talosconfig");
    std::fs::write(&talosconfig, talos.talosconfig()).expect("talosconfig");
    let identity = age::x25519::Identity::generate();
    let toml = format!(
        r#"
[talos]
talosconfig = "{talosconfig}"
cluster = "lab"

[s3]
endpoint = "{endpoint}"
access_key_id = "env:TEST_S3_KEY"
secret_access_key = "env:TEST_S3_SECRET"
path_style = true
{s3_extra}

[etcd_snapshot]
bucket = "etcd"
prefix = "prod/"
age_recipients = ["{recipient}"]
compression = "zstd"
{extra}
"#,
        talosconfig = talosconfig.display(),
        endpoint = agent_endpoint,
        recipient = identity.to_public(),
    );
    let identity_text = identity.to_string();
    let agent = start_agent_with_env(
        &nats,
        "snapshotter",
        &toml,
        &[
            ("TEST_S3_KEY", "testing"),
            ("TEST_S3_SECRET", s3_secret),
            ("TEST_AGE_IDENTITY", identity_text.expose_secret()),
        ],
        |_| {},
    )
    .await;
    let client = nats.client().await;
    SnapLab {
        _nats: nats,
        s3,
        talos,
        agent,
        client,
        identity,
        snapshot_file,
        dir,
    }
}

impl SnapLab {
    pub(crate) async fn snapshot(&self) -> Value {
        let job = submit(&self.client, "snapshot").await;
        wait_settled(&self.client, &job, Duration::from_secs(60)).await
    }

    /// Objects under the cluster's directory, sorted.
    pub(crate) async fn objects(&self) -> Vec<String> {
        let mut keys = self.s3.keys("etcd").await;
        keys.sort();
        keys
    }

    fn decrypt(&self, stored: &[u8]) -> Vec<u8> {
        let decryptor = age::Decryptor::new(stored).expect("an age file");
        let mut reader = decryptor
            .decrypt(std::iter::once(&self.identity as &dyn age::Identity))
            .expect("decrypts with the identity");
        let mut compressed = Vec::new();
        reader.read_to_end(&mut compressed).expect("read");
        zstd::decode_all(&compressed[..]).expect("zstd")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_snapshot_is_streamed_verified_encrypted_stored_and_restores_with_its_keys() {
    let lab = snap_lab("", true).await;
    let done = lab.snapshot().await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let message = done["message"].as_str().unwrap_or_default();
    assert!(message.contains("Talos v1.13.9"), "{message}");
    assert!(message.contains("zstd, age-encrypted"), "{message}");
    // The first endpoint answered nothing; through the second, the talosconfig's node served it.
    assert_eq!(lab.talos.snapshot_nodes(), [FAKE_NODE]);

    let objects = lab.objects().await;
    assert_eq!(
        objects.len(),
        2,
        "the snapshot and its manifest: {objects:?}"
    );
    let key = done["result"]["object"]
        .as_str()
        .expect("object key")
        .to_string();
    assert!(
        key.starts_with("prod/lab/") && key.ends_with(&format!("-{FAKE_NODE}.db.zst.age")),
        "{key}"
    );
    assert!(objects.contains(&format!("{key}.json")), "{objects:?}");
    let original = std::fs::read(&lab.snapshot_file).expect("snapshot file");
    let manifest: Value = serde_json::from_slice(&lab.s3.get("etcd", &format!("{key}.json")).await)
        .expect("manifest");
    assert_eq!(manifest["size_bytes"], original.len() as u64);
    assert_eq!(manifest["sha256"], hex::encode(Sha256::digest(&original)));
    assert_eq!(
        manifest["db_sha256"],
        hex::encode(&original[original.len() - 32..])
    );
    assert_eq!(manifest["cluster"], "lab");
    assert_eq!(manifest["talos_version"], "v1.13.9");

    // Download, decrypt, decompress: the same bytes, and etcd restores them with its keys.
    let stored = lab.s3.get("etcd", &key).await;
    assert!(
        !stored.windows(5).any(|w| w == b"media"),
        "stored encrypted"
    );
    // The stored object's digest, for a drill that cannot decrypt it.
    assert_eq!(
        manifest["stored_sha256"],
        hex::encode(Sha256::digest(&stored))
    );
    assert_eq!(manifest["stored_bytes"], stored.len() as u64);
    let restored_file = lab.dir.path().join("restored.db");
    std::fs::write(&restored_file, lab.decrypt(&stored)).expect("write");
    assert_eq!(std::fs::read(&restored_file).expect("read"), original);
    let data_dir = lab.dir.path().join("restored-etcd");
    let peer = free_port();
    restore_snapshot(&restored_file, &data_dir, "cp-1", peer)
        .expect("etcdctl snapshot restore accepts it");
    let etcd = Etcd::start(&data_dir, "cp-1", peer).await;
    for (k, v) in KEYS {
        assert_eq!(etcd.get(k).as_deref(), Some(v), "{k} after restore");
    }
    assert_eq!(lab.s3.pending_uploads("etcd").await, 0);
    let metrics = metrics_text(&lab.agent.http).await;
    assert!(
        metrics.contains(
            "infraflux_last_success_timestamp_seconds{kind=\"etcd-snapshot\",target=\"lab\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "infraflux_last_size_bytes{{kind=\"etcd-snapshot\",target=\"lab\"}} {}",
            original.len()
        )),
        "{metrics}"
    );
    lab.agent.stop().await;

    // An agent that did not run the job exports the same, from the shared last result.
    let observer = start_agent(&lab._nats, "observer", "", |_| {}).await;
    let expected = format!(
        "infraflux_last_size_bytes{{kind=\"etcd-snapshot\",target=\"lab\"}} {}",
        original.len()
    );
    wait_for(
        Duration::from_secs(15),
        "the observer to export the last snapshot size",
        || async {
            metrics_text(&observer.http)
                .await
                .contains(&expected)
                .then_some(())
        },
    )
    .await;
    observer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_s3_secret_fails_the_snapshot_at_once_naming_the_keys_and_stores_nothing() {
    // s3s-fs checks SigV4 (moto accepts any signature): the agent signs with a secret the server
    // does not hold, as with a MinIO credential rotated on one side only.
    let s3 = S3Server::start_s3s_fs("etcd", "testing", "the-current-secret").await;
    let lab = snap_lab_on(s3, "a-rotated-away-secret", "", false).await;
    let done = lab.snapshot().await;
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(
        done["attempts"], 1,
        "refused credentials are not retried: {done}"
    );
    let message = done["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("S3 refused the agent's credentials")
            && message.contains("s3.secret_access_key"),
        "{message}"
    );
    assert!(!message.contains("a-rotated-away-secret"), "{message}");
    assert!(lab.s3.files("etcd").is_empty(), "nothing stored");
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_with_one_flipped_byte_is_rejected_and_nothing_is_left_in_the_bucket() {
    let lab = snap_lab("", false).await;
    lab.talos.set(|b| b.flip_byte = Some(4097));
    let done = lab.snapshot().await;
    assert_eq!(done["state"], "failed", "{done}");
    let message = done["message"].as_str().unwrap_or_default();
    assert!(message.contains("corrupt"), "{message}");
    assert!(lab.objects().await.is_empty(), "nothing stored");
    assert_eq!(
        lab.s3.pending_uploads("etcd").await,
        0,
        "the multipart upload was aborted"
    );
    // The same bytes, as etcd's own restore sees them: it refuses them too.
    let mut corrupt = std::fs::read(&lab.snapshot_file).expect("read");
    corrupt[4097] ^= 0x01;
    let file = lab.dir.path().join("corrupt.db");
    std::fs::write(&file, corrupt).expect("write");
    let refused = restore_snapshot(&file, &lab.dir.path().join("never"), "cp-1", free_port());
    assert!(refused.expect_err("etcdctl refuses it").contains("sha256"));
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_many_parts_is_stored_in_order_and_a_late_corruption_aborts_them_all() {
    let lab = snap_lab("", false).await;
    // Pseudo-random bytes do not compress: about four 8 MiB parts, several on the wire at once.
    let size: u64 = 30 << 20;
    lab.talos
        .set(|b| b.source = SnapshotSource::Synthetic { size });
    let done = lab.snapshot().await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let key = done["result"]["object"].as_str().expect("object key");
    let stored = lab.s3.get("etcd", key).await;
    assert!(
        stored.len() as u64 > 3 * (8 << 20),
        "several parts: {}",
        stored.len()
    );
    let file = lab.decrypt(&stored);
    // Shaped like etcd's: the database is whole 512-byte pages, then 32 bytes of SHA-256.
    assert!(size - file.len() as u64 <= 512, "{}", file.len());
    // etcd's own check holds only if the parts were put together in order.
    let (db, trailer) = file.split_at(file.len() - 32);
    assert_eq!(Sha256::digest(db).as_slice(), trailer, "parts in order");
    let manifest: Value = serde_json::from_slice(&lab.s3.get("etcd", &format!("{key}.json")).await)
        .expect("manifest");
    assert_eq!(manifest["size_bytes"], file.len() as u64);
    assert_eq!(manifest["sha256"], hex::encode(Sha256::digest(&file)));
    // Hashed part by part as they were sent: the same digest as the object put together.
    assert_eq!(
        manifest["stored_sha256"],
        hex::encode(Sha256::digest(&stored))
    );

    // A bit flipped near the end, after parts were already uploaded: the upload is aborted.
    lab.talos.set(|b| b.flip_byte = Some(size - 4096));
    let before = lab.objects().await;
    let failed = lab.snapshot().await;
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(lab.objects().await, before, "nothing new stored");
    assert_eq!(
        lab.s3.pending_uploads("etcd").await,
        0,
        "no parts left behind"
    );
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_gone_mid_upload_fails_the_attempt_naming_s3_aborts_once_back_and_the_retry_stores_it() {
    init();
    let s3 = S3Server::start("etcd").await;
    let proxy = TcpProxy::start(s3.endpoint.trim_start_matches("http://")).await;
    let agent_endpoint = format!("http://{}", proxy.addr);
    // Each S3 request is retried for 2 s: an outage longer than that fails the part.
    let lab = snap_lab_at(
        s3,
        &agent_endpoint,
        "retry_timeout = \"2s\"",
        "testing-secret",
        "",
        false,
    )
    .await;
    // About four 8 MiB parts; S3 goes away in the middle of the second, for 12 s.
    let size: u64 = 30 << 20;
    lab.talos
        .set(|b| b.source = SnapshotSource::Synthetic { size });
    let outage = Duration::from_secs(12);
    proxy.cut_after(12 << 20, outage);
    let job = submit(&lab.client, "snapshot").await;
    wait_for(Duration::from_secs(60), "S3 to go away", || async {
        proxy.is_down().then_some(())
    })
    .await;
    let gone_at = std::time::Instant::now();
    let mut back_after = None;
    let failed = wait_for(Duration::from_secs(90), "the first attempt to fail", || {
        if back_after.is_none() && !proxy.is_down() {
            back_after = Some(gone_at.elapsed());
        }
        let client = lab.client.clone();
        let job = job.clone();
        async move {
            let r = record(&client, &job).await;
            r["message"]
                .as_str()
                .unwrap_or_default()
                .contains("attempt 1 failed")
                .then_some(r)
        }
    })
    .await;
    let failed_after = gone_at.elapsed();
    eprintln!(
        "S3 gone for {outage:?}: back after {back_after:?}, the attempt failed (upload aborted) after {failed_after:?}"
    );
    let message = failed["message"].as_str().unwrap_or_default();
    eprintln!("the first attempt: {message}");
    // Retried by the kind's policy: 3 attempts, 30 s then 60 s apart.
    assert_eq!(failed["state"], "queued", "{failed}");
    assert!(
        message.contains(&format!("S3 at {agent_endpoint}")) && message.contains("retrying in 30s"),
        "{message}"
    );
    assert!(!message.contains("aborting the upload failed"), "{message}");
    assert!(!message.contains("testing-secret"), "{message}");
    // The abort was tried until S3 answered again: the attempt ended only once it was back.
    assert!(failed_after >= outage, "{failed_after:?}");
    assert!(
        lab.objects().await.is_empty(),
        "no object and no manifest claims a good snapshot"
    );
    assert_eq!(
        lab.s3.pending_uploads("etcd").await,
        0,
        "the multipart upload was aborted"
    );

    let done = wait_settled(&lab.client, &job, Duration::from_secs(90)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
    let key = done["result"]["object"].as_str().expect("object key");
    assert_eq!(
        lab.objects().await,
        [key.to_string(), format!("{key}.json")],
        "the retry stored one snapshot and its manifest"
    );
    let file = lab.decrypt(&lab.s3.get("etcd", key).await);
    let (db, trailer) = file.split_at(file.len() - 32);
    assert_eq!(Sha256::digest(db).as_slice(), trailer);
    assert_eq!(lab.s3.pending_uploads("etcd").await, 0);
    lab.agent.stop().await;
}

/// A stored snapshot from earlier runs: data object and, for good ones, its manifest.
pub(crate) fn stamp(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y%m%dT%H%M%SZ").to_string()
}

fn month_start_of(at: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    use chrono::{Datelike, TimeZone};
    chrono::Utc
        .with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
        .single()
        .expect("a month's first second")
}

pub(crate) async fn seed(lab: &SnapLab, stamp: &str, size: u64, good: bool) -> String {
    let key = format!("prod/lab/{stamp}-127.0.0.1.db.zst.age");
    lab.s3.put("etcd", &key, b"old".to_vec()).await;
    if good {
        let manifest = json!({
            "key": key, "cluster": "lab", "node": "127.0.0.1", "talos_version": "v1.13.8",
            "created_at": chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ").expect("stamp").and_utc(),
            "size_bytes": size, "stored_bytes": 3, "sha256": "00", "db_sha256": "00",
            "compression": "zstd", "encrypted": true, "job_id": "01jd0000000000000000000000",
        });
        lab.s3
            .put(
                "etcd",
                &format!("{key}.json"),
                serde_json::to_vec(&manifest).expect("json"),
            )
            .await;
    }
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_after_a_good_upload_leaves_exactly_the_expected_objects() {
    let lab = snap_lab(
        "[etcd_snapshot.retention]\nkeep_last = 2\nmonthly = 2\n",
        false,
    )
    .await;
    // Retention counts months from now, so the seeds are placed relative to now: two in this
    // month just before the new snapshot, one in the previous month, one two months back.
    let now = chrono::Utc::now();
    let month_start = month_start_of(now);
    let recent = |minutes: i64| (now - chrono::Duration::minutes(minutes)).max(month_start);
    let previous_month = month_start - chrono::Duration::days(2);
    let two_months_back = month_start_of(previous_month) - chrono::Duration::days(15);
    let oldest = seed(&lab, &stamp(two_months_back), 1000, true).await;
    let last_month = seed(&lab, &stamp(previous_month), 1000, true).await;
    let debris = seed(&lab, &stamp(recent(3)), 1000, false).await;
    let earlier_this_month = seed(&lab, &stamp(recent(4)), 1000, true).await;
    let latest_this_month = seed(&lab, &stamp(recent(2)), 1000, true).await;
    let done = lab.snapshot().await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(
        done["message"]
            .as_str()
            .unwrap_or_default()
            .contains("3 old snapshot(s) pruned"),
        "{done}"
    );
    let new = done["result"]["object"].as_str().expect("key").to_string();
    let mut expected: Vec<String> = [&new, &latest_this_month, &last_month]
        .iter()
        .flat_map(|k| [k.to_string(), format!("{k}.json")])
        .collect();
    expected.sort();
    // keep_last = 2: the new one and the latest of this month. monthly = 2: the newest of this
    // month (the new one) and of last month. The oldest, the earlier one of this month and the
    // incomplete debris go.
    assert_eq!(lab.objects().await, expected);
    for gone in [oldest, debris, earlier_this_month] {
        assert!(!lab.objects().await.contains(&gone));
    }
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_far_smaller_than_the_previous_one_fails_and_is_not_stored() {
    let lab = snap_lab("min_size_ratio = 0.5", false).await;
    let size = std::fs::metadata(&lab.snapshot_file).expect("size").len();
    let previous = seed(
        &lab,
        &stamp(chrono::Utc::now() - chrono::Duration::hours(1)),
        size * 10,
        true,
    )
    .await;
    let done = lab.snapshot().await;
    assert_eq!(done["state"], "failed", "{done}");
    assert!(
        done["message"]
            .as_str()
            .unwrap_or_default()
            .contains("less than 50% of the previous one"),
        "{done}"
    );
    assert_eq!(
        lab.objects().await,
        [previous.clone(), format!("{previous}.json")]
    );
    assert_eq!(lab.s3.pending_uploads("etcd").await, 0);
    lab.agent.stop().await;
}

struct VeleroLab {
    _nats: Nats,
    kube: FakeKube,
    agent: TestAgent,
    client: async_nats::Client,
    _dir: tempfile::TempDir,
}

async fn velero_lab(extra: &str) -> VeleroLab {
    init();
    let nats = Nats::start();
    let kube = FakeKube::start("velero").await;
    kube.add_storage_location(
        "velero",
        "default",
        "Available",
        chrono::Duration::seconds(30),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        "[kubernetes]\nkubeconfig = \"{}\"\n\n[backup]\nvelero_namespace = \"velero\"\n{extra}\n",
        kube.kubeconfig(dir.path()).display()
    );
    let agent = start_agent(&nats, "velero-agent", &toml, |_| {}).await;
    let client = nats.client().await;
    VeleroLab {
        _nats: nats,
        kube,
        agent,
        client,
        _dir: dir,
    }
}

impl VeleroLab {
    async fn backup(&self, command: &str) -> Value {
        let job = submit(&self.client, command).await;
        wait_settled(&self.client, &job, Duration::from_secs(30)).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn velero_backups_report_completed_partially_failed_failed_and_an_unavailable_location() {
    let lab = velero_lab("").await;
    lab.kube.set_backup_outcome(json!({"phase": "Completed", "progress": {"itemsBackedUp": 120, "totalItems": 120}, "warnings": 1, "errors": 0}));
    let done = lab.backup("backup ns=media,home ttl=72h").await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(
        done["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Completed: 120/120 items, 1 warnings, 0 errors"),
        "{done}"
    );
    let name = format!("infraflux-{}", done["job_id"].as_str().expect("id"));
    let created = lab
        .kube
        .object("backups", "velero", &name)
        .expect("the Backup object");
    assert_eq!(
        created["spec"]["includedNamespaces"],
        json!(["media", "home"])
    );
    assert_eq!(created["spec"]["ttl"], "72h0m0s");
    assert_eq!(created["spec"]["storageLocation"], "default");
    assert_eq!(
        created["metadata"]["labels"]["infraflux.io/job"],
        done["job_id"]
    );
    assert_eq!(done["result"]["items"], 120);

    lab.kube.set_backup_outcome(json!({"phase": "PartiallyFailed", "progress": {"itemsBackedUp": 110, "totalItems": 120}, "warnings": 0, "errors": 3}));
    let partial = lab.backup("backup").await;
    assert_eq!(partial["state"], "failed", "{partial}");
    assert!(
        partial["message"]
            .as_str()
            .unwrap_or_default()
            .contains("PartiallyFailed (110/120 items, 0 warnings, 3 errors)"),
        "{partial}"
    );

    lab.kube.set_backup_outcome(json!({"phase": "Failed", "failureReason": "error getting backup store: InvalidAccessKeyId", "progress": {}}));
    let failed = lab.backup("backup").await;
    assert_eq!(failed["state"], "failed");
    assert!(
        failed["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Failed: error getting backup store: InvalidAccessKeyId"),
        "{failed}"
    );

    let before = lab.kube.objects("backups").len();
    lab.kube.add_storage_location(
        "velero",
        "default",
        "Unavailable",
        chrono::Duration::seconds(30),
    );
    let unavailable = lab.backup("backup").await;
    assert_eq!(unavailable["state"], "failed");
    assert!(
        unavailable["message"]
            .as_str()
            .unwrap_or_default()
            .contains("is Unavailable"),
        "{unavailable}"
    );
    assert!(
        unavailable["message"]
            .as_str()
            .unwrap_or_default()
            .contains("InvalidAccessKeyId"),
        "{unavailable}"
    );
    assert_eq!(
        lab.kube.objects("backups").len(),
        before,
        "no Backup was created against an unavailable location"
    );

    // A location Velero has not validated for a long time means Velero is not running.
    lab.kube
        .add_storage_location("velero", "default", "Available", chrono::Duration::hours(2));
    let stale = lab.backup("backup").await;
    assert!(
        stale["message"]
            .as_str()
            .unwrap_or_default()
            .contains("was last validated"),
        "{stale}"
    );

    // Available but never validated: Velero has not checked the bucket yet.
    let mut fresh = lab
        .kube
        .object("backupstoragelocations", "velero", "default")
        .expect("location");
    fresh["status"]
        .as_object_mut()
        .expect("status")
        .remove("lastValidationTime");
    lab.kube
        .add_object("backupstoragelocations", "velero", "default", fresh);
    let unvalidated = lab.backup("backup").await;
    assert_eq!(unvalidated["state"], "failed", "{unvalidated}");
    assert!(
        unvalidated["message"]
            .as_str()
            .unwrap_or_default()
            .contains("never been validated"),
        "{unvalidated}"
    );
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partially_failed_may_count_as_a_warning_and_empty_or_shrunken_backups_fail() {
    let lab = velero_lab("partially_failed = \"warn\"").await;
    lab.kube.set_backup_outcome(json!({"phase": "PartiallyFailed", "progress": {"itemsBackedUp": 100, "totalItems": 101}, "warnings": 0, "errors": 1}));
    let warned = lab.backup("backup").await;
    assert_eq!(warned["state"], "succeeded", "{warned}");
    assert!(
        warned["message"]
            .as_str()
            .unwrap_or_default()
            .contains("counted as a warning"),
        "{warned}"
    );

    lab.kube.set_backup_outcome(
        json!({"phase": "Completed", "progress": {"itemsBackedUp": 30, "totalItems": 30}}),
    );
    let shrunk = lab.backup("backup").await;
    assert_eq!(shrunk["state"], "failed");
    assert!(
        shrunk["message"]
            .as_str()
            .unwrap_or_default()
            .contains("less than 50% of the previous backup's 100"),
        "{shrunk}"
    );

    // A backup of one small namespace is compared with the last backup of that namespace, not
    // with the full one.
    let small = lab.backup("backup ns=small").await;
    assert_eq!(small["state"], "succeeded", "{small}");
    assert_eq!(small["result"]["targets"][0]["target"], "small", "{small}");
    assert_eq!(small["result"]["targets"][0]["items"], 30, "{small}");
    lab.kube.set_backup_outcome(
        json!({"phase": "Completed", "progress": {"itemsBackedUp": 10, "totalItems": 10}}),
    );
    let small_shrunk = lab.backup("backup ns=small").await;
    assert_eq!(small_shrunk["state"], "failed", "{small_shrunk}");
    assert!(
        small_shrunk["message"]
            .as_str()
            .unwrap_or_default()
            .contains("less than 50% of the previous backup's 30"),
        "{small_shrunk}"
    );
    let metrics = metrics_text(&lab.agent.http).await;
    for line in [
        r#"infraflux_last_items{kind="backup",target="all"} 100"#,
        r#"infraflux_last_items{kind="backup",target="small"} 30"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

    lab.kube.set_backup_outcome(
        json!({"phase": "Completed", "progress": {"itemsBackedUp": 0, "totalItems": 0}}),
    );
    let empty = lab.backup("backup").await;
    assert_eq!(empty["state"], "failed");
    assert!(
        empty["message"]
            .as_str()
            .unwrap_or_default()
            .contains("is empty"),
        "{empty}"
    );
    let status = status_showing(&lab.client, "backup: failed").await;
    assert!(
        status["message"]
            .as_str()
            .unwrap_or_default()
            .contains("last success"),
        "the age of the last good backup is shown: {status}"
    );
    lab.agent.stop().await;
}
