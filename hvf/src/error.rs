//! Hypervisor.framework failures as one line a user can act on, the check that this host can run
//! msb-vmm's macOS backend at all, and the exits `hv_vcpu_run` reports. Portable, so the wording
//! and the decoding are tested on Linux too; only `hv` (macOS) makes the calls.

use std::fmt;

use thiserror::Error;

use crate::exits::RegError;

/// `hv_return_t` values (`arm64/hv/hv_kern_types.h`: `err_local | err_sub(0xba5) | n`).
pub mod code {
    pub const SUCCESS: i32 = 0;
    pub const ERROR: i32 = 0xfae9_4001_u32 as i32;
    pub const BUSY: i32 = 0xfae9_4002_u32 as i32;
    pub const BAD_ARGUMENT: i32 = 0xfae9_4003_u32 as i32;
    pub const ILLEGAL_GUEST_STATE: i32 = 0xfae9_4004_u32 as i32;
    pub const NO_RESOURCES: i32 = 0xfae9_4005_u32 as i32;
    pub const NO_DEVICE: i32 = 0xfae9_4006_u32 as i32;
    pub const DENIED: i32 = 0xfae9_4007_u32 as i32;
    /// arm64's name for this code (the x86 header calls it HV_FAULT).
    pub const EXISTS: i32 = 0xfae9_4008_u32 as i32;
    pub const UNSUPPORTED: i32 = 0xfae9_400f_u32 as i32;
}

/// A framework call that failed: which call, and why.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("{call}: {reason}")]
pub struct HvError {
    pub call: &'static str,
    pub reason: HvReason,
}

impl HvError {
    pub fn new(call: &'static str, code: i32) -> Self {
        HvError {
            call,
            reason: HvReason::from_code(code),
        }
    }

    /// The framework's return code.
    pub fn code(&self) -> i32 {
        self.reason.code()
    }
}

/// `Ok` for HV_SUCCESS, else the error of `call`.
pub fn check(call: &'static str, ret: i32) -> Result<(), HvError> {
    if ret == code::SUCCESS {
        Ok(())
    } else {
        Err(HvError::new(call, ret))
    }
}

/// Why a call failed, in the words the user sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HvReason {
    /// Almost always a missing entitlement: an unsigned `cargo build` output.
    Denied,
    /// No usable hypervisor: an Intel Mac, or a macOS VM without nested virtualization.
    Unsupported,
    Busy,
    BadArgument,
    IllegalGuestState,
    NoResources,
    NoDevice,
    Exists,
    Error,
    Unknown(i32),
}

impl HvReason {
    pub fn from_code(c: i32) -> Self {
        match c {
            code::DENIED => HvReason::Denied,
            code::UNSUPPORTED => HvReason::Unsupported,
            code::BUSY => HvReason::Busy,
            code::BAD_ARGUMENT => HvReason::BadArgument,
            code::ILLEGAL_GUEST_STATE => HvReason::IllegalGuestState,
            code::NO_RESOURCES => HvReason::NoResources,
            code::NO_DEVICE => HvReason::NoDevice,
            code::EXISTS => HvReason::Exists,
            code::ERROR => HvReason::Error,
            other => HvReason::Unknown(other),
        }
    }

    pub fn code(self) -> i32 {
        match self {
            HvReason::Denied => code::DENIED,
            HvReason::Unsupported => code::UNSUPPORTED,
            HvReason::Busy => code::BUSY,
            HvReason::BadArgument => code::BAD_ARGUMENT,
            HvReason::IllegalGuestState => code::ILLEGAL_GUEST_STATE,
            HvReason::NoResources => code::NO_RESOURCES,
            HvReason::NoDevice => code::NO_DEVICE,
            HvReason::Exists => code::EXISTS,
            HvReason::Error => code::ERROR,
            HvReason::Unknown(c) => c,
        }
    }
}

