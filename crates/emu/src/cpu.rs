//! The engine core: one vCPU's state plus its TLB, and memory access through segmentation
//! and paging. Instruction semantics live in `exec/`, exception delivery in `interrupt.rs`.

use crate::exec::fast::{self, Fast};
use crate::irq::InterruptController;
use crate::mem::{self, PhysMem};
use crate::mmu::{Tlb, ACC_R, ACC_W, ACC_X};
use crate::state::{seg, CpuState};
use iced_x86::{Decoder, DecoderOptions, Instruction};
use kvmbox_cpu::IoHandler;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Why an instruction did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// An architectural exception (vector, error code) to deliver through the IDT.
    Exc(u8, Option<u32>),
    /// The vCPU cannot continue (e.g. page tables outside RAM, task switches): stop it.
    Stop(String),
    /// Triple fault.
    Shutdown,
    /// Not a fault: an interrupt the vCPU can take is due before this instruction, a read of
    /// the time (`exec::system`'s `interrupt_due_before_time_read`), which did not run; the
    /// run loop takes the interrupt, and RIP stays on the instruction, as for a fault.
    InterruptFirst,
}

/// What other threads tell a running vCPU (its kicker, and the interrupt controller when the
/// vCPU gets an interrupt, NMI, INIT or SIPI: `InterruptController::set_notifier`): `flag`
/// ends the run loop's batch at the next block, and `limit` (the most instructions compiled
/// code may complete, set by `run_block`) drops to 0, so compiled code leaves at its next hop
/// between blocks. Batches can be long without delaying interrupts: only timer expiries,
/// which no thread announces, wait for the end of a batch.
#[derive(Default)]
pub(crate) struct Attention {
    pub(crate) flag: std::sync::atomic::AtomicBool,
    pub(crate) limit: std::sync::atomic::AtomicU64,
}

impl Attention {
    pub(crate) fn raise(&self) {
        use std::sync::atomic::Ordering::Release;
        self.flag.store(true, Release);
        self.limit.store(0, Release);
    }
}

/// Engine result.
pub type R<T> = Result<T, Fault>;

/// #GP with an error code.
#[inline]
pub fn gp(e: u32) -> Fault {
    Fault::Exc(13, Some(e))
}
/// #GP(0).
#[inline]
pub fn gp0() -> Fault {
    gp(0)
}
/// #UD.
#[inline]
pub fn ud() -> Fault {
    Fault::Exc(6, None)
}
/// #SS with an error code.
#[inline]
pub fn ss_fault(e: u32) -> Fault {
    Fault::Exc(12, Some(e))
}
/// #NP with an error code.
#[inline]
pub fn np(e: u32) -> Fault {
    Fault::Exc(11, Some(e))
}

/// Counters kept by the engine.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    /// Instructions retired.
    pub instructions: u64,
    /// Exceptions and interrupts delivered.
    pub exceptions: u64,
    /// #UD raised for instructions the engine does not implement, by mnemonic.
    pub unimplemented: BTreeMap<String, u64>,
    /// Total of `unimplemented`.
    pub unimplemented_total: u64,
    /// Decoded-instruction cache hits.
    pub decode_hits: u64,
    /// Instructions decoded by iced-x86 (cache misses).
    pub decodes: u64,
    /// Instructions executed by the generic `exec` (the others ran the decode-time handler
    /// of their form, `exec::fast`).
    pub generic: u64,
    /// TLB misses (page walks, including those that faulted).
    pub tlb_misses: u64,
    /// External interrupts (and NMIs as vector 2) delivered, by vector.
    pub interrupts: BTreeMap<u8, u64>,
    /// Translated blocks executed (`Cpu::block`); the mean block length is
    /// `block_instructions / blocks`.
    pub blocks: u64,
    /// Instructions retired inside translated blocks (the rest went through `step`).
    pub block_instructions: u64,
    /// Block-cache lookups that found a valid block (or a valid "no block here" entry).
    pub block_hits: u64,
    /// Block-cache misses: blocks built (or rebuilt after their bytes changed).
    pub block_builds: u64,
    /// Blocks compiled by the JIT.
    pub jit_blocks: u64,
    /// Instructions retired in JIT code (included in `block_instructions`).
    pub jit_instructions: u64,
    /// Times the JIT's code cache filled up and was emptied.
    pub jit_flushes: u64,
}

const DCACHE_SIZE: usize = 16384;

#[derive(Clone)]
pub(crate) struct DecodedEntry {
    /// Physical address of the first byte, bitness in the low bits of `key` (MAX: empty).
    key: u64,
    rip: u64,
    /// The instruction's bytes (zero-padded) and the mask of the valid ones.
    bytes: u128,
    mask: u128,
    /// The decode-time handler and pre-resolved operands (`exec::fast`).
    pub(crate) fast: Fast,
    pub(crate) ins: Instruction,
}

/// The key of code at physical address `pa` decoded with a `bits`-bit code size: the address
/// with the code size in the low bits. The decoded-instruction cache and the block cache share
/// it (`build_block` checks that each decoded entry it takes is the one at the expected place).
#[inline(always)]
fn code_key(pa: u64, bits: u32) -> u64 {
    (pa << 2) | (bits as u64 >> 5)
}

/// The slot of physical address `pa` in a direct-mapped code cache of `size` (a power of two)
/// entries.
#[inline(always)]
fn code_slot(pa: u64, size: usize) -> usize {
    ((pa ^ (pa >> 12)) as usize) & (size - 1)
}

