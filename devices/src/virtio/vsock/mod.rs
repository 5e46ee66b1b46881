//! virtio-vsock (device id 19): stream sockets between the host and the guest (CID 3).
//!
//! Every host-side end of a connection is a Unix stream socket: a `socketpair` for in-process
//! users ([`VsockHost::connect`], [`VsockHost::listen`]), or a socket accepted on the per-VM
//! hybrid-vsock path (Firecracker's `CONNECT <port>\n` → `OK <port>\n` convention, see
//! [`hybrid`]). One worker thread moves bytes between those sockets and the guest's queues with
//! credit-based flow control in both directions, so neither side buffers without bound.
//!
//! Guest input is hostile: a malformed descriptor chain fails the device; a bad header, a
//! packet for an unknown connection or data beyond the credit we granted resets that
//! connection; the connection table and the queue of control replies are bounded.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT, Reader, Writer};

use super::check_chain;
use super::worker::{self, DeviceWork, DeviceWorker, WorkerSetup, FIRST_DEVICE_TOKEN};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::packet::{
    Header, Op, HDR_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::{ActivateError, Activation, DeviceFailure, IrqStatus, Queue, VirtioDevice, INT_CONFIG};
use crate::bus::lock;

pub mod hybrid;
pub mod packet;

/// virtio device id.
pub const DEVICE_TYPE: u32 = 19;
/// The guest's CID.
pub const GUEST_CID: u64 = 3;
/// Queue size of rx, tx and event queues.
pub const QUEUE_SIZE: u16 = 256;
/// Receive buffer we advertise per connection: the most guest data we hold for a slow host
/// reader before the guest must wait for credit.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Most simultaneous connections.
pub const MAX_CONNS: usize = 256;
/// Most control packets (replies, resets, credit updates) queued for the guest; past this the
/// device stops reading the tx queue until the guest posts receive buffers.
const MAX_PENDING: usize = 1024;
/// How long a connection may wait for the guest to answer a request or a full shutdown.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// First local port of host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const TOKEN_CMD: u64 = FIRST_DEVICE_TOKEN;
const FIRST_CONN_TOKEN: u64 = FIRST_DEVICE_TOKEN + 1;

/// A request to the worker from the host API.
enum Command {
    Connect {
        port: u32,
        stream: UnixStream,
        greeting: Vec<u8>,
        reply: Option<Sender<io::Result<()>>>,
    },
}

/// State shared by the device, its worker and the host API.
struct HostShared {
    cmd: Mutex<Option<Sender<Command>>>,
    cmd_evt: EventFd,
    listeners: Mutex<HashMap<u32, SyncSender<UnixStream>>>,
}

/// The host's side of a VM's vsock device.
#[derive(Clone)]
pub struct VsockHost(Arc<HostShared>);

impl std::fmt::Debug for VsockHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockHost")
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl VsockHost {
    /// Whether the guest driver has activated the device.
    pub fn is_ready(&self) -> bool {
        lock(&self.0.cmd).is_some()
    }

    fn send(&self, c: Command) -> io::Result<()> {
        let guard = lock(&self.0.cmd);
        let tx = guard.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                "the guest's vsock driver is not active",
            )
        })?;
        tx.send(c)
            .map_err(|_| io::Error::new(io::ErrorKind::NotConnected, "the vsock device stopped"))?;
        self.0.cmd_evt.write(1)
    }

    /// Connects to guest `port`; the returned stream carries the connection's bytes.
    /// Fails with `ConnectionRefused` when nothing listens there.
    pub fn connect(&self, port: u32, timeout: Duration) -> io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        let (tx, rx) = mpsc::channel();
        self.send(Command::Connect {
            port,
            stream: theirs,
            greeting: Vec::new(),
            reply: Some(tx),
        })?;
        match rx.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(ours),
            Ok(Err(e)) => Err(e),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("vsock connect to guest port {port} timed out"),
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the vsock device was reset",
            )),
        }
    }

    /// Connects `stream` to guest `port` without waiting: `greeting` is written to the stream
    /// once the guest accepts, the stream is closed if it refuses (hybrid vsock).
    pub fn connect_stream(
        &self,
        port: u32,
        stream: UnixStream,
        greeting: Vec<u8>,
    ) -> io::Result<()> {
        self.send(Command::Connect {
            port,
            stream,
            greeting,
            reply: None,
        })
    }

    /// Accepts guest connections to host `port` (up to `backlog` waiting).
    pub fn listen(&self, port: u32, backlog: usize) -> io::Result<VsockListener> {
        let mut l = lock(&self.0.listeners);
        if l.contains_key(&port) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("vsock port {port} already has a listener"),
            ));
        }
        let (tx, rx) = mpsc::sync_channel(backlog.max(1));
        l.insert(port, tx);
        Ok(VsockListener {
            port,
            rx,
            host: self.0.clone(),
        })
    }
}

