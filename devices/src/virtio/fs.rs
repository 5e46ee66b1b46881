//! virtio-fs (device id 26): FUSE requests from the guest's queues, answered by our
//! [`PassthroughFs`]. Each descriptor chain holds one request (readable part) and room for
//! its reply (writable part); both are checked against guest memory and the caps below,
//! and a driver that breaks the virtio rules gets the device failed, not the VMM.

use std::sync::Arc;

use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;

use super::worker::{self, DeviceWork, DeviceWorker, WorkerSetup};
use super::{check_chain, read_config_bytes, ActivateError, Activation, Queue, VirtioDevice};
use crate::fs::abi::{self, InHeader};
use crate::fs::passthrough::{FsState, PassthroughFs, MAX_WRITE};

/// virtio device id of a file system device.
pub const DEVICE_TYPE: u32 = 26;
/// Entries per queue.
pub const QUEUE_SIZE: u16 = 1024;
/// Largest tag (the name the guest mounts), in bytes.
pub const MAX_TAG_LEN: usize = 36;
/// Largest request we read: a header, WRITE's fixed part and MAX_WRITE bytes of data.
const MAX_REQUEST: usize = MAX_WRITE as usize + 4096;

/// A virtio-fs device serving one share under a tag.
pub struct FsDevice {
    tag: String,
    fs: Arc<PassthroughFs>,
    worker: Option<DeviceWorker<Worker>>,
}

impl std::fmt::Debug for FsDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsDevice")
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl FsDevice {
    /// A device the guest mounts with `mount -t virtiofs TAG DIR`.
    pub fn new(tag: &str, fs: Arc<PassthroughFs>) -> Result<FsDevice, String> {
        if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.contains('\0') {
            return Err(format!(
                "virtio-fs tag {tag:?}: use 1 to {MAX_TAG_LEN} bytes"
            ));
        }
        Ok(FsDevice {
            tag: tag.into(),
            fs,
            worker: None,
        })
    }
}

