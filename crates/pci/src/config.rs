//! One PCI function's configuration space (type-0 header).

use std::sync::{Arc, Mutex};

use crate::msix::MsixConfig;
use crate::{Error, Result};

pub mod persist;

/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;
/// Command register: respond to I/O-space accesses.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command register: respond to memory-space accesses.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register: the device may master the bus (DMA, MSI).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;

const CONFIG_DWORDS: usize = 64;
const REG_COMMAND: usize = 1;
const REG_CLASS: usize = 2;
const REG_HEADER: usize = 3;
const REG_BAR0: usize = 4;
const REG_SUBSYSTEM: usize = 11;
const REG_CAP_PTR: usize = 13;
const REG_INTERRUPT: usize = 15;
const STATUS_CAP_LIST: u32 = 1 << 4;
const FIRST_CAP_OFFSET: usize = 0x40;
const MSIX_CAP_ID: u8 = 0x11;
const MSIX_ENABLE: u32 = 1 << 15;
const MSIX_FUNCTION_MASK: u32 = 1 << 14;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space.
    Io,
    /// 32-bit memory space.
    Mem32,
    /// 64-bit memory space (takes this BAR register and the next).
    Mem64,
}

/// A BAR's fixed properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    /// What it decodes.
    pub kind: BarKind,
    /// Size in bytes: a power of two (>= 16 for memory, >= 4 for I/O).
    pub size: u64,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

/// The identity fields of a type-0 header.
#[derive(Debug, Clone, Copy, Default)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Base class code.
    pub class: u8,
    /// Subclass code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Interrupt pin: 0 none, 1..4 INTA..INTD.
    pub interrupt_pin: u8,
}

#[derive(Clone)]
struct Msix {
    cap_offset: usize,
    config: Arc<Mutex<MsixConfig>>,
}

/// A function's 256-byte configuration space with per-bit write masks.
///
/// Guest writes only change the bits the write mask allows, which gives the BAR sizing
/// protocol for free: writing all ones to a BAR reads back `!(size - 1)` plus its flag bits.
pub struct PciConfiguration {
    regs: [u32; CONFIG_DWORDS],
    wmask: [u32; CONFIG_DWORDS],
    bars: [Option<BarSpec>; NUM_BARS],
    /// BAR registers that are the upper half of a 64-bit BAR.
    bar_high: [bool; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
    msix: Option<Msix>,
}

impl PciConfiguration {
    /// A configuration space with `header`'s identity, no BARs and no capabilities. Memory and
    /// I/O decoding start enabled, as firmware would leave them.
    pub fn new(header: &PciHeader) -> Self {
        let mut regs = [0u32; CONFIG_DWORDS];
        let mut wmask = [0u32; CONFIG_DWORDS];
        regs[0] = u32::from(header.device_id) << 16 | u32::from(header.vendor_id);
        regs[REG_COMMAND] = u32::from(COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE);
        wmask[REG_COMMAND] = u32::from(
            COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE,
        );
        regs[REG_CLASS] = u32::from(header.class) << 24
            | u32::from(header.subclass) << 16
            | u32::from(header.prog_if) << 8
            | u32::from(header.revision);
        regs[REG_HEADER] = 0; // header type 0, single function
        wmask[REG_HEADER] = 0x0000_ffff; // cache line size, latency timer
        regs[REG_SUBSYSTEM] =
            u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id);
        regs[REG_INTERRUPT] = u32::from(header.interrupt_pin) << 8;
        wmask[REG_INTERRUPT] = 0xff; // interrupt line
        Self {
            regs,
            wmask,
            bars: [None; NUM_BARS],
            bar_high: [false; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP_OFFSET,
            msix: None,
        }
    }

