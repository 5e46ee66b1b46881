//! `msb-bench net`: TCP throughput (guest→host and host→guest, one and eight streams), connect
//! rate and round-trip latency through our netstack, with the host kernel playing the guest
//! in a network namespace over TAP; against host loopback with the same client (the ceiling)
//! and against peers given with `--peer` (pasta, from Debian's passt, which also serves a
//! namespace through a TAP device), all in the same run. Inside a sandbox with `--sandbox`.
//!
//! One client (`msb-bench net-client`, this binary) runs wherever the guest is; one server,
//! on host loopback in this process, answers every target. The guest reaches it through its
//! gateway address, as the policy group `host`. The `hostcheck` row measures what a flow to
//! any other address pays on top: asking the kernel whether it is the host's.

use msb_confine::Seccomp;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use msb_devices::net::tap::GuestNamespace;
use msb_netstack::policy::{Action, Policy, Preset};
use msb_netstack::stack::{Config, NetStack};
use serde::{Deserialize, Serialize};

use crate::stats::{summarize, Summary};

#[derive(clap::Args, Debug)]
pub struct NetArgs {
    /// Link MTU of the namespace's TAP device and the netstack (up to 65520).
    #[arg(long, default_value_t = 65520)]
    pub(crate) mtu: usize,
    /// Seconds per throughput and connect-rate sample.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) seconds: f64,
    /// Samples per throughput and connect-rate metric and target.
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: usize,
    /// Round trips (1 byte each way) per latency run (with --tls: a tenth of it new
    /// connections, at least 20).
    #[arg(long, default_value_t = 5000)]
    pub(crate) round_trips: usize,
    /// A peer to compare with: `pasta` or `pasta=PATH` (Debian's passt package).
    #[arg(long = "peer", value_name = "NAME[=PATH]")]
    peers: Vec<String>,
    /// The namespace's TAP device without checksum and segmentation offloads (by default it
    /// has them, as a sandbox's virtio-net card does).
    #[arg(long)]
    no_offload: bool,
    /// Only these metrics (comma-separated: hostcheck,up1,up8,down1,down8,connect1,connect8,rtt;
    /// with --tls: tls-down,tls-up,tls-connect,tls-first).
    #[arg(long, value_delimiter = ',')]
    pub(crate) only: Vec<String>,
    /// Also measure inside a sandbox (needs a /dev/kvm that runs Linux guests: inside the L2
    /// VM on PVM hosts, where only the path, not the figures, means anything).
    #[arg(long)]
    sandbox: bool,
    /// Write samples and summaries as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// HTTPS with TLS interception and a secret vs the same HTTPS without, and loopback.
    #[arg(long)]
    tls: bool,
    /// Also measure a second netstack running without its seccomp filter, in the same run:
    /// what confinement costs.
    #[arg(long)]
    seccomp_cost: bool,
    /// Limits instead: the time to cut a download whose policy is revoked (`--round-trips`
    /// samples, at most 1000) and `--net-rate`'s accuracy each way (`--runs` samples).
    #[arg(long)]
    limits: bool,
}

/// The client's side of one measurement, run where the guest is.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// up (guest sends), down (guest receives), connect, rtt; tls-down, tls-up,
    /// tls-connect, tls-first (HTTPS, see `--tls`); revoke (see `--limits`).
    #[arg(long)]
    pub(crate) mode: String,
    /// The server, as the guest sees it.
    #[arg(long)]
    pub(crate) addr: SocketAddr,
    #[arg(long, default_value_t = 2.0)]
    pub(crate) seconds: f64,
    #[arg(long, default_value_t = 1)]
    pub(crate) streams: usize,
    #[arg(long, default_value_t = 5000)]
    pub(crate) round_trips: usize,
    /// TLS modes: the CA (PEM) the client trusts.
    #[arg(long)]
    pub(crate) ca: Option<PathBuf>,
    /// TLS modes: the Authorization bearer value each request carries (a placeholder).
    #[arg(long)]
    pub(crate) auth: Option<String>,
}

/// What a client prints (one JSON line).
#[derive(Serialize, Deserialize, Debug, Default)]
pub(crate) struct ClientResult {
    /// Throughput in Gbit/s, connects per second, or nothing for rtt.
    pub(crate) rate: Option<f64>,
    /// Round-trip times in µs.
    pub(crate) rtt_us: Vec<f64>,
}

