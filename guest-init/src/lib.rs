//! The msb-vmm host↔guest wire protocol, shared by `msb-init` (the guest's PID 1) and the VMM.
//!
//! One definition used by both sides, so they cannot drift apart. Everything here is plain,
//! portable logic: the host decodes every byte the guest sends with it, so it is written for
//! hostile input (size caps, no panics) and fuzzed (`fuzz/`).
//!
//! - [`frame`]: `[len: u32 LE][postcard(message)]` framing with a size cap.
//! - [`spec`]: the workload description the VMM hands to msb-init on the kernel command line.
//! - [`control`]: the guest→host control stream (output, exit status) of a `run` sandbox.
#![forbid(unsafe_code)]

pub mod base64;
pub mod control;
pub mod frame;
pub mod spec;

/// Version of the wire protocol. The guest announces it first; the host refuses any other.
pub const PROTOCOL_VERSION: u32 = 1;

/// The serial port msb-init writes its control stream to (the second 8250 UART, COM2).
pub const CONTROL_TTY: &str = "/dev/ttyS1";

/// Guest physical address of the boot-timer device (Firecracker-compatible on x86_64).
#[cfg(target_arch = "x86_64")]
pub const BOOT_TIMER_ADDR: u64 = 0xC000_0000;
/// Guest physical address of the boot-timer device on aarch64 guests.
#[cfg(not(target_arch = "x86_64"))]
pub const BOOT_TIMER_ADDR: u64 = 0x4000_0000;

/// The byte written to the boot timer to say "boot complete".
pub const BOOT_TIMER_MAGIC: u8 = 123;
