//! ESR_EL2 exception syndrome decoding for vCPU exits (Arm ARM D17.2.37). Data aborts from the
//! guest are how MMIO reaches the VMM; the syndrome says which register and access size.

use thiserror::Error;

/// A decoded guest exit reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A data abort with a valid instruction syndrome: an MMIO access.
    Mmio(MmioAccess),
    /// WFI: the vCPU is idle until an interrupt.
    WaitForInterrupt,
    /// WFE: the vCPU waits for an event (another vCPU's SEV); a yield is enough.
    WaitForEvent,
    /// HVC with its immediate (PSCI calls use HVC #0).
    Hvc(u16),
    /// SMC with its immediate.
    Smc(u16),
    /// MSR/MRS to a system register the hypervisor traps.
    SysReg {
        read: bool,
        op0: u8,
        op1: u8,
        crn: u8,
        crm: u8,
        op2: u8,
        rt: u8,
    },
}

/// An MMIO access decoded from a data abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioAccess {
    /// Write (true) or read.
    pub write: bool,
    /// Access size in bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// Register number (31 is the zero register for writes).
    pub reg: u8,
    /// Sign-extend a read into the register.
    pub sign_extend: bool,
    /// The destination is a 64-bit register.
    pub sixty_four: bool,
}

/// Syndromes the VMM cannot handle.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum EsrError {
    #[error("data abort without a valid instruction syndrome (ESR {0:#x}): the guest used an access MMIO cannot emulate")]
    NoSyndrome(u64),
    #[error("unhandled exception class {class:#x} (ESR {esr:#x})")]
    UnknownClass { class: u8, esr: u64 },
}

const EC_WFX: u8 = 0x01;
const EC_HVC64: u8 = 0x16;
const EC_SMC64: u8 = 0x17;
const EC_SYSREG: u8 = 0x18;
const EC_DABT_LOWER: u8 = 0x24;

/// Decodes an ESR_EL2 value.
pub fn decode(esr: u64) -> Result<Exit, EsrError> {
    let class = ((esr >> 26) & 0x3f) as u8;
    let iss = esr & 0x1ff_ffff;
    match class {
        EC_WFX if iss & 1 == 1 => Ok(Exit::WaitForEvent),
        EC_WFX => Ok(Exit::WaitForInterrupt),
        EC_HVC64 => Ok(Exit::Hvc(iss as u16)),
        EC_SMC64 => Ok(Exit::Smc(iss as u16)),
        EC_SYSREG => Ok(Exit::SysReg {
            read: iss & 1 == 1,
            op0: ((iss >> 20) & 3) as u8,
            op2: ((iss >> 17) & 7) as u8,
            op1: ((iss >> 14) & 7) as u8,
            crn: ((iss >> 10) & 0xf) as u8,
            rt: ((iss >> 5) & 0x1f) as u8,
            crm: ((iss >> 1) & 0xf) as u8,
        }),
        EC_DABT_LOWER => {
            if (iss >> 24) & 1 == 0 {
                return Err(EsrError::NoSyndrome(esr));
            }
            Ok(Exit::Mmio(MmioAccess {
                write: (iss >> 6) & 1 == 1,
                size: 1 << ((iss >> 22) & 3),
                reg: ((iss >> 16) & 0x1f) as u8,
                sign_extend: (iss >> 21) & 1 == 1,
                sixty_four: (iss >> 15) & 1 == 1,
            }))
        }
        _ => Err(EsrError::UnknownClass { class, esr }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dabt(isv: bool, sas: u64, sse: bool, srt: u64, sf: bool, wnr: bool) -> u64 {
        (u64::from(EC_DABT_LOWER) << 26)
            | (1 << 25)
            | (u64::from(isv) << 24)
            | (sas << 22)
            | (u64::from(sse) << 21)
            | (srt << 16)
            | (u64::from(sf) << 15)
            | (u64::from(wnr) << 6)
    }

    #[test]
    fn mmio_accesses() {
        assert_eq!(
            decode(dabt(true, 2, false, 3, false, true)),
            Ok(Exit::Mmio(MmioAccess {
                write: true,
                size: 4,
                reg: 3,
                sign_extend: false,
                sixty_four: false
            }))
        );
        assert_eq!(
            decode(dabt(true, 0, true, 31, true, false)),
            Ok(Exit::Mmio(MmioAccess {
                write: false,
                size: 1,
                reg: 31,
                sign_extend: true,
                sixty_four: true
            }))
        );
        assert!(matches!(
            decode(dabt(false, 2, false, 3, false, true)),
            Err(EsrError::NoSyndrome(_))
        ));
    }

    #[test]
    fn other_classes() {
        assert_eq!(decode(u64::from(EC_WFX) << 26), Ok(Exit::WaitForInterrupt));
        assert_eq!(
            decode((u64::from(EC_WFX) << 26) | 1),
            Ok(Exit::WaitForEvent)
        );
        assert_eq!(
            decode((u64::from(EC_HVC64) << 26) | 0x1234),
            Ok(Exit::Hvc(0x1234))
        );
        assert!(matches!(
            decode(0x3f << 26),
            Err(EsrError::UnknownClass { class: 0x3f, .. })
        ));
        // MRS x5, CNTVCT_EL0-like encoding: op0=3 op1=3 crn=14 crm=0 op2=2, read.
        let iss = (3 << 20) | (2 << 17) | (3 << 14) | (14 << 10) | (5 << 5) | 1;
        assert_eq!(
            decode((u64::from(EC_SYSREG) << 26) | iss),
            Ok(Exit::SysReg {
                read: true,
                op0: 3,
                op1: 3,
                crn: 14,
                crm: 0,
                op2: 2,
                rt: 5
            })
        );
    }
}
