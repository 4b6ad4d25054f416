//! `infraflux-agent ctl`: send a ChatOps command over NATS and print the reply; with `--wait`,
//! follow the job's events until it ends. Also `ctl github-event`, which a workflow step on the
//! self-hosted runner uses to forward `$GITHUB_EVENT_PATH`.
//!
//! Exit codes: 0 ok or job succeeded, 1 job failed or cancelled, 2 command rejected, 3 no reply.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::records::{JobEvent, JobState};
use crate::store::Names;

pub const EXIT_OK: u8 = 0;
pub const EXIT_JOB_FAILED: u8 = 1;
pub const EXIT_REJECTED: u8 = 2;
pub const EXIT_NO_REPLY: u8 = 3;

#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// NATS server URL.
    #[arg(
        long,
        env = "INFRAFLUX_NATS__URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats: String,
    /// A NATS .creds file.
    #[arg(long)]
    pub creds: Option<PathBuf>,
    /// A NATS user (with --password-file).
    #[arg(long, requires = "password_file")]
    pub user: Option<String>,
    /// A file holding the password of --user.
    #[arg(long, requires = "user")]
    pub password_file: Option<PathBuf>,
    /// Subject prefix of the agents.
    #[arg(
        long,
        env = "INFRAFLUX_NATS__SUBJECT_PREFIX",
        default_value = "infraflux"
    )]
    pub prefix: String,
    /// Follow the job's events until it ends.
    #[arg(long)]
    pub wait: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for a reply (and, with --wait, for the job to end).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Who is asking (recorded in the job).
    #[arg(long, env = "USER", default_value = "ctl")]
    pub requested_by: String,
    /// The command, as in chat: `backup ns=media ttl=72h`. Or:
    /// `github-event <event> <payload-file> [delivery-id]` to forward a GitHub event.
    #[arg(required = true, trailing_var_arg = true)]
    pub words: Vec<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(args: CtlArgs) -> u8 {
    let mut options = async_nats::ConnectOptions::new()
        .name("infraflux-ctl")
        .connection_timeout(Duration::from_secs(5));
    if let Some(creds) = &args.creds {
        options = match options.credentials_file(creds).await {
            Ok(o) => o,
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", creds.display());
                return EXIT_NO_REPLY;
            }
        };
    }
    if let (Some(user), Some(file)) = (&args.user, &args.password_file) {
        match std::fs::read_to_string(file) {
            Ok(p) => options = options.user_and_password(user.clone(), p.trim_end().to_string()),
            Err(e) => {
                eprintln!("error: cannot read {}: {e}", file.display());
                return EXIT_NO_REPLY;
            }
        }
    }
    let client = match options.connect(args.nats.as_str()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: cannot connect to NATS at {}: {e}", args.nats);
            return EXIT_NO_REPLY;
        }
    };
    let names = Names::new(&args.prefix);
    let reply_timeout = args.timeout.unwrap_or(DEFAULT_REPLY_TIMEOUT);
    if args.words.first().map(String::as_str) == Some("github-event") {
        return forward_github_event(&client, &names, &args, reply_timeout).await;
    }
    let text = args.words.join(" ");
    let verb = text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let body = json!({"command": text, "requested_by": args.requested_by});
    let mut headers = async_nats::HeaderMap::new();
    // One id per invocation: a retried request does not start a second job.
    headers.insert("Nats-Msg-Id", ulid::Ulid::new().to_string().as_str());
    let request = async_nats::Request::new()
        .payload(serde_json::to_vec(&body).unwrap_or_default().into())
        .headers(headers)
        .timeout(Some(reply_timeout));
    let reply = match client.send_request(names.cmd_subject(&verb), request).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "error: no reply from any agent within {} ({e})",
                humantime::format_duration(reply_timeout)
            );
            return EXIT_NO_REPLY;
        }
    };
    let reply: Value = match serde_json::from_slice(&reply.payload) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: unreadable reply: {e}");
            return EXIT_NO_REPLY;
        }
    };
    if reply["ok"] != json!(true) {
        if args.json {
            println!("{reply}");
        } else {
            eprintln!("error: {}", reply["error"].as_str().unwrap_or("rejected"));
        }
        return EXIT_REJECTED;
    }
    print_reply(&verb, &reply, args.json);
    let job_id = reply["job_id"].as_str().map(str::to_string);
    match (args.wait, job_id) {
        (true, Some(job_id)) if verb != "job" && verb != "cancel" => {
            follow(&client, &names, &job_id, args.timeout, args.json).await
        }
        _ => EXIT_OK,
    }
}

