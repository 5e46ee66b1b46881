//! The snapshot state loader fed hostile state files: raw bytes (bad magic, versions,
//! lengths, checksums) and, past the checksum, any payload the fuzzer makes. Each gives a
//! decoded state that passes the restore checks or an error; never a panic, and never a
//! memory layout outside the memory file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

fuzz_target!(|data: &[u8]| {
    let Some((&len_byte, payload)) = data.split_first() else {
        return;
    };
    let file_len = u64::from(len_byte) << 20;
    let _ = msb_vmm::vm::check_snapshot_state(data, file_len);
    // The same bytes as a well-formed file: header and checksum right, payload arbitrary.
    let mut file = b"MSBSNAP\0".to_vec();
    file.extend_from_slice(&msb_vmm::snapshot::FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    file.extend_from_slice(&Sha256::digest(payload));
    file.extend_from_slice(payload);
    if let Ok((cpus, ram)) = msb_vmm::vm::check_snapshot_state(&file, file_len) {
        assert!(cpus >= 1 && ram <= file_len, "{cpus} vCPUs, {ram} bytes of {file_len}");
    }
});
