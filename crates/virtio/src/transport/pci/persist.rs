//! A virtio-pci function's state: configuration space, MSI-X table, vector assignments, ISR
//! and the virtio state behind them.

use super::*;
use crate::transport::common::persist::VirtioState;
use kvmbox_pci::{MsixState, PciConfigState};
use serde::{Deserialize, Serialize};

/// Everything the guest can observe of one virtio-pci device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    virtio: VirtioState,
    config: PciConfigState,
    msix: MsixState,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    isr: u32,
}

impl VirtioPciDevice {
    /// Read the device-specific configuration space (a net device's MAC at offset 0).
    pub fn read_device_config(&self, offset: u64, data: &mut [u8]) {
        self.common.read_device_config(offset, data);
    }

    /// Stop the device's worker: no request in flight, guest memory still.
    pub fn quiesce(&mut self) {
        self.common.quiesce();
    }

    /// Start the device again (after [`VirtioPciDevice::quiesce`] or a restore).
    pub fn resume(&mut self) -> Result<()> {
        self.common.resume(self.interrupt.clone())
    }

    /// The state of a quiesced device.
    pub fn save_state(&self) -> VirtioPciState {
        let i = &self.interrupt;
        VirtioPciState {
            virtio: self.common.save_state(),
            config: self.config.save_state(),
            msix: i
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save_state(),
            config_vector: i.config_vector.load(Ordering::Acquire),
            queue_vectors: i
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::Acquire))
                .collect(),
            isr: i.isr.load(Ordering::Acquire),
        }
    }

    /// Load a saved state into this device, which must be built the same way (type, queues,
    /// vectors). The caller remaps BARs ([`kvmbox_pci::PciRoot::remap_all`]) and then
    /// [`VirtioPciDevice::resume`]s it.
    pub fn restore_state(&mut self, s: &VirtioPciState) -> Result<()> {
        let i = &self.interrupt;
        if s.queue_vectors.len() != i.queue_vectors.len() {
            return Err(Error::State(format!(
                "{} queue vectors saved, the device has {}",
                s.queue_vectors.len(),
                i.queue_vectors.len()
            )));
        }
        let pci = |e: kvmbox_pci::Error| Error::State(e.to_string());
        i.msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_state(&s.msix)
            .map_err(pci)?;
        self.common.restore_state(&s.virtio)?;
        self.config.restore_state(&s.config).map_err(pci)?;
        i.config_vector.store(s.config_vector, Ordering::Release);
        for (v, &saved) in i.queue_vectors.iter().zip(&s.queue_vectors) {
            v.store(saved, Ordering::Release);
        }
        i.isr.store(s.isr, Ordering::Release);
        if let (Some(line), true) = (&i.intx, s.isr != 0) {
            // The level the guest had not yet acknowledged.
            line.set_level(true).map_err(crate::os("INTx"))?;
        }
        Ok(())
    }
}
