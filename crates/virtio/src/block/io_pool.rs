//! The I/O threads of one virtio-blk queue: large reads and writes run on them side by side,
//! so that a guest with several 1 MiB requests in flight has them copied between the page
//! cache and its memory by more than one thread (QEMU's `aio=threads` does the same), while
//! the queue's worker goes on taking requests. Completions come back to the worker (a list and
//! an eventfd), which alone returns chains to the used ring, in the order they complete
//! (virtio 1.2, 2.7.14).
//!
//! Requests of different kinds are independent in virtio (a driver that needs an order waits
//! for one completion before it makes the next request available). kvmbox keeps more order
//! than that: a flush waits on the worker until every request on the I/O threads has
//! finished, so it covers every write taken before it, answered or not. Flushes, discards,
//! write-zeroes, GET_ID and the small transfers (below [`POOL_MIN_BYTES`], cheaper served at
//! once than handed over: the 4 KiB path is as before) run on the worker, in queue order.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_seccomp::ThreadKind;
use vmm_sys_util::eventfd::EventFd;

use super::request::{Completion, Disk, Request, RequestKind, S_IOERR};
use crate::queue::Chain;
use crate::{os, Result};

/// Threads per queue: the page-cache copies of a 2-core host gain from a second copying
/// thread; more would only take CPU time from the guest's vCPUs.
pub(crate) const IO_THREADS: usize = 2;
/// Reads and writes of at least this many bytes go to the I/O threads.
pub(crate) const POOL_MIN_BYTES: usize = 64 << 10;

/// A request the worker has taken from the queue, parsed and let through its rate limiter.
pub(crate) struct Job {
    /// Head of its chain, for the used ring.
    pub(crate) head: u16,
    /// Its validated buffers.
    pub(crate) chain: Chain,
    /// Its header as the worker read it.
    pub(crate) kind: RequestKind,
    pub(crate) sector: u64,
}

/// A finished [`Job`].
pub(crate) struct Done {
    pub(crate) head: u16,
    pub(crate) kind: RequestKind,
    /// Data bytes the request asked for.
    pub(crate) len: u64,
    pub(crate) completion: Completion,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    done: Vec<Done>,
    /// Jobs submitted whose [`Done`] was not yet taken by the worker.
    outstanding: usize,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// A job arrived, or the pool stops.
    work: Condvar,
    /// A job finished.
    finished: Condvar,
    /// Written after every finished job: the worker's epoll waits on it.
    done_evt: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The I/O threads of one active queue. Dropping the pool lets its threads finish every job
/// submitted, then joins them.
pub(crate) struct IoPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl IoPool {
    /// Start [`IO_THREADS`] threads (`ThreadKind::BlockIo`) serving `disk` in `mem`.
    pub(crate) fn start(mem: &GuestMemoryMmap, disk: &Arc<Disk>) -> Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            work: Condvar::new(),
            finished: Condvar::new(),
            done_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(os("eventfd"))?,
        });
        let mut pool = Self {
            shared,
            threads: Vec::with_capacity(IO_THREADS),
        };
        for _ in 0..IO_THREADS {
            let (shared, mem, disk) = (pool.shared.clone(), mem.clone(), disk.clone());
            let kind = ThreadKind::BlockIo;
            let t = std::thread::Builder::new()
                .name(kind.name().to_string())
                .spawn(move || {
                    kvmbox_seccomp::apply_or_exit(kind);
                    serve(&shared, &mem, &disk);
                })
                .map_err(os("spawning a virtio-blk I/O thread"))?;
            pool.threads.push(t);
        }
        Ok(pool)
    }

    /// The eventfd written after each finished job.
    pub(crate) fn done_fd(&self) -> RawFd {
        self.shared.done_evt.as_raw_fd()
    }

    /// Clear the eventfd of finished jobs (before [`IoPool::take_done`]).
    pub(crate) fn drain_done_evt(&self) {
        let _ = self.shared.done_evt.read();
    }

    /// Hand `job` to a thread.
    pub(crate) fn submit(&self, job: Job) {
        let mut s = self.shared.lock();
        s.jobs.push_back(job);
        s.outstanding += 1;
        drop(s);
        self.shared.work.notify_one();
    }

    /// The jobs finished since the last call.
    pub(crate) fn take_done(&self) -> Vec<Done> {
        let mut s = self.shared.lock();
        let done = std::mem::take(&mut s.done);
        s.outstanding -= done.len();
        done
    }

    /// Wait until every submitted job has finished; returns those not taken yet. After it no
    /// thread of the pool touches guest memory until the next [`IoPool::submit`].
    pub(crate) fn wait_all(&self) -> Vec<Done> {
        let mut s = self.shared.lock();
        while s.done.len() < s.outstanding {
            s = self
                .shared
                .finished
                .wait(s)
                .unwrap_or_else(|e| e.into_inner());
        }
        let done = std::mem::take(&mut s.done);
        s.outstanding = 0;
        done
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One I/O thread: run jobs until the pool stops and none is left.
fn serve(shared: &Shared, mem: &GuestMemoryMmap, disk: &Disk) {
    loop {
        let job = {
            let mut s = shared.lock();
            loop {
                if let Some(j) = s.jobs.pop_front() {
                    break j;
                }
                if s.stop {
                    return;
                }
                s = shared.work.wait(s).unwrap_or_else(|e| e.into_inner());
            }
        };
        let (completion, len) = match Request::with_header(&job.chain, mem, job.kind, job.sector) {
            Ok(req) => {
                let len = req.data_len() as u64;
                (req.execute(disk), len)
            }
            // The worker parsed this chain already; its buffers are a copy, so this cannot
            // happen. Were it to, the chain goes back unanswered, as a rejected chain does.
            Err(_) => (
                Completion {
                    status: S_IOERR,
                    used: 0,
                },
                0,
            ),
        };
        shared.lock().done.push(Done {
            head: job.head,
            kind: job.kind,
            len,
            completion,
        });
        shared.finished.notify_all();
        // A full counter already wakes the worker: nothing is lost.
        let _ = shared.done_evt.write(1);
    }
}
