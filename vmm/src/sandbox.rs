//! Sandboxes: a microVM whose msb-init agent is connected and ready to run commands.
//!
//! ```no_run
//! use msb_vmm::sandbox::{ExecRequest, Sandbox};
//! let sb = Sandbox::builder().cpus(2).memory_mib(256).start()?;
//! let out = sb.output(["sh", "-c", "echo hi; nproc"])?;
//! assert_eq!(out.stdout, b"hi\n2\n");
//! sb.write_file("/tmp/greeting", b"hello", 0o644)?;
//! assert_eq!(sb.read_file("/tmp/greeting")?, b"hello");
//! let outcome = sb.shutdown()?;
//! # Ok::<(), msb_vmm::sandbox::SandboxError>(())
//! ```
//!
//! One-shot: `Sandbox::command(["make", "test"]).output()` boots, runs, and powers off.

use std::ffi::OsStr;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use msb_init::agent::{
    DirEntry, ExecRequest, ExitStatus, FileStat, TermSize, User, AGENT_PORT,
};
pub use msb_init::client::{
    AgentClient, ClientError, ExecController, ExecEvent, ExecHandle, ExecOutput,
};
use thiserror::Error;

use std::sync::Arc;

use msb_devices::fs::passthrough::{CachePolicy, Config as FsConfig, PassthroughFs};
use msb_init::cmdline::{Access, MountSpec};

use crate::hypervisor::HypervisorError;
use crate::initramfs::{self, InitramfsError};
use crate::vm::{
    Console, GuestExit, Initrd, RunningVm, VmBuilder, VmError, VmOutcome, DEFAULT_CMDLINE,
};

/// How long a sandbox may take from start to a connected agent, by default.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// `$MSB_BOOT_TIMEOUT` (seconds), the boot timeout asked of this environment: emulated hosts,
/// such as the arm64 L2 VM, boot in minutes.
pub fn env_boot_timeout() -> Option<Duration> {
    std::env::var("MSB_BOOT_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map(Duration::from_secs)
}
pub use crate::DEFAULT_MEMORY_MIB;
/// Slack past a command's timeout and the boot timeout before a one-shot sandbox's VM is stopped.
const POWER_OFF_GRACE: Duration = Duration::from_secs(10);

/// Errors starting or driving a sandbox. Guest failures carry the console's last lines.
#[derive(Debug, Error)]
pub enum SandboxError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error("invalid hostname {0:?}: use 1-64 of a-z, 0-9, '-', '.'")]
    BadHostname(String),
    #[error("invalid volume {0:?}: use HOST_DIR:/GUEST/PATH[:ro][,cache=none|auto|always]")]
    BadVolume(String),
    #[error("{0}")]
    Share(String),
    #[error("network: {0}")]
    Network(String),
    #[error(transparent)]
    Confine(msb_confine::ConfineError),
    #[error("the guest kernel panicked")]
    KernelPanic { console_tail: Vec<String> },
    #[error("the guest stopped before its agent was ready ({exit})")]
    GuestStopped {
        exit: GuestExit,
        console_tail: Vec<String>,
    },
    #[error("the guest's agent was not ready after {} s", .after.as_secs_f64())]
    BootTimeout {
        after: Duration,
        console_tail: Vec<String>,
    },
    #[error("timed out after {} s", .after.as_secs_f64())]
    Timeout { after: Duration },
    #[error(transparent)]
    Agent(#[from] ClientError),
    #[error("policy: {0}")]
    Policy(String),
    #[error("the sandbox is paused: resume it first")]
    Paused,
    #[error("pausing: {0}")]
    Pause(#[from] crate::vm::PauseError),
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("image {0}")]
    Image(String),
}

impl SandboxError {
    /// Whether a warm start failed in a way a cold boot may not (a stale or broken template,
    /// a host that changed), rather than for the configuration itself.
    fn is_warm_failure(&self) -> bool {
        matches!(
            self,
            SandboxError::Vm(_)
                | SandboxError::Snapshot(_)
                | SandboxError::KernelPanic { .. }
                | SandboxError::GuestStopped { .. }
                | SandboxError::BootTimeout { .. }
                | SandboxError::Agent(_)
                | SandboxError::Pause(_)
        )
    }

    /// The guest console's last lines, for errors where the guest failed.
    pub fn console_tail(&self) -> &[String] {
        match self {
            SandboxError::KernelPanic { console_tail }
            | SandboxError::GuestStopped { console_tail, .. }
            | SandboxError::BootTimeout { console_tail, .. } => console_tail,
            _ => &[],
        }
    }
}

/// How long a pause waits for every vCPU to reach its next exit (they are kicked out of the
/// guest, so this is only ever reached by a vCPU stuck in a device call).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A user as `docker run -u` takes one: `NAME`, `UID` (a name the guest looks up, as numbers
/// are names too) or `UID:GID`. The error is `SPEC: expected ...`.
pub fn parse_user(spec: &str) -> Result<User, String> {
    let bad = || format!("{spec}: expected NAME, UID or UID:GID");
    if spec.is_empty() {
        return Err(bad());
    }
    Ok(match spec.split_once(':') {
        Some((uid, gid)) => User::Id {
            uid: uid.parse().map_err(|_| bad())?,
            gid: gid.parse().map_err(|_| bad())?,
        },
        None => User::Name(spec.to_string()),
    })
}

/// Configures a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxBuilder {
    cpus: u32,
    memory_mib: u64,
    kernel: Option<PathBuf>,
    console: bool,
    hostname: String,
    boot_timeout: Duration,
    start: Instant,
    defer_teardown: bool,
    seccomp: msb_confine::Seccomp,
    confine_caller: bool,
    vsock_uds: Option<PathBuf>,
    vm_timeout: Option<Duration>,
    limits: msb_init::agent::GuestLimits,
    fs_rate: Option<Arc<msb_devices::fs::rate::FsRate>>,
    volumes: Vec<Volume>,
    tmpfs: Vec<(PathBuf, u64)>,
    rootfs: Option<(PathBuf, Access)>,
    /// The root's host tree never changes under the sandbox ([`SandboxBuilder::rootfs_immutable`]).
    root_immutable: bool,
    #[cfg(target_os = "linux")]
    network: Option<Network>,
    /// Continue the sandbox saved in this snapshot directory instead of booting.
    restore: Option<PathBuf>,
    /// Start from (or save) a warm template ([`crate::warm`]).
    warm: bool,
    /// The OCI image whose merged root this sandbox boots ([`SandboxBuilder::image`]).
    image: Option<crate::image::ImageRecord>,
}

/// How [`SandboxBuilder::launch`] makes the VM.
enum Launch {
    /// Boot `kernel` with `initrd`; save a warm template into `template` once the agent
    /// answers.
    Boot {
        kernel: PathBuf,
        initrd: PathBuf,
        template: Option<PathBuf>,
    },
    /// Continue a user's snapshot (its agent was configured before it was taken).
    Restore(PathBuf),
    /// Continue a warm template (its agent has not been configured).
    Warm(PathBuf),
}

/// What a sandbox snapshot records beside the VM's state: the layout a restore must
/// rebuild (shares by tag and guest path, a network card or not) and the sizes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxImage {
    pub cpus: u32,
    pub memory_mib: u64,
    /// (tag, guest path) of each share, in device order.
    pub shares: Vec<(String, String)>,
    pub network: bool,
    /// The netstack's DNS bindings when saved (which addresses the guest's names resolved
    /// to): name rules keep matching the addresses its programs hold.
    #[cfg(target_os = "linux")]
    #[serde(default)]
    pub dns: Vec<msb_netstack::dns::SavedBinding>,
}

/// The file of a snapshot directory holding the [`SandboxImage`].
pub const SANDBOX_FILE: &str = "sandbox.json";

