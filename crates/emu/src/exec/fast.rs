//! Decode-time handlers (issue 13): when an instruction enters the decoded-instruction cache,
//! [`compile`] picks a handler specialised for its form (operation, operand size, register or
//! memory operands) and resolves its operands once: general-purpose register indices, the
//! immediate or branch target, the memory operand's base, index, scale, displacement, segment
//! and address-size mask, and the next RIP. The run loop calls that handler instead of
//! [`Cpu::exec`], which matches on the mnemonic and asks iced-x86 for operand kinds on every
//! execution. Forms without a handler (and every form with a LOCK prefix, high-byte
//! registers, segment/control/debug registers) keep the generic `exec`.
//!
//! Each handler does exactly what `exec` does for its form, in the same order: every access
//! that may fault comes before any register is written, so a fault leaves RIP at the
//! instruction and no partial result. The differential test (`tests/differential.rs`) runs
//! every form here against the host CPU through the run loop.

use super::alu::{self, cond, mask, sext, AluOp, ShiftOp};
use super::seg_index;
use crate::cpu::{Cpu, Fault, R};
use crate::mem;
use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

/// A decode-time handler: executes the instruction described by the [`Fast`] it gets. On
/// entry of a control transfer's handler `next_rip` holds the following instruction's RIP, and
/// branches overwrite it; other handlers must not read it (in a translated block it holds the
/// block's last instruction's, `Cpu::run_block`).
pub(crate) type Handler = extern "sysv64-unwind" fn(&mut Cpu, &Fast) -> Done;

/// A handler's result: the fault boxed, so that the result is one register (null: done)
/// rather than a 24-byte `R<()>` returned through memory and tested there after every
/// instruction. Faults are rare enough for the allocation not to matter.
pub(crate) type Done = Result<(), Box<Fault>>;

/// A helper's `R<()>` as a handler's result.
#[inline(always)]
fn done(r: R<()>) -> Done {
    r.map_err(Box::new)
}

/// An instruction's pre-resolved form.
#[derive(Clone, Copy)]
pub(crate) struct Fast {
    /// None: execute with the generic `exec`.
    pub(crate) handler: Option<Handler>,
    /// RIP of the next instruction (masked to the code size).
    pub(crate) next_rip: u64,
    /// Immediate (masked to the operand size), shift count, or near-branch target.
    pub(crate) imm: u64,
    /// Memory operand: displacement (absolute address for RIP-relative operands).
    pub(crate) disp: u64,
    /// All-ones when the memory operand has a base / index register, else 0.
    pub(crate) base_mask: u64,
    pub(crate) index_mask: u64,
    /// Address-size mask of the effective address.
    pub(crate) addr_mask: u64,
    /// GPR index of operand 0 and of the register source.
    pub(crate) r0: u8,
    pub(crate) r1: u8,
    /// GPR indices of the memory operand's base and index, log2 of the scale.
    pub(crate) base: u8,
    pub(crate) index: u8,
    pub(crate) scale: u8,
    /// Segment index (ES=0 .. GS=5) of the memory operand.
    pub(crate) seg: u8,
    /// Stack operand size in bytes (PUSH/POP/CALL/RET).
    pub(crate) size: u8,
    /// The form, for the JIT (`crate::jit`), which compiles some forms inline and calls the
    /// handler for the others.
    pub(crate) form: Form,
    /// The form's operation: ALU op (ADD OR ADC SBB AND SUB XOR CMP TEST = 0..8), shift op
    /// (ROL ROR SHL SHR SAR = 0..4), condition code (0..15), 1 for DEC and for MOVSX.
    pub(crate) sub: u8,
    /// Operand width in bits (the destination's), and a MOVZX/MOVSX source's.
    pub(crate) bits: u8,
    pub(crate) src_bits: u8,
}

/// Instruction forms as the JIT tells them apart (`Fast::form`); `r` register, `i`
/// immediate, `m` memory, destination first.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Form {
    /// A form the JIT only calls the handler of.
    Other,
    AluRR,
    AluRI,
    AluRM,
    AluMR,
    AluMI,
    IncDecR,
    ShiftRI,
    /// A shift or rotate of a register by CL.
    ShiftRC,
    ImulRR,
    MovRR,
    MovRI,
    MovRM,
    MovMR,
    MovMI,
    Lea,
    MovxR,
    MovxM,
    Jcc,
    Jmp,
    /// Direct near CALL.
    Call,
    /// Near RET (`imm`: bytes released).
    Ret,
    /// Indirect near JMP or CALL (through a register or memory).
    Indirect,
    PushR,
    PopR,
    SetccR,
    CmovRR,
    Nop,
    /// NOT (`sub` 0) or NEG (1) of a register.
    NegNotR,
    /// BSWAP of a 32- or 64-bit register.
    BswapR,
    /// CBW CWDE CDQE CWD CDQ CQO (`sub` 0-5).
    Cext,
    /// TEST of AH, CH, DH or BH (`r0`: the register holding it) with an immediate.
    TestHiRI,
    /// An instruction without a form of its own that the generic `exec` runs inside a block
    /// (`generic`): `imm` its own RIP, `sub` 1 when it ends its block (a REP string
    /// instruction, which may leave RIP on itself to go on later).
    Generic,
}

impl Fast {
    /// No handler: the generic path.
    pub(crate) const NONE: Fast = Fast {
        handler: None,
        next_rip: 0,
        imm: 0,
        disp: 0,
        base_mask: 0,
        index_mask: 0,
        addr_mask: 0,
        r0: 0,
        r1: 0,
        base: 0,
        index: 0,
        scale: 0,
        seg: 0,
        size: 0,
        form: Form::Other,
        sub: 0,
        bits: 0,
        src_bits: 0,
    };
}

// ------------------------------------------------------------------ operand access

/// Value of GPR `r` at width `B`.
#[inline(always)]
fn get<const B: u32>(c: &Cpu, r: u8) -> u64 {
    c.st.gpr[r as usize & 15] & mask(B)
}

