//! FUSE over io_uring (Linux 6.14+) for the `/dev/fuse` transport: one queue per CPU, served
//! by a thread pinned to that CPU. The kernel puts a request on the queue of the CPU its
//! caller runs on, so the server thread that answers it shares that CPU: handing a request
//! over and back is two context switches on one run queue, with no cross-CPU wakeup (which
//! on virtualized hosts costs several times the request itself). Big READs are the
//! exception: a thread serving one lets go of its CPU (see [`Queue::serve`]). Each queue
//! has [`THREADS_PER_QUEUE`] threads, so one waiting for the disk does not hold up the next
//! request.
//!
//! Each queue entry is a header buffer (`struct fuse_uring_req_header`: the in/out header,
//! the opcode's fixed argument, and the entry's own in/out words) and a payload buffer. We
//! rebuild the classic request layout from them, so [`PassthroughFs::handle`] serves both
//! transports unchanged. FORGET and INTERRUPT still come through `read` on `/dev/fuse`.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, EnterFlags, IoUring};

use super::abi;
use super::passthrough::{PassthroughFs, MAX_WRITE};

/// Where the kernel says whether io_uring may carry FUSE requests.
pub const ENABLE_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// `FUSE_IO_URING_CMD_REGISTER`: hand the kernel an entry's buffers, wait for a request.
const CMD_REGISTER: u32 = 1;
/// `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`: answer the entry's request, wait for the next.
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_uring_req_header`: in/out header (128), opcode argument (128), entry words.
const IN_OUT: usize = 0;
const OP_IN: usize = 128;
const OP_IN_LEN: usize = 128;
const ENT_IN_OUT: usize = 256;
const HEADER_LEN: usize = 256 + 32;
/// Payload room: the kernel wants at least max(max_write, max_pages pages), and our largest
/// reply (READ, READDIR) is MAX_WRITE.
const PAYLOAD_LEN: usize = MAX_WRITE as usize;

/// Entries per thread. One: the kernel hands a request to an idle entry, so with one entry
/// per thread a request never waits behind a busy thread while another thread idles (with
/// two, read-ahead's second READ sat in the entry of the thread still reading the first).
const DEPTH: usize = 1;

/// Threads serving each CPU's queue, all pinned to that CPU: while one reads from the disk,
/// another takes the next request. Measured with `msb-bench fs` here: sequential reads
/// 820-900 MB/s with one thread of two entries, 1 220-1 290 MB/s with two of one; three
/// did no better.
pub const THREADS_PER_QUEUE: usize = 2;

/// Errors starting the queues.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    #[error(
        "FUSE over io_uring is disabled here: as root, `echo Y > {ENABLE_PARAM}` (Linux 6.14+)"
    )]
    Disabled,
    #[error("setting up io_uring: {0}")]
    Setup(io::Error),
    #[error("registering FUSE queue {qid} with the kernel: {source}")]
    Register { qid: u16, source: io::Error },
}

/// Whether this kernel lets io_uring carry FUSE requests.
pub fn enabled() -> bool {
    std::fs::read_to_string(ENABLE_PARAM).is_ok_and(|s| s.trim() == "Y")
}

/// Lets io_uring carry FUSE requests on this kernel, if it does not yet (root only; the
/// switch changes nothing for connections that do not ask for it).
pub fn enable() -> io::Result<()> {
    if enabled() {
        return Ok(());
    }
    std::fs::write(ENABLE_PARAM, "Y")
        .map_err(|e| io::Error::new(e.kind(), format!("turning on {ENABLE_PARAM}: {e}")))
}

/// CPUs the kernel makes queues for (`num_possible_cpus`).
pub fn possible_cpus() -> usize {
    let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/possible") else {
        return std::thread::available_parallelism().map_or(1, |n| n.get());
    };
    // "0-1", "0", "0-3,5": the kernel numbers queues 0..count.
    s.trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap_or(0) + 1 - a.parse::<usize>().unwrap_or(0),
            None => 1,
        })
        .sum::<usize>()
        .max(1)
}

/// One queue entry's buffers. Boxed so their addresses stay put while the kernel holds them.
struct Entry {
    header: Box<[u8; HEADER_LEN]>,
    payload: Vec<u8>,
    iov: Box<[libc::iovec; 2]>,
}

impl Entry {
    fn new() -> Entry {
        let mut header = Box::new([0u8; HEADER_LEN]);
        let mut payload = vec![0u8; PAYLOAD_LEN];
        let iov = Box::new([
            libc::iovec {
                iov_base: header.as_mut_ptr().cast(),
                iov_len: HEADER_LEN,
            },
            libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: PAYLOAD_LEN,
            },
        ]);
        Entry {
            header,
            payload,
            iov,
        }
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.header[at..at + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.header[at..at + 8].try_into().expect("8 bytes"))
    }

    /// The request in the classic layout (header, fixed argument, the rest), or why not.
    fn request(&self) -> Result<Vec<u8>, String> {
        let len = self.u32_at(IN_OUT) as usize;
        let payload = self.u32_at(ENT_IN_OUT + 16) as usize;
        if payload > self.payload.len() {
            return Err(format!("payload of {payload} bytes"));
        }
        // The header's length covers all arguments; what the payload does not hold is the
        // opcode's fixed argument, in OP_IN.
        let op_len = len
            .checked_sub(abi::IN_HEADER_LEN + payload)
            .filter(|&n| n <= OP_IN_LEN)
            .ok_or_else(|| format!("length {len} with a payload of {payload}"))?;
        let mut req = Vec::with_capacity(len);
        req.extend_from_slice(&self.header[IN_OUT..IN_OUT + abi::IN_HEADER_LEN]);
        req.extend_from_slice(&self.header[OP_IN..OP_IN + op_len]);
        req.extend_from_slice(&self.payload[..payload]);
        Ok(req)
    }

    /// Puts a classic reply (out header, body) in place; false if it does not fit.
    fn set_reply(&mut self, reply: &[u8]) -> bool {
        let body = &reply[abi::OUT_HEADER_LEN.min(reply.len())..];
        if reply.len() < abi::OUT_HEADER_LEN || body.len() > self.payload.len() {
            return false;
        }
        self.payload[..body.len()].copy_from_slice(body);
        self.set_out(&reply[..abi::OUT_HEADER_LEN], body.len());
        true
    }

    /// Sets the reply's out header and how many payload bytes follow it.
    fn set_out(&mut self, head: &[u8], payload_len: usize) {
        self.header[IN_OUT..IN_OUT + abi::OUT_HEADER_LEN].copy_from_slice(head);
        self.header[ENT_IN_OUT + 16..ENT_IN_OUT + 20]
            .copy_from_slice(&(payload_len as u32).to_le_bytes());
    }

    /// Whether the entry holds a READ of at least [`BIG_READ`] bytes.
    fn is_big_read(&self) -> bool {
        // fuse_read_in: fh, offset, size.
        self.u32_at(IN_OUT + 4) == abi::op::READ && self.u32_at(OP_IN + 16) >= BIG_READ
    }

    /// Answers the entry's request (the payload holds the request's data, if any).
    fn answer(&mut self, fs: &PassthroughFs, qid: u16) {
        let unique = self.u64_at(IN_OUT + 8);
        let req = match self.request() {
            Ok(req) => req,
            Err(why) => {
                tracing::warn!("fuse: queue {qid}: bad ring entry: {why}");
                self.set_reply(&abi::reply(unique, -libc::EIO, &[]));
                return;
            }
        };
        // READ data goes straight into the payload buffer, which the kernel copies from.
        if let Some(r) = fs.read_into(&req, &mut self.payload) {
            let (head, n) = r.out_header();
            self.set_out(&head, n);
            return;
        }
        let reply = fs
            .handle(&req)
            .unwrap_or_else(|| abi::reply(unique, -libc::EIO, &[]));
        if !self.set_reply(&reply) {
            self.set_reply(&abi::reply(unique, -libc::EIO, &[]));
        }
    }
}

/// `struct fuse_uring_cmd_req` in the SQE's command area.
fn cmd(qid: u16, commit_id: u64) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_le_bytes());
    c[16..18].copy_from_slice(&qid.to_le_bytes());
    c
}

fn register_sqe(dev: &File, qid: u16, idx: usize, e: &Entry) -> squeue::Entry128 {
    let mut sqe = opcode::UringCmd80::new(types::Fd(dev.as_raw_fd()), CMD_REGISTER)
        .cmd(cmd(qid, 0))
        .addr(Some(e.iov.as_ptr() as u64))
        .build()
        .user_data(idx as u64);
    // The iovec count goes in the SQE's `len` (offset 24), which the builder does not set.
    let at = (&mut sqe as *mut squeue::Entry128).cast::<u8>();
    // SAFETY: Entry128 is repr(C), a 64-byte io_uring_sqe first; `len` is its u32 at 24.
    let len = unsafe { at.add(24) }.cast::<u32>();
    // SAFETY: `len` points into `sqe`, which we own.
    unsafe { len.write_unaligned(2) };
    sqe
}

fn commit_sqe(dev: &File, qid: u16, idx: usize, commit_id: u64) -> squeue::Entry128 {
    opcode::UringCmd80::new(types::Fd(dev.as_raw_fd()), CMD_COMMIT_AND_FETCH)
        .cmd(cmd(qid, commit_id))
        .build()
        .user_data(idx as u64)
}

/// Runs the calling thread on `cpus` only.
fn set_affinity(cpus: impl Iterator<Item = usize>) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in cpus {
        // SAFETY: CPU_SET only touches the set (and ignores CPUs beyond its size).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: the set lives across the call.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn pin_to(cpu: usize) {
    if let Err(e) = set_affinity(std::iter::once(cpu)) {
        tracing::debug!("fuse: pinning queue {cpu}: {e}");
    }
}

/// READs at least this big free their queue's thread to run on any CPU (see
/// [`Queue::serve`]); 4 KiB random reads stay latency-bound and pinned.
const BIG_READ: u32 = 128 << 10;

/// A queue: its ring and entries, registered with the kernel.
pub struct Queue {
    qid: u16,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    entries: Vec<Entry>,
    /// Completions seen while registering (requests that came at once).
    early: Vec<(usize, i32)>,
    /// Entries whose command the kernel holds (it may write their buffers).
    in_kernel: Vec<bool>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("qid", &self.qid)
            .finish_non_exhaustive()
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        // Buffers the kernel may still write into must outlive us: leak them (only when the
        // connection ended without handing every command back).
        for (e, held) in self.entries.drain(..).zip(&self.in_kernel) {
            if *held {
                std::mem::forget(e);
            }
        }
    }
}

impl Queue {
    /// Sets up queue `qid` on the calling thread (which it pins to CPU `qid`) and registers
    /// its entries, waiting (up to `wait`) for the connection's INIT to complete first.
    pub fn register(dev: &File, qid: u16, wait: Duration) -> Result<Queue, UringError> {
        pin_to(qid as usize);
        // One issuer, and completions run when we wait: the kernel's task work for a new
        // request only wakes this thread, on this CPU.
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build((DEPTH * 2) as u32)
            .map_err(UringError::Setup)?;
        let mut q = Queue {
            qid,
            ring,
            entries: (0..DEPTH).map(|_| Entry::new()).collect(),
            early: Vec::new(),
            in_kernel: vec![false; DEPTH],
        };
        let deadline = Instant::now() + wait;
        for idx in 0..DEPTH {
            q.push_register(dev, idx)?;
        }
        // An accepted registration completes only when a request comes; a refused one
        // completes at once, though with deferred task work only once we wait for it.
        let brief = types::Timespec::new().nsec(2_000_000);
        loop {
            match q
                .ring
                .submitter()
                .submit_with_args(1, &types::SubmitArgs::new().timespec(&brief))
            {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(UringError::Setup(e)),
            }
            let done = q.completions();
            if done.is_empty() {
                break;
            }
            for (idx, res) in done {
                match res {
                    // The connection's INIT has not been answered yet.
                    r if r == -libc::EAGAIN && Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(1));
                        q.push_register(dev, idx)?;
                    }
                    r if r == -libc::EOPNOTSUPP => return Err(UringError::Disabled),
                    r if r < 0 => {
                        return Err(UringError::Register {
                            qid,
                            source: io::Error::from_raw_os_error(-r),
                        })
                    }
                    r => q.early.push((idx, r)),
                }
            }
        }
        Ok(q)
    }

    /// Completions waiting in the ring, as (entry, result); their entries are ours again.
    fn completions(&mut self) -> Vec<(usize, i32)> {
        let done: Vec<(usize, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .filter(|&(idx, _)| idx < self.in_kernel.len())
            .collect();
        for &(idx, _) in &done {
            self.in_kernel[idx] = false;
        }
        done
    }

    fn push_register(&mut self, dev: &File, idx: usize) -> Result<(), UringError> {
        let sqe = register_sqe(dev, self.qid, idx, &self.entries[idx]);
        // SAFETY: the entry's buffers outlive the registration: they live as long as the
        // queue, and `Drop` leaks those the kernel still holds.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| UringError::Setup(io::Error::other("submission queue full")))?;
        self.in_kernel[idx] = true;
        Ok(())
    }

    /// Answers requests until the connection ends, counting them in `served`.
    pub fn serve(mut self, dev: &File, fs: &PassthroughFs, served: &AtomicU64) {
        let mut over = false;
        // Waiting for the next request is not I/O wait: without the flag (Linux 6.15+) an
        // idle mount shows as I/O pressure.
        let flags = if self.ring.params().is_feature_no_iowait() {
            EnterFlags::NO_IOWAIT
        } else {
            EnterFlags::empty()
        };
        let cpus = possible_cpus();
        let qid = self.qid as usize;
        let mut free = false;
        loop {
            let wait = usize::from(self.early.is_empty());
            let r = self.ring.submitter().submit_with_args_and_flags(
                wait,
                &types::SubmitArgs::new(),
                flags,
            );
            if let Err(e) = r {
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                tracing::debug!("fuse: queue {}: {e}", self.qid);
                return;
            }
            let mut done = std::mem::take(&mut self.early);
            done.extend(self.completions());
            for (idx, res) in done {
                if res == -libc::EAGAIN && !over {
                    // A registration the kernel refused for now (the connection was not
                    // initialized yet): try again.
                    std::thread::sleep(Duration::from_millis(1));
                    if self.push_register(dev, idx).is_err() {
                        return;
                    }
                    continue;
                }
                if res < 0 {
                    // ENOTCONN, ECANCELED: the connection is over. Wait for the kernel to
                    // hand back the other entries too.
                    if !over {
                        tracing::debug!(
                            "fuse: queue {} ends: {}",
                            self.qid,
                            io::Error::from_raw_os_error(-res)
                        );
                    }
                    over = true;
                    continue;
                }
                if over {
                    continue;
                }
                served.fetch_add(1, Ordering::Relaxed);
                let e = &mut self.entries[idx];
                let commit_id = e.u64_at(ENT_IN_OUT + 8);
                // A streaming READ (read-ahead, 1 MiB) is copy work, not latency: pinned
                // to the reader's CPU, our two copies (host file to payload, payload to the
                // client's pages on commit) would queue behind the reader copying out the
                // chunk before. So after a big READ the thread may run anywhere, woken on
                // whichever CPU is idle, until a small request pins it home again.
                let big = e.is_big_read();
                if big != free && cpus > 1 {
                    free = big;
                    if big {
                        let _ = set_affinity(0..cpus);
                    } else {
                        pin_to(qid);
                    }
                }
                e.answer(fs, self.qid);
                let sqe = commit_sqe(dev, self.qid, idx, commit_id);
                // SAFETY: as at registration, the entry's buffers stay put.
                if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                    tracing::warn!("fuse: queue {}: submission queue full", self.qid);
                    return;
                }
                self.in_kernel[idx] = true;
            }
            if over && !self.in_kernel.iter().any(|&h| h) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_with(header: &[u8], op: &[u8], payload: &[u8]) -> Entry {
        let mut e = Entry::new();
        e.header[..header.len()].copy_from_slice(header);
        e.header[OP_IN..OP_IN + op.len()].copy_from_slice(op);
        e.payload[..payload.len()].copy_from_slice(payload);
        e.header[ENT_IN_OUT + 16..ENT_IN_OUT + 20]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        e
    }

    fn in_header(len: u32, opcode: u32, unique: u64) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend(len.to_le_bytes());
        h.extend(opcode.to_le_bytes());
        h.extend(unique.to_le_bytes());
        h.extend(7u64.to_le_bytes()); // nodeid
        h.extend([0u8; 16]); // uid, gid, pid, total_extlen + padding
        h
    }

    #[test]
    fn a_ring_entry_becomes_the_classic_request() {
        // WRITE: 40-byte fixed argument in OP_IN, the data in the payload.
        let op: Vec<u8> = (0..40).collect();
        let data = vec![0xabu8; 5000];
        let h = in_header(40 + 40 + 5000, abi::op::WRITE, 9);
        let e = entry_with(&h, &op, &data);
        let req = e.request().unwrap();
        assert_eq!(req.len(), 5080);
        assert_eq!(&req[..40], &h[..]);
        assert_eq!(&req[40..80], &op[..]);
        assert_eq!(&req[80..], &data[..]);
        // LOOKUP: no fixed argument, the name in the payload.
        let h = in_header(40 + 4, abi::op::LOOKUP, 10);
        let e = entry_with(&h, &[], b"abc\0");
        assert_eq!(&e.request().unwrap()[40..], b"abc\0");
    }

    #[test]
    fn inconsistent_lengths_are_refused() {
        // Shorter than its payload, a fixed argument beyond 128 bytes, a payload beyond room.
        let e = entry_with(&in_header(40, abi::op::WRITE, 1), &[], b"xyz");
        assert!(e.request().is_err());
        let e = entry_with(&in_header(40 + 129, abi::op::WRITE, 1), &[], &[]);
        assert!(e.request().is_err());
        let mut e = entry_with(&in_header(40, abi::op::GETATTR, 1), &[], &[]);
        e.header[ENT_IN_OUT + 16..ENT_IN_OUT + 20]
            .copy_from_slice(&(PAYLOAD_LEN as u32 + 1).to_le_bytes());
        assert!(e.request().is_err());
    }

    #[test]
    fn replies_split_into_header_and_payload() {
        let mut e = Entry::new();
        let reply = abi::reply(42, 0, b"hello");
        assert!(e.set_reply(&reply));
        assert_eq!(
            &e.header[..abi::OUT_HEADER_LEN],
            &reply[..abi::OUT_HEADER_LEN]
        );
        assert_eq!(&e.payload[..5], b"hello");
        assert_eq!(e.u32_at(ENT_IN_OUT + 16), 5);
        // Too big for the payload buffer, or not even a header: refused.
        assert!(!e.set_reply(&abi::reply(42, 0, &vec![0u8; PAYLOAD_LEN + 1])));
        assert!(!e.set_reply(&[0u8; 8]));
    }

    #[test]
    fn command_words_follow_the_kernel_layout() {
        let c = cmd(3, 0x1122_3344_5566_7788);
        assert_eq!(&c[..8], &[0u8; 8]);
        assert_eq!(&c[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&c[16..18], &3u16.to_le_bytes());
        assert!(c[18..].iter().all(|&b| b == 0));
    }
}
