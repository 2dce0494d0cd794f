//! Descriptor chains as the guest hands them over, checked before any device touches them.
//!
//! virtio-queue's chain iterator stops silently on a loop, an out-of-range `next`, a
//! descriptor it cannot read or a length overflow. [`Chain::parse`] turns each of those into
//! an error, checks every buffer lies wholly in guest memory and that readable buffers come
//! before writable ones; [`GuestBufs`] then reads and writes the buffers with bounds checks.

use std::num::Wrapping;

use kvmbox_cpu::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::device::{VirtioInterrupt, VirtioInterruptType};
use crate::metrics::DeviceMetrics;

/// Why a descriptor chain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain has no descriptors (bad head, or a broken indirect table).
    #[error("empty descriptor chain")]
    Empty,
    /// The chain does not end: it loops, a `next` is out of range, a descriptor is unreadable
    /// or the total length passes 4 GiB.
    #[error("descriptor chain does not terminate properly")]
    Unterminated,
    /// The chain has more descriptors than the queue has entries (an indirect table may not
    /// make it longer: virtio 1.2, 2.7.5.3.1).
    #[error("descriptor chain longer than the queue size ({0})")]
    TooLong(u16),
    /// A buffer's address plus length overflows.
    #[error("descriptor buffer {0:#x}+{1:#x} overflows")]
    Overflow(u64, u32),
    /// A buffer lies (partly) outside guest memory.
    #[error("descriptor buffer {0:#x}+{1:#x} is outside guest memory")]
    OutsideMemory(u64, u32),
    /// A device-readable buffer follows a device-writable one.
    #[error("readable descriptor after a writable one")]
    Order,
    /// The request's shape is wrong for the device (too short, wrong direction, ...).
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// Guest memory access failed after validation (should not happen).
    #[error("guest memory access failed")]
    Memory,
}

/// One validated descriptor chain: its head index and its readable and writable buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Index of the head descriptor (returned in the used ring).
    pub head: u16,
    /// Device-readable buffers (address, length), in order.
    pub readable: Vec<(u64, u32)>,
    /// Device-writable buffers, in order.
    pub writable: Vec<(u64, u32)>,
}

impl Chain {
    /// Walk and validate `chain`, from a queue of `queue_size` entries, against `mem`.
    pub fn parse(
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        queue_size: u16,
    ) -> Result<Self, ChainError> {
        let head = chain.head_index();
        let mut readable = Vec::new();
        let mut writable = Vec::new();
        let mut last_has_next = false;
        let mut count = 0usize;
        for d in chain {
            count += 1;
            if count > usize::from(queue_size) {
                return Err(ChainError::TooLong(queue_size));
            }
            last_has_next = d.has_next();
            let (addr, len) = (d.addr().raw_value(), d.len());
            if addr.checked_add(u64::from(len)).is_none() {
                return Err(ChainError::Overflow(addr, len));
            }
            if len > 0 && !mem.check_range(GuestAddress(addr), len as usize) {
                return Err(ChainError::OutsideMemory(addr, len));
            }
            if d.is_write_only() {
                writable.push((addr, len));
            } else {
                if !writable.is_empty() {
                    return Err(ChainError::Order);
                }
                readable.push((addr, len));
            }
        }
        if count == 0 {
            return Err(ChainError::Empty);
        }
        if last_has_next {
            return Err(ChainError::Unterminated);
        }
        Ok(Self {
            head,
            readable,
            writable,
        })
    }

    /// The readable buffers as one stream.
    pub fn reader<'a>(&self, mem: &'a GuestMemoryMmap) -> GuestBufs<'a> {
        GuestBufs::new(mem, self.readable.clone())
    }

    /// The writable buffers as one stream.
    pub fn writer<'a>(&self, mem: &'a GuestMemoryMmap) -> GuestBufs<'a> {
        GuestBufs::new(mem, self.writable.clone())
    }
}

/// A cursor over a list of validated guest buffers.
pub struct GuestBufs<'a> {
    mem: &'a GuestMemoryMmap,
    segs: Vec<(u64, u32)>,
    idx: usize,
    off: u32,
    remaining: usize,
}

