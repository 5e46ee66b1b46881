//! Safe wrappers over Hypervisor.framework: the process's one VM, vCPUs bound to the threads that
//! made them, and the in-kernel GIC of macOS 15 where there is one. Every framework failure comes
//! back as an [`HvError`]; nothing here panics on one.

use std::marker::PhantomData;
use std::os::raw::c_void;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{check, code, HvError, RawExit};
use crate::exits::{RegError, SysReg, VcpuRegs};
use crate::ffi;

pub use crate::ffi::{
    HV_MEMORY_EXEC as MEM_EXEC, HV_MEMORY_READ as MEM_READ, HV_MEMORY_WRITE as MEM_WRITE,
};

/// Set while this process has a VM: the framework allows one per process.
static VM_EXISTS: AtomicBool = AtomicBool::new(false);

/// An OS object the framework handed us (a configuration), released when dropped.
struct OsObject(*mut c_void);

impl Drop for OsObject {
    fn drop(&mut self) {
        // SAFETY: the pointer is a non-null object returned retained by a *_config_create call,
        // and this is its only release.
        unsafe { ffi::os_release(self.0) }
    }
}

/// The process's VM. Hypervisor.framework has one VM per process (`hv_vm_create` and
/// `hv_vm_destroy` take no handle), so a second `Vm::new` while one lives fails with
/// [`HvReason::Exists`](crate::error::HvReason::Exists). vCPUs keep it alive through an `Arc`;
/// dropping the last reference destroys it.
#[derive(Debug)]
pub struct Vm {
    _private: (),
}

