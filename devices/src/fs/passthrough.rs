//! The passthrough backend: serves one host directory (the share) to a FUSE client.
//!
//! Escape-proofing. Every inode is an `O_PATH` fd; every name the client sends is one path
//! component (no `/`, no NUL, not `.` or `..` except where handled) resolved from its parent's
//! fd with `O_NOFOLLOW` and `RESOLVE_BENEATH`, so symlinks are never followed on the host and
//! a rename race can at worst hand us the symlink itself. Files are reopened through
//! `/proc/self/fd`, only when the inode is a regular file (or a directory for OPENDIR): a
//! hostile client cannot open a host device, fifo or socket. Special files and ownership the
//! client creates exist on the host as plain files owned by us with owner-only permissions;
//! what the client sees is kept in the [`OVERRIDE_XATTR`] extended attribute.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;

use super::abi::{
    self, fattr, fopen, init, op, AbiError, Attr, EntryOut, InHeader, Reader, Writer,
};

/// Extended attribute that holds the guest-visible `UID:GID:MODE[:RDEV]` (see the module
/// docs of [`super`]). Clients can neither read nor change it.
pub const OVERRIDE_XATTR: &str = "user.msb.stat";
const OVERRIDE_XATTR_C: &CStr = c"user.msb.stat";
/// Prefix of our own attributes, hidden from clients.
const PRIVATE_XATTR_PREFIX: &[u8] = b"user.msb.";
/// A client's extended attributes outside `user.` are stored on the host as `user.msb.x.NAME`:
/// a guest's `security.capability`, `trusted.*` or POSIX ACL must never take effect on the
/// host (file capabilities set in a sandbox would otherwise arm a host binary).
const MAPPED_XATTR_PREFIX: &[u8] = b"user.msb.x.";
/// Where a client's `security.capability` lives on the host.
const CAPS_XATTR_C: &CStr = c"user.msb.x.security.capability";

/// Largest READ/WRITE payload we negotiate (and accept).
pub const MAX_WRITE: u32 = 1 << 20;
/// Cap on a READDIR/READDIRPLUS reply, whatever size the client asks for.
const MAX_READDIR: usize = 1 << 20;
/// Cap on GETXATTR/LISTXATTR replies.
const MAX_XATTR: usize = 64 << 10;

/// How long the client may cache entries and attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CachePolicy {
    /// Nothing cached: every access asks us (shares the host changes underneath).
    None,
    /// One second of caching, data cache kept while mtime is unchanged (the default).
    #[default]
    Auto,
    /// Cache for a day: the client is the only writer (a sandbox's private root).
    Always,
}

impl std::str::FromStr for CachePolicy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(CachePolicy::None),
            "auto" => Ok(CachePolicy::Auto),
            "always" => Ok(CachePolicy::Always),
            _ => Err(format!("cache policy {s:?}: expected none, auto or always")),
        }
    }
}

/// The arguments after `req`'s header, if the length the header claims is one `req` has.
fn args_of<'a>(h: &InHeader, req: &'a [u8]) -> Option<&'a [u8]> {
    let len = h.len as usize;
    (abi::IN_HEADER_LEN..=req.len())
        .contains(&len)
        .then(|| &req[abi::IN_HEADER_LEN..len])
}

/// A READ answered in the transport's buffer by [`PassthroughFs::read_into`]: the request's
/// id, and the bytes read into the buffer or an errno.
#[derive(Debug)]
pub struct ReadReply {
    pub unique: u64,
    pub result: std::result::Result<usize, i32>,
}

impl ReadReply {
    /// The reply's out header, and how many bytes of the buffer follow it.
    pub fn out_header(&self) -> ([u8; abi::OUT_HEADER_LEN], usize) {
        let (error, n) = match self.result {
            Ok(n) => (0, n),
            Err(errno) => (-errno, 0),
        };
        (abi::out_header(self.unique, error, n), n)
    }
}

/// What is shared and how.
#[derive(Debug, Clone)]
pub struct Config {
    pub read_only: bool,
    pub cache: CachePolicy,
    /// Most inodes (each an O_PATH fd) held at once; lookups beyond get ENFILE.
    pub max_inodes: usize,
    /// Most open files and directories at once; opens beyond get ENFILE.
    pub max_handles: usize,
    /// The sandbox's `--fs-rate`, shared with its other shares.
    pub rate: Option<Arc<super::rate::FsRate>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            read_only: false,
            cache: CachePolicy::default(),
            max_inodes: 65_536,
            max_handles: 4_096,
            rate: None,
        }
    }
}

/// Errors setting up a share.
#[derive(Debug, Error)]
pub enum ShareError {
    #[error("shared directory {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("shared directory {0} is not a directory")]
    NotDir(PathBuf),
    #[error("opening /proc/self/fd: {0}")]
    Proc(io::Error),
}

type Result<T> = std::result::Result<T, i32>;

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(r: libc::c_int) -> Result<libc::c_int> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Inode {
    fd: OwnedFd,
    key: (u64, u64),
    /// Host file type (S_IFMT bits): fixed for the inode's life.
    kind: u32,
    refs: AtomicU64,
    /// The override xattr as last read or written: `None` until loaded, `Some(None)` when
    /// the file has none. We are the only writer of the attribute.
    ov: Mutex<Option<Option<Override>>>,
    /// Known to carry no guest file capability (so a WRITE need not drop one). Cleared
    /// when the client sets one; never set under cache policy `none`, where the host may
    /// change the file underneath.
    no_caps: AtomicBool,
}

#[derive(Default)]
struct Inodes {
    by_id: HashMap<u64, Arc<Inode>>,
    by_key: HashMap<(u64, u64), u64>,
    next_id: u64,
    /// Nodes restored from a snapshot whose file was gone: ESTALE until forgotten.
    stale: HashSet<u64>,
}

enum Handle {
    File(File),
    Dir {
        dir: File,
        entries: Mutex<Option<Vec<DirEntry>>>,
    },
}

impl Handle {
    fn fd(&self) -> RawFd {
        match self {
            Handle::File(f) => f.as_raw_fd(),
            Handle::Dir { dir, .. } => dir.as_raw_fd(),
        }
    }
}

struct DirEntry {
    name: Vec<u8>,
    ino: u64,
    typ: u32,
}

/// Guest-visible ownership and mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Override {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub rdev: u32,
}

impl Override {
    /// Parses `UID:GID:MODE[:RDEV]`.
    pub fn parse(v: &[u8]) -> Option<Override> {
        let s = std::str::from_utf8(v).ok()?;
        let mut it = s.trim_end_matches('\0').split(':');
        let uid = it.next()?.parse().ok()?;
        let gid = it.next()?.parse().ok()?;
        let mode = u32::from_str_radix(it.next()?, 8).ok()?;
        let rdev = match it.next() {
            Some(r) => r.parse().ok()?,
            None => 0,
        };
        if it.next().is_some() || mode & !(libc::S_IFMT | 0o7777) != 0 {
            return None;
        }
        Some(Override {
            uid,
            gid,
            mode,
            rdev,
        })
    }

    pub fn encode(&self) -> String {
        if self.rdev != 0 {
            format!("{}:{}:0{:o}:{}", self.uid, self.gid, self.mode, self.rdev)
        } else {
            format!("{}:{}:0{:o}", self.uid, self.gid, self.mode)
        }
    }
}

