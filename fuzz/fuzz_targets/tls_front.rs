//! The TLS front end of interception (msb_netstack::intercept::Mitm) fed hostile guest bytes:
//! garbage records, ClientHellos cut anywhere or with fuzzer-chosen bytes after a real prefix,
//! endless handshakes. It never panics, its buffers stay bounded, and nothing reaches the
//! upstream side before a hello naming a server was read.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use msb_netstack::ca::{Ca, Leaves};
use msb_netstack::intercept::{Intercept, Mitm};
use msb_netstack::secrets::{Secret, Secrets};

fn intercept() -> Arc<Intercept> {
    static I: OnceLock<Arc<Intercept>> = OnceLock::new();
    I.get_or_init(|| {
        let ca = Ca::generate().unwrap();
        let dir = std::env::temp_dir().join(format!("msb-fuzz-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let roots = dir.join("roots.pem");
        std::fs::write(&roots, Ca::generate().unwrap().cert_pem()).unwrap();
        let secrets = Secrets::new(vec![Secret::new("K", b"v".to_vec(), "api.test").unwrap()]).unwrap();
        Arc::new(Intercept::new(Arc::new(Leaves::new(ca).unwrap()), secrets, &[&roots], false).unwrap())
    })
    .clone()
}

/// A real ClientHello's first bytes (TLS 1.3, SNI api.test), so inputs get past the record
/// layer often.
const HELLO_PREFIX: &[u8] = b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = Vec::new();
    if mode & 1 == 1 {
        input.extend_from_slice(HELLO_PREFIX);
    }
    input.extend_from_slice(rest);
    let mut m = Mitm::new(intercept());
    let step = usize::from(mode >> 1).max(1);
    let mut up = Vec::new();
    let mut down = Vec::new();
    for chunk in input.chunks(step) {
        if m.guest_bytes(chunk, &mut |_| true).is_err() {
            break;
        }
        let _ = m.take_for_upstream(&mut up);
        let _ = m.take_for_guest(&mut down);
        assert!(up.len() < 1 << 20 && down.len() < 1 << 20);
        if m.server_name().is_none() {
            assert!(up.is_empty(), "nothing goes upstream before a named hello");
        }
    }
    // Upstream garbage too.
    let _ = m.upstream_bytes(rest);
    let _ = m.take_for_guest(&mut down);
    let _ = m.bypassed();
});
