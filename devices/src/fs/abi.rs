//! The FUSE wire format (Linux `include/uapi/linux/fuse.h`, protocol 7.31 as we speak it):
//! opcodes, flags and the structs we read and write, with bounds-checked decoding. Requests
//! come from a guest (or the host kernel over `/dev/fuse`) and are hostile: every read is
//! checked against the bytes actually present.

use thiserror::Error;

/// Protocol major version we speak.
pub const KERNEL_VERSION: u32 = 7;
/// Highest minor version we speak; the reply uses min(theirs, ours).
pub const KERNEL_MINOR_VERSION: u32 = 31;
/// Oldest minor whose struct layouts we produce.
pub const MIN_MINOR_VERSION: u32 = 27;

/// The root's node id, fixed by the protocol.
pub const ROOT_ID: u64 = 1;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;
pub const ATTR_LEN: usize = 88;
pub const ENTRY_OUT_LEN: usize = 40 + ATTR_LEN;
pub const ATTR_OUT_LEN: usize = 16 + ATTR_LEN;
pub const OPEN_OUT_LEN: usize = 16;
pub const DIRENT_LEN: usize = 24;

/// Opcodes.
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const GETLK: u32 = 31;
    pub const SETLK: u32 = 32;
    pub const SETLKW: u32 = 33;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const SYNCFS: u32 = 50;

    /// The request's name, for statistics and logs.
    pub fn name(op: u32) -> &'static str {
        match op {
            LOOKUP => "LOOKUP",
            FORGET => "FORGET",
            GETATTR => "GETATTR",
            SETATTR => "SETATTR",
            READLINK => "READLINK",
            SYMLINK => "SYMLINK",
            MKNOD => "MKNOD",
            MKDIR => "MKDIR",
            UNLINK => "UNLINK",
            RMDIR => "RMDIR",
            RENAME => "RENAME",
            LINK => "LINK",
            OPEN => "OPEN",
            READ => "READ",
            WRITE => "WRITE",
            STATFS => "STATFS",
            RELEASE => "RELEASE",
            FSYNC => "FSYNC",
            SETXATTR => "SETXATTR",
            GETXATTR => "GETXATTR",
            LISTXATTR => "LISTXATTR",
            REMOVEXATTR => "REMOVEXATTR",
            FLUSH => "FLUSH",
            INIT => "INIT",
            OPENDIR => "OPENDIR",
            READDIR => "READDIR",
            RELEASEDIR => "RELEASEDIR",
            FSYNCDIR => "FSYNCDIR",
            GETLK => "GETLK",
            SETLK => "SETLK",
            SETLKW => "SETLKW",
            ACCESS => "ACCESS",
            CREATE => "CREATE",
            INTERRUPT => "INTERRUPT",
            DESTROY => "DESTROY",
            BATCH_FORGET => "BATCH_FORGET",
            FALLOCATE => "FALLOCATE",
            READDIRPLUS => "READDIRPLUS",
            RENAME2 => "RENAME2",
            LSEEK => "LSEEK",
            COPY_FILE_RANGE => "COPY_FILE_RANGE",
            SYNCFS => "SYNCFS",
            _ => "other",
        }
    }
}

/// INIT flags.
pub mod init {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const ATOMIC_O_TRUNC: u64 = 1 << 3;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const AUTO_INVAL_DATA: u64 = 1 << 12;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const READDIRPLUS_AUTO: u64 = 1 << 14;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const CACHE_SYMLINKS: u64 = 1 << 23;
    /// The server clears setuid/setgid on write, truncate and chown when the flags below ask
    /// (so the client needs no GETATTR before each chown nor an xattr probe per write).
    pub const HANDLE_KILLPRIV_V2: u64 = 1 << 28;
    /// `flags2` follows `flags` (bits 32 and up).
    pub const INIT_EXT: u64 = 1 << 30;
    /// Requests may also come through io_uring commands (Linux 6.14+).
    pub const OVER_IO_URING: u64 = 1 << 41;
}

/// WRITE `write_flags`: kill setuid/setgid (the writer lacks CAP_FSETID).
pub const WRITE_KILL_SUIDGID: u32 = 1 << 2;
/// OPEN/CREATE `open_flags`: kill setuid/setgid (O_TRUNC by a caller without CAP_FSETID).
pub const OPEN_KILL_SUIDGID: u32 = 1 << 0;

/// SETATTR `valid` bits.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const CTIME: u32 = 1 << 10;
    pub const KILL_SUIDGID: u32 = 1 << 11;
}

/// OPEN reply flags.
pub mod fopen {
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const KEEP_CACHE: u32 = 1 << 1;
    pub const CACHE_DIR: u32 = 1 << 3;
    /// No FLUSH on close: ours does nothing (locks are the client's own, writes are not
    /// buffered), so the request would be a round trip for no work.
    pub const NOFLUSH: u32 = 1 << 5;
}

/// A request that does not parse.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AbiError {
    #[error("request truncated: needed {needed} bytes at offset {at}, have {have}")]
    Truncated {
        at: usize,
        needed: usize,
        have: usize,
    },
    #[error("name is not NUL-terminated")]
    Unterminated,
}

/// A bounds-checked little-endian reader over one request.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], AbiError> {
        if self.remaining() < n {
            return Err(AbiError::Truncated {
                at: self.pos,
                needed: n,
                have: self.remaining(),
            });
        }
        let b = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(b)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        let b = &self.buf[self.pos..];
        self.pos = self.buf.len();
        b
    }

    pub fn u16(&mut self) -> Result<u16, AbiError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, AbiError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, AbiError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    pub fn skip(&mut self, n: usize) -> Result<(), AbiError> {
        self.bytes(n).map(|_| ())
    }

    /// A NUL-terminated string (without its NUL).
    pub fn cstr(&mut self) -> Result<&'a [u8], AbiError> {
        let rest = &self.buf[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(AbiError::Unterminated)?;
        self.pos += n + 1;
        Ok(&rest[..n])
    }
}

