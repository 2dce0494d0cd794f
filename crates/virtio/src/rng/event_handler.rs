//! The virtio-rng worker.

use std::sync::Arc;

use kvmbox_cpu::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use crate::device::VirtioInterrupt;
use crate::metrics::DeviceMetrics;
use crate::queue::{process_queue, settle_pass, Chain, ChainError};
use crate::worker::{drain, EventHandler};

pub(crate) const QUEUE_TOKEN: u64 = 0;
/// Most random bytes given for one request.
pub(crate) const MAX_REQUEST: usize = 64 * 1024;

pub(crate) struct RngHandler {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) queue: Queue,
    pub(crate) evt: EventFd,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) buf: Vec<u8>,
    pub(crate) metrics: Arc<DeviceMetrics>,
}

/// Fill `buf` from getrandom(2).
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let r = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += r as usize;
    }
    Ok(())
}

/// Serve one entropy request: fill the chain's writable buffers (up to [`MAX_REQUEST`]).
pub(crate) fn fill(
    chain: Result<Chain, ChainError>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
) -> Result<u32, ChainError> {
    let chain = chain?;
    if !chain.readable.is_empty() {
        return Err(ChainError::Malformed(
            "device-readable buffer in an entropy request",
        ));
    }
    let mut w = chain.writer(mem);
    let n = w.remaining().min(buf.len());
    getrandom(&mut buf[..n]).map_err(|_| ChainError::Memory)?;
    let written = w.write(&buf[..n])?;
    Ok(written as u32)
}

impl EventHandler for RngHandler {
    fn handle(&mut self, token: u64, _epoll: &Epoll) -> bool {
        if token != QUEUE_TOKEN {
            return true;
        }
        drain(&self.evt);
        let (mem, buf, m) = (&self.mem, &mut self.buf, &*self.metrics);
        let pass = process_queue(&mut self.queue, mem, &*self.interrupt, 0, |c| {
            DeviceMetrics::add(&m.requests, 1);
            match fill(c, mem, buf) {
                Ok(n) => {
                    DeviceMetrics::add(&m.bytes_in, u64::from(n));
                    n
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
