//! The vsock device against a scripted guest driver: split rings laid out in test memory, the
//! test playing the guest (posting buffers, sending packets, notifying).

use std::io::{Read, Write};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::virtio::Activation;

const MEM_SIZE: usize = 16 << 20;
const RING_BASES: [u64; 3] = [0x10000, 0x20000, 0x30000];
const RX_BUFS: u64 = 0x100000;
const TX_BUFS: u64 = 0x400000;
const BUF_SIZE: u32 = 4096 + HDR_LEN as u32;

use crate::virtio::testing::{Line, Rig, Ring};

struct Guest {
    mem: GuestMemoryMmap,
    rings: Vec<Ring>,
    evts: Vec<Arc<EventFd>>,
    failure: Arc<DeviceFailure>,
    host: VsockHost,
    _device: VsockDevice,
    /// rx buffer address by descriptor id.
    rx_bufs: HashMap<u32, u64>,
    tx_slot: u64,
    received: VecDeque<(Header, Vec<u8>)>,
}

fn hdr(op: Op, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
}

impl Guest {
    fn new() -> Guest {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let (mut device, host) = VsockDevice::new().unwrap();
        let rig = Rig::new(&RING_BASES, QUEUE_SIZE);
        device.activate(rig.activation(&mem), 1 << 32).unwrap();
        let mut g = Guest {
            mem,
            rings: rig.rings,
            evts: rig.evts,
            failure: rig.failure,
            host,
            _device: device,
            rx_bufs: HashMap::new(),
            tx_slot: 0,
            received: VecDeque::new(),
        };
        g.post_rx(64);
        g
    }

    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let id = u32::from(self.rings[0].next_desc);
            let addr = RX_BUFS + u64::from(id) * u64::from(BUF_SIZE);
            self.rings[0].add(&self.mem, &[(addr, BUF_SIZE, true)]);
            self.rx_bufs.insert(id, addr);
        }
        self.evts[0].write(1).unwrap();
    }

    /// Sends a packet (header and payload in separate descriptors, as Linux does).
    fn send(&mut self, h: Header, payload: &[u8]) {
        let slot = TX_BUFS + (self.tx_slot % 64) * 0x11000;
        self.tx_slot += 1;
        self.mem
            .write_slice(&h.encode(), GuestAddress(slot))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(slot + 0x100))
            .unwrap();
        let mut descs = vec![(slot, HDR_LEN as u32, false)];
        if !payload.is_empty() {
            descs.push((slot + 0x100, payload.len() as u32, false));
        }
        self.rings[1].add(&self.mem, &descs);
        self.evts[1].write(1).unwrap();
    }

    /// Sends raw descriptors (hostile tests).
    fn send_raw(&mut self, descs: &[(u64, u32, bool)]) {
        self.rings[1].add(&self.mem, descs);
        self.evts[1].write(1).unwrap();
    }

    /// Waits for the next packet from the device.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.try_recv(Duration::from_secs(5))
            .expect("no packet from the device")
    }

    /// The next packet from the device, if one comes within `timeout`.
    fn try_recv(&mut self, timeout: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.received.pop_front() {
                return Some(p);
            }
            for (id, len) in self.rings[0].take_used(&self.mem) {
                let addr = self.rx_bufs[&id];
                let mut raw = vec![0u8; len as usize];
                self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
                let h = parse_from_host(&raw[..HDR_LEN]);
                self.received.push_back((h, raw[HDR_LEN..].to_vec()));
                self.post_rx(1);
            }
            if self.received.is_empty() && Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn recv_op(&mut self, op: Op) -> (Header, Vec<u8>) {
        loop {
            let (h, d) = self.recv();
            if h.op == op {
                return (h, d);
            }
            assert!(
                matches!(h.op, Op::CreditUpdate),
                "expected {op:?}, got {h:?}"
            );
        }
    }

    /// Opens a host-initiated connection to guest `port`; returns (stream, host port).
    fn accept_from_host(&mut self, port: u32) -> (UnixStream, u32) {
        let host = self.host.clone();
        let t = std::thread::spawn(move || host.connect(port, Duration::from_secs(5)));
        let (req, _) = self.recv_op(Op::Request);
        assert_eq!(
            (req.src_cid, req.dst_cid, req.dst_port, req.buf_alloc),
            (HOST_CID, GUEST_CID, port, BUF_ALLOC)
        );
        self.send(hdr(Op::Response, port, req.src_port, 0), &[]);
        (t.join().unwrap().expect("connected"), req.src_port)
    }
}

/// Headers from the device have src = host; parse them without the guest-side checks.
fn parse_from_host(b: &[u8]) -> Header {
    let mut swapped = b.to_vec();
    // Swap the CIDs so Header::parse's direction checks pass.
    swapped[0..8].copy_from_slice(&b[8..16]);
    swapped[8..16].copy_from_slice(&b[0..8]);
    let mut h = Header::parse(
        &swapped,
        usize::MAX,
        u64::from_le_bytes(b[8..16].try_into().unwrap()),
    )
    .unwrap();
    std::mem::swap(&mut h.src_cid, &mut h.dst_cid);
    h
}

