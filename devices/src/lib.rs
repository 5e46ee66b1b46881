//! Device models for msb-vmm. No hypervisor code lives here: devices see guest accesses through
//! the [`bus::BusDevice`] trait and raise interrupts through [`Interrupt`], so the same models
//! serve KVM and Hypervisor.framework and are unit-tested without either.
//!
//! Every access comes from the guest and is hostile: offsets and sizes are checked, unknown
//! registers read as zero and ignore writes, nothing here panics on guest input.

pub mod boot_timer;
pub mod bus;
pub mod fs;
pub mod i8042;
#[cfg(target_os = "linux")]
pub mod net;
pub mod pl031;
pub mod serial;
pub mod virtio;

/// Raises a device's interrupt line (an irqfd on KVM, a GIC SPI on HVF).
pub trait Interrupt: Send + Sync + std::fmt::Debug {
    /// Asserts the interrupt (edge-triggered from the device's point of view).
    fn trigger(&self) -> std::io::Result<()>;
}

/// A line wired to nothing, for harnesses that drive a device with no guest to interrupt
/// (the fuzz targets).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoInterrupt;

impl Interrupt for NoInterrupt {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Interrupt for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> std::io::Result<()> {
        self.write(1)
    }
}
