//! The one worker loop every virtio device runs its queues on.
//!
//! A device's worker is a thread (confined as its [`ThreadKind`]) waiting on an epoll set: one
//! eventfd per queue (the guest's notifications), a stop eventfd, and whatever host-side fds the
//! device adds. What differs between devices is [`DeviceWork`]: how a wake-up is served. The
//! loop owns the rest, so stopping a worker is the same everywhere and hands its state back:
//! the device can save its queues (a snapshot) and start the same state again.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use msb_confine::{Seccomp, ThreadKind};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_queue::QueueState;

use super::{DeviceFailure, IrqStatus, Queue, INT_CONFIG, INT_VRING};

/// Tokens below this are the queues' notifications (token = queue index).
pub const FIRST_DEVICE_TOKEN: u64 = 16;
/// The stop eventfd's token.
const TOKEN_STOP: u64 = u64::MAX;

/// What a device does when its worker wakes up.
pub trait DeviceWork: Send + 'static {
    /// Milliseconds the next wait may last (-1: until an event).
    fn timeout_ms(&self) -> i32 {
        -1
    }
    /// An event on a device fd (token at least [`FIRST_DEVICE_TOKEN`]).
    fn event(&mut self, _token: u64, _set: EventSet) {}
    /// One round of work after a wake-up, unless the device failed. `Ok(true)` raises the
    /// queue interrupt; `Err` says how the driver broke the rules and fails the device.
    fn work(&mut self) -> Result<bool, String>;
    /// The queues, as far as the worker has advanced them (saved in snapshots).
    fn queues(&self) -> Vec<&Queue>;
}

/// What every worker gets besides its [`DeviceWork`].
#[derive(Debug)]
pub struct WorkerSetup {
    /// Thread name (also the log prefix).
    pub name: String,
    pub kind: ThreadKind,
    pub seccomp: Seccomp,
    pub irq: Arc<IrqStatus>,
    pub failure: Arc<DeviceFailure>,
    /// The queues' notification eventfds, by queue index.
    pub queue_evts: Vec<Arc<EventFd>>,
}

/// A device's worker: running on its thread, or quiesced with its work held here. Dropping
/// it stops the thread.
pub struct DeviceWorker<W: DeviceWork> {
    thread: Option<JoinHandle<()>>,
    /// The work while quiesced.
    held: Option<W>,
    stop: Arc<EventFd>,
    /// Where the thread leaves its work when it stops.
    parked: Arc<Mutex<Option<W>>>,
    epoll: Arc<Epoll>,
    setup: Arc<WorkerSetup>,
}

impl<W: DeviceWork> std::fmt::Debug for DeviceWorker<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceWorker")
            .field("name", &self.setup.name)
            .field("quiesced", &self.held.is_some())
            .finish_non_exhaustive()
    }
}

/// What the transport does with a device's worker, whatever the device.
pub trait WorkerControl {
    /// Stops the thread between two rounds of work and keeps the work: the device's queues
    /// and guest memory stay as they are until [`WorkerControl::resume`].
    fn quiesce(&mut self) -> std::io::Result<()>;
    /// Starts the held work again on a new thread, where it left off.
    fn resume(&mut self) -> std::io::Result<()>;
    /// The queues while quiesced, in queue order (`None` while running).
    fn queue_states(&self) -> Option<Vec<QueueState>>;
}

/// The epoll set of a worker about to start: the device registers its own fds (and, like
/// vsock, keeps a handle to add and remove more while it runs).
pub fn new_epoll() -> std::io::Result<Arc<Epoll>> {
    Ok(Arc::new(Epoll::new()?))
}

/// Adds `fd` to `epoll` for `events` under `token`.
pub fn watch(epoll: &Epoll, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
    epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
}

