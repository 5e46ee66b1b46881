//! ARM PL031 real-time clock: how an arm64 guest learns the wall-clock time at boot (x86_64
//! guests read it from kvmclock). The kernel's `rtc-pl031` driver finds it in the device tree
//! (an AMBA PrimeCell, identified by the ID registers at the top of its 4 KiB window) and
//! `RTC_HCTOSYS` sets the system clock from it.
//!
//! The counter is the host's Unix time in seconds plus an offset the guest may change through
//! the load register (its own business: the host clock is never touched). Alarms are not
//! offered: the match register is kept but never fires, as a sandbox has nothing to wake.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

/// Size of the device's MMIO window.
pub const PL031_LEN: u64 = 0x1000;

/// Register offsets (PL031 TRM, table 3-1).
const DR: u64 = 0x000;
const MR: u64 = 0x004;
const LR: u64 = 0x008;
const CR: u64 = 0x00c;
const IMSC: u64 = 0x010;
const RIS: u64 = 0x014;
const MIS: u64 = 0x018;
const ICR: u64 = 0x01c;
/// PeriphID0-3 then PCellID0-3, one byte per 32-bit register from 0xfe0: part 0x031,
/// designer ARM (0x41), revision 1; the PrimeCell identification 0xb105f00d.
const ID_START: u64 = 0xfe0;
const ID: [u8; 8] = [0x31, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// Where the device reads the time; a closure so tests can set it.
type Clock = Box<dyn Fn() -> u64 + Send>;

/// The RTC.
pub struct Pl031 {
    clock: Clock,
    /// Guest seconds minus host seconds (wrapping, as the 32-bit counter does).
    offset: u32,
    match_value: u32,
    mask: u32,
}

impl std::fmt::Debug for Pl031 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pl031")
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

fn host_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Default for Pl031 {
    fn default() -> Self {
        Self::with_clock(Box::new(host_seconds))
    }
}

impl Pl031 {
    /// An RTC on the host's clock.
    pub fn new() -> Self {
        Self::default()
    }

    fn with_clock(clock: Clock) -> Self {
        Pl031 {
            clock,
            offset: 0,
            match_value: 0,
            mask: 0,
        }
    }

    fn counter(&self) -> u32 {
        // The register is 32 bits wide: it wraps in 2106, as the hardware does.
        ((self.clock)() as u32).wrapping_add(self.offset)
    }

    fn read32(&self, offset: u64) -> u32 {
        match offset {
            DR => self.counter(),
            MR => self.match_value,
            LR => self.counter(),
            // Always started: the counter runs from power-on.
            CR => 1,
            IMSC => self.mask,
            RIS | MIS => 0,
            o if (ID_START..ID_START + 0x20).contains(&o) => {
                u32::from(ID[((o - ID_START) / 4) as usize])
            }
            _ => 0,
        }
    }

    fn write32(&mut self, offset: u64, value: u32) {
        match offset {
            LR => self.offset = value.wrapping_sub((self.clock)() as u32),
            MR => self.match_value = value,
            IMSC => self.mask = value & 1,
            // Starting a started clock, clearing an interrupt that never fires.
            CR | ICR => {}
            _ => tracing::debug!("pl031: write to read-only or unknown register {offset:#x}"),
        }
    }
}

impl BusDevice for Pl031 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Registers are 32-bit; anything else reads as zero (RAZ), as from an unmapped hole.
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        data.copy_from_slice(&self.read32(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        if offset % 4 == 0 {
            self.write32(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    fn rtc(now: Arc<AtomicU64>) -> Pl031 {
        Pl031::with_clock(Box::new(move || now.load(Ordering::Relaxed)))
    }

    fn read(d: &mut Pl031, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        d.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn the_counter_follows_the_host_clock() {
        let now = Arc::new(AtomicU64::new(1_800_000_000));
        let mut d = rtc(now.clone());
        assert_eq!(read(&mut d, DR), 1_800_000_000);
        now.store(1_800_000_007, Ordering::Relaxed);
        assert_eq!(read(&mut d, DR), 1_800_000_007);
        assert_eq!(read(&mut d, CR), 1);
    }

    #[test]
    fn the_real_clock_is_recent() {
        let mut d = Pl031::new();
        // After 2024-01-01: the guest will not start in 1970.
        assert!(read(&mut d, DR) > 1_704_067_200);
    }

    #[test]
    fn loading_moves_only_the_guests_view() {
        let now = Arc::new(AtomicU64::new(1000));
        let mut d = rtc(now.clone());
        d.write(LR, &500u32.to_le_bytes());
        assert_eq!(read(&mut d, DR), 500);
        now.store(1010, Ordering::Relaxed);
        assert_eq!(read(&mut d, DR), 510);
        // A second device (the next sandbox) still sees the host's time.
        assert_eq!(read(&mut rtc(now), DR), 1010);
    }

    #[test]
    fn it_identifies_as_a_pl031_primecell() {
        let mut d = Pl031::new();
        let id = |d: &mut Pl031, base: u64| {
            (0..4).fold(0u32, |acc, i| {
                acc | (read(d, base + 4 * i) & 0xff) << (8 * i)
            })
        };
        // What the kernel's AMBA bus reads: periphid matched by rtc-pl031 (0x00041031 under
        // mask 0x000fffff), cid the PrimeCell constant.
        assert_eq!(id(&mut d, 0xfe0) & 0x000f_ffff, 0x0004_1031);
        assert_eq!(id(&mut d, 0xff0), 0xb105_f00d);
    }

    #[test]
    fn odd_accesses_read_zero_and_write_nothing() {
        let now = Arc::new(AtomicU64::new(1000));
        let mut d = rtc(now);
        let mut b = [0xffu8; 2];
        d.read(DR, &mut b[..]);
        assert_eq!(
            b,
            [0xff, 0xff],
            "a 2-byte read is left as the bus zeroed it"
        );
        d.write(LR, &[1, 2]);
        d.write(LR + 1, &[1, 2, 3, 4]);
        d.write(0x800, &[1, 2, 3, 4]);
        d.write(0xfe0, &[1, 2, 3, 4]);
        assert_eq!(read(&mut d, DR), 1000);
        let mut b = [0u8; 4];
        d.read(0x801, &mut b);
        assert_eq!(b, [0; 4]);
        d.read(u64::MAX - 3, &mut b);
        assert_eq!(b, [0; 4]);
    }
}
