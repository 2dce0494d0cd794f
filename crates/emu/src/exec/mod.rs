//! Instruction semantics. `Cpu::exec` dispatches one decoded instruction; the submodules group
//! instructions by concern.

/// The 16 conditional jumps (Jcc, short and near), as a pattern: the generic executor and the
/// decode-time handlers (`fast`) match the same sets of mnemonics.
macro_rules! jcc_mnemonics {
    () => {
        iced_x86::Mnemonic::Jo
            | iced_x86::Mnemonic::Jno
            | iced_x86::Mnemonic::Jb
            | iced_x86::Mnemonic::Jae
            | iced_x86::Mnemonic::Je
            | iced_x86::Mnemonic::Jne
            | iced_x86::Mnemonic::Jbe
            | iced_x86::Mnemonic::Ja
            | iced_x86::Mnemonic::Js
            | iced_x86::Mnemonic::Jns
            | iced_x86::Mnemonic::Jp
            | iced_x86::Mnemonic::Jnp
            | iced_x86::Mnemonic::Jl
            | iced_x86::Mnemonic::Jge
            | iced_x86::Mnemonic::Jle
            | iced_x86::Mnemonic::Jg
    };
}

/// The 16 SETcc, as a pattern.
macro_rules! setcc_mnemonics {
    () => {
        iced_x86::Mnemonic::Sete
            | iced_x86::Mnemonic::Setne
            | iced_x86::Mnemonic::Seta
            | iced_x86::Mnemonic::Setae
            | iced_x86::Mnemonic::Setb
            | iced_x86::Mnemonic::Setbe
            | iced_x86::Mnemonic::Setg
            | iced_x86::Mnemonic::Setge
            | iced_x86::Mnemonic::Setl
            | iced_x86::Mnemonic::Setle
            | iced_x86::Mnemonic::Seto
            | iced_x86::Mnemonic::Setno
            | iced_x86::Mnemonic::Setp
            | iced_x86::Mnemonic::Setnp
            | iced_x86::Mnemonic::Sets
            | iced_x86::Mnemonic::Setns
    };
}

/// The 16 CMOVcc, as a pattern.
macro_rules! cmovcc_mnemonics {
    () => {
        iced_x86::Mnemonic::Cmove
            | iced_x86::Mnemonic::Cmovne
            | iced_x86::Mnemonic::Cmova
            | iced_x86::Mnemonic::Cmovae
            | iced_x86::Mnemonic::Cmovb
            | iced_x86::Mnemonic::Cmovbe
            | iced_x86::Mnemonic::Cmovg
            | iced_x86::Mnemonic::Cmovge
            | iced_x86::Mnemonic::Cmovl
            | iced_x86::Mnemonic::Cmovle
            | iced_x86::Mnemonic::Cmovo
            | iced_x86::Mnemonic::Cmovno
            | iced_x86::Mnemonic::Cmovp
            | iced_x86::Mnemonic::Cmovnp
            | iced_x86::Mnemonic::Cmovs
            | iced_x86::Mnemonic::Cmovns
    };
}

/// The string instructions that stay in memory (MOVS STOS LODS CMPS SCAS; not INS/OUTS), all
/// sizes. MOVSD and CMPSD are also SSE2 instructions: callers tell them apart by operand.
macro_rules! memory_string_mnemonics {
    () => {
        iced_x86::Mnemonic::Movsb
            | iced_x86::Mnemonic::Movsw
            | iced_x86::Mnemonic::Movsd
            | iced_x86::Mnemonic::Movsq
            | iced_x86::Mnemonic::Stosb
            | iced_x86::Mnemonic::Stosw
            | iced_x86::Mnemonic::Stosd
            | iced_x86::Mnemonic::Stosq
            | iced_x86::Mnemonic::Lodsb
            | iced_x86::Mnemonic::Lodsw
            | iced_x86::Mnemonic::Lodsd
            | iced_x86::Mnemonic::Lodsq
            | iced_x86::Mnemonic::Cmpsb
            | iced_x86::Mnemonic::Cmpsw
            | iced_x86::Mnemonic::Cmpsd
            | iced_x86::Mnemonic::Cmpsq
            | iced_x86::Mnemonic::Scasb
            | iced_x86::Mnemonic::Scasw
            | iced_x86::Mnemonic::Scasd
            | iced_x86::Mnemonic::Scasq
    };
}

pub mod alu;
mod control;
pub(crate) mod fast;
mod sse;
mod string;
mod system;
mod x87;

pub use system::msr;
pub(crate) use system::{host_tsc, parse_descriptor};

use crate::cpu::{gp0, ud, Cpu, Fault, R};
use crate::mem;
use crate::state::{flags::*, gpr, seg};
use alu::{cond, mask, sext, AluOp, ShiftOp};
use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

/// Where an operand lives.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Loc {
    /// A register.
    Reg(Register),
    /// Memory: segment index and offset (already masked to the address size).
    Mem(usize, u64),
    /// An immediate value.
    Imm(u64),
}

/// Width in bits of a general-purpose or segment register.
#[inline(always)]
pub(crate) fn reg_bits(r: Register) -> u32 {
    match r as u32 {
        1..=20 => 8,
        21..=36 => 16,
        37..=52 => 32,
        53..=70 => 64,
        71..=76 => 16,
        77..=92 => 128,
        _ => 64,
    }
}

/// Segment register enum to index (ES=0 .. GS=5).
#[inline]
pub(crate) fn seg_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::ES as usize).min(5)
}

/// Address size in bits of the memory operand of `ins` (`code_bits`: the code size, asked only
/// for an operand with neither displacement size nor registers to tell).
#[inline(always)]
pub(crate) fn addr_bits(ins: &Instruction, code_bits: impl FnOnce() -> u32) -> u32 {
    match ins.memory_displ_size() {
        8 => 64,
        4 => 32,
        2 => 16,
        _ => {
            if ins.memory_base() != Register::None {
                reg_bits(ins.memory_base())
            } else if ins.memory_index() != Register::None {
                reg_bits(ins.memory_index())
            } else {
                code_bits()
            }
        }
    }
}

