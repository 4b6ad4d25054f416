//! A real 3-server nats-server cluster with JetStream on loopback: routes between the
//! servers, a store per server, a monitoring port each (to find the meta leader). Servers are
//! killed with SIGKILL and restarted on the same ports and stores, as a crashed host comes
//! back.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::free_port;

pub const CLUSTER_SIZE: usize = 3;

struct Server {
    name: String,
    client_port: u16,
    monitor_port: u16,
    config: PathBuf,
    child: Mutex<Option<Child>>,
}

pub struct NatsCluster {
    servers: Vec<Server>,
    /// Every server's client URL, comma-separated, as `[nats] url` takes them.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts three servers and waits until JetStream has a meta leader.
    pub async fn start() -> NatsCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let route_ports: Vec<u16> = (0..CLUSTER_SIZE).map(|_| free_port()).collect();
        let mut servers = Vec::new();
        for (i, route_port) in route_ports.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let client_port = free_port();
            let monitor_port = free_port();
            let routes: Vec<String> = route_ports
                .iter()
                .filter(|p| *p != route_port)
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            let store = dir.path().join(&name);
            let config = dir.path().join(format!("{name}.conf"));
            std::fs::write(
                &config,
                format!(
                    r#"
server_name: "{name}"
listen: "127.0.0.1:{client_port}"
http: "127.0.0.1:{monitor_port}"
jetstream {{
  store_dir: "{store}"
}}
cluster {{
  name: "infraflux-test"
  listen: "127.0.0.1:{route_port}"
  routes: [{routes}]
}}
"#,
                    store = store.display(),
                    routes = routes.join(", ")
                ),
            )
            .expect("server config");
            servers.push(Server {
                name,
                client_port,
                monitor_port,
                config,
                child: Mutex::new(None),
            });
        }
        let url = servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.client_port))
            .collect::<Vec<_>>()
            .join(",");
        let cluster = NatsCluster {
            servers,
            url,
            _dir: dir,
        };
        for i in 0..CLUSTER_SIZE {
            cluster.spawn(i);
        }
        cluster.wait_for_meta_leader(Duration::from_secs(30)).await;
        cluster
    }

    fn spawn(&self, i: usize) {
        let server = &self.servers[i];
        // The server's own log, appended across restarts, tells why it did not come up.
        let log_path = server.config.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("server log");
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&server.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start nats-server ({e}); install it (Debian: apt-get install nats-server)")
            });
        *server.child.lock().expect("lock") = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", server.client_port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        panic!(
            "nats-server {} did not listen on {}; its log ends:\n{}",
            server.name,
            server.client_port,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    pub fn name(&self, i: usize) -> &str {
        &self.servers[i].name
    }

    /// A client of the whole cluster.
    pub async fn client(&self) -> async_nats::Client {
        let servers: Vec<async_nats::ServerAddr> = self
            .url
            .split(',')
            .map(|u| u.parse().expect("server address"))
            .collect();
        async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(servers)
            .await
            .expect("connect to the cluster")
    }

    /// The monitoring endpoint's `/jsz` of server `i`, if it answers.
    async fn jsz(&self, i: usize) -> Option<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}/jsz", self.servers[i].monitor_port);
        let response = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    /// The index of the JetStream meta leader, as a running server reports it.
    pub async fn meta_leader(&self) -> Option<usize> {
        for i in 0..CLUSTER_SIZE {
            if !self.is_running(i) {
                continue;
            }
            let Some(jsz) = self.jsz(i).await else {
                continue;
            };
            let leader = jsz["meta_cluster"]["leader"].as_str().unwrap_or_default();
            if let Some(index) = self.servers.iter().position(|s| s.name == leader) {
                return Some(index);
            }
        }
        None
    }

    /// Waits until the running servers agree on a meta leader.
    pub async fn wait_for_meta_leader(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = self.meta_leader().await {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "no JetStream meta leader within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the server leading `stream` (its Raft group), asked through `client`.
    pub async fn stream_leader(&self, client: &async_nats::Client, stream: &str) -> Option<usize> {
        let js = async_nats::jetstream::new(client.clone());
        let mut stream = js.get_stream(stream).await.ok()?;
        let info = stream.info().await.ok()?;
        let leader = info.cluster.as_ref()?.leader.clone()?;
        self.servers.iter().position(|s| s.name == leader)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.servers[i]
            .child
            .lock()
            .expect("lock")
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, as a crashed host: nothing is flushed, no leadership handed over.
    pub fn kill9(&self, i: usize) {
        if let Some(mut child) = self.servers[i].child.lock().expect("lock").take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts server `i` again on its ports and store.
    pub fn restart(&self, i: usize) {
        self.spawn(i);
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..CLUSTER_SIZE {
            self.kill9(i);
        }
    }
}
