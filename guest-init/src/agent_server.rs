//! The agent: serves the protocol of `msb_init::agent` on every accepted connection. In a guest
//! it listens on vsock port [`AGENT_PORT`]; `msb-init agent --listen PATH` runs the very same
//! code as a host process on a Unix socket, for tests and benchmarks.
//!
//! Threads: one per connection reading host messages, one per request doing the work (an exec
//! forwards its output, a file write consumes its data), one for an exec's stdin, and one
//! reaper for all children (as PID 1 it also reaps orphans). Output is read from a process only
//! while the host has granted credit, so a slow host reader throttles the process.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use msb_init::agent::{
    payload_header, AgentError, AgentMessage, Configure, DirEntry, ErrorKind, ExecRequest,
    ExitStatus, FileKind, FileStat, GuestStats, HostMessage, Payload, Request, Response,
    RlimitResource, DEFAULT_NOFILE, DIR_ENTRIES_PER_MESSAGE, MAX_CHUNK, WINDOW,
};
use msb_init::frame::{read_frame, FrameWriter, ReadError};
use msb_init::PROTOCOL_VERSION;

use crate::sys;

/// After the main process exited, output is still forwarded this long for descendants that
/// keep its pipes open (a backgrounded writer must not keep the exec alive).
const DRAIN_GRACE: Duration = Duration::from_millis(100);

/// Default search path for executed programs.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the agent does on a Shutdown request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnShutdown {
    /// PID 1 in a guest: sync and power off.
    PowerOff,
    /// A host process: exit.
    Exit,
}

/// Agent-wide state.
pub struct Agent {
    reaper: Arc<Reaper>,
    on_shutdown: OnShutdown,
    /// Environment every exec starts from (set by `Configure`).
    defaults: Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Where `Configure` writes certificates: `/` in a guest; for a host-process agent,
    /// `$MSB_AGENT_ROOT` (never the host's own /etc), none without it.
    root: Option<std::path::PathBuf>,
    /// The cgroup every exec joins (`Configure::limits`).
    cgroup: Mutex<Option<std::path::PathBuf>>,
    /// Execs started since boot, and those still running (for `Stats`).
    execs_started: AtomicU64,
    execs_running: Arc<AtomicU64>,
    /// The kernel log, read to tell an OOM kill from another SIGKILL.
    oom: crate::oom::OomWatch,
}

