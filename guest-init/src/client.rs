//! Host side of the agent protocol: [`AgentClient`] over any stream (the in-process vsock
//! stream, a hybrid-vsock Unix socket, or a Unix socket to an agent running on the host).
//!
//! One reader thread decodes every frame from the agent as hostile input: a frame it cannot
//! decode, a response to an unknown or finished request, or more payload than the flow-control
//! window allows closes the connection with an error, and every pending request fails.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::agent::{
    AgentError, AgentMessage, DirEntry, ExecRequest, ExitStatus, FileStat, HostMessage, Request,
    Response, TermSize, MAX_CHUNK, WINDOW,
};
use crate::frame::{FrameReader, FrameWriter, ReadError};
use crate::PROTOCOL_VERSION;

/// Errors talking to the agent.
#[derive(Debug, Error, Clone)]
pub enum ClientError {
    #[error("agent connection: {0}")]
    Io(String),
    #[error("agent protocol violation: {0}")]
    Protocol(String),
    #[error("agent speaks protocol version {guest}, this host {host}: rebuild msb-init (`./x setup`) or use a matching msb-vmm")]
    Version { guest: u32, host: u32 },
    #[error("{0}")]
    Agent(AgentError),
    #[error("the agent connection is closed")]
    Closed,
    #[error("timed out waiting for the agent")]
    Timeout,
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, ClientError>;

/// A byte stream to the agent that can be split into independent read and write halves.
pub trait Connection: Send + Sync + 'static {
    /// A reader for the reader thread.
    fn reader(&self) -> io::Result<Box<dyn Read + Send>>;
    /// A writer shared by requests.
    fn writer(&self) -> io::Result<Box<dyn Write + Send>>;
    /// Bounds blocking reads (used while waiting for Hello).
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Ends both directions, waking the reader thread.
    fn shutdown(&self);
}

