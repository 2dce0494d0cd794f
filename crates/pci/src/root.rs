//! PCI bus 0: host bridge, device slots, BAR placement and relocation, and the two
//! configuration mechanisms (ports 0xCF8/0xCFC and ECAM).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};

use kvmbox_arch::layout;
use kvmbox_devices::{BusDevice, IoBus};

use crate::config::{
    BarKind, PciConfiguration, PciHeader, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, NUM_BARS,
};
use crate::device::PciDevice;
use crate::{Error, Result};

/// Vendor ID of the host bridge at 00:00.0 (Intel, as Firecracker and Cloud Hypervisor use).
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
/// Device ID of the host bridge.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;
const MAX_SLOTS: u8 = 32;

struct HostBridge {
    config: PciConfiguration,
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}

struct Slot {
    pci: Arc<Mutex<dyn PciDevice>>,
    bars: Option<Arc<Mutex<dyn BusDevice>>>,
    /// Where each BAR sits on its bus (ports for an I/O BAR, MMIO otherwise) now.
    mapped: [Option<u64>; NUM_BARS],
}

/// PCI bus 0. Owns the devices' slots, places their memory BARs in the 32-bit PCI window and
/// their I/O BARs in the PCI port window, and keeps each BAR on the MMIO or port bus at the
/// address the guest programmed, while memory or I/O decoding is on.
pub struct PciRoot {
    slots: BTreeMap<u8, Slot>,
    io: Weak<IoBus>,
    next_bar: u64,
    bar_end: u64,
    next_io_bar: u64,
}

