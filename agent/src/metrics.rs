//! Prometheus metrics on `/metrics`. Names are `infraflux_<name>_<unit>`; every label is
//! bounded (job kinds, outcomes, results), never an id.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindOutcome {
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// A kind and one of its targets (a namespace set, a cluster, a node; empty for a kind whose
/// jobs name none).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindTarget {
    pub kind: String,
    pub target: String,
}

/// A drill's target: a namespace, or `etcd`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnvLabel {
    pub env: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbResult {
    pub verb: String,
    pub result: String,
}

/// A named check of a kind that runs checks (`acceptance`, `preflight`): a bounded name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindCheck {
    pub kind: String,
    pub check: String,
}

pub struct Metrics {
    registry: Registry,
    pub jobs: Family<KindOutcome, Counter>,
    pub job_duration: Family<KindLabel, Histogram>,
    pub lock_wait: Family<KindLabel, Histogram>,
    pub last_success: Family<KindTarget, Gauge<f64, AtomicU64>>,
    pub webhook_requests: Family<ResultLabel, Counter>,
    pub commands: Family<VerbResult, Counter>,
    pub drift: Family<EnvLabel, Gauge>,
    pub last_size: Family<KindTarget, Gauge>,
    pub last_items: Family<KindTarget, Gauge>,
    pub drill_last_success: Family<TargetLabel, Gauge<f64, AtomicU64>>,
    pub drill_rto: Family<TargetLabel, Gauge<f64, AtomicU64>>,
    pub drill_data_age: Family<TargetLabel, Gauge<f64, AtomicU64>>,
    pub nats_connected: Gauge,
    pub queue_pending: Gauge,
    pub jobs_running: Gauge,
    pub webhooks_in_flight: Gauge,
    /// `infraflux_check_ok{kind, check}`: 1 passed, 0 failed, at its last run.
    pub check_ok: Family<KindCheck, Gauge>,
}

