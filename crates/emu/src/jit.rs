//! The engine's JIT (issue 13, part 4): a baseline compiler from a translated block's
//! decode-time forms (`exec::fast::Fast`) to host x86-64 code.
//!
//! A block is compiled once it has run `Jit::threshold` times. Its code runs register forms
//! inline against the guest registers in `Cpu::st` (MOV, LEA, MOVZX/MOVSX, ALU operations,
//! INC/DEC, shifts by an immediate, IMUL, SETcc, CMOVcc, NOP, direct JMP/Jcc), memory forms
//! (MOV, MOVZX/MOVSX, ALU, PUSH/POP, direct CALL, RET) inline behind a TLB fast path whose
//! misses call the instruction's handler, and calls the handler of every other instruction (a
//! direct call to a constant address, so the dispatch loop and its indirect branch go). A block
//! keeps its most used guest registers in host registers (`Cached`). Flags are computed by the
//! host instruction itself and captured (`capture_flags`) unless the block overwrites them
//! first; they stay captured from block to block and reach RFLAGS only where something can see
//! them (`fold_flags`); a flag consumer right after its producer (`cmp; jcc`, `test; setcc`)
//! reads the host flags directly, and a block ending in a Jcc ends in a host branch.
//!
//! The code keeps the block protocol of `Cpu::run_block`: it sets `next_rip` to the last
//! instruction's next RIP (unless that is an inline JMP, Jcc, CALL or RET: those set it
//! themselves, the Jcc only on its way back to the dispatch loop), and only the last
//! instruction (a control transfer) changes it. It
//! commits RIP itself and returns how many instructions completed and the fault of the one
//! that did not: a handler's fault ends the block there, and after every handler call the code
//! tests `code_written` (a store into the block's own page, or a device access) and ends the
//! block after that instruction. Inline code commits nothing before its last check (a fast
//! path that fails leaves everything to the handler), so faults stay precise. A block that
//! branches back to its own start runs again inside its code, an exit to another compiled
//! block goes on in that block's code once linked (`Link`, `assemble`), and a return goes on
//! in the block it returns to (an indirect branch in its target's) through the jump cache
//! (`Jit::jumps`), while the target's
//! page has the generation it was linked at (`kvmbox_cpu::watch`).
//!
//! The code cache is never writable and executable at once: each vCPU copies code into pages
//! of its own region made writable ahead of it, and seals them read-execute, a batch of
//! blocks at a time, before that code runs (`CodeCache`; the vCPU threads' seccomp filter
//! allows `mprotect` only without PROT_EXEC or to exactly PROT_READ | PROT_EXEC, and no
//! executable `mmap`). When the region is full every block's code is dropped
//! and the region reused. `KVMBOX_EMU_JIT=0` turns the JIT off (blocks run their handlers in
//! the dispatch loop).

// dynasm's macro converts a dynamic register's number with `.into()`, even from its own type.
#![allow(clippy::useless_conversion)]

use crate::cpu::{Cpu, Fault};
use crate::exec::fast::{Fast, Form};
use crate::mmu::{TlbEntry, ACC_R, ACC_W, ACC_X};
use dynasm::dynasm;
use dynasmrt::x64::X64Relocation;
use dynasmrt::{DynamicLabel, DynasmApi, DynasmLabelApi, VecAssembler};
use std::mem::{offset_of, size_of};
use std::sync::atomic::AtomicU64;

/// What compiled code returns: the number of instructions that completed, and the fault of
/// the next one (a `Box<Fault>` from its handler), or null.
#[repr(C)]
pub(crate) struct Exit {
    pub(crate) done: u64,
    pub(crate) fault: *mut Fault,
}

/// A compiled block's entry: called with the vCPU and 3 at CPL 3 (else 0). `Cpu::jit_limit` holds the most instructions it may complete (at
/// least the block's length; a block that branches back to its own start runs again, and one
/// linked to the next block goes on there, while the whole next run fits; another thread
/// sets it to 0 to stop it: `cpu::Attention`).
pub(crate) type Entry = unsafe extern "sysv64" fn(*mut Cpu, u32) -> Exit;

/// A compiled block.
#[derive(Clone, Copy)]
pub(crate) struct Code {
    pub(crate) entry: Entry,
}

/// A compiled block's exit to another block (its direct branch's target, or the next
/// instruction), linked by `Jit::link` to that block's code once it is compiled: the exit then
/// goes on there directly, after checking what `Cpu::block` checks at every entry: for a
/// target in another page, that the TLB still maps it executable at this privilege to the
/// same RAM page; and that the target's page was not written since the link was made (its
/// generation, `kvmbox_cpu::watch`), so a changed target is never run. Links live with their
/// block's forms until the code cache is emptied.
#[repr(C)]
pub(crate) struct Link {
    /// The target's RIP (fixed when the block is compiled).
    rip: u64,
    /// The target's chain entry (`Jit::chain`); 0 while unlinked.
    entry: usize,
    /// The target's length in instructions.
    n: u64,
    /// The generation word of the target's page.
    gen_at: *const AtomicU64,
    /// The generation the target was good for when linked.
    gen: u64,
    /// The target's physical page.
    ppage: u64,
}

impl Link {
    /// An unset link to `rip`.
    fn unlinked(rip: u64) -> Link {
        Link {
            rip,
            entry: 0,
            n: 0,
            gen_at: std::ptr::null(),
            gen: 0,
            ppage: 0,
        }
    }
}

/// Entries of a vCPU's jump cache (`Jit::jumps`), a power of two: a return or jump to `rip` uses
/// entry `(rip ^ rip >> 10) % JUMPS`.
const JUMPS: usize = 4096;

/// A block an exit is linked to (`Jit::link`).
pub(crate) struct Target {
    pub(crate) rip: u64,
    pub(crate) code: Code,
    /// Its length in instructions.
    pub(crate) n: usize,
    /// Its page's generation word, and the generation it is good for.
    pub(crate) gen_at: *const AtomicU64,
    pub(crate) gen: u64,
    /// Its physical page.
    pub(crate) ppage: u64,
}

/// What compiled code refers to while it exists: its block's forms (handlers get pointers to
/// them) and its links.
struct Kept {
    _forms: Box<[Fast]>,
    _links: Box<[Link]>,
    /// The decoded instructions of its `Form::Generic` forms (in their order), which the code
    /// hands to `fast::generic_decoded`.
    _generic: Box<[iced_x86::Instruction]>,
}

/// Blocks run this many times before they are compiled.
const THRESHOLD: u32 = 16;
/// Bytes of code cache per vCPU (address space; pages are touched as code fills them).
const CACHE_BYTES: usize = 64 << 20;
const PAGE: usize = 4096;

/// The arithmetic flags (CF PF AF ZF SF OF).
const STATUS: i32 = 0x8d5;
const CF: i32 = 0x1;
const OF: i32 = 0x800;

/// A vCPU's JIT: its setting and its code cache.
pub(crate) struct Jit {
    /// Executions before a block is compiled; 0: the JIT is off.
    pub(crate) threshold: u32,
    cache: Option<CodeCache>,
    /// The forms and links of the code in the cache.
    kept: Vec<Kept>,
    /// The jump cache: links (`Link`) from a compiled RET or indirect JMP/CALL to the block it
    /// goes to, one per target address (`JUMPS`), shared by all of them. A branch whose
    /// target's entry holds another address takes the entry over (it is relinked when its
    /// block is found).
    jumps: Box<[Link]>,
    /// Where a linked predecessor goes on in a block's code, from its entry: past the
    /// prologue, which is the same in every block (the registers are set up).
    chain: usize,
    /// `/tmp/perf-<pid>.map`, when `KVMBOX_EMU_PERF_MAP` is set: each block's code named by
    /// its guest RIP, so `perf report` attributes samples in compiled code to guest code.
    perf_map: Option<std::fs::File>,
}

impl Jit {
    /// On with the default threshold, unless the environment says otherwise:
    /// `KVMBOX_EMU_JIT=0` (or `off`) turns it off, `KVMBOX_EMU_JIT=N` compiles blocks after N
    /// runs.
    pub(crate) fn from_env() -> Jit {
        // A value that is not one is refused where the VM is built (`threshold_from_env`).
        let threshold = threshold_from_env().unwrap_or(THRESHOLD);
        Jit {
            threshold,
            cache: None,
            kept: Vec::new(),
            jumps: (0..JUMPS).map(|_| Link::unlinked(0)).collect(),
            chain: 0,
            perf_map: std::env::var_os("KVMBOX_EMU_PERF_MAP").and_then(|_| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(format!("/tmp/perf-{}.map", std::process::id()))
                    .ok()
            }),
        }
    }

    /// Compile `ops` (a block's forms, all with handlers). None when the cache cannot take it
    /// (`full` is then set: the caller drops every block's code and calls `clear`), or when the
    /// code cache cannot be mapped (the JIT is then turned off).
    pub(crate) fn compile(
        &mut self,
        ops: &[Fast],
        bytes: &[u8],
        rip: u64,
        full: &mut bool,
    ) -> Option<Code> {
        if self.cache.is_none() {
            match CodeCache::new(CACHE_BYTES) {
                Some(c) => self.cache = Some(c),
                None => {
                    self.threshold = 0;
                    return None;
                }
            }
        }
        let cache = self.cache.as_mut()?;
        let at = cache.base as usize + cache.used;
        let forms: Box<[Fast]> = ops.into();
        let links: Box<[Link]> = link_targets(ops).map(Link::unlinked).collect();
        // The instructions `Form::Generic` forms run, decoded again from the block's bytes.
        let generic: Box<[iced_x86::Instruction]> = forms
            .iter()
            .filter(|f| f.form == Form::Generic)
            .map(|f| {
                let at = (f.imm.wrapping_sub(rip) as usize).min(bytes.len());
                iced_x86::Decoder::with_ip(64, &bytes[at..], f.imm, iced_x86::DecoderOptions::NONE)
                    .decode()
            })
            .collect();
        let (bytes, chain) = assemble(&forms, &links, &generic, self.jumps.as_ptr(), rip, at)?;
        let Some(entry) = cache.install(&bytes) else {
            *full = true;
            return None;
        };
        self.chain = chain;
        if let Some(map) = &mut self.perf_map {
            use std::io::Write;
            // Best effort: a profiling aid.
            let _ = writeln!(map, "{:x} {:x} guest_{rip:x}", entry as usize, bytes.len());
        }
        let code = Code { entry };
        self.kept.push(Kept {
            _forms: forms,
            _links: links,
            _generic: generic,
        });
        Some(code)
    }

    /// Whether `code` runs: it is sealed (`CodeCache::seal`). Compiled blocks run in the
    /// dispatch loop until then.
    #[inline(always)]
    pub(crate) fn ready(&self, code: Code) -> bool {
        self.cache.as_ref().is_some_and(|c| c.ready(code.entry))
    }

    /// Seal the code compiled since the last seal, so it runs (a block that waits for it has
    /// run twice the threshold). A failing `mprotect` turns the JIT off.
    pub(crate) fn seal(&mut self) {
        if let Some(c) = &mut self.cache {
            if !c.seal() {
                self.threshold = 0;
            }
        }
    }

    /// Forget every block's code (the caller has dropped its pointers, and any link it kept).
    pub(crate) fn clear(&mut self) {
        if let Some(c) = &mut self.cache {
            c.empty();
        }
        for l in self.jumps.iter_mut() {
            *l = Link::unlinked(0);
        }
        self.kept.clear();
    }

    /// Link the exit `link` (an exit a compiled block took to Rust: `Cpu::link_from`) to the
    /// block `t` that runs next (found good just now), if it is the exit's target.
    ///
    /// # Safety
    /// `link` must point to a link of code still in the cache (`clear` not called since).
    pub(crate) unsafe fn link(&self, link: *mut Link, t: &Target) {
        // SAFETY: the caller's contract; links are only written here, on the vCPU's thread,
        // while no code runs.
        let l = unsafe { &mut *link };
        if l.rip != t.rip || t.gen_at.is_null() {
            return;
        }
        l.gen_at = t.gen_at;
        l.gen = t.gen;
        l.ppage = t.ppage;
        l.n = t.n as u64;
        l.entry = t.code.entry as usize + self.chain;
    }
}

