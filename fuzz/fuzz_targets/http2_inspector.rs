//! The HTTP/2 request inspector of intercepted flows, fed arbitrary bytes cut into arbitrary
//! segments. It never panics, it only ever passes on a prefix of what the guest sent
//! (unchanged), and nothing after a refused request is passed on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_netstack::http2::{RequestInspector, PREFACE};
use msb_netstack::secrets::{Secret, Secrets};

fuzz_target!(|data: &[u8]| {
    let secrets =
        Secrets::new(vec![Secret::new("KEY", b"V4LUE-0ne".to_vec(), "api.example.com").unwrap()])
            .unwrap();
    // Escapes: 0xf0 the preface, 0xf1 a placeholder, 0xf7 a segment boundary.
    let mut input = Vec::with_capacity(data.len() * 2);
    let mut cuts = Vec::new();
    for &b in data {
        match b {
            0xf0 => input.extend_from_slice(PREFACE),
            0xf1 => input.extend_from_slice(secrets.get(0).placeholder().as_bytes()),
            0xf7 => cuts.push(input.len()),
            b => input.push(b),
        }
    }
    let mut ins = RequestInspector::new("api.example.com");
    let mut out = Vec::new();
    let mut start = 0;
    for end in cuts.into_iter().chain([input.len()]) {
        let end = end.max(start);
        let mut refused = false;
        let r = ins.push(&secrets, &input[start..end], &mut out, &mut |r| {
            refused = r.host.as_deref() == Some("evil.test");
            !refused
        });
        assert!(input.starts_with(&out), "the output is the input, unchanged");
        if refused {
            assert!(r.is_err(), "a refused request ends the flow");
        }
        if r.is_err() {
            break;
        }
        start = end;
    }
});
