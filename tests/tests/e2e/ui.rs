//! The status page (`[ui]`) in a real browser: headless chromium through chromedriver.
//!
//! Jobs that run go through the agent (a webhook push, a reconcile handler that reports steps
//! when the test lets it); history for the charts is written with the agent's own `Records`,
//! as finished jobs would have left it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use fantoccini::Locator;
use infraflux_agent::records::{JobRecord, Records};
use infraflux_agent::store::Names;
use infraflux_handlers::{
    Handler, HandlerError, JobContext, JobEnvelope, JobKind, Outcome, Registry,
};
use infraflux_tests::browser::{Browser, screenshots_dir};
use infraflux_tests::*;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

/// A reconcile handler that reports each of `steps` once the test adds a permit to `gate`,
/// then succeeds at one more permit.
struct Stepper {
    gate: Arc<Semaphore>,
    steps: Vec<String>,
}

#[async_trait]
impl Handler for Stepper {
    fn kind(&self) -> JobKind {
        JobKind::RECONCILE
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(120)
    }

    async fn run(&self, ctx: &JobContext, _job: &JobEnvelope) -> Result<Outcome, HandlerError> {
        for step in self.steps.iter().map(Some).chain([None]) {
            tokio::select! {
                permit = self.gate.acquire() => {
                    if let Ok(permit) = permit {
                        permit.forget();
                    }
                }
                () = ctx.cancel.cancelled() => return Err(HandlerError::Cancelled),
            }
            match step {
                Some(step) => ctx.progress.report(step).await,
                None => break,
            }
        }
        Ok(Outcome::Succeeded {
            message: "applied 2 changes".into(),
            result: json!({"plan": {"add": 1, "change": 1, "destroy": 0}}),
        })
    }
}

const STEPS: [&str; 2] = ["planning", "applying 3 of 7 <b>not bold</b>"];
const TRACE_URL: &str = "https://grafana.lan/explore?traceId={trace_id}";

struct Lab {
    nats: Nats,
    agent: TestAgent,
    client: async_nats::Client,
    gate: Arc<Semaphore>,
}

async fn lab(id: &str, env: &[(&str, &str)]) -> Lab {
    init();
    let nats = Nats::start();
    let gate = Arc::new(Semaphore::new(0));
    let handler = Stepper {
        gate: gate.clone(),
        steps: STEPS.iter().map(|s| s.to_string()).collect(),
    };
    let extra = format!("[telemetry]\ntrace_url = \"{TRACE_URL}\"\n");
    let agent = start_agent_with_env(&nats, id, &extra, env, |r: &mut Registry| {
        r.register(Arc::new(handler))
    })
    .await;
    assert!(!agent.ui.is_empty(), "the status page listens");
    let client = nats.client().await;
    Lab {
        nats,
        agent,
        client,
        gate,
    }
}

/// A signed push whose head commit says `message`; returns the reconcile job's id.
async fn push(lab: &Lab, delivery: &str, sha_digit: char, message: &str) -> String {
    let mut payload: Value =
        serde_json::from_slice(&fixture("github/push/push.json")).expect("fixture");
    payload["after"] = json!(sha_digit.to_string().repeat(40));
    payload["head_commit"]["message"] = json!(message);
    payload["head_commit"]["author"] = json!({"name": "Ada Lovelace", "username": "ada"});
    let body = serde_json::to_vec(&payload).expect("json");
    let (status, reply) = post_webhook(&lab.agent.http, "push", delivery, &body).await;
    assert_eq!(status, 202, "{reply}");
    reply["jobs"][0].as_str().expect("job id").to_string()
}

/// The agents' job records, as the agent reads and writes them.
pub(crate) async fn records(client: &async_nats::Client) -> Records {
    let js = async_nats::jetstream::new(client.clone());
    let names = Names::new("infraflux");
    let kv = js
        .get_key_value(&names.bucket_records)
        .await
        .expect("records");
    let state = js.get_key_value(&names.bucket_state).await.expect("state");
    Records::new(kv, js, names, state)
}

