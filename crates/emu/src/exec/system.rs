//! System instructions: segment and descriptor-table loads, control/debug registers, MSRs,
//! CPUID, TSC, port I/O.

use super::alu::mask;
use super::{reg_bits, Loc};
use crate::cpu::{gp, gp0, np, ss_fault, ud, Cpu, Fault, R};
use crate::pvclock::{self, SharedKvmClock};
use crate::state::dr::{DR6_B, DR6_BD, DR7_GD};
use crate::state::{cr0, cr4, efer, flags::*, gpr, seg};
use iced_x86::{Instruction, Mnemonic, OpKind, Register};
use kvmbox_cpu::Segment;

/// MSR numbers this engine implements.
pub mod msr {
    /// IA32_TIME_STAMP_COUNTER.
    pub const TSC: u32 = 0x10;
    /// IA32_APIC_BASE.
    pub const APIC_BASE: u32 = 0x1b;
    /// IA32_SYSENTER_CS.
    pub const SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// IA32_PAT.
    pub const PAT: u32 = 0x277;
    /// EFER.
    pub const EFER: u32 = 0xc000_0080;
    /// STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SFMASK.
    pub const SFMASK: u32 = 0xc000_0084;
    /// FS.base.
    pub const FS_BASE: u32 = 0xc000_0100;
    /// GS.base.
    pub const GS_BASE: u32 = 0xc000_0101;
    /// KERNEL_GS_BASE.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// TSC_AUX.
    pub const TSC_AUX: u32 = 0xc000_0103;
    /// AMD K8 interrupt-pending-message register (C1E control): reads 0 (no C1E), writes
    /// are ignored. Linux reads it on family 0xf.
    pub const K8_INT_PENDING_MSG: u32 = 0xc001_0055;
    /// AMD's legacy performance counters, architectural on every AMD64 CPU (no CPUID bit):
    /// PerfEvtSel0-3 at 0xc0010000..3, PerfCtr0-3 at 0xc0010004..7. Stored; they never count.
    pub const K7_PERF_FIRST: u32 = 0xc001_0000;
    /// Last of the legacy performance-counter MSRs.
    pub const K7_PERF_LAST: u32 = 0xc001_0007;
}

/// IA32_APIC_BASE.EXTD: x2APIC mode.
const APIC_BASE_EXTD: u64 = 1 << 10;
/// CPUID.1:ECX.x2APIC.
const CPUID_1_ECX_X2APIC: u32 = 1 << 21;
/// The legacy AMD counters are 48 bits wide.
const K7_PERFCTR_MASK: u64 = (1 << 48) - 1;

/// Decode an 8-byte descriptor into a segment cache (selector left 0).
pub fn parse_descriptor(raw: u64) -> Segment {
    let lo = raw as u32;
    let hi = (raw >> 32) as u32;
    let mut limit = (lo & 0xffff) | (hi & 0xf_0000);
    let g = hi & (1 << 23) != 0;
    if g {
        limit = (limit << 12) | 0xfff;
    }
    Segment {
        base: ((lo >> 16) | ((hi & 0xff) << 16) | (hi & 0xff00_0000)) as u64,
        limit,
        selector: 0,
        type_: ((hi >> 8) & 0xf) as u8,
        present: hi & (1 << 15) != 0,
        dpl: ((hi >> 13) & 3) as u8,
        db: hi & (1 << 22) != 0,
        s: hi & (1 << 12) != 0,
        l: hi & (1 << 21) != 0,
        g,
        avl: hi & (1 << 20) != 0,
        unusable: false,
    }
}

