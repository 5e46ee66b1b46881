//! KVM backend (Linux): the architecture-neutral part (memory, irqfd, ioeventfd, vCPU
//! threads, kicks, exits); `x86_64.rs` and `aarch64.rs` set up the VM's interrupt controller
//! and each vCPU.

use std::os::raw::c_int;
use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{
    kvm_userspace_memory_region, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use msb_devices::Interrupt;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::{HypervisorError, Kicker, Result, Vcpu, VcpuBoot, Vm, VmExit};

#[cfg(target_arch = "aarch64")]
#[path = "aarch64.rs"]
mod arch;
#[cfg(target_arch = "x86_64")]
#[path = "x86_64.rs"]
mod arch;

pub use arch::{VcpuSnapshot, VmSnapshot};

/// Work a vCPU does before its first KVM_RUN, once all vCPUs exist (arm64 initializes its
/// vGIC then); idempotent, as every vCPU calls it.
type FirstRun = Arc<dyn Fn() -> Result<()> + Send + Sync>;

/// Signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> c_int {
    SIGRTMIN()
}

fn os(what: &'static str) -> impl Fn(vmm_sys_util::errno::Error) -> HypervisorError {
    move |e| HypervisorError::Os {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// An open /dev/kvm and what it supports.
pub struct KvmHypervisor {
    kvm: Kvm,
    arch: arch::HostCaps,
}

impl std::fmt::Debug for KvmHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmHypervisor")
            .field("pvm", &crate::host::is_pvm())
            .finish_non_exhaustive()
    }
}

impl KvmHypervisor {
    /// Opens /dev/kvm; the errors name the fix.
    pub fn open() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT | libc::ENXIO | libc::ENODEV => HypervisorError::NoKvm,
            libc::EACCES | libc::EPERM => HypervisorError::KvmPermission,
            _ => os("opening /dev/kvm")(e),
        })?;
        for (cap, name) in [
            (Cap::Irqfd, "irqfd"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::UserMemory, "user memory"),
            (Cap::ImmediateExit, "immediate exit"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCapability(name));
            }
        }
        let arch = arch::probe(&kvm)?;
        Ok(KvmHypervisor { kvm, arch })
    }
}

impl super::Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        if crate::host::is_pvm() {
            "kvm-pvm"
        } else {
            "kvm"
        }
    }

    fn create_vm(&self, cpus: u32, mem: &GuestMemoryMmap) -> Result<Arc<dyn Vm>> {
        let max = self.kvm.get_max_vcpus();
        if cpus as usize > max {
            return Err(HypervisorError::Vcpu {
                index: cpus - 1,
                msg: format!("this host's KVM supports at most {max} vCPUs"),
            });
        }
        let fd = self.kvm.create_vm().map_err(os("KVM_CREATE_VM"))?;
        // Before the interrupt controller: see `Hypervisor::create_vm`.
        map_memory(&fd, mem)?;
        let arch = arch::setup_vm(&self.kvm, &fd, cpus, &self.arch)?;
        Ok(Arc::new(KvmVm {
            fd,
            arch,
            irqs: Mutex::new(Vec::new()),
        }))
    }
}

/// A KVM VM.
#[derive(Debug)]
pub struct KvmVm {
    fd: VmFd,
    arch: arch::VmState,
    irqs: Mutex<Vec<Arc<EventFd>>>,
}

/// Makes every region of `mem` a KVM memory slot of `fd`.
fn map_memory(fd: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| HypervisorError::Os {
                what: "guest memory region",
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the caller keeps alive for
        // the VM's lifetime (`Hypervisor::create_vm`'s contract); KVM only accesses it while
        // the VM runs.
        unsafe { fd.set_user_memory_region(r) }.map_err(os("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

impl Vm for KvmVm {
    fn create_irq(&self, gsi: u32) -> Result<Arc<dyn Interrupt>> {
        let evt = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|source| HypervisorError::Os {
                what: "eventfd",
                source,
            })?,
        );
        arch::register_irqfd(&self.fd, &self.arch, &evt, gsi)?;
        msb_devices::bus::lock(&self.irqs).push(evt.clone());
        Ok(evt)
    }

    fn register_ioevent(&self, addr: u64, datamatch: u32, evt: &EventFd) -> Result<()> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(os("KVM_IOEVENTFD"))
    }

    fn save_state(&self) -> Result<VmSnapshot> {
        arch::save_vm(&self.fd)
    }

    fn restore_state(&self, s: &VmSnapshot) -> Result<()> {
        arch::restore_vm(&self.fd, s)
    }

    fn create_vcpu(&self, boot: &VcpuBoot) -> Result<Box<dyn Vcpu>> {
        let index = boot.index;
        let err = |what: &str, e: vmm_sys_util::errno::Error| HypervisorError::Vcpu {
            index,
            msg: format!("{what}: {e}"),
        };
        let fd = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| err("KVM_CREATE_VCPU", e))?;

        arch::setup_vcpu(&self.fd, &self.arch, &fd, boot)?;

        let kicker = Arc::new(KvmKicker {
            target: Mutex::new(None),
        });
        let mut vcpu = KvmVcpu {
            fd,
            kicker,
            immediate_exit: std::ptr::null_mut(),
            first_run: arch::first_run_hook(&self.arch),
            index,
            snapshot_ctx: arch::vcpu_ctx(&self.arch),
        };
        vcpu.arm_kicker();
        Ok(Box::new(vcpu))
    }
}