/// Counts a running exec until dropped (whichever way the request ends).
struct Running(Arc<AtomicU64>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Agent {
    /// An agent; starts the reaper thread.
    pub fn new(on_shutdown: OnShutdown) -> Arc<Agent> {
        // Processes inherit the agent's limit, so the common exec sets nothing in the child
        // and can be spawned without a fork (see `spawn`).
        sys::raise_nofile(DEFAULT_NOFILE);
        let reaper = Reaper::start();
        let root = match on_shutdown {
            OnShutdown::PowerOff => Some("/".into()),
            OnShutdown::Exit => std::env::var_os("MSB_AGENT_ROOT").map(Into::into),
        };
        Arc::new(Agent {
            reaper,
            on_shutdown,
            defaults: Mutex::new(Vec::new()),
            root,
            execs_started: AtomicU64::new(0),
            execs_running: Arc::new(AtomicU64::new(0)),
            cgroup: Mutex::new(None),
            oom: match on_shutdown {
                OnShutdown::PowerOff => crate::oom::OomWatch::open("/dev/kmsg".as_ref()),
                // A host-process agent reads no host's log; tests give it one of their own.
                OnShutdown::Exit => match std::env::var_os("MSB_AGENT_KMSG") {
                    Some(p) => crate::oom::OomWatch::open(p.as_ref()),
                    None => crate::oom::OomWatch::disabled(),
                },
            },
        })
    }

    /// Serves one connection until it closes; kills the process groups it started.
    pub fn serve(self: &Arc<Self>, stream: UnixStream) {
        let writer = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => return eprintln!("msb-init: agent connection: {e}"),
        };
        let conn = Arc::new(Conn {
            writer: Mutex::new(FrameWriter::new(writer)),
            requests: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
        });
        if conn
            .send(&AgentMessage::Hello {
                version: PROTOCOL_VERSION,
            })
            .is_err()
        {
            return;
        }
        let mut reader = stream;
        let mut buf = Vec::new();
        loop {
            let msg = match read_frame::<HostMessage, _>(&mut reader, &mut buf) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(ReadError::Io(e)) => {
                    eprintln!("msb-init: agent connection: {e}");
                    break;
                }
                Err(ReadError::Frame(e)) => {
                    eprintln!("msb-init: agent connection: bad frame from host: {e}");
                    break;
                }
            };
            if let Err(e) = self.handle(&conn, msg) {
                eprintln!("msb-init: agent connection: protocol error: {e}");
                break;
            }
        }
        conn.close();
        let _ = reader.shutdown(std::net::Shutdown::Both);
    }

    fn handle(self: &Arc<Self>, conn: &Arc<Conn>, msg: HostMessage) -> Result<(), String> {
        match msg {
            HostMessage::Request { id, request } => {
                if lock(&conn.requests).contains_key(&id) {
                    return Err(format!("request id {id} reused while in flight"));
                }
                let ctl = match ReqCtl::new() {
                    Ok(c) => Arc::new(c),
                    Err(e) => {
                        let _ = conn.respond(id, Response::Error(io_error(e)));
                        return Ok(());
                    }
                };
                lock(&conn.requests).insert(id, ctl.clone());
                let (agent, conn) = (self.clone(), conn.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name(format!("req-{id}"))
                        .spawn(move || {
                            let response = agent.run_request(&conn, id, &ctl, request);
                            lock(&conn.requests).remove(&id);
                            let _ = conn.respond(id, response);
                            if ctl.shutdown_after.load(Ordering::SeqCst) {
                                agent.shut_down();
                            }
                        });
                if let Err(e) = spawned {
                    return Err(format!("cannot start a thread: {e}"));
                }
            }
            HostMessage::Ack { id, bytes } => {
                if let Some(ctl) = conn.get(id) {
                    ctl.add_credit(u64::from(bytes))?;
                }
            }
            HostMessage::Stdin { id, data }
            | HostMessage::FileData {
                id,
                data,
                last: false,
            } => {
                if let Some(ctl) = conn.get(id) {
                    ctl.input(Input::Data(data))?;
                }
            }
            HostMessage::FileData {
                id,
                data,
                last: true,
            } => {
                if let Some(ctl) = conn.get(id) {
                    if !data.is_empty() {
                        ctl.input(Input::Data(data))?;
                    }
                    ctl.input(Input::Close)?;
                }
            }
            HostMessage::Abort { id } => {
                if let Some(ctl) = conn.get(id) {
                    ctl.close_input();
                }
            }
            HostMessage::CloseStdin { id } => {
                if let Some(ctl) = conn.get(id) {
                    ctl.input(Input::Close)?;
                }
            }
            HostMessage::Signal { id, signal } => {
                if let Some(ctl) = conn.get(id) {
                    ctl.signal(signal);
                }
            }
            HostMessage::Resize { id, size } => {
                if let Some(ctl) = conn.get(id) {
                    if let Some(fd) = *lock(&ctl.pty) {
                        sys::set_winsize(fd, size);
                    }
                }
            }
        }
        Ok(())
    }

    /// Does the work of one request; returns its final response.
    fn run_request(
        &self,
        conn: &Arc<Conn>,
        id: u64,
        ctl: &Arc<ReqCtl>,
        request: Request,
    ) -> Response {
        let result = match request {
            Request::Ping => Ok(Response::Pong),
            Request::Exec(e) => self.exec(conn, id, ctl, e),
            Request::WriteFile {
                path,
                mode,
                create_parents,
            } => write_file(conn, id, ctl, &path, mode, create_parents),
            Request::ReadFile { path } => read_file(conn, id, ctl, &path),
            Request::Stat { path } => stat(&path).map(Response::Stat),
            Request::ListDir { path } => list_dir(conn, id, &path),
            Request::Remove { path, recursive } => remove(&path, recursive),
            Request::Shutdown => {
                sys::sync();
                ctl.shutdown_after.store(true, Ordering::SeqCst);
                Ok(Response::Done)
            }
            Request::Configure(c) => self.configure(c),
            Request::Stats => Ok(Response::Stats(self.stats())),
            Request::Restored { unix_nanos, seed } => self.restored(unix_nanos, &seed),
        };
        result.unwrap_or_else(Response::Error)
    }

    fn shut_down(&self) {
        match self.on_shutdown {
            OnShutdown::PowerOff => crate::pid1::power_off(),
            OnShutdown::Exit => std::process::exit(0),
        }
    }

    /// Memory from `/proc/meminfo`, processes from `/proc`, execs from our counters. A field
    /// the kernel does not show is 0.
    fn stats(&self) -> GuestStats {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| -> u64 {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        let processes = std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                    })
                    .count() as u64
            })
            .unwrap_or(0);
        GuestStats {
            mem_total_kib: field("MemTotal"),
            mem_available_kib: field("MemAvailable"),
            execs_started: self.execs_started.load(Ordering::Relaxed),
            execs_running: self.execs_running.load(Ordering::Relaxed),
            processes,
        }
    }

    /// Sandbox-wide settings: default environment and a CA to trust.
    fn restored(&self, unix_nanos: u64, seed: &[u8]) -> Result<Response, AgentError> {
        if self.on_shutdown == OnShutdown::Exit {
            // A host-process agent never sets its host's clock or feeds its host's pool.
            return Err(invalid("a restore is answered only in a guest"));
        }
        if seed.len() > msb_init::agent::MAX_SEED {
            return Err(invalid(format!("a seed of {} bytes", seed.len())));
        }
        crate::sys::reseed_kernel_rng(seed).map_err(io_error)?;
        let ts = libc::timespec {
            tv_sec: (unix_nanos / 1_000_000_000) as _,
            tv_nsec: (unix_nanos % 1_000_000_000) as _,
        };
        // SAFETY: `ts` is a valid timespec for the duration of the call.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
            return Err(io_error(io::Error::last_os_error()));
        }
        Ok(Response::Done)
    }

    fn configure(&self, c: Configure) -> Result<Response, AgentError> {
        let mut env = c.env;
        check_env(&env)?;
        if c.limits.is_set() {
            let root = match self.on_shutdown {
                OnShutdown::PowerOff => Some(std::path::PathBuf::from("/sys/fs/cgroup")),
                // A host-process agent never touches its host's cgroups unless told where.
                OnShutdown::Exit => std::env::var_os("MSB_AGENT_CGROUP").map(Into::into),
            }
            .ok_or_else(|| invalid("no cgroup to hold limits in (MSB_AGENT_CGROUP)"))?;
            *lock(&self.cgroup) = Some(limit_group(&root, &c.limits)?);
        }
        if let Some(pem) = &c.ca_pem {
            let root = self
                .root
                .as_ref()
                .ok_or_else(|| invalid("no root to write certificates under (MSB_AGENT_ROOT)"))?;
            let (file, bundle) = install_ca(root, pem, c.append_to_bundle)?;
            for (k, v) in [
                ("SSL_CERT_FILE", &bundle),
                ("REQUESTS_CA_BUNDLE", &bundle),
                ("CURL_CA_BUNDLE", &bundle),
                ("NODE_EXTRA_CA_CERTS", &file),
            ] {
                env.retain(|(key, _)| key != k.as_bytes());
                env.push((k.as_bytes().to_vec(), v.as_bytes().to_vec()));
            }
        }
        *lock(&self.defaults) = env;
        Ok(Response::Done)
    }

    fn exec(
        &self,
        conn: &Arc<Conn>,
        id: u64,
        ctl: &Arc<ReqCtl>,
        mut req: ExecRequest,
    ) -> Result<Response, AgentError> {
        for (k, v) in lock(&self.defaults).iter() {
            if !req.env.iter().any(|(key, _)| key == k) {
                req.env.push((k.clone(), v.clone()));
            }
        }
        let slot = ExitSlot::new().map_err(io_error)?;
        let oom_kills = self.oom.kills();
        let cgroup = lock(&self.cgroup).clone();
        let spawned = spawn(&req, cgroup.as_deref(), &self.reaper.spawning)?;
        self.execs_started.fetch_add(1, Ordering::Relaxed);
        self.execs_running.fetch_add(1, Ordering::Relaxed);
        let _running = Running(self.execs_running.clone());
        let pid = spawned.pid;
        let exit = self.reaper.watch(pid, slot);
        ctl.pgid.store(pid, Ordering::SeqCst);
        *lock(&ctl.pty) = spawned.pty.as_ref().map(|f| f.as_raw_fd());
        conn.respond(id, Response::Started { pid: pid as u32 })
            .map_err(io_error)?;
        // Stdin: pipe, or the terminal itself.
        let stdin_thread = match (spawned.stdin, &spawned.pty) {
            (Some(pipe), _) => Some(start_stdin(conn, id, ctl, File::from(pipe), false)),
            (None, Some(master)) if req.stdin => match master.try_clone() {
                Ok(m) => Some(start_stdin(conn, id, ctl, File::from(m), true)),
                Err(_) => None,
            },
            _ => None,
        };
        let deadline = req
            .timeout_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let outputs: Vec<(OwnedFd, bool)> = match spawned.pty {
            Some(master) => vec![(master, true)],
            None => spawned
                .outputs
                .into_iter()
                .enumerate()
                .map(|(i, fd)| (fd, i == 0))
                .collect(),
        };
        let (status, timed_out) = forward(conn, id, ctl, outputs, &exit, pid, deadline);
        *lock(&ctl.pty) = None;
        ctl.close_input();
        if let Some(t) = stdin_thread {
            let _ = t.join();
        }
        let oom_killed =
            crate::oom::killed_as_victim(status, timed_out) && self.oom.kills() > oom_kills;
        Ok(Response::Exited {
            status,
            timed_out,
            oom_killed,
        })
    }
}

