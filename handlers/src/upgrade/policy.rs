//! Which Talos upgrades are allowed: no downgrade, no skipped minor version, and only to a
//! Talos that supports the Kubernetes version the cluster runs (upgrading Kubernetes is not this
//! kind's job). Pure: the rollout asks before anything moves.

use std::cmp::Ordering;
use std::fmt;

/// A Talos version, `v1.13.2` (a pre-release such as `v1.13.0-beta.1` sorts before its release).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TalosVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
    pub pre: Option<String>,
}

impl TalosVersion {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a Talos version (vMAJOR.MINOR.PATCH)");
        let rest = text.trim().strip_prefix('v').unwrap_or(text.trim());
        let (core, pre) = match rest.split_once('-') {
            Some((core, pre)) if !pre.is_empty() => (core, Some(pre.to_string())),
            Some(_) => return Err(bad()),
            None => (rest, None),
        };
        let mut numbers = core.split('.').map(|n| n.parse::<u32>().map_err(|_| bad()));
        let (Some(major), Some(minor), Some(patch), None) = (
            numbers.next(),
            numbers.next(),
            numbers.next(),
            numbers.next(),
        ) else {
            return Err(bad());
        };
        Ok(Self {
            major: major?,
            minor: minor?,
            patch: patch?,
            pre,
        })
    }

    fn minor_line(&self) -> (u32, u32) {
        (self.major, self.minor)
    }
}

impl fmt::Display for TalosVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)?;
        if let Some(pre) = &self.pre {
            write!(f, "-{pre}")?;
        }
        Ok(())
    }
}

impl PartialOrd for TalosVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TalosVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (&self.pre, &other.pre) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => a.cmp(b),
            })
    }
}

/// The Kubernetes minor versions each Talos minor supports, oldest and newest, from Talos's
/// support matrix: <https://www.talos.dev/v1.8/introduction/support-matrix> (1.7, 1.8),
/// <https://www.talos.dev/v1.12/introduction/support-matrix> (1.11, 1.12) and
/// <https://docs.siderolabs.com/talos/v1.13/getting-started/support-matrix> (1.12, 1.13); each
/// page lists its release and the one before. 1.9 and 1.10 follow the same six-version window.
pub const KUBERNETES_SUPPORT: &[Support] = &[
    Support::new((1, 7), (1, 25), (1, 30)),
    Support::new((1, 8), (1, 26), (1, 31)),
    Support::new((1, 9), (1, 27), (1, 32)),
    Support::new((1, 10), (1, 28), (1, 33)),
    Support::new((1, 11), (1, 29), (1, 34)),
    Support::new((1, 12), (1, 30), (1, 35)),
    Support::new((1, 13), (1, 31), (1, 36)),
];

/// A minor version line: (major, minor).
pub type MinorLine = (u32, u32);

/// The Kubernetes versions one Talos minor supports, oldest and newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Support {
    pub talos: MinorLine,
    pub oldest: MinorLine,
    pub newest: MinorLine,
}

impl Support {
    const fn new(talos: MinorLine, oldest: MinorLine, newest: MinorLine) -> Self {
        Self {
            talos,
            oldest,
            newest,
        }
    }
}

/// `v1.33.4` or `1.33` → (1, 33).
pub fn kubernetes_minor(version: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{version:?} is not a Kubernetes version");
    let rest = version.trim().trim_start_matches('v');
    let mut parts = rest.split(['.', '-', '+']);
    let major = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let minor = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    Ok((major, minor))
}

/// A node as the version policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningNode {
    pub name: String,
    pub talos: TalosVersion,
}

