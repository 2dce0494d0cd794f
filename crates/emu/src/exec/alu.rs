//! Integer arithmetic with exact x86 flag results. Sizes are in bits (8, 16, 32, 64).
//! Every function is total: any inputs give a result, never a panic.

use crate::state::flags::{AF, CF, OF, PF, SF, STATUS as STATUS_BITS, ZF};

/// All-ones mask of `bits` width.
#[inline]
pub fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// The sign bit of `bits` width.
#[inline]
pub fn sign(bits: u32) -> u64 {
    1u64 << (bits.clamp(1, 64) - 1)
}

/// BSWAP of a `bits`-wide value (32 or 64; a 16-bit BSWAP is undefined: 0 here).
#[inline(always)]
pub(crate) fn bswap(v: u64, bits: u32) -> u64 {
    match bits {
        64 => v.swap_bytes(),
        32 => u64::from((v as u32).swap_bytes()),
        _ => 0,
    }
}

/// Sign-extend the low `bits` of `v` to 64 bits.
#[inline]
pub fn sext(v: u64, bits: u32) -> u64 {
    if bits == 0 {
        0
    } else if bits >= 64 {
        v
    } else {
        let s = 64 - bits;
        (((v << s) as i64) >> s) as u64
    }
}

/// INC (DEC when `dec`): the result and the flags ADD/SUB of 1 would set (the caller keeps
/// CF, which INC and DEC leave alone).
#[inline(always)]
pub fn inc_dec(v: u64, dec: bool, bits: u32) -> (u64, u64) {
    if dec {
        sub(v, 1, false, bits)
    } else {
        add(v, 1, false, bits)
    }
}

/// Two- and three-operand IMUL: the low `bits` of the signed product, and its status flags
/// (SF, ZF, PF of that result; CF = OF = "the product was truncated").
#[inline(always)]
pub fn imul(a: u64, b: u64, bits: u32) -> (u64, u64) {
    let full = (sext(a, bits) as i64 as i128) * (sext(b, bits) as i64 as i128);
    let res = (full as u64) & mask(bits);
    let mut f = szp(res, bits);
    if full != sext(res, bits) as i64 as i128 {
        f |= CF | OF;
    }
    (res, f)
}

/// SF, ZF and PF for a result.
#[inline(always)]
pub fn szp(res: u64, bits: u32) -> u64 {
    let r = res & mask(bits);
    let mut f = 0;
    if r == 0 {
        f |= ZF;
    }
    if r & sign(bits) != 0 {
        f |= SF;
    }
    if (r as u8).count_ones() & 1 == 0 {
        f |= PF;
    }
    f
}

/// a + b + c.
#[inline(always)]
pub fn add(a: u64, b: u64, c: bool, bits: u32) -> (u64, u64) {
    let m = mask(bits);
    let (a, b) = (a & m, b & m);
    let res = a.wrapping_add(b).wrapping_add(c as u64) & m;
    let mut f = szp(res, bits);
    let carry = if c { res <= a } else { res < a };
    if carry {
        f |= CF;
    }
    if (a ^ res) & (b ^ res) & sign(bits) != 0 {
        f |= OF;
    }
    if (a ^ b ^ res) & 0x10 != 0 {
        f |= AF;
    }
    (res, f)
}

/// a - b - c.
#[inline(always)]
pub fn sub(a: u64, b: u64, c: bool, bits: u32) -> (u64, u64) {
    let m = mask(bits);
    let (a, b) = (a & m, b & m);
    let res = a.wrapping_sub(b).wrapping_sub(c as u64) & m;
    let mut f = szp(res, bits);
    let borrow = if c { a <= b } else { a < b };
    if borrow {
        f |= CF;
    }
    if (a ^ b) & (a ^ res) & sign(bits) != 0 {
        f |= OF;
    }
    if (a ^ b ^ res) & 0x10 != 0 {
        f |= AF;
    }
    (res, f)
}

/// Flags after AND/OR/XOR/TEST.
#[inline]
pub fn logic(res: u64, bits: u32) -> u64 {
    szp(res, bits)
}

