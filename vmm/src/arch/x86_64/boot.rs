//! Boot information written into guest memory before the first instruction: the command line,
//! MP table, GDT, and either the PVH `hvm_start_info` (32-bit entry, preferred) or the Linux
//! 64-bit boot protocol's zero page and identity page tables.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{LONG_MODE_GDT, PVH_GDT};
use super::layout::*;
use super::mptable;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Most e820 entries the zero page holds.
const E820_MAX_ZEROPAGE: usize = 128;

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
    Pvh { entry: u64 },
    /// Linux 64-bit boot protocol: long mode with identity-mapped first GiB, `rsi` = zero page.
    Linux64 { entry: u64 },
}

/// Everything the boot structures describe.
#[derive(Debug, Clone)]
pub struct BootLayout {
    pub protocol: BootProtocol,
    /// Command line without the terminating NUL.
    pub cmdline: Vec<u8>,
    /// Guest address and size of the initramfs.
    pub initrd: Option<(u64, u64)>,
    pub mem_bytes: u64,
    pub cpus: u32,
}

/// Errors writing boot information.
#[derive(Debug, Error)]
pub enum BootError {
    #[error("kernel command line is {0} bytes; x86 Linux accepts at most {max}", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("cannot write {what} into guest memory: {source}")]
    Write {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    #[error("the memory map has {0} entries, more than the zero page holds")]
    TooManyE820(usize),
}

/// The e820 memory map for `mem_bytes` of RAM: (address, size, type).
pub fn e820_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM)];
    let low_end = low_ram_end(mem_bytes);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if mem_bytes > MMIO_GAP_START {
        map.push((MMIO_GAP_END, mem_bytes - MMIO_GAP_START, E820_RAM));
    }
    map
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

/// `hvm_start_info` (56 bytes) for the given layout.
pub fn pvh_start_info(layout: &BootLayout, memmap_entries: u32) -> [u8; 56] {
    let mut b = [0u8; 56];
    put(&mut b, 0, &XEN_HVM_START_MAGIC.to_le_bytes());
    put(&mut b, 4, &1u32.to_le_bytes()); // version
    let modules = u32::from(layout.initrd.is_some());
    put(&mut b, 12, &modules.to_le_bytes());
    if modules > 0 {
        put(&mut b, 16, &PVH_MODLIST_START.to_le_bytes());
    }
    put(&mut b, 24, &CMDLINE_START.to_le_bytes());
    put(&mut b, 40, &PVH_MEMMAP_START.to_le_bytes());
    put(&mut b, 48, &memmap_entries.to_le_bytes());
    b
}

/// The Linux zero page (`boot_params`, 4 KiB) for the given layout.
pub fn zero_page(layout: &BootLayout) -> Result<Vec<u8>, BootError> {
    let mut b = vec![0u8; 4096];
    let map = e820_map(layout.mem_bytes);
    if map.len() > E820_MAX_ZEROPAGE {
        return Err(BootError::TooManyE820(map.len()));
    }
    b[0x1e8] = map.len() as u8;
    put(&mut b, 0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
    put(&mut b, 0x202, &0x5372_6448u32.to_le_bytes()); // "HdrS"
    put(&mut b, 0x206, &0x020fu16.to_le_bytes()); // protocol 2.15
    b[0x210] = 0xff; // type_of_loader: undefined
    b[0x211] = 0x01; // loadflags: LOADED_HIGH
    if let Some((addr, size)) = layout.initrd {
        put(&mut b, 0x218, &(addr as u32).to_le_bytes());
        put(&mut b, 0x21c, &(size as u32).to_le_bytes());
        put(&mut b, 0x0c0, &((addr >> 32) as u32).to_le_bytes());
        put(&mut b, 0x0c4, &((size >> 32) as u32).to_le_bytes());
    }
    put(&mut b, 0x228, &(CMDLINE_START as u32).to_le_bytes());
    put(&mut b, 0x230, &0x0100_0000u32.to_le_bytes()); // kernel_alignment
    put(&mut b, 0x238, &(layout.cmdline.len() as u32).to_le_bytes());
    for (i, (addr, size, ty)) in map.iter().enumerate() {
        let off = 0x2d0 + i * 20;
        put(&mut b, off, &addr.to_le_bytes());
        put(&mut b, off + 8, &size.to_le_bytes());
        put(&mut b, off + 16, &ty.to_le_bytes());
    }
    Ok(b)
}

/// Identity page tables for the first GiB (2 MiB pages): PML4, PDPT, PD.
pub fn identity_page_tables() -> Vec<u8> {
    let mut b = vec![0u8; 0x3000];
    put(&mut b, 0, &(PDPTE_START | 0x03).to_le_bytes());
    put(&mut b, 0x1000, &(PDE_START | 0x03).to_le_bytes());
    for i in 0..512u64 {
        put(
            &mut b,
            0x2000 + i as usize * 8,
            &((i << 21) | 0x83).to_le_bytes(),
        );
    }
    b
}

fn write(
    mem: &GuestMemoryMmap,
    addr: u64,
    bytes: &[u8],
    what: &'static str,
) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| BootError::Write { what, source })
}

