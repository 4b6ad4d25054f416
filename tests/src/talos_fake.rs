//! A fake Talos machine API: the real gRPC service (generated from the project's protos) over
//! mutual TLS with certificates made here, serving etcd snapshots from a file or a synthetic
//! stream. It writes a talosconfig the way talosctl does, Ed25519 client key and all.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use futures::Stream;
use infraflux_handlers::talos::proto::common::{Data, Metadata};
use infraflux_handlers::talos::proto::machine::machine_service_server::{
    MachineService, MachineServiceServer,
};
use infraflux_handlers::talos::proto::machine::{
    EtcdMemberListRequest, EtcdMemberListResponse, EtcdMemberStatus, EtcdSnapshotRequest,
    EtcdStatus, EtcdStatusResponse, ServiceListResponse, Version, VersionInfo, VersionResponse,
};
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
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
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

impl FakeTalos {
    /// Starts the server on a free loopback port. `extra_endpoints` come first in the
    /// talosconfig (to test falling back from a node that does not answer).
    pub async fn start(source: SnapshotSource, extra_endpoints: &[String]) -> FakeTalos {
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
        server_params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
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
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(
                server_cert.pem(),
                server_key.serialize_pem(),
            ))
            .client_ca_root(Certificate::from_pem(ca_cert.pem()));
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
        let key_pem = client_key
            .serialize_pem()
            .replace("PRIVATE KEY", "ED25519 PRIVATE KEY");
        let talosconfig = format!(
            "context: lab\ncontexts:\n  lab:\n    endpoints:\n{}    nodes:\n      - {FAKE_NODE}\n    ca: {}\n    crt: {}\n    key: {}\n",
            endpoints
                .iter()
                .map(|e| format!("      - {e}\n"))
                .collect::<String>(),
            b64(&ca_cert.pem()),
            b64(&client_cert.pem()),
            b64(&key_pem),
        );
        FakeTalos {
            endpoint,
            addr,
            behaviour,
            nodes,
            talosconfig,
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
