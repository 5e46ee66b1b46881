//! Address-range dispatch of guest port and MMIO accesses to devices.

use std::sync::{Arc, Mutex};

use thiserror::Error;

/// A device on a bus; `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset`; fill `data` (it arrives zeroed).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors registering devices.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("device range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// A sorted set of non-overlapping ranges. Lookups are a binary search; buses are built before
/// the vCPUs start and read-only afterwards.
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.entries.iter().map(|e| (e.base, e.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `dev` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let end = base + len;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, dev });
        Ok(())
    }

    /// The device covering the whole access `[addr, addr + size)`, with the offset into it.
    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let i = self
            .entries
            .partition_point(|e| e.base <= addr)
            .checked_sub(1)?;
        let e = &self.entries[i];
        let offset = addr - e.base;
        let end = offset.checked_add(size as u64)?;
        (end <= e.len).then_some((e, offset))
    }

    /// Dispatches a read; `false` if no device covers it (the caller decides what the guest sees).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                data.fill(0);
                lock(&e.dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; `false` if no device covers it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from poisoning: a device whose earlier access panicked keeps its
/// (consistent, register-level) state; the VMM must not die because of it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_bounds() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Reg(Vec::new())));
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [3]);
        assert!(!bus.read(0x3f7, &mut b));
        assert!(!bus.read(0x400, &mut b));
        let mut w = [0u8; 2];
        assert!(
            !bus.read(0x3ff, &mut w),
            "access straddling the end of a range"
        );
        assert!(bus.write(0x3f8, &[9]));
        assert_eq!(lock(&dev).0, vec![(0, vec![9])]);
    }

    #[test]
    fn rejects_overlap_and_bad_ranges() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Reg(Vec::new())));
        bus.insert(0x1000, 0x100, dev.clone()).unwrap();
        assert!(bus.insert(0x10ff, 1, dev.clone()).is_err());
        assert!(bus.insert(0xf00, 0x101, dev.clone()).is_err());
        assert!(bus.insert(0x1100, 1, dev.clone()).is_ok());
        assert!(bus.insert(0x2000, 0, dev.clone()).is_err());
        assert!(bus.insert(u64::MAX, 2, dev).is_err());
    }

    #[test]
    fn addresses_at_the_top_do_not_overflow() {
        let mut bus = Bus::new();
        bus.insert(u64::MAX - 7, 4, Arc::new(Mutex::new(Reg(Vec::new()))))
            .unwrap();
        let mut b = [0u8; 8];
        assert!(!bus.read(u64::MAX - 7, &mut b));
        assert!(!bus.read(u64::MAX, &mut b));
    }
}
