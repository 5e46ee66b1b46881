//! Hypervisor.framework exit handling fed any syndrome, address and register state a guest can
//! produce: it answers (MMIO within the access size, PSCI, an injected abort) or fails the vCPU
//! with an error; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_hvf::exits::{
    handle_exception, AffinityState, Platform, PsciReturn, RegError, SysReg, VcpuRegs,
};

struct Regs {
    x: [u64; 31],
    pc: u64,
    cpsr: u64,
    sys: [u64; 7],
}

fn idx(r: SysReg) -> usize {
    r as usize
}

impl VcpuRegs for Regs {
    fn x(&self, n: u8) -> Result<u64, RegError> {
        self.x.get(usize::from(n)).copied().ok_or_else(|| RegError(format!("x{n}")))
    }
    fn set_x(&mut self, n: u8, v: u64) -> Result<(), RegError> {
        *self.x.get_mut(usize::from(n)).ok_or_else(|| RegError(format!("x{n}")))? = v;
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
        Ok(self.sys[idx(r)])
    }
    fn set_sys(&mut self, r: SysReg, v: u64) -> Result<(), RegError> {
        self.sys[idx(r)] = v;
        Ok(())
    }
}

struct Bus;

impl Platform for Bus {
    fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
        assert!(matches!(data.len(), 1 | 2 | 4 | 8), "read of {} bytes", data.len());
        data.fill(0xa5);
    }
    fn mmio_write(&mut self, _addr: u64, data: &[u8]) {
        assert!(matches!(data.len(), 1 | 2 | 4 | 8), "write of {} bytes", data.len());
    }
    fn cpu_on(&mut self, mpidr: u64, _entry: u64, _context: u64) -> PsciReturn {
        if mpidr < 4 {
            PsciReturn::Success
        } else {
            PsciReturn::InvalidParameters
        }
    }
    fn affinity_info(&mut self, mpidr: u64) -> Result<AffinityState, PsciReturn> {
        if mpidr < 4 {
            Ok(AffinityState::Off)
        } else {
            Err(PsciReturn::InvalidParameters)
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut words = data
        .chunks(8)
        .map(|c| c.iter().rev().fold(0u64, |a, &b| (a << 8) | u64::from(b)));
    let mut next = || words.next().unwrap_or(0);
    let (esr, ipa) = (next(), next());
    let mut regs = Regs {
        x: std::array::from_fn(|_| next()),
        pc: next(),
        cpsr: next(),
        sys: std::array::from_fn(|_| next()),
    };
    let _ = handle_exception(&mut regs, &mut Bus, esr, ipa);
});