/// The JIT setting `KVMBOX_EMU_JIT` asks for (unset: the default): `0` or `off` (the JIT off)
/// or N (blocks compiled after N runs); anything else is an error naming the value.
pub fn threshold_from_env() -> Result<u32, String> {
    match std::env::var("KVMBOX_EMU_JIT") {
        Err(std::env::VarError::NotPresent) => Ok(THRESHOLD),
        Ok(v) if v == "off" => Ok(0),
        Ok(v) => v.parse().map_err(|_| {
            format!("KVMBOX_EMU_JIT={v}: expected 0 or off (the JIT off) or a number of runs")
        }),
        Err(e) => Err(format!("KVMBOX_EMU_JIT: {e}")),
    }
}

/// A region of host memory for compiled code.
/// A vCPU's code cache. Code is copied into pages made writable (not executable) ahead of it
/// and runs only once they are sealed read-execute: `seal` changes all the blocks copied in
/// since the last seal at once (two `mprotect` calls per block made compiling cost more than
/// the code saved for code that runs a few hundred times, as much of a boot's does).
struct CodeCache {
    base: *mut u8,
    size: usize,
    /// Bytes in use.
    used: usize,
    /// Code below this offset is sealed (read-execute); a page boundary.
    sealed: usize,
    /// Pages from `sealed` up to this offset are writable (not executable).
    open: usize,
    /// Blocks copied in and not sealed yet.
    unsealed: usize,
}

/// Bytes made writable at a time ahead of the code copied in.
const OPEN_BYTES: usize = 64 << 10;
/// Blocks copied in before `install` seals them.
const SEAL_BLOCKS: usize = 32;

impl CodeCache {
    fn new(size: usize) -> Option<CodeCache> {
        let base = crate::table::map_anonymous(size)?;
        Some(CodeCache {
            base,
            size,
            used: 0,
            sealed: 0,
            open: 0,
            unsealed: 0,
        })
    }

    /// Copy `code` (assembled for the address `base + used`) in, into pages that are
    /// writable and not executable; it runs once `seal`ed (which this does every
    /// `SEAL_BLOCKS` blocks). None when the cache is full, or an `mprotect` fails.
    fn install(&mut self, code: &[u8]) -> Option<Entry> {
        let start = self.used;
        let end = start + code.len();
        if end > self.size {
            return None;
        }
        if end > self.open {
            let to = (end + OPEN_BYTES).next_multiple_of(PAGE).min(self.size);
            // SAFETY: [open, to) lies within the mapping, above `sealed`: no code there runs
            // (none was sealed there since the cache was last emptied).
            let pages = unsafe { self.base.add(self.open) } as *mut libc::c_void;
            // SAFETY: as above.
            if unsafe { libc::mprotect(pages, to - self.open, libc::PROT_READ | libc::PROT_WRITE) }
                != 0
            {
                return None;
            }
            self.open = to;
        }
        // SAFETY: `code` fits in [start, end), inside the mapping, writable.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.base.add(start), code.len()) };
        // Next block at a 16-byte boundary.
        self.used = (end + 15) & !15;
        self.unsealed += 1;
        // SAFETY: the bytes at `start` are a function with the `Entry` signature
        // (`assemble`), assembled for this address; it is called only once sealed (`ready`).
        let entry = unsafe { std::mem::transmute::<*mut u8, Entry>(self.base.add(start)) };
        if self.unsealed >= SEAL_BLOCKS && !self.seal() {
            return None;
        }
        Some(entry)
    }

    /// Make the code copied in since the last seal executable (and no longer writable); the
    /// next block starts on a new page. False if `mprotect` fails.
    fn seal(&mut self) -> bool {
        if self.unsealed == 0 {
            return true;
        }
        let to = self.used.next_multiple_of(PAGE);
        // SAFETY: [sealed, to) lies within the mapping; nothing writes it from now on (code is
        // only copied in above `used`, which moves to `to`).
        let pages = unsafe { self.base.add(self.sealed) } as *mut libc::c_void;
        // SAFETY: as above.
        if unsafe { libc::mprotect(pages, to - self.sealed, libc::PROT_READ | libc::PROT_EXEC) }
            != 0
        {
            return false;
        }
        self.used = to;
        self.sealed = to;
        self.open = self.open.max(to);
        self.unsealed = 0;
        true
    }

    /// Whether the code at `entry` is sealed (runs).
    fn ready(&self, entry: Entry) -> bool {
        (entry as usize).wrapping_sub(self.base as usize) < self.sealed
    }

    /// Forget all code: the cache is filled from its start again.
    fn empty(&mut self) {
        self.used = 0;
        self.sealed = 0;
        self.open = 0;
        self.unsealed = 0;
    }
}

impl Drop for CodeCache {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no code of it runs any more (its vCPU is gone).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.size) };
    }
}

// SAFETY: the cache is owned by one vCPU and only used on the thread running it.
unsafe impl Send for CodeCache {}

// ------------------------------------------------------------------ code generation

/// Offset of guest register `r` in `Cpu`.
fn gpr(r: u8) -> i32 {
    (offset_of!(Cpu, st) + offset_of!(crate::state::CpuState, gpr) + 8 * (r as usize & 15)) as i32
}

fn rflags() -> i32 {
    (offset_of!(Cpu, st) + offset_of!(crate::state::CpuState, rflags)) as i32
}

fn next_rip() -> i32 {
    offset_of!(Cpu, next_rip) as i32
}

fn code_written() -> i32 {
    offset_of!(Cpu, code_written) as i32
}

type Asm = VecAssembler<X64Relocation>;

/// Load guest register `r` from `Cpu` at width `bits` into host register `dst`,
/// zero-extended (`Block::load` takes a cached copy instead).
fn load(a: &mut Asm, dst: u8, r: u8, bits: u8) {
    let m = gpr(r);
    match bits {
        64 => dynasm!(a ; .arch x64 ; mov Rq(dst), QWORD [rbx + m]),
        32 => dynasm!(a ; .arch x64 ; mov Rd(dst), DWORD [rbx + m]),
        16 => dynasm!(a ; .arch x64 ; movzx Rd(dst), WORD [rbx + m]),
        _ => dynasm!(a ; .arch x64 ; movzx Rd(dst), BYTE [rbx + m]),
    }
}

/// Store host register `src` into guest register `r` in `Cpu` at width `bits` (32-bit
/// writes zero-extend, and zero-extend `src` too; 8/16-bit writes keep the rest of the
/// register). Changes no host flags.
fn store(a: &mut Asm, src: u8, r: u8, bits: u8) {
    let m = gpr(r);
    match bits {
        64 => dynasm!(a ; .arch x64 ; mov QWORD [rbx + m], Rq(src)),
        32 => dynasm!(a ; .arch x64 ; mov Rd(src), Rd(src) ; mov QWORD [rbx + m], Rq(src)),
        16 => dynasm!(a ; .arch x64 ; mov WORD [rbx + m], Rw(src)),
        _ => dynasm!(a ; .arch x64 ; mov BYTE [rbx + m], Rb(src)),
    }
}

/// Load every cached register from `Cpu` (at a block's entry, and after a handler ran).
fn reload(a: &mut Asm, cached: &Cached) {
    for &(g, h) in &cached.regs {
        load(a, h, g, 64);
    }
}

/// Host registers that keep guest registers within a block (`Cached`): RSI, RDI, R8-R11 and
/// RBP. A handler call writes them back first and reloads them after (all but RBP are
/// caller-saved), and the hops between blocks use them once the block has written them back.
const CACHE_REGS: [u8; 7] = [6, 7, 8, 9, 10, 11, 5];
/// No host register (`Cached::host`).
const UNCACHED: u8 = 0xff;

/// The guest registers instruction `f`'s inline code reads (`false`) or writes (`true`,
/// which may also read) through `Block::load` and `Block::store`. RSP, which the stack forms
/// change in `Cpu` directly, is never cached.
fn reg_uses(f: &Fast, mut each: impl FnMut(u8, bool)) {
    let mem = |each: &mut dyn FnMut(u8, bool)| {
        if f.base_mask != 0 {
            each(f.base, false);
        }
        if f.index_mask != 0 {
            each(f.index, false);
        }
    };
    let alu_writes = f.sub < 7;
    match f.form {
        Form::MovRR | Form::MovxR => {
            each(f.r1, false);
            each(f.r0, true);
        }
        Form::MovRI | Form::SetccR | Form::PopR => each(f.r0, true),
        Form::MovRM | Form::MovxM | Form::Lea => {
            mem(&mut each);
            each(f.r0, true);
        }
        Form::MovMR | Form::AluMR => {
            mem(&mut each);
            each(f.r1, false);
        }
        Form::MovMI | Form::AluMI => mem(&mut each),
        Form::AluRR => {
            each(f.r1, false);
            each(f.r0, alu_writes);
        }
        Form::AluRI => each(f.r0, alu_writes),
        Form::AluRM => {
            mem(&mut each);
            each(f.r0, alu_writes);
        }
        Form::ImulRR | Form::CmovRR => {
            each(f.r1, false);
            each(f.r0, true);
        }
        Form::IncDecR | Form::ShiftRI | Form::NegNotR | Form::BswapR => each(f.r0, true),
        Form::ShiftRC => {
            each(1, false);
            each(f.r0, true);
        }
        Form::TestHiRI | Form::PushR => each(f.r0, false),
        Form::Cext => {
            each(0, true);
            each(2, f.sub >= 3);
        }
        _ => {}
    }
}

