//! Control transfers: near and far jumps/calls/returns, loops, INT/IRET, SYSCALL/SYSRET, HLT.

use super::alu::mask;
use super::Loc;
use crate::cpu::{canonical, gp, gp0, ud, Cpu, Fault, R};
use crate::interrupt::EventKind;
use crate::state::{cr0, efer, flags::*, gpr, seg};
use iced_x86::{Code, Instruction, Mnemonic, OpKind};
use kvmbox_cpu::Segment;

impl Cpu {
    /// Near jump to `target` (already masked to the operand size by the decoder).
    pub(crate) fn jump_near(&mut self, target: u64) -> R<()> {
        if self.st.mode64() {
            if !canonical(target) {
                return Err(gp0());
            }
        } else if target > self.st.seg[seg::CS].limit as u64 {
            return Err(gp0());
        }
        self.next_rip = target;
        Ok(())
    }

    /// Operand size in bytes of a near branch (2, 4 or 8).
    fn branch_size(&self, ins: &Instruction) -> u32 {
        match ins.op0_kind() {
            OpKind::NearBranch16 => 2,
            OpKind::NearBranch32 => 4,
            OpKind::NearBranch64 => 8,
            _ => self.op_bits(ins, 0) / 8,
        }
    }

    pub(crate) fn exec_control(&mut self, ins: &Instruction) -> R<()> {
        use Mnemonic as M;
        match ins.mnemonic() {
            M::Jmp => match ins.op0_kind() {
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    self.jump_near(ins.near_branch_target())?
                }
                OpKind::FarBranch16 | OpKind::FarBranch32 => {
                    let off = if ins.op0_kind() == OpKind::FarBranch16 {
                        ins.far_branch16() as u64
                    } else {
                        ins.far_branch32() as u64
                    };
                    self.far_jump(ins.far_branch_selector(), off, None)?
                }
                OpKind::Memory if is_far(ins) => {
                    let (sel, off) = self.read_far_ptr(ins)?;
                    self.far_jump(sel, off, None)?
                }
                _ => {
                    let bits = self.op_bits(ins, 0);
                    let t = self.rd_op(ins, 0)? & mask(bits);
                    self.jump_near(t)?
                }
            },
            M::Call => match ins.op0_kind() {
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    let size = self.branch_size(ins);
                    let t = ins.near_branch_target();
                    self.call_near(t, size)?
                }
                OpKind::FarBranch16 | OpKind::FarBranch32 => {
                    let (off, size) = if ins.op0_kind() == OpKind::FarBranch16 {
                        (ins.far_branch16() as u64, 2)
                    } else {
                        (ins.far_branch32() as u64, 4)
                    };
                    self.far_jump(ins.far_branch_selector(), off, Some(size))?
                }
                OpKind::Memory if is_far(ins) => {
                    let size = (ins.memory_size().size() as u32).saturating_sub(2).max(2);
                    let (sel, off) = self.read_far_ptr(ins)?;
                    self.far_jump(sel, off, Some(size))?
                }
                _ => {
                    let bits = self.op_bits(ins, 0);
                    let t = self.rd_op(ins, 0)? & mask(bits);
                    self.call_near(t, bits / 8)?
                }
            },
            M::Ret => {
                let size = match ins.code() {
                    Code::Retnw | Code::Retnw_imm16 => 2,
                    Code::Retnd | Code::Retnd_imm16 => 4,
                    _ => 8,
                };
                let sb = self.st.stack_bits();
                let sp = self.st.gpr[gpr::RSP];
                let t = self.pop(size)? & mask(size * 8);
                if let Err(e) = self.jump_near(t) {
                    self.set_sp(sp, sb);
                    return Err(e);
                }
                if ins.op_count() > 0 {
                    let n = ins.immediate16() as u64;
                    let nsp = self.st.gpr[gpr::RSP].wrapping_add(n);
                    self.set_sp(nsp, sb);
                }
            }
            M::Retf => {
                let size = match ins.code() {
                    Code::Retfw | Code::Retfw_imm16 => 2,
                    Code::Retfd | Code::Retfd_imm16 => 4,
                    _ => 8,
                };
                let imm = if ins.op_count() > 0 {
                    ins.immediate16() as u64
                } else {
                    0
                };
                self.far_return(size, imm)?
            }
            M::Iret | M::Iretd | M::Iretq => {
                let size = match ins.mnemonic() {
                    M::Iret => 2,
                    M::Iretd => 4,
                    _ => 8,
                };
                self.iret(size)?;
                self.nmi_blocked = false;
            }
            M::Int => {
                let v = ins.immediate8();
                let next = self.next_rip;
                self.deliver(v, None, EventKind::Software, next)?;
            }
            M::Int3 => {
                let next = self.next_rip;
                self.deliver(3, None, EventKind::SoftwareException, next)?;
            }
            M::Int1 => {
                let next = self.next_rip;
                self.deliver(1, None, EventKind::Exception, next)?;
            }
            M::Into => {
                if self.st.mode64() {
                    return Err(ud());
                }
                if self.st.rflags & OF != 0 {
                    let next = self.next_rip;
                    self.deliver(4, None, EventKind::SoftwareException, next)?;
                }
            }
            M::Loop | M::Loope | M::Loopne | M::Jcxz | M::Jecxz | M::Jrcxz => {
                let cbits = counter_bits(ins.code());
                let c = self.st.gpr[gpr::RCX] & mask(cbits);
                let take = match ins.mnemonic() {
                    M::Jcxz | M::Jecxz | M::Jrcxz => c == 0,
                    m => {
                        let c = c.wrapping_sub(1) & mask(cbits);
                        let r = &mut self.st.gpr[gpr::RCX];
                        *r = match cbits {
                            64 => c,
                            32 => c,
                            _ => (*r & !0xffff) | c,
                        };
                        let zf = self.st.rflags & ZF != 0;
                        c != 0
                            && match m {
                                M::Loope => zf,
                                M::Loopne => !zf,
                                _ => true,
                            }
                    }
                };
                if take {
                    self.jump_near(ins.near_branch_target())?;
                }
            }
            M::Syscall => self.syscall()?,
            M::Sysret | M::Sysretq => self.sysret(ins.mnemonic() == M::Sysretq)?,
            M::Hlt => {
                if self.st.cpl() != 0 {
                    return Err(gp0());
                }
                self.halted = true;
            }
            _ => return Err(ud()),
        }
        Ok(())
    }

    pub(crate) fn call_near(&mut self, target: u64, size: u32) -> R<()> {
        let ret = self.next_rip;
        // Check the target before pushing (the fault leaves RSP unchanged).
        self.jump_near(target)?;
        self.push(ret, size)
    }

    /// Read an m16:16/32/64 far pointer operand: (selector, offset).
    fn read_far_ptr(&mut self, ins: &Instruction) -> R<(u16, u64)> {
        let Loc::Mem(s, off) = self.loc(ins, 0) else {
            return Err(ud());
        };
        let total = ins.memory_size().size() as u32;
        let osz = total.saturating_sub(2).clamp(2, 8);
        let o = self.read_seg(s, off, osz)?;
        let sel = self.read_seg(s, off.wrapping_add(osz as u64), 2)? as u16;
        Ok((sel, o))
    }

    /// Far JMP (call_size None) or far CALL (push CS:IP of `call_size` bytes each).
    pub(crate) fn far_jump(&mut self, sel: u16, off: u64, call_size: Option<u32>) -> R<()> {
        if self.st.cr0 & cr0::PE == 0 {
            let off = off & 0xffff_ffff;
            if let Some(size) = call_size {
                let cs = self.st.seg[seg::CS].selector as u64;
                let ret = self.next_rip;
                let sp = self.st.gpr[gpr::RSP];
                self.push(cs, size)?;
                if let Err(e) = self.push(ret, size) {
                    self.st.gpr[gpr::RSP] = sp;
                    return Err(e);
                }
            }
            let cs = &mut self.st.seg[seg::CS];
            cs.selector = sel;
            cs.base = (sel as u64) << 4;
            self.next_rip = off;
            return Ok(());
        }
        let desc = self.code_descriptor(sel, false)?;
        let cpl = self.st.cpl();
        let mut new_cs = desc;
        new_cs.selector = (sel & !3) | cpl as u16;
        new_cs.dpl = cpl;
        let off = if new_cs.l && self.st.long_mode() {
            off
        } else {
            off & 0xffff_ffff
        };
        if !(self.st.long_mode() && new_cs.l) && off > new_cs.limit as u64 {
            return Err(gp0());
        }
        if let Some(size) = call_size {
            let cs = self.st.seg[seg::CS].selector as u64;
            let ret = self.next_rip;
            let sp = self.st.gpr[gpr::RSP];
            self.push(cs, size)?;
            if let Err(e) = self.push(ret, size) {
                self.st.gpr[gpr::RSP] = sp;
                return Err(e);
            }
        }
        self.st.seg[seg::CS] = new_cs;
        self.next_rip = off;
        Ok(())
    }

    /// Load and check a code-segment descriptor for a far transfer. `ret` selects the
    /// RET/IRET rules (RPL >= CPL) instead of the JMP/CALL rules.
    pub(crate) fn code_descriptor(&mut self, sel: u16, ret: bool) -> R<Segment> {
        if sel & !3 == 0 {
            return Err(gp0());
        }
        let d = self.descriptor(sel)?;
        let cpl = self.st.cpl();
        let rpl = (sel & 3) as u8;
        if !d.s {
            return Err(Fault::Stop(format!(
                "far transfer through system descriptor {sel:#x} (call gates and task switches are not supported)"
            )));
        }
        if d.type_ & 8 == 0 {
            return Err(gp(sel as u32 & 0xfffc));
        }
        let conforming = d.type_ & 4 != 0;
        let ok = if ret {
            rpl >= cpl
                && if conforming {
                    d.dpl <= rpl
                } else {
                    d.dpl == rpl
                }
        } else if conforming {
            d.dpl <= cpl
        } else {
            rpl <= cpl && d.dpl == cpl
        };
        if !ok {
            return Err(gp(sel as u32 & 0xfffc));
        }
        if self.st.long_mode() && d.l && d.db {
            return Err(gp(sel as u32 & 0xfffc));
        }
        if !d.present {
            return Err(crate::cpu::np(sel as u32 & 0xfffc));
        }
        Ok(d)
    }

    fn far_return(&mut self, size: u32, imm: u64) -> R<()> {
        let sb = self.st.stack_bits();
        let sp0 = self.st.gpr[gpr::RSP];
        let r = (|| -> R<()> {
            let off = self.pop(size)?;
            let sel = self.pop(size)? as u16;
            if self.st.cr0 & cr0::PE == 0 {
                let cs = &mut self.st.seg[seg::CS];
                cs.selector = sel;
                cs.base = (sel as u64) << 4;
                self.next_rip = off & mask(size * 8);
                let nsp = self.st.gpr[gpr::RSP].wrapping_add(imm);
                self.set_sp(nsp, sb);
                return Ok(());
            }
            let cpl = self.st.cpl();
            let rpl = (sel & 3) as u8;
            let mut new_cs = self.code_descriptor(sel, true)?;
            new_cs.selector = sel;
            new_cs.dpl = rpl;
            let off = off & mask(size * 8);
            if rpl > cpl {
                let nsp = self.st.gpr[gpr::RSP].wrapping_add(imm);
                self.set_sp(nsp, sb);
                let new_sp = self.pop(size)?;
                let new_ss = self.pop(size)? as u16;
                self.st.seg[seg::CS] = new_cs;
                self.load_seg_for_cpl(seg::SS, new_ss, rpl)?;
                let nsb = self.st.stack_bits();
                self.set_sp(new_sp.wrapping_add(imm), nsb);
                self.null_outer_segments(rpl);
            } else {
                self.st.seg[seg::CS] = new_cs;
                let nsp = self.st.gpr[gpr::RSP].wrapping_add(imm);
                self.set_sp(nsp, sb);
            }
            self.next_rip = off;
            Ok(())
        })();
        if r.is_err() {
            self.st.gpr[gpr::RSP] = sp0;
        }
        r
    }

    /// After a return to an outer ring, data segments the new CPL may not use become null.
    pub(crate) fn null_outer_segments(&mut self, cpl: u8) {
        for s in [seg::ES, seg::DS, seg::FS, seg::GS] {
            let sg = &mut self.st.seg[s];
            let conforming_code = sg.type_ & 0xc == 0xc;
            if !sg.unusable && sg.dpl < cpl && !conforming_code {
                sg.selector = 0;
                sg.unusable = true;
                sg.present = false;
            }
        }
    }

    fn iret(&mut self, size: u32) -> R<()> {
        let sp0 = self.st.gpr[gpr::RSP];
        let saved_cs = self.st.seg[seg::CS];
        let saved_ss = self.st.seg[seg::SS];
        let r = (|| -> R<()> {
            let ip = self.pop(size)?;
            let sel = self.pop(size)? as u16;
            let fl = self.pop(size)?;
            if self.st.cr0 & cr0::PE == 0 {
                let cs = &mut self.st.seg[seg::CS];
                cs.selector = sel;
                cs.base = (sel as u64) << 4;
                self.next_rip = ip & mask(size * 8);
                let m = if size == 2 {
                    WRITABLE & 0xffff
                } else {
                    WRITABLE
                };
                self.st.rflags = (self.st.rflags & !m) | (fl & m) | FIXED;
                return Ok(());
            }
            if self.st.rflags & NT != 0 && !self.st.long_mode() {
                return Err(Fault::Stop(
                    "IRET with NT set (task return) is not supported".into(),
                ));
            }
            let cpl = self.st.cpl();
            if fl & VM != 0 && cpl == 0 && size == 4 && !self.st.long_mode() {
                return Err(Fault::Stop(
                    "IRET to virtual-8086 mode is not supported".into(),
                ));
            }
            let rpl = (sel & 3) as u8;
            let mut new_cs = self.code_descriptor(sel, true)?;
            new_cs.selector = sel;
            new_cs.dpl = rpl;
            let to64 = self.st.long_mode() && new_cs.l;
            let ip = ip & mask(size * 8);
            if to64 {
                if !canonical(ip) {
                    return Err(gp0());
                }
            } else if ip > new_cs.limit as u64 {
                return Err(gp0());
            }
            // Flags: IOPL only at CPL 0, IF only when CPL <= IOPL.
            let mut m = WRITABLE;
            if cpl > 0 {
                m &= !IOPL;
            }
            if cpl > self.st.iopl() {
                m &= !IF;
            }
            if size == 2 {
                m &= 0xffff;
            }
            let new_flags = (self.st.rflags & !m) | (fl & m) | FIXED;
            if rpl > cpl || self.st.mode64() {
                let new_sp = self.pop(size)?;
                let new_ss = self.pop(size)? as u16;
                self.st.seg[seg::CS] = new_cs;
                self.load_seg_for_cpl(seg::SS, new_ss, rpl)?;
                let nsb = self.st.stack_bits();
                self.set_sp(new_sp, if self.st.mode64() { 64 } else { nsb });
                if rpl > cpl {
                    self.null_outer_segments(rpl);
                }
            } else {
                self.st.seg[seg::CS] = new_cs;
            }
            self.st.rflags = new_flags;
            self.next_rip = ip;
            Ok(())
        })();
        if r.is_err() {
            self.st.gpr[gpr::RSP] = sp0;
            self.st.seg[seg::CS] = saved_cs;
            self.st.seg[seg::SS] = saved_ss;
        }
        r
    }

    fn syscall(&mut self) -> R<()> {
        if !self.st.long_mode() || self.st.efer & efer::SCE == 0 {
            return Err(ud());
        }
        let star_cs = ((self.st.star >> 32) & 0xffff) as u16;
        self.st.gpr[gpr::RCX] = self.next_rip;
        self.st.gpr[gpr::R11] = self.st.rflags & !RF;
        let target = if self.st.mode64() {
            self.st.lstar
        } else {
            self.st.cstar
        };
        self.st.seg[seg::CS] = flat_code(star_cs & 0xfffc, 0, true);
        self.st.seg[seg::SS] = flat_data(star_cs.wrapping_add(8) & 0xfffc, 0);
        self.st.rflags = (self.st.rflags & !(self.st.sfmask | RF | VM)) | FIXED;
        self.next_rip = target;
        Ok(())
    }

    fn sysret(&mut self, rex_w: bool) -> R<()> {
        if !self.st.long_mode() || self.st.efer & efer::SCE == 0 {
            return Err(ud());
        }
        if self.st.cpl() != 0 || !self.st.mode64() {
            return Err(gp0());
        }
        let base = ((self.st.star >> 48) & 0xffff) as u16;
        let rcx = self.st.gpr[gpr::RCX];
        if rex_w {
            if !canonical(rcx) {
                return Err(gp0());
            }
            self.st.seg[seg::CS] = flat_code(base.wrapping_add(16) | 3, 3, true);
            self.next_rip = rcx;
        } else {
            self.st.seg[seg::CS] = flat_code(base | 3, 3, false);
            self.next_rip = rcx & 0xffff_ffff;
        }
        let mut ss = flat_data(base.wrapping_add(8) | 3, 3);
        ss.selector = base.wrapping_add(8) | 3;
        self.st.seg[seg::SS] = ss;
        self.st.rflags = (self.st.gpr[gpr::R11] & WRITABLE & !RF) | FIXED;
        Ok(())
    }
}

