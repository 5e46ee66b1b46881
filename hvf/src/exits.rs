//! What a Hypervisor.framework vCPU does with an exception exit: MMIO (data aborts with a valid
//! syndrome, sized and sign-extended into the register), PSCI through HVC or SMC, WFI/WFE,
//! trapped system registers (RAZ/WI), and an abort injected into the guest for accesses that
//! cannot be emulated. HVF reports these as raw syndromes and leaves the rest to the VMM (KVM
//! does all of it in the kernel). Plain Rust over two small traits, so the whole state machine
//! is tested on any host against a mock vCPU that replays exit sequences.

use thiserror::Error;

use crate::esr::{self, Exit, MmioAccess};

/// System registers the exit handling reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SysReg {
    ElrEl1,
    SpsrEl1,
    EsrEl1,
    FarEl1,
    VbarEl1,
    CntvCtlEl0,
    CntvCvalEl0,
}

/// A register access the framework refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("vCPU register access failed: {0}")]
pub struct RegError(pub String);

/// The vCPU's registers (the framework's get/set calls; a mock in tests).
pub trait VcpuRegs {
    /// General-purpose register `n` (0..=30).
    fn x(&self, n: u8) -> Result<u64, RegError>;
    fn set_x(&mut self, n: u8, v: u64) -> Result<(), RegError>;
    fn pc(&self) -> Result<u64, RegError>;
    fn set_pc(&mut self, v: u64) -> Result<(), RegError>;
    fn cpsr(&self) -> Result<u64, RegError>;
    fn set_cpsr(&mut self, v: u64) -> Result<(), RegError>;
    fn sys(&self, r: SysReg) -> Result<u64, RegError>;
    fn set_sys(&mut self, r: SysReg, v: u64) -> Result<(), RegError>;
}

/// What the rest of the machine offers a vCPU's exits: the MMIO bus and the other vCPUs.
pub trait Platform {
    /// Guest read at `addr`; fill `data` (zeroed: an address without a device reads 0).
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]);
    /// Guest write at `addr` (ignored where there is no device).
    fn mmio_write(&mut self, addr: u64, data: &[u8]);
    /// PSCI CPU_ON: start the vCPU with affinity `mpidr` at `entry` with x0 = `context`.
    fn cpu_on(&mut self, mpidr: u64, entry: u64, context: u64) -> PsciReturn;
    /// PSCI AFFINITY_INFO for the vCPU with affinity `mpidr` (an error for no such vCPU).
    fn affinity_info(&mut self, mpidr: u64) -> Result<AffinityState, PsciReturn>;
    /// A trapped MRS the platform emulates (the GIC's CPU interface); None reads as zero.
    fn sysreg_read(&mut self, _id: SysRegId) -> Option<u64> {
        None
    }
    /// A trapped MSR; ignored unless the platform emulates the register.
    fn sysreg_write(&mut self, _id: SysRegId, _value: u64) {}
}

/// A system register as a trapped MSR/MRS names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysRegId {
    pub op0: u8,
    pub op1: u8,
    pub crn: u8,
    pub crm: u8,
    pub op2: u8,
}

/// PSCI return values (DEN0022, 5.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i64)]
pub enum PsciReturn {
    Success = 0,
    NotSupported = -1,
    InvalidParameters = -2,
    AlreadyOn = -4,
    OnPending = -5,
}

impl PsciReturn {
    fn value(self) -> u64 {
        self as i64 as u64
    }
}

/// AFFINITY_INFO's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AffinityState {
    On = 0,
    Off = 1,
    OnPending = 2,
}

