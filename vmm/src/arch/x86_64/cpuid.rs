//! Per-vCPU CPUID derived from what the host KVM supports (KVM_GET_SUPPORTED_CPUID).
//!
//! Only leaves KVM lists are ever passed on, and only topology and a few feature bits are
//! changed: hosts differ (the L2 VM's emulated AMD CPU lacks features real ones have), so the
//! guest sees exactly what this host can virtualise, plus one socket of N single-thread cores
//! with APIC id = vCPU index.

/// One CPUID entry, hypervisor-neutral (the fields of `kvm_cpuid_entry2`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// CPU vendor, from leaf 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    Other,
}

/// Leaf 1 ECX: TSC deadline timer.
pub const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
pub const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: multiple logical processors per package (HTT).
pub const EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX: core multi-processing legacy mode (AMD).
pub const ECX_CMP_LEGACY: u32 = 1 << 1;

/// The vendor named by leaf 0 of `entries`.
pub fn vendor(entries: &[CpuidEntry]) -> Vendor {
    let Some(l0) = entries.iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&l0.ebx.to_le_bytes());
    id[4..8].copy_from_slice(&l0.edx.to_le_bytes());
    id[8..].copy_from_slice(&l0.ecx.to_le_bytes());
    match &id {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// Smallest `s` with `1 << s >= n`.
fn ceil_log2(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Builds vCPU `index`'s CPUID (of `count` vCPUs) from the host-supported `supported` entries.
pub fn for_vcpu(
    supported: &[CpuidEntry],
    index: u32,
    count: u32,
    tsc_deadline: bool,
) -> Vec<CpuidEntry> {
    let vendor = vendor(supported);
    let apic_id = index;
    let count = count.max(1);
    let core_shift = ceil_log2(count);
    let mut out = supported.to_vec();
    for e in out.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count.min(255) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            0x4 if vendor == Vendor::Intel && e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
            }
            0xb | 0x1f => {
                // Level 0: SMT (one thread per core); level 1: cores; then the end marker.
                let (eax, ebx, level_type) = match e.index {
                    0 => (0, 1, 1),
                    1 => (core_shift, count, 2),
                    _ => (0, 0, 0),
                };
                e.eax = eax;
                e.ebx = ebx;
                e.ecx = (level_type << 8) | (e.index & 0xff);
                e.edx = apic_id;
            }
            0x8000_0001 if vendor == Vendor::Amd => {
                if count > 1 {
                    e.ecx |= ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 if vendor == Vendor::Amd => {
                e.ecx = (e.ecx & !0xf0ff) | (core_shift << 12) | ((count - 1) & 0xff);
            }
            0x8000_001d if vendor == Vendor::Amd && e.eax & 0x1f != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & !(0xfff << 14)) | ((sharing & 0xfff) << 14);
            }
            0x8000_001e if vendor == Vendor::Amd => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff; // compute unit id; threads per unit - 1 = 0
                e.ecx = 0; // node 0, one node per processor
                e.edx = 0;
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            ..Default::default()
        }
    }

    fn leaf0(vendor: &[u8; 12]) -> CpuidEntry {
        let w = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        CpuidEntry {
            function: 0,
            eax: 0xd,
            ebx: w(0),
            edx: w(4),
            ecx: w(8),
            ..Default::default()
        }
    }

    #[test]
    fn vendor_detection() {
        assert_eq!(vendor(&[leaf0(b"GenuineIntel")]), Vendor::Intel);
        assert_eq!(vendor(&[leaf0(b"AuthenticAMD")]), Vendor::Amd);
        assert_eq!(vendor(&[leaf0(b"HygonGenuine")]), Vendor::Amd);
        assert_eq!(vendor(&[]), Vendor::Other);
    }

    #[test]
    fn leaf1_topology_and_flags() {
        let mut l1 = entry(1, 0);
        l1.ebx = 0xaabb_0800;
        l1.ecx = ECX_TSC_DEADLINE;
        let sup = vec![leaf0(b"GenuineIntel"), l1];
        let v = for_vcpu(&sup, 3, 4, false);
        let l1 = v.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(
            l1.ecx & ECX_TSC_DEADLINE,
            0,
            "TSC deadline only with the capability"
        );
        assert_ne!(l1.edx & EDX_HTT, 0);
        let single = for_vcpu(&sup, 0, 1, true);
        let l1 = single.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.edx & EDX_HTT, 0);
        assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn extended_topology() {
        let sup = vec![
            leaf0(b"GenuineIntel"),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
        ];
        let v = for_vcpu(&sup, 5, 6, true);
        let b: Vec<_> = v.iter().filter(|e| e.function == 0xb).collect();
        assert_eq!((b[0].eax, b[0].ebx, b[0].ecx, b[0].edx), (0, 1, 0x100, 5));
        assert_eq!((b[1].eax, b[1].ebx, b[1].ecx, b[1].edx), (3, 6, 0x201, 5));
        assert_eq!((b[2].eax, b[2].ebx, b[2].ecx >> 8), (0, 0, 0));
    }

    #[test]
    fn only_supported_leaves_are_passed() {
        let sup = vec![leaf0(b"AuthenticAMD"), entry(1, 0)];
        let v = for_vcpu(&sup, 0, 2, true);
        assert_eq!(v.len(), 2);
        assert!(!v
            .iter()
            .any(|e| e.function == 0xb || e.function == 0x8000_001e));
    }

    #[test]
    fn amd_core_counts() {
        let mut l8 = entry(0x8000_0008, 0);
        l8.ecx = 0xffff_ffff;
        let sup = vec![
            leaf0(b"AuthenticAMD"),
            entry(0x8000_0001, 0),
            l8,
            entry(0x8000_001e, 0),
        ];
        let v = for_vcpu(&sup, 2, 3, true);
        let get = |f| v.iter().find(|e| e.function == f).unwrap();
        assert_ne!(get(0x8000_0001).ecx & ECX_CMP_LEGACY, 0);
        assert_eq!(get(0x8000_0008).ecx & 0xff, 2);
        assert_eq!((get(0x8000_0008).ecx >> 12) & 0xf, 2);
        assert_eq!(get(0x8000_001e).eax, 2);
    }

    #[test]
    fn log2() {
        assert_eq!([1, 2, 3, 4, 5, 64].map(ceil_log2), [0, 1, 2, 2, 3, 6]);
    }
}
