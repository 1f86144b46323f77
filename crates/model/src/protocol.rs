//! The node protocol's state machines, without I/O: what each side keeps and answers, so a
//! transport (in-process, or frames over a network connection) only moves messages. Version 1.
//!
//! - **Events are numbered and acknowledged.** A node's events (a process running, exiting, its
//!   activity) get consecutive sequence numbers and stay in its outbox until the control plane
//!   acknowledges them; after a reconnect the rest are sent again. The control plane applies
//!   each number once, in order, and acknowledges the highest it applied, so drops, duplicates
//!   and reordering change nothing. Activity is coalesced per process, so an outbox stays
//!   bounded through a long outage; lifecycle events are never dropped.
//! - **Desired state is a revision, not a command log.** The control plane sends either the
//!   whole set of processes a node should run (`full`) or the changes from one revision to the
//!   next; a node applies a change only on top of the revision it names and asks for the whole
//!   set when it missed one.
//! - **Sessions are fenced.** Every connection gets a larger epoch; what arrives under an older
//!   epoch is refused, so a stale connection (a paused replica, a half-open socket) cannot
//!   write.
//! - **Liveness both ways** and **reconnect with backoff and full jitter**.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::enums::Region;
use crate::node::{FlowTotals, MetricSeries, ProcessStats};
use crate::spec::{AgentEvent, ProcessSpec};

pub const PROTOCOL_VERSION: u32 = 1;

/// How often each side pings, and how long either side keeps a silent connection.
pub const PING_EVERY: Duration = Duration::from_secs(2);
pub const DEAD_AFTER: Duration = Duration::from_secs(15);

/// One event of a node, numbered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Numbered {
    pub seq: u64,
    pub event: AgentEvent,
}

/// Node → control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum NodeMsg {
    /// First message of every connection.
    #[serde(rename_all = "camelCase")]
    Hello {
        version: u32,
        node_id: String,
        /// The desired-state revision the node holds (0: none).
        desired_rev: u64,
        /// Chosen at random when the agent starts: event numbers count within one
        /// incarnation, so a restarted agent's numbers start again at 1.
        #[serde(default)]
        incarnation: u64,
        /// What the node offers (sent by agents; the control plane updates its record).
        #[serde(default)]
        info: Option<NodeInfo>,
    },
    Events {
        events: Vec<Numbered>,
    },
    /// The node holds desired state up to this revision.
    #[serde(rename_all = "camelCase")]
    DesiredAck {
        rev: u64,
    },
    /// The node missed a change: send the whole set.
    Resync,
    /// Live counters of its processes and its flows (sent every second or so; not numbered,
    /// the newest replaces the older).
    Stats {
        processes: Vec<(String, ProcessStats)>,
        flows: FlowTotals,
    },
    /// The answer to a [`ControlMsg::Call`] with the same id.
    Reply {
        id: u64,
        reply: Result<NodeReply, crate::node::LinkError>,
    },
    Ping,
    Pong,
}

/// What a joined node tells the control plane about itself on every connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub public_host: String,
    pub region: Region,
    pub cpu: f64,
    pub memory_mb: f64,
    pub port_capacity: Option<u32>,
    /// UDP port of its ping echo service.
    #[serde(default)]
    pub ping_port: Option<u16>,
    /// The agent's version (`lodge --version`).
    pub agent_version: String,
}

/// A question the control plane asks a node about what only the node has (logs, metrics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum NodeCall {
    #[serde(rename_all = "camelCase")]
    LogTail {
        process_id: String,
        lines: usize,
    },
    #[serde(rename_all = "camelCase")]
    LogRead {
        process_id: String,
        offset: u64,
        max: usize,
    },
    KeptProcesses,
    #[serde(rename_all = "camelCase")]
    ForgetProcess {
        process_id: String,
    },
    #[serde(rename_all = "camelCase")]
    Metrics {
        process_id: String,
        start_s: i64,
        end_s: i64,
        step_s: i64,
    },
}

/// A node's answer to a [`NodeCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum NodeReply {
    /// Log bytes (base64 in the frame).
    Log {
        #[serde(with = "b64")]
        bytes: Vec<u8>,
        end: u64,
    },
    Processes {
        ids: Vec<String>,
    },
    Done,
    Metrics {
        series: MetricSeries,
    },
}

