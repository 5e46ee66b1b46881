//! Offloads from the guest's side: with `VIRTIO_NET_F_CSUM` and `HOST_TSO4/6` negotiated (or
//! a TAP device with `IFF_VNET_HDR` and `TUNSETOFFLOAD`), a frame may leave the guest with
//! its TCP/UDP checksum only started (the pseudo-header sum in place) and, for TCP, as one
//! segment of up to 64 KiB whatever the MTU. smoltcp takes large segments as they are, and
//! the stack does not verify the guest's checksums (a virtual link corrupts nothing, and a
//! wrong checksum could only hurt the guest), so honouring these offloads costs no pass over
//! the data: [`accept`] checks the header and fixes a segmentation frame's IP header; the
//! guest's TCP then sends 64 KiB per frame at the default MTU instead of 1500 bytes.
//!
//! The header is guest input: every offset is checked against the frame.

use thiserror::Error;

/// `virtio_net_hdr_v1` is 12 bytes (the last two, `num_buffers`, only matter toward the guest).
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame an offloading guest may send: a 64 KiB IP packet and its Ethernet header.
pub const MAX_OFFLOAD_FRAME: usize = 14 + 65535;

/// The header bytes we read (flags to `csum_offset`; `num_buffers` is not ours).
const HDR_READ: usize = 10;
const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum OffloadError {
    #[error("virtio-net header shorter than {HDR_READ} bytes")]
    Short,
    #[error("checksum start {start} + offset {offset} outside a {len}-byte frame")]
    Checksum {
        start: usize,
        offset: usize,
        len: usize,
    },
    #[error("segmentation type {0:#x} was not offered")]
    Gso(u8),
    #[error("a {0}-byte frame is too large")]
    TooLarge(usize),
    #[error("a segmented frame that is not TCP over IPv4 or IPv6")]
    NotTcp,
}

/// Accepts `frame` as its virtio-net header `hdr` describes it: the header must be one we
/// offered (no segmentation but TCP, checksum offsets inside the frame); a TCP segmentation
/// frame gets its IP header's length (and IPv4 header checksum) set to describe the whole
/// frame, as some senders leave one segment's there. The transport checksum stays as the
/// guest left it.
pub fn accept(hdr: &[u8], frame: &mut [u8]) -> Result<(), OffloadError> {
    if let Some(gso) = segmentation(hdr, frame)? {
        fix_ip_header(frame, gso)?;
    }
    Ok(())
}

/// The segmentation a header asks for, once the header is checked against its frame.
fn segmentation(hdr: &[u8], frame: &[u8]) -> Result<Option<u8>, OffloadError> {
    if hdr.len() < HDR_READ {
        return Err(OffloadError::Short);
    }
    if frame.len() > MAX_OFFLOAD_FRAME {
        return Err(OffloadError::TooLarge(frame.len()));
    }
    let (flags, gso) = (hdr[0], hdr[1] & !GSO_ECN);
    let gso = match gso {
        GSO_NONE => None,
        GSO_TCPV4 | GSO_TCPV6 => Some(gso),
        other => return Err(OffloadError::Gso(other)),
    };
    if flags & F_NEEDS_CSUM != 0 {
        let start = u16::from_le_bytes([hdr[6], hdr[7]]) as usize;
        let offset = u16::from_le_bytes([hdr[8], hdr[9]]) as usize;
        let field = start + offset;
        if start > frame.len() || field + 2 > frame.len() {
            return Err(OffloadError::Checksum {
                start,
                offset,
                len: frame.len(),
            });
        }
    }
    Ok(gso)
}

/// The IP header of a TCP segmentation frame: IPv4's total length and header checksum made
/// to describe the whole frame; IPv6's payload length likewise.
fn fix_ip_header(frame: &mut [u8], gso: u8) -> Result<(), OffloadError> {
    let ethertype = match frame.get(12..14) {
        Some(t) => u16::from_be_bytes([t[0], t[1]]),
        None => return Err(OffloadError::NotTcp),
    };
    let ip = &mut frame[14..];
    match (ethertype, gso) {
        (0x0800, GSO_TCPV4) => {
            if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 6 {
                return Err(OffloadError::NotTcp);
            }
            let ihl = (ip[0] & 0xf) as usize * 4;
            if ihl < 20 || ip.len() < ihl {
                return Err(OffloadError::NotTcp);
            }
            let total = ip.len() as u16;
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            ip[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum16(&ip[..ihl]));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
        }
        (0x86dd, GSO_TCPV6) => {
            if ip.len() < 40 || ip[0] >> 4 != 6 || ip[6] != 6 {
                return Err(OffloadError::NotTcp);
            }
            let payload = (ip.len() - 40) as u16;
            ip[4..6].copy_from_slice(&payload.to_be_bytes());
        }
        _ => return Err(OffloadError::NotTcp),
    }
    Ok(())
}

/// The one's-complement sum of `data` as big-endian 16-bit words (odd tail padded), unfolded.
fn sum16(data: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_be_bytes(c.try_into().expect("8 bytes"));
        sum += (w >> 48) + ((w >> 32) & 0xffff) + ((w >> 16) & 0xffff) + (w & 0xffff);
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = rest.remainder() {
        sum += (*last as u64) << 8;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests;
