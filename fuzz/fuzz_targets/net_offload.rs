//! A guest's virtio-net header and frame (checksum and segmentation offload): never a panic,
//! the frame keeps its length, only a segmentation frame's IP header changes, and then to
//! describe the whole frame. The same frame's SYN MSS raised (as when the stack offloads
//! toward the guest): never a panic, and at most the option's two bytes change.
#![no_main]

use libfuzzer_sys::fuzz_target;
use msb_netstack::offload::{accept, raise_mss, RAISED_MSS, VNET_HDR_LEN};

fuzz_target!(|data: &[u8]| {
    if data.len() < VNET_HDR_LEN {
        return;
    }
    let (hdr, frame) = data.split_at(VNET_HDR_LEN);
    let mut raised = frame.to_vec();
    let changed = raise_mss(&mut raised);
    let diff: Vec<usize> = (0..frame.len()).filter(|&i| raised[i] != frame[i]).collect();
    match changed {
        Some((_, mss)) => {
            assert!(mss < RAISED_MSS);
            assert!(diff.len() <= 2 && diff.windows(2).all(|w| w[1] == w[0] + 1));
        }
        None => assert!(diff.is_empty()),
    }
    let mut f = frame.to_vec();
    if accept(hdr, &mut f).is_ok() {
        assert_eq!(f.len(), frame.len());
        let gso = hdr[1] & 0x7f;
        if gso == 0 {
            assert_eq!(f, frame, "nothing to fix without segmentation");
        } else {
            let ethertype = u16::from_be_bytes([f[12], f[13]]);
            let (lo, hi) = if ethertype == 0x0800 { (16, 18) } else { (18, 20) };
            let len = u16::from_be_bytes([f[lo], f[hi - 1]]) as usize;
            let want = if ethertype == 0x0800 { f.len() - 14 } else { f.len() - 54 };
            assert_eq!(len, want);
            let l4 = if ethertype == 0x0800 { 14 + (f[14] & 0xf) as usize * 4 } else { 54 };
            assert_eq!(&f[l4..], &frame[l4..], "the segment itself is untouched");
        }
    }
});
