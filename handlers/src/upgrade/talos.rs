//! The Talos API side of a rolling upgrade: which upgrade API a node speaks, how to reach a
//! node while it (or the endpoint) reboots, starting the upgrade, waiting for the new version,
//! and the etcd gate between control planes.
//!
//! Every call names its node with the `node` metadata and goes through one of the talosconfig's
//! endpoints (apid proxies). Every call is bounded in time: a node that went down mid-call must
//! not hang the rollout.

use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::policy::TalosVersion;
use crate::talos::proto::common::{
    ContainerDriver, ContainerdInstance, ContainerdNamespace, Metadata,
};
use crate::talos::proto::machine::image_service_client::ImageServiceClient;
use crate::talos::proto::machine::image_service_pull_response::Response as PullResponse;
use crate::talos::proto::machine::lifecycle_service_client::LifecycleServiceClient;
use crate::talos::proto::machine::lifecycle_service_install_progress::Response as InstallProgress;
use crate::talos::proto::machine::machine_service_client::MachineServiceClient;
use crate::talos::proto::machine::{
    EtcdMember, EtcdMemberListRequest, EtcdMemberStatus, ImageServicePullRequest,
    InstallArtifactsSource, LifecycleServiceUpgradeRequest, RebootRequest, UpgradeRequest,
    reboot_request, upgrade_request,
};
use crate::talos::{TalosClient, endpoint_host, endpoint_port, status_message, to_node};

/// A connection (TCP and TLS) to an endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A unary call, once connected.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Silence on a pull or install stream: pulling and installing take minutes, but report on
/// the way.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Between two Version polls while a node reboots.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// How a node is upgraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpgradeApi {
    /// `MachineService.Upgrade`: the node installs and reboots on its own. Deprecated since
    /// Talos v1.13 (removal planned for v1.18), the only way before.
    Legacy,
    /// `ImageService.Pull`, `LifecycleService.Upgrade` (installs), then `MachineService.Reboot`
    /// (Talos >= v1.13.0).
    Lifecycle,
}

impl UpgradeApi {
    /// The API of a node running `running`: the new one from v1.13.0 on. Pre-releases of
    /// v1.13.0 count as older: the legacy API is there in every v1.13, the new one's shape in
    /// early pre-releases is not certain.
    pub fn for_running(running: &TalosVersion) -> Self {
        let first_lifecycle = TalosVersion {
            major: 1,
            minor: 13,
            patch: 0,
            pre: None,
        };
        if *running >= first_lifecycle {
            Self::Lifecycle
        } else {
            Self::Legacy
        }
    }
}

/// How to reach nodes: the talosconfig's endpoints, with the node named by the `node`
/// metadata (apid proxies). `avoid` is the node being upgraded (its address): an endpoint
/// whose host is that address is not used, since the endpoint would vanish with the node's
/// reboot; if no endpoint is left, the other control planes' addresses (with the endpoint's
/// port) are used instead, as talosctl users do by hand when the node they upgrade is their
/// endpoint.
pub fn endpoints_avoiding(
    client: &TalosClient,
    avoid: Option<&str>,
    control_planes: &[String],
) -> Vec<String> {
    let Some(avoid) = avoid
        .map(|a| endpoint_host(a.trim()))
        .filter(|a| !a.is_empty())
    else {
        return client.endpoints.clone();
    };
    let kept: Vec<String> = client
        .endpoints
        .iter()
        .filter(|e| endpoint_host(e) != avoid)
        .cloned()
        .collect();
    if !kept.is_empty() {
        return kept;
    }
    let port = client.endpoints.iter().find_map(|e| endpoint_port(e));
    let mut instead: Vec<String> = Vec::new();
    for host in control_planes.iter().map(|cp| endpoint_host(cp.trim())) {
        if host.is_empty() || host == avoid {
            continue;
        }
        let endpoint = match port {
            Some(port) if host.contains(':') => format!("[{host}]:{port}"),
            Some(port) => format!("{host}:{port}"),
            None => host,
        };
        if !instead.contains(&endpoint) {
            instead.push(endpoint);
        }
    }
    instead
}

/// The node's running Talos version (MachineService.Version, `tag`), trying each endpoint in
/// turn.
pub async fn version_of(
    client: &TalosClient,
    endpoints: &[String],
    node: &str,
) -> Result<TalosVersion, String> {
    through_any(client, endpoints, |channel, endpoint| async move {
        let what = format!("Talos version of {node} through {endpoint}");
        let reply = unary(
            &what,
            MachineServiceClient::new(channel).version(to_node((), node)),
        )
        .await?;
        let message = reply
            .messages
            .into_iter()
            .next()
            .ok_or_else(|| format!("{what}: an empty reply"))?;
        if let Some(error) = node_error(message.metadata.as_ref()) {
            return Err(format!("{what}: {error}"));
        }
        let tag = message.version.map(|v| v.tag).unwrap_or_default();
        TalosVersion::parse(&tag).map_err(|e| format!("{what}: {e}"))
    })
    .await
}

