//! A fake Talos machine API: the real gRPC services (generated from the project's protos) over
//! mutual TLS with certificates made here. It writes a talosconfig the way talosctl does,
//! Ed25519 client key and all.
//!
//! [`FakeTalos::start`]: one apid serving etcd snapshots from a file or a synthetic stream.
//! [`FakeTalos::cluster`]: several nodes, each on its own loopback address, that upgrade
//! (legacy and lifecycle API), reboot and come back on the new version.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use futures::Stream;
use infraflux_handlers::talos::proto::common::{
    ContainerdInstance, ContainerdNamespace, Data, Metadata,
};
use infraflux_handlers::talos::proto::machine::image_service_server::{
    ImageService, ImageServiceServer,
};
use infraflux_handlers::talos::proto::machine::lifecycle_service_server::{
    LifecycleService, LifecycleServiceServer,
};
use infraflux_handlers::talos::proto::machine::machine_service_server::{
    MachineService, MachineServiceServer,
};
use infraflux_handlers::talos::proto::machine::{
    EtcdMember, EtcdMemberListRequest, EtcdMemberListResponse, EtcdMemberStatus, EtcdMembers,
    EtcdSnapshotRequest, EtcdStatus, EtcdStatusResponse, ImageServicePullProgress,
    ImageServicePullRequest, ImageServicePullResponse, LifecycleServiceInstallProgress,
    LifecycleServiceUpgradeRequest, LifecycleServiceUpgradeResponse, Reboot, RebootRequest,
    RebootResponse, ServiceListResponse, Upgrade, UpgradeRequest, UpgradeResponse, Version,
    VersionInfo, VersionResponse, image_service_pull_response, lifecycle_service_install_progress,
};
use infraflux_handlers::upgrade::policy::TalosVersion;
use infraflux_handlers::upgrade::talos::UpgradeApi;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ED25519, SanType,
};
use sha2::{Digest, Sha256};
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// Where snapshot bytes come from.
#[derive(Debug, Clone)]
pub enum SnapshotSource {
    /// A real `etcdctl snapshot save` file.
    File(PathBuf),
    /// `size` bytes shaped like an etcd snapshot (pseudo-random database, SHA-256 trailer),
    /// made on the fly: for streams larger than memory should hold.
    Synthetic { size: u64 },
}

/// What the fake serves; tests change it between calls.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub source: SnapshotSource,
    /// Flip one bit of the byte at this offset (a corrupted transfer).
    pub flip_byte: Option<u64>,
    pub chunk: usize,
    pub talos_version: String,
    /// etcd status errors to report (an unhealthy member).
    pub etcd_errors: Vec<String>,
}

/// The node the fake's talosconfig names, unlike its endpoint's address: as when the endpoint is
/// a VIP or a load balancer and apid proxies to the node named in the `node` metadata.
pub const FAKE_NODE: &str = "10.5.0.2";

#[derive(Clone)]
struct Fake {
    behaviour: Arc<Mutex<Behaviour>>,
    /// The `node` metadata of every snapshot request.
    nodes: Arc<Mutex<Vec<String>>>,
}

pub struct FakeTalos {
    pub endpoint: String,
    pub addr: SocketAddr,
    behaviour: Arc<Mutex<Behaviour>>,
    nodes: Arc<Mutex<Vec<String>>>,
    talosconfig: String,
    /// Set by [`FakeTalos::cluster`].
    cluster: Option<Arc<Mutex<ClusterState>>>,
}

fn node_of<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get("node")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

fn metadata(hostname: &str) -> Option<Metadata> {
    Some(Metadata {
        hostname: hostname.to_string(),
        error: String::new(),
        status: None,
    })
}

type DataStream = Pin<Box<dyn Stream<Item = Result<Data, Status>> + Send>>;

