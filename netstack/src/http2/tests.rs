use super::*;
use crate::secrets::Secret;
use loona_hpack::Encoder;

fn secrets() -> Secrets {
    Secrets::new(vec![Secret::new(
        "KEY",
        b"sk-live-123".to_vec(),
        "api.example.com",
    )
    .unwrap()])
    .unwrap()
}

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn headers(stream: u32, block: &[u8]) -> Vec<u8> {
    frame(HEADERS, END_HEADERS, stream, block)
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Feeds `parts` in order; the output, the requests admitted (or refused), and the result.
fn run(parts: &[&[u8]], refuse: Option<&str>) -> (Vec<u8>, Vec<Request>, Result<(), InspectError>) {
    let s = secrets();
    let mut ins = RequestInspector::new("www.example.com");
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for p in parts {
        let r = ins.push(&s, p, &mut out, &mut |r| {
            seen.push(r.clone());
            r.host.as_deref() != refuse
        });
        if r.is_err() {
            return (out, seen, r);
        }
    }
    (out, seen, Ok(()))
}

/// Every byte of `parts`, one byte at a time.
fn bytewise(parts: &[&[u8]]) -> Vec<Vec<u8>> {
    parts.concat().into_iter().map(|b| vec![b]).collect()
}

// RFC 7541 C.4.1 and C.4.2: Huffman-coded, the second authority from the dynamic table.
const C41: &str = "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff";
const C42: &str = "8286 84be 5886 a8eb 1064 9cbf";

#[test]
fn every_request_of_a_connection_is_shown_with_its_authority() {
    let (a, b) = (headers(1, &hex(C41)), headers(3, &hex(C42)));
    let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
    let data = frame(0x0, 1, 1, b"hello");
    let parts: [&[u8]; 5] = [PREFACE, &settings, &a, &data, &b];
    let whole = parts.concat();
    for split in [parts.iter().map(|p| p.to_vec()).collect(), bytewise(&parts)] {
        let split: Vec<&[u8]> = split.iter().map(|p| &p[..]).collect();
        let (out, seen, r) = run(&split, None);
        r.unwrap();
        assert_eq!(out, whole, "passed through unchanged");
        assert_eq!(seen.len(), 2);
        for req in &seen {
            assert_eq!(req.method, "GET");
            assert_eq!(req.host.as_deref(), Some("www.example.com"));
            assert!(req.host_header);
        }
    }
}

#[test]
fn a_refused_request_is_never_passed_on() {
    let mut enc = Encoder::new();
    let ok = headers(
        1,
        &enc.encode([
            (&b":method"[..], &b"GET"[..]),
            (b":authority", b"www.example.com"),
        ]),
    );
    let bad = headers(
        3,
        &enc.encode([
            (&b":method"[..], &b"GET"[..]),
            (b":authority", b"evil.test:443"),
        ]),
    );
    let (out, seen, r) = run(&[PREFACE, &ok, &bad], Some("evil.test"));
    assert_eq!(r, Err(InspectError::Refused("evil.test".into())));
    assert_eq!(seen[1].host.as_deref(), Some("evil.test"));
    assert_eq!(
        out,
        [PREFACE, &ok].concat(),
        "the refused HEADERS stays held"
    );
}

#[test]
fn continuation_padding_and_priority_are_read() {
    let block = hex(C41);
    // HEADERS padded (3 bytes) with priority, the block split into two CONTINUATIONs.
    let mut first = vec![3u8, 0, 0, 0, 0, 16];
    first.extend_from_slice(&block[..3]);
    first.extend_from_slice(&[0, 0, 0]);
    let f1 = frame(HEADERS, PADDED | PRIORITY, 1, &first);
    let f2 = frame(CONTINUATION, 0, 1, &block[3..8]);
    let f3 = frame(CONTINUATION, END_HEADERS, 1, &block[8..]);
    let (out, seen, r) = run(&[PREFACE, &f1, &f2], None);
    r.unwrap();
    assert!(seen.is_empty());
    assert_eq!(out, PREFACE, "held until the block is complete");
    let (out, seen, r) = run(&[PREFACE, &f1, &f2, &f3], None);
    r.unwrap();
    assert_eq!(seen[0].host.as_deref(), Some("www.example.com"));
    assert_eq!(out, [PREFACE, &f1, &f2, &f3].concat());
}

#[test]
fn ambiguous_or_broken_streams_end_the_flow() {
    let mut enc = Encoder::new();
    let two = enc.encode([(&b":authority"[..], &b"a.test"[..]), (b"host", b"b.test")]);
    let (_, _, r) = run(&[PREFACE, &headers(1, &two)], None);
    assert!(matches!(r, Err(InspectError::Ambiguous(_))), "{r:?}");
    let twice = Encoder::new().encode([
        (&b":authority"[..], &b"a.test"[..]),
        (b":authority", b"b.test"),
    ]);
    let (_, _, r) = run(&[PREFACE, &headers(1, &twice)], None);
    assert!(matches!(r, Err(InspectError::Ambiguous(_))), "{r:?}");
    // A second HEADERS on a used stream naming a host (trailers must not).
    let mut enc = Encoder::new();
    let a = headers(
        1,
        &enc.encode([(&b":authority"[..], &b"www.example.com"[..])]),
    );
    let b = headers(1, &enc.encode([(&b":authority"[..], &b"evil.test"[..])]));
    let (_, _, r) = run(&[PREFACE, &a, &b], None);
    assert!(matches!(r, Err(InspectError::Ambiguous(_))), "{r:?}");
    // Plain trailers pass.
    let t = headers(1, &enc.encode([(&b"grpc-status"[..], &b"0"[..])]));
    let (_, _, r) = run(&[PREFACE, &a, &t], None);
    r.unwrap();
    // A frame between HEADERS and its CONTINUATION.
    let h = frame(HEADERS, 0, 1, &hex(C41)[..4]);
    let ping = frame(0x6, 0, 0, &[0; 8]);
    let (_, _, r) = run(&[PREFACE, &h, &ping], None);
    assert!(matches!(r, Err(InspectError::Framing(_))), "{r:?}");
    for bad in [
        frame(CONTINUATION, END_HEADERS, 1, &[0x82]),
        frame(PUSH_PROMISE, END_HEADERS, 1, &[0, 0, 0, 2, 0x82]),
        frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82]),
        frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0]),
        frame(HEADERS, END_HEADERS, 0, &[0x82]),
        frame(HEADERS, END_HEADERS, 2, &[0x82]),
        frame(
            HEADERS,
            END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ),
        frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xff, 0xff, 0x7f]),
    ] {
        let (_, _, r) = run(&[PREFACE, &bad], None);
        assert!(r.is_err(), "{bad:02x?} passed");
    }
    let (_, _, r) = run(&[b"GET / HTTP/1.1\r\n"], None);
    assert_eq!(r, Err(InspectError::NoPreface));
}

