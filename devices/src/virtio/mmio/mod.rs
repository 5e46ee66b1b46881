//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2).

use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    status, Activation, DeviceFailure, IrqStatus, Queue, VirtioDevice, INT_CONFIG,
    VIRTIO_F_VERSION_1,
};
use crate::bus::BusDevice;

mod persist;
pub use persist::{MmioState, PersistError, QueueSnapshot};

/// Size of one device's MMIO window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of QueueNotify: the VMM registers an ioeventfd per queue here.
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4d53_4256; // "VBSM"
const CONFIG_SPACE: u64 = 0x100;

/// A virtio device behind the mmio register interface.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqStatus>,
    queues: Vec<Queue>,
    queue_evts: Vec<Arc<EventFd>>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    active: bool,
    failure: Arc<DeviceFailure>,
    seccomp: msb_confine::Seccomp,
    /// Protocol violations logged so far (only the first few are).
    complaints: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Whether the device's worker installs its seccomp filter (it does unless told not to).
    pub fn set_seccomp(&mut self, mode: msb_confine::Seccomp) {
        self.seccomp = mode;
    }

    /// Wraps `device`; its queues are created empty (the driver sizes and places them).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<IrqStatus>,
    ) -> std::io::Result<MmioTransport> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(
                Queue::new(max)
                    .map_err(|e| std::io::Error::other(format!("queue size {max}: {e:?}")))?,
            );
            queue_evts.push(Arc::new(EventFd::new(EFD_NONBLOCK)?));
        }
        Ok(MmioTransport {
            device,
            mem,
            irq,
            queues,
            queue_evts,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            active: false,
            failure: Arc::new(DeviceFailure::default()),
            seccomp: msb_confine::Seccomp::Enforce,
            complaints: 0,
        })
    }

    /// The per-queue notification eventfds (register them as ioeventfds at QUEUE_NOTIFY with
    /// the queue index as data match).
    pub fn queue_evts(&self) -> &[Arc<EventFd>] {
        &self.queue_evts
    }

    /// Whether the device was activated and has not failed.
    pub fn is_active(&self) -> bool {
        self.active && !self.failure.is_failed()
    }

    fn device_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn complain(&mut self, what: &str) {
        self.complaints = self.complaints.saturating_add(1);
        if self.complaints <= 8 {
            tracing::warn!(
                "virtio-mmio (device type {}): driver {what}; ignored",
                self.device.device_type()
            );
        }
    }

    /// A rule broken after DRIVER_OK: the driver is not one we can trust with the device.
    fn fail(&mut self, what: &str) {
        self.failure.fail(&format!("driver {what}"));
        self.irq.signal(INT_CONFIG);
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Whether queue registers may be written now (FEATURES_OK set, DRIVER_OK not yet).
    fn queue_config_allowed(&mut self, what: &str) -> bool {
        if self.status & status::DRIVER_OK != 0 {
            self.fail(&format!("wrote {what} after DRIVER_OK"));
            return false;
        }
        if self.status & status::FEATURES_OK == 0 {
            self.complain(&format!("wrote {what} before FEATURES_OK"));
            return false;
        }
        match self.queues.get(self.queue_sel as usize) {
            None => {
                let sel = self.queue_sel;
                self.complain(&format!(
                    "wrote {what} of queue {sel}, which does not exist"
                ));
                false
            }
            Some(q) if q.ready() && what != "QueueReady" => {
                self.complain(&format!("wrote {what} of a ready queue"));
                false
            }
            Some(_) => true,
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
        }
        self.active = false;
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.irq.ack(u32::MAX);
        self.failure.clear();
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            return self.reset();
        }
        let old = self.status;
        if new & old != old {
            return self.complain(&format!(
                "cleared status bits ({old:#x} -> {new:#x}) without a reset"
            ));
        }
        let added = new & !old;
        let has = |b: u32| new & b != 0;
        let order_ok = (added & status::DRIVER == 0 || has(status::ACKNOWLEDGE))
            && (added & status::FEATURES_OK == 0 || has(status::DRIVER))
            && (added & status::DRIVER_OK == 0 || has(status::FEATURES_OK));
        if !order_ok {
            return self.complain(&format!(
                "set status bits out of order ({old:#x} -> {new:#x})"
            ));
        }
        let mut new = new;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device_features();
            let f = self.driver_features;
            if f & !offered != 0 || f & (1 << VIRTIO_F_VERSION_1) == 0 {
                // Leave FEATURES_OK clear: the driver reads it back and gives up (spec 3.1.1).
                self.complain(&format!(
                    "accepted features {f:#x} (offered {offered:#x}, VERSION_1 required)"
                ));
                new &= !(status::FEATURES_OK | status::DRIVER_OK);
            }
        }
        self.status = new;
        if added & new & status::DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return self.fail(&format!(
                    "made queue {i} ready with rings outside guest memory or an invalid size"
                ));
            }
        }
        // The device gets its own copy of each queue's state; ours keeps answering register
        // reads until the next reset.
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            match Queue::try_from(q.state()) {
                Ok(copy) => queues.push((copy, self.queue_evts[i].clone())),
                Err(e) => {
                    return self.fail(&format!("configured queue {i} inconsistently ({e:?})"))
                }
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            irq: self.irq.clone(),
            queues,
            failure: self.failure.clone(),
            seccomp: self.seccomp,
        };
        match self.device.activate(activation, self.driver_features) {
            Ok(()) => self.active = true,
            Err(e) => self.fail(&format!("activated the device, which failed: {e}")),
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            0x034 => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| u32::from(q.max_size()))
                .unwrap_or(0),
            0x044 => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| u32::from(q.ready()))
                .unwrap_or(0),
            0x060 => self.irq.read(),
            0x070 => {
                self.status
                    | if self.failure.is_failed() {
                        status::DEVICE_NEEDS_RESET
                    } else {
                        0
                    }
            }
            0x0fc => 0, // config generation: our config never changes under the driver
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    return self.complain("wrote DriverFeatures outside feature negotiation");
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    _ => self.complain("selected a DriverFeatures word beyond 63"),
                }
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 => {
                if self.queue_config_allowed("QueueNum") {
                    let ok = v <= u32::from(u16::MAX)
                        && self
                            .selected()
                            .map(|q| q.try_set_size(v as u16).is_ok())
                            .unwrap_or(false);
                    if !ok {
                        self.complain(&format!("set a queue size of {v}"));
                    }
                }
            }
            0x044 => {
                if self.queue_config_allowed("QueueReady") {
                    if let Some(q) = self.selected() {
                        q.set_ready(v == 1);
                    }
                }
            }
            QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                // Reached only where no ioeventfd caught the write (or before it was set up).
                Some(e) if self.is_active() => {
                    let _ = e.write(1);
                }
                Some(_) => {}
                None => {
                    if self.status & status::DRIVER_OK != 0 {
                        self.fail(&format!("notified queue {v}, which does not exist"));
                    }
                }
            },
            0x064 => self.irq.ack(v),
            0x070 => self.set_status(v),
            0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => {
                let name = match offset {
                    0x080 | 0x084 => "QueueDesc",
                    0x090 | 0x094 => "QueueDriver",
                    _ => "QueueDevice",
                };
                if self.queue_config_allowed(name) {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    if let Some(q) = self.selected() {
                        match offset {
                            0x080 | 0x084 => q.set_desc_table_address(lo, hi),
                            0x090 | 0x094 => q.set_avail_ring_address(lo, hi),
                            _ => q.set_used_ring_address(lo, hi),
                        }
                    }
                }
            }
            _ => self.complain(&format!("wrote unknown register {offset:#x}")),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            return self.device.read_config(offset - CONFIG_SPACE, data);
        }
        if data.len() != 4 || offset % 4 != 0 {
            return self.complain(&format!(
                "read {} bytes at register {offset:#x}",
                data.len()
            ));
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            return self.device.write_config(offset - CONFIG_SPACE, data);
        }
        if data.len() != 4 || offset % 4 != 0 {
            return self.complain(&format!(
                "wrote {} bytes at register {offset:#x}",
                data.len()
            ));
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::Line;
    use crate::virtio::{ActivateError, INT_VRING};
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Log {
        activations: usize,
        resets: usize,
        features: u64,
        queues: Vec<bool>,
    }

    struct Dummy(Arc<Mutex<Log>>);
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data);
        }
        fn activate(&mut self, a: Activation, features: u64) -> Result<(), ActivateError> {
            let mut l = self.0.lock().unwrap();
            l.activations += 1;
            l.features = features;
            l.queues = a.queues.iter().map(|(q, _)| q.ready()).collect();
            a.irq.signal(INT_VRING);
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Log>>, Arc<Line>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let line = Arc::new(Line::default());
        let t = MmioTransport::new(
            Box::new(Dummy(log.clone())),
            mem,
            IrqStatus::new(line.clone()),
        )
        .unwrap();
        (t, log, line)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }
    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// Drives a well-behaved driver up to FEATURES_OK and sets up both queues.
    fn negotiate(t: &mut MmioTransport) {
        w(t, 0x70, status::ACKNOWLEDGE);
        w(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(t, 0x24, 0);
        w(t, 0x20, 1 << 3);
        w(t, 0x24, 1);
        w(t, 0x20, 1); // VERSION_1
        w(
            t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(r(t, 0x70) & status::FEATURES_OK, 0);
        for (q, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
            w(t, 0x30, q);
            w(t, 0x38, 16);
            w(t, 0x80, base);
            w(t, 0x90, base + 0x100);
            w(t, 0xa0, base + 0x200);
            w(t, 0x44, 1);
        }
    }

    #[test]
    fn identification_and_config() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), 42);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1, "VERSION_1 offered");
        let mut b = [0u8; 2];
        t.read(0x100 + 6, &mut b);
        assert_eq!(b, [7, 8]);
        t.read(0x100 + 7, &mut b);
        assert_eq!(b, [8, 0], "reads past the config read zero");
        w(&mut t, 0x30, 5);
        assert_eq!(r(&mut t, 0x34), 0, "QueueNumMax of a missing queue");
        w(&mut t, 0x30, 1);
        assert_eq!(r(&mut t, 0x34), 16);
    }

    #[test]
    fn good_driver_activates_the_device() {
        let (mut t, log, line) = transport();
        negotiate(&mut t);
        w(&mut t, 0x70, 15);
        let l = log.lock().unwrap();
        assert_eq!(l.activations, 1);
        assert_eq!(l.features, (1 << 3) | (1 << 32));
        assert_eq!(l.queues, vec![true, true]);
        drop(l);
        assert!(t.is_active());
        assert_eq!(r(&mut t, 0x60), INT_VRING);
        w(&mut t, 0x64, INT_VRING);
        assert_eq!(r(&mut t, 0x60), 0);
        assert!(line.count() >= 1);
        w(&mut t, 0x70, 0);
        assert_eq!(log.lock().unwrap().resets, 1);
        assert_eq!(r(&mut t, 0x70), 0);
        assert!(!t.is_active());
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let (mut t, log, _) = transport();
        w(&mut t, 0x70, 1);
        w(&mut t, 0x70, 3);
        w(&mut t, 0x20, 1 << 3);
        w(&mut t, 0x70, 11);
        assert_eq!(r(&mut t, 0x70) & status::FEATURES_OK, 0);
        w(&mut t, 0x70, 15);
        assert_eq!(
            log.lock().unwrap().activations,
            0,
            "DRIVER_OK without FEATURES_OK"
        );
    }

    #[test]
    fn queue_config_only_in_its_window() {
        let (mut t, _, _) = transport();
        // Before FEATURES_OK: ignored.
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 8);
        assert_eq!(t.queues[0].size(), 16);
        negotiate(&mut t);
        // Out-of-range queue index: ignored, nothing breaks.
        w(&mut t, 0x30, 7);
        w(&mut t, 0x38, 8);
        w(&mut t, 0x44, 1);
        // A size that is not a power of two is refused.
        w(&mut t, 0x30, 0);
        w(&mut t, 0x44, 0);
        w(&mut t, 0x38, 3);
        assert_eq!(t.queues[0].size(), 16);
        w(&mut t, 0x44, 1);
        w(&mut t, 0x70, 15);
        assert!(t.is_active());
        // After DRIVER_OK: the device fails.
        w(&mut t, 0x30, 0);
        w(&mut t, 0x80, 0x8000);
        assert!(!t.is_active());
        assert_ne!(r(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, 0x60) & INT_CONFIG, 0);
        // A reset recovers.
        w(&mut t, 0x70, 0);
        assert_eq!(r(&mut t, 0x70), 0);
    }

    #[test]
    fn rings_outside_memory_fail_activation() {
        let (mut t, log, _) = transport();
        negotiate(&mut t);
        w(&mut t, 0x30, 1);
        w(&mut t, 0x44, 0);
        w(&mut t, 0x80, 0xffff_f000);
        w(&mut t, 0x84, 0xffff_ffff);
        w(&mut t, 0x44, 1);
        w(&mut t, 0x70, 15);
        assert_eq!(log.lock().unwrap().activations, 0);
        assert_ne!(r(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn status_rules() {
        let (mut t, log, _) = transport();
        w(&mut t, 0x70, status::DRIVER_OK);
        assert_eq!(r(&mut t, 0x70), 0, "DRIVER_OK first is out of order");
        w(&mut t, 0x70, 1);
        w(&mut t, 0x70, 3);
        w(&mut t, 0x70, 1);
        assert_eq!(r(&mut t, 0x70), 3, "bits cannot be cleared without a reset");
        assert_eq!(log.lock().unwrap().activations, 0);
        // Odd sizes and misaligned register accesses are ignored.
        t.write(0x70, &[0]);
        t.write(0x71, &[0, 0, 0, 0]);
        assert_eq!(r(&mut t, 0x70), 3);
        w(&mut t, 0x50, 99);
        w(&mut t, 0x0f0, 1);
    }

    #[test]
    fn notify_falls_back_to_the_eventfd() {
        let (mut t, _, _) = transport();
        negotiate(&mut t);
        w(&mut t, 0x70, 15);
        w(&mut t, 0x50, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
        w(&mut t, 0x50, 9);
        assert!(
            !t.is_active(),
            "notifying a missing queue after DRIVER_OK fails the device"
        );
    }
}
