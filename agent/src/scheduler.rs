//! `[[schedules]]`: every agent watches every schedule; each fire is submitted with the key
//! `schedule.<name>.<fire time>`, so N agents give one job.
//!
//! Each schedule has a cursor in the state bucket: when an agent first watched it, and the
//! newest fire any agent submitted. A fire later than the cursor that no agent submitted (all
//! were down) runs once at start if it is within the catch-up window; older missed fires are
//! skipped, never run once per missed period. The same rule covers an agent whose sleep
//! overshot (a suspended host).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use infraflux_handlers::command::{self, Request};
use infraflux_handlers::{JobEnvelope, Source, new_job_id};
use infraflux_schedules::CronSchedule;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::app::App;
use crate::clock::Clock;
use crate::config::ScheduleSection;
use crate::telemetry;

/// Longest single sleep: wall-clock jumps and DST changes are noticed within this.
const MAX_SLEEP: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cursor {
    pub watched_since: DateTime<Utc>,
    #[serde(default)]
    pub last_fired: Option<DateTime<Utc>>,
}

/// Runs every schedule until `shutdown` fires: one task for all of them (a lab may have a
/// thousand), each remembering when it next needs a look.
pub async fn run(app: Arc<App>, clock: Arc<dyn Clock>, shutdown: CancellationToken) {
    // A fire due before this agent started watching was missed while no agent ran.
    let watching_since = clock.now();
    let mut watches = Vec::with_capacity(app.config.schedules.len());
    for section in app.config.schedules.clone() {
        let schedule = match app.config.parse_schedule(&section) {
            Ok(s) => s,
            Err(e) => {
                // check-config refuses this; reaching here means the config changed under us.
                tracing::error!(schedule = %section.name, error = %e, "Schedule skipped");
                continue;
            }
        };
        let Some(cursor) = load_cursor(&app, &*clock, schedule.name(), &shutdown).await else {
            return;
        };
        watches.push(Watch {
            handled: cursor
                .last_fired
                .map_or(cursor.watched_since, |l| l.max(cursor.watched_since)),
            look_at: Some(watching_since),
            schedule: Arc::new(schedule),
            section: Arc::new(section),
        });
    }
    // The config's parse and the cursors' loads are the start's largest temporaries.
    crate::allocator::give_back_freed();
    let mut fires = tokio::task::JoinSet::new();
    let mut last_now = clock.now();
    let mut next_full_look = last_now;
    loop {
        while fires.try_join_next().is_some() {}
        let now = clock.now();
        // Every MAX_SLEEP, and after the wall clock went back, every schedule is looked at
        // again, so a clock jump or a DST change is noticed.
        let full = now >= next_full_look || now < last_now;
        if full {
            next_full_look = now + chrono::Duration::from_std(MAX_SLEEP).unwrap_or_default();
        }
        last_now = now;
        for watch in &mut watches {
            if !full && watch.look_at.is_none_or(|at| at > now) {
                continue;
            }
            while let Some((at, missed)) = watch.step(now, watching_since) {
                fires.spawn(fire(
                    app.clone(),
                    watch.schedule.clone(),
                    watch.section.clone(),
                    at,
                    missed,
                    clock.clone(),
                    shutdown.clone(),
                ));
            }
        }
        let wake = watches
            .iter()
            .filter_map(|w| w.look_at)
            .fold(next_full_look, DateTime::min);
        if !sleep_until(&*clock, wake, &shutdown).await {
            break;
        }
    }
    while fires.join_next().await.is_some() {}
}

struct Watch {
    schedule: Arc<CronSchedule>,
    section: Arc<ScheduleSection>,
    /// The newest fire submitted or skipped.
    handled: DateTime<Utc>,
    /// When this schedule next needs a look; `None` when it has no more fires.
    look_at: Option<DateTime<Utc>>,
}

impl Watch {
    /// The next fire to submit now (its time, and whether it was missed while no agent ran),
    /// or `None` after setting when to look again.
    fn step(
        &mut self,
        now: DateTime<Utc>,
        watching_since: DateTime<Utc>,
    ) -> Option<(DateTime<Utc>, bool)> {
        let schedule = &self.schedule;
        while let Some(latest) = schedule
            .latest_at_or_before(now)
            .filter(|f| *f > self.handled)
        {
            // Jitter delays the submission, not the fire's identity (the dedup key).
            let due = latest
                + chrono::Duration::from_std(schedule.jitter_for(latest)).unwrap_or_default();
            if now < due {
                self.look_at = Some(due);
                return None;
            }
            let in_window = schedule.catch_up(now, self.handled, None).is_some();
            self.handled = latest;
            if in_window {
                return Some((latest, latest < watching_since));
            }
            tracing::warn!(
                schedule = %schedule.name(),
                fire = %latest.to_rfc3339(),
                "Missed fire is older than the catch-up window; skipped"
            );
        }
        let next = schedule.next_after(now);
        if next.is_none() && self.look_at.is_some() {
            tracing::info!(schedule = %schedule.name(), "Schedule has no more fires");
        }
        self.look_at = next;
        None
    }
}

