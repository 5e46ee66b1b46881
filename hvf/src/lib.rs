//! msb-hvf: Apple Hypervisor.framework for aarch64 guests on macOS. It knows nothing of the
//! VMM; `vmm::hypervisor::hvf` adapts it to the `Hypervisor → Vm → Vcpu` traits.
//!
//! - [`esr`]: decoding of the exception syndromes a vCPU exits with (portable, unit-tested on
//!   Linux too).
//! - [`exits`]: what a vCPU does with an exception exit (MMIO, PSCI, WFI, system registers,
//!   injected aborts, the virtual timer), portable and tested against a mock vCPU.
//! - [`error`]: framework failures as one-line messages a user can act on, the host check and
//!   the decoded vCPU exit (portable, unit-tested on Linux too).
//! - `ffi` (macOS only): the framework calls a VMM needs.
//! - `hv` (macOS only): safe wrappers: the process's VM, thread-bound vCPUs, the macOS 15 GIC.
//! - [`gic`]: a GICv3 in user space for macOS before 15 (portable, unit-tested).
//! - [`run`]: one turn of a vCPU's loop: timer, IRQ line, run, exit with the GIC served here.
//! - `mock`: a register file standing in for a vCPU in tests and fuzz targets.
//!
//! The FDT and memory layout are the VMM's shared arm64 layer (`vmm/src/arch/aarch64`); the
//! VMM's event loop on macOS (kqueue instead of eventfd/epoll) is still to come.

pub mod error;
pub mod esr;
pub mod exits;
pub mod gic;
#[doc(hidden)]
pub mod mock;
pub mod run;

#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
pub mod ffi;
#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
pub mod hv;