impl SandboxImage {
    /// Reads the sandbox record of snapshot directory `dir`.
    pub fn read(dir: &Path) -> Result<SandboxImage, SandboxError> {
        let path = dir.join(SANDBOX_FILE);
        let bytes = std::fs::read(&path).map_err(|e| {
            SandboxError::Snapshot(format!(
                "{}: {e} (is {} a sandbox snapshot? `msb-vmm snapshot NAME DIR` makes one)",
                path.display(),
                dir.display()
            ))
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| SandboxError::Snapshot(format!("{}: {e}", path.display())))
    }

    /// The record of a sandbox with these sizes and shares (tag, guest path, server) and,
    /// if it has a network, its netstack's DNS bindings.
    fn of(
        cpus: u32,
        memory_mib: u64,
        shares: &[(String, String, Arc<PassthroughFs>)],
        network: Option<Vec<msb_netstack::dns::SavedBinding>>,
    ) -> SandboxImage {
        SandboxImage {
            cpus,
            memory_mib,
            shares: shares
                .iter()
                .map(|(tag, guest, _)| (tag.clone(), guest.clone()))
                .collect(),
            network: network.is_some(),
            dns: network.unwrap_or_default(),
        }
    }

    /// Writes the record into snapshot directory `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), SandboxError> {
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| SandboxError::Snapshot(e.to_string()))?;
        crate::snapshot::write_atomic(&dir.join(SANDBOX_FILE), &json)
            .map_err(|e| SandboxError::Vm(e.into()))
    }
}

/// A sandbox's network: a virtio-net card whose every packet ends in our netstack, which
/// decides by `policy` and relays allowed flows over host sockets (see `msb_netstack`).
#[cfg(target_os = "linux")]
#[derive(Clone)]
pub struct Network {
    pub policy: msb_netstack::policy::Policy,
    /// Link MTU (68 to 65520; default 1500).
    pub mtu: u16,
    /// The audit log: every flow and DNS decision.
    pub log: Option<msb_netstack::stack::LogHook>,
    /// Host ports forwarded to the guest.
    pub publish: Vec<Publish>,
    /// TLS interception and secrets: the guest gets the placeholders in its environment and
    /// trusts the sandbox CA.
    pub intercept: Option<std::sync::Arc<msb_netstack::intercept::Intercept>>,
    /// Flows (connections, UDP peers, pings) open at once; more are refused.
    pub max_flows: usize,
    /// Bytes per second into and out of the guest (`--net-rate`).
    pub rate_in: Option<u64>,
    pub rate_out: Option<u64>,
    /// Bytes the guest may send over its life (`--egress-budget`).
    pub egress_budget: Option<u64>,
}

/// A host port forwarded to a guest port (`--publish`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub host: std::net::SocketAddr,
    pub guest_port: u16,
    pub udp: bool,
}

impl Publish {
    /// Parses `[HOSTIP:]HOSTPORT:GUESTPORT[/udp|/tcp]`; HOSTIP defaults to 127.0.0.1 and an
    /// IPv6 one goes in brackets (`[::1]:8080:80`).
    pub fn parse(spec: &str) -> Result<Publish, SandboxError> {
        let bad = || {
            SandboxError::Network(format!(
                "--publish {spec}: use [HOSTIP:]HOSTPORT:GUESTPORT[/udp], e.g. 8080:80"
            ))
        };
        let (rest, udp) = match spec.rsplit_once('/') {
            Some((r, "udp")) => (r, true),
            Some((r, "tcp")) => (r, false),
            Some(_) => return Err(bad()),
            None => (spec, false),
        };
        let (rest, guest) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port = |p: &str| -> Option<u16> {
            (!p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse().ok())
                .flatten()
                .filter(|p| *p != 0)
        };
        let guest_port = port(guest).ok_or_else(bad)?;
        let (ip, host_port) = match rest.rsplit_once(':') {
            Some((ip, hp)) => {
                let ip = ip
                    .strip_prefix('[')
                    .and_then(|i| i.strip_suffix(']'))
                    .unwrap_or(ip);
                (ip.parse().map_err(|_| bad())?, port(hp).ok_or_else(bad)?)
            }
            None => (
                std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                port(rest).ok_or_else(bad)?,
            ),
        };
        Ok(Publish {
            host: std::net::SocketAddr::new(ip, host_port),
            guest_port,
            udp,
        })
    }

    fn bind(&self) -> Result<msb_netstack::stack::Published, SandboxError> {
        let proto = if self.udp { "/udp" } else { "" };
        let spec = format!("--publish {}:{}{proto}", self.host, self.guest_port);
        let taken = |e: std::io::Error| {
            SandboxError::Network(format!("{spec}: cannot listen on {}: {e}", self.host))
        };
        Ok(if self.udp {
            msb_netstack::stack::Published::Udp {
                socket: std::net::UdpSocket::bind(self.host).map_err(taken)?,
                guest_port: self.guest_port,
                spec,
            }
        } else {
            msb_netstack::stack::Published::Tcp {
                listener: std::net::TcpListener::bind(self.host).map_err(taken)?,
                guest_port: self.guest_port,
                spec,
            }
        })
    }
}

#[cfg(target_os = "linux")]
impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("policy", &self.policy)
            .field("mtu", &self.mtu)
            .field("log", &self.log.is_some())
            .field("publish", &self.publish)
            .finish()
    }
}

#[cfg(target_os = "linux")]
impl Network {
    /// The default: the `public` preset, MTU 1500.
    pub fn new(policy: msb_netstack::policy::Policy) -> Network {
        Network {
            policy,
            mtu: 1500,
            log: None,
            publish: Vec::new(),
            intercept: None,
            max_flows: 1024,
            rate_in: None,
            rate_out: None,
            egress_budget: None,
        }
    }
}

/// The netstack's side of the virtio-net card.
#[cfg(target_os = "linux")]
struct PortLink(msb_devices::virtio::net::NetPort);

#[cfg(target_os = "linux")]
impl msb_netstack::stack::Link for PortLink {
    fn raw_fd(&self) -> std::os::fd::RawFd {
        self.0.raw_fd()
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        Ok(self.0.recv(buf))
    }
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.0.send(frame);
        Ok(())
    }
    fn offloads(&self) -> bool {
        self.0.offloads()
    }
    fn send_offloaded(
        &mut self,
        hdr: &[u8; msb_netstack::offload::VNET_HDR_LEN],
        frame: &[u8],
    ) -> std::io::Result<()> {
        self.0.send_offloaded(hdr, frame);
        Ok(())
    }
}

/// A host directory mounted in the guest.
#[derive(Debug, Clone)]
pub struct Volume {
    pub host: PathBuf,
    pub guest: PathBuf,
    pub read_only: bool,
    pub cache: CachePolicy,
}

impl Volume {
    /// Parses the CLI's `HOST:GUEST[:OPTS]` (GUEST absolute), OPTS a comma-separated list of
    /// `ro`, `rw`, `cache=none|auto|always` (default `rw,cache=auto`).
    pub fn parse(spec: &str) -> Result<Volume, SandboxError> {
        let bad = || SandboxError::BadVolume(spec.to_string());
        let mut parts = spec.split(':');
        let host = parts.next().filter(|h| !h.is_empty()).ok_or_else(bad)?;
        let guest = parts
            .next()
            .filter(|g| g.starts_with('/'))
            .ok_or_else(bad)?;
        let (mut read_only, mut cache) = (false, CachePolicy::Auto);
        if let Some(opts) = parts.next() {
            for o in opts.split(',') {
                match o {
                    "ro" => read_only = true,
                    "rw" => read_only = false,
                    _ => match o.strip_prefix("cache=") {
                        Some(c) => cache = c.parse().map_err(|_| bad())?,
                        None => return Err(bad()),
                    },
                }
            }
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Volume {
            host: host.into(),
            guest: guest.into(),
            read_only,
            cache,
        })
    }
}

impl SandboxBuilder {
    /// Mounts host directory `host` at `guest` (served by our virtio-fs; the guest can never
    /// reach outside it).
    pub fn volume(mut self, v: Volume) -> Self {
        self.volumes.push(v);
        self
    }