/// The most log bytes one call reads (followers and downloads read in steps).
pub const MAX_LOG_READ: usize = 256 << 10;

/// The longest frame either side accepts (a log tail of 8 MiB, in base64, fits).
pub const MAX_FRAME: usize = 16 << 20;

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// Control plane → node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ControlMsg {
    /// The session is open: its epoch, and the highest event number already applied.
    #[serde(rename_all = "camelCase")]
    Welcome {
        epoch: u64,
        last_event_seq: u64,
    },
    /// Desired state at `rev`: the whole set (`full`) or the changes since `base`.
    #[serde(rename_all = "camelCase")]
    Desired {
        rev: u64,
        base: u64,
        full: bool,
        upserts: Vec<ProcessSpec>,
        removed: Vec<String>,
    },
    /// Events up to `seq` are applied.
    Ack {
        seq: u64,
    },
    /// Ask the node something; it answers with a [`NodeMsg::Reply`] of the same id.
    Call {
        id: u64,
        call: NodeCall,
    },
    /// A deployment of this build was created: fetch it now, so that its first process does
    /// not wait for the download.
    #[serde(rename_all = "camelCase")]
    Prefetch {
        build_id: String,
    },
    /// The session is refused or closed (a newer one exists, a wrong version); the node logs
    /// why and reconnects after its backoff.
    Refused {
        message: String,
    },
    Ping,
    Pong,
}

// --- node side ---------------------------------------------------------------------------------

/// What a node keeps of its link to the control plane.
#[derive(Debug, Default)]
pub struct NodeSession {
    next_seq: u64,
    /// Unacknowledged events, oldest first.
    outbox: VecDeque<Numbered>,
    /// Events up to this number have been handed to a connection at least once.
    sent_upto: u64,
    /// Desired processes by id, and the revision they are at.
    desired: BTreeMap<String, ProcessSpec>,
    desired_rev: u64,
    /// The current connection's epoch, once welcomed.
    epoch: Option<u64>,
    incarnation: u64,
}

impl NodeSession {
    pub fn new() -> Self {
        Self::with_incarnation(0)
    }

    /// A session of an agent that started with this (random) incarnation number.
    pub fn with_incarnation(incarnation: u64) -> Self {
        Self {
            next_seq: 1,
            incarnation,
            ..Default::default()
        }
    }

    /// Whether a desired set arrived from the control plane since this agent started.
    pub fn has_desired(&self) -> bool {
        self.desired_rev > 0
    }

