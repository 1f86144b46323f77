//! Thin wrappers over Linux facilities: /proc, signals, pidfd, network namespaces, cgroups.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat): with the
/// pid it identifies a process across pid reuse.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process is alive and not a zombie.
pub fn alive(pid: u32, expected_start: Option<u64>) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(close) = stat.rfind(')') else {
        return false;
    };
    let state = stat[close + 2..].chars().next();
    if matches!(state, Some('Z') | Some('X')) {
        return false;
    }
    expected_start.is_none_or(|s| start_time(pid) == Some(s))
}

/// Live `lodge shim DIR` processes whose DIR lies under `under`, with their DIR and the pids
/// of their children (the game servers). Found from `/proc`, so they are found even when no
/// record of them was written.
pub fn shims_under(under: &Path) -> Vec<(u32, PathBuf, Vec<u32>)> {
    let mut shims = Vec::new();
    let mut parents: Vec<(u32, u32)> = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return shims;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(ppid) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|st| {
                st[st.rfind(')')? + 2..]
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()
            })
        {
            parents.push((pid, ppid));
        }
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.len() >= 3 && args[1] == b"shim" {
            let dir = PathBuf::from(std::ffi::OsStr::from_bytes(args[2]));
            if dir.starts_with(under) && alive(pid, None) {
                shims.push((pid, dir, Vec::new()));
            }
        }
    }
    for (pid, _, children) in &mut shims {
        children.extend(parents.iter().filter(|(_, pp)| pp == pid).map(|(c, _)| *c));
    }
    shims
}

/// How many ports of `range` on `ip` this host can bind for both TCP and UDP right now: the
/// node's real capacity, less what other programs hold.
pub fn bindable_ports(ip: std::net::IpAddr, range: (u16, u16)) -> u32 {
    (range.0..=range.1)
        .filter(|p| {
            let addr = std::net::SocketAddr::new(ip, *p);
            std::net::TcpListener::bind(addr).is_ok() && std::net::UdpSocket::bind(addr).is_ok()
        })
        .count() as u32
}

pub fn signal_group(pgid: u32, sig: i32) {
    if pgid > 1 {
        // SAFETY: kill with a negative pid signals a process group; no memory is touched.
        unsafe {
            libc::kill(-(pgid as i32), sig);
        }
    }
}

pub fn signal(pid: u32, sig: i32) {
    if pid > 1 {
        // SAFETY: as above.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// Whether process `pid` (or one of its descendants) holds a socket bound to `port` (TCP:
/// listening). The socket tables come from /proc/PID/net, which shows the namespace of that
/// process, so this works for isolated and shared-network processes alike; ownership is then
/// checked through the processes' file descriptors, so another program's socket on the same
/// port (in a shared network) never counts.
pub fn port_bound(pid: u32, port: u16, proto: Proto) -> bool {
    // Fast path: the process itself, in its own network namespace.
    let own = sockets_in_netns_of(pid, port, proto);
    if !own.is_empty() && holds_socket(pid, &own) {
        return true;
    }
    // Its descendants, possibly in other namespaces (a container runtime's container).
    let tree = descendants(pid);
    if tree.is_empty() {
        return false;
    }
    let mut seen = std::collections::HashSet::new();
    seen.insert(fs::read_link(format!("/proc/{pid}/ns/net")).ok());
    if !own.is_empty() && tree.iter().any(|p| holds_socket(*p, &own)) {
        return true;
    }
    tree.iter().any(|&p| {
        if !seen.insert(fs::read_link(format!("/proc/{p}/ns/net")).ok()) {
            return false;
        }
        let inodes = sockets_in_netns_of(p, port, proto);
        !inodes.is_empty()
            && (holds_socket(pid, &inodes) || tree.iter().any(|q| holds_socket(*q, &inodes)))
    })
}

fn sockets_in_netns_of(pid: u32, port: u16, proto: Proto) -> Vec<u64> {
    let files: &[&str] = match proto {
        Proto::Tcp => &["tcp", "tcp6"],
        Proto::Udp => &["udp", "udp6"],
    };
    files
        .iter()
        .filter_map(|f| fs::read_to_string(format!("/proc/{pid}/net/{f}")).ok())
        .flat_map(|text| sockets_on_port(&text, port, proto))
        .collect()
}

/// Inodes of the sockets of a /proc/net table bound to `port` (TCP: listening).
fn sockets_on_port(text: &str, port: u16, proto: Proto) -> Vec<u64> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let p = cols
                .get(1)?
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            let listening = proto == Proto::Udp || cols.get(3) == Some(&"0A");
            (p == Some(port) && listening).then(|| cols.get(9)?.parse().ok())?
        })
        .collect()
}

