//! Saving and restoring a virtio-mmio transport: its registers, the interrupt status and every
//! queue as far as the device's worker advanced it. A restored transport whose driver had set
//! DRIVER_OK activates its device again on the saved queues, so the guest's driver carries on
//! without noticing.
//!
//! The state comes from a snapshot file, which may have been tampered with: every field is
//! checked the way the guest's register writes are (queue sizes and rings against guest
//! memory), and a state that does not fit this device is refused.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{QueueState, QueueT};

use super::MmioTransport;
use crate::virtio::{status, Queue};

/// One queue's registers and ring positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
        }
    }
}

/// A transport's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    pub device_type: u32,
    pub status: u32,
    pub queue_sel: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    /// Whether the device was activated (its worker ran the queues).
    pub active: bool,
    /// Whether the device had failed (DEVICE_NEEDS_RESET).
    pub failed: bool,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state ([`crate::virtio::VirtioDevice::save_device`]).
    pub device: Vec<u8>,
}

/// Why a transport's state could not be saved or restored.
#[derive(Debug, Error)]
pub enum PersistError {
    #[error("the device is active but its worker was not quiesced first")]
    NotQuiesced,
    #[error("cannot quiesce or resume the device worker: {0}")]
    Worker(std::io::Error),
    #[error("the saved state is for device type {saved}, this device is type {ours}")]
    DeviceType { saved: u32, ours: u32 },
    #[error("the saved state has {saved} queues, this device has {ours}")]
    QueueCount { saved: usize, ours: usize },
    #[error("saved queue {index} is invalid: {why}")]
    Queue { index: usize, why: String },
    #[error("saved status {0:#x} is not one a driver can reach")]
    Status(u32),
    #[error("the saved features {0:#x} were never offered")]
    Features(u64),
    #[error("cannot activate the restored device: {0}")]
    Activate(String),
    #[error("the device's own state: {0}")]
    Device(String),
}

impl MmioTransport {
    /// Stops the device's worker (if it has one) between two rounds of work; guest memory
    /// and the queues do not change until [`MmioTransport::resume`].
    pub fn quiesce(&mut self) -> Result<(), PersistError> {
        match self.device.worker() {
            Some(w) if self.active => w.quiesce().map_err(PersistError::Worker),
            _ => Ok(()),
        }
    }

    /// Lets a quiesced device's worker run again.
    pub fn resume(&mut self) -> Result<(), PersistError> {
        match self.device.worker() {
            Some(w) => w.resume().map_err(PersistError::Worker),
            None => Ok(()),
        }
    }

    /// The transport's state; an active device must be quiesced (its worker owns the queues).
    pub fn save_state(&mut self) -> Result<MmioState, PersistError> {
        let queues: Vec<QueueSnapshot> = if self.active {
            match self.device.worker() {
                Some(w) => w
                    .queue_states()
                    .ok_or(PersistError::NotQuiesced)?
                    .into_iter()
                    .map(QueueSnapshot::from)
                    .collect(),
                // A device without a worker leaves the queues to the transport.
                None => self.queue_snapshots(),
            }
        } else {
            self.queue_snapshots()
        };
        // Queues the device does not run (vsock's event queue) keep the transport's copy.
        let mut all = self.queue_snapshots();
        for (slot, q) in all.iter_mut().zip(queues) {
            *slot = q;
        }
        let device = if self.active {
            self.device.save_device().map_err(PersistError::Device)?
        } else {
            Vec::new()
        };
        Ok(MmioState {
            device,
            device_type: self.device.device_type(),
            status: self.status,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            active: self.active,
            failed: self.failure.is_failed(),
            interrupt_status: self.irq.read(),
            queues: all,
        })
    }

    fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        self.queues.iter().map(|q| q.state().into()).collect()
    }

    /// Puts a fresh transport (same device, same guest memory) in the saved state and, if the
    /// driver had activated the device, activates it on the saved queues.
    pub fn restore_state(&mut self, state: &MmioState) -> Result<(), PersistError> {
        let ours = self.device.device_type();
        if state.device_type != ours {
            return Err(PersistError::DeviceType {
                saved: state.device_type,
                ours,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(PersistError::QueueCount {
                saved: state.queues.len(),
                ours: self.queues.len(),
            });
        }
        let known = status::ACKNOWLEDGE
            | status::DRIVER
            | status::DRIVER_OK
            | status::FEATURES_OK
            | status::FAILED;
        let s = state.status;
        let has = |b: u32| s & b != 0;
        let reachable = s & !known == 0
            && (!has(status::DRIVER) || has(status::ACKNOWLEDGE))
            && (!has(status::FEATURES_OK) || has(status::DRIVER))
            && (!has(status::DRIVER_OK) || has(status::FEATURES_OK))
            && (!state.active || has(status::DRIVER_OK));
        if !reachable {
            return Err(PersistError::Status(s));
        }
        if has(status::FEATURES_OK) && state.driver_features & !self.device_features() != 0 {
            return Err(PersistError::Features(state.driver_features));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (index, (saved, ours)) in state.queues.iter().zip(&self.queues).enumerate() {
            let bad = |why: String| PersistError::Queue { index, why };
            if saved.max_size != ours.max_size() {
                return Err(bad(format!(
                    "maximum size {} where the device offers {}",
                    saved.max_size,
                    ours.max_size()
                )));
            }
            let q = Queue::try_from(QueueState::from(*saved)).map_err(|e| bad(format!("{e:?}")))?;
            if q.ready() && !q.is_valid(&self.mem) {
                return Err(bad("its rings lie outside guest memory".into()));
            }
            queues.push(q);
        }
        self.queues = queues;
        self.queue_sel = state.queue_sel;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.status = state.status;
        self.irq.restore(state.interrupt_status);
        if state.active {
            self.device
                .restore_device(&state.device)
                .map_err(PersistError::Device)?;
            self.activate();
            if !self.active {
                return Err(PersistError::Activate(
                    "the device refused its saved queues".into(),
                ));
            }
        }
        if state.failed {
            self.failure.fail("it had failed before the snapshot");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! A transport driven through its registers, with a device whose worker echoes each
    //! chain's length into the used ring: saved mid-traffic, restored into a fresh transport.

    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use virtio_queue::QueueOwnedT;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::bus::BusDevice;
    use crate::virtio::testing::{Line, Ring};
    use crate::virtio::worker::{self, DeviceWork, DeviceWorker, WorkerControl, WorkerSetup};
    use crate::virtio::{ActivateError, Activation, IrqStatus, VirtioDevice};

    struct Echo {
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
    }

    impl DeviceWork for Echo {
        fn work(&mut self) -> Result<bool, String> {
            let mem = self.mem.clone();
            let q = &mut self.queues[0];
            let mut used = false;
            loop {
                let chain = match q.iter(&mem) {
                    Ok(mut it) => it.next(),
                    Err(e) => return Err(e.to_string()),
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let len: u32 = chain.clone().map(|d| d.len()).sum();
                q.add_used(&mem, head, len).map_err(|e| e.to_string())?;
                used = true;
            }
            Ok(used)
        }

        fn queues(&self) -> Vec<&Queue> {
            self.queues.iter().collect()
        }
    }

    struct EchoDevice(Option<DeviceWorker<Echo>>);

    impl VirtioDevice for EchoDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(&mut self, a: Activation, _features: u64) -> Result<(), ActivateError> {
            let (queues, evts): (Vec<_>, Vec<_>) = a.queues.into_iter().unzip();
            let setup = WorkerSetup {
                name: "echo".into(),
                kind: msb_confine::ThreadKind::Fs,
                seccomp: msb_confine::Seccomp::Off,
                irq: a.irq,
                failure: a.failure,
                queue_evts: evts,
            };
            let epoll = worker::new_epoll().map_err(ActivateError::Worker)?;
            let work = Echo { mem: a.mem, queues };
            self.0 = Some(DeviceWorker::start(setup, epoll, work).map_err(ActivateError::Worker)?);
            Ok(())
        }
        fn reset(&mut self) {
            self.0 = None;
        }
        fn worker(&mut self) -> Option<&mut dyn WorkerControl> {
            worker::control(&mut self.0)
        }
    }

    fn transport(mem: &GuestMemoryMmap) -> MmioTransport {
        let line = Arc::new(Line::default());
        let mut t = MmioTransport::new(
            Box::new(EchoDevice(None)),
            mem.clone(),
            IrqStatus::new(line),
        )
        .unwrap();
        t.set_seccomp(msb_confine::Seccomp::Off);
        t
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn rings() -> [Ring; 2] {
        [0x1000u64, 0x4000].map(|base| Ring {
            base,
            size: 16,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        })
    }

    /// A well-behaved driver, up to DRIVER_OK.
    fn start(t: &mut MmioTransport, rings: &[Ring; 2]) {
        w(t, 0x70, status::ACKNOWLEDGE);
        w(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(t, 0x24, 1);
        w(t, 0x20, 1); // VERSION_1
        w(t, 0x70, 11);
        for (q, r) in rings.iter().enumerate() {
            w(t, 0x30, q as u32);
            w(t, 0x38, u32::from(r.size));
            w(t, 0x80, r.desc(0) as u32);
            w(t, 0x90, r.avail() as u32);
            w(t, 0xa0, r.used() as u32);
            w(t, 0x44, 1);
        }
        w(t, 0x70, 15);
        assert!(t.is_active());
    }

    /// Waits (at most 10 s: a hung worker fails the test) for `n` used entries.
    fn wait_used(ring: &mut Ring, mem: &GuestMemoryMmap, n: usize) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        while got.len() < n {
            got.extend(ring.take_used(mem));
            assert!(Instant::now() < deadline, "the worker used {got:?} of {n}");
            std::thread::sleep(Duration::from_millis(1));
        }
        got
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn a_restored_transport_carries_on_where_the_worker_left_off() {
        let mem = memory();
        let mut rings = rings();
        let mut t = transport(&mem);
        start(&mut t, &rings);
        for len in [100, 200, 300] {
            rings[0].add(&mem, &[(0x8000, len, false)]);
        }
        t.queue_evts()[0].write(1).unwrap();
        assert_eq!(
            wait_used(&mut rings[0], &mem, 3),
            vec![(0, 100), (1, 200), (2, 300)]
        );

        assert!(matches!(t.save_state(), Err(PersistError::NotQuiesced)));
        t.quiesce().unwrap();
        // Quiesced: a notification is not served.
        rings[0].add(&mem, &[(0x8000, 400, false)]);
        t.queue_evts()[0].write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(rings[0].take_used(&mem).is_empty());
        let state = t.save_state().unwrap();
        assert!(state.active && !state.failed);
        assert_eq!(state.status, 15);
        assert_eq!(
            (state.queues[0].next_avail, state.queues[0].next_used),
            (3, 3)
        );
        assert_eq!(state.queues[1].next_avail, 0);
        drop(t);

        // A new transport on the same memory (the restored guest's), with the chain the guest
        // queued while the snapshot was taken still pending.
        let mut t = transport(&mem);
        t.restore_state(&state).unwrap();
        assert!(t.is_active());
        t.queue_evts()[0].write(1).unwrap();
        assert_eq!(wait_used(&mut rings[0], &mem, 1), vec![(3, 400)]);
        rings[0].add(&mem, &[(0x8000, 500, false), (0x9000, 6, true)]);
        t.queue_evts()[0].write(1).unwrap();
        assert_eq!(wait_used(&mut rings[0], &mem, 1), vec![(4, 506)]);
        assert_eq!(
            t.save_state().err().map(|e| e.to_string()),
            Some(PersistError::NotQuiesced.to_string())
        );

        // Quiesce and resume in place: the worker carries on.
        t.quiesce().unwrap();
        t.resume().unwrap();
        rings[0].add(&mem, &[(0x8000, 7, false)]);
        t.queue_evts()[0].write(1).unwrap();
        assert_eq!(wait_used(&mut rings[0], &mem, 1), vec![(6, 7)]);
    }

    #[test]
    fn a_transport_before_driver_ok_round_trips() {
        let mem = memory();
        let mut t = transport(&mem);
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x30, 1);
        let state = t.save_state().unwrap();
        assert!(!state.active);
        let mut u = transport(&mem);
        u.restore_state(&state).unwrap();
        assert!(!u.is_active());
        assert_eq!(u.save_state().unwrap(), state);
    }

    #[test]
    fn tampered_states_are_refused() {
        let mem = memory();
        let rings = rings();
        let mut t = transport(&mem);
        start(&mut t, &rings);
        t.quiesce().unwrap();
        let good = t.save_state().unwrap();
        drop(t);
        type Tamper = Box<dyn Fn(&mut MmioState)>;
        let cases: Vec<(&str, Tamper)> = vec![
            ("device type", Box::new(|s| s.device_type = 19)),
            (
                "queue count",
                Box::new(|s| {
                    s.queues.pop();
                }),
            ),
            ("status", Box::new(|s| s.status = status::DRIVER_OK)),
            ("active without DRIVER_OK", Box::new(|s| s.status = 11)),
            ("features", Box::new(|s| s.driver_features |= 1 << 40)),
            ("max size", Box::new(|s| s.queues[0].max_size = 1024)),
            ("size", Box::new(|s| s.queues[0].size = 3)),
            (
                "rings",
                Box::new(|s| s.queues[1].used_ring = 0xffff_ffff_0000),
            ),
        ];
        for (what, tamper) in cases {
            let mut bad = good.clone();
            tamper(&mut bad);
            let mut t = transport(&mem);
            let r = t.restore_state(&bad);
            assert!(r.is_err(), "{what}: accepted");
            assert!(!t.is_active(), "{what}: the device runs");
        }
        let mut t = transport(&mem);
        t.restore_state(&good).unwrap();
        assert!(t.is_active());
    }
}
