//! Building, running and stopping a VM: guest memory, kernel and initramfs, legacy devices,
//! one thread per vCPU and an epoll event loop (event-manager) that owns the VM's lifetime.
//!
//! ```no_run
//! use msb_vmm::vm::VmBuilder;
//! let outcome = VmBuilder::new("/path/to/vmlinux")
//!     .cmdline("console=ttyS0 reboot=k panic=-1")
//!     .cpus(2)
//!     .memory_mib(256)
//!     .run()?;
//! println!("boot took {:?}, exit {:?}", outcome.boot_time, outcome.exit);
//! # Ok::<(), msb_vmm::vm::VmError>(())
//! ```

use msb_confine::{Seccomp, ThreadKind};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use msb_devices::boot_timer::{BootTimer, BOOT_TIMER_LEN};
use msb_devices::bus::{lock, Bus};
use msb_devices::fs::passthrough::PassthroughFs;
use msb_devices::serial::{ConsoleRing, ConsoleSink, SerialDevice, SerialSnapshot};
use msb_devices::virtio::fs::FsDevice;
use msb_devices::virtio::mmio::{MmioState, MmioTransport, MMIO_LEN, QUEUE_NOTIFY};
use msb_devices::virtio::vsock::hybrid::HybridListener;
use msb_devices::virtio::vsock::{VsockDevice, VsockHost};
use msb_devices::virtio::{IrqStatus, VirtioDevice};
use msb_devices::Interrupt;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::arch::{self, BootError, BootInfo, BOOT_TIMER_START, MAX_CPUS, VIRTIO_MMIO_START};
use crate::hypervisor::{self, Hypervisor, HypervisorError, Kicker, VcpuBoot, VmExit};
use crate::loader::{self, KernelInfo, LoaderError};
use crate::snapshot::{self, SnapshotError};
use serde::{Deserialize, Serialize};

/// Command line used when none is given (the architecture's: serial console, power-off on
/// reboot, reboot at once on panic).
pub use crate::arch::DEFAULT_CMDLINE;

/// Smallest guest memory accepted at all; Linux guests need more (checked against the image).
pub const MIN_MEMORY_MIB: u64 = 8;
/// Smallest memory a Linux guest is allowed: below this our kernel cannot reach user space.
pub const MIN_LINUX_MEMORY_MIB: u64 = 32;
/// Largest guest memory accepted (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Most shared directories (virtio-fs devices) a VM can have.
pub const MAX_SHARES: usize = 8;
/// virtio-mmio slots: the vsock device first, then the shares, then the network card.
const VSOCK_SLOT: usize = 0;
const NET_SLOT: usize = 1 + MAX_SHARES;
const _: () = assert!(
    NET_SLOT < arch::VIRTIO_SLOTS,
    "every slot needs an interrupt line"
);

/// Where virtio-mmio slot `slot` has its registers, and its interrupt line.
fn virtio_slot(slot: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_START + MMIO_LEN * slot as u64,
        arch::virtio_irq(slot),
    )
}

/// Console lines kept for error reports.
const CONSOLE_TAIL_LINES: usize = 40;
/// Console bytes kept in the ring.
const CONSOLE_RING_BYTES: usize = 64 * 1024;

/// Errors starting a VM. User mistakes come first, each naming its fix.
#[derive(Debug, Error)]
pub enum VmError {
    #[error("--cpus {0} is out of range: use 1 to {MAX_CPUS}")]
    BadCpus(u32),
    #[error("{0} shared directories: at most {MAX_SHARES} are supported")]
    TooManyShares(usize),
    #[error("{0}")]
    BadShare(String),
    /// One range, whichever end was missed: the smallest memory this kernel and initramfs
    /// can run in, up to the largest we map.
    #[error("--memory {given} MiB is out of range for this kernel and initramfs: use {min} to {MAX_MEMORY_MIB} MiB")]
    BadMemory { given: u64, min: u64 },
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("loading the kernel: {0}")]
    KernelLoad(String),
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("snapshot: {0}")]
    Pause(#[from] PauseError),
}

/// Where the guest's serial console goes. It is always kept in a ring buffer too, so a failed
/// boot can show its last lines.
#[derive(Default)]
pub enum Console {
    /// Not shown (the kernel runs `quiet`).
    #[default]
    Off,
    /// The VMM's standard output.
    Stdout,
    /// The VMM's standard error (keeps stdout clean for a workload's output).
    Stderr,
    /// Any writer.
    Writer(Box<dyn Write + Send>),
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Console::Off => "Off",
            Console::Stdout => "Stdout",
            Console::Stderr => "Stderr",
            Console::Writer(_) => "Writer",
        })
    }
}

/// The initramfs.
#[derive(Debug, Clone)]
pub enum Initrd {
    /// Read from a file.
    Path(PathBuf),
    /// Given in memory.
    Bytes(Arc<Vec<u8>>),
}

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off or reset itself (i8042 reset line, system event).
    PowerOff,
    /// The `timeout` elapsed first.
    Timeout(Duration),
    /// [`StopHandle::stop`] was called.
    Stopped,
    /// A vCPU shut down: x86 triple fault, the guest crashed.
    CpuShutdown { vcpu: u32 },
    /// The VMM could not continue (a vCPU error or a device declared the guest hostile).
    Fatal { vcpu: Option<u32>, message: String },
}

impl GuestExit {
    /// Whether the guest ended by itself, cleanly.
    pub fn is_power_off(&self) -> bool {
        *self == GuestExit::PowerOff
    }
}

impl std::fmt::Display for GuestExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestExit::PowerOff => write!(f, "guest powered off"),
            GuestExit::Timeout(d) => write!(f, "timed out after {} s", d.as_secs_f64()),
            GuestExit::Stopped => write!(f, "stopped by the host"),
            GuestExit::CpuShutdown { vcpu } => {
                write!(f, "guest crashed: vCPU {vcpu} triple-faulted")
            }
            GuestExit::Fatal {
                vcpu: Some(v),
                message,
            } => write!(f, "vCPU {v}: {message}"),
            GuestExit::Fatal {
                vcpu: None,
                message,
            } => write!(f, "{message}"),
        }
    }
}

/// How a VM run ended.
#[derive(Debug, Clone)]
pub struct VmOutcome {
    /// Why it stopped.
    pub exit: GuestExit,
    /// Boot-timer time since VMM start, if the guest signalled it.
    pub boot_time: Option<Duration>,
    /// The last console lines (kept even when the console is off).
    pub console_tail: Vec<String>,
    /// Whether the console shows a Linux kernel panic.
    pub kernel_panicked: bool,
}

struct StopState {
    reason: Mutex<Option<GuestExit>>,
    /// Woken when the guest signals boot or the VM stops (see `RunningVm::wait_boot`).
    boot: Mutex<Option<Duration>>,
    boot_cond: std::sync::Condvar,
    /// Wakes the event loop; `None` if it could not be created (fd exhaustion), which
    /// `start` reports.
    evt: Option<EventFd>,
}

impl StopState {
    fn request(&self, why: GuestExit) {
        let mut r = lock(&self.reason);
        if r.is_none() {
            tracing::debug!("stop requested: {why}");
            *r = Some(why);
        }
        drop(r);
        if let Some(evt) = &self.evt {
            let _ = evt.write(1);
        }
        let _g = lock(&self.boot);
        self.boot_cond.notify_all();
    }
}

/// How long a snapshot waits for the vCPUs to park and to save themselves.
const PAUSE_FOR_SNAPSHOT: Duration = Duration::from_secs(5);

