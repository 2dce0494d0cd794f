//! The x87 subset the engine implements: control/status word handling, FNINIT, and the
//! FXSAVE/FXRSTOR image (with MXCSR) that operating systems use to switch FPU/SSE state.
//! x87 arithmetic is not implemented (and CPUID does not claim more than FXSR needs).

use super::Loc;
use crate::cpu::{gp0, ud, Cpu, Fault, R};
use crate::state::{cr0, cr4, X87};
use iced_x86::{Instruction, Mnemonic};

/// MXCSR bits the engine accepts (DAZ included).
pub const MXCSR_MASK: u32 = 0xffff;

impl Cpu {
    fn fpu_check(&self) -> R<()> {
        if self.st.cr0 & cr0::EM != 0 {
            return Err(ud());
        }
        if self.st.cr0 & cr0::TS != 0 {
            return Err(Fault::Exc(7, None));
        }
        Ok(())
    }

    fn mem_operand(&self, ins: &Instruction) -> R<(usize, u64)> {
        match self.loc(ins, 0) {
            Loc::Mem(s, off) => Ok((s, off)),
            _ => Err(ud()),
        }
    }

    pub(crate) fn exec_x87(&mut self, ins: &Instruction) -> R<()> {
        use Mnemonic as M;
        match ins.mnemonic() {
            M::Wait => {
                if self.st.cr0 & (cr0::TS | cr0::MP) == (cr0::TS | cr0::MP) {
                    return Err(Fault::Exc(7, None));
                }
            }
            M::Emms => {
                self.fpu_check()?;
                self.st.x87.ftw = 0;
            }
            M::Fninit => {
                self.fpu_check()?;
                self.st.x87 = X87::default();
            }
            M::Fnclex => {
                self.fpu_check()?;
                self.st.x87.fsw &= 0x7f00;
            }
            M::Fnstcw => {
                self.fpu_check()?;
                let (s, off) = self.mem_operand(ins)?;
                self.write_seg(s, off, 2, self.st.x87.fcw as u64)?;
            }
            M::Fldcw => {
                self.fpu_check()?;
                let (s, off) = self.mem_operand(ins)?;
                let v = self.read_seg(s, off, 2)?;
                self.st.x87.fcw = (v as u16 & 0x1f3f) | 0x40;
            }
            M::Fnstsw => {
                self.fpu_check()?;
                let v = self.st.x87.fsw as u64;
                let l = self.loc(ins, 0);
                self.wr(l, 16, v)?;
            }
            M::Fnstenv | M::Fldenv => {
                self.fpu_check()?;
                let (s, off) = self.mem_operand(ins)?;
                // 28-byte protected-mode 32-bit format: FCW, FSW, FTW (full), FIP, FCS, FDP, FDS.
                if ins.mnemonic() == M::Fnstenv {
                    let full_tag = self.full_tag();
                    let words = [
                        self.st.x87.fcw as u64,
                        self.st.x87.fsw as u64,
                        full_tag as u64,
                    ];
                    for (i, w) in words.iter().enumerate() {
                        self.write_seg(s, off + i as u64 * 4, 4, *w | 0xffff_0000)?;
                    }
                    for i in 3..7u64 {
                        self.write_seg(s, off + i * 4, 4, 0)?;
                    }
                    self.st.x87.fcw |= 0x3f;
                } else {
                    let fcw = self.read_seg(s, off, 2)?;
                    let fsw = self.read_seg(s, off + 4, 2)?;
                    let ftw = self.read_seg(s, off + 8, 2)?;
                    self.st.x87.fcw = fcw as u16;
                    self.st.x87.fsw = fsw as u16;
                    let mut ab = 0u8;
                    for i in 0..8 {
                        if (ftw >> (2 * i)) & 3 != 3 {
                            ab |= 1 << i;
                        }
                    }
                    self.st.x87.ftw = ab;
                }
            }
            M::Fxsave | M::Fxsave64 => {
                self.fpu_check()?;
                let (s, off) = self.mem_operand(ins)?;
                let lin = self.seg_lin(s, off, 512, true)?;
                if lin & 15 != 0 {
                    return Err(gp0());
                }
                let img = self.fxsave_image(ins.mnemonic() == M::Fxsave64);
                let user = self.st.cpl() == 3;
                self.write_bytes_priv(lin, &img, user)?;
            }
            M::Fxrstor | M::Fxrstor64 => {
                self.fpu_check()?;
                let (s, off) = self.mem_operand(ins)?;
                let lin = self.seg_lin(s, off, 512, false)?;
                if lin & 15 != 0 {
                    return Err(gp0());
                }
                let mut img = [0u8; 512];
                let user = self.st.cpl() == 3;
                self.read_bytes_priv(lin, &mut img, user, crate::mmu::ACC_R)?;
                self.fxrstor_image(&img, ins.mnemonic() == M::Fxrstor64)?;
            }
            M::Ldmxcsr => {
                self.sse_check()?;
                let (s, off) = self.mem_operand(ins)?;
                let v = self.read_seg(s, off, 4)? as u32;
                if v & !MXCSR_MASK != 0 {
                    return Err(gp0());
                }
                self.st.mxcsr = v;
            }
            M::Stmxcsr => {
                self.sse_check()?;
                let (s, off) = self.mem_operand(ins)?;
                self.write_seg(s, off, 4, self.st.mxcsr as u64)?;
            }
            M::Fild
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
            | M::Fabs => {
                self.fpu_check()?;
                self.x87_move(ins)?;
            }
            _ => return Err(ud()),
        }
        Ok(())
    }

