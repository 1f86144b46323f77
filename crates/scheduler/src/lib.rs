//! Placement and reconciliation as pure functions: a snapshot goes in, a decision comes out.
//! Nothing here does I/O, so every rule can be tested exhaustively; the store applies a
//! decision atomically and the allocator retries when the snapshot turned out stale.

pub mod warm;

use lodge_model::{Millis, Node, ProcessStatus, Region};

/// A process that could take a room.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub process_id: String,
    pub status: ProcessStatus,
    pub rooms_allocated: u32,
    pub rooms_per_process: u32,
    pub created_at: Millis,
}

/// A node that could start a process, with what its live processes hold: public ports, and
/// the CPU and memory their deployments requested.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeLoad {
    pub node: Node,
    pub live_processes: u32,
    pub ports_in_use: u32,
    pub cpu_in_use: f64,
    pub memory_mb_in_use: f64,
}

/// What a new process needs of a node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Need {
    pub ports: u32,
    /// Cores and MB its deployment requests (`requestedCPU`, `requestedMemoryMB`).
    pub cpu: f64,
    pub memory_mb: f64,
}

impl Need {
    /// Ports only (no CPU or memory asked).
    pub fn ports(ports: u32) -> Self {
        Self {
            ports,
            cpu: 0.0,
            memory_mb: 0.0,
        }
    }
}

/// Room for rounding in sums of requests (0.1 + 0.2 cores fit in 0.3).
const EPSILON: f64 = 1e-9;