impl Connection for UnixStream {
    fn reader(&self) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn writer(&self) -> io::Result<Box<dyn Write + Send>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn shutdown(&self) {
        let _ = UnixStream::shutdown(self, std::net::Shutdown::Both);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Consumed payload is acknowledged once this much has gathered: the agent keeps at least
/// `WINDOW - ACK_BATCH` of credit, and a stream of small chunks costs one Ack message (and
/// one wake-up of the agent) per quarter window instead of one per chunk.
const ACK_BATCH: u64 = WINDOW as u64 / 4;

/// The reader thread's buffer.
const READ_BUFFER: usize = 256 << 10;

/// State of one request, shared by its handle and the reader thread.
#[derive(Default)]
struct ReqState {
    queue: VecDeque<Response>,
    /// Payload received and not yet consumed by the handle.
    unacked_in: u64,
    /// Payload consumed and not yet acknowledged (see [`ACK_BATCH`]).
    consumed: u64,
    /// Credit to send stdin/file data.
    credit_out: u64,
    finished: bool,
    /// The handle was dropped before the final response: payload is acknowledged and
    /// discarded as it arrives, so the agent is never left waiting for credit.
    abandoned: bool,
}

#[derive(Default)]
struct Req {
    state: Mutex<ReqState>,
    cond: Condvar,
}

struct Inner {
    conn: Box<dyn Connection>,
    writer: Mutex<FrameWriter<Box<dyn Write + Send>>>,
    requests: Mutex<HashMap<u64, Arc<Req>>>,
    next_id: AtomicU64,
    /// Set once when the connection fails; every request then fails with it.
    dead: Mutex<Option<ClientError>>,
}

impl Inner {
    fn send(&self, msg: &HostMessage) -> Result<()> {
        if let Some(e) = lock(&self.dead).clone() {
            return Err(e);
        }
        lock(&self.writer)
            .send(msg)
            .map_err(|e| ClientError::Io(e.to_string()))
    }

    fn fail(&self, e: ClientError) {
        {
            let mut dead = lock(&self.dead);
            if dead.is_none() {
                *dead = Some(e);
            }
        }
        self.conn.shutdown();
        for r in lock(&self.requests).values() {
            let _g = lock(&r.state);
            r.cond.notify_all();
        }
    }

    fn dead(&self) -> Option<ClientError> {
        lock(&self.dead).clone()
    }
}

/// A connection to the agent.
pub struct AgentClient {
    inner: Arc<Inner>,
    reader: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("dead", &self.inner.dead())
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Waits up to `hello_timeout` for the agent's Hello, checks its version, and starts the
    /// reader thread.
    pub fn connect(conn: impl Connection, hello_timeout: Duration) -> Result<AgentClient> {
        let io_err = |e: io::Error| ClientError::Io(e.to_string());
        // Reads whatever the stream has into one buffer and decodes frames where they lie: a
        // stream of small frames costs a read per buffer, not two per frame.
        let mut reader = FrameReader::new(conn.reader().map_err(io_err)?, READ_BUFFER);
        let writer = conn.writer().map_err(io_err)?;
        conn.set_read_timeout(Some(hello_timeout)).map_err(io_err)?;
        match reader.read_frame::<AgentMessage>() {
            Ok(Some(AgentMessage::Hello { version })) if version == PROTOCOL_VERSION => {}
            Ok(Some(AgentMessage::Hello { version })) => {
                return Err(ClientError::Version {
                    guest: version,
                    host: PROTOCOL_VERSION,
                })
            }
            Ok(Some(other)) => {
                return Err(ClientError::Protocol(format!(
                    "expected Hello, got {}",
                    describe(&other)
                )))
            }
            Ok(None) => return Err(ClientError::Closed),
            Err(ReadError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::Timeout)
            }
            Err(ReadError::Io(e)) => return Err(io_err(e)),
            Err(ReadError::Frame(e)) => return Err(ClientError::Protocol(e.to_string())),
        }
        conn.set_read_timeout(None).map_err(io_err)?;
        let inner = Arc::new(Inner {
            conn: Box::new(conn),
            writer: Mutex::new(FrameWriter::new(writer)),
            requests: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            dead: Mutex::new(None),
        });
        let for_reader = inner.clone();
        let reader = std::thread::Builder::new()
            .name("agent-reader".into())
            .spawn(move || reader_loop(&for_reader, reader))
            .map_err(io_err)?;
        Ok(AgentClient {
            inner,
            reader: Some(reader),
        })
    }

    fn start(&self, request: Request) -> Result<(u64, Arc<Req>)> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let req = Arc::new(Req::default());
        lock(&req.state).credit_out = u64::from(WINDOW);
        lock(&self.inner.requests).insert(id, req.clone());
        if let Err(e) = self.inner.send(&HostMessage::Request { id, request }) {
            lock(&self.inner.requests).remove(&id);
            return Err(e);
        }
        Ok((id, req))
    }

    fn handle(&self, request: Request) -> Result<Handle> {
        let (id, req) = self.start(request)?;
        Ok(Handle {
            inner: self.inner.clone(),
            id,
            req,
            deadline: None,
        })
    }

    /// Round trip to the agent.
    pub fn ping(&self) -> Result<Duration> {
        let t = Instant::now();
        match self.handle(Request::Ping)?.next_response()? {
            Some(Response::Pong) => Ok(t.elapsed()),
            other => Err(unexpected(other)),
        }
    }

