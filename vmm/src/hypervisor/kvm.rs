//! KVM backend (Linux, x86_64 guests).

use std::os::raw::c_int;
use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_segment,
    kvm_userspace_memory_region, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use msb_devices::Interrupt;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::{HypervisorError, Kicker, Result, Vcpu, VcpuBoot, Vm, VmExit};
use crate::arch::x86_64::boot::BootProtocol;
use crate::arch::x86_64::cpuid::{self, CpuidEntry};
use crate::arch::x86_64::gdt::{
    self, Segment, CODE_INDEX, DATA_INDEX, LONG_MODE_GDT, PVH_GDT, TSS_INDEX,
};
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::msr;

/// Signal used to kick vCPU threads out of KVM_RUN.
fn kick_signal() -> c_int {
    SIGRTMIN()
}

fn os(what: &'static str) -> impl Fn(vmm_sys_util::errno::Error) -> HypervisorError {
    move |e| HypervisorError::Os {
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// An open /dev/kvm and what it supports.
pub struct KvmHypervisor {
    kvm: Kvm,
    supported_cpuid: Vec<CpuidEntry>,
    msr_index_list: Vec<u32>,
    tsc_deadline: bool,
}

impl std::fmt::Debug for KvmHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmHypervisor")
            .field("pvm", &crate::host::is_pvm())
            .finish_non_exhaustive()
    }
}

impl KvmHypervisor {
    /// Opens /dev/kvm; the errors name the fix.
    pub fn open() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::ENOENT | libc::ENXIO | libc::ENODEV => HypervisorError::NoKvm,
            libc::EACCES | libc::EPERM => HypervisorError::KvmPermission,
            _ => os("opening /dev/kvm")(e),
        })?;
        for (cap, name) in [
            (Cap::Irqchip, "in-kernel irqchip"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::UserMemory, "user memory"),
            (Cap::SetTssAddr, "TSS address"),
            (Cap::Pit2, "PIT2"),
            (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
            (Cap::ImmediateExit, "immediate exit"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::MissingCapability(name));
            }
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
        Ok(KvmHypervisor {
            kvm,
            supported_cpuid,
            msr_index_list,
            tsc_deadline,
        })
    }
}

impl super::Hypervisor for KvmHypervisor {
    fn name(&self) -> &'static str {
        if crate::host::is_pvm() {
            "kvm-pvm"
        } else {
            "kvm"
        }
    }

    fn create_vm(&self, cpus: u32) -> Result<Arc<dyn Vm>> {
        let max = self.kvm.get_max_vcpus();
        if cpus as usize > max {
            return Err(HypervisorError::Vcpu {
                index: cpus - 1,
                msg: format!("this host's KVM supports at most {max} vCPUs"),
            });
        }
        let fd = self.kvm.create_vm().map_err(os("KVM_CREATE_VM"))?;
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
        Ok(Arc::new(KvmVm {
            fd,
            supported_cpuid: self.supported_cpuid.clone(),
            msr_index_list: self.msr_index_list.clone(),
            tsc_deadline: self.tsc_deadline,
            irqs: Mutex::new(Vec::new()),
        }))
    }
}

/// A KVM VM.
#[derive(Debug)]
pub struct KvmVm {
    fd: VmFd,
    supported_cpuid: Vec<CpuidEntry>,
    msr_index_list: Vec<u32>,
    tsc_deadline: bool,
    irqs: Mutex<Vec<Arc<EventFd>>>,
}

impl Vm for KvmVm {
    fn map_memory(&self, mem: &GuestMemoryMmap) -> Result<()> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| HypervisorError::Os {
                    what: "guest memory region",
                    source: std::io::Error::from_raw_os_error(libc::EINVAL),
                })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the caller keeps alive for
            // the VM's lifetime (the VM struct holds it); KVM only accesses it while the VM runs.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(os("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    fn create_irq(&self, gsi: u32) -> Result<Arc<dyn Interrupt>> {
        let evt = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|source| HypervisorError::Os {
                what: "eventfd",
                source,
            })?,
        );
        self.fd.register_irqfd(&evt, gsi).map_err(os("KVM_IRQFD"))?;
        msb_devices::bus::lock(&self.irqs).push(evt.clone());
        Ok(evt)
    }

    fn register_ioevent(&self, addr: u64, datamatch: u32, evt: &EventFd) -> Result<()> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(os("KVM_IOEVENTFD"))
    }

    fn create_vcpu(&self, boot: &VcpuBoot) -> Result<Box<dyn Vcpu>> {
        let index = boot.index;
        let err = |what: &str, e: vmm_sys_util::errno::Error| HypervisorError::Vcpu {
            index,
            msg: format!("{what}: {e}"),
        };
        let fd = self
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| err("KVM_CREATE_VCPU", e))?;

        let entries: Vec<kvm_cpuid_entry2> =
            cpuid::for_vcpu(&self.supported_cpuid, index, boot.count, self.tsc_deadline)
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

        let msrs: Vec<kvm_msr_entry> = msr::boot_msrs(&self.msr_index_list)
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
            set_boot_registers(&fd, entry).map_err(|e| err("setting boot registers", e))?;
        }

        let kicker = Arc::new(KvmKicker {
            target: Mutex::new(None),
        });
        let mut vcpu = KvmVcpu {
            fd,
            kicker,
            immediate_exit: std::ptr::null_mut(),
        };
        vcpu.arm_kicker();
        Ok(Box::new(vcpu))
    }
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