impl NodeLoad {
    /// Whether a new process needing `need` fits: ports against the node's free public ports,
    /// CPU and memory against what it reported (a node that reported none, the embedded node
    /// of `lodge serve`, is not limited by them).
    pub fn fits(&self, need: Need) -> bool {
        let ports = self
            .node
            .port_capacity
            .is_none_or(|cap| self.ports_in_use + need.ports <= cap);
        let cpu = self.node.cpu <= 0.0 || self.cpu_in_use + need.cpu <= self.node.cpu + EPSILON;
        let memory = self.node.memory_mb <= 0.0
            || self.memory_mb_in_use + need.memory_mb <= self.node.memory_mb + EPSILON;
        ports && cpu && memory
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Put the room on this existing process.
    Existing { process_id: String },
    /// Start a new process on this node and put the room there.
    NewProcess { node_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementError {
    /// No node serves the region.
    NoNode(Region),
    /// Nodes serve the region, but none has the public ports for another process.
    NoCapacity(Region),
}

/// Choose where a room goes. Candidates are processes of the chosen deployment in the
/// requested region. Running processes win over starting ones (the room is playable at once),
/// then the fullest process (packing frees whole processes for the idle reaper), then the
/// oldest. Without a free slot, a new process starts as [`place_process`] chooses.
pub fn place_room(
    region: Region,
    need: Need,
    candidates: &[Candidate],
    nodes: &[NodeLoad],
) -> Result<Placement, PlacementError> {
    let best = candidates
        .iter()
        .filter(|c| {
            ProcessStatus::PLACEABLE.contains(&c.status) && c.rooms_allocated < c.rooms_per_process
        })
        .min_by_key(|c| {
            (
                c.status != ProcessStatus::Running,
                std::cmp::Reverse(c.rooms_allocated),
                c.created_at,
                c.process_id.clone(),
            )
        });
    if let Some(c) = best {
        return Ok(Placement::Existing {
            process_id: c.process_id.clone(),
        });
    }
    place_process(region, need, nodes).map(|node_id| Placement::NewProcess { node_id })
}

/// Choose the node for a new process: among the nodes serving the region that it fits (ports,
/// CPU, memory), the busiest, so that idle nodes stay idle and can be drained or reclaimed
/// (packing, as GameLift and Agones' `Packed` do); ties by node id.
pub fn place_process(
    region: Region,
    need: Need,
    nodes: &[NodeLoad],
) -> Result<String, PlacementError> {
    let serving: Vec<&NodeLoad> = nodes.iter().filter(|n| n.node.serves(region)).collect();
    if serving.is_empty() {
        return Err(PlacementError::NoNode(region));
    }
    serving
        .into_iter()
        .filter(|n| n.fits(need))
        .min_by_key(|n| (std::cmp::Reverse(n.live_processes), n.node.node_id.clone()))
        .map(|n| n.node.node_id.clone())
        .ok_or(PlacementError::NoCapacity(region))
}

/// What the reconciler knows about a live process.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveProcess {
    pub process_id: String,
    pub status: ProcessStatus,
    pub idle_timeout_enabled: bool,
    pub rooms_allocated: u32,
    pub active_connections: u64,
    pub last_busy_at: Millis,
}

/// Processes the idle reaper should stop: running, idle timeout enabled, no rooms, no
/// connections, and nothing happened for `idle_timeout_ms`.
pub fn idle_processes(now: Millis, idle_timeout_ms: i64, processes: &[LiveProcess]) -> Vec<String> {
    processes
        .iter()
        .filter(|p| {
            p.status == ProcessStatus::Running
                && p.idle_timeout_enabled
                && p.rooms_allocated == 0
                && p.active_connections == 0
                && now.saturating_sub(p.last_busy_at) >= idle_timeout_ms
        })
        .map(|p| p.process_id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, regions: Option<Vec<Region>>, live: u32) -> NodeLoad {
        NodeLoad {
            ports_in_use: 0,
            cpu_in_use: 0.0,
            memory_mb_in_use: 0.0,
            node: Node {
                port_capacity: Some(100),
                ..Node::local(id.into(), "h".into(), regions, 0)
            },
            live_processes: live,
        }
    }

    fn cand(id: &str, status: ProcessStatus, alloc: u32, cap: u32, at: Millis) -> Candidate {
        Candidate {
            process_id: id.into(),
            status,
            rooms_allocated: alloc,
            rooms_per_process: cap,
            created_at: at,
        }
    }

    /// A small deterministic generator so property tests need no extra crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn prefers_running_then_fullest() {
        let c = vec![
            cand("a", ProcessStatus::Starting, 3, 4, 1),
            cand("b", ProcessStatus::Running, 1, 4, 2),
            cand("c", ProcessStatus::Running, 2, 4, 3),
            cand("d", ProcessStatus::Running, 4, 4, 0),
        ];
        let n = vec![node("n1", None, 0)];
        assert_eq!(
            place_room(Region::London, Need::ports(1), &c, &n),
            Ok(Placement::Existing {
                process_id: "c".into()
            })
        );
    }

    #[test]
    fn full_or_stopping_processes_start_a_new_one() {
        let c = vec![
            cand("a", ProcessStatus::Running, 2, 2, 1),
            cand("b", ProcessStatus::Stopping, 0, 2, 1),
            cand("c", ProcessStatus::Draining, 0, 2, 1),
        ];
        let n = vec![
            node("busy", None, 5),
            node("idle", None, 1),
            node("tokyo", Some(vec![Region::Tokyo]), 0),
        ];
        assert_eq!(
            place_room(Region::London, Need::ports(1), &c, &n),
            Ok(Placement::NewProcess {
                node_id: "busy".into()
            }),
            "the busiest node that fits: idle ones stay idle"
        );
        assert_eq!(
            place_room(Region::London, Need::ports(1), &c, &n[2..]),
            Err(PlacementError::NoNode(Region::London))
        );
    }

    /// Property: whatever the snapshot, a placement onto an existing process always has a free
    /// slot and is placeable, and a new process is chosen only when no such process exists.
    #[test]
    fn placement_never_overfills() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let statuses = ProcessStatus::ALL;
        for _ in 0..5_000 {
            let n = rng.below(8) as usize;
            let cands: Vec<Candidate> = (0..n)
                .map(|i| {
                    let cap = 1 + rng.below(4) as u32;
                    cand(
                        &format!("p{i}"),
                        statuses[rng.below(statuses.len() as u64) as usize],
                        rng.below(u64::from(cap) + 1) as u32,
                        cap,
                        rng.below(100) as i64,
                    )
                })
                .collect();
            let nodes = vec![node("n", None, 0)];
            let has_free = cands.iter().any(|c| {
                ProcessStatus::PLACEABLE.contains(&c.status)
                    && c.rooms_allocated < c.rooms_per_process
            });
            match place_room(Region::Dallas, Need::ports(1), &cands, &nodes).unwrap() {
                Placement::Existing { process_id } => {
                    let c = cands.iter().find(|c| c.process_id == process_id).unwrap();
                    assert!(c.rooms_allocated < c.rooms_per_process);
                    assert!(ProcessStatus::PLACEABLE.contains(&c.status));
                }
                Placement::NewProcess { .. } => {
                    assert!(!has_free, "started a process with {cands:?}")
                }
            }
        }
    }

