//! The vCPU loop against a scripted vCPU: each run returns the next exit of a script, after
//! applying what the guest did in the meantime; the GIC, the timer and kicks are real.

use std::collections::VecDeque;

use super::*;
use crate::gic::{REDIST_SIZE_PER_CPU, SPURIOUS};
use crate::mock::MockRegs;

const REGION: GicRegion = GicRegion {
    dist: 0x0800_0000,
    redist: 0x080a_0000,
    redist_len: 2 * REDIST_SIZE_PER_CPU,
};
const UART: u64 = 0x0900_0000;
/// The UART's SPI in this machine.
const UART_SPI: u32 = 33;

type GuestAction = Box<dyn FnOnce(&mut MockRegs)>;

struct ScriptVcpu {
    regs: MockRegs,
    script: VecDeque<(GuestAction, RawExit)>,
    /// The IRQ input given to each run.
    lines: Vec<bool>,
    vtimer_masked: bool,
    count: u64,
}

impl ScriptVcpu {
    fn new() -> Self {
        ScriptVcpu {
            regs: MockRegs::at(0x4008_0000),
            script: VecDeque::new(),
            lines: Vec::new(),
            vtimer_masked: false,
            count: 0,
        }
    }

    fn then(&mut self, guest: impl FnOnce(&mut MockRegs) + 'static, exit: RawExit) {
        self.script.push_back((Box::new(guest), exit));
    }
}

impl VcpuRegs for ScriptVcpu {
    fn x(&self, n: u8) -> Result<u64, RegError> {
        self.regs.x(n)
    }
    fn set_x(&mut self, n: u8, v: u64) -> Result<(), RegError> {
        self.regs.set_x(n, v)
    }
    fn pc(&self) -> Result<u64, RegError> {
        self.regs.pc()
    }
    fn set_pc(&mut self, v: u64) -> Result<(), RegError> {
        self.regs.set_pc(v)
    }
    fn cpsr(&self) -> Result<u64, RegError> {
        self.regs.cpsr()
    }
    fn set_cpsr(&mut self, v: u64) -> Result<(), RegError> {
        self.regs.set_cpsr(v)
    }
    fn sys(&self, r: SysReg) -> Result<u64, RegError> {
        self.regs.sys(r)
    }
    fn set_sys(&mut self, r: SysReg, v: u64) -> Result<(), RegError> {
        self.regs.set_sys(r, v)
    }
}

impl RunVcpu for ScriptVcpu {
    fn run(&mut self) -> Result<RawExit, RegError> {
        let (guest, exit) = self
            .script
            .pop_front()
            .ok_or_else(|| RegError("script over".into()))?;
        guest(&mut self.regs);
        if exit == RawExit::VtimerActivated {
            self.vtimer_masked = true;
        }
        Ok(exit)
    }
    fn set_irq_line(&mut self, level: bool) -> Result<(), RegError> {
        self.lines.push(level);
        Ok(())
    }
    fn set_vtimer_mask(&mut self, masked: bool) -> Result<(), RegError> {
        self.vtimer_masked = masked;
        Ok(())
    }
    fn virtual_count(&self) -> Result<(u64, u64), RegError> {
        Ok((self.count, 24_000_000))
    }
}

/// A UART whose writes raise its interrupt (as a transmitter-empty interrupt would).
#[derive(Default)]
struct Board {
    gic: Option<&'static Mutex<Gic>>,
    out: Vec<u8>,
    kicks: Vec<Kick>,
}

impl Platform for Board {
    fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        if addr == UART {
            self.out.extend_from_slice(data);
            if let Some(g) = self.gic {
                let kick = g.lock().unwrap().set_spi(UART_SPI, true);
                self.kick(kick);
            }
        }
    }
    fn cpu_on(&mut self, _mpidr: u64, _entry: u64, _context: u64) -> PsciReturn {
        PsciReturn::Success
    }
    fn affinity_info(&mut self, _mpidr: u64) -> Result<AffinityState, PsciReturn> {
        Ok(AffinityState::On)
    }
}

impl Machine for Board {
    fn kick(&mut self, cpus: Kick) {
        self.kicks.push(cpus);
    }
}