/// One connection's shared state.
struct Conn {
    writer: Mutex<FrameWriter<UnixStream>>,
    requests: Mutex<HashMap<u64, Arc<ReqCtl>>>,
    closed: AtomicBool,
}

impl Conn {
    fn send(&self, msg: &AgentMessage) -> io::Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        lock(&self.writer).send(msg)
    }

    /// Sends a payload response straight from `data`.
    fn respond_payload(&self, id: u64, kind: Payload, data: &[u8]) -> io::Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        let (head, n) = payload_header(id, kind, data.len()).map_err(io::Error::other)?;
        lock(&self.writer).send_parts(&head[..n], data)
    }

    /// Sends the `len` bytes waiting in pipe `pipe` as one payload message: the header is
    /// written, then the data spliced from the pipe into the stream, never copied through the
    /// agent (where the stream's kernel supports it: Unix sockets do since Linux 6.5).
    fn respond_spliced(&self, id: u64, kind: Payload, pipe: RawFd, len: usize) -> io::Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        let (head, n) = payload_header(id, kind, len).map_err(io::Error::other)?;
        let writer = lock(&self.writer);
        let mut stream = writer.get_ref();
        stream.write_all(&head[..n])?;
        sys::splice_exact(pipe, stream.as_raw_fd(), len)
    }

    fn respond(&self, id: u64, response: Response) -> io::Result<()> {
        self.send(&AgentMessage::Response { id, response })
    }

    fn get(&self, id: u64) -> Option<Arc<ReqCtl>> {
        lock(&self.requests).get(&id).cloned()
    }

    /// The host went away: its processes get SIGKILL, waiting threads wake up.
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = lock(&self.writer)
            .get_ref()
            .shutdown(std::net::Shutdown::Both);
        for ctl in lock(&self.requests).values() {
            ctl.signal(libc::SIGKILL);
            ctl.close_input();
            ctl.wake();
        }
    }
}

enum Input {
    Data(Vec<u8>),
    Close,
}

/// Per-request control: output credit, input channel, process group.
struct ReqCtl {
    credit: Mutex<u64>,
    credit_cond: Condvar,
    /// Woken on credit and on connection close, for threads blocked in poll.
    wake_fd: OwnedFd,
    input_tx: Mutex<Option<Sender<Input>>>,
    input_rx: Mutex<Option<Receiver<Input>>>,
    /// Payload the host sent and we have not acknowledged yet.
    input_in_flight: AtomicU64,
    pgid: AtomicI32,
    pty: Mutex<Option<RawFd>>,
    shutdown_after: AtomicBool,
}

impl ReqCtl {
    fn new() -> io::Result<ReqCtl> {
        let (tx, rx) = mpsc::channel();
        Ok(ReqCtl {
            credit: Mutex::new(u64::from(WINDOW)),
            credit_cond: Condvar::new(),
            wake_fd: sys::eventfd()?,
            input_tx: Mutex::new(Some(tx)),
            input_rx: Mutex::new(Some(rx)),
            input_in_flight: AtomicU64::new(0),
            pgid: AtomicI32::new(0),
            pty: Mutex::new(None),
            shutdown_after: AtomicBool::new(false),
        })
    }

    fn add_credit(&self, n: u64) -> Result<(), String> {
        let mut c = lock(&self.credit);
        *c += n;
        if *c > u64::from(WINDOW) {
            return Err("host acknowledged more output than it was sent".into());
        }
        drop(c);
        self.wake();
        Ok(())
    }

    fn wake(&self) {
        self.credit_cond.notify_all();
        sys::eventfd_signal(self.wake_fd.as_raw_fd());
    }

    fn input(&self, i: Input) -> Result<(), String> {
        if let Input::Data(d) = &i {
            let now = self
                .input_in_flight
                .fetch_add(d.len() as u64, Ordering::SeqCst)
                + d.len() as u64;
            if now > u64::from(WINDOW) {
                return Err("host sent past the flow-control window".into());
            }
        }
        if let Some(tx) = lock(&self.input_tx).as_ref() {
            let _ = tx.send(i);
        }
        Ok(())
    }

    fn close_input(&self) {
        lock(&self.input_tx).take();
    }

    fn signal(&self, signal: i32) {
        let pgid = self.pgid.load(Ordering::SeqCst);
        if pgid > 0 {
            sys::kill(-pgid, signal);
        }
    }

