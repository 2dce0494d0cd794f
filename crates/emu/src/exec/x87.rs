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
            _ => return Err(ud()),
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