/// Guest connections to one host port.
pub struct VsockListener {
    port: u32,
    rx: Receiver<UnixStream>,
    host: Arc<HostShared>,
}

impl std::fmt::Debug for VsockListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockListener")
            .field("port", &self.port)
            .finish()
    }
}

impl VsockListener {
    /// The next connection, waiting at most `timeout`.
    pub fn accept(&self, timeout: Duration) -> io::Result<UnixStream> {
        self.rx
            .recv_timeout(timeout)
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no vsock connection"))
    }
}

impl Drop for VsockListener {
    fn drop(&mut self) {
        lock(&self.host.listeners).remove(&self.port);
    }
}

/// The virtio-vsock device.
pub struct VsockDevice {
    guest_cid: u64,
    host: Arc<HostShared>,
    /// From a restored snapshot: connections the guest still believes open (reset at
    /// activation), and where host-side port numbers continue.
    restored: Option<VsockState>,
    worker: Option<DeviceWorker<Worker>>,
}

impl std::fmt::Debug for VsockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockDevice")
            .field("guest_cid", &self.guest_cid)
            .field("active", &self.worker.is_some())
            .finish()
    }
}

impl VsockDevice {
    /// A device for guest CID [`GUEST_CID`] and its host handle.
    pub fn new() -> io::Result<(VsockDevice, VsockHost)> {
        let host = Arc::new(HostShared {
            cmd: Mutex::new(None),
            cmd_evt: EventFd::new(EFD_NONBLOCK)?,
            listeners: Mutex::new(HashMap::new()),
        });
        Ok((
            VsockDevice {
                guest_cid: GUEST_CID,
                host: host.clone(),
                restored: None,
                worker: None,
            },
            VsockHost(host),
        ))
    }

    fn stop_worker(&mut self) {
        lock(&self.host.cmd).take();
        self.worker = None;
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, a: Activation, _features: u64) -> Result<(), ActivateError> {
        self.stop_worker();
        let mut queues = a.queues.into_iter();
        let mut next = |i| {
            queues
                .next()
                .filter(|(q, _)| q.ready())
                .ok_or(ActivateError::BadQueue(i))
        };
        let (rx, rx_evt) = next(0)?;
        let (tx, tx_evt) = next(1)?;
        let (_ev, ev_evt) = next(2)?;
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let epoll = worker::new_epoll().map_err(ActivateError::Worker)?;
        worker::watch(
            &epoll,
            self.host.cmd_evt.as_raw_fd(),
            EventSet::IN,
            TOKEN_CMD,
        )
        .map_err(ActivateError::Worker)?;
        let mut work = Worker {
            mem: a.mem,
            rx,
            tx,
            irq: a.irq.clone(),
            failure: a.failure.clone(),
            guest_cid: self.guest_cid,
            epoll: epoll.clone(),
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_CONN_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            pending: VecDeque::new(),
            host: self.host.clone(),
            cmd_rx,
            buf: vec![0u8; MAX_PAYLOAD as usize],
            rr: 0,
        };
        if let Some(saved) = self.restored.take() {
            // The host ends of these connections died with the snapshotted VMM: tell the
            // guest (its agent listens again, and the host reconnects).
            for &key in &saved.conns {
                let h = work.header(key, Op::Rst, 0, 0);
                work.pending.push_back(h);
            }
            work.next_local_port = saved.next_local_port.max(FIRST_LOCAL_PORT);
            if !saved.conns.is_empty() {
                let _ = rx_evt.write(1);
            }
        }
        let setup = WorkerSetup {
            name: "vsock".into(),
            kind: msb_confine::ThreadKind::Vsock,
            seccomp: a.seccomp,
            irq: a.irq,
            failure: a.failure,
            queue_evts: vec![rx_evt, tx_evt, ev_evt],
        };
        self.worker = Some(DeviceWorker::start(setup, epoll, work).map_err(ActivateError::Worker)?);
        *lock(&self.host.cmd) = Some(cmd_tx);
        Ok(())
    }

