//! `kvmbox_cpu::Vcpu` for the engine: the run loop (interrupt polling, HLT, wait-for-SIPI,
//! kicks) and register get/set.

use crate::cpu::{Cpu, Fault, Stats};
use crate::interrupt::EventKind;
use crate::irq::StartupEvent;
use crate::state::dr::{DR6_B, DR6_BS};
use crate::state::{flags, seg, CpuState};
use kvmbox_cpu::state::{LapicState, MpState, VcpuEvents, LAPIC_PAGE_SIZE};
use kvmbox_cpu::{
    CpuidEntry, IoHandler, Regs, Result, SpecialRegs, Vcpu, VcpuConfig, VcpuExit, VcpuKicker,
    VcpuState,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Instructions executed between checks of the kick flag and the interrupt controller.
pub const BATCH: u32 = 16384;

struct Kick {
    kicked: AtomicBool,
    /// The vCPU's, so a kick ends compiled code and the batch at once.
    attention: Arc<crate::cpu::Attention>,
}

impl VcpuKicker for Kick {
    fn kick(&self) {
        self.kicked.store(true, Ordering::SeqCst);
        self.attention.raise();
    }
}

/// One vCPU of an [`crate::EmuVm`].
pub struct EmuVcpu {
    cpu: Cpu,
    kick: Arc<Kick>,
    /// An event a restored state was delivering (saved on KVM), delivered before the first
    /// instruction runs: (vector, error code, kind).
    restored_event: Option<(u8, Option<u32>, EventKind)>,
}

impl EmuVcpu {
    pub(crate) fn new(cpu: Cpu) -> Self {
        let kick = Arc::new(Kick {
            kicked: AtomicBool::new(false),
            attention: cpu.attention.clone(),
        });
        EmuVcpu {
            cpu,
            kick,
            restored_event: None,
        }
    }

    /// Compile translated blocks to host code after they ran `threshold` times (0: never,
    /// the JIT is off). The default is 16, or `KVMBOX_EMU_JIT` (`0` or `off`, or a number).
    pub fn set_jit_threshold(&mut self, threshold: u32) {
        self.cpu.set_jit_threshold(threshold);
    }

    /// Engine counters (instructions, exceptions, unimplemented instructions, caches).
    pub fn stats(&self) -> Stats {
        let mut s = self.cpu.stats.clone();
        s.tlb_misses = self.cpu.tlb.misses;
        s
    }

    /// Waiting for INIT/SIPI (an application processor not yet started).
    pub fn waiting_for_sipi(&self) -> bool {
        self.cpu.wait_sipi
    }

    /// Halted by HLT, waiting for an interrupt.
    pub fn halted(&self) -> bool {
        self.cpu.halted
    }

    /// Full architectural state.
    pub fn state(&self) -> &CpuState {
        &self.cpu.st
    }

    /// Mutable architectural state (the TLB is flushed, as after any state load).
    pub fn state_mut(&mut self) -> &mut CpuState {
        self.cpu.flush_all();
        &mut self.cpu.st
    }

    /// Execute at most `n` instructions (or until HLT / a stop), for tests and single-stepping.
    pub fn run_steps(&mut self, io: &dyn IoHandler, n: u64) -> Result<Option<VcpuExit>> {
        let kick = self.kick.clone();
        self.cpu
            .with_io(io, |cpu| cpu.run_loop(&kick.kicked, Some(n)))
    }
}

impl Cpu {
    /// Whether `ins`, just executed with TF = `tf_before`, ends in a single-step trap.
    fn step_trap(&self, ins: &iced_x86::Instruction, tf_before: bool) -> bool {
        use iced_x86::Mnemonic as M;
        match ins.mnemonic() {
            M::Syscall | M::Sysret | M::Sysretq => self.st.rflags & flags::TF != 0,
            // ICEBP's own #DB is the trap.
            M::Int1 => false,
            // MOV SS and POP SS block debug exceptions for one instruction: theirs is
            // dropped, and the next instruction traps as usual (STI's shadow blocks only
            // interrupts).
            M::Mov | M::Pop if self.set_shadow => false,
            _ => tf_before,
        }
    }

    /// Record a debug exception's causes in DR6: B0-B3 say which breakpoints matched (and
    /// are cleared when none did), the other status bits are only ever set.
    fn debug_status(&mut self, matched: u8, other: u64) {
        let dr6 = &mut self.st.dr[6];
        *dr6 = (*dr6 & !DR6_B) | u64::from(matched) | other;
    }

    /// Take the single-step trap of a HLT (see [`Cpu::step_trap_pending`]).
    fn take_step_trap(&mut self) -> Result<Option<VcpuExit>> {
        self.step_trap_pending = false;
        self.halted = false;
        self.debug_status(0, DR6_BS);
        let rip = self.st.rip;
        match self.deliver(1, None, EventKind::Exception, rip) {
            Ok(()) => Ok(None),
            Err(f) => self.fault_exit(f),
        }
    }

    /// The quiet path applies: no single-step, no RF, no breakpoint armed or pending (one test
    /// of conditions that are rarely set).
    #[inline(always)]
    fn quiet(&self) -> bool {
        self.st.rflags & (flags::TF | flags::RF) == 0
            && self.bp_exec | self.bp_data | self.bp_pending == 0
    }

    /// Run the translated block at CS:RIP (`Cpu::block`), at most `max` (>= 1) instructions,
    /// on the quiet path. None: no block here (`step` the instruction). Otherwise the number
    /// of instructions the batch counts (those that completed, plus a faulting one) and how
    /// the last one ended: a fault leaves RIP on the faulting instruction and the state as
    /// `step` would, since each handler commits nothing before its last possible fault.
    /// Handlers change neither the shadow (beyond ending one), NMI blocking, HLT state, TF/RF,
    /// breakpoints nor the code mode, and IF only from 1 to 0 (CLI), so the run loop's checks
    /// hold for the whole block (a time read that lets an interrupt go first ends it as a
    /// fault does, `Fault::InterruptFirst`); a write into the block's own page ends it after the writing
    /// instruction
    /// (`Cpu::note_write`), so self-modified bytes are validated again.
    #[inline(always)]
    fn run_block(&mut self, max: u64) -> Option<(u64, crate::cpu::R<()>)> {
        let b = self.block()?;
        // SAFETY: `b` points into the block cache, which only `block` writes (moving entries
        // between ways, `build_block`); neither handlers nor anything they call look blocks
        // up, and compiled code refers to the JIT's copies of forms and bytes, not to it.
        let b = unsafe { &*b };
        let all = b.ops();
        let n = all.len().min(max as usize);
        let ops = &all[..n];
        if n == 0 {
            // Not reached: `block` returns a block with handlers, and `max >= 1`.
            self.code_page = crate::cpu::NO_CODE_PAGE;
            return None;
        }
        self.set_shadow = false;
        // `next_rip` is set once, to the last instruction's: only a block's last instruction
        // transfers control, and only control transfers read or write `next_rip` (the others'
        // next RIP is in their `Fast`). RIP is committed once, after the loop: handlers never
        // read it (their next RIP and branch targets are pre-resolved), and a fault sets it to
        // the faulting instruction. No per-instruction counter: how many ran follows from
        // where the iterator stopped.
        let (done, res) = match b.code {
            // The whole block, compiled (`crate::jit`): the same protocol as the loop below,
            // but the code commits RIP itself (it may go on in blocks linked to this one), so
            // the forms are not read here (they are another cache line).
            Some(code) if n == all.len() && self.jit.ready(code) => {
                let user = if self.st.cpl() == 3 { 3 } else { 0 };
                // The limit, unless something asked for attention since the batch loop looked
                // (the swap orders the flag's load after the store: a raise either sees its 0
                // kept, or its flag seen here).
                self.attention.limit.swap(max, Ordering::SeqCst);
                if self.attention.flag.load(Ordering::SeqCst) {
                    self.attention.limit.store(0, Ordering::Relaxed);
                }
                // SAFETY: `code` was compiled from this block's forms (kept with the code;
                // `build_block` drops it when it rebuilds the block) and stays mapped
                // executable until the JIT's cache is emptied, which only `compile_block`
                // does, never while code runs.
                let exit = unsafe { (code.entry)(self, user) };
                let res = if exit.fault.is_null() {
                    Ok(())
                } else {
                    // SAFETY: a non-null fault is the `Box<Fault>` a handler returned, given
                    // up by the code to this caller only.
                    Err(*unsafe { Box::from_raw(exit.fault) })
                };
                self.stats.jit_instructions += exit.done;
                (exit.done as usize, res)
            }
            _ => {
                self.next_rip = ops[n - 1].next_rip;
                let mut it = ops.iter();
                // The loop's value: how the last instruction ended, and whether the one the
                // iterator took last did not complete (it faulted, or has no handler:
                // `build_block` never puts one in a block, but `step` would run it).
                let (res, not_done) = loop {
                    let Some(f) = it.next() else {
                        break (Ok(()), 0);
                    };
                    let Some(h) = f.handler else {
                        break (Ok(()), 1);
                    };
                    if let Err(e) = h(self, f) {
                        break (Err(*e), 1);
                    }
                    if self.code_written {
                        break (Ok(()), 0);
                    }
                };
                let done = n - it.len() - not_done;
                // RIP: where the last instruction went after the whole block, else the next
                // RIP of the last that completed (not a control transfer).
                self.st.rip = match done {
                    0 => self.st.rip,
                    d if d == n => self.next_rip,
                    d => ops[d - 1].next_rip,
                };
                (done, res)
            }
        };
        self.code_page = crate::cpu::NO_CODE_PAGE;
        if done > 0 {
            self.shadow = false;
        }
        self.stats.instructions += done as u64;
        self.stats.blocks += 1;
        self.stats.block_instructions += done as u64;
        Some((done as u64 + res.is_err() as u64, res))
    }

    /// Execute one instruction (fetch, decode, execute, commit RIP), then take its debug
    /// traps: single step and the data breakpoints it hit. Returns true when the instruction
    /// ran a decode-time handler on the quiet path: then nothing but registers, flags other
    /// than IF/TF, memory and RIP changed, so the run loop has nothing to check after it.
    #[inline(always)]
    fn step(&mut self) -> crate::cpu::R<bool> {
        // The quiet path: forms with a decode-time handler run it directly.
        if self.quiet() {
            self.set_shadow = false;
            let d = self.fetch_decode()?;
            // SAFETY: `d` points into the heap buffer of the decoded-instruction cache, which
            // is never reallocated and which only `fetch_decode` writes; `exec` does not fetch,
            // and a handler (`fast::generic` does fetch) gets a copy of the form.
            let d = unsafe { &*d };
            if let Some(h) = d.fast.handler {
                let f = d.fast;
                self.next_rip = f.next_rip;
                h(self, &f).map_err(|e| *e)?;
                self.st.rip = self.next_rip;
                self.stats.instructions += 1;
                self.shadow = false;
                return Ok(true);
            }
            self.bp_hits = 0;
            self.exec_generic(&d.ins, false, 0)?;
            return Ok(false);
        }
        // An instruction breakpoint is a fault before the instruction, unless RF (set by the
        // #DB handler's IRET frame) says the instruction resumes past it.
        if self.bp_exec != 0 && self.st.rflags & flags::RF == 0 {
            let matched = self.exec_breakpoints();
            if matched != 0 {
                self.debug_status(matched, 0);
                return Err(Fault::Exc(1, None));
            }
        }
        // RF has done its job: it lasts until the next instruction starts (an IRET sets it
        // again for the instruction it returns to; faults push it set).
        self.st.rflags &= !flags::RF;
        let tf = self.st.rflags & flags::TF != 0;
        self.set_shadow = false;
        self.bp_hits = 0;
        // Data breakpoints a MOV SS / POP SS hit wait for this instruction; they go with it
        // if it faults.
        let pending = std::mem::take(&mut self.bp_pending);
        let d = self.fetch_decode()?;
        // SAFETY: as above.
        let d = unsafe { &*d };
        self.exec_generic(&d.ins, tf, pending)?;
        Ok(false)
    }

    /// Execute `ins` with the generic `exec` (TF was `tf` when it started; `pending`: data
    /// breakpoints a MOV SS / POP SS left for it), commit RIP and take its debug traps.
    fn exec_generic(
        &mut self,
        ins: &iced_x86::Instruction,
        tf: bool,
        pending: u8,
    ) -> crate::cpu::R<()> {
        use iced_x86::Mnemonic as M;
        self.exec(ins)?;
        self.st.rip = self.next_rip;
        self.stats.instructions += 1;
        self.stats.generic += 1;
        self.shadow = self.set_shadow;
        let mut hits = self.bp_hits | pending;
        if self.set_shadow && matches!(ins.mnemonic(), M::Mov | M::Pop) {
            // MOV SS / POP SS: the debug traps wait for the end of the next instruction.
            self.bp_pending = hits;
            hits = 0;
        } else if ins.mnemonic() == M::Int1 && hits != 0 {
            // ICEBP's #DB (delivered already) reports them too.
            self.debug_status(hits, 0);
            hits = 0;
        }
        // SYSCALL and SYSRET single-step on TF as they leave it (SFMASK may clear it, R11 may
        // set it), every other instruction on TF as it found it.
        let single = (tf || self.st.rflags & flags::TF != 0) && self.step_trap(ins, tf);
        if single && self.halted {
            self.step_trap_pending = true;
        } else if single || hits != 0 {
            self.debug_status(hits, if single { DR6_BS } else { 0 });
            let rip = self.st.rip;
            self.deliver(1, None, EventKind::Exception, rip)?;
        }
        Ok(())
    }

    fn startup(&mut self, vector: u8) {
        self.st = CpuState::default();
        let cs = &mut self.st.seg[seg::CS];
        cs.selector = (vector as u16) << 8;
        cs.base = (vector as u64) << 12;
        self.st.rip = 0;
        self.st.gpr[2] = 0x600; // EDX: processor signature (family 6), as after INIT.
        self.flush_all();
        self.halted = false;
        self.step_trap_pending = false;
        self.bp_pending = 0;
        self.wait_sipi = false;
        self.nmi_blocked = false;
    }

    /// The run loop. `limit` bounds the instruction count (None: run until an exit).
    pub(crate) fn run_loop(
        &mut self,
        kick: &AtomicBool,
        limit: Option<u64>,
    ) -> Result<Option<VcpuExit>> {
        let mut budget = limit.unwrap_or(u64::MAX);
        loop {
            // Whatever raised it is looked at below.
            self.attention.flag.store(false, Ordering::Relaxed);
            if kick.swap(false, Ordering::SeqCst) {
                return Ok(Some(VcpuExit::Kicked));
            }
            self.sync_dirty_log();
            let irq = self.irq.clone();
            if self.wait_sipi {
                match irq.as_ref().and_then(|c| c.take_startup(self.id)) {
                    Some(StartupEvent::Sipi(v)) => self.startup(v),
                    Some(StartupEvent::Init) | None => {
                        match &irq {
                            Some(c) => c.wait(self.id, Duration::from_millis(10)),
                            None => std::thread::sleep(Duration::from_millis(10)),
                        }
                        if limit.is_some() {
                            return Ok(None);
                        }
                        continue;
                    }
                }
            }
            if let Some(c) = &irq {
                if let Some(StartupEvent::Init) = c.take_startup(self.id) {
                    self.st = CpuState::default();
                    self.flush_all();
                    self.wait_sipi = true;
                    self.nmi_blocked = false;
                    self.step_trap_pending = false;
                    self.bp_pending = 0;
                    continue;
                }
            }
            // A HLT's single-step trap, once something ends the halt (before an interrupt,
            // which waits for the #DB handler to allow it; an NMI comes right after it).
            if self.step_trap_pending {
                let woken = !self.halted
                    || irq.as_ref().is_some_and(|c| {
                        self.st.rflags & flags::IF != 0 && c.pending_vector(self.id).is_some()
                    });
                if woken {
                    if let Some(exit) = self.take_step_trap()? {
                        return Ok(Some(exit));
                    }
                    continue;
                }
            }
            // Interrupt window.
            if let Some(c) = &irq {
                if !self.nmi_blocked && c.take_nmi(self.id) {
                    if self.step_trap_pending {
                        if let Some(exit) = self.take_step_trap()? {
                            return Ok(Some(exit));
                        }
                    }
                    let rip = self.st.rip;
                    self.halted = false;
                    self.nmi_blocked = true;
                    *self.stats.interrupts.entry(2).or_insert(0) += 1;
                    if let Err(f) = self.deliver(2, None, EventKind::External, rip) {
                        if let Some(exit) = self.fault_exit(f)? {
                            return Ok(Some(exit));
                        }
                    }
                } else if self.st.rflags & flags::IF != 0 && !self.shadow {
                    if let Some(v) = c.pending_vector(self.id) {
                        c.ack(self.id, v);
                        *self.stats.interrupts.entry(v).or_insert(0) += 1;
                        let rip = self.st.rip;
                        self.halted = false;
                        if let Err(f) = self.deliver(v, None, EventKind::External, rip) {
                            if let Some(exit) = self.fault_exit(f)? {
                                return Ok(Some(exit));
                            }
                        }
                    }
                }
            }
            if self.halted {
                if self.st.rflags & flags::IF != 0 {
                    if let Some(c) = &irq {
                        c.wait(self.id, Duration::from_millis(1));
                        if limit.is_some() {
                            return Ok(None);
                        }
                        continue;
                    }
                }
                self.halted = false;
                return Ok(Some(VcpuExit::Halted));
            }
            let n = (BATCH as u64).min(budget);
            let mut executed = 0u64;
            // Set when IF rose behind an STI/MOV SS shadow: check right after the next
            // instruction, so a window of one instruction (`sti; nop; cli`) still takes
            // pending interrupts, as on hardware.
            let mut check_after_shadow = false;
            while executed < n {
                let if_before = self.st.rflags & flags::IF;
                let nmi_blocked_before = self.nmi_blocked;
                // A translated block where one starts (not in an interrupt window that must
                // close after one instruction), else one instruction.
                let block = if !check_after_shadow && self.quiet() {
                    self.run_block(n - executed)
                } else {
                    None
                };
                let r = match block {
                    Some((ran, r)) => {
                        executed += ran;
                        r.map(|()| true)
                    }
                    None => {
                        executed += 1;
                        self.step()
                    }
                };
                match r {
                    // A decode-time handler changed neither the shadow (beyond ending one),
                    // NMI blocking, HLT state nor I/O, and IF only from 1 to 0: only an
                    // interrupt window that just closed ends the batch.
                    Ok(true) => {
                        if check_after_shadow || self.attention.flag.load(Ordering::Relaxed) {
                            break;
                        }
                        continue;
                    }
                    Ok(_) => {}
                    // A time read waits for a pending interrupt: take it now.
                    Err(Fault::InterruptFirst) => break,
                    Err(Fault::Exc(v, e)) => {
                        if let Err(f) = self.raise(v, e) {
                            if let Some(exit) = self.fault_exit(f)? {
                                return Ok(Some(exit));
                            }
                        }
                    }
                    Err(f) => {
                        if let Some(exit) = self.fault_exit(f)? {
                            return Ok(Some(exit));
                        }
                    }
                }
                if self.halted {
                    break;
                }
                if self.io_break {
                    // A port write (which may have kicked this vCPU).
                    self.io_break = false;
                    break;
                }
                if irq.is_some() {
                    let if_now = self.st.rflags & flags::IF != 0;
                    if check_after_shadow && !self.shadow {
                        break;
                    }
                    // IRET ended NMI blocking: an NMI that arrived meanwhile goes next.
                    if nmi_blocked_before && !self.nmi_blocked {
                        break;
                    }
                    if if_before == 0 && if_now {
                        if self.shadow {
                            check_after_shadow = true;
                        } else {
                            break;
                        }
                    }
                }
            }
            let n = executed;
            budget -= n;
            if budget == 0 {
                return Ok(None);
            }
        }
    }

    /// Map a non-architectural fault to an exit or an error.
    fn fault_exit(&mut self, f: Fault) -> Result<Option<VcpuExit>> {
        match f {
            Fault::Shutdown => Ok(Some(VcpuExit::Shutdown)),
            // Delivering an event reads no time: not reached.
            Fault::InterruptFirst => Ok(None),
            Fault::Stop(msg) => Err(kvmbox_cpu::Error::Guest(format!(
                "vCPU {} stopped at {:04x}:{:#x}: {msg}",
                self.id,
                self.st.seg[seg::CS].selector,
                self.st.rip
            ))),
            Fault::Exc(v, e) => match self.raise(v, e) {
                Ok(()) => Ok(None),
                Err(Fault::Shutdown) => Ok(Some(VcpuExit::Shutdown)),
                Err(Fault::Stop(msg)) => Err(kvmbox_cpu::Error::Guest(msg)),
                Err(Fault::Exc(..)) => Ok(Some(VcpuExit::Shutdown)),
                Err(Fault::InterruptFirst) => Ok(None),
            },
        }
    }
}

impl Vcpu for EmuVcpu {
    fn configure(&mut self, cfg: &VcpuConfig) -> Result<()> {
        self.cpu.id = cfg.id;
        self.cpu.notify_attention();
        self.cpu.cpuid = crate::cpuid::build(
            cfg.id,
            cfg.count,
            self.cpu.irq.is_some(),
            self.cpu.kvm_clock.is_some(),
            &self.cpu.cpuid_overrides,
        );
        Ok(())
    }

    fn regs(&self) -> Result<Regs> {
        Ok(Regs::from_gprs(
            self.cpu.st.gpr,
            self.cpu.st.rip,
            self.cpu.st.rflags,
        ))
    }

    fn set_regs(&mut self, r: &Regs) -> Result<()> {
        self.cpu.st.gpr = r.gprs();
        self.cpu.st.rip = r.rip;
        self.cpu.st.rflags = (r.rflags & flags::WRITABLE) | flags::FIXED;
        Ok(())
    }

    fn sregs(&self) -> Result<SpecialRegs> {
        let s = &self.cpu.st;
        Ok(SpecialRegs {
            cs: s.seg[seg::CS],
            ds: s.seg[seg::DS],
            es: s.seg[seg::ES],
            fs: s.seg[seg::FS],
            gs: s.seg[seg::GS],
            ss: s.seg[seg::SS],
            tr: s.tr,
            ldt: s.ldtr,
            gdt: s.gdtr,
            idt: s.idtr,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            cr8: s.cr8,
            efer: s.efer,
            apic_base: s.apic_base,
        })
    }

    fn set_sregs(&mut self, r: &SpecialRegs) -> Result<()> {
        let s = &mut self.cpu.st;
        s.seg[seg::CS] = r.cs;
        s.seg[seg::DS] = r.ds;
        s.seg[seg::ES] = r.es;
        s.seg[seg::FS] = r.fs;
        s.seg[seg::GS] = r.gs;
        s.seg[seg::SS] = r.ss;
        s.tr = r.tr;
        s.ldtr = r.ldt;
        s.gdtr = r.gdt;
        s.idtr = r.idt;
        s.cr0 = r.cr0 | crate::state::cr0::ET;
        s.cr2 = r.cr2;
        s.cr3 = r.cr3;
        s.cr4 = r.cr4;
        s.cr8 = r.cr8;
        s.efer = r.efer;
        // Long mode is active exactly when LME and paging are both on.
        if s.efer & crate::state::efer::LME != 0 && s.cr0 & crate::state::cr0::PG != 0 {
            s.efer |= crate::state::efer::LMA;
        } else {
            s.efer &= !crate::state::efer::LMA;
        }
        s.apic_base = r.apic_base;
        // KVM-style segments: CPL is the RPL of CS; keep our dpl field as the CPL.
        if s.cr0 & crate::state::cr0::PE != 0 {
            s.seg[seg::CS].dpl = (r.cs.selector & 3) as u8;
        }
        self.cpu.flush_all();
        Ok(())
    }

    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<()> {
        for &(i, v) in msrs {
            if !self.cpu.write_msr(i, v) {
                return Err(kvmbox_cpu::Error::Unsupported(format!(
                    "the emu engine does not implement MSR {i:#x} (or rejects value {v:#x})"
                )));
            }
        }
        Ok(())
    }

    fn cpuid(&self) -> Result<Vec<CpuidEntry>> {
        Ok(self.cpu.cpuid.clone())
    }

    fn set_wait_for_sipi(&mut self) -> Result<()> {
        self.cpu.wait_sipi = true;
        Ok(())
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit> {
        let kick = self.kick.clone();
        if let Some((vector, err, kind)) = self.restored_event.take() {
            let rip = self.cpu.st.rip;
            let delivered =
                self.cpu
                    .with_io(io, |cpu| match cpu.deliver(vector, err, kind, rip) {
                        Ok(()) => Ok(None),
                        Err(f) => cpu.fault_exit(f),
                    })?;
            if let Some(exit) = delivered {
                return Ok(exit);
            }
        }
        loop {
            if let Some(exit) = self
                .cpu
                .with_io(io, |cpu| cpu.run_loop(&kick.kicked, None))?
            {
                return Ok(exit);
            }
        }
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kick.clone()
    }

    fn set_cpuid(&mut self, entries: &[CpuidEntry]) -> Result<()> {
        kvmbox_cpu::check_cpuid_compatible(entries, &self.cpu.cpuid).map_err(|e| {
            kvmbox_cpu::Error::Unsupported(format!("the emu engine cannot show this CPU: {e}"))
        })?;
        self.cpu.cpuid = entries.to_vec();
        Ok(())
    }

    fn save_state(&mut self) -> Result<VcpuState> {
        let mp_state = if self.cpu.wait_sipi {
            MpState::WaitForSipi
        } else if self.cpu.halted {
            MpState::Halted
        } else {
            MpState::Runnable
        };
        let mut s = VcpuState {
            regs: self.regs()?,
            sregs: self.sregs()?,
            debugregs: [0; 6],
            fxsave: Vec::new(),
            xsave: None,
            xcrs: Vec::new(),
            msrs: Vec::new(),
            events: VcpuEvents {
                interrupt_shadow: self.cpu.shadow,
                nmi_masked: self.cpu.nmi_blocked,
                ..VcpuEvents::default()
            },
            mp_state,
            lapic: LapicState {
                regs: vec![0; LAPIC_PAGE_SIZE],
            },
            cpuid: self.cpu.cpuid.clone(),
        };
        crate::persist::save_cpu_state(&self.cpu.st, &mut s);
        if let Some(irq) = &self.cpu.irq {
            irq.save_vcpu(self.cpu.id, &mut s);
        }
        Ok(s)
    }

    fn restore_state(&mut self, s: &VcpuState) -> Result<()> {
        let refuse = |why: String| kvmbox_cpu::Error::Unsupported(why);
        kvmbox_cpu::check_cpuid_compatible(&s.cpuid, &self.cpu.cpuid)
            .map_err(|e| refuse(format!("the emu engine cannot show the saved CPU: {e}")))?;
        let e = &s.events;
        let event = match (e.exception, e.interrupt, e.nmi_injected) {
            (Some(x), _, _) => Some((x.vector, x.error_code, EventKind::Exception)),
            (None, Some(i), _) if i.soft => {
                return Err(refuse(format!(
                    "the saved vCPU was injecting software interrupt {:#x}, which the emu engine cannot resume",
                    i.vector
                )))
            }
            (None, Some(i), _) => Some((i.vector, None, EventKind::External)),
            (None, None, true) => Some((2, None, EventKind::External)),
            _ => None,
        };
        let mut st = self.cpu.st.clone();
        let others = crate::persist::load_cpu_state(&mut st, s).map_err(refuse)?;
        self.cpu.cpuid = s.cpuid.clone();
        self.cpu.st = st;
        self.set_sregs(&s.sregs)?;
        self.set_regs(&s.regs)?;
        if let Some(irq) = &self.cpu.irq {
            irq.restore_vcpu(self.cpu.id, s).map_err(refuse)?;
        }
        for (index, v) in others {
            // MSRs that belong to the interrupt controller or another handler (the TSC
            // deadline went with the LAPIC above); one the engine has no handler for is
            // dropped, as the engine would have refused the guest's write of it.
            if index != kvmbox_cpu::state::MSR_IA32_TSC_DEADLINE {
                self.cpu.write_msr(index, v);
            }
        }
        self.cpu.shadow = e.interrupt_shadow;
        self.cpu.nmi_blocked = e.nmi_masked || e.nmi_injected;
        self.cpu.halted = s.mp_state == MpState::Halted && event.is_none();
        self.cpu.step_trap_pending = false;
        self.cpu.bp_pending = 0;
        self.cpu.wait_sipi = s.mp_state == MpState::WaitForSipi;
        self.restored_event = event;
        self.cpu.flush_all();
        Ok(())
    }
}