impl<'a> GuestBufs<'a> {
    fn new(mem: &'a GuestMemoryMmap, segs: Vec<(u64, u32)>) -> Self {
        let remaining = segs.iter().map(|s| s.1 as usize).sum();
        Self {
            mem,
            segs,
            idx: 0,
            off: 0,
            remaining,
        }
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// Visit the next `n` bytes (at most [`remaining`](Self::remaining)) as contiguous guest
    /// ranges, advancing past them.
    fn consume(
        &mut self,
        mut n: usize,
        mut f: impl FnMut(GuestAddress, usize) -> Result<(), ChainError>,
    ) -> Result<usize, ChainError> {
        n = n.min(self.remaining);
        let total = n;
        while n > 0 {
            let (addr, len) = self.segs[self.idx];
            let avail = (len - self.off) as usize;
            if avail == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let take = avail.min(n);
            f(GuestAddress(addr + u64::from(self.off)), take)?;
            self.off += take as u32;
            self.remaining -= take;
            n -= take;
        }
        Ok(total)
    }

    /// Copy guest bytes into `buf`; returns how many (short only at the end of the buffers).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, ChainError> {
        let mem = self.mem;
        let mut pos = 0;
        self.consume(buf.len(), |a, n| {
            mem.read_slice(&mut buf[pos..pos + n], a)
                .map_err(|_| ChainError::Memory)?;
            pos += n;
            Ok(())
        })
    }

    /// Fill `buf` completely or fail with `Malformed(what)`.
    pub fn read_exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), ChainError> {
        if self.remaining < buf.len() {
            return Err(ChainError::Malformed(what));
        }
        self.read(buf).map(|_| ())
    }

    /// Read a plain-data object.
    pub fn read_obj<T: ByteValued + Default>(
        &mut self,
        what: &'static str,
    ) -> Result<T, ChainError> {
        let mut v = T::default();
        self.read_exact(v.as_mut_slice(), what)?;
        Ok(v)
    }

    /// Copy `buf` into guest buffers; returns how many bytes fit.
    pub fn write(&mut self, buf: &[u8]) -> Result<usize, ChainError> {
        let mem = self.mem;
        let mut pos = 0;
        self.consume(buf.len(), |a, n| {
            mem.write_slice(&buf[pos..pos + n], a)
                .map_err(|_| ChainError::Memory)?;
            pos += n;
            Ok(())
        })
    }

    /// Write `n` zero bytes.
    pub fn write_zeroes(&mut self, n: usize) -> Result<usize, ChainError> {
        const Z: [u8; 4096] = [0; 4096];
        let mut done = 0;
        while done < n {
            let k = self.write(&Z[..(n - done).min(Z.len())])?;
            if k == 0 {
                break;
            }
            done += k;
        }
        Ok(done)
    }

    /// Skip `n` bytes.
    pub fn skip(&mut self, n: usize) -> usize {
        self.consume(n, |_, _| Ok(())).unwrap_or(0)
    }

    /// Split off the last `n` bytes into their own cursor (the status byte of a request).
    pub fn split_end(&mut self, n: usize) -> Option<GuestBufs<'a>> {
        if n > self.remaining {
            return None;
        }
        let keep = self.remaining - n;
        let mut head = Vec::new();
        let mut tail = Vec::new();
        let mut left = keep;
        let mut first = true;
        for &(addr, len) in &self.segs[self.idx..] {
            let (addr, len) = if first {
                first = false;
                (addr + u64::from(self.off), len - self.off)
            } else {
                (addr, len)
            };
            let h = (len as usize).min(left) as u32;
            if h > 0 {
                head.push((addr, h));
            }
            if h < len {
                tail.push((addr + u64::from(h), len - h));
            }
            left -= h as usize;
        }
        *self = GuestBufs::new(self.mem, head);
        Some(GuestBufs::new(self.mem, tail))
    }

    /// Hand the next `n` bytes to `f` as host memory ranges (guest address, host pointer,
    /// length) inside the guest mapping, for I/O system calls straight into or out of guest
    /// memory. Writes through the pointers bypass vm-memory's bitmap: the caller reports them
    /// with [`GuestBufs::mark_written`] once made.
    pub(crate) fn for_each_host_range(
        &mut self,
        n: usize,
        mut f: impl FnMut(GuestAddress, *mut u8, usize) -> Result<(), ChainError>,
    ) -> Result<usize, ChainError> {
        let mem = self.mem;
        self.consume(n, |a, len| {
            let mut at = a;
            for s in mem.get_slices(a, len) {
                let s = s.map_err(|_| ChainError::Memory)?;
                f(at, s.ptr_guard_mut().as_ptr(), s.len())?;
                at = at.unchecked_add(s.len() as u64);
            }
            Ok(())
        })
    }

    /// `len` bytes at `a` (a range [`GuestBufs::for_each_host_range`] gave) were written
    /// through a host pointer (even partly, by an I/O that failed): mark them in vm-memory's
    /// bitmap, for the dirty log and for code the software engine translated from them
    /// (`kvmbox_cpu::watch`). Marked after the write, so neither misses it.
    pub(crate) fn mark_written(&self, a: GuestAddress, len: usize) {
        for s in self.mem.get_slices(a, len).flatten() {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
}

/// The guest broke the queue protocol in a way that makes the whole queue unusable.
#[derive(Debug, thiserror::Error)]
#[error("virtqueue broken: {0}")]
pub struct QueueBroken(pub virtio_queue::Error);

/// Most chains one call of [`process_queue`] handles before yielding (it asks to be called
/// again by signalling the queue's eventfd), so a guest that keeps the queue full cannot keep
/// a worker from seeing its stop request.
pub const MAX_CHAINS_PER_PASS: usize = 1024;

/// A queue the guest broke: count it and ask the driver to reset the device (DEVICE_NEEDS_RESET
/// and a config interrupt). The device's worker stops serving it.
pub(crate) fn mark_broken(metrics: &DeviceMetrics, interrupt: &dyn VirtioInterrupt) {
    DeviceMetrics::add(&metrics.broken, 1);
    interrupt.set_needs_reset();
}

/// What a worker does after one [`process_queue`] pass: when the pass limit left work behind,
/// signal `evt` so the worker comes back to it after other events; when the queue is broken,
/// [`mark_broken`]. Returns whether the worker keeps serving the queue.
pub(crate) fn settle_pass(
    pass: Result<bool, QueueBroken>,
    evt: &vmm_sys_util::eventfd::EventFd,
    metrics: &DeviceMetrics,
    interrupt: &dyn VirtioInterrupt,
) -> bool {
    match pass {
        Ok(more) => {
            if more {
                // A full counter already means "come back": nothing is lost.
                let _ = evt.write(1);
            }
            true
        }
        Err(_) => {
            mark_broken(metrics, interrupt);
            false
        }
    }
}

/// Pop every available chain of `queue`, validate it and hand it to `handle`, which returns the
/// number of bytes it wrote into the chain's writable buffers (0 for a rejected chain: the chain
/// still goes back to the guest, so a bad request never stalls the queue). Raises the queue's
/// interrupt if the driver wants one. Returns whether more work is left (pass limit reached).
pub fn process_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    index: u16,
    handle: impl FnMut(Result<Chain, ChainError>) -> u32,
) -> Result<bool, QueueBroken> {
    process_queue_until(queue, mem, interrupt, index, handle, || false)
}

