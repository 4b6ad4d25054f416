//! Job kinds. One name per concept: a kind is also its handler module, its config section
//! (with `-` written `_`), its metric label and the `kind` field of every record and event.
//!
//! A kind is a name declared by its module's [`crate::descriptor::KindDescriptor`]; the list
//! of descriptors ([`crate::KINDS`]) is the list of kinds, so a new kind is one
//! module plus one line there.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobKind(&'static str);

impl JobKind {
    /// For a kind module's `KIND` constant; its descriptor is listed in [`crate::KINDS`].
    pub const fn named(name: &'static str) -> Self {
        Self(name)
    }

    // Names the agent's core and tests refer to; a kind's module uses its own as its `KIND`.
    pub const RECONCILE: JobKind = JobKind("reconcile");
    pub const APPLY: JobKind = JobKind("apply");
    pub const BACKUP: JobKind = JobKind("backup");
    pub const ETCD_SNAPSHOT: JobKind = JobKind("etcd-snapshot");
    pub const RESTORE_DRILL: JobKind = JobKind("restore-drill");
    pub const UPGRADE: JobKind = JobKind("upgrade");
    pub const ACCEPTANCE: JobKind = JobKind("acceptance");
    pub const PREFLIGHT: JobKind = JobKind("preflight");

    /// Every kind, in the order of [`crate::KINDS`].
    pub fn all() -> impl Iterator<Item = JobKind> {
        crate::KINDS.iter().map(|d| d.kind)
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }

    /// The config section that enables this kind. `apply` runs saved reconcile plans, so the
    /// `[reconcile]` section enables both.
    pub fn config_section(self) -> &'static str {
        crate::KINDS
            .iter()
            .find(|d| d.kind == self)
            .map_or(self.0, |d| d.config.name)
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobKind({})", self.0)
    }
}

impl FromStr for JobKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobKind::all().find(|k| k.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = JobKind::all().map(JobKind::as_str).collect();
            format!("unknown job kind {s:?} (one of {})", names.join(", "))
        })
    }
}

impl Serialize for JobKind {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for JobKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        assert!(JobKind::all().count() >= 7);
        for kind in JobKind::all() {
            assert_eq!(kind.as_str().parse::<JobKind>(), Ok(kind));
            let json = serde_json::to_string(&kind).expect("serialize");
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            assert_eq!(serde_json::from_str::<JobKind>(&json).expect("back"), kind);
            let expected = if kind == JobKind::APPLY {
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
        assert!(serde_json::from_str::<JobKind>("\"nope\"").is_err());
    }
}
