//! A scripted guest driver's split rings, shared by the device tests.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Activation, DeviceFailure, IrqStatus, Queue};

/// An interrupt line that counts its triggers.
#[derive(Debug, Default)]
pub struct Line(AtomicUsize);

impl Line {
    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl crate::Interrupt for Line {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// The driver's view of one split ring.
pub struct Ring {
    pub base: u64,
    pub size: u16,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub used_seen: u16,
}

/// A driver's rings, the eventfds its notifications arrive on, and the device's failure flag:
/// what activating a device takes.
pub struct Rig {
    pub rings: Vec<Ring>,
    pub evts: Vec<Arc<EventFd>>,
    pub failure: Arc<DeviceFailure>,
}

impl Rig {
    /// One empty ring of `size` entries at each of `bases`.
    pub fn new(bases: &[u64], size: u16) -> Rig {
        Rig {
            rings: bases.iter().map(|&b| Ring::new(b, size)).collect(),
            evts: bases
                .iter()
                .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
                .collect(),
            failure: Arc::new(DeviceFailure::default()),
        }
    }

    /// The activation of a device over these rings, with a counting interrupt line.
    pub fn activation(&self, mem: &GuestMemoryMmap) -> Activation {
        Activation {
            mem: mem.clone(),
            irq: IrqStatus::new(Arc::new(Line::default())),
            queues: self
                .rings
                .iter()
                .map(|r| r.queue())
                .zip(self.evts.iter().cloned())
                .collect(),
            failure: self.failure.clone(),
            seccomp: msb_confine::Seccomp::Enforce,
        }
    }
}

impl Ring {
    pub fn new(base: u64, size: u16) -> Ring {
        Ring {
            base,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    pub fn desc(&self, i: u16) -> u64 {
        self.base + 16 * u64::from(i)
    }
    pub fn avail(&self) -> u64 {
        self.base + 16 * u64::from(self.size)
    }
    pub fn used(&self) -> u64 {
        (self.avail() + 6 + 2 * u64::from(self.size)).next_multiple_of(4)
    }

    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.base as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail() as u32), Some(0));
        q.set_used_ring_address(Some(self.used() as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Publishes a chain of (address, length, device-writable) descriptors.
    pub fn add(&mut self, mem: &GuestMemoryMmap, descs: &[(u64, u32, bool)]) {
        let head = self.next_desc;
        for (k, &(addr, len, write)) in descs.iter().enumerate() {
            let i = (head + k as u16) % self.size;
            let last = k + 1 == descs.len();
            let flags: u16 = if last { 0 } else { 1 } | if write { 2 } else { 0 };
            let next = (i + 1) % self.size;
            mem.write_obj(addr, GuestAddress(self.desc(i))).unwrap();
            mem.write_obj(len, GuestAddress(self.desc(i) + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(self.desc(i) + 12))
                .unwrap();
            mem.write_obj(
                if last { 0u16 } else { next },
                GuestAddress(self.desc(i) + 14),
            )
            .unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        let slot = self.avail() + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail() + 2))
            .unwrap();
    }

    /// New used entries: (descriptor id, length).
    pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used() + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self.used() + 4 + 8 * u64::from(self.used_seen % self.size);
            out.push((
                mem.read_obj(GuestAddress(e)).unwrap(),
                mem.read_obj(GuestAddress(e + 4)).unwrap(),
            ));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}