    /// Takes up to `want` bytes of output credit, waiting until some is available or the
    /// connection closes (`None`).
    fn take_credit(&self, conn: &Conn, want: usize) -> Option<usize> {
        let mut c = lock(&self.credit);
        while *c == 0 {
            if conn.closed.load(Ordering::SeqCst) {
                return None;
            }
            c = self.credit_cond.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        let n = (*c as usize).min(want);
        *c -= n as u64;
        Some(n)
    }

    fn has_credit(&self) -> bool {
        *lock(&self.credit) > 0
    }
}

fn io_error(e: io::Error) -> AgentError {
    let kind = match e.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
        io::ErrorKind::InvalidInput => ErrorKind::InvalidRequest,
        _ => ErrorKind::Io,
    };
    AgentError {
        kind,
        message: e.to_string(),
    }
}

fn path_error(path: &[u8], e: io::Error) -> AgentError {
    let mut err = io_error(e);
    err.message = format!("{}: {}", String::from_utf8_lossy(path), err.message);
    err
}

fn invalid(message: impl Into<String>) -> AgentError {
    AgentError {
        kind: ErrorKind::InvalidRequest,
        message: message.into(),
    }
}

fn check_path(path: &[u8]) -> Result<&OsStr, AgentError> {
    if path.is_empty() || path.contains(&0) {
        return Err(invalid("path is empty or contains a NUL byte"));
    }
    Ok(OsStr::from_bytes(path))
}

/// Feeds a request's input channel into `out` (a stdin pipe or a terminal), acknowledging
/// what was written.
fn start_stdin(
    conn: &Arc<Conn>,
    id: u64,
    ctl: &Arc<ReqCtl>,
    mut out: File,
    pty: bool,
) -> std::thread::JoinHandle<()> {
    let rx = lock(&ctl.input_rx).take();
    let (ctl, conn) = (ctl.clone(), conn.clone());
    std::thread::spawn(move || {
        let Some(rx) = rx else { return };
        let mut broken = false;
        for i in rx {
            match i {
                Input::Data(d) => {
                    // After the process closed its stdin, input is dropped; credit still goes
                    // back so the host never blocks on it.
                    if !broken && out.write_all(&d).is_err() {
                        broken = true;
                    }
                    ctl.input_in_flight
                        .fetch_sub(d.len() as u64, Ordering::SeqCst);
                    let _ = conn.respond(id, Response::Ack(d.len() as u32));
                }
                Input::Close => {
                    if pty {
                        // End of input on a terminal is ^D at the start of a line.
                        let _ = out.write_all(&[4]);
                    }
                    break;
                }
            }
        }
    })
}

/// A started process.
struct Spawned {
    pid: i32,
    stdin: Option<OwnedFd>,
    /// stdout and stderr pipes (without a PTY).
    outputs: Vec<OwnedFd>,
    /// The terminal's master side (with a PTY).
    pty: Option<OwnedFd>,
}

fn check_env(env: &[(Vec<u8>, Vec<u8>)]) -> Result<(), AgentError> {
    for (k, v) in env {
        if k.is_empty() || k.contains(&b'=') || k.contains(&0) || v.contains(&0) {
            return Err(invalid("invalid environment variable name or value"));
        }
    }
    Ok(())
}

/// Writes the sandbox CA under `root` and makes a bundle holding it: the root's own bundle
/// with it appended (once), or a combined copy under /run. Returns the guest paths of the CA
/// file and the bundle.
fn install_ca(
    root: &std::path::Path,
    pem: &[u8],
    append: bool,
) -> Result<(String, String), AgentError> {
    use msb_init::agent::{CA_BUNDLE, CA_FILE, RUN_CA_BUNDLE, RUN_CA_FILE};
    let text = std::str::from_utf8(pem).map_err(|_| invalid("the CA is not PEM text"))?;
    if pem.len() > 64 << 10 || !text.trim_start().starts_with("-----BEGIN CERTIFICATE-----") {
        return Err(invalid("the CA is not a PEM certificate"));
    }
    let at = |p: &str| root.join(p.trim_start_matches('/'));
    let write = |p: &str, data: &[u8]| -> Result<(), AgentError> {
        let path = at(p);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_error)?;
        }
        std::fs::write(&path, data).map_err(io_error)
    };
    let mut pem = pem.to_vec();
    if !pem.ends_with(b"\n") {
        pem.push(b'\n');
    }
    let existing = std::fs::read(at(CA_BUNDLE)).unwrap_or_default();
    let mut combined = existing.clone();
    if !combined.is_empty() && !combined.ends_with(b"\n") {
        combined.push(b'\n');
    }
    let present = existing.windows(pem.len()).any(|w| w == pem.as_slice());
    if !present {
        combined.extend_from_slice(&pem);
    }
    if append {
        write(CA_FILE, &pem)?;
        if !present {
            write(CA_BUNDLE, &combined)?;
        }
        Ok((CA_FILE.into(), CA_BUNDLE.into()))
    } else {
        write(RUN_CA_FILE, &pem)?;
        write(RUN_CA_BUNDLE, &combined)?;
        Ok((RUN_CA_FILE.into(), RUN_CA_BUNDLE.into()))
    }
}

/// Makes (or updates) the group `sandbox` under the cgroup v2 root `root` with `limits`;
/// its path. The agent itself stays outside it, so it keeps answering when the group is
/// at its limits.
fn limit_group(
    root: &std::path::Path,
    limits: &msb_init::agent::GuestLimits,
) -> Result<std::path::PathBuf, AgentError> {
    let fail = |what: &str, e: io::Error| AgentError {
        kind: ErrorKind::Io,
        message: format!("setting up the limits' cgroup ({what}): {e}"),
    };
    let mut controllers = Vec::new();
    if limits.pids_max.is_some() {
        controllers.push("+pids");
    }
    if limits.memory_max.is_some() {
        controllers.push("+memory");
    }
    std::fs::write(root.join("cgroup.subtree_control"), controllers.join(" "))
        .map_err(|e| fail("enabling controllers", e))?;
    let group = root.join("sandbox");
    match std::fs::create_dir(&group) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(fail("mkdir", e)),
        _ => {}
    }
    if let Some(n) = limits.pids_max {
        std::fs::write(group.join("pids.max"), n.to_string()).map_err(|e| fail("pids.max", e))?;
    }
    if let Some(b) = limits.memory_max {
        std::fs::write(group.join("memory.max"), b.to_string())
            .map_err(|e| fail("memory.max", e))?;
        // No swap to escape to (absent without CONFIG_SWAP: nothing to set then).
        let _ = std::fs::write(group.join("memory.swap.max"), "0");
    }
    Ok(group)
}