/// Where vCPU threads park while the VM is paused: at the top of their loop, between exits,
/// so no device access is half done and no exit is half handled.
#[derive(Debug, Default)]
struct PauseGate {
    state: Mutex<PauseState>,
    cond: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct PauseState {
    paused: bool,
    /// vCPU threads inside their loop, and how many of them are parked.
    live: u32,
    parked: u32,
    /// The VM is being torn down: nobody parks any more.
    closed: bool,
    /// Per vCPU index: a state save asked of the parked vCPU thread, and its answer.
    saves: Vec<SaveSlot>,
}

/// A vCPU's part in a snapshot: only its own thread may touch it (HVF's rule, kept on KVM).
#[derive(Debug, Default)]
enum SaveSlot {
    #[default]
    Idle,
    Requested,
    Done(Box<hypervisor::Result<hypervisor::VcpuSnapshot>>),
}

/// Why a pause did not happen.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PauseError {
    #[error("the VM has stopped")]
    Stopped,
    #[error("the vCPUs did not stop within {0:?} (left running)")]
    Timeout(Duration),
}

impl PauseGate {
    fn wait<'a>(
        &self,
        g: std::sync::MutexGuard<'a, PauseState>,
    ) -> std::sync::MutexGuard<'a, PauseState> {
        self.cond.wait(g).unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a change until `deadline`; None once it has passed (the guard is dropped).
    fn wait_until<'a>(
        &self,
        g: std::sync::MutexGuard<'a, PauseState>,
        deadline: Instant,
    ) -> Option<std::sync::MutexGuard<'a, PauseState>> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        Some(
            self.cond
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0,
        )
    }

    /// Parks the calling vCPU thread for as long as the VM is paused, saving its state when
    /// a snapshot asks.
    fn checkpoint(&self, index: u32, vcpu: &dyn hypervisor::Vcpu) {
        let mut s = lock(&self.state);
        if !s.paused || s.closed {
            return;
        }
        s.parked += 1;
        self.cond.notify_all();
        while s.paused && !s.closed {
            if let Some(slot) = s.saves.get_mut(index as usize) {
                if matches!(slot, SaveSlot::Requested) {
                    *slot = SaveSlot::Done(Box::new(vcpu.save_state()));
                    self.cond.notify_all();
                    continue;
                }
            }
            s = self.wait(s);
        }
        s.parked -= 1;
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.cond.notify_all();
    }
}

/// A vCPU thread's membership of the gate, given up when its loop ends (or panics).
struct LiveVcpu<'a>(&'a PauseGate);

impl<'a> LiveVcpu<'a> {
    fn join(gate: &'a PauseGate) -> Self {
        lock(&gate.state).live += 1;
        LiveVcpu(gate)
    }
}

impl Drop for LiveVcpu<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).live -= 1;
        self.0.cond.notify_all();
    }
}

/// The boot timer's notification: records the boot time for waiters.
#[derive(Debug)]
struct BootSignal {
    state: StopHandle,
    time: Arc<OnceLock<Duration>>,
}

impl Interrupt for BootSignal {
    fn trigger(&self) -> io::Result<()> {
        let mut b = lock(&self.state.0.boot);
        *b = self.time.get().copied();
        self.state.0.boot_cond.notify_all();
        drop(b);
        Ok(())
    }
}

/// Stops a VM from any thread.
#[derive(Clone)]
pub struct StopHandle(Arc<StopState>);

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopHandle").finish_non_exhaustive()
    }
}

impl StopHandle {
    /// Stops the VM ([`GuestExit::Stopped`]) unless it already stopped for another reason.
    pub fn stop(&self) {
        self.0.request(GuestExit::Stopped);
    }

    /// Stops the VM because the guest misbehaved ([`GuestExit::Fatal`]).
    pub fn fail(&self, message: impl Into<String>) {
        self.0.request(GuestExit::Fatal {
            vcpu: None,
            message: message.into(),
        });
    }

    /// Stops the VM as if the guest powered off.
    pub fn power_off(&self) {
        self.0.request(GuestExit::PowerOff);
    }
}

/// Fires a stop with a fixed reason; used as the i8042's reset line.
#[derive(Debug)]
struct StopLine {
    state: StopHandle,
    reason: GuestExit,
}

impl Interrupt for StopLine {
    fn trigger(&self) -> io::Result<()> {
        self.state.0.request(self.reason.clone());
        Ok(())
    }
}

/// Configures and starts a VM.
pub struct VmBuilder {
    kernel: PathBuf,
    initrd: Option<Initrd>,
    cmdline: Option<String>,
    cpus: u32,
    memory_mib: u64,
    console: Console,
    console_input: bool,
    timeout: Option<Duration>,
    vsock: bool,
    vsock_uds: Option<PathBuf>,
    shares: Vec<(String, Arc<PassthroughFs>)>,
    #[cfg(target_os = "linux")]
    net: Option<msb_devices::virtio::net::NetDevice>,
    start: Instant,
    hypervisor: Option<Arc<dyn Hypervisor>>,
    allow_pvm_linux: bool,
    defer_teardown: bool,
    seccomp: Seccomp,
    stop: StopHandle,
    /// Continue a saved VM instead of booting a kernel.
    restore: Option<Restore>,
}

/// A saved VM to continue: its state and the memory file mapped privately.
struct Restore {
    image: VmImage,
    memory: PathBuf,
}

/// The state file of a VM snapshot (see [`crate::snapshot`]).
#[derive(Serialize, Deserialize)]
struct VmImage {
    arch: String,
    memory: Vec<snapshot::MemoryRegion>,
    vm: hypervisor::VmSnapshot,
    vcpus: Vec<hypervisor::VcpuSnapshot>,
    devices: DevicesImage,
}

/// The VMM's own devices in a snapshot.
#[derive(Serialize, Deserialize)]
struct DevicesImage {
    console: SerialSnapshot,
    /// When the guest signalled boot (a restored guest does not signal again).
    boot_time_ns: Option<u64>,
    /// Each virtio-mmio transport by its base address.
    virtio: Vec<(u64, MmioState)>,
}

