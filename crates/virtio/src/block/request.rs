//! virtio-blk requests: parsing a validated chain and running it against the block backend.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use kvmbox_block::BlockBackend;
use kvmbox_cpu::GuestMemoryMmap;
use vm_memory::GuestAddress;

use crate::queue::{Chain, ChainError, GuestBufs};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the serial returned by GET_ID.
pub const ID_BYTES: usize = kvmbox_block::SERIAL_MAX;
/// Largest number of segments in one discard or write-zeroes request.
pub const MAX_SEGMENTS: u32 = 32;
/// Largest sector count of one discard or write-zeroes segment.
pub const MAX_SEGMENT_SECTORS: u32 = 1 << 22;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Status: success.
pub const S_OK: u8 = 0;
/// Status: I/O error (also: out of range, read-only).
pub const S_IOERR: u8 = 1;
/// Status: request type or flags not supported.
pub const S_UNSUPP: u8 = 2;

const WZ_FLAG_UNMAP: u32 = 1;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The status byte written (`S_OK`, `S_IOERR`, `S_UNSUPP`).
    pub status: u8,
    /// Bytes written into the chain (data + status), for the used ring.
    pub used: u32,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read sectors into the guest.
    In,
    /// Write guest data to sectors.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Return the device serial.
    GetId,
    /// Deallocate ranges.
    Discard,
    /// Zero ranges (optionally deallocating).
    WriteZeroes,
    /// Anything else.
    Unsupported(u32),
}

/// A parsed request: kind, first sector, its data buffers and its status byte.
pub struct Request<'a> {
    /// The request type.
    pub kind: RequestKind,
    /// The header's sector field.
    pub sector: u64,
    data: GuestBufs<'a>,
    status: GuestBufs<'a>,
}

/// The disk's backend and the facts about it requests are checked against.
pub struct Disk {
    /// The image, whatever its format.
    pub backend: Arc<dyn BlockBackend>,
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Opened read-only.
    pub read_only: bool,
    /// GET_ID answer, zero padded.
    pub id: [u8; ID_BYTES],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Header {
    kind: u32,
    _reserved: u32,
    sector: u64,
}
// SAFETY: plain integers, no padding, any bit pattern is valid.
unsafe impl vm_memory::ByteValued for Header {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Segment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: plain integers, no padding, any bit pattern is valid.
unsafe impl vm_memory::ByteValued for Segment {}

impl<'a> Request<'a> {
    /// Parse `chain`: a 16-byte readable header, data, and a final writable status byte.
    pub fn parse(chain: &Chain, mem: &'a GuestMemoryMmap) -> Result<Self, ChainError> {
        let header: Header = chain.reader(mem).read_obj("header shorter than 16 bytes")?;
        let kind = match u32::from_le(header.kind) {
            T_IN => RequestKind::In,
            T_OUT => RequestKind::Out,
            T_FLUSH => RequestKind::Flush,
            T_GET_ID => RequestKind::GetId,
            T_DISCARD => RequestKind::Discard,
            T_WRITE_ZEROES => RequestKind::WriteZeroes,
            other => RequestKind::Unsupported(other),
        };
        Self::with_header(chain, mem, kind, u64::from_le(header.sector))
    }

    /// The request of `chain` whose header was already read as `kind` and `sector`: a request
    /// handed to an I/O thread is built again there from these, not from guest memory, which
    /// the guest may have changed meanwhile.
    pub(crate) fn with_header(
        chain: &Chain,
        mem: &'a GuestMemoryMmap,
        kind: RequestKind,
        sector: u64,
    ) -> Result<Self, ChainError> {
        let mut reader = chain.reader(mem);
        let mut writer = chain.writer(mem);
        if reader.skip(std::mem::size_of::<Header>()) != std::mem::size_of::<Header>() {
            return Err(ChainError::Malformed("header shorter than 16 bytes"));
        }
        let status = writer
            .split_end(1)
            .ok_or(ChainError::Malformed("no writable status byte"))?;
        let data = match kind {
            RequestKind::In | RequestKind::GetId => {
                if reader.remaining() != 0 {
                    return Err(ChainError::Malformed(
                        "readable data in a device-write request",
                    ));
                }
                writer
            }
            RequestKind::Out | RequestKind::Discard | RequestKind::WriteZeroes => {
                if writer.remaining() != 0 {
                    return Err(ChainError::Malformed(
                        "writable data in a device-read request",
                    ));
                }
                reader
            }
            RequestKind::Flush | RequestKind::Unsupported(_) => reader,
        };
        Ok(Self {
            kind,
            sector,
            data,
            status,
        })
    }

    /// Bytes in the request's data buffers (what a read fills or a write stores).
    pub fn data_len(&self) -> usize {
        self.data.remaining()
    }

    /// Run the request against `disk` and write the status byte.
    pub fn execute(mut self, disk: &Disk) -> Completion {
        let (status, written) = match self.run(disk) {
            Ok(n) => (S_OK, n),
            Err(s) => (s, 0),
        };
        let s = self.status.write(&[status]).unwrap_or(0);
        Completion {
            status,
            used: u32::try_from(written + s).unwrap_or(u32::MAX),
        }
    }

