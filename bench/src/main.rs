//! msb-bench: boot-time distributions for msb-vmm and, in the same run, for peers given on the
//! command line. Never a single number: every figure is min/p50/p90/p99/max over N runs, with
//! the machine it ran on.

mod exec;
mod fs;
mod image;
mod limits;
mod net;
mod shim;
mod snapshot;
mod stats;
mod svg;
mod tls;

use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;

use stats::{summarize, Summary};

#[derive(Parser, Debug)]
#[command(
    name = "msb-bench",
    about = "msb-vmm benchmarks: distributions, peers, plots"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot N times in a row: VMM start → boot timer, process spawn → exit, max RSS.
    Boot(BootArgs),
    /// Exec round trip and stdout throughput through the agent (Unix socket and sandbox).
    Exec(exec::ExecArgs),
    /// File-system throughput and metadata rates: our FUSE server via /dev/fuse vs the host.
    Fs(fs::FsArgs),
    /// TCP throughput, connect rate and latency through our netstack vs loopback and peers.
    Net(net::NetArgs),
    /// One `net` measurement, run where the guest is (used by `net`).
    #[command(hide = true)]
    NetClient(net::ClientArgs),
    /// The `net` loopback server, on the listening socket given as standard input (used by
    /// `net`, so the server's threads live in a process of their own, as the peers' do).
    #[command(hide = true)]
    NetServer,
    /// VM snapshots: snapshot time, restore → running, restored RSS, per memory size.
    Snapshot(snapshot::SnapshotArgs),
    /// OCI images: pull + unpack from a loopback registry vs skopeo; run IMAGE vs the default root.
    Image(image::ImageArgs),
    /// containerd: `ctr run --rm ROOT true` through our shim vs `msb-vmm run --rootfs ROOT -- true`.
    Shim(shim::ShimArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Guest {
    /// The tier-2 stub guest: writes the boot timer and resets at once (the VMM's own cost).
    Stub,
    /// The real kernel and the msb-init initramfs, running `true`.
    Linux,
}

#[derive(clap::Args, Debug)]
struct BootArgs {
    /// Which guest to boot.
    #[arg(long, value_enum, default_value_t = Guest::Stub)]
    guest: Guest,
    /// Boots per runner.
    #[arg(long, default_value_t = 50)]
    iterations: usize,
    /// vCPUs per guest.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Write all samples and summaries as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Histogram picture (SVG); default bench/out/boot-<guest>.svg.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// A peer to compare with, booting the same guest: firecracker=PATH or qemu=PATH.
    #[arg(long = "peer", value_name = "NAME=PATH")]
    peers: Vec<String>,
    /// The msb-vmm binary (default: next to msb-bench).
    #[arg(long, value_name = "PATH")]
    msb_vmm: Option<PathBuf>,
    /// Also boot msb-vmm with `--no-seccomp`, in the same run: what confinement costs.
    #[arg(long)]
    seccomp_cost: bool,
    /// Guest kernel for --guest linux (default: the one `./x setup` built).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
}

/// One boot's measurements.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    spawn_to_exit_ms: f64,
    boot_timer_ms: Option<f64>,
    max_rss_kib: u64,
    /// Private resident memory as the program exits (anonymous and shared-memory pages, which
    /// hold guest memory a VMM maps from a memfd): what each extra VMM costs; its code is
    /// file-backed and shared by every copy.
    private_kib: u64,
    exit_ok: bool,
}

/// Something that boots the guest once per call.
trait Runner {
    fn name(&self) -> &str;
    fn boot_once(&self, scratch: &Path) -> Result<Sample>;
}

fn main() -> Result<()> {
    // The VMM's and netstack's own logs, as `msb-vmm` shows them (`MSB_LOG=debug`).
    msb_vmm::init_logging("warn");
    let cli = Cli::parse();
    match cli.command {
        Cmd::Boot(a) => boot(a),
        Cmd::Exec(a) => exec::run(a),
        Cmd::Fs(a) => fs::run(a),
        Cmd::Net(a) => net::run(a),
        Cmd::NetClient(a) => net::client(a),
        Cmd::NetServer => net::server_on_stdin(),
        Cmd::Snapshot(a) => snapshot::run(a),
        Cmd::Image(a) => image::run(a),
        Cmd::Shim(a) => shim::run(a),
    }
}

