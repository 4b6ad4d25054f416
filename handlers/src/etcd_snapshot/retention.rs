//! Which snapshots to keep. An object is kept when any configured rule keeps it; a rule that
//! is absent keeps nothing; the newest good snapshot is always kept. Pure, clock injected.

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, Datelike, Utc};

use super::Retention;

/// One stored snapshot as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub key: String,
    pub at: DateTime<Utc>,
    /// Verified and complete (its manifest exists).
    pub good: bool,
}

/// The keys to delete.
pub fn to_delete(stored: &[Stored], rules: &Retention, now: DateTime<Utc>) -> Vec<String> {
    let mut good: Vec<&Stored> = stored.iter().filter(|s| s.good).collect();
    good.sort_by(|a, b| b.at.cmp(&a.at).then_with(|| b.key.cmp(&a.key)));
    let mut keep: HashSet<&str> = HashSet::new();
    if let Some(newest) = good.first() {
        keep.insert(&newest.key);
    }
    if let Some(n) = rules.keep_last {
        keep.extend(good.iter().take(n as usize).map(|s| s.key.as_str()));
    }
    if let Some(age) = rules.max_age {
        let cutoff = now - chrono::Duration::from_std(age.get()).unwrap_or(chrono::Duration::MAX);
        keep.extend(
            good.iter()
                .filter(|s| s.at >= cutoff)
                .map(|s| s.key.as_str()),
        );
    }
    // Calendar tiers: the newest snapshot of each of the last N periods that have one.
    let mut tier = |n: Option<u32>, period: &dyn Fn(&DateTime<Utc>) -> (i32, u32)| {
        let Some(n) = n else { return };
        let mut seen: BTreeSet<(i32, u32)> = BTreeSet::new();
        for s in &good {
            let p = period(&s.at);
            if seen.contains(&p) {
                continue;
            }
            if seen.len() >= n as usize {
                break;
            }
            seen.insert(p);
            keep.insert(&s.key);
        }
    };
    tier(rules.daily, &|t| (t.year(), t.ordinal()));
    tier(rules.weekly, &|t| {
        (t.iso_week().year(), t.iso_week().week())
    });
    tier(rules.monthly, &|t| (t.year(), t.month()));
    // Incomplete uploads older than the newest good snapshot are debris; newer ones may be an
    // upload in progress elsewhere.
    let newest_good = good.first().map(|s| s.at);
    stored
        .iter()
        .filter(|s| !keep.contains(s.key.as_str()))
        .filter(|s| s.good || newest_good.is_some_and(|n| s.at < n))
        .map(|s| s.key.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::HumanDuration;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    fn snaps(times: &[&str]) -> Vec<Stored> {
        times
            .iter()
            .map(|t| Stored {
                key: t.to_string(),
                at: at(t),
                good: true,
            })
            .collect()
    }

    fn kept(stored: &[Stored], rules: &Retention, now: &str) -> Vec<String> {
        let deleted = to_delete(stored, rules, at(now));
        let mut kept: Vec<String> = stored
            .iter()
            .map(|s| s.key.clone())
            .filter(|k| !deleted.contains(k))
            .collect();
        kept.sort();
        kept
    }

    const NOW: &str = "2026-11-30T12:00:00Z";

    #[test]
    fn no_rule_keeps_only_the_newest_good_snapshot() {
        let s = snaps(&[
            "2026-11-28T03:00:00Z",
            "2026-11-29T03:00:00Z",
            "2026-11-30T03:00:00Z",
        ]);
        assert_eq!(
            kept(&s, &Retention::default(), NOW),
            ["2026-11-30T03:00:00Z"]
        );
    }

    #[test]
    fn keep_last_and_max_age_union() {
        let s = snaps(&[
            "2026-11-01T03:00:00Z",
            "2026-11-20T03:00:00Z",
            "2026-11-28T03:00:00Z",
            "2026-11-29T03:00:00Z",
            "2026-11-30T03:00:00Z",
        ]);
        let rules = Retention {
            keep_last: Some(2),
            ..Default::default()
        };
        assert_eq!(
            kept(&s, &rules, NOW),
            ["2026-11-29T03:00:00Z", "2026-11-30T03:00:00Z"]
        );
        let rules = Retention {
            keep_last: Some(1),
            max_age: Some(HumanDuration::from_secs(3 * 86_400)),
            ..Default::default()
        };
        assert_eq!(
            kept(&s, &rules, NOW),
            [
                "2026-11-28T03:00:00Z",
                "2026-11-29T03:00:00Z",
                "2026-11-30T03:00:00Z"
            ]
        );
    }

    #[test]
    fn calendar_tiers_keep_the_newest_of_each_period() {
        let s = snaps(&[
            "2026-09-15T03:00:00Z",
            "2026-10-30T03:00:00Z",
            "2026-10-31T03:00:00Z",
            "2026-11-16T03:00:00Z", // Monday, ISO week 47
            "2026-11-22T03:00:00Z", // Sunday, ISO week 47
            "2026-11-29T03:00:00Z", // Sunday, ISO week 48
            "2026-11-30T01:00:00Z", // Monday, ISO week 49
            "2026-11-30T03:00:00Z",
        ]);
        let daily = Retention {
            daily: Some(2),
            ..Default::default()
        };
        assert_eq!(
            kept(&s, &daily, NOW),
            ["2026-11-29T03:00:00Z", "2026-11-30T03:00:00Z"]
        );
        let weekly = Retention {
            weekly: Some(3),
            ..Default::default()
        };
        assert_eq!(
            kept(&s, &weekly, NOW),
            [
                "2026-11-22T03:00:00Z",
                "2026-11-29T03:00:00Z",
                "2026-11-30T03:00:00Z"
            ]
        );
        let monthly = Retention {
            monthly: Some(3),
            ..Default::default()
        };
        assert_eq!(
            kept(&s, &monthly, NOW),
            [
                "2026-09-15T03:00:00Z",
                "2026-10-31T03:00:00Z",
                "2026-11-30T03:00:00Z"
            ]
        );
    }

    #[test]
    fn the_newest_good_snapshot_survives_any_rule_and_debris_goes() {
        let mut s = snaps(&["2026-01-01T03:00:00Z", "2026-11-30T03:00:00Z"]);
        s.push(Stored {
            key: "broken-old".into(),
            at: at("2026-11-29T03:00:00Z"),
            good: false,
        });
        s.push(Stored {
            key: "in-progress".into(),
            at: at("2026-11-30T11:00:00Z"),
            good: false,
        });
        let rules = Retention {
            max_age: Some(HumanDuration::from_secs(60)),
            ..Default::default()
        };
        let deleted = to_delete(&s, &rules, at(NOW));
        assert!(
            !deleted.contains(&"2026-11-30T03:00:00Z".to_string()),
            "newest good kept: {deleted:?}"
        );
        assert!(deleted.contains(&"2026-01-01T03:00:00Z".to_string()));
        assert!(deleted.contains(&"broken-old".to_string()));
        assert!(
            !deleted.contains(&"in-progress".to_string()),
            "a newer incomplete upload is left alone"
        );
    }
}
