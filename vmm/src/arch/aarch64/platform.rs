//! The entry points every architecture module offers (see [`crate::arch`]), for arm64: an
//! `Image` loaded at its text offset from the start of RAM and entered at its first byte
//! with x0 = the device tree, which announces everything (memory, vCPUs, GIC, timer, the
//! console and the virtio-mmio devices).

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

use msb_devices::bus::Bus;
use msb_devices::serial::{ConsoleSink, SerialDevice, SerialSnapshot};
use msb_devices::Interrupt;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::fdt::{self, FdtConfig};
use super::image::{ImageHeader, HEADER_LEN};
use super::layout::{fdt_addr, RTC_SIZE, RTC_START, UART_SIZE, UART_START};
use crate::arch::{BootInfo, PlatformError};
use crate::hypervisor::Vm;
use crate::loader::{KernelInfo, LoaderError};

pub use super::layout::{
    boot_ram_end, ram_ranges, BOOT_TIMER_START, MAX_CPUS, RAM_START, VIRTIO_MMIO_START,
};

/// Command line used when none is given: the 16550 console, reboot (PSCI) at once on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

/// Lowest address a kernel may load at: the start of RAM.
pub const KERNEL_MIN_ADDR: u64 = RAM_START;

/// The console UART's and the RTC's interrupts (SPI numbers); virtio slots follow from
/// [`VIRTIO_SPI_BASE`].
const UART_SPI: u32 = 1;
const RTC_SPI: u32 = 2;
const VIRTIO_SPI_BASE: u32 = 16;

/// How many virtio-mmio devices a VM can have.
pub const VIRTIO_SLOTS: usize = 16;

/// The interrupt (SPI number; KVM's irqfd GSI on arm64) of virtio-mmio slot `slot`.
pub fn virtio_irq(slot: usize) -> u32 {
    VIRTIO_SPI_BASE + slot as u32
}

/// Entry state of the boot vCPU: PC at the kernel's first byte, x0 the device tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    pub pc: u64,
    pub fdt: u64,
}

/// Reads the `Image` header: where the kernel goes and how much RAM it covers.
pub fn inspect_kernel(path: &Path) -> Result<KernelInfo, LoaderError> {
    let io = |source| LoaderError::KernelIo {
        path: path.to_path_buf(),
        source,
    };
    let mut f = crate::loader::open_kernel(path)?;
    let len = f.metadata().map_err(io)?.len();
    let mut head = [0u8; HEADER_LEN];
    let n = f.read(&mut head).map_err(io)?;
    let h = ImageHeader::parse(&head[..n], len).map_err(|e| LoaderError::BadImage {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let start = h.load_addr(RAM_START);
    Ok(KernelInfo {
        entry: start,
        pvh_entry: None,
        load_start: start,
        load_end: start + h.image_size,
        is_linux: true,
    })
}

/// Copies the `Image` to its load address; the device tree will sit at the top of RAM.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &mut File,
    _pvh_entry: Option<u64>,
) -> Result<BootEntry, String> {
    let len = kernel.metadata().map_err(|e| e.to_string())?.len();
    let mut head = [0u8; HEADER_LEN];
    kernel.read_exact(&mut head).map_err(|e| e.to_string())?;
    let h = ImageHeader::parse(&head, len).map_err(|e| e.to_string())?;
    let start = h.load_addr(RAM_START);
    let mem_bytes = mem.last_addr().0 + 1 - RAM_START;
    if start + h.image_size > boot_ram_end(mem_bytes) {
        return Err(format!(
            "the kernel needs {} MiB of RAM from {start:#x}",
            h.image_size >> 20
        ));
    }
    let mut image = head.to_vec();
    kernel.read_to_end(&mut image).map_err(|e| e.to_string())?;
    mem.write_slice(&image, GuestAddress(start))
        .map_err(|e| e.to_string())?;
    Ok(BootEntry {
        pc: start,
        fdt: fdt_addr(mem_bytes),
    })
}

/// Errors writing the boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Fdt(#[from] fdt::FdtError),
    #[error("cannot write the device tree into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Writes the device tree where [`BootEntry::fdt`] points.
pub fn write_boot_info(mem: &GuestMemoryMmap, info: &BootInfo<'_>) -> Result<(), BootError> {
    let blob = fdt::build(&FdtConfig {
        cpus: info.cpus,
        mem_bytes: info.mem_bytes,
        cmdline: info.cmdline,
        initrd: info.initrd,
        uart_spi: UART_SPI,
        rtc_spi: RTC_SPI,
        virtio: info.virtio,
    })?;
    mem.write_slice(&blob, GuestAddress(info.entry.fdt))?;
    Ok(())
}

/// The console UART (16550 on MMIO) and the real-time clock (PL031). Power-off and reset are PSCI calls, which the
/// hypervisor back end reports as exits, so `power_off` has no device here.
pub fn add_platform_devices(
    vm: &dyn Vm,
    _pio: &mut Bus,
    mmio: &mut Bus,
    console: ConsoleSink,
    _power_off: Arc<dyn Interrupt>,
    saved_console: Option<&SerialSnapshot>,
) -> Result<Arc<Mutex<SerialDevice<ConsoleSink>>>, PlatformError> {
    let irq = vm.create_irq(UART_SPI)?;
    let uart = Arc::new(Mutex::new(match saved_console {
        Some(s) => SerialDevice::from_state(irq, console, s).map_err(PlatformError::Restore)?,
        None => SerialDevice::new(irq, console),
    }));
    mmio.insert(UART_START, UART_SIZE, uart.clone())?;
    mmio.insert(
        RTC_START,
        RTC_SIZE,
        Arc::new(Mutex::new(msb_devices::pl031::Pl031::new())),
    )?;
    Ok(uart)
}
