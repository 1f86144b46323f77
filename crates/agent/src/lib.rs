//! The node agent: runs the processes the control plane assigns to this node, isolates them,
//! probes their ports, exposes them through the proxy, captures their logs, and reports what
//! happens. It is level-triggered: every pass compares the desired processes with what runs
//! here, so a restart re-adopts live processes and reports the ones that died meanwhile.

pub mod client;
pub mod logs;
pub mod metrics;
pub mod oci;
pub mod shim;
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
use lodge_proxy::{Counters, Protocol, Route};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::Notify;

pub use shim::ExitFile;

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

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_id: String,
    pub data_dir: PathBuf,
    pub public_host: String,
    /// Address the public ports bind on.
    pub proxy_ip: IpAddr,
    pub port_range: (u16, u16),
    pub isolation: Isolation,
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
}

/// What the agent keeps on disk about a process it started (`DIR/state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LocalState {
    shim_pid: u32,
    shim_start: Option<u64>,
    game_pid: u32,
    exposed: Vec<ExposedPort>,
    targets: Vec<Target>,
    netns: Option<NsState>,
    cgroups: Vec<PathBuf>,
    /// Set for container processes: how to reach their runtime.
    #[serde(default)]
    oci: Option<OciState>,
    /// The user a native game server runs as, when Lodge runs as root.
    #[serde(default)]
    user: Option<users::GameUser>,
    /// Its `HOME` and `TMPDIR`, owned by that user; removed with the process.
    #[serde(default)]
    scratch: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciState {
    runtime: PathBuf,
    root: PathBuf,
    id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Target {
    public_port: u16,
    target: SocketAddr,
    udp: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NsState {
    name: String,
    veth: String,
    index: u32,
}

struct Running {
    build_id: String,
    counters: Arc<Counters>,
    stop: Arc<Notify>,
    stop_requested: Arc<AtomicBool>,
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
    link: Arc<dyn ControlLink>,
    clock: Arc<dyn Clock>,
    network: Option<sys::Network>,
    running: Mutex<HashMap<String, Running>>,
    reserved: Mutex<Reservations>,
    wake: Notify,
    /// Processes the control plane said changed since the last pass.
    changed: Mutex<Vec<String>>,
    ready: AtomicBool,
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
        let agent = Arc::new(Agent {
            cfg,
            link,
            clock: Arc::new(SystemClock),
            network,
            running: Mutex::default(),
            reserved: Mutex::default(),
            wake: Notify::new(),
            changed: Mutex::default(),
            ready: AtomicBool::new(false),
            orphans_checked: AtomicBool::new(false),
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
                        if agent.reconcile().await {
                            agent.ready.store(true, Ordering::Release);
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
        running.get(process_id).map(|r| ProcessStats {
            active_connections: r.counters.active(),
            total_connections: r.counters.total_connections.load(Ordering::Relaxed),
            bytes_in: r.counters.bytes_in.load(Ordering::Relaxed),
            bytes_out: r.counters.bytes_out.load(Ordering::Relaxed),
        })
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
            .keys()
            .filter_map(|id| {
                let r = running.get(id)?;
                Some((
                    id.clone(),
                    ProcessStats {
                        active_connections: r.counters.active(),
                        total_connections: r.counters.total_connections.load(Ordering::Relaxed),
                        bytes_in: r.counters.bytes_in.load(Ordering::Relaxed),
                        bytes_out: r.counters.bytes_out.load(Ordering::Relaxed),
                    },
                ))
            })
            .collect()
    }

    pub fn running_count(&self) -> usize {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Remove the bridge and the cgroup parents (tests, uninstall; a node normally keeps them
    /// across restarts so that live processes stay reachable).
    pub async fn teardown_node(&self) {
        self.api_forward
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(net) = &self.network {
            let _ = net.remove_bridge().await;
        }
        sys::Cgroups::remove_group(&self.cfg.cgroup_group());
        // Nothing runs here any more: no scratch dir is in use.
        let _ = std::fs::remove_dir_all(users::scratch_root(&self.cfg.instance));
    }

    /// Start or stop just these processes, as the control plane now wants them.
    async fn reconcile_some(self: &Arc<Self>, ids: &[String]) {
        let specs = match self.link.specs(&self.cfg.node_id, ids).await {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read changed processes");
                return;
            }
        };
        self.apply(&specs, false);
    }

    /// A full pass; false if the desired processes could not be read (nothing is stopped).
    async fn reconcile(self: &Arc<Self>) -> bool {
        let desired = match self.link.desired(&self.cfg.node_id).await {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read desired processes");
                return false;
            }
        };
        self.apply(&desired, true);
        if !self.orphans_checked.swap(true, Ordering::AcqRel) {
            let wanted: BTreeSet<String> = desired.iter().map(|s| s.process_id.clone()).collect();
            let agent = self.clone();
            tokio::spawn(async move { agent.end_orphans(&wanted).await });
        }
        true
    }

    /// Game servers still running from before this start that the control plane no longer
    /// wants (it ended them while the node was away): its word wins, they stop, gracefully.
    /// Only after a restart can a process run here without being supervised, so one look at
    /// the first whole desired set is enough.
    async fn end_orphans(self: &Arc<Self>, wanted: &BTreeSet<String>) {
        let Ok(entries) = std::fs::read_dir(self.processes_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let supervised = self
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&id);
            if wanted.contains(&id) || supervised {
                continue;
            }
            let dir = e.path();
            let Ok(bytes) = std::fs::read(dir.join("state.json")) else {
                continue;
            };
            let Ok(mut state) = serde_json::from_slice::<LocalState>(&bytes) else {
                continue;
            };
            recover_pids(&dir, &mut state);
            if !sys::alive(state.shim_pid, state.shim_start) {
                continue;
            }
            tracing::info!(process_id = %id, "the control plane ended this process while the node was away; stopping it");
            append_log(
                &dir,
                "lodge: the control plane ended this process while its node was away; stopping it",
            );
            terminate(&state, libc::SIGTERM).await;
            let deadline = Instant::now() + self.cfg.stop_grace;
            while Instant::now() < deadline && sys::alive(state.shim_pid, state.shim_start) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            end_process_dir(&dir, &self.cfg.cgroup_group()).await;
        }
    }

    /// Start what should run and is not running, stop what should stop; with `complete`,
    /// `desired` is everything, and whatever runs outside it is stopped too.
    fn apply(self: &Arc<Self>, desired: &[ProcessSpec], complete: bool) {
        let mut to_start = Vec::new();
        {
            let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            for spec in desired {
                match running.get(&spec.process_id) {
                    Some(r) if spec.stop && !r.stop_requested.swap(true, Ordering::SeqCst) => {
                        r.stop.notify_one()
                    }
                    Some(_) => {}
                    None => to_start.push(spec.clone()),
                }
            }
            let wanted: BTreeSet<&str> = desired.iter().map(|s| s.process_id.as_str()).collect();
            for (id, r) in running.iter().filter(|_| complete) {
                if !wanted.contains(id.as_str()) && !r.stop_requested.swap(true, Ordering::SeqCst) {
                    tracing::info!(process_id = %id, "process no longer wanted here; stopping it");
                    r.stop.notify_one();
                }
            }
        }
        for spec in to_start {
            let handle = Running {
                build_id: spec.build_id.clone(),
                counters: Arc::default(),
                stop: Arc::new(Notify::new()),
                stop_requested: Arc::new(AtomicBool::new(spec.stop)),
            };
            if spec.stop {
                handle.stop.notify_one();
            }
            let (counters, stop, stop_requested) = (
                handle.counters.clone(),
                handle.stop.clone(),
                handle.stop_requested.clone(),
            );
            self.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(spec.process_id.clone(), handle);
            let agent = self.clone();
            tokio::spawn(async move {
                let id = spec.process_id.clone();
                agent.supervise(spec, counters, stop, stop_requested).await;
                agent
                    .running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            });
        }
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// The whole life of one process on this node.
    async fn supervise(
        self: &Arc<Self>,
        spec: ProcessSpec,
        counters: Arc<Counters>,
        stop: Arc<Notify>,
        stop_requested: Arc<AtomicBool>,
    ) {
        let id = spec.process_id.clone();
        if self.cfg.fake_processes {
            return self.supervise_fake(spec, stop).await;
        }
        let dir = self.cfg.process_dir(&id);
        let adopted = self.try_adopt(&spec, &dir, &counters).await;
        let (state, mut waiter, routes) = match adopted {
            Adopt::Live(state, routes) => {
                tracing::info!(process_id = %id, pid = state.game_pid, "re-adopted live process");
                // The control plane may not have heard of its ports (a crash right after the
                // start); saying it again is harmless.
                self.link
                    .report(AgentEvent::Booted {
                        process_id: id.clone(),
                        at: self.now(),
                        exposed_ports: state.exposed.clone(),
                    })
                    .await;
                let w = Waiter::Pid(state.shim_pid);
                (*state, w, routes)
            }
            Adopt::Ended(exit) => {
                let failed = !exit.clean() && !spec.stop;
                self.finish(&spec, &dir, None, Vec::new(), exit, failed)
                    .await;
                return;
            }
            Adopt::Fresh if spec.stop || !spec.exposed_ports.is_empty() => {
                let reason = if spec.stop {
                    "stopped before it started"
                } else {
                    "process was lost: no local state on its node"
                };
                let exit = ExitInfo {
                    code: None,
                    reason: reason.into(),
                };
                self.report_exit(&id, exit, !spec.stop).await;
                return;
            }
            Adopt::Fresh => match self.launch(&spec, &dir, &counters).await {
                Ok(x) => x,
                Err(e) => {
                    append_log(&dir, &format!("[lodge] failed to start: {e}"));
                    tracing::warn!(process_id = %id, error = %e, "failed to start process");
                    self.report_exit(
                        &id,
                        ExitInfo {
                            code: None,
                            reason: format!("failed to start: {e}"),
                        },
                        true,
                    )
                    .await;
                    return;
                }
            },
        };

        // Wait for the default port to be bound, unless the process ends or is stopped first.
        let default = &spec.default_port;
        let proto = if default.transport_type == TransportType::Udp {
            sys::Proto::Udp
        } else {
            sys::Proto::Tcp
        };
        let started = Instant::now();
        let mut bound = false;
        let mut exited_early = false;
        while !stop_requested.load(Ordering::SeqCst) {
            if sys::port_bound(state.game_pid, default.port_inside(&state), proto) {
                bound = true;
                break;
            }
            let elapsed = started.elapsed();
            if elapsed >= self.cfg.bind_timeout {
                break;
            }
            let step = if elapsed < Duration::from_millis(300) {
                2
            } else {
                25
            };
            tokio::select! {
                _ = waiter.wait() => { exited_early = true; break; }
                _ = tokio::time::sleep(Duration::from_millis(step)) => {}
                _ = stop.notified() => { stop.notify_one(); }
            }
        }
        let mut timed_out = false;
        if bound {
            tracing::info!(process_id = %id, after_ms = started.elapsed().as_millis() as u64, "process bound its port");
            self.link
                .report(AgentEvent::Running {
                    process_id: id.clone(),
                    at: self.now(),
                })
                .await;
        } else if !exited_early && !stop_requested.load(Ordering::SeqCst) {
            timed_out = true;
            let msg = format!(
                "[lodge] the process did not bind {}/{} within {} s; stopping it",
                default.port_inside(&state),
                default.transport_type,
                self.cfg.bind_timeout.as_secs_f64()
            );
            append_log(&dir, &msg);
            tracing::warn!(process_id = %id, "bind timeout");
            stop_requested.store(true, Ordering::SeqCst);
            stop.notify_one();
        }

        // Run until it exits; a stop request sends SIGTERM, then SIGKILL after the grace period.
        if !exited_early {
            let activity = self.activity_reporter(id.clone(), counters.clone());
            let sampler = self.metrics_sampler(dir.clone(), state.game_pid, counters.clone());
            tokio::select! {
                _ = waiter.wait() => {}
                _ = stop.notified() => {
                    stop_requested.store(true, Ordering::SeqCst);
                    terminate(&state, libc::SIGTERM).await;
                    if tokio::time::timeout(self.cfg.stop_grace, waiter.wait()).await.is_err() {
                        terminate(&state, libc::SIGKILL).await;
                        waiter.wait().await;
                    }
                }
            }
            activity.abort();
            sampler.abort();
        }
        let mut exit = exit_info(&dir);
        if timed_out {
            exit.reason = format!(
                "did not bind its port within {} s",
                self.cfg.bind_timeout.as_secs_f64()
            );
        }
        // A stop that was asked for is a stop whatever the exit code; a bind timeout is a failure.
        let failed = timed_out || (!exit.clean() && !stop_requested.load(Ordering::SeqCst));
        self.finish(&spec, &dir, Some(state), routes, exit, failed)
            .await;
    }

    fn activity_reporter(
        self: &Arc<Self>,
        id: String,
        counters: Arc<Counters>,
    ) -> tokio::task::JoinHandle<()> {
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last = u64::MAX;
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let Some(agent) = agent.upgrade() else { return };
                let active = counters.active();
                if active > 0 || active != last {
                    agent
                        .link
                        .report(AgentEvent::Activity {
                            process_id: id.clone(),
                            at: agent.now(),
                            active_connections: active,
                        })
                        .await;
                }
                last = active;
            }
        })
    }

    /// A pretend process: booted and running at once on made-up ports, ends when stopped.
    async fn supervise_fake(self: &Arc<Self>, spec: ProcessSpec, stop: Arc<Notify>) {
        let id = spec.process_id.clone();
        // Pretend processes still fetch their build: artifact transport is real.
        if let (Some(fetcher), false) = (&self.cfg.fetcher, spec.stop) {
            if let Err(e) = fetcher.ensure(&spec.build_id).await {
                let exit = ExitInfo {
                    code: None,
                    reason: format!("could not start: {e}"),
                };
                return self.report_exit(&id, exit, true).await;
            }
        }
        let (lo, hi) = self.cfg.port_range;
        let span = u32::from(hi - lo) + 1;
        let seed = id
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let exposed = spec
            .ports()
            .enumerate()
            .map(|(i, p)| ExposedPort {
                name: p.name.clone(),
                host: self.cfg.public_host.clone(),
                port: lo + ((seed.wrapping_add(i as u32)) % span) as u16,
                transport_type: p.transport_type,
            })
            .collect();
        if !spec.stop {
            self.link
                .report(AgentEvent::Booted {
                    process_id: id.clone(),
                    at: self.now(),
                    exposed_ports: exposed,
                })
                .await;
            self.link
                .report(AgentEvent::Running {
                    process_id: id.clone(),
                    at: self.now(),
                })
                .await;
            stop.notified().await;
        }
        let exit = ExitInfo {
            code: Some(0),
            reason: "exited with code 0".into(),
        };
        self.report_exit(&id, exit, false).await;
    }

    /// Append a metrics sample for the process every `metrics_interval` while it runs.
    fn metrics_sampler(
        &self,
        dir: PathBuf,
        pid: u32,
        counters: Arc<Counters>,
    ) -> tokio::task::JoinHandle<()> {
        let interval = self.cfg.metrics_interval.max(Duration::from_millis(100));
        let clock = self.clock.clone();
        tokio::spawn(async move {
            let mut last_cpu = tokio::task::spawn_blocking(move || sys::tree_usage(pid).cpu_ns)
                .await
                .unwrap_or(0);
            let mut last_egress = counters.bytes_out.load(Ordering::Relaxed);
            let mut last_at = Instant::now();
            loop {
                tokio::time::sleep(interval).await;
                let usage = tokio::task::spawn_blocking(move || sys::tree_usage(pid))
                    .await
                    .unwrap_or_default();
                let egress = counters.bytes_out.load(Ordering::Relaxed);
                let sample = metrics::Sample {
                    at_ms: clock.now_ms(),
                    interval_ms: last_at.elapsed().as_millis() as u64,
                    cpu_ns: usage.cpu_ns.saturating_sub(last_cpu),
                    rss_bytes: usage.rss_bytes,
                    egress_bytes: egress.saturating_sub(last_egress),
                    active_connections: counters.active(),
                };
                (last_cpu, last_egress, last_at) = (usage.cpu_ns, egress, Instant::now());
                let dir = dir.clone();
                let _ = tokio::task::spawn_blocking(move || metrics::append(&dir, &sample)).await;
            }
        })
    }

    async fn finish(
        &self,
        spec: &ProcessSpec,
        dir: &Path,
        state: Option<LocalState>,
        routes: Vec<Route>,
        exit: ExitInfo,
        failed: bool,
    ) {
        // The ports are free before they are released for another process.
        for r in routes {
            r.close().await;
        }
        let (mut exit, mut failed) = (exit, failed);
        if let Some(state) = &state {
            // A container runtime reports a signal death as 128 + the signal.
            if let (Some(_), Some(code)) = (&state.oci, exit.code) {
                if code > 128 && code < 160 && exit.reason.starts_with("exited with code") {
                    exit.reason = format!("killed by signal {}", code - 128);
                }
            }
            // The kernel counts out-of-memory kills in the process's memory cgroup: read it
            // before the cgroup goes.
            let cgroups = sys::Cgroups {
                dirs: state.cgroups.clone(),
            };
            let killed = exit.code == Some(137) || exit.reason.contains("signal 9");
            if cgroups.oom_kills() > 0 || (failed && killed && cgroups.memory_limit_hit()) {
                exit.reason = format!(
                    "out of memory: it used its whole {} MB memory limit and was killed",
                    spec.requested_memory_mb
                );
                failed = true;
            }
            self.release(state).await;
        }
        append_log(dir, &format!("[lodge] process {}", exit.reason));
        self.report_exit(&spec.process_id, exit, failed).await;
    }

    async fn report_exit(&self, id: &str, exit: ExitInfo, failed: bool) {
        tracing::info!(process_id = %id, reason = %exit.reason, failed, "process ended");
        // Gone from this node before anyone hears it ended.
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.link
            .report(AgentEvent::Exited {
                process_id: id.to_string(),
                at: self.now(),
                exit,
                failed,
            })
            .await;
    }

    async fn release(&self, state: &LocalState) {
        if let Some(dir) = &state.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some(oci) = &state.oci {
            oci::runtime(&oci.runtime, &oci.root, &["delete", "--force", &oci.id]).await;
        }
        if let (Some(ns), Some(net)) = (&state.netns, &self.network) {
            if let Err(e) = net.delete_namespace(&ns.name, &ns.veth).await {
                tracing::warn!(error = %e, ns = %ns.name, "cannot delete network namespace");
            }
        }
        sys::Cgroups {
            dirs: state.cgroups.clone(),
        }
        .destroy();
        if let Some(oci) = &state.oci {
            // The runtime made the container's cgroup under ours in every hierarchy.
            let id = oci.id.trim_start_matches("lodge-");
            sys::Cgroups::remove_everywhere(&self.cfg.cgroup_group(), id);
        }
        let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        for t in &state.targets {
            r.ports.remove(&t.public_port);
        }
        if let Some(ns) = &state.netns {
            r.ip_indexes.remove(&ns.index);
        }
        if let Some(u) = &state.user {
            r.user_indexes.remove(&u.index);
        }
    }

    async fn try_adopt(&self, spec: &ProcessSpec, dir: &Path, counters: &Arc<Counters>) -> Adopt {
        let Ok(bytes) = std::fs::read(dir.join("state.json")) else {
            return Adopt::Fresh;
        };
        let Ok(state) = serde_json::from_slice::<LocalState>(&bytes) else {
            return Adopt::Fresh;
        };
        {
            let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
            r.ports.extend(state.targets.iter().map(|t| t.public_port));
            if let Some(ns) = &state.netns {
                r.ip_indexes.insert(ns.index);
            }
            if let Some(u) = &state.user {
                r.user_indexes.insert(u.index);
            }
        }
        let mut state = state;
        recover_pids(dir, &mut state);
        if state.shim_pid == 0 {
            // Lodge died after recording the start but before any shim existed: nothing ran,
            // so start it now instead of failing it.
            self.release(&state).await;
            let _ = std::fs::remove_file(dir.join("state.json"));
            return Adopt::Fresh;
        }
        if sys::alive(state.shim_pid, state.shim_start) {
            let mut routes = Vec::new();
            for t in &state.targets {
                match self.open_route(t, counters).await {
                    Ok(r) => routes.push(r),
                    Err(e) => {
                        tracing::warn!(process_id = %spec.process_id, port = t.public_port, error = %e, "cannot reopen public port")
                    }
                }
            }
            return Adopt::Live(Box::new(state), routes);
        }
        // The shim is gone. If its game server somehow lives on, it is unsupervised: end it.
        if shim::read_exit(dir).is_none() && sys::alive(state.game_pid, None) {
            sys::signal_group(state.game_pid, libc::SIGKILL);
        }
        self.release(&state).await;
        let exit = match shim::read_exit(dir) {
            Some(e) => ExitInfo {
                code: e.code,
                reason: format!("{} while Lodge was down", e.describe()),
            },
            None => ExitInfo {
                code: None,
                reason: "its supervisor was lost while Lodge was down".into(),
            },
        };
        Adopt::Ended(exit)
    }

    async fn open_route(&self, t: &Target, counters: &Arc<Counters>) -> std::io::Result<Route> {
        let proto = if t.udp { Protocol::Udp } else { Protocol::Tcp };
        lodge_proxy::open(
            SocketAddr::new(self.cfg.proxy_ip, t.public_port),
            t.target,
            proto,
            counters.clone(),
            self.cfg.flows.clone(),
        )
        .await
    }

    /// Reserve a user index of its own for a new process of `build_id`.
    fn reserve_user(&self, build_id: &str) -> std::io::Result<users::GameUser> {
        let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
        // Round-robin, so a user id just freed is the last to be given out again.
        let start = r.user_cursor;
        let index = (0..users::MAX_USERS)
            .map(|k| (start + k) % users::MAX_USERS)
            .find(|i| !r.user_indexes.contains(i))
            .ok_or_else(|| std::io::Error::other("no free game-server user id on this node"))?;
        r.user_cursor = (index + 1) % users::MAX_USERS;
        r.user_indexes.insert(index);
        Ok(users::GameUser::new(index, build_id))
    }

    /// Reserve a free public port and open its route.
    async fn public_port(
        &self,
        target: SocketAddr,
        udp: bool,
        counters: &Arc<Counters>,
    ) -> std::io::Result<(u16, Route)> {
        let (lo, hi) = self.cfg.port_range;
        let span = u32::from(hi - lo) + 1;
        for _ in 0..span {
            let candidate = {
                let mut r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
                let c = lo + (r.cursor % span as u16);
                r.cursor = r.cursor.wrapping_add(1) % span as u16;
                if !r.ports.insert(c) {
                    continue;
                }
                c
            };
            let t = Target {
                public_port: candidate,
                target,
                udp,
            };
            match self.open_route(&t, counters).await {
                Ok(route) => return Ok((candidate, route)),
                Err(_) => {
                    self.reserved
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .ports
                        .remove(&candidate);
                }
            }
        }
        Err(std::io::Error::other(format!(
            "no free public port in {lo}-{hi}"
        )))
    }

    async fn launch(
        &self,
        spec: &ProcessSpec,
        dir: &Path,
        counters: &Arc<Counters>,
    ) -> std::io::Result<(LocalState, Waiter, Vec<Route>)> {
        let t0 = Instant::now();
        std::fs::create_dir_all(dir)?;
        let _ = std::fs::remove_file(dir.join(shim::EXIT));
        if let Some(fetcher) = &self.cfg.fetcher {
            fetcher
                .ensure(&spec.build_id)
                .await
                .map_err(std::io::Error::other)?;
            let mut keep = self.builds_in_use();
            keep.insert(spec.build_id.clone());
            fetcher.evict(&keep);
        }
        let bundle = self.cfg.bundle_dir(&spec.build_id);
        let image_dir = self.cfg.image_dir(&spec.build_id);
        let image = if image_dir.join(image::CONFIG).is_file() {
            if self.cfg.oci_runtime.is_none() || self.network.is_none() {
                return Err(std::io::Error::other(
                    "this build is a container image: running it needs Lodge as root with netns \
                     isolation and an OCI runtime (apt-get install crun runc)",
                ));
            }
            Some(image::ImageConfig::load(&image_dir).map_err(std::io::Error::other)?)
        } else {
            None
        };
        let manifest = match &image {
            Some(_) => None,
            None => Some(bundle::Manifest::load(&bundle).map_err(std::io::Error::other)?),
        };

        // Network: a namespace of its own (bind the container ports) or the host (bind $PORT).
        let mut netns = None;
        let mut inner_ports: Vec<u16> = Vec::new();
        let mut targets = Vec::new();
        if let Some(net) = &self.network {
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
            let short: String = spec
                .process_id
                .chars()
                .filter(|c| c.is_ascii_hexdigit())
                .take(12)
                .collect();
            let ns = NsState {
                name: format!("lodge-{}", spec.process_id),
                veth: format!("lv{short}"),
                index,
            };
            let ip = net.address(index);
            if let Err(e) = net.create_namespace(&ns.name, &ns.veth, ip).await {
                self.reserved
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .ip_indexes
                    .remove(&index);
                return Err(e);
            }
            for p in spec.ports() {
                inner_ports.push(p.port);
                targets.push(SocketAddr::new(IpAddr::V4(ip), p.port));
            }
            netns = Some(ns);
        } else {
            for _ in spec.ports() {
                let port = free_local_port(&inner_ports)?;
                inner_ports.push(port);
                targets.push(SocketAddr::from(([127, 0, 0, 1], port)));
            }
        }
        let cgroups = if self.network.is_some() {
            sys::Cgroups::create(
                &self.cfg.cgroup_group(),
                &spec.process_id,
                spec.requested_cpu,
                spec.requested_memory_mb,
            )
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot create cgroups; running without limits");
                sys::Cgroups { dirs: Vec::new() }
            })
        } else {
            sys::Cgroups { dirs: Vec::new() }
        };

        let oci = image.as_ref().and_then(|_| {
            Some(OciState {
                runtime: self.cfg.oci_runtime.clone()?,
                root: self.cfg.data_dir.join("oci"),
                id: format!("lodge-{}", spec.process_id),
            })
        });
        let mut state = LocalState {
            shim_pid: 0,
            shim_start: None,
            game_pid: 0,
            exposed: Vec::new(),
            targets: Vec::new(),
            netns,
            cgroups: cgroups.dirs.clone(),
            oci,
            user: None,
            scratch: None,
        };
        let mut routes = Vec::new();
        let result = async {
            if self.cfg.game_users && manifest.is_some() {
                let user = self.reserve_user(&spec.build_id)?;
                state.user = Some(user);
                users::share_bundle(&bundle, user.gid)?;
                state.scratch = Some(users::make_scratch(
                    &users::scratch_root(&self.cfg.instance),
                    &spec.process_id,
                    user,
                )?);
            }
            for (p, target) in spec.ports().zip(&targets) {
                let udp = p.transport_type == TransportType::Udp;
                let (public, route) = self.public_port(*target, udp, counters).await?;
                routes.push(route);
                state.targets.push(Target {
                    public_port: public,
                    target: *target,
                    udp,
                });
                state.exposed.push(ExposedPort {
                    name: p.name.clone(),
                    host: self.cfg.public_host.clone(),
                    port: public,
                    transport_type: p.transport_type,
                });
            }
            let netns_path = state
                .netns
                .as_ref()
                .map(|n| PathBuf::from(format!("/run/netns/{}", n.name)));
            let launch = match (&manifest, &image, &state.oci) {
                (Some(manifest), _, _) => {
                    let bundle_env: Vec<(String, String)> = manifest
                        .env
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    let mut base = host_env();
                    if let Some(scratch) = &state.scratch {
                        let home = scratch.join("home").to_string_lossy().into_owned();
                        base.retain(|(k, _)| k != "HOME" && k != "USER");
                        base.push(("HOME".into(), home.clone()));
                        base.push(("TMPDIR".into(), home));
                    }
                    shim::Launch {
                        argv: expand_argv(&manifest.command, spec, &inner_ports),
                        cwd: bundle.clone(),
                        env: self.environment(
                            spec,
                            base,
                            &bundle_env,
                            &state.exposed,
                            &inner_ports,
                        ),
                        netns: netns_path,
                        cgroup_procs: cgroups.procs_files(),
                        user: state.user.map(|u| (u.uid, u.gid)),
                        bundle_mount: state.scratch.as_ref().map(|d| d.join("bundle")),
                    }
                }
                (None, Some(image), Some(oci)) => {
                    let base = image
                        .env
                        .iter()
                        .filter_map(|e| e.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    let env = self.environment(spec, base, &[], &state.exposed, &inner_ports);
                    let bundle_dir = dir.join("oci");
                    std::fs::create_dir_all(&bundle_dir)?;
                    let config = oci::config(&oci::Container {
                        rootfs: &image_dir.join(image::ROOTFS),
                        image,
                        env: &env,
                        hostname: format!(
                            "lodge-{}",
                            &spec.process_id[..spec.process_id.len().min(8)]
                        ),
                        netns: netns_path,
                        cgroups_path: format!(
                            "/{}/{}/ctr",
                            self.cfg.cgroup_group(),
                            spec.process_id
                        ),
                    });
                    std::fs::write(
                        bundle_dir.join("config.json"),
                        serde_json::to_vec_pretty(&config).map_err(std::io::Error::other)?,
                    )?;
                    std::fs::create_dir_all(&oci.root)?;
                    std::fs::set_permissions(
                        &oci.root,
                        std::os::unix::fs::PermissionsExt::from_mode(0o700),
                    )?;
                    // A container of this id left by a crash before its shim was recorded.
                    let root = oci.root.to_string_lossy().into_owned();
                    let _ = std::process::Command::new(&oci.runtime)
                        .args(["--root", &root, "delete", "--force", &oci.id])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                    shim::Launch {
                        argv: vec![
                            oci.runtime.to_string_lossy().into_owned(),
                            "--root".into(),
                            root,
                            "run".into(),
                            "--bundle".into(),
                            bundle_dir.to_string_lossy().into_owned(),
                            oci.id.clone(),
                        ],
                        cwd: dir.to_path_buf(),
                        env: vec![("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into())],
                        netns: None,
                        cgroup_procs: Vec::new(),
                        user: None,
                        bundle_mount: None,
                    }
                }
                _ => return Err(std::io::Error::other("nothing to run")),
            };
            std::fs::write(
                dir.join(shim::LAUNCH),
                serde_json::to_vec_pretty(&launch).map_err(std::io::Error::other)?,
            )?;
            // Recorded before the shim exists, so that no crash from here on can leave a shim
            // that a restart does not know of (and would start a second game server beside).
            let _ = std::fs::remove_file(dir.join(shim::SHIM_PID));
            let _ = std::fs::remove_file(dir.join(shim::PID));
            write_state(dir, &state)?;
            let mut cmd = tokio::process::Command::new(&self.cfg.exe);
            cmd.arg("shim")
                .arg(dir)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            // SAFETY: setsid is async-signal-safe; it detaches the shim from Lodge's session so
            // that signals aimed at Lodge (Ctrl-C) do not reach game servers.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
            let mut child = cmd.spawn()?;
            let shim_pid = child.id().unwrap_or(0);
            // Recorded before anything else can fail or crash: a restart then re-adopts this
            // shim instead of launching a second copy of the game.
            state.shim_pid = shim_pid;
            state.shim_start = sys::start_time(shim_pid);
            write_state(dir, &state)?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| std::io::Error::other("shim has no stdout"))?;
            let mut line = String::new();
            tokio::io::BufReader::new(stdout)
                .read_line(&mut line)
                .await?;
            let game_pid: u32 = line.trim().parse().unwrap_or(0);
            state.game_pid = game_pid;
            write_state(dir, &state)?;
            Ok::<_, std::io::Error>(Waiter::Child(child))
        }
        .await;
        let waiter = match result {
            Ok(w) => w,
            Err(e) => {
                for r in routes {
                    r.close().await;
                }
                self.release(&state).await;
                return Err(e);
            }
        };
        tracing::info!(
            process_id = %spec.process_id,
            pid = state.game_pid,
            ports = ?state.exposed.iter().map(|p| p.port).collect::<Vec<_>>(),
            spawn_ms = t0.elapsed().as_secs_f64() * 1000.0,
            "process started"
        );
        self.link
            .report(AgentEvent::Booted {
                process_id: spec.process_id.clone(),
                at: self.now(),
                exposed_ports: state.exposed.clone(),
            })
            .await;
        Ok((state, waiter, routes))
    }

    /// The environment of a process: `base` (the host's basics, or an image's ENV), Hathora's
    /// and Lodge's variables, the bundle's `[env]`, then the deployment's env (last wins).
    fn environment(
        &self,
        spec: &ProcessSpec,
        base: Vec<(String, String)>,
        bundle_env: &[(String, String)],
        exposed: &[ExposedPort],
        inner: &[u16],
    ) -> Vec<(String, String)> {
        let mut env = base;
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
        }
        let mut set = |k: &str, v: String| env.push((k.to_string(), v));
        set("HATHORA_PROCESS_ID", spec.process_id.clone());
        set("HATHORA_APP_ID", spec.app_id.clone());
        set("HATHORA_APP_SECRET", spec.app_secret.clone());
        set("HATHORA_DEPLOYMENT_ID", spec.deployment_id.clone());
        set(
            "HATHORA_BUILD_TAG",
            spec.build_tag.clone().unwrap_or_default(),
        );
        set("HATHORA_REGION", spec.region.to_string());
        set(
            "HATHORA_ROOMS_PER_PROCESS",
            spec.rooms_per_process.to_string(),
        );
        if let Some(r) = &spec.initial_room_id {
            set("HATHORA_INITIAL_ROOM_ID", r.clone());
        }
        if let Some(c) = &spec.initial_room_config {
            set("HATHORA_INITIAL_ROOM_CONFIG", c.clone());
        }
        set("HATHORA_HOSTNAME", self.cfg.public_host.clone());
        set("HATHORA_ALLOCATED_CPU", spec.requested_cpu.to_string());
        set(
            "HATHORA_ALLOCATED_MEMORY_MB",
            spec.requested_memory_mb.to_string(),
        );
        for ((p, e), inner) in spec.ports().zip(exposed).zip(inner) {
            if p.name == "default" {
                set("HATHORA_DEFAULT_PORT", e.port.to_string());
                set("PORT", inner.to_string());
            } else {
                let upper = env_suffix(&p.name);
                set(&format!("HATHORA_{upper}_PORT"), e.port.to_string());
                set(&format!("PORT_{upper}"), inner.to_string());
            }
        }
        let api_url = match &self.network {
            Some(net) => format!("http://{}:{}", net.gateway, self.cfg.api_addr.port()),
            None => {
                let mut a = self.cfg.api_addr;
                if a.ip().is_unspecified() {
                    a.set_ip(IpAddr::from([127, 0, 0, 1]));
                }
                format!("http://{a}")
            }
        };
        set("LODGE_API_URL", api_url);
        for (k, v) in bundle_env {
            set(k, v.clone());
        }
        for e in &spec.env {
            set(&e.name, e.value.clone());
        }
        // Later entries win.
        let mut seen = BTreeSet::new();
        let mut out: Vec<(String, String)> = env
            .into_iter()
            .rev()
            .filter(|(k, _)| seen.insert(k.clone()))
            .collect();
        out.reverse();
        out
    }
}

