//! Hybrid vsock: a Unix socket per VM where any program reaches guest ports by writing
//! `CONNECT <port>\n` and reading `OK <host port>\n` (Firecracker's convention), after which
//! the socket is the connection.

use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::VsockHost;

/// Longest CONNECT line accepted.
const MAX_LINE: usize = 64;
/// How long a client may take to send its CONNECT line.
const LINE_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses `CONNECT <port>` (without the newline).
pub fn parse_connect(line: &str) -> Option<u32> {
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Serves the hybrid socket at `path` until dropped.
pub struct HybridListener {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HybridListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HybridListener")
            .field("path", &self.path)
            .finish()
    }
}

impl HybridListener {
    /// Binds `path` (replacing a stale socket) and serves it on a thread, confined as a
    /// vsock listener (its per-connection threads inherit the filter).
    pub fn bind(
        path: &Path,
        host: VsockHost,
        seccomp: msb_confine::Seccomp,
    ) -> io::Result<HybridListener> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        // Whoever connects runs commands as root in the guest: the owner only, whatever the
        // umask made of it (0775 under umask 002 lets any group member in).
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let listener_path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("vsock-hybrid".into())
            .spawn(move || {
                if let Err(e) = msb_confine::enter(msb_confine::ThreadKind::VsockListener, seccomp)
                {
                    tracing::error!("vsock socket {}: {e}", listener_path.display());
                    return;
                }
                for conn in listener.incoming() {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(c) => {
                            let h = host.clone();
                            let _ = std::thread::Builder::new()
                                .name("vsock-hybrid-conn".into())
                                .spawn(move || {
                                    if let Err(e) = handshake(c, &h) {
                                        tracing::debug!("hybrid vsock client: {e}");
                                    }
                                });
                        }
                        Err(e) => tracing::debug!("hybrid vsock accept: {e}"),
                    }
                }
            })?;
        Ok(HybridListener {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for HybridListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop with a connection of our own.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn handshake(mut c: UnixStream, host: &VsockHost) -> io::Result<()> {
    c.set_read_timeout(Some(LINE_TIMEOUT))?;
    // Byte by byte: nothing after the newline may be consumed, it belongs to the guest.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if c.read(&mut b)? == 0 {
            return Ok(());
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        if line.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "CONNECT line too long",
            ));
        }
    }
    let text = String::from_utf8_lossy(&line);
    let port = parse_connect(text.trim_end_matches('\r')).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected `CONNECT <port>`, got {text:?}"),
        )
    })?;
    c.set_read_timeout(None)?;
    // The device writes `OK <port>` once the guest accepts, and closes the socket if it refuses.
    host.connect_stream(port, c, format!("OK {port}\n").into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect("CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect("CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            "CONNECT",
            "CONNECT ",
            "CONNECT -1",
            "CONNECT 1 2",
            "connect 5",
            "CONNECT 4294967296",
            "CONNECT 0x10",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad}");
        }
    }

    /// The socket is the owner's only, whatever the umask (the test's is usually 022, which
    /// alone would leave it 0755).
    #[test]
    fn the_socket_is_the_owners_only() {
        let dir = std::env::temp_dir().join(format!("msb-hybrid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let (_device, host) = crate::virtio::vsock::VsockDevice::new().unwrap();
        let l = HybridListener::bind(&path, host, msb_confine::Seccomp::Enforce).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        drop(l);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(mode, 0o600);
    }
}
