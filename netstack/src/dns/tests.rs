use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn query(name: &str, qtype: u16) -> Vec<u8> {
    build_query(0x1234, name, qtype)
}

#[test]
fn queries_round_trip_into_answers() {
    let q = parse_query(&query("Example.COM", TYPE_A)).unwrap();
    assert_eq!(
        (q.id, q.rd, q.name.as_deref(), q.qtype),
        (0x1234, true, Some("example.com"), TYPE_A)
    );
    let answers = [
        Answer {
            ip: ip("93.184.215.14"),
            ttl: 300,
        },
        Answer {
            ip: ip("2606:2800:21f:cb07:6820:80da:af6b:8b2c"),
            ttl: 60,
        },
    ];
    let r = response(&q, 0, &answers);
    let up = parse_response(&r, "example.com").unwrap();
    assert_eq!((up.id, up.rcode), (0x1234, 0));
    assert_eq!(up.answers, answers);
    let nx = response(&q, RCODE_NXDOMAIN, &[]);
    let up = parse_response(&nx, "example.com").unwrap();
    assert_eq!((up.rcode, up.answers.len()), (RCODE_NXDOMAIN, 0));
}

#[test]
fn hostile_queries_are_refused_not_trusted() {
    // Names of 255 bytes and beyond, labels over 63, pointers in a query, bad counts.
    let long = [
        "a".repeat(63),
        "a".repeat(63),
        "a".repeat(63),
        "a".repeat(63),
    ]
    .join(".");
    assert!(
        parse_query(&query(&long, TYPE_A)).is_err(),
        "256 bytes on the wire"
    );
    let ok = [
        "a".repeat(63),
        "a".repeat(63),
        "a".repeat(63),
        "a".repeat(61),
    ]
    .join(".");
    assert_eq!(
        parse_query(&query(&ok, TYPE_A))
            .unwrap()
            .name
            .map(|n| n.len()),
        Some(253)
    );
    let mut m = query("x.com", TYPE_A);
    m[12] = 0x40; // an extended label type
    assert_eq!(parse_query(&m), Err(DnsError::BadName));
    let mut m = query("x.com", TYPE_A);
    m[12] = 0xc0;
    m[13] = 0x0c;
    assert_eq!(
        parse_query(&m),
        Err(DnsError::BadName),
        "no pointers in a question"
    );
    let mut m = query("x.com", TYPE_A);
    m[5] = 2; // QDCOUNT 2
    assert_eq!(parse_query(&m), Err(DnsError::NotAQuery));
    let mut m = query("x.com", TYPE_A);
    m[2] |= 0x80; // a response
    assert_eq!(parse_query(&m), Err(DnsError::NotAQuery));
    assert!(
        error_response(&m, RCODE_FORMERR).is_none(),
        "never answer a response"
    );
    assert_eq!(parse_query(&m[..5]), Err(DnsError::Truncated));
    // A label with a dot or a NUL inside is not a hostname: parsed, but with no name.
    let mut m = query("ab.com", TYPE_A);
    m[13] = b'.';
    assert_eq!(parse_query(&m).unwrap().name, None);
    let mut m = query("ab.com", TYPE_A);
    m[13] = 0;
    assert_eq!(parse_query(&m).unwrap().name, None);
    let fe = error_response(&query("x", TYPE_A), RCODE_FORMERR).unwrap();
    assert_eq!((fe[0], fe[1], fe[3] & 0xf), (0x12, 0x34, RCODE_FORMERR));
}

