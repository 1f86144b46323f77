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
    /// The control plane's API URL, `http://HOST:PORT`.
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

pub async fn run(args: AgentArgs) -> Result<(), String> {
    crate::serve::init_tracing();
    let url = args.control_plane.trim_end_matches('/').to_string();
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
        Some(s) if s.control_plane == url => s.joined,
        _ => {
            let token = args.join_token.as_deref().ok_or_else(|| {
                format!(
                    "this node has not joined {url} yet: pass --join-token (from `lodge nodes join-token --region {}`)",
                    args.region
                )
            })?;
            let joined = dial::join(&url, token, &info, args.fleet.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            save(
                &cred_path,
                &Saved {
                    control_plane: url.clone(),
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
        lodge_link::artifacts::Fetcher::new(&url, &joined.credential, &data_dir)
            .with_cache_limit((args.build_cache_gb.max(0.0) * (1u64 << 30) as f64) as u64),
    );
    let cfg = n.agent_config(&joined.node_id, &data_dir, api_addr, Some(fetcher))?;
    let (cp, cred) = (url.clone(), joined.credential.clone());
    let dial = move || {
        let (cp, cred) = (cp.clone(), cred.clone());
        async move { dial::connect(&cp, &cred).await }
    };
    let (agent, _client) = crate::node::start_agent(cfg, Some(info), dial).await?;
    let _ping = crate::ping::spawn(n.ping_port).await;
    tracing::info!(
        node_id = %joined.node_id,
        control_plane = %url,
        region = %args.region,
        public_host = %n.public_host,
        ports = %format!("{}-{}", n.port_range.0, n.port_range.1),
        "Lodge agent is running"
    );
    crate::serve::shutdown_signal().await;
    if agent.running_count() == 0 {
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
