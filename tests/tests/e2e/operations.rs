//! Operating the agent: one trace per run exported over OTLP, metrics that Prometheus accepts,
//! systemd's notify protocol (READY, WATCHDOG, STOPPING).

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use infraflux_handlers::JobKind;
use infraflux_tests::handlers::{Behaviour, RunLog, TestHandler};
use infraflux_tests::otlp::OtlpReceiver;
use infraflux_tests::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const GITHUB_TOKEN: &str = "ghp_traceTestToken0123456789abcdefABCDEF";
/// A hosted collector's API key, configured as `telemetry.otlp_headers.authorization`.
const OTLP_AUTH: &str = "Bearer otlp-key-5521-collector";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_run_is_one_trace_from_ingress_through_the_queue_to_the_handler_without_secrets()
{
    init();
    let nats = Nats::start();
    let receiver = OtlpReceiver::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let markers = dir.path().join("markers");
    std::fs::create_dir_all(&markers).expect("markers");
    let http_port = free_port();
    let extra = format!(
        r#"
[github]
repo = "Codertocat/Hello-World"
default_branch = "master"
token = "env:TEST_GITHUB_TOKEN"
webhook_secret = "env:TEST_WEBHOOK_SECRET"
redeliver = false

[telemetry]
otlp_endpoint = "{}"
otlp_headers = {{ authorization = "env:TEST_OTLP_AUTH" }}
"#,
        receiver.endpoint
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        agent_config(&nats.url, "tracer", &dir.path().join("state"), &extra),
    )
    .expect("config");
    let env = [
        ("IFX_TEST_MARKERS", markers.display().to_string()),
        ("IFX_TEST_SLEEP_MS", "200".to_string()),
        ("IFX_TEST_RECONCILE", "1".to_string()),
        ("TEST_GITHUB_TOKEN", GITHUB_TOKEN.to_string()),
        ("TEST_OTLP_AUTH", OTLP_AUTH.to_string()),
        ("INFRAFLUX_HTTP__LISTEN", format!("127.0.0.1:{http_port}")),
        ("OTEL_BSP_SCHEDULE_DELAY", "200".to_string()),
        // A quiet log must not quiet the trace.
        ("RUST_LOG", "warn".to_string()),
    ];
    let agent = crate::crash::spawn_agent(&config, &env, &dir.path().join("agent.log"));
    let http = format!("http://127.0.0.1:{http_port}");
    wait_for(Duration::from_secs(30), "the agent to be ready", || async {
        reqwest::get(format!("{http}/readyz"))
            .await
            .ok()
            .filter(|r| r.status() == 200)
    })
    .await;
    let client = nats.client().await;
    let (status, reply) =
        post_webhook(&http, "push", "trace-1", &fixture("github/push/push.json")).await;
    assert_eq!(status, 202, "{reply}");
    let job_id = reply["jobs"][0].as_str().expect("job").to_string();
    let done = wait_settled(&client, &job_id, Duration::from_secs(30)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let trace_id = done["trace_id"].as_str().expect("trace id").to_string();

    let spans = wait_for(
        Duration::from_secs(20),
        "the run's spans to be exported",
        || async {
            let spans: Vec<_> = receiver
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            // The job span ends last, after the record is settled.
            ["webhook", "enqueue", "job", "handler", "marker_step"]
                .iter()
                .all(|name| spans.iter().any(|s| s.name == *name))
                .then_some(spans)
        },
    )
    .await;
    drop(agent);
    let by_name: BTreeMap<&str, &infraflux_tests::otlp::ReceivedSpan> =
        spans.iter().map(|s| (s.name.as_str(), s)).collect();
    for name in ["webhook", "enqueue", "job", "handler", "marker_step"] {
        assert!(
            by_name.contains_key(name),
            "{name} missing from the trace: {:?}",
            by_name.keys()
        );
    }
    // Ingress → queue → runner → handler: one chain of parents.
    assert_eq!(
        by_name["enqueue"].parent_span_id, by_name["webhook"].span_id,
        "the queue hop continues the webhook's span"
    );
    assert_eq!(
        by_name["job"].parent_span_id, by_name["enqueue"].span_id,
        "the job, on whichever agent, continues the queue hop"
    );
    assert_eq!(by_name["handler"].parent_span_id, by_name["job"].span_id);
    assert_eq!(
        by_name["marker_step"].parent_span_id,
        by_name["handler"].span_id
    );
    assert!(spans.iter().all(|s| s.service == "infraflux-agent"));
    assert!(
        by_name["job"]
            .attributes
            .iter()
            .any(|(k, v)| k == "job_id" && v == &job_id),
        "{:?}",
        by_name["job"].attributes
    );
    // No configured secret in any attribute of any span the agent exported.
    for span in receiver.spans() {
        for (key, value) in &span.attributes {
            for secret in [WEBHOOK_SECRET, GITHUB_TOKEN, OTLP_AUTH] {
                assert!(
                    !value.contains(secret),
                    "span {} attribute {key} holds a secret",
                    span.name
                );
            }
        }
    }
    // The configured header reached the collector with every export, and only there.
    let auths = receiver.authorizations();
    assert!(
        !auths.is_empty() && auths.iter().all(|a| a == OTLP_AUTH),
        "authorization metadata: {} exports, all with the configured key: {}",
        auths.len(),
        auths.iter().all(|a| a == OTLP_AUTH)
    );
}

/// A Prometheus text sample: `name{labels} value`.
pub(crate) fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_jobs_are_valid_exposition_with_the_expected_counts() {
    init();
    let nats = Nats::start();
    let log = RunLog::default();
    let (a, b) = (log.clone(), log.clone());
    let agent = start_agent(&nats, "metrics", "[backup]\n[acceptance]\n", move |r| {
        r.register(std::sync::Arc::new(TestHandler::new(
            JobKind::BACKUP,
            Behaviour::Sleep(Duration::from_millis(50)),
            a,
        )));
        r.register(std::sync::Arc::new(TestHandler::new(
            JobKind::ACCEPTANCE,
            Behaviour::Child("exit 3".into()),
            b,
        )));
    })
    .await;
    let client = nats.client().await;
    for command in ["backup", "backup ns=media", "acceptance"] {
        let job = submit(&client, command).await;
        wait_settled(&client, &job, Duration::from_secs(20)).await;
    }
    command(&client, "frobnicate").await;
    let body = fixture("github/ping/payload.json");
    post_webhook_raw(
        &agent.http,
        Some("ping"),
        Some("m-1"),
        Some("sha256=00"),
        body,
    )
    .await;

    let text = metrics_text(&agent.http).await;
    // Prometheus' own parser and linter accept it.
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian: apt-get install prometheus)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let s = samples(&text);
    let get = |k: &str| {
        s.get(k)
            .copied()
            .unwrap_or_else(|| panic!("{k} missing from\n{text}"))
    };
    assert_eq!(
        get(r#"infraflux_jobs_total{kind="backup",outcome="succeeded"}"#),
        2.0
    );
    assert_eq!(
        get(r#"infraflux_jobs_total{kind="acceptance",outcome="failed"}"#),
        1.0
    );
    assert_eq!(
        get(r#"infraflux_job_duration_seconds_count{kind="backup"}"#),
        2.0
    );
    assert_eq!(
        get(r#"infraflux_webhook_requests_total{result="unauthorized"}"#),
        1.0
    );
    assert_eq!(
        get(r#"infraflux_commands_total{verb="backup",result="ok"}"#),
        2.0
    );
    assert_eq!(
        get(r#"infraflux_commands_total{verb="unknown",result="rejected"}"#),
        1.0
    );
    assert_eq!(get("infraflux_nats_connected"), 1.0);
    assert_eq!(get("infraflux_jobs_running"), 0.0);
    assert!(get(r#"infraflux_last_success_timestamp_seconds{kind="backup",target=""}"#) > 1.7e9);
    assert!(
        !s.contains_key(r#"infraflux_last_success_timestamp_seconds{kind="acceptance",target=""}"#),
        "a kind that never succeeded has no last success"
    );
    // Prometheus asks for OpenMetrics and gets it.
    let openmetrics = reqwest::Client::new()
        .get(format!("{}/metrics", agent.http))
        .header(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .expect("metrics");
    assert!(
        openmetrics.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("application/openmetrics-text")
    );
    assert!(
        openmetrics
            .text()
            .await
            .expect("text")
            .trim_end()
            .ends_with("# EOF")
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_agent_signals_ready_feeds_the_watchdog_and_says_it_is_stopping() {
    init();
    let nats = Nats::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        agent_config(&nats.url, "notify", &dir.path().join("state"), ""),
    )
    .expect("config");
    let env = [
        ("NOTIFY_SOCKET", socket_path.display().to_string()),
        ("WATCHDOG_USEC", "1500000".to_string()),
    ];
    let mut agent = crate::crash::spawn_agent(&config, &env, &dir.path().join("agent.log"));
    let receive = |socket: &UnixDatagram| {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let mut seen = Vec::new();
    while !seen.iter().any(|m: &String| m.contains("WATCHDOG=1")) {
        let m = tokio::task::block_in_place(|| receive(&socket));
        seen.push(m);
        assert!(seen.len() < 20, "{seen:?}");
    }
    assert!(
        seen[0].contains("READY=1"),
        "READY first, once NATS and HTTP are up: {seen:?}"
    );
    // The watchdog keeps being fed (every third of WATCHDOG_USEC).
    let more = tokio::task::block_in_place(|| receive(&socket));
    assert!(more.contains("WATCHDOG=1"), "{more}");
    kill(Pid::from_raw(agent.pid() as i32), Signal::SIGTERM).expect("SIGTERM");
    let stopping = tokio::task::block_in_place(|| {
        (0..10)
            .map(|_| receive(&socket))
            .find(|m| m.contains("STOPPING=1"))
    });
    assert!(stopping.is_some(), "STOPPING=1 after SIGTERM");
    let code = tokio::task::block_in_place(|| agent.wait());
    assert_eq!(code, Some(0), "a clean shutdown exits 0");
}
