//! x86_64 guests: layout, boot structures, CPUID and MSR policy.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod platform;
