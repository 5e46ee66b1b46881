//! A private containerd for the shim's end-to-end tests and `msb-bench shim`: its root,
//! state and socket under one directory (on a tmpfs: the L2 VM's 9p root cannot hold
//! sockets), in its own mount namespace where a tmpfs covers `/run/containerd/s` (where shim
//! sockets always go), so a host's containerd is never seen or touched.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A running private containerd; on drop it, any shim of ours serving it, and its directory
/// go.
#[derive(Debug)]
pub struct PrivateContainerd {
    pub dir: PathBuf,
    child: Child,
}

impl PrivateContainerd {
    /// Starts `containerd` with its state in `dir` (made afresh) and `shim_dir` first in its
    /// `PATH`, so runtime `io.containerd.msb.v2` is the shim there. Audit logs go to
    /// `dir/logs/<namespace>`, pod shares to `dir/run`.
    pub fn start(
        dir: &Path,
        shim_dir: &Path,
        containerd: &Path,
    ) -> Result<PrivateContainerd, String> {
        let io = |e: std::io::Error| format!("{}: {e}", dir.display());
        let _ = std::fs::remove_dir_all(dir);
        for d in ["root", "state", "fifo", "logs"] {
            std::fs::create_dir_all(dir.join(d)).map_err(io)?;
        }
        let d = dir.display();
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\", \
                 \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
                 \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.aufs\"]\n\
                 [grpc]\n  address = \"{d}/sock\"\n[ttrpc]\n  address = \"{d}/sock.ttrpc\"\n"
            ),
        )
        .map_err(io)?;
        std::fs::create_dir_all("/run/containerd/s")
            .map_err(|e| format!("/run/containerd/s: {e}"))?;
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(dir.join("containerd.log")).map_err(io)?;
        let child = Command::new("unshare")
            .args([
                "-m",
                "sh",
                "-c",
                &format!(
                    "mount --make-rprivate / && mount -t tmpfs tmpfs /run/containerd/s && \
                     exec {} --config {d}/config.toml",
                    containerd.display()
                ),
            ])
            .env("PATH", path)
            .env("MSB_SHIM_LOG_DIR", dir.join("logs"))
            .env("MSB_SHIM_RUN_DIR", dir.join("run"))
            .stdout(log.try_clone().map_err(io)?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting containerd (apt-get install containerd): {e}"))?;
        let c = PrivateContainerd {
            dir: dir.to_path_buf(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !c.socket().exists() {
            if Instant::now() > deadline {
                return Err(format!("containerd did not start: {}", c.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(c)
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// containerd's (and the shims') log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr --address SOCKET`, arguments to be added.
    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(self.socket());
        c
    }

    /// The pid containerd runs as (`unshare` and `sh` exec it): its mount namespace holds the
    /// shim sockets.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Our shim processes serving this containerd.
    pub fn shim_pids(&self) -> Vec<u32> {
        let sock = self.socket();
        let mut pids = Vec::new();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return pids;
        };
        for e in procs.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            if args
                .first()
                .is_some_and(|a| a.ends_with(b"containerd-shim-msb-v2"))
                && args.contains(&sock.as_os_str().as_encoded_bytes())
            {
                pids.push(pid);
            }
        }
        pids
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        for pid in self.shim_pids() {
            // SAFETY: kill(2) on a pid just read from /proc; no memory is involved.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        // SAFETY: as above, on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A tiny root at `root`: the static busybox `./x setup` caches, and `applets` linked to it.
pub fn busybox_root(root: &Path, applets: &[&str]) -> std::io::Result<()> {
    std::fs::create_dir_all(root.join("bin"))?;
    for d in ["proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(msb_vmm::assets::busybox(), root.join("bin/busybox"))?;
    for a in applets {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a))?;
    }
    Ok(())
}