/// Write GPR `r` at width `B` (32-bit writes zero-extend, 8/16-bit writes merge).
#[inline(always)]
fn set<const B: u32>(c: &mut Cpu, r: u8, v: u64) {
    let g = &mut c.st.gpr[r as usize & 15];
    *g = match B {
        64 => v,
        32 => v & 0xffff_ffff,
        _ => (*g & !mask(B)) | (v & mask(B)),
    };
}

/// Effective address (offset within the segment) of the memory operand.
#[inline(always)]
fn ea(c: &Cpu, f: &Fast) -> u64 {
    let b = c.st.gpr[f.base as usize & 15] & f.base_mask;
    let i = (c.st.gpr[f.index as usize & 15] & f.index_mask) << (f.scale & 3);
    f.disp.wrapping_add(b).wrapping_add(i) & f.addr_mask
}

#[inline(always)]
fn read_mem<const B: u32>(c: &mut Cpu, f: &Fast) -> R<u64> {
    let off = ea(c, f);
    c.read_seg(f.seg as usize, off, B / 8)
}

#[inline(always)]
fn write_mem<const B: u32>(c: &mut Cpu, f: &Fast, v: u64) -> R<()> {
    let off = ea(c, f);
    c.write_seg(f.seg as usize, off, B / 8, v)
}

/// Read-modify-write of the memory operand (no LOCK): the write permission is checked
/// before the read, as x86 faults such an access as a write. Returns the old value.
#[inline(always)]
fn rmw_mem<const B: u32>(c: &mut Cpu, f: &Fast, op: impl Fn(u64) -> u64) -> R<u64> {
    let size = B / 8;
    let off = ea(c, f);
    let lin = c.seg_lin(f.seg as usize, off, size, true)?;
    if let Some(p) = c.lin_ptr_w(lin, size)? {
        // SAFETY: lin_ptr_w checked that `size` bytes at p lie in one RAM page.
        let old = unsafe { mem::load(p, size) };
        // SAFETY: as above.
        unsafe { mem::store(p, size, op(old) & mask(B)) };
        return Ok(old);
    }
    let user = c.st.cpl() == 3;
    let old = c.read_lin_priv(lin, size, user)?;
    c.write_lin(lin, size, op(old))?;
    Ok(old)
}

// ------------------------------------------------------------------ handlers

#[inline(always)]
fn alu_op(op: u8) -> AluOp {
    match op {
        0 => AluOp::Add,
        1 => AluOp::Or,
        2 => AluOp::Adc,
        3 => AluOp::Sbb,
        4 => AluOp::And,
        5 => AluOp::Sub,
        6 => AluOp::Xor,
        7 => AluOp::Cmp,
        _ => AluOp::Test,
    }
}

/// CMP and TEST only set flags.
#[inline(always)]
fn alu_writes(op: u8) -> bool {
    op < 7
}

#[inline(always)]
fn alu_reg<const OP: u8, const B: u32>(c: &mut Cpu, f: &Fast, src: u64) {
    let (res, fl) = alu::alu(alu_op(OP), get::<B>(c, f.r0), src, c.st.rflags, B);
    if alu_writes(OP) {
        set::<B>(c, f.r0, res);
    }
    c.set_status(fl);
}

extern "sysv64-unwind" fn alu_rr<const OP: u8, const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let src = get::<B>(c, f.r1);
    alu_reg::<OP, B>(c, f, src);
    Ok(())
}

extern "sysv64-unwind" fn alu_ri<const OP: u8, const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    alu_reg::<OP, B>(c, f, f.imm);
    Ok(())
}

extern "sysv64-unwind" fn alu_rm<const OP: u8, const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let src = read_mem::<B>(c, f)?;
    alu_reg::<OP, B>(c, f, src);
    Ok(())
}

#[inline(always)]
fn alu_mem<const OP: u8, const B: u32>(c: &mut Cpu, f: &Fast, src: u64) -> R<()> {
    let fl = c.st.rflags;
    let op = alu_op(OP);
    let old = if alu_writes(OP) {
        rmw_mem::<B>(c, f, |a| alu::alu(op, a, src, fl, B).0)?
    } else {
        read_mem::<B>(c, f)?
    };
    c.set_status(alu::alu(op, old, src, fl, B).1);
    Ok(())
}

extern "sysv64-unwind" fn alu_mr<const OP: u8, const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let src = get::<B>(c, f.r1);
    done(alu_mem::<OP, B>(c, f, src))
}

extern "sysv64-unwind" fn alu_mi<const OP: u8, const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    done(alu_mem::<OP, B>(c, f, f.imm))
}

extern "sysv64-unwind" fn incdec_r<const DEC: bool, const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let (res, fl) = alu::inc_dec(get::<B>(c, f.r0), DEC, B);
    set::<B>(c, f.r0, res);
    c.set_status_but_cf(fl);
    Ok(())
}

extern "sysv64-unwind" fn incdec_m<const DEC: bool, const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let old = rmw_mem::<B>(c, f, |a| alu::inc_dec(a, DEC, B).0)?;
    c.set_status_but_cf(alu::inc_dec(old, DEC, B).1);
    Ok(())
}

#[inline(always)]
fn shift_op(op: u8) -> ShiftOp {
    match op {
        0 => ShiftOp::Rol,
        1 => ShiftOp::Ror,
        2 => ShiftOp::Shl,
        3 => ShiftOp::Shr,
        _ => ShiftOp::Sar,
    }
}

/// Shift count: the immediate, or CL when `CL`.
#[inline(always)]
fn count<const CL: bool>(c: &Cpu, f: &Fast) -> u64 {
    if CL {
        c.st.gpr[1] & 0xff
    } else {
        f.imm
    }
}

extern "sysv64-unwind" fn shift_r<const OP: u8, const CL: bool, const B: u32>(
    c: &mut Cpu,
    f: &Fast,
) -> Done {
    let n = count::<CL>(c, f);
    let (res, fl) = alu::shift_inline(shift_op(OP), get::<B>(c, f.r0), n, c.st.rflags, B);
    set::<B>(c, f.r0, res);
    c.set_status(fl);
    Ok(())
}