    /// The guest's memory in use, processes and exec counts.
    pub fn stats(&self) -> Result<crate::agent::GuestStats> {
        match self.handle(Request::Stats)?.next_response()? {
            Some(Response::Stats(s)) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// [`Self::stats`], failing with [`ClientError::Timeout`] after `timeout`.
    pub fn stats_within(&self, timeout: Duration) -> Result<crate::agent::GuestStats> {
        let mut h = self.handle(Request::Stats)?;
        h.deadline = Some(Instant::now() + timeout);
        match h.next_response()? {
            Some(Response::Stats(s)) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Starts a process; its output, exit status and stdin go through the handle.
    pub fn exec(&self, req: ExecRequest) -> Result<ExecHandle> {
        Ok(ExecHandle {
            h: self.handle(Request::Exec(req))?,
            pid: None,
            stdin_closed: false,
        })
    }

    /// Writes `data` to `path` in the guest (created or truncated); returns the bytes written.
    pub fn write_file(
        &self,
        path: &[u8],
        mode: u32,
        create_parents: bool,
        data: &mut dyn Read,
    ) -> Result<u64> {
        let mut h = self.handle(Request::WriteFile {
            path: path.to_vec(),
            mode,
            create_parents,
        })?;
        let mut total = 0u64;
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let n = match read_some(data, &mut buf) {
                Ok(n) => n,
                Err(e) => {
                    // The agent discards what it has so far rather than keep a partial file.
                    let _ = h.inner.send(&HostMessage::Abort { id: h.id });
                    return Err(ClientError::Io(format!("reading the local file: {e}")));
                }
            };
            // An early error from the agent (cannot create the file) ends the transfer.
            if let Some(r) = h.try_final()? {
                return match r {
                    Response::Error(e) => Err(ClientError::Agent(e)),
                    other => Err(unexpected(Some(other))),
                };
            }
            h.send_payload(n as u64, |id| HostMessage::FileData {
                id,
                data: buf[..n].to_vec(),
                last: n == 0,
            })?;
            total += n as u64;
            if n == 0 {
                break;
            }
        }
        loop {
            match h.next_response()? {
                Some(Response::Done) => return Ok(total),
                Some(Response::Ack(_)) => {}
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Streams `path` from the guest into `out`; returns the bytes read.
    pub fn read_file(&self, path: &[u8], out: &mut dyn Write) -> Result<u64> {
        let mut h = self.handle(Request::ReadFile {
            path: path.to_vec(),
        })?;
        let mut total = 0u64;
        loop {
            match h.next_response()? {
                Some(Response::FileData(d)) => {
                    out.write_all(&d)
                        .map_err(|e| ClientError::Io(format!("writing the local file: {e}")))?;
                    total += d.len() as u64;
                }
                Some(Response::Done) => return Ok(total),
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Metadata of `path` in the guest.
    pub fn stat(&self, path: &[u8]) -> Result<FileStat> {
        match self
            .handle(Request::Stat {
                path: path.to_vec(),
            })?
            .next_response()?
        {
            Some(Response::Stat(s)) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    /// Entries of the directory `path` in the guest.
    pub fn list_dir(&self, path: &[u8]) -> Result<Vec<DirEntry>> {
        let mut h = self.handle(Request::ListDir {
            path: path.to_vec(),
        })?;
        let mut all = Vec::new();
        loop {
            match h.next_response()? {
                Some(Response::DirEntries(e)) => all.extend(e),
                Some(Response::Done) => return Ok(all),
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Removes `path` in the guest.
    pub fn remove(&self, path: &[u8], recursive: bool) -> Result<()> {
        match self
            .handle(Request::Remove {
                path: path.to_vec(),
                recursive,
            })?
            .next_response()?
        {
            Some(Response::Done) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Sandbox-wide settings for every later exec (default environment, a CA to trust).
    pub fn configure(&self, c: crate::agent::Configure) -> Result<()> {
        match self.handle(Request::Configure(c))?.next_response()? {
            Some(Response::Done) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Tells a guest restored from a snapshot to step its clock to `now` and reseed its
    /// random-number generator with `seed` (see [`Request::Restored`]).
    pub fn restored(&self, now: std::time::SystemTime, seed: Vec<u8>) -> Result<()> {
        let unix_nanos = now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        match self
            .handle(Request::Restored { unix_nanos, seed })?
            .next_response()?
        {
            Some(Response::Done) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Asks the agent to sync and power off; returns once it acknowledged.
    pub fn shutdown(&self) -> Result<()> {
        match self.handle(Request::Shutdown)?.next_response()? {
            Some(Response::Done) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Whether the connection failed or closed, and why.
    pub fn failure(&self) -> Option<ClientError> {
        self.inner.dead()
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.inner.fail(ClientError::Closed);
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

fn read_some(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

fn describe(m: &AgentMessage) -> String {
    match m {
        AgentMessage::Hello { .. } => "Hello".into(),
        AgentMessage::Response { id, .. } => format!("a response to request {id}"),
    }
}

fn unexpected(r: Option<Response>) -> ClientError {
    match r {
        Some(Response::Error(e)) => ClientError::Agent(e),
        Some(other) => ClientError::Protocol(format!("unexpected response {other:?}")),
        None => ClientError::Closed,
    }
}

fn reader_loop(inner: &Inner, mut reader: FrameReader<Box<dyn Read + Send>>) {
    loop {
        let msg = match reader.read_frame::<AgentMessage>() {
            Ok(Some(m)) => m,
            Ok(None) => return inner.fail(ClientError::Closed),
            Err(ReadError::Io(e)) => return inner.fail(ClientError::Io(e.to_string())),
            Err(ReadError::Frame(e)) => return inner.fail(ClientError::Protocol(e.to_string())),
        };
        if let Err(e) = dispatch(inner, msg) {
            return inner.fail(e);
        }
    }
}

fn dispatch(inner: &Inner, msg: AgentMessage) -> Result<()> {
    let (id, response) = match msg {
        AgentMessage::Hello { .. } => return Err(ClientError::Protocol("second Hello".into())),
        AgentMessage::Response { id, response } => (id, response),
    };
    let req = lock(&inner.requests).get(&id).cloned().ok_or_else(|| {
        ClientError::Protocol(format!("response to unknown or finished request {id}"))
    })?;
    let mut st = lock(&req.state);
    match response {
        Response::Ack(n) => {
            st.credit_out += u64::from(n);
            if st.credit_out > u64::from(WINDOW) {
                return Err(ClientError::Protocol(format!(
                    "request {id}: acknowledged more than was sent"
                )));
            }
        }
        r => {
            let n = r.payload_len() as u64;
            // Everything sent and not acknowledged, consumed or not, counts.
            if st.unacked_in + st.consumed + n > u64::from(WINDOW) {
                return Err(ClientError::Protocol(format!(
                    "request {id}: agent sent past the flow-control window"
                )));
            }
            if r.is_final() {
                st.finished = true;
                lock(&inner.requests).remove(&id);
            }
            if st.abandoned {
                if n > 0 && !st.finished {
                    drop(st);
                    inner.send(&HostMessage::Ack {
                        id,
                        bytes: n as u32,
                    })?;
                    return Ok(());
                }
            } else {
                st.unacked_in += n;
                st.queue.push_back(r);
            }
        }
    }
    req.cond.notify_all();
    Ok(())
}

/// A request in flight.
struct Handle {
    inner: Arc<Inner>,
    id: u64,
    req: Arc<Req>,
    deadline: Option<Instant>,
}

impl Handle {
    /// The next response, acknowledging its payload; `None` after the final one.
    fn next_response(&mut self) -> Result<Option<Response>> {
        let mut st = lock(&self.req.state);
        loop {
            if let Some(r) = st.queue.pop_front() {
                let n = r.payload_len();
                if n > 0 {
                    st.unacked_in -= n as u64;
                    st.consumed += n as u64;
                    let ack = if !st.finished && st.consumed >= ACK_BATCH {
                        std::mem::take(&mut st.consumed)
                    } else {
                        0
                    };
                    drop(st);
                    // Credit back to the agent: we consumed it.
                    if ack > 0 {
                        let _ = self.inner.send(&HostMessage::Ack {
                            id: self.id,
                            bytes: ack as u32,
                        });
                    }
                }
                return Ok(Some(r));
            }
            if st.finished {
                return Ok(None);
            }
            if let Some(e) = self.inner.dead() {
                return Err(e);
            }
            st = match self.deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(ClientError::Timeout);
                    }
                    self.req
                        .cond
                        .wait_timeout(st, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.req.cond.wait(st).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    /// The final response if it already arrived (a request that failed early).
    fn try_final(&mut self) -> Result<Option<Response>> {
        let mut st = lock(&self.req.state);
        if st.finished {
            return Ok(st.queue.pop_back());
        }
        drop(st);
        match self.inner.dead() {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }

    fn send_payload(&self, n: u64, make: impl FnOnce(u64) -> HostMessage) -> Result<()> {
        send_payload(&self.inner, &self.req, self.id, n, make)
    }
}

/// Waits for `n` bytes of send credit on request `id`, then sends the message `make(id)`.
fn send_payload(
    inner: &Inner,
    req: &Req,
    id: u64,
    n: u64,
    make: impl FnOnce(u64) -> HostMessage,
) -> Result<()> {
    let mut st = lock(&req.state);
    while st.credit_out < n {
        if let Some(e) = inner.dead() {
            return Err(e);
        }
        if st.finished {
            return Err(ClientError::Closed);
        }
        st = req.cond.wait(st).unwrap_or_else(|p| p.into_inner());
    }
    st.credit_out -= n;
    drop(st);
    inner.send(&make(id))
}

impl Drop for Handle {
    fn drop(&mut self) {
        let mut st = lock(&self.req.state);
        if st.finished {
            return;
        }
        // Keep the id known (its responses still come) but stop queueing: give back the
        // credit for what is queued and let the reader thread ack the rest.
        st.abandoned = true;
        let queued: u64 = st
            .queue
            .drain(..)
            .map(|r| r.payload_len() as u64)
            .sum::<u64>()
            + std::mem::take(&mut st.consumed);
        st.unacked_in = 0;
        drop(st);
        if queued > 0 {
            let _ = self.inner.send(&HostMessage::Ack {
                id: self.id,
                bytes: queued as u32,
            });
        }
    }
}

/// What an exec produces, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Started {
        pid: u32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// `oom_killed`: the guest's OOM killer ended it (the guest needs more memory).
    Exited {
        status: ExitStatus,
        timed_out: bool,
        oom_killed: bool,
    },
}

/// Collected output of an exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub status: ExitStatus,
    pub timed_out: bool,
    /// The guest's OOM killer ended the process.
    pub oom_killed: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// A running process in the guest.
pub struct ExecHandle {
    h: Handle,
    pid: Option<u32>,
    stdin_closed: bool,
}

impl std::fmt::Debug for ExecHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecHandle")
            .field("id", &self.h.id)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl ExecHandle {
    /// The next event; `Ok(None)` after `Exited`. Output is acknowledged (and the process
    /// allowed to write more) only as events are taken: a slow reader throttles the process.
    pub fn next_event(&mut self) -> Result<Option<ExecEvent>> {
        loop {
            return Ok(Some(match self.h.next_response()? {
                None => return Ok(None),
                Some(Response::Started { pid }) => {
                    self.pid = Some(pid);
                    ExecEvent::Started { pid }
                }
                Some(Response::Stdout(d)) => ExecEvent::Stdout(d),
                Some(Response::Stderr(d)) => ExecEvent::Stderr(d),
                Some(Response::Exited {
                    status,
                    timed_out,
                    oom_killed,
                }) => ExecEvent::Exited {
                    status,
                    timed_out,
                    oom_killed,
                },
                Some(Response::Ack(_)) => continue,
                other => return Err(unexpected(other)),
            }));
        }
    }

    /// Waits at most until `deadline` in later `next_event` calls ([`ClientError::Timeout`]).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.h.deadline = deadline;
    }

    /// The guest pid, once `Started` was seen.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Writes to the process's stdin (blocking while the agent's window is full).
    pub fn write_stdin(&mut self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(MAX_CHUNK) {
            self.h
                .send_payload(chunk.len() as u64, |id| HostMessage::Stdin {
                    id,
                    data: chunk.to_vec(),
                })?;
        }
        Ok(())
    }

    /// Closes the process's stdin (EOF for it).
    pub fn close_stdin(&mut self) -> Result<()> {
        if self.stdin_closed {
            return Ok(());
        }
        self.stdin_closed = true;
        self.h
            .inner
            .send(&HostMessage::CloseStdin { id: self.h.id })
    }

    /// Sends `signal` to the process group.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.h.inner.send(&HostMessage::Signal {
            id: self.h.id,
            signal,
        })
    }

    /// Kills the process group (SIGKILL in the guest); `Exited` follows.
    pub fn kill(&self) -> Result<()> {
        self.signal(SIGKILL)
    }

    /// Resizes the process's terminal.
    pub fn resize(&self, size: TermSize) -> Result<()> {
        self.h.inner.send(&HostMessage::Resize {
            id: self.h.id,
            size,
        })
    }

    /// A cloneable handle for stdin, signals and resizes from other threads.
    pub fn controller(&self) -> ExecController {
        ExecController {
            inner: self.h.inner.clone(),
            id: self.h.id,
            req: self.h.req.clone(),
        }
    }

    /// Discards output and waits for the exit status.
    pub fn wait(mut self) -> Result<ExitStatus> {
        while let Some(e) = self.next_event()? {
            if let ExecEvent::Exited { status, .. } = e {
                return Ok(status);
            }
        }
        Err(ClientError::Protocol(
            "exec ended without an exit status".into(),
        ))
    }

    /// Collects all output and the exit status.
    pub fn output(mut self) -> Result<ExecOutput> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(e) = self.next_event()? {
            match e {
                ExecEvent::Stdout(d) => stdout.extend_from_slice(&d),
                ExecEvent::Stderr(d) => stderr.extend_from_slice(&d),
                ExecEvent::Exited {
                    status,
                    timed_out,
                    oom_killed,
                } => {
                    return Ok(ExecOutput {
                        status,
                        timed_out,
                        oom_killed,
                        stdout,
                        stderr,
                    })
                }
                ExecEvent::Started { .. } => {}
            }
        }
        Err(ClientError::Protocol(
            "exec ended without an exit status".into(),
        ))
    }
}

impl Iterator for ExecHandle {
    type Item = Result<ExecEvent>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_event().transpose()
    }
}

/// Stdin, signals and resizes for an exec, usable from any thread.
#[derive(Clone)]
pub struct ExecController {
    inner: Arc<Inner>,
    id: u64,
    req: Arc<Req>,
}

impl std::fmt::Debug for ExecController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecController")
            .field("id", &self.id)
            .finish()
    }
}

impl ExecController {
    /// See [`ExecHandle::write_stdin`].
    pub fn write_stdin(&self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(MAX_CHUNK) {
            send_payload(&self.inner, &self.req, self.id, chunk.len() as u64, |id| {
                HostMessage::Stdin {
                    id,
                    data: chunk.to_vec(),
                }
            })?;
        }
        Ok(())
    }

    /// See [`ExecHandle::close_stdin`].
    pub fn close_stdin(&self) -> Result<()> {
        self.inner.send(&HostMessage::CloseStdin { id: self.id })
    }

    /// See [`ExecHandle::signal`].
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.inner.send(&HostMessage::Signal {
            id: self.id,
            signal,
        })
    }

    /// See [`ExecHandle::kill`].
    pub fn kill(&self) -> Result<()> {
        self.signal(SIGKILL)
    }

    /// See [`ExecHandle::resize`].
    pub fn resize(&self, size: TermSize) -> Result<()> {
        self.inner.send(&HostMessage::Resize { id: self.id, size })
    }
}

/// The controller is the process's stdin as a [`Write`]r (`io::copy(&mut file, &mut ctl)`).
impl Write for ExecController {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(MAX_CHUNK);
        self.write_stdin(&buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e.to_string()))?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// SIGKILL as the guest (Linux) numbers it, whatever the host is.
const SIGKILL: i32 = 9;