impl Vm {
    /// Creates the VM. `ipa_bits` widens the guest physical address space past the framework's
    /// default (36 bits, 64 GiB) up to [`Vm::max_ipa_bits`]; None keeps the default.
    pub fn new(ipa_bits: Option<u32>) -> Result<Vm, HvError> {
        if VM_EXISTS.swap(true, Ordering::AcqRel) {
            return Err(HvError::new("hv_vm_create", code::EXISTS));
        }
        match create_vm(ipa_bits) {
            Ok(()) => Ok(Vm { _private: () }),
            Err(e) => {
                VM_EXISTS.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    /// The widest guest physical address this host supports, in bits.
    pub fn max_ipa_bits() -> Result<u32, HvError> {
        let mut bits = 0;
        // SAFETY: `bits` is valid for a write of a u32.
        let ret = unsafe { ffi::hv_vm_config_get_max_ipa_size(&mut bits) };
        check("hv_vm_config_get_max_ipa_size", ret).map(|()| bits)
    }

    /// The guest physical address width a VM gets without `ipa_bits`.
    pub fn default_ipa_bits() -> Result<u32, HvError> {
        let mut bits = 0;
        // SAFETY: `bits` is valid for a write of a u32.
        let ret = unsafe { ffi::hv_vm_config_get_default_ipa_size(&mut bits) };
        check("hv_vm_config_get_default_ipa_size", ret).map(|()| bits)
    }

    /// How many vCPUs the framework allows a VM.
    pub fn max_vcpus() -> Result<u32, HvError> {
        let mut n = 0;
        // SAFETY: `n` is valid for a write of a u32.
        let ret = unsafe { ffi::hv_vm_get_max_vcpu_count(&mut n) };
        check("hv_vm_get_max_vcpu_count", ret).map(|()| n)
    }

    /// Maps `size` bytes of host memory at `host` into the guest at `ipa` with `flags`
    /// ([`MEM_READ`] | [`MEM_WRITE`] | [`MEM_EXEC`]). Addresses and size must be multiples of
    /// the host page size (16 KiB) or the framework refuses.
    ///
    /// # Safety
    ///
    /// `host..host + size` must be mapped memory that stays mapped (neither unmapped nor
    /// remapped) until [`Vm::unmap`] removes this range or the VM is destroyed: the guest reads
    /// and writes it behind Rust's back.
    pub unsafe fn map(
        &self,
        host: *mut u8,
        ipa: u64,
        size: usize,
        flags: u64,
    ) -> Result<(), HvError> {
        // SAFETY: the caller keeps the host range mapped for as long as the guest mapping.
        let ret = unsafe { ffi::hv_vm_map(host.cast(), ipa, size, flags) };
        check("hv_vm_map", ret)
    }

    /// Removes a guest mapping; afterwards the host memory behind it is the caller's again.
    /// Safe: the guest merely faults on the range from then on.
    pub fn unmap(&self, ipa: u64, size: usize) -> Result<(), HvError> {
        // SAFETY: takes no host pointers; the framework checks the range.
        let ret = unsafe { ffi::hv_vm_unmap(ipa, size) };
        check("hv_vm_unmap", ret)
    }
}

fn create_vm(ipa_bits: Option<u32>) -> Result<(), HvError> {
    // SAFETY: no arguments; returns a new retained object or null.
    let config = unsafe { ffi::hv_vm_config_create() };
    if config.is_null() {
        return Err(HvError::new("hv_vm_config_create", code::NO_RESOURCES));
    }
    let config = OsObject(config);
    if let Some(bits) = ipa_bits {
        // SAFETY: `config` is a live VM configuration.
        let ret = unsafe { ffi::hv_vm_config_set_ipa_size(config.0, bits) };
        check("hv_vm_config_set_ipa_size", ret)?;
    }
    // SAFETY: `config` is a live VM configuration; the framework takes what it needs from it
    // before returning, so releasing it afterwards is fine.
    let ret = unsafe { ffi::hv_vm_create(config.0) };
    check("hv_vm_create", ret)
}

impl Drop for Vm {
    fn drop(&mut self) {
        // SAFETY: no arguments; every vCPU holds an Arc of this Vm, so none is left.
        let ret = unsafe { ffi::hv_vm_destroy() };
        // If the framework refused, its VM is still there and a new one would fail anyway.
        if ret == code::SUCCESS {
            VM_EXISTS.store(false, Ordering::Release);
        }
    }
}

/// A vCPU. The framework binds it to the thread that created it: every call on it except
/// [`exit_vcpus`] must come from that thread, so it is neither `Send` nor `Sync`.
#[derive(Debug)]
pub struct Vcpu {
    id: ffi::hv_vcpu_t,
    /// The framework's exit record for this vCPU, valid until `hv_vcpu_destroy`.
    exit: *const ffi::hv_vcpu_exit_t,
    /// Destroyed after the vCPU (fields drop after `Drop::drop`).
    _vm: Arc<Vm>,
    _bound_to_thread: PhantomData<*const ()>,
}

impl Vcpu {
    /// Creates a vCPU on the calling thread (one per thread) with the default configuration.
    pub fn new(vm: &Arc<Vm>) -> Result<Vcpu, HvError> {
        let mut id = 0;
        let mut exit = ptr::null();
        // SAFETY: both out-pointers are valid for writes; a null config means the default.
        let ret = unsafe { ffi::hv_vcpu_create(&mut id, &mut exit, ptr::null_mut()) };
        check("hv_vcpu_create", ret)?;
        let vcpu = Vcpu {
            id,
            exit,
            _vm: Arc::clone(vm),
            _bound_to_thread: PhantomData,
        };
        if exit.is_null() {
            // Dropping `vcpu` destroys it again.
            return Err(HvError::new("hv_vcpu_create", code::ERROR));
        }
        Ok(vcpu)
    }

    /// The id other threads pass to [`exit_vcpus`] to kick this vCPU out of `run`.
    pub fn handle(&self) -> u64 {
        self.id
    }

    /// Runs the guest until the next exit.
    pub fn run(&mut self) -> Result<RawExit, HvError> {
        // SAFETY: `id` is a live vCPU of this thread (Vcpu is !Send).
        let ret = unsafe { ffi::hv_vcpu_run(self.id) };
        check("hv_vcpu_run", ret)?;
        // SAFETY: `exit` is non-null and valid until hv_vcpu_destroy (in Drop); only
        // hv_vcpu_run writes it, on this thread, and it has returned.
        let e = unsafe { self.exit.read() };
        Ok(RawExit::from_record(
            e.reason,
            e.exception.syndrome,
            e.exception.virtual_address,
            e.exception.physical_address,
        ))
    }

    /// The IRQ input for the next run. The framework clears it whenever `run` returns, so it
    /// must be set again before every run while the interrupt is pending.
    pub fn set_pending_irq(&mut self, pending: bool) -> Result<(), HvError> {
        // SAFETY: `id` is a live vCPU of this thread.
        let ret = unsafe {
            ffi::hv_vcpu_set_pending_interrupt(self.id, ffi::HV_INTERRUPT_TYPE_IRQ, pending)
        };
        check("hv_vcpu_set_pending_interrupt", ret)
    }

    /// While masked the vCPU does not exit when its virtual timer fires; the framework masks it
    /// itself on a VtimerActivated exit, and the VMM unmasks once the guest has handled it.
    pub fn set_vtimer_mask(&mut self, masked: bool) -> Result<(), HvError> {
        // SAFETY: `id` is a live vCPU of this thread.
        let ret = unsafe { ffi::hv_vcpu_set_vtimer_mask(self.id, masked) };
        check("hv_vcpu_set_vtimer_mask", ret)
    }

    pub fn vtimer_mask(&self) -> Result<bool, HvError> {
        let mut masked = false;
        // SAFETY: `id` is a live vCPU of this thread; `masked` is valid for a write.
        let ret = unsafe { ffi::hv_vcpu_get_vtimer_mask(self.id, &mut masked) };
        check("hv_vcpu_get_vtimer_mask", ret).map(|()| masked)
    }

    /// What the guest's virtual counter lags the host's by (CNTVOFF).
    pub fn vtimer_offset(&self) -> Result<u64, HvError> {
        let mut offset = 0;
        // SAFETY: `id` is a live vCPU of this thread; `offset` is valid for a write.
        let ret = unsafe { ffi::hv_vcpu_get_vtimer_offset(self.id, &mut offset) };
        check("hv_vcpu_get_vtimer_offset", ret).map(|()| offset)
    }

    pub fn set_vtimer_offset(&mut self, offset: u64) -> Result<(), HvError> {
        // SAFETY: `id` is a live vCPU of this thread.
        let ret = unsafe { ffi::hv_vcpu_set_vtimer_offset(self.id, offset) };
        check("hv_vcpu_set_vtimer_offset", ret)
    }

    /// The guest's CNTVCT_EL0 now: the host counter minus this vCPU's offset (as QEMU does).
    pub fn virtual_count(&self) -> Result<u64, HvError> {
        let offset = self.vtimer_offset()?;
        // SAFETY: no arguments, no preconditions.
        let now = unsafe { ffi::mach_absolute_time() };
        Ok(now.wrapping_sub(offset))
    }

    /// A system register by its `hv_sys_reg_t` encoding (`ffi::HV_SYS_REG_*`).
    pub fn sys_reg(&self, reg: u16) -> Result<u64, HvError> {
        let mut v = 0;
        // SAFETY: `id` is a live vCPU of this thread; `v` is valid for a write.
        let ret = unsafe { ffi::hv_vcpu_get_sys_reg(self.id, reg, &mut v) };
        check("hv_vcpu_get_sys_reg", ret).map(|()| v)
    }

    pub fn set_sys_reg(&mut self, reg: u16, value: u64) -> Result<(), HvError> {
        // SAFETY: `id` is a live vCPU of this thread.
        let ret = unsafe { ffi::hv_vcpu_set_sys_reg(self.id, reg, value) };
        check("hv_vcpu_set_sys_reg", ret)
    }

    /// A general register by its `hv_reg_t` id (`ffi::HV_REG_*`).
    pub fn reg(&self, reg: u32) -> Result<u64, HvError> {
        let mut v = 0;
        // SAFETY: `id` is a live vCPU of this thread; `v` is valid for a write.
        let ret = unsafe { ffi::hv_vcpu_get_reg(self.id, reg, &mut v) };
        check("hv_vcpu_get_reg", ret).map(|()| v)
    }

    pub fn set_reg(&mut self, reg: u32, value: u64) -> Result<(), HvError> {
        // SAFETY: `id` is a live vCPU of this thread.
        let ret = unsafe { ffi::hv_vcpu_set_reg(self.id, reg, value) };
        check("hv_vcpu_set_reg", ret)
    }

    /// Whether guest debug exceptions (BRK, breakpoints, single step) exit to the VMM instead
    /// of going to the guest's own handlers.
    pub fn set_trap_debug_exceptions(&mut self, trap: bool) -> Result<(), HvError> {
        // SAFETY: `id` is a live vCPU of this thread.
        let ret = unsafe { ffi::hv_vcpu_set_trap_debug_exceptions(self.id, trap) };
        check("hv_vcpu_set_trap_debug_exceptions", ret)
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        // SAFETY: `id` is a live vCPU of this thread (Vcpu is !Send, so Drop runs here), and
        // `exit` is not read after this. A failure cannot be acted on while dropping.
        let _ = unsafe { ffi::hv_vcpu_destroy(self.id) };
    }
}

/// Kicks the vCPUs with these handles out of `run` (or makes their next `run` return at once)
/// with a Canceled exit. The one call other threads may make.
pub fn exit_vcpus(handles: &[u64]) -> Result<(), HvError> {
    if handles.is_empty() {
        return Ok(());
    }
    let Ok(count) = u32::try_from(handles.len()) else {
        return Err(HvError::new("hv_vcpus_exit", code::BAD_ARGUMENT));
    };
    // SAFETY: `handles` is valid for reads of `count` ids; the framework checks each id.
    let ret = unsafe { ffi::hv_vcpus_exit(handles.as_ptr(), count) };
    check("hv_vcpus_exit", ret)
}

/// The system counter's frequency in Hz (CNTFRQ_EL0; 24 MHz on Apple silicon so far).
pub fn counter_frequency() -> u64 {
    let freq: u64;
    // SAFETY: reads a register macOS lets user space read (mach_absolute_time relies on the
    // same EL0 counter access); touches no memory.
    unsafe {
        std::arch::asm!(
            "mrs {}, cntfrq_el0",
            out(reg) freq,
            options(nomem, nostack, preserves_flags)
        );
    }
    freq
}

/// The `hv_sys_reg_t` of each register the exit handling uses.
fn sys_reg_id(r: SysReg) -> u16 {
    match r {
        SysReg::ElrEl1 => ffi::HV_SYS_REG_ELR_EL1,
        SysReg::SpsrEl1 => ffi::HV_SYS_REG_SPSR_EL1,
        SysReg::EsrEl1 => ffi::HV_SYS_REG_ESR_EL1,
        SysReg::FarEl1 => ffi::HV_SYS_REG_FAR_EL1,
        SysReg::VbarEl1 => ffi::HV_SYS_REG_VBAR_EL1,
        SysReg::CntvCtlEl0 => ffi::HV_SYS_REG_CNTV_CTL_EL0,
        SysReg::CntvCvalEl0 => ffi::HV_SYS_REG_CNTV_CVAL_EL0,
    }
}

fn x_id(n: u8) -> Result<u32, RegError> {
    if n <= 30 {
        Ok(ffi::HV_REG_X0 + u32::from(n))
    } else {
        Err(RegError(format!("no general register x{n}")))
    }
}

impl VcpuRegs for Vcpu {
    fn x(&self, n: u8) -> Result<u64, RegError> {
        Ok(self.reg(x_id(n)?)?)
    }

    fn set_x(&mut self, n: u8, v: u64) -> Result<(), RegError> {
        Ok(self.set_reg(x_id(n)?, v)?)
    }

    fn pc(&self) -> Result<u64, RegError> {
        Ok(self.reg(ffi::HV_REG_PC)?)
    }

    fn set_pc(&mut self, v: u64) -> Result<(), RegError> {
        Ok(self.set_reg(ffi::HV_REG_PC, v)?)
    }

    fn cpsr(&self) -> Result<u64, RegError> {
        Ok(self.reg(ffi::HV_REG_CPSR)?)
    }

    fn set_cpsr(&mut self, v: u64) -> Result<(), RegError> {
        Ok(self.set_reg(ffi::HV_REG_CPSR, v)?)
    }

    fn sys(&self, r: SysReg) -> Result<u64, RegError> {
        Ok(self.sys_reg(sys_reg_id(r))?)
    }

    fn set_sys(&mut self, r: SysReg, v: u64) -> Result<(), RegError> {
        Ok(self.set_sys_reg(sys_reg_id(r), v)?)
    }
}

/// What a GIC layout needs to know before the GIC exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GicParams {
    pub dist_size: u64,
    pub dist_align: u64,
    /// One vCPU's redistributor (two 64 KiB frames).
    pub redist_size: u64,
    /// The redistributors of every vCPU the framework supports, contiguous.
    pub redist_region_size: u64,
    pub redist_align: u64,
    /// The first SPI's INTID and how many there are.
    pub spi_base: u32,
    pub spi_count: u32,
}

/// The framework's in-kernel GICv3 (macOS 15+). With it the framework delivers the virtual
/// timer and handles the distributor, redistributors and ICC registers itself.
#[derive(Debug)]
pub struct Gic {
    api: &'static ffi::GicApi,
}

fn gic_size(api_fn: ffi::GicGetSizeFn, call: &'static str) -> Result<u64, HvError> {
    let mut size = 0usize;
    // SAFETY: `api_fn` is one of the framework's size getters; `size` is valid for a write.
    let ret = unsafe { api_fn(&mut size) };
    check(call, ret).map(|()| size as u64)
}

impl Gic {
    /// The sizes and ranges for laying the GIC out, or None before macOS 15.
    pub fn params() -> Result<Option<GicParams>, HvError> {
        let Some(api) = ffi::gic_api() else {
            return Ok(None);
        };
        let (mut spi_base, mut spi_count) = (0, 0);
        // SAFETY: both out-pointers are valid for writes.
        let ret = unsafe { (api.hv_gic_get_spi_interrupt_range)(&mut spi_base, &mut spi_count) };
        check("hv_gic_get_spi_interrupt_range", ret)?;
        Ok(Some(GicParams {
            dist_size: gic_size(
                api.hv_gic_get_distributor_size,
                "hv_gic_get_distributor_size",
            )?,
            dist_align: gic_size(
                api.hv_gic_get_distributor_base_alignment,
                "hv_gic_get_distributor_base_alignment",
            )?,
            redist_size: gic_size(
                api.hv_gic_get_redistributor_size,
                "hv_gic_get_redistributor_size",
            )?,
            redist_region_size: gic_size(
                api.hv_gic_get_redistributor_region_size,
                "hv_gic_get_redistributor_region_size",
            )?,
            redist_align: gic_size(
                api.hv_gic_get_redistributor_base_alignment,
                "hv_gic_get_redistributor_base_alignment",
            )?,
            spi_base,
            spi_count,
        }))
    }

    /// Creates the GIC with its distributor and redistributor region at these guest physical
    /// addresses, or returns None before macOS 15. Call after [`Vm::new`] and before the first
    /// [`Vcpu::new`]; the GIC lives as long as the VM.
    pub fn create(dist_base: u64, redist_base: u64) -> Result<Option<Gic>, HvError> {
        let Some(api) = ffi::gic_api() else {
            return Ok(None);
        };
        // SAFETY: no arguments; returns a new retained object or null.
        let config = unsafe { (api.hv_gic_config_create)() };
        if config.is_null() {
            return Err(HvError::new("hv_gic_config_create", code::NO_RESOURCES));
        }
        let config = OsObject(config);
        // SAFETY: `config` is a live GIC configuration.
        let ret = unsafe { (api.hv_gic_config_set_distributor_base)(config.0, dist_base) };
        check("hv_gic_config_set_distributor_base", ret)?;
        // SAFETY: `config` is a live GIC configuration.
        let ret = unsafe { (api.hv_gic_config_set_redistributor_base)(config.0, redist_base) };
        check("hv_gic_config_set_redistributor_base", ret)?;
        // SAFETY: `config` is a live GIC configuration; the framework takes what it needs
        // before returning.
        let ret = unsafe { (api.hv_gic_create)(config.0) };
        check("hv_gic_create", ret)?;
        Ok(Some(Gic { api }))
    }

    /// Drives SPI `intid`'s line: a level interrupt follows `level`; an edge-triggered one
    /// fires on `true` and ignores `false`. Any thread may call it.
    pub fn set_spi(&self, intid: u32, level: bool) -> Result<(), HvError> {
        // SAFETY: plain values; the framework checks the INTID against its SPI range.
        let ret = unsafe { (self.api.hv_gic_set_spi)(intid, level) };
        check("hv_gic_set_spi", ret)
    }

    /// The PPI the framework raises for the EL1 virtual timer (for the device tree).
    pub fn vtimer_intid(&self) -> Result<u32, HvError> {
        let mut intid = 0;
        // SAFETY: `intid` is valid for a write.
        let ret =
            unsafe { (self.api.hv_gic_get_intid)(ffi::HV_GIC_INT_EL1_VIRTUAL_TIMER, &mut intid) };
        check("hv_gic_get_intid", ret).map(|()| intid)
    }
}

/// The portable vCPU loop ([`crate::run`]) drives a framework vCPU through this.
impl crate::run::RunVcpu for Vcpu {
    fn run(&mut self) -> Result<RawExit, RegError> {
        Ok(Vcpu::run(self)?)
    }
    fn set_irq_line(&mut self, level: bool) -> Result<(), RegError> {
        Ok(self.set_pending_irq(level)?)
    }
    fn set_vtimer_mask(&mut self, masked: bool) -> Result<(), RegError> {
        Ok(Vcpu::set_vtimer_mask(self, masked)?)
    }
    fn virtual_count(&self) -> Result<(u64, u64), RegError> {
        Ok((Vcpu::virtual_count(self)?, counter_frequency()))
    }
}
