//! The dirty-page log every backend returns from [`crate::Vm::take_dirty_log`]: one bit per
//! 4 KiB guest page, per RAM region, in KVM_GET_DIRTY_LOG's and vm-memory's `AtomicBitmap`'s
//! layout (bit `i % 64` of word `i / 64` is page `i` of the region), so both merge with an OR.

use crate::{GuestMemoryMmap, GuestRegionMmap};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Granularity of the dirty log.
pub const DIRTY_PAGE_SIZE: u64 = 4096;

/// The dirty pages of one guest-RAM region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyRegion {
    /// Guest-physical start.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// One bit per page.
    pub bits: Vec<u64>,
}

/// Pages written since the log was last taken, for every guest-RAM region in guest-address
/// order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyLog {
    regions: Vec<DirtyRegion>,
}

impl DirtyLog {
    /// Take and clear vm-memory's bitmaps of `mem`: the pages the VMM wrote through
    /// vm-memory, and on the engine the guest's too.
    pub fn take_from_memory(mem: &GuestMemoryMmap) -> DirtyLog {
        let regions = mem
            .iter()
            .map(|r| {
                let mut bits = bitmap(r).get_and_reset();
                bits.resize(words(r.len()), 0);
                DirtyRegion {
                    start: r.start_addr().0,
                    len: r.len(),
                    bits,
                }
            })
            .collect();
        DirtyLog { regions }
    }

    /// OR `bits` (KVM's log of the region starting at `start`) into this log.
    pub fn merge(&mut self, start: u64, bits: &[u64]) {
        if let Some(r) = self.regions.iter_mut().find(|r| r.start == start) {
            for (a, b) in r.bits.iter_mut().zip(bits) {
                *a |= b;
            }
        }
    }

    /// Set the pages of this log in vm-memory's bitmaps of `mem` again, so the next
    /// [`crate::Vm::take_dirty_log`] returns them too (a snapshot that failed after taking the
    /// log must not lose it).
    pub fn put_back(&self, mem: &GuestMemoryMmap) {
        for (reg, d) in mem.iter().zip(&self.regions) {
            for page in d.pages() {
                bitmap(reg).mark_dirty(page as usize * DIRTY_PAGE_SIZE as usize, 1);
            }
        }
    }

    /// Whether the page holding guest-physical `gpa` was written.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        self.regions
            .iter()
            .find(|r| gpa >= r.start && gpa - r.start < r.len)
            .is_some_and(|r| {
                let page = (gpa - r.start) / DIRTY_PAGE_SIZE;
                r.bits
                    .get((page / 64) as usize)
                    .is_some_and(|w| w & (1 << (page % 64)) != 0)
            })
    }

    /// How many pages were written.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| &r.bits)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The regions.
    pub fn regions(&self) -> &[DirtyRegion] {
        &self.regions
    }
}

impl DirtyRegion {
    /// Indexes (within the region) of its dirty pages.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        let last = self.len.div_ceil(DIRTY_PAGE_SIZE);
        self.bits
            .iter()
            .enumerate()
            .flat_map(|(i, &w)| {
                (0..64u64)
                    .filter(move |b| w & (1 << b) != 0)
                    .map(move |b| i as u64 * 64 + b)
            })
            .filter(move |&p| p < last)
    }
}

/// vm-memory's whole-region bitmap of `r` (the trait's `bitmap()` is a slice view).
pub fn bitmap(r: &GuestRegionMmap) -> &AtomicBitmap {
    crate::watch::region_bitmap(r).dirty()
}

/// u64 words of a bitmap covering `len` bytes.
pub fn words(len: u64) -> usize {
    len.div_ceil(DIRTY_PAGE_SIZE).div_ceil(64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn vmm_writes_are_logged_merged_and_put_back() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        let _ = DirtyLog::take_from_memory(&mem);
        mem.write_obj(7u32, GuestAddress(0x3004)).unwrap();
        // Two pages: the write straddles a page boundary.
        mem.write_slice(&[1; 8], GuestAddress((1 << 32) + 0x1ffc))
            .unwrap();
        let mut log = DirtyLog::take_from_memory(&mem);
        assert_eq!(log.count(), 3);
        assert!(log.is_dirty(0x3fff) && !log.is_dirty(0x4000) && !log.is_dirty(0x2fff));
        assert!(log.is_dirty((1 << 32) + 0x1000) && log.is_dirty((1 << 32) + 0x2000));
        // KVM's log of the first region.
        log.merge(0, &[1 << 9]);
        assert!(log.is_dirty(0x9000));
        assert_eq!(log.count(), 4);
        // Taking clears; putting back restores.
        assert_eq!(DirtyLog::take_from_memory(&mem).count(), 0);
        log.put_back(&mem);
        assert_eq!(DirtyLog::take_from_memory(&mem), log);
    }
}
