//! The virtio-net worker: transmit queue to the backend, backend to receive queue.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvmbox_cpu::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::NetBackend;
use super::device::lock;
use crate::device::{VirtioInterrupt, VirtioInterruptType};
use crate::limiter::SharedLimiter;
use crate::metrics::DeviceMetrics;
use crate::queue::{
    mark_broken, pop_chain, process_queue_or_defer, process_queue_until, Chain, ChainError,
    GuestBufs, QueueBroken,
};
use crate::worker::{drain, set_events, unwatch, EventHandler};

/// Bytes of the virtio-net header in front of every frame (virtio 1.x: with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame with header: a 64 KiB TSO packet plus Ethernet and virtio-net headers.
pub const MAX_FRAME: usize = 65562;

pub(crate) const RX_TOKEN: u64 = 0;
pub(crate) const TX_TOKEN: u64 = 1;
pub(crate) const BACKEND_TOKEN: u64 = 2;
pub(crate) const RX_LIMITER_TOKEN: u64 = 3;
pub(crate) const TX_LIMITER_TOKEN: u64 = 4;

pub(crate) struct NetHandler {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) rx: Queue,
    pub(crate) tx: Queue,
    pub(crate) rx_evt: EventFd,
    pub(crate) tx_evt: EventFd,
    pub(crate) backend: Arc<Mutex<Box<dyn NetBackend>>>,
    pub(crate) backend_fd: RawFd,
    /// The backend, for messages.
    pub(crate) label: String,
    /// The link status the guest reads; cleared when the backend ends.
    pub(crate) link_up: Arc<AtomicBool>,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    /// A frame read from the backend, waiting for a receive buffer.
    pub(crate) frame: Vec<u8>,
    pub(crate) pending: Option<usize>,
    /// Waiting for the backend to be readable (off while the receive queue is full).
    pub(crate) want_in: bool,
    /// What epoll watches the backend for (readable, writable); `None` once unwatched.
    pub(crate) watched: Option<(bool, bool)>,
    /// VIRTIO_NET_F_MRG_RXBUF was negotiated.
    pub(crate) mrg_rxbuf: bool,
    /// The backend failed for good.
    pub(crate) backend_dead: bool,
    pub(crate) metrics: Arc<DeviceMetrics>,
    pub(crate) tx_buf: Vec<u8>,
    /// Limits frames into the guest; a frame held back waits in `pending`.
    pub(crate) rx_limiter: SharedLimiter,
    /// Limits frames from the guest; a frame held back stays in the transmit queue.
    pub(crate) tx_limiter: SharedLimiter,
    /// The rx limiter already counted the pending frame (it waits for buffers only).
    pub(crate) pending_paid: bool,
}

/// The reader of a transmit chain, checked: device-readable buffers only, holding the
/// virtio-net header and at most `max` bytes in all.
pub(crate) fn tx_reader<'a>(
    chain: &Chain,
    mem: &'a GuestMemoryMmap,
    max: usize,
) -> Result<GuestBufs<'a>, ChainError> {
    if !chain.writable.is_empty() {
        return Err(ChainError::Malformed(
            "device-writable buffer in a transmit chain",
        ));
    }
    let r = chain.reader(mem);
    let len = r.remaining();
    if len < VNET_HDR_LEN {
        return Err(ChainError::Malformed(
            "transmit chain shorter than the virtio-net header",
        ));
    }
    if len > max {
        return Err(ChainError::Malformed("transmit frame larger than 64 KiB"));
    }
    Ok(r)
}

/// Gather a transmit chain (virtio-net header + frame, all device-readable) into `buf`.
/// Returns the number of bytes, header included.
pub fn parse_tx_frame(
    chain: &Chain,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
) -> Result<usize, ChainError> {
    let mut r = tx_reader(chain, mem, buf.len())?;
    let len = r.remaining();
    r.read_exact(&mut buf[..len], "transmit frame")?;
    Ok(len)
}

/// Copy a received frame (header included) into a receive chain; returns bytes written.
pub(crate) fn fill_rx_chain(
    chain: &Chain,
    mem: &GuestMemoryMmap,
    frame: &[u8],
) -> Result<u32, ChainError> {
    if !chain.readable.is_empty() {
        return Err(ChainError::Malformed(
            "device-readable buffer in a receive chain",
        ));
    }
    let mut w = chain.writer(mem);
    if w.remaining() < frame.len() {
        return Err(ChainError::Malformed(
            "receive buffer too small for the frame",
        ));
    }
    Ok(w.write(frame)? as u32)
}

/// What became of a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placed {
    /// The frame went into (or, if no chain could take it, was dropped with) this many chains,
    /// all now on the used ring.
    Done {
        /// Chains used.
        chains: u16,
    },
    /// Not enough receive buffers: nothing was consumed.
    NoBuffers,
}

fn writable_len(c: &Chain) -> u64 {
    c.writable.iter().map(|w| u64::from(w.1)).sum()
}

