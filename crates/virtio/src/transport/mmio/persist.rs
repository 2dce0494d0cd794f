//! A virtio-mmio device's state: the interrupt status and the virtio state.

use super::*;
use crate::transport::common::persist::VirtioState;
use serde::{Deserialize, Serialize};

/// Everything the guest can observe of one virtio-mmio device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    virtio: VirtioState,
    interrupt_status: u32,
}

impl MmioTransport {
    /// Read the device-specific configuration space (a net device's MAC at offset 0).
    pub fn read_device_config(&self, offset: u64, data: &mut [u8]) {
        self.common.read_device_config(offset, data);
    }

    /// Stop the device's worker: no request in flight, guest memory still.
    pub fn quiesce(&mut self) {
        self.common.quiesce();
    }

    /// Start the device again (after [`MmioTransport::quiesce`] or a restore).
    pub fn resume(&mut self) -> Result<()> {
        self.common.resume(self.interrupt.clone())
    }

    /// The state of a quiesced device.
    pub fn save_state(&self) -> MmioTransportState {
        MmioTransportState {
            virtio: self.common.save_state(),
            interrupt_status: self.interrupt.status.load(Ordering::Acquire),
        }
    }

    /// Load a saved state into this device (built the same way); then
    /// [`MmioTransport::resume`] it.
    pub fn restore_state(&mut self, s: &MmioTransportState) -> Result<()> {
        self.common.restore_state(&s.virtio)?;
        self.interrupt
            .status
            .store(s.interrupt_status, Ordering::Release);
        Ok(())
    }
}
