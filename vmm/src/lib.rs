//! msb-vmm: a microVM monitor for running untrusted code in hardware-isolated sandboxes.
//!
//! - [`sandbox`]: run a command in a fresh microVM (what `msb-vmm run` does).
//! - [`vm`]: boot any kernel with [`vm::VmBuilder`] (what `msb-vmm boot` does).
//! - [`hypervisor`]: the `Hypervisor → Vm → Vcpu` boundary and its KVM backend.
//!
//! ```no_run
//! let out = msb_vmm::sandbox::Sandbox::command(["sh", "-c", "echo hello; exit 3"])
//!     .cpus(2)
//!     .memory_mib(256)
//!     .output()?;
//! assert_eq!(out.stdout, b"hello\n");
//! assert_eq!(out.status.shell_code(), 3);
//! # Ok::<(), msb_vmm::sandbox::SandboxError>(())
//! ```

use std::sync::OnceLock;
use std::time::Instant;

pub mod arch;
pub mod assets;
pub mod host;
pub mod hypervisor;
pub mod initramfs;
pub mod loader;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod sandbox;
#[cfg(target_os = "linux")]
pub mod tls;
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod vm;

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// The instant boot times are measured from. The CLI calls this first thing in `main`, so it
/// is the process start to within microseconds; a library user gets the first call's time.
pub fn process_start() -> Instant {
    *PROCESS_START.get_or_init(Instant::now)
}
