//! A GICv3 in user space for Hypervisor.framework before macOS 15, which has no interrupt
//! controller of its own: the distributor and the redistributors as MMIO, the CPU interface
//! as the `ICC_*_EL1` system registers the framework traps, and one IRQ line per vCPU that the
//! run loop hands to `hv_vcpu_set_pending_interrupt` before each run.
//!
//! What is modelled is what a Linux guest uses: one security state (GICD_CTLR.DS = 1, affinity
//! routing always on), group 1 interrupts delivered as IRQs, 32 priority levels, SGIs between
//! vCPUs, PPIs (the timers), SPIs routed by affinity, edge and level triggers. No LPIs or ITS.
//! Group 0 (FIQs) is accepted in the registers but never signalled. Anything else reads as zero
//! and ignores writes, as the architecture allows for reserved registers, so a guest that writes
//! garbage here only confuses itself.
//!
//! Plain Rust without the framework, tested on any host.

/// INTIDs below this are private to a vCPU (SGIs 0-15, PPIs 16-31).
const PRIVATE: u32 = 32;
/// "No interrupt pending" from an acknowledge or a highest-pending read.
pub const SPURIOUS: u32 = 1023;
/// Implemented priority bits: 5 (32 levels), as ICC_CTLR_EL1.PRIbits says.
const PRIO_MASK: u8 = 0xf8;
/// The idle running priority.
const IDLE: u8 = 0xff;
/// ARM as implementer, for GICD_IIDR/GICR_IIDR.
const IIDR: u32 = 0x43b;
/// PIDR2 with ArchRev = 3 (GICv3), which Linux checks before it trusts the block.
const PIDR2: u32 = 0x3b;

/// Frame sizes: the distributor's and each redistributor's two frames (RD and SGI).
pub const DIST_SIZE: u64 = 0x1_0000;
pub const REDIST_SIZE_PER_CPU: u64 = 0x2_0000;
const SGI_FRAME: u64 = 0x1_0000;

#[derive(Debug, Clone, Copy)]
struct Irq {
    enabled: bool,
    /// The software or edge latch (cleared on acknowledge).
    latched: bool,
    /// The input line's level (level-sensitive interrupts are pending while it is high).
    line: bool,
    active: bool,
    group1: bool,
    edge: bool,
    priority: u8,
    /// SPIs: GICD_IROUTER (Aff3.Aff2.Aff1.Aff0 and Interrupt_Routing_Mode).
    route: u64,
}

impl Irq {
    const fn new(edge: bool) -> Self {
        Irq {
            enabled: false,
            latched: false,
            line: false,
            active: false,
            group1: false,
            edge,
            priority: 0,
            route: 0,
        }
    }

    fn pending(&self) -> bool {
        self.latched || (!self.edge && self.line)
    }
}

/// One vCPU's CPU interface and private interrupts.
#[derive(Debug, Clone)]
struct Cpu {
    mpidr: u64,
    private: [Irq; PRIVATE as usize],
    pmr: u8,
    bpr1: u8,
    igrpen0: bool,
    igrpen1: bool,
    /// ICC_CTLR_EL1.EOImode: 1 splits priority drop (EOIR) from deactivation (DIR).
    eoi_split: bool,
    /// Priorities of acknowledged, not yet dropped interrupts, lowest (most urgent) last.
    active_prios: Vec<(u8, u32)>,
    waker_sleep: bool,
}

impl Cpu {
    fn new(mpidr: u64) -> Self {
        let mut private = [Irq::new(false); PRIVATE as usize];
        // SGIs are always edge-triggered.
        for irq in &mut private[..16] {
            irq.edge = true;
        }
        Cpu {
            mpidr,
            private,
            pmr: 0,
            bpr1: 0,
            igrpen0: false,
            igrpen1: false,
            eoi_split: false,
            active_prios: Vec::new(),
            waker_sleep: true,
        }
    }

    fn running(&self) -> u8 {
        self.active_prios.last().map_or(IDLE, |&(p, _)| p)
    }

    /// The part of a priority that decides preemption ([7:BPR1], as ICC_BPR1_EL1 says).
    fn group_prio(&self, p: u8) -> u8 {
        p & (0xffu8 << self.bpr1.min(7))
    }
}

