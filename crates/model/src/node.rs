//! The node boundary, typed once for both sides: what the control plane asks of a node
//! ([`NodeLink`]) and what a node asks of the control plane ([`ControlLink`]). In `lodge serve`
//! both are direct calls between the control plane and its embedded node; a remote node speaks
//! the same operations over the network.

use std::collections::BTreeSet;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::spec::{AgentEvent, ProcessSpec};

/// Why a call across the node boundary failed, kept typed across the network, so that each side
/// can act on it (an API answers 503 for a node out of reach and 404 for what a node does not
/// have, not 500 for both).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "message", rename_all = "camelCase")]
pub enum LinkError {
    /// The other side cannot be reached now (disconnected, no answer in time, no desired state
    /// from the control plane yet).
    #[error("{0}")]
    Unreachable(String),
    /// What was asked for is not there, or not a valid name of anything.
    #[error("{0}")]
    NotFound(String),
    /// The other side refused (a process still runs, a bad argument).
    #[error("{0}")]
    Refused(String),
    /// Reading or writing failed on the other side (its message says what and why).
    #[error("{0}")]
    Io(String),
}

impl LinkError {
    /// An I/O failure while doing `what`; a missing file is [`LinkError::NotFound`].
    pub fn io(what: impl std::fmt::Display, e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            LinkError::NotFound(format!("{what}: {e}"))
        } else {
            LinkError::Io(format!("{what}: {e}"))
        }
    }
}

pub type LinkResult<T> = Result<T, LinkError>;

/// The node's view of the control plane.
#[async_trait]
pub trait ControlLink: Send + Sync + 'static {
    /// Live processes assigned to this node (to run, keep running, or stop).
    async fn desired(&self, node_id: &str) -> LinkResult<Vec<ProcessSpec>>;
    /// Just these processes, if live and on this node: what changed since the last look.
    async fn specs(&self, node_id: &str, ids: &[String]) -> LinkResult<Vec<ProcessSpec>> {
        let wanted: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        Ok(self
            .desired(node_id)
            .await?
            .into_iter()
            .filter(|s| wanted.contains(s.process_id.as_str()))
            .collect())
    }
    async fn report(&self, event: AgentEvent);
}

/// The control plane's view of a node.
#[async_trait]
pub trait NodeLink: Send + Sync + 'static {
    fn node_id(&self) -> &str;
    /// Look at this process now (it was placed, or asked to stop), not at the next full pass.
    fn wake(&self, process_id: &str);
    /// Live counters of a process the node runs; `None` if it runs no such process.
    fn stats(&self, process_id: &str) -> Option<ProcessStats>;
    /// Players' flows on the node's public ports, against its cap.
    fn flows(&self) -> FlowTotals;
    /// The last `lines` lines of a process's log, and the log's length they end at (where a
    /// follower goes on reading). An absent log is empty.
    async fn log_tail(&self, process_id: &str, lines: usize) -> LinkResult<(Vec<u8>, u64)>;
    /// Up to `max` bytes of a process's log from `offset`; empty at its end.
    async fn log_read(&self, process_id: &str, offset: u64, max: usize) -> LinkResult<Vec<u8>>;
    /// Processes whose log and metrics the node still keeps.
    async fn kept_processes(&self) -> LinkResult<Vec<String>>;
    /// Delete what the node keeps of an ended process (its log and metrics).
    async fn forget_process(&self, process_id: &str) -> LinkResult<()>;
    /// A process's metrics over `[start_s, end_s)` in buckets of `step_s` seconds.
    async fn metrics(
        &self,
        process_id: &str,
        start_s: i64,
        end_s: i64,
        step_s: i64,
    ) -> LinkResult<MetricSeries>;
}

/// Live counters of one process's public ports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStats {
    pub active_connections: u64,
    pub total_connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// A node's players' flows (UDP sessions and TCP connections) and its cap on them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowTotals {
    pub active: u64,
    pub max: u64,
    pub refused: u64,
    /// Whether the kernel forwards the node's public ports (else Lodge's userspace proxy).
    #[serde(default)]
    pub kernel_forwarding: bool,
    /// Packets the kernel's per-source rate limit dropped on the node's public ports.
    #[serde(default)]
    pub rate_limited: u64,
}

/// A point of a series: unix seconds and a value.
pub type Point = (i64, f64);

/// Hathora's process metrics over a window. Buckets without samples are left out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricSeries {
    /// vCPU cores used (1.0 = one core busy).
    pub cpu: Vec<Point>,
    /// Resident memory in MB.
    pub memory: Vec<Point>,
    /// Bytes per second sent to players.
    pub rate_egress: Vec<Point>,
    /// Bytes sent to players since the process started, at the end of the bucket.
    pub total_egress: Vec<Point>,
    /// The most connections seen in the bucket.
    pub active_connections: Vec<Point>,
}