impl VmImage {
    /// Guest RAM in bytes, all regions together.
    fn ram_bytes(&self) -> u64 {
        self.memory.iter().map(|r| r.len).sum()
    }
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("kernel", &self.kernel)
            .field("initrd", &self.initrd)
            .field("cmdline", &self.cmdline)
            .field("cpus", &self.cpus)
            .field("memory_mib", &self.memory_mib)
            .field("console", &self.console)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl VmBuilder {
    /// A VM booting `kernel` (an uncompressed ELF vmlinux) with 1 vCPU and 128 MiB.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmBuilder {
            kernel: kernel.into(),
            initrd: None,
            cmdline: None,
            cpus: 1,
            memory_mib: 128,
            console: Console::Off,
            console_input: false,
            timeout: None,
            start: crate::process_start(),
            hypervisor: None,
            allow_pvm_linux: std::env::var_os("MSB_ALLOW_PVM").is_some(),
            restore: None,
            defer_teardown: false,
            seccomp: Seccomp::Enforce,
            vsock: true,
            vsock_uds: None,
            shares: Vec::new(),
            #[cfg(target_os = "linux")]
            net: None,
            stop: StopHandle(Arc::new(StopState {
                reason: Mutex::new(None),
                boot: Mutex::new(None),
                boot_cond: std::sync::Condvar::new(),
                evt: EventFd::new(EFD_NONBLOCK).ok(),
            })),
        }
    }

    /// The initramfs.
    pub fn initrd(mut self, initrd: Initrd) -> Self {
        self.initrd = Some(initrd);
        self
    }

    /// The kernel command line; [`DEFAULT_CMDLINE`] (plus `quiet` when the console is off) if unset.
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.cmdline = Some(cmdline.into());
        self
    }

    /// Appends to the command line (set with [`VmBuilder::cmdline`], else the default).
    pub fn append_cmdline(mut self, extra: &str) -> Self {
        let base = self
            .cmdline
            .take()
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
        self.cmdline = Some(base + extra);
        self
    }

    /// Number of vCPUs (1 to 64).
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// Guest memory in MiB.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Where the serial console goes.
    pub fn console(mut self, console: Console) -> Self {
        self.console = console;
        self
    }

    /// Forward this process's standard input to the serial console.
    pub fn console_input(mut self, on: bool) -> Self {
        self.console_input = on;
        self
    }

    /// Give the guest a virtio-fs device serving `fs` under `tag` (`mount -t virtiofs TAG`).
    /// Gives the guest this virtio-net card (its other end, the `NetPort`, goes to a netstack).
    #[cfg(target_os = "linux")]
    pub fn net(mut self, device: msb_devices::virtio::net::NetDevice) -> Self {
        self.net = Some(device);
        self
    }

    pub fn share(mut self, tag: impl Into<String>, fs: Arc<PassthroughFs>) -> Self {
        self.shares.push((tag.into(), fs));
        self
    }

    /// Give the guest a virtio-vsock device (on by default): the host↔guest channel.
    pub fn vsock(mut self, on: bool) -> Self {
        self.vsock = on;
        self
    }

    /// Also serve the vsock device on this Unix socket (hybrid vsock: a client writes
    /// `CONNECT <port>\n` and reads `OK <port>\n`, then talks to the guest port).
    pub fn vsock_uds(mut self, path: impl Into<PathBuf>) -> Self {
        self.vsock_uds = Some(path.into());
        self
    }

    /// Stop the VM after this long.
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// The instant boot times are measured from (default: this process's start).
    pub fn start_time(mut self, start: Instant) -> Self {
        self.start = start;
        self
    }

    /// Use this hypervisor instead of the platform default.
    pub fn hypervisor(mut self, hv: Arc<dyn Hypervisor>) -> Self {
        self.hypervisor = Some(hv);
        self
    }

    /// For programs that exit right after the VM stops: keep the VM's kernel objects and guest
    /// memory until the process exits instead of destroying them when `wait` returns.
    /// Destroying a KVM VM costs an RCU grace period (10-20 ms on some hosts); with
    /// [`crate::host::exit_detaching_teardown`] the process then exits without waiting for it.
    pub fn defer_teardown_to_exit(mut self, on: bool) -> Self {
        self.defer_teardown = on;
        self
    }

    /// Whether the VM's threads (vCPUs, event loop, device workers, vsock socket) install
    /// their seccomp filters before the guest runs: they do unless this is `Off`, which is for
    /// debugging a filter (`--no-seccomp`). Capabilities are dropped either way.
    pub fn seccomp(mut self, mode: Seccomp) -> Self {
        self.seccomp = mode;
        self
    }

    /// A handle that stops the VM; usable before and after `start`.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// A VM that continues the one saved in snapshot directory `dir` (vCPUs, in-kernel
    /// devices and memory; the memory file is mapped privately, so pages load as the guest
    /// touches them and its writes never reach the file). The vCPU count and memory size are
    /// the saved VM's.
    pub fn restore(dir: &Path) -> Result<Self, VmError> {
        let image: VmImage = snapshot::read_state(dir)?;
        let memory = dir.join(snapshot::MEMORY_FILE);
        let file_len = std::fs::metadata(&memory)
            .map_err(|source| VmError::Io {
                what: "the snapshot's memory file",
                source,
            })?
            .len();
        check_image(&image, file_len)?;
        let cpus = image.vcpus.len() as u32;
        let mib = image.ram_bytes() >> 20;
        let mut b = VmBuilder::new(PathBuf::new()).cpus(cpus).memory_mib(mib);
        b.restore = Some(Restore { image, memory });
        Ok(b)
    }

    /// Boots the VM and waits until it stops.
    pub fn run(self) -> Result<VmOutcome, VmError> {
        Ok(self.start()?.wait())
    }

    /// Boots the VM; returns once every vCPU is created and running.
    pub fn start(mut self) -> Result<RunningVm, VmError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(VmError::BadCpus(self.cpus));
        }
        if self.stop.0.evt.is_none() {
            return Err(VmError::Io {
                what: "creating an eventfd",
                source: io::Error::other("the process is out of file descriptors"),
            });
        }
        let restore = self.restore.take();
        let boot = match &restore {
            Some(_) => None,
            None => {
                let info = arch::inspect_kernel(&self.kernel)?;
                if info.is_linux && crate::host::is_pvm() && !self.allow_pvm_linux {
                    return Err(HypervisorError::Pvm.into());
                }
                let initrd = match &self.initrd {
                    None => None,
                    Some(Initrd::Path(p)) => Some(Arc::new(loader::read_initrd(p)?)),
                    Some(Initrd::Bytes(b)) => Some(b.clone()),
                };
                let initrd_addr = check_fit(
                    &info,
                    initrd.as_ref().map(|i| i.len() as u64),
                    self.memory_mib,
                )?;
                Some((info, initrd, initrd_addr))
            }
        };
        let mem_bytes = self.memory_mib << 20;

        let hv = match &self.hypervisor {
            Some(h) => h.clone(),
            None => hypervisor::default_hypervisor()?,
        };
        let mem = match &restore {
            Some(r) => map_snapshot_memory(&r.memory, &r.image.memory)?,
            None => {
                let ranges: Vec<(GuestAddress, usize)> = arch::ram_ranges(mem_bytes)
                    .into_iter()
                    .map(|(a, l)| (GuestAddress(a), l as usize))
                    .collect();
                GuestMemoryMmap::<()>::from_ranges(&ranges)
                    .map_err(|e| VmError::Memory(e.to_string()))?
            }
        };
        let vm = hv.create_vm(self.cpus, &mem)?;
        if let Some(r) = &restore {
            vm.restore_state(&r.image.vm)?;
        }

        let cmdline = match &self.cmdline {
            Some(c) => c.clone(),
            None if matches!(self.console, Console::Off) => format!("{DEFAULT_CMDLINE} quiet"),
            None => DEFAULT_CMDLINE.to_string(),
        };
        if self.shares.len() > MAX_SHARES {
            return Err(VmError::TooManyShares(self.shares.len()));
        }
        // The virtio-mmio devices in their slots, as the boot information announces them.
        let mut virtio = Vec::new();
        if self.vsock {
            virtio.push(virtio_slot(VSOCK_SLOT));
        }
        for i in 0..self.shares.len() {
            virtio.push(virtio_slot(1 + i));
        }
        #[cfg(target_os = "linux")]
        if self.net.is_some() {
            virtio.push(virtio_slot(NET_SLOT));
        }
        // The kernel, initramfs and boot information (a restored VM has them in its memory).
        let protocol = match boot {
            None => None,
            Some((info, initrd, initrd_addr)) => {
                let mut kfile =
                    File::open(&self.kernel).map_err(|source| LoaderError::KernelIo {
                        path: self.kernel.clone(),
                        source,
                    })?;
                let protocol = arch::load_kernel(&mem, &mut kfile, info.pvh_entry)
                    .map_err(VmError::KernelLoad)?;
                drop(kfile);
                let initrd_loc = match (&initrd, initrd_addr) {
                    (Some(data), Some(addr)) => {
                        mem.write_slice(data, GuestAddress(addr))
                            .map_err(|e| VmError::Memory(e.to_string()))?;
                        Some((addr, data.len() as u64))
                    }
                    _ => None,
                };
                arch::write_boot_info(
                    &mem,
                    &BootInfo {
                        entry: protocol,
                        cmdline: &cmdline,
                        initrd: initrd_loc,
                        mem_bytes,
                        cpus: self.cpus,
                        virtio: &virtio,
                    },
                )?;
                tracing::debug!(kernel = %self.kernel.display(), ?protocol, cpus = self.cpus, memory_mib = self.memory_mib, "guest loaded");
                Some(protocol)
            }
        };

        // Devices.
        let ring = Arc::new(Mutex::new(ConsoleRing::new(CONSOLE_RING_BYTES)));
        let echo: Option<Box<dyn Write + Send>> = match self.console {
            Console::Off => None,
            Console::Stdout => Some(Box::new(io::stdout())),
            Console::Stderr => Some(Box::new(io::stderr())),
            Console::Writer(w) => Some(w),
        };
        let reset = Arc::new(StopLine {
            state: self.stop.clone(),
            reason: GuestExit::PowerOff,
        });
        let boot_time = Arc::new(OnceLock::new());
        if let Some(ns) = restore.as_ref().and_then(|r| r.image.devices.boot_time_ns) {
            let _ = boot_time.set(Duration::from_nanos(ns));
        }
        let boot_signal = Arc::new(BootSignal {
            state: self.stop.clone(),
            time: boot_time.clone(),
        });
        let timer = Arc::new(Mutex::new(BootTimer::new(
            self.start,
            boot_time.clone(),
            Some(boot_signal),
        )));

        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let bus_err = |e: msb_devices::bus::BusError| VmError::Memory(e.to_string());
        let console = arch::add_platform_devices(
            &*vm,
            &mut pio,
            &mut mmio,
            ConsoleSink::new(ring.clone(), echo),
            reset,
            restore.as_ref().map(|r| &r.image.devices.console),
        )
        .map_err(|e| match e {
            arch::PlatformError::Hypervisor(e) => VmError::from(e),
            e => VmError::Memory(e.to_string()),
        })?;
        mmio.insert(BOOT_TIMER_START, BOOT_TIMER_LEN, timer)
            .map_err(bus_err)?;
        // A virtio device on its MMIO slot: transport, interrupt line, queue notifications.
        let seccomp = self.seccomp;
        // Device workers start when the guest's drivers activate them, on vCPU threads: they
        // are started by the launcher instead, which must exist before the vCPUs are confined.
        msb_devices::virtio::start_worker_launcher(seccomp).map_err(|source| VmError::Io {
            what: "starting the device worker launcher",
            source,
        })?;
        let mut transports: Vec<(u64, Arc<Mutex<MmioTransport>>)> = Vec::new();
        let mut attach = |device: Box<dyn VirtioDevice>, base: u64, gsi: u32| {
            let irq = IrqStatus::new(vm.create_irq(gsi)?);
            let mut transport =
                MmioTransport::new(device, mem.clone(), irq).map_err(|source| VmError::Io {
                    what: "creating a virtio-mmio transport",
                    source,
                })?;
            transport.set_seccomp(seccomp);
            for (q, evt) in transport.queue_evts().iter().enumerate() {
                vm.register_ioevent(base + QUEUE_NOTIFY, q as u32, evt)?;
            }
            let transport = Arc::new(Mutex::new(transport));
            transports.push((base, transport.clone()));
            mmio.insert(base, MMIO_LEN, transport).map_err(bus_err)
        };
        let mut vsock = None;
        let mut hybrid = None;
        if self.vsock {
            let dev_err = |what| move |source| VmError::Io { what, source };
            let (device, host) =
                VsockDevice::new().map_err(dev_err("creating the vsock device"))?;
            let (base, irq) = virtio_slot(VSOCK_SLOT);
            attach(Box::new(device), base, irq)?;
            if let Some(path) = &self.vsock_uds {
                hybrid = Some(HybridListener::bind(path, host.clone(), seccomp).map_err(
                    |source| VmError::Io {
                        what: "binding the vsock socket",
                        source,
                    },
                )?);
            }
            vsock = Some(host);
        }
        for (i, (tag, fs)) in self.shares.iter().enumerate() {
            let device = FsDevice::new(tag, fs.clone()).map_err(VmError::BadShare)?;
            let (base, irq) = virtio_slot(1 + i);
            attach(Box::new(device), base, irq)?;
        }
        #[cfg(target_os = "linux")]
        if let Some(device) = self.net.take() {
            let (base, irq) = virtio_slot(NET_SLOT);
            attach(Box::new(device), base, irq)?;
        }
        if let Some(r) = &restore {
            restore_transports(&transports, &r.image.devices.virtio)?;
        }
        let vcpu_states = restore.map(|r| Arc::new(r.image.vcpus));
        let buses = Arc::new(Buses { pio, mmio });

        // vCPU threads: each creates its vCPU (HVF binds vCPUs to threads), reports, then all
        // start together so the boot CPU cannot send SIPIs to vCPUs that do not exist yet.
        let running = Arc::new(AtomicBool::new(true));
        let gate = Arc::new(PauseGate::default());
        let go = Arc::new(Barrier::new(self.cpus as usize + 1));
        let abort = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<Arc<dyn Kicker>, HypervisorError>>();
        let mut threads = Vec::with_capacity(self.cpus as usize);
        let mut vcpu_clocks = Vec::with_capacity(self.cpus as usize);
        for index in 0..self.cpus {
            let vm = vm.clone();
            let buses = buses.clone();
            let stop = self.stop.clone();
            let running = running.clone();
            let gate = gate.clone();
            let go = go.clone();
            let abort = abort.clone();
            let ready = ready_tx.clone();
            let boot = VcpuBoot {
                index,
                count: self.cpus,
                entry: if index == 0 { protocol } else { None },
            };
            let saved = vcpu_states.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    let confined = |v| {
                        msb_confine::enter(ThreadKind::Vcpu, seccomp)
                            .map(|()| v)
                            .map_err(|e| HypervisorError::Vcpu {
                                index,
                                msg: e.to_string(),
                            })
                    };
                    let restored = |mut v: Box<dyn hypervisor::Vcpu>| match &saved {
                        Some(states) => match states.get(index as usize) {
                            Some(s) => v.restore_state(s).map(|()| v),
                            None => Err(HypervisorError::Vcpu {
                                index,
                                msg: "no saved state for this vCPU".into(),
                            }),
                        },
                        None => Ok(v),
                    };
                    let mut vcpu = match vm.create_vcpu(&boot).and_then(restored).and_then(confined)
                    {
                        Ok(v) => {
                            let _ = ready.send(Ok(v.kicker()));
                            v
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            go.wait();
                            return;
                        }
                    };
                    drop(ready);
                    // Counted before `start` returns, so a pause right after waits for it.
                    let _live = LiveVcpu::join(&gate);
                    go.wait();
                    if abort.load(Ordering::SeqCst) {
                        return;
                    }
                    let run = std::panic::AssertUnwindSafe(|| {
                        vcpu_loop(index, vcpu.as_mut(), &buses, &stop, &running, &gate)
                    });
                    if std::panic::catch_unwind(run).is_err() {
                        stop.0.request(GuestExit::Fatal {
                            vcpu: Some(index),
                            message: "internal VMM error (a bug; see the log above)".into(),
                        });
                    }
                })
                .map_err(|source| VmError::Io {
                    what: "spawning a vCPU thread",
                    source,
                })?;
            vcpu_clocks.push(cpu_clock(&t));
            threads.push(t);
        }
        drop(ready_tx);
        let mut kickers = Vec::with_capacity(self.cpus as usize);
        let mut first_err = None;
        for _ in 0..self.cpus {
            match ready_rx.recv() {
                Ok(Ok(k)) => kickers.push(k),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(HypervisorError::Vcpu {
                        index: 0,
                        msg: "vCPU thread died during set-up".into(),
                    });
                }
            }
        }
        if let Some(e) = first_err {
            abort.store(true, Ordering::SeqCst);
            go.wait();
            for t in threads {
                let _ = t.join();
            }
            return Err(e.into());
        }
        go.wait();

        let stdin_to_console = self.console_input.then(|| console.clone());
        let vm_for_snapshots = vm.clone();
        let shared = LoopShared {
            stop: self.stop.clone(),
            running,
            gate: gate.clone(),
            kickers: kickers.clone(),
            threads,
            ring,
            boot_time: boot_time.clone(),
            timeout: self.timeout,
            stdin_to_console,
            buses,
            hybrid,
            defer_teardown: self.defer_teardown,
            vm,
            mem: mem.clone(),
        };
        let event_loop = std::thread::Builder::new()
            .name("vmm-events".into())
            .spawn(move || {
                if let Err(e) = msb_confine::enter(ThreadKind::Events, seccomp) {
                    shared.stop.0.request(GuestExit::Fatal {
                        vcpu: None,
                        message: e.to_string(),
                    });
                }
                shared.run()
            })
            .map_err(|source| VmError::Io {
                what: "spawning the event loop",
                source,
            })?;
        Ok(RunningVm {
            stop: self.stop,
            boot_time,
            vsock,
            event_loop: Some(event_loop),
            mem,
            vcpu_clocks: vcpu_clocks.into_iter().flatten().collect(),
            gate,
            kickers,
            vm: vm_for_snapshots,
            console,
            transports,
        })
    }
}

