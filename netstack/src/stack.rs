//! The gateway: Ethernet frames from the guest (a virtio-net queue, or a TAP device for tests)
//! into smoltcp in any-IP mode; each new TCP connection and UDP flow is checked against the
//! policy and, if allowed, relayed over a real host socket; DNS to the gateway is answered
//! here through the host's resolver and filtered by the same policy.
//!
//! One thread runs the whole stack (mio for the link and host sockets, smoltcp for the guest
//! side). Back-pressure both ways: guest data is taken from smoltcp only as fast as the host
//! socket accepts it (so the guest's TCP window closes), and host data is read only while the
//! guest's send buffer has room.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant as StdInstant};

use mio::net::{TcpStream, UdpSocket};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use smoltcp::iface::{Config as IfaceConfig, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, IpAddress, IpCidr,
    IpEndpoint, IpListenEndpoint, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket,
};

use crate::addr::{self, Group};
use crate::dns::{self, Answer, Bindings};
use crate::limit::{Limit, TokenBucket};
use crate::local::{Delivery, Routes};
use crate::offload::{self, TcpEnds};
use crate::policy::{Decision, Flow, Policy, Proto};

mod echo;
mod intercepting;
mod resolvers;
mod sniffing;

/// The gateway's MAC address (locally administered).
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x6d, 0x73, 0x62, 0x00, 0x02];
/// Default MTU of the sandbox link.
pub const DEFAULT_MTU: usize = 1500;
/// TTL we give DNS answers (the host resolver does not tell us theirs).
pub const DNS_TTL: u32 = 60;

/// Where the stack's Ethernet frames come from and go to.
pub trait Link: Send {
    /// An fd that polls readable when a frame is waiting.
    fn raw_fd(&self) -> RawFd;
    /// One frame, or `None` when none is waiting; `Some(0)` for a frame the link dropped
    /// (the stack goes on to the next).
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// Sends one frame (dropping it when the link is full is fine).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Whether the guest's side takes TCP segments with partial checksums and larger than its
    /// MTU, behind a virtio-net header (see [`crate::offload::to_guest`]). Asked once a round.
    fn offloads(&self) -> bool {
        false
    }
    /// Sends one frame behind its virtio-net header; only called while [`Link::offloads`].
    fn send_offloaded(
        &mut self,
        hdr: &[u8; crate::offload::VNET_HDR_LEN],
        frame: &[u8],
    ) -> io::Result<()> {
        let _ = (hdr, frame);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this link does not offload",
        ))
    }
}

/// Resolves a name (normalized) to addresses; the default asks the host (getaddrinfo).
pub type Resolver = Arc<dyn Fn(&str) -> io::Result<Vec<IpAddr>> + Send + Sync>;

/// The host's resolver.
pub fn host_resolver() -> Resolver {
    Arc::new(|name: &str| {
        use std::net::ToSocketAddrs;
        Ok((name, 0).to_socket_addrs()?.map(|a| a.ip()).collect())
    })
}

/// Receives the audit log: one [`LogEvent`] per flow (when it ends, or when it is denied) and
/// per DNS decision.
pub type LogHook = Arc<dyn Fn(&LogEvent) + Send + Sync>;

/// How a stack behaves.
pub struct Config {
    pub policy: Policy,
    pub mtu: usize,
    /// TCP connections plus UDP flows open at once; more are refused.
    pub max_flows: usize,
    pub resolver: Resolver,
    /// The audit log (`--net-log`).
    pub log: Option<LogHook>,
    /// Host ports forwarded into the guest (`--publish`).
    pub publish: Vec<Published>,
    /// A TCP connection not established this long after its SYN (host connect plus the
    /// guest's handshake) is dropped, so half-open connections cannot pin the flow limit.
    pub handshake_timeout: Duration,
    /// A DNS query the host resolver has not answered in this long gets SERVFAIL.
    pub dns_timeout: Duration,
    /// TLS interception and secrets (see [`crate::intercept`]); none: flows are relayed as
    /// they are.
    pub intercept: Option<Arc<crate::intercept::Intercept>>,
    /// Whether the stack's threads install their seccomp filters (`msb_confine`).
    pub seccomp: msb_confine::Seccomp,
    /// Learn mode: every flow the policy allows and every name resolved is recorded here.
    pub learn: Option<Arc<Mutex<crate::learn::Learner>>>,
    /// `--net-rate`: bytes per second into the guest (data read from host sockets) and out
    /// of it (frames taken from the link), each a token bucket (see [`crate::limit`]).
    pub rate_in: Option<u64>,
    pub rate_out: Option<u64>,
    /// `--egress-budget`: bytes the guest may send on its link (as `frames from the guest`
    /// counts them) over the sandbox's life; once spent, its open flows are cut and new
    /// ones refused.
    pub egress_budget: Option<u64>,
    /// DNS bindings to start from: those of the sandbox a snapshot saved
    /// ([`NetStack::dns_bindings`]), so name rules still match the addresses its programs
    /// resolved before it.
    pub dns_bindings: Vec<dns::SavedBinding>,
}

/// A host socket whose traffic goes to a guest port, bound by the caller (so a port in use
/// is an error before the sandbox boots).
#[derive(Debug)]
pub enum Published {
    /// Each connection accepted here is a connection from the gateway to `guest_port`.
    Tcp {
        listener: std::net::TcpListener,
        guest_port: u16,
        /// The flag as written, for the audit log.
        spec: String,
    },
    /// Each peer sending here gets its own flow to `guest_port`.
    Udp {
        socket: std::net::UdpSocket,
        guest_port: u16,
        spec: String,
    },
}

