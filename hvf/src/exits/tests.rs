//! The exit handling against a mock vCPU and platform: each test replays the syndromes a guest's
//! instructions produce and checks registers, device traffic and the outcome.

use std::collections::HashMap;
use std::time::Duration;

use super::*;

type MockVcpu = crate::mock::MockRegs;

/// A bus with one register file at 0x0900_0000 (little-endian bytes), and four vCPUs.
#[derive(Default)]
struct MockPlatform {
    mem: HashMap<u64, u8>,
    writes: Vec<(u64, Vec<u8>)>,
    on: Vec<(u64, u64, u64)>,
    powered: [bool; 4],
}

const DEV: u64 = 0x0900_0000;

impl Platform for MockPlatform {
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.mem.get(&(addr + i as u64)).copied().unwrap_or(0);
        }
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.writes.push((addr, data.to_vec()));
        for (i, b) in data.iter().enumerate() {
            self.mem.insert(addr + i as u64, *b);
        }
    }
    fn cpu_on(&mut self, mpidr: u64, entry: u64, context: u64) -> PsciReturn {
        let Some(on) = self.powered.get_mut(mpidr as usize) else {
            return PsciReturn::InvalidParameters;
        };
        if *on {
            return PsciReturn::AlreadyOn;
        }
        *on = true;
        self.on.push((mpidr, entry, context));
        PsciReturn::Success
    }
    fn affinity_info(&mut self, mpidr: u64) -> Result<AffinityState, PsciReturn> {
        match self.powered.get(mpidr as usize) {
            Some(true) => Ok(AffinityState::On),
            Some(false) => Ok(AffinityState::Off),
            None => Err(PsciReturn::InvalidParameters),
        }
    }
}

/// ESR_EL2 of a guest data abort (a lower EL's, whether EL1 or EL0) with a valid syndrome.
fn dabt(write: bool, size: u8, reg: u8, sign_extend: bool, sixty_four: bool) -> u64 {
    let sas = u64::from(size.trailing_zeros());
    (0x24 << 26)
        | (1 << 25)
        | (1 << 24)
        | (sas << 22)
        | (u64::from(sign_extend) << 21)
        | (u64::from(reg) << 16)
        | (u64::from(sixty_four) << 15)
        | (u64::from(write) << 6)
}

const HVC: u64 = 0x16 << 26;
const SMC: u64 = 0x17 << 26;
const WFI: u64 = 0x01 << 26;

fn vcpu() -> MockVcpu {
    MockVcpu::at(0x4008_0000)
}

fn run(v: &mut MockVcpu, p: &mut MockPlatform, esr: u64, ipa: u64) -> Outcome {
    handle_exception(v, p, esr, ipa).unwrap()
}

#[test]
fn writes_of_each_size_take_the_low_bytes_of_the_register() {
    let (mut v, mut p) = (vcpu(), MockPlatform::default());
    v.x[3] = 0x1122_3344_5566_7788;
    for size in [1u8, 2, 4, 8] {
        assert_eq!(
            run(&mut v, &mut p, dabt(true, size, 3, false, true), DEV),
            Outcome::Continue
        );
    }
    let sizes: Vec<Vec<u8>> = p.writes.iter().map(|w| w.1.clone()).collect();
    assert_eq!(
        sizes,
        vec![
            vec![0x88],
            vec![0x88, 0x77],
            vec![0x88, 0x77, 0x66, 0x55],
            0x1122_3344_5566_7788u64.to_le_bytes().to_vec(),
        ]
    );
    // Each access moved the PC past its instruction.
    assert_eq!(v.pc, 0x4008_0000 + 16);
}

#[test]
fn a_write_of_the_zero_register_writes_zero() {
    let (mut v, mut p) = (vcpu(), MockPlatform::default());
    run(&mut v, &mut p, dabt(true, 4, 31, false, false), DEV);
    assert_eq!(p.writes, vec![(DEV, vec![0, 0, 0, 0])]);
}

#[test]
fn reads_are_zero_or_sign_extended_and_sized_to_the_register() {
    let (mut v, mut p) = (vcpu(), MockPlatform::default());
    p.mmio_write(DEV, &[0x80, 0xff, 0xff, 0xff, 1, 2, 3, 4]);
    // LDRB w5: zero-extended.
    run(&mut v, &mut p, dabt(false, 1, 5, false, false), DEV);
    assert_eq!(v.x[5], 0x80);
    // LDRSB x5: sign-extended to 64 bits.
    run(&mut v, &mut p, dabt(false, 1, 5, true, true), DEV);
    assert_eq!(v.x[5], 0xffff_ffff_ffff_ff80);
    // LDRSH w5: sign-extended, then only 32 bits (a W register's upper half is zero).
    run(&mut v, &mut p, dabt(false, 2, 5, true, false), DEV);
    assert_eq!(v.x[5], 0xffff_ff80);
    // LDR x6: eight bytes.
    run(&mut v, &mut p, dabt(false, 8, 6, false, true), DEV);
    assert_eq!(v.x[6], 0x0403_0201_ffff_ff80);
    // LDR w7 from an address without a device: zero.
    v.x[7] = 0xdead;
    run(&mut v, &mut p, dabt(false, 4, 7, false, false), 0x0a00_5000);
    assert_eq!(v.x[7], 0);
    // A read into the zero register is done (the device may count it) and discarded.
    run(&mut v, &mut p, dabt(false, 4, 31, false, false), DEV);
    assert_eq!(v.pc, 0x4008_0000 + 24);
}