impl Cpu {
    /// Read a general-purpose or segment register.
    #[inline(always)]
    pub(crate) fn reg(&self, r: Register) -> u64 {
        let n = r as usize;
        match n {
            1..=4 => self.st.gpr[n - 1] & 0xff,
            5..=8 => (self.st.gpr[n - 5] >> 8) & 0xff,
            9..=20 => self.st.gpr[n - 5] & 0xff,
            21..=36 => self.st.gpr[n - 21] & 0xffff,
            37..=52 => self.st.gpr[n - 37] & 0xffff_ffff,
            53..=68 => self.st.gpr[n - 53],
            69 => self.st.rip & 0xffff_ffff,
            70 => self.st.rip,
            71..=76 => self.st.seg[n - 71].selector as u64,
            _ => 0,
        }
    }

    /// Write a general-purpose register (32-bit writes zero-extend, 8/16-bit merge).
    #[inline(always)]
    pub(crate) fn set_reg(&mut self, r: Register, v: u64) {
        let n = r as usize;
        match n {
            1..=4 => {
                let g = &mut self.st.gpr[n - 1];
                *g = (*g & !0xff) | (v & 0xff);
            }
            5..=8 => {
                let g = &mut self.st.gpr[n - 5];
                *g = (*g & !0xff00) | ((v & 0xff) << 8);
            }
            9..=20 => {
                let g = &mut self.st.gpr[n - 5];
                *g = (*g & !0xff) | (v & 0xff);
            }
            21..=36 => {
                let g = &mut self.st.gpr[n - 21];
                *g = (*g & !0xffff) | (v & 0xffff);
            }
            37..=52 => self.st.gpr[n - 37] = v & 0xffff_ffff,
            53..=68 => self.st.gpr[n - 53] = v,
            _ => {}
        }
    }

    /// Effective address (offset within the segment) of the memory operand.
    #[inline(always)]
    pub(crate) fn ea(&self, ins: &Instruction) -> u64 {
        let base = ins.memory_base();
        let index = ins.memory_index();
        let mut a = ins.memory_displacement64();
        if base != Register::None && base != Register::RIP && base != Register::EIP {
            a = a.wrapping_add(self.reg(base));
        }
        if index != Register::None {
            a = a.wrapping_add(
                self.reg(index)
                    .wrapping_mul(ins.memory_index_scale() as u64),
            );
        }
        a & mask(addr_bits(ins, || self.st.code_bits()))
    }

    /// Operand `i` as a location.
    #[inline(always)]
    pub(crate) fn loc(&self, ins: &Instruction, i: u32) -> Loc {
        match ins.op_kind(i) {
            OpKind::Register => Loc::Reg(ins.op_register(i)),
            OpKind::Memory => Loc::Mem(seg_index(ins.memory_segment()), self.ea(ins)),
            _ => Loc::Imm(ins.immediate(i)),
        }
    }

    /// Width in bits of operand `i`.
    #[inline(always)]
    pub(crate) fn op_bits(&self, ins: &Instruction, i: u32) -> u32 {
        match ins.op_kind(i) {
            OpKind::Register => reg_bits(ins.op_register(i)),
            OpKind::Memory => ins.memory_size().size() as u32 * 8,
            OpKind::Immediate8 | OpKind::Immediate8_2nd => 8,
            OpKind::Immediate16 | OpKind::Immediate8to16 => 16,
            OpKind::Immediate32 | OpKind::Immediate8to32 => 32,
            _ => 64,
        }
    }

    /// Read a location.
    #[inline(always)]
    pub(crate) fn rd(&mut self, l: Loc, bits: u32) -> R<u64> {
        match l {
            Loc::Reg(r) => Ok(self.reg(r)),
            Loc::Mem(s, off) => {
                if !matches!(bits, 8 | 16 | 32 | 64) {
                    return Err(ud());
                }
                self.read_seg(s, off, bits / 8)
            }
            Loc::Imm(v) => Ok(v & mask(bits)),
        }
    }

    /// Write a location.
    #[inline(always)]
    pub(crate) fn wr(&mut self, l: Loc, bits: u32, v: u64) -> R<()> {
        match l {
            Loc::Reg(r) => {
                self.set_reg(r, v);
                Ok(())
            }
            Loc::Mem(s, off) => {
                if !matches!(bits, 8 | 16 | 32 | 64) {
                    return Err(ud());
                }
                self.write_seg(s, off, bits / 8, v)
            }
            Loc::Imm(_) => Err(ud()),
        }
    }

    /// Read operand `i`.
    #[inline(always)]
    pub(crate) fn rd_op(&mut self, ins: &Instruction, i: u32) -> R<u64> {
        let bits = self.op_bits(ins, i);
        let l = self.loc(ins, i);
        self.rd(l, bits)
    }

    /// Read-modify-write of a location; atomic on guest memory when `locked`.
    /// Returns the old value; `f` may be called more than once (CAS retries).
    pub(crate) fn rmw(
        &mut self,
        l: Loc,
        bits: u32,
        locked: bool,
        f: &mut dyn FnMut(u64) -> u64,
    ) -> R<u64> {
        match l {
            Loc::Reg(r) => {
                let old = self.reg(r);
                let new = f(old);
                self.set_reg(r, new);
                Ok(old)
            }
            Loc::Mem(s, off) => {
                if !matches!(bits, 8 | 16 | 32 | 64) {
                    return Err(ud());
                }
                let size = bits / 8;
                let lin = self.seg_lin(s, off, size, true)?;
                if locked {
                    if let Some(p) = self.lin_ptr_w(lin, size)? {
                        // SAFETY: p is valid for `size` bytes (one RAM page, checked by lin_ptr_w).
                        let mut old = unsafe { mem::load(p, size) };
                        loop {
                            let new = f(old) & mask(bits);
                            // SAFETY: as above.
                            let seen = unsafe { mem::cmpxchg(p, size, old, new) };
                            if seen == old {
                                return Ok(old);
                            }
                            old = seen;
                        }
                    }
                    if let Some(old) =
                        self.rmw_locked_across_pages(lin, size, &mut |a| f(a) & mask(bits))?
                    {
                        return Ok(old);
                    }
                }
                let user = self.st.cpl() == 3;
                // Check write access first (x86 faults an RMW on a read-only page as a write).
                self.lin_ptr_w(lin, size)?;
                let old = self.read_lin_priv(lin, size, user)?;
                let new = f(old);
                self.write_lin(lin, size, new)?;
                Ok(old)
            }
            Loc::Imm(_) => Err(ud()),
        }
    }