/// PSCI function identifiers (SMC32 and SMC64 conventions).
pub mod psci {
    pub const VERSION: u32 = 0x8400_0000;
    pub const CPU_SUSPEND: u32 = 0x8400_0001;
    pub const CPU_OFF: u32 = 0x8400_0002;
    pub const CPU_ON: u32 = 0x8400_0003;
    pub const AFFINITY_INFO: u32 = 0x8400_0004;
    pub const MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
    pub const SYSTEM_OFF: u32 = 0x8400_0008;
    pub const SYSTEM_RESET: u32 = 0x8400_0009;
    pub const FEATURES: u32 = 0x8400_000a;
    /// The 64-bit variants of the calls that take addresses.
    pub const CPU_ON_64: u32 = 0xc400_0003;
    pub const AFFINITY_INFO_64: u32 = 0xc400_0004;
    /// PSCI 1.0.
    pub const VERSION_1_0: u64 = 0x1_0000;
    /// MIGRATE_INFO_TYPE: no trusted OS needs migrating.
    pub const NO_TRUSTED_OS: u64 = 2;
}

/// What the vCPU loop does after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Run the guest again.
    Continue,
    /// WFI: sleep until an interrupt is pending, a kick, or the virtual timer's deadline.
    WaitForInterrupt,
    /// WFE: give the host CPU away briefly, then run again.
    Yield,
    /// PSCI CPU_OFF: this vCPU stops until a CPU_ON names it.
    CpuOff,
    /// PSCI SYSTEM_OFF.
    PowerOff,
    /// PSCI SYSTEM_RESET (a sandbox treats it as power-off, as on x86).
    Reset,
}

