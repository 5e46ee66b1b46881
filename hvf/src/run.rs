//! One turn of an HVF vCPU's loop, portable: before each run the virtual timer's level is
//! settled and the vCPU's IRQ input is set from the GIC (the framework forgets it after every
//! run); after it the exit is handled, with the GIC's registers (distributor and redistributor
//! MMIO, the trapped `ICC_*` system registers) served here and everything else passed to the
//! machine's bus. Other vCPUs an interrupt now concerns are kicked.
//!
//! With the in-kernel GIC of macOS 15 the framework does all of this itself; this path is for
//! the user-space [`Gic`].

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;

pub use crate::error::RawExit;
use crate::exits::{
    self, AffinityState, ExitError, Outcome, Platform, PsciReturn, RegError, SysReg, SysRegId,
    VcpuRegs, Vtimer, VTIMER_INTID,
};
use crate::gic::{Gic, IccReg, Kick};

/// What the loop needs of a framework vCPU beyond its registers.
pub trait RunVcpu: VcpuRegs {
    fn run(&mut self) -> Result<RawExit, RegError>;
    /// The IRQ input for the next run (`hv_vcpu_set_pending_interrupt`).
    fn set_irq_line(&mut self, level: bool) -> Result<(), RegError>;
    /// `hv_vcpu_set_vtimer_mask`.
    fn set_vtimer_mask(&mut self, masked: bool) -> Result<(), RegError>;
    /// The guest's virtual count now (CNTVCT_EL0) and the counter frequency.
    fn virtual_count(&self) -> Result<(u64, u64), RegError>;
}

/// The rest of the machine as a vCPU's exits see it: device MMIO and PSCI (see
/// [`Platform`]), plus waking other vCPUs.
pub trait Machine: Platform {
    /// Interrupt the runs (or WFI sleeps) of the vCPUs in `cpus`.
    fn kick(&mut self, cpus: Kick);
}

/// Where the emulated GIC sits in guest physical memory.
#[derive(Debug, Clone, Copy)]
pub struct GicRegion {
    pub dist: u64,
    pub redist: u64,
    pub redist_len: u64,
}

/// Exits that end this vCPU's loop.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RunError {
    #[error(transparent)]
    Exit(#[from] ExitError),
    #[error(transparent)]
    Reg(#[from] RegError),
    #[error("the vCPU exited for a reason Hypervisor.framework did not document ({0})")]
    Unknown(u32),
}

/// One vCPU's loop state.
#[derive(Debug)]
pub struct VcpuLoop<'g> {
    cpu: usize,
    gic: &'g Mutex<Gic>,
    region: GicRegion,
    vtimer: Vtimer,
}

impl<'g> VcpuLoop<'g> {
    pub fn new(cpu: usize, gic: &'g Mutex<Gic>, region: GicRegion) -> Self {
        VcpuLoop {
            cpu,
            gic,
            region,
            vtimer: Vtimer::default(),
        }
    }

    fn gic(&self) -> MutexGuard<'_, Gic> {
        // A panic elsewhere cannot leave the GIC half-updated in a way that matters more than
        // stopping every vCPU would.
        self.gic.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Settles the timer and the IRQ input, runs the vCPU once and handles its exit.
    pub fn step(
        &mut self,
        v: &mut impl RunVcpu,
        m: &mut impl Machine,
    ) -> Result<Outcome, RunError> {
        if let Some(change) = self.vtimer.sync(v.sys(SysReg::CntvCtlEl0)?) {
            self.gic().set_ppi(self.cpu, VTIMER_INTID, change.level);
            if change.unmask {
                v.set_vtimer_mask(false)?;
            }
        }
        let line = self.gic().irq_line(self.cpu);
        v.set_irq_line(line)?;
        match v.run()? {
            RawExit::Canceled => Ok(Outcome::Continue),
            RawExit::VtimerActivated => {
                let change = self.vtimer.activated();
                self.gic().set_ppi(self.cpu, VTIMER_INTID, change.level);
                Ok(Outcome::Continue)
            }
            RawExit::Exception { esr, ipa, .. } => {
                let mut p = GicPlatform {
                    lp: self,
                    machine: m,
                };
                Ok(exits::handle_exception(v, &mut p, esr, ipa)?)
            }
            RawExit::Unknown(r) => Err(RunError::Unknown(r)),
        }
    }

    /// How long a WFI may sleep: zero when an interrupt is ready, until the virtual timer's
    /// deadline otherwise, or `None` (until a kick) when the timer cannot fire.
    pub fn wfi_sleep(&self, v: &impl RunVcpu) -> Result<Option<Duration>, RegError> {
        if self.gic().irq_line(self.cpu) {
            return Ok(Some(Duration::ZERO));
        }
        let (count, freq) = v.virtual_count()?;
        Ok(exits::wfi_timeout(
            v.sys(SysReg::CntvCtlEl0)?,
            v.sys(SysReg::CntvCvalEl0)?,
            count,
            freq,
        ))
    }
}

/// The platform one exit sees: the GIC's frames and registers here, the rest on the machine.
struct GicPlatform<'a, 'g, M> {
    lp: &'a VcpuLoop<'g>,
    machine: &'a mut M,
}

impl<M: Machine> GicPlatform<'_, '_, M> {
    fn others(&mut self, kick: Kick) {
        let others = kick & !1u64.checked_shl(self.lp.cpu as u32).unwrap_or(0);
        if others != 0 {
            self.machine.kick(others);
        }
    }

    fn in_redist(&self, addr: u64) -> Option<u64> {
        let r = self.lp.region;
        addr.checked_sub(r.redist).filter(|o| *o < r.redist_len)
    }

    fn in_dist(&self, addr: u64) -> Option<u64> {
        addr.checked_sub(self.lp.region.dist)
            .filter(|o| *o < crate::gic::DIST_SIZE)
    }
}

impl<M: Machine> Platform for GicPlatform<'_, '_, M> {
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        if let Some(o) = self.in_dist(addr) {
            self.lp.gic().dist_read(o, data);
        } else if let Some(o) = self.in_redist(addr) {
            self.lp.gic().redist_read(o, data);
        } else {
            self.machine.mmio_read(addr, data);
        }
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        let kick = if let Some(o) = self.in_dist(addr) {
            self.lp.gic().dist_write(o, data)
        } else if let Some(o) = self.in_redist(addr) {
            self.lp.gic().redist_write(o, data)
        } else {
            return self.machine.mmio_write(addr, data);
        };
        self.others(kick);
    }

    fn cpu_on(&mut self, mpidr: u64, entry: u64, context: u64) -> PsciReturn {
        self.machine.cpu_on(mpidr, entry, context)
    }

    fn affinity_info(&mut self, mpidr: u64) -> Result<AffinityState, PsciReturn> {
        self.machine.affinity_info(mpidr)
    }

    fn sysreg_read(&mut self, id: SysRegId) -> Option<u64> {
        match IccReg::decode(id.op0, id.op1, id.crn, id.crm, id.op2) {
            Some(reg) => Some(self.lp.gic().icc_read(self.lp.cpu, reg)),
            None => self.machine.sysreg_read(id),
        }
    }

    fn sysreg_write(&mut self, id: SysRegId, value: u64) {
        match IccReg::decode(id.op0, id.op1, id.crn, id.crm, id.op2) {
            Some(reg) => {
                let kick = self.lp.gic().icc_write(self.lp.cpu, reg, value);
                self.others(kick);
            }
            None => self.machine.sysreg_write(id, value),
        }
    }
}

#[cfg(test)]
mod tests;
