//! The user-space GICv3 fed any sequence of distributor and redistributor accesses, CPU
//! interface register reads and writes, and device lines a guest and its devices can produce:
//! it answers every access and never panics, and an interrupt is acknowledged exactly when the
//! vCPU's IRQ line says one is ready.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_hvf::gic::{Gic, IccReg, DIST_SIZE, REDIST_SIZE_PER_CPU, SPURIOUS};

fuzz_target!(|data: &[u8]| {
    let mut g = Gic::new(&[0, 1, 0x100], 96);
    for op in data.chunks(12) {
        let mut b = [0u8; 12];
        b[..op.len()].copy_from_slice(op);
        let off = u64::from(u32::from_le_bytes([b[1], b[2], b[3], 0]));
        let val = u64::from_le_bytes([b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11]]);
        let len = [1usize, 2, 4, 8][usize::from(b[0] >> 6)];
        let cpu = usize::from(b[1] % 4);
        let mut buf = [0u8; 8];
        match b[0] & 7 {
            0 => {
                g.dist_write(off % DIST_SIZE, &val.to_le_bytes()[..len]);
            }
            1 => g.dist_read(off % DIST_SIZE, &mut buf[..len]),
            2 => {
                g.redist_write(off % (4 * REDIST_SIZE_PER_CPU), &val.to_le_bytes()[..len]);
            }
            3 => g.redist_read(off % (4 * REDIST_SIZE_PER_CPU), &mut buf[..len]),
            4 => {
                g.set_spi(off as u32 % 1100, val & 1 != 0);
            }
            5 => {
                g.set_ppi(cpu, off as u32 % 40, val & 1 != 0);
            }
            _ => {
                let (crn, crm, op2) = (b[2] & 15, b[3] & 15, (b[3] >> 4) & 7);
                let reg = IccReg::decode(3, 0, crn, crm, op2).unwrap_or(IccReg::Iar1);
                if b[0] & 8 != 0 {
                    let ready = g.irq_line(cpu);
                    let v = g.icc_read(cpu, reg);
                    if reg == IccReg::Iar1 {
                        assert_eq!(
                            ready,
                            v != u64::from(SPURIOUS),
                            "IAR1 {v} with line {ready}"
                        );
                    }
                } else {
                    g.icc_write(cpu, reg, val);
                }
            }
        }
    }
});