/// The latest host TSC any vCPU of this process was given (`host_tsc`).
static LATEST_TSC: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Host TSC, never behind a value any thread got from here before: read after every earlier
/// load of this thread (LFENCE, as Linux's `rdtsc_ordered`), and at least the latest value
/// handed out. So a guest's time reads stay ordered across its vCPUs even when their threads
/// run on host CPUs whose TSCs differ by a little, or when the host runs a read early: Linux
/// checks this at SMP bring-up (`check_tsc_sync_source`: a read after a spinlock taken from
/// another CPU must not be behind that CPU's read before it let go) and stops trusting its
/// TSC after a warp of a few hundred cycles.
pub fn host_tsc() -> u64 {
    use std::sync::atomic::Ordering;
    // SAFETY: LFENCE and RDTSC have no memory effects; every x86-64 host has both.
    let t = unsafe {
        core::arch::x86_64::_mm_lfence();
        core::arch::x86_64::_rdtsc()
    };
    t.max(LATEST_TSC.fetch_max(t, Ordering::AcqRel))
}

impl Cpu {
    /// Whether an interrupt the vCPU can take now is pending, so that a read of the TSC
    /// (which follows host time) must wait until it was taken. Interrupts are otherwise taken
    /// between batches; when the host descheduled this vCPU's thread for longer than the
    /// guest's timer period, the thread resumes mid-batch with timer interrupts due, and a
    /// TSC-timed loop (Linux's `timer_irq_works()`, `delay_tsc()`) would see the time pass
    /// without the interrupts that came due in it. On hardware an interrupt raised before an
    /// instruction is taken before it.
    fn interrupt_due_before_time_read(&self) -> bool {
        self.st.rflags & (IF | TF) == IF
            && !self.shadow
            && self
                .irq
                .as_ref()
                .is_some_and(|c| c.pending_vector(self.id).is_some())
    }

    /// Linear address of the descriptor `sel` selects (GDT or LDT), checked against the limit.
    pub(crate) fn descriptor_addr(&self, sel: u16, len: u64) -> R<u64> {
        let idx = (sel & !7) as u64;
        let (base, limit) = if sel & 4 != 0 {
            let l = &self.st.ldtr;
            if l.unusable || !l.present {
                return Err(gp(sel as u32 & 0xfffc));
            }
            (l.base, l.limit as u64)
        } else {
            (self.st.gdtr.base, self.st.gdtr.limit as u64)
        };
        if idx + len - 1 > limit {
            return Err(gp(sel as u32 & 0xfffc));
        }
        Ok(base.wrapping_add(idx))
    }

    /// Read and decode the (8-byte) descriptor `sel` selects; marks it accessed.
    pub(crate) fn descriptor(&mut self, sel: u16) -> R<Segment> {
        let a = self.descriptor_addr(sel, 8)?;
        let raw = self.read_lin_priv(a, 8, false)?;
        let mut d = parse_descriptor(raw);
        if d.s && d.type_ & 1 == 0 && d.present {
            d.type_ |= 1;
            self.write_lin_priv(a.wrapping_add(5), 1, (raw >> 40) | 1, false)?;
        }
        d.selector = sel;
        Ok(d)
    }

    /// Load a data or stack segment register (MOV/POP Sreg, LDS...) at the current CPL.
    pub(crate) fn load_seg(&mut self, s: usize, sel: u16) -> R<()> {
        let cpl = self.st.cpl();
        self.load_seg_for_cpl(s, sel, cpl)
    }