#[test]
fn host_connects_and_bytes_flow_both_ways() {
    let mut g = Guest::new();
    let (mut s, local) = g.accept_from_host(1024);
    s.write_all(b"hello").unwrap();
    let (h, d) = g.recv_op(Op::Rw);
    assert_eq!(
        (h.src_port, h.dst_port, d.as_slice()),
        (local, 1024, b"hello".as_slice())
    );
    g.send(hdr(Op::Rw, 1024, local, 5), b"world");
    let mut buf = [0u8; 5];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"world");
    // The guest closes: the host reads the end of the stream.
    let mut shut = hdr(Op::Shutdown, 1024, local, 0);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(shut, &[]);
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(!g.failure.is_failed());
}

#[test]
fn refused_connections() {
    let mut g = Guest::new();
    let host = g.host.clone();
    let t = std::thread::spawn(move || host.connect(7, Duration::from_secs(5)));
    let (req, _) = g.recv_op(Op::Request);
    g.send(hdr(Op::Rst, 7, req.src_port, 0), &[]);
    assert_eq!(
        t.join().unwrap().unwrap_err().kind(),
        io::ErrorKind::ConnectionRefused
    );
    // Guest → host with nobody listening: RST.
    g.send(hdr(Op::Request, 5000, 99, 0), &[]);
    let (h, _) = g.recv_op(Op::Rst);
    assert_eq!((h.src_port, h.dst_port), (99, 5000));
}

#[test]
fn guest_connects_to_a_host_listener() {
    let mut g = Guest::new();
    let l = g.host.listen(5000, 4).unwrap();
    g.send(hdr(Op::Request, 6000, 5000, 0), &[]);
    let (h, _) = g.recv_op(Op::Response);
    assert_eq!((h.src_port, h.dst_port), (5000, 6000));
    let mut s = l.accept(Duration::from_secs(5)).unwrap();
    g.send(hdr(Op::Rw, 6000, 5000, 3), b"abc");
    let mut buf = [0u8; 3];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"abc");
    assert!(g.host.listen(5000, 1).is_err(), "one listener per port");
}

#[test]
fn data_beyond_our_credit_resets_the_connection() {
    let mut g = Guest::new();
    let (s, local) = g.accept_from_host(1024);
    // The host never reads; a guest ignoring the credit updates it gets (what the host's socket
    // buffer took) fills our advertised buffer and then gets reset, long before 4 MiB.
    let chunk = vec![7u8; 65536];
    let mut reset = false;
    for _ in 0..64 {
        g.send(hdr(Op::Rw, 1024, local, chunk.len() as u32), &chunk);
        while let Some((h, _)) = g.try_recv(Duration::from_millis(5)) {
            if h.op == Op::Rst {
                assert_eq!(h.dst_port, 1024);
                reset = true;
            }
        }
        if reset {
            break;
        }
    }
    assert!(
        reset,
        "4 MiB beyond the credit did not reset the connection"
    );
    drop(s);
    assert!(
        !g.failure.is_failed(),
        "a connection-level violation does not fail the device"
    );
}

#[test]
fn host_output_respects_the_guests_credit() {
    let mut g = Guest::new();
    let (mut s, local) = g.accept_from_host(1024);
    // The guest advertised 65536 bytes and forwards nothing: no more than that arrives.
    s.write_all(&vec![1u8; 200_000]).unwrap();
    let mut got = 0usize;
    while let Some((h, d)) = g.try_recv(Duration::from_millis(300)) {
        if h.op == Op::Rw {
            got += d.len();
        }
    }
    assert_eq!(got, 65536);
    // Granting credit lets the rest through.
    let mut upd = hdr(Op::CreditUpdate, 1024, local, 0);
    upd.buf_alloc = 1 << 20;
    upd.fwd_cnt = 65536;
    g.send(upd, &[]);
    while got < 200_000 {
        let (h, d) = g.recv();
        if h.op == Op::Rw {
            got += d.len();
        }
    }
    assert_eq!(got, 200_000);
}

#[test]
fn bad_headers_reset_or_drop_without_failing() {
    let mut g = Guest::new();
    let mut h = hdr(Op::Rw, 1, 2, 0);
    h.type_ = 2;
    g.send(h, &[]);
    let (r, _) = g.recv_op(Op::Rst);
    assert_eq!((r.src_port, r.dst_port), (2, 1));
    // A packet for a connection that does not exist.
    g.send(hdr(Op::Rw, 3, 4, 1), &[1]);
    g.recv_op(Op::Rst);
    // Claimed length longer than the chain.
    g.send(hdr(Op::Rw, 5, 6, 100), &[1; 10]);
    g.recv_op(Op::Rst);
    assert!(!g.failure.is_failed());
}

