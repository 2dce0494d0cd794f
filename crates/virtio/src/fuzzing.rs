//! Entry points the cargo-fuzz targets (`crates/virtio/fuzz`) and the randomized tests share:
//! each turns arbitrary bytes into a virtqueue in real guest memory and runs one device's
//! request parsing on it. None of them may panic, hang or touch memory outside the guest.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

use arbitrary::Unstructured;
use kvmbox_cpu::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::block::request::{Disk, Request};
use crate::device::{VirtioInterrupt, VirtioInterruptType};
use crate::net::{parse_tx_frame, MAX_FRAME};
use crate::queue::process_queue;

/// Guest memory size of a fuzz case.
pub const FUZZ_MEM: u64 = 1 << 20;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUFS: u64 = 0x3000;

/// Counts interrupts; the fuzz targets only need somewhere to send them.
#[derive(Default)]
struct NullInterrupt(AtomicUsize);

impl VirtioInterrupt for NullInterrupt {
    fn trigger(&self, _kind: VirtioInterruptType) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn set_needs_reset(&self) {}
}

/// Build guest memory and a ready queue from `data`: queue size, descriptors (addresses
/// mostly inside memory, some outside or near `u64::MAX`), avail ring, then buffer contents.
fn build(data: &[u8]) -> (GuestMemoryMmap, Queue) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), FUZZ_MEM as usize)])
        .expect("fuzz guest memory");
    // Integer draws pad a short input with zeros and never fail, so the queue is always
    // complete (`1` only if that ever changed).
    let size = fill_queue(&mut Unstructured::new(data), &mem).unwrap_or(1);
    let mut q = Queue::new(256).expect("queue");
    q.set_size(size);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    (mem, q)
}

/// Write the descriptor table, the avail ring and the buffers of [`build`]; returns the
/// queue size.
fn fill_queue(u: &mut Unstructured, mem: &GuestMemoryMmap) -> arbitrary::Result<u16> {
    let size = 1u16 << (u.arbitrary::<u8>()? % 9);
    for i in 0..u64::from(size) {
        let sel: u8 = u.arbitrary()?;
        let addr = if sel & 0x80 != 0 {
            u64::MAX - u64::from(u.arbitrary::<u16>()?)
        } else {
            u64::from(u.arbitrary::<u32>()?) % (FUZZ_MEM + FUZZ_MEM / 4)
        };
        let len = if sel & 0x40 != 0 {
            u.arbitrary::<u32>()?
        } else {
            u32::from(u.arbitrary::<u16>()?)
        };
        let flags = u16::from(sel & 0x7);
        let next = u.arbitrary::<u16>()? % (size + 4);
        let a = GuestAddress(DESC + 16 * i);
        let _ = mem.write_obj(addr, a);
        let _ = mem.write_obj(len, GuestAddress(a.0 + 8));
        let _ = mem.write_obj(flags, GuestAddress(a.0 + 12));
        let _ = mem.write_obj(next, GuestAddress(a.0 + 14));
    }
    let avail_idx = u16::from(u.arbitrary::<u8>()?) % (2 * size + 2);
    for i in 0..u64::from(size) {
        let head = u.arbitrary::<u16>()? % (size + 4);
        let _ = mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * i));
    }
    let _ = mem.write_obj(avail_idx, GuestAddress(AVAIL + 2));
    // Whatever is left becomes buffer contents (request headers, frames), repeated.
    let rest = u.bytes(u.len())?;
    if !rest.is_empty() {
        let pattern: Vec<u8> = rest.iter().copied().cycle().take(0x1_0000).collect();
        let mut at = BUFS;
        while at < FUZZ_MEM {
            let n = pattern.len().min((FUZZ_MEM - at) as usize);
            let _ = mem.write_slice(&pattern[..n], GuestAddress(at));
            at += n as u64;
        }
    }
    Ok(size)
}

fn memfd_disk(sectors: u64, read_only: bool) -> Disk {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"kvmbox-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor we own.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(sectors * 512).expect("memfd size");
    Disk {
        backend: std::sync::Arc::new(kvmbox_block::RawBackend::new(
            file,
            sectors * 512,
            read_only,
            false,
        )),
        capacity: sectors,
        read_only,
        id: *b"fuzz-disk-serial-000",
    }
}

/// Pop and validate every chain of a fuzzed queue.
pub fn virtqueue(data: &[u8]) {
    let (mem, mut q) = build(data);
    let int = NullInterrupt::default();
    let _ = process_queue(&mut q, &mem, &int, 0, |c| {
        if let Ok(c) = c {
            let mut r = c.reader(&mem);
            let mut buf = [0u8; 256];
            let _ = r.read(&mut buf);
            let mut w = c.writer(&mem);
            let _ = w.write_zeroes(300);
        }
        0
    });
}

