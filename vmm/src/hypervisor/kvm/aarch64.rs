//! KVM on arm64: the in-kernel GICv3 (created with the VM, initialized once every vCPU
//! exists), vCPUs with PSCI 0.2 (secondaries start powered off until the guest's CPU_ON), and
//! the boot vCPU's entry state (PC at the kernel, x0 the device tree, EL1h with DAIF masked).
//!
//! KVM refuses irqfds (EAGAIN) until the vGIC is initialized, which needs every vCPU to exist;
//! devices get their interrupt lines before that, so their eventfds wait in [`Gic`] and are
//! attached right after the initialization (an event signalled meanwhile is delivered then).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, kvm_vcpu_init,
    KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_REG_ARM64, KVM_REG_ARM_CORE, KVM_REG_SIZE_U64, KVM_VGIC_V3_ADDR_TYPE_DIST,
    KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{Cap, DeviceFd, Kvm, VcpuFd, VmFd};

use super::{os, FirstRun};
use crate::arch::aarch64::layout::{
    GIC_DIST_START, GIC_REDIST_SIZE_PER_CPU, GIC_REDIST_START, MAX_CPUS,
};
use crate::hypervisor::{HypervisorError, Result, VcpuBoot};

/// Interrupt lines the distributor implements: the 32 private ones and 96 SPIs.
const GIC_NR_IRQS: u32 = 128;

/// PSTATE at entry: EL1 with SP_EL1 (EL1h), debug, SError, IRQ and FIQ masked.
const PSTATE_EL1H_DAIF: u64 = 0x3c5;

/// Nothing to remember about the host beyond what each VM asks.
#[derive(Debug, Clone)]
pub struct HostCaps;

/// The VM's vGIC, initialized by the first vCPU to run.
#[derive(Debug)]
pub struct VmState {
    gic: Arc<Gic>,
}

struct Gic {
    fd: DeviceFd,
    /// The VM again (a duplicate descriptor), to attach irqfds from the vCPU that
    /// initializes the GIC.
    vm: VmFd,
    state: Mutex<GicState>,
}

impl std::fmt::Debug for Gic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gic").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct GicState {
    /// `None` until initialized; the error of a failed initialization stays for every vCPU.
    ready: Option<std::result::Result<(), String>>,
    /// Interrupt lines waiting for the initialization: (eventfd, SPI number).
    pending: Vec<(Arc<EventFd>, u32)>,
}

pub fn probe(kvm: &Kvm) -> Result<HostCaps> {
    for (cap, name) in [
        (Cap::ArmPsci02, "PSCI 0.2"),
        (Cap::DeviceCtrl, "device control (the in-kernel GIC)"),
        (Cap::OneReg, "KVM_SET_ONE_REG"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(HypervisorError::MissingCapability(name));
        }
    }
    Ok(HostCaps)
}

fn set_attr(fd: &DeviceFd, what: &'static str, group: u32, attr: u64, addr: u64) -> Result<()> {
    let a = kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr,
    };
    fd.set_device_attr(&a).map_err(os(what))
}