/// A virtio transport's snapshot error, naming the device by its address.
fn device_error(base: u64, e: impl std::fmt::Display) -> VmError {
    SnapshotError::Invalid(format!("the virtio device at {base:#x}: {e}")).into()
}

/// The virtio transports with their workers stopped; dropping it lets them run again.
struct Quiesced<'a>(&'a [(u64, Arc<Mutex<MmioTransport>>)]);

impl<'a> Quiesced<'a> {
    fn new(transports: &'a [(u64, Arc<Mutex<MmioTransport>>)]) -> Result<Self, VmError> {
        for (i, (base, t)) in transports.iter().enumerate() {
            let r = lock(t).quiesce();
            if let Err(e) = r {
                // Those before this one run again as this drops.
                drop(Quiesced(&transports[..i]));
                return Err(device_error(*base, e));
            }
        }
        Ok(Quiesced(transports))
    }

    fn save(&self) -> Result<Vec<(u64, MmioState)>, VmError> {
        self.0
            .iter()
            .map(|(base, t)| {
                lock(t)
                    .save_state()
                    .map(|s| (*base, s))
                    .map_err(|e| device_error(*base, e))
            })
            .collect()
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        for (base, t) in self.0 {
            if let Err(e) = lock(t).resume() {
                tracing::error!("the virtio device at {base:#x} cannot run again: {e}");
            }
        }
    }
}

