//! `msb-bench net --tls`: HTTPS through the netstack with TLS interception (a secret bound to
//! the server's name, so every request goes through the rewriter, which substitutes one
//! placeholder per request) against the same HTTPS traffic through the netstack without
//! interception and against loopback, same run: single-stream download and upload, new HTTPS
//! connections per second (leaf certificates cached after the first), and time to the first
//! response byte of a new connection.
//!
//! The server is rustls on host loopback with a CA of the bench's own; clients run in the
//! namespaces (`msb-bench net-client --mode tls-...`), trusting that CA (plain) or the sandbox
//! CA (intercepted).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use msb_devices::net::tap::GuestNamespace;
use msb_netstack::ca::{Ca, Leaves};
use msb_netstack::intercept::Intercept;
use msb_netstack::secrets::{Secret, Secrets};

use crate::net::{ClientArgs, ClientResult, NetArgs};
use crate::stats::summarize;

/// The server's name as clients ask for it.
const NAME: &str = "bench.test";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// HTTPS on loopback: `GET /bytes` streams until the client goes, `GET /1` answers one byte,
/// `POST /up` (chunked) counts the body; keep-alive.
fn serve(l: TcpListener, leaves: Arc<Leaves>) {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_cert_resolver(leaves);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = Arc::new(cfg);
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        let cfg = cfg.clone();
        std::thread::spawn(move || {
            let _ = c.set_nodelay(true);
            let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                return;
            };
            let mut s = rustls::StreamOwned::new(conn, c);
            let _ = serve_one(&mut s);
            s.conn.send_close_notify();
            let _ = s.flush();
        });
    }
}

fn serve_one(s: &mut impl ReadWrite) -> std::io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let head_end = loop {
            if let Some(p) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            pending.extend_from_slice(&buf[..n]);
        };
        let head: Vec<u8> = pending.drain(..head_end).collect();
        if head.starts_with(b"GET /bytes") {
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n")?;
            let block = vec![0x5au8; 1 << 16];
            loop {
                s.write_all(&block)?;
            }
        } else if head.starts_with(b"GET /1") {
            // Answered and closed by the server, as HTTP servers do with `Connection: close`:
            // TIME_WAIT stays here. (Had the stack's side closed first, thousands of its
            // loopback connections to this port in TIME_WAIT would soon make every `connect`
            // search long for a free port: 8 ms instead of 1 ms on this box.)
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")?;
            s.flush()?;
            return Ok(());
        } else if head.starts_with(b"POST /up") {
            // A chunked body: count its data until the last chunk.
            let mut total = 0u64;
            loop {
                let line_end = loop {
                    if let Some(p) = pending.windows(2).position(|w| w == b"\r\n") {
                        break p;
                    }
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    pending.extend_from_slice(&buf[..n]);
                };
                let size =
                    usize::from_str_radix(String::from_utf8_lossy(&pending[..line_end]).trim(), 16)
                        .map_err(|_| std::io::Error::other("bad chunk"))?;
                pending.drain(..line_end + 2);
                while pending.len() < size + 2 {
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    pending.extend_from_slice(&buf[..n]);
                }
                pending.drain(..size + 2);
                total += size as u64;
                if size == 0 {
                    break;
                }
            }
            let body = total.to_string();
            s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )?;
            s.flush()?;
        } else {
            return Ok(());
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A TLS client stream to `addr` for [`NAME`], trusting the CA in `ca`.
fn connect(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_nodelay(true)?;
    let conn = rustls::ClientConnection::new(cfg.clone(), NAME.try_into().expect("a name"))?;
    Ok(rustls::StreamOwned::new(conn, s))
}

fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .with_context(|| ca.display().to_string())?
    {
        roots.add(c?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Reads a response head; returns what came after it.
fn read_head(s: &mut impl Read) -> Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        if let Some(p) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(got[p + 4..].to_vec());
        }
        let n = s.read(&mut b)?;
        if n == 0 {
            bail!("the server closed before its answer");
        }
        got.extend_from_slice(&b[..n]);
    }
}

/// CPU time (user + system) of this process's netstack threads so far.
fn netstack_cpu() -> Duration {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != "netstack" {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        if let (Some(u), Some(s)) = (f.get(11), f.get(12)) {
            total += u.parse::<f64>().unwrap_or(0.0) + s.parse::<f64>().unwrap_or(0.0);
        }
    }
    Duration::from_secs_f64(total / tick)
}

