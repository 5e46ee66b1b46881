//! virtio-net (device id 1): Ethernet frames between the guest's queues and a [`NetPort`],
//! the bounded frame channel the netstack thread reads and writes, behind the 12-byte
//! `virtio_net_hdr_v1` the driver and we exchange. Offered toward us: checksum offload and
//! TCP segmentation (IPv4 and IPv6), which the netstack honours (`msb_netstack::offload`):
//! it does not check guest checksums, so partial ones are fine, and smoltcp takes 64 KiB
//! segments as they are; the guest's TCP sends 64 KiB per frame at any MTU. Offered toward the
//! guest: partial checksums and TCP segments of up to 64 KiB (`GUEST_CSUM`, `GUEST_TSO4/6`),
//! which the stack sends once all three are negotiated (see `msb_netstack::offload::to_guest`),
//! and mergeable receive buffers, so such a segment is spread over as many of the driver's
//! page-sized buffers as it needs instead of the driver posting 64 KiB chains.
//!
//! Back-pressure: the guest's transmit queue is drained only while the channel to the stack
//! has room; frames for the guest wait (boundedly) for receive buffers, and are dropped past
//! that, as a full link would.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use msb_netstack::offload::{accept, is_segmented, MAX_OFFLOAD_FRAME};
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::worker::{self, DeviceWork, DeviceWorker, WorkerSetup, FIRST_DEVICE_TOKEN};
use super::{check_chain, read_config_bytes, ActivateError, Activation, Queue, VirtioDevice};

/// virtio device id of a network card.
pub const DEVICE_TYPE: u32 = 1;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 256;
/// The header in front of every frame (virtio 1.x: `virtio_net_hdr_v1`), which the netstack
/// reads offloads from.
pub const HDR_LEN: usize = msb_netstack::offload::VNET_HDR_LEN;
/// Default and largest MTU.
pub const DEFAULT_MTU: u16 = 1500;
pub const MAX_MTU: u16 = 65520;
/// Frames waiting in each direction.
const CHANNEL_FRAMES: usize = 512;
/// Bytes waiting for the guest (64 KiB segments would otherwise let 32 MiB pile up).
const TO_GUEST_BYTES: usize = 4 << 20;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_MRG_RXBUF: u64 = 1 << 15;
/// What the stack needs negotiated to send partial checksums and large segments.
const GUEST_OFFLOADS: u64 = F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6;

const RX: usize = 0;
const TX: usize = 1;
const TOKEN_TO_GUEST: u64 = FIRST_DEVICE_TOKEN;
const TOKEN_STACK_ROOM: u64 = FIRST_DEVICE_TOKEN + 1;

/// The channel between the device and the netstack.
#[derive(Debug)]
struct Channel {
    to_stack: Mutex<VecDeque<Vec<u8>>>,
    /// Frames for the guest, each behind its virtio-net header.
    to_guest: Mutex<VecDeque<Vec<u8>>>,
    /// Bytes in `to_guest` (changed under its lock).
    to_guest_bytes: AtomicUsize,
    /// The driver negotiated [`GUEST_OFFLOADS`].
    offload: AtomicBool,
    /// Written when `to_stack` gets a frame (the stack polls it).
    stack_evt: EventFd,
    /// Written when `to_guest` gets a frame.
    guest_evt: EventFd,
    /// Written when the stack took frames from a full `to_stack`.
    room_evt: EventFd,
    mtu: usize,
}

/// The netstack's end of the device: frames from the guest, frames to the guest.
#[derive(Debug, Clone)]
pub struct NetPort {
    ch: Arc<Channel>,
}

impl NetPort {
    /// Polls readable when a frame from the guest may be waiting.
    pub fn raw_fd(&self) -> RawFd {
        self.ch.stack_evt.as_raw_fd()
    }

