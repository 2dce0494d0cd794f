//! virtio-blk request tests against a real image file and real guest memory.

use kvmbox_cpu::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::request::{Disk, Request, ID_BYTES, S_IOERR, S_OK, S_UNSUPP};
use crate::queue::{pop_chain, ChainError};
use crate::test_util::*;

const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const DISK_LEN: u64 = 64 * 1024;

fn disk(img: &TempImage, read_only: bool) -> Disk {
    let mut id = [0u8; ID_BYTES];
    id[..6].copy_from_slice(b"serial");
    Disk {
        backend: std::sync::Arc::new(kvmbox_block::RawBackend::new(
            img.open(),
            DISK_LEN,
            read_only,
            false,
        )),
        capacity: DISK_LEN / 512,
        read_only,
        id,
    }
}

fn header(m: &GuestMemoryMmap, kind: u32, sector: u64) {
    m.write_obj(kind, GuestAddress(HDR)).unwrap();
    m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
}

/// Run the chain `bufs` as one request; returns (used length, status byte) or the parse error.
fn run(m: &GuestMemoryMmap, d: &Disk, bufs: &[(u64, u32, bool)]) -> Result<(u32, u8), ChainError> {
    let mut r = Ring::new(m, 0x1_0000, 16);
    let mut q = r.queue();
    r.add_chain(m, 0, bufs);
    let (_, chain) = pop_chain(&mut q, m).unwrap().unwrap();
    let req = Request::parse(&chain?, m)?;
    let used = req.execute(d).used;
    Ok((used, m.read_obj(GuestAddress(STATUS)).unwrap()))
}

fn hdr() -> (u64, u32, bool) {
    (HDR, 16, false)
}
fn status() -> (u64, u32, bool) {
    (STATUS, 1, true)
}

#[test]
fn read_write_across_descriptors() {
    let m = mem();
    let img = TempImage::new(DISK_LEN, |i| (i / 512) as u8);
    let d = disk(&img, false);
    // Read sectors 2..4 into two buffers.
    header(&m, 0, 2);
    let r = run(
        &m,
        &d,
        &[
            hdr(),
            (DATA, 700, true),
            (DATA + 0x1000, 324, true),
            status(),
        ],
    );
    assert_eq!(r, Ok((1025, S_OK)));
    let mut b = vec![0u8; 1024];
    m.read_slice(&mut b[..700], GuestAddress(DATA)).unwrap();
    m.read_slice(&mut b[700..], GuestAddress(DATA + 0x1000))
        .unwrap();
    assert!(b[..512].iter().all(|&x| x == 2) && b[512..].iter().all(|&x| x == 3));
    // Write sector 5 from three buffers.
    m.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    header(&m, 1, 5);
    let r = run(
        &m,
        &d,
        &[
            hdr(),
            (DATA, 100, false),
            (DATA + 100, 400, false),
            (DATA + 500, 12, false),
            status(),
        ],
    );
    assert_eq!(r, Ok((1, S_OK)));
    let f = img.read();
    assert!(f[5 * 512..6 * 512].iter().all(|&x| x == 0xab));
    assert!(f[4 * 512..5 * 512].iter().all(|&x| x == 4));
    assert!(f[6 * 512..7 * 512].iter().all(|&x| x == 6));
}

#[test]
fn out_of_range_and_unaligned_transfers_fail() {
    let m = mem();
    let img = TempImage::new(DISK_LEN, |_| 7);
    let d = disk(&img, false);
    let last = DISK_LEN / 512 - 1;
    header(&m, 0, last);
    assert_eq!(
        run(&m, &d, &[hdr(), (DATA, 1024, true), status()]),
        Ok((1, S_IOERR))
    );
    header(&m, 1, u64::MAX);
    assert_eq!(
        run(&m, &d, &[hdr(), (DATA, 512, false), status()]),
        Ok((1, S_IOERR))
    );
    header(&m, 0, 0);
    assert_eq!(
        run(&m, &d, &[hdr(), (DATA, 100, true), status()]),
        Ok((1, S_IOERR))
    );
    header(&m, 0, last);
    assert_eq!(
        run(&m, &d, &[hdr(), (DATA, 512, true), status()]),
        Ok((513, S_OK))
    );
    assert!(img.read().iter().all(|&x| x == 7), "nothing written");
}

