//! Hypervisor.framework exit handling fed any syndrome, address and register state a guest can
//! produce: it answers (MMIO within the access size, PSCI, an injected abort) or fails the vCPU
//! with an error; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_hvf::exits::{handle_exception, AffinityState, Platform, PsciReturn, SysReg};
use msb_hvf::mock::MockRegs;

struct Bus;

impl Platform for Bus {
    fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) {
        assert!(
            matches!(data.len(), 1 | 2 | 4 | 8),
            "read of {} bytes",
            data.len()
        );
        data.fill(0xa5);
    }
    fn mmio_write(&mut self, _addr: u64, data: &[u8]) {
        assert!(
            matches!(data.len(), 1 | 2 | 4 | 8),
            "write of {} bytes",
            data.len()
        );
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
    let mut regs = MockRegs {
        x: std::array::from_fn(|_| next()),
        pc: next(),
        cpsr: next(),
        ..Default::default()
    };
    for r in [
        SysReg::ElrEl1,
        SysReg::SpsrEl1,
        SysReg::EsrEl1,
        SysReg::FarEl1,
        SysReg::VbarEl1,
        SysReg::CntvCtlEl0,
        SysReg::CntvCvalEl0,
    ] {
        regs.sys.insert(r, next());
    }
    let _ = handle_exception(&mut regs, &mut Bus, esr, ipa);
});