/// Starts the upgrade of `node` to `image` with `api` and returns once the node has accepted
/// it; the node then reboots into the new version (see [`wait_for_version`]).
///
/// Legacy: `MachineService.Upgrade`, answered with an ack; the node reboots by itself.
/// Lifecycle: `ImageService.Pull` of `image` (to the pulled image's `name`),
/// `LifecycleService.Upgrade` from that name (its messages go to `on_message`; a non-zero
/// `exit_code` is an error, which the RPC itself does not signal), then `MachineService.Reboot`:
/// the new API only installs, the reboot is a separate call (as `talosctl upgrade` does it).
///
/// The request goes through the first endpoint that connects and is never repeated through
/// another one: a second request could start a second upgrade.
pub async fn upgrade_node(
    client: &TalosClient,
    endpoints: &[String],
    node: &str,
    image: &str,
    api: UpgradeApi,
    on_message: &(dyn Fn(&str) + Send + Sync),
) -> Result<(), String> {
    let (endpoint, channel) = connect_first(client, endpoints).await?;
    match api {
        UpgradeApi::Legacy => legacy_upgrade(channel, &endpoint, node, image, on_message).await,
        UpgradeApi::Lifecycle => {
            lifecycle_upgrade(channel, &endpoint, node, image, on_message).await
        }
    }
}

async fn legacy_upgrade(
    channel: Channel,
    endpoint: &str,
    node: &str,
    image: &str,
    on_message: &(dyn Fn(&str) + Send + Sync),
) -> Result<(), String> {
    let request = UpgradeRequest {
        image: image.to_string(),
        // talosctl's default. Talos >= 1.8 ignores the field and always keeps its data
        // (EPHEMERAL) across upgrades; older ones wipe it, as with talosctl's default.
        preserve: false,
        // Install and reboot now, not at some later reboot.
        stage: false,
        // Keep Talos's own checks (etcd health and quorum on control planes).
        force: false,
        reboot_mode: upgrade_request::RebootMode::Default as i32,
    };
    let what = format!("upgrade of {node} through {endpoint}");
    let reply = unary(
        &what,
        MachineServiceClient::new(channel).upgrade(to_node(request, node)),
    )
    .await?;
    let message = reply
        .messages
        .into_iter()
        .next()
        .ok_or_else(|| format!("{what}: an empty reply"))?;
    if let Some(error) = node_error(message.metadata.as_ref()) {
        return Err(format!("{what}: {error}"));
    }
    on_message(&format!("{node}: {}", message.ack));
    Ok(())
}

fn system_containerd() -> Option<ContainerdInstance> {
    // Where talosctl pulls the installer: Talos's own containerd, not the CRI one.
    Some(ContainerdInstance {
        driver: ContainerDriver::Containerd as i32,
        namespace: ContainerdNamespace::NsSystem as i32,
    })
}