/// Puts each transport in its saved state; the saved VM must have had exactly these devices.
fn restore_transports(
    transports: &[(u64, Arc<Mutex<MmioTransport>>)],
    saved: &[(u64, MmioState)],
) -> Result<(), VmError> {
    let ours: Vec<u64> = transports.iter().map(|(b, _)| *b).collect();
    let theirs: Vec<u64> = saved.iter().map(|(b, _)| *b).collect();
    if ours != theirs {
        return Err(SnapshotError::Invalid(format!(
            "the snapshot's VM had virtio devices at {theirs:#x?}, this one has them at {ours:#x?}: restore with the same devices (vsock, shares, network) as the snapshotted sandbox"
        ))
        .into());
    }
    for ((base, t), (_, state)) in transports.iter().zip(saved) {
        lock(t)
            .restore_state(state)
            .map_err(|e| device_error(*base, e))?;
    }
    Ok(())
}

/// What a restore checks of a decoded state file before anything is created: this host's
/// architecture, 1 to MAX_CPUS vCPUs, a sane memory layout within a file of `file_len` bytes.
fn check_image(image: &VmImage, file_len: u64) -> Result<(), VmError> {
    if image.arch != std::env::consts::ARCH {
        return Err(SnapshotError::Arch {
            found: image.arch.clone(),
            here: std::env::consts::ARCH,
        }
        .into());
    }
    let cpus = image.vcpus.len();
    if cpus == 0 || cpus > MAX_CPUS as usize {
        return Err(VmError::BadCpus(cpus.min(u32::MAX as usize) as u32));
    }
    snapshot::check_regions(&image.memory, file_len, MAX_MEMORY_MIB << 20)?;
    Ok(())
}

/// Decodes and checks a snapshot state file's bytes as a restore would, for a memory file
/// of `file_len` bytes; returns the vCPU count and guest RAM size. (The fuzz target's entry.)
pub fn check_snapshot_state(bytes: &[u8], file_len: u64) -> Result<(u32, u64), VmError> {
    let image: VmImage = snapshot::decode(bytes, Path::new(snapshot::STATE_FILE))?;
    check_image(&image, file_len)?;
    Ok((image.vcpus.len() as u32, image.ram_bytes()))
}

/// Guest RAM from a snapshot's memory file, mapped privately: nothing is read up front, pages
/// load as the guest touches them, its writes stay in this process, and every VM restored
/// from the same file shares the pages none of them wrote.
fn map_snapshot_memory(
    path: &Path,
    regions: &[snapshot::MemoryRegion],
) -> Result<GuestMemoryMmap, VmError> {
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestRegionMmap};
    let file = Arc::new(File::open(path).map_err(|source| VmError::Io {
        what: "opening the snapshot's memory file",
        source,
    })?);
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        let fo = FileOffset::from_arc(file.clone(), r.file_offset);
        let mmap = MmapRegionBuilder::new_with_bitmap(r.len as usize, ())
            .with_file_offset(fo)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| VmError::Memory(format!("mapping the snapshot's memory: {e}")))?;
        out.push(
            GuestRegionMmap::new(mmap, GuestAddress(r.guest_addr))
                .ok_or_else(|| VmError::Memory("snapshot memory region overflows".into()))?,
        );
    }
    GuestMemoryMmap::from_regions(out).map_err(|e| VmError::Memory(e.to_string()))
}

/// Writes guest RAM to `path` as a sparse file (pages of zeros become holes: an idle
/// 4 GiB guest makes a file of what it used) and returns where each region went.
fn save_memory(mem: &GuestMemoryMmap, path: &Path) -> Result<Vec<snapshot::MemoryRegion>, VmError> {
    use std::io::{Seek, SeekFrom};
    use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
    const CHUNK: usize = 64 << 10;
    let io_err = |source| VmError::Io {
        what: "writing the snapshot's memory file",
        source,
    };
    snapshot::write_atomic_with(path, |f| {
        let mut regions = Vec::new();
        let mut offset = 0u64;
        let mut buf = vec![0u8; CHUNK];
        for region in mem.iter() {
            let (start, len) = (region.start_addr(), region.len());
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(CHUNK as u64) as usize;
                mem.read_slice(&mut buf[..n], start.unchecked_add(done))
                    .map_err(|e| VmError::Memory(e.to_string()))?;
                if buf[..n].iter().any(|&b| b != 0) {
                    f.seek(SeekFrom::Start(offset + done)).map_err(io_err)?;
                    f.write_all(&buf[..n]).map_err(io_err)?;
                }
                done += n as u64;
            }
            regions.push(snapshot::MemoryRegion {
                guest_addr: start.0,
                len,
                file_offset: offset,
            });
            offset += len;
        }
        f.set_len(offset).map_err(io_err)?;
        Ok(regions)
    })
}

/// The CPU-time clock of a thread (for [`RunningVm::vcpu_time`]).
fn cpu_clock<T>(t: &JoinHandle<T>) -> Option<libc::clockid_t> {
    use std::os::unix::thread::JoinHandleExt;
    let mut clock: libc::clockid_t = 0;
    // std gives an integer; musl's pthread_t is a pointer.
    #[allow(clippy::unnecessary_cast)]
    let thread = t.as_pthread_t() as libc::pthread_t;
    // SAFETY: the pthread_t is a live thread's (not yet joined); `clock` is a valid out-pointer.
    (unsafe { libc::pthread_getcpuclockid(thread, &mut clock) } == 0).then_some(clock)
}

