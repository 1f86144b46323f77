//! The node's side of the node protocol: one session at a time with the control plane over
//! whatever stream `dial` opens (a TCP connection upgraded from HTTP for `lodge agent`, an
//! in-process pipe for the node embedded in `lodge serve`), reconnecting with backoff and full
//! jitter. The agent reads its desired processes from here and reports through here; while
//! the control plane is out of reach the last desired set stands (no game server is stopped
//! for want of a control plane) and reports wait, numbered, in the outbox.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lodge_link::dial::DialError;
use lodge_link::{write_frame, FrameReader};
use lodge_model::node::{ControlLink, LinkError, LinkResult, NodeLink};
use lodge_model::protocol::{
    Backoff, ControlMsg, Liveness, NodeCall, NodeInfo, NodeMsg, NodeReply, NodeSession, DEAD_AFTER,
    PING_EVERY,
};
use lodge_model::spec::{AgentEvent, ProcessSpec};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::sync::{mpsc, Notify};

use crate::Agent;

/// How often live counters go to the control plane.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// Events per frame.
const BATCH: usize = 512;

use lodge_model::clock::millis as ms;

fn now_ms() -> i64 {
    use lodge_model::Clock;
    lodge_model::SystemClock.now_ms()
}

pub struct NodeClient {
    node_id: String,
    info: Option<NodeInfo>,
    session: Mutex<NodeSession>,
    /// A report was queued.
    kick: Notify,
    agent: OnceLock<Weak<Agent>>,
    /// Whether a session is open now (for health and tests).
    connected: std::sync::atomic::AtomicBool,
}

impl NodeClient {
    pub fn new(node_id: &str, info: Option<NodeInfo>) -> Arc<Self> {
        let incarnation = u64::from_le_bytes(
            lodge_model::id::secret_hex().as_bytes()[..8]
                .try_into()
                .unwrap_or([1; 8]),
        );
        Arc::new(Self {
            node_id: node_id.to_string(),
            info,
            session: Mutex::new(NodeSession::with_incarnation(incarnation)),
            kick: Notify::new(),
            agent: OnceLock::new(),
            connected: Default::default(),
        })
    }

    /// The agent this client feeds (set once, after the agent started on this link).
    pub fn attach(&self, agent: &Arc<Agent>) {
        let _ = self.agent.set(Arc::downgrade(agent));
    }

    pub fn connected(&self) -> bool {
        self.connected.load(std::sync::atomic::Ordering::Acquire)
    }

