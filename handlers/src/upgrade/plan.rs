//! The rollout order: control planes one at a time, then one canary worker (and `soak`), then
//! the other workers `max_parallel` at a time. Nodes already on the target are skipped. Pure:
//! the job reads the nodes, asks for the plan, records it in its first event and its result.

use serde::{Deserialize, Serialize};

use super::policy::TalosVersion;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[serde(rename = "controlplane")]
    ControlPlane,
    Worker,
}

/// A node as the Kubernetes API and Talos describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    pub role: Role,
    /// Where Talos answers for it: the Node's `InternalIP`.
    pub address: String,
    pub talos: TalosVersion,
}

/// One node of the plan, in rollout order, as the result lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedNode {
    pub name: String,
    pub role: Role,
    pub from: String,
    pub to: String,
    /// `pending` or `skipped` in the plan; `done` or `halted` as the rollout goes.
    pub state: String,
    pub message: String,
}

/// The plan: every node in order, and the batches that move together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    pub nodes: Vec<PlannedNode>,
    /// Names, batch by batch: each control plane alone, the canary alone, then the rest.
    pub batches: Vec<Vec<String>>,
    /// The batch after which the rollout soaks: the canary worker's.
    pub soak_after: Option<usize>,
}

/// The rollout of `target` over `nodes`, or over `only` of them when the job names nodes.
pub fn plan(
    nodes: &[ClusterNode],
    target: &TalosVersion,
    only: Option<&[String]>,
    max_parallel: usize,
) -> Result<Rollout, String> {
    if let Some(only) = only {
        let unknown: Vec<&str> = only
            .iter()
            .filter(|n| !nodes.iter().any(|node| &node.name == *n))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "no such node(s) in the cluster: {}",
                unknown.join(", ")
            ));
        }
    }
    let chosen = |node: &&ClusterNode| only.is_none_or(|o| o.contains(&node.name));
    let mut control_planes: Vec<&ClusterNode> = nodes
        .iter()
        .filter(chosen)
        .filter(|n| n.role == Role::ControlPlane)
        .collect();
    let mut workers: Vec<&ClusterNode> = nodes
        .iter()
        .filter(chosen)
        .filter(|n| n.role == Role::Worker)
        .collect();
    control_planes.sort_by(|a, b| a.name.cmp(&b.name));
    workers.sort_by(|a, b| a.name.cmp(&b.name));
    let to = target.to_string();
    let planned = |n: &ClusterNode| {
        let skipped = n.talos == *target;
        PlannedNode {
            name: n.name.clone(),
            role: n.role,
            from: n.talos.to_string(),
            to: to.clone(),
            state: if skipped { "skipped" } else { "pending" }.into(),
            message: if skipped {
                format!("already on {to}")
            } else {
                String::new()
            },
        }
    };
    let mut rollout = Rollout {
        nodes: Vec::new(),
        batches: Vec::new(),
        soak_after: None,
    };
    for cp in &control_planes {
        let p = planned(cp);
        if p.state == "pending" {
            rollout.batches.push(vec![p.name.clone()]);
        }
        rollout.nodes.push(p);
    }
    let mut pending_workers = Vec::new();
    for w in &workers {
        let p = planned(w);
        if p.state == "pending" {
            pending_workers.push(p.name.clone());
        }
        rollout.nodes.push(p);
    }
    let mut rest = pending_workers.into_iter();
    if let Some(canary) = rest.next() {
        rollout.batches.push(vec![canary]);
        rollout.soak_after = Some(rollout.batches.len() - 1);
    }
    let rest: Vec<String> = rest.collect();
    for chunk in rest.chunks(max_parallel.max(1)) {
        rollout.batches.push(chunk.to_vec());
    }
    Ok(rollout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, role: Role, version: &str) -> ClusterNode {
        ClusterNode {
            name: name.into(),
            role,
            address: format!("10.0.0.{}", name.len()),
            talos: TalosVersion::parse(version).expect("version"),
        }
    }

    fn lab() -> Vec<ClusterNode> {
        vec![
            node("w-3", Role::Worker, "v1.12.5"),
            node("cp-2", Role::ControlPlane, "v1.12.5"),
            node("w-1", Role::Worker, "v1.12.5"),
            node("cp-1", Role::ControlPlane, "v1.12.5"),
            node("w-2", Role::Worker, "v1.12.5"),
            node("cp-3", Role::ControlPlane, "v1.13.2"),
        ]
    }

    #[test]
    fn control_planes_one_at_a_time_then_a_canary_then_the_rest() {
        let target = TalosVersion::parse("v1.13.2").expect("target");
        let rollout = plan(&lab(), &target, None, 2).expect("plan");
        let order: Vec<(&str, &str)> = rollout
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.state.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("cp-1", "pending"),
                ("cp-2", "pending"),
                ("cp-3", "skipped"),
                ("w-1", "pending"),
                ("w-2", "pending"),
                ("w-3", "pending")
            ]
        );
        assert_eq!(
            rollout.batches,
            [vec!["cp-1"], vec!["cp-2"], vec!["w-1"], vec!["w-2", "w-3"]]
        );
        assert_eq!(rollout.soak_after, Some(2));
        assert_eq!(rollout.nodes[2].message, "already on v1.13.2");
        // One at a time when max_parallel is 1 (or 0, read as 1).
        let one = plan(&lab(), &target, None, 0).expect("plan");
        assert_eq!(one.batches.len(), 5);
    }

    #[test]
    fn named_nodes_only_and_unknown_names_refused() {
        let target = TalosVersion::parse("v1.13.2").expect("target");
        let only = vec!["w-2".to_string(), "cp-2".to_string()];
        let rollout = plan(&lab(), &target, Some(&only), 1).expect("plan");
        assert_eq!(rollout.batches, [vec!["cp-2"], vec!["w-2"]]);
        assert_eq!(rollout.nodes.len(), 2);
        let wrong = vec!["w-9".to_string()];
        let err = plan(&lab(), &target, Some(&wrong), 1).expect_err("unknown");
        assert!(err.contains("w-9"), "{err}");
        // Everything already there: nothing to move.
        let done = plan(
            &lab(),
            &TalosVersion::parse("v1.12.5").expect("v"),
            Some(&only),
            1,
        )
        .expect("plan");
        assert!(done.batches.is_empty() && done.soak_after.is_none());
    }
}