    fn x87_top(&self) -> u8 {
        ((self.st.x87.fsw >> 11) & 7) as u8
    }

    fn x87_set_top(&mut self, top: u8) {
        self.st.x87.fsw = (self.st.x87.fsw & !(7 << 11)) | (((top & 7) as u16) << 11);
    }

    /// Push an 80-bit value (ST-relative storage: slot i is ST(i)).
    fn x87_push(&mut self, v: [u8; 10]) {
        let top = self.x87_top().wrapping_sub(1) & 7;
        self.x87_set_top(top);
        self.st.x87.st.rotate_right(1);
        let mut r = [0u8; 16];
        r[..10].copy_from_slice(&v);
        self.st.x87.st[0] = r;
        self.st.x87.ftw |= 1 << top;
    }

    fn x87_pop(&mut self) {
        let top = self.x87_top();
        self.st.x87.ftw &= !(1 << top);
        self.st.x87.st[0] = [0; 16];
        self.st.x87.st.rotate_left(1);
        self.x87_set_top(top.wrapping_add(1) & 7);
    }

    fn st_f80(&self, i: usize) -> [u8; 10] {
        let mut v = [0u8; 10];
        v.copy_from_slice(&self.st.x87.st[i & 7][..10]);
        v
    }

    /// x87 data movement: loads, stores, exchanges, constants, sign operations.
    fn x87_move(&mut self, ins: &Instruction) -> R<()> {
        use Mnemonic as M;
        let mem = match self.loc(ins, 0) {
            Loc::Mem(s, off) => Some((s, off)),
            _ => match ins.op_count() {
                2 => match self.loc(ins, 1) {
                    Loc::Mem(s, off) => Some((s, off)),
                    _ => None,
                },
                _ => None,
            },
        };
        let sti =
            |r: iced_x86::Register| (r as usize).wrapping_sub(iced_x86::Register::ST0 as usize) & 7;
        let size = ins.memory_size().size() as u32;
        match ins.mnemonic() {
            M::Fnop => {}
            M::Fldz => self.x87_push([0; 10]),
            M::Fld1 => self.x87_push(f80_from_f64(1.0)),
            M::Fild => {
                let (s, off) = mem.ok_or_else(ud)?;
                let v = self.read_seg(s, off, size)?;
                let v = crate::exec::alu::sext(v, size * 8) as i64;
                self.x87_push(f80_from_i64(v));
                self.st.x87.fdp = off;
            }
            M::Fld => match mem {
                Some((s, off)) => {
                    let v = match size {
                        4 => f80_from_f64(f32::from_bits(self.read_seg(s, off, 4)? as u32) as f64),
                        8 => f80_from_f64(f64::from_bits(self.read_seg(s, off, 8)?)),
                        _ => {
                            let lo = self.read_seg(s, off, 8)?;
                            let hi = self.read_seg(s, off.wrapping_add(8), 2)?;
                            let mut v = [0u8; 10];
                            v[..8].copy_from_slice(&lo.to_le_bytes());
                            v[8..].copy_from_slice(&(hi as u16).to_le_bytes());
                            v
                        }
                    };
                    self.x87_push(v);
                }
                None => {
                    let v = self.st_f80(sti(ins.op0_register()));
                    self.x87_push(v);
                }
            },
            M::Fst | M::Fstp => {
                let v = self.st_f80(0);
                match mem {
                    Some((s, off)) => match size {
                        4 => self.write_seg(s, off, 4, (f80_to_f64(v) as f32).to_bits() as u64)?,
                        8 => self.write_seg(s, off, 8, f80_to_f64(v).to_bits())?,
                        _ => {
                            self.write_seg(
                                s,
                                off,
                                8,
                                u64::from_le_bytes(v[..8].try_into().unwrap_or([0; 8])),
                            )?;
                            self.write_seg(
                                s,
                                off.wrapping_add(8),
                                2,
                                u16::from_le_bytes([v[8], v[9]]) as u64,
                            )?;
                        }
                    },
                    None => {
                        let i = sti(ins.op0_register());
                        let mut r = [0u8; 16];
                        r[..10].copy_from_slice(&v);
                        self.st.x87.st[i] = r;
                    }
                }
                if ins.mnemonic() == M::Fstp {
                    self.x87_pop();
                }
            }
            M::Fist | M::Fistp => {
                let (s, off) = mem.ok_or_else(ud)?;
                let f = f80_to_f64(self.st_f80(0)).round_ties_even();
                let lim = 2f64.powi(size as i32 * 8 - 1);
                let v = if f.is_nan() || f >= lim || f < -lim {
                    1u64 << (size * 8 - 1)
                } else {
                    f as i64 as u64
                };
                self.write_seg(s, off, size, v)?;
                if ins.mnemonic() == M::Fistp {
                    self.x87_pop();
                }
            }
            M::Fxch => {
                let i = if ins.op_count() > 1 {
                    sti(ins.op1_register())
                } else {
                    1
                };
                self.st.x87.st.swap(0, i);
            }
            M::Ffree => {
                let phys = (self.x87_top() as usize + sti(ins.op0_register())) & 7;
                self.st.x87.ftw &= !(1 << phys);
            }
            M::Fincstp => {
                self.st.x87.st.rotate_left(1);
                let t = self.x87_top().wrapping_add(1) & 7;
                self.x87_set_top(t);
            }
            M::Fdecstp => {
                self.st.x87.st.rotate_right(1);
                let t = self.x87_top().wrapping_sub(1) & 7;
                self.x87_set_top(t);
            }
            M::Fchs => self.st.x87.st[0][9] ^= 0x80,
            _ => self.st.x87.st[0][9] &= 0x7f,
        }
        Ok(())
    }

