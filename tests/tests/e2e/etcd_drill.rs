//! The etcd restore drill end to end: snapshots taken by the real snapshot job (fake Talos API,
//! real etcd data) into a real S3 server, decrypted with a real age identity, restored with the
//! real `etcdctl` and served by a real `etcd`; the throwaway etcd and its data never outlive
//! the drill.

use std::path::Path;
use std::time::Duration;

use infraflux_tests::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::backups::{SnapLab, seed, snap_lab, stamp};

const WITH_IDENTITY: &str = "[restore_drill]\nage_identity = \"env:TEST_AGE_IDENTITY\"\n";

async fn drill(lab: &SnapLab) -> Value {
    let job = submit(&lab.client, "drill etcd").await;
    wait_settled(&lab.client, &job, Duration::from_secs(120)).await
}

fn etcd_target(done: &Value) -> &Value {
    let target = &done["result"]["targets"][0];
    assert_eq!(target["target"], "etcd", "{done}");
    target
}

fn check<'a>(target: &'a Value, name: &str) -> &'a Value {
    target["checks"]
        .as_array()
        .and_then(|checks| checks.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name:?} in {target}"))
}

/// Processes started by the drills of the agent under `agent_dir` (their command lines name
/// its `etcd-drill` directory), by pid.
fn drill_processes(agent_dir: &Path) -> Vec<(u32, String)> {
    let needle = format!("{}", agent_dir.display());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        if cmdline.contains(&needle) && cmdline.contains("etcd-drill") {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Any `etcd-drill` directory left under the agent's state.
fn drill_dirs(agent_dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut dirs = vec![agent_dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.ends_with("etcd-drill") {
                    found.push(path.display().to_string());
                }
                dirs.push(path);
            }
        }
    }
    found
}

