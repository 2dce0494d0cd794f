//! The virtio-rng device.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use super::event_handler::{RngHandler, QUEUE_TOKEN};
use crate::device::{ActivateContext, VirtioDevice};
use crate::metrics::DeviceMetrics;
use crate::worker::Worker;
use crate::{Error, Result, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, TYPE_RNG};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// An entropy device: fills each guest buffer from getrandom(2).
#[derive(Default)]
pub struct Rng {
    worker: Option<Worker>,
    metrics: Arc<DeviceMetrics>,
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> Self {
        Self::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << F_VERSION_1 | 1 << F_RING_EVENT_IDX | 1 << F_RING_INDIRECT_DESC
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<()> {
        self.reset();
        let Some((Some(queue), evt)) = ctx.queues.into_iter().next() else {
            return Err(Error::InvalidQueue(0));
        };
        let fd = evt.as_raw_fd();
        let handler = RngHandler {
            mem: ctx.mem,
            queue,
            evt,
            interrupt: Arc::clone(&ctx.interrupt),
            buf: vec![0; super::event_handler::MAX_REQUEST],
            metrics: self.metrics.clone(),
        };
        self.worker = Some(Worker::spawn(
            kvmbox_seccomp::ThreadKind::RngWorker,
            &[(fd, QUEUE_TOKEN)],
            handler,
        )?);
        Ok(())
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
}
