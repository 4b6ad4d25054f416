//! A wall clock a test can set: it runs at real speed from wherever it was last set, and wakes
//! sleepers when it is set, as the scheduler would notice a real jump within its longest sleep.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use infraflux_agent::clock::Clock;
use tokio::sync::watch;

pub struct JumpClock {
    offset_ms: AtomicI64,
    set: watch::Sender<u64>,
}

impl JumpClock {
    /// A clock that reads `at` now.
    pub fn reading(at: DateTime<Utc>) -> Arc<Self> {
        let clock = Arc::new(Self {
            offset_ms: AtomicI64::new(0),
            set: watch::channel(0).0,
        });
        clock.set_to(at);
        clock
    }

    /// Sets the clock to read `at` now.
    pub fn set_to(&self, at: DateTime<Utc>) {
        self.offset_ms
            .store((at - Utc::now()).num_milliseconds(), Ordering::SeqCst);
        self.set.send_modify(|n| *n += 1);
    }
}

impl Clock for JumpClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::milliseconds(self.offset_ms.load(Ordering::SeqCst))
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        let mut set = self.set.subscribe();
        Box::pin(async move {
            tokio::select! {
                () = tokio::time::sleep(duration) => {}
                _ = set.changed() => {}
            }
        })
    }
}
