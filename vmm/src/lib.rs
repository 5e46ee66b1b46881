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
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
pub mod image;
pub mod initramfs;
#[cfg(target_os = "linux")]
pub mod jail;
pub mod loader;
#[cfg(target_os = "linux")]
pub mod named;
#[cfg(target_os = "linux")]
pub mod netconf;
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
pub mod sandbox;
pub mod snapshot;
pub mod stats;
#[cfg(target_os = "linux")]
pub mod tls;
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
pub mod vm;
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
pub mod warm;

/// Guest memory when none is asked for. Memory is faulted in as the guest touches it, so a
/// sandbox using 40 MiB costs 40 MiB whatever this says; 512 MiB gives `/tmp` (a tmpfs of half
/// of it) room for a 200 MiB file, as the sandboxes users compare us with do (E2B 512 MiB).
pub const DEFAULT_MEMORY_MIB: u64 = 512;

static PROCESS_START: OnceLock<Instant> = OnceLock::new();

/// Logs to stderr as the CLI shows them: `$MSB_LOG` (an `EnvFilter` directive) if set, else
/// `default`; colours only on a terminal. For the CLI and tools built on the library (msb-bench).
pub fn init_logging(default: &str) {
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time();
    // A bare level needs no directive parser: `EnvFilter` compiles its directives with a regex
    // engine, which on the boot path costs ~0.1 ms and ~0.3 MiB of resident code.
    let level = match std::env::var_os("MSB_LOG") {
        None => default.parse::<tracing::level_filters::LevelFilter>().ok(),
        Some(_) => None,
    };
    match level {
        Some(level) => fmt.with_max_level(level).init(),
        None => {
            let filter = tracing_subscriber::EnvFilter::try_from_env("MSB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
            fmt.with_env_filter(filter).init()
        }
    }
}

/// The instant boot times are measured from. The CLI calls this first thing in `main`, so it
/// is the process start to within microseconds; a library user gets the first call's time.
pub fn process_start() -> Instant {
    *PROCESS_START.get_or_init(Instant::now)
}