    /// A locked read-modify-write of `size` bytes at `lin` that crosses a page, atomic (under
    /// the split lock, [`mem::rmw_split`]) when both pages are RAM: Some(old value). None when
    /// it does not cross a page or a page is not RAM (an MMIO access is never atomic).
    /// Both pages are checked for write access first, the lower one first.
    fn rmw_locked_across_pages(
        &mut self,
        lin: u64,
        size: u32,
        f: &mut dyn FnMut(u64) -> u64,
    ) -> R<Option<u64>> {
        let n1 = 0x1000 - (lin & 0xfff);
        if n1 >= u64::from(size) {
            return Ok(None);
        }
        let lo = self.lin_ptr_w(lin, n1 as u32)?;
        let hi = self.lin_ptr_w(lin.wrapping_add(n1), size - n1 as u32)?;
        let (Some(p1), Some(p2)) = (lo, hi) else {
            return Ok(None);
        };
        // SAFETY: lin_ptr_w gave p1 valid for n1 bytes and p2 for size - n1 bytes (each in one
        // RAM page), and 0 < n1 < size <= 8.
        Ok(Some(unsafe {
            mem::rmw_split(p1, n1 as usize, p2, size, f)
        }))
    }

    /// RFLAGS' status flags (CF PF AF ZF SF OF) from `f`.
    #[inline(always)]
    pub(crate) fn set_status(&mut self, f: u64) {
        self.st.rflags = (self.st.rflags & !STATUS) | (f & STATUS);
    }

    /// The status flags but CF from `f` (INC and DEC keep CF).
    #[inline(always)]
    pub(crate) fn set_status_but_cf(&mut self, f: u64) {
        self.st.rflags = (self.st.rflags & !(STATUS & !CF)) | (f & STATUS & !CF);
    }

    /// RFLAGS as PUSHF stores it: without VM and RF.
    #[inline(always)]
    pub(crate) fn pushed_flags(&self) -> u64 {
        self.st.rflags & !(VM | RF)
    }

    /// CF alone (the bit tests).
    #[inline(always)]
    pub(crate) fn set_status_cf(&mut self, cf: bool) {
        self.st.rflags = (self.st.rflags & !CF) | if cf { CF } else { 0 };
    }

    /// The accumulator sign-extended: CBW, CWDE, CDQE (`op` 0-2: within RAX), CWD, CDQ, CQO
    /// (3-5: into RDX).
    pub(crate) fn sign_extend_acc(&mut self, op: u8) {
        let a = self.st.gpr[gpr::RAX];
        match op {
            0 => self.set_reg(Register::AX, sext(a, 8)),
            1 => self.set_reg(Register::EAX, sext(a, 16)),
            2 => self.st.gpr[gpr::RAX] = sext(a, 32),
            3 => self.set_reg(Register::DX, if a & 0x8000 != 0 { 0xffff } else { 0 }),
            4 => self.set_reg(
                Register::EDX,
                if a & 0x8000_0000 != 0 { 0xffff_ffff } else { 0 },
            ),
            _ => self.st.gpr[gpr::RDX] = ((a as i64) >> 63) as u64,
        }
    }

    fn count_unimplemented(&mut self, ins: &Instruction) -> Fault {
        self.stats.unimplemented_total += 1;
        *self
            .stats
            .unimplemented
            .entry(format!("{:?}", ins.mnemonic()))
            .or_insert(0) += 1;
        ud()
    }