/// `net-client --mode tls-*`: one measurement where the guest is.
pub fn client(a: &ClientArgs) -> Result<ClientResult> {
    let ca = a.ca.as_ref().context("--ca is needed for TLS modes")?;
    let cfg = client_config(ca)?;
    let dur = Duration::from_secs_f64(a.seconds);
    let auth = a.auth.clone().unwrap_or_default();
    let get = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {NAME}\r\nAuthorization: Bearer {auth}\r\n\r\n")
    };
    let mut out = ClientResult::default();
    match a.mode.as_str() {
        "tls-down" => {
            let mut s = connect(a.addr, &cfg)?;
            s.write_all(get("/bytes").as_bytes())?;
            let mut total = read_head(&mut s)?.len() as u64;
            let mut buf = vec![0u8; 1 << 20];
            let t = Instant::now();
            while t.elapsed() < dur {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    bail!("the server closed early");
                }
                total += n as u64;
            }
            out.rate = Some(total as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9);
        }
        "tls-up" => {
            let mut s = connect(a.addr, &cfg)?;
            let head = format!("POST /up HTTP/1.1\r\nHost: {NAME}\r\nAuthorization: Bearer {auth}\r\nTransfer-Encoding: chunked\r\n\r\n");
            s.write_all(head.as_bytes())?;
            let chunk = vec![0x5au8; 1 << 20];
            let frame = format!("{:x}\r\n", chunk.len());
            let t = Instant::now();
            while t.elapsed() < dur {
                s.write_all(frame.as_bytes())?;
                s.write_all(&chunk)?;
                s.write_all(b"\r\n")?;
            }
            s.write_all(b"0\r\n\r\n")?;
            s.flush()?;
            let body = read_head(&mut s)?;
            let mut text = String::from_utf8_lossy(&body).to_string();
            while text.is_empty() {
                let mut b = [0u8; 64];
                let n = s.read(&mut b)?;
                if n == 0 {
                    break;
                }
                text.push_str(&String::from_utf8_lossy(&b[..n]));
            }
            let total: u64 = text.trim().parse().context("the server's byte count")?;
            out.rate = Some(total as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e9);
        }
        "tls-connect" => {
            // `streams` clients at once, each connecting, asking, and closing in a loop.
            let t = Instant::now();
            let req = get("/1");
            let counts = std::thread::scope(|sc| {
                let workers: Vec<_> = (0..a.streams.max(1))
                    .map(|_| {
                        sc.spawn(|| -> Result<u64> {
                            let mut n = 0u64;
                            while t.elapsed() < dur {
                                let mut s = connect(a.addr, &cfg)?;
                                s.write_all(req.as_bytes())?;
                                read_head(&mut s)?;
                                s.conn.send_close_notify();
                                let _ = s.flush();
                                n += 1;
                            }
                            Ok(n)
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .map(|w| w.join().expect("a client thread"))
                    .collect::<Result<Vec<u64>>>()
            })?;
            out.rate = Some(counts.iter().sum::<u64>() as f64 / t.elapsed().as_secs_f64());
        }
        "tls-first" => {
            let req = get("/1");
            for _ in 0..a.round_trips {
                let t = Instant::now();
                let mut s = connect(a.addr, &cfg)?;
                s.write_all(req.as_bytes())?;
                read_head(&mut s)?;
                out.rtt_us.push(t.elapsed().as_secs_f64() * 1e6);
                s.conn.send_close_notify();
                let _ = s.flush();
            }
        }
        m => bail!("--mode {m}: expected tls-down, tls-up, tls-connect or tls-first"),
    }
    Ok(out)
}

struct Target {
    name: &'static str,
    prefix: Vec<String>,
    addr: SocketAddr,
    ca: PathBuf,
}

/// Metric key, label, client mode, clients at once.
const METRICS: [(&str, &str, &str, usize); 5] = [
    (
        "tls-down",
        "HTTPS host→guest 1 stream (Gbit/s)",
        "tls-down",
        1,
    ),
    ("tls-up", "HTTPS guest→host 1 stream (Gbit/s)", "tls-up", 1),
    (
        "tls-connect",
        "new HTTPS connections, 1 client (/s)",
        "tls-connect",
        1,
    ),
    (
        "tls-connect8",
        "new HTTPS connections, 8 clients (/s)",
        "tls-connect",
        8,
    ),
    (
        "tls-first",
        "new connection → first byte (µs)",
        "tls-first",
        1,
    ),
];

/// `msb-bench net --tls`.
pub fn run(a: &NetArgs) -> Result<()> {
    let exe = std::env::current_exe().context("finding msb-bench's own path")?;
    let dir = std::env::temp_dir().join(format!("msb-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let up_ca = Ca::generate()?;
    let up_ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&up_ca_file, up_ca.cert_pem())?;
    let sb_ca = Ca::generate()?;
    let sb_ca_file = dir.join("sandbox-ca.pem");
    std::fs::write(&sb_ca_file, sb_ca.cert_pem())?;
    // A server (port) per target: a thousand connections a second leave tens of thousands of
    // loopback tuples in TIME_WAIT, which would starve the next target's connects to the
    // same port of ephemeral ports.
    let leaves = Arc::new(Leaves::new(up_ca)?);
    let server = || -> Result<u16> {
        let l = TcpListener::bind("127.0.0.1:0").context("binding the server on loopback")?;
        let port = l.local_addr()?.port();
        let leaves = leaves.clone();
        std::thread::spawn(move || serve(l, leaves));
        Ok(port)
    };
    let port = server()?;

    let secrets = Secrets::new(vec![Secret::new(
        "BENCH_KEY",
        b"sk-bench-value".to_vec(),
        NAME,
    )?])?;
    let placeholder = secrets.get(0).placeholder().to_string();
    let mut intercept = Intercept::new(
        Arc::new(Leaves::new(sb_ca)?),
        secrets,
        &[&up_ca_file],
        false,
    )?;
    let tls_port = server()?;
    intercept.ports = vec![tls_port];
    let intercept = Arc::new(intercept);
    let mut parts = Vec::new();
    let mut targets = vec![Target {
        name: "loopback",
        prefix: vec!["env".into()],
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        ca: up_ca_file.clone(),
    }];
    for (name, icpt, ca) in [
        ("msb netstack", None, up_ca_file.clone()),
        (
            "msb netstack+tls",
            Some(intercept.clone()),
            sb_ca_file.clone(),
        ),
    ] {
        let ns_name = format!("msbtls{}{}", std::process::id(), parts.len());
        let (ns, tap) = GuestNamespace::create(&ns_name, a.mtu, true)
            .context("creating a guest namespace (needs root, iproute2 and /dev/net/tun)")?;
        let port = if icpt.is_some() { tls_port } else { server()? };
        let stack = crate::net::serve_tap(tap, port, a.mtu, icpt, msb_confine::Seccomp::Enforce)?;
        targets.push(Target {
            name,
            prefix: vec!["ip".into(), "netns".into(), "exec".into(), ns.name().into()],
            addr: SocketAddr::from((msb_netstack::addr::GATEWAY_V4, port)),
            ca,
        });
        parts.push((stack, ns));
    }
    eprintln!("machine: {:?}", crate::machine());
    eprintln!(
        "HTTPS through the netstack, mtu {}, {} run(s) of {} s per rate, {} new connections per latency run; intercepted: a secret bound to the server's name, one placeholder substituted per request",
        a.mtu, a.runs, a.seconds, a.round_trips
    );
    let mut table = Vec::new();
    for (key, label, mode, clients) in METRICS {
        if !a.only.is_empty() && !a.only.iter().any(|o| o == key) {
            continue;
        }
        for t in &targets {
            let mut samples = Vec::new();
            let runs = if mode == "tls-first" { 1 } else { a.runs };
            let (mut cpu, mut conns) = (Duration::ZERO, 0.0);
            for _ in 0..runs {
                let before = netstack_cpu();
                let r = run_client(&exe, t, mode, clients, a, &placeholder)?;
                cpu += netstack_cpu().saturating_sub(before);
                conns += r.rate.unwrap_or(0.0) * a.seconds;
                match r.rate {
                    Some(v) => samples.push(v),
                    None => samples.extend(r.rtt_us),
                }
            }
            if let Some(s) = summarize(&samples) {
                eprintln!(
                    "{label:<36} {:<18} p50 {:>9.2}  p90 {:>9.2}  p99 {:>9.2}  (n={})",
                    t.name, s.p50, s.p90, s.p99, s.n
                );
                table.push((key, t.name, s));
            }
            if mode == "tls-connect" && t.name != "loopback" && conns > 0.0 {
                // The netstack thread's own CPU time: what a connection costs the VMM, which
                // on this 2-core box shares the cores with the clients and the server.
                let us = cpu.as_secs_f64() * 1e6 / conns;
                eprintln!(
                    "{:<36} {:<18} {us:>9.0} µs of netstack CPU per connection (≈ {:.0} /s per core)",
                    "", t.name, 1e6 / us
                );
            }
        }
    }
    println!(
        "\n{:<36} {:>12} {:>12} {:>8}",
        "metric (p50)", "intercepted", "plain", "ratio"
    );
    for (key, label, mode, _) in METRICS {
        let p50 = |name: &str| {
            table
                .iter()
                .find(|(m, n, _)| *m == key && *n == name)
                .map(|(_, _, s)| s.p50)
        };
        if let (Some(i), Some(p)) = (p50("msb netstack+tls"), p50("msb netstack")) {
            let ratio = if mode == "tls-first" { p / i } else { i / p };
            let extra = if mode == "tls-first" {
                format!("  (+{:.0} µs)", i - p)
            } else {
                String::new()
            };
            println!(
                "{label:<36} {i:>12.2} {p:>12.2} {:>7.0}%{extra}",
                ratio * 100.0
            );
        }
    }
    drop(parts);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn run_client(
    exe: &Path,
    t: &Target,
    mode: &str,
    clients: usize,
    a: &NetArgs,
    auth: &str,
) -> Result<ClientResult> {
    let (program, rest) = t.prefix.split_first().expect("a prefix");
    let rounds = (a.round_trips / 10).max(20).to_string();
    let out = Command::new(program)
        .args(rest)
        .arg(exe)
        .args(["net-client", "--mode", mode, "--addr", &t.addr.to_string()])
        .args([
            "--seconds",
            &a.seconds.to_string(),
            "--round-trips",
            &rounds,
            "--streams",
            &clients.to_string(),
        ])
        .arg("--ca")
        .arg(&t.ca)
        .args(["--auth", auth])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running the client through {program}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    if !out.status.success() || line.is_empty() {
        bail!(
            "{}: the {mode} client failed: {}",
            t.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_str(line)?)
}