/// The two-operand ALU group (ADD OR ADC SBB AND SUB XOR CMP) plus TEST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AluOp {
    /// ADD.
    Add,
    /// OR.
    Or,
    /// ADC.
    Adc,
    /// SBB.
    Sbb,
    /// AND.
    And,
    /// SUB.
    Sub,
    /// XOR.
    Xor,
    /// CMP (SUB without writing).
    Cmp,
    /// TEST (AND without writing).
    Test,
}

/// Apply `op`; returns (result, new status flags).
#[inline(always)]
pub fn alu(op: AluOp, a: u64, b: u64, rflags: u64, bits: u32) -> (u64, u64) {
    let m = mask(bits);
    match op {
        AluOp::Add => add(a, b, false, bits),
        AluOp::Adc => add(a, b, rflags & CF != 0, bits),
        AluOp::Sub | AluOp::Cmp => sub(a, b, false, bits),
        AluOp::Sbb => sub(a, b, rflags & CF != 0, bits),
        AluOp::And | AluOp::Test => {
            let r = a & b & m;
            (r, logic(r, bits))
        }
        AluOp::Or => {
            let r = (a | b) & m;
            (r, logic(r, bits))
        }
        AluOp::Xor => {
            let r = (a ^ b) & m;
            (r, logic(r, bits))
        }
    }
}

/// Shift and rotate group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShiftOp {
    /// ROL.
    Rol,
    /// ROR.
    Ror,
    /// RCL.
    Rcl,
    /// RCR.
    Rcr,
    /// SHL/SAL.
    Shl,
    /// SHR.
    Shr,
    /// SAR.
    Sar,
}

/// Shift/rotate `a` by `count` (raw CL or immediate). Returns (result, full new RFLAGS status
/// bits given the old ones). A masked count of zero leaves the flags untouched.
pub fn shift(op: ShiftOp, a: u64, count: u64, rflags: u64, bits: u32) -> (u64, u64) {
    shift_inline(op, a, count, rflags, bits)
}

/// [`shift`], inlined: the decode-time handlers call it with the operation and width
/// constant, so only that case's code remains.
#[inline(always)]
pub(crate) fn shift_inline(op: ShiftOp, a: u64, count: u64, rflags: u64, bits: u32) -> (u64, u64) {
    if !matches!(bits, 8 | 16 | 32 | 64) {
        return (a, rflags & STATUS_BITS);
    }
    let m = mask(bits);
    let a = a & m;
    let cnt = (count & if bits == 64 { 63 } else { 31 }) as u32;
    let old = rflags & (CF | PF | AF | ZF | SF | OF);
    if cnt == 0 {
        return (a, old);
    }
    let sb = sign(bits);
    match op {
        ShiftOp::Shl => {
            let res = if cnt >= bits { 0 } else { (a << cnt) & m };
            let cf = if cnt > bits {
                false
            } else {
                (a >> (bits - cnt)) & 1 != 0
            };
            let mut f = szp(res, bits);
            if cf {
                f |= CF;
            }
            if ((res & sb) != 0) != cf {
                f |= OF;
            }
            (res, f)
        }
        ShiftOp::Shr => {
            let res = if cnt >= bits { 0 } else { a >> cnt };
            let cf = if cnt > bits {
                false
            } else {
                (a >> (cnt - 1)) & 1 != 0
            };
            let mut f = szp(res, bits);
            if cf {
                f |= CF;
            }
            if cnt == 1 && a & sb != 0 {
                f |= OF;
            }
            (res, f)
        }
        ShiftOp::Sar => {
            let sa = sext(a, bits) as i64;
            let c = cnt.min(63);
            let res = ((sa >> c) as u64) & m;
            let cf = ((sa >> (c - 1).min(63)) & 1) != 0;
            let mut f = szp(res, bits);
            if cf {
                f |= CF;
            }
            (res, f)
        }
        ShiftOp::Rol => {
            let c = cnt % bits;
            let res = if c == 0 {
                a
            } else {
                ((a << c) | (a >> (bits - c))) & m
            };
            let cf = res & 1 != 0;
            let mut f = old & !(CF | OF);
            if cf {
                f |= CF;
            }
            if ((res & sb) != 0) != cf {
                f |= OF;
            }
            (res, f)
        }
        ShiftOp::Ror => {
            let c = cnt % bits;
            let res = if c == 0 {
                a
            } else {
                ((a >> c) | (a << (bits - c))) & m
            };
            let msb = res & sb != 0;
            let msb2 = res & (sb >> 1) != 0;
            let mut f = old & !(CF | OF);
            if msb {
                f |= CF;
            }
            if msb != msb2 {
                f |= OF;
            }
            (res, f)
        }
        ShiftOp::Rcl | ShiftOp::Rcr => {
            let c = match bits {
                8 => cnt % 9,
                16 => cnt % 17,
                _ => cnt,
            };
            let mut cf = rflags & CF != 0;
            let mut res = a;
            for _ in 0..c {
                if op == ShiftOp::Rcl {
                    let out = res & sb != 0;
                    res = ((res << 1) | cf as u64) & m;
                    cf = out;
                } else {
                    let out = res & 1 != 0;
                    res = (res >> 1) | if cf { sb } else { 0 };
                    cf = out;
                }
            }
            let mut f = old & !(CF | OF);
            if cf {
                f |= CF;
            }
            let of = if op == ShiftOp::Rcl {
                ((res & sb) != 0) != cf
            } else {
                ((res & sb) != 0) != ((res & (sb >> 1)) != 0)
            };
            if of {
                f |= OF;
            }
            (res, f)
        }
    }
}