impl VirtioDevice for FsDevice {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        // hiprio (FORGET, INTERRUPT) and one request queue.
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; MAX_TAG_LEN + 4];
        cfg[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        cfg[MAX_TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn activate(&mut self, a: Activation, _features: u64) -> Result<(), ActivateError> {
        self.worker = None;
        let mut queues = a.queues.into_iter();
        let mut next = |i| {
            queues
                .next()
                .filter(|(q, _)| q.ready())
                .ok_or(ActivateError::BadQueue(i))
        };
        let (hiprio, hiprio_evt) = next(0)?;
        let (request, request_evt) = next(1)?;
        let work = Worker {
            mem: a.mem,
            queues: [hiprio, request],
            fs: self.fs.clone(),
            buf: Vec::new(),
        };
        let setup = WorkerSetup {
            name: format!("virtiofs-{}", self.tag),
            kind: msb_confine::ThreadKind::Fs,
            seccomp: a.seccomp,
            irq: a.irq,
            failure: a.failure,
            queue_evts: vec![hiprio_evt, request_evt],
        };
        let epoll = worker::new_epoll().map_err(ActivateError::Worker)?;
        self.worker = Some(DeviceWorker::start(setup, epoll, work).map_err(ActivateError::Worker)?);
        Ok(())
    }

    fn worker(&mut self) -> Option<&mut dyn worker::WorkerControl> {
        worker::control(&mut self.worker)
    }

    fn save_device(&mut self) -> Result<Vec<u8>, String> {
        let state = self.fs.save_state().map_err(|e| e.to_string())?;
        postcard::to_allocvec(&state).map_err(|e| e.to_string())
    }

    fn restore_device(&mut self, saved: &[u8]) -> Result<(), String> {
        let state: FsState =
            postcard::from_bytes(saved).map_err(|e| format!("share {:?}: {e}", self.tag))?;
        let report = self
            .fs
            .restore_state(&state)
            .map_err(|e| format!("share {:?}: {e}", self.tag))?;
        tracing::debug!(tag = %self.tag, ?report, "share state restored");
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

struct Worker {
    mem: GuestMemoryMmap,
    queues: [Queue; 2],
    fs: Arc<PassthroughFs>,
    buf: Vec<u8>,
}

impl DeviceWork for Worker {
    fn work(&mut self) -> Result<bool, String> {
        let mut signal = false;
        for q in 0..2 {
            if self.process(q)? {
                signal |= self.queues[q].needs_notification(&self.mem).unwrap_or(true);
            }
        }
        Ok(signal)
    }

    fn queues(&self) -> Vec<&Queue> {
        self.queues.iter().collect()
    }
}

impl Worker {
    /// Serves every request queued on queue `q`; `Err` when the driver broke the rules.
    fn process(&mut self, q: usize) -> Result<bool, String> {
        let mem = self.mem.clone();
        let mut used = false;
        loop {
            let chain = match self.queues[q].iter(&mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(format!("queue {q}: {e}")),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            check_chain(&chain, self.queues[q].size())?;
            let mut reader = Reader::new(&mem, chain.clone())
                .map_err(|e| format!("request descriptors: {e}"))?;
            let mut writer =
                Writer::new(&mem, chain).map_err(|e| format!("reply descriptors: {e}"))?;
            let len = self.serve(&mut reader, &mut writer)?;
            self.queues[q]
                .add_used(&mem, head, len as u32)
                .map_err(|e| format!("used ring: {e}"))?;
            used = true;
        }
        Ok(used)
    }

    /// One request; returns the bytes written as the reply.
    fn serve(&mut self, reader: &mut Reader<'_>, writer: &mut Writer<'_>) -> Result<usize, String> {
        let n = reader.available_bytes();
        if n < abi::IN_HEADER_LEN {
            return Err(format!(
                "request of {n} bytes is shorter than a FUSE header"
            ));
        }
        if n > MAX_REQUEST {
            // Answer the request (its header tells us which) with EINVAL.
            let mut hdr = [0u8; abi::IN_HEADER_LEN];
            std::io::Read::read_exact(reader, &mut hdr)
                .map_err(|e| format!("request header: {e}"))?;
            let h = InHeader::parse(&mut abi::Reader::new(&hdr)).map_err(|e| e.to_string())?;
            tracing::warn!(
                "virtio-fs: request {} of {n} bytes is over the limit",
                h.unique
            );
            return self.reply(writer, &abi::reply(h.unique, -libc::EINVAL, &[]));
        }
        self.buf.resize(n, 0);
        std::io::Read::read_exact(reader, &mut self.buf).map_err(|e| format!("request: {e}"))?;
        match self.fs.handle(&self.buf) {
            Some(reply) => self.reply(writer, &reply),
            None => Ok(0),
        }
    }

    fn reply(&self, writer: &mut Writer<'_>, reply: &[u8]) -> Result<usize, String> {
        let room = writer.available_bytes();
        if reply.len() <= room {
            std::io::Write::write_all(writer, reply).map_err(|e| format!("reply: {e}"))?;
            return Ok(reply.len());
        }
        if room < abi::OUT_HEADER_LEN {
            return Err(format!(
                "reply buffer of {room} bytes cannot hold a FUSE header"
            ));
        }
        // The driver gave too little room for the answer: tell it, do not truncate data.
        let unique = u64::from_le_bytes(reply[8..16].try_into().expect("16-byte header"));
        let err = abi::reply(unique, -libc::EIO, &[]);
        tracing::warn!(
            "virtio-fs: reply of {} bytes does not fit in {room}",
            reply.len()
        );
        std::io::Write::write_all(writer, &err).map_err(|e| format!("reply: {e}"))?;
        Ok(err.len())
    }
}

#[cfg(test)]
mod tests {
    //! The device against a scripted driver: requests through the queue, and drivers that
    //! break the rules.

    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::fs::abi::{op, Writer};
    use crate::fs::passthrough::Config;
    use crate::virtio::testing::{Rig, Ring};
    use crate::virtio::DeviceFailure;
    use vmm_sys_util::eventfd::EventFd;

    const MEM_SIZE: usize = 8 << 20;

    struct Driver {
        mem: GuestMemoryMmap,
        rings: Vec<Ring>,
        evts: Vec<Arc<EventFd>>,
        failure: Arc<DeviceFailure>,
        _device: FsDevice,
        share: std::path::PathBuf,
        unique: u64,
    }

    impl Drop for Driver {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.share);
        }
    }

    impl Driver {
        fn new(tag: &str) -> Driver {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let share = std::env::temp_dir().join(format!(
                "msb-virtiofs-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&share).unwrap();
            std::fs::write(share.join("hello"), b"hello from the host").unwrap();
            let fs = Arc::new(PassthroughFs::new(&share, Config::default()).unwrap());
            let mut device = FsDevice::new(tag, fs).unwrap();
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
            let rig = Rig::new(&[0x10000, 0x30000], 64);
            device.activate(rig.activation(&mem), 1 << 32).unwrap();
            let mut d = Driver {
                mem,
                rings: rig.rings,
                evts: rig.evts,
                failure: rig.failure,
                _device: device,
                share,
                unique: 1,
            };
            let mut w = Writer::default();
            w.u32(7).u32(41).u32(65536).u32(0);
            assert_eq!(d.call(op::INIT, 0, &w.buf, 4096).0, 0);
            d
        }

        /// Sends one request (request and reply in their own descriptors) and waits for it.
        fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8], room: u32) -> (i32, Vec<u8>) {
            self.unique += 1;
            let h = InHeader {
                len: (abi::IN_HEADER_LEN + body.len()) as u32,
                opcode,
                unique: self.unique,
                nodeid,
                ..Default::default()
            };
            let mut req = h.encode().to_vec();
            req.extend_from_slice(body);
            let (req_at, reply_at) = (0x100000u64, 0x400000u64);
            self.mem.write_slice(&req, GuestAddress(req_at)).unwrap();
            self.rings[1].add(
                &self.mem,
                &[(req_at, req.len() as u32, false), (reply_at, room, true)],
            );
            self.evts[1].write(1).unwrap();
            let (_, len) = self.wait_used(1).expect("the device answers");
            let mut reply = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut reply, GuestAddress(reply_at))
                .unwrap();
            assert!(reply.len() >= abi::OUT_HEADER_LEN, "{reply:?}");
            let err = i32::from_le_bytes(reply[4..8].try_into().unwrap());
            (-err, reply[abi::OUT_HEADER_LEN..].to_vec())
        }

        fn wait_used(&mut self, q: usize) -> Option<(u32, u32)> {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(u) = self.rings[q].take_used(&self.mem).pop() {
                    return Some(u);
                }
                if self.failure.is_failed() || Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }

        fn wait_failed(&self) -> bool {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if self.failure.is_failed() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            false
        }
    }

    #[test]
    fn config_space_carries_the_tag() {
        let d = Driver::new("vol0");
        let mut cfg = [0u8; 40];
        d._device.read_config(0, &mut cfg);
        assert_eq!(&cfg[..5], b"vol0\0");
        assert_eq!(u32::from_le_bytes(cfg[36..40].try_into().unwrap()), 1);
        assert!(FsDevice::new("", d._device.fs.clone()).is_err());
        assert!(FsDevice::new(&"x".repeat(37), d._device.fs.clone()).is_err());
    }

    #[test]
    fn requests_flow_through_the_queue() {
        let mut d = Driver::new("vol0");
        let (e, entry) = d.call(op::LOOKUP, 1, b"hello\0", 4096);
        assert_eq!(e, 0);
        let node = u64::from_le_bytes(entry[..8].try_into().unwrap());
        let mut w = Writer::default();
        w.u32(0).u32(0);
        let (e, open) = d.call(op::OPEN, node, &w.buf, 4096);
        assert_eq!(e, 0);
        let fh = u64::from_le_bytes(open[..8].try_into().unwrap());
        let mut w = Writer::default();
        w.u64(fh).u64(0).u32(100).u32(0).u64(0).u32(0).u32(0);
        assert_eq!(
            d.call(op::READ, node, &w.buf, 4096),
            (0, b"hello from the host".to_vec())
        );
        // A reply buffer too small for the data: an error reply, not truncated data.
        let (e, _) = d.call(op::READ, node, &w.buf, 20);
        assert_eq!(e, libc::EIO);
        assert!(!d.failure.is_failed());
    }

    #[test]
    fn a_request_shorter_than_a_header_fails_the_device() {
        let mut d = Driver::new("vol0");
        d.rings[1].add(&d.mem, &[(0x100000, 8, false), (0x400000, 4096, true)]);
        d.evts[1].write(1).unwrap();
        assert!(d.wait_failed());
    }

    #[test]
    fn a_reply_buffer_without_room_for_a_header_fails_the_device() {
        let mut d = Driver::new("vol0");
        let h = InHeader {
            len: 40,
            opcode: op::GETATTR,
            unique: 99,
            nodeid: 1,
            ..Default::default()
        };
        d.mem
            .write_slice(&h.encode(), GuestAddress(0x100000))
            .unwrap();
        d.rings[1].add(&d.mem, &[(0x100000, 40, false), (0x400000, 8, true)]);
        d.evts[1].write(1).unwrap();
        assert!(d.wait_failed());
    }

    #[test]
    fn descriptors_outside_memory_fail_the_device() {
        let mut d = Driver::new("vol0");
        d.rings[1].add(
            &d.mem,
            &[(MEM_SIZE as u64 - 16, 64, false), (0x400000, 4096, true)],
        );
        d.evts[1].write(1).unwrap();
        assert!(d.wait_failed());
    }

    #[test]
    fn an_oversized_request_gets_einval() {
        let mut d = Driver::new("vol0");
        let h = InHeader {
            len: 40,
            opcode: op::GETATTR,
            unique: 77,
            nodeid: 1,
            ..Default::default()
        };
        d.mem
            .write_slice(&h.encode(), GuestAddress(0x100000))
            .unwrap();
        // Header plus 2 MiB of "body" spread over descriptors.
        d.rings[1].add(
            &d.mem,
            &[
                (0x100000, 40, false),
                (0x200000, 2 << 20, false),
                (0x600000, 4096, true),
            ],
        );
        d.evts[1].write(1).unwrap();
        let (_, len) = d.wait_used(1).expect("answered");
        let mut reply = vec![0u8; len as usize];
        d.mem
            .read_slice(&mut reply, GuestAddress(0x600000))
            .unwrap();
        assert_eq!(
            i32::from_le_bytes(reply[4..8].try_into().unwrap()),
            -libc::EINVAL
        );
        assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), 77);
        assert!(!d.failure.is_failed());
    }
}
