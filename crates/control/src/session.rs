//! The control plane's side of one node connection: open a fenced session, send the node its
//! desired processes (the whole set, then changes by revision), apply its numbered events once
//! each, answer its pings and carry calls to it. Any byte stream will do: an upgraded HTTP
//! connection from a joined agent, or an in-process pipe to the embedded node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use lodge_link::{write_frame, FrameReader};
use lodge_model::protocol::{ControlMsg, Liveness, NodeMsg, NodeState, DEAD_AFTER, PING_EVERY};
use lodge_model::spec::{AgentEvent, ProcessSpec};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};

use crate::remote::{RemoteNode, ToSession};
use crate::{Control, Error, Result};

/// How often the whole desired set is compared with what the node was sent: the safety net
/// under the wake-ups (a change made by another replica, a wake-up lost to a disconnect).
const RESYNC_EVERY: Duration = Duration::from_secs(5);
/// How often the store learns that a node is alive (what other replicas judge it by).
const TOUCH_EVERY: Duration = Duration::from_secs(3);
/// How long a node has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

use lodge_model::clock::millis as ms;

/// Tell the node why its session is refused or closed (best effort: it may be gone already);
/// returns the message, for the error that ends the session.
async fn refuse<W: AsyncWrite + Unpin>(w: &mut W, message: String) -> String {
    let _ = write_frame(
        w,
        &ControlMsg::Refused {
            message: message.clone(),
        },
    )
    .await;
    message
}

/// What the session last sent the node as desired, and at which revision.
struct Sent {
    rev: u64,
    specs: BTreeMap<String, ProcessSpec>,
}

impl Sent {
    /// A full set at the session's first revision.
    fn full(epoch: u64, specs: Vec<ProcessSpec>) -> (Self, ControlMsg) {
        let rev = epoch << 32 | 1;
        let specs: BTreeMap<_, _> = specs
            .into_iter()
            .map(|s| (s.process_id.clone(), s))
            .collect();
        let msg = ControlMsg::Desired {
            rev,
            base: 0,
            full: true,
            upserts: specs.values().cloned().collect(),
            removed: Vec::new(),
        };
        (Self { rev, specs }, msg)
    }

    /// The whole set again (the node asked for it), at a new revision.
    fn resend(&mut self) -> ControlMsg {
        self.rev += 1;
        ControlMsg::Desired {
            rev: self.rev,
            base: 0,
            full: true,
            upserts: self.specs.values().cloned().collect(),
            removed: Vec::new(),
        }
    }

    /// The change from what was sent to `now` for the processes in `scope` (every process if
    /// `None`), if there is one.
    fn change(&mut self, scope: Option<&[String]>, now: Vec<ProcessSpec>) -> Option<ControlMsg> {
        let now: BTreeMap<_, _> = now.into_iter().map(|s| (s.process_id.clone(), s)).collect();
        let mut upserts = Vec::new();
        let mut removed = Vec::new();
        for (id, spec) in &now {
            if self.specs.get(id) != Some(spec) {
                upserts.push(spec.clone());
            }
        }
        let gone: Vec<String> = match scope {
            Some(ids) => ids
                .iter()
                .filter(|id| !now.contains_key(*id) && self.specs.contains_key(*id))
                .cloned()
                .collect(),
            None => self
                .specs
                .keys()
                .filter(|id| !now.contains_key(*id))
                .cloned()
                .collect(),
        };
        for id in gone {
            self.specs.remove(&id);
            removed.push(id);
        }
        if upserts.is_empty() && removed.is_empty() {
            return None;
        }
        for s in &upserts {
            self.specs.insert(s.process_id.clone(), s.clone());
        }
        let base = self.rev;
        self.rev += 1;
        Some(ControlMsg::Desired {
            rev: self.rev,
            base,
            full: false,
            upserts,
            removed,
        })
    }
}

