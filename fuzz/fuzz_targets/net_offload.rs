//! A guest's virtio-net header and frame (checksum and segmentation offload): never a panic,
//! the frame keeps its length, and a finished checksum sums to zero over what it covers
//! (with the partial sum the guest left counted in, as the protocol defines).
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_netstack::offload::{complete, VNET_HDR_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() < VNET_HDR_LEN {
        return;
    }
    let (hdr, frame) = data.split_at(VNET_HDR_LEN);
    let mut f = frame.to_vec();
    if complete(hdr, &mut f).is_ok() {
        assert_eq!(f.len(), frame.len());
        let gso = hdr[1] & 0x7f;
        if hdr[0] & 1 != 0 && gso == 0 {
            let start = u16::from_le_bytes([hdr[6], hdr[7]]) as usize;
            let field = start + u16::from_le_bytes([hdr[8], hdr[9]]) as usize;
            // Summing the covered bytes with the original field value in place of the result
            // and adding the result's complement gives the all-ones total.
            let mut g = f.clone();
            g[field..field + 2].copy_from_slice(&frame[field..field + 2]);
            let mut sum: u64 = 0;
            for c in g[start..].chunks(2) {
                sum += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
            }
            while sum >> 16 != 0 {
                sum = (sum & 0xffff) + (sum >> 16);
            }
            let result = u16::from_be_bytes([f[field], f[field + 1]]);
            assert!(result == !(sum as u16) || (result == 0xffff && sum as u16 == 0xffff));
        }
    }
});
