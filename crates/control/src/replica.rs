//! This control plane as one replica among several on a shared store. It keeps a record of
//! itself (where the others reach it, refreshed every [`HEARTBEAT`]); runs the singletons (idle
//! reaper, node-loss judgement, drained nodes, orphaned builds) only while it holds their lease;
//! tells the replica holding a node's session to wake it (a hint through the store, with the
//! session's own periodic comparison as the safety net); and reaches a node attached to another
//! replica through that replica ([`crate::peer::PeerNode`]).
//!
//! On the embedded store there is one replica: the lease is always its own (nothing written)
//! and no hint is ever sent, so the one-box path does exactly what it did before.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lodge_model::Replica;
use tokio::sync::mpsc;

use crate::{Control, Result};

/// How often a replica refreshes its record.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// A replica whose record is older than this is gone: nobody forwards to it, and what it was
/// running (builds) can never finish.
pub const REPLICA_GONE_AFTER: Duration = Duration::from_secs(10);
/// A gone replica's record is deleted this long after it was last refreshed.
const REPLICA_FORGOTTEN_AFTER: Duration = Duration::from_secs(3600);
/// The singletons' lease: renewed every [`LEASE_RENEW`] by a task of its own, so it outlives a
/// missed renewal or two, and moves to another replica this long after its holder died.
pub const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often the holder renews the lease (its own task, whatever the singletons are doing).
pub const LEASE_RENEW: Duration = Duration::from_secs(5);
/// A holder stops running singletons this long before its lease would expire, as measured
/// from before the renewal was sent: a slow renewal or a little clock skew between replicas
/// never leaves two holders at once.
const LEASE_MARGIN: Duration = Duration::from_secs(3);
const SINGLETONS: &str = "singletons";
/// The secret replicas show each other when one forwards a call to a node (made by the first
/// replica that needs it, stored in the database, never shown to anyone else).
const PEER_SECRET: &str = "peer-secret";

/// This replica's identity and its view of the others.
pub(crate) struct ReplicaState {
    pub(crate) id: String,
    /// The base URL the other replicas reach this one at, once the API listens.
    address: OnceLock<String>,
    secret: tokio::sync::OnceCell<String>,
    /// Since when this replica holds the singletons' lease (0: it does not).
    leading_since: AtomicI64,
    /// Until when (this replica's clock) it may act as the holder without renewing.
    lease_until: AtomicI64,
    /// Wake-ups for nodes attached elsewhere, sent as hints in batches.
    hints: OnceLock<mpsc::UnboundedSender<String>>,
    pub(crate) http: reqwest::Client,
}

impl ReplicaState {
    pub(crate) fn new() -> Self {
        Self {
            id: format!("replica-{}", lodge_model::id::secret_hex()),
            address: OnceLock::new(),
            secret: tokio::sync::OnceCell::new(),
            leading_since: AtomicI64::new(0),
            lease_until: AtomicI64::new(0),
            hints: OnceLock::new(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(3))
                .timeout(crate::remote::CALL_TIMEOUT + Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
        }
    }
}

/// The hint that a node's status changed.
const NODES_CHANGED: &str = "nodes";

/// A line of a wake-up hint: `wake NODE PROCESS`.
fn wake_line(node_id: &str, process_id: &str) -> String {
    format!("wake {node_id} {process_id}")
}

impl Control {
    /// This replica's id (new at every start).
    pub fn replica_id(&self) -> &str {
        &self.replica.id
    }

