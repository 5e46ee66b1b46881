//! The sandbox network's fixed addresses, and the address groups policy rules name.
//!
//! Every sandbox sees the same small network (it is private to the sandbox, so nothing
//! collides): the guest is `10.0.2.15/24` and `fd00:6d73:62::15/64`, the gateway (our netstack,
//! also the DNS resolver) is `10.0.2.2` and `fd00:6d73:62::2`. Flows to the gateway's address
//! on any port other than DNS reach the host's own loopback. That address, and every address
//! the host kernel delivers locally (asked per flow, see [`crate::local`]), is the `host` group.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The guest's IPv4 address (msb-init configures it).
pub const GUEST_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The gateway's IPv4 address: the netstack, the DNS resolver, and the host's loopback.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The IPv4 prefix length of the sandbox network.
pub const PREFIX_V4: u8 = 24;
/// The guest's IPv6 address (msb-init configures it).
pub const GUEST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6d73, 0x62, 0, 0, 0, 0, 0x15);
/// The gateway's IPv6 address.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x6d73, 0x62, 0, 0, 0, 0, 2);
/// The IPv6 prefix length of the sandbox network.
pub const PREFIX_V6: u8 = 64;

/// Address groups a rule can name. An address is in exactly one group (see [`group_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    /// Globally routable unicast addresses.
    Public,
    /// RFC 1918, carrier-grade NAT (100.64/10) and IPv6 unique-local (fc00::/7) addresses.
    Private,
    /// 127.0.0.0/8 and ::1 (the guest's own; the host's is `Host`).
    Loopback,
    /// 169.254/16 and fe80::/10, except the metadata endpoints.
    LinkLocal,
    /// Cloud instance metadata endpoints (169.254.169.254, fd00:ec2::254, 100.100.100.200).
    Metadata,
    /// The host itself: the gateway's address (the host's loopback) and every address the
    /// host kernel delivers locally (see [`group_at`] and [`crate::local`]).
    Host,
    /// Everything else: unspecified, multicast, broadcast, reserved and documentation ranges.
    /// No preset allows these; only an explicit IP or CIDR rule does.
    Reserved,
}

impl Group {
    /// The name rules use (`public`, `private`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Group::Public => "public",
            Group::Private => "private",
            Group::Loopback => "loopback",
            Group::LinkLocal => "link-local",
            Group::Metadata => "metadata",
            Group::Host => "host",
            Group::Reserved => "reserved",
        }
    }

    /// The group a rule names, if `s` is one.
    pub fn parse(s: &str) -> Option<Group> {
        Some(match s {
            "public" => Group::Public,
            "private" => Group::Private,
            "loopback" => Group::Loopback,
            "link-local" => Group::LinkLocal,
            "metadata" => Group::Metadata,
            "host" => Group::Host,
            _ => return None,
        })
    }
}

/// The IPv4 address an IPv6 address carries, for the forms that reach IPv4 hosts: mapped
/// (`::ffff:a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4 (`2002:AABB:CCDD::/48`). Policy treats
/// such an address as the IPv4 address it names, so `::ffff:127.0.0.1` is loopback.
pub fn embedded_v4(ip: &Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ));
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// The address policy decides on: IPv6 forms that carry an IPv4 address become that address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(&v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], len: u8) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn in_v6(ip: &Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    u128::from(*ip) & mask == u128::from(net) & mask
}

/// The group of `ip` (after [`canonical`]).
pub fn group_of(ip: IpAddr) -> Group {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            if v4 == GATEWAY_V4 {
                Group::Host
            } else if v4 == Ipv4Addr::new(169, 254, 169, 254)
                || v4 == Ipv4Addr::new(100, 100, 100, 200)
            {
                Group::Metadata
            } else if in_v4(v4, [127, 0, 0, 0], 8) {
                Group::Loopback
            } else if in_v4(v4, [169, 254, 0, 0], 16) {
                Group::LinkLocal
            } else if in_v4(v4, [10, 0, 0, 0], 8)
                || in_v4(v4, [172, 16, 0, 0], 12)
                || in_v4(v4, [192, 168, 0, 0], 16)
                || in_v4(v4, [100, 64, 0, 0], 10)
            {
                Group::Private
            } else if in_v4(v4, [0, 0, 0, 0], 8)
                || in_v4(v4, [192, 0, 0, 0], 24)
                || in_v4(v4, [192, 0, 2, 0], 24)
                || in_v4(v4, [198, 18, 0, 0], 15)
                || in_v4(v4, [198, 51, 100, 0], 24)
                || in_v4(v4, [203, 0, 113, 0], 24)
                || in_v4(v4, [224, 0, 0, 0], 4)
                || in_v4(v4, [240, 0, 0, 0], 4)
            {
                Group::Reserved
            } else {
                Group::Public
            }
        }
        IpAddr::V6(v6) => {
            if v6 == GATEWAY_V6 {
                Group::Host
            } else if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
                Group::Metadata
            } else if v6 == Ipv6Addr::LOCALHOST {
                Group::Loopback
            } else if in_v6(&v6, Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10) {
                Group::LinkLocal
            } else if in_v6(&v6, Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7) {
                Group::Private
            } else if in_v6(&v6, Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3)
                && !in_v6(&v6, Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32)
            {
                Group::Public
            } else {
                Group::Reserved
            }
        }
    }
}