/// Exits the VMM cannot continue from.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ExitError {
    #[error(transparent)]
    Reg(#[from] RegError),
    #[error(transparent)]
    Syndrome(#[from] esr::EsrError),
}

/// Handles one exception exit with syndrome `esr` and faulting guest physical address `ipa`.
pub fn handle_exception(
    v: &mut impl VcpuRegs,
    p: &mut impl Platform,
    esr: u64,
    ipa: u64,
) -> Result<Outcome, ExitError> {
    match esr::decode(esr) {
        Ok(Exit::Mmio(a)) => {
            mmio(v, p, a, ipa)?;
            advance(v)?;
            Ok(Outcome::Continue)
        }
        // An access the syndrome does not describe (load/store pair, writeback, SIMD to an
        // MMIO address): the guest gets the abort real hardware would give it.
        Err(esr::EsrError::NoSyndrome(_)) => {
            inject_data_abort(v, ipa)?;
            Ok(Outcome::Continue)
        }
        // HVC's preferred return address is the next instruction already.
        Ok(Exit::Hvc(_)) => Ok(psci_call(v, p)?),
        Ok(Exit::Smc(_)) => {
            let out = psci_call(v, p)?;
            advance(v)?;
            Ok(out)
        }
        Ok(Exit::WaitForInterrupt) => {
            advance(v)?;
            Ok(Outcome::WaitForInterrupt)
        }
        Ok(Exit::WaitForEvent) => {
            advance(v)?;
            Ok(Outcome::Yield)
        }
        // The platform's registers (the GIC's CPU interface); the rest HVF traps we do not
        // model (debug, PMU, implementation-defined) read as zero and ignore writes.
        Ok(Exit::SysReg {
            read,
            rt,
            op0,
            op1,
            crn,
            crm,
            op2,
        }) => {
            let id = SysRegId {
                op0,
                op1,
                crn,
                crm,
                op2,
            };
            if read {
                let value = p.sysreg_read(id).unwrap_or(0);
                set_x_or_zr(v, rt, value)?;
            } else {
                let value = x_or_zr(v, rt)?;
                p.sysreg_write(id, value);
            }
            advance(v)?;
            Ok(Outcome::Continue)
        }
        Err(e) => Err(e.into()),
    }
}

fn advance(v: &mut impl VcpuRegs) -> Result<(), RegError> {
    let pc = v.pc()?;
    v.set_pc(pc.wrapping_add(4))
}

/// Register 31 is the zero register for these instructions: reads 0, writes vanish.
fn x_or_zr(v: &impl VcpuRegs, n: u8) -> Result<u64, RegError> {
    if n >= 31 {
        Ok(0)
    } else {
        v.x(n)
    }
}

fn set_x_or_zr(v: &mut impl VcpuRegs, n: u8, value: u64) -> Result<(), RegError> {
    if n >= 31 {
        Ok(())
    } else {
        v.set_x(n, value)
    }
}

fn mmio(
    v: &mut impl VcpuRegs,
    p: &mut impl Platform,
    a: MmioAccess,
    ipa: u64,
) -> Result<(), RegError> {
    let size = usize::from(a.size).min(8);
    if a.write {
        let value = x_or_zr(v, a.reg)?;
        p.mmio_write(ipa, &value.to_le_bytes()[..size]);
        return Ok(());
    }
    let mut buf = [0u8; 8];
    p.mmio_read(ipa, &mut buf[..size]);
    let mut value = u64::from_le_bytes(buf);
    let bits = size as u32 * 8;
    if a.sign_extend && bits < 64 {
        let shift = 64 - bits;
        value = (((value << shift) as i64) >> shift) as u64;
    }
    if !a.sixty_four {
        value &= 0xffff_ffff;
    }
    set_x_or_zr(v, a.reg, value)
}

fn psci_call(v: &mut impl VcpuRegs, p: &mut impl Platform) -> Result<Outcome, RegError> {
    let func = v.x(0)? as u32;
    let ret = |v: &mut _, r: u64| set_x_or_zr(v, 0, r).map(|()| Outcome::Continue);
    match func {
        psci::VERSION => ret(v, psci::VERSION_1_0),
        psci::MIGRATE_INFO_TYPE => ret(v, psci::NO_TRUSTED_OS),
        psci::CPU_OFF => Ok(Outcome::CpuOff),
        psci::SYSTEM_OFF => Ok(Outcome::PowerOff),
        psci::SYSTEM_RESET => Ok(Outcome::Reset),
        psci::CPU_ON | psci::CPU_ON_64 => {
            let (target, entry, ctx) = (v.x(1)?, v.x(2)?, v.x(3)?);
            let (target, entry, ctx) = if func == psci::CPU_ON {
                (target & 0xffff_ffff, entry & 0xffff_ffff, ctx & 0xffff_ffff)
            } else {
                (target, entry, ctx)
            };
            let r = p.cpu_on(target, entry, ctx);
            ret(v, r.value())
        }
        psci::AFFINITY_INFO | psci::AFFINITY_INFO_64 => {
            // Only level 0 (a single CPU) is answered, as PSCI 1.0 allows.
            if v.x(2)? != 0 {
                return ret(v, PsciReturn::InvalidParameters.value());
            }
            let r = match p.affinity_info(v.x(1)?) {
                Ok(state) => state as u64,
                Err(e) => e.value(),
            };
            ret(v, r)
        }
        psci::FEATURES => {
            let supported = matches!(
                v.x(1)? as u32,
                psci::VERSION
                    | psci::CPU_OFF
                    | psci::CPU_ON
                    | psci::CPU_ON_64
                    | psci::AFFINITY_INFO
                    | psci::AFFINITY_INFO_64
                    | psci::MIGRATE_INFO_TYPE
                    | psci::SYSTEM_OFF
                    | psci::SYSTEM_RESET
                    | psci::FEATURES
            );
            ret(
                v,
                if supported {
                    PsciReturn::Success.value()
                } else {
                    PsciReturn::NotSupported.value()
                },
            )
        }
        // CPU_SUSPEND (idle states are the host's business), SMCCC probes, vendor calls.
        _ => ret(v, PsciReturn::NotSupported.value()),
    }
}

/// Exception classes of a data abort taken to EL1, from EL0 and from EL1.
const EC_DABT_LOWER: u64 = 0x24;
const EC_DABT_CUR: u64 = 0x25;
/// Instruction length bit (32-bit instruction) and the synchronous external abort status.
const ESR_IL: u64 = 1 << 25;
const DFSC_SYNC_EXTERNAL: u64 = 0x10;
/// PSTATE.M of EL1 with SP_EL1, and D, A, I, F masked.
const PSTATE_EL1H: u64 = 0x5;
const PSTATE_DAIF: u64 = 0x3c0;

/// Delivers a synchronous external data abort at `far` to the guest's EL1 vector, as the
/// architecture does on a bus error: ELR/SPSR/ESR/FAR written, PC at VBAR + the offset for
/// "synchronous, current EL with SP_ELx" or "lower EL, AArch64".
pub fn inject_data_abort(v: &mut impl VcpuRegs, far: u64) -> Result<(), RegError> {
    let cpsr = v.cpsr()?;
    let from_el0 = (cpsr >> 2) & 3 == 0;
    let (ec, offset) = if from_el0 {
        (EC_DABT_LOWER, 0x400)
    } else if cpsr & 1 == 1 {
        (EC_DABT_CUR, 0x200)
    } else {
        // EL1 with SP_EL0 (EL1t).
        (EC_DABT_CUR, 0x000)
    };
    let pc = v.pc()?;
    v.set_sys(SysReg::ElrEl1, pc)?;
    v.set_sys(SysReg::SpsrEl1, cpsr)?;
    v.set_sys(SysReg::EsrEl1, (ec << 26) | ESR_IL | DFSC_SYNC_EXTERNAL)?;
    v.set_sys(SysReg::FarEl1, far)?;
    let vbar = v.sys(SysReg::VbarEl1)?;
    v.set_cpsr((cpsr & !0x3cf) | PSTATE_DAIF | PSTATE_EL1H)?;
    v.set_pc(vbar.wrapping_add(offset))
}

/// The virtual timer's interrupt (PPI 11, INTID 27) and the framework's masking of it: HVF
/// exits once when the timer fires and masks it; the VMM raises the interrupt and unmasks
/// only when the guest has dealt with the timer (disabled, masked, or re-armed into the
/// future), else the exit would repeat at once.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Vtimer {
    asserted: bool,
}