    /// Boots with host directory `dir` as the root file system (over virtio-fs; msb-init
    /// moves into it and stays PID 1). Without it the root is the initramfs's busybox.
    pub fn rootfs(mut self, dir: impl Into<PathBuf>) -> Self {
        self.rootfs = Some((dir.into(), Access::ReadWrite));
        self
    }

    /// Boots with host directory `dir` as a copy-on-write root: the share is read-only and
    /// the guest's changes go to an overlay in guest memory, lost when the sandbox ends. Many
    /// sandboxes can share one such tree (the default root that setup builds is used so).
    pub fn rootfs_overlay(mut self, dir: impl Into<PathBuf>) -> Self {
        self.rootfs = Some((dir.into(), Access::Overlay));
        self
    }

    /// Promises that the root directory's host tree does not change while the sandbox runs
    /// (an image's root, setup's Debian tree: both are content-addressed in the cache). The
    /// guest then keeps its entries and attributes instead of asking again after a second
    /// (`cache=always`), which makes a second walk of a tree many times faster.
    pub fn rootfs_immutable(mut self) -> Self {
        self.root_immutable = true;
        self
    }

    /// The root a sandbox gets when none is asked for ([`crate::assets::default_root`]):
    /// setup's Debian tree copy-on-write (and immutable), another `$MSB_ROOTFS` directory
    /// copy-on-write, or the initramfs. A missing tree is an error naming the fix.
    pub fn default_rootfs(self) -> Result<Self, SandboxError> {
        use crate::assets::{default_root, is_setup_root, DefaultRoot};
        match default_root() {
            DefaultRoot::Initramfs => Ok(self),
            DefaultRoot::Dir(dir) => match std::fs::canonicalize(&dir) {
                // Setup's tree never changes under a sandbox; another directory given as
                // $MSB_ROOTFS may.
                Ok(abs) if abs.is_dir() && is_setup_root(&abs) => {
                    Ok(self.rootfs_overlay(abs).rootfs_immutable())
                }
                Ok(abs) if abs.is_dir() => Ok(self.rootfs_overlay(abs)),
                _ => Err(SandboxError::Share(format!(
                    "no default root file system at {}: run ./x setup to build it (a Debian \
                     minbase), or pass --rootfs DIR or --rootfs initramfs",
                    dir.display()
                ))),
            },
        }
    }

    /// Boots the OCI image `name` (a registry reference, `oci:DIR[:TAG]` or
    /// `docker-archive:FILE[:TAG]`): pulled into the cache on first use, its layers merged
    /// into one root shared copy-on-write as [`SandboxBuilder::rootfs_overlay`] does; its
    /// `Env`, `WorkingDir`, `User`, `Entrypoint` and `Cmd` are the defaults of
    /// [`Sandbox::image_request`]. Errors name the image and the cause.
    pub fn image(
        mut self,
        name: &str,
        opts: &crate::image::PullOptions,
    ) -> Result<Self, SandboxError> {
        let (rec, root) =
            crate::image::resolve(name, opts).map_err(|e| SandboxError::Image(e.to_string()))?;
        self.rootfs = Some((root, Access::Overlay));
        self.root_immutable = true;
        self.image = Some(rec);
        Ok(self)
    }

    /// Mounts a tmpfs at `guest`, at most `size` bytes (0: half the guest's memory).
    /// Gives the sandbox a network through our netstack (without it: loopback only).
    #[cfg(target_os = "linux")]
    pub fn network(mut self, net: Network) -> Self {
        self.network = Some(net);
        self
    }

    pub fn tmpfs(mut self, guest: impl Into<PathBuf>, size: u64) -> Self {
        self.tmpfs.push((guest.into(), size));
        self
    }

    /// Number of vCPUs (default 1).
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Guest memory in MiB (default [`DEFAULT_MEMORY_MIB`]).
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Boot this kernel instead of the default one.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// Show the guest kernel's console on standard error.
    pub fn console(mut self, on: bool) -> Self {
        self.console = on;
        self
    }

    /// The guest's hostname (default `msb`).
    pub fn hostname(mut self, name: impl Into<String>) -> Self {
        self.hostname = name.into();
        self
    }

    /// How long start may take until the agent answers (default 60 s).
    pub fn boot_timeout(mut self, t: Duration) -> Self {
        self.boot_timeout = t;
        self
    }

    /// Stop the whole VM after this long, whatever runs in it.
    pub fn vm_timeout(mut self, t: Option<Duration>) -> Self {
        self.vm_timeout = t;
        self
    }

    /// The instant boot times are measured from (default: this process's start).
    pub fn start_time(mut self, start: Instant) -> Self {
        self.start = start;
        self
    }

    /// Processes and threads the guest's commands may have at once, all together (a fork
    /// bomb stops there; the agent keeps answering).
    pub fn pids_limit(mut self, n: u64) -> Self {
        self.limits.pids_max = Some(n);
        self
    }

