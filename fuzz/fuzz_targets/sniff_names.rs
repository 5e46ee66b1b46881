//! The first bytes of a guest's TCP flow (TLS ClientHello, HTTP request head): never a panic,
//! a name only if it is a valid normalized domain, and a verdict that does not flip from
//! "need more" to something else when nothing was added (prefixes are stable).
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_netstack::policy::normalize_domain;
use msb_netstack::sniff::{sniff, Sniffed};

fuzz_target!(|data: &[u8]| {
    let whole = sniff(data);
    if let Sniffed::Name(n) = &whole {
        assert_eq!(normalize_domain(n).as_deref(), Some(n.as_str()));
    }
    // A prefix that already named a server names the same one when more bytes follow.
    for cut in [data.len() / 2, data.len().saturating_sub(1)] {
        if let Sniffed::Name(n) = sniff(&data[..cut]) {
            assert_eq!(whole, Sniffed::Name(n), "cut at {cut}");
        }
    }
});
