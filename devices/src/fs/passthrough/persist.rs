//! Saving and rebuilding a share's FUSE state across a snapshot.
//!
//! The guest kernel keeps node ids and file handles it got from us; a restored guest goes on
//! using them. So the node table (node id → path within the share, lookup count) and the open
//! handles (→ path, open flags) are saved, and a restore on a fresh server for the same share
//! reopens each by path. A node or handle whose file is gone (deleted on the host, or unlinked
//! while open before the snapshot) comes back stale: the guest gets ESTALE for it, never
//! another file and never a crash.
//!
//! Paths come from a snapshot file that may have been tampered with: each is walked one
//! component at a time from the share's root, never following a symlink and never leaving the
//! share (the same rules as a guest LOOKUP).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::{component, fstat, lock, open_beneath, Handle, Inode, PassthroughFs};
use crate::fs::abi;

/// One node the guest holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub id: u64,
    /// Within the share, `/`-separated, no leading `/`; `None` when the file was already
    /// deleted at snapshot time.
    pub path: Option<Vec<u8>>,
    /// The guest's lookup count.
    pub refs: u64,
}

/// One open handle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandleState {
    pub fh: u64,
    pub path: Option<Vec<u8>>,
    /// `O_ACCMODE`, `O_APPEND`, `O_NONBLOCK`, `O_SYNC`, `O_DSYNC`, `O_NOATIME` as opened.
    pub flags: i32,
    pub dir: bool,
}

/// A share's FUSE state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    /// The guest sent INIT (a restored guest will not send it again).
    pub initialized: bool,
    pub next_id: u64,
    pub nodes: Vec<NodeState>,
    pub next_handle: u64,
    pub handles: Vec<HandleState>,
    /// Nodes and handles already stale when saved.
    pub stale_nodes: Vec<u64>,
    pub stale_handles: Vec<u64>,
}

/// Why a share's state could not be saved or restored.
#[derive(Debug, Error)]
pub enum FsPersistError {
    #[error("the share's state can only be restored into a server no guest has used")]
    NotFresh,
    #[error("the saved state holds {0} nodes, over this share's limit")]
    TooManyNodes(usize),
    #[error("the saved state holds {0} handles, over this share's limit")]
    TooManyHandles(usize),
    #[error("saved node {0} is listed twice, is the root, or is at or past the next id")]
    BadNode(u64),
    #[error("saved handle {0} is listed twice or is at or past the next handle")]
    BadHandle(u64),
    #[error("cannot read the share root's path: {0}")]
    Root(std::io::Error),
}

/// What a restore found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestoreReport {
    pub nodes: usize,
    pub handles: usize,
    /// Nodes and handles whose file is gone: the guest gets ESTALE for them.
    pub stale_nodes: usize,
    pub stale_handles: usize,
}

/// Where `fd` is now, as a path within the share whose root is at `root` (absolute), or `None`
/// when the file is deleted or no longer under the root.
fn path_in_share(root: &[u8], fd: RawFd) -> Option<Vec<u8>> {
    let st = fstat(fd).ok()?;
    if st.st_nlink == 0 {
        return None;
    }
    let full = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let full = full.as_os_str().as_bytes();
    if full == root {
        return Some(Vec::new());
    }
    let rest = full.strip_prefix(root)?;
    let rest = if root == b"/" {
        rest
    } else {
        rest.strip_prefix(b"/")?
    };
    Some(rest.to_vec())
}

fn access_flags(fd: RawFd) -> i32 {
    // SAFETY: F_GETFL on an fd we own reads its status flags; no memory is passed.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    let keep = libc::O_ACCMODE
        | libc::O_APPEND
        | libc::O_NONBLOCK
        | libc::O_SYNC
        | libc::O_DSYNC
        | libc::O_NOATIME;
    if fl < 0 {
        libc::O_RDONLY
    } else {
        fl & keep
    }
}

