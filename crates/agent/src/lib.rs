//! The node agent: runs the processes the control plane assigns to this node, isolates them,
//! probes their ports, exposes them through the proxy, captures their logs, and reports what
//! happens. It is level-triggered: every pass compares the desired processes with what runs
//! here, so a restart re-adopts live processes and reports the ones that died meanwhile.

mod cleanup;
pub mod client;
pub mod driver;
mod forwarding;
mod launch;
pub mod logs;
pub mod metrics;
mod node_link;
mod nspool;
pub mod oci;
mod reconcile;
pub mod shim;
mod state;
mod supervise;
pub mod sys;
pub mod users;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use lodge_artifact::{bundle, image};
use lodge_model::spec::{AgentEvent, ExitInfo, ProcessSpec};
use lodge_model::{Clock, ContainerPort, ExposedPort, SystemClock, TransportType};
use lodge_proxy::{kernel, Counters, Protocol, PublicPort, Route};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::Notify;

pub use cleanup::cleanup;
use cleanup::end_process_dir;
pub use launch::env_suffix;
use launch::*;
pub use shim::ExitFile;
use state::*;
use supervise::Waiter;

pub use lodge_model::node::{ControlLink, LinkError, LinkResult, ProcessStats};

/// How often the agent compares everything it runs with everything it should run; between
/// full passes it looks only at the processes it was told about.
const FULL_RECONCILE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Processes share the host network and bind `$PORT`.
    None,
    /// Each process gets its own network namespace and cgroup (root on Linux).
    Netns,
}

/// Who forwards the public ports of isolated processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    /// The kernel when it can (root, netns isolation, nftables), else Lodge's userspace proxy.
    Auto,
    /// The kernel, or the node does not start.
    Kernel,
    /// Lodge's userspace proxy, always.
    Userspace,
}

/// How often the kernel's counters of forwarded ports are read into each process's counters.
const KERNEL_ACCOUNTING: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_id: String,
    pub data_dir: PathBuf,
    pub public_host: String,
    /// Address the public ports bind on.
    pub proxy_ip: IpAddr,
    pub port_range: (u16, u16),
    pub isolation: Isolation,
    /// Who forwards the public ports of isolated processes (without isolation: the proxy).
    pub forwarding: Forwarding,
    /// Packets per second one source address may send to the public ports, enforced by the
    /// kernel (kernel forwarding only; 0: no limit).
    pub source_packet_rate: u32,
    pub bind_timeout: Duration,
    pub stop_grace: Duration,
    /// The API address, for `LODGE_API_URL`.
    pub api_addr: SocketAddr,
    /// The `lodge` executable, run as `lodge shim DIR`.
    pub exe: PathBuf,
    /// Short unique key of this installation: bridge and cgroup names derive from it.
    pub instance: String,
    /// How often each running process's CPU, memory, egress and connections are sampled.
    pub metrics_interval: Duration,
    /// crun or runc, for builds that are container images; `None` if containers cannot run.
    pub oci_runtime: Option<PathBuf>,
    /// Benchmarks only: pretend to run processes (no process, no port, no proxy), so the
    /// control plane can be measured with tens of thousands of them.
    pub fake_processes: bool,
    /// Run every native game server as a user of its own (needs root): see [`users`].
    pub game_users: bool,
    /// Caps on players' flows over all public ports of the node.
    pub flows: Arc<lodge_proxy::FlowLimits>,
    /// The certificate `tls` ports present (`None`: the node offers no tls ports).
    pub tls: Option<lodge_proxy::tls::Identity>,
    /// Where builds come from when this node does not share the control plane's data dir (a
    /// joined agent); `None` reads them from `data_dir`.
    pub fetcher: Option<Arc<lodge_link::artifacts::Fetcher>>,
}

impl AgentConfig {
    pub fn process_dir(&self, process_id: &str) -> PathBuf {
        self.data_dir.join("processes").join(process_id)
    }
    pub fn image_dir(&self, build_id: &str) -> PathBuf {
        self.data_dir.join("builds").join(build_id).join(image::DIR)
    }
    pub fn bundle_dir(&self, build_id: &str) -> PathBuf {
        self.data_dir.join("builds").join(build_id).join("bundle")
    }
    pub fn bridge_name(&self) -> String {
        format!("lodge{}", &self.instance[..self.instance.len().min(8)])
    }
    pub fn cgroup_group(&self) -> String {
        format!("lodge-{}", self.instance)
    }
    /// The node's nftables table (kernel forwarding).
    pub fn nft_table(&self) -> String {
        nft_table(&self.instance)
    }
}

