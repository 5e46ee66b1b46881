//! A virtio-net device activated over guest memory full of fuzzer bytes (so both queues hold
//! arbitrary descriptors and indices), with or without mergeable receive buffers and the
//! guest offloads, while the stack queues frames of any size for the guest (segmentation
//! frames up to 64 KiB) and the guest transmits. Never a panic: a bad ring fails the device.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use msb_devices::virtio::net::NetDevice;
use msb_devices::virtio::{Activation, DeviceFailure, IrqStatus, Queue, VirtioDevice};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: usize = 128 << 10;

fn queue(size: u16, base: u64) -> Queue {
    let mut q = Queue::new(256).unwrap();
    q.set_size(size);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
    q.set_ready(true);
    q
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let (head, memory) = data.split_at(12);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let _ = mem.write_slice(&memory[..memory.len().min(MEM)], GuestAddress(0));
    let mut features = 1u64 << 32;
    for (bit, f) in [(0, 1u64 << 15), (1, 0b11 << 7 | 1 << 1), (2, 0b11 << 11 | 1)] {
        if head[0] >> bit & 1 == 1 {
            features |= f;
        }
    }
    let size = 1u16 << (head[1] % 9);
    let (mut dev, port) = NetDevice::new([2, 0, 0, 0, 0, 1], 1500).unwrap();
    let evts: Vec<Arc<EventFd>> = (0..2)
        .map(|_| Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()))
        .collect();
    let activated = dev.activate(
        Activation {
            mem: mem.clone(),
            irq: IrqStatus::new(Arc::new(msb_devices::NoInterrupt)),
            queues: vec![
                (queue(size, 0x0000), evts[0].clone()),
                (queue(size, 0x3000), evts[1].clone()),
            ],
            failure: Arc::new(DeviceFailure::default()),
            // The fuzzer's own runtime runs on any thread; filters are tested elsewhere.
            seccomp: msb_devices::virtio::Seccomp::Off,
        },
        features,
    );
    if activated.is_err() {
        return;
    }
    // Frames for the guest: sizes from the input, half of them segmentation frames.
    let frame = vec![0x5a; 65549];
    for c in head[2..].chunks_exact(2) {
        let len = usize::from(u16::from_le_bytes([c[0], c[1]]));
        let mut hdr = [0u8; 12];
        if len & 1 == 1 {
            hdr = [1, 1, 54, 0, 0xa8, 5, 34, 0, 16, 0, 0, 0];
        }
        port.send_offloaded(&hdr, &frame[..len.min(frame.len())]);
    }
    for e in &evts {
        let _ = e.write(1);
    }
    std::thread::sleep(std::time::Duration::from_micros(300));
    let mut buf = vec![0u8; 65549];
    while port.recv(&mut buf).is_some() {}
    dev.reset();
});
