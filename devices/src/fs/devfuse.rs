//! The host transport: mounts a [`PassthroughFs`] through `/dev/fuse`, so the host kernel's
//! own FUSE client drives the very server the virtio-fs device uses. Conformance suites and
//! benches run against it at full speed (needs root or CAP_SYS_ADMIN to mount).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::abi;
use super::devfuse_uring as uring;
use super::passthrough::{PassthroughFs, MAX_WRITE};

/// A mounted share; dropping it unmounts and joins the server threads.
#[derive(Debug)]
pub struct FuseMount {
    mountpoint: PathBuf,
    /// Requests answered through io_uring queues (none unless mounted with `mount_uring`).
    ring_served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// `FUSE_DEV_IOC_CLONE`: attaches a fresh `/dev/fuse` fd to an existing connection, so it
/// can have its own file flags (our polling reads are non-blocking, the others block).
const FUSE_DEV_IOC_CLONE: libc::Ioctl = 0x8004_e500_u32 as libc::Ioctl;

/// How long a server thread keeps asking for the next request after answering one, before
/// it sleeps (see [`FuseMount::mount_polling`]).
pub const DEFAULT_POLL: Duration = Duration::from_micros(50);

/// How long io_uring queues wait for the connection's INIT before registering.
const REGISTER_WAIT: Duration = Duration::from_secs(5);

impl FuseMount {
    /// Mounts `fs` at `mountpoint` with `threads` server threads, polling for
    /// [`DEFAULT_POLL`] after each request.
    pub fn mount(
        fs: Arc<PassthroughFs>,
        mountpoint: &Path,
        threads: usize,
    ) -> io::Result<FuseMount> {
        Self::mount_polling(fs, mountpoint, threads, DEFAULT_POLL)
    }

    /// Mounts `fs` with `threads` server threads, one of which at a time keeps polling the
    /// device for `poll` after answering a request (zero: never). A client issuing requests
    /// back to back (tar, a build) then finds the server awake: on virtualized hosts, waking
    /// a sleeping thread on another CPU costs several times what the request itself does.
    pub fn mount_polling(
        fs: Arc<PassthroughFs>,
        mountpoint: &Path,
        threads: usize,
        poll: Duration,
    ) -> io::Result<FuseMount> {
        let m = Self::mount_inner(fs, mountpoint, threads, poll)?.0;
        read_ahead(mountpoint);
        Ok(m)
    }

