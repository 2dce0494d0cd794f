//! virtio-pci modern (virtio 1.x) transport: common, notify, ISR and device configuration
//! structures and the MSI-X table and PBA, all in BAR 0.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_cpu::{IoEventAddress, IrqLine, MsiLine, Vm};
use kvmbox_devices::BusDevice;
use kvmbox_pci::{BarKind, BarSpec, MsixConfig, PciConfiguration, PciDevice, PciHeader};
use virtio_queue::QueueT;

use super::common::{signal_needs_reset, VirtioCommon};
use crate::device::{VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use crate::{Error, Result, TYPE_BLOCK, TYPE_NET};

pub mod persist;

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// "No MSI-X vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// BAR 0 layout.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
const COMMON_CFG_SIZE: u64 = 0x38;
/// ISR status byte.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device-specific configuration.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Queue notification area: queue `n` at `NOTIFY_OFFSET + n * NOTIFY_MULTIPLIER`.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// MSI-X pending-bit array.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
/// Size of BAR 0.
pub const BAR0_SIZE: u64 = 0x8000;
const REGION_SIZE: u64 = 0x1000;
const MAX_VECTORS: usize = 512;

const CAP_VENDOR: u8 = 0x09;
const CFG_TYPE_COMMON: u8 = 1;
const CFG_TYPE_NOTIFY: u8 = 2;
const CFG_TYPE_ISR: u8 = 3;
const CFG_TYPE_DEVICE: u8 = 4;
const CFG_TYPE_PCI_CFG: u8 = 5;

struct PciInterrupt {
    msix: Arc<Mutex<MsixConfig>>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    isr: AtomicU32,
    intx: Option<Arc<dyn IrqLine>>,
    needs_reset: Arc<AtomicBool>,
}

impl VirtioInterrupt for PciInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        let mut msix = self.msix.lock().unwrap_or_else(|e| e.into_inner());
        if msix.enabled() {
            let v = match kind {
                VirtioInterruptType::Config => self.config_vector.load(Ordering::Acquire),
                VirtioInterruptType::Queue(q) => self
                    .queue_vectors
                    .get(usize::from(q))
                    .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire)),
            };
            if v == NO_VECTOR {
                return Ok(());
            }
            return msix.trigger(v);
        }
        drop(msix);
        let bit = match kind {
            VirtioInterruptType::Config => 2,
            VirtioInterruptType::Queue(_) => 1,
        };
        self.isr.fetch_or(bit, Ordering::AcqRel);
        match &self.intx {
            Some(l) => l.set_level(true),
            None => Ok(()),
        }
    }

    fn set_needs_reset(&self) {
        signal_needs_reset(&self.needs_reset, self);
    }
}

/// A virtio device as a PCI function: plug it into [`kvmbox_pci::PciRoot::add_device`].
pub struct VirtioPciDevice {
    common: VirtioCommon,
    config: PciConfiguration,
    interrupt: Arc<PciInterrupt>,
    /// Offset of the VIRTIO_PCI_CAP_PCI_CFG capability (a window onto BAR 0).
    cfg_cap: usize,
}

fn pci_class(device_type: u32) -> (u8, u8) {
    match device_type {
        TYPE_NET => (0x02, 0x00),   // network controller, ethernet
        TYPE_BLOCK => (0x01, 0x80), // mass storage, other
        _ => (0xff, 0x00),
    }
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let mut c = vec![CAP_VENDOR, 0, 16, cfg_type, 0, 0, 0, 0];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        c.extend_from_slice(&x.to_le_bytes());
        c[2] = 20;
    }
    c
}