impl Default for Config {
    fn default() -> Config {
        Config {
            policy: Policy::default(),
            mtu: DEFAULT_MTU,
            max_flows: 1024,
            resolver: host_resolver(),
            log: None,
            publish: Vec::new(),
            handshake_timeout: Duration::from_secs(30),
            dns_timeout: Duration::from_secs(5),
            intercept: None,
            seccomp: msb_confine::Seccomp::Enforce,
            learn: None,
            rate_in: None,
            rate_out: None,
            egress_budget: None,
            dns_bindings: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("policy", &self.policy)
            .field("mtu", &self.mtu)
            .field("max_flows", &self.max_flows)
            .finish_non_exhaustive()
    }
}

/// One line of the audit log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogEvent {
    /// Seconds since the Unix epoch.
    pub time: f64,
    /// `flow`, `dns`, `tls` (an intercepted or bypassed TLS flow) or `secret`.
    pub kind: &'static str,
    /// `tcp`, `udp` or `icmp`.
    pub proto: &'static str,
    /// `IP:PORT` (the gateway's resolver for DNS).
    pub dst: String,
    /// The names bound to the destination (DNS answers, TLS server name, HTTP Host), or the
    /// name asked.
    pub names: Vec<String>,
    /// `allowed` or `denied`.
    pub verdict: &'static str,
    /// What decided: the rule as written (`--allow host:8080`, `policy.toml:3`) or the preset.
    pub rule: String,
    /// Bytes guest → destination and destination → guest (flows).
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// How long the flow lasted.
    pub duration_ms: u64,
    /// Addresses answered (DNS).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<String>,
    /// The secret a `secret` line is about (its name, never its value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// How many placeholders a `secret` line counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

impl LogEvent {
    /// A line of `kind` with no byte counts, names or answers yet.
    pub(crate) fn new(
        kind: &'static str,
        proto: &'static str,
        dst: String,
        verdict: &'static str,
        rule: String,
    ) -> LogEvent {
        LogEvent {
            time: unix_now(),
            kind,
            proto,
            dst,
            names: Vec::new(),
            verdict,
            rule,
            bytes_out: 0,
            bytes_in: 0,
            duration_ms: 0,
            answers: Vec::new(),
            secret: None,
            count: None,
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What a flow's log line needs, kept from its decision to its end.
#[derive(Debug, Clone)]
struct Audit {
    proto: Proto,
    dst: SocketAddr,
    /// The destination's group as decided (`host` for any address of the host's own).
    group: Group,
    names: Vec<String>,
    rule: String,
    started: StdInstant,
    bytes_out: u64,
    bytes_in: u64,
    /// A flow into the guest through a published port: no egress policy applies to it.
    inbound: bool,
}

impl Audit {
    /// The record of a connection (or UDP peer) from `peer` to a published guest port.
    fn published(proto: Proto, guest_port: u16, peer: SocketAddr, spec: String) -> Audit {
        let guest = IpAddr::V4(addr::GUEST_V4);
        Audit {
            proto,
            dst: SocketAddr::new(guest, guest_port),
            group: addr::group_of(guest),
            names: vec![format!("published from {peer}")],
            rule: spec,
            started: StdInstant::now(),
            bytes_out: 0,
            bytes_in: 0,
            inbound: true,
        }
    }

    fn event(&self, verdict: &'static str) -> LogEvent {
        LogEvent {
            time: unix_now(),
            kind: "flow",
            proto: match self.proto {
                Proto::Tcp => "tcp",
                Proto::Icmp => "icmp",
                _ => "udp",
            },
            dst: self.dst.to_string(),
            names: self.names.clone(),
            verdict,
            rule: self.rule.clone(),
            bytes_out: self.bytes_out,
            bytes_in: self.bytes_in,
            duration_ms: self.started.elapsed().as_millis() as u64,
            answers: Vec::new(),
            secret: None,
            count: None,
        }
    }
}

/// Counters for `msb-vmm stats`, tests and diagnostics. Frames and bytes are counted on the
/// link (Ethernet frames, both directions), flows as they are decided.
#[derive(Debug, Default)]
pub struct Stats {
    pub frames_to_guest: AtomicU64,
    pub bytes_to_guest: AtomicU64,
    pub bytes_from_guest: AtomicU64,
    /// Flows open now (TCP, UDP, ICMP, published), set each round.
    pub flows_open: AtomicU64,
    /// Connections and UDP peers that came in through published ports.
    pub published_accepted: AtomicU64,
    /// Flows a policy change ended.
    pub flows_cut: AtomicU64,
    pub tcp_allowed: AtomicU64,
    pub tcp_denied: AtomicU64,
    pub udp_allowed: AtomicU64,
    pub udp_denied: AtomicU64,
    pub dns_answered: AtomicU64,
    pub dns_refused: AtomicU64,
    pub tcp_timed_out: AtomicU64,
    pub icmp_allowed: AtomicU64,
    pub icmp_denied: AtomicU64,
    /// Frames from the guest.
    pub frames_in: AtomicU64,
    pub malformed: AtomicU64,
    /// Guest-side TCP sockets of ended short flows taken by new flows.
    pub tcp_sockets_reused: AtomicU64,
}

impl Stats {
    /// Flows the guest opened that the policy allowed, and those it refused (DNS refusals
    /// count as denials).
    pub fn flows_allowed(&self) -> u64 {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        l(&self.tcp_allowed) + l(&self.udp_allowed) + l(&self.icmp_allowed)
    }

    pub fn denials(&self) -> u64 {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        l(&self.tcp_denied) + l(&self.udp_denied) + l(&self.icmp_denied) + l(&self.dns_refused)
    }
}

/// Counts what crosses the link (see [`Stats`]).
struct Counted {
    inner: Box<dyn Link>,
    stats: Arc<Stats>,
}

impl Link for Counted {
    fn raw_fd(&self) -> RawFd {
        self.inner.raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let r = self.inner.recv(buf)?;
        if let Some(n) = r {
            if n > 0 {
                self.stats.frames_in.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_from_guest
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        Ok(r)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.inner.send(frame)?;
        self.count_out(frame);
        Ok(())
    }

    fn offloads(&self) -> bool {
        self.inner.offloads()
    }

    fn send_offloaded(
        &mut self,
        hdr: &[u8; crate::offload::VNET_HDR_LEN],
        frame: &[u8],
    ) -> io::Result<()> {
        self.inner.send_offloaded(hdr, frame)?;
        self.count_out(frame);
        Ok(())
    }
}

impl Counted {
    fn count_out(&self, frame: &[u8]) {
        self.stats.frames_to_guest.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_to_guest
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
    }
}

/// What a policy change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyChanged {
    /// Open flows the new policy denies, ended (the guest saw a reset).
    pub flows_cut: usize,
    /// Open flows decided again and kept.
    pub flows_kept: usize,
}

/// Orders for the stack's thread.
enum Command {
    SetPolicy(Box<Policy>, mpsc::Sender<PolicyChanged>),
    Bindings(mpsc::Sender<Vec<dns::SavedBinding>>),
}

/// A running stack; dropping it stops the thread.
#[derive(Debug)]
pub struct NetStack {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<std::thread::JoinHandle<()>>,
    stats: Arc<Stats>,
    commands: Mutex<mpsc::Sender<Command>>,
    /// The policy in force, as the stack's thread last applied it.
    policy: Arc<Mutex<Policy>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::SetPolicy(..) => f.write_str("SetPolicy"),
            Command::Bindings(..) => f.write_str("Bindings"),
        }
    }
}

impl NetStack {
    /// Starts the stack on its own thread, serving `link`. Each connection's 1 MiB buffers
    /// are best allocated as fresh mmaps: see `msb_devices::net::alloc`, which the VMM applies.
    pub fn spawn(link: Box<dyn Link>, cfg: Config) -> io::Result<NetStack> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Stats::default());
        let policy = Arc::new(Mutex::new(cfg.policy.clone()));
        let (commands, orders) = mpsc::channel();
        let mut state = State::new(link, cfg, poll, waker.clone(), stats.clone(), true)?;
        state.orders = Some((orders, policy.clone()));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("netstack".into())
            .spawn(move || {
                if let Err(e) =
                    msb_confine::enter(msb_confine::ThreadKind::Netstack, state.cfg.seccomp)
                {
                    tracing::error!("netstack not started: {e}");
                    return;
                }
                if let Err(e) = state.run(&stop2) {
                    tracing::error!("netstack stopped: {e}");
                }
            })?;
        Ok(NetStack {
            stop,
            waker,
            thread: Some(thread),
            stats,
            commands: Mutex::new(commands),
            policy,
        })
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The policy in force.
    pub fn policy(&self) -> Policy {
        self.policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the policy at once, between two rounds of the stack: every open flow is
    /// decided again under it and those it denies are ended (logged as `denied`, with the
    /// new rule); DNS answers and new flows from then on are decided by it. The sandbox's
    /// DNS bindings (which address a name resolved to) are kept: they are what name rules
    /// match flows by. Returns once the stack has applied it.
    pub fn set_policy(&self, policy: Policy) -> io::Result<PolicyChanged> {
        let (done, applied) = mpsc::channel();
        self.commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Command::SetPolicy(Box::new(policy), done))
            .map_err(|_| io::Error::other("the netstack has stopped"))?;
        self.waker.wake()?;
        applied
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| io::Error::other("the netstack did not apply the policy"))
    }

    /// The DNS bindings alive now (which addresses the guest's names resolved to), for a
    /// snapshot: a restore passes them back in [`Config::dns_bindings`].
    pub fn dns_bindings(&self) -> io::Result<Vec<dns::SavedBinding>> {
        let (done, answer) = mpsc::channel();
        self.commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Command::Bindings(done))
            .map_err(|_| io::Error::other("the netstack has stopped"))?;
        self.waker.wake()?;
        answer
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| io::Error::other("the netstack did not answer"))
    }

    /// Runs the stack on this thread for `rounds` non-blocking rounds over `link`, then stops:
    /// for fuzzing (every frame the fuzzer makes goes through the same code as a guest's).
    #[doc(hidden)]
    pub fn drive(link: Box<dyn Link>, cfg: Config, rounds: usize) -> io::Result<Stats> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let stats = Arc::new(Stats::default());
        let mut state = State::new(link, cfg, poll, waker, stats.clone(), false)?;
        let mut buf = vec![0u8; rx_buffer_len(state.cfg.mtu)];
        for _ in 0..rounds {
            state.round(&mut buf)?;
        }
        drop(state);
        Ok(Arc::try_unwrap(stats).unwrap_or_default())
    }
}

impl Drop for NetStack {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const LINK: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_FLOW: usize = 2;
const TCP_BUFFER: usize = 1 << 20;
/// Ended flows' guest-side sockets kept for new flows, at most. A new socket's two buffers are
/// fresh mmaps (see `msb_devices::net::alloc`), and unmapping them when a flow ends makes the
/// kernel interrupt every CPU running the VMM's threads: the cost of a short connection was
/// mostly that. A kept socket is reset by `listen`/`connect` (no data survives; its rings
/// restart at their first byte, so a new flow touches the pages the old one did).
const SPARE_TCP: usize = 16;
/// Only flows that moved at most this much each way are kept, which bounds the resident
/// memory of the spares to `SPARE_TCP` x 2 x this.
const SPARE_TCP_BYTES: u64 = 64 << 10;
/// A UDP flow with no datagram either way for this long is over.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// Gateway ports for flows into the guest (published ports).
const EPHEMERAL_FIRST: u16 = 49152;

struct Phy<'a> {
    rx: &'a mut VecDeque<Vec<u8>>,
    link: &'a mut dyn Link,
    tx: &'a mut Vec<u8>,
    mtu: usize,
    /// The link offloads this round: smoltcp leaves TCP checksums out and sends segments as
    /// large as the guest's raised MSS (see [`crate::offload`]).
    offload: bool,
    /// The MSS each guest connection asked for, by (guest, remote) end.
    mss: &'a HashMap<TcpEnds, u16>,
}

impl<'a> Phy<'a> {
    fn new(
        rx: &'a mut VecDeque<Vec<u8>>,
        link: &'a mut dyn Link,
        tx: &'a mut Vec<u8>,
        mtu: usize,
        mss: &'a HashMap<TcpEnds, u16>,
    ) -> Phy<'a> {
        let offload = link.offloads();
        Phy {
            rx,
            link,
            tx,
            mtu,
            offload,
            mss,
        }
    }

    fn tx(&mut self) -> Tx<'_> {
        Tx {
            link: &mut *self.link,
            buf: &mut *self.tx,
            offload: self.offload,
            mtu: self.mtu,
            mss: self.mss,
        }
    }
}

struct Rx(Vec<u8>);
/// A frame to the guest, built in a buffer kept across frames.
struct Tx<'a> {
    link: &'a mut dyn Link,
    buf: &'a mut Vec<u8>,
    offload: bool,
    mtu: usize,
    mss: &'a HashMap<TcpEnds, u16>,
}

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        let frame = &mut self.buf[..len];
        let r = f(frame);
        let sent = if !self.offload {
            self.link.send(frame)
        } else if let Some(hdr) = offload::to_guest(frame, self.mtu, |k| self.mss.get(&k).copied())
        {
            self.link.send_offloaded(&hdr, frame)
        } else if frame.len() > self.mtu + 14 {
            // Only TCP is offered past the MTU (smoltcp's is raised for it).
            tracing::debug!(
                "netstack: dropping a {}-byte frame over the MTU",
                frame.len()
            );
            Ok(())
        } else {
            self.link.send(frame)
        };
        if let Err(e) = sent {
            tracing::debug!("netstack: sending a frame: {e}");
        }
        r
    }
}

impl Device for Phy<'_> {
    type RxToken<'b>
        = Rx
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((Rx(frame), self.tx()))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(self.tx())
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = if self.offload {
            offload::MAX_OFFLOAD_FRAME
        } else {
            self.mtu + 14
        };
        // Frames come from guest memory or a TAP device, never a wire: checksums are made for
        // the guest but not verified on what it sends. A wrong one could only hurt the guest,
        // and a guest offloading checksums leaves them partial (see `crate::offload`). An
        // offloading guest finishes the TCP checksums we leave partial.
        c.checksum.ipv4 = Checksum::Tx;
        c.checksum.tcp = if self.offload {
            Checksum::None
        } else {
            Checksum::Tx
        };
        c.checksum.udp = Checksum::Tx;
        c.checksum.icmpv4 = Checksum::Tx;
        c.checksum.icmpv6 = Checksum::Tx;
        c
    }
}

