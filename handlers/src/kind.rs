//! Job kinds. One name per concept: a kind is also its handler module, its config section
//! (with `-` written `_`), its metric label and the `kind` field of every record and event.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    Reconcile,
    Apply,
    Backup,
    EtcdSnapshot,
    RestoreDrill,
    Upgrade,
    Acceptance,
}

impl JobKind {
    pub const ALL: [JobKind; 7] = [
        JobKind::Reconcile,
        JobKind::Apply,
        JobKind::Backup,
        JobKind::EtcdSnapshot,
        JobKind::RestoreDrill,
        JobKind::Upgrade,
        JobKind::Acceptance,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Reconcile => "reconcile",
            JobKind::Apply => "apply",
            JobKind::Backup => "backup",
            JobKind::EtcdSnapshot => "etcd-snapshot",
            JobKind::RestoreDrill => "restore-drill",
            JobKind::Upgrade => "upgrade",
            JobKind::Acceptance => "acceptance",
        }
    }

    /// The config section that enables this kind. `apply` runs saved reconcile plans, so the
    /// `[reconcile]` section enables both.
    pub fn config_section(self) -> &'static str {
        match self {
            JobKind::Reconcile | JobKind::Apply => "reconcile",
            JobKind::Backup => "backup",
            JobKind::EtcdSnapshot => "etcd_snapshot",
            JobKind::RestoreDrill => "restore_drill",
            JobKind::Upgrade => "upgrade",
            JobKind::Acceptance => "acceptance",
        }
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = JobKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown job kind {s:?} (one of {})", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for kind in JobKind::ALL {
            assert_eq!(kind.as_str().parse::<JobKind>(), Ok(kind));
            let json = serde_json::to_string(&kind).expect("serialize");
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            let expected = if kind == JobKind::Apply {
                "reconcile".to_string()
            } else {
                kind.as_str().replace('-', "_")
            };
            assert_eq!(kind.config_section(), expected);
        }
        assert!(
            "nope"
                .parse::<JobKind>()
                .expect_err("an error")
                .contains("etcd-snapshot")
        );
    }
}