    /// Load a data or stack segment register as if at privilege `cpl`.
    pub(crate) fn load_seg_for_cpl(&mut self, s: usize, sel: u16, cpl: u8) -> R<()> {
        if self.st.cr0 & cr0::PE == 0 {
            let sg = &mut self.st.seg[s];
            sg.selector = sel;
            sg.base = (sel as u64) << 4;
            sg.present = true;
            sg.unusable = false;
            return Ok(());
        }
        let rpl = (sel & 3) as u8;
        if sel & !3 == 0 {
            if s == seg::SS {
                let cs64 = self.st.long_mode() && self.st.seg[seg::CS].l;
                if !(cs64 && cpl < 3 && rpl == cpl) {
                    return Err(gp0());
                }
            }
            let sg = &mut self.st.seg[s];
            *sg = Segment {
                selector: sel,
                unusable: true,
                dpl: if s == seg::SS { cpl } else { 0 },
                db: s == seg::SS,
                ..Segment::default()
            };
            return Ok(());
        }
        let err = sel as u32 & 0xfffc;
        // Check type and privilege before marking the descriptor accessed.
        let a = self.descriptor_addr(sel, 8)?;
        let raw = self.read_lin_priv(a, 8, false)?;
        let d = parse_descriptor(raw);
        let code = d.type_ & 8 != 0;
        if s == seg::SS {
            if rpl != cpl || !d.s || code || d.type_ & 2 == 0 || d.dpl != cpl {
                return Err(gp(err));
            }
            if !d.present {
                return Err(ss_fault(err));
            }
        } else {
            if !d.s || (code && d.type_ & 2 == 0) {
                return Err(gp(err));
            }
            let conforming = code && d.type_ & 4 != 0;
            if !conforming && (rpl > d.dpl || cpl > d.dpl) {
                return Err(gp(err));
            }
            if !d.present {
                return Err(np(err));
            }
        }
        let mut d = self.descriptor(sel)?;
        if s == seg::FS || s == seg::GS {
            d.base &= 0xffff_ffff;
        }
        self.st.seg[s] = d;
        Ok(())
    }

    pub(crate) fn mov_from_cr(&mut self, r: Register) -> R<u64> {
        if self.st.cpl() != 0 {
            return Err(gp0());
        }
        Ok(match r {
            Register::CR0 => self.st.cr0,
            Register::CR2 => self.st.cr2,
            Register::CR3 => self.st.cr3,
            Register::CR4 => self.st.cr4,
            Register::CR8 => self.st.cr8,
            _ => return Err(ud()),
        })
    }

    pub(crate) fn mov_to_cr(&mut self, r: Register, v: u64) -> R<()> {
        if self.st.cpl() != 0 {
            return Err(gp0());
        }
        match r {
            Register::CR0 => self.set_cr0(v)?,
            Register::CR2 => self.st.cr2 = v,
            Register::CR3 => {
                let v = if self.st.long_mode() {
                    v & ((1u64 << crate::mmu::MAXPHYADDR) - 1)
                } else {
                    v & 0xffff_ffff
                };
                self.st.cr3 = v;
                self.tlb.flush_nonglobal();
            }
            Register::CR4 => {
                if v & !cr4::VALID != 0 {
                    return Err(gp0());
                }
                if self.st.long_mode() && v & cr4::PAE == 0 {
                    return Err(gp0());
                }
                self.st.cr4 = v;
                self.flush_all();
            }
            Register::CR8 => {
                if v & !0xf != 0 {
                    return Err(gp0());
                }
                self.st.cr8 = v;
                if let Some(irq) = &self.irq {
                    irq.set_tpr(self.id, v as u8);
                }
            }
            _ => return Err(ud()),
        }
        Ok(())
    }

    /// CR0 write with the long-mode activation rules.
    pub(crate) fn set_cr0(&mut self, v: u64) -> R<()> {
        let v = if self.st.mode64() { v } else { v & 0xffff_ffff };
        if v & !cr0::VALID != 0 {
            return Err(gp0());
        }
        let v = v | cr0::ET;
        if v & cr0::PG != 0 && v & cr0::PE == 0 {
            return Err(gp0());
        }
        if v & cr0::NW != 0 && v & cr0::CD == 0 {
            return Err(gp0());
        }
        let old = self.st.cr0;
        if old & cr0::PG == 0 && v & cr0::PG != 0 && self.st.efer & efer::LME != 0 {
            if self.st.cr4 & cr4::PAE == 0 {
                return Err(gp0());
            }
            self.st.efer |= efer::LMA;
        }
        if old & cr0::PG != 0 && v & cr0::PG == 0 && self.st.long_mode() {
            if self.st.mode64() {
                return Err(gp0());
            }
            self.st.efer &= !efer::LMA;
        }
        self.st.cr0 = v;
        if (old ^ v) & (cr0::PG | cr0::WP | cr0::PE) != 0 {
            self.flush_all();
        }
        Ok(())
    }

