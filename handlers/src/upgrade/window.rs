//! The maintenance window: `{ cron, duration, timezone }`. The window opens at each fire of the
//! cron expression (in its time zone, DST included) and stays open `duration`. Outside it an
//! upgrade waits, holding nothing, until it opens. Pure: the clock is passed in.

use chrono::{DateTime, Utc};
use infraflux_schedules::CronSchedule;
use serde::Deserialize;

use crate::settings::HumanDuration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub cron: String,
    pub duration: HumanDuration,
    #[serde(default = "default_timezone")]
    pub timezone: String,
}

fn default_timezone() -> String {
    "UTC".to_string()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WindowState {
    Open { closes_at: DateTime<Utc> },
    Closed { opens_at: DateTime<Utc> },
}

impl Window {
    fn schedule(&self) -> Result<CronSchedule, String> {
        CronSchedule::new(
            "upgrade.window",
            &self.cron,
            &self.timezone,
            std::time::Duration::ZERO,
            None,
        )
        .map_err(|e| format!("upgrade.window: {e}"))
    }

    /// Checks the window's cron expression and time zone (for `check-config`).
    pub fn validate(&self) -> Result<(), String> {
        self.schedule().map(|_| ())
    }

    /// Whether the window is open at `now`: open from a fire for `duration`.
    pub fn state_at(&self, now: DateTime<Utc>) -> Result<WindowState, String> {
        let schedule = self.schedule()?;
        let length = chrono::Duration::from_std(self.duration.get())
            .map_err(|e| format!("upgrade.window.duration: {e}"))?;
        if let Some(opened) = schedule.latest_at_or_before(now)
            && now < opened + length
        {
            return Ok(WindowState::Open {
                closes_at: opened + length,
            });
        }
        schedule
            .next_after(now)
            .map(|opens_at| WindowState::Closed { opens_at })
            .ok_or_else(|| format!("upgrade.window: {:?} never fires again", self.cron))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn saturday_night_in_berlin_is_open_for_four_hours() {
        let window = Window {
            cron: "0 0 2 * * Sat".into(),
            duration: HumanDuration::from_secs(4 * 3600),
            timezone: "Europe/Berlin".into(),
        };
        // 2026-12-05 is a Saturday; Berlin is UTC+1 in winter: 02:00 local is 01:00 UTC.
        let cases = [
            (
                "2026-12-05T00:59:59Z",
                WindowState::Closed {
                    opens_at: at("2026-12-05T01:00:00Z"),
                },
            ),
            (
                "2026-12-05T01:00:00Z",
                WindowState::Open {
                    closes_at: at("2026-12-05T05:00:00Z"),
                },
            ),
            (
                "2026-12-05T04:59:59Z",
                WindowState::Open {
                    closes_at: at("2026-12-05T05:00:00Z"),
                },
            ),
            (
                "2026-12-05T05:00:00Z",
                WindowState::Closed {
                    opens_at: at("2026-12-12T01:00:00Z"),
                },
            ),
            // Summer time: 02:00 local is 00:00 UTC.
            (
                "2026-07-04T00:30:00Z",
                WindowState::Open {
                    closes_at: at("2026-07-04T04:00:00Z"),
                },
            ),
        ];
        for (now, expected) in cases {
            assert_eq!(window.state_at(at(now)), Ok(expected), "{now}");
        }
        let bad = Window {
            cron: "0 2 * * Sat".into(),
            ..window
        };
        assert!(
            bad.validate()
                .expect_err("five fields")
                .contains("6 fields")
        );
    }
}
