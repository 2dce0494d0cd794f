//! The guest-memory file: RAM regions back to back in guest-address order, sparse.

use crate::{io_err, Error, Result};
use std::os::unix::fs::FileExt;
use std::path::Path;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap,
};

/// Granularity of the memory file (and of dirty tracking).
pub const PAGE_SIZE: u64 = 4096;
/// Guest memory is read in chunks of this many bytes.
const CHUNK: usize = 1 << 20;

/// Which pages [`write_memory`] writes.
pub enum PageFilter<'a> {
    /// A full snapshot: every page that is not zero (zero pages stay holes).
    Full,
    /// A diff snapshot: exactly the pages for whose guest address this returns true, written
    /// over the file in place (zero or not), the rest of the file left as it was.
    Only(&'a dyn Fn(GuestAddress) -> bool),
}

/// Bytes of guest RAM, which is the memory file's size.
pub fn memory_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Write guest RAM to `path`. Returns the bytes of data actually written (the rest are
/// holes, or for [`PageFilter::Only`] untouched).
///
/// A full snapshot replaces `path` whole (written beside it, then renamed over it): a crash
/// leaves the previous file intact, and a VM restored from `path`, whose RAM maps it, keeps
/// its pages (truncating a mapped file would fault the VMM with SIGBUS). A diff snapshot
/// writes into `path` in place: the pages it writes are ones the guest dirtied, which a VM
/// restored from `path` holds as private copies.
pub fn write_memory(mem: &GuestMemoryMmap, path: &Path, pages: PageFilter<'_>) -> Result<u64> {
    let full = matches!(pages, PageFilter::Full);
    let target = if full {
        crate::temporary(path)
    } else {
        path.to_path_buf()
    };
    let written = write_pages(mem, &target, &pages)?;
    if full {
        std::fs::rename(&target, path).map_err(io_err(path))?;
    }
    Ok(written)
}

fn write_pages(mem: &GuestMemoryMmap, path: &Path, pages: &PageFilter<'_>) -> Result<u64> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(matches!(pages, PageFilter::Full))
        .open(path)
        .map_err(io_err(path))?;
    let mut buf = vec![0u8; CHUNK];
    let mut file_off = 0u64;
    let mut written = 0u64;
    for r in mem.iter() {
        let start = r.start_addr();
        let len = r.len();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, start.unchecked_add(done))
                .map_err(|e| Error::Io {
                    path: path.display().to_string(),
                    source: std::io::Error::other(format!("reading guest memory: {e}")),
                })?;
            for (i, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
                let off = done + i as u64 * PAGE_SIZE;
                let take = match pages {
                    PageFilter::Full => page.iter().any(|&b| b != 0),
                    PageFilter::Only(dirty) => dirty(start.unchecked_add(off)),
                };
                if take {
                    f.write_all_at(page, file_off + off).map_err(io_err(path))?;
                    written += page.len() as u64;
                }
            }
            done += n as u64;
        }
        file_off += len;
    }
    if f.metadata().map_err(io_err(path))?.len() < file_off {
        // Trailing zero pages: the file still spans all of RAM.
        f.set_len(file_off).map_err(io_err(path))?;
    }
    f.sync_all().map_err(io_err(path))?;
    Ok(written)
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
        let mapping = MmapRegionBuilder::new(len)
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
}