#[test]
fn broken_descriptor_chains_fail_the_device() {
    for descs in [
        // Address outside guest memory.
        vec![(0xffff_0000_0000u64, HDR_LEN as u32, false)],
        // Shorter than a header.
        vec![(TX_BUFS, 10, false)],
        // A device-writable buffer on the tx queue holds no header to read.
        vec![(TX_BUFS, HDR_LEN as u32, true)],
    ] {
        let mut g = Guest::new();
        g.send_raw(&descs);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !g.failure.is_failed() {
            assert!(
                Instant::now() < deadline,
                "device did not fail for {descs:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // The host API still answers, with an error, instead of hanging.
        let host = g.host.clone();
        assert!(host.connect(1024, Duration::from_millis(200)).is_err());
    }
}

#[test]
fn descriptor_loop_fails_the_device() {
    let mut g = Guest::new();
    // Two descriptors pointing at each other.
    let r = &mut g.rings[1];
    let (a, b) = (r.next_desc, r.next_desc + 1);
    for (i, next) in [(a, b), (b, a)] {
        g.mem.write_obj(TX_BUFS, GuestAddress(r.desc(i))).unwrap();
        g.mem
            .write_obj(HDR_LEN as u32, GuestAddress(r.desc(i) + 8))
            .unwrap();
        g.mem.write_obj(1u16, GuestAddress(r.desc(i) + 12)).unwrap();
        g.mem.write_obj(next, GuestAddress(r.desc(i) + 14)).unwrap();
    }
    let slot = r.avail() + 4 + 2 * u64::from(r.avail_idx % r.size);
    g.mem.write_obj(a, GuestAddress(slot)).unwrap();
    r.avail_idx += 1;
    g.mem
        .write_obj(r.avail_idx, GuestAddress(r.avail() + 2))
        .unwrap();
    g.evts[1].write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !g.failure.is_failed() {
        assert!(
            Instant::now() < deadline,
            "a descriptor loop went unnoticed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn connection_flood_is_bounded() {
    let mut g = Guest::new();
    let l = g.host.listen(5000, MAX_CONNS + 64).unwrap();
    let mut responses = 0;
    let mut resets = 0;
    for p in 0..(MAX_CONNS as u32 + 40) {
        g.send(hdr(Op::Request, 10_000 + p, 5000, 0), &[]);
        // Keep the tx ring from overflowing: consume replies as we go.
        if p % 32 == 31 {
            while let Some((h, _)) = g.received.pop_front() {
                match h.op {
                    Op::Response => responses += 1,
                    Op::Rst => resets += 1,
                    _ => {}
                }
            }
            for _ in 0..32 {
                let (h, _) = g.recv();
                match h.op {
                    Op::Response => responses += 1,
                    Op::Rst => resets += 1,
                    _ => {}
                }
            }
        }
    }
    while responses + resets < MAX_CONNS + 40 {
        let (h, _) = g.recv();
        match h.op {
            Op::Response => responses += 1,
            Op::Rst => resets += 1,
            _ => {}
        }
    }
    assert_eq!(responses, MAX_CONNS);
    assert_eq!(resets, 40);
    drop(l);
    assert!(!g.failure.is_failed());
}

#[test]
fn a_restored_device_resets_the_connections_of_before_and_takes_new_ones() {
    let mut g = Guest::new();
    let (_s, old_local) = g.accept_from_host(1024);
    let w = g._device.worker().expect("an active device has a worker");
    w.quiesce().unwrap();
    let states = w.queue_states().expect("quiesced");
    assert!(states[0].next_used > 0, "the REQUEST went out on rx");
    let saved = g._device.save_device().unwrap();

    // The snapshot restored in a new VMM: a new device on the same guest memory and rings.
    let (mut device, host) = VsockDevice::new().unwrap();
    device.restore_device(&saved).unwrap();
    let queues = states
        .iter()
        .map(|s| Queue::try_from(*s).unwrap())
        .chain(std::iter::once(g.rings[2].queue()))
        .zip(g.evts.iter().cloned())
        .collect();
    g._device = device; // the old one stops here
    g.host = host;
    g._device
        .activate(
            Activation {
                mem: g.mem.clone(),
                irq: IrqStatus::new(Arc::new(Line::default())),
                queues,
                failure: g.failure.clone(),
                seccomp: msb_confine::Seccomp::Enforce,
            },
            1 << 32,
        )
        .unwrap();
    // The guest learns that the old connection is gone...
    let (h, _) = g.recv_op(Op::Rst);
    assert_eq!((h.src_port, h.dst_port), (old_local, 1024));
    // ...and the host connects anew, from a port the guest has not seen.
    let (mut s, local) = g.accept_from_host(1024);
    assert!(local > old_local);
    s.write_all(b"again").unwrap();
    let (h, d) = g.recv_op(Op::Rw);
    assert_eq!((h.src_port, d.as_slice()), (local, b"again".as_slice()));
    assert!(!g.failure.is_failed());

    // Saved state that is not a vsock device's is refused.
    let (mut other, _) = VsockDevice::new().unwrap();
    assert!(other.restore_device(&[0xff; 3]).is_err());
}