    /// Declare BAR `idx` (a 64-bit BAR also takes `idx + 1`), at address 0 until placed.
    pub fn add_bar(&mut self, idx: usize, spec: BarSpec) -> Result<()> {
        let min = if spec.kind == BarKind::Io { 4 } else { 16 };
        if !spec.size.is_power_of_two() || spec.size < min {
            return Err(Error::BarSize(spec.size));
        }
        if spec.kind != BarKind::Mem64 && spec.size > u64::from(u32::MAX) {
            return Err(Error::BarSize(spec.size));
        }
        let wide = spec.kind == BarKind::Mem64;
        if idx >= NUM_BARS
            || (wide && idx + 1 >= NUM_BARS)
            || self.bars[idx].is_some()
            || self.bar_high[idx]
            || (wide && (self.bars[idx + 1].is_some() || self.bar_high[idx + 1]))
        {
            return Err(Error::BarIndex(idx));
        }
        let mask = !(spec.size - 1);
        let (flags, low_mask) = match spec.kind {
            BarKind::Io => (0x1u32, (mask as u32) & !0x3),
            BarKind::Mem32 => (u32::from(spec.prefetchable) << 3, (mask as u32) & !0xf),
            BarKind::Mem64 => (
                0x4 | u32::from(spec.prefetchable) << 3,
                (mask as u32) & !0xf,
            ),
        };
        self.regs[REG_BAR0 + idx] = flags;
        self.wmask[REG_BAR0 + idx] = low_mask;
        if wide {
            self.regs[REG_BAR0 + idx + 1] = 0;
            self.wmask[REG_BAR0 + idx + 1] = (mask >> 32) as u32;
            self.bar_high[idx + 1] = true;
        }
        self.bars[idx] = Some(spec);
        Ok(())
    }

    /// The BAR declared at `idx`.
    pub fn bar(&self, idx: usize) -> Option<BarSpec> {
        self.bars.get(idx).copied().flatten()
    }

    /// The address BAR `idx` holds now (whatever the guest last wrote, sizing pattern included).
    pub fn bar_address(&self, idx: usize) -> Option<u64> {
        let spec = self.bar(idx)?;
        let low = self.regs[REG_BAR0 + idx];
        Some(match spec.kind {
            BarKind::Io => u64::from(low & !0x3),
            BarKind::Mem32 => u64::from(low & !0xf),
            BarKind::Mem64 => {
                u64::from(self.regs[REG_BAR0 + idx + 1]) << 32 | u64::from(low & !0xf)
            }
        })
    }

    /// Place BAR `idx` at `addr` (the VMM's allocation; the guest may move it later).
    pub fn set_bar_address(&mut self, idx: usize, addr: u64) -> Result<()> {
        let spec = self.bar(idx).ok_or(Error::BarIndex(idx))?;
        if addr & (spec.size - 1) != 0 {
            return Err(Error::BarSize(spec.size));
        }
        let low = &mut self.regs[REG_BAR0 + idx];
        match spec.kind {
            BarKind::Io => *low = (*low & 0x3) | (addr as u32 & !0x3),
            BarKind::Mem32 => *low = (*low & 0xf) | (addr as u32 & !0xf),
            BarKind::Mem64 => {
                *low = (*low & 0xf) | (addr as u32 & !0xf);
                self.regs[REG_BAR0 + idx + 1] = (addr >> 32) as u32;
            }
        }
        Ok(())
    }

    /// Set the interrupt line register (the GSI of INTx, for guests without ACPI `_PRT`).
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.regs[REG_INTERRUPT] = (self.regs[REG_INTERRUPT] & !0xff) | u32::from(line);
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[REG_COMMAND] as u16
    }

    /// Append a capability. `body[0]` is the capability ID; `body[1]` (the next pointer) is
    /// filled in here. The capability is read-only to the guest. Returns its offset.
    pub fn add_capability(&mut self, body: &[u8]) -> Result<usize> {
        if body.len() < 2 || body.len() > 0xc0 {
            return Err(Error::BadCapability(body.len()));
        }
        let offset = self.next_cap;
        let end = offset + body.len();
        if end > CONFIG_DWORDS * 4 {
            return Err(Error::CapabilitySpace(body.len()));
        }
        for (i, &b) in body.iter().enumerate() {
            self.set_byte(offset + i, if i == 1 { 0 } else { b });
        }
        match self.last_cap {
            Some(prev) => self.set_byte(prev + 1, offset as u8),
            None => {
                self.regs[REG_CAP_PTR] = offset as u32;
                self.regs[REG_COMMAND] |= STATUS_CAP_LIST << 16;
            }
        }
        self.last_cap = Some(offset);
        self.next_cap = (end + 3) & !3;
        Ok(offset)
    }