fn holds_socket(pid: u32, inodes: &[u64]) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .ok()
            .and_then(|l| {
                l.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            })
            .is_some_and(|i| inodes.contains(&i))
    })
}

/// Every live descendant of `root`.
pub fn descendants(root: u32) -> Vec<u32> {
    let parents = proc_parents();
    parents
        .keys()
        .copied()
        .filter(|&pid| {
            let mut p = pid;
            for _ in 0..64 {
                match parents.get(&p) {
                    Some(&pp) if pp == root => return true,
                    Some(&pp) if pp != 0 && pp != p => p = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

/// pid → parent pid of every process.
fn proc_parents() -> std::collections::HashMap<u32, u32> {
    let mut out = std::collections::HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(ppid) = fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let close = stat.rfind(')')?;
                stat[close + 2..].split_whitespace().nth(1)?.parse().ok()
            })
        {
            out.insert(pid, ppid);
        }
    }
    out
}

/// Wait until process `pid` (not necessarily our child) has exited.
pub async fn wait_exit(pid: u32) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return; // already gone
    }
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: the fd was just returned by pidfd_open and is owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the AsyncFd owns the pidfd, which stays open (and is not reused) while it lives.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE)
    };
    match registered {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => {
            while alive(pid, None) {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn run(cmd: &str, args: &[&str]) -> io::Result<()> {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

async fn run_batch(ns: Option<&str>, script: &str) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut args: Vec<&str> = Vec::new();
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    let mut child = tokio::process::Command::new("ip")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| io::Error::other("no stdin"))?;
    stdin.write_all(script.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip -batch: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether moving a process into a cgroup waits for an RCU grace period (about 7–15 ms on
/// these VMs, most of an isolated process's start): true unless the cgroup2 hierarchy is
/// mounted with `favordynmods`, which the operator may choose (it makes fork and exit a little
/// dearer machine-wide; Lodge never changes it).
pub fn cgroup_attach_waits() -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return false;
    };
    let cgroup2: Vec<&str> = mounts
        .lines()
        .filter(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .collect();
    !cgroup2.is_empty()
        && !cgroup2.iter().any(|l| {
            l.split_whitespace()
                .nth(3)
                .is_some_and(|o| o.split(',').any(|o| o == "favordynmods"))
        })
}

/// Whether the named network namespace exists.
pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Names of the machine's named network namespaces (`ip netns list`).
pub async fn netns_names() -> Vec<String> {
    let Ok(out) = tokio::process::Command::new("ip")
        .args(["netns", "list"])
        .stderr(Stdio::null())
        .output()
        .await
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// A Linux bridge with a private IPv4 subnet; each isolated process gets a network namespace
/// with a veth into it and one address.
#[derive(Debug, Clone)]
pub struct Network {
    pub bridge: String,
    pub gateway: Ipv4Addr,
    pub prefix: u8,
}

impl Network {
    /// Bring up (or reuse) the bridge named `bridge`. A new bridge gets the first free /22 in
    /// 10.64.0.0/10 starting at an offset derived from `seed`, avoiding subnets in use.
    pub async fn ensure(bridge: &str, seed: u64) -> io::Result<Network> {
        if let Some(gw) = bridge_address(bridge).await? {
            run("ip", &["link", "set", bridge, "up"]).await?;
            pin_mac(bridge).await?;
            return Ok(Network {
                bridge: bridge.into(),
                gateway: gw,
                prefix: 22,
            });
        }
        let used = used_ipv4().await?;
        let blocks = 1u32 << 12; // /22 blocks in a /10
        for i in 0..blocks {
            let block = (seed as u32).wrapping_add(i) % blocks;
            let base = u32::from(Ipv4Addr::new(10, 64, 0, 0)) + (block << 10);
            if used.iter().any(|ip| (u32::from(*ip) & !0x3ff) == base) {
                continue;
            }
            let gateway = Ipv4Addr::from(base + 1);
            let _ = run("ip", &["link", "del", bridge]).await;
            run("ip", &["link", "add", bridge, "type", "bridge"]).await?;
            run(
                "ip",
                &["addr", "add", &format!("{gateway}/22"), "dev", bridge],
            )
            .await?;
            run("ip", &["link", "set", bridge, "up"]).await?;
            pin_mac(bridge).await?;
            return Ok(Network {
                bridge: bridge.into(),
                gateway,
                prefix: 22,
            });
        }
        Err(io::Error::other("no free /22 subnet in 10.64.0.0/10"))
    }

    /// Address of host slot `index` (1..=1021; the gateway is 0).
    pub fn address(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) + index)
    }

    pub const MAX_INDEX: u32 = 1021;

    /// Create namespace `ns` with `eth0` at `ip`, its peer `veth` on the bridge.
    /// `ns` and `veth` are new names (an existing namespace is never taken over or deleted).
    pub async fn create_namespace(&self, ns: &str, veth: &str, ip: Ipv4Addr) -> io::Result<()> {
        run("ip", &["netns", "add", ns]).await?;
        // The address may have belonged to an ended process: forget its old MAC, or packets
        // to the new namespace go to a dead veth until the neighbour entry times out.
        let host = format!(
            "link add {veth} type veth peer name eth0 netns {ns}\nlink set {veth} master {bridge} up\nneigh flush to {ip} dev {bridge}\n",
            bridge = self.bridge
        );
        let inside = format!(
            "addr add {ip}/{} dev eth0\nlink set lo up\nlink set eth0 up\nroute add default via {}\n",
            self.prefix, self.gateway
        );
        let r = async {
            run_batch(None, &host).await?;
            run_batch(Some(ns), &inside).await
        }
        .await;
        if r.is_err() {
            let _ = self.delete_namespace(ns, veth).await;
        }
        r
    }

    pub async fn delete_namespace(&self, ns: &str, veth: &str) -> io::Result<()> {
        let _ = run("ip", &["link", "del", veth]).await;
        run("ip", &["netns", "del", ns]).await
    }

    pub async fn remove_bridge(&self) -> io::Result<()> {
        run("ip", &["link", "del", &self.bridge]).await
    }
}

/// Give the bridge its current MAC address for good. A bridge left to itself takes the lowest
/// MAC of its ports, so a namespace joining or leaving could change the gateway's MAC under
/// every other process (their neighbour entries go stale and their replies to players are
/// dropped until they notice, seconds later).
async fn pin_mac(bridge: &str) -> io::Result<()> {
    // Read through `ip`, not /sys: under `nsenter --net` /sys still shows the host's devices.
    let out = tokio::process::Command::new("ip")
        .args(["-j", "link", "show", "dev", bridge])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(io::Error::other)?;
    let mac = links[0]["address"]
        .as_str()
        .ok_or_else(|| io::Error::other(format!("no MAC address for {bridge}")))?
        .to_string();
    // Setting the address it has is harmless, and from then on the bridge keeps it.
    run("ip", &["link", "set", "dev", bridge, "address", &mac]).await
}

async fn bridge_address(bridge: &str) -> io::Result<Option<Ipv4Addr>> {
    let out = tokio::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "dev", bridge])
        .output()
        .await?;
    if !out.status.success() {
        return Ok(None);
    }
    Ok(parse_inet(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .next())
}

async fn used_ipv4() -> io::Result<Vec<Ipv4Addr>> {
    let out = tokio::process::Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .await?;
    let mut v = parse_inet(&String::from_utf8_lossy(&out.stdout));
    let routes = tokio::process::Command::new("ip")
        .args(["-4", "route"])
        .output()
        .await?;
    for line in String::from_utf8_lossy(&routes.stdout).lines() {
        if let Some(ip) = line.split(['/', ' ']).next().and_then(|s| s.parse().ok()) {
            v.push(ip);
        }
    }
    Ok(v)
}

fn parse_inet(text: &str) -> Vec<Ipv4Addr> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            it.position(|w| w == "inet")?;
            it.next()?.split('/').next()?.parse().ok()
        })
        .collect()
}