/// Where a kick lands: the vCPU thread (its kernel thread id: kicks go through `tgkill`, which
/// the filters pin to this process, where musl's `pthread_kill` would use the unpinnable
/// `tkill`) and its `kvm_run.immediate_exit` byte.
#[derive(Debug)]
struct KickTarget {
    tid: libc::pid_t,
    immediate_exit: *mut u8,
}

// SAFETY: the pointer is only dereferenced under the mutex in `KvmKicker`, and the vCPU clears
// the target (under the same mutex) before the kvm_run mapping goes away.
unsafe impl Send for KickTarget {}

#[derive(Debug)]
struct KvmKicker {
    target: Mutex<Option<KickTarget>>,
}

impl Kicker for KvmKicker {
    fn kick(&self) {
        let guard = msb_devices::bus::lock(&self.target);
        if let Some(t) = guard.as_ref() {
            // SAFETY: the target is present, so the vCPU (and its kvm_run mapping) is alive and
            // cannot be dropped while we hold the lock. A byte store races benignly with KVM.
            unsafe { std::ptr::write_volatile(t.immediate_exit, 1) };
            // SAFETY: the thread is alive while the target is registered (it unregisters before
            // exiting), so its id names it; the signal has a no-op handler (`arm_kicker`).
            unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    std::process::id() as libc::pid_t,
                    t.tid,
                    kick_signal(),
                )
            };
        }
    }
}

extern "C" fn noop_signal_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// A KVM vCPU, living on its own thread.
pub struct KvmVcpu {
    fd: VcpuFd,
    kicker: Arc<KvmKicker>,
    /// `kvm_run.immediate_exit` of `fd`'s mapping, to re-arm KVM_RUN after a kick.
    immediate_exit: *mut u8,
    first_run: Option<FirstRun>,
    index: u32,
    /// What saving this vCPU needs from the VM (x86: the MSRs to save).
    snapshot_ctx: SnapshotCtx,
}

#[cfg(target_arch = "x86_64")]
type SnapshotCtx = Vec<u32>;
#[cfg(target_arch = "aarch64")]
type SnapshotCtx = ();

impl std::fmt::Debug for KvmVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVcpu").finish_non_exhaustive()
    }
}

impl KvmVcpu {
    fn arm_kicker(&mut self) {
        static HANDLER: Once = Once::new();
        HANDLER.call_once(|| {
            if let Err(e) = register_signal_handler(kick_signal(), noop_signal_handler) {
                tracing::error!("cannot install the vCPU kick signal handler: {e}");
            }
        });
        let immediate_exit = &mut self.fd.get_kvm_run().immediate_exit as *mut u8;
        self.immediate_exit = immediate_exit;
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
        *msb_devices::bus::lock(&self.kicker.target) = Some(KickTarget {
            tid,
            immediate_exit,
        });
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // Unregister before the kvm_run mapping is unmapped with `fd`.
        *msb_devices::bus::lock(&self.kicker.target) = None;
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VmExit<'_>> {
        if let Some(first) = self.first_run.take() {
            first()?;
        }
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoIn(port, data) => VmExit::IoIn { port, data },
                VcpuExit::IoOut(port, data) => VmExit::IoOut { port, data },
                VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
                VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
                VcpuExit::Shutdown => VmExit::CpuShutdown,
                VcpuExit::Intr => VmExit::Interrupted,
                VcpuExit::SystemEvent(kind, _)
                    if kind == KVM_SYSTEM_EVENT_SHUTDOWN || kind == KVM_SYSTEM_EVENT_RESET =>
                {
                    VmExit::PowerOff
                }
                VcpuExit::SystemEvent(kind, _) => {
                    VmExit::Fatal(format!("guest system event {kind}"))
                }
                VcpuExit::FailEntry(reason, cpu) => VmExit::Fatal(format!(
                    "KVM entry failed (hardware reason {reason:#x}, host CPU {cpu})"
                )),
                VcpuExit::InternalError => VmExit::Fatal(
                    "KVM internal error (the guest ran an instruction KVM cannot emulate)".into(),
                ),
                other => VmExit::Fatal(format!("unexpected KVM exit {other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: the pointer targets this vCPU's own kvm_run mapping, alive as long as
                // `self.fd`; KVM_RUN has returned, so nothing else is reading it.
                unsafe { std::ptr::write_volatile(self.immediate_exit, 0) };
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(HypervisorError::Os {
                what: "KVM_RUN",
                source: std::io::Error::from_raw_os_error(e.errno()),
            }),
        }
    }

    fn kicker(&self) -> Arc<dyn Kicker> {
        self.kicker.clone()
    }

    fn save_state(&self) -> Result<VcpuSnapshot> {
        arch::save_vcpu(&self.fd, &self.snapshot_ctx).map_err(|e| self.name_vcpu(e))
    }

    fn restore_state(&mut self, s: &VcpuSnapshot) -> Result<()> {
        arch::restore_vcpu(&self.fd, s).map_err(|e| self.name_vcpu(e))
    }
}

impl KvmVcpu {
    /// Puts this vCPU's index into an error from the arch layer.
    fn name_vcpu(&self, e: HypervisorError) -> HypervisorError {
        match e {
            HypervisorError::Vcpu { msg, .. } => HypervisorError::Vcpu {
                index: self.index,
                msg,
            },
            HypervisorError::Os { what, source } => HypervisorError::Vcpu {
                index: self.index,
                msg: format!("{what}: {source}"),
            },
            other => other,
        }
    }
}