/// ESR of a trapped MRS (read) or MSR of (op0, op1, CRn, CRm, op2) with register `rt`.
fn sysreg(read: bool, enc: (u64, u64, u64, u64, u64), rt: u64) -> RawExit {
    let (op0, op1, crn, crm, op2) = enc;
    RawExit::Exception {
        esr: (0x18 << 26)
            | (1 << 25)
            | (op0 << 20)
            | (op2 << 17)
            | (op1 << 14)
            | (crn << 10)
            | (rt << 5)
            | (crm << 1)
            | u64::from(read),
        far: 0,
        ipa: 0,
    }
}

const IAR1: (u64, u64, u64, u64, u64) = (3, 0, 12, 12, 0);
const EOIR1: (u64, u64, u64, u64, u64) = (3, 0, 12, 12, 1);
const PMR: (u64, u64, u64, u64, u64) = (3, 0, 4, 6, 0);
const IGRPEN1: (u64, u64, u64, u64, u64) = (3, 0, 12, 12, 7);
const SGI1R: (u64, u64, u64, u64, u64) = (3, 0, 12, 11, 5);

/// A 32-bit store of w1 (data abort, valid syndrome) to `ipa`.
fn store_w1(ipa: u64) -> RawExit {
    RawExit::Exception {
        esr: (0x24 << 26) | (1 << 25) | (1 << 24) | (2 << 22) | (1 << 16) | (1 << 6),
        far: ipa,
        ipa,
    }
}

fn leak_gic() -> &'static Mutex<Gic> {
    Box::leak(Box::new(Mutex::new(Gic::new(&[0, 1], 64))))
}

/// The guest's GIC set-up through the loop itself: group 1 and priority through the
/// distributor, and the CPU interface through trapped system registers.
fn boot(lp: &mut VcpuLoop, v: &mut ScriptVcpu, b: &mut Board, enable: &[u32]) {
    let w1 = |val: u64| move |r: &mut MockRegs| r.x[1] = val;
    v.then(w1(0x13), store_w1(REGION.dist));
    v.then(w1(!0), store_w1(REGION.dist + 0x84));
    v.then(w1(!0), store_w1(REGION.redist + 0x1_0080));
    for &intid in enable {
        let (base, off) = if intid < 32 {
            (REGION.redist + 0x1_0000, 0)
        } else {
            (REGION.dist, u64::from(intid / 32) * 4)
        };
        let bit = 1u64 << (intid % 32);
        v.then(w1(bit), store_w1(base + 0x100 + off));
        v.then(
            w1(0xa0a0_a0a0),
            store_w1(base + 0x400 + u64::from(intid & !3)),
        );
    }
    v.then(w1(0xf0), sysreg(false, PMR, 1));
    v.then(w1(1), sysreg(false, IGRPEN1, 1));
    while !v.script.is_empty() {
        assert_eq!(lp.step(v, b).unwrap(), Outcome::Continue);
    }
}

#[test]
fn the_timer_interrupt_is_raised_acknowledged_and_the_timer_unmasked() {
    let gic = leak_gic();
    let mut lp = VcpuLoop::new(0, gic, REGION);
    let mut v = ScriptVcpu::new();
    let mut b = Board::default();
    boot(&mut lp, &mut v, &mut b, &[VTIMER_INTID]);
    v.lines.clear();
    // The guest armed the timer; it fires and the framework masks it.
    v.then(
        |r| {
            r.sys.insert(SysReg::CntvCtlEl0, 1 | 4);
        },
        RawExit::VtimerActivated,
    );
    // Next run: the IRQ is taken; the handler acknowledges it (MRS x0, ICC_IAR1_EL1).
    v.then(|_| {}, sysreg(true, IAR1, 0));
    // It masks the timer, then ends the interrupt (MSR ICC_EOIR1_EL1, x0).
    v.then(
        |r| {
            r.sys.insert(SysReg::CntvCtlEl0, 1 | 2 | 4);
        },
        sysreg(false, EOIR1, 0),
    );
    // Back in the kernel: a run with nothing to report.
    v.then(|_| {}, RawExit::Canceled);
    for _ in 0..4 {
        assert_eq!(lp.step(&mut v, &mut b).unwrap(), Outcome::Continue);
    }
    assert_eq!(v.regs.x[0], u64::from(VTIMER_INTID));
    assert_eq!(v.lines, [false, true, false, false]);
    assert!(!v.vtimer_masked, "unmasked once the guest masked its timer");
    assert_eq!(gic.lock().unwrap().icc_read(0, IccReg::Rpr), 0xff);
}