    /// Memory the guest's commands may use together, in bytes (the guest's OOM killer acts
    /// inside that group only).
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.limits.memory_max = Some(bytes);
        self
    }

    /// Requests and file bytes per second (read plus written) all the sandbox's shares may
    /// serve together (`None`: unlimited); see [`msb_devices::fs::rate`].
    pub fn fs_rate(mut self, ops: Option<u64>, bytes: Option<u64>) -> Self {
        self.fs_rate = (ops.is_some() || bytes.is_some())
            .then(|| Arc::new(msb_devices::fs::rate::FsRate::new(ops, bytes)));
        self
    }

    /// Whether the sandbox's threads install their seccomp filters (see [`VmBuilder::seccomp`]
    /// and the netstack's); `Off` is for debugging a filter.
    pub fn seccomp(mut self, mode: msb_confine::Seccomp) -> Self {
        self.seccomp = mode;
        self
    }

    /// Confines the thread that calls [`SandboxBuilder::start`] too, as the `control` kind, once
    /// the VM is set up and before the agent's first message: for programs whose only job is
    /// the sandbox (the CLI does this). Off by default: the caller's thread is not ours.
    pub fn confine_caller(mut self, on: bool) -> Self {
        self.confine_caller = on;
        self
    }

    /// Adds the host paths this sandbox uses to a jail: its kernel and boot assets (read-only;
    /// the initramfs image is made first, since the jail's cache is read-only), its root and
    /// volumes (as shared), a named sandbox's state directory.
    pub fn jail_binds(&self, spec: &mut crate::jail::JailSpec) -> Result<(), SandboxError> {
        let cache = crate::assets::cache_dir();
        let (init, busybox) = (crate::assets::msb_init(), crate::assets::busybox());
        initramfs::cached_default(&cache, &init, Some(&busybox))?;
        spec.bind(&cache, false)
            .bind(&init, false)
            .bind(&busybox, false);
        let kernel = self
            .kernel
            .clone()
            .unwrap_or_else(crate::assets::default_kernel);
        spec.bind(kernel, false);
        if let Some((dir, access)) = &self.rootfs {
            spec.bind(dir, *access == Access::ReadWrite);
        }
        for v in &self.volumes {
            spec.bind(&v.host, !v.read_only);
        }
        if let Some(dir) = self.vsock_uds.as_ref().and_then(|p| p.parent()) {
            spec.bind(dir, true);
        }
        Ok(())
    }

    /// See [`VmBuilder::defer_teardown_to_exit`]: for programs that exit right after.
    pub fn defer_teardown_to_exit(mut self, on: bool) -> Self {
        self.defer_teardown = on;
        self
    }

    /// Also serve the guest's vsock on this Unix socket (hybrid vsock, for other processes).
    pub fn vsock_uds(mut self, path: impl Into<PathBuf>) -> Self {
        self.vsock_uds = Some(path.into());
        self
    }

    /// Boots the VM and connects to its agent.
    /// Continue the sandbox saved in snapshot directory `dir` ([`Sandbox::snapshot`]) rather
    /// than boot a new one. The builder must give it the same shares (by guest path; the host
    /// directories may be copies) and network; vCPUs and memory are the snapshot's. Its
    /// processes, files and memory carry on; connections from before the snapshot (agent,
    /// network flows) are reset, and the agent is reconnected.
    pub fn restore_from(mut self, dir: impl Into<PathBuf>) -> Self {
        self.restore = Some(dir.into());
        self
    }

    /// The shares this builder makes, as (tag, guest path), in device order.
    fn share_layout(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if self.rootfs.is_some() {
            out.push(("root".to_string(), "/".to_string()));
        }
        for (i, v) in self.volumes.iter().enumerate() {
            out.push((format!("vol{i}"), v.guest.display().to_string()));
        }
        out
    }

    /// Whether this builder rebuilds the devices of the snapshotted sandbox.
    fn check_restore(&self, saved: &SandboxImage) -> Result<(), SandboxError> {
        let ours = self.share_layout();
        if ours != saved.shares {
            let paths = |v: &[(String, String)]| {
                v.iter()
                    .map(|(_, g)| g.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(SandboxError::Snapshot(format!(
                "the snapshotted sandbox had shares at [{}], this one has them at [{}]: give the same root and volumes (host directories may be copies)",
                paths(&saved.shares),
                paths(&ours)
            )));
        }
        #[cfg(target_os = "linux")]
        let network = self.network.is_some();
        #[cfg(not(target_os = "linux"))]
        let network = false;
        if network != saved.network {
            return Err(SandboxError::Snapshot(format!(
                "the snapshotted sandbox had {} network: restore it {} one",
                if saved.network { "a" } else { "no" },
                if saved.network { "with" } else { "without" }
            )));
        }
        Ok(())
    }

    /// Start from a cached snapshot of a freshly booted sandbox of this configuration
    /// when there is one, and otherwise boot and save one for the next start (see
    /// [`crate::warm`]): a restore costs milliseconds where a boot costs a kernel's start.
    /// On for [`Sandbox::command`] and `msb-vmm run`; off by default here.
    pub fn warm(mut self, on: bool) -> Self {
        self.warm = on;
        self
    }

    /// The kernel command line of a boot: hostname, console, mounts and network.
    fn cmdline(&self) -> Result<String, SandboxError> {
        if !msb_init::cmdline::valid_hostname(&self.hostname) {
            return Err(SandboxError::BadHostname(self.hostname.clone()));
        }
        let mut cmdline = format!(
            "{DEFAULT_CMDLINE} {}{}",
            msb_init::cmdline::HOSTNAME,
            self.hostname
        );
        if !self.console {
            cmdline.push_str(" quiet");
        }
        let mut specs = Vec::new();
        if let Some((_, access)) = &self.rootfs {
            specs.push(MountSpec::Virtiofs {
                tag: "root".into(),
                path: b"/".to_vec(),
                access: *access,
            });
        }
        for (i, v) in self.volumes.iter().enumerate() {
            specs.push(MountSpec::Virtiofs {
                tag: format!("vol{i}"),
                path: v.guest.as_os_str().as_bytes().to_vec(),
                access: if v.read_only {
                    Access::ReadOnly
                } else {
                    Access::ReadWrite
                },
            });
        }
        for (guest, size) in &self.tmpfs {
            if !guest.is_absolute() {
                return Err(SandboxError::BadVolume(guest.display().to_string()));
            }
            specs.push(MountSpec::Tmpfs {
                size: *size,
                path: guest.as_os_str().as_bytes().to_vec(),
            });
        }
        for spec in specs {
            cmdline.push(' ');
            cmdline.push_str(&spec.encode());
        }
        #[cfg(target_os = "linux")]
        if self.network.is_some() {
            use msb_netstack::addr;
            let word = msb_init::cmdline::NetConfig {
                v4: addr::GUEST_V4,
                v4_prefix: addr::PREFIX_V4,
                gateway_v4: addr::GATEWAY_V4,
                v6: addr::GUEST_V6,
                v6_prefix: addr::PREFIX_V6,
                gateway_v6: addr::GATEWAY_V6,
            }
            .encode();
            cmdline.push(' ');
            cmdline.push_str(&word);
        }
        Ok(cmdline)
    }

    /// What shapes a guest at the moment a warm template of it is saved, one input a line
    /// (hashed by [`crate::warm::key`]). Everything else is applied to each restored copy.
    fn warm_inputs(&self, kernel: &Path, initrd: &Path, cmdline: &str) -> io::Result<String> {
        use crate::warm::identity;
        let mut s = format!(
            "kernel {}\ninitrd {}\ncmdline {cmdline}\ncpus {}\nmemory {}\n",
            identity(kernel)?,
            identity(initrd)?,
            self.cpus,
            self.memory_mib
        );
        if let Some((dir, access)) = &self.rootfs {
            s.push_str(&format!("root {} {access:?}\n", identity(dir)?));
        }
        for v in &self.volumes {
            s.push_str(&format!(
                "volume {} ro={} cache={:?}\n",
                v.guest.display(),
                v.read_only,
                v.cache
            ));
        }
        #[cfg(target_os = "linux")]
        if let Some(n) = &self.network {
            s.push_str(&format!("network mtu={}\n", n.mtu));
        }
        Ok(s)
    }

    /// Boots the VM (or restores it, see [`SandboxBuilder::restore_from`] and
    /// [`SandboxBuilder::warm`]) and connects to its agent.
    pub fn start(self) -> Result<Sandbox, SandboxError> {
        // A sandbox always boots Linux: refuse at once where /dev/kvm cannot run it.
        if crate::host::is_pvm() && std::env::var_os("MSB_ALLOW_PVM").is_none() {
            return Err(VmError::Hypervisor(HypervisorError::Pvm).into());
        }
        let cmdline = self.cmdline()?;
        if let Some(dir) = self.restore.clone() {
            return self.launch(Launch::Restore(dir), cmdline);
        }
        let cache = crate::assets::cache_dir();
        let initrd = initramfs::cached_default(
            &cache,
            &crate::assets::msb_init(),
            Some(&crate::assets::busybox()),
        )?;
        let kernel = self
            .kernel
            .clone()
            .unwrap_or_else(crate::assets::default_kernel);
        // A missing kernel is not a reason for a warm start: the boot says it clearly.
        let key = match self.warm && crate::warm::SUPPORTED {
            true => self
                .warm_inputs(&kernel, &initrd, &cmdline)
                .map(|i| crate::warm::key(&i))
                .ok(),
            false => None,
        };
        let Some(key) = key else {
            return self.launch(
                Launch::Boot {
                    kernel,
                    initrd,
                    template: None,
                },
                cmdline,
            );
        };
        let template = crate::warm::dir().join(&key);
        if let Some(dir) = crate::warm::lookup(&key) {
            let fallback = self.clone();
            match self.launch(Launch::Warm(dir.clone()), cmdline.clone()) {
                Err(e) if e.is_warm_failure() => {
                    tracing::warn!(
                        "warm start from {} failed ({e}): booting cold and saving a new one",
                        dir.display()
                    );
                    crate::warm::discard(&dir);
                    return fallback.launch(
                        Launch::Boot {
                            kernel,
                            initrd,
                            template: Some(template),
                        },
                        cmdline,
                    );
                }
                r => return r,
            }
        }
        tracing::info!(
            "no warm snapshot of this configuration yet: booting cold and saving one in {}",
            template.display()
        );
        self.launch(
            Launch::Boot {
                kernel,
                initrd,
                template: Some(template),
            },
            cmdline,
        )
    }

    fn launch(self, how: Launch, cmdline: String) -> Result<Sandbox, SandboxError> {
        let restore_dir = match &how {
            Launch::Restore(d) | Launch::Warm(d) => Some(d.clone()),
            Launch::Boot { .. } => None,
        };
        let saved = match &restore_dir {
            Some(dir) => Some(SandboxImage::read(dir)?),
            None => None,
        };
        let mut b = match (&how, &saved) {
            (Launch::Restore(dir) | Launch::Warm(dir), Some(saved)) => {
                self.check_restore(saved)?;
                VmBuilder::restore(dir)?
            }
            (Launch::Boot { kernel, initrd, .. }, _) => VmBuilder::new(kernel)
                .initrd(Initrd::Path(initrd.clone()))
                .cmdline(cmdline)
                .cpus(self.cpus)
                .memory_mib(self.memory_mib),
            _ => unreachable!("a restore has its saved image"),
        };
        let (cpus, memory_mib) = saved
            .as_ref()
            .map_or((self.cpus, self.memory_mib), |s| (s.cpus, s.memory_mib));
        b = b
            .timeout(self.vm_timeout)
            .start_time(self.start)
            .defer_teardown_to_exit(self.defer_teardown)
            .seccomp(self.seccomp)
            .console(if self.console {
                Console::Stderr
            } else {
                Console::Off
            });
        if let Some(p) = &self.vsock_uds {
            b = b.vsock_uds(p);
        }
        let mut shares = Vec::new();
        if let Some((dir, access)) = &self.rootfs {
            let config = FsConfig {
                read_only: *access != Access::ReadWrite,
                cache: if self.root_immutable && *access != Access::ReadWrite {
                    CachePolicy::Always
                } else {
                    CachePolicy::Auto
                },
                rate: self.fs_rate.clone(),
                ..Default::default()
            };
            let fs = Arc::new(
                PassthroughFs::new(dir, config)
                    .map_err(|e| SandboxError::Share(format!("root file system: {e}")))?,
            );
            shares.push(("root".into(), "/".into(), fs.clone()));
            b = b.share("root", fs);
        }
        for (i, v) in self.volumes.iter().enumerate() {
            let fs = PassthroughFs::new(
                &v.host,
                FsConfig {
                    read_only: v.read_only,
                    cache: v.cache,
                    rate: self.fs_rate.clone(),
                    ..Default::default()
                },
            )
            .map_err(|e| SandboxError::Share(e.to_string()))?;
            let tag = format!("vol{i}");
            let fs = Arc::new(fs);
            shares.push((tag.clone(), v.guest.display().to_string(), fs.clone()));
            b = b.share(tag, fs);
        }
        // Learn mode records what the guest reaches, for `Sandbox::suggested_policy`.
        #[cfg(target_os = "linux")]
        let learner = self
            .network
            .as_ref()
            .filter(|n| n.policy.preset == msb_netstack::policy::Preset::Learn)
            .map(|_| Arc::new(std::sync::Mutex::new(msb_netstack::learn::Learner::new())));
        #[cfg(target_os = "linux")]
        let netstack = match &self.network {
            Some(net) => {
                let (device, port) = msb_devices::virtio::net::NetDevice::new(
                    [0x02, 0x6d, 0x73, 0x62, 0x00, 0x15],
                    net.mtu,
                )
                .map_err(|e| SandboxError::Network(e.to_string()))?;
                msb_devices::net::alloc::pin_mmap_threshold();
                let stack = msb_netstack::stack::NetStack::spawn(
                    Box::new(PortLink(port)),
                    msb_netstack::stack::Config {
                        policy: net.policy.clone(),
                        mtu: net.mtu.into(),
                        log: net.log.clone(),
                        publish: net
                            .publish
                            .iter()
                            .map(Publish::bind)
                            .collect::<Result<_, _>>()?,
                        intercept: net.intercept.clone(),
                        seccomp: self.seccomp,
                        learn: learner.clone(),
                        max_flows: net.max_flows,
                        rate_in: net.rate_in,
                        rate_out: net.rate_out,
                        egress_budget: net.egress_budget,
                        dns_bindings: saved.as_ref().map(|s| s.dns.clone()).unwrap_or_default(),
                        ..Default::default()
                    },
                )
                .map_err(|e| SandboxError::Network(format!("starting the netstack: {e}")))?;
                b = b.net(device);
                Some(stack)
            }
            None => None,
        };
        // What the agent is told before the first exec: secret placeholders, and the CA to
        // trust (appended to the root's bundle unless the root is a host directory that keeps
        // changes).
        #[cfg(target_os = "linux")]
        let mut configure = self
            .network
            .as_ref()
            .and_then(|n| n.intercept.as_ref())
            .map(|i| msb_init::agent::Configure {
                env: i
                    .secrets
                    .guest_env()
                    .into_iter()
                    .map(|(k, v)| (k.into_bytes(), v.into_bytes()))
                    .collect(),
                ca_pem: Some(i.leaves.ca().cert_pem().as_bytes().to_vec()),
                append_to_bundle: !matches!(self.rootfs, Some((_, Access::ReadWrite))),
                ..Default::default()
            });
        #[cfg(not(target_os = "linux"))]
        let mut configure: Option<msb_init::agent::Configure> = None;
        if self.limits.is_set() {
            configure.get_or_insert_with(Default::default).limits = self.limits;
        }
        // A restored user snapshot's agent was configured before the snapshot and remembers
        // it (a warm template never was: it is configured as a boot is).
        if matches!(how, Launch::Restore(_)) {
            configure = None;
        }
        let template = match how {
            Launch::Boot { template, .. } => template.filter(|t| {
                let dir = t.parent().unwrap_or(t);
                crate::warm::make_room(dir, crate::warm::KEEP_TEMPLATES)
                    .map_err(|e| {
                        tracing::info!("warm snapshots cannot be saved in {}: {e}", dir.display())
                    })
                    .is_ok()
            }),
            _ => None,
        };
        let vm = b.start()?;
        // Confined at once, unless a template is saved first: until the agent first answers
        // only our own kernel and msb-init have run, and saving needs more system calls.
        let confine = || match self.confine_caller {
            true => msb_confine::enter(msb_confine::ThreadKind::Control, self.seccomp)
                .map_err(SandboxError::Confine),
            false => Ok(()),
        };
        if template.is_none() {
            if let Err(e) = confine() {
                let _ = stop_and_wait(vm);
                return Err(e);
            }
        }
        let at = || crate::process_start().elapsed().as_secs_f64() * 1000.0;
        tracing::debug!("VM running {:.3} ms after VMM start", at());
        let started = Instant::now();
        let connected = connect_agent(&vm, self.boot_timeout);
        tracing::debug!("agent connected at {:.3} ms", at());
        if let (Some(dir), Ok(_)) = (&template, &connected) {
            // Before anything of this run (secrets, the CA, limits, commands) reaches it.
            let network = netstack.as_ref().map(|_| Vec::new());
            save_template(
                &vm,
                &SandboxImage::of(cpus, memory_mib, &shares, network),
                dir,
            );
        }
        if template.is_some() {
            if let Err(e) = confine() {
                let _ = stop_and_wait(vm);
                return Err(e);
            }
        }
        // A restored guest wakes with its snapshot's wall clock and random-number state (the
        // same in every restore of it): step the clock to now and reseed from our generator.
        let connected = connected.and_then(|agent| {
            if saved.is_some() {
                let mut seed = vec![0u8; 64];
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| io::Read::read_exact(&mut f, &mut seed))
                    .map_err(|e| ConnectFailure::Agent(ClientError::Io(e.to_string())))?;
                agent
                    .restored(std::time::SystemTime::now(), seed)
                    .map_err(ConnectFailure::Agent)?;
            }
            Ok(agent)
        });
        let connected = connected.and_then(|agent| match configure {
            Some(c) => agent
                .configure(c)
                .map(|_| agent)
                .map_err(ConnectFailure::Agent),
            None => Ok(agent),
        });
        match connected {
            Ok(agent) => {
                let ready = self.start.elapsed();
                tracing::info!(
                    "agent ready {:.3} ms after VMM start",
                    ready.as_secs_f64() * 1000.0
                );
                Ok(Sandbox {
                    warm_start: restore_dir.is_some() && self.restore.is_none(),
                    image: self.image.clone(),
                    boot_time: vm.boot_time(),
                    vm: Some(vm),
                    agent: Some(agent),
                    ready_time: ready,
                    ready_at: Instant::now(),
                    cpus,
                    memory_mib,
                    shares,
                    #[cfg(target_os = "linux")]
                    netstack,
                    #[cfg(target_os = "linux")]
                    learner,
                    #[cfg(target_os = "linux")]
                    fixed_secrets: self
                        .network
                        .as_ref()
                        .map(|n| (n.policy.secrets.clone(), n.policy.on_violation.clone())),
                })
            }
            Err(e) => {
                let outcome = stop_and_wait(vm);
                Err(match e {
                    ConnectFailure::Stopped(exit) if outcome.kernel_panicked => {
                        let _ = exit;
                        SandboxError::KernelPanic {
                            console_tail: outcome.console_tail,
                        }
                    }
                    ConnectFailure::Stopped(exit) => SandboxError::GuestStopped {
                        exit,
                        console_tail: outcome.console_tail,
                    },
                    ConnectFailure::Timeout => SandboxError::BootTimeout {
                        after: started.elapsed(),
                        console_tail: outcome.console_tail,
                    },
                    ConnectFailure::Agent(e) => SandboxError::Agent(e),
                })
            }
        }
    }
}

