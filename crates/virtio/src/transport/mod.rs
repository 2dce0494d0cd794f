//! The two ways a virtio device reaches the guest: virtio-mmio and virtio-pci (modern).
//! Both share the feature negotiation, status machine and queue activation in `common.rs`.

mod attach;
mod common;
pub mod mmio;
pub mod pci;

pub use attach::{attach_mmio, attach_pci};
pub use common::persist::VirtioState;
pub use mmio::persist::MmioTransportState;
pub use mmio::{cmdline_arg, MmioTransport, MMIO_WINDOW_SIZE};
pub use pci::persist::VirtioPciState;
pub use pci::VirtioPciDevice;

#[cfg(test)]
mod tests;
