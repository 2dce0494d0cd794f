//! QEMU's `pc-testdev`, the device kvm-unit-tests drive (kvmbox `--testdev`; off by default):
//! a 32-bit scratch register at two port windows (word-wide and byte-wide), a page-flush port,
//! one port per interrupt line whose byte writes set that line's level, and 64 KiB of device
//! memory that reads back what was written.

use crate::BusDevice;
use kvmbox_cpu::IrqLine;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Bytes of each scratch-register window and of the flush port.
pub const TESTDEV_PORT_LEN: u64 = 4;
/// Bytes of device memory.
pub const IOMEM_LEN: usize = 0x1_0000;

/// The scratch register as plain data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestDevState {
    /// The 32-bit scratch register behind both port windows.
    pub ioport_data: u32,
}

/// The scratch register and the flush port (inserted at the word window, the flush port and the
/// byte window: all three act on offsets within a 4-byte register; the flush port ignores
/// writes, as guest memory here needs no flushing to be seen by the VMM).
pub struct TestDevPorts {
    state: TestDevState,
    flush_base: u64,
}

impl TestDevPorts {
    /// The ports; `flush_base` is where the flush port is inserted.
    pub fn new(flush_base: u64) -> Self {
        TestDevPorts {
            state: TestDevState::default(),
            flush_base,
        }
    }

    /// The state as plain data.
    pub fn state(&self) -> TestDevState {
        self.state
    }
}

impl BusDevice for TestDevPorts {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if base == self.flush_base {
            data.fill(0xff);
            return;
        }
        let bytes = self.state.ioport_data.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        if base == self.flush_base {
            return;
        }
        let mut bytes = self.state.ioport_data.to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(offset as usize + i) {
                *slot = b;
            }
        }
        self.state.ioport_data = u32::from_le_bytes(bytes);
    }
}

/// The interrupt-line ports: a byte written at offset n sets line n high (non-zero) or low.
pub struct TestDevIrq {
    lines: Vec<Arc<dyn IrqLine>>,
}

impl TestDevIrq {
    /// Ports for `lines` (line n at offset n).
    pub fn new(lines: Vec<Arc<dyn IrqLine>>) -> Self {
        TestDevIrq { lines }
    }
}

impl BusDevice for TestDevIrq {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        // The ports are byte-wide: a wider write sets one line per byte, as QEMU splits it
        // (kvm-unit-tests' realmode test raises IRQ 11 with `outl` to 0x200b).
        for (i, &v) in data.iter().enumerate() {
            let n = offset as usize + i;
            if let Some(line) = self.lines.get(n) {
                if let Err(e) = line.set_level(v != 0) {
                    eprintln!("kvmbox: testdev: interrupt line {n}: {e}");
                }
            }
        }
    }
}

/// 64 KiB of device memory (MMIO: every access exits to the VMM).
pub struct TestDevIomem {
    buf: Vec<u8>,
}

impl Default for TestDevIomem {
    fn default() -> Self {
        TestDevIomem {
            buf: vec![0; IOMEM_LEN],
        }
    }
}

impl BusDevice for TestDevIomem {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.buf.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            if let Some(slot) = self.buf.get_mut(offset as usize + i) {
                *slot = b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_util::CountingIrq;
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;

    #[test]
    fn scratch_register_windows_share_one_value() {
        let mut p = TestDevPorts::new(0xe4);
        p.write(0xe0, 0, &0x1234_5678u32.to_le_bytes());
        let mut b = [0u8; 1];
        p.read(0xe8, 2, &mut b);
        assert_eq!(b[0], 0x34);
        p.write(0xe8, 1, &[0xaa]);
        let mut w = [0u8; 2];
        p.read(0xe0, 0, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0xaa78);
        p.write(0xe4, 0, &[1, 2, 3, 4]);
        assert_eq!(p.state().ioport_data, 0x1234_aa78);
        // An access running past the register is clipped, not a panic.
        p.write(0xe0, 3, &[1, 2]);
        p.read(0xe0, 3, &mut w);
        assert_eq!(w, [1, 0]);
    }

    #[derive(Default)]
    struct LevelIrq(Mutex<Vec<bool>>, CountingIrq);
    impl IrqLine for LevelIrq {
        fn trigger(&self) -> std::io::Result<()> {
            self.1.trigger()
        }
        fn set_level(&self, high: bool) -> std::io::Result<()> {
            self.0.lock().unwrap().push(high);
            Ok(())
        }
    }

    #[test]
    fn irq_ports_set_levels() {
        let l14 = Arc::new(LevelIrq::default());
        let mut lines: Vec<Arc<dyn IrqLine>> = (0..24)
            .map(|_| Arc::new(LevelIrq::default()) as Arc<dyn IrqLine>)
            .collect();
        lines[14] = l14.clone();
        let mut d = TestDevIrq::new(lines);
        d.write(0x2000, 14, &[1]);
        d.write(0x2000, 14, &[0]);
        // A 4-byte write at line 11 sets lines 11..15, one per byte.
        d.write(0x2000, 11, &[0, 0, 0, 1]);
        d.write(0x2000, 23, &[1, 1]); // the byte past line 23 goes nowhere
        d.write(0x2000, 40, &[1]); // beyond the lines: ignored
        assert_eq!(*l14.0.lock().unwrap(), vec![true, false, true]);
        assert_eq!(l14.1 .0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn iomem_reads_back() {
        let mut m = TestDevIomem::default();
        m.write(0, 0x100, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut q = [0u8; 8];
        m.read(0, 0x100, &mut q);
        assert_eq!(q, [1, 2, 3, 4, 5, 6, 7, 8]);
        m.write(0, 0xfffe, &[9, 9, 9, 9]);
        m.read(0, 0xfffe, &mut q[..4]);
        assert_eq!(&q[..4], &[9, 9, 0, 0]);
    }
}