enum ConnectFailure {
    Stopped(GuestExit),
    Timeout,
    Agent(ClientError),
}

/// Waits for the boot signal, then connects to the agent (retrying while the guest refuses:
/// msb-init listens before it signals boot, but the first SYN may race it).
fn connect_agent(vm: &RunningVm, timeout: Duration) -> Result<AgentClient, ConnectFailure> {
    let deadline = Instant::now() + timeout;
    match vm.wait_boot(timeout) {
        Ok(_) => {}
        Err(Some(exit)) => return Err(ConnectFailure::Stopped(exit)),
        Err(None) => return Err(ConnectFailure::Timeout),
    }
    let host = vm
        .vsock()
        .ok_or(ConnectFailure::Agent(ClientError::Closed))?;
    loop {
        if let Some(exit) = vm.stop_reason() {
            return Err(ConnectFailure::Stopped(exit));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ConnectFailure::Timeout);
        }
        match host.connect(AGENT_PORT, left.min(Duration::from_secs(5))) {
            Ok(stream) => return AgentClient::connect(stream, left).map_err(ConnectFailure::Agent),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::NotConnected
                        | io::ErrorKind::TimedOut
                ) =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(ConnectFailure::Agent(ClientError::Io(e.to_string()))),
        }
    }
}

/// Saves a warm template of a sandbox whose agent just answered into `dir` (see
/// [`crate::warm`]). A failure (a read-only cache in a jail, a full disk) costs only the
/// warm start of later runs, so it is logged, not returned.
fn save_template(vm: &RunningVm, image: &SandboxImage, dir: &Path) {
    let t0 = Instant::now();
    let staging = crate::warm::staging(dir);
    let saved = vm
        .save_snapshot(&staging)
        .map_err(SandboxError::from)
        .and_then(|_| image.write(&staging))
        .and_then(|_| {
            crate::warm::publish(&staging, dir)
                .map_err(|e| SandboxError::Snapshot(format!("{}: {e}", dir.display())))
        });
    match saved {
        Ok(()) => tracing::info!(
            "saved warm snapshot {} in {:.1} ms",
            dir.display(),
            t0.elapsed().as_secs_f64() * 1000.0
        ),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            tracing::warn!(
                "could not save a warm snapshot in {} ({e}): runs of this configuration boot cold",
                dir.display()
            );
        }
    }
}

