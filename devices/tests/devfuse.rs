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
    fixture_with_mountpoint(cfg, "")
}

/// A fixture served through FUSE over io_uring (per-CPU queues), which it turns on in the
/// fuse module if needed (we are root; the switch only lets io_uring carry FUSE requests).
fn fixture_uring() -> Fixture {
    msb_devices::fs::devfuse_uring::enable()
        .unwrap_or_else(|e| panic!("FUSE over io_uring needs Linux 6.14+: {e}"));
    mounted(Config::default(), "", |fs, mnt| {
        FuseMount::mount_uring(fs, mnt).expect("mounting with io_uring queues")
    })
}

/// A fixture mounted at `<base>.mnt/<sub>`: a mount point deeper than the share makes a
/// relative symlink resolve to different places for the client and for the host.
fn fixture_with_mountpoint(cfg: Config, sub: &str) -> Fixture {
    mounted(cfg, sub, |fs, mnt| {
        FuseMount::mount(fs, mnt, 2).expect("mounting through /dev/fuse")
    })
}

fn mounted(
    cfg: Config,
    sub: &str,
    mount: impl FnOnce(Arc<PassthroughFs>, &Path) -> FuseMount,
) -> Fixture {
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
    let mnt = base.with_extension("mnt").join(sub);
    std::fs::create_dir_all(&share).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let fs = Arc::new(PassthroughFs::new(&share, cfg).unwrap());
    let mount = mount(fs.clone(), &mnt);
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
    round_trip(&fixture(Config::default()));
}

#[test]
fn files_round_trip_through_io_uring_queues() {
    let f = fixture_uring();
    round_trip(&f);
    // All but INIT and forgets (which the kernel sends through /dev/fuse) come by the ring.
    let ring = f.mount.as_ref().unwrap().ring_requests();
    let answered: u64 =
        f.fs.request_counts()
            .iter()
            .filter(|(op, _)| !matches!(*op, "INIT" | "FORGET" | "BATCH_FORGET" | "INTERRUPT"))
            .map(|(_, n)| n)
            .sum();
    assert!(
        answered > 50 && ring == answered,
        "{ring} of {answered} requests came through the io_uring queues"
    );
}

fn round_trip(f: &Fixture) {
    // Not a whole number of pages: the last READ is short.
    let data: Vec<u8> = (0..(8u32 << 20) + 12_345)
        .map(|i| ((i * 31) >> 7) as u8)
        .collect();
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
    extract_tree(&fixture(Config::default()));
}

#[test]
fn a_tree_extracted_through_io_uring_queues_matches_the_host() {
    extract_tree(&fixture_uring());
}

fn extract_tree(f: &Fixture) {
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

/// pjdfstest runs we tolerate failing through our server although they pass on tmpfs, each with
/// the reason. Keep this list short and explained; anything else that regresses fails the test.
const PJDFSTEST_KNOWN: &[(&str, &str)] = &[];

/// The pjdfstest binary: `$MSB_PJDFSTEST`, else the one `./x setup` installs in the cache.
fn pjdfstest_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MSB_PJDFSTEST") {
        return p.into();
    }
    let cache = std::env::var_os("MSB_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("msb-vmm")))
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/msb-vmm")
        });
    cache.join("tools/bin/pjdfstest")
}

/// Runs pjdfstest in `dir`; returns each test's verdict (`ok`, `FAILED`, `skipped`, ...).
fn pjdfstest(bin: &Path, dir: &Path) -> std::collections::BTreeMap<String, String> {
    pjdfstest_cases(bin, dir, &[])
}

