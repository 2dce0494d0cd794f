//! The guest-memory file: RAM regions back to back in guest-address order, sparse.

use crate::{io_err, Error, Result};
use kvmbox_cpu::watch::GuestBitmap;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vm_memory::bitmap::NewBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory as kvmbox has it: with vm-memory's dirty bitmaps.
pub use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_cpu::GuestRegionMmap;

/// Granularity of the memory file (and of dirty tracking).
pub const PAGE_SIZE: u64 = 4096;
/// Guest memory is read in chunks of this many bytes.
const CHUNK: usize = 1 << 20;

/// Which pages [`write_memory`] writes.
pub enum PageFilter<'a> {
    /// A full snapshot: every page that is not zero (zero pages stay holes).
    Full,
    /// A diff snapshot: exactly the pages for whose guest address this returns true (zero or
    /// not: a diff's data ranges are its pages, its holes are pages it does not carry). As
    /// Firecracker does, an existing file of the memory's size is written over in place (so a
    /// diff can go straight onto its base file); any other is replaced by a new sparse one.
    Only(&'a dyn Fn(GuestAddress) -> bool),
}

/// Bytes of guest RAM, which is the memory file's size.
pub fn memory_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source: std::io::Error::other(format!("reading guest memory: {e}")),
    }
}

/// Write guest RAM to `path`. Returns the bytes of data actually written (the rest are
/// holes, or for [`PageFilter::Only`] untouched).
///
/// A full snapshot, or a diff onto a file that is not one of this memory's size, replaces
/// `path` whole (written beside it, then renamed over it): a crash leaves the previous file
/// intact, and a VM restored from `path`, whose RAM maps it, keeps its pages (truncating a
/// mapped file would fault the VMM with SIGBUS). A diff onto a file of the memory's size
/// writes into it in place: the pages it writes are ones the guest dirtied, which a VM
/// restored from `path` holds as private copies.
pub fn write_memory(mem: &GuestMemoryMmap, path: &Path, pages: PageFilter<'_>) -> Result<u64> {
    let in_place = matches!(pages, PageFilter::Only(_))
        && std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == memory_size(mem));
    let target = if in_place {
        path.to_path_buf()
    } else {
        crate::temporary(path)
    };
    let written = write_pages(mem, &target, &pages, !in_place)?;
    if !in_place {
        std::fs::rename(&target, path).map_err(io_err(path))?;
    }
    Ok(written)
}

fn write_pages(
    mem: &GuestMemoryMmap,
    path: &Path,
    pages: &PageFilter<'_>,
    truncate: bool,
) -> Result<u64> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(truncate)
        .open(path)
        .map_err(io_err(path))?;
    let mut written = 0u64;
    let mut file_off = 0u64;
    match pages {
        PageFilter::Full => {
            let mut buf = vec![0u8; CHUNK];
            for r in mem.iter() {
                let (start, len) = (r.start_addr(), r.len());
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(CHUNK as u64) as usize;
                    let chunk = &mut buf[..n];
                    mem.read_slice(chunk, start.unchecked_add(done))
                        .map_err(|e| read_err(path, e))?;
                    for (i, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
                        if page.iter().any(|&b| b != 0) {
                            let off = file_off + done + i as u64 * PAGE_SIZE;
                            f.write_all_at(page, off).map_err(io_err(path))?;
                            written += page.len() as u64;
                        }
                    }
                    done += n as u64;
                }
                file_off += len;
            }
        }
        PageFilter::Only(dirty) => {
            // Page by page: a diff reads only the pages it writes.
            let mut page = vec![0u8; PAGE_SIZE as usize];
            for r in mem.iter() {
                let (start, len) = (r.start_addr(), r.len());
                let mut off = 0u64;
                while off < len {
                    let addr = start.unchecked_add(off);
                    let n = (len - off).min(PAGE_SIZE) as usize;
                    if dirty(addr) {
                        mem.read_slice(&mut page[..n], addr)
                            .map_err(|e| read_err(path, e))?;
                        f.write_all_at(&page[..n], file_off + off)
                            .map_err(io_err(path))?;
                        written += n as u64;
                    }
                    off += PAGE_SIZE;
                }
                file_off += len;
            }
        }
    }
    if f.metadata().map_err(io_err(path))?.len() < file_off {
        // Trailing holes: the file still spans all of RAM.
        f.set_len(file_off).map_err(io_err(path))?;
    }
    f.sync_all().map_err(io_err(path))?;
    Ok(written)
}

