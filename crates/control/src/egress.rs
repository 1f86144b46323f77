//! Where outward calls made on a user's behalf (registry pulls) may go. A user names the host;
//! the operator decides which private, loopback and link-local destinations are acceptable.
//! Names are checked when they are resolved (so a name cannot point at a private address, nor
//! change to one between check and use), address literals before the request, and every
//! redirect hop the same way.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Destinations that are not on the public internet may be reached only when allow-listed.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    /// `host` (any port) or `host:port` entries, as the operator wrote them.
    allow: Arc<Vec<String>>,
}

impl EgressPolicy {
    pub fn new(allow: Vec<String>) -> Self {
        Self {
            allow: Arc::new(
                allow
                    .into_iter()
                    .map(|a| a.trim().to_ascii_lowercase())
                    .filter(|a| !a.is_empty())
                    .collect(),
            ),
        }
    }

    /// Whether the operator allow-listed this host (and port).
    pub fn allows_host(&self, host: &str, port: Option<u16>) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        self.allow.iter().any(|a| {
            let a = a.as_str();
            a == host
                || port.is_some_and(|p| a == format!("{host}:{p}") || a == format!("[{host}]:{p}"))
        })
    }

    /// Check a URL about to be requested: http(s) only, and an address literal must be public
    /// or allow-listed. Names are checked by [`EgressPolicy::resolver`].
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), String> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("{url}: only http and https are allowed"));
        }
        let port = url.port_or_known_default();
        let host = url.host_str().ok_or_else(|| format!("{url} has no host"))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<IpAddr>() {
            Ok(ip) => self.check_ip(bare, ip, port),
            Err(_) => Ok(()),
        }
    }

    fn check_ip(&self, host: &str, ip: IpAddr, port: Option<u16>) -> Result<(), String> {
        if is_public(ip) || self.allows_host(host, port) {
            Ok(())
        } else {
            Err(not_allowed(host))
        }
    }

    /// A DNS resolver for reqwest that drops the addresses this policy refuses.
    pub fn resolver(&self) -> Arc<PolicyResolver> {
        Arc::new(PolicyResolver {
            policy: self.clone(),
        })
    }
}

fn not_allowed(host: &str) -> String {
    format!(
        "{host} is a private, loopback or link-local destination; the operator must allow it \
         (lodge serve --registry-allow {host})"
    )
}

/// Addresses on the public internet: not loopback, private, shared (CGNAT), link-local,
/// unspecified, multicast, broadcast or documentation ranges.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || (s[0] == 0x0064 && s[1] == 0xff9b))
        }
    }
}

pub struct PolicyResolver {
    policy: EgressPolicy,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = policy.allows_host(&host, None);
            let kept: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| allowed || is_public(a.ip()))
                .collect();
            if kept.is_empty() {
                return Err(not_allowed(&host).into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn literals_need_the_allow_list() {
        let none = EgressPolicy::default();
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        assert!(none.check_url(&url("http://127.0.0.1:5000/v2/")).is_err());
        assert!(none
            .check_url(&url("http://169.254.169.254/latest/"))
            .is_err());
        assert!(none.check_url(&url("http://[::1]:5000/")).is_err());
        assert!(none.check_url(&url("file:///etc/passwd")).is_err());
        assert!(none.check_url(&url("https://8.8.8.8/")).is_ok());
        let some = EgressPolicy::new(vec!["127.0.0.1:5000".into(), "10.0.0.9".into()]);
        assert!(some.check_url(&url("http://127.0.0.1:5000/v2/")).is_ok());
        assert!(some.check_url(&url("http://127.0.0.1:5001/v2/")).is_err());
        assert!(some.check_url(&url("http://10.0.0.9:1234/")).is_ok());
    }
}