/// The header of every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl InHeader {
    pub fn parse(r: &mut Reader<'_>) -> Result<InHeader, AbiError> {
        let h = InHeader {
            len: r.u32()?,
            opcode: r.u32()?,
            unique: r.u64()?,
            nodeid: r.u64()?,
            uid: r.u32()?,
            gid: r.u32()?,
            pid: r.u32()?,
        };
        r.skip(4)?; // total_extlen, padding
        Ok(h)
    }

    pub fn encode(&self) -> [u8; IN_HEADER_LEN] {
        let mut b = [0u8; IN_HEADER_LEN];
        b[0..4].copy_from_slice(&self.len.to_le_bytes());
        b[4..8].copy_from_slice(&self.opcode.to_le_bytes());
        b[8..16].copy_from_slice(&self.unique.to_le_bytes());
        b[16..24].copy_from_slice(&self.nodeid.to_le_bytes());
        b[24..28].copy_from_slice(&self.uid.to_le_bytes());
        b[28..32].copy_from_slice(&self.gid.to_le_bytes());
        b[32..36].copy_from_slice(&self.pid.to_le_bytes());
        b
    }
}

/// A little-endian writer for replies.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    pub fn pad8(&mut self) -> &mut Self {
        while self.buf.len() % 8 != 0 {
            self.buf.push(0);
        }
        self
    }
}

/// File attributes as FUSE reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

impl Attr {
    pub fn write(&self, w: &mut Writer) {
        w.u64(self.ino)
            .u64(self.size)
            .u64(self.blocks)
            .u64(self.atime as u64)
            .u64(self.mtime as u64)
            .u64(self.ctime as u64)
            .u32(self.atimensec)
            .u32(self.mtimensec)
            .u32(self.ctimensec)
            .u32(self.mode)
            .u32(self.nlink)
            .u32(self.uid)
            .u32(self.gid)
            .u32(self.rdev)
            .u32(self.blksize)
            .u32(0);
    }
}

/// `fuse_entry_out`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    pub entry_valid: u64,
    pub attr_valid: u64,
    pub entry_valid_nsec: u32,
    pub attr_valid_nsec: u32,
    pub attr: Attr,
}

impl EntryOut {
    pub fn write(&self, w: &mut Writer) {
        w.u64(self.nodeid)
            .u64(self.generation)
            .u64(self.entry_valid)
            .u64(self.attr_valid)
            .u32(self.entry_valid_nsec)
            .u32(self.attr_valid_nsec);
        self.attr.write(w);
    }
}

/// One `fuse_dirent` (padded to 8 bytes): its encoded length.
pub fn dirent_len(name_len: usize) -> usize {
    (DIRENT_LEN + name_len + 7) & !7
}

/// Appends a `fuse_dirent`.
pub fn write_dirent(w: &mut Writer, ino: u64, off: u64, typ: u32, name: &[u8]) {
    w.u64(ino)
        .u64(off)
        .u32(name.len() as u32)
        .u32(typ)
        .bytes(name)
        .pad8();
}

/// The out header of a reply whose `body_len` bytes of body travel separately.
pub fn out_header(unique: u64, error: i32, body_len: usize) -> [u8; OUT_HEADER_LEN] {
    let mut h = [0u8; OUT_HEADER_LEN];
    h[..4].copy_from_slice(&((OUT_HEADER_LEN + body_len) as u32).to_le_bytes());
    h[4..8].copy_from_slice(&error.to_le_bytes());
    h[8..].copy_from_slice(&unique.to_le_bytes());
    h
}

/// Builds a complete reply: out header plus body.
pub fn reply(unique: u64, error: i32, body: &[u8]) -> Vec<u8> {
    let mut w = Writer {
        buf: Vec::with_capacity(OUT_HEADER_LEN + body.len()),
    };
    w.u32((OUT_HEADER_LEN + body.len()) as u32)
        .i32(error)
        .u64(unique)
        .bytes(body);
    w.buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_truncation() {
        let h = InHeader {
            len: 99,
            opcode: op::LOOKUP,
            unique: 7,
            nodeid: 1,
            uid: 1000,
            gid: 100,
            pid: 42,
        };
        let b = h.encode();
        assert_eq!(InHeader::parse(&mut Reader::new(&b)).unwrap(), h);
        assert!(matches!(
            InHeader::parse(&mut Reader::new(&b[..39])),
            Err(AbiError::Truncated { .. })
        ));
    }

    #[test]
    fn struct_sizes_match_the_kernel() {
        let mut w = Writer::default();
        Attr::default().write(&mut w);
        assert_eq!(w.buf.len(), ATTR_LEN);
        let mut w = Writer::default();
        EntryOut::default().write(&mut w);
        assert_eq!(w.buf.len(), ENTRY_OUT_LEN);
        let mut w = Writer::default();
        write_dirent(&mut w, 1, 2, 4, b"abc");
        assert_eq!(w.buf.len(), dirent_len(3));
        assert_eq!(dirent_len(3), 32);
    }

    #[test]
    fn names_must_be_terminated() {
        let mut r = Reader::new(b"abc\0def");
        assert_eq!(r.cstr().unwrap(), b"abc");
        assert_eq!(r.cstr(), Err(AbiError::Unterminated));
    }
}