/// [`process_queue`] that also stops before the next chain once `stop` says so (a backend that
/// cannot take more yet); the chains left stay available, and the caller comes back when the
/// backend can take them.
pub fn process_queue_until(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    index: u16,
    mut handle: impl FnMut(Result<Chain, ChainError>) -> u32,
    stop: impl Fn() -> bool,
) -> Result<bool, QueueBroken> {
    process_queue_or_defer(queue, mem, interrupt, index, |c| Some(handle(c)), stop)
}

/// [`process_queue_until`] whose `handle` may also defer a chain (`None`: a rate limiter said
/// not yet): the chain goes back to the queue untouched, and the pass ends with notifications
/// off; the caller comes back when it may go on (its limiter's timer).
pub fn process_queue_or_defer(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    index: u16,
    mut handle: impl FnMut(Result<Chain, ChainError>) -> Option<u32>,
    stop: impl Fn() -> bool,
) -> Result<bool, QueueBroken> {
    process_queue_taking(
        queue,
        mem,
        interrupt,
        index,
        |c| handle(c).map_or(Handled::Defer, Handled::Used),
        stop,
    )
}

/// What a device did with one chain of a [`process_queue_taking`] pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Done: return the chain with this many bytes written into its writable buffers.
    Used(u32),
    /// Not yet (a rate limiter): the chain goes back to the queue untouched and the pass ends.
    Defer,
    /// Taken and still running elsewhere (an I/O thread): the device returns the chain to the
    /// used ring itself when it completes, in whatever order chains complete (virtio 1.2,
    /// 2.7.14). Every taken chain must be returned before the device is quiesced.
    Taken,
}