#[test]
fn upstream_answers_follow_cnames_and_ignore_other_names() {
    // www.example.com CNAME edge.example.net; edge A 1.2.3.4; unrelated.com A 6.6.6.6.
    let q = parse_query(&query("www.example.com", TYPE_A)).unwrap();
    let mut r = response(&q, 0, &[]);
    r[7] = 3; // ANCOUNT
              // CNAME: owner = pointer to question name, rdata = edge.example.net
    let target = b"\x04edge\x07example\x03net\x00";
    r.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 30]);
    r.extend_from_slice(&(target.len() as u16).to_be_bytes());
    let target_at = r.len();
    r.extend_from_slice(target);
    // A for the CNAME target, by pointer.
    r.extend_from_slice(&[
        0xc0,
        target_at as u8,
        0,
        1,
        0,
        1,
        0,
        0,
        0,
        20,
        0,
        4,
        1,
        2,
        3,
        4,
    ]);
    // A for a name nobody asked about.
    r.extend_from_slice(b"\x09unrelated\x03com\x00");
    r.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 20, 0, 4, 6, 6, 6, 6]);
    let up = parse_response(&r, "www.example.com").unwrap();
    assert_eq!(
        up.answers,
        [Answer {
            ip: ip("1.2.3.4"),
            ttl: 20
        }]
    );
    // A pointer loop is an error, not a hang.
    let mut bad = response(&q, 0, &[]);
    bad[7] = 1;
    let at = bad.len();
    bad.extend_from_slice(&[0xc0, at as u8]);
    assert_eq!(
        parse_response(&bad, "www.example.com"),
        Err(DnsError::PointerLoop)
    );
}

#[test]
fn bindings_expire_and_stay_bounded() {
    let mut b = Bindings::new(2);
    let t0 = Instant::now();
    let a = |s: &str, ttl| Answer { ip: ip(s), ttl };
    b.insert("a.com", a("1.1.1.1", 60), t0);
    b.insert("b.com", a("1.1.1.1", 60), t0);
    assert_eq!(b.names(ip("1.1.1.1"), t0), ["a.com", "b.com"]);
    assert_eq!(b.names(ip("::ffff:1.1.1.1"), t0), ["a.com", "b.com"]);
    assert!(b
        .names(ip("1.1.1.1"), t0 + Duration::from_secs(61))
        .is_empty());
    // TTL 0 still covers the connect that follows the lookup.
    b.insert("c.com", a("2.2.2.2", 0), t0);
    assert_eq!(
        b.names(ip("2.2.2.2"), t0 + Duration::from_secs(5)),
        ["c.com"]
    );
    b.insert("d.com", a("3.3.3.3", 600), t0);
    assert_eq!(b.by_ip.len(), 2, "bounded");
    assert_eq!(b.names(ip("3.3.3.3"), t0), ["d.com"]);
}

#[test]
fn bindings_survive_an_export_and_import_with_their_remaining_lifetimes() {
    let mut b = Bindings::new(8);
    let t0 = Instant::now();
    let a = |s: &str, ttl| Answer { ip: ip(s), ttl };
    b.insert("a.com", a("1.1.1.1", 60), t0);
    b.insert("old.com", a("2.2.2.2", 10), t0);
    // 30 s later: a.com has 30 s left, old.com is gone.
    let saved = b.export(t0 + Duration::from_secs(30));
    assert_eq!(saved.len(), 1, "{saved:?}");
    assert_eq!(saved[0].ttl_left_ms, 30_000);
    // Imported in another process at t1: bound for the 30 s that were left, no longer.
    let mut c = Bindings::new(8);
    let t1 = Instant::now() + Duration::from_secs(1000);
    let hostile = [
        SavedBinding {
            ip: ip("3.3.3.3"),
            name: "bad name\n".into(),
            ttl_left_ms: 1000,
        },
        SavedBinding {
            ip: ip("4.4.4.4"),
            name: "forever.com".into(),
            ttl_left_ms: u64::MAX,
        },
    ];
    c.import(&saved, t1);
    c.import(&hostile, t1);
    assert_eq!(
        c.names(ip("1.1.1.1"), t1 + Duration::from_secs(29)),
        ["a.com"]
    );
    assert!(c
        .names(ip("1.1.1.1"), t1 + Duration::from_secs(31))
        .is_empty());
    assert!(c.names(ip("3.3.3.3"), t1).is_empty());
    // A saved lifetime is capped as a live TTL is (an hour).
    assert!(c
        .names(ip("4.4.4.4"), t1 + Duration::from_secs(3601))
        .is_empty());
}
