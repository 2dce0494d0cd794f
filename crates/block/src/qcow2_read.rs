//! kvmbox's own read-only qcow2 reader, for the images imago refuses: zstd-compressed clusters
//! (`compression_type=zstd`), and images with the dirty or corrupt bit set (QEMU reads those
//! read-only too). L1/L2 lookup, zero clusters, compressed clusters (raw deflate as QEMU
//! writes zlib clusters, or a zstd frame), unallocated clusters from the backing chain (opened
//! by imago as for every image) or as zeroes. Every host offset is checked against the file:
//! damage is an I/O error for that request, never a read outside the image.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use imago::io_buffers::IoVectorMut;
use miniz_oxide::inflate::core::{decompress as inflate, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use crate::open::ChainGuard;
use crate::qcow2::{open_backing, Header, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::{io_err, BlockBackend, Caps, Error, Result};

const COMPRESSED: u64 = 1 << 62;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const ZERO: u64 = 1;
/// L2 tables kept in memory (cleared when full).
const L2_CACHE: usize = 1024;

/// Whether a read-only open of an image with header `h` needs this reader.
pub(crate) fn needed(h: &Header) -> bool {
    h.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION) != 0
}

/// A qcow2 image read by kvmbox itself (read-only).
pub struct Qcow2Reader {
    file: File,
    path: PathBuf,
    h: Header,
    file_len: u64,
    l1: Vec<u64>,
    l2: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
    backing: Option<imago::FormatAccess<imago::file::File>>,
}

impl Drop for Qcow2Reader {
    /// Release the image's lock as it closes (see [`crate::lock::unlock`]).
    fn drop(&mut self) {
        crate::lock::unlock(&self.file);
    }
}

fn bad(msg: String) -> io::Error {
    io_err(io::ErrorKind::InvalidData, msg)
}

impl Qcow2Reader {
    /// Open `file` (already opened read-only and locked) at `path`, with its backing chain.
    pub fn open(file: File, path: &Path, lock: bool) -> Result<Self> {
        let h = Header::read(&file, path)?;
        let file_len = crate::open::image_len(&file, path)?;
        let mut chain = ChainGuard::new(&file, path, lock)?;
        let backing = open_backing(path, &h, &mut chain)?;
        let mut l1 = vec![0u8; h.l1_size as usize * 8];
        file.read_exact_at(&mut l1, h.l1_offset)
            .map_err(Error::io("reading the L1 table of", path))?;
        let l1 = l1
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
            .collect();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            h,
            file_len,
            l1,
            l2: Mutex::new(HashMap::new()),
            backing,
        })
    }

    fn cs(&self) -> u64 {
        self.h.cluster_size()
    }

    fn read_host(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if off
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.file_len)
        {
            return Err(bad(format!(
                "{}: cluster at {off:#x} lies past the end of the file",
                self.path.display()
            )));
        }
        self.file.read_exact_at(buf, off)
    }

    fn l2_table(&self, off: u64) -> io::Result<Arc<Vec<u64>>> {
        let mut cache = self.l2.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&off) {
            return Ok(t.clone());
        }
        if !off.is_multiple_of(self.cs()) {
            return Err(bad(format!("L2 table at {off:#x} is not cluster-aligned")));
        }
        let mut b = vec![0u8; self.cs() as usize];
        self.read_host(&mut b, off)?;
        let t: Arc<Vec<u64>> = Arc::new(
            b.chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
                .collect(),
        );
        if cache.len() >= L2_CACHE {
            cache.clear();
        }
        cache.insert(off, t.clone());
        Ok(t)
    }

    /// The L2 entry of guest cluster `gc` (0: unallocated).
    fn entry(&self, gc: u64) -> io::Result<u64> {
        let per_l2 = self.cs() / 8;
        let Some(&l1e) = self.l1.get((gc / per_l2) as usize) else {
            return Ok(0);
        };
        match l1e & OFFSET_MASK {
            0 => Ok(0),
            off => Ok(self.l2_table(off)?[(gc % per_l2) as usize]),
        }
    }

    /// Decompress the compressed cluster of L2 entry `e` into `out` (one cluster).
    fn decompress(&self, e: u64, out: &mut [u8]) -> io::Result<()> {
        let bits = self.h.cluster_bits;
        let shift = 62 - (bits - 8);
        let coff = e & ((1u64 << shift) - 1);
        let sectors = ((e >> shift) & ((1u64 << (bits - 8)) - 1)) + 1;
        // The stored length is rounded up to sectors: read what the file holds of it.
        let clen = (sectors * 512 - (coff & 511)).min(self.file_len.saturating_sub(coff));
        let mut c = vec![0u8; clen as usize];
        self.read_host(&mut c, coff)?;
        let fail = |what: String| bad(format!("compressed cluster at {coff:#x}: {what}"));
        if self.h.compression_type == 1 {
            let mut d = ruzstd::decoding::StreamingDecoder::new(&c[..])
                .map_err(|e| fail(format!("zstd: {e}")))?;
            d.read_exact(out).map_err(|e| fail(format!("zstd: {e}")))?;
        } else {
            let mut dec = DecompressorOxide::new();
            let (status, _, written) = inflate(&mut dec, &c, out, 0, 0);
            if !matches!(status, TINFLStatus::Done | TINFLStatus::HasMoreOutput)
                || written < out.len()
            {
                return Err(fail(format!("deflate: {status:?}, {written} bytes")));
            }
        }
        Ok(())
    }

    /// Fill `out` from guest offset `off`, within one cluster.
    fn read_in_cluster(&self, out: &mut [u8], off: u64) -> io::Result<()> {
        let cs = self.cs();
        let within = off % cs;
        let e = self.entry(off / cs)?;
        if e & COMPRESSED != 0 {
            let mut cl = vec![0u8; cs as usize];
            self.decompress(e, &mut cl)?;
            out.copy_from_slice(&cl[within as usize..within as usize + out.len()]);
            return Ok(());
        }
        if self.h.version >= 3 && e & ZERO != 0 {
            out.fill(0);
            return Ok(());
        }
        match e & OFFSET_MASK {
            0 => self.read_backing(out, off),
            host if host.is_multiple_of(cs) => self.read_host(out, host + within),
            host => Err(bad(format!("data cluster at {host:#x} is not aligned"))),
        }
    }

    fn read_backing(&self, out: &mut [u8], off: u64) -> io::Result<()> {
        out.fill(0);
        let Some(b) = &self.backing else {
            return Ok(());
        };
        let n = b.size().saturating_sub(off).min(out.len() as u64) as usize;
        if n > 0 {
            b.readv(IoVectorMut::from(vec![IoSliceMut::new(&mut out[..n])]), off)?;
        }
        Ok(())
    }
}

impl BlockBackend for Qcow2Reader {
    fn size(&self) -> u64 {
        self.h.size
    }

    fn caps(&self) -> Caps {
        Caps::writable_unless(true)
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> io::Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if offset.checked_add(len).is_none_or(|e| e > self.h.size) {
            return Err(io_err(
                io::ErrorKind::InvalidInput,
                "request past the end of the disk",
            ));
        }
        let cs = self.cs();
        let mut pos = offset;
        for b in bufs.iter_mut() {
            let mut done = 0usize;
            while done < b.len() {
                let n = ((cs - pos % cs) as usize).min(b.len() - done);
                self.read_in_cluster(&mut b[done..done + n], pos)?;
                done += n;
                pos += n as u64;
            }
        }
        Ok(())
    }

    fn write_vectored_at(&self, _: &[IoSlice<'_>], _: u64) -> io::Result<()> {
        Err(io_err(io::ErrorKind::PermissionDenied, "read-only disk"))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, _: u64, _: u64) -> io::Result<()> {
        Err(io_err(io::ErrorKind::PermissionDenied, "read-only disk"))
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(io_err(io::ErrorKind::PermissionDenied, "read-only disk"))
    }
}