/// Stops a VM that is still running and waits for it.
fn stop_and_wait(vm: RunningVm) -> VmOutcome {
    vm.stop_handle().stop();
    vm.wait()
}

/// A running sandbox. Dropping it powers the VM off.
#[derive(Debug)]
pub struct Sandbox {
    /// Whether it started from a warm template.
    warm_start: bool,
    /// The image it runs, if any: its run settings apply to commands.
    image: Option<crate::image::ImageRecord>,
    vm: Option<RunningVm>,
    agent: Option<AgentClient>,
    boot_time: Option<Duration>,
    ready_time: Duration,
    ready_at: Instant,
    cpus: u32,
    memory_mib: u64,
    /// The virtio-fs shares: tag, guest path, server (for their counters).
    shares: Vec<(String, String, Arc<PassthroughFs>)>,
    /// The sandbox's network stack, stopped with the sandbox.
    #[cfg(target_os = "linux")]
    netstack: Option<msb_netstack::stack::NetStack>,
    /// Learn mode's record (`--net learn`).
    #[cfg(target_os = "linux")]
    learner: Option<Arc<std::sync::Mutex<msb_netstack::learn::Learner>>>,
    /// The secrets and `on_violation` the sandbox started with: TLS interception was set up
    /// for them, so a policy change cannot alter them.
    #[cfg(target_os = "linux")]
    fixed_secrets: Option<(Vec<msb_netstack::policy::SecretSpec>, Option<String>)>,
}

impl Sandbox {
    /// A builder with 1 vCPU, 128 MiB, the default kernel.
    pub fn builder() -> SandboxBuilder {
        SandboxBuilder {
            cpus: 1,
            memory_mib: DEFAULT_MEMORY_MIB,
            kernel: None,
            console: false,
            hostname: "msb".into(),
            boot_timeout: env_boot_timeout().unwrap_or(DEFAULT_BOOT_TIMEOUT),
            start: crate::process_start(),
            defer_teardown: false,
            seccomp: msb_confine::Seccomp::Enforce,
            confine_caller: false,
            vsock_uds: None,
            vm_timeout: None,
            limits: Default::default(),
            fs_rate: None,
            volumes: Vec::new(),
            tmpfs: Vec::new(),
            rootfs: None,
            root_immutable: false,
            #[cfg(target_os = "linux")]
            network: None,
            restore: None,
            warm: false,
            image: None,
        }
    }

    /// Continues the sandbox saved in snapshot directory `dir` ([`Sandbox::snapshot`]):
    /// shorthand for `Sandbox::builder().restore_from(dir).start()`. A snapshot of a sandbox
    /// with shares or a network needs them given again: use the builder for it (the error
    /// says so).
    pub fn restore(dir: impl Into<PathBuf>) -> Result<Sandbox, SandboxError> {
        Sandbox::builder().restore_from(dir).start()
    }

    /// A one-shot command: boot, run `argv`, power off.
    pub fn command<I, S>(argv: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Command {
            builder: Sandbox::builder().warm(true),
            req: request(argv),
            timeout: None,
        }
    }

    /// The agent connection.
    pub fn agent(&self) -> &AgentClient {
        // Present until shutdown consumes the sandbox.
        self.agent
            .as_ref()
            .expect("agent present while the sandbox lives")
    }