async fn lifecycle_upgrade(
    channel: Channel,
    endpoint: &str,
    node: &str,
    image: &str,
    on_message: &(dyn Fn(&str) + Send + Sync),
) -> Result<(), String> {
    let what = format!("pulling {image} on {node} through {endpoint}");
    on_message(&format!("{node}: pulling {image}"));
    let pull = ImageServicePullRequest {
        containerd: system_containerd(),
        image_ref: image.to_string(),
    };
    let mut images = ImageServiceClient::new(channel.clone());
    let mut stream = open_stream(&what, images.pull(to_node(pull, node))).await?;
    let name = loop {
        match next_item(&what, &mut stream).await? {
            Some(item) => {
                if let Some(PullResponse::Name(name)) = item.response {
                    break name;
                }
            }
            None => return Err(format!("{what}: the stream ended without the image's name")),
        }
    };

    let what = format!("upgrade of {node} through {endpoint}");
    let request = LifecycleServiceUpgradeRequest {
        containerd: system_containerd(),
        source: Some(InstallArtifactsSource { image_name: name }),
    };
    let mut lifecycle = LifecycleServiceClient::new(channel.clone());
    let mut stream = open_stream(&what, lifecycle.upgrade(to_node(request, node))).await?;
    let mut last_message = String::new();
    loop {
        let item = next_item(&what, &mut stream).await.map_err(|e| {
            if last_message.is_empty() {
                e
            } else {
                format!("{e} (last message: {last_message})")
            }
        })?;
        let Some(item) = item else {
            // Upstream always ends with an exit code: without one, nothing says the new
            // version is installed, and rebooting would only reboot.
            return Err(format!(
                "{what}: the stream ended without an exit code (last message: {last_message})"
            ));
        };
        match item.progress.and_then(|p| p.response) {
            Some(InstallProgress::Message(message)) => {
                on_message(&format!("{node}: {message}"));
                last_message = message;
            }
            // Whatever follows (the stream may be cut) does not matter any more.
            Some(InstallProgress::ExitCode(0)) => break,
            Some(InstallProgress::ExitCode(code)) => {
                return Err(format!(
                    "upgrade of {node} exited with code {code}: {last_message}"
                ));
            }
            None => {}
        }
    }

    let what = format!("reboot of {node} into the upgrade through {endpoint}");
    let request = RebootRequest {
        mode: reboot_request::Mode::Default as i32,
    };
    let reply = unary(
        &what,
        MachineServiceClient::new(channel).reboot(to_node(request, node)),
    )
    .await?;
    if let Some(error) = reply
        .messages
        .first()
        .and_then(|m| node_error(m.metadata.as_ref()))
    {
        return Err(format!("{what}: {error}"));
    }
    on_message(&format!("{node}: upgrade installed, rebooting"));
    Ok(())
}

/// Waits within `timeout` (polling about every second, watching `cancel`) until `node`
/// answers Version with `target`: it went down, rebooted and came back on the new version
/// (it is fine to never see it down if it already reports the target). Errors name the last
/// version seen or the last error.
pub async fn wait_for_version(
    client: &TalosClient,
    endpoints: &[String],
    node: &str,
    target: &TalosVersion,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut last = "no answer yet".to_string();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                return Err(format!("waiting for {node} to report {target}: cancelled ({last})"));
            }
            answer = timeout_at(deadline, version_of(client, endpoints, node)) => match answer {
                Err(_) => break,
                Ok(Ok(version)) if version == *target => return Ok(()),
                Ok(Ok(version)) => last = format!("it reported {version}"),
                Ok(Err(e)) => last = e,
            },
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                return Err(format!("waiting for {node} to report {target}: cancelled ({last})"));
            }
            _ = tokio::time::sleep_until((Instant::now() + POLL_INTERVAL).min(deadline)) => {}
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    Err(format!(
        "{node} did not report {target} within {}: {last}",
        humantime::format_duration(timeout)
    ))
}

/// Every etcd member healthy: EtcdMemberList (via any control plane) lists
/// `control_planes.len()` members, none a learner, and EtcdStatus on each control plane
/// answers with no `errors`, a leader, and a member id that the list holds. Err names the
/// member or node and why.
pub async fn etcd_members_healthy(
    client: &TalosClient,
    endpoints: &[String],
    control_planes: &[String],
) -> Result<(), String> {
    if control_planes.is_empty() {
        return Err("etcd: no control plane to ask".into());
    }
    let mut errors = Vec::new();
    let mut members = None;
    for control_plane in control_planes {
        match member_list(client, endpoints, control_plane).await {
            Ok(list) => {
                members = Some(list);
                break;
            }
            Err(e) => errors.push(e),
        }
    }
    let members = members.ok_or_else(|| errors.join("; "))?;
    if let Some(learner) = members.iter().find(|m| m.is_learner) {
        return Err(format!(
            "etcd member {} ({:x}) is a learner, not yet a voting member",
            learner.hostname, learner.id
        ));
    }
    if members.len() != control_planes.len() {
        let names: Vec<&str> = members.iter().map(|m| m.hostname.as_str()).collect();
        return Err(format!(
            "etcd has {} members ({}), the cluster has {} control planes",
            members.len(),
            names.join(", "),
            control_planes.len()
        ));
    }
    for control_plane in control_planes {
        let status = member_status(client, endpoints, control_plane).await?;
        if !status.errors.is_empty() {
            return Err(format!(
                "etcd on {control_plane} reports: {}",
                status.errors.join("; ")
            ));
        }
        if status.is_learner {
            return Err(format!("etcd on {control_plane} is a learner"));
        }
        if status.leader == 0 {
            return Err(format!("etcd on {control_plane} has no leader"));
        }
        if !members.iter().any(|m| m.id == status.member_id) {
            return Err(format!(
                "etcd on {control_plane}: its member {:x} is not in the member list",
                status.member_id
            ));
        }
    }
    Ok(())
}

