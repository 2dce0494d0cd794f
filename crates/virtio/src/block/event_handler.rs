//! The virtio-blk worker: serve the request queue when it is notified.

use std::sync::Arc;

use kvmbox_cpu::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use super::request::{Disk, Request, RequestKind, S_OK};
use crate::device::VirtioInterrupt;
use crate::limiter::SharedLimiter;
use crate::metrics::DeviceMetrics;
use crate::queue::{process_queue_or_defer, settle_pass};
use crate::worker::{drain, EventHandler};

/// Epoll token of the request queue's eventfd.
pub(crate) const QUEUE_TOKEN: u64 = 0;
/// Epoll token of the rate limiter's timer.
pub(crate) const LIMITER_TOKEN: u64 = 1;

/// Worker state of one active virtio-blk device.
pub(crate) struct BlockHandler {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) queue: Queue,
    pub(crate) evt: EventFd,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) disk: Arc<Disk>,
    pub(crate) metrics: Arc<DeviceMetrics>,
    pub(crate) limiter: SharedLimiter,
}

impl BlockHandler {
    /// Serve everything available, as far as the rate limiter lets it: a request it holds
    /// back stays in the queue until the limiter's timer fires. False when the queue is broken.
    pub(crate) fn process(&mut self) -> bool {
        let (mem, disk, m) = (&self.mem, &self.disk, &*self.metrics);
        let mut rl = self.limiter.lock();
        rl.start_pass();
        let limited = !rl.is_unlimited();
        let handle =
            |chain: crate::queue::ParsedChain| match chain.and_then(|c| Request::parse(&c, mem)) {
                Ok(req) => {
                    let (kind, len) = (req.kind, req.data_len() as u64);
                    let bytes = match kind {
                        RequestKind::In | RequestKind::Out => len,
                        _ => 0,
                    };
                    if limited && !rl.consume(bytes) {
                        return None;
                    }
                    DeviceMetrics::add(&m.requests, 1);
                    let done = req.execute(disk);
                    match (done.status, kind) {
                        (S_OK, RequestKind::In) => DeviceMetrics::add(&m.bytes_in, len),
                        (S_OK, RequestKind::Out) => DeviceMetrics::add(&m.bytes_out, len),
                        (S_OK, _) => {}
                        _ => DeviceMetrics::add(&m.errors, 1),
                    }
                    Some(done.used)
                }
                Err(_) => {
                    DeviceMetrics::add(&m.requests, 1);
                    DeviceMetrics::add(&m.rejected, 1);
                    Some(0)
                }
            };
        let pass =
            process_queue_or_defer(&mut self.queue, mem, &*self.interrupt, 0, handle, || false);
        drop(rl);
        settle_pass(pass, &self.evt, &self.metrics, &*self.interrupt)
    }
}

impl EventHandler for BlockHandler {
    fn handle(&mut self, token: u64, _epoll: &Epoll) -> bool {
        if token == QUEUE_TOKEN {
            drain(&self.evt);
            return self.process();
        }
        if token == LIMITER_TOKEN {
            self.limiter.lock().on_timer();
            return self.process();
        }
        true
    }
}