/// Run a fuzzed queue of virtio-blk requests against a 64-sector in-memory disk. Returns
/// how many requests parsed and ran.
pub fn block_request(data: &[u8]) -> usize {
    let read_only = data.first().is_some_and(|b| b & 0x80 != 0);
    let disk = memfd_disk(64, read_only);
    let (mem, mut q) = build(data);
    let int = NullInterrupt::default();
    let mut ran = 0;
    let _ = process_queue(&mut q, &mem, &int, 0, |c| {
        match c.and_then(|c| Request::parse(&c, &mem)) {
            Ok(req) => {
                ran += 1;
                req.execute(&disk).used
            }
            Err(_) => 0,
        }
    });
    ran
}

/// Gather a fuzzed queue of virtio-net transmit chains.
pub fn net_tx(data: &[u8]) {
    let (mem, mut q) = build(data);
    let int = NullInterrupt::default();
    let mut buf = vec![0u8; MAX_FRAME];
    let _ = process_queue(&mut q, &mem, &int, 1, |c| {
        let _ = c.and_then(|c| parse_tx_frame(&c, &mem, &mut buf));
        0
    });
}

/// Deliver a frame (length from the first two bytes) into a fuzzed receive queue, with or
/// without mergeable buffers.
pub fn net_rx(data: &[u8]) {
    let (mem, mut q) = build(data);
    let len = usize::from(u16::from_le_bytes([
        data.first().copied().unwrap_or(0),
        data.get(1).copied().unwrap_or(0),
    ]));
    let mut frame = vec![0xa5u8; len.min(MAX_FRAME)];
    let mrg = data.get(2).is_some_and(|b| b & 1 != 0);
    let metrics = crate::metrics::DeviceMetrics::default();
    for _ in 0..4 {
        match crate::net::place_frame(&mut q, &mem, &mut frame, mrg, &metrics) {
            Ok(crate::net::Placed::Done { .. }) => {}
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    /// xorshift64: deterministic, so a failure names its case.
    fn cases(seed: u64, n: usize, mut f: impl FnMut(&[u8])) {
        let mut x = seed;
        let mut buf = Vec::new();
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 6000) as usize;
            buf.clear();
            let mut y = x;
            for _ in 0..len {
                y ^= y << 13;
                y ^= y >> 7;
                y ^= y << 17;
                buf.push(y as u8);
            }
            f(&buf);
        }
    }

    #[test]
    fn random_virtqueues() {
        cases(1, 300, super::virtqueue);
    }

    #[test]
    fn random_block_requests() {
        cases(2, 300, |d| {
            super::block_request(d);
        });
    }

    #[test]
    fn random_net_tx() {
        cases(3, 300, super::net_tx);
    }

    #[test]
    fn random_net_rx() {
        cases(4, 300, super::net_rx);
    }

    /// Structured cases: small queues whose descriptors point at real buffers with valid
    /// virtio-blk headers, so the random search reaches request execution, not just rejection.
    #[test]
    fn random_wellformed_block_chains() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut ran = 0;
        for _ in 0..300 {
            let mut d = vec![3u8]; // queue size 8
            for i in 0..8u16 {
                let sel = (rnd() % 4) as u8; // flags NEXT/WRITE combos, no indirect
                d.push(sel);
                let addr = (0x3000 + (rnd() % 0x8000) as u32) & !0xf;
                d.extend_from_slice(&addr.to_le_bytes());
                let len = [16u16, 512, 1, 1024, 17][(rnd() % 5) as usize];
                d.extend_from_slice(&len.to_le_bytes());
                d.extend_from_slice(&((i + 1) % 8).to_le_bytes());
            }
            d.push(8);
            for i in 0..8u16 {
                d.extend_from_slice(&i.to_le_bytes());
            }
            // Buffer contents: blk headers with small types and sectors.
            for _ in 0..64 {
                let t = [0u32, 1, 4, 8, 11, 13, 99][(rnd() % 7) as usize];
                d.extend_from_slice(&t.to_le_bytes());
                d.extend_from_slice(&0u32.to_le_bytes());
                d.extend_from_slice(&(rnd() % 80).to_le_bytes());
            }
            ran += super::block_request(&d);
        }
        assert!(
            ran > 100,
            "only {ran} of the structured requests got past parsing"
        );
    }
}
