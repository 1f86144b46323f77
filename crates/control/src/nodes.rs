//! Nodes: the link agents use, their reports, and the reconcile loop (idle reaper).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lodge_model::node::NodeLink;
use lodge_model::spec::{AgentEvent, ProcessSpec};
use lodge_model::{Node, ProcessStatus};
use lodge_scheduler::LiveProcess;
use lodge_store::ProcessQuery;

use crate::{Control, Result};

impl Control {
    /// Register a node reached through a direct handle (tests' in-process nodes; the embedded
    /// node of `lodge serve` speaks the node protocol, see [`Control::serve_node`]).
    pub async fn register_local_node(&self, node: Node, agent: Arc<dyn NodeLink>) -> Result<()> {
        self.store.put_node(&node).await?;
        self.local_agents
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(agent);
        Ok(())
    }

    pub async fn put_node(&self, node: &Node) -> Result<()> {
        Ok(self.store.put_node(node).await?)
    }

    /// Tell the node running (or to run) `process_id` to look at it now.
    pub(crate) fn wake_node(&self, node_id: &str, process_id: &str) {
        for a in self.agents() {
            if a.node_id() == node_id {
                a.wake(process_id);
            }
        }
        // Its session may be held by another replica.
        let here = self.remote_if_known(node_id).is_some_and(|r| r.connected())
            || self
                .local_agents
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|a| a.node_id() == node_id);
        if !here {
            self.hint_wake(node_id, process_id);
        }
    }

    /// ProcessSpecs of these processes, if they are live and on `node_id`.
    pub async fn specs_for(&self, node_id: &str, ids: &[String]) -> Result<Vec<ProcessSpec>> {
        let mut procs = Vec::new();
        for id in ids {
            if let Some(p) = self.store.process(id).await? {
                if p.node_id == node_id && !p.status.is_terminal() {
                    procs.push(p);
                }
            }
        }
        self.specs_of(procs).await
    }

    /// The processes a node should run (or stop).
    pub async fn desired_for(&self, node_id: &str) -> Result<Vec<ProcessSpec>> {
        let q = ProcessQuery {
            node_id: Some(node_id.to_string()),
            statuses: ProcessStatus::LIVE.to_vec(),
            ..Default::default()
        };
        let procs = self.store.processes(&q).await?;
        self.specs_of(procs).await
    }

    async fn specs_of(&self, procs: Vec<lodge_model::Process>) -> Result<Vec<ProcessSpec>> {
        // Deployments are immutable and apps few: read each once per pass.
        let mut deployments = std::collections::HashMap::new();
        let mut apps = std::collections::HashMap::new();
        let mut out = Vec::new();
        for p in procs {
            if !deployments.contains_key(&p.deployment_id) {
                let d = self.store.deployment(&p.deployment_id).await?;
                deployments.insert(p.deployment_id.clone(), d);
            }
            if !apps.contains_key(&p.app_id) {
                let a = self.store.app(&p.app_id).await?;
                apps.insert(p.app_id.clone(), a);
            }
            let (Some(Some(d)), Some(Some(app))) =
                (deployments.get(&p.deployment_id), apps.get(&p.app_id))
            else {
                continue;
            };
            let (d, app) = (d.clone(), app.clone());
            out.push(ProcessSpec {
                process_id: p.process_id,
                app_id: p.app_id,
                app_secret: app.app_secret,
                deployment_id: d.deployment_id,
                build_id: d.build_id,
                build_tag: d.build_tag,
                region: p.region,
                rooms_per_process: d.rooms_per_process,
                default_port: d.default_container_port,
                additional_ports: d.additional_container_ports,
                env: d.env,
                requested_cpu: d.requested_cpu,
                requested_memory_mb: d.requested_memory_mb,
                initial_room_id: p.initial_room_id,
                initial_room_config: p.initial_room_config,
                stop: p.status == ProcessStatus::Stopping,
                exposed_ports: p.exposed_ports,
            });
        }
        Ok(out)
    }

    pub async fn handle_event(&self, event: AgentEvent) -> Result<()> {
        match event {
            AgentEvent::Booted {
                process_id,
                at,
                exposed_ports,
            } => {
                self.store
                    .update_process(&process_id, &|p| {
                        // Sent again when a process is re-adopted: keep the first boot time.
                        if p.booted_at.is_some() && p.exposed_ports == exposed_ports {
                            return false;
                        }
                        p.booted_at.get_or_insert(at);
                        p.exposed_ports = exposed_ports.clone();
                        true
                    })
                    .await?;
            }
            AgentEvent::Running { process_id, at } => {
                self.store
                    .update_process(&process_id, &|p| {
                        if p.status != ProcessStatus::Starting {
                            return false;
                        }
                        p.status = ProcessStatus::Running;
                        p.started_at = Some(at);
                        p.last_busy_at = p.last_busy_at.max(at);
                        true
                    })
                    .await?;
                tracing::info!(%process_id, "process running");
            }
            AgentEvent::Exited {
                process_id,
                at,
                exit,
                failed,
            } => {
                let status = if failed {
                    ProcessStatus::Failed
                } else {
                    ProcessStatus::Stopped
                };
                if let Some(ended) = self
                    .store
                    .end_process(&process_id, status, at, &exit.reason)
                    .await?
                {
                    self.note_ended(&process_id, ended.destroyed_rooms.len());
                    self.nudge_warm();
                    tracing::info!(
                        %process_id,
                        status = %status,
                        reason = %exit.reason,
                        rooms_destroyed = ended.destroyed_rooms.len(),
                        "process ended"
                    );
                }
            }
            AgentEvent::Activity {
                process_id,
                at,
                active_connections,
            } => {
                if active_connections > 0 {
                    self.store
                        .update_process(&process_id, &|p| {
                            p.last_busy_at = p.last_busy_at.max(at);
                            true
                        })
                        .await?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn note_ended(&self, _process_id: &str, rooms: usize) {
        self.metrics.processes_ended.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .rooms_destroyed
            .fetch_add(rooms as u64, Ordering::Relaxed);
    }

    /// One pass of the idle reaper: stop running processes of deployments with
    /// `idleTimeoutEnabled` that had no room and no connection for the idle timeout.
    pub async fn reap_idle(&self) -> Result<Vec<String>> {
        let q = ProcessQuery {
            statuses: vec![ProcessStatus::Running],
            ..Default::default()
        };
        let mut live = Vec::new();
        let mut apps = std::collections::HashMap::new();
        for p in self.store.processes(&q).await? {
            // Warm capacity is the warm controller's to keep or stop.
            if !apps.contains_key(&p.app_id) {
                let app = self.store.app(&p.app_id).await?;
                apps.insert(p.app_id.clone(), app);
            }
            if let Some(Some(app)) = apps.get(&p.app_id) {
                if Self::keeps_warm(app, p.region) {
                    continue;
                }
            }
            let Some(d) = self.store.deployment(&p.deployment_id).await? else {
                continue;
            };
            let active = self
                .agents()
                .iter()
                .find_map(|a| a.stats(&p.process_id))
                .map(|s| s.active_connections)
                .unwrap_or(0);
            live.push(LiveProcess {
                process_id: p.process_id,
                status: p.status,
                idle_timeout_enabled: d.idle_timeout_enabled,
                rooms_allocated: p.rooms_allocated,
                active_connections: active,
                last_busy_at: p.last_busy_at,
            });
        }
        let idle_ms = lodge_model::clock::millis(self.cfg.idle_timeout);
        let idle = lodge_scheduler::idle_processes(self.now(), idle_ms, &live);
        for id in &idle {
            self.request_stop(id, "idle timeout: no rooms and no connections")
                .await?;
        }
        Ok(idle)
    }

    /// Run the reconcile loop until the control plane is dropped.
    pub fn spawn_reconciler(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        self.spawn_lease();
        self.spawn_warm();
        let weak = Arc::downgrade(self);
        let interval = self.cfg.reap_interval;
        tokio::spawn(async move {
            let mut last_tidy: Option<tokio::time::Instant> = None;
            loop {
                tokio::time::sleep(interval).await;
                let Some(control) = weak.upgrade() else {
                    return;
                };
                // Each replica sweeps the nodes it holds.
                if let Err(e) = control.sweep_retention().await {
                    tracing::warn!(error = %e, "retention sweep failed");
                }
                // The rest is for the lease's holder only, checked before every step.
                if control.leads() {
                    if let Err(e) = control.reap_idle().await {
                        tracing::warn!(error = %e, "idle reaper pass failed");
                    }
                }
                if control.leads() {
                    if let Err(e) = control.judge_lost_nodes(control.cfg.node_lost_after).await {
                        tracing::warn!(error = %e, "node-loss judgement failed");
                    }
                }
                if control.leads() {
                    if let Err(e) = control.settle_drained().await {
                        tracing::warn!(error = %e, "cannot settle drained nodes");
                    }
                }
                // Tidying up after replicas that are gone: on a shared store, once a minute.
                let due = last_tidy.is_none_or(|t| t.elapsed() >= TIDY_EVERY);
                if control.store.shared() && due && control.leads() {
                    last_tidy = Some(tokio::time::Instant::now());
                    if let Err(e) = control.fail_orphaned_builds().await {
                        tracing::warn!(error = %e, "cannot judge builds left running");
                    }
                    if let Err(e) = control.prune_rate_windows().await {
                        tracing::warn!(error = %e, "cannot prune ended rate-limit windows");
                    }
                    if let Err(e) = control.prune_replicas().await {
                        tracing::warn!(error = %e, "cannot forget replicas long gone");
                    }
                }
            }
        })
    }
}

/// How often the lease's holder tidies up after replicas that are gone (their builds, their
/// records, ended rate-limit windows).
const TIDY_EVERY: Duration = Duration::from_secs(60);