/// Apply the diff memory file `diff` onto the memory file `base` (Firecracker's
/// `snapshot-editor edit-memory rebase`): every data range of `diff` is copied to the same
/// offset of `base`; its holes leave `base` as it is. Both must be the same size (one VM's
/// memory). Returns the bytes copied. The state file to restore with is the diff's.
pub fn merge_memory(base: &Path, diff: &Path) -> Result<u64> {
    let d = std::fs::File::open(diff).map_err(io_err(diff))?;
    let b = std::fs::OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(io_err(base))?;
    let (dlen, blen) = (
        d.metadata().map_err(io_err(diff))?.len(),
        b.metadata().map_err(io_err(base))?.len(),
    );
    if dlen != blen {
        return Err(Error::Io {
            path: diff.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{dlen} bytes, but the base memory file {} has {blen}: not a diff of the same VM",
                    base.display()
                ),
            ),
        });
    }
    let mut buf = vec![0u8; CHUNK];
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < dlen {
        let Some(start) = seek(&d, pos, libc::SEEK_DATA).map_err(io_err(diff))? else {
            break;
        };
        let end = seek(&d, start, libc::SEEK_HOLE)
            .map_err(io_err(diff))?
            .unwrap_or(dlen)
            .min(dlen);
        let mut at = start;
        while at < end {
            let n = (end - at).min(CHUNK as u64) as usize;
            d.read_exact_at(&mut buf[..n], at).map_err(io_err(diff))?;
            b.write_all_at(&buf[..n], at).map_err(io_err(base))?;
            at += n as u64;
            copied += n as u64;
        }
        pos = end;
    }
    b.sync_all().map_err(io_err(base))?;
    Ok(copied)
}