impl VirtioPciDevice {
    /// Wrap `device`. `msi_lines` must hold one line per queue plus one for configuration
    /// changes; `intx` is the legacy INTA# line used while the guest leaves MSI-X disabled.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        msi_lines: Vec<Arc<dyn MsiLine>>,
        intx: Option<Arc<dyn IrqLine>>,
    ) -> Result<Self> {
        let common = VirtioCommon::new(device, mem)?;
        let need = common.num_queues() + 1;
        if msi_lines.len() != need || need > MAX_VECTORS {
            return Err(Error::MsixVectors {
                need,
                got: msi_lines.len(),
            });
        }
        let dtype = common.device.device_type();
        let (class, subclass) = pci_class(dtype);
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(dtype as u16),
            class,
            subclass,
            prog_if: 0,
            revision: 1,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x40,
            interrupt_pin: u8::from(intx.is_some()),
        });
        config.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mem32,
                size: BAR0_SIZE,
                prefetchable: false,
            },
        )?;
        let msix = Arc::new(Mutex::new(MsixConfig::new(msi_lines)?));
        config.add_msix(
            msix.clone(),
            0,
            MSIX_TABLE_OFFSET as u32,
            0,
            MSIX_PBA_OFFSET as u32,
        )?;
        config.add_capability(&virtio_cap(
            CFG_TYPE_COMMON,
            COMMON_CFG_OFFSET,
            COMMON_CFG_SIZE,
            None,
        ))?;
        config.add_capability(&virtio_cap(CFG_TYPE_ISR, ISR_OFFSET, REGION_SIZE, None))?;
        config.add_capability(&virtio_cap(
            CFG_TYPE_DEVICE,
            DEVICE_CFG_OFFSET,
            REGION_SIZE,
            None,
        ))?;
        config.add_capability(&virtio_cap(
            CFG_TYPE_NOTIFY,
            NOTIFY_OFFSET,
            REGION_SIZE,
            Some(NOTIFY_MULTIPLIER),
        ))?;
        // PCI configuration access window: bar, offset, length and the data dword are writable.
        let mut window = virtio_cap(CFG_TYPE_PCI_CFG, 0, 0, Some(0));
        window[2] = 20;
        let mut wmask = vec![0u8; 20];
        wmask[4] = 0xff;
        wmask[8..20].fill(0xff);
        let cfg_cap = config.add_capability_with_wmask(&window, &wmask)?;
        let interrupt = Arc::new(PciInterrupt {
            msix,
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..common.num_queues())
                .map(|_| AtomicU16::new(NO_VECTOR))
                .collect(),
            isr: AtomicU32::new(0),
            intx,
            needs_reset: common.needs_reset.clone(),
        });
        Ok(Self {
            common,
            config,
            interrupt,
            cfg_cap,
        })
    }

    /// Have the backend signal queue eventfds directly on notify writes at BAR 0's current
    /// address. Returns false when the backend has no such shortcut. Call after the BAR is
    /// placed (after `PciRoot::add_device`).
    pub fn register_ioevents(&self, vm: &dyn Vm) -> Result<bool> {
        let Some(bar) = self.config.bar_address(0).filter(|&b| b != 0) else {
            return Ok(false); // BAR 0 not placed yet
        };
        for (i, evt) in self.common.queue_evts().iter().enumerate() {
            let addr = bar + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER);
            match vm.register_ioevent(evt, IoEventAddress::Mmio(addr), None) {
                Ok(()) => {}
                Err(kvmbox_cpu::Error::Unsupported(_)) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    fn vector(&self, v: u16) -> u16 {
        let n = self.common.num_queues() + 1;
        if v == NO_VECTOR || usize::from(v) < n {
            v
        } else {
            NO_VECTOR
        }
    }

    fn read_common(&self, offset: u64) -> u32 {
        let c = &self.common;
        let q = c.queue();
        let qv = self.interrupt.queue_vectors.get(usize::from(c.queue_sel));
        match offset {
            0x00 => c.device_features_sel,
            0x04 => c.device_features_word(),
            0x08 => c.driver_features_sel,
            0x0c => c.driver_features_word(),
            0x10 => u32::from(self.interrupt.config_vector.load(Ordering::Acquire)),
            0x12 => c.num_queues() as u32,
            0x14 => u32::from(c.status()),
            0x15 => u32::from(c.config_generation),
            0x16 => u32::from(c.queue_sel),
            0x18 => q.map_or(0, |q| u32::from(q.size())),
            0x1a => qv.map_or(u32::from(NO_VECTOR), |v| {
                u32::from(v.load(Ordering::Acquire))
            }),
            0x1c => q.map_or(0, |q| u32::from(q.ready())),
            0x1e => q.map_or(0, |_| u32::from(c.queue_sel)),
            0x20 => q.map_or(0, |q| q.desc_table() as u32),
            0x24 => q.map_or(0, |q| (q.desc_table() >> 32) as u32),
            0x28 => q.map_or(0, |q| q.avail_ring() as u32),
            0x2c => q.map_or(0, |q| (q.avail_ring() >> 32) as u32),
            0x30 => q.map_or(0, |q| q.used_ring() as u32),
            0x34 => q.map_or(0, |q| (q.used_ring() >> 32) as u32),
            _ => 0,
        }
    }

    fn write_common(&mut self, offset: u64, v: u32) {
        match offset {
            0x00 => self.common.device_features_sel = v,
            0x08 => self.common.driver_features_sel = v,
            0x0c => self.common.set_driver_features_word(v),
            0x10 => {
                let v = self.vector(v as u16);
                self.interrupt.config_vector.store(v, Ordering::Release);
            }
            0x14 => {
                let irq: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
                self.common.set_status(v as u8, irq);
                if self.common.status() == 0 {
                    self.reset_vectors();
                }
            }
            0x16 => self.common.queue_sel = v as u16,
            0x18 => {
                if let Some(q) = self.common.queue_mut() {
                    q.set_size(v as u16);
                }
            }
            0x1a => {
                let v = self.vector(v as u16);
                if let Some(qv) = self
                    .interrupt
                    .queue_vectors
                    .get(usize::from(self.common.queue_sel))
                {
                    qv.store(v, Ordering::Release);
                }
            }
            0x1c => {
                if let Some(q) = self.common.queue_mut() {
                    if v & 0xffff == 1 {
                        q.set_ready(true);
                    }
                }
            }
            0x20..=0x34 if offset.is_multiple_of(4) => {
                if let Some(q) = self.common.queue_mut() {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset & !4 {
                        0x20 => q.set_desc_table_address(lo, hi),
                        0x28 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
    }

    fn reset_vectors(&self) {
        self.interrupt
            .config_vector
            .store(NO_VECTOR, Ordering::Release);
        for v in &self.interrupt.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
        self.interrupt.isr.store(0, Ordering::Release);
        if let Some(l) = &self.interrupt.intx {
            let _ = l.set_level(false);
        }
    }
}

impl VirtioPciDevice {
    /// Whether a configuration access at `offset` touches the PCI_CFG data dword.
    fn touches_window(&self, offset: usize, len: usize) -> bool {
        let data = self.cfg_cap + 16;
        offset < data + 4 && offset + len > data
    }

    /// BAR 0 offset and length the PCI_CFG capability selects, if valid.
    fn window(&self) -> Option<(u64, usize)> {
        let reg = |o: usize| self.config.read_reg((self.cfg_cap + o) / 4);
        let bar = reg(4) & 0xff;
        let (off, len) = (u64::from(reg(8)), reg(12) as usize);
        let ok = bar == 0
            && matches!(len, 1 | 2 | 4)
            && off.is_multiple_of(len as u64)
            && off + len as u64 <= BAR0_SIZE;
        ok.then_some((off, len))
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        if self.touches_window(offset, data.len()) {
            if let Some((off, len)) = self.window() {
                let mut buf = [0u8; 4];
                BusDevice::read(self, 0, off, &mut buf[..len]);
                self.config.write(self.cfg_cap + 16, &buf);
            }
        }
        self.config.read(offset, data);
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if self.touches_window(offset, data.len()) {
            if let Some((off, len)) = self.window() {
                let mut buf = [0u8; 4];
                self.config.read(self.cfg_cap + 16, &mut buf);
                BusDevice::write(self, 0, off, &buf[..len]);
            }
        }
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.is_empty() || data.len() > 8 {
            data.fill(0);
            return;
        }
        match offset {
            o if o < COMMON_CFG_SIZE && data.len() <= 4 => {
                let v = self.read_common(o);
                data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
            }
            ISR_OFFSET => {
                data.fill(0);
                let v = self.interrupt.isr.swap(0, Ordering::AcqRel);
                data[0] = v as u8;
                if let Some(l) = &self.interrupt.intx {
                    let _ = l.set_level(false);
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_SIZE).contains(&o) => {
                self.common.read_device_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                let m = self
                    .interrupt
                    .msix
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                m.read_table(o - MSIX_TABLE_OFFSET, data);
            }
            o if (MSIX_PBA_OFFSET..BAR0_SIZE).contains(&o) => {
                let m = self
                    .interrupt
                    .msix
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                m.read_pba(o - MSIX_PBA_OFFSET, data);
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.is_empty() || data.len() > 8 {
            return;
        }
        match offset {
            o if o < COMMON_CFG_SIZE && data.len() <= 4 => {
                let mut raw = [0u8; 4];
                raw[..data.len()].copy_from_slice(data);
                self.write_common(o, u32::from_le_bytes(raw));
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_SIZE).contains(&o) => {
                self.common.write_device_config(o - DEVICE_CFG_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + REGION_SIZE).contains(&o) => {
                let q = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER);
                self.common.notify(q as u32);
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                let mut m = self
                    .interrupt
                    .msix
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                m.write_table(o - MSIX_TABLE_OFFSET, data);
            }
            _ => {}
        }
    }
}