    fn agent(&self) -> Option<Arc<Agent>> {
        self.agent.get().and_then(Weak::upgrade)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NodeSession> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep a session open for as long as the agent lives. `dial` opens a fresh stream;
    /// a refusal (a revoked credential) is logged and retried like any other failure, slowly.
    pub async fn run<D, F, S>(self: Arc<Self>, dial: D)
    where
        D: Fn() -> F,
        F: Future<Output = Result<S, DialError>>,
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            if self.agent.get().is_some() && self.agent().is_none() {
                return; // the agent is gone
            }
            match dial().await {
                Ok(stream) => {
                    let opened = Instant::now();
                    let result = self.session(stream).await;
                    self.connected
                        .store(false, std::sync::atomic::Ordering::Release);
                    self.lock().disconnect();
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "control-plane session ended; reconnecting");
                    }
                    if opened.elapsed() > Duration::from_secs(10) {
                        backoff.reset();
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot reach the control plane; retrying"),
            }
            let unit = f64::from(rand_u32()) / f64::from(u32::MAX);
            tokio::time::sleep(backoff.next(unit)).await;
        }
    }

    async fn session<S>(&self, stream: S) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, mut w) = tokio::io::split(stream);
        let mut reader = FrameReader::new(BufReader::new(r));
        let io = |e: lodge_link::FrameError| e.to_string();
        let hello = self.lock().connect(&self.node_id, self.info.clone());
        write_frame(&mut w, &hello).await.map_err(io)?;
        let (reply_tx, mut replies) = mpsc::unbounded_channel::<NodeMsg>();
        let mut liveness = Liveness::new(now_ms(), ms(PING_EVERY), ms(DEAD_AFTER));
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut last_stats = Instant::now() - STATS_EVERY;
        // Events up to this number were handed to this connection.
        let mut sent_here = 0u64;
        loop {
            tokio::select! {
                msg = reader.next::<ControlMsg>() => {
                    let msg = msg.map_err(io)?;
                    liveness.heard(now_ms());
                    let out = match msg {
                        ControlMsg::Call { id, call } => {
                            let (agent, tx) = (self.agent(), reply_tx.clone());
                            tokio::spawn(async move {
                                let reply = match agent {
                                    Some(a) => answer(&a, call).await,
                                    None => Err(LinkError::Unreachable("the node is shutting down".into())),
                                };
                                let _ = tx.send(NodeMsg::Reply { id, reply });
                            });
                            Vec::new()
                        }
                        ControlMsg::Refused { message } => return Err(format!("refused: {message}")),
                        ControlMsg::Prefetch { build_id } => {
                            if let Some(agent) = self.agent() {
                                tokio::spawn(async move { agent.prefetch(&build_id).await });
                            }
                            Vec::new()
                        }
                        desired @ ControlMsg::Desired { .. } => self.take_desired(desired),
                        welcome @ ControlMsg::Welcome { .. } => {
                            // The outbox goes again from its start, in bounded batches (below),
                            // not as the one message `receive` makes of it.
                            let _ = self.lock().receive(welcome);
                            self.connected.store(true, std::sync::atomic::Ordering::Release);
                            sent_here = 0;
                            self.kick.notify_one();
                            tracing::info!(node_id = %self.node_id, "control-plane session open");
                            Vec::new()
                        }
                        other => self.lock().receive(other),
                    };
                    for m in out {
                        write_frame(&mut w, &m).await.map_err(io)?;
                    }
                }
                _ = self.kick.notified() => {
                    loop {
                        let next = self.lock().outgoing_after(sent_here, BATCH);
                        let Some((m, last)) = next else { break };
                        sent_here = last;
                        write_frame(&mut w, &m).await.map_err(io)?;
                    }
                }
                Some(m) = replies.recv() => write_frame(&mut w, &m).await.map_err(io)?,
                _ = tick.tick() => {
                    let now = now_ms();
                    if liveness.dead(now) {
                        return Err(format!("no word from the control plane for {DEAD_AFTER:?}"));
                    }
                    if liveness.ping_due(now) {
                        write_frame(&mut w, &NodeMsg::Ping).await.map_err(io)?;
                    }
                    if last_stats.elapsed() >= STATS_EVERY {
                        last_stats = Instant::now();
                        if let Some(a) = self.agent() {
                            let stats = NodeMsg::Stats {
                                processes: a.all_stats(),
                                flows: NodeLink::flows(a.as_ref()),
                            };
                            write_frame(&mut w, &stats).await.map_err(io)?;
                        }
                    }
                }
            }
        }
    }

    /// Apply a desired-state message and wake the agent for what it changed.
    fn take_desired(&self, msg: ControlMsg) -> Vec<NodeMsg> {
        let ControlMsg::Desired {
            full,
            upserts,
            removed,
            ..
        } = &msg
        else {
            return Vec::new();
        };
        let changed: Vec<String> = upserts
            .iter()
            .map(|s| s.process_id.clone())
            .chain(removed.iter().cloned())
            .collect();
        let full = *full;
        let (out, first) = {
            let mut s = self.lock();
            let had = s.has_desired();
            (s.receive(msg), !had)
        };
        if let Some(agent) = self.agent() {
            if full || first {
                agent.wake();
            } else {
                for id in changed {
                    agent.wake_for(&id);
                }
            }
        }
        out
    }
}

/// Answer a call with what the agent keeps.
async fn answer(agent: &Agent, call: NodeCall) -> Result<NodeReply, LinkError> {
    Ok(match call {
        NodeCall::LogTail { process_id, lines } => {
            let (bytes, end) = agent.log_tail(&process_id, lines).await?;
            NodeReply::Log { bytes, end }
        }
        NodeCall::LogRead {
            process_id,
            offset,
            max,
        } => {
            let max = max.min(lodge_model::protocol::MAX_LOG_READ);
            let bytes = agent.log_read(&process_id, offset, max).await?;
            let end = offset + bytes.len() as u64;
            NodeReply::Log { bytes, end }
        }
        NodeCall::KeptProcesses => NodeReply::Processes {
            ids: agent.kept_processes().await?,
        },
        NodeCall::ForgetProcess { process_id } => {
            agent.forget_process(&process_id).await?;
            NodeReply::Done
        }
        NodeCall::Metrics {
            process_id,
            start_s,
            end_s,
            step_s,
        } => NodeReply::Metrics {
            series: agent.metrics(&process_id, start_s, end_s, step_s).await?,
        },
    })
}

fn rand_u32() -> u32 {
    let hex = lodge_model::id::secret_hex();
    u32::from_str_radix(&hex[..8], 16).unwrap_or(0)
}

#[async_trait]
impl ControlLink for NodeClient {
    async fn desired(&self, _node_id: &str) -> LinkResult<Vec<ProcessSpec>> {
        let s = self.lock();
        if !s.has_desired() {
            return Err(LinkError::Unreachable(
                "no desired state from the control plane yet".into(),
            ));
        }
        Ok(s.desired().cloned().collect())
    }

    async fn specs(&self, _node_id: &str, ids: &[String]) -> LinkResult<Vec<ProcessSpec>> {
        let wanted: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        let s = self.lock();
        Ok(s.desired()
            .filter(|spec| wanted.contains(spec.process_id.as_str()))
            .cloned()
            .collect())
    }

    async fn report(&self, event: AgentEvent) {
        self.lock().push(event);
        self.kick.notify_one();
    }
}
