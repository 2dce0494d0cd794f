//! A large per-vCPU table (the block cache) in its own anonymous mapping: zeroed, its pages
//! touched only as entries are written, and backed by huge pages where the host allows. A
//! lookup in a 16 MiB table of 4 KiB pages misses the host's TLB as well as its caches; with
//! 2 MiB pages the table takes 8 TLB entries. Also the anonymous mapping itself
//! (`map_anonymous`), which the JIT's code cache is made of too.

use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// `len` entries of `T`, all zeros to begin with.
pub(crate) struct ZeroedTable<T> {
    ptr: NonNull<T>,
    len: usize,
    /// Bytes mapped (a whole number of pages).
    bytes: usize,
}

impl<T> ZeroedTable<T> {
    /// A table of `len` zeroed entries. None when the mapping fails.
    ///
    /// # Safety
    /// All zeros must be a valid `T`.
    pub(crate) unsafe fn new(len: usize) -> Option<Self> {
        let bytes = ((len.checked_mul(std::mem::size_of::<T>())? + 4095) & !4095).max(4096);
        assert!(std::mem::align_of::<T>() <= 4096);
        let p = map_anonymous(bytes)?;
        // SAFETY: the mapping just made; MADV_HUGEPAGE changes how the kernel backs it, never
        // its contents (and failing to is harmless).
        unsafe { libc::madvise(p as *mut libc::c_void, bytes, libc::MADV_HUGEPAGE) };
        Some(ZeroedTable {
            ptr: NonNull::new(p as *mut T)?,
            len,
            bytes,
        })
    }
}

/// A fresh private anonymous mapping of `bytes` (a whole number of pages), readable and
/// writable, zero-filled, its pages reserved only as they are touched; None when it fails.
/// The caller owns it and unmaps it.
pub(crate) fn map_anonymous(bytes: usize) -> Option<*mut u8> {
    // SAFETY: a new mapping at an address the kernel picks; nothing else refers to it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as *mut u8)
}

impl<T> Deref for ZeroedTable<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `len` entries, initialised (zeros are a valid `T`, `new`'s contract), owned
        // by this table.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> DerefMut for ZeroedTable<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T> Drop for ZeroedTable<T> {
    fn drop(&mut self) {
        // SAFETY: the entries are valid and dropped once, here; then the mapping from `new`
        // goes, with nothing left referring to it.
        unsafe {
            std::ptr::drop_in_place(&mut **self as *mut [T]);
            libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.bytes);
        }
    }
}

// SAFETY: the table owns its entries like a `Box<[T]>` does.
unsafe impl<T: Send> Send for ZeroedTable<T> {}
