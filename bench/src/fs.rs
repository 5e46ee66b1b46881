//! `msb-bench fs`: file-system throughput and metadata rates through our FUSE server mounted
//! via `/dev/fuse` (the host kernel as its client), against the same operations directly on
//! the host directory, in the same run; the table shows the ratio.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use msb_devices::fs::devfuse::FuseMount;
use msb_devices::fs::passthrough::{CachePolicy, Config, PassthroughFs};
use serde::Serialize;

use crate::stats::summarize;

#[derive(clap::Args, Debug)]
pub struct FsArgs {
    /// Scratch directory on the file system to measure (default: the temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Bytes for the sequential read and write runs.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Files created, stat'ed and unlinked per metadata run.
    #[arg(long, default_value_t = 10_000)]
    files: usize,
    /// 4 KiB random reads per run.
    #[arg(long, default_value_t = 20_000)]
    random_reads: usize,
    /// Runs per metric and target (a multiple of the targets, 2 or 3 with --uring, lets each
    /// go first equally often).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// FUSE cache policy of the mounted server: none, auto or always.
    #[arg(long, default_value = "auto")]
    cache: CachePolicy,
    /// Also measure the /dev/fuse mount with FUSE over io_uring (per-CPU queues; Linux
    /// 6.14+, turns on the fuse module's enable_uring).
    #[arg(long)]
    uring: bool,
    /// Server threads on the /dev/fuse mount.
    #[arg(long, default_value_t = 2)]
    fuse_threads: usize,
    /// Microseconds a server thread keeps polling for the next request after answering one
    /// (0: it sleeps at once).
    #[arg(long, default_value_t = msb_devices::fs::devfuse::DEFAULT_POLL.as_micros() as u64)]
    poll_us: u64,
    /// Also measure inside a sandbox: a volume served over virtio-fs, driven by busybox tools
    /// in the guest (no random-read figure there). Needs a /dev/kvm that runs Linux guests
    /// (inside the L2 VM on PVM hosts, where only ratios mean anything).
    #[arg(long)]
    sandbox: bool,
    /// Write samples and summaries as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize, Default)]
struct Metrics {
    seq_write_mb_s: Vec<f64>,
    seq_read_mb_s: Vec<f64>,
    rand_read_iops: Vec<f64>,
    metadata_ops_s: Vec<f64>,
    tar_x_s: Vec<f64>,
}

const METRICS: [(&str, bool); 5] = [
    ("seq write (MB/s)", true),
    ("seq read (MB/s)", true),
    ("4K random read (IOPS)", true),
    ("create+stat+unlink (ops/s)", true),
    ("tar x of the tree (s)", false),
];

impl Metrics {
    fn get(&self, i: usize) -> &[f64] {
        match i {
            0 => &self.seq_write_mb_s,
            1 => &self.seq_read_mb_s,
            2 => &self.rand_read_iops,
            3 => &self.metadata_ops_s,
            _ => &self.tar_x_s,
        }
    }
}

/// Drops the page cache so reads come through the file system, not memory (root only),
/// then waits [`QUIET`].
fn drop_caches() {
    settle();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", b"3");
    std::thread::sleep(QUIET);
}

/// One place measured: a directory, and our server behind it if it is a mount.
struct Target<'a> {
    name: &'a str,
    dir: PathBuf,
    fs: Option<Arc<PassthroughFs>>,
    m: &'a mut Metrics,
}

