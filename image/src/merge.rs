//! An image's root: its layers merged into one directory tree of hard links.
//!
//! Each layer is unpacked once into the store; an image's root is a tree whose directories are
//! its own and whose files are hard links to the layers' files (no data is copied, and an
//! image sharing layers with another shares their inodes). Whiteouts and opaque directories are
//! applied here. The root is served read-only under the guest's in-memory overlay, so the
//! shared inodes are never written.

use std::fs;
use std::io;
use std::path::Path;

use std::os::unix::ffi::OsStrExt;

use crate::unpack::{default_dir_stat, get_xattr, mkdir, set_xattr, LINK_XATTR, STAT_XATTR};

/// OCI whiteout prefix and opaque-directory marker.
pub const WHITEOUT: &str = ".wh.";
pub const OPAQUE: &str = ".wh..wh..opq";

/// Merges `layers` (lowest first) into `dest`, a new directory.
pub fn merge(layers: &[&Path], dest: &Path) -> io::Result<()> {
    mkdir(dest)?;
    set_xattr(dest, STAT_XATTR, default_dir_stat().as_bytes())?;
    for layer in layers {
        copy_stat(layer, dest)?;
        merge_dir(dest, layer, dest)?;
    }
    Ok(())
}

fn merge_dir(root: &Path, src: &Path, dest: &Path) -> io::Result<()> {
    let mut names: Vec<std::ffi::OsString> = fs::read_dir(src)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    // An opaque directory hides everything the lower layers put here.
    if names.iter().any(|n| n == OPAQUE) {
        for e in fs::read_dir(dest)? {
            remove(&e?.path())?;
        }
    }
    for n in &names {
        let s = n.to_string_lossy();
        if let Some(hidden) = s.strip_prefix(WHITEOUT) {
            if s != OPAQUE && !hidden.is_empty() && hidden != "." && hidden != ".." {
                remove(&dest.join(hidden))?;
            }
        }
    }
    for n in &names {
        if n.to_string_lossy().starts_with(WHITEOUT) {
            continue;
        }
        let from = src.join(n);
        let to = dest.join(n);
        let m = fs::symlink_metadata(&from)?;
        if m.is_dir() {
            match fs::symlink_metadata(&to) {
                Ok(t) if t.is_dir() => {}
                Ok(_) => {
                    fs::remove_file(&to)?;
                    mkdir(&to)?;
                }
                Err(_) => mkdir(&to)?,
            }
            copy_stat(&from, &to)?;
            merge_dir(root, &from, &to)?;
        } else if m.is_file() && m.len() == 0 && get_xattr(&from, LINK_XATTR).is_ok() {
            // A hard link to a lower layer's file: to the merged tree's file at that path.
            let target = get_xattr(&from, LINK_XATTR)?;
            let target = root.join(Path::new(std::ffi::OsStr::from_bytes(&target)));
            let ok =
                beneath(root, &target) && fs::symlink_metadata(&target).is_ok_and(|t| t.is_file());
            if !ok {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("hard link {} to a file no lower layer has", to.display()),
                ));
            }
            remove(&to)?;
            fs::hard_link(&target, &to)?;
        } else {
            remove(&to)?;
            fs::hard_link(&from, &to)?;
        }
    }
    Ok(())
}

/// Whether `path` (under `root`, built from checked relative names) is reached from `root`
/// through real directories only: a symlink on the way could lead out of the tree.
fn beneath(root: &Path, path: &Path) -> bool {
    let Ok(rel) = path.strip_prefix(root) else {
        return false;
    };
    let mut cur = root.to_path_buf();
    let parts: Vec<_> = rel.components().collect();
    for c in &parts[..parts.len().saturating_sub(1)] {
        match c {
            std::path::Component::Normal(n) => cur.push(n),
            _ => return false,
        }
        if !fs::symlink_metadata(&cur).is_ok_and(|m| m.is_dir()) {
            return false;
        }
    }
    !parts.is_empty()
}

/// Removes whatever is at `path` (nothing there is fine).
fn remove(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// A directory's guest-visible owner and mode follow the highest layer that has it, and so do
/// its other recorded attributes.
fn copy_stat(from: &Path, to: &Path) -> io::Result<()> {
    for name in list_xattrs(from)? {
        if name.starts_with("user.") {
            if let Ok(v) = get_xattr(from, &name) {
                set_xattr(to, &name, &v)?;
            }
        }
    }
    Ok(())
}

fn list_xattrs(path: &Path) -> io::Result<Vec<String>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 4096];
    // SAFETY: `p` is a valid C string and `buf` is writable for its length.
    let r = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}
