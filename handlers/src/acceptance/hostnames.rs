//! `hostname.<name>`: each of `[acceptance] hostnames` resolves from this host and answers an
//! HTTPS GET with a certificate valid for that name, trusted by the system's roots (and
//! `[acceptance] ca_cert`, for a lab CA) and valid for at least `cert_min_days`. This is what
//! a person checked with a browser on the LAN: DNS, the Gateway's address, the certificate.

use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Config;
use crate::checks::Check;
use crate::preflight::cause;

/// `host` or `host:port` (443 by default), as `[acceptance] hostnames` lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostname {
    pub host: String,
    pub port: u16,
}

impl Hostname {
    pub fn parse(entry: &str) -> Result<Hostname, String> {
        let (host, port) = match entry.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("{entry:?}: {port:?} is not a port"))?,
            ),
            None => (entry, 443),
        };
        let valid = !host.is_empty()
            && host.len() <= 253
            && host
                .split('.')
                .all(|label| !label.is_empty() && label.len() <= 63)
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if !valid {
            return Err(format!(
                "{entry:?} is not a DNS name (home.example.org or home.example.org:8443)"
            ));
        }
        Ok(Hostname {
            host: host.to_ascii_lowercase(),
            port,
        })
    }

    fn url(&self) -> String {
        if self.port == 443 {
            format!("https://{}/", self.host)
        } else {
            format!("https://{}:{}/", self.host, self.port)
        }
    }
}

/// The check's name: one per hostname, so a metric says which one fails.
fn check_name(entry: &str) -> String {
    format!("hostname.{entry}")
}

/// The system's roots, plus `ca_cert` when set; a client per run, as the CA file may change.
fn client(config: &Config, timeout: Duration) -> Result<reqwest::ClientBuilder, String> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .tls_info(true)
        .user_agent(concat!("infraflux-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.ca_cert {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read acceptance.ca_cert {path}: {}", e.kind()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| format!("acceptance.ca_cert {path} holds no PEM certificate"))?;
        builder = builder.tls_certs_merge(certs);
    }
    Ok(builder)
}

/// Checks one entry of `hostnames`.
pub async fn check(config: &Config, entry: &str, timeout: Duration) -> Check {
    let name = check_name(entry);
    let hostname = match Hostname::parse(entry) {
        Ok(h) => h,
        Err(e) => {
            return Check::fail(name, e, "fix [acceptance] hostnames");
        }
    };
    let host = &hostname.host;
    let lookup = tokio::time::timeout(
        timeout,
        tokio::net::lookup_host((hostname.host.as_str(), hostname.port)),
    )
    .await;
    let addresses: Vec<SocketAddr> = match lookup {
        Ok(Ok(found)) => found.collect(),
        Ok(Err(e)) => {
            return Check::fail(
                name,
                format!("{host} does not resolve from this host ({e})"),
                format!(
                    "add a DNS record for {host} pointing at the Gateway's LoadBalancer address, on the resolver this host uses (/etc/resolv.conf)"
                ),
            );
        }
        Err(_) => {
            return Check::fail(
                name,
                format!("resolving {host} took longer than {timeout:?}"),
                "check this host's resolver (/etc/resolv.conf)",
            );
        }
    };
    let Some(address) = addresses.first().copied() else {
        return Check::fail(
            name,
            format!("{host} resolves to no address"),
            format!("add an A or AAAA record for {host}"),
        );
    };
    let client = match client(config, timeout).and_then(|b| {
        b.resolve(host, address)
            .build()
            .map_err(|e| format!("cannot build an HTTPS client: {}", cause(&e)))
    }) {
        Ok(c) => c,
        Err(e) => return Check::fail(name, e, "fix [acceptance] ca_cert"),
    };
    let response = match client.get(hostname.url()).send().await {
        Ok(r) => r,
        Err(e) => return unreachable(name, &hostname, address, config, &e),
    };
    let status = response.status();
    let leaf = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .map(<[u8]>::to_vec);
    if status.is_server_error() {
        return Check::fail(
            name,
            format!("{host} ({address}) answered {status}"),
            format!(
                "the Gateway serves {host} but its backend fails: check the HTTPRoute's backend Service and pods"
            ),
        );
    }
    let Some(not_after) = leaf.as_deref().and_then(not_after) else {
        return Check::fail(
            name,
            format!("{host} ({address}) answered {status}, but its certificate could not be read"),
            "report this as a bug",
        );
    };
    let left = not_after - Utc::now();
    let days = left.num_days();
    let until = not_after.format("%Y-%m-%d");
    if days < i64::from(config.cert_min_days) {
        let when = if left <= chrono::Duration::zero() {
            format!("expired on {until}")
        } else {
            format!("expires in {days} days ({until})")
        };
        return Check::fail(
            name,
            format!(
                "the certificate {host} serves {when}, under cert_min_days = {}",
                config.cert_min_days
            ),
            "cert-manager renews 30 days before expiry by default: check the Certificate for this name (kubectl get certificate -A; kubectl describe certificaterequest) and its issuer's ACME challenge",
        );
    }
    Check::pass(
        name,
        format!(
            "{host} resolves to {}, answered {status}; certificate valid for {days} more days (until {until})",
            address.ip()
        ),
    )
}