#[test]
fn read_only_disk_rejects_writes_and_discards() {
    let m = mem();
    let img = TempImage::new(DISK_LEN, |_| 1);
    let d = disk(&img, true);
    header(&m, 1, 0);
    assert_eq!(
        run(&m, &d, &[hdr(), (DATA, 512, false), status()]),
        Ok((1, S_IOERR))
    );
    header(&m, 11, 0);
    m.write_obj([0u64, 8], GuestAddress(DATA)).unwrap();
    assert_eq!(
        run(&m, &d, &[hdr(), (DATA, 16, false), status()]),
        Ok((1, S_IOERR))
    );
    header(&m, 4, 0);
    assert_eq!(
        run(&m, &d, &[hdr(), status()]),
        Ok((1, S_OK)),
        "flush is fine"
    );
    assert!(img.read().iter().all(|&x| x == 1));
}

#[test]
fn flush_get_id_and_unsupported() {
    let m = mem();
    let img = TempImage::new(DISK_LEN, |_| 0);
    let d = disk(&img, false);
    header(&m, 4, 0);
    assert_eq!(run(&m, &d, &[hdr(), status()]), Ok((1, S_OK)));
    header(&m, 8, 0);
    m.write_slice(&[0xee; 32], GuestAddress(DATA)).unwrap();
    assert_eq!(
        run(&m, &d, &[hdr(), (DATA, 32, true), status()]),
        Ok((21, S_OK))
    );
    let mut id = [0u8; 21];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..6], b"serial");
    assert!(id[6..20].iter().all(|&x| x == 0));
    assert_eq!(id[20], 0xee, "only 20 bytes written");
    header(&m, 99, 0);
    assert_eq!(run(&m, &d, &[hdr(), status()]), Ok((1, S_UNSUPP)));
}

#[test]
fn discard_and_write_zeroes() {
    let m = mem();
    let img = TempImage::new(DISK_LEN, |_| 0x5a);
    let d = disk(&img, false);
    let seg = |sector: u64, n: u32, flags: u32| {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&sector.to_le_bytes());
        b[8..12].copy_from_slice(&n.to_le_bytes());
        b[12..].copy_from_slice(&flags.to_le_bytes());
        b
    };
    // Discard sectors 8..16 (4 KiB aligned, so a hole really appears on tmpfs/ext4).
    header(&m, 11, 0);
    m.write_slice(&seg(8, 8, 0), GuestAddress(DATA)).unwrap();
    assert_eq!(
        run(&m, &d, &[hdr(), (DATA, 16, false), status()]),
        Ok((1, S_OK))
    );
    // Write zeroes to sectors 1..2 (no unmap) and 20..24 (unmap), two segments.
    header(&m, 13, 0);
    m.write_slice(&seg(1, 1, 0), GuestAddress(DATA)).unwrap();
    m.write_slice(&seg(20, 4, 1), GuestAddress(DATA + 16))
        .unwrap();
    assert_eq!(
        run(&m, &d, &[hdr(), (DATA, 32, false), status()]),
        Ok((1, S_OK))
    );
    let f = img.read();
    assert_eq!(f.len() as u64, DISK_LEN, "size kept");
    for s in 0..DISK_LEN / 512 {
        let zero = s == 1 || (20..24).contains(&s);
        let sector = &f[s as usize * 512..(s as usize + 1) * 512];
        if zero {
            assert!(sector.iter().all(|&x| x == 0), "sector {s} zeroed");
        } else if !(8..16).contains(&s) {
            assert!(sector.iter().all(|&x| x == 0x5a), "sector {s} untouched");
        }
    }
    // Discard with the unmap flag, out of range, bad segment sizes.
    header(&m, 11, 0);
    m.write_slice(&seg(0, 1, 1), GuestAddress(DATA)).unwrap();
    assert_eq!(
        run(&m, &d, &[hdr(), (DATA, 16, false), status()]),
        Ok((1, S_UNSUPP))
    );
    m.write_slice(&seg(DISK_LEN / 512, 1, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        run(&m, &d, &[hdr(), (DATA, 16, false), status()]),
        Ok((1, S_IOERR))
    );
    m.write_slice(&seg(u64::MAX, 2, 0), GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        run(&m, &d, &[hdr(), (DATA, 16, false), status()]),
        Ok((1, S_IOERR))
    );
    assert_eq!(
        run(&m, &d, &[hdr(), (DATA, 15, false), status()]),
        Ok((1, S_UNSUPP))
    );
    assert_eq!(run(&m, &d, &[hdr(), status()]), Ok((1, S_UNSUPP)));
    assert_eq!(
        run(&m, &d, &[hdr(), (DATA, 16 * 33, false), status()]),
        Ok((1, S_UNSUPP))
    );
}

