//! The wall clock the scheduler reads. Schedules fire by wall time, so a clock that jumps
//! (NTP stepping, a restored VM, a wrong RTC) is a fault they must survive; the clock is a
//! seam so tests can jump it.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;

    /// Waits `duration` of monotonic time, or less when the clock knows it was set meanwhile
    /// (the system clock does not, so the scheduler never sleeps long at once).
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()>;
}

/// This host's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(duration))
    }
}
