//! ICMP echo ("ping") from the guest. To the gateway, smoltcp answers. To anywhere else the
//! policy decides (protocol `icmp`), and an allowed request is relayed through an
//! unprivileged ICMP socket, so a reply means the destination really answered: smoltcp in
//! any-IP mode would otherwise answer for every address. On Linux the VMM's group must be in
//! `net.ipv4.ping_group_range`; without it pings are dropped (one warning says why).

use std::sync::atomic::AtomicBool;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, Ipv4Repr, Ipv6Repr};
use socket2::{Domain, Protocol, Socket, Type};

use super::*;

/// An echo flow with no request or reply for this long is over.
const ECHO_IDLE: Duration = Duration::from_secs(10);

/// The guest, the destination, and the guest's echo identifier.
pub(super) type EchoKey = (IpAddress, IpAddress, u16);

pub(super) struct EchoFlow {
    /// An ICMP datagram socket (the kernel picks its own identifier and checksums).
    sock: UdpSocket,
    guest_mac: EthernetAddress,
    last: StdInstant,
    pub(super) audit: Audit,
}

/// An ICMP datagram ("ping") socket for `v6` or IPv4, non-blocking.
fn ping_socket(v6: bool) -> io::Result<UdpSocket> {
    let (domain, proto) = if v6 {
        (Domain::IPV6, Protocol::ICMPV6)
    } else {
        (Domain::IPV4, Protocol::ICMPV4)
    };
    let s = Socket::new(domain, Type::DGRAM, Some(proto))?;
    s.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(s.into()))
}

impl State {
    /// Takes an ICMP message from the guest to `dst` (not the gateway). Echo requests are
    /// decided and relayed (or dropped) here: returns true. Anything else is smoltcp's.
    pub(super) fn echo_request(
        &mut self,
        guest_mac: EthernetAddress,
        src: IpAddress,
        dst: IpAddress,
        icmp: &[u8],
    ) -> bool {
        let ident = match dst {
            IpAddress::Ipv4(_) => match Icmpv4Packet::new_checked(icmp) {
                Ok(p) if p.msg_type() == Icmpv4Message::EchoRequest && p.msg_code() == 0 => {
                    p.echo_ident()
                }
                _ => return false,
            },
            IpAddress::Ipv6(_) => match Icmpv6Packet::new_checked(icmp) {
                Ok(p) if p.msg_type() == Icmpv6Message::EchoRequest && p.msg_code() == 0 => {
                    p.echo_ident()
                }
                _ => return false,
            },
        };
        let key = (src, dst, ident);
        if !self.echo.contains_key(&key) {
            let (d, audit) = self.decide(Proto::Icmp, IpEndpoint::new(dst, 0));
            if !d.allowed {
                tracing::debug!("netstack: icmp echo {dst} {d}");
                self.stats.icmp_denied.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            let mut sock = match ping_socket(dst.version() == smoltcp::wire::IpVersion::Ipv6) {
                Ok(s) => s,
                Err(e) => {
                    static WARNED: AtomicBool = AtomicBool::new(false);
                    if !WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "netstack: guest pings are dropped: no ICMP socket ({e}); allow this \
                             process's group in net.ipv4.ping_group_range"
                        );
                    }
                    return true;
                }
            };
            if self.watch(&mut sock, Interest::READABLE).is_err() {
                return true;
            }
            self.stats.icmp_allowed.fetch_add(1, Ordering::Relaxed);
            self.echo.insert(
                key,
                EchoFlow {
                    sock,
                    guest_mac,
                    last: StdInstant::now(),
                    audit,
                },
            );
        }
        let f = self.echo.get_mut(&key).expect("inserted above");
        f.last = StdInstant::now();
        if f.sock
            .send_to(icmp, SocketAddr::new(to_std(dst), 0))
            .is_ok()
        {
            f.audit.bytes_out += icmp.len() as u64;
        }
        true
    }

    /// Replies from the relayed destinations, back to the guest as if from them.
    pub(super) fn relay_echo(&mut self) -> bool {
        let mut busy = false;
        let mut tmp = std::mem::take(&mut self.scratch);
        let now_std = StdInstant::now();
        let mut dead = Vec::new();
        for (&(guest, dst, ident), f) in self.echo.iter_mut() {
            while let Ok(n) = f.sock.recv(&mut tmp) {
                busy = true;
                f.last = now_std;
                if let Some(frame) = echo_reply(f.guest_mac, dst, guest, ident, &tmp[..n]) {
                    f.audit.bytes_in += n as u64;
                    if let Err(e) = self.link.send(&frame) {
                        tracing::debug!("netstack: sending a frame: {e}");
                    }
                }
            }
            if now_std.duration_since(f.last) > ECHO_IDLE {
                dead.push((guest, dst, ident));
            }
        }
        for key in dead {
            if let Some(a) = self.end_echo(&key) {
                self.log(a.event("allowed"));
            }
        }
        self.scratch = tmp;
        busy
    }

    /// Ends an echo flow; its audit record, for the log line.
    pub(super) fn end_echo(&mut self, key: &EchoKey) -> Option<Audit> {
        let mut f = self.echo.remove(key)?;
        let _ = self.poll.registry().deregister(&mut f.sock);
        Some(f.audit)
    }
}