#[test]
fn malformed_requests_are_rejected() {
    let m = mem();
    let img = TempImage::new(DISK_LEN, |_| 3);
    let d = disk(&img, false);
    header(&m, 0, 0);
    // Header in a device-writable buffer (wrong direction).
    assert!(matches!(
        run(&m, &d, &[(HDR, 16, true), status()]),
        Err(ChainError::Malformed(_))
    ));
    // Short header.
    assert!(matches!(
        run(&m, &d, &[(HDR, 8, false), status()]),
        Err(ChainError::Malformed(_))
    ));
    // No status byte.
    assert!(matches!(
        run(&m, &d, &[hdr(), (DATA, 512, false)]),
        Err(ChainError::Malformed(_))
    ));
    // Read request with device-readable data.
    assert!(matches!(
        run(&m, &d, &[hdr(), (DATA, 512, false), status()]),
        Err(ChainError::Malformed(_))
    ));
    // Write request with device-writable data.
    header(&m, 1, 0);
    assert!(matches!(
        run(&m, &d, &[hdr(), (DATA, 512, true), status()]),
        Err(ChainError::Malformed(_))
    ));
    // Header split over two descriptors is fine.
    header(&m, 0, 1);
    assert_eq!(
        run(
            &m,
            &d,
            &[
                (HDR, 5, false),
                (HDR + 5, 11, false),
                (DATA, 512, true),
                status()
            ]
        ),
        Ok((513, S_OK))
    );
    assert!(img.read().iter().all(|&x| x == 3));
}

/// Interrupts a device raised.
#[derive(Default)]
struct CountInterrupts(std::sync::atomic::AtomicUsize);
impl crate::device::VirtioInterrupt for CountInterrupts {
    fn trigger(&self, _kind: crate::device::VirtioInterruptType) -> std::io::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn set_needs_reset(&self) {}
}

/// Byte `i` of the image the I/O-thread tests read: differs from sector to sector and within.
fn pattern(i: u64) -> u8 {
    ((i / 512) as u8).wrapping_mul(31) ^ (i as u8)
}

const BIG_DISK: u64 = 4 << 20;
/// Data buffers of the I/O-thread tests: request i's at BIG_DATA + i * BIG_READ.
const BIG_DATA: u64 = 0x40_0000;
const BIG_READ: u32 = 256 << 10;

/// A queue's worker state as `Block::activate` builds it, on a real image and its I/O threads.
fn handler(
    m: &GuestMemoryMmap,
    ring: &Ring,
    img: &TempImage,
    irq: &std::sync::Arc<CountInterrupts>,
) -> super::event_handler::BlockHandler {
    let disk = std::sync::Arc::new(Disk {
        backend: std::sync::Arc::new(kvmbox_block::RawBackend::new(
            img.open(),
            BIG_DISK,
            false,
            false,
        )),
        capacity: BIG_DISK / 512,
        read_only: false,
        id: [0; ID_BYTES],
    });
    super::event_handler::BlockHandler {
        mem: m.clone(),
        queue: ring.queue(),
        evt: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        interrupt: irq.clone(),
        pool: super::io_pool::IoPool::start(m, &disk).unwrap(),
        disk,
        metrics: Default::default(),
        limiter: crate::limiter::SharedLimiter::new(&Default::default()).unwrap(),
        broken: false,
    }
}