/// Blocks in the block cache (two-way set-associative on the physical address of the first
/// instruction). 16 MiB of address space per vCPU, touched as blocks fill it (the table starts
/// zeroed): large enough that a Debian boot's blocks rarely evict each other (each eviction
/// costs a rebuild and, for a hot block, a recompile; 16384 direct-mapped entries cost the boot
/// 8x the builds, and two ways instead of one at this size halve the evictions).
const BLOCKS: usize = 131072;
/// Most instructions in one translated block.
const BLOCK_MAX: usize = 32;
/// Bytes of a block kept in its table entry, beside its key (longer blocks keep them in
/// `Block::more`).
const INLINE_BYTES: usize = 44;
/// `Cpu::code_page` while no block runs (no physical page address has its low bits set).
pub(crate) const NO_CODE_PAGE: u64 = u64::MAX;

/// A translated block: consecutive instructions of one 4 KiB page, each with a decode-time
/// handler, ending at a control transfer, before an instruction without a handler, near the
/// page end or at `BLOCK_MAX` instructions. Built from the decoded-instruction cache
/// (`Cpu::fetch_decode`), so there is one decoder; keyed like it by the physical address of
/// the first instruction, the code size and RIP. An entry is 128 bytes, aligned: the key, the
/// compiled code and the bytes of a block of up to `INLINE_BYTES` (most of them: a boot's mean
/// block is ~4 instructions) share one 128-byte pair of cache lines, so checking a block at
/// entry misses the cache at most once for the entry instead of once for it and once for its
/// bytes. All zeros is an empty entry (the table is allocated zeroed, so its pages are only
/// touched as blocks are built): key 0 is no 64-bit code's key, and the boxes and the code
/// are null.
#[repr(C, align(128))]
pub(crate) struct Block {
    /// Physical address of the first byte, code size in the low bits (0: empty).
    key: u64,
    rip: u64,
    /// The handlers' forms, in order. None: the first instruction (whose bytes the entry
    /// holds) has no handler, so the block tier leaves it to `step`.
    fast: Option<Box<[Fast]>>,
    /// The block's JIT code (`crate::jit`), once it has run `Jit::threshold` times; it runs
    /// once sealed (`Jit::ready`).
    pub(crate) code: Option<crate::jit::Code>,
    /// The generation of the block's page (`kvmbox_cpu::watch::CodePages`) its bytes are
    /// good for: when the page's is another, it was written since, and the block's bytes are
    /// compared with guest memory (self-modifying code; a write into the page while the block
    /// runs ends it).
    gen: u64,
    /// Times the block ran in the dispatch loop (counts up to the JIT's threshold).
    pub(crate) runs: u32,
    /// Length of the instructions' bytes as they were decoded.
    len: u32,
    /// The slot of the block that ran after this one last time (a prediction: prefetched
    /// when this one is entered, so the next lookup finds its entry in the cache). In the
    /// entry's first cache line, with the rest a lookup reads first.
    succ: u32,
    /// The bytes when `len <= INLINE_BYTES`.
    inline: [u8; INLINE_BYTES],
    /// The bytes when `len > INLINE_BYTES`.
    more: Option<Box<[u8]>>,
}

// The layout the comment above describes.
const _: () = assert!(std::mem::size_of::<Block>() == 128);
const _: () = assert!(std::mem::offset_of!(Block, succ) < 64);

impl Block {
    /// The handlers' forms (empty: no block here).
    #[inline(always)]
    pub(crate) fn ops(&self) -> &[Fast] {
        self.fast.as_deref().unwrap_or(&[])
    }

    /// The instructions' bytes as they were decoded.
    #[inline(always)]
    fn bytes(&self) -> &[u8] {
        let n = self.len as usize;
        if n <= INLINE_BYTES {
            &self.inline[..n]
        } else {
            self.more.as_deref().unwrap_or(&[])
        }
    }
}

/// Do the block's bytes equal the `len` bytes at `host + off`? Compared 8 bytes at a time; a
/// short tail is compared as the last 8 bytes (overlapping the previous chunk), or, for a
/// block shorter than 8 bytes, as 8 bytes masked (its entry's inline bytes are zero past
/// `len`).
///
/// # Safety
/// `host + off .. host + off + max(len, 8)` must be readable (one guest RAM page).
#[inline(always)]
unsafe fn same_bytes(host: *const u8, off: usize, b: &Block) -> bool {
    let n = b.len as usize;
    // SAFETY: every `have(i)` below has i + 8 <= max(n, 8): within the range the caller
    // guarantees readable.
    let have = |i: usize| unsafe { (host.add(off + i) as *const u64).read_unaligned() };
    if n < 8 {
        let m = if n == 0 { 0 } else { u64::MAX >> (64 - 8 * n) };
        let want = u64::from_le_bytes(b.inline[..8].try_into().unwrap_or_default());
        return have(0) & m == want;
    }
    let bytes = b.bytes();
    let want = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
    let mut i = 0;
    while i + 8 <= n {
        if have(i) != want(i) {
            return false;
        }
        i += 8;
    }
    i == n || have(n - 8) == want(n - 8)
}

fn empty_decoded() -> DecodedEntry {
    DecodedEntry {
        key: u64::MAX,
        rip: 0,
        bytes: 0,
        mask: 0,
        fast: Fast::NONE,
        ins: Instruction::new(),
    }
}

