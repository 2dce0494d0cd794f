//! pci-testdev: the PCI device kvm-unit-tests measure port-I/O and MMIO exits with (QEMU's
//! `-device pci-testdev`, Red Hat 1b36:0005), behind `--testdev`.
//!
//! BAR 0 is 4 KiB of memory, BAR 1 256 ports; both answer the same way. A guest selects a test
//! by writing its number to byte 0 of the BAR, then reads the test's header there:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0x00 | 1 | test number (write: select; an unknown number selects none) |
//! | 0x01 | 1 | access width the test writes with (1, 2 or 4) |
//! | 0x04 | 4 | offset in the BAR the test writes to |
//! | 0x08 | 4 | the value to write |
//! | 0x0c | 4 | writes counted since the test was selected |
//! | 0x10 | .. | the test's name, NUL-terminated |
//!
//! With no test selected every byte reads 0xff (so a guest walking the tests stops at the
//! first unknown number). kvmbox counts every write in the VMM, so a test's count equals the
//! writes made; each test differs in width or in counting only matching values.

use crate::config::{BarKind, BarSpec, PciConfiguration, PciHeader};
use crate::device::PciDevice;
use kvmbox_devices::BusDevice;

/// Vendor ID (Red Hat, Inc.).
pub const PCI_TESTDEV_VENDOR_ID: u16 = 0x1b36;
/// Device ID of pci-testdev.
pub const PCI_TESTDEV_DEVICE_ID: u16 = 0x0005;
/// BAR 0: memory.
const MEM_BAR_SIZE: u64 = 0x1000;
/// BAR 1: ports.
const IO_BAR_SIZE: u64 = 0x100;
/// Where every test writes (past the header and name).
const TEST_OFFSET: u32 = 0x80;
/// The value tests write.
const TEST_DATA: u32 = 0xfa;
const NAME_OFFSET: usize = 0x10;

/// (name, width, counts only writes of [`TEST_DATA`]).
const TESTS: [(&str, u8, bool); 4] = [
    ("byte", 1, false),
    ("word", 2, false),
    ("dword", 4, false),
    ("dword-datamatch", 4, true),
];

/// The device. State per BAR: the selected test and its count.
pub struct PciTestDev {
    config: PciConfiguration,
    selected: [Option<usize>; 2],
    count: [u32; 2],
}

impl PciTestDev {
    /// A pci-testdev with its BARs declared (the root places them).
    pub fn new() -> crate::Result<Self> {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: PCI_TESTDEV_VENDOR_ID,
            device_id: PCI_TESTDEV_DEVICE_ID,
            class: 0x00,
            subclass: 0xff,
            ..Default::default()
        });
        for (idx, kind, size) in [
            (0, BarKind::Mem32, MEM_BAR_SIZE),
            (1, BarKind::Io, IO_BAR_SIZE),
        ] {
            config.add_bar(
                idx,
                BarSpec {
                    kind,
                    size,
                    prefetchable: false,
                },
            )?;
        }
        Ok(Self {
            config,
            selected: [None; 2],
            count: [0; 2],
        })
    }

    /// Which BAR an access at `base` is for: the port BAR when `base` is its address.
    fn bar(&self, base: u64) -> usize {
        usize::from(self.config.bar_address(1) == Some(base))
    }

    /// The header byte at `offset` of the test selected on `bar`.
    fn header_byte(&self, bar: usize, offset: u64) -> u8 {
        let Some(t) = self.selected[bar] else {
            return 0xff;
        };
        let (name, width, _) = TESTS[t];
        let field = |v: u32, at: u64| v.to_le_bytes()[(offset - at) as usize];
        match offset {
            0 => t as u8,
            1 => width,
            4..=7 => field(TEST_OFFSET, 4),
            8..=11 => field(TEST_DATA, 8),
            12..=15 => field(self.count[bar], 12),
            o if (NAME_OFFSET as u64..NAME_OFFSET as u64 + name.len() as u64).contains(&o) => {
                name.as_bytes()[o as usize - NAME_OFFSET]
            }
            _ => 0,
        }
    }
}