    pub(crate) fn mov_dr(&mut self, r: Register, v: Option<u64>) -> R<u64> {
        if self.st.cpl() != 0 {
            return Err(gp0());
        }
        let n = (r as usize).wrapping_sub(Register::DR0 as usize);
        let idx = match n {
            0..=3 => n,
            4 | 6 => 6,
            5 | 7 => 7,
            _ => return Err(ud()),
        };
        if (n == 4 || n == 5) && self.st.cr4 & cr4::DE != 0 {
            return Err(ud());
        }
        // DR7.GD: any MOV DR is a fault-like #DB with DR6.BD (the delivery clears GD so the
        // handler can use the debug registers).
        if self.st.dr[7] & DR7_GD != 0 {
            self.st.dr[6] = (self.st.dr[6] & !DR6_B) | DR6_BD;
            return Err(Fault::Exc(1, None));
        }
        if let Some(v) = v {
            self.st.dr[idx] = match idx {
                6 => (v & 0xf00f) | 0xffff_0ff0,
                7 => (v & 0xffff_2bff) | 0x400,
                _ => v,
            };
            if idx == 7 {
                self.update_breakpoints();
            }
        }
        Ok(self.st.dr[idx])
    }

    /// Rewrite this vCPU's kvm-clock record (after the guest enabled it or moved the TSC).
    /// A record outside RAM is left unwritten, as KVM does.
    pub(crate) fn refresh_kvm_clock(&mut self) {
        if let Some(clock) = self.kvm_clock.as_ref().map(SharedKvmClock::get) {
            if self.st.kvm_system_time & 1 != 0 {
                clock.write_time_info(&self.phys, self.st.kvm_system_time & !1, self.st.tsc_offset);
            }
        }
    }

    /// RDMSR.
    pub fn read_msr(&mut self, index: u32) -> Option<u64> {
        Some(match index {
            msr::TSC => host_tsc().wrapping_add(self.st.tsc_offset),
            msr::APIC_BASE => self.st.apic_base,
            msr::SYSENTER_CS => self.st.sysenter[0],
            msr::SYSENTER_ESP => self.st.sysenter[1],
            msr::SYSENTER_EIP => self.st.sysenter[2],
            msr::PAT => self.st.pat,
            msr::EFER => self.st.efer,
            msr::STAR => self.st.star,
            msr::LSTAR => self.st.lstar,
            msr::CSTAR => self.st.cstar,
            msr::SFMASK => self.st.sfmask,
            msr::FS_BASE => self.st.seg[seg::FS].base,
            msr::GS_BASE => self.st.seg[seg::GS].base,
            msr::KERNEL_GS_BASE => self.st.kernel_gs_base,
            msr::TSC_AUX => self.st.tsc_aux,
            msr::K8_INT_PENDING_MSG => 0,
            msr::K7_PERF_FIRST..=msr::K7_PERF_LAST => {
                self.st.k7_perf[(index - msr::K7_PERF_FIRST) as usize]
            }
            pvclock::MSR_KVM_SYSTEM_TIME_NEW if self.kvm_clock.is_some() => self.st.kvm_system_time,
            pvclock::MSR_KVM_WALL_CLOCK_NEW if self.kvm_clock.is_some() => self.st.kvm_wall_clock,
            _ => return self.msr_hook.as_ref()?.read_msr(self.id, index),
        })
    }

