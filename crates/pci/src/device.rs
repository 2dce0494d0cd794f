//! What a function behind the PCI root exposes.

use crate::config::PciConfiguration;

/// A PCI function. Its configuration space is reached through [`crate::PciRoot`]; its BARs
/// through the [`kvmbox_devices::BusDevice`] the root inserts at each BAR's address (the
/// `base` argument of `BusDevice::read`/`write` is the BAR's current address).
pub trait PciDevice: Send {
    /// The configuration space.
    fn config(&self) -> &PciConfiguration;
    /// The configuration space, mutably.
    fn config_mut(&mut self) -> &mut PciConfiguration;
    /// Guest read of configuration space at byte `offset` (1, 2 or 4 bytes).
    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    /// Guest write of configuration space at byte `offset` (1, 2 or 4 bytes).
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config_mut().write(offset, data);
    }
}
