//! `msb-bench snapshot`: what the VM layer's snapshots cost, on the tier-2 counting guest
//! (which runs on any /dev/kvm, PVM included): snapshot time, restore → running (from
//! `VmBuilder::restore` until the restored guest's counter moves: its first instructions),
//! and the restored VM's resident memory, for each memory size asked, in one run. With
//! `--launches N` (a /dev/kvm that boots Linux: hardware, or the L2 VM), also the warm path
//! of `msb-vmm run -- true` against `--cold` boots, alternating, in the same run: spawn →
//! exit, and VMM start → agent ready (for a warm start: the restore and the agent's
//! reconnection).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use msb_vmm::vm::{RunningVm, VmBuilder};
use serde::Serialize;

use crate::stats::{summarize, Summary};

#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    /// Restores per memory size.
    #[arg(long, default_value_t = 100)]
    iterations: usize,
    /// Guest memory sizes in MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,4096")]
    memory: Vec<u64>,
    /// Where snapshots are written (default: a directory under /dev/shm, else the temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Write samples and summaries as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also this many warm and as many cold `msb-vmm run -- true` launches, alternating
    /// (needs a /dev/kvm that boots Linux).
    #[arg(long, default_value_t = 0)]
    launches: usize,
    /// Only the launches, not the counting guest's sizes.
    #[arg(long)]
    launches_only: bool,
    /// The msb-vmm binary (default: next to msb-bench).
    #[arg(long)]
    msb_vmm: Option<PathBuf>,
}

#[derive(Serialize, Default)]
struct WarmCold {
    warm_spawn_to_exit_ms: Vec<f64>,
    cold_spawn_to_exit_ms: Vec<f64>,
    warm_agent_ready_ms: Vec<f64>,
    cold_agent_ready_ms: Vec<f64>,
    warm_spawn_to_exit: Option<Summary>,
    cold_spawn_to_exit: Option<Summary>,
    warm_agent_ready: Option<Summary>,
    cold_agent_ready: Option<Summary>,
}

/// Warm and cold `run -- true`, alternating so both see the same machine.
fn warm_vs_cold(msb_vmm: &std::path::Path, n: usize) -> Result<WarmCold> {
    // The first warm launch of this configuration boots and saves the template: not a sample.
    crate::exec::launch_once(msb_vmm, &[])?;
    let mut r = WarmCold::default();
    for i in 0..n {
        let w = crate::exec::launch_once(msb_vmm, &[])?;
        if !w.warm {
            bail!("a warm launch booted cold: see `MSB_LOG=info msb-vmm run -- true`");
        }
        r.warm_spawn_to_exit_ms.push(w.exit_ms);
        r.warm_agent_ready_ms.extend(w.ready_ms);
        let c = crate::exec::launch_once(msb_vmm, &["--cold"])?;
        r.cold_spawn_to_exit_ms.push(c.exit_ms);
        r.cold_agent_ready_ms.extend(c.ready_ms);
        eprint!("\rwarm/cold launches: {}/{n}", i + 1);
    }
    eprintln!();
    r.warm_spawn_to_exit = summarize(&r.warm_spawn_to_exit_ms);
    r.cold_spawn_to_exit = summarize(&r.cold_spawn_to_exit_ms);
    r.warm_agent_ready = summarize(&r.warm_agent_ready_ms);
    r.cold_agent_ready = summarize(&r.cold_agent_ready_ms);
    Ok(r)
}

#[derive(Serialize)]
struct SizeResult {
    memory_mib: u64,
    snapshot_ms: Vec<f64>,
    restore_to_running_ms: Vec<f64>,
    restored_rss_kib: Vec<f64>,
    snapshot: Option<Summary>,
    restore_to_running: Option<Summary>,
    restored_rss: Option<Summary>,
    /// Restores kept running side by side (each until its counter moves, then parked), per
    /// second of the whole batch.
    forks_per_s: f64,
}

fn count(vm: &RunningVm) -> u32 {
    let mut b = [0u8; 4];
    let _ = vm.read_memory(msb_test_guests::COUNT_ADDR, &mut b);
    u32::from_le_bytes(b)
}

/// Spins until the guest's counter passes `above` (10 s at most: a stalled guest is an error,
/// not a sample).
fn until_count(vm: &RunningVm, above: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(vm) <= above {
        if Instant::now() > deadline {
            bail!("the guest's counter stayed at {}", count(vm));
        }
        std::hint::spin_loop();
    }
    Ok(())
}

