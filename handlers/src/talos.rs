//! A client of the Talos machine API: gRPC over mutual TLS from a talosconfig (context,
//! endpoints, CA, client certificate and key), addressing one node with the `node` metadata as
//! talosctl does.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The API subset in `proto/`, generated at build time: `machine` holds the machine, image
/// (`ImageService`) and lifecycle (`LifecycleService`) services, which share that package.
pub mod proto {
    pub mod google {
        pub mod rpc {
            tonic::include_proto!("google.rpc");
        }
    }
    pub mod common {
        tonic::include_proto!("common");
    }
    pub mod machine {
        tonic::include_proto!("machine");
    }
}

use proto::machine::image_service_client::ImageServiceClient;
use proto::machine::lifecycle_service_client::LifecycleServiceClient;
use proto::machine::machine_service_client::MachineServiceClient;

/// apid's port (`ApidPort` in Talos' constants).
pub const APID_PORT: u16 = 50000;

#[derive(Debug, thiserror::Error)]
pub enum TalosError {
    #[error("talosconfig: {0}")]
    Config(String),
    #[error("Talos API at {endpoint}: {message}")]
    Call { endpoint: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
struct TalosConfigFile {
    #[serde(default)]
    context: Option<String>,
    #[serde(default)]
    contexts: BTreeMap<String, RawContext>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawContext {
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    nodes: Vec<String>,
    #[serde(default)]
    ca: String,
    #[serde(default)]
    crt: String,
    #[serde(default)]
    key: String,
}

/// One talosconfig context, ready to connect.
#[derive(Clone)]
pub struct TalosClient {
    pub context: String,
    pub endpoints: Vec<String>,
    pub nodes: Vec<String>,
    tls: ClientTlsConfig,
}

impl TalosClient {
    /// Whom to ask, and through which endpoint, in order: each of the context's `nodes` through
    /// each endpoint in turn (as `talosctl --nodes`: the endpoint may be a VIP or a load balancer
    /// that apid proxies through), or each endpoint as its own node when `nodes` is empty.
    pub fn targets(&self) -> Vec<(String, String)> {
        if self.nodes.is_empty() {
            return self
                .endpoints
                .iter()
                .map(|e| (e.clone(), endpoint_host(e)))
                .collect();
        }
        self.nodes
            .iter()
            .flat_map(|node| {
                self.endpoints
                    .iter()
                    .map(move |e| (e.clone(), endpoint_host(node)))
            })
            .collect()
    }
}

impl std::fmt::Debug for TalosClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TalosClient({}: {:?})", self.context, self.endpoints)
    }
}

fn decode_pem(field: &str, value: &str) -> Result<Vec<u8>, TalosError> {
    base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|e| TalosError::Config(format!("{field} is not base64: {e}")))
}

/// rustls reads PKCS#8 keys labelled `PRIVATE KEY`; talosctl labels its Ed25519 keys
/// `ED25519 PRIVATE KEY` although the bytes are already PKCS#8.
fn normalize_key(pem: Vec<u8>) -> Vec<u8> {
    let text = String::from_utf8_lossy(&pem);
    if text.contains("-----BEGIN ED25519 PRIVATE KEY-----") {
        text.replace("ED25519 PRIVATE KEY", "PRIVATE KEY")
            .into_bytes()
    } else {
        pem
    }
}

/// The host part of an endpoint (`10.0.0.11`, `10.0.0.11:50000`, `[fd00::1]:50000`, a name).
pub fn endpoint_host(endpoint: &str) -> String {
    let e = endpoint.trim_start_matches("https://");
    if let Some(rest) = e.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest).to_string();
    }
    match e.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) && !host.contains(':') => {
            host.to_string()
        }
        _ => e.to_string(),
    }
}

/// The port an endpoint names, if any (`10.0.0.11:50000`, `[fd00::1]:50000`; not `fd00::1`).
pub fn endpoint_port(endpoint: &str) -> Option<u16> {
    let e = endpoint.trim_start_matches("https://");
    if let Some(rest) = e.strip_prefix('[') {
        return rest
            .split_once("]:")
            .and_then(|(_, port)| port.parse().ok());
    }
    match e.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => port.parse().ok(),
        _ => None,
    }
}