/// The CPU interface's registers, by their (op0, op1, CRn, CRm, op2) encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IccReg {
    Pmr,
    Iar0,
    Eoir0,
    Hppir0,
    Bpr0,
    Ap0r(u8),
    Ap1r(u8),
    Dir,
    Rpr,
    Sgi1r,
    Asgi1r,
    Sgi0r,
    Iar1,
    Eoir1,
    Hppir1,
    Bpr1,
    Ctlr,
    Sre,
    Igrpen0,
    Igrpen1,
}

impl IccReg {
    /// The CPU-interface register a trapped MSR/MRS names, if it is one.
    pub fn decode(op0: u8, op1: u8, crn: u8, crm: u8, op2: u8) -> Option<Self> {
        use IccReg::*;
        if op0 != 3 || op1 != 0 {
            return None;
        }
        Some(match (crn, crm, op2) {
            (4, 6, 0) => Pmr,
            (12, 8, 0) => Iar0,
            (12, 8, 1) => Eoir0,
            (12, 8, 2) => Hppir0,
            (12, 8, 3) => Bpr0,
            (12, 8, n @ 4..=7) => Ap0r(n - 4),
            (12, 9, n @ 0..=3) => Ap1r(n),
            (12, 11, 1) => Dir,
            (12, 11, 3) => Rpr,
            (12, 11, 5) => Sgi1r,
            (12, 11, 6) => Asgi1r,
            (12, 11, 7) => Sgi0r,
            (12, 12, 0) => Iar1,
            (12, 12, 1) => Eoir1,
            (12, 12, 2) => Hppir1,
            (12, 12, 3) => Bpr1,
            (12, 12, 4) => Ctlr,
            (12, 12, 5) => Sre,
            (12, 12, 6) => Igrpen0,
            (12, 12, 7) => Igrpen1,
            _ => return None,
        })
    }
}

/// vCPUs whose IRQ line may have changed and that must be kicked out of a run or a WFI
/// (bit `i` for vCPU `i`; a spurious kick costs one exit).
pub type Kick = u64;

/// The whole interrupt controller of one VM.
#[derive(Debug, Clone)]
pub struct Gic {
    ctlr_grp0: bool,
    ctlr_grp1: bool,
    spis: Vec<Irq>,
    cpus: Vec<Cpu>,
}

/// Highest-priority pending interrupt of a vCPU: (priority, INTID, group 1).
type Hppi = (u8, u32, bool);

impl Gic {
    /// A GIC for vCPUs with the given MPIDRs (at most 64) and `spis` shared interrupts
    /// (rounded up to a multiple of 32, at most 988).
    pub fn new(mpidrs: &[u64], spis: u32) -> Self {
        let spis = spis.div_ceil(32).clamp(1, 30) * 32;
        Gic {
            ctlr_grp0: false,
            ctlr_grp1: false,
            spis: vec![Irq::new(false); spis as usize],
            cpus: mpidrs
                .iter()
                .take(64)
                .map(|&m| Cpu::new(m & 0xff_00ff_ffff))
                .collect(),
        }
    }

    fn nr_irqs(&self) -> u32 {
        PRIVATE + self.spis.len() as u32
    }

    fn irq(&self, cpu: usize, intid: u32) -> Option<&Irq> {
        if intid < PRIVATE {
            self.cpus.get(cpu).map(|c| &c.private[intid as usize])
        } else {
            self.spis.get((intid - PRIVATE) as usize)
        }
    }

    fn irq_mut(&mut self, cpu: usize, intid: u32) -> Option<&mut Irq> {
        if intid < PRIVATE {
            self.cpus
                .get_mut(cpu)
                .map(|c| &mut c.private[intid as usize])
        } else {
            self.spis.get_mut((intid - PRIVATE) as usize)
        }
    }

    /// The vCPU an SPI goes to: its IROUTER affinity, or vCPU 0 for "any" and for an
    /// affinity no vCPU has.
    fn spi_target(&self, irq: &Irq) -> usize {
        if irq.route & (1 << 31) != 0 {
            return 0;
        }
        let aff = irq.route & 0xff_00ff_ffff;
        self.cpus.iter().position(|c| c.mpidr == aff).unwrap_or(0)
    }

