//! The SSE/SSE2 subset: 128-bit moves, integer SIMD used by string/memory routines, shuffles,
//! shifts, and scalar/packed single/double arithmetic (round-to-nearest, no FP exceptions).

use super::alu::{mask, sext};
use super::Loc;
use crate::cpu::{gp0, Cpu, R};
use crate::state::flags::*;
use iced_x86::{Instruction, Mnemonic, OpKind, Register};

#[inline]
fn xmm_idx(r: Register) -> Option<usize> {
    if r.is_xmm() {
        Some(r as usize - Register::XMM0 as usize).filter(|&i| i < 16)
    } else {
        None
    }
}

/// Apply `f` to each `bits`-wide lane of `a` and `b`.
fn lanes(a: u128, b: u128, bits: u32, f: impl Fn(u64, u64) -> u64) -> u128 {
    let n = 128 / bits;
    let m = mask(bits) as u128;
    let mut r = 0u128;
    for i in 0..n {
        let sh = i * bits;
        let x = ((a >> sh) & m) as u64;
        let y = ((b >> sh) & m) as u64;
        r |= ((f(x, y) as u128) & m) << sh;
    }
    r
}

fn lane(v: u128, i: u32, bits: u32) -> u64 {
    ((v >> (i * bits)) & mask(bits) as u128) as u64
}

fn sat_s(v: i64, bits: u32) -> u64 {
    let max = (1i64 << (bits - 1)) - 1;
    let min = -(1i64 << (bits - 1));
    (v.clamp(min, max) as u64) & mask(bits)
}

fn sat_u(v: i64, bits: u32) -> u64 {
    v.clamp(0, mask(bits) as i64) as u64
}

fn f32_of(v: u64) -> f32 {
    f32::from_bits(v as u32)
}
fn f64_of(v: u64) -> f64 {
    f64::from_bits(v)
}

/// Float to integer with x86's "integer indefinite" on NaN/overflow.
fn cvt_f64_i(v: f64, bits: u32, truncate: bool) -> u64 {
    let r = if truncate {
        v.trunc()
    } else {
        v.round_ties_even()
    };
    let lim = 2f64.powi(bits as i32 - 1);
    if r.is_nan() || r >= lim || r < -lim {
        return sign_bit(bits);
    }
    (r as i64 as u64) & mask(bits)
}

fn sign_bit(bits: u32) -> u64 {
    1u64 << (bits - 1)
}

impl Cpu {
    /// Read an XMM-or-memory source of `bytes` (4, 8 or 16) as a u128 (zero-extended).
    fn xsrc(&mut self, ins: &Instruction, i: u32, bytes: u32, aligned: bool) -> R<u128> {
        match self.loc(ins, i) {
            Loc::Reg(r) => {
                if let Some(x) = xmm_idx(r) {
                    Ok(self.st.xmm[x])
                } else {
                    Ok(self.reg(r) as u128)
                }
            }
            Loc::Mem(s, off) => self.read_xmm_mem(s, off, bytes, aligned),
            Loc::Imm(v) => Ok(v as u128),
        }
    }

    fn read_xmm_mem(&mut self, s: usize, off: u64, bytes: u32, aligned: bool) -> R<u128> {
        let lin = self.seg_lin(s, off, bytes, false)?;
        if aligned && bytes == 16 && lin & 15 != 0 {
            return Err(gp0());
        }
        if bytes == 16 {
            let lo = self.read_lin(lin, 8)? as u128;
            let hi = self.read_lin(lin.wrapping_add(8), 8)? as u128;
            Ok(lo | (hi << 64))
        } else {
            Ok(self.read_lin(lin, bytes)? as u128)
        }
    }

    fn write_xmm_mem(&mut self, s: usize, off: u64, bytes: u32, v: u128, aligned: bool) -> R<()> {
        let lin = self.seg_lin(s, off, bytes, true)?;
        if aligned && bytes == 16 && lin & 15 != 0 {
            return Err(gp0());
        }
        if bytes == 16 {
            let user = self.st.cpl() == 3;
            self.write_bytes_priv(lin, &v.to_le_bytes(), user)
        } else {
            self.write_lin(lin, bytes, v as u64)
        }
    }