/// Runs `cmd` to its end: spawn → exit in ms, the program's own memory, and whether it
/// exited 0.
///
/// `ru_maxrss` would not do: across `execve` the kernel carries the old address space's peak
/// over, so every runner would report at least this bench's own resident size. The child is
/// traced instead and stopped as it exits, when its address space still exists.
fn timed_spawn(mut cmd: Command, out: &Path) -> Result<(f64, Memory, bool)> {
    use std::os::unix::process::CommandExt;
    let log = File::create(out)?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let trace_me = || {
        // SAFETY: PTRACE_TRACEME takes no pointers; it only marks this process as traced.
        if unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec, where it makes one
    // async-signal-safe system call and allocates nothing.
    unsafe { cmd.pre_exec(trace_me) };
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    let pid = child.id() as libc::pid_t;
    // The child is reaped below; std must not wait for it again.
    std::mem::forget(child);
    let mut memory = None;
    let mut status = 0;
    loop {
        // SAFETY: pid is our child; status is a valid out-pointer.
        if unsafe { libc::waitpid(pid, &mut status, 0) } != pid {
            bail!("waitpid: {}", std::io::Error::last_os_error());
        }
        if !libc::WIFSTOPPED(status) {
            break;
        }
        let sig = libc::WSTOPSIG(status);
        let event = status >> 16;
        let inject = if event == libc::PTRACE_EVENT_EXIT {
            memory = Memory::of(pid);
            0
        } else if sig == libc::SIGTRAP && memory.is_none() && event == 0 {
            // The stop after execve: from here on, stop again at exit.
            let opts = libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_EXITKILL;
            // SAFETY: pid is our stopped tracee; the options are a plain integer.
            unsafe { libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0, opts) };
            0
        } else {
            // Any other signal belongs to the program: deliver it.
            sig
        };
        // SAFETY: pid is our stopped tracee.
        unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, inject) };
    }
    let elapsed = start.elapsed().as_secs_f64() * 1000.0;
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    let Some(memory) = memory else {
        bail!(
            "{:?} exited without its exit stop: no memory figures",
            cmd.get_program()
        );
    };
    Ok((elapsed, memory, ok))
}

/// A process's memory as it exits, in KiB.
struct Memory {
    /// Peak resident set (`VmHWM`).
    peak: u64,
    /// Anonymous and shared-memory resident pages (`RssAnon` + `RssShmem`): Firecracker's
    /// guest memory is a memfd, counted in the second.
    private: u64,
}

impl Memory {
    /// From `/proc/PID/status` of a live (stopped) process.
    fn of(pid: libc::pid_t) -> Option<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            line.split_whitespace().nth(1)?.parse().ok()
        };
        Some(Memory {
            peak: field("VmHWM:")?,
            private: field("RssAnon:")? + field("RssShmem:")?,
        })
    }
}

struct MsbVmm {
    name: &'static str,
    bin: PathBuf,
    args: Vec<OsString>,
}

impl Runner for MsbVmm {
    fn name(&self) -> &str {
        self.name
    }
    fn boot_once(&self, scratch: &Path) -> Result<Sample> {
        let report = scratch.join("report.json");
        let _ = std::fs::remove_file(&report);
        let mut cmd = Command::new(&self.bin);
        // `--report` belongs to the subcommand: insert it right after it.
        cmd.arg(&self.args[0])
            .arg("--report")
            .arg(&report)
            .args(&self.args[1..]);
        let out = scratch.join("msb-vmm.log");
        let (ms, mem, ok) = timed_spawn(cmd, &out)?;
        if !ok {
            bail!(
                "msb-vmm failed: {}",
                std::fs::read_to_string(&out).unwrap_or_default().trim()
            );
        }
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).context("reading the msb-vmm report")?)?;
        let boot = r["boot_time_us"].as_u64().map(|us| us as f64 / 1000.0);
        Ok(Sample {
            spawn_to_exit_ms: ms,
            boot_timer_ms: boot,
            max_rss_kib: mem.peak,
            private_kib: mem.private,
            exit_ok: ok,
        })
    }
}

struct Firecracker {
    bin: PathBuf,
    config: PathBuf,
}