/// Which guest registers a block keeps in host registers (`CACHE_REGS`): the most used ones
/// (at least twice) of its inline instructions, loaded at the block's entry, written back
/// (the ones it writes) before every handler call and at its end, reloaded after a call.
struct Cached {
    /// The host register of each guest register, or `UNCACHED`.
    host: [u8; 16],
    /// (guest, host) pairs.
    regs: Vec<(u8, u8)>,
    /// Guest registers the block writes (bit per register), written back.
    written: u16,
}

impl Cached {
    fn choose(ops: &[Fast]) -> Cached {
        let mut uses = [0u32; 16];
        let mut written = 0u16;
        for f in ops.iter().filter(|f| inline(f)) {
            reg_uses(f, |r, w| {
                uses[r as usize & 15] += 1;
                if w {
                    written |= 1 << (r & 15);
                }
            });
        }
        uses[4] = 0;
        let mut order: Vec<u8> = (0..16).filter(|&r| uses[r as usize] >= 2).collect();
        order.sort_by_key(|&r| std::cmp::Reverse(uses[r as usize]));
        let mut c = Cached {
            host: [UNCACHED; 16],
            regs: Vec::new(),
            written: 0,
        };
        for (&g, &h) in order.iter().zip(CACHE_REGS.iter()) {
            c.host[g as usize] = h;
            c.regs.push((g, h));
            c.written |= written & (1 << g);
        }
        c
    }
}

/// Host registers by number (dynasm's `Rq(n)`).
const RAX: u8 = 0;
const RCX: u8 = 1;
const RDX: u8 = 2;

/// Go to `label` unless RAX is canonical (bits 63..47 all equal). Uses RCX.
fn unless_canonical(a: &mut Asm, label: DynamicLabel) {
    dynasm!(a
        ; .arch x64
        ; mov rcx, rax
        ; sar rcx, 47
        ; inc rcx
        ; cmp rcx, 1
        ; ja =>label
    );
}

/// The guest's CF into the host's (ADC/SBB read it, INC/DEC keep it): from the flags
/// captured last when they are `pending` (`capture_flags`), else from RFLAGS.
fn carry_in(a: &mut Asm, pending: bool) {
    let at = if pending { jit_flags() } else { rflags() };
    dynasm!(a ; .arch x64 ; bt QWORD [rbx + at], 0);
}

fn jit_flags() -> i32 {
    offset_of!(Cpu, jit_flags) as i32
}

/// Capture the host's arithmetic flags in `Cpu::jit_flags` (AH as LAHF leaves it: SF ZF AF PF
/// CF, and OF), three instructions where a merge into RFLAGS takes eleven; `fold_flags` merges
/// them before anything can see RFLAGS. Uses RAX.
fn capture_flags(a: &mut Asm) {
    let at = jit_flags();
    dynasm!(a
        ; .arch x64
        ; lahf
        ; seto BYTE [rbx + at + 1]
        ; mov BYTE [rbx + at], ah
    );
}

/// The reverse of `fold_flags`: the guest's RFLAGS as `capture_flags` would have captured
/// them (its low byte is LAHF's layout). Uses RAX, and changes the host's flags.
fn open_flags(a: &mut Asm) {
    let (at, rf) = (jit_flags(), rflags());
    dynasm!(a
        ; .arch x64
        ; mov rax, QWORD [rbx + rf]
        ; mov BYTE [rbx + at], al
        ; shr eax, 11
        ; and eax, 1
        ; mov BYTE [rbx + at + 1], al
    );
}

/// Merge the flags `capture_flags` captured into the guest's RFLAGS. Uses RCX and RDX, and
/// changes the host's flags.
fn fold_flags(a: &mut Asm) {
    let (at, rf) = (jit_flags(), rflags());
    dynasm!(a
        ; .arch x64
        ; movzx ecx, BYTE [rbx + at]
        ; movzx edx, BYTE [rbx + at + 1]
        ; shl edx, 11
        ; or ecx, edx
        ; and ecx, STATUS
        ; mov rdx, QWORD [rbx + rf]
        ; and rdx, !STATUS
        ; or rdx, rcx
        ; mov QWORD [rbx + rf], rdx
    );
}

/// Merge the host's arithmetic flags into the guest's RFLAGS.
fn merge_flags(a: &mut Asm) {
    merge_flags_of(a, STATUS);
}

/// Merge the host's flags in `mask` (all the arithmetic flags, or CF and OF) into the guest's
/// RFLAGS. Uses RAX, RCX and RDX: LAHF and SETcc read the flags (PUSHFQ, which also reads
/// them, takes twice the time on this kind of host and serializes on them).
fn merge_flags_of(a: &mut Asm, mask: i32) {
    let rf = rflags();
    if mask == STATUS {
        // AH = SF ZF 0 AF 0 PF 1 CF, the low byte of RFLAGS.
        dynasm!(a ; .arch x64 ; lahf ; seto dl ; movzx ecx, ah);
    } else {
        dynasm!(a ; .arch x64 ; setc cl ; seto dl ; movzx ecx, cl);
    }
    dynasm!(a
        ; .arch x64
        ; movzx edx, dl
        ; shl edx, 11
        ; or ecx, edx
        ; and ecx, mask
        ; mov rdx, QWORD [rbx + rf]
        ; and rdx, !mask
        ; or rdx, rcx
        ; mov QWORD [rbx + rf], rdx
    );
}

/// Set the host's arithmetic flags to the guest's (for a condition not right after its
/// producer): from the flags captured last when they are `captured` (`capture_flags`; they
/// stay so), else from RFLAGS. Only CF PF AF ZF SF OF are loaded: TF, DF, AC and the rest
/// stay clear. Uses RAX and RCX.
fn load_flags(a: &mut Asm, captured: bool) {
    if captured {
        let at = jit_flags();
        dynasm!(a
            ; .arch x64
            ; movzx eax, BYTE [rbx + at]
            ; movzx ecx, BYTE [rbx + at + 1]
            ; shl ecx, 11
            ; or eax, ecx
        );
    } else {
        let rf = rflags();
        dynasm!(a ; .arch x64 ; mov rax, QWORD [rbx + rf]);
    }
    dynasm!(a
        ; .arch x64
        ; and eax, STATUS
        ; push rax
        ; popfq
    );
}

/// Jcc (condition `cc`, x86's encoding 0..15) to `label`, on the host's flags.
fn jcc(a: &mut Asm, cc: u8, label: DynamicLabel) {
    match cc & 15 {
        0 => dynasm!(a ; .arch x64 ; jo =>label),
        1 => dynasm!(a ; .arch x64 ; jno =>label),
        2 => dynasm!(a ; .arch x64 ; jb =>label),
        3 => dynasm!(a ; .arch x64 ; jae =>label),
        4 => dynasm!(a ; .arch x64 ; je =>label),
        5 => dynasm!(a ; .arch x64 ; jne =>label),
        6 => dynasm!(a ; .arch x64 ; jbe =>label),
        7 => dynasm!(a ; .arch x64 ; ja =>label),
        8 => dynasm!(a ; .arch x64 ; js =>label),
        9 => dynasm!(a ; .arch x64 ; jns =>label),
        10 => dynasm!(a ; .arch x64 ; jp =>label),
        11 => dynasm!(a ; .arch x64 ; jnp =>label),
        12 => dynasm!(a ; .arch x64 ; jl =>label),
        13 => dynasm!(a ; .arch x64 ; jge =>label),
        14 => dynasm!(a ; .arch x64 ; jle =>label),
        _ => dynasm!(a ; .arch x64 ; jg =>label),
    }
}

/// CMOVcc RAX, RCX (condition `cc`, x86's encoding 0..15). Changes no flags.
fn cmov_rax_rcx(a: &mut Asm, cc: u8) {
    a.extend([0x48, 0x0f, 0x40 | (cc & 15), 0xc1]);
}

/// SETcc AL. Changes no flags.
fn setcc_al(a: &mut Asm, cc: u8) {
    a.extend([0x0f, 0x90 | (cc & 15), 0xc0]);
}

/// ROL (`$sub` 0), ROR (1), SHL (2), SHR (3) or SAR (4) of host register `$r` (its low 32
/// bits below 64) by `$count`: an immediate variable, or CL.
macro_rules! shift {
    ($a:ident, $sub:expr, $bits:expr, $r:expr, $count:tt) => {
        match ($sub, $bits == 64) {
            (0, true) => dynasm!($a ; .arch x64 ; rol Rq($r), $count),
            (0, false) => dynasm!($a ; .arch x64 ; rol Rd($r), $count),
            (1, true) => dynasm!($a ; .arch x64 ; ror Rq($r), $count),
            (1, false) => dynasm!($a ; .arch x64 ; ror Rd($r), $count),
            (2, true) => dynasm!($a ; .arch x64 ; shl Rq($r), $count),
            (2, false) => dynasm!($a ; .arch x64 ; shl Rd($r), $count),
            (3, true) => dynasm!($a ; .arch x64 ; shr Rq($r), $count),
            (3, false) => dynasm!($a ; .arch x64 ; shr Rd($r), $count),
            (_, true) => dynasm!($a ; .arch x64 ; sar Rq($r), $count),
            (_, false) => dynasm!($a ; .arch x64 ; sar Rd($r), $count),
        }
    };
}

/// The one-operand instruction `$first` (`$other` when `$second` holds) on host register `$r`
/// at width `$bits`.
macro_rules! one_operand {
    ($a:ident, $second:expr, $bits:expr, $r:expr, $first:ident, $other:ident) => {
        match ($second, $bits) {
            (false, 64) => dynasm!($a ; .arch x64 ; $first Rq($r)),
            (false, 32) => dynasm!($a ; .arch x64 ; $first Rd($r)),
            (false, 16) => dynasm!($a ; .arch x64 ; $first Rw($r)),
            (false, _) => dynasm!($a ; .arch x64 ; $first Rb($r)),
            (true, 64) => dynasm!($a ; .arch x64 ; $other Rq($r)),
            (true, 32) => dynasm!($a ; .arch x64 ; $other Rd($r)),
            (true, 16) => dynasm!($a ; .arch x64 ; $other Rw($r)),
            (true, _) => dynasm!($a ; .arch x64 ; $other Rb($r)),
        }
    };
}