/// The FUSE server for one shared directory.
pub struct PassthroughFs {
    root_path: PathBuf,
    cfg: Config,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    /// Handles restored from a snapshot whose file was gone: ESTALE until released.
    stale_handles: Mutex<HashSet<u64>>,
    next_handle: AtomicU64,
    proc_fd: OwnedFd,
    euid: u32,
    egid: u32,
    initialized: AtomicBool,
    /// The transport serves requests over io_uring too: INIT accepts FUSE_OVER_IO_URING.
    io_uring: AtomicBool,
    /// The share's filesystem has no user xattrs: ownership changes and special files fail.
    no_xattrs: AtomicBool,
    /// Requests served, by opcode (`request_counts`).
    op_counts: [AtomicU64; 64],
    /// File bytes read and written for the client (`totals`).
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

/// What a share served, for `msb-vmm stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsTotals {
    /// Requests of every kind.
    pub ops: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl std::fmt::Debug for PassthroughFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PassthroughFs")
            .field("root", &self.root_path)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn open_path(dirfd: RawFd, path: &CStr, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: `path` is NUL-terminated; the returned fd, if any, is ours.
    let fd = unsafe { libc::openat(dirfd, path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: RawFd) -> Result<libc::stat64> {
    // SAFETY: an all-zero stat64 is a valid value of this plain C struct.
    let mut st: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer; the empty path with AT_EMPTY_PATH means `fd` itself.
    check(unsafe {
        libc::fstatat64(
            fd,
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// Opens one component beneath `dirfd`, never following a symlink.
fn open_beneath(dirfd: RawFd, name: &CStr, flags: i32, mode: u32) -> Result<OwnedFd> {
    // SAFETY: open_how is a plain C struct; all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        u64::from(mode)
    } else {
        0
    };
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `name` is NUL-terminated and `how` a valid open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: a fresh fd from openat2, owned by nobody else.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let e = errno();
    if e != libc::ENOSYS {
        return Err(e);
    }
    // Kernels before 5.6: one component with O_NOFOLLOW cannot leave `dirfd` either.
    // SAFETY: as above, for openat.
    let fd = unsafe {
        libc::openat(
            dirfd,
            name.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: a fresh fd from openat, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One path component from the client: non-empty, at most 255 bytes (else ENAMETOOLONG, as
/// POSIX wants), no `/`, not `.`/`..`.
fn component(name: &[u8]) -> Result<CString> {
    if name.len() > 255 {
        return Err(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
        return Err(libc::EINVAL);
    }
    CString::new(name).map_err(|_| libc::EINVAL)
}

fn bad(e: AbiError) -> i32 {
    tracing::debug!("fuse: malformed request: {e}");
    libc::EINVAL
}

impl PassthroughFs {
    /// Serves `root`. Fails with one clear line when it is missing or not a readable directory.
    pub fn new(root: &Path, cfg: Config) -> std::result::Result<PassthroughFs, ShareError> {
        let c = cstring(root).map_err(|source| ShareError::Open {
            path: root.into(),
            source,
        })?;
        let fd =
            open_path(libc::AT_FDCWD, &c, libc::O_PATH | libc::O_DIRECTORY).map_err(|source| {
                match source.raw_os_error() {
                    Some(libc::ENOTDIR) => ShareError::NotDir(root.into()),
                    _ => ShareError::Open {
                        path: root.into(),
                        source,
                    },
                }
            })?;
        // Listing needs read permission: check it now rather than fail in the guest.
        let probe = open_path(libc::AT_FDCWD, &c, libc::O_RDONLY | libc::O_DIRECTORY).map_err(
            |source| ShareError::Open {
                path: root.into(),
                source,
            },
        )?;
        drop(probe);
        let st = fstat(fd.as_raw_fd()).map_err(|e| ShareError::Open {
            path: root.into(),
            source: io::Error::from_raw_os_error(e),
        })?;
        let proc_fd = open_path(
            libc::AT_FDCWD,
            c"/proc/self/fd",
            libc::O_PATH | libc::O_DIRECTORY,
        )
        .map_err(ShareError::Proc)?;
        let mut inodes = Inodes {
            next_id: abi::ROOT_ID + 1,
            ..Default::default()
        };
        let key = (st.st_dev, st.st_ino);
        inodes.by_key.insert(key, abi::ROOT_ID);
        inodes.by_id.insert(
            abi::ROOT_ID,
            Arc::new(Inode {
                fd,
                key,
                kind: st.st_mode & libc::S_IFMT,
                refs: AtomicU64::new(1),
                ov: Mutex::new(None),
                no_caps: AtomicBool::new(false),
            }),
        );
        // Every inode the client holds is an fd of ours: take the whole hard limit (the
        // default soft limit of 1024 is gone after a thousand files), and keep both caps
        // under it so we answer ENFILE rather than run the process out of fds.
        let nofile = raise_nofile_limit();
        let room = usize::try_from(nofile.saturating_sub(256))
            .unwrap_or(usize::MAX)
            .max(64);
        let mut cfg = cfg;
        cfg.max_handles = cfg.max_handles.min(room / 4);
        cfg.max_inodes = cfg.max_inodes.min(room - cfg.max_handles);
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        // SAFETY: getegid has no preconditions.
        let egid = unsafe { libc::getegid() };
        Ok(PassthroughFs {
            root_path: root.into(),
            cfg,
            inodes: Mutex::new(inodes),
            handles: Mutex::new(HashMap::new()),
            stale_handles: Mutex::new(HashSet::new()),
            next_handle: AtomicU64::new(1),
            proc_fd,
            euid,
            egid,
            initialized: AtomicBool::new(false),
            io_uring: AtomicBool::new(false),
            no_xattrs: AtomicBool::new(false),
            op_counts: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        })
    }

    /// Inodes currently held (each one O_PATH fd), the root included.
    pub fn inode_count(&self) -> usize {
        lock(&self.inodes).by_id.len()
    }

    /// Open file and directory handles.
    pub fn handle_count(&self) -> usize {
        lock(&self.handles).len()
    }

    /// Requests served so far by opcode (only opcodes seen), for benches and diagnostics.
    pub fn request_counts(&self) -> Vec<(&'static str, u64)> {
        self.op_counts
            .iter()
            .enumerate()
            .filter_map(|(op, n)| {
                let n = n.load(Ordering::Relaxed);
                (n > 0).then(|| (abi::op::name(op as u32), n))
            })
            .collect()
    }

    /// Requests and file bytes served so far.
    pub fn totals(&self) -> FsTotals {
        FsTotals {
            ops: self
                .op_counts
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .sum(),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Tells INIT to accept FUSE over io_uring when the client offers it (the `/dev/fuse`
    /// transport's per-CPU queues; never the virtio-fs queue).
    pub fn offer_io_uring(&self, on: bool) {
        self.io_uring.store(on, Ordering::Relaxed);
    }

    /// Handles one request; returns the reply, or `None` for requests that get none
    /// (FORGET, BATCH_FORGET, INTERRUPT) or that are too broken to answer.
    pub fn handle(&self, req: &[u8]) -> Option<Vec<u8>> {
        let mut r = Reader::new(req);
        let h = match InHeader::parse(&mut r) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!("fuse: dropping a request without a header: {e}");
                return None;
            }
        };
        let Some(args) = args_of(&h, req) else {
            tracing::warn!(
                "fuse: request {} claims {} bytes, has {}",
                h.unique,
                h.len,
                req.len()
            );
            return Some(abi::reply(h.unique, -libc::EINVAL, &[]));
        };
        let mut r = Reader::new(args);
        self.count(h.opcode);
        match h.opcode {
            op::FORGET => {
                if let Ok(n) = r.u64() {
                    self.forget(h.nodeid, n);
                }
                return None;
            }
            op::BATCH_FORGET => {
                self.batch_forget(&mut r);
                return None;
            }
            op::INTERRUPT => return None,
            _ => {}
        }
        if h.opcode != op::INIT && !self.initialized.load(Ordering::Acquire) {
            return Some(abi::reply(h.unique, -libc::EIO, &[]));
        }
        let result = self.dispatch(&h, &mut r);
        Some(match result {
            Ok(body) => abi::reply(h.unique, 0, &body),
            Err(e) => abi::reply(h.unique, -e, &[]),
        })
    }

    /// Serves a READ straight into `out`, the transport's reply buffer, sparing a zeroed
    /// vector and two copies of the data per request (sequential reads are copy-bound).
    /// `None` when `req` is anything else, or not well-formed: [`Self::handle`] answers it.
    pub fn read_into(&self, req: &[u8], out: &mut [u8]) -> Option<ReadReply> {
        let mut r = Reader::new(req);
        let h = InHeader::parse(&mut r).ok()?;
        if h.opcode != op::READ || !self.initialized.load(Ordering::Acquire) {
            return None;
        }
        let mut r = Reader::new(args_of(&h, req)?);
        let (fh, off, size) = (r.u64().ok()?, r.u64().ok()?, r.u32().ok()?);
        self.count(op::READ);
        let size = (size.min(MAX_WRITE) as usize).min(out.len());
        Some(ReadReply {
            unique: h.unique,
            result: self.read_to(fh, off, &mut out[..size]),
        })
    }

    /// Counts a request by opcode (see [`Self::request_counts`]) and waits for its turn
    /// under `--fs-rate`.
    fn count(&self, opcode: u32) {
        if let Some(n) = self.op_counts.get(opcode as usize) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        self.pace(1, 0);
    }

    fn pace(&self, ops: u64, bytes: u64) {
        if let Some(rate) = &self.cfg.rate {
            rate.pace(ops, bytes);
        }
    }

    fn dispatch(&self, h: &InHeader, r: &mut Reader<'_>) -> Result<Vec<u8>> {
        let ro = self.cfg.read_only;
        let writes = matches!(
            h.opcode,
            op::SETATTR
                | op::SYMLINK
                | op::MKNOD
                | op::MKDIR
                | op::UNLINK
                | op::RMDIR
                | op::RENAME
                | op::RENAME2
                | op::LINK
                | op::WRITE
                | op::CREATE
                | op::SETXATTR
                | op::REMOVEXATTR
                | op::FALLOCATE
                | op::COPY_FILE_RANGE
        );
        if ro && writes {
            return Err(libc::EROFS);
        }
        match h.opcode {
            op::INIT => self.init(r),
            op::DESTROY => {
                self.destroy();
                Ok(Vec::new())
            }
            op::LOOKUP => {
                let name = r.cstr().map_err(bad)?;
                match self.lookup(h.nodeid, name) {
                    // A negative entry the client may cache (node id 0): a create's lookup
                    // or a PATH search does not come back for the same missing name.
                    Err(libc::ENOENT) if self.cfg.cache != CachePolicy::None => {
                        Ok(entry_body(&self.entry(0, Attr::default())))
                    }
                    other => other.map(|e| entry_body(&e)),
                }
            }
            op::GETATTR => self.getattr(h.nodeid),
            op::SETATTR => self.setattr(h.nodeid, r),
            op::READLINK => self.readlink(h.nodeid),
            op::SYMLINK => {
                let name = r.cstr().map_err(bad)?;
                let target = r.cstr().map_err(bad)?;
                self.symlink(h, name, target)
            }
            op::MKNOD => {
                let mode = r.u32().map_err(bad)?;
                let rdev = r.u32().map_err(bad)?;
                r.skip(8).map_err(bad)?;
                let name = r.cstr().map_err(bad)?;
                self.mknod(h, name, mode, rdev)
            }
            op::MKDIR => {
                let mode = r.u32().map_err(bad)?;
                r.skip(4).map_err(bad)?;
                let name = r.cstr().map_err(bad)?;
                self.mkdir(h, name, mode)
            }
            op::UNLINK | op::RMDIR => {
                let name = component(r.cstr().map_err(bad)?)?;
                let parent = self.inode(h.nodeid)?;
                let flags = if h.opcode == op::RMDIR {
                    libc::AT_REMOVEDIR
                } else {
                    0
                };
                // SAFETY: `name` is NUL-terminated; the parent fd is valid while we hold it.
                check(unsafe { libc::unlinkat(parent.fd.as_raw_fd(), name.as_ptr(), flags) })?;
                Ok(Vec::new())
            }
            op::RENAME | op::RENAME2 => {
                let newdir = r.u64().map_err(bad)?;
                let flags = if h.opcode == op::RENAME2 {
                    let f = r.u32().map_err(bad)?;
                    r.skip(4).map_err(bad)?;
                    f
                } else {
                    0
                };
                let old = r.cstr().map_err(bad)?;
                let new = r.cstr().map_err(bad)?;
                self.rename(h.nodeid, old, newdir, new, flags)
            }
            op::LINK => {
                let old = r.u64().map_err(bad)?;
                let name = r.cstr().map_err(bad)?;
                self.link(old, h.nodeid, name)
            }
            op::OPEN => {
                let flags = r.u32().map_err(bad)?;
                let open_flags = r.u32().unwrap_or(0);
                self.open(h.nodeid, flags as i32, open_flags)
            }
            op::READ => {
                let fh = r.u64().map_err(bad)?;
                let off = r.u64().map_err(bad)?;
                let size = r.u32().map_err(bad)?;
                self.read(fh, off, size)
            }
            op::WRITE => {
                let fh = r.u64().map_err(bad)?;
                let off = r.u64().map_err(bad)?;
                let size = r.u32().map_err(bad)?;
                let write_flags = r.u32().map_err(bad)?;
                r.skip(16).map_err(bad)?;
                let data = r.bytes(size as usize).map_err(bad)?;
                // As the VFS does: privileges go before the data lands, and a node id never
                // looked up writes nothing.
                let ino = self.inode(h.nodeid)?;
                if write_flags & abi::WRITE_KILL_SUIDGID != 0 {
                    self.kill_suidgid(&ino)?;
                }
                self.kill_caps(&ino);
                self.write(fh, off, data)
            }
            op::STATFS => self.statfs(h.nodeid),
            op::RELEASE | op::RELEASEDIR => {
                let fh = r.u64().map_err(bad)?;
                if lock(&self.handles).remove(&fh).is_none() {
                    lock(&self.stale_handles).remove(&fh);
                }
                Ok(Vec::new())
            }
            op::FSYNC | op::FSYNCDIR => {
                let fh = r.u64().map_err(bad)?;
                let datasync = r.u32().map_err(bad)? & 1 != 0;
                let handle = self.handle_of(fh)?;
                let fd = match &*handle {
                    Handle::File(f) => f.as_raw_fd(),
                    Handle::Dir { dir, .. } => dir.as_raw_fd(),
                };
                let r = if datasync {
                    // SAFETY: `fd` belongs to `handle`, alive for this call.
                    unsafe { libc::fdatasync(fd) }
                } else {
                    // SAFETY: as above.
                    unsafe { libc::fsync(fd) }
                };
                check(r)?;
                Ok(Vec::new())
            }
            op::FLUSH => {
                let fh = r.u64().map_err(bad)?;
                self.handle_of(fh)?;
                Ok(Vec::new())
            }
            op::SETXATTR => {
                let size = r.u32().map_err(bad)?;
                let flags = r.u32().map_err(bad)?;
                let name = r.cstr().map_err(bad)?;
                let value = r.bytes(size as usize).map_err(bad)?;
                self.setxattr(h.nodeid, name, value, flags as i32)
            }
            op::GETXATTR => {
                let size = r.u32().map_err(bad)?;
                r.skip(4).map_err(bad)?;
                let name = r.cstr().map_err(bad)?;
                self.getxattr(h.nodeid, name, size)
            }
            op::LISTXATTR => {
                let size = r.u32().map_err(bad)?;
                self.listxattr(h.nodeid, size)
            }
            op::REMOVEXATTR => {
                let name = r.cstr().map_err(bad)?;
                self.removexattr(h.nodeid, name)
            }
            op::OPENDIR => self.opendir(h.nodeid),
            op::READDIR | op::READDIRPLUS => {
                let fh = r.u64().map_err(bad)?;
                let off = r.u64().map_err(bad)?;
                let size = r.u32().map_err(bad)?;
                self.readdir(h.nodeid, fh, off, size, h.opcode == op::READDIRPLUS)
            }
            op::ACCESS => {
                let mask = r.u32().map_err(bad)?;
                self.access(h, mask)
            }
            op::CREATE => {
                let flags = r.u32().map_err(bad)?;
                let mode = r.u32().map_err(bad)?;
                r.skip(4).map_err(bad)?;
                let open_flags = r.u32().map_err(bad)?;
                let name = r.cstr().map_err(bad)?;
                self.create(h, name, flags as i32, mode, open_flags)
            }
            op::FALLOCATE => {
                let fh = r.u64().map_err(bad)?;
                let off = r.u64().map_err(bad)?;
                let len = r.u64().map_err(bad)?;
                let mode = r.u32().map_err(bad)?;
                let f = self.file_of(fh)?;
                // SAFETY: the fd belongs to `f`, alive for this call.
                check(unsafe { libc::fallocate64(f.fd(), mode as i32, off as i64, len as i64) })?;
                Ok(Vec::new())
            }
            op::LSEEK => {
                let fh = r.u64().map_err(bad)?;
                let off = r.u64().map_err(bad)?;
                let whence = r.u32().map_err(bad)?;
                let f = self.file_of(fh)?;
                // SAFETY: the fd belongs to `f`, alive for this call.
                let pos = unsafe { libc::lseek64(f.fd(), off as i64, whence as i32) };
                if pos < 0 {
                    return Err(errno());
                }
                Ok((pos as u64).to_le_bytes().to_vec())
            }
            op::COPY_FILE_RANGE => {
                let fh_in = r.u64().map_err(bad)?;
                let mut off_in = r.u64().map_err(bad)? as i64;
                let _nodeid_out = r.u64().map_err(bad)?;
                let fh_out = r.u64().map_err(bad)?;
                let mut off_out = r.u64().map_err(bad)? as i64;
                let len = r.u64().map_err(bad)?;
                let (fi, fo) = (self.file_of(fh_in)?, self.file_of(fh_out)?);
                let len = len.min(u64::from(MAX_WRITE) * 64) as usize;
                // SAFETY: both fds belong to live handles; the offsets are valid out-pointers.
                let n = unsafe {
                    libc::copy_file_range(fi.fd(), &mut off_in, fo.fd(), &mut off_out, len, 0)
                };
                if n < 0 {
                    return Err(errno());
                }
                let mut w = Writer::default();
                w.u32(n as u32).u32(0);
                Ok(w.buf)
            }
            op::SYNCFS => {
                let root = self.inode(abi::ROOT_ID)?;
                let f = self.reopen(&root, libc::O_RDONLY | libc::O_DIRECTORY)?;
                // SAFETY: a valid fd owned by `f`.
                check(unsafe { libc::syncfs(f.as_raw_fd()) })?;
                Ok(Vec::new())
            }
            // Locks are left to the client kernel (we do not offer POSIX_LOCKS): with one
            // client per share, its local locking is exact.
            _ => Err(libc::ENOSYS),
        }
    }

    fn init(&self, r: &mut Reader<'_>) -> Result<Vec<u8>> {
        let major = r.u32().map_err(bad)?;
        let minor = r.u32().map_err(bad)?;
        let max_readahead = r.u32().map_err(bad)?;
        let mut flags = u64::from(r.u32().map_err(bad)?);
        if flags & init::INIT_EXT != 0 {
            // flags2; an old or odd client that claims it and sends none offers nothing.
            flags |= u64::from(r.u32().unwrap_or(0)) << 32;
        }
        let mut w = Writer::default();
        if major < abi::KERNEL_VERSION
            || (major == abi::KERNEL_VERSION && minor < abi::MIN_MINOR_VERSION)
        {
            tracing::warn!(
                "fuse: client speaks {major}.{minor}; we need 7.{}",
                abi::MIN_MINOR_VERSION
            );
            return Err(libc::EPROTO);
        }
        if major > abi::KERNEL_VERSION {
            // The client retries with our major.
            w.u32(abi::KERNEL_VERSION).u32(abi::KERNEL_MINOR_VERSION);
            w.buf.resize(64, 0);
            return Ok(w.buf);
        }
        let mut want = init::ASYNC_READ
            | init::ATOMIC_O_TRUNC
            | init::BIG_WRITES
            | init::AUTO_INVAL_DATA
            | init::DO_READDIRPLUS
            | init::READDIRPLUS_AUTO
            | init::PARALLEL_DIROPS
            | init::MAX_PAGES
            | init::HANDLE_KILLPRIV_V2;
        if self.cfg.cache != CachePolicy::None {
            want |= init::CACHE_SYMLINKS;
        }
        if self.io_uring.load(Ordering::Relaxed) {
            want |= init::INIT_EXT | init::OVER_IO_URING;
        }
        let flags = flags & want;
        self.initialized.store(true, Ordering::Release);
        w.u32(abi::KERNEL_VERSION)
            .u32(minor.min(abi::KERNEL_MINOR_VERSION))
            .u32(max_readahead)
            .u32(flags as u32)
            .u16(64) // max_background
            .u16(48) // congestion_threshold
            .u32(MAX_WRITE)
            .u32(1) // time_gran
            .u16((MAX_WRITE / 4096) as u16) // max_pages
            .u16(0)
            .u32((flags >> 32) as u32)
            .u32(0);
        w.buf.resize(64, 0);
        Ok(w.buf)
    }

    fn destroy(&self) {
        let mut t = lock(&self.inodes);
        t.by_id.retain(|&id, _| id == abi::ROOT_ID);
        let root_key = t.by_id[&abi::ROOT_ID].key;
        t.by_key.retain(|k, _| *k == root_key);
        t.stale.clear();
        drop(t);
        lock(&self.handles).clear();
        lock(&self.stale_handles).clear();
        self.initialized.store(false, Ordering::Release);
    }

    fn inode(&self, id: u64) -> Result<Arc<Inode>> {
        let t = lock(&self.inodes);
        match t.by_id.get(&id) {
            Some(ino) => Ok(ino.clone()),
            None if t.stale.contains(&id) => Err(libc::ESTALE),
            None => Err(libc::EBADF),
        }
    }

    fn handle_of(&self, fh: u64) -> Result<Arc<Handle>> {
        if let Some(h) = lock(&self.handles).get(&fh) {
            return Ok(h.clone());
        }
        if lock(&self.stale_handles).contains(&fh) {
            return Err(libc::ESTALE);
        }
        Err(libc::EBADF)
    }

    fn file_of(&self, fh: u64) -> Result<Arc<Handle>> {
        let h = self.handle_of(fh)?;
        match &*h {
            Handle::File(_) => Ok(h),
            Handle::Dir { .. } => Err(libc::EISDIR),
        }
    }

    fn forget(&self, id: u64, n: u64) {
        if id == abi::ROOT_ID {
            return;
        }
        let mut t = lock(&self.inodes);
        if t.stale.remove(&id) {
            return;
        }
        let Some(ino) = t.by_id.get(&id) else { return };
        let left = ino.refs.load(Ordering::Relaxed).saturating_sub(n);
        ino.refs.store(left, Ordering::Relaxed);
        if left == 0 {
            let key = ino.key;
            t.by_id.remove(&id);
            if t.by_key.get(&key) == Some(&id) {
                t.by_key.remove(&key);
            }
        }
    }

    fn batch_forget(&self, r: &mut Reader<'_>) {
        let Ok(count) = r.u32() else { return };
        if r.skip(4).is_err() {
            return;
        }
        for _ in 0..count {
            let (Ok(id), Ok(n)) = (r.u64(), r.u64()) else {
                tracing::debug!("fuse: BATCH_FORGET shorter than its count");
                return;
            };
            self.forget(id, n);
        }
    }

    /// Registers (or re-references) the inode `fd` refers to; returns its id.
    fn register(&self, fd: OwnedFd, st: &libc::stat64) -> Result<u64> {
        let key = (st.st_dev, st.st_ino);
        let mut t = lock(&self.inodes);
        if let Some(&id) = t.by_key.get(&key) {
            if let Some(ino) = t.by_id.get(&id) {
                ino.refs.fetch_add(1, Ordering::Relaxed);
                return Ok(id);
            }
        }
        if t.by_id.len() >= self.cfg.max_inodes {
            limit_reached("files the guest holds", self.cfg.max_inodes);
            return Err(libc::ENFILE);
        }
        let id = t.next_id;
        t.next_id += 1;
        t.by_key.insert(key, id);
        t.by_id.insert(
            id,
            Arc::new(Inode {
                fd,
                key,
                kind: st.st_mode & libc::S_IFMT,
                refs: AtomicU64::new(1),
                ov: Mutex::new(None),
                no_caps: AtomicBool::new(false),
            }),
        );
        Ok(id)
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Result<EntryOut> {
        let p = self.inode(parent)?;
        let fd = match name {
            b"." => open_path(p.fd.as_raw_fd(), c".", libc::O_PATH)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?,
            b".." => {
                // `..` of the share root is the root; elsewhere only a parent we already
                // know (it was looked up to reach this directory) is answered.
                if parent == abi::ROOT_ID {
                    open_path(p.fd.as_raw_fd(), c".", libc::O_PATH)
                        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?
                } else {
                    let fd = open_path(p.fd.as_raw_fd(), c"..", libc::O_PATH | libc::O_NOFOLLOW)
                        .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                    let st = fstat(fd.as_raw_fd())?;
                    if !lock(&self.inodes)
                        .by_key
                        .contains_key(&(st.st_dev, st.st_ino))
                    {
                        return Err(libc::ENOENT);
                    }
                    fd
                }
            }
            _ => {
                let c = component(name)?;
                open_beneath(p.fd.as_raw_fd(), &c, libc::O_PATH, 0)?
            }
        };
        let st = fstat(fd.as_raw_fd())?;
        let id = self.register(fd, &st)?;
        let attr = self.attr(&*self.inode(id)?, &st);
        Ok(self.entry(id, attr))
    }

    fn entry(&self, id: u64, attr: Attr) -> EntryOut {
        let (secs, nsecs) = self.timeout();
        EntryOut {
            nodeid: id,
            generation: 0,
            entry_valid: secs,
            attr_valid: secs,
            entry_valid_nsec: nsecs,
            attr_valid_nsec: nsecs,
            attr,
        }
    }

    fn timeout(&self) -> (u64, u32) {
        let d = match self.cfg.cache {
            CachePolicy::None => Duration::ZERO,
            CachePolicy::Auto => Duration::from_secs(1),
            CachePolicy::Always => Duration::from_secs(86_400),
        };
        (d.as_secs(), d.subsec_nanos())
    }

    fn proc_name(fd: RawFd) -> CString {
        CString::new(fd.to_string()).expect("digits have no NUL")
    }

    /// Opens the inode itself (through /proc/self/fd) with `flags`.
    fn reopen(&self, ino: &Inode, flags: i32) -> Result<File> {
        let name = Self::proc_name(ino.fd.as_raw_fd());
        let fd = open_path(self.proc_fd.as_raw_fd(), &name, flags & !libc::O_NOFOLLOW)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        Ok(File::from(fd))
    }

    fn read_override(&self, ino: &Inode) -> Option<Override> {
        if ino.kind == libc::S_IFLNK || self.no_xattrs.load(Ordering::Relaxed) {
            return None;
        }
        if self.cfg.cache != CachePolicy::None {
            if let Some(cached) = *lock(&ino.ov) {
                return cached;
            }
        }
        let ov = self.load_override(ino);
        *lock(&ino.ov) = Some(ov);
        ov
    }

    /// Reads extended attribute `name` of the inode (through /proc/self/fd: O_PATH fds take
    /// no fgetxattr) into `buf`; returns its length.
    fn get_xattr(&self, ino: &Inode, name: &CStr, buf: &mut [u8]) -> Result<usize> {
        let path = self.proc_path(ino);
        // SAFETY: NUL-terminated strings and a buffer of the length passed.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(errno());
        }
        Ok(n as usize)
    }

    fn load_override(&self, ino: &Inode) -> Option<Override> {
        let mut buf = [0u8; 64];
        let n = self.get_xattr(ino, OVERRIDE_XATTR_C, &mut buf).ok()?;
        Override::parse(&buf[..n])
    }

    fn write_override(&self, ino: &Inode, ov: &Override) -> Result<()> {
        if ino.kind == libc::S_IFLNK {
            // Linux keeps no user xattrs on symlinks; their owner is what the host says.
            return Ok(());
        }
        let path = self.proc_path(ino);
        let v = ov.encode();
        // SAFETY: valid NUL-terminated strings and a value of the length passed.
        let r = unsafe {
            libc::setxattr(
                path.as_ptr(),
                OVERRIDE_XATTR_C.as_ptr(),
                v.as_ptr().cast(),
                v.len(),
                0,
            )
        };
        if r >= 0 {
            *lock(&ino.ov) = Some(Some(*ov));
        } else {
            *lock(&ino.ov) = None;
            let e = errno();
            if e == libc::ENOTSUP {
                self.no_xattrs.store(true, Ordering::Relaxed);
                tracing::warn!(
                    "fuse: {} has no user xattrs: guest ownership and special files are unavailable",
                    self.root_path.display()
                );
                return Err(libc::EPERM);
            }
            return Err(e);
        }
        Ok(())
    }

    fn remove_override(&self, ino: &Inode) -> Result<()> {
        let path = self.proc_path(ino);
        // SAFETY: valid NUL-terminated strings.
        let r = unsafe { libc::removexattr(path.as_ptr(), OVERRIDE_XATTR_C.as_ptr()) };
        if r < 0 && errno() != libc::ENODATA {
            *lock(&ino.ov) = None;
            return Err(errno());
        }
        *lock(&ino.ov) = Some(None);
        Ok(())
    }

    fn proc_path(&self, ino: &Inode) -> CString {
        CString::new(format!("/proc/self/fd/{}", ino.fd.as_raw_fd())).expect("no NUL")
    }

    /// What the client sees: host attributes, ownership mapped (our own files look like
    /// root's), overridden by the xattr where present.
    fn attr(&self, ino: &Inode, st: &libc::stat64) -> Attr {
        let mut a = self.host_view(st);
        if let Some(ov) = self.read_override(ino) {
            a.uid = ov.uid;
            a.gid = ov.gid;
            // A regular host file may present as a special file; a host directory or
            // symlink keeps its type.
            let ty = if ino.kind == libc::S_IFREG {
                ov.mode & libc::S_IFMT
            } else {
                ino.kind
            };
            a.mode = ty | (ov.mode & 0o7777);
            if ty == libc::S_IFCHR || ty == libc::S_IFBLK {
                a.rdev = ov.rdev;
                a.size = 0;
            }
        }
        a
    }

    /// The host's attributes with our own uid/gid shown as root's, before any override.
    // stat64's field types differ between architectures (st_nlink is u64 on x86_64, u32 on
    // arm64; st_blksize i64 and i32): the casts are needed on one of them.
    #[allow(clippy::unnecessary_cast)]
    fn host_view(&self, st: &libc::stat64) -> Attr {
        let map_uid = |u: u32| if u == self.euid { 0 } else { u };
        let map_gid = |g: u32| if g == self.egid { 0 } else { g };
        Attr {
            ino: st.st_ino,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: st.st_atime,
            mtime: st.st_mtime,
            ctime: st.st_ctime,
            atimensec: st.st_atime_nsec as u32,
            mtimensec: st.st_mtime_nsec as u32,
            ctimensec: st.st_ctime_nsec as u32,
            mode: st.st_mode,
            nlink: st.st_nlink as u32,
            uid: map_uid(st.st_uid),
            gid: map_gid(st.st_gid),
            rdev: new_encode_dev(st.st_rdev),
            blksize: st.st_blksize as u32,
        }
    }

    fn getattr(&self, id: u64) -> Result<Vec<u8>> {
        let ino = self.inode(id)?;
        let st = fstat(ino.fd.as_raw_fd())?;
        Ok(self.attr_body(&self.attr(&ino, &st)))
    }

    fn attr_body(&self, a: &Attr) -> Vec<u8> {
        let (secs, nsecs) = self.timeout();
        let mut w = Writer::default();
        w.u64(secs).u32(nsecs).u32(0);
        a.write(&mut w);
        w.buf
    }

    fn current_override(&self, ino: &Inode) -> Result<Override> {
        let st = fstat(ino.fd.as_raw_fd())?;
        let a = self.attr(ino, &st);
        Ok(Override {
            uid: a.uid,
            gid: a.gid,
            mode: a.mode,
            rdev: a.rdev,
        })
    }

    fn setattr(&self, id: u64, r: &mut Reader<'_>) -> Result<Vec<u8>> {
        let valid = r.u32().map_err(bad)?;
        r.skip(4).map_err(bad)?;
        let fh = r.u64().map_err(bad)?;
        let size = r.u64().map_err(bad)?;
        let _lock_owner = r.u64().map_err(bad)?;
        let atime = r.u64().map_err(bad)?;
        let mtime = r.u64().map_err(bad)?;
        let _ctime = r.u64().map_err(bad)?;
        let atimensec = r.u32().map_err(bad)?;
        let mtimensec = r.u32().map_err(bad)?;
        let _ctimensec = r.u32().map_err(bad)?;
        let mode = r.u32().map_err(bad)?;
        r.skip(4).map_err(bad)?;
        let uid = r.u32().map_err(bad)?;
        let gid = r.u32().map_err(bad)?;
        let ino = self.inode(id)?;

        if valid & (fattr::MODE | fattr::UID | fattr::GID) != 0 && ino.kind != libc::S_IFLNK {
            let st = fstat(ino.fd.as_raw_fd())?;
            let cur = self.attr(&ino, &st);
            let mut ov = Override {
                uid: cur.uid,
                gid: cur.gid,
                mode: cur.mode,
                rdev: cur.rdev,
            };
            if valid & fattr::MODE != 0 {
                ov.mode = (ov.mode & libc::S_IFMT) | (mode & 0o7777);
            }
            if valid & fattr::UID != 0 {
                ov.uid = uid;
            }
            if valid & fattr::GID != 0 {
                ov.gid = gid;
            }
            // Plain permission bits are mirrored on the host file where that is harmless
            // (never setuid, setgid or sticky, never writable by group or others, always the
            // owner's read-write), so the common chmod (tar restoring 0644 or 0755 on a file
            // it made) needs no xattr. A host file we may not chmod keeps its bits.
            let mut st = st;
            if valid & fattr::MODE != 0 && matches!(ino.kind, libc::S_IFREG | libc::S_IFDIR) {
                let owner = if ino.kind == libc::S_IFDIR {
                    0o700
                } else {
                    0o600
                };
                let host = (ov.mode & 0o755) | owner;
                if st.st_mode & 0o7777 != host {
                    let name = Self::proc_name(ino.fd.as_raw_fd());
                    // SAFETY: NUL-terminated name relative to our /proc/self/fd.
                    let r =
                        unsafe { libc::fchmodat(self.proc_fd.as_raw_fd(), name.as_ptr(), host, 0) };
                    if r == 0 {
                        st.st_mode = (st.st_mode & libc::S_IFMT) | host;
                    }
                }
            }
            // When the host file already shows the new view, no attribute is needed (and a
            // stale one goes).
            let plain = self.host_view(&st);
            if (plain.uid, plain.gid, plain.mode) == (ov.uid, ov.gid, ov.mode) {
                if self.read_override(&ino).is_some() {
                    self.remove_override(&ino)?;
                }
            } else {
                self.write_override(&ino, &ov)?;
            }
        }
        if valid & fattr::KILL_SUIDGID != 0 {
            self.kill_suidgid(&ino)?;
        }
        if valid & fattr::SIZE != 0 {
            if ino.kind != libc::S_IFREG {
                return Err(libc::EINVAL);
            }
            let handle = if valid & fattr::FH != 0 {
                self.file_of(fh).ok()
            } else {
                None
            };
            let owned;
            let fd = match handle.as_deref() {
                Some(Handle::File(f)) => f.as_raw_fd(),
                _ => {
                    owned = self.reopen(&ino, libc::O_WRONLY)?;
                    owned.as_raw_fd()
                }
            };
            // SAFETY: `fd` is open for the duration of this call.
            check(unsafe { libc::ftruncate64(fd, size as i64) })?;
        }
        if valid & (fattr::ATIME | fattr::MTIME) != 0 {
            let ts = |set: bool, now: bool, s: u64, ns: u32| libc::timespec {
                tv_sec: if set { s as i64 } else { 0 },
                tv_nsec: if !set {
                    libc::UTIME_OMIT
                } else if now {
                    libc::UTIME_NOW
                } else {
                    i64::from(ns)
                },
            };
            let times = [
                ts(
                    valid & fattr::ATIME != 0,
                    valid & fattr::ATIME_NOW != 0,
                    atime,
                    atimensec,
                ),
                ts(
                    valid & fattr::MTIME != 0,
                    valid & fattr::MTIME_NOW != 0,
                    mtime,
                    mtimensec,
                ),
            ];
            if ino.kind == libc::S_IFLNK {
                // The link itself (lutimes): through /proc the link would be followed.
                // SAFETY: the empty path names the O_PATH fd; a two-element timespec array.
                check(unsafe {
                    libc::utimensat(
                        ino.fd.as_raw_fd(),
                        c"".as_ptr(),
                        times.as_ptr(),
                        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
                    )
                })?;
            } else {
                let name = Self::proc_name(ino.fd.as_raw_fd());
                // SAFETY: valid NUL-terminated name and a two-element timespec array.
                check(unsafe {
                    libc::utimensat(self.proc_fd.as_raw_fd(), name.as_ptr(), times.as_ptr(), 0)
                })?;
            }
        }
        self.getattr(id)
    }

    fn readlink(&self, id: u64) -> Result<Vec<u8>> {
        let ino = self.inode(id)?;
        if ino.kind != libc::S_IFLNK {
            return Err(libc::EINVAL);
        }
        let mut buf = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: the buffer has the length passed; the empty path names the O_PATH fd.
        let n = unsafe {
            libc::readlinkat(
                ino.fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(errno());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// After creating `name` in `parent`: look it up and record the client's view of it.
    fn created(&self, parent: &Inode, name: &CStr, ov: Override) -> Result<EntryOut> {
        let fd = open_beneath(parent.fd.as_raw_fd(), name, libc::O_PATH, 0)?;
        let st = fstat(fd.as_raw_fd())?;
        let id = self.register(fd, &st)?;
        let ino = self.inode(id)?;
        // Just made: no attribute but perhaps our own.
        self.note_no_caps(&ino);
        // When the host file already shows what the client asked for (root creating a file
        // with owner-writable permissions: the common case), no attribute is needed.
        let plain = self.host_view(&st);
        let ty_matches = ov.mode & libc::S_IFMT == st.st_mode & libc::S_IFMT;
        if ty_matches
            && (plain.uid, plain.gid, plain.mode & 0o7777) == (ov.uid, ov.gid, ov.mode & 0o7777)
            && ov.rdev == 0
        {
            *lock(&ino.ov) = Some(None);
            return Ok(self.entry(id, plain));
        }
        if let Err(e) = self.write_override(&ino, &ov) {
            // Undo: the client must not see a half-made file.
            let flags = if ino.kind == libc::S_IFDIR {
                libc::AT_REMOVEDIR
            } else {
                0
            };
            // SAFETY: NUL-terminated name, valid parent fd.
            unsafe { libc::unlinkat(parent.fd.as_raw_fd(), name.as_ptr(), flags) };
            self.forget(id, 1);
            return Err(e);
        }
        let st = fstat(ino.fd.as_raw_fd())?;
        Ok(self.entry(id, self.attr(&ino, &st)))
    }

    /// The group a new file gets: the parent's when it is set-group-ID, else the caller's.
    fn new_gid(&self, parent: &Inode, h: &InHeader) -> Result<(u32, bool)> {
        let p = self.current_override(parent)?;
        Ok(if p.mode & libc::S_ISGID != 0 {
            (p.gid, true)
        } else {
            (h.gid, false)
        })
    }

    fn symlink(&self, h: &InHeader, name: &[u8], target: &[u8]) -> Result<Vec<u8>> {
        let name = component(name)?;
        if target.is_empty() || target.len() >= libc::PATH_MAX as usize {
            return Err(libc::EINVAL);
        }
        let target = CString::new(target).map_err(|_| libc::EINVAL)?;
        let parent = self.inode(h.nodeid)?;
        // The target is stored, never resolved by us.
        // SAFETY: NUL-terminated strings and a valid parent fd.
        check(unsafe { libc::symlinkat(target.as_ptr(), parent.fd.as_raw_fd(), name.as_ptr()) })?;
        let (gid, _) = self.new_gid(&parent, h)?;
        let ov = Override {
            uid: h.uid,
            gid,
            mode: libc::S_IFLNK | 0o777,
            rdev: 0,
        };
        self.created(&parent, &name, ov).map(|e| entry_body(&e))
    }

    fn mknod(&self, h: &InHeader, name: &[u8], mode: u32, rdev: u32) -> Result<Vec<u8>> {
        let name = component(name)?;
        let ty = mode & libc::S_IFMT;
        if !matches!(
            ty,
            libc::S_IFREG | libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO | libc::S_IFSOCK
        ) {
            return Err(libc::EINVAL);
        }
        let parent = self.inode(h.nodeid)?;
        // Every node is a plain owner-only file on the host; its type lives in the xattr,
        // so a device node made in the guest can never open a host device.
        let fd = open_beneath(
            parent.fd.as_raw_fd(),
            &name,
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
            0o600,
        )?;
        drop(fd);
        let (gid, _) = self.new_gid(&parent, h)?;
        let rdev = if ty == libc::S_IFCHR || ty == libc::S_IFBLK {
            rdev
        } else {
            0
        };
        let ov = Override {
            uid: h.uid,
            gid,
            mode: ty | (mode & 0o7777),
            rdev,
        };
        self.created(&parent, &name, ov).map(|e| entry_body(&e))
    }

    fn mkdir(&self, h: &InHeader, name: &[u8], mode: u32) -> Result<Vec<u8>> {
        let name = component(name)?;
        let parent = self.inode(h.nodeid)?;
        // SAFETY: NUL-terminated name and a valid parent fd.
        check(unsafe {
            libc::mkdirat(parent.fd.as_raw_fd(), name.as_ptr(), (mode & 0o777) | 0o700)
        })?;
        let (gid, inherit) = self.new_gid(&parent, h)?;
        let mut perm = mode & 0o7777;
        if inherit {
            perm |= libc::S_ISGID;
        }
        let ov = Override {
            uid: h.uid,
            gid,
            mode: libc::S_IFDIR | perm,
            rdev: 0,
        };
        self.created(&parent, &name, ov).map(|e| entry_body(&e))
    }

    fn rename(
        &self,
        olddir: u64,
        old: &[u8],
        newdir: u64,
        new: &[u8],
        flags: u32,
    ) -> Result<Vec<u8>> {
        let allowed = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
        if flags & !allowed != 0 {
            return Err(libc::EINVAL);
        }
        let (old, new) = (component(old)?, component(new)?);
        let (od, nd) = (self.inode(olddir)?, self.inode(newdir)?);
        // The system call itself: musl before 1.2.4 (the one Rust's static targets bundle)
        // has no renameat2 wrapper.
        // SAFETY: NUL-terminated names and valid directory fds.
        check(unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                od.fd.as_raw_fd(),
                old.as_ptr(),
                nd.fd.as_raw_fd(),
                new.as_ptr(),
                flags,
            )
        } as libc::c_int)?;
        Ok(Vec::new())
    }

    fn link(&self, old: u64, newparent: u64, name: &[u8]) -> Result<Vec<u8>> {
        let name = component(name)?;
        let ino = self.inode(old)?;
        if ino.kind == libc::S_IFDIR {
            return Err(libc::EPERM);
        }
        let parent = self.inode(newparent)?;
        let src = Self::proc_name(ino.fd.as_raw_fd());
        // Linking the inode itself (through its /proc/self/fd magic link, followed once):
        // only inodes the client was given, all beneath the share, can be linked.
        // SAFETY: NUL-terminated names, valid fds.
        check(unsafe {
            libc::linkat(
                self.proc_fd.as_raw_fd(),
                src.as_ptr(),
                parent.fd.as_raw_fd(),
                name.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        })?;
        let fd = open_beneath(parent.fd.as_raw_fd(), &name, libc::O_PATH, 0)?;
        let st = fstat(fd.as_raw_fd())?;
        let id = self.register(fd, &st)?;
        let ino = self.inode(id)?;
        Ok(entry_body(&self.entry(id, self.attr(&ino, &st))))
    }

    fn add_handle(&self, h: Handle) -> Result<u64> {
        let mut t = lock(&self.handles);
        if t.len() >= self.cfg.max_handles {
            limit_reached("files the guest has open", self.cfg.max_handles);
            return Err(libc::ENFILE);
        }
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        t.insert(fh, Arc::new(h));
        Ok(fh)
    }

    fn open_flags(&self, flags: i32) -> Result<i32> {
        let acc = flags & libc::O_ACCMODE;
        if self.cfg.read_only && (acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0) {
            return Err(libc::EROFS);
        }
        let keep = libc::O_ACCMODE
            | libc::O_APPEND
            | libc::O_TRUNC
            | libc::O_SYNC
            | libc::O_DSYNC
            | libc::O_NONBLOCK
            | libc::O_NOATIME;
        Ok(flags & keep)
    }

    /// The OPEN/CREATE reply for handle `fh` opened with `flags`. Write-only opens get
    /// direct I/O whatever the policy: nothing can read or map through them, each write is
    /// one WRITE of its own size (cached writes that start mid-page are split in two), and
    /// the client skips its per-write capability probe (a GETXATTR round trip), leaving
    /// the kill to us as FUSE_HANDLE_KILLPRIV_V2 asks. The client still writes back and
    /// drops its cached pages of the range first, so other opens stay coherent.
    fn open_reply(&self, fh: u64, flags: i32) -> Vec<u8> {
        let write_only = flags & libc::O_ACCMODE == libc::O_WRONLY;
        let flags = fopen::NOFLUSH
            | if write_only { fopen::DIRECT_IO } else { 0 }
            | match self.cfg.cache {
                CachePolicy::None => fopen::DIRECT_IO,
                CachePolicy::Auto => 0,
                CachePolicy::Always => fopen::KEEP_CACHE,
            };
        let mut w = Writer::default();
        w.u64(fh).u32(flags).u32(0);
        w.buf
    }

    fn open(&self, id: u64, flags: i32, open_flags: u32) -> Result<Vec<u8>> {
        let ino = self.inode(id)?;
        match ino.kind {
            libc::S_IFREG => {}
            libc::S_IFDIR => return Err(libc::EISDIR),
            // Host devices, fifos, sockets and symlinks are never opened for a client.
            _ => return Err(libc::EACCES),
        }
        let flags = self.open_flags(flags)?;
        let f = self.reopen(&ino, flags)?;
        if open_flags & abi::OPEN_KILL_SUIDGID != 0 {
            self.kill_suidgid(&ino)?;
        }
        let fh = self.add_handle(Handle::File(f))?;
        Ok(self.open_reply(fh, flags))
    }

    /// What the VFS does on write, truncate or chown by a caller without CAP_FSETID (we
    /// negotiate FUSE_HANDLE_KILLPRIV_V2, so the client leaves it to us): setuid goes, and
    /// setgid too when the file is group-executable (otherwise it marks mandatory locking).
    fn kill_suidgid(&self, ino: &Inode) -> Result<()> {
        if ino.kind != libc::S_IFREG {
            return Ok(());
        }
        let st = fstat(ino.fd.as_raw_fd())?;
        let cur = self.attr(ino, &st);
        let mut mode = cur.mode & !libc::S_ISUID;
        if mode & libc::S_IXGRP != 0 {
            mode &= !libc::S_ISGID;
        }
        if mode == cur.mode {
            return Ok(());
        }
        self.write_override(
            ino,
            &Override {
                uid: cur.uid,
                gid: cur.gid,
                mode,
                rdev: cur.rdev,
            },
        )
    }

    fn create(
        &self,
        h: &InHeader,
        name: &[u8],
        flags: i32,
        mode: u32,
        open_flags: u32,
    ) -> Result<Vec<u8>> {
        let name = component(name)?;
        let parent = self.inode(h.nodeid)?;
        let oflags = self.open_flags(flags)? | libc::O_CREAT;
        // The client's permission bits (never setuid/setgid/sticky), always owner-writable.
        let host_mode = (mode & 0o777) | 0o600;
        // O_NOFOLLOW (added by open_beneath): a symlink planted under this name is an error,
        // never a file created wherever it points. O_EXCL always: a file that already exists
        // (made by the host since the client last looked) is opened as it is, never given
        // the creator's ownership, and never removed if something fails.
        let fd = match open_beneath(
            parent.fd.as_raw_fd(),
            &name,
            oflags | libc::O_EXCL,
            host_mode,
        ) {
            Ok(fd) => fd,
            Err(libc::EEXIST) if flags & libc::O_EXCL == 0 => {
                let fd = open_beneath(parent.fd.as_raw_fd(), &name, oflags & !libc::O_CREAT, 0)?;
                let entry = self.lookup(h.nodeid, name.as_bytes())?;
                let ino = self.inode(entry.nodeid)?;
                if ino.kind != libc::S_IFREG {
                    self.forget(entry.nodeid, 1);
                    return Err(libc::EISDIR);
                }
                if open_flags & abi::OPEN_KILL_SUIDGID != 0 {
                    self.kill_suidgid(&ino)?;
                }
                let fh = self.add_handle(Handle::File(File::from(fd)))?;
                let mut body = entry_body(&entry);
                body.extend(self.open_reply(fh, flags));
                return Ok(body);
            }
            Err(e) => return Err(e),
        };
        let file = File::from(fd);
        let (gid, _) = self.new_gid(&parent, h)?;
        let ov = Override {
            uid: h.uid,
            gid,
            mode: libc::S_IFREG | (mode & 0o7777),
            rdev: 0,
        };
        let entry = self.created(&parent, &name, ov)?;
        let fh = self.add_handle(Handle::File(file))?;
        let mut body = entry_body(&entry);
        body.extend(self.open_reply(fh, flags));
        Ok(body)
    }

    fn read(&self, fh: u64, off: u64, size: u32) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; size.min(MAX_WRITE) as usize];
        let got = self.read_to(fh, off, &mut buf)?;
        buf.truncate(got);
        Ok(buf)
    }

    /// Reads from handle `fh` at `off` until `buf` is full or the file ends.
    fn read_to(&self, fh: u64, off: u64, buf: &mut [u8]) -> Result<usize> {
        let h = self.file_of(fh)?;
        let Handle::File(f) = &*h else {
            return Err(libc::EISDIR);
        };
        let size = buf.len();
        let mut got = 0;
        while got < size {
            // SAFETY: the buffer range is valid for `size - got` bytes; the fd is live.
            let n = unsafe {
                libc::pread64(
                    f.as_raw_fd(),
                    buf[got..].as_mut_ptr().cast(),
                    size - got,
                    (off + got as u64) as i64,
                )
            };
            if n < 0 {
                let e = errno();
                if e == libc::EINTR {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            got += n as usize;
        }
        self.bytes_read.fetch_add(got as u64, Ordering::Relaxed);
        self.pace(0, got as u64);
        Ok(got)
    }

    fn write(&self, fh: u64, off: u64, data: &[u8]) -> Result<Vec<u8>> {
        if data.len() > MAX_WRITE as usize {
            return Err(libc::EINVAL);
        }
        let h = self.file_of(fh)?;
        let Handle::File(f) = &*h else {
            return Err(libc::EISDIR);
        };
        // SAFETY: `data` is valid for its length; the fd is live.
        let n =
            unsafe { libc::pwrite64(f.as_raw_fd(), data.as_ptr().cast(), data.len(), off as i64) };
        if n < 0 {
            return Err(errno());
        }
        self.bytes_written.fetch_add(n as u64, Ordering::Relaxed);
        self.pace(0, n as u64);
        let mut w = Writer::default();
        w.u32(n as u32).u32(0);
        Ok(w.buf)
    }

    fn statfs(&self, id: u64) -> Result<Vec<u8>> {
        let ino = self.inode(id)?;
        // SAFETY: an all-zero statvfs64 is a valid value of this plain C struct.
        let mut s: libc::statvfs64 = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and out-pointer.
        check(unsafe { libc::fstatvfs64(ino.fd.as_raw_fd(), &mut s) })?;
        let mut w = Writer::default();
        w.u64(s.f_blocks)
            .u64(s.f_bfree)
            .u64(s.f_bavail)
            .u64(s.f_files)
            .u64(s.f_ffree)
            .u32(s.f_bsize as u32)
            .u32(s.f_namemax as u32)
            .u32(s.f_frsize as u32)
            .u32(0);
        w.buf.resize(80, 0);
        Ok(w.buf)
    }

    /// A write drops the file's capability, as the VFS does for any writer (direct writes
    /// leave it to us; for cached ones the client has done it already and we find none).
    fn kill_caps(&self, ino: &Inode) {
        if ino.kind != libc::S_IFREG || ino.no_caps.load(Ordering::Relaxed) {
            return;
        }
        let path = self.proc_path(ino);
        // SAFETY: NUL-terminated strings.
        let r = unsafe { libc::removexattr(path.as_ptr(), CAPS_XATTR_C.as_ptr()) };
        if r < 0 && errno() != libc::ENODATA {
            tracing::debug!(
                "fuse: dropping a file capability: {}",
                io::Error::last_os_error()
            );
            return;
        }
        self.note_no_caps(ino);
    }

    /// Remembers that `ino` has no file capability, unless the host may change the file
    /// underneath us (cache policy `none`).
    fn note_no_caps(&self, ino: &Inode) {
        ino.no_caps
            .store(self.cfg.cache != CachePolicy::None, Ordering::Relaxed);
    }

    /// The host name of the client's attribute `name` (see [`MAPPED_XATTR_PREFIX`]).
    fn xattr_name(name: &[u8]) -> Result<CString> {
        if name.starts_with(PRIVATE_XATTR_PREFIX) {
            return Err(libc::EPERM);
        }
        if name.is_empty() || name.len() > 255 {
            return Err(libc::ERANGE);
        }
        let host = if name.starts_with(b"user.") {
            name.to_vec()
        } else {
            [MAPPED_XATTR_PREFIX, name].concat()
        };
        if host.len() > 255 {
            return Err(libc::ERANGE);
        }
        CString::new(host).map_err(|_| libc::EINVAL)
    }

    fn setxattr(&self, id: u64, name: &[u8], value: &[u8], flags: i32) -> Result<Vec<u8>> {
        let name = Self::xattr_name(name)?;
        if value.len() > MAX_XATTR {
            return Err(libc::E2BIG);
        }
        let ino = self.inode(id)?;
        if ino.kind == libc::S_IFLNK {
            return Err(libc::ENOTSUP);
        }
        if name.as_c_str() == CAPS_XATTR_C {
            ino.no_caps.store(false, Ordering::Relaxed);
        }
        let path = self.proc_path(&ino);
        // SAFETY: NUL-terminated strings and a value of the length passed.
        check(unsafe {
            libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                flags,
            )
        })?;
        Ok(Vec::new())
    }

    fn getxattr(&self, id: u64, name: &[u8], size: u32) -> Result<Vec<u8>> {
        let name =
            Self::xattr_name(name).map_err(|e| if e == libc::EPERM { libc::ENODATA } else { e })?;
        let ino = self.inode(id)?;
        if ino.kind == libc::S_IFLNK {
            return Err(libc::ENODATA);
        }
        let mut buf = vec![0u8; MAX_XATTR];
        let n = self.get_xattr(&ino, &name, &mut buf)?;
        buf.truncate(n);
        size_or_data(buf, size)
    }

    fn listxattr(&self, id: u64, size: u32) -> Result<Vec<u8>> {
        let ino = self.inode(id)?;
        if ino.kind == libc::S_IFLNK {
            return size_or_data(Vec::new(), size);
        }
        let path = self.proc_path(&ino);
        let mut buf = vec![0u8; MAX_XATTR];
        // SAFETY: NUL-terminated path and a buffer of the length passed.
        let n = unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(errno());
        }
        buf.truncate(n as usize);
        // The client's names: ours mapped back, our own hidden, and the host's attributes
        // outside `user.` (which the client could not read) left out.
        let list: Vec<u8> =
            buf.split(|&b| b == 0)
                .filter_map(|n| match n.strip_prefix(MAPPED_XATTR_PREFIX) {
                    Some(orig) if !orig.starts_with(b"user.") => Some(orig),
                    Some(_) => None,
                    None => (n.starts_with(b"user.") && !n.starts_with(PRIVATE_XATTR_PREFIX))
                        .then_some(n),
                })
                .flat_map(|n| n.iter().copied().chain([0]))
                .collect();
        size_or_data(list, size)
    }

    fn removexattr(&self, id: u64, name: &[u8]) -> Result<Vec<u8>> {
        let name = Self::xattr_name(name)?;
        let ino = self.inode(id)?;
        if ino.kind == libc::S_IFLNK {
            return Err(libc::ENOTSUP);
        }
        let path = self.proc_path(&ino);
        // SAFETY: NUL-terminated strings.
        check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) })?;
        Ok(Vec::new())
    }

    fn opendir(&self, id: u64) -> Result<Vec<u8>> {
        let ino = self.inode(id)?;
        if ino.kind != libc::S_IFDIR {
            return Err(libc::ENOTDIR);
        }
        let dir = self.reopen(&ino, libc::O_RDONLY | libc::O_DIRECTORY)?;
        let fh = self.add_handle(Handle::Dir {
            dir,
            entries: Mutex::new(None),
        })?;
        let mut w = Writer::default();
        // The client caches the listing; KEEP_CACHE keeps it from one opendir to the next
        // (without it every open drops it). Its own changes to the directory drop it anyway.
        let flags = if self.cfg.cache == CachePolicy::Always {
            fopen::CACHE_DIR | fopen::KEEP_CACHE
        } else {
            0
        };
        w.u64(fh).u32(flags).u32(0);
        Ok(w.buf)
    }

    fn list(dir: &File) -> Result<Vec<DirEntry>> {
        let path = format!("/proc/self/fd/{}", dir.as_raw_fd());
        let mut out = vec![
            DirEntry {
                name: b".".to_vec(),
                ino: 0,
                typ: libc::DT_DIR as u32,
            },
            DirEntry {
                name: b"..".to_vec(),
                ino: 0,
                typ: libc::DT_DIR as u32,
            },
        ];
        let rd = std::fs::read_dir(path).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        for e in rd {
            let e = e.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
            let typ = match e.file_type() {
                Ok(t) => {
                    use std::os::unix::fs::FileTypeExt;
                    if t.is_dir() {
                        libc::DT_DIR
                    } else if t.is_symlink() {
                        libc::DT_LNK
                    } else if t.is_file() {
                        libc::DT_REG
                    } else if t.is_char_device() {
                        libc::DT_CHR
                    } else if t.is_block_device() {
                        libc::DT_BLK
                    } else if t.is_fifo() {
                        libc::DT_FIFO
                    } else if t.is_socket() {
                        libc::DT_SOCK
                    } else {
                        libc::DT_UNKNOWN
                    }
                }
                Err(_) => libc::DT_UNKNOWN,
            };
            use std::os::unix::fs::DirEntryExt;
            out.push(DirEntry {
                name: e.file_name().as_bytes().to_vec(),
                ino: e.ino(),
                typ: u32::from(typ),
            });
        }
        Ok(out)
    }

    fn readdir(&self, id: u64, fh: u64, off: u64, size: u32, plus: bool) -> Result<Vec<u8>> {
        let h = self.handle_of(fh)?;
        let Handle::Dir { dir, entries } = &*h else {
            return Err(libc::ENOTDIR);
        };
        let size = (size as usize).min(MAX_READDIR);
        let mut snapshot = lock(entries);
        if off == 0 || snapshot.is_none() {
            // A fresh listing at offset 0 (rewinddir); later offsets index into it.
            *snapshot = Some(Self::list(dir)?);
        }
        let list = snapshot.as_ref().expect("just filled");
        let parent = self.inode(id)?;
        let mut w = Writer::default();
        for (i, e) in list.iter().enumerate().skip(off as usize) {
            let need = abi::dirent_len(e.name.len()) + if plus { abi::ENTRY_OUT_LEN } else { 0 };
            if w.buf.len() + need > size {
                break;
            }
            if plus {
                let entry = if e.name == b"." || e.name == b".." {
                    EntryOut::default()
                } else {
                    match self.lookup(id, &e.name) {
                        Ok(en) => en,
                        // Gone since the listing: skip it.
                        Err(_) => continue,
                    }
                };
                entry.write(&mut w);
            }
            let ino = if e.ino == 0 { parent.key.1 } else { e.ino };
            abi::write_dirent(&mut w, ino, i as u64 + 1, e.typ, &e.name);
        }
        Ok(w.buf)
    }

    fn access(&self, h: &InHeader, mask: u32) -> Result<Vec<u8>> {
        let ino = self.inode(h.nodeid)?;
        let ov = self.current_override(&ino)?;
        if mask == libc::F_OK as u32 {
            return Ok(Vec::new());
        }
        let perm = ov.mode & 0o7777;
        let bits = if h.uid == 0 {
            // Root may read and write anything, and execute what anyone may execute.
            let x = if perm & 0o111 != 0 || ov.mode & libc::S_IFMT == libc::S_IFDIR {
                1
            } else {
                0
            };
            6 | x
        } else if h.uid == ov.uid {
            (perm >> 6) & 7
        } else if h.gid == ov.gid {
            (perm >> 3) & 7
        } else {
            perm & 7
        };
        if mask & 7 & !bits != 0 {
            return Err(libc::EACCES);
        }
        Ok(Vec::new())
    }
}

/// Says once per process that a share ran into its limit (the guest now sees ENFILE, "Too
/// many open files in system"), and what raises it when the fd limit is what set it.
fn limit_reached(what: &str, limit: usize) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        tracing::warn!(
            "a shared directory reached its limit of {limit} {what}; the guest gets 'Too many \
             open files in system' for more (each is an fd of the VMM: where RLIMIT_NOFILE \
             set the limit, raise the hard limit: ulimit -Hn 1048576, or LimitNOFILE=)"
        )
    });
}

/// The most open files the kernel lets any process have (`fs.nr_open`), at most 2^20.
pub fn nofile_ceiling() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20)
        .min(1 << 20)
}

/// Raises this process's RLIMIT_NOFILE as far as it may: the hard limit up to
/// [`nofile_ceiling`] where we are privileged (as virtiofsd does: each inode the guest holds
/// is an fd of ours, and a hard limit of 4096, the kernel's default, would stop a guest's
/// `find /` after some 3000 files), then the soft limit to the hard one. Returns the soft
/// limit now.
fn raise_nofile_limit() -> u64 {
    // SAFETY: rlimit is plain old data; all-zero is valid.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 1024;
    }
    let ceiling = nofile_ceiling();
    if rl.rlim_max < ceiling {
        let raised = libc::rlimit {
            rlim_cur: ceiling,
            rlim_max: ceiling,
        };
        // SAFETY: a valid rlimit; without CAP_SYS_RESOURCE this fails and changes nothing.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return ceiling;
        }
    }
    if rl.rlim_cur < rl.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: rl.rlim_max,
            rlim_max: rl.rlim_max,
        };
        // SAFETY: a valid rlimit; raising the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    rl.rlim_cur
}

fn entry_body(e: &EntryOut) -> Vec<u8> {
    let mut w = Writer::default();
    e.write(&mut w);
    w.buf
}

/// GETXATTR/LISTXATTR: size 0 asks for the length; too small a size is ERANGE.
fn size_or_data(data: Vec<u8>, size: u32) -> Result<Vec<u8>> {
    if size == 0 {
        let mut w = Writer::default();
        w.u32(data.len() as u32).u32(0);
        return Ok(w.buf);
    }
    if data.len() > size as usize {
        return Err(libc::ERANGE);
    }
    Ok(data)
}

/// The kernel's `new_encode_dev`, which FUSE uses for `rdev`.
fn new_encode_dev(dev: u64) -> u32 {
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

mod persist;
pub use persist::{FsPersistError, FsState, HandleState, NodeState, RestoreReport};

#[cfg(test)]
mod tests;
