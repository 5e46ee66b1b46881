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
//!
//! Toward the guest, when its side takes them (`VIRTIO_NET_F_GUEST_CSUM` and `GUEST_TSO4/6`
//! negotiated, or a TAP device's vnet header): smoltcp leaves TCP checksums out and sends
//! segments of up to 64 KiB, because the guest's SYN is shown to it with a raised MSS
//! ([`raise_mss`]); [`to_guest`] puts the pseudo-header sum in each segment and the header that
//! tells the guest to take it as segments of the MSS it asked for. No pass over the data is
//! made on our side and one frame carries what 45 frames of 1500 bytes would.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

/// `virtio_net_hdr_v1` is 12 bytes (the last two, `num_buffers`, only matter toward the guest).
pub const VNET_HDR_LEN: usize = 12;
/// The largest frame an offloading guest may send: a 64 KiB IP packet and its Ethernet header.
pub const MAX_OFFLOAD_FRAME: usize = 14 + 65535;

/// The header bytes we read (flags to `csum_offset`; `num_buffers` is not ours).
const HDR_READ: usize = 10;
const F_NEEDS_CSUM: u8 = 1;
/// The MSS a guest's SYN is shown to smoltcp with when offloading: a 64 KiB IP packet less the
/// largest IPv6 and TCP headers, so no segment's IP length overflows whatever options it has.
pub const RAISED_MSS: u16 = 65535 - 60 - 60;
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

/// Raises the MSS option of a guest's TCP SYN (or SYN-ACK) to [`RAISED_MSS`], returning
/// the connection's (guest, remote) ends and the MSS the guest asked for; `None` (and the
/// frame untouched) for any other frame, or one without an MSS option or already asking for
/// more. The TCP checksum is left stale: the stack does not check guest checksums.
pub fn raise_mss(frame: &mut [u8]) -> Option<(TcpEnds, u16)> {
    let l4 = tcp_offset(frame)?;
    let tcp = frame.get_mut(l4..)?;
    if tcp.len() < 20 || tcp[13] & 0x02 == 0 {
        return None;
    }
    let thl = ((tcp[12] >> 4) as usize * 4).min(tcp.len());
    let mut i = 20;
    while i < thl {
        match tcp[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = *tcp.get(i + 1)? as usize;
                if len < 2 || i + len > thl {
                    return None;
                }
                if kind == 2 && len == 4 {
                    let mss = u16::from_be_bytes([tcp[i + 2], tcp[i + 3]]);
                    if mss >= RAISED_MSS {
                        return None;
                    }
                    tcp[i + 2..i + 4].copy_from_slice(&RAISED_MSS.to_be_bytes());
                    let (src, dst) = addresses(frame, l4);
                    let ports = |o: usize| u16::from_be_bytes([frame[l4 + o], frame[l4 + o + 1]]);
                    return Some((((src, ports(0)), (dst, ports(2))), mss));
                }
                i += len;
            }
        }
    }
    None
}

/// Where the TCP header of an Ethernet frame carrying TCP over IPv4 (unfragmented) or IPv6
/// (no extension headers) starts.
fn tcp_offset(frame: &[u8]) -> Option<usize> {
    let ip = frame.get(14..)?;
    match u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]) {
        0x0800 => {
            let ihl = (*ip.first()? & 0xf) as usize * 4;
            let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x3fff;
            (ip[0] >> 4 == 4 && ihl >= 20 && *ip.get(9)? == 6 && frag == 0 && ip.len() >= ihl)
                .then_some(14 + ihl)
        }
        0x86dd => (ip.len() >= 40 && ip[0] >> 4 == 6 && ip[6] == 6).then_some(54),
        _ => None,
    }
}

/// The source and destination addresses of a frame [`tcp_offset`] found to be TCP at `l4`.
fn addresses(frame: &[u8], l4: usize) -> (IpAddr, IpAddr) {
    if l4 == 54 && frame[12] == 0x86 {
        let a = |o: usize| {
            IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&frame[o..o + 16]).expect("16"),
            ))
        };
        (a(22), a(38))
    } else {
        let a = |o: usize| {
            IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(&frame[o..o + 4]).expect("4"),
            ))
        };
        (a(26), a(30))
    }
}

/// The two ends of a TCP segment to the guest: (guest, remote) addresses and ports.
pub type TcpEnds = ((IpAddr, u16), (IpAddr, u16));

/// Prepares a frame smoltcp built (TCP checksum left out) for an offloading guest: a TCP
/// segment gets the pseudo-header sum in its checksum field and a header asking the guest to
/// finish it, and, when it carries more than one segment's worth, to take it as segments of
/// `mss(ends)` (the MSS the guest asked for; else what `mtu` allows) less the TCP options.
/// `None` for anything else, which goes as it is.
pub fn to_guest(
    frame: &mut [u8],
    mtu: usize,
    mss: impl FnOnce(TcpEnds) -> Option<u16>,
) -> Option<[u8; VNET_HDR_LEN]> {
    let l4 = tcp_offset(frame)?;
    let (v6, ip) = (l4 == 54 && frame[12] == 0x86, &frame[14..l4]);
    let (tcp_len, pseudo) = if v6 {
        let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
        (len, sum16(&ip[8..40]))
    } else {
        let len = (u16::from_be_bytes([ip[2], ip[3]]) as usize).checked_sub(l4 - 14)?;
        (len, sum16(&ip[12..20]))
    };
    let (src, dst) = addresses(frame, l4);
    let tcp = frame.get_mut(l4..l4 + tcp_len)?;
    if tcp.len() < 20 {
        return None;
    }
    let thl = (tcp[12] >> 4) as usize * 4;
    let payload = tcp_len.checked_sub(thl)?;
    let ports = (
        u16::from_be_bytes([tcp[0], tcp[1]]),
        u16::from_be_bytes([tcp[2], tcp[3]]),
    );
    let sum = fold(pseudo + 6 + tcp_len as u64);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let options = thl - 20;
    let by_mtu = mtu.saturating_sub(l4 - 14 + thl);
    let seg = match mss(((dst, ports.1), (src, ports.0))) {
        Some(m) => (m as usize).saturating_sub(options).min(by_mtu),
        None => by_mtu,
    }
    .max(1);
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[0] = F_NEEDS_CSUM;
    if payload > seg {
        hdr[1] = if v6 { GSO_TCPV6 } else { GSO_TCPV4 };
        hdr[2..4].copy_from_slice(&((l4 + thl) as u16).to_le_bytes());
        hdr[4..6].copy_from_slice(&(seg as u16).to_le_bytes());
    }
    hdr[6..8].copy_from_slice(&(l4 as u16).to_le_bytes());
    hdr[8..10].copy_from_slice(&16u16.to_le_bytes());
    Some(hdr)
}

/// Whether a header from [`to_guest`] asks for segmentation.
pub fn is_segmented(hdr: &[u8; VNET_HDR_LEN]) -> bool {
    hdr[1] & !GSO_ECN != GSO_NONE
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