/// The nftables table of the node of installation `instance`.
pub fn nft_table(instance: &str) -> String {
    format!("lodge_{}", &instance[..instance.len().min(8)])
}

struct Running {
    build_id: String,
    counters: Arc<Counters>,
    stop: Arc<Notify>,
    stop_requested: Arc<AtomicBool>,
    /// Its public ports the kernel forwards (their counters are read into `counters`).
    kernel_ports: Vec<kernel::Entry>,
}

impl Running {
    fn stats(&self) -> ProcessStats {
        ProcessStats {
            active_connections: self.counters.active(),
            total_connections: self.counters.total_connections(),
            bytes_in: self.counters.bytes_in(),
            bytes_out: self.counters.bytes_out(),
        }
    }
}

#[derive(Default)]
struct Reservations {
    ports: BTreeSet<u16>,
    ip_indexes: BTreeSet<u32>,
    user_indexes: BTreeSet<u32>,
    user_cursor: u32,
    cursor: u16,
    ip_cursor: u32,
}

pub struct Agent {
    cfg: AgentConfig,
    /// Runs each process (for real, or pretending: `AgentConfig::fake_processes`).
    driver: Arc<dyn driver::Driver>,
    link: Arc<dyn ControlLink>,
    clock: Arc<dyn Clock>,
    network: Option<sys::Network>,
    /// Namespaces made ahead of demand (netns isolation).
    ns_pool: Mutex<nspool::NsPool>,
    pool_wake: Arc<Notify>,
    /// The node's nftables table, when the kernel forwards public ports.
    forwarder: Option<Arc<kernel::Forwarder>>,
    /// Packets the kernel's per-source rate limit dropped (read with the counters).
    rate_limited: std::sync::atomic::AtomicU64,
    running: Mutex<HashMap<String, Running>>,
    reserved: Mutex<Reservations>,
    wake: Notify,
    /// Processes the control plane said changed since the last pass.
    changed: Mutex<Vec<String>>,
    ready: AtomicBool,
    /// Processes that ended here: never started again (ids are never reused).
    ended: Mutex<std::collections::HashSet<String>>,
    /// Whether processes left from before this start and no longer wanted were looked for.
    orphans_checked: AtomicBool,
    api_forward: Mutex<Option<Route>>,
}

impl Agent {
    /// Prepare the node (bridge when isolating) and start the reconcile loop.
    pub async fn start(
        cfg: AgentConfig,
        link: Arc<dyn ControlLink>,
    ) -> std::io::Result<Arc<Agent>> {
        std::fs::create_dir_all(cfg.data_dir.join("processes"))?;
        if cfg.game_users {
            users::protect_data_dir(&cfg.data_dir)?;
        }
        let network = match cfg.isolation {
            Isolation::Netns => {
                let seed = cfg
                    .instance
                    .bytes()
                    .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
                Some(sys::Network::ensure(&cfg.bridge_name(), seed).await?)
            }
            Isolation::None => None,
        };
        let forwarder = forwarding::start(&cfg, network.as_ref()).await?;
        if network.is_some() && !cfg.fake_processes && sys::cgroup_attach_waits() {
            tracing::info!(
                "each new process's cgroup attach waits for an RCU grace period (~10 ms of its start); \
                 `mount -o remount,favordynmods` on the cgroup2 mount removes that wait machine-wide (README, Isolation)"
            );
        }
        let driver: Arc<dyn driver::Driver> = if cfg.fake_processes {
            Arc::new(driver::Pretend)
        } else {
            Arc::new(driver::Processes)
        };
        let agent = Arc::new(Agent {
            driver,
            cfg,
            link,
            clock: Arc::new(SystemClock),
            network,
            ns_pool: Mutex::default(),
            pool_wake: Arc::new(Notify::new()),
            forwarder,
            rate_limited: Default::default(),
            running: Mutex::default(),
            reserved: Mutex::default(),
            wake: Notify::new(),
            changed: Mutex::default(),
            ready: AtomicBool::new(false),
            orphans_checked: AtomicBool::new(false),
            ended: Mutex::default(),
            api_forward: Mutex::new(None),
        });
        if let Some(net) = &agent.network {
            // Isolated processes reach the API through the bridge gateway.
            let public = SocketAddr::new(IpAddr::V4(net.gateway), agent.cfg.api_addr.port());
            let mut target = agent.cfg.api_addr;
            if target.ip().is_unspecified() {
                target.set_ip(IpAddr::from([127, 0, 0, 1]));
            }
            match lodge_proxy::open(
                public,
                target,
                Protocol::Tcp,
                Arc::default(),
                agent.cfg.flows.clone(),
            )
            .await
            {
                Ok(r) => *agent.api_forward.lock().unwrap_or_else(|p| p.into_inner()) = Some(r),
                Err(e) => {
                    tracing::warn!(error = %e, %public, "cannot expose the API to isolated processes")
                }
            }
        }
        if agent.forwarder.is_some() {
            agent.spawn_kernel_accounting();
        }
        if agent.network.is_some() && !agent.cfg.fake_processes {
            // Before anything of this run makes a namespace: the slots of live processes are
            // taken (adoption confirms or frees them), the rest of the last run's pool goes.
            let claimed =
                nspool::remove_unclaimed(&agent.processes_dir(), &agent.cfg.instance).await;
            agent
                .reserved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .ip_indexes
                .extend(claimed);
        }
        let weak = Arc::downgrade(&agent);
        tokio::spawn(async move {
            let mut last_full: Option<Instant> = None;
            loop {
                let Some(agent) = weak.upgrade() else { return };
                let changed =
                    std::mem::take(&mut *agent.changed.lock().unwrap_or_else(|p| p.into_inner()));
                match last_full {
                    Some(t) if t.elapsed() < FULL_RECONCILE && !changed.is_empty() => {
                        agent.reconcile_some(&changed).await;
                    }
                    _ => {
                        // Ready once a whole pass ran (what survived a restart is re-adopted).
                        if agent.reconcile().await && !agent.ready.swap(true, Ordering::AcqRel) {
                            // Whatever is forwarded for no process of this node (one that
                            // ended while Lodge was down) is removed now that all are adopted.
                            agent.sweep_forwarding().await;
                            // Namespaces are made ahead once every live one is known.
                            if agent.network.is_some() && !agent.cfg.fake_processes {
                                agent.spawn_ns_pool();
                            }
                        }
                        last_full = Some(Instant::now());
                    }
                }
                let wait = async {
                    let until_full = FULL_RECONCILE
                        .saturating_sub(last_full.map_or(FULL_RECONCILE, |t| t.elapsed()));
                    tokio::select! {
                        _ = agent.wake.notified() => {}
                        _ = tokio::time::sleep(until_full) => {}
                    }
                };
                wait.await;
            }
        });
        Ok(agent)
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// True once the first reconcile pass (adoption after a restart) is done.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Ask for a full reconcile pass now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A process was assigned here or should stop: look at it now.
    pub fn wake_for(&self, process_id: &str) {
        self.changed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(process_id.to_string());
        self.wake.notify_one();
    }

    fn processes_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("processes")
    }

