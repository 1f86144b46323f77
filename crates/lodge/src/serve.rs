//! `lodge serve`: configuration, wiring and lifecycle of the all-in-one server.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use lodge_agent::{Agent, AgentConfig, Isolation};
use lodge_control::{Control, ControlConfig};
use lodge_model::{Node, Region, SystemClock};
use lodge_store::{PostgresStore, SqliteStore, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IsolationArg {
    /// `netns` when running as root on Linux, else `none`.
    Auto,
    /// Own network namespace and cgroup per process (root).
    Netns,
    /// Shared host network; processes bind `$PORT`.
    None,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Where Lodge keeps its database, builds, process logs and admin token.
    #[arg(long, env = "LODGE_DATA_DIR", default_value = "./lodge-data")]
    pub data_dir: PathBuf,
    /// Address of the HTTP API.
    #[arg(long, env = "LODGE_API_ADDR", default_value = "127.0.0.1:5634")]
    pub api_addr: SocketAddr,
    /// Host name or address players connect to (the `host` of every exposed port).
    #[arg(long, env = "LODGE_PUBLIC_HOST", default_value = "127.0.0.1")]
    pub public_host: String,
    /// Range of public proxy ports, `LOW-HIGH`.
    #[arg(long, env = "LODGE_PORT_RANGE", default_value = "30000-31999", value_parser = parse_range)]
    pub port_range: (u16, u16),
    /// Regions this node serves: `all` or a comma-separated list such as `London,Frankfurt`.
    #[arg(long, env = "LODGE_REGIONS", default_value = "all")]
    pub regions: String,
    /// `sqlite` (in the data dir) or a `postgres://` URL.
    #[arg(long, env = "LODGE_STORE", default_value = "sqlite")]
    pub store: String,
    /// UDP port of the ping (latency) echo service.
    #[arg(long, env = "LODGE_PING_PORT", default_value_t = 10000)]
    pub ping_port: u16,
    /// Process isolation.
    #[arg(long, env = "LODGE_ISOLATION", value_enum, default_value_t = IsolationArg::Auto)]
    pub isolation: IsolationArg,
    /// Seconds a new process has to bind its default port.
    #[arg(long, env = "LODGE_BIND_TIMEOUT", default_value_t = 100.0)]
    pub bind_timeout: f64,
    /// Seconds without rooms and connections before a process with idle timeout is stopped.
    #[arg(long, env = "LODGE_IDLE_TIMEOUT", default_value_t = 300.0)]
    pub idle_timeout: f64,
    /// Seconds between SIGTERM and SIGKILL when stopping a process.
    #[arg(long, env = "LODGE_STOP_GRACE", default_value_t = 10.0)]
    pub stop_grace: f64,
    /// Address the public proxy ports bind on.
    #[arg(long, env = "LODGE_PROXY_BIND", default_value = "0.0.0.0")]
    pub proxy_bind: IpAddr,
    /// Seconds between samples of each process's CPU, memory, egress and connections.
    #[arg(long, env = "LODGE_METRICS_INTERVAL", default_value_t = 10.0)]
    pub metrics_interval: f64,
    /// OCI runtime for container-image builds: `auto` (crun, else runc), `crun`, `runc` or a path.
    #[arg(long, env = "LODGE_OCI_RUNTIME", default_value = "auto")]
    pub oci_runtime: String,
    /// The daemonless image builder for builds with a Dockerfile (buildah's command line).
    #[arg(long, env = "LODGE_IMAGE_BUILDER", default_value = "buildah")]
    pub image_builder: String,
    /// Hours the logs and metrics of ended processes are kept (LogsV1 answers 410 after).
    #[arg(long, env = "LODGE_RETENTION_HOURS", default_value_t = 72.0)]
    pub retention_hours: f64,
    /// Benchmarks only: pretend to run game servers (nothing is started; rooms go active at
    /// once), to measure the control plane with very many processes.
    #[arg(long, hide = true)]
    pub fake_processes: bool,
    /// Lobbies one player may create per app per hour (429 with Retry-After beyond).
    #[arg(long, env = "LODGE_LOBBY_RATE_LIMIT", default_value_t = 10)]
    pub lobby_rate_limit: u32,
    /// Players' flows (UDP sessions plus TCP connections) one source address may hold on this
    /// node at once, over all public ports. The node's total is sized to the descriptor limit,
    /// less a reserve for the API.
    #[arg(long, env = "LODGE_FLOWS_PER_SOURCE", default_value_t = 64)]
    pub flows_per_source: usize,
    /// Private, loopback or link-local registries that registry builds may pull from, as
    /// `host` or `host:port`, comma-separated (public registries need no entry).
    #[arg(long, env = "LODGE_REGISTRY_ALLOW", value_delimiter = ',')]
    pub registry_allow: Vec<String>,
    /// Reverse proxies in front of the API (comma-separated addresses): for their requests the
    /// player's address, which per-source limits count, is the last of `X-Forwarded-For`.
    #[arg(long, env = "LODGE_TRUSTED_PROXY", value_delimiter = ',')]
    pub trusted_proxy: Vec<IpAddr>,
    /// Serve `/metrics` without a token on this address too (for example 127.0.0.1:9634); on
    /// the API address it always needs an admin token.
    #[arg(long, env = "LODGE_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Lobbies one source address may create per app per hour (429 with Retry-After beyond).
    #[arg(long, env = "LODGE_LOBBY_RATE_LIMIT_SOURCE", default_value_t = 30)]
    pub lobby_rate_limit_source: u32,
    /// Lobbies all players together may create per app per hour.
    #[arg(long, env = "LODGE_LOBBY_RATE_LIMIT_APP", default_value_t = 1000)]
    pub lobby_rate_limit_app: u32,
    /// Live processes one app may have; CreateRoom and CreateProcess answer 402 beyond.
    #[arg(long, env = "LODGE_MAX_PROCESSES_PER_APP", default_value_t = 500)]
    pub max_processes_per_app: u64,
    /// Builds (not deleted) one org may have; CreateBuild answers 402 beyond.
    #[arg(long, env = "LODGE_MAX_BUILDS_PER_ORG", default_value_t = 1000)]
    pub max_builds_per_org: u64,
    /// Gigabytes all builds of one org may take (declared upload sizes, then image sizes).
    #[arg(long, env = "LODGE_MAX_ORG_BUILD_GB", default_value_t = 50.0)]
    pub max_org_build_gb: f64,
    /// Google's signing keys for LoginGoogle: a JWKS URL, or a file holding a JWKS document.
    #[arg(long, env = "LODGE_GOOGLE_JWKS", default_value = lodge_control::jwt::GOOGLE_JWKS)]
    pub google_jwks: String,
}

/// Descriptors kept for the API, the store, logs and the agent, whatever players do.
const FD_RESERVE: u64 = 2048;

/// Raise the soft descriptor limit to the hard one; returns the limit in force.
pub(crate) fn raise_nofile() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 1024;
        }
        if l.rlim_cur < l.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                l = raised;
            }
        }
    }
    l.rlim_cur
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or("expected LOW-HIGH, for example 30000-31999")?;
    let lo: u16 = a.trim().parse().map_err(|_| format!("bad port '{a}'"))?;
    let hi: u16 = b.trim().parse().map_err(|_| format!("bad port '{b}'"))?;
    if lo == 0 || hi < lo {
        return Err(format!("invalid port range {s}"));
    }
    Ok((lo, hi))
}

