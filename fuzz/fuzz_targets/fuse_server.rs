//! The FUSE server against a scratch share: any sequence of requests (names with `/`, `..`,
//! NUL, node ids never looked up, released handles, lying lengths, huge sizes) gets replies,
//! never a panic, and nothing outside the share changes. The share holds symlinks that point
//! at a sentinel directory next to it; the sentinel's contents are checked after every input.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use msb_devices::fs::abi::{op, InHeader, IN_HEADER_LEN};
use msb_devices::fs::passthrough::{Config, PassthroughFs};

struct Dirs {
    share: PathBuf,
    sentinel: PathBuf,
}

fn dirs() -> &'static Dirs {
    static D: OnceLock<Dirs> = OnceLock::new();
    D.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("msb-fuzz-fuse-{}", std::process::id()));
        let share = base.join("share");
        let sentinel = base.join("sentinel");
        std::fs::create_dir_all(&sentinel).unwrap();
        std::fs::write(sentinel.join("secret"), b"untouched").unwrap();
        Dirs { share, sentinel }
    })
}

fn snapshot(p: &Path) -> Vec<(String, Vec<u8>, u32)> {
    use std::os::unix::fs::MetadataExt;
    let mut v: Vec<_> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let data = if m.is_file() { std::fs::read(e.path()).unwrap() } else { Vec::new() };
            (e.file_name().to_string_lossy().into_owned(), data, m.mode())
        })
        .collect();
    v.sort();
    v
}

/// The opcodes worth driving (others all answer ENOSYS).
const OPS: &[u32] = &[
    op::LOOKUP, op::FORGET, op::GETATTR, op::SETATTR, op::READLINK, op::SYMLINK, op::MKNOD,
    op::MKDIR, op::UNLINK, op::RMDIR, op::RENAME, op::LINK, op::OPEN, op::READ, op::WRITE,
    op::STATFS, op::RELEASE, op::FSYNC, op::SETXATTR, op::GETXATTR, op::LISTXATTR,
    op::REMOVEXATTR, op::FLUSH, op::INIT, op::OPENDIR, op::READDIR, op::RELEASEDIR, op::ACCESS,
    op::CREATE, op::BATCH_FORGET, op::FALLOCATE, op::READDIRPLUS, op::RENAME2, op::LSEEK,
    op::COPY_FILE_RANGE, op::DESTROY, 9999,
];

fuzz_target!(|data: &[u8]| {
    let d = dirs();
    let _ = std::fs::remove_dir_all(&d.share);
    std::fs::create_dir_all(d.share.join("dir")).unwrap();
    std::fs::write(d.share.join("file"), b"contents").unwrap();
    let _ = std::os::unix::fs::symlink(d.sentinel.join("secret"), d.share.join("abs"));
    let _ = std::os::unix::fs::symlink("../sentinel", d.share.join("rel"));
    let before = snapshot(&d.sentinel);
    let fs = PassthroughFs::new(&d.share, Config { max_inodes: 64, max_handles: 16, ..Default::default() }).unwrap();
    // INIT first, so requests reach the handlers.
    let mut init = InHeader { len: 56, opcode: op::INIT, unique: 1, ..Default::default() }.encode().to_vec();
    for v in [7u32, 31, 65536, u32::MAX] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    fs.handle(&init);
    // Each request: [op index][node id][uid][len u16][body...].
    let mut rest = data;
    let mut unique = 2;
    let mut out = [0u8; 8192];
    while rest.len() >= 5 {
        let opcode = OPS[rest[0] as usize % OPS.len()];
        let nodeid = u64::from(rest[1] % 8);
        let uid = u32::from(rest[2] % 3) * 1000;
        let len = (u16::from_le_bytes([rest[3], rest[4]]) as usize).min(rest.len() - 5);
        let body = &rest[5..5 + len];
        rest = &rest[5 + len..];
        let h = InHeader {
            len: (IN_HEADER_LEN + body.len()) as u32,
            opcode,
            unique,
            nodeid,
            uid,
            gid: uid,
            pid: 1,
        };
        unique += 1;
        let mut req = h.encode().to_vec();
        req.extend_from_slice(body);
        // READs take the transports' zero-copy path every other time.
        if unique % 2 == 0 {
            if let Some(r) = fs.read_into(&req, &mut out) {
                assert!(r.result.map_or(true, |n| n <= out.len()));
                continue;
            }
        }
        if let Some(reply) = fs.handle(&req) {
            assert!(reply.len() >= 16);
            assert_eq!(u32::from_le_bytes(reply[..4].try_into().unwrap()) as usize, reply.len());
        }
    }
    assert_eq!(snapshot(&d.sentinel), before, "something outside the share changed");
});