extern "sysv64-unwind" fn shift_m<const OP: u8, const CL: bool, const B: u32>(
    c: &mut Cpu,
    f: &Fast,
) -> Done {
    let n = count::<CL>(c, f);
    let fl = c.st.rflags;
    let op = shift_op(OP);
    let old = rmw_mem::<B>(c, f, |a| alu::shift_inline(op, a, n, fl, B).0)?;
    c.set_status(alu::shift_inline(op, old, n, fl, B).1);
    Ok(())
}

/// IMUL r, r/m (and r, r/m, imm): the low half, CF = OF = "the result was truncated".
#[inline(always)]
fn imul_set<const B: u32>(c: &mut Cpu, f: &Fast, a: u64, b: u64) {
    let (res, fl) = alu::imul(a, b, B);
    c.set_status(fl);
    set::<B>(c, f.r0, res);
}

extern "sysv64-unwind" fn imul_rr<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let (a, b) = (get::<B>(c, f.r0), get::<B>(c, f.r1));
    imul_set::<B>(c, f, a, b);
    Ok(())
}

extern "sysv64-unwind" fn imul_rm<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let b = read_mem::<B>(c, f)?;
    let a = get::<B>(c, f.r0);
    imul_set::<B>(c, f, a, b);
    Ok(())
}

extern "sysv64-unwind" fn imul_rri<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let a = get::<B>(c, f.r1);
    imul_set::<B>(c, f, a, f.imm);
    Ok(())
}

extern "sysv64-unwind" fn imul_rmi<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let a = read_mem::<B>(c, f)?;
    imul_set::<B>(c, f, a, f.imm);
    Ok(())
}

extern "sysv64-unwind" fn mov_rr<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let v = get::<B>(c, f.r1);
    set::<B>(c, f.r0, v);
    Ok(())
}

extern "sysv64-unwind" fn mov_ri<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    set::<B>(c, f.r0, f.imm);
    Ok(())
}

extern "sysv64-unwind" fn mov_rm<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let v = read_mem::<B>(c, f)?;
    set::<B>(c, f.r0, v);
    Ok(())
}

extern "sysv64-unwind" fn mov_mr<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let v = get::<B>(c, f.r1);
    done(write_mem::<B>(c, f, v))
}

extern "sysv64-unwind" fn mov_mi<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    done(write_mem::<B>(c, f, f.imm))
}

extern "sysv64-unwind" fn lea<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let a = ea(c, f);
    set::<B>(c, f.r0, a);
    Ok(())
}

/// MOVZX / MOVSX / MOVSXD from a `S`-bit register (`MEM` false) or memory to a `D`-bit one.
extern "sysv64-unwind" fn movx<const SIGNED: bool, const MEM: bool, const D: u32, const S: u32>(
    c: &mut Cpu,
    f: &Fast,
) -> Done {
    let v = if MEM {
        read_mem::<S>(c, f)?
    } else {
        get::<S>(c, f.r1)
    };
    let v = if SIGNED { sext(v, S) } else { v };
    set::<D>(c, f.r0, v);
    Ok(())
}

extern "sysv64-unwind" fn push_r<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let v = get::<B>(c, f.r0);
    done(c.push(v, B / 8))
}

extern "sysv64-unwind" fn push_i(c: &mut Cpu, f: &Fast) -> Done {
    done(c.push(f.imm, f.size as u32))
}

extern "sysv64-unwind" fn pop_r<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let v = c.pop(B / 8)?;
    set::<B>(c, f.r0, v);
    Ok(())
}

extern "sysv64-unwind" fn jcc<const CC: u32>(c: &mut Cpu, f: &Fast) -> Done {
    if cond(CC, c.st.rflags) {
        c.jump_near(f.imm)?;
    }
    Ok(())
}

extern "sysv64-unwind" fn jmp(c: &mut Cpu, f: &Fast) -> Done {
    done(c.jump_near(f.imm))
}

extern "sysv64-unwind" fn jmp_r<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let t = get::<B>(c, f.r0);
    done(c.jump_near(t))
}

extern "sysv64-unwind" fn jmp_m<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let t = read_mem::<B>(c, f)?;
    done(c.jump_near(t))
}

extern "sysv64-unwind" fn call(c: &mut Cpu, f: &Fast) -> Done {
    done(c.call_near(f.imm, f.size as u32))
}

extern "sysv64-unwind" fn call_r<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let t = get::<B>(c, f.r0);
    done(c.call_near(t, B / 8))
}

extern "sysv64-unwind" fn call_m<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let t = read_mem::<B>(c, f)?;
    done(c.call_near(t, B / 8))
}

/// RET / RET imm16 (`imm` bytes released after the pop).
extern "sysv64-unwind" fn ret<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let sb = c.st.stack_bits();
    let sp = c.st.gpr[4];
    let t = c.pop(B / 8)? & mask(B);
    if let Err(e) = c.jump_near(t) {
        c.set_sp(sp, sb);
        return Err(Box::new(e));
    }
    if f.imm != 0 {
        let nsp = c.st.gpr[4].wrapping_add(f.imm);
        c.set_sp(nsp, sb);
    }
    Ok(())
}

extern "sysv64-unwind" fn setcc_r<const CC: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let v = cond(CC, c.st.rflags) as u64;
    set::<8>(c, f.r0, v);
    Ok(())
}

extern "sysv64-unwind" fn setcc_m<const CC: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let v = cond(CC, c.st.rflags) as u64;
    done(write_mem::<8>(c, f, v))
}

/// CMOVcc: the source is read (and may fault) whatever the condition; a 32-bit destination
/// is zero-extended either way.
extern "sysv64-unwind" fn cmov<const CC: u32, const MEM: bool, const B: u32>(
    c: &mut Cpu,
    f: &Fast,
) -> Done {
    let v = if MEM {
        read_mem::<B>(c, f)?
    } else {
        get::<B>(c, f.r1)
    };
    let v = if cond(CC, c.st.rflags) {
        v
    } else {
        get::<B>(c, f.r0)
    };
    set::<B>(c, f.r0, v);
    Ok(())
}

extern "sysv64-unwind" fn nop(_: &mut Cpu, _: &Fast) -> Done {
    Ok(())
}

