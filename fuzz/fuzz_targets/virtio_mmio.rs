//! Arbitrary register sequences against the virtio-mmio transport of a vsock device, with
//! guest memory full of fuzzer bytes (so activated queues hold arbitrary descriptors). The
//! transport and the device must never panic; the worse a driver behaves, the more it just
//! ends with a failed device.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use msb_devices::bus::BusDevice;
use msb_devices::virtio::mmio::MmioTransport;
use msb_devices::virtio::vsock::VsockDevice;
use msb_devices::virtio::IrqStatus;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (ops, memory) = data.split_at(data.len() / 2);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 10)]).unwrap();
    let _ = mem.write_slice(&memory[..memory.len().min(64 << 10)], GuestAddress(0));
    let (dev, _host) = VsockDevice::new().unwrap();
    let mut t = MmioTransport::new(Box::new(dev), mem, IrqStatus::new(Arc::new(msb_devices::NoInterrupt))).unwrap();
    // The fuzzer's own runtime (sanitizers, libFuzzer's signal handlers) runs on any thread;
    // the workers' filters are tested elsewhere (device unit tests, tiers 2 and 4).
    t.set_seccomp(msb_devices::virtio::Seccomp::Off);
    // Each op: 1 byte kind/width, 2 bytes offset, 4 bytes value.
    for op in ops.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) & 0x1ff);
        let value = [op[3], op[4], op[5], op[6]];
        let width = [1usize, 2, 4, 8][usize::from(op[0] >> 1 & 3)];
        if op[0] & 1 == 0 {
            let mut buf = vec![0u8; width];
            t.read(offset, &mut buf);
        } else {
            let mut buf = value.to_vec();
            buf.resize(width, 0);
            t.write(offset, &buf);
        }
    }
    // Give an activated device's worker a moment with its hostile queues, then tear down.
    std::thread::sleep(std::time::Duration::from_micros(200));
    t.write(0x70, &0u32.to_le_bytes());
});
