//! Connection tracking, read and pruned for kernel-forwarded ports: which players are active
//! on a process's ports (its entries), and forgetting a released port's flows.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use crate::Protocol;

/// A UDP peer counts as active this long after its last datagram, as in the userspace proxy.
const UDP_ACTIVE: u64 = crate::UDP_SESSION_TTL.as_secs();
/// A peer the game server never answered counts this long.
const UDP_UNREPLIED_ACTIVE: u64 = crate::UDP_UNREPLIED_TTL.as_secs();

/// Forget the tracked flows of one forwarded port (to `public_port`, answered from `target`),
/// so that a port or address handed to another process carries none of the last one's
/// players. Needs `conntrack` (conntrack-tools); without it the entries expire on their own.
pub async fn forget(protocol: Protocol, public_port: u16, target: SocketAddrV4) {
    let p = match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    };
    let run = tokio::process::Command::new("conntrack")
        .args([
            "-D",
            "-p",
            p,
            "--orig-port-dst",
            &public_port.to_string(),
            "--reply-src",
            &target.ip().to_string(),
            "--reply-port-src",
            &target.port().to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(Duration::from_secs(10), run).await {
        // Exit code 1 is "no entry matched".
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::debug!(public_port, error = %e, "cannot run conntrack to forget the port's flows")
        }
        Err(_) => tracing::warn!(public_port, "conntrack did not answer in 10 s"),
    }
}

/// Active flows per process port (`protocol`, address and port inside its namespace).
pub async fn active(
    targets: &[(Protocol, SocketAddrV4)],
) -> HashMap<(Protocol, SocketAddrV4), u64> {
    if targets.is_empty() {
        return HashMap::new();
    }
    let text = match tokio::fs::read_to_string("/proc/net/nf_conntrack").await {
        Ok(t) => t,
        // A kernel without the procfs listing: the same lines from conntrack-tools.
        Err(_) => match listing().await {
            Some(t) => t,
            None => {
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!("cannot read connection tracking (no /proc/net/nf_conntrack, no conntrack): kernel-forwarded ports report no active players");
                }
                return HashMap::new();
            }
        },
    };
    let targets = targets.to_vec();
    tokio::task::spawn_blocking(move || count_active(&text, &targets, UdpTimeouts::read()))
        .await
        .unwrap_or_default()
}

static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

async fn listing() -> Option<String> {
    let run = tokio::process::Command::new("conntrack")
        .arg("-L")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .ok()?
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(Debug, Clone, Copy)]
struct UdpTimeouts {
    /// `nf_conntrack_udp_timeout`: entries not (yet) seen both ways often.
    single: u64,
    /// `nf_conntrack_udp_timeout_stream`: assured entries.
    stream: u64,
}

impl UdpTimeouts {
    fn read() -> UdpTimeouts {
        let get = |name: &str, default: u64| {
            std::fs::read_to_string(format!("/proc/sys/net/netfilter/{name}"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(default)
        };
        UdpTimeouts {
            single: get("nf_conntrack_udp_timeout", 30),
            stream: get("nf_conntrack_udp_timeout_stream", 120),
        }
    }
}

/// Count the entries of a `/proc/net/nf_conntrack` (or `conntrack -L`) listing whose reply
/// comes from one of `targets`: established TCP connections, and UDP peers heard from lately.
fn count_active(
    text: &str,
    targets: &[(Protocol, SocketAddrV4)],
    udp: UdpTimeouts,
) -> HashMap<(Protocol, SocketAddrV4), u64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = words.iter().position(|w| *w == "tcp" || *w == "udp") else {
            continue;
        };
        let protocol = if words[at] == "tcp" {
            Protocol::Tcp
        } else {
            Protocol::Udp
        };
        let Some(remaining) = words.get(at + 2).and_then(|w| w.parse::<u64>().ok()) else {
            continue;
        };
        let field = |key: &str, nth: usize| {
            words
                .iter()
                .filter_map(|w| w.strip_prefix(key))
                .nth(nth)
                .map(str::to_string)
        };
        // The second src/sport are the reply's: the process inside its namespace.
        let (Some(ip), Some(port)) = (field("src=", 1), field("sport=", 1)) else {
            continue;
        };
        let (Ok(ip), Ok(port)) = (ip.parse::<Ipv4Addr>(), port.parse::<u16>()) else {
            continue;
        };
        let target = SocketAddrV4::new(ip, port);
        if !targets.contains(&(protocol, target)) {
            continue;
        }
        let live = match protocol {
            Protocol::Tcp => words.get(at + 3) == Some(&"ESTABLISHED"),
            Protocol::Udp => {
                let assured = words.contains(&"[ASSURED]");
                let replied = !words.contains(&"[UNREPLIED]");
                let timeout = if assured { udp.stream } else { udp.single };
                let idle = timeout.saturating_sub(remaining);
                if replied {
                    idle < UDP_ACTIVE
                } else {
                    idle < UDP_UNREPLIED_ACTIVE
                }
            }
        };
        if live {
            *out.entry((protocol, target)).or_insert(0) += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_established_tcp_and_recent_udp_per_target() {
        let text = "\
ipv4     2 udp      17 115 src=10.251.0.2 dst=10.251.0.1 sport=5000 dport=31001 src=10.250.0.2 dst=10.251.0.2 sport=7777 dport=5000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 30 src=10.251.0.3 dst=10.251.0.1 sport=5001 dport=31001 src=10.250.0.2 dst=10.251.0.3 sport=7777 dport=5001 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 28 src=10.251.0.4 dst=10.251.0.1 sport=5002 dport=31001 [UNREPLIED] src=10.250.0.2 dst=10.251.0.4 sport=7777 dport=5002 mark=0 zone=0 use=2
ipv4     2 udp      17 20 src=10.251.0.5 dst=10.251.0.1 sport=5003 dport=31001 [UNREPLIED] src=10.250.0.2 dst=10.251.0.5 sport=7777 dport=5003 mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=40000 dport=31002 src=10.250.0.3 dst=10.250.0.1 sport=80 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 119 TIME_WAIT src=127.0.0.1 dst=127.0.0.1 sport=40001 dport=31002 src=10.250.0.3 dst=10.250.0.1 sport=80 dport=40001 [ASSURED] mark=0 zone=0 use=2
tcp      6 431999 ESTABLISHED src=192.0.2.9 dst=192.0.2.2 sport=40002 dport=31002 src=10.250.0.3 dst=192.0.2.9 sport=80 dport=40002 [ASSURED] mark=0 use=1
ipv4     2 tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=40003 dport=5432 src=127.0.0.1 dst=127.0.0.1 sport=5432 dport=40003 [ASSURED] mark=0 zone=0 use=2
";
        let udp = (Protocol::Udp, "10.250.0.2:7777".parse().unwrap());
        let tcp = (Protocol::Tcp, "10.250.0.3:80".parse().unwrap());
        let got = count_active(
            text,
            &[udp, tcp],
            UdpTimeouts {
                single: 30,
                stream: 120,
            },
        );
        // UDP: the assured peer heard 5 s ago and the unreplied one 2 s ago; not the assured
        // one idle for 90 s, nor the unreplied one idle for 10 s.
        assert_eq!(got.get(&udp), Some(&2));
        // TCP: the two established connections (either listing format), not TIME_WAIT.
        assert_eq!(got.get(&tcp), Some(&2));
    }
}