/// A step measured in every target, back to back.
type Phase = fn(&mut Target<'_>, &FsArgs, &Path) -> Result<()>;

/// Writes back what the step before left dirty (in any target), so it is not timed here.
fn settle() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

/// Sequential write, fsync included; the file goes right after (its write-back would tax
/// the steps after it).
fn seq_write(t: &mut Target<'_>, a: &FsArgs, _: &Path) -> Result<()> {
    settle();
    let file = t.dir.join("seq.bin");
    let start = Instant::now();
    write_file(&file, a.bytes)?;
    t.m.seq_write_mb_s
        .push(a.bytes as f64 / start.elapsed().as_secs_f64() / 1e6);
    std::fs::remove_file(&file)?;
    Ok(())
}

/// Writes `bytes` of a fixed pattern to `file`, 1 MiB at a time, and fsyncs it.
fn write_file(file: &Path, bytes: u64) -> Result<()> {
    let chunk = vec![0x5au8; 1 << 20];
    let mut f = File::create(file).with_context(|| file.display().to_string())?;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// The file the read steps read, written once per target before the first run and the same
/// way for each (by the host, straight into the directory, before any mount): a file read
/// right after it was written measures the disk's write-back more than the reader. Here the
/// host itself, reading directly (not through us) a 1 GiB file just written through our
/// mount, took 0.67-1.45 s, against 0.65-1.15 s for one it had just written itself; through
/// our mount, the former took about as long (0.90-1.32 s).
const READ_FILE: &str = "read.bin";

/// Sleep before a read step so the layer beneath (here the VM host's own page cache) can
/// finish writing back what the previous step wrote; `sync` only covers our kernel.
const QUIET: std::time::Duration = std::time::Duration::from_secs(2);

/// Sequential read of [`READ_FILE`] from a cold cache.
fn seq_read(t: &mut Target<'_>, a: &FsArgs, _: &Path) -> Result<()> {
    drop_caches();
    let start = Instant::now();
    let mut f = File::open(t.dir.join(READ_FILE))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    if got != a.bytes {
        bail!("read {got} of {} bytes back", a.bytes);
    }
    t.m.seq_read_mb_s
        .push(a.bytes as f64 / start.elapsed().as_secs_f64() / 1e6);
    Ok(())
}

/// Random 4 KiB reads over [`READ_FILE`], cold.
fn random_read(t: &mut Target<'_>, a: &FsArgs, _: &Path) -> Result<()> {
    let file = t.dir.join(READ_FILE);
    let f = File::open(&file)?;
    drop_caches();
    let blocks = (a.bytes / 4096).max(1);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut page = [0u8; 4096];
    let start = Instant::now();
    for _ in 0..a.random_reads {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.read_exact_at(&mut page, (x % blocks) * 4096)?;
    }
    t.m.rand_read_iops
        .push(a.random_reads as f64 / start.elapsed().as_secs_f64());
    Ok(())
}

/// Metadata: create, stat, unlink.
fn metadata(t: &mut Target<'_>, a: &FsArgs, _: &Path) -> Result<()> {
    let md = t.dir.join("meta");
    std::fs::create_dir_all(&md)?;
    settle();
    let start = Instant::now();
    for i in 0..a.files {
        File::create(md.join(format!("f{i}")))?;
    }
    for i in 0..a.files {
        std::fs::metadata(md.join(format!("f{i}")))?;
    }
    for i in 0..a.files {
        std::fs::remove_file(md.join(format!("f{i}")))?;
    }
    t.m.metadata_ops_s
        .push(3.0 * a.files as f64 / start.elapsed().as_secs_f64());
    std::fs::remove_dir(&md)?;
    Ok(())
}

/// tar x of a tree of many small files and a few big ones; for our server, the requests it
/// took (small-file workloads are bound by request round trips).
fn tar_x(t: &mut Target<'_>, _: &FsArgs, tarball: &Path) -> Result<()> {
    let x_dir = t.dir.join("tree");
    std::fs::create_dir_all(&x_dir)?;
    let before =
        t.fs.as_deref()
            .map(PassthroughFs::request_counts)
            .unwrap_or_default();
    settle();
    let start = Instant::now();
    let ok = Command::new("tar")
        .arg("-xf")
        .arg(tarball)
        .arg("-C")
        .arg(&x_dir)
        .status()?
        .success();
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    t.m.tar_x_s.push(start.elapsed().as_secs_f64());
    if !ok {
        bail!("tar -x into {} failed", x_dir.display());
    }
    if let Some(fs) = &t.fs {
        let mut total = 0;
        let by_op: Vec<String> = fs
            .request_counts()
            .into_iter()
            .filter_map(|(op, n)| {
                let was = before.iter().find(|(o, _)| *o == op).map_or(0, |(_, b)| *b);
                total += n - was;
                (n > was).then(|| format!("{op} {}", n - was))
            })
            .collect();
        eprintln!(
            "  tar x through {}: {total} requests for {TAR_FILES} files ({})",
            t.name,
            by_op.join(", ")
        );
    }
    std::fs::remove_dir_all(&x_dir)?;
    Ok(())
}

/// Reads first: they then follow the previous target's `tar x`, not a 1 GiB write.
const PHASES: [(&str, Phase); 5] = [
    ("sequential read", seq_read),
    ("random reads", random_read),
    ("sequential write", seq_write),
    ("create+stat+unlink", metadata),
    ("tar x", tar_x),
];

/// Files in the benchmark tarball.
const TAR_FILES: usize = 40 * 100 + 8;

/// A tarball of 4000 small files in 40 directories plus 8 files of 4 MiB.
fn make_tarball(scratch: &Path) -> Result<PathBuf> {
    let src = scratch.join("tar-src");
    for d in 0..40 {
        let dir = src.join(format!("d{d}"));
        std::fs::create_dir_all(&dir)?;
        for i in 0..100 {
            std::fs::write(
                dir.join(format!("f{i}.txt")),
                format!("{d} {i}\n").repeat(20),
            )?;
        }
    }
    for i in 0..8 {
        std::fs::write(src.join(format!("big{i}")), vec![i as u8; 4 << 20])?;
    }
    let tar = scratch.join("tree.tar");
    let ok = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()?
        .success();
    if !ok {
        bail!("creating the benchmark tarball failed");
    }
    std::fs::remove_dir_all(&src)?;
    Ok(tar)
}

/// The same operations inside a sandbox on a virtio-fs volume, timed on the host around each
/// exec (the exec's own cost, about a millisecond, is included).
fn measure_sandbox(share: &Path, a: &FsArgs, tarball: &Path, m: &mut Metrics) -> Result<()> {
    use msb_vmm::sandbox::{Sandbox, Volume};
    let mut vol = Volume::parse("x:/bench")?;
    vol.host = share.into();
    vol.cache = a.cache;
    let sb = Sandbox::builder()
        .memory_mib(512)
        .volume(vol)
        .start()
        .context("starting a sandbox")?;
    sb.write_file("/tmp/tree.tar", &std::fs::read(tarball)?, 0o644)?;
    let sh = |script: &str| -> Result<f64> {
        let t = Instant::now();
        let out = sb.output(["sh", "-c", script])?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "in the sandbox, `{script}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(secs)
    };
    let mib = a.bytes >> 20;
    // As on the host: a quiet pause after the caches go, and reads of the file the host wrote.
    let drop = format!(
        "sync; echo 3 > /proc/sys/vm/drop_caches; sleep {}",
        QUIET.as_secs()
    );
    for run in 0..a.runs {
        eprintln!(
            "run {}/{}: inside a sandbox (virtio-fs volume)",
            run + 1,
            a.runs
        );
        sh(&drop)?;
        let r = sh(&format!(
            "dd if=/bench/{READ_FILE} of=/dev/null bs=1048576 2>/dev/null"
        ))?;
        m.seq_read_mb_s.push((mib << 20) as f64 / r / 1e6);
        let w = sh(&format!(
            "dd if=/dev/zero of=/bench/seq bs=1048576 count={mib} conv=fsync 2>/dev/null"
        ))?;
        m.seq_write_mb_s.push((mib << 20) as f64 / w / 1e6);
        sh("rm /bench/seq")?;
        let n = a.files;
        let md = sh(&format!(
            "mkdir /bench/m && cd /bench/m && seq 1 {n} | xargs touch && ls -l >/dev/null && seq 1 {n} | xargs rm && cd / && rmdir /bench/m"
        ))?;
        m.metadata_ops_s.push(3.0 * n as f64 / md);
        let x = sh("mkdir /bench/x && tar -xf /tmp/tree.tar -C /bench/x && sync")?;
        m.tar_x_s.push(x);
        sh("rm -rf /bench/x")?;
    }
    let _ = sb.shutdown();
    Ok(())
}

pub fn run(a: FsArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("msb-bench fs mounts our server through /dev/fuse and drops caches: run it as root");
    }
    let base = a
        .dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("msb-bench-fs-{}", std::process::id()));
    let host_dir = base.join("host");
    let (share, mnt) = (base.join("share"), base.join("mnt"));
    let (share_uring, mnt_uring) = (base.join("share-uring"), base.join("mnt-uring"));
    for d in [&host_dir, &share, &mnt, &share_uring, &mnt_uring] {
        std::fs::create_dir_all(d).with_context(|| d.display().to_string())?;
    }
    let result = (|| -> Result<[Metrics; 4]> {
        let tarball = make_tarball(&base)?;
        for d in [&host_dir, &share]
            .into_iter()
            .chain(a.uring.then_some(&share_uring))
        {
            write_file(&d.join(READ_FILE), a.bytes)?;
        }
        let server = |share: &Path| -> Result<Arc<PassthroughFs>> {
            Ok(Arc::new(PassthroughFs::new(
                share,
                Config {
                    cache: a.cache,
                    ..Default::default()
                },
            )?))
        };
        if a.uring {
            // The bench runs as root and already drops caches machine-wide; this module
            // switch only lets io_uring carry FUSE requests.
            msb_devices::fs::devfuse_uring::enable()?;
        }
        let (mut host, mut fuse, mut uring) = Default::default();
        for run in 0..a.runs {
            let fs = server(&share)?;
            let _mount = FuseMount::mount_polling(
                fs.clone(),
                &mnt,
                a.fuse_threads,
                std::time::Duration::from_micros(a.poll_us),
            )
            .context("mounting through /dev/fuse")?;
            let mut targets = vec![
                Target {
                    name: "the host directory",
                    dir: host_dir.clone(),
                    fs: None,
                    m: &mut host,
                },
                Target {
                    name: "our server via /dev/fuse",
                    dir: mnt.clone(),
                    fs: Some(fs),
                    m: &mut fuse,
                },
            ];
            let _mount_uring = if a.uring {
                let fs = server(&share_uring)?;
                let mount = FuseMount::mount_uring(fs.clone(), &mnt_uring)
                    .context("mounting through /dev/fuse with io_uring")?;
                targets.push(Target {
                    name: "our server via /dev/fuse, io_uring queues",
                    dir: mnt_uring.clone(),
                    fs: Some(fs),
                    m: &mut uring,
                });
                Some(mount)
            } else {
                None
            };
            // Who goes first changes each run: a write-heavy step slows this disk for
            // seconds after its sync (the layer beneath still writing back), which taxes
            // whoever comes next.
            let first = run % targets.len();
            targets.rotate_left(first);
            for t in &mut targets {
                eprintln!("run {}/{}: {}", run + 1, a.runs, t.name);
                for (what, phase) in PHASES {
                    phase(t, &a, &tarball).with_context(|| format!("{what} in {}", t.name))?;
                }
            }
        }
        let mut sandbox = Metrics::default();
        if a.sandbox {
            measure_sandbox(&share, &a, &tarball, &mut sandbox)?;
        }
        Ok([host, fuse, uring, sandbox])
    })();
    let _ = std::fs::remove_dir_all(&base);
    let [host, fuse, uring, sandbox] = result?;
    let machine = crate::machine();
    println!(
        "machine: {} ({} cores), host kernel {}; {} runs, {} MiB sequential, {} files, cache {:?}",
        machine.cpu,
        machine.cores,
        machine.kernel,
        a.runs,
        a.bytes >> 20,
        a.files,
        a.cache
    );
    println!(
        "{:<28} {:<11} {:>11} {:>11} {:>11} {:>11} {:>9}",
        "metric", "target", "min", "p50", "p90", "max", "vs host"
    );
    let mut summaries = Vec::new();
    for (i, (name, higher_better)) in METRICS.iter().enumerate() {
        let h = summarize(host.get(i));
        let f = summarize(fuse.get(i));
        let u = summarize(uring.get(i));
        let sb = summarize(sandbox.get(i));
        for (target, s) in [
            ("host", &h),
            ("fuse", &f),
            ("fuse-uring", &u),
            ("sandbox", &sb),
        ] {
            if let Some(s) = s {
                let ratio = match (target, &h) {
                    ("host", _) | (_, None) => String::new(),
                    (_, Some(hs)) if *higher_better => format!("{:.0}%", 100.0 * s.p50 / hs.p50),
                    (_, Some(hs)) => format!("{:.0}%", 100.0 * hs.p50 / s.p50),
                };
                println!(
                    "{name:<28} {target:<11} {:>11.1} {:>11.1} {:>11.1} {:>11.1} {ratio:>9}",
                    s.min, s.p50, s.p90, s.max
                );
            }
        }
        summaries.push(serde_json::json!({ "metric": name, "host": h, "fuse": f, "fuse_uring": u, "sandbox": sb }));
    }
    println!("(vs host: our figure as a share of the host's at p50; for times, host time / ours)");
    if let Some(j) = &a.json {
        let doc = serde_json::json!({
            "machine": machine, "host": host, "fuse": fuse, "fuse_uring": uring, "sandbox": sandbox,
            "summaries": summaries,
        });
        std::fs::write(j, serde_json::to_string_pretty(&doc)?)?;
        eprintln!("json: {}", j.display());
    }
    Ok(())
}