/// A finished job as its handler would have left it, with its last result noted.
async fn seed(
    records: &Records,
    kind: JobKind,
    state: &str,
    finished: DateTime<Utc>,
    message: &str,
    result: Value,
) -> String {
    // Lower case, as the agent's own job ids.
    let id = ulid::Ulid::from_datetime(finished.into())
        .to_string()
        .to_lowercase();
    let started = finished - chrono::Duration::minutes(5);
    let record: JobRecord = serde_json::from_value(json!({
        "job_id": id,
        "kind": kind.as_str(),
        "state": state,
        "source": "schedule",
        "requested_by": "schedule:nightly",
        "created_at": started,
        "updated_at": finished,
        "started_at": started,
        "finished_at": finished,
        "attempts": 1,
        "message": message,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "params": {},
        "idempotency_key": format!("seed.{id}"),
        "agent": "ui-seed",
        "result": result,
    }))
    .expect("a record");
    assert!(records.create(&record).await.expect("create"));
    records.record_last_result(&record, Some(300.0)).await;
    id
}

/// Two weeks of nightly drills, backups and snapshots, and an acceptance run with a failing
/// check: what the overview, drills and backups pages draw from. Returns the newest drill's id.
async fn seed_history(client: &async_nats::Client) -> String {
    let records = records(client).await;
    let now = Utc::now();
    let mut newest_drill = String::new();
    for day in (1..=14).rev() {
        let at = now - chrono::Duration::days(day) + chrono::Duration::minutes(7);
        let wobble = ((day * 37) % 11) as f64;
        let rto = 200.0 + wobble * 9.0;
        let drill_ok = day != 9;
        newest_drill = seed(
            &records,
            JobKind::RESTORE_DRILL,
            if drill_ok { "succeeded" } else { "failed" },
            at,
            if drill_ok { "media restored and checked" } else { "media: http check failed" },
            json!({"targets": [
                {"target": "media", "ok": drill_ok, "rto_seconds": rto, "data_age_seconds": 3600.0 + wobble * 120.0,
                 "checks": [{"name": "http", "ok": drill_ok, "message": if drill_ok { "200 from /" } else { "503 from /" }}]},
                {"target": "etcd", "ok": true, "rto_seconds": 90.0 + wobble * 4.0, "data_age_seconds": 1800.0 + wobble * 60.0,
                 "checks": [{"name": "members", "ok": true, "message": "3 members healthy"}]}
            ], "passed": 2, "failed": 0}),
        )
        .await;
        seed(
            &records,
            JobKind::BACKUP,
            "succeeded",
            at - chrono::Duration::hours(2),
            "backed up media",
            json!({"targets": [{"target": "media", "ok": true, "size_bytes": (1_200_000_000.0 + (14 - day) as f64 * 35_000_000.0 + wobble * 4_000_000.0) as u64, "items": 1200}]}),
        )
        .await;
        seed(
            &records,
            JobKind::ETCD_SNAPSHOT,
            "succeeded",
            at - chrono::Duration::hours(3),
            "snapshot stored",
            json!({"size_bytes": 48_000_000 + (14 - day) as u64 * 400_000, "key": format!("etcd/day-{day}.db.zst.age")}),
        )
        .await;
    }
    seed(
        &records,
        JobKind::ACCEPTANCE,
        "failed",
        now - chrono::Duration::minutes(30),
        "1 of 3 checks failed",
        json!({"checks": [
            {"name": "nodes ready", "ok": true, "message": "5 of 5 nodes Ready"},
            {"name": "argocd apps", "ok": false, "message": "home-assistant is Degraded", "fix": "argocd app get home-assistant"},
            {"name": "certificates", "ok": true, "message": "all valid for 20+ days"}
        ], "passed": 2, "failed": 1, "skipped": 0}),
    )
    .await;
    newest_drill
}