/// Ask a process to end: through its runtime for containers, by signal to its process group
/// otherwise.
async fn terminate(state: &LocalState, sig: i32) {
    if let Some(oci) = &state.oci {
        let name = if sig == libc::SIGKILL { "KILL" } else { "TERM" };
        oci::runtime(&oci.runtime, &oci.root, &["kill", &oci.id, name]).await;
        if sig == libc::SIGKILL {
            sys::signal(state.game_pid, libc::SIGKILL);
        }
        return;
    }
    sys::signal_group(state.game_pid, sig);
    if sig == libc::SIGKILL {
        sys::signal(state.game_pid, libc::SIGKILL);
    }
}

/// What a native process inherits from Lodge's own environment.
fn host_env() -> Vec<(String, String)> {
    ["PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect()
}

trait PortInside {
    fn port_inside(&self, state: &LocalState) -> u16;
}

impl PortInside for ContainerPort {
    /// The port the process binds: the container port when isolated, else its `$PORT`.
    fn port_inside(&self, state: &LocalState) -> u16 {
        state
            .targets
            .first()
            .map(|t| t.target.port())
            .unwrap_or(self.port)
    }
}

enum Adopt {
    Fresh,
    Live(Box<LocalState>, Vec<Route>),
    Ended(ExitInfo),
}

enum Waiter {
    Child(tokio::process::Child),
    Pid(u32),
}

impl Waiter {
    /// Resolves when the shim has exited (repeatable).
    async fn wait(&mut self) {
        match self {
            Waiter::Child(c) => {
                let _ = c.wait().await;
            }
            Waiter::Pid(p) => sys::wait_exit(*p).await,
        }
    }
}

fn exit_info(dir: &Path) -> ExitInfo {
    match shim::read_exit(dir) {
        Some(e) => ExitInfo {
            code: e.code,
            reason: e.describe(),
        },
        None => ExitInfo {
            code: None,
            reason: "its supervisor ended without an exit status".into(),
        },
    }
}

/// Fill in what a Lodge that died during a start did not record: the shim's pid (from the
/// shim's own file; state.json is written before the shim is spawned) and the game's.
fn recover_pids(dir: &Path, state: &mut LocalState) {
    if state.shim_pid == 0 {
        if let Some((pid, start)) = shim::read_shim_pid(dir) {
            state.shim_pid = pid;
            state.shim_start = Some(start);
        } else if let Some((pid, _, _)) = sys::shims_under(dir).into_iter().next() {
            // Spawned, but not yet far enough to write its own record.
            state.shim_pid = pid;
            state.shim_start = sys::start_time(pid);
        }
    }
    if state.game_pid == 0 {
        state.game_pid = shim::read_game_pid(dir).unwrap_or(0);
    }
}

fn write_state(dir: &Path, state: &LocalState) -> std::io::Result<()> {
    let tmp = dir.join("state.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(tmp, dir.join("state.json"))
}

fn append_log(dir: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(shim::LOG))
    {
        let _ = writeln!(f, "{line}");
    }
}

/// `HATHORA_<NAME>_PORT` naming: upper case, `-` becomes `_`.
pub fn env_suffix(port_name: &str) -> String {
    port_name.to_ascii_uppercase().replace('-', "_")
}

/// Expand `{port}` and `{port:NAME}` in the command.
fn expand_argv(argv: &[String], spec: &ProcessSpec, inner: &[u16]) -> Vec<String> {
    argv.iter()
        .map(|arg| {
            let mut a = arg.replace("{port}", &inner.first().copied().unwrap_or(0).to_string());
            for (p, port) in spec.ports().zip(inner) {
                a = a.replace(&format!("{{port:{}}}", p.name), &port.to_string());
            }
            a
        })
        .collect()
}

/// A loopback port free for both TCP and UDP, not in `taken`.
fn free_local_port(taken: &[u16]) -> std::io::Result<u16> {
    for _ in 0..64 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if taken.contains(&port) {
            continue;
        }
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no free local port"))
}

/// Kill what a process directory's state names (its game, shim, container) and remove its
/// cgroups and namespace; its log stays. Returns whether its shim was still alive.
async fn end_process_dir(dir: &Path, cfg_group: &str) -> bool {
    let Ok(bytes) = std::fs::read(dir.join("state.json")) else {
        return false;
    };
    let Ok(mut state) = serde_json::from_slice::<LocalState>(&bytes) else {
        return false;
    };
    recover_pids(dir, &mut state);
    let mut was_alive = false;
    if let Some(oci) = &state.oci {
        oci::runtime(&oci.runtime, &oci.root, &["kill", &oci.id, "KILL"]).await;
        oci::runtime(&oci.runtime, &oci.root, &["delete", "--force", &oci.id]).await;
    }
    if sys::alive(state.shim_pid, state.shim_start) {
        was_alive = true;
    }
    if state.game_pid > 1 {
        sys::signal_group(state.game_pid, libc::SIGKILL);
        sys::signal(state.game_pid, libc::SIGKILL);
    }
    if state.shim_pid > 1 && sys::alive(state.shim_pid, state.shim_start) {
        sys::signal(state.shim_pid, libc::SIGKILL);
    }
    let cgroups = sys::Cgroups {
        dirs: state.cgroups.clone(),
    };
    tokio::task::spawn_blocking(move || cgroups.destroy())
        .await
        .ok();
    if let Some(ns) = &state.netns {
        let _ = tokio::process::Command::new("ip")
            .args(["link", "del", &ns.veth])
            .stderr(Stdio::null())
            .status()
            .await;
        let _ = tokio::process::Command::new("ip")
            .args(["netns", "del", &ns.name])
            .stderr(Stdio::null())
            .status()
            .await;
    }
    if let Some(id) = dir.file_name() {
        sys::Cgroups::remove_everywhere(cfg_group, &id.to_string_lossy());
    }
    was_alive
}

/// End everything a Lodge left on this machine for `data_dir` (its node state there): every
/// game server still running (containers through their runtime), their network namespaces and
/// cgroups, the bridge and the cgroup parents. For a stopped Lodge only: an operator's
/// uninstall, and test teardown. Returns how many processes it ended.
pub async fn cleanup(data_dir: &Path, instance: &str) -> usize {
    let cfg_group = format!("lodge-{instance}");
    let bridge = format!("lodge{}", &instance[..instance.len().min(8)]);
    let mut ended = 0;
    let Ok(entries) = std::fs::read_dir(data_dir.join("processes")) else {
        return 0;
    };
    for e in entries.flatten() {
        if end_process_dir(&e.path(), &cfg_group).await {
            ended += 1;
        }
    }
    // Shims that no state file names (a crash before it was written): end them and their games.
    for (shim_pid, _, games) in sys::shims_under(&data_dir.join("processes")) {
        for game in games {
            sys::signal_group(game, libc::SIGKILL);
            sys::signal(game, libc::SIGKILL);
        }
        sys::signal(shim_pid, libc::SIGKILL);
        ended += 1;
    }
    let _ = std::fs::remove_dir_all(users::scratch_root(instance));
    let _ = tokio::process::Command::new("ip")
        .args(["link", "del", &bridge])
        .stderr(Stdio::null())
        .status()
        .await;
    sys::Cgroups::remove_group(&cfg_group);
    ended
}

#[async_trait]
impl lodge_model::node::NodeLink for Agent {
    fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    fn wake(&self, process_id: &str) {
        self.wake_for(process_id);
    }

    fn stats(&self, process_id: &str) -> Option<ProcessStats> {
        Agent::stats(self, process_id)
    }

    fn flows(&self) -> lodge_model::node::FlowTotals {
        let f = &self.cfg.flows;
        lodge_model::node::FlowTotals {
            active: u64::try_from(f.active()).unwrap_or(u64::MAX),
            max: u64::try_from(f.max_flows()).unwrap_or(u64::MAX),
            refused: f.refused.load(Ordering::Relaxed),
        }
    }

    async fn log_tail(&self, process_id: &str, lines: usize) -> LinkResult<(Vec<u8>, u64)> {
        let dir = logs::process_dir(&self.processes_dir(), process_id)?;
        logs::tail_lines(&dir.join(shim::LOG), lines)
            .await
            .map_err(|e| LinkError::io(format_args!("reading the log of {process_id}"), e))
    }

    async fn log_read(&self, process_id: &str, offset: u64, max: usize) -> LinkResult<Vec<u8>> {
        let dir = logs::process_dir(&self.processes_dir(), process_id)?;
        logs::read_at(&dir.join(shim::LOG), offset, max)
            .await
            .map_err(|e| LinkError::io(format_args!("reading the log of {process_id}"), e))
    }

    async fn kept_processes(&self) -> LinkResult<Vec<String>> {
        let io = |e| LinkError::io("listing the node's processes", e);
        let mut out = Vec::new();
        let mut entries = tokio::fs::read_dir(self.processes_dir())
            .await
            .map_err(io)?;
        while let Some(e) = entries.next_entry().await.map_err(io)? {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
        Ok(out)
    }

    async fn forget_process(&self, process_id: &str) -> LinkResult<()> {
        if self.stats(process_id).is_some() {
            return Err(LinkError::Refused(format!(
                "process {process_id} still runs here"
            )));
        }
        let dir = logs::process_dir(&self.processes_dir(), process_id)?;
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(LinkError::io(dir.display(), e)),
        }
    }

    async fn metrics(
        &self,
        process_id: &str,
        start_s: i64,
        end_s: i64,
        step_s: i64,
    ) -> LinkResult<lodge_model::node::MetricSeries> {
        let dir = logs::process_dir(&self.processes_dir(), process_id)?;
        let samples = tokio::task::spawn_blocking(move || metrics::read(&dir))
            .await
            .map_err(|e| LinkError::Io(format!("reading metrics: {e}")))?;
        Ok(metrics::series(&samples, start_s, end_s, step_s))
    }
}
