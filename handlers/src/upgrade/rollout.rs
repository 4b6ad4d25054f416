//! The `upgrade` job: gates, then node after node (cordon, drain, upgrade, back on the new
//! version and Ready, etcd and the kube-proxy guard, uncordon, the root app Healthy), halting at
//! the first failure with the node left cordoned. Progress is checkpointed per node and step, so
//! an attempt after an agent restart resumes where the last one stopped.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::UpgradeHandler;
use super::kube::{self as nodes_api, Cordon, Evictor, NodeView};
use super::plan::{self, ClusterNode, PlannedNode, Role};
use super::policy::{self, RunningNode, TalosVersion};
use super::talos::{self as talos_api, UpgradeApi};
use crate::etcd_snapshot::{self, EtcdSnapshotHandler};
use crate::handler::{HandlerError, JobContext, Outcome, TargetResult};
use crate::job::JobEnvelope;
use crate::reconcile::argocd;
use crate::talos::TalosClient;

/// How often a gate that waits (etcd after a reboot, the root app) asks again.
const POLL: Duration = Duration::from_secs(1);

/// How far one node got; saved before each step that changes the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Cordoned,
    Drained,
    /// The upgrade was asked for: a resumed attempt waits for the node instead of asking again
    /// while it is away.
    UpgradeSent,
}

/// Who overrode the window, and why: the record and the events keep it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forced {
    pub reason: String,
    pub by: String,
}

/// The rollout's state: the plan, what each node reached, and what this job cordoned. It is the
/// job's checkpoint (so `job <id>` shows the plan while it runs) and, at the end, its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    pub version: String,
    pub image: String,
    pub snapshot: Option<String>,
    pub halted_at: Option<String>,
    pub nodes: Vec<PlannedNode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<Forced>,
    pub batches: Vec<Vec<String>>,
    pub soak_after: Option<usize>,
    #[serde(default)]
    pub soaked: bool,
    /// Per node in progress: the last step reached.
    #[serde(default)]
    pub steps: BTreeMap<String, Step>,
    /// Nodes this job cordoned (or took over from an earlier upgrade job): only these are
    /// uncordoned.
    #[serde(default)]
    pub cordoned: BTreeSet<String>,
    /// The gates before anything moves passed.
    #[serde(default)]
    pub gates_passed: bool,
}

impl RolloutState {
    fn node_mut(&mut self, name: &str) -> Option<&mut PlannedNode> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }

    fn state_of(&self, name: &str) -> &str {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.state.as_str())
            .unwrap_or("pending")
    }

    /// The contract's `result`, with the cluster as the target.
    pub fn result(&self, cluster: &str, ok: bool) -> Value {
        let mut value = json!({
            "version": self.version,
            "image": self.image,
            "snapshot": self.snapshot,
            "halted_at": self.halted_at,
            "nodes": self.nodes,
        });
        if let (Some(force), Some(map)) = (&self.force, value.as_object_mut()) {
            map.insert("force".into(), json!(force));
        }
        TargetResult::put_into(
            &[TargetResult {
                ok,
                ..TargetResult::ok(cluster)
            }],
            value,
        )
    }

    /// "cp-1, cp-2 on v1.13.2; w-1 halted; w-2 untouched".
    fn where_things_are(&self) -> String {
        let named = |state: &str| -> Vec<&str> {
            self.nodes
                .iter()
                .filter(|n| n.state == state)
                .map(|n| n.name.as_str())
                .collect()
        };
        let mut parts = Vec::new();
        let done: Vec<&str> = self
            .nodes
            .iter()
            .filter(|n| n.state == "done" || n.state == "skipped")
            .map(|n| n.name.as_str())
            .collect();
        if !done.is_empty() {
            parts.push(format!("{} on {}", done.join(", "), self.version));
        }
        let pending = named("pending");
        if !pending.is_empty() {
            parts.push(format!("{} untouched", pending.join(", ")));
        }
        parts.join("; ")
    }
}

/// A node the rollout works on: its name, Talos address and role.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    address: String,
    role: Role,
}

/// Why a node did not finish: the step that failed and what it said.
struct Halt {
    step: &'static str,
    message: String,
}

