//! Kernel image inspection and loading. We parse the ELF headers ourselves first so a wrong
//! file gets a precise message (and a PVM host can refuse a Linux kernel) before any guest
//! memory exists; linux-loader then does the actual loading.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Errors about the kernel or initramfs files.
#[derive(Debug, Error)]
pub enum LoaderError {
    #[error(
        "kernel {0}: no such file (build the default one with `./x setup`, or pass --kernel PATH)"
    )]
    KernelMissing(PathBuf),
    #[error("kernel {path}: {source}")]
    KernelIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {0}: not an ELF image; msb-vmm boots an uncompressed `vmlinux` (a bzImage/vmlinuz will not work)")]
    NotElf(PathBuf),
    #[error("kernel {0}: not a 64-bit x86 ELF executable")]
    WrongArch(PathBuf),
    #[error("kernel {path}: malformed ELF: {what}")]
    Malformed { path: PathBuf, what: &'static str },
    /// An arm64 `Image` the header of which we refuse (the message names why and the fix).
    #[error("kernel {path}: {msg}")]
    BadImage { path: PathBuf, msg: String },
    #[error("initramfs {path}: {source}")]
    Initrd {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the VMM needs to know about a kernel before loading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    /// ELF entry point (the 64-bit entry for Linux).
    pub entry: u64,
    /// PVH 32-bit entry, from the XEN_ELFNOTE_PHYS32_ENTRY note.
    pub pvh_entry: Option<u64>,
    /// Lowest physical load address.
    pub load_start: u64,
    /// End of the highest loaded segment (physical, including .bss).
    pub load_end: u64,
    /// Whether the image carries Linux's own ELF notes (a Linux kernel, not a test guest).
    pub is_linux: bool,
}

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Most program headers we read; real kernels have fewer than ten.
const MAX_PHDRS: u16 = 64;
/// Largest note segment we read.
const MAX_NOTES: u64 = 1 << 16;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default())
}

/// Opens a kernel image; a missing file is the error that names `./x setup` and `--kernel`.
pub fn open_kernel(path: &Path) -> Result<File, LoaderError> {
    File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            LoaderError::KernelMissing(path.to_path_buf())
        } else {
            LoaderError::KernelIo {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })
}

/// Reads the ELF header, program headers and notes of `path`.
pub fn inspect_kernel(path: &Path) -> Result<KernelInfo, LoaderError> {
    let io = |source| LoaderError::KernelIo {
        path: path.to_path_buf(),
        source,
    };
    let bad = |what| LoaderError::Malformed {
        path: path.to_path_buf(),
        what,
    };
    let mut f = open_kernel(path)?;
    if f.metadata().map_err(io)?.is_dir() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is a directory",
        )));
    }
    let mut eh = [0u8; 64];
    if f.read_exact(&mut eh).is_err() || &eh[..4] != b"\x7fELF" {
        return Err(LoaderError::NotElf(path.to_path_buf()));
    }
    // ELFCLASS64, little endian, EM_X86_64.
    if eh[4] != 2 || eh[5] != 1 || u16_at(&eh, 18) != 62 {
        return Err(LoaderError::WrongArch(path.to_path_buf()));
    }
    let entry = u64_at(&eh, 24);
    let phoff = u64_at(&eh, 32);
    let phentsize = u16_at(&eh, 54);
    let phnum = u16_at(&eh, 56);
    if phentsize != 56 || phnum == 0 || phnum > MAX_PHDRS {
        return Err(bad("unexpected program header table"));
    }
    let mut ph = vec![0u8; 56 * phnum as usize];
    f.seek(SeekFrom::Start(phoff)).map_err(io)?;
    f.read_exact(&mut ph)
        .map_err(|_| bad("program headers past the end of the file"))?;
    let mut info = KernelInfo {
        entry,
        pvh_entry: None,
        load_start: u64::MAX,
        load_end: 0,
        is_linux: false,
    };
    let mut notes = Vec::new();
    for p in ph.chunks(56) {
        let (ptype, offset, paddr, filesz, memsz) = (
            u32_at(p, 0),
            u64_at(p, 8),
            u64_at(p, 24),
            u64_at(p, 32),
            u64_at(p, 40),
        );
        match ptype {
            PT_LOAD if memsz > 0 => {
                if filesz > memsz {
                    return Err(bad("segment file size exceeds its memory size"));
                }
                let end = paddr
                    .checked_add(memsz)
                    .ok_or_else(|| bad("segment address overflows"))?;
                info.load_start = info.load_start.min(paddr);
                info.load_end = info.load_end.max(end);
            }
            PT_NOTE if filesz <= MAX_NOTES => notes.push((offset, filesz)),
            _ => {}
        }
    }
    if info.load_end == 0 {
        return Err(bad("no loadable segments"));
    }
    for (offset, size) in notes {
        let mut buf = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(offset)).map_err(io)?;
        f.read_exact(&mut buf)
            .map_err(|_| bad("note segment past the end of the file"))?;
        parse_notes(&buf, &mut info);
    }
    Ok(info)
}