/// The two-operand ALU operation `op` (ADD OR ADC SBB AND SUB XOR CMP TEST) of host register
/// `src` into host register `dst` at width `bits` (CMP and TEST leave `dst`).
fn alu(a: &mut Asm, op: u8, dst: u8, src: u8, bits: u8) {
    macro_rules! by_width {
        ($m:ident) => {
            match bits {
                64 => dynasm!(a ; .arch x64 ; $m Rq(dst), Rq(src)),
                32 => dynasm!(a ; .arch x64 ; $m Rd(dst), Rd(src)),
                16 => dynasm!(a ; .arch x64 ; $m Rw(dst), Rw(src)),
                _ => dynasm!(a ; .arch x64 ; $m Rb(dst), Rb(src)),
            }
        };
    }
    match op {
        0 => by_width!(add),
        1 => by_width!(or),
        2 => by_width!(adc),
        3 => by_width!(sbb),
        4 => by_width!(and),
        5 => by_width!(sub),
        6 => by_width!(xor),
        7 => by_width!(cmp),
        _ => by_width!(test),
    }
}

/// Whether `f` is compiled inline (the others only call their handler). Inline memory
/// accesses take a fast path (the access within one page of RAM the TLB holds, not the page
/// of the running block) and otherwise call the handler, which does everything else.
fn inline(f: &Fast) -> bool {
    match f.form {
        Form::AluRR
        | Form::AluRI
        | Form::AluRM
        | Form::AluMR
        | Form::AluMI
        | Form::IncDecR
        | Form::MovRR
        | Form::MovRI
        | Form::MovRM
        | Form::MovMR
        | Form::MovMI
        | Form::Lea
        | Form::MovxR
        | Form::MovxM
        | Form::SetccR
        | Form::CmovRR
        | Form::Nop
        | Form::NegNotR
        | Form::BswapR
        | Form::Cext
        | Form::TestHiRI => true,
        Form::ShiftRI => shift_count(f).is_some(),
        Form::ShiftRC => matches!(f.sub, 2..=4) && matches!(f.bits, 32 | 64),
        Form::ImulRR => f.bits != 8,
        Form::PushR | Form::PopR => f.bits == 64,
        Form::Ret => f.bits == 64,
        Form::Jcc | Form::Jmp => crate::cpu::canonical(f.imm),
        Form::Call => f.size == 8 && crate::cpu::canonical(f.imm),
        _ => false,
    }
}

/// Whether `f` sets all the arithmetic flags from the host instruction it compiles to.
fn produces_flags(f: &Fast) -> bool {
    inline(f)
        && !rotate(f)
        && matches!(
            f.form,
            Form::AluRR
                | Form::AluRI
                | Form::AluRM
                | Form::AluMR
                | Form::AluMI
                | Form::IncDecR
                | Form::ShiftRI
                | Form::ImulRR
                | Form::TestHiRI
        )
        || f.form == Form::NegNotR && f.sub == 1
}

/// Whether the flags after instruction `i` are overwritten before anything can see them: the
/// instructions that follow in the block, up to one that sets all the arithmetic flags
/// without reading them, are inline register forms that neither read flags nor leave the
/// block (no handler call, no slow path that could fault with the guest's flags stale).
fn flags_dead_after(ops: &[Fast], i: usize) -> bool {
    for g in &ops[i + 1..] {
        if !inline(g) {
            return false;
        }
        match g.form {
            Form::MovRR
            | Form::MovRI
            | Form::Lea
            | Form::MovxR
            | Form::Nop
            | Form::BswapR
            | Form::Cext => {}
            // NOT writes no flags, NEG all.
            Form::NegNotR => {
                if g.sub == 1 {
                    return true;
                }
            }
            Form::AluRR | Form::AluRI => return !matches!(g.sub, 2 | 3),
            Form::ShiftRI => return !rotate(g),
            Form::ImulRR | Form::TestHiRI => return true,
            _ => return false,
        }
    }
    false
}

/// Whether `f` reads a condition of the flags and writes none.
fn consumes_flags(f: &Fast) -> bool {
    inline(f) && matches!(f.form, Form::Jcc | Form::SetccR | Form::CmovRR)
}

/// The count of an inline shift or rotate: ROL/ROR/SHL/SHR/SAR of a 32/64-bit register by a
/// non-zero count (a zero count leaves the flags, and a narrow shift's count may exceed its
/// width: those go to the handler).
fn shift_count(f: &Fast) -> Option<i8> {
    let n = f.imm as u8 & if f.bits == 64 { 63 } else { 31 };
    (f.sub <= 4 && matches!(f.bits, 32 | 64) && n != 0).then_some(n as i8)
}

/// Whether `f` is a rotate (ROL/ROR), which writes only CF and OF.
fn rotate(f: &Fast) -> bool {
    f.form == Form::ShiftRI && f.sub < 2
}

/// A fast path's way out: call instruction `index`'s handler, then go on at `resume` (with the
/// host flags loaded from the guest's when `flags`: the instruction is a flag producer, whose
/// code after `resume` merges the host flags into the guest's and may have a fused consumer
/// read them).
struct Slow {
    label: DynamicLabel,
    resume: DynamicLabel,
    index: usize,
    flags: bool,
    /// Flags were pending before the instruction (`Block::pending`): merged before the call.
    fold: bool,
}

/// A block's code under construction.
struct Block<'a> {
    a: Asm,
    ops: &'a [Fast],
    /// The decoded instructions of the `Form::Generic` forms not compiled yet.
    generic: std::slice::Iter<'a, iced_x86::Instruction>,
    /// The way out that commits `next_rip` as RIP.
    plain: DynamicLabel,
    /// Out-of-line exits: (label, instructions done, faulted).
    exits: Vec<(DynamicLabel, usize, bool)>,
    slow: Vec<Slow>,
    /// At this point of the main line, the guest's arithmetic flags are the ones captured in
    /// `Cpu::jit_flags` (`capture_flags`), not yet in RFLAGS.
    pending: bool,
    cached: Cached,
}

/// The RIPs a block's exits may link to (`Link`): the targets of its last instruction, a
/// direct JMP, CALL or Jcc compiled inline (a Jcc also goes to the next instruction), or the
/// next instruction after a block that ends without a control transfer (at its length limit,
/// or before an instruction without a handler).
fn link_targets(ops: &[Fast]) -> impl Iterator<Item = u64> {
    let mut t = [None; 2];
    if let Some(last) = ops.last() {
        match last.form {
            Form::Jcc if inline(last) => {
                t = [
                    Some(last.imm),
                    (last.next_rip != last.imm).then_some(last.next_rip),
                ];
            }
            Form::Jmp | Form::Call if inline(last) => t[0] = Some(last.imm),
            Form::Jcc | Form::Jmp | Form::Call | Form::Ret | Form::Indirect | Form::Other => {}
            _ => t[0] = Some(last.next_rip),
        }
    }
    t.into_iter().flatten()
}

