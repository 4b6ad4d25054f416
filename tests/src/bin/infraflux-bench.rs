//! Benchmarks that print numbers; not tests. Build in release mode and run:
//!
//! ```sh
//! cargo build --release -p infraflux-agent -p infraflux-tests
//! target/release/infraflux-bench snapshot --size 1GiB
//! ```
//!
//! `snapshot`: an etcd-snapshot-shaped stream of `--size` bytes from a fake Talos API (mutual
//! TLS) through the agent (a separate process, so its memory is its own) into the S3 server;
//! prints throughput and the agent's peak RSS.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use infraflux_tests::peers::S3Server;
use infraflux_tests::talos_fake::{FakeTalos, SnapshotSource};
use infraflux_tests::{Nats, agent_config, free_port, record, submit, test_env};

fn parse_size(s: &str) -> Result<u64, String> {
    let lower = s.to_ascii_lowercase();
    let (number, unit) = lower.split_at(
        lower
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(lower.len()),
    );
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("bad size {s:?}"))?;
    let mult = match unit.trim() {
        "" | "b" => 1.0,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown unit {other:?}")),
    };
    Ok((n * mult) as u64)
}

/// The agent binary next to this one (same profile).
fn agent_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("infraflux-agent")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("build the agent first: cargo build --release -p infraflux-agent")
        })
}

/// Peak resident set size of a process, from the kernel's own high-water mark.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

struct Agent {
    child: Child,
}

impl Agent {
    async fn start(config: &Path, env: &[(&str, String)], http: &str) -> Agent {
        let child = Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(config)
            .envs(test_env())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the agent");
        // Owned at once, so a failure below still kills it.
        let agent = Agent { child };
        for _ in 0..300 {
            if let Ok(r) = reqwest::get(format!("{http}/readyz")).await
                && r.status() == 200
            {
                return agent;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("agent not ready");
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn snapshot(size: u64, compression: &str) {
    let nats = Nats::start();
    let s3 = S3Server::start("etcd").await;
    let talos = FakeTalos::start(SnapshotSource::Synthetic { size }, &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let talosconfig = dir.path().join("talosconfig");
    std::fs::write(&talosconfig, talos.talosconfig()).expect("talosconfig");
    let http_port = free_port();
    let extra = format!(
        "[talos]\ntalosconfig = \"{}\"\ncluster = \"bench\"\n\n[s3]\nendpoint = \"{}\"\naccess_key_id = \"env:BENCH_KEY\"\nsecret_access_key = \"env:BENCH_SECRET\"\n\n[etcd_snapshot]\nbucket = \"etcd\"\ncompression = \"{compression}\"\ntimeout = \"1h\"\n",
        talosconfig.display(),
        s3.endpoint
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        agent_config(&nats.url, "bench", &dir.path().join("state"), &extra),
    )
    .expect("config");
    let env = [
        ("BENCH_KEY", "bench".to_string()),
        ("BENCH_SECRET", "bench-secret".to_string()),
        ("INFRAFLUX_HTTP__LISTEN", format!("127.0.0.1:{http_port}")),
    ];
    let agent = Agent::start(&config, &env, &format!("http://127.0.0.1:{http_port}")).await;
    let client = nats.client().await;
    let idle_rss = peak_rss_kib(agent.pid()).unwrap_or(0);
    let started = Instant::now();
    let job = submit(&client, "snapshot").await;
    let done = loop {
        let r = record(&client, &job).await;
        if matches!(
            r["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let elapsed = started.elapsed().as_secs_f64();
    let peak = peak_rss_kib(agent.pid()).unwrap_or(0);
    assert_eq!(done["state"], "succeeded", "{done}");
    let mib = size as f64 / (1024.0 * 1024.0);
    println!(
        "snapshot size={:.0}MiB compression={compression} seconds={elapsed:.2} throughput={:.1}MiB/s agent_peak_rss={:.1}MiB (idle {:.1}MiB)",
        mib,
        mib / elapsed,
        peak as f64 / 1024.0,
        idle_rss as f64 / 1024.0
    );
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scenario = args.first().map(String::as_str).unwrap_or("help");
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match scenario {
        "snapshot" => {
            let size = parse_size(&flag("--size").unwrap_or_else(|| "1GiB".into()))
                .unwrap_or_else(|e| panic!("{e}"));
            let compression = flag("--compression").unwrap_or_else(|| "none".into());
            runtime.block_on(snapshot(size, &compression));
        }
        _ => {
            eprintln!("usage: infraflux-bench snapshot [--size 1GiB] [--compression none|zstd]");
            std::process::exit(2);
        }
    }
}
