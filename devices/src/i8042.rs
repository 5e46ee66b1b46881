//! The i8042 keyboard controller, reduced to what a guest without input devices uses: the
//! "pulse reset line" command (0xFE to port 0x64), which Linux issues for `reboot=k`. msb-vmm
//! treats that reset as the guest powering off.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::Interrupt;

/// First port of the controller (data at 0x60, status/command at 0x64).
pub const I8042_BASE: u16 = 0x60;
/// Ports covered, 0x60..=0x64.
pub const I8042_PORTS: u64 = 5;

const CMD_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The controller; `reset` fires when the guest pulses the reset line.
#[derive(Debug)]
pub struct I8042 {
    reset: Arc<dyn Interrupt>,
}

impl I8042 {
    /// A controller signalling resets through `reset`.
    pub fn new(reset: Arc<dyn Interrupt>) -> Self {
        I8042 { reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty: the driver never waits on us.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == CMD_OFFSET && data == [CMD_RESET_CPU] {
            tracing::debug!("guest pulsed the i8042 reset line");
            if let Err(e) = self.reset.trigger() {
                tracing::error!("cannot signal guest reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default, Debug)]
    struct Count(AtomicUsize);
    impl Interrupt for Count {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn only_the_reset_command_resets() {
        let c = Arc::new(Count::default());
        let mut dev = I8042::new(c.clone());
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(4, &[0xfd]);
        dev.write(4, &[CMD_RESET_CPU, 0]);
        assert_eq!(c.0.load(Ordering::SeqCst), 0);
        dev.write(4, &[CMD_RESET_CPU]);
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        let mut s = [0xffu8];
        dev.read(4, &mut s);
        assert_eq!(s, [0]);
    }
}