impl PassthroughFs {
    fn root_bytes(&self) -> Result<Vec<u8>, FsPersistError> {
        let root = self
            .inode(abi::ROOT_ID)
            .map_err(|e| FsPersistError::Root(std::io::Error::from_raw_os_error(e)))?;
        let p = std::fs::read_link(format!("/proc/self/fd/{}", root.fd.as_raw_fd()))
            .map_err(FsPersistError::Root)?;
        Ok(p.as_os_str().as_bytes().to_vec())
    }

    /// The node table and open handles. Take it while no request is being served (the
    /// device's worker quiesced).
    pub fn save_state(&self) -> Result<FsState, FsPersistError> {
        let root = self.root_bytes()?;
        let t = lock(&self.inodes);
        let mut nodes: Vec<NodeState> = t
            .by_id
            .iter()
            .filter(|(&id, _)| id != abi::ROOT_ID)
            .map(|(&id, ino)| NodeState {
                id,
                path: path_in_share(&root, ino.fd.as_raw_fd()),
                refs: ino.refs.load(Ordering::Relaxed),
            })
            .collect();
        nodes.sort_by_key(|n| n.id);
        let mut stale_nodes: Vec<u64> = t.stale.iter().copied().collect();
        stale_nodes.sort_unstable();
        let next_id = t.next_id;
        drop(t);
        let h = lock(&self.handles);
        let mut handles: Vec<HandleState> = h
            .iter()
            .map(|(&fh, handle)| HandleState {
                fh,
                path: path_in_share(&root, handle.fd()),
                flags: access_flags(handle.fd()),
                dir: matches!(**handle, Handle::Dir { .. }),
            })
            .collect();
        drop(h);
        handles.sort_by_key(|h| h.fh);
        let mut stale_handles: Vec<u64> = lock(&self.stale_handles).iter().copied().collect();
        stale_handles.sort_unstable();
        Ok(FsState {
            initialized: self.initialized.load(Ordering::Acquire),
            next_id,
            nodes,
            next_handle: self.next_handle.load(Ordering::Relaxed),
            handles,
            stale_nodes,
            stale_handles,
        })
    }

    /// Walks `path` from the share root, one checked component at a time, never following a
    /// symlink; `None` if any step fails.
    fn open_in_share(&self, path: &[u8]) -> Option<OwnedFd> {
        let root = self.inode(abi::ROOT_ID).ok()?;
        let mut fd = open_beneath(root.fd.as_raw_fd(), c".", libc::O_PATH, 0).ok()?;
        if path.is_empty() {
            return Some(fd);
        }
        for name in path.split(|&b| b == b'/') {
            let c = component(name).ok()?;
            fd = open_beneath(fd.as_raw_fd(), &c, libc::O_PATH, 0).ok()?;
        }
        Some(fd)
    }

