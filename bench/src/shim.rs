//! `msb-bench shim`: `ctr run --rm ... true` through the containerd shim against
//! `msb-vmm run --rootfs ROOT -- true` on the same root, alternating in one run (needs a
//! /dev/kvm that boots Linux: hardware, or the L2 VM). containerd is a private one (its own
//! root, state and socket in a work directory, a private tmpfs over `/run/containerd/s`), so
//! a host's containerd is never touched.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use msb_containerd_shim::harness::{busybox_root, PrivateContainerd};
use serde::Serialize;

use crate::stats::{summarize, Summary};

#[derive(clap::Args, Debug)]
pub struct ShimArgs {
    /// Launches of each, alternating.
    #[arg(long, default_value_t = 10)]
    launches: usize,
    /// The root both run on (default: a busybox tree made here).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Work directory; sockets live there, so not on 9p (default: /dev/shm/...).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write samples and summaries as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The msb-vmm binary (default: next to msb-bench).
    #[arg(long)]
    msb_vmm: Option<PathBuf>,
    /// The shim binary (default: containerd-shim-msb-v2 next to msb-bench).
    #[arg(long)]
    shim: Option<PathBuf>,
    /// containerd (its `ctr` comes from PATH).
    #[arg(long, default_value = "containerd")]
    containerd: PathBuf,
}

#[derive(Serialize, Default)]
struct Report {
    ctr_run_ms: Vec<f64>,
    msb_run_ms: Vec<f64>,
    ctr_run: Option<Summary>,
    msb_run: Option<Summary>,
}

fn timed(cmd: &mut Command, what: &str) -> Result<f64> {
    let t = Instant::now();
    let out = cmd.stdin(Stdio::null()).output()?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(ms)
}

pub fn run(a: ShimArgs) -> Result<()> {
    let here = std::env::current_exe()?;
    let msb_vmm = a
        .msb_vmm
        .clone()
        .unwrap_or_else(|| here.with_file_name("msb-vmm"));
    let shim = a
        .shim
        .clone()
        .unwrap_or_else(|| here.with_file_name("containerd-shim-msb-v2"));
    if !shim.exists() {
        bail!(
            "no shim at {}: cargo build --release -p msb-containerd-shim",
            shim.display()
        );
    }
    let dir = a.dir.clone().unwrap_or_else(|| {
        PathBuf::from(format!("/dev/shm/msb-bench-shim-{}", std::process::id()))
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let daemon =
        PrivateContainerd::start(&dir, shim.parent().unwrap_or(Path::new("/")), &a.containerd)
            .map_err(|e| anyhow!(e))?;
    let root = match &a.root {
        Some(r) => r.clone(),
        None => {
            let r = dir.join("rootfs");
            busybox_root(&r, &["sh", "true"]).context("making a busybox root (./x setup)")?;
            r
        }
    };
    let fifo = dir.join("fifo");
    let mut n = 0;
    let mut ctr_run = || -> Result<f64> {
        n += 1;
        timed(
            daemon
                .ctr()
                .args(["run", "--rm", "--fifo-dir"])
                .arg(&fifo)
                .args(["--runtime", "io.containerd.msb.v2", "--rootfs"])
                .arg(&root)
                .arg(format!("bench{n}"))
                .arg("true"),
            "ctr run",
        )
    };
    let msb_run = || -> Result<f64> {
        let mut c = Command::new(&msb_vmm);
        c.arg("run").arg("--rootfs").arg(&root).args(["--", "true"]);
        timed(&mut c, "msb-vmm run")
    };
    // One of each first: warm templates are made then, and are not samples.
    ctr_run()?;
    msb_run()?;
    let mut r = Report::default();
    for i in 0..a.launches {
        r.ctr_run_ms.push(ctr_run()?);
        r.msb_run_ms.push(msb_run()?);
        eprint!("\rlaunches: {}/{}", i + 1, a.launches);
    }
    eprintln!();
    drop(daemon);
    r.ctr_run = summarize(&r.ctr_run_ms);
    r.msb_run = summarize(&r.msb_run_ms);
    println!(
        "{:<44} {:>9} {:>9} {:>9}",
        "spawn → exit, ms (n)", "p50", "p90", "p99"
    );
    for (name, s) in [
        ("ctr run --rm (shim) ROOT true", r.ctr_run),
        ("msb-vmm run --rootfs ROOT -- true", r.msb_run),
    ] {
        if let Some(s) = s {
            println!(
                "{:<44} {:>9.1} {:>9.1} {:>9.1}",
                format!("{name} ({})", s.n),
                s.p50,
                s.p90,
                s.p99
            );
        }
    }
    if let (Some(c), Some(m)) = (r.ctr_run, r.msb_run) {
        println!("ctr run (shim) / msb-vmm run, p50: {:.3}", c.p50 / m.p50);
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_vec_pretty(&r)?)?;
    }
    Ok(())
}