async fn wait_browser<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for(Duration::from_secs(15), what, || {
        let done = check();
        async move { done.await.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_lists_agents_and_last_results_and_a_click_opens_the_job() {
    let lab = lab("ui-overview", &[]).await;
    let job_id = push(&lab, "ui-1", 'a', "Bump grafana to 11.3\n\nDetails").await;
    wait_state(&lab.client, &job_id, "running").await;
    lab.gate.add_permits(STEPS.len() + 1);
    let done = wait_settled(&lab.client, &job_id, Duration::from_secs(20)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    let _ = seed_history(&lab.client).await;
    // The status cache follows the state bucket: wait until it has the reconcile result.
    status_showing(&lab.client, "reconcile: succeeded").await;

    let browser = Browser::start(1280, 900).await;
    let b = &browser.client;
    b.goto(&format!("{}/", lab.agent.ui)).await.expect("open");
    let agents = browser.text("#agents").await;
    assert!(agents.contains("ui-overview"), "{agents}");
    assert_eq!(browser.text("#agents-alive").await, "1");
    let last = browser.text("#last-results").await;
    for expected in [
        "reconcile",
        "restore-drill",
        "backup",
        "etcd-snapshot",
        "succeeded",
    ] {
        assert!(last.contains(expected), "{expected} missing from {last}");
    }
    let targets = browser.text("#targets").await;
    assert!(
        targets.contains("media") && targets.contains("RTO"),
        "{targets}"
    );
    let failing = browser.text("#failing-checks").await;
    assert!(failing.contains("home-assistant is Degraded"), "{failing}");

    b.find(Locator::Css(&format!(
        "#last-results a[href='/jobs/{job_id}']"
    )))
    .await
    .expect("the job's link")
    .click()
    .await
    .expect("click");
    wait_browser("the job's page", || async {
        b.current_url()
            .await
            .is_ok_and(|u| u.path() == format!("/jobs/{job_id}"))
    })
    .await;
    assert!(browser.text("h1").await.contains(&job_id));
    assert_eq!(browser.text("#job-state").await, "succeeded");
    assert_eq!(browser.text("#commit-title").await, "Bump grafana to 11.3");
    let record = browser.text("#record").await;
    assert!(record.contains("by ada"), "{record}");
    let trace = b
        .find(Locator::Css("#trace-link"))
        .await
        .expect("trace link")
        .attr("href")
        .await
        .expect("href")
        .unwrap_or_default();
    let trace_id = done["trace_id"].as_str().expect("trace id");
    assert_eq!(trace, TRACE_URL.replace("{trace_id}", trace_id));
    let timeline = browser.text("#timeline").await;
    for step in STEPS {
        assert!(timeline.contains(step), "{step} missing from {timeline}");
    }

    // The job list filters by kind and state.
    b.goto(&format!(
        "{}/jobs?kind=restore-drill&state=failed",
        lab.agent.ui
    ))
    .await
    .expect("jobs");
    let rows = b
        .find_all(Locator::Css("#jobs tbody tr"))
        .await
        .expect("rows");
    assert_eq!(rows.len(), 1, "one failed drill was seeded");
    browser.close().await;
    lab.agent.stop().await;
    drop(lab.nats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_jobs_timeline_grows_as_its_events_arrive_without_a_reload() {
    let lab = lab("ui-live", &[]).await;
    let job_id = push(&lab, "ui-2", 'b', "Rotate certificates").await;
    wait_state(&lab.client, &job_id, "running").await;
    lab.gate.add_permits(1);
    wait_for(Duration::from_secs(10), "the first step", || async {
        let r = record(&lab.client, &job_id).await;
        (r["message"] == STEPS[0]).then_some(())
    })
    .await;

    let browser = Browser::start(1280, 900).await;
    let b = &browser.client;
    b.goto(&format!("{}/jobs/{job_id}", lab.agent.ui))
        .await
        .expect("open");
    assert_eq!(browser.text("#live-marker").await, "live");
    let count = || async {
        browser
            .eval("return document.querySelectorAll('#timeline li').length")
            .await
            .as_u64()
            .unwrap_or(0)
    };
    let before = count().await;
    assert!(before >= 2, "queued/running and the first step are shown");
    // Survives only if the page is not reloaded.
    browser
        .eval("window.stillTheSamePage = 42; return null")
        .await;

    lab.gate.add_permits(1);
    wait_browser("the second step on the timeline", || async {
        browser.text("#timeline").await.contains(STEPS[1])
    })
    .await;
    assert!(count().await > before);
    // The message is text: its markup is shown, not applied.
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('#timeline b').length")
            .await,
        json!(0)
    );
    lab.gate.add_permits(1);
    wait_browser("the job's end on the timeline", || async {
        browser.text("#job-state").await == "succeeded"
            && browser.text("#live-marker").await == "ended"
    })
    .await;
    assert!(
        browser
            .text("#timeline")
            .await
            .contains("applied 2 changes")
    );
    assert_eq!(
        browser.eval("return window.stillTheSamePage").await,
        json!(42),
        "the page was not reloaded"
    );
    browser.close().await;

    // A timeline that connects once the job has ended, its end already shown (the page read
    // the record just before the job ended): it is told `end`, not left waiting.
    let http = reqwest::Client::new();
    let ended = http
        .get(format!(
            "{}/jobs/{job_id}/events?after=999999999",
            lab.agent.ui
        ))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("events");
    assert_eq!(ended.status().as_u16(), 200);
    let body = ended.text().await.expect("the stream ends on its own");
    assert!(body.contains("event: end"), "{body}");
    // An unknown job holds no stream open.
    let unknown = http
        .get(format!(
            "{}/jobs/01JZZZZZZZZZZZZZZZZZZZZZZZ/events",
            lab.agent.ui
        ))
        .send()
        .await
        .expect("events");
    assert_eq!(unknown.status().as_u16(), 404);
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_message_with_markup_shows_as_text_and_runs_nothing() {
    let lab = lab("ui-xss", &[]).await;
    let evil = "<script>document.title='pwned';window.pwned=1</script><img src=x onerror=\"document.title='pwned';window.pwned=2\">";
    let job_id = push(&lab, "ui-3", 'c', evil).await;
    wait_state(&lab.client, &job_id, "running").await;

    let response = reqwest::get(format!("{}/jobs/{job_id}", lab.agent.ui))
        .await
        .expect("page");
    let csp = response
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    let html = response.text().await.expect("body");
    assert!(!html.contains("<script>document"), "escaped on the server");
    assert!(!html.contains("<img src=x"), "escaped on the server");

    let browser = Browser::start(1280, 900).await;
    let b = &browser.client;
    b.goto(&format!("{}/jobs/{job_id}", lab.agent.ui))
        .await
        .expect("open");
    assert_eq!(browser.text("#commit-title").await, evil, "shown as text");
    // Give an image's onerror time to fire, were there an image.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let title = browser.eval("return document.title").await;
    assert!(
        !title.as_str().unwrap_or_default().contains("pwned"),
        "{title}"
    );
    assert_eq!(
        browser.eval("return window.pwned === undefined").await,
        json!(true)
    );
    assert_eq!(
        browser
            .eval("return document.querySelectorAll('#record img, #record script').length")
            .await,
        json!(0)
    );
    lab.gate.add_permits(STEPS.len() + 1);
    wait_settled(&lab.client, &job_id, Duration::from_secs(20)).await;
    browser.close().await;
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_the_token_is_refused_when_one_is_configured() {
    const TOKEN: &str = "ui-token-0123456789abcdef";
    let lab = lab(
        "ui-auth",
        &[
            ("INFRAFLUX_UI__AUTH_TOKEN", "env:TEST_UI_TOKEN"),
            ("TEST_UI_TOKEN", TOKEN),
        ],
    )
    .await;
    let http = reqwest::Client::new();
    let status = |url: String, bearer: Option<&'static str>| {
        let mut request = http.get(url);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.expect("request").status().as_u16() }
    };
    let ui = lab.agent.ui.clone();
    assert_eq!(status(format!("{ui}/"), None).await, 401);
    assert_eq!(status(format!("{ui}/jobs"), None).await, 401);
    assert_eq!(status(format!("{ui}/static/ui.js"), None).await, 401);
    assert_eq!(status(format!("{ui}/jobs/01JX/events"), None).await, 401);
    // The cookie left by `?token=`: script cannot read it, and a link from another site
    // (a chat, Grafana) still carries it.
    let redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(format!("{ui}/jobs?token={TOKEN}"))
        .send()
        .await
        .expect("request");
    assert_eq!(redirect.status().as_u16(), 303);
    let cookie = redirect
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    assert!(!cookie.contains(TOKEN), "{cookie}");
    assert_eq!(status(format!("{ui}/"), Some("wrong")).await, 401);
    assert_eq!(status(format!("{ui}/?token=wrong"), None).await, 401);
    assert_eq!(status(format!("{ui}/"), Some(TOKEN)).await, 200);

    let browser = Browser::start(1280, 900).await;
    let b = &browser.client;
    b.goto(&format!("{ui}/jobs")).await.expect("open");
    assert_eq!(browser.text("h1").await, "Token required");
    b.goto(&format!("{ui}/jobs?token={TOKEN}&state=failed"))
        .await
        .expect("open with token");
    let url = b.current_url().await.expect("url");
    assert_eq!(url.path(), "/jobs");
    assert_eq!(
        url.query(),
        Some("state=failed"),
        "the token left the address"
    );
    assert_eq!(browser.text("h1").await, "Jobs");
    // The cookie carries on, and script cannot read it.
    b.goto(&format!("{ui}/")).await.expect("overview");
    assert!(browser.text("#agents").await.contains("ui-auth"));
    assert_eq!(browser.eval("return document.cookie").await, json!(""));
    let source = b.source().await.expect("source");
    assert!(!source.contains(TOKEN), "the token is on no page");
    browser.close().await;
    lab.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_work_at_a_phones_width() {
    let lab = lab("ui-phone", &[]).await;
    let job_id = push(&lab, "ui-4", 'd', "Upgrade cilium to 1.16.3").await;
    wait_state(&lab.client, &job_id, "running").await;
    lab.gate.add_permits(STEPS.len() + 1);
    wait_settled(&lab.client, &job_id, Duration::from_secs(20)).await;
    let drill = seed_history(&lab.client).await;
    status_showing(&lab.client, "restore-drill").await;

    let phone = Browser::start(390, 844).await;
    let b = &phone.client;
    let job_path = format!("/jobs/{job_id}");
    for (path, name) in [
        ("/", "overview-390px.png"),
        ("/drills", "drills-390px.png"),
        (job_path.as_str(), "job-390px.png"),
    ] {
        b.goto(&format!("{}{path}", lab.agent.ui))
            .await
            .expect("open");
        phone.text("main h1").await;
        let width = phone.eval("return window.innerWidth").await;
        assert_eq!(width, json!(390), "the window is a phone's width");
        // Wide tables scroll inside their box; the page itself does not scroll sideways.
        let page_width = phone
            .eval("return document.documentElement.scrollWidth")
            .await;
        assert!(
            page_width.as_u64().unwrap_or(u64::MAX) <= 390,
            "{path} is {page_width} px wide at 390 px"
        );
        phone.screenshot(name).await;
    }
    let charts = phone
        .eval("return document.querySelectorAll('svg.chart circle').length")
        .await;
    assert!(
        charts.as_u64().unwrap_or(0) == 0,
        "the job page has no chart"
    );
    b.goto(&format!("{}/drills", lab.agent.ui))
        .await
        .expect("drills");
    let points = phone
        .eval("return document.querySelectorAll('svg.chart circle').length")
        .await;
    // media: 13 passing drills of 14 for RTO and data age; etcd: 14 each.
    assert_eq!(points, json!(13 * 2 + 14 * 2), "{points}");
    phone.close().await;

    // Desktop pictures for docs/ui.md.
    let desktop = Browser::start(1280, 1000).await;
    let drill_path = format!("/jobs/{drill}");
    for (path, name) in [
        ("/", "overview.png"),
        ("/drills", "drills.png"),
        ("/backups", "backups.png"),
        (drill_path.as_str(), "drill-job.png"),
    ] {
        desktop
            .client
            .goto(&format!("{}{path}", lab.agent.ui))
            .await
            .expect("open");
        desktop.text("main h1").await;
        desktop.screenshot(name).await;
    }
    desktop.close().await;
    eprintln!("screenshots in {}", screenshots_dir().display());
    lab.agent.stop().await;
}
