//! The device against a scripted driver: frames both ways, back-pressure, and drivers that
//! break the rules.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::testing::{Rig, Ring};
use crate::virtio::DeviceFailure;
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 8 << 20;

struct Driver {
    mem: GuestMemoryMmap,
    rings: Vec<Ring>,
    evts: Vec<Arc<EventFd>>,
    failure: Arc<DeviceFailure>,
    device: NetDevice,
    port: NetPort,
}

fn driver(mtu: u16) -> Driver {
    driver_with(mtu, 1 << 32)
}

/// A driver that accepted `features` (VERSION_1 and whatever else).
fn driver_with(mtu: u16, features: u64) -> Driver {
    let (mut device, port) = NetDevice::new([2, 0, 0, 0, 0, 0x15], mtu).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let rig = Rig::new(&[0x10000, 0x30000], 64);
    device.activate(rig.activation(&mem), features).unwrap();
    Driver {
        mem,
        rings: rig.rings,
        evts: rig.evts,
        failure: rig.failure,
        device,
        port,
    }
}

fn wait<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Driver {
    /// Transmits `frame` behind a zero header at `at`.
    fn transmit(&mut self, at: u64, frame: &[u8]) {
        self.transmit_with(at, &[0; HDR_LEN], frame)
    }

    /// Transmits `frame` behind header `hdr` at `at`.
    fn transmit_with(&mut self, at: u64, hdr: &[u8; HDR_LEN], frame: &[u8]) {
        let mut buf = hdr.to_vec();
        buf.extend_from_slice(frame);
        self.mem.write_slice(&buf, GuestAddress(at)).unwrap();
        self.rings[TX].add(&self.mem, &[(at, buf.len() as u32, false)]);
        self.evts[TX].write(1).unwrap();
    }

    fn post_rx(&mut self, at: u64, len: u32) {
        self.rings[RX].add(&self.mem, &[(at, len, true)]);
        self.evts[RX].write(1).unwrap();
    }
}

#[test]
fn config_space_and_limits() {
    let d = driver(9000);
    let mut cfg = [0u8; 12];
    d.device.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &[2, 0, 0, 0, 0, 0x15]);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 9000);
    assert_eq!(
        d.device.features(),
        F_MAC
            | F_MTU
            | F_CSUM
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_MRG_RXBUF
    );
    // A driver that took none of the guest offloads gets none.
    assert!(!d.port.offloads());
    assert!(NetDevice::new([2, 0, 0, 0, 0, 1], 65521).is_err());
    assert!(NetDevice::new([2, 0, 0, 0, 0, 1], 67).is_err());
}

#[test]
fn frames_cross_both_ways() {
    let mut d = driver(1500);
    let frame: Vec<u8> = (0..1514u32).map(|i| i as u8).collect();
    d.transmit(0x100000, &frame);
    let mut buf = vec![0u8; 2048];
    let n = wait(|| d.port.recv(&mut buf)).expect("the frame reaches the stack");
    assert_eq!(&buf[..n], &frame[..]);
    assert_eq!(wait(|| d.rings[TX].take_used(&d.mem).pop()), Some((0, 0)));
    // To the guest: waits for a buffer, then arrives behind a header with num_buffers 1.
    d.port.send(&frame[..60]);
    std::thread::sleep(Duration::from_millis(20));
    assert!(d.rings[RX].take_used(&d.mem).is_empty());
    d.post_rx(0x200000, 2048);
    let (_, len) = wait(|| d.rings[RX].take_used(&d.mem).pop()).expect("delivered");
    assert_eq!(len as usize, HDR_LEN + 60);
    let mut got = vec![0u8; len as usize];
    d.mem.read_slice(&mut got, GuestAddress(0x200000)).unwrap();
    assert_eq!(got[10], 1);
    assert_eq!(&got[HDR_LEN..], &frame[..60]);
    // Oversized frames are never queued for the guest.
    d.port.send(&vec![0u8; 1515]);
    d.post_rx(0x300000, 4096);
    std::thread::sleep(Duration::from_millis(20));
    assert!(d.rings[RX].take_used(&d.mem).is_empty());
    assert!(!d.failure.is_failed());
}

#[test]
fn the_stack_being_slow_holds_the_guest_back() {
    let mut d = driver(1500);
    // More frames than the channel holds: the rest stay in the guest's ring.
    for i in 0..(CHANNEL_FRAMES as u64 + 40) {
        d.transmit(0x100000 + (i % 32) * 0x1000, &[i as u8; 64]);
        if i % 60 == 59 {
            std::thread::sleep(Duration::from_millis(5));
            // The test ring has 64 entries: wait until the device has consumed them.
            wait(|| {
                let u = d.rings[TX].take_used(&d.mem);
                (!u.is_empty()).then_some(())
            });
        }
    }
    std::thread::sleep(Duration::from_millis(50));
    let queued = d.device.ch.to_stack.lock().unwrap().len();
    assert!(queued <= CHANNEL_FRAMES, "{queued}");
    let mut buf = [0u8; 128];
    let mut got = 0;
    while wait(|| d.port.recv(&mut buf)).is_some() {
        got += 1;
        if got == CHANNEL_FRAMES + 40 {
            break;
        }
    }
    assert_eq!(
        got,
        CHANNEL_FRAMES + 40,
        "every frame arrives once there is room"
    );
}

