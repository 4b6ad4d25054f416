//! The Talos API side of rolling upgrades (`upgrade/talos.rs`) against a fake cluster whose
//! nodes each listen on their own loopback address: both upgrade APIs, reboots, waiting for
//! the new version, and the etcd gate.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use infraflux_handlers::talos::TalosClient;
use infraflux_handlers::upgrade::policy::TalosVersion;
use infraflux_handlers::upgrade::talos::{
    UpgradeApi, endpoints_avoiding, etcd_members_healthy, upgrade_node, version_of,
    wait_for_version,
};
use infraflux_tests::init;
use infraflux_tests::talos_fake::{FakeNode, FakeTalos, RebootPhase};
use tokio_util::sync::CancellationToken;

const CP1: &str = "127.0.0.11";
const CP2: &str = "127.0.0.12";
const CP3: &str = "127.0.0.13";
const W1: &str = "127.0.0.21";

fn image(version: &str) -> String {
    format!(
        "factory.talos.dev/installer/376567988ad370138ad8b2698212367b8edcb69b5fd68c80be1f2ec7d603b4ba:{version}"
    )
}

fn v(text: &str) -> TalosVersion {
    TalosVersion::parse(text).expect("version")
}

fn control_planes() -> Vec<String> {
    [CP1, CP2, CP3].iter().map(|a| a.to_string()).collect()
}

/// cp-1 and the worker on v1.12 (legacy API only), cp-2 and cp-3 on v1.13; reboots take
/// half a second.
async fn lab() -> (FakeTalos, TalosClient) {
    init();
    let talos = FakeTalos::cluster(&[
        FakeNode::control_plane("cp-1", CP1, "v1.12.5"),
        FakeNode::control_plane("cp-2", CP2, "v1.13.1"),
        FakeNode::control_plane("cp-3", CP3, "v1.13.1"),
        FakeNode::worker("w-1", W1, "v1.12.5"),
    ])
    .await;
    for node in ["cp-1", "cp-2", "cp-3", "w-1"] {
        talos.set_node(node, |b| b.reboot_duration = Duration::from_millis(500));
    }
    let client = TalosClient::from_talosconfig(talos.talosconfig(), None).expect("talosconfig");
    (talos, client)
}

/// Collects `on_message`'s lines.
fn message_sink() -> (Arc<Mutex<Vec<String>>>, impl Fn(&str) + Send + Sync) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    (lines, move |line: &str| {
        sink.lock().expect("lock").push(line.to_string())
    })
}

fn upgrade_rpcs(talos: &FakeTalos, node: &str) -> Vec<String> {
    talos
        .rpcs(node)
        .into_iter()
        .filter(|rpc| {
            matches!(
                rpc.as_str(),
                "MachineService.Upgrade"
                    | "ImageService.Pull"
                    | "LifecycleService.Upgrade"
                    | "MachineService.Reboot"
            )
        })
        .collect()
}

#[tokio::test]
async fn the_node_being_upgraded_is_not_the_endpoint() {
    let (talos, client) = lab().await;
    // talosctl's Ed25519 key, labelled as talosctl labels it, loads (and connects below).
    let config: serde_json::Value =
        serde_saphyr::from_str(talos.talosconfig()).expect("talosconfig yaml");
    let key = base64::engine::general_purpose::STANDARD
        .decode(config["contexts"]["lab"]["key"].as_str().expect("key"))
        .expect("base64");
    assert!(String::from_utf8_lossy(&key).contains("BEGIN ED25519 PRIVATE KEY"));

    let port = talos.port();
    assert_eq!(client.endpoints, [format!("{CP1}:{port}")]);
    let cps = control_planes();
    assert_eq!(
        endpoints_avoiding(&client, Some(CP1), &cps),
        [format!("{CP2}:{port}"), format!("{CP3}:{port}")]
    );
    assert_eq!(
        endpoints_avoiding(&client, Some(W1), &cps),
        client.endpoints
    );
    assert_eq!(endpoints_avoiding(&client, None, &cps), client.endpoints);

    // Every listener proxies by the `node` metadata.
    let around_cp1 = endpoints_avoiding(&client, Some(CP1), &cps);
    assert_eq!(
        version_of(&client, &around_cp1, CP1).await.expect("cp-1"),
        v("v1.12.5")
    );
    assert_eq!(
        version_of(&client, &client.endpoints, CP2)
            .await
            .expect("cp-2"),
        v("v1.13.1")
    );
    assert_eq!(
        version_of(&client, &client.endpoints, "w-1")
            .await
            .expect("by name"),
        v("v1.12.5")
    );
    // The first endpoint answering nothing, the next one serves.
    let dead_first = vec![
        format!("127.0.0.1:{}", infraflux_tests::free_port()),
        format!("{CP3}:{port}"),
    ];
    assert_eq!(
        version_of(&client, &dead_first, W1).await.expect("w-1"),
        v("v1.12.5")
    );
    let e = version_of(&client, &client.endpoints, "127.0.0.99")
        .await
        .expect_err("no such node");
    assert!(e.contains("no route to node 127.0.0.99"), "{e}");
}

