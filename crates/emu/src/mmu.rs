//! Linear-to-physical translation: the page walker (32-bit, PAE and 4-level paging) and a
//! direct-mapped TLB that also caches the host pointer of each RAM page.

use crate::cpu::{Cpu, Fault, R};
use crate::state::{cr0, cr4, efer};

/// Access kinds.
pub const ACC_R: u8 = 0;
/// Write access.
pub const ACC_W: u8 = 1;
/// Instruction fetch.
pub const ACC_X: u8 = 2;

const TLB_BITS: usize = 10;
pub(crate) const TLB_SIZE: usize = 1 << TLB_BITS;
const INVALID: u64 = u64::MAX;
/// Physical address width advertised in CPUID 0x80000008.
pub const MAXPHYADDR: u32 = 40;
const PHYS_MASK: u64 = ((1u64 << MAXPHYADDR) - 1) & !0xfff;

/// One cached translation of a 4 KiB linear page.
#[derive(Clone, Copy, Debug)]
pub struct TlbEntry {
    /// Linear page number, or `INVALID`.
    pub tag: u64,
    /// Host address of the page when it is RAM, else null.
    pub host: *mut u8,
    /// Physical page address.
    pub ppage: u64,
    /// Allowed accesses: bit (acc + 3 * user).
    pub perm: u8,
    /// `perm` for a RAM page in the TLB, else 0: what compiled code's inline lookup tests
    /// (permission and RAM in one test).
    pub fast: u8,
    /// From a global mapping (survives CR3 reloads).
    pub global: bool,
}

const EMPTY: TlbEntry = TlbEntry {
    tag: INVALID,
    host: std::ptr::null_mut(),
    ppage: 0,
    perm: 0,
    fast: 0,
    global: false,
};

/// The TLB.
pub struct Tlb {
    /// The entries (a thin pointer: the JIT's code indexes it).
    pub(crate) e: Box<[TlbEntry; TLB_SIZE]>,
    /// Some entry came from a page larger than 4 KiB (INVLPG then flushes everything).
    large: bool,
    /// Lookups that missed (for the benchmark breakdown).
    pub misses: u64,
}

impl Default for Tlb {
    fn default() -> Self {
        Tlb {
            e: Box::new([EMPTY; TLB_SIZE]),
            large: false,
            misses: 0,
        }
    }
}

impl Tlb {
    /// Drop every entry.
    pub fn flush_all(&mut self) {
        self.e.fill(EMPTY);
        self.large = false;
    }

    /// Drop non-global entries (CR3 reload).
    pub fn flush_nonglobal(&mut self) {
        for e in self.e.iter_mut() {
            if !e.global {
                *e = EMPTY;
            }
        }
    }

    /// Take write permission away from every entry (the dirty log was started or taken).
    pub fn drop_writable(&mut self) {
        let w = need_bit(ACC_W, false) | need_bit(ACC_W, true);
        for e in self.e.iter_mut() {
            e.perm &= !w;
            e.fast &= !w;
        }
    }

    /// INVLPG.
    pub fn flush_page(&mut self, lin: u64) {
        if self.large {
            self.flush_all();
            return;
        }
        let vpn = lin >> 12;
        let e = &mut self.e[(vpn as usize) & (TLB_SIZE - 1)];
        if e.tag == vpn {
            *e = EMPTY;
        }
    }

    /// Cached entry allowing `need` for `lin`.
    #[inline]
    pub fn lookup(&self, lin: u64, need: u8) -> Option<&TlbEntry> {
        let vpn = lin >> 12;
        let e = &self.e[(vpn as usize) & (TLB_SIZE - 1)];
        if e.tag == vpn && e.perm & need != 0 {
            Some(e)
        } else {
            None
        }
    }
}

/// Permission bit for an access kind by a user- or supervisor-mode access.
#[inline]
pub fn need_bit(acc: u8, user: bool) -> u8 {
    1 << (acc + if user { 3 } else { 0 })
}

impl Cpu {
    /// Translate `lin` for `acc` (user = CPL 3 data/code access). Fills the TLB.
    #[inline]
    pub(crate) fn translate(&mut self, lin: u64, acc: u8, user: bool) -> R<TlbEntry> {
        if let Some(e) = self.tlb.lookup(lin, need_bit(acc, user)) {
            return Ok(*e);
        }
        self.tlb.misses += 1;
        let e = self.walk(lin, acc, user)?;
        // Only canonical pages are cached: the JIT's inline lookup relies on a non-canonical
        // address never matching a tag (callers check first; this keeps it true regardless).
        if crate::cpu::canonical(lin) {
            let vpn = lin >> 12;
            let fast = if e.host.is_null() { 0 } else { e.perm };
            self.tlb.e[(vpn as usize) & (TLB_SIZE - 1)] = TlbEntry { fast, ..e };
        }
        Ok(e)
    }