/// Checks the kernel and initramfs fit in `memory_mib` and returns the initramfs address
/// (page-aligned, at the top of low RAM).
fn check_fit(
    info: &KernelInfo,
    initrd_len: Option<u64>,
    memory_mib: u64,
) -> Result<Option<u64>, VmError> {
    if info.load_start < arch::KERNEL_MIN_ADDR {
        return Err(VmError::KernelLoad(format!(
            "kernel wants to load at {:#x}, below {:#x}",
            info.load_start,
            arch::KERNEL_MIN_ADDR
        )));
    }
    let mib = |b: u64| b.div_ceil(1 << 20);
    let initrd = initrd_len.unwrap_or(0).next_multiple_of(4096);
    // RAM the kernel's image reaches into (RAM starts at 1 GiB on arm64).
    let used = info.load_end.saturating_sub(arch::RAM_START);
    // A Linux guest also needs room to run: page tables, slab, the unpacked initramfs.
    let needed = if info.is_linux {
        used.saturating_add(initrd)
            .saturating_add(16 << 20)
            .max(MIN_LINUX_MEMORY_MIB << 20)
    } else {
        used.saturating_add(initrd)
    };
    let min = mib(needed).max(MIN_MEMORY_MIB);
    let bad = VmError::BadMemory {
        given: memory_mib,
        min,
    };
    // Checked before any shift: a huge --memory must not wrap.
    if !(min..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(bad);
    }
    let low_end = arch::boot_ram_end(memory_mib << 20);
    if info.load_end > low_end {
        return Err(bad);
    }
    match initrd_len {
        None => Ok(None),
        Some(len) => {
            let addr = low_end.saturating_sub(len) & !0xfff;
            if addr < info.load_end {
                return Err(VmError::BadMemory {
                    given: memory_mib,
                    min: mib(used + initrd).max(min),
                });
            }
            Ok(Some(addr))
        }
    }
}

struct Buses {
    pio: Bus,
    mmio: Bus,
}

/// Runs one vCPU until it or the VM stops.
fn vcpu_loop(
    index: u32,
    vcpu: &mut dyn hypervisor::Vcpu,
    buses: &Buses,
    stop: &StopHandle,
    running: &AtomicBool,
    gate: &PauseGate,
) {
    let mut unhandled: u32 = 0;
    let mut note_unhandled = |what: &str, addr: u64| {
        unhandled = unhandled.saturating_add(1);
        if unhandled <= 8 {
            tracing::debug!("vCPU {index}: {what} at {addr:#x} has no device");
        }
    };
    while running.load(Ordering::Acquire) {
        gate.checkpoint(index, vcpu);
        if !running.load(Ordering::Acquire) {
            break;
        }
        match vcpu.run() {
            Ok(VmExit::IoIn { port, data }) => {
                if !buses.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                    note_unhandled("port read", u64::from(port));
                }
            }
            Ok(VmExit::IoOut { port, data }) => {
                if !buses.pio.write(u64::from(port), data) {
                    note_unhandled("port write", u64::from(port));
                }
            }
            Ok(VmExit::MmioRead { addr, data }) => {
                if !buses.mmio.read(addr, data) {
                    data.fill(0);
                    note_unhandled("MMIO read", addr);
                }
            }
            Ok(VmExit::MmioWrite { addr, data }) => {
                if !buses.mmio.write(addr, data) {
                    note_unhandled("MMIO write", addr);
                }
            }
            Ok(VmExit::Interrupted) => {}
            Ok(VmExit::PowerOff) => {
                stop.power_off();
                break;
            }
            Ok(VmExit::CpuShutdown) => {
                stop.0.request(GuestExit::CpuShutdown { vcpu: index });
                break;
            }
            Ok(VmExit::Fatal(message)) => {
                tracing::error!("vCPU {index}: {message}");
                stop.0.request(GuestExit::Fatal {
                    vcpu: Some(index),
                    message,
                });
                break;
            }
            Err(e) => {
                tracing::error!("vCPU {index}: {e}");
                stop.0.request(GuestExit::Fatal {
                    vcpu: Some(index),
                    message: e.to_string(),
                });
                break;
            }
        }
    }
}

/// Everything the event loop owns; dropped (closing every fd) when the VM is done.
struct LoopShared {
    stop: StopHandle,
    running: Arc<AtomicBool>,
    gate: Arc<PauseGate>,
    kickers: Vec<Arc<dyn Kicker>>,
    threads: Vec<JoinHandle<()>>,
    ring: Arc<Mutex<ConsoleRing>>,
    boot_time: Arc<OnceLock<Duration>>,
    timeout: Option<Duration>,
    stdin_to_console: Option<Arc<Mutex<SerialDevice<ConsoleSink>>>>,
    /// Devices; dropped (joining device workers) after the vCPUs stopped.
    buses: Arc<Buses>,
    hybrid: Option<HybridListener>,
    defer_teardown: bool,
    vm: Arc<dyn hypervisor::Vm>,
    mem: GuestMemoryMmap,
}

const TAG_STOP: u32 = 1;
const TAG_TIMEOUT: u32 = 2;
const TAG_STDIN: u32 = 3;

/// The event loop's one subscriber.
struct VmmEvents {
    stop: StopHandle,
    timer: Option<TimerFd>,
    timeout: Option<Duration>,
    stdin: Option<Arc<Mutex<SerialDevice<ConsoleSink>>>>,
    done: bool,
}

impl MutEventSubscriber for VmmEvents {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: i32, tag: u32| ops.add(Events::with_data_raw(fd, tag, EventSet::IN));
        let stop_fd = self
            .stop
            .0
            .evt
            .as_ref()
            .map(|e| e.as_raw_fd())
            .unwrap_or(-1);
        if let Err(e) = add(stop_fd, TAG_STOP) {
            tracing::error!("event loop: cannot watch the stop event: {e:?}");
        }
        if let Some(t) = &self.timer {
            if let Err(e) = add(t.as_raw_fd(), TAG_TIMEOUT) {
                tracing::error!("event loop: cannot watch the timeout: {e:?}");
            }
        }
        // Standard input that epoll cannot watch (a regular file, /dev/null) is simply not
        // forwarded: the guest console gets no input.
        if self.stdin.is_some() && add(io::stdin().as_raw_fd(), TAG_STDIN).is_err() {
            tracing::debug!("standard input cannot be polled; console input disabled");
            self.stdin = None;
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TAG_STOP => {
                if let Some(evt) = &self.stop.0.evt {
                    let _ = evt.read();
                }
                self.done = true;
            }
            TAG_TIMEOUT => {
                if let Some(t) = &mut self.timer {
                    let _ = t.wait();
                }
                self.stop
                    .0
                    .request(GuestExit::Timeout(self.timeout.unwrap_or_default()));
            }
            TAG_STDIN => {
                let Some(dev) = &self.stdin else { return };
                let room = lock(dev).input_capacity();
                if room == 0 {
                    // The guest is not reading; let it catch up instead of spinning.
                    std::thread::sleep(Duration::from_millis(5));
                    return;
                }
                let mut buf = vec![0u8; room.min(64)];
                match io::stdin().lock().read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = ops.remove(Events::with_data_raw(
                            io::stdin().as_raw_fd(),
                            TAG_STDIN,
                            EventSet::IN,
                        ));
                    }
                    Ok(n) => {
                        lock(dev).enqueue_input(&buf[..n]);
                    }
                }
            }
            _ => {}
        }
    }
}

