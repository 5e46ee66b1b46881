use super::*;

/// A TLS 1.2/1.3-style ClientHello record with `exts` as its extensions.
fn hello(exts: &[u8]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]); // random
    body.push(32);
    body.extend_from_slice(&[9; 32]); // session id
    body.extend_from_slice(&[0, 4, 0x13, 0x01, 0x13, 0x02]); // cipher suites
    body.extend_from_slice(&[1, 0]); // compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

fn sni(name: &[u8]) -> Vec<u8> {
    let mut e = vec![0, 0x2b, 0, 3, 2, 3, 4]; // supported_versions first
    let mut list = vec![0];
    list.extend_from_slice(&(name.len() as u16).to_be_bytes());
    list.extend_from_slice(name);
    let mut body = (list.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(&list);
    e.extend_from_slice(&[0, 0]);
    e.extend_from_slice(&(body.len() as u16).to_be_bytes());
    e.extend_from_slice(&body);
    e
}

#[test]
fn tls_server_names() {
    let h = hello(&sni(b"API.GitHub.com."));
    assert_eq!(sniff(&h), Sniffed::Name("api.github.com".into()));
    // Every prefix is incomplete, never a wrong answer.
    for n in 0..h.len() {
        assert_eq!(sniff(&h[..n]), Sniffed::NeedMore, "prefix {n}");
    }
    // Data after the hello does not matter.
    let mut more = h.clone();
    more.extend_from_slice(&[0x14, 3, 3, 0, 1, 1]);
    assert_eq!(sniff(&more), Sniffed::Name("api.github.com".into()));
    assert_eq!(sniff(&hello(&[0, 0x2b, 0, 3, 2, 3, 4])), Sniffed::NoName);
    assert_eq!(sniff(&hello(&sni(b"bad name!"))), Sniffed::Malformed);
    assert_eq!(sniff(&hello(&sni(b"10.0.0.1"))), Sniffed::Malformed);
}

#[test]
fn a_hello_split_over_records() {
    let h = hello(&sni(b"split.example"));
    let hs = &h[5..];
    let (a, b) = hs.split_at(20);
    let mut two = vec![0x16, 3, 1];
    two.extend_from_slice(&(a.len() as u16).to_be_bytes());
    two.extend_from_slice(a);
    two.extend_from_slice(&[0x16, 3, 1]);
    two.extend_from_slice(&(b.len() as u16).to_be_bytes());
    two.extend_from_slice(b);
    assert_eq!(sniff(&two), Sniffed::Name("split.example".into()));
    // Another record type before the hello is whole.
    let mut cut = two[..5 + a.len()].to_vec();
    cut.extend_from_slice(&[0x17, 3, 3, 0, 1, 0]);
    assert_eq!(sniff(&cut), Sniffed::Malformed);
}

#[test]
fn hostile_tls() {
    let h = hello(&sni(b"x.example"));
    // Lengths pointing past the end, at every byte position.
    for i in 5..h.len() {
        for v in [0u8, 0x7f, 0xff] {
            let mut m = h.clone();
            m[i] = v;
            let _ = sniff(&m); // no panic, whatever it says
        }
    }
    assert_eq!(sniff(&[0x16, 3, 1, 0, 0]), Sniffed::Malformed);
    assert_eq!(sniff(&[0x16, 9, 1, 0, 4]), Sniffed::Malformed);
    assert_eq!(sniff(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]), Sniffed::Malformed);
    assert_eq!(sniff(&vec![0x16; MAX_SNIFF]), Sniffed::Malformed);
}

#[test]
fn http_hosts() {
    let req = b"GET / HTTP/1.1\r\nUser-Agent: x\r\nhost: Example.COM:8080\r\n\r\n";
    assert_eq!(sniff(req), Sniffed::Name("example.com".into()));
    for n in 0..req.len() {
        assert_eq!(sniff(&req[..n]), Sniffed::NeedMore, "prefix {n}");
    }
    assert_eq!(
        sniff(b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n"),
        Sniffed::NoName
    );
    assert_eq!(
        sniff(b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n"),
        Sniffed::NoName
    );
    assert_eq!(
        sniff(b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"),
        Sniffed::NoName
    );
    assert_eq!(
        sniff(b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"),
        Sniffed::Malformed
    );
    assert_eq!(
        sniff(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
        Sniffed::Malformed
    );
    assert_eq!(
        sniff(b"GET / HTTP/1.1\r\nno colon\r\n\r\n"),
        Sniffed::Malformed
    );
    // Not HTTP: SSH, SMTP-style server-first, binary.
    assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.2\r\n"), Sniffed::NoName);
    assert_eq!(sniff(b"\x00\x01binary"), Sniffed::NoName);
    assert_eq!(sniff(b"EHLO x\r\n\r\n"), Sniffed::NoName);
    let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
    huge.resize(MAX_SNIFF, b'a');
    assert_eq!(sniff(&huge), Sniffed::Malformed);
}
