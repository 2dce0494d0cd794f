//! kvmbox PCI host bridge, configuration space, BARs and MSI-X.
//!
//! - [`PciConfiguration`]: one function's 256-byte type-0 configuration space: header, BARs
//!   with the sizing protocol, the capability list and the MSI-X capability.
//! - [`MsixConfig`]: an MSI-X table and pending-bit array, each vector an
//!   [`kvmbox_cpu::MsiLine`].
//! - [`PciDevice`]: what a device behind the root exposes (its configuration space); its BARs
//!   are answered through [`kvmbox_devices::BusDevice`].
//! - [`PciRoot`]: bus 0 with the host bridge at 00:00.0, BAR allocation in
//!   [`kvmbox_arch::layout::PCI_MMIO32_START`], and BAR relocation on the MMIO bus when the
//!   guest reprograms a BAR; [`PciConfigIo`] (ports 0xCF8/0xCFC) and [`PciConfigMmio`] (ECAM)
//!   are the two ways in; I/O BARs go in [`kvmbox_arch::layout::PCI_IO_START`]'s port window.
//! - [`PciTestDev`]: QEMU's pci-testdev as kvm-unit-tests use it (behind `--testdev`).

#![warn(missing_docs)]

mod config;
mod device;
mod msix;
mod root;
mod testdev;

pub use config::persist::PciConfigState;
pub use config::{
    BarKind, BarSpec, PciConfiguration, PciHeader, COMMAND_BUS_MASTER, COMMAND_IO_SPACE,
    COMMAND_MEMORY_SPACE, NUM_BARS,
};
pub use device::PciDevice;
pub use msix::persist::MsixState;
pub use msix::{MsixConfig, MSIX_PBA_ENTRY_SIZE, MSIX_TABLE_ENTRY_SIZE};
pub use root::{PciConfigIo, PciConfigMmio, PciRoot, HOST_BRIDGE_DEVICE_ID, HOST_BRIDGE_VENDOR_ID};
pub use testdev::{PciTestDev, PCI_TESTDEV_DEVICE_ID, PCI_TESTDEV_VENDOR_ID};

/// Errors from building PCI devices and the PCI root.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A saved state that does not fit this device.
    #[error("saved PCI state: {0}")]
    State(String),
    /// A BAR index outside 0..6, or the upper half of a 64-bit BAR already taken.
    #[error("BAR index {0} is invalid or already used")]
    BarIndex(usize),
    /// A BAR size that is not a power of two or is too small for its kind.
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes (4 for I/O)")]
    BarSize(u64),
    /// The capability list has no room for another capability.
    #[error("PCI configuration space has no room for a {0}-byte capability")]
    CapabilitySpace(usize),
    /// A malformed capability (shorter than its two header bytes, or oversized).
    #[error("malformed PCI capability of {0} bytes")]
    BadCapability(usize),
    /// The BAR window cannot fit another BAR of this size.
    #[error("PCI BAR window is full: no room for {0:#x} bytes")]
    WindowFull(u64),
    /// All 31 device slots of bus 0 are used.
    #[error("PCI bus 0 has no free device slot")]
    NoSlot,
    /// MSI-X needs between 1 and 2048 vectors.
    #[error("MSI-X vector count {0} is outside 1..=2048")]
    MsixVectors(usize),
    /// The device bus is gone (the VM is being torn down).
    #[error("the MMIO bus no longer exists")]
    BusGone,
    /// Inserting a BAR on the bus failed.
    #[error("mapping a BAR: {0}")]
    Bus(#[from] kvmbox_devices::BusError),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