    /// WRMSR; `false` when the MSR or value is not accepted (the guest gets #GP).
    pub fn write_msr(&mut self, index: u32, v: u64) -> bool {
        let canon = crate::cpu::canonical(v);
        match index {
            msr::TSC => {
                self.st.tsc_offset = v.wrapping_sub(host_tsc());
                self.refresh_kvm_clock();
            }
            msr::APIC_BASE => {
                if v & !0xf_ffff_fd00 != 0 {
                    return false;
                }
                // x2APIC mode (EXTD) only where CPUID offers x2APIC.
                if v & APIC_BASE_EXTD != 0 && self.cpuid_query(1, 0).2 & CPUID_1_ECX_X2APIC == 0 {
                    return false;
                }
                self.st.apic_base = v;
            }
            msr::SYSENTER_CS => self.st.sysenter[0] = v & 0xffff,
            msr::SYSENTER_ESP if canon => self.st.sysenter[1] = v,
            msr::SYSENTER_EIP if canon => self.st.sysenter[2] = v,
            msr::PAT => {
                for i in 0..8 {
                    let t = (v >> (i * 8)) & 0xff;
                    if !matches!(t, 0 | 1 | 4 | 5 | 6 | 7) {
                        return false;
                    }
                }
                self.st.pat = v;
            }
            msr::EFER => {
                if v & !efer::VALID != 0 {
                    return false;
                }
                let lma = self.st.efer & efer::LMA;
                if self.st.cr0 & cr0::PG != 0 && (v ^ self.st.efer) & efer::LME != 0 {
                    return false;
                }
                let old = self.st.efer;
                self.st.efer = (v & !efer::LMA) | lma;
                if (old ^ self.st.efer) & efer::NXE != 0 {
                    self.flush_all();
                }
            }
            msr::STAR => self.st.star = v,
            msr::LSTAR if canon => self.st.lstar = v,
            msr::CSTAR if canon => self.st.cstar = v,
            msr::SFMASK => self.st.sfmask = v & 0xffff_ffff,
            msr::FS_BASE if canon => self.st.seg[seg::FS].base = v,
            msr::GS_BASE if canon => self.st.seg[seg::GS].base = v,
            msr::KERNEL_GS_BASE if canon => self.st.kernel_gs_base = v,
            msr::TSC_AUX => self.st.tsc_aux = v & 0xffff_ffff,
            msr::K8_INT_PENDING_MSG => {}
            msr::K7_PERF_FIRST..=msr::K7_PERF_LAST => {
                let i = (index - msr::K7_PERF_FIRST) as usize;
                // Event selects keep the bits AMD defines (high bits 32-41 and 0-31); counters
                // are 48-bit.
                self.st.k7_perf[i] = if i < 4 {
                    v & 0x3ff_ffff_ffff
                } else {
                    v & K7_PERFCTR_MASK
                };
            }
            pvclock::MSR_KVM_SYSTEM_TIME_NEW if self.kvm_clock.is_some() => {
                self.st.kvm_system_time = v;
                self.refresh_kvm_clock();
            }
            pvclock::MSR_KVM_WALL_CLOCK_NEW => {
                let Some(clock) = self.kvm_clock.as_ref().map(SharedKvmClock::get) else {
                    return false;
                };
                self.st.kvm_wall_clock = v;
                clock.write_wall_clock(&self.phys, v);
            }
            _ => {
                return match &self.msr_hook {
                    Some(h) => h.write_msr(self.id, index, v),
                    None => false,
                }
            }
        }
        true
    }

