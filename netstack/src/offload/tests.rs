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

/// An Ethernet + IP + TCP frame from 10.0.2.2:443 (or the v6 gateway) to the guest's port
/// 40000 with TCP `options` (padded to 4 bytes), `flags` and `payload` bytes, checksums whole.
fn tcp_frame(v6: bool, options: &[u8], flags: u8, payload: usize) -> Vec<u8> {
    let mut opts = options.to_vec();
    while opts.len() % 4 != 0 {
        opts.push(1);
    }
    let thl = 20 + opts.len();
    let ip_hdr = if v6 { 40 } else { 20 };
    let mut f = vec![0u8; 14 + ip_hdr + thl + payload];
    f[12..14].copy_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
    let l4 = 14 + ip_hdr;
    {
        let ip = &mut f[14..];
        if v6 {
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&((thl + payload) as u16).to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8..24]
                .copy_from_slice(&Ipv6Address::new(0xfd00, 0x6d73, 0x62, 0, 0, 0, 0, 1).octets());
            ip[24..40].copy_from_slice(
                &Ipv6Address::new(0xfd00, 0x6d73, 0x62, 0, 0, 0, 0, 0x15).octets(),
            );
        } else {
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + thl + payload) as u16).to_be_bytes());
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&[10, 0, 2, 2]);
            ip[16..20].copy_from_slice(&[10, 0, 2, 15]);
        }
    }
    let tcp = &mut f[l4..];
    tcp[0..2].copy_from_slice(&443u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
    tcp[12] = ((thl / 4) as u8) << 4;
    tcp[13] = flags;
    tcp[20..thl].copy_from_slice(&opts);
    for (i, b) in tcp[thl..].iter_mut().enumerate() {
        *b = (i * 13 + 5) as u8;
    }
    if !v6 {
        let mut ip = Ipv4Packet::new_unchecked(&mut f[14..]);
        ip.fill_checksum();
    }
    complete(&mut f, l4, true);
    f
}