/// One emulated vCPU.
pub struct Cpu {
    /// Architectural state.
    pub st: CpuState,
    pub(crate) tlb: Tlb,
    pub(crate) phys: PhysMem,
    io: Option<*const (dyn IoHandler + 'static)>,
    pub(crate) irq: Option<Arc<dyn InterruptController>>,
    /// vCPU index (APIC ID).
    pub id: u32,
    /// Counters.
    pub stats: Stats,
    /// RIP of the next instruction (set by exec before it commits).
    pub(crate) next_rip: u64,
    /// Interrupts are inhibited for one instruction (after STI, MOV SS, POP SS).
    pub(crate) shadow: bool,
    /// Set by exec when the instruction requests a shadow for the next instruction.
    pub(crate) set_shadow: bool,
    /// Set by a port write: the run loop ends the batch, to see a kick the write caused.
    pub(crate) io_break: bool,
    /// HLT executed; waiting for an interrupt.
    pub halted: bool,
    /// HLT executed with TF set: its single-step trap is taken when the CPU leaves the halt,
    /// before the interrupt that woke it.
    pub(crate) step_trap_pending: bool,
    /// Waiting for SIPI (application processor before startup, or after INIT).
    pub wait_sipi: bool,
    /// An NMI handler is running: further NMIs wait for the next IRET.
    pub(crate) nmi_blocked: bool,
    /// Never resized after creation: `fetch_decode` hands out pointers into its heap buffer.
    /// The extra last entry holds instructions that cannot be cached (MMIO, page-crossing).
    dcache: Vec<DecodedEntry>,
    /// The block cache (`BLOCKS` entries, never resized: `block` hands out pointers into it;
    /// each block's boxes are only replaced by `build_block`).
    blocks: crate::table::ZeroedTable<Block>,
    /// The slot of the block `block` returned last (its successor prediction is set there).
    last_slot: usize,
    /// `build_block`'s scratch: the forms and bytes of the block it builds.
    build_ops: Vec<Fast>,
    build_bytes: Vec<u8>,
    /// Physical page of the block running now (`NO_CODE_PAGE` outside blocks): a write into
    /// it sets `code_written`, which ends the block after the writing instruction.
    pub(crate) code_page: u64,
    /// The running block's page was written (or a device was accessed): end the block.
    pub(crate) code_written: bool,
    /// `phys.code()`'s generation words, for compiled code's stores (valid while `phys` is).
    pub(crate) code_gens: *const std::sync::atomic::AtomicU64,
    /// The JIT and its code cache.
    pub(crate) jit: crate::jit::Jit,
    /// What other threads tell this vCPU while it runs (`Attention`).
    pub(crate) attention: Arc<Attention>,
    /// `attention.limit`, for compiled code.
    pub(crate) jit_limit: *const std::sync::atomic::AtomicU64,
    /// Compiled code's scratch: arithmetic flags it captured and has not merged into RFLAGS
    /// yet (byte 0: LAHF's AH, byte 1: OF). Always merged before compiled code calls a
    /// handler or leaves (`crate::jit`), so nothing else reads it.
    pub(crate) jit_flags: u64,
    /// The exit of compiled code that left for the dispatch loop because its link is unset
    /// or stale (null: none): the next block `block` finds is linked to it when it can be.
    /// Only points into the JIT's cache (cleared when the cache is emptied).
    pub(crate) link_from: *mut crate::jit::Link,
    /// The CPUID table.
    pub(crate) cpuid: Vec<kvmbox_cpu::CpuidEntry>,
    /// CPUID entries the VMM adds or replaces (applied by `configure`).
    pub(crate) cpuid_overrides: Vec<kvmbox_cpu::CpuidEntry>,
    /// Handler for MSRs the engine does not implement.
    pub(crate) msr_hook: Option<Arc<dyn crate::irq::MsrHandler>>,
    /// The VM's kvm-clock, when the engine offers it.
    pub(crate) kvm_clock: Option<crate::pvclock::SharedKvmClock>,
    /// The dirty log's epoch this vCPU's TLB follows (`mem::DirtyState`).
    pub(crate) dirty_epoch: u64,
    /// DR0-DR3 enabled in DR7 as instruction breakpoints (bit n: DRn), checked at the start
    /// of every instruction while non-zero.
    pub(crate) bp_exec: u8,
    /// DR0-DR3 enabled in DR7 as data breakpoints (writes, or reads and writes), checked on
    /// every data access while non-zero.
    pub(crate) bp_data: u8,
    /// Data breakpoints the current instruction hit (DR6.B0-B3), reported by a #DB trap once
    /// it completes.
    pub(crate) bp_hits: u8,
    /// Data breakpoints hit by a MOV SS / POP SS, reported after the next instruction.
    pub(crate) bp_pending: u8,
}

// SAFETY: `io` is only set for the duration of `Cpu::with_io`, on the thread that owns the
// Cpu; the pointers in the TLB point into guest memory kept alive by `phys`.
unsafe impl Send for Cpu {}

impl Cpu {
    /// A vCPU in RESET state over `phys`.
    pub fn new(phys: PhysMem, id: u32) -> Self {
        let attention = Arc::new(Attention::default());
        Cpu {
            st: CpuState::default(),
            tlb: Tlb::default(),
            code_gens: phys.code().as_ptr(),
            phys,
            io: None,
            irq: None,
            id,
            stats: Stats::default(),
            next_rip: 0,
            shadow: false,
            set_shadow: false,
            io_break: false,
            halted: false,
            step_trap_pending: false,
            wait_sipi: false,
            nmi_blocked: false,
            dcache: vec![empty_decoded(); DCACHE_SIZE + 1],
            // SAFETY: all zeros is a valid, empty `Block` (see its description).
            blocks: unsafe { crate::table::ZeroedTable::new(BLOCKS) }
                .expect("mapping a vCPU's block cache"),
            last_slot: 0,
            build_ops: Vec::with_capacity(BLOCK_MAX),
            build_bytes: Vec::new(),
            code_page: NO_CODE_PAGE,
            code_written: false,
            jit_flags: 0,
            jit: crate::jit::Jit::from_env(),
            attention: attention.clone(),
            jit_limit: &attention.limit,
            link_from: std::ptr::null_mut(),
            cpuid: crate::cpuid::build(id, 1, false, false, &[]),
            dirty_epoch: 0,
            cpuid_overrides: Vec::new(),
            msr_hook: None,
            kvm_clock: None,
            bp_exec: 0,
            bp_data: 0,
            bp_hits: 0,
            bp_pending: 0,
        }
    }