impl<W: DeviceWork> DeviceWorker<W> {
    /// Starts `work` on its own thread, waiting on `epoll` (which already holds the device's
    /// own fds) plus the queues' eventfds and a stop eventfd.
    pub fn start(setup: WorkerSetup, epoll: Arc<Epoll>, work: W) -> std::io::Result<Self> {
        for (i, evt) in setup.queue_evts.iter().enumerate() {
            debug_assert!((i as u64) < FIRST_DEVICE_TOKEN);
            watch(&epoll, evt.as_raw_fd(), EventSet::IN, i as u64)?;
        }
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        watch(&epoll, stop.as_raw_fd(), EventSet::IN, TOKEN_STOP)?;
        let mut worker = DeviceWorker {
            thread: None,
            held: Some(work),
            stop,
            parked: Arc::new(Mutex::new(None)),
            epoll,
            setup: Arc::new(setup),
        };
        worker.resume()?;
        Ok(worker)
    }

    /// Stops the thread; the work it ran, unless it never ran it (it could not confine
    /// itself) or panicked.
    fn halt(&mut self) -> Option<W> {
        let thread = self.thread.take()?;
        let _ = self.stop.write(1);
        if thread.join().is_err() {
            tracing::error!("{}: the worker panicked", self.setup.name);
        }
        // Consume the stop request so a resumed loop does not see it.
        let _ = self.stop.read();
        self.parked.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// The work while quiesced.
    pub fn held(&self) -> Option<&W> {
        self.held.as_ref()
    }
}

/// A device's [`VirtioDevice::worker`](super::VirtioDevice::worker) from its worker slot.
pub fn control<W: DeviceWork>(
    slot: &mut Option<DeviceWorker<W>>,
) -> Option<&mut dyn WorkerControl> {
    slot.as_mut().map(|w| w as &mut dyn WorkerControl)
}

impl<W: DeviceWork> WorkerControl for DeviceWorker<W> {
    fn quiesce(&mut self) -> std::io::Result<()> {
        if self.held.is_some() {
            return Ok(());
        }
        self.held = self.halt();
        match self.held {
            Some(_) => Ok(()),
            None => Err(std::io::Error::other(format!(
                "{}: the worker is gone",
                self.setup.name
            ))),
        }
    }

    fn resume(&mut self) -> std::io::Result<()> {
        let Some(work) = self.held.take() else {
            return Ok(());
        };
        let mut run = Loop {
            setup: self.setup.clone(),
            epoll: self.epoll.clone(),
            work,
        };
        let slot = self.parked.clone();
        let thread = super::spawn_worker(
            self.setup.name.clone(),
            self.setup.kind,
            self.setup.seccomp,
            self.setup.failure.clone(),
            move || {
                run.run();
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(run.work);
            },
        )?;
        self.thread = Some(thread);
        Ok(())
    }

    fn queue_states(&self) -> Option<Vec<QueueState>> {
        let work = self.held.as_ref()?;
        Some(work.queues().iter().map(|q| q.state()).collect())
    }
}

impl<W: DeviceWork> Drop for DeviceWorker<W> {
    fn drop(&mut self) {
        self.halt();
    }
}

struct Loop<W> {
    setup: Arc<WorkerSetup>,
    epoll: Arc<Epoll>,
    work: W,
}

impl<W: DeviceWork> Loop<W> {
    fn run(&mut self) {
        let name = &self.setup.name;
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(self.work.timeout_ms(), &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("{name}: epoll: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => return,
                    q if q < FIRST_DEVICE_TOKEN => {
                        if let Some(evt) = self.setup.queue_evts.get(q as usize) {
                            let _ = evt.read();
                        }
                    }
                    t => self.work.event(t, ev.event_set()),
                }
            }
            if self.setup.failure.is_failed() {
                // Nothing more is read from the guest's queues until it resets the device.
                continue;
            }
            match self.work.work() {
                Ok(true) => self.setup.irq.signal(INT_VRING),
                Ok(false) => {}
                Err(why) => {
                    self.setup.failure.fail(&format!("{name}: {why}"));
                    self.setup.irq.signal(INT_CONFIG);
                }
            }
        }
    }
}