type FlowKey = (IpEndpoint, IpEndpoint);
/// A finished lookup: the DNS socket and guest to answer, the query, the addresses.
type Resolved = (u64, io::Result<Vec<IpAddr>>);

/// A guest's DNS query waiting for the resolver.
struct PendingDns {
    id: u64,
    deadline: StdInstant,
    handle: SocketHandle,
    to: IpEndpoint,
    q: dns::Query,
}

struct TcpFlow {
    /// The guest-side socket, made once the host connection is up (until then the guest's
    /// SYN waits in `syn`, so a refused host connection is a refused guest connection).
    handle: Option<SocketHandle>,
    syn: Option<Vec<u8>>,
    since: StdInstant,
    stream: TcpStream,
    connected: bool,
    established: bool,
    host_eof: bool,
    shut_wr: bool,
    /// Until then the guest's first bytes are held back and read for a TLS server name or
    /// HTTP Host a deny rule names (set when such a rule could match the flow).
    inspect_until: Option<StdInstant>,
    /// Ended by the policy (a denied name), not by either side.
    denied: bool,
    audit: Audit,
    /// TLS interception, for flows on an intercepted port.
    mitm: Option<Box<intercepting::MitmFlow>>,
    /// The placeholder scan of a flow not intercepted (when secrets exist), and how many
    /// bytes at the head of the guest's buffer it has already read.
    scanner: Option<Box<crate::secrets::Scanner>>,
    scanned: usize,
}

impl TcpFlow {
    fn new(
        stream: TcpStream,
        handle: Option<SocketHandle>,
        syn: Option<Vec<u8>>,
        connected: bool,
        audit: Audit,
    ) -> TcpFlow {
        TcpFlow {
            handle,
            syn,
            since: StdInstant::now(),
            stream,
            connected,
            established: false,
            host_eof: false,
            shut_wr: false,
            inspect_until: None,
            denied: false,
            audit,
            mitm: None,
            scanner: None,
            scanned: 0,
        }
    }
}

struct UdpFlow {
    sock: UdpSocket,
    /// The guest-side smoltcp socket, bound to the destination.
    handle: SocketHandle,
    guest: IpEndpoint,
    last: StdInstant,
    audit: Audit,
}

/// A published UDP port: each host peer is a flow from its own gateway port to the guest.
struct UdpPublish {
    sock: UdpSocket,
    guest_port: u16,
    spec: String,
    peers: HashMap<SocketAddr, (SocketHandle, StdInstant, Audit)>,
}

struct State {
    link: Box<dyn Link>,
    cfg: Config,
    poll: Poll,
    stats: Arc<Stats>,
    iface: Interface,
    sockets: SocketSet<'static>,
    rx: VecDeque<Vec<u8>>,
    /// Where frames to the guest are built (one at a time).
    tx: Vec<u8>,
    /// The MSS each guest TCP connection asked for while the link offloads (smoltcp sees a
    /// raised one): the segment size the guest cuts our large segments into.
    mss: HashMap<TcpEnds, u16>,
    /// Scratch space for datagrams, kept across rounds.
    scratch: Vec<u8>,
    tcp: HashMap<FlowKey, TcpFlow>,
    /// smoltcp UDP sockets by the destination they are bound to.
    udp_socks: HashMap<IpEndpoint, SocketHandle>,
    udp: HashMap<FlowKey, UdpFlow>,
    echo: HashMap<echo::EchoKey, echo::EchoFlow>,
    /// Connections waiting for the name in their first bytes (see [`sniffing`]).
    sniffing: HashMap<FlowKey, sniffing::SniffFlow>,
    /// Name lookups made for those, by resolver id.
    lookups: HashMap<u64, FlowKey>,
    /// Sockets to remove after the next poll (so an abort's reset goes out first), and whether
    /// the socket may be kept for another flow (see [`SPARE_TCP`]).
    reap: Vec<(SocketHandle, bool)>,
    /// Guest-side TCP sockets of ended short flows, ready for new ones.
    spare_tcp: Vec<tcp::Socket<'static>>,
    /// New flows' SYNs waiting a round for another SYN to the same address (`listen_pending`).
    deferred: Vec<(Vec<u8>, u8)>,
    /// While `deferred` frames are looked at again: how many rounds the current one waited.
    attempt: u8,
    dns_socks: Vec<SocketHandle>,
    bindings: Bindings,
    next_token: usize,
    tcp_publish: Vec<(mio::net::TcpListener, u16, String)>,
    udp_publish: Vec<UdpPublish>,
    next_port: u16,
    resolved: mpsc::Receiver<Resolved>,
    resolved_tx: mpsc::Sender<Resolved>,
    resolving: Arc<AtomicU64>,
    resolvers: resolvers::Resolvers,
    pending_dns: Vec<PendingDns>,
    next_dns: u64,
    /// Asks the host kernel which destinations are the host's own (see [`crate::local`]).
    routes: Routes,
    /// Orders from [`NetStack`], and where the policy in force is shown (none when driven).
    orders: Option<(mpsc::Receiver<Command>, Arc<Mutex<Policy>>)>,
    rate_in: Option<TokenBucket>,
    rate_out: Option<TokenBucket>,
    /// A bucket ran dry this round: wake when it has refilled rather than spin.
    throttled: bool,
    /// The egress budget is spent: outbound flows were cut and new ones are refused.
    budget_spent: bool,
}

fn now() -> Instant {
    Instant::now()
}

