//! `proxmox.api` and `proxmox.permissions`: the Proxmox VE API answers over HTTPS (with its
//! own CA), and the API token may do what the VM module asks. The token travels only in the
//! `Authorization: PVEAPIToken=<id>=<secret>` header, marked sensitive.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use super::cause;
use crate::checks::Check;
use crate::clients::ProxmoxConfig;
use crate::secret::Secret;

const API: &str = "proxmox.api";
const PERMISSIONS: &str = "proxmox.permissions";

/// `https://host:8006/api2/json`, whether or not the config wrote the suffix.
pub fn base_url(api_url: &str) -> String {
    let url = api_url.trim_end_matches('/');
    if url.ends_with("/api2/json") {
        url.to_string()
    } else {
        format!("{url}/api2/json")
    }
}

/// The path whose privileges grant `privilege` on what the VM module touches: VMs under
/// `/vms`, datastores under `/storage`, SDN zones under `/sdn`; `/` grants everything.
fn scope_of(privilege: &str) -> &'static str {
    if privilege.starts_with("VM.") {
        "/vms"
    } else if privilege.starts_with("Datastore.") {
        "/storage"
    } else if privilege.starts_with("SDN.") {
        "/sdn"
    } else {
        "/"
    }
}

/// The required privileges that `granted` (path → privilege → 0/1, as
/// `GET /access/permissions` answers) does not give, each with the path it is needed on.
pub fn missing_privileges(
    granted: &BTreeMap<String, BTreeMap<String, Value>>,
    required: &[String],
) -> Vec<(String, &'static str)> {
    // Granted on `/`, on the scope, or below it (one datastore, one SDN zone, a pool).
    let has = |privilege: &str| {
        let scope = scope_of(privilege);
        granted.iter().any(|(path, privileges)| {
            let applies = path == "/"
                || path == scope
                || (scope != "/" && path.starts_with(&format!("{scope}/")))
                || (scope != "/" && path.starts_with("/pool/"));
            applies
                && privileges
                    .get(privilege)
                    .is_some_and(|v| v.as_i64().unwrap_or(0) != 0 || v.as_bool() == Some(true))
        })
    };
    let mut seen = BTreeSet::new();
    required
        .iter()
        .filter(|p| seen.insert(p.as_str()))
        .filter(|p| !has(p))
        .map(|p| (p.clone(), scope_of(p)))
        .collect()
}

/// Both Proxmox checks; the second is skipped when the first failed.
pub async fn check(
    config: &ProxmoxConfig,
    secret: Option<&Secret>,
    required: &[String],
    timeout: Duration,
) -> (Check, Check) {
    let skip = |why: &str| Check::skip(PERMISSIONS, why);
    let base = base_url(&config.api_url);
    if !base.starts_with("https://") {
        return (
            Check::fail(
                API,
                format!("proxmox.api_url {} is not https://", config.api_url),
                "Proxmox serves its API over HTTPS on port 8006: write https://<host>:8006/api2/json",
            ),
            skip("proxmox.api failed"),
        );
    }
    let Some(secret) = secret else {
        return (
            Check::fail(
                API,
                "proxmox.token_secret did not resolve (see the secrets check)",
                "fix the proxmox.token_secret reference",
            ),
            skip("the token secret did not resolve"),
        );
    };
    let client = match client(config, timeout) {
        Ok(c) => c,
        Err(failed) => return (failed, skip("proxmox.api failed")),
    };
    let auth = match http::HeaderValue::from_str(&format!(
        "PVEAPIToken={}={}",
        config.token_id,
        secret.expose()
    )) {
        Ok(mut v) => {
            v.set_sensitive(true);
            v
        }
        Err(_) => {
            return (
                Check::fail(
                    API,
                    "proxmox.token_id or the token secret holds characters a header cannot carry",
                    "write the token id as user@realm!name and the secret as Proxmox printed it (a UUID)",
                ),
                skip("proxmox.api failed"),
            );
        }
    };
    let get = |path: &str| {
        client
            .get(format!("{base}{path}"))
            .header(http::header::AUTHORIZATION, auth.clone())
            .send()
    };
    let host = base.trim_end_matches("/api2/json").to_string();
    let version = match get("/version").await {
        Ok(response) => match read(response).await {
            Ok(data) => data,
            Err((status, body)) => {
                return (
                    refused(config, &host, status, &body),
                    skip("proxmox.api failed"),
                );
            }
        },
        Err(e) => return (unreachable(config, &host, &e), skip("proxmox.api failed")),
    };
    let text = |key: &str| {
        version
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    let api = Check::pass(
        API,
        format!(
            "Proxmox VE {} (release {}) at {host}",
            text("version"),
            text("release")
        ),
    );
    let permissions = match get("/access/permissions").await {
        Ok(response) => match read(response).await {
            Ok(data) => judge(config, &data, required),
            Err((status, body)) => Check::fail(
                PERMISSIONS,
                format!("GET /access/permissions answered {status}: {body}"),
                "the token must be able to read its own permissions; check it with `pveum user token permissions <user> <token>`",
            ),
        },
        Err(e) => Check::fail(
            PERMISSIONS,
            format!("GET /access/permissions: {}", cause(&e)),
            "check that this host reaches the Proxmox API",
        ),
    };
    (api, permissions)
}

fn judge(config: &ProxmoxConfig, data: &Value, required: &[String]) -> Check {
    let granted: BTreeMap<String, BTreeMap<String, Value>> =
        serde_json::from_value(data.clone()).unwrap_or_default();
    let missing = missing_privileges(&granted, required);
    if missing.is_empty() {
        return Check::pass(
            PERMISSIONS,
            format!(
                "token {} has the {} required privileges",
                config.token_id,
                required.len()
            ),
        );
    }
    let names: Vec<String> = missing
        .iter()
        .map(|(p, path)| format!("{p} on {path}"))
        .collect();
    let privileges: Vec<&str> = missing.iter().map(|(p, _)| p.as_str()).collect();
    Check::fail(
        PERMISSIONS,
        format!(
            "token {} lacks {} of {} required privileges: {}",
            config.token_id,
            missing.len(),
            required.len(),
            names.join(", ")
        ),
        format!(
            "grant them to the token through a role, e.g. `pveum role modify InfrafluxTerraform -privs \"{}\" -append 1` and `pveum acl modify / -token '{}' -role InfrafluxTerraform`; a token with privilege separation also needs them on its user",
            privileges.join(","),
            config.token_id
        ),
    )
}

fn client(config: &ProxmoxConfig, timeout: Duration) -> Result<reqwest::Client, Check> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("infraflux-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.ca_cert {
        let pem = std::fs::read(path).map_err(|e| {
            Check::fail(
                API,
                format!("cannot read proxmox.ca_cert {path}: {}", e.kind()),
                "copy /etc/pve/pve-root-ca.pem from a Proxmox node to that path",
            )
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                Check::fail(
                    API,
                    format!("proxmox.ca_cert {path} holds no PEM certificate"),
                    "copy /etc/pve/pve-root-ca.pem from a Proxmox node to that path",
                )
            })?;
        // Proxmox signs its own certificate: only its CA is trusted for it.
        builder = builder.tls_certs_only(certs);
    }
    builder.build().map_err(|e| {
        Check::fail(
            API,
            format!("cannot build an HTTPS client: {}", cause(&e)),
            "check proxmox.ca_cert",
        )
    })
}