impl Halt {
    fn at(step: &'static str, message: impl Into<String>) -> Self {
        Self {
            step,
            message: message.into(),
        }
    }
}

/// What the rollout talks to, made once per attempt.
struct Clients {
    kube: kube::Client,
    evictor: Evictor,
    talos: TalosClient,
}

impl UpgradeHandler {
    fn clients(&self) -> Result<Clients, HandlerError> {
        let kube =
            self.context.kube.clone().ok_or_else(|| {
                HandlerError::Failed("upgrade needs the [kubernetes] section".into())
            })?;
        let config =
            self.context.kube_config.clone().ok_or_else(|| {
                HandlerError::Failed("upgrade needs the [kubernetes] section".into())
            })?;
        let evictor = Evictor::from_config(config).map_err(HandlerError::Failed)?;
        let talos = self.context.talos_client()?;
        Ok(Clients {
            kube,
            evictor,
            talos,
        })
    }

    pub(super) async fn rollout(
        &self,
        ctx: &JobContext,
        job: &JobEnvelope,
    ) -> Result<Outcome, HandlerError> {
        let version = job
            .param_str("version")
            .ok_or_else(|| HandlerError::Failed("upgrade needs a version".into()))?;
        let target = TalosVersion::parse(version).map_err(HandlerError::Failed)?;
        if self.config.schematic.trim().is_empty() {
            return Err(HandlerError::Failed(
                "[upgrade] schematic is not set: the installer image is <installer>/<schematic>:<version> (the Image Factory schematic id of the cluster's extensions)".into(),
            ));
        }
        let clients = self.clients()?;
        let resumed = ctx
            .checkpoint
            .as_ref()
            .and_then(|c| serde_json::from_value::<RolloutState>(c.clone()).ok())
            .filter(|s| s.version == target.to_string());
        let (state, targets) = match resumed {
            Some(state) => {
                let targets = self.targets(&clients).await?;
                let at = state
                    .nodes
                    .iter()
                    .find(|n| n.state == "pending")
                    .map(|n| n.name.clone())
                    .unwrap_or_default();
                ctx.progress
                    .report(&format!(
                        "resuming the upgrade to {} at {at}: {}",
                        state.version,
                        state.where_things_are()
                    ))
                    .await;
                (state, targets)
            }
            None => self.prepare(ctx, job, &clients, &target).await?,
        };
        let state = Mutex::new(state);
        let outcome = self
            .run_batches(ctx, &clients, &targets, &target, &state)
            .await;
        let state = state.into_inner();
        self.finish(ctx, state, outcome).await
    }

    /// Every node with its Talos address and role, from the Kubernetes API.
    async fn targets(&self, clients: &Clients) -> Result<BTreeMap<String, Target>, HandlerError> {
        let views = nodes_api::nodes(&clients.kube)
            .await
            .map_err(HandlerError::Retryable)?;
        targets_of(&views)
    }