/// [`process_queue_or_defer`] whose `handle` may also keep a chain to complete later
/// ([`Handled::Taken`]).
pub fn process_queue_taking(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    index: u16,
    mut handle: impl FnMut(Result<Chain, ChainError>) -> Handled,
    stop: impl Fn() -> bool,
) -> Result<bool, QueueBroken> {
    let mut used = 0usize;
    let mut taken = 0usize;
    let mut more = false;
    let size = queue.size();
    'outer: loop {
        queue.disable_notification(mem).map_err(QueueBroken)?;
        loop {
            if used + taken >= MAX_CHAINS_PER_PASS {
                more = true;
                break 'outer;
            }
            if stop() {
                break 'outer;
            }
            let start = queue.next_avail();
            let next = queue.iter(mem).map_err(QueueBroken)?.next();
            let Some(chain) = next else { break };
            let head = chain.head_index();
            match handle(Chain::parse(chain, mem, size)) {
                Handled::Used(len) => {
                    queue.add_used(mem, head, len).map_err(QueueBroken)?;
                    used += 1;
                }
                Handled::Taken => taken += 1,
                Handled::Defer => {
                    queue.set_next_avail(start);
                    break 'outer;
                }
            }
        }
        if !queue.enable_notification(mem).map_err(QueueBroken)? {
            break;
        }
    }
    if used > 0 {
        notify_used(queue, mem, interrupt, index)?;
    }
    Ok(more)
}

/// Raise the queue's interrupt after chains were returned to its used ring, if the driver
/// wants one.
pub(crate) fn notify_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    index: u16,
) -> Result<(), QueueBroken> {
    if queue.needs_notification(mem).map_err(QueueBroken)? {
        // A lost interrupt is the guest's driver timing out, not a reason to stop the device.
        let _ = interrupt.trigger(VirtioInterruptType::Queue(index));
    }
    Ok(())
}

/// Whether the driver has made buffers available that were not processed yet.
pub fn has_available(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|i| i != Wrapping(queue.next_avail()))
}

/// A popped chain: validated, or why not.
pub type ParsedChain = Result<Chain, ChainError>;

