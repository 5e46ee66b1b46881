//! Unpacking one layer (a tar, plain, gzip or zstd) into a directory of the store, safely.
//!
//! A layer is hostile input: every entry's path is checked to stay inside the layer (no `..`,
//! no absolute path, no parent that is a symlink), hard links must point at a file already in
//! the layer, and sizes and entry counts are capped. Files are created owner-only; what the
//! guest sees (owner, mode with setuid bits, device numbers) goes into the passthrough
//! server's `user.msb.stat` attribute, so no setuid file or device node ever exists on the
//! host and the VMM needs no privilege to serve a root-owned tree.
//!
//! Whiteouts (`.wh.NAME`, `.wh..wh..opq`) are kept as empty marker files: the merge
//! ([`crate::merge`]) applies them across layers.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;

/// The passthrough server's override attribute (`UID:GID:MODE[:RDEV]`).
pub const STAT_XATTR: &str = "user.msb.stat";
/// On a placeholder file: the layer's hard link to this path of a lower layer.
pub const LINK_XATTR: &str = "user.msb.hardlink";
/// Where a file's non-`user.` attributes are kept (the passthrough server's mapping).
const MAPPED_XATTR_PREFIX: &str = "user.msb.x.";

/// Caps on what one layer may hold; beyond them the layer is refused as absurd.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Unpacked bytes of all files together.
    pub max_bytes: u64,
    /// Tar entries.
    pub max_entries: u64,
    /// Bytes of one path.
    pub max_path: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 << 30,
            max_entries: 4 << 20,
            max_path: 4096,
        }
    }
}

#[derive(Debug, Error)]
pub enum UnpackError {
    #[error("entry {path:?}: {why}")]
    Entry { path: String, why: String },
    #[error("the layer is not a readable tar stream: {0}")]
    Tar(io::Error),
    #[error("the layer holds more than {0} bytes")]
    TooBig(u64),
    #[error("the layer holds more than {0} entries")]
    TooManyEntries(u64),
    #[error("writing {path}: {err}")]
    Write { path: PathBuf, err: io::Error },
    #[error("the file system under {0} keeps no user extended attributes (needed to record owners and modes); put the cache (MSB_CACHE_DIR) on ext4, xfs or btrfs")]
    NoXattrs(PathBuf),
}

/// What an unpacked layer was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// `sha256:HEX` of the uncompressed tar (the layer's diff id).
    pub diff_id: String,
    /// Bytes of file data.
    pub bytes: u64,
    pub entries: u64,
    /// Whiteouts and placeholders for hard links into lower layers: entries that mean
    /// something only to the merge. A layer with none is a root by itself.
    pub markers: u64,
}

/// How a layer blob is compressed, told by its first bytes.
pub fn decompressor<'a, R: Read + 'a>(mut r: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut magic = [0u8; 4];
    let mut n = 0;
    while n < magic.len() {
        let k = r.read(&mut magic[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    let head = io::Cursor::new(magic[..n].to_vec());
    let chained = head.chain(r);
    Ok(if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::MultiGzDecoder::new(chained))
    } else if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        // libzstd's default window limit (128 MiB) refuses frames that would make us
        // allocate more; every frame of a multi-frame layer is read.
        Box::new(zstd::stream::read::Decoder::new(chained)?)
    } else {
        Box::new(chained)
    })
}