/// Writes all boot structures for `layout` into `mem`.
pub fn write_boot_info(mem: &GuestMemoryMmap, layout: &BootLayout) -> Result<(), BootError> {
    if layout.cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(layout.cmdline.len()));
    }
    if layout.cmdline.contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let mut cmdline = layout.cmdline.clone();
    cmdline.push(0);
    write(mem, CMDLINE_START, &cmdline, "the command line")?;
    write(
        mem,
        MPTABLE_START,
        &mptable::build(MPTABLE_START, layout.cpus),
        "the MP table",
    )?;
    write(mem, BOOT_IDT_START, &0u64.to_le_bytes(), "the IDT")?;
    match layout.protocol {
        BootProtocol::Pvh { .. } => {
            let gdt: Vec<u8> = PVH_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
            write(mem, BOOT_GDT_START, &gdt, "the GDT")?;
            let map = e820_map(layout.mem_bytes);
            let mut mm = Vec::with_capacity(map.len() * 24);
            for (addr, size, ty) in &map {
                mm.extend(addr.to_le_bytes());
                mm.extend(size.to_le_bytes());
                mm.extend(ty.to_le_bytes());
                mm.extend(0u32.to_le_bytes());
            }
            write(mem, PVH_MEMMAP_START, &mm, "the PVH memory map")?;
            if let Some((addr, size)) = layout.initrd {
                let mut m = Vec::with_capacity(32);
                m.extend(addr.to_le_bytes());
                m.extend(size.to_le_bytes());
                m.extend([0u8; 16]);
                write(mem, PVH_MODLIST_START, &m, "the PVH module list")?;
            }
            write(
                mem,
                PVH_INFO_START,
                &pvh_start_info(layout, map.len() as u32),
                "hvm_start_info",
            )?;
        }
        BootProtocol::Linux64 { .. } => {
            let gdt: Vec<u8> = LONG_MODE_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
            write(mem, BOOT_GDT_START, &gdt, "the GDT")?;
            write(mem, PML4_START, &identity_page_tables(), "the page tables")?;
            write(mem, ZERO_PAGE_START, &zero_page(layout)?, "the zero page")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn layout(protocol: BootProtocol, mem: u64) -> BootLayout {
        BootLayout {
            protocol,
            cmdline: b"console=ttyS0".to_vec(),
            initrd: Some((0x7000_0000, 0x1234)),
            mem_bytes: mem,
            cpus: 2,
        }
    }

    #[test]
    fn e820_for_small_and_large_memory() {
        assert_eq!(
            e820_map(128 << 20),
            vec![
                (0, EBDA_START, 1),
                (HIMEM_START, (128 << 20) - HIMEM_START, 1)
            ]
        );
        let big = e820_map(5 << 30);
        assert_eq!(big.len(), 3);
        assert_eq!(big[1], (HIMEM_START, MMIO_GAP_START - HIMEM_START, 1));
        assert_eq!(big[2], (MMIO_GAP_END, 2 << 30, 1));
    }

    #[test]
    fn start_info_fields() {
        let l = layout(BootProtocol::Pvh { entry: 0 }, 256 << 20);
        let b = pvh_start_info(&l, 2);
        assert_eq!(u32_at(&b, 0), XEN_HVM_START_MAGIC);
        assert_eq!(u32_at(&b, 4), 1);
        assert_eq!(u32_at(&b, 12), 1);
        assert_eq!(u64_at(&b, 16), PVH_MODLIST_START);
        assert_eq!(u64_at(&b, 24), CMDLINE_START);
        assert_eq!(u64_at(&b, 40), PVH_MEMMAP_START);
        assert_eq!(u32_at(&b, 48), 2);
    }

    #[test]
    fn zero_page_fields() {
        let l = layout(BootProtocol::Linux64 { entry: 0 }, 256 << 20);
        let b = zero_page(&l).unwrap();
        assert_eq!(b[0x1e8], 2);
        assert_eq!(u32_at(&b, 0x202), 0x5372_6448);
        assert_eq!(u32_at(&b, 0x218), 0x7000_0000);
        assert_eq!(u32_at(&b, 0x21c), 0x1234);
        assert_eq!(u32_at(&b, 0x228), CMDLINE_START as u32);
        assert_eq!(u64_at(&b, 0x2d0 + 20 + 8), (256 << 20) - HIMEM_START);
    }

    #[test]
    fn page_tables_map_the_first_gib() {
        let t = identity_page_tables();
        assert_eq!(u64_at(&t, 0), PDPTE_START | 3);
        assert_eq!(u64_at(&t, 0x1000), PDE_START | 3);
        assert_eq!(u64_at(&t, 0x2000 + 511 * 8), (511 << 21) | 0x83);
    }

    #[test]
    fn writes_into_guest_memory_and_checks_the_command_line() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let mut l = layout(BootProtocol::Pvh { entry: 0 }, 2 << 20);
        write_boot_info(&mem, &l).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, XEN_HVM_START_MAGIC);
        let mut cmd = [0u8; 14];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0\0");
        l.cmdline = vec![b'a'; CMDLINE_MAX_SIZE];
        assert!(matches!(
            write_boot_info(&mem, &l),
            Err(BootError::CmdlineTooLong(_))
        ));
        l.cmdline = b"a\0b".to_vec();
        assert!(matches!(
            write_boot_info(&mem, &l),
            Err(BootError::CmdlineNul)
        ));
    }
}