/// Assemble the code of the block at `rip` (its forms `ops`, kept at that address while the
/// code exists, and its `links`) for address `at`: the code, and the offset of its chain
/// entry. None if the assembler fails (it does not for these templates; the block then runs
/// in the dispatch loop).
///
/// Registers: RBX the vCPU, R12 the block's forms, R13 and R14 the TLB permission bits a read
/// and a write need at the current privilege (from the second argument, 3 at CPL 3, else 0),
/// R15 the instructions completed in earlier runs of this block or of blocks linked to it
/// (`Cpu::jit_limit` bounds them); RSI, RDI, R8-R11 and RBP the guest registers the block keeps
/// (`Cached`); RAX, RCX and RDX the templates' scratch.
///
/// Every way out commits RIP: the next instruction's (or the faulting one's) address. A block
/// whose last instruction is a direct branch to its own start runs again, without leaving,
/// while the branch is taken and another whole run fits in the budget: the dispatch loop would
/// find the same block, valid (a store into its page ends it, and other agents' code changes
/// are only guaranteed visible after a serializing instruction, which is never in a block),
/// with nothing to check between batches of instructions. Otherwise an exit whose link is set
/// (for a RET or an indirect branch: the jump cache's entry for its target, `jumps`) goes on
/// in the linked
/// block when it is still good and its whole run fits (`emit_hop`); an exit whose link is
/// unset or stale leaves its address in `Cpu::link_from` for `Cpu::block` to link.
fn assemble(
    ops: &[Fast],
    links: &[Link],
    generic: &[iced_x86::Instruction],
    jumps: *const Link,
    rip: u64,
    at: usize,
) -> Option<(Vec<u8>, usize)> {
    let mut a = Asm::new(at);
    let exit = a.new_dynamic_label();
    let (r, w) = (1i32 << ACC_R, 1i32 << ACC_W);
    dynasm!(a
        ; .arch x64
        ; push rbx
        ; push r12
        ; push r13
        ; push r14
        ; push r15
        ; push rbp
        ; sub rsp, 8
        ; mov rbx, rdi
        ; mov ecx, esi
        ; mov r13d, r
        ; shl r13d, cl
        ; mov r14d, w
        ; shl r14d, cl
        ; xor r15d, r15d
    );
    // Compiled code keeps the guest's flags captured between blocks (`capture_flags`).
    open_flags(&mut a);
    let chain = a.offset().0;
    let forms = ops.as_ptr() as i64;
    dynasm!(a ; .arch x64 ; mov r12, QWORD forms);
    let cached = Cached::choose(ops);
    reload(&mut a, &cached);
    // A loop goes on here, with the cached registers as they are.
    let body = a.new_dynamic_label();
    dynasm!(a ; .arch x64 ; =>body);
    let last = ops.last();
    let loops = last.is_some_and(|l| matches!(l.form, Form::Jcc | Form::Jmp) && l.imm == rip);
    // A return or an indirect branch: goes on through the jump cache.
    let dynamic =
        last.is_some_and(|l| l.form == Form::Ret && inline(l) || l.form == Form::Indirect);
    // The last instruction's next RIP (`Cpu::run_block`'s protocol), at every run, unless the
    // last instruction is an inline JMP, Jcc, CALL or RET, which sets `next_rip` itself (from
    // its own next RIP where it needs it: see their templates and slow paths); only control
    // transfers, always last, read it.
    let last_inline = last.is_some_and(inline);
    let sets_next = last_inline
        && last.is_some_and(|l| matches!(l.form, Form::Jmp | Form::Jcc | Form::Call | Form::Ret));
    if let (false, Some(last)) = (sets_next, last) {
        let nr = next_rip();
        let v = last.next_rip as i64;
        dynasm!(a ; .arch x64 ; mov rax, QWORD v ; mov QWORD [rbx + nr], rax);
    }
    let plain = a.new_dynamic_label();
    let mut b = Block {
        a,
        ops,
        generic: generic.iter(),
        exits: Vec::new(),
        slow: Vec::new(),
        plain,
        // Blocks enter (and hop to each other) with the flags captured.
        pending: true,
        cached,
    };
    let n = ops.len();
    let mut i = 0;
    while i < n {
        let f = &ops[i];
        if !inline(f) {
            b.settle();
            b.call_handler(i);
            i += 1;
            continue;
        }
        // A consumer right after this producer reads the host flags it leaves.
        let fused = produces_flags(f) && i + 1 < n && consumes_flags(&ops[i + 1]);
        b.inline(i, fused);
        if fused {
            b.inline(i + 1, true);
            i += 1;
        }
        if produces_flags(f) {
            // Overwritten before anything can see them: neither these nor any pending
            // before them need to reach RFLAGS. Otherwise captured, and merged where
            // something could see them.
            if flags_dead_after(ops, i) {
                b.pending = false;
            } else {
                capture_flags(&mut b.a);
                b.pending = true;
            }
        }
        i += 1;
    }
    // On to the next block (or around a loop) with the flags captured; `plain` merges them
    // on the way back to the dispatch loop.
    if !b.pending {
        open_flags(&mut b.a);
        b.pending = true;
    }
    b.flush();
    let all = n as i32;
    let nr = next_rip();
    let plain = b.plain;
    let a = &mut b.a;
    let from = link_from();
    // Leave for `to`: through its link when it has one (`emit_hop`), else (or when the hop
    // cannot go on) back to the dispatch loop with `next_rip` set to it.
    let leave_for = |a: &mut Asm, to: u64| {
        let stay = a.new_dynamic_label();
        if let Some(l) = links.iter().find(|l| l.rip == to) {
            let (addr, ask) = (l as *const Link as i64, a.new_dynamic_label());
            dynasm!(a ; .arch x64 ; mov rdx, QWORD addr);
            let page = if to >> 12 == rip >> 12 {
                Page::Same
            } else {
                Page::Other(to)
            };
            emit_hop(a, page, all, stay, ask);
            dynasm!(a ; .arch x64 ; =>ask ; mov QWORD [rbx + from], rdx);
        }
        let to = to as i64;
        dynasm!(a
            ; .arch x64
            ; =>stay
            ; mov rax, QWORD to
            ; mov QWORD [rbx + nr], rax
            ; jmp =>plain
        );
    };
    if let Some(j) = last.filter(|l| l.form == Form::Jcc && inline(l)) {
        // An inline Jcc: a host branch on the flags its template left, to each target's hop
        // (the taken one first runs the block again when it is its start and the run fits).
        let taken = a.new_dynamic_label();
        jcc(a, j.sub, taken);
        leave_for(a, j.next_rip);
        dynasm!(a ; .arch x64 ; =>taken);
        if j.imm == rip {
            let (two, limit) = (2 * all, jit_limit());
            dynasm!(a
                ; .arch x64
                ; lea rax, [r15 + two]
                ; mov rcx, QWORD [rbx + limit]
                ; cmp rax, QWORD [rcx]
                ; ja >done
                ; add r15, all
                ; jmp =>body
                ; done:
            );
        }
        leave_for(a, j.imm);
    } else {
        if loops {
            // Again while the branch went back to the start and another run fits.
            let start = rip as i64;
            let (two, limit) = (2 * all, jit_limit());
            dynasm!(a
                ; .arch x64
                ; mov rax, QWORD start
                ; cmp rax, QWORD [rbx + nr]
                ; jne >done
                ; lea rax, [r15 + two]
                ; mov rcx, QWORD [rbx + limit]
                ; cmp rax, QWORD [rcx]
                ; ja >done
                ; add r15, all
                ; jmp =>body
                ; done:
            );
        }
        if !links.is_empty() || dynamic {
            // Not after a store into this page or a device access: back to the dispatch loop.
            // Every handler but the last one's tests this itself after it ran (`call_handler`, and
            // the last instruction's slow path), so only a last instruction that is a handler call
            // leaves it to this test.
            if !last_inline {
                let cw = code_written();
                dynasm!(a ; .arch x64 ; cmp BYTE [rbx + cw], 0 ; jne =>plain);
            }
            dynasm!(a ; .arch x64 ; mov rax, QWORD [rbx + nr]);
        }
        for l in links {
            let addr = l as *const Link as i64;
            let target = l.rip as i64;
            let (next, ask) = (a.new_dynamic_label(), a.new_dynamic_label());
            dynasm!(a
                ; .arch x64
                ; mov rcx, QWORD target
                ; cmp rax, rcx
                ; jne =>next
                ; mov rdx, QWORD addr
            );
            let page = if l.rip >> 12 == rip >> 12 {
                Page::Same
            } else {
                Page::Other(l.rip)
            };
            emit_hop(a, page, all, plain, ask);
            dynasm!(a
                ; .arch x64
                ; =>ask
                ; mov QWORD [rbx + from], rdx
                ; jmp =>plain
                ; =>next
            );
        }
        if dynamic {
            // On in the block the jump cache links the target in RAX to.
            let (ask, take) = (a.new_dynamic_label(), a.new_dynamic_label());
            let (l_rip, l_entry) = (offset_of!(Link, rip) as i32, offset_of!(Link, entry) as i32);
            let (size, mask) = (size_of::<Link>() as i32, (JUMPS - 1) as i32);
            let jumps = jumps as i64;
            dynasm!(a
                ; .arch x64
                // Its entry (`JUMPS`).
                ; mov rdx, rax
                ; shr rdx, 10
                ; xor rdx, rax
                ; and edx, mask
                ; imul edx, edx, size
                ; mov rcx, QWORD jumps
                ; add rdx, rcx
                ; cmp rax, QWORD [rdx + l_rip]
                ; jne =>take
            );
            emit_hop(a, Page::Dynamic, all, plain, ask);
            dynasm!(a
                ; .arch x64
                ; =>take
                ; mov QWORD [rdx + l_rip], rax
                ; mov QWORD [rdx + l_entry], 0
                ; =>ask
                ; mov QWORD [rbx + from], rdx
                ; jmp =>plain
            );
        }
    }
    let rip_at = rip_field();
    // Back to the dispatch loop: with the flags captured (`plain`), or in RFLAGS (`leave`).
    let leave = a.new_dynamic_label();
    dynasm!(a ; .arch x64 ; =>plain);
    fold_flags(a);
    dynasm!(a
        ; .arch x64
        ; =>leave
        ; mov rax, QWORD [rbx + nr]
        ; mov QWORD [rbx + rip_at], rax
        ; mov eax, all
        ; add rax, r15
        ; xor edx, edx
        ; =>exit
        ; add rsp, 8
        ; pop rbp
        ; pop r15
        ; pop r14
        ; pop r13
        ; pop r12
        ; pop rbx
        ; ret
    );
    for s in std::mem::take(&mut b.slow) {
        let a = &mut b.a;
        dynasm!(a ; .arch x64 ; =>s.label);
        if s.fold {
            fold_flags(a);
        }
        let last = s.index + 1 == n;
        if last && ops[s.index].form == Form::Call {
            // Its handler pushes `next_rip` (which the block did not set: `sets_next`).
            let v = ops[s.index].next_rip as i64;
            dynasm!(a ; .arch x64 ; mov rax, QWORD v ; mov QWORD [rbx + nr], rax);
        }
        b.call_handler(s.index);
        let a = &mut b.a;
        if last {
            // A store into this page or a device access: back to the dispatch loop (before the
            // flags are loaded: the test changes them), with the flags in RFLAGS.
            let cw = code_written();
            dynasm!(a ; .arch x64 ; cmp BYTE [rbx + cw], 0 ; jne =>leave);
        }
        if s.flags {
            load_flags(a, false);
        }
        dynasm!(a ; .arch x64 ; jmp =>s.resume);
    }
    for (label, done, faulted) in std::mem::take(&mut b.exits) {
        // RIP: the faulting instruction's, or the one after the last that completed.
        let at_rip = match done {
            0 => rip,
            d => ops[d - 1].next_rip,
        } as i64;
        let done = done as i32;
        let a = &mut b.a;
        dynasm!(a ; .arch x64 ; =>label ; mov rcx, QWORD at_rip ; mov QWORD [rbx + rip_at], rcx);
        if faulted {
            dynasm!(a ; .arch x64 ; mov rdx, rax ; mov eax, done ; add rax, r15 ; jmp =>exit);
        } else {
            dynasm!(a ; .arch x64 ; mov eax, done ; add rax, r15 ; xor edx, edx ; jmp =>exit);
        }
    }
    Some((b.a.finalize().ok()?, chain))
}

/// Where a hop's target lies: in the page of the block the chain runs in, in another page
/// (the target's RIP), or at the address in RAX (in any page).
#[derive(Clone, Copy)]
enum Page {
    Same,
    Other(u64),
    Dynamic,
}