impl fmt::Display for HvReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HvReason::Denied => f.write_str(
                "this binary lacks the com.apple.security.hypervisor entitlement: sign it with \
                 `scripts/sign-macos PATH`",
            ),
            HvReason::Unsupported => f.write_str(
                "Hypervisor.framework is unavailable: msb-vmm needs a Mac with Apple silicon \
                 (Intel Macs and VMs without nested virtualization are not supported)",
            ),
            HvReason::Busy => f.write_str("the resource is busy"),
            HvReason::BadArgument => f.write_str("invalid argument"),
            HvReason::IllegalGuestState => f.write_str("the guest is in an illegal state"),
            HvReason::NoResources => {
                f.write_str("the host is out of resources (memory, or the framework's limits)")
            }
            HvReason::NoDevice => {
                f.write_str("no such VM or vCPU (not created yet, or owned by another thread)")
            }
            HvReason::Exists => {
                f.write_str("it already exists (one VM per process, one GIC per VM)")
            }
            HvReason::Error => f.write_str("the framework reported an unspecified error"),
            HvReason::Unknown(c) => {
                write!(f, "unknown Hypervisor.framework error {:#010x}", *c as u32)
            }
        }
    }
}

/// The exit handling's register accessors report framework failures as [`RegError`].
impl From<HvError> for RegError {
    fn from(e: HvError) -> Self {
        RegError(e.to_string())
    }
}

/// A host the macOS backend cannot run on.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum HostError {
    #[error(
        "msb-vmm needs a Mac with Apple silicon: Intel Macs are not supported (on Apple \
         silicon, run the arm64 build rather than an x86_64 one under Rosetta)"
    )]
    IntelMac,
    #[error("msb-vmm on macOS needs Apple silicon (aarch64), not {0}")]
    MacArch(String),
}

/// Whether msb-vmm can run on a host with this `std::env::consts::OS` and `ARCH`. Everything
/// other than macOS passes here: Linux's KVM backend checks its own host.
pub fn check_host(os: &str, arch: &str) -> Result<(), HostError> {
    match (os, arch) {
        ("macos", "aarch64") => Ok(()),
        ("macos", "x86_64") => Err(HostError::IntelMac),
        ("macos", other) => Err(HostError::MacArch(other.to_string())),
        _ => Ok(()),
    }
}

/// [`check_host`] for the running binary.
pub fn check_this_host() -> Result<(), HostError> {
    check_host(std::env::consts::OS, std::env::consts::ARCH)
}

/// How `hv_vcpu_run` returned, decoded from the framework's exit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawExit {
    /// `hv_vcpus_exit` from another thread (a kick).
    Canceled,
    /// A synchronous exception: syndrome (ESR), faulting virtual address and guest physical
    /// address.
    Exception { esr: u64, far: u64, ipa: u64 },
    /// The virtual timer fired; the framework has masked it until told otherwise.
    VtimerActivated,
    /// HV_EXIT_REASON_UNKNOWN, or a reason newer than this code.
    Unknown(u32),
}

