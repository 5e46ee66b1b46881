//! The GIC as a Linux guest drives it: set-up through the distributor and redistributors,
//! interrupts raised by devices and timers, acknowledged and ended through the CPU interface.

use super::*;

const MPIDRS: [u64; 2] = [0x0, 0x1];

fn w32(g: &mut Gic, dist: bool, off: u64, v: u32) -> Kick {
    if dist {
        g.dist_write(off, &v.to_le_bytes())
    } else {
        g.redist_write(off, &v.to_le_bytes())
    }
}

fn r32(g: &Gic, dist: bool, off: u64) -> u32 {
    let mut b = [0u8; 4];
    if dist {
        g.dist_read(off, &mut b)
    } else {
        g.redist_read(off, &mut b)
    }
    u32::from_le_bytes(b)
}

/// What Linux's gic-v3 driver does at boot: group 1 everywhere, default priority 0xa0, the
/// redistributors awake, each CPU interface enabled with PMR 0xf0.
fn linux_gic() -> Gic {
    let mut g = Gic::new(&MPIDRS, 64);
    assert_eq!(r32(&g, true, 0xffe8) >> 4 & 0xf, 3, "ArchRev");
    let lines = r32(&g, true, 0x4) & 0x1f;
    assert_eq!((lines + 1) * 32, 96);
    for n in 1..=lines as u64 {
        w32(&mut g, true, 0x80 + 4 * n, !0);
    }
    for intid in (32..96u64).step_by(4) {
        w32(&mut g, true, 0x400 + intid, 0xa0a0_a0a0);
    }
    w32(&mut g, true, 0, 0x13);
    for cpu in 0..MPIDRS.len() as u64 {
        let rd = cpu * REDIST_SIZE_PER_CPU;
        w32(&mut g, false, rd + 0x14, 0);
        assert_eq!(r32(&g, false, rd + 0x14) & 4, 0, "ChildrenAsleep");
        w32(&mut g, false, rd + SGI_FRAME + 0x80, !0);
        for intid in (0..32u64).step_by(4) {
            w32(&mut g, false, rd + SGI_FRAME + 0x400 + intid, 0xa0a0_a0a0);
        }
        let c = cpu as usize;
        g.icc_write(c, IccReg::Pmr, 0xf0);
        g.icc_write(c, IccReg::Bpr1, 0);
        g.icc_write(c, IccReg::Ctlr, 0);
        g.icc_write(c, IccReg::Ap1r(0), 0);
        g.icc_write(c, IccReg::Igrpen1, 1);
    }
    g
}

fn enable(g: &mut Gic, cpu: usize, intid: u32) {
    if intid < 32 {
        let rd = cpu as u64 * REDIST_SIZE_PER_CPU + SGI_FRAME;
        w32(g, false, rd + 0x100, 1 << intid);
    } else {
        w32(
            g,
            true,
            0x100 + u64::from(intid / 32) * 4,
            1 << (intid % 32),
        );
    }
}

fn route(g: &mut Gic, intid: u32, mpidr: u64) {
    g.dist_write(0x6000 + 8 * u64::from(intid), &mpidr.to_le_bytes());
}

fn iar(g: &mut Gic, cpu: usize) -> u32 {
    g.icc_read(cpu, IccReg::Iar1) as u32
}

fn eoi(g: &mut Gic, cpu: usize, intid: u32) {
    g.icc_write(cpu, IccReg::Eoir1, u64::from(intid));
}

#[test]
fn the_registers_linux_probes_describe_a_gicv3() {
    let g = linux_gic();
    assert_eq!(r32(&g, true, 0) & 0x53, 0x53, "ARE and DS read as one");
    assert_eq!(r32(&g, true, 0x4) >> 19 & 0x1f, 9, "IDbits");
    let mut typer = [0u8; 8];
    g.redist_read(0x8, &mut typer);
    let t0 = u64::from_le_bytes(typer);
    assert_eq!(t0 & 1 << 4, 0, "vCPU 0's redistributor is not the last");
    g.redist_read(REDIST_SIZE_PER_CPU + 0x8, &mut typer);
    let t1 = u64::from_le_bytes(typer);
    assert_eq!(t1 >> 32, 1, "affinity of vCPU 1");
    assert_eq!(t1 >> 8 & 0xffff, 1, "processor number");
    assert_ne!(t1 & 1 << 4, 0, "Last");
    // The upper half alone, as a 32-bit read.
    assert_eq!(r32(&g, false, REDIST_SIZE_PER_CPU + 0xc), 1);
    assert_eq!(r32(&g, false, 0xffe8) >> 4 & 0xf, 3);
    // Beyond the last redistributor: nothing.
    assert_eq!(r32(&g, false, 2 * REDIST_SIZE_PER_CPU + 0x8), 0);
    // Priorities read back as 32-bit words and per byte, with the unimplemented bits clear.
    assert_eq!(r32(&g, true, 0x400 + 40), 0xa0a0_a0a0);
    let mut g = g;
    g.dist_write(0x400 + 41, &[0x87]);
    assert_eq!(r32(&g, true, 0x400 + 40), 0xa0a0_80a0);
    assert_eq!(IccReg::decode(3, 0, 12, 12, 0), Some(IccReg::Iar1));
    assert_eq!(IccReg::decode(3, 0, 4, 6, 0), Some(IccReg::Pmr));
    assert_eq!(IccReg::decode(3, 0, 12, 11, 5), Some(IccReg::Sgi1r));
    assert_eq!(IccReg::decode(3, 3, 14, 0, 2), None);
    assert_eq!(g.icc_read(0, IccReg::Sre) & 1, 1);
}