/// A linked exit's hop, with the link in RDX (and, for `Page::Dynamic`, the target's RIP in
/// RAX): on in the target's code when it is linked (else to `ask`: the dispatch loop links
/// it), its whole run fits in the budget (else to `plain`), and it is still good (what
/// `Cpu::block` checks): for a target in another page, the TLB maps it (canonical, executable
/// at this privilege: R13's read bit moved to the execute bit) to RAM (else to `plain`: a miss
/// is no reason to relink) and to the physical page it was linked in; and that page's
/// generation is the one it was linked at (else to `ask`). `all`: this block's instructions.
fn emit_hop(a: &mut Asm, page: Page, all: i32, plain: DynamicLabel, ask: DynamicLabel) {
    let (l_entry, l_n) = (offset_of!(Link, entry) as i32, offset_of!(Link, n) as i32);
    let (l_gen_at, l_gen, l_ppage) = (
        offset_of!(Link, gen_at) as i32,
        offset_of!(Link, gen) as i32,
        offset_of!(Link, ppage) as i32,
    );
    let (tlb, cp, limit) = (tlb_entries(), code_page(), jit_limit());
    let (tag, perm, host, ppage) = (
        offset_of!(TlbEntry, tag) as i32,
        offset_of!(TlbEntry, perm) as i32,
        offset_of!(TlbEntry, host) as i32,
        offset_of!(TlbEntry, ppage) as i32,
    );
    dynasm!(a
        ; .arch x64
        ; mov rcx, QWORD [rdx + l_entry]
        ; test rcx, rcx
        ; jz =>ask
        // The target's whole run fits.
        ; lea r8, [r15 + all]
        ; mov r9, r8
        ; add r9, QWORD [rdx + l_n]
        ; mov r10, QWORD [rbx + limit]
        ; cmp r9, QWORD [r10]
        ; ja =>plain
    );
    // R10: the TLB entry of the target's page, R9: its page number.
    match page {
        Page::Same => {}
        Page::Other(rip) => {
            let vpn = (rip >> 12) as i64;
            let at = ((rip >> 12) as usize & (crate::mmu::TLB_SIZE - 1)) * size_of::<TlbEntry>();
            let at = at as i32;
            dynasm!(a
                ; .arch x64
                ; mov r10, QWORD [rbx + tlb]
                ; add r10, at
                ; mov r9, QWORD vpn
            );
        }
        Page::Dynamic => {
            let index_mask = (crate::mmu::TLB_SIZE - 1) as i32;
            dynasm!(a
                ; .arch x64
                ; mov r9, rax
                ; shr r9, 12
                ; mov r10d, r9d
                ; and r10d, index_mask
                ; shl r10d, 5
                ; add r10, QWORD [rbx + tlb]
            );
        }
    }
    if !matches!(page, Page::Same) {
        let x = (ACC_X - ACC_R) as i8;
        dynasm!(a
            ; .arch x64
            ; cmp QWORD [r10 + tag], r9
            ; jne =>plain
            ; mov r9d, r13d
            ; shl r9d, x
            ; test BYTE [r10 + perm], r9b
            ; jz =>plain
            ; mov rsi, QWORD [r10 + host]
            ; test rsi, rsi
            ; jz =>plain
            ; mov rdi, QWORD [r10 + ppage]
            ; cmp rdi, QWORD [rdx + l_ppage]
            ; jne =>ask
        );
    }
    dynasm!(a
        ; .arch x64
        ; mov rax, QWORD [rdx + l_gen_at]
        ; mov rax, QWORD [rax]
        ; cmp rax, QWORD [rdx + l_gen]
        ; jne =>ask
    );
    if !matches!(page, Page::Same) {
        // The chain runs in that page now.
        dynasm!(a ; .arch x64 ; mov QWORD [rbx + cp], rdi);
    }
    dynasm!(a
        ; .arch x64
        ; mov r15, r8
        ; jmp rcx
    );
}

/// A TLB lookup, inline, of the linear address in RAX: leaves RAX the host address for a
/// `size`-byte access (a write if `write`), or goes to `slow` when the access needs the
/// handler: crossing a page, not in the TLB with the permission (R13/R14 hold the bits for the
/// current privilege) to a RAM page (`TlbEntry::fast`), or (a write) in the running block's
/// page or a watched one. One compare covers the page crossing and the tag: the entry is the
/// first byte's, and its tag must be the last byte's page (an entry at that index never holds
/// the next page). A non-canonical address never matches (the TLB holds canonical pages only:
/// `Cpu::translate`). Uses RCX and RDX.
fn emit_translate(a: &mut Asm, size: i32, write: bool, slow: DynamicLabel) {
    let tlb = tlb_entries();
    let (tag, fast, host, ppage) = (
        offset_of!(TlbEntry, tag) as i32,
        offset_of!(TlbEntry, fast) as i32,
        offset_of!(TlbEntry, host) as i32,
        offset_of!(TlbEntry, ppage) as i32,
    );
    const _: () = assert!(size_of::<TlbEntry>() == 32);
    // The entry's offset: the page number's low bits, times 32.
    let index_mask = ((crate::mmu::TLB_SIZE - 1) << 5) as i32;
    let last = size - 1;
    dynasm!(a
        ; .arch x64
        ; lea rcx, [rax + last]
        ; shr rcx, 12
        ; mov edx, eax
        ; shr edx, 7
        ; and edx, index_mask
        ; add rdx, QWORD [rbx + tlb]
        ; cmp QWORD [rdx + tag], rcx
        ; jne =>slow
    );
    if write {
        // Not into the running block's page, nor a watched one (code was translated from it:
        // its generation must move). A RAM page has a generation word.
        let (cp, gens) = (code_page(), code_gens());
        dynasm!(a
            ; .arch x64
            ; test BYTE [rdx + fast], r14b
            ; jz =>slow
            ; mov rcx, QWORD [rdx + ppage]
            ; cmp rcx, QWORD [rbx + cp]
            ; je =>slow
            ; shr rcx, 9
            ; add rcx, QWORD [rbx + gens]
            ; test BYTE [rcx], 1
            ; jnz =>slow
        );
    } else {
        dynasm!(a ; .arch x64 ; test BYTE [rdx + fast], r13b ; jz =>slow);
    }
    dynasm!(a
        ; .arch x64
        ; and eax, 0xfff
        ; add rax, QWORD [rdx + host]
    );
}

/// Offset of `Cpu` field paths used by the templates.
fn tlb_entries() -> i32 {
    (offset_of!(Cpu, tlb) + offset_of!(crate::mmu::Tlb, e)) as i32
}

fn seg_base(s: u8) -> i32 {
    (offset_of!(Cpu, st)
        + offset_of!(crate::state::CpuState, seg)
        + s as usize * size_of::<kvmbox_cpu::Segment>()
        + offset_of!(kvmbox_cpu::Segment, base)) as i32
}

fn jit_limit() -> i32 {
    offset_of!(Cpu, jit_limit) as i32
}

fn code_page() -> i32 {
    offset_of!(Cpu, code_page) as i32
}

fn code_gens() -> i32 {
    offset_of!(Cpu, code_gens) as i32
}

fn link_from() -> i32 {
    offset_of!(Cpu, link_from) as i32
}

fn rip_field() -> i32 {
    (offset_of!(Cpu, st) + offset_of!(crate::state::CpuState, rip)) as i32
}