/// Runs pjdfstest in `dir`; only the cases whose names contain one of `cases`, when given.
fn pjdfstest_cases(
    bin: &Path,
    dir: &Path,
    cases: &[&str],
) -> std::collections::BTreeMap<String, String> {
    let config = dir.with_extension("pjdfstest.toml");
    // Debian's own accounts stand in for the suite's dummy users (it switches to them to test
    // permission checks), so the host needs no new users.
    std::fs::write(
        &config,
        "[features]\nposix_fallocate = {}\nutimensat = {}\nutime_now = {}\n\
         [settings]\nnaptime = 0.02\nallow_remount = false\n\
         [dummy_auth]\nentries = [[\"nobody\", \"nogroup\"], [\"daemon\", \"daemon\"], [\"bin\", \"bin\"]]\n",
    )
    .unwrap();
    let out = Command::new(bin)
        .arg("-c")
        .arg(&config)
        .arg("-p")
        .arg(dir)
        .args(cases)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let _ = std::fs::remove_file(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Summary:"),
        "pjdfstest did not finish in {}: {}{}",
        dir.display(),
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (name, verdict) = (w.next()?, w.next()?);
            (name.contains("::") && w.next().is_none()).then(|| (name.into(), verdict.into()))
        })
        .collect()
}

/// A recognised POSIX conformance suite (pjdfstest, the Rust rewrite of FreeBSD's, from
/// crates.io) against our server through /dev/fuse and against a host tmpfs in the same run:
/// every case that passes on tmpfs must pass through our server.
#[test]
fn pjdfstest_passes_through_our_server_wherever_it_passes_on_tmpfs() {
    let bin = pjdfstest_bin();
    assert!(
        bin.exists(),
        "pjdfstest is not installed at {}: run ./x setup (it installs it with cargo install), \
         or set MSB_PJDFSTEST",
        bin.display()
    );
    let f = fixture(Config::default());
    let tmpfs = f.share.with_extension("tmpfs");
    std::fs::create_dir_all(&tmpfs).unwrap();
    let t = std::ffi::CString::new(tmpfs.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            t.as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            c"mode=0755".as_ptr().cast(),
        )
    };
    assert_eq!(
        r,
        0,
        "mounting a tmpfs: {}",
        std::io::Error::last_os_error()
    );
    let reference = pjdfstest(&bin, &tmpfs);
    // SAFETY: NUL-terminated path.
    unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    let _ = std::fs::remove_dir(&tmpfs);
    report("host tmpfs", &reference);
    // Both transports: requests read from /dev/fuse, and io_uring queues.
    let mut regressions = conformance_regressions(&bin, &f, "msb FUSE server", &reference);
    drop(f);
    let f = fixture_uring();
    regressions.extend(conformance_regressions(
        &bin,
        &f,
        "msb FUSE server, io_uring queues",
        &reference,
    ));
    assert!(
        regressions.is_empty(),
        "pass on tmpfs, not through our server: {regressions:#?}"
    );
}

fn report(name: &str, m: &std::collections::BTreeMap<String, String>) -> usize {
    let count = |v: &str| m.values().filter(|x| *x == v).count();
    eprintln!(
        "pjdfstest on {name}: {} passed, {} failed, {} skipped, {} total",
        count("ok"),
        count("FAILED"),
        count("skipped"),
        m.len()
    );
    count("ok")
}

/// Cases that pass in `reference` but not through `f`'s mount (each retried alone twice).
fn conformance_regressions(
    bin: &Path,
    f: &Fixture,
    name: &str,
    reference: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    let ours = pjdfstest(bin, &f.mnt);
    let passed = report(name, &ours);
    assert!(passed >= 300, "{name}: suspiciously few cases ran");
    let mut regressions: Vec<String> = reference
        .iter()
        .filter(|(case, v)| {
            *v == "ok"
                && ours.get(*case).map(String::as_str) != Some("ok")
                && !PJDFSTEST_KNOWN.iter().any(|(k, _)| k == case)
        })
        .map(|(case, _)| case.clone())
        .collect();
    // A few cases race the suite's own timing (open::etxtbsy opens a file while a child
    // execs it; exec through FUSE is slower on a loaded 2-core host): one that passes alone
    // on a second or third try is timing, not a server bug.
    regressions.retain(|case| {
        let again = (0..2).any(|_| {
            pjdfstest_cases(bin, &f.mnt, &[case.as_str()])
                .get(case)
                .map(String::as_str)
                == Some("ok")
        });
        if again {
            eprintln!("pjdfstest ({name}): {case} passed when run again alone");
        }
        !again
    });
    regressions
        .into_iter()
        .map(|case| format!("{name}: {case}"))
        .collect()
}

