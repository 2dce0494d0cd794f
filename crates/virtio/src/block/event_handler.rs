//! The virtio-blk worker: serve the request queue when it is notified.

use std::sync::Arc;

use kvmbox_cpu::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use super::io_pool::{Done, IoPool, Job, POOL_MIN_BYTES};
use super::request::{Disk, Request, RequestKind, S_OK};
use crate::device::VirtioInterrupt;
use crate::limiter::SharedLimiter;
use crate::metrics::DeviceMetrics;
use crate::queue::{mark_broken, notify_used, process_queue_taking, settle_pass, Handled};
use crate::worker::{drain, EventHandler};

/// Epoll token of the request queue's eventfd.
pub(crate) const QUEUE_TOKEN: u64 = 0;
/// Epoll token of the rate limiter's timer.
pub(crate) const LIMITER_TOKEN: u64 = 1;
/// Epoll token of the I/O threads' finished-jobs eventfd.
pub(crate) const DONE_TOKEN: u64 = 2;

/// Worker state of one active virtio-blk device.
pub(crate) struct BlockHandler {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) queue: Queue,
    pub(crate) evt: EventFd,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) disk: Arc<Disk>,
    pub(crate) metrics: Arc<DeviceMetrics>,
    pub(crate) limiter: SharedLimiter,
    /// The I/O threads large reads and writes run on.
    pub(crate) pool: IoPool,
    /// The guest broke the queue: nothing more goes to its used ring.
    pub(crate) broken: bool,
}

impl BlockHandler {
    /// Serve everything available, as far as the rate limiter lets it: a request it holds
    /// back stays in the queue until the limiter's timer fires. False when the queue is broken.
    pub(crate) fn process(&mut self) -> bool {
        let (mem, disk, m, pool) = (&self.mem, &self.disk, &*self.metrics, &self.pool);
        let mut rl = self.limiter.lock();
        rl.start_pass();
        let limited = !rl.is_unlimited();
        let mut finished = Vec::new();
        let handle = |chain: crate::queue::ParsedChain| {
            let parsed = chain.and_then(|c| Request::parse(&c, mem).map(|r| (r, c)));
            match parsed {
                Ok((req, chain)) => {
                    let (kind, len) = (req.kind, req.data_len() as u64);
                    let bytes = match kind {
                        RequestKind::In | RequestKind::Out => len,
                        _ => 0,
                    };
                    if limited && !rl.consume(bytes) {
                        return Handled::Defer;
                    }
                    DeviceMetrics::add(&m.requests, 1);
                    let transfer = matches!(kind, RequestKind::In | RequestKind::Out);
                    if transfer && req.data_len() >= POOL_MIN_BYTES {
                        pool.submit(Job {
                            head: chain.head,
                            chain,
                            kind,
                            sector: req.sector,
                        });
                        return Handled::Taken;
                    }
                    if kind == RequestKind::Flush {
                        // A flush covers every write taken before it, finished or not.
                        finished.extend(pool.wait_all());
                    }
                    let done = req.execute(disk);
                    count(m, kind, len, done.status);
                    Handled::Used(done.used)
                }
                Err(_) => {
                    DeviceMetrics::add(&m.requests, 1);
                    DeviceMetrics::add(&m.rejected, 1);
                    Handled::Used(0)
                }
            }
        };
        let pass =
            process_queue_taking(&mut self.queue, mem, &*self.interrupt, 0, handle, || false);
        drop(rl);
        let ok = settle_pass(pass, &self.evt, &self.metrics, &*self.interrupt);
        self.broken |= !ok;
        self.complete(finished) && ok
    }

    /// Return finished jobs of the I/O threads to the used ring (and interrupt the guest if it
    /// wants). False when the queue is broken.
    fn complete(&mut self, done: Vec<Done>) -> bool {
        if done.is_empty() || self.broken {
            return !self.broken;
        }
        let m = &*self.metrics;
        let mut returned = || {
            for d in &done {
                count(m, d.kind, d.len, d.completion.status);
                self.queue
                    .add_used(&self.mem, d.head, d.completion.used)
                    .map_err(crate::queue::QueueBroken)?;
            }
            notify_used(&mut self.queue, &self.mem, &*self.interrupt, 0)
        };
        let ok = match returned() {
            Ok(()) => true,
            Err(crate::queue::QueueBroken(_)) => {
                mark_broken(&self.metrics, &*self.interrupt);
                false
            }
        };
        self.broken |= !ok;
        ok
    }
}

/// Count a finished request in the device's metrics.
fn count(m: &DeviceMetrics, kind: RequestKind, len: u64, status: u8) {
    match (status, kind) {
        (S_OK, RequestKind::In) => DeviceMetrics::add(&m.bytes_in, len),
        (S_OK, RequestKind::Out) => DeviceMetrics::add(&m.bytes_out, len),
        (S_OK, _) => {}
        _ => DeviceMetrics::add(&m.errors, 1),
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
        if token == DONE_TOKEN {
            self.pool.drain_done_evt();
            let done = self.pool.take_done();
            return self.complete(done);
        }
        true
    }

    /// The worker stops (quiesce, reset, a broken queue): every request still on the I/O
    /// threads finishes and goes back to the used ring, so no request is in flight and the
    /// used ring's index is where the queue stands (what a saved snapshot records).
    fn finish(&mut self) {
        let done = self.pool.wait_all();
        self.complete(done);
    }
}