/// Unpacks the (possibly compressed) layer `blob` into `dest`, which must be a new, empty
/// directory. On error `dest` holds a partial layer: the caller discards it.
pub fn unpack(blob: impl Read, dest: &Path, limits: Limits) -> Result<Unpacked, UnpackError> {
    // The layer's root is a root-owned directory until a `./` entry says otherwise (as a
    // merged root is), so a layer can be a root by itself.
    set_xattr(dest, STAT_XATTR, default_dir_stat().as_bytes())
        .map_err(|err| stat_error(dest, dest, err))?;
    // Three threads: this one decompresses, one hashes the tar stream (the diff id), one
    // writes the files. Decompressing is the longest single task of a pull (0.55 s for a
    // 180 MB gzip layer on a 2-core Xeon), so this thread does nothing else; with zstd (0.2 s)
    // the writer would be the longest if it hashed too.
    type Chunk = std::sync::Arc<Vec<u8>>;
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Chunk>>(8);
    let (htx, hrx) = std::sync::mpsc::sync_channel::<Chunk>(8);
    std::thread::scope(|scope| {
        let hasher = scope.spawn(move || {
            let mut hash = Sha256::new();
            for c in hrx {
                hash.update(&c[..]);
            }
            format!("sha256:{}", hex::encode(hash.finalize()))
        });
        let writer = scope.spawn(move || -> Result<(u64, u64, u64), UnpackError> {
            let mut reader = ChunkReader {
                rx,
                cur: Default::default(),
                pos: 0,
            };
            let mut u = Unpacker {
                dest,
                limits,
                bytes: 0,
                entries: 0,
                markers: 0,
                dirs: Default::default(),
                buf: vec![0; 256 << 10],
            };
            let mut archive = tar::Archive::new(&mut reader);
            for entry in archive.entries().map_err(UnpackError::Tar)? {
                let entry = entry.map_err(UnpackError::Tar)?;
                u.entry(entry)?;
            }
            // What follows the tar's end (its padding) belongs to the diff id too: take it,
            // so the decompressing thread goes on to the end.
            reader.drain().map_err(UnpackError::Tar)?;
            Ok((u.bytes, u.entries, u.markers))
        });
        let inflated = (|| -> Result<(), UnpackError> {
            let mut tar_stream = decompressor(blob).map_err(UnpackError::Tar)?;
            loop {
                let mut chunk = vec![0u8; 256 << 10];
                let mut filled = 0;
                while filled < chunk.len() {
                    match tar_stream.read(&mut chunk[filled..]) {
                        Ok(0) => break,
                        Ok(k) => filled += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                            return Err(UnpackError::Tar(e));
                        }
                    }
                }
                if filled == 0 {
                    return Ok(());
                }
                chunk.truncate(filled);
                let chunk = std::sync::Arc::new(chunk);
                // The writer stops early only on an error, which it reports.
                if htx.send(chunk.clone()).is_err() || tx.send(Ok(chunk)).is_err() {
                    return Ok(());
                }
            }
        })();
        drop(tx);
        drop(htx);
        let panicked = |_| UnpackError::Tar(io::Error::other("an unpacking thread panicked"));
        let written = writer.join().map_err(panicked)?;
        let diff_id = hasher.join().map_err(panicked)?;
        inflated?;
        let (bytes, entries, markers) = written?;
        Ok(Unpacked {
            diff_id,
            bytes,
            entries,
            markers,
        })
    })
}

/// Reads the chunks the decompressing thread sends.
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<io::Result<std::sync::Arc<Vec<u8>>>>,
    cur: std::sync::Arc<Vec<u8>>,
    pos: usize,
}