    /// Queue an event. Activity replaces the same process's activity that was never sent, in
    /// its place and under its number, so coalescing leaves no gap in the numbers.
    pub fn push(&mut self, event: AgentEvent) {
        if let AgentEvent::Activity { process_id, .. } = &event {
            let sent = self.sent_upto;
            if let Some(slot) = self.outbox.iter_mut().find(|n| {
                n.seq > sent
                    && matches!(&n.event, AgentEvent::Activity { process_id: p, .. } if p == process_id)
            }) {
                slot.event = event;
                return;
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outbox.push_back(Numbered { seq, event });
    }

    /// A new connection: forget the old session, say hello.
    pub fn connect(&mut self, node_id: &str, info: Option<NodeInfo>) -> NodeMsg {
        self.epoch = None;
        NodeMsg::Hello {
            version: PROTOCOL_VERSION,
            node_id: node_id.to_string(),
            desired_rev: self.desired_rev,
            incarnation: self.incarnation,
            info,
        }
    }

    pub fn disconnect(&mut self) {
        self.epoch = None;
    }

    /// The events to send now (all unacknowledged ones, oldest first), once welcomed.
    pub fn outgoing(&mut self) -> Option<NodeMsg> {
        if self.epoch.is_none() || self.outbox.is_empty() {
            return None;
        }
        self.sent_upto = self.outbox.back().map_or(self.sent_upto, |n| n.seq);
        Some(NodeMsg::Events {
            events: self.outbox.iter().cloned().collect(),
        })
    }

    /// Events not yet handed to the current connection (numbered above `after`), at most
    /// `max`, and the highest number among them; `None` before the welcome or with nothing
    /// new. [`NodeSession::receive`] of a welcome hands over every unacknowledged event.
    pub fn outgoing_after(&mut self, after: u64, max: usize) -> Option<(NodeMsg, u64)> {
        self.epoch?;
        let events: Vec<Numbered> = self
            .outbox
            .iter()
            .filter(|n| n.seq > after)
            .take(max)
            .cloned()
            .collect();
        let last = events.last()?.seq;
        self.sent_upto = self.sent_upto.max(last);
        Some((NodeMsg::Events { events }, last))
    }

    /// The highest event number queued so far.
    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }

    /// Whether the current connection has been welcomed (a session is open).
    pub fn welcomed(&self) -> bool {
        self.epoch.is_some()
    }

    pub fn unacked(&self) -> usize {
        self.outbox.len()
    }

    pub fn desired(&self) -> impl Iterator<Item = &ProcessSpec> {
        self.desired.values()
    }

    pub fn desired_rev(&self) -> u64 {
        self.desired_rev
    }

    /// Take a message from the control plane; returns what to answer.
    pub fn receive(&mut self, msg: ControlMsg) -> Vec<NodeMsg> {
        match msg {
            ControlMsg::Welcome {
                epoch,
                last_event_seq,
            } => {
                self.epoch = Some(epoch);
                self.drop_acked(last_event_seq);
                self.outgoing().into_iter().collect()
            }
            ControlMsg::Ack { seq } => {
                self.drop_acked(seq);
                Vec::new()
            }
            ControlMsg::Desired {
                rev,
                base,
                full,
                upserts,
                removed,
            } => {
                if rev <= self.desired_rev {
                    // Old or repeated: what it says is already here.
                    return vec![NodeMsg::DesiredAck {
                        rev: self.desired_rev,
                    }];
                }
                if !full && base != self.desired_rev {
                    // A change on top of a revision this node does not have.
                    return vec![NodeMsg::Resync];
                }
                if full {
                    self.desired.clear();
                }
                for id in removed {
                    self.desired.remove(&id);
                }
                for spec in upserts {
                    self.desired.insert(spec.process_id.clone(), spec);
                }
                self.desired_rev = rev;
                vec![NodeMsg::DesiredAck { rev }]
            }
            ControlMsg::Ping => vec![NodeMsg::Pong],
            // Calls need the node's I/O and refusals close the connection: the transport
            // handles both.
            ControlMsg::Pong
            | ControlMsg::Call { .. }
            | ControlMsg::Prefetch { .. }
            | ControlMsg::Refused { .. } => Vec::new(),
        }
    }

    fn drop_acked(&mut self, seq: u64) {
        while self.outbox.front().is_some_and(|n| n.seq <= seq) {
            self.outbox.pop_front();
        }
    }
}

// --- control-plane side ------------------------------------------------------------------------

/// Why a node's message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("session {got} is stale; the node's current session is {current}")]
    StaleSession { got: u64, current: u64 },
    #[error(
        "protocol version {0} is not spoken here (this control plane speaks {PROTOCOL_VERSION})"
    )]
    Version(u32),
}

/// What the control plane keeps of one node (in the store, so any replica can take over).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeState {
    /// The epoch of the newest session; older ones are fenced off.
    pub epoch: u64,
    /// The highest event number applied.
    pub last_event_seq: u64,
    /// The agent incarnation those numbers belong to.
    pub incarnation: u64,
}

impl NodeState {
    /// A node said hello: open a session with a larger epoch.
    pub fn open(&mut self, hello: &NodeMsg) -> Result<ControlMsg, Refused> {
        if let NodeMsg::Hello {
            version,
            incarnation,
            ..
        } = hello
        {
            if *version != PROTOCOL_VERSION {
                return Err(Refused::Version(*version));
            }
            if *incarnation != self.incarnation {
                // A restarted agent numbers its events from 1 again.
                self.incarnation = *incarnation;
                self.last_event_seq = 0;
            }
        }
        self.epoch += 1;
        Ok(ControlMsg::Welcome {
            epoch: self.epoch,
            last_event_seq: self.last_event_seq,
        })
    }

