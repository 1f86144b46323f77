//! Network namespaces made ahead of demand: creating a namespace with its veth, address and
//! route costs more than the rest of a process's start, so a few wait ready, as many as the
//! recent start rate asks for. Each is given to one process only and deleted when that
//! process ends; the pool is refilled in the background.
//!
//! A namespace is named after its node and address slot, with a tag of its own
//! (`lodge-<key>-<index>-<tag>`, veth `lv<key><tag>`), so whatever a previous run left in the
//! pool is recognised and removed at the next start, and no record of an earlier use of a slot
//! names a later one.

#[allow(unused_imports)]
use super::*;

/// The pool never holds more than this many namespaces, nor fewer than one.
const POOL_MAX: usize = 16;
/// Starts counted for the pool's size.
const RATE_WINDOW: Duration = Duration::from_secs(30);
/// How often the pool is looked at without a start to prompt it.
const REFILL_EVERY: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(crate) struct NsPool {
    ready: Vec<NsState>,
    /// Set by teardown: nothing more is made.
    closed: bool,
    starts: std::collections::VecDeque<Instant>,
}

impl AgentConfig {
    /// The name prefix of this node's namespaces.
    pub(crate) fn netns_prefix(&self) -> String {
        netns_prefix(&self.instance)
    }
}

pub(crate) fn netns_prefix(instance: &str) -> String {
    format!("lodge-{}-", &instance[..instance.len().min(6)])
}

impl Agent {
    /// A namespace for a new process: a ready one from the pool, else one made now.
    pub(crate) async fn take_namespace(&self, net: &sys::Network) -> std::io::Result<NsState> {
        let pooled = {
            let mut pool = self.ns_pool.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            pool.starts.push_back(now);
            while pool
                .starts
                .front()
                .is_some_and(|t| now.duration_since(*t) > RATE_WINDOW)
            {
                pool.starts.pop_front();
            }
            pool.ready.pop()
        };
        self.pool_wake.notify_one();
        if let Some(ns) = pooled {
            return Ok(ns);
        }
        self.make_namespace(net).await
    }

    /// Reserve an address slot and make its namespace.
    async fn make_namespace(&self, net: &sys::Network) -> std::io::Result<NsState> {
        let index = {
            let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
            // Round-robin, so an address just freed is the last to be used again.
            let max = sys::Network::MAX_INDEX;
            let start = r.ip_cursor;
            let i = (0..max)
                .map(|k| (start + k) % max + 1)
                .find(|i| !r.ip_indexes.contains(i));
            if let Some(i) = i {
                r.ip_cursor = i % max;
            }
            let i = i.ok_or_else(|| std::io::Error::other("no free address on the bridge"))?;
            r.ip_indexes.insert(i);
            i
        };
        // A name of its own for every use of a slot: a record of an earlier use of the same slot
        // (a process that ended while Lodge was down) can never name, or delete, this one.
        let tag = {
            use ring::rand::SecureRandom;
            let mut b = [0u8; 3];
            ring::rand::SystemRandom::new()
                .fill(&mut b)
                .map_err(|_| std::io::Error::other("no randomness for a namespace name"))?;
            format!("{:02x}{:02x}{:02x}", b[0], b[1], b[2])
        };
        let inst = &self.cfg.instance[..self.cfg.instance.len().min(6)];
        let ns = NsState {
            name: format!("{}{index}-{tag}", self.cfg.netns_prefix()),
            veth: format!("lv{inst}{tag}"),
            index,
        };
        if let Err(e) = net
            .create_namespace(&ns.name, &ns.veth, net.address(index))
            .await
        {
            self.reserved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .ip_indexes
                .remove(&index);
            return Err(e);
        }
        Ok(ns)
    }

    /// How many namespaces should wait ready: the starts of the last 30 s, within 1..=16.
    fn pool_target(&self) -> usize {
        let pool = self.ns_pool.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let recent = pool
            .starts
            .iter()
            .filter(|t| now.duration_since(**t) <= RATE_WINDOW)
            .count();
        recent.clamp(1, POOL_MAX)
    }

    /// Keep the pool at its target, one namespace at a time, until the agent is gone.
    pub(crate) fn spawn_ns_pool(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(agent) = weak.upgrade() else { return };
                let Some(net) = agent.network.clone() else {
                    return;
                };
                loop {
                    let (have, closed) = {
                        let pool = agent.ns_pool.lock().unwrap_or_else(|p| p.into_inner());
                        (pool.ready.len(), pool.closed)
                    };
                    if closed {
                        return;
                    }
                    if have >= agent.pool_target() {
                        break;
                    }
                    match agent.make_namespace(&net).await {
                        Ok(ns) => {
                            let kept = {
                                let mut pool =
                                    agent.ns_pool.lock().unwrap_or_else(|p| p.into_inner());
                                if !pool.closed {
                                    pool.ready.push(ns.clone());
                                }
                                !pool.closed
                            };
                            if !kept {
                                let _ = net.delete_namespace(&ns.name, &ns.veth).await;
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot prepare a network namespace ahead");
                            break;
                        }
                    }
                }
                let wake = agent.pool_wake.clone();
                drop(agent);
                tokio::select! {
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(REFILL_EVERY) => {}
                }
            }
        });
    }

    /// Delete the pool's namespaces and make no more (teardown).
    pub(crate) async fn drain_ns_pool(&self) {
        let ready = {
            let mut pool = self.ns_pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.closed = true;
            std::mem::take(&mut pool.ready)
        };
        if let Some(net) = &self.network {
            for ns in ready {
                let _ = net.delete_namespace(&ns.name, &ns.veth).await;
            }
        }
    }
}

/// Delete this node's namespaces that no process directory names (a previous run's pool, a
/// crash between making one and recording it), and return the address slots of those it names
/// (to be reserved before anything of this run makes a namespace).
pub(crate) async fn remove_unclaimed(processes: &Path, instance: &str) -> Vec<u32> {
    let prefix = netns_prefix(instance);
    let existing = sys::netns_names().await;
    let mut claimed = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir(processes) {
        for e in entries.flatten() {
            let state = read_state(&e.path());
            // Ended processes keep their directory (logs) but not their namespace.
            if let Some(ns) = state
                .and_then(|s| s.netns)
                .filter(|ns| existing.contains(&ns.name))
            {
                claimed.insert((ns.name, ns.index));
            }
        }
    }
    for name in existing {
        if name.starts_with(&prefix) && !claimed.iter().any(|(n, _)| *n == name) {
            let _ = tokio::process::Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status()
                .await;
        }
    }
    claimed.into_iter().map(|(_, index)| index).collect()
}