/// The Ethernet frame carrying echo reply `icmp` (as an ICMP socket returns it: the kernel's
/// identifier in it) from `from` to the guest, with the guest's identifier back in place.
/// Anything but an echo reply is dropped.
fn echo_reply(
    guest_mac: EthernetAddress,
    from: IpAddress,
    to: IpAddress,
    ident: u16,
    icmp: &[u8],
) -> Option<Vec<u8>> {
    let ip_len = match to {
        IpAddress::Ipv4(_) => 20,
        IpAddress::Ipv6(_) => 40,
    };
    let mut frame = vec![0u8; 14 + ip_len + icmp.len()];
    frame[14 + ip_len..].copy_from_slice(icmp);
    match (from, to) {
        (IpAddress::Ipv4(from), IpAddress::Ipv4(to)) => {
            let mut p = Icmpv4Packet::new_checked(&mut frame[14 + ip_len..]).ok()?;
            if p.msg_type() != Icmpv4Message::EchoReply {
                return None;
            }
            p.set_echo_ident(ident);
            p.fill_checksum();
            let repr = Ipv4Repr {
                src_addr: from,
                dst_addr: to,
                next_header: IpProtocol::Icmp,
                payload_len: icmp.len(),
                hop_limit: 64,
            };
            repr.emit(
                &mut Ipv4Packet::new_unchecked(&mut frame[14..]),
                &ChecksumCapabilities::default(),
            );
        }
        (IpAddress::Ipv6(from), IpAddress::Ipv6(to)) => {
            let mut p = Icmpv6Packet::new_checked(&mut frame[14 + ip_len..]).ok()?;
            if p.msg_type() != Icmpv6Message::EchoReply {
                return None;
            }
            p.set_echo_ident(ident);
            p.fill_checksum(&from, &to);
            let repr = Ipv6Repr {
                src_addr: from,
                dst_addr: to,
                next_header: IpProtocol::Icmpv6,
                payload_len: icmp.len(),
                hop_limit: 64,
            };
            repr.emit(&mut Ipv6Packet::new_unchecked(&mut frame[14..]));
        }
        _ => return None,
    }
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.set_src_addr(EthernetAddress(GATEWAY_MAC));
    eth.set_dst_addr(guest_mac);
    eth.set_ethertype(match to {
        IpAddress::Ipv4(_) => EthernetProtocol::Ipv4,
        IpAddress::Ipv6(_) => EthernetProtocol::Ipv6,
    });
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_carry_the_guests_identifier_and_valid_checksums() {
        let mac = EthernetAddress([2, 0, 0, 0, 0, 0x15]);
        // Echo reply as the kernel hands it back: its own identifier 0x4242, seq 7, "hi".
        let mut icmp = vec![0u8, 0, 0, 0, 0x42, 0x42, 0, 7, b'h', b'i'];
        let from = IpAddress::Ipv4(Ipv4Addr::new(93, 184, 215, 14));
        let to = IpAddress::Ipv4(addr::GUEST_V4);
        let f = echo_reply(mac, from, to, 0x1234, &icmp).unwrap();
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!(eth.dst_addr(), mac);
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.src_addr(), Ipv4Addr::new(93, 184, 215, 14));
        let p = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(p.verify_checksum());
        assert_eq!(
            (p.echo_ident(), p.echo_seq_no(), p.data()),
            (0x1234, 7, &b"hi"[..])
        );
        // Not a reply (an echo request, say): nothing goes to the guest.
        icmp[0] = 8;
        assert!(echo_reply(mac, from, to, 1, &icmp).is_none());
        // IPv6: the checksum covers the pseudo-header.
        let icmp6 = vec![129u8, 0, 0, 0, 0x42, 0x42, 0, 1];
        let (from6, to6) = ("2001:db8::1".parse().unwrap(), addr::GUEST_V6);
        let f = echo_reply(mac, IpAddress::Ipv6(from6), IpAddress::Ipv6(to6), 9, &icmp6).unwrap();
        let ip = Ipv6Packet::new_checked(&f[14..]).unwrap();
        let p = Icmpv6Packet::new_checked(ip.payload()).unwrap();
        assert!(p.verify_checksum(&from6, &to6));
        assert_eq!(p.echo_ident(), 9);
        // Truncated: dropped, no panic.
        assert!(echo_reply(mac, from, to, 1, &[0u8, 0]).is_none());
    }
}