fn endpoint_url(endpoint: &str) -> String {
    let e = endpoint.trim_start_matches("https://");
    let has_port = if e.starts_with('[') {
        e.contains("]:")
    } else {
        e.matches(':').count() == 1
    };
    if has_port {
        format!("https://{e}")
    } else if e.contains(':') {
        format!("https://[{e}]:{APID_PORT}")
    } else {
        format!("https://{e}:{APID_PORT}")
    }
}

impl TalosClient {
    /// Reads a talosconfig; `context` overrides the file's current context.
    pub fn from_talosconfig(text: &str, context: Option<&str>) -> Result<Self, TalosError> {
        let file: TalosConfigFile = serde_saphyr::from_str(text).map_err(|e| {
            // The parser quotes the lines around the error, and they may hold the client key:
            // only the position and the reason are kept.
            let message = e.to_string();
            let first = message.lines().next().unwrap_or_default();
            TalosError::Config(format!(
                "not a talosconfig: {}",
                first.trim_start_matches("error: ")
            ))
        })?;
        let name = context
            .map(str::to_string)
            .or(file.context.clone())
            .ok_or_else(|| TalosError::Config("no context given and no current context".into()))?;
        let raw = file
            .contexts
            .get(&name)
            .ok_or_else(|| TalosError::Config(format!("no context {name:?}")))?;
        if raw.endpoints.is_empty() {
            return Err(TalosError::Config(format!(
                "context {name:?} has no endpoints"
            )));
        }
        let ca = decode_pem("ca", &raw.ca)?;
        let crt = decode_pem("crt", &raw.crt)?;
        let key = normalize_key(decode_pem("key", &raw.key)?);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(crt, key));
        Ok(Self {
            context: name,
            endpoints: raw.endpoints.clone(),
            nodes: raw.nodes.clone(),
            tls,
        })
    }

    /// A mutual-TLS connection to `endpoint` (the connection attempt gives up after 10 s);
    /// calls on it name their node with [`to_node`].
    pub async fn channel(&self, endpoint: &str) -> Result<Channel, TalosError> {
        let err = |message: String| TalosError::Call {
            endpoint: endpoint.to_string(),
            message,
        };
        let tls = self.tls.clone().domain_name(endpoint_host(endpoint));
        Channel::from_shared(endpoint_url(endpoint))
            .map_err(|e| err(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| err(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| err(transport_message(&e)))
    }

    /// A client for calls through `endpoint`, addressed to `node`.
    pub async fn machine(
        &self,
        endpoint: &str,
    ) -> Result<MachineServiceClient<Channel>, TalosError> {
        Ok(MachineServiceClient::new(self.channel(endpoint).await?))
    }

    /// `ImageService` (Talos >= v1.13.0) through `endpoint`.
    pub async fn images(&self, endpoint: &str) -> Result<ImageServiceClient<Channel>, TalosError> {
        Ok(ImageServiceClient::new(self.channel(endpoint).await?))
    }

    /// `LifecycleService` (Talos >= v1.13.0) through `endpoint`.
    pub async fn lifecycle(
        &self,
        endpoint: &str,
    ) -> Result<LifecycleServiceClient<Channel>, TalosError> {
        Ok(LifecycleServiceClient::new(self.channel(endpoint).await?))
    }
}

/// A request addressed to one node, as talosctl's `--nodes` with a single node does.
pub fn to_node<T>(message: T, node: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = node.parse() {
        request.metadata_mut().insert("node", value);
    }
    request
}

/// The most telling line of a transport error (the TLS alert, the refused connection).
pub fn transport_message(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message = s.to_string();
        source = s.source();
    }
    message
}