    fn full_tag(&self) -> u16 {
        let mut t = 0u16;
        for i in 0..8 {
            if self.st.x87.ftw & (1 << i) == 0 {
                t |= 3 << (2 * i);
            }
        }
        t
    }

    /// SSE instructions need CR4.OSFXSR, CR0.EM clear, and fault #NM with CR0.TS.
    pub(crate) fn sse_check(&self) -> R<()> {
        if self.st.cr0 & cr0::EM != 0 || self.st.cr4 & cr4::OSFXSR == 0 {
            return Err(ud());
        }
        if self.st.cr0 & cr0::TS != 0 {
            return Err(Fault::Exc(7, None));
        }
        Ok(())
    }

    /// The 512-byte FXSAVE image.
    pub fn fxsave_image(&self, rex_w: bool) -> [u8; 512] {
        let x = &self.st.x87;
        let mut b = [0u8; 512];
        b[0..2].copy_from_slice(&x.fcw.to_le_bytes());
        b[2..4].copy_from_slice(&x.fsw.to_le_bytes());
        b[4] = x.ftw;
        b[6..8].copy_from_slice(&x.fop.to_le_bytes());
        if rex_w {
            b[8..16].copy_from_slice(&x.fip.to_le_bytes());
            b[16..24].copy_from_slice(&x.fdp.to_le_bytes());
        } else {
            b[8..12].copy_from_slice(&(x.fip as u32).to_le_bytes());
            b[16..20].copy_from_slice(&(x.fdp as u32).to_le_bytes());
        }
        b[24..28].copy_from_slice(&self.st.mxcsr.to_le_bytes());
        b[28..32].copy_from_slice(&MXCSR_MASK.to_le_bytes());
        for i in 0..8 {
            b[32 + i * 16..32 + i * 16 + 10].copy_from_slice(&x.st[i][..10]);
        }
        let nx = if self.st.mode64() { 16 } else { 8 };
        for i in 0..nx {
            b[160 + i * 16..176 + i * 16].copy_from_slice(&self.st.xmm[i].to_le_bytes());
        }
        b
    }