#[test]
fn bad_buffers_are_dropped_or_fail_the_device() {
    let mut d = driver(1500);
    // Shorter than a header, and longer than the MTU: dropped, the device goes on.
    d.mem
        .write_slice(&[0u8; 8], GuestAddress(0x100000))
        .unwrap();
    d.rings[TX].add(&d.mem, &[(0x100000, 8, false)]);
    d.rings[TX].add(&d.mem, &[(0x100000, 4000, false)]);
    d.evts[TX].write(1).unwrap();
    let mut used = 0;
    assert!(wait(|| {
        used += d.rings[TX].take_used(&d.mem).len();
        (used >= 2).then_some(())
    })
    .is_some());
    assert!(!d.failure.is_failed());
    let mut buf = [0u8; 64];
    assert_eq!(d.port.recv(&mut buf), None);
    // A transmit buffer outside guest memory fails the device.
    d.rings[TX].add(&d.mem, &[(MEM_SIZE as u64 - 4, 64, false)]);
    d.evts[TX].write(1).unwrap();
    assert!(wait(|| d.failure.is_failed().then_some(())).is_some());
}

/// An IPv4 TCP frame of `payload` bytes whose TCP checksum field holds only the
/// pseudo-header sum, and the header saying so (and, for `gso`, that it is a segmentation
/// frame).
fn offloaded_frame(payload: usize, gso: bool) -> ([u8; HDR_LEN], Vec<u8>) {
    let tcp_len = 20 + payload;
    let mut f = vec![0u8; 34 + tcp_len];
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&[10, 0, 2, 15]);
    f[30..34].copy_from_slice(&[10, 0, 2, 2]);
    f[46] = 5 << 4;
    for (i, b) in f[54..].iter_mut().enumerate() {
        *b = (i * 13) as u8;
    }
    // Pseudo-header: addresses, protocol, TCP length.
    let mut sum: u32 = [0x0a00u32, 0x020f, 0x0a00, 0x0202, 6, tcp_len as u32]
        .iter()
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[50..52].copy_from_slice(&(sum as u16).to_be_bytes());
    let mut hdr = [0u8; HDR_LEN];
    hdr[0] = 1; // NEEDS_CSUM
    hdr[1] = if gso { 1 } else { 0 }; // TCPV4
    hdr[4..6].copy_from_slice(&1448u16.to_le_bytes());
    hdr[6..8].copy_from_slice(&34u16.to_le_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    (hdr, f)
}

#[test]
fn offloaded_frames_are_taken() {
    let mut d = driver_with(1500, 1 << 32 | F_CSUM | F_HOST_TSO4 | F_HOST_TSO6);
    let mut buf = vec![0u8; MAX_OFFLOAD_FRAME];
    // A small frame with its checksum left partial: taken as it is.
    let (hdr, f) = offloaded_frame(100, false);
    d.transmit_with(0x100000, &hdr, &f);
    let n = wait(|| d.port.recv(&mut buf)).expect("delivered");
    assert_eq!(&buf[..n], &f[..]);
    // A 60 000-byte segment at MTU 1500, its IPv4 length saying one segment's: taken whole,
    // the IP header made to describe all of it.
    let (hdr, mut f) = offloaded_frame(60000, true);
    f[16..18].copy_from_slice(&1500u16.to_be_bytes());
    d.transmit_with(0x200000, &hdr, &f);
    let n = wait(|| d.port.recv(&mut buf)).expect("delivered");
    assert_eq!(n, f.len());
    assert_eq!(u16::from_be_bytes([buf[16], buf[17]]) as usize, n - 14);
    assert_eq!(&buf[34..n], &f[34..]);
    // A header pointing past its frame: dropped, the device goes on.
    let (mut hdr, f) = offloaded_frame(10, false);
    hdr[6..8].copy_from_slice(&5000u16.to_le_bytes());
    d.transmit_with(0x300000, &hdr, &f);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.port.recv(&mut buf), None);
    assert!(!d.failure.is_failed());
}

#[test]
fn large_frames_need_segmentation_negotiated() {
    // The driver took checksum offload but not TSO: nothing over the MTU gets through.
    let mut d = driver_with(1500, 1 << 32 | F_CSUM);
    let (hdr, f) = offloaded_frame(60000, true);
    d.transmit_with(0x100000, &hdr, &f);
    let mut used = 0;
    assert!(wait(|| {
        used += d.rings[TX].take_used(&d.mem).len();
        (used >= 1).then_some(())
    })
    .is_some());
    let mut buf = vec![0u8; MAX_OFFLOAD_FRAME];
    assert_eq!(d.port.recv(&mut buf), None);
    assert!(!d.failure.is_failed());
}