    /// Byte offset and length of a data transfer, if it is sector aligned and inside the disk.
    fn range(&self, disk: &Disk, len: usize) -> Result<u64, u8> {
        let len = len as u64;
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(S_IOERR);
        }
        let end = self.sector.checked_add(len / SECTOR_SIZE).ok_or(S_IOERR)?;
        if end > disk.capacity {
            return Err(S_IOERR);
        }
        Ok(self.sector * SECTOR_SIZE)
    }

    /// The next `len` data bytes as host memory ranges inside the guest mapping: (guest
    /// address, host pointer, length).
    fn host_ranges(&mut self, len: usize) -> Result<Vec<(GuestAddress, *mut u8, usize)>, u8> {
        let mut v = Vec::with_capacity(4);
        self.data
            .for_each_host_range(len, |a, ptr, n| {
                v.push((a, ptr, n));
                Ok(())
            })
            .map_err(|_| S_IOERR)?;
        Ok(v)
    }

    fn run(&mut self, disk: &Disk) -> Result<usize, u8> {
        match self.kind {
            RequestKind::In => {
                let len = self.data.remaining();
                let off = self.range(disk, len)?;
                let ranges = self.host_ranges(len)?;
                let mut bufs: Vec<IoSliceMut<'_>> = ranges
                    .iter()
                    .map(|&(_, p, n)| {
                        // SAFETY: each range lies inside the guest memory mapping (the chain was
                        // validated against it), which stays mapped while `self.data` borrows
                        // it; the guest may change the bytes concurrently, as with any DMA,
                        // which only affects what it reads back.
                        IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(p, n) })
                    })
                    .collect();
                let read = disk.backend.read_vectored_at(&mut bufs, off);
                for &(a, _, n) in &ranges {
                    self.data.mark_written(a, n);
                }
                read.map_err(|_| S_IOERR)?;
                Ok(len)
            }
            RequestKind::Out => {
                if disk.read_only {
                    return Err(S_IOERR);
                }
                let len = self.data.remaining();
                let off = self.range(disk, len)?;
                let ranges = self.host_ranges(len)?;
                let bufs: Vec<IoSlice<'_>> = ranges
                    .into_iter()
                    .map(|(_, p, n)| {
                        // SAFETY: as for reads; the backend only reads these ranges.
                        IoSlice::new(unsafe { std::slice::from_raw_parts(p.cast_const(), n) })
                    })
                    .collect();
                disk.backend
                    .write_vectored_at(&bufs, off)
                    .map_err(|_| S_IOERR)?;
                Ok(0)
            }
            RequestKind::Flush => {
                if disk.read_only {
                    return Ok(0);
                }
                disk.backend.flush().map_err(|_| S_IOERR)?;
                Ok(0)
            }
            RequestKind::GetId => {
                let n = self.data.remaining().min(ID_BYTES);
                self.data.write(&disk.id[..n]).map_err(|_| S_IOERR)
            }
            RequestKind::Discard | RequestKind::WriteZeroes => {
                if disk.read_only {
                    return Err(S_IOERR);
                }
                let len = self.data.remaining();
                let size = std::mem::size_of::<Segment>();
                if len == 0 || !len.is_multiple_of(size) || len / size > MAX_SEGMENTS as usize {
                    return Err(S_UNSUPP);
                }
                let mut segs = Vec::with_capacity(len / size);
                for _ in 0..len / size {
                    let s: Segment = self.data.read_obj("segment").map_err(|_| S_IOERR)?;
                    segs.push(s);
                }
                for s in segs {
                    self.segment(disk, s)?;
                }
                Ok(0)
            }
            RequestKind::Unsupported(_) => Err(S_UNSUPP),
        }
    }

    fn segment(&self, disk: &Disk, s: Segment) -> Result<(), u8> {
        let (sector, count, flags) = (
            u64::from_le(s.sector),
            u32::from_le(s.num_sectors),
            u32::from_le(s.flags),
        );
        let allowed = if self.kind == RequestKind::WriteZeroes {
            WZ_FLAG_UNMAP
        } else {
            0
        };
        if flags & !allowed != 0 || count > MAX_SEGMENT_SECTORS {
            return Err(S_UNSUPP);
        }
        let end = sector.checked_add(u64::from(count)).ok_or(S_IOERR)?;
        if end > disk.capacity {
            return Err(S_IOERR);
        }
        let (off, len) = (sector * SECTOR_SIZE, u64::from(count) * SECTOR_SIZE);
        if len == 0 {
            return Ok(());
        }
        let r = if self.kind == RequestKind::Discard {
            disk.backend.discard(off, len)
        } else {
            disk.backend
                .write_zeroes(off, len, flags & WZ_FLAG_UNMAP != 0)
        };
        r.map_err(|_| S_IOERR)
    }
}
