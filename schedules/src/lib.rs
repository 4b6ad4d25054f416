//! Cron schedules: parse, next fire in a time zone, catch-up decision.
//!
//! Everything here is pure: the caller passes "now". The agent's scheduler task does the
//! sleeping and the NATS writes; this crate only answers "when" and "whether".

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;

/// Why a schedule could not be built. Each variant names the offending value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error(
        "invalid cron expression {expr:?}: {reason} (six fields, seconds first: \"0 0 3 * * *\")"
    )]
    Cron { expr: String, reason: String },
    #[error("unknown time zone {0:?} (use an IANA name such as \"Europe/Berlin\" or \"UTC\")")]
    TimeZone(String),
    #[error("cron expression {0:?} never fires")]
    NeverFires(String),
}

/// One `[[schedules]]` entry in parsed form.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    name: String,
    schedule: cron::Schedule,
    timezone: Tz,
    jitter: Duration,
    catch_up: Option<Duration>,
}

impl CronSchedule {
    /// Parses a six-field (seconds first) cron expression in an IANA time zone.
    pub fn new(
        name: &str,
        cron_expr: &str,
        timezone: &str,
        jitter: Duration,
        catch_up: Option<Duration>,
    ) -> Result<Self, ScheduleError> {
        let fields = cron_expr.split_whitespace().count();
        // The cron crate also accepts a seventh (year) field; we document six and hold to it so
        // that "0 3 * * *" (five fields, a common slip) is refused instead of misread.
        if fields != 6 {
            return Err(ScheduleError::Cron {
                expr: cron_expr.to_string(),
                reason: format!("expected 6 fields, found {fields}"),
            });
        }
        let schedule = cron::Schedule::from_str(cron_expr).map_err(|e| ScheduleError::Cron {
            expr: cron_expr.to_string(),
            reason: e.to_string(),
        })?;
        let timezone =
            Tz::from_str(timezone).map_err(|_| ScheduleError::TimeZone(timezone.to_string()))?;
        let parsed = Self {
            name: name.to_string(),
            schedule,
            timezone,
            jitter,
            catch_up,
        };
        if parsed.next_after(Utc::now()).is_none() {
            return Err(ScheduleError::NeverFires(cron_expr.to_string()));
        }
        Ok(parsed)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn timezone(&self) -> Tz {
        self.timezone
    }

    /// The first fire strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.timezone);
        self.schedule
            .after(&local)
            .next()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The next `n` fires after `t`, in the schedule's own time zone.
    pub fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Tz>> {
        let local = t.with_timezone(&self.timezone);
        self.schedule.after(&local).take(n).collect()
    }

    /// The latest fire at or before `t`.
    pub fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // `after(x).next_back()` yields the last fire strictly before x, so step one second on:
        // fires are whole seconds, and a fire exactly at `t` counts as "at or before".
        let local = (t + chrono::Duration::seconds(1)).with_timezone(&self.timezone);
        self.schedule
            .after(&local)
            .next_back()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The gap between `fire` and the fire before it: "one period" at that point of the
    /// schedule. Irregular schedules (weekdays only, DST) have a period that varies.
    pub fn period_before(&self, fire: DateTime<Utc>) -> Option<Duration> {
        let before = self.latest_at_or_before(fire - chrono::Duration::seconds(1))?;
        (fire - before).to_std().ok()
    }

    /// How late a missed fire may still run: the configured `catch_up`, else one period.
    pub fn catch_up_window(&self, fire: DateTime<Utc>) -> Duration {
        self.catch_up
            .or_else(|| self.period_before(fire))
            .unwrap_or(Duration::ZERO)
    }

    /// Decides, at agent start, whether a fire was missed while no agent ran.
    ///
    /// `watched_since` is when any agent first watched this schedule (a brand-new schedule
    /// missed nothing); `last_fired` is the newest fire any agent recorded. Only the latest
    /// missed fire may run, and only if it is within the catch-up window: never once per
    /// missed period.
    pub fn catch_up(
        &self,
        now: DateTime<Utc>,
        watched_since: DateTime<Utc>,
        last_fired: Option<DateTime<Utc>>,
    ) -> Option<DateTime<Utc>> {
        let latest = self.latest_at_or_before(now)?;
        let horizon = last_fired.map_or(watched_since, |l| l.max(watched_since));
        if latest <= horizon {
            return None;
        }
        let late = (now - latest).to_std().unwrap_or(Duration::ZERO);
        (late <= self.catch_up_window(latest)).then_some(latest)
    }

    /// A delay in `[0, jitter]` that is the same for every agent for a given fire, so that all
    /// agents race for the same fire at the same moment and the dedup key decides.
    pub fn jitter_for(&self, fire: DateTime<Utc>) -> Duration {
        let max_ms = u64::try_from(self.jitter.as_millis()).unwrap_or(u64::MAX);
        if max_ms == 0 {
            return Duration::ZERO;
        }
        // FNV-1a: stable across processes and versions, unlike std's RandomState.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.name.bytes().chain(fire.timestamp().to_be_bytes()) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        Duration::from_millis(hash % (max_ms + 1))
    }

    /// The idempotency key of one fire: every agent computes the same key, so N agents give one job.
    pub fn fire_key(&self, fire: DateTime<Utc>) -> String {
        format!("schedule.{}.{}", self.name, fire.timestamp())
    }
}

/// Formats a fire time for humans in the schedule's zone, with the offset (DST is visible).
pub fn format_fire(t: &DateTime<Tz>) -> String {
    format!(
        "{} ({})",
        t.format("%Y-%m-%d %H:%M:%S %:z"),
        t.timezone().name()
    )
}

/// Parses an RFC 3339 instant; a helper for tests and the CLI.
pub fn parse_instant(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

/// Builds a UTC instant from a wall-clock time in a zone (test helper, also used by docs).
pub fn local_instant(
    tz: Tz,
    y: i32,
    mo: u32,
    d: u32,
    h: u32,
    mi: u32,
    s: u32,
) -> Option<DateTime<Utc>> {
    tz.with_ymd_and_hms(y, mo, d, h, mi, s)
        .single()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        parse_instant(s).expect("valid instant")
    }

    fn nightly() -> CronSchedule {
        CronSchedule::new(
            "nightly",
            "0 0 3 * * *",
            "Europe/Berlin",
            Duration::ZERO,
            None,
        )
        .expect("valid schedule")
    }

    #[test]
    fn refuses_five_fields_bad_zone_and_bad_expressions() {
        let e =
            CronSchedule::new("x", "0 3 * * *", "UTC", Duration::ZERO, None).expect_err("an error");
        assert!(matches!(e, ScheduleError::Cron { .. }), "{e}");
        assert!(e.to_string().contains("expected 6 fields, found 5"));
        let e = CronSchedule::new("x", "0 0 3 * * *", "Mars/Olympus", Duration::ZERO, None)
            .expect_err("an error");
        assert_eq!(e, ScheduleError::TimeZone("Mars/Olympus".into()));
        let e = CronSchedule::new("x", "0 0 25 * * *", "UTC", Duration::ZERO, None)
            .expect_err("an error");
        assert!(e.to_string().contains("0 0 25 * * *"), "{e}");
    }

    #[test]
    fn next_fire_follows_the_zone_across_dst() {
        let s = nightly();
        // Berlin is UTC+1 in winter: 03:00 local is 02:00 UTC.
        assert_eq!(
            s.next_after(utc("2026-01-10T12:00:00Z")),
            Some(utc("2026-01-11T02:00:00Z"))
        );
        // and UTC+2 in summer.
        assert_eq!(
            s.next_after(utc("2026-07-10T12:00:00Z")),
            Some(utc("2026-07-11T01:00:00Z"))
        );
        // On the night clocks go forward (2026-03-29, 02:00 -> 03:00), 03:00 exists once.
        let fires = s.upcoming(utc("2026-03-28T12:00:00Z"), 2);
        assert_eq!(fires[0].with_timezone(&Utc), utc("2026-03-29T01:00:00Z"));
        assert_eq!(fires[1].with_timezone(&Utc), utc("2026-03-30T01:00:00Z"));
    }

    #[test]
    fn latest_at_or_before_includes_an_exact_fire() {
        let s = nightly();
        let fire = utc("2026-01-11T02:00:00Z");
        assert_eq!(s.latest_at_or_before(fire), Some(fire));
        assert_eq!(
            s.latest_at_or_before(fire - chrono::Duration::seconds(1)),
            Some(utc("2026-01-10T02:00:00Z"))
        );
    }

    #[test]
    fn period_is_the_gap_to_the_previous_fire() {
        let s = CronSchedule::new("w", "0 0 9 * * Mon-Fri", "UTC", Duration::ZERO, None)
            .expect("valid");
        // Monday 2026-01-12: the previous fire was Friday, three days earlier.
        assert_eq!(
            s.period_before(utc("2026-01-12T09:00:00Z")),
            Some(Duration::from_secs(3 * 86_400))
        );
        assert_eq!(
            s.period_before(utc("2026-01-13T09:00:00Z")),
            Some(Duration::from_secs(86_400))
        );
    }

    #[test]
    fn catch_up_table() {
        let s = nightly();
        let watched = utc("2026-01-01T00:00:00Z");
        let fire = utc("2026-01-11T02:00:00Z");
        type Case<'a> = (&'a str, Option<&'a str>, Option<DateTime<Utc>>);
        let cases: &[Case] = &[
            // Down over the 03:00 fire, back an hour later: runs that fire once.
            (
                "2026-01-11T03:00:00Z",
                Some("2026-01-10T02:00:00Z"),
                Some(fire),
            ),
            // Already fired by some agent: nothing.
            ("2026-01-11T03:00:00Z", Some("2026-01-11T02:00:00Z"), None),
            // Down for three days: only the latest missed fire, within one period.
            (
                "2026-01-13T05:00:00Z",
                Some("2026-01-10T02:00:00Z"),
                Some(utc("2026-01-13T02:00:00Z")),
            ),
            // Latest missed fire more than a period ago is impossible for a regular schedule;
            // but with nothing ever fired and watched before: the latest fire is due.
            ("2026-01-11T03:00:00Z", None, Some(fire)),
        ];
        for (now, last, want) in cases {
            let got = s.catch_up(utc(now), watched, last.map(utc));
            assert_eq!(got, *want, "now={now} last={last:?}");
        }
        // A schedule first watched after its latest fire missed nothing.
        assert_eq!(
            s.catch_up(
                utc("2026-01-11T03:00:00Z"),
                utc("2026-01-11T02:30:00Z"),
                None
            ),
            None
        );
    }

    #[test]
    fn catch_up_window_is_configurable() {
        let s = CronSchedule::new(
            "nightly",
            "0 0 3 * * *",
            "Europe/Berlin",
            Duration::ZERO,
            Some(Duration::from_secs(3600)),
        )
        .expect("valid");
        let watched = utc("2026-01-01T00:00:00Z");
        let last = Some(utc("2026-01-10T02:00:00Z"));
        // 59 minutes late: runs. Two hours late: skipped until the next regular fire.
        assert!(
            s.catch_up(utc("2026-01-11T02:59:00Z"), watched, last)
                .is_some()
        );
        assert!(
            s.catch_up(utc("2026-01-11T04:00:00Z"), watched, last)
                .is_none()
        );
    }

    #[test]
    fn jitter_is_bounded_and_the_same_for_every_caller() {
        let s = CronSchedule::new(
            "nightly",
            "0 0 3 * * *",
            "UTC",
            Duration::from_secs(300),
            None,
        )
        .expect("valid");
        let fire = utc("2026-01-11T03:00:00Z");
        let a = s.jitter_for(fire);
        assert_eq!(a, s.clone().jitter_for(fire));
        assert!(a <= Duration::from_secs(300));
        let spread: std::collections::HashSet<_> = (0..20)
            .map(|d| s.jitter_for(fire + chrono::Duration::days(d)))
            .collect();
        assert!(spread.len() > 10, "jitter should vary between fires");
        assert_eq!(nightly().jitter_for(fire), Duration::ZERO);
    }

    #[test]
    fn fire_key_names_schedule_and_instant() {
        let s = nightly();
        let fire = utc("2026-01-11T02:00:00Z");
        assert_eq!(
            s.fire_key(fire),
            format!("schedule.nightly.{}", fire.timestamp())
        );
    }
}