fn cursor_key(name: &str) -> String {
    format!("schedule.{name}")
}

/// Sleeps until `at` (at most [`MAX_SLEEP`] at once); `false` if shut down meanwhile.
async fn sleep_until(clock: &dyn Clock, at: DateTime<Utc>, shutdown: &CancellationToken) -> bool {
    let wait = (at - clock.now())
        .to_std()
        .unwrap_or_default()
        .min(MAX_SLEEP);
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = clock.sleep(wait) => true,
    }
}

async fn load_cursor(
    app: &App,
    clock: &dyn Clock,
    name: &str,
    shutdown: &CancellationToken,
) -> Option<Cursor> {
    let key = cursor_key(name);
    let mut backoff = Duration::from_millis(500);
    loop {
        let fresh = Cursor {
            watched_since: clock.now(),
            last_fired: None,
        };
        match app
            .store
            .state
            .create(
                &key,
                Bytes::from(serde_json::to_vec(&fresh).unwrap_or_default()),
            )
            .await
        {
            Ok(_) => return Some(fresh),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match app.store.state.get(&key).await {
                    Ok(Some(bytes)) => {
                        if let Ok(cursor) = serde_json::from_slice::<Cursor>(&bytes) {
                            return Some(cursor);
                        }
                        tracing::warn!(schedule = %name, "Unreadable schedule cursor replaced");
                        let _ = app.store.state.delete(&key).await;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(schedule = %name, error = %e, "Schedule cursor unavailable")
                    }
                }
            }
            Err(e) => tracing::warn!(schedule = %name, error = %e, "Schedule cursor unavailable"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Submits one fire, retrying while the store is unreachable (but not past the next fire).
async fn fire(
    app: Arc<App>,
    schedule: Arc<CronSchedule>,
    section: Arc<ScheduleSection>,
    at: DateTime<Utc>,
    missed: bool,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) {
    let (kind, mut params) = match command::parse(&section.command) {
        Ok(Request::Submit { kind, params }) => (kind, params),
        other => {
            tracing::error!(schedule = %schedule.name(), result = ?other, "Schedule command does not start a job");
            return;
        }
    };
    params.insert("schedule".into(), json!(schedule.name()));
    params.insert("fire_time".into(), json!(at.to_rfc3339()));
    if missed {
        params.insert("catch_up".into(), json!(true));
    }
    let span =
        tracing::info_span!("schedule", schedule = %schedule.name(), fire = %at.to_rfc3339());
    let envelope = JobEnvelope {
        job_id: new_job_id(),
        kind,
        params,
        source: Source::Schedule,
        requested_by: format!("schedule:{}", schedule.name()),
        idempotency_key: schedule.fire_key(at),
        traceparent: Some(span.in_scope(telemetry::current_traceparent)),
        commit: None,
        created_at: Utc::now(),
    };
    let give_up = schedule
        .next_after(at)
        .unwrap_or(at + chrono::Duration::hours(1));
    let mut backoff = Duration::from_millis(500);
    loop {
        match app
            .ingest
            .submit(envelope.clone())
            .instrument(span.clone())
            .await
        {
            Ok(submitted) => {
                tracing::info!(schedule = %schedule.name(), job_id = %submitted.job_id(), catch_up = missed, "Schedule fired");
                advance_cursor(&app, schedule.name(), at).await;
                return;
            }
            Err(e) if clock.now() < give_up => {
                tracing::warn!(schedule = %schedule.name(), error = %e, "Schedule fire not stored yet; retrying");
            }
            Err(e) => {
                tracing::error!(schedule = %schedule.name(), error = %e, "Schedule fire lost: the store was unreachable until the next fire");
                return;
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

async fn advance_cursor(app: &App, name: &str, fired: DateTime<Utc>) {
    let key = cursor_key(name);
    for _ in 0..10 {
        let Ok(Some(entry)) = app.store.state.entry(&key).await else {
            return;
        };
        let Ok(mut cursor) = serde_json::from_slice::<Cursor>(&entry.value) else {
            return;
        };
        if cursor.last_fired.is_some_and(|l| l >= fired) {
            return;
        }
        cursor.last_fired = Some(fired);
        let value = Bytes::from(serde_json::to_vec(&cursor).unwrap_or_default());
        match app.store.state.update(&key, value, entry.revision).await {
            Ok(_) => return,
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => {
                tracing::warn!(schedule = %name, error = %e, "Schedule cursor not advanced");
                return;
            }
        }
    }
}
