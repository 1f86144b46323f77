//! Who forwards the node's public ports: the kernel (nftables DNAT into each process's network
//! namespace) for isolated processes when it can, Lodge's userspace proxy otherwise; and the
//! kernel's side of accounting (bytes, flows, active players) and of tidying after a restart.

#[allow(unused_imports)]
use super::*;

/// Where the interfaces whose forwarding Lodge turned on are recorded, so that `lodge cleanup`
/// can turn them off again.
const RECORD: &str = "forwarding.json";

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    table: String,
    /// Interfaces whose `forwarding` was 0 until Lodge set it (the bridge excepted).
    turned_on: Vec<String>,
}

/// Set up kernel forwarding for the node, or say why the userspace proxy forwards instead.
pub(crate) async fn start(
    cfg: &AgentConfig,
    network: Option<&sys::Network>,
) -> std::io::Result<Option<Arc<kernel::Forwarder>>> {
    let net = match (network, cfg.forwarding) {
        (_, Forwarding::Userspace) | (None, Forwarding::Auto) => None,
        (None, Forwarding::Kernel) => {
            return Err(std::io::Error::other(
                "--forwarding kernel needs netns isolation (root on Linux)",
            ))
        }
        (Some(net), _) => Some(net),
    };
    let Some(net) = net.filter(|_| !cfg.fake_processes) else {
        tracing::info!(
            mode = "userspace",
            "public ports are forwarded by Lodge's userspace proxy"
        );
        return Ok(None);
    };
    match setup(cfg, net).await {
        Ok(f) => {
            tracing::info!(
                mode = "kernel",
                table = f.table(),
                source_packet_rate = cfg.source_packet_rate,
                "public ports are forwarded by the kernel (nftables DNAT); players stay connected while Lodge restarts"
            );
            Ok(Some(Arc::new(f)))
        }
        Err(e) if cfg.forwarding == Forwarding::Auto => {
            tracing::warn!(
                mode = "userspace",
                error = %e,
                "kernel forwarding is not available (is nftables installed?); public ports are forwarded by Lodge's userspace proxy"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn setup(cfg: &AgentConfig, net: &sys::Network) -> std::io::Result<kernel::Forwarder> {
    let address = match cfg.proxy_ip {
        IpAddr::V4(a) if a.is_unspecified() => None,
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(_) => {
            return Err(std::io::Error::other(
                "kernel forwarding is IPv4 only; --proxy-bind is an IPv6 address",
            ))
        }
    };
    if !kernel::available().await {
        return Err(std::io::Error::other("nft cannot run here"));
    }
    let ingress = kernel::ingress_interfaces(address)?;
    let turned_on = kernel::enable_forwarding(&net.bridge, &ingress)?;
    let path = cfg.data_dir.join(RECORD);
    let mut record: Record = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    record.table = cfg.nft_table();
    for i in turned_on.into_iter().filter(|i| *i != net.bridge) {
        if !record.turned_on.contains(&i) {
            record.turned_on.push(i);
        }
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&record)?)?;
    // A host that routes already keeps routing; on one that does not, the interfaces players
    // arrive on forward nothing but players' packets to processes.
    let guarded = if kernel::host_is_router() {
        Vec::new()
    } else {
        ingress
    };
    kernel::Forwarder::ensure(
        kernel::Setup {
            table: cfg.nft_table(),
            bridge: net.bridge.clone(),
            address,
            source_packet_rate: cfg.source_packet_rate,
        },
        &guarded,
    )
    .await
}

/// `lodge cleanup`: remove the node's table and, when no other Lodge's table is left, turn off
/// the forwarding Lodge turned on.
pub(crate) async fn remove(data_dir: &Path, instance: &str) {
    let table = nft_table(instance);
    if kernel::delete_table(&table).await.is_err() {
        return;
    }
    let path = data_dir.join(RECORD);
    let Some(record) = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
    else {
        return;
    };
    if kernel::other_lodge_tables(&table).await == 0 {
        for iface in &record.turned_on {
            let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"), "0");
        }
    }
    let _ = std::fs::remove_file(path);
}

impl Agent {
    /// Forward these ports of a process by the kernel (one transaction), and remember them for
    /// accounting. Userspace routes are already forwarding.
    pub(crate) async fn install_ports(
        &self,
        process_id: &str,
        ports: &[PublicPort],
    ) -> std::io::Result<()> {
        let Some(f) = &self.forwarder else {
            return Ok(());
        };
        let entries: Vec<kernel::Entry> = ports
            .iter()
            .filter_map(|p| match p {
                PublicPort::Kernel { entry, .. } => Some(*entry),
                PublicPort::Userspace(_) => None,
            })
            .collect();
        f.install(&entries).await?;
        if let Some(r) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(process_id)
        {
            r.kernel_ports = entries;
        }
        Ok(())
    }

    /// Read the kernel's counters into every process's counters, now.
    pub(crate) async fn refresh_kernel_counts(&self) {
        let Some(f) = &self.forwarder else { return };
        let entries: Vec<kernel::Entry> = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|r| r.kernel_ports.iter().copied())
            .collect();
        let counts = match f.counts(&entries).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the kernel's counters");
                return;
            }
        };
        self.rate_limited
            .store(counts.rate_limited, Ordering::Relaxed);
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        for r in running.values().filter(|r| !r.kernel_ports.is_empty()) {
            let mut total = kernel::PortCounts::default();
            for e in &r.kernel_ports {
                if let Some(c) = counts.ports.get(&e.public_port) {
                    total.bytes_in += c.bytes_in;
                    total.bytes_out += c.bytes_out;
                    total.flows += c.flows;
                    total.active += c.active;
                }
            }
            let k = &r.counters.kernel;
            k.bytes_in.store(total.bytes_in, Ordering::Relaxed);
            k.bytes_out.store(total.bytes_out, Ordering::Relaxed);
            k.flows.store(total.flows, Ordering::Relaxed);
            k.active.store(total.active, Ordering::Relaxed);
        }
    }

    pub(crate) fn spawn_kernel_accounting(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(KERNEL_ACCOUNTING).await;
                let Some(agent) = weak.upgrade() else { return };
                agent.refresh_kernel_counts().await;
            }
        });
    }

    /// Remove what the table forwards for no process of this node (one that ended while Lodge
    /// was down, a crash between installing and recording).
    pub(crate) async fn sweep_forwarding(&self) {
        let Some(f) = &self.forwarder else { return };
        let installed = match f.installed().await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the forwarded ports");
                return;
            }
        };
        // Adoption runs in each process's own task: a live process's ports may not be reserved
        // yet, so its record on disk counts too.
        let mut live = BTreeSet::new();
        if let Ok(entries) = std::fs::read_dir(self.processes_dir()) {
            for e in entries.flatten() {
                let dir = e.path();
                let Some(mut state) = std::fs::read(dir.join("state.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<LocalState>(&b).ok())
                else {
                    continue;
                };
                recover_pids(&dir, &mut state);
                if sys::alive(state.shim_pid, state.shim_start) {
                    live.extend(state.targets.iter().map(|t| t.public_port));
                }
            }
        }
        let stale: Vec<kernel::Entry> = {
            let r = self.reserved.lock().unwrap_or_else(|p| p.into_inner());
            installed
                .into_iter()
                .filter(|e| !r.ports.contains(&e.public_port) && !live.contains(&e.public_port))
                .collect()
        };
        if stale.is_empty() {
            return;
        }
        tracing::info!(
            ports = ?stale.iter().map(|e| e.public_port).collect::<Vec<_>>(),
            "removing forwarded ports of processes that no longer run here"
        );
        if let Err(e) = f.remove(&stale).await {
            tracing::warn!(error = %e, "cannot remove stale forwarded ports");
        }
    }

    /// How this node forwards its public ports, and what the per-source limit dropped.
    pub fn forwarding_mode(&self) -> kernel::Mode {
        if self.forwarder.is_some() {
            kernel::Mode::Kernel
        } else {
            kernel::Mode::Userspace
        }
    }
}