/// Collects `n` used receive entries and reads each buffer (posted at `addrs` by id order).
fn received(d: &mut Driver, n: usize, addr_of: impl Fn(u32) -> u64) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    wait(|| {
        for (id, len) in d.rings[RX].take_used(&d.mem) {
            let mut b = vec![0u8; len as usize];
            d.mem.read_slice(&mut b, GuestAddress(addr_of(id))).unwrap();
            out.push((id, b));
        }
        (out.len() >= n).then_some(())
    })
    .expect("the frame is delivered");
    out
}

#[test]
fn large_segments_spread_over_mergeable_buffers() {
    let mut d = driver_with(1500, 1 << 32 | GUEST_OFFLOADS | F_MRG_RXBUF);
    assert!(d.port.offloads());
    let (mut hdr, f) = offloaded_frame(60000, true);
    hdr[10..12].copy_from_slice(&0u16.to_le_bytes());
    d.port.send_offloaded(&hdr, &f);
    // 60 054 bytes and the header need 15 buffers of 4 KiB: ten are not enough, and none
    // of them is used until the rest come.
    let at = |i: u64| 0x100000 + i * 0x1000;
    for i in 0..10 {
        d.post_rx(at(i), 4096);
    }
    std::thread::sleep(Duration::from_millis(30));
    assert!(d.rings[RX].take_used(&d.mem).is_empty());
    for i in 10..16 {
        d.post_rx(at(i), 4096);
    }
    let got = received(&mut d, 15, |id| at(id as u64));
    assert_eq!(
        got.len(),
        15,
        "one frame, fifteen buffers; the last buffer is left"
    );
    let mut whole = Vec::new();
    for (k, (id, b)) in got.iter().enumerate() {
        assert_eq!(*id as usize, k, "buffers used in the order posted");
        if k < 14 {
            assert_eq!(b.len(), 4096);
        }
        whole.extend_from_slice(b);
    }
    assert_eq!(
        u16::from_le_bytes([whole[10], whole[11]]),
        15,
        "num_buffers"
    );
    assert_eq!(&whole[..10], &hdr[..10], "the header as the stack made it");
    assert_eq!(&whole[HDR_LEN..], &f[..]);
    // The next small frame takes the buffer left over, with num_buffers 1.
    d.port.send(&f[..60]);
    let got = received(&mut d, 1, |id| at(id as u64));
    assert_eq!(got[0].0, 15);
    assert_eq!(u16::from_le_bytes([got[0].1[10], got[0].1[11]]), 1);
    assert_eq!(&got[0].1[HDR_LEN..], &f[..60]);
    // Without segmentation asked, nothing over the MTU is queued.
    d.port
        .send_offloaded(&[1, 0, 0, 0, 0, 0, 34, 0, 16, 0, 0, 0], &f);
    d.post_rx(at(16), 4096);
    std::thread::sleep(Duration::from_millis(30));
    assert!(d.rings[RX].take_used(&d.mem).is_empty());
    assert!(!d.failure.is_failed());
    // A reset ends the offloads until a driver negotiates them again.
    d.device.reset();
    assert!(!d.port.offloads());
}

#[test]
fn without_mergeable_buffers_a_large_segment_takes_one_large_chain() {
    let mut d = driver_with(1500, 1 << 32 | GUEST_OFFLOADS);
    assert!(d.port.offloads());
    let (hdr, f) = offloaded_frame(60000, true);
    // A chain too small for it: the frame is dropped, the chain returned empty.
    d.port.send_offloaded(&hdr, &f);
    d.post_rx(0x100000, 4096);
    let got = received(&mut d, 1, |_| 0x100000);
    assert!(got[0].1.is_empty());
    // A chain of sixteen 4 KiB pages, as Linux posts without mergeable buffers.
    d.port.send_offloaded(&hdr, &f);
    let pages: Vec<(u64, u32, bool)> = (0..16)
        .map(|i| (0x200000 + i * 0x1000, 4096, true))
        .collect();
    d.rings[RX].add(&d.mem, &pages);
    d.evts[RX].write(1).unwrap();
    let (_, len) = wait(|| d.rings[RX].take_used(&d.mem).pop()).expect("delivered");
    assert_eq!(len as usize, HDR_LEN + f.len());
    let mut b = vec![0u8; len as usize];
    d.mem.read_slice(&mut b, GuestAddress(0x200000)).unwrap();
    assert_eq!(u16::from_le_bytes([b[10], b[11]]), 1);
    assert_eq!(&b[HDR_LEN..], &f[..]);
    assert!(!d.failure.is_failed());
}
