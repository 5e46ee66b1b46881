//! The Hypervisor.framework calls msb-vmm uses (macOS 13+ on Apple silicon). Thin declarations
//! only; the safe wrappers are in [`crate::hv`].
//!
//! Values follow Apple's SDK headers (`hv_vcpu_types.h`, `hv_vm_config.h`, `hv_gic*.h`,
//! `arm64/hv/hv_kern_types.h`). The macOS 15 GIC calls are not linked: they are looked up at run
//! time ([`gic_api`]) so that one binary still loads on macOS 13 and 14.
#![allow(non_camel_case_types)]

use std::os::raw::{c_char, c_void};
use std::sync::OnceLock;

/// Framework return code; 0 is success (the error codes are in [`crate::error::code`]).
pub type hv_return_t = i32;
/// A vCPU handle.
pub type hv_vcpu_t = u64;
/// Guest physical address.
pub type hv_ipa_t = u64;
/// Memory permission flags.
pub type hv_memory_flags_t = u64;
/// General register identifiers.
pub type hv_reg_t = u32;
/// System register identifiers: the ARM encoding (op0<<14)|(op1<<11)|(CRn<<7)|(CRm<<3)|op2.
pub type hv_sys_reg_t = u16;
/// Why `hv_vcpu_run` returned.
pub type hv_exit_reason_t = u32;
/// Interrupt inputs of a vCPU.
pub type hv_interrupt_type_t = u32;
/// A VM configuration (an OS object; release with `os_release`).
pub type hv_vm_config_t = *mut c_void;
/// A GIC configuration (an OS object; release with `os_release`).
pub type hv_gic_config_t = *mut c_void;
/// Interrupts the framework's GIC reserves.
pub type hv_gic_intid_t = u16;

/// Success.
pub const HV_SUCCESS: hv_return_t = 0;
/// Readable guest memory.
pub const HV_MEMORY_READ: hv_memory_flags_t = 1 << 0;
/// Writable guest memory.
pub const HV_MEMORY_WRITE: hv_memory_flags_t = 1 << 1;
/// Executable guest memory.
pub const HV_MEMORY_EXEC: hv_memory_flags_t = 1 << 2;

/// Exit reason: hv_vcpus_exit was called.
pub const HV_EXIT_REASON_CANCELED: hv_exit_reason_t = 0;
/// Exit reason: an exception (the syndrome is in the exit info).
pub const HV_EXIT_REASON_EXCEPTION: hv_exit_reason_t = 1;
/// Exit reason: the virtual timer fired; the framework has masked it.
pub const HV_EXIT_REASON_VTIMER_ACTIVATED: hv_exit_reason_t = 2;
/// Exit reason: the framework could not tell.
pub const HV_EXIT_REASON_UNKNOWN: hv_exit_reason_t = 3;

/// The IRQ input.
pub const HV_INTERRUPT_TYPE_IRQ: hv_interrupt_type_t = 0;
/// The FIQ input.
pub const HV_INTERRUPT_TYPE_FIQ: hv_interrupt_type_t = 1;

/// X0; Xn is `HV_REG_X0 + n` for n in 0..=30.
pub const HV_REG_X0: hv_reg_t = 0;
pub const HV_REG_PC: hv_reg_t = 31;
pub const HV_REG_FPCR: hv_reg_t = 32;
pub const HV_REG_FPSR: hv_reg_t = 33;
pub const HV_REG_CPSR: hv_reg_t = 34;

pub const HV_SYS_REG_MIDR_EL1: hv_sys_reg_t = 0xc000;
pub const HV_SYS_REG_MPIDR_EL1: hv_sys_reg_t = 0xc005;
pub const HV_SYS_REG_ID_AA64PFR0_EL1: hv_sys_reg_t = 0xc020;
pub const HV_SYS_REG_ID_AA64MMFR0_EL1: hv_sys_reg_t = 0xc038;
pub const HV_SYS_REG_SCTLR_EL1: hv_sys_reg_t = 0xc080;
pub const HV_SYS_REG_CPACR_EL1: hv_sys_reg_t = 0xc082;
pub const HV_SYS_REG_TTBR0_EL1: hv_sys_reg_t = 0xc100;
pub const HV_SYS_REG_TTBR1_EL1: hv_sys_reg_t = 0xc101;
pub const HV_SYS_REG_TCR_EL1: hv_sys_reg_t = 0xc102;
pub const HV_SYS_REG_SPSR_EL1: hv_sys_reg_t = 0xc200;
pub const HV_SYS_REG_ELR_EL1: hv_sys_reg_t = 0xc201;
pub const HV_SYS_REG_SP_EL0: hv_sys_reg_t = 0xc208;
pub const HV_SYS_REG_ESR_EL1: hv_sys_reg_t = 0xc290;
pub const HV_SYS_REG_FAR_EL1: hv_sys_reg_t = 0xc300;
pub const HV_SYS_REG_MAIR_EL1: hv_sys_reg_t = 0xc510;
pub const HV_SYS_REG_VBAR_EL1: hv_sys_reg_t = 0xc600;
pub const HV_SYS_REG_TPIDR_EL1: hv_sys_reg_t = 0xc684;
pub const HV_SYS_REG_CNTKCTL_EL1: hv_sys_reg_t = 0xc708;
pub const HV_SYS_REG_CNTV_CTL_EL0: hv_sys_reg_t = 0xdf19;
pub const HV_SYS_REG_CNTV_CVAL_EL0: hv_sys_reg_t = 0xdf1a;
pub const HV_SYS_REG_SP_EL1: hv_sys_reg_t = 0xe208;