/// TEST of AH, CH, DH or BH (the second byte of register `r0`) with an immediate.
extern "sysv64-unwind" fn test_hi_ri(c: &mut Cpu, f: &Fast) -> Done {
    let a = (c.st.gpr[f.r0 as usize & 3] >> 8) & 0xff;
    let (_, fl) = alu::alu(AluOp::Test, a, f.imm, c.st.rflags, 8);
    c.set_status(fl);
    Ok(())
}

/// MOV of segment register `sub`'s selector into a register (zero-extended to 32 and 64 bits).
extern "sysv64-unwind" fn mov_r_sreg<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let v = u64::from(c.st.seg[f.sub as usize].selector);
    set::<B>(c, f.r0, v);
    Ok(())
}

/// PAUSE: a spin-wait hint.
extern "sysv64-unwind" fn pause(_: &mut Cpu, _: &Fast) -> Done {
    std::hint::spin_loop();
    Ok(())
}

/// NOT (`NEG` false) or NEG of a register.
extern "sysv64-unwind" fn negnot_r<const NEG: bool, const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let a = get::<B>(c, f.r0);
    if NEG {
        let (res, fl) = alu::sub(0, a, false, B);
        set::<B>(c, f.r0, res);
        c.set_status(fl);
    } else {
        set::<B>(c, f.r0, !a & mask(B));
    }
    Ok(())
}

/// NOT or NEG of memory.
extern "sysv64-unwind" fn negnot_m<const NEG: bool, const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    if NEG {
        let old = rmw_mem::<B>(c, f, |a| alu::sub(0, a, false, B).0)?;
        c.set_status(alu::sub(0, old, false, B).1);
    } else {
        rmw_mem::<B>(c, f, |a| !a & mask(B))?;
    }
    Ok(())
}

/// BSWAP of a 32- or 64-bit register.
extern "sysv64-unwind" fn bswap_r<const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let v = alu::bswap(get::<B>(c, f.r0), B);
    set::<B>(c, f.r0, v);
    Ok(())
}

/// CBW CWDE CDQE CWD CDQ CQO (`Cpu::sign_extend_acc`'s `op`).
extern "sysv64-unwind" fn cext<const OP: u8>(c: &mut Cpu, _: &Fast) -> Done {
    c.sign_extend_acc(OP);
    Ok(())
}

/// BT BTS BTR BTC (`OP` 0-3) of a register by a register (`IMM` false) or an immediate bit
/// offset (taken modulo the width): CF is the bit; no other flag changes.
extern "sysv64-unwind" fn bt_r<const OP: u8, const IMM: bool, const B: u32>(
    c: &mut Cpu,
    f: &Fast,
) -> Done {
    let off = if IMM { f.imm } else { get::<B>(c, f.r1) };
    let m = 1u64 << (off & (B as u64 - 1));
    let old = get::<B>(c, f.r0);
    match OP {
        0 => {}
        1 => set::<B>(c, f.r0, old | m),
        2 => set::<B>(c, f.r0, old & !m),
        _ => set::<B>(c, f.r0, old ^ m),
    }
    c.set_status_cf(old & m != 0);
    Ok(())
}

/// BT BTS BTR BTC of memory by an immediate bit offset (modulo the width: an immediate never
/// addresses beyond the operand).
extern "sysv64-unwind" fn bt_m<const OP: u8, const B: u32>(c: &mut Cpu, f: &Fast) -> Done {
    let m = 1u64 << (f.imm & (B as u64 - 1));
    let old = match OP {
        0 => read_mem::<B>(c, f)?,
        1 => rmw_mem::<B>(c, f, |v| v | m)?,
        2 => rmw_mem::<B>(c, f, |v| v & !m)?,
        _ => rmw_mem::<B>(c, f, |v| v ^ m)?,
    };
    c.set_status_cf(old & m != 0);
    Ok(())
}

/// PUSHFQ (64-bit mode): RFLAGS without VM and RF.
extern "sysv64-unwind" fn pushfq(c: &mut Cpu, _: &Fast) -> Done {
    c.push(c.pushed_flags(), 8)?;
    Ok(())
}

// ------------------------------------------------------------------ selection

macro_rules! sized {
    ($f:ident, $bits:expr $(, $c:tt)*) => {
        match $bits {
            8 => $f::<$($c,)* 8> as Handler,
            16 => $f::<$($c,)* 16> as Handler,
            32 => $f::<$($c,)* 32> as Handler,
            _ => $f::<$($c,)* 64> as Handler,
        }
    };
}

macro_rules! sized_wide {
    ($f:ident, $bits:expr $(, $c:tt)*) => {
        match $bits {
            16 => $f::<$($c,)* 16> as Handler,
            32 => $f::<$($c,)* 32> as Handler,
            _ => $f::<$($c,)* 64> as Handler,
        }
    };
}

macro_rules! by_alu_op {
    ($f:ident, $op:expr, $bits:expr) => {
        match $op {
            0 => sized!($f, $bits, 0),
            1 => sized!($f, $bits, 1),
            2 => sized!($f, $bits, 2),
            3 => sized!($f, $bits, 3),
            4 => sized!($f, $bits, 4),
            5 => sized!($f, $bits, 5),
            6 => sized!($f, $bits, 6),
            7 => sized!($f, $bits, 7),
            _ => sized!($f, $bits, 8),
        }
    };
}

macro_rules! by_shift_op {
    ($f:ident, $op:expr, $cl:tt, $bits:expr) => {
        match $op {
            0 => sized!($f, $bits, 0, $cl),
            1 => sized!($f, $bits, 1, $cl),
            2 => sized!($f, $bits, 2, $cl),
            3 => sized!($f, $bits, 3, $cl),
            _ => sized!($f, $bits, 4, $cl),
        }
    };
}

macro_rules! by_cc {
    ($cc:expr, |$k:ident| $e:expr) => {
        match $cc {
            0 => {
                const $k: u32 = 0;
                $e
            }
            1 => {
                const $k: u32 = 1;
                $e
            }
            2 => {
                const $k: u32 = 2;
                $e
            }
            3 => {
                const $k: u32 = 3;
                $e
            }
            4 => {
                const $k: u32 = 4;
                $e
            }
            5 => {
                const $k: u32 = 5;
                $e
            }
            6 => {
                const $k: u32 = 6;
                $e
            }
            7 => {
                const $k: u32 = 7;
                $e
            }
            8 => {
                const $k: u32 = 8;
                $e
            }
            9 => {
                const $k: u32 = 9;
                $e
            }
            10 => {
                const $k: u32 = 10;
                $e
            }
            11 => {
                const $k: u32 = 11;
                $e
            }
            12 => {
                const $k: u32 = 12;
                $e
            }
            13 => {
                const $k: u32 = 13;
                $e
            }
            14 => {
                const $k: u32 = 14;
                $e
            }
            _ => {
                const $k: u32 = 15;
                $e
            }
        }
    };
}

