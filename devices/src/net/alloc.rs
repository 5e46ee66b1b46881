//! Each relayed TCP connection owns two 1 MiB smoltcp buffers (large windows are what make a
//! single stream fast). `vec![0; 1 MiB]` is calloc; glibc's adaptive mmap threshold soon
//! serves such sizes from the heap, where calloc must memset all of it: 2 MiB written per
//! connection, and resident until the process exits. Pinning the threshold below the buffer
//! size keeps every buffer a fresh mmap: zero pages that become resident only as the ring
//! reaches them, and are returned when the connection ends. On this host that tripled the
//! rate of short connections. (Unmapping costs too, an interrupt to every CPU running the
//! process: the netstack keeps the sockets of a few ended short flows for new ones.)

use std::sync::Once;

/// Allocations at least this large are always mmapped (process-wide, glibc only).
const MMAP_THRESHOLD: usize = 256 << 10;

/// Pins glibc's mmap threshold (once per process; a no-op on other C libraries).
pub fn pin_mmap_threshold() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator tuning; any value is accepted or refused.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
        }
        let _ = MMAP_THRESHOLD;
    });
}
