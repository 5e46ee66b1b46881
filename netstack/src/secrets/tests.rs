use super::*;

fn secrets() -> Secrets {
    Secrets::new(vec![
        Secret::new("API_KEY", b"sk-real-value-1".to_vec(), "api.example.com").unwrap(),
        Secret::new("OTHER", b"other-real".to_vec(), "*.other.test, x.test").unwrap(),
    ])
    .unwrap()
}

/// Feeds `input` cut at every point in `cuts` and returns the output and violation.
fn substitute(
    s: &Secrets,
    allowed: &dyn Fn(usize) -> bool,
    parts: &[&[u8]],
) -> (Vec<u8>, Option<usize>) {
    let mut sub = Substituter::new(s);
    let mut out = Vec::new();
    let mut v = None;
    for p in parts {
        v = v.or(sub.push(s, allowed, p, &mut out));
    }
    v = v.or(sub.finish(s, allowed, &mut out));
    (out, v)
}

#[test]
fn placeholders_are_random_fixed_length_and_url_safe() {
    let a = Secret::new("K", b"v".to_vec(), "a.test").unwrap();
    let b = Secret::new("K", b"v".to_vec(), "a.test").unwrap();
    assert_ne!(a.placeholder(), b.placeholder());
    for p in [a.placeholder(), b.placeholder()] {
        assert_eq!(p.len(), PLACEHOLDER_LEN);
        assert!(p.starts_with("MSB_SECRET_"));
        assert!(
            p.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_'),
            "{p}"
        );
    }
    assert!(!format!("{a:?}").contains('v') || !format!("{a:?}").contains("\"v\""));
    assert!(format!("{a:?}").contains("<1 bytes>"));
}

#[test]
fn definitions_are_checked() {
    assert_eq!(
        Secret::new("1X", b"v".to_vec(), "a.test").unwrap_err(),
        SecretError::BadName("1X".into())
    );
    assert!(matches!(
        Secret::new("X-Y", b"v".to_vec(), "a.test"),
        Err(SecretError::BadName(_))
    ));
    assert!(matches!(
        Secret::new("X", b"v".to_vec(), " , "),
        Err(SecretError::NoHosts(_))
    ));
    assert!(matches!(
        Secret::new("X", b"v".to_vec(), "a..b"),
        Err(SecretError::BadHost { .. })
    ));
    assert!(matches!(
        Secret::new("X", Vec::new(), "a.test"),
        Err(SecretError::Empty(_))
    ));
    let a = Secret::new("X", b"v".to_vec(), "a.test").unwrap();
    assert!(matches!(
        Secrets::new(vec![a.clone(), a]),
        Err(SecretError::Duplicate(_))
    ));
}

#[test]
fn host_patterns() {
    let s = Secret::new("X", b"v".to_vec(), "API.Example.com., *.other.test").unwrap();
    assert!(s.allowed_for("api.example.com"));
    assert!(!s.allowed_for("example.com"));
    assert!(!s.allowed_for("evilapi.example.com"));
    assert!(s.allowed_for("a.other.test"));
    assert!(s.allowed_for("a.b.other.test"));
    assert!(!s.allowed_for("other.test"));
    assert!(!s.allowed_for("xother.test"));
}

#[test]
fn substitution_in_any_segmentation() {
    let s = secrets();
    let (p0, p1) = (
        s.get(0).placeholder().to_string(),
        s.get(1).placeholder().to_string(),
    );
    let input =
        format!("GET /?k={p0} HTTP/1.1\r\nX: {p1}{p0}\r\nMSB_SECRET_short\r\n\r\n{p0}MSB_SECR");
    let want = "GET /?k=sk-real-value-1 HTTP/1.1\r\nX: other-realsk-real-value-1\r\nMSB_SECRET_short\r\n\r\nsk-real-value-1MSB_SECR";
    let all = |_| true;
    let (out, v) = substitute(&s, &all, &[input.as_bytes()]);
    assert_eq!(String::from_utf8(out).unwrap(), want);
    assert_eq!(v, None);
    // Every two-way and a byte-at-a-time cut.
    let b = input.as_bytes();
    for cut in 0..=b.len() {
        let (out, _) = substitute(&s, &all, &[&b[..cut], &b[cut..]]);
        assert_eq!(String::from_utf8(out).unwrap(), want, "cut at {cut}");
    }
    let bytes: Vec<&[u8]> = b.chunks(1).collect();
    let (out, _) = substitute(&s, &all, &bytes);
    assert_eq!(String::from_utf8(out).unwrap(), want);
    let mut sub = Substituter::new(&s);
    let mut out = Vec::new();
    sub.push(&s, &all, input.as_bytes(), &mut out);
    sub.finish(&s, &all, &mut out);
    assert_eq!(sub.counts, [3, 1]);
}

#[test]
fn a_placeholder_not_allowed_here_passes_through_as_a_violation() {
    let s = secrets();
    let p1 = s.get(1).placeholder().to_string();
    let only_first = |i| i == 0;
    let input = format!("a{p1}b");
    let (out, v) = substitute(&s, &only_first, &[input.as_bytes()]);
    assert_eq!(out, input.as_bytes());
    assert_eq!(v, Some(1));
}

#[test]
fn the_scanner_finds_placeholders_across_segments() {
    let s = secrets();
    let p0 = s.get(0).placeholder().to_string();
    let data = format!("xxMSB_SECRET_MSB_SECRET_{p0}yy");
    let b = data.as_bytes();
    for cut in 0..=b.len() {
        let mut sc = Scanner::default();
        let got = sc.scan(&s, &b[..cut]).or_else(|| sc.scan(&s, &b[cut..]));
        assert_eq!(got, Some(0), "cut at {cut}");
    }
    let mut sc = Scanner::default();
    for c in b.chunks(1) {
        if let Some(i) = sc.scan(&s, c) {
            assert_eq!(i, 0);
            return;
        }
    }
    panic!("byte by byte: not found");
}

#[test]
fn the_scanner_ignores_lookalikes_and_holds_little() {
    let s = secrets();
    let mut sc = Scanner::default();
    let fake = format!("MSB_SECRET_{}", "A".repeat(32));
    assert_eq!(sc.scan(&s, fake.as_bytes()), None);
    assert_eq!(sc.scan(&s, &vec![b'M'; 1 << 20]), None);
    assert!(sc.carry.len() < PLACEHOLDER_LEN);
    assert_eq!(
        Scanner::default().scan(&Secrets::default(), fake.as_bytes()),
        None
    );
}