/// Why an upgrade to `target` is refused, or `Ok` when every node may go there. Nodes already on
/// `target` are fine (they are skipped).
pub fn check_upgrade(
    nodes: &[RunningNode],
    target: &TalosVersion,
    kubernetes: (u32, u32),
) -> Result<(), String> {
    for node in nodes {
        if node.talos > *target {
            return Err(format!(
                "{} runs Talos {}: {target} would be a downgrade, which this agent never does",
                node.name, node.talos
            ));
        }
        let (major, minor) = node.talos.minor_line();
        if target.major != major || target.minor > minor + 1 {
            return Err(format!(
                "{} runs Talos {}: going to {target} skips a minor version; upgrade to the newest v{major}.{}.x first",
                node.name,
                node.talos,
                minor + 1
            ));
        }
    }
    let Some(Support { oldest, newest, .. }) = KUBERNETES_SUPPORT
        .iter()
        .find(|s| s.talos == target.minor_line())
    else {
        let known: Vec<String> = KUBERNETES_SUPPORT
            .iter()
            .map(|s| format!("{}.{}", s.talos.0, s.talos.1))
            .collect();
        return Err(format!(
            "Talos {target} is not in this agent's support table (Talos {}): the Kubernetes versions it supports are not known; upgrade infraflux-agent first",
            known.join(", ")
        ));
    };
    if kubernetes < *oldest || kubernetes > *newest {
        return Err(format!(
            "Talos {target} supports Kubernetes {}.{} to {}.{}, and the cluster runs {}.{}: upgrade Kubernetes first",
            oldest.0, oldest.1, newest.0, newest.1, kubernetes.0, kubernetes.1
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> TalosVersion {
        TalosVersion::parse(text).expect("version")
    }

    fn node(name: &str, version: &str) -> RunningNode {
        RunningNode {
            name: name.into(),
            talos: v(version),
        }
    }

    #[test]
    fn versions_parse_print_and_order() {
        assert_eq!(v("v1.13.2").to_string(), "v1.13.2");
        assert_eq!(v("1.9.0-beta.1").to_string(), "v1.9.0-beta.1");
        assert!(v("v1.13.0-beta.1") < v("v1.13.0"));
        assert!(v("v1.12.9") < v("v1.13.0"));
        assert!(v("v1.10.0") > v("v1.9.5"));
        for bad in ["", "v1.13", "v1.13.2.1", "vx.1.2", "v1.13.2-"] {
            assert!(TalosVersion::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(kubernetes_minor("v1.33.4"), Ok((1, 33)));
        assert_eq!(kubernetes_minor("1.35.0+k3s1"), Ok((1, 35)));
        assert!(kubernetes_minor("latest").is_err());
    }

    #[test]
    fn what_the_version_policy_allows() {
        let cluster = [node("cp-1", "v1.12.5"), node("w-1", "v1.12.5")];
        // (case, nodes, target, kubernetes, Ok or a word of the refusal)
        let cases = vec![
            (
                "the next minor",
                cluster.to_vec(),
                "v1.13.2",
                (1, 34),
                Ok(()),
            ),
            ("a patch", cluster.to_vec(), "v1.12.7", (1, 34), Ok(())),
            (
                "half done: some nodes already there",
                vec![node("cp-1", "v1.13.2"), node("w-1", "v1.12.5")],
                "v1.13.2",
                (1, 34),
                Ok(()),
            ),
            (
                "a downgrade",
                cluster.to_vec(),
                "v1.12.1",
                (1, 34),
                Err("downgrade"),
            ),
            (
                "a node ahead of the target",
                vec![node("cp-1", "v1.13.0"), node("w-1", "v1.12.5")],
                "v1.12.9",
                (1, 34),
                Err("cp-1"),
            ),
            (
                "a skipped minor",
                cluster.to_vec(),
                "v1.14.0",
                (1, 34),
                Err("skips a minor"),
            ),
            (
                "a lagging node skips one",
                vec![node("cp-1", "v1.12.5"), node("w-1", "v1.11.3")],
                "v1.13.0",
                (1, 34),
                Err("w-1"),
            ),
            (
                "another major",
                cluster.to_vec(),
                "v2.0.0",
                (1, 34),
                Err("skips"),
            ),
            (
                "Kubernetes too old for the target",
                cluster.to_vec(),
                "v1.13.2",
                (1, 30),
                Err("1.31 to 1.36"),
            ),
            (
                "Kubernetes too new for the target",
                vec![node("cp-1", "v1.11.2")],
                "v1.11.5",
                (1, 35),
                Err("upgrade Kubernetes first"),
            ),
            (
                "a target past the table",
                vec![node("cp-1", "v1.13.4")],
                "v1.14.0",
                (1, 35),
                Err("support table"),
            ),
        ];
        for (case, nodes, target, kubernetes, expected) in cases {
            let got = check_upgrade(&nodes, &v(target), kubernetes);
            match (got, expected) {
                (Ok(()), Ok(())) => {}
                (Err(why), Err(word)) => assert!(why.contains(word), "{case}: {why}"),
                (got, expected) => panic!("{case}: got {got:?}, expected {expected:?}"),
            }
        }
    }
}