/// `data` of a 2xx answer, or the status and a short body.
async fn read(response: reqwest::Response) -> Result<Value, (u16, String)> {
    let status = response.status();
    // Proxmox puts its reason in the status line ("401 authentication failure").
    let reason = status.canonical_reason().unwrap_or("").to_string();
    let body = response.text().await.unwrap_or_default();
    if !status.is_success() {
        let short: String = body.chars().take(200).collect();
        let text = if short.trim().is_empty() {
            reason
        } else {
            short
        };
        return Err((status.as_u16(), text.trim().to_string()));
    }
    serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v.get("data").cloned())
        .ok_or((status.as_u16(), "an answer without `data`".to_string()))
}

fn refused(config: &ProxmoxConfig, host: &str, status: u16, body: &str) -> Check {
    if status == 401 {
        return Check::fail(
            API,
            format!(
                "Proxmox at {host} refused the API token {} (401 {body})",
                config.token_id
            ),
            format!(
                "check proxmox.token_id (user@realm!tokenname) and that proxmox.token_secret ({}) holds that token's secret; `pveum user token list <user>` lists the tokens, `pveum user token add` makes a new one",
                config.token_secret.describe()
            ),
        );
    }
    Check::fail(
        API,
        format!("Proxmox at {host} answered GET /version with {status}: {body}"),
        "check proxmox.api_url: it is https://<host>:8006/api2/json",
    )
}

fn unreachable(config: &ProxmoxConfig, host: &str, e: &reqwest::Error) -> Check {
    let why = cause(e);
    let tls = ["certificate", "UnknownIssuer", "tls", "TLS", "handshake"]
        .iter()
        .any(|w| why.contains(w));
    let fix = if tls && config.ca_cert.is_none() {
        "Proxmox's certificate is self-signed: set proxmox.ca_cert to its CA (/etc/pve/pve-root-ca.pem on a node)".to_string()
    } else if tls {
        "proxmox.ca_cert must be the CA that signed the node's certificate (/etc/pve/pve-root-ca.pem), and api_url's host must be a name or address in that certificate".to_string()
    } else {
        "check proxmox.api_url (https://<host>:8006/api2/json) and that this host reaches it"
            .to_string()
    };
    Check::fail(API, format!("cannot reach Proxmox at {host}: {why}"), fix)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_suffix_is_added_once() {
        assert_eq!(base_url("https://pve:8006"), "https://pve:8006/api2/json");
        assert_eq!(
            base_url("https://pve:8006/api2/json/"),
            "https://pve:8006/api2/json"
        );
    }

    #[test]
    fn privileges_count_on_root_or_on_their_own_path() {
        let granted: BTreeMap<String, BTreeMap<String, Value>> = serde_json::from_value(json!({
            "/": {"Sys.Audit": 1, "Datastore.Audit": 0},
            "/vms": {"VM.Allocate": 1},
            "/storage": {"Datastore.AllocateSpace": 1},
            "/sdn/zones/lab": {"SDN.Use": 1},
            "/vms/100": {"VM.Clone": 1},
        }))
        .expect("permissions");
        let required: Vec<String> = [
            "Sys.Audit",
            "VM.Allocate",
            "VM.Clone",
            "Datastore.AllocateSpace",
            "Datastore.Audit",
            "SDN.Use",
            "VM.Allocate",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            missing_privileges(&granted, &required),
            vec![("Datastore.Audit".to_string(), "/storage")]
        );
    }
}