#[test]
fn an_access_without_a_syndrome_gets_an_abort_not_the_vmm() {
    let (mut v, mut p) = (vcpu(), MockPlatform::default());
    v.sys.insert(SysReg::VbarEl1, 0xffff_8000_1000_0000);
    // LDP to MMIO: a data abort with ISV clear.
    let esr = (0x24 << 26) | (1 << 25);
    assert_eq!(run(&mut v, &mut p, esr, DEV + 8), Outcome::Continue);
    assert!(p.writes.is_empty());
    assert_eq!(v.sys[&SysReg::ElrEl1], 0x4008_0000);
    assert_eq!(v.sys[&SysReg::SpsrEl1], 0x3c5);
    assert_eq!(v.sys[&SysReg::FarEl1], DEV + 8);
    assert_eq!(v.sys[&SysReg::EsrEl1] >> 26, 0x25, "from the current EL");
    assert_eq!(
        v.sys[&SysReg::EsrEl1] & 0x3f,
        0x10,
        "synchronous external abort"
    );
    assert_eq!(v.pc, 0xffff_8000_1000_0200, "current EL with SP_ELx vector");
    assert_eq!(v.cpsr & 0x3cf, 0x3c5);
    // From user space (EL0t, interrupts on): the lower-EL vector.
    let (mut v, mut p) = (vcpu(), MockPlatform::default());
    v.cpsr = 0x0;
    v.sys.insert(SysReg::VbarEl1, 0x1000);
    run(&mut v, &mut p, esr, 0x10);
    assert_eq!(v.pc, 0x1400);
    assert_eq!(v.sys[&SysReg::EsrEl1] >> 26, 0x24);
    assert_eq!(v.cpsr & 0x3cf, 0x3c5);
}

fn psci(v: &mut MockVcpu, p: &mut MockPlatform, args: [u64; 4]) -> (Outcome, u64) {
    v.x[..4].copy_from_slice(&args);
    let out = run(v, p, HVC, 0);
    (out, v.x[0])
}

#[test]
fn psci_version_features_and_unknown_functions() {
    let (mut v, mut p) = (vcpu(), MockPlatform::default());
    assert_eq!(
        psci(&mut v, &mut p, [psci::VERSION.into(), 0, 0, 0]),
        (Outcome::Continue, 0x1_0000)
    );
    assert_eq!(
        psci(
            &mut v,
            &mut p,
            [psci::FEATURES.into(), psci::CPU_ON_64.into(), 0, 0]
        )
        .1,
        0
    );
    assert_eq!(
        psci(
            &mut v,
            &mut p,
            [psci::FEATURES.into(), psci::CPU_SUSPEND.into(), 0, 0]
        )
        .1,
        u64::MAX,
        "NOT_SUPPORTED"
    );
    assert_eq!(
        psci(&mut v, &mut p, [0x8400_00ff, 0, 0, 0]),
        (Outcome::Continue, u64::MAX)
    );
    assert_eq!(
        psci(&mut v, &mut p, [psci::MIGRATE_INFO_TYPE.into(), 0, 0, 0]).1,
        2
    );
    // HVC returns after the instruction already: the PC does not move.
    assert_eq!(v.pc, 0x4008_0000);
}

#[test]
fn psci_cpu_on_affinity_info_and_cpu_off() {
    let (mut v, mut p) = (vcpu(), MockPlatform::default());
    p.powered[0] = true;
    assert_eq!(
        psci(&mut v, &mut p, [psci::AFFINITY_INFO_64.into(), 1, 0, 0]).1,
        1,
        "off"
    );
    assert_eq!(
        psci(&mut v, &mut p, [psci::CPU_ON_64.into(), 1, 0x4020_0000, 7]).1,
        0
    );
    assert_eq!(p.on, vec![(1, 0x4020_0000, 7)]);
    assert_eq!(
        psci(&mut v, &mut p, [psci::CPU_ON_64.into(), 1, 0x4020_0000, 7]).1,
        PsciReturn::AlreadyOn as i64 as u64
    );
    assert_eq!(
        psci(&mut v, &mut p, [psci::CPU_ON_64.into(), 9, 0, 0]).1,
        PsciReturn::InvalidParameters as i64 as u64
    );
    assert_eq!(
        psci(&mut v, &mut p, [psci::AFFINITY_INFO_64.into(), 1, 0, 0]).1,
        0,
        "on"
    );
    assert_eq!(
        psci(&mut v, &mut p, [psci::AFFINITY_INFO_64.into(), 1, 1, 0]).1,
        PsciReturn::InvalidParameters as i64 as u64,
        "only level 0"
    );
    // The 32-bit CPU_ON takes 32-bit arguments.
    assert_eq!(
        psci(
            &mut v,
            &mut p,
            [
                psci::CPU_ON.into(),
                0xffff_ffff_0000_0002,
                0xffff_ffff_4030_0000,
                0
            ]
        )
        .1,
        0
    );
    assert_eq!(p.on[1], (2, 0x4030_0000, 0));
    assert_eq!(
        psci(&mut v, &mut p, [psci::CPU_OFF.into(), 0, 0, 0]).0,
        Outcome::CpuOff
    );
}

