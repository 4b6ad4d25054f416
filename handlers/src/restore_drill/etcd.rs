//! The etcd drill: the newest good snapshot from S3, restored with `etcdctl snapshot restore`
//! and read by a throwaway `etcd` on loopback.

use super::{DrillReport, RestoreDrillHandler};
use crate::handler::JobContext;

/// Drills the newest good etcd snapshot.
pub async fn drill(_drill: &RestoreDrillHandler, _ctx: &JobContext) -> DrillReport {
    let mut report = DrillReport::default();
    report.fail("the etcd drill is not built yet");
    report
}
