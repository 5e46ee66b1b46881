//! The host transport: mounts a [`PassthroughFs`] through `/dev/fuse`, so the host kernel's
//! own FUSE client drives the very server the virtio-fs device uses. Conformance suites and
//! benches run against it at full speed (needs root or CAP_SYS_ADMIN to mount).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::abi;
use super::passthrough::{PassthroughFs, MAX_WRITE};

/// A mounted share; dropping it unmounts and joins the server threads.
#[derive(Debug)]
pub struct FuseMount {
    mountpoint: PathBuf,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl FuseMount {
    /// Mounts `fs` at `mountpoint` with `threads` server threads.
    pub fn mount(
        fs: Arc<PassthroughFs>,
        mountpoint: &Path,
        threads: usize,
    ) -> io::Result<FuseMount> {
        // Blocking reads: the kernel wakes exactly one waiting server thread per request, with
        // no poll round trip (which costs as much as the request itself on small files).
        let dev = File::options().read(true).write(true).open("/dev/fuse")?;
        let opts = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other,max_read={}",
            dev.as_raw_fd(),
            MAX_WRITE
        );
        let target = CString::new(mountpoint.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let opts_c = CString::new(opts).expect("no NUL");
        // SAFETY: all strings are NUL-terminated and live across the call.
        let r = unsafe {
            libc::mount(
                c"msb-fs".as_ptr(),
                target.as_ptr(),
                c"fuse.msb".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts_c.as_ptr().cast(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let dev = Arc::new(dev);
        let stop = Arc::new(AtomicBool::new(false));
        let mut m = FuseMount {
            mountpoint: mountpoint.into(),
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for i in 0..threads.max(1) {
            let (dev, fs, stop) = (dev.clone(), fs.clone(), stop.clone());
            m.threads.push(
                std::thread::Builder::new()
                    .name(format!("fuse-{i}"))
                    .spawn(move || serve(&dev, &fs, &stop))?,
            );
        }
        Ok(m)
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }
}

fn serve(dev: &File, fs: &PassthroughFs, stop: &AtomicBool) {
    let mut buf = vec![0u8; MAX_WRITE as usize + 4096];
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        // SAFETY: the buffer is valid for its length; the fd lives as long as `dev`.
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                // Interrupted, or the request was interrupted before we read it.
                Some(libc::EINTR) | Some(libc::ENOENT) | Some(libc::EAGAIN) => continue,
                // Unmounted (ENODEV), or anything else: this connection is over.
                _ => return,
            }
        }
        let req = &buf[..n as usize];
        let is_destroy = req.len() >= abi::IN_HEADER_LEN
            && u32::from_le_bytes([req[4], req[5], req[6], req[7]]) == abi::op::DESTROY;
        if let Some(reply) = fs.handle(req) {
            // SAFETY: the reply is valid for its length.
            let w = unsafe { libc::write(dev.as_raw_fd(), reply.as_ptr().cast(), reply.len()) };
            if w < 0 {
                let e = io::Error::last_os_error();
                // ENOENT: the request was interrupted meanwhile; anything else ends us.
                if e.raw_os_error() != Some(libc::ENOENT) {
                    tracing::debug!("fuse: writing a reply: {e}");
                    return;
                }
            }
        }
        if is_destroy {
            return;
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.mountpoint.as_os_str().as_bytes()) {
            // SAFETY: NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        // Readers see ENODEV once the kernel drops the connection, which is at once unless
        // files are still open on the detached mount; then they finish when the last one is
        // closed, and we do not wait for that.
        self.stop.store(true, Ordering::Relaxed);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while !self.threads.iter().all(|t| t.is_finished()) && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!(
                    "fuse: {} still has open files; its server thread ends when they close",
                    self.mountpoint.display()
                );
            }
        }
    }
}