impl ChunkReader {
    /// Takes the rest of the stream.
    fn drain(&mut self) -> io::Result<()> {
        for c in self.rx.iter() {
            c?;
        }
        Ok(())
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(c)) => {
                    self.cur = c;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

struct Unpacker<'a> {
    dest: &'a Path,
    limits: Limits,
    bytes: u64,
    entries: u64,
    markers: u64,
    /// Directories of the layer known to be real directories (checked or made by us), so
    /// each entry's parents cost no lookups; a path replaced by a later entry leaves it.
    dirs: std::collections::HashSet<PathBuf>,
    /// One large copy buffer: a file's data in few writes.
    buf: Vec<u8>,
}

/// The kernel's `new_encode_dev` (the device number FUSE carries).
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

impl Unpacker<'_> {
    fn entry<R: Read>(&mut self, mut e: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(UnpackError::TooManyEntries(self.limits.max_entries));
        }
        let raw = e.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let bad = |why: &str| UnpackError::Entry {
            path: shown.clone(),
            why: why.to_string(),
        };
        let rel = self.relative(&raw).map_err(|w| bad(&w))?;
        let header = e.header().clone();
        let kind = header.entry_type();
        let size = header.size().map_err(|_| bad("unreadable size"))?;
        if size > self.limits.max_bytes || self.bytes + size > self.limits.max_bytes {
            return Err(UnpackError::TooBig(self.limits.max_bytes));
        }
        let Some(rel) = rel else {
            // "./" itself: the layer's root; its metadata belongs to the image's root dir.
            if kind.is_dir() {
                let root = self.dest.to_path_buf();
                self.record(&root, &header, libc::S_IFDIR, 0, &shown)?;
            }
            return Ok(());
        };
        if is_whiteout(&rel) {
            self.markers += 1;
        }
        let path = self.dest.join(&rel);
        self.walk_parents(&rel, true).map_err(|w| bad(&w))?;
        let uid = header.uid().unwrap_or(0) as u32;
        let gid = header.gid().unwrap_or(0) as u32;
        let perm = header.mode().map_err(|_| bad("unreadable mode"))? & 0o7777;
        let xattrs = pax_xattrs(&mut e);
        let werr = |err: io::Error| UnpackError::Write {
            path: path.clone(),
            err,
        };
        match kind {
            tar::EntryType::Directory => {
                // Made first, looked at only when the name is taken: in a fresh layer
                // directory nearly every name is new, and a failed lookup costs a syscall.
                match mkdir(&path) {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        if !fs::symlink_metadata(&path).map_err(werr)?.is_dir() {
                            fs::remove_file(&path).map_err(werr)?;
                            mkdir(&path).map_err(werr)?;
                        }
                    }
                    r => r.map_err(werr)?,
                }
                self.set_stat(&path, uid, gid, libc::S_IFDIR | perm, 0, &shown)?;
                self.dirs.insert(path.clone());
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut f = self.create(&path, || new_file(&path)).map_err(werr)?;
                let n = copy_file(&mut (&mut e).take(size), &mut f, &mut self.buf)
                    .map_err(UnpackError::Tar)?;
                if n != size {
                    return Err(bad("truncated"));
                }
                self.bytes += n;
                f.flush().map_err(werr)?;
                if let Ok(mtime) = header.mtime() {
                    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime);
                    let _ = f.set_modified(t);
                }
                drop(f);
                self.set_stat(&path, uid, gid, libc::S_IFREG | perm, 0, &shown)?;
            }
            tar::EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| bad("symlink without a target"))?
                    .into_owned();
                if target.is_empty() || target.len() > self.limits.max_path || target.contains(&0) {
                    return Err(bad("bad symlink target"));
                }
                // Symlinks are never followed on the host (the passthrough server resolves
                // with O_NOFOLLOW and our own writes check every parent), so any target is
                // kept verbatim for the guest.
                let target = std::ffi::OsStr::from_bytes(&target);
                self.create(&path, || std::os::unix::fs::symlink(target, &path))
                    .map_err(werr)?;
            }
            tar::EntryType::Link => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| bad("hard link without a target"))?
                    .into_owned();
                let trel = self
                    .relative(&target)
                    .map_err(|w| bad(&format!("hard link target: {w}")))?
                    .ok_or_else(|| bad("hard link to the layer's root"))?;
                self.walk_parents(&trel, false)
                    .map_err(|w| bad(&format!("hard link target: {w}")))?;
                let tpath = self.dest.join(&trel);
                if tpath == path {
                    return Ok(());
                }
                match fs::symlink_metadata(&tpath) {
                    Ok(m) if m.is_file() => {
                        self.create(&path, || fs::hard_link(&tpath, &path))
                            .map_err(werr)?;
                    }
                    Ok(_) => return Err(bad("hard link to something not a regular file")),
                    Err(_) => {
                        // A link to a file of a lower layer: the merge makes it, once the
                        // merged tree has the target.
                        self.markers += 1;
                        self.create(&path, || new_file(&path)).map_err(werr)?;
                        set_xattr(&path, LINK_XATTR, trel.as_os_str().as_bytes()).map_err(werr)?;
                    }
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let (ty, rdev) = match kind {
                    tar::EntryType::Char | tar::EntryType::Block => {
                        let major = header.device_major().ok().flatten().unwrap_or(0);
                        let minor = header.device_minor().ok().flatten().unwrap_or(0);
                        let ty = if kind == tar::EntryType::Char {
                            libc::S_IFCHR
                        } else {
                            libc::S_IFBLK
                        };
                        (ty, encode_dev(major, minor))
                    }
                    _ => (libc::S_IFIFO, 0),
                };
                self.create(&path, || new_file(&path)).map_err(werr)?;
                self.set_stat(&path, uid, gid, ty | perm, rdev, &shown)?;
            }
            tar::EntryType::XHeader
            | tar::EntryType::XGlobalHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => {}
            other => {
                tracing::debug!(path = %shown, ?other, "layer entry of an unknown kind skipped");
                return Ok(());
            }
        }
        if !matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
            for (name, value) in xattrs {
                let stored = if name.starts_with("user.") && !name.starts_with("user.msb.") {
                    name
                } else {
                    format!("{MAPPED_XATTR_PREFIX}{name}")
                };
                set_xattr(&path, &stored, &value).map_err(werr)?;
            }
        }
        Ok(())
    }

    /// The entry's path relative to the layer, `None` for the root itself; an error names
    /// why the path could land outside.
    fn relative(&self, raw: &[u8]) -> Result<Option<PathBuf>, String> {
        if raw.len() > self.limits.max_path {
            return Err("path too long".into());
        }
        if raw.contains(&0) {
            return Err("NUL in the path".into());
        }
        let p = Path::new(std::ffi::OsStr::from_bytes(raw));
        let mut out = PathBuf::new();
        for c in p.components() {
            match c {
                Component::Normal(n) => out.push(n),
                Component::CurDir => {}
                Component::ParentDir => return Err("'..' in the path".into()),
                Component::RootDir | Component::Prefix(_) => {
                    return Err("absolute path".into());
                }
            }
        }
        Ok((!out.as_os_str().is_empty()).then_some(out))
    }

    /// Every parent of `rel` that exists is a real directory (never a symlink, which could
    /// lead out of the layer). A missing one is made (root-owned 0755 in the guest, as tar
    /// does) with `create`; without, the walk stops there (a hard link's target in a lower
    /// layer, linked by the merge).
    fn walk_parents(&mut self, rel: &Path, create: bool) -> Result<(), String> {
        let mut cur = self.dest.to_path_buf();
        if let Some(parent) = rel.parent() {
            for c in parent.components() {
                cur.push(c);
                if self.dirs.contains(&cur) {
                    continue;
                }
                match fs::symlink_metadata(&cur) {
                    Ok(m) if m.is_dir() => {}
                    Ok(m) if m.file_type().is_symlink() => {
                        return Err(
                            "a parent directory is a symlink (it could lead outside the layer)"
                                .into(),
                        )
                    }
                    Ok(_) => return Err("a parent is not a directory".into()),
                    Err(_) if !create => return Ok(()),
                    Err(_) => {
                        mkdir(&cur).map_err(|e| e.to_string())?;
                        set_xattr(&cur, STAT_XATTR, default_dir_stat().as_bytes())
                            .map_err(|e| e.to_string())?;
                    }
                }
                self.dirs.insert(cur.clone());
            }
        }
        Ok(())
    }

    /// `path` and everything under it are no longer known directories.
    fn forget(&mut self, path: &Path) {
        if self.dirs.remove(path) {
            self.dirs.retain(|d| !d.starts_with(path));
        }
    }

    /// Runs `make` (which creates a non-directory at `path`), making room first when the name
    /// is taken (a later entry of the same name wins).
    fn create<T>(&mut self, path: &Path, make: impl Fn() -> io::Result<T>) -> io::Result<T> {
        match make() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.replace(path)?;
                make()
            }
            r => r,
        }
    }

    /// Makes room for a non-directory at `path`.
    fn replace(&mut self, path: &Path) -> io::Result<()> {
        self.forget(path);
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(path),
            Ok(_) => fs::remove_file(path),
            Err(_) => Ok(()),
        }
    }

    fn record(
        &self,
        path: &Path,
        h: &tar::Header,
        ty: u32,
        rdev: u32,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let uid = h.uid().unwrap_or(0) as u32;
        let gid = h.gid().unwrap_or(0) as u32;
        let perm = h.mode().unwrap_or(0o755) & 0o7777;
        self.set_stat(path, uid, gid, ty | perm, rdev, shown)
    }

    fn set_stat(
        &self,
        path: &Path,
        uid: u32,
        gid: u32,
        mode: u32,
        rdev: u32,
        _shown: &str,
    ) -> Result<(), UnpackError> {
        let v = if rdev != 0 {
            format!("{uid}:{gid}:0{mode:o}:{rdev}")
        } else {
            format!("{uid}:{gid}:0{mode:o}")
        };
        set_xattr(path, STAT_XATTR, v.as_bytes()).map_err(|err| stat_error(self.dest, path, err))
    }
}