    fn worker(&mut self) -> Option<&mut dyn worker::WorkerControl> {
        worker::control(&mut self.worker)
    }

    fn save_device(&mut self) -> Result<Vec<u8>, String> {
        let w = self
            .worker
            .as_ref()
            .and_then(|w| w.held())
            .ok_or("the vsock worker is not quiesced")?;
        let mut conns: Vec<Key> = w.conns.keys().copied().collect();
        conns.sort_unstable();
        let state = VsockState {
            conns,
            next_local_port: w.next_local_port,
        };
        postcard::to_allocvec(&state).map_err(|e| e.to_string())
    }

    fn restore_device(&mut self, saved: &[u8]) -> Result<(), String> {
        let state: VsockState = postcard::from_bytes(saved).map_err(|e| format!("vsock: {e}"))?;
        if state.conns.len() > MAX_CONNS {
            return Err(format!(
                "vsock: {} saved connections, over the limit of {MAX_CONNS}",
                state.conns.len()
            ));
        }
        self.restored = Some(state);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }
}

/// What a snapshot keeps of the device: the connections open at the time.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct VsockState {
    conns: Vec<Key>,
    next_local_port: u32,
}

type Key = (u32, u32); // (local port on the host, peer port in the guest)

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// We sent REQUEST and wait for RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    token: u64,
    state: State,
    reply: Option<Sender<io::Result<()>>>,
    greeting: Vec<u8>,
    /// Bytes at the front of `to_host` that are the greeting, not guest data.
    greeting_left: usize,
    /// Guest → host bytes not yet written to the stream.
    to_host: VecDeque<u8>,
    readable: bool,
    writable: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes we sent the guest.
    tx_cnt: Wrapping<u32>,
    /// Bytes the guest sent us / we delivered to the stream.
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_sent: Wrapping<u32>,
    credit_update_due: bool,
    host_eof: bool,
    shutdown_sent: bool,
    guest_no_more_data: bool,
    /// When the connection must be finished by (handshake or closing).
    deadline: Option<Instant>,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, state: State) -> Conn {
        Conn {
            stream,
            token,
            state,
            reply: None,
            greeting: Vec::new(),
            greeting_left: 0,
            to_host: VecDeque::new(),
            readable: false,
            writable: true,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_sent: Wrapping(0),
            credit_update_due: false,
            host_eof: false,
            shutdown_sent: false,
            guest_no_more_data: false,
            deadline: None,
        }
    }

    /// Bytes we may still send the guest.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }
}

struct Worker {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    irq: Arc<IrqStatus>,
    failure: Arc<DeviceFailure>,
    guest_cid: u64,
    /// The worker's epoll set, where connections come and go.
    epoll: Arc<Epoll>,
    conns: HashMap<Key, Conn>,
    tokens: HashMap<u64, Key>,
    next_token: u64,
    next_local_port: u32,
    pending: VecDeque<Header>,
    host: Arc<HostShared>,
    cmd_rx: Receiver<Command>,
    buf: Vec<u8>,
    /// Round-robin start for fairness between connections.
    rr: usize,
}