/// The group of `ip` when the host kernel does (`local`) or does not deliver it to itself:
/// a local address is the host's own, `Host`, whatever range it is in (a LAN, Docker bridge,
/// public or link-local address of a host interface). The loopback range stays `Loopback`:
/// it is the guest's own and never relayed.
pub fn group_at(ip: IpAddr, local: bool) -> Group {
    match group_of(ip) {
        Group::Loopback => Group::Loopback,
        _ if local => Group::Host,
        g => g,
    }
}

/// An address prefix (`10.0.0.0/8`, `2001:db8::/32`); a bare address is a full-length one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// A prefix; `None` if `len` is too long for the family. Host bits are cleared.
    pub fn new(addr: IpAddr, len: u8) -> Option<Cidr> {
        let addr = canonical(addr);
        match addr {
            IpAddr::V4(v4) if len <= 32 => {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                Some(Cidr {
                    addr: IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask)),
                    len,
                })
            }
            IpAddr::V6(v6) if len <= 128 => {
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                Some(Cidr {
                    addr: IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask)),
                    len,
                })
            }
            _ => None,
        }
    }

    /// Parses `ADDR/LEN`.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, l) = s.split_once('/')?;
        if l.is_empty() || l.len() > 3 || !l.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let addr: IpAddr = a.parse().ok()?;
        // An IPv4-mapped prefix counts its length over the IPv6 address.
        let len: u8 = l.parse().ok()?;
        match addr {
            IpAddr::V6(v6) if embedded_v4(&v6).is_some() && v6.to_ipv4_mapped().is_some() => {
                Cidr::new(addr, len.checked_sub(96)?)
            }
            _ => Cidr::new(addr, len),
        }
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn is_v4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` (after [`canonical`]) is inside.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => in_v4(ip, net.octets(), self.len),
            (IpAddr::V6(net), IpAddr::V6(ip)) => in_v6(&ip, net, self.len),
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> Group {
        group_of(s.parse().unwrap())
    }

    #[test]
    fn groups() {
        assert_eq!(g("1.1.1.1"), Group::Public);
        assert_eq!(g("2606:4700::1111"), Group::Public);
        assert_eq!(g("10.1.2.3"), Group::Private);
        assert_eq!(g("172.31.255.255"), Group::Private);
        assert_eq!(g("172.32.0.1"), Group::Public);
        assert_eq!(g("100.64.0.1"), Group::Private);
        assert_eq!(g("fd12::1"), Group::Private);
        assert_eq!(g("127.0.0.53"), Group::Loopback);
        assert_eq!(g("::1"), Group::Loopback);
        assert_eq!(g("169.254.1.1"), Group::LinkLocal);
        assert_eq!(g("fe80::1"), Group::LinkLocal);
        assert_eq!(g("169.254.169.254"), Group::Metadata);
        assert_eq!(g("fd00:ec2::254"), Group::Metadata);
        assert_eq!(g("10.0.2.2"), Group::Host);
        assert_eq!(g("fd00:6d73:62::2"), Group::Host);
        for r in [
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "::",
            "ff02::1",
        ] {
            assert_eq!(g(r), Group::Reserved, "{r}");
        }
        assert_eq!(g("2001:db8::1"), Group::Reserved);
    }

    #[test]
    fn local_addresses_are_the_host_but_loopback_stays_the_guests() {
        let at = |s: &str, local| group_at(s.parse().unwrap(), local);
        assert_eq!(at("192.168.1.5", true), Group::Host);
        assert_eq!(at("192.168.1.5", false), Group::Private);
        assert_eq!(at("81.2.69.142", true), Group::Host);
        assert_eq!(at("fe80::1", true), Group::Host);
        assert_eq!(at("169.254.169.254", true), Group::Host);
        assert_eq!(at("127.0.0.1", true), Group::Loopback);
        assert_eq!(at("10.0.2.2", false), Group::Host);
    }

    #[test]
    fn ipv6_forms_of_ipv4_addresses_are_the_ipv4_address() {
        assert_eq!(g("::ffff:127.0.0.1"), Group::Loopback);
        assert_eq!(g("::ffff:169.254.169.254"), Group::Metadata);
        assert_eq!(g("64:ff9b::a00:1"), Group::Private);
        assert_eq!(g("2002:7f00:1::1"), Group::Loopback);
        assert_eq!(g("::ffff:10.0.2.2"), Group::Host);
        let c = Cidr::parse("127.0.0.0/8").unwrap();
        assert!(c.contains("::ffff:127.1.2.3".parse().unwrap()));
        let m = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!(m, Cidr::parse("10.0.0.0/8").unwrap());
    }

    #[test]
    fn cidrs_parse_strictly() {
        let c = Cidr::parse("10.1.2.3/8").unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(c.contains("10.255.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("2001:db8::/32")
            .unwrap()
            .contains("2001:db8:ffff::1".parse().unwrap()));
        for bad in [
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "::/129",
            "x/8",
            "10.0.0.0/0008",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
    }
}
