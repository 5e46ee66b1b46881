//! Architecture-specific guest setup: memory layout, boot parameters, CPU tables.
//! Pure functions over guest memory and plain data, so they are unit-tested without a hypervisor.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
