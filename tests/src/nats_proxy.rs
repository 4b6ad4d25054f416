//! A TCP proxy in front of a real nats-server that can lose JetStream publish acknowledgements
//! on their way back to the client: the server has stored the message, the client never hears
//! so and times out. This is what a flaky link or a server that stalls after writing does.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

pub struct NatsProxy {
    pub url: String,
    drop_acks: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    stream: Arc<str>,
    task: tokio::task::JoinHandle<()>,
}

impl NatsProxy {
    /// Proxies to `upstream_port`; acknowledgements of publishes to `stream` can be dropped.
    pub async fn start(upstream_port: u16, stream: &str) -> NatsProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let drop_acks = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let stream: Arc<str> = Arc::from(stream);
        let task = {
            let drop_acks = drop_acks.clone();
            let dropped = dropped.clone();
            let stream = stream.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await else {
                        continue;
                    };
                    tokio::spawn(relay(
                        client,
                        server,
                        drop_acks.clone(),
                        dropped.clone(),
                        stream.clone(),
                    ));
                }
            })
        };
        NatsProxy {
            url: format!("nats://127.0.0.1:{port}"),
            drop_acks,
            dropped,
            stream,
            task,
        }
    }

    /// Loses the next `n` publish acknowledgements of the stream.
    pub fn drop_next_acks(&self, n: usize) {
        self.drop_acks.store(n, Ordering::SeqCst);
    }

    /// How many acknowledgements were lost so far.
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }
}

impl Drop for NatsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    client: TcpStream,
    server: TcpStream,
    drop_acks: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
    stream: Arc<str>,
) {
    let (mut client_read, mut client_write) = client.into_split();
    let (server_read, mut server_write) = server.into_split();
    let upstream = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
    });
    // Server to client, frame by frame: `MSG subject sid [reply] n` or
    // `HMSG subject sid [reply] hdr_n total_n`, then the payload and CRLF.
    let mut reader = BufReader::new(server_read);
    let ack_prefix = format!("{{\"stream\":\"{stream}\"");
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line).to_string();
        let words: Vec<&str> = text.split_whitespace().collect();
        let payload_len = match words.first().copied() {
            Some("MSG") => words.last().and_then(|n| n.parse::<usize>().ok()),
            Some("HMSG") => words.last().and_then(|n| n.parse::<usize>().ok()),
            _ => None,
        };
        let Some(len) = payload_len else {
            if client_write.write_all(&line).await.is_err() {
                break;
            }
            continue;
        };
        let mut payload = vec![0u8; len + 2];
        if reader.read_exact(&mut payload).await.is_err() {
            break;
        }
        let is_ack = words.first() == Some(&"MSG")
            && String::from_utf8_lossy(&payload).starts_with(&ack_prefix);
        if is_ack
            && drop_acks
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            dropped.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        if client_write.write_all(&line).await.is_err()
            || client_write.write_all(&payload).await.is_err()
        {
            break;
        }
    }
    upstream.abort();
}
