//! Tiny guest programs for msb-vmm's test tier 2 and the stub boot benchmark. Each is an ELF
//! built from `guests/*.S` by this crate's build script; they print `key=value` lines on the
//! serial port, then reset through the i8042 (or fault, or hang, on purpose).
//!
//! - `pvh_boot`: PVH entry; reports start_info, memory map, registers, boot timer, unmapped I/O.
//! - `linux64_boot`: no PVH note, so the 64-bit Linux boot protocol; reports long mode state
//!   and the zero page.
//! - `smp`: wakes vCPU 1 with INIT/SIPI and reports the MP table's CPU count.
//! - `fault`: triple-faults.
//! - `stub`: writes the boot timer and resets at once (the benchmark's guest).
//! - `hang`: prints a line and spins forever.
//! - `count`: counts forever in the word at [`COUNT_ADDR`] and in EBX, copied to the next word
//!   (pause, resume, snapshots).
//! - `tick`: a local-APIC timer interrupt held pending (interrupts off) until the host writes
//!   the word at `COUNT_ADDR + 12`; its handler counts at `COUNT_ADDR + 8` (snapshots of
//!   interrupt state).
//!
//! arm64 (built only for arm64 targets, as flat binaries loaded at the start of RAM):
//! - `aarch64_timer`: the virtual timer's interrupt through the GICv3 to an EL1 vector, whose
//!   INTID it reports before powering off through PSCI.

use std::path::Path;

macro_rules! guest {
    ($name:ident) => {
        /// Path of this guest's ELF image.
        pub fn $name() -> &'static Path {
            Path::new(concat!(env!("OUT_DIR"), "/", stringify!($name), ".elf"))
        }
    };
}

guest!(pvh_boot);
guest!(linux64_boot);
guest!(smp);
guest!(fault);
guest!(stub);
guest!(hang);
guest!(count);
guest!(tick);

/// Where the `count` guest counts.
pub const COUNT_ADDR: u64 = 0x5_0000;

/// The arm64 timer guest's code (position-independent; see `guests/aarch64/timer.S`).
#[cfg(target_arch = "aarch64")]
pub fn aarch64_timer() -> &'static [u8] {
    include_bytes!(concat!(env!("OUT_DIR"), "/aarch64_timer.bin"))
}
