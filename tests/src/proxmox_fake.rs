//! A fake Proxmox VE API over HTTPS with its own test CA, as a Proxmox node ships a
//! self-signed one: `GET /api2/json/version` and `GET /api2/json/access/permissions`, in the
//! real shapes, answered only for the right `Authorization: PVEAPIToken=<id>=<secret>`
//! (401 "authentication failure" otherwise, as pveproxy answers).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use crate::tls::{Request, TestCa, serve};

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
        let ca = TestCa::new("Proxmox Virtual Environment test CA");
        let config = ca.server_config(&["localhost"], 3650);
        let mut root = BTreeMap::new();
        for p in privileges {
            root.insert(p.to_string(), 1);
        }
        let state = Arc::new(Mutex::new(State {
            authorization: format!("PVEAPIToken={token_id}={secret}"),
            privileges: [("/".to_string(), root)].into(),
            requests: Vec::new(),
        }));
        let served = state.clone();
        let port = serve(config, move |request| answer(&served, request));
        FakeProxmox {
            api_url: format!("https://127.0.0.1:{port}/api2/json"),
            ca_pem: ca.pem,
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

fn answer(state: &Mutex<State>, request: &Request) -> (String, String) {
    let path = &request.path;
    let authorization = &request.authorization;
    let (status, body) = {
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        let accepted = *authorization == state.authorization;
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
    (status.to_string(), body.to_string())
}
