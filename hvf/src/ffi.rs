//! The Hypervisor.framework calls msb-vmm uses (macOS 11+ on Apple silicon). Thin declarations
//! only; safe wrappers live with the VMM adapter.
#![allow(non_camel_case_types)]

use std::os::raw::c_void;

/// Framework return code; 0 is success.
pub type hv_return_t = i32;
/// A vCPU handle.
pub type hv_vcpu_t = u64;
/// Guest physical address.
pub type hv_ipa_t = u64;
/// Memory permission flags.
pub type hv_memory_flags_t = u64;
/// Register identifiers.
pub type hv_reg_t = u32;

/// Success.
pub const HV_SUCCESS: hv_return_t = 0;
/// Readable guest memory.
pub const HV_MEMORY_READ: hv_memory_flags_t = 1 << 0;
/// Writable guest memory.
pub const HV_MEMORY_WRITE: hv_memory_flags_t = 1 << 1;
/// Executable guest memory.
pub const HV_MEMORY_EXEC: hv_memory_flags_t = 1 << 2;
/// Exit reason: an exception (the syndrome is in the exit info).
pub const HV_EXIT_REASON_EXCEPTION: u32 = 1;
/// Exit reason: hv_vcpus_exit was called.
pub const HV_EXIT_REASON_CANCELED: u32 = 0;

/// Exception details of a vCPU exit.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct hv_vcpu_exit_exception_t {
    pub syndrome: u64,
    pub virtual_address: u64,
    pub physical_address: u64,
}

/// A vCPU exit.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct hv_vcpu_exit_t {
    pub reason: u32,
    pub exception: hv_vcpu_exit_exception_t,
}

#[link(name = "Hypervisor", kind = "framework")]
extern "C" {
    pub fn hv_vm_create(config: *mut c_void) -> hv_return_t;
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
}