/// A failed call's message, down to the cause.
pub fn status_message(status: &tonic::Status) -> String {
    use std::error::Error;
    match status.source() {
        Some(source) => format!("{} ({})", status.message(), transport_message(source)),
        None => format!("{:?}: {}", status.code(), status.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_the_apid_port_unless_they_have_one() {
        assert_eq!(endpoint_url("10.0.0.11"), "https://10.0.0.11:50000");
        assert_eq!(endpoint_url("10.0.0.11:6443"), "https://10.0.0.11:6443");
        assert_eq!(endpoint_url("cp-1.lab"), "https://cp-1.lab:50000");
        assert_eq!(endpoint_url("fd00::1"), "https://[fd00::1]:50000");
        assert_eq!(endpoint_url("[fd00::1]:50000"), "https://[fd00::1]:50000");
        assert_eq!(endpoint_host("10.0.0.11:50000"), "10.0.0.11");
        assert_eq!(endpoint_host("[fd00::1]:50000"), "fd00::1");
        assert_eq!(endpoint_host("cp-1.lab"), "cp-1.lab");
        assert_eq!(endpoint_port("10.0.0.11:50001"), Some(50001));
        assert_eq!(endpoint_port("https://cp-1.lab:50000"), Some(50000));
        assert_eq!(endpoint_port("[fd00::1]:50002"), Some(50002));
        assert_eq!(endpoint_port("10.0.0.11"), None);
        assert_eq!(endpoint_port("fd00::1"), None);
    }

    #[test]
    fn nodes_are_asked_through_each_endpoint_in_turn() {
        let client = |endpoints: &[&str], nodes: &[&str]| TalosClient {
            context: "lab".into(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            tls: ClientTlsConfig::new(),
        };
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(e, n)| (e.to_string(), n.to_string()))
                .collect()
        };
        // Behind a VIP: the node metadata names the node, the connection goes to the endpoint.
        assert_eq!(
            client(&["vip.lab:50000", "10.0.0.11"], &["10.0.0.21", "10.0.0.22"]).targets(),
            pairs(&[
                ("vip.lab:50000", "10.0.0.21"),
                ("10.0.0.11", "10.0.0.21"),
                ("vip.lab:50000", "10.0.0.22"),
                ("10.0.0.11", "10.0.0.22"),
            ])
        );
        assert_eq!(
            client(&["10.0.0.11:50000", "10.0.0.12"], &[]).targets(),
            pairs(&[("10.0.0.11:50000", "10.0.0.11"), ("10.0.0.12", "10.0.0.12")])
        );
    }

    #[test]
    fn ed25519_keys_are_relabelled_for_rustls() {
        let pem = b"-----BEGIN ED25519 PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n-----END ED25519 PRIVATE KEY-----\n".to_vec();
        let fixed = String::from_utf8(normalize_key(pem)).expect("utf8");
        assert!(fixed.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(fixed.contains("-----END PRIVATE KEY-----"));
        let ec = b"-----BEGIN EC PRIVATE KEY-----\nabc\n-----END EC PRIVATE KEY-----\n".to_vec();
        assert_eq!(normalize_key(ec.clone()), ec);
    }

    #[test]
    fn a_talosconfig_names_its_problem() {
        let e = TalosClient::from_talosconfig(
            "context: a\ncontexts:\n  b:\n    endpoints: [x]\n",
            None,
        )
        .expect_err("missing context");
        assert!(e.to_string().contains("no context \"a\""), "{e}");
        let e =
            TalosClient::from_talosconfig("context: a\ncontexts:\n  a:\n    endpoints: []\n", None)
                .expect_err("no endpoints");
        assert!(e.to_string().contains("no endpoints"), "{e}");
        let e = TalosClient::from_talosconfig(
            "context: a\ncontexts:\n  a:\n    endpoints: [x]\n    ca: '%%%'\n",
            None,
        )
        .expect_err("bad base64");
        assert!(e.to_string().contains("ca is not base64"), "{e}");
        let e = TalosClient::from_talosconfig(
            "context: a\ncontexts:\n  a:\n    endpoints: [x]\n    key: {LS0tPRIVATE: 1}\n",
            None,
        )
        .expect_err("a map where the key goes");
        let message = e.to_string();
        assert!(message.contains("line 5 column"), "{message}");
        assert!(!message.contains("PRIVATE"), "{message}");
    }
}
