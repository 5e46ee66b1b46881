//! URL-safe base64 without padding (RFC 4648 §5): the kernel command line carries the workload
//! spec in it, and this alphabet has no byte the kernel's parser treats specially (space, quote,
//! `=`), so any argv/env bytes survive.

use thiserror::Error;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Why a string is not valid unpadded URL-safe base64.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Base64Error {
    #[error("invalid base64 character {0:#04x} at offset {1}")]
    InvalidByte(u8, usize),
    #[error("invalid base64 length {0}")]
    InvalidLength(usize),
}

/// Encodes `data` as unpadded URL-safe base64.
pub fn encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn value(c: u8, at: usize) -> Result<u32, Base64Error> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => return Err(Base64Error::InvalidByte(c, at)),
    };
    Ok(u32::from(v))
}

/// Decodes unpadded URL-safe base64; rejects padding, other alphabets and impossible lengths.
pub fn decode(text: &str) -> Result<Vec<u8>, Base64Error> {
    let bytes = text.as_bytes();
    if bytes.len() % 4 == 1 {
        return Err(Base64Error::InvalidLength(bytes.len()));
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3 + 2);
    for (ci, chunk) in bytes.chunks(4).enumerate() {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= value(c, ci * 4 + i)? << (18 - 6 * i);
        }
        let produced = chunk.len() - 1;
        for i in 0..produced {
            out.push((n >> (16 - 8 * i)) as u8);
        }
        // Non-canonical trailing bits would let two strings decode to the same bytes.
        let used_bits = produced * 8;
        let total_bits = chunk.len() * 6;
        if total_bits > used_bits && n & ((1 << (24 - used_bits)) - 1) != 0 {
            return Err(Base64Error::InvalidByte(
                chunk[chunk.len() - 1],
                ci * 4 + chunk.len() - 1,
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode(plain.as_bytes()), enc);
            assert_eq!(decode(enc).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn round_trips_every_byte() {
        let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for len in 0..all.len() {
            assert_eq!(decode(&encode(&all[..len])).unwrap(), &all[..len]);
        }
        assert!(encode(&all)
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode("Zg="), Err(Base64Error::InvalidByte(b'=', 2)));
        assert_eq!(decode("Z"), Err(Base64Error::InvalidLength(1)));
        assert!(decode("Zh").is_err(), "non-canonical trailing bits");
        assert!(decode("a+b/").is_err(), "standard alphabet is not accepted");
    }
}
