//! The arm64 `Image` header (Documentation/arch/arm64/booting.rst): the kernel is loaded at
//! a 2 MiB-aligned base plus `text_offset`, occupies `image_size` bytes from there (its BSS
//! included), and is entered at its first byte.

use thiserror::Error;

/// `ARM\x64`, little-endian, at offset 56.
const MAGIC: u32 = 0x644d_5241;
/// Header length.
pub const HEADER_LEN: usize = 64;
/// The text offset of kernels before 3.17, whose header has `image_size == 0`.
const OLD_TEXT_OFFSET: u64 = 0x8_0000;

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Offset from a 2 MiB-aligned base at which the image must be loaded.
    pub text_offset: u64,
    /// Bytes the kernel occupies from its load address (file and BSS); at least the file.
    pub image_size: u64,
    /// Bit 0: big-endian kernel (refused).
    pub flags: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("not an arm64 Image: {0} bytes, shorter than its 64-byte header")]
    Short(usize),
    #[error("not an arm64 Image (no ARM\\x64 magic at offset 56): pass the kernel's arch/arm64/boot/Image")]
    Magic,
    #[error("the kernel is big-endian; msb-vmm runs little-endian arm64 guests")]
    BigEndian,
    #[error("the Image header's text offset {0:#x} is not below 2 MiB")]
    TextOffset(u64),
}

impl ImageHeader {
    /// Reads the header at the start of `file` (`file_len` its whole length).
    pub fn parse(head: &[u8], file_len: u64) -> Result<ImageHeader, ImageError> {
        if head.len() < HEADER_LEN {
            return Err(ImageError::Short(head.len()));
        }
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&head[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let magic = u32::from_le_bytes([head[56], head[57], head[58], head[59]]);
        if magic != MAGIC {
            return Err(ImageError::Magic);
        }
        let (mut text_offset, image_size, flags) = (u64_at(8), u64_at(16), u64_at(24));
        if image_size == 0 {
            text_offset = OLD_TEXT_OFFSET;
        }
        if flags & 1 != 0 {
            return Err(ImageError::BigEndian);
        }
        if text_offset >= 0x20_0000 {
            return Err(ImageError::TextOffset(text_offset));
        }
        Ok(ImageHeader {
            text_offset,
            image_size: image_size.max(file_len),
            flags,
        })
    }

    /// Where the kernel goes in RAM starting at `ram_start` (2 MiB-aligned).
    pub fn load_addr(&self, ram_start: u64) -> u64 {
        ram_start.next_multiple_of(0x20_0000) + self.text_offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(text_offset: u64, image_size: u64, flags: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[8..16].copy_from_slice(&text_offset.to_le_bytes());
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[24..32].copy_from_slice(&flags.to_le_bytes());
        h[56..60].copy_from_slice(&MAGIC.to_le_bytes());
        h
    }

    #[test]
    fn a_modern_header_gives_its_offset_and_size() {
        let h = ImageHeader::parse(&header(0, 40 << 20, 0b1010), 30 << 20).unwrap();
        assert_eq!(h.text_offset, 0);
        assert_eq!(h.image_size, 40 << 20);
        assert_eq!(h.load_addr(0x4000_0000), 0x4000_0000);
    }

    #[test]
    fn an_old_header_uses_the_old_offset_and_at_least_the_file() {
        let h = ImageHeader::parse(&header(0x1234, 0, 0), 5 << 20).unwrap();
        assert_eq!(h.text_offset, 0x8_0000);
        assert_eq!(h.image_size, 5 << 20);
        assert_eq!(h.load_addr(0x4010_0000), 0x4020_0000 + 0x8_0000);
    }

    #[test]
    fn bad_headers_say_why() {
        assert_eq!(ImageHeader::parse(&[0; 10], 10), Err(ImageError::Short(10)));
        let mut h = header(0, 1 << 20, 0);
        h[56] ^= 1;
        assert_eq!(ImageHeader::parse(&h, 1 << 20), Err(ImageError::Magic));
        assert_eq!(
            ImageHeader::parse(&header(0, 1 << 20, 1), 1 << 20),
            Err(ImageError::BigEndian)
        );
        assert_eq!(
            ImageHeader::parse(&header(0x20_0000, 1 << 20, 0), 1 << 20),
            Err(ImageError::TextOffset(0x20_0000))
        );
        // An ELF vmlinux is refused with the fix.
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        assert!(ImageHeader::parse(&elf, 64)
            .unwrap_err()
            .to_string()
            .contains("arch/arm64/boot/Image"));
    }
}