const UP: u8 = b'U';
pub(crate) const DOWN: u8 = b'D';
const ECHO: u8 = b'E';
const CLOSE: u8 = b'C';

/// `msb-bench net-server`: [`serve`] on the listening socket this process got as stdin.
pub(crate) fn server_on_stdin() -> Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: `net` starts this process with its listening socket as descriptor 0, which
    // nothing else in this process owns.
    let fd = unsafe { OwnedFd::from_raw_fd(0) };
    let listener = TcpListener::from(fd);
    listener
        .local_addr()
        .context("net-server: standard input is not a listening socket")?;
    // Gone with the bench, however it ends.
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    serve(listener);
    Ok(())
}

/// The loopback server's process, ended with the run.
struct ServerProcess(std::process::Child);

impl ServerProcess {
    fn start(exe: &Path, listener: TcpListener) -> Result<ServerProcess> {
        let child = std::process::Command::new(exe)
            .arg("net-server")
            .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                listener,
            )))
            .spawn()
            .context("starting the loopback server process")?;
        Ok(ServerProcess(child))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The server on host loopback: per connection, a mode byte, then sink (answering the byte
/// count at EOF), source (until the peer goes), echo, or close at once (connect rate).
pub(crate) fn serve(l: TcpListener) {
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        std::thread::spawn(move || {
            let _ = c.set_nodelay(true);
            let mut mode = [0u8; 1];
            if c.read_exact(&mut mode).is_err() {
                return;
            }
            if mode[0] == CLOSE {
                return;
            }
            let mut buf = vec![0u8; 1 << 20];
            match mode[0] {
                UP => {
                    let mut total = 0u64;
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => total += n as u64,
                            Err(_) => return,
                        }
                    }
                    let _ = c.write_all(&total.to_le_bytes());
                }
                DOWN => while c.write_all(&buf).is_ok() {},
                ECHO => loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                },
                _ => {}
            }
        });
    }
}

