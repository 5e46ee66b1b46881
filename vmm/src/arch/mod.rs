//! Architecture-specific guest setup: memory layout, boot parameters, CPU tables, the
//! platform's own devices. Pure functions over guest memory and plain data where possible, so
//! they are unit-tested without a hypervisor.
//!
//! Every architecture module offers the same entry points (its `platform` module), re-exported
//! here; the VM, sandbox and device code name only these, never an architecture:
//!
//! - layout: [`ram_ranges`], [`RAM_START`], [`KERNEL_MIN_ADDR`], [`boot_ram_end`], [`BOOT_TIMER_START`],
//!   [`VIRTIO_MMIO_START`], [`MAX_CPUS`], [`DEFAULT_CMDLINE`];
//! - kernel loading: [`load_kernel`] into a [`BootEntry`] for the boot vCPU;
//! - boot information: [`write_boot_info`] from a [`BootInfo`] (memory, command line,
//!   initramfs, vCPUs, and the virtio-mmio devices with their [`virtio_irq`] lines, out of
//!   [`VIRTIO_SLOTS`]);
//! - platform devices: [`add_platform_devices`] (console, power-off).

#[cfg(target_arch = "x86_64")]
pub mod x86_64;

/// Built everywhere (and unit-tested on every host); the entry points follow with KVM on
/// arm64 and Hypervisor.framework.
pub mod aarch64;

#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
pub use self::aarch64::platform::*;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::platform::*;

/// What the boot information describes, whichever form the architecture gives it (x86 boot
/// structures, an arm64 device tree).
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
#[derive(Debug, Clone)]
pub struct BootInfo<'a> {
    pub entry: BootEntry,
    pub cmdline: &'a str,
    /// Guest address and size of the initramfs.
    pub initrd: Option<(u64, u64)>,
    pub mem_bytes: u64,
    pub cpus: u32,
    /// Base address and interrupt line of each virtio-mmio device.
    pub virtio: &'a [(u64, u32)],
}

/// Errors adding the platform's devices.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error(transparent)]
    Hypervisor(#[from] crate::hypervisor::HypervisorError),
    #[error("placing a platform device: {0}")]
    Bus(#[from] msb_devices::bus::BusError),
    #[error("restoring the console: {0}")]
    Restore(String),
}
