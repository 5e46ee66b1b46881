//! virtio devices over the virtio-mmio transport (virtio 1.x, "modern" only).
//!
//! [`mmio::MmioTransport`] is the register interface the guest driver programs; it owns a
//! [`VirtioDevice`] and activates it once the driver is done negotiating. Devices process
//! their queues on their own worker threads and raise interrupts through [`IrqStatus`].
//! Everything the guest writes is validated; a driver that breaks the rules gets its device
//! marked failed (DEVICE_NEEDS_RESET), never a VMM panic.

pub use msb_confine::Seccomp;
use msb_confine::ThreadKind;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::Interrupt;

#[cfg(target_os = "linux")]
pub mod fs;
pub mod mmio;
#[cfg(target_os = "linux")]
pub mod net;
#[cfg(test)]
pub(crate) mod testing;
pub mod vsock;
pub mod worker;

/// The queue implementation shared by all devices.
pub use virtio_queue::Queue;

/// VIRTIO_F_VERSION_1: the only mode we offer.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Interrupt status bits (InterruptStatus register).
pub const INT_VRING: u32 = 1;
/// Configuration changed (also used to announce DEVICE_NEEDS_RESET).
pub const INT_CONFIG: u32 = 2;

/// The interrupt line of one virtio-mmio device plus its InterruptStatus register.
#[derive(Debug)]
pub struct IrqStatus {
    status: AtomicU32,
    line: Arc<dyn Interrupt>,
}

impl IrqStatus {
    /// Status register over an interrupt line.
    pub fn new(line: Arc<dyn Interrupt>) -> Arc<IrqStatus> {
        Arc::new(IrqStatus {
            status: AtomicU32::new(0),
            line,
        })
    }

