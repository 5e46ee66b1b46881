//! Firecracker-compatible boot timer: the guest writes the byte 123 to the device's first byte
//! when it considers itself booted; the VMM records how long that took since its own start.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::bus::BusDevice;

/// Size of the device's MMIO window.
pub const BOOT_TIMER_LEN: u64 = 0x1000;
/// The value that marks boot completion.
pub const MAGIC: u8 = 123;

/// The device; the first magic write fixes the boot time, later writes are ignored.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    done: Arc<OnceLock<Duration>>,
    notify: Option<Arc<dyn crate::Interrupt>>,
}

impl BootTimer {
    /// A timer measuring from `start` (the VMM process start) into `done`, optionally waking
    /// `notify` when the guest signals.
    pub fn new(
        start: Instant,
        done: Arc<OnceLock<Duration>>,
        notify: Option<Arc<dyn crate::Interrupt>>,
    ) -> Self {
        BootTimer {
            start,
            done,
            notify,
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&MAGIC) {
            return;
        }
        let elapsed = self.start.elapsed();
        if self.done.set(elapsed).is_ok() {
            tracing::info!(
                "guest boot complete after {}.{:03} ms (boot timer, since VMM start)",
                elapsed.as_millis(),
                elapsed.as_micros() % 1000
            );
            if let Some(n) = &self.notify {
                let _ = n.trigger();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_magic_write_wins() {
        let done = Arc::new(OnceLock::new());
        let start = Instant::now();
        let mut t = BootTimer::new(start, done.clone(), None);
        t.write(1, &[MAGIC]);
        t.write(0, &[122]);
        assert!(done.get().is_none());
        t.write(0, &[MAGIC]);
        let first = *done.get().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        t.write(0, &[MAGIC]);
        assert_eq!(*done.get().unwrap(), first);
    }
}
