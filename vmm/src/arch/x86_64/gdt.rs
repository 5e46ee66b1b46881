//! Global descriptor table entries for the boot CPU, and the matching hidden segment state the
//! hypervisor loads (a vCPU starts with segments already loaded, so both must agree).

/// A segment register's hidden state, hypervisor-neutral.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    pub db: bool,
    pub s: bool,
    pub l: bool,
    pub g: bool,
    pub avl: bool,
}

/// Encodes a GDT descriptor from flags (bits 8..16 = access byte, 12..16 of the high nibble =
/// G/DB/L/AVL, as in the `flags` argument of Linux's GDT_ENTRY), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decodes the descriptor at GDT index `index` into the hidden state loaded with it.
pub fn segment_from_entry(entry: u64, index: u16) -> Segment {
    let base = (((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000)) as u32;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = (entry >> 55) & 1 == 1;
    // The hidden limit is in bytes: page-granular limits are scaled up.
    let limit = if g {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    Segment {
        base: u64::from(base),
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: (entry >> 47) & 1 == 1,
        dpl: ((entry >> 45) & 3) as u8,
        db: (entry >> 54) & 1 == 1,
        s: (entry >> 44) & 1 == 1,
        l: (entry >> 53) & 1 == 1,
        g,
        avl: (entry >> 52) & 1 == 1,
    }
}

/// GDT for the 32-bit PVH entry: null, flat 32-bit code, flat data, TSS.
pub const PVH_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// GDT for the 64-bit Linux entry: null, 64-bit code, flat data, TSS.
pub const LONG_MODE_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Indexes into either GDT.
pub const CODE_INDEX: u16 = 1;
/// Data segment index.
pub const DATA_INDEX: u16 = 2;
/// Task state segment index.
pub const TSS_INDEX: u16 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_linux() {
        // Values from Linux's boot GDT (arch/x86/boot/pm.c and head_64.S).
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn decodes_code_segments() {
        let cs = segment_from_entry(PVH_GDT[1], CODE_INDEX);
        assert_eq!(
            (cs.selector, cs.type_, cs.limit, cs.base),
            (8, 0xb, 0xffff_ffff, 0)
        );
        assert!(cs.present && cs.s && cs.db && cs.g && !cs.l);
        let cs64 = segment_from_entry(LONG_MODE_GDT[1], CODE_INDEX);
        assert!(cs64.l && !cs64.db);
        let tss = segment_from_entry(PVH_GDT[3], TSS_INDEX);
        assert_eq!(
            (tss.selector, tss.type_, tss.limit, tss.s),
            (0x18, 0xb, 0x67, false)
        );
    }

    #[test]
    fn base_round_trips() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let s = segment_from_entry(e, 2);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
    }
}
