//! State both transports share: feature negotiation, device status, queue setup, activation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvmbox_cpu::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{ActivateContext, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use crate::{
    os, Error, Result, F_VERSION_1, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FAILED, STATUS_FEATURES_OK,
};

pub mod persist;

const F_RING_EVENT_IDX: u32 = crate::F_RING_EVENT_IDX;

pub(crate) struct VirtioCommon {
    pub(crate) device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    evts: Vec<EventFd>,
    pub(crate) device_features_sel: u32,
    pub(crate) driver_features_sel: u32,
    driver_features: u64,
    pub(crate) queue_sel: u16,
    status: u8,
    pub(crate) config_generation: u8,
    active: bool,
    pub(crate) needs_reset: Arc<AtomicBool>,
}

impl VirtioCommon {
    pub(crate) fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Result<Self> {
        let mut queues = Vec::new();
        let mut evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max)?);
            evts.push(EventFd::new(libc::EFD_NONBLOCK).map_err(os("eventfd"))?);
        }
        Ok(Self {
            device,
            mem,
            queues,
            evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            active: false,
            needs_reset: Arc::new(AtomicBool::new(false)),
        })
    }

    pub(crate) fn num_queues(&self) -> usize {
        self.queues.len()
    }

    pub(crate) fn queue_evts(&self) -> &[EventFd] {
        &self.evts
    }

    pub(crate) fn device_features_word(&self) -> u32 {
        let f = self.device.features() | 1 << F_VERSION_1;
        match self.device_features_sel {
            0 => f as u32,
            1 => (f >> 32) as u32,
            _ => 0,
        }
    }

    pub(crate) fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    pub(crate) fn set_driver_features_word(&mut self, v: u32) {
        if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {}
        }
    }

    pub(crate) fn status(&self) -> u8 {
        if self.needs_reset.load(Ordering::Acquire) {
            self.status | STATUS_DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The driver wrote the status register.
    pub(crate) fn set_status(&mut self, v: u8, interrupt: Arc<dyn VirtioInterrupt>) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = v & !STATUS_DEVICE_NEEDS_RESET;
        if new & old != old {
            // Bits only go away through a reset.
            return;
        }
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features() | 1 << F_VERSION_1;
            if self.driver_features & !offered != 0 || self.driver_features & 1 << F_VERSION_1 == 0
            {
                new &= !STATUS_FEATURES_OK;
            }
        }
        if new & STATUS_DRIVER_OK != 0 && !self.active && new & STATUS_FAILED == 0 {
            if new & STATUS_FEATURES_OK == 0 {
                new &= !STATUS_DRIVER_OK;
            } else if self.activate(interrupt.clone()).is_ok() {
                self.active = true;
            } else {
                self.status = new;
                interrupt.set_needs_reset();
                return;
            }
        }
        self.status = new;
    }

    fn activate(&mut self, interrupt: Arc<dyn VirtioInterrupt>) -> Result<()> {
        let event_idx = self.driver_features & 1 << F_RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, (q, evt)) in self.queues.iter().zip(&self.evts).enumerate() {
            let evt = evt.try_clone().map_err(os("eventfd clone"))?;
            if !q.ready() {
                queues.push((None, evt));
                continue;
            }
            if !q.is_valid(&self.mem) {
                return Err(Error::InvalidQueue(i));
            }
            let mut dq = Queue::try_from(q.state()).map_err(|_| Error::InvalidQueue(i))?;
            dq.set_event_idx(event_idx);
            queues.push((Some(dq), evt));
        }
        self.device.activate(ActivateContext {
            mem: self.mem.clone(),
            interrupt,
            features: self.driver_features,
            queues,
        })
    }

    pub(crate) fn reset(&mut self) {
        self.device.reset();
        for (q, evt) in self.queues.iter_mut().zip(&self.evts) {
            q.reset();
            let _ = evt.read();
        }
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.active = false;
        self.needs_reset.store(false, Ordering::Release);
    }

    /// The selected queue, for reading.
    pub(crate) fn queue(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_sel))
    }

    /// The selected queue, for setup: only before the driver set DRIVER_OK.
    pub(crate) fn queue_mut(&mut self) -> Option<&mut Queue> {
        if self.active || self.status & STATUS_DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(usize::from(self.queue_sel))
    }

    /// The driver notified queue `idx` through the bus (no ioeventfd caught it).
    pub(crate) fn notify(&self, idx: u32) {
        if let Some(evt) = usize::try_from(idx).ok().and_then(|i| self.evts.get(i)) {
            let _ = evt.write(1);
        }
    }

    pub(crate) fn read_device_config(&self, offset: u64, data: &mut [u8]) {
        self.device.read_config(offset, data);
    }

    pub(crate) fn write_device_config(&mut self, offset: u64, data: &[u8]) {
        self.device.write_config(offset, data);
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

impl Drop for VirtioCommon {
    fn drop(&mut self) {
        self.device.reset();
    }
}

/// Raise a configuration-change interrupt after marking the device as needing a reset.
pub(crate) fn signal_needs_reset(flag: &AtomicBool, interrupt: &dyn VirtioInterrupt) {
    flag.store(true, Ordering::Release);
    let _ = interrupt.trigger(VirtioInterruptType::Config);
}
