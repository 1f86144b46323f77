//! Who a limit counts: one IPv4 address, or one IPv6 /64 (what a single host or subscriber is
//! usually given, so rotating addresses inside it does not escape a per-source limit).

use std::net::{IpAddr, Ipv6Addr};

pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_counts_by_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(source_key(v4), v4);
        assert_eq!(source_key("::ffff:10.1.2.3".parse().unwrap()), v4);
    }
}