    /// The next frame from the guest, copied into `buf`; `None` when there is none.
    pub fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        let mut q = self.ch.to_stack.lock().unwrap_or_else(|e| e.into_inner());
        let was_full = q.len() >= CHANNEL_FRAMES;
        let frame = match q.pop_front() {
            Some(f) => f,
            None => {
                // Clear the readiness, then look once more (a frame may have raced in).
                let _ = self.ch.stack_evt.read();
                q.pop_front()?
            }
        };
        drop(q);
        if was_full {
            let _ = self.ch.room_evt.write(1);
        }
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Some(n)
    }

    /// Queues a frame for the guest (dropped when the guest is that far behind, or when it
    /// is larger than the MTU allows).
    pub fn send(&self, frame: &[u8]) {
        self.send_offloaded(&[0; HDR_LEN], frame)
    }

    /// Whether the driver takes partial TCP checksums and 64 KiB TCP segments now.
    pub fn offloads(&self) -> bool {
        self.ch.offload.load(Ordering::Relaxed)
    }

    /// Queues a frame behind header `hdr`, which may ask for the offloads [`NetPort::offloads`]
    /// says the driver takes (a segmentation frame may then be up to 64 KiB).
    pub fn send_offloaded(&self, hdr: &[u8; HDR_LEN], frame: &[u8]) {
        let max = if is_segmented(hdr) {
            MAX_OFFLOAD_FRAME
        } else {
            self.ch.mtu + 14
        };
        if frame.len() > max {
            return;
        }
        let mut q = self.ch.to_guest.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = self.ch.to_guest_bytes.load(Ordering::Relaxed);
        if q.len() >= CHANNEL_FRAMES || bytes + frame.len() > TO_GUEST_BYTES {
            return;
        }
        let mut entry = Vec::with_capacity(HDR_LEN + frame.len());
        entry.extend_from_slice(hdr);
        entry.extend_from_slice(frame);
        // An add, not a store: the worker takes bytes off without holding the lock.
        self.ch
            .to_guest_bytes
            .fetch_add(entry.len(), Ordering::Relaxed);
        q.push_back(entry);
        drop(q);
        let _ = self.ch.guest_evt.write(1);
    }
}

/// A virtio-net device.
pub struct NetDevice {
    mac: [u8; 6],
    ch: Arc<Channel>,
    worker: Option<DeviceWorker<Worker>>,
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice")
            .field("mac", &self.mac)
            .field("mtu", &self.ch.mtu)
            .finish_non_exhaustive()
    }
}

