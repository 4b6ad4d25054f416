//! A fake Proxmox VE API over HTTPS with its own test CA, as a Proxmox node ships a
//! self-signed one: `GET /api2/json/version` and `GET /api2/json/access/permissions`, in the
//! real shapes, answered only for the right `Authorization: PVEAPIToken=<id>=<secret>`
//! (401 "authentication failure" otherwise, as pveproxy answers).
//!
//! A small HTTP/1.1 server on rustls in threads: one request per connection, then close.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};

/// Path → privilege → 1, as `/access/permissions` answers.
type Privileges = BTreeMap<String, BTreeMap<String, u8>>;

struct State {
    authorization: String,
    privileges: Privileges,
    /// Every request: its path and whether its token was accepted.
    requests: Vec<(String, bool)>,
}

pub struct FakeProxmox {
    /// `https://127.0.0.1:<port>/api2/json`
    pub api_url: String,
    /// The CA that signed the server's certificate, for `[proxmox] ca_cert`.
    pub ca_pem: String,
    state: Arc<Mutex<State>>,
}

impl FakeProxmox {
    /// Accepts `token_id` with `secret`; the token holds `privileges` on `/`.
    pub fn start(token_id: &str, secret: &str, privileges: &[&str]) -> FakeProxmox {
        // Every CA gets a unique name: rustls reports a foreign CA with the same name badly.
        let unique = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(u64::from(std::process::id()));
            h.finish()
        };
        let unique = format!("{unique:x}");
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.distinguished_name.push(
            DnType::CommonName,
            format!("Proxmox Virtual Environment test CA {unique}"),
        );
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().expect("server key");
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("server params");
        server_params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        server_params
            .distinguished_name
            .push(DnType::CommonName, "pve.lab");
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .expect("server cert");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(server_cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .expect("server config");
        let config = Arc::new(config);
        let mut root = BTreeMap::new();
        for p in privileges {
            root.insert(p.to_string(), 1);
        }
        let state = Arc::new(Mutex::new(State {
            authorization: format!("PVEAPIToken={token_id}={secret}"),
            privileges: [("/".to_string(), root)].into(),
            requests: Vec::new(),
        }));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let served = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let config = config.clone();
                let state = served.clone();
                std::thread::spawn(move || {
                    let _ = serve_one(stream, config, &state);
                });
            }
        });
        FakeProxmox {
            api_url: format!("https://127.0.0.1:{port}/api2/json"),
            ca_pem: ca_cert.pem(),
            state,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token's privileges on `path`, replacing what it had there.
    pub fn set_privileges(&self, path: &str, privileges: &[&str]) {
        self.lock().privileges.insert(
            path.to_string(),
            privileges.iter().map(|p| (p.to_string(), 1)).collect(),
        );
    }

    /// Every request so far: its path, and whether its token was accepted.
    pub fn requests(&self) -> Vec<(String, bool)> {
        self.lock().requests.clone()
    }
}

fn serve_one(
    stream: TcpStream,
    config: Arc<rustls::ServerConfig>,
    state: &Mutex<State>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let connection = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(connection, stream);
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
        if request.len() > 64 * 1024 {
            return Ok(());
        }
    }
    let text = String::from_utf8_lossy(&request).into_owned();
    let mut lines = text.lines();
    let path = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_string();
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let (status, body) = {
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        let accepted = authorization == state.authorization;
        state.requests.push((path.clone(), accepted));
        if !accepted {
            ("401 authentication failure", json!({"data": null}))
        } else {
            match path.as_str() {
                "/api2/json/version" => (
                    "200 OK",
                    json!({"data": {"version": "8.3.0", "release": "8.3", "repoid": "c1689ccb1065a83b"}}),
                ),
                "/api2/json/access/permissions" => {
                    ("200 OK", json!({"data": state.privileges.clone()}))
                }
                _ => ("501 Method not implemented", Value::Null),
            }
        }
    };
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(response.as_bytes())?;
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(())
}
