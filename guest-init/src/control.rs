//! The guest→host control stream of a `run` sandbox: msb-init writes these frames to the
//! control port ([`crate::CONTROL_TTY`]) and the VMM decodes them as hostile input.

use serde::{Deserialize, Serialize};

/// Largest stdout/stderr chunk msb-init puts in one frame.
pub const MAX_OUTPUT_CHUNK: usize = 16 * 1024;

/// One message from msb-init to the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMessage {
    /// First frame on the stream: the guest's protocol version.
    Hello { version: u32 },
    /// Bytes the workload wrote to its standard output.
    Stdout(Vec<u8>),
    /// Bytes the workload wrote to its standard error.
    Stderr(Vec<u8>),
    /// The workload could not be started or msb-init failed; a human-readable line.
    Error(String),
    /// The workload finished; msb-init powers off right after this frame.
    Exited(ExitStatus),
}

/// How the workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// Exited normally with this code (0..=255).
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention for a process exit code: the code itself, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c & 0xff,
            ExitStatus::Signal(s) => 128 + (s & 0x7f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Code(7).shell_code(), 7);
        assert_eq!(ExitStatus::Code(256 + 3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
        assert_eq!(ExitStatus::Signal(15).shell_code(), 143);
    }
}