    fn hppi(&self, cpu: usize) -> Option<Hppi> {
        let c = self.cpus.get(cpu)?;
        let candidates = c
            .private
            .iter()
            .enumerate()
            .map(|(i, irq)| (i as u32, irq))
            .chain(
                self.spis
                    .iter()
                    .enumerate()
                    .filter(|(_, irq)| self.spi_target(irq) == cpu)
                    .map(|(i, irq)| (i as u32 + PRIVATE, irq)),
            );
        let mut best: Option<Hppi> = None;
        for (intid, irq) in candidates {
            let group_on = if irq.group1 {
                self.ctlr_grp1 && c.igrpen1
            } else {
                self.ctlr_grp0 && c.igrpen0
            };
            if !irq.enabled || !irq.pending() || irq.active || !group_on {
                continue;
            }
            if best.is_none_or(|(p, _, _)| irq.priority < p) {
                best = Some((irq.priority, intid, irq.group1));
            }
        }
        best
    }

    /// Whether the HPPI may interrupt what `cpu` runs now (above the mask and preempting).
    fn deliverable(&self, cpu: usize) -> Option<Hppi> {
        let c = self.cpus.get(cpu)?;
        let h = self.hppi(cpu)?;
        (h.0 < c.pmr && c.group_prio(h.0) < c.group_prio(c.running())).then_some(h)
    }

    /// The level of vCPU `cpu`'s IRQ input: a group 1 interrupt is ready for it.
    pub fn irq_line(&self, cpu: usize) -> bool {
        matches!(self.deliverable(cpu), Some((_, _, true)))
    }

    fn all(&self) -> Kick {
        if self.cpus.len() >= 64 {
            u64::MAX
        } else {
            (1u64 << self.cpus.len()) - 1
        }
    }

    fn kick_for(&self, cpu: usize, intid: u32) -> Kick {
        if intid < PRIVATE {
            1u64.checked_shl(cpu as u32).unwrap_or(0)
        } else {
            self.irq(cpu, intid)
                .map_or(0, |irq| 1u64 << self.spi_target(irq))
        }
    }

    /// A device's interrupt line (an SPI, INTID 32 and up): level-sensitive SPIs follow it,
    /// edge-triggered ones latch on the rising edge. Unknown INTIDs are ignored.
    pub fn set_spi(&mut self, intid: u32, level: bool) -> Kick {
        if intid < PRIVATE {
            return 0;
        }
        self.set_line(0, intid, level)
    }

    /// A private peripheral interrupt of one vCPU (PPI 16-31: the timers).
    pub fn set_ppi(&mut self, cpu: usize, intid: u32, level: bool) -> Kick {
        if !(16..PRIVATE).contains(&intid) {
            return 0;
        }
        self.set_line(cpu, intid, level)
    }

    fn set_line(&mut self, cpu: usize, intid: u32, level: bool) -> Kick {
        let Some(irq) = self.irq_mut(cpu, intid) else {
            return 0;
        };
        if irq.edge && level && !irq.line {
            irq.latched = true;
        }
        irq.line = level;
        self.kick_for(cpu, intid)
    }

    // ---- CPU interface ----

    /// A trapped MRS of a CPU-interface register by vCPU `cpu`.
    pub fn icc_read(&mut self, cpu: usize, reg: IccReg) -> u64 {
        let Some(c) = self.cpus.get(cpu) else {
            return match reg {
                IccReg::Iar0 | IccReg::Iar1 | IccReg::Hppir0 | IccReg::Hppir1 => {
                    u64::from(SPURIOUS)
                }
                _ => 0,
            };
        };
        match reg {
            IccReg::Pmr => u64::from(c.pmr),
            IccReg::Bpr1 => u64::from(c.bpr1),
            // EOImode, PRIbits = 4 (5 bits), IDbits = 0 (16-bit INTIDs).
            IccReg::Ctlr => (u64::from(c.eoi_split) << 1) | (4 << 8),
            // System-register access only, IRQ and FIQ bypass disabled.
            IccReg::Sre => 0x7,
            IccReg::Igrpen0 => u64::from(c.igrpen0),
            IccReg::Igrpen1 => u64::from(c.igrpen1),
            IccReg::Rpr => u64::from(c.running()),
            IccReg::Ap1r(0) => c
                .active_prios
                .iter()
                .fold(0u64, |bits, &(p, _)| bits | 1 << (p >> 3)),
            IccReg::Hppir1 => match self.hppi(cpu) {
                Some((_, intid, true)) => u64::from(intid),
                _ => u64::from(SPURIOUS),
            },
            IccReg::Iar1 => u64::from(self.acknowledge(cpu)),
            IccReg::Iar0 | IccReg::Hppir0 => u64::from(SPURIOUS),
            _ => 0,
        }
    }

