//! Kernel forwarding: each public port of an isolated process is DNATed by nftables into the
//! process's network namespace, so players' packets never cross Lodge's process and keep
//! flowing while Lodge (or its agent) is stopped, killed or replaced.
//!
//! One table per node (`ip lodge_<instance>`), a fixed set of rules, and maps updated as
//! processes start and end:
//! - `ports`: `proto . public port` to `address . port` inside the namespace (the DNAT);
//! - `public`: the same keys, for the per-source rate limit and the inbound counters;
//! - `bytes_in` / `bytes_out` / `flows`: named counters per public port, so accounting comes
//!   from the kernel and survives Lodge's restarts.
//!
//! The rules are rewritten in one transaction at every start; the maps, sets and counters are
//! kept, so nothing a live process uses is ever missing for a moment. Established flows do not
//! depend on the rules at all: their translation lives in the connection-tracking entry.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::conntrack;
use crate::Protocol;

/// Every `nft` or `conntrack` run is given this long.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// How a node's public ports reach its processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// nftables DNAT into each process's network namespace.
    Kernel,
    /// Lodge's own sockets copy every datagram and byte (no root, or no netns isolation).
    Userspace,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Kernel => "kernel",
            Mode::Userspace => "userspace",
        }
    }
}

/// What the node's table is made for.
#[derive(Debug, Clone)]
pub struct Setup {
    /// `lodge_<instance>`.
    pub table: String,
    /// The Lodge bridge the namespaces hang on.
    pub bridge: String,
    /// Only packets to this address are forwarded; `None`: to any address of this machine.
    pub address: Option<Ipv4Addr>,
    /// Packets per second one source address may send to the public ports (0: no limit).
    pub source_packet_rate: u32,
}

/// The node's nftables table.
#[derive(Debug)]
pub struct Forwarder {
    setup: Setup,
    /// Interfaces whose forwarded packets are only players' (see [`Forwarder::ensure`]).
    guarded: Vec<String>,
}

/// One public port forwarded by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entry {
    pub public_port: u16,
    pub protocol: Protocol,
    pub target: SocketAddrV4,
}

/// What the kernel counted for one public port since it was forwarded.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PortCounts {
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Flows (TCP connections, UDP peers) ever set up through the port.
    pub flows: u64,
    /// Established TCP connections and UDP peers heard from within the last minute.
    pub active: u64,
}

/// Whether IPv4 forwarding is on for `iface` (`net.ipv4.conf.<iface>.forwarding`).
pub fn forwarding_on(iface: &str) -> bool {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"))
        .is_ok_and(|v| v.trim() == "1")
}

/// Turn IPv4 forwarding on for one interface (never globally); true if it was off.
pub fn turn_forwarding_on(iface: &str) -> io::Result<bool> {
    if forwarding_on(iface) {
        return Ok(false);
    }
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"), "1")?;
    Ok(true)
}

/// `route_localnet` on Lodge's bridge only, so that clients on this machine reach
/// `127.0.0.1:<port>` (the table masquerades them; forged loopback packets from namespaces are
/// dropped by its guard).
pub fn allow_loopback_clients(bridge: &str) -> io::Result<()> {
    std::fs::write(
        format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet"),
        "1",
    )
}

/// Interfaces players may arrive on: every interface with an IPv4 address (or the one holding
/// `address`), except loopback and Lodge's own bridges.
pub fn ingress_interfaces(address: Option<Ipv4Addr>) -> io::Result<Vec<String>> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()?;
    let mut names = BTreeSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut words = line.split_whitespace();
        let (Some(_), Some(name), Some("inet"), Some(cidr)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        let ip = cidr
            .split('/')
            .next()
            .and_then(|a| a.parse::<Ipv4Addr>().ok());
        if name == "lo" || name.starts_with("lodge") {
            continue;
        }
        if address.is_none_or(|a| Some(a) == ip) {
            names.insert(name.to_string());
        }
    }
    Ok(names.into_iter().collect())
}

/// Whether the host routes between all its interfaces already (`net.ipv4.conf.all.forwarding`):
/// if not, forwarded packets that are not players' (DNATed) ones are dropped on the interfaces
/// forwarding was turned on for.
pub fn host_is_router() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/conf/all/forwarding")
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
}

fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

impl Forwarder {
    /// Create the node's table, or rewrite the rules of the one a previous run left (its maps,
    /// sets and counters are kept: live processes stay reachable throughout). `guarded` are the
    /// ingress interfaces on which forwarded packets that are not DNATed to a process are
    /// dropped.
    pub async fn ensure(setup: Setup, guarded: &[String]) -> io::Result<Forwarder> {
        let f = Forwarder {
            setup,
            guarded: guarded.to_vec(),
        };
        f.rebuild().await?;
        Ok(f)
    }

    /// Create the table, or rewrite its rules keeping its maps, sets and counters.
    pub async fn rebuild(&self) -> io::Result<()> {
        let f = self;
        let script = f.layout(&f.guarded);
        if let Err(first) = nft(&script).await {
            // A table of an older layout: replace it whole, in one transaction. Established
            // flows keep their translation; live processes are installed again by adoption.
            let t = &f.setup.table;
            let replace = format!("add table ip {t}\ndelete table ip {t}\n{script}");
            nft(&replace).await.map_err(|e| {
                io::Error::other(format!("cannot set up nftables table {t}: {first}; {e}"))
            })?;
        }
        Ok(())
    }

    pub fn table(&self) -> &str {
        &self.setup.table
    }

    fn layout(&self, guarded: &[String]) -> String {
        let Setup {
            table: t,
            bridge: br,
            ..
        } = &self.setup;
        let to_us = match self.setup.address {
            Some(a) => format!("ip daddr {a}"),
            None => "fib daddr type local".to_string(),
        };
        let limit = match self.setup.source_packet_rate {
            0 => String::new(),
            r => format!(
                "add rule ip {t} guard meta l4proto . th dport @public ct direction original {to_us} \
                 update @sources {{ ip saddr limit rate over {r}/second burst {b} packets }} \
                 counter name flood_dropped drop\n",
                b = r.saturating_mul(2)
            ),
        };
        let mut s = format!(
            "add table ip {t}\n\
             add map ip {t} ports {{ type inet_proto . inet_service : ipv4_addr . inet_service ; }}\n\
             add set ip {t} public {{ type inet_proto . inet_service ; }}\n\
             add map ip {t} bytes_in {{ type inet_proto . inet_service : counter ; }}\n\
             add map ip {t} bytes_out {{ type inet_proto . ipv4_addr . inet_service : counter ; }}\n\
             add map ip {t} flows {{ type inet_proto . inet_service : counter ; }}\n\
             add set ip {t} sources {{ type ipv4_addr ; size 65536 ; flags dynamic,timeout ; timeout 10s ; }}\n\
             add counter ip {t} flood_dropped\n\
             add chain ip {t} guard {{ type filter hook prerouting priority -150 ; policy accept ; }}\n\
             add chain ip {t} local_out {{ type filter hook output priority -150 ; policy accept ; }}\n\
             add chain ip {t} dnat_in {{ type nat hook prerouting priority dstnat ; policy accept ; }}\n\
             add chain ip {t} dnat_out {{ type nat hook output priority -100 ; policy accept ; }}\n\
             add chain ip {t} masquerade_local {{ type nat hook postrouting priority srcnat ; policy accept ; }}\n\
             add chain ip {t} forward_guard {{ type filter hook forward priority -10 ; policy accept ; }}\n\
             flush chain ip {t} guard\n\
             flush chain ip {t} local_out\n\
             flush chain ip {t} dnat_in\n\
             flush chain ip {t} dnat_out\n\
             flush chain ip {t} masquerade_local\n\
             flush chain ip {t} forward_guard\n\
             add rule ip {t} guard iifname \"{br}\" ip daddr 127.0.0.0/8 drop\n\
             {limit}\
             add rule ip {t} guard meta l4proto . th dport @public ct direction original {to_us} counter name meta l4proto . th dport map @bytes_in\n\
             add rule ip {t} guard iifname \"{br}\" ct direction reply ct status dnat counter name meta l4proto . ip saddr . th sport map @bytes_out\n\
             add rule ip {t} local_out meta l4proto . th dport @public ct direction original {to_us} counter name meta l4proto . th dport map @bytes_in\n\
             add rule ip {t} dnat_in {to_us} meta l4proto . th dport @public counter name meta l4proto . th dport map @flows\n\
             add rule ip {t} dnat_in {to_us} dnat ip to meta l4proto . th dport map @ports\n\
             add rule ip {t} dnat_out {to_us} meta l4proto . th dport @public counter name meta l4proto . th dport map @flows\n\
             add rule ip {t} dnat_out {to_us} dnat ip to meta l4proto . th dport map @ports\n\
             add rule ip {t} masquerade_local oifname \"{br}\" ip saddr 127.0.0.0/8 masquerade\n\
             add rule ip {t} masquerade_local iifname \"{br}\" oifname \"{br}\" ct status dnat masquerade\n\
             add rule ip {t} forward_guard iifname \"{br}\" ct status dnat accept\n\
             add rule ip {t} forward_guard iifname \"{br}\" drop\n"
        );
        for iface in guarded {
            s.push_str(&format!(
                "add rule ip {t} forward_guard iifname \"{iface}\" ct status dnat accept\n\
                 add rule ip {t} forward_guard iifname \"{iface}\" drop\n"
            ));
        }
        s
    }