    /// Property: simulating a stream of placements and releases never exceeds capacity and
    /// keeps the number of processes minimal while all fit (pure packing, no releases).
    #[test]
    fn sequential_packing_uses_minimal_processes() {
        let mut rng = Rng(42);
        for _ in 0..200 {
            let cap = 1 + rng.below(6) as u32;
            let rooms = 1 + rng.below(40) as u32;
            let mut procs: Vec<Candidate> = Vec::new();
            for _ in 0..rooms {
                match place_room(Region::Tokyo, Need::ports(1), &procs, &[node("n", None, 0)])
                    .unwrap()
                {
                    Placement::Existing { process_id } => {
                        let p = procs
                            .iter_mut()
                            .find(|p| p.process_id == process_id)
                            .unwrap();
                        p.rooms_allocated += 1;
                    }
                    Placement::NewProcess { .. } => {
                        let id = format!("p{}", procs.len());
                        procs.push(cand(
                            &id,
                            ProcessStatus::Running,
                            1,
                            cap,
                            procs.len() as i64,
                        ));
                    }
                }
            }
            assert!(procs.iter().all(|p| p.rooms_allocated <= cap));
            assert_eq!(procs.len() as u32, rooms.div_ceil(cap));
        }
    }

    #[test]
    fn a_node_without_free_public_ports_takes_no_new_process() {
        let mut full = node("a", None, 3);
        full.ports_in_use = 99;
        let roomy = node("b", Some(vec![Region::London]), 50);
        assert_eq!(
            place_process(Region::London, Need::ports(2), &[full.clone(), roomy]),
            Ok("b".into())
        );
        assert_eq!(
            place_process(Region::London, Need::ports(1), &[full.clone()]),
            Ok("a".into())
        );
        assert_eq!(
            place_process(Region::London, Need::ports(2), &[full.clone()]),
            Err(PlacementError::NoCapacity(Region::London))
        );
        assert_eq!(
            place_room(
                Region::Tokyo,
                Need::ports(2),
                &[],
                &[node("c", Some(vec![Region::London]), 0)]
            ),
            Err(PlacementError::NoNode(Region::Tokyo))
        );
        // A free slot on an existing process needs no ports.
        let c = cand("p", ProcessStatus::Running, 0, 2, 0);
        assert_eq!(
            place_room(Region::London, Need::ports(2), &[c], &[full]),
            Ok(Placement::Existing {
                process_id: "p".into()
            })
        );
    }

