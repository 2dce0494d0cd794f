//! Guest-physical memory: RAM through host pointers into the guest's mmap, everything else
//! (MMIO, the local APIC page) through the VMM's I/O handler or the interrupt controller.

use kvmbox_cpu::watch::CodePages;
use kvmbox_cpu::GuestMemoryMmap;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// One contiguous RAM region.
#[derive(Clone, Copy, Debug)]
struct Ram {
    start: u64,
    len: u64,
    host: *mut u8,
    /// Its index in the guest memory (for its dirty bitmap).
    index: usize,
}

/// The engine's side of the dirty log ([`kvmbox_cpu::Vm::start_dirty_log`]), shared by the VM
/// and its vCPUs. While it is on, the engine marks a page in vm-memory's bitmap of its region
/// whenever it installs a writable translation of it (only writes install one then), writes
/// a page-table entry's accessed/dirty bits, or writes a kvm-clock record; every vCPU drops
/// its writable translations when `epoch` moves (the log was started or taken), so the next
/// write to a page marks it again.
#[derive(Default, Debug)]
pub struct DirtyState {
    on: AtomicBool,
    epoch: AtomicU64,
}

impl DirtyState {
    /// Whether the log is on.
    #[inline]
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Moves whenever every vCPU must drop its writable translations.
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Turn the log on.
    pub fn start(&self) {
        self.on.store(true, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// The log was taken: writable translations must go.
    pub fn taken(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }
}

/// The guest's physical address space as the engine sees it.
#[derive(Clone)]
pub struct PhysMem {
    /// Keeps the mappings alive for as long as the host pointers below are used.
    mem: GuestMemoryMmap,
    ram: Vec<Ram>,
    dirty: Arc<DirtyState>,
    /// The generations of the pages code is translated from, which every write through
    /// vm-memory (DMA, the VMM) reports to, and the engine's own writes too (`Cpu::note_write`).
    code: Arc<CodePages>,
}

// SAFETY: the raw pointers point into mmap'd regions owned (through Arc) by `mem`, which is
// itself Send + Sync; the pointers are only dereferenced while `mem` is alive.
unsafe impl Send for PhysMem {}
// SAFETY: as above; concurrent access is to guest memory, which the guest itself synchronises
// (LOCK-prefixed instructions use host atomics).
unsafe impl Sync for PhysMem {}

impl PhysMem {
    /// Wrap guest memory (cheap: the regions are reference counted).
    pub fn new(mem: GuestMemoryMmap) -> Self {
        let mut ram = Vec::new();
        for (index, r) in mem.iter().enumerate() {
            if let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) {
                ram.push(Ram {
                    start: r.start_addr().0,
                    len: r.len(),
                    host,
                    index,
                });
            }
        }
        ram.sort_by_key(|r| r.start);
        let code = CodePages::of(&mem);
        PhysMem {
            mem,
            ram,
            dirty: Arc::default(),
            code,
        }
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The generations of the guest's pages (`kvmbox_cpu::watch`).
    #[inline]
    pub fn code(&self) -> &CodePages {
        &self.code
    }

    /// The dirty-log state shared with every vCPU.
    pub fn dirty(&self) -> &Arc<DirtyState> {
        &self.dirty
    }

    /// Note a write of `len` bytes at RAM address `pa` in the dirty log, when it is on.
    #[inline]
    pub fn mark_dirty(&self, pa: u64, len: u64) {
        if !self.dirty.on() {
            return;
        }
        for r in &self.ram {
            if pa >= r.start && pa - r.start < r.len {
                if let Some(reg) = self.mem.iter().nth(r.index) {
                    kvmbox_cpu::region_dirty_bitmap(reg)
                        .mark_dirty((pa - r.start) as usize, len.max(1) as usize);
                }
                return;
            }
        }
    }

    /// Host pointer for `[pa, pa + len)` if it lies entirely in one RAM region.
    #[inline]
    pub fn host(&self, pa: u64, len: u64) -> Option<*mut u8> {
        for r in &self.ram {
            if pa >= r.start && pa - r.start < r.len {
                let off = pa - r.start;
                if len <= r.len - off {
                    // SAFETY: off < r.len, so the result stays inside the mapping.
                    return Some(unsafe { r.host.add(off as usize) });
                }
                return None;
            }
        }
        None
    }

    /// Read a little-endian u64 at an 8-aligned RAM address (page-table entries).
    pub fn read_u64(&self, pa: u64) -> Option<u64> {
        let p = self.host(pa, 8)?;
        if !(p as usize).is_multiple_of(8) {
            return None;
        }
        // SAFETY: p is valid for 8 bytes (checked by host()) and 8-aligned.
        Some(unsafe { &*(p as *const AtomicU64) }.load(Ordering::Relaxed))
    }

    /// Read a little-endian u32 at a 4-aligned RAM address (32-bit page-table entries).
    pub fn read_u32(&self, pa: u64) -> Option<u32> {
        let p = self.host(pa, 4)?;
        if !(p as usize).is_multiple_of(4) {
            return None;
        }
        // SAFETY: p is valid for 4 bytes and 4-aligned.
        Some(unsafe { &*(p as *const AtomicU32) }.load(Ordering::Relaxed))
    }

    /// Atomically OR `bits` into the u64 at RAM address `pa` (accessed/dirty bits).
    pub fn or_u64(&self, pa: u64, bits: u64) {
        if let Some(p) = self.host(pa, 8) {
            if (p as usize).is_multiple_of(8) {
                // SAFETY: p is valid for 8 bytes and 8-aligned.
                let old = unsafe { &*(p as *const AtomicU64) }.fetch_or(bits, Ordering::SeqCst);
                if old | bits != old {
                    self.mark_dirty(pa, 8);
                }
            }
        }
    }

    /// Atomically OR `bits` into the u32 at RAM address `pa`.
    pub fn or_u32(&self, pa: u64, bits: u32) {
        if let Some(p) = self.host(pa, 4) {
            if (p as usize).is_multiple_of(4) {
                // SAFETY: p is valid for 4 bytes and 4-aligned.
                let old = unsafe { &*(p as *const AtomicU32) }.fetch_or(bits, Ordering::SeqCst);
                if old | bits != old {
                    self.mark_dirty(pa, 4);
                }
            }
        }
    }
}

/// Plain (non-atomic) load of `size` bytes (1, 2, 4, 8) from a host pointer.
///
/// # Safety
/// `p` must be valid for `size` bytes.
#[inline]
pub unsafe fn load(p: *const u8, size: u32) -> u64 {
    // SAFETY: the caller guarantees validity; unaligned reads are used throughout.
    unsafe {
        match size {
            1 => u64::from(*p),
            2 => u64::from((p as *const u16).read_unaligned()),
            4 => u64::from((p as *const u32).read_unaligned()),
            _ => (p as *const u64).read_unaligned(),
        }
    }
}

/// Plain store of the low `size` bytes of `v` to a host pointer.
///
/// # Safety
/// `p` must be valid for `size` bytes.
#[inline]
pub unsafe fn store(p: *mut u8, size: u32, v: u64) {
    // SAFETY: the caller guarantees validity.
    unsafe {
        match size {
            1 => *p = v as u8,
            2 => (p as *mut u16).write_unaligned(v as u16),
            4 => (p as *mut u32).write_unaligned(v as u32),
            _ => (p as *mut u64).write_unaligned(v),
        }
    }
}

/// Atomic 16-byte compare-and-exchange at `p` (CMPXCHG16B): if the 16 bytes equal `old`
/// they become `new`; returns the value found. On an x86-64 host this is the host's
/// `lock cmpxchg16b`, so it is atomic against every other vCPU thread's locked accesses.
///
/// # Safety
/// `p` must be valid for 16 bytes and 16-byte aligned.
pub unsafe fn cmpxchg16(p: *mut u8, old: u128, new: u128) -> u128 {
    debug_assert!((p as usize).is_multiple_of(16));
    #[cfg(target_arch = "x86_64")]
    {
        let (mut lo, mut hi) = (old as u64, (old >> 64) as u64);
        // SAFETY: the caller guarantees p is valid for 16 bytes and 16-byte aligned, as
        // `cmpxchg16b` requires. RBX cannot be named as an operand (LLVM reserves it), so the
        // low half of `new` is swapped into it around the instruction and RBX is restored
        // before the block ends; RAX:RDX receive the value found (on success it equals `old`).
        unsafe {
            std::arch::asm!(
                "xchg {nlo}, rbx",
                "lock cmpxchg16b xmmword ptr [{p}]",
                "mov rbx, {nlo}",
                p = in(reg) p,
                nlo = inout(reg) new as u64 => _,
                inout("rax") lo,
                inout("rdx") hi,
                in("rcx") (new >> 64) as u64,
                options(nostack),
            );
        }
        u128::from(lo) | (u128::from(hi) << 64)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static LOCK16: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _g = LOCK16.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the caller guarantees p is valid for 16 bytes.
        unsafe {
            let cur = (p as *const u128).read_unaligned();
            if cur == old {
                (p as *mut u128).write_unaligned(new);
            }
            cur
        }
    }
}

/// The process-wide lock of split locked accesses (x86 allows them): misaligned ones in one page
/// ([`cmpxchg`]) and those crossing a page ([`rmw_split`]). They are atomic with respect to each
/// other; an aligned locked access to part of the same bytes does not take it.
fn split_lock() -> std::sync::MutexGuard<'static, ()> {
    static SPLIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SPLIT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Locked read-modify-write of a `size`-byte (at most 8) little-endian value whose first `n1`
/// bytes are at `p1` and the rest at `p2` (an access crossing a page: two host pieces), under
/// the split lock; returns the old value. `f` gets the old value and returns the new one.
///
/// # Safety
/// `p1` must be valid for `n1` bytes and `p2` for `size - n1` bytes, with `0 < n1 < size <= 8`.
pub unsafe fn rmw_split(
    p1: *mut u8,
    n1: usize,
    p2: *mut u8,
    size: u32,
    f: &mut dyn FnMut(u64) -> u64,
) -> u64 {
    let size = size as usize;
    debug_assert!(0 < n1 && n1 < size && size <= 8);
    let _g = split_lock();
    let mut b = [0u8; 8];
    // SAFETY: the caller guarantees both pieces are valid; b has room for size bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(p1, b.as_mut_ptr(), n1);
        std::ptr::copy_nonoverlapping(p2, b.as_mut_ptr().add(n1), size - n1);
    }
    let old = u64::from_le_bytes(b);
    let new = f(old).to_le_bytes();
    // SAFETY: as above.
    unsafe {
        std::ptr::copy_nonoverlapping(new.as_ptr(), p1, n1);
        std::ptr::copy_nonoverlapping(new.as_ptr().add(n1), p2, size - n1);
    }
    old
}

/// Atomic compare-and-exchange of `size` bytes at `p`; returns the value found.
/// Falls back to the process-wide split lock for misaligned addresses (x86 allows split locks).
///
/// # Safety
/// `p` must be valid for `size` bytes.
pub unsafe fn cmpxchg(p: *mut u8, size: u32, old: u64, new: u64) -> u64 {
    let aligned = (p as usize).is_multiple_of(size as usize);
    if !aligned {
        let _g = split_lock();
        // SAFETY: the caller guarantees validity.
        let cur = unsafe { load(p, size) };
        if cur == old {
            // SAFETY: as above.
            unsafe { store(p, size, new) };
        }
        return cur;
    }
    // SAFETY: (all arms) p is valid for size bytes and aligned to size.
    unsafe {
        match size {
            1 => (*(p as *const AtomicU8))
                .compare_exchange(old as u8, new as u8, Ordering::SeqCst, Ordering::SeqCst)
                .map_or_else(u64::from, u64::from),
            2 => (*(p as *const AtomicU16))
                .compare_exchange(old as u16, new as u16, Ordering::SeqCst, Ordering::SeqCst)
                .map_or_else(u64::from, u64::from),
            4 => (*(p as *const AtomicU32))
                .compare_exchange(old as u32, new as u32, Ordering::SeqCst, Ordering::SeqCst)
                .map_or_else(u64::from, u64::from),
            _ => (*(p as *const AtomicU64))
                .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
                .unwrap_or_else(|v| v),
        }
    }
}
