//! Intel MultiProcessor Specification 1.4 tables. Without ACPI, this is how Linux learns the
//! CPUs (APIC ids), the IOAPIC and the ISA interrupt routing.

use super::layout::{APIC_START, IOAPIC_START};

/// Most vCPUs the table (and the guest kernel's NR_CPUS) describes.
pub const MAX_CPUS: u32 = 64;
/// ISA IRQs routed to IOAPIC pins 1:1.
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9); // FPU, APIC
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The MP floating pointer followed by the configuration table, to be placed at `base`.
/// `cpus` must be 1..=MAX_CPUS (the caller validates the user's --cpus).
pub fn build(base: u64, cpus: u32) -> Vec<u8> {
    let cpus = cpus.clamp(1, MAX_CPUS);
    let ioapic_id = cpus as u8; // after the LAPIC ids 0..cpus
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend([0u8, id as u8, APIC_VERSION, flags]);
        entries.extend(CPU_SIGNATURE.to_le_bytes());
        entries.extend(CPU_FEATURES.to_le_bytes());
        entries.extend([0u8; 8]);
        count += 1;
    }
    entries.extend([1u8, 0]);
    entries.extend(b"ISA   ");
    count += 1;
    entries.extend([2u8, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend((IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        entries.extend([3u8, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 of the BSP is the ExtINT line from the PIC; LINT1 of every CPU is NMI.
    entries.extend([4u8, INT_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend([4u8, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend(b"PCMP");
    table.extend((table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend(b"MSBVMM  ");
    table.extend(b"MICROVM     ");
    table.extend(0u32.to_le_bytes()); // OEM table pointer
    table.extend(0u16.to_le_bytes()); // OEM table size
    table.extend(count.to_le_bytes());
    table.extend((APIC_START as u32).to_le_bytes());
    table.extend(0u32.to_le_bytes());
    table.extend(entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16 + table.len());
    mpf.extend(b"_MP_");
    mpf.extend(((base + 16) as u32).to_le_bytes());
    mpf.extend([1u8, 4, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);
    mpf.extend(table);
    mpf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_layout() {
        for cpus in [1, 2, 7, MAX_CPUS] {
            let t = build(0xf0000, cpus);
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0xf0010);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([table[34], table[35]]) as u32;
            assert_eq!(count, cpus + 1 + 1 + 24 + 2);
            // Processor entries: BSP flag only on the first, APIC ids in order.
            for id in 0..cpus as usize {
                let e = &table[44 + id * 20..];
                assert_eq!((e[0], e[1]), (0, id as u8));
                assert_eq!(e[3] & CPU_BSP != 0, id == 0);
            }
        }
    }

    #[test]
    fn fits_below_one_mebibyte() {
        assert!(0xf0000 + build(0xf0000, MAX_CPUS).len() as u64 <= 0x10_0000);
    }
}