fn parse_regions(s: &str) -> Result<Option<Vec<Region>>, String> {
    if s.trim().eq_ignore_ascii_case("all") {
        return Ok(None);
    }
    s.split(',')
        .map(|r| r.trim().parse())
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn secs(s: f64, name: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| format!("--{name} must be a non-negative number of seconds"))
}

/// `lodge cleanup`: end what a stopped Lodge left running for this data dir.
pub async fn cleanup(data_dir: &Path) -> Result<usize, String> {
    let dir =
        std::fs::canonicalize(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    Ok(lodge_agent::cleanup(&dir, &instance_key(&dir)).await)
}

/// A short stable key for this data dir: names of the bridge and cgroups derive from it.
fn instance_key(dir: &Path) -> String {
    let s = dir.to_string_lossy();
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{:06x}", h & 0xff_ffff)
}

fn node_id(dir: &Path) -> std::io::Result<String> {
    let path = dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        return Ok(id.trim().to_string());
    }
    let id = format!("node-{}", lodge_model::id::secret_hex());
    std::fs::write(&path, &id)?;
    Ok(id)
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LODGE_LOG_FORMAT").is_ok_and(|v| v == "json");
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// An exclusive lock on a data dir, held for as long as a `lodge serve` (or `lodge migrate`)
/// uses it; released by the kernel when the process ends, however it ends. The descriptor is
/// close-on-exec, so game servers (which outlive Lodge) never inherit it.
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    pub fn acquire(data_dir: &Path) -> Result<Self, String> {
        let path = data_dir.join("serve.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            return Err(format!(
                "another lodge is using {} (it holds {}); stop it first",
                data_dir.display(),
                path.display()
            ));
        }
        Ok(Self { _file: file })
    }
}

fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// The store `--store` names: the embedded SQLite file in the data dir, or PostgreSQL (which
/// has to answer within a few seconds, or Lodge does not start).
async fn open_store(spec: &str, data_dir: &Path) -> Result<Arc<dyn Store>, String> {
    if is_postgres_url(spec) {
        let store = PostgresStore::connect(spec)
            .await
            .map_err(|e| e.to_string())?;
        return Ok(Arc::new(store));
    }
    let store = SqliteStore::open(&data_dir.join("lodge.db")).map_err(|e| e.to_string())?;
    Ok(Arc::new(store))
}

pub async fn run(args: ServeArgs) -> Result<(), String> {
    init_tracing();
    let regions = parse_regions(&args.regions)?;
    if !(args.store == "sqlite" || is_postgres_url(&args.store)) {
        return Err(format!(
            "--store {}: expected `sqlite` or a postgres:// URL",
            args.store
        ));
    }
    // Settings that can refuse to start are checked before anything is written.
    let isolation = match args.isolation {
        IsolationArg::Netns => Isolation::Netns,
        IsolationArg::None => Isolation::None,
        IsolationArg::Auto
            if lodge_agent::sys::is_root() && Path::new("/proc/self/ns/net").exists() =>
        {
            Isolation::Netns
        }
        IsolationArg::Auto => Isolation::None,
    };
    let oci_runtime = if isolation == Isolation::Netns {
        lodge_agent::oci::detect(&args.oci_runtime)?
    } else {
        None
    };
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("cannot create {}: {e}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir).map_err(|e| e.to_string())?;
    let _data_dir_lock = DataDirLock::acquire(&data_dir)?;
    let store = open_store(&args.store, &data_dir).await?;
    let mut cfg = ControlConfig::new(data_dir.clone());
    cfg.admin_token = std::env::var("LODGE_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    cfg.idle_timeout = secs(args.idle_timeout, "idle-timeout")?;
    cfg.lobby_rate_limit = args.lobby_rate_limit;
    cfg.lobby_rate_limit_source = args.lobby_rate_limit_source;
    cfg.lobby_rate_limit_app = args.lobby_rate_limit_app;
    cfg.max_processes_per_app = args.max_processes_per_app;
    cfg.max_builds_per_org = args.max_builds_per_org;
    cfg.max_org_build_bytes = (args.max_org_build_gb.max(0.0) * (1u64 << 30) as f64) as u64;
    cfg.google_jwks = args.google_jwks.clone();
    cfg.image_builder = args.image_builder.clone();
    cfg.retention = secs(args.retention_hours * 3600.0, "retention-hours")?;
    cfg.egress = lodge_control::egress::EgressPolicy::new(args.registry_allow.clone());
    let control = Control::new(store, Arc::new(SystemClock), cfg);
    let org = control.bootstrap().await.map_err(|e| e.to_string())?;
    control
        .fail_interrupted_builds()
        .await
        .map_err(|e| e.to_string())?;
    control
        .reclaim_build_disk()
        .await
        .map_err(|e| e.to_string())?;
    let token_file = data_dir.join("admin-token");
    if let Some(token) = control
        .ensure_admin_token(&token_file)
        .await
        .map_err(|e| e.to_string())?
    {
        println!(
            "Lodge admin token (shown once; also saved to {}):\n  {token}",
            token_file.display()
        );
    }

    match &oci_runtime {
        Some(r) => {
            tracing::info!(runtime = %r.display(), "container images run with this OCI runtime")
        }
        None => tracing::info!(
            "container images cannot run here (they need root, netns isolation and crun or runc)"
        ),
    }
    let listener = tokio::net::TcpListener::bind(args.api_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.api_addr))?;
    let api_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let node = Node {
        node_id: node_id(&data_dir).map_err(|e| e.to_string())?,
        public_host: args.public_host.clone(),
        regions: regions.clone(),
        started_at: control.now(),
        // Ports other programs hold are not capacity (checked before re-adoption opens ours).
        port_capacity: (!args.fake_processes).then(|| {
            let free = lodge_agent::sys::bindable_ports(args.proxy_bind, args.port_range);
            let span = u32::from(args.port_range.1 - args.port_range.0) + 1;
            if free < span {
                tracing::warn!(
                    free,
                    span,
                    "some ports of --port-range are held by other programs; they are not offered"
                );
            }
            free
        }),
    };
    let agent_cfg = AgentConfig {
        node_id: node.node_id.clone(),
        data_dir: data_dir.clone(),
        public_host: args.public_host.clone(),
        proxy_ip: args.proxy_bind,
        port_range: args.port_range,
        isolation,
        bind_timeout: secs(args.bind_timeout, "bind-timeout")?,
        stop_grace: secs(args.stop_grace, "stop-grace")?,
        api_addr,
        exe: std::env::current_exe().map_err(|e| e.to_string())?,
        instance: instance_key(&data_dir),
        metrics_interval: secs(args.metrics_interval, "metrics-interval")?,
        oci_runtime,
        fake_processes: args.fake_processes,
        game_users: lodge_agent::sys::is_root() && !args.fake_processes,
        flows: Arc::new(lodge_proxy::FlowLimits::for_descriptors(
            raise_nofile(),
            FD_RESERVE,
            args.flows_per_source,
        )),
    };
    control.put_node(&node).await.map_err(|e| e.to_string())?;
    let agent = Agent::start(agent_cfg, control.local_link())
        .await
        .map_err(|e| format!("cannot start the node agent ({isolation:?} isolation): {e}"))?;
    control
        .register_local_node(node, agent.clone())
        .await
        .map_err(|e| e.to_string())?;
    let _reconciler = control.spawn_reconciler();
    let _ping = crate::ping::spawn(args.ping_port).await;

    let ready = Arc::new(AtomicBool::new(false));
    {
        let (ready, agent) = (ready.clone(), agent.clone());
        tokio::spawn(async move {
            while !agent.ready() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ready.store(true, Ordering::Release);
        });
    }
    let state = lodge_api::AppState {
        control: control.clone(),
        ready,
        public_host: args.public_host.clone(),
        ping_port: args.ping_port,
        regions: regions.unwrap_or_else(|| Region::ALL.to_vec()),
    };
    if let Some(addr) = args.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (--metrics-addr): {e}"))?;
        let router = lodge_api::metrics_router(state.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
    }
    tracing::info!(
        api = %format!("http://{api_addr}"),
        org_id = %org.org_id,
        data_dir = %data_dir.display(),
        isolation = ?isolation,
        ports = %format!("{}-{}", args.port_range.0, args.port_range.1),
        "Lodge is serving"
    );
    lodge_api::server::serve(
        listener,
        lodge_api::router(state),
        lodge_api::server::ServeLimits {
            trusted_proxies: Arc::new(args.trusted_proxy.clone()),
            ..Default::default()
        },
        shutdown_signal(),
        Duration::from_secs(5),
    )
    .await;
    if agent.running_count() == 0 {
        // Nothing runs here: leave no bridge or cgroups behind.
        agent.teardown_node().await;
        tracing::info!("shut down");
    } else {
        tracing::info!(
            processes = agent.running_count(),
            "shutting down; game-server processes keep running and are re-adopted on the next start"
        );
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    tokio::select! {
        _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
        _ = async { if let Some(i) = int.as_mut() { i.recv().await; } else { std::future::pending::<()>().await } } => {}
    }
}