/// Per-process cgroups with CPU and memory limits: v1 hierarchies (memory, cpu, pids) or the
/// v2 unified tree, whichever has the controllers.
#[derive(Debug, Clone)]
pub struct Cgroups {
    pub dirs: Vec<PathBuf>,
}

const V1_ROOT: &str = "/sys/fs/cgroup";

impl Cgroups {
    /// Create `<group>/<id>` and apply limits. Returns an empty set where no controller can be
    /// used (not root, or neither v1 nor v2 controllers present).
    pub fn create(group: &str, id: &str, cpu: f64, memory_mb: f64) -> io::Result<Cgroups> {
        let root = Path::new(V1_ROOT);
        let mem_bytes = (memory_mb.max(1.0) * 1024.0 * 1024.0) as u64;
        let quota = ((cpu.max(0.01)) * 100_000.0) as u64;
        let mut dirs = Vec::new();
        if root.join("memory/memory.limit_in_bytes").exists() {
            let mem = root.join("memory").join(group).join(id);
            fs::create_dir_all(&mem)?;
            fs::write(mem.join("memory.limit_in_bytes"), mem_bytes.to_string())?;
            dirs.push(mem);
            let cpu_dir = root.join("cpu").join(group).join(id);
            if root.join("cpu/cpu.cfs_quota_us").exists() {
                fs::create_dir_all(&cpu_dir)?;
                fs::write(cpu_dir.join("cpu.cfs_period_us"), "100000")?;
                fs::write(cpu_dir.join("cpu.cfs_quota_us"), quota.to_string())?;
                dirs.push(cpu_dir);
            }
            let pids = root.join("pids").join(group).join(id);
            if root.join("pids").is_dir() {
                fs::create_dir_all(&pids)?;
                dirs.push(pids);
            }
        } else if fs::read_to_string(root.join("cgroup.controllers"))
            .map(|c| c.contains("memory") && c.contains("cpu"))
            .unwrap_or(false)
        {
            let parent = root.join(group);
            fs::create_dir_all(&parent)?;
            let _ = fs::write(root.join("cgroup.subtree_control"), "+memory +cpu +pids");
            let _ = fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu +pids");
            let dir = parent.join(id);
            fs::create_dir_all(&dir)?;
            fs::write(dir.join("memory.max"), mem_bytes.to_string())?;
            fs::write(dir.join("cpu.max"), format!("{quota} 100000"))?;
            dirs.push(dir);
        }
        Ok(Cgroups { dirs })
    }

