//! Read-only readers for the formats other hypervisors write: VDI (VirtualBox), VMDK (VMware:
//! monolithicSparse, streamOptimized, monolithicFlat), VHD (Hyper-V/Virtual PC: fixed,
//! dynamic), VHDX. Each format only maps a disk block to where its bytes are; one generic reader
//! ([`Mapped`]) serves requests from that map, so `kvmbox disk convert` and read-only disks
//! read them all the same way. Every offset from an image is checked against the file before
//! it is used: a bad table entry is an I/O error for that request, never a read elsewhere.

use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use crate::{io_err, BlockBackend, Caps, Error, Extent, Result};

mod vdi;
mod vhd;
mod vhdx;
mod vmdk;

/// Where the bytes of one disk block are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loc {
    /// Not allocated: reads as zeroes.
    Zero,
    /// Stored as they are at this offset of file `file`.
    Data {
        /// Index into [`BlockMap::files`].
        file: usize,
        /// Byte offset of the block's first byte.
        offset: u64,
    },
    /// A deflate (zlib) stream of `len` bytes at `offset` of file 0 (VMDK streamOptimized).
    Deflate {
        /// Byte offset of the compressed data.
        offset: u64,
        /// Its length.
        len: u64,
    },
}

/// One image format's mapping of disk blocks.
pub(crate) trait BlockMap: Send + Sync {
    /// Where block `index` is.
    fn lookup(&self, index: u64) -> io::Result<Loc>;
}

/// What every format's reader has: its files, the disk size and the block size.
pub(crate) struct Layout {
    /// The files [`Loc::Data`] refers to (the image first).
    pub(crate) files: Vec<File>,
    /// Virtual disk size in bytes.
    pub(crate) size: u64,
    /// Bytes per block (a power of two, at most [`MAX_BLOCK`]).
    pub(crate) block: u64,
}

/// Largest block any reader accepts (VHD allows up to 2 MiB, VDI 1 MiB by default, VMDK
/// grains 64 KiB): bigger values in a header are refused at open.
pub(crate) const MAX_BLOCK: u64 = 64 << 20;

/// A read-only disk served from a [`BlockMap`].
pub(crate) struct Mapped<M: BlockMap> {
    layout: Layout,
    map: M,
    /// The last decompressed block (streamOptimized readers read grains in order).
    cache: Mutex<Option<(u64, Vec<u8>)>>,
}

impl<M: BlockMap> Mapped<M> {
    pub(crate) fn new((layout, map): (Layout, M)) -> Self {
        Self {
            layout,
            map,
            cache: Mutex::new(None),
        }
    }

    fn read_block(&self, index: u64, within: u64, out: &mut [u8]) -> io::Result<()> {
        match self.map.lookup(index)? {
            Loc::Zero => out.fill(0),
            Loc::Data { file, offset } => {
                let f = self
                    .layout
                    .files
                    .get(file)
                    .ok_or_else(|| io_err(io::ErrorKind::InvalidData, "bad extent"))?;
                let at = offset + within;
                let len = f.metadata()?.len();
                if at.checked_add(out.len() as u64).is_none_or(|e| e > len) {
                    // Data past the end of a file reads as zeroes in every format's reference
                    // implementation only for the last, partial block; elsewhere it is damage.
                    let avail = len.saturating_sub(at).min(out.len() as u64) as usize;
                    if avail == 0 && at > len {
                        return Err(io_err(
                            io::ErrorKind::InvalidData,
                            "block past the end of the image file",
                        ));
                    }
                    f.read_exact_at(&mut out[..avail], at)?;
                    out[avail..].fill(0);
                } else {
                    f.read_exact_at(out, at)?;
                }
            }
            Loc::Deflate { offset, len } => {
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if cache.as_ref().map(|c| c.0) != Some(index) {
                    let bs = self.layout.block as usize;
                    if len > 2 * bs as u64 + 4096 {
                        return Err(io_err(
                            io::ErrorKind::InvalidData,
                            "compressed grain too large",
                        ));
                    }
                    let mut comp = vec![0u8; len as usize];
                    self.layout.files[0].read_exact_at(&mut comp, offset)?;
                    let mut data =
                        miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(&comp, bs)
                            .map_err(|e| {
                                io_err(
                                    io::ErrorKind::InvalidData,
                                    format!("bad compressed grain: {e:?}"),
                                )
                            })?;
                    data.resize(bs, 0);
                    *cache = Some((index, data));
                }
                let data = &cache
                    .as_ref()
                    .map(|c| &c.1)
                    .ok_or_else(|| io_err(io::ErrorKind::Other, "cache"))?;
                out.copy_from_slice(&data[within as usize..within as usize + out.len()]);
            }
        }
        Ok(())
    }
}