/// Pop the next available chain (validated) with its head index, or `None` when the driver
/// has made nothing more available.
pub fn pop_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<Option<(u16, ParsedChain)>, QueueBroken> {
    let size = queue.size();
    let next = queue.iter(mem).map_err(QueueBroken)?.next();
    Ok(next.map(|c| (c.head_index(), Chain::parse(c, mem, size))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct CountInt(AtomicUsize);
    impl VirtioInterrupt for CountInt {
        fn trigger(&self, _kind: VirtioInterruptType) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn set_needs_reset(&self) {}
    }

    fn parse_first(mem: &GuestMemoryMmap, ring: &Ring) -> Result<Chain, ChainError> {
        let mut q = ring.queue();
        pop_chain(&mut q, mem).unwrap().unwrap().1
    }

    #[test]
    fn good_chain_with_indirect_table() {
        let m = mem();
        let mut r = Ring::new(&m, 0x1_0000, 8);
        // Indirect table at 0x20000 with a readable and a writable buffer.
        write_desc(&m, 0x2_0000, 0, 0x3_0000, 100, F_NEXT, 1);
        write_desc(&m, 0x2_0000, 1, 0x3_1000, 50, F_WRITE, 0);
        r.set_desc(&m, 0, 0x4_0000, 10, F_NEXT, 1);
        r.set_desc(&m, 1, 0x2_0000, 32, F_INDIRECT, 0);
        r.publish(&m, 0);
        let c = parse_first(&m, &r).unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(c.readable, vec![(0x4_0000, 10), (0x3_0000, 100)]);
        assert_eq!(c.writable, vec![(0x3_1000, 50)]);
    }

    #[test]
    fn looping_chain_is_rejected() {
        let m = mem();
        let mut r = Ring::new(&m, 0x1_0000, 8);
        r.set_desc(&m, 0, 0x3_0000, 16, F_NEXT, 1);
        r.set_desc(&m, 1, 0x3_0000, 16, F_NEXT, 0);
        r.publish(&m, 0);
        assert_eq!(parse_first(&m, &r), Err(ChainError::Unterminated));
    }

    #[test]
    fn indirect_chain_longer_than_the_queue_is_rejected() {
        let m = mem();
        let mut r = Ring::new(&m, 0x1_0000, 8);
        // An indirect table of 9 writable buffers behind an 8-entry queue.
        for i in 0..9u16 {
            let flags = if i < 8 { F_WRITE | F_NEXT } else { F_WRITE };
            write_desc(&m, 0x2_0000, i, 0x3_0000, 1, flags, i + 1);
        }
        r.set_desc(&m, 0, 0x2_0000, 9 * 16, F_INDIRECT, 0);
        r.publish(&m, 0);
        assert_eq!(parse_first(&m, &r), Err(ChainError::TooLong(8)));
        // Eight fit.
        let mut r = Ring::new(&m, 0x1_0000, 8);
        write_desc(&m, 0x2_0000, 7, 0x3_0000, 1, F_WRITE, 0);
        r.set_desc(&m, 0, 0x2_0000, 8 * 16, F_INDIRECT, 0);
        r.publish(&m, 0);
        assert_eq!(parse_first(&m, &r).unwrap().writable.len(), 8);
    }

    #[test]
    fn next_index_beyond_queue_size_is_rejected() {
        let m = mem();
        let mut r = Ring::new(&m, 0x1_0000, 8);
        r.set_desc(&m, 0, 0x3_0000, 16, F_NEXT, 200);
        r.publish(&m, 0);
        assert_eq!(parse_first(&m, &r), Err(ChainError::Unterminated));
    }

    #[test]
    fn buffer_outside_guest_memory_is_rejected() {
        let m = mem();
        let mut r = Ring::new(&m, 0x1_0000, 8);
        r.set_desc(&m, 0, MEM_SIZE as u64 - 8, 16, 0, 0);
        r.publish(&m, 0);
        assert_eq!(
            parse_first(&m, &r),
            Err(ChainError::OutsideMemory(MEM_SIZE as u64 - 8, 16))
        );
        let mut r = Ring::new(&m, 0x1_0000, 8);
        r.set_desc(&m, 0, 0xdead_0000_0000, 1, F_WRITE, 0);
        r.publish(&m, 0);
        assert!(matches!(
            parse_first(&m, &r),
            Err(ChainError::OutsideMemory(..))
        ));
    }

    #[test]
    fn address_overflow_is_rejected() {
        let m = mem();
        let mut r = Ring::new(&m, 0x1_0000, 8);
        r.set_desc(&m, 0, u64::MAX - 10, 100, 0, 0);
        r.publish(&m, 0);
        assert_eq!(
            parse_first(&m, &r),
            Err(ChainError::Overflow(u64::MAX - 10, 100))
        );
    }

    #[test]
    fn total_length_over_4gib_is_rejected() {
        let m = mem();
        let mut r = Ring::new(&m, 0x1_0000, 8);
        // Zero-length check passes memory; two huge lengths overflow the 32-bit total.
        r.set_desc(&m, 0, 0, u32::MAX, F_NEXT, 1);
        r.set_desc(&m, 1, 0, u32::MAX, 0, 0);
        r.publish(&m, 0);
        // The first buffer alone is already outside 16 MiB of memory.
        assert!(parse_first(&m, &r).is_err());
        let mut r = Ring::new(&m, 0x1_0000, 8);
        r.set_desc(&m, 0, 0x3_0000, 0x100, F_NEXT, 1);
        r.set_desc(&m, 1, 0x3_0000, u32::MAX - 0x10, 0, 0);
        r.publish(&m, 0);
        assert!(parse_first(&m, &r).is_err());
    }

    #[test]
    fn readable_after_writable_is_rejected() {
        let m = mem();
        let mut r = Ring::new(&m, 0x1_0000, 8);
        r.add_chain(&m, 0, &[(0x3_0000, 16, true), (0x3_1000, 16, false)]);
        assert_eq!(parse_first(&m, &r), Err(ChainError::Order));
    }

    #[test]
    fn broken_indirect_tables_are_rejected() {
        let m = mem();
        // Length not a multiple of 16.
        let mut r = Ring::new(&m, 0x1_0000, 8);
        r.set_desc(&m, 0, 0x2_0000, 17, F_INDIRECT, 0);
        r.publish(&m, 0);
        assert_eq!(parse_first(&m, &r), Err(ChainError::Empty));
        // Nested indirect descriptor.
        let mut r = Ring::new(&m, 0x1_0000, 8);
        write_desc(&m, 0x2_0000, 0, 0x2_1000, 16, F_INDIRECT, 0);
        r.set_desc(&m, 0, 0x2_0000, 16, F_INDIRECT, 0);
        r.publish(&m, 0);
        assert_eq!(parse_first(&m, &r), Err(ChainError::Empty));
        // Indirect table looping on itself.
        let mut r = Ring::new(&m, 0x1_0000, 8);
        write_desc(&m, 0x2_0000, 0, 0x3_0000, 16, F_NEXT, 1);
        write_desc(&m, 0x2_0000, 1, 0x3_0000, 16, F_NEXT, 0);
        r.set_desc(&m, 0, 0x2_0000, 32, F_INDIRECT, 0);
        r.publish(&m, 0);
        assert_eq!(parse_first(&m, &r), Err(ChainError::Unterminated));
        // Indirect table outside guest memory.
        let mut r = Ring::new(&m, 0x1_0000, 8);
        r.set_desc(&m, 0, MEM_SIZE as u64, 32, F_INDIRECT, 0);
        r.publish(&m, 0);
        assert_eq!(parse_first(&m, &r), Err(ChainError::Empty));
    }

    #[test]
    fn avail_index_beyond_queue_size_breaks_the_queue() {
        let m = mem();
        let mut r = Ring::new(&m, 0x1_0000, 8);
        let mut q = r.queue();
        r.add_chain(&m, 0, &[(0x3_0000, 16, true)]);
        r.set_avail_idx(&m, 9 + 1);
        let int = CountInt(AtomicUsize::new(0));
        let res = process_queue(&mut q, &m, &int, 0, |_| 0);
        assert!(matches!(
            res,
            Err(QueueBroken(virtio_queue::Error::InvalidAvailRingIndex))
        ));
    }

    #[test]
    fn process_queue_returns_rejected_chains_and_interrupts() {
        let m = mem();
        let mut r = Ring::new(&m, 0x1_0000, 8);
        let mut q = r.queue();
        r.add_chain(&m, 0, &[(0x3_0000, 16, true)]);
        r.set_desc(&m, 2, 0x3_0000, 16, F_NEXT, 2); // self loop
        r.publish(&m, 2);
        let int = CountInt(AtomicUsize::new(0));
        let mut seen = Vec::new();
        let more = process_queue(&mut q, &m, &int, 0, |c| {
            seen.push(c.is_ok());
            7
        })
        .unwrap();
        assert!(!more);
        assert_eq!(seen, vec![true, false]);
        assert_eq!(r.used_idx(&m), 2);
        assert_eq!(r.used_elem(&m, 0), (0, 7));
        assert_eq!(r.used_elem(&m, 1), (2, 7));
        assert_eq!(int.0.load(Ordering::SeqCst), 1);
        assert!(!has_available(&q, &m));
    }

    #[test]
    fn guest_bufs_cursor() {
        let m = mem();
        let c = Chain {
            head: 0,
            readable: vec![],
            writable: vec![(0x3_0000, 3), (0x3_1000, 0), (0x3_2000, 5)],
        };
        let mut w = c.writer(&m);
        assert_eq!(w.remaining(), 8);
        let mut status = w.split_end(1).unwrap();
        assert_eq!(w.remaining(), 7);
        assert_eq!(w.write(&[1, 2, 3, 4, 5, 6, 7, 8, 9]).unwrap(), 7);
        assert_eq!(status.write(&[0xee, 0xff]).unwrap(), 1);
        let mut b = [0u8; 5];
        m.read_slice(&mut b, GuestAddress(0x3_2000)).unwrap();
        assert_eq!(b, [4, 5, 6, 7, 0xee]);
        let mut r = Chain {
            head: 0,
            readable: c.writable.clone(),
            writable: vec![],
        }
        .reader(&m);
        assert_eq!(r.skip(2), 2);
        let mut out = [0u8; 4];
        r.read_exact(&mut out, "x").unwrap();
        assert_eq!(out, [3, 4, 5, 6]);
        assert!(r.read_exact(&mut out, "short").is_err());
        assert!(r.split_end(3).is_none());
    }
}