    /// Sets `bits` in InterruptStatus and raises the line.
    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            tracing::error!("virtio interrupt: {e}");
        }
    }

    /// Current InterruptStatus.
    pub fn read(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets InterruptStatus as a snapshot saved it, without raising the line (the interrupt
    /// controller's own state says whether it was pending).
    pub fn restore(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// Why a device could not be activated.
#[derive(Debug, Error)]
pub enum ActivateError {
    #[error("queue {0} is not ready or its rings lie outside guest memory")]
    BadQueue(usize),
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
}

/// Set when a device saw a driver break the rules; the transport then reports
/// DEVICE_NEEDS_RESET and the device stops touching its queues until reset.
#[derive(Debug, Default)]
pub struct DeviceFailure(std::sync::atomic::AtomicBool);

impl DeviceFailure {
    /// Marks the device failed, logging why (once).
    pub fn fail(&self, why: &str) {
        if !self.0.swap(true, Ordering::SeqCst) {
            tracing::error!("virtio device failed: {why}");
        }
    }

    /// Whether the device failed.
    pub fn is_failed(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Clears the failure (device reset).
    pub fn clear(&self) {
        self.0.store(false, Ordering::SeqCst)
    }
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub irq: Arc<IrqStatus>,
    /// The device's queues with the eventfds the guest's notifications arrive on.
    pub queues: Vec<(Queue, Arc<EventFd>)>,
    /// Set by the device when the driver misbehaves.
    pub failure: Arc<DeviceFailure>,
    /// Whether the device's worker installs its seccomp filter.
    pub seccomp: Seccomp,
}

/// Starts a device worker that confines itself as `kind` before it touches the guest's queues;
/// a worker that cannot be confined fails its device rather than run unconfined.
///
/// Workers start when the driver sets DRIVER_OK, which happens on a vCPU thread; a thread
/// inherits its creator's seccomp filters, so the worker is started by the launcher thread
/// (see [`start_worker_launcher`]) rather than by the vCPU, whose filter is far narrower.
pub(crate) fn spawn_worker(
    name: String,
    kind: ThreadKind,
    seccomp: Seccomp,
    failure: Arc<DeviceFailure>,
    work: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let job: Job = Box::new(move || {
        std::thread::Builder::new().name(name).spawn(move || {
            if let Err(e) = msb_confine::enter(kind, seccomp) {
                failure.fail(&e.to_string());
                return;
            }
            work()
        })
    });
    let launcher = start_worker_launcher(seccomp)?;
    let (tx, rx) = std::sync::mpsc::channel();
    launcher
        .send((job, tx))
        .map_err(|_| std::io::Error::other("the device worker launcher is gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the device worker launcher is gone"))?
}

type Job = Box<dyn FnOnce() -> std::io::Result<std::thread::JoinHandle<()>> + Send>;
type Launcher = std::sync::mpsc::Sender<(
    Job,
    std::sync::mpsc::Sender<std::io::Result<std::thread::JoinHandle<()>>>,
)>;

/// One launcher per seccomp mode, for the life of the process.
static LAUNCHERS: std::sync::Mutex<[Option<Launcher>; 2]> = std::sync::Mutex::new([None, None]);

/// Starts (once per process and mode) the thread that starts device workers, confined as the
/// `launcher` kind (what any device worker may do, plus starting threads). Call it during VM
/// set-up, from a thread that is not confined yet; the VMM does.
pub fn start_worker_launcher(seccomp: Seccomp) -> std::io::Result<Launcher> {
    let slot = usize::from(seccomp == Seccomp::Off);
    let mut launchers = LAUNCHERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = &launchers[slot] {
        return Ok(l.clone());
    }
    let (tx, rx) = std::sync::mpsc::channel::<(Job, std::sync::mpsc::Sender<_>)>();
    std::thread::Builder::new()
        .name("vmm-launcher".into())
        .spawn(move || {
            if let Err(e) = msb_confine::enter(ThreadKind::Launcher, seccomp) {
                tracing::error!("device worker launcher: {e}");
                return;
            }
            for (job, reply) in rx {
                let _ = reply.send(job());
            }
        })?;
    launchers[slot] = Some(tx.clone());
    Ok(tx)
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// virtio device id (19 for vsock).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts processing; called once per activation.
    fn activate(&mut self, activation: Activation, features: u64) -> Result<(), ActivateError>;
    /// Stops processing and drops all queue state (the driver reset the device).
    fn reset(&mut self);
    /// The worker of an activated device, for quiescing it around a snapshot.
    fn worker(&mut self) -> Option<&mut dyn worker::WorkerControl> {
        None
    }
    /// The device's own state beyond its queues, encoded (empty: it has none). Called with
    /// the worker quiesced.
    fn save_device(&mut self) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
    }
    /// Takes back what [`VirtioDevice::save_device`] gave, before the device is activated on
    /// its restored queues. The bytes come from a file: check everything.
    fn restore_device(&mut self, saved: &[u8]) -> Result<(), String> {
        if saved.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} bytes of state for a device that keeps none",
                saved.len()
            ))
        }
    }
}

/// Reads `data.len()` bytes of a little-endian config structure at `offset`, zero past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else {
        return;
    };
    if off >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - off);
    data[..n].copy_from_slice(&config[off..off + n]);
}

/// Rejects chains that revisit a descriptor (a loop: virtio-queue would silently cut it at the
/// queue size) or mix device-writable buffers before readable ones.
pub fn check_chain(
    chain: &virtio_queue::DescriptorChain<&GuestMemoryMmap>,
    queue_size: u16,
) -> Result<(), String> {
    let size = usize::from(queue_size).max(1);
    let mut seen = vec![false; size];
    seen[usize::from(chain.head_index()) % size] = true;
    let mut writable_seen = false;
    for d in chain.clone() {
        if d.is_write_only() {
            writable_seen = true;
        } else if writable_seen {
            return Err("descriptor chain has a readable buffer after a writable one".into());
        }
        if d.has_next() {
            let next = usize::from(d.next());
            if next >= seen.len() || std::mem::replace(&mut seen[next], true) {
                return Err(format!(
                    "descriptor chain loops or leaves the table (next {next})"
                ));
            }
        }
    }
    Ok(())
}