/// The stat record of a directory no entry describes: root-owned 0755, as tar makes it.
pub(crate) fn default_dir_stat() -> String {
    format!("0:0:0{:o}", libc::S_IFDIR | 0o755)
}

/// A stat record of `path` (in the layer at `dest`) that could not be written; a file
/// system without user xattrs is named as such.
fn stat_error(dest: &Path, path: &Path, err: io::Error) -> UnpackError {
    if err.raw_os_error() == Some(libc::ENOTSUP) {
        UnpackError::NoXattrs(dest.to_path_buf())
    } else {
        UnpackError::Write {
            path: path.to_path_buf(),
            err,
        }
    }
}

/// A new owner-only file at `path`, never through a symlink.
fn new_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Whether `rel` names a whiteout or an opaque-directory marker.
fn is_whiteout(rel: &Path) -> bool {
    rel.file_name()
        .is_some_and(|n| n.as_bytes().starts_with(crate::merge::WHITEOUT.as_bytes()))
}

/// Copies `r` to `w` through `buf`; returns the bytes copied.
fn copy_file(r: &mut impl Read, w: &mut impl Write, buf: &mut [u8]) -> io::Result<u64> {
    let mut n = 0;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match r.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(k) => filled += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(n);
        }
        w.write_all(&buf[..filled])?;
        n += filled as u64;
    }
}

