//! The device side of virtio: what every device model implements.

use std::sync::Arc;

use kvmbox_cpu::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::DeviceMetrics;
use crate::Result;

/// Which interrupt a device raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The configuration space changed (or the device needs a reset).
    Config,
    /// Queue `n` has new used buffers.
    Queue(u16),
}

/// How a device signals the guest. Implemented by each transport; called from device worker
/// threads.
pub trait VirtioInterrupt: Send + Sync {
    /// Raise `kind` (sets the ISR bit and fires the line, or sends the MSI-X vector).
    fn trigger(&self, kind: VirtioInterruptType) -> std::io::Result<()>;
    /// The device saw the guest break the virtqueue protocol and stopped: set
    /// DEVICE_NEEDS_RESET in the status register and raise a configuration interrupt.
    fn set_needs_reset(&self);
}

/// Everything a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Where to send interrupts.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Features the driver accepted.
    pub features: u64,
    /// One entry per queue the device declared: the queue as the driver set it up (`None` when
    /// the driver left it disabled) and the eventfd its notifications arrive on.
    pub queues: Vec<(Option<Queue>, EventFd)>,
}

/// A virtio device model, independent of the transport that exposes it.
pub trait VirtioDevice: Send {
    /// The virtio device type (1 net, 2 block, 4 rng, ...).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (bit 32, VERSION_1, always included by the device).
    fn features(&self) -> u64;
    /// Guest read of the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Guest write of the device-specific configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Start serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<()>;
    /// Stop serving the queues (joins the worker) and return to the pre-activation state.
    fn reset(&mut self);
    /// The device's counters (shared; they survive resets).
    fn metrics(&self) -> Arc<DeviceMetrics>;
}

/// Copy `data.len()` bytes of `config` at `offset` (all ones past its end).
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0xff);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..).map(|s| &s[..s.len().min(data.len())]) {
        data[..src.len()].copy_from_slice(src);
    }
}