    /// Execute one decoded instruction. On success `next_rip` holds the following RIP.
    pub(crate) fn exec(&mut self, ins: &Instruction) -> R<()> {
        let ip_mask = mask(self.st.code_bits());
        self.next_rip = ins.next_ip() & ip_mask;
        let locked = ins.has_lock_prefix();
        if locked && !lock_ok(ins) {
            return Err(ud());
        }
        use Mnemonic as M;
        match ins.mnemonic() {
            M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor | M::Cmp | M::Test => {
                let op = match ins.mnemonic() {
                    M::Add => AluOp::Add,
                    M::Or => AluOp::Or,
                    M::Adc => AluOp::Adc,
                    M::Sbb => AluOp::Sbb,
                    M::And => AluOp::And,
                    M::Sub => AluOp::Sub,
                    M::Xor => AluOp::Xor,
                    M::Cmp => AluOp::Cmp,
                    _ => AluOp::Test,
                };
                let bits = self.op_bits(ins, 0);
                let src = self.rd_op(ins, 1)? & mask(bits);
                let dst = self.loc(ins, 0);
                let fl = self.st.rflags;
                if let Loc::Reg(r) = dst {
                    // Register destination: one computation, no closure.
                    let (res, f) = alu::alu(op, self.reg(r), src, fl, bits);
                    if !matches!(op, AluOp::Cmp | AluOp::Test) {
                        self.set_reg(r, res);
                    }
                    self.set_status(f);
                } else if matches!(op, AluOp::Cmp | AluOp::Test) {
                    let a = self.rd(dst, bits)?;
                    let (_, f) = alu::alu(op, a, src, fl, bits);
                    self.set_status(f);
                } else {
                    let old =
                        self.rmw(dst, bits, locked, &mut |a| alu::alu(op, a, src, fl, bits).0)?;
                    let (_, f) = alu::alu(op, old, src, fl, bits);
                    self.set_status(f);
                }
            }
            M::Inc | M::Dec => {
                let bits = self.op_bits(ins, 0);
                let dst = self.loc(ins, 0);
                let dec = ins.mnemonic() == M::Dec;
                let old = self.rmw(dst, bits, locked, &mut |a| alu::inc_dec(a, dec, bits).0)?;
                let f = alu::inc_dec(old, dec, bits).1;
                self.set_status_but_cf(f);
            }
            M::Neg => {
                let bits = self.op_bits(ins, 0);
                let dst = self.loc(ins, 0);
                let old = self.rmw(dst, bits, locked, &mut |a| alu::sub(0, a, false, bits).0)?;
                self.set_status(alu::sub(0, old, false, bits).1);
            }
            M::Not => {
                let bits = self.op_bits(ins, 0);
                let dst = self.loc(ins, 0);
                self.rmw(dst, bits, locked, &mut |a| !a & mask(bits))?;
            }
            M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar => {
                let op = match ins.mnemonic() {
                    M::Rol => ShiftOp::Rol,
                    M::Ror => ShiftOp::Ror,
                    M::Rcl => ShiftOp::Rcl,
                    M::Rcr => ShiftOp::Rcr,
                    M::Shr => ShiftOp::Shr,
                    M::Sar => ShiftOp::Sar,
                    _ => ShiftOp::Shl,
                };
                let bits = self.op_bits(ins, 0);
                let count = if ins.op_count() > 1 {
                    self.rd_op(ins, 1)?
                } else {
                    1
                };
                let dst = self.loc(ins, 0);
                let fl = self.st.rflags;
                if let Loc::Reg(r) = dst {
                    let (res, f) = alu::shift(op, self.reg(r), count, fl, bits);
                    self.set_reg(r, res);
                    self.set_status(f);
                } else {
                    let old = self.rmw(dst, bits, false, &mut |a| {
                        alu::shift(op, a, count, fl, bits).0
                    })?;
                    let f = alu::shift(op, old, count, fl, bits).1;
                    self.set_status(f);
                }
            }
            M::Shld | M::Shrd => {
                let bits = self.op_bits(ins, 0);
                let src = self.rd_op(ins, 1)?;
                let count = self.rd_op(ins, 2)?;
                let dst = self.loc(ins, 0);
                let left = ins.mnemonic() == M::Shld;
                let fl = self.st.rflags;
                let old = self.rmw(dst, bits, false, &mut |a| {
                    alu::shld_shrd(left, a, src, count, fl, bits).0
                })?;
                let f = alu::shld_shrd(left, old, src, count, fl, bits).1;
                self.set_status(f);
            }
            M::Mul | M::Imul if ins.op_count() == 1 => self.mul1(ins)?,
            M::Imul => {
                let bits = self.op_bits(ins, 0);
                let (a, b) = if ins.op_count() == 3 {
                    (self.rd_op(ins, 1)?, self.rd_op(ins, 2)?)
                } else {
                    (self.rd_op(ins, 0)?, self.rd_op(ins, 1)?)
                };
                let (res, f) = alu::imul(a, b, bits);
                self.set_status(f);
                let dst = self.loc(ins, 0);
                self.wr(dst, bits, res)?;
            }
            M::Div | M::Idiv => self.div(ins)?,
            M::Mov => {
                let bits = self.op_bits(ins, 0);
                if ins.op0_kind() == OpKind::Register && ins.op0_register().is_segment_register() {
                    let sel = self.rd_op(ins, 1)? as u16;
                    let s = seg_index(ins.op0_register());
                    if s == seg::CS {
                        return Err(ud());
                    }
                    self.load_seg(s, sel)?;
                    if s == seg::SS {
                        self.set_shadow = true;
                    }
                } else if ins.op0_kind() == OpKind::Register && ins.op0_register().is_cr() {
                    let v = self.rd_op(ins, 1)?;
                    self.mov_to_cr(ins.op0_register(), v)?;
                } else if ins.op_kind(1) == OpKind::Register && ins.op1_register().is_cr() {
                    let v = self.mov_from_cr(ins.op1_register())?;
                    self.set_reg(ins.op0_register(), v);
                } else if ins.op0_kind() == OpKind::Register && ins.op0_register().is_dr() {
                    let v = self.rd_op(ins, 1)?;
                    self.mov_dr(ins.op0_register(), Some(v))?;
                } else if ins.op_kind(1) == OpKind::Register && ins.op1_register().is_dr() {
                    let v = self.mov_dr(ins.op1_register(), None)?;
                    self.set_reg(ins.op0_register(), v);
                } else {
                    let src_bits = self.op_bits(ins, 1);
                    let v = self.rd_op(ins, 1)?;
                    let v = if src_bits == 16
                        && bits > 16
                        && ins.op1_register().is_segment_register()
                    {
                        v & 0xffff
                    } else {
                        v
                    };
                    let dst = self.loc(ins, 0);
                    self.wr(dst, bits, v)?;
                }
            }
            M::Movzx | M::Movsx | M::Movsxd => {
                let bits = self.op_bits(ins, 0);
                let sb = self.op_bits(ins, 1);
                let v = self.rd_op(ins, 1)?;
                let v = if ins.mnemonic() == M::Movzx {
                    v & mask(sb)
                } else {
                    sext(v, sb) & mask(bits)
                };
                self.set_reg(ins.op0_register(), v);
            }
            M::Lea => {
                let bits = self.op_bits(ins, 0);
                let a = self.ea(ins) & mask(bits);
                self.set_reg(ins.op0_register(), a);
            }
            M::Xchg => {
                let bits = self.op_bits(ins, 0);
                let a = self.loc(ins, 0);
                let b = self.loc(ins, 1);
                match (a, b) {
                    (Loc::Reg(ra), Loc::Reg(rb)) => {
                        let (va, vb) = (self.reg(ra), self.reg(rb));
                        self.set_reg(ra, vb);
                        self.set_reg(rb, va);
                    }
                    (Loc::Mem(..), Loc::Reg(r)) | (Loc::Reg(r), Loc::Mem(..)) => {
                        let m = if matches!(a, Loc::Mem(..)) { a } else { b };
                        let v = self.reg(r);
                        let old = self.rmw(m, bits, true, &mut |_| v)?;
                        self.set_reg(r, old);
                    }
                    _ => return Err(ud()),
                }
            }
            M::Xadd => {
                let bits = self.op_bits(ins, 0);
                let src_r = ins.op1_register();
                let src = self.reg(src_r);
                let dst = self.loc(ins, 0);
                let old = self.rmw(dst, bits, locked, &mut |a| alu::add(a, src, false, bits).0)?;
                self.set_status(alu::add(old, src, false, bits).1);
                if matches!(dst, Loc::Reg(r) if r == src_r) {
                    // xadd r, r: the register gets the sum.
                } else {
                    self.set_reg(src_r, old);
                }
            }
            M::Cmpxchg => {
                let bits = self.op_bits(ins, 0);
                let acc_r = match bits {
                    8 => Register::AL,
                    16 => Register::AX,
                    32 => Register::EAX,
                    _ => Register::RAX,
                };
                let acc = self.reg(acc_r);
                let src = self.reg(ins.op1_register());
                let dst = self.loc(ins, 0);
                let old = if let Loc::Reg(r) = dst {
                    // A register destination is written only when the compare succeeds.
                    let v = self.reg(r);
                    if v == acc {
                        self.set_reg(r, src);
                    }
                    v
                } else {
                    self.rmw(dst, bits, locked, &mut |a| if a == acc { src } else { a })?
                };
                self.set_status(alu::sub(acc, old, false, bits).1);
                if old != acc {
                    self.set_reg(acc_r, old);
                }
            }
            M::Cmpxchg8b if ins.code() == Code::Cmpxchg8b_m64 => {
                let Loc::Mem(s, off) = self.loc(ins, 0) else {
                    return Err(ud());
                };
                let lin = self.seg_lin(s, off, 8, true)?;
                let expect = (self.st.gpr[gpr::RDX] << 32) | (self.st.gpr[gpr::RAX] & 0xffff_ffff);
                let new = (self.st.gpr[gpr::RCX] << 32) | (self.st.gpr[gpr::RBX] & 0xffff_ffff);
                let cas = &mut |v| if v == expect { new } else { v };
                let old = match self.lin_ptr_w(lin, 8)? {
                    // SAFETY: p is valid for 8 bytes in one RAM page.
                    Some(p) => unsafe { mem::cmpxchg(p, 8, expect, new) },
                    None => match self.rmw_locked_across_pages(lin, 8, cas)? {
                        Some(v) => v,
                        None => {
                            let v = self.read_lin(lin, 8)?;
                            self.write_lin(lin, 8, cas(v))?;
                            v
                        }
                    },
                };
                if old == expect {
                    self.st.rflags |= ZF;
                } else {
                    self.st.rflags &= !ZF;
                    self.st.gpr[gpr::RAX] = old & 0xffff_ffff;
                    self.st.gpr[gpr::RDX] = old >> 32;
                }
            }
            M::Cmpxchg16b if ins.code() == Code::Cmpxchg16b_m128 => {
                let Loc::Mem(s, off) = self.loc(ins, 0) else {
                    return Err(ud());
                };
                let lin = self.seg_lin(s, off, 16, true)?;
                if lin & 15 != 0 {
                    return Err(gp0());
                }
                let g = &self.st.gpr;
                let expect = (u128::from(g[gpr::RDX]) << 64) | u128::from(g[gpr::RAX]);
                let new = (u128::from(g[gpr::RCX]) << 64) | u128::from(g[gpr::RBX]);
                // A write access whether or not the compare succeeds (the processor writes the
                // old value back on failure): write permission, A/D bits and the dirty log
                // come from the same translation either way.
                let old = match self.lin_ptr_w(lin, 16)? {
                    // SAFETY: p is valid for 16 bytes in one RAM page, 16-byte aligned
                    // because lin is and RAM host mappings are page-aligned.
                    Some(p) => unsafe { mem::cmpxchg16(p, expect, new) },
                    None => {
                        let lo = self.read_lin(lin, 8)?;
                        let hi = self.read_lin(lin + 8, 8)?;
                        let v = (u128::from(hi) << 64) | u128::from(lo);
                        let w = if v == expect { new } else { v };
                        self.write_lin(lin, 8, w as u64)?;
                        self.write_lin(lin + 8, 8, (w >> 64) as u64)?;
                        v
                    }
                };
                if old == expect {
                    self.st.rflags |= ZF;
                } else {
                    self.st.rflags &= !ZF;
                    self.st.gpr[gpr::RAX] = old as u64;
                    self.st.gpr[gpr::RDX] = (old >> 64) as u64;
                }
            }
            M::Bswap => {
                let r = ins.op0_register();
                let bits = reg_bits(r);
                let v = self.reg(r);
                self.set_reg(r, alu::bswap(v, bits));
            }
            M::Bt | M::Bts | M::Btr | M::Btc => self.bt(ins, locked)?,
            M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt => {
                let bits = self.op_bits(ins, 0);
                let v = self.rd_op(ins, 1)? & mask(bits);
                // Without BMI1/ABM advertised, TZCNT/LZCNT execute as BSF/BSR (as on such CPUs).
                let fwd = matches!(ins.mnemonic(), M::Bsf | M::Tzcnt);
                if v == 0 {
                    self.st.rflags |= ZF;
                } else {
                    self.st.rflags &= !ZF;
                    let r = if fwd {
                        v.trailing_zeros() as u64
                    } else {
                        63 - v.leading_zeros() as u64
                    };
                    self.set_reg(ins.op0_register(), r);
                }
            }
            M::Popcnt => {
                let bits = self.op_bits(ins, 0);
                let v = self.rd_op(ins, 1)? & mask(bits);
                let r = v.count_ones() as u64;
                self.st.rflags &= !STATUS;
                if v == 0 {
                    self.st.rflags |= ZF;
                }
                self.set_reg(ins.op0_register(), r);
            }
            setcc_mnemonics!() => {
                let c = cond(ins.condition_code() as u32 - 1, self.st.rflags) as u64;
                let dst = self.loc(ins, 0);
                self.wr(dst, 8, c)?;
            }
            cmovcc_mnemonics!() => {
                let v = self.rd_op(ins, 1)?;
                let r = ins.op0_register();
                if cond(ins.condition_code() as u32 - 1, self.st.rflags) {
                    self.set_reg(r, v);
                } else {
                    let cur = self.reg(r);
                    self.set_reg(r, cur);
                }
            }
            M::Cbw => self.sign_extend_acc(0),
            M::Cwde => self.sign_extend_acc(1),
            M::Cdqe => self.sign_extend_acc(2),
            M::Cwd => self.sign_extend_acc(3),
            M::Cdq => self.sign_extend_acc(4),
            M::Cqo => self.sign_extend_acc(5),
            M::Push => {
                let size = (-ins.stack_pointer_increment()) as u32;
                let v = if ins.op0_kind() == OpKind::Register {
                    self.reg(ins.op0_register())
                } else {
                    self.rd_op(ins, 0)?
                };
                self.push(v, size)?;
            }
            M::Pop => {
                let size = ins.stack_pointer_increment() as u32;
                if ins.op0_kind() == OpKind::Register && ins.op0_register().is_segment_register() {
                    let sb = self.st.stack_bits();
                    let sp = self.st.gpr[gpr::RSP];
                    let v = self.pop(size)?;
                    let s = seg_index(ins.op0_register());
                    if let Err(e) = self.load_seg(s, v as u16) {
                        self.set_sp(sp, sb);
                        return Err(e);
                    }
                    if s == seg::SS {
                        self.set_shadow = true;
                    }
                } else {
                    let sb = self.st.stack_bits();
                    let sp = self.st.gpr[gpr::RSP];
                    let v = self.pop(size)?;
                    // pop [rsp+x] uses the incremented RSP for the address.
                    let dst = self.loc(ins, 0);
                    if let Err(e) = self.wr(dst, size * 8, v) {
                        self.set_sp(sp, sb);
                        return Err(e);
                    }
                }
            }
            M::Pushf | M::Pushfd | M::Pushfq => {
                let size = (-ins.stack_pointer_increment()) as u32;
                self.push(self.pushed_flags(), size)?;
            }
            M::Popf | M::Popfd | M::Popfq => {
                let size = ins.stack_pointer_increment() as u32;
                let v = self.pop(size)?;
                self.popf(v, size);
            }
            M::Pusha | M::Pushad => {
                if self.st.mode64() {
                    return Err(ud());
                }
                let size = if ins.mnemonic() == M::Pusha { 2 } else { 4 };
                let sp = self.st.gpr[gpr::RSP];
                for i in 0..8 {
                    let v = if i == 4 { sp } else { self.st.gpr[i] };
                    self.push(v, size)?;
                }
            }
            M::Popa | M::Popad => {
                if self.st.mode64() {
                    return Err(ud());
                }
                let size = if ins.mnemonic() == M::Popa { 2 } else { 4 };
                for i in (0..8).rev() {
                    let v = self.pop(size)?;
                    if i != 4 {
                        let g = &mut self.st.gpr[i];
                        *g = if size == 2 {
                            (*g & !0xffff) | (v & 0xffff)
                        } else {
                            v & 0xffff_ffff
                        };
                    }
                }
            }
            M::Enter => self.enter(ins)?,
            M::Leave => {
                let sb = self.st.stack_bits();
                let size = ins.stack_pointer_increment().unsigned_abs().max(2);
                let opsize = if self.st.mode64() {
                    if ins.code() == Code::Leavew {
                        2
                    } else {
                        8
                    }
                } else if ins.code() == Code::Leavew {
                    2
                } else if ins.code() == Code::Leaved {
                    4
                } else {
                    size
                };
                let bp = self.st.gpr[gpr::RBP];
                let old_sp = self.st.gpr[gpr::RSP];
                self.set_sp(bp, sb);
                match self.pop(opsize) {
                    Ok(v) => {
                        let r = match opsize {
                            2 => Register::BP,
                            4 => Register::EBP,
                            _ => Register::RBP,
                        };
                        self.set_reg(r, v);
                    }
                    Err(e) => {
                        self.st.gpr[gpr::RSP] = old_sp;
                        return Err(e);
                    }
                }
            }
            M::Daa | M::Das | M::Aaa | M::Aas | M::Aam | M::Aad | M::Salc => self.bcd(ins)?,
            M::Lahf => {
                let v = (self.st.rflags & (SF | ZF | AF | PF | CF)) | FIXED;
                self.set_reg(Register::AH, v);
            }
            M::Sahf => {
                let ah = self.reg(Register::AH);
                let m = SF | ZF | AF | PF | CF;
                self.st.rflags = (self.st.rflags & !m) | (ah & m);
            }
            M::Clc => self.st.rflags &= !CF,
            M::Stc => self.st.rflags |= CF,
            M::Cmc => self.st.rflags ^= CF,
            M::Cld => self.st.rflags &= !DF,
            M::Std => self.st.rflags |= DF,
            M::Cli => {
                self.check_iopl()?;
                self.st.rflags &= !IF;
            }
            M::Sti => {
                self.check_iopl()?;
                if self.st.rflags & IF == 0 {
                    self.set_shadow = true;
                }
                self.st.rflags |= IF;
            }
            M::Nop
            | M::Endbr64
            | M::Endbr32
            | M::Prefetchnta
            | M::Prefetcht0
            | M::Prefetcht1
            | M::Prefetcht2
            | M::Prefetchw
            | M::Lfence
            | M::Mfence
            | M::Sfence => {
                if ins.mnemonic() == M::Mfence {
                    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                }
            }
            M::Pause => std::hint::spin_loop(),
            M::Clflush | M::Clflushopt => {
                // Touch the line so faults are architectural.
                let Loc::Mem(s, off) = self.loc(ins, 0) else {
                    return Err(ud());
                };
                let lin = self.seg_lin(s, off, 1, false)?;
                self.read_lin(lin, 1)?;
            }
            M::Xlatb => {
                let s = seg_index(ins.memory_segment());
                let bx = match ins.memory_base() {
                    Register::BX => self.st.gpr[gpr::RBX] & 0xffff,
                    Register::EBX => self.st.gpr[gpr::RBX] & 0xffff_ffff,
                    _ => self.st.gpr[gpr::RBX],
                };
                let al = self.st.gpr[gpr::RAX] & 0xff;
                let asz = reg_bits(ins.memory_base());
                let v = self.read_seg(s, bx.wrapping_add(al) & mask(asz), 1)?;
                self.set_reg(Register::AL, v);
            }
            M::Ud0 | M::Ud1 | M::Ud2 => return Err(ud()),
            // Control flow.
            M::Jmp
            | M::Call
            | M::Ret
            | M::Retf
            | M::Iret
            | M::Iretd
            | M::Iretq
            | M::Int
            | M::Int3
            | M::Into
            | M::Int1
            | M::Loop
            | M::Loope
            | M::Loopne
            | M::Jcxz
            | M::Jecxz
            | M::Jrcxz
            | M::Syscall
            | M::Sysret
            | M::Sysretq
            | M::Hlt => self.exec_control(ins)?,
            jcc_mnemonics!() => {
                if cond(ins.condition_code() as u32 - 1, self.st.rflags) {
                    self.jump_near(ins.near_branch_target())?;
                }
            }
            // Strings and I/O.
            memory_string_mnemonics!()
            | M::Insb
            | M::Insw
            | M::Insd
            | M::Outsb
            | M::Outsw
            | M::Outsd
                if !matches!(ins.mnemonic(), M::Movsd | M::Cmpsd)
                    || !matches!(ins.op0_kind(), OpKind::Register | OpKind::Memory) =>
            {
                self.exec_string(ins)?
            }
            M::In | M::Out => self.exec_io(ins)?,
            // System.
            M::Cpuid
            | M::Rdtsc
            | M::Rdtscp
            | M::Rdmsr
            | M::Wrmsr
            | M::Lgdt
            | M::Lidt
            | M::Sgdt
            | M::Sidt
            | M::Lldt
            | M::Sldt
            | M::Ltr
            | M::Str
            | M::Clts
            | M::Lmsw
            | M::Smsw
            | M::Invlpg
            | M::Invd
            | M::Wbinvd
            | M::Swapgs
            | M::Lsl
            | M::Lar
            | M::Verr
            | M::Verw
            | M::Lss
            | M::Lfs
            | M::Lgs
            | M::Lds
            | M::Les
            | M::Rdpid
            | M::Rdpmc => self.exec_system(ins)?,
            // x87 and SSE.
            M::Fninit
            | M::Fnstcw
            | M::Fldcw
            | M::Fnstsw
            | M::Fnclex
            | M::Wait
            | M::Fxsave
            | M::Fxsave64
            | M::Fxrstor
            | M::Fxrstor64
            | M::Ldmxcsr
            | M::Stmxcsr
            | M::Fnstenv
            | M::Fldenv
            | M::Emms
            | M::Fild
            | M::Fld
            | M::Fldz
            | M::Fld1
            | M::Fstp
            | M::Fst
            | M::Fistp
            | M::Fist
            | M::Fxch
            | M::Ffree
            | M::Fnop
            | M::Fincstp
            | M::Fdecstp
            | M::Fchs
            | M::Fabs => self.exec_x87(ins)?,
            _ => {
                if self.exec_sse(ins)? {
                    return Ok(());
                }
                return Err(self.count_unimplemented(ins));
            }
        }
        Ok(())
    }

