//! A node whose session another replica holds, reached through that replica: each
//! [`NodeCall`] is posted to the holder's API (`POST /lodge/v1/replica/node-call`, with the
//! secret the replicas share) and its answer comes back as the node gave it. The caller sees the
//! same [`NodeLink`] as for a node attached here (Nomad forwards client RPCs the same way).

use async_trait::async_trait;
use lodge_model::node::{FlowTotals, LinkError, LinkResult, MetricSeries, NodeLink, ProcessStats};
use lodge_model::protocol::{NodeCall, NodeReply};
use serde::{Deserialize, Serialize};

use crate::remote::{self, Calls};
use crate::{Control, Error, Result};

/// The path a replica answers forwarded calls on.
pub const PEER_CALL_PATH: &str = "/lodge/v1/replica/node-call";
/// The header that carries the replicas' shared secret.
pub const PEER_SECRET_HEADER: &str = "x-lodge-peer-secret";

/// A forwarded call, as posted to the replica that holds the node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerCall {
    pub node_id: String,
    pub call: NodeCall,
}

pub(crate) struct PeerNode {
    node_id: String,
    /// The holder's base URL.
    address: String,
    secret: String,
    http: reqwest::Client,
}

#[async_trait]
impl Calls for PeerNode {
    async fn call(&self, call: NodeCall) -> LinkResult<NodeReply> {
        let unreachable = |why: String| {
            LinkError::Unreachable(format!(
                "node {} is attached to the replica at {}, which {why}",
                self.node_id, self.address
            ))
        };
        let res = self
            .http
            .post(format!("{}{PEER_CALL_PATH}", self.address))
            .header(PEER_SECRET_HEADER, &self.secret)
            .json(&PeerCall {
                node_id: self.node_id.clone(),
                call,
            })
            .send()
            .await
            .map_err(|e| unreachable(format!("cannot be reached: {e}")))?;
        let status = res.status();
        if !status.is_success() {
            let body = res.text().await.unwrap_or_default();
            return Err(unreachable(format!("answered {status}: {body}")));
        }
        res.json::<LinkResult<NodeReply>>()
            .await
            .map_err(|e| unreachable(format!("gave an answer this replica cannot read: {e}")))?
    }
}

#[async_trait]
impl NodeLink for PeerNode {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn wake(&self, _process_id: &str) {
        // Wake-ups for nodes held elsewhere go as hints (Control::wake_node).
    }

    fn stats(&self, _process_id: &str) -> Option<ProcessStats> {
        None
    }

    fn flows(&self) -> FlowTotals {
        FlowTotals::default()
    }

    async fn log_tail(&self, process_id: &str, lines: usize) -> LinkResult<(Vec<u8>, u64)> {
        remote::log_tail(self, process_id, lines).await
    }

    async fn log_read(&self, process_id: &str, offset: u64, max: usize) -> LinkResult<Vec<u8>> {
        remote::log_read(self, process_id, offset, max).await
    }

    async fn kept_processes(&self) -> LinkResult<Vec<String>> {
        remote::kept_processes(self).await
    }

    async fn forget_process(&self, process_id: &str) -> LinkResult<()> {
        remote::forget_process(self, process_id).await
    }

    async fn metrics(
        &self,
        process_id: &str,
        start_s: i64,
        end_s: i64,
        step_s: i64,
    ) -> LinkResult<MetricSeries> {
        remote::metrics(self, process_id, start_s, end_s, step_s).await
    }
}

impl Control {
    /// The node that keeps what only a node has, wherever its session is: here, or on the live
    /// replica the store says holds it.
    pub(crate) async fn node_link(
        &self,
        node_id: &str,
    ) -> Result<Option<std::sync::Arc<dyn NodeLink>>> {
        let here = self.agents().into_iter().find(|a| a.node_id() == node_id);
        let attached_here = self.remote_if_known(node_id).is_none_or(|r| r.connected());
        if let (Some(link), true) = (&here, attached_here) {
            return Ok(Some(link.clone()));
        }
        if self.store.shared() {
            let holder = self.store.node(node_id).await?.and_then(|n| n.replica);
            if let Some(holder) = holder.filter(|h| h != self.replica_id()) {
                if let Some(r) = self
                    .live_replicas()
                    .await?
                    .into_iter()
                    .find(|r| r.replica_id == holder)
                {
                    return Ok(Some(std::sync::Arc::new(PeerNode {
                        node_id: node_id.to_string(),
                        address: r.address,
                        secret: self.peer_secret().await?.to_string(),
                        http: self.replica.http.clone(),
                    })));
                }
            }
        }
        Ok(here)
    }

    /// Answer a call another replica forwards for a node whose session is held here.
    pub async fn answer_peer_call(
        &self,
        secret: &str,
        call: PeerCall,
    ) -> Result<LinkResult<NodeReply>> {
        if !crate::tokens::same(secret, self.peer_secret().await?) {
            return Err(Error::Unauthorized(
                "this endpoint is for Lodge's replicas".into(),
            ));
        }
        match self.remote_if_known(&call.node_id) {
            Some(r) if r.connected() => Ok(r.call(call.call).await),
            _ => Ok(Err(LinkError::Unreachable(format!(
                "node {} is not connected to this replica",
                call.node_id
            )))),
        }
    }
}