    /// Rebuilds the saved node table and handles in this server, which must be fresh (no
    /// guest has used it). Files that are gone come back stale.
    pub fn restore_state(&self, state: &FsState) -> Result<RestoreReport, FsPersistError> {
        {
            let t = lock(&self.inodes);
            if t.by_id.len() != 1 || !lock(&self.handles).is_empty() {
                return Err(FsPersistError::NotFresh);
            }
        }
        let node_count = state.nodes.len() + state.stale_nodes.len();
        if node_count >= self.cfg.max_inodes {
            return Err(FsPersistError::TooManyNodes(node_count));
        }
        let handle_count = state.handles.len() + state.stale_handles.len();
        if handle_count > self.cfg.max_handles {
            return Err(FsPersistError::TooManyHandles(handle_count));
        }
        let mut ids = HashSet::new();
        for id in state
            .nodes
            .iter()
            .map(|n| n.id)
            .chain(state.stale_nodes.iter().copied())
        {
            if id <= abi::ROOT_ID || id >= state.next_id || !ids.insert(id) {
                return Err(FsPersistError::BadNode(id));
            }
        }
        let mut fhs = HashSet::new();
        for fh in state
            .handles
            .iter()
            .map(|h| h.fh)
            .chain(state.stale_handles.iter().copied())
        {
            if fh == 0 || fh >= state.next_handle || !fhs.insert(fh) {
                return Err(FsPersistError::BadHandle(fh));
            }
        }

        let mut report = RestoreReport::default();
        let mut by_id = HashMap::new();
        let mut by_key = HashMap::new();
        let mut stale: HashSet<u64> = state.stale_nodes.iter().copied().collect();
        for n in &state.nodes {
            let opened = n.path.as_deref().and_then(|p| self.open_in_share(p));
            let Some((fd, st)) =
                opened.and_then(|fd| fstat(fd.as_raw_fd()).ok().map(|st| (fd, st)))
            else {
                stale.insert(n.id);
                continue;
            };
            let key = (st.st_dev, st.st_ino);
            by_key.entry(key).or_insert(n.id);
            by_id.insert(
                n.id,
                Arc::new(Inode {
                    fd,
                    key,
                    kind: st.st_mode & libc::S_IFMT,
                    refs: AtomicU64::new(n.refs.max(1)),
                    ov: Mutex::new(None),
                    no_caps: AtomicBool::new(false),
                }),
            );
        }
        report.nodes = by_id.len();
        report.stale_nodes = stale.len();

        let mut handles = HashMap::new();
        let mut stale_handles: HashSet<u64> = state.stale_handles.iter().copied().collect();
        for h in &state.handles {
            match self.reopen_saved(h) {
                Some(handle) => {
                    handles.insert(h.fh, Arc::new(handle));
                }
                None => {
                    stale_handles.insert(h.fh);
                }
            }
        }
        report.handles = handles.len();
        report.stale_handles = stale_handles.len();

        let mut t = lock(&self.inodes);
        for (key, id) in by_key {
            t.by_key.entry(key).or_insert(id);
        }
        t.by_id.extend(by_id);
        t.stale = stale;
        t.next_id = state.next_id.max(t.next_id);
        drop(t);
        *lock(&self.handles) = handles;
        *lock(&self.stale_handles) = stale_handles;
        self.next_handle
            .fetch_max(state.next_handle, Ordering::Relaxed);
        self.initialized.store(state.initialized, Ordering::Release);
        if report.stale_nodes + report.stale_handles > 0 {
            tracing::warn!(
                "fuse: {} nodes and {} open files of the share are gone since the snapshot; the guest gets ESTALE for them",
                report.stale_nodes,
                report.stale_handles
            );
        }
        Ok(report)
    }

    /// Reopens a saved handle by its path, with its saved flags (never truncating or
    /// creating), under the same rules as OPEN and OPENDIR.
    fn reopen_saved(&self, h: &HandleState) -> Option<Handle> {
        let fd = self.open_in_share(h.path.as_deref()?)?;
        let st = fstat(fd.as_raw_fd()).ok()?;
        let kind = st.st_mode & libc::S_IFMT;
        let probe = Inode {
            fd,
            key: (st.st_dev, st.st_ino),
            kind,
            refs: AtomicU64::new(0),
            ov: Mutex::new(None),
            no_caps: AtomicBool::new(false),
        };
        if h.dir {
            if kind != libc::S_IFDIR {
                return None;
            }
            let dir = self
                .reopen(&probe, libc::O_RDONLY | libc::O_DIRECTORY)
                .ok()?;
            return Some(Handle::Dir {
                dir,
                entries: Mutex::new(None),
            });
        }
        if kind != libc::S_IFREG {
            return None;
        }
        let flags = self
            .open_flags(h.flags & !(libc::O_TRUNC | libc::O_CREAT | libc::O_EXCL))
            .ok()?;
        Some(Handle::File(self.reopen(&probe, flags).ok()?))
    }
}