    /// The counter maps' keys of a port, and the counter each names.
    fn counter_keys(e: &Entry) -> [(&'static str, String, String); 3] {
        let (p, port, ip, tp) = (
            proto(e.protocol),
            e.public_port,
            e.target.ip(),
            e.target.port(),
        );
        [
            ("bytes_in", format!("{p} . {port}"), format!("i{port}")),
            (
                "bytes_out",
                format!("{p} . {ip} . {tp}"),
                format!("o{port}"),
            ),
            ("flows", format!("{p} . {port}"), format!("n{port}")),
        ]
    }

    /// Forward these ports, in one transaction. Ports already forwarded the same way (a
    /// process adopted after a restart) keep their counters; a stale element for the same port
    /// (a crash between installing and recording) is replaced.
    pub async fn install(&self, entries: &[Entry]) -> io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let script = self.install_script(entries);
        if nft(&script).await.is_ok() {
            return Ok(());
        }
        let stale: Vec<Entry> = self
            .installed()
            .await?
            .into_iter()
            // The same public port forwarded elsewhere, or the same address and port inside
            // a namespace counted under another public port: both are left from before.
            .filter(|i| {
                entries.iter().any(|e| {
                    e != i
                        && (e.public_port == i.public_port
                            || (e.protocol == i.protocol && e.target == i.target))
                })
            })
            .collect();
        self.remove(&stale).await?;
        nft(&script).await
    }

    fn install_script(&self, entries: &[Entry]) -> String {
        let t = &self.setup.table;
        let mut s = String::new();
        for e in entries {
            let (p, port, ip, tp) = (
                proto(e.protocol),
                e.public_port,
                e.target.ip(),
                e.target.port(),
            );
            s.push_str(&format!(
                "add counter ip {t} i{port}\n\
                 add counter ip {t} o{port}\n\
                 add counter ip {t} n{port}\n\
                 add element ip {t} ports {{ {p} . {port} : {ip} . {tp} }}\n\
                 add element ip {t} public {{ {p} . {port} }}\n"
            ));
            for (map, key, counter) in Self::counter_keys(e) {
                s.push_str(&format!(
                    "add element ip {t} {map} {{ {key} : \"{counter}\" }}\n"
                ));
            }
        }
        s
    }