/// Request `i` of a batch: a read of `len` bytes at `sector` into its own buffers (header at
/// HDR + 16 i, data at BIG_DATA + i * BIG_READ, status at STATUS + i), descriptors 3i..3i+2.
fn queue_read(m: &GuestMemoryMmap, ring: &mut Ring, i: u16, sector: u64, len: u32) {
    let (h, d, s) = (
        HDR + 16 * u64::from(i),
        BIG_DATA + u64::from(i) * u64::from(BIG_READ),
        STATUS + u64::from(i),
    );
    m.write_obj(0u32, GuestAddress(h)).unwrap();
    m.write_obj(0u32, GuestAddress(h + 4)).unwrap();
    m.write_obj(sector, GuestAddress(h + 8)).unwrap();
    m.write_slice(&vec![0xee; len as usize], GuestAddress(d))
        .unwrap();
    m.write_obj(0xffu8, GuestAddress(s)).unwrap();
    ring.add_chain(m, 3 * i, &[(h, 16, false), (d, len, true), (s, 1, true)]);
}

/// (head, used length) of every used element so far, sorted by head.
fn used_sorted(m: &GuestMemoryMmap, ring: &Ring) -> Vec<(u32, u32)> {
    let mut v: Vec<_> = (0..ring.used_idx(m))
        .map(|i| ring.used_elem(m, i))
        .collect();
    v.sort();
    v
}

/// The batch of the I/O-thread tests: reads of [`BIG_READ`] at sectors 0, 512, ... (requests
/// 0..8 but 3), a 4 KiB read (request 3: served on the worker at once) and a large read that
/// ends past the disk (request 8: its I/O error only). Checks every answer once all are back.
fn check_batch(m: &GuestMemoryMmap, ring: &Ring, img: &TempImage) {
    let file = img.read();
    let mut want = Vec::new();
    for i in 0..8u16 {
        let (sector, len) = if i == 3 {
            (77, 4096)
        } else {
            (u64::from(i) * 512, BIG_READ)
        };
        want.push((u32::from(3 * i), len + 1));
        let mut got = vec![0u8; len as usize];
        m.read_slice(
            &mut got,
            GuestAddress(BIG_DATA + u64::from(i) * u64::from(BIG_READ)),
        )
        .unwrap();
        let at = (sector * 512) as usize;
        assert!(got == file[at..at + len as usize], "request {i}'s data");
        let st: u8 = m.read_obj(GuestAddress(STATUS + u64::from(i))).unwrap();
        assert_eq!(st, S_OK, "request {i}'s status");
    }
    want.push((24, 1));
    let st: u8 = m.read_obj(GuestAddress(STATUS + 8)).unwrap();
    assert_eq!(st, S_IOERR, "the read past the end fails");
    assert_eq!(used_sorted(m, ring), want, "each request answered once");
}

fn queue_batch(m: &GuestMemoryMmap, ring: &mut Ring) {
    for i in 0..8u16 {
        if i == 3 {
            queue_read(m, ring, i, 77, 4096);
        } else {
            queue_read(m, ring, i, u64::from(i) * 512, BIG_READ);
        }
    }
    queue_read(m, ring, 8, BIG_DISK / 512 - 8, BIG_READ);
}