impl LoopShared {
    fn run(self) -> VmOutcome {
        let timer = self.timeout.and_then(|d| match TimerFd::new() {
            Ok(mut t) => t.reset(d, None).ok().map(|_| t),
            Err(e) => {
                tracing::error!("cannot arm the timeout: {e}");
                None
            }
        });
        let raw = RawTerminal::enter(self.stdin_to_console.is_some());
        let events = VmmEvents {
            stop: self.stop.clone(),
            timer,
            timeout: self.timeout,
            stdin: self.stdin_to_console.clone(),
            done: false,
        };
        match EventManager::<VmmEvents>::new() {
            Ok(mut manager) => {
                let id = manager.add_subscriber(events);
                loop {
                    if let Err(e) = manager.run() {
                        tracing::error!("event loop: {e:?}");
                        self.stop.fail(format!("event loop failed: {e:?}"));
                        break;
                    }
                    if manager.subscriber_mut(id).map(|s| s.done).unwrap_or(true) {
                        break;
                    }
                }
            }
            Err(e) => self
                .stop
                .fail(format!("cannot create the event loop: {e:?}")),
        }
        drop(raw);
        self.shutdown()
    }

    fn shutdown(self) -> VmOutcome {
        self.running.store(false, Ordering::Release);
        self.gate.close();
        for k in &self.kickers {
            k.kick();
        }
        for t in self.threads {
            if t.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
        let exit = lock(&self.stop.0.reason)
            .clone()
            .unwrap_or(GuestExit::Stopped);
        // Device workers stop here (the vCPUs held the other references to the buses).
        drop(self.hybrid);
        drop(self.buses);
        if self.defer_teardown {
            // Released by the process exit (see `VmBuilder::defer_teardown_to_exit`).
            std::mem::forget(self.vm);
            std::mem::forget(self.mem);
        }
        let ring = lock(&self.ring);
        VmOutcome {
            exit,
            boot_time: self.boot_time.get().copied(),
            console_tail: ring.last_lines(CONSOLE_TAIL_LINES),
            kernel_panicked: ring.contains("Kernel panic"),
        }
    }
}

/// Puts the controlling terminal in raw mode while guest console input is forwarded, so keys
/// (Ctrl-C included) reach the guest and the guest does the echoing.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn enter(on: bool) -> RawTerminal {
        let fd = io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the fd.
        if !on || unsafe { libc::isatty(fd) } != 1 {
            return RawTerminal(None);
        }
        // SAFETY: termios is plain old data filled by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and t is valid for writes.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return RawTerminal(None);
        }
        let saved = t;
        // SAFETY: t is a valid termios.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: fd is a terminal; t is valid.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restoring the attributes read from the same terminal.
            unsafe { libc::tcsetattr(io::stdin().as_raw_fd(), libc::TCSANOW, t) };
        }
    }
}

/// A started VM.
pub struct RunningVm {
    stop: StopHandle,
    boot_time: Arc<OnceLock<Duration>>,
    vsock: Option<VsockHost>,
    event_loop: Option<JoinHandle<VmOutcome>>,
    /// Guest RAM (shared with the event loop), for [`RunningVm::count_in_memory`].
    mem: GuestMemoryMmap,
    /// The vCPU threads' CPU-time clocks.
    vcpu_clocks: Vec<libc::clockid_t>,
    /// Pausing: the vCPUs' gate and their kickers.
    gate: Arc<PauseGate>,
    kickers: Vec<Arc<dyn Kicker>>,
    /// For the in-kernel devices' state in snapshots.
    vm: Arc<dyn hypervisor::Vm>,
    /// The VMM's devices, for snapshots.
    console: Arc<Mutex<SerialDevice<ConsoleSink>>>,
    transports: Vec<(u64, Arc<Mutex<MmioTransport>>)>,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("stop", &self.stop)
            .field("boot_time", &self.boot_time.get())
            .field("vcpus", &self.kickers.len())
            .field("paused", &self.is_paused())
            .finish_non_exhaustive()
    }
}

impl RunningVm {
    /// CPU time the vCPU threads have used (guest time plus the exits they handle). Read
    /// while the VM runs: a thread's clock is gone once it has exited.
    pub fn vcpu_time(&self) -> Duration {
        self.vcpu_clocks
            .iter()
            .filter_map(|&c| {
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: `ts` is a valid out-pointer; a stale clock id fails with EINVAL.
                (unsafe { libc::clock_gettime(c, &mut ts) } == 0)
                    .then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
            })
            .sum()
    }

