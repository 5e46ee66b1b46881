//! The policy matcher against a simple reference. Rules are generated from structure (so the
//! reference knows what they mean) and rendered in the textual forms users write: mixed case,
//! trailing dots, IDNA, IPv4-mapped IPv6 literals, bracketed IPv6, port ranges. The parsed
//! rule must decide every generated flow exactly as the reference does.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use msb_netstack::policy::{Action, Flow, Policy, Preset, Proto};

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

const LABELS: &[&str] = &["a", "b", "github", "com", "xn--bcher-kva", "bücher", "Ex-1", "_x"];

/// A name from a few labels; returns (as written, canonical).
fn name(b: &mut Bytes) -> (String, String) {
    let n = 1 + b.u8() % 3;
    let labels: Vec<&str> = (0..n).map(|_| LABELS[b.u8() as usize % LABELS.len()]).collect();
    let mut written = labels.join(".");
    if b.u8().is_multiple_of(2) {
        written = written.to_uppercase();
    }
    if b.u8() % 3 == 0 {
        written.push('.');
    }
    let canonical = labels
        .iter()
        .map(|l| match *l {
            "bücher" => "xn--bcher-kva".to_string(),
            l => l.to_ascii_lowercase(),
        })
        .collect::<Vec<_>>()
        .join(".");
    (written, canonical)
}

/// An IPv4 address from a small set so flows hit rules often.
fn v4(b: &mut Bytes) -> Ipv4Addr {
    match b.u8() % 4 {
        0 => Ipv4Addr::new(10, 0, 1 + b.u8() % 2, b.u8() % 3),
        1 => Ipv4Addr::new(127, 0, 0, 1),
        2 => Ipv4Addr::new(1, 1, 1, b.u8() % 2),
        _ => Ipv4Addr::from(b.u32()),
    }
}

fn v6(b: &mut Bytes) -> Ipv6Addr {
    match b.u8() % 3 {
        0 => Ipv6Addr::new(0x2001, 0x4860, 0, 0, 0, 0, 0, u16::from(b.u8() % 2)),
        1 => Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(b.u8() % 2)),
        _ => Ipv6Addr::from(u128::from(b.u32()) << 96 | u128::from(b.u32())),
    }
}

/// The reference's view of an address: IPv4 forms of IPv6 fold to IPv4 (mapped only here;
/// NAT64 and 6to4 are kept out of the generated addresses).
fn fold(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn avoid_embedded(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            s[0] == 0x2002 || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
        }
        _ => false,
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 127,
        IpAddr::V6(v6) => v6 == Ipv6Addr::LOCALHOST,
    }
}

fn is_gateway(ip: IpAddr) -> bool {
    ip == IpAddr::V4(Ipv4Addr::new(10, 0, 2, 2))
        || ip == IpAddr::V6(Ipv6Addr::new(0xfd00, 0x6d73, 0x62, 0, 0, 0, 0, 2))
}

enum RefDest {
    Cidr(IpAddr, u8),
    Domain(String),
    Suffix(String),
}

fn ref_in(net: IpAddr, len: u8, ip: IpAddr) -> bool {
    match (fold(net), fold(ip)) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            len == 0 || (u32::from(n) ^ u32::from(i)) >> (32 - len) == 0
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            len == 0 || (u128::from(n) ^ u128::from(i)) >> (128 - len) == 0
        }
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    // The rule.
    let proto = [Proto::Tcp, Proto::Udp, Proto::Any][b.u8() as usize % 3];
    let (dest_text, dest, is_v6_literal) = match b.u8() % 5 {
        0 => {
            let ip = IpAddr::V4(v4(&mut b));
            (ip.to_string(), RefDest::Cidr(ip, 32), false)
        }
        1 => {
            let ip = v4(&mut b);
            let len = b.u8() % 33;
            if b.u8().is_multiple_of(2) {
                (format!("{ip}/{len}"), RefDest::Cidr(IpAddr::V4(ip), len), false)
            } else {
                // The same prefix written IPv4-mapped.
                let m = ip.to_ipv6_mapped();
                (format!("{m}/{}", len + 96), RefDest::Cidr(IpAddr::V4(ip), len), true)
            }
        }
        2 => {
            let ip = v6(&mut b);
            if avoid_embedded(IpAddr::V6(ip)) || ip.to_ipv4_mapped().is_some() {
                return;
            }
            let len = b.u8() % 129;
            (format!("{ip}/{len}"), RefDest::Cidr(IpAddr::V6(ip), len), true)
        }
        3 => {
            let (w, c) = name(&mut b);
            (w, RefDest::Domain(c), false)
        }
        _ => {
            let (w, c) = name(&mut b);
            (format!("*.{w}"), RefDest::Suffix(c), false)
        }
    };
    let ports = match b.u8() % 3 {
        0 => None,
        1 => {
            let p = b.u16() % 4;
            Some((p, p))
        }
        _ => {
            let lo = b.u16() % 4;
            Some((lo, lo + b.u16() % 4))
        }
    };
    let proto_text = match proto {
        Proto::Tcp => "tcp:",
        Proto::Udp => "udp:",
        _ => "",
    };
    let rule = match ports {
        None => format!("{proto_text}{dest_text}"),
        Some((lo, hi)) => {
            let p = if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            };
            if is_v6_literal {
                format!("{proto_text}[{dest_text}]:{p}")
            } else {
                format!("{proto_text}{dest_text}:{p}")
            }
        }
    };
    // Port 0 is a valid number in a rule; generated names never collide with group words.
    let mut policy = Policy::preset(Preset::None);
    policy
        .add_flag(Action::Allow, &rule)
        .unwrap_or_else(|e| panic!("{rule:?} must parse: {e}"));

    // Flows.
    for _ in 0..4 {
        let fproto = [Proto::Tcp, Proto::Udp][b.u8() as usize % 2];
        let ip = match b.u8() % 3 {
            0 => IpAddr::V4(v4(&mut b)),
            1 => IpAddr::V6(v4(&mut b).to_ipv6_mapped()),
            _ => IpAddr::V6(v6(&mut b)),
        };
        if avoid_embedded(ip) {
            continue;
        }
        let port = b.u16() % 5;
        let (_, fname) = name(&mut b);
        let names = [fname.as_str()];
        // Some flows go to an address of the host's own (the kernel delivers it locally).
        let local = b.u8().is_multiple_of(4);
        let flow = Flow {
            proto: fproto,
            ip,
            port: Some(port),
            names: &names,
            local,
        };
        let proto_ok = proto == Proto::Any || proto == fproto;
        let port_ok = ports.is_none_or(|(lo, hi)| lo <= port && port <= hi);
        let dest_ok = match &dest {
            RefDest::Cidr(net, len) => ref_in(*net, *len, ip),
            RefDest::Domain(d) => fname == *d,
            RefDest::Suffix(s) => fname.ends_with(&format!(".{s}")),
        };
        // The host (a local address or the gateway's; the loopback range stays the guest's)
        // is reached by `host` rules alone, which are never generated.
        let host = !is_loopback(fold(ip)) && (local || is_gateway(fold(ip)));
        let want = proto_ok && port_ok && dest_ok && !host;
        let got = policy.decide(&flow);
        assert_eq!(got.allowed, want, "rule {rule:?} flow {flow:?}: {got}");
    }
});