    /// Boot-timer time since VMM start.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time
    }

    /// Time from VMM start until the agent answered.
    pub fn ready_time(&self) -> Duration {
        self.ready_time
    }

    /// Whether the sandbox continued a warm template rather than booting
    /// ([`SandboxBuilder::warm`]).
    pub fn warm_start(&self) -> bool {
        self.warm_start
    }

    /// The image the sandbox runs ([`SandboxBuilder::image`]).
    pub fn image(&self) -> Option<&crate::image::ImageRecord> {
        self.image.as_ref()
    }

    /// `req` with the image's settings applied where it leaves them unset (its `Env` under
    /// `req`'s, `WorkingDir`, `User`) and, with `entrypoint`, the command made
    /// `Entrypoint + (argv or Cmd)` as `docker run` does. Without an image, `req` as it is.
    pub fn image_request(
        &self,
        mut req: ExecRequest,
        entrypoint: bool,
    ) -> Result<ExecRequest, SandboxError> {
        if let Some(rec) = &self.image {
            crate::image::apply(&rec.name, &rec.config, &mut req, entrypoint)
                .map_err(|e| SandboxError::Image(e.to_string()))?;
        }
        Ok(req)
    }

    /// A handle that stops the VM at once (no clean power-off).
    pub fn stop_handle(&self) -> crate::vm::StopHandle {
        self.vm
            .as_ref()
            .expect("VM present while the sandbox lives")
            .stop_handle()
    }

    /// Waits until the VM stopped (the guest powered off, or it was stopped), at most
    /// `timeout`; true if it stopped.
    pub fn wait_stopped(&self, timeout: Option<Duration>) -> bool {
        let Some(vm) = self.vm.as_ref() else {
            return true;
        };
        match timeout {
            Some(t) => vm.wait_stopped(t),
            None => loop {
                if vm.wait_stopped(Duration::from_secs(3600)) {
                    return true;
                }
            },
        }
    }

    /// Stops the guest's vCPUs (its processes and clocks' consumers stand still; the host
    /// side of its devices keeps serving) until [`Sandbox::resume`]. Execs and file transfers
    /// are refused meanwhile, with [`SandboxError::Paused`]. Pausing twice does nothing.
    pub fn pause(&self) -> Result<(), SandboxError> {
        let vm = self.vm.as_ref().ok_or(crate::vm::PauseError::Stopped)?;
        Ok(vm.pause(PAUSE_TIMEOUT)?)
    }

    /// Saves the sandbox into snapshot directory `dir` (created if needed): the VM (vCPUs,
    /// memory, devices, the shares' open files) and the layout a restore must rebuild
    /// ([`SandboxImage`]). The guest stands still meanwhile and then carries on; a paused
    /// sandbox stays paused. Continue it with [`SandboxBuilder::restore_from`], as often as
    /// you like: every restore starts from the same state.
    pub fn snapshot(&self, dir: &Path) -> Result<(), SandboxError> {
        let vm = self.vm.as_ref().ok_or(crate::vm::PauseError::Stopped)?;
        vm.save_snapshot(dir)?;
        let network = match &self.netstack {
            Some(n) => Some(
                n.dns_bindings()
                    .map_err(|e| SandboxError::Network(format!("saving DNS bindings: {e}")))?,
            ),
            None => None,
        };
        SandboxImage::of(self.cpus, self.memory_mib, &self.shares, network).write(dir)
    }

    /// Lets a paused sandbox run again (nothing happens if it is not paused).
    pub fn resume(&self) {
        if let Some(vm) = &self.vm {
            vm.resume();
        }
    }

    /// Whether the sandbox is paused.
    pub fn is_paused(&self) -> bool {
        self.vm.as_ref().is_some_and(|vm| vm.is_paused())
    }

    /// The agent, unless the guest is paused (it could not answer).
    pub fn live_agent(&self) -> Result<&AgentClient, SandboxError> {
        if self.is_paused() {
            return Err(SandboxError::Paused);
        }
        Ok(self.agent())
    }

    /// Starts a process.
    pub fn exec(&self, req: ExecRequest) -> Result<ExecHandle, SandboxError> {
        Ok(self.live_agent()?.exec(req)?)
    }

    /// Runs `argv` and collects its output.
    pub fn output<I, S>(&self, argv: I) -> Result<ExecOutput, SandboxError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Ok(self.live_agent()?.exec(request(argv))?.output()?)
    }

    /// How many times each needle occurs in the guest's RAM now, in one pass (for audits
    /// such as "a secret's value never entered the guest").
    pub fn count_in_guest_memory(&self, needles: &[&[u8]]) -> Vec<usize> {
        self.vm
            .as_ref()
            .map_or_else(|| vec![0; needles.len()], |vm| vm.count_in_memory(needles))
    }

    /// Writes a file in the guest (parents created).
    pub fn write_file(
        &self,
        path: impl AsRef<OsStr>,
        data: &[u8],
        mode: u32,
    ) -> Result<(), SandboxError> {
        self.live_agent()?
            .write_file(path.as_ref().as_bytes(), mode, true, &mut &data[..])?;
        Ok(())
    }

    /// Reads a file from the guest.
    pub fn read_file(&self, path: impl AsRef<OsStr>) -> Result<Vec<u8>, SandboxError> {
        let mut out = Vec::new();
        self.live_agent()?
            .read_file(path.as_ref().as_bytes(), &mut out)?;
        Ok(out)
    }

    /// What the sandbox uses now: vCPU time, memory (host and guest), network, file
    /// system, processes. Asks the agent (a round trip); if it does not answer within 2 s the
    /// guest's part is left out.
    pub fn stats(&self) -> crate::stats::SandboxStats {
        use crate::stats::{FsStats, MemoryStats, NetStats, SandboxStats};
        let vm = self.vm.as_ref();
        // A paused guest cannot answer: its part is left out at once.
        let guest = self
            .agent
            .as_ref()
            .filter(|_| !self.is_paused())
            .and_then(|a| a.stats_within(Duration::from_secs(2)).ok())
            .map(Into::into);
        #[cfg(target_os = "linux")]
        let net = self.netstack.as_ref().map(|n| {
            let st = n.stats();
            let l = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            NetStats {
                bytes_out: l(&st.bytes_from_guest),
                bytes_in: l(&st.bytes_to_guest),
                packets_out: l(&st.frames_in),
                packets_in: l(&st.frames_to_guest),
                flows_out: st.flows_allowed(),
                denials_out: st.denials(),
                flows_in: l(&st.published_accepted),
                flows_open: l(&st.flows_open),
                flows_cut: l(&st.flows_cut),
                dns_answered: l(&st.dns_answered),
            }
        });
        #[cfg(not(target_os = "linux"))]
        let net = None;
        SandboxStats {
            uptime_s: self.ready_at.elapsed().as_secs_f64(),
            cpus: self.cpus,
            vcpu_time_s: vm.map_or(0.0, |v| v.vcpu_time().as_secs_f64()),
            memory: MemoryStats {
                guest_bytes: self.memory_mib << 20,
                host_resident_bytes: vm.map_or(0, |v| v.resident_memory()),
            },
            net,
            fs: self
                .shares
                .iter()
                .map(|(tag, path, fs)| {
                    let t = fs.totals();
                    FsStats {
                        tag: tag.clone(),
                        guest_path: path.clone(),
                        ops: t.ops,
                        bytes_read: t.bytes_read,
                        bytes_written: t.bytes_written,
                    }
                })
                .collect(),
            guest,
        }
    }

    /// Learn mode (`--net learn`): the smallest policy file that admits exactly what the
    /// guest has reached so far (see `msb_netstack::learn`); `None` in other modes.
    #[cfg(target_os = "linux")]
    pub fn suggested_policy(&self) -> Option<String> {
        self.learner
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).suggest())
    }

    /// The egress policy in force (`None` without a network).
    #[cfg(target_os = "linux")]
    pub fn policy(&self) -> Option<msb_netstack::policy::Policy> {
        self.netstack.as_ref().map(|n| n.policy())
    }

    /// Replaces the egress policy while the sandbox runs: open flows the new policy denies
    /// are ended at once (the guest sees a reset, the audit log says why), the rest kept;
    /// DNS answers and new flows are decided by it from then on. Secrets and
    /// `on_violation` cannot change (TLS interception was set up for them): a policy that
    /// changes them is refused and the old one stays in force.
    #[cfg(target_os = "linux")]
    pub fn set_policy(
        &self,
        policy: msb_netstack::policy::Policy,
    ) -> Result<msb_netstack::stack::PolicyChanged, SandboxError> {
        let Some(n) = self.netstack.as_ref() else {
            return Err(SandboxError::Policy(
                "the sandbox has no network (start it with --net)".into(),
            ));
        };
        let fixed = self.fixed_secrets.clone().unwrap_or_default();
        if (policy.secrets.as_slice(), &policy.on_violation) != (fixed.0.as_slice(), &fixed.1) {
            return Err(SandboxError::Policy(
                "secrets and on_violation are fixed when the sandbox starts; the policy in force is unchanged".into(),
            ));
        }
        n.set_policy(policy)
            .map_err(|e| SandboxError::Policy(e.to_string()))
    }

    /// Ends the sandbox: the agent syncs the guest's file systems (so its writes to shares
    /// have reached the host), then the VM is stopped and torn down. A guest whose agent does
    /// not answer is stopped as it is.
    pub fn shutdown(mut self) -> Result<VmOutcome, SandboxError> {
        self.shutdown_inner()
    }

    fn shutdown_inner(&mut self) -> Result<VmOutcome, SandboxError> {
        let Some(vm) = self.vm.take() else {
            return Err(SandboxError::Agent(ClientError::Closed));
        };
        let at = || crate::process_start().elapsed().as_secs_f64() * 1000.0;
        tracing::debug!("shutdown asked {:.3} ms after VMM start", at());
        // A paused guest could not power itself off.
        vm.resume();
        let agent = self.agent.take();
        let acked = agent
            .as_ref()
            .map(|a| a.shutdown().is_ok())
            .unwrap_or(false);
        drop(agent);
        // The agent acknowledges after sync(2): every write to a share has reached the host.
        // Nothing else of a guest about to be destroyed needs its kernel's power-off path
        // (a tenth of a second in the L2 VM), so it is stopped at once, acknowledged or not.
        tracing::debug!("shutdown acknowledged: {acked} at {:.3} ms", at());
        let outcome = stop_and_wait(vm);
        tracing::debug!("VM torn down at {:.3} ms", at());
        Ok(outcome)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.vm.is_some() {
            let _ = self.shutdown_inner();
        }
    }
}