impl State {
    fn new(
        link: Box<dyn Link>,
        cfg: Config,
        poll: Poll,
        waker: Arc<Waker>,
        stats: Arc<Stats>,
        resolver_threads: bool,
    ) -> io::Result<State> {
        let mut link: Box<dyn Link> = Box::new(Counted {
            inner: link,
            stats: stats.clone(),
        });
        let mut rx = VecDeque::new();
        let mut tx = Vec::new();
        let mss = HashMap::new();
        let mut phy = Phy::new(&mut rx, &mut *link, &mut tx, cfg.mtu, &mss);
        let hw = HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC));
        let mut iface = Interface::new(IfaceConfig::new(hw), &mut phy, now());
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(
                IpAddress::Ipv4(addr::GATEWAY_V4),
                addr::PREFIX_V4,
            ));
            let _ = a.push(IpCidr::new(
                IpAddress::Ipv6(addr::GATEWAY_V6),
                addr::PREFIX_V6,
            ));
        });
        iface.set_any_ip(true);
        iface
            .routes_mut()
            .add_default_ipv4_route(addr::GATEWAY_V4)
            .map_err(|_| io::Error::other("route table full"))?;
        iface
            .routes_mut()
            .add_default_ipv6_route(addr::GATEWAY_V6)
            .map_err(|_| io::Error::other("route table full"))?;
        poll.registry()
            .register(&mut SourceFd(&link.raw_fd()), LINK, Interest::READABLE)?;
        let mut sockets = SocketSet::new(Vec::new());
        let mut dns_socks = Vec::new();
        for gw in [
            IpAddress::Ipv4(addr::GATEWAY_V4),
            IpAddress::Ipv6(addr::GATEWAY_V6),
        ] {
            let mut s = udp_socket();
            s.bind(IpListenEndpoint {
                addr: Some(gw),
                port: 53,
            })
            .map_err(|e| io::Error::other(format!("binding DNS: {e}")))?;
            dns_socks.push(sockets.add(s));
        }
        let (resolved_tx, resolved) = mpsc::channel();
        let resolving = Arc::new(AtomicU64::new(0));
        let resolvers = if resolver_threads {
            resolvers::Resolvers::start(
                &cfg.resolver,
                &resolved_tx,
                &waker,
                &resolving,
                cfg.seccomp,
            )?
        } else {
            resolvers::Resolvers::Inline
        };
        let routes = Routes::new().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("opening a netlink route socket (to tell the host's own addresses): {e}"),
            )
        })?;
        let mut cfg = cfg;
        let mut next_token = FIRST_FLOW;
        let (mut tcp_publish, mut udp_publish) = (Vec::new(), Vec::new());
        for p in std::mem::take(&mut cfg.publish) {
            let token = Token(next_token);
            next_token += 1;
            match p {
                Published::Tcp {
                    listener,
                    guest_port,
                    spec,
                } => {
                    listener.set_nonblocking(true)?;
                    let mut l = mio::net::TcpListener::from_std(listener);
                    poll.registry()
                        .register(&mut l, token, Interest::READABLE)?;
                    tcp_publish.push((l, guest_port, spec));
                }
                Published::Udp {
                    socket,
                    guest_port,
                    spec,
                } => {
                    socket.set_nonblocking(true)?;
                    let mut sock = UdpSocket::from_std(socket);
                    poll.registry()
                        .register(&mut sock, token, Interest::READABLE)?;
                    udp_publish.push(UdpPublish {
                        sock,
                        guest_port,
                        spec,
                        peers: HashMap::new(),
                    });
                }
            }
        }
        Ok(State {
            link,
            poll,
            stats,
            iface,
            sockets,
            rx,
            tx,
            mss,
            scratch: vec![0; 65536],
            tcp: HashMap::new(),
            udp_socks: HashMap::new(),
            udp: HashMap::new(),
            dns_socks,
            bindings: {
                let mut b = Bindings::new(4096);
                b.import(&cfg.dns_bindings, StdInstant::now());
                b
            },
            next_token,
            tcp_publish,
            udp_publish,
            next_port: EPHEMERAL_FIRST,
            resolved,
            resolved_tx,
            resolving,
            resolvers,
            pending_dns: Vec::new(),
            echo: HashMap::new(),
            sniffing: HashMap::new(),
            lookups: HashMap::new(),
            reap: Vec::new(),
            spare_tcp: Vec::new(),
            deferred: Vec::new(),
            attempt: 0,
            next_dns: 0,
            routes,
            orders: None,
            rate_in: cfg.rate_in.map(|r| TokenBucket::new(r, StdInstant::now())),
            rate_out: cfg.rate_out.map(|r| TokenBucket::new(r, StdInstant::now())),
            throttled: false,
            budget_spent: false,
            cfg,
        })
    }

    fn run(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        let mut buf = vec![0u8; rx_buffer_len(self.cfg.mtu)];
        while !stop.load(Ordering::Relaxed) {
            self.obey();
            let busy = self.round(&mut buf)?;
            let timeout = if busy {
                Some(Duration::ZERO)
            } else {
                let d = self
                    .iface
                    .poll_delay(now(), &self.sockets)
                    .map_or(Duration::from_millis(100), |d| {
                        Duration::from_micros(d.total_micros())
                    });
                let d = d.min(Duration::from_millis(100));
                // A throttled direction resumes when its bucket has refilled.
                let refill = [&self.rate_in, &self.rate_out]
                    .into_iter()
                    .flatten()
                    .map(TokenBucket::wait)
                    .filter(|w| !w.is_zero())
                    .min();
                Some(match refill {
                    Some(w) if self.throttled => d.min(w),
                    _ => d,
                })
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Carries out the orders waiting (a policy change).
    fn obey(&mut self) {
        loop {
            let order = match &self.orders {
                Some((rx, _)) => rx.try_recv(),
                None => return,
            };
            let (policy, done) = match order {
                Ok(Command::SetPolicy(policy, done)) => (policy, done),
                Ok(Command::Bindings(answer)) => {
                    let _ = answer.send(self.bindings.export(StdInstant::now()));
                    continue;
                }
                Err(_) => return,
            };
            self.cfg.policy = *policy;
            let changed = self.revoke();
            if let Some((_, shown)) = &self.orders {
                *shown.lock().unwrap_or_else(|e| e.into_inner()) = self.cfg.policy.clone();
            }
            tracing::info!(
                "netstack: policy changed; {} open flows ended, {} kept",
                changed.flows_cut,
                changed.flows_kept
            );
            let _ = done.send(changed);
        }
    }

    /// Decides every open flow the guest started again, under the policy now in force, and
    /// ends those it denies: the guest's side gets a reset, the host socket is closed, and
    /// the flow's log line says `denied` with the rule. Flows still waiting for their name
    /// (sniffing) are decided when it comes, by the new policy.
    fn revoke(&mut self) -> PolicyChanged {
        self.cut_where(|st, a| {
            let dst = IpEndpoint::new(IpAddress::from(a.dst.ip()), a.dst.port());
            let (d, _) = st.judge_named(a.proto, dst, a.names.clone(), false);
            (!d.allowed).then(|| format!("policy changed: {}", d.reason))
        })
    }

    /// Once the guest has sent its egress budget: every flow it opened is cut, and
    /// [`Self::judge_named`] refuses new ones.
    fn check_budget(&mut self) {
        let Some(budget) = self.cfg.egress_budget else {
            return;
        };
        if self.budget_spent || self.stats.bytes_from_guest.load(Ordering::Relaxed) < budget {
            return;
        }
        self.budget_spent = true;
        let why = format!("egress budget ({budget} bytes) spent");
        tracing::warn!("netstack: {why}: cutting the sandbox's flows and refusing new ones");
        self.cut_where(|_, _| Some(why.clone()));
    }

    /// Ends every flow the guest opened for which `why` gives a reason (inbound flows through
    /// published ports are never cut here).
    fn cut_where(&mut self, why: impl Fn(&State, &Audit) -> Option<String>) -> PolicyChanged {
        let again = |st: &State, a: &Audit| why(st, a);
        let mut kept = 0;
        let mut tcp = Vec::new();
        for (k, f) in &self.tcp {
            if f.audit.inbound {
                continue;
            }
            match again(self, &f.audit) {
                Some(why) => tcp.push((*k, why)),
                None => kept += 1,
            }
        }
        let mut udp = Vec::new();
        for (k, f) in &self.udp {
            match again(self, &f.audit) {
                Some(why) => udp.push((*k, why)),
                None => kept += 1,
            }
        }
        let mut echo = Vec::new();
        for (k, f) in &self.echo {
            match again(self, &f.audit) {
                Some(why) => echo.push((*k, why)),
                None => kept += 1,
            }
        }
        let cut = tcp.len() + udp.len() + echo.len();
        for (key, why) in tcp {
            if let Some(mut f) = self.tcp.remove(&key) {
                f.audit.rule = why;
                self.log(f.audit.event("denied"));
                let _ = self.poll.registry().deregister(&mut f.stream);
                if let Some(h) = f.handle {
                    self.sockets.get_mut::<tcp::Socket>(h).abort();
                    // After the next poll, which sends the reset.
                    self.reap.push((h, false));
                }
            }
        }
        for (key, why) in udp {
            if let Some(mut a) = self.end_udp(&key) {
                a.rule = why;
                self.log(a.event("denied"));
            }
        }
        for (key, why) in echo {
            if let Some(mut a) = self.end_echo(&key) {
                a.rule = why;
                self.log(a.event("denied"));
            }
        }
        self.stats
            .flows_cut
            .fetch_add(cut as u64, Ordering::Relaxed);
        PolicyChanged {
            flows_cut: cut,
            flows_kept: kept,
        }
    }

    /// Takes a batch of guest frames and runs one step; whether there is more to do at once.
    /// Small batches (32 frames, 2 MiB at the largest MTU) keep ACKs flowing back while many
    /// streams send: with 256, eight guest→host streams ran at half the rate.
    fn round(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        for (frame, n) in std::mem::take(&mut self.deferred) {
            self.attempt = n.saturating_add(1);
            if let Some(frame) = self.inspect(frame) {
                self.rx.push_back(frame);
            }
        }
        self.attempt = 0;
        self.throttled = false;
        for _ in 0..32 {
            // Over the rate, the frames wait in the card's queue; the guest's TCP slows down.
            if self.rate_out.allowance(&mut self.throttled).is_none() {
                break;
            }
            match self.link.recv(buf)? {
                Some(0) => continue,
                Some(n) => {
                    self.rate_out.spend(n);
                    let frame = buf[..n.min(buf.len())].to_vec();
                    if let Some(frame) = self.inspect(frame) {
                        self.rx.push_back(frame);
                    }
                }
                None => break,
            }
        }
        self.check_budget();
        let busy = self.step();
        Ok((busy && !self.throttled) || !self.rx.is_empty() || !self.deferred.is_empty())
    }

    /// smoltcp's turn: guest frames in, frames for the guest out through the link.
    fn poll_iface(&mut self) {
        let mut phy = Phy::new(
            &mut self.rx,
            &mut *self.link,
            &mut self.tx,
            self.cfg.mtu,
            &self.mss,
        );
        self.iface.poll(now(), &mut phy, &mut self.sockets);
    }

    /// One round: smoltcp, then every relay, then smoltcp again for what they queued.
    fn step(&mut self) -> bool {
        self.poll_iface();
        let mut busy = self.serve_dns();
        busy |= self.accept_published();
        busy |= self.relay_published_udp();
        busy |= self.sniff_tcp();
        busy |= self.relay_tcp();
        busy |= self.relay_udp();
        busy |= self.relay_echo();
        self.poll_iface();
        for (h, reuse) in self.reap.drain(..) {
            let socket = self.sockets.remove(h);
            if let (true, smoltcp::socket::Socket::Tcp(mut t)) = (reuse, socket) {
                if self.spare_tcp.len() < SPARE_TCP {
                    t.abort();
                    self.spare_tcp.push(t);
                }
            }
        }
        self.stats
            .flows_open
            .store(self.flows() as u64, Ordering::Relaxed);
        busy
    }

    /// Registers a host socket with the poller under a token of its own.
    fn watch(&mut self, s: &mut impl mio::event::Source, interest: Interest) -> io::Result<()> {
        let t = Token(self.next_token);
        self.next_token += 1;
        self.poll.registry().register(s, t, interest)
    }

    fn flows(&self) -> usize {
        self.tcp.len()
            + self.udp.len()
            + self.echo.len()
            + self.sniffing.len()
            + self
                .udp_publish
                .iter()
                .map(|p| p.peers.len())
                .sum::<usize>()
    }

    /// Decides a new flow and logs it if denied.
    fn decide(&self, proto: Proto, dst: IpEndpoint) -> (Decision, Audit) {
        let (d, audit) = self.judge(proto, dst, None);
        if !d.allowed {
            self.log(audit.event("denied"));
        }
        (d, audit)
    }

    /// Whether the host kernel delivers `ip` (canonical) to itself, asked now so that an
    /// address the host gained since the sandbox started counts. The gateway and the loopback
    /// range are decided without asking; an address that cannot be asked about is taken as the
    /// host's (fails closed).
    fn delivery(&self, ip: IpAddr) -> Delivery {
        if matches!(addr::group_of(ip), Group::Host | Group::Loopback) || !is_unicast_std(ip) {
            return Delivery::Elsewhere;
        }
        self.routes.delivery(ip).unwrap_or_else(|e| {
            tracing::warn!("netstack: asking the kernel how it routes {ip} failed ({e}); treating it as the host's");
            Delivery::Local
        })
    }

    /// The decision for a flow to `dst`, named by the sandbox's DNS answers for it and by
    /// `sniffed` (its TLS server name or HTTP Host), with the audit record it starts.
    fn judge(&self, proto: Proto, dst: IpEndpoint, sniffed: Option<&str>) -> (Decision, Audit) {
        let mut names = Vec::new();
        if let Some(n) = sniffed {
            names.push(n.to_string());
        }
        self.judge_named(proto, dst, names, true)
    }

    /// The decision for a flow to `dst` known by `names` and by the sandbox's DNS answers for
    /// it. `new`: a flow being opened (the flow limit applies), else an open flow decided again.
    fn judge_named(
        &self,
        proto: Proto,
        dst: IpEndpoint,
        extra: Vec<String>,
        new: bool,
    ) -> (Decision, Audit) {
        let ip = to_std(dst.addr);
        let mut names: Vec<String> = self
            .bindings
            .names(ip, StdInstant::now())
            .into_iter()
            .map(String::from)
            .collect();
        for n in extra {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let canon = addr::canonical(ip);
        let delivery = self.delivery(canon);
        let local = delivery == Delivery::Local;
        let group = addr::group_at(canon, local);
        let mut d = self.cfg.policy.decide(&Flow {
            proto,
            ip,
            port: (proto != Proto::Icmp).then_some(dst.port),
            names: &refs,
            local,
        });
        // DNS goes through the gateway: other resolvers only by an explicit rule.
        if d.allowed && !d.by_rule && proto != Proto::Icmp && dst.port == 53 && group != Group::Host
        {
            d = Decision {
                allowed: false,
                by_rule: false,
                reason: "DNS goes through the gateway (allow a resolver by a rule)".into(),
            };
        }
        // Multicast and broadcast (the host's subnet broadcasts too) reach every listener on a
        // network, the host's included: never relayed, whatever the rules.
        if !is_unicast_std(canon) || matches!(delivery, Delivery::Broadcast | Delivery::Multicast) {
            d = Decision {
                allowed: false,
                by_rule: false,
                reason: format!("{canon} is a multicast or broadcast address (never relayed)"),
            };
        }
        // The guest's own loopback and unspecified addresses are never relayed.
        if group == Group::Loopback || ip.is_unspecified() {
            d = Decision {
                allowed: false,
                by_rule: false,
                reason: "loopback is the guest's own".into(),
            };
        }
        if new && d.allowed && self.budget_spent {
            d = Decision {
                allowed: false,
                by_rule: false,
                reason: format!(
                    "egress budget ({} bytes) spent",
                    self.cfg.egress_budget.unwrap_or(0)
                ),
            };
        }
        if new && d.allowed && self.flows() >= self.cfg.max_flows {
            d = Decision {
                allowed: false,
                by_rule: false,
                reason: format!("connection limit ({})", self.cfg.max_flows),
            };
        }
        if new && d.allowed {
            if let Some(l) = &self.cfg.learn {
                l.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .flow(crate::learn::Observed {
                        proto,
                        ip: canon,
                        port: (proto != Proto::Icmp).then_some(dst.port),
                        names: names.clone(),
                    });
            }
        }
        let audit = Audit {
            proto,
            dst: SocketAddr::new(ip, dst.port),
            group,
            names,
            rule: d.reason.clone(),
            started: StdInstant::now(),
            bytes_out: 0,
            bytes_in: 0,
            inbound: false,
        };
        (d, audit)
    }

    fn log(&self, e: LogEvent) {
        if let Some(hook) = &self.cfg.log {
            hook(&e);
        }
    }

    /// Looks at a guest frame before smoltcp does: a new TCP connection or UDP flow is
    /// decided here, and if allowed gets its smoltcp socket so smoltcp accepts it. Returns
    /// the frame unless it is held (a SYN waiting for its host connection).
    fn inspect(&mut self, mut frame: Vec<u8>) -> Option<Vec<u8>> {
        if self.link.offloads() {
            if let Some((ends, mss)) = offload::raise_mss(&mut frame) {
                self.remember_mss(ends, mss);
            }
        }
        let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let (src, dst, proto, payload): (IpAddress, IpAddress, IpProtocol, &[u8]) =
            match eth.ethertype() {
                EthernetProtocol::Ipv4 => {
                    let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        return None;
                    };
                    if ip.more_frags() || ip.frag_offset() != 0 {
                        return Some(frame);
                    }
                    (
                        IpAddress::Ipv4(ip.src_addr()),
                        IpAddress::Ipv4(ip.dst_addr()),
                        ip.next_header(),
                        ip.payload(),
                    )
                }
                EthernetProtocol::Ipv6 => {
                    let Ok(ip) = Ipv6Packet::new_checked(eth.payload()) else {
                        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        return None;
                    };
                    (
                        IpAddress::Ipv6(ip.src_addr()),
                        IpAddress::Ipv6(ip.dst_addr()),
                        ip.next_header(),
                        ip.payload(),
                    )
                }
                _ => return Some(frame),
            };
        match proto {
            IpProtocol::Tcp => {
                let Ok(tcp) = TcpPacket::new_checked(payload) else {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    return None;
                };
                if !tcp.syn() || tcp.ack() {
                    return Some(frame);
                }
                let key = (
                    IpEndpoint::new(src, tcp.src_port()),
                    IpEndpoint::new(dst, tcp.dst_port()),
                );
                match self.tcp.get(&key) {
                    // A retransmitted SYN while the host connection is being made.
                    Some(f) if f.handle.is_none() => return None,
                    Some(f) => {
                        // A new SYN on a tuple whose old connection is not finished here yet
                        // (the guest reusing its port: the old one's RST or last ACK may be
                        // in this very batch): tried again next round, once, when the old
                        // flow has ended. Otherwise smoltcp answers it as RFC 5961 says.
                        let st = f.handle.map(|h| self.sockets.get::<tcp::Socket>(h).state());
                        if self.attempt == 0 && st != Some(tcp::State::SynReceived) {
                            self.defer(frame);
                            return None;
                        }
                    }
                    // One guest connection at a time is accepted per destination (see
                    // `listen_pending`); the others wait a round.
                    None if listen_pending(&self.sockets, key.1) => {
                        self.defer(frame);
                        return None;
                    }
                    None => return self.open_tcp(key, frame),
                }
            }
            IpProtocol::Udp => {
                let Ok(udp) = UdpPacket::new_checked(payload) else {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    return None;
                };
                let dst = IpEndpoint::new(dst, udp.dst_port());
                if is_gateway(dst.addr) && dst.port == 53 {
                    return Some(frame);
                }
                let key = (IpEndpoint::new(src, udp.src_port()), dst);
                if !self.udp.contains_key(&key) {
                    self.open_udp(key);
                }
            }
            IpProtocol::Icmp | IpProtocol::Icmpv6 if !is_gateway(dst) && is_unicast(dst) => {
                let (mac, payload) = (eth.src_addr(), payload.to_vec());
                if self.echo_request(mac, src, dst, &payload) {
                    return None;
                }
            }
            _ => {}
        }
        Some(frame)
    }

    /// Keeps the MSS a guest connection asked for (bounded: entries of connections that are
    /// gone are dropped once there are more than flows allow).
    fn remember_mss(&mut self, ends: TcpEnds, mss: u16) {
        if self.mss.len() >= 2 * self.cfg.max_flows + 64 {
            let open: std::collections::HashSet<TcpEnds> = self
                .tcp
                .keys()
                .chain(self.sniffing.keys())
                .map(|(g, r)| {
                    (
                        (IpAddr::from(g.addr), g.port),
                        (IpAddr::from(r.addr), r.port),
                    )
                })
                .collect();
            self.mss.retain(|k, _| open.contains(k));
        }
        self.mss.insert(ends, mss);
    }

    /// Decides a new connection; if allowed, starts the host connection and holds the SYN.
    fn open_tcp(&mut self, key: FlowKey, syn: Vec<u8>) -> Option<Vec<u8>> {
        let (guest, dst) = key;
        let (d, audit) = self.judge(Proto::Tcp, dst, None);
        if !d.allowed && self.may_sniff(&d, dst, audit.group) {
            // A domain rule may still allow it by the name its first bytes carry.
            if let Some(h) =
                Self::accept_tcp(&mut self.sockets, &mut self.spare_tcp, dst, &self.stats)
            {
                tracing::debug!("netstack: tcp {dst} {d}; waiting for its TLS or HTTP name");
                self.sniffing
                    .insert(key, sniffing::SniffFlow::new(h, audit));
                return Some(syn);
            }
        }
        if !d.allowed {
            self.log(audit.event("denied"));
            tracing::debug!("netstack: tcp {dst} {d}");
            self.stats.tcp_denied.fetch_add(1, Ordering::Relaxed);
            return Some(syn); // no socket: smoltcp answers the SYN with a reset
        }
        let target = host_target(dst);
        let mut stream = match TcpStream::connect(target) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("netstack: connecting to {target}: {e}");
                return Some(syn);
            }
        };
        // What the guest sent is written at once: its own stack already decided when to send
        // (Nagle here would hold a TLS handshake's second flight for the first one's ACK).
        let _ = stream.set_nodelay(true);
        if let Err(e) = self.watch(&mut stream, Interest::READABLE | Interest::WRITABLE) {
            tracing::warn!("netstack: tcp {dst}: watching the host connection: {e}");
            return Some(syn);
        }
        self.stats.tcp_allowed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("netstack: tcp {guest} -> {dst} via {target}: {d}");
        let mut flow = TcpFlow::new(stream, None, Some(syn), false, audit);
        flow.inspect_until = self.inspect_deadline(dst);
        flow.mitm = self.mitm_for(dst);
        flow.scanner = self.scanner();
        self.tcp.insert(key, flow);
        None
    }

    /// Holds a SYN for the next round. A listener whose own SYN never arrives (smoltcp
    /// dropped it) would hold others forever, and the loop spins while frames wait: after
    /// [`MAX_DEFERRALS`] rounds the SYN is dropped and the guest's retransmission tries again.
    fn defer(&mut self, frame: Vec<u8>) {
        if self.attempt >= MAX_DEFERRALS {
            tracing::debug!("netstack: a SYN waited {MAX_DEFERRALS} rounds; dropped");
            return;
        }
        self.deferred.push((frame, self.attempt));
    }

    /// The guest-side socket for a flow whose host connection is up.
    fn accept_tcp(
        sockets: &mut SocketSet<'static>,
        spare: &mut Vec<tcp::Socket<'static>>,
        dst: IpEndpoint,
        stats: &Stats,
    ) -> Option<SocketHandle> {
        let mut s = spare_or_new(spare, stats);
        s.listen(IpListenEndpoint {
            addr: Some(dst.addr),
            port: dst.port,
        })
        .ok()?;
        Some(sockets.add(s))
    }

    fn open_udp(&mut self, key: FlowKey) {
        let (guest, dst) = key;
        let (mut d, mut audit) = self.judge(Proto::Udp, dst, None);
        // QUIC carries TLS inside UDP, where nothing can be intercepted: refused on the
        // intercepted ports, so clients fall back to TCP.
        if d.allowed
            && self
                .cfg
                .intercept
                .as_ref()
                .is_some_and(|i| i.ports.contains(&dst.port))
        {
            d.allowed = false;
            d.reason = format!("UDP to port {} (QUIC) while TLS is intercepted", dst.port);
            audit.rule = d.reason.clone();
        }
        if !d.allowed {
            self.log(audit.event("denied"));
            self.stats.udp_denied.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let target = host_target(dst);
        let bind: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(mut sock) = UdpSocket::bind(bind) else {
            return;
        };
        if sock.connect(target).is_err() {
            return;
        }
        if self.watch(&mut sock, Interest::READABLE).is_err() {
            return;
        }
        let handle = match self.udp_socks.get(&dst) {
            Some(h) => *h,
            None => {
                let mut s = udp_socket();
                if s.bind(IpListenEndpoint {
                    addr: Some(dst.addr),
                    port: dst.port,
                })
                .is_err()
                {
                    return;
                }
                let h = self.sockets.add(s);
                self.udp_socks.insert(dst, h);
                h
            }
        };
        self.stats.udp_allowed.fetch_add(1, Ordering::Relaxed);
        self.udp.insert(
            key,
            UdpFlow {
                sock,
                handle,
                guest,
                last: StdInstant::now(),
                audit,
            },
        );
    }

    /// A gateway port no flow into the guest uses.
    fn ephemeral(&mut self) -> u16 {
        loop {
            let p = self.next_port;
            self.next_port = if p == u16::MAX {
                EPHEMERAL_FIRST
            } else {
                p + 1
            };
            let used = self
                .tcp
                .keys()
                .any(|(_, l)| l.port == p && is_gateway(l.addr))
                || self
                    .udp_publish
                    .iter()
                    .flat_map(|u| u.peers.values())
                    .any(|(h, _, _)| self.sockets.get::<udp::Socket>(*h).endpoint().port == p);
            if !used {
                return p;
            }
        }
    }

    /// Connections to published TCP ports become connections from the gateway to the guest.
    fn accept_published(&mut self) -> bool {
        let mut busy = false;
        for i in 0..self.tcp_publish.len() {
            loop {
                let (mut stream, peer) = match self.tcp_publish[i].0.accept() {
                    Ok(x) => x,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!("netstack: accepting on a published port: {e}");
                        break;
                    }
                };
                busy = true;
                let (guest_port, spec) = (self.tcp_publish[i].1, self.tcp_publish[i].2.clone());
                let guest = IpEndpoint::new(IpAddress::Ipv4(addr::GUEST_V4), guest_port);
                let mut audit = Audit::published(Proto::Tcp, guest_port, peer, spec);
                if self.flows() >= self.cfg.max_flows {
                    audit.rule = format!("connection limit ({})", self.cfg.max_flows);
                    self.log(audit.event("denied"));
                    continue;
                }
                let port = self.ephemeral();
                let mut s = spare_or_new(&mut self.spare_tcp, &self.stats);
                let local = IpListenEndpoint {
                    addr: Some(IpAddress::Ipv4(addr::GATEWAY_V4)),
                    port,
                };
                if s.connect(self.iface.context(), guest, local).is_err() {
                    continue;
                }
                if self
                    .watch(&mut stream, Interest::READABLE | Interest::WRITABLE)
                    .is_err()
                {
                    continue;
                }
                let handle = self.sockets.add(s);
                self.stats
                    .published_accepted
                    .fetch_add(1, Ordering::Relaxed);
                self.tcp.insert(
                    (
                        guest,
                        IpEndpoint::new(IpAddress::Ipv4(addr::GATEWAY_V4), port),
                    ),
                    TcpFlow::new(stream, Some(handle), None, true, audit),
                );
            }
        }
        busy
    }

    /// Datagrams to published UDP ports, and the guest's answers back to each peer.
    fn relay_published_udp(&mut self) -> bool {
        let mut busy = false;
        let mut tmp = std::mem::take(&mut self.scratch);
        for i in 0..self.udp_publish.len() {
            // Host peers to the guest.
            while let Ok((n, peer)) = self.udp_publish[i].sock.recv_from(&mut tmp) {
                busy = true;
                if !self.udp_publish[i].peers.contains_key(&peer) {
                    if self.flows() >= self.cfg.max_flows {
                        continue;
                    }
                    let port = self.ephemeral();
                    let mut s = udp_socket();
                    if s.bind(IpListenEndpoint {
                        addr: Some(IpAddress::Ipv4(addr::GATEWAY_V4)),
                        port,
                    })
                    .is_err()
                    {
                        continue;
                    }
                    let handle = self.sockets.add(s);
                    let p = &mut self.udp_publish[i];
                    let audit = Audit::published(Proto::Udp, p.guest_port, peer, p.spec.clone());
                    p.peers.insert(peer, (handle, StdInstant::now(), audit));
                    self.stats
                        .published_accepted
                        .fetch_add(1, Ordering::Relaxed);
                }
                let p = &mut self.udp_publish[i];
                let guest = IpEndpoint::new(IpAddress::Ipv4(addr::GUEST_V4), p.guest_port);
                if !self.rate_in.police(n) {
                    continue;
                }
                if let Some((handle, last, audit)) = p.peers.get_mut(&peer) {
                    let s = self.sockets.get_mut::<udp::Socket>(*handle);
                    if s.send_slice(&tmp[..n], guest).is_ok() {
                        audit.bytes_in += n as u64;
                    }
                    *last = StdInstant::now();
                }
            }
            // The guest's answers to each peer; idle peers expire.
            let now_std = StdInstant::now();
            let mut expired = Vec::new();
            let p = &mut self.udp_publish[i];
            for (peer, (handle, last, audit)) in p.peers.iter_mut() {
                let s = self.sockets.get_mut::<udp::Socket>(*handle);
                while let Ok((n, _)) = s.recv_slice(&mut tmp) {
                    busy = true;
                    *last = now_std;
                    if p.sock.send_to(&tmp[..n], *peer).is_ok() {
                        audit.bytes_out += n as u64;
                    }
                }
                if now_std.duration_since(*last) > UDP_IDLE {
                    expired.push(*peer);
                }
            }
            for peer in expired {
                if let Some((handle, _, audit)) = self.udp_publish[i].peers.remove(&peer) {
                    self.sockets.remove(handle);
                    self.log(audit.event("allowed"));
                }
            }
        }
        self.scratch = tmp;
        busy
    }

    fn relay_tcp(&mut self) -> bool {
        let mut busy = false;
        let mut dead = Vec::new();
        // `tls` audit lines and placeholder violations, written after the pass.
        let mut tls_lines: Vec<(FlowKey, Option<String>, &'static str, String)> = Vec::new();
        let block = self
            .cfg
            .intercept
            .as_ref()
            .is_some_and(|i| i.block_violations);
        let mut violations: Vec<(FlowKey, usize)> = Vec::new();
        let handshake_timeout = self.cfg.handshake_timeout;
        let policy = &self.cfg.policy;
        for (key, f) in self.tcp.iter_mut() {
            if !f.connected {
                let failed = match f.stream.take_error() {
                    Ok(Some(_)) | Err(_) => true,
                    Ok(None) => match f.stream.peer_addr() {
                        Ok(_) => false,
                        // Still connecting; the guest has long given up after this.
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                            if f.since.elapsed() < handshake_timeout {
                                continue;
                            }
                            true
                        }
                        Err(_) => true,
                    },
                };
                busy = true;
                if !failed && f.handle.is_none() && listen_pending(&self.sockets, key.1) {
                    continue;
                }
                let syn = f.syn.take();
                if failed {
                    tracing::debug!(
                        "netstack: tcp {} -> {}: the host connection failed",
                        key.0,
                        key.1
                    );
                    match (syn, f.handle) {
                        // Refused by the host: the held SYN meets no socket and is reset.
                        (Some(syn), _) => self.rx.push_front(syn),
                        // The guest's side was already up (a flow admitted by its name).
                        (None, Some(h)) => self.sockets.get_mut::<tcp::Socket>(h).abort(),
                        (None, None) => {}
                    }
                    dead.push(*key);
                    continue;
                }
                f.connected = true;
                if f.handle.is_none() {
                    f.handle = Self::accept_tcp(
                        &mut self.sockets,
                        &mut self.spare_tcp,
                        key.1,
                        &self.stats,
                    );
                    if f.handle.is_none() {
                        dead.push(*key);
                    }
                }
                if let Some(syn) = syn {
                    self.rx.push_front(syn);
                }
                continue;
            }
            let Some(handle) = f.handle else { continue };
            let s = self.sockets.get_mut::<tcp::Socket>(handle);
            // A handshake the guest never finishes (a SYN flood's half-open connections).
            if !f.established
                && matches!(
                    s.state(),
                    tcp::State::SynReceived | tcp::State::SynSent | tcp::State::Listen
                )
                && f.since.elapsed() > handshake_timeout
            {
                tracing::debug!("netstack: tcp {} -> {}: handshake timed out", key.0, key.1);
                self.stats.tcp_timed_out.fetch_add(1, Ordering::Relaxed);
                s.abort();
                dead.push(*key);
                continue;
            }
            // Past the handshake (data and FIN may have come in the same poll).
            if !matches!(
                s.state(),
                tcp::State::Listen
                    | tcp::State::SynReceived
                    | tcp::State::SynSent
                    | tcp::State::Closed
            ) {
                f.established = true;
            }
            // The first bytes, held until read for a name a deny rule refuses.
            if let Some(until) = f.inspect_until {
                match sniffing::inspect(s, until, policy, key.1, &mut f.audit) {
                    sniffing::Inspected::Wait => {}
                    sniffing::Inspected::Pass => f.inspect_until = None,
                    sniffing::Inspected::Refuse(reason) => {
                        tracing::debug!("netstack: tcp {} -> {}: {reason}", key.0, key.1);
                        f.audit.rule = reason;
                        f.denied = true;
                        s.abort();
                        dead.push(*key);
                        continue;
                    }
                }
            }
            if f.inspect_until.is_none() && f.mitm.is_some() {
                let (ip, port, local) =
                    (to_std(key.1.addr), key.1.port, f.audit.group == Group::Host);
                let mut admit = |r: &crate::http1::Request| match &r.host {
                    None => true,
                    Some(h) => {
                        policy
                            .decide(&Flow {
                                proto: Proto::Tcp,
                                ip,
                                port: Some(port),
                                names: &[h.as_str()],
                                local,
                            })
                            .allowed
                    }
                };
                let m = f.mitm.as_mut().expect("checked");
                let mut r = intercepting::relay(
                    s,
                    &mut f.stream,
                    m,
                    f.established,
                    &mut admit,
                    &mut f.audit,
                    (&mut self.rate_in, &mut self.throttled),
                );
                // An upstream (or guest) that never finishes its TLS handshake: the guest gets
                // a reset in bounded time.
                if matches!(r, intercepting::Relayed::Busy(_))
                    && !m.mitm().is_open()
                    && f.since.elapsed() > handshake_timeout
                {
                    r = intercepting::Relayed::Fail(format!(
                        "TLS handshake not done after {} s",
                        handshake_timeout.as_secs_f64()
                    ));
                }
                let name = m.mitm().server_name().map(String::from);
                match r {
                    intercepting::Relayed::Busy(b) => {
                        busy |= b;
                        if !m.announced && m.mitm().is_open() {
                            m.announced = true;
                            tls_lines.push((*key, name, "intercepted", "upstream verified".into()));
                        }
                        if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                            dead.push(*key);
                        }
                        continue;
                    }
                    intercepting::Relayed::Bypass(raw, why) => {
                        tls_lines.push((*key, name, "bypassed", why.to_string()));
                        if f.stream.write_all(&raw).is_err() {
                            s.abort();
                            dead.push(*key);
                            continue;
                        }
                        f.audit.bytes_out += raw.len() as u64;
                        f.mitm = None;
                        busy = true;
                    }
                    intercepting::Relayed::Fail(reason) => {
                        tracing::debug!("netstack: tls {} -> {}: {reason}", key.0, key.1);
                        tls_lines.push((*key, name, "failed", reason.clone()));
                        f.audit.rule = reason;
                        f.denied = true;
                        s.abort();
                        dead.push(*key);
                        continue;
                    }
                }
            }
            // Guest to host, straight from smoltcp's buffer, as fast as the host takes it
            // (scanned for placeholders first when secrets exist).
            let secrets = self.cfg.intercept.as_ref().map(|i| &i.secrets);
            let mut violation = None;
            while f.inspect_until.is_none() && s.can_recv() && violation.is_none() {
                match s.recv(|buf| {
                    if let (Some(sc), Some(secrets)) = (f.scanner.as_mut(), secrets) {
                        let new = &buf[f.scanned.min(buf.len())..];
                        if let Some(i) = sc.scan(secrets, new) {
                            violation = Some(i);
                            if block {
                                return (0, Err(io::Error::other("placeholder")));
                            }
                        }
                        f.scanned += new.len();
                    }
                    match f.stream.write(buf) {
                        Ok(n) => {
                            f.scanned = f.scanned.saturating_sub(n);
                            (n, Ok(n))
                        }
                        Err(e) => (0, Err(e)),
                    }
                }) {
                    Ok(Ok(n)) => {
                        f.audit.bytes_out += n as u64;
                        busy = true;
                    }
                    Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Ok(Err(_)) => {
                        s.abort();
                        dead.push(*key);
                        break;
                    }
                    Err(_) => break,
                }
            }
            if let Some(i) = violation {
                violations.push((*key, i));
                if block {
                    f.denied = true;
                    if let Some(secrets) = secrets {
                        f.audit.rule = format!(
                            "placeholder of secret {} on a flow no secret may use",
                            secrets.get(i).name()
                        );
                    }
                    continue;
                }
            }
            // The guest's FIN, carried to the host once everything before it is written.
            if f.established && !f.shut_wr && !s.may_recv() && !s.can_recv() {
                let _ = f.stream.shutdown(std::net::Shutdown::Write);
                f.shut_wr = true;
            }
            // Host to guest, straight into smoltcp's buffer, while it has room (and the rate
            // allows: what it does not stays in the host socket, and TCP slows the sender).
            while !f.host_eof && s.can_send() {
                let Some(cap) = self.rate_in.allowance(&mut self.throttled) else {
                    break;
                };
                let r = s.send(|buf| {
                    let len = buf.len().min(cap);
                    let buf = &mut buf[..len];
                    if buf.is_empty() {
                        return (0, None);
                    }
                    match f.stream.read(buf) {
                        Ok(n) => (n, Some(Ok(n))),
                        Err(e) => (0, Some(Err(e))),
                    }
                });
                match r {
                    Ok(None) | Err(_) => break,
                    Ok(Some(Ok(0))) => {
                        f.host_eof = true;
                        s.close();
                        busy = true;
                    }
                    Ok(Some(Ok(n))) => {
                        f.audit.bytes_in += n as u64;
                        self.rate_in.spend(n);
                        busy = true;
                    }
                    Ok(Some(Err(e))) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Ok(Some(Err(e))) if e.kind() == io::ErrorKind::Interrupted => {}
                    Ok(Some(Err(_))) => {
                        // A reset from the host resets the guest's connection.
                        s.abort();
                        dead.push(*key);
                        break;
                    }
                }
            }
            // The socket exists only once the SYN is injected, so Closed means finished.
            if matches!(s.state(), tcp::State::Closed | tcp::State::TimeWait) {
                dead.push(*key);
            }
        }
        for (key, name, verdict, rule) in tls_lines {
            if let Some(f) = self.tcp.get(&key) {
                self.log_tls(&f.audit, name.as_deref(), verdict, rule);
            }
        }
        for (key, i) in violations {
            if let (Some(f), Some(cfg)) = (self.tcp.get(&key), self.cfg.intercept.as_ref()) {
                let verdict = if block { "blocked" } else { "logged" };
                let dst = f.audit.dst.to_string();
                self.log_secret(cfg.secrets.get(i).name(), &dst, "tcp", verdict, 1);
            }
        }
        for key in dead {
            if let Some(mut f) = self.tcp.remove(&key) {
                if let Some(m) = &f.mitm {
                    self.log_substitutions(m, &f.audit);
                }
                // A flow the host refused never carried anything; it is logged as it ends.
                let ev = f.audit.event(if f.denied { "denied" } else { "allowed" });
                self.log(ev);
                let _ = self.poll.registry().deregister(&mut f.stream);
                if let Some(h) = f.handle {
                    // After the next poll, which sends the reset of an aborted socket.
                    let short = f.audit.bytes_in.max(f.audit.bytes_out) <= SPARE_TCP_BYTES;
                    self.reap.push((h, short));
                }
            }
        }
        busy
    }

    fn relay_udp(&mut self) -> bool {
        let mut busy = false;
        let mut tmp = std::mem::take(&mut self.scratch);
        // Guest datagrams to their flow's host socket.
        let by_dst: Vec<(IpEndpoint, SocketHandle)> =
            self.udp_socks.iter().map(|(k, v)| (*k, *v)).collect();
        for (dst, handle) in by_dst {
            let s = self.sockets.get_mut::<udp::Socket>(handle);
            while let Ok((n, meta)) = s.recv_slice(&mut tmp) {
                busy = true;
                if let Some(f) = self.udp.get_mut(&(meta.endpoint, dst)) {
                    let to = f.audit.dst.to_string();
                    if intercepting::datagram_violates(&self.cfg, &tmp[..n], &to, "udp") {
                        continue;
                    }
                    if f.sock.send(&tmp[..n]).is_ok() {
                        f.audit.bytes_out += n as u64;
                    }
                    f.last = StdInstant::now();
                }
            }
        }
        // Host datagrams back to the guest.
        let now_std = StdInstant::now();
        let mut dead = Vec::new();
        for (key, f) in self.udp.iter_mut() {
            let s = self.sockets.get_mut::<udp::Socket>(f.handle);
            while let Ok(n) = f.sock.recv(&mut tmp) {
                busy = true;
                f.last = now_std;
                // Over the rate, a datagram is dropped (as a policer would).
                if !self.rate_in.police(n) {
                    continue;
                }
                if s.can_send() && s.send_slice(&tmp[..n], f.guest).is_ok() {
                    f.audit.bytes_in += n as u64;
                }
            }
            if now_std.duration_since(f.last) > UDP_IDLE {
                dead.push(*key);
            }
        }
        for key in dead {
            if let Some(a) = self.end_udp(&key) {
                self.log(a.event("allowed"));
            }
        }
        self.scratch = tmp;
        busy
    }

    /// Ends a UDP flow: its host socket goes, and the guest-side socket too once no other
    /// flow shares it. Returns the flow's audit record for the caller to log.
    fn end_udp(&mut self, key: &FlowKey) -> Option<Audit> {
        let mut f = self.udp.remove(key)?;
        let _ = self.poll.registry().deregister(&mut f.sock);
        if !self.udp.values().any(|g| g.handle == f.handle) {
            self.udp_socks.remove(&key.1);
            self.sockets.remove(f.handle);
        }
        Some(f.audit)
    }

    fn serve_dns(&mut self) -> bool {
        let mut busy = false;
        let mut tmp = vec![0u8; dns::MAX_MESSAGE];
        for &handle in &self.dns_socks.clone() {
            loop {
                let s = self.sockets.get_mut::<udp::Socket>(handle);
                let Ok((n, meta)) = s.recv_slice(&mut tmp) else {
                    break;
                };
                busy = true;
                let msg = &tmp[..n];
                let gw = SocketAddr::new(IpAddr::V4(addr::GATEWAY_V4), 53).to_string();
                if intercepting::datagram_violates(&self.cfg, msg, &gw, "udp") {
                    if let Some(r) = dns::error_response(msg, dns::RCODE_REFUSED) {
                        let _ = s.send_slice(&r, meta.endpoint);
                    }
                    continue;
                }
                let q = match dns::parse_query(msg) {
                    Ok(q) => q,
                    Err(_) => {
                        if let Some(r) = dns::error_response(msg, dns::RCODE_FORMERR) {
                            let _ = s.send_slice(&r, meta.endpoint);
                        }
                        continue;
                    }
                };
                let reply = match (&q.name, q.qtype) {
                    (None, _) => Some(dns::response(&q, dns::RCODE_REFUSED, &[])),
                    (Some(name), dns::TYPE_A | dns::TYPE_AAAA) => {
                        let d = self.cfg.policy.decide_name(name);
                        if !d.allowed {
                            self.log_dns(name, &d, &[]);
                            self.stats.dns_refused.fetch_add(1, Ordering::Relaxed);
                            Some(dns::response(&q, dns::RCODE_NXDOMAIN, &[]))
                        } else if self.resolving.load(Ordering::Relaxed) >= 64 {
                            Some(dns::response(&q, dns::RCODE_SERVFAIL, &[]))
                        } else {
                            self.resolve(handle, meta.endpoint, q.clone(), name.clone());
                            None
                        }
                    }
                    // Other types: an empty answer (we only serve addresses).
                    (Some(_), _) => Some(dns::response(&q, 0, &[])),
                };
                if let Some(r) = reply {
                    let s = self.sockets.get_mut::<udp::Socket>(handle);
                    let _ = s.send_slice(&r, meta.endpoint);
                }
            }
        }
        // Queries the resolver did not answer in time (a stuck thread stays counted in
        // `resolving`, which bounds how many there can be).
        let now_std = StdInstant::now();
        let (late, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_dns)
            .into_iter()
            .partition(|p| p.deadline <= now_std);
        self.pending_dns = waiting;
        for p in late {
            busy = true;
            let name = p.q.name.clone().unwrap_or_default();
            let d = Decision {
                allowed: false,
                by_rule: false,
                reason: format!("resolver timed out after {:?}", self.cfg.dns_timeout),
            };
            self.log_dns(&name, &d, &[]);
            let r = dns::response(&p.q, dns::RCODE_SERVFAIL, &[]);
            let s = self.sockets.get_mut::<udp::Socket>(p.handle);
            let _ = s.send_slice(&r, p.to);
        }
        // Answers the resolver threads finished (those still awaited).
        while let Ok((id, result)) = self.resolved.try_recv() {
            busy = true;
            if let Some(key) = self.lookups.remove(&id) {
                self.sniff_resolved(key, result);
                continue;
            }
            let Some(i) = self.pending_dns.iter().position(|p| p.id == id) else {
                continue;
            };
            let PendingDns { handle, to, q, .. } = self.pending_dns.swap_remove(i);
            let name = q.name.clone().unwrap_or_default();
            let want_v4 = q.qtype == dns::TYPE_A;
            let (rcode, answers) = match result {
                Err(_) => (dns::RCODE_NXDOMAIN, Vec::new()),
                Ok(ips) => {
                    let mut answers = Vec::new();
                    for ip in ips {
                        if ip.is_ipv4() != want_v4 {
                            continue;
                        }
                        let local = self.delivery(addr::canonical(ip)) == Delivery::Local;
                        let d = self.cfg.policy.decide_answer(&name, ip, local);
                        if d.allowed {
                            answers.push(Answer { ip, ttl: DNS_TTL });
                        } else {
                            // Each refused address is a denial of its own, with its reason.
                            self.log_dns(&name, &d, &[Answer { ip, ttl: 0 }]);
                        }
                    }
                    (0, answers)
                }
            };
            let now_std = StdInstant::now();
            for a in &answers {
                self.bindings.insert(&name, *a, now_std);
            }
            let d = self.cfg.policy.decide_name(&name);
            self.log_dns(&name, &d, &answers);
            self.stats.dns_answered.fetch_add(1, Ordering::Relaxed);
            if let (Some(l), false) = (&self.cfg.learn, answers.is_empty()) {
                l.lock().unwrap_or_else(|e| e.into_inner()).dns(&name);
            }
            let r = dns::response(&q, rcode, &answers);
            let s = self.sockets.get_mut::<udp::Socket>(handle);
            let _ = s.send_slice(&r, to);
        }
        busy
    }

    fn log_dns(&self, name: &str, d: &Decision, answers: &[Answer]) {
        tracing::debug!("netstack: dns {name}: {d}");
        let mut e = LogEvent::new(
            "dns",
            "udp",
            SocketAddr::new(IpAddr::V4(addr::GATEWAY_V4), 53).to_string(),
            if d.allowed { "allowed" } else { "denied" },
            d.reason.clone(),
        );
        e.names = vec![name.to_string()];
        e.answers = answers.iter().map(|a| a.ip.to_string()).collect();
        self.log(e);
    }

    /// Resolves on a thread of its own (the host resolver blocks), with a deadline.
    fn resolve(&mut self, handle: SocketHandle, to: IpEndpoint, q: dns::Query, name: String) {
        match self.lookup(name) {
            Some(id) => self.pending_dns.push(PendingDns {
                id,
                deadline: StdInstant::now() + self.cfg.dns_timeout,
                handle,
                to,
                q,
            }),
            None => {
                let r = dns::response(&q, dns::RCODE_SERVFAIL, &[]);
                let s = self.sockets.get_mut::<udp::Socket>(handle);
                let _ = s.send_slice(&r, to);
            }
        }
    }

    /// Hands `name` to the resolver threads; its answer comes back by id. `None` if they are
    /// gone.
    fn lookup(&mut self, name: String) -> Option<u64> {
        let id = self.next_dns;
        self.next_dns += 1;
        self.resolving.fetch_add(1, Ordering::Relaxed);
        match &self.resolvers {
            resolvers::Resolvers::Pool(jobs) => {
                if jobs.send((id, name)).is_err() {
                    self.resolving.fetch_sub(1, Ordering::Relaxed);
                    return None;
                }
            }
            resolvers::Resolvers::Inline => {
                let r = (self.cfg.resolver)(&name);
                self.resolving.fetch_sub(1, Ordering::Relaxed);
                let _ = self.resolved_tx.send((id, r));
            }
        }
        Some(id)
    }
}

