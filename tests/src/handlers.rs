//! Handlers that tests register through the library API. They record what they did so tests
//! can assert on it: which agent ran which job, when, whether it was told of an interruption.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use infraflux_handlers::process::{ProcessError, run_cancellable};
use infraflux_handlers::{
    Handler, HandlerError, JobContext, JobEnvelope, JobKind, LockRequest, Outcome, RetryPolicy,
};

/// One run of a test handler.
#[derive(Debug, Clone)]
pub struct Run {
    pub job_id: String,
    pub agent: String,
    pub attempt: u32,
    pub interrupted: bool,
    pub started: Instant,
    pub ended: Option<Instant>,
    pub cancelled: bool,
    /// The job's own directory, and whether it existed (and took a file) while the job ran.
    pub work_dir: PathBuf,
    pub work_dir_usable: bool,
    /// What an earlier attempt saved.
    pub checkpoint: Option<serde_json::Value>,
    /// The handler stopped at a safe point after `stop_requested`, before a hard stop.
    pub stopped_softly: bool,
    /// Follow-up job ids this attempt was given.
    pub follow_ups: Vec<String>,
}

/// Shared by every agent of a test (in process), so "each job ran once in total" is checkable.
#[derive(Debug, Clone, Default)]
pub struct RunLog(Arc<Mutex<Vec<Run>>>);

impl RunLog {
    pub fn runs(&self) -> Vec<Run> {
        self.0.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn runs_of(&self, job_id: &str) -> Vec<Run> {
        self.runs()
            .into_iter()
            .filter(|r| r.job_id == job_id)
            .collect()
    }

    fn start(&self, ctx: &JobContext) -> usize {
        let marker = ctx.work_dir.join("marker");
        let work_dir_usable = ctx.work_dir.is_dir() && std::fs::write(&marker, "x").is_ok();
        let mut runs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        runs.push(Run {
            job_id: ctx.job_id.clone(),
            agent: ctx.agent_id.clone(),
            attempt: ctx.attempt,
            interrupted: ctx.interrupted.is_some(),
            started: Instant::now(),
            ended: None,
            cancelled: false,
            work_dir: ctx.work_dir.clone(),
            work_dir_usable,
            checkpoint: ctx.checkpoint.clone(),
            stopped_softly: false,
            follow_ups: Vec::new(),
        });
        runs.len() - 1
    }

    fn update(&self, index: usize, change: impl FnOnce(&mut Run)) {
        let mut runs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(run) = runs.get_mut(index) {
            change(run);
        }
    }

    fn end(&self, index: usize, cancelled: bool) {
        let mut runs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(run) = runs.get_mut(index) {
            run.ended = Some(Instant::now());
            run.cancelled = cancelled;
        }
    }
}

/// What a test handler does when it runs.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Sleep this long (watching the cancel token), then succeed.
    Sleep(Duration),
    /// Run `sh -c <script>` as a child process; succeed if it exits 0.
    Child(String),
    /// Fail with a retryable error until the given attempt, then succeed.
    FlakyUntil(u32),
    /// Panic with this message (a bug in a handler).
    Panic(String),
    /// Without a checkpoint: save `{"step": 1}` and wait to be stopped. With one: succeed,
    /// naming it.
    Checkpointed,
    /// Steps of this length, looking at `stop_requested` between two: a cancel ends the job
    /// at the next step boundary.
    SafePoints(Duration),
    /// Report this many progress lines ("step i of n") as fast as it can, then succeed.
    Reports(usize),
    /// Look up the newest succeeded job of `look_for`, queue a follow-up of `follow`; fail
    /// (retryably) on the first attempt, so the second queues it again.
    FollowUp { look_for: JobKind, follow: JobKind },
}

/// A handler for any kind, with optional locks.
pub struct TestHandler {
    pub kind: JobKind,
    pub behaviour: Behaviour,
    pub locks: Vec<LockRequest>,
    pub log: RunLog,
    pub timeout: Duration,
    /// Not before the job's creation plus this, for this reason.
    pub defer: Option<(Duration, String)>,
    pub cancel_grace: Duration,
}

impl TestHandler {
    pub fn new(kind: JobKind, behaviour: Behaviour, log: RunLog) -> Self {
        Self {
            kind,
            behaviour,
            locks: Vec::new(),
            log,
            timeout: Duration::from_secs(120),
            defer: None,
            cancel_grace: Duration::ZERO,
        }
    }

    pub fn deferred(mut self, after_creation: Duration, reason: &str) -> Self {
        self.defer = Some((after_creation, reason.to_string()));
        self
    }

    pub fn with_cancel_grace(mut self, grace: Duration) -> Self {
        self.cancel_grace = grace;
        self
    }

    pub fn with_locks(mut self, locks: Vec<LockRequest>) -> Self {
        self.locks = locks;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// For `start_agent`: registers this handler.
    pub fn install(self) -> impl FnOnce(&mut infraflux_handlers::Registry) {
        move |registry| registry.register(Arc::new(self))
    }
}

#[async_trait]
impl Handler for TestHandler {
    fn kind(&self) -> JobKind {
        self.kind
    }

    fn locks(&self, _job: &JobEnvelope) -> Vec<LockRequest> {
        self.locks.clone()
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::exponential(5, Duration::from_millis(200), Duration::from_secs(1))
    }