/// An [`ExecRequest`] for `argv`.
pub fn request<I, S>(argv: I) -> ExecRequest
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    ExecRequest {
        argv: argv
            .into_iter()
            .map(|a| a.as_ref().as_bytes().to_vec())
            .collect(),
        ..Default::default()
    }
}

/// A one-shot command in a fresh sandbox.
#[derive(Debug, Clone)]
pub struct Command {
    builder: SandboxBuilder,
    req: ExecRequest,
    timeout: Option<Duration>,
}

/// How a one-shot command ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub status: ExitStatus,
    /// The guest's OOM killer ended the command: the sandbox needs more memory.
    pub oom_killed: bool,
    /// Boot-timer time since VMM start.
    pub boot_time: Option<Duration>,
    /// VMM start until the agent answered.
    pub ready_time: Duration,
    /// Whether the sandbox continued a warm template ([`SandboxBuilder::warm`]).
    pub warm: bool,
}

/// Captured output of a one-shot command.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    /// The guest's OOM killer ended the command: the sandbox needs more memory.
    pub oom_killed: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub boot_time: Option<Duration>,
    /// Whether the sandbox continued a warm template ([`SandboxBuilder::warm`]).
    pub warm: bool,
}

impl Command {
    /// Adds an environment variable.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.req.env.push((
            key.as_ref().as_bytes().to_vec(),
            value.as_ref().as_bytes().to_vec(),
        ));
        self
    }

    /// The working directory in the guest.
    pub fn workdir(mut self, dir: impl AsRef<OsStr>) -> Self {
        self.req.workdir = Some(dir.as_ref().as_bytes().to_vec());
        self
    }

    /// Number of vCPUs.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.builder = self.builder.cpus(cpus);
        self
    }

    /// Guest memory in MiB.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.builder = self.builder.memory_mib(mib);
        self
    }

    /// Kill the command after this long ([`SandboxError::Timeout`]).
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self.req.timeout_ms = timeout.map(|t| t.as_millis().max(1) as u64);
        self
    }

    /// Show the guest kernel's console on standard error.
    pub fn console(mut self, on: bool) -> Self {
        self.builder = self.builder.console(on);
        self
    }

    /// Boot this kernel instead of the default one.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.builder = self.builder.kernel(path);
        self
    }

    /// Boot the kernel even when a warm snapshot of this configuration is cached
    /// (see [`SandboxBuilder::warm`], on by default for a command).
    pub fn cold(mut self, on: bool) -> Self {
        self.builder = self.builder.warm(!on);
        self
    }

    /// Runs in the OCI image `name` ([`SandboxBuilder::image`]): its Entrypoint, Env,
    /// WorkingDir and User apply as with `docker run`; an empty argv runs its Cmd.
    pub fn image(
        mut self,
        name: &str,
        opts: &crate::image::PullOptions,
    ) -> Result<Self, SandboxError> {
        self.builder = self.builder.image(name, opts)?;
        Ok(self)
    }

    /// Changes the sandbox configuration.
    pub fn configure(mut self, f: impl FnOnce(SandboxBuilder) -> SandboxBuilder) -> Self {
        self.builder = f(self.builder);
        self
    }

    /// Runs the command with its output on this process's stdout and stderr.
    pub fn status(self) -> Result<RunOutcome, SandboxError> {
        self.run_with(&mut io::stdout(), &mut io::stderr())
    }

    /// Runs the command and captures its output.
    pub fn output(self) -> Result<Output, SandboxError> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = self.run_with(&mut out, &mut err)?;
        Ok(Output {
            status: r.status,
            oom_killed: r.oom_killed,
            stdout: out,
            stderr: err,
            boot_time: r.boot_time,
            warm: r.warm,
        })
    }

    /// Runs the command, writing its output to the given writers as it arrives.
    pub fn run_with(
        self,
        stdout: &mut dyn Write,
        stderr: &mut dyn Write,
    ) -> Result<RunOutcome, SandboxError> {
        // The whole VM also gets a deadline, in case the guest stops answering.
        let vm_timeout = self
            .timeout
            .map(|t| t + self.builder.boot_timeout + POWER_OFF_GRACE);
        let sb = self.builder.vm_timeout(vm_timeout).start()?;
        let req = sb.image_request(self.req, true)?;
        let mut h = sb.exec(req)?;
        let (mut status, mut oom_killed) = (None, false);
        while let Some(e) = h.next_event()? {
            match e {
                ExecEvent::Stdout(d) => {
                    let _ = stdout.write_all(&d).and_then(|_| stdout.flush());
                }
                ExecEvent::Stderr(d) => {
                    let _ = stderr.write_all(&d).and_then(|_| stderr.flush());
                }
                ExecEvent::Exited {
                    status: s,
                    timed_out,
                    oom_killed: oom,
                } => {
                    if timed_out {
                        let after = self.timeout.unwrap_or_default();
                        let _ = sb.shutdown();
                        return Err(SandboxError::Timeout { after });
                    }
                    status = Some(s);
                    oom_killed = oom;
                }
                ExecEvent::Started { .. } => {}
            }
        }
        let (boot_time, ready_time, warm) = (sb.boot_time(), sb.ready_time(), sb.warm_start());
        sb.shutdown()?;
        let status = status.ok_or(SandboxError::Agent(ClientError::Closed))?;
        Ok(RunOutcome {
            status,
            oom_killed,
            boot_time,
            ready_time,
            warm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_specs() {
        let v = Volume::parse("/srv:/data").unwrap();
        assert_eq!((v.read_only, v.cache), (false, CachePolicy::Auto));
        let v = Volume::parse("rel/dir:/d:ro,cache=none").unwrap();
        assert_eq!((v.read_only, v.cache), (true, CachePolicy::None));
        assert_eq!(v.host, PathBuf::from("rel/dir"));
        for bad in [
            ":/d",
            "/srv",
            "/srv:rel",
            "/srv:/d:xx",
            "/srv:/d:cache=fast",
            "/a:/b:ro:x",
        ] {
            assert!(Volume::parse(bad).is_err(), "{bad}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn publish_specs() {
        let p = Publish::parse("8080:80").unwrap();
        assert_eq!(
            (p.host.to_string(), p.guest_port, p.udp),
            ("127.0.0.1:8080".into(), 80, false)
        );
        let p = Publish::parse("0.0.0.0:5353:53/udp").unwrap();
        assert_eq!((p.host.to_string(), p.udp), ("0.0.0.0:5353".into(), true));
        let p = Publish::parse("[::1]:8443:443/tcp").unwrap();
        assert_eq!(p.host.to_string(), "[::1]:8443");
        for bad in [
            "80",
            "0:80",
            "8080:0",
            "8080:80/sctp",
            "x:80:80",
            "8080:+80",
            ":80",
            "70000:80",
        ] {
            assert!(Publish::parse(bad).is_err(), "{bad}");
        }
    }
}
