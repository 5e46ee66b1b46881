//! Warm starts: `msb-vmm run` and [`crate::sandbox::Sandbox::command`] continue a cached
//! snapshot of a freshly booted sandbox instead of booting one.
//!
//! A template is a sandbox snapshot ([`crate::sandbox::Sandbox::snapshot`]) taken the moment
//! its agent first answered: before any user command ran and before the per-run settings
//! (secrets, the CA, limits) reached the guest, so nothing of one run is in it. It is stored
//! under `<cache>/warm/<key>`, where the key hashes everything that shapes the guest at that
//! moment: the VMM build, the kernel, the initramfs (msb-init), the kernel command line (which
//! names the mounts, the hostname and the network), vCPUs, memory, the root's identity and the
//! volumes' guest paths and modes. What is not in the key is applied to each restored copy:
//! the host directories of the volumes, the network policy and published ports, secrets and
//! the CA, limits, and the per-exec environment. A restored copy gets the current wall clock
//! and fresh entropy from the host (see `Request::Restored`).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::initramfs::file_stamp;

/// Bump when what a template holds, or how it is keyed, changes.
const WARM_VERSION: u32 = 1;

/// Whether this build can snapshot its VMs, which a template needs (arm64 cannot yet):
/// elsewhere every start boots, without a word.
pub const SUPPORTED: bool = cfg!(target_arch = "x86_64");

/// Templates kept; the least recently used beyond these are removed when one is added.
pub const KEEP_TEMPLATES: usize = 4;

/// Where templates live: `<cache>/warm`.
pub fn dir() -> PathBuf {
    crate::assets::cache_dir().join("warm")
}

/// A file's identity for a key: path, size and modification time (as the initramfs cache
/// keys its inputs). Rebuilding a kernel or msb-init changes it; a jail's bind mount of the
/// same file does not.
pub fn identity(path: &Path) -> std::io::Result<String> {
    Ok(format!("{}:{}", path.display(), file_stamp(path)?))
}

/// The key of a template: a hex digest of `inputs` (one line per input, as
/// [`crate::sandbox::SandboxBuilder`] lists them) and of this build of the VMM.
pub fn key(inputs: &str) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "warm v{WARM_VERSION}\nsnapshot v{}\nvmm {}\n",
        crate::snapshot::FORMAT_VERSION,
        // A new VMM build may save devices differently: its templates are its own. By the
        // running file itself, whatever its path (a jail shows it elsewhere).
        file_stamp(Path::new("/proc/self/exe"))
            .unwrap_or_else(|_| env!("CARGO_PKG_VERSION").to_string())
    ));
    h.update(inputs.as_bytes());
    h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The template saved under `key`, if there is a complete one; its use is recorded (its
/// directory's modification time) so pruning removes the least recently used.
pub fn lookup(key: &str) -> Option<PathBuf> {
    let path = dir().join(key);
    let complete = path.join(crate::sandbox::SANDBOX_FILE).is_file()
        && path.join(crate::snapshot::STATE_FILE).is_file()
        && path.join(crate::snapshot::MEMORY_FILE).is_file();
    if !complete {
        return None;
    }
    if let Ok(f) = std::fs::File::open(&path) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
    Some(path)
}

/// A temporary directory beside `final_dir` to save a template into before it is renamed
/// into place (so a template is either whole or absent, whatever runs concurrently).
pub fn staging(final_dir: &Path) -> PathBuf {
    let name = final_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    final_dir.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Moves a saved template from `staging` to `final_dir`. If another process saved the same
/// template first, ours is discarded: both are equivalent.
pub fn publish(staging: &Path, final_dir: &Path) -> std::io::Result<()> {
    match std::fs::rename(staging, final_dir) {
        Ok(()) => Ok(()),
        Err(_) if final_dir.join(crate::sandbox::SANDBOX_FILE).is_file() => {
            let _ = std::fs::remove_dir_all(staging);
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(staging);
            Err(e)
        }
    }
}

/// Removes a template that failed to restore, so the next run saves a good one.
pub fn discard(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        tracing::debug!("removing warm snapshot {}: {e}", path.display());
    }
}

/// Prepares `<cache>/warm` for one more template: creates it (0700: a template holds a
/// guest's memory) and removes all but the `keep - 1` most recently used templates, and
/// staging directories of processes that are gone.
pub fn make_room(dir: &Path, keep: usize) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // A jail binds the cache read-only: say so here rather than fail after a boot.
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
        .map_err(std::io::Error::other)?;
    // SAFETY: `c` is a valid NUL-terminated path; access(2) only reads it.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut templates = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix('.') {
            // `.KEY.PID.tmp`: a staging directory; its owner may still be saving.
            let pid = rest
                .strip_suffix(".tmp")
                .and_then(|r| r.rsplit('.').next())
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
            continue;
        }
        if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
            templates.push((t, e.path()));
        }
    }
    templates.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
    for (_, p) in templates.into_iter().skip(keep.saturating_sub(1)) {
        tracing::debug!(
            "removing the least recently used warm snapshot {}",
            p.display()
        );
        let _ = std::fs::remove_dir_all(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_every_input_and_repeat_for_the_same() {
        let a = key("kernel k 1\ncpus 1\n");
        assert_eq!(a, key("kernel k 1\ncpus 1\n"));
        assert_ne!(a, key("kernel k 1\ncpus 2\n"));
        assert_eq!(a.len(), 24);
    }

    #[test]
    fn staging_sits_beside_the_template_and_names_this_process() {
        let s = staging(Path::new("/c/warm/abc"));
        assert_eq!(
            s,
            PathBuf::from(format!("/c/warm/.abc.{}.tmp", std::process::id()))
        );
    }

    #[test]
    fn publish_keeps_the_first_template_and_drops_a_second() {
        let root = std::env::temp_dir().join(format!("msb-warm-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let fin = root.join("key");
        for (i, name) in ["a", "b"].iter().enumerate() {
            let st = root.join(name);
            std::fs::create_dir_all(&st).unwrap();
            std::fs::write(st.join(crate::sandbox::SANDBOX_FILE), name).unwrap();
            publish(&st, &fin).unwrap();
            assert!(!st.exists(), "staging {i} is gone");
        }
        assert_eq!(
            std::fs::read(fin.join(crate::sandbox::SANDBOX_FILE)).unwrap(),
            b"a"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn make_room_keeps_the_most_recently_used_and_live_staging() {
        let root = std::env::temp_dir().join(format!("msb-warm-room-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let now = std::time::SystemTime::now();
        for (i, name) in ["t0", "t1", "t2", "t3", "t4"].iter().enumerate() {
            let p = root.join(name);
            std::fs::create_dir(&p).unwrap();
            let f = std::fs::File::open(&p).unwrap();
            f.set_modified(now - std::time::Duration::from_secs(100 * i as u64))
                .unwrap();
        }
        let live = root.join(format!(".t9.{}.tmp", std::process::id()));
        let dead = root.join(".t8.4000000000.tmp");
        std::fs::create_dir(&live).unwrap();
        std::fs::create_dir(&dead).unwrap();
        make_room(&root, 3).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![
                format!(".t9.{}.tmp", std::process::id()),
                "t0".into(),
                "t1".into()
            ]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
