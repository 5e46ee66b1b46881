//! Named sandboxes' shared state: where their directories live and how a client reaches a
//! running one's agent. The CLI (`start`, `exec`, `stop`) and the Python SDK's
//! `Sandbox.connect` use these, so a sandbox started by one is driven by the other.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use msb_init::client::AgentClient;
use thiserror::Error;

/// Errors reaching a named sandbox.
#[derive(Debug, Error)]
pub enum NamedError {
    #[error("invalid sandbox name {0:?}: use 1-63 of a-z, 0-9, '-', '_', '.', starting with a letter or digit")]
    BadName(String),
    #[error("connecting to the sandbox: {0}")]
    Io(#[from] std::io::Error),
    #[error("the sandbox refused the agent connection")]
    Refused,
    #[error("unexpected reply from the sandbox: {0}")]
    Reply(String),
    #[error(transparent)]
    Agent(#[from] msb_init::client::ClientError),
}

/// Where sandboxes' state directories live: `$MSB_STATE_DIR`, else
/// `$XDG_RUNTIME_DIR/msb-vmm`, else `~/.local/state/msb-vmm`.
pub fn state_root() -> PathBuf {
    if let Some(d) = std::env::var_os("MSB_STATE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("msb-vmm");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".local/state/msb-vmm")
}

/// Sandbox names: safe as a directory name and readable in `ls`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_' || c == b'.'
        })
}

/// [`valid_name`], as an error naming the rule.
pub fn check_name(name: &str) -> Result<(), NamedError> {
    match valid_name(name) {
        true => Ok(()),
        false => Err(NamedError::BadName(name.to_string())),
    }
}

/// Connects to the agent of the sandbox whose state directory is `dir`, through its hybrid
/// vsock socket (`CONNECT <port>\n` → `OK <port>\n`).
pub fn connect(dir: &Path) -> Result<AgentClient, NamedError> {
    let mut s = UnixStream::connect(dir.join("vsock.sock"))?;
    s.write_all(format!("CONNECT {}\n", msb_init::agent::AGENT_PORT).as_bytes())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        if s.read(&mut b)? == 0 {
            return Err(NamedError::Refused);
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Err(NamedError::Reply("(too long)".into()));
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(NamedError::Reply(
            String::from_utf8_lossy(&line).trim().to_string(),
        ));
    }
    s.set_read_timeout(None)?;
    Ok(AgentClient::connect(s, Duration::from_secs(10))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "box-1", "ci_job.7", "0abc"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "A", "-x", ".x", "a/b", "a b", &"x".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