impl DeviceWork for Worker {
    fn timeout_ms(&self) -> i32 {
        self.next_deadline()
            .map(|d| d.saturating_duration_since(Instant::now()).as_millis() as i32 + 1)
            .unwrap_or(-1)
    }

    fn event(&mut self, token: u64, set: EventSet) {
        if token == TOKEN_CMD {
            let _ = self.host.cmd_evt.read();
            return;
        }
        if let Some(key) = self.tokens.get(&token).copied() {
            if let Some(c) = self.conns.get_mut(&key) {
                if set.intersects(
                    EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR,
                ) {
                    c.readable = true;
                }
                if set.intersects(EventSet::OUT | EventSet::ERROR) {
                    c.writable = true;
                }
            }
        }
    }

    fn work(&mut self) -> Result<bool, String> {
        self.commands();
        Ok(self.pump())
    }

    fn queues(&self) -> Vec<&Queue> {
        vec![&self.rx, &self.tx]
    }
}

impl Worker {
    fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().filter_map(|c| c.deadline).min()
    }

    /// One round of work: guest packets in, host bytes out, replies and data to the guest.
    /// Returns whether to raise the queue interrupt.
    fn pump(&mut self) -> bool {
        let mut notify_tx = false;
        let mut notify_rx = false;
        // Loop until nothing moves: each step can unblock another.
        for _ in 0..64 {
            let a = self.process_tx();
            self.flush_to_host();
            let b = self.process_rx();
            self.expire();
            notify_tx |= a;
            notify_rx |= b;
            if !(a || b) || self.failure.is_failed() {
                break;
            }
        }
        let mut signal = false;
        if notify_tx {
            signal |= self.tx.needs_notification(&self.mem).unwrap_or(true);
        }
        if notify_rx {
            signal |= self.rx.needs_notification(&self.mem).unwrap_or(true);
        }
        signal
    }

    fn fail(&mut self, why: &str) {
        self.failure.fail(&format!("vsock: {why}"));
        self.irq.signal(INT_CONFIG);
    }

    fn header(&self, key: Key, op: Op, flags: u32, len: u32) -> Header {
        let fwd = self.conns.get(&key).map(|c| c.fwd_cnt.0).unwrap_or(0);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: fwd,
        }
    }

    fn push(&mut self, key: Key, op: Op, flags: u32) {
        if self.pending.len() >= MAX_PENDING * 2 {
            // Hard bound; process_tx stops reading well before this.
            return;
        }
        let h = self.header(key, op, flags, 0);
        if let Some(c) = self.conns.get_mut(&key) {
            c.last_fwd_sent = c.fwd_cnt;
        }
        self.pending.push_back(h);
    }

    fn rst(&mut self, key: Key) {
        self.remove(key);
        self.push(key, Op::Rst, 0);
    }

    fn remove(&mut self, key: Key) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            if let Some(r) = c.reply {
                let _ = r.send(Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("guest port {} refused the connection", key.1),
                )));
            }
        }
    }

    fn add_conn(&mut self, key: Key, stream: UnixStream, state: State) -> io::Result<&mut Conn> {
        stream.set_nonblocking(true)?;
        let token = self.next_token;
        self.next_token += 1;
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(events, token),
        )?;
        self.tokens.insert(token, key);
        Ok(self
            .conns
            .entry(key)
            .or_insert_with(|| Conn::new(stream, token, state)))
    }

    fn commands(&mut self) {
        loop {
            let cmd = match self.cmd_rx.try_recv() {
                Ok(c) => c,
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return,
            };
            let Command::Connect {
                port,
                stream,
                greeting,
                reply,
            } = cmd;
            let refuse = |reply: Option<Sender<io::Result<()>>>, e: io::Error| {
                if let Some(r) = reply {
                    let _ = r.send(Err(e));
                }
            };
            if self.conns.len() >= MAX_CONNS {
                refuse(reply, io::Error::other("too many vsock connections"));
                continue;
            }
            let mut local = self.next_local_port;
            while self.conns.contains_key(&(local, port)) {
                local = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
            }
            self.next_local_port = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
            let key = (local, port);
            match self.add_conn(key, stream, State::Connecting) {
                Ok(c) => {
                    c.reply = reply;
                    c.greeting = greeting;
                    c.deadline = Some(Instant::now() + HANDSHAKE_TIMEOUT);
                    self.push(key, Op::Request, 0);
                }
                Err(e) => refuse(reply, e),
            }
        }
    }

    /// Reads the guest's packets; true if any descriptor was used.
    fn process_tx(&mut self) -> bool {
        let mem = self.mem.clone();
        let mut used = false;
        loop {
            if self.pending.len() >= MAX_PENDING {
                // The guest is not taking our replies: stop reading its requests.
                break;
            }
            let chain = match self.tx.iter(&mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.fail(&format!("tx queue: {e}"));
                    return used;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            if let Err(why) = self.tx_packet(&mem, chain) {
                self.fail(&why);
                return used;
            }
            if let Err(e) = self.tx.add_used(&mem, head, 0) {
                self.fail(&format!("tx used ring: {e}"));
                return used;
            }
            used = true;
        }
        used
    }

    /// Handles one packet; `Err` only for chains that break the virtio rules.
    fn tx_packet(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<(), String> {
        check_chain(&chain, self.tx.size())?;
        let mut reader =
            Reader::new(mem, chain).map_err(|e| format!("tx descriptor chain: {e}"))?;
        let mut raw = [0u8; HDR_LEN];
        if reader.available_bytes() < HDR_LEN {
            return Err(format!(
                "tx packet of {} bytes is shorter than a header",
                reader.available_bytes()
            ));
        }
        reader
            .read_exact(&mut raw)
            .map_err(|e| format!("tx header: {e}"))?;
        let available = reader.available_bytes();
        let h = match Header::parse(&raw, available, self.guest_cid) {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!("vsock: dropping a bad packet from the guest: {e}");
                // Reset the connection the header names, if the ports are readable at all.
                let key = (
                    u32::from_le_bytes([raw[20], raw[21], raw[22], raw[23]]),
                    u32::from_le_bytes([raw[16], raw[17], raw[18], raw[19]]),
                );
                if u16::from_le_bytes([raw[30], raw[31]]) != Op::Rst as u16 {
                    self.rst(key);
                }
                return Ok(());
            }
        };
        let key = (h.dst_port, h.src_port);
        if h.op == Op::Request {
            self.guest_request(key, &h);
            return Ok(());
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if h.op != Op::Rst {
                self.push(key, Op::Rst, 0);
            }
            return Ok(());
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        match h.op {
            Op::Request => {}
            Op::Response => {
                if c.state != State::Connecting {
                    self.rst(key);
                    return Ok(());
                }
                c.state = State::Established;
                c.deadline = None;
                if let Some(r) = c.reply.take() {
                    let _ = r.send(Ok(()));
                }
                let greeting = std::mem::take(&mut c.greeting);
                c.greeting_left = greeting.len();
                c.to_host.extend(greeting);
            }
            Op::Rst => self.remove(key),
            Op::Shutdown => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.guest_no_more_data = true;
                }
                if h.flags & SHUTDOWN_RCV != 0
                    && h.flags & SHUTDOWN_SEND != 0
                    && c.deadline.is_none()
                {
                    // The guest closed both ways: finish delivering, then reset (as Linux does).
                    c.deadline = Some(Instant::now() + HANDSHAKE_TIMEOUT);
                }
            }
            Op::Rw => {
                if c.state != State::Established {
                    self.rst(key);
                    return Ok(());
                }
                // The guest may only send what our advertised buffer still holds.
                let held = (c.rx_cnt - c.fwd_cnt).0 as usize;
                if held + h.len as usize > BUF_ALLOC as usize || c.guest_no_more_data {
                    tracing::debug!(
                        "vsock: guest exceeded its credit on port {}; resetting",
                        key.1
                    );
                    self.rst(key);
                    return Ok(());
                }
                let n = h.len as usize;
                let buf = &mut self.buf[..n];
                reader
                    .read_exact(buf)
                    .map_err(|e| format!("tx payload: {e}"))?;
                c.to_host.extend(&buf[..]);
                c.rx_cnt += Wrapping(h.len);
            }
            Op::CreditUpdate => {}
            Op::CreditRequest => c.credit_update_due = true,
        }
        Ok(())
    }

    fn guest_request(&mut self, key: Key, h: &Header) {
        if self.conns.contains_key(&key) {
            return self.rst(key);
        }
        let listener = lock(&self.host.listeners).get(&key.0).cloned();
        let Some(listener) = listener else {
            return self.push(key, Op::Rst, 0);
        };
        if self.conns.len() >= MAX_CONNS {
            return self.push(key, Op::Rst, 0);
        }
        let Ok((ours, theirs)) = UnixStream::pair() else {
            return self.push(key, Op::Rst, 0);
        };
        match listener.try_send(theirs) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                return self.push(key, Op::Rst, 0)
            }
        }
        match self.add_conn(key, ours, State::Established) {
            Ok(c) => {
                c.peer_buf_alloc = h.buf_alloc;
                c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
                self.push(key, Op::Response, 0);
            }
            Err(_) => self.push(key, Op::Rst, 0),
        }
    }

    /// Writes buffered guest data to the host streams; queues credit updates.
    fn flush_to_host(&mut self) {
        let mut resets = Vec::new();
        let mut updates = Vec::new();
        for (key, c) in self.conns.iter_mut() {
            while c.writable && !c.to_host.is_empty() {
                let (a, _) = c.to_host.as_slices();
                match c.stream.write(a) {
                    Ok(0) => break,
                    Ok(n) => {
                        c.to_host.drain(..n);
                        // The greeting is ours, not guest data: it does not count as credit.
                        let greeting = n.min(c.greeting_left);
                        c.greeting_left -= greeting;
                        c.fwd_cnt += Wrapping((n - greeting) as u32);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        // The host side is gone.
                        resets.push(*key);
                        break;
                    }
                }
            }
            if c.to_host.is_empty() && c.guest_no_more_data {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
            }
            let progress = (c.fwd_cnt - c.last_fwd_sent).0;
            if c.credit_update_due
                || progress >= BUF_ALLOC / 4
                || (progress > 0 && c.to_host.is_empty())
            {
                c.credit_update_due = false;
                updates.push(*key);
            }
        }
        for k in resets {
            self.rst(k);
        }
        for k in updates {
            self.push(k, Op::CreditUpdate, 0);
        }
    }

    /// Ends connections whose handshake timed out, and connections both sides closed once
    /// everything was delivered (or their closing deadline passed).
    fn expire(&mut self) {
        let now = Instant::now();
        let done = |c: &Conn| c.guest_no_more_data && c.to_host.is_empty() && c.shutdown_sent;
        let due: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now || done(c)))
            .map(|(k, _)| *k)
            .collect();
        for k in due {
            if let Some(c) = self.conns.get_mut(&k) {
                if c.state == State::Connecting {
                    if let Some(r) = c.reply.take() {
                        let _ = r.send(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("guest port {} did not answer", k.1),
                        )));
                    }
                }
            }
            self.rst(k);
        }
    }

    fn rx_available(&self) -> bool {
        match self.rx.avail_idx(&self.mem, Ordering::Acquire) {
            Ok(idx) => idx != Wrapping(self.rx.next_avail()),
            Err(_) => false,
        }
    }

    /// Fills the guest's receive buffers; true if any was used.
    fn process_rx(&mut self) -> bool {
        let mem = self.mem.clone();
        let mut used = false;
        while self.rx_available() {
            let Some(what) = self.next_rx_item() else {
                break;
            };
            let chain = match self.rx.iter(&mem) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.fail(&format!("rx queue: {e}"));
                    return used;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            if let Err(why) = check_chain(&chain, self.rx.size()) {
                self.fail(&why);
                return used;
            }
            let mut writer = match Writer::new(&mem, chain) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                Ok(w) => {
                    let n = w.available_bytes();
                    self.fail(&format!("rx buffer of {n} bytes cannot hold a header"));
                    return used;
                }
                Err(e) => {
                    self.fail(&format!("rx descriptor chain: {e}"));
                    return used;
                }
            };
            let room = writer.available_bytes() - HDR_LEN;
            let written = match what {
                RxItem::Control => {
                    let Some(h) = self.pending.pop_front() else {
                        break;
                    };
                    writer.write_all(&h.encode()).map(|_| HDR_LEN)
                }
                RxItem::Data(key) => self.rx_data(key, room, &mut writer),
            };
            match written {
                Ok(0) => {
                    // Nothing to send after all (the stream had no data): hand the buffer back.
                    self.rx.go_to_previous_position();
                    continue;
                }
                Ok(n) => {
                    if let Err(e) = self.rx.add_used(&mem, head, n as u32) {
                        self.fail(&format!("rx used ring: {e}"));
                        return used;
                    }
                    used = true;
                }
                Err(e) => {
                    self.fail(&format!("rx buffer: {e}"));
                    return used;
                }
            }
        }
        used
    }

    /// What to put into the next receive buffer: control packets first, then data from a
    /// connection that has some and may send (round robin).
    fn next_rx_item(&mut self) -> Option<RxItem> {
        if !self.pending.is_empty() {
            return Some(RxItem::Control);
        }
        let mut keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == State::Established && c.readable && !c.host_eof && c.peer_credit() > 0
            })
            .map(|(k, _)| *k)
            .collect();
        if keys.is_empty() {
            return None;
        }
        keys.sort_unstable();
        self.rr = self.rr.wrapping_add(1);
        Some(RxItem::Data(keys[self.rr % keys.len()]))
    }

    /// Reads host data for connection `key` into the buffer: an RW packet, or a SHUTDOWN at
    /// end of stream. Returns the bytes written (0: nothing to send).
    fn rx_data(&mut self, key: Key, room: usize, writer: &mut Writer<'_>) -> io::Result<usize> {
        let Some(c) = self.conns.get_mut(&key) else {
            return Ok(0);
        };
        let want = room.min(c.peer_credit() as usize).min(self.buf.len());
        if want == 0 {
            return Ok(0);
        }
        match c.stream.read(&mut self.buf[..want]) {
            Ok(0) => {
                // End of the host's data (it may still read: a half-close).
                c.host_eof = true;
                c.shutdown_sent = true;
                c.last_fwd_sent = c.fwd_cnt;
                let h = self.header(key, Op::Shutdown, SHUTDOWN_SEND, 0);
                writer.write_all(&h.encode())?;
                Ok(HDR_LEN)
            }
            Ok(n) => {
                c.tx_cnt += Wrapping(n as u32);
                c.last_fwd_sent = c.fwd_cnt;
                let h = self.header(key, Op::Rw, 0, n as u32);
                writer.write_all(&h.encode())?;
                writer.write_all(&self.buf[..n])?;
                Ok(HDR_LEN + n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                c.readable = false;
                Ok(0)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(_) => {
                self.rst(key);
                Ok(0)
            }
        }
    }
}

enum RxItem {
    Control,
    Data(Key),
}

#[cfg(test)]
mod tests;