#[test]
fn large_reads_run_on_the_io_threads_and_complete_out_of_the_worker() {
    let m = mem();
    let img = TempImage::new(BIG_DISK, pattern);
    let mut ring = Ring::new(&m, 0x1_0000, 64);
    let irq = std::sync::Arc::new(CountInterrupts::default());
    let mut h = handler(&m, &ring, &img, &irq);
    queue_batch(&m, &mut ring);
    assert!(h.process());
    // Only the 4 KiB read is answered by the pass itself: the large ones are in flight, and
    // only the worker returns them to the used ring, when the I/O threads say they are done.
    assert_eq!(used_sorted(&m, &ring), vec![(9, 4097)]);
    let ep = vmm_sys_util::epoll::Epoll::new().unwrap();
    use crate::worker::EventHandler;
    // The worker's side of the I/O threads' eventfd, until all are back (5 s at most).
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while ring.used_idx(&m) < 9 && std::time::Instant::now() < end {
        assert!(h.handle(super::event_handler::DONE_TOKEN, &ep));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    check_batch(&m, &ring, &img);
    assert!(irq.0.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    let [requests, rejected, errors, _, bytes_in, _] = h.metrics.snapshot();
    assert_eq!((requests, errors, rejected), (9, 1, 0));
    assert_eq!(bytes_in, 7 * u64::from(BIG_READ) + 4096);
}

#[test]
fn a_stopping_worker_returns_every_read_in_flight_first() {
    let m = mem();
    let img = TempImage::new(BIG_DISK, pattern);
    let mut ring = Ring::new(&m, 0x1_0000, 64);
    let irq = std::sync::Arc::new(CountInterrupts::default());
    let mut h = handler(&m, &ring, &img, &irq);
    queue_batch(&m, &mut ring);
    assert!(h.process());
    assert_eq!(ring.used_idx(&m), 1, "the large reads are in flight");
    // What the worker does when it is stopped (quiesce for a snapshot, reset): afterwards
    // nothing is in flight, so the used ring's index is where the queue stands.
    use crate::worker::EventHandler;
    h.finish();
    assert_eq!(ring.used_idx(&m), 9);
    check_batch(&m, &ring, &img);
}

#[test]
fn large_writes_run_on_the_io_threads_and_a_flush_waits_for_them() {
    let m = mem();
    let img = TempImage::new(BIG_DISK, |_| 0);
    let mut ring = Ring::new(&m, 0x1_0000, 64);
    let irq = std::sync::Arc::new(CountInterrupts::default());
    let mut h = handler(&m, &ring, &img, &irq);
    // Requests 0..6: writes of BIG_READ bytes, each its own byte, at sectors 0, 1024, ...;
    // request 6: a flush, made available with the writes still unanswered.
    for i in 0..6u16 {
        let (hd, d, s) = (
            HDR + 16 * u64::from(i),
            BIG_DATA + u64::from(i) * u64::from(BIG_READ),
            STATUS + u64::from(i),
        );
        m.write_obj(1u32, GuestAddress(hd)).unwrap();
        m.write_obj(0u32, GuestAddress(hd + 4)).unwrap();
        m.write_obj(u64::from(i) * 1024, GuestAddress(hd + 8))
            .unwrap();
        m.write_slice(&vec![0x10 + i as u8; BIG_READ as usize], GuestAddress(d))
            .unwrap();
        m.write_obj(0xffu8, GuestAddress(s)).unwrap();
        ring.add_chain(
            &m,
            3 * i,
            &[(hd, 16, false), (d, BIG_READ, false), (s, 1, true)],
        );
    }
    m.write_obj(4u32, GuestAddress(HDR + 16 * 6)).unwrap();
    m.write_obj(0u32, GuestAddress(HDR + 16 * 6 + 4)).unwrap();
    m.write_obj(0u64, GuestAddress(HDR + 16 * 6 + 8)).unwrap();
    m.write_obj(0xffu8, GuestAddress(STATUS + 6)).unwrap();
    ring.add_chain(&m, 18, &[(HDR + 16 * 6, 16, false), (STATUS + 6, 1, true)]);
    assert!(h.process());
    // The flush waited for every write before it: all seven are answered by this one pass.
    let mut want: Vec<(u32, u32)> = (0..6).map(|i| (3 * i, 1)).collect();
    want.push((18, 1));
    assert_eq!(used_sorted(&m, &ring), want);
    for i in 0..7u64 {
        let st: u8 = m.read_obj(GuestAddress(STATUS + i)).unwrap();
        assert_eq!(st, S_OK, "request {i}'s status");
    }
    let f = img.read();
    for i in 0..6usize {
        let at = i * 1024 * 512;
        assert!(
            f[at..at + BIG_READ as usize]
                .iter()
                .all(|&x| x == 0x10 + i as u8),
            "write {i} in the file"
        );
        assert!(f[at + BIG_READ as usize..at + 2 * BIG_READ as usize]
            .iter()
            .all(|&x| x == 0));
    }
    let [requests, _, errors, bytes_out, _, _] = h.metrics.snapshot();
    assert_eq!((requests, errors), (7, 0));
    assert_eq!(bytes_out, 6 * u64::from(BIG_READ));
}