/// A container root for an exec: an existing absolute directory. As PID 1, the agent mounts
/// the guest's `/proc` (a new instance), `/dev` and `/sys` (bind mounts) into it the first
/// time, where it has those directories.
fn container_root(r: &[u8]) -> Result<std::path::PathBuf, AgentError> {
    if r.contains(&0) || !r.starts_with(b"/") {
        return Err(invalid("the root must be an absolute path"));
    }
    let root = std::path::PathBuf::from(OsStr::from_bytes(r));
    if !root.is_dir() {
        return Err(AgentError {
            kind: ErrorKind::NotFound,
            message: format!("root {}: no such directory", root.display()),
        });
    }
    // As PID 1 only: a host process running the agent (its tests) must not mount anything.
    if std::process::id() == 1 {
        use libc::{MS_BIND, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_REC};
        // (directory, a name that exists once it is mounted, source, type, flags)
        let mounts = [
            (
                "proc",
                "self",
                "proc",
                "proc",
                MS_NOSUID | MS_NODEV | MS_NOEXEC,
            ),
            ("dev", "null", "/dev", "", MS_BIND | MS_REC),
            ("sys", "kernel", "/sys", "", MS_BIND | MS_REC),
        ];
        for (dir, probe, src, fstype, flags) in mounts {
            let target = root.join(dir);
            if !target.is_dir() || target.join(probe).exists() {
                continue;
            }
            let Some(t) = target.to_str() else { continue };
            if let Err(e) = crate::pid1::mount(src, t, fstype, flags, "") {
                eprintln!("msb-init: {e}");
            }
        }
    }
    Ok(root)
}

fn spawn(
    req: &ExecRequest,
    cgroup: Option<&std::path::Path>,
    spawning: &Mutex<()>,
) -> Result<Spawned, AgentError> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(invalid("no command given"));
    }
    if req.argv.iter().any(|a| a.contains(&0)) {
        return Err(invalid("an argument contains a NUL byte"));
    }
    check_env(&req.env)?;
    let root = match &req.root {
        None => None,
        Some(r) => Some(container_root(r)?),
    };
    let user = match &req.user {
        None => None,
        Some(u) => Some(
            sys::resolve_user_at(root.as_deref().unwrap_or(std::path::Path::new("/")), u).map_err(
                |m| AgentError {
                    kind: ErrorKind::NotFound,
                    message: m,
                },
            )?,
        ),
    };
    let has = |k: &[u8]| req.env.iter().any(|(key, _)| key == k);
    // The common exec (no root, user, terminal, rlimits or cgroup) needs nothing done in the
    // child before exec, and then the standard library spawns it with posix_spawn: a
    // vfork-like clone that does not copy the agent's address space, where a fork costs a
    // page-table copy and a copy-on-write fault per touched page. It takes that path only
    // for a program named by path when the environment sets PATH, so the program is looked
    // up here the way execvp would.
    let simple = root.is_none()
        && user.is_none()
        && req.pty.is_none()
        && req.rlimits.is_empty()
        && cgroup.is_none();
    let program = if simple {
        // The last PATH wins, as it does in the child's environment below.
        let path = req
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == b"PATH")
            .map(|(_, v)| v.as_slice())
            .unwrap_or(DEFAULT_PATH.as_bytes());
        find_program(&req.argv[0], path)
    } else {
        None
    };
    let mut cmd = match &program {
        Some(p) => {
            let mut c = Command::new(p);
            c.arg0(OsStr::from_bytes(&req.argv[0]));
            c
        }
        None => Command::new(OsStr::from_bytes(&req.argv[0])),
    };
    cmd.args(req.argv[1..].iter().map(|a| OsStr::from_bytes(a)));
    cmd.env_clear();
    if !has(b"PATH") {
        cmd.env("PATH", DEFAULT_PATH);
    }
    let home = user
        .as_ref()
        .map(|u| u.home.clone())
        .unwrap_or_else(|| b"/root".to_vec());
    if !has(b"HOME") {
        cmd.env("HOME", OsStr::from_bytes(&home));
    }
    if req.pty.is_some() && !has(b"TERM") {
        cmd.env("TERM", "xterm-256color");
    }
    for (k, v) in &req.env {
        cmd.env(OsStr::from_bytes(k), OsStr::from_bytes(v));
    }
    let workdir = match &req.workdir {
        Some(w) => w.clone(),
        None if std::path::Path::new(OsStr::from_bytes(&home)).is_dir() => home.clone(),
        None => b"/".to_vec(),
    };
    if workdir.contains(&0) {
        return Err(invalid("working directory contains a NUL byte"));
    }
    let inside = match &root {
        Some(r) => r.join(OsStr::from_bytes(
            workdir.strip_prefix(b"/").unwrap_or(&workdir),
        )),
        None => std::path::PathBuf::from(OsStr::from_bytes(&workdir)),
    };
    if !workdir.starts_with(b"/") && root.is_some() {
        return Err(invalid(
            "the working directory must be absolute with a root",
        ));
    }
    if !inside.is_dir() {
        return Err(AgentError {
            kind: ErrorKind::NotFound,
            message: format!(
                "working directory {}: no such directory",
                String::from_utf8_lossy(&workdir)
            ),
        });
    }
    // With a root, the child changes directory after its chroot (in `pre_exec`).
    let chroot = match &root {
        Some(r) => Some((
            std::ffi::CString::new(r.as_os_str().as_bytes()).map_err(|_| invalid("root"))?,
            std::ffi::CString::new(workdir.clone()).map_err(|_| invalid("workdir"))?,
        )),
        None => {
            cmd.current_dir(OsStr::from_bytes(&workdir));
            None
        }
    };

    let mut limits: Vec<(sys::Resource, u64, u64)> = Vec::new();
    let default_nofile = !req
        .rlimits
        .iter()
        .any(|l| l.resource == RlimitResource::Nofile);
    for l in &req.rlimits {
        let r = match l.resource {
            RlimitResource::Nofile => libc::RLIMIT_NOFILE,
            RlimitResource::Nproc => libc::RLIMIT_NPROC,
            RlimitResource::As => libc::RLIMIT_AS,
            RlimitResource::Core => libc::RLIMIT_CORE,
            RlimitResource::Cpu => libc::RLIMIT_CPU,
            RlimitResource::Fsize => libc::RLIMIT_FSIZE,
            RlimitResource::Stack => libc::RLIMIT_STACK,
            RlimitResource::Memlock => libc::RLIMIT_MEMLOCK,
        };
        if l.soft > l.hard {
            return Err(invalid("an rlimit's soft value exceeds its hard value"));
        }
        limits.retain(|(res, _, _)| *res != r);
        limits.push((r, l.soft, l.hard));
    }

    let mut pty_master = None;
    let mut stdin_pipe = None;
    let mut outputs = Vec::new();
    match req.pty {
        Some(size) => {
            let (master, slave) = sys::openpty(size).map_err(io_error)?;
            let dup = |f: &OwnedFd| f.try_clone().map(Stdio::from).map_err(io_error);
            cmd.stdin(dup(&slave)?)
                .stdout(dup(&slave)?)
                .stderr(Stdio::from(slave));
            pty_master = Some(master);
        }
        None => {
            cmd.stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            });
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
    }
    let pty = req.pty.is_some();
    let ids = user.as_ref().map(|u| (u.uid, u.gid, u.groups.clone()));
    // Opened here: the child only writes to it between fork and exec.
    let procs = match cgroup {
        Some(g) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(g.join("cgroup.procs"))
                .map_err(io_error)?,
        ),
        None => None,
    };
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    if program.is_some() {
        // Inherits the agent's RLIMIT_NOFILE, which `Agent::new` raised to the default.
        cmd.process_group(0);
    } else {
        // SAFETY: the closure runs in the forked child before exec and only makes async-
        // signal-safe system calls (write/setsid/ioctl/setpgid/setrlimit/setgroups/setgid/
        // setuid).
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = procs_fd {
                    sys::join_cgroup(fd)?;
                }
                if let Some((root, dir)) = &chroot {
                    sys::chroot_and_chdir(root, dir)?;
                }
                if pty {
                    sys::become_session_leader_with_tty()?;
                } else {
                    sys::setpgid_self()?;
                }
                if default_nofile {
                    sys::raise_nofile(DEFAULT_NOFILE);
                }
                for (r, soft, hard) in &limits {
                    sys::setrlimit(*r, *soft, *hard)?;
                }
                if let Some((uid, gid, groups)) = &ids {
                    sys::drop_to(*uid, *gid, groups)?;
                }
                Ok(())
            });
        }
    }
    let spawned = {
        let _spawning = lock(spawning);
        cmd.spawn()
    };
    let mut child = spawned.map_err(|e| {
        let name = String::from_utf8_lossy(&req.argv[0]).into_owned();
        match e.kind() {
            io::ErrorKind::NotFound => AgentError {
                kind: ErrorKind::NotFound,
                message: format!("{name}: command not found"),
            },
            io::ErrorKind::PermissionDenied => AgentError {
                kind: ErrorKind::PermissionDenied,
                message: format!("{name}: permission denied"),
            },
            _ => AgentError {
                kind: ErrorKind::Spawn,
                message: format!("{name}: cannot execute: {e}"),
            },
        }
    })?;
    // The command (and its copies of the terminal's slave side) is dropped with `cmd` below.
    drop(cmd);
    drop(procs);
    if let Some(s) = child.stdin.take() {
        stdin_pipe = Some(OwnedFd::from(s));
    }
    if let Some(o) = child.stdout.take() {
        outputs.push(OwnedFd::from(o));
    }
    if let Some(e) = child.stderr.take() {
        outputs.push(OwnedFd::from(e));
    }
    for fd in &outputs {
        sys::grow_pipe(fd.as_raw_fd());
    }
    Ok(Spawned {
        pid: child.id() as i32,
        stdin: stdin_pipe,
        outputs,
        pty: pty_master,
    })
}