/// Where a kick lands: the vCPU thread and its `kvm_run.immediate_exit` byte.
#[derive(Debug)]
struct KickTarget {
    thread: libc::pthread_t,
    immediate_exit: *mut u8,
}

// SAFETY: the pointer is only dereferenced under the mutex in `KvmKicker`, and the vCPU clears
// the target (under the same mutex) before the kvm_run mapping goes away.
unsafe impl Send for KickTarget {}

#[derive(Debug)]
struct KvmKicker {
    target: Mutex<Option<KickTarget>>,
}

impl Kicker for KvmKicker {
    fn kick(&self) {
        let guard = msb_devices::bus::lock(&self.target);
        if let Some(t) = guard.as_ref() {
            // SAFETY: the target is present, so the vCPU (and its kvm_run mapping) is alive and
            // cannot be dropped while we hold the lock. A byte store races benignly with KVM.
            unsafe { std::ptr::write_volatile(t.immediate_exit, 1) };
            // SAFETY: the thread is alive while the target is registered (it unregisters before
            // exiting); the signal has a no-op handler installed by `arm_kicker`.
            unsafe { libc::pthread_kill(t.thread, kick_signal()) };
        }
    }
}

extern "C" fn noop_signal_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// A KVM vCPU, living on its own thread.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    kicker: Arc<KvmKicker>,
    /// `kvm_run.immediate_exit` of `fd`'s mapping, to re-arm KVM_RUN after a kick.
    immediate_exit: *mut u8,
}

impl KvmVcpu {
    fn arm_kicker(&mut self) {
        static HANDLER: Once = Once::new();
        HANDLER.call_once(|| {
            if let Err(e) = register_signal_handler(kick_signal(), noop_signal_handler) {
                tracing::error!("cannot install the vCPU kick signal handler: {e}");
            }
        });
        let immediate_exit = &mut self.fd.get_kvm_run().immediate_exit as *mut u8;
        self.immediate_exit = immediate_exit;
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        *msb_devices::bus::lock(&self.kicker.target) = Some(KickTarget {
            thread,
            immediate_exit,
        });
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // Unregister before the kvm_run mapping is unmapped with `fd`.
        *msb_devices::bus::lock(&self.kicker.target) = None;
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VmExit<'_>> {
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoIn(port, data) => VmExit::IoIn { port, data },
                VcpuExit::IoOut(port, data) => VmExit::IoOut { port, data },
                VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
                VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
                VcpuExit::Shutdown => VmExit::CpuShutdown,
                VcpuExit::Intr => VmExit::Interrupted,
                VcpuExit::SystemEvent(kind, _)
                    if kind == KVM_SYSTEM_EVENT_SHUTDOWN || kind == KVM_SYSTEM_EVENT_RESET =>
                {
                    VmExit::PowerOff
                }
                VcpuExit::SystemEvent(kind, _) => {
                    VmExit::Fatal(format!("guest system event {kind}"))
                }
                VcpuExit::FailEntry(reason, cpu) => VmExit::Fatal(format!(
                    "KVM entry failed (hardware reason {reason:#x}, host CPU {cpu})"
                )),
                VcpuExit::InternalError => VmExit::Fatal(
                    "KVM internal error (the guest ran an instruction KVM cannot emulate)".into(),
                ),
                other => VmExit::Fatal(format!("unexpected KVM exit {other:?}")),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: the pointer targets this vCPU's own kvm_run mapping, alive as long as
                // `self.fd`; KVM_RUN has returned, so nothing else is reading it.
                unsafe { std::ptr::write_volatile(self.immediate_exit, 0) };
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(HypervisorError::Os {
                what: "KVM_RUN",
                source: std::io::Error::from_raw_os_error(e.errno()),
            }),
        }
    }

    fn kicker(&self) -> Arc<dyn Kicker> {
        self.kicker.clone()
    }
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
}