impl Runner for Firecracker {
    fn name(&self) -> &str {
        "firecracker"
    }
    fn boot_once(&self, scratch: &Path) -> Result<Sample> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--no-api")
            .arg("--config-file")
            .arg(&self.config)
            .arg("--boot-timer")
            .arg("--level")
            .arg("Info");
        let out = scratch.join("firecracker.log");
        let (ms, mem, ok) = timed_spawn(cmd, &out)?;
        let log = std::fs::read_to_string(&out).unwrap_or_default();
        // "Guest-boot-time =   1234 us 1 ms, ..."
        let boot = log
            .split("Guest-boot-time =")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|us| us.parse::<f64>().ok())
            .map(|us| us / 1000.0);
        Ok(Sample {
            spawn_to_exit_ms: ms,
            boot_timer_ms: boot,
            max_rss_kib: mem.peak,
            private_kib: mem.private,
            exit_ok: ok,
        })
    }
}

struct Qemu {
    bin: PathBuf,
    args: Vec<OsString>,
}

impl Runner for Qemu {
    fn name(&self) -> &str {
        "qemu"
    }
    fn boot_once(&self, scratch: &Path) -> Result<Sample> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args);
        let (ms, mem, ok) = timed_spawn(cmd, &scratch.join("qemu.log"))?;
        // QEMU has no boot-timer device: only spawn → exit.
        Ok(Sample {
            spawn_to_exit_ms: ms,
            boot_timer_ms: None,
            max_rss_kib: mem.peak,
            private_kib: mem.private,
            exit_ok: ok,
        })
    }
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub kvm: String,
}

pub fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let kvm = if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm (PVM, software nested)".into()
    } else if Path::new("/sys/module/kvm_intel").exists() {
        "kvm_intel".into()
    } else if Path::new("/sys/module/kvm_amd").exists() {
        "kvm_amd".into()
    } else {
        "none".into()
    };
    Machine {
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        kernel,
        kvm,
    }
}

/// The newest cached default initramfs (built by msb-vmm on its first `run`).
/// The initramfs `msb-vmm run --rootfs initramfs` boots on this architecture (msb-init and
/// busybox of this build's architecture), built into the cache if it is not there yet.
fn default_initramfs() -> Result<PathBuf> {
    use msb_vmm::assets;
    msb_vmm::initramfs::cached_default(
        &assets::cache_dir(),
        &assets::msb_init(),
        Some(&assets::busybox()),
    )
    .context("the peers' initramfs: run `./x setup` first")
}

#[derive(Serialize)]
struct RunnerResult {
    name: String,
    samples: Vec<Sample>,
    spawn_to_exit_ms: Option<Summary>,
    boot_timer_ms: Option<Summary>,
    max_rss_mib: Option<Summary>,
    private_mib: Option<Summary>,
    failures: usize,
}