    /// Remove the (empty) per-installation parent groups.
    pub fn remove_group(group: &str) {
        let mut roots: Vec<PathBuf> = fs::read_dir(V1_ROOT)
            .map(|d| d.flatten().map(|h| h.path()).collect())
            .unwrap_or_default();
        roots.push(PathBuf::from(V1_ROOT));
        for c in roots {
            let _ = fs::remove_dir(c.join(group));
        }
    }

    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// SIGKILL everything still in the cgroups, then remove them.
    /// Out-of-memory kills the kernel counted in the memory cgroup (v1 `memory.oom_control`,
    /// v2 `memory.events`).
    pub fn oom_kills(&self) -> u64 {
        self.dirs
            .iter()
            .filter_map(|d| {
                fs::read_to_string(d.join("memory.oom_control"))
                    .or_else(|_| fs::read_to_string(d.join("memory.events")))
                    .ok()
            })
            .filter_map(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse::<u64>().ok())
            })
            .sum()
    }

    /// Whether memory use ever reached the limit (v1 `memory.failcnt`, v2 `memory.events`
    /// `max`): with an unexplained SIGKILL, the mark of an out-of-memory kill in a child
    /// cgroup (cgroup v1 counts the kill itself only in the victim's own group).
    pub fn memory_limit_hit(&self) -> bool {
        self.dirs.iter().any(|d| {
            fs::read_to_string(d.join("memory.failcnt"))
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0)
                || fs::read_to_string(d.join("memory.events")).is_ok_and(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("max ")?.trim().parse::<u64>().ok())
                        .is_some_and(|n| n > 0)
                })
        })
    }

    /// Remove `<hierarchy>/<group>/<id>` (and a nested `ctr`) in every cgroup v1 hierarchy and
    /// on cgroup2: what an OCI runtime made below the agent's own groups.
    pub fn remove_everywhere(group: &str, id: &str) {
        let Ok(hierarchies) = fs::read_dir(V1_ROOT) else {
            return;
        };
        let mut roots: Vec<PathBuf> = hierarchies.flatten().map(|h| h.path()).collect();
        roots.push(PathBuf::from(V1_ROOT));
        for h in roots {
            let dir = h.join(group).join(id);
            let _ = fs::remove_dir(dir.join("ctr"));
            let _ = fs::remove_dir(&dir);
        }
    }

    pub fn destroy(&self) {
        for d in &self.dirs {
            if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|l| l.parse().ok()) {
                    signal(pid, libc::SIGKILL);
                }
            }
        }
        for d in &self.dirs {
            for _ in 0..50 {
                if fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:1E61 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1\n   1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 77 1\n";
        assert_eq!(sockets_on_port(tcp, 7777, Proto::Tcp), vec![4242]);
        assert!(
            sockets_on_port(tcp, 8080, Proto::Tcp).is_empty(),
            "established, not listening"
        );
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n  10: 00000000:1E61 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 99 2\n";
        assert_eq!(sockets_on_port(udp, 7777, Proto::Udp), vec![99]);
        assert!(sockets_on_port(udp, 7778, Proto::Udp).is_empty());
    }

    #[test]
    fn a_port_counts_only_when_the_process_tree_owns_its_socket() {
        let me = std::process::id();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (u, t) = (
            udp.local_addr().unwrap().port(),
            tcp.local_addr().unwrap().port(),
        );
        assert!(port_bound(me, u, Proto::Udp));
        assert!(port_bound(me, t, Proto::Tcp));
        // A socket of this process is not bound by pid 1's tree... unless pid 1 is our
        // ancestor, which it is: so check a sibling instead, a child that binds nothing.
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(!port_bound(child.id(), u, Proto::Udp));
        assert!(!port_bound(child.id(), t, Proto::Tcp));
        let mut child = child;
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn own_process_is_alive_and_has_a_start_time() {
        let me = std::process::id();
        let st = start_time(me);
        assert!(st.is_some());
        assert!(alive(me, st));
        assert!(!alive(me, st.map(|s| s + 1)));
    }

    #[test]
    fn parses_ip_addr_output() {
        let out = "2: eth0    inet 10.0.2.15/24 brd 10.0.2.255 scope global eth0\n";
        assert_eq!(parse_inet(out), vec![Ipv4Addr::new(10, 0, 2, 15)]);
    }
}

/// CPU time (nanoseconds, user + system) and resident memory (bytes) of a process and all of
/// its descendants, read from /proc.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeUsage {
    pub cpu_ns: u64,
    pub rss_bytes: u64,
}

pub fn tree_usage(root: u32) -> TreeUsage {
    // SAFETY: sysconf has no preconditions.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    // SAFETY: as above.
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let mut parent = std::collections::HashMap::new();
    let mut usage = std::collections::HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return TreeUsage::default();
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        // Fields after the command: state(3) ppid(4) ... utime(14) stime(15) ... rss(24).
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        parent.insert(pid, num(1) as u32);
        usage.insert(
            pid,
            ((num(11) + num(12)) * 1_000_000_000 / ticks, num(21) * page),
        );
    }
    let mut total = TreeUsage::default();
    for (&pid, &(cpu, rss)) in &usage {
        let mut p = pid;
        for _ in 0..64 {
            if p == root {
                total.cpu_ns += cpu;
                total.rss_bytes += rss;
                break;
            }
            match parent.get(&p) {
                Some(&pp) if pp != 0 && pp != p => p = pp,
                _ => break,
            }
        }
    }
    total
}
