//! Raw images: `preadv`/`pwritev` straight between the file and guest memory.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::open::probe_bytes;
use crate::{io_err, BlockBackend, Caps, Extent};

/// How many leading bytes of a probed raw image the format probe looks at.
const PROBE_BYTES: usize = 512;

/// A raw image file.
pub struct RawBackend {
    file: File,
    size: u64,
    read_only: bool,
    /// The format was detected, not given: writes that would make the next detection see
    /// another format are refused (see the crate README).
    probed: bool,
}

impl Drop for RawBackend {
    /// Release the image's locks as it closes (see [`crate::lock::unlock`]).
    fn drop(&mut self) {
        crate::lock::unlock(&self.file);
    }
}

impl RawBackend {
    /// Serve `file` (already opened and locked) as a raw disk of `size` bytes.
    pub fn new(file: File, size: u64, read_only: bool, probed: bool) -> Self {
        Self {
            file,
            size,
            read_only,
            probed,
        }
    }

    /// Whether writing `bufs` at `offset` would make sector 0 look like another image format.
    fn write_changes_probe(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<bool> {
        if !self.probed || offset >= PROBE_BYTES as u64 {
            return Ok(false);
        }
        let mut head = [0u8; PROBE_BYTES];
        let n = (self.size as usize).min(PROBE_BYTES);
        self.file.read_exact_at(&mut head[..n], 0)?;
        let mut pos = offset as usize;
        for b in bufs {
            if pos >= PROBE_BYTES {
                break;
            }
            let k = b.len().min(PROBE_BYTES - pos);
            head[pos..pos + k].copy_from_slice(&b[..k]);
            pos += k;
        }
        Ok(probe_bytes(&head).is_some())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io_err(io::ErrorKind::PermissionDenied, "read-only disk"));
        }
        Ok(())
    }
}

fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io_err(
            io::ErrorKind::InvalidInput,
            "request past the end of the disk",
        )),
    }
}

fn total(lens: impl Iterator<Item = usize>) -> u64 {
    lens.map(|l| l as u64).sum()
}

impl BlockBackend for RawBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> Caps {
        Caps::writable_unless(self.read_only)
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, total(bufs.iter().map(|b| b.len())))?;
        preadv_exact(self.file.as_raw_fd(), bufs, offset, false)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(self.size, offset, total(bufs.iter().map(|b| b.len())))?;
        if self.write_changes_probe(bufs, offset)? {
            return Err(io_err(
                io::ErrorKind::PermissionDenied,
                "write would make a detected raw image look like another format",
            ));
        }
        pwritev_all(self.file.as_raw_fd(), bufs, offset)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        check_range(self.size, offset, len)?;
        // Discard is a hint; a filesystem without hole punching simply keeps the data.
        let _ = fallocate(&self.file, PUNCH, offset, len);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let first = if may_unmap { PUNCH } else { zero };
        if fallocate(&self.file, first, offset, len).is_ok()
            || fallocate(&self.file, PUNCH, offset, len).is_ok()
        {
            return Ok(());
        }
        write_zero_buffers(&self.file, offset, len)
    }

    /// Holes of the file (`SEEK_DATA`/`SEEK_HOLE`); all data where the filesystem or device
    /// cannot tell.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let data = Extent { data: true, len };
        let seek = |whence| {
            // SAFETY: lseek on our own descriptor; every read and write uses explicit offsets,
            // so moving the file position affects nothing.
            let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
            (r >= 0)
                .then_some(r as u64)
                .ok_or_else(io::Error::last_os_error)
        };
        match seek(libc::SEEK_DATA) {
            Ok(d) if d > offset => Ok(Extent {
                data: false,
                len: (d - offset).min(len),
            }),
            Ok(_) => Ok(seek(libc::SEEK_HOLE).map_or(data, |h| Extent {
                data: true,
                len: h.saturating_sub(offset).clamp(len.min(1), len),
            })),
            // No data from `offset` to the end of the file.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(Extent { data: false, len }),
            Err(_) => Ok(data),
        }
    }
}

/// Fill all of `bufs` from `offset` of `fd`, continuing after short reads; at the end of the
/// file the rest is zeroes if `zero_past_eof` (as imago reads image files), else an error.
/// `bufs` are advanced past what was read.
pub(crate) fn preadv_exact(
    fd: libc::c_int,
    mut bufs: &mut [IoSliceMut<'_>],
    mut offset: u64,
    zero_past_eof: bool,
) -> io::Result<()> {
    while !bufs.is_empty() {
        let cnt = bufs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: IoSliceMut is ABI-compatible with iovec and each points at memory we may
        // write for the slice's lifetime; preadv writes at most their total length.
        let r = unsafe { libc::preadv(fd, bufs.as_ptr().cast(), cnt, offset as libc::off_t) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 && zero_past_eof {
            bufs.iter_mut().for_each(|b| b.fill(0));
            return Ok(());
        }
        if r == 0 {
            return Err(io_err(
                io::ErrorKind::UnexpectedEof,
                "image file shorter than the disk",
            ));
        }
        offset += r as u64;
        IoSliceMut::advance_slices(&mut bufs, r as usize);
    }
    Ok(())
}

/// Write all of `bufs` at `offset`, continuing after short writes.
pub(crate) fn pwritev_all(fd: libc::c_int, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
    let total = total(bufs.iter().map(|b| b.len()));
    if total == 0 {
        return Ok(());
    }
    let cnt = bufs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
    // SAFETY: IoSlice is ABI-compatible with iovec; pwritev only reads the buffers.
    let r = unsafe { libc::pwritev(fd, bufs.as_ptr().cast(), cnt, offset as libc::off_t) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return pwritev_all(fd, bufs, offset);
        }
        return Err(e);
    }
    if r == 0 {
        return Err(io_err(
            io::ErrorKind::WriteZero,
            "image file accepted no data",
        ));
    }
    if r as u64 == total {
        return Ok(());
    }
    // A short write: continue with what is left (rare; costs one copy of the list).
    let mut owned = bufs.to_vec();
    let mut tail = &mut owned[..];
    IoSlice::advance_slices(&mut tail, r as usize);
    pwritev_all(fd, tail, offset + r as u64)
}

const PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate on our own descriptor; the range was checked against the disk size.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Write zero buffers over `len` bytes at `offset` (when the filesystem cannot zero ranges).
pub(crate) fn write_zero_buffers(file: &File, mut offset: u64, mut len: u64) -> io::Result<()> {
    let z = vec![0u8; 1 << 16];
    while len > 0 {
        let n = len.min(z.len() as u64) as usize;
        file.write_all_at(&z[..n], offset)?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}
