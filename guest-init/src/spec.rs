//! The workload description (`RunSpec`) the VMM passes to msb-init on the kernel command line.
//!
//! Encoding: `msb.run=<base64url(postcard(RunSpec))>`. Arguments and environment are raw bytes,
//! so anything a Unix exec can carry survives; base64url has no character the kernel's command
//! line parser treats specially. The kernel ignores unknown dotted parameters, and msb-init reads
//! them back from /proc/cmdline.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::{base64, PROTOCOL_VERSION};

/// The kernel command-line key that carries the encoded spec.
pub const CMDLINE_KEY: &str = "msb.run";

/// What msb-init runs after boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Protocol version of the VMM that wrote the spec; msb-init refuses others.
    pub version: u32,
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no `/`.
    pub argv: Vec<Vec<u8>>,
    /// Environment, complete: msb-init adds only `PATH`, `HOME` and `TERM` defaults when absent.
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    /// Working directory; `/` when absent.
    pub workdir: Option<Vec<u8>>,
    /// Guest hostname.
    pub hostname: String,
}

/// Why a spec is unusable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("no command given")]
    EmptyArgv,
    #[error("argument {0} contains a NUL byte, which exec cannot pass")]
    NulInArg(usize),
    #[error("environment variable {0} has an empty name, a '=' or a NUL byte in its name, or a NUL byte in its value")]
    BadEnv(usize),
    #[error("working directory contains a NUL byte or is empty")]
    BadWorkdir,
    #[error("hostname {0:?} is not a valid host name (1-64 of a-z, 0-9, '-', '.')")]
    BadHostname(String),
    #[error("spec from protocol version {got}, this msb-init speaks {want}")]
    Version { got: u32, want: u32 },
    #[error("cannot decode the {CMDLINE_KEY} value: {0}")]
    Decode(String),
}

impl RunSpec {
    /// A spec for `argv` with an empty environment, `/` as working directory and hostname `msb`.
    pub fn new(argv: Vec<Vec<u8>>) -> Self {
        RunSpec {
            version: PROTOCOL_VERSION,
            argv,
            env: Vec::new(),
            workdir: None,
            hostname: "msb".to_string(),
        }
    }

    /// Checks everything exec and sethostname would reject, so the user hears it before boot.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.version != PROTOCOL_VERSION {
            return Err(SpecError::Version {
                got: self.version,
                want: PROTOCOL_VERSION,
            });
        }
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return Err(SpecError::EmptyArgv);
        }
        if let Some(i) = self.argv.iter().position(|a| a.contains(&0)) {
            return Err(SpecError::NulInArg(i));
        }
        for (i, (k, v)) in self.env.iter().enumerate() {
            if k.is_empty() || k.contains(&b'=') || k.contains(&0) || v.contains(&0) {
                return Err(SpecError::BadEnv(i));
            }
        }
        if let Some(w) = &self.workdir {
            if w.is_empty() || w.contains(&0) {
                return Err(SpecError::BadWorkdir);
            }
        }
        let h = &self.hostname;
        let ok = !h.is_empty()
            && h.len() <= 64
            && h.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'.');
        if !ok {
            return Err(SpecError::BadHostname(h.clone()));
        }
        Ok(())
    }

    /// The `msb.run=...` command-line parameter for this spec.
    pub fn to_cmdline_param(&self) -> String {
        // Serializing owned byte vectors into a Vec cannot fail.
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        format!("{CMDLINE_KEY}={}", base64::encode(&bytes))
    }

    /// Decodes an encoded spec (the part after `msb.run=`).
    pub fn decode(value: &str) -> Result<Self, SpecError> {
        let bytes = base64::decode(value).map_err(|e| SpecError::Decode(e.to_string()))?;
        let spec: RunSpec =
            postcard::from_bytes(&bytes).map_err(|e| SpecError::Decode(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Finds and decodes the spec in a whole kernel command line; `Ok(None)` if it has none.
    pub fn from_cmdline(cmdline: &str) -> Result<Option<Self>, SpecError> {
        let prefix = format!("{CMDLINE_KEY}=");
        match cmdline
            .split_ascii_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()))
        {
            Some(v) => Self::decode(v).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunSpec {
        let mut s = RunSpec::new(vec![
            b"sh".to_vec(),
            b"-c".to_vec(),
            b"echo 'a b' \"$X\"\n\xff".to_vec(),
        ]);
        s.env.push((b"X".to_vec(), b"= spaced value \x01".to_vec()));
        s.workdir = Some(b"/tmp/dir with space".to_vec());
        s
    }

    #[test]
    fn survives_the_command_line() {
        let s = spec();
        let param = s.to_cmdline_param();
        assert!(!param.contains(' ') && !param.contains('"'));
        let cmdline = format!("console=ttyS0 reboot=k {param} quiet");
        assert_eq!(RunSpec::from_cmdline(&cmdline).unwrap(), Some(s));
        assert_eq!(RunSpec::from_cmdline("console=ttyS0").unwrap(), None);
    }

    #[test]
    fn validation() {
        assert_eq!(RunSpec::new(vec![]).validate(), Err(SpecError::EmptyArgv));
        assert_eq!(
            RunSpec::new(vec![b"a\0".to_vec()]).validate(),
            Err(SpecError::NulInArg(0))
        );
        let mut s = spec();
        s.env.push((b"A=B".to_vec(), b"".to_vec()));
        assert_eq!(s.validate(), Err(SpecError::BadEnv(1)));
        let mut s = spec();
        s.hostname = "Bad Host".into();
        assert!(matches!(s.validate(), Err(SpecError::BadHostname(_))));
        let mut s = spec();
        s.version += 1;
        assert!(matches!(s.validate(), Err(SpecError::Version { .. })));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(RunSpec::decode("!!!").is_err());
        assert!(RunSpec::decode("AAAA").is_err());
        assert!(RunSpec::from_cmdline("msb.run=").is_err());
    }
}