    fn check_iopl(&self) -> R<()> {
        if self.st.cr0 & crate::state::cr0::PE != 0 && self.st.cpl() > self.st.iopl() {
            return Err(gp0());
        }
        Ok(())
    }

    /// POPF semantics: what may change depends on CPL and IOPL.
    pub(crate) fn popf(&mut self, v: u64, size: u32) {
        let mut m = WRITABLE & !RF;
        if self.st.cr0 & crate::state::cr0::PE != 0 {
            if self.st.cpl() > 0 {
                m &= !IOPL;
            }
            if self.st.cpl() > self.st.iopl() {
                m &= !IF;
            }
        }
        if size == 2 {
            m &= 0xffff;
        }
        let old = self.st.rflags;
        self.st.rflags = (old & !m) | (v & m) | FIXED;
        if old & IF == 0 && self.st.rflags & IF != 0 {
            // Interrupts are recognised after the next instruction boundary check.
        }
    }

    fn mul1(&mut self, ins: &Instruction) -> R<()> {
        let bits = self.op_bits(ins, 0);
        if !matches!(bits, 8 | 16 | 32 | 64) {
            return Err(ud());
        }
        let src = self.rd_op(ins, 0)? & mask(bits);
        let a = self.st.gpr[gpr::RAX] & mask(bits);
        let signed = ins.mnemonic() == Mnemonic::Imul;
        let (lo, hi, overflow) = if signed {
            let p = (sext(a, bits) as i64 as i128) * (sext(src, bits) as i64 as i128);
            let lo = (p as u64) & mask(bits);
            let hi = ((p >> bits) as u64) & mask(bits);
            (lo, hi, p != sext(lo, bits) as i64 as i128)
        } else {
            let p = (a as u128) * (src as u128);
            let lo = (p as u64) & mask(bits);
            let hi = ((p >> bits) as u64) & mask(bits);
            (lo, hi, hi != 0)
        };
        match bits {
            8 => self.set_reg(Register::AX, lo | (hi << 8)),
            16 => {
                self.set_reg(Register::AX, lo);
                self.set_reg(Register::DX, hi);
            }
            32 => {
                self.set_reg(Register::EAX, lo);
                self.set_reg(Register::EDX, hi);
            }
            _ => {
                self.st.gpr[gpr::RAX] = lo;
                self.st.gpr[gpr::RDX] = hi;
            }
        }
        let mut f = alu::szp(lo, bits);
        if overflow {
            f |= CF | OF;
        }
        self.set_status(f);
        Ok(())
    }

