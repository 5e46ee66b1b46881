//! DNS from the guest (queries) and from the network (answers): never a panic; every query
//! that parses yields an answer that parses back with the records we put in it.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};

use libfuzzer_sys::fuzz_target;
use msb_netstack::dns::{self, Answer};

fuzz_target!(|data: &[u8]| {
    let _ = dns::parse_response(data, "example.com");
    let _ = dns::error_response(data, dns::RCODE_FORMERR);
    if let Ok(q) = dns::parse_query(data) {
        let answers = [Answer {
            ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
            ttl: 7,
        }];
        let r = dns::response(&q, 0, &answers);
        if let Some(name) = &q.name {
            assert!(name.len() <= 253);
            let up = dns::parse_response(&r, name).expect("our own answer parses");
            assert_eq!(up.id, q.id);
            assert_eq!(up.answers, answers);
        }
    }
});
