//! The virtio-blk worker: serve the request queue when it is notified.

use std::sync::Arc;

use kvmbox_cpu::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use super::request::{Disk, Request, RequestKind, S_OK};
use crate::device::VirtioInterrupt;
use crate::metrics::DeviceMetrics;
use crate::queue::{process_queue, settle_pass};
use crate::worker::{drain, EventHandler};

/// Epoll token of the request queue's eventfd.
pub(crate) const QUEUE_TOKEN: u64 = 0;

/// Worker state of one active virtio-blk device.
pub(crate) struct BlockHandler {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) queue: Queue,
    pub(crate) evt: EventFd,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) disk: Arc<Disk>,
    pub(crate) metrics: Arc<DeviceMetrics>,
}

impl BlockHandler {
    /// Serve everything available. False when the queue is broken.
    pub(crate) fn process(&mut self) -> bool {
        let (mem, disk, m) = (&self.mem, &self.disk, &*self.metrics);
        let pass = process_queue(&mut self.queue, mem, &*self.interrupt, 0, |chain| {
            DeviceMetrics::add(&m.requests, 1);
            match chain.and_then(|c| Request::parse(&c, mem)) {
                Ok(req) => {
                    let (kind, len) = (req.kind, req.data_len() as u64);
                    let done = req.execute(disk);
                    match (done.status, kind) {
                        (S_OK, RequestKind::In) => DeviceMetrics::add(&m.bytes_in, len),
                        (S_OK, RequestKind::Out) => DeviceMetrics::add(&m.bytes_out, len),
                        (S_OK, _) => {}
                        _ => DeviceMetrics::add(&m.errors, 1),
                    }
                    done.used
                }
                Err(_) => {
                    DeviceMetrics::add(&m.rejected, 1);
                    0
                }
            }
        });
        settle_pass(pass, &self.evt, &self.metrics, &*self.interrupt)
    }
}

impl EventHandler for BlockHandler {
    fn handle(&mut self, token: u64, _epoll: &Epoll) -> bool {
        if token == QUEUE_TOKEN {
            drain(&self.evt);
            return self.process();
        }
        true
    }
}