async fn member_list(
    client: &TalosClient,
    endpoints: &[String],
    control_plane: &str,
) -> Result<Vec<EtcdMember>, String> {
    through_any(client, endpoints, |channel, endpoint| async move {
        let what = format!("etcd member list from {control_plane} through {endpoint}");
        let request = EtcdMemberListRequest { query_local: false };
        let reply = unary(
            &what,
            MachineServiceClient::new(channel).etcd_member_list(to_node(request, control_plane)),
        )
        .await?;
        let message = reply
            .messages
            .into_iter()
            .next()
            .ok_or_else(|| format!("{what}: an empty reply"))?;
        if let Some(error) = node_error(message.metadata.as_ref()) {
            return Err(format!("{what}: {error}"));
        }
        Ok(message.members)
    })
    .await
}

async fn member_status(
    client: &TalosClient,
    endpoints: &[String],
    control_plane: &str,
) -> Result<EtcdMemberStatus, String> {
    through_any(client, endpoints, |channel, endpoint| async move {
        let what = format!("etcd status of {control_plane} through {endpoint}");
        let reply = unary(
            &what,
            MachineServiceClient::new(channel).etcd_status(to_node((), control_plane)),
        )
        .await?;
        let message = reply
            .messages
            .into_iter()
            .next()
            .ok_or_else(|| format!("{what}: an empty reply"))?;
        if let Some(error) = node_error(message.metadata.as_ref()) {
            return Err(format!("{what}: {error}"));
        }
        message
            .member_status
            .ok_or_else(|| format!("{what}: no member status"))
    })
    .await
}

/// A node's failure inside a successful reply (apid reports proxied errors this way).
fn node_error(metadata: Option<&Metadata>) -> Option<String> {
    let metadata = metadata?;
    if !metadata.error.is_empty() {
        return Some(metadata.error.clone());
    }
    metadata
        .status
        .as_ref()
        .filter(|s| s.code != 0)
        .map(|s| s.message.clone())
}

async fn connect(client: &TalosClient, endpoint: &str) -> Result<Channel, String> {
    match timeout(CONNECT_TIMEOUT, client.channel(endpoint)).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "Talos API at {endpoint}: no connection within {}s",
            CONNECT_TIMEOUT.as_secs()
        )),
    }
}

/// The first endpoint that connects.
async fn connect_first(
    client: &TalosClient,
    endpoints: &[String],
) -> Result<(String, Channel), String> {
    let mut errors = Vec::new();
    for endpoint in endpoints {
        match connect(client, endpoint).await {
            Ok(channel) => return Ok((endpoint.clone(), channel)),
            Err(e) => errors.push(e),
        }
    }
    Err(no_endpoint(errors))
}

fn no_endpoint(errors: Vec<String>) -> String {
    if errors.is_empty() {
        "no endpoint to reach the Talos API through".into()
    } else {
        errors.join("; ")
    }
}

/// `attempt` through each endpoint in turn, for calls that are safe to repeat: the first
/// success, or every endpoint's error.
async fn through_any<T, F, Fut>(
    client: &TalosClient,
    endpoints: &[String],
    mut attempt: F,
) -> Result<T, String>
where
    F: FnMut(Channel, String) -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let mut errors = Vec::new();
    for endpoint in endpoints {
        let result = match connect(client, endpoint).await {
            Ok(channel) => attempt(channel, endpoint.clone()).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(value) => return Ok(value),
            Err(e) => errors.push(e),
        }
    }
    Err(no_endpoint(errors))
}

async fn unary<T>(
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(format!("{what}: {}", described(&status))),
        Err(_) => Err(format!(
            "{what}: no answer within {}s",
            CALL_TIMEOUT.as_secs()
        )),
    }
}

async fn open_stream<T>(
    what: &str,
    call: impl Future<Output = Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>>,
) -> Result<tonic::Streaming<T>, String> {
    match timeout(STREAM_IDLE_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(format!("{what}: {}", described(&status))),
        Err(_) => Err(format!(
            "{what}: no answer within {}s",
            STREAM_IDLE_TIMEOUT.as_secs()
        )),
    }
}

async fn next_item<T>(what: &str, stream: &mut tonic::Streaming<T>) -> Result<Option<T>, String> {
    match timeout(STREAM_IDLE_TIMEOUT, stream.message()).await {
        Ok(Ok(item)) => Ok(item),
        Ok(Err(status)) => Err(format!("{what}: {}", described(&status))),
        Err(_) => Err(format!(
            "{what}: nothing for {}s",
            STREAM_IDLE_TIMEOUT.as_secs()
        )),
    }
}

