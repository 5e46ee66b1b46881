//! `msb-bench exec`: exec round trip and stdout throughput through the agent, over a Unix
//! socket to the agent running as a host process and end to end in a sandbox; plus
//! spawn → agent ready and `msb-vmm run -- true` spawn → exit.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use msb_init::agent::ExecRequest;
use msb_init::client::{AgentClient, ExecEvent};
use serde::Serialize;

use crate::stats::{summarize, Summary};

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// Where the agent runs: `unix` (a host process over a Unix socket), `sandbox` (in a
    /// microVM over vsock), or `both`.
    #[arg(long, default_value = "both")]
    transport: String,
    /// Exec round trips of `true` per transport.
    #[arg(long, default_value_t = 1000)]
    iterations: usize,
    /// Bytes of stdout per throughput run.
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Throughput runs per transport.
    #[arg(long, default_value_t = 3)]
    throughput_runs: usize,
    /// The size of the writes the measured process makes to its stdout (`dd bs=`): with
    /// small writes (`head -c` makes 8 KiB ones) the pipe's lock, contended by writer and
    /// reader, bounds the agent and the host-pipe floor alike.
    #[arg(long, default_value_t = 1 << 20)]
    write_size: u64,
    /// `msb-vmm run -- true` launches for spawn → agent ready and spawn → exit.
    #[arg(long, default_value_t = 20)]
    launches: usize,
    /// Static msb-init binary for the host-process agent (default: the one `./x setup` cached).
    #[arg(long)]
    msb_init: Option<PathBuf>,
    /// The msb-vmm binary (default: next to msb-bench).
    #[arg(long)]
    msb_vmm: Option<PathBuf>,
    /// Over the Unix socket, also measure with the client confined as the CLI's control
    /// thread is (seccomp filter, no capabilities), in the same run: what the filter costs.
    #[arg(long)]
    seccomp_cost: bool,
    /// Write samples and summaries as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize, Default)]
struct TransportResult {
    transport: String,
    round_trip_ms: Option<Summary>,
    throughput_mb_s: Option<Summary>,
    round_trips: Vec<f64>,
    throughputs: Vec<f64>,
    /// The floor, taken between the round trips: this process spawning `/bin/true` itself
    /// with the same stdio (stdin null, stdout and stderr piped and read to the end) and
    /// waiting for it.
    host_spawn_ms: Option<Summary>,
    host_spawns: Vec<f64>,
    /// Round trip minus floor, pair by pair (each round trip with the spawn that followed).
    overhead_ms: Option<Summary>,
    overheads: Vec<f64>,
    /// The throughput floor, taken after each throughput run: the same command's stdout read
    /// by this process straight from a pipe of the agent's size, in chunks of its size.
    host_pipe_mb_s: Option<Summary>,
    host_pipes: Vec<f64>,
}

/// `argv`'s stdout read from a pipe as the agent reads it (1 MiB pipe, 64 KiB reads), with
/// no agent in between: the floor under the stdout throughput. Bytes read and MB/s.
fn host_pipe(argv: &[&str]) -> Result<(u64, f64)> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let t = Instant::now();
    let mut child = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {} on the host", argv[0]))?;
    let mut out = child.stdout.take().context("no stdout pipe")?;
    // SAFETY: fcntl with an integer argument on a pipe this process owns.
    unsafe { libc::fcntl(out.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    let mut buf = vec![0u8; msb_init::agent::MAX_CHUNK];
    let mut got = 0u64;
    loop {
        match out.read(&mut buf)? {
            0 => break,
            n => got += n as u64,
        }
    }
    child.wait()?;
    Ok((got, got as f64 / t.elapsed().as_secs_f64() / 1e6))
}

/// Spawns `/bin/true` as the agent does (stdin null, stdout and stderr piped and read to
/// their end) and waits for it: the floor under an exec round trip. Milliseconds.
fn host_spawn() -> Result<f64> {
    let t = Instant::now();
    let out = Command::new("/bin/true")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .context("spawning /bin/true on the host")?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!("/bin/true failed on the host: {:?}", out.status);
    }
    Ok(ms)
}

