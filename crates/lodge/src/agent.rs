//! `lodge agent`: a node on this machine that joins a control plane and runs the processes it
//! assigns here, with its own public ports and ping port. The join token is exchanged once
//! for a node credential kept in the data dir (mode 0600); from then on the agent reconnects
//! with the credential, and keeps every game server running while the control plane is away.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;

use clap::Args;
use lodge_link::dial::{self, Joined};
use lodge_model::protocol::NodeInfo;
use lodge_model::Region;

use crate::node::NodeArgs;
use crate::serve::DataDirLock;

#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// The control plane's API URL, `http://HOST:PORT`; or several replicas' URLs separated by
    /// commas, tried in turn whenever the connection to one is lost.
    #[arg(long, env = "LODGE_CONTROL_PLANE")]
    pub control_plane: String,
    /// A token from `lodge nodes join-token` (needed only for the first start).
    #[arg(long, env = "LODGE_JOIN_TOKEN")]
    pub join_token: Option<String>,
    /// The region this node serves, by Hathora's name (Frankfurt, Washington_DC, ...).
    #[arg(long, env = "LODGE_REGION")]
    pub region: Region,
    /// The fleet this node joins; must match the join token's, if it names one.
    #[arg(long, env = "LODGE_FLEET")]
    pub fleet: Option<String>,
    /// Where the agent keeps its credential, process logs and fetched builds.
    #[arg(long, env = "LODGE_DATA_DIR", default_value = "./lodge-agent-data")]
    pub data_dir: std::path::PathBuf,
    /// Gigabytes of fetched builds kept; the least recently used beyond it are removed (never
    /// one a running process uses).
    #[arg(long, env = "LODGE_BUILD_CACHE_GB", default_value_t = 20.0)]
    pub build_cache_gb: f64,
    /// Cores offered to processes, against which their deployments' `requestedCPU` is placed
    /// (default: this machine's; more overcommits).
    #[arg(long, env = "LODGE_CPU")]
    pub cpu: Option<f64>,
    /// Memory in MB offered to processes, against their `requestedMemoryMB` (default: this
    /// machine's).
    #[arg(long, env = "LODGE_MEMORY_MB")]
    pub memory_mb: Option<f64>,
    #[command(flatten)]
    pub node: NodeArgs,
}

const CREDENTIAL: &str = "node-credential.json";

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Saved {
    control_plane: String,
    #[serde(flatten)]
    joined: Joined,
}

fn memory_mb() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn save(path: &Path, saved: &Saved) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(&serde_json::to_vec_pretty(saved).map_err(|e| e.to_string())?)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Join through the first replica that answers; a refusal is the answer of all of them.
async fn join_any(
    urls: &[String],
    token: &str,
    info: &NodeInfo,
    fleet: Option<&str>,
) -> Result<Joined, String> {
    let mut last = String::new();
    for u in urls {
        match dial::join(u, token, info, fleet).await {
            Ok(j) => return Ok(j),
            Err(e @ dial::DialError::Refused(_)) => return Err(e.to_string()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

pub async fn run(args: AgentArgs) -> Result<(), String> {
    crate::serve::init_tracing();
    let urls: Vec<String> = args
        .control_plane
        .split(',')
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
        .collect();
    let url = urls
        .first()
        .cloned()
        .ok_or("--control-plane: give the control plane's URL")?;
    for u in &urls {
        dial::authority(u).map_err(|e| e.to_string())?;
    }
    let authority = dial::authority(&url).map_err(|e| e.to_string())?;
    let data_dir = crate::node::prepare_data_dir(&args.data_dir)?;
    let _lock = DataDirLock::acquire(&data_dir)?;
    let n = &args.node;
    let info = NodeInfo {
        public_host: n.public_host.clone(),
        region: args.region,
        cpu: args.cpu.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1.0, |c| c.get() as f64)
        }),
        memory_mb: args.memory_mb.unwrap_or_else(memory_mb),
        port_capacity: n.port_capacity(),
        ping_port: Some(n.ping_port),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let cred_path = data_dir.join(CREDENTIAL);
    let saved: Option<Saved> = std::fs::read(&cred_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let joined = match saved {
        // Joined through any of these replicas: they share one database.
        Some(s)
            if s.control_plane
                .split(',')
                .any(|u| urls.contains(&u.to_string())) =>
        {
            s.joined
        }
        _ => {
            let token = args.join_token.as_deref().ok_or_else(|| {
                format!(
                    "this node has not joined {url} yet: pass --join-token (from `lodge nodes join-token --region {}`)",
                    args.region
                )
            })?;
            let joined = join_any(&urls, token, &info, args.fleet.as_deref()).await?;
            save(
                &cred_path,
                &Saved {
                    control_plane: urls.join(","),
                    joined: joined.clone(),
                },
            )?;
            tracing::info!(node_id = %joined.node_id, "joined the control plane");
            joined
        }
    };
    // Game servers' LODGE_API_URL, and the address isolated processes reach it at.
    let api_addr: SocketAddr = authority
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| format!("cannot resolve {authority}"))?;
    let fetcher = Arc::new(
        lodge_link::artifacts::Fetcher::new(&urls.join(","), &joined.credential, &data_dir)
            .with_cache_limit((args.build_cache_gb.max(0.0) * (1u64 << 30) as f64) as u64),
    );
    let cfg = n.agent_config(&joined.node_id, &data_dir, api_addr, Some(fetcher))?;
    // Each attempt after a failure goes to the next replica: a node reconnects through
    // whichever is alive.
    let (cps, cred) = (Arc::new(urls.clone()), joined.credential.clone());
    let turn = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let dial = move || {
        let (cps, cred, turn) = (cps.clone(), cred.clone(), turn.clone());
        async move {
            let i = turn.load(std::sync::atomic::Ordering::Relaxed);
            let cp = &cps[i % cps.len()];
            let connected = dial::connect(cp, &cred).await;
            if connected.is_err() {
                turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            connected
        }
    };
    let (agent, _client) = crate::node::start_agent(cfg, Some(info), dial).await?;
    let _ping = crate::ping::spawn(n.ping_port).await;
    tracing::info!(
        node_id = %joined.node_id,
        control_plane = %urls.join(","),
        region = %args.region,
        public_host = %n.public_host,
        ports = %format!("{}-{}", n.port_range.0, n.port_range.1),
        "Lodge agent is running"
    );
    crate::serve::shutdown_signal().await;
    if agent.nothing_runs() {
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