#[test]
fn a_level_spi_is_delivered_to_its_routed_vcpu_until_the_line_falls() {
    let mut g = linux_gic();
    enable(&mut g, 0, 40);
    route(&mut g, 40, 1);
    assert_eq!(g.set_spi(40, true), 0b10, "kick the routed vCPU");
    assert!(g.irq_line(1));
    assert!(!g.irq_line(0));
    assert_eq!(g.icc_read(1, IccReg::Hppir1), 40);
    assert_eq!(iar(&mut g, 1), 40);
    assert!(!g.irq_line(1), "active: not signalled again");
    assert_eq!(g.icc_read(1, IccReg::Rpr), 0xa0);
    assert_eq!(r32(&g, true, 0x300 + 4), 1 << 8, "ISACTIVER");
    // The device still holds its line: pending again after the EOI.
    eoi(&mut g, 1, 40);
    assert!(g.irq_line(1));
    assert_eq!(iar(&mut g, 1), 40);
    g.set_spi(40, false);
    eoi(&mut g, 1, 40);
    assert!(!g.irq_line(1));
    assert_eq!(iar(&mut g, 1), SPURIOUS);
    assert_eq!(g.icc_read(1, IccReg::Rpr), 0xff);
}

#[test]
fn an_edge_spi_latches_each_pulse_once() {
    let mut g = linux_gic();
    // ICFGR2 covers INTIDs 32-47; INTID 33 is field 1, edge bit (2 * 1 + 1).
    w32(&mut g, true, 0xc08, 1 << 3);
    assert_eq!(r32(&g, true, 0xc08), 1 << 3);
    enable(&mut g, 0, 33);
    g.set_spi(33, true);
    g.set_spi(33, false);
    assert!(g.irq_line(0), "a pulse stays pending");
    assert_eq!(iar(&mut g, 0), 33);
    // A second pulse while the first is handled: active and pending.
    g.set_spi(33, true);
    g.set_spi(33, false);
    assert_eq!(r32(&g, true, 0x204) & 2, 2, "ISPENDR");
    assert!(!g.irq_line(0));
    eoi(&mut g, 0, 33);
    assert_eq!(iar(&mut g, 0), 33);
    eoi(&mut g, 0, 33);
    assert_eq!(iar(&mut g, 0), SPURIOUS);
    // The guest can also clear a pending edge interrupt itself.
    g.set_spi(33, true);
    w32(&mut g, true, 0x284, 2);
    assert!(!g.irq_line(0));
}

#[test]
fn priority_mask_and_preemption() {
    let mut g = linux_gic();
    for intid in [34, 35] {
        enable(&mut g, 0, intid);
    }
    g.dist_write(0x400 + 35, &[0x80]);
    g.set_spi(34, true);
    g.set_spi(35, true);
    assert_eq!(iar(&mut g, 0), 35, "the more urgent one first");
    assert!(!g.irq_line(0), "0xa0 cannot preempt a running 0x80");
    eoi(&mut g, 0, 35);
    g.set_spi(35, false);
    assert_eq!(iar(&mut g, 0), 34);
    // A more urgent interrupt preempts the running one.
    g.set_spi(35, true);
    assert!(g.irq_line(0));
    assert_eq!(iar(&mut g, 0), 35);
    assert_eq!(
        g.icc_read(0, IccReg::Ap1r(0)),
        1 << (0x80 >> 3) | 1 << (0xa0 >> 3)
    );
    // An EOI out of order is ignored; in order they unwind.
    eoi(&mut g, 0, 34);
    assert_eq!(g.icc_read(0, IccReg::Rpr), 0x80);
    eoi(&mut g, 0, 35);
    eoi(&mut g, 0, 34);
    assert_eq!(g.icc_read(0, IccReg::Rpr), 0xff);
    // PMR masks what is not more urgent than it.
    g.set_spi(35, false);
    g.icc_write(0, IccReg::Pmr, 0x80);
    assert!(!g.irq_line(0), "0xa0 is masked by PMR 0x80");
    g.icc_write(0, IccReg::Pmr, 0xf0);
    assert!(g.irq_line(0));
    // Disabled, or its group disabled: not signalled.
    g.icc_write(0, IccReg::Igrpen1, 0);
    assert!(!g.irq_line(0));
    g.icc_write(0, IccReg::Igrpen1, 1);
    w32(&mut g, true, 0x184, 1 << 2);
    assert!(!g.irq_line(0));
}

