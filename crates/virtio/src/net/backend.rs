//! The seam between the virtio-net device and what carries its frames on the host: a TAP
//! interface ([`super::tap::Tap`]) or the user-mode network helper ([`super::user::Passt`]).
//!
//! The device's worker thread owns the queues and calls the backend for each frame; the
//! backend only moves frames. Every frame crossing this seam carries the 12-byte virtio-net
//! header in front ([`super::VNET_HDR_LEN`]).

use std::os::fd::RawFd;

use kvmbox_cpu::GuestMemoryMmap;

use crate::metrics::DeviceMetrics;
use crate::queue::{Chain, ChainError};

/// What carries a virtio-net device's frames on the host.
pub(crate) trait NetBackend: Send {
    /// The descriptor the worker waits on: readable when [`NetBackend::recv`] may have a
    /// frame, writable when [`NetBackend::flush`] may make progress.
    fn fd(&self) -> RawFd;

    /// The offload feature bits (`F_CSUM`, `F_GUEST_*`, `F_HOST_*`) this backend can honour.
    fn offload_features(&self) -> u64;

    /// The driver accepted `features`: set the backend up for them (before any frame moves).
    fn activate(&mut self, features: u64) -> std::io::Result<()>;

    /// Read one frame, virtio-net header included, into `buf` (at least
    /// [`super::MAX_FRAME`] bytes). `WouldBlock` when none is ready; `Ok(0)` or another error
    /// when the backend is gone for good. Malformed frames from the host side are dropped
    /// here and counted in `metrics.errors`.
    fn recv(&mut self, buf: &mut [u8], metrics: &DeviceMetrics) -> std::io::Result<usize>;

    /// Send the frame in transmit chain `chain` (header included). `scratch` is a
    /// [`super::MAX_FRAME`]-byte buffer the backend may gather into. The outer error rejects
    /// the chain as malformed; the inner one is a frame the host side refused (dropped).
    /// Returns the bytes taken from the chain.
    fn send(
        &mut self,
        chain: &Chain,
        mem: &GuestMemoryMmap,
        scratch: &mut [u8],
    ) -> Result<std::io::Result<usize>, ChainError>;

    /// Output is waiting for the descriptor to become writable: the worker sends no more
    /// frames until [`NetBackend::flush`] clears it.
    fn tx_blocked(&self) -> bool {
        false
    }

    /// Write out what is waiting (called when the descriptor is writable).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    /// Why the backend stopped, for the message that says the guest's link went down
    /// (called once, after `recv` reported the end).
    fn failure(&mut self) -> String;
}