#[test]
fn a_block_too_large_is_refused_before_it_is_held() {
    let mut h = vec![0u8, 0x10, 0x00, HEADERS, 0, 0, 0, 0, 1];
    h[0] = 0x04; // 256 KiB + 4 KiB
    let (_, _, r) = run(&[PREFACE, &h], None);
    assert_eq!(r, Err(InspectError::BlockTooLarge));
}

#[test]
fn a_huffman_coded_placeholder_is_found() {
    let s = secrets();
    let ph = s.get(0).placeholder().to_string();
    // Literal without indexing, new name "x-key", Huffman-coded value.
    let mut block = vec![0x00, 5];
    block.extend_from_slice(b"x-key");
    let coded = huffman(ph.as_bytes());
    assert!(coded.len() < 127);
    block.push(0x80 | coded.len() as u8);
    block.extend_from_slice(&coded);
    assert!(memchr::memmem::find(&block, ph.as_bytes()).is_none());
    let mut enc_first = Encoder::new().encode([(&b":authority"[..], &b"www.example.com"[..])]);
    enc_first.extend_from_slice(&block);
    let mut ins = RequestInspector::new("www.example.com");
    let mut out = Vec::new();
    ins.push(
        &s,
        &[PREFACE, &headers(1, &enc_first)].concat(),
        &mut out,
        &mut |_| true,
    )
    .unwrap();
    assert_eq!(ins.violations, vec![0]);
}

/// RFC 7541 Appendix B codes for the bytes placeholders use (`MSB_SECRET_` and base62).
fn huffman(data: &[u8]) -> Vec<u8> {
    fn code(b: u8) -> (u32, u32) {
        match b {
            b'0'..=b'2' => (u32::from(b - b'0'), 5),
            b'a' | b'c' | b'e' | b'i' | b'o' | b's' | b't' => (
                u32::from(
                    [3u8, 4, 5, 6, 7, 8, 9][b"aceiost".iter().position(|c| *c == b).unwrap()],
                ),
                5,
            ),
            b'3'..=b'9' => (0x19 + u32::from(b - b'3'), 6),
            b'=' => (0x20, 6),
            b'A' => (0x21, 6),
            b'_' => (0x22, 6),
            b'b' | b'd' | b'f' | b'g' | b'h' | b'l' | b'm' | b'n' | b'p' | b'r' | b'u' => {
                let i = b"bdfghlmnpru".iter().position(|c| *c == b).unwrap();
                (0x23 + i as u32, 6)
            }
            b':' => (0x5c, 7),
            b'B'..=b'U' => {
                let i = b"BCDEFGHIJKLMNOPQRSTU"
                    .iter()
                    .position(|c| *c == b)
                    .unwrap();
                (0x5d + i as u32, 7)
            }
            b'V' => (0x71, 7),
            b'W' => (0x72, 7),
            b'Y' => (0x73, 7),
            b'j' => (0x74, 7),
            b'k' => (0x75, 7),
            b'q' => (0x76, 7),
            b'v' => (0x77, 7),
            b'w' => (0x78, 7),
            b'x' => (0x79, 7),
            b'y' => (0x7a, 7),
            b'z' => (0x7b, 7),
            b'X' => (0xfc, 8),
            b'Z' => (0xfd, 8),
            _ => panic!("no code for {b}"),
        }
    }
    let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
    for &b in data {
        let (c, n) = code(b);
        acc = acc << n | u64::from(c);
        bits += n;
        while bits >= 8 {
            out.push((acc >> (bits - 8)) as u8);
            bits -= 8;
        }
    }
    if bits > 0 {
        out.push((acc << (8 - bits)) as u8 | (0xff >> bits));
    }
    out
}