    #[test]
    fn cpu_and_memory_bound_what_a_node_takes() {
        let mut a = node("a", None, 3);
        a.node.cpu = 2.0;
        a.node.memory_mb = 4096.0;
        a.cpu_in_use = 1.5;
        a.memory_mb_in_use = 1024.0;
        let b = NodeLoad {
            node: Node {
                cpu: 8.0,
                memory_mb: 8192.0,
                ..a.node.clone()
            },
            ..node("b", None, 0)
        };
        let b = NodeLoad {
            node: Node {
                node_id: "b".into(),
                ..b.node
            },
            ..b
        };
        let need = |cpu, memory_mb| Need {
            ports: 1,
            cpu,
            memory_mb,
        };
        // Half a core fits on the busy node; a whole one does not, so it goes to the idle one.
        let nodes = [a.clone(), b.clone()];
        assert_eq!(
            place_process(Region::London, need(0.5, 512.0), &nodes),
            Ok("a".into())
        );
        assert_eq!(
            place_process(Region::London, need(1.0, 512.0), &nodes),
            Ok("b".into())
        );
        assert_eq!(
            place_process(Region::London, need(0.5, 4096.0), &nodes),
            Ok("b".into())
        );
        assert_eq!(
            place_process(Region::London, need(16.0, 512.0), &nodes),
            Err(PlacementError::NoCapacity(Region::London))
        );
        // A node that reported no cores or memory is bounded by its ports only.
        assert_eq!(
            place_process(
                Region::London,
                need(64.0, 1e6),
                &[node("embedded", None, 0)]
            ),
            Ok("embedded".into())
        );
    }

    /// Property: a stream of new processes on random nodes never puts more CPU, memory or
    /// ports on a node than it has, and a process is refused only when no node fits it.
    #[test]
    fn packing_never_overcommits_a_node() {
        let mut rng = Rng(7);
        for _ in 0..500 {
            let mut nodes: Vec<NodeLoad> = (0..1 + rng.below(5))
                .map(|i| {
                    let mut n = node(&format!("n{i}"), None, 0);
                    n.node.cpu = (1 + rng.below(8)) as f64;
                    n.node.memory_mb = (1 + rng.below(16)) as f64 * 512.0;
                    n.node.port_capacity = Some(1 + rng.below(10) as u32);
                    n
                })
                .collect();
            for _ in 0..40 {
                let want = Need {
                    ports: 1 + rng.below(2) as u32,
                    cpu: (1 + rng.below(8)) as f64 * 0.25,
                    memory_mb: (1 + rng.below(8)) as f64 * 256.0,
                };
                match place_process(Region::London, want, &nodes) {
                    Ok(id) => {
                        let n = nodes.iter_mut().find(|n| n.node.node_id == id).unwrap();
                        assert!(n.fits(want));
                        n.live_processes += 1;
                        n.ports_in_use += want.ports;
                        n.cpu_in_use += want.cpu;
                        n.memory_mb_in_use += want.memory_mb;
                    }
                    Err(_) => assert!(!nodes.iter().any(|n| n.fits(want)), "refused with room"),
                }
            }
            for n in &nodes {
                assert!(n.cpu_in_use <= n.node.cpu + EPSILON);
                assert!(n.memory_mb_in_use <= n.node.memory_mb + EPSILON);
                assert!(n.ports_in_use <= n.node.port_capacity.unwrap());
            }
        }
    }

    #[test]
    fn idle_reaper_rules() {
        let p = |id: &str, rooms, conns, busy, enabled| LiveProcess {
            process_id: id.into(),
            status: ProcessStatus::Running,
            idle_timeout_enabled: enabled,
            rooms_allocated: rooms,
            active_connections: conns,
            last_busy_at: busy,
        };
        let ps = vec![
            p("idle", 0, 0, 0, true),
            p("recent", 0, 0, 250_000, true),
            p("rooms", 1, 0, 0, true),
            p("conns", 0, 3, 0, true),
            p("disabled", 0, 0, 0, false),
        ];
        assert_eq!(
            idle_processes(300_000, 300_000, &ps),
            vec!["idle".to_string()]
        );
        assert!(idle_processes(299_999, 300_000, &ps).is_empty());
    }
}
