//! The control plane's handle on a node that speaks the node protocol (a joined agent, or the
//! node embedded in `lodge serve` over an in-process pipe): what [`NodeLink`] asks becomes a
//! message on the node's current session, and the live counters it pushes are kept here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use lodge_model::node::{FlowTotals, LinkError, LinkResult, MetricSeries, NodeLink, ProcessStats};
use lodge_model::protocol::{NodeCall, NodeReply, MAX_LOG_READ};
use tokio::sync::{mpsc, oneshot};

/// How long a call may wait for the node's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What the node's session task is asked to send.
#[derive(Debug)]
pub(crate) enum ToSession {
    /// Look at this process again (placed, or asked to stop).
    Wake(String),
    Call(u64, NodeCall),
    Prefetch(String),
}

type Pending = HashMap<u64, oneshot::Sender<LinkResult<NodeReply>>>;

pub struct RemoteNode {
    node_id: String,
    /// The node protocol's state for this node (its sessions take turns under this lock).
    pub(crate) proto: tokio::sync::Mutex<lodge_model::protocol::NodeState>,
    /// The current session's epoch and its inbox; `None` while disconnected.
    session: Mutex<Option<(u64, mpsc::UnboundedSender<ToSession>)>>,
    calls: Mutex<Pending>,
    next_call: AtomicU64,
    stats: Mutex<(HashMap<String, ProcessStats>, FlowTotals)>,
    /// When the node was last heard from (control-plane clock, ms), and whether a session is
    /// open.
    last_heard: AtomicI64,
    connected: AtomicBool,
}

impl RemoteNode {
    pub(crate) fn new(node_id: &str, now: i64) -> Self {
        Self {
            node_id: node_id.to_string(),
            proto: tokio::sync::Mutex::default(),
            session: Mutex::default(),
            calls: Mutex::default(),
            next_call: AtomicU64::new(1),
            stats: Mutex::default(),
            last_heard: AtomicI64::new(now),
            connected: AtomicBool::new(false),
        }
    }

    /// A new session took over; the previous one (if any) sees its inbox close.
    pub(crate) fn attach(&self, epoch: u64, now: i64) -> mpsc::UnboundedReceiver<ToSession> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        if s.as_ref().is_some_and(|(current, _)| *current > epoch) {
            // An older session than the one attached: its inbox closes at once and it ends.
            return rx;
        }
        *s = Some((epoch, tx));
        drop(s);
        self.connected.store(true, Ordering::Release);
        self.heard(now);
        rx
    }

    /// The session of `epoch` ended; unless a newer one has taken over, the node is now
    /// disconnected and its pending calls fail.
    pub(crate) fn detach(&self, epoch: u64) {
        let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        if s.as_ref().is_some_and(|(e, _)| *e == epoch) {
            *s = None;
            self.connected.store(false, Ordering::Release);
            drop(s);
            let pending =
                std::mem::take(&mut *self.calls.lock().unwrap_or_else(|p| p.into_inner()));
            for (_, tx) in pending {
                let _ = tx.send(Err(LinkError::Unreachable(format!(
                    "node {} disconnected",
                    self.node_id
                ))));
            }
        }
    }

    pub(crate) fn heard(&self, now: i64) {
        self.last_heard.fetch_max(now, Ordering::AcqRel);
    }

    pub(crate) fn node_id_str(&self) -> &str {
        &self.node_id
    }

    pub fn last_heard(&self) -> i64 {
        self.last_heard.load(Ordering::Acquire)
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub(crate) fn set_stats(&self, processes: Vec<(String, ProcessStats)>, flows: FlowTotals) {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) =
            (processes.into_iter().collect(), flows);
    }

    pub(crate) fn answer(&self, id: u64, reply: LinkResult<NodeReply>) {
        if let Some(tx) = self
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
        {
            let _ = tx.send(reply);
        }
    }

    /// Have the node fetch a build ahead of its first process.
    pub(crate) fn prefetch(&self, build_id: &str) {
        self.send(ToSession::Prefetch(build_id.to_string()));
    }

    fn send(&self, msg: ToSession) -> bool {
        let s = self.session.lock().unwrap_or_else(|p| p.into_inner());
        s.as_ref().is_some_and(|(_, tx)| tx.send(msg).is_ok())
    }

    pub(crate) async fn call(&self, call: NodeCall) -> LinkResult<NodeReply> {
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        if !self.send(ToSession::Call(id, call)) {
            self.calls
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(LinkError::Unreachable(format!(
                "node {} is not connected",
                self.node_id
            )));
        }
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(LinkError::Unreachable(format!(
                "node {} disconnected",
                self.node_id
            ))),
            Err(_) => {
                self.calls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                Err(LinkError::Unreachable(format!(
                    "node {} did not answer within {CALL_TIMEOUT:?}",
                    self.node_id
                )))
            }
        }
    }
}

