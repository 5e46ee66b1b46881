//! Device state from a hostile snapshot file: any bytes as a virtio-mmio transport's state
//! (restored onto a vsock device over guest memory full of fuzzer bytes) or as a share's node
//! table (restored into a fresh server). Never a panic; a transport state is taken or refused
//! whole; and every node a restored share opens lies inside the share.
#![no_main]

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use msb_devices::fs::passthrough::{FsState, PassthroughFs};
use msb_devices::virtio::mmio::{MmioState, MmioTransport};
use msb_devices::virtio::vsock::VsockDevice;
use msb_devices::virtio::IrqStatus;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A share holding `a` and `d/b`, beside a directory with a secret and a symlink to it.
fn share() -> &'static PathBuf {
    static SHARE: OnceLock<PathBuf> = OnceLock::new();
    SHARE.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("msb-fuzz-state-{}", std::process::id()));
        let share = base.join("share");
        std::fs::create_dir_all(share.join("d")).unwrap();
        std::fs::create_dir_all(base.join("outside")).unwrap();
        std::fs::write(base.join("outside/secret"), b"s").unwrap();
        std::fs::write(share.join("a"), b"a").unwrap();
        std::fs::write(share.join("d/b"), b"b").unwrap();
        let _ = std::os::unix::fs::symlink(base.join("outside"), share.join("out"));
        share
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        let (state, memory) = rest.split_at(rest.len() / 2);
        let Ok(state) = postcard::from_bytes::<MmioState>(state) else {
            return;
        };
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 10)]).unwrap();
        let _ = mem.write_slice(&memory[..memory.len().min(64 << 10)], GuestAddress(0));
        let (dev, _host) = VsockDevice::new().unwrap();
        let mut t =
            MmioTransport::new(Box::new(dev), mem, IrqStatus::new(Arc::new(msb_devices::NoInterrupt))).unwrap();
        t.set_seccomp(msb_devices::virtio::Seccomp::Off);
        if t.restore_state(&state).is_ok() && state.active {
            assert!(t.is_active() || state.failed, "restored but not running");
            // Let the worker meet the hostile queues, then tear down.
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        use msb_devices::bus::BusDevice;
        t.write(0x70, &0u32.to_le_bytes());
    } else {
        let Ok(state) = postcard::from_bytes::<FsState>(rest) else {
            return;
        };
        let fs = PassthroughFs::new(share(), Default::default()).unwrap();
        if fs.restore_state(&state).is_ok() {
            // Anything opened outside the share would have no path within it.
            let saved = fs.save_state().unwrap();
            assert!(
                saved.nodes.iter().all(|n| n.path.is_some()),
                "a restored node lies outside the share"
            );
            assert!(saved.handles.iter().all(|h| h.path.is_some()));
        }
    }
});