#[test]
fn an_interrupt_raised_during_an_exit_is_pending_at_the_next_run() {
    let gic = leak_gic();
    let mut lp = VcpuLoop::new(0, gic, REGION);
    let mut v = ScriptVcpu::new();
    let mut b = Board {
        gic: Some(gic),
        ..Default::default()
    };
    boot(&mut lp, &mut v, &mut b, &[UART_SPI]);
    v.lines.clear();
    // The guest writes a byte to the UART; the device raises its line while handling it.
    v.then(|r| r.x[1] = u64::from(b'A'), store_w1(UART));
    v.then(|_| {}, sysreg(true, IAR1, 3));
    v.then(|_| {}, RawExit::Canceled);
    for _ in 0..3 {
        lp.step(&mut v, &mut b).unwrap();
    }
    assert_eq!(b.out, b"A\0\0\0");
    assert_eq!(
        v.lines,
        [false, true, false],
        "the line rises at the next run"
    );
    assert_eq!(v.regs.x[3], u64::from(UART_SPI));
    assert_eq!(v.regs.pc, 0x4008_0000 + 4 * (boot_exits(1) + 2) as u64);
}

/// The exits `boot` makes with `enabled` interrupts (each advances the PC by 4).
fn boot_exits(enabled: usize) -> usize {
    5 + 2 * enabled
}

#[test]
fn an_sgi_kicks_the_other_vcpu_and_garbage_sysregs_read_zero() {
    let gic = leak_gic();
    let mut lp = VcpuLoop::new(0, gic, REGION);
    let mut v = ScriptVcpu::new();
    let mut b = Board::default();
    boot(&mut lp, &mut v, &mut b, &[1]);
    b.kicks.clear();
    // vCPU 0 sends SGI 1 to vCPU 1 (Aff0 = 1).
    v.then(|r| r.x[2] = 1 << 24 | 0b10, sysreg(false, SGI1R, 2));
    // An implementation-defined register nobody emulates.
    v.then(|r| r.x[4] = 99, sysreg(true, (3, 7, 15, 2, 0), 4));
    for _ in 0..2 {
        lp.step(&mut v, &mut b).unwrap();
    }
    assert_eq!(b.kicks, [0b10], "only the target is kicked");
    assert_eq!(v.regs.x[4], 0);
    // vCPU 1 has not enabled its CPU interface: nothing is delivered to it yet, and vCPU 0
    // has nothing of its own.
    let mut g = gic.lock().unwrap();
    assert!(!g.irq_line(1));
    assert_eq!(g.icc_read(0, IccReg::Iar1), u64::from(SPURIOUS));
}

#[test]
fn wfi_sleeps_to_the_timer_deadline_unless_an_interrupt_waits() {
    let gic = leak_gic();
    let mut lp = VcpuLoop::new(0, gic, REGION);
    let mut v = ScriptVcpu::new();
    let mut b = Board::default();
    boot(&mut lp, &mut v, &mut b, &[UART_SPI]);
    v.regs.sys.insert(SysReg::CntvCtlEl0, 1);
    v.regs.sys.insert(SysReg::CntvCvalEl0, 24_000_000 + 24_000);
    v.count = 24_000_000;
    assert_eq!(lp.wfi_sleep(&v).unwrap(), Some(Duration::from_millis(1)));
    gic.lock().unwrap().set_spi(UART_SPI, true);
    assert_eq!(lp.wfi_sleep(&v).unwrap(), Some(Duration::ZERO));
}

#[test]
fn an_undocumented_exit_fails_the_vcpu() {
    let gic = leak_gic();
    let mut lp = VcpuLoop::new(0, gic, REGION);
    let mut v = ScriptVcpu::new();
    v.then(|_| {}, RawExit::Unknown(7));
    let err = lp.step(&mut v, &mut Board::default()).unwrap_err();
    assert_eq!(err, RunError::Unknown(7));
    assert!(err.to_string().contains("(7)"));
}