    /// Bytes of guest RAM resident on the host now (faulted in and not reclaimed), by
    /// `mincore` over each region: the memory a sandbox costs its host, not its configured size.
    pub fn resident_memory(&self) -> u64 {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let mut total = 0u64;
        let mut vec = Vec::new();
        for region in self.mem.iter() {
            let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
                continue;
            };
            let len = region.len() as usize;
            // 65536 pages per call: a 64 KiB status vector, 256 MiB of 4 KiB pages.
            let chunk = page << 16;
            let mut off = 0;
            while off < len {
                let n = chunk.min(len - off);
                vec.resize(n.div_ceil(page), 0u8);
                let start = host.wrapping_add(off);
                // SAFETY: [start, +n) lies within the region's live mapping (page-aligned:
                // regions are mapped at page boundaries, `off` is a multiple of `chunk`);
                // `vec` holds one byte per page of it.
                let r = unsafe { libc::mincore(start.cast(), n, vec.as_mut_ptr()) };
                if r == 0 {
                    total += vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page as u64;
                }
                off += n;
            }
        }
        total
    }

    /// How many times each needle occurs in guest RAM, read now in one pass (an audit that a
    /// value never entered the guest; reading faults in pages the guest never touched).
    pub fn count_in_memory(&self, needles: &[&[u8]]) -> Vec<usize> {
        use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
        let longest = needles.iter().map(|n| n.len()).max().unwrap_or(0);
        let mut counts = vec![0; needles.len()];
        if needles.iter().any(|n| n.is_empty()) {
            return counts;
        }
        let finders: Vec<_> = needles.iter().map(memchr::memmem::Finder::new).collect();
        let mut buf = vec![0u8; (1 << 20) + longest];
        for region in self.mem.iter() {
            let (start, len) = (region.start_addr(), region.len() as usize);
            let mut off = 0;
            // Chunks overlap by the longest needle's length - 1 so a match across a boundary
            // counts, and only matches starting before the overlap count in each chunk.
            while off < len {
                let n = buf.len().min(len - off);
                if self
                    .mem
                    .read_slice(&mut buf[..n], start.unchecked_add(off as u64))
                    .is_err()
                {
                    break;
                }
                let fresh = if off + n < len { n - (longest - 1) } else { n };
                for (c, f) in counts.iter_mut().zip(&finders) {
                    *c += f.find_iter(&buf[..n]).filter(|p| *p < fresh).count();
                }
                off += fresh;
            }
        }
        counts
    }

    /// A handle that stops the VM.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Stops every vCPU at its next exit (kicking them out of the guest) and returns once all
    /// are parked, or undoes the pause after `timeout`. Devices keep serving the host side.
    /// Pausing a paused VM does nothing.
    pub fn pause(&self, timeout: Duration) -> Result<(), PauseError> {
        {
            let mut s = lock(&self.gate.state);
            if s.closed || self.stop_reason().is_some() {
                return Err(PauseError::Stopped);
            }
            s.paused = true;
        }
        for k in &self.kickers {
            k.kick();
        }
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.gate.state);
        loop {
            // Every vCPU gone (powered off, failed, torn down) is a stopped VM, not a paused one.
            if s.closed || s.live == 0 {
                s.paused = false;
                return Err(PauseError::Stopped);
            }
            if s.parked == s.live {
                return Ok(());
            }
            s = match self.gate.wait_until(s, deadline) {
                Some(s) => s,
                None => {
                    lock(&self.gate.state).paused = false;
                    self.gate.cond.notify_all();
                    return Err(PauseError::Timeout(timeout));
                }
            };
        }
    }

    /// Lets paused vCPUs run again (nothing happens if the VM is not paused).
    pub fn resume(&self) {
        lock(&self.gate.state).paused = false;
        self.gate.cond.notify_all();
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        let paused = {
            let s = lock(&self.gate.state);
            s.paused && !s.closed && s.live > 0
        };
        paused && self.stop_reason().is_none()
    }

    /// Saves the VM into snapshot directory `dir` (created if needed): every vCPU's state
    /// (each saved by its own thread while parked), the in-kernel devices, the VMM's devices
    /// (console, boot timer, every virtio transport with its queues and its device's own
    /// state) and guest memory as a sparse file. The VM is paused and its device workers
    /// quiesced meanwhile; it is left as it was found (paused or running). The files are
    /// written under temporary names and renamed, so a failure (a full disk) leaves no
    /// snapshot rather than a broken one, and the VM unharmed.
    pub fn save_snapshot(&self, dir: &Path) -> Result<(), VmError> {
        let was_paused = self.is_paused();
        self.pause(PAUSE_FOR_SNAPSHOT)?;
        let result = self.save_paused(dir);
        if !was_paused {
            self.resume();
        }
        result
    }

    fn save_paused(&self, dir: &Path) -> Result<(), VmError> {
        std::fs::create_dir_all(dir).map_err(|source| VmError::Io {
            what: "creating the snapshot directory",
            source,
        })?;
        let vcpus = self.save_vcpus()?;
        let vm = self.vm.save_state()?;
        // Device workers stop between two rounds of work so neither their queues nor guest
        // memory move while both are saved; they run again whatever happens.
        let quiesced = Quiesced::new(&self.transports)?;
        let devices = DevicesImage {
            console: lock(&self.console).save_state(),
            boot_time_ns: self.boot_time.get().map(|d| d.as_nanos() as u64),
            virtio: quiesced.save()?,
        };
        let memory = save_memory(&self.mem, &dir.join(snapshot::MEMORY_FILE))?;
        drop(quiesced);
        let image = VmImage {
            arch: std::env::consts::ARCH.to_string(),
            memory,
            vm,
            vcpus,
            devices,
        };
        snapshot::write_atomic(&dir.join(snapshot::STATE_FILE), &snapshot::encode(&image)?)?;
        Ok(())
    }

    /// Asks every parked vCPU thread for its state and collects the answers in index order.
    fn save_vcpus(&self) -> Result<Vec<hypervisor::VcpuSnapshot>, VmError> {
        let n = self.kickers.len();
        let mut s = lock(&self.gate.state);
        s.saves = (0..n).map(|_| SaveSlot::Requested).collect();
        self.gate.cond.notify_all();
        let deadline = Instant::now() + PAUSE_FOR_SNAPSHOT;
        while s.saves.iter().any(|x| matches!(x, SaveSlot::Requested)) {
            if s.closed || !s.paused {
                s.saves.clear();
                return Err(PauseError::Stopped.into());
            }
            s = match self.gate.wait_until(s, deadline) {
                Some(s) => s,
                None => {
                    lock(&self.gate.state).saves.clear();
                    return Err(PauseError::Stopped.into());
                }
            };
        }
        std::mem::take(&mut s.saves)
            .into_iter()
            .map(|x| match x {
                SaveSlot::Done(r) => r.map_err(VmError::from),
                _ => Err(PauseError::Stopped.into()),
            })
            .collect()
    }

    /// Reads guest memory at `addr` (for tests and diagnostics; the guest may be writing it).
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.mem
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| VmError::Memory(e.to_string()))
    }

    /// Writes guest memory at `addr` (for tests: a word the guest polls).
    pub fn write_memory(&self, addr: u64, buf: &[u8]) -> Result<(), VmError> {
        self.mem
            .write_slice(buf, GuestAddress(addr))
            .map_err(|e| VmError::Memory(e.to_string()))
    }

    /// Boot-timer time since VMM start, once the guest signalled it.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time.get().copied()
    }

    /// Waits until the guest signals boot (`Ok(boot time)`) or the VM stops first, or
    /// `timeout` passes (`Err` with the stop reason, or `None` on timeout).
    pub fn wait_boot(&self, timeout: Duration) -> Result<Duration, Option<GuestExit>> {
        let deadline = Instant::now() + timeout;
        let st = &self.stop.0;
        let mut b = lock(&st.boot);
        loop {
            if let Some(t) = self.boot_time.get() {
                return Ok(*t);
            }
            if let Some(r) = lock(&st.reason).clone() {
                return Err(Some(r));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(None);
            }
            b = st
                .boot_cond
                .wait_timeout(b, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits until the VM stopped (for any reason) or `timeout` passed; true if it stopped.
    pub fn wait_stopped(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let st = &self.stop.0;
        let mut b = lock(&st.boot);
        loop {
            if lock(&st.reason).is_some() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            b = st
                .boot_cond
                .wait_timeout(b, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Why the VM stopped, if it did (it may still be shutting down).
    pub fn stop_reason(&self) -> Option<GuestExit> {
        lock(&self.stop.0.reason).clone()
    }

    /// The host side of the guest's vsock device.
    pub fn vsock(&self) -> Option<&VsockHost> {
        self.vsock.as_ref()
    }

    /// Waits until the VM stops; every vCPU thread is joined and every fd closed on return.
    pub fn wait(mut self) -> VmOutcome {
        self.join()
    }

    fn join(&mut self) -> VmOutcome {
        let fallback = || VmOutcome {
            exit: GuestExit::Fatal {
                vcpu: None,
                message: "VMM event loop panicked".into(),
            },
            boot_time: None,
            console_tail: Vec::new(),
            kernel_panicked: false,
        };
        match self.event_loop.take() {
            Some(t) => t.join().unwrap_or_else(|_| fallback()),
            None => fallback(),
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if self.event_loop.is_some() {
            self.stop.stop();
            self.join();
        }
    }
}

/// Reads the kernel's load information (exposed for the CLI's checks and tests).
pub fn kernel_info(path: &Path) -> Result<KernelInfo, LoaderError> {
    arch::inspect_kernel(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(load_end: u64, is_linux: bool) -> KernelInfo {
        KernelInfo {
            entry: 0x100000,
            pvh_entry: None,
            load_start: 0x100000,
            load_end,
            is_linux,
        }
    }

    #[test]
    fn fit_checks() {
        // A tiny test guest fits in 8 MiB with a 1 MiB initramfs at the top.
        assert_eq!(
            check_fit(&info(0x200000, false), Some(1 << 20), 8).unwrap(),
            Some((8 << 20) - (1 << 20))
        );
        assert_eq!(check_fit(&info(0x200000, false), None, 8).unwrap(), None);
        // A Linux kernel ending at 30 MiB cannot boot in 32 MiB.
        assert!(matches!(
            check_fit(&info(30 << 20, true), None, 32),
            Err(VmError::BadMemory { min: 46, .. })
        ));
        assert!(check_fit(&info(30 << 20, true), Some(4 << 20), 128).is_ok());
        // The image itself must fit.
        assert!(matches!(
            check_fit(&info(20 << 20, false), None, 16),
            Err(VmError::BadMemory { .. })
        ));
        let low = KernelInfo {
            load_start: 0x8000,
            ..info(0x200000, false)
        };
        assert!(matches!(
            check_fit(&low, None, 16),
            Err(VmError::KernelLoad(_))
        ));
    }

    #[test]
    fn initrd_is_page_aligned_at_the_top() {
        let addr = check_fit(&info(0x200000, false), Some(12345), 64)
            .unwrap()
            .unwrap();
        assert_eq!(addr % 4096, 0);
        assert!(addr + 12345 <= 64 << 20);
    }
}
