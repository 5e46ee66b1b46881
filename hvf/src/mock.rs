//! A register file standing in for a framework vCPU, shared by the unit tests and the fuzz
//! targets so that the exit handling is exercised the same way in both.

use std::collections::HashMap;

use crate::exits::{RegError, SysReg, VcpuRegs};

/// x0-x30, PC, CPSR and the system registers the exit handling touches (unset ones read 0).
#[derive(Debug, Default, Clone)]
pub struct MockRegs {
    pub x: [u64; 31],
    pub pc: u64,
    pub cpsr: u64,
    pub sys: HashMap<SysReg, u64>,
}

impl MockRegs {
    /// A vCPU at `pc` in EL1h with interrupts masked, as a kernel runs.
    pub fn at(pc: u64) -> Self {
        MockRegs {
            pc,
            cpsr: 0x3c5,
            ..Default::default()
        }
    }
}

fn no_such(n: u8) -> RegError {
    RegError(format!("x{n} asked of the register file"))
}

impl VcpuRegs for MockRegs {
    fn x(&self, n: u8) -> Result<u64, RegError> {
        self.x
            .get(usize::from(n))
            .copied()
            .ok_or_else(|| no_such(n))
    }
    fn set_x(&mut self, n: u8, v: u64) -> Result<(), RegError> {
        *self.x.get_mut(usize::from(n)).ok_or_else(|| no_such(n))? = v;
        Ok(())
    }
    fn pc(&self) -> Result<u64, RegError> {
        Ok(self.pc)
    }
    fn set_pc(&mut self, v: u64) -> Result<(), RegError> {
        self.pc = v;
        Ok(())
    }
    fn cpsr(&self) -> Result<u64, RegError> {
        Ok(self.cpsr)
    }
    fn set_cpsr(&mut self, v: u64) -> Result<(), RegError> {
        self.cpsr = v;
        Ok(())
    }
    fn sys(&self, r: SysReg) -> Result<u64, RegError> {
        Ok(self.sys.get(&r).copied().unwrap_or(0))
    }
    fn set_sys(&mut self, r: SysReg, v: u64) -> Result<(), RegError> {
        self.sys.insert(r, v);
        Ok(())
    }
}