#[tokio::test]
async fn legacy_and_lifecycle_upgrades_in_one_cluster() {
    let (talos, client) = lab().await;
    let phases = Arc::new(Mutex::new(Vec::new()));
    let heard = phases.clone();
    talos.on_reboot(Box::new(move |node, phase| {
        heard.lock().expect("lock").push((node.to_string(), phase));
    }));
    let cps = control_planes();
    let target = v("v1.13.2");
    let cancel = CancellationToken::new();

    // cp-1 runs v1.12: the legacy API, through another control plane (cp-1 is the endpoint).
    let endpoints = endpoints_avoiding(&client, Some(CP1), &cps);
    let running = version_of(&client, &endpoints, CP1).await.expect("version");
    assert_eq!(UpgradeApi::for_running(&running), UpgradeApi::Legacy);
    let (lines, on_message) = message_sink();
    upgrade_node(
        &client,
        &endpoints,
        CP1,
        &image("v1.13.2"),
        UpgradeApi::Legacy,
        &on_message,
    )
    .await
    .expect("legacy upgrade");
    assert!(
        lines
            .lock()
            .expect("lock")
            .iter()
            .any(|l| l.contains("Upgrade request received")),
        "{lines:?}"
    );
    wait_for_version(
        &client,
        &endpoints,
        CP1,
        &target,
        Duration::from_secs(10),
        &cancel,
    )
    .await
    .expect("cp-1 back on the new version");
    assert_eq!(talos.version_of("cp-1"), "v1.13.2");
    assert_eq!(upgrade_rpcs(&talos, "cp-1"), ["MachineService.Upgrade"]);

    // cp-2 runs v1.13: pull, install, reboot; through the talosconfig's endpoint (cp-1,
    // back by now).
    let endpoints = endpoints_avoiding(&client, Some(CP2), &cps);
    assert_eq!(endpoints, client.endpoints);
    let running = version_of(&client, &endpoints, CP2).await.expect("version");
    assert_eq!(UpgradeApi::for_running(&running), UpgradeApi::Lifecycle);
    let (lines, on_message) = message_sink();
    upgrade_node(
        &client,
        &endpoints,
        CP2,
        &image("v1.13.2"),
        UpgradeApi::Lifecycle,
        &on_message,
    )
    .await
    .expect("lifecycle upgrade");
    let lines = lines.lock().expect("lock").clone();
    assert!(
        lines.iter().any(|l| l.contains("installing")),
        "the installer's messages reach on_message: {lines:?}"
    );
    wait_for_version(
        &client,
        &endpoints,
        CP2,
        &target,
        Duration::from_secs(10),
        &cancel,
    )
    .await
    .expect("cp-2 back on the new version");
    assert_eq!(
        upgrade_rpcs(&talos, "cp-2"),
        [
            "ImageService.Pull",
            "LifecycleService.Upgrade",
            "MachineService.Reboot"
        ]
    );

    let log = talos.upgrade_log();
    let apis: Vec<(&str, UpgradeApi, &str)> = log
        .iter()
        .map(|r| (r.node.as_str(), r.api, r.image.as_str()))
        .collect();
    let image = image("v1.13.2");
    assert_eq!(
        apis,
        [
            ("cp-1", UpgradeApi::Legacy, image.as_str()),
            ("cp-2", UpgradeApi::Lifecycle, image.as_str())
        ]
    );
    let down = talos.down_intervals();
    assert_eq!(down.len(), 2, "{down:?}");
    assert!(down.iter().all(|d| d.until.is_some()), "{down:?}");
    assert_eq!(talos.most_down_at_once(), 1);
    assert_eq!(
        *phases.lock().expect("lock"),
        [
            ("cp-1".to_string(), RebootPhase::Down),
            (
                "cp-1".to_string(),
                RebootPhase::Up {
                    version: "v1.13.2".into()
                }
            ),
            ("cp-2".to_string(), RebootPhase::Down),
            (
                "cp-2".to_string(),
                RebootPhase::Up {
                    version: "v1.13.2".into()
                }
            ),
        ]
    );
    // The others did not move.
    assert_eq!(talos.version_of("cp-3"), "v1.13.1");
    assert_eq!(talos.version_of("w-1"), "v1.12.5");
}

