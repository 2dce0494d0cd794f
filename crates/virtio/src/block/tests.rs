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
