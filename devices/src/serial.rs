//! 8250/16550A UART on port I/O (vm-superio's register model), plus the console sink that
//! keeps the last console output in a ring buffer even when it is not shown.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::bus::{lock, BusDevice};
use crate::Interrupt;

/// Standard COM1 base port and IRQ (the kernel console, ttyS0).
pub const COM1: (u16, u32) = (0x3f8, 4);
/// Standard COM2 base port and IRQ (msb-init's control port, ttyS1).
pub const COM2: (u16, u32) = (0x2f8, 3);
/// Number of ports a UART occupies.
pub const UART_PORTS: u64 = 8;

/// Adapts an [`Interrupt`] to vm-superio's trigger.
#[derive(Debug)]
pub struct IrqTrigger(pub Arc<dyn Interrupt>);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// A UART's state in a snapshot (vm-superio's, which has no serde of its own).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Input the guest had not read (at most the 64-byte FIFO).
    pub in_buffer: Vec<u8>,
}

/// A UART whose transmitted bytes go to `W`.
pub struct SerialDevice<W: Write + Send> {
    uart: Serial<IrqTrigger, NoEvents, W>,
}

impl<W: Write + Send> std::fmt::Debug for SerialDevice<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART raising `irq` and writing its output to `out`.
    pub fn new(irq: Arc<dyn Interrupt>, out: W) -> Self {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// A UART continuing a saved one (registers and unread input).
    pub fn from_state(
        irq: Arc<dyn Interrupt>,
        out: W,
        saved: &SerialSnapshot,
    ) -> Result<Self, String> {
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let uart = Serial::from_state(&state, IrqTrigger(irq), NoEvents, out)
            .map_err(|e| format!("the saved UART state: {e:?}"))?;
        Ok(SerialDevice { uart })
    }

    /// The UART's registers and unread input, for a snapshot.
    pub fn save_state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Queues bytes the guest will receive; returns how many fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// The output sink.
    pub fn writer_mut(&mut self) -> &mut W {
        self.uart.writer_mut()
    }
}

impl<W: Write + Send> BusDevice for SerialDevice<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // UART registers are one byte wide; wider accesses read as zero.
        if let ([b], Ok(off)) = (data, u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([b], Ok(off)) = (data, u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, *b) {
                tracing::trace!("serial write: {e:?}");
            }
        }
    }
}

/// The last bytes of console output, kept so a failed boot can show how it ended.
#[derive(Debug)]
pub struct ConsoleRing {
    buf: VecDeque<u8>,
    cap: usize,
}

impl ConsoleRing {
    /// A ring keeping the last `cap` bytes.
    pub fn new(cap: usize) -> Self {
        ConsoleRing {
            buf: VecDeque::with_capacity(cap.min(1 << 16)),
            cap,
        }
    }

    /// Appends bytes, dropping the oldest beyond the capacity.
    pub fn push(&mut self, bytes: &[u8]) {
        let bytes = if bytes.len() > self.cap {
            &bytes[bytes.len() - self.cap..]
        } else {
            bytes
        };
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        self.buf.drain(..overflow);
        self.buf.extend(bytes);
    }

    /// The last `n` lines (without carriage returns), oldest first.
    pub fn last_lines(&self, n: usize) -> Vec<String> {
        let bytes: Vec<u8> = self.buf.iter().copied().filter(|&b| b != b'\r').collect();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// Whether any of the kept output contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        let bytes: Vec<u8> = self.buf.iter().copied().collect();
        String::from_utf8_lossy(&bytes).contains(needle)
    }
}

/// Console output sink: always into the ring, and to `echo` when the console is shown.
pub struct ConsoleSink {
    ring: Arc<Mutex<ConsoleRing>>,
    echo: Option<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink")
            .field("echo", &self.echo.is_some())
            .finish()
    }
}

impl ConsoleSink {
    /// A sink feeding `ring` and, if given, `echo`.
    pub fn new(ring: Arc<Mutex<ConsoleRing>>, echo: Option<Box<dyn Write + Send>>) -> Self {
        ConsoleSink { ring, echo }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.ring).push(buf);
        if let Some(echo) = self.echo.as_mut() {
            // A closed terminal must not stop the guest: drop echo on error.
            if echo.write_all(buf).is_err() {
                self.echo = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(echo) = self.echo.as_mut() {
            let _ = echo.flush();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default, Debug)]
    struct Count(AtomicUsize);
    impl Interrupt for Count {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn transmit_reaches_the_sink_and_raises_thre() {
        let irq = Arc::new(Count::default());
        let mut uart = SerialDevice::new(irq.clone(), Vec::new());
        uart.write(1, &[0x02]); // IER: THRE interrupt enabled
        let mut iir = [0u8];
        uart.read(2, &mut iir); // reading IIR acknowledges the pending interrupt
        let before = irq.0.load(Ordering::SeqCst);
        for b in b"hi" {
            uart.write(0, &[*b]);
            uart.read(2, &mut iir);
        }
        assert_eq!(uart.writer_mut().as_slice(), b"hi");
        assert!(irq.0.load(Ordering::SeqCst) > before);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let irq = Arc::new(Count::default());
        let mut uart = SerialDevice::new(irq, Vec::new());
        uart.write(0, &[1, 2]);
        uart.write(300, &[1]);
        let mut wide = [0xffu8; 4];
        uart.read(0, &mut wide);
        assert_eq!(
            wide, [0xff; 4],
            "wide reads leave the caller's zeroed buffer alone"
        );
        assert!(uart.writer_mut().is_empty());
    }

    #[test]
    fn a_restored_uart_keeps_its_registers_and_unread_input() {
        let irq = Arc::new(Count::default());
        let mut uart = SerialDevice::new(irq.clone(), Vec::new());
        uart.write(3, &[0x03]); // LCR: 8 bits
        uart.write(7, &[0x5a]); // scratch
        uart.write(1, &[0x01]); // IER: data-ready interrupt
        assert_eq!(uart.enqueue_input(b"xyz"), 3);
        let mut b = [0u8];
        uart.read(0, &mut b);
        assert_eq!(b[0], b'x');
        let saved = uart.save_state();
        assert_eq!(saved.in_buffer, b"yz");

        let mut back = SerialDevice::from_state(irq.clone(), Vec::new(), &saved).unwrap();
        assert_eq!(back.save_state(), saved);
        for (reg, want) in [(3u64, 0x03u8), (7, 0x5a), (1, 0x01), (0, b'y'), (0, b'z')] {
            back.read(reg, &mut b);
            assert_eq!(b[0], want, "register {reg}");
        }
        // More input than the FIFO holds is not a UART state.
        let mut bad = saved.clone();
        bad.in_buffer = vec![0; 65];
        assert!(SerialDevice::from_state(irq, Vec::new(), &bad).is_err());
    }

    #[test]
    fn input_is_received() {
        let irq = Arc::new(Count::default());
        let mut uart = SerialDevice::new(irq, Vec::new());
        assert_eq!(uart.enqueue_input(b"ab"), 2);
        let mut lsr = [0u8];
        uart.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        uart.read(0, &mut b);
        assert_eq!(b[0], b'a');
    }

    #[test]
    fn ring_keeps_the_tail() {
        let mut r = ConsoleRing::new(16);
        r.push(b"line one\r\nline two\r\n");
        r.push(b"three\n");
        assert_eq!(
            r.last_lines(2),
            vec!["line two".to_string(), "three".to_string()]
        );
        let mut big = ConsoleRing::new(4);
        big.push(b"0123456789");
        assert_eq!(big.last_lines(1), vec!["6789".to_string()]);
        assert!(big.contains("78"));
    }
}
