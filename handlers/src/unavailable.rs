//! The handler of a kind whose implementation has not landed yet. It never pretends to
//! succeed: every job of its kind fails and says why.

use std::time::Duration;

use async_trait::async_trait;

use crate::handler::{Handler, HandlerError, JobContext, Outcome};
use crate::job::JobEnvelope;
use crate::kind::JobKind;

/// The `build` of a kind whose handler has not landed: the registry then fails its jobs with
/// [`HandlerError::NotAvailable`].
pub fn not_yet(
    _: &crate::sections::HandlerConfigs,
    _: &crate::context::Context,
) -> Option<std::sync::Arc<dyn Handler>> {
    None
}

pub struct Unavailable {
    pub kind: JobKind,
}

#[async_trait]
impl Handler for Unavailable {
    fn kind(&self) -> JobKind {
        self.kind
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(60)
    }

    async fn run(&self, _ctx: &JobContext, _job: &JobEnvelope) -> Result<Outcome, HandlerError> {
        Err(HandlerError::NotAvailable(self.kind))
    }
}