    fn pf(&mut self, lin: u64, acc: u8, user: bool, present: bool, rsvd: bool) -> Fault {
        let mut err = 0u32;
        if present {
            err |= 1;
        }
        if acc == ACC_W {
            err |= 2;
        }
        if user {
            err |= 4;
        }
        if rsvd {
            err |= 8 | 1;
        }
        if acc == ACC_X && self.st.efer & efer::NXE != 0 {
            err |= 16;
        }
        self.st.cr2 = lin;
        Fault::Exc(14, Some(err))
    }

    fn pte64(&self, pa: u64) -> R<u64> {
        self.phys.read_u64(pa).ok_or_else(|| {
            Fault::Stop(format!(
                "page-table entry at physical {pa:#x} is outside guest RAM"
            ))
        })
    }

    /// Walk the page tables for `lin`.
    fn walk(&mut self, lin: u64, acc: u8, user: bool) -> R<TlbEntry> {
        let st = &self.st;
        if st.cr0 & cr0::PG == 0 {
            let ppage = lin & 0xffff_f000;
            return Ok(self.logged(
                acc,
                TlbEntry {
                    tag: lin >> 12,
                    host: self.phys.host(ppage, 4096).unwrap_or(std::ptr::null_mut()),
                    ppage,
                    perm: 0x3f,
                    fast: 0,
                    global: false,
                },
            ));
        }
        let nxe = st.efer & efer::NXE != 0;
        let wp = st.cr0 & cr0::WP != 0;
        let pge = st.cr4 & cr4::PGE != 0;
        // Entries visited (physical address, is 64-bit) so A/D bits can be set after the checks.
        let mut visited: [(u64, bool); 4] = [(0, false); 4];
        let mut nvis = 0;
        let mut u_ok = true;
        let mut w_ok = true;
        let mut nx = false;
        let ppage;
        let leaf_dirty;
        let global;
        let large;
        if st.cr4 & cr4::PAE != 0 {
            let rsvd_base = !((1u64 << MAXPHYADDR) - 1) & !(1u64 << 63) & ((1u64 << 52) - 1);
            let rsvd_nx = if nxe { 0 } else { 1u64 << 63 };
            let (mut table, levels) = if st.long_mode() {
                (st.cr3 & PHYS_MASK, 4)
            } else {
                // PAE: the PDPTE selected by bits 31:30.
                let pdpte_pa = (st.cr3 & 0xffff_ffe0) + ((lin >> 30) & 3) * 8;
                let e = self.pte64(pdpte_pa)?;
                if e & 1 == 0 {
                    return Err(self.pf(lin, acc, user, false, false));
                }
                (e & PHYS_MASK, 2)
            };
            let mut level = levels;
            loop {
                let shift = 12 + 9 * (level - 1);
                let idx = (lin >> shift) & 0x1ff;
                let pa = table + idx * 8;
                let e = self.pte64(pa)?;
                if e & 1 == 0 {
                    return Err(self.pf(lin, acc, user, false, false));
                }
                let ps = e & 0x80 != 0 && (level == 2 || (level == 3 && levels == 4));
                let mut rsvd = e & (rsvd_base | rsvd_nx) != 0;
                if level == 4 && e & 0x80 != 0 {
                    rsvd = true;
                }
                if ps {
                    // Bits 12..shift (except the PAT bit 12) must be zero.
                    let low = ((1u64 << shift) - 1) & !0x1fff;
                    if e & low != 0 {
                        rsvd = true;
                    }
                }
                if rsvd {
                    return Err(self.pf(lin, acc, user, true, true));
                }
                u_ok &= e & 4 != 0;
                w_ok &= e & 2 != 0;
                nx |= nxe && e & (1 << 63) != 0;
                visited[nvis] = (pa, true);
                nvis += 1;
                if level == 1 || ps {
                    let pmask = PHYS_MASK & !((1u64 << shift) - 1);
                    ppage = ((e & pmask) | (lin & ((1u64 << shift) - 1))) & !0xfff;
                    leaf_dirty = e & 0x40 != 0;
                    global = pge && e & 0x100 != 0;
                    large = ps;
                    break;
                }
                table = e & PHYS_MASK;
                level -= 1;
            }
        } else {
            // 32-bit paging.
            let lin32 = lin & 0xffff_ffff;
            let pde_pa = (st.cr3 & 0xffff_f000) + ((lin32 >> 22) * 4);
            let pde = self.phys.read_u32(pde_pa).ok_or_else(|| {
                Fault::Stop(format!(
                    "page-directory entry at physical {pde_pa:#x} is outside guest RAM"
                ))
            })? as u64;
            if pde & 1 == 0 {
                return Err(self.pf(lin, acc, user, false, false));
            }
            u_ok &= pde & 4 != 0;
            w_ok &= pde & 2 != 0;
            visited[0] = (pde_pa, false);
            nvis = 1;
            if pde & 0x80 != 0 && st.cr4 & cr4::PSE != 0 {
                ppage = (pde & 0xffc0_0000) | (lin32 & 0x003f_f000);
                leaf_dirty = pde & 0x40 != 0;
                global = pge && pde & 0x100 != 0;
                large = true;
            } else {
                let pte_pa = (pde & 0xffff_f000) + ((lin32 >> 12) & 0x3ff) * 4;
                let pte = self.phys.read_u32(pte_pa).ok_or_else(|| {
                    Fault::Stop(format!(
                        "page-table entry at physical {pte_pa:#x} is outside guest RAM"
                    ))
                })? as u64;
                if pte & 1 == 0 {
                    return Err(self.pf(lin, acc, user, false, false));
                }
                u_ok &= pte & 4 != 0;
                w_ok &= pte & 2 != 0;
                visited[1] = (pte_pa, false);
                nvis = 2;
                ppage = pte & 0xffff_f000;
                leaf_dirty = pte & 0x40 != 0;
                global = pge && pte & 0x100 != 0;
                large = false;
            }
        }
        // Permission check.
        let ok = match acc {
            ACC_R => !user || u_ok,
            ACC_W => {
                if user {
                    u_ok && w_ok
                } else {
                    w_ok || !wp
                }
            }
            _ => !nx && (!user || u_ok),
        };
        if !ok {
            return Err(self.pf(lin, acc, user, true, false));
        }
        // Accessed bits on every level, dirty on the leaf for writes.
        for (i, &(pa, is64)) in visited[..nvis].iter().enumerate() {
            let bits = if i + 1 == nvis && acc == ACC_W {
                0x60
            } else {
                0x20
            };
            // A page table in the page a translated block runs from ends the block.
            self.note_write(pa & !0xfff);
            if is64 {
                self.phys.or_u64(pa, bits);
            } else {
                self.phys.or_u32(pa, bits as u32);
            }
        }
        let dirty = leaf_dirty || acc == ACC_W;
        let mut perm = 1u8; // supervisor read
        if (w_ok || !wp) && dirty {
            perm |= 2;
        }
        if !nx {
            perm |= 4;
        }
        if u_ok {
            perm |= 8;
            if w_ok && dirty {
                perm |= 16;
            }
            if !nx {
                perm |= 32;
            }
        }
        if large {
            self.tlb.large = true;
        }
        Ok(self.logged(
            acc,
            TlbEntry {
                tag: lin >> 12,
                host: self.phys.host(ppage, 4096).unwrap_or(std::ptr::null_mut()),
                ppage,
                perm,
                fast: 0,
                global,
            },
        ))
    }

    /// The dirty log's say on a new translation: while it is on, only a write gets a
    /// writable RAM translation, and that write marks the page (`mem::DirtyState`).
    #[inline]
    fn logged(&self, acc: u8, mut e: TlbEntry) -> TlbEntry {
        if self.phys.dirty().on() && !e.host.is_null() {
            if acc == ACC_W {
                self.phys.mark_dirty(e.ppage, 4096);
            } else {
                e.perm &= !(need_bit(ACC_W, false) | need_bit(ACC_W, true));
            }
        }
        e
    }

    /// Drop the writable translations when the dirty log was started or taken since this
    /// vCPU last looked (called at every run-loop check).
    #[inline]
    pub(crate) fn sync_dirty_log(&mut self) {
        let epoch = self.phys.dirty().epoch();
        if epoch != self.dirty_epoch {
            self.dirty_epoch = epoch;
            self.tlb.drop_writable();
        }
    }
}