/// A status, with what Unimplemented means here.
fn described(status: &tonic::Status) -> String {
    let message = status_message(status);
    if status.code() == tonic::Code::Unimplemented {
        format!("{message} (Talos before v1.13.0 has only the legacy upgrade API)")
    } else {
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> TalosVersion {
        TalosVersion::parse(text).expect("version")
    }

    fn client(endpoints: &[&str]) -> TalosClient {
        // The TLS material is never used: nothing connects.
        let config = format!(
            "context: lab\ncontexts:\n  lab:\n    endpoints: [{}]\n",
            endpoints
                .iter()
                .map(|e| format!("'{e}'"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        TalosClient::from_talosconfig(&config, None).expect("talosconfig")
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_new_api_from_v1_13_0_on() {
        assert_eq!(UpgradeApi::for_running(&v("v1.12.7")), UpgradeApi::Legacy);
        assert_eq!(
            UpgradeApi::for_running(&v("v1.13.0-beta.1")),
            UpgradeApi::Legacy
        );
        assert_eq!(
            UpgradeApi::for_running(&v("v1.13.0")),
            UpgradeApi::Lifecycle
        );
        assert_eq!(
            UpgradeApi::for_running(&v("v1.14.2")),
            UpgradeApi::Lifecycle
        );
        assert_eq!(UpgradeApi::for_running(&v("v2.0.0")), UpgradeApi::Lifecycle);
        assert_eq!(
            serde_json::to_value(UpgradeApi::Lifecycle).expect("json"),
            serde_json::json!("lifecycle")
        );
    }

    #[test]
    fn the_upgraded_node_is_not_the_endpoint() {
        let cps = strings(&["10.0.0.11", "10.0.0.12", "10.0.0.13"]);
        let one = client(&["10.0.0.11:50001"]);
        assert_eq!(endpoints_avoiding(&one, None, &cps), ["10.0.0.11:50001"]);
        assert_eq!(
            endpoints_avoiding(&one, Some("10.0.0.21"), &cps),
            ["10.0.0.11:50001"]
        );
        // Upgrading the endpoint itself: the other control planes, on the endpoint's port.
        assert_eq!(
            endpoints_avoiding(&one, Some("10.0.0.11"), &cps),
            ["10.0.0.12:50001", "10.0.0.13:50001"]
        );
        // Another endpoint is left: it is used, not the control planes.
        let two = client(&["10.0.0.11", "vip.lab"]);
        assert_eq!(
            endpoints_avoiding(&two, Some("10.0.0.11"), &cps),
            ["vip.lab"]
        );
        // No port in the endpoint: apid's default applies later.
        let bare = client(&["fd00::11"]);
        assert_eq!(
            endpoints_avoiding(&bare, Some("fd00::11"), &strings(&["fd00::11", "fd00::12"])),
            ["fd00::12"]
        );
        let v6 = client(&["[fd00::11]:50000"]);
        assert_eq!(
            endpoints_avoiding(&v6, Some("fd00::11"), &strings(&["fd00::11", "fd00::12"])),
            ["[fd00::12]:50000"]
        );
        // A single control plane that is the endpoint: nothing is left to go through.
        assert!(endpoints_avoiding(&one, Some("10.0.0.11"), &strings(&["10.0.0.11"])).is_empty());
    }

    #[test]
    fn proxied_errors_are_read_from_the_metadata() {
        use crate::talos::proto::google::rpc::Status;
        assert_eq!(node_error(None), None);
        let ok = Metadata {
            hostname: "cp-1".into(),
            error: String::new(),
            status: Some(Status {
                code: 0,
                message: String::new(),
                details: vec![],
            }),
        };
        assert_eq!(node_error(Some(&ok)), None);
        let failed = Metadata {
            hostname: "cp-1".into(),
            error: String::new(),
            status: Some(Status {
                code: 14,
                message: "connection refused".into(),
                details: vec![],
            }),
        };
        assert_eq!(
            node_error(Some(&failed)).as_deref(),
            Some("connection refused")
        );
    }

    #[tokio::test]
    async fn no_endpoint_is_an_error_not_a_hang() {
        let one = client(&["10.0.0.11:50001"]);
        let e = version_of(&one, &[], "10.0.0.11")
            .await
            .expect_err("no endpoint");
        assert!(e.contains("no endpoint"), "{e}");
        let e = upgrade_node(
            &one,
            &[],
            "10.0.0.11",
            "img:v1.13.2",
            UpgradeApi::Legacy,
            &|_| {},
        )
        .await
        .expect_err("no endpoint");
        assert!(e.contains("no endpoint"), "{e}");
    }
}
