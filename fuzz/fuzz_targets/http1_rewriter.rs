//! The HTTP/1 request rewriter of intercepted flows, fed arbitrary bytes cut into arbitrary
//! segments, toward a server and with request hosts the fuzzer picks. It never panics, and a
//! secret's value never comes out more often than the guest wrote it unless the secret is
//! bound to the flow's server name (the only place a value may be sent).
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_netstack::http1::RequestRewriter;
use msb_netstack::secrets::{Secret, Secrets};

const SERVERS: [&str; 3] = ["api.example.com", "other.test", "evil.test"];

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let secrets = Secrets::new(vec![
        Secret::new("KEY", b"V4LUE-0ne".to_vec(), "api.example.com").unwrap(),
        Secret::new("OTHER", b"V4LUE-tw0".to_vec(), "*.test").unwrap(),
    ])
    .unwrap();
    let server = SERVERS[usize::from(sel % 3)];
    // The placeholders are random per run: the fuzzer's bytes name them by escape.
    let mut input = Vec::with_capacity(rest.len() * 2);
    let mut cuts = Vec::new();
    for &b in rest {
        match b {
            0xf0 => input.extend_from_slice(secrets.get(0).placeholder().as_bytes()),
            0xf1 => input.extend_from_slice(secrets.get(1).placeholder().as_bytes()),
            0xf2 => input.extend_from_slice(b"\r\n"),
            0xf3 => input.extend_from_slice(b"\r\nHost: api.example.com\r\n"),
            0xf4 => input.extend_from_slice(b"Content-Length: 5\r\n"),
            0xf5 => input.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
            0xf6 => input.extend_from_slice(b"POST / HTTP/1.1"),
            0xf7 => cuts.push(input.len()),
            b => input.push(b),
        }
    }
    let mut rw = RequestRewriter::new(&secrets, server);
    let mut out = Vec::new();
    let mut start = 0;
    let mut failed = false;
    for end in cuts.into_iter().chain([input.len()]) {
        let end = end.max(start);
        if rw.push(&secrets, &input[start..end], &mut out, &mut |_| true).is_err() {
            failed = true;
            break;
        }
        start = end;
    }
    if !failed {
        rw.finish(&secrets, &mut out);
    }
    for (i, s) in secrets.iter().enumerate() {
        let value: &[u8] = if i == 0 { b"V4LUE-0ne" } else { b"V4LUE-tw0" };
        if !s.allowed_for(server) {
            assert!(
                count(&out, value) <= count(&input, value),
                "{} went to {server}",
                s.name()
            );
            assert_eq!(rw.counts[i], 0);
        }
    }
});
