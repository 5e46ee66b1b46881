//! The entry points every architecture module offers (see [`crate::arch`]), for x86_64: the
//! memory layout the VM code needs, kernel loading, the boot structures, interrupt lines of
//! the virtio-mmio slots and the platform's own devices.

use std::fs::File;
use std::sync::{Arc, Mutex};

use linux_loader::loader::{elf::Elf, KernelLoader};
use msb_devices::bus::Bus;
use msb_devices::i8042::{I8042, I8042_BASE, I8042_PORTS};
use msb_devices::serial::{ConsoleSink, SerialDevice, SerialSnapshot, COM1, UART_PORTS};
use msb_devices::Interrupt;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::boot::BootLayout;
use super::layout::{low_ram_end, HIMEM_START};
use crate::arch::{BootInfo, PlatformError};
use crate::hypervisor::Vm;

pub use super::boot::{BootError, BootProtocol as BootEntry};
pub use super::layout::{ram_ranges, BOOT_TIMER_START, VIRTIO_MMIO_START};
pub use super::mptable::MAX_CPUS;

/// Command line used when none is given: serial console, i8042 reset as power-off, reboot at
/// once on panic, and no IOAPIC timer check (a slow, pointless probe under KVM).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 no_timer_check";

/// First byte of guest RAM.
pub const RAM_START: u64 = 0;

/// Lowest address a kernel may load at (below is the BIOS area and our boot structures).
pub const KERNEL_MIN_ADDR: u64 = HIMEM_START;

/// Last address + 1 the kernel and the initramfs may occupy: the end of RAM below the MMIO
/// gap.
pub fn boot_ram_end(mem_bytes: u64) -> u64 {
    low_ram_end(mem_bytes)
}

/// Interrupt lines of the virtio-mmio slots, in order: legacy ISA lines of devices we lack
/// (3 is COM2's; we have no COM2).
const VIRTIO_IRQS: [u32; 10] = [5, 6, 7, 9, 10, 11, 12, 14, 15, 3];

/// How many virtio-mmio devices a VM can have.
pub const VIRTIO_SLOTS: usize = VIRTIO_IRQS.len();

/// The interrupt line (GSI) of virtio-mmio slot `slot` (< [`VIRTIO_SLOTS`]).
pub fn virtio_irq(slot: usize) -> u32 {
    VIRTIO_IRQS[slot]
}

/// What the ELF `vmlinux` says about where it loads and how it is entered.
pub fn inspect_kernel(
    path: &std::path::Path,
) -> Result<crate::loader::KernelInfo, crate::loader::LoaderError> {
    crate::loader::inspect_kernel(path)
}

/// Loads an ELF `vmlinux` at its own addresses (at least [`KERNEL_MIN_ADDR`]); enters it
/// through PVH when it has the note (`pvh_entry`), else through the 64-bit boot protocol.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &mut File,
    pvh_entry: Option<u64>,
) -> Result<BootEntry, String> {
    let loaded =
        Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))).map_err(|e| e.to_string())?;
    Ok(match pvh_entry {
        Some(entry) => BootEntry::Pvh { entry },
        None => BootEntry::Linux64 {
            entry: loaded.kernel_load.0,
        },
    })
}

/// Writes the boot structures; virtio-mmio devices are announced on the command line (x86
/// guests get no device tree and we give them no ACPI).
pub fn write_boot_info(mem: &GuestMemoryMmap, info: &BootInfo<'_>) -> Result<(), BootError> {
    let mut cmdline = info.cmdline.to_string();
    for (base, irq) in info.virtio {
        cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
    }
    super::boot::write_boot_info(
        mem,
        &BootLayout {
            protocol: info.entry,
            cmdline: cmdline.into_bytes(),
            initrd: info.initrd,
            mem_bytes: info.mem_bytes,
            cpus: info.cpus,
        },
    )
}

/// The platform's own devices: the console UART on COM1 (its interrupt from `vm`) and the
/// i8042 controller, whose reset line (the guest's `reboot=k`) is `power_off`. Returns the
/// console, which also takes the user's input.
pub fn add_platform_devices(
    vm: &dyn Vm,
    pio: &mut Bus,
    _mmio: &mut Bus,
    console: ConsoleSink,
    power_off: Arc<dyn Interrupt>,
    saved_console: Option<&SerialSnapshot>,
) -> Result<Arc<Mutex<SerialDevice<ConsoleSink>>>, PlatformError> {
    let irq = vm.create_irq(COM1.1)?;
    let com1 = Arc::new(Mutex::new(match saved_console {
        Some(s) => SerialDevice::from_state(irq, console, s).map_err(PlatformError::Restore)?,
        None => SerialDevice::new(irq, console),
    }));
    pio.insert(u64::from(COM1.0), UART_PORTS, com1.clone())?;
    pio.insert(
        u64::from(I8042_BASE),
        I8042_PORTS,
        Arc::new(Mutex::new(I8042::new(power_off))),
    )?;
    Ok(com1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_slots_have_distinct_lines_clear_of_com1_and_the_i8042() {
        let mut seen = std::collections::HashSet::new();
        for slot in 0..VIRTIO_SLOTS {
            let irq = virtio_irq(slot);
            assert!(seen.insert(irq), "slot {slot}: line {irq} used twice");
            // COM1 is 4; the i8042 keyboard and mouse are 1 and 12 (we expose no ports
            // that raise them, but keep 4 and the timer's 0 and the cascade's 2 free).
            assert!(![0, 2, 4].contains(&irq), "slot {slot}: line {irq}");
        }
    }
}
