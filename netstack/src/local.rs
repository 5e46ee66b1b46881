//! Which destinations "the host" is: the host kernel's own answer, asked per flow.
//!
//! A sandbox must not reach the host's services through any address the host kernel delivers
//! locally: loopback and the gateway, but also every address of every interface (a LAN or
//! Docker-bridge address, a public address, IPv6 global and link-local ones), including ones
//! added after the sandbox started (DHCP, a VPN coming up). A list of interface addresses taken
//! at start goes stale, so each decision asks the kernel for its route to the destination
//! (`RTM_GETROUTE`, what `ip route get ADDR` prints): a route of type `local` (or `anycast`,
//! which is also delivered here) means the host; `broadcast` and `multicast` are never relayed.
//! This is the same lookup the kernel makes when the relay connects, in the same network
//! namespace, so the answer and the connection cannot disagree.

use std::cell::Cell;
use std::io::{self, Read};
use std::net::IpAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

/// What the host kernel does with packets to an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Delivered to this host (route types `local` and `anycast`): the group `host`.
    Local,
    /// A broadcast address (a subnet broadcast of a host interface).
    Broadcast,
    /// A multicast route.
    Multicast,
    /// Sent on to another machine, or no route at all (nothing local either way).
    Elsewhere,
}

// Netlink constants (linux/netlink.h, linux/rtnetlink.h): stable kernel ABI.
const NLMSG_HDR: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const RTMSG_LEN: usize = 12;
const RTA_DST: u16 = 1;
const RTN_LOCAL: u8 = 2;
const RTN_BROADCAST: u8 = 3;
const RTN_ANYCAST: u8 = 4;
const RTN_MULTICAST: u8 = 5;

/// A netlink route socket that asks the kernel how it would deliver an address.
#[derive(Debug)]
pub struct Routes {
    sock: Socket,
    seq: Cell<u32>,
}

impl Routes {
    /// Opens the route socket in the calling thread's network namespace (the one the relay's
    /// host sockets live in).
    pub fn new() -> io::Result<Routes> {
        let sock = Socket::new(
            Domain::from(libc::AF_NETLINK),
            Type::RAW.cloexec(),
            Some(Protocol::from(libc::NETLINK_ROUTE)),
        )?;
        // The kernel answers at once; a bound wait keeps a lost answer from stalling the stack.
        sock.set_read_timeout(Some(Duration::from_secs(1)))?;
        Ok(Routes {
            sock,
            seq: Cell::new(1),
        })
    }

    /// How the kernel delivers `ip` (asked now, so addresses added since start count).
    pub fn delivery(&self, ip: IpAddr) -> io::Result<Delivery> {
        let seq = self.seq.get().wrapping_add(1);
        self.seq.set(seq);
        self.sock.send(&request(ip, seq))?;
        let mut buf = [0u8; 4096];
        loop {
            let n = (&self.sock).read(&mut buf)?;
            if let Some(d) = parse_reply(&buf[..n], seq)? {
                return Ok(d);
            }
        }
    }
}

/// An `RTM_GETROUTE` request for `ip`.
fn request(ip: IpAddr, seq: u32) -> Vec<u8> {
    let (family, addr): (u8, Vec<u8>) = match ip {
        IpAddr::V4(v4) => (libc::AF_INET as u8, v4.octets().to_vec()),
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets().to_vec()),
    };
    let attr_len = 4 + addr.len();
    let len = NLMSG_HDR + RTMSG_LEN + attr_len;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    // Port id 0: the kernel.
    m.extend_from_slice(&0u32.to_ne_bytes());
    // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type; then flags.
    m.extend_from_slice(&[family, (addr.len() * 8) as u8, 0, 0, 0, 0, 0, 0]);
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&RTA_DST.to_ne_bytes());
    m.extend_from_slice(&addr);
    m
}

