//! The HTTP listener under idle, slow and too many clients: `[http] read_timeout`,
//! `max_in_flight` and `max_connections`.

use std::time::Duration;

use infraflux_tests::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::crash::AgentProcess;
use crate::operations::samples;

/// A request line and one header, never finished.
const PARTIAL_HEAD: &[u8] = b"POST /webhooks/github HTTP/1.1\r\nHost: x\r\n";

/// Far longer than any `read_timeout` these tests configure: a connection still open after
/// this was not going to be closed.
const CLOSE_LIMIT: Duration = Duration::from_secs(30);

/// Reads until the server closes the connection; what it sent before closing. A reset counts as
/// closed too (the server closed while the client was still writing).
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = tokio::time::timeout(CLOSE_LIMIT, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the server kept the connection open for {CLOSE_LIMIT:?}; it sent {:?}",
        String::from_utf8_lossy(&received)
    );
    received
}

/// Sends `start`, then one more byte every 100 ms (a slowloris client), until the server closes
/// the connection; what it sent before closing.
async fn trickle_until_closed(mut stream: TcpStream, start: &[u8]) -> Vec<u8> {
    stream.write_all(start).await.expect("write");
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = tokio::time::timeout(CLOSE_LIMIT, async {
        loop {
            tokio::select! {
                read = stream.read(&mut chunk) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => received.extend_from_slice(&chunk[..n]),
                },
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if stream.write_all(b"a").await.is_err() {
                        break;
                    }
                }
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a client sending a byte every 100 ms kept its connection for {CLOSE_LIMIT:?}"
    );
    received
}

/// The agent binary as a child process with `[http] read_timeout`, ready; and its HTTP port.
/// A child process: the sockets it accepts are not counted against this process's descriptor
/// limit, which the other tests of this binary share.
async fn spawn_agent(
    nats: &Nats,
    dir: &std::path::Path,
    read_timeout: &str,
    extra_env: &[(&'static str, String)],
) -> (AgentProcess, u16) {
    let http_port = free_port();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        agent_config(&nats.url, "http-limits", &dir.join("state"), ""),
    )
    .expect("config");
    let mut env = vec![
        ("INFRAFLUX_HTTP__LISTEN", format!("127.0.0.1:{http_port}")),
        ("INFRAFLUX_HTTP__READ_TIMEOUT", read_timeout.to_string()),
    ];
    env.extend_from_slice(extra_env);
    let agent = crate::crash::spawn_agent(&config, &env, &dir.join("agent.log"));
    wait_for(Duration::from_secs(30), "the agent to be ready", || async {
        reqwest::get(format!("http://127.0.0.1:{http_port}/readyz"))
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
    (agent, http_port)
}

/// Nothing at all, or a request head that is never finished: 300 such connections neither delay
/// `/healthz` or a signed webhook nor stay open past `read_timeout`; nor does a connection
/// trickling its head or body a byte at a time, nor a kept-alive one gone idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_neither_block_requests_nor_stay_open() {
    init();
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_agent, http_port) = spawn_agent(&nats, dir.path(), "4s", &[]).await;
    let http = format!("http://127.0.0.1:{http_port}");
    let address = format!("127.0.0.1:{http_port}");
    let mut idle = Vec::new();
    for i in 0..300 {
        let mut stream = TcpStream::connect(&address).await.expect("connect");
        if i % 2 == 1 {
            stream.write_all(PARTIAL_HEAD).await.expect("write");
        }
        idle.push(stream);
    }
    let slow_head = tokio::spawn(trickle_until_closed(
        TcpStream::connect(&address).await.expect("connect"),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",
    ));
    let slow_body = tokio::spawn(trickle_until_closed(
        TcpStream::connect(&address).await.expect("connect"),
        b"POST /webhooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{",
    ));
    let mut kept_alive = TcpStream::connect(&address).await.expect("connect");
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");

    let health = reqwest::get(format!("{http}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let (status, reply) =
        post_webhook(&http, "push", "idle-1", &fixture("github/push/push.json")).await;
    assert_eq!(status, 202, "{reply}");

    for (i, stream) in idle.iter_mut().enumerate() {
        let received = read_until_closed(stream).await;
        // Closed without an answer; a 408 would do as well.
        assert!(
            received.is_empty() || received.starts_with(b"HTTP/1.1 408"),
            "connection {i}: {:?}",
            String::from_utf8_lossy(&received)
        );
    }
    let received = String::from_utf8_lossy(&read_until_closed(&mut kept_alive).await).to_string();
    assert!(
        received.starts_with("HTTP/1.1 200") && received.ends_with("ok\n"),
        "one answer, then closed when idle: {received:?}"
    );
    let received = slow_head.await.expect("slow head");
    assert!(
        !received.starts_with(b"HTTP/1.1 200"),
        "a head that never ends is not answered: {:?}",
        String::from_utf8_lossy(&received)
    );
    // The 408 may be lost to the reset that the client's next byte causes; being cut off is
    // what counts.
    slow_body.await.expect("slow body");

    // Still serving after all that.
    let health = reqwest::get(format!("{http}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
}

/// A webhook whose headers came and whose body does not: it holds one of the
/// `max_in_flight` slots until `read_timeout`.
async fn start_slow_webhook(address: &str, delivery: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let head = format!(
        "POST /webhooks/github HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         X-GitHub-Event: push\r\nX-GitHub-Delivery: {delivery}\r\n\
         X-Hub-Signature-256: sha256=00\r\nContent-Length: 1000\r\n\r\n{{\"ref\":"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_beyond_max_in_flight_get_503_and_unfinished_bodies_get_408() {
    init();
    let nats = Nats::start();
    let agent = start_agent_with_env(
        &nats,
        "http-busy",
        "",
        &[
            ("INFRAFLUX_HTTP__MAX_IN_FLIGHT", "2"),
            ("INFRAFLUX_HTTP__READ_TIMEOUT", "5s"),
        ],
        |_| {},
    )
    .await;
    let address = agent.http.trim_start_matches("http://").to_string();
    let mut slow = vec![
        start_slow_webhook(&address, "slow-1").await,
        start_slow_webhook(&address, "slow-2").await,
    ];
    wait_for(
        Duration::from_secs(5),
        "both slow webhooks to hold a slot",
        || async {
            let metrics = samples(&metrics_text(&agent.http).await);
            (metrics.get("infraflux_webhooks_in_flight") == Some(&2.0)).then_some(())
        },
    )
    .await;

    let body = fixture("github/push/push.json");
    let (status, reply) = post_webhook(&agent.http, "push", "busy-1", &body).await;
    assert_eq!(status, 503, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap_or_default()
            .contains("too many webhook requests"),
        "{reply}"
    );
    // Health is not counted against the limit.
    let health = reqwest::get(format!("{}/healthz", agent.http))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);

    for stream in &mut slow {
        let received = String::from_utf8_lossy(&read_until_closed(stream).await).to_string();
        assert!(
            received.starts_with("HTTP/1.1 408"),
            "an unfinished body is answered 408: {received:?}"
        );
        assert!(
            received.contains("request body not received within 5s"),
            "{received:?}"
        );
    }
    // The slots are free again: the refused delivery goes through when sent again.
    let (status, reply) = post_webhook(&agent.http, "push", "busy-1", &body).await;
    assert_eq!(status, 202, "{reply}");
    let metrics = samples(&metrics_text(&agent.http).await);
    assert_eq!(
        metrics.get("infraflux_webhooks_in_flight"),
        Some(&0.0),
        "{metrics:?}"
    );
    for (result, count) in [("overloaded", 1.0), ("timeout", 2.0), ("accepted", 1.0)] {
        assert_eq!(
            metrics.get(&format!(
                "infraflux_webhook_requests_total{{result=\"{result}\"}}"
            )),
            Some(&count),
            "{metrics:?}"
        );
    }
    agent.stop().await;
}

/// Half-sent requests do not hold the agent at SIGTERM, even with a `read_timeout` far longer
/// than the wait: it exits 0, closing them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_do_not_hold_up_shutdown() {
    init();
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut agent, http_port) = spawn_agent(&nats, dir.path(), "10m", &[]).await;
    let address = format!("127.0.0.1:{http_port}");
    let mut open = Vec::new();
    for i in 0..20 {
        let mut stream = TcpStream::connect(&address).await.expect("connect");
        if i % 2 == 1 {
            stream.write_all(PARTIAL_HEAD).await.expect("write");
        }
        open.push(stream);
    }
    // Every connection has been accepted once a later request is answered.
    let health = reqwest::get(format!("http://{address}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);

    kill(Pid::from_raw(agent.pid() as i32), Signal::SIGTERM).expect("SIGTERM");
    let code = tokio::task::block_in_place(|| agent.exit_within(Duration::from_secs(60)));
    assert_eq!(code, Some(0), "a clean shutdown exits 0, and within 60s");
    for stream in &mut open {
        read_until_closed(stream).await;
    }
}

/// Beyond `max_connections`, a new connection waits in the accept queue: it is served once an
/// open one closes, and the agent never holds more sockets than that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_wait_until_one_closes() {
    init();
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (agent, http_port) = spawn_agent(
        &nats,
        dir.path(),
        "10m",
        &[("INFRAFLUX_HTTP__MAX_CONNECTIONS", "3".to_string())],
    )
    .await;
    let address = format!("127.0.0.1:{http_port}");
    let sockets = || {
        std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
            .expect("fds")
            .flatten()
            .filter(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
            })
            .count()
    };
    // The readiness probe's connection may still be open; let it close.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = sockets();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(&address).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The kernel completes the handshake (the accept queue); the agent does not accept it.
    let mut waiting = TcpStream::connect(&address).await.expect("connect");
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let early =
        tokio::time::timeout(Duration::from_secs(2), waiting.read_to_end(&mut answer)).await;
    assert!(
        early.is_err(),
        "answered while 3 connections were open: {answer:?}"
    );
    assert_eq!(sockets(), before + 3, "three accepted connections, no more");

    drop(held.pop());
    tokio::time::timeout(Duration::from_secs(5), waiting.read_to_end(&mut answer))
        .await
        .expect("answered once a connection closed")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
