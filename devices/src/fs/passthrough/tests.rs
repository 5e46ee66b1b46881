//! The server driven with raw FUSE requests, as a hostile client would send them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;

use super::*;

struct T {
    fs: PassthroughFs,
    share: PathBuf,
    outside: PathBuf,
    unique: AtomicU64,
    /// The share belongs to someone else (the unprivileged test): leave it.
    keep: bool,
}

fn tempdir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let p = std::env::temp_dir().join(format!(
        "msb-fs-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&p).unwrap();
    p
}

impl Drop for T {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.share);
        let _ = std::fs::remove_dir_all(&self.outside);
    }
}

impl T {
    fn new(cfg: Config) -> T {
        let share = tempdir("share");
        let outside = tempdir("outside");
        std::fs::write(outside.join("secret"), b"host secret").unwrap();
        T::serve(share, outside, cfg, false)
    }

    fn serve(share: PathBuf, outside: PathBuf, cfg: Config, keep: bool) -> T {
        let fs = PassthroughFs::new(&share, cfg).unwrap();
        let t = T {
            fs,
            share,
            outside,
            unique: AtomicU64::new(1),
            keep,
        };
        let mut w = Writer::default();
        w.u32(7).u32(41).u32(1 << 16).u32(0xffff_ffff);
        let (e, _) = t.call(op::INIT, 0, &w.buf);
        assert_eq!(e, 0);
        t
    }

    /// A request as root with a fresh id: (the id, the request).
    fn request(&self, opcode: u32, nodeid: u64, body: &[u8]) -> (u64, Vec<u8>) {
        let unique = self.unique.fetch_add(1, Ordering::Relaxed);
        let h = InHeader {
            len: (abi::IN_HEADER_LEN + body.len()) as u32,
            opcode,
            unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
        };
        let mut req = h.encode().to_vec();
        req.extend_from_slice(body);
        (unique, req)
    }

    fn call(&self, opcode: u32, nodeid: u64, body: &[u8]) -> (i32, Vec<u8>) {
        let (unique, req) = self.request(opcode, nodeid, body);
        let reply = self.fs.handle(&req).expect("a reply");
        let mut r = Reader::new(&reply);
        let len = r.u32().unwrap();
        assert_eq!(len as usize, reply.len());
        let err = r.u32().unwrap() as i32;
        assert_eq!(r.u64().unwrap(), unique);
        (-err, r.rest().to_vec())
    }

    fn lookup(&self, parent: u64, name: &str) -> std::result::Result<(u64, Attr), i32> {
        let (e, b) = self.call(op::LOOKUP, parent, &cname(name));
        if e != 0 {
            return Err(e);
        }
        match parse_entry(&b) {
            (0, _) => Err(libc::ENOENT), // a cacheable negative entry
            found => Ok(found),
        }
    }

    /// CREATE's errno and raw reply.
    fn create_call(&self, parent: u64, name: &str, flags: i32, mode: u32) -> (i32, Vec<u8>) {
        let mut w = Writer::default();
        w.u32(flags as u32)
            .u32(mode)
            .u32(0)
            .u32(0)
            .bytes(&cname(name));
        self.call(op::CREATE, parent, &w.buf)
    }

    fn create(
        &self,
        parent: u64,
        name: &str,
        flags: i32,
        mode: u32,
    ) -> std::result::Result<(u64, u64), i32> {
        let (e, b) = self.create_call(parent, name, flags, mode);
        if e != 0 {
            return Err(e);
        }
        let (id, _) = parse_entry(&b);
        let fh = u64::from_le_bytes(
            b[abi::ENTRY_OUT_LEN..abi::ENTRY_OUT_LEN + 8]
                .try_into()
                .unwrap(),
        );
        Ok((id, fh))
    }

    /// WRITE of `data` at offset 0 through handle `fh`; the errno.
    fn write(&self, id: u64, fh: u64, data: &[u8], write_flags: u32) -> i32 {
        let mut w = Writer::default();
        w.u64(fh)
            .u64(0)
            .u32(data.len() as u32)
            .u32(write_flags)
            .u64(0)
            .u32(0)
            .u32(0)
            .bytes(data);
        self.call(op::WRITE, id, &w.buf).0
    }

    fn open(&self, id: u64, flags: i32) -> std::result::Result<u64, i32> {
        let mut w = Writer::default();
        w.u32(flags as u32).u32(0);
        let (e, b) = self.call(op::OPEN, id, &w.buf);
        if e != 0 {
            return Err(e);
        }
        Ok(u64::from_le_bytes(b[..8].try_into().unwrap()))
    }

    fn setattr_mode_uid(&self, id: u64, mode: Option<u32>, uid: Option<u32>) -> (i32, Vec<u8>) {
        let mut valid = 0;
        if mode.is_some() {
            valid |= fattr::MODE;
        }
        if uid.is_some() {
            valid |= fattr::UID;
        }
        let mut w = Writer::default();
        w.u32(valid)
            .u32(0)
            .u64(0)
            .u64(0)
            .u64(0)
            .u64(0)
            .u64(0)
            .u64(0);
        w.u32(0)
            .u32(0)
            .u32(0)
            .u32(mode.unwrap_or(0))
            .u32(0)
            .u32(uid.unwrap_or(0))
            .u32(0)
            .u32(0);
        self.call(op::SETATTR, id, &w.buf)
    }
}

