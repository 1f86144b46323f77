//! The fleet of nodes: join tokens and node credentials, which nodes may take new work, drain,
//! and the judgement that a silent node is lost.

use std::sync::Arc;
use std::time::Duration;

use lodge_model::protocol::NodeInfo;
use lodge_model::{JoinToken, Node, NodeStatus, ProcessStatus, Region};
use lodge_store::ProcessQuery;

use crate::remote::RemoteNode;
use crate::tokens::{hash_secret, require_instance_admin, strip_bearer};
use crate::{Caller, Control, Error, Result};

/// The fleet of nodes that joined without naming one. Nodes are the operator's and serve every
/// org of the instance, so every org sees the same default fleet.
pub const DEFAULT_FLEET: &str = "fleet-default";

/// A node not heard from for this long takes no new work.
pub const UNSCHEDULABLE_AFTER: Duration = Duration::from_secs(10);
/// Nodes per region that fetch a new deployment's build ahead.
pub const PREFETCH_PER_REGION: usize = 3;
/// How long the placement path may use a read of the nodes.
const NODES_FRESH: Duration = Duration::from_secs(1);
/// The longest a join token may live.
pub const MAX_JOIN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// A node as operators and the API see it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub node: Node,
    /// Heard from within [`UNSCHEDULABLE_AFTER`] (the embedded node always is).
    pub reachable: bool,
    pub connected: bool,
    pub last_heard: Option<i64>,
    pub live_processes: u32,
    pub ports_in_use: u32,
    /// CPU and memory the deployments of its live processes requested.
    pub cpu_in_use: f64,
    pub memory_mb_in_use: f64,
}

use lodge_model::clock::millis as ms;

/// What a node says its players connect to: a host name or address.
pub(crate) fn check_public_host(info: &NodeInfo) -> Result<()> {
    if info.public_host.trim().is_empty() || info.public_host.len() > 253 {
        return Err(Error::Invalid(
            "publicHost must be a host name or address".into(),
        ));
    }
    Ok(())
}

impl Control {
    /// The handle on a protocol-speaking node, made on first use.
    pub(crate) fn remote_node(&self, node_id: &str) -> Arc<RemoteNode> {
        let mut remotes = self.remotes.write().unwrap_or_else(|p| p.into_inner());
        remotes
            .entry(node_id.to_string())
            .or_insert_with(|| Arc::new(RemoteNode::new(node_id, self.now())))
            .clone()
    }

