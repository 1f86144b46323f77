//! What `lodge serve` (its embedded node) and `lodge agent` share: the node's flags and how
//! they become an agent that speaks the node protocol.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use lodge_agent::client::NodeClient;
use lodge_agent::{Agent, AgentConfig, Forwarding, Isolation};
use lodge_link::dial::DialError;
use tokio::io::{AsyncRead, AsyncWrite};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IsolationArg {
    /// `netns` when running as root on Linux, else `none`.
    Auto,
    /// Own network namespace and cgroup per process (root).
    Netns,
    /// Shared host network; processes bind `$PORT`.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ForwardingArg {
    /// The kernel (nftables) for isolated processes when it can, else the userspace proxy.
    Auto,
    /// The kernel, or the node does not start (needs root, netns isolation and nftables).
    Kernel,
    /// Lodge's userspace proxy.
    Userspace,
}

/// The node's flags.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// Host name or address players connect to (the `host` of every exposed port).
    #[arg(long, env = "LODGE_PUBLIC_HOST", default_value = "127.0.0.1")]
    pub public_host: String,
    /// Range of public proxy ports, `LOW-HIGH`.
    #[arg(long, env = "LODGE_PORT_RANGE", default_value = "30000-31999", value_parser = parse_range)]
    pub port_range: (u16, u16),
    /// UDP port of the ping (latency) echo service.
    #[arg(long, env = "LODGE_PING_PORT", default_value_t = 10000)]
    pub ping_port: u16,
    /// Process isolation.
    #[arg(long, env = "LODGE_ISOLATION", value_enum, default_value_t = IsolationArg::Auto)]
    pub isolation: IsolationArg,
    /// Who forwards public ports to isolated processes: the kernel keeps players connected
    /// while Lodge restarts and adds no latency; the userspace proxy needs no nftables.
    #[arg(long, env = "LODGE_FORWARDING", value_enum, default_value_t = ForwardingArg::Auto)]
    pub forwarding: ForwardingArg,
    /// Packets per second one source address may send to the node's public ports, over all of
    /// them; the excess is dropped by the kernel (kernel forwarding; 0: no limit).
    #[arg(long, env = "LODGE_SOURCE_PACKET_RATE", default_value_t = 5000)]
    pub source_packet_rate: u32,
    /// PEM certificate chain that `tls` ports present to players (with --tls-key); without
    /// both, a self-signed certificate for --public-host is made at first start and kept in
    /// `<data-dir>/tls/`.
    #[arg(long, env = "LODGE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "LODGE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Seconds a new process has to bind its default port.
    #[arg(long, env = "LODGE_BIND_TIMEOUT", default_value_t = 100.0)]
    pub bind_timeout: f64,
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
    /// Players' flows (UDP sessions plus TCP connections) one source address may hold on this
    /// node at once, over all public ports. The node's total is sized to the descriptor limit,
    /// less a reserve for the API.
    #[arg(long, env = "LODGE_FLOWS_PER_SOURCE", default_value_t = 64)]
    pub flows_per_source: usize,
    /// Benchmarks only: pretend to run game servers (nothing is started; rooms go active at
    /// once), to measure the control plane with very many processes.
    #[arg(long, hide = true)]
    pub fake_processes: bool,
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

pub(crate) fn parse_range(s: &str) -> Result<(u16, u16), String> {
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

pub(crate) fn secs(s: f64, name: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| format!("--{name} must be a non-negative number of seconds"))
}

/// A short stable key for this data dir: names of the bridge and cgroups derive from it.
pub(crate) fn instance_key(dir: &Path) -> String {
    let s = dir.to_string_lossy();
    let h = s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("{:06x}", h & 0xff_ffff)
}

impl NodeArgs {
    pub fn isolation(&self) -> Isolation {
        match self.isolation {
            IsolationArg::Netns => Isolation::Netns,
            IsolationArg::None => Isolation::None,
            IsolationArg::Auto
                if lodge_agent::sys::is_root() && Path::new("/proc/self/ns/net").exists() =>
            {
                Isolation::Netns
            }
            IsolationArg::Auto => Isolation::None,
        }
    }