impl PciDevice for PciTestDev {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}

impl BusDevice for PciTestDev {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let bar = self.bar(base);
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.header_byte(bar, offset.saturating_add(i as u64));
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let bar = self.bar(base);
        if offset == 0 {
            let t = usize::from(data.first().copied().unwrap_or(0xff));
            self.selected[bar] = (t < TESTS.len()).then_some(t);
            self.count[bar] = 0;
            return;
        }
        let Some(t) = self.selected[bar] else {
            return;
        };
        let (_, width, datamatch) = TESTS[t];
        if offset != u64::from(TEST_OFFSET) || data.len() != usize::from(width) {
            return;
        }
        let mut v = [0u8; 4];
        v[..data.len()].copy_from_slice(data);
        let mask = u32::MAX >> (32 - 8 * u32::from(width));
        if !datamatch || u32::from_le_bytes(v) == TEST_DATA & mask {
            self.count[bar] = self.count[bar].saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: u64 = 0xc000_0000;
    const IO: u64 = 0xc000;

    fn dev() -> PciTestDev {
        let mut d = PciTestDev::new().unwrap();
        d.config_mut().set_bar_address(0, MEM).unwrap();
        d.config_mut().set_bar_address(1, IO).unwrap();
        d
    }

    fn rd(d: &mut PciTestDev, base: u64, off: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        d.read(base, off, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn name(d: &mut PciTestDev, base: u64) -> String {
        (0x10..)
            .map(|o| rd(d, base, o, 1) as u8)
            .take_while(|&c| c != 0)
            .map(char::from)
            .collect()
    }

    /// What kvm-unit-tests' pci_testdev() does with each BAR: select tests 0, 1, ... until one
    /// reads a non-zero count; for each, write the value 16 times at the offset with the
    /// width, and expect the count to be 16.
    #[test]
    fn every_test_counts_its_writes_on_both_bars() {
        let mut d = dev();
        for base in [MEM, IO] {
            let mut names = Vec::new();
            for t in 0.. {
                d.write(base, 0, &[t]);
                if rd(&mut d, base, 0xc, 4) != 0 {
                    break;
                }
                let width = rd(&mut d, base, 1, 1) as usize;
                assert!([1, 2, 4].contains(&width));
                let data = rd(&mut d, base, 8, 4);
                let off = u64::from(rd(&mut d, base, 4, 4));
                for _ in 0..16 {
                    d.write(base, off, &data.to_le_bytes()[..width]);
                }
                assert_eq!(rd(&mut d, base, 0xc, 4), 16, "test {t} at {base:#x}");
                names.push(name(&mut d, base));
            }
            assert_eq!(names, ["byte", "word", "dword", "dword-datamatch"]);
        }
    }

    #[test]
    fn bars_keep_their_own_test_and_bad_accesses_count_nothing() {
        let mut d = dev();
        d.write(MEM, 0, &[3]); // datamatch
        d.write(IO, 0, &[0]); // byte
        d.write(MEM, 0x80, &0xceu32.to_le_bytes()); // no match
        d.write(MEM, 0x80, &[0xfa]); // wrong width
        d.write(MEM, 0x84, &0xfau32.to_le_bytes()); // wrong offset
        assert_eq!(rd(&mut d, MEM, 0xc, 4), 0);
        d.write(MEM, 0x80, &0xfau32.to_le_bytes());
        assert_eq!(rd(&mut d, MEM, 0xc, 4), 1);
        assert_eq!(rd(&mut d, IO, 0, 1), 0, "the port BAR kept its own test");
        // No test selected: all ones; hostile offsets read and write without panicking.
        d.write(IO, 0, &[200]);
        assert_eq!(rd(&mut d, IO, 0, 4), u32::MAX);
        d.write(IO, u64::MAX, &[1, 2, 3, 4]);
        let mut b = [0u8; 8];
        d.read(MEM, u64::MAX - 2, &mut b);
        d.write(MEM, 0, &[]);
        assert_eq!(
            rd(&mut d, MEM, 0, 4),
            u32::MAX,
            "an empty write selects none"
        );
    }
}