    pub fn log_path(&self, process_id: &str) -> PathBuf {
        self.cfg.process_dir(process_id).join(shim::LOG)
    }

    pub fn stats(&self, process_id: &str) -> Option<ProcessStats> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.get(process_id).map(Running::stats)
    }

    /// Fetch a build ahead of its first process (a deployment of it was created).
    pub async fn prefetch(&self, build_id: &str) {
        let Some(fetcher) = &self.cfg.fetcher else {
            return;
        };
        match fetcher.ensure(build_id).await {
            Ok(_) => {
                tracing::info!(%build_id, "build fetched ahead of its first process");
                fetcher.evict(&self.builds_in_use());
            }
            Err(e) => tracing::warn!(%build_id, error = %e, "cannot fetch the build ahead"),
        }
    }

    /// Builds of processes that run here (never evicted from the build cache).
    fn builds_in_use(&self) -> BTreeSet<String> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|r| r.build_id.clone())
            .collect()
    }

    /// Live counters of every process that runs here.
    pub fn all_stats(&self) -> Vec<(String, ProcessStats)> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running
            .iter()
            .map(|(id, r)| (id.clone(), r.stats()))
            .collect()
    }

    pub fn running_count(&self) -> usize {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no game server of this node runs: none supervised, and none left unadopted
    /// (a node stopped before its first pass still has its processes' records on disk).
    pub fn nothing_runs(&self) -> bool {
        if self.running_count() > 0 {
            return false;
        }
        live_records(&self.processes_dir()).is_empty()
    }

    /// Remove the bridge and the cgroup parents (tests, uninstall; a node normally keeps them
    /// across restarts so that live processes stay reachable).
    pub async fn teardown_node(&self) {
        self.api_forward
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.drain_ns_pool().await;
        if self.forwarder.is_some() {
            // The guard goes with the table: so does the forwarding it guarded.
            forwarding::remove(&self.cfg.instance).await;
        }
        if let Some(net) = &self.network {
            let _ = net.remove_bridge().await;
        }
        sys::Cgroups::remove_group(&self.cfg.cgroup_group());
        // Nothing runs here any more: no scratch dir is in use.
        let _ = std::fs::remove_dir_all(users::scratch_root(&self.cfg.instance));
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }
}
