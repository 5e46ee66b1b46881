//! Test tier 3: our FUSE server mounted through /dev/fuse, driven by the host kernel's own
//! FUSE client with real workloads. Needs root (or CAP_SYS_ADMIN) and /dev/fuse; asked to
//! run without them, each test fails with the reason.

#![cfg(target_os = "linux")]

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use msb_devices::fs::devfuse::FuseMount;
use msb_devices::fs::passthrough::{Config, PassthroughFs};

struct Fixture {
    mount: Option<FuseMount>,
    share: PathBuf,
    mnt: PathBuf,
    fs: Arc<PassthroughFs>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.mount.take();
        let _ = std::fs::remove_dir(&self.mnt);
        let _ = std::fs::remove_dir_all(&self.share);
    }
}

fn fixture(cfg: Config) -> Fixture {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the /dev/fuse tests mount a file system: run them as root (./x test does)");
    }
    if !Path::new("/dev/fuse").exists() {
        panic!("/dev/fuse is missing: load the fuse module (modprobe fuse)");
    }
    static N: AtomicU64 = AtomicU64::new(0);
    let base = std::env::temp_dir().join(format!(
        "msb-devfuse-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let share = base.with_extension("share");
    let mnt = base.with_extension("mnt");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let fs = Arc::new(PassthroughFs::new(&share, cfg).unwrap());
    let mount = FuseMount::mount(fs.clone(), &mnt, 2).expect("mounting through /dev/fuse");
    Fixture {
        mount: Some(mount),
        share,
        mnt,
        fs,
    }
}

fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn files_round_trip_with_their_metadata() {
    let f = fixture(Config::default());
    let data: Vec<u8> = (0..8u32 << 20).map(|i| ((i * 31) >> 7) as u8).collect();
    std::fs::write(f.mnt.join("big.bin"), &data).unwrap();
    assert!(std::fs::read(f.share.join("big.bin")).unwrap() == data);
    assert!(std::fs::read(f.mnt.join("big.bin")).unwrap() == data);
    // Rename over, hard links, symlinks.
    std::fs::write(f.mnt.join("target"), b"old").unwrap();
    std::fs::rename(f.mnt.join("big.bin"), f.mnt.join("target")).unwrap();
    assert_eq!(
        std::fs::metadata(f.mnt.join("target")).unwrap().len(),
        data.len() as u64
    );
    std::fs::hard_link(f.mnt.join("target"), f.mnt.join("link")).unwrap();
    assert_eq!(std::fs::metadata(f.mnt.join("link")).unwrap().nlink(), 2);
    assert_eq!(
        std::fs::metadata(f.mnt.join("link")).unwrap().ino(),
        std::fs::metadata(f.mnt.join("target")).unwrap().ino()
    );
    std::os::unix::fs::symlink("target", f.mnt.join("sym")).unwrap();
    assert_eq!(
        std::fs::read_link(f.mnt.join("sym")).unwrap(),
        Path::new("target")
    );
    assert_eq!(
        std::fs::metadata(f.mnt.join("sym")).unwrap().len(),
        data.len() as u64
    );
    // Modes, chown, setuid: the mount shows them, the host file keeps owner-only bits.
    std::fs::write(f.mnt.join("tool"), b"#!/bin/sh\necho tool ran\n").unwrap();
    // chown first: like any Linux file system, a chown clears the setuid bit.
    std::os::unix::fs::chown(f.mnt.join("tool"), Some(1000), Some(1000)).unwrap();
    std::fs::set_permissions(f.mnt.join("tool"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    let m = std::fs::metadata(f.mnt.join("tool")).unwrap();
    assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o4755, 1000, 1000));
    let h = std::fs::metadata(f.share.join("tool")).unwrap();
    assert_eq!(h.mode() & 0o7000, 0, "no setuid bit on the host");
    assert_eq!(h.uid(), 0, "host owner unchanged");
    assert_eq!(sh(&f.mnt, "./tool"), "tool ran\n");
    // Directories, readdir, rmdir, unlink.
    sh(
        &f.mnt,
        "mkdir -p a/b/c && touch a/b/c/x a/y && rm a/y && rmdir a/b/c 2>/dev/null || true",
    );
    let mut names: Vec<_> = std::fs::read_dir(f.mnt.join("a/b/c"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["x"]);
    std::fs::remove_file(f.mnt.join("a/b/c/x")).unwrap();
    std::fs::remove_dir(f.mnt.join("a/b/c")).unwrap();
    assert!(!f.share.join("a/b/c").exists());
}

#[test]
fn sparse_files_mmap_and_fsync() {
    let f = fixture(Config::default());
    let p = f.mnt.join("sparse");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    file.seek(SeekFrom::Start(64 << 20)).unwrap();
    file.write_all(b"end").unwrap();
    file.sync_all().unwrap();
    let m = std::fs::metadata(&p).unwrap();
    assert_eq!(m.len(), (64 << 20) + 3);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "holes stay holes: {} blocks",
        m.blocks()
    );
    // SEEK_DATA finds the data past the hole.
    // SAFETY: a valid fd.
    let data_at =
        unsafe { libc::lseek64(std::os::fd::AsRawFd::as_raw_fd(&file), 0, libc::SEEK_DATA) };
    assert!(data_at >= (60 << 20), "SEEK_DATA gave {data_at}");
    drop(file);

    // A shared writable mapping reaches the host file.
    let p = f.mnt.join("mapped");
    std::fs::write(&p, vec![0u8; 8192]).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    // SAFETY: mapping 8 KiB of a file we own; no other alias of the mapping exists.
    let a = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    assert_ne!(a, libc::MAP_FAILED);
    // SAFETY: `a` maps 8192 writable bytes; we write 7 at offset 4096.
    let page = unsafe { std::slice::from_raw_parts_mut(a.cast::<u8>(), 8192) };
    page[4096..4103].copy_from_slice(b"mapped!");
    // SAFETY: `a` is the 8192-byte mapping made above.
    assert_eq!(unsafe { libc::msync(a, 8192, libc::MS_SYNC) }, 0);
    // SAFETY: as above; `page` is not used afterwards.
    unsafe { libc::munmap(a, 8192) };
    drop(file);
    let host = std::fs::read(f.share.join("mapped")).unwrap();
    assert_eq!(&host[4096..4103], b"mapped!");
}

#[test]
fn a_tree_extracted_through_the_mount_matches_the_host() {
    let f = fixture(Config::default());
    let src = f.share.with_extension("src");
    std::fs::create_dir_all(&src).unwrap();
    // A tree with depth, many small files, a few big ones, links and odd names.
    sh(
        &src,
        "for d in 1 2 3 4 5 6 7 8; do mkdir -p d$d/sub; for i in $(seq 1 120); do echo \"$d $i\" > d$d/sub/f$i; done; done; \
         head -c 3000000 /dev/urandom > big1; head -c 777777 /dev/urandom > d3/big2; \
         ln -s ../big1 d1/to_big; ln d3/big2 d4/hard; printf x > 'name with spaces'; chmod 0750 d2; chmod 0604 d5/sub/f1",
    );
    let tar = f.share.with_extension("tar");
    sh(&src, &format!("tar -cf {} .", tar.display()));
    sh(
        &f.mnt,
        &format!("mkdir x && tar -xpf {} -C x", tar.display()),
    );
    let sum = |dir: &Path| {
        sh(
            dir,
            "find . -type f -print0 | sort -z | xargs -0 sha256sum; find . -printf '%p %y %m %l\\n' | sort",
        )
    };
    assert_eq!(sum(&f.mnt.join("x")), sum(&src));
    assert_eq!(
        sum(&f.share.join("x")).lines().count(),
        sum(&src).lines().count()
    );
    sh(&f.mnt, "rm -rf x");
    assert!(!f.share.join("x").exists());
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_file(&tar);
}

#[test]
fn device_nodes_made_through_the_mount_never_reach_host_devices() {
    let f = fixture(Config::default());
    sh(&f.mnt, "mknod null c 1 3 && mknod blk b 8 0 && mkfifo fifo");
    let m = std::fs::symlink_metadata(f.mnt.join("null")).unwrap();
    use std::os::unix::fs::FileTypeExt;
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), libc::makedev(1, 3));
    for n in ["null", "blk", "fifo"] {
        let h = std::fs::symlink_metadata(f.share.join(n)).unwrap();
        assert!(h.file_type().is_file(), "{n} is a plain file on the host");
    }
    // A real host device inside the share: the server refuses to open it for the client.
    sh(&f.share, "mknod hostnull c 1 3");
    // The client kernel handles special files itself (and this mount is nodev); the server
    // is never asked to open the node, and refuses if asked (see the passthrough unit tests).
    let e = std::fs::File::open(f.mnt.join("hostnull")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    // The fifo is a fifo for the client (its kernel's pipe), not a file of ours.
    use std::os::unix::fs::OpenOptionsExt;
    let fifo = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(f.mnt.join("fifo"))
        .unwrap();
    assert!(fifo.metadata().unwrap().file_type().is_fifo());
    assert_eq!(
        f.fs.handle_count(),
        0,
        "the server opened no handle for a special file"
    );
}

#[test]
fn read_only_mounts_refuse_writes() {
    let f = fixture(Config {
        read_only: true,
        ..Default::default()
    });
    std::fs::write(f.share.join("ro"), b"keep").unwrap();
    assert_eq!(std::fs::read(f.mnt.join("ro")).unwrap(), b"keep");
    let e = std::fs::write(f.mnt.join("ro"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let e = std::fs::write(f.mnt.join("new"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    assert_eq!(
        std::fs::create_dir(f.mnt.join("d"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    assert_eq!(std::fs::read(f.share.join("ro")).unwrap(), b"keep");
}