fn print_reply(verb: &str, reply: &Value, json_out: bool) {
    if json_out {
        match verb {
            // `ctl --json job <id>` prints the record itself.
            "job" => println!("{}", reply["job"]),
            "jobs" => println!("{}", json!({"ok": true, "jobs": reply["jobs"]})),
            _ => println!("{reply}"),
        }
        return;
    }
    println!("{}", reply["message"].as_str().unwrap_or_default());
    if let Some(trace) = reply["trace_id"].as_str().filter(|_| verb != "job") {
        println!("trace: {trace}");
    }
}

/// Prints the job's events from the first, until it settles; the exit code follows its state.
async fn follow(
    client: &async_nats::Client,
    names: &Names,
    job_id: &str,
    timeout: Option<Duration>,
    json_out: bool,
) -> u8 {
    let follow = async {
        let js = jetstream::new(client.clone());
        let stream = js
            .get_stream(&names.events_stream)
            .await
            .map_err(|e| e.to_string())?;
        let ordered = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: names.event_subject(job_id),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut messages = ordered.messages().await.map_err(|e| e.to_string())?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| e.to_string())?;
            let Ok(event) = serde_json::from_slice::<JobEvent>(&message.payload) else {
                continue;
            };
            if json_out {
                println!("{}", serde_json::to_string(&event).unwrap_or_default());
            } else {
                println!(
                    "{}  {:<17}  {}",
                    event.at.format("%H:%M:%S"),
                    event.state.as_str(),
                    event.message
                );
            }
            if event.state.is_settled() {
                return Ok(event.state);
            }
        }
        Err("event stream ended".to_string())
    };
    let outcome = match timeout {
        Some(t) => tokio::time::timeout(t, follow).await.unwrap_or_else(|_| {
            Err(format!(
                "job {job_id} did not end within {}",
                humantime::format_duration(t)
            ))
        }),
        None => follow.await,
    };
    match outcome {
        Ok(JobState::Succeeded | JobState::AwaitingApproval) => EXIT_OK,
        Ok(_) => EXIT_JOB_FAILED,
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_NO_REPLY
        }
    }
}

/// `ctl github-event <event> <payload-file> [delivery-id]`
async fn forward_github_event(
    client: &async_nats::Client,
    names: &Names,
    args: &CtlArgs,
    timeout: Duration,
) -> u8 {
    let (Some(event), Some(path)) = (args.words.get(1), args.words.get(2)) else {
        eprintln!("usage: infraflux-agent ctl github-event <event> <payload-file> [delivery-id]");
        return EXIT_REJECTED;
    };
    if !crate::github::valid_event_name(event) {
        eprintln!("error: {event:?} is not a GitHub event name");
        return EXIT_REJECTED;
    }
    let payload = match std::fs::read(path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot read {path}: {e}");
            return EXIT_REJECTED;
        }
    };
    // In a workflow there is no delivery id; the run id and attempt identify this forward.
    let delivery = args.words.get(3).cloned().unwrap_or_else(|| {
        match (
            std::env::var("GITHUB_RUN_ID"),
            std::env::var("GITHUB_RUN_ATTEMPT"),
        ) {
            (Ok(id), Ok(attempt)) => format!("actions-{id}-{attempt}"),
            _ => format!("ctl-{}", ulid::Ulid::new()),
        }
    });
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("X-GitHub-Event", event.as_str());
    headers.insert("X-GitHub-Delivery", delivery.as_str());
    let request = async_nats::Request::new()
        .payload(payload.into())
        .headers(headers)
        .timeout(Some(timeout));
    let reply = match client
        .send_request(names.github_subject(event), request)
        .await
    {
        Ok(m) => m,
        Err(e) => {
            eprintln!(
                "error: no agent answered within {} ({e})",
                humantime::format_duration(timeout)
            );
            return EXIT_NO_REPLY;
        }
    };
    let reply: Value = serde_json::from_slice(&reply.payload).unwrap_or(Value::Null);
    println!("{reply}");
    if reply["ok"] == json!(true) {
        EXIT_OK
    } else {
        EXIT_REJECTED
    }
}