    pub(crate) fn exec_system(&mut self, ins: &Instruction) -> R<()> {
        use Mnemonic as M;
        let cpl = self.st.cpl();
        let pm = self.st.cr0 & cr0::PE != 0;
        match ins.mnemonic() {
            M::Cpuid => {
                let (a, b, c, d) =
                    self.cpuid_query(self.st.gpr[gpr::RAX] as u32, self.st.gpr[gpr::RCX] as u32);
                self.st.gpr[gpr::RAX] = a as u64;
                self.st.gpr[gpr::RBX] = b as u64;
                self.st.gpr[gpr::RCX] = c as u64;
                self.st.gpr[gpr::RDX] = d as u64;
            }
            M::Rdtsc | M::Rdtscp => {
                if self.st.cr4 & cr4::TSD != 0 && cpl != 0 {
                    return Err(gp0());
                }
                if self.interrupt_due_before_time_read() {
                    return Err(Fault::InterruptFirst);
                }
                let t = host_tsc().wrapping_add(self.st.tsc_offset);
                self.st.gpr[gpr::RAX] = t & 0xffff_ffff;
                self.st.gpr[gpr::RDX] = t >> 32;
                if ins.mnemonic() == M::Rdtscp {
                    self.st.gpr[gpr::RCX] = self.st.tsc_aux & 0xffff_ffff;
                }
            }
            M::Rdpid => {
                let v = self.st.tsc_aux;
                self.set_reg(ins.op0_register(), v);
            }
            M::Rdpmc => return Err(gp0()),
            M::Rdmsr => {
                if cpl != 0 {
                    return Err(gp0());
                }
                let v = self
                    .read_msr(self.st.gpr[gpr::RCX] as u32)
                    .ok_or_else(gp0)?;
                self.st.gpr[gpr::RAX] = v & 0xffff_ffff;
                self.st.gpr[gpr::RDX] = v >> 32;
            }
            M::Wrmsr => {
                if cpl != 0 {
                    return Err(gp0());
                }
                let v = (self.st.gpr[gpr::RDX] << 32) | (self.st.gpr[gpr::RAX] & 0xffff_ffff);
                if !self.write_msr(self.st.gpr[gpr::RCX] as u32, v) {
                    return Err(gp0());
                }
            }
            M::Lgdt | M::Lidt => {
                if cpl != 0 {
                    return Err(gp0());
                }
                let Loc::Mem(s, off) = self.loc(ins, 0) else {
                    return Err(ud());
                };
                let limit = self.read_seg(s, off, 2)? as u16;
                let base = if self.st.mode64() {
                    self.read_seg(s, off.wrapping_add(2), 8)?
                } else {
                    let b = self.read_seg(s, off.wrapping_add(2), 4)?;
                    if self.op_bits(ins, 0) == 48 && ins.code().op_code().operand_size() == 16 {
                        b & 0xff_ffff
                    } else {
                        b
                    }
                };
                let t = kvmbox_cpu::DescriptorTable { base, limit };
                if ins.mnemonic() == M::Lgdt {
                    self.st.gdtr = t;
                } else {
                    self.st.idtr = t;
                }
            }
            M::Sgdt | M::Sidt => {
                let Loc::Mem(s, off) = self.loc(ins, 0) else {
                    return Err(ud());
                };
                let t = if ins.mnemonic() == M::Sgdt {
                    self.st.gdtr
                } else {
                    self.st.idtr
                };
                self.write_seg(s, off, 2, t.limit as u64)?;
                let n = if self.st.mode64() { 8 } else { 4 };
                self.write_seg(s, off.wrapping_add(2), n, t.base)?;
            }
            M::Sldt | M::Str => {
                if !pm {
                    return Err(ud());
                }
                let v = if ins.mnemonic() == M::Sldt {
                    self.st.ldtr.selector
                } else {
                    self.st.tr.selector
                } as u64;
                let l = self.loc(ins, 0);
                let bits = if matches!(l, Loc::Mem(..)) {
                    16
                } else {
                    self.op_bits(ins, 0)
                };
                self.wr(l, bits, v)?;
            }
            M::Lldt | M::Ltr => {
                if !pm {
                    return Err(ud());
                }
                if cpl != 0 {
                    return Err(gp0());
                }
                let sel = self.rd_op(ins, 0)? as u16;
                self.load_system_seg(ins.mnemonic() == M::Ltr, sel)?;
            }
            M::Clts => {
                if cpl != 0 {
                    return Err(gp0());
                }
                self.st.cr0 &= !cr0::TS;
            }
            M::Lmsw => {
                if cpl != 0 {
                    return Err(gp0());
                }
                let v = self.rd_op(ins, 0)? & 0xf;
                // LMSW can set PE but not clear it.
                let nv = (self.st.cr0 & !0xe) | v | (self.st.cr0 & cr0::PE);
                self.set_cr0(nv)?;
            }
            M::Smsw => {
                let l = self.loc(ins, 0);
                let bits = if matches!(l, Loc::Mem(..)) {
                    16
                } else {
                    self.op_bits(ins, 0)
                };
                let v = self.st.cr0 & mask(bits);
                self.wr(l, bits, v)?;
            }
            M::Invlpg => {
                if cpl != 0 {
                    return Err(gp0());
                }
                let Loc::Mem(s, off) = self.loc(ins, 0) else {
                    return Err(ud());
                };
                let lin = if self.st.mode64() {
                    if s >= seg::FS {
                        off.wrapping_add(self.st.seg[s].base)
                    } else {
                        off
                    }
                } else {
                    self.st.seg[s].base.wrapping_add(off) & 0xffff_ffff
                };
                self.tlb.flush_page(lin);
            }
            M::Invd | M::Wbinvd => {
                if cpl != 0 {
                    return Err(gp0());
                }
            }
            M::Swapgs => {
                if !self.st.mode64() {
                    return Err(ud());
                }
                if cpl != 0 {
                    return Err(gp0());
                }
                std::mem::swap(&mut self.st.seg[seg::GS].base, &mut self.st.kernel_gs_base);
            }
            M::Lsl | M::Lar | M::Verr | M::Verw => self.lsl_lar(ins)?,
            M::Lss | M::Lfs | M::Lgs | M::Lds | M::Les => {
                let s = match ins.mnemonic() {
                    M::Lss => seg::SS,
                    M::Lfs => seg::FS,
                    M::Lgs => seg::GS,
                    M::Lds => seg::DS,
                    _ => seg::ES,
                };
                let Loc::Mem(ms, off) = self.loc(ins, 1) else {
                    return Err(ud());
                };
                let osz = self.op_bits(ins, 0) / 8;
                let o = self.read_seg(ms, off, osz)?;
                let sel = self.read_seg(ms, off.wrapping_add(osz as u64), 2)? as u16;
                self.load_seg(s, sel)?;
                self.set_reg(ins.op0_register(), o);
            }
            _ => return Err(ud()),
        }
        Ok(())
    }