    /// Stop forwarding these ports (in one transaction) and forget their flows, so that no
    /// player's packets reach an address the next process may be given. Ports not forwarded
    /// are no error.
    pub async fn remove(&self, entries: &[Entry]) -> io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let t = &self.setup.table;
        // Adding first makes deleting an absent element harmless (nft 1.0.6 has no `destroy`).
        let mut s = self.install_script(entries);
        for e in entries {
            for (map, key, _) in Self::counter_keys(e) {
                s.push_str(&format!("delete element ip {t} {map} {{ {key} }}\n"));
            }
            let p = proto(e.protocol);
            let port = e.public_port;
            s.push_str(&format!(
                "delete element ip {t} ports {{ {p} . {port} }}\n\
                 delete element ip {t} public {{ {p} . {port} }}\n\
                 delete counter ip {t} i{port}\n\
                 delete counter ip {t} o{port}\n\
                 delete counter ip {t} n{port}\n"
            ));
        }
        nft(&s).await?;
        for e in entries {
            conntrack::forget(e.protocol, e.public_port, e.target).await;
        }
        Ok(())
    }

    /// The ports the table forwards now.
    pub async fn installed(&self) -> io::Result<Vec<Entry>> {
        let json = nft_json(&["list", "map", "ip", &self.setup.table, "ports"]).await?;
        Ok(parse_ports(&json))
    }

    /// What the kernel counted for these ports (those not forwarded are absent), and the
    /// packets the per-source limit dropped.
    pub async fn counts(&self, entries: &[Entry]) -> io::Result<Counts> {
        let json = nft_json(&["list", "counters", "table", "ip", &self.setup.table]).await?;
        let named = parse_counters(&json);
        let targets: Vec<(Protocol, SocketAddrV4)> =
            entries.iter().map(|e| (e.protocol, e.target)).collect();
        let active = conntrack::active(&targets).await;
        let mut ports = HashMap::new();
        for e in entries {
            let get = |k: char| named.get(&format!("{k}{}", e.public_port)).copied();
            let (Some(i), Some(o), Some(n)) = (get('i'), get('o'), get('n')) else {
                continue;
            };
            // The kernel counts IP packets; players' bytes are their payload, as the userspace
            // proxy counts them: exact for UDP, TCP options (about 12 bytes a packet) included.
            let headers = match e.protocol {
                Protocol::Udp => 20 + 8,
                Protocol::Tcp => 20 + 20,
            };
            let payload = |(packets, bytes): (u64, u64)| bytes.saturating_sub(packets * headers);
            ports.insert(
                e.public_port,
                PortCounts {
                    bytes_in: payload(i),
                    bytes_out: payload(o),
                    // The nat chains see the first packet of each flow only.
                    flows: n.0,
                    active: active.get(&(e.protocol, e.target)).copied().unwrap_or(0),
                },
            );
        }
        Ok(Counts {
            ports,
            rate_limited: named.get("flood_dropped").map_or(0, |c| c.0),
        })
    }
}

/// Counters of a table, read at once.
#[derive(Debug, Default)]
pub struct Counts {
    pub ports: HashMap<u16, PortCounts>,
    /// Packets dropped by the per-source rate limit.
    pub rate_limited: u64,
}

/// How many nftables tables of other Lodges (`lodge_*`, not `except`) this network namespace has.
pub async fn other_lodge_tables(except: &str) -> usize {
    let Ok(json) = nft_json(&["list", "tables"]).await else {
        return 0;
    };
    json["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["table"]["name"].as_str())
        .filter(|n| n.starts_with("lodge_") && *n != except)
        .count()
}

/// Remove a node's table (`lodge cleanup`, uninstall). No table is no error.
pub async fn delete_table(table: &str) -> io::Result<()> {
    nft(&format!("add table ip {table}\ndelete table ip {table}\n")).await
}

/// Whether `nft` can run here (installed, and allowed to: root).
pub async fn available() -> bool {
    nft_json(&["list", "tables"]).await.is_ok()
}

async fn nft(script: &str) -> io::Result<()> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).await?;
    }
    let out = tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "nft did not answer in 10 s"))??;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or("").trim().to_string();
        Err(io::Error::other(format!("nft: {first}")))
    }
}

