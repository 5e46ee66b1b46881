//! The msb-vmm host↔guest wire protocol, shared by `msb-init` (the guest's PID 1) and the VMM.
//!
//! One definition used by both sides, so they cannot drift apart. Everything here is plain,
//! portable logic: the host decodes every byte the guest sends with it, so it is written for
//! hostile input (size caps, no panics) and fuzzed (`fuzz/`).
//!
//! - [`frame`]: `[len: u32 LE][postcard(message)]` framing with a size cap.
//! - [`agent`]: the agent protocol's messages (requests with ids, responses, flow control).
//! - [`client`]: the host side of that protocol over any stream.
#![forbid(unsafe_code)]

pub mod agent;
pub mod client;
pub mod frame;

/// Version of the agent protocol. The agent announces it first; the host refuses any other.
pub const PROTOCOL_VERSION: u32 = 2;

/// Guest physical address of the boot-timer device (Firecracker-compatible on x86_64).
#[cfg(target_arch = "x86_64")]
pub const BOOT_TIMER_ADDR: u64 = 0xC000_0000;
/// Guest physical address of the boot-timer device on aarch64 guests.
#[cfg(not(target_arch = "x86_64"))]
pub const BOOT_TIMER_ADDR: u64 = 0x4000_0000;

/// The byte written to the boot timer to say "boot complete".
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Kernel command-line flags msb-init understands.
pub mod cmdline {
    /// `msb.hostname=NAME`: the guest's hostname (default `msb`).
    pub const HOSTNAME: &str = "msb.hostname=";
    /// `msb.debug`: print msb-init's set-up time on the console.
    pub const DEBUG: &str = "msb.debug";
    /// `msb.shell`: also run a shell on the console (debugging with `msb-vmm boot --console`).
    pub const SHELL: &str = "msb.shell";
    /// `msb.exit_after_boot`: power off right after signalling boot (boot-time benchmarks of
    /// VMMs that cannot talk to the agent).
    pub const EXIT_AFTER_BOOT: &str = "msb.exit_after_boot";

    /// Whether the whitespace-separated `cmdline` contains `flag`.
    pub fn has(cmdline: &str, flag: &str) -> bool {
        cmdline.split_ascii_whitespace().any(|w| w == flag)
    }

    /// The value of `key` (which ends in `=`), if present.
    pub fn value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
        cmdline
            .split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(key))
    }

    /// Whether `name` is a valid hostname (1-64 of a-z, 0-9, `-`, `.`).
    pub fn valid_hostname(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.')
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn flags_and_values() {
            let c = "console=ttyS0 msb.hostname=box-1 msb.debug quiet";
            assert!(has(c, DEBUG) && !has(c, SHELL));
            assert_eq!(value(c, HOSTNAME), Some("box-1"));
            assert!(
                valid_hostname("box-1.local")
                    && !valid_hostname("Box")
                    && !valid_hostname("")
                    && !valid_hostname(&"a".repeat(65))
            );
        }
    }
}
