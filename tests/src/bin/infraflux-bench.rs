//! Benchmarks that print numbers; not tests. One command builds and runs them all:
//!
//! ```sh
//! scripts/bench.sh            # cargo build --release, then infraflux-bench all
//! ```
//!
//! `infraflux-bench all [--quick]` prints a table of figure, baseline, ratio, target and whether
//! it is met (docs/performance.md keeps one from a real run). `infraflux-bench snapshot --size
//! 1GiB` runs only the snapshot stream, `infraflux-bench footprint --schedules N` only the idle
//! footprint, `infraflux-bench secret-scan --files 5000` only the secret scan of a generated
//! repository, `infraflux-bench etcd-drill --size 1GiB` only the etcd restore drill, `infraflux-bench upgrade
//! --reboot-seconds 2` only a rolling upgrade of five fake nodes.

use std::time::Duration;

use infraflux_tests::Nats;
use infraflux_tests::bench;
use infraflux_tests::peers::S3Server;

fn parse_size(s: &str) -> Result<u64, String> {
    let lower = s.to_ascii_lowercase();
    let split = lower
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
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

/// The offered rates of `ingest --paced`, for the agent and for the store's floor alike.
const PACED_RATES: [f64; 4] = [100.0, 500.0, 1000.0, 2000.0];

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
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
    match args.first().map(String::as_str) {
        Some("all") => {
            let quick = args.iter().any(|a| a == "--quick");
            let started = std::time::Instant::now();
            let rows = runtime.block_on(bench::run_all(quick));
            bench::print_table(&rows);
            println!(
                "\n{} on {} cores, {} in {:.0} s",
                chrono::Utc::now().format("%Y-%m-%d"),
                std::thread::available_parallelism().map_or(0, |n| n.get()),
                if quick { "quick run" } else { "full run" },
                started.elapsed().as_secs_f64()
            );
        }
        Some("snapshot") => {
            let size = parse_size(&flag("--size").unwrap_or_else(|| "1GiB".into()))
                .unwrap_or_else(|e| panic!("{e}"));
            runtime.block_on(async {
                let nats = Nats::start();
                let s3 = S3Server::start_s3s_fs("etcd", "bench", "bench-secret").await;
                let r = bench::bench_snapshot(&nats, &s3, size).await;
                println!(
                    "snapshot size={}MiB seconds={:.2} throughput={:.1}MiB/s agent_peak_rss={:.1}MiB",
                    size >> 20,
                    r.seconds,
                    size as f64 / r.seconds / 1048576.0,
                    bench::mib(r.peak_rss_kib)
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            });
        }
        Some("ingest") => {
            // Ingest alone, for profiling; `--paced` adds fixed offered rates (open loop), the
            // same with the runner busy with long jobs (as in a lab, where a job takes minutes,
            // not the instant the benchmark's failing jobs take), and the baseline.
            let seconds: u64 = flag("--seconds").map_or(10, |n| n.parse().expect("--seconds N"));
            let paced = std::env::args().any(|a| a == "--paced");
            // `--floors`: the closed loop's HTTP and store floors too, measured first.
            let floors = std::env::args().any(|a| a == "--floors");
            // A paced phase longer than two minutes takes in nats-server 2.9's periodic sync
            // of its stores (fixed at 2 minutes there): `--rates 500 --seconds 130` measures
            // a p99 over a whole sync cycle, with the closed loop kept short.
            let paced_rates: Vec<f64> = flag("--rates").map_or(PACED_RATES.to_vec(), |list| {
                list.split(',')
                    .map(|r| r.trim().parse().expect("--rates N,N,..."))
                    .collect()
            });
            let closed_seconds: u64 = flag("--closed-seconds")
                .map_or(seconds, |n| n.parse().expect("--closed-seconds N"));
            runtime.block_on(async {
                let nats = Nats::start();
                let nats_pid = nats.pid().expect("nats-server runs");
                let duration = Duration::from_secs(seconds);
                let line = |what: &str, load: &bench::Load| {
                    println!(
                        "{what}: rate={:.0}req/s errors={} p50={:.2}ms p99={:.2}ms",
                        load.rate(),
                        load.errors,
                        load.latencies.ms(0.5),
                        load.latencies.ms(0.99)
                    )
                };
                let markers = tempfile::tempdir().expect("markers");
                let runners: &[bool] = if paced { &[false, true] } else { &[false] };
                let mut next = 0u64;
                for &busy in runners {
                    let agent = if busy {
                        let env = [
                            ("IFX_TEST_MARKERS", markers.path().display().to_string()),
                            ("IFX_TEST_RECONCILE", "1".to_string()),
                            ("IFX_TEST_SLEEP_MS", "3600000".to_string()),
                        ];
                        bench::AgentProcess::start_test_agent(&nats, "ingest-busy", "", &env).await
                    } else {
                        bench::AgentProcess::start(&nats, "ingest", "", &[]).await
                    };
                    println!("agent pid {}", agent.pid());
                    let runner = if busy {
                        "runner busy with long jobs"
                    } else {
                        "jobs end at once"
                    };
                    let url = format!("{}/webhooks/github", agent.http);
                    // Paced first: a rate is measured with an empty queue, not behind the
                    // closed loop's tens of thousands of jobs; after a warm-up, not on a cold
                    // agent (its first store writes, its connections).
                    let rates: &[f64] = if paced { &paced_rates } else { &[] };
                    if !rates.is_empty() {
                        bench::webhook_load_at(&url, 100.0, Duration::from_secs(2), next).await;
                        next += 1_000_000_000;
                    }
                    for rate in rates {
                        if !busy {
                            // The runner first works off what the load before left queued.
                            let took = bench::queue_drained(&nats, Duration::from_secs(600)).await;
                            println!("queue drained in {:.1} s", took.as_secs_f64());
                        }
                        let load = bench::webhook_load_at(&url, *rate, duration, next).await;
                        next += 1_000_000_000;
                        line(
                            &format!("ingest offered at {rate:.0} req/s, {runner}"),
                            &load,
                        );
                        let probe = format!("{}/healthz", agent.http);
                        let floor = bench::probe_load_at(&probe, *rate, duration).await;
                        line(
                            &format!("HTTP floor (GET /healthz of the same agent) at {rate:.0} req/s, {runner}"),
                            &floor,
                        );
                    }
                    let closed = Duration::from_secs(closed_seconds);
                    if floors && !busy {
                        // Before the agent's closed loop, while its runner is idle: what HTTP
                        // alone and the store alone give in a closed loop on these cores.
                        let probe = format!("{}/healthz", agent.http);
                        let meter = bench::CpuMeter::start(&[
                            ("agent", agent.pid()),
                            ("load generator", std::process::id()),
                        ]);
                        let http = bench::probe_load(&probe, 16, closed).await;
                        line(
                            "HTTP floor (GET /healthz of the same agent), 16 connections, closed loop",
                            &http,
                        );
                        println!("  {}", meter.report(http.requests, http.rate()));
                        let meter = bench::CpuMeter::start(&[
                            ("nats-server", nats_pid),
                            ("load generator", std::process::id()),
                        ]);
                        let store = bench::store_floor_closed(&nats, closed).await;
                        line(
                            "store floor (claim, record, job in one round trip, then the queued event; no agent), 16 senders, closed loop",
                            &store,
                        );
                        println!("  {}", meter.report(store.requests, store.rate()));
                    }
                    let meter = bench::CpuMeter::start(&[
                        ("agent", agent.pid()),
                        ("nats-server", nats_pid),
                        ("load generator", std::process::id()),
                    ]);
                    let load = bench::webhook_load(&url, 16, closed, true, next).await;
                    next += 1_000_000_000;
                    line(
                        &format!("ingest, 16 connections, closed loop, {runner}"),
                        &load,
                    );
                    println!("  {}", meter.report(load.requests, load.rate()));
                }
                if paced {
                    for &rate in &paced_rates {
                        let load = bench::store_floor_at(&nats, rate, duration).await;
                        line(
                            &format!("store floor (claim, record, job in one round trip, then the queued event; no agent) at {rate:.0} req/s"),
                            &load,
                        );
                    }
                    let tool = bench::WebhookTool::start().await;
                    let closed = Duration::from_secs(closed_seconds);
                    let theirs = bench::webhook_load(&tool.url, 16, closed, false, 0).await;
                    line("baseline webhook 2.8, 16 connections, closed loop", &theirs);
                }
            });
        }
        Some("footprint") => {
            let schedules: usize = flag("--schedules")
                .map(|n| n.parse().expect("--schedules N"))
                .unwrap_or(1000);
            runtime.block_on(async {
                let nats = Nats::start();
                let fp = bench::bench_footprint(&nats, schedules, Duration::from_secs(10)).await;
                println!(
                    "footprint schedules={schedules} ready={:.0}ms idle_rss={:.1}MiB heap={:.1}MiB files={:.1}MiB idle_cpu={:.2}%",
                    fp.ready.as_secs_f64() * 1000.0,
                    bench::mib(fp.idle_rss_kib),
                    bench::mib(fp.idle_anon_kib),
                    bench::mib(fp.idle_file_kib),
                    fp.idle_cpu_percent
                );
            });
        }
        Some("etcd-drill") => {
            let size = parse_size(&flag("--size").unwrap_or_else(|| "1GiB".into()))
                .unwrap_or_else(|e| panic!("{e}"));
            runtime.block_on(async {
                let nats = Nats::start();
                let s3 = S3Server::start_s3s_fs("etcd", "bench", "bench-secret").await;
                let b = bench::bench_etcd_drill(&nats, &s3, size).await;
                bench::print_table(&bench::etcd_drill_rows(&b));
            });
        }
        Some("decrypt") => {
            // The etcd drill's floor: age and zstd by hand, in a process of its own.
            let path = |name: &str| {
                std::path::PathBuf::from(flag(name).unwrap_or_else(|| panic!("{name} PATH")))
            };
            bench::decrypt_file(&path("--identity"), &path("--in"), &path("--out"))
                .unwrap_or_else(|e| panic!("decrypt: {e}"));
        }
        Some("upgrade") => {
            let reboot: u64 =
                flag("--reboot-seconds").map_or(2, |n| n.parse().expect("--reboot-seconds N"));
            let b = runtime.block_on(bench::bench_upgrade(Duration::from_secs(reboot)));
            bench::print_table(&[bench::upgrade_row(&b)]);
        }
        Some("cluster") => {
            // Ingest on one server, then ingest and dispatch on a 3-server cluster.
            let seconds: u64 = flag("--seconds").map_or(10, |n| n.parse().expect("--seconds N"));
            let duration = Duration::from_secs(seconds);
            let rows = runtime.block_on(async {
                let nats = Nats::start();
                let (single, _) = bench::bench_ingest_alone(&nats, 16, duration).await;
                drop(nats);
                bench::run_cluster(false, 16, duration, Some(&single)).await
            });
            bench::print_table(&rows);
        }
        Some("burst") => {
            let deliveries: usize =
                flag("--deliveries").map_or(5000, |n| n.parse().expect("--deliveries N"));
            let b = runtime.block_on(async {
                let nats = Nats::start();
                bench::bench_burst(&nats, deliveries).await
            });
            bench::print_table(&bench::burst_rows(&b));
        }
        Some("secret-scan") => {
            let files: usize = flag("--files").map_or(5000, |n| n.parse().expect("--files N"));
            let runs: usize = flag("--runs").map_or(5, |n| n.parse().expect("--runs N"));
            let s = bench::bench_secret_scan(files, runs.max(1));
            bench::print_table(&[bench::secret_scan_row(&s)]);
        }
        _ => {
            eprintln!(
                "usage: infraflux-bench all [--quick] | snapshot [--size 1GiB] | footprint [--schedules 1000] | ingest [--seconds 10] [--paced [--rates 100,500]] [--closed-seconds N] [--floors] | cluster [--seconds 10] | burst [--deliveries 5000] | secret-scan [--files 5000] [--runs 5] | etcd-drill [--size 1GiB]"
            );
            std::process::exit(2);
        }
    }
}
