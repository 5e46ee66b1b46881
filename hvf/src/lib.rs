//! msb-hvf: Apple Hypervisor.framework for aarch64 guests on macOS. It knows nothing of the
//! VMM; `vmm::hypervisor::hvf` adapts it to the `Hypervisor → Vm → Vcpu` traits.
//!
//! - [`esr`]: decoding of the exception syndromes a vCPU exits with (portable, unit-tested on
//!   Linux too).
//! - [`exits`]: what a vCPU does with an exception exit (MMIO, PSCI, WFI, system registers,
//!   injected aborts, the virtual timer), portable and tested against a mock vCPU.
//! - `ffi` (macOS only): the framework calls a VMM needs.
//!
//! The VMM adapter, GIC and FDT set-up come with the macOS backend work.

pub mod esr;
pub mod exits;

#[cfg(all(target_os = "macos", target_arch = "aarch64"))]
pub mod ffi;
