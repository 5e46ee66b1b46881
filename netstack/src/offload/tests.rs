use super::*;
use smoltcp::wire::{Ipv4Packet, Ipv6Address, Ipv6Packet};

/// An Ethernet + IPv4 (or IPv6) + TCP frame with `payload`, checksums left as the sender
/// would leave them for offload: the TCP field holds the pseudo-header sum.
fn partial_frame(v6: bool, payload: usize, proto: u8) -> (Vec<u8>, [u8; 12]) {
    let l4_hdr = if proto == 6 { 20 } else { 8 };
    let ip_hdr = if v6 { 40 } else { 20 };
    let l4_len = l4_hdr + payload;
    let mut f = vec![0u8; 14 + ip_hdr + l4_len];
    f[12..14].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    let (src, dst): (Vec<u8>, Vec<u8>) = if v6 {
        (
            Ipv6Address::new(0xfd00, 0x6d73, 0x62, 0, 0, 0, 0, 0x15)
                .octets()
                .to_vec(),
            Ipv6Address::new(0x2a00, 0x1450, 0, 0, 0, 0, 0, 1)
                .octets()
                .to_vec(),
        )
    } else {
        (vec![10, 0, 2, 15], vec![93, 184, 215, 14])
    };
    {
        let ip = &mut f[14..];
        if v6 {
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(l4_len as u16).to_be_bytes());
            ip[6] = proto;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&src);
            ip[24..40].copy_from_slice(&dst);
        } else {
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
            ip[8] = 64;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&src);
            ip[16..20].copy_from_slice(&dst);
        }
    }
    let l4 = 14 + ip_hdr;
    for (i, b) in f[l4 + l4_hdr..].iter_mut().enumerate() {
        *b = (i * 31 + 7) as u8;
    }
    if proto == 6 {
        f[l4..l4 + 2].copy_from_slice(&40000u16.to_be_bytes());
        f[l4 + 2..l4 + 4].copy_from_slice(&443u16.to_be_bytes());
        f[l4 + 12] = 5 << 4;
        f[l4 + 13] = 0x18;
    } else {
        f[l4..l4 + 2].copy_from_slice(&40000u16.to_be_bytes());
        f[l4 + 2..l4 + 4].copy_from_slice(&53u16.to_be_bytes());
        f[l4 + 4..l4 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
    // Pseudo-header sum, not complemented, in the checksum field.
    let mut pseudo = src.clone();
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4_len as u16).to_be_bytes());
    let field = if proto == 6 { 16 } else { 6 };
    f[l4 + field..l4 + field + 2].copy_from_slice(&fold(sum16(&pseudo)).to_be_bytes());
    let mut hdr = [0u8; 12];
    hdr[0] = 1; // NEEDS_CSUM
    hdr[6..8].copy_from_slice(&(l4 as u16).to_le_bytes());
    hdr[8..10].copy_from_slice(&(field as u16).to_le_bytes());
    (f, hdr)
}

#[test]
fn segmentation_frames_get_whole_ip_headers_and_keep_their_segment() {
    for v6 in [false, true] {
        for (payload, gso) in [
            (100, GSO_NONE),
            (60000, if v6 { GSO_TCPV6 } else { GSO_TCPV4 }),
        ] {
            let (f, mut hdr) = partial_frame(v6, payload, 6);
            hdr[1] = gso;
            let mut g = f.clone();
            if gso != GSO_NONE {
                // One segment's length, as some senders leave it; no IPv4 header checksum.
                let at = if v6 { 14 + 4 } else { 14 + 2 };
                g[at..at + 2].copy_from_slice(&1500u16.to_be_bytes());
            }
            accept(&hdr, &mut g).unwrap();
            let l4 = if v6 { 54 } else { 34 };
            assert_eq!(
                &g[l4..],
                &f[l4..],
                "the TCP segment is as the guest left it"
            );
            if v6 {
                let ip = Ipv6Packet::new_checked(&g[14..]).unwrap();
                assert_eq!(ip.payload_len() as usize, g.len() - 54);
            } else {
                let ip = Ipv4Packet::new_checked(&g[14..]).unwrap();
                assert_eq!(ip.total_len() as usize, g.len() - 14);
                if gso != GSO_NONE {
                    assert!(ip.verify_checksum());
                }
            }
        }
    }
    // UDP with its checksum left partial: accepted as it is.
    let (f, hdr) = partial_frame(false, 33, 17);
    let mut g = f.clone();
    accept(&hdr, &mut g).unwrap();
    assert_eq!(g, f);
}

#[test]
fn hostile_headers_are_errors() {
    let (f, hdr) = partial_frame(false, 10, 6);
    let mut bad = hdr;
    bad[6..8].copy_from_slice(&60000u16.to_le_bytes());
    assert!(matches!(
        accept(&bad, &mut f.clone()),
        Err(OffloadError::Checksum { .. })
    ));
    let mut bad = hdr;
    bad[8..10].copy_from_slice(&u16::MAX.to_le_bytes());
    assert!(accept(&bad, &mut f.clone()).is_err());
    let mut bad = hdr;
    bad[1] = 3; // UDP fragmentation offload: not offered
    assert_eq!(accept(&bad, &mut f.clone()), Err(OffloadError::Gso(3)));
    let mut bad = hdr;
    bad[1] = GSO_TCPV6; // on an IPv4 frame
    assert_eq!(accept(&bad, &mut f.clone()), Err(OffloadError::NotTcp));
    let (u, mut uh) = partial_frame(false, 10, 17);
    uh[1] = GSO_TCPV4; // on a UDP frame
    assert_eq!(accept(&uh, &mut u.clone()), Err(OffloadError::NotTcp));
    assert_eq!(accept(&hdr[..4], &mut f.clone()), Err(OffloadError::Short));
    let mut huge = vec![0u8; MAX_OFFLOAD_FRAME + 1];
    assert!(matches!(
        accept(&[0; 12], &mut huge),
        Err(OffloadError::TooLarge(_))
    ));
    // Every header byte value at every position: an error or a frame, never a panic.
    for i in 0..10 {
        for v in [0u8, 1, 0x7f, 0x80, 0xff] {
            let mut h = hdr;
            h[i] = v;
            let mut g = f.clone();
            let _ = accept(&h, &mut g);
            let _ = accept(&h, &mut g[..20]);
        }
    }
    // No header work asked: the frame is untouched.
    let mut g = f.clone();
    accept(&[0; 12], &mut g).unwrap();
    assert_eq!(g, f);
}
