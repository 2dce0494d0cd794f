//! Writes to guest pages a software CPU engine translated code from.
//!
//! The software engine (crate `kvmbox-emu`) caches what it decoded and compiled from guest
//! code by physical page. [`CodePages`] gives every RAM page a generation: a page whose code is
//! cached is *watched* (the generation is odd), and the first write to a watched page moves
//! its generation on and stops watching it, so a cached translation is still good exactly when
//! its page's generation is the one it was made at. The engine reports its own writes; every
//! other write (virtio DMA, loaders, the VMM) goes through vm-memory, whose per-region
//! [`GuestBitmap`] reports it here once the engine has attached its pages ([`CodePages::of`]).
//!
//! A write and a translation of the same page on two threads at the same moment are not
//! ordered: the translation may keep the bytes from just before the write (as a CPU that
//! fetched them just before another CPU's store may; the guest must synchronise
//! cross-modifying code anyway). Every later write is seen.

use crate::{GuestMemoryMmap, GuestRegionMmap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// The generation of every 4 KiB page below the end of guest RAM (see the module).
pub struct CodePages {
    gens: Box<[AtomicU64]>,
}

impl std::fmt::Debug for CodePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CodePages({} pages)", self.gens.len())
    }
}

impl CodePages {
    /// Generations for the pages of `mem`, none watched.
    pub fn new(mem: &GuestMemoryMmap) -> CodePages {
        let end = mem.iter().map(|r| r.last_addr().0 + 1).max().unwrap_or(0);
        let n = end.div_ceil(4096) as usize;
        // A zeroed allocation (calloc: untouched pages stay unbacked), then its elements as
        // atomics.
        let zeros = vec![0u64; n].into_boxed_slice();
        // SAFETY: AtomicU64 has the size, alignment and bit validity of u64; the box is
        // reinterpreted as a box of the same number of elements of it.
        let gens = unsafe { Box::from_raw(Box::into_raw(zeros) as *mut [AtomicU64]) };
        CodePages { gens }
    }

    /// The generation words, indexed by guest-physical page number (compiled code reads them).
    pub fn as_ptr(&self) -> *const AtomicU64 {
        self.gens.as_ptr()
    }

    /// How many pages have a generation (the others are not RAM).
    pub fn len(&self) -> usize {
        self.gens.len()
    }

    /// Whether there are no pages.
    pub fn is_empty(&self) -> bool {
        self.gens.is_empty()
    }

    /// The generation word of guest-physical page `ppn`, if it has one.
    #[inline]
    pub fn word(&self, ppn: u64) -> Option<&AtomicU64> {
        self.gens.get(ppn as usize)
    }

    /// Page `ppn`'s generation now.
    #[inline]
    pub fn current(&self, ppn: u64) -> u64 {
        self.word(ppn).map_or(0, |g| g.load(Ordering::Acquire))
    }

    /// Code is about to be read from page `ppn` to be cached: watch the page, and return the
    /// generation the translation is good for (call before reading the bytes).
    pub fn watch(&self, ppn: u64) -> u64 {
        let Some(g) = self.word(ppn) else { return 0 };
        let mut v = g.load(Ordering::Acquire);
        while v & 1 == 0 {
            // SeqCst: the page is watched before its bytes are read (a full fence on x86).
            match g.compare_exchange(v, v + 1, Ordering::SeqCst, Ordering::Acquire) {
                Ok(_) => return v + 1,
                Err(now) => v = now,
            }
        }
        v
    }

    /// Page `ppn` is written: if it is watched, its generation moves on and it is no longer
    /// watched.
    #[inline]
    pub fn written_page(&self, ppn: u64) {
        let Some(g) = self.word(ppn) else { return };
        let mut v = g.load(Ordering::Acquire);
        while v & 1 != 0 {
            match g.compare_exchange(v, v + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(now) => v = now,
            }
        }
    }

    /// `len` bytes at guest-physical `pa` are written.
    #[inline]
    pub fn written(&self, pa: u64, len: u64) {
        let last = pa.saturating_add(len.max(1) - 1) >> 12;
        for ppn in pa >> 12..=last {
            self.written_page(ppn);
        }
    }
}

