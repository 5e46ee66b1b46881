//! The container's root from containerd's snapshot mounts (overlay or bind), mounted at
//! `<bundle>/rootfs` as the runc shim does, and shared into the guest from there.

use std::path::Path;

use containerd_shim::protos::api::Mount;

/// Mounts `mounts` in order at `target` (created if missing); on failure, undoes what it did.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("{}: {e}", target.display()))?;
    for (i, m) in mounts.iter().enumerate() {
        let typ = (!m.type_.is_empty()).then_some(m.type_.as_str());
        let source = (!m.source.is_empty()).then_some(m.source.as_str());
        if let Err(e) = containerd_shim::mount::mount_rootfs(typ, source, &m.options, target) {
            for _ in 0..i {
                unmount(target);
            }
            return Err(format!(
                "mounting the root ({} {} at {}): {e}",
                m.type_,
                m.source,
                target.display()
            ));
        }
    }
    Ok(())
}

/// Bind-mounts directory `src` (and what is mounted below it) at `target`, made here.
pub fn bind(src: &Path, target: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    std::fs::create_dir_all(target).map_err(|e| format!("{}: {e}", target.display()))?;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
    let (Ok(s), Ok(t)) = (c(src), c(target)) else {
        return Err(format!("{}: a NUL byte in the path", src.display()));
    };
    // SAFETY: valid NUL-terminated paths that outlive the call; no type or data.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_dir(target);
        return Err(format!(
            "binding {} at {}: {e}",
            src.display(),
            target.display()
        ));
    }
    Ok(())
}

/// Unmounts `target` (lazily when busy); a target that is no mount point is left alone.
pub fn unmount(target: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(target.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated path that outlives both calls.
    let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOENT) => {}
            _ => {
                // SAFETY: as above.
                let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                if rc != 0 {
                    tracing::warn!(
                        "unmounting {}: {}",
                        target.display(),
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
    }
}
