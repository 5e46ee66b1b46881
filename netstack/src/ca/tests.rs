use super::*;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client(ca: &CertificateDer<'static>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn server(leaves: Arc<Leaves>) -> Arc<ServerConfig> {
    Arc::new(
        ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(leaves),
    )
}

/// A whole handshake in memory, then one message each way; the client's error if any.
fn handshake(
    ca_der: &CertificateDer<'static>,
    leaves: &Arc<Leaves>,
    name: &str,
) -> Result<(), rustls::Error> {
    let mut c = ClientConnection::new(
        client(ca_der),
        ServerName::try_from(name.to_string()).unwrap(),
    )?;
    let mut s = ServerConnection::new(server(leaves.clone()))?;
    let mut buf = Vec::new();
    for _ in 0..10 {
        buf.clear();
        c.write_tls(&mut buf).unwrap();
        s.read_tls(&mut &buf[..]).unwrap();
        if let Err(e) = s.process_new_packets() {
            // Tell the client why (its alert), as a real peer would.
            buf.clear();
            let _ = s.write_tls(&mut buf);
            let _ = c.read_tls(&mut &buf[..]);
            c.process_new_packets()?;
            return Err(e);
        }
        buf.clear();
        s.write_tls(&mut buf).unwrap();
        c.read_tls(&mut &buf[..]).unwrap();
        c.process_new_packets()?;
        if !c.is_handshaking() && !s.is_handshaking() {
            use std::io::Read;
            c.writer().write_all(b"ping").unwrap();
            buf.clear();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            let mut got = [0u8; 4];
            s.reader().read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping");
            return Ok(());
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn leaves_are_trusted_through_the_ca_for_their_name_only() {
    let ca = Ca::generate().unwrap();
    let ca_der = ca.cert_der().clone();
    let leaves = Arc::new(Leaves::new(ca).unwrap());
    handshake(&ca_der, &leaves, "api.example.com").unwrap();
    handshake(&ca_der, &leaves, "API.Example.com").unwrap();
    // Another CA's clients refuse them.
    let other = Ca::generate().unwrap();
    assert!(handshake(other.cert_der(), &leaves, "api.example.com").is_err());
    // A leaf presented for another name is refused by a verifying client.
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new({
            let mut r = RootCertStore::empty();
            r.add(ca_der.clone()).unwrap();
            r
        }),
        provider(),
    )
    .build()
    .unwrap();
    let leaf = leaves.get("api.example.com").unwrap();
    let now = rustls::pki_types::UnixTime::now();
    let check = |n: &str| {
        verifier.verify_server_cert(
            &leaf.cert[0],
            &leaf.cert[1..],
            &ServerName::try_from(n.to_string()).unwrap(),
            &[],
            now,
        )
    };
    assert!(check("api.example.com").is_ok());
    assert!(check("other.example.com").is_err());
}

#[test]
fn leaves_are_cached_and_bounded() {
    let leaves = Leaves::new(Ca::generate().unwrap()).unwrap();
    let a = leaves.get("a.test").unwrap();
    assert!(Arc::ptr_eq(&a, &leaves.get("A.test.").unwrap()));
    assert!(leaves.get("not a name").is_err());
    let mut lru = Lru::new(2);
    lru.insert("x".into(), a.clone());
    lru.insert("y".into(), a.clone());
    lru.get("x");
    lru.insert("z".into(), a.clone());
    assert!(lru.get("x").is_some() && lru.get("z").is_some());
    assert!(lru.get("y").is_none(), "the least recently used went");
}

#[test]
fn no_server_name_no_certificate() {
    let ca = Ca::generate().unwrap();
    let ca_der = ca.cert_der().clone();
    let leaves = Arc::new(Leaves::new(ca).unwrap());
    // A client aiming at an address sends no SNI: nothing to impersonate.
    assert!(handshake(&ca_der, &leaves, "93.184.215.14").is_err());
}

#[test]
fn the_ca_is_kept_private_and_reloads_to_sign_leaves_its_stored_certificate_verifies() {
    let dir = std::env::temp_dir().join(format!("msb-ca-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = Ca::load_or_create(&dir).unwrap();
    let pem = ca.cert_pem().to_string();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
    assert_eq!(mode(&dir.join(CERT_FILE)), 0o600);
    let again = Ca::load_or_create(&dir).unwrap();
    assert_eq!(again.cert_pem(), pem);
    // Leaves signed by the reloaded CA verify against the certificate first stored.
    let stored = pem_der(&pem).unwrap();
    handshake(&stored, &Arc::new(Leaves::new(again).unwrap()), "svc.test").unwrap();
    // A regenerated CA is another one.
    let new = Ca::create(&dir).unwrap();
    assert_ne!(new.cert_pem(), pem);
    assert!(handshake(&stored, &Arc::new(Leaves::new(new).unwrap()), "svc.test").is_err());
    // A key others can read is refused with the fix named.
    std::fs::set_permissions(dir.join(KEY_FILE), std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Ca::load(&dir).unwrap_err();
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::write(dir.join(KEY_FILE), "garbage").unwrap();
    std::fs::set_permissions(dir.join(KEY_FILE), std::fs::Permissions::from_mode(0o600)).unwrap();
    let e = Ca::load(&dir).unwrap_err();
    assert!(e.to_string().contains("--regenerate"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
