//! The guest→host control stream of a `run` sandbox: msb-init writes these frames to the
//! control port ([`crate::CONTROL_TTY`]) and the VMM decodes them as hostile input.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::frame::{FrameDecoder, FrameError};
use crate::PROTOCOL_VERSION;

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

/// Why the host gave up on a control stream.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ControlError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("guest speaks protocol version {guest}, this host {host}")]
    Version { guest: u32, host: u32 },
    #[error("{0} before Hello")]
    BeforeHello(&'static str),
    #[error("{0} after Exited")]
    AfterExit(&'static str),
    #[error("second Hello")]
    SecondHello,
}

/// What the host does with a decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// Workload standard output.
    Stdout(Vec<u8>),
    /// Workload standard error.
    Stderr(Vec<u8>),
    /// A message from msb-init for the user.
    Error(String),
    /// The workload's exit status (always the last event).
    Exited(ExitStatus),
}

/// Host side of the control stream: decodes frames and enforces the message order
/// (Hello first, nothing after Exited). Any violation fails the stream for good.
#[derive(Debug, Default)]
pub struct ControlReceiver {
    decoder: FrameDecoder,
    hello: bool,
    exited: bool,
    failed: Option<ControlError>,
}

/// Longest msb-init error message kept, in characters.
pub const MAX_ERROR_CHARS: usize = 1024;

impl ControlReceiver {
    /// A receiver waiting for Hello.
    pub fn new() -> Self {
        Self::default()
    }

    /// The error that failed the stream, if any.
    pub fn failure(&self) -> Option<&ControlError> {
        self.failed.as_ref()
    }

    /// Feeds received bytes; `f` gets each event in order. Returns the stream's failure, if
    /// these bytes caused one (later calls then do nothing and return `Ok`).
    pub fn push(
        &mut self,
        bytes: &[u8],
        mut f: impl FnMut(ControlEvent),
    ) -> Result<(), ControlError> {
        if self.failed.is_some() {
            return Ok(());
        }
        self.decoder.push(bytes);
        loop {
            let msg = match self.decoder.next_frame::<GuestMessage>() {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.fail(e.into())),
            };
            if let Err(e) = self.accept(msg, &mut f) {
                return Err(self.fail(e));
            }
        }
    }

    fn fail(&mut self, e: ControlError) -> ControlError {
        self.failed = Some(e.clone());
        e
    }

    fn accept(
        &mut self,
        msg: GuestMessage,
        f: &mut impl FnMut(ControlEvent),
    ) -> Result<(), ControlError> {
        let kind = match &msg {
            GuestMessage::Hello { .. } => "Hello",
            GuestMessage::Stdout(_) => "Stdout",
            GuestMessage::Stderr(_) => "Stderr",
            GuestMessage::Error(_) => "Error",
            GuestMessage::Exited(_) => "Exited",
        };
        if self.exited {
            return Err(ControlError::AfterExit(kind));
        }
        match msg {
            GuestMessage::Hello { version } => {
                if self.hello {
                    return Err(ControlError::SecondHello);
                }
                self.hello = true;
                if version != PROTOCOL_VERSION {
                    return Err(ControlError::Version {
                        guest: version,
                        host: PROTOCOL_VERSION,
                    });
                }
                return Ok(());
            }
            _ if !self.hello => return Err(ControlError::BeforeHello(kind)),
            GuestMessage::Stdout(b) => f(ControlEvent::Stdout(b)),
            GuestMessage::Stderr(b) => f(ControlEvent::Stderr(b)),
            GuestMessage::Error(e) => f(ControlEvent::Error(
                e.chars().take(MAX_ERROR_CHARS).collect(),
            )),
            GuestMessage::Exited(s) => {
                self.exited = true;
                f(ControlEvent::Exited(s));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::frame::encode;

    fn collect(
        r: &mut ControlReceiver,
        bytes: &[u8],
    ) -> (Vec<ControlEvent>, Result<(), ControlError>) {
        let mut ev = Vec::new();
        let res = r.push(bytes, |e| ev.push(e));
        (ev, res)
    }

    #[test]
    fn byte_at_a_time_stream() {
        let mut stream = encode(&GuestMessage::Hello {
            version: PROTOCOL_VERSION,
        })
        .unwrap();
        stream.extend(encode(&GuestMessage::Stdout(b"hi\n".to_vec())).unwrap());
        stream.extend(encode(&GuestMessage::Error("x".repeat(5000))).unwrap());
        stream.extend(encode(&GuestMessage::Exited(ExitStatus::Code(7))).unwrap());
        let mut r = ControlReceiver::new();
        let mut events = Vec::new();
        for b in stream {
            let (ev, res) = collect(&mut r, &[b]);
            res.unwrap();
            events.extend(ev);
        }
        assert_eq!(events.len(), 3);
        assert_eq!(events[0], ControlEvent::Stdout(b"hi\n".to_vec()));
        assert!(matches!(&events[1], ControlEvent::Error(e) if e.len() == MAX_ERROR_CHARS));
        assert_eq!(events[2], ControlEvent::Exited(ExitStatus::Code(7)));
    }

    #[test]
    fn order_violations_fail_the_stream() {
        let hello = encode(&GuestMessage::Hello {
            version: PROTOCOL_VERSION,
        })
        .unwrap();
        let out = encode(&GuestMessage::Stdout(b"x".to_vec())).unwrap();
        let exit = encode(&GuestMessage::Exited(ExitStatus::Code(0))).unwrap();
        let cases: Vec<(Vec<u8>, ControlError)> = vec![
            (out.clone(), ControlError::BeforeHello("Stdout")),
            (
                [hello.clone(), hello.clone()].concat(),
                ControlError::SecondHello,
            ),
            (
                [hello.clone(), exit.clone(), out.clone()].concat(),
                ControlError::AfterExit("Stdout"),
            ),
            (
                encode(&GuestMessage::Hello {
                    version: PROTOCOL_VERSION + 1,
                })
                .unwrap(),
                ControlError::Version {
                    guest: PROTOCOL_VERSION + 1,
                    host: PROTOCOL_VERSION,
                },
            ),
        ];
        for (bytes, want) in cases {
            let mut r = ControlReceiver::new();
            let (_, res) = collect(&mut r, &bytes);
            assert_eq!(res, Err(want.clone()));
            assert_eq!(r.failure(), Some(&want));
            // A failed stream ignores everything after.
            let (ev, res) = collect(&mut r, &[hello.clone(), out.clone()].concat());
            assert!(ev.is_empty() && res.is_ok());
        }
    }

    #[test]
    fn framing_errors_fail_the_stream() {
        let mut r = ControlReceiver::new();
        let (_, res) = collect(&mut r, &[0xff, 0xff, 0xff, 0x7f, 1, 2, 3]);
        assert!(matches!(
            res,
            Err(ControlError::Frame(FrameError::TooLarge(_)))
        ));
    }

    #[test]
    fn shell_codes() {
        assert_eq!(ExitStatus::Code(7).shell_code(), 7);
        assert_eq!(ExitStatus::Code(256 + 3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
        assert_eq!(ExitStatus::Signal(15).shell_code(), 143);
    }
}