    /// Events that arrived on the session of `epoch`: the ones to apply (new, in order, without
    /// gaps), and the acknowledgement to send.
    pub fn events(
        &mut self,
        epoch: u64,
        mut events: Vec<Numbered>,
    ) -> Result<(Vec<AgentEvent>, ControlMsg), Refused> {
        if epoch != self.epoch {
            return Err(Refused::StaleSession {
                got: epoch,
                current: self.epoch,
            });
        }
        events.sort_by_key(|n| n.seq);
        let mut apply = Vec::new();
        for n in events {
            // Only the next number: a gap waits for the resend that fills it.
            if n.seq == self.last_event_seq + 1 {
                self.last_event_seq = n.seq;
                apply.push(n.event);
            }
        }
        Ok((
            apply,
            ControlMsg::Ack {
                seq: self.last_event_seq,
            },
        ))
    }
}

// --- liveness and reconnects -------------------------------------------------------------------

/// Silence detection on one connection (each side runs one).
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub ping_every: Millis,
    pub dead_after: Millis,
    last_heard: Millis,
    last_ping: Millis,
}

impl Liveness {
    pub fn new(now: Millis, ping_every: Millis, dead_after: Millis) -> Self {
        Self {
            ping_every,
            dead_after,
            last_heard: now,
            last_ping: now,
        }
    }

    /// Anything arrived from the other side.
    pub fn heard(&mut self, now: Millis) {
        self.last_heard = self.last_heard.max(now);
    }

    /// Whether to send a ping now (and note that it was sent).
    pub fn ping_due(&mut self, now: Millis) -> bool {
        if now - self.last_ping >= self.ping_every {
            self.last_ping = now;
            return true;
        }
        false
    }

    /// The other side has been silent too long: close the connection.
    pub fn dead(&self, now: Millis) -> bool {
        now - self.last_heard >= self.dead_after
    }
}