/// lseek with SEEK_DATA/SEEK_HOLE; `None` past the last data (ENXIO).
fn seek(f: &std::fs::File, from: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on a file descriptor we own; it only moves the file offset.
    let r = unsafe { libc::lseek(f.as_raw_fd(), from as libc::off_t, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Guest memory with the regions `ranges` (guest address, length; sorted) backed by a
/// private mapping of the memory file: pages are read from it on first touch and the guest's
/// writes stay in this process. Refused if the file is smaller than the regions.
pub fn map_memory(path: &Path, ranges: &[(GuestAddress, usize)]) -> Result<GuestMemoryMmap> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    let meta = file.metadata().map_err(io_err(path))?;
    let needed: u64 = ranges.iter().map(|r| r.1 as u64).sum();
    if !meta.is_file() || meta.len() < needed {
        return Err(Error::MemoryTooSmall {
            path: path.display().to_string(),
            size: meta.len(),
            needed,
        });
    }
    let map_err = |msg: String| Error::Map {
        path: path.display().to_string(),
        msg,
    };
    let file = std::sync::Arc::new(file);
    let mut regions = Vec::with_capacity(ranges.len());
    let mut off = 0u64;
    for &(addr, len) in ranges {
        let mapping = MmapRegionBuilder::new_with_bitmap(len, GuestBitmap::with_len(len))
            .with_file_offset(FileOffset::from_arc(file.clone(), off))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        regions.push(
            GuestRegionMmap::new(mapping, addr)
                .ok_or_else(|| map_err(format!("region at {:#x} overflows", addr.0)))?,
        );
        off += len as u64;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn ranges() -> Vec<(GuestAddress, usize)> {
        vec![
            (GuestAddress(0), 8 << 20),
            (GuestAddress(0x1_0000_0000), 4 << 20),
        ]
    }

    #[test]
    fn sparse_full_then_diff_then_private_map() {
        let dir = std::env::temp_dir().join(format!("kvmbox-snapmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("mem");
        let mem = GuestMemoryMmap::from_ranges(&ranges()).unwrap();
        mem.write_slice(&[0xab; 10], GuestAddress(0x1234)).unwrap();
        mem.write_slice(&[0xcd; 3], GuestAddress(0x1_0000_0000 + (3 << 20)))
            .unwrap();
        let n = write_memory(&mem, &p, PageFilter::Full).unwrap();
        assert_eq!(n, 2 * PAGE_SIZE, "only the two non-zero pages are written");
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 12 << 20);
        assert!(
            meta.blocks() * 512 <= 64 * 1024,
            "sparse: {} bytes on disk",
            meta.blocks() * 512
        );

        // Diff: one page changed (to zero), one page written.
        mem.write_slice(&[0; 10], GuestAddress(0x1234)).unwrap();
        mem.write_slice(&[0x77; 1], GuestAddress(0x5000)).unwrap();
        let dirty = |a: GuestAddress| a.0 == 0x1000 || a.0 == 0x5000;
        let n = write_memory(&mem, &p, PageFilter::Only(&dirty)).unwrap();
        assert_eq!(n, 2 * PAGE_SIZE);

        let back = map_memory(&p, &ranges()).unwrap();
        let mut b = [0u8; 10];
        back.read_slice(&mut b, GuestAddress(0x1234)).unwrap();
        assert_eq!(b, [0; 10]);
        let v: u8 = back.read_obj(GuestAddress(0x5000)).unwrap();
        assert_eq!(v, 0x77);
        let v: u8 = back
            .read_obj(GuestAddress(0x1_0000_0000 + (3 << 20) + 2))
            .unwrap();
        assert_eq!(v, 0xcd);
        // Private: guest writes do not reach the file.
        back.write_obj(0x99u8, GuestAddress(0x5000)).unwrap();
        let again = map_memory(&p, &ranges()).unwrap();
        assert_eq!(again.read_obj::<u8>(GuestAddress(0x5000)).unwrap(), 0x77);

        // A full snapshot of the restored VM over the very file its RAM maps: the mapped
        // pages stay (no SIGBUS from a truncated mapping) and the new file is complete.
        back.write_obj(0x42u8, GuestAddress(0x1_0000_0000 + (3 << 20) + 2))
            .unwrap();
        write_memory(&back, &p, PageFilter::Full).unwrap();
        assert_eq!(back.read_obj::<u8>(GuestAddress(0x5000)).unwrap(), 0x99);
        let v: u8 = back.read_obj(GuestAddress(0x1234 + 0x7000)).unwrap();
        assert_eq!(v, 0);
        let newer = map_memory(&p, &ranges()).unwrap();
        assert_eq!(newer.read_obj::<u8>(GuestAddress(0x5000)).unwrap(), 0x99);
        let v: u8 = newer
            .read_obj(GuestAddress(0x1_0000_0000 + (3 << 20) + 2))
            .unwrap();
        assert_eq!(v, 0x42);
        assert!(!crate::temporary(&p).exists());

        // A file smaller than the VM is refused.
        let small = dir.join("small");
        std::fs::write(&small, vec![0u8; 4096]).unwrap();
        let e = map_memory(&small, &ranges()).unwrap_err();
        assert!(e.is_user_error());
        assert!(
            e.to_string()
                .contains("smaller than the VM's 12582912 bytes"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_diff_in_its_own_file_merges_onto_its_base() {
        let dir = std::env::temp_dir().join(format!("kvmbox-snapmerge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (base, diff) = (dir.join("base"), dir.join("diff"));
        let mem = GuestMemoryMmap::from_ranges(&ranges()).unwrap();
        mem.write_slice(&[0x11; 4096], GuestAddress(0x2000))
            .unwrap();
        mem.write_slice(&[0x22; 4096], GuestAddress(0x7000))
            .unwrap();
        write_memory(&mem, &base, PageFilter::Full).unwrap();
        // A stale file of another size is replaced, not written into.
        std::fs::write(&diff, vec![0x55u8; 8192]).unwrap();
        // Changed since: one page zeroed (it must reach the base as zeros), one written in the
        // high region.
        mem.write_slice(&[0; 4096], GuestAddress(0x2000)).unwrap();
        let high = GuestAddress(0x1_0000_0000 + 0x3000);
        mem.write_slice(&[0x33; 4096], high).unwrap();
        let dirty = |a: GuestAddress| a.0 == 0x2000 || a == high;
        assert_eq!(
            write_memory(&mem, &diff, PageFilter::Only(&dirty)).unwrap(),
            2 * PAGE_SIZE
        );
        assert_eq!(std::fs::metadata(&diff).unwrap().len(), 12 << 20);
        assert_eq!(merge_memory(&base, &diff).unwrap(), 2 * PAGE_SIZE);
        let back = map_memory(&base, &ranges()).unwrap();
        for (addr, want) in [
            (0x2000, 0),
            (0x7000, 0x22),
            (0x1_0000_3000, 0x33),
            (0x9000, 0),
        ] {
            let v: u8 = back.read_obj(GuestAddress(addr + 17)).unwrap();
            assert_eq!(v, want, "{addr:#x}");
        }
        // A diff of another VM's memory is refused.
        std::fs::write(&diff, vec![1u8; 4096]).unwrap();
        let e = merge_memory(&base, &diff).unwrap_err();
        assert!(e.to_string().contains("not a diff of the same VM"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
