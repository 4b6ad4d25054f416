//! A test CA and a small HTTPS server on it, for peers that serve their own certificates: the
//! fake Proxmox API (a self-signed node CA) and the sites `[acceptance] hostnames` fetches.
//!
//! The server is HTTP/1.1 on rustls in threads: one request per connection, then close.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, TcpStream};
use std::sync::Arc;

use chrono::{Datelike, Utc};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, to trust it.
    pub pem: String,
}

impl TestCa {
    /// A CA named `label` plus a unique suffix: rustls reports a foreign CA with the same
    /// name badly.
    pub fn new(label: &str) -> TestCa {
        let unique = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(u64::from(std::process::id()));
            h.finish()
        };
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{label} {unique:x}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("ca cert");
        TestCa {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// A server configuration whose certificate names `names` (and 127.0.0.1) and expires
    /// at midnight UTC `days` days from today.
    pub fn server_config(&self, names: &[&str], days: i64) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("server params");
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        if let Some(name) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *name);
        }
        let day = (Utc::now() + chrono::Duration::days(days)).date_naive();
        params.not_after = rcgen::date_time_ymd(day.year(), day.month() as u8, day.day() as u8);
        let cert = params.signed_by(&key, &self.issuer).expect("server cert");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server config");
        Arc::new(config)
    }
}

/// A request as the server hands it to its responder.
pub struct Request {
    pub path: String,
    /// The `Authorization` header, or empty.
    pub authorization: String,
}

/// Serves HTTPS on a free loopback port until the process ends; `respond` gives the status
/// line's tail ("200 OK") and a JSON body. Returns the port.
pub fn serve<F>(config: Arc<rustls::ServerConfig>, respond: F) -> u16
where
    F: Fn(&Request) -> (String, String) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let respond = Arc::new(respond);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let config = config.clone();
            let respond = respond.clone();
            std::thread::spawn(move || {
                let _ = serve_one(stream, config, respond.as_ref());
            });
        }
    });
    port
}

fn serve_one(
    stream: TcpStream,
    config: Arc<rustls::ServerConfig>,
    respond: &dyn Fn(&Request) -> (String, String),
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
    let (status, body) = respond(&Request {
        path,
        authorization,
    });
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(response.as_bytes())?;
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(())
}
