//! Facts about the host that decide what can run here.

/// Whether /dev/kvm is PVM (software nested virtualization): it runs tiny guests but a stock
/// Linux kernel takes minutes to boot and dies on its first syscall.
pub fn is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}