impl RawExit {
    /// From the fields of `hv_vcpu_exit_t` (reasons as in `hv_vcpu_types.h`).
    pub fn from_record(reason: u32, syndrome: u64, virtual_address: u64, ipa: u64) -> Self {
        match reason {
            0 => RawExit::Canceled,
            1 => RawExit::Exception {
                esr: syndrome,
                far: virtual_address,
                ipa,
            },
            2 => RawExit::VtimerActivated,
            other => RawExit::Unknown(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_headers() {
        // err_local = 0x3e << 26, err_sub(0xba5) = 0xba5 << 14.
        let base = ((0x3e_u32 << 26) | (0xba5 << 14)) as i32;
        assert_eq!(code::ERROR, base | 1);
        assert_eq!(code::DENIED, base | 7);
        assert_eq!(code::UNSUPPORTED, base | 0xf);
        assert_eq!(code::DENIED as u32, 0xfae9_4007);
        assert_eq!(code::UNSUPPORTED as u32, 0xfae9_400f);
    }

    #[test]
    fn denied_names_the_entitlement_and_the_fix() {
        let e = HvError::new("hv_vm_create", code::DENIED);
        assert_eq!(e.reason, HvReason::Denied);
        let m = e.to_string();
        assert!(m.starts_with("hv_vm_create: "), "{m}");
        assert!(m.contains("com.apple.security.hypervisor"), "{m}");
        assert!(m.contains("scripts/sign-macos PATH"), "{m}");
        assert!(!m.contains('\n'));
    }

    #[test]
    fn unsupported_says_apple_silicon() {
        let m = HvError::new("hv_vm_create", code::UNSUPPORTED).to_string();
        assert!(m.contains("Hypervisor.framework is unavailable"), "{m}");
        assert!(m.contains("Apple silicon"), "{m}");
        assert!(m.contains("Intel Macs"), "{m}");
        assert!(m.contains("nested virtualization"), "{m}");
    }

    #[test]
    fn every_known_code_has_its_own_one_line_message() {
        let known = [
            (code::ERROR, HvReason::Error, "unspecified"),
            (code::BUSY, HvReason::Busy, "busy"),
            (
                code::BAD_ARGUMENT,
                HvReason::BadArgument,
                "invalid argument",
            ),
            (
                code::ILLEGAL_GUEST_STATE,
                HvReason::IllegalGuestState,
                "illegal state",
            ),
            (
                code::NO_RESOURCES,
                HvReason::NoResources,
                "out of resources",
            ),
            (code::NO_DEVICE, HvReason::NoDevice, "no such VM or vCPU"),
            (code::EXISTS, HvReason::Exists, "already exists"),
            (code::DENIED, HvReason::Denied, "entitlement"),
            (code::UNSUPPORTED, HvReason::Unsupported, "unavailable"),
        ];
        for (c, reason, words) in known {
            let e = HvError::new("hv_vcpu_run", c);
            assert_eq!(e.reason, reason);
            assert_eq!(e.code(), c);
            let m = e.to_string();
            assert!(m.starts_with("hv_vcpu_run: "), "{m}");
            assert!(m.contains(words), "{m}");
            assert!(!m.contains('\n'), "{m}");
            assert!(!m.contains("unknown"), "{m}");
        }
    }

    #[test]
    fn unknown_codes_show_in_hex() {
        let e = HvError::new("hv_gic_create", 0xfae9_4009_u32 as i32);
        assert_eq!(e.reason, HvReason::Unknown(0xfae9_4009_u32 as i32));
        assert_eq!(e.code(), 0xfae9_4009_u32 as i32);
        assert_eq!(
            e.to_string(),
            "hv_gic_create: unknown Hypervisor.framework error 0xfae94009"
        );
        assert_eq!(
            HvError::new("x", 5).to_string(),
            "x: unknown Hypervisor.framework error 0x00000005"
        );
    }

    #[test]
    fn check_passes_success_only() {
        assert_eq!(check("hv_vcpu_run", 0), Ok(()));
        assert_eq!(
            check("hv_vcpu_run", code::BUSY),
            Err(HvError {
                call: "hv_vcpu_run",
                reason: HvReason::Busy
            })
        );
    }

    #[test]
    fn register_errors_carry_the_message() {
        let e: RegError = HvError::new("hv_vcpu_get_reg", code::BAD_ARGUMENT).into();
        assert_eq!(e, RegError("hv_vcpu_get_reg: invalid argument".to_string()));
    }

    #[test]
    fn intel_macs_are_refused_in_one_line() {
        let e = check_host("macos", "x86_64").unwrap_err();
        assert_eq!(e, HostError::IntelMac);
        let m = e.to_string();
        assert!(m.contains("Apple silicon"), "{m}");
        assert!(m.contains("Intel Macs are not supported"), "{m}");
        assert!(!m.contains('\n'));
    }

    #[test]
    fn apple_silicon_and_linux_pass() {
        assert_eq!(check_host("macos", "aarch64"), Ok(()));
        assert_eq!(check_host("linux", "x86_64"), Ok(()));
        assert_eq!(check_host("linux", "aarch64"), Ok(()));
        assert_eq!(
            check_host("macos", "powerpc"),
            Err(HostError::MacArch("powerpc".to_string()))
        );
    }

    #[test]
    fn this_host_is_judged_by_its_build() {
        let expect = check_host(std::env::consts::OS, std::env::consts::ARCH);
        assert_eq!(check_this_host(), expect);
    }

    #[test]
    fn exit_records_decode() {
        assert_eq!(RawExit::from_record(0, 1, 2, 3), RawExit::Canceled);
        assert_eq!(
            RawExit::from_record(1, 0x9200_0046, 0xffff_0000_0900_0000, 0x0900_0000),
            RawExit::Exception {
                esr: 0x9200_0046,
                far: 0xffff_0000_0900_0000,
                ipa: 0x0900_0000
            }
        );
        assert_eq!(RawExit::from_record(2, 0, 0, 0), RawExit::VtimerActivated);
        assert_eq!(RawExit::from_record(3, 0, 0, 0), RawExit::Unknown(3));
        assert_eq!(RawExit::from_record(77, 0, 0, 0), RawExit::Unknown(77));
    }
}
