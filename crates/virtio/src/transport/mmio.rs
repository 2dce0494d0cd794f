//! virtio-mmio (version 2, virtio 1.x) transport.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_cpu::{IoEventAddress, IrqLine, Vm};
use kvmbox_devices::BusDevice;
use virtio_queue::QueueT;

use super::common::{signal_needs_reset, VirtioCommon};
use crate::device::{VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use crate::Result;

pub mod persist;

/// Bytes of MMIO space one device occupies (registers + configuration space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;
/// Offset of the QueueNotify register.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
const CONFIG_OFFSET: u64 = 0x100;
const INT_USED_RING: u32 = 1;
const INT_CONFIG: u32 = 2;

/// Interrupt status register plus the device's edge-triggered interrupt line.
struct MmioInterrupt {
    status: AtomicU32,
    irq: Arc<dyn IrqLine>,
    needs_reset: Arc<AtomicBool>,
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()> {
        let bit = match kind {
            VirtioInterruptType::Config => INT_CONFIG,
            VirtioInterruptType::Queue(_) => INT_USED_RING,
        };
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.irq.trigger()
    }

    fn set_needs_reset(&self) {
        signal_needs_reset(&self.needs_reset, self);
    }
}

/// A virtio device behind the virtio-mmio register layout. Insert it on the MMIO bus with
/// [`MMIO_WINDOW_SIZE`] bytes and tell the guest with [`cmdline_arg`].
pub struct MmioTransport {
    common: VirtioCommon,
    interrupt: Arc<MmioInterrupt>,
}

/// The kernel command-line entry announcing a virtio-mmio device at `base` with `irq`
/// (`virtio_mmio.device=4K@0xd0000000:5`).
pub fn cmdline_arg(base: u64, irq: u32) -> String {
    format!(
        "virtio_mmio.device={}K@{:#x}:{}",
        MMIO_WINDOW_SIZE >> 10,
        base,
        irq
    )
}

impl MmioTransport {
    /// Wrap `device`; it raises `irq` (edge) for queue and configuration interrupts.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<dyn IrqLine>,
    ) -> Result<Self> {
        let common = VirtioCommon::new(device, mem)?;
        let interrupt = Arc::new(MmioInterrupt {
            status: AtomicU32::new(0),
            irq,
            needs_reset: common.needs_reset.clone(),
        });
        Ok(Self { common, interrupt })
    }

    /// Have the backend signal queue eventfds directly on QueueNotify writes at `base`
    /// (KVM ioeventfd with the queue index as datamatch). Returns false when the backend has
    /// no such shortcut; notifications then arrive through [`BusDevice::write`].
    pub fn register_ioevents(&self, vm: &dyn Vm, base: u64) -> Result<bool> {
        for (i, evt) in self.common.queue_evts().iter().enumerate() {
            let addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
            match vm.register_ioevent(evt, addr, Some(i as u32)) {
                Ok(()) => {}
                Err(kvmbox_cpu::Error::Unsupported(_)) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let c = &self.common;
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => c.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => c.device_features_word(),
            0x34 => c.queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => c.queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status.load(Ordering::Acquire),
            0x70 => u32::from(c.status()),
            0xfc => u32::from(c.config_generation),
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let c = &mut self.common;
        match offset {
            0x14 => c.device_features_sel = v,
            0x20 => c.set_driver_features_word(v),
            0x24 => c.driver_features_sel = v,
            0x30 => c.queue_sel = v.try_into().unwrap_or(u16::MAX),
            0x38 => {
                if let Some(q) = c.queue_mut() {
                    q.set_size(v.try_into().unwrap_or(0));
                }
            }
            0x44 => {
                if let Some(q) = c.queue_mut() {
                    q.set_ready(v == 1);
                }
            }
            0x50 => c.notify(v),
            0x64 => {
                self.interrupt.status.fetch_and(!v, Ordering::AcqRel);
            }
            0x70 => {
                let irq: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
                c.set_status(v as u8, irq);
                if c.status() == 0 {
                    self.interrupt.status.store(0, Ordering::Release);
                }
            }
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                if let Some(q) = c.queue_mut() {
                    let (lo, hi) = if offset & 4 == 0 {
                        (Some(v), None)
                    } else {
                        (None, Some(v))
                    };
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(lo, hi),
                        0x90 => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.common.read_device_config(offset - CONFIG_OFFSET, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.common
                .write_device_config(offset - CONFIG_OFFSET, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            self.write_reg(
                offset,
                u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
            );
        }
    }
}
