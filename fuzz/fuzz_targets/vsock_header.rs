//! vsock packet headers from the guest: parsing never panics, and every accepted header
//! round-trips and satisfies the checks the device relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_devices::virtio::vsock::packet::{Header, HDR_LEN, HOST_CID, MAX_PAYLOAD, TYPE_STREAM};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let available = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
    let bytes = &data[4..];
    if let Ok(h) = Header::parse(bytes, available, 3) {
        assert!(bytes.len() >= HDR_LEN);
        assert_eq!((h.src_cid, h.dst_cid, h.type_), (3, HOST_CID, TYPE_STREAM));
        assert!(h.len <= MAX_PAYLOAD);
        assert_eq!(Header::parse(&h.encode(), available, 3), Ok(h));
    }
});