    /// The plan and the gates before anything moves.
    async fn prepare(
        &self,
        ctx: &JobContext,
        job: &JobEnvelope,
        clients: &Clients,
        target: &TalosVersion,
    ) -> Result<(RolloutState, BTreeMap<String, Target>), HandlerError> {
        let views = nodes_api::nodes(&clients.kube)
            .await
            .map_err(HandlerError::Retryable)?;
        if views.is_empty() {
            return Err(HandlerError::Failed(
                "the Kubernetes API lists no nodes".into(),
            ));
        }
        let targets = targets_of(&views)?;
        let control_planes = control_plane_addresses(&targets);
        let endpoints = talos_api::endpoints_avoiding(&clients.talos, None, &control_planes);
        let mut cluster = Vec::new();
        for view in &views {
            let address = &targets[&view.name].address;
            let running = talos_api::version_of(&clients.talos, &endpoints, address)
                .await
                .map_err(|e| {
                    HandlerError::Failed(format!("reading {}'s Talos version: {e}", view.name))
                })?;
            cluster.push(ClusterNode {
                name: view.name.clone(),
                role: view.role,
                address: address.clone(),
                talos: running,
            });
        }
        let only: Option<Vec<String>> =
            job.params.get("nodes").and_then(Value::as_array).map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            });
        // The policy looks at every node, named or not: a cluster must not straddle minors.
        let running: Vec<RunningNode> = cluster
            .iter()
            .map(|n| RunningNode {
                name: n.name.clone(),
                talos: n.talos.clone(),
            })
            .collect();
        for kubernetes in kubernetes_minors(&views)? {
            policy::check_upgrade(&running, target, kubernetes).map_err(HandlerError::Failed)?;
        }
        let rollout = plan::plan(&cluster, target, only.as_deref(), self.config.max_parallel)
            .map_err(HandlerError::Failed)?;
        let force =
            (job.params.get("force").and_then(Value::as_bool) == Some(true)).then(|| Forced {
                reason: job.param_str("reason").unwrap_or_default().to_string(),
                by: job.requested_by.clone(),
            });
        let mut state = RolloutState {
            version: target.to_string(),
            image: self.config.image(&target.to_string()),
            snapshot: None,
            halted_at: None,
            nodes: rollout.nodes,
            force,
            batches: rollout.batches,
            soak_after: rollout.soak_after,
            soaked: false,
            steps: BTreeMap::new(),
            cordoned: BTreeSet::new(),
            gates_passed: false,
        };
        ctx.progress.report(&plan_line(&state)).await;
        if let Some(force) = &state.force {
            ctx.progress
                .report(&format!(
                    "force=true: runs whether the window is open or not, requested by {} (reason: {})",
                    force.by, force.reason
                ))
                .await;
        }
        if state.batches.is_empty() {
            return Ok((state, targets));
        }
        ctx.checkpoint(json!(state)).await?;
        self.gates(
            ctx,
            clients,
            &views,
            &control_planes,
            &endpoints,
            &mut state,
        )
        .await?;
        state.gates_passed = true;
        ctx.checkpoint(json!(state)).await?;
        Ok((state, targets))
    }

    /// Nodes Ready, etcd healthy, the root app Healthy, kube-proxy replaced, then a fresh
    /// snapshot. A failure here fails the job before any node was touched.
    async fn gates(
        &self,
        ctx: &JobContext,
        clients: &Clients,
        views: &[NodeView],
        control_planes: &[String],
        endpoints: &[String],
        state: &mut RolloutState,
    ) -> Result<(), HandlerError> {
        let gate =
            |why: String| HandlerError::Failed(format!("gate failed, nothing was touched: {why}"));
        let not_ready: Vec<&str> = views
            .iter()
            .filter(|v| !v.ready)
            .map(|v| v.name.as_str())
            .collect();
        if !not_ready.is_empty() {
            return Err(gate(format!("not Ready: {}", not_ready.join(", "))));
        }
        talos_api::etcd_members_healthy(&clients.talos, endpoints, control_planes)
            .await
            .map_err(|e| gate(format!("etcd: {e}")))?;
        if let Some(unhealthy) = self.root_app_unhealthy(&clients.kube).await? {
            return Err(gate(unhealthy));
        }
        nodes_api::kube_proxy_replaced(&clients.kube)
            .await
            .map_err(HandlerError::Retryable)?
            .map_err(|why| gate(format!("kube-proxy guard: {why}")))?;
        ctx.progress
            .report("gates passed: every node Ready, etcd healthy, the root app Healthy, kube-proxy replaced by Cilium")
            .await;
        state.snapshot = Some(self.fresh_snapshot(ctx).await?);
        Ok(())
    }

    /// The root Application's health problem, if any; none when no root app is configured.
    async fn root_app_unhealthy(
        &self,
        kube: &kube::Client,
    ) -> Result<Option<String>, HandlerError> {
        let Some((namespace, app)) = &self.argocd else {
            return Ok(None);
        };
        let state = argocd::state(kube.clone(), namespace, app).await?;
        Ok((state.health != "Healthy").then(|| {
            format!(
                "Argo CD {namespace}/{app} is {} ({})",
                state.health, state.sync
            )
        }))
    }

    /// The newest good snapshot if younger than `snapshot_max_age`, else one taken and verified
    /// now, in this job (a snapshot job would wait for the cluster lock this job holds).
    async fn fresh_snapshot(&self, ctx: &JobContext) -> Result<String, HandlerError> {
        let config = self.snapshots.as_ref().ok_or_else(|| {
            HandlerError::Failed(
                "upgrade needs [etcd_snapshot]: no upgrade without a fresh snapshot".into(),
            )
        })?;
        let store = self.context.s3_bucket(&config.bucket)?;
        let dir = etcd_snapshot::cluster_dir(config, &self.context.cluster);
        let (_, newest) = etcd_snapshot::inventory(&store, &dir).await?;
        let max_age = self.config.snapshot_max_age.get();
        if let Some(newest) = newest {
            let age = (Utc::now() - newest.created_at)
                .to_std()
                .unwrap_or_default();
            if age < max_age {
                ctx.progress
                    .report(&format!(
                        "snapshot gate: {} is {} old (under {})",
                        newest.key,
                        crate::restore_drill::human(age),
                        crate::restore_drill::human(max_age)
                    ))
                    .await;
                return Ok(newest.key);
            }
        }
        ctx.progress
            .report("snapshot gate: no verified snapshot younger than snapshot_max_age; taking one")
            .await;
        let taker = EtcdSnapshotHandler {
            config: config.clone(),
            context: self.context.clone(),
        };
        let manifest = taker.take(ctx, &store).await.map_err(|e| match e {
            HandlerError::Cancelled => HandlerError::Cancelled,
            other => HandlerError::Failed(format!(
                "gate failed, nothing was touched: no fresh snapshot: {other}"
            )),
        })?;
        ctx.progress
            .report(&format!(
                "snapshot gate: took and verified {} ({} bytes)",
                manifest.key, manifest.size_bytes
            ))
            .await;
        Ok(manifest.key)
    }

    async fn save(
        &self,
        ctx: &JobContext,
        state: &Mutex<RolloutState>,
    ) -> Result<(), HandlerError> {
        let value = json!(*state.lock().await);
        ctx.checkpoint(value).await
    }

    /// The batches in order; stops at the first halted node, or after a batch when `cancel`
    /// was asked for.
    async fn run_batches(
        &self,
        ctx: &JobContext,
        clients: &Clients,
        targets: &BTreeMap<String, Target>,
        version: &TalosVersion,
        state: &Mutex<RolloutState>,
    ) -> Result<(), HandlerError> {
        let (batches, soak_after) = {
            let s = state.lock().await;
            (s.batches.clone(), s.soak_after)
        };
        for (index, batch) in batches.iter().enumerate() {
            let pending_names: Vec<String> = {
                let s = state.lock().await;
                batch
                    .iter()
                    .filter(|n| s.state_of(n) == "pending")
                    .cloned()
                    .collect()
            };
            let gone: Vec<&str> = pending_names
                .iter()
                .filter(|n| !targets.contains_key(*n))
                .map(String::as_str)
                .collect();
            if !gone.is_empty() {
                return Err(HandlerError::Failed(format!(
                    "node(s) of the plan no longer in the cluster: {}",
                    gone.join(", ")
                )));
            }
            let pending: Vec<Target> = pending_names
                .iter()
                .filter_map(|n| targets.get(n).cloned())
                .collect();
            if !pending.is_empty() {
                if ctx.stop_requested.is_cancelled() {
                    return Err(HandlerError::Cancelled);
                }
                let runs = pending
                    .iter()
                    .map(|node| self.upgrade_one(ctx, clients, targets, version, node, state));
                futures::future::join_all(runs).await;
                if state.lock().await.halted_at.is_some() {
                    return Ok(());
                }
            }
            if soak_after == Some(index) && !state.lock().await.soaked {
                self.soak(ctx, clients).await?;
                state.lock().await.soaked = true;
                self.save(ctx, state).await?;
            }
        }
        Ok(())
    }

    /// `soak` after the canary worker, then the canary's health again.
    async fn soak(&self, ctx: &JobContext, clients: &Clients) -> Result<(), HandlerError> {
        let soak = self.config.soak.get();
        if !soak.is_zero() {
            ctx.progress
                .report(&format!(
                    "soaking {} after the canary worker",
                    crate::restore_drill::human(soak)
                ))
                .await;
            tokio::select! {
                () = tokio::time::sleep(soak) => {}
                () = ctx.stop_requested.cancelled() => return Err(HandlerError::Cancelled),
            }
        }
        let views = nodes_api::nodes(&clients.kube)
            .await
            .map_err(HandlerError::Retryable)?;
        let not_ready: Vec<&str> = views
            .iter()
            .filter(|v| !v.ready)
            .map(|v| v.name.as_str())
            .collect();
        if !not_ready.is_empty() {
            return Err(HandlerError::Failed(format!(
                "after the soak, not Ready: {}",
                not_ready.join(", ")
            )));
        }
        if let Some(unhealthy) = self.root_app_unhealthy(&clients.kube).await? {
            return Err(HandlerError::Failed(format!("after the soak: {unhealthy}")));
        }
        Ok(())
    }

    /// One node, start to end. A failure halts the rollout: the node stays cordoned.
    async fn upgrade_one(
        &self,
        ctx: &JobContext,
        clients: &Clients,
        targets: &BTreeMap<String, Target>,
        version: &TalosVersion,
        node: &Target,
        state: &Mutex<RolloutState>,
    ) {
        let started = Instant::now();
        let outcome = self
            .node_steps(ctx, clients, targets, version, node, state)
            .await;
        let mut s = state.lock().await;
        match outcome {
            Ok(note) => {
                s.steps.remove(&node.name);
                s.cordoned.remove(&node.name);
                if let Some(n) = s.node_mut(&node.name) {
                    n.state = "done".into();
                    n.message = format!(
                        "upgraded in {}{note}",
                        crate::restore_drill::human(started.elapsed())
                    );
                }
            }
            Err(halt) => {
                if let Some(n) = s.node_mut(&node.name) {
                    n.state = "halted".into();
                    n.message = format!("{}: {}", halt.step, halt.message);
                }
                if s.halted_at.is_none() {
                    s.halted_at = Some(node.name.clone());
                }
            }
        }
        let line = s
            .nodes
            .iter()
            .find(|n| n.name == node.name)
            .map(|n| format!("{} {}: {}", n.name, n.state, n.message))
            .unwrap_or_default();
        let value = json!(*s);
        drop(s);
        ctx.progress.report(&line).await;
        if let Err(e) = ctx.checkpoint(value).await {
            tracing::warn!(node = %node.name, error = %e, "Checkpoint not saved; a resumed attempt re-checks this node");
        }
    }

    async fn set_step(
        &self,
        ctx: &JobContext,
        state: &Mutex<RolloutState>,
        node: &str,
        step: Step,
    ) -> Result<(), Halt> {
        state.lock().await.steps.insert(node.to_string(), step);
        self.save(ctx, state)
            .await
            .map_err(|e| Halt::at("checkpoint", e.to_string()))
    }

    /// The steps of one node, each safe to repeat when a resumed attempt comes back to it.
    /// Returns a note for the node's message.
    async fn node_steps(
        &self,
        ctx: &JobContext,
        clients: &Clients,
        targets: &BTreeMap<String, Target>,
        version: &TalosVersion,
        node: &Target,
        state: &Mutex<RolloutState>,
    ) -> Result<String, Halt> {
        let name = node.name.as_str();
        let step = state.lock().await.steps.get(name).copied();
        let report = |m: String| async move { ctx.progress.report(&m).await };
        let control_planes = control_plane_addresses(targets);
        let endpoints =
            talos_api::endpoints_avoiding(&clients.talos, Some(&node.address), &control_planes);

        // Cordon, or take over the cordon of an earlier upgrade job (a halted one run again).
        let view = nodes_api::node(&clients.kube, name)
            .await
            .map_err(|e| Halt::at("cordon", e))?;
        let mut note = String::new();
        let ours = match &view.cordoned_by {
            Some(earlier) if view.unschedulable && earlier != &ctx.job_id => {
                nodes_api::take_over(&clients.kube, name, earlier, &ctx.job_id)
                    .await
                    .map_err(|e| Halt::at("cordon", e))?
            }
            _ => match nodes_api::cordon(&clients.kube, name, &ctx.job_id)
                .await
                .map_err(|e| Halt::at("cordon", e))?
            {
                Cordon::Now | Cordon::Already => true,
                Cordon::ByOther => false,
            },
        };
        if ours {
            state.lock().await.cordoned.insert(name.to_string());
        } else {
            note = "; left cordoned: it was cordoned before the upgrade".into();
        }
        if step.is_none() {
            self.set_step(ctx, state, name, Step::Cordoned).await?;
        }
        report(format!("{name}: cordoned, draining")).await;

        let drained = nodes_api::drain(
            &clients.evictor,
            name,
            self.config.drain_timeout.get(),
            &ctx.cancel,
        )
        .await
        .map_err(|e| Halt::at("drain", e))?;
        if step != Some(Step::UpgradeSent) {
            self.set_step(ctx, state, name, Step::Drained).await?;
        }
        report(format!(
            "{name}: drained ({} evicted, {} DaemonSet or mirror pods left)",
            drained.evicted.len(),
            drained.left.len()
        ))
        .await;

        // Ask for the upgrade unless the node already runs the target. A resumed attempt that
        // finds the node away (rebooting) waits for it instead.
        let running = talos_api::version_of(&clients.talos, &endpoints, &node.address).await;
        match running {
            Ok(running) if running == *version => {}
            Ok(running) => {
                let api = UpgradeApi::for_running(&running);
                self.set_step(ctx, state, name, Step::UpgradeSent).await?;
                report(format!(
                    "{name}: upgrading {running} → {version} through {}",
                    match api {
                        UpgradeApi::Legacy => "MachineService.Upgrade",
                        UpgradeApi::Lifecycle => "ImageService.Pull and LifecycleService.Upgrade",
                    }
                ))
                .await;
                let image = state.lock().await.image.clone();
                let on_message =
                    |m: &str| tracing::debug!(node = %name, message = %m, "Talos upgrade progress");
                talos_api::upgrade_node(
                    &clients.talos,
                    &endpoints,
                    &node.address,
                    &image,
                    api,
                    &on_message,
                )
                .await
                .map_err(|e| Halt::at("upgrade", e))?;
            }
            Err(e) if step == Some(Step::UpgradeSent) => {
                report(format!("{name}: away ({e}); waiting for it to come back")).await;
            }
            Err(e) => {
                return Err(Halt::at(
                    "upgrade",
                    format!("reading its Talos version: {e}"),
                ));
            }
        }

        let deadline = Instant::now() + self.config.node_timeout.get();
        let left = || deadline.saturating_duration_since(Instant::now());
        talos_api::wait_for_version(
            &clients.talos,
            &endpoints,
            &node.address,
            version,
            left(),
            &ctx.cancel,
        )
        .await
        .map_err(|e| Halt::at("back on the new version", e))?;
        nodes_api::wait_node_ready(&clients.kube, name, left(), &ctx.cancel)
            .await
            .map_err(|e| Halt::at("Ready", e))?;
        if node.role == Role::ControlPlane {
            self.wait_for(ctx, left(), "etcd healthy", || async {
                talos_api::etcd_members_healthy(&clients.talos, &endpoints, &control_planes).await
            })
            .await?;
        }
        nodes_api::kube_proxy_replaced(&clients.kube)
            .await
            .map_err(|e| Halt::at("kube-proxy guard", e))?
            .map_err(|e| Halt::at("kube-proxy guard", e))?;
        if ours {
            nodes_api::uncordon(&clients.kube, name, &ctx.job_id)
                .await
                .map_err(|e| Halt::at("uncordon", e))?;
        }
        let root_deadline = Instant::now() + self.config.node_timeout.get();
        self.wait_for(
            ctx,
            root_deadline.saturating_duration_since(Instant::now()),
            "root app Healthy",
            || async {
                match self.root_app_unhealthy(&clients.kube).await {
                    Ok(None) => Ok(()),
                    Ok(Some(why)) => Err(why),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await?;
        Ok(note)
    }

    /// Asks `check` every second until it passes or `within` is up.
    async fn wait_for<F, Fut>(
        &self,
        ctx: &JobContext,
        within: Duration,
        step: &'static str,
        check: F,
    ) -> Result<(), Halt>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let deadline = Instant::now() + within;
        loop {
            let last = match check().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(Halt::at(
                    step,
                    format!("not within {}: {last}", crate::restore_drill::human(within)),
                ));
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = ctx.cancel.cancelled() => return Err(Halt::at(step, "cancelled")),
            }
        }
    }

    /// The job's end: succeeded, halted (failed, with where and how to resume), or cancelled
    /// after the node in progress.
    async fn finish(
        &self,
        ctx: &JobContext,
        state: RolloutState,
        outcome: Result<(), HandlerError>,
    ) -> Result<Outcome, HandlerError> {
        let cluster = self.context.cluster.as_str();
        if let Err(e) = ctx.checkpoint(json!(state)).await {
            tracing::warn!(error = %e, "Final checkpoint not saved");
        }
        match outcome {
            Err(HandlerError::Cancelled) => {
                ctx.progress
                    .report(&format!(
                        "cancelled between nodes: {}",
                        state.where_things_are()
                    ))
                    .await;
                Err(HandlerError::Cancelled)
            }
            Err(e) => Ok(Outcome::Failed {
                message: format!("{e}; {}", state.where_things_are()),
                result: state.result(cluster, false),
            }),
            Ok(()) => match &state.halted_at {
                Some(node) => {
                    let why = state
                        .nodes
                        .iter()
                        .find(|n| &n.name == node)
                        .map(|n| n.message.clone())
                        .unwrap_or_default();
                    let message = format!(
                        "halted at {node} ({why}). {node} is left cordoned; {}. After fixing it, `upgrade talos {}` continues (finished nodes are skipped); docs/upgrades.md says how to roll a node back",
                        state.where_things_are(),
                        state.version
                    );
                    Ok(Outcome::Failed {
                        message,
                        result: state.result(cluster, false),
                    })
                }
                None => {
                    let done = state.nodes.iter().filter(|n| n.state == "done").count();
                    let skipped = state.nodes.iter().filter(|n| n.state == "skipped").count();
                    let message = if done == 0 {
                        format!("every node already runs {}", state.version)
                    } else {
                        format!(
                            "{done} node(s) upgraded to {}, {skipped} already on it",
                            state.version
                        )
                    };
                    Ok(Outcome::Succeeded {
                        message,
                        result: state.result(cluster, true),
                    })
                }
            },
        }
    }
}