impl NetDevice {
    /// A card with address `mac` and `mtu` (68 to 65520), and the port the stack uses.
    pub fn new(mac: [u8; 6], mtu: u16) -> std::io::Result<(NetDevice, NetPort)> {
        if !(68..=MAX_MTU).contains(&mtu) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("MTU {mtu}: use 68 to {MAX_MTU}"),
            ));
        }
        let ch = Arc::new(Channel {
            to_stack: Mutex::new(VecDeque::new()),
            to_guest: Mutex::new(VecDeque::new()),
            to_guest_bytes: AtomicUsize::new(0),
            offload: AtomicBool::new(false),
            stack_evt: EventFd::new(EFD_NONBLOCK)?,
            guest_evt: EventFd::new(EFD_NONBLOCK)?,
            room_evt: EventFd::new(EFD_NONBLOCK)?,
            mtu: mtu.into(),
        });
        Ok((
            NetDevice {
                mac,
                ch: ch.clone(),
                worker: None,
            },
            NetPort { ch },
        ))
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_MAC | F_MTU | F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | GUEST_OFFLOADS | F_MRG_RXBUF
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status u16, max_virtqueue_pairs u16, mtu u16.
        let mut cfg = [0u8; 12];
        cfg[..6].copy_from_slice(&self.mac);
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&(self.ch.mtu as u16).to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn activate(&mut self, a: Activation, features: u64) -> Result<(), ActivateError> {
        self.worker = None;
        let mut queues = a.queues.into_iter();
        let mut next = |i| {
            queues
                .next()
                .filter(|(q, _)| q.ready())
                .ok_or(ActivateError::BadQueue(i))
        };
        let (rx, rx_evt) = next(RX)?;
        let (tx, tx_evt) = next(TX)?;
        let epoll = worker::new_epoll().map_err(ActivateError::Worker)?;
        for (fd, token) in [
            (self.ch.guest_evt.as_raw_fd(), TOKEN_TO_GUEST),
            (self.ch.room_evt.as_raw_fd(), TOKEN_STACK_ROOM),
        ] {
            worker::watch(&epoll, fd, EventSet::IN, token).map_err(ActivateError::Worker)?;
        }
        self.ch.offload.store(
            features & GUEST_OFFLOADS == GUEST_OFFLOADS,
            Ordering::Relaxed,
        );
        let work = Worker {
            mem: a.mem,
            queues: [rx, tx],
            ch: self.ch.clone(),
            mergeable: features & F_MRG_RXBUF != 0,
            // Larger frames than the MTU only come segmentation-offloaded.
            max_frame: if features & (F_HOST_TSO4 | F_HOST_TSO6) != 0 {
                MAX_OFFLOAD_FRAME
            } else {
                self.ch.mtu + 14
            },
        };
        let setup = WorkerSetup {
            name: "virtio-net".into(),
            kind: msb_confine::ThreadKind::Net,
            seccomp: a.seccomp,
            irq: a.irq,
            failure: a.failure,
            queue_evts: vec![rx_evt, tx_evt],
        };
        self.worker = Some(DeviceWorker::start(setup, epoll, work).map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn worker(&mut self) -> Option<&mut dyn worker::WorkerControl> {
        worker::control(&mut self.worker)
    }

    fn reset(&mut self) {
        self.worker = None;
        self.ch.offload.store(false, Ordering::Relaxed);
        let mut q = self.ch.to_guest.lock().unwrap_or_else(|e| e.into_inner());
        q.clear();
        self.ch.to_guest_bytes.store(0, Ordering::Relaxed);
    }
}

struct Worker {
    mem: GuestMemoryMmap,
    queues: [Queue; 2],
    ch: Arc<Channel>,
    /// `VIRTIO_NET_F_MRG_RXBUF`: a frame may take several receive buffers.
    mergeable: bool,
    /// The largest frame the guest may send, header excluded.
    max_frame: usize,
}

impl DeviceWork for Worker {
    fn event(&mut self, token: u64, _set: EventSet) {
        match token {
            TOKEN_TO_GUEST => drop(self.ch.guest_evt.read()),
            TOKEN_STACK_ROOM => drop(self.ch.room_evt.read()),
            _ => {}
        }
    }

    fn work(&mut self) -> Result<bool, String> {
        Ok(self.transmit()? | self.receive()?)
    }

    fn queues(&self) -> Vec<&Queue> {
        self.queues.iter().collect()
    }
}

impl Worker {
    /// Guest frames to the stack, while the channel has room. Returns whether to interrupt.
    fn transmit(&mut self) -> Result<bool, String> {
        let mem = self.mem.clone();
        let mut used = false;
        let max = self.max_frame + HDR_LEN;
        loop {
            if self
                .ch
                .to_stack
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len()
                >= CHANNEL_FRAMES
            {
                break;
            }
            let chain = match self.queues[TX].iter(&mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(format!("tx queue: {e}")),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            check_chain(&chain, self.queues[TX].size())?;
            let mut reader =
                Reader::new(&mem, chain).map_err(|e| format!("tx descriptors: {e}"))?;
            let n = reader.available_bytes();
            if n < HDR_LEN || n > max {
                // A frame we cannot take: consume it, tell nobody (a link drops such frames).
                tracing::debug!("virtio-net: dropping a {n}-byte transmit buffer");
            } else {
                // Header and frame read apart: no second copy of a 64 KiB segment.
                let mut hdr = [0u8; HDR_LEN];
                let mut frame = vec![0u8; n - HDR_LEN];
                reader
                    .read_exact(&mut hdr)
                    .and_then(|_| reader.read_exact(&mut frame))
                    .map_err(|e| format!("tx frame: {e}"))?;
                // A segmentation frame's IP header made whole (checksums may stay partial:
                // the stack does not check them); a header that points outside its frame
                // drops the frame, as a link would.
                match accept(&hdr, &mut frame) {
                    Ok(()) => {
                        self.ch
                            .to_stack
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push_back(frame);
                        let _ = self.ch.stack_evt.write(1);
                    }
                    Err(e) => tracing::debug!("virtio-net: dropping a frame: {e}"),
                }
            }
            self.queues[TX]
                .add_used(&mem, head, 0)
                .map_err(|e| format!("tx used ring: {e}"))?;
            used = true;
        }
        Ok(used && self.queues[TX].needs_notification(&mem).unwrap_or(true))
    }

    /// Stack frames into the guest's receive buffers. Returns whether to interrupt.
    fn receive(&mut self) -> Result<bool, String> {
        let mem = self.mem.clone();
        let mut used = false;
        loop {
            let mut q = self.ch.to_guest.lock().unwrap_or_else(|e| e.into_inner());
            let Some(mut entry) = q.pop_front() else {
                break;
            };
            drop(q);
            let placed = if self.mergeable {
                self.place_merged(&mem, &mut entry)?
            } else {
                self.place_whole(&mem, &mut entry)?
            };
            if !placed {
                // Not enough buffers: the frame waits for the guest to post more.
                let mut q = self.ch.to_guest.lock().unwrap_or_else(|e| e.into_inner());
                q.push_front(entry);
                break;
            }
            // Lock-free: senders only add under the lock, so the sum stays exact.
            let _ =
                self.ch
                    .to_guest_bytes
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                        Some(b.saturating_sub(entry.len()))
                    });
            used = true;
        }
        Ok(used && self.queues[RX].needs_notification(&mem).unwrap_or(true))
    }

    /// The next receive chain, checked; `None` when the driver has posted none.
    fn next_rx<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Result<Option<(u16, Writer<'m>)>, String> {
        let chain = match self.queues[RX].iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => return Err(format!("rx queue: {e}")),
        };
        let Some(chain) = chain else { return Ok(None) };
        let head = chain.head_index();
        check_chain(&chain, self.queues[RX].size())?;
        let writer = Writer::new(mem, chain).map_err(|e| format!("rx descriptors: {e}"))?;
        Ok(Some((head, writer)))
    }

    /// `entry` (header and frame) into one chain, or dropped (the chain returned empty) when
    /// it does not fit. `false` when the driver has posted no chain.
    fn place_whole(&mut self, mem: &GuestMemoryMmap, entry: &mut [u8]) -> Result<bool, String> {
        let Some((head, mut writer)) = self.next_rx(mem)? else {
            return Ok(false);
        };
        let room = writer.available_bytes();
        let len = if room < entry.len() {
            tracing::debug!(
                "virtio-net: a {}-byte frame does not fit a {room}-byte buffer",
                entry.len() - HDR_LEN
            );
            0
        } else {
            entry[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
            writer
                .write_all(entry)
                .map_err(|e| format!("rx frame: {e}"))?;
            entry.len()
        };
        self.queues[RX]
            .add_used(mem, head, len as u32)
            .map_err(|e| format!("rx used ring: {e}"))?;
        Ok(true)
    }

    /// `entry` spread over as many chains as it takes, the header's `num_buffers` saying how
    /// many; `false` (and no chain taken) while the driver has not posted enough.
    fn place_merged(&mut self, mem: &GuestMemoryMmap, entry: &mut [u8]) -> Result<bool, String> {
        let mut chains = Vec::new();
        let mut room = 0;
        while room < entry.len() {
            let Some((head, writer)) = self.next_rx(mem)? else {
                for _ in 0..chains.len() {
                    self.queues[RX].go_to_previous_position();
                }
                return Ok(false);
            };
            room += writer.available_bytes();
            chains.push((head, writer));
        }
        // At most the queue's size of chains: the ring holds no more.
        let count = chains.len() as u16;
        entry[10..12].copy_from_slice(&count.to_le_bytes());
        let mut at = 0;
        for (head, mut writer) in chains {
            let n = writer.available_bytes().min(entry.len() - at);
            writer
                .write_all(&entry[at..at + n])
                .map_err(|e| format!("rx frame: {e}"))?;
            at += n;
            self.queues[RX]
                .add_used(mem, head, n as u32)
                .map_err(|e| format!("rx used ring: {e}"))?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests;
