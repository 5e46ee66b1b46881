use super::*;
use crate::ca::Ca;
use crate::secrets::Secret;
use std::io::Read;

/// The world: an upstream CA (its certificate in a file, as `--tls-upstream-ca` gives it)
/// and the sandbox CA the guest trusts.
struct World {
    upstream: Arc<Leaves>,
    upstream_ca_file: std::path::PathBuf,
    sandbox_ca: CertificateDer<'static>,
    intercept: Arc<Intercept>,
}

fn world(block: bool) -> World {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let up_ca = Ca::generate().unwrap();
    let file = std::env::temp_dir().join(format!(
        "msb-mitm-{}-{}.pem",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::write(&file, up_ca.cert_pem()).unwrap();
    let upstream = Arc::new(Leaves::new(up_ca).unwrap());
    let sb_ca = Ca::generate().unwrap();
    let sandbox_ca = sb_ca.cert_der().clone();
    let secrets = Secrets::new(vec![Secret::new(
        "KEY",
        b"sk-live-42".to_vec(),
        "api.example.com",
    )
    .unwrap()])
    .unwrap();
    let mut i = Intercept::new(
        Arc::new(Leaves::new(sb_ca).unwrap()),
        secrets,
        &[&file],
        false,
    )
    .unwrap();
    i.block_violations = block;
    World {
        upstream,
        upstream_ca_file: file,
        sandbox_ca,
        intercept: Arc::new(i),
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.upstream_ca_file);
    }
}

fn guest(ca: &CertificateDer<'static>, name: &str, alpn: &[&[u8]]) -> ClientConnection {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    ClientConnection::new(Arc::new(c), ServerName::try_from(name.to_string()).unwrap()).unwrap()
}

fn upstream(leaves: &Arc<Leaves>, alpn: &[&[u8]]) -> ServerConnection {
    let mut c = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(leaves.clone());
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    ServerConnection::new(Arc::new(c)).unwrap()
}

/// Moves bytes guest ↔ mitm ↔ upstream until nothing moves; plaintext the upstream and the
/// guest received, or the mitm's error.
fn pump(
    g: &mut ClientConnection,
    m: &mut Mitm,
    u: &mut ServerConnection,
    to_send: &[u8],
    reply: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), MitmError> {
    let (mut at_up, mut at_guest) = (Vec::new(), Vec::new());
    let mut sent = false;
    let mut replied = false;
    for _ in 0..50 {
        if !g.is_handshaking() && !sent {
            g.writer().write_all(to_send).unwrap();
            sent = true;
        }
        let mut buf = Vec::new();
        while g.wants_write() {
            g.write_tls(&mut buf).unwrap();
        }
        m.guest_bytes(&buf, &mut |_| true)?;
        let mut buf = Vec::new();
        m.take_for_upstream(&mut buf)?;
        u.read_tls(&mut &buf[..]).unwrap();
        u.process_new_packets().expect("upstream side");
        let mut b = [0u8; 65536];
        while let Ok(n) = u.reader().read(&mut b) {
            if n == 0 {
                break;
            }
            at_up.extend_from_slice(&b[..n]);
        }
        if !at_up.is_empty() && !replied {
            u.writer().write_all(reply).unwrap();
            replied = true;
        }
        let mut buf = Vec::new();
        while u.wants_write() {
            u.write_tls(&mut buf).unwrap();
        }
        m.upstream_bytes(&buf)?;
        let mut buf = Vec::new();
        m.take_for_guest(&mut buf)?;
        g.read_tls(&mut &buf[..]).unwrap();
        if let Err(e) = g.process_new_packets() {
            return Err(MitmError::Guest(e));
        }
        while let Ok(n) = g.reader().read(&mut b) {
            if n == 0 {
                break;
            }
            at_guest.extend_from_slice(&b[..n]);
        }
    }
    Ok((at_up, at_guest))
}

#[test]
fn a_placeholder_becomes_the_value_toward_its_host_over_verified_tls() {
    let w = world(true);
    let ph = w.intercept.secrets.get(0).placeholder().to_string();
    let mut g = guest(&w.sandbox_ca, "api.example.com", &[b"h2", b"http/1.1"]);
    let mut u = upstream(&w.upstream, &[b"h2", b"http/1.1"]);
    let mut m = Mitm::new(w.intercept.clone());
    let req =
        format!("GET /v1 HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer {ph}\r\n\r\n");
    let (at_up, at_guest) = pump(
        &mut g,
        &mut m,
        &mut u,
        req.as_bytes(),
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )
    .unwrap();
    assert_eq!(
        String::from_utf8(at_up).unwrap(),
        "GET /v1 HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer sk-live-42\r\n\r\n"
    );
    assert_eq!(at_guest, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    // A host a secret is bound to speaks HTTP/1.1 (the rewriter's), though both offered h2.
    assert_eq!(m.alpn(), Some(&b"http/1.1"[..]));
    assert_eq!(g.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(m.server_name(), Some("api.example.com"));
    assert_eq!(m.counts(), (vec![1], 1));
    // The guest saw our leaf, the upstream's was verified by us.
    let leaf = &g.peer_certificates().unwrap()[1];
    assert_eq!(leaf, &w.sandbox_ca);
}

#[test]
fn other_hosts_keep_h2_and_a_placeholder_there_is_blocked() {
    let w = world(true);
    let ph = w.intercept.secrets.get(0).placeholder().to_string();
    let mut g = guest(&w.sandbox_ca, "cdn.test", &[b"h2", b"http/1.1"]);
    let mut u = upstream(&w.upstream, &[b"h2", b"http/1.1"]);
    let mut m = Mitm::new(w.intercept.clone());
    let (at_up, _) = pump(
        &mut g,
        &mut m,
        &mut u,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"",
    )
    .unwrap();
    assert_eq!(m.alpn(), Some(&b"h2"[..]));
    assert_eq!(at_up, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    g.writer()
        .write_all(format!("frame with {ph}").as_bytes())
        .unwrap();
    let mut buf = Vec::new();
    g.write_tls(&mut buf).unwrap();
    let e = m.guest_bytes(&buf, &mut |_| true).unwrap_err();
    assert!(
        matches!(&e, MitmError::Violation { secret, host } if secret == "KEY" && host == "cdn.test"),
        "{e}"
    );
    // HTTP/1 toward it: also blocked, before a byte of that request leaves.
    let mut g = guest(&w.sandbox_ca, "cdn.test", &[b"http/1.1"]);
    let mut u = upstream(&w.upstream, &[b"h2", b"http/1.1"]);
    let mut m = Mitm::new(w.intercept.clone());
    let req = format!("GET /?k={ph} HTTP/1.1\r\nHost: cdn.test\r\n\r\n");
    let e = pump(&mut g, &mut m, &mut u, req.as_bytes(), b"").unwrap_err();
    assert!(matches!(e, MitmError::Violation { .. }), "{e}");
}

#[test]
fn violations_may_be_only_logged() {
    let w = world(false);
    let ph = w.intercept.secrets.get(0).placeholder().to_string();
    let mut g = guest(&w.sandbox_ca, "cdn.test", &[]);
    let mut u = upstream(&w.upstream, &[]);
    let mut m = Mitm::new(w.intercept.clone());
    let req = format!("GET /?k={ph} HTTP/1.1\r\nHost: cdn.test\r\n\r\n");
    let (at_up, _) = pump(&mut g, &mut m, &mut u, req.as_bytes(), b"").unwrap();
    assert_eq!(at_up, req.as_bytes(), "passed unchanged: never the value");
    assert_eq!(m.logged_violations, ["KEY"]);
}

#[test]
fn an_upstream_that_fails_verification_is_refused() {
    let w = world(true);
    // An upstream whose certificate chains to a CA nobody gave us.
    let rogue = Arc::new(Leaves::new(Ca::generate().unwrap()).unwrap());
    let mut g = guest(&w.sandbox_ca, "api.example.com", &[]);
    let mut u = upstream(&rogue, &[]);
    let mut m = Mitm::new(w.intercept.clone());
    let e = pump(&mut g, &mut m, &mut u, b"GET / HTTP/1.1\r\n\r\n", b"").unwrap_err();
    assert!(
        matches!(&e, MitmError::Upstream { name, .. } if name == "api.example.com"),
        "{e}"
    );
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
}

#[test]
fn hostile_guests_end_their_flow() {
    let w = world(true);
    let mut m = Mitm::new(w.intercept.clone());
    let e = m
        .guest_bytes(b"\x16\x03\x01\x00\x05garbage and more garbage", &mut |_| {
            true
        })
        .unwrap_err();
    assert!(matches!(e, MitmError::Guest(_)), "{e}");
    // Whatever alert rustls has goes to the guest (then the caller resets the flow); a
    // failed connection takes nothing more.
    let mut alert = Vec::new();
    m.take_for_guest(&mut alert).unwrap();
    assert!(alert.is_empty() || alert[0] == 0x15, "{alert:?}");
    assert!(m.guest_bytes(b"more", &mut |_| true).is_ok() && !m.wants_guest());
    // A ClientHello in 1-byte segments is read; one naming no server is passed through.
    let mut g = guest(&w.sandbox_ca, "93.184.215.14", &[]);
    let mut hello = Vec::new();
    g.write_tls(&mut hello).unwrap();
    let mut m = Mitm::new(w.intercept.clone());
    let mut r = Ok(());
    for b in hello.chunks(1) {
        r = m.guest_bytes(b, &mut |_| true);
        if r.is_err() {
            break;
        }
    }
    r.unwrap();
    let (raw, why) = m.bypassed().expect("passed through");
    assert_eq!((raw, why), (hello.clone(), "no server name"));
    assert!(m.bypassed().is_none(), "once");
    // Endless handshake bytes while the upstream has not answered are bounded.
    let mut g = guest(&w.sandbox_ca, "api.example.com", &[]);
    let mut hello = Vec::new();
    g.write_tls(&mut hello).unwrap();
    let mut m = Mitm::new(w.intercept.clone());
    m.guest_bytes(&hello, &mut |_| true).unwrap();
    let junk = vec![0x17u8; 4096];
    let mut failed = false;
    for _ in 0..64 {
        if m.guest_bytes(&junk, &mut |_| true).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "held bytes are bounded");
}

#[test]
fn the_policy_refuses_a_request_by_its_host() {
    let w = world(true);
    let mut g = guest(&w.sandbox_ca, "api.example.com", &[]);
    let mut u = upstream(&w.upstream, &[]);
    let mut m = Mitm::new(w.intercept.clone());
    // Handshake first with an allowed request.
    pump(
        &mut g,
        &mut m,
        &mut u,
        b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
        b"",
    )
    .unwrap();
    g.writer()
        .write_all(b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    g.write_tls(&mut buf).unwrap();
    let e = m
        .guest_bytes(&buf, &mut |r| r.host.as_deref() != Some("evil.test"))
        .unwrap_err();
    assert!(
        matches!(e, MitmError::Request(RewriteError::Refused(_))),
        "{e}"
    );
}

#[test]
fn a_bad_roots_file_is_one_clear_error() {
    let leaves = Arc::new(Leaves::new(Ca::generate().unwrap()).unwrap());
    let f = std::env::temp_dir().join(format!("msb-mitm-bad-{}.pem", std::process::id()));
    std::fs::write(&f, "not a certificate").unwrap();
    let e = Intercept::new(leaves, Secrets::default(), &[&f], false).unwrap_err();
    assert!(e.to_string().contains("no usable CA certificate"), "{e}");
    std::fs::remove_file(&f).unwrap();
}

#[test]
fn bypassed_names_pass_through_with_their_hello() {
    let w = world(true);
    let mut i = Intercept::new(
        w.intercept.leaves.clone(),
        Secrets::default(),
        &[&w.upstream_ca_file],
        false,
    )
    .unwrap();
    i.bypass = vec![HostPattern::parse("*.pinned.test").unwrap()];
    let i = Arc::new(i);
    let mut g = guest(&w.sandbox_ca, "app.pinned.test", &[]);
    let mut hello = Vec::new();
    g.write_tls(&mut hello).unwrap();
    let mut m = Mitm::new(i.clone());
    m.guest_bytes(&hello[..10], &mut |_| true).unwrap();
    assert!(m.bypassed().is_none());
    m.guest_bytes(&hello[10..], &mut |_| true).unwrap();
    assert_eq!(m.bypassed(), Some((hello, "--tls-bypass")));
    assert_eq!(m.server_name(), Some("app.pinned.test"));
}

#[test]
fn other_protocols_pass_toward_hosts_without_secrets_only() {
    let w = world(true);
    let mut g = guest(&w.sandbox_ca, "db.test", &[]);
    let mut u = upstream(&w.upstream, &[]);
    let mut m = Mitm::new(w.intercept.clone());
    let (at_up, _) = pump(&mut g, &mut m, &mut u, b"\x00\x01binary protocol", b"").unwrap();
    assert_eq!(at_up, b"\x00\x01binary protocol");
    let mut g = guest(&w.sandbox_ca, "api.example.com", &[]);
    let mut u = upstream(&w.upstream, &[]);
    let mut m = Mitm::new(w.intercept.clone());
    let (at_up, _) = pump(&mut g, &mut m, &mut u, b"\x00\x01binary protocol", b"").unwrap();
    assert!(
        at_up.is_empty(),
        "held as an unfinished request head, nothing sent"
    );
    g.writer().write_all(b"\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    g.write_tls(&mut buf).unwrap();
    let e = m.guest_bytes(&buf, &mut |_| true).unwrap_err();
    assert!(
        matches!(e, MitmError::Request(RewriteError::NotHttp1(_))),
        "{e}"
    );
    assert!(looks_like_http1(b"GET / HTTP/1.1") && looks_like_http1(b"PO"));
    assert!(!looks_like_http1(b"\x16\x03") && !looks_like_http1(b"get /"));
}