fn one_size(mib: u64, iterations: usize, root: &std::path::Path) -> Result<SizeResult> {
    let dir = root.join(format!("{mib}m"));
    let _ = std::fs::remove_dir_all(&dir);
    let b = VmBuilder::new(msb_test_guests::count()).memory_mib(mib);
    let stop = b.stop_handle();
    let vm = b.start().context("booting the counting guest")?;
    until_count(&vm, 1000)?;
    // Snapshot time: a few samples of the running guest (each overwrites the last).
    let mut snapshot_ms = Vec::new();
    for _ in 0..5 {
        let _ = std::fs::remove_dir_all(&dir);
        let t = Instant::now();
        vm.save_snapshot(&dir).context("snapshot")?;
        snapshot_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    stop.stop();
    vm.wait();
    let mem = std::fs::read(dir.join(msb_vmm::snapshot::MEMORY_FILE))?;
    let at = msb_test_guests::COUNT_ADDR as usize;
    let saved = u32::from_le_bytes(mem[at..at + 4].try_into()?);
    drop(mem);

    let mut restore = Vec::with_capacity(iterations);
    let mut rss = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let t = Instant::now();
        let b = VmBuilder::restore(&dir).context("reading the snapshot")?;
        let stop = b.stop_handle();
        let vm = b.start().context("restoring")?;
        until_count(&vm, saved)?;
        restore.push(t.elapsed().as_secs_f64() * 1e3);
        rss.push(vm.resident_memory() as f64 / 1024.0);
        stop.stop();
        vm.wait();
        if (i + 1) % 10 == 0 {
            eprint!("\r{mib} MiB: {}/{iterations}", i + 1);
        }
    }
    eprintln!();
    // Forks: as many copies as iterations, all alive at the end, as fast as they come.
    let t = Instant::now();
    let mut forks = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let b = VmBuilder::restore(&dir).context("reading the snapshot")?;
        let stop = b.stop_handle();
        let vm = b.start().context("restoring")?;
        until_count(&vm, saved)?;
        vm.pause(Duration::from_secs(10))
            .context("parking a fork")?;
        forks.push((vm, stop));
    }
    let forks_per_s = iterations as f64 / t.elapsed().as_secs_f64();
    for (vm, stop) in forks {
        stop.stop();
        vm.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(SizeResult {
        forks_per_s,
        memory_mib: mib,
        snapshot: summarize(&snapshot_ms),
        restore_to_running: summarize(&restore),
        restored_rss: summarize(&rss),
        snapshot_ms,
        restore_to_running_ms: restore,
        restored_rss_kib: rss,
    })
}

pub fn run(a: SnapshotArgs) -> Result<()> {
    if a.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    let root = a.dir.clone().unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
        .join(format!("msb-bench-snapshot-{}", std::process::id()))
    });
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    if a.launches > 0 && pvm {
        bail!("this host's /dev/kvm is PVM, which cannot boot the real kernel: run the launches inside the L2 VM, `./x l2 -- target/release/msb-bench snapshot --launches-only --launches 20` (timings there are only meaningful as ratios)");
    }
    let sizes: &[u64] = if a.launches_only { &[] } else { &a.memory };
    std::fs::create_dir_all(&root).with_context(|| root.display().to_string())?;
    let results: Result<Vec<_>> = sizes
        .iter()
        .map(|&mib| one_size(mib, a.iterations, &root))
        .collect();
    let _ = std::fs::remove_dir_all(&root);
    let results = results?;
    let warm_cold = match a.launches {
        0 => None,
        n => {
            let bin = match &a.msb_vmm {
                Some(p) => p.clone(),
                None => std::env::current_exe()?.with_file_name("msb-vmm"),
            };
            Some(warm_vs_cold(&bin, n)?)
        }
    };
    let m = crate::machine();
    println!(
        "machine: {} ({} cores), host kernel {}, {}",
        m.cpu, m.cores, m.kernel, m.kvm
    );
    if !results.is_empty() {
        println!(
            "guest: the tier-2 counting guest, 1 vCPU; {} restores per size\n",
            a.iterations
        );
    }
    println!(
        "{:<8} {:<26} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "memory", "metric", "min", "p50", "p90", "p99", "max"
    );
    for r in &results {
        for (name, s) in [
            ("snapshot (ms)", &r.snapshot),
            ("restore → running (ms)", &r.restore_to_running),
            ("restored RSS (KiB)", &r.restored_rss),
        ] {
            if let Some(s) = s {
                println!(
                    "{:<8} {:<26} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    format!("{} MiB", r.memory_mib),
                    name,
                    s.min,
                    s.p50,
                    s.p90,
                    s.p99,
                    s.max
                );
            }
        }
    }
    for r in &results {
        println!(
            "{:<8} {:<26} {:>9.1}   ({} copies alive at the end)",
            format!("{} MiB", r.memory_mib),
            "forks per second",
            r.forks_per_s,
            a.iterations
        );
    }
    if let Some(w) = &warm_cold {
        println!(
            "\n`msb-vmm run --rootfs initramfs --net none -- true`, {} warm and {} cold, alternating",
            a.launches, a.launches
        );
        for (name, s) in [
            ("warm spawn → exit (ms)", &w.warm_spawn_to_exit),
            ("cold spawn → exit (ms)", &w.cold_spawn_to_exit),
            ("warm start → agent ready (ms)", &w.warm_agent_ready),
            ("cold start → agent ready (ms)", &w.cold_agent_ready),
        ] {
            if let Some(s) = s {
                println!(
                    "{:<8} {:<26} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    "run", name, s.min, s.p50, s.p90, s.p99, s.max
                );
            }
        }
        if let (Some(wm), Some(c)) = (&w.warm_spawn_to_exit, &w.cold_spawn_to_exit) {
            println!("warm / cold spawn → exit, p50: {:.3}", wm.p50 / c.p50);
        }
    }
    if let Some(p) = &a.json {
        let doc = serde_json::json!({ "sizes": results, "warm_vs_cold": warm_cold });
        std::fs::write(p, serde_json::to_vec_pretty(&doc)?)?;
        println!("\njson: {}", p.display());
    }
    Ok(())
}