    /// LTR / LLDT.
    fn load_system_seg(&mut self, tr: bool, sel: u16) -> R<()> {
        let err = sel as u32 & 0xfffc;
        if sel & !3 == 0 {
            if tr {
                return Err(gp0());
            }
            self.st.ldtr = Segment {
                selector: sel,
                unusable: true,
                ..Segment::default()
            };
            return Ok(());
        }
        if sel & 4 != 0 {
            return Err(gp(err));
        }
        let len = if self.st.long_mode() { 16 } else { 8 };
        let a = self.descriptor_addr(sel, len)?;
        let raw = self.read_lin_priv(a, 8, false)?;
        let mut d = parse_descriptor(raw);
        if len == 16 {
            let hi = self.read_lin_priv(a.wrapping_add(8), 8, false)?;
            d.base |= (hi & 0xffff_ffff) << 32;
        }
        let ok_type = if tr {
            d.type_ == 9 || (!self.st.long_mode() && d.type_ == 1)
        } else {
            d.type_ == 2
        };
        if d.s || !ok_type {
            return Err(gp(err));
        }
        if !d.present {
            return Err(np(err));
        }
        d.selector = sel;
        if tr {
            // Mark busy.
            self.write_lin_priv(a.wrapping_add(5), 1, (raw >> 40) | 2, false)?;
            d.type_ |= 2;
            self.st.tr = d;
        } else {
            self.st.ldtr = d;
        }
        Ok(())
    }