#[tokio::test]
async fn a_node_before_v1_13_has_no_lifecycle_api() {
    let (talos, client) = lab().await;
    let e = upgrade_node(
        &client,
        &client.endpoints,
        W1,
        &image("v1.13.2"),
        UpgradeApi::Lifecycle,
        &|_| {},
    )
    .await
    .expect_err("v1.12 has no ImageService");
    assert!(e.contains("Unimplemented"), "{e}");
    assert!(e.contains("legacy"), "{e}");
    assert!(talos.upgrade_log().is_empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(talos.down_intervals().is_empty());
}

#[tokio::test]
async fn a_failed_install_is_an_error_and_nothing_reboots() {
    let (talos, client) = lab().await;
    talos.set_node("cp-3", |b| b.install_exit_code = 3);
    let (lines, on_message) = message_sink();
    let e = upgrade_node(
        &client,
        &client.endpoints,
        CP3,
        &image("v1.13.2"),
        UpgradeApi::Lifecycle,
        &on_message,
    )
    .await
    .expect_err("exit code 3");
    assert!(
        e.starts_with(&format!("upgrade of {CP3} exited with code 3: ")),
        "{e}"
    );
    assert!(e.contains("not enough space"), "the last message: {e}");
    assert!(!lines.lock().expect("lock").is_empty());
    // The request was made, but no reboot follows.
    assert_eq!(talos.upgrade_log().len(), 1);
    assert!(!upgrade_rpcs(&talos, "cp-3").contains(&"MachineService.Reboot".to_string()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(talos.down_intervals().is_empty());
    assert_eq!(talos.version_of("cp-3"), "v1.13.1");
}

#[tokio::test]
async fn waiting_for_a_node_that_never_comes_back_times_out() {
    let (talos, client) = lab().await;
    talos.set_node("w-1", |b| b.comes_back = false);
    upgrade_node(
        &client,
        &client.endpoints,
        W1,
        &image("v1.13.2"),
        UpgradeApi::Legacy,
        &|_| {},
    )
    .await
    .expect("accepted");
    let started = Instant::now();
    let e = wait_for_version(
        &client,
        &client.endpoints,
        W1,
        &v("v1.13.2"),
        Duration::from_secs(2),
        &CancellationToken::new(),
    )
    .await
    .expect_err("never back");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert!(
        e.starts_with(&format!("{W1} did not report v1.13.2 within 2s: ")),
        "{e}"
    );
    assert!(e.contains("rebooting"), "the last error: {e}");
    assert!(talos.is_down("w-1"));
    let down = talos.down_intervals();
    assert_eq!(down.len(), 1);
    assert!(down[0].until.is_none());

    // A cancelled wait ends at once, saying so.
    let cancel = CancellationToken::new();
    cancel.cancel();
    let started = Instant::now();
    let e = wait_for_version(
        &client,
        &client.endpoints,
        W1,
        &v("v1.13.2"),
        Duration::from_secs(30),
        &cancel,
    )
    .await
    .expect_err("cancelled");
    assert!(e.contains("cancelled"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // A node on the wrong version: the error says which.
    let e = wait_for_version(
        &client,
        &client.endpoints,
        CP2,
        &v("v1.13.2"),
        Duration::from_millis(1500),
        &CancellationToken::new(),
    )
    .await
    .expect_err("cp-2 stays on v1.13.1");
    assert!(e.ends_with("it reported v1.13.1"), "{e}");
}

#[tokio::test]
async fn the_etcd_gate() {
    let (talos, client) = lab().await;
    let cps = control_planes();
    let endpoints = client.endpoints.clone();
    etcd_members_healthy(&client, &endpoints, &cps)
        .await
        .expect("healthy");

    talos.set_node("cp-2", |b| b.etcd_errors = vec!["alarm: NOSPACE".into()]);
    let e = etcd_members_healthy(&client, &endpoints, &cps)
        .await
        .expect_err("an alarm");
    assert_eq!(e, format!("etcd on {CP2} reports: alarm: NOSPACE"));
    talos.set_node("cp-2", |b| b.etcd_errors.clear());

    talos.set_node("cp-3", |b| b.etcd_learner = true);
    let e = etcd_members_healthy(&client, &endpoints, &cps)
        .await
        .expect_err("a learner");
    assert!(
        e.starts_with("etcd member cp-3 (") && e.contains("learner"),
        "{e}"
    );
    talos.set_node("cp-3", |b| b.etcd_learner = false);

    // A control plane the member list does not have.
    let mut four = cps.clone();
    four.push("127.0.0.14".into());
    let e = etcd_members_healthy(&client, &endpoints, &four)
        .await
        .expect_err("3 members");
    assert_eq!(
        e,
        "etcd has 3 members (cp-1, cp-2, cp-3), the cluster has 4 control planes"
    );

    // cp-1 (the endpoint) reboots: the member list comes through the others, its status
    // does not come at all.
    talos.set_node("cp-1", |b| b.reboot_duration = Duration::from_secs(1));
    talos.reboot("cp-1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(talos.is_down("cp-1"));
    let around = endpoints_avoiding(&client, Some(CP1), &cps);
    let e = etcd_members_healthy(&client, &around, &cps)
        .await
        .expect_err("cp-1 down");
    assert!(
        e.starts_with(&format!("etcd status of {CP1} through ")),
        "{e}"
    );
    assert!(e.contains("rebooting"), "{e}");
    // Through the rebooting endpoint alone, nothing answers.
    let e = etcd_members_healthy(&client, &endpoints, &cps)
        .await
        .expect_err("no endpoint");
    assert!(e.contains(&format!("Talos API at {CP1}:")), "{e}");

    wait_for_version(
        &client,
        &around,
        CP1,
        &v("v1.12.5"),
        Duration::from_secs(10),
        &CancellationToken::new(),
    )
    .await
    .expect("cp-1 back");
    etcd_members_healthy(&client, &endpoints, &cps)
        .await
        .expect("healthy again");
}