impl Drop for State {
    /// Flows still open when the sandbox stops get their log lines too.
    fn drop(&mut self) {
        let events: Vec<LogEvent> = self
            .tcp
            .values()
            .map(|f| f.audit.event("allowed"))
            .chain(self.udp.values().map(|f| f.audit.event("allowed")))
            .chain(self.echo.values().map(|f| f.audit.event("allowed")))
            .chain(self.sniffing.values().map(|f| f.audit.event("denied")))
            .chain(
                self.udp_publish
                    .iter()
                    .flat_map(|p| p.peers.values().map(|(_, _, a)| a.event("allowed"))),
            )
            .collect();
        for e in events {
            self.log(e);
        }
        for f in self.tcp.values() {
            if let Some(m) = &f.mitm {
                self.log_substitutions(m, &f.audit);
            }
        }
    }
}

/// A guest-side UDP socket: 64 datagrams or 64 KiB each way.
fn udp_socket() -> udp::Socket<'static> {
    let buffer = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 64], vec![0; 64 << 10]);
    udp::Socket::new(buffer(), buffer())
}

/// Rounds a new flow's SYN may wait for another to the same address (see `State::defer`).
const MAX_DEFERRALS: u8 = 64;

/// Whether a guest-side socket listens on `dst` for a SYN not yet processed. A listening
/// socket takes the first SYN to its address, whichever guest connection it is from: with two
/// at once, two flows' guest connections could be swapped, and a flow would outlive the
/// connection it believes it has (the guest, reusing that port, was then refused).
fn listen_pending(sockets: &SocketSet<'static>, dst: IpEndpoint) -> bool {
    sockets.iter().any(|(_, s)| match s {
        smoltcp::socket::Socket::Tcp(t) => {
            t.state() == tcp::State::Listen
                && t.listen_endpoint().port == dst.port
                && t.listen_endpoint().addr == Some(dst.addr)
        }
        _ => false,
    })
}