fn unexpected(r: NodeReply) -> LinkError {
    LinkError::Io(format!("unexpected answer from the node: {r:?}"))
}

/// What answers [`NodeCall`]s for a node: its session here ([`RemoteNode`]), or the replica
/// that holds its session ([`crate::peer::PeerNode`]). The [`NodeLink`] calls are the same
/// questions either way.
#[async_trait]
pub(crate) trait Calls: Send + Sync {
    async fn call(&self, call: NodeCall) -> LinkResult<NodeReply>;
}

#[async_trait]
impl Calls for RemoteNode {
    async fn call(&self, call: NodeCall) -> LinkResult<NodeReply> {
        RemoteNode::call(self, call).await
    }
}

pub(crate) async fn log_tail(
    c: &dyn Calls,
    process_id: &str,
    lines: usize,
) -> LinkResult<(Vec<u8>, u64)> {
    match c
        .call(NodeCall::LogTail {
            process_id: process_id.to_string(),
            lines,
        })
        .await?
    {
        NodeReply::Log { bytes, end } => Ok((bytes, end)),
        r => Err(unexpected(r)),
    }
}

pub(crate) async fn log_read(
    c: &dyn Calls,
    process_id: &str,
    offset: u64,
    max: usize,
) -> LinkResult<Vec<u8>> {
    match c
        .call(NodeCall::LogRead {
            process_id: process_id.to_string(),
            offset,
            max: max.min(MAX_LOG_READ),
        })
        .await?
    {
        NodeReply::Log { bytes, .. } => Ok(bytes),
        r => Err(unexpected(r)),
    }
}

pub(crate) async fn kept_processes(c: &dyn Calls) -> LinkResult<Vec<String>> {
    match c.call(NodeCall::KeptProcesses).await? {
        NodeReply::Processes { ids } => Ok(ids),
        r => Err(unexpected(r)),
    }
}

pub(crate) async fn forget_process(c: &dyn Calls, process_id: &str) -> LinkResult<()> {
    match c
        .call(NodeCall::ForgetProcess {
            process_id: process_id.to_string(),
        })
        .await?
    {
        NodeReply::Done => Ok(()),
        r => Err(unexpected(r)),
    }
}

pub(crate) async fn metrics(
    c: &dyn Calls,
    process_id: &str,
    start_s: i64,
    end_s: i64,
    step_s: i64,
) -> LinkResult<MetricSeries> {
    match c
        .call(NodeCall::Metrics {
            process_id: process_id.to_string(),
            start_s,
            end_s,
            step_s,
        })
        .await?
    {
        NodeReply::Metrics { series } => Ok(series),
        r => Err(unexpected(r)),
    }
}

#[async_trait]
impl NodeLink for RemoteNode {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn wake(&self, process_id: &str) {
        // Without a session the next one starts with the whole desired set anyway.
        self.send(ToSession::Wake(process_id.to_string()));
    }

    fn stats(&self, process_id: &str) -> Option<ProcessStats> {
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .get(process_id)
            .copied()
    }

    fn flows(&self) -> FlowTotals {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    async fn log_tail(&self, process_id: &str, lines: usize) -> LinkResult<(Vec<u8>, u64)> {
        log_tail(self, process_id, lines).await
    }

    async fn log_read(&self, process_id: &str, offset: u64, max: usize) -> LinkResult<Vec<u8>> {
        log_read(self, process_id, offset, max).await
    }

    async fn kept_processes(&self) -> LinkResult<Vec<String>> {
        kept_processes(self).await
    }

    async fn forget_process(&self, process_id: &str) -> LinkResult<()> {
        forget_process(self, process_id).await
    }

    async fn metrics(
        &self,
        process_id: &str,
        start_s: i64,
        end_s: i64,
        step_s: i64,
    ) -> LinkResult<MetricSeries> {
        metrics(self, process_id, start_s, end_s, step_s).await
    }
}