struct HostAgent {
    child: Child,
    dir: PathBuf,
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn host_agent(bin: &Path) -> Result<(HostAgent, AgentClient)> {
    let dir = std::env::temp_dir().join(format!("msb-bench-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("agent.sock");
    let child = Command::new(bin)
        .args(["agent", "--listen"])
        .arg(&sock)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let agent = HostAgent { child, dir };
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("the host agent did not start");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let client = AgentClient::connect(UnixStream::connect(&sock)?, Duration::from_secs(10))?;
    Ok((agent, client))
}

fn req(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        ..Default::default()
    }
}

/// Round trips of `true` and stdout throughput over one agent connection.
fn measure(
    name: &str,
    client: &AgentClient,
    iterations: usize,
    bytes: u64,
    write_size: u64,
    runs: usize,
) -> Result<TransportResult> {
    let mut r = TransportResult {
        transport: name.into(),
        ..Default::default()
    };
    // The floor is the host's: it is the agent's own cost only when the agent is a host
    // process.
    let floor = name.starts_with("unix");
    // Warm up: page cache, first fork.
    for _ in 0..5 {
        client.exec(req(&["true"]))?.wait()?;
        if floor {
            host_spawn()?;
        }
    }
    for _ in 0..iterations {
        let t = Instant::now();
        let status = client.exec(req(&["true"]))?.wait()?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !status.success() {
            bail!("`true` failed with {status:?}");
        }
        r.round_trips.push(ms);
        if floor {
            let f = host_spawn()?;
            r.host_spawns.push(f);
            r.overheads.push(ms - f);
        }
    }
    // dd's transfer summary goes to stderr, which is not counted.
    let (bs, count) = (
        format!("bs={write_size}"),
        format!("count={}", bytes / write_size),
    );
    let writer = ["dd", "if=/dev/zero", &bs, &count];
    for _ in 0..runs {
        let t = Instant::now();
        let mut h = client.exec(req(&writer))?;
        let mut got = 0u64;
        while let Some(e) = h.next_event()? {
            if let ExecEvent::Stdout(d) = e {
                got += d.len() as u64;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        if got != bytes {
            bail!("received {got} of {bytes} bytes");
        }
        r.throughputs.push(bytes as f64 / secs / 1e6);
        if floor {
            let (n, mb_s) = host_pipe(&writer)?;
            if n != bytes {
                bail!("the host pipe gave {n} of {bytes} bytes");
            }
            r.host_pipes.push(mb_s);
        }
    }
    r.summarize();
    Ok(r)
}

impl TransportResult {
    fn summarize(&mut self) {
        self.round_trip_ms = summarize(&self.round_trips);
        self.throughput_mb_s = summarize(&self.throughputs);
        self.host_spawn_ms = summarize(&self.host_spawns);
        self.overhead_ms = summarize(&self.overheads);
        self.host_pipe_mb_s = summarize(&self.host_pipes);
    }

    fn extend(&mut self, r: TransportResult) {
        self.round_trips.extend(r.round_trips);
        self.throughputs.extend(r.throughputs);
        self.host_spawns.extend(r.host_spawns);
        self.overheads.extend(r.overheads);
        self.host_pipes.extend(r.host_pipes);
    }
}

#[derive(Serialize, Default)]
struct Launches {
    spawn_to_exit_ms: Option<Summary>,
    agent_ready_ms: Option<Summary>,
    boot_timer_ms: Option<Summary>,
}

/// One `msb-vmm run -- true` launch.
pub struct Launch {
    /// Spawn → exit of the msb-vmm process.
    pub exit_ms: f64,
    /// VMM start → agent ready, as the run reports it.
    pub ready_ms: Option<f64>,
    /// VMM start → boot timer (a warm start reports its template's).
    pub boot_ms: Option<f64>,
    /// Whether it continued a warm template.
    pub warm: bool,
}

/// `msb-vmm run [extra] -- true` once, on the initramfs root without a network.
pub fn launch_once(msb_vmm: &Path, extra: &[&str]) -> Result<Launch> {
    let report = std::env::temp_dir().join(format!("msb-bench-run-{}.json", std::process::id()));
    let t = Instant::now();
    let out = Command::new(msb_vmm)
        .args(["run", "--rootfs", "initramfs", "--net", "none", "--report"])
        .arg(&report)
        .args(extra)
        .args(["--", "true"])
        .output()?;
    let exit_ms = t.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        bail!(
            "msb-vmm run failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
    let _ = std::fs::remove_file(&report);
    Ok(Launch {
        exit_ms,
        ready_ms: r["agent_ready_us"].as_u64().map(|us| us as f64 / 1000.0),
        boot_ms: r["boot_time_us"].as_u64().map(|us| us as f64 / 1000.0),
        warm: r["warm"].as_bool().unwrap_or(false),
    })
}

/// `msb-vmm run -- true`, `n` times, each a cold boot: spawn → exit and the reported
/// agent-ready and boot-timer times.
fn launches(msb_vmm: &Path, n: usize) -> Result<Launches> {
    let (mut exit, mut ready, mut boot) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let l = launch_once(msb_vmm, &["--cold"])?;
        exit.push(l.exit_ms);
        ready.extend(l.ready_ms);
        boot.extend(l.boot_ms);
    }
    Ok(Launches {
        spawn_to_exit_ms: summarize(&exit),
        agent_ready_ms: summarize(&ready),
        boot_timer_ms: summarize(&boot),
    })
}

fn row(name: &str, metric: &str, s: &Option<Summary>) {
    if let Some(s) = s {
        println!(
            "{name:<10} {metric:<26} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
            s.min, s.p50, s.p90, s.p99, s.max
        );
    }
}

pub fn run(a: ExecArgs) -> Result<()> {
    let machine = crate::machine();
    let (unix, sandbox) = match a.transport.as_str() {
        "unix" => (true, false),
        "sandbox" => (false, true),
        "both" => (true, true),
        other => bail!("--transport {other}: expected unix, sandbox or both"),
    };
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if sandbox && pvm {
        bail!("this host's /dev/kvm is PVM, which cannot boot the real kernel: run `--transport unix` here and the sandbox part inside the L2 VM, `./x l2 -- target/release/msb-bench exec --transport sandbox`");
    }
    if a.write_size == 0 || a.bytes % a.write_size != 0 {
        bail!(
            "--bytes {} is not a multiple of --write-size {}: pick sizes that divide",
            a.bytes,
            a.write_size
        );
    }
    let mut results = Vec::new();
    let mut launch = None;
    if unix {
        let bin = a.msb_init.clone().unwrap_or_else(msb_vmm::assets::msb_init);
        let (_agent, client) = host_agent(&bin)?;
        eprintln!(
            "agent over a Unix socket: {} round trips, {} x {} bytes written {} at a time",
            a.iterations, a.throughput_runs, a.bytes, a.write_size
        );
        if a.seccomp_cost {
            // A fresh connection from a confined thread (its reader thread inherits the
            // filter). The two take turns, a share of the round trips and one throughput run
            // at a time, so a slow spell of the shared machine falls on both alike.
            let sock = _agent.dir.join("agent.sock");
            let (go, turns) = std::sync::mpsc::channel::<usize>();
            let (done, results_rx) = std::sync::mpsc::channel::<Result<TransportResult>>();
            let (bytes, write_size) = (a.bytes, a.write_size);
            let confined = std::thread::spawn(move || -> Result<()> {
                msb_confine::enter(
                    msb_confine::ThreadKind::Control,
                    msb_confine::Seccomp::Enforce,
                )?;
                let client =
                    AgentClient::connect(UnixStream::connect(&sock)?, Duration::from_secs(10))?;
                for iterations in turns {
                    let _ = done.send(measure(
                        "unix, seccomp",
                        &client,
                        iterations,
                        bytes,
                        write_size,
                        1,
                    ));
                }
                Ok(())
            });
            let rounds = a.throughput_runs.max(1);
            let mut plain = TransportResult {
                transport: "unix".into(),
                ..Default::default()
            };
            let mut filtered = TransportResult {
                transport: "unix, seccomp".into(),
                ..Default::default()
            };
            for round in 0..rounds {
                let share = a.iterations / rounds + usize::from(round < a.iterations % rounds);
                plain.extend(measure("unix", &client, share, a.bytes, a.write_size, 1)?);
                go.send(share)
                    .map_err(|_| anyhow::anyhow!("the confined client stopped"))?;
                filtered.extend(
                    results_rx
                        .recv()
                        .map_err(|_| anyhow::anyhow!("the confined client stopped"))??,
                );
            }
            drop(go);
            confined
                .join()
                .map_err(|_| anyhow::anyhow!("the confined client panicked"))??;
            plain.summarize();
            filtered.summarize();
            results.push(plain);
            results.push(filtered);
        } else {
            results.push(measure(
                "unix",
                &client,
                a.iterations,
                a.bytes,
                a.write_size,
                a.throughput_runs,
            )?);
        }
    }
    if sandbox {
        let msb_vmm = match &a.msb_vmm {
            Some(p) => p.clone(),
            None => std::env::current_exe()?.with_file_name("msb-vmm"),
        };
        eprintln!("sandbox: {} launches of `msb-vmm run -- true`", a.launches);
        launch = Some(launches(&msb_vmm, a.launches)?);
        let sb = msb_vmm::sandbox::Sandbox::builder()
            .start()
            .context("starting a sandbox")?;
        eprintln!(
            "sandbox: {} round trips, {} x {} bytes written {} at a time",
            a.iterations, a.throughput_runs, a.bytes, a.write_size
        );
        results.push(measure(
            "sandbox",
            sb.agent(),
            a.iterations,
            a.bytes,
            a.write_size,
            a.throughput_runs,
        )?);
        let _ = sb.shutdown();
    }
    println!(
        "machine: {} ({} cores), host kernel {}, {}",
        machine.cpu, machine.cores, machine.kernel, machine.kvm
    );
    println!(
        "{:<10} {:<26} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "transport", "metric", "min", "p50", "p90", "p99", "max"
    );
    for r in &results {
        row(
            &r.transport,
            "exec `true` round trip (ms)",
            &r.round_trip_ms,
        );
        if r.host_spawn_ms.is_some() {
            row(&r.transport, "floor: host spawns true", &r.host_spawn_ms);
            row(&r.transport, "round trip - floor (ms)", &r.overhead_ms);
        }
        row(&r.transport, "stdout throughput (MB/s)", &r.throughput_mb_s);
        row(&r.transport, "floor: host pipe (MB/s)", &r.host_pipe_mb_s);
    }
    if let Some(l) = &launch {
        row("sandbox", "spawn→agent ready (ms)", &l.agent_ready_ms);
        row("sandbox", "VMM start→boot timer (ms)", &l.boot_timer_ms);
        row(
            "sandbox",
            "run -- true spawn→exit (ms)",
            &l.spawn_to_exit_ms,
        );
    }
    if let Some(j) = &a.json {
        let doc = serde_json::json!({ "machine": machine, "results": results, "launches": launch });
        std::fs::write(j, serde_json::to_string_pretty(&doc)?)?;
        eprintln!("json: {}", j.display());
    }
    Ok(())
}