    pub(crate) fn remote_if_known(&self, node_id: &str) -> Option<Arc<RemoteNode>> {
        self.remotes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node_id)
            .cloned()
    }

    /// A join token for nodes of `region` (and `fleet`), valid for `ttl`; the secret is
    /// returned once and only its hash is kept. Reusable until it expires, so one token can
    /// bring up a fleet.
    pub async fn create_join_token(
        &self,
        caller: &Caller,
        region: Region,
        fleet_id: Option<String>,
        ttl: Duration,
    ) -> Result<(String, JoinToken)> {
        require_instance_admin(caller, "manage nodes")?;
        if ttl.is_zero() || ttl > MAX_JOIN_TTL {
            return Err(Error::Invalid(format!(
                "ttl must be between 1 second and {} days",
                MAX_JOIN_TTL.as_secs() / 86400
            )));
        }
        let secret = lodge_model::id::secret("lodge_join_");
        let now = self.now();
        let token = JoinToken {
            token_id: format!("join-{}", lodge_model::id::secret_hex()),
            region,
            fleet_id,
            created_at: now,
            expires_at: now.saturating_add(ms(ttl)),
        };
        self.store
            .insert_join_token(&token, &hash_secret(&secret))
            .await?;
        tracing::info!(token_id = %token.token_id, region = %region, "join token created");
        Ok((secret, token))
    }

    /// A node presents a join token: it becomes a node of the token's region with a credential
    /// of its own (returned once; only its hash is kept).
    pub async fn join_node(
        &self,
        join_token: &str,
        info: &NodeInfo,
        fleet_id: Option<&str>,
    ) -> Result<(String, String)> {
        let token = self
            .store
            .join_token_by_hash(&hash_secret(join_token.trim()))
            .await?
            .ok_or_else(|| Error::Unauthorized("unknown join token".into()))?;
        if token.expires_at <= self.now() {
            return Err(Error::Unauthorized(format!(
                "the join token expired at {}",
                lodge_model::clock::rfc3339(token.expires_at)
            )));
        }
        if info.region != token.region {
            return Err(Error::Unauthorized(format!(
                "the join token is for region {}, not {}",
                token.region, info.region
            )));
        }
        if let (Some(want), Some(have)) = (fleet_id, token.fleet_id.as_deref()) {
            if want != have {
                return Err(Error::Unauthorized(format!(
                    "the join token is for fleet {have}, not {want}"
                )));
            }
        }
        check_public_host(info)?;
        let credential = lodge_model::id::secret("lodge_node_");
        let now = self.now();
        let mut node = Node::local(
            format!("node-{}", lodge_model::id::secret_hex()),
            info.public_host.clone(),
            Some(vec![info.region]),
            now,
        );
        node.remote = true;
        node.fleet_id = token.fleet_id.clone().or(fleet_id.map(str::to_string));
        node.cpu = info.cpu;
        node.memory_mb = info.memory_mb;
        node.port_capacity = info.port_capacity;
        node.ping_port = info.ping_port;
        node.credential_hash = Some(hash_secret(&credential));
        self.store.put_node(&node).await?;
        tracing::info!(node_id = %node.node_id, region = %info.region, host = %info.public_host, "node joined");
        Ok((node.node_id, credential))
    }

    /// The node an `Authorization` header's credential belongs to.
    pub async fn authenticate_node(&self, header: Option<&str>) -> Result<Node> {
        let secret = header
            .map(strip_bearer)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::Unauthorized("a node credential is required".into()))?;
        let hash = hash_secret(secret);
        self.store
            .nodes()
            .await?
            .into_iter()
            .find(|n| n.credential_hash.as_deref() == Some(hash.as_str()))
            .ok_or_else(|| Error::Unauthorized("unknown node credential".into()))
    }

    /// DiscoveryV2: every region with a node heard from lately, and the ping endpoint (host and
    /// port, if the node said) of one of its nodes.
    pub async fn ping_endpoints(&self) -> Result<Vec<(Region, String, Option<u16>)>> {
        let mut out: Vec<(Region, String, Option<u16>)> = Vec::new();
        for node in self.store.nodes().await? {
            if node.status == NodeStatus::Stopped || !self.heard_recently(&node) {
                continue;
            }
            let regions = node.regions.clone().unwrap_or_else(|| Region::ALL.to_vec());
            for r in regions {
                if !out.iter().any(|(have, ..)| *have == r) {
                    out.push((r, node.public_host.clone(), node.ping_port));
                }
            }
        }
        out.sort_by_key(|(r, ..)| Region::ALL.iter().position(|x| x == r));
        Ok(out)
    }

    /// A deployment of `build_id` was created: have the nodes its next processes would go to
    /// (in each region, the first [`PREFETCH_PER_REGION`] in placement order) fetch the build
    /// now, so the first room there does not wait for the download. Others fetch it when a
    /// process of it first lands on them; a fleet of any size costs a bounded fan-out.
    pub(crate) async fn prefetch_build(&self, build_id: &str, need: lodge_scheduler::Need) {
        let Ok(loads) = self.node_loads().await else {
            return;
        };
        let mut chosen = std::collections::BTreeSet::new();
        for region in Region::ALL {
            let mut candidates: Vec<&lodge_scheduler::NodeLoad> = loads
                .iter()
                .filter(|l| l.node.remote && l.node.serves(*region) && l.fits(need))
                .collect();
            // The order place_process takes them in: busiest first.
            candidates
                .sort_by_key(|l| (std::cmp::Reverse(l.live_processes), l.node.node_id.clone()));
            for l in candidates.into_iter().take(PREFETCH_PER_REGION) {
                chosen.insert(l.node.node_id.clone());
            }
        }
        for id in chosen {
            if let Some(r) = self.remote_if_known(&id).filter(|r| r.connected()) {
                r.prefetch(build_id);
            }
        }
    }

    /// The nodes as the store holds them, read at most once per [`NODES_FRESH`] on the
    /// placement path (liveness is judged in seconds; a drain through this replica is seen at
    /// once).
    pub(crate) async fn nodes_now(&self) -> Result<Arc<Vec<Node>>> {
        {
            let cached = self.nodes_cache.lock().unwrap_or_else(|p| p.into_inner());
            // Aged by the control plane's clock, which tests move.
            if let Some((at, nodes)) = cached.as_ref() {
                if (0..ms(NODES_FRESH)).contains(&(self.now() - at)) {
                    return Ok(nodes.clone());
                }
            }
        }
        let nodes = Arc::new(self.store.nodes().await?);
        *self.nodes_cache.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((self.now(), nodes.clone()));
        Ok(nodes)
    }

    pub(crate) fn forget_nodes(&self) {
        *self.nodes_cache.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether a node may take new processes now.
    pub(crate) fn schedulable(&self, node: &Node) -> bool {
        if node.status != NodeStatus::Running {
            return false;
        }
        self.heard_recently(node)
    }

    /// Heard from within [`UNSCHEDULABLE_AFTER`]: by this replica, or (as the store says) by
    /// the replica that holds the node's session.
    fn heard_recently(&self, node: &Node) -> bool {
        let window = ms(UNSCHEDULABLE_AFTER);
        let now = self.now();
        let here = self.remote_if_known(&node.node_id).map(|r| r.last_heard());
        match here.max(node.last_seen_at) {
            Some(heard) => now - heard < window,
            // A node reached only through a direct handle (tests' in-process nodes).
            None => !node.remote,
        }
    }

    pub async fn list_nodes(&self, caller: &Caller) -> Result<Vec<NodeView>> {
        require_instance_admin(caller, "manage nodes")?;
        let usage = self.store.node_usage().await?;
        // On a shared store a node's session may be held by another replica: it is connected
        // when that replica is alive and the session wrote the node's heartbeat recently.
        let others: Vec<String> = if self.store.shared() {
            self.live_replicas()
                .await?
                .into_iter()
                .map(|r| r.replica_id)
                .filter(|id| id != self.replica_id())
                .collect()
        } else {
            Vec::new()
        };
        let mut out = Vec::new();
        for node in self.store.nodes().await? {
            let u = usage
                .iter()
                .find(|u| u.node_id == node.node_id)
                .cloned()
                .unwrap_or_default();
            let remote = self.remote_if_known(&node.node_id);
            out.push(NodeView {
                reachable: self.heard_recently(&node),
                connected: remote.as_ref().is_some_and(|r| r.connected())
                    || !node.remote
                    || (node.replica.as_ref().is_some_and(|r| others.contains(r))
                        && self.heard_recently(&node)),
                last_heard: remote.map(|r| r.last_heard()).max(node.last_seen_at),
                live_processes: u.live_processes,
                ports_in_use: u.ports,
                cpu_in_use: u.cpu,
                memory_mb_in_use: u.memory_mb,
                node,
            });
        }
        Ok(out)
    }

    pub async fn node_view(&self, caller: &Caller, node_id: &str) -> Result<NodeView> {
        self.list_nodes(caller)
            .await?
            .into_iter()
            .find(|v| v.node.node_id == node_id)
            .ok_or_else(|| Error::NotFound(format!("Node not found: {node_id}")))
    }

    /// Drain (no new processes; `stopped` once its last process ends) or undrain a node.
    pub async fn set_draining(
        &self,
        caller: &Caller,
        node_id: &str,
        drain: bool,
    ) -> Result<NodeView> {
        require_instance_admin(caller, "manage nodes")?;
        let status = if drain {
            NodeStatus::Draining
        } else {
            NodeStatus::Running
        };
        self.store
            .update_node(node_id, &|node| {
                node.status = status;
                node.stopped_at = None;
                true
            })
            .await?
            .ok_or_else(|| Error::NotFound(format!("Node not found: {node_id}")))?;
        self.nodes_changed().await;
        tracing::info!(%node_id, status = status.as_str(), "node status changed");
        self.settle_drained().await?;
        self.node_view(caller, node_id).await
    }

    /// Draining nodes without live processes are `stopped`.
    pub(crate) async fn settle_drained(&self) -> Result<()> {
        let usage = self.store.node_usage().await?;
        let now = self.now();
        for node in self.store.nodes().await? {
            let live = usage
                .iter()
                .any(|u| u.node_id == node.node_id && u.live_processes > 0);
            if node.status == NodeStatus::Draining && !live {
                let stopped = self
                    .store
                    .update_node(&node.node_id, &|n| {
                        if n.status != NodeStatus::Draining {
                            return false;
                        }
                        n.status = NodeStatus::Stopped;
                        n.stopped_at = Some(now);
                        true
                    })
                    .await?;
                if stopped.is_some_and(|n| n.stopped_at == Some(now)) {
                    tracing::info!(node_id = %node.node_id, "drained node stopped");
                }
            }
        }
        Ok(())
    }

    /// One pass of the node-loss judgement: a joined node silent for `lost_after` is lost, its
    /// processes end (their rooms with them). If most of a fleet of three or more went silent,
    /// the fault is likelier on this side: nothing is declared lost.
    pub async fn judge_lost_nodes(&self, lost_after: Duration) -> Result<Vec<String>> {
        let now = self.now();
        let remote: Vec<Node> = self
            .store
            .nodes()
            .await?
            .into_iter()
            .filter(|n| n.remote && n.status != NodeStatus::Stopped)
            .collect();
        let silent_for = |n: &Node| {
            // Since this replica started or took over, a node had the whole period to reconnect.
            let here = self.remote_if_known(&n.node_id).map(|r| r.last_heard());
            let heard = here
                .max(n.last_seen_at)
                .unwrap_or(0)
                .max(self.judging_since());
            now - heard
        };
        let lost: Vec<&Node> = remote
            .iter()
            .filter(|n| silent_for(n) >= ms(lost_after))
            .collect();
        if lost.is_empty() {
            return Ok(Vec::new());
        }
        let silent = remote
            .iter()
            .filter(|n| silent_for(n) >= ms(UNSCHEDULABLE_AFTER))
            .count();
        if remote.len() >= 3 && silent * 2 > remote.len() {
            tracing::warn!(
                silent,
                nodes = remote.len(),
                "most nodes are silent at once; declaring none lost (a fault on the control plane's side is likelier)"
            );
            return Ok(Vec::new());
        }
        let mut ended = Vec::new();
        for node in lost {
            let q = ProcessQuery {
                node_id: Some(node.node_id.clone()),
                statuses: ProcessStatus::LIVE.to_vec(),
                ..Default::default()
            };
            let procs = self.store.processes(&q).await?;
            if procs.is_empty() {
                continue;
            }
            let reason = format!(
                "node lost: node {} was not heard from for {} s",
                node.node_id,
                lost_after.as_secs()
            );
            for p in procs {
                if let Some(e) = self
                    .store
                    .end_process(&p.process_id, ProcessStatus::Failed, now, &reason)
                    .await?
                {
                    self.note_ended(&p.process_id, e.destroyed_rooms.len());
                    ended.push(p.process_id);
                }
            }
            tracing::warn!(node_id = %node.node_id, processes = ended.len(), "node lost; its processes are ended");
        }
        Ok(ended)
    }
}