/// `name` looked up in the colon-separated `path` as execvp does: a name with a slash is
/// itself; otherwise the first absolute directory holding an executable regular file of
/// that name. `None` when execvp would have to decide (nothing found, a relative entry): the
/// caller then leaves the lookup to the child's execvp and its error.
fn find_program(name: &[u8], path: &[u8]) -> Option<std::path::PathBuf> {
    if name.contains(&b'/') {
        return Some(std::path::PathBuf::from(OsStr::from_bytes(name)));
    }
    for dir in path.split(|&b| b == b':') {
        if !dir.starts_with(b"/") {
            return None;
        }
        let candidate = std::path::Path::new(OsStr::from_bytes(dir)).join(OsStr::from_bytes(name));
        let Ok(meta) = std::fs::metadata(&candidate) else {
            continue;
        };
        if meta.is_file() && sys::executable(&candidate) {
            return Some(candidate);
        }
    }
    None
}

/// Forwards output within the host's credit until the process exited and its output ended
/// (or went on past the drain grace period); enforces the timeout.
fn forward(
    conn: &Conn,
    id: u64,
    ctl: &ReqCtl,
    mut outputs: Vec<(OwnedFd, bool)>,
    exit: &ExitWatch,
    pid: i32,
    deadline: Option<Instant>,
) -> (ExitStatus, bool) {
    let mut status: Option<ExitStatus> = None;
    // Bytes each pipe held when the main process exited: written before the exit, so they are
    // always delivered, however slowly the host reads. Only after them does the drain grace
    // for descendants (which may hold the pipes open and keep writing) start.
    let mut owed: Vec<usize> = Vec::new();
    let mut grace_from: Option<Instant> = None;
    let mut timed_out = false;
    let mut buf = vec![0u8; MAX_CHUNK];
    // Without a terminal the outputs are the pipes `spawn` made.
    let pipes = lock(&ctl.pty).is_none();
    loop {
        if status.is_none() {
            status = exit.try_status();
            if status.is_some() {
                owed = outputs
                    .iter()
                    .map(|(fd, _)| sys::bytes_available(fd.as_raw_fd()))
                    .collect();
            }
        }
        if status.is_some() && grace_from.is_none() && owed.iter().all(|&o| o == 0) {
            grace_from = Some(Instant::now());
        }
        if status.is_some() && outputs.is_empty() {
            break;
        }
        let now = Instant::now();
        if grace_from.is_some_and(|t| now.duration_since(t) >= DRAIN_GRACE) {
            break;
        }
        if !timed_out && status.is_none() && deadline.is_some_and(|d| now >= d) {
            timed_out = true;
            sys::kill(-pid, libc::SIGKILL);
            sys::kill(pid, libc::SIGKILL);
        }
        let connected = !conn.closed.load(Ordering::SeqCst);
        let credit = ctl.has_credit() || !connected;
        let mut fds = Vec::with_capacity(4);
        if credit {
            for (fd, _) in &outputs {
                fds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        let n_out = fds.len();
        fds.push(libc::pollfd {
            fd: exit.fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        fds.push(libc::pollfd {
            fd: ctl.wake_fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        let mut timeout = -1i64;
        if let Some(t) = grace_from {
            timeout = DRAIN_GRACE
                .saturating_sub(now.duration_since(t))
                .as_millis() as i64
                + 1;
        } else if let (Some(d), false, None) = (deadline, timed_out, status) {
            timeout = d.saturating_duration_since(now).as_millis() as i64 + 1;
        }
        sys::poll(&mut fds, timeout);
        if fds[n_out + 1].revents != 0 {
            sys::eventfd_drain(ctl.wake_fd.as_raw_fd());
        }
        if fds[n_out].revents != 0 {
            exit.drain();
        }
        let mut closed = Vec::new();
        for (i, pfd) in fds[..n_out].iter().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            let want = if connected {
                ctl.take_credit(conn, MAX_CHUNK).unwrap_or(MAX_CHUNK)
            } else {
                MAX_CHUNK
            };
            let kind = if outputs[i].1 {
                Payload::Stdout
            } else {
                Payload::Stderr
            };
            // What a pipe holds goes by splice (a terminal's output cannot); an empty one is
            // read to see its end.
            let ready = if connected && pipes {
                sys::bytes_available(pfd.fd).min(want)
            } else {
                0
            };
            if ready > 0 {
                if let Some(o) = owed.get_mut(i) {
                    *o = o.saturating_sub(ready);
                }
                let _ = ctl.add_credit((want - ready) as u64);
                let _ = conn.respond_spliced(id, kind, pfd.fd, ready);
                continue;
            }
            match sys::read(pfd.fd, &mut buf[..want]) {
                Ok(0) | Err(_) => {
                    if connected {
                        let _ = ctl.add_credit(want as u64);
                    }
                    closed.push(i);
                }
                Ok(n) => {
                    if let Some(o) = owed.get_mut(i) {
                        *o = o.saturating_sub(n);
                    }
                    if connected {
                        let _ = ctl.add_credit((want - n) as u64);
                        let _ = conn.respond_payload(id, kind, &buf[..n]);
                    }
                }
            }
        }
        for i in closed.into_iter().rev() {
            outputs.remove(i);
            if i < owed.len() {
                owed.remove(i);
            }
        }
    }
    let status = match status {
        Some(s) => s,
        None => exit.wait(),
    };
    (status, timed_out)
}

fn write_file(
    conn: &Conn,
    id: u64,
    ctl: &Arc<ReqCtl>,
    path: &[u8],
    mode: u32,
    create_parents: bool,
) -> Result<Response, AgentError> {
    let p = std::path::Path::new(check_path(path)?);
    if create_parents {
        if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| path_error(path, e))?;
        }
    }
    // Written beside the target and renamed over it once complete: a failed copy (a full
    // disk, a dropped connection) leaves the target as it was and no partial file.
    let name = p
        .file_name()
        .ok_or_else(|| invalid("the path names no file"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".msb-{}-{id}", std::process::id()));
    let tmp = p.with_file_name(tmp_name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode & 0o7777)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| path_error(path, e))?;
    let result = (|| {
        // Apply the mode exactly (the umask narrowed it at creation).
        let _ = f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777));
        let rx = lock(&ctl.input_rx)
            .take()
            .ok_or_else(|| invalid("file data channel missing"))?;
        let mut failure = None;
        let mut complete = false;
        for i in rx {
            match i {
                Input::Data(d) => {
                    if failure.is_none() {
                        if let Err(e) = f.write_all(&d) {
                            failure = Some(path_error(path, e));
                        }
                    }
                    ctl.input_in_flight
                        .fetch_sub(d.len() as u64, Ordering::SeqCst);
                    let _ = conn.respond(id, Response::Ack(d.len() as u32));
                }
                Input::Close => {
                    complete = true;
                    break;
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if !complete {
            return Err(io_error(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection ended before the file did",
            )));
        }
        f.sync_all().map_err(|e| path_error(path, e))?;
        std::fs::rename(&tmp, p).map_err(|e| path_error(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| Response::Done)
}

fn read_file(conn: &Conn, id: u64, ctl: &ReqCtl, path: &[u8]) -> Result<Response, AgentError> {
    let p = check_path(path)?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| path_error(path, e))?;
    if f.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(AgentError {
            kind: ErrorKind::InvalidRequest,
            message: format!("{}: is a directory", String::from_utf8_lossy(path)),
        });
    }
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let want = ctl
            .take_credit(conn, MAX_CHUNK)
            .ok_or_else(|| io_error(io::Error::from(io::ErrorKind::BrokenPipe)))?;
        let n = loop {
            match f.read(&mut buf[..want]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => break other.map_err(|e| path_error(path, e))?,
            }
        };
        let _ = ctl.add_credit((want - n) as u64);
        if n == 0 {
            return Ok(Response::Done);
        }
        conn.respond_payload(id, Payload::FileData, &buf[..n])
            .map_err(io_error)?;
    }
}

fn file_stat(md: &std::fs::Metadata) -> FileStat {
    use std::os::unix::fs::FileTypeExt;
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else if ft.is_char_device() {
        FileKind::CharDevice
    } else if ft.is_block_device() {
        FileKind::BlockDevice
    } else if ft.is_fifo() {
        FileKind::Fifo
    } else if ft.is_socket() {
        FileKind::Socket
    } else {
        FileKind::File
    };
    FileStat {
        kind,
        mode: md.mode() & 0o7777,
        size: md.size(),
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
    }
}

fn stat(path: &[u8]) -> Result<FileStat, AgentError> {
    let md = std::fs::symlink_metadata(check_path(path)?).map_err(|e| path_error(path, e))?;
    Ok(file_stat(&md))
}

fn list_dir(conn: &Conn, id: u64, path: &[u8]) -> Result<Response, AgentError> {
    let dir = std::fs::read_dir(check_path(path)?).map_err(|e| path_error(path, e))?;
    let mut batch = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|e| path_error(path, e))?;
        let Ok(md) = entry.metadata() else { continue };
        batch.push(DirEntry {
            name: entry.file_name().as_bytes().to_vec(),
            stat: file_stat(&md),
        });
        if batch.len() == DIR_ENTRIES_PER_MESSAGE {
            conn.respond(id, Response::DirEntries(std::mem::take(&mut batch)))
                .map_err(io_error)?;
        }
    }
    if !batch.is_empty() {
        conn.respond(id, Response::DirEntries(batch))
            .map_err(io_error)?;
    }
    Ok(Response::Done)
}