impl Control {
    /// Serve one connection of node `node_id` (already authenticated) until it ends.
    pub async fn serve_node<S>(self: &Arc<Self>, node_id: &str, io: S) -> Result<()>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, mut w) = tokio::io::split(io);
        let mut reader = FrameReader::new(BufReader::new(r));
        let hello: NodeMsg = tokio::time::timeout(HELLO_TIMEOUT, reader.next())
            .await
            .map_err(|_| Error::BadRequest("no hello from the node".into()))?
            .map_err(|e| Error::BadRequest(format!("node connection: {e}")))?;
        let NodeMsg::Hello {
            node_id: said,
            info,
            ..
        } = &hello
        else {
            return Err(Error::BadRequest(
                "the first message must be a hello".into(),
            ));
        };
        if said != node_id {
            let message = format!("this credential is node {node_id}'s, not {said}'s");
            return Err(Error::Unauthorized(refuse(&mut w, message).await));
        }
        let remote = self.remote_node(node_id);
        // Open the session under the node's protocol state, read from and written to its record
        // so the numbering survives a restart of the control plane.
        let (welcome, epoch, inbox) = {
            let mut proto = remote.proto.lock().await;
            let node = self
                .store
                .node(node_id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("Node not found: {node_id}")))?;
            *proto = NodeState {
                epoch: proto.epoch.max(node.epoch),
                last_event_seq: node.last_event_seq,
                incarnation: node.incarnation,
            };
            if let (true, Some(info), Some(joined)) = (node.remote, info, node.regions.as_ref()) {
                let bad = if !joined.contains(&info.region) {
                    Some(format!(
                        "this node joined region {}, not {}: run it with --region {0}, or join again",
                        joined.first().map_or("?", |r| r.as_str()),
                        info.region
                    ))
                } else {
                    crate::fleet::check_public_host(info)
                        .err()
                        .map(|e| e.to_string())
                };
                if let Some(message) = bad {
                    return Err(Error::BadRequest(refuse(&mut w, message).await));
                }
            }
            let welcome = match proto.open(&hello) {
                Ok(w) => w,
                Err(refused) => {
                    return Err(Error::BadRequest(refuse(&mut w, refused.to_string()).await));
                }
            };
            let (state, now) = (proto.clone(), self.now());
            let replica = self.replica_id().to_string();
            self.store
                .update_node(node_id, &|node| {
                    node.epoch = state.epoch;
                    node.last_event_seq = state.last_event_seq;
                    node.incarnation = state.incarnation;
                    node.last_seen_at = Some(now);
                    node.replica = Some(replica.clone());
                    if let Some(info) = info {
                        node.public_host = info.public_host.clone();
                        node.cpu = info.cpu;
                        node.memory_mb = info.memory_mb;
                        node.port_capacity = info.port_capacity;
                        node.ping_port = info.ping_port;
                    }
                    // Its regions stay as its join token set them.
                    true
                })
                .await?;
            // Attached under the lock, so a newer session is never replaced by an older one.
            let inbox = remote.attach(proto.epoch, self.now());
            (welcome, proto.epoch, inbox)
        };
        let mut inbox = inbox;
        // It may take work now: placements anywhere read the nodes afresh.
        self.nodes_changed_soon();
        tracing::info!(%node_id, epoch, "node connected");
        let result = self
            .run_session(&remote, epoch, welcome, &mut reader, &mut w, &mut inbox)
            .await;
        remote.detach(epoch);
        self.touch_node(node_id, remote.last_heard()).await;
        match &result {
            Ok(()) => tracing::info!(%node_id, epoch, "node session ended"),
            Err(e) => tracing::warn!(%node_id, epoch, error = %e, "node session ended"),
        }
        result
    }

    async fn run_session<R, W>(
        self: &Arc<Self>,
        remote: &Arc<RemoteNode>,
        epoch: u64,
        welcome: ControlMsg,
        reader: &mut FrameReader<BufReader<R>>,
        w: &mut W,
        inbox: &mut tokio::sync::mpsc::UnboundedReceiver<ToSession>,
    ) -> Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let node_id = remote.node_id_str().to_string();
        let io = |e: lodge_link::FrameError| Error::BadRequest(format!("node connection: {e}"));
        write_frame(w, &welcome).await.map_err(io)?;
        let (mut sent, full) = Sent::full(epoch, self.desired_for(&node_id).await?);
        write_frame(w, &full).await.map_err(io)?;
        let mut liveness = Liveness::new(self.now(), ms(PING_EVERY), ms(DEAD_AFTER));
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut last_resync = tokio::time::Instant::now();
        let mut last_touch = tokio::time::Instant::now();
        loop {
            tokio::select! {
                msg = reader.next::<NodeMsg>() => {
                    let msg = msg.map_err(io)?;
                    let now = self.now();
                    liveness.heard(now);
                    remote.heard(now);
                    match msg {
                        NodeMsg::Events { events } => {
                            let (ack, exited) = {
                                let mut proto = remote.proto.lock().await;
                                let before = proto.last_event_seq;
                                let (apply, ack) = proto
                                    .events(epoch, events)
                                    .map_err(|e| Error::BadRequest(e.to_string()))?;
                                let mut done = 0u64;
                                let mut exited = Vec::new();
                                let mut failure = None;
                                for event in apply {
                                    match self.apply_report(&node_id, event).await {
                                        Ok(ended) => {
                                            done += 1;
                                            exited.extend(ended);
                                        }
                                        Err(e) => {
                                            failure = Some(e);
                                            break;
                                        }
                                    }
                                }
                                if done > 0 || failure.is_some() {
                                    // Only what was applied counts as applied.
                                    proto.last_event_seq = before + done;
                                    self.save_event_seq(&node_id, proto.last_event_seq).await;
                                }
                                if let Some(e) = failure {
                                    // Unacknowledged, the rest comes again on the next session.
                                    return Err(e);
                                }
                                (ack, exited)
                            };
                            write_frame(w, &ack).await.map_err(io)?;
                            if !exited.is_empty() {
                                // An ended process leaves the node's desired set at once.
                                let now = self.specs_for(&node_id, &exited).await?;
                                if let Some(change) = sent.change(Some(&exited), now) {
                                    write_frame(w, &change).await.map_err(io)?;
                                }
                            }
                        }
                        NodeMsg::Resync => write_frame(w, &sent.resend()).await.map_err(io)?,
                        NodeMsg::Stats { processes, flows } => remote.set_stats(processes, flows),
                        NodeMsg::Reply { id, reply } => remote.answer(id, reply),
                        NodeMsg::Ping => write_frame(w, &ControlMsg::Pong).await.map_err(io)?,
                        NodeMsg::Pong | NodeMsg::DesiredAck { .. } => {}
                        NodeMsg::Hello { .. } => {
                            return Err(Error::BadRequest("a second hello on one session".into()))
                        }
                    }
                }
                order = inbox.recv() => {
                    let Some(first) = order else {
                        // A newer session took over.
                        refuse(w, "a newer session of this node took over".into()).await;
                        return Ok(());
                    };
                    let mut wakes = Vec::new();
                    let mut next = Some(first);
                    while let Some(o) = next.take() {
                        match o {
                            ToSession::Wake(id) => wakes.push(id),
                            ToSession::Call(id, call) => {
                                write_frame(w, &ControlMsg::Call { id, call }).await.map_err(io)?
                            }
                            ToSession::Prefetch(build_id) => {
                                write_frame(w, &ControlMsg::Prefetch { build_id }).await.map_err(io)?
                            }
                        }
                        next = inbox.try_recv().ok();
                    }
                    if !wakes.is_empty() {
                        wakes.sort();
                        wakes.dedup();
                        let now = self.specs_for(&node_id, &wakes).await?;
                        if let Some(change) = sent.change(Some(&wakes), now) {
                            write_frame(w, &change).await.map_err(io)?;
                        }
                    }
                }
                _ = tick.tick() => {
                    let now = self.now();
                    if liveness.dead(now) {
                        return Err(Error::BadRequest(format!(
                            "no word from the node for {DEAD_AFTER:?}"
                        )));
                    }
                    if liveness.ping_due(now) {
                        write_frame(w, &ControlMsg::Ping).await.map_err(io)?;
                    }
                    if last_touch.elapsed() >= TOUCH_EVERY {
                        // Every replica judges liveness from the store.
                        last_touch = tokio::time::Instant::now();
                        self.touch_node(&node_id, remote.last_heard()).await;
                    }
                    if last_resync.elapsed() >= RESYNC_EVERY {
                        last_resync = tokio::time::Instant::now();
                        let desired = self.desired_for(&node_id).await?;
                        if let Some(change) = sent.change(None, desired) {
                            write_frame(w, &change).await.map_err(io)?;
                        }
                    }
                }
            }
        }
    }

    async fn save_event_seq(&self, node_id: &str, seq: u64) {
        let saved = self
            .store
            .update_node(node_id, &|node| {
                let moved = node.last_event_seq != seq;
                node.last_event_seq = seq;
                moved
            })
            .await;
        if let Err(e) = saved {
            tracing::warn!(%node_id, error = %e, "cannot record the node's last event");
        }
    }

    async fn touch_node(&self, node_id: &str, heard: i64) {
        let saved = self
            .store
            .update_node(node_id, &|node| {
                let moved = node.last_seen_at < Some(heard);
                node.last_seen_at = node.last_seen_at.max(Some(heard));
                moved
            })
            .await;
        if let Err(e) = saved {
            tracing::warn!(%node_id, error = %e, "cannot record when the node was heard from");
        }
    }

    /// Record a node's report about one of its own processes, retrying a few times; returns
    /// the process if it ended. A report about a process of another node (or none) is dropped:
    /// a node speaks only for itself. An error means the report was not recorded (the store is
    /// out of reach): the session ends without acknowledging it, and the node sends it again.
    async fn apply_report(&self, node_id: &str, event: AgentEvent) -> Result<Option<String>> {
        let pid = match &event {
            AgentEvent::Booted { process_id, .. }
            | AgentEvent::Running { process_id, .. }
            | AgentEvent::Exited { process_id, .. }
            | AgentEvent::Activity { process_id, .. } => process_id.clone(),
        };
        let mut last = None;
        for attempt in 0..5u32 {
            let owned = match self.store.process(&pid).await {
                Ok(p) => p.is_some_and(|p| p.node_id == node_id),
                Err(e) => {
                    last = Some(Error::from(e));
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await;
                    continue;
                }
            };
            if !owned {
                tracing::warn!(%node_id, process_id = %pid, "a node reported on a process that is not its own; ignored");
                return Ok(None);
            }
            let ended = matches!(event, AgentEvent::Exited { .. }).then(|| pid.clone());
            match self.handle_event(event.clone()).await {
                Ok(()) => return Ok(ended),
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "cannot record a node report; retrying");
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::Internal("cannot record a node report".into())))
    }
}