/// Creates the GICv3 and places its distributor and redistributors (the layout's addresses).
pub fn setup_vm(kvm: &Kvm, fd: &VmFd, cpus: u32, _host: &HostCaps) -> Result<VmState> {
    if cpus > MAX_CPUS {
        return Err(HypervisorError::Vcpu {
            index: cpus - 1,
            msg: format!("arm64 guests have at most {MAX_CPUS} vCPUs"),
        });
    }
    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let gic = fd
        .create_device(&mut dev)
        .map_err(os("creating the in-kernel GICv3 (KVM_CREATE_DEVICE)"))?;
    let dist = GIC_DIST_START;
    let redist = GIC_REDIST_START;
    // The kernel reads each address through the pointer while the call runs.
    set_attr(
        &gic,
        "placing the GIC distributor",
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V3_ADDR_TYPE_DIST),
        &dist as *const u64 as u64,
    )?;
    set_attr(
        &gic,
        "placing the GIC redistributors",
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        u64::from(KVM_VGIC_V3_ADDR_TYPE_REDIST),
        &redist as *const u64 as u64,
    )?;
    debug_assert!(GIC_REDIST_START + GIC_REDIST_SIZE_PER_CPU * u64::from(MAX_CPUS) > redist);
    // SAFETY: dup of a descriptor we own; the result is checked before use.
    let dup = unsafe { libc::dup(fd.as_raw_fd()) };
    if dup < 0 {
        return Err(HypervisorError::Os {
            what: "duplicating the VM descriptor",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `dup` is a fresh descriptor of this VM that nothing else owns; the VmFd takes it.
    let vm = unsafe { kvm.create_vmfd_from_rawfd(dup) }.map_err(os("KVM_GET_VCPU_MMAP_SIZE"))?;
    Ok(VmState {
        gic: Arc::new(Gic {
            fd: gic,
            vm,
            state: Mutex::new(GicState::default()),
        }),
    })
}

/// Wires `evt` to SPI `gsi`: now if the vGIC is initialized, else once it is.
pub fn register_irqfd(fd: &VmFd, vm: &VmState, evt: &Arc<EventFd>, gsi: u32) -> Result<()> {
    let mut st = msb_devices::bus::lock(&vm.gic.state);
    match &st.ready {
        Some(Ok(())) => fd.register_irqfd(evt, gsi).map_err(os("KVM_IRQFD")),
        Some(Err(msg)) => Err(HypervisorError::Vcpu {
            index: 0,
            msg: msg.clone(),
        }),
        None => {
            st.pending.push((evt.clone(), gsi));
            Ok(())
        }
    }
}

/// The id of a core register (`struct kvm_regs` field at byte `offset`) for KVM_SET_ONE_REG.
fn core_reg(offset: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | u64::from(KVM_REG_ARM_CORE) | (offset / 4)
}
/// Offsets in `struct user_pt_regs`: x0..x30, sp, pc, pstate.
const REG_X0: u64 = 0;
const REG_PC: u64 = 32 * 8;
const REG_PSTATE: u64 = 33 * 8;

/// Initializes the vCPU as the host's preferred CPU type with PSCI 0.2; the boot vCPU gets
/// its entry state, the others start powered off.
pub fn setup_vcpu(vm_fd: &VmFd, _vm: &VmState, fd: &VcpuFd, boot: &VcpuBoot) -> Result<()> {
    let index = boot.index;
    let err = |what: &str, e: vmm_sys_util::errno::Error| HypervisorError::Vcpu {
        index,
        msg: format!("{what}: {e}"),
    };
    let mut kvi = kvm_vcpu_init::default();
    vm_fd
        .get_preferred_target(&mut kvi)
        .map_err(|e| err("KVM_ARM_PREFERRED_TARGET", e))?;
    kvi.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    match boot.entry {
        Some(entry) => {
            fd.vcpu_init(&kvi)
                .map_err(|e| err("KVM_ARM_VCPU_INIT", e))?;
            for (reg, value) in [
                (REG_PSTATE, PSTATE_EL1H_DAIF),
                (REG_PC, entry.pc),
                (REG_X0, entry.fdt),
            ] {
                fd.set_one_reg(core_reg(reg), &value.to_le_bytes())
                    .map_err(|e| err("KVM_SET_ONE_REG", e))?;
            }
        }
        None => {
            kvi.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
            fd.vcpu_init(&kvi)
                .map_err(|e| err("KVM_ARM_VCPU_INIT", e))?;
        }
    }
    Ok(())
}

/// Initializes the vGIC before the first KVM_RUN (all vCPUs exist by then: they start
/// together).
pub fn first_run_hook(vm: &VmState) -> Option<FirstRun> {
    let gic = vm.gic.clone();
    Some(Arc::new(move || {
        let mut st = msb_devices::bus::lock(&gic.state);
        let GicState { ready, pending } = &mut *st;
        let r = ready.get_or_insert_with(|| {
            let nr = GIC_NR_IRQS;
            set_attr(
                &gic.fd,
                "setting the GIC's interrupt count",
                KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
                0,
                &nr as *const u32 as u64,
            )
            .and_then(|()| {
                set_attr(
                    &gic.fd,
                    "initializing the GIC",
                    KVM_DEV_ARM_VGIC_GRP_CTRL,
                    u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
                    0,
                )
            })
            .and_then(|()| {
                pending.drain(..).try_for_each(|(evt, gsi)| {
                    gic.vm
                        .register_irqfd(&evt, gsi)
                        .map_err(os("KVM_IRQFD (after the GIC's initialization)"))
                })
            })
            .map_err(|e| e.to_string())
        });
        r.clone()
            .map_err(|msg| HypervisorError::Vcpu { index: 0, msg })
    }))
}

/// arm64 vCPU state for snapshots: not written yet (the core registers through
/// KVM_GET_ONE_REG and the vGIC's through its device attributes are the work).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VcpuSnapshot {}

/// arm64 VM state for snapshots: not written yet.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmSnapshot {}

const NO_SNAPSHOTS: &str = "snapshots of arm64 VMs (not written yet; x86_64 has them)";

/// Nothing beyond the vCPU's fd.
pub fn vcpu_ctx(_vm: &VmState) {}

pub fn save_vcpu(_fd: &VcpuFd, _ctx: &()) -> Result<VcpuSnapshot> {
    Err(HypervisorError::Unsupported(NO_SNAPSHOTS))
}

pub fn restore_vcpu(_fd: &VcpuFd, _s: &VcpuSnapshot) -> Result<()> {
    Err(HypervisorError::Unsupported(NO_SNAPSHOTS))
}

pub fn save_vm(_fd: &VmFd) -> Result<VmSnapshot> {
    Err(HypervisorError::Unsupported(NO_SNAPSHOTS))
}

pub fn restore_vm(_fd: &VmFd, _s: &VmSnapshot) -> Result<()> {
    Err(HypervisorError::Unsupported(NO_SNAPSHOTS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_register_ids_match_the_kernel_abi() {
        // From arch/arm64/include/uapi/asm/kvm.h: KVM_REG_ARM_CORE_REG(regs.pc).
        assert_eq!(core_reg(REG_PC), 0x6030_0000_0010_0040);
        assert_eq!(core_reg(REG_X0), 0x6030_0000_0010_0000);
        assert_eq!(core_reg(REG_PSTATE), 0x6030_0000_0010_0042);
    }
}