    /// A trapped MSR to a CPU-interface register by vCPU `cpu`; returns the vCPUs to kick.
    pub fn icc_write(&mut self, cpu: usize, reg: IccReg, v: u64) -> Kick {
        let me = 1u64.checked_shl(cpu as u32).unwrap_or(0);
        let Some(c) = self.cpus.get_mut(cpu) else {
            return 0;
        };
        match reg {
            IccReg::Pmr => c.pmr = v as u8 & PRIO_MASK,
            // The smallest group-1 binary point with 5 priority bits is 2.
            IccReg::Bpr1 => c.bpr1 = (v as u8 & 7).max(2),
            IccReg::Ctlr => c.eoi_split = v & 2 != 0,
            IccReg::Igrpen0 => c.igrpen0 = v & 1 != 0,
            IccReg::Igrpen1 => c.igrpen1 = v & 1 != 0,
            // Clearing the active priorities (what Linux does when a CPU comes up) forgets
            // every acknowledged interrupt's priority; other values change nothing.
            IccReg::Ap1r(_) | IccReg::Ap0r(_) if v == 0 => c.active_prios.clear(),
            IccReg::Eoir1 => self.end_of_interrupt(cpu, v as u32 & 0xff_ffff),
            IccReg::Dir => self.deactivate(cpu, v as u32 & 0xff_ffff),
            IccReg::Sgi1r | IccReg::Asgi1r => return self.send_sgi(cpu, v),
            _ => {}
        }
        me
    }

    fn acknowledge(&mut self, cpu: usize) -> u32 {
        let Some((prio, intid, true)) = self.deliverable(cpu) else {
            return SPURIOUS;
        };
        if let Some(irq) = self.irq_mut(cpu, intid) {
            irq.latched = false;
            irq.active = true;
        }
        self.cpus[cpu].active_prios.push((prio, intid));
        intid
    }

    fn end_of_interrupt(&mut self, cpu: usize, intid: u32) {
        let c = &mut self.cpus[cpu];
        // The priority dropped is the running one; an EOI for an interrupt that is not the
        // most recent acknowledged one is the guest's mistake and changes nothing.
        if c.active_prios.last().map(|&(_, i)| i) != Some(intid) {
            return;
        }
        c.active_prios.pop();
        if !c.eoi_split {
            self.deactivate(cpu, intid);
        }
    }

    fn deactivate(&mut self, cpu: usize, intid: u32) {
        if let Some(irq) = self.irq_mut(cpu, intid) {
            irq.active = false;
        }
    }

    /// ICC_SGI1R_EL1: INTID [27:24], targets by Aff3.Aff2.Aff1 + a 16-bit list in the range
    /// selector's Aff0 block, or every other vCPU (IRM).
    fn send_sgi(&mut self, from: usize, v: u64) -> Kick {
        let intid = ((v >> 24) & 0xf) as usize;
        let all_others = v & (1 << 40) != 0;
        let list = v & 0xffff;
        let aff1 = (v >> 16) & 0xff;
        let aff2 = (v >> 32) & 0xff;
        let aff3 = (v >> 48) & 0xff;
        let rs = (v >> 44) & 0xf;
        let mut kick = 0;
        for (i, c) in self.cpus.iter_mut().enumerate() {
            let m = c.mpidr;
            let hit = if all_others {
                i != from
            } else {
                let aff0 = m & 0xff;
                (m >> 8) & 0xff == aff1
                    && (m >> 16) & 0xff == aff2
                    && (m >> 32) & 0xff == aff3
                    && aff0 >> 4 == rs
                    && list & (1 << (aff0 & 0xf)) != 0
            };
            if hit {
                c.private[intid].latched = true;
                kick |= 1 << i;
            }
        }
        kick
    }

    // ---- distributor ----

    /// A read of `data.len()` bytes at `offset` in the distributor frame.
    pub fn dist_read(&self, offset: u64, data: &mut [u8]) {
        let v = match offset & !3 {
            0x0000 => u32::from(self.ctlr_grp0) | u32::from(self.ctlr_grp1) << 1 | 1 << 4 | 1 << 6,
            // ITLinesNumber, IDbits = 9 (10-bit INTIDs).
            0x0004 => (self.nr_irqs() / 32 - 1) | (9 << 19),
            0x0008 => IIDR,
            0xffe8 => PIDR2,
            0x6000..=0x7fff => {
                return fill(data, offset, self.router(offset));
            }
            o => self.bank_read(None, o).unwrap_or(0),
        };
        fill(data, offset, u64::from(v));
    }