/// Every node by name with its Talos address (its `InternalIP`) and role.
fn targets_of(views: &[NodeView]) -> Result<BTreeMap<String, Target>, HandlerError> {
    views
        .iter()
        .map(|v| {
            let address = v.internal_ip.clone().ok_or_else(|| {
                HandlerError::Failed(format!(
                    "node {} has no InternalIP: its Talos address is not known",
                    v.name
                ))
            })?;
            Ok((
                v.name.clone(),
                Target {
                    name: v.name.clone(),
                    address,
                    role: v.role,
                },
            ))
        })
        .collect()
}

fn control_plane_addresses(targets: &BTreeMap<String, Target>) -> Vec<String> {
    targets
        .values()
        .filter(|t| t.role == Role::ControlPlane)
        .map(|t| t.address.clone())
        .collect()
}

/// The Kubernetes minor versions the kubelets run (usually one).
fn kubernetes_minors(views: &[NodeView]) -> Result<BTreeSet<(u32, u32)>, HandlerError> {
    views
        .iter()
        .map(|v| {
            policy::kubernetes_minor(&v.kubelet_version)
                .map_err(|e| HandlerError::Failed(format!("node {}: kubelet version: {e}", v.name)))
        })
        .collect()
}

/// The plan in one line: the first event of the job.
fn plan_line(state: &RolloutState) -> String {
    let nodes: Vec<String> = state
        .nodes
        .iter()
        .map(|n| {
            let role = match n.role {
                Role::ControlPlane => "control plane",
                Role::Worker => "worker",
            };
            if n.state == "skipped" {
                format!("{} ({role}, already on {})", n.name, n.to)
            } else {
                format!("{} ({role}, {} → {})", n.name, n.from, n.to)
            }
        })
        .collect();
    format!(
        "plan: upgrade to {} with {}: {}",
        state.version,
        state.image,
        nodes.join(", ")
    )
}
