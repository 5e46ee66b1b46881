//! Model-specific registers set on every vCPU before boot, restricted to the ones the host KVM
//! lists in KVM_GET_MSR_INDEX_LIST (setting an unlisted MSR fails on some hosts).

/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// STAR (syscall segment selectors).
pub const MSR_STAR: u32 = 0xc000_0081;
/// LSTAR (64-bit syscall entry).
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// CSTAR (compat syscall entry).
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SYSCALL_MASK (RFLAGS mask).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// KERNEL_GS_BASE.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_MISC_ENABLE (Intel).
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// MISC_ENABLE: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled, default type write-back. Without it the guest would run with
/// memory treated as uncacheable until the kernel reprograms MTRRs, which it does not do.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// The boot MSRs and their values, those the host does not list removed.
pub fn boot_msrs(supported: &[u32]) -> Vec<(u32, u64)> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .filter(|(idx, _)| supported.contains(idx))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlisted_msrs_are_dropped() {
        let m = boot_msrs(&[MSR_STAR, MSR_MTRR_DEF_TYPE, 0x1234]);
        assert_eq!(m, vec![(MSR_STAR, 0), (MSR_MTRR_DEF_TYPE, (1 << 11) | 6)]);
        assert!(boot_msrs(&[]).is_empty());
    }
}