fn assert_nothing_left(lab: &SnapLab) {
    let agent_dir = lab.agent.dir.path();
    assert!(
        drill_processes(agent_dir).is_empty(),
        "a drill process is still running: {:?}",
        drill_processes(agent_dir)
    );
    assert!(
        drill_dirs(agent_dir).is_empty(),
        "drill data left: {:?}",
        drill_dirs(agent_dir)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_compressed_snapshot_is_restored_served_read_and_cleaned_up() {
    let lab = snap_lab(WITH_IDENTITY, false).await;
    let snapshot = lab.snapshot().await;
    assert_eq!(snapshot["state"], "succeeded", "{snapshot}");
    let key = snapshot["result"]["object"].as_str().expect("object key");
    assert!(key.ends_with(".db.zst.age"), "{key}");
    let manifest: Value = serde_json::from_slice(&lab.s3.get("etcd", &format!("{key}.json")).await)
        .expect("manifest");

    let done = drill(&lab).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let target = etcd_target(&done);
    assert_eq!(target["ok"], true, "{target}");
    assert_eq!(target["backup"], key);
    assert_eq!(target["backup_created_at"], manifest["created_at"]);
    let age = target["data_age_seconds"].as_u64().expect("data age");
    assert!(age < 600, "taken just before: {age}");
    assert!(
        target["rto_seconds"].as_f64().expect("rto") > 0.0,
        "{target}"
    );
    assert_eq!(target["cleaned_up"], true);
    assert!(target.get("error").is_none(), "{target}");
    // The lab's etcd holds media, home, default and kube-system under /registry/namespaces.
    for name in [
        "stored object sha256",
        "etcd sha256 trailer",
        "manifest checksums",
        "restore",
        "etcd serves the restored data",
        "registry keys: 4",
        "namespace default",
        "namespace kube-system",
    ] {
        assert_eq!(check(target, name)["ok"], true, "{name}: {target}");
    }
    assert_eq!(target["restore_tried"], true);
    let etcd_version = target["etcd_version"].as_str().expect("etcd version");
    assert!(etcd_version.starts_with("3."), "{etcd_version}");
    assert_eq!(
        target["restored_with"],
        format!(
            "etcdctl {}",
            target["etcdctl_version"].as_str().expect("etcdctl version")
        )
    );
    assert_eq!(target["snapshot_talos_version"], "v1.13.9");
    // The lab's etcd is Debian's 3.4: its snapshot records cluster version 3.4.
    assert_eq!(target["snapshot_etcd_version"], "3.4 (cluster version)");
    let message = done["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(&format!("etcd: restored {key} (data age")),
        "{message}"
    );
    assert!(message.contains("9/9 checks"), "{message}");
    assert_nothing_left(&lab);
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_identity_the_stored_object_is_checked_and_a_tampered_one_fails() {
    let lab = snap_lab("[restore_drill]\n", false).await;
    let snapshot = lab.snapshot().await;
    assert_eq!(snapshot["state"], "succeeded", "{snapshot}");
    let key = snapshot["result"]["object"]
        .as_str()
        .expect("object key")
        .to_string();

    let done = drill(&lab).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let target = etcd_target(&done);
    assert_eq!(target["backup"], key.as_str());
    assert_eq!(check(target, "stored object sha256")["ok"], true);
    assert_eq!(check(target, "stored object size")["ok"], true);
    let not_tried = check(
        target,
        "restore: not tried (no [restore_drill] age_identity)",
    );
    assert_eq!(not_tried["ok"], true);
    assert!(
        not_tried["message"]
            .as_str()
            .unwrap_or_default()
            .contains("the restore itself was not tried"),
        "{not_tried}"
    );
    assert_eq!(target["restore_tried"], false);
    assert!(
        target["rto_seconds"].is_null(),
        "nothing restored: {target}"
    );
    assert_eq!(target["cleaned_up"], true);
    assert!(
        done["message"]
            .as_str()
            .unwrap_or_default()
            .contains("without restoring it"),
        "{done}"
    );

    // One byte of the stored object changed, its size the same: the digest catches it.
    let mut stored = lab.s3.get("etcd", &key).await;
    let middle = stored.len() / 2;
    stored[middle] ^= 0x01;
    lab.s3.put("etcd", &key, stored).await;
    let tampered = drill(&lab).await;
    assert_eq!(tampered["state"], "failed", "{tampered}");
    let target = etcd_target(&tampered);
    assert_eq!(target["ok"], false);
    assert_eq!(
        check(target, "stored object sha256")["ok"],
        false,
        "{target}"
    );
    assert!(
        target["error"]
            .as_str()
            .unwrap_or_default()
            .contains("is not what its manifest describes"),
        "{target}"
    );
    assert_nothing_left(&lab);
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_corrupted_behind_a_valid_trailer_fails_the_restore_and_leaves_nothing() {
    let lab = snap_lab("[restore_drill]\n", false).await;
    // etcd's own corrupted fixture, given the trailer it lacks: the trailer check passes, so
    // what fails is the database itself, in etcdctl's restore.
    let mut file = fixture("etcd/corrupted_backup.db");
    let trailer = Sha256::digest(&file);
    file.extend_from_slice(&trailer);
    let created_at = chrono::Utc::now() - chrono::Duration::minutes(5);
    let key = format!("prod/lab/{}-10.5.0.2.db", stamp(created_at));
    let sha = hex::encode(Sha256::digest(&file));
    let manifest = json!({
        "key": key, "cluster": "lab", "node": "10.5.0.2", "talos_version": "v1.13.9",
        "created_at": created_at, "size_bytes": file.len(), "stored_bytes": file.len(),
        "sha256": sha, "db_sha256": hex::encode(trailer), "stored_sha256": sha,
        "compression": "none", "encrypted": false, "job_id": "01jd0000000000000000000000",
    });
    lab.s3.put("etcd", &key, file).await;
    lab.s3
        .put(
            "etcd",
            &format!("{key}.json"),
            serde_json::to_vec(&manifest).expect("json"),
        )
        .await;

    let done = drill(&lab).await;
    assert_eq!(done["state"], "failed", "{done}");
    let target = etcd_target(&done);
    assert_eq!(target["backup"], key.as_str());
    assert_eq!(check(target, "etcd sha256 trailer")["ok"], true, "{target}");
    assert_eq!(check(target, "restore")["ok"], false, "{target}");
    let error = target["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("the restore failed"), "{error}");
    assert_eq!(target["restore_tried"], true);
    assert_eq!(target["cleaned_up"], true);
    assert!(
        done["message"]
            .as_str()
            .unwrap_or_default()
            .contains("etcd: FAILED"),
        "{done}"
    );
    assert_nothing_left(&lab);
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_older_than_max_data_age_fails_naming_its_age() {
    let lab = snap_lab("[restore_drill]\nmax_data_age = \"48h\"\n", false).await;
    let old = chrono::Utc::now() - chrono::Duration::days(3);
    let key = seed(&lab, &stamp(old), 1000, true).await;
    let done = drill(&lab).await;
    assert_eq!(done["state"], "failed", "{done}");
    let target = etcd_target(&done);
    assert_eq!(target["backup"], key.as_str());
    assert!(
        target["data_age_seconds"].as_u64().expect("age") >= 3 * 86_400,
        "{target}"
    );
    let error = target["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("is 3 d 0 h old: older than max_data_age (48h)"),
        "{error}"
    );
    assert_eq!(target["cleaned_up"], true);
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_drill_while_its_etcd_runs_stops_it_and_deletes_its_data() {
    // etcdctl reads slowly, so the cancel comes while the restored etcd is serving.
    let tools = tempfile::tempdir().expect("tempdir");
    let slow_etcdctl = tools.path().join("slow-etcdctl");
    std::fs::write(
        &slow_etcdctl,
        "#!/bin/sh\ncase \" $* \" in *\" get \"*) sleep 2;; esac\nexec etcdctl \"$@\"\n",
    )
    .expect("write wrapper");
    let mut perms = std::fs::metadata(&slow_etcdctl)
        .expect("wrapper")
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&slow_etcdctl, perms).expect("chmod");
    let lab = snap_lab(
        &format!(
            "{WITH_IDENTITY}etcdctl_bin = \"{}\"\n",
            slow_etcdctl.display()
        ),
        false,
    )
    .await;
    let snapshot = lab.snapshot().await;
    assert_eq!(snapshot["state"], "succeeded", "{snapshot}");

    let job = submit(&lab.client, "drill etcd").await;
    let agent_dir = lab.agent.dir.path().to_path_buf();
    let server = wait_for(
        Duration::from_secs(60),
        "the drill's etcd to run",
        || async {
            drill_processes(&agent_dir)
                .into_iter()
                .find(|(_, cmd)| cmd.contains("--listen-client-urls"))
        },
    )
    .await;
    command(&lab.client, &format!("cancel {job}")).await;
    let done = wait_settled(&lab.client, &job, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "cancelled", "{done}");
    assert!(
        drill_processes(&agent_dir)
            .iter()
            .all(|(pid, _)| *pid != server.0),
        "etcd {} outlived the cancelled drill",
        server.0
    );
    assert_nothing_left(&lab);
    lab.agent.stop().await;
}
