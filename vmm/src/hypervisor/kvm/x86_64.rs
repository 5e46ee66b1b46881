//! KVM on x86_64: what the host's KVM must offer, the VM's in-kernel irqchip and PIT, and each
//! vCPU's CPUID, MSRs, FPU, local APIC and (for the boot CPU) entry registers.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::os;
use crate::arch::x86_64::boot::BootProtocol;
use crate::arch::x86_64::cpuid::{self, CpuidEntry};
use crate::arch::x86_64::gdt::{
    self, Segment, CODE_INDEX, DATA_INDEX, LONG_MODE_GDT, PVH_GDT, TSS_INDEX,
};
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::msr;
use crate::hypervisor::{HypervisorError, Result, VcpuBoot};

/// What the host's KVM supports that every vCPU is set up from.
#[derive(Debug, Clone)]
pub struct HostCaps {
    supported_cpuid: Vec<CpuidEntry>,
    msr_index_list: Vec<u32>,
    tsc_deadline: bool,
}

/// Per-VM state (none beyond the host's capabilities on x86_64).
#[derive(Debug)]
pub struct VmState {
    host: HostCaps,
}

/// Checks the x86-only capabilities and reads the supported CPUID and MSRs.
pub fn probe(kvm: &Kvm) -> Result<HostCaps> {
    for (cap, name) in [
        (Cap::Irqchip, "in-kernel irqchip"),
        (Cap::SetTssAddr, "TSS address"),
        (Cap::Pit2, "PIT2"),
        (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(HypervisorError::MissingCapability(name));
        }
    }
    // The answers cannot change while the process lives, and KVM_GET_SUPPORTED_CPUID costs
    // ~0.45 ms on this project's machine: a process that restores many forks asks once.
    static CACHE: std::sync::OnceLock<HostCaps> = std::sync::OnceLock::new();
    if let Some(caps) = CACHE.get() {
        return Ok(caps.clone());
    }
    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(os("KVM_GET_SUPPORTED_CPUID"))?
        .as_slice()
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect();
    let msr_index_list = kvm
        .get_msr_index_list()
        .map_err(os("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec();
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let caps = HostCaps {
        supported_cpuid,
        msr_index_list,
        tsc_deadline,
    };
    Ok(CACHE.get_or_init(|| caps).clone())
}

/// Wires `evt` to interrupt line `gsi` (the in-kernel irqchip exists from the VM's creation).
pub fn register_irqfd(
    fd: &VmFd,
    _vm: &VmState,
    evt: &std::sync::Arc<vmm_sys_util::eventfd::EventFd>,
    gsi: u32,
) -> Result<()> {
    fd.register_irqfd(evt, gsi).map_err(os("KVM_IRQFD"))
}

/// The TSS and identity-map pages, the in-kernel irqchip (PIC, IOAPIC, local APICs) and PIT.
pub fn setup_vm(_kvm: &Kvm, fd: &VmFd, _cpus: u32, host: &HostCaps) -> Result<VmState> {
    fd.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(os("KVM_SET_TSS_ADDR"))?;
    fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(os("KVM_SET_IDENTITY_MAP_ADDR"))?;
    fd.create_irq_chip().map_err(os("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).map_err(os("KVM_CREATE_PIT2"))?;
    Ok(VmState { host: host.clone() })
}

/// CPUID, MSRs, FPU and local APIC of a new vCPU, and the boot CPU's entry registers.
pub fn setup_vcpu(_vm_fd: &VmFd, vm: &VmState, fd: &VcpuFd, boot: &VcpuBoot) -> Result<()> {
    let host = &vm.host;
    let index = boot.index;
    let err = |what: &str, e: vmm_sys_util::errno::Error| HypervisorError::Vcpu {
        index,
        msg: format!("{what}: {e}"),
    };
    let entries: Vec<kvm_cpuid_entry2> =
        cpuid::for_vcpu(&host.supported_cpuid, index, boot.count, host.tsc_deadline)
            .into_iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
    let cpuid = CpuId::from_entries(&entries).map_err(|e| HypervisorError::Vcpu {
        index,
        msg: format!("CPUID table: {e:?}"),
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(|e| err("KVM_SET_CPUID2", e))?;

    let msrs: Vec<kvm_msr_entry> = msr::boot_msrs(&host.msr_index_list)
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let list = Msrs::from_entries(&msrs).map_err(|e| HypervisorError::Vcpu {
        index,
        msg: format!("MSR list: {e:?}"),
    })?;
    let set = fd.set_msrs(&list).map_err(|e| err("KVM_SET_MSRS", e))?;
    if set != msrs.len() {
        let failed = msrs.get(set).map(|m| m.index).unwrap_or_default();
        return Err(HypervisorError::Vcpu {
            index,
            msg: format!("KVM_SET_MSRS refused MSR {failed:#x}"),
        });
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(|e| err("KVM_SET_FPU", e))?;

    // LINT0 delivers the PIC's ExtINT, LINT1 NMI, as a PC's BIOS would leave them.
    let mut lapic = fd.get_lapic().map_err(|e| err("KVM_GET_LAPIC", e))?;
    set_lvt(&mut lapic.regs, 0x350, 0x7);
    set_lvt(&mut lapic.regs, 0x360, 0x4);
    fd.set_lapic(&lapic).map_err(|e| err("KVM_SET_LAPIC", e))?;

    if let Some(entry) = boot.entry {
        set_boot_registers(fd, entry).map_err(|e| err("setting boot registers", e))?;
    }

    Ok(())
}

/// Nothing to do once every vCPU exists (the irqchip is ready from the start).
pub fn first_run_hook(_vm: &VmState) -> Option<super::FirstRun> {
    None
}

/// Sets the delivery mode of the local APIC LVT register at `offset`.
fn set_lvt(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

fn kvm_seg(s: Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: (!s.present).into(),
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn set_boot_registers(
    fd: &VcpuFd,
    entry: BootProtocol,
) -> std::result::Result<(), vmm_sys_util::errno::Error> {
    let mut sregs = fd.get_sregs()?;
    let (table, regs) = match entry {
        BootProtocol::Pvh { entry } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            (
                PVH_GDT,
                kvm_regs {
                    rflags: 2,
                    rip: entry,
                    rbx: PVH_INFO_START,
                    ..Default::default()
                },
            )
        }
        BootProtocol::Linux64 { entry } => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            (
                LONG_MODE_GDT,
                kvm_regs {
                    rflags: 2,
                    rip: entry,
                    rsp: BOOT_STACK_POINTER,
                    rbp: BOOT_STACK_POINTER,
                    rsi: ZERO_PAGE_START,
                    ..Default::default()
                },
            )
        }
    };
    let code = kvm_seg(gdt::segment_from_entry(
        table[CODE_INDEX as usize],
        CODE_INDEX,
    ));
    let data = kvm_seg(gdt::segment_from_entry(
        table[DATA_INDEX as usize],
        DATA_INDEX,
    ));
    let tss = kvm_seg(gdt::segment_from_entry(
        table[TSS_INDEX as usize],
        TSS_INDEX,
    ));
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    fd.set_sregs(&sregs)?;
    fd.set_regs(&regs)
}

// ---- snapshots ----

/// MSR_IA32_TSC and MSR_IA32_TSC_DEADLINE: the deadline is meaningful only against the TSC,
/// so the TSC is restored first and the deadline last.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs per KVM_GET_MSRS/KVM_SET_MSRS call.
const MSR_CHUNK: usize = 64;

/// Everything KVM holds for one x86_64 vCPU, enough to continue it in another VM on a host
/// with the same CPU features. Restored in field order.
#[derive(Serialize, Deserialize)]
pub struct VcpuSnapshot {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest TSC's frequency, where KVM reports one.
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuSnapshot")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .field("tsc_khz", &self.tsc_khz)
            .finish_non_exhaustive()
    }
}

/// The VM's in-kernel devices: both PICs, the IOAPIC, the PIT and kvmclock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSnapshot")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

/// The saveable MSRs KVM lists, TSC first and the TSC deadline last.
fn msrs_to_save(list: &[u32]) -> Vec<u32> {
    let mut v: Vec<u32> = list
        .iter()
        .copied()
        .filter(|&m| m != MSR_IA32_TSC && m != MSR_IA32_TSC_DEADLINE)
        .collect();
    if list.contains(&MSR_IA32_TSC) {
        v.insert(0, MSR_IA32_TSC);
    }
    if list.contains(&MSR_IA32_TSC_DEADLINE) {
        v.push(MSR_IA32_TSC_DEADLINE);
    }
    v
}

/// Reads every MSR in `indices` that KVM lets us read; an MSR KVM lists but refuses (a
/// feature this CPU lacks) is left out, as it would be refused on restore too.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let n = rest.len().min(MSR_CHUNK);
        let entries: Vec<kvm_msr_entry> = rest[..n]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| HypervisorError::Vcpu {
            index: 0,
            msg: format!("MSR list: {e:?}"),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(os("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read.min(n)]);
        // KVM stops at the first MSR it refuses: skip that one and go on.
        rest = &rest[(read + 1).min(n)..];
        if read >= n {
            continue;
        }
        tracing::debug!(
            "MSR {:#x} is listed but not readable; not saved",
            entries[read].index
        );
    }
    Ok(out)
}

/// What saving a vCPU needs from the VM: the MSRs to save, in restore order.
pub fn vcpu_ctx(vm: &VmState) -> Vec<u32> {
    msrs_to_save(&vm.host.msr_index_list)
}

/// Saves a vCPU that is not running (its thread is parked between exits).
pub fn save_vcpu(fd: &VcpuFd, msrs: &[u32]) -> Result<VcpuSnapshot> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(os("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    Ok(VcpuSnapshot {
        cpuid,
        mp_state: fd.get_mp_state().map_err(os("KVM_GET_MP_STATE"))?,
        regs: fd.get_regs().map_err(os("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(os("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(os("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(os("KVM_GET_XCRS"))?,
        debug_regs: fd.get_debug_regs().map_err(os("KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(os("KVM_GET_LAPIC"))?,
        msrs: read_msrs(fd, msrs)?,
        // Last: reading the other state must not change the pending events it holds.
        vcpu_events: fd.get_vcpu_events().map_err(os("KVM_GET_VCPU_EVENTS"))?,
        tsc_khz: fd.get_tsc_khz().ok().filter(|&k| k > 0),
    })
}

/// Puts `s` into a freshly created vCPU (before its first run).
/// Feature registers of CPUID a guest may rely on: (leaf, subleaf, register, bits that only
/// mirror guest state and are not features: OSXSAVE and OSPKE).
const FEATURE_REGS: [(u32, u32, char, u32); 9] = [
    (1, 0, 'c', 1 << 27),
    (1, 0, 'd', 0),
    (7, 0, 'b', 0),
    (7, 0, 'c', 1 << 4),
    (7, 0, 'd', 0),
    (7, 1, 'a', 0),
    (0xd, 0, 'a', 0),
    (0x8000_0001, 0, 'c', 0),
    (0x8000_0001, 0, 'd', 0),
];

/// Whether a vCPU with CPUID `here` (what this host gives a new vCPU) can run a guest that saw
/// `saved`: every feature bit the guest was shown must be on here too, else the restored guest
/// would fault on the first instruction that uses it.
pub fn check_cpuid(
    saved: &[kvm_cpuid_entry2],
    here: &[kvm_cpuid_entry2],
) -> std::result::Result<(), String> {
    let reg = |t: &[kvm_cpuid_entry2], leaf: u32, sub: u32, r: char| {
        t.iter()
            .find(|e| e.function == leaf && e.index == sub)
            .map(|e| match r {
                'a' => e.eax,
                'b' => e.ebx,
                'c' => e.ecx,
                _ => e.edx,
            })
            .unwrap_or(0)
    };
    for (leaf, sub, r, not_features) in FEATURE_REGS {
        let missing = reg(saved, leaf, sub, r) & !not_features & !reg(here, leaf, sub, r);
        if missing != 0 {
            return Err(format!(
                "the snapshot's guest uses CPU features this host lacks (CPUID leaf {leaf:#x}.{sub} E{}X bits {missing:#x}): restore it on a host with the same CPU",
                r.to_ascii_uppercase()
            ));
        }
    }
    Ok(())
}

pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuSnapshot) -> Result<()> {
    let here = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(os("KVM_GET_CPUID2"))?;
    check_cpuid(&s.cpuid, here.as_slice())
        .map_err(|msg| HypervisorError::Vcpu { index: 0, msg })?;
    if let Some(khz) = s.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz).map_err(os("KVM_SET_TSC_KHZ"))?;
        }
    }
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| HypervisorError::Vcpu {
        index: 0,
        msg: format!("the snapshot's CPUID table: {e:?}"),
    })?;
    fd.set_cpuid2(&cpuid).map_err(os("KVM_SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(os("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(os("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(os("KVM_SET_SREGS"))?;
    // SAFETY: a legacy 4 KiB XSAVE area, the size KVM_SET_XSAVE reads.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(os("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(os("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debug_regs)
        .map_err(os("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(os("KVM_SET_LAPIC"))?;
    for chunk in s.msrs.chunks(MSR_CHUNK) {
        let msrs = Msrs::from_entries(chunk).map_err(|e| HypervisorError::Vcpu {
            index: 0,
            msg: format!("MSR list: {e:?}"),
        })?;
        let set = fd.set_msrs(&msrs).map_err(os("KVM_SET_MSRS"))?;
        if set != chunk.len() {
            return Err(HypervisorError::Vcpu {
                index: 0,
                msg: format!(
                    "this host's KVM refused MSR {:#x} of the snapshot: restore on a host with the same CPU",
                    chunk[set].index
                ),
            });
        }
    }
    fd.set_vcpu_events(&s.vcpu_events)
        .map_err(os("KVM_SET_VCPU_EVENTS"))
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut c).map_err(os("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

/// Saves the VM's in-kernel devices (every vCPU parked).
pub fn save_vm(fd: &VmFd) -> Result<VmSnapshot> {
    let mut clock = fd.get_clock().map_err(os("KVM_GET_CLOCK"))?;
    // Only the time itself is restored: the flags say what KVM_GET_CLOCK filled in.
    clock.flags = 0;
    Ok(VmSnapshot {
        pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(os("KVM_GET_PIT2"))?,
        clock,
    })
}

/// Puts `s` into a freshly created VM (its irqchip and PIT exist, no vCPU has run).
pub fn restore_vm(fd: &VmFd, s: &VmSnapshot) -> Result<()> {
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        fd.set_irqchip(chip).map_err(os("KVM_SET_IRQCHIP"))?;
    }
    fd.set_pit2(&s.pit).map_err(os("KVM_SET_PIT2"))?;
    fd.set_clock(&s.clock).map_err(os("KVM_SET_CLOCK"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_delivery_mode() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[0x350] = 0x10;
        regs[0x351] = 0x07; // mode bits set, must be replaced
        regs[0x352] = 0x01; // mask bit 16 kept
        set_lvt(&mut regs, 0x350, 0x4);
        assert_eq!(
            (regs[0x350] as u8, regs[0x351] as u8, regs[0x352] as u8),
            (0x10, 0x04, 0x01)
        );
    }

    #[test]
    fn a_snapshot_needing_features_this_host_lacks_is_refused() {
        let e = |function, index, ebx, ecx| kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            ..Default::default()
        };
        let here = [e(1, 0, 0, 0b1011), e(7, 0, 0b110, 0)];
        // The same or fewer features: fine. OSXSAVE (leaf 1 ECX bit 27) only mirrors CR4.
        assert!(check_cpuid(&here, &here).is_ok());
        assert!(check_cpuid(&[e(1, 0, 0, 0b1 | 1 << 27), e(7, 0, 0b100, 0)], &here).is_ok());
        // Leaf 1 EBX is APIC ids and counts, not features.
        assert!(check_cpuid(&[e(1, 0, 0xffff_ffff, 0)], &here).is_ok());
        let err = check_cpuid(&[e(7, 0, 0b1110, 0)], &here).unwrap_err();
        assert!(err.contains("leaf 0x7.0 EBX bits 0x8"), "{err}");
        assert!(check_cpuid(&[e(0x8000_0001, 0, 0, 1)], &here).is_err());
    }
}