    /// Run `f` with `io` as the device handler for port and MMIO accesses.
    pub fn with_io<T>(&mut self, io: &dyn IoHandler, f: impl FnOnce(&mut Cpu) -> T) -> T {
        let p: *const (dyn IoHandler + '_) = io;
        // SAFETY: only the lifetime bound is erased; the pointer is cleared below before `io`'s
        // borrow ends, and is never dereferenced after that.
        let p: *const (dyn IoHandler + 'static) = unsafe { std::mem::transmute(p) };
        self.io = Some(p);
        let r = f(self);
        self.io = None;
        r
    }

    pub(crate) fn io_handler(&self) -> R<&dyn IoHandler> {
        match self.io {
            // SAFETY: set by with_io for the duration of the borrow of the handler.
            Some(p) => Ok(unsafe { &*p }),
            None => Err(Fault::Stop("device access outside Vcpu::run".into())),
        }
    }

    /// Flush the TLB and the decode cache (mode changes, CR0/CR4 writes, state loads), and
    /// take the enabled hardware breakpoints from DR7 again.
    pub fn flush_all(&mut self) {
        self.tlb.flush_all();
        self.update_breakpoints();
    }

    // ---------------------------------------------------------------- breakpoints

    /// Take the enabled breakpoints from DR7 (after a write of DR7 or a state load). I/O
    /// breakpoints (R/W = 10 with CR4.DE) are not implemented: they never match.
    pub(crate) fn update_breakpoints(&mut self) {
        let dr7 = self.st.dr[7];
        let (mut exec, mut data) = (0u8, 0u8);
        for n in 0..4 {
            if (dr7 >> (2 * n)) & 3 == 0 {
                continue;
            }
            match (dr7 >> (16 + 4 * n)) & 3 {
                0 => exec |= 1 << n,
                1 | 3 => data |= 1 << n,
                _ => {}
            }
        }
        self.bp_exec = exec;
        self.bp_data = data;
    }

    /// The instruction breakpoints matching the instruction at CS:RIP (DR6.B0-B3 bits).
    pub(crate) fn exec_breakpoints(&self) -> u8 {
        let rip = self.st.rip;
        let lin = if self.st.mode64() {
            rip
        } else {
            self.st.seg[seg::CS].base.wrapping_add(rip) & 0xffff_ffff
        };
        (0..4)
            .filter(|&n| self.bp_exec & (1 << n) != 0 && self.st.dr[n] == lin)
            .fold(0, |m, n| m | (1 << n))
    }

    /// Note the data breakpoints a `size`-byte access at linear `lin` hits.
    #[cold]
    #[inline(never)]
    fn watch(&mut self, lin: u64, size: u64, write: bool) {
        let dr7 = self.st.dr[7];
        for n in 0..4 {
            if self.bp_data & (1 << n) == 0 || !write && (dr7 >> (16 + 4 * n)) & 3 == 1 {
                continue;
            }
            let len = match (dr7 >> (18 + 4 * n)) & 3 {
                0 => 1,
                1 => 2,
                2 => 8,
                _ => 4,
            };
            let start = self.st.dr[n] & !(len - 1);
            if lin.wrapping_sub(start) < len || start.wrapping_sub(lin) < size {
                self.bp_hits |= 1 << n;
            }
        }
    }

    // ---------------------------------------------------------------- physical

    fn apic_page(&self, pa: u64) -> bool {
        self.irq.is_some()
            && self.st.apic_base & (1 << 11) != 0
            && pa & !0xfff == self.st.apic_base & 0xf_ffff_f000
    }

    /// Read `buf.len()` bytes of guest-physical memory within one page.
    pub(crate) fn phys_read(&mut self, pa: u64, buf: &mut [u8]) -> R<()> {
        if let Some(p) = self.phys.host(pa, buf.len() as u64) {
            // SAFETY: host() checked the range lies in RAM.
            unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
            return Ok(());
        }
        if self.apic_page(pa) {
            if let Some(irq) = &self.irq {
                irq.apic_read(self.id, pa & 0xfff, buf);
                return Ok(());
            }
        }
        self.io_handler()?.mmio_read(pa, buf);
        Ok(())
    }

    /// Write guest-physical memory within one page.
    pub(crate) fn phys_write(&mut self, pa: u64, buf: &[u8]) -> R<()> {
        if let Some(p) = self.phys.host(pa, buf.len() as u64) {
            self.note_write(pa & !0xfff);
            // SAFETY: host() checked the range lies in RAM.
            unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), p, buf.len()) };
            return Ok(());
        }
        // A device access may write guest memory (DMA) anywhere: a running block ends.
        self.code_written = true;
        if self.apic_page(pa) {
            if let Some(irq) = &self.irq {
                irq.apic_write(self.id, pa & 0xfff, buf);
                return Ok(());
            }
        }
        self.io_handler()?.mmio_write(pa, buf);
        Ok(())
    }

    /// A write into physical RAM page `ppage` is about to happen: blocks translated from it
    /// are stale once it is made (its generation moves on, `kvmbox_cpu::watch`), and if a
    /// translated block runs from it, the block ends after this instruction, so the next one
    /// is validated again.
    #[inline(always)]
    pub(crate) fn note_write(&mut self, ppage: u64) {
        if ppage == self.code_page {
            self.code_written = true;
        }
        self.phys.code().written_page(ppage >> 12);
    }

    // ---------------------------------------------------------------- linear

    #[inline]
    fn user(&self) -> bool {
        self.st.cpl() == 3
    }

    /// Read `size` (1, 2, 4, 8) bytes at linear `lin` as the current privilege level.
    #[inline]
    pub(crate) fn read_lin(&mut self, lin: u64, size: u32) -> R<u64> {
        let user = self.user();
        self.read_lin_priv(lin, size, user)
    }