/// Reserved interrupt ids of the macOS 15 GIC, for `hv_gic_get_intid`.
pub const HV_GIC_INT_PERFORMANCE_MONITOR: hv_gic_intid_t = 23;
pub const HV_GIC_INT_MAINTENANCE: hv_gic_intid_t = 25;
pub const HV_GIC_INT_EL2_PHYSICAL_TIMER: hv_gic_intid_t = 26;
pub const HV_GIC_INT_EL1_VIRTUAL_TIMER: hv_gic_intid_t = 27;
pub const HV_GIC_INT_EL1_PHYSICAL_TIMER: hv_gic_intid_t = 30;

/// Exception details of a vCPU exit.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct hv_vcpu_exit_exception_t {
    pub syndrome: u64,
    pub virtual_address: u64,
    pub physical_address: u64,
}

/// A vCPU exit. `reason` stays a plain integer: a value this code does not know must not be
/// undefined behaviour.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct hv_vcpu_exit_t {
    pub reason: hv_exit_reason_t,
    pub exception: hv_vcpu_exit_exception_t,
}

#[link(name = "Hypervisor", kind = "framework")]
extern "C" {
    pub fn hv_vm_config_create() -> hv_vm_config_t;
    pub fn hv_vm_config_get_max_ipa_size(ipa_bit_length: *mut u32) -> hv_return_t;
    pub fn hv_vm_config_get_default_ipa_size(ipa_bit_length: *mut u32) -> hv_return_t;
    pub fn hv_vm_config_set_ipa_size(config: hv_vm_config_t, ipa_bit_length: u32) -> hv_return_t;
    pub fn hv_vm_get_max_vcpu_count(max_vcpu_count: *mut u32) -> hv_return_t;
    pub fn hv_vm_create(config: hv_vm_config_t) -> hv_return_t;
    pub fn hv_vm_destroy() -> hv_return_t;
    pub fn hv_vm_map(
        addr: *mut c_void,
        ipa: hv_ipa_t,
        size: usize,
        flags: hv_memory_flags_t,
    ) -> hv_return_t;
    pub fn hv_vm_unmap(ipa: hv_ipa_t, size: usize) -> hv_return_t;
    pub fn hv_vcpu_create(
        vcpu: *mut hv_vcpu_t,
        exit: *mut *const hv_vcpu_exit_t,
        config: *mut c_void,
    ) -> hv_return_t;
    pub fn hv_vcpu_destroy(vcpu: hv_vcpu_t) -> hv_return_t;
    pub fn hv_vcpu_run(vcpu: hv_vcpu_t) -> hv_return_t;
    pub fn hv_vcpus_exit(vcpus: *const hv_vcpu_t, count: u32) -> hv_return_t;
    pub fn hv_vcpu_get_reg(vcpu: hv_vcpu_t, reg: hv_reg_t, value: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_set_reg(vcpu: hv_vcpu_t, reg: hv_reg_t, value: u64) -> hv_return_t;
    pub fn hv_vcpu_get_sys_reg(vcpu: hv_vcpu_t, reg: hv_sys_reg_t, value: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_set_sys_reg(vcpu: hv_vcpu_t, reg: hv_sys_reg_t, value: u64) -> hv_return_t;
    pub fn hv_vcpu_get_pending_interrupt(
        vcpu: hv_vcpu_t,
        kind: hv_interrupt_type_t,
        pending: *mut bool,
    ) -> hv_return_t;
    pub fn hv_vcpu_set_pending_interrupt(
        vcpu: hv_vcpu_t,
        kind: hv_interrupt_type_t,
        pending: bool,
    ) -> hv_return_t;
    pub fn hv_vcpu_get_vtimer_mask(vcpu: hv_vcpu_t, vtimer_is_masked: *mut bool) -> hv_return_t;
    pub fn hv_vcpu_set_vtimer_mask(vcpu: hv_vcpu_t, vtimer_is_masked: bool) -> hv_return_t;
    pub fn hv_vcpu_get_vtimer_offset(vcpu: hv_vcpu_t, vtimer_offset: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_set_vtimer_offset(vcpu: hv_vcpu_t, vtimer_offset: u64) -> hv_return_t;
    pub fn hv_vcpu_set_trap_debug_exceptions(vcpu: hv_vcpu_t, value: bool) -> hv_return_t;
    pub fn hv_vcpu_set_trap_debug_reg_accesses(vcpu: hv_vcpu_t, value: bool) -> hv_return_t;
}

// libSystem, which every macOS binary links.
extern "C" {
    /// Releases an OS object such as a VM or GIC configuration.
    pub fn os_release(object: *mut c_void);
    /// The host's count of the system counter; a guest's CNTVCT_EL0 is this minus the vCPU's
    /// virtual timer offset.
    pub fn mach_absolute_time() -> u64;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

/// `RTLD_DEFAULT` of `<dlfcn.h>` on macOS: search every image loaded in the process.
fn rtld_default() -> *mut c_void {
    std::ptr::without_provenance_mut(-2isize as usize)
}

pub type GicConfigCreateFn = unsafe extern "C" fn() -> hv_gic_config_t;
pub type GicConfigSetBaseFn =
    unsafe extern "C" fn(config: hv_gic_config_t, base: hv_ipa_t) -> hv_return_t;
pub type GicCreateFn = unsafe extern "C" fn(config: hv_gic_config_t) -> hv_return_t;
pub type GicSetSpiFn = unsafe extern "C" fn(intid: u32, level: bool) -> hv_return_t;
/// The size and alignment getters.
pub type GicGetSizeFn = unsafe extern "C" fn(size: *mut usize) -> hv_return_t;
pub type GicGetSpiRangeFn = unsafe extern "C" fn(base: *mut u32, count: *mut u32) -> hv_return_t;
pub type GicGetIntidFn =
    unsafe extern "C" fn(interrupt: hv_gic_intid_t, intid: *mut u32) -> hv_return_t;

/// The macOS 15 GIC calls. Looked up rather than linked: a linked symbol missing from an older
/// framework would stop the binary from loading at all.
#[derive(Debug, Clone, Copy)]
pub struct GicApi {
    pub hv_gic_config_create: GicConfigCreateFn,
    pub hv_gic_config_set_distributor_base: GicConfigSetBaseFn,
    pub hv_gic_config_set_redistributor_base: GicConfigSetBaseFn,
    pub hv_gic_create: GicCreateFn,
    pub hv_gic_set_spi: GicSetSpiFn,
    pub hv_gic_get_distributor_size: GicGetSizeFn,
    pub hv_gic_get_distributor_base_alignment: GicGetSizeFn,
    pub hv_gic_get_redistributor_size: GicGetSizeFn,
    pub hv_gic_get_redistributor_region_size: GicGetSizeFn,
    pub hv_gic_get_redistributor_base_alignment: GicGetSizeFn,
    pub hv_gic_get_spi_interrupt_range: GicGetSpiRangeFn,
    pub hv_gic_get_intid: GicGetIntidFn,
}

/// The address of `name` in the loaded images, if any.
fn lookup(name: &std::ffi::CStr) -> Option<*mut c_void> {
    // SAFETY: RTLD_DEFAULT is a valid handle and `name` is NUL-terminated; dlsym only reads it.
    let p = unsafe { dlsym(rtld_default(), name.as_ptr()) };
    (!p.is_null()).then_some(p)
}

macro_rules! gic_fn {
    ($name:ident, $ty:ty) => {{
        let name = std::ffi::CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes());
        let p = lookup(name.ok()?)?;
        // SAFETY: `p` is the framework's exported function of this name, whose C signature
        // (hv_gic*.h, macOS 15) the field's type repeats; a function pointer and a data pointer
        // have the same size and representation on arm64.
        unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
    }};
}

fn load_gic_api() -> Option<GicApi> {
    Some(GicApi {
        hv_gic_config_create: gic_fn!(hv_gic_config_create, GicConfigCreateFn),
        hv_gic_config_set_distributor_base: gic_fn!(
            hv_gic_config_set_distributor_base,
            GicConfigSetBaseFn
        ),
        hv_gic_config_set_redistributor_base: gic_fn!(
            hv_gic_config_set_redistributor_base,
            GicConfigSetBaseFn
        ),
        hv_gic_create: gic_fn!(hv_gic_create, GicCreateFn),
        hv_gic_set_spi: gic_fn!(hv_gic_set_spi, GicSetSpiFn),
        hv_gic_get_distributor_size: gic_fn!(hv_gic_get_distributor_size, GicGetSizeFn),
        hv_gic_get_distributor_base_alignment: gic_fn!(
            hv_gic_get_distributor_base_alignment,
            GicGetSizeFn
        ),
        hv_gic_get_redistributor_size: gic_fn!(hv_gic_get_redistributor_size, GicGetSizeFn),
        hv_gic_get_redistributor_region_size: gic_fn!(
            hv_gic_get_redistributor_region_size,
            GicGetSizeFn
        ),
        hv_gic_get_redistributor_base_alignment: gic_fn!(
            hv_gic_get_redistributor_base_alignment,
            GicGetSizeFn
        ),
        hv_gic_get_spi_interrupt_range: gic_fn!(hv_gic_get_spi_interrupt_range, GicGetSpiRangeFn),
        hv_gic_get_intid: gic_fn!(hv_gic_get_intid, GicGetIntidFn),
    })
}

/// The GIC calls, or None before macOS 15 (any one missing counts as all missing).
pub fn gic_api() -> Option<&'static GicApi> {
    static API: OnceLock<Option<GicApi>> = OnceLock::new();
    API.get_or_init(load_gic_api).as_ref()
}
