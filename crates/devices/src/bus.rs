//! Address-range dispatch for port I/O and MMIO.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device that answers guest accesses to the address ranges it is inserted at.
///
/// `offset` is relative to the start of the range the device was inserted at; `base` is that
/// start, so a device inserted at several ranges can tell them apart.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `base + offset`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `base + offset`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// A zero-length range or one that wraps past the end of the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    BadRange {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    dev: SharedDevice,
}

/// Devices by address range. Lookups take a read lock; each device has its own mutex, so
/// vCPUs touching different devices never wait on each other.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Put `dev` at `[base, base + len)`.
    pub fn insert(&self, dev: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        if let Some((&b, e)) = ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        ranges.insert(base, Entry { len, dev });
        Ok(())
    }

    /// Remove the device inserted at exactly `base`.
    pub fn remove(&self, base: u64) -> bool {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges.remove(&base).is_some()
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&base, e) = ranges.range(..=addr).next_back()?;
        let end = addr.checked_add(size as u64)?;
        if end <= base + e.len {
            Some((base, e.dev.clone()))
        } else {
            None
        }
    }

    /// Dispatch a read; false when no device claims the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatch a write; false when no device claims the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

/// The port-I/O bus and the MMIO bus of one VM. Accesses nobody claims behave as on a PC:
/// reads return all ones, writes are dropped.
#[derive(Default)]
pub struct IoBus {
    /// Port I/O space (0..0x10000).
    pub pio: Bus,
    /// Guest-physical addresses outside RAM.
    pub mmio: Bus,
}

impl kvmbox_cpu::IoHandler for IoBus {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if !self.pio.read(u64::from(port), data) {
            data.fill(0xff);
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            data.fill(0xff);
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.write(addr, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.0.push((base, offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        assert!(matches!(
            bus.insert(dev.clone(), 0x3f0, 9),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0x3ff, 1),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(dev.clone(), 0x400, 1).unwrap();
        assert!(matches!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x3f8, &[7]));
        assert!(!bus.write(0x3ff, &[7, 7]), "access crossing the end");
        assert!(!bus.read(0x3f7, &mut b));
        assert_eq!(dev.lock().unwrap().0, vec![(0x3f8, 0, vec![7])]);
    }

    #[test]
    fn unclaimed_reads_are_all_ones() {
        use kvmbox_cpu::IoHandler;
        let io = IoBus::default();
        let mut d = [0u8; 4];
        io.mmio_read(0xd000_0000, &mut d);
        assert_eq!(d, [0xff; 4]);
        io.pio_read(0x80, &mut d[..1]);
        assert_eq!(d[0], 0xff);
    }
}