    /// Mounts `fs` with FUSE over io_uring: a queue per CPU, each served by threads pinned
    /// to that CPU, so a request is answered on the CPU that made it (see
    /// [`super::devfuse_uring`]). One thread still reads `/dev/fuse` for INIT, FORGET and
    /// INTERRUPT. Needs Linux 6.14+ with `enable_uring` set; fails with the fix otherwise.
    pub fn mount_uring(fs: Arc<PassthroughFs>, mountpoint: &Path) -> io::Result<FuseMount> {
        if !uring::enabled() {
            return Err(io::Error::other(uring::UringError::Disabled));
        }
        fs.offer_io_uring(true);
        let (mut m, shared) = Self::mount_inner(fs.clone(), mountpoint, 1, Duration::ZERO)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let threads = uring::possible_cpus() * uring::THREADS_PER_QUEUE;
        for t in 0..threads {
            let qid = t / uring::THREADS_PER_QUEUE;
            let (shared, fs, tx) = (shared.clone(), fs.clone(), tx.clone());
            let served = m.ring_served.clone();
            m.threads.push(
                std::thread::Builder::new()
                    .name(format!("fuse-q{qid}.{}", t % uring::THREADS_PER_QUEUE))
                    .spawn(move || {
                        match uring::Queue::register(&shared.dev, qid as u16, REGISTER_WAIT) {
                            Ok(q) => {
                                let _ = tx.send(Ok(()));
                                q.serve(&shared.dev, &fs, &served);
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e));
                            }
                        }
                    })?,
            );
        }
        for _ in 0..threads {
            match rx.recv_timeout(REGISTER_WAIT + Duration::from_secs(1)) {
                Ok(Ok(())) => {}
                // Dropping `m` unmounts, which ends the queues already registered.
                Ok(Err(e)) => return Err(io::Error::other(e)),
                Err(_) => return Err(io::Error::other("FUSE io_uring queues did not register")),
            }
        }
        read_ahead(mountpoint);
        Ok(m)
    }

    fn mount_inner(
        fs: Arc<PassthroughFs>,
        mountpoint: &Path,
        threads: usize,
        poll: Duration,
    ) -> io::Result<(FuseMount, Arc<Shared>)> {
        // Blocking reads for threads that sleep: the kernel wakes exactly one of them per
        // request, with no poll round trip (the polling thread uses a non-blocking clone).
        let dev = File::options().read(true).write(true).open("/dev/fuse")?;
        let opts = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other,max_read={}",
            dev.as_raw_fd(),
            MAX_WRITE
        );
        let target = CString::new(mountpoint.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let opts_c = CString::new(opts).expect("no NUL");
        // SAFETY: all strings are NUL-terminated and live across the call.
        let r = unsafe {
            libc::mount(
                c"msb-fs".as_ptr(),
                target.as_ptr(),
                c"fuse.msb".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts_c.as_ptr().cast(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut m = FuseMount {
            mountpoint: mountpoint.into(),
            stop: stop.clone(),
            threads: Vec::new(),
            ring_served: Arc::new(AtomicU64::new(0)),
        };
        // From here on, dropping `m` unmounts.
        let polling = if poll.is_zero() {
            None
        } else {
            Some(clone_nonblocking(&dev)?)
        };
        let shared = Arc::new(Shared {
            dev,
            polling,
            poll,
            poller: AtomicBool::new(false),
            stop,
        });
        for i in 0..threads.max(1) {
            let (shared, fs) = (shared.clone(), fs.clone());
            m.threads.push(
                std::thread::Builder::new()
                    .name(format!("fuse-{i}"))
                    .spawn(move || serve(&shared, &fs))?,
            );
        }
        Ok((m, shared))
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Requests answered through io_uring queues so far.
    pub fn ring_requests(&self) -> u64 {
        self.ring_served.load(Ordering::Relaxed)
    }
}

/// Reads ahead 1 MiB on the mount, as msb-init sets for a guest's virtio-fs mounts (one
/// request at the size we negotiate instead of the kernel's 128 KiB), so the host client
/// behaves as a sandbox's does. Best effort: without it only sequential reads are slower.
/// Called once the server answers (the stat is a request).
fn read_ahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = m.dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    if let Err(e) = std::fs::write(&path, "1024") {
        tracing::debug!("fuse: {path}: {e}");
    }
}

/// What a server thread sends back: a READ's out header followed by that many bytes of its
/// data buffer, or a whole reply.
enum Reply {
    Read(([u8; abi::OUT_HEADER_LEN], usize)),
    Whole(Vec<u8>),
}

/// A second fd on the connection `dev` serves, non-blocking.
fn clone_nonblocking(dev: &File) -> io::Result<File> {
    let f = File::options().read(true).write(true).open("/dev/fuse")?;
    let mut src: u32 = dev.as_raw_fd() as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the source fd) from the pointer.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FUSE_DEV_IOC_CLONE, &mut src) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain fcntl on an fd we own.
    let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if fl < 0 || unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(f)
}

struct Shared {
    /// Blocking fd: threads that are not polling sleep in `read` on it.
    dev: File,
    /// Non-blocking fd on the same connection, for the polling thread.
    polling: Option<File>,
    poll: Duration,
    /// Held by the one thread polling (two would take both CPUs of a small host).
    poller: AtomicBool,
    stop: Arc<AtomicBool>,
}

enum Read {
    Got(usize),
    Empty,
    Over,
}