/// Put `frame` (virtio-net header included) into the receive queue. Without mergeable buffers
/// it takes one chain (dropping the frame if the chain is too small or malformed); with them
/// it spreads the frame over as many chains as needed and writes their count into the
/// header's `num_buffers`, or consumes nothing if the queue does not have enough room yet.
pub(crate) fn place_frame(
    rx: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    mrg_rxbuf: bool,
    metrics: &DeviceMetrics,
) -> Result<Placed, QueueBroken> {
    if !mrg_rxbuf {
        let Some((head, chain)) = pop_chain(rx, mem)? else {
            return Ok(Placed::NoBuffers);
        };
        if frame.len() >= VNET_HDR_LEN {
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
        }
        DeviceMetrics::add(&metrics.requests, 1);
        let written = match chain.and_then(|c| fill_rx_chain(&c, mem, frame)) {
            Ok(n) => {
                DeviceMetrics::add(&metrics.bytes_in, u64::from(n));
                n
            }
            Err(_) => {
                // The frame is dropped with the chain it did not fit.
                DeviceMetrics::add(&metrics.rejected, 1);
                0
            }
        };
        rx.add_used(mem, head, written).map_err(QueueBroken)?;
        return Ok(Placed::Done { chains: 1 });
    }
    let start = rx.next_avail();
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let mut room = 0u64;
    while room < frame.len() as u64 {
        if good.len() + bad.len() >= usize::from(rx.size()) {
            // The whole ring cannot hold this frame: drop it rather than wait forever.
            bad.extend(good.drain(..).map(|(h, _)| h));
            DeviceMetrics::add(&metrics.errors, 1);
            break;
        }
        match pop_chain(rx, mem)? {
            None => {
                rx.set_next_avail(start);
                return Ok(Placed::NoBuffers);
            }
            Some((head, Ok(c))) if c.readable.is_empty() && writable_len(&c) > 0 => {
                room += writable_len(&c);
                good.push((head, c));
            }
            Some((head, _)) => bad.push(head),
        }
    }
    if frame.len() >= VNET_HDR_LEN {
        frame[10..12].copy_from_slice(&(good.len() as u16).to_le_bytes());
    }
    let frame: &[u8] = if good.is_empty() { &[] } else { frame };
    let mut off = 0;
    for (head, c) in &good {
        let n = c.writer(mem).write(&frame[off..]).unwrap_or(0);
        off += n;
        rx.add_used(mem, *head, n as u32).map_err(QueueBroken)?;
    }
    for head in &bad {
        rx.add_used(mem, *head, 0).map_err(QueueBroken)?;
    }
    DeviceMetrics::add(&metrics.requests, (good.len() + bad.len()) as u64);
    DeviceMetrics::add(&metrics.rejected, bad.len() as u64);
    DeviceMetrics::add(&metrics.bytes_in, off as u64);
    Ok(Placed::Done {
        chains: (good.len() + bad.len()) as u16,
    })
}

impl NetHandler {
    fn tx_path(&mut self) -> Result<(), QueueBroken> {
        if self.backend_dead {
            // Frames go nowhere, but the guest gets its buffers back.
            let m = &*self.metrics;
            let more = process_queue_until(
                &mut self.tx,
                &self.mem,
                &*self.interrupt,
                1,
                |_| {
                    DeviceMetrics::add(&m.requests, 1);
                    DeviceMetrics::add(&m.errors, 1);
                    0
                },
                || false,
            )?;
            if more {
                let _ = self.tx_evt.write(1);
            }
            return Ok(());
        }
        let backend = self.backend.clone();
        let mut b = lock(&backend);
        let limiter = self.tx_limiter.clone();
        let mut rl = limiter.lock();
        rl.start_pass();
        let limited = !rl.is_unlimited();
        let (mem, buf, m) = (&self.mem, &mut self.tx_buf, &*self.metrics);
        let blocked = std::cell::Cell::new(b.tx_blocked());
        let more = process_queue_or_defer(
            &mut self.tx,
            mem,
            &*self.interrupt,
            1,
            |c| {
                if limited {
                    if let Ok(c) = &c {
                        let len: u64 = c.readable.iter().map(|r| u64::from(r.1)).sum();
                        if !rl.consume(len) {
                            return None;
                        }
                    }
                }
                DeviceMetrics::add(&m.requests, 1);
                match c.and_then(|c| b.send(&c, mem, buf)) {
                    Ok(Ok(n)) => DeviceMetrics::add(&m.bytes_out, n as u64),
                    // A refused frame is dropped, as a congested link would.
                    Ok(Err(_)) => DeviceMetrics::add(&m.errors, 1),
                    Err(_) => DeviceMetrics::add(&m.rejected, 1),
                }
                blocked.set(b.tx_blocked());
                Some(0)
            },
            || blocked.get(),
        )?;
        drop(rl);
        drop(b);
        if more {
            let _ = self.tx_evt.write(1);
        }
        Ok(())
    }