/// Computes the TCP checksum in place, from the pseudo-header (`whole`) or, as a guest
/// finishing an offloaded one, from the partial sum already in the field.
fn complete(f: &mut [u8], l4: usize, whole: bool) {
    if whole {
        f[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
        let (s, d, len) = if f[12] == 0x86 {
            (&f[22..38], &f[38..54], f.len() - l4)
        } else {
            (&f[26..30], &f[30..34], f.len() - l4)
        };
        let pseudo = fold(sum16(s) + sum16(d) + 6 + len as u64);
        f[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    }
    let c = !fold(sum16(&f[l4..]));
    f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
}

fn checksum_ok(f: &[u8], l4: usize) -> bool {
    fold(
        0xffff + sum16(&f[l4..]) + {
            let (s, d) = if f[12] == 0x86 {
                (&f[22..38], &f[38..54])
            } else {
                (&f[26..30], &f[30..34])
            };
            sum16(s) + sum16(d) + 6 + (f.len() - l4) as u64
        },
    ) == 0xffff
}

#[test]
fn segments_to_the_guest_get_a_partial_checksum_and_their_segment_size() {
    // Timestamps: a 32-byte TCP header, as between two Linux stacks.
    let ts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
    for v6 in [false, true] {
        let l4 = if v6 { 54 } else { 34 };
        let by_mtu = 1500 - (l4 - 14) - 32;
        for (payload, mss) in [
            (60000, Some(1460)),
            (60000, None),
            (60000, Some(1200)),
            (100, Some(1460)),
            (1448, Some(1460)),
            (1449, Some(1460)),
            (1429, None),
        ] {
            let seg = mss.map_or(by_mtu, |m| (m as usize - 12).min(by_mtu));
            let want_seg = (payload > seg).then_some(seg);
            let mut f = tcp_frame(v6, &ts, 0x18, payload);
            assert!(checksum_ok(&f, l4), "the test frame is whole");
            let whole = f.clone();
            // smoltcp leaves the field zero when told not to make it.
            f[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
            let mut asked = None;
            let hdr = to_guest(&mut f, 1500, |ends| {
                asked = Some(ends);
                mss
            })
            .expect("a TCP segment");
            let (guest, remote) = asked.unwrap();
            assert_eq!((guest.1, remote.1), (40000, 443));
            assert_ne!(guest.0, remote.0);
            assert_eq!(hdr[0], 1, "NEEDS_CSUM");
            assert_eq!(u16::from_le_bytes([hdr[6], hdr[7]]) as usize, l4);
            assert_eq!(u16::from_le_bytes([hdr[8], hdr[9]]), 16);
            match want_seg {
                Some(seg) => {
                    assert!(is_segmented(&hdr));
                    assert_eq!(hdr[1], if v6 { 4 } else { 1 });
                    assert_eq!(u16::from_le_bytes([hdr[2], hdr[3]]) as usize, l4 + 32);
                    assert_eq!(u16::from_le_bytes([hdr[4], hdr[5]]) as usize, seg);
                }
                None => assert!(!is_segmented(&hdr)),
            }
            // The guest finishing the sum gets the checksum a whole segment has.
            complete(&mut f, l4, false);
            assert_eq!(f, whole);
        }
    }
    // Not TCP, fragments and short frames go as they are.
    let (mut udp, _) = partial_frame(false, 100, 17);
    let before = udp.clone();
    assert!(to_guest(&mut udp, 1500, |_| None).is_none());
    assert_eq!(udp, before);
    let mut frag = tcp_frame(false, &[], 0x10, 100);
    frag[14 + 6] = 0x20; // more fragments
    assert!(to_guest(&mut frag, 1500, |_| None).is_none());
    for n in 0..60 {
        let mut f = tcp_frame(false, &ts, 0x10, 100);
        f.truncate(n);
        let _ = to_guest(&mut f, 1500, |_| None);
    }
    // An IPv4 length shorter than its own header is no segment.
    let mut bad = tcp_frame(false, &[], 0x10, 100);
    bad[16..18].copy_from_slice(&10u16.to_be_bytes());
    assert!(to_guest(&mut bad, 1500, |_| None).is_none());
}

#[test]
fn the_guests_syn_is_shown_with_a_raised_mss() {
    // MSS 1460, SACK permitted, timestamps, NOP, window scale 7: Linux's SYN.
    let opts = [
        2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
    ];
    for v6 in [false, true] {
        let l4 = if v6 { 54 } else { 34 };
        for flags in [0x02, 0x12] {
            let mut f = tcp_frame(v6, &opts, flags, 0);
            let (ends, mss) = raise_mss(&mut f).expect("raised");
            assert_eq!(mss, 1460);
            // The frame goes from the remote end here; the first end is its source.
            assert_eq!(((ends.0).1, (ends.1).1), (443, 40000));
            assert_eq!(&f[l4 + 22..l4 + 24], &RAISED_MSS.to_be_bytes());
            // Once raised, a second look changes nothing.
            assert_eq!(raise_mss(&mut f), None);
        }
        // Not a SYN, no MSS option, a bad option length: untouched.
        for (o, flags) in [
            (&opts[..], 0x10),
            (&opts[4..], 0x02),
            (&[1, 2, 1, 0x05][..], 0x02),
            (&[3, 0, 2, 4, 0x05, 0xb4][..], 0x02),
            (&[3, 9, 2, 4][..], 0x02),
        ] {
            let mut f = tcp_frame(v6, o, flags, 0);
            let before = f.clone();
            assert_eq!(raise_mss(&mut f), None);
            assert_eq!(f, before);
        }
    }
    for n in 0..80 {
        let mut f = tcp_frame(false, &opts, 0x02, 0);
        f.truncate(n);
        let _ = raise_mss(&mut f);
    }
}