/// Walks an ELF note segment: picks up the PVH entry and Linux's notes. Malformed notes end
/// the walk (they cannot hide a PVH entry from a well-formed kernel).
fn parse_notes(buf: &[u8], info: &mut KernelInfo) {
    let mut at = 0usize;
    while at + 12 <= buf.len() {
        let namesz = u32_at(buf, at) as usize;
        let descsz = u32_at(buf, at + 4) as usize;
        let ntype = u32_at(buf, at + 8);
        let name_start = at + 12;
        let Some(desc_start) = name_start.checked_add(namesz.next_multiple_of(4)) else {
            return;
        };
        let Some(next) = desc_start.checked_add(descsz.next_multiple_of(4)) else {
            return;
        };
        if next > buf.len() || desc_start > buf.len() {
            return;
        }
        let name = &buf[name_start..name_start + namesz];
        let desc = &buf[desc_start..desc_start + descsz];
        if name == b"Xen\0" && ntype == XEN_ELFNOTE_PHYS32_ENTRY && descsz >= 4 {
            info.pvh_entry = Some(if descsz >= 8 {
                u64_at(desc, 0)
            } else {
                u64::from(u32_at(desc, 0))
            });
        }
        if name == b"Linux\0" {
            info.is_linux = true;
        }
        at = next;
    }
}

/// Reads an initramfs file, mapping errors to one clear line.
pub fn read_initrd(path: &Path) -> Result<Vec<u8>, LoaderError> {
    std::fs::read(path).map_err(|source| LoaderError::Initrd {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], ntype: u32, desc: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend((name.len() as u32).to_le_bytes());
        v.extend((desc.len() as u32).to_le_bytes());
        v.extend(ntype.to_le_bytes());
        v.extend(name);
        v.resize(v.len().next_multiple_of(4), 0);
        v.extend(desc);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    fn blank() -> KernelInfo {
        KernelInfo {
            entry: 0,
            pvh_entry: None,
            load_start: 0,
            load_end: 1,
            is_linux: false,
        }
    }

    #[test]
    fn finds_pvh_and_linux_notes() {
        let mut buf = note(b"GNU\0", 3, &[1; 20]);
        buf.extend(note(b"Linux\0", 0x100, &[0; 4]));
        buf.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x0100_0000u32.to_le_bytes(),
        ));
        let mut info = blank();
        parse_notes(&buf, &mut info);
        assert_eq!(info.pvh_entry, Some(0x0100_0000));
        assert!(info.is_linux);
    }

    #[test]
    fn hostile_notes_do_not_panic() {
        for buf in [
            vec![0xff; 12],
            vec![
                4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 18, 0, 0, 0, b'X', b'e', b'n', 0,
            ],
            vec![0xfc, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0],
            vec![1, 2, 3],
        ] {
            let mut info = blank();
            parse_notes(&buf, &mut info);
            assert_eq!(info.pvh_entry, None);
        }
    }

    #[test]
    fn clear_errors_for_wrong_files() {
        let dir = std::env::temp_dir().join(format!("msb-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing");
        assert!(matches!(
            inspect_kernel(&missing),
            Err(LoaderError::KernelMissing(_))
        ));
        let text = dir.join("text");
        std::fs::write(
            &text,
            b"not a kernel at all, just some text that is long enough",
        )
        .unwrap();
        assert!(matches!(inspect_kernel(&text), Err(LoaderError::NotElf(_))));
        let mut elf32 = vec![0u8; 64];
        elf32[..4].copy_from_slice(b"\x7fELF");
        elf32[4] = 1;
        std::fs::write(&text, &elf32).unwrap();
        assert!(matches!(
            inspect_kernel(&text),
            Err(LoaderError::WrongArch(_))
        ));
        assert!(inspect_kernel(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