/// The `SCHILY.xattr.*` attributes of an entry (capabilities, ACLs, user attributes).
fn pax_xattrs<R: Read>(e: &mut tar::Entry<'_, R>) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(Some(ext)) = e.pax_extensions() {
        for x in ext.flatten() {
            if let (Ok(k), v) = (x.key(), x.value_bytes()) {
                if let Some(name) = k.strip_prefix("SCHILY.xattr.") {
                    if !name.is_empty() && name.len() < 256 && v.len() <= 64 << 10 {
                        out.push((name.to_string(), v.to_vec()));
                    }
                }
            }
        }
    }
    out
}

/// Owner-only directories: the guest's view of their mode is in the attribute.
pub(crate) fn mkdir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(path)
}

/// Sets an extended attribute on `path` itself (never through a symlink).
pub(crate) fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: both strings are valid NUL-terminated C strings and `value` is a valid slice
    // for the length passed.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads an extended attribute of `path` itself.
pub(crate) fn get_xattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings; `buf` is writable for its length.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// Opens a layer blob file for unpacking.
pub fn open_blob(path: &Path) -> io::Result<io::BufReader<File>> {
    Ok(io::BufReader::with_capacity(1 << 20, File::open(path)?))
}

#[cfg(test)]
mod tests;