#[test]
fn sgis_reach_the_listed_vcpus_or_all_others() {
    let mut g = linux_gic();
    for cpu in 0..2 {
        enable(&mut g, cpu, 3);
    }
    // INTID 3 to Aff0 = 1 in range 0 of cluster 0.
    let kick = g.icc_write(0, IccReg::Sgi1r, 3 << 24 | 0b10);
    assert_eq!(kick, 0b10);
    assert!(g.irq_line(1));
    assert!(!g.irq_line(0));
    assert_eq!(iar(&mut g, 1), 3);
    eoi(&mut g, 1, 3);
    // IRM: everyone but the sender.
    let kick = g.icc_write(1, IccReg::Sgi1r, 3 << 24 | 1 << 40);
    assert_eq!(kick, 0b01);
    assert_eq!(iar(&mut g, 0), 3);
    // A range selector nobody is in reaches nobody.
    assert_eq!(g.icc_write(0, IccReg::Sgi1r, 3 << 24 | 1 << 44 | 0xffff), 0);
}

#[test]
fn split_eoi_mode_keeps_the_interrupt_active_until_dir() {
    let mut g = linux_gic();
    g.icc_write(0, IccReg::Ctlr, 2);
    assert_eq!(g.icc_read(0, IccReg::Ctlr) & 2, 2);
    enable(&mut g, 0, 36);
    g.set_spi(36, true);
    assert_eq!(iar(&mut g, 0), 36);
    g.set_spi(36, false);
    g.set_spi(36, true);
    eoi(&mut g, 0, 36);
    assert_eq!(g.icc_read(0, IccReg::Rpr), 0xff, "priority dropped");
    assert!(!g.irq_line(0), "still active");
    g.icc_write(0, IccReg::Dir, 36);
    assert!(g.irq_line(0));
}

#[test]
fn the_virtual_timer_ppi_is_private_to_its_vcpu() {
    let mut g = linux_gic();
    enable(&mut g, 1, 27);
    assert_eq!(g.set_ppi(1, 27, true), 0b10);
    assert!(!g.irq_line(0));
    assert!(g.irq_line(1));
    assert_eq!(iar(&mut g, 1), 27);
    g.set_ppi(1, 27, false);
    eoi(&mut g, 1, 27);
    assert!(!g.irq_line(1));
    // Not a PPI: ignored.
    assert_eq!(g.set_ppi(1, 40, true), 0);
    assert_eq!(g.set_ppi(9, 27, true), 0);
    assert_eq!(
        g.icc_read(9, IccReg::Iar1),
        u64::from(SPURIOUS),
        "no such vCPU"
    );
    assert_eq!(g.set_spi(5, true), 0);
}

#[test]
fn garbage_from_the_guest_never_panics() {
    let mut g = linux_gic();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x >> 8) % (3 * REDIST_SIZE_PER_CPU);
        let len = [1usize, 2, 4, 8][(x & 3) as usize];
        let bytes = x.rotate_left(17).to_le_bytes();
        let mut buf = [0u8; 8];
        match (x >> 60) & 7 {
            0 => {
                g.dist_write(off % DIST_SIZE, &bytes[..len]);
            }
            1 => g.dist_read(off % DIST_SIZE, &mut buf[..len]),
            2 => {
                g.redist_write(off, &bytes[..len]);
            }
            3 => g.redist_read(off, &mut buf[..len]),
            4 => {
                g.set_spi((x >> 20) as u32 % 1100, x & 1 << 5 != 0);
            }
            _ => {
                let reg =
                    IccReg::decode(3, 0, 12, 8 + ((x >> 20) & 7) as u8, ((x >> 24) & 7) as u8)
                        .unwrap_or(IccReg::Pmr);
                let cpu = ((x >> 30) % 3) as usize;
                if x & 1 << 6 != 0 {
                    g.icc_read(cpu, reg);
                } else {
                    g.icc_write(cpu, reg, x.rotate_left(9));
                }
            }
        }
        g.irq_line(0);
        g.irq_line(1);
    }
}