    fn div(&mut self, ins: &Instruction) -> R<()> {
        let bits = self.op_bits(ins, 0);
        if !matches!(bits, 8 | 16 | 32 | 64) {
            return Err(ud());
        }
        let d = self.rd_op(ins, 0)? & mask(bits);
        if d == 0 {
            return Err(Fault::Exc(0, None));
        }
        let (lo, hi) = match bits {
            8 => (
                self.st.gpr[gpr::RAX] & 0xff,
                (self.st.gpr[gpr::RAX] >> 8) & 0xff,
            ),
            _ => (
                self.st.gpr[gpr::RAX] & mask(bits),
                self.st.gpr[gpr::RDX] & mask(bits),
            ),
        };
        let n: u128 = ((hi as u128) << bits) | lo as u128;
        let (q, r) = if ins.mnemonic() == Mnemonic::Idiv {
            // Sign-extend the 2*bits dividend.
            let nb = 2 * bits;
            let sn = ((n << (128 - nb)) as i128) >> (128 - nb);
            let sd = sext(d, bits) as i64 as i128;
            let q = sn.wrapping_div(sd);
            let r = sn.wrapping_rem(sd);
            let min = -(1i128 << (bits - 1));
            let max = (1i128 << (bits - 1)) - 1;
            if q < min || q > max {
                return Err(Fault::Exc(0, None));
            }
            ((q as u64) & mask(bits), (r as u64) & mask(bits))
        } else {
            let q = n / d as u128;
            if q > mask(bits) as u128 {
                return Err(Fault::Exc(0, None));
            }
            (q as u64, (n % d as u128) as u64)
        };
        match bits {
            8 => self.set_reg(Register::AX, q | (r << 8)),
            16 => {
                self.set_reg(Register::AX, q);
                self.set_reg(Register::DX, r);
            }
            32 => {
                self.set_reg(Register::EAX, q);
                self.set_reg(Register::EDX, r);
            }
            _ => {
                self.st.gpr[gpr::RAX] = q;
                self.st.gpr[gpr::RDX] = r;
            }
        }
        Ok(())
    }