impl<M: BlockMap> BlockBackend for Mapped<M> {
    fn size(&self) -> u64 {
        self.layout.size
    }

    fn caps(&self) -> Caps {
        Caps {
            read_only: true,
            discard: false,
            write_zeroes: false,
        }
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], mut offset: u64) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if offset.checked_add(total).is_none_or(|e| e > self.size()) {
            return Err(io_err(
                io::ErrorKind::InvalidInput,
                "request past the end of the disk",
            ));
        }
        let bs = self.layout.block;
        for b in bufs.iter_mut() {
            let mut done = 0usize;
            while done < b.len() {
                let (index, within) = (offset / bs, offset % bs);
                let n = ((bs - within) as usize).min(b.len() - done);
                self.read_block(index, within, &mut b[done..done + n])?;
                done += n;
                offset += n as u64;
            }
        }
        Ok(())
    }

    fn write_vectored_at(&self, _bufs: &[IoSlice<'_>], _offset: u64) -> io::Result<()> {
        Err(io_err(
            io::ErrorKind::PermissionDenied,
            "read-only image format",
        ))
    }

    /// Runs of blocks the map calls free (zero) or not.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        let bs = self.layout.block;
        let end = offset.saturating_add(len).min(self.size());
        let data = |at: u64| Ok::<_, io::Error>(self.map.lookup(at / bs)? != Loc::Zero);
        let first = data(offset)?;
        let mut at = (offset / bs + 1) * bs;
        while at < end && data(at)? == first {
            at += bs;
        }
        Ok(Extent {
            data: first,
            len: at.min(end).saturating_sub(offset).clamp(len.min(1), len),
        })
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io_err(
            io::ErrorKind::PermissionDenied,
            "read-only image format",
        ))
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> io::Result<()> {
        Err(io_err(
            io::ErrorKind::PermissionDenied,
            "read-only image format",
        ))
    }
}

/// Little- and big-endian field readers over a header buffer (zero where it is too short).
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes(s.try_into().unwrap_or_default()))
}
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes(s.try_into().unwrap_or_default()))
}
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
}
pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes(s.try_into().unwrap_or_default()))
}
pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_be_bytes(s.try_into().unwrap_or_default()))
}

/// Read a table of `count` `width`-byte entries at `offset` of `file`, checking it lies in the
/// file and is not absurdly large.
pub(crate) fn read_table(
    file: &File,
    path: &Path,
    what: &str,
    offset: u64,
    count: u64,
    width: u64,
) -> Result<Vec<u8>> {
    let len = crate::open::image_len(file, path)?;
    let bytes = count.checked_mul(width).filter(|&b| b <= 256 << 20);
    match bytes {
        Some(b) if offset.checked_add(b).is_some_and(|e| e <= len) => {
            let mut v = vec![0u8; b as usize];
            file.read_exact_at(&mut v, offset).map_err(Error::io("reading", path))?;
            Ok(v)
        }
        _ => Err(Error::image(
            path,
            format!("{what} ({count} entries at offset {offset:#x}) does not fit in the file ({len} bytes)"),
        )),
    }
}

/// Open the image `file` at `path` whose signature says `format` (see `open::probe_bytes`).
pub(crate) fn open(
    format: &str,
    file: File,
    path: &Path,
) -> Result<std::sync::Arc<dyn BlockBackend>> {
    Ok(match format {
        "vdi" => std::sync::Arc::new(Mapped::new(vdi::Vdi::open(file, path)?)),
        "vpc" => std::sync::Arc::new(Mapped::new(vhd::Vhd::open(file, path)?)),
        "vmdk" => std::sync::Arc::new(Mapped::new(vmdk::Vmdk::open(file, path)?)),
        "vhdx" => std::sync::Arc::new(Mapped::new(vhdx::Vhdx::open(file, path)?)),
        other => {
            return Err(Error::image(
                path,
                format!("{other} images are not supported"),
            ))
        }
    })
}