    /// Like [`add_capability`](Self::add_capability), but the guest may change the bits set in
    /// `wmask` (one mask byte per body byte; the first two bytes stay read-only).
    pub fn add_capability_with_wmask(&mut self, body: &[u8], wmask: &[u8]) -> Result<usize> {
        if wmask.len() != body.len() {
            return Err(Error::BadCapability(body.len()));
        }
        let off = self.add_capability(body)?;
        for (i, &m) in wmask.iter().enumerate().skip(2) {
            let (reg, shift) = ((off + i) / 4, ((off + i) % 4) * 8);
            self.wmask[reg] = (self.wmask[reg] & !(0xff << shift)) | (u32::from(m) << shift);
        }
        Ok(off)
    }

    /// Add the MSI-X capability for `config`, its table at `table_offset` of BAR `table_bar`
    /// and its pending-bit array at `pba_offset` of BAR `pba_bar`. Returns the capability's
    /// offset. Guest writes of the enable and function-mask bits reach `config`.
    pub fn add_msix(
        &mut self,
        config: Arc<Mutex<MsixConfig>>,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> Result<usize> {
        let vectors = config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .num_vectors();
        let mut body = [0u8; 12];
        body[0] = MSIX_CAP_ID;
        body[2..4].copy_from_slice(&(vectors - 1).to_le_bytes());
        body[4..8].copy_from_slice(&(table_offset | u32::from(table_bar & 7)).to_le_bytes());
        body[8..12].copy_from_slice(&(pba_offset | u32::from(pba_bar & 7)).to_le_bytes());
        let off = self.add_capability(&body)?;
        self.wmask[off / 4] = (MSIX_ENABLE | MSIX_FUNCTION_MASK) << 16;
        self.msix = Some(Msix {
            cap_offset: off,
            config,
        });
        Ok(off)
    }

    /// The MSI-X state added with [`add_msix`](Self::add_msix).
    pub fn msix(&self) -> Option<&Arc<Mutex<MsixConfig>>> {
        self.msix.as_ref().map(|m| &m.config)
    }

    fn set_byte(&mut self, offset: usize, b: u8) {
        let shift = (offset % 4) * 8;
        let r = &mut self.regs[offset / 4];
        *r = (*r & !(0xff << shift)) | (u32::from(b) << shift);
    }

    /// Dword register `reg` (0..1024; past the 256-byte header space reads as zero).
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Read `data.len()` (1, 2 or 4, not crossing a dword) bytes at byte `offset`; other
    /// shapes read as all ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        if !matches!(data.len(), 1 | 2 | 4) || offset % 4 + data.len() > 4 {
            data.fill(0xff);
            return;
        }
        let v = self.read_reg(offset / 4) >> ((offset % 4) * 8);
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }

    /// Guest write of `data` (1, 2 or 4 bytes, not crossing a dword) at byte `offset`. Only
    /// writable bits change; other shapes are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        if !matches!(data.len(), 1 | 2 | 4) || offset % 4 + data.len() > 4 {
            return;
        }
        let reg = offset / 4;
        if reg >= CONFIG_DWORDS {
            return;
        }
        let shift = (offset % 4) * 8;
        let mut raw = [0u8; 4];
        raw[..data.len()].copy_from_slice(data);
        let bytes_mask = if data.len() == 4 {
            u32::MAX
        } else {
            ((1u32 << (data.len() * 8)) - 1) << shift
        };
        let value = u32::from_le_bytes(raw) << shift;
        let mask = self.wmask[reg] & bytes_mask;
        self.regs[reg] = (self.regs[reg] & !mask) | (value & mask);
        if let Some(m) = &self.msix {
            if reg == m.cap_offset / 4 {
                let ctl = self.regs[reg] >> 16;
                m.config
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .set_control(ctl & MSIX_ENABLE != 0, ctl & MSIX_FUNCTION_MASK != 0);
            }
        }
    }

    /// Whether byte range `offset..offset + len` touches a BAR register.
    pub fn touches_bars(offset: usize, len: usize) -> bool {
        let (start, end) = (REG_BAR0 * 4, (REG_BAR0 + NUM_BARS) * 4);
        offset < end && offset + len > start
    }

    /// Whether byte range `offset..offset + len` touches the command register.
    pub fn touches_command(offset: usize, len: usize) -> bool {
        offset < REG_COMMAND * 4 + 2 && offset + len > REG_COMMAND * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfiguration {
        PciConfiguration::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            class: 1,
            subclass: 0x80,
            interrupt_pin: 1,
            ..Default::default()
        })
    }

    fn rd(c: &PciConfiguration, off: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn header_ids_and_read_only_fields() {
        let mut c = cfg();
        assert_eq!(rd(&c, 0, 4), 0x1042_1af4);
        assert_eq!(rd(&c, 2, 2), 0x1042);
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(rd(&c, 0, 4), 0x1042_1af4, "IDs are read-only");
        assert_eq!(rd(&c, 0x0b, 1), 1);
        assert_eq!(rd(&c, 0x3d, 1), 1, "interrupt pin");
        c.set_interrupt_line(10);
        assert_eq!(rd(&c, 0x3c, 2), 0x010a);
        c.write(0x3c, &[11]);
        assert_eq!(rd(&c, 0x3c, 1), 11, "interrupt line is writable");
        c.write(0x3d, &[3]);
        assert_eq!(rd(&c, 0x3d, 1), 1);
        // Bad shapes.
        let mut b = [0u8; 4];
        c.read(3, &mut b[..2]);
        assert_eq!(b[..2], [0xff, 0xff]);
        c.write(0x3f, &[1, 2]);
        c.write(0x3c, &[1, 2, 3]);
        assert_eq!(rd(&c, 0x3c, 1), 11);
        assert_eq!(rd(&c, 0x400, 4), 0, "beyond the header space");
        c.write(0x400, &[1, 2, 3, 4]);
    }

    #[test]
    fn bar_sizing_protocol_32_and_64_bit() {
        let mut c = cfg();
        c.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mem32,
                size: 0x4000,
                prefetchable: false,
            },
        )
        .unwrap();
        c.add_bar(
            2,
            BarSpec {
                kind: BarKind::Mem64,
                size: 0x2_0000_0000,
                prefetchable: true,
            },
        )
        .unwrap();
        c.add_bar(
            4,
            BarSpec {
                kind: BarKind::Io,
                size: 0x20,
                prefetchable: false,
            },
        )
        .unwrap();
        assert!(matches!(
            c.add_bar(
                5,
                BarSpec {
                    kind: BarKind::Mem64,
                    size: 0x1000,
                    prefetchable: false
                }
            ),
            Err(Error::BarIndex(5))
        ));
        assert!(matches!(
            c.add_bar(
                3,
                BarSpec {
                    kind: BarKind::Mem32,
                    size: 0x1000,
                    prefetchable: false
                }
            ),
            Err(Error::BarIndex(3))
        ));
        assert!(matches!(
            c.add_bar(
                5,
                BarSpec {
                    kind: BarKind::Mem32,
                    size: 0x1001,
                    prefetchable: false
                }
            ),
            Err(Error::BarSize(0x1001))
        ));
        c.set_bar_address(0, 0xc000_4000).unwrap();
        assert!(c.set_bar_address(0, 0xc000_4100).is_err(), "misaligned");
        assert_eq!(rd(&c, 0x10, 4), 0xc000_4000);
        c.write(0x10, &u32::MAX.to_le_bytes());
        assert_eq!(rd(&c, 0x10, 4), 0xffff_c000);
        c.write(0x10, &0xc000_8000u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xc000_8000));

        c.write(0x18, &u32::MAX.to_le_bytes());
        c.write(0x1c, &u32::MAX.to_le_bytes());
        assert_eq!(
            rd(&c, 0x18, 4),
            0x0000_000c,
            "64-bit prefetchable, size >= 4 GiB"
        );
        assert_eq!(rd(&c, 0x1c, 4), 0xffff_fffe);
        c.write(0x18, &0u32.to_le_bytes());
        c.write(0x1c, &0x4u32.to_le_bytes());
        assert_eq!(c.bar_address(2), Some(0x4_0000_0000));

        c.write(0x20, &u32::MAX.to_le_bytes());
        assert_eq!(rd(&c, 0x20, 4), 0xffff_ffe1);
        assert_eq!(c.bar(1), None);
        assert_eq!(c.bar(9), None);
        // Byte-sized writes to a BAR only touch their byte.
        c.write(0x11, &[0x90]);
        assert_eq!(
            c.bar_address(0),
            Some(0xc000_8000),
            "bits below the size stay 0"
        );
        c.write(0x13, &[0xd0]);
        assert_eq!(c.bar_address(0), Some(0xd000_8000));
        // ROM BAR is absent.
        c.write(0x30, &u32::MAX.to_le_bytes());
        assert_eq!(rd(&c, 0x30, 4), 0);
    }

    #[test]
    fn capability_list_is_linked_and_read_only() {
        let mut c = cfg();
        assert_eq!(rd(&c, 6, 2) & 0x10, 0);
        let a = c.add_capability(&[0x09, 0xaa, 1, 2, 3]).unwrap();
        let b = c.add_capability(&[0x09, 0xaa, 4]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x48);
        assert_eq!(rd(&c, 0x34, 1), 0x40);
        assert_ne!(rd(&c, 6, 2) & 0x10, 0, "status: capability list");
        assert_eq!(rd(&c, 0x40, 4), 0x0201_4809);
        assert_eq!(rd(&c, 0x48, 4), 0x0004_0009);
        c.write(0x40, &u32::MAX.to_le_bytes());
        assert_eq!(rd(&c, 0x40, 4), 0x0201_4809);
        assert!(matches!(
            c.add_capability(&[1]),
            Err(Error::BadCapability(1))
        ));
        let w = c
            .add_capability_with_wmask(
                &[0x09, 0, 0, 0, 0, 0, 0, 0],
                &[0xff, 0xff, 0, 0, 0xf0, 0, 0, 0],
            )
            .unwrap();
        c.write(w, &u32::MAX.to_le_bytes());
        c.write(w + 4, &u32::MAX.to_le_bytes());
        assert_eq!(rd(&c, w, 4), 0x0000_0009, "header bytes stay read-only");
        assert_eq!(rd(&c, w + 4, 4), 0xf0);
        assert!(c.add_capability_with_wmask(&[0x09, 0], &[0]).is_err());
        for _ in 0..3 {
            c.add_capability(&[0x09, 0, 0, 0]).unwrap();
        }
        assert!(c.add_capability(&[0x09; 0xc0]).is_err(), "no room");
    }

    #[test]
    fn command_register_masks() {
        let mut c = cfg();
        c.write(4, &0xffffu16.to_le_bytes());
        assert_eq!(c.command(), 0x0407);
        c.write(4, &0u16.to_le_bytes());
        assert_eq!(c.command(), 0);
        assert!(PciConfiguration::touches_command(4, 1));
        assert!(!PciConfiguration::touches_command(6, 2));
        assert!(PciConfiguration::touches_bars(0x24, 4));
        assert!(!PciConfiguration::touches_bars(0x28, 4));
    }

    #[test]
    fn msix_capability_control_reaches_the_table() {
        use crate::msix::tests::RecordingMsi;
        let mut c = cfg();
        let lines: Vec<Arc<dyn kvmbox_cpu::MsiLine>> = (0..3)
            .map(|_| Arc::new(RecordingMsi::default()) as Arc<dyn kvmbox_cpu::MsiLine>)
            .collect();
        let m = Arc::new(Mutex::new(MsixConfig::new(lines).unwrap()));
        let off = c.add_msix(m.clone(), 0, 0x4000, 0, 0x6000).unwrap();
        assert!(c.msix().is_some());
        assert_eq!(rd(&c, off, 4), 0x0002_0011, "id, next 0, table size 3 - 1");
        assert_eq!(rd(&c, off + 4, 4), 0x4000);
        assert_eq!(rd(&c, off + 8, 4), 0x6000);
        c.write(off + 2, &0xffffu16.to_le_bytes());
        assert_eq!(
            rd(&c, off + 2, 2),
            0xc002,
            "only enable and mask are writable"
        );
        assert!(m.lock().unwrap().enabled());
        assert!(m.lock().unwrap().function_masked());
        c.write(off, &0x8000_0000u32.to_le_bytes());
        assert!(m.lock().unwrap().enabled());
        assert!(!m.lock().unwrap().function_masked());
        c.write(off + 4, &0u32.to_le_bytes());
        assert_eq!(rd(&c, off + 4, 4), 0x4000, "table offset is read-only");
    }
}