fn boot(a: BootArgs) -> Result<()> {
    if a.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    let msb_vmm = match &a.msb_vmm {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("msb-vmm"),
    };
    if !msb_vmm.exists() {
        bail!(
            "msb-vmm not found at {}: build it (`./x setup`) or pass --msb-vmm PATH",
            msb_vmm.display()
        );
    }
    let machine = machine();
    if a.guest == Guest::Linux && Path::new("/sys/module/kvm_pvm").exists() {
        bail!("this host's /dev/kvm is PVM, which cannot boot the real kernel: run inside the L2 VM, `./x l2 -- target/release/msb-bench boot --guest linux ...` (timings there are only meaningful as ratios)");
    }
    let stub = msb_test_guests::stub().to_path_buf();
    let kernel = a
        .kernel
        .clone()
        .unwrap_or_else(msb_vmm::assets::default_kernel);
    // Peers cannot talk to the agent: msb-init powers off right after signalling boot.
    let linux_cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 no_timer_check quiet {}",
        msb_init::cmdline::EXIT_AFTER_BOOT
    );
    let initramfs = if a.guest == Guest::Linux {
        Some(default_initramfs()?)
    } else {
        None
    };

    let mut runners: Vec<Box<dyn Runner>> = Vec::new();
    let (cpus, mem) = (a.cpus.to_string(), a.memory.to_string());
    let sizes: Vec<OsString> = vec![
        "--cpus".into(),
        cpus.clone().into(),
        "--memory".into(),
        mem.clone().into(),
    ];
    // The first runner is the base of the ratios: the same guest the peers boot, started the
    // way they start it (kernel, initramfs, command line; no vsock, no network card).
    let vm_args: Vec<OsString> = match a.guest {
        Guest::Stub => [
            vec!["boot".into(), "--kernel".into(), stub.clone().into()],
            sizes.clone(),
        ]
        .concat(),
        Guest::Linux => [
            vec![
                "boot".into(),
                "--no-vsock".into(),
                "--kernel".into(),
                kernel.clone().into(),
                "--initrd".into(),
                initramfs
                    .clone()
                    .expect("an initramfs for the linux guest")
                    .into(),
                "--cmdline".into(),
                linux_cmdline.clone().into(),
            ],
            sizes.clone(),
        ]
        .concat(),
    };
    runners.push(Box::new(MsbVmm {
        name: "msb-vmm",
        bin: msb_vmm.clone(),
        args: vm_args.clone(),
    }));
    if a.seccomp_cost {
        let mut args = vm_args;
        args.insert(1, "--no-seccomp".into());
        runners.push(Box::new(MsbVmm {
            name: "msb-vmm --no-seccomp",
            bin: msb_vmm.clone(),
            args,
        }));
    }
    if a.guest == Guest::Linux {
        // What a user runs: a sandbox on the initramfs root, `true` through the agent, the
        // agent's shutdown. Booted cold, and started from its warm snapshot (the default).
        let run = |warm: bool| -> Vec<OsString> {
            let mut v: Vec<OsString> = vec![
                "run".into(),
                "--rootfs".into(),
                "initramfs".into(),
                "--net".into(),
                "none".into(),
                "--kernel".into(),
                kernel.clone().into(),
            ];
            if !warm {
                v.push("--cold".into());
            }
            v.extend(sizes.iter().cloned());
            v.extend(["--".into(), "true".into()]);
            v
        };
        runners.push(Box::new(MsbVmm {
            name: "msb-vmm run",
            bin: msb_vmm.clone(),
            args: run(false),
        }));
        runners.push(Box::new(MsbVmm {
            name: "msb-vmm run warm",
            bin: msb_vmm.clone(),
            args: run(true),
        }));
    }
    let scratch = std::env::temp_dir().join(format!("msb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    for p in &a.peers {
        let Some((name, path)) = p.split_once('=') else {
            bail!("--peer {p}: expected NAME=PATH, e.g. qemu=/usr/bin/qemu-system-x86_64")
        };
        let path = PathBuf::from(path);
        if !path.exists() {
            bail!("--peer {name}: {} does not exist", path.display());
        }
        let (guest_kernel, cmdline) = match a.guest {
            Guest::Stub => (stub.clone(), "console=ttyS0".to_string()),
            Guest::Linux => (kernel.clone(), linux_cmdline.clone()),
        };
        match name {
            "firecracker" => {
                let mut cfg = serde_json::json!({
                    "boot-source": {"kernel_image_path": guest_kernel, "boot_args": cmdline},
                    "drives": [],
                    "machine-config": {"vcpu_count": a.cpus, "mem_size_mib": a.memory, "smt": false}
                });
                if let Some(i) = &initramfs {
                    cfg["boot-source"]["initrd_path"] = serde_json::json!(i);
                }
                let config = scratch.join("firecracker.json");
                std::fs::write(&config, cfg.to_string())?;
                runners.push(Box::new(Firecracker { bin: path, config }));
            }
            "qemu" => {
                let mut args: Vec<OsString> = [
                    "-M",
                    "microvm",
                    "-accel",
                    "kvm",
                    "-cpu",
                    "qemu64",
                    "-m",
                    &mem,
                    "-smp",
                    &cpus,
                    "-nodefaults",
                    "-no-user-config",
                    "-nographic",
                    "-no-reboot",
                    "-device",
                    "i8042",
                    "-serial",
                    "null",
                    "-kernel",
                ]
                .iter()
                .map(OsString::from)
                .collect();
                args.push(guest_kernel.into());
                if let Some(i) = &initramfs {
                    args.push("-initrd".into());
                    args.push(i.into());
                }
                args.push("-append".into());
                args.push(cmdline.into());
                runners.push(Box::new(Qemu { bin: path, args }));
            }
            other => bail!("--peer {other}: unknown peer (firecracker or qemu)"),
        }
    }

    eprintln!(
        "msb-bench boot: guest={:?}, {} iterations per runner, {} vCPU, {} MiB",
        a.guest, a.iterations, a.cpus, a.memory
    );
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); runners.len()];
    let mut failures = vec![0usize; runners.len()];
    // Interleave runners so drift on the machine affects all of them alike.
    for i in 0..a.iterations {
        for (r, runner) in runners.iter().enumerate() {
            match runner.boot_once(&scratch) {
                Ok(s) if s.exit_ok || !runner.name().starts_with("msb-vmm") => samples[r].push(s),
                Ok(_) => failures[r] += 1,
                Err(e) => {
                    failures[r] += 1;
                    if failures[r] == 1 {
                        eprintln!("msb-bench: {} failed (iteration {i}): {e:#}", runner.name());
                    }
                }
            }
        }
        if (i + 1) % 10 == 0 {
            eprint!("\r{}/{}", i + 1, a.iterations);
        }
    }
    eprintln!();
    let _ = std::fs::remove_dir_all(&scratch);

    let results: Vec<RunnerResult> = runners
        .iter()
        .zip(samples)
        .zip(failures)
        .map(|((r, s), failures)| RunnerResult {
            name: r.name().to_string(),
            spawn_to_exit_ms: summarize(&s.iter().map(|x| x.spawn_to_exit_ms).collect::<Vec<_>>()),
            boot_timer_ms: summarize(&s.iter().filter_map(|x| x.boot_timer_ms).collect::<Vec<_>>()),
            max_rss_mib: summarize(
                &s.iter()
                    .map(|x| x.max_rss_kib as f64 / 1024.0)
                    .collect::<Vec<_>>(),
            ),
            private_mib: summarize(
                &s.iter()
                    .map(|x| x.private_kib as f64 / 1024.0)
                    .collect::<Vec<_>>(),
            ),
            samples: s,
            failures,
        })
        .collect();

    println!(
        "machine: {} ({} cores), host kernel {}, {}",
        machine.cpu, machine.cores, machine.kernel, machine.kvm
    );
    println!(
        "guest: {:?}, {} vCPU, {} MiB, {} boots per runner\n",
        a.guest, a.cpus, a.memory, a.iterations
    );
    println!(
        "{:<21} {:<22} {:>8} {:>8} {:>8} {:>8} {:>8}  p50 vs msb-vmm",
        "runner", "metric", "min", "p50", "p90", "p99", "max"
    );
    let base = &results[0];
    for r in &results {
        for (metric, s, b) in [
            ("VMM start→boot timer", r.boot_timer_ms, base.boot_timer_ms),
            ("spawn→exit (ms)", r.spawn_to_exit_ms, base.spawn_to_exit_ms),
            ("max RSS (MiB)", r.max_rss_mib, base.max_rss_mib),
            ("private at exit (MiB)", r.private_mib, base.private_mib),
        ] {
            let Some(s) = s else { continue };
            let ratio = match b {
                Some(b) if r.name != base.name && b.p50 > 0.0 => format!("{:.2}x", s.p50 / b.p50),
                _ => String::new(),
            };
            println!(
                "{:<21} {:<22} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {}",
                r.name, metric, s.min, s.p50, s.p90, s.p99, s.max, ratio
            );
        }
        if r.failures > 0 {
            println!("{:<21} failed runs: {}", r.name, r.failures);
        }
    }

    let svg_path = a.svg.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "bench/out/boot-{}.svg",
            if a.guest == Guest::Stub {
                "stub"
            } else {
                "linux"
            }
        ))
    });
    if let Some(dir) = svg_path.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    let series: Vec<(String, Vec<f64>)> = results
        .iter()
        .map(|r| {
            (
                format!("{} spawn→exit", r.name),
                r.samples.iter().map(|s| s.spawn_to_exit_ms).collect(),
            )
        })
        .collect();
    let title = format!(
        "boot {:?} guest, {} vCPU, {} MiB: spawn → exit ({})",
        a.guest, a.cpus, a.memory, machine.kvm
    );
    std::fs::write(
        &svg_path,
        svg::histogram(&title, "milliseconds", &series, 40),
    )?;
    eprintln!("histogram: {}", svg_path.display());
    if let Some(j) = &a.json {
        let doc = serde_json::json!({ "machine": machine, "guest": a.guest, "cpus": a.cpus, "memory_mib": a.memory, "iterations": a.iterations, "results": results });
        std::fs::write(j, serde_json::to_string_pretty(&doc)?)?;
        eprintln!("json: {}", j.display());
    }
    let failed: usize = results
        .iter()
        .filter(|r| r.name.starts_with("msb-vmm"))
        .map(|r| r.failures)
        .sum();
    if failed > 0 {
        bail!("{failed} msb-vmm boots failed");
    }
    Ok(())
}