    /// Load an FXRSTOR image (#GP on reserved MXCSR bits).
    pub fn fxrstor_image(&mut self, b: &[u8; 512], rex_w: bool) -> R<()> {
        let u16at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mxcsr = u32at(24);
        if mxcsr & !MXCSR_MASK != 0 {
            return Err(gp0());
        }
        let x = &mut self.st.x87;
        x.fcw = u16at(0);
        x.fsw = u16at(2);
        x.ftw = b[4];
        x.fop = u16at(6);
        if rex_w {
            x.fip = u32at(8) as u64 | (u32at(12) as u64) << 32;
            x.fdp = u32at(16) as u64 | (u32at(20) as u64) << 32;
        } else {
            x.fip = u32at(8) as u64;
            x.fdp = u32at(16) as u64;
        }
        for i in 0..8 {
            let mut r = [0u8; 16];
            r[..10].copy_from_slice(&b[32 + i * 16..32 + i * 16 + 10]);
            x.st[i] = r;
        }
        self.st.mxcsr = mxcsr;
        let nx = if self.st.mode64() { 16 } else { 8 };
        for i in 0..nx {
            let mut r = [0u8; 16];
            r.copy_from_slice(&b[160 + i * 16..176 + i * 16]);
            self.st.xmm[i] = u128::from_le_bytes(r);
        }
        Ok(())
    }
}

/// 80-bit extended value of a 64-bit integer (exact).
pub fn f80_from_i64(v: i64) -> [u8; 10] {
    if v == 0 {
        return [0; 10];
    }
    let sign = v < 0;
    let m = v.unsigned_abs();
    let lz = m.leading_zeros();
    let mant = m << lz;
    let exp = 16383 + 63 - lz as u16;
    let mut r = [0u8; 10];
    r[..8].copy_from_slice(&mant.to_le_bytes());
    let se = exp | if sign { 0x8000 } else { 0 };
    r[8..].copy_from_slice(&se.to_le_bytes());
    r
}

/// 80-bit extended value of an f64 (exact).
pub fn f80_from_f64(f: f64) -> [u8; 10] {
    let b = f.to_bits();
    let sign = (b >> 63) as u16;
    let e = ((b >> 52) & 0x7ff) as i32;
    let frac = b & ((1 << 52) - 1);
    let (exp, mant): (u16, u64) = if e == 0 && frac == 0 {
        (0, 0)
    } else if e == 0x7ff {
        (0x7fff, (1 << 63) | (frac << 11))
    } else if e == 0 {
        // Subnormal: normalise.
        let lz = frac.leading_zeros() as i32;
        let mant = frac << lz;
        ((15360 + 12 - lz) as u16, mant)
    } else {
        ((e - 1023 + 16383) as u16, (1 << 63) | (frac << 11))
    };
    let mut r = [0u8; 10];
    r[..8].copy_from_slice(&mant.to_le_bytes());
    r[8..].copy_from_slice(&(exp | (sign << 15)).to_le_bytes());
    r
}

/// f64 nearest to an 80-bit extended value (truncating extra mantissa bits).
pub fn f80_to_f64(v: [u8; 10]) -> f64 {
    let mant = u64::from_le_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]);
    let se = u16::from_le_bytes([v[8], v[9]]);
    let sign = if se & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = (se & 0x7fff) as i32;
    if exp == 0 && mant == 0 {
        return 0.0 * sign;
    }
    if exp == 0x7fff {
        return if mant << 1 == 0 {
            sign * f64::INFINITY
        } else {
            f64::NAN
        };
    }
    sign * (mant as f64) * 2f64.powi(exp - 16383 - 63)
}
