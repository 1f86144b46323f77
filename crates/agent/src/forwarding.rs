//! Who forwards the node's public ports: the kernel (nftables DNAT into each process's network
//! namespace) for isolated processes when it can, Lodge's userspace proxy otherwise; and the
//! kernel's side of accounting (bytes, flows, active players) and of tidying after a restart.

#[allow(unused_imports)]
use super::*;

/// Interfaces whose IPv4 forwarding a Lodge turned on, for every Lodge of this network
/// namespace (they share the interfaces): the last one to go turns them off again.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    turned_on: Vec<String>,
}

/// `/run/lodge/forwarding-<network namespace inode>.json`.
fn record_path() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino());
    PathBuf::from(format!("/run/lodge/forwarding-{ns}.json"))
}

fn load_record() -> Record {
    std::fs::read(record_path())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_record(record: &Record) -> std::io::Result<()> {
    let path = record_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(record)?)?;
    std::fs::rename(tmp, path)
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
        userspace(cfg).await;
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
            remove(&cfg.instance).await;
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

/// The userspace proxy forwards: a table an earlier run left would still DNAT the ports the
/// proxy now listens on, so it goes.
async fn userspace(cfg: &AgentConfig) {
    if !cfg.fake_processes && sys::is_root() {
        remove(&cfg.instance).await;
    }
    tracing::info!(
        mode = "userspace",
        "public ports are forwarded by Lodge's userspace proxy"
    );
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
    let mut record = load_record();
    // A host that routes already keeps routing. Otherwise the interfaces whose forwarding a
    // Lodge turns on forward nothing but players' packets to processes; an interface someone
    // else turned on is left as it was.
    let guarded: Vec<String> = if kernel::host_is_router() {
        Vec::new()
    } else {
        ingress
            .iter()
            .filter(|i| record.turned_on.contains(i) || !kernel::forwarding_on(i))
            .cloned()
            .collect()
    };
    // The guard is in place before forwarding is turned on.
    let forwarder = kernel::Forwarder::ensure(
        kernel::Setup {
            table: cfg.nft_table(),
            bridge: net.bridge.clone(),
            address,
            source_packet_rate: cfg.source_packet_rate,
        },
        &guarded,
    )
    .await?;
    for iface in ingress.iter().chain([&net.bridge]) {
        if kernel::turn_forwarding_on(iface)? && *iface != net.bridge {
            // Recorded at once: an error on the next interface leaves this one undoable.
            record.turned_on.push(iface.clone());
            save_record(&record)?;
        }
    }
    kernel::allow_loopback_clients(&net.bridge)?;
    Ok(forwarder)
}

/// Remove the node's table (`lodge cleanup`, teardown, a start without kernel forwarding) and,
/// when no other Lodge's table is left here, turn off the forwarding Lodges turned on, unless
/// the host has become a router meanwhile.
pub(crate) async fn remove(instance: &str) {
    let table = nft_table(instance);
    if kernel::delete_table(&table).await.is_err() {
        return;
    }
    if kernel::other_lodge_tables(&table).await > 0 {
        return;
    }
    let record = load_record();
    if !kernel::host_is_router() {
        for iface in &record.turned_on {
            let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"), "0");
        }
    }
    let _ = std::fs::remove_file(record_path());
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
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Someone flushed the ruleset (a firewall reload): put the table back, and
                // every running process's ports in it.
                tracing::warn!(
                    table = f.table(),
                    "the nftables table is gone; setting it up again"
                );
                if let Err(e) = f.rebuild().await.and(f.install(&entries).await) {
                    tracing::warn!(error = %e, "cannot set the nftables table up again");
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the kernel's counters");
                return;
            }
        };
        self.rate_limited
            .store(counts.rate_limited, Ordering::Relaxed);
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        for r in running.values().filter(|r| !r.kernel_ports.is_empty()) {
            // A process whose ports are being released keeps its last counts.
            if !r
                .kernel_ports
                .iter()
                .all(|e| counts.ports.contains_key(&e.public_port))
            {
                continue;
            }
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
        let live: BTreeSet<u16> = live_records(&self.processes_dir())
            .iter()
            .flat_map(|st| st.targets.iter().map(|t| t.public_port))
            .collect();
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

    /// The kernel's entry for a target of a process, when the kernel forwards it.
    pub(crate) fn kernel_entry(&self, t: &Target) -> Option<kernel::Entry> {
        let (Some(_), SocketAddr::V4(target), false) = (&self.forwarder, t.target, t.tls) else {
            return None;
        };
        Some(kernel::Entry {
            public_port: t.public_port,
            protocol: if t.udp { Protocol::Udp } else { Protocol::Tcp },
            target,
        })
    }

    /// A kernel-forwarded public port, with its placeholder socket when it could be bound.
    pub(crate) fn kernel_port(
        &self,
        t: &Target,
        hold: Option<kernel::Placeholder>,
    ) -> Option<PublicPort> {
        Some(PublicPort::Kernel {
            entry: self.kernel_entry(t)?,
            forwarder: self.forwarder.clone()?,
            hold,
        })
    }

    /// Stop forwarding the ports of a process that ended unsupervised (while Lodge was down,
    /// or an orphan Lodge ended).
    pub(crate) async fn forget_forwarding(&self, state: &LocalState) {
        let Some(f) = &self.forwarder else { return };
        let entries: Vec<kernel::Entry> = state
            .targets
            .iter()
            .filter_map(|t| self.kernel_entry(t))
            .collect();
        if entries.is_empty() {
            return;
        }
        if let Err(e) = f.remove(&entries).await {
            tracing::warn!(error = %e, "cannot remove the forwarded ports of an ended process");
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