    /// Read at linear `lin` with an explicit privilege (false = implicit supervisor access).
    #[inline]
    pub(crate) fn read_lin_priv(&mut self, lin: u64, size: u32, user: bool) -> R<u64> {
        if self.bp_data != 0 {
            self.watch(lin, size as u64, false);
        }
        let off = lin & 0xfff;
        if off + size as u64 <= 0x1000 {
            if let Some(e) = self.tlb.lookup(lin, crate::mmu::need_bit(ACC_R, user)) {
                if !e.host.is_null() {
                    // SAFETY: the TLB's host pointer covers the whole 4 KiB page.
                    return Ok(unsafe { mem::load(e.host.add(off as usize), size) });
                }
            }
            let e = self.translate(lin, ACC_R, user)?;
            if !e.host.is_null() {
                // SAFETY: the TLB's host pointer covers the whole 4 KiB page; off+size <= 4096.
                return Ok(unsafe { mem::load(e.host.add(off as usize), size) });
            }
            let mut b = [0u8; 8];
            self.phys_read(e.ppage | off, &mut b[..size as usize])?;
            return Ok(u64::from_le_bytes(b));
        }
        let mut b = [0u8; 8];
        self.read_bytes_priv(lin, &mut b[..size as usize], user, ACC_R)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Read any number of bytes (page crossing allowed; both pages are checked first).
    pub(crate) fn read_bytes_priv(
        &mut self,
        lin: u64,
        buf: &mut [u8],
        user: bool,
        acc: u8,
    ) -> R<()> {
        if self.bp_data != 0 && acc != ACC_X {
            self.watch(lin, buf.len() as u64, acc == ACC_W);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let a = lin.wrapping_add(done as u64);
            let n = ((0x1000 - (a & 0xfff)) as usize).min(buf.len() - done);
            let e = self.translate(a, acc, user)?;
            self.phys_read(e.ppage | (a & 0xfff), &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Write bytes at linear `lin`; every page is translated before anything is written.
    pub(crate) fn write_bytes_priv(&mut self, lin: u64, buf: &[u8], user: bool) -> R<()> {
        if self.bp_data != 0 {
            self.watch(lin, buf.len() as u64, true);
        }
        let last = lin.wrapping_add(buf.len().saturating_sub(1) as u64);
        if (lin ^ last) >> 12 != 0 {
            self.translate(last, ACC_W, user)?;
        }
        let mut done = 0usize;
        while done < buf.len() {
            let a = lin.wrapping_add(done as u64);
            let n = ((0x1000 - (a & 0xfff)) as usize).min(buf.len() - done);
            let e = self.translate(a, ACC_W, user)?;
            self.phys_write(e.ppage | (a & 0xfff), &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Write the low `size` bytes of `v` at linear `lin`.
    #[inline]
    pub(crate) fn write_lin(&mut self, lin: u64, size: u32, v: u64) -> R<()> {
        let user = self.user();
        self.write_lin_priv(lin, size, v, user)
    }

    /// Write with an explicit privilege.
    #[inline]
    pub(crate) fn write_lin_priv(&mut self, lin: u64, size: u32, v: u64, user: bool) -> R<()> {
        if self.bp_data != 0 {
            self.watch(lin, size as u64, true);
        }
        let off = lin & 0xfff;
        if off + size as u64 <= 0x1000 {
            if let Some(e) = self.tlb.lookup(lin, crate::mmu::need_bit(ACC_W, user)) {
                let (host, ppage) = (e.host, e.ppage);
                if !host.is_null() {
                    self.note_write(ppage);
                    // SAFETY: the page is RAM and off + size <= 4096.
                    unsafe { mem::store(host.add(off as usize), size, v) };
                    return Ok(());
                }
            }
            let e = self.translate(lin, ACC_W, user)?;
            if !e.host.is_null() {
                self.note_write(e.ppage);
                // SAFETY: the page is RAM and off+size <= 4096.
                unsafe { mem::store(e.host.add(off as usize), size, v) };
                return Ok(());
            }
            let b = v.to_le_bytes();
            return self.phys_write(e.ppage | off, &b[..size as usize]);
        }
        let b = v.to_le_bytes();
        self.write_bytes_priv(lin, &b[..size as usize], user)
    }

    /// Host pointer for a `size`-byte write at `lin` when it lies in one RAM page
    /// (used for LOCK-prefixed read-modify-write). Checks write permission.
    pub(crate) fn lin_ptr_w(&mut self, lin: u64, size: u32) -> R<Option<*mut u8>> {
        if self.bp_data != 0 {
            self.watch(lin, size as u64, true);
        }
        let user = self.user();
        let off = lin & 0xfff;
        if off + size as u64 > 0x1000 {
            self.translate(lin, ACC_W, user)?;
            self.translate(lin.wrapping_add(size as u64 - 1), ACC_W, user)?;
            return Ok(None);
        }
        let e = self.translate(lin, ACC_W, user)?;
        if e.host.is_null() {
            return Ok(None);
        }
        self.note_write(e.ppage);
        // SAFETY: in-page offset of a RAM page.
        Ok(Some(unsafe { e.host.add(off as usize) }))
    }

    // ---------------------------------------------------------------- segmented

    /// Linear address of `seg:off` for a `size`-byte access, with segment checks.
    #[inline]
    pub(crate) fn seg_lin(&self, s: usize, off: u64, size: u32, write: bool) -> R<u64> {
        let fault = |s: usize| if s == seg::SS { ss_fault(0) } else { gp0() };
        if self.st.mode64() {
            let lin = if s >= seg::FS {
                off.wrapping_add(self.st.seg[s].base)
            } else {
                off
            };
            let last = lin.wrapping_add((size as u64).saturating_sub(1));
            if !canonical(lin) || !canonical(last) {
                return Err(fault(s));
            }
            return Ok(lin);
        }
        let sg = &self.st.seg[s];
        if self.st.cr0 & crate::state::cr0::PE != 0 {
            if sg.unusable || !sg.present {
                return Err(fault(s));
            }
            let code = sg.type_ & 8 != 0;
            if write && (code || sg.type_ & 2 == 0) {
                return Err(fault(s));
            }
            if !write && code && sg.type_ & 2 == 0 && s != seg::CS {
                return Err(fault(s));
            }
            let last = off.wrapping_add((size as u64).saturating_sub(1));
            if !code && sg.type_ & 4 != 0 {
                // Expand-down.
                let top = if sg.db { 0xffff_ffff } else { 0xffff };
                if off <= sg.limit as u64 || last > top {
                    return Err(fault(s));
                }
            } else if last > sg.limit as u64 || last < off {
                return Err(fault(s));
            }
        } else {
            let last = off.wrapping_add((size as u64).saturating_sub(1));
            if last > sg.limit as u64 {
                return Err(fault(s));
            }
        }
        Ok(sg.base.wrapping_add(off) & 0xffff_ffff)
    }

    /// Read from `seg:off`.
    #[inline]
    pub(crate) fn read_seg(&mut self, s: usize, off: u64, size: u32) -> R<u64> {
        let lin = self.seg_lin(s, off, size, false)?;
        self.read_lin(lin, size)
    }

    /// Write to `seg:off`.
    #[inline]
    pub(crate) fn write_seg(&mut self, s: usize, off: u64, size: u32, v: u64) -> R<()> {
        let lin = self.seg_lin(s, off, size, true)?;
        self.write_lin(lin, size, v)
    }

    // ---------------------------------------------------------------- stack

    /// Push `size` bytes.
    pub(crate) fn push(&mut self, v: u64, size: u32) -> R<()> {
        let sb = self.st.stack_bits();
        let sp = self.st.gpr[4].wrapping_sub(size as u64) & crate::exec::alu::mask(sb);
        self.write_seg(seg::SS, sp, size, v)?;
        self.set_sp(sp, sb);
        Ok(())
    }

    /// Pop `size` bytes.
    pub(crate) fn pop(&mut self, size: u32) -> R<u64> {
        let sb = self.st.stack_bits();
        let sp = self.st.gpr[4] & crate::exec::alu::mask(sb);
        let v = self.read_seg(seg::SS, sp, size)?;
        self.set_sp(sp.wrapping_add(size as u64), sb);
        Ok(v)
    }

    /// Set RSP/ESP/SP honouring the stack width.
    pub(crate) fn set_sp(&mut self, v: u64, bits: u32) {
        let sp = &mut self.st.gpr[4];
        *sp = match bits {
            64 => v,
            32 => v & 0xffff_ffff,
            _ => (*sp & !0xffff) | (v & 0xffff),
        };
    }

    // ---------------------------------------------------------------- fetch

    /// Fetch and decode the instruction at CS:RIP. Returns a pointer into the decoded cache's
    /// heap buffer, valid until the next `fetch_decode`: only this function writes the cache,
    /// so the caller may execute the instruction in place without copying it.
    #[inline(always)]
    pub(crate) fn fetch_decode(&mut self) -> R<*const DecodedEntry> {
        // Fast path: a cached decode in a TLB-resident RAM page with the same bytes.
        let bits = self.st.code_bits();
        let rip = self.st.rip;
        if bits == 64 && canonical(rip) {
            let user = self.st.seg[seg::CS].dpl & 3 == 3;
            if let Some(e) = self.tlb.lookup(rip, crate::mmu::need_bit(ACC_X, user)) {
                let off = (rip & 0xfff) as usize;
                if !e.host.is_null() && off + 16 <= 0x1000 {
                    let pa = e.ppage | off as u64;
                    let key = code_key(pa, bits);
                    let slot = code_slot(pa, DCACHE_SIZE);
                    let d = &self.dcache[slot];
                    if d.key == key && d.rip == rip {
                        // SAFETY: host page pointer, off + 16 <= 4096.
                        let cur = unsafe { (e.host.add(off) as *const u128).read_unaligned() };
                        if cur & d.mask == d.bytes {
                            self.stats.decode_hits += 1;
                            return Ok(d);
                        }
                    }
                }
            }
        }
        self.fetch_decode_slow()
    }

    /// Everything else: segment checks, page walks, the cache check near page ends, and
    /// decoding with iced-x86.
    #[inline(never)]
    fn fetch_decode_slow(&mut self) -> R<*const DecodedEntry> {
        let bits = self.st.code_bits();
        let rip = self.st.rip;
        let lin = if bits == 64 {
            if !canonical(rip) {
                return Err(gp0());
            }
            rip
        } else {
            let cs = &self.st.seg[seg::CS];
            if rip > cs.limit as u64 {
                return Err(gp0());
            }
            cs.base.wrapping_add(rip) & 0xffff_ffff
        };
        let user = self.user();
        let e = self.translate(lin, ACC_X, user)?;
        let off = (lin & 0xfff) as usize;
        let avail = 0x1000 - off;
        // Decode cache: only for instructions wholly inside one RAM page.
        let pa = e.ppage | off as u64;
        let key = code_key(pa, bits);
        let slot = code_slot(pa, DCACHE_SIZE);
        if !e.host.is_null() {
            let d = &self.dcache[slot];
            if d.key == key && d.rip == rip {
                let len = d.ins.len();
                // Compare the bytes in memory now with the ones decoded (self-modifying code).
                let same = if off + 16 <= 0x1000 {
                    // SAFETY: host page pointer, off + 16 <= 4096.
                    let cur = unsafe { (e.host.add(off) as *const u128).read_unaligned() };
                    cur & d.mask == d.bytes
                } else {
                    // SAFETY: off + len <= 4096 (the entry was cached only when it fit).
                    let cur =
                        unsafe { std::slice::from_raw_parts(e.host.add(off), len.min(avail)) };
                    cur == &d.bytes.to_le_bytes()[..len.min(avail)] && len <= avail
                };
                if same {
                    self.stats.decode_hits += 1;
                    return Ok(d);
                }
            }
        }
        let mut buf = [0u8; 15];
        let n = avail.min(15);
        if !e.host.is_null() {
            // SAFETY: host page pointer, off + n <= 4096.
            unsafe { std::ptr::copy_nonoverlapping(e.host.add(off), buf.as_mut_ptr(), n) };
        } else {
            self.phys_read(pa, &mut buf[..n])?;
        }
        let mut total = n;
        let mut next_fault = None;
        if n < 15 {
            let lin2 = lin.wrapping_add(n as u64);
            let lin2 = if bits == 64 { lin2 } else { lin2 & 0xffff_ffff };
            match self.translate(lin2, ACC_X, user) {
                Ok(e2) => {
                    self.phys_read(e2.ppage, &mut buf[n..15])?;
                    total = 15;
                }
                Err(f) => next_fault = Some(f),
            }
        }
        self.stats.decodes += 1;
        let mut dec = Decoder::with_ip(bits, &buf[..total], rip, DecoderOptions::NONE);
        let ins = dec.decode();
        if ins.is_invalid() {
            if dec.last_error() == iced_x86::DecoderError::NoMoreBytes {
                if let Some(f) = next_fault {
                    return Err(f);
                }
            }
            return Err(ud());
        }
        if !e.host.is_null() && ins.len() <= avail {
            let mut bytes = [0u8; 16];
            bytes[..ins.len()].copy_from_slice(&buf[..ins.len()]);
            let mask = if ins.len() >= 16 {
                u128::MAX
            } else {
                (1u128 << (8 * ins.len())) - 1
            };
            self.dcache[slot] = DecodedEntry {
                key,
                rip,
                bytes: u128::from_le_bytes(bytes),
                mask,
                fast: fast::compile(&ins, bits),
                ins,
            };
            return Ok(&self.dcache[slot]);
        }
        // Not cached (MMIO, page-crossing): the generic path.
        let scratch = &mut self.dcache[DCACHE_SIZE];
        scratch.key = u64::MAX;
        scratch.fast = Fast::NONE;
        scratch.ins = ins;
        Ok(scratch)
    }
}

impl Cpu {
    /// Have the interrupt controller raise `attention` when this vCPU gets an event.
    pub(crate) fn notify_attention(&self) {
        if let Some(irq) = &self.irq {
            let a = self.attention.clone();
            irq.set_notifier(self.id, Arc::new(move || a.raise()));
        }
    }

    // ---------------------------------------------------------------- blocks

    /// The translated block starting at CS:RIP, still good (one code-TLB lookup and one
    /// compare of its page's generation, `still_good`), built from the decoded-instruction
    /// cache on a miss. Returns a pointer into the block cache, valid until the next call;
    /// sets `code_page` to the block's physical page,
    /// and links compiled code's exit that led here (`link_from`) to the block's code. None:
    /// no block here (not 64-bit code, RIP not in the TLB or not RAM, within 16 bytes of the
    /// page end, or the first instruction has no decode-time handler): `step` runs the
    /// instruction.
    #[inline(always)]
    pub(crate) fn block(&mut self) -> Option<*const Block> {
        let rip = self.st.rip;
        if self.st.code_bits() != 64 || !canonical(rip) {
            return None;
        }
        let user = self.st.seg[seg::CS].dpl & 3 == 3;
        let e = self.tlb.lookup(rip, crate::mmu::need_bit(ACC_X, user))?;
        let (host, ppage) = (e.host, e.ppage);
        let off = (rip & 0xfff) as usize;
        if host.is_null() || off + 16 > 0x1000 {
            return None;
        }
        let pa = ppage | off as u64;
        let key = code_key(pa, 64);
        // Two ways per set: the block is in the first or the second; a new one goes into the
        // first, whose block moves to the second (the second's is dropped).
        let set = code_slot(pa, BLOCKS) & !1;
        let here = |b: &Block| b.key == key && b.rip == rip;
        let mut slot = set;
        if !here(&self.blocks[set]) && here(&self.blocks[set + 1]) {
            slot = set + 1;
        }
        let ppn = ppage >> 12;
        if here(&self.blocks[slot]) && self.still_good(slot, host, off, ppn) {
            self.stats.block_hits += 1;
        } else {
            if !here(&self.blocks[slot]) {
                self.blocks.swap(set, set + 1);
            }
            self.build_block(slot, pa);
        }
        let b = &mut self.blocks[slot];
        // No handler for the first instruction: no block here.
        b.fast.as_ref()?;
        if self.jit.threshold != 0 {
            match b.code {
                None => {
                    b.runs += 1;
                    if b.runs >= self.jit.threshold {
                        self.compile_block(slot);
                    }
                }
                // Compiled, not sealed yet (`Jit::seal`): after as many runs again, now.
                Some(code) if !self.jit.ready(code) => {
                    b.runs += 1;
                    if b.runs >= 2 * self.jit.threshold {
                        self.jit.seal();
                    }
                }
                Some(_) => {}
            }
        }
        // Learn this block as its predecessor's successor, and fetch the entry of the block
        // that followed this one last time while this one runs (the table is far larger than
        // the host's caches: a lookup that misses them costs more than a short block).
        self.blocks[self.last_slot].succ = slot as u32;
        self.last_slot = slot;
        let b = &self.blocks[slot];
        let next = &self.blocks[b.succ as usize & (BLOCKS - 1)] as *const Block;
        // SAFETY: a prefetch hint of an address inside the table; it never faults.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(next as *const i8)
        };
        let from = std::mem::replace(&mut self.link_from, std::ptr::null_mut());
        if let (false, Some(code)) = (from.is_null(), b.code.filter(|&c| self.jit.ready(c))) {
            let target = crate::jit::Target {
                rip,
                code,
                n: b.ops().len(),
                gen_at: self.phys.code().word(ppn).map_or(std::ptr::null(), |g| g),
                gen: b.gen,
                ppage,
            };
            // SAFETY: `link_from` only holds links of code in the cache: `compile_block` and
            // `set_jit_threshold` clear it when they empty the cache.
            unsafe { self.jit.link(from, &target) };
        }
        self.code_page = ppage;
        self.code_written = false;
        Some(b)
    }

    /// Whether the block in `slot` (at offset `off` of physical page `ppn`, whose host
    /// address is `host`) is still good: its page was not written since it was built or last
    /// found good, or its bytes are still in memory (a write elsewhere in the page). The page
    /// is watched again before they are compared, so a write from then on is seen.
    #[inline(always)]
    fn still_good(&mut self, slot: usize, host: *const u8, off: usize, ppn: u64) -> bool {
        let code = self.phys.code();
        if code.current(ppn) == self.blocks[slot].gen {
            return true;
        }
        let gen = code.watch(ppn);
        let b = &mut self.blocks[slot];
        // SAFETY: a block's bytes end within its page (`build_block`), and a block shorter than
        // 8 bytes starts at least 16 bytes before the page end (`block` checks off + 16 <= 4096).
        let same = unsafe { same_bytes(host, off, b) };
        if same {
            b.gen = gen;
        }
        same
    }

    /// Build the block at CS:RIP (physical address `pa`, 64-bit code) into `slot`: the
    /// instructions `fetch_decode` returns from the decoded cache (decoding them on a miss),
    /// while each is cached, lies in the same physical page at least 16 bytes before its end
    /// (so decoding it never touches the next page) and has a handler; the block ends after a
    /// control transfer or at `BLOCK_MAX` instructions. RIP is left as it was.
    #[inline(never)]
    fn build_block(&mut self, slot: usize, pa: u64) {
        let key = code_key(pa, 64);
        self.stats.block_builds += 1;
        // Watched before its bytes are read: a write from now on makes the block stale.
        let gen = self.phys.code().watch(pa >> 12);
        let start = self.st.rip;
        let mut ops = std::mem::take(&mut self.build_ops);
        let mut bytes = std::mem::take(&mut self.build_bytes);
        ops.clear();
        bytes.clear();
        let page = pa & !0xfff;
        let mut o = (pa & 0xfff) as usize;
        while ops.len() < BLOCK_MAX && o + 16 <= 0x1000 {
            let Ok(d) = self.fetch_decode() else { break };
            // SAFETY: `d` points into the decoded cache's heap buffer, valid until the next
            // `fetch_decode`; it is only read here.
            let d = unsafe { &*d };
            // Cached (not the scratch entry) at the expected place in the same physical page.
            if d.key != code_key(page | o as u64, 64) {
                break;
            }
            let len = d.ins.len();
            if d.fast.handler.is_none() {
                if ops.is_empty() {
                    // Remember "no block here" for these bytes, so `step` runs it directly.
                    bytes.extend_from_slice(&d.bytes.to_le_bytes()[..len]);
                }
                break;
            }
            bytes.extend_from_slice(&d.bytes.to_le_bytes()[..len]);
            ops.push(d.fast);
            let ends = d.fast.form == crate::exec::fast::Form::Generic && d.fast.sub != 0;
            if d.ins.flow_control() != iced_x86::FlowControl::Next || ends {
                break;
            }
            o += len;
            self.st.rip = d.fast.next_rip;
        }
        self.st.rip = start;
        let n = bytes.len();
        let b = &mut self.blocks[slot];
        b.key = if n == 0 { 0 } else { key };
        b.rip = start;
        b.fast = (!ops.is_empty()).then(|| ops.as_slice().into());
        b.code = None;
        b.gen = gen;
        b.runs = 0;
        b.len = n as u32;
        if n <= INLINE_BYTES {
            b.inline[..n].copy_from_slice(&bytes);
            b.inline[n..].fill(0);
            b.more = None;
        } else {
            b.more = Some(bytes.as_slice().into());
        }
        self.build_ops = ops;
        self.build_bytes = bytes;
    }

    /// Compile the block in `slot` (`crate::jit`). When the code cache is full, every block's
    /// code is dropped first and the cache reused.
    #[inline(never)]
    pub(crate) fn compile_block(&mut self, slot: usize) {
        let mut full = false;
        let b = &self.blocks[slot];
        let mut code = self.jit.compile(b.ops(), b.bytes(), b.rip, &mut full);
        if full {
            for b in self.blocks.iter_mut() {
                b.code = None;
            }
            self.link_from = std::ptr::null_mut();
            self.jit.clear();
            self.stats.jit_flushes += 1;
            let b = &self.blocks[slot];
            code = self.jit.compile(b.ops(), b.bytes(), b.rip, &mut full);
        }
        self.blocks[slot].code = code;
        if code.is_some() {
            self.stats.jit_blocks += 1;
        }
    }

    /// Turn the JIT on (blocks are compiled after running `threshold` times) or off (0), for
    /// tests and benchmarks; `KVMBOX_EMU_JIT=0` sets the default.
    pub fn set_jit_threshold(&mut self, threshold: u32) {
        self.jit.threshold = threshold;
        for b in self.blocks.iter_mut() {
            b.code = None;
            b.runs = 0;
        }
        self.link_from = std::ptr::null_mut();
        self.jit.clear();
    }
}

/// Is `a` a canonical 48-bit address?
#[inline]
pub fn canonical(a: u64) -> bool {
    ((a as i64) << 16 >> 16) as u64 == a
}
