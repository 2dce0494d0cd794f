//! kvmbox virtio transports (PCI, MMIO) and devices (block, net, rng, vsock).
//!
//! - [`VirtioDevice`]: what every device model implements (type, features, config space,
//!   activate with queues and an interrupt, reset).
//! - [`VirtioInterrupt`]: how a device signals the guest; the transport turns it into an
//!   MSI-X vector, a level INTx line with the ISR register, or a virtio-mmio edge interrupt.
//! - Transports: [`transport::MmioTransport`] (virtio-mmio v2) and
//!   [`transport::VirtioPciDevice`] (virtio-pci modern), both [`kvmbox_devices::BusDevice`]s.
//! - Devices: [`block::Block`] (raw image file), [`net::Net`] (TAP), [`rng::Rng`] (getrandom),
//!   [`vsock::Vsock`] (Unix sockets on the host).
//!   Each active device runs one worker thread that waits on its queue eventfds (signalled by
//!   KVM ioeventfd or by the transport on a notify write) and its backend.
//!
//! The guest is hostile: [`queue`] validates every descriptor chain before a device reads it.

#![warn(missing_docs)]

pub mod block;
mod device;
#[doc(hidden)]
pub mod fuzzing;
mod limiter;
mod metrics;
pub mod net;
pub mod queue;
pub mod rng;
pub mod transport;
pub mod vsock;
mod worker;

#[cfg(test)]
mod test_util;

pub use device::{ActivateContext, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
pub use limiter::SharedLimiter;
pub use metrics::DeviceMetrics;

/// virtio device type: network card.
pub const TYPE_NET: u32 = 1;
/// virtio device type: block device.
pub const TYPE_BLOCK: u32 = 2;
/// virtio device type: entropy source.
pub const TYPE_RNG: u32 = 4;
/// virtio device type: socket (vsock).
pub const TYPE_VSOCK: u32 = 19;

/// Feature bit: indirect descriptors.
pub const F_RING_INDIRECT_DESC: u32 = 28;
/// Feature bit: used/avail event index notification suppression.
pub const F_RING_EVENT_IDX: u32 = 29;
/// Feature bit: virtio 1.x compliance (required by both transports here).
pub const F_VERSION_1: u32 = 32;

/// Device status: the guest noticed the device.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
/// Device status: the guest has a driver.
pub const STATUS_DRIVER: u8 = 2;
/// Device status: the driver is ready; queues go live.
pub const STATUS_DRIVER_OK: u8 = 4;
/// Device status: feature negotiation is complete.
pub const STATUS_FEATURES_OK: u8 = 8;
/// Device status: the device hit an error and needs a reset.
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 64;
/// Device status: the driver gave up.
pub const STATUS_FAILED: u8 = 128;

/// Errors of the virtio devices and transports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or using a device's backing file failed.
    #[error("{what} '{path}': {source}")]
    Backend {
        /// What was being done.
        what: &'static str,
        /// The file or interface.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A saved device state that does not fit this device.
    #[error("saved virtio state: {0}")]
    State(String),
    /// A user-supplied device option is wrong.
    #[error("{0}")]
    Config(String),
    /// Creating an eventfd, epoll or thread failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The guest set up a queue the device cannot use.
    #[error("queue {0} is not usable (size, alignment or not in guest memory)")]
    InvalidQueue(usize),
    /// The transport was given the wrong number of MSI-X lines.
    #[error("device needs {need} MSI-X vectors, got {got}")]
    MsixVectors {
        /// Vectors needed (queues + 1).
        need: usize,
        /// Lines supplied.
        got: usize,
    },
    /// Building the PCI function failed.
    #[error("PCI: {0}")]
    Pci(#[from] kvmbox_pci::Error),
    /// A virtqueue operation failed.
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// The VM backend refused an interrupt line, MSI route or ioeventfd.
    #[error("VM backend: {0}")]
    Vm(#[from] kvmbox_cpu::Error),
    /// Inserting the transport on the MMIO bus failed.
    #[error("MMIO bus: {0}")]
    Bus(#[from] kvmbox_devices::BusError),
    /// Opening a disk image failed.
    #[error(transparent)]
    Block(#[from] kvmbox_block::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Os { what, source }
}