/// A spare guest-side TCP socket if one is kept, else a new one.
fn spare_or_new(spare: &mut Vec<tcp::Socket<'static>>, stats: &Stats) -> tcp::Socket<'static> {
    match spare.pop() {
        Some(s) => {
            stats.tcp_sockets_reused.fetch_add(1, Ordering::Relaxed);
            s
        }
        None => tcp_socket(),
    }
}

/// A guest-side TCP socket; no Nagle (the host side already batches).
fn tcp_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
        tcp::SocketBuffer::new(vec![0; TCP_BUFFER]),
    );
    s.set_nagle_enabled(false);
    s
}

fn is_gateway(a: IpAddress) -> bool {
    a == IpAddress::Ipv4(addr::GATEWAY_V4) || a == IpAddress::Ipv6(addr::GATEWAY_V6)
}

/// Room for one frame from the guest: a link's MTU, or a 64 KiB TCP segment from a guest
/// that offloads segmentation (see [`crate::offload`]).
fn rx_buffer_len(mtu: usize) -> usize {
    (mtu + 14 + 4).max(crate::offload::MAX_OFFLOAD_FRAME)
}

/// Neither multicast nor broadcast (those stay with smoltcp: neighbour discovery, for one).
fn is_unicast(a: IpAddress) -> bool {
    is_unicast_std(to_std(a))
}

/// Neither multicast, the limited broadcast, nor the sandbox network's broadcast. (The host's
/// own subnet broadcasts are the kernel's to tell: [`Delivery::Broadcast`].)
fn is_unicast_std(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => {
            let host_bits = u32::MAX >> addr::PREFIX_V4;
            let subnet_broadcast = Ipv4Addr::from(u32::from(addr::GATEWAY_V4) | host_bits);
            !v4.is_multicast() && !v4.is_broadcast() && v4 != subnet_broadcast
        }
        IpAddr::V6(v6) => !v6.is_multicast(),
    }
}

fn to_std(a: IpAddress) -> IpAddr {
    match a {
        IpAddress::Ipv4(v4) => IpAddr::V4(v4),
        IpAddress::Ipv6(v6) => IpAddr::V6(v6),
    }
}

/// Where a flow to `dst` goes on the host: the gateway's address means the host's loopback.
fn host_target(dst: IpEndpoint) -> SocketAddr {
    let ip = match dst.addr {
        IpAddress::Ipv4(v4) if v4 == addr::GATEWAY_V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddress::Ipv6(v6) if v6 == addr::GATEWAY_V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        a => addr::canonical(to_std(a)),
    };
    SocketAddr::new(ip, dst.port)
}