/// `net-client`: one measurement; prints a [`ClientResult`] line.
pub fn client(a: ClientArgs) -> Result<()> {
    if a.mode == "revoke" {
        return crate::limits::client(&a);
    }
    if a.mode.starts_with("tls-") {
        let out = crate::tls::client(&a)?;
        println!("{}", serde_json::to_string(&out)?);
        return Ok(());
    }
    let dur = Duration::from_secs_f64(a.seconds);
    let connect = || -> Result<TcpStream> {
        let s = TcpStream::connect_timeout(&a.addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {}", a.addr))?;
        s.set_nodelay(true)?;
        Ok(s)
    };
    let mut out = ClientResult::default();
    match a.mode.as_str() {
        "up" | "down" => {
            let up = a.mode == "up";
            let start = Instant::now();
            let threads: Vec<_> = (0..a.streams.max(1))
                .map(|_| {
                    let mut s = connect()?;
                    Ok(std::thread::spawn(move || -> Result<u64> {
                        s.write_all(&[if up { UP } else { DOWN }])?;
                        let mut buf = vec![0x5au8; 1 << 20];
                        let t = Instant::now();
                        let mut total = 0u64;
                        if up {
                            while t.elapsed() < dur {
                                s.write_all(&buf)?;
                            }
                            s.shutdown(Shutdown::Write)?;
                            let mut n = [0u8; 8];
                            s.read_exact(&mut n)
                                .context("reading the server's byte count")?;
                            total = u64::from_le_bytes(n);
                        } else {
                            while t.elapsed() < dur {
                                let n = s.read(&mut buf)?;
                                if n == 0 {
                                    bail!("the server closed early");
                                }
                                total += n as u64;
                            }
                        }
                        Ok(total)
                    }))
                })
                .collect::<Result<_>>()?;
            let mut total = 0u64;
            for t in threads {
                total += t.join().map_err(|_| anyhow::anyhow!("stream panicked"))??;
            }
            out.rate = Some(total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9);
        }
        "connect" => {
            let t = Instant::now();
            let threads: Vec<_> = (0..a.streams.max(1))
                .map(|_| {
                    let addr = a.addr;
                    std::thread::spawn(move || -> Result<u64> {
                        let mut n = 0u64;
                        let mut b = [0u8; 1];
                        while t.elapsed() < dur {
                            // The server closes first, so TIME_WAIT stays on its side, not on
                            // the client's ports (a reset instead makes loopback itself slow).
                            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                                .with_context(|| format!("connecting to {addr}"))?;
                            s.write_all(&[CLOSE])?;
                            let _ = s.read(&mut b);
                            n += 1;
                        }
                        Ok(n)
                    })
                })
                .collect();
            let mut n = 0u64;
            for t in threads {
                n += t
                    .join()
                    .map_err(|_| anyhow::anyhow!("connector panicked"))??;
            }
            out.rate = Some(n as f64 / t.elapsed().as_secs_f64());
        }
        "rtt" => {
            let mut s = connect()?;
            s.write_all(&[ECHO])?;
            let mut b = [0u8; 1];
            for i in 0..a.round_trips {
                let t = Instant::now();
                s.write_all(&[i as u8])?;
                s.read_exact(&mut b)?;
                out.rtt_us.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        m => bail!("--mode {m}: expected up, down, connect or rtt"),
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}

/// Where a client runs and how it reaches the server.
struct Target {
    name: String,
    /// The command prefix that runs a program where the guest is.
    prefix: Vec<String>,
    /// The server's address as seen from there.
    addr: SocketAddr,
    /// A sandbox the client runs in through the agent (then `prefix` is unused).
    sandbox: Option<msb_vmm::sandbox::Sandbox>,
    /// Given with `--peer` (its failures are reported, not fatal).
    peer: bool,
}

const METRICS: [(&str, &str, &str, usize); 7] = [
    ("up1", "guest→host 1 stream (Gbit/s)", "up", 1),
    ("up8", "guest→host 8 streams (Gbit/s)", "up", 8),
    ("down1", "host→guest 1 stream (Gbit/s)", "down", 1),
    ("down8", "host→guest 8 streams (Gbit/s)", "down", 8),
    ("connect1", "connect+close, 1 client (/s)", "connect", 1),
    ("connect8", "connect+close, 8 clients (/s)", "connect", 8),
    ("rtt", "round trip, 1 byte (µs)", "rtt", 1),
];

fn run_client(
    exe: &Path,
    t: &Target,
    mode: &str,
    streams: usize,
    a: &NetArgs,
) -> Result<ClientResult> {
    let args: Vec<String> = [
        "net-client",
        "--mode",
        mode,
        "--addr",
        &t.addr.to_string(),
        "--seconds",
        &a.seconds.to_string(),
        "--streams",
        &streams.to_string(),
        "--round-trips",
        &a.round_trips.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let (ok, stdout, stderr) = match &t.sandbox {
        Some(sb) => {
            let mut argv = vec![format!("{GUEST_BIN}/msb-bench")];
            argv.extend(args);
            let out = sb
                .output(argv)
                .context("running the client in the sandbox")?;
            (out.status.success(), out.stdout, out.stderr)
        }
        None => {
            let (program, rest) = t.prefix.split_first().expect("a prefix");
            let out = Command::new(program)
                .args(rest)
                .arg(exe)
                .args(&args)
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("running the client through {program}"))?;
            (out.status.success(), out.stdout, out.stderr)
        }
    };
    let stdout = String::from_utf8_lossy(&stdout);
    let line = stdout.lines().last().unwrap_or("");
    if !ok || line.is_empty() {
        bail!(
            "{}: the {mode} client failed: {}",
            t.name,
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    serde_json::from_str(line).with_context(|| format!("{}: client said {line:?}", t.name))
}

/// Where this binary's directory is mounted in the sandbox.
const GUEST_BIN: &str = "/opt/msb-bench";

/// A sandbox on the default root (Debian: this binary's C library) with this binary's
/// directory as a read-only volume and a network card that may reach the server's port.
fn bench_sandbox(exe: &Path, port: u16, mtu: usize) -> Result<msb_vmm::sandbox::Sandbox> {
    use msb_vmm::assets::{default_root, DefaultRoot};
    use msb_vmm::sandbox::{Network, Sandbox, Volume};
    let dir = exe.parent().context("msb-bench's directory")?;
    let vol = Volume::parse(&format!("{}:{GUEST_BIN}:ro", dir.display()))?;
    let mut policy = Policy::preset(Preset::None);
    policy
        .add_flag(Action::Allow, &format!("tcp:host:{port}"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut b = Sandbox::builder().memory_mib(1024).volume(vol).network({
        let mut n = Network::new(policy);
        n.mtu = u16::try_from(mtu).context("--mtu")?;
        n
    });
    match default_root() {
        DefaultRoot::Dir(d) if d.is_dir() => b = b.rootfs_overlay(d),
        DefaultRoot::Dir(d) => bail!(
            "--sandbox runs this binary on the default Debian root, which is not at {} (run ./x setup)",
            d.display()
        ),
        DefaultRoot::Initramfs => {
            bail!("--sandbox needs the Debian root (this binary links glibc), not MSB_ROOTFS=initramfs")
        }
    }
    b.start().context("starting a sandbox")
}

#[derive(Serialize)]
struct Row {
    metric: &'static str,
    target: String,
    samples: Vec<f64>,
    summary: Option<Summary>,
}

pub fn run(a: NetArgs) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("msb-bench net creates a network namespace and a TAP device: run it as root");
    }
    if !(68..=65520).contains(&a.mtu) {
        bail!("--mtu {}: expected 68 to 65520", a.mtu);
    }
    if a.tls {
        return crate::tls::run(&a);
    }
    if a.sandbox && Path::new("/sys/module/kvm_pvm").exists() {
        bail!("this host's /dev/kvm is PVM, which cannot boot the real kernel: run the sandbox part inside the L2 VM, `./x l2 -- target/release/msb-bench net --sandbox`");
    }
    let exe = std::env::current_exe().context("finding msb-bench's own path")?;
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the server on loopback")?;
    if a.limits {
        return crate::limits::run(&a, &exe, listener);
    }
    let port = listener.local_addr()?.port();
    // In a child process: a thread per connection started and ended beside our netstack would
    // interrupt it (each exiting thread unmaps its stacks), which pasta, a process of its own,
    // never sees.
    let _server = ServerProcess::start(&exe, listener)?;

    let mut targets = vec![Target {
        name: "loopback".into(),
        prefix: vec!["env".into()],
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        sandbox: None,
        peer: false,
    }];
    // Our netstack, serving a namespace over TAP; the guest may reach this one port.
    let ns_name = format!("msbbench{}", std::process::id());
    let mut tap_part = None;
    match GuestNamespace::create(&ns_name, a.mtu, !a.no_offload) {
        Ok((ns, tap)) => {
            let stack = serve_tap(tap, port, a.mtu, None, Seccomp::Enforce)?;
            targets.push(Target {
                name: "msb netstack".into(),
                prefix: vec!["ip".into(), "netns".into(), "exec".into(), ns.name().into()],
                addr: SocketAddr::from((msb_netstack::addr::GATEWAY_V4, port)),
                sandbox: None,
                peer: false,
            });
            tap_part = Some((stack, ns));
        }
        // The L2 VM's kernel has no TUN driver: the sandbox part still runs there.
        Err(e) if a.sandbox => {
            eprintln!("no namespace+TAP client here ({e}); measuring loopback and the sandbox")
        }
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context("creating the guest namespace (needs iproute2 and /dev/net/tun)"))
        }
    }
    let mut unconfined_part = None;
    if a.seccomp_cost {
        let (ns, tap) = GuestNamespace::create(&format!("{ns_name}u"), a.mtu, !a.no_offload)
            .context("creating the second guest namespace")?;
        let stack = serve_tap(tap, port, a.mtu, None, Seccomp::Off)?;
        targets.push(Target {
            name: "msb netstack, no seccomp".into(),
            prefix: vec!["ip".into(), "netns".into(), "exec".into(), ns.name().into()],
            addr: SocketAddr::from((msb_netstack::addr::GATEWAY_V4, port)),
            sandbox: None,
            peer: false,
        });
        unconfined_part = Some((stack, ns));
    }
    if a.sandbox {
        targets.push(Target {
            name: "sandbox".into(),
            prefix: Vec::new(),
            addr: SocketAddr::from((msb_netstack::addr::GATEWAY_V4, port)),
            sandbox: Some(bench_sandbox(&exe, port, a.mtu)?),
            peer: false,
        });
    }
    for p in &a.peers {
        let (name, path) = p.split_once('=').unwrap_or((p.as_str(), ""));
        match name {
            "pasta" | "passt" => {
                let path = if path.is_empty() { "pasta" } else { path };
                let mtu = a.mtu.to_string();
                let gw = default_gateway().context(
                    "pasta maps the host's default gateway address to host loopback; this host has no IPv4 default route",
                )?;
                targets.push(Target {
                    name: "pasta".into(),
                    prefix: [
                        // As root it would switch to nobody and fail its user mappings.
                        path,
                        "--runas",
                        "0",
                        "--config-net",
                        "--quiet",
                        "-t",
                        "none",
                        "-u",
                        "none",
                        "-T",
                        "none",
                        "-U",
                        "none",
                        // The same link MTU as our namespace gets.
                        "--mtu",
                        &mtu,
                        "--",
                    ]
                    .map(String::from)
                    .to_vec(),
                    addr: SocketAddr::from((gw, port)),
                    sandbox: None,
                    peer: true,
                });
            }
            other => bail!("--peer {other}: known peers are pasta (Debian's passt)"),
        }
    }

    let machine = crate::machine();
    eprintln!("machine: {machine:?}");
    eprintln!(
        "mtu {}, offloads {}, {} run(s) of {} s per throughput/connect figure, {} round trips",
        a.mtu,
        if a.no_offload { "off" } else { "on" },
        a.runs,
        a.seconds,
        a.round_trips
    );
    let mut rows = Vec::new();
    if a.only.is_empty() || a.only.iter().any(|o| o == "hostcheck") {
        rows.push(host_check()?);
    }
    let mut failed_peers = Vec::new();
    for (key, label, mode, streams) in METRICS {
        if !a.only.is_empty() && !a.only.iter().any(|o| o == key) {
            continue;
        }
        // Round robin over the targets, one run each in turn, so that a slow spell of this
        // shared machine falls on every target alike rather than on whichever ran then.
        let runs = if mode == "rtt" { 1 } else { a.runs };
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
        let mut failed = vec![false; targets.len()];
        for _ in 0..runs {
            for (i, t) in targets.iter().enumerate() {
                if failed[i] {
                    continue;
                }
                match run_client(&exe, t, mode, streams, &a) {
                    Ok(r) => match r.rate {
                        Some(v) => samples[i].push(v),
                        None => samples[i].extend(r.rtt_us),
                    },
                    // A peer that fails a metric is reported and skipped; ours fails the run.
                    Err(e) if t.peer => {
                        let why = format!("{e:#}");
                        let last = why
                            .lines()
                            .find(|l| l.starts_with("Error:"))
                            .unwrap_or_else(|| why.lines().next().unwrap_or(""))
                            .to_string();
                        eprintln!("{label:<32} {:<24} failed: {last}", t.name);
                        failed_peers.push(format!("{} {key}: {last}", t.name));
                        failed[i] = true;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        for (t, samples) in targets.iter().zip(samples) {
            let summary = summarize(&samples);
            if let Some(s) = &summary {
                eprintln!(
                    "{label:<32} {:<24} p50 {:>9.2}  p90 {:>9.2}  p99 {:>9.2}  (n={})",
                    t.name, s.p50, s.p90, s.p99, s.n
                );
            }
            rows.push(Row {
                metric: label,
                target: t.name.clone(),
                samples,
                summary,
            });
        }
    }
    let row = |label: &str, target: &str| {
        rows.iter()
            .find(|r| r.metric == label && r.target == target)
    };
    // Each target as a share of the ceiling, at p50 (for latency: ceiling / ours).
    println!(
        "\n{:<32} {:<24} {:>10} {:>10} {:>7}",
        "metric (p50)", "target", "value", "loopback", "ratio"
    );
    for (_, label, mode, _) in METRICS {
        let p50 = |target: &str| row(label, target).and_then(|r| r.summary).map(|s| s.p50);
        let Some(h) = p50("loopback") else { continue };
        for t in targets.iter().filter(|t| t.name != "loopback") {
            let Some(m) = p50(&t.name) else { continue };
            let ratio = if mode == "rtt" { h / m } else { m / h };
            println!(
                "{label:<32} {:<24} {m:>10.2} {h:>10.2} {:>6.0}%",
                t.name,
                ratio * 100.0
            );
        }
    }
    if a.seccomp_cost {
        // Confinement's cost: the filtered netstack against the unfiltered one at p50, and for
        // rates also the median of the per-round ratios (each round ran both back to back).
        println!(
            "\n{:<32} {:>10} {:>10} {:>8} {:>12}",
            "seccomp cost (p50)", "seccomp", "none", "diff", "paired diff"
        );
        for (_, label, mode, _) in METRICS {
            let (Some(on), Some(off)) = (
                row(label, "msb netstack"),
                row(label, "msb netstack, no seccomp"),
            ) else {
                continue;
            };
            let (Some(son), Some(soff)) = (on.summary, off.summary) else {
                continue;
            };
            // Positive: confinement made it worse (slower rate, longer round trip).
            let worse = |on: f64, off: f64| {
                if mode == "rtt" {
                    on / off - 1.0
                } else {
                    1.0 - on / off
                }
            };
            let paired = if mode == "rtt" {
                String::from("-")
            } else {
                let ratios: Vec<f64> = on
                    .samples
                    .iter()
                    .zip(&off.samples)
                    .map(|(x, y)| worse(*x, *y))
                    .collect();
                summarize(&ratios).map_or("-".into(), |s| format!("{:+.1}%", s.p50 * 100.0))
            };
            println!(
                "{label:<32} {:>10.2} {:>10.2} {:>+7.1}% {paired:>12}",
                son.p50,
                soff.p50,
                worse(son.p50, soff.p50) * 100.0
            );
        }
    }
    for t in &mut targets {
        if let Some(sb) = t.sandbox.take() {
            let _ = sb.shutdown();
        }
    }
    drop(tap_part);
    drop(unconfined_part);
    if let Some(path) = &a.json {
        let doc = serde_json::json!({
            "machine": machine, "mtu": a.mtu, "offload": !a.no_offload, "rows": rows,
            "failed_peers": failed_peers,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| path.display().to_string())?;
    }
    Ok(())
}

/// What each new flow to an address other than the gateway's pays to learn whether the host
/// kernel delivers it locally (one `RTM_GETROUTE` round trip, see `msb_netstack::local`),
/// in µs, over loopback, a public and a private destination in turn (asked, never contacted).
fn host_check() -> Result<Row> {
    const N: usize = 3000;
    let routes = msb_netstack::local::Routes::new().context("opening a netlink route socket")?;
    let dsts: [std::net::IpAddr; 3] = [
        std::net::Ipv4Addr::new(127, 0, 0, 1).into(),
        std::net::Ipv4Addr::new(93, 184, 215, 14).into(),
        std::net::Ipv4Addr::new(10, 77, 0, 1).into(),
    ];
    let mut samples = Vec::with_capacity(N);
    for i in 0..N {
        let t = std::time::Instant::now();
        routes.delivery(dsts[i % dsts.len()])?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let label = "host-address check per flow (us)";
    let summary = summarize(&samples);
    if let Some(s) = &summary {
        eprintln!(
            "{label:<32} {:<14} p50 {:>9.2}  p90 {:>9.2}  p99 {:>9.2}  (n={})",
            "msb netstack", s.p50, s.p90, s.p99, s.n
        );
    }
    Ok(Row {
        metric: label,
        target: "msb netstack".into(),
        samples,
        summary,
    })
}

/// Our netstack serving a guest namespace's TAP device, letting the guest reach only the
/// host's `port` (and intercepting TLS with `intercept`).
pub(crate) fn serve_tap(
    tap: msb_devices::net::tap::Tap,
    port: u16,
    mtu: usize,
    intercept: Option<std::sync::Arc<msb_netstack::intercept::Intercept>>,
    seccomp: Seccomp,
) -> Result<NetStack> {
    let mut policy = Policy::preset(Preset::None);
    policy
        .add_flag(Action::Allow, &format!("tcp:host:{port}"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = Config {
        policy,
        mtu,
        intercept,
        seccomp,
        ..Config::default()
    };
    msb_devices::net::alloc::pin_mmap_threshold();
    NetStack::spawn(Box::new(tap), cfg).context("starting the netstack")
}

/// The host's IPv4 default gateway (from /proc/net/route).
fn default_gateway() -> Option<std::net::Ipv4Addr> {
    let routes = std::fs::read_to_string("/proc/net/route").ok()?;
    routes.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 2 && f[1] == "00000000" {
            let g = u32::from_str_radix(f[2], 16).ok()?;
            Some(std::net::Ipv4Addr::from(g.to_le_bytes()))
        } else {
            None
        }
    })
}