    fn not_before(
        &self,
        job: &JobEnvelope,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<infraflux_handlers::Deferral> {
        let (after, reason) = self.defer.as_ref()?;
        let until = job.created_at + chrono::Duration::from_std(*after).ok()?;
        (now < until).then(|| infraflux_handlers::Deferral {
            until,
            reason: reason.clone(),
        })
    }

    fn cancel_grace(&self) -> Duration {
        self.cancel_grace
    }

    async fn run(&self, ctx: &JobContext, job: &JobEnvelope) -> Result<Outcome, HandlerError> {
        let index = self.log.start(ctx);
        let result = match &self.behaviour {
            Behaviour::Sleep(d) => {
                ctx.progress.report("sleeping").await;
                tokio::select! {
                    () = tokio::time::sleep(*d) => Ok(Outcome::succeeded(format!("slept {d:?}"))),
                    () = ctx.cancel.cancelled() => Err(HandlerError::Cancelled),
                }
            }
            Behaviour::Child(script) => {
                let mut cmd = tokio::process::Command::new("sh");
                cmd.arg("-c").arg(script);
                match run_cancellable(cmd, &ctx.cancel, ctx.kill_grace).await {
                    Ok(out) if out.status.success() => Ok(Outcome::succeeded("child exited 0")),
                    Ok(out) => Err(HandlerError::Failed(format!("child exited {}", out.status))),
                    Err(ProcessError::Cancelled { .. }) => Err(HandlerError::Cancelled),
                    Err(e) => Err(HandlerError::Internal(e.to_string())),
                }
            }
            Behaviour::Panic(message) => panic!("{message}"),
            Behaviour::Reports(n) => {
                for i in 1..=*n {
                    ctx.progress.report(&format!("step {i} of {n}")).await;
                }
                Ok(Outcome::succeeded(format!("reported {n} steps")))
            }
            Behaviour::Checkpointed => match &ctx.checkpoint {
                Some(saved) => Ok(Outcome::succeeded(format!("resumed from {saved}"))),
                None => {
                    ctx.checkpoint(serde_json::json!({"step": 1})).await?;
                    ctx.cancel.cancelled().await;
                    Err(HandlerError::Cancelled)
                }
            },
            Behaviour::SafePoints(step) => loop {
                tokio::select! {
                    () = tokio::time::sleep(*step) => {}
                    () = ctx.cancel.cancelled() => break Err(HandlerError::Cancelled),
                }
                if ctx.stop_requested.is_cancelled() {
                    self.log.update(index, |r| r.stopped_softly = true);
                    break Err(HandlerError::Cancelled);
                }
            },
            Behaviour::FollowUp { look_for, follow } => {
                let found = ctx
                    .jobs
                    .newest(&infraflux_handlers::JobQuery {
                        kind: Some(*look_for),
                        state: Some("succeeded".into()),
                        target: None,
                    })
                    .await
                    .map_err(HandlerError::Retryable)?;
                let follow_up = ctx
                    .jobs
                    .submit_follow_up(
                        job,
                        infraflux_handlers::FollowUp {
                            kind: *follow,
                            params: Default::default(),
                        },
                    )
                    .await
                    .map_err(HandlerError::Retryable)?;
                self.log
                    .update(index, |r| r.follow_ups.push(follow_up.clone()));
                if ctx.attempt < 2 {
                    Err(HandlerError::Retryable(
                        "first attempt fails on purpose".into(),
                    ))
                } else {
                    Ok(Outcome::Succeeded {
                        message: "followed up".into(),
                        result: serde_json::json!({
                            "found": found.map(|j| j.job_id),
                            "follow_up": follow_up,
                        }),
                    })
                }
            }
            Behaviour::FlakyUntil(n) => {
                if ctx.attempt < *n {
                    Err(HandlerError::Retryable(format!(
                        "flaky attempt {}",
                        ctx.attempt
                    )))
                } else {
                    Ok(Outcome::succeeded(format!(
                        "succeeded on attempt {}",
                        ctx.attempt
                    )))
                }
            }
        };
        self.log
            .end(index, matches!(result, Err(HandlerError::Cancelled)));
        result
    }
}

/// The handler of the out-of-process test agent: writes a marker file per attempt (with
/// whether it was told of an interruption), sleeps, then writes a done marker.
pub struct MarkerHandler {
    pub kind: JobKind,
    pub dir: PathBuf,
    pub sleep: Duration,
}

#[async_trait]
impl Handler for MarkerHandler {
    fn kind(&self) -> JobKind {
        self.kind
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(300)
    }

    async fn run(&self, ctx: &JobContext, _job: &JobEnvelope) -> Result<Outcome, HandlerError> {
        let start = self.dir.join(format!(
            "{}.{}.{}.start",
            ctx.job_id, ctx.attempt, ctx.agent_id
        ));
        let body = format!(
            "interrupted={} previous_agent={}\n",
            ctx.interrupted.is_some(),
            ctx.interrupted
                .as_ref()
                .and_then(|i| i.agent.clone())
                .unwrap_or_default()
        );
        std::fs::write(&start, body).map_err(|e| HandlerError::Internal(e.to_string()))?;
        // A step of its own, as real handlers have (terraform init, each node of an upgrade).
        let step = tracing::info_span!("marker_step", job_id = %ctx.job_id);
        let slept = async {
            tokio::select! {
                () = tokio::time::sleep(self.sleep) => Ok(()),
                () = ctx.cancel.cancelled() => Err(HandlerError::Cancelled),
            }
        };
        tracing::Instrument::instrument(slept, step).await?;
        let done = self.dir.join(format!(
            "{}.{}.{}.done",
            ctx.job_id, ctx.attempt, ctx.agent_id
        ));
        std::fs::write(&done, "").map_err(|e| HandlerError::Internal(e.to_string()))?;
        Ok(Outcome::succeeded("markers written"))
    }
}