impl Block<'_> {
    /// Call instruction `i`'s handler; on a fault leave with `i` done, and after a write into
    /// the block's page (or a device access) leave with `i + 1` done.
    fn call_handler(&mut self, i: usize) {
        let f = &self.ops[i];
        let Some(h) = f.handler else {
            return;
        };
        let at = (i * size_of::<Fast>()) as i32;
        let fault = self.a.new_dynamic_label();
        self.exits.push((fault, i, true));
        // The handler sees and changes the guest's registers in `Cpu`.
        self.flush();
        let ins = (f.form == Form::Generic)
            .then(|| self.generic.next())
            .flatten();
        let a = &mut self.a;
        if let Some(ins) = ins {
            // The instruction itself, not its form (which is another cache line).
            let (ins, ends) = (ins as *const iced_x86::Instruction as i64, f.sub as i32);
            let h = crate::exec::fast::generic_decoded as *const () as usize as i64;
            dynasm!(a
                ; .arch x64
                ; mov rdi, rbx
                ; mov rsi, QWORD ins
                ; mov edx, ends
                ; mov rax, QWORD h
                ; call rax
            );
        } else {
            let h = h as usize as i64;
            dynasm!(a
                ; .arch x64
                ; mov rdi, rbx
                ; lea rsi, [r12 + at]
                ; mov rax, QWORD h
                ; call rax
            );
        }
        dynasm!(a
            ; .arch x64
            ; test rax, rax
            ; jnz =>fault
        );
        if i + 1 < self.ops.len() {
            let stop = self.a.new_dynamic_label();
            self.exits.push((stop, i + 1, false));
            let cw = code_written();
            let a = &mut self.a;
            dynasm!(a
                ; .arch x64
                ; cmp BYTE [rbx + cw], 0
                ; jne =>stop
            );
        }
        reload(&mut self.a, &self.cached);
    }

    /// A slow path for instruction `i` (its handler), resuming at the label returned. Called
    /// before the instruction's code changes `pending`.
    fn slow(&mut self, i: usize, flags: bool) -> (DynamicLabel, DynamicLabel) {
        let label = self.a.new_dynamic_label();
        let resume = self.a.new_dynamic_label();
        self.slow.push(Slow {
            label,
            resume,
            index: i,
            flags,
            fold: self.pending,
        });
        (label, resume)
    }

    /// Load guest register `r` at width `bits` into host register `dst` (RAX or RCX),
    /// zero-extended, from its cached copy if it has one. Changes no host flags.
    fn load(&mut self, dst: u8, r: u8, bits: u8) {
        let h = self.cached.host[r as usize & 15];
        if h == UNCACHED {
            load(&mut self.a, dst, r, bits);
            return;
        }
        let a = &mut self.a;
        match bits {
            64 => dynasm!(a ; .arch x64 ; mov Rq(dst), Rq(h)),
            32 => dynasm!(a ; .arch x64 ; mov Rd(dst), Rd(h)),
            16 => dynasm!(a ; .arch x64 ; movzx Rd(dst), Rw(h)),
            _ => dynasm!(a ; .arch x64 ; movzx Rd(dst), Rb(h)),
        }
    }

    /// The host register holding guest register `r` for the block, if the block caches it
    /// and is expected to write it (`reg_uses`).
    fn cached_written(&self, r: u8) -> Option<u8> {
        let h = self.cached.host[r as usize & 15];
        (h != UNCACHED && self.cached.written & (1 << (r & 15)) != 0).then_some(h)
    }

    /// A host register holding guest register `r` as a source operand at width `bits`: its
    /// cached copy (whose bits above `bits` the operation ignores), or RCX loaded from `Cpu`.
    fn source(&mut self, r: u8, bits: u8) -> u8 {
        let h = self.cached.host[r as usize & 15];
        if h != UNCACHED {
            return h;
        }
        load(&mut self.a, RCX, r, bits);
        RCX
    }

    /// The host register an instruction operates on for guest register `r` at width `bits`
    /// (it writes it when `writes`): its cached copy, or RAX loaded from `Cpu` (`done`
    /// stores it back). The host's operation on either has the guest's semantics: a 32-bit
    /// result zero-extends, 8- and 16-bit ones keep the rest.
    fn work(&mut self, r: u8, bits: u8, writes: bool) -> u8 {
        let h = if writes {
            self.cached_written(r)
        } else {
            let h = self.cached.host[r as usize & 15];
            (h != UNCACHED).then_some(h)
        };
        match h {
            Some(h) => h,
            None => {
                load(&mut self.a, RAX, r, bits);
                RAX
            }
        }
    }

    /// After an operation on `work`'s register `w` for guest register `r`: store it unless
    /// it is the cached copy.
    fn done(&mut self, w: u8, r: u8, bits: u8) {
        if w == RAX {
            self.store(r, bits);
        }
    }

    /// Store RAX into guest register `r` at width `bits` (`store_from`).
    fn store(&mut self, r: u8, bits: u8) {
        self.store_from(RAX, r, bits);
    }

    /// Store host register `src` into guest register `r` at width `bits`: into its cached
    /// copy if it has one (and into `Cpu` too if the block was not expected to write it:
    /// `reg_uses` is only a plan), else into `Cpu`. Changes no host flags.
    fn store_from(&mut self, src: u8, r: u8, bits: u8) {
        let h = self.cached.host[r as usize & 15];
        if h == UNCACHED || self.cached.written & (1 << (r & 15)) == 0 {
            store(&mut self.a, src, r, bits);
        }
        if h == UNCACHED {
            return;
        }
        let a = &mut self.a;
        match bits {
            64 => dynasm!(a ; .arch x64 ; mov Rq(h), Rq(src)),
            32 => dynasm!(a ; .arch x64 ; mov Rd(h), Rd(src)),
            16 => dynasm!(a ; .arch x64 ; mov Rw(h), Rw(src)),
            _ => dynasm!(a ; .arch x64 ; mov Rb(h), Rb(src)),
        }
    }

    /// Write the cached registers the block writes back into `Cpu` (before a handler runs,
    /// and at the block's end).
    fn flush(&mut self) {
        let a = &mut self.a;
        for &(g, h) in &self.cached.regs {
            if self.cached.written & (1 << g) != 0 {
                let m = gpr(g);
                dynasm!(a ; .arch x64 ; mov QWORD [rbx + m], Rq(h));
            }
        }
    }

    /// Merge pending flags into RFLAGS (before a handler runs, a consumer loads them, or
    /// the block ends).
    fn settle(&mut self) {
        if self.pending {
            fold_flags(&mut self.a);
            self.pending = false;
        }
    }

    /// RAX = the linear address of `f`'s memory operand (64-bit mode: only FS and GS have a
    /// base). Base and index come from their cached copies or `Cpu` (into RAX and RCX).
    fn address(&mut self, f: &Fast) {
        let index = (f.index_mask != 0).then(|| self.source(f.index, 64));
        let base = (f.base_mask != 0).then(|| match self.cached.host[f.base as usize & 15] {
            UNCACHED => {
                load(&mut self.a, RAX, f.base, 64);
                RAX
            }
            h => h,
        });
        let disp = f.disp as i64;
        // A displacement that fits the LEA, else added after it.
        let (near, far) = if disp == disp as i32 as i64 {
            (disp as i32, None)
        } else {
            (0, Some(disp))
        };
        let a = &mut self.a;
        match (base, index) {
            (Some(b), Some(x)) => match f.scale & 3 {
                0 => dynasm!(a ; .arch x64 ; lea rax, [Rq(b) + Rq(x) + near]),
                1 => dynasm!(a ; .arch x64 ; lea rax, [Rq(b) + Rq(x) * 2 + near]),
                2 => dynasm!(a ; .arch x64 ; lea rax, [Rq(b) + Rq(x) * 4 + near]),
                _ => dynasm!(a ; .arch x64 ; lea rax, [Rq(b) + Rq(x) * 8 + near]),
            },
            (Some(b), None) => dynasm!(a ; .arch x64 ; lea rax, [Rq(b) + near]),
            (None, Some(x)) => match f.scale & 3 {
                0 => dynasm!(a ; .arch x64 ; lea rax, [Rq(x) + near]),
                1 => dynasm!(a ; .arch x64 ; lea rax, [Rq(x) * 2 + near]),
                2 => dynasm!(a ; .arch x64 ; lea rax, [Rq(x) * 4 + near]),
                _ => dynasm!(a ; .arch x64 ; lea rax, [Rq(x) * 8 + near]),
            },
            (None, None) => dynasm!(a ; .arch x64 ; mov rax, QWORD disp),
        }
        if let (Some(d), true) = (far, base.is_some() || index.is_some()) {
            dynasm!(a ; .arch x64 ; mov rdx, QWORD d ; add rax, rdx);
        }
        match f.addr_mask {
            0xffff => dynasm!(a ; .arch x64 ; movzx eax, ax),
            0xffff_ffff => dynasm!(a ; .arch x64 ; mov eax, eax),
            _ => {}
        }
        if f.seg >= 4 {
            let sb = seg_base(f.seg);
            dynasm!(a ; .arch x64 ; add rax, QWORD [rbx + sb]);
        }
    }

    /// Turn the linear address in RAX into a host pointer for a `size`-byte access (a write
    /// if `write`) with the inline TLB lookup (`emit_translate`), or go to `slow`.
    fn translate(&mut self, size: i32, write: bool, slow: DynamicLabel) {
        emit_translate(&mut self.a, size, write, slow);
    }

    /// RAX = the host address of the stack slot a 64-bit push writes (RSP - 8) or a pop reads
    /// (RSP), or go to `slow` (in 64-bit mode SS has no base).
    fn stack_slot(&mut self, push: bool, slow: DynamicLabel) {
        let stack = gpr(4);
        let a = &mut self.a;
        dynasm!(a ; .arch x64 ; mov rax, QWORD [rbx + stack]);
        if push {
            dynasm!(a ; .arch x64 ; sub rax, 8);
        }
        self.translate(8, push, slow);
    }

    /// Host register `dst` = the `bits`-wide value at the host address in register `ptr`,
    /// zero-extended (or sign-extended).
    fn load_mem(&mut self, dst: u8, ptr: u8, bits: u8, signed: bool) {
        let a = &mut self.a;
        match (bits, signed) {
            (64, _) => dynasm!(a ; .arch x64 ; mov Rq(dst), QWORD [Rq(ptr)]),
            (32, false) => dynasm!(a ; .arch x64 ; mov Rd(dst), DWORD [Rq(ptr)]),
            (32, true) => dynasm!(a ; .arch x64 ; movsxd Rq(dst), DWORD [Rq(ptr)]),
            (16, false) => dynasm!(a ; .arch x64 ; movzx Rd(dst), WORD [Rq(ptr)]),
            (16, true) => dynasm!(a ; .arch x64 ; movsx Rq(dst), WORD [Rq(ptr)]),
            (_, false) => dynasm!(a ; .arch x64 ; movzx Rd(dst), BYTE [Rq(ptr)]),
            (_, true) => dynasm!(a ; .arch x64 ; movsx Rq(dst), BYTE [Rq(ptr)]),
        }
    }

    /// Store host register `src`'s low `bits` at the host address in register `ptr`.
    fn store_mem(&mut self, ptr: u8, src: u8, bits: u8) {
        let a = &mut self.a;
        match bits {
            64 => dynasm!(a ; .arch x64 ; mov QWORD [Rq(ptr)], Rq(src)),
            32 => dynasm!(a ; .arch x64 ; mov DWORD [Rq(ptr)], Rd(src)),
            16 => dynasm!(a ; .arch x64 ; mov WORD [Rq(ptr)], Rw(src)),
            _ => dynasm!(a ; .arch x64 ; mov BYTE [Rq(ptr)], Rb(src)),
        }
    }

    /// The inline code of instruction `i`; `fused`: a flag consumer right after an inline
    /// producer, so the host flags are the guest's and must be left as they are.
    fn inline(&mut self, i: usize, fused: bool) {
        let f = &self.ops[i];
        let bits = f.bits;
        let stack = gpr(4);
        let nr = next_rip();
        match f.form {
            Form::MovRR => match self.cached_written(f.r0) {
                // Into the cached copy, from the source's or from `Cpu`.
                Some(h) => {
                    let src = self.cached.host[f.r1 as usize & 15];
                    let m = gpr(f.r1);
                    let a = &mut self.a;
                    match (src == UNCACHED, bits) {
                        (false, 64) => dynasm!(a ; .arch x64 ; mov Rq(h), Rq(src)),
                        (false, 32) => dynasm!(a ; .arch x64 ; mov Rd(h), Rd(src)),
                        (false, 16) => dynasm!(a ; .arch x64 ; mov Rw(h), Rw(src)),
                        (false, _) => dynasm!(a ; .arch x64 ; mov Rb(h), Rb(src)),
                        (true, 64) => dynasm!(a ; .arch x64 ; mov Rq(h), QWORD [rbx + m]),
                        (true, 32) => dynasm!(a ; .arch x64 ; mov Rd(h), DWORD [rbx + m]),
                        (true, 16) => dynasm!(a ; .arch x64 ; mov Rw(h), WORD [rbx + m]),
                        (true, _) => dynasm!(a ; .arch x64 ; mov Rb(h), BYTE [rbx + m]),
                    }
                }
                None => {
                    self.load(RAX, f.r1, bits);
                    self.store(f.r0, bits);
                }
            },
            Form::MovRI => {
                let imm = f.imm as i64;
                let a = &mut self.a;
                dynasm!(a ; .arch x64 ; mov rax, QWORD imm);
                self.store(f.r0, bits);
            }
            Form::MovRM | Form::MovxM => {
                let (slow, resume) = self.slow(i, false);
                self.address(f);
                let (size, signed) = if f.form == Form::MovxM {
                    (f.src_bits, f.sub != 0)
                } else {
                    (bits, false)
                };
                self.translate(size as i32 / 8, false, slow);
                self.load_mem(RAX, RAX, size, signed);
                self.store(f.r0, bits);
                let a = &mut self.a;
                dynasm!(a ; .arch x64 ; =>resume);
            }
            Form::MovMR | Form::MovMI => {
                let (slow, resume) = self.slow(i, false);
                self.address(f);
                self.translate(bits as i32 / 8, true, slow);
                if f.form == Form::MovMR {
                    self.load(RCX, f.r1, bits);
                } else {
                    let imm = f.imm as i64;
                    let a = &mut self.a;
                    dynasm!(a ; .arch x64 ; mov rcx, QWORD imm);
                }
                self.store_mem(RAX, RCX, bits);
                let a = &mut self.a;
                dynasm!(a ; .arch x64 ; =>resume);
            }
            Form::AluRR | Form::AluRI | Form::AluRM => {
                let mut resume = None;
                // The source operand's host register.
                let src = if f.form == Form::AluRM {
                    let (slow, r) = self.slow(i, true);
                    resume = Some(r);
                    self.address(f);
                    self.translate(bits as i32 / 8, false, slow);
                    self.load_mem(RCX, RAX, bits, false);
                    RCX
                } else if f.form == Form::AluRR {
                    self.source(f.r1, bits)
                } else {
                    let imm = f.imm as i64;
                    let a = &mut self.a;
                    dynasm!(a ; .arch x64 ; mov rcx, QWORD imm);
                    RCX
                };
                // CMP and TEST only read.
                let writes = f.sub < 7;
                let dst = self.work(f.r0, bits, writes);
                let pending = self.pending;
                let a = &mut self.a;
                if matches!(f.sub, 2 | 3) {
                    carry_in(a, pending);
                }
                alu(a, f.sub, dst, src, bits);
                if writes {
                    self.done(dst, f.r0, bits);
                }
                if let Some(r) = resume {
                    let a = &mut self.a;
                    dynasm!(a ; .arch x64 ; =>r);
                }
            }
            Form::AluMR | Form::AluMI => {
                let (slow, resume) = self.slow(i, true);
                self.address(f);
                // CMP and TEST only read.
                let writes = f.sub < 7;
                self.translate(bits as i32 / 8, writes, slow);
                let a = &mut self.a;
                dynasm!(a ; .arch x64 ; mov rdx, rax);
                if f.form == Form::AluMR {
                    self.load(RCX, f.r1, bits);
                } else {
                    let imm = f.imm as i64;
                    dynasm!(a ; .arch x64 ; mov rcx, QWORD imm);
                }
                self.load_mem(RAX, RDX, bits, false);
                let pending = self.pending;
                let a = &mut self.a;
                if matches!(f.sub, 2 | 3) {
                    carry_in(a, pending);
                }
                alu(a, f.sub, RAX, RCX, bits);
                if writes {
                    self.store_mem(RDX, RAX, bits);
                }
                let a = &mut self.a;
                dynasm!(a ; .arch x64 ; =>resume);
            }
            Form::IncDecR => {
                let pending = self.pending;
                let r = self.work(f.r0, bits, true);
                let a = &mut self.a;
                // INC/DEC keep CF: the guest's goes into the host's first.
                carry_in(a, pending);
                one_operand!(a, f.sub != 0, bits, r, inc, dec);
                self.done(r, f.r0, bits);
            }
            Form::ShiftRI => {
                let Some(n) = shift_count(f) else { return };
                let r = self.work(f.r0, bits, true);
                let a = &mut self.a;
                shift!(a, f.sub, bits, r, n);
                self.done(r, f.r0, bits);
                // A rotate writes CF and OF only: into the pending flags, or into RFLAGS
                // beside the others (unless overwritten before they can be seen).
                if rotate(f) && !flags_dead_after(self.ops, i) {
                    let a = &mut self.a;
                    if self.pending {
                        let at = jit_flags();
                        dynasm!(a
                            ; .arch x64
                            ; setc cl
                            ; seto BYTE [rbx + at + 1]
                            ; and BYTE [rbx + at], !1
                            ; or BYTE [rbx + at], cl
                        );
                    } else {
                        merge_flags_of(a, CF | OF);
                    }
                }
            }
            Form::ShiftRC => {
                // SHL/SHR/SAR by CL: the host's shift of the same width by the same count
                // (masked alike). A zero count leaves the flags: they are merged only after a
                // shift by a non-zero count (and unless overwritten before they can be seen),
                // so this is no producer for fusion or dead flags.
                let merge = !flags_dead_after(self.ops, i);
                if merge {
                    self.settle();
                }
                let mask = if bits == 64 { 63 } else { 31 };
                self.load(RAX, f.r0, bits);
                self.load(RCX, 1, 8);
                let a = &mut self.a;
                dynasm!(a
                    ; .arch x64
                    ; and ecx, mask
                    ; jz >zero
                );
                shift!(a, f.sub, bits, RAX, cl);
                self.store(f.r0, bits);
                if merge {
                    merge_flags(&mut self.a);
                }
                // A 32-bit shift writes (zero-extends) its register even by zero.
                let a = &mut self.a;
                dynasm!(a ; .arch x64 ; jmp >done ; zero:);
                self.store(f.r0, bits);
                let a = &mut self.a;
                dynasm!(a ; .arch x64 ; done:);
            }
            Form::NegNotR => {
                let r = self.work(f.r0, bits, true);
                let a = &mut self.a;
                one_operand!(a, f.sub != 0, bits, r, not, neg);
                self.done(r, f.r0, bits);
            }
            Form::TestHiRI => {
                // The register's second byte.
                let imm = f.imm as i8;
                self.load(RAX, f.r0, 16);
                let a = &mut self.a;
                dynasm!(a ; .arch x64 ; test ah, imm);
            }
            Form::BswapR => {
                let r = self.work(f.r0, bits, true);
                let a = &mut self.a;
                if bits == 64 {
                    dynasm!(a ; .arch x64 ; bswap Rq(r));
                } else {
                    dynasm!(a ; .arch x64 ; bswap Rd(r));
                }
                self.done(r, f.r0, bits);
            }
            Form::Cext => {
                // The host's own instruction on the guest's RAX (and RDX).
                self.load(RAX, 0, 64);
                let a = &mut self.a;
                let (src, to, width) = match f.sub {
                    0 => {
                        dynasm!(a ; .arch x64 ; cbw);
                        (RAX, 0, 16)
                    }
                    1 => {
                        dynasm!(a ; .arch x64 ; cwde);
                        (RAX, 0, 32)
                    }
                    2 => {
                        dynasm!(a ; .arch x64 ; cdqe);
                        (RAX, 0, 64)
                    }
                    3 => {
                        dynasm!(a ; .arch x64 ; cwd);
                        (RDX, 2, 16)
                    }
                    4 => {
                        dynasm!(a ; .arch x64 ; cdq);
                        (RDX, 2, 32)
                    }
                    _ => {
                        dynasm!(a ; .arch x64 ; cqo);
                        (RDX, 2, 64)
                    }
                };
                self.store_from(src, to, width);
            }
            Form::ImulRR => {
                let src = self.source(f.r1, bits);
                let dst = self.work(f.r0, bits, true);
                let a = &mut self.a;
                match bits {
                    64 => dynasm!(a ; .arch x64 ; imul Rq(dst), Rq(src)),
                    32 => dynasm!(a ; .arch x64 ; imul Rd(dst), Rd(src)),
                    _ => dynasm!(a ; .arch x64 ; imul Rw(dst), Rw(src)),
                }
                self.done(dst, f.r0, bits);
            }
            Form::Lea => {
                // The offset, without a segment base.
                let mut g = *f;
                g.seg = 0;
                self.address(&g);
                self.store(f.r0, bits);
            }
            Form::MovxR => {
                if f.sub == 0 {
                    self.load(RAX, f.r1, f.src_bits);
                } else {
                    // Sign-extended to 64 bits.
                    self.load(RAX, f.r1, f.src_bits);
                    let a = &mut self.a;
                    match f.src_bits {
                        8 => dynasm!(a ; .arch x64 ; movsx rax, al),
                        16 => dynasm!(a ; .arch x64 ; movsx rax, ax),
                        _ => dynasm!(a ; .arch x64 ; movsxd rax, eax),
                    }
                }
                self.store(f.r0, bits);
            }
            Form::PushR => {
                let (slow, resume) = self.slow(i, false);
                self.stack_slot(true, slow);
                self.load(RCX, f.r0, 64);
                let a = &mut self.a;
                dynasm!(a
                    ; .arch x64
                    ; mov QWORD [rax], rcx
                    ; sub QWORD [rbx + stack], 8
                    ; =>resume
                );
            }
            Form::PopR => {
                let (slow, resume) = self.slow(i, false);
                self.stack_slot(false, slow);
                let a = &mut self.a;
                dynasm!(a
                    ; .arch x64
                    ; mov rax, QWORD [rax]
                    ; add QWORD [rbx + stack], 8
                );
                self.store(f.r0, 64);
                let a = &mut self.a;
                dynasm!(a ; .arch x64 ; =>resume);
            }
            Form::Call => {
                let (slow, resume) = self.slow(i, false);
                self.stack_slot(true, slow);
                let a = &mut self.a;
                let (t, next) = (f.imm as i64, f.next_rip as i64);
                dynasm!(a
                    ; .arch x64
                    // The return address: this (last) instruction's next RIP.
                    ; mov rcx, QWORD next
                    ; mov QWORD [rax], rcx
                    ; sub QWORD [rbx + stack], 8
                    ; mov rcx, QWORD t
                    ; mov QWORD [rbx + nr], rcx
                    ; =>resume
                );
            }
            Form::Ret => {
                let (slow, resume) = self.slow(i, false);
                self.stack_slot(false, slow);
                let a = &mut self.a;
                let release = 8 + f.imm as i32;
                dynasm!(a ; .arch x64 ; mov rax, QWORD [rax]);
                // A non-canonical return address faults (the handler raises it).
                unless_canonical(a, slow);
                dynasm!(a
                    ; .arch x64
                    ; add QWORD [rbx + stack], release
                    ; mov QWORD [rbx + nr], rax
                    ; =>resume
                );
            }
            Form::Jmp => {
                let a = &mut self.a;
                let t = f.imm as i64;
                dynasm!(a ; .arch x64 ; mov rax, QWORD t ; mov QWORD [rbx + nr], rax);
            }
            // Always its block's last instruction: the block's end branches on the host's flags
            // (`assemble`), which hold the guest's from here on: its producer's right before
            // (fused: nothing to do), or loaded from the captured ones, which stay captured.
            Form::Jcc if !fused => {
                if !self.pending {
                    open_flags(&mut self.a);
                    self.pending = true;
                }
                load_flags(&mut self.a, true);
            }
            Form::SetccR => {
                if !fused {
                    self.settle();
                    load_flags(&mut self.a, false);
                }
                setcc_al(&mut self.a, f.sub);
                self.store(f.r0, 8);
            }
            Form::CmovRR => {
                if !fused {
                    self.settle();
                    load_flags(&mut self.a, false);
                }
                self.load(RAX, f.r0, bits);
                self.load(RCX, f.r1, bits);
                cmov_rax_rcx(&mut self.a, f.sub);
                self.store(f.r0, bits);
            }
            _ => {}
        }
    }
}
