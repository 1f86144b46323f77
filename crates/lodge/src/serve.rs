//! `lodge serve`: configuration, wiring and lifecycle of the all-in-one server.

use std::net::{IpAddr, SocketAddr};

use crate::node::{instance_key, secs, NodeArgs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use lodge_control::{Control, ControlConfig};
use lodge_model::{Node, Region, SystemClock};
use lodge_store::{PostgresStore, SqliteStore, Store};

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Where Lodge keeps its database, builds, process logs and admin token.
    #[arg(long, env = "LODGE_DATA_DIR", default_value = "./lodge-data")]
    pub data_dir: PathBuf,
    /// Address of the HTTP API.
    #[arg(long, env = "LODGE_API_ADDR", default_value = "127.0.0.1:5634")]
    pub api_addr: SocketAddr,
    /// Regions this node serves: `all` or a comma-separated list such as `London,Frankfurt`.
    #[arg(long, env = "LODGE_REGIONS", default_value = "all")]
    pub regions: String,
    /// `sqlite` (in the data dir) or a `postgres://` URL.
    #[arg(long, env = "LODGE_STORE", default_value = "sqlite")]
    pub store: String,
    /// Seconds without rooms and connections before a process with idle timeout is stopped.
    #[arg(long, env = "LODGE_IDLE_TIMEOUT", default_value_t = 300.0)]
    pub idle_timeout: f64,
    /// The daemonless image builder for builds with a Dockerfile (buildah's command line).
    #[arg(long, env = "LODGE_IMAGE_BUILDER", default_value = "buildah")]
    pub image_builder: String,
    /// Hours the logs and metrics of ended processes are kept (LogsV1 answers 410 after).
    #[arg(long, env = "LODGE_RETENTION_HOURS", default_value_t = 72.0)]
    pub retention_hours: f64,
    /// Lobbies one player may create per app per hour (429 with Retry-After beyond).
    #[arg(long, env = "LODGE_LOBBY_RATE_LIMIT", default_value_t = 10)]
    pub lobby_rate_limit: u32,
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
    /// Run a control plane only: no node in this process (rooms go to joined `lodge agent`s).
    #[arg(long, env = "LODGE_NO_LOCAL_NODE")]
    pub no_local_node: bool,
    /// How long a joined node may be silent before it is lost: its processes end (with
    /// `summaryExitReason` saying so) and their rooms are destroyed. `90s`, `5m`, `1h`.
    #[arg(long, env = "LODGE_NODE_LOST_AFTER", default_value = "5m", value_parser = crate::cli::nodes::parse_duration)]
    pub node_lost_after: Duration,
    /// How long warm capacity beyond an app's target (`serviceConfig`) stays before it is
    /// stopped: an idle process beyond the target, and an autoscaled target above demand.
    #[arg(long, env = "LODGE_SCALE_DOWN_DELAY", default_value = "2m", value_parser = crate::cli::nodes::parse_duration)]
    pub scale_down_delay: Duration,
    /// The URL the other control-plane replicas on this store reach this one's API at (they
    /// forward calls to the nodes attached here). Default: `http://` and the API address.
    #[arg(long, env = "LODGE_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    #[command(flatten)]
    pub node: NodeArgs,
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

/// `lodge cleanup`: end what a stopped Lodge left running for this data dir.
pub async fn cleanup(data_dir: &Path) -> Result<usize, String> {
    let dir =
        std::fs::canonicalize(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    Ok(lodge_agent::cleanup(&dir, &instance_key(&dir)).await)
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

pub(crate) fn init_tracing() {
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
    let n = &args.node;
    // Settings that can refuse to start are checked before anything is written.
    let isolation = n.isolation();
    if !args.no_local_node && isolation == lodge_agent::Isolation::Netns {
        lodge_agent::oci::detect(&n.oci_runtime)?;
    }
    let data_dir = crate::node::prepare_data_dir(&args.data_dir)?;
    let _data_dir_lock = DataDirLock::acquire(&data_dir)?;
    if args.no_local_node {
        // No node locks it down here: the database, builds and admin token are root's alone
        // (with a local node, the node does, and lets game users traverse to their builds).
        lodge_agent::users::protect_data_dir(&data_dir)
            .map_err(|e| format!("cannot restrict {}: {e}", data_dir.display()))?;
    }
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
    cfg.node_lost_after = args.node_lost_after;
    cfg.scale_down_delay = args.scale_down_delay;
    let control = Control::new(store, Arc::new(SystemClock), cfg);
    let org = control.bootstrap().await.map_err(|e| e.to_string())?;
    control
        .fail_orphaned_builds()
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

    let listener = tokio::net::TcpListener::bind(args.api_addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.api_addr))?;
    let api_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let advertise = match &args.advertise_url {
        Some(url) if url.starts_with("http://") || url.starts_with("https://") => url.clone(),
        Some(url) => return Err(format!("--advertise-url {url}: expected an http:// URL")),
        None if api_addr.ip().is_unspecified() => {
            format!("http://127.0.0.1:{}", api_addr.port())
        }
        None => format!("http://{api_addr}"),
    };
    if control.store().shared() {
        if api_addr.ip().is_unspecified() && args.advertise_url.is_none() {
            tracing::warn!(%advertise, "the API listens on every address but --advertise-url is not set: replicas on other machines cannot forward calls here");
        }
        if !args.no_local_node {
            tracing::warn!("a local node on a shared store runs only builds made through this replica; run replicas with --no-local-node and join lodge agents");
        }
    }
    control
        .join_replicas(&advertise)
        .await
        .map_err(|e| e.to_string())?;
    let ready = Arc::new(AtomicBool::new(false));
    let agent = if args.no_local_node {
        ready.store(true, Ordering::Release);
        tracing::info!("no local node: rooms go to joined agents (lodge nodes join-token)");
        None
    } else {
        let agent = start_local_node(&control, &args, &data_dir, api_addr, regions.clone()).await?;
        let (ready, waiting) = (ready.clone(), agent.clone());
        tokio::spawn(async move {
            while !waiting.ready() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            ready.store(true, Ordering::Release);
        });
        Some(agent)
    };
    let _reconciler = control.spawn_reconciler();
    let _ping = crate::ping::spawn(n.ping_port).await;

    let state = lodge_api::AppState {
        control: control.clone(),
        ready,
        ping_port: n.ping_port,
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
        local_node = !args.no_local_node,
        ports = %format!("{}-{}", n.port_range.0, n.port_range.1),
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
    control.leave_replicas().await;
    match agent {
        Some(agent) if agent.nothing_runs() => {
            // Nothing runs here: leave no bridge or cgroups behind.
            agent.teardown_node().await;
            tracing::info!("shut down");
        }
        Some(agent) => tracing::info!(
            processes = agent.running_count(),
            "shutting down; game-server processes keep running and are re-adopted on the next start"
        ),
        None => tracing::info!("shut down"),
    }
    Ok(())
}

/// The node embedded in `lodge serve`: an agent in this process that speaks the node protocol
/// to this control plane over an in-process pipe, exactly as a joined agent does over TCP.
async fn start_local_node(
    control: &Arc<Control>,
    args: &ServeArgs,
    data_dir: &Path,
    api_addr: SocketAddr,
    regions: Option<Vec<Region>>,
) -> Result<Arc<lodge_agent::Agent>, String> {
    let n = &args.node;
    let cfg = n.agent_config(
        &node_id(data_dir).map_err(|e| e.to_string())?,
        data_dir,
        api_addr,
        None,
    )?;
    match &cfg.oci_runtime {
        Some(r) => {
            tracing::info!(runtime = %r.display(), "container images run with this OCI runtime")
        }
        None => tracing::info!(
            "container images cannot run here (they need root, netns isolation and crun or runc)"
        ),
    }
    let mut node = Node::local(
        cfg.node_id.clone(),
        n.public_host.clone(),
        regions,
        control.now(),
    );
    // Ports other programs hold are not capacity (checked before re-adoption opens ours).
    node.port_capacity = n.port_capacity();
    node.ping_port = Some(n.ping_port);
    if let Ok(Some(old)) = control.store().node(&node.node_id).await {
        // Keep the protocol's numbering and the operator's drain across restarts.
        node.epoch = old.epoch;
        node.last_event_seq = old.last_event_seq;
        node.incarnation = old.incarnation;
        node.status = old.status;
        node.stopped_at = old.stopped_at;
    }
    control.put_node(&node).await.map_err(|e| e.to_string())?;
    let (ctl, node_id) = (control.clone(), node.node_id.clone());
    let dial = move || {
        let (near, far) = tokio::io::duplex(1 << 20);
        let (ctl, node_id) = (ctl.clone(), node_id.clone());
        tokio::spawn(async move {
            let _ = ctl.serve_node(&node_id, far).await;
        });
        async move { Ok::<_, lodge_link::dial::DialError>(near) }
    };
    let (agent, _client) = crate::node::start_agent(cfg, None, dial).await?;
    Ok(agent)
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    tokio::select! {
        _ = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
        _ = async { if let Some(i) = int.as_mut() { i.recv().await; } else { std::future::pending::<()>().await } } => {}
    }
}
