//! `msb-bench net --limits`: what a live policy change and `--net-rate` deliver, through our
//! netstack with the host kernel playing the guest in a namespace over TAP.
//!
//! - **revoke**: a guest download runs; the policy is replaced by one that denies it; the
//!   figure is the time from the call to the guest's read failing (both clocks are the host's
//!   `CLOCK_MONOTONIC`: the client is another process on the same kernel).
//! - **rate**: downloads and uploads under `--net-rate`, as the relative error of the rate
//!   achieved over each sample.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use msb_confine::Seccomp;
use msb_devices::net::tap::GuestNamespace;
use msb_netstack::policy::{Action, Policy, Preset};
use msb_netstack::stack::{Config, NetStack};

use crate::net::{ClientArgs, NetArgs};
use crate::stats::summarize;

/// `CLOCK_MONOTONIC` in ns: the same clock in every process on the host.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The guest's side of `revoke`, `--round-trips` times: start a download, say `ready` once
/// data flows, read until the flow breaks, say `cut NS` (when it broke), wait for a line on
/// stdin before the next one.
pub(crate) fn client(a: &ClientArgs) -> Result<()> {
    let mut stdin = BufReader::new(std::io::stdin());
    let mut out = std::io::stdout();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..a.round_trips {
        let mut s = TcpStream::connect_timeout(&a.addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {}", a.addr))?;
        s.write_all(&[crate::net::DOWN])?;
        s.read_exact(&mut buf[..1])
            .context("the download never started")?;
        writeln!(out, "ready")?;
        out.flush()?;
        loop {
            match s.read(&mut buf) {
                Ok(n) if n > 0 => continue,
                _ => break,
            }
        }
        writeln!(out, "cut {}", monotonic_ns())?;
        out.flush()?;
        let mut line = String::new();
        if stdin.read_line(&mut line)? == 0 {
            break;
        }
    }
    Ok(())
}

fn allow_port(port: u16) -> Result<Policy> {
    let mut policy = Policy::preset(Preset::None);
    policy
        .add_flag(Action::Allow, &format!("tcp:host:{port}"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(policy)
}

fn stack(name: &str, a: &NetArgs, port: u16, cfg: Config) -> Result<(NetStack, GuestNamespace)> {
    let (ns, tap) = GuestNamespace::create(name, a.mtu, true)
        .context("creating the guest namespace (needs iproute2 and /dev/net/tun)")?;
    msb_devices::net::alloc::pin_mmap_threshold();
    let stack = NetStack::spawn(
        Box::new(tap),
        Config {
            policy: allow_port(port)?,
            mtu: a.mtu,
            seccomp: Seccomp::Enforce,
            ..cfg
        },
    )
    .context("starting the netstack")?;
    Ok((stack, ns))
}

fn report(label: &str, samples: &[f64]) {
    if let Some(s) = summarize(samples) {
        println!(
            "{label:<36} p50 {:>8.2}  p90 {:>8.2}  p99 {:>8.2}  (n={})",
            s.p50, s.p90, s.p99, s.n
        );
    }
}

pub(crate) fn run(a: &NetArgs, exe: &Path, listener: TcpListener) -> Result<()> {
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || crate::net::serve(listener));
    let gw = SocketAddr::from((msb_netstack::addr::GATEWAY_V4, port));
    let base = format!("msbbench{}", std::process::id());
    eprintln!("machine: {:?}", crate::machine());

    // Time to cut a revoked flow.
    let (stack_r, ns) = stack(&format!("{base}r"), a, port, Config::default())?;
    let n = a.round_trips.clamp(1, 1000);
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(exe)
        .args(["net-client", "--mode", "revoke", "--addr", &gw.to_string()])
        .args(["--round-trips", &n.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the client in the namespace")?;
    let mut to_client = child.stdin.take().context("client stdin")?;
    let mut from_client = BufReader::new(child.stdout.take().context("client stdout")?);
    let mut cut_ms = Vec::with_capacity(n);
    let mut line = String::new();
    for i in 0..n {
        line.clear();
        from_client.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("revoke sample {i}: the client said {line:?}");
        }
        // Let the download reach full speed.
        std::thread::sleep(Duration::from_millis(20));
        let t0 = monotonic_ns();
        let changed = stack_r.set_policy(Policy::preset(Preset::None))?;
        if changed.flows_cut != 1 {
            bail!("revoke sample {i}: {changed:?}, expected one flow cut");
        }
        line.clear();
        from_client.read_line(&mut line)?;
        let at: u64 = line
            .trim()
            .strip_prefix("cut ")
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("revoke sample {i}: the client said {line:?}"))?;
        cut_ms.push(at.saturating_sub(t0) as f64 / 1e6);
        stack_r.set_policy(allow_port(port)?)?;
        writeln!(to_client, "next")?;
    }
    drop(to_client);
    let _ = child.wait();
    drop(stack_r);
    drop(ns);
    report("revoked download cut (ms)", &cut_ms);

    // --net-rate accuracy, each way.
    let rate = 32u64 << 20;
    let (stack_l, ns) = stack(
        &format!("{base}l"),
        a,
        port,
        Config {
            rate_in: Some(rate),
            rate_out: Some(rate),
            ..Config::default()
        },
    )?;
    for (mode, label) in [
        ("down", "--net-rate 32m in: error (%)"),
        ("up", "--net-rate 32m out: error (%)"),
    ] {
        let mut errs = Vec::new();
        for _ in 0..a.runs.max(1) {
            let out = Command::new("ip")
                .args(["netns", "exec", ns.name()])
                .arg(exe)
                .args(["net-client", "--mode", mode, "--addr", &gw.to_string()])
                .args(["--seconds", &a.seconds.max(2.0).to_string()])
                .stdin(Stdio::null())
                .output()
                .context("running the client in the namespace")?;
            let text = String::from_utf8_lossy(&out.stdout);
            let r: crate::net::ClientResult =
                serde_json::from_str(text.lines().last().unwrap_or(""))
                    .with_context(|| format!("the {mode} client said {text:?}"))?;
            let gbit = r.rate.context("a throughput")?;
            let bytes_per_s = gbit * 1e9 / 8.0;
            errs.push((bytes_per_s / rate as f64 - 1.0) * 100.0);
        }
        report(label, &errs);
    }
    drop(stack_l);
    drop(ns);
    Ok(())
}