    fn lsl_lar(&mut self, ins: &Instruction) -> R<()> {
        if self.st.cr0 & cr0::PE == 0 {
            return Err(ud());
        }
        let sel = (self.rd_op(ins, if ins.op_count() > 1 { 1 } else { 0 })? & 0xffff) as u16;
        let cpl = self.st.cpl();
        let valid = (|| -> R<Option<(u64, Segment)>> {
            if sel & !3 == 0 {
                return Ok(None);
            }
            let Ok(a) = self.descriptor_addr(sel, 8) else {
                return Ok(None);
            };
            let raw = self.read_lin_priv(a, 8, false)?;
            let d = parse_descriptor(raw);
            let rpl = (sel & 3) as u8;
            let conforming = d.s && d.type_ & 0xc == 0xc;
            if !conforming && (d.dpl < cpl || d.dpl < rpl) {
                return Ok(None);
            }
            Ok(Some((raw, d)))
        })()?;
        let m = ins.mnemonic();
        let ok = match (&valid, m) {
            (None, _) => false,
            (Some((_, d)), Mnemonic::Verr) => d.s && (d.type_ & 8 == 0 || d.type_ & 2 != 0),
            (Some((_, d)), Mnemonic::Verw) => d.s && d.type_ & 8 == 0 && d.type_ & 2 != 0,
            (Some((_, d)), Mnemonic::Lsl) => d.s || matches!(d.type_, 1 | 2 | 3 | 9 | 11),
            (Some((_, d)), _) => d.s || matches!(d.type_, 1 | 2 | 3 | 4 | 5 | 9 | 11 | 12),
        };
        if !ok {
            self.st.rflags &= !ZF;
            return Ok(());
        }
        self.st.rflags |= ZF;
        if let Some((raw, d)) = valid {
            let v = match m {
                Mnemonic::Lsl => d.limit as u64,
                Mnemonic::Lar => (raw >> 32) & 0x00f0_ff00,
                _ => return Ok(()),
            };
            let r = ins.op0_register();
            let v = if reg_bits(r) == 16 { v & 0xffff } else { v };
            self.set_reg(r, v);
        }
        Ok(())
    }

    /// I/O permission: CPL <= IOPL in protected mode (no TSS I/O bitmap).
    pub(crate) fn check_io(&self) -> R<()> {
        if self.st.cr0 & cr0::PE != 0 && self.st.cpl() > self.st.iopl() {
            return Err(gp0());
        }
        Ok(())
    }

    pub(crate) fn port_in(&mut self, port: u16, size: u32) -> R<u64> {
        let mut b = [0u8; 4];
        let io = self.io_handler()?;
        io.pio_read(port, &mut b[..size as usize]);
        Ok(u32::from_le_bytes(b) as u64)
    }

    pub(crate) fn port_out(&mut self, port: u16, size: u32, v: u64) -> R<()> {
        let b = (v as u32).to_le_bytes();
        let io = self.io_handler()?;
        io.pio_write(port, &b[..size as usize]);
        // The write may have stopped the vCPU (a kick, as when the guest enters ACPI S3):
        // end the batch so the run loop sees it before the next instruction.
        self.io_break = true;
        Ok(())
    }

    pub(crate) fn exec_io(&mut self, ins: &Instruction) -> R<()> {
        self.check_io()?;
        if ins.mnemonic() == Mnemonic::In {
            let r = ins.op0_register();
            let size = reg_bits(r) / 8;
            let port = if ins.op_kind(1) == OpKind::Register {
                self.st.gpr[gpr::RDX] as u16
            } else {
                ins.immediate8() as u16
            };
            let v = self.port_in(port, size)?;
            self.set_reg(r, v);
        } else {
            let r = ins.op1_register();
            let size = reg_bits(r) / 8;
            let port = if ins.op0_kind() == OpKind::Register {
                self.st.gpr[gpr::RDX] as u16
            } else {
                ins.immediate8() as u16
            };
            let v = self.reg(r);
            self.port_out(port, size, v)?;
        }
        Ok(())
    }
}