/// First port after the x86 port space.
const PORT_SPACE_END: u64 = 0x1_0000;

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciRoot {
    /// Bus 0 with only the host bridge. BARs are mapped on `io`'s MMIO bus (held weakly: the
    /// bus owns the configuration devices that own this root).
    pub fn new(io: Weak<IoBus>) -> Self {
        let bridge = HostBridge {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: HOST_BRIDGE_VENDOR_ID,
                device_id: HOST_BRIDGE_DEVICE_ID,
                class: 0x06, // bridge
                subclass: 0x00,
                ..Default::default()
            }),
        };
        let mut slots = BTreeMap::new();
        slots.insert(
            0,
            Slot {
                pci: Arc::new(Mutex::new(bridge)),
                bars: None,
                mapped: [None; NUM_BARS],
            },
        );
        Self {
            slots,
            io,
            next_bar: layout::PCI_MMIO32_START,
            bar_end: layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE,
            next_io_bar: u64::from(layout::PCI_IO_START),
        }
    }

    /// Plug `dev` into the first free slot: give each of its BARs an address in the PCI memory
    /// or port window and map them. Returns the device number (bus 0, function 0).
    pub fn add_device<T: PciDevice + BusDevice + 'static>(
        &mut self,
        dev: Arc<Mutex<T>>,
    ) -> Result<u8> {
        let slot = (1..MAX_SLOTS)
            .find(|s| !self.slots.contains_key(s))
            .ok_or(Error::NoSlot)?;
        {
            let mut d = lock(&dev);
            let mut next = self.next_bar;
            let mut next_io = self.next_io_bar;
            let io_end = u64::from(layout::PCI_IO_START) + u64::from(layout::PCI_IO_SIZE);
            let mut placed = Vec::new();
            for i in 0..NUM_BARS {
                let Some(spec) = d.config().bar(i) else {
                    continue;
                };
                let (cursor, end) = if spec.kind == BarKind::Io {
                    (&mut next_io, io_end)
                } else {
                    (&mut next, self.bar_end)
                };
                let base = cursor
                    .checked_next_multiple_of(spec.size)
                    .filter(|b| b.checked_add(spec.size).is_some_and(|e| e <= end))
                    .ok_or(Error::WindowFull(spec.size))?;
                placed.push((i, base));
                *cursor = base + spec.size;
            }
            for (i, base) in placed {
                d.config_mut().set_bar_address(i, base)?;
            }
            self.next_bar = next;
            self.next_io_bar = next_io;
        }
        let pci: Arc<Mutex<dyn PciDevice>> = dev.clone();
        let bars: Arc<Mutex<dyn BusDevice>> = dev;
        self.slots.insert(
            slot,
            Slot {
                pci,
                bars: Some(bars),
                mapped: [None; NUM_BARS],
            },
        );
        self.remap(slot)?;
        Ok(slot)
    }

    /// Where BAR `bar` of device `slot` is mapped (on the port bus for an I/O BAR) now.
    pub fn bar_mapping(&self, slot: u8, bar: usize) -> Option<u64> {
        self.slots.get(&slot)?.mapped.get(bar).copied().flatten()
    }

    /// Bring the MMIO and port buses in line with the device's BARs and command register.
    fn remap(&mut self, slot: u8) -> Result<()> {
        let io = self.io.upgrade().ok_or(Error::BusGone)?;
        let Some(s) = self.slots.get_mut(&slot) else {
            return Ok(());
        };
        let Some(bars) = s.bars.clone() else {
            return Ok(());
        };
        let d = lock(&s.pci);
        let cfg = d.config();
        let mut result = Ok(());
        for i in 0..NUM_BARS {
            let Some(spec) = cfg.bar(i) else {
                continue;
            };
            let (bus, decode, end) = if spec.kind == BarKind::Io {
                (
                    &io.pio,
                    cfg.command() & COMMAND_IO_SPACE != 0,
                    PORT_SPACE_END,
                )
            } else {
                (
                    &io.mmio,
                    cfg.command() & COMMAND_MEMORY_SPACE != 0,
                    u64::MAX,
                )
            };
            let want = cfg.bar_address(i).filter(|&addr| {
                decode && addr != 0 && addr.checked_add(spec.size).is_some_and(|e| e <= end)
            });
            if want == s.mapped[i] {
                continue;
            }
            if let Some(old) = s.mapped[i].take() {
                bus.remove(old);
            }
            if let Some(addr) = want {
                // A BAR moved on top of another device stays unmapped until moved again.
                match bus.insert(bars.clone(), addr, spec.size) {
                    Ok(()) => s.mapped[i] = Some(addr),
                    Err(e) => result = Err(e.into()),
                }
            }
        }
        result
    }

    /// Bring the MMIO bus in line with every device's BARs and command register (after their
    /// configuration space was restored from a snapshot).
    pub fn remap_all(&mut self) -> Result<()> {
        let slots: Vec<u8> = self.slots.keys().copied().collect();
        for slot in slots {
            self.remap(slot)?;
        }
        Ok(())
    }

    /// Guest read of configuration space of 00:`device`.`function` (bus 0 only).
    pub fn config_read(&self, bus: u8, device: u8, function: u8, offset: usize, data: &mut [u8]) {
        match self.slots.get(&device) {
            Some(s) if bus == 0 && function == 0 => lock(&s.pci).read_config(offset, data),
            _ => data.fill(0xff),
        }
    }

    /// Guest write of configuration space; BAR or command changes move the device on the bus.
    pub fn config_write(&mut self, bus: u8, device: u8, function: u8, offset: usize, data: &[u8]) {
        if bus != 0 || function != 0 {
            return;
        }
        let Some(s) = self.slots.get(&device) else {
            return;
        };
        lock(&s.pci).write_config(offset, data);
        if PciConfiguration::touches_bars(offset, data.len())
            || PciConfiguration::touches_command(offset, data.len())
        {
            // A failed mapping leaves that BAR unmapped: the guest's doing, not ours to stop.
            let _ = self.remap(device);
        }
    }
}

/// Configuration mechanism #1: the address register at port 0xCF8 and the data window at
/// 0xCFC..0xD00. Insert it on the port bus at [`layout::PCI_CONFIG_ADDRESS_PORT`], 8 bytes.
///
/// Port 0xCF9 falls inside that range but is the PC reset control register: byte accesses to it
/// go to the device given to [`with_reset_register`](Self::with_reset_register).
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
    reset: Option<Arc<Mutex<dyn BusDevice>>>,
}