    /// Start being a replica: announce `address` (where the other replicas reach this one's
    /// API), keep the record fresh, and listen for the others' hints. Call once, after the API
    /// listens.
    pub async fn join_replicas(self: &Arc<Self>, address: &str) -> Result<()> {
        let _ = self
            .replica
            .address
            .set(address.trim_end_matches('/').to_string());
        self.heartbeat().await?;
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let Some(control) = weak.upgrade() else {
                    return;
                };
                if let Err(e) = control.heartbeat().await {
                    tracing::warn!(error = %e, "cannot refresh this replica's record");
                }
            }
        });
        if let Some(mut heard) = self.store.hints() {
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                while let Some(hint) = heard.recv().await {
                    let Some(control) = weak.upgrade() else {
                        return;
                    };
                    control.take_hint(&hint);
                }
            });
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = self.replica.hints.set(tx);
            tokio::spawn(send_hints(Arc::downgrade(self), rx));
        }
        Ok(())
    }

    /// Leave: drop this replica's record and give up the lease, so others take over at once
    /// (a replica that dies instead is judged by its record's age).
    pub async fn leave_replicas(&self) {
        let _ = self.store.release_lease(SINGLETONS, &self.replica.id).await;
        let _ = self.store.delete_replica(&self.replica.id).await;
    }

    async fn heartbeat(&self) -> Result<()> {
        let Some(address) = self.replica.address.get() else {
            return Ok(());
        };
        let now = self.now();
        self.store
            .put_replica(&Replica {
                replica_id: self.replica.id.clone(),
                address: address.clone(),
                started_at: self.started_at,
                seen_at: now,
            })
            .await?;
        Ok(())
    }

    /// The other replicas that are alive, as the store last heard of them.
    pub async fn live_replicas(&self) -> Result<Vec<Replica>> {
        self.replicas_seen_within(REPLICA_GONE_AFTER).await
    }

    /// The replicas whose record was refreshed within `window`.
    pub(crate) async fn replicas_seen_within(&self, window: Duration) -> Result<Vec<Replica>> {
        let now = self.now();
        let gone = lodge_model::clock::millis(window);
        Ok(self
            .store
            .replicas()
            .await?
            .into_iter()
            .filter(|r| now.saturating_sub(r.seen_at) < gone)
            .collect())
    }

    /// Forget the records of replicas gone for an hour (each start is a new replica; the
    /// records of the dead ones only serve to judge what they left behind).
    pub(crate) async fn prune_replicas(&self) -> Result<()> {
        let now = self.now();
        let forget = lodge_model::clock::millis(REPLICA_FORGOTTEN_AFTER);
        for r in self.store.replicas().await? {
            if now.saturating_sub(r.seen_at) >= forget {
                self.store.delete_replica(&r.replica_id).await?;
            }
        }
        Ok(())
    }

    /// For operators: the live replicas, and whether each runs the singletons now.
    pub async fn list_replicas(&self, caller: &crate::Caller) -> Result<Vec<(Replica, bool)>> {
        crate::tokens::require_instance_admin(caller, "list replicas")?;
        let leader = self.store.lease_holder(SINGLETONS, self.now()).await?;
        Ok(self
            .live_replicas()
            .await?
            .into_iter()
            .map(|r| {
                let leads = leader.as_deref() == Some(r.replica_id.as_str());
                (r, leads)
            })
            .collect())
    }

    /// Take or renew the singletons' lease now; whether this replica holds it. On the embedded
    /// store there is one replica, which always does (and nothing is written).
    pub async fn lead(&self) -> bool {
        if !self.store.shared() {
            return true;
        }
        let now = self.now();
        let ttl = lodge_model::clock::millis(LEASE_TTL);
        match self
            .store
            .acquire_lease(SINGLETONS, &self.replica.id, now, ttl)
            .await
        {
            Ok(true) => {
                self.replica.lease_until.store(
                    now + ttl - lodge_model::clock::millis(LEASE_MARGIN),
                    Ordering::Release,
                );
                if self
                    .replica
                    .leading_since
                    .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    tracing::info!(replica = %self.replica.id, "this replica now runs the singletons");
                }
                true
            }
            Ok(false) => {
                self.step_down();
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the singletons' lease");
                // It may still hold it until its deadline passes; it does not claim more.
                // Past the deadline it has stepped down: taking the lease again later starts
                // a new period (node silence is counted afresh, as after a takeover, since
                // nodes could not record their heartbeats either while the store was away).
                if !self.leads() {
                    self.step_down();
                }
                self.leads()
            }
        }
    }

    /// Whether this replica may run a singleton's step now: it holds the lease and its last
    /// renewal is recent enough (checked before every step, so a holder that cannot reach
    /// the store stops before another replica can take over).
    pub fn leads(&self) -> bool {
        !self.store.shared() || self.now() < self.replica.lease_until.load(Ordering::Acquire)
    }

    /// Keep the lease renewed (or keep trying to take it) every [`LEASE_RENEW`], until the
    /// control plane is dropped. Nothing to do on the embedded store.
    pub(crate) fn spawn_lease(self: &Arc<Self>) {
        if !self.store.shared() {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(control) = weak.upgrade() else {
                    return;
                };
                control.lead().await;
                drop(control);
                tokio::time::sleep(LEASE_RENEW).await;
            }
        });
    }

    fn step_down(&self) {
        self.replica.lease_until.store(0, Ordering::Release);
        if self.replica.leading_since.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!(replica = %self.replica.id, "this replica no longer runs the singletons");
        }
    }

    /// Silence is counted from no earlier than when this replica started, or took over the
    /// singletons: a node had the whole period to reach it (Nomad's grace after a failover).
    pub(crate) fn judging_since(&self) -> i64 {
        self.started_at
            .max(self.replica.leading_since.load(Ordering::Acquire))
    }

    /// The secret replicas show each other.
    pub(crate) async fn peer_secret(&self) -> Result<&str> {
        let s = self
            .replica
            .secret
            .get_or_try_init(|| async {
                self.store
                    .setting_or_insert(PEER_SECRET, &lodge_model::id::secret_hex())
                    .await
            })
            .await?;
        Ok(s.as_str())
    }

    /// Ask whichever replica holds `node_id`'s session to wake it about `process_id`.
    pub(crate) fn hint_wake(&self, node_id: &str, process_id: &str) {
        if let Some(tx) = self.replica.hints.get() {
            let _ = tx.send(wake_line(node_id, process_id));
        }
    }

    /// A node's status changed through this replica: every replica reads the nodes afresh
    /// for its next placement (the hint goes before this returns, so a request that follows
    /// through another replica finds it there).
    pub(crate) async fn nodes_changed(&self) {
        self.forget_nodes();
        if self.store.shared() {
            if let Err(e) = self.store.send_hint(NODES_CHANGED).await {
                tracing::warn!(error = %e, "cannot tell the other replicas that a node changed");
            }
        }
    }

    /// As [`Self::nodes_changed`], the hint batched with the others (many nodes connecting
    /// at once after an outage make one hint, not one each).
    pub(crate) fn nodes_changed_soon(&self) {
        self.forget_nodes();
        if let Some(tx) = self.replica.hints.get() {
            let _ = tx.send(NODES_CHANGED.to_string());
        }
    }

    /// A hint from another replica: wake the sessions it names that are held here, forget
    /// the nodes as last read if they changed (or if hints may have been lost).
    fn take_hint(&self, hint: &str) {
        if hint.is_empty() {
            self.forget_nodes();
        }
        for line in hint.lines() {
            if line == NODES_CHANGED {
                self.forget_nodes();
                continue;
            }
            let mut words = line.split(' ');
            if let (Some("wake"), Some(node), Some(process)) =
                (words.next(), words.next(), words.next())
            {
                if let Some(remote) = self.remote_if_known(node) {
                    if remote.connected() {
                        lodge_model::node::NodeLink::wake(&*remote, process);
                    }
                }
            }
        }
    }
}

/// Send queued wake-ups as hints: everything waiting goes in as few hints as fit.
async fn send_hints(control: std::sync::Weak<Control>, mut rx: mpsc::UnboundedReceiver<String>) {
    while let Some(first) = rx.recv().await {
        let mut hint = first;
        while let Ok(next) = rx.try_recv() {
            if hint.len() + 1 + next.len() > lodge_store::MAX_HINT {
                send_one(&control, &hint).await;
                hint = next;
            } else {
                hint.push('\n');
                hint.push_str(&next);
            }
        }
        send_one(&control, &hint).await;
    }
}

async fn send_one(control: &std::sync::Weak<Control>, hint: &str) {
    let Some(control) = control.upgrade() else {
        return;
    };
    if let Err(e) = control.store.send_hint(hint).await {
        // The other replica's periodic comparison finds the change anyway.
        tracing::debug!(error = %e, "cannot send a hint to the other replicas");
    }
}
