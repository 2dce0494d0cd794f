//! The virtio-net worker: transmit queue to tap, tap to receive queue.

use std::sync::Arc;

use kvmbox_cpu::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use super::tap::Tap;
use crate::device::{VirtioInterrupt, VirtioInterruptType};
use crate::metrics::DeviceMetrics;
use crate::queue::{mark_broken, pop_chain, process_queue, Chain, ChainError, QueueBroken};
use crate::worker::{drain, set_watch, unwatch, EventHandler};

/// Bytes of the virtio-net header in front of every frame (virtio 1.x: with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame with header: a 64 KiB TSO packet plus Ethernet and virtio-net headers.
pub const MAX_FRAME: usize = 65562;

pub(crate) const RX_TOKEN: u64 = 0;
pub(crate) const TX_TOKEN: u64 = 1;
pub(crate) const TAP_TOKEN: u64 = 2;

pub(crate) struct NetHandler {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) rx: Queue,
    pub(crate) tx: Queue,
    pub(crate) rx_evt: EventFd,
    pub(crate) tx_evt: EventFd,
    pub(crate) tap: Arc<Tap>,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    /// A frame read from the tap, waiting for a receive buffer.
    pub(crate) frame: Vec<u8>,
    pub(crate) pending: Option<usize>,
    pub(crate) tap_watched: bool,
    /// VIRTIO_NET_F_MRG_RXBUF was negotiated.
    pub(crate) mrg_rxbuf: bool,
    /// Reading the tap failed for good.
    pub(crate) tap_dead: bool,
    pub(crate) metrics: Arc<DeviceMetrics>,
    pub(crate) tx_buf: Vec<u8>,
}

/// Gather a transmit chain (virtio-net header + frame, all device-readable) into `buf`.
/// Returns the number of bytes, header included.
pub fn parse_tx_frame(
    chain: &Chain,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
) -> Result<usize, ChainError> {
    if !chain.writable.is_empty() {
        return Err(ChainError::Malformed(
            "device-writable buffer in a transmit chain",
        ));
    }
    let mut r = chain.reader(mem);
    let len = r.remaining();
    if len < VNET_HDR_LEN {
        return Err(ChainError::Malformed(
            "transmit chain shorter than the virtio-net header",
        ));
    }
    if len > buf.len() {
        return Err(ChainError::Malformed("transmit frame larger than 64 KiB"));
    }
    r.read_exact(&mut buf[..len], "transmit frame")?;
    Ok(len)
}

/// Most guest buffers one transmit writev takes (the kernel's IOV_MAX); longer chains are
/// copied into a bounce buffer first.
const MAX_IOVECS: usize = 1024;

/// Send a transmit chain to the tap straight from guest memory (one writev: one frame).
/// Returns the frame length, or `None` when the chain has too many buffers for one writev.
fn send_zero_copy(
    tap: &Tap,
    chain: &Chain,
    mem: &GuestMemoryMmap,
) -> Result<Option<std::io::Result<usize>>, ChainError> {
    if !chain.writable.is_empty() {
        return Err(ChainError::Malformed(
            "device-writable buffer in a transmit chain",
        ));
    }
    let mut r = chain.reader(mem);
    let len = r.remaining();
    if len < VNET_HDR_LEN {
        return Err(ChainError::Malformed(
            "transmit chain shorter than the virtio-net header",
        ));
    }
    if len > MAX_FRAME {
        return Err(ChainError::Malformed("transmit frame larger than 64 KiB"));
    }
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(chain.readable.len());
    r.for_each_host_range(len, |p, n| {
        if n > 0 {
            iov.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: n,
            });
        }
        Ok(())
    })?;
    if iov.len() > MAX_IOVECS {
        return Ok(None);
    }
    Ok(Some(tap.write_iovecs(&iov).map(|_| len)))
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
        let (mem, tap, buf, m) = (&self.mem, &self.tap, &mut self.tx_buf, &*self.metrics);
        let more = process_queue(&mut self.tx, mem, &*self.interrupt, 1, |c| {
            DeviceMetrics::add(&m.requests, 1);
            let sent = c.and_then(|c| match send_zero_copy(tap, &c, mem)? {
                Some(r) => Ok(r),
                None => {
                    let n = parse_tx_frame(&c, mem, buf)?;
                    Ok(tap.write_frame(&buf[..n]).map(|_| n))
                }
            });
            match sent {
                Ok(Ok(n)) => DeviceMetrics::add(&m.bytes_out, n as u64),
                // A full tap queue drops the frame, as a congested link would.
                Ok(Err(_)) => DeviceMetrics::add(&m.errors, 1),
                Err(_) => DeviceMetrics::add(&m.rejected, 1),
            }
            0
        })?;
        if more {
            let _ = self.tx_evt.write(1);
        }
        Ok(())
    }

    fn rx_path(&mut self, epoll: &Epoll) -> Result<(), QueueBroken> {
        let mem = &self.mem;
        let mut used = false;
        self.rx.disable_notification(mem).map_err(QueueBroken)?;
        let mut budget = crate::queue::MAX_CHAINS_PER_PASS;
        loop {
            if budget == 0 {
                let _ = self.rx_evt.write(1);
                break;
            }
            let len = match self.pending {
                Some(n) => n,
                None if self.tap_dead => break,
                None => match self.tap.read_frame(&mut self.frame) {
                    Ok(n) if n > 0 => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    _ => {
                        // The interface is gone or broken. Stop reading it: a level-triggered
                        // epoll would otherwise report it ready forever.
                        DeviceMetrics::add(&self.metrics.errors, 1);
                        self.tap_dead = true;
                        self.tap_watched = false;
                        let _ = unwatch(epoll, self.tap_fd());
                        break;
                    }
                },
            };
            self.pending = Some(len);
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
                // Wait for the driver to add buffers before reading more from the tap.
                if self.tap_watched && set_watch(epoll, self.tap_fd(), TAP_TOKEN, false).is_ok() {
                    self.tap_watched = false;
                }
                break;
            };
            budget = budget.saturating_sub(usize::from(chains));
            used = true;
            self.pending = None;
        }
        if self.pending.is_none()
            && !self.tap_dead
            && !self.tap_watched
            && set_watch(epoll, self.tap_fd(), TAP_TOKEN, true).is_ok()
        {
            self.tap_watched = true;
        }
        if used && self.rx.needs_notification(mem).map_err(QueueBroken)? {
            let _ = self.interrupt.trigger(VirtioInterruptType::Queue(0));
        }
        Ok(())
    }

    fn tap_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&*self.tap)
    }
}

impl EventHandler for NetHandler {
    fn handle(&mut self, token: u64, epoll: &Epoll) -> bool {
        let r = match token {
            RX_TOKEN => {
                drain(&self.rx_evt);
                self.rx_path(epoll)
            }
            TX_TOKEN => {
                drain(&self.tx_evt);
                self.tx_path()
            }
            TAP_TOKEN => self.rx_path(epoll),
            _ => Ok(()),
        };
        if r.is_err() {
            mark_broken(&self.metrics, &*self.interrupt);
            return false;
        }
        true
    }
}
