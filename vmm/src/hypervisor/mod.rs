//! The hypervisor boundary: `Hypervisor → Vm → Vcpu` (cloud-hypervisor's shape).
//!
//! A [`Vcpu`] is not `Send`: Hypervisor.framework binds a vCPU to the thread that created it,
//! so each vCPU is created inside its own thread ([`Vm::create_vcpu`]) and other threads hold
//! only a [`Kicker`] to interrupt it. Backends: KVM on Linux ([`kvm`]).

use std::sync::Arc;

use msb_devices::Interrupt;
use thiserror::Error;
use vm_memory::GuestMemoryMmap;

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
pub mod kvm;

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
use crate::arch::BootEntry;

/// The architectural state of a vCPU and of a VM's in-kernel devices, for snapshots: the
/// backend's own types (serializable), behind the same boundary as everything else.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
pub use kvm::{VcpuSnapshot, VmSnapshot};

/// Errors from a hypervisor backend. The first variants are user-facing set-up problems with
/// their fix in the message.
#[derive(Debug, Error)]
pub enum HypervisorError {
    #[error("/dev/kvm does not exist: enable hardware virtualization (VT-x/AMD-V) in firmware and load kvm_intel or kvm_amd (`sudo modprobe kvm_intel` or `kvm_amd`)")]
    NoKvm,
    #[error("no permission to open /dev/kvm: add your user to the kvm group (`sudo usermod -aG kvm $USER`, then log in again) or run as root")]
    KvmPermission,
    #[error("/dev/kvm is PVM (software nested virtualization, /sys/module/kvm_pvm): it cannot run a Linux guest; run through the L2 runner instead (`./x run -- CMD`, see README.md)")]
    Pvm,
    #[error("KVM lacks a capability msb-vmm needs: {0}")]
    MissingCapability(&'static str),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("vCPU {index}: {msg}")]
    Vcpu { index: u32, msg: String },
    #[error("not supported here: {0}")]
    Unsupported(&'static str),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Why a vCPU stopped running guest code.
#[derive(Debug)]
pub enum VmExit<'a> {
    /// Port read; fill `data`.
    IoIn { port: u16, data: &'a mut [u8] },
    /// Port write.
    IoOut { port: u16, data: &'a [u8] },
    /// MMIO read; fill `data`.
    MmioRead { addr: u64, data: &'a mut [u8] },
    /// MMIO write.
    MmioWrite { addr: u64, data: &'a [u8] },
    /// The guest asked the platform to power off or reset.
    PowerOff,
    /// The CPU shut down (x86 triple fault): the guest crashed.
    CpuShutdown,
    /// [`Kicker::kick`] or a signal interrupted the run.
    Interrupted,
    /// The vCPU cannot continue; a description for the user.
    Fatal(String),
}

/// Interrupts a vCPU's `run` from any thread.
pub trait Kicker: Send + Sync {
    /// Makes the vCPU's current or next `run` return [`VmExit::Interrupted`] promptly.
    fn kick(&self);
}

/// Per-vCPU boot state: which CPU it is and, for the boot CPU, how to enter the kernel.
#[derive(Debug, Clone, Copy)]
pub struct VcpuBoot {
    /// vCPU index (APIC id on x86).
    pub index: u32,
    /// Number of vCPUs in the VM.
    pub count: u32,
    /// Entry state for the boot CPU; `None` for the others, which wait to be started (SIPI on
    /// x86, PSCI CPU_ON on arm64).
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    pub entry: Option<BootEntry>,
}

/// A virtual CPU, owned by the thread that created it.
pub trait Vcpu {
    /// Runs guest code until the next exit that needs the VMM.
    fn run(&mut self) -> Result<VmExit<'_>>;
    /// A handle other threads use to interrupt [`Vcpu::run`].
    fn kicker(&self) -> Arc<dyn Kicker>;
    /// The vCPU's whole state; call it between runs (the VM paused).
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    fn save_state(&self) -> Result<VcpuSnapshot>;
    /// Replaces a new vCPU's state (before its first run).
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    fn restore_state(&mut self, s: &VcpuSnapshot) -> Result<()>;
}

/// A virtual machine: memory, interrupt lines, vCPU factory.
pub trait Vm: Send + Sync {
    /// An interrupt line for a device wired to `gsi`.
    fn create_irq(&self, gsi: u32) -> Result<Arc<dyn Interrupt>>;
    /// Signals `evt` (instead of exiting to the VMM) when the guest writes the 32-bit value
    /// `datamatch` to MMIO address `addr`: virtio queue notifications stay in the kernel.
    fn register_ioevent(
        &self,
        addr: u64,
        datamatch: u32,
        evt: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<()>;
    /// Creates and configures a vCPU; call it on the thread that will run the vCPU.
    fn create_vcpu(&self, boot: &VcpuBoot) -> Result<Box<dyn Vcpu>>;
    /// The in-kernel devices' state (interrupt controllers, timers, clock); every vCPU
    /// paused.
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    fn save_state(&self) -> Result<VmSnapshot>;
    /// Replaces a new VM's in-kernel device state (before any vCPU runs).
    #[cfg(all(
        target_os = "linux",
        any(target_arch = "x86_64", target_arch = "aarch64")
    ))]
    fn restore_state(&self, s: &VmSnapshot) -> Result<()>;
}

/// The hypervisor itself.
pub trait Hypervisor: Send + Sync {
    /// Backend name for logs and reports.
    fn name(&self) -> &'static str;
    /// A VM that will have `cpus` vCPUs, with every region of `mem` as guest-physical memory.
    ///
    /// Memory comes with the VM because the order matters: on KVM the first memory slot
    /// registered after the in-kernel interrupt controller waits out an SRCU grace period
    /// (6–7 ms on this project's machine, against 0.2 ms before it). The caller keeps `mem`
    /// alive for as long as the VM exists.
    fn create_vm(&self, cpus: u32, mem: &GuestMemoryMmap) -> Result<Arc<dyn Vm>>;
}

/// The platform's default hypervisor.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
pub fn default_hypervisor() -> Result<Arc<dyn Hypervisor>> {
    Ok(Arc::new(kvm::KvmHypervisor::open()?))
}