/// The host swaps a directory in the share for a symlink to outside, over and over, while a
/// client writes and reads through the mount: no lookup may follow the symlink on the host.
#[test]
fn a_directory_swapped_for_a_symlink_mid_lookup_never_leads_outside() {
    // The client resolves `d -> ../<base>.outside` beside its deeper mount point, where
    // nothing exists; only a server that followed it on the host could reach the file.
    let mut f = fixture_with_mountpoint(
        Config {
            cache: msb_devices::fs::passthrough::CachePolicy::None,
            ..Default::default()
        },
        "deeper",
    );
    let outside = f.share.with_extension("outside");
    let target = Path::new("..").join(outside.file_name().unwrap());
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"host secret").unwrap();
    std::fs::create_dir(f.share.join("d")).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (share, target, stop) = (f.share.clone(), target.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = std::fs::rename(share.join("d"), share.join("real"));
                let _ = std::os::unix::fs::symlink(&target, share.join("d"));
                let _ = std::fs::remove_file(share.join("d"));
                let _ = std::fs::rename(share.join("real"), share.join("d"));
                swaps += 1;
            }
            swaps
        })
    };
    let mut leaked = 0;
    for i in 0..20_000 {
        let secret = f.mnt.join("d/secret");
        if std::fs::read(&secret).is_ok_and(|b| b == b"host secret") {
            leaked += 1;
        }
        let _ = std::fs::write(f.mnt.join(format!("d/pwned{}", i % 8)), b"x");
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    let _ = std::fs::remove_file(outside.join("secret"));
    let left: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let _ = std::fs::remove_dir_all(&outside);
    drop(f.mount.take());
    let _ = std::fs::remove_dir_all(f.mnt.parent().unwrap());
    assert!(swaps > 100, "the race hardly ran ({swaps} swaps)");
    assert_eq!(leaked, 0, "read the host secret through the mount");
    assert!(left.is_empty(), "created outside the share: {left:?}");
}

/// `--fs-rate`: a guest creating many small files gets the request rate, and one writing a
/// large file gets the byte rate, each within 5 % over 10 s (the client here is the host
/// kernel's FUSE client with two workers, as fast as it can go).
#[test]
fn the_fs_rate_holds_against_many_small_files_and_large_writes() {
    use msb_devices::fs::rate::FsRate;
    use std::time::{Duration, Instant};

    let ops_rate = 400;
    let f = fixture(Config {
        rate: Some(Arc::new(FsRate::new(Some(ops_rate), None))),
        ..Default::default()
    });
    let before = f.fs.totals().ops;
    let t0 = Instant::now();
    let mut files = 0;
    while t0.elapsed() < Duration::from_secs(10) {
        std::fs::write(f.mnt.join(format!("f{files}")), b"small").unwrap();
        files += 1;
    }
    let rate = (f.fs.totals().ops - before) as f64 / t0.elapsed().as_secs_f64();
    let err = rate / ops_rate as f64 - 1.0;
    eprintln!(
        "fs-rate {ops_rate}/: {rate:.1} requests/s ({:+.2} %), {files} files",
        err * 100.0
    );
    assert!(err.abs() <= 0.05, "{rate:.1} requests/s for {ops_rate}");
    drop(f);

    let byte_rate = 8u64 << 20;
    let f = fixture(Config {
        rate: Some(Arc::new(FsRate::new(None, Some(byte_rate)))),
        ..Default::default()
    });
    let total = 10 * byte_rate;
    let t0 = Instant::now();
    let mut file = std::fs::File::create(f.mnt.join("big")).unwrap();
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..total / chunk.len() as u64 {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
    drop(file);
    let rate = f.fs.totals().bytes_written as f64 / t0.elapsed().as_secs_f64();
    let err = rate / byte_rate as f64 - 1.0;
    eprintln!(
        "fs-rate /8m: {:.2} MiB/s ({:+.2} %)",
        rate / (1 << 20) as f64,
        err * 100.0
    );
    assert!(err.abs() <= 0.05, "{rate:.0} bytes/s for {byte_rate}");
    assert_eq!(std::fs::metadata(f.share.join("big")).unwrap().len(), total);
}