    fn bt(&mut self, ins: &Instruction, locked: bool) -> R<()> {
        let bits = self.op_bits(ins, 0);
        if !matches!(bits, 16 | 32 | 64) {
            return Err(ud());
        }
        let off = self.rd_op(ins, 1)?;
        let mut dst = self.loc(ins, 0);
        let bit = if let (Loc::Mem(s, a), OpKind::Register) = (dst, ins.op_kind(1)) {
            // Register bit offsets address memory beyond the operand (signed).
            let so = sext(off, bits) as i64;
            let byte_off = (so >> bits.trailing_zeros()) * (bits as i64 / 8);
            let asz_mask = mask(addr_bits(ins, || self.st.code_bits()));
            dst = Loc::Mem(s, a.wrapping_add(byte_off as u64) & asz_mask);
            off & (bits as u64 - 1)
        } else {
            off & (bits as u64 - 1)
        };
        let m = 1u64 << bit;
        let old = match ins.mnemonic() {
            Mnemonic::Bt => self.rd(dst, bits)?,
            Mnemonic::Bts => self.rmw(dst, bits, locked, &mut |v| v | m)?,
            Mnemonic::Btr => self.rmw(dst, bits, locked, &mut |v| v & !m)?,
            _ => self.rmw(dst, bits, locked, &mut |v| v ^ m)?,
        };
        self.set_status_cf(old & m != 0);
        Ok(())
    }