    /// A write at `offset` in the distributor frame.
    pub fn dist_write(&mut self, offset: u64, data: &[u8]) -> Kick {
        match offset & !3 {
            0x0000 => {
                let v = word(data, offset);
                self.ctlr_grp0 = v & 1 != 0;
                self.ctlr_grp1 = v & 2 != 0;
            }
            0x6000..=0x7fff => self.set_router(offset, data),
            o => self.bank_write(None, o, offset, data),
        }
        self.all()
    }

    fn router(&self, offset: u64) -> u64 {
        let n = ((offset - 0x6000) / 8) as u32;
        let v = if n >= PRIVATE {
            self.irq(0, n).map_or(0, |i| i.route)
        } else {
            0
        };
        v >> ((offset & 4) * 8)
    }

    fn set_router(&mut self, offset: u64, data: &[u8]) {
        let n = ((offset - 0x6000) / 8) as u32;
        if n < PRIVATE {
            return;
        }
        let Some(irq) = self.irq_mut(0, n) else {
            return;
        };
        let mut bytes = irq.route.to_le_bytes();
        let at = (offset & 7) as usize;
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(at + i) {
                *slot = *b;
            }
        }
        // Aff3 [39:32], Interrupt_Routing_Mode [31], Aff2.Aff1.Aff0 [23:0].
        irq.route = u64::from_le_bytes(bytes) & 0xff_80ff_ffff;
    }

    // ---- redistributors ----

    /// A read in the redistributor region (`offset` from its base).
    pub fn redist_read(&self, offset: u64, data: &mut [u8]) {
        let cpu = (offset / REDIST_SIZE_PER_CPU) as usize;
        let off = offset % REDIST_SIZE_PER_CPU;
        let Some(c) = self.cpus.get(cpu) else {
            return fill(data, offset, 0);
        };
        let v: u64 = match off & !3 {
            0x0004 => u64::from(IIDR),
            // GICR_TYPER: affinity, processor number, Last.
            0x0008 | 0x000c => {
                let last = u64::from(cpu + 1 == self.cpus.len()) << 4;
                let m = c.mpidr;
                let aff = (m & 0xff_ffff) | ((m >> 8) & 0xff00_0000);
                let typer = (aff << 32) | ((cpu as u64) << 8) | last;
                return fill(data, off, typer >> ((off & 4) * 8));
            }
            0x0014 => (u64::from(c.waker_sleep) << 1) | (u64::from(c.waker_sleep) << 2),
            0xffe8 => u64::from(PIDR2),
            o if o >= SGI_FRAME => u64::from(self.bank_read(Some(cpu), o - SGI_FRAME).unwrap_or(0)),
            _ => 0,
        };
        fill(data, off, v);
    }

    /// A write in the redistributor region.
    pub fn redist_write(&mut self, offset: u64, data: &[u8]) -> Kick {
        let cpu = (offset / REDIST_SIZE_PER_CPU) as usize;
        let off = offset % REDIST_SIZE_PER_CPU;
        if cpu >= self.cpus.len() {
            return 0;
        }
        match off & !3 {
            0x0014 => self.cpus[cpu].waker_sleep = word(data, off) & 2 != 0,
            o if o >= SGI_FRAME => self.bank_write(Some(cpu), o - SGI_FRAME, off, data),
            _ => {}
        }
        1 << cpu
    }

    /// The registers the distributor (for SPIs) and each SGI frame (for INTIDs 0-31) share.
    /// `cpu` is None for the distributor. `o` is 4-byte aligned.
    fn bank_read(&self, cpu: Option<usize>, o: u64) -> Option<u32> {
        let c = cpu.unwrap_or(0);
        let bits = |base: u64, f: &dyn Fn(&Irq) -> bool| -> Option<u32> {
            let first = ((o - base) * 8) as u32;
            self.bank_ok(cpu, first, 32).then(|| {
                (0..32).fold(0u32, |acc, i| {
                    acc | (u32::from(self.irq(c, first + i).is_some_and(f)) << i)
                })
            })
        };
        match o {
            0x0080..=0x00ff => bits(0x0080, &|i| i.group1),
            0x0100..=0x017f => bits(0x0100, &|i| i.enabled),
            0x0180..=0x01ff => bits(0x0180, &|i| i.enabled),
            0x0200..=0x027f => bits(0x0200, &|i| i.pending()),
            0x0280..=0x02ff => bits(0x0280, &|i| i.pending()),
            0x0300..=0x037f => bits(0x0300, &|i| i.active),
            0x0380..=0x03ff => bits(0x0380, &|i| i.active),
            0x0400..=0x07fb => {
                let first = (o - 0x0400) as u32;
                self.bank_ok(cpu, first, 4).then(|| {
                    (0..4).fold(0u32, |acc, i| {
                        acc | u32::from(self.irq(c, first + i).map_or(0, |q| q.priority)) << (8 * i)
                    })
                })
            }
            0x0c00..=0x0cff => {
                let first = ((o - 0x0c00) * 4) as u32;
                self.bank_ok(cpu, first, 16).then(|| {
                    (0..16).fold(0u32, |acc, i| {
                        let edge = self.irq(c, first + i).is_some_and(|q| q.edge);
                        acc | u32::from(edge) << (2 * i + 1)
                    })
                })
            }
            _ => None,
        }
    }

    /// Whether INTIDs `first..first + n` belong to this bank: the private ones to an SGI frame,
    /// the shared ones to the distributor (its registers for 0-31 are RAZ/WI with affinity
    /// routing).
    fn bank_ok(&self, cpu: Option<usize>, first: u32, n: u32) -> bool {
        match cpu {
            Some(_) => first + n <= PRIVATE,
            None => first >= PRIVATE && first < self.nr_irqs(),
        }
    }

    fn bank_write(&mut self, cpu: Option<usize>, o: u64, offset: u64, data: &[u8]) {
        let c = cpu.unwrap_or(0);
        let v = word(data, offset);
        let mut set_bits = |base: u64, f: &dyn Fn(&mut Irq, bool)| {
            let first = ((o - base) * 8) as u32;
            if !self.bank_ok(cpu, first, 32) {
                return;
            }
            for i in 0..32 {
                if let Some(irq) = self.irq_mut(c, first + i) {
                    f(irq, v & (1 << i) != 0);
                }
            }
        };
        match o {
            0x0080..=0x00ff => set_bits(0x0080, &|i, b| i.group1 = b),
            0x0100..=0x017f => set_bits(0x0100, &|i, b| i.enabled |= b),
            0x0180..=0x01ff => set_bits(0x0180, &|i, b| i.enabled &= !b),
            0x0200..=0x027f => set_bits(0x0200, &|i, b| i.latched |= b),
            0x0280..=0x02ff => set_bits(0x0280, &|i, b| i.latched &= !b),
            0x0300..=0x037f => set_bits(0x0300, &|i, b| i.active |= b),
            0x0380..=0x03ff => set_bits(0x0380, &|i, b| i.active &= !b),
            0x0400..=0x07fb => {
                // Byte accesses are allowed here: each byte is one INTID's priority.
                let base = (o - 0x0400) as u32;
                if !self.bank_ok(cpu, base, 4) {
                    return;
                }
                let at = (offset & 3) as usize;
                for (i, b) in data.iter().enumerate().take(4 - at) {
                    if let Some(irq) = self.irq_mut(c, base + (at + i) as u32) {
                        irq.priority = b & PRIO_MASK;
                    }
                }
            }
            0x0c00..=0x0cff => {
                let first = ((o - 0x0c00) * 4) as u32;
                // SGIs stay edge-triggered; everything else follows bit 1 of its field.
                if !self.bank_ok(cpu, first, 16) || first < 16 {
                    return;
                }
                for i in 0..16 {
                    if let Some(irq) = self.irq_mut(c, first + i) {
                        irq.edge = v & (2 << (2 * i)) != 0;
                    }
                }
            }
            _ => {}
        }
    }
}

/// The little-endian word a write of 1-8 bytes at `offset` puts in its 4-byte register.
fn word(data: &[u8], offset: u64) -> u32 {
    let mut b = [0u8; 4];
    let at = (offset & 3) as usize;
    for (i, v) in data.iter().enumerate().take(4usize.saturating_sub(at)) {
        b[at + i] = *v;
    }
    u32::from_le_bytes(b)
}

/// Fills a read of `data.len()` bytes at `offset` from the register value `v` (aligned at 4).
fn fill(data: &mut [u8], offset: u64, v: u64) {
    let bytes = v.to_le_bytes();
    let at = (offset & 3) as usize;
    for (i, d) in data.iter_mut().enumerate() {
        *d = bytes.get(at + i).copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests;