fn cname(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn parse_entry(b: &[u8]) -> (u64, Attr) {
    let mut r = Reader::new(b);
    let id = r.u64().unwrap();
    r.skip(32).unwrap();
    let ino = r.u64().unwrap();
    let size = r.u64().unwrap();
    r.skip(8 * 4 + 12).unwrap();
    let mode = r.u32().unwrap();
    let nlink = r.u32().unwrap();
    let uid = r.u32().unwrap();
    let gid = r.u32().unwrap();
    let rdev = r.u32().unwrap();
    (
        id,
        Attr {
            ino,
            size,
            mode,
            nlink,
            uid,
            gid,
            rdev,
            ..Default::default()
        },
    )
}

#[test]
fn io_uring_is_accepted_only_when_the_transport_offers_it() {
    // INIT replies: the flags word is at 12, flags2 at 32.
    let init_reply = |offer: bool| {
        let t = T::new(Config::default());
        t.fs.offer_io_uring(offer);
        let mut w = Writer::default();
        let flags = init::INIT_EXT | init::OVER_IO_URING;
        w.u32(7)
            .u32(41)
            .u32(1 << 16)
            .u32(flags as u32)
            .u32((flags >> 32) as u32);
        w.buf.resize(64, 0);
        let (e, body) = t.call(op::INIT, 0, &w.buf);
        assert_eq!(e, 0);
        let word = |at: usize| u64::from(u32::from_le_bytes(body[at..at + 4].try_into().unwrap()));
        word(12) | word(32) << 32
    };
    assert_eq!(
        init_reply(false) & init::OVER_IO_URING,
        0,
        "virtio-fs never gets it"
    );
    let on = init_reply(true);
    assert_ne!(on & init::OVER_IO_URING, 0);
    assert_ne!(on & init::INIT_EXT, 0, "flags2 is only read with INIT_EXT");
}

#[test]
fn requests_before_init_and_unknown_opcodes() {
    let share = tempdir("pre");
    let fs = PassthroughFs::new(&share, Config::default()).unwrap();
    let h = InHeader {
        len: abi::IN_HEADER_LEN as u32 + 2,
        opcode: op::LOOKUP,
        unique: 5,
        nodeid: 1,
        ..Default::default()
    };
    let mut req = h.encode().to_vec();
    req.extend_from_slice(b"a\0");
    let reply = fs.handle(&req).unwrap();
    assert_eq!(
        i32::from_le_bytes(reply[4..8].try_into().unwrap()),
        -libc::EIO
    );
    let _ = std::fs::remove_dir_all(share);

    let t = T::new(Config::default());
    assert_eq!(t.call(9999, 1, &[]).0, libc::ENOSYS);
    assert_eq!(t.call(op::GETLK, 1, &[0; 48]).0, libc::ENOSYS);
    // Truncated bodies are EINVAL, not a panic.
    for opcode in [
        op::SETATTR,
        op::MKNOD,
        op::MKDIR,
        op::RENAME,
        op::READ,
        op::WRITE,
        op::CREATE,
        op::SETXATTR,
        op::COPY_FILE_RANGE,
        op::FALLOCATE,
    ] {
        assert_eq!(
            t.call(opcode, 1, &[1, 2, 3]).0,
            libc::EINVAL,
            "opcode {opcode}"
        );
    }
    // A header that claims more bytes than were sent.
    let mut bad = InHeader {
        len: 4096,
        opcode: op::GETATTR,
        unique: 9,
        nodeid: 1,
        ..Default::default()
    }
    .encode()
    .to_vec();
    bad.extend_from_slice(&[0; 16]);
    let reply = t.fs.handle(&bad).unwrap();
    assert_eq!(
        i32::from_le_bytes(reply[4..8].try_into().unwrap()),
        -libc::EINVAL
    );
    assert!(t.fs.handle(&[1, 2, 3]).is_none());
    // Unknown node ids and handles.
    assert_eq!(t.call(op::GETATTR, 12345, &[0; 16]).0, libc::EBADF);
    let mut w = Writer::default();
    w.u64(777).u64(0).u32(10).u32(0).u64(0).u32(0).u32(0);
    assert_eq!(t.call(op::READ, 1, &w.buf).0, libc::EBADF);
    // FORGET of unknown nodes, BATCH_FORGET with a lying count: no reply, no panic.
    let mut f = InHeader {
        len: 48,
        opcode: op::FORGET,
        unique: 1,
        nodeid: 999,
        ..Default::default()
    }
    .encode()
    .to_vec();
    f.extend_from_slice(&5u64.to_le_bytes());
    assert!(t.fs.handle(&f).is_none());
    let mut w = Writer::default();
    w.u32(1000).u32(0).u64(1).u64(1);
    let mut bf = InHeader {
        len: (40 + w.buf.len()) as u32,
        opcode: op::BATCH_FORGET,
        unique: 2,
        ..Default::default()
    }
    .encode()
    .to_vec();
    bf.extend_from_slice(&w.buf);
    assert!(t.fs.handle(&bf).is_none());
    // The root survives any forget.
    assert_eq!(t.call(op::GETATTR, 1, &[0; 16]).0, 0);
}

#[test]
fn names_cannot_leave_the_share() {
    let t = T::new(Config::default());
    std::fs::create_dir(t.share.join("d")).unwrap();
    for name in ["a/b", "../secret", "d/../../x", ""] {
        assert_eq!(t.lookup(1, name).unwrap_err(), libc::EINVAL, "{name:?}");
    }
    // `..` at the root is the root; `.` is the node itself.
    assert_eq!(t.lookup(1, "..").unwrap().0, 1);
    assert_eq!(t.lookup(1, ".").unwrap().0, 1);
    let (d, _) = t.lookup(1, "d").unwrap();
    assert_eq!(t.lookup(d, "..").unwrap().0, 1);
    // Names with NUL inside cannot even be expressed; an unterminated one is EINVAL.
    assert_eq!(t.call(op::LOOKUP, 1, b"abc").0, libc::EINVAL);
    for op_ in [op::MKDIR, op::MKNOD] {
        let mut w = Writer::default();
        w.u32(0o40755).u32(0);
        if op_ == op::MKNOD {
            w.u32(0).u32(0);
        }
        w.bytes(b"..\0");
        assert_eq!(t.call(op_, 1, &w.buf).0, libc::EINVAL);
    }
}

#[test]
fn symlinks_are_never_followed_on_the_host() {
    let t = T::new(Config::default());
    let secret = t.outside.join("secret");
    std::os::unix::fs::symlink(&secret, t.share.join("abs")).unwrap();
    std::os::unix::fs::symlink("../../../../../../..", t.share.join("up")).unwrap();
    std::os::unix::fs::symlink(t.outside.join("new"), t.share.join("dangling")).unwrap();
    let (abs, a) = t.lookup(1, "abs").unwrap();
    assert_eq!(a.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(t.open(abs, libc::O_RDONLY).unwrap_err(), libc::EACCES);
    assert_eq!(
        t.open(abs, libc::O_WRONLY | libc::O_TRUNC).unwrap_err(),
        libc::EACCES
    );
    let (_, body) = t.call(op::READLINK, abs, &[]);
    assert_eq!(body, secret.as_os_str().as_bytes());
    // A symlink used as a directory.
    let (up, _) = t.lookup(1, "up").unwrap();
    assert!(t.lookup(up, "etc").is_err());
    assert!(t.create(up, "x", libc::O_WRONLY, 0o644).is_err());
    // Creating through a dangling symlink must not create its target.
    assert!(t.create(1, "dangling", libc::O_WRONLY, 0o644).is_err());
    assert!(!t.outside.join("new").exists());
    // Truncating or chmod-ing the symlink's node leaves the target alone.
    let _ = t.setattr_mode_uid(abs, Some(0o777), Some(0));
    assert_eq!(std::fs::read(&secret).unwrap(), b"host secret");
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o7777,
        0o644
    );
}

#[test]
fn a_directory_swapped_for_a_symlink_is_not_followed() {
    let t = T::new(Config::default());
    std::fs::create_dir(t.share.join("d")).unwrap();
    let (d, _) = t.lookup(1, "d").unwrap();
    // The host (or a racing guest) moves the directory away and plants a symlink.
    std::fs::rename(t.share.join("d"), t.share.join("moved")).unwrap();
    std::os::unix::fs::symlink(&t.outside, t.share.join("d")).unwrap();
    let (d2, a) = t.lookup(1, "d").unwrap();
    assert_eq!(a.mode & libc::S_IFMT, libc::S_IFLNK);
    assert!(t.create(d2, "planted", libc::O_WRONLY, 0o644).is_err());
    // The old node still names the moved directory, inside the share.
    t.create(d, "inside", libc::O_WRONLY, 0o644).unwrap();
    assert!(t.share.join("moved/inside").exists());
    assert!(!t.outside.join("planted").exists() && !t.outside.join("inside").exists());
}

#[test]
fn special_files_and_ownership_live_in_the_xattr() {
    let t = T::new(Config::default());
    // A char device 1:3 (/dev/null) made by the guest.
    let mut w = Writer::default();
    w.u32(libc::S_IFCHR | 0o666)
        .u32(259)
        .u32(0)
        .u32(0)
        .bytes(b"null\0");
    let (e, b) = t.call(op::MKNOD, 1, &w.buf);
    assert_eq!(e, 0);
    let (id, a) = parse_entry(&b);
    assert_eq!(a.mode, libc::S_IFCHR | 0o666);
    assert_eq!(a.rdev, 259);
    let host = std::fs::symlink_metadata(t.share.join("null")).unwrap();
    assert!(host.file_type().is_file(), "a plain file on the host");
    assert_eq!(host.mode() & 0o7777, 0o600);
    let v = xattr(&t.share.join("null"));
    assert_eq!(Override::parse(&v).unwrap().mode, libc::S_IFCHR | 0o666);
    let _ = id;

    // setuid root executable: setuid only in the guest's view.
    let (f, _) = t.create(1, "su", libc::O_WRONLY, 0o755).unwrap();
    let (e, b) = t.setattr_mode_uid(f, Some(0o4755), Some(0));
    assert_eq!(e, 0);
    let mode = u32::from_le_bytes(b[16 + 60..16 + 64].try_into().unwrap());
    assert_eq!(mode, libc::S_IFREG | 0o4755);
    let host = std::fs::metadata(t.share.join("su")).unwrap();
    assert_eq!(host.mode() & 0o7000, 0, "no setuid on the host");
    // chown to another user.
    let (e, b) = t.setattr_mode_uid(f, None, Some(1234));
    assert_eq!(e, 0);
    assert_eq!(
        u32::from_le_bytes(b[16 + 68..16 + 72].try_into().unwrap()),
        1234
    );
    // Clients can neither read nor write our attribute.
    let mut w = Writer::default();
    w.u32(64).u32(0).bytes(b"user.msb.stat\0");
    assert_eq!(t.call(op::GETXATTR, f, &w.buf).0, libc::ENODATA);
    let mut w = Writer::default();
    w.u32(5).u32(0).bytes(b"user.msb.stat\0").bytes(b"0:0:1");
    assert_eq!(t.call(op::SETXATTR, f, &w.buf).0, libc::EPERM);
    let mut w = Writer::default();
    w.u32(4096).u32(0);
    let (e, list) = t.call(op::LISTXATTR, f, &w.buf);
    assert_eq!(e, 0);
    assert!(!list.windows(8).any(|x| x == b"user.msb"), "{list:?}");
    // A client's file capability (or any attribute outside `user.`) is stored under our
    // prefix: it reads back in the client and never arms the host file.
    let cap = [
        1u8, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let mut w = Writer::default();
    w.u32(cap.len() as u32)
        .u32(0)
        .bytes(b"security.capability\0")
        .bytes(&cap);
    assert_eq!(t.call(op::SETXATTR, f, &w.buf).0, 0);
    let host = CString::new(t.share.join("su").as_os_str().as_bytes()).unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: NUL-terminated strings, a buffer of the length passed.
    let n = unsafe {
        libc::getxattr(
            host.as_ptr(),
            c"security.capability".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert_eq!(n, -1, "the host file has no capability");
    let mut w = Writer::default();
    w.u32(64).u32(0).bytes(b"security.capability\0");
    let (e, got) = t.call(op::GETXATTR, f, &w.buf);
    assert_eq!((e, &got[..]), (0, &cap[..]));
    let mut w = Writer::default();
    w.u32(4096).u32(0);
    let (_, list) = t.call(op::LISTXATTR, f, &w.buf);
    assert_eq!(list, b"security.capability\0");
    let mut w = Writer::default();
    w.u32(1).u32(0).bytes(b"user.msb.x.trusted.a\0").bytes(b"x");
    assert_eq!(t.call(op::SETXATTR, f, &w.buf).0, libc::EPERM);

    // A fifo on the host is never opened (it would block or reach another process).
    let fifo = CString::new(t.share.join("fifo").as_os_str().as_bytes()).unwrap();
    // SAFETY: NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let (fid, _) = t.lookup(1, "fifo").unwrap();
    assert_eq!(t.open(fid, libc::O_RDONLY).unwrap_err(), libc::EACCES);
}

fn xattr(p: &Path) -> Vec<u8> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = [0u8; 128];
    // SAFETY: valid strings and buffer.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            OVERRIDE_XATTR_C.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    assert!(n > 0, "xattr missing on {}", p.display());
    buf[..n as usize].to_vec()
}

#[test]
fn read_only_shares_refuse_every_write() {
    let t = T::new(Config {
        read_only: true,
        ..Default::default()
    });
    std::fs::write(t.share.join("f"), b"data").unwrap();
    let (f, _) = t.lookup(1, "f").unwrap();
    assert_eq!(t.open(f, libc::O_RDWR).unwrap_err(), libc::EROFS);
    assert_eq!(
        t.open(f, libc::O_RDONLY | libc::O_TRUNC).unwrap_err(),
        libc::EROFS
    );
    let fh = t.open(f, libc::O_RDONLY).unwrap();
    let mut w = Writer::default();
    w.u64(fh).u64(0).u32(4096).u32(0).u64(0).u32(0).u32(0);
    assert_eq!(t.call(op::READ, f, &w.buf), (0, b"data".to_vec()));
    for opcode in [
        op::SETATTR,
        op::SYMLINK,
        op::MKNOD,
        op::MKDIR,
        op::UNLINK,
        op::RMDIR,
        op::RENAME,
        op::RENAME2,
        op::LINK,
        op::WRITE,
        op::CREATE,
        op::SETXATTR,
        op::REMOVEXATTR,
        op::FALLOCATE,
        op::COPY_FILE_RANGE,
    ] {
        assert_eq!(
            t.call(opcode, 1, &[0; 128]).0,
            libc::EROFS,
            "opcode {opcode}"
        );
    }
    assert_eq!(std::fs::read(t.share.join("f")).unwrap(), b"data");
}

#[test]
fn links_renames_readdir_and_limits() {
    let t = T::new(Config {
        max_inodes: 12,
        max_handles: 8,
        ..Default::default()
    });
    let (f, fh) = t.create(1, "a", libc::O_RDWR, 0o644).unwrap();
    assert_eq!(t.write(f, fh, b"hello", 0), 0);
    // Hard link: same node, nlink 2.
    let mut w = Writer::default();
    w.u64(f).bytes(b"b\0");
    let (e, b) = t.call(op::LINK, 1, &w.buf);
    assert_eq!(e, 0);
    let (id, a) = parse_entry(&b);
    assert_eq!((id, a.nlink), (f, 2));
    // Linking a node id the client was never given.
    let mut w = Writer::default();
    w.u64(4242).bytes(b"c\0");
    assert_eq!(t.call(op::LINK, 1, &w.buf).0, libc::EBADF);
    // Rename over, and RENAME2 flags we do not support.
    std::fs::write(t.share.join("c"), b"old").unwrap();
    let mut w = Writer::default();
    w.u64(1).bytes(b"a\0c\0");
    assert_eq!(t.call(op::RENAME, 1, &w.buf).0, 0);
    assert_eq!(std::fs::read(t.share.join("c")).unwrap(), b"hello");
    let mut w = Writer::default();
    w.u64(1).u32(libc::RENAME_WHITEOUT).u32(0).bytes(b"b\0d\0");
    assert_eq!(t.call(op::RENAME2, 1, &w.buf).0, libc::EINVAL);
    // READDIR with an absurd size is capped, and lists what is there.
    for i in 0..20 {
        std::fs::write(t.share.join(format!("f{i}")), b"").unwrap();
    }
    let (e, b) = t.call(op::OPENDIR, 1, &[0; 8]);
    assert_eq!(e, 0);
    let dfh = u64::from_le_bytes(b[..8].try_into().unwrap());
    let mut w = Writer::default();
    w.u64(dfh).u64(0).u32(u32::MAX).u32(0).u64(0).u32(0).u32(0);
    let (e, list) = t.call(op::READDIR, 1, &w.buf);
    assert_eq!(e, 0);
    assert!(list.len() <= MAX_READDIR);
    let mut names = Vec::new();
    let mut r = Reader::new(&list);
    while r.remaining() > 0 {
        r.skip(16).unwrap();
        let n = r.u32().unwrap() as usize;
        r.skip(4).unwrap();
        names.push(String::from_utf8(r.bytes(n).unwrap().to_vec()).unwrap());
        r.skip(abi::dirent_len(n) - abi::DIRENT_LEN - n).unwrap();
    }
    assert_eq!(names.len(), 2 + 2 + 20, "{names:?}");
    // Released handles are gone.
    let mut w = Writer::default();
    w.u64(dfh).u32(0).u32(0).u64(0);
    assert_eq!(t.call(op::RELEASEDIR, 1, &w.buf).0, 0);
    let mut w2 = Writer::default();
    w2.u64(dfh).u64(0).u32(4096).u32(0).u64(0).u32(0).u32(0);
    assert_eq!(t.call(op::READDIR, 1, &w2.buf).0, libc::EBADF);
    // Inode and handle limits: ENFILE, not unbounded fds.
    let mut last = 0;
    for i in 0..20 {
        if let Err(e) = t.lookup(1, &format!("f{i}")) {
            last = e;
        }
    }
    assert_eq!(last, libc::ENFILE);
    assert!(t.fs.inode_count() <= 12);
    let mut last = 0;
    for _ in 0..12 {
        if let Err(e) = t.open(f, libc::O_RDONLY) {
            last = e;
        }
    }
    assert_eq!(last, libc::ENFILE);
    assert!(t.fs.handle_count() <= 8);
}

#[test]
fn override_values_parse_strictly() {
    assert_eq!(
        Override::parse(b"0:0:0100644"),
        Some(Override {
            uid: 0,
            gid: 0,
            mode: 0o100644,
            rdev: 0
        })
    );
    assert_eq!(Override::parse(b"1:2:020666:259").unwrap().rdev, 259);
    for bad in [
        &b""[..],
        b"0:0",
        b"x:0:0644",
        b"0:0:0644:1:2",
        b"0:0:01000000000",
        b"0:0:9",
    ] {
        assert_eq!(
            Override::parse(bad),
            None,
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let o = Override {
        uid: 5,
        gid: 6,
        mode: 0o104755,
        rdev: 0,
    };
    assert_eq!(Override::parse(o.encode().as_bytes()), Some(o));
}

#[test]
fn a_missing_share_is_one_clear_error() {
    let e = PassthroughFs::new(Path::new("/nonexistent/share"), Config::default()).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/share"), "{e}");
    let f = tempdir("file").join("f");
    std::fs::write(&f, b"").unwrap();
    let e = PassthroughFs::new(&f, Config::default()).unwrap_err();
    assert!(e.to_string().contains("not a directory"), "{e}");
}

#[test]
fn missing_names_are_cacheable_negative_entries_unless_caching_is_off() {
    let t = T::new(Config::default());
    let (e, b) = t.call(op::LOOKUP, 1, &cname("missing"));
    assert_eq!(e, 0);
    let mut r = Reader::new(&b);
    assert_eq!(r.u64().unwrap(), 0, "node id 0: a negative entry");
    r.skip(8).unwrap();
    assert_eq!(r.u64().unwrap(), 1, "cached for the auto policy's second");
    let t = T::new(Config {
        cache: CachePolicy::None,
        ..Default::default()
    });
    assert_eq!(t.call(op::LOOKUP, 1, &cname("missing")).0, libc::ENOENT);
}

fn attr_mode(reply: &[u8]) -> u32 {
    u32::from_le_bytes(reply[16 + 60..16 + 64].try_into().unwrap())
}

#[test]
fn writes_and_chown_kill_setuid_as_the_vfs_would() {
    let t = T::new(Config::default());
    let (f, fh) = t.create(1, "tool", libc::O_RDWR, 0o755).unwrap();
    let (e, b) = t.setattr_mode_uid(f, Some(0o6755), None);
    assert_eq!((e, attr_mode(&b)), (0, libc::S_IFREG | 0o6755));
    // A write that asks for it (the writer lacks CAP_FSETID) drops setuid and, as the file
    // is group-executable, setgid.
    assert_eq!(t.write(f, fh, b"hi", abi::WRITE_KILL_SUIDGID), 0);
    let (e, b) = t.call(op::GETATTR, f, &[0; 16]);
    assert_eq!((e, attr_mode(&b)), (0, libc::S_IFREG | 0o755));
    // A write without the flag (root's) keeps them.
    t.setattr_mode_uid(f, Some(0o4755), None);
    assert_eq!(t.write(f, fh, b"hi", 0), 0);
    let (_, b) = t.call(op::GETATTR, f, &[0; 16]);
    assert_eq!(attr_mode(&b), libc::S_IFREG | 0o4755);
    // SETATTR with FATTR_KILL_SUIDGID (a chown) drops it.
    let mut w = Writer::default();
    w.u32(fattr::UID | fattr::KILL_SUIDGID)
        .u32(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .u64(0);
    w.u32(0).u32(0).u32(0).u32(0).u32(0).u32(7).u32(0).u32(0);
    let (e, b) = t.call(op::SETATTR, f, &w.buf);
    assert_eq!((e, attr_mode(&b)), (0, libc::S_IFREG | 0o755));
    // An OPEN with O_TRUNC that asks for it as well.
    t.setattr_mode_uid(f, Some(0o4755), None);
    let mut w = Writer::default();
    w.u32(libc::O_WRONLY as u32 | libc::O_TRUNC as u32)
        .u32(abi::OPEN_KILL_SUIDGID);
    assert_eq!(t.call(op::OPEN, f, &w.buf).0, 0);
    let (_, b) = t.call(op::GETATTR, f, &[0; 16]);
    assert_eq!(attr_mode(&b), libc::S_IFREG | 0o755);
}

#[test]
fn write_only_opens_are_direct_and_writes_drop_file_capabilities() {
    let t = T::new(Config::default());
    let open_flags = |b: &[u8]| u32::from_le_bytes(b[8..12].try_into().unwrap());
    // CREATE write-only: direct I/O (and never FLUSH); read-write: cached.
    let (e, b) = t.create_call(1, "w", libc::O_WRONLY, 0o755);
    assert_eq!(e, 0);
    let flags = open_flags(&b[abi::ENTRY_OUT_LEN..]);
    assert_eq!(
        flags & (fopen::DIRECT_IO | fopen::NOFLUSH),
        fopen::DIRECT_IO | fopen::NOFLUSH
    );
    let (f, _) = parse_entry(&b);
    let mut w = Writer::default();
    w.u32(libc::O_RDWR as u32).u32(0);
    let (e, b) = t.call(op::OPEN, f, &w.buf);
    assert_eq!((e, open_flags(&b) & fopen::DIRECT_IO), (0, 0));
    let fh = u64::from_le_bytes(b[..8].try_into().unwrap());
    // A capability set in the guest goes with the next write, whoever writes.
    let cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
    let mut w = Writer::default();
    w.u32(cap.len() as u32)
        .u32(0)
        .bytes(b"security.capability\0")
        .bytes(cap);
    assert_eq!(t.call(op::SETXATTR, f, &w.buf).0, 0);
    let get = || {
        let mut w = Writer::default();
        w.u32(0).u32(0).bytes(b"security.capability\0");
        t.call(op::GETXATTR, f, &w.buf).0
    };
    assert_eq!(get(), 0, "the capability is there");
    assert_eq!(t.write(f, fh, b"hi", 0), 0);
    assert_eq!(get(), libc::ENODATA, "a write drops it");
}

#[test]
fn plain_chmods_stay_on_the_host_file_and_create_keeps_existing_files() {
    let t = T::new(Config::default());
    let (f, _) = t.create(1, "script", libc::O_WRONLY, 0o600).unwrap();
    let (e, b) = t.setattr_mode_uid(f, Some(0o755), None);
    assert_eq!((e, attr_mode(&b)), (0, libc::S_IFREG | 0o755));
    let host = std::fs::metadata(t.share.join("script")).unwrap();
    assert_eq!(host.mode() & 0o7777, 0o755, "mirrored on the host");
    assert!(!has_xattr(&t.share.join("script")), "no attribute needed");
    // Group-writable is a guest-only view: the host file never becomes writable by others.
    let (_, b) = t.setattr_mode_uid(f, Some(0o775), None);
    assert_eq!(attr_mode(&b), libc::S_IFREG | 0o775);
    let host = std::fs::metadata(t.share.join("script")).unwrap();
    assert_eq!(host.mode() & 0o7777, 0o755);
    assert_eq!(xattr(&t.share.join("script")), b"0:0:0100775");
    // Back to a plain mode: the attribute goes.
    t.setattr_mode_uid(f, Some(0o644), None);
    assert!(!has_xattr(&t.share.join("script")));
    // CREATE without O_EXCL on a file the host made meanwhile opens it as it is: its
    // ownership is not the creator's and a failure could never remove it.
    std::fs::write(t.share.join("hostfile"), b"keep").unwrap();
    let (e, b) = t.create_call(1, "hostfile", libc::O_WRONLY, 0o600);
    assert_eq!(e, 0);
    assert_eq!(parse_entry(&b).1.mode & 0o777, 0o644);
    assert!(!has_xattr(&t.share.join("hostfile")));
    assert_eq!(std::fs::read(t.share.join("hostfile")).unwrap(), b"keep");
    assert_eq!(
        t.create_call(1, "hostfile", libc::O_WRONLY | libc::O_EXCL, 0o600)
            .0,
        libc::EEXIST
    );
}

fn has_xattr(p: &Path) -> bool {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid strings; a zero-length query.
    unsafe {
        libc::getxattr(
            c.as_ptr(),
            OVERRIDE_XATTR_C.as_ptr(),
            std::ptr::null_mut(),
            0,
        ) >= 0
    }
}

/// The unprivileged case the design is for: a root-owned tree (a setuid binary, a device
/// node, a secret only root may read) served by `nobody`. Built here as root, then served by
/// this same test binary re-run as nobody (the inner test below).
#[test]
fn an_unprivileged_user_serves_a_root_owned_tree() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid,
        0,
        "this test builds a root-owned tree, then serves it as nobody: run it as root (./x test does)"
    );
    let base = tempdir("unpriv");
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
    let share = base.join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::set_permissions(&share, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(share.join("su"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(share.join("su"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::write(share.join("shadow"), b"root:hash").unwrap();
    std::fs::set_permissions(share.join("shadow"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let null = CString::new(share.join("null").as_os_str().as_bytes()).unwrap();
    // SAFETY: NUL-terminated path.
    let r = unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(r, 0);
    let home = share.join("home");
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(65534), Some(65534)).unwrap();
    let outside = base.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"host secret").unwrap();
    std::fs::set_permissions(
        outside.join("secret"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fs::passthrough::tests::unprivileged_inner",
            "--ignored",
            "--nocapture",
        ])
        .env("MSB_UNPRIV_BASE", &base)
        .output()
        .expect("setpriv (util-linux) is needed for this test");
    let _ = std::fs::remove_dir_all(&base);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "as nobody: {text}");
    assert!(
        text.contains("1 passed"),
        "the inner test did not run: {text}"
    );
}

/// Run by the test above as nobody; not on its own.
#[test]
#[ignore = "run by an_unprivileged_user_serves_a_root_owned_tree as nobody"]
fn unprivileged_inner() {
    let base = PathBuf::from(std::env::var_os("MSB_UNPRIV_BASE").expect("run by the outer test"));
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 65534);
    let t = T::serve(
        base.join("share"),
        base.join("outside"),
        Config::default(),
        true,
    );
    // The host's root-owned files show as root's, setuid included.
    let (su, a) = t.lookup(1, "su").unwrap();
    assert_eq!((a.uid, a.mode), (0, libc::S_IFREG | 0o4755));
    let (_, a) = t.lookup(1, "null").unwrap();
    assert_eq!(a.mode & libc::S_IFMT, libc::S_IFCHR);
    // The host device is never opened; a file only root may read stays unreadable.
    let (null, _) = t.lookup(1, "null").unwrap();
    assert_eq!(t.open(null, libc::O_RDONLY).unwrap_err(), libc::EACCES);
    let (shadow, _) = t.lookup(1, "shadow").unwrap();
    assert_eq!(t.open(shadow, libc::O_RDONLY).unwrap_err(), libc::EACCES);
    // The root-owned tree itself cannot be changed by the serving user.
    assert!(t.create(1, "new", libc::O_WRONLY, 0o644).is_err());
    let (e, _) = t.setattr_mode_uid(su, Some(0o755), None);
    assert_ne!(e, 0);
    // In a directory nobody owns, the guest's root makes root-owned, setuid and device files:
    // guest views only, kept in the xattr; on the host they are nobody's plain files.
    let (home, _) = t.lookup(1, "home").unwrap();
    let (f, _) = t.create(home, "tool", libc::O_WRONLY, 0o755).unwrap();
    let (e, b) = t.setattr_mode_uid(f, Some(0o4755), Some(0));
    assert_eq!(e, 0);
    assert_eq!(
        u32::from_le_bytes(b[16 + 60..16 + 64].try_into().unwrap()),
        libc::S_IFREG | 0o4755
    );
    let host = std::fs::metadata(base.join("share/home/tool")).unwrap();
    assert_eq!((host.uid(), host.mode() & 0o7000), (65534, 0));
    let mut w = Writer::default();
    w.u32(libc::S_IFBLK | 0o660)
        .u32(0x800)
        .u32(0)
        .u32(0)
        .bytes(b"sda\0");
    let (e, b) = t.call(op::MKNOD, home, &w.buf);
    assert_eq!(e, 0);
    assert_eq!(parse_entry(&b).1.mode, libc::S_IFBLK | 0o660);
    assert!(std::fs::symlink_metadata(base.join("share/home/sda"))
        .unwrap()
        .file_type()
        .is_file());
    // A hard link to a file outside the share cannot be made from inside.
    assert!(t.lookup(1, "..").is_ok());
    assert_eq!(t.lookup(1, "outside").unwrap_err(), libc::ENOENT);
}

#[test]
fn reads_go_straight_into_the_transport_buffer_and_answer_as_handle_would() {
    let t = T::new(Config::default());
    std::fs::write(t.share.join("data"), b"0123456789").unwrap();
    let (f, _) = t.lookup(1, "data").unwrap();
    let fh = t.open(f, libc::O_RDONLY).unwrap();
    let read_req = |fh: u64, off: u64, size: u32| {
        let mut w = Writer::default();
        w.u64(fh).u64(off).u32(size).u32(0).u64(0).u32(0).u32(0);
        t.request(op::READ, f, &w.buf)
    };
    let read = |fh: u64, off: u64, size: u32, out: &mut [u8]| {
        t.fs.read_into(&read_req(fh, off, size).1, out)
    };
    let mut out = [0u8; 8];
    // The size asked, capped by the buffer; short at the end of the file; an errno for a
    // handle never opened.
    let (unique, req) = read_req(fh, 2, 4);
    let r = t.fs.read_into(&req, &mut out).unwrap();
    assert_eq!((r.unique, r.result), (unique, Ok(4)));
    assert_eq!(&out[..4], b"2345");
    assert_eq!(read(fh, 0, 100, &mut out).unwrap().result, Ok(8));
    assert_eq!(read(fh, 7, 8, &mut out).unwrap().result, Ok(3));
    assert_eq!(&out[..3], b"789");
    assert_eq!(
        read(fh + 100, 0, 4, &mut out).unwrap().result,
        Err(libc::EBADF)
    );
    // Anything but a READ, or a READ cut short, is left to `handle`.
    let (_, getattr) = t.request(op::GETATTR, f, &[0; 16]);
    assert!(t.fs.read_into(&getattr, &mut out).is_none());
    let mut short = getattr.clone();
    short[4..8].copy_from_slice(&op::READ.to_le_bytes());
    short.truncate(abi::IN_HEADER_LEN + 10);
    let len = short.len() as u32;
    short[..4].copy_from_slice(&len.to_le_bytes());
    assert!(t.fs.read_into(&short, &mut out).is_none());
    assert_eq!(
        t.fs.handle(&short).map(|r| r[4..8].to_vec()),
        Some((-libc::EINVAL).to_le_bytes().to_vec())
    );
}

#[test]
fn a_write_naming_a_node_never_looked_up_writes_nothing() {
    let t = T::new(Config::default());
    let (f, fh) = t.create(1, "file", libc::O_RDWR, 0o644).unwrap();
    assert_eq!(t.write(f + 1000, fh, b"data", 0), libc::EBADF);
    assert_eq!(std::fs::read(t.share.join("file")).unwrap(), b"");
    assert_eq!(t.write(f, fh, b"data", 0), 0);
    assert_eq!(std::fs::read(t.share.join("file")).unwrap(), b"data");
}

#[test]
fn a_restored_share_serves_the_same_nodes_and_open_files() {
    let mut t = T::new(Config::default());
    std::fs::create_dir(t.share.join("d")).unwrap();
    std::fs::write(t.share.join("d/f"), b"hello").unwrap();
    std::fs::write(t.share.join("gone"), b"x").unwrap();
    std::fs::write(t.share.join("unlinked"), b"y").unwrap();
    let (d, _) = t.lookup(1, "d").unwrap();
    let (f, _) = t.lookup(d, "f").unwrap();
    let (gone, _) = t.lookup(1, "gone").unwrap();
    let (unlinked, _) = t.lookup(1, "unlinked").unwrap();
    let fh_f = t.open(f, libc::O_RDWR | libc::O_APPEND).unwrap();
    let fh_gone = t.open(gone, libc::O_RDONLY).unwrap();
    let fh_unlinked = t.open(unlinked, libc::O_RDONLY).unwrap();
    let (e, b) = t.call(op::OPENDIR, d, &[0; 8]);
    assert_eq!(e, 0);
    let fh_d = u64::from_le_bytes(b[..8].try_into().unwrap());
    // A file unlinked while open is not reachable by any path at snapshot time.
    std::fs::remove_file(t.share.join("unlinked")).unwrap();

    let state = t.fs.save_state().unwrap();
    assert!(state.initialized);
    let saved_f = state.nodes.iter().find(|n| n.id == f).unwrap();
    assert_eq!(saved_f.path.as_deref(), Some(&b"d/f"[..]));
    let saved = state.handles.iter().find(|h| h.fh == fh_f).unwrap();
    assert_eq!(saved.flags & libc::O_ACCMODE, libc::O_RDWR);
    assert_ne!(saved.flags & libc::O_APPEND, 0);
    assert!(state.handles.iter().find(|h| h.fh == fh_d).unwrap().dir);
    assert_eq!(
        state.nodes.iter().find(|n| n.id == unlinked).unwrap().path,
        None
    );

    // Meanwhile on the host: one file deleted, one changed.
    std::fs::remove_file(t.share.join("gone")).unwrap();
    std::fs::write(t.share.join("d/f"), b"HELLO").unwrap();

    // A fresh server for the same share, never INITed: the restored guest will not INIT.
    let fresh = PassthroughFs::new(&t.share, Config::default()).unwrap();
    let report = fresh.restore_state(&state).unwrap();
    assert_eq!(
        report,
        RestoreReport {
            nodes: 2,
            handles: 2,
            stale_nodes: 2,
            stale_handles: 2
        }
    );
    assert!(matches!(
        fresh.restore_state(&state),
        Err(FsPersistError::NotFresh)
    ));
    t.fs = fresh;

    let read = |fh: u64| {
        let mut w = Writer::default();
        w.u64(fh).u64(0).u32(64).u32(0).u64(0).u32(0).u32(0);
        t.call(op::READ, f, &w.buf)
    };
    assert_eq!(read(fh_f), (0, b"HELLO".to_vec()));
    assert_eq!(t.write(f, fh_f, b"!", 0), 0);
    assert_eq!(
        std::fs::read(t.share.join("d/f")).unwrap(),
        b"HELLO!",
        "the handle kept O_APPEND"
    );
    assert_eq!(t.call(op::GETATTR, f, &[0; 16]).0, 0);
    assert_eq!(t.lookup(d, "f").unwrap().0, f, "the same node id");
    assert_eq!(read(fh_gone).0, libc::ESTALE);
    assert_eq!(read(fh_unlinked).0, libc::ESTALE);
    assert_eq!(t.call(op::GETATTR, gone, &[0; 16]).0, libc::ESTALE);
    let (e, _) = t.call(op::READDIR, d, &{
        let mut w = Writer::default();
        w.u64(fh_d).u64(0).u32(4096).u32(0).u64(0).u32(0).u32(0);
        w.buf
    });
    assert_eq!(e, 0, "the directory handle reads");
    // A new node gets an id the guest never saw.
    std::fs::write(t.share.join("new"), b"").unwrap();
    assert!(t.lookup(1, "new").unwrap().0 >= state.next_id);
    // Forgetting and releasing stale ones clears them.
    let mut w = Writer::default();
    w.u64(1);
    t.fs.handle(&t.request(op::FORGET, gone, &w.buf).1);
    assert_eq!(t.call(op::GETATTR, gone, &[0; 16]).0, libc::EBADF);
    let mut w = Writer::default();
    w.u64(fh_gone).u32(0).u32(0).u64(0);
    assert_eq!(t.call(op::RELEASE, 1, &w.buf).0, 0);
    assert_eq!(read(fh_gone).0, libc::EBADF);
}

#[test]
fn a_tampered_share_state_never_leaves_the_share() {
    let t = T::new(Config::default());
    std::fs::write(t.share.join("inside"), b"in").unwrap();
    std::os::unix::fs::symlink(&t.outside, t.share.join("link")).unwrap();
    let outside_rel = format!(
        "../{}/secret",
        t.outside.file_name().unwrap().to_str().unwrap()
    );
    let node = |id: u64, path: &[u8]| NodeState {
        id,
        path: Some(path.to_vec()),
        refs: 1,
    };
    let handle = |fh: u64, path: &[u8]| HandleState {
        fh,
        path: Some(path.to_vec()),
        flags: libc::O_RDONLY,
        dir: false,
    };
    let state = FsState {
        initialized: true,
        next_id: 100,
        nodes: vec![
            node(2, outside_rel.as_bytes()),
            node(3, b"link/secret"),
            node(4, b"link"),
            node(5, b"inside"),
            node(6, b"/etc/passwd"),
            node(7, b"./inside"),
        ],
        next_handle: 100,
        handles: vec![
            handle(1, outside_rel.as_bytes()),
            handle(2, b"link/secret"),
            handle(3, b"inside"),
        ],
        ..Default::default()
    };
    let fs = PassthroughFs::new(&t.share, Config::default()).unwrap();
    let report = fs.restore_state(&state).unwrap();
    // Only `inside` (node and handle) and the symlink itself (a node, never opened) resolve.
    assert_eq!((report.nodes, report.handles), (2, 1));
    assert_eq!((report.stale_nodes, report.stale_handles), (4, 2));

    // Impossible tables are refused outright.
    let bad = |f: &dyn Fn(&mut FsState)| {
        let mut s = state.clone();
        f(&mut s);
        PassthroughFs::new(&t.share, Config::default())
            .unwrap()
            .restore_state(&s)
            .unwrap_err()
    };
    assert!(matches!(
        bad(&|s| s.nodes.push(node(1, b""))),
        FsPersistError::BadNode(1)
    ));
    assert!(matches!(
        bad(&|s| s.nodes.push(node(5, b"inside"))),
        FsPersistError::BadNode(5)
    ));
    assert!(matches!(
        bad(&|s| s.nodes.push(node(100, b"inside"))),
        FsPersistError::BadNode(100)
    ));
    assert!(matches!(
        bad(&|s| s.handles.push(handle(0, b"inside"))),
        FsPersistError::BadHandle(0)
    ));
    assert!(matches!(
        bad(&|s| {
            s.next_id = u64::MAX;
            s.nodes = (2..2_000_000).map(|i| node(i, b"inside")).collect();
        }),
        FsPersistError::TooManyNodes(_)
    ));
}

/// Each inode the guest holds is an fd of ours: a share takes as many as the process may have.
/// With CAP_SYS_RESOURCE that is `fs.nr_open`, not the kernel's default hard limit of 4096,
/// which stopped a guest's `find /` after some 3000 files.
#[test]
fn a_share_raises_the_open_file_limit() {
    let share = tempdir("nofile");
    let _fs = PassthroughFs::new(&share, Config::default()).unwrap();
    // SAFETY: rlimit is plain old data; all-zero is valid.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) }, 0);
    assert_eq!(
        rl.rlim_cur, rl.rlim_max,
        "the soft limit is raised to the hard one"
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap();
    const CAP_SYS_RESOURCE: u32 = 24;
    if eff & (1 << CAP_SYS_RESOURCE) != 0 {
        assert_eq!(rl.rlim_max, super::nofile_ceiling());
        assert!(rl.rlim_max >= 65_536 + 4_096, "{}", rl.rlim_max);
    }
    let _ = std::fs::remove_dir_all(&share);
}