/// GPR index and width of a general-purpose register; None for high-byte registers (AH..BH)
/// and everything else.
fn gpr(r: Register) -> Option<(u8, u32)> {
    let n = r as usize;
    let (i, bits) = match n {
        1..=4 => (n - 1, 8),
        9..=20 => (n - 5, 8),
        21..=36 => (n - 21, 16),
        37..=52 => (n - 37, 32),
        53..=68 => (n - 53, 64),
        _ => return None,
    };
    Some((i as u8, bits))
}

/// Fill in the memory operand of `ins` (which must be `bits` wide when `bits` is given);
/// false when it is one the handlers do not take.
fn memory(ins: &Instruction, f: &mut Fast, code_bits: u32) -> bool {
    let base = ins.memory_base();
    let index = ins.memory_index();
    let asz = super::addr_bits(ins, || code_bits);
    f.addr_mask = mask(asz);
    f.disp = ins.memory_displacement64();
    if base != Register::None && base != Register::RIP && base != Register::EIP {
        match gpr(base) {
            // A base narrower than the address would be masked to its own width first.
            Some((i, w)) if w >= asz => {
                f.base = i;
                f.base_mask = u64::MAX;
            }
            _ => return false,
        }
    }
    if index != Register::None {
        match gpr(index) {
            Some((i, w)) if w >= asz => {
                f.index = i;
                f.index_mask = u64::MAX;
                f.scale = ins.memory_index_scale().trailing_zeros() as u8;
            }
            _ => return false,
        }
    }
    f.seg = seg_index(ins.memory_segment()) as u8;
    true
}

/// Width of the memory operand in bits.
fn mem_bits(ins: &Instruction) -> u32 {
    ins.memory_size().size() as u32 * 8
}

fn is_imm(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

/// Operand `i`'s shape: a GPR (index, width), memory, or an immediate.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Reg(u8, u32),
    Mem,
    Imm,
    Other,
}

fn shape(ins: &Instruction, i: u32) -> Shape {
    match ins.op_kind(i) {
        OpKind::Register => match gpr(ins.op_register(i)) {
            Some((r, b)) => Shape::Reg(r, b),
            None => Shape::Other,
        },
        OpKind::Memory => Shape::Mem,
        k if is_imm(k) => Shape::Imm,
        _ => Shape::Other,
    }
}

/// The decode-time form of `ins`, decoded as `code_bits`-bit code.
pub(crate) fn compile(ins: &Instruction, code_bits: u32) -> Fast {
    let next_rip = ins.next_ip() & mask(code_bits);
    let mut f = Fast {
        next_rip,
        ..Fast::NONE
    };
    f.handler = select(ins, &mut f, code_bits);
    if f.handler.is_none() {
        // Nothing `select` filled in stays.
        f = Fast {
            next_rip,
            ..Fast::NONE
        };
        if let Some(ends) = in_block(ins) {
            f.handler = Some(generic);
            f.form = Form::Generic;
            f.imm = ins.ip();
            f.sub = ends as u8;
        }
    }
    f
}

/// Whether the generic `exec` may run `ins` inside a translated block, as a handler
/// (`generic`): it transfers no control, and changes neither TF/RF, the interrupt shadow,
/// NMI blocking, HLT, port I/O, the CPU mode, segment, control or debug registers, nor the
/// TLB, and IF only from 1 to 0 (CLI: no interrupt window opens), which is what the block
/// protocol lets a handler change (`vcpu.rs` `run_block`). Some(true): it must end its block:
/// a REP string instruction (it runs a chunk of its iterations and may leave RIP on itself).
/// (RDTSC/RDTSCP stay in their block: when an interrupt is due before the time is read they
/// end it as a fault does, `Fault::InterruptFirst`.) None: it stays with the dispatch loop.
fn in_block(ins: &Instruction) -> Option<bool> {
    use Mnemonic as M;
    for i in 0..ins.op_count() {
        if ins.op_kind(i) == OpKind::Register {
            let r = ins.op_register(i);
            if r.is_segment_register() || r.is_cr() || r.is_dr() || r.is_tr() {
                return None;
            }
        }
    }
    let string = matches!(ins.mnemonic(), memory_string_mnemonics!());
    // MOVSD and CMPSD are also SSE2 instructions (with XMM operands).
    if string && ins.op_count() > 0 && ins.op_kind(0) != OpKind::Register {
        return Some(ins.has_rep_prefix() || ins.has_repe_prefix() || ins.has_repne_prefix());
    }
    let plain = matches!(
        ins.mnemonic(),
        M::Add
            | M::Or
            | M::Adc
            | M::Sbb
            | M::And
            | M::Sub
            | M::Xor
            | M::Cmp
            | M::Test
            | M::Mov
            | M::Movzx
            | M::Movsx
            | M::Movsxd
            | M::Lea
            | M::Inc
            | M::Dec
            | M::Neg
            | M::Not
            | M::Rol
            | M::Ror
            | M::Rcl
            | M::Rcr
            | M::Shl
            | M::Shr
            | M::Sar
            | M::Shld
            | M::Shrd
            | M::Mul
            | M::Imul
            | M::Div
            | M::Idiv
            | M::Xchg
            | M::Xadd
            | M::Cmpxchg
            | M::Cmpxchg8b
            | M::Cmpxchg16b
            | M::Bt
            | M::Bts
            | M::Btr
            | M::Btc
            | M::Bsf
            | M::Bsr
            | M::Tzcnt
            | M::Lzcnt
            | M::Popcnt
            | M::Bswap
            | M::Push
            | M::Pop
            | M::Leave
            | M::Sahf
            | M::Lahf
            | M::Clc
            | M::Stc
            | M::Cmc
            | M::Cld
            | M::Std
            | M::Cli
            | M::Rdtsc
            | M::Rdtscp
            | M::Lfence
            | M::Mfence
            | M::Sfence
            | M::Prefetcht0
            | M::Prefetcht1
            | M::Prefetcht2
            | M::Prefetchnta
            | M::Prefetchw
            | cmovcc_mnemonics!()
            | setcc_mnemonics!()
    );
    // SSE integer and floating-point forms: XMM registers, MXCSR and memory only.
    let sse = !plain
        && ins.cpuid_features().iter().all(|f| {
            matches!(
                f,
                iced_x86::CpuidFeature::SSE
                    | iced_x86::CpuidFeature::SSE2
                    | iced_x86::CpuidFeature::SSE3
                    | iced_x86::CpuidFeature::SSSE3
                    | iced_x86::CpuidFeature::SSE4_1
                    | iced_x86::CpuidFeature::SSE4_2
            )
        })
        && (0..ins.op_count())
            .any(|i| ins.op_kind(i) == OpKind::Register && ins.op_register(i).is_xmm());
    (plain || sse).then_some(false)
}

