//! A TCP proxy in front of any server (an S3 server, ...) that can make it "gone" for a while:
//! live connections are cut and new ones refused (the listening socket is closed), while the
//! server behind keeps its state, so a test can look at that state once the proxy is back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;

pub struct TcpProxy {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    port: u16,
    upstream: String,
    /// Bytes sent to the server so far.
    upstream_bytes: AtomicU64,
    /// Once `upstream_bytes` passes it: gone for `cut_for`.
    cut_after: AtomicU64,
    cut_for: std::sync::Mutex<Duration>,
    down: AtomicBool,
    /// Wakes the accept loop to cut everything.
    cut: Notify,
}

impl TcpProxy {
    /// Proxies `127.0.0.1:<free port>` to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let shared = Arc::new(Shared {
            port,
            upstream: upstream.to_string(),
            upstream_bytes: AtomicU64::new(0),
            cut_after: AtomicU64::new(u64::MAX),
            cut_for: std::sync::Mutex::new(Duration::ZERO),
            down: AtomicBool::new(false),
            cut: Notify::new(),
        });
        let task = tokio::spawn(serve(listener, shared.clone()));
        TcpProxy {
            addr: format!("127.0.0.1:{port}"),
            shared,
            task,
        }
    }

    /// Once `bytes` more have been sent to the server, cuts every connection and refuses new
    /// ones for `down_for`; then serves again on the same port.
    pub fn cut_after(&self, bytes: u64, down_for: Duration) {
        *self
            .shared
            .cut_for
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = down_for;
        let sent = self.shared.upstream_bytes.load(Ordering::SeqCst);
        self.shared
            .cut_after
            .store(sent.saturating_add(bytes), Ordering::SeqCst);
    }

    /// Whether the server is unreachable through the proxy right now.
    pub fn is_down(&self) -> bool {
        self.shared.down.load(Ordering::SeqCst)
    }

    /// Bytes sent to the server so far.
    pub fn upstream_bytes(&self) -> u64 {
        self.shared.upstream_bytes.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut listener: TcpListener, shared: Arc<Shared>) {
    let mut relays = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                let Ok(server) = TcpStream::connect(&shared.upstream).await else {
                    continue;
                };
                relays.spawn(relay(client, server, shared.clone()));
            }
            () = shared.cut.notified() => {
                // Gone: the connections break and the port refuses until the pause is over.
                shared.down.store(true, Ordering::SeqCst);
                relays.abort_all();
                drop(listener);
                let pause = *shared.cut_for.lock().unwrap_or_else(|p| p.into_inner());
                tokio::time::sleep(pause).await;
                listener = loop {
                    // tokio sets SO_REUSEADDR: the port is free again at once.
                    match TcpListener::bind(("127.0.0.1", shared.port)).await {
                        Ok(l) => break l,
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
                shared.down.store(false, Ordering::SeqCst);
            }
            Some(_) = relays.join_next(), if !relays.is_empty() => {}
        }
    }
}

async fn relay(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = {
        let shared = shared.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let sent = shared.upstream_bytes.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                if sent >= shared.cut_after.load(Ordering::SeqCst) {
                    shared.cut_after.store(u64::MAX, Ordering::SeqCst);
                    shared.cut.notify_one();
                    // This connection's bytes stop here: the server never sees them whole.
                    std::future::pending::<()>().await;
                }
                if server_write.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = server_write.shutdown().await;
        }
    };
    let downstream = async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}