/// vm-memory's bitmap of one guest-RAM region: its dirty pages (the dirty log,
/// [`crate::Vm::take_dirty_log`]), and, once attached ([`CodePages::of`]), the report of every
/// write to [`CodePages`].
#[derive(Debug)]
pub struct GuestBitmap {
    dirty: AtomicBitmap,
    /// The pages to report writes to, and the region's guest-physical start.
    watch: OnceLock<(Arc<CodePages>, u64)>,
}

impl GuestBitmap {
    /// The dirty-page bitmap.
    pub fn dirty(&self) -> &AtomicBitmap {
        &self.dirty
    }
}

impl Default for GuestBitmap {
    fn default() -> Self {
        GuestBitmap {
            dirty: AtomicBitmap::default(),
            watch: OnceLock::new(),
        }
    }
}

impl<'a> WithBitmapSlice<'a> for GuestBitmap {
    type S = RefSlice<'a, GuestBitmap>;
}

impl Bitmap for GuestBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.dirty.mark_dirty(offset, len);
        if let Some((pages, start)) = self.watch.get() {
            pages.written(start + offset as u64, len as u64);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.dirty.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for GuestBitmap {
    fn with_len(len: usize) -> Self {
        GuestBitmap {
            dirty: AtomicBitmap::with_len(len),
            watch: OnceLock::new(),
        }
    }
}

/// The whole-region bitmap of `r` (the trait's `bitmap()` is a slice view).
pub fn region_bitmap(r: &GuestRegionMmap) -> &GuestBitmap {
    vm_memory::MmapRegion::bitmap(r)
}

/// Report every write made through vm-memory to `mem` from now on to `pages`. A region
/// already attached keeps its pages ([`CodePages::of`] finds them).
fn attach(mem: &GuestMemoryMmap, pages: &Arc<CodePages>) {
    for r in mem.iter() {
        let _ = region_bitmap(r)
            .watch
            .set((pages.clone(), r.start_addr().0));
    }
}

impl CodePages {
    /// The pages attached to `mem`, or new ones attached now: every engine over the same
    /// memory shares them.
    pub fn of(mem: &GuestMemoryMmap) -> Arc<CodePages> {
        if let Some((pages, _)) = mem.iter().next().and_then(|r| region_bitmap(r).watch.get()) {
            return pages.clone();
        }
        let pages = Arc::new(CodePages::new(mem));
        attach(mem, &pages);
        pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn writes_through_vm_memory_move_a_watched_page_once() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x10000), 0x4000),
        ])
        .unwrap();
        let pages = CodePages::of(&mem);
        assert_eq!(pages.len(), 0x14);
        assert!(Arc::ptr_eq(&pages, &CodePages::of(&mem)));
        let g = pages.watch(0x11);
        assert_eq!(g & 1, 1);
        assert_eq!(pages.current(0x11) & 1, 1, "watched");
        // Another page of the region: no change.
        mem.write_obj(7u32, GuestAddress(0x12000)).unwrap();
        assert_eq!(pages.current(0x11), g);
        // A write crossing into the watched page (at the region's offset 0x1ffe).
        mem.write_obj(7u32, GuestAddress(0x10ffe)).unwrap();
        let after = pages.current(0x11);
        assert_ne!(after, g);
        assert_eq!(pages.current(0x11) & 1, 0, "no longer watched");
        // Unwatched: further writes leave it.
        mem.write_obj(8u32, GuestAddress(0x11000)).unwrap();
        assert_eq!(pages.current(0x11), after);
        // Watched again: a new generation.
        assert!(pages.watch(0x11) > g);
        // The dirty log still sees the writes.
        assert!(region_bitmap(mem.iter().nth(1).unwrap())
            .dirty()
            .is_addr_set(0x1000));
        // Pages past the end have no generation.
        pages.written(0x100000, 8);
        assert_eq!(pages.watch(0x100), 0);
    }
}