/// Reconnect delays: exponential from `base` to `max`, with full jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt; `unit` is a random number in [0, 1).
    pub fn next(&mut self, unit: f64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// A connection held: start again from `base`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::ContainerPort;
    use crate::enums::{Region, TransportType};

    /// xorshift64*: a seeded, reproducible source of choices.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn chance(&mut self, p: f64) -> bool {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64 * 1.0 < p
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn spec(id: &str) -> ProcessSpec {
        ProcessSpec {
            process_id: id.into(),
            app_id: "a".into(),
            app_secret: "s".into(),
            deployment_id: "d".into(),
            build_id: "b".into(),
            build_tag: None,
            region: Region::London,
            rooms_per_process: 1,
            default_port: ContainerPort {
                name: "default".into(),
                port: 7777,
                transport_type: TransportType::Udp,
            },
            additional_ports: vec![],
            env: vec![],
            requested_cpu: 0.5,
            requested_memory_mb: 512.0,
            initial_room_id: None,
            initial_room_config: None,
            stop: false,
            exposed_ports: vec![],
        }
    }

    /// The control plane's desired state for the node, with its history of revisions.
    struct Desired {
        rev: u64,
        set: BTreeMap<String, ProcessSpec>,
    }

    impl Desired {
        fn full(&self) -> ControlMsg {
            ControlMsg::Desired {
                rev: self.rev,
                base: 0,
                full: true,
                upserts: self.set.values().cloned().collect(),
                removed: vec![],
            }
        }
    }

    /// A message in flight, with the session it was sent on.
    struct InFlight<M> {
        epoch: u64,
        msg: M,
    }

    /// Deliver (or lose, repeat, reorder) what is in flight.
    fn shake<M: Clone>(rng: &mut Rng, q: &mut Vec<InFlight<M>>, lossy: bool) -> Vec<InFlight<M>> {
        let mut out = Vec::new();
        for m in q.drain(..) {
            if lossy && rng.chance(0.2) {
                continue; // dropped
            }
            if lossy && rng.chance(0.1) {
                out.push(InFlight {
                    epoch: m.epoch,
                    msg: m.msg.clone(),
                }); // duplicated
            }
            out.push(m);
        }
        if lossy {
            for i in (1..out.len()).rev() {
                let j = rng.below(i + 1);
                out.swap(i, j); // reordered
            }
        }
        out
    }

    /// Drops, duplicates, reordering, disconnects and stale sessions, then a quiet spell: every
    /// lifecycle event is applied exactly once and in order, the last activity of each process
    /// arrives, nothing of a stale session is applied, and the node ends at the control plane's
    /// desired state.
    #[test]
    fn converges_through_a_hostile_link() {
        for seed in 1..=300u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut node = NodeSession::new();
            let mut cp = NodeState::default();
            let mut desired = Desired {
                rev: 1,
                set: BTreeMap::new(),
            };
            let mut to_cp: Vec<InFlight<NodeMsg>> = Vec::new();
            let mut to_node: Vec<InFlight<ControlMsg>> = Vec::new();
            let mut pushed_lifecycle = Vec::new();
            let mut last_activity: BTreeMap<String, u64> = BTreeMap::new();
            let mut applied = Vec::new();
            let mut connected = false;
            let mut node_epoch = 0; // the epoch the node's messages go out on
            let mut stale_refused = 0;
            let mut unwelcomed_steps = 0;

            for step in 0..400 {
                let quiet = step >= 300;
                if !connected {
                    let hello = node.connect("n1", None);
                    let welcome = cp.open(&hello).unwrap();
                    if let ControlMsg::Welcome { epoch, .. } = welcome {
                        node_epoch = epoch;
                    }
                    to_node.push(InFlight {
                        epoch: cp.epoch,
                        msg: welcome,
                    });
                    to_node.push(InFlight {
                        epoch: cp.epoch,
                        msg: desired.full(),
                    });
                    connected = true;
                    unwelcomed_steps = 0;
                }
                // The node's work: lifecycle events and activity samples.
                if !quiet && rng.chance(0.3) {
                    let e = AgentEvent::Running {
                        process_id: format!("p{step}"),
                        at: step,
                    };
                    pushed_lifecycle.push(e.clone());
                    node.push(e);
                }
                if !quiet && rng.chance(0.4) {
                    let p = format!("p{}", rng.below(3));
                    let n = rng.next() % 100;
                    last_activity.insert(p.clone(), n);
                    node.push(AgentEvent::Activity {
                        process_id: p,
                        at: step,
                        active_connections: n,
                    });
                }
                // The control plane's work: the desired set changes by one revision.
                if !quiet && rng.chance(0.2) {
                    let base = desired.rev;
                    desired.rev += 1;
                    let id = format!("q{}", rng.below(6));
                    let (upserts, removed) = if desired.set.remove(&id).is_some() {
                        (vec![], vec![id])
                    } else {
                        desired.set.insert(id.clone(), spec(&id));
                        (vec![spec(&id)], vec![])
                    };
                    to_node.push(InFlight {
                        epoch: cp.epoch,
                        msg: ControlMsg::Desired {
                            rev: desired.rev,
                            base,
                            full: false,
                            upserts,
                            removed,
                        },
                    });
                }
                if let Some(m) = node.outgoing() {
                    to_cp.push(InFlight {
                        epoch: node_epoch,
                        msg: m,
                    });
                }
                // A node that is not welcomed soon gives the connection up, as its liveness
                // timer would.
                if !node.welcomed() {
                    unwelcomed_steps += 1;
                }
                // A disconnect: the node reconnects next step; what was in flight toward the
                // control plane may still arrive, under the old session.
                if unwelcomed_steps > 5 || (!quiet && rng.chance(0.05)) {
                    node.disconnect();
                    connected = false;
                    to_node.clear();
                }
                for m in shake(&mut rng, &mut to_cp, !quiet) {
                    match m.msg {
                        NodeMsg::Events { events } => match cp.events(m.epoch, events) {
                            Ok((apply, ack)) => {
                                applied.extend(apply);
                                to_node.push(InFlight {
                                    epoch: m.epoch,
                                    msg: ack,
                                });
                            }
                            Err(Refused::StaleSession { .. }) => stale_refused += 1,
                            Err(e) => panic!("{e}"),
                        },
                        NodeMsg::Resync => to_node.push(InFlight {
                            epoch: m.epoch,
                            msg: desired.full(),
                        }),
                        NodeMsg::DesiredAck { .. }
                        | NodeMsg::Ping
                        | NodeMsg::Pong
                        | NodeMsg::Stats { .. }
                        | NodeMsg::Reply { .. } => {}
                        NodeMsg::Hello { .. } => unreachable!("hello is handled on connect"),
                    }
                }
                for m in shake(&mut rng, &mut to_node, !quiet) {
                    // A connection delivers only its own session's messages.
                    if m.epoch != node_epoch || !connected {
                        continue;
                    }
                    for reply in node.receive(m.msg) {
                        to_cp.push(InFlight {
                            epoch: node_epoch,
                            msg: reply,
                        });
                    }
                }
                // In the quiet spell the control plane repeats the whole set until it is acked,
                // as a replica's periodic poll does.
                if quiet && node.desired_rev() != desired.rev {
                    to_node.push(InFlight {
                        epoch: cp.epoch,
                        msg: desired.full(),
                    });
                }
            }

            assert_eq!(
                node.unacked(),
                0,
                "seed {seed}: everything was acknowledged (welcomed {}, epochs {node_epoch}/{}, applied up to {}, oldest unacked {:?})",
                node.welcomed(),
                cp.epoch,
                cp.last_event_seq,
                node.outbox.front().map(|n| n.seq)
            );
            let lifecycle: Vec<_> = applied
                .iter()
                .filter(|e| !matches!(e, AgentEvent::Activity { .. }))
                .cloned()
                .collect();
            assert_eq!(
                lifecycle, pushed_lifecycle,
                "seed {seed}: each once, in order"
            );
            let mut seen: BTreeMap<String, u64> = BTreeMap::new();
            for e in &applied {
                if let AgentEvent::Activity {
                    process_id,
                    active_connections,
                    ..
                } = e
                {
                    seen.insert(process_id.clone(), *active_connections);
                }
            }
            assert_eq!(
                seen, last_activity,
                "seed {seed}: the last activity of each process arrives"
            );
            assert_eq!(node.desired_rev(), desired.rev, "seed {seed}");
            let have: Vec<_> = node.desired().map(|s| s.process_id.clone()).collect();
            let want: Vec<_> = desired.set.keys().cloned().collect();
            assert_eq!(have, want, "seed {seed}: the node runs what is desired");
            assert!(
                stale_refused == 0 || cp.epoch > 1,
                "seed {seed}: only a superseded session is refused"
            );
        }
    }

    fn hello(version: u32) -> NodeMsg {
        NodeMsg::Hello {
            version,
            node_id: "n".into(),
            desired_rev: 0,
            incarnation: 0,
            info: None,
        }
    }

    #[test]
    fn failures_keep_their_kind_across_the_wire() {
        let msg = NodeMsg::Reply {
            id: 7,
            reply: Err(crate::node::LinkError::Unreachable(
                "node n is not connected".into(),
            )),
        };
        let text = serde_json::to_string(&msg).unwrap();
        assert_eq!(serde_json::from_str::<NodeMsg>(&text).unwrap(), msg);
        assert!(text.contains(r#""kind":"unreachable""#), "{text}");
    }

    #[test]
    fn a_restarted_agent_numbers_its_events_again() {
        let mut cp = NodeState::default();
        cp.open(&hello(PROTOCOL_VERSION)).unwrap();
        let ev = |seq| Numbered {
            seq,
            event: AgentEvent::Running {
                process_id: "p".into(),
                at: 0,
            },
        };
        let (apply, _) = cp.events(1, vec![ev(1), ev(2)]).unwrap();
        assert_eq!(apply.len(), 2);
        // The same incarnation reconnecting: numbers go on.
        cp.open(&hello(PROTOCOL_VERSION)).unwrap();
        assert_eq!(cp.events(2, vec![ev(2)]).unwrap().0.len(), 0);
        // A new incarnation starts again at 1, and its events are applied.
        let mut node = NodeSession::with_incarnation(7);
        let welcome = cp.open(&node.connect("n", None)).unwrap();
        assert_eq!(
            welcome,
            ControlMsg::Welcome {
                epoch: 3,
                last_event_seq: 0
            }
        );
        assert!(node.receive(welcome).is_empty());
        node.push(ev(0).event);
        let Some(NodeMsg::Events { events }) = node.outgoing() else {
            panic!("the event is sent");
        };
        assert_eq!(cp.events(3, events).unwrap().0.len(), 1);
    }

    #[test]
    fn a_stale_session_is_fenced_off() {
        let mut cp = NodeState::default();
        let hi = hello(PROTOCOL_VERSION);
        cp.open(&hi).unwrap();
        cp.open(&hi).unwrap();
        let ev = vec![Numbered {
            seq: 1,
            event: AgentEvent::Running {
                process_id: "p".into(),
                at: 0,
            },
        }];
        assert_eq!(
            cp.events(1, ev.clone()),
            Err(Refused::StaleSession { got: 1, current: 2 })
        );
        assert_eq!(cp.last_event_seq, 0, "nothing of the old session applied");
        let (apply, ack) = cp.events(2, ev.clone()).unwrap();
        assert_eq!((apply.len(), ack), (1, ControlMsg::Ack { seq: 1 }));
        let (apply, _) = cp.events(2, ev).unwrap();
        assert!(apply.is_empty(), "a duplicate is applied once");
        assert_eq!(cp.open(&hello(99)), Err(Refused::Version(99)));
    }

    #[test]
    fn events_apply_in_order_without_gaps() {
        let mut cp = NodeState::default();
        cp.open(&hello(PROTOCOL_VERSION)).unwrap();
        let ev = |seq: u64| Numbered {
            seq,
            event: AgentEvent::Running {
                process_id: format!("p{seq}"),
                at: 0,
            },
        };
        let (apply, ack) = cp.events(1, vec![ev(3), ev(1)]).unwrap();
        assert_eq!(
            (apply.len(), ack),
            (1, ControlMsg::Ack { seq: 1 }),
            "3 waits for 2"
        );
        let (apply, ack) = cp.events(1, vec![ev(2), ev(3), ev(2)]).unwrap();
        assert_eq!((apply.len(), ack), (2, ControlMsg::Ack { seq: 3 }));
    }

    #[test]
    fn a_missed_change_asks_for_the_whole_set() {
        let mut node = NodeSession::new();
        let delta = |rev, base| ControlMsg::Desired {
            rev,
            base,
            full: false,
            upserts: vec![spec(&format!("p{rev}"))],
            removed: vec![],
        };
        assert_eq!(
            node.receive(delta(2, 1)),
            vec![NodeMsg::Resync],
            "it has rev 0, not 1"
        );
        assert_eq!(
            node.receive(delta(1, 0)),
            vec![NodeMsg::DesiredAck { rev: 1 }]
        );
        assert_eq!(
            node.receive(delta(1, 0)),
            vec![NodeMsg::DesiredAck { rev: 1 }],
            "repeat"
        );
        assert_eq!(
            node.receive(delta(2, 1)),
            vec![NodeMsg::DesiredAck { rev: 2 }]
        );
        assert_eq!(node.desired().count(), 2);
    }

    #[test]
    fn activity_coalesces_while_disconnected_and_lifecycle_never_does() {
        let mut node = NodeSession::new();
        for i in 0..1000 {
            node.push(AgentEvent::Activity {
                process_id: "p".into(),
                at: i,
                active_connections: i as u64,
            });
        }
        node.push(AgentEvent::Exited {
            process_id: "p".into(),
            at: 1000,
            exit: crate::spec::ExitInfo {
                code: Some(0),
                reason: "exited".into(),
            },
            failed: false,
        });
        assert_eq!(node.unacked(), 2, "one activity, one exit");
    }

    #[test]
    fn backoff_grows_to_its_ceiling_with_full_jitter() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let ceilings: Vec<_> = (0..8).map(|_| b.next(0.999_999)).collect();
        assert!(ceilings.windows(2).all(|w| w[0] <= w[1]));
        assert!(ceilings[0] < Duration::from_millis(201));
        assert!(*ceilings.last().unwrap() <= Duration::from_secs(5));
        assert_eq!(b.next(0.0), Duration::ZERO, "full jitter reaches zero");
        b.reset();
        assert!(b.next(0.999_999) < Duration::from_millis(201));
    }

    #[test]
    fn liveness_pings_and_declares_silence() {
        let mut l = Liveness::new(0, 5_000, 15_000);
        assert!(!l.ping_due(4_999));
        assert!(l.ping_due(5_000));
        assert!(!l.ping_due(6_000));
        l.heard(10_000);
        assert!(!l.dead(24_999));
        assert!(l.dead(25_000));
    }
}