async fn nft_json(args: &[&str]) -> io::Result<serde_json::Value> {
    let run = tokio::process::Command::new("nft")
        .arg("-j")
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(TOOL_TIMEOUT, run)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "nft did not answer in 10 s"))??;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let kind = if err.contains("No such file or directory") {
            io::ErrorKind::NotFound
        } else {
            io::ErrorKind::Other
        };
        return Err(io::Error::new(
            kind,
            format!("nft: {}", err.lines().next().unwrap_or("").trim()),
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(io::Error::other)
}

/// Named counters of `nft -j list counters`: name to packets and bytes.
fn parse_counters(json: &serde_json::Value) -> HashMap<String, (u64, u64)> {
    let mut out = HashMap::new();
    for item in json["nftables"].as_array().into_iter().flatten() {
        let c = &item["counter"];
        if let (Some(name), Some(packets), Some(bytes)) = (
            c["name"].as_str(),
            c["packets"].as_u64(),
            c["bytes"].as_u64(),
        ) {
            out.insert(name.to_string(), (packets, bytes));
        }
    }
    out
}

/// Elements of the `ports` map of `nft -j list map`.
fn parse_ports(json: &serde_json::Value) -> Vec<Entry> {
    let mut out = Vec::new();
    for item in json["nftables"].as_array().into_iter().flatten() {
        for el in item["map"]["elem"].as_array().into_iter().flatten() {
            // [ {"concat": ["udp", 31001]}, {"concat": ["10.1.2.3", 7777]} ]
            let key = el[0]["concat"].as_array();
            let value = el[1]["concat"].as_array();
            let (Some(key), Some(value)) = (key, value) else {
                continue;
            };
            let protocol = match key.first().and_then(|v| v.as_str()) {
                Some("tcp") => Protocol::Tcp,
                Some("udp") => Protocol::Udp,
                _ => continue,
            };
            let port = key
                .get(1)
                .and_then(|v| v.as_u64())
                .and_then(|p| u16::try_from(p).ok());
            let ip = value
                .first()
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse().ok());
            let tport = value
                .get(1)
                .and_then(|v| v.as_u64())
                .and_then(|p| u16::try_from(p).ok());
            if let (Some(public_port), Some(ip), Some(tport)) = (port, ip, tport) {
                out.push(Entry {
                    public_port,
                    protocol,
                    target: SocketAddrV4::new(ip, tport),
                });
            }
        }
    }
    out
}

/// Reserve a public port on this machine while the kernel forwards it: a socket bound to it
/// (never read: DNAT happens before local delivery) keeps every other program, and every other
/// Lodge, from binding the port, as the userspace proxy's own socket did.
#[derive(Debug)]
pub struct Placeholder {
    _socket: std::net::UdpSocket,
    _listener: std::net::TcpListener,
}

impl Placeholder {
    pub fn bind(public: SocketAddr) -> io::Result<Placeholder> {
        // Both protocols are held: a TCP port and a UDP port of one number are one public port.
        let socket = std::net::UdpSocket::bind(public)?;
        // The kernel raises 1 to its minimum, so stray datagrams cannot pile up memory.
        crate::set_socket_int(&socket, libc::SO_RCVBUF, 1);
        Ok(Placeholder {
            _socket: socket,
            _listener: bind_tcp_unlistened(public)?,
        })
    }
}

/// A TCP socket bound to `addr` without listening: it holds the port and accepts nothing.
fn bind_tcp_unlistened(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        return Err(io::Error::other("kernel forwarding is IPv4 only"));
    };
    // SAFETY: plain socket calls on a descriptor we create and own; on error it is closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let r = libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if r != 0 {
            let e = io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(std::net::TcpListener::from_raw_fd(fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_map_elements_and_counters() {
        let map: serde_json::Value = serde_json::from_str(
            r#"{"nftables":[{"metainfo":{}},{"map":{"family":"ip","name":"ports","table":"t",
            "type":["inet_proto","inet_service"],"map":["ipv4_addr","inet_service"],
            "elem":[[{"concat":["udp",31001]},{"concat":["10.250.0.2",7777]}],
                    [{"concat":["tcp",31002]},{"concat":["10.250.0.3",80]}]]}}]}"#,
        )
        .unwrap();
        let got = parse_ports(&map);
        assert_eq!(
            got,
            vec![
                Entry {
                    public_port: 31001,
                    protocol: Protocol::Udp,
                    target: "10.250.0.2:7777".parse().unwrap()
                },
                Entry {
                    public_port: 31002,
                    protocol: Protocol::Tcp,
                    target: "10.250.0.3:80".parse().unwrap()
                }
            ]
        );
        let counters: serde_json::Value = serde_json::from_str(
            r#"{"nftables":[{"counter":{"family":"ip","name":"i31001","table":"t","handle":2,
            "packets":3,"bytes":150}}]}"#,
        )
        .unwrap();
        assert_eq!(parse_counters(&counters).get("i31001"), Some(&(3, 150)));
    }
}
