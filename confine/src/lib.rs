//! Confinement of the VMM process: what a guest that broke a device could do with the thread
//! it took over.
//!
//! Every thread the VMM runs after set-up calls [`enter`] with its [`ThreadKind`] before it
//! handles anything from the guest. That drops the thread's capabilities, sets no-new-privs and
//! installs the kind's seccomp filter: an allowlist of the system calls that kind makes (with
//! arguments pinned where a call could do more than the kind needs: no executable mappings, no
//! processes, only KVM ioctls on vCPUs, signals only to ourselves). A call outside the list
//! never runs: the thread gets `SIGSYS` and the handler here prints one line naming the thread,
//! its kind and the call, then ends the process. Threads inherit their creator's filters, so
//! threads started by a confined thread are at least as confined.
//!
//! Capabilities, no-new-privs and seccomp filters are per thread on Linux; that is why each
//! thread enters its own confinement rather than the process doing it once.

#[cfg(target_os = "linux")]
mod filters;
mod names;

pub use names::name as syscall_name;

/// What the VMM's threads do, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The CLI's main thread after set-up and the threads it starts (agent client, stdin,
    /// signals): talks to the agent, writes our stdout, tears down and cleans up.
    Control,
    /// A vCPU: `KVM_RUN` and the MMIO/port devices it dispatches to (serial, i8042, boot timer,
    /// virtio-mmio registers).
    Vcpu,
    /// The VM's event loop: console input, timeouts, kicks the vCPUs, tears the VM down.
    Events,
    /// The vsock device's worker: guest packets ↔ host Unix stream sockets.
    Vsock,
    /// The hybrid vsock listener of a named sandbox and its per-connection threads.
    VsockListener,
    /// A virtio-fs worker: our FUSE server over a host directory.
    Fs,
    /// The virtio-net worker: frames between the guest and the netstack.
    Net,
    /// The netstack: the guest's TCP/UDP/ICMP relayed over host sockets under the policy.
    Netstack,
    /// A name-resolver thread of the netstack (the host's `getaddrinfo`).
    Dns,
    /// Starts device workers when a driver activates its device (from a vCPU, whose own
    /// filter its threads would inherit): what any device worker may do, plus `clone`.
    Launcher,
}

impl ThreadKind {
    /// Every kind, for tests and listings.
    pub const ALL: [ThreadKind; 10] = [
        ThreadKind::Control,
        ThreadKind::Vcpu,
        ThreadKind::Events,
        ThreadKind::Vsock,
        ThreadKind::VsockListener,
        ThreadKind::Fs,
        ThreadKind::Net,
        ThreadKind::Netstack,
        ThreadKind::Dns,
        ThreadKind::Launcher,
    ];

    /// The kind's name in messages and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Control => "control",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Events => "events",
            ThreadKind::Vsock => "vsock",
            ThreadKind::VsockListener => "vsock-listener",
            ThreadKind::Fs => "fs",
            ThreadKind::Net => "net",
            ThreadKind::Netstack => "netstack",
            ThreadKind::Dns => "dns",
            ThreadKind::Launcher => "launcher",
        }
    }

    /// The kind named `s` (as [`ThreadKind::name`] spells it).
    pub fn from_name(s: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// Whether threads install their seccomp filters. Capabilities are dropped and no-new-privs
/// set either way; `Off` exists for debugging (`--no-seccomp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Seccomp {
    #[default]
    Enforce,
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("dropping the {kind} thread's capabilities failed: {source}")]
    Capabilities {
        kind: &'static str,
        source: std::io::Error,
    },
    #[error("setting no-new-privs on the {kind} thread failed: {source}")]
    NoNewPrivs {
        kind: &'static str,
        source: std::io::Error,
    },
    #[error("building the {kind} thread's seccomp filter failed: {msg}")]
    Build { kind: &'static str, msg: String },
    #[error(
        "installing the {kind} thread's seccomp filter failed: {msg} \
         (a kernel without seccomp filters? --no-seccomp runs unconfined)"
    )]
    Install { kind: &'static str, msg: String },
}

/// Confines the calling thread as `kind`: no capabilities, no new privileges, and (unless
/// `mode` is `Off`) the kind's seccomp filter. Call it before the thread handles guest input.
pub fn enter(kind: ThreadKind, mode: Seccomp) -> Result<(), ConfineError> {
    #[cfg(target_os = "linux")]
    {
        filters::enter(kind, mode)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (kind, mode);
        Ok(())
    }
}

/// The environment variable that makes a thread of the named kind make a forbidden system call
/// right after entering its confinement: how the tests prove every kind's filter is installed
/// and fatal. Never set it outside tests.
pub const PROBE_ENV: &str = "MSB_SECCOMP_PROBE";

#[cfg(target_os = "linux")]
pub use filters::{filter_for, probe, EXIT_CODE};

#[cfg(all(test, target_os = "linux"))]
mod tests;