/// An instruction of `Form::Generic`: the generic `exec` on it, fetched again from the
/// decoded cache at its RIP (the block's bytes are still good, so these are its bytes). Keeps
/// the block protocol: only an instruction that ends its block leaves its `next_rip`.
extern "sysv64-unwind" fn generic(c: &mut Cpu, f: &Fast) -> Done {
    let ends = f.sub as u64;
    c.st.rip = f.imm;
    let d = c.fetch_decode().map_err(Box::new)?;
    // SAFETY: `d` points into the decoded cache's heap buffer, valid until the next
    // `fetch_decode`; the instruction is copied out at once.
    let ins = unsafe { (*d).ins };
    generic_decoded(c, &ins, ends)
}

/// `generic` with the instruction at hand (compiled code keeps a copy of it: `crate::jit`);
/// `ends`: 1 when it ends its block.
pub(crate) extern "sysv64-unwind" fn generic_decoded(
    c: &mut Cpu,
    ins: &Instruction,
    ends: u64,
) -> Done {
    let block_next = c.next_rip;
    c.st.rip = ins.ip();
    done(c.exec(ins))?;
    c.stats.generic += 1;
    if ends == 0 {
        c.next_rip = block_next;
    }
    Ok(())
}

fn select(ins: &Instruction, f: &mut Fast, code_bits: u32) -> Option<Handler> {
    use Mnemonic as M;
    if ins.has_lock_prefix() {
        return None;
    }
    let n = ins.op_count();
    let s0 = if n > 0 { shape(ins, 0) } else { Shape::Other };
    let s1 = if n > 1 { shape(ins, 1) } else { Shape::Other };
    // Memory operands: resolved once here; a form the handlers cannot address goes generic.
    if (s0 == Shape::Mem || s1 == Shape::Mem || n > 2 && shape(ins, 2) == Shape::Mem)
        && !memory(ins, f, code_bits)
    {
        return None;
    }
    // Destination (or only operand) register and width; memory operands' width must be one of
    // 8/16/32/64 as well.
    let bits = match s0 {
        Shape::Reg(r, b) => {
            f.r0 = r;
            b
        }
        Shape::Mem => mem_bits(ins),
        _ => 0,
    };
    if let Shape::Reg(r, _) = s1 {
        f.r1 = r;
    }
    let sized_ok = matches!(bits, 8 | 16 | 32 | 64);
    let mn = ins.mnemonic();
    let high = |r: Register| matches!(r, Register::AH | Register::CH | Register::DH | Register::BH);
    let h = match mn {
        M::Test if n == 2 && s1 == Shape::Imm && high(ins.op0_register()) => {
            // AH CH DH BH: the second byte of RAX RCX RDX RBX.
            f.r0 = ins.op0_register() as u8 - Register::AH as u8;
            f.imm = ins.immediate(1) & 0xff;
            (f.form, f.bits) = (Form::TestHiRI, 8);
            test_hi_ri as Handler
        }
        M::Mov
            if n == 2
                && matches!(s0, Shape::Reg(..))
                && matches!(bits, 16 | 32 | 64)
                && ins.op1_kind() == OpKind::Register
                && ins.op1_register().is_segment_register() =>
        {
            f.sub = seg_index(ins.op1_register()) as u8;
            sized_wide!(mov_r_sreg, bits)
        }
        M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor | M::Cmp | M::Test => {
            if !sized_ok || n != 2 {
                return None;
            }
            let op = match mn {
                M::Add => 0,
                M::Or => 1,
                M::Adc => 2,
                M::Sbb => 3,
                M::And => 4,
                M::Sub => 5,
                M::Xor => 6,
                M::Cmp => 7,
                _ => 8,
            };
            f.sub = op;
            f.bits = bits as u8;
            match (s0, s1) {
                (Shape::Reg(_, b0), Shape::Reg(_, b1)) if b0 == b1 => {
                    f.form = Form::AluRR;
                    by_alu_op!(alu_rr, op, bits)
                }
                (Shape::Reg(..), Shape::Imm) => {
                    f.imm = ins.immediate(1) & mask(bits);
                    f.form = Form::AluRI;
                    by_alu_op!(alu_ri, op, bits)
                }
                (Shape::Reg(..), Shape::Mem) if mem_bits(ins) == bits => {
                    f.form = Form::AluRM;
                    by_alu_op!(alu_rm, op, bits)
                }
                (Shape::Mem, Shape::Reg(_, b1)) if b1 == bits => {
                    f.form = Form::AluMR;
                    by_alu_op!(alu_mr, op, bits)
                }
                (Shape::Mem, Shape::Imm) => {
                    f.imm = ins.immediate(1) & mask(bits);
                    f.form = Form::AluMI;
                    by_alu_op!(alu_mi, op, bits)
                }
                _ => return None,
            }
        }
        M::Inc | M::Dec if sized_ok && n == 1 => match (s0, mn == M::Dec) {
            (Shape::Reg(..), dec) => {
                (f.form, f.sub, f.bits) = (Form::IncDecR, dec as u8, bits as u8);
                if dec {
                    sized!(incdec_r, bits, true)
                } else {
                    sized!(incdec_r, bits, false)
                }
            }
            (Shape::Mem, false) => sized!(incdec_m, bits, false),
            (Shape::Mem, true) => sized!(incdec_m, bits, true),
            _ => return None,
        },
        M::Rol | M::Ror | M::Shl | M::Sal | M::Shr | M::Sar if sized_ok && n == 2 => {
            let op = match mn {
                M::Rol => 0,
                M::Ror => 1,
                M::Shr => 3,
                M::Sar => 4,
                _ => 2,
            };
            let cl = match s1 {
                Shape::Imm => {
                    f.imm = ins.immediate(1);
                    false
                }
                _ if ins.op1_kind() == OpKind::Register && ins.op1_register() == Register::CL => {
                    true
                }
                _ => return None,
            };
            match (s0, cl) {
                (Shape::Reg(..), false) => {
                    (f.form, f.sub, f.bits) = (Form::ShiftRI, op, bits as u8);
                    by_shift_op!(shift_r, op, false, bits)
                }
                (Shape::Reg(..), true) => {
                    (f.form, f.sub, f.bits) = (Form::ShiftRC, op, bits as u8);
                    by_shift_op!(shift_r, op, true, bits)
                }
                (Shape::Mem, false) => by_shift_op!(shift_m, op, false, bits),
                (Shape::Mem, true) => by_shift_op!(shift_m, op, true, bits),
                _ => return None,
            }
        }
        M::Imul if n >= 2 && matches!(bits, 16 | 32 | 64) => {
            let Shape::Reg(..) = s0 else { return None };
            if n == 3 {
                f.imm = ins.immediate(2) & mask(bits);
                match s1 {
                    Shape::Reg(_, b) if b == bits => sized_wide!(imul_rri, bits),
                    Shape::Mem if mem_bits(ins) == bits => sized_wide!(imul_rmi, bits),
                    _ => return None,
                }
            } else {
                match s1 {
                    Shape::Reg(_, b) if b == bits => {
                        (f.form, f.bits) = (Form::ImulRR, bits as u8);
                        sized_wide!(imul_rr, bits)
                    }
                    Shape::Mem if mem_bits(ins) == bits => sized_wide!(imul_rm, bits),
                    _ => return None,
                }
            }
        }
        M::Mov if sized_ok && n == 2 => {
            f.bits = bits as u8;
            match (s0, s1) {
                (Shape::Reg(_, b0), Shape::Reg(_, b1)) if b0 == b1 => {
                    f.form = Form::MovRR;
                    sized!(mov_rr, bits)
                }
                (Shape::Reg(..), Shape::Imm) => {
                    f.imm = ins.immediate(1) & mask(bits);
                    f.form = Form::MovRI;
                    sized!(mov_ri, bits)
                }
                (Shape::Reg(..), Shape::Mem) if mem_bits(ins) == bits => {
                    f.form = Form::MovRM;
                    sized!(mov_rm, bits)
                }
                (Shape::Mem, Shape::Reg(_, b1)) if b1 == bits => {
                    f.form = Form::MovMR;
                    sized!(mov_mr, bits)
                }
                (Shape::Mem, Shape::Imm) => {
                    f.imm = ins.immediate(1) & mask(bits);
                    f.form = Form::MovMI;
                    sized!(mov_mi, bits)
                }
                _ => return None,
            }
        }
        M::Lea if matches!(bits, 16 | 32 | 64) && s1 == Shape::Mem => {
            (f.form, f.bits) = (Form::Lea, bits as u8);
            sized_wide!(lea, bits)
        }
        M::Movzx | M::Movsx | M::Movsxd if matches!(bits, 16 | 32 | 64) && n == 2 => {
            let sb = match s1 {
                Shape::Reg(_, b) => b,
                Shape::Mem => mem_bits(ins),
                _ => return None,
            };
            let mem = s1 == Shape::Mem;
            let signed = mn != M::Movzx;
            macro_rules! movx_src {
                ($sg:tt, $m:tt, $d:tt) => {
                    match sb {
                        8 => movx::<$sg, $m, $d, 8> as Handler,
                        16 => movx::<$sg, $m, $d, 16> as Handler,
                        32 => movx::<$sg, $m, $d, 32> as Handler,
                        _ => return None,
                    }
                };
            }
            macro_rules! movx_dst {
                ($sg:tt, $m:tt) => {
                    match bits {
                        16 => movx_src!($sg, $m, 16),
                        32 => movx_src!($sg, $m, 32),
                        _ => movx_src!($sg, $m, 64),
                    }
                };
            }
            if sb > bits {
                return None;
            }
            f.form = if mem { Form::MovxM } else { Form::MovxR };
            (f.sub, f.bits, f.src_bits) = (signed as u8, bits as u8, sb as u8);
            match (signed, mem) {
                (false, false) => movx_dst!(false, false),
                (false, true) => movx_dst!(false, true),
                (true, false) => movx_dst!(true, false),
                (true, true) => movx_dst!(true, true),
            }
        }
        M::Push if n == 1 => {
            let size = (-ins.stack_pointer_increment()) as u32;
            match s0 {
                Shape::Reg(_, b) if b == size * 8 && matches!(b, 16 | 32 | 64) => {
                    (f.form, f.bits) = (Form::PushR, b as u8);
                    sized_wide!(push_r, b)
                }
                Shape::Imm if matches!(size, 2 | 4 | 8) => {
                    let ib = match ins.op0_kind() {
                        OpKind::Immediate8 => 8,
                        OpKind::Immediate16 | OpKind::Immediate8to16 => 16,
                        OpKind::Immediate32 | OpKind::Immediate8to32 => 32,
                        _ => 64,
                    };
                    f.imm = ins.immediate(0) & mask(ib);
                    f.size = size as u8;
                    push_i as Handler
                }
                _ => return None,
            }
        }
        M::Pop if n == 1 => {
            let size = ins.stack_pointer_increment() as u32;
            match s0 {
                Shape::Reg(_, b) if b == size * 8 && matches!(b, 16 | 32 | 64) => {
                    (f.form, f.bits) = (Form::PopR, b as u8);
                    sized_wide!(pop_r, b)
                }
                _ => return None,
            }
        }
        jcc_mnemonics!() => {
            f.imm = ins.near_branch_target();
            let cc = ins.condition_code() as u32 - 1;
            (f.form, f.sub) = (Form::Jcc, cc as u8);
            by_cc!(cc, |CC| jcc::<CC> as Handler)
        }
        M::Jmp | M::Call if n == 1 => {
            let near = match ins.op0_kind() {
                OpKind::NearBranch16 => 2,
                OpKind::NearBranch32 => 4,
                OpKind::NearBranch64 => 8,
                _ => 0,
            };
            let is_call = mn == M::Call;
            if near != 0 {
                f.imm = ins.near_branch_target();
                f.size = near;
                if is_call {
                    f.form = Form::Call;
                    call as Handler
                } else {
                    f.form = Form::Jmp;
                    jmp as Handler
                }
            } else {
                // Indirect near (far forms have 32/48/80-bit memory operands or go generic).
                if super::control::is_far(ins) || !matches!(bits, 16 | 32 | 64) {
                    return None;
                }
                f.form = Form::Indirect;
                match (s0, is_call) {
                    (Shape::Reg(..), false) => sized_wide!(jmp_r, bits),
                    (Shape::Reg(..), true) => sized_wide!(call_r, bits),
                    (Shape::Mem, false) => sized_wide!(jmp_m, bits),
                    (Shape::Mem, true) => sized_wide!(call_m, bits),
                    _ => return None,
                }
            }
        }
        M::Ret => {
            f.imm = if n > 0 { ins.immediate16() as u64 } else { 0 };
            f.form = Form::Ret;
            match ins.code() {
                Code::Retnw | Code::Retnw_imm16 => {
                    f.bits = 16;
                    ret::<16> as Handler
                }
                Code::Retnd | Code::Retnd_imm16 => {
                    f.bits = 32;
                    ret::<32> as Handler
                }
                _ => {
                    f.bits = 64;
                    ret::<64> as Handler
                }
            }
        }
        setcc_mnemonics!() if bits == 8 => {
            let cc = ins.condition_code() as u32 - 1;
            f.sub = cc as u8;
            match s0 {
                Shape::Reg(..) => {
                    f.form = Form::SetccR;
                    by_cc!(cc, |CC| setcc_r::<CC> as Handler)
                }
                Shape::Mem => by_cc!(cc, |CC| setcc_m::<CC> as Handler),
                _ => return None,
            }
        }
        cmovcc_mnemonics!() if matches!(bits, 16 | 32 | 64) => {
            let cc = ins.condition_code() as u32 - 1;
            (f.sub, f.bits) = (cc as u8, bits as u8);
            match s1 {
                Shape::Reg(_, b) if b == bits => {
                    f.form = Form::CmovRR;
                    by_cc!(cc, |CC| sized_wide!(cmov, bits, CC, false))
                }
                Shape::Mem if mem_bits(ins) == bits => {
                    by_cc!(cc, |CC| sized_wide!(cmov, bits, CC, true))
                }
                _ => return None,
            }
        }
        M::Not | M::Neg if sized_ok && n == 1 => {
            let neg = mn == M::Neg;
            match s0 {
                Shape::Reg(..) => {
                    (f.form, f.sub, f.bits) = (Form::NegNotR, neg as u8, bits as u8);
                    if neg {
                        sized!(negnot_r, bits, true)
                    } else {
                        sized!(negnot_r, bits, false)
                    }
                }
                _ if neg => sized!(negnot_m, bits, true),
                _ => sized!(negnot_m, bits, false),
            }
        }
        M::Bswap if matches!((s0, bits), (Shape::Reg(..), 32 | 64)) => {
            (f.form, f.bits) = (Form::BswapR, bits as u8);
            if bits == 64 {
                bswap_r::<64> as Handler
            } else {
                bswap_r::<32> as Handler
            }
        }
        M::Cbw | M::Cwde | M::Cdqe | M::Cwd | M::Cdq | M::Cqo => {
            let op = match mn {
                M::Cbw => 0,
                M::Cwde => 1,
                M::Cdqe => 2,
                M::Cwd => 3,
                M::Cdq => 4,
                _ => 5,
            };
            (f.form, f.sub) = (Form::Cext, op);
            match op {
                0 => cext::<0> as Handler,
                1 => cext::<1>,
                2 => cext::<2>,
                3 => cext::<3>,
                4 => cext::<4>,
                _ => cext::<5>,
            }
        }
        M::Bt | M::Bts | M::Btr | M::Btc if matches!(bits, 16 | 32 | 64) && n == 2 => {
            let op = match mn {
                M::Bt => 0,
                M::Bts => 1,
                M::Btr => 2,
                _ => 3,
            };
            macro_rules! by_bt_op {
                ($f:ident $(, $c:tt)*) => {
                    match op {
                        0 => sized_wide!($f, bits, 0 $(, $c)*),
                        1 => sized_wide!($f, bits, 1 $(, $c)*),
                        2 => sized_wide!($f, bits, 2 $(, $c)*),
                        _ => sized_wide!($f, bits, 3 $(, $c)*),
                    }
                };
            }
            match (s0, s1) {
                (Shape::Reg(..), Shape::Reg(_, b1)) if b1 == bits => by_bt_op!(bt_r, false),
                (Shape::Reg(..), Shape::Imm) => {
                    f.imm = ins.immediate(1);
                    by_bt_op!(bt_r, true)
                }
                (Shape::Mem, Shape::Imm) => {
                    f.imm = ins.immediate(1);
                    by_bt_op!(bt_m)
                }
                _ => return None,
            }
        }
        M::Pushfq if code_bits == 64 && ins.stack_pointer_increment() == -8 => pushfq as Handler,
        M::Pause => pause as Handler,
        M::Nop
        | M::Endbr64
        | M::Endbr32
        | M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Prefetchw
        | M::Lfence
        | M::Sfence => {
            f.form = Form::Nop;
            nop as Handler
        }
        _ => return None,
    };
    Some(h)
}