/// The answer to request `seq` in one datagram from the kernel, if it holds one. No route
/// (`ENETUNREACH`, `EHOSTUNREACH`, `EACCES`) is [`Delivery::Elsewhere`]; other errors are errors.
fn parse_reply(buf: &[u8], seq: u32) -> io::Result<Option<Delivery>> {
    let mut rest = buf;
    while rest.len() >= NLMSG_HDR {
        let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let len = u32_at(rest, 0) as usize;
        if len < NLMSG_HDR || len > rest.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            ));
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let msg_seq = u32_at(rest, 8);
        let body = &rest[NLMSG_HDR..len];
        // Messages are padded to 4 bytes.
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        if msg_seq != seq {
            continue; // an answer to an earlier request that timed out
        }
        match kind {
            NLMSG_ERROR if body.len() >= 4 => {
                let errno = -(u32_at(body, 0) as i32);
                if errno == 0 {
                    continue; // an acknowledgement, not an answer
                }
                return match errno {
                    // No route, an unreachable or a prohibit route: nothing is delivered here.
                    // Anything else (a blackhole's EINVAL too) fails closed at the caller.
                    libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EACCES => {
                        Ok(Some(Delivery::Elsewhere))
                    }
                    e => Err(io::Error::from_raw_os_error(e)),
                };
            }
            RTM_NEWROUTE if body.len() >= RTMSG_LEN => {
                return Ok(Some(match body[7] {
                    RTN_LOCAL | RTN_ANYCAST => Delivery::Local,
                    RTN_BROADCAST => Delivery::Broadcast,
                    RTN_MULTICAST => Delivery::Multicast,
                    _ => Delivery::Elsewhere,
                }));
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected netlink message type {kind}"),
                ))
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDR + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    fn route(rtype: u8) -> Vec<u8> {
        let mut b = vec![2, 32, 0, 0, 254, 2, 0, rtype, 0, 0, 0, 0];
        b.extend_from_slice(&[8, 0, 1, 0, 10, 0, 0, 1]);
        b
    }

    #[test]
    fn requests_carry_the_address() {
        let r = request("192.168.1.5".parse().unwrap(), 7);
        assert_eq!(r.len(), 16 + 12 + 8);
        assert_eq!(&r[4..6], &RTM_GETROUTE.to_ne_bytes());
        assert_eq!(r[16], libc::AF_INET as u8);
        assert_eq!(r[17], 32);
        assert_eq!(&r[32..], &[192, 168, 1, 5]);
        let r = request("2001:db8::1".parse().unwrap(), 7);
        assert_eq!(
            (r.len(), r[16], r[17]),
            (16 + 12 + 20, libc::AF_INET6 as u8, 128)
        );
    }

    #[test]
    fn replies_map_route_types() {
        for (t, d) in [
            (RTN_LOCAL, Delivery::Local),
            (RTN_ANYCAST, Delivery::Local),
            (RTN_BROADCAST, Delivery::Broadcast),
            (RTN_MULTICAST, Delivery::Multicast),
            (1, Delivery::Elsewhere),
            (7, Delivery::Elsewhere),
        ] {
            assert_eq!(
                parse_reply(&reply(RTM_NEWROUTE, 3, &route(t)), 3).unwrap(),
                Some(d)
            );
        }
    }

    #[test]
    fn stale_answers_are_skipped_and_errors_mapped() {
        let mut two = reply(RTM_NEWROUTE, 2, &route(RTN_LOCAL));
        two.extend(reply(RTM_NEWROUTE, 3, &route(1)));
        assert_eq!(parse_reply(&two, 3).unwrap(), Some(Delivery::Elsewhere));
        assert_eq!(
            parse_reply(&reply(RTM_NEWROUTE, 2, &route(1)), 3).unwrap(),
            None
        );
        let err = |e: i32| reply(NLMSG_ERROR, 3, &(-e).to_ne_bytes());
        assert_eq!(
            parse_reply(&err(libc::ENETUNREACH), 3).unwrap(),
            Some(Delivery::Elsewhere)
        );
        assert!(parse_reply(&err(libc::EPERM), 3).is_err());
        assert!(parse_reply(&[1, 2, 3], 3).unwrap().is_none());
        let mut bad = reply(RTM_NEWROUTE, 3, &route(1));
        bad[0] = 200;
        assert!(parse_reply(&bad, 3).is_err());
    }

    #[test]
    fn the_kernel_knows_its_loopback() {
        let r = Routes::new().unwrap();
        assert_eq!(
            r.delivery("127.0.0.1".parse().unwrap()).unwrap(),
            Delivery::Local
        );
        assert_eq!(
            r.delivery("127.1.2.3".parse().unwrap()).unwrap(),
            Delivery::Local
        );
    }
}
