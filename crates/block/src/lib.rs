//! Block backends: the seam between virtio-blk and disk image formats.
//!
//! The device speaks only to [`BlockBackend`] (read and write at byte offsets with iovecs,
//! flush, discard, write-zeroes, size, capabilities). [`open`] turns a [`DiskSpec`] (the
//! `--disk` option, also the config file's `disks` and the API's drives) into a backend: raw
//! files are served with `preadv`/`pwritev` straight into guest memory, qcow2 images (v2 and v3,
//! with backing chains) through the `imago` crate. Every image is locked the way QEMU locks
//! images (see [`lock`]), so kvmbox and QEMU never both write one image.

use std::io::{self, IoSlice, IoSliceMut};

mod error;
mod foreign;
#[doc(hidden)]
pub mod fuzzing;
pub mod image;
pub mod lock;
pub mod meta;
mod open;
pub mod qcow2;
pub mod qcow2_read;
mod raw;
pub mod snapshot;
mod spec;

pub use error::{Error, Result};
pub use open::{detect_format, image_len, open, open_image_file, MAX_CHAIN_DEPTH};
pub use qcow2::Qcow2Backend;
pub use raw::RawBackend;
pub use spec::{check_serial, DiskSpec, Format, SERIAL_MAX};

/// What a backend can do besides reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Writes, discard and write-zeroes are refused.
    pub read_only: bool,
    /// Discard frees host space (otherwise it is accepted and ignored).
    pub discard: bool,
    /// Write-zeroes is cheaper than writing zero buffers.
    pub write_zeroes: bool,
}

impl Caps {
    /// A backend that writes, discards and zeroes unless `read_only`.
    pub fn writable_unless(read_only: bool) -> Self {
        Self {
            read_only,
            discard: !read_only,
            write_zeroes: !read_only,
        }
    }
}

/// What [`BlockBackend::block_status`] found at an offset: the extent's length and whether it
/// may hold data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// The bytes may hold data (`false`: they read as zeroes without being stored).
    pub data: bool,
    /// Length in bytes (at least 1 unless the request was empty).
    pub len: u64,
}

/// A disk image as the guest sees it: `size()` bytes, addressed by byte offset.
///
/// Requests are checked against `size()` by the caller (the device); a backend still returns an
/// error rather than touching anything outside the image. All methods take `&self`: one
/// backend serves every queue of a device.
pub trait BlockBackend: Send + Sync {
    /// Virtual disk size in bytes.
    fn size(&self) -> u64;

    /// What the backend can do.
    fn caps(&self) -> Caps;

    /// Fill `bufs` (in order) from the disk starting at `offset`.
    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()>;

    /// Store `bufs` (in order) to the disk starting at `offset`.
    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()>;

    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// Tell the backend `len` bytes at `offset` are no longer needed (contents then undefined
    /// until written; kvmbox's backends read them back as zeroes).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Make `len` bytes at `offset` read as zeroes, freeing space if `may_unmap`.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;

    /// How the disk stores the bytes from `offset` on (at most `len` of them), for copying it
    /// without reading what is known to be zeroes: holes of a raw file, unallocated and zero
    /// clusters of a qcow2 chain, free blocks of the other formats. The default: all data.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let _ = offset;
        Ok(Extent { data: true, len })
    }

    /// Whether [`Self::snapshot_create`] can work: a writable qcow2 image.
    fn holds_internal_snapshots(&self) -> bool {
        false
    }

    /// Take internal snapshot `name` of the open disk, in the process that has it open (a live
    /// snapshot: no request may run meanwhile). Only qcow2 images hold internal snapshots;
    /// the default refuses.
    fn snapshot_create(&self, name: &str) -> io::Result<()> {
        let _ = name;
        Err(io_err(
            io::ErrorKind::Unsupported,
            "only qcow2 images hold internal snapshots",
        ))
    }

    /// Delete internal snapshot `name` of the open disk (as [`Self::snapshot_create`]).
    fn snapshot_delete(&self, name: &str) -> io::Result<()> {
        let _ = name;
        Err(io_err(
            io::ErrorKind::Unsupported,
            "only qcow2 images hold internal snapshots",
        ))
    }

    /// The names of the open disk's internal snapshots (as [`Self::snapshot_create`]: no
    /// request may run meanwhile). Only qcow2 images hold any; the default has none.
    fn snapshot_names(&self) -> io::Result<Vec<String>> {
        Ok(Vec::new())
    }
}

/// An I/O error carrying a message (for requests a backend refuses).
pub(crate) fn io_err(kind: io::ErrorKind, msg: impl Into<String>) -> io::Error {
    io::Error::new(kind, msg.into())
}

#[cfg(test)]
mod tests;