fn remove(path: &[u8], recursive: bool) -> Result<Response, AgentError> {
    let p = check_path(path)?;
    let md = std::fs::symlink_metadata(p).map_err(|e| path_error(path, e))?;
    let r = if md.is_dir() {
        if recursive {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_dir(p)
        }
    } else {
        std::fs::remove_file(p)
    };
    r.map_err(|e| path_error(path, e))?;
    Ok(Response::Done)
}

/// Collects exit statuses for every child (and, as PID 1, every orphan).
pub struct Reaper {
    state: Mutex<ReaperState>,
    cond: Condvar,
    /// Held while a child is being spawned: when its `exec` fails, the standard library reaps
    /// it itself (and panics if it is already gone), so the reaper must not take it first.
    spawning: Mutex<()>,
}

#[derive(Default)]
struct ReaperState {
    watched: HashMap<i32, Arc<ExitSlot>>,
    /// Statuses of children that exited before anyone watched them.
    early: HashMap<i32, ExitStatus>,
    children: u64,
}

struct ExitSlot {
    status: Mutex<Option<ExitStatus>>,
    cond: Condvar,
    /// Signalled when the status arrives, for threads waiting in poll.
    fd: OwnedFd,
}

impl ExitSlot {
    fn new() -> io::Result<Arc<ExitSlot>> {
        Ok(Arc::new(ExitSlot {
            status: Mutex::new(None),
            cond: Condvar::new(),
            fd: sys::eventfd()?,
        }))
    }
}