/// JMP/CALL through a memory far pointer (m16:16, m16:32, m16:64).
pub(crate) fn is_far(ins: &Instruction) -> bool {
    matches!(
        ins.code(),
        Code::Jmp_m1616
            | Code::Jmp_m1632
            | Code::Jmp_m1664
            | Code::Call_m1616
            | Code::Call_m1632
            | Code::Call_m1664
    )
}

fn counter_bits(code: Code) -> u32 {
    use Code as C;
    match code {
        C::Loop_rel8_16_CX
        | C::Loop_rel8_32_CX
        | C::Loope_rel8_16_CX
        | C::Loope_rel8_32_CX
        | C::Loopne_rel8_16_CX
        | C::Loopne_rel8_32_CX
        | C::Jcxz_rel8_16
        | C::Jcxz_rel8_32 => 16,
        C::Loop_rel8_16_RCX
        | C::Loop_rel8_64_RCX
        | C::Loope_rel8_16_RCX
        | C::Loope_rel8_64_RCX
        | C::Loopne_rel8_16_RCX
        | C::Loopne_rel8_64_RCX
        | C::Jrcxz_rel8_16
        | C::Jrcxz_rel8_64 => 64,
        _ => 32,
    }
}

/// A flat 4 GiB code segment (64-bit when `long`).
pub(crate) fn flat_code(sel: u16, dpl: u8, long: bool) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: 0xb,
        present: true,
        dpl,
        db: !long,
        s: true,
        l: long,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// A flat 4 GiB writable data segment.
pub(crate) fn flat_data(sel: u16, dpl: u8) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: 0x3,
        present: true,
        dpl,
        db: true,
        s: true,
        l: false,
        g: true,
        avl: false,
        unusable: false,
    }
}