    /// Write operand `i` (XMM register or memory) with `bytes` of `v`.
    fn xdst(&mut self, ins: &Instruction, i: u32, bytes: u32, v: u128, aligned: bool) -> R<()> {
        match self.loc(ins, i) {
            Loc::Reg(r) => {
                if let Some(x) = xmm_idx(r) {
                    self.st.xmm[x] = v;
                } else {
                    self.set_reg(r, v as u64);
                }
                Ok(())
            }
            Loc::Mem(s, off) => self.write_xmm_mem(s, off, bytes, v, aligned),
            Loc::Imm(_) => Err(crate::cpu::ud()),
        }
    }

    /// Execute an SSE/SSE2 instruction; Ok(false) if it is not one this engine implements.
    pub(crate) fn exec_sse(&mut self, ins: &Instruction) -> R<bool> {
        use Mnemonic as M;
        let m = ins.mnemonic();
        // Only legacy-encoded XMM forms (no VEX/EVEX, no MMX registers).
        if ins.encoding() != iced_x86::EncodingKind::Legacy {
            return Ok(false);
        }
        for i in 0..ins.op_count() {
            if ins.op_kind(i) == OpKind::Register {
                let r = ins.op_register(i);
                if r.is_mm() || r.is_ymm() || r.is_zmm() {
                    return Ok(false);
                }
            }
        }
        let d = match ins.op_count() {
            0 => None,
            _ => xmm_idx(ins.op0_register()).filter(|_| ins.op0_kind() == OpKind::Register),
        };
        macro_rules! binop {
            ($bits:expr, $f:expr) => {{
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let b = self.xsrc(ins, 1, 16, true)?;
                self.st.xmm[d] = lanes(self.st.xmm[d], b, $bits, $f);
            }};
        }
        match m {
            M::Movaps
            | M::Movapd
            | M::Movdqa
            | M::Movups
            | M::Movupd
            | M::Movdqu
            | M::Movntdq
            | M::Movntps
            | M::Movntpd
            | M::Lddqu => {
                self.sse_check()?;
                let aligned = matches!(
                    m,
                    M::Movaps | M::Movapd | M::Movdqa | M::Movntdq | M::Movntps | M::Movntpd
                );
                let v = self.xsrc(ins, 1, 16, aligned)?;
                self.xdst(ins, 0, 16, v, aligned)?;
            }
            M::Movd | M::Movq => {
                self.sse_check()?;
                let bytes = if m == M::Movd { 4 } else { 8 };
                if d.is_some() {
                    let v = self.xsrc(ins, 1, bytes, false)? & mask(bytes * 8) as u128;
                    self.xdst(ins, 0, 16, v, false)?;
                } else {
                    let Some(x) = xmm_idx(ins.op1_register()) else {
                        return Ok(false);
                    };
                    let v = self.st.xmm[x] & mask(bytes * 8) as u128;
                    match self.loc(ins, 0) {
                        Loc::Reg(r) => self.set_reg(r, v as u64),
                        Loc::Mem(s, off) => self.write_xmm_mem(s, off, bytes, v, false)?,
                        Loc::Imm(_) => return Ok(false),
                    }
                }
            }
            M::Movss | M::Movsd => {
                self.sse_check()?;
                let bytes = if m == M::Movss { 4 } else { 8 };
                let lm = mask(bytes * 8) as u128;
                match (self.loc(ins, 0), self.loc(ins, 1)) {
                    (Loc::Reg(a), Loc::Reg(b)) => {
                        let (Some(a), Some(b)) = (xmm_idx(a), xmm_idx(b)) else {
                            return Ok(false);
                        };
                        self.st.xmm[a] = (self.st.xmm[a] & !lm) | (self.st.xmm[b] & lm);
                    }
                    (Loc::Reg(a), Loc::Mem(s, off)) => {
                        let Some(a) = xmm_idx(a) else {
                            return Ok(false);
                        };
                        self.st.xmm[a] = self.read_xmm_mem(s, off, bytes, false)?;
                    }
                    (Loc::Mem(s, off), Loc::Reg(b)) => {
                        let Some(b) = xmm_idx(b) else {
                            return Ok(false);
                        };
                        let v = self.st.xmm[b];
                        self.write_xmm_mem(s, off, bytes, v, false)?;
                    }
                    _ => return Ok(false),
                }
            }
            M::Movlps | M::Movlpd | M::Movhps | M::Movhpd | M::Movhlps | M::Movlhps => {
                self.sse_check()?;
                let lo = u64::MAX as u128;
                match (self.loc(ins, 0), self.loc(ins, 1)) {
                    (Loc::Reg(a), src) => {
                        let Some(a) = xmm_idx(a) else {
                            return Ok(false);
                        };
                        let v = match src {
                            Loc::Reg(b) => {
                                let Some(b) = xmm_idx(b) else {
                                    return Ok(false);
                                };
                                let bv = self.st.xmm[b];
                                if m == M::Movhlps {
                                    bv >> 64
                                } else {
                                    bv & lo
                                }
                            }
                            Loc::Mem(s, off) => self.read_xmm_mem(s, off, 8, false)?,
                            Loc::Imm(_) => return Ok(false),
                        };
                        let cur = self.st.xmm[a];
                        self.st.xmm[a] = match m {
                            M::Movlps | M::Movlpd | M::Movhlps => (cur & !lo) | v,
                            _ => (cur & lo) | (v << 64),
                        };
                    }
                    (Loc::Mem(s, off), Loc::Reg(b)) => {
                        let Some(b) = xmm_idx(b) else {
                            return Ok(false);
                        };
                        let bv = self.st.xmm[b];
                        let v = if matches!(m, M::Movhps | M::Movhpd) {
                            bv >> 64
                        } else {
                            bv & lo
                        };
                        self.write_xmm_mem(s, off, 8, v, false)?;
                    }
                    _ => return Ok(false),
                }
            }
            M::Pxor | M::Xorps | M::Xorpd => binop!(64, |a, b| a ^ b),
            M::Por | M::Orps | M::Orpd => binop!(64, |a, b| a | b),
            M::Pand | M::Andps | M::Andpd => binop!(64, |a, b| a & b),
            M::Pandn | M::Andnps | M::Andnpd => binop!(64, |a, b| !a & b),
            M::Paddb => binop!(8, |a, b| a.wrapping_add(b)),
            M::Paddw => binop!(16, |a, b| a.wrapping_add(b)),
            M::Paddd => binop!(32, |a, b| a.wrapping_add(b)),
            M::Paddq => binop!(64, |a, b| a.wrapping_add(b)),
            M::Psubb => binop!(8, |a, b| a.wrapping_sub(b)),
            M::Psubw => binop!(16, |a, b| a.wrapping_sub(b)),
            M::Psubd => binop!(32, |a, b| a.wrapping_sub(b)),
            M::Psubq => binop!(64, |a, b| a.wrapping_sub(b)),
            M::Paddusb => binop!(8, |a, b| sat_u((a + b) as i64, 8)),
            M::Paddusw => binop!(16, |a, b| sat_u((a + b) as i64, 16)),
            M::Psubusb => binop!(8, |a, b| sat_u(a as i64 - b as i64, 8)),
            M::Psubusw => binop!(16, |a, b| sat_u(a as i64 - b as i64, 16)),
            M::Paddsb => binop!(8, |a, b| sat_s(sext(a, 8) as i64 + sext(b, 8) as i64, 8)),
            M::Paddsw => binop!(16, |a, b| sat_s(
                sext(a, 16) as i64 + sext(b, 16) as i64,
                16
            )),
            M::Psubsb => binop!(8, |a, b| sat_s(sext(a, 8) as i64 - sext(b, 8) as i64, 8)),
            M::Psubsw => binop!(16, |a, b| sat_s(
                sext(a, 16) as i64 - sext(b, 16) as i64,
                16
            )),
            M::Pcmpeqb => binop!(8, |a, b| if a == b { 0xff } else { 0 }),
            M::Pcmpeqw => binop!(16, |a, b| if a == b { 0xffff } else { 0 }),
            M::Pcmpeqd => binop!(32, |a, b| if a == b { 0xffff_ffff } else { 0 }),
            M::Pcmpgtb => binop!(8, |a, b| if (sext(a, 8) as i64) > sext(b, 8) as i64 {
                0xff
            } else {
                0
            }),
            M::Pcmpgtw => binop!(16, |a, b| if (sext(a, 16) as i64) > sext(b, 16) as i64 {
                0xffff
            } else {
                0
            }),
            M::Pcmpgtd => binop!(32, |a, b| if (sext(a, 32) as i64) > sext(b, 32) as i64 {
                0xffff_ffff
            } else {
                0
            }),
            M::Pminub => binop!(8, |a, b| a.min(b)),
            M::Pmaxub => binop!(8, |a, b| a.max(b)),
            M::Pminsw => binop!(16, |a, b| if (sext(a, 16) as i64) < sext(b, 16) as i64 {
                a
            } else {
                b
            }),
            M::Pmaxsw => binop!(16, |a, b| if (sext(a, 16) as i64) > sext(b, 16) as i64 {
                a
            } else {
                b
            }),
            M::Pavgb => binop!(8, |a, b| (a + b + 1) >> 1),
            M::Pavgw => binop!(16, |a, b| (a + b + 1) >> 1),
            M::Pmullw => binop!(16, |a, b| a.wrapping_mul(b)),
            M::Pmulhw => binop!(16, |a, b| ((sext(a, 16) as i64 * sext(b, 16) as i64) >> 16)
                as u64),
            M::Pmulhuw => binop!(16, |a, b| (a * b) >> 16),
            M::Pmuludq => binop!(64, |a, b| (a & 0xffff_ffff) * (b & 0xffff_ffff)),
            M::Pmaddwd => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let b = self.xsrc(ins, 1, 16, true)?;
                let a = self.st.xmm[d];
                let mut r = 0u128;
                for i in 0..4 {
                    let p0 =
                        sext(lane(a, 2 * i, 16), 16) as i64 * sext(lane(b, 2 * i, 16), 16) as i64;
                    let p1 = sext(lane(a, 2 * i + 1, 16), 16) as i64
                        * sext(lane(b, 2 * i + 1, 16), 16) as i64;
                    r |= (((p0 + p1) as u64 & 0xffff_ffff) as u128) << (32 * i);
                }
                self.st.xmm[d] = r;
            }
            M::Psadbw => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let b = self.xsrc(ins, 1, 16, true)?;
                let a = self.st.xmm[d];
                let mut r = 0u128;
                for h in 0..2 {
                    let mut s = 0u64;
                    for i in 0..8 {
                        s += lane(a, h * 8 + i, 8).abs_diff(lane(b, h * 8 + i, 8));
                    }
                    r |= (s as u128) << (64 * h);
                }
                self.st.xmm[d] = r;
            }
            M::Pmovmskb | M::Movmskps | M::Movmskpd => {
                self.sse_check()?;
                let Some(s) = xmm_idx(ins.op1_register()) else {
                    return Ok(false);
                };
                let v = self.st.xmm[s];
                let bits = match m {
                    M::Pmovmskb => 8,
                    M::Movmskps => 32,
                    _ => 64,
                };
                let mut r = 0u64;
                for i in 0..128 / bits {
                    if (v >> (i * bits + bits - 1)) & 1 != 0 {
                        r |= 1 << i;
                    }
                }
                self.set_reg(ins.op0_register(), r);
            }
            M::Punpcklbw
            | M::Punpcklwd
            | M::Punpckldq
            | M::Punpcklqdq
            | M::Punpckhbw
            | M::Punpckhwd
            | M::Punpckhdq
            | M::Punpckhqdq
            | M::Unpcklps
            | M::Unpckhps
            | M::Unpcklpd
            | M::Unpckhpd => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let b = self.xsrc(ins, 1, 16, true)?;
                let a = self.st.xmm[d];
                let (bits, high) = match m {
                    M::Punpcklbw => (8, false),
                    M::Punpcklwd => (16, false),
                    M::Punpckldq | M::Unpcklps => (32, false),
                    M::Punpcklqdq | M::Unpcklpd => (64, false),
                    M::Punpckhbw => (8, true),
                    M::Punpckhwd => (16, true),
                    M::Punpckhdq | M::Unpckhps => (32, true),
                    _ => (64, true),
                };
                let n = 64 / bits;
                let off = if high { n } else { 0 };
                let mut r = 0u128;
                for i in 0..n {
                    r |= (lane(a, off + i, bits) as u128) << (2 * i * bits);
                    r |= (lane(b, off + i, bits) as u128) << ((2 * i + 1) * bits);
                }
                self.st.xmm[d] = r;
            }
            M::Packsswb | M::Packssdw | M::Packuswb => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let b = self.xsrc(ins, 1, 16, true)?;
                let a = self.st.xmm[d];
                let (ib, ob) = if m == M::Packssdw { (32, 16) } else { (16, 8) };
                let n = 128 / ib;
                let mut r = 0u128;
                for (k, src) in [a, b].iter().enumerate() {
                    for i in 0..n {
                        let v = sext(lane(*src, i, ib), ib) as i64;
                        let o = if m == M::Packuswb {
                            sat_u(v, ob)
                        } else {
                            sat_s(v, ob)
                        };
                        r |= (o as u128) << ((k as u32 * n + i) * ob);
                    }
                }
                self.st.xmm[d] = r;
            }
            M::Pshufd | M::Pshuflw | M::Pshufhw => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let b = self.xsrc(ins, 1, 16, true)?;
                let imm = ins.immediate8() as u32;
                let mut r = b;
                match m {
                    M::Pshufd => {
                        r = 0;
                        for i in 0..4 {
                            r |= (lane(b, (imm >> (2 * i)) & 3, 32) as u128) << (32 * i);
                        }
                    }
                    M::Pshuflw => {
                        r &= !(u64::MAX as u128);
                        for i in 0..4 {
                            r |= (lane(b, (imm >> (2 * i)) & 3, 16) as u128) << (16 * i);
                        }
                    }
                    _ => {
                        r &= u64::MAX as u128;
                        for i in 0..4 {
                            r |= (lane(b, 4 + ((imm >> (2 * i)) & 3), 16) as u128) << (64 + 16 * i);
                        }
                    }
                }
                self.st.xmm[d] = r;
            }
            M::Shufps | M::Shufpd => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let b = self.xsrc(ins, 1, 16, true)?;
                let a = self.st.xmm[d];
                let imm = ins.immediate8() as u32;
                self.st.xmm[d] = if m == M::Shufps {
                    (lane(a, imm & 3, 32) as u128)
                        | (lane(a, (imm >> 2) & 3, 32) as u128) << 32
                        | (lane(b, (imm >> 4) & 3, 32) as u128) << 64
                        | (lane(b, (imm >> 6) & 3, 32) as u128) << 96
                } else {
                    (lane(a, imm & 1, 64) as u128) | (lane(b, (imm >> 1) & 1, 64) as u128) << 64
                };
            }
            M::Psllw
            | M::Pslld
            | M::Psllq
            | M::Psrlw
            | M::Psrld
            | M::Psrlq
            | M::Psraw
            | M::Psrad => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let count = if ins.op_kind(1) == OpKind::Immediate8 {
                    ins.immediate8() as u64
                } else {
                    self.xsrc(ins, 1, 16, true)? as u64
                };
                let bits = match m {
                    M::Psllw | M::Psrlw | M::Psraw => 16,
                    M::Pslld | M::Psrld | M::Psrad => 32,
                    _ => 64,
                };
                let a = self.st.xmm[d];
                self.st.xmm[d] = lanes(a, 0, bits, |x, _| match m {
                    M::Psllw | M::Pslld | M::Psllq => {
                        if count >= bits as u64 {
                            0
                        } else {
                            x << count
                        }
                    }
                    M::Psrlw | M::Psrld | M::Psrlq => {
                        if count >= bits as u64 {
                            0
                        } else {
                            x >> count
                        }
                    }
                    _ => {
                        let c = count.min(bits as u64 - 1);
                        ((sext(x, bits) as i64) >> c) as u64
                    }
                });
            }
            M::Pslldq | M::Psrldq => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let n = ins.immediate8() as u32;
                let a = self.st.xmm[d];
                self.st.xmm[d] = if n >= 16 {
                    0
                } else if m == M::Pslldq {
                    a << (n * 8)
                } else {
                    a >> (n * 8)
                };
            }
            // Floating point.
            M::Addss
            | M::Subss
            | M::Mulss
            | M::Divss
            | M::Minss
            | M::Maxss
            | M::Sqrtss
            | M::Addsd
            | M::Subsd
            | M::Mulsd
            | M::Divsd
            | M::Minsd
            | M::Maxsd
            | M::Sqrtsd
            | M::Addps
            | M::Subps
            | M::Mulps
            | M::Divps
            | M::Minps
            | M::Maxps
            | M::Sqrtps
            | M::Addpd
            | M::Subpd
            | M::Mulpd
            | M::Divpd
            | M::Minpd
            | M::Maxpd
            | M::Sqrtpd => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let name = format!("{m:?}");
                let single = name.ends_with("ss") || name.ends_with("ps");
                let scalar = name.ends_with("ss") || name.ends_with("sd");
                let bits = if single { 32 } else { 64 };
                let bytes = if scalar { bits / 8 } else { 16 };
                let b = self.xsrc(ins, 1, bytes, !scalar)?;
                let a = self.st.xmm[d];
                let op = &name[..3];
                // One operation table for both widths. MIN/MAX return the second operand
                // unless the first is strictly smaller/greater (x86: NaN or equal -> source).
                macro_rules! arith {
                    ($x:expr, $y:expr) => {{
                        let (x, y) = ($x, $y);
                        match op {
                            "Add" => x + y,
                            "Sub" => x - y,
                            "Mul" => x * y,
                            "Div" => x / y,
                            "Min" => {
                                if x < y {
                                    x
                                } else {
                                    y
                                }
                            }
                            "Max" => {
                                if x > y {
                                    x
                                } else {
                                    y
                                }
                            }
                            _ => y.sqrt(),
                        }
                    }};
                }
                let f = |x: u64, y: u64| -> u64 {
                    if single {
                        arith!(f32_of(x), f32_of(y)).to_bits() as u64
                    } else {
                        arith!(f64_of(x), f64_of(y)).to_bits()
                    }
                };
                let full = lanes(a, b, bits, f);
                self.st.xmm[d] = if scalar {
                    let lm = mask(bits) as u128;
                    (a & !lm) | (full & lm)
                } else {
                    full
                };
            }
            M::Cmpss | M::Cmpsd | M::Cmpps | M::Cmppd => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let single = matches!(m, M::Cmpss | M::Cmpps);
                let scalar = matches!(m, M::Cmpss | M::Cmpsd);
                let bits = if single { 32 } else { 64 };
                let b = self.xsrc(ins, 1, if scalar { bits / 8 } else { 16 }, !scalar)?;
                let a = self.st.xmm[d];
                let pred = ins.immediate8() & 7;
                let f = |x: u64, y: u64| -> u64 {
                    let (x, y) = if single {
                        (f32_of(x) as f64, f32_of(y) as f64)
                    } else {
                        (f64_of(x), f64_of(y))
                    };
                    let unord = x.is_nan() || y.is_nan();
                    let r = match pred {
                        0 => x == y,
                        1 => x < y,
                        2 => x <= y,
                        3 => unord,
                        4 => x != y || unord,
                        5 => x >= y || unord,
                        6 => x > y || unord,
                        _ => !unord,
                    };
                    if r {
                        mask(bits)
                    } else {
                        0
                    }
                };
                let full = lanes(a, b, bits, f);
                self.st.xmm[d] = if scalar {
                    let lm = mask(bits) as u128;
                    (a & !lm) | (full & lm)
                } else {
                    full
                };
            }
            M::Ucomiss | M::Comiss | M::Ucomisd | M::Comisd => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let single = matches!(m, M::Ucomiss | M::Comiss);
                let b = self.xsrc(ins, 1, if single { 4 } else { 8 }, false)?;
                let a = self.st.xmm[d];
                let (x, y) = if single {
                    (f32_of(a as u64) as f64, f32_of(b as u64) as f64)
                } else {
                    (f64_of(a as u64), f64_of(b as u64))
                };
                let f = if x.is_nan() || y.is_nan() {
                    ZF | PF | CF
                } else if x < y {
                    CF
                } else if x == y {
                    ZF
                } else {
                    0
                };
                self.st.rflags = (self.st.rflags & !STATUS) | f;
            }
            M::Cvtsi2sd | M::Cvtsi2ss => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let sb = self.op_bits(ins, 1);
                let v = sext(self.rd_op(ins, 1)?, sb) as i64;
                let a = self.st.xmm[d];
                self.st.xmm[d] = if m == M::Cvtsi2sd {
                    (a & !(u64::MAX as u128)) | (v as f64).to_bits() as u128
                } else {
                    (a & !(u32::MAX as u128)) | (v as f32).to_bits() as u128
                };
            }
            M::Cvttsd2si | M::Cvtsd2si | M::Cvttss2si | M::Cvtss2si => {
                self.sse_check()?;
                let single = matches!(m, M::Cvttss2si | M::Cvtss2si);
                let b = self.xsrc(ins, 1, if single { 4 } else { 8 }, false)?;
                let x = if single {
                    f32_of(b as u64) as f64
                } else {
                    f64_of(b as u64)
                };
                let bits = self.op_bits(ins, 0);
                let r = cvt_f64_i(x, bits, matches!(m, M::Cvttsd2si | M::Cvttss2si));
                self.set_reg(ins.op0_register(), r);
            }
            M::Cvtss2sd | M::Cvtsd2ss => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let a = self.st.xmm[d];
                if m == M::Cvtss2sd {
                    let b = self.xsrc(ins, 1, 4, false)?;
                    let r = (f32_of(b as u64) as f64).to_bits();
                    self.st.xmm[d] = (a & !(u64::MAX as u128)) | r as u128;
                } else {
                    let b = self.xsrc(ins, 1, 8, false)?;
                    let r = (f64_of(b as u64) as f32).to_bits();
                    self.st.xmm[d] = (a & !(u32::MAX as u128)) | r as u128;
                }
            }
            M::Cvtdq2pd | M::Cvtdq2ps | M::Cvttpd2dq | M::Cvttps2dq | M::Cvtps2pd | M::Cvtpd2ps => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let b = self.xsrc(
                    ins,
                    1,
                    if matches!(m, M::Cvtdq2pd | M::Cvtps2pd) {
                        8
                    } else {
                        16
                    },
                    false,
                )?;
                let mut r = 0u128;
                match m {
                    M::Cvtdq2pd => {
                        for i in 0..2 {
                            let v = sext(lane(b, i, 32), 32) as i64 as f64;
                            r |= (v.to_bits() as u128) << (64 * i);
                        }
                    }
                    M::Cvtdq2ps => {
                        for i in 0..4 {
                            let v = sext(lane(b, i, 32), 32) as i64 as f32;
                            r |= (v.to_bits() as u128) << (32 * i);
                        }
                    }
                    M::Cvttpd2dq => {
                        for i in 0..2 {
                            r |= (cvt_f64_i(f64_of(lane(b, i, 64)), 32, true) as u128) << (32 * i);
                        }
                    }
                    M::Cvttps2dq => {
                        for i in 0..4 {
                            r |= (cvt_f64_i(f32_of(lane(b, i, 32)) as f64, 32, true) as u128)
                                << (32 * i);
                        }
                    }
                    M::Cvtps2pd => {
                        for i in 0..2 {
                            r |= ((f32_of(lane(b, i, 32)) as f64).to_bits() as u128) << (64 * i);
                        }
                    }
                    _ => {
                        for i in 0..2 {
                            r |= ((f64_of(lane(b, i, 64)) as f32).to_bits() as u128) << (32 * i);
                        }
                    }
                }
                self.st.xmm[d] = r;
            }
            M::Pextrw => {
                self.sse_check()?;
                let Some(s) = xmm_idx(ins.op1_register()) else {
                    return Ok(false);
                };
                let v = lane(self.st.xmm[s], (ins.immediate8() & 7) as u32, 16);
                self.set_reg(ins.op0_register(), v);
            }
            M::Pinsrw => {
                let Some(d) = d else { return Ok(false) };
                self.sse_check()?;
                let v = self.rd_op(ins, 1)? & 0xffff;
                let i = (ins.immediate8() & 7) as u32;
                let a = self.st.xmm[d] & !(0xffffu128 << (16 * i));
                self.st.xmm[d] = a | ((v as u128) << (16 * i));
            }
            M::Movnti => {
                let v = self.rd_op(ins, 1)?;
                let bits = self.op_bits(ins, 0);
                let l = self.loc(ins, 0);
                self.wr(l, bits, v)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}
