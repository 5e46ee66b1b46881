//! A named sandbox's control socket and metrics endpoint, served by its `__serve` process.
//!
//! `NAME/control.sock` (0600, in the sandbox's 0700 directory) takes one request per
//! connection, one JSON line each way:
//!
//! ```text
//! {"op":"stats"}                        → {"ok":true,"stats":{...}}        (SandboxStats)
//! {"op":"policy"}                       → {"ok":true,"policy":"preset = ..."}
//! {"op":"set_policy","flags":{...}}     → {"ok":true,"flows_cut":1,"flows_kept":3}
//! {"op":"suggest"}                      → {"ok":true,"policy":"..."}       (learn mode)
//! {"op":"pause"} / {"op":"resume"}      → {"ok":true}   (NAME/paused exists while paused)
//! {"op":"snapshot","dir":"/abs/dir"}    → {"ok":true}   (Sandbox::snapshot)
//! anything that fails                   → {"ok":false,"error":"one line"}
//! ```
//!
//! `--metrics-socket PATH` serves the Prometheus text format over HTTP/1.x on a Unix socket
//! (scrapers reach it through a local proxy or node-exporter's textfile collector).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use msb_vmm::sandbox::Sandbox;
use serde::{Deserialize, Serialize};

use super::PolicyFlags;

/// A control request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Stats,
    Policy,
    SetPolicy { flags: PolicyFlags },
    Suggest,
    Pause,
    Resume,
    Snapshot { dir: std::path::PathBuf },
}

/// The largest request line (a policy file's text rides in it).
const MAX_REQUEST: u64 = 1 << 20;
/// How long one connection may take to send its request.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loops look at their stop flag.
const TICK: Duration = Duration::from_millis(200);

/// Binds `path` for the owner only, replacing a stale socket file.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| path.display().to_string())?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Accepts connections on `l` until `stop`, handing each to `handle` (one at a time: requests
/// are small and rare).
fn accept_loop(l: &UnixListener, stop: &AtomicBool, mut handle: impl FnMut(UnixStream)) {
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, TICK.as_millis() as i32) };
        if n <= 0 {
            continue;
        }
        match l.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                let _ = s.set_write_timeout(Some(IO_TIMEOUT));
                handle(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                std::thread::sleep(TICK);
            }
        }
    }
}

/// The marker `ls` and `exec` look for: the sandbox in `dir` is paused.
pub fn paused_marker(dir: &Path) -> std::path::PathBuf {
    dir.join("paused")
}

/// Serves the control socket of the sandbox in `dir` until `stop`.
pub fn serve(l: &UnixListener, sb: &Sandbox, dir: &Path, stop: &AtomicBool) {
    accept_loop(l, stop, |s| {
        let mut line = String::new();
        let read = BufReader::new((&s).take(MAX_REQUEST)).read_line(&mut line);
        let reply = match read {
            Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
                Ok(req) => answer(sb, dir, req),
                Err(e) => Err(anyhow!("bad request: {e}")),
            },
            Err(e) => Err(anyhow!("reading the request: {e}")),
        };
        let reply =
            reply.unwrap_or_else(|e| serde_json::json!({"ok": false, "error": format!("{e:#}")}));
        let _ = (&s).write_all(format!("{reply}\n").as_bytes());
    });
}

fn answer(sb: &Sandbox, dir: &Path, req: Request) -> anyhow::Result<serde_json::Value> {
    Ok(match req {
        Request::Pause => {
            sb.pause()?;
            super::daemon::private_file(&paused_marker(dir)).context("recording the pause")?;
            tracing::info!("paused");
            serde_json::json!({"ok": true})
        }
        Request::Resume => {
            // The marker goes first: an exec that sees no marker finds a running guest.
            let _ = std::fs::remove_file(paused_marker(dir));
            sb.resume();
            tracing::info!("resumed");
            serde_json::json!({"ok": true})
        }
        Request::Snapshot { dir } => {
            sb.snapshot(&dir)
                .with_context(|| format!("saving into {}", dir.display()))?;
            tracing::info!("saved into {}", dir.display());
            serde_json::json!({"ok": true})
        }
        Request::Stats => serde_json::json!({"ok": true, "stats": sb.stats()}),
        Request::Policy => {
            let text = sb.policy().map(|p| p.to_toml()).unwrap_or_else(|| {
                "# no network: started with --net none and nothing allowed or published\n".into()
            });
            serde_json::json!({"ok": true, "policy": text})
        }
        Request::Suggest => match sb.suggested_policy() {
            Some(text) => serde_json::json!({"ok": true, "policy": text}),
            None => bail!("the sandbox is not in learn mode (start it with --net learn)"),
        },
        Request::SetPolicy { flags } => {
            let policy = super::policy_from(&flags)?;
            let changed = sb.set_policy(policy)?;
            tracing::warn!(
                "policy replaced: {} open flows cut, {} kept",
                changed.flows_cut,
                changed.flows_kept
            );
            serde_json::json!({
                "ok": true,
                "flows_cut": changed.flows_cut,
                "flows_kept": changed.flows_kept,
            })
        }
    })
}

/// Serves Prometheus text over HTTP/1.x until `stop`: `GET` any path gets the metrics.
pub fn serve_metrics(l: &UnixListener, sb: &Sandbox, name: &str, stop: &AtomicBool) {
    accept_loop(l, stop, |s| {
        let mut head = Vec::new();
        let mut r = BufReader::new((&s).take(8192));
        loop {
            let mut line = Vec::new();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let end = line == b"\r\n" || line == b"\n";
                    head.extend_from_slice(&line);
                    if end {
                        break;
                    }
                }
            }
        }
        let get = head.starts_with(b"GET ") || head.starts_with(b"HEAD ");
        let (status, body) = if get {
            ("200 OK", sb.stats().prometheus(name))
        } else {
            ("405 Method Not Allowed", "use GET\n".to_string())
        };
        let body = if head.starts_with(b"HEAD ") {
            String::new()
        } else {
            body
        };
        let _ = (&s).write_all(
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    });
}

/// Sends `req` to the sandbox whose directory is `dir`; its answer (`ok` checked).
pub fn request(dir: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    let path = dir.join("control.sock");
    let s = UnixStream::connect(&path).map_err(|e| {
        anyhow!(
            "cannot reach the sandbox's control socket {} ({e}); a sandbox started by an older msb-vmm has none: restart it",
            path.display()
        )
    })?;
    // Stats wait up to 2 s for the agent; a policy change for the netstack; a snapshot
    // writes the guest's memory.
    let timeout = match req {
        Request::Snapshot { .. } => Duration::from_secs(600),
        _ => Duration::from_secs(15),
    };
    s.set_read_timeout(Some(timeout))?;
    (&s).write_all(format!("{}\n", serde_json::to_string(req)?).as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .context("reading the sandbox's answer")?;
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).context("the sandbox's answer is not JSON")?;
    if v["ok"] != serde_json::Value::Bool(true) {
        bail!(
            "{}",
            v["error"]
                .as_str()
                .unwrap_or("the sandbox refused the request")
        );
    }
    Ok(v)
}
