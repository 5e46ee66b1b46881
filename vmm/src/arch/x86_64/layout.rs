//! x86_64 guest physical memory layout.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries)             0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH start_info + modlist    0x0000_7000  PVH memmap / Linux zero page
//! 0x0000_8ff0  boot stack (64-bit entry)   0x0000_9000  PML4, PDPT, PD (64-bit entry)
//! 0x0002_0000  kernel command line         0x0009_fc00  end of low RAM (EBDA)
//! 0x000f_0000  MP table (BIOS area)        0x0010_0000  high memory; kernels load at 16 MiB
//! ...          initramfs at the top of low RAM
//! 0xc000_0000  MMIO gap: boot timer first, then virtio-mmio devices; LAPIC/IOAPIC at the top
//! 0x1_0000_0000  RAM beyond 3 GiB continues here
//! ```

/// GDT location.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT location (a zero-length IDT is loaded for the 64-bit entry).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux `boot_params` ("zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit entry.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// x86 Linux reads at most this many command-line bytes (COMMAND_LINE_SIZE), NUL included.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of the first RAM range: the EBDA and BIOS area above stay out of the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// MP floating pointer and configuration table; Linux scans 0xf0000..0x100000 for it.
pub const MPTABLE_START: u64 = 0xf0000;
/// First byte of high memory.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (no RAM from here to 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The boot-timer device, first in the MMIO gap.
pub const BOOT_TIMER_START: u64 = MMIO_GAP_START;
/// Where virtio-mmio devices start, one 4 KiB window each.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START + 0x1000;
/// In-kernel IOAPIC base (KVM's default).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS needs three pages below 4 GiB outside RAM.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity map page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Guest RAM ranges for `mem_bytes` of memory: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// Last address + 1 of RAM below the MMIO gap.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(low_ram_end(8 << 30), MMIO_GAP_START);
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (BOOT_GDT_START, 0x20),
            (BOOT_IDT_START, 0x8),
            (PVH_INFO_START, 0x38),
            (PVH_MODLIST_START, 0x20),
            (PVH_MEMMAP_START, 0x1000),
            (PML4_START, 0x3000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, 0x10000),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
        const { assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > PVH_MEMMAP_START) };
    }

    #[test]
    fn msb_init_signals_the_boot_timer_where_it_is() {
        assert_eq!(BOOT_TIMER_START, msb_init::BOOT_TIMER_ADDR_X86_64);
    }
}