    fn enter(&mut self, ins: &Instruction) -> R<()> {
        let size: u32 = match ins.code() {
            Code::Enterw_imm16_imm8 => 2,
            Code::Enterd_imm16_imm8 => 4,
            _ => 8,
        };
        let alloc = ins.immediate16() as u64;
        let level = (ins.immediate8_2nd() & 31) as u64;
        let sb = self.st.stack_bits();
        let old_sp = self.st.gpr[gpr::RSP];
        let r = (|| -> R<()> {
            let bp = self.st.gpr[gpr::RBP];
            self.push(bp, size)?;
            let frame = self.st.gpr[gpr::RSP];
            let mut tbp = bp;
            if level > 0 {
                for _ in 1..level {
                    tbp = tbp.wrapping_sub(size as u64) & mask(sb);
                    let v = self.read_seg(seg::SS, tbp, size)?;
                    self.push(v, size)?;
                }
                self.push(frame, size)?;
            }
            let new_sp = self.st.gpr[gpr::RSP].wrapping_sub(alloc) & mask(sb);
            // Touch the lowest byte of the new frame (architectural fault point).
            self.seg_lin(seg::SS, new_sp, 1, true)?;
            let bpr = match size {
                2 => Register::BP,
                4 => Register::EBP,
                _ => Register::RBP,
            };
            self.set_reg(bpr, frame);
            self.set_sp(new_sp, sb);
            Ok(())
        })();
        if r.is_err() {
            self.st.gpr[gpr::RSP] = old_sp;
        }
        r
    }
}

/// Instructions that accept a LOCK prefix with a memory destination.
fn lock_ok(ins: &Instruction) -> bool {
    use Mnemonic as M;
    ins.op0_kind() == OpKind::Memory
        && matches!(
            ins.mnemonic(),
            M::Add
                | M::Or
                | M::Adc
                | M::Sbb
                | M::And
                | M::Sub
                | M::Xor
                | M::Inc
                | M::Dec
                | M::Neg
                | M::Not
                | M::Bts
                | M::Btr
                | M::Btc
                | M::Xadd
                | M::Xchg
                | M::Cmpxchg
                | M::Cmpxchg8b
                | M::Cmpxchg16b
        )
}

impl Cpu {
    /// The legacy decimal-arithmetic instructions (DAA, DAS, AAA, AAS, AAM, AAD) and SALC, as
    /// the SDM gives them; iced decodes them only outside 64-bit mode, where they exist. Flags
    /// the SDM leaves undefined: AAA/AAS keep SF, ZF, PF and OF; AAM/AAD clear CF, AF and OF and
    /// set SF, ZF and PF from AL (what current processors and QEMU do).
    fn bcd(&mut self, ins: &Instruction) -> R<()> {
        use Mnemonic as M;
        let ax = self.st.gpr[gpr::RAX] & 0xffff;
        let (al, ah) = (ax & 0xff, ax >> 8);
        let fl = self.st.rflags;
        let low_adjust = al & 0xf > 9 || fl & AF != 0;
        let (new_ax, flags, mask) = match ins.mnemonic() {
            M::Daa | M::Das => {
                let old_cf = fl & CF != 0;
                let sub = ins.mnemonic() == M::Das;
                let (mut r, mut cf, mut af) = (al, false, false);
                if low_adjust {
                    let (v, carry) = if sub {
                        (r as u8).overflowing_sub(6)
                    } else {
                        (r as u8).overflowing_add(6)
                    };
                    r = u64::from(v);
                    cf = old_cf || carry;
                    af = true;
                }
                if al > 0x99 || old_cf {
                    r = if sub { r.wrapping_sub(0x60) } else { r + 0x60 } & 0xff;
                    cf = true;
                } else if !sub {
                    cf = false;
                }
                let f = alu::szp(r, 8) | if cf { CF } else { 0 } | if af { AF } else { 0 };
                ((ah << 8) | r, f, SF | ZF | PF | CF | AF)
            }
            M::Aaa | M::Aas => {
                let r = match (low_adjust, ins.mnemonic() == M::Aas) {
                    (false, _) => ax,
                    (true, false) => ax.wrapping_add(0x106),
                    (true, true) => ax.wrapping_sub(6).wrapping_sub(0x100),
                };
                let f = if low_adjust { AF | CF } else { 0 };
                ((r & 0xff00) | (r & 0x0f), f, CF | AF)
            }
            M::Aam => {
                let base = u64::from(ins.immediate8());
                if base == 0 {
                    return Err(Fault::Exc(0, None));
                }
                let r = al % base;
                (
                    ((al / base) << 8) | r,
                    alu::szp(r, 8),
                    SF | ZF | PF | CF | AF | OF,
                )
            }
            M::Aad => {
                let r = (al + ah * u64::from(ins.immediate8())) & 0xff;
                (r, alu::szp(r, 8), SF | ZF | PF | CF | AF | OF)
            }
            _ => {
                // SALC: AL = CF ? 0xff : 0; flags unchanged.
                let r = if fl & CF != 0 { 0xff } else { 0 };
                ((ah << 8) | r, 0, 0)
            }
        };
        self.set_reg(Register::AX, new_ax & 0xffff);
        self.st.rflags = (fl & !mask) | (flags & mask);
        Ok(())
    }
}