fn read_request(fd: RawFd, buf: &mut [u8]) -> Read {
    // SAFETY: the buffer is valid for its length; the fd outlives the call.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n >= 0 {
        return Read::Got(n as usize);
    }
    match io::Error::last_os_error().raw_os_error() {
        // Nothing queued (polling), interrupted, or the request was interrupted before we
        // read it.
        Some(libc::EAGAIN) | Some(libc::EINTR) | Some(libc::ENOENT) => Read::Empty,
        // Unmounted (ENODEV), or anything else: this connection is over.
        _ => Read::Over,
    }
}

fn serve(sh: &Shared, fs: &PassthroughFs) {
    let mut buf = vec![0u8; MAX_WRITE as usize + 4096];
    let mut data = vec![0u8; MAX_WRITE as usize];
    let mut answered: Option<Instant> = None;
    loop {
        if sh.stop.load(Ordering::Relaxed) {
            return;
        }
        let mut got = None;
        // Poll while the last answer is recent and no other thread polls.
        if let (Some(nb), Some(t)) = (&sh.polling, answered) {
            if t.elapsed() < sh.poll
                && sh
                    .poller
                    .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                loop {
                    match read_request(nb.as_raw_fd(), &mut buf) {
                        Read::Got(n) => {
                            got = Some((n, nb.as_raw_fd()));
                            break;
                        }
                        Read::Over => {
                            sh.poller.store(false, Ordering::Release);
                            return;
                        }
                        Read::Empty if t.elapsed() < sh.poll => std::hint::spin_loop(),
                        Read::Empty => break,
                    }
                }
                sh.poller.store(false, Ordering::Release);
            }
        }
        let (n, fd) = match got {
            Some(g) => g,
            None => match read_request(sh.dev.as_raw_fd(), &mut buf) {
                Read::Got(n) => (n, sh.dev.as_raw_fd()),
                Read::Empty => continue,
                Read::Over => return,
            },
        };
        let req = &buf[..n];
        let is_destroy = req.len() >= abi::IN_HEADER_LEN
            && u32::from_le_bytes([req[4], req[5], req[6], req[7]]) == abi::op::DESTROY;
        // READ data goes from the host file into `data` and from there to the kernel.
        let reply = match fs.read_into(req, &mut data) {
            Some(r) => Some(Reply::Read(r.out_header())),
            None => fs.handle(req).map(Reply::Whole),
        };
        if let Some(reply) = &reply {
            let (reply, n): (&[u8], usize) = match reply {
                Reply::Read((head, n)) => (head, *n),
                Reply::Whole(full) => (full, 0),
            };
            // The reply goes to the fd the request came from (each has its own queue of
            // requests being processed).
            let iov = [
                libc::iovec {
                    iov_base: reply.as_ptr() as *mut libc::c_void,
                    iov_len: reply.len(),
                },
                libc::iovec {
                    iov_base: data.as_mut_ptr().cast(),
                    iov_len: n,
                },
            ];
            // SAFETY: both buffers are valid for the lengths given.
            let w = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
            if w < 0 {
                let e = io::Error::last_os_error();
                // ENOENT: the request was interrupted meanwhile; anything else ends us.
                if e.raw_os_error() != Some(libc::ENOENT) {
                    tracing::debug!("fuse: writing a reply: {e}");
                    return;
                }
            }
        }
        if is_destroy {
            return;
        }
        answered = Some(Instant::now());
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.mountpoint.as_os_str().as_bytes()) {
            // SAFETY: NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        // Readers see ENODEV once the kernel drops the connection, which is at once unless
        // files are still open on the detached mount; then they finish when the last one is
        // closed, and we do not wait for that.
        self.stop.store(true, Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !self.threads.iter().all(|t| t.is_finished()) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!(
                    "fuse: {} still has open files; its server thread ends when they close",
                    self.mountpoint.display()
                );
            }
        }
    }
}