/// The bytes of an etcd snapshot as `b` describes them, in chunks.
fn snapshot_stream(b: Behaviour) -> DataStream {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Data, Status>>(4);
    tokio::spawn(async move {
        let send = |bytes: Vec<u8>| Data {
            metadata: None,
            bytes: Bytes::from(bytes),
        };
        let mut offset = 0u64;
        let mut emit = |mut chunk: Vec<u8>| {
            if let Some(flip) = b.flip_byte
                && flip >= offset
                && flip < offset + chunk.len() as u64
            {
                chunk[(flip - offset) as usize] ^= 0x01;
            }
            offset += chunk.len() as u64;
            send(chunk)
        };
        match b.source {
            SnapshotSource::File(path) => {
                use tokio::io::AsyncReadExt;
                let Ok(mut file) = tokio::fs::File::open(&path).await else {
                    let _ = tx
                        .send(Err(Status::internal("snapshot file missing")))
                        .await;
                    return;
                };
                loop {
                    let mut buf = vec![0u8; b.chunk];
                    match file.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            buf.truncate(n);
                            if tx.send(Ok(emit(buf))).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            SnapshotSource::Synthetic { size } => {
                // etcd pads its database to pages: the file is a multiple of 512, plus 32.
                let db_len = size.saturating_sub(32) / 512 * 512;
                let mut hasher = Sha256::new();
                let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
                let mut produced = 0u64;
                while produced < db_len {
                    let n = (b.chunk as u64).min(db_len - produced) as usize;
                    let mut buf = vec![0u8; n];
                    // xorshift: cheap bytes that do not compress to nothing.
                    for byte in buf.iter_mut() {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        *byte = (state >> 24) as u8;
                    }
                    hasher.update(&buf);
                    produced += n as u64;
                    if tx.send(Ok(emit(buf))).await.is_err() {
                        return;
                    }
                }
                let trailer = hasher.finalize().to_vec();
                let _ = tx.send(Ok(emit(trailer))).await;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl MachineService for Fake {
    type EtcdSnapshotStream = DataStream;

    async fn etcd_snapshot(
        &self,
        request: Request<EtcdSnapshotRequest>,
    ) -> Result<Response<Self::EtcdSnapshotStream>, Status> {
        let node = node_of(&request);
        self.nodes
            .lock()
            .map_err(|_| Status::internal("lock"))?
            .push(node);
        let b = self
            .behaviour
            .lock()
            .map_err(|_| Status::internal("lock"))?
            .clone();
        Ok(Response::new(snapshot_stream(b)))
    }

    async fn etcd_status(
        &self,
        request: Request<()>,
    ) -> Result<Response<EtcdStatusResponse>, Status> {
        let node = node_of(&request);
        let errors = self
            .behaviour
            .lock()
            .map_err(|_| Status::internal("lock"))?
            .etcd_errors
            .clone();
        Ok(Response::new(EtcdStatusResponse {
            messages: vec![EtcdStatus {
                metadata: metadata(&node),
                member_status: Some(EtcdMemberStatus {
                    storage_version: "3.6.0".into(),
                    member_id: 1,
                    protocol_version: "3.6.0".into(),
                    db_size: 1 << 20,
                    db_size_in_use: 1 << 19,
                    leader: 1,
                    raft_index: 100,
                    raft_term: 2,
                    raft_applied_index: 100,
                    errors,
                    is_learner: false,
                }),
            }],
        }))
    }

    async fn etcd_member_list(
        &self,
        _request: Request<EtcdMemberListRequest>,
    ) -> Result<Response<EtcdMemberListResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn service_list(
        &self,
        _request: Request<()>,
    ) -> Result<Response<ServiceListResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn reboot(
        &self,
        _request: Request<RebootRequest>,
    ) -> Result<Response<RebootResponse>, Status> {
        Err(Status::unimplemented("not faked: see FakeTalos::cluster"))
    }

    async fn upgrade(
        &self,
        _request: Request<UpgradeRequest>,
    ) -> Result<Response<UpgradeResponse>, Status> {
        Err(Status::unimplemented("not faked: see FakeTalos::cluster"))
    }

    async fn version(&self, request: Request<()>) -> Result<Response<VersionResponse>, Status> {
        let node = node_of(&request);
        let tag = self
            .behaviour
            .lock()
            .map_err(|_| Status::internal("lock"))?
            .talos_version
            .clone();
        Ok(Response::new(VersionResponse {
            messages: vec![Version {
                metadata: metadata(&node),
                version: Some(VersionInfo {
                    tag,
                    sha: "3ebd10a7".into(),
                    built: String::new(),
                    go_version: "go1.24".into(),
                    os: "linux".into(),
                    arch: "amd64".into(),
                }),
                platform: None,
                features: None,
            }],
        }))
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// One CA, apid's server certificate for `localhost` and the given addresses, and an admin
/// client certificate with an Ed25519 key, as talosctl makes them.
struct Pki {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
    client_cert_pem: String,
    /// Labelled `ED25519 PRIVATE KEY`, as talosctl writes it.
    client_key_pem: String,
}

impl Pki {
    fn new(server_addresses: &[IpAddr]) -> Pki {
        // Every CA gets a unique name: rustls reports a foreign CA with the same name badly.
        let unique = format!("{:x}", rand_u64());
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.distinguished_name.push(
            DnType::CommonName,
            format!("infraflux test talos CA {unique}"),
        );
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().expect("server key");
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
        for address in server_addresses {
            server_params
                .subject_alt_names
                .push(SanType::IpAddress(*address));
        }
        server_params
            .distinguished_name
            .push(DnType::CommonName, "apid");
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("server cert");

        // talosctl's client keys are Ed25519.
        let client_key = KeyPair::generate_for(&PKCS_ED25519).expect("client key");
        let mut client_params =
            CertificateParams::new(Vec::<String>::new()).expect("client params");
        client_params
            .distinguished_name
            .push(DnType::OrganizationName, "os:admin");
        let client_cert = client_params
            .signed_by(&client_key, &issuer)
            .expect("client cert");
        Pki {
            ca_pem: ca_cert.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key
                .serialize_pem()
                .replace("PRIVATE KEY", "ED25519 PRIVATE KEY"),
        }
    }

    fn server_tls(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(
                &self.server_cert_pem,
                &self.server_key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    fn talosconfig(&self, endpoints: &[String], nodes: &[String]) -> String {
        let list = |items: &[String]| {
            items
                .iter()
                .map(|e| format!("      - {e}\n"))
                .collect::<String>()
        };
        let nodes = if nodes.is_empty() {
            String::new()
        } else {
            format!("    nodes:\n{}", list(nodes))
        };
        format!(
            "context: lab\ncontexts:\n  lab:\n    endpoints:\n{}{nodes}    ca: {}\n    crt: {}\n    key: {}\n",
            list(endpoints),
            b64(&self.ca_pem),
            b64(&self.client_cert_pem),
            b64(&self.client_key_pem),
        )
    }
}

impl FakeTalos {
    /// Starts the server on a free loopback port. `extra_endpoints` come first in the
    /// talosconfig (to test falling back from a node that does not answer).
    pub async fn start(source: SnapshotSource, extra_endpoints: &[String]) -> FakeTalos {
        let pki = Pki::new(&[IpAddr::from([127, 0, 0, 1])]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let behaviour = Arc::new(Mutex::new(Behaviour {
            source,
            flip_byte: None,
            chunk: 64 * 1024,
            talos_version: "v1.13.9".into(),
            etcd_errors: Vec::new(),
        }));
        let nodes = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            behaviour: behaviour.clone(),
            nodes: nodes.clone(),
        };
        let tls = pki.server_tls();
        tokio::spawn(async move {
            let served = Server::builder()
                .tls_config(tls)
                .expect("server tls")
                .add_service(MachineServiceServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
            if let Err(e) = served {
                eprintln!("fake talos: {e}");
            }
        });
        let endpoint = format!("127.0.0.1:{}", addr.port());
        let mut endpoints: Vec<String> = extra_endpoints.to_vec();
        endpoints.push(endpoint.clone());
        let talosconfig = pki.talosconfig(&endpoints, &[FAKE_NODE.to_string()]);
        FakeTalos {
            endpoint,
            addr,
            behaviour,
            nodes,
            talosconfig,
            cluster: None,
        }
    }

    pub fn talosconfig(&self) -> &str {
        &self.talosconfig
    }

    pub fn set(&self, change: impl FnOnce(&mut Behaviour)) {
        if let Ok(mut b) = self.behaviour.lock() {
            change(&mut b);
        }
    }

    /// The `node` metadata of every snapshot request so far.
    pub fn snapshot_nodes(&self) -> Vec<String> {
        self.nodes.lock().map(|n| n.clone()).unwrap_or_default()
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}

// ---------------------------------------------------------------------------------------------
// A cluster of fake nodes

/// One node of [`FakeTalos::cluster`]. `address` is its own loopback address (`127.0.0.11`;
/// all of 127.0.0.0/8 reaches `lo` on Linux), where its apid listens.
#[derive(Debug, Clone)]
pub struct FakeNode {
    pub name: String,
    pub address: String,
    pub control_plane: bool,
    /// The Talos version it runs, `v1.12.5`.
    pub version: String,
}

impl FakeNode {
    pub fn control_plane(name: &str, address: &str, version: &str) -> FakeNode {
        FakeNode {
            name: name.into(),
            address: address.into(),
            control_plane: true,
            version: version.into(),
        }
    }

    pub fn worker(name: &str, address: &str, version: &str) -> FakeNode {
        FakeNode {
            control_plane: false,
            ..FakeNode::control_plane(name, address, version)
        }
    }
}

/// What a node of the cluster does; tests change it with [`FakeTalos::set_node`].
#[derive(Debug, Clone)]
pub struct NodeBehaviour {
    /// How long a reboot keeps the node away.
    pub reboot_duration: Duration,
    /// false: the node does not come back from its next reboot.
    pub comes_back: bool,
    /// LifecycleService.Upgrade's exit code: a non-zero one installs nothing.
    pub install_exit_code: i32,
    /// Errors its etcd status reports (an unhealthy member).
    pub etcd_errors: Vec<String>,
    /// Its etcd member is a learner.
    pub etcd_learner: bool,
}

impl Default for NodeBehaviour {
    fn default() -> Self {
        NodeBehaviour {
            reboot_duration: Duration::from_secs(1),
            comes_back: true,
            install_exit_code: 0,
            etcd_errors: Vec::new(),
            etcd_learner: false,
        }
    }
}

/// What [`FakeTalos::on_reboot`]'s hook hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootPhase {
    /// The node went down.
    Down,
    /// It is back, running `version`.
    Up { version: String },
}

pub type RebootHook = Box<dyn Fn(&str, RebootPhase) + Send + Sync>;
type SharedHook = Arc<dyn Fn(&str, RebootPhase) + Send + Sync>;

/// An upgrade request a node received.
#[derive(Debug, Clone)]
pub struct UpgradeRecord {
    /// The node's name.
    pub node: String,
    /// `Legacy`: MachineService.Upgrade; `Lifecycle`: LifecycleService.Upgrade.
    pub api: UpgradeApi,
    pub image: String,
    pub at: Instant,
}

/// A time a node was down; `until` is `None` while it still is.
#[derive(Debug, Clone)]
pub struct DownInterval {
    pub node: String,
    pub from: Instant,
    pub until: Option<Instant>,
}

struct NodeState {
    spec: FakeNode,
    behaviour: NodeBehaviour,
    down: bool,
    /// Between the reboot request and the node coming back: a second request changes nothing.
    rebooting: bool,
    /// The version installed for the next boot.
    staged: Option<String>,
    /// Images pulled into its system containerd.
    pulled: Vec<String>,
    /// `Service.Method` of every call that reached it.
    rpcs: Vec<String>,
    etcd_member_id: u64,
}

struct ClusterState {
    nodes: Vec<NodeState>,
    upgrades: Vec<UpgradeRecord>,
    down: Vec<DownInterval>,
    hook: Option<SharedHook>,
}

type SharedCluster = Arc<Mutex<ClusterState>>;

fn lock(state: &SharedCluster) -> Result<MutexGuard<'_, ClusterState>, Status> {
    state.lock().map_err(|_| Status::internal("lock"))
}

/// The installer image's tag: the version it installs (`factory.talos.dev/installer/x:v1.13.2`).
fn image_version(image: &str) -> Result<String, Status> {
    let tag = image
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .map(|(_, tag)| tag)
        .unwrap_or_default();
    TalosVersion::parse(tag)
        .map(|v| v.to_string())
        .map_err(|e| Status::invalid_argument(format!("image {image:?}: {e}")))
}

fn check_containerd(containerd: Option<&ContainerdInstance>) -> Result<(), Status> {
    match containerd {
        Some(c) if c.namespace == ContainerdNamespace::NsSystem as i32 => Ok(()),
        other => Err(Status::invalid_argument(format!(
            "the installer goes to the system containerd, not {other:?}"
        ))),
    }
}

/// The apid listening on one node's address; it proxies to any node of the cluster.
#[derive(Clone)]
struct ClusterApid {
    state: SharedCluster,
    /// The node whose address the listener is on.
    via: usize,
}

impl ClusterApid {
    /// The node a request is for, as apid routes it: the `node` metadata (an address or a
    /// name), else the listener's own node. A rebooting node answers nothing.
    fn route<T>(&self, request: &Request<T>, rpc: &str) -> Result<usize, Status> {
        let mut state = lock(&self.state)?;
        if state.nodes[self.via].down {
            return Err(Status::unavailable(format!(
                "{}: apid is down (rebooting)",
                state.nodes[self.via].spec.address
            )));
        }
        let wanted = node_of(request);
        let index = if wanted.is_empty() {
            self.via
        } else {
            state
                .nodes
                .iter()
                .position(|n| n.spec.address == wanted || n.spec.name == wanted)
                .ok_or_else(|| Status::unavailable(format!("no route to node {wanted}")))?
        };
        let node = &mut state.nodes[index];
        if node.down {
            return Err(Status::unavailable(format!(
                "connection to {} refused: the node is rebooting",
                node.spec.address
            )));
        }
        node.rpcs.push(rpc.to_string());
        Ok(index)
    }

    fn name(&self, index: usize) -> Result<String, Status> {
        Ok(lock(&self.state)?.nodes[index].spec.name.clone())
    }

    /// Talos before v1.13.0 has no ImageService nor LifecycleService.
    fn require_lifecycle_api(&self, index: usize) -> Result<(), Status> {
        let state = lock(&self.state)?;
        let running =
            TalosVersion::parse(&state.nodes[index].spec.version).map_err(Status::internal)?;
        if UpgradeApi::for_running(&running) == UpgradeApi::Lifecycle {
            Ok(())
        } else {
            Err(Status::unimplemented(format!(
                "unknown service (Talos {running})"
            )))
        }
    }

    fn require_control_plane(&self, index: usize) -> Result<(), Status> {
        if lock(&self.state)?.nodes[index].spec.control_plane {
            Ok(())
        } else {
            Err(Status::unimplemented(
                "etcd is only available on control plane nodes",
            ))
        }
    }
}

/// Takes node `index` down after a moment (its answer leaves first, as on a real node), and
/// back up after its reboot duration on the staged version, unless it never comes back.
fn schedule_reboot(state: &SharedCluster, index: usize) {
    {
        let Ok(mut guard) = state.lock() else { return };
        let node = &mut guard.nodes[index];
        if node.rebooting {
            return;
        }
        node.rebooting = true;
    }
    let state = state.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (name, behaviour, hook) = {
            let Ok(mut guard) = state.lock() else { return };
            let node = &mut guard.nodes[index];
            node.down = true;
            let (name, behaviour) = (node.spec.name.clone(), node.behaviour.clone());
            guard.down.push(DownInterval {
                node: name.clone(),
                from: Instant::now(),
                until: None,
            });
            (name, behaviour, guard.hook.clone())
        };
        if let Some(hook) = &hook {
            hook(&name, RebootPhase::Down);
        }
        if !behaviour.comes_back {
            return;
        }
        tokio::time::sleep(behaviour.reboot_duration).await;
        let (version, hook) = {
            let Ok(mut guard) = state.lock() else { return };
            let node = &mut guard.nodes[index];
            node.down = false;
            node.rebooting = false;
            if let Some(staged) = node.staged.take() {
                node.spec.version = staged;
            }
            let version = node.spec.version.clone();
            if let Some(interval) = guard
                .down
                .iter_mut()
                .rev()
                .find(|d| d.node == name && d.until.is_none())
            {
                interval.until = Some(Instant::now());
            }
            (version, guard.hook.clone())
        };
        if let Some(hook) = &hook {
            hook(&name, RebootPhase::Up { version });
        }
    });
}

type PullStream = Pin<Box<dyn Stream<Item = Result<ImageServicePullResponse, Status>> + Send>>;
type InstallStream =
    Pin<Box<dyn Stream<Item = Result<LifecycleServiceUpgradeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl MachineService for ClusterApid {
    type EtcdSnapshotStream = DataStream;

    /// A synthetic 1 MiB snapshot from a control plane that is up (the upgrade's gate).
    async fn etcd_snapshot(
        &self,
        request: Request<EtcdSnapshotRequest>,
    ) -> Result<Response<Self::EtcdSnapshotStream>, Status> {
        let node = self.route(&request, "EtcdSnapshot")?;
        if !lock(&self.state)?.nodes[node].spec.control_plane {
            return Err(Status::unimplemented("etcd runs on control planes only"));
        }
        Ok(Response::new(snapshot_stream(Behaviour {
            source: SnapshotSource::Synthetic { size: 1 << 20 },
            flip_byte: None,
            chunk: 64 * 1024,
            talos_version: String::new(),
            etcd_errors: Vec::new(),
        })))
    }

    async fn etcd_status(
        &self,
        request: Request<()>,
    ) -> Result<Response<EtcdStatusResponse>, Status> {
        let index = self.route(&request, "MachineService.EtcdStatus")?;
        self.require_control_plane(index)?;
        let state = lock(&self.state)?;
        let node = &state.nodes[index];
        // The leader: the first control plane that is up (a reboot moves leadership).
        let leader = state
            .nodes
            .iter()
            .find(|n| n.spec.control_plane && !n.down)
            .map(|n| n.etcd_member_id)
            .unwrap_or_default();
        Ok(Response::new(EtcdStatusResponse {
            messages: vec![EtcdStatus {
                metadata: metadata(&node.spec.name),
                member_status: Some(EtcdMemberStatus {
                    storage_version: "3.6.0".into(),
                    member_id: node.etcd_member_id,
                    protocol_version: "3.6.0".into(),
                    db_size: 1 << 20,
                    db_size_in_use: 1 << 19,
                    leader,
                    raft_index: 100,
                    raft_term: 2,
                    raft_applied_index: 100,
                    errors: node.behaviour.etcd_errors.clone(),
                    is_learner: node.behaviour.etcd_learner,
                }),
            }],
        }))
    }

    async fn etcd_member_list(
        &self,
        request: Request<EtcdMemberListRequest>,
    ) -> Result<Response<EtcdMemberListResponse>, Status> {
        let index = self.route(&request, "MachineService.EtcdMemberList")?;
        self.require_control_plane(index)?;
        let state = lock(&self.state)?;
        // A rebooting control plane stays a member: etcd keeps it.
        let members = state
            .nodes
            .iter()
            .filter(|n| n.spec.control_plane)
            .map(|n| EtcdMember {
                id: n.etcd_member_id,
                hostname: n.spec.name.clone(),
                peer_urls: vec![format!("https://{}:2380", n.spec.address)],
                client_urls: vec![format!("https://{}:2379", n.spec.address)],
                is_learner: n.behaviour.etcd_learner,
            })
            .collect();
        Ok(Response::new(EtcdMemberListResponse {
            messages: vec![EtcdMembers {
                metadata: metadata(&state.nodes[index].spec.name),
                legacy_members: Vec::new(),
                members,
            }],
        }))
    }

    async fn service_list(
        &self,
        _request: Request<()>,
    ) -> Result<Response<ServiceListResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn version(&self, request: Request<()>) -> Result<Response<VersionResponse>, Status> {
        let index = self.route(&request, "MachineService.Version")?;
        let state = lock(&self.state)?;
        let node = &state.nodes[index];
        Ok(Response::new(VersionResponse {
            messages: vec![Version {
                metadata: metadata(&node.spec.name),
                version: Some(VersionInfo {
                    tag: node.spec.version.clone(),
                    sha: "3ebd10a7".into(),
                    built: String::new(),
                    go_version: "go1.24".into(),
                    os: "linux".into(),
                    arch: "amd64".into(),
                }),
                platform: None,
                features: None,
            }],
        }))
    }

    async fn reboot(
        &self,
        request: Request<RebootRequest>,
    ) -> Result<Response<RebootResponse>, Status> {
        let index = self.route(&request, "MachineService.Reboot")?;
        schedule_reboot(&self.state, index);
        Ok(Response::new(RebootResponse {
            messages: vec![Reboot {
                metadata: metadata(&self.name(index)?),
                actor_id: format!("reboot-{index}"),
            }],
        }))
    }

    /// The legacy upgrade: installs and (unless staged) reboots by itself. Accepted on every
    /// version, as real Talos still has it, deprecated, in v1.13.
    async fn upgrade(
        &self,
        request: Request<UpgradeRequest>,
    ) -> Result<Response<UpgradeResponse>, Status> {
        let index = self.route(&request, "MachineService.Upgrade")?;
        let request = request.into_inner();
        let version = image_version(&request.image)?;
        let name = {
            let mut state = lock(&self.state)?;
            state.nodes[index].staged = Some(version);
            let name = state.nodes[index].spec.name.clone();
            state.upgrades.push(UpgradeRecord {
                node: name.clone(),
                api: UpgradeApi::Legacy,
                image: request.image.clone(),
                at: Instant::now(),
            });
            name
        };
        if !request.stage {
            schedule_reboot(&self.state, index);
        }
        Ok(Response::new(UpgradeResponse {
            messages: vec![Upgrade {
                metadata: metadata(&name),
                ack: "Upgrade request received".into(),
                actor_id: format!("upgrade-{index}"),
            }],
        }))
    }
}

/// ImageService on one listener.
#[derive(Clone)]
struct ClusterImages(ClusterApid);

#[tonic::async_trait]
impl ImageService for ClusterImages {
    type PullStream = PullStream;

    async fn pull(
        &self,
        request: Request<ImageServicePullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let apid = &self.0;
        let index = apid.route(&request, "ImageService.Pull")?;
        apid.require_lifecycle_api(index)?;
        let request = request.into_inner();
        check_containerd(request.containerd.as_ref())?;
        if request.image_ref.is_empty() {
            return Err(Status::invalid_argument("image_ref is empty"));
        }
        lock(&apid.state)?.nodes[index]
            .pulled
            .push(request.image_ref.clone());
        use image_service_pull_response::Response as Pulled;
        let items = vec![
            Ok(ImageServicePullResponse {
                response: Some(Pulled::PullProgress(ImageServicePullProgress {})),
            }),
            Ok(ImageServicePullResponse {
                response: Some(Pulled::Name(request.image_ref)),
            }),
        ];
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

/// LifecycleService on one listener.
#[derive(Clone)]
struct ClusterLifecycle(ClusterApid);

#[tonic::async_trait]
impl LifecycleService for ClusterLifecycle {
    type UpgradeStream = InstallStream;

    /// Installs a pulled image for the next boot; it does not reboot (the client calls
    /// MachineService.Reboot, as with real Talos).
    async fn upgrade(
        &self,
        request: Request<LifecycleServiceUpgradeRequest>,
    ) -> Result<Response<Self::UpgradeStream>, Status> {
        let apid = &self.0;
        let index = apid.route(&request, "LifecycleService.Upgrade")?;
        apid.require_lifecycle_api(index)?;
        let request = request.into_inner();
        check_containerd(request.containerd.as_ref())?;
        let image = request.source.map(|s| s.image_name).unwrap_or_default();
        let exit_code = {
            let mut state = lock(&apid.state)?;
            let node = &state.nodes[index];
            if !node.pulled.contains(&image) {
                return Err(Status::failed_precondition(format!(
                    "image {image:?} is not pulled"
                )));
            }
            let version = image_version(&image)?;
            let exit_code = node.behaviour.install_exit_code;
            let name = node.spec.name.clone();
            if exit_code == 0 {
                state.nodes[index].staged = Some(version);
            }
            state.upgrades.push(UpgradeRecord {
                node: name,
                api: UpgradeApi::Lifecycle,
                image: image.clone(),
                at: Instant::now(),
            });
            exit_code
        };
        use lifecycle_service_install_progress::Response as Progress;
        let item = |progress: Progress| {
            Ok(LifecycleServiceUpgradeResponse {
                progress: Some(LifecycleServiceInstallProgress {
                    response: Some(progress),
                }),
            })
        };
        let mut items = vec![item(Progress::Message(format!(
            "installing {image} to the inactive partition"
        )))];
        if exit_code != 0 {
            items.push(item(Progress::Message(
                "error: not enough space on the boot partition".into(),
            )));
        } else {
            items.push(item(Progress::Message("upgrade installed".into())));
        }
        items.push(item(Progress::ExitCode(exit_code)));
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

/// Binds every address on one port: a free one on the first address, then the same on the
/// others (another port if one of them has it taken).
async fn bind_same_port(addresses: &[IpAddr]) -> (u16, Vec<tokio::net::TcpListener>) {
    for _ in 0..50 {
        let first = tokio::net::TcpListener::bind((addresses[0], 0))
            .await
            .expect("bind the first node address");
        let port = first.local_addr().expect("addr").port();
        let mut listeners = vec![first];
        for address in &addresses[1..] {
            match tokio::net::TcpListener::bind((*address, port)).await {
                Ok(listener) => listeners.push(listener),
                Err(_) => break,
            }
        }
        if listeners.len() == addresses.len() {
            return (port, listeners);
        }
    }
    panic!("no port free on every node address {addresses:?}");
}

impl FakeTalos {
    /// A cluster: one apid per node, each on its node's address and all on the same port,
    /// proxying to any node by the `node` metadata (one CA, as apid does). The talosconfig's
    /// endpoint is the first control plane.
    pub async fn cluster(nodes: &[FakeNode]) -> FakeTalos {
        let first = nodes
            .iter()
            .find(|n| n.control_plane)
            .expect("a cluster has a control plane");
        FakeTalos::cluster_with_endpoints(nodes, &[first.address.as_str()]).await
    }

    /// A cluster whose talosconfig lists `endpoints`: a node's address gets the cluster's port,
    /// an `address:port` is kept as it is (a dead endpoint).
    pub async fn cluster_with_endpoints(nodes: &[FakeNode], endpoints: &[&str]) -> FakeTalos {
        let addresses: Vec<IpAddr> = nodes
            .iter()
            .map(|n| n.address.parse().expect("a node address is an IP address"))
            .collect();
        let pki = Pki::new(&addresses);
        let (port, listeners) = bind_same_port(&addresses).await;
        let state: SharedCluster = Arc::new(Mutex::new(ClusterState {
            nodes: nodes
                .iter()
                .enumerate()
                .map(|(i, spec)| NodeState {
                    spec: spec.clone(),
                    behaviour: NodeBehaviour::default(),
                    down: false,
                    rebooting: false,
                    staged: None,
                    pulled: Vec::new(),
                    rpcs: Vec::new(),
                    etcd_member_id: 0x1000_0000_0000_0001 + i as u64,
                })
                .collect(),
            upgrades: Vec::new(),
            down: Vec::new(),
            hook: None,
        }));
        for (via, listener) in listeners.into_iter().enumerate() {
            let apid = ClusterApid {
                state: state.clone(),
                via,
            };
            let gate = state.clone();
            // A rebooting node's apid is gone: connections to its address are dropped.
            let incoming = tokio_stream::StreamExt::filter(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                move |_| gate.lock().map(|s| !s.nodes[via].down).unwrap_or(false),
            );
            let tls = pki.server_tls();
            tokio::spawn(async move {
                let served = Server::builder()
                    .tls_config(tls)
                    .expect("server tls")
                    .add_service(MachineServiceServer::new(apid.clone()))
                    .add_service(ImageServiceServer::new(ClusterImages(apid.clone())))
                    .add_service(LifecycleServiceServer::new(ClusterLifecycle(apid)))
                    .serve_with_incoming(incoming)
                    .await;
                if let Err(e) = served {
                    eprintln!("fake talos cluster: {e}");
                }
            });
        }
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| {
                if e.parse::<IpAddr>().is_ok() {
                    format!("{e}:{port}")
                } else {
                    e.to_string()
                }
            })
            .collect();
        let talosconfig = pki.talosconfig(&endpoints, &[]);
        FakeTalos {
            endpoint: endpoints.first().cloned().unwrap_or_default(),
            addr: SocketAddr::new(addresses[0], port),
            behaviour: Arc::new(Mutex::new(Behaviour {
                source: SnapshotSource::Synthetic { size: 0 },
                flip_byte: None,
                chunk: 64 * 1024,
                talos_version: String::new(),
                etcd_errors: Vec::new(),
            })),
            nodes: Arc::new(Mutex::new(Vec::new())),
            talosconfig,
            cluster: Some(state),
        }
    }

    fn cluster_state(&self) -> MutexGuard<'_, ClusterState> {
        self.cluster
            .as_ref()
            .expect("a FakeTalos::cluster")
            .lock()
            .expect("cluster lock")
    }

    fn node_index(state: &ClusterState, name: &str) -> usize {
        state
            .nodes
            .iter()
            .position(|n| n.spec.name == name || n.spec.address == name)
            .unwrap_or_else(|| panic!("no fake node {name}"))
    }

    /// The port every node's apid listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `address:port` of a node (by name or address).
    pub fn endpoint_of(&self, node: &str) -> String {
        let state = self.cluster_state();
        let index = Self::node_index(&state, node);
        format!("{}:{}", state.nodes[index].spec.address, self.port())
    }

    /// Changes what a node (by name or address) does.
    pub fn set_node(&self, node: &str, change: impl FnOnce(&mut NodeBehaviour)) {
        let mut state = self.cluster_state();
        let index = Self::node_index(&state, node);
        change(&mut state.nodes[index].behaviour);
    }

    /// Every node's reboots, as they happen: e.g. to keep a fake Kubernetes Node's Ready and
    /// osImage in step. Called outside the fake's lock.
    pub fn on_reboot(&self, hook: RebootHook) {
        self.cluster_state().hook = Some(Arc::from(hook));
    }

    /// Reboots a node (by name or address) as if asked to, into what is staged if anything.
    pub fn reboot(&self, node: &str) {
        let state = self.cluster.as_ref().expect("a FakeTalos::cluster");
        let index = Self::node_index(&self.cluster_state(), node);
        schedule_reboot(state, index);
    }

    /// The version a node runs now.
    pub fn version_of(&self, node: &str) -> String {
        let state = self.cluster_state();
        state.nodes[Self::node_index(&state, node)]
            .spec
            .version
            .clone()
    }

    pub fn is_down(&self, node: &str) -> bool {
        let state = self.cluster_state();
        state.nodes[Self::node_index(&state, node)].down
    }

    /// `Service.Method` of every call that reached a node, in order.
    pub fn rpcs(&self, node: &str) -> Vec<String> {
        let state = self.cluster_state();
        state.nodes[Self::node_index(&state, node)].rpcs.clone()
    }

    /// Every upgrade request, in order.
    pub fn upgrade_log(&self) -> Vec<UpgradeRecord> {
        self.cluster_state().upgrades.clone()
    }

    /// Every time a node was (or is) down, in order of going down.
    pub fn down_intervals(&self) -> Vec<DownInterval> {
        self.cluster_state().down.clone()
    }

    /// The most nodes that were down at the same time so far.
    pub fn most_down_at_once(&self) -> usize {
        let intervals = self.down_intervals();
        intervals
            .iter()
            .map(|a| {
                intervals
                    .iter()
                    .filter(|b| b.from <= a.from && b.until.is_none_or(|until| until > a.from))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}