#[test]
fn psci_power_off_and_reset_through_hvc_and_smc() {
    let (mut v, mut p) = (vcpu(), MockPlatform::default());
    assert_eq!(
        psci(&mut v, &mut p, [psci::SYSTEM_OFF.into(), 0, 0, 0]).0,
        Outcome::PowerOff
    );
    assert_eq!(
        psci(&mut v, &mut p, [psci::SYSTEM_RESET.into(), 0, 0, 0]).0,
        Outcome::Reset
    );
    // SMC's return address is the instruction itself: the handler moves past it.
    v.x[0] = psci::VERSION.into();
    assert_eq!(run(&mut v, &mut p, SMC, 0), Outcome::Continue);
    assert_eq!((v.x[0], v.pc), (0x1_0000, 0x4008_0004));
}

#[test]
fn wfi_wfe_and_trapped_system_registers() {
    let (mut v, mut p) = (vcpu(), MockPlatform::default());
    assert_eq!(run(&mut v, &mut p, WFI, 0), Outcome::WaitForInterrupt);
    assert_eq!(run(&mut v, &mut p, WFI | 1, 0), Outcome::Yield);
    assert_eq!(v.pc, 0x4008_0008);
    // MRS x9, <an unmodelled register>: reads as zero. MSR: ignored.
    v.x[9] = 0x55;
    let mrs = (0x18 << 26) | (3 << 20) | (9 << 5) | 1;
    assert_eq!(run(&mut v, &mut p, mrs, 0), Outcome::Continue);
    assert_eq!(v.x[9], 0);
    v.x[9] = 0x55;
    let msr = (0x18 << 26) | (3 << 20) | (9 << 5);
    run(&mut v, &mut p, msr, 0);
    assert_eq!(v.x[9], 0x55);
    assert_eq!(v.pc, 0x4008_0010);
}

#[test]
fn unknown_exception_classes_fail_the_vcpu_with_the_syndrome() {
    let (mut v, mut p) = (vcpu(), MockPlatform::default());
    let e = handle_exception(&mut v, &mut p, 0x3f << 26, 0).unwrap_err();
    assert!(
        e.to_string().contains("unhandled exception class 0x3f"),
        "{e}"
    );
}

#[test]
fn the_virtual_timer_stays_raised_until_the_guest_deals_with_it() {
    let mut t = Vtimer::default();
    // Nothing to do before it ever fired.
    assert_eq!(t.sync(CNTV_ENABLE), None);
    assert_eq!(
        t.activated(),
        VtimerChange {
            level: true,
            unmask: false
        }
    );
    // Still enabled, unmasked and firing: the line stays up, the timer masked.
    assert_eq!(t.sync(CNTV_ENABLE | CNTV_ISTATUS), None);
    // An interrupt pending across other exits changes nothing either.
    assert_eq!(t.sync(CNTV_ENABLE | CNTV_ISTATUS), None);
    // The guest re-armed it into the future (ISTATUS clear): lower and unmask, once.
    let lowered = Some(VtimerChange {
        level: false,
        unmask: true,
    });
    assert_eq!(t.sync(CNTV_ENABLE), lowered);
    assert_eq!(t.sync(CNTV_ENABLE), None);
    // Masking (IMASK) or disabling also counts as dealt with.
    t.activated();
    assert_eq!(t.sync(CNTV_ENABLE | CNTV_IMASK | CNTV_ISTATUS), lowered);
    t.activated();
    assert_eq!(t.sync(CNTV_ISTATUS), lowered);
}

#[test]
fn wfi_sleeps_until_the_timer_deadline_or_for_an_interrupt() {
    // 24 MHz counter, deadline 24000 ticks ahead: 1 ms.
    assert_eq!(
        wfi_timeout(CNTV_ENABLE, 1_024_000, 1_000_000, 24_000_000),
        Some(Duration::from_millis(1))
    );
    // Already due.
    assert_eq!(
        wfi_timeout(CNTV_ENABLE, 5, 10, 24_000_000),
        Some(Duration::ZERO)
    );
    // Disabled or masked: only an interrupt or a kick wakes the vCPU.
    assert_eq!(wfi_timeout(0, 1_024_000, 0, 24_000_000), None);
    assert_eq!(
        wfi_timeout(CNTV_ENABLE | CNTV_IMASK, 1, 0, 24_000_000),
        None
    );
    // A garbage frequency does not divide by zero; a far deadline does not overflow.
    assert_eq!(wfi_timeout(CNTV_ENABLE, 1, 0, 0), None);
    assert!(wfi_timeout(CNTV_ENABLE, u64::MAX, 0, 1).is_some());
}
