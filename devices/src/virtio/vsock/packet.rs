//! virtio-vsock packet headers (virtio 1.2, 5.10.6): 44 bytes, little-endian. Parsing treats
//! every field from the guest as hostile.

use thiserror::Error;

/// Header size.
pub const HDR_LEN: usize = 44;
/// Stream sockets, the only type we support.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload accepted in one packet from the guest (Linux sends at most 64 KiB).
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// The host's CID.
pub const HOST_CID: u64 = 2;

/// Operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    fn from_u16(v: u16) -> Option<Op> {
        Some(match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// SHUTDOWN flags.
pub const SHUTDOWN_RCV: u32 = 1;
/// The sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: Op,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// Why a header from the guest is unacceptable.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    #[error("packet shorter than a header ({0} bytes)")]
    Short(usize),
    #[error("unknown operation {0}")]
    UnknownOp(u16),
    #[error("socket type {0} is not stream")]
    NotStream(u16),
    #[error("payload length {0} exceeds {MAX_PAYLOAD}")]
    TooLong(u32),
    #[error("payload length {claimed} but only {available} bytes follow")]
    LengthMismatch { claimed: u32, available: usize },
    #[error("source CID {got} is not the guest's ({want})")]
    WrongSource { got: u64, want: u64 },
    #[error("destination CID {0} is not the host")]
    WrongDestination(u64),
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// Parses a header the guest sent; `payload_available` is how many readable bytes follow
    /// it in the descriptor chain.
    pub fn parse(
        bytes: &[u8],
        payload_available: usize,
        guest_cid: u64,
    ) -> Result<Header, HeaderError> {
        if bytes.len() < HDR_LEN {
            return Err(HeaderError::Short(bytes.len()));
        }
        let op_raw = u16_at(bytes, 30);
        let op = Op::from_u16(op_raw).ok_or(HeaderError::UnknownOp(op_raw))?;
        let h = Header {
            src_cid: u64_at(bytes, 0),
            dst_cid: u64_at(bytes, 8),
            src_port: u32_at(bytes, 16),
            dst_port: u32_at(bytes, 20),
            len: u32_at(bytes, 24),
            type_: u16_at(bytes, 28),
            op,
            flags: u32_at(bytes, 32),
            buf_alloc: u32_at(bytes, 36),
            fwd_cnt: u32_at(bytes, 40),
        };
        if h.src_cid != guest_cid {
            return Err(HeaderError::WrongSource {
                got: h.src_cid,
                want: guest_cid,
            });
        }
        if h.dst_cid != HOST_CID {
            return Err(HeaderError::WrongDestination(h.dst_cid));
        }
        if h.type_ != TYPE_STREAM {
            return Err(HeaderError::NotStream(h.type_));
        }
        if h.len > MAX_PAYLOAD {
            return Err(HeaderError::TooLong(h.len));
        }
        if h.op == Op::Rw && h.len as usize > payload_available {
            return Err(HeaderError::LengthMismatch {
                claimed: h.len,
                available: payload_available,
            });
        }
        Ok(h)
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&(self.op as u16).to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(op: Op) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: 5,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn round_trip() {
        let mut h = hdr(Op::Rw);
        h.len = 100;
        assert_eq!(Header::parse(&h.encode(), 100, 3), Ok(h));
    }

    #[test]
    fn hostile_headers() {
        assert_eq!(Header::parse(&[0; 43], 0, 3), Err(HeaderError::Short(43)));
        let mut b = hdr(Op::Rw).encode();
        b[30] = 99;
        assert_eq!(Header::parse(&b, 0, 3), Err(HeaderError::UnknownOp(99)));
        let mut h = hdr(Op::Rw);
        h.len = 10;
        assert!(matches!(
            Header::parse(&h.encode(), 9, 3),
            Err(HeaderError::LengthMismatch { .. })
        ));
        h.len = MAX_PAYLOAD + 1;
        assert!(matches!(
            Header::parse(&h.encode(), usize::MAX, 3),
            Err(HeaderError::TooLong(_))
        ));
        let mut h = hdr(Op::Request);
        h.src_cid = 2;
        assert!(matches!(
            Header::parse(&h.encode(), 0, 3),
            Err(HeaderError::WrongSource { .. })
        ));
        let mut h = hdr(Op::Request);
        h.dst_cid = 7;
        assert!(matches!(
            Header::parse(&h.encode(), 0, 3),
            Err(HeaderError::WrongDestination(7))
        ));
        let mut h = hdr(Op::Request);
        h.type_ = 2;
        assert!(matches!(
            Header::parse(&h.encode(), 0, 3),
            Err(HeaderError::NotStream(2))
        ));
    }
}