fn unreachable(
    name: String,
    hostname: &Hostname,
    address: SocketAddr,
    config: &Config,
    e: &reqwest::Error,
) -> Check {
    let host = &hostname.host;
    let why = cause(e);
    let fix = if why.contains("NotValidForName") || why.contains("not valid for") {
        format!(
            "the certificate served at {address} does not name {host}: add {host} to the Certificate's dnsNames (or the Gateway listener's hostname) and check that the name resolves to the right Gateway"
        )
    } else if why.contains("UnknownIssuer") || why.contains("unknown issuer") {
        if config.ca_cert.is_some() {
            "the certificate is signed by neither a public CA nor acceptance.ca_cert: a staging issuer (Let's Encrypt staging) or a self-signed certificate; switch the Certificate's issuerRef to the production issuer".to_string()
        } else {
            "the certificate is signed by an unknown CA: a staging issuer or a self-signed certificate; switch the Certificate's issuerRef to the production issuer, or set acceptance.ca_cert to the lab CA".to_string()
        }
    } else if why.contains("Expired") || why.contains("expired") {
        "the certificate has expired: check the Certificate and its issuer's ACME challenge (kubectl describe certificaterequest)".to_string()
    } else if e.is_connect() || e.is_timeout() {
        format!(
            "nothing answers HTTPS at {address}: check the Gateway's LoadBalancer Service has that address and a listener on port {}",
            hostname.port
        )
    } else {
        format!("check that {host} is served by the Gateway over HTTPS")
    };
    Check::fail(
        name,
        format!("GET {} ({address}): {why}", hostname.url()),
        fix,
    )
}

/// When the DER certificate `der` stops being valid.
fn not_after(der: &[u8]) -> Option<DateTime<Utc>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    DateTime::from_timestamp(cert.validity().not_after.timestamp(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_names_with_an_optional_port() {
        assert_eq!(
            Hostname::parse("Home.Example.org"),
            Ok(Hostname {
                host: "home.example.org".into(),
                port: 443
            })
        );
        assert_eq!(
            Hostname::parse("localhost:8443").map(|h| h.url()),
            Ok("https://localhost:8443/".into())
        );
        for bad in [
            "https://home",
            "home:0",
            "home:x",
            "",
            "a..b",
            "home/path",
            "h_me",
        ] {
            let e = Hostname::parse(bad).expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn the_leaf_certificate_says_when_it_expires() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["home.lab".into()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2031, 5, 17);
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(
            not_after(cert.der()).map(|t| t.to_rfc3339()),
            Some("2031-05-17T00:00:00+00:00".to_string())
        );
        assert_eq!(not_after(b"not a certificate"), None);
    }
}