/// The INTID of the virtual timer's interrupt.
pub const VTIMER_INTID: u32 = 27;

/// CNTV_CTL_EL0 bits.
const CNTV_ENABLE: u64 = 1;
const CNTV_IMASK: u64 = 2;
const CNTV_ISTATUS: u64 = 4;

/// A change to the timer interrupt's level and the framework's timer mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtimerChange {
    /// The interrupt line's new level.
    pub level: bool,
    /// Whether to unmask the framework's timer (`hv_vcpu_set_vtimer_mask(false)`).
    pub unmask: bool,
}

impl Vtimer {
    /// The VTIMER_ACTIVATED exit: raise the line (the framework has masked the timer).
    pub fn activated(&mut self) -> VtimerChange {
        self.asserted = true;
        VtimerChange {
            level: true,
            unmask: false,
        }
    }

    /// Before each run: once the guest's CNTV_CTL_EL0 no longer signals, lower the line and
    /// unmask the timer so its next deadline exits again.
    pub fn sync(&mut self, cntv_ctl: u64) -> Option<VtimerChange> {
        if !self.asserted {
            return None;
        }
        let firing = cntv_ctl & CNTV_ENABLE != 0
            && cntv_ctl & CNTV_IMASK == 0
            && cntv_ctl & CNTV_ISTATUS != 0;
        if firing {
            return None;
        }
        self.asserted = false;
        Some(VtimerChange {
            level: false,
            unmask: true,
        })
    }
}

/// How long a WFI may sleep before the virtual timer fires: `None` when the timer cannot fire
/// (disabled or masked; only an interrupt or a kick ends the wait), zero when it is due.
/// `cnt` is the guest's virtual count now, `freq` CNTFRQ_EL0 in Hz.
pub fn wfi_timeout(
    cntv_ctl: u64,
    cntv_cval: u64,
    cnt: u64,
    freq: u64,
) -> Option<std::time::Duration> {
    if cntv_ctl & CNTV_ENABLE == 0 || cntv_ctl & CNTV_IMASK != 0 || freq == 0 {
        return None;
    }
    let ticks = cntv_cval.saturating_sub(cnt);
    let nanos = u128::from(ticks) * 1_000_000_000 / u128::from(freq);
    Some(std::time::Duration::from_nanos(
        u64::try_from(nanos).unwrap_or(u64::MAX),
    ))
}

#[cfg(test)]
mod tests;