/// SHLD (left = true) / SHRD: shift `dst` filling from `src`.
pub fn shld_shrd(left: bool, dst: u64, src: u64, count: u64, rflags: u64, bits: u32) -> (u64, u64) {
    if !matches!(bits, 16 | 32 | 64) {
        return (dst, rflags & STATUS_BITS);
    }
    let m = mask(bits);
    let (d, s) = (dst & m, src & m);
    let cnt = (count & if bits == 64 { 63 } else { 31 }) as u32;
    let old = rflags & (CF | PF | AF | ZF | SF | OF);
    if cnt == 0 {
        return (d, old);
    }
    // Work in 128 bits: for 16-bit operands with counts > 16 hardware behaviour is undefined;
    // we produce the natural extension (src repeated) and keep it deterministic.
    let (res, cf) = if left {
        let wide: u128 = ((d as u128) << bits) | (s as u128);
        let wide = if bits == 16 {
            (wide << 16) | s as u128
        } else {
            wide
        };
        let total = if bits == 16 { 48 } else { 2 * bits };
        let shifted = wide << cnt;
        let res = ((shifted >> (total - bits)) as u64) & m;
        let cf = (wide >> (total - cnt)) & 1 != 0;
        (res, cf)
    } else {
        let wide: u128 = ((s as u128) << bits) | (d as u128);
        let wide = if bits == 16 {
            wide | ((s as u128) << 32)
        } else {
            wide
        };
        let res = ((wide >> cnt) as u64) & m;
        let cf = (wide >> (cnt - 1)) & 1 != 0;
        (res, cf)
    };
    let mut f = szp(res, bits);
    if cf {
        f |= CF;
    }
    if ((res ^ d) & sign(bits)) != 0 {
        f |= OF;
    }
    (res, f)
}

/// Condition-code test on RFLAGS (x86 encoding order 0..15: O NO B AE E NE BE A S NS P NP L GE LE G).
#[inline]
pub fn cond(cc: u32, f: u64) -> bool {
    let cf = f & CF != 0;
    let zf = f & ZF != 0;
    let sf = f & SF != 0;
    let of = f & OF != 0;
    let pf = f & PF != 0;
    let r = match cc >> 1 {
        0 => of,
        1 => cf,
        2 => zf,
        3 => cf || zf,
        4 => sf,
        5 => pf,
        6 => sf != of,
        _ => zf || (sf != of),
    };
    r ^ (cc & 1 != 0)
}
