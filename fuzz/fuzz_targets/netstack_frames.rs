//! Guest frames into the netstack with the policy engine: raw bytes, and well-formed
//! Ethernet/IPv4/IPv6/TCP/UDP/DNS frames with fuzzer-chosen fields. Nothing panics, every frame
//! is taken, and what the stack sends back fits the link. The policy only ever allows the
//! host group (the gateway and any address the kernel delivers locally), and the stack runs in
//! a network namespace of its own holding only a loopback, so the only host sockets the
//! fuzzer can open are to that empty loopback: every name resolves to the gateway (the host
//! group too), so a flow admitted by its TLS or HTTP name can only be one to the gateway.
//! Domain rules of both kinds make the stack read first bytes of denied and of allowed flows.
#![no_main]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use msb_netstack::addr;
use msb_netstack::policy::{Action, Policy, Preset};
use msb_netstack::stack::{Config, Link, NetStack, GATEWAY_MAC};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
    Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    UdpPacket, UdpRepr,
};

struct FuzzLink {
    frames: Vec<Vec<u8>>,
    idle: UnixDatagram,
    mtu: usize,
}

impl Link for FuzzLink {
    fn raw_fd(&self) -> RawFd {
        self.idle.as_raw_fd()
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if self.frames.is_empty() {
            return Ok(None);
        }
        let f = self.frames.remove(0);
        let n = f.len().min(buf.len());
        buf[..n].copy_from_slice(&f[..n]);
        Ok(Some(n))
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        assert!(frame.len() <= self.mtu + 14, "a {}-byte frame", frame.len());
        Ok(())
    }
}

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
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fn dst(b: &mut Bytes, v6: bool) -> IpAddress {
    if v6 {
        IpAddress::Ipv6(match b.u8() % 3 {
            0 => addr::GATEWAY_V6,
            1 => Ipv6Addr::new(0x2001, 0x4860, 0, 0, 0, 0, 0, 0x8888),
            _ => Ipv6Addr::from(u128::from(b.u16()) << 64 | u128::from(b.u16())),
        })
    } else {
        IpAddress::Ipv4(match b.u8() % 3 {
            0 => addr::GATEWAY_V4,
            1 => Ipv4Addr::new(93, 184, 215, 14),
            _ => Ipv4Addr::new(b.u8(), b.u8(), b.u8(), b.u8()),
        })
    }
}

/// A well-formed frame from the guest with fuzzer-chosen fields.
fn frame(b: &mut Bytes) -> Vec<u8> {
    let v6 = b.u8() % 2 == 1;
    let dst = dst(b, v6);
    let src = if v6 {
        IpAddress::Ipv6(addr::GUEST_V6)
    } else {
        IpAddress::Ipv4(addr::GUEST_V4)
    };
    let udp = b.u8() % 2 == 1;
    let (sport, dport) = (1024 + b.u16() % 8, if b.u8() % 2 == 0 { 53 } else { b.u16() % 64 });
    let len = (b.u8() as usize) % 64;
    let payload = b.take(len).to_vec();
    let caps = ChecksumCapabilities::default();
    let mut l4 = Vec::new();
    let proto = if udp {
        let repr = UdpRepr {
            src_port: sport,
            dst_port: dport,
        };
        l4.resize(repr.header_len() + payload.len(), 0);
        let mut p = UdpPacket::new_unchecked(&mut l4);
        repr.emit(&mut p, &src, &dst, payload.len(), |b| b.copy_from_slice(&payload), &caps);
        IpProtocol::Udp
    } else {
        let flags = b.u8();
        let repr = TcpRepr {
            src_port: sport,
            dst_port: dport,
            control: match flags % 4 {
                0 => TcpControl::Syn,
                1 => TcpControl::None,
                2 => TcpControl::Fin,
                _ => TcpControl::Rst,
            },
            seq_number: TcpSeqNumber(i32::from(b.u16())),
            ack_number: (flags & 4 != 0).then(|| TcpSeqNumber(i32::from(b.u16()))),
            window_len: b.u16(),
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None, None, None],
            timestamp: None,
            payload: &payload,
        };
        l4.resize(repr.buffer_len(), 0);
        let mut p = TcpPacket::new_unchecked(&mut l4);
        repr.emit(&mut p, &src, &dst, &caps);
        IpProtocol::Tcp
    };
    let mut ip = Vec::new();
    match (src, dst) {
        (IpAddress::Ipv4(s), IpAddress::Ipv4(d)) => {
            let repr = Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: proto,
                payload_len: l4.len(),
                hop_limit: 64,
            };
            ip.resize(repr.buffer_len() + l4.len(), 0);
            let mut p = Ipv4Packet::new_unchecked(&mut ip);
            repr.emit(&mut p, &caps);
            p.payload_mut().copy_from_slice(&l4);
        }
        (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) => {
            let repr = Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: proto,
                payload_len: l4.len(),
                hop_limit: 64,
            };
            ip.resize(repr.buffer_len() + l4.len(), 0);
            let mut p = Ipv6Packet::new_unchecked(&mut ip);
            repr.emit(&mut p);
            p.payload_mut().copy_from_slice(&l4);
        }
        _ => unreachable!(),
    }
    let eth = EthernetRepr {
        src_addr: EthernetAddress([2, 0x6d, 0x73, 0x62, 0, 0x15]),
        dst_addr: EthernetAddress(GATEWAY_MAC),
        ethertype: if v6 {
            EthernetProtocol::Ipv6
        } else {
            EthernetProtocol::Ipv4
        },
    };
    let mut out = vec![0u8; eth.buffer_len() + ip.len()];
    let mut f = EthernetFrame::new_unchecked(&mut out);
    eth.emit(&mut f);
    f.payload_mut().copy_from_slice(&ip);
    out
}

/// Moves the fuzzing thread (and the stack it drives) into a fresh network namespace with
/// only `lo`, once: the host group then holds nothing of this machine's.
fn isolate() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: unshare(CLONE_NEWNET) changes only the calling thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            panic!(
                "netstack_frames runs in a network namespace of its own; unshare failed ({}): run it as root",
                io::Error::last_os_error()
            );
        }
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status();
        assert!(
            up.is_ok_and(|s| s.success()),
            "ip link set lo up (iproute2) in the fuzz namespace"
        );
    });
}

fuzz_target!(|data: &[u8]| {
    isolate();
    let mut b = Bytes(data);
    let mut frames = Vec::new();
    while !b.0.is_empty() && frames.len() < 32 {
        if b.u8() % 4 == 0 {
            let n = b.u16() as usize % 1600;
            frames.push(b.take(n).to_vec());
        } else {
            frames.push(frame(&mut b));
        }
    }
    // An empty frame is the link saying it dropped one: skipped, not taken.
    let count = frames.iter().filter(|f| !f.is_empty()).count() as u64;
    let mut policy = Policy::preset(Preset::None);
    policy.add_flag(Action::Allow, "host").unwrap();
    policy.add_flag(Action::Allow, "*.test").unwrap();
    policy.add_flag(Action::Deny, "bad.test").unwrap();
    let cfg = Config {
        policy,
        resolver: Arc::new(|_: &str| Ok(vec![IpAddr::V4(msb_netstack::addr::GATEWAY_V4)])),
        ..Config::default()
    };
    let (idle, _other) = UnixDatagram::pair().unwrap();
    let stats = NetStack::drive(
        Box::new(FuzzLink {
            frames,
            idle,
            mtu: cfg.mtu,
        }),
        cfg,
        4,
    )
    .unwrap();
    assert_eq!(
        stats.frames_in.load(std::sync::atomic::Ordering::Relaxed),
        count
    );
});
