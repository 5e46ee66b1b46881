//! The snapshot directory: `state.bin` (what the VM, its vCPUs and devices hold) and
//! `memory.bin` (guest RAM, region after region, mapped back privately on restore).
//!
//! `state.bin` is a header and a postcard payload:
//!
//! ```text
//! magic "MSBSNAP\0" | format version u32 LE | payload length u64 LE | SHA-256 of payload | payload
//! ```
//!
//! A file from another format version, a truncated or corrupted file, or one written for
//! another architecture is refused with one line before anything is mapped or run.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// The guest memory file's name.
pub const MEMORY_FILE: &str = "memory.bin";

const MAGIC: &[u8; 8] = b"MSBSNAP\0";
/// Bumped whenever the payload's layout changes; older files are refused, not guessed at.
pub const FORMAT_VERSION: u32 = 2;
const HEADER: usize = 8 + 4 + 8 + 32;
/// The largest state file read (the state of 64 vCPUs is a few MiB).
const MAX_STATE: u64 = 64 << 20;

/// Why a snapshot could not be written or read.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not an msb-vmm snapshot (bad magic)", .0.display())]
    NotASnapshot(PathBuf),
    #[error("{} is a snapshot of format {found}; this msb-vmm reads format {FORMAT_VERSION}: take the snapshot again with this version", .path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("{} is truncated or corrupted (its checksum does not match): take the snapshot again", .0.display())]
    Corrupt(PathBuf),
    #[error("{}: {msg}", .path.display())]
    Decode { path: PathBuf, msg: String },
    #[error("encoding the snapshot state: {0}")]
    Encode(String),
    #[error("the snapshot was taken on {found}; this host is {here}")]
    Arch { found: String, here: &'static str },
    #[error("{0}")]
    Invalid(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Encodes `state` into the bytes of a state file.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, SnapshotError> {
    let payload = postcard::to_stdvec(state).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a state file's bytes (`path` names it in errors). Any input gives a value or an
/// error, never a panic.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, SnapshotError> {
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err(SnapshotError::NotASnapshot(path.to_path_buf()));
    }
    if bytes.len() < HEADER {
        return Err(SnapshotError::Corrupt(path.to_path_buf()));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(len);
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != len || Sha256::digest(payload)[..] != bytes[20..HEADER] {
        return Err(SnapshotError::Corrupt(path.to_path_buf()));
    }
    postcard::from_bytes(payload).map_err(|e| SnapshotError::Decode {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a full disk or a crash
/// never leaves a half-written file under the real name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    write_atomic_with(path, |f| f.write_all(bytes).map_err(io("writing", path)))
}

/// Creates `path` as [`write_atomic`] does, with `fill` writing the temporary file: it is
/// synced and renamed into place only if `fill` succeeds, and removed otherwise.
pub fn write_atomic_with<T, E: From<SnapshotError>>(
    path: &Path,
    fill: impl FnOnce(&mut std::fs::File) -> Result<T, E>,
) -> Result<T, E> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(io("writing", path))?;
    let result = fill(&mut f).and_then(|v| {
        f.sync_all()
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(io("writing", path))?;
        Ok(v)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads and decodes the state file in `dir`.
pub fn read_state<T: DeserializeOwned>(dir: &Path) -> Result<T, SnapshotError> {
    use std::io::Read;
    let path = dir.join(STATE_FILE);
    let f = std::fs::File::open(&path).map_err(io("opening", &path))?;
    let mut bytes = Vec::new();
    f.take(MAX_STATE + 1)
        .read_to_end(&mut bytes)
        .map_err(io("reading", &path))?;
    if bytes.len() as u64 > MAX_STATE {
        return Err(SnapshotError::Corrupt(path));
    }
    decode(&bytes, &path)
}

/// One guest RAM region as saved: where it is in the guest and in `memory.bin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Checks regions read from a snapshot before anything is mapped: page-aligned, within the
/// memory file, in order, not overlapping, and adding up to at most `max_bytes`.
pub fn check_regions(
    regions: &[MemoryRegion],
    file_len: u64,
    max_bytes: u64,
) -> Result<(), SnapshotError> {
    const PAGE: u64 = 4096;
    let bad = |m: String| {
        Err(SnapshotError::Invalid(format!(
            "snapshot memory layout: {m}"
        )))
    };
    if regions.is_empty() {
        return bad("no memory".into());
    }
    let mut total = 0u64;
    let mut next_guest = 0u64;
    let mut next_file = 0u64;
    for r in regions {
        if r.len == 0 || (r.guest_addr | r.len | r.file_offset) % PAGE != 0 {
            return bad(format!("region at {:#x} is not page-aligned", r.guest_addr));
        }
        let (Some(g_end), Some(f_end)) = (
            r.guest_addr.checked_add(r.len),
            r.file_offset.checked_add(r.len),
        ) else {
            return bad(format!("region at {:#x} overflows", r.guest_addr));
        };
        if r.guest_addr < next_guest || r.file_offset < next_file {
            return bad(format!("region at {:#x} overlaps another", r.guest_addr));
        }
        if f_end > file_len {
            return bad(format!(
                "region at {:#x} ends past the memory file ({file_len} bytes)",
                r.guest_addr
            ));
        }
        total = total.saturating_add(r.len);
        (next_guest, next_file) = (g_end, f_end);
    }
    if total > max_bytes {
        return bad(format!("{total} bytes of RAM, more than {max_bytes}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct S {
        a: u32,
        b: Vec<u8>,
    }

    fn p() -> &'static Path {
        Path::new("/snap/state.bin")
    }

    #[test]
    fn a_state_round_trips_and_damage_is_named() {
        let s = S {
            a: 7,
            b: vec![1, 2, 3],
        };
        let bytes = encode(&s).unwrap();
        assert_eq!(decode::<S>(&bytes, p()).unwrap(), s);
        // Truncated anywhere, or one bit flipped in the payload.
        for cut in [0, 5, 12, HEADER - 1, HEADER, bytes.len() - 1] {
            let e = decode::<S>(&bytes[..cut], p()).unwrap_err();
            assert!(
                matches!(
                    e,
                    SnapshotError::NotASnapshot(_) | SnapshotError::Corrupt(_)
                ),
                "cut at {cut}: {e}"
            );
        }
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            decode::<S>(&flipped, p()),
            Err(SnapshotError::Corrupt(_))
        ));
        let mut newer = bytes.clone();
        newer[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        let e = decode::<S>(&newer, p()).unwrap_err();
        let want = format!("format {}", FORMAT_VERSION + 1);
        assert!(e.to_string().contains(&want), "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn the_file_is_written_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("msb-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = S { a: 1, b: vec![] };
        write_atomic(&dir.join(STATE_FILE), &encode(&s).unwrap()).unwrap();
        assert_eq!(read_state::<S>(&dir).unwrap(), s);
        // Into a directory that does not exist: an error naming it, nothing left behind.
        let gone = dir.join("nope").join(STATE_FILE);
        let e = write_atomic(&gone, b"x").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = read_state::<S>(&dir.join("nope")).unwrap_err();
        assert!(e.to_string().contains("opening"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn memory_layouts_are_checked_before_mapping() {
        let r = |guest_addr, len, file_offset| MemoryRegion {
            guest_addr,
            len,
            file_offset,
        };
        let ok = [r(0, 0x10_0000, 0), r(0x1_0000_0000, 0x2000, 0x10_0000)];
        check_regions(&ok, 0x10_2000, 1 << 30).unwrap();
        for (bad, why) in [
            (vec![], "no memory"),
            (vec![r(0, 0x1001, 0)], "page-aligned"),
            (vec![r(0, 0x2000, 0), r(0x1000, 0x1000, 0x2000)], "overlaps"),
            (vec![r(0, 0x2000, 0x2000)], "past the memory file"),
            (vec![r(!0xfff, 0x2000, 0)], "overflows"),
        ] {
            let e = check_regions(&bad, 0x3000, 1 << 30).unwrap_err();
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
        }
        let e = check_regions(&ok, 0x10_2000, 0x1000).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }
}