/// A handle to one child's exit.
struct ExitWatch(Arc<ExitSlot>);

impl ExitWatch {
    fn fd(&self) -> RawFd {
        self.0.fd.as_raw_fd()
    }
    fn drain(&self) {
        sys::eventfd_drain(self.fd());
    }
    fn try_status(&self) -> Option<ExitStatus> {
        *lock(&self.0.status)
    }
    fn wait(&self) -> ExitStatus {
        let mut s = lock(&self.0.status);
        loop {
            if let Some(st) = *s {
                return st;
            }
            s = self.0.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Reaper {
    fn start() -> Arc<Reaper> {
        let r = Arc::new(Reaper {
            state: Mutex::new(ReaperState::default()),
            cond: Condvar::new(),
            spawning: Mutex::new(()),
        });
        let r2 = r.clone();
        let _ = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r2.run());
        r
    }

    /// Starts watching `pid` (call right after spawning it).
    fn watch(&self, pid: i32, slot: Arc<ExitSlot>) -> ExitWatch {
        let mut st = lock(&self.state);
        st.children += 1;
        if let Some(s) = st.early.remove(&pid) {
            *lock(&slot.status) = Some(s);
            sys::eventfd_signal(slot.fd.as_raw_fd());
        } else {
            st.watched.insert(pid, slot.clone());
        }
        drop(st);
        self.cond.notify_all();
        ExitWatch(slot)
    }

    fn run(&self) {
        loop {
            match sys::exited_child() {
                Some(pid) => {
                    let status = {
                        let _spawning = lock(&self.spawning);
                        match sys::reap(pid) {
                            Some(s) => s,
                            // A failed spawn reaped its own child.
                            None => continue,
                        }
                    };
                    let mut st = lock(&self.state);
                    match st.watched.remove(&pid) {
                        Some(slot) => {
                            *lock(&slot.status) = Some(status);
                            slot.cond.notify_all();
                            sys::eventfd_signal(slot.fd.as_raw_fd());
                        }
                        None => {
                            // A child not yet watched (or an orphan, as PID 1). Bounded: orphans'
                            // statuses are dropped once the table is large.
                            if st.early.len() < 4096 {
                                st.early.insert(pid, status);
                            }
                        }
                    }
                }
                None => {
                    // No children: sleep until one is started.
                    let st = lock(&self.state);
                    let seen = st.children;
                    let _unused = self
                        .cond
                        .wait_while(st, |s| s.children == seen && s.watched.is_empty())
                        .unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }
}

/// Runs the agent on a Unix socket (host-process mode for tests and benchmarks).
pub fn serve_unix(path: &std::path::Path) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    let agent = Agent::new(OnShutdown::Exit);
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let a = agent.clone();
                std::thread::spawn(move || a.serve(s));
            }
            Err(e) => eprintln!("msb-init: accept: {e}"),
        }
    }
    Ok(())
}

/// Accepts vsock connections on `listener` forever (PID 1 mode).
pub fn serve_vsock(listener: OwnedFd, agent: Arc<Agent>) -> ! {
    loop {
        match sys::accept(listener.as_raw_fd()) {
            Ok(fd) => {
                // A connected vsock socket behaves like any stream socket for read, write,
                // shutdown and timeouts, which is all UnixStream's methods do with it.
                let stream = UnixStream::from(fd);
                let a = agent.clone();
                if std::thread::Builder::new()
                    .name("agent-conn".into())
                    .spawn(move || a.serve(stream))
                    .is_err()
                {
                    eprintln!("msb-init: cannot start a connection thread");
                }
            }
            Err(e) => {
                eprintln!("msb-init: vsock accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