impl Metrics {
    /// The last success of a kind's target: when, and what it stored, where the job said so.
    pub fn last_success_of(
        &self,
        kind: &str,
        target: &str,
        at: Option<chrono::DateTime<chrono::Utc>>,
        size_bytes: Option<u64>,
        items: Option<u64>,
        figures: &std::collections::BTreeMap<String, f64>,
    ) {
        let label = KindTarget {
            kind: kind.to_string(),
            target: target.to_string(),
        };
        if let Some(at) = at {
            self.last_success
                .get_or_create(&label)
                .set(at.timestamp() as f64);
        }
        if let Some(size) = size_bytes {
            self.last_size
                .get_or_create(&label)
                .set(i64::try_from(size).unwrap_or(i64::MAX));
        }
        if let Some(items) = items {
            self.last_items
                .get_or_create(&label)
                .set(i64::try_from(items).unwrap_or(i64::MAX));
        }
        if kind == infraflux_handlers::JobKind::RESTORE_DRILL.as_str() {
            let target = TargetLabel {
                target: target.to_string(),
            };
            if let Some(at) = at {
                self.drill_last_success
                    .get_or_create(&target)
                    .set(at.timestamp() as f64);
            }
            if let Some(rto) = figures.get("rto_seconds") {
                self.drill_rto.get_or_create(&target).set(*rto);
            }
            if let Some(age) = figures.get("data_age_seconds") {
                self.drill_data_age.get_or_create(&target).set(*age);
            }
        }
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("infraflux");
        let jobs = Family::<KindOutcome, Counter>::default();
        registry.register("jobs", "Jobs ended, by kind and outcome", jobs.clone());
        let job_duration = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.5, 2.0, 16))
        });
        registry.register(
            "job_duration_seconds",
            "Job run time from start to end, by kind",
            job_duration.clone(),
        );
        let lock_wait = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 3.0, 14))
        });
        registry.register(
            "lock_wait_seconds",
            "Time jobs waited for their locks, by kind",
            lock_wait.clone(),
        );
        let last_success = Family::<KindTarget, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last successful job, by kind and target",
            last_success.clone(),
        );
        let webhook_requests = Family::<ResultLabel, Counter>::default();
        registry.register(
            "webhook_requests",
            "GitHub webhook requests, by result",
            webhook_requests.clone(),
        );
        let commands = Family::<VerbResult, Counter>::default();
        registry.register(
            "commands",
            "ChatOps commands, by verb and result",
            commands.clone(),
        );
        let drift = Family::<EnvLabel, Gauge>::default();
        registry.register(
            "drift_detected",
            "1 while the last drift check of an environment found changes with no new commit",
            drift.clone(),
        );
        let last_size = Family::<KindTarget, Gauge>::default();
        registry.register(
            "last_size_bytes",
            "Size of the newest successful backup artifact (etcd snapshot bytes), by kind and target",
            last_size.clone(),
        );
        let last_items = Family::<KindTarget, Gauge>::default();
        registry.register(
            "last_items",
            "Items in the newest successful backup (Velero items backed up), by kind and target",
            last_items.clone(),
        );
        let drill_last_success = Family::<TargetLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "drill_last_success_timestamp_seconds",
            "Unix time of the last restore drill that proved a target restores",
            drill_last_success.clone(),
        );
        let drill_rto = Family::<TargetLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "drill_rto_seconds",
            "Restore start to verified, in the last successful drill of a target",
            drill_rto.clone(),
        );
        let drill_data_age = Family::<TargetLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "drill_data_age_seconds",
            "Age of the data the last successful drill of a target restored, at the restore",
            drill_data_age.clone(),
        );
        let nats_connected = Gauge::default();
        registry.register(
            "nats_connected",
            "1 while connected to NATS",
            nats_connected.clone(),
        );
        let queue_pending = Gauge::default();
        registry.register(
            "queue_pending_jobs",
            "Jobs queued and not yet picked up by any agent",
            queue_pending.clone(),
        );
        let jobs_running = Gauge::default();
        registry.register(
            "jobs_running",
            "Jobs this agent runs or holds waiting for locks",
            jobs_running.clone(),
        );
        let webhooks_in_flight = Gauge::default();
        registry.register(
            "webhooks_in_flight",
            "Webhook requests being handled now; at http.max_in_flight, more are refused",
            webhooks_in_flight.clone(),
        );
        let check_ok = Family::<KindCheck, Gauge>::default();
        registry.register(
            "check_ok",
            "Whether a named check passed (1) or failed (0) at its last run; a skipped check keeps its last value",
            check_ok.clone(),
        );
        Self {
            registry,
            jobs,
            job_duration,
            lock_wait,
            last_success,
            webhook_requests,
            commands,
            drift,
            last_size,
            last_items,
            drill_last_success,
            drill_rto,
            drill_data_age,
            nats_connected,
            queue_pending,
            jobs_running,
            webhooks_in_flight,
            check_ok,
        }
    }

    /// The verdicts of a job's checks; skipped ones say nothing new.
    pub fn checks_of(&self, kind: &str, checks: &[infraflux_handlers::checks::Check]) {
        for check in checks.iter().filter(|c| !c.skipped) {
            self.check_ok
                .get_or_create(&KindCheck {
                    kind: kind.to_string(),
                    check: check.name.clone(),
                })
                .set(i64::from(check.ok));
        }
    }

    pub fn job_ended(&self, kind: &str, outcome: &str) {
        self.jobs
            .get_or_create(&KindOutcome {
                kind: kind.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn webhook(&self, result: &str) {
        self.webhook_requests
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    pub fn command(&self, verb: &str, result: &str) {
        // Unknown verbs are user input: fold them into one label value.
        let verb = if infraflux_handlers::command::verb(verb).is_some() {
            verb
        } else {
            "unknown"
        };
        self.commands
            .get_or_create(&VerbResult {
                verb: verb.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    /// The OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "Cannot encode metrics");
        }
        out
    }
}

/// The classic Prometheus text format from OpenMetrics: counters' HELP and TYPE name the
/// `_total` series, and there is no `# EOF` or `# UNIT`.
pub fn to_classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_by_their_series() {
        let m = Metrics::new();
        m.job_ended("backup", "succeeded");
        let classic = to_classic_text(&m.encode());
        assert!(
            classic.contains("# TYPE infraflux_jobs_total counter"),
            "{classic}"
        );
        assert!(
            classic.contains("# HELP infraflux_jobs_total Jobs ended"),
            "{classic}"
        );
        assert!(classic.contains("infraflux_jobs_total{kind=\"backup\",outcome=\"succeeded\"} 1"));
        assert!(classic.contains("# TYPE infraflux_nats_connected gauge"));
        assert!(!classic.contains("# EOF"));
    }
}
