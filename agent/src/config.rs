//! The agent's configuration: one TOML file, every key overridable from the environment as
//! `INFRAFLUX_<SECTION>__<KEY>`.
//!
//! Loading never stops at the first problem: unknown keys, type errors (every one in a section,
//! the same ones on every load of the same text), semantic errors (cron, time zones, commands, addresses) are all collected, each with the key
//! it concerns, so `check-config` can report them at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use infraflux_handlers::command::{self, Request};
use infraflux_handlers::secret::{SecretRef, SecretRefs};
use infraflux_handlers::settings::HumanDuration;
use infraflux_handlers::{HandlerConfigs, clients, reconcile, restore_drill};
use infraflux_schedules::CronSchedule;
use serde::Deserialize;

pub const DEFAULT_PATH: &str = "/etc/infraflux/agent.toml";
pub const ENV_PREFIX: &str = "INFRAFLUX";
/// GitHub lets a delivery be redelivered by hand for three days; our dedup must outlive that.
pub const MIN_DEDUP_WINDOW: Duration = Duration::from_secs(72 * 3600);

pub use infraflux_handlers::sections::{Problem, Problems};

#[derive(Debug, Clone, Deserialize)]
pub struct AgentSection {
    /// Unique per agent; defaults to the host name.
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// How long running jobs may take to finish after SIGTERM; with `kill_grace` and 5 s more,
    /// keep it under systemd's `TimeoutStopSec` (120 s in the shipped unit).
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
    /// A job whose agent stops acknowledging it is redelivered after this long.
    #[serde(default = "default_ack_wait")]
    pub ack_wait: HumanDuration,
    /// A job still `queued` this long after it was created is published again (its queue
    /// message may never have been stored); also how often agents look.
    #[serde(default = "default_requeue_after")]
    pub requeue_after: HumanDuration,
    /// A lock or job lease expires this long after its holder's last renewal.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: HumanDuration,
    /// A job interrupted this many times (its agent died each time) fails instead of looping.
    #[serde(default = "default_max_deliveries")]
    pub max_deliveries: u32,
    /// SIGINT, then this long, then SIGKILL, for a cancelled child process.
    #[serde(default = "default_kill_grace")]
    pub kill_grace: HumanDuration,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            id: None,
            state_dir: default_state_dir(),
            concurrency: default_concurrency(),
            shutdown_timeout: default_shutdown_timeout(),
            ack_wait: default_ack_wait(),
            requeue_after: default_requeue_after(),
            lease_ttl: default_lease_ttl(),
            max_deliveries: default_max_deliveries(),
            kill_grace: default_kill_grace(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct NatsSection {
    /// One URL, or several separated by commas (a cluster).
    #[serde(default = "default_nats_url")]
    pub url: String,
    /// A `.creds` file's contents (JWT and nkey seed), by reference.
    #[serde(default)]
    pub creds: Option<SecretRef>,
    /// An nkey seed, by reference.
    #[serde(default)]
    pub nkey: Option<SecretRef>,
    #[serde(default)]
    pub token: Option<SecretRef>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password: Option<SecretRef>,
    /// A CA bundle to trust for the server's certificate (a path).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate and key for mutual TLS (paths).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub tls_required: bool,
    #[serde(default = "default_prefix")]
    pub subject_prefix: String,
    /// Stream and bucket replicas: 1 for one server, 3 for a three-node cluster.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// How long job events (the audit trail) are kept.
    #[serde(default = "default_events_max_age")]
    pub events_max_age: HumanDuration,
    /// How long job records are kept.
    #[serde(default = "default_records_max_age")]
    pub records_max_age: HumanDuration,
    /// How long a delivery id, commit or schedule fire is remembered (at least 72h).
    #[serde(default = "default_dedup_window")]
    pub dedup_window: HumanDuration,
}

impl Default for NatsSection {
    fn default() -> Self {
        Self {
            url: default_nats_url(),
            creds: None,
            nkey: None,
            token: None,
            user: None,
            password: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            subject_prefix: default_prefix(),
            replicas: default_replicas(),
            events_max_age: default_events_max_age(),
            records_max_age: default_records_max_age(),
            dedup_window: default_dedup_window(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpSection {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Webhook requests handled at once; one more is answered 503 at once.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// A request's head, and a webhook's body, must each arrive within this; it is also how
    /// long an idle kept-alive connection stays open.
    #[serde(default = "default_read_timeout")]
    pub read_timeout: HumanDuration,
    /// Connections open at once; more wait in the kernel's accept queue until one closes.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_in_flight: default_max_in_flight(),
            read_timeout: default_read_timeout(),
            max_connections: default_max_connections(),
        }
    }
}

/// The read-only status page (`[ui]`): a listener of its own, so the webhook port that GitHub
/// reaches never serves it.
#[derive(Debug, Clone, Deserialize)]
pub struct UiSection {
    /// `host:port`; empty turns the page off.
    #[serde(default = "default_ui_listen")]
    pub listen: String,
    /// When set, every request must carry it (`Authorization: Bearer`, or `?token=` once,
    /// which leaves a cookie).
    #[serde(default)]
    pub auth_token: Option<SecretRef>,
}

impl Default for UiSection {
    fn default() -> Self {
        Self {
            listen: default_ui_listen(),
            auth_token: None,
        }
    }
}

impl UiSection {
    pub fn enabled(&self) -> bool {
        !self.listen.trim().is_empty()
    }
}

/// The key `[ui] auth_token` is resolved under among the secrets.
pub const UI_AUTH_TOKEN_KEY: &str = "ui.auth_token";

/// Where `[telemetry] trace_url` puts a job's trace id.
pub const TRACE_ID_PLACEHOLDER: &str = "{trace_id}";

/// Far above any real need, and within what a semaphore can count.
pub const MAX_HTTP_IN_FLIGHT: usize = 10_000;
/// Each connection holds a file descriptor; this stays well inside a service's usual limit.
pub const MAX_HTTP_CONNECTIONS: usize = 10_000;

#[derive(Debug, Clone, Deserialize)]
pub struct GithubSection {
    /// `owner/name`
    pub repo: String,
    #[serde(default = "default_branch")]
    pub default_branch: String,
    #[serde(default = "default_api_url")]
    pub api_url: String,
    #[serde(default)]
    pub token: Option<SecretRef>,
    /// One secret or a list (during rotation every listed secret is accepted).
    pub webhook_secret: SecretRefs,
    /// The id of the repository webhook whose failed deliveries are redelivered; absent: the
    /// hook whose URL ends in `/webhooks/github`.
    #[serde(default)]
    pub webhook_id: Option<u64>,
    /// At start and hourly, redeliver failed webhook deliveries of the last three days.
    #[serde(default = "default_true")]
    pub redeliver: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OtlpProtocol {
    #[default]
    Grpc,
    HttpProtobuf,
}

#[derive(Debug, Clone, Deserialize, Default)]
pub struct TelemetrySection {
    /// Absent: no trace export (trace ids are still made and shown).
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Absent: `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, `http/protobuf`), else gRPC.
    #[serde(default)]
    pub otlp_protocol: Option<OtlpProtocol>,
    /// Headers for a hosted collector (an API key): secret references, resolved at start and
    /// sent as headers or gRPC metadata; added to `OTEL_EXPORTER_OTLP_HEADERS`, winning on a
    /// clash.
    #[serde(default)]
    pub otlp_headers: BTreeMap<String, SecretRef>,
    #[serde(default)]
    pub log_format: Option<LogFormat>,
    /// A `tracing` filter such as `info,infraflux_agent=debug`; `RUST_LOG` wins.
    #[serde(default)]
    pub log_filter: Option<String>,
    /// A link to a job's trace, `{trace_id}` replaced: the status page shows it.
    #[serde(default)]
    pub trace_url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ScheduleSection {
    pub name: String,
    /// Six fields, seconds first: `"0 0 3 * * *"`.
    pub cron: String,
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Each fire is delayed by up to this much (the same delay on every agent).
    #[serde(default)]
    pub jitter: Option<HumanDuration>,
    /// A fire missed while no agent ran still runs at start if it is at most this late.
    /// Default: one period of the schedule.
    #[serde(default)]
    pub catch_up: Option<HumanDuration>,
    /// The same words a ChatOps user would send.
    pub command: String,
}

/// The whole configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub agent: AgentSection,
    pub nats: NatsSection,
    pub http: HttpSection,
    pub ui: UiSection,
    pub github: Option<GithubSection>,
    pub telemetry: TelemetrySection,
    pub schedules: Vec<ScheduleSection>,
    pub handlers: HandlerConfigs,
}

/// A config that loaded, and what `check-config` should warn about.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Problems,
    /// The sections the file and the environment have, including those that failed to read.
    pub sections: BTreeSet<String>,
}

/// The agent's own sections; the handlers' (clients and kinds) come from their descriptors.
const AGENT_SECTIONS: &[&str] = &[
    "agent",
    "nats",
    "http",
    "ui",
    "github",
    "telemetry",
    "schedules",
];

/// Every section name the config accepts.
fn section_names() -> Vec<&'static str> {
    let mut names = AGENT_SECTIONS.to_vec();
    names.extend(infraflux_handlers::config_sections().iter().map(|s| s.name));
    names
}

impl Config {
    /// Loads `path` with environment overrides and validates everything. The environment is
    /// passed in so that tests and `check-config` see exactly what the daemon would.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Loaded, Problems> {
        let (loaded, problems) = Self::load_all(path, env);
        if problems.is_empty() {
            Ok(loaded)
        } else {
            Err(problems)
        }
    }

    /// Like [`Config::load`], but also returns what could be read when there are problems
    /// (sections that failed are left at their defaults), so that `check-config` can go on
    /// checking the rest, such as secret references.
    pub fn load_all(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> (Loaded, Problems) {
        let file = config::File::from(path)
            .format(config::FileFormat::Toml)
            .required(true);
        Self::load_source(file, &path.display().to_string(), env)
    }

    /// Like [`Config::load`], from TOML text; a problem with the text as a whole is reported
    /// under the key `origin` (where a file's would name its path).
    pub fn load_str(
        toml: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Loaded, Problems> {
        let (loaded, problems) = Self::load_all_str(toml, origin, env);
        if problems.is_empty() {
            Ok(loaded)
        } else {
            Err(problems)
        }
    }

    /// Like [`Config::load_all`], from TOML text.
    pub fn load_all_str(
        toml: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> (Loaded, Problems) {
        let text = config::File::from_str(toml, config::FileFormat::Toml);
        Self::load_source(text, origin, env)
    }

    /// What [`Config::load_all`] and [`Config::load_all_str`] share: everything but where the
    /// TOML comes from, so a file's parse errors keep naming it as the `config` crate does.
    fn load_source(
        source: impl config::Source + Send + Sync + 'static,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> (Loaded, Problems) {
        let mut problems = Problems::default();
        let unread = |problems: Problems| {
            (
                Loaded {
                    config: Config::default(),
                    warnings: Problems::default(),
                    sections: BTreeSet::new(),
                },
                problems,
            )
        };
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| override_key(k).is_some())
            .collect();
        let mut overrides: Vec<(String, String)> = env
            .keys()
            .filter_map(|name| Some((override_key(name)?, name.clone())))
            .collect();
        // `env` is a hash map: sorted, a problem names its variables in the same order on
        // every load (found by the config fuzz target).
        overrides.sort();
        let built = config::Config::builder()
            .add_source(source)
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("_")
                    .separator("__")
                    .source(Some(env)),
            )
            .build();
        let root = match built.and_then(|c| c.try_deserialize::<config::Value>()) {
            Ok(v) => v,
            Err(e) => {
                problems.push(origin, e.to_string());
                return unread(problems);
            }
        };
        let table = match root.into_table() {
            Ok(t) => t,
            Err(e) => {
                problems.push(origin, e.to_string());
                return unread(problems);
            }
        };
        let mut config = Config::default();
        let mut present: BTreeSet<String> = BTreeSet::new();
        let handler_sections = infraflux_handlers::config_sections();
        for (name, value) in table {
            let handler_section = handler_sections.iter().find(|s| s.name == name);
            if !AGENT_SECTIONS.contains(&name.as_str()) && handler_section.is_none() {
                problems.push(
                    name.clone(),
                    format!(
                        "unknown section; expected one of {}",
                        section_names().join(", ")
                    ),
                );
                continue;
            }
            present.insert(name.clone());
            if let Some(handler_section) = handler_section {
                if let Some(loaded) = (handler_section.load)(&name, value, &mut problems) {
                    config.handlers.insert_loaded(handler_section.name, loaded);
                }
                continue;
            }
            match name.as_str() {
                "agent" => set(&mut config.agent, section(&name, value, &mut problems)),
                "nats" => set(&mut config.nats, section(&name, value, &mut problems)),
                "http" => set(&mut config.http, section(&name, value, &mut problems)),
                "ui" => set(&mut config.ui, section(&name, value, &mut problems)),
                "github" => config.github = section(&name, value, &mut problems),
                "telemetry" => set(&mut config.telemetry, section(&name, value, &mut problems)),
                "schedules" => {
                    config.schedules = section::<Vec<ScheduleSection>>(&name, value, &mut problems)
                        .unwrap_or_default()
                }
                _ => {}
            }
        }
        let warnings = config.validate(&present, &mut problems);
        for problem in &mut problems.0 {
            // A key the file does not have is hard to find: say where it came from.
            let from: Vec<&str> = overrides
                .iter()
                .filter(|(key, _)| {
                    key == &problem.key || key.starts_with(&format!("{}.", problem.key))
                })
                .map(|(_, name)| name.as_str())
                .collect();
            if !from.is_empty() {
                problem.message = format!(
                    "{} (set by environment variable {})",
                    problem.message,
                    from.join(", ")
                );
            }
        }
        problems.0.sort();
        problems.0.dedup();
        (
            Loaded {
                config,
                warnings,
                sections: present,
            },
            problems,
        )
    }

    /// Semantic checks; returns warnings, pushes errors.
    fn validate(&self, present: &BTreeSet<String>, problems: &mut Problems) -> Problems {
        let mut warnings = Problems::default();
        if let Err(e) = validate_agent_id(&self.agent_id()) {
            problems.push("agent.id", e);
        }
        if self.agent.concurrency == 0 {
            problems.push("agent.concurrency", "must be at least 1");
        }
        if self.agent.ack_wait.get() < Duration::from_secs(1) {
            problems.push("agent.ack_wait", "must be at least 1s");
        }
        if self.agent.requeue_after.get() < Duration::from_secs(1) {
            problems.push("agent.requeue_after", "must be at least 1s");
        }
        if self.agent.lease_ttl.get() < Duration::from_secs(1) {
            problems.push("agent.lease_ttl", "must be at least 1s");
        }
        if self.agent.max_deliveries == 0 {
            problems.push("agent.max_deliveries", "must be at least 1");
        }
        if let Err(e) = validate_prefix(&self.nats.subject_prefix) {
            problems.push("nats.subject_prefix", e);
        }
        if !(1..=5).contains(&self.nats.replicas) {
            problems.push("nats.replicas", "must be from 1 to 5");
        }
        if self.nats.dedup_window.get() < MIN_DEDUP_WINDOW {
            problems.push(
                "nats.dedup_window",
                format!(
                    "is {}; it must be at least 72h, GitHub's redelivery window",
                    self.nats.dedup_window
                ),
            );
        }
        for url in self.nats.url.split(',') {
            let url = url.trim();
            let ok = ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|s| url.starts_with(s))
                || (!url.contains("://") && !url.is_empty());
            if !ok {
                problems.push(
                    "nats.url",
                    format!("{url:?} is not a NATS URL (nats://host:4222)"),
                );
            }
        }
        if self.nats.tls_cert.is_some() != self.nats.tls_key.is_some() {
            problems.push("nats.tls_cert", "tls_cert and tls_key go together");
        }
        if self.nats.password.is_some() && self.nats.user.is_none() {
            problems.push("nats.user", "a password needs a user");
        }
        if let Err(e) = self.http.listen.parse::<SocketAddr>() {
            problems.push(
                "http.listen",
                format!("{:?} is not host:port ({e})", self.http.listen),
            );
        }
        if !(1..=MAX_HTTP_IN_FLIGHT).contains(&self.http.max_in_flight) {
            problems.push(
                "http.max_in_flight",
                format!("must be from 1 to {MAX_HTTP_IN_FLIGHT}"),
            );
        }
        if !(1..=MAX_HTTP_CONNECTIONS).contains(&self.http.max_connections) {
            problems.push(
                "http.max_connections",
                format!("must be from 1 to {MAX_HTTP_CONNECTIONS}"),
            );
        }
        if self.http.read_timeout.get() < Duration::from_secs(1) {
            problems.push("http.read_timeout", "must be at least 1s");
        }
        if let Some(gh) = &self.github {
            let parts: Vec<_> = gh.repo.split('/').collect();
            if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
                problems.push("github.repo", format!("{:?} is not owner/name", gh.repo));
            }
            if gh.webhook_secret.0.is_empty() {
                problems.push("github.webhook_secret", "at least one secret is needed");
            }
            if !gh.api_url.starts_with("http://") && !gh.api_url.starts_with("https://") {
                problems.push(
                    "github.api_url",
                    format!("{:?} is not an http(s) URL", gh.api_url),
                );
            }
        }
        if let Some(rc) = reconcile::SECTION.get(&self.handlers) {
            if rc.pr_plans == reconcile::PrPlans::All && rc.plan_env_vars.is_none() {
                problems.push(
                    "reconcile.pr_plans",
                    "\"all\" plans pull requests from anyone, forks included, and runs their code: it needs [reconcile.plan_env_vars] with read-only credentials",
                );
            }
            for (i, login) in rc.approvers.iter().flatten().enumerate() {
                if !is_github_login(login) {
                    problems.push(
                        format!("reconcile.approvers[{i}]"),
                        format!("{login:?} is not a GitHub login"),
                    );
                }
            }
        }
        if let Some(window) = infraflux_handlers::upgrade::SECTION
            .get(&self.handlers)
            .and_then(|u| u.window.as_ref())
            && let Err(e) = window.validate()
        {
            problems.push("upgrade.window", e);
        }
        if let Some(acceptance) = infraflux_handlers::acceptance::SECTION.get(&self.handlers) {
            for (key, message) in acceptance.problems() {
                problems.push(key, message);
            }
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint
            && !endpoint.starts_with("http://")
            && !endpoint.starts_with("https://")
        {
            problems.push(
                "telemetry.otlp_endpoint",
                format!("{endpoint:?} is not an http(s) URL"),
            );
        }
        if let Some(url) = &self.telemetry.trace_url {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                problems.push(
                    "telemetry.trace_url",
                    format!("{url:?} is not an http(s) URL"),
                );
            } else if !url.contains(TRACE_ID_PLACEHOLDER) {
                problems.push(
                    "telemetry.trace_url",
                    format!("{url:?} has no {TRACE_ID_PLACEHOLDER} to put the trace id in"),
                );
            }
        }
        if self.ui.enabled() {
            match self.ui.listen.parse::<SocketAddr>() {
                Err(e) => problems.push(
                    "ui.listen",
                    format!(
                        "{:?} is not host:port ({e}); an empty listen turns the page off",
                        self.ui.listen
                    ),
                ),
                Ok(addr) if self.http.listen.parse::<SocketAddr>() == Ok(addr) && addr.port() != 0 => {
                    // Name the key the operator wrote: a page left at its default port is
                    // http.listen's problem (found by the config fuzz target).
                    if self.ui.listen == default_ui_listen() {
                        problems.push(
                            "http.listen",
                            format!("{addr} is also the status page's default (ui.listen); give one of them another port, or turn the page off with ui.listen = \"\""),
                        )
                    } else {
                        problems.push(
                            "ui.listen",
                            format!("{addr} is http.listen too; the page needs a listener of its own"),
                        )
                    }
                }
                Ok(addr) if !addr.ip().is_loopback() && self.ui.auth_token.is_none() => warnings
                    .push(
                        "ui.auth_token",
                        format!("absent, and ui.listen {addr} is not loopback: anyone who reaches it sees the status page"),
                    ),
                Ok(_) => {}
            }
        }
        let mut names = BTreeSet::new();
        for (i, s) in self.schedules.iter().enumerate() {
            let key = format!("schedules[{i}]");
            if let Err(e) = command::validate_label("schedule name", &s.name) {
                problems.push(format!("{key}.name"), e.to_string());
            }
            if !names.insert(s.name.clone()) {
                problems.push(format!("{key}.name"), format!("{:?} is used twice", s.name));
            }
            if let Err(e) = self.parse_schedule(s) {
                let field = match e {
                    infraflux_schedules::ScheduleError::TimeZone(_) => "timezone",
                    _ => "cron",
                };
                problems.push(format!("{key}.{field}"), e.to_string());
            }
            match command::parse(&s.command) {
                Ok(Request::Submit { kind, .. }) => {
                    if !self.handlers.enables(kind) {
                        problems.push(
                            format!("{key}.command"),
                            format!(
                                "{:?} starts a {kind} job, but {kind} is not configured (no [{}] section)",
                                s.command,
                                kind.config_section()
                            ),
                        );
                    }
                }
                Ok(_) => problems.push(
                    format!("{key}.command"),
                    format!("{:?} does not start a job; a schedule must", s.command),
                ),
                Err(e) => problems.push(format!("{key}.command"), e.to_string()),
            }
        }
        for (key, r) in self.secret_refs() {
            if r.is_literal() {
                warnings.push(
                    key,
                    "holds a literal secret; use env:, file:, cred: or op:// instead",
                );
            }
        }
        if let Some(rc) = reconcile::SECTION.get(&self.handlers)
            && rc.approvers.is_none()
            && self.github.as_ref().is_none_or(|gh| gh.token.is_none())
        {
            warnings.push(
                "reconcile.approvers",
                "absent, and without a [github] token nobody's write permission can be checked: `/infraflux apply` comments are refused",
            );
        }
        if !present.contains("github") {
            warnings.push(
                "github",
                "absent: POST /webhooks/github answers 404 and GitHub events over NATS are refused",
            );
        }
        warnings
    }

    pub fn parse_schedule(
        &self,
        s: &ScheduleSection,
    ) -> Result<CronSchedule, infraflux_schedules::ScheduleError> {
        CronSchedule::new(
            &s.name,
            &s.cron,
            &s.timezone,
            s.jitter.map(HumanDuration::get).unwrap_or_default(),
            s.catch_up.map(HumanDuration::get),
        )
    }

    pub fn agent_id(&self) -> String {
        self.agent.id.clone().unwrap_or_else(hostname)
    }

    /// Every secret reference, with its key.
    pub fn secret_refs(&self) -> Vec<(String, &SecretRef)> {
        let mut refs: Vec<(String, &SecretRef)> = Vec::new();
        let nats = &self.nats;
        for (k, v) in [
            ("nats.creds", &nats.creds),
            ("nats.nkey", &nats.nkey),
            ("nats.token", &nats.token),
            ("nats.password", &nats.password),
        ] {
            if let Some(r) = v {
                refs.push((k.to_string(), r));
            }
        }
        if let Some(gh) = &self.github {
            if let Some(t) = &gh.token {
                refs.push(("github.token".into(), t));
            }
            for (i, r) in gh.webhook_secret.0.iter().enumerate() {
                refs.push((format!("github.webhook_secret.{i}"), r));
            }
        }
        if let Some(talos) = clients::TALOS.get(&self.handlers) {
            // A talosconfig given as a reference is resolved at start; a plain path is read
            // by each job.
            if let Some(r) = &talos.talosconfig_ref {
                refs.push(("talos.talosconfig".into(), r));
            }
        }
        if let Some(token) = &self.ui.auth_token {
            refs.push((UI_AUTH_TOKEN_KEY.into(), token));
        }
        for (name, r) in &self.telemetry.otlp_headers {
            refs.push((format!("telemetry.otlp_headers.{name}"), r));
        }
        if let Some(s3) = clients::S3.get(&self.handlers) {
            refs.push(("s3.access_key_id".into(), &s3.access_key_id));
            refs.push(("s3.secret_access_key".into(), &s3.secret_access_key));
        }
        if let Some(rc) = reconcile::SECTION.get(&self.handlers) {
            for (name, r) in &rc.env_vars {
                refs.push((format!("reconcile.env_vars.{name}"), r));
            }
            for (name, r) in rc.plan_env_vars.iter().flatten() {
                refs.push((format!("reconcile.plan_env_vars.{name}"), r));
            }
        }
        if let Some(identity) = restore_drill::SECTION
            .get(&self.handlers)
            .and_then(|d| d.age_identity.as_ref())
        {
            refs.push(("restore_drill.age_identity".into(), identity));
        }
        if let Some(proxmox) = clients::PROXMOX.get(&self.handlers) {
            refs.push(("proxmox.token_secret".into(), &proxmox.token_secret));
        }
        refs
    }
}

/// GitHub logins: letters, digits and single hyphens, at most 39 characters.
fn is_github_login(login: &str) -> bool {
    !login.is_empty()
        && login.len() <= 39
        && !login.starts_with('-')
        && !login.ends_with('-')
        && !login.contains("--")
        && login.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The key an environment variable overrides (`nats.url` for `INFRAFLUX_NATS__URL`), if it is an
/// override at all: only `INFRAFLUX_<SECTION>__<KEY>` is. Other `INFRAFLUX_*` variables belong to
/// other programs (the shipped nats-server.conf reads `INFRAFLUX_NATS_AGENT_PASSWORD`).
fn override_key(name: &str) -> Option<String> {
    let (section, key) = name
        .strip_prefix(ENV_PREFIX)?
        .strip_prefix('_')?
        .split_once("__")?;
    (!section.is_empty() && !key.is_empty())
        .then(|| format!("{section}.{}", key.replace("__", ".")).to_lowercase())
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

use infraflux_handlers::sections::read_section as section;

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/infraflux")
}
fn default_concurrency() -> usize {
    4
}
fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration::from_secs(60)
}
fn default_ack_wait() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_requeue_after() -> HumanDuration {
    HumanDuration::from_secs(600)
}
fn default_lease_ttl() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_max_deliveries() -> u32 {
    10
}
fn default_kill_grace() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_nats_url() -> String {
    "nats://127.0.0.1:4222".to_string()
}
fn default_prefix() -> String {
    "infraflux".to_string()
}
fn default_replicas() -> usize {
    1
}
fn default_events_max_age() -> HumanDuration {
    HumanDuration::from_secs(30 * 86_400)
}
fn default_records_max_age() -> HumanDuration {
    HumanDuration::from_secs(90 * 86_400)
}
fn default_dedup_window() -> HumanDuration {
    HumanDuration::from_secs(7 * 86_400)
}
fn default_listen() -> String {
    "127.0.0.1:8080".to_string()
}
fn default_ui_listen() -> String {
    "127.0.0.1:8081".to_string()
}
fn default_max_in_flight() -> usize {
    16
}
fn default_max_connections() -> usize {
    512
}
fn default_read_timeout() -> HumanDuration {
    HumanDuration::from_secs(30)
}
fn default_branch() -> String {
    "main".to_string()
}
fn default_api_url() -> String {
    "https://api.github.com".to_string()
}
fn default_true() -> bool {
    true
}
fn default_timezone() -> String {
    "UTC".to_string()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "agent".to_string())
}

/// Agent ids appear in KV keys and subjects.
pub fn validate_agent_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{id:?} must be 1 to 64 letters, digits, '-' or '_' (it is used in NATS keys)"
        ))
    }
}

/// The subject prefix: dot-separated tokens of letters, digits, `-` and `_`.
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    let ok = !prefix.is_empty()
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{prefix:?} must be dot-separated tokens of letters, digits, '-' and '_'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Loaded, Problems> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, toml).expect("write");
        Config::load(
            &path,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    const MINIMAL: &str = r#"
[agent]
id = "runner-1"
[nats]
url = "nats://127.0.0.1:4222"
[github]
repo = "owner/infra"
webhook_secret = ["env:A", "env:B"]
"#;

    #[test]
    fn minimal_config_loads_with_defaults() {
        let loaded = load(MINIMAL, &[]).expect("valid");
        let c = loaded.config;
        assert_eq!(c.agent_id(), "runner-1");
        assert_eq!(c.agent.concurrency, 4);
        assert_eq!(c.nats.subject_prefix, "infraflux");
        assert_eq!(c.http.listen, "127.0.0.1:8080");
        assert_eq!(c.http.max_in_flight, 16);
        assert_eq!(c.http.read_timeout.get(), Duration::from_secs(30));
        let gh = c.github.expect("github");
        assert_eq!(gh.default_branch, "main");
        assert_eq!(gh.webhook_secret.0.len(), 2);
        assert!(!c.handlers.enables(infraflux_handlers::JobKind::BACKUP));
    }

    #[test]
    fn the_status_page_has_its_own_listener_and_checked_settings() {
        let c = load(MINIMAL, &[]).expect("valid").config;
        assert_eq!(c.ui.listen, "127.0.0.1:8081");
        assert!(c.ui.enabled() && c.ui.auth_token.is_none());
        let off = format!("{MINIMAL}\n[ui]\nlisten = \"\"\n");
        assert!(!load(&off, &[]).expect("valid").config.ui.enabled());
        let with_token = format!(
            "{MINIMAL}\n[ui]\nlisten = \"0.0.0.0:8081\"\nauth_token = \"env:UI_TOKEN\"\n[telemetry]\ntrace_url = \"https://grafana.lan/explore?traceId={{trace_id}}\"\n"
        );
        let loaded = load(&with_token, &[]).expect("valid");
        assert!(
            loaded
                .config
                .secret_refs()
                .iter()
                .any(|(k, _)| k == "ui.auth_token")
        );
        assert!(loaded.warnings.0.is_empty(), "{}", loaded.warnings);
        let open = format!("{MINIMAL}\n[ui]\nlisten = \"0.0.0.0:8081\"\n");
        let warnings = load(&open, &[]).expect("valid").warnings;
        assert!(
            warnings.0.iter().any(|p| p.key == "ui.auth_token"),
            "{warnings}"
        );
        let bad = format!(
            "{MINIMAL}\n[ui]\nlisten = \"lan\"\n[telemetry]\ntrace_url = \"https://grafana.lan/explore\"\n"
        );
        let problems = load(&bad, &[]).expect_err("invalid");
        let keys: Vec<&str> = problems.0.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"ui.listen"), "{problems}");
        assert!(keys.contains(&"telemetry.trace_url"), "{problems}");
        assert!(problems.to_string().contains("{trace_id}"), "{problems}");
    }

    #[test]
    fn environment_overrides_any_key_including_in_sections_with_underscores() {
        let toml = format!("{MINIMAL}\n[etcd_snapshot]\nbucket = \"a\"\n");
        let loaded = load(
            &toml,
            &[
                ("INFRAFLUX_NATS__URL", "nats://10.0.0.9:4222"),
                ("INFRAFLUX_AGENT__CONCURRENCY", "7"),
                ("INFRAFLUX_ETCD_SNAPSHOT__BUCKET", "b"),
                ("UNRELATED", "x"),
            ],
        )
        .expect("valid");
        assert_eq!(loaded.config.nats.url, "nats://10.0.0.9:4222");
        assert_eq!(loaded.config.agent.concurrency, 7);
        assert_eq!(
            infraflux_handlers::etcd_snapshot::SECTION
                .get(&loaded.config.handlers)
                .expect("section")
                .bucket,
            "b"
        );
    }

    #[test]
    fn only_section_double_underscore_key_variables_are_overrides() {
        // What deploy/nats-server.conf reads: another program's variables, not overrides.
        let loaded = load(
            MINIMAL,
            &[
                ("INFRAFLUX_NATS_AGENT_PASSWORD", "p1"),
                ("INFRAFLUX_NATS_CHAT_PASSWORD", "p2"),
                ("INFRAFLUX_DEBUG", "1"),
                ("INFRAFLUX_AGENT__CONCURRENCY", "3"),
            ],
        )
        .unwrap_or_else(|p| panic!("{p}"));
        assert_eq!(loaded.config.agent.concurrency, 3);

        // An unknown key in a real override is an error that names the key and the variable.
        let problems = load(MINIMAL, &[("INFRAFLUX_NATS__BOGUS", "v4lue-not-shown")])
            .expect_err("unknown key");
        let bogus = problems
            .0
            .iter()
            .find(|p| p.key == "nats.bogus")
            .unwrap_or_else(|| panic!("nats.bogus not reported: {problems}"));
        assert!(
            bogus.message.contains("unknown key")
                && bogus.message.contains("INFRAFLUX_NATS__BOGUS"),
            "{bogus}"
        );
        assert!(!problems.to_string().contains("v4lue-not-shown"));
    }

    #[test]
    fn every_bad_value_of_a_section_is_reported_not_only_the_first() {
        let toml = r#"
[agent]
concurrency = "four"
shutdown_timeout = 5
ack_wait = "soon"
[github]
repo = 7
webhook_secret = "env:A"
"#;
        let problems = load(toml, &[]).expect_err("invalid");
        let keys: Vec<&str> = problems.0.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "agent.concurrency",
            "agent.shutdown_timeout",
            "agent.ack_wait",
            "github.repo",
        ] {
            assert!(
                keys.contains(&expected),
                "{expected} missing from {problems}"
            );
        }
        // A required value taken out for being bad is not reported a second time as missing.
        assert_eq!(
            keys.iter().filter(|k| k.starts_with("github")).count(),
            1,
            "{problems}"
        );
    }

    #[test]
    fn pull_request_plans_for_all_need_read_only_credentials_and_approvers_are_logins() {
        let reconcile = |extra: &str| {
            format!(
                "[reconcile]\nrepo_url = \"file:///r\"\nworkdir = \"tf\"\nenv = \"prod\"\n{extra}"
            )
        };
        let problems = load(
            &reconcile("pr_plans = \"all\"\napprovers = [\"alice\", \"bad login\", \"-x\"]"),
            &[],
        )
        .expect_err("invalid");
        let keys: Vec<&str> = problems.0.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "reconcile.approvers[1]",
                "reconcile.approvers[2]",
                "reconcile.pr_plans"
            ],
            "{problems}"
        );
        assert!(problems.to_string().contains("plan_env_vars"), "{problems}");
        let problems = load(&reconcile("pr_plans = \"some\""), &[]).expect_err("invalid");
        assert_eq!(problems.0[0].key, "reconcile.pr_plans", "{problems}");
        let loaded = load(
            &reconcile(
                "pr_plans = \"all\"\n[reconcile.plan_env_vars]\nAWS_ACCESS_KEY_ID = \"env:RO\"",
            ),
            &[],
        )
        .expect("valid");
        let rc = reconcile::SECTION
            .get(&loaded.config.handlers)
            .expect("reconcile");
        assert_eq!(rc.pr_plans, reconcile::PrPlans::All);
        assert!(rc.chatops_approvals);
        // Approvals by write permission need a token to ask GitHub with.
        assert!(
            loaded
                .warnings
                .0
                .iter()
                .any(|w| w.key == "reconcile.approvers"),
            "{:?}",
            loaded.warnings
        );
    }

    #[test]
    fn an_upgrade_window_that_cannot_fire_is_named() {
        let problems = load(
            "[upgrade]\nschematic = \"s\"\nwindow = { cron = \"0 2 * * Sat\", duration = \"4h\", timezone = \"Mars/Olympus\" }\n",
            &[],
        )
        .expect_err("invalid");
        assert_eq!(problems.0[0].key, "upgrade.window", "{problems}");
        assert!(problems.to_string().contains("6 fields"), "{problems}");
        let problems = load(
            "[upgrade]\nschematic = \"s\"\nwindow = { cron = \"0 0 2 * * Sat\", duration = \"4h\", timezone = \"Mars/Olympus\" }\n",
            &[],
        )
        .expect_err("invalid");
        assert!(problems.to_string().contains("Mars/Olympus"), "{problems}");
    }

    #[test]
    fn acceptance_after_names_known_kinds() {
        let problems = load(
            "[kubernetes]\n[acceptance]\nafter = [\"apply\", \"upgrades\"]\nhostnames = [\"home.lab:x\"]\n",
            &[],
        )
        .expect_err("invalid");
        let keys: Vec<&str> = problems.0.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["acceptance.after[1]", "acceptance.hostnames[0]"],
            "{problems}"
        );
        assert!(
            problems
                .to_string()
                .contains("unknown job kind \"upgrades\""),
            "{problems}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_key() {
        let toml = r#"
[agent]
id = "runner 1"
concurrency = 0
colour = "blue"
[nats]
url = "http://x"
dedup_window = "2m"
[http]
listen = "nowhere"
max_in_flight = 0
max_connections = 0
read_timeout = "10ms"
[github]
repo = "infra"
webhook_secret = "env:A"
typo_key = 1
[backup]
ttl = "forever"
[[schedules]]
name = "nightly"
cron = "0 3 * * *"
timezone = "Mars/Base"
command = "backup ns=Bad"
[[schedules]]
name = "snap"
cron = "0 0 4 * * *"
command = "snapshot"
[widgets]
a = 1
"#;
        let problems = load(toml, &[("INFRAFLUX_NATS__BOGUS", "1")]).expect_err("invalid");
        let keys: Vec<&str> = problems.0.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "agent.id",
            "agent.concurrency",
            "agent.colour",
            "nats.url",
            "nats.dedup_window",
            "nats.bogus",
            "http.listen",
            "http.max_in_flight",
            "http.max_connections",
            "http.read_timeout",
            "github.repo",
            "github.typo_key",
            "backup.ttl",
            "schedules[0].cron",
            "schedules[0].command",
            "schedules[1].command",
            "widgets",
        ] {
            assert!(
                keys.contains(&expected),
                "{expected} missing from {problems}"
            );
        }
        let text = problems.to_string();
        assert!(text.contains("\"forever\""), "{text}");
        assert!(text.contains("etcd_snapshot"), "{text}");
    }

    #[test]
    fn text_loads_as_the_same_text_in_a_file_does() {
        let env = [("INFRAFLUX_AGENT__CONCURRENCY", "0")];
        let from_file = load(MINIMAL, &env).expect_err("concurrency 0");
        let from_text = Config::load_str(
            MINIMAL,
            "agent.toml",
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .expect_err("concurrency 0");
        assert_eq!(from_text, from_file);
        assert!(
            from_text
                .to_string()
                .contains("INFRAFLUX_AGENT__CONCURRENCY"),
            "{from_text}"
        );
        // A text that is no TOML is reported under the name given for it.
        let (loaded, problems) = Config::load_all_str("[agent", "agent.toml", std::iter::empty());
        assert_eq!(problems.0.len(), 1, "{problems}");
        assert_eq!(problems.0[0].key, "agent.toml");
        assert!(loaded.sections.is_empty());
        let valid = Config::load_str(MINIMAL, "agent.toml", std::iter::empty()).expect("valid");
        assert_eq!(valid.config.agent_id(), "runner-1");
    }

    #[test]
    fn a_listener_shared_with_the_page_names_the_key_the_config_set() {
        // The config fuzz target's crash, shortened: http.listen moved onto the page's default
        // port, no [ui] section, and the problem named ui.listen, a key the file does not have.
        let http = format!("{MINIMAL}[http]\nlisten = \"127.0.0.1:8081\"\n");
        let problems = load(&http, &[]).expect_err("shared port");
        assert!(
            problems.0.iter().any(|p| p.key == "http.listen"
                && p.message.contains("127.0.0.1:8081")
                && p.message.contains("ui.listen")),
            "{problems}"
        );
        assert!(
            !problems.0.iter().any(|p| p.key == "ui.listen"),
            "{problems}"
        );
        let ui = format!("{MINIMAL}[ui]\nlisten = \"127.0.0.1:8080\"\n");
        let problems = load(&ui, &[]).expect_err("shared port");
        assert!(
            problems.0.iter().any(|p| p.key == "ui.listen"),
            "{problems}"
        );
    }

    #[test]
    fn a_problem_names_its_environment_variables_in_the_same_order_every_time() {
        // The config fuzz target's crash, shortened: several variables behind one problem.
        let env: Vec<(String, String)> = ["E", "B", "D", "A", "C"]
            .iter()
            .map(|k| (format!("INFRAFLUX_WIDGETS__{k}"), "1".to_string()))
            .collect();
        let first = Config::load_str(MINIMAL, "agent.toml", env.clone()).expect_err("widgets");
        let widgets = first
            .0
            .iter()
            .find(|p| p.key == "widgets")
            .unwrap_or_else(|| panic!("no widgets problem in {first}"));
        assert!(
            widgets.message.ends_with(
                "(set by environment variable INFRAFLUX_WIDGETS__A, INFRAFLUX_WIDGETS__B, \
                 INFRAFLUX_WIDGETS__C, INFRAFLUX_WIDGETS__D, INFRAFLUX_WIDGETS__E)"
            ),
            "{widgets}"
        );
        for _ in 0..10 {
            let again = Config::load_str(MINIMAL, "agent.toml", env.clone()).expect_err("widgets");
            assert_eq!(again, first);
        }
    }

    #[test]
    fn a_section_reports_the_same_problems_every_time_and_all_of_them() {
        // The config fuzz target's crash, shortened: a section with several bad values, one
        // inside an array element (which cannot be taken out alone). Read in hash order, which
        // of them serde met first changed from one load to the next, and the array element's
        // stopped the section there.
        let toml = format!(
            r#"{MINIMAL}
[restore_drill]
namespaces = ["home"]
max_data_age = "soon"
restore_timeout = "later"
skip_if_newer_than = "2xh"
timeout = 7.5

[[restore_drill.checks]]
namespace = "home"

[[restore_drill.checks]]
namespmace = "media"
"#
        );
        let first = Config::load_str(&toml, "agent.toml", Vec::new()).expect_err("bad drill");
        for _ in 0..50 {
            let again = Config::load_str(&toml, "agent.toml", Vec::new()).expect_err("bad drill");
            assert_eq!(again, first);
        }
        let keys: Vec<&str> = first
            .0
            .iter()
            .map(|p| p.key.as_str())
            .filter(|k| k.starts_with("restore_drill"))
            .collect();
        assert_eq!(
            keys,
            [
                "restore_drill.checks[1]",
                "restore_drill.checks[1].namespmace",
                "restore_drill.max_data_age",
                "restore_drill.restore_timeout",
                "restore_drill.skip_if_newer_than",
                "restore_drill.timeout",
            ],
            "{first}"
        );
        assert!(
            first
                .0
                .iter()
                .all(|p| !p.message.contains(" in agent.toml")),
            "{first}"
        );
    }

    #[test]
    fn an_override_of_an_unknown_section_is_named_lowercased_beyond_ascii() {
        // What the config fuzz target met (its own check lowercased only ASCII): the section
        // of `INFRAFLUX_ÉTCD__BUCKET` is `étcd`, as the `config` crate lowercases the name (whose
        // key paths are ASCII, so it keeps `étcd.bucket` as one key).
        let env = vec![("INFRAFLUX_ÉTCD__BUCKET".to_string(), "b".to_string())];
        let problems = Config::load_str(MINIMAL, "agent.toml", env).expect_err("unknown");
        let problem = problems
            .0
            .iter()
            .find(|p| p.key == "étcd.bucket")
            .unwrap_or_else(|| panic!("no étcd problem in {problems}"));
        assert!(
            problem.message.starts_with("unknown section")
                && problem
                    .message
                    .ends_with("(set by environment variable INFRAFLUX_ÉTCD__BUCKET)"),
            "{problem}"
        );
    }

    #[test]
    fn literal_secrets_warn_and_references_do_not() {
        let toml = MINIMAL.replace("[\"env:A\", \"env:B\"]", "\"s3cr3t-literal\"");
        let loaded = load(&toml, &[]).expect("valid");
        let w = loaded.warnings.to_string();
        assert!(w.contains("github.webhook_secret.0"), "{w}");
        assert!(!w.contains("s3cr3t-literal"), "{w}");
        let loaded = load(MINIMAL, &[]).expect("valid");
        assert!(!loaded.warnings.to_string().contains("literal"));
    }

    #[test]
    fn map_keys_keep_their_case() {
        let toml = format!(
            "{MINIMAL}\n[reconcile]\nrepo_url = \"file:///r\"\nworkdir = \"tf\"\nenv = \"prod\"\n[reconcile.env_vars]\nAWS_ACCESS_KEY_ID = \"env:KEY\"\n"
        );
        let loaded = load(&toml, &[]).expect("valid");
        let rc = reconcile::SECTION
            .get(&loaded.config.handlers)
            .expect("reconcile");
        assert!(
            rc.env_vars.contains_key("AWS_ACCESS_KEY_ID"),
            "{:?}",
            rc.env_vars
        );
    }

    #[test]
    fn the_shipped_example_config_is_valid_and_every_schedule_resolves() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        let loaded = Config::load(&path, std::iter::empty()).unwrap_or_else(|p| panic!("{p}"));
        let c = loaded.config;
        for kind in infraflux_handlers::JobKind::all() {
            assert!(c.handlers.enables(kind), "the example enables {kind}");
        }
        let names: Vec<&str> = c.schedules.iter().map(|s| s.name.as_str()).collect();
        for wanted in [
            "nightly-velero",
            "nightly-etcd",
            "weekly-drill",
            "drift-check",
            "daily-acceptance",
            "weekly-preflight",
        ] {
            assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
        }
        for s in &c.schedules {
            assert!(
                matches!(command::parse(&s.command), Ok(Request::Submit { .. })),
                "{}",
                s.command
            );
        }
        assert!(
            loaded
                .warnings
                .0
                .iter()
                .all(|w| !w.message.contains("literal"))
        );
    }

    #[test]
    fn a_syntax_error_names_the_file() {
        let problems = load("[agent\nid=1", &[]).expect_err("syntax");
        assert!(problems.0[0].key.ends_with("agent.toml"), "{problems}");
    }
}