impl PciConfigIo {
    /// The port device for `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self {
            root,
            address: 0,
            reset: None,
        }
    }

    /// Forward byte accesses of port 0xCF9 to `dev` (called with base 0xCF9, offset 0).
    pub fn with_reset_register(mut self, dev: Arc<Mutex<dyn BusDevice>>) -> Self {
        self.reset = Some(dev);
        self
    }

    /// (bus, device, function, register offset) of the current address, if enabled.
    fn target(&self, data_offset: u64) -> Option<(u8, u8, u8, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let a = self.address;
        Some((
            (a >> 16) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            // Bits 1:0 of the address register select the byte as the data port's own offset
            // does: chipsets keep them 0 and Linux writes them 0, but QEMU honours them and
            // kvm-unit-tests relies on it (`outl(0x80000000 | devfn << 8 | 2, 0xcf8)`, then
            // `inw(0xcfc)` for the device ID).
            (a & 0xfc) as usize + ((a & 0x3) as usize | data_offset as usize),
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            1 if data.len() == 1 && self.reset.is_some() => {
                if let Some(r) = &self.reset {
                    lock(r).read(base + 1, 0, data);
                }
            }
            4..=7 => match self.target(offset - 4) {
                Some((b, d, f, reg)) => lock(&self.root).config_read(b, d, f, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            1 if data.len() == 1 => {
                if let Some(r) = &self.reset {
                    lock(r).write(base + 1, 0, data);
                }
            }
            4..=7 => {
                if let Some((b, d, f, reg)) = self.target(offset - 4) {
                    lock(&self.root).config_write(b, d, f, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// PCI Express enhanced configuration access (ECAM/MMCONFIG). Insert it on the MMIO bus at
/// [`layout::PCI_ECAM_START`]; the MCFG table describes the same window. Only bus 0 has
/// devices; the rest of the window reads as all ones.
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
}

impl PciConfigMmio {
    /// The ECAM device for `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root }
    }

    fn target(offset: u64) -> (u8, u8, u8, usize) {
        (
            (offset >> 20) as u8,
            ((offset >> 15) & 0x1f) as u8,
            ((offset >> 12) & 0x7) as u8,
            (offset & 0xfff) as usize,
        )
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= layout::PCI_ECAM_SIZE {
            data.fill(0xff);
            return;
        }
        let (b, d, f, reg) = Self::target(offset);
        lock(&self.root).config_read(b, d, f, reg, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= layout::PCI_ECAM_SIZE {
            return;
        }
        let (b, d, f, reg) = Self::target(offset);
        lock(&self.root).config_write(b, d, f, reg, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BarSpec;

    struct TestDev {
        config: PciConfiguration,
        writes: Vec<(u64, u64, Vec<u8>)>,
    }

    impl PciDevice for TestDev {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.config
        }
    }

    impl BusDevice for TestDev {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.writes.push((base, offset, data.to_vec()));
        }
    }

    fn dev(bars: &[(usize, BarKind, u64)]) -> Arc<Mutex<TestDev>> {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            ..Default::default()
        });
        for &(i, kind, size) in bars {
            config
                .add_bar(
                    i,
                    BarSpec {
                        kind,
                        size,
                        prefetchable: false,
                    },
                )
                .unwrap();
        }
        Arc::new(Mutex::new(TestDev {
            config,
            writes: Vec::new(),
        }))
    }

    struct Setup {
        io: Arc<IoBus>,
        root: Arc<Mutex<PciRoot>>,
    }

    fn setup() -> Setup {
        let io = Arc::new(IoBus::default());
        let root = Arc::new(Mutex::new(PciRoot::new(Arc::downgrade(&io))));
        io.pio
            .insert(
                Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
                u64::from(layout::PCI_CONFIG_ADDRESS_PORT),
                8,
            )
            .unwrap();
        io.mmio
            .insert(
                Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
                layout::PCI_ECAM_START,
                layout::PCI_ECAM_SIZE,
            )
            .unwrap();
        Setup { io, root }
    }

    fn cf8_read(io: &IoBus, dev: u8, reg: u8) -> u32 {
        use kvmbox_cpu::IoHandler;
        let addr = 0x8000_0000u32 | u32::from(dev) << 11 | u32::from(reg & 0xfc);
        io.pio_write(0xcf8, &addr.to_le_bytes());
        let mut d = [0u8; 4];
        io.pio_read(0xcfc, &mut d);
        u32::from_le_bytes(d)
    }

    fn ecam_write(io: &IoBus, dev: u8, reg: u64, v: u32) {
        use kvmbox_cpu::IoHandler;
        io.mmio_write(
            layout::PCI_ECAM_START + (u64::from(dev) << 15) + reg,
            &v.to_le_bytes(),
        );
    }

    fn ecam_read(io: &IoBus, dev: u8, reg: u64) -> u32 {
        use kvmbox_cpu::IoHandler;
        let mut d = [0u8; 4];
        io.mmio_read(
            layout::PCI_ECAM_START + (u64::from(dev) << 15) + reg,
            &mut d,
        );
        u32::from_le_bytes(d)
    }

    #[test]
    fn host_bridge_and_empty_slots() {
        let s = setup();
        assert_eq!(cf8_read(&s.io, 0, 0), 0x0d57_8086);
        assert_eq!(cf8_read(&s.io, 0, 8) >> 16, 0x0600, "host bridge class");
        assert_eq!(cf8_read(&s.io, 3, 0), 0xffff_ffff, "empty slot");
        assert_eq!(ecam_read(&s.io, 0, 0), 0x0d57_8086);
        // Other buses and functions are empty.
        use kvmbox_cpu::IoHandler;
        let mut d = [0u8; 4];
        s.io.mmio_read(layout::PCI_ECAM_START + (1 << 20), &mut d);
        assert_eq!(d, [0xff; 4]);
        s.io.mmio_read(layout::PCI_ECAM_START + (1 << 12), &mut d);
        assert_eq!(d, [0xff; 4]);
        // Disabled address register: data reads all ones.
        s.io.pio_write(0xcf8, &0u32.to_le_bytes());
        s.io.pio_read(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut a = [0u8; 4];
        s.io.pio_read(0xcf8, &mut a);
        assert_eq!(a, [0; 4]);
        // Byte access at 0xcfe reads the upper half of the ID register.
        s.io.pio_write(0xcf8, &0x8000_0000u32.to_le_bytes());
        let mut w = [0u8; 2];
        s.io.pio_read(0xcfe, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0d57);
        // As under QEMU: the low bits of the address register offset the data port.
        s.io.pio_write(0xcf8, &0x8000_0002u32.to_le_bytes());
        s.io.pio_read(0xcfc, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0d57);
    }

    #[test]
    fn bars_are_placed_mapped_and_follow_guest_moves() {
        use kvmbox_cpu::IoHandler;
        let s = setup();
        let a = dev(&[(0, BarKind::Mem32, 0x4000)]);
        let b = dev(&[(0, BarKind::Mem32, 0x1000), (2, BarKind::Mem64, 0x10_0000)]);
        let sa = s.root.lock().unwrap().add_device(a.clone()).unwrap();
        let sb = s.root.lock().unwrap().add_device(b.clone()).unwrap();
        assert_eq!((sa, sb), (1, 2));
        let a_bar = ecam_read(&s.io, 1, 0x10) as u64;
        assert_eq!(a_bar, layout::PCI_MMIO32_START);
        let b0 = ecam_read(&s.io, 2, 0x10) as u64;
        let b2 = ecam_read(&s.io, 2, 0x18) as u64 & !0xf;
        assert_eq!(b0, layout::PCI_MMIO32_START + 0x4000);
        assert_eq!(b2 % 0x10_0000, 0, "naturally aligned");
        assert_eq!(ecam_read(&s.io, 2, 0x18) & 0xf, 0x4, "64-bit BAR");

        s.io.mmio_write(a_bar + 0x10, &[1]);
        s.io.mmio_write(b2 + 0x20, &[2]);
        assert_eq!(a.lock().unwrap().writes, vec![(a_bar, 0x10, vec![1])]);
        assert_eq!(b.lock().unwrap().writes, vec![(b2, 0x20, vec![2])]);

        // Linux-style sizing: decode off, all ones, read, restore, decode on.
        ecam_write(&s.io, 1, 0x4, 0);
        assert_eq!(s.root.lock().unwrap().bar_mapping(1, 0), None);
        ecam_write(&s.io, 1, 0x10, u32::MAX);
        assert_eq!(ecam_read(&s.io, 1, 0x10), 0xffff_c000);
        // Move it.
        let new = layout::PCI_MMIO32_START + 0x80_0000;
        ecam_write(&s.io, 1, 0x10, new as u32);
        ecam_write(&s.io, 1, 0x4, u32::from(COMMAND_MEMORY_SPACE));
        assert_eq!(s.root.lock().unwrap().bar_mapping(1, 0), Some(new));
        s.io.mmio_write(new + 4, &[3]);
        let mut d = [0u8; 1];
        s.io.mmio_read(a_bar, &mut d);
        assert_eq!(d, [0xff], "old address no longer decodes");
        assert_eq!(a.lock().unwrap().writes.last(), Some(&(new, 4, vec![3])));

        // A hostile move onto another device's BAR leaves it unmapped, no panic.
        ecam_write(&s.io, 1, 0x10, b0 as u32);
        assert_eq!(s.root.lock().unwrap().bar_mapping(1, 0), None);
        assert_eq!(s.root.lock().unwrap().bar_mapping(2, 0), Some(b0));
        // Onto the ECAM window itself: still no panic, stays unmapped.
        ecam_write(&s.io, 1, 0x10, layout::PCI_ECAM_START as u32);
        assert_eq!(s.root.lock().unwrap().bar_mapping(1, 0), None);
        assert_eq!(ecam_read(&s.io, 0, 0), 0x0d57_8086, "ECAM still works");
        // Back to a free place.
        ecam_write(&s.io, 1, 0x10, new as u32);
        assert_eq!(s.root.lock().unwrap().bar_mapping(1, 0), Some(new));
        // Move the 64-bit BAR above 4 GiB.
        ecam_write(&s.io, 2, 0x1c, 0x1);
        assert_eq!(
            s.root.lock().unwrap().bar_mapping(2, 2),
            Some(0x1_0000_0000 | b2)
        );
    }

    #[test]
    fn io_bars_are_placed_in_the_port_window_and_follow_io_decoding() {
        use kvmbox_cpu::IoHandler;
        let s = setup();
        let a = dev(&[(0, BarKind::Mem32, 0x1000), (1, BarKind::Io, 0x100)]);
        let slot = s.root.lock().unwrap().add_device(a.clone()).unwrap();
        let port = u64::from(ecam_read(&s.io, slot, 0x14));
        assert_eq!(port & 0x3, 0x1, "an I/O BAR");
        let port = port & !0x3;
        assert_eq!(port, u64::from(layout::PCI_IO_START));
        assert_eq!(s.root.lock().unwrap().bar_mapping(slot, 1), Some(port));
        s.io.pio_write(port as u16 + 4, &[7]);
        assert_eq!(a.lock().unwrap().writes, vec![(port, 4, vec![7])]);
        // I/O decoding off: the ports go; the memory BAR stays.
        ecam_write(&s.io, slot, 0x4, u32::from(COMMAND_MEMORY_SPACE));
        assert_eq!(s.root.lock().unwrap().bar_mapping(slot, 1), None);
        assert!(s.root.lock().unwrap().bar_mapping(slot, 0).is_some());
        // A guest move past the end of the port space is not mapped (no panic, no wrap).
        ecam_write(&s.io, slot, 0x14, 0xffff_ff01);
        ecam_write(
            &s.io,
            slot,
            0x4,
            u32::from(COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE),
        );
        assert_eq!(s.root.lock().unwrap().bar_mapping(slot, 1), None);
        ecam_write(&s.io, slot, 0x14, 0xd001);
        assert_eq!(s.root.lock().unwrap().bar_mapping(slot, 1), Some(0xd000));
        // The port window fills up like the memory window.
        let big = dev(&[(0, BarKind::Io, u64::from(layout::PCI_IO_SIZE))]);
        assert!(matches!(
            s.root.lock().unwrap().add_device(big),
            Err(Error::WindowFull(_))
        ));
    }

    #[test]
    fn full_window_and_full_bus_are_errors() {
        let s = setup();
        let big = dev(&[(0, BarKind::Mem64, layout::PCI_MMIO32_SIZE * 2)]);
        assert!(matches!(
            s.root.lock().unwrap().add_device(big),
            Err(Error::WindowFull(_))
        ));
        for _ in 1..32 {
            s.root.lock().unwrap().add_device(dev(&[])).unwrap();
        }
        assert!(matches!(
            s.root.lock().unwrap().add_device(dev(&[])),
            Err(Error::NoSlot)
        ));
    }

    #[test]
    fn reset_register_is_forwarded() {
        use kvmbox_cpu::IoHandler;
        let io = Arc::new(IoBus::default());
        let root = Arc::new(Mutex::new(PciRoot::new(Arc::downgrade(&io))));
        let reset = dev(&[]);
        io.pio
            .insert(
                Arc::new(Mutex::new(
                    PciConfigIo::new(root).with_reset_register(reset.clone()),
                )),
                0xcf8,
                8,
            )
            .unwrap();
        io.pio_write(0xcf9, &[6]);
        assert_eq!(reset.lock().unwrap().writes, vec![(0xcf9, 0, vec![6])]);
        let mut d = [0u8; 1];
        io.pio_read(0xcf9, &mut d);
        assert_eq!(d, [0]);
    }
}