    /// Public ports this node can offer: the range less ports other programs hold.
    pub fn port_capacity(&self) -> Option<u32> {
        (!self.fake_processes).then(|| {
            let free = lodge_agent::sys::bindable_ports(self.proxy_bind, self.port_range);
            let span = u32::from(self.port_range.1 - self.port_range.0) + 1;
            if free < span {
                tracing::warn!(
                    free,
                    span,
                    "some ports of --port-range are held by other programs; they are not offered"
                );
            }
            free
        })
    }

    /// What `tls` ports present: the operator's certificate, or one made for --public-host.
    fn tls_identity(&self, data_dir: &Path) -> Result<Option<lodge_proxy::tls::Identity>, String> {
        if self.fake_processes {
            return Ok(None);
        }
        let id = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => lodge_proxy::tls::Identity::from_files(cert, key),
            _ => lodge_proxy::tls::Identity::self_signed(&data_dir.join("tls"), &self.public_host),
        }
        .map_err(|e| e.to_string())?;
        tracing::info!(
            certificate = %id.source,
            sha256 = %id.fingerprint,
            "tls ports terminate TLS with this certificate"
        );
        Ok(Some(id))
    }

    /// The agent's configuration for a node `node_id` keeping its state in `data_dir`.
    pub fn agent_config(
        &self,
        node_id: &str,
        data_dir: &Path,
        api_addr: SocketAddr,
        fetcher: Option<Arc<lodge_link::artifacts::Fetcher>>,
    ) -> Result<AgentConfig, String> {
        let isolation = self.isolation();
        let oci_runtime = if isolation == Isolation::Netns {
            lodge_agent::oci::detect(&self.oci_runtime)?
        } else {
            None
        };
        Ok(AgentConfig {
            node_id: node_id.to_string(),
            data_dir: data_dir.to_path_buf(),
            public_host: self.public_host.clone(),
            proxy_ip: self.proxy_bind,
            port_range: self.port_range,
            isolation,
            forwarding: match self.forwarding {
                ForwardingArg::Auto => Forwarding::Auto,
                ForwardingArg::Kernel => Forwarding::Kernel,
                ForwardingArg::Userspace => Forwarding::Userspace,
            },
            source_packet_rate: self.source_packet_rate,
            bind_timeout: secs(self.bind_timeout, "bind-timeout")?,
            stop_grace: secs(self.stop_grace, "stop-grace")?,
            api_addr,
            exe: std::env::current_exe().map_err(|e| e.to_string())?,
            instance: instance_key(data_dir),
            metrics_interval: secs(self.metrics_interval, "metrics-interval")?,
            oci_runtime,
            fake_processes: self.fake_processes,
            game_users: lodge_agent::sys::is_root() && !self.fake_processes,
            tls: self.tls_identity(data_dir)?,
            flows: Arc::new(lodge_proxy::FlowLimits::for_descriptors(
                raise_nofile(),
                FD_RESERVE,
                self.flows_per_source,
            )),
            fetcher,
        })
    }
}

/// Start an agent whose link to the control plane is a [`NodeClient`] over what `dial` opens.
pub async fn start_agent<D, F, S>(
    cfg: AgentConfig,
    info: Option<lodge_model::protocol::NodeInfo>,
    dial: D,
) -> Result<(Arc<Agent>, Arc<NodeClient>), String>
where
    D: Fn() -> F + Send + 'static,
    F: Future<Output = Result<S, DialError>> + Send + 'static,
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let isolation = cfg.isolation;
    let client = NodeClient::new(&cfg.node_id, info);
    let agent = Agent::start(cfg, client.clone())
        .await
        .map_err(|e| format!("cannot start the node agent ({isolation:?} isolation): {e}"))?;
    client.attach(&agent);
    tokio::spawn(client.clone().run(dial));
    Ok((agent, client))
}

/// The data dir, created and made absolute.
pub fn prepare_data_dir(dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    std::fs::canonicalize(dir).map_err(|e| e.to_string())
}
