//! arm64 guest physical memory layout (device addresses as QEMU's `virt` machine has them,
//! so a reader who knows that machine finds them where expected).
//!
//! ```text
//! 0x0800_0000  GICv3 distributor (64 KiB)
//! 0x080a_0000  GICv3 redistributors (128 KiB per vCPU, up to MAX_CPUS)
//! 0x0900_0000  console UART (16550, MMIO, 4 KiB)
//! 0x0901_0000  real-time clock (PL031, 4 KiB)
//! 0x0a00_0000  boot timer (4 KiB), then virtio-mmio devices (4 KiB each)
//! 0x4000_0000  RAM: the kernel at its text offset from here, the initramfs below the
//!              device tree, the device tree in the last 2 MiB
//! ```

/// GICv3 distributor.
pub const GIC_DIST_START: u64 = 0x0800_0000;
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// GICv3 redistributors, one frame pair per vCPU.
pub const GIC_REDIST_START: u64 = 0x080a_0000;
pub const GIC_REDIST_SIZE_PER_CPU: u64 = 0x2_0000;
/// Most vCPUs: their redistributors must end below the UART.
pub const MAX_CPUS: u32 = 64;
/// The console UART.
pub const UART_START: u64 = 0x0900_0000;
pub const UART_SIZE: u64 = 0x1000;
/// The PL031 real-time clock.
pub const RTC_START: u64 = 0x0901_0000;
pub const RTC_SIZE: u64 = 0x1000;
/// The boot-timer device (msb-init writes to it once user space runs).
pub const BOOT_TIMER_START: u64 = 0x0a00_0000;
/// Where virtio-mmio devices start, one 4 KiB window each.
pub const VIRTIO_MMIO_START: u64 = BOOT_TIMER_START + 0x1000;
/// First byte of RAM.
pub const RAM_START: u64 = 0x4000_0000;
/// Room for the device tree at the top of RAM (the kernel maps it 2 MiB-aligned).
pub const FDT_MAX_SIZE: u64 = 0x20_0000;

/// Guest RAM ranges for `mem_bytes` of memory: one, from [`RAM_START`].
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    vec![(RAM_START, mem_bytes)]
}

/// Where the device tree goes: the last 2 MiB-aligned 2 MiB of RAM.
pub fn fdt_addr(mem_bytes: u64) -> u64 {
    (RAM_START + mem_bytes).saturating_sub(FDT_MAX_SIZE) & !(FDT_MAX_SIZE - 1)
}

/// Last address + 1 the kernel and the initramfs may occupy: the device tree's start.
pub fn boot_ram_end(mem_bytes: u64) -> u64 {
    fdt_addr(mem_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msb_init_signals_the_boot_timer_where_it_is() {
        assert_eq!(BOOT_TIMER_START, msb_init::BOOT_TIMER_ADDR_AARCH64);
    }

    #[test]
    fn devices_do_not_overlap_and_stay_below_ram() {
        let redist_end = GIC_REDIST_START + GIC_REDIST_SIZE_PER_CPU * u64::from(MAX_CPUS);
        let areas = [
            (GIC_DIST_START, GIC_DIST_SIZE),
            (GIC_REDIST_START, redist_end - GIC_REDIST_START),
            (UART_START, UART_SIZE),
            (RTC_START, RTC_SIZE),
            (BOOT_TIMER_START, 0x1000),
            // Ten virtio-mmio slots.
            (VIRTIO_MMIO_START, 10 * 0x1000),
        ];
        for (i, a) in areas.iter().enumerate() {
            assert!(a.0 + a.1 <= RAM_START, "{a:x?} reaches RAM");
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }

    #[test]
    fn the_device_tree_sits_aligned_at_the_top_of_ram() {
        assert_eq!(fdt_addr(128 << 20), RAM_START + (126 << 20));
        // An odd size still leaves a whole aligned 2 MiB inside RAM.
        let a = fdt_addr((128 << 20) + (1 << 20));
        assert_eq!(a % FDT_MAX_SIZE, 0);
        assert!(a + FDT_MAX_SIZE <= RAM_START + (129 << 20));
        assert_eq!(ram_ranges(1 << 30), vec![(RAM_START, 1 << 30)]);
    }
}