    fn rx_path(&mut self) -> Result<(), QueueBroken> {
        let mut used = false;
        self.rx
            .disable_notification(&self.mem)
            .map_err(QueueBroken)?;
        let mut budget = crate::queue::MAX_CHAINS_PER_PASS;
        let backend = self.backend.clone();
        self.rx_limiter.lock().start_pass();
        loop {
            if budget == 0 {
                let _ = self.rx_evt.write(1);
                break;
            }
            let len = match self.pending {
                Some(n) => n,
                None if self.backend_dead => break,
                None => {
                    // The guard must be gone before backend_died locks again.
                    let got = lock(&backend).recv(&mut self.frame, &self.metrics);
                    match got {
                        Ok(n) if n > 0 => n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        _ => {
                            self.backend_died();
                            break;
                        }
                    }
                }
            };
            self.pending = Some(len);
            if !self.pending_paid {
                let mut rl = self.rx_limiter.lock();
                if !rl.is_unlimited() && !rl.consume(len as u64) {
                    // Held back: the frame waits in `pending`, the backend is not read, and
                    // the limiter's timer brings the worker back.
                    self.want_in = false;
                    break;
                }
                self.pending_paid = true;
            }
            let mem = &self.mem;
            let placed = place_frame(
                &mut self.rx,
                mem,
                &mut self.frame[..len],
                self.mrg_rxbuf,
                &self.metrics,
            )?;
            let Placed::Done { chains } = placed else {
                if self.rx.enable_notification(mem).map_err(QueueBroken)? {
                    continue; // buffers arrived meanwhile
                }
                // Wait for the driver to add buffers before reading more from the backend.
                self.want_in = false;
                break;
            };
            budget = budget.saturating_sub(usize::from(chains));
            used = true;
            self.pending = None;
            self.pending_paid = false;
        }
        if self.pending.is_none() {
            self.want_in = true;
        }
        if used && self.rx.needs_notification(&self.mem).map_err(QueueBroken)? {
            let _ = self.interrupt.trigger(VirtioInterruptType::Queue(0));
        }
        Ok(())
    }

    /// The backend is gone for good (tap deleted, passt ended): stop watching it (a
    /// level-triggered epoll would report it ready forever), say so once, and take the guest's
    /// link down.
    fn backend_died(&mut self) {
        DeviceMetrics::add(&self.metrics.errors, 1);
        self.backend_dead = true;
        let why = lock(&self.backend).failure();
        if self.link_up.swap(false, Ordering::Relaxed) {
            eprintln!(
                "kvmbox: virtio-net ({}): {why}; the guest's link is down",
                self.label
            );
            let _ = self.interrupt.trigger(VirtioInterruptType::Config);
        }
    }

    /// Write out what the backend holds; true when that unblocked it (transmitting resumes).
    fn flush_backend(&mut self) -> bool {
        let mut b = lock(&self.backend);
        if !b.tx_blocked() {
            return false;
        }
        if b.flush().is_err() {
            DeviceMetrics::add(&self.metrics.errors, 1);
        }
        !b.tx_blocked()
    }

    /// Bring epoll's interest in the backend in line with what the worker waits for:
    /// readable unless the receive queue is full, writable while output waits.
    fn update_watch(&mut self, epoll: &Epoll) {
        let want = (!self.backend_dead).then(|| (self.want_in, lock(&self.backend).tx_blocked()));
        if want == self.watched {
            return;
        }
        let _ = match want {
            None => unwatch(epoll, self.backend_fd),
            Some((i, o)) => {
                let mut set = EventSet::empty();
                if i {
                    set |= EventSet::IN;
                }
                if o {
                    set |= EventSet::OUT;
                }
                set_events(epoll, self.backend_fd, BACKEND_TOKEN, set)
            }
        };
        self.watched = want;
    }
}

impl EventHandler for NetHandler {
    fn handle(&mut self, token: u64, epoll: &Epoll) -> bool {
        let r = match token {
            RX_TOKEN => {
                drain(&self.rx_evt);
                self.rx_path()
            }
            TX_TOKEN => {
                drain(&self.tx_evt);
                self.tx_path()
            }
            BACKEND_TOKEN => {
                // Readable, writable, or both: the level-triggered epoll says again if needed.
                let r = if self.flush_backend() {
                    self.tx_path()
                } else {
                    Ok(())
                };
                r.and_then(|()| self.rx_path())
            }
            RX_LIMITER_TOKEN => {
                self.rx_limiter.lock().on_timer();
                self.rx_path()
            }
            TX_LIMITER_TOKEN => {
                self.tx_limiter.lock().on_timer();
                self.tx_path()
            }
            _ => Ok(()),
        };
        if r.is_err() {
            mark_broken(&self.metrics, &*self.interrupt);
            return false;
        }
        self.update_watch(epoll);
        true
    }
}
