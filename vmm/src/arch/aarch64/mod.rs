//! arm64 guests (KVM on arm64 Linux and Hypervisor.framework on Apple silicon share this):
//! the memory layout, the arm64 `Image` header, and the device tree the kernel boots with.
//!
//! Pure functions over plain data: they are built and unit-tested on every host, so the
//! device tree is checked here (with `dtc`) before an arm64 host ever boots it.

pub mod fdt;
pub mod image;
pub mod layout;
#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
pub mod platform;
