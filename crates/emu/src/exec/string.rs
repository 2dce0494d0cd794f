//! String instructions (MOVS STOS LODS CMPS SCAS INS OUTS) with REP/REPE/REPNE.

use super::alu::{self, mask};
use super::seg_index;
use crate::cpu::{Cpu, R};
use crate::mem;
use crate::state::{flags::*, gpr, seg};
use iced_x86::{Instruction, Mnemonic, OpKind};

/// Iterations one REP instruction runs before yielding (it then re-executes, as after an
/// interrupt), so a huge RCX cannot stall kicks or interrupts.
const REP_CHUNK: u64 = 1 << 16;

impl Cpu {
    pub(crate) fn exec_string(&mut self, ins: &Instruction) -> R<()> {
        use Mnemonic as M;
        let m = ins.mnemonic();
        // Address size from the operand kinds.
        let mut asz = 64;
        for i in 0..ins.op_count() {
            asz = match ins.op_kind(i) {
                OpKind::MemorySegSI | OpKind::MemoryESDI => 16,
                OpKind::MemorySegESI | OpKind::MemoryESEDI => 32,
                OpKind::MemorySegRSI | OpKind::MemoryESRDI => 64,
                _ => continue,
            };
            break;
        }
        let size: u32 = match m {
            M::Movsb | M::Stosb | M::Lodsb | M::Cmpsb | M::Scasb | M::Insb | M::Outsb => 1,
            M::Movsw | M::Stosw | M::Lodsw | M::Cmpsw | M::Scasw | M::Insw | M::Outsw => 2,
            M::Movsd | M::Stosd | M::Lodsd | M::Cmpsd | M::Scasd | M::Insd | M::Outsd => 4,
            _ => 8,
        };
        let bits = size * 8;
        let am = mask(asz);
        let src_seg = seg_index(ins.memory_segment());
        let is_io = matches!(
            m,
            M::Insb | M::Insw | M::Insd | M::Outsb | M::Outsw | M::Outsd
        );
        if is_io {
            self.check_io()?;
        }
        let rep = ins.has_rep_prefix() || ins.has_repne_prefix();
        let cmp_kind = matches!(
            m,
            M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq | M::Scasb | M::Scasw | M::Scasd | M::Scasq
        );
        let delta = if self.st.rflags & DF != 0 {
            (size as u64).wrapping_neg()
        } else {
            size as u64
        };
        let mut iters = 0u64;
        loop {
            if rep {
                let c = self.st.gpr[gpr::RCX] & am;
                if c == 0 {
                    break;
                }
                if iters == REP_CHUNK {
                    // Resume this instruction later.
                    self.next_rip = self.st.rip;
                    return Ok(());
                }
            }
            let si = self.st.gpr[gpr::RSI] & am;
            let di = self.st.gpr[gpr::RDI] & am;
            match m {
                M::Movsb | M::Movsw | M::Movsd | M::Movsq => {
                    if rep && self.fast_movs(src_seg, si, di, size, am, delta)? {
                        iters += 1;
                        continue;
                    }
                    let v = self.read_seg(src_seg, si, size)?;
                    self.write_seg(seg::ES, di, size, v)?;
                    self.adv(gpr::RSI, delta, asz);
                    self.adv(gpr::RDI, delta, asz);
                }
                M::Stosb | M::Stosw | M::Stosd | M::Stosq => {
                    if rep && self.fast_stos(di, size, am, delta)? {
                        iters += 1;
                        continue;
                    }
                    let v = self.st.gpr[gpr::RAX];
                    self.write_seg(seg::ES, di, size, v)?;
                    self.adv(gpr::RDI, delta, asz);
                }
                M::Lodsb | M::Lodsw | M::Lodsd | M::Lodsq => {
                    let v = self.read_seg(src_seg, si, size)?;
                    self.set_acc(size, v);
                    self.adv(gpr::RSI, delta, asz);
                }
                M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq => {
                    let a = self.read_seg(src_seg, si, size)?;
                    let b = self.read_seg(seg::ES, di, size)?;
                    let f = alu::sub(a, b, false, bits).1;
                    self.st.rflags = (self.st.rflags & !STATUS) | f;
                    self.adv(gpr::RSI, delta, asz);
                    self.adv(gpr::RDI, delta, asz);
                }
                M::Scasb | M::Scasw | M::Scasd | M::Scasq => {
                    let a = self.st.gpr[gpr::RAX] & mask(bits);
                    let b = self.read_seg(seg::ES, di, size)?;
                    let f = alu::sub(a, b, false, bits).1;
                    self.st.rflags = (self.st.rflags & !STATUS) | f;
                    self.adv(gpr::RDI, delta, asz);
                }
                M::Insb | M::Insw | M::Insd => {
                    // Check the destination before the (side-effecting) port read.
                    let lin = self.seg_lin(seg::ES, di, size, true)?;
                    self.lin_ptr_w(lin, size)?;
                    let port = self.st.gpr[gpr::RDX] as u16;
                    let v = self.port_in(port, size)?;
                    self.write_lin(lin, size, v)?;
                    self.adv(gpr::RDI, delta, asz);
                }
                _ => {
                    let v = self.read_seg(src_seg, si, size)?;
                    let port = self.st.gpr[gpr::RDX] as u16;
                    self.port_out(port, size, v)?;
                    self.adv(gpr::RSI, delta, asz);
                }
            }
            if !rep {
                break;
            }
            let c = (self.st.gpr[gpr::RCX] & am).wrapping_sub(1) & am;
            self.set_count(c, asz);
            iters += 1;
            if cmp_kind {
                let zf = self.st.rflags & ZF != 0;
                if ins.has_rep_prefix() && !zf {
                    break;
                }
                if ins.has_repne_prefix() && zf {
                    break;
                }
            }
            if self.bp_hits != 0 && c != 0 {
                // A data breakpoint traps after the iteration that hit it: the instruction
                // resumes after the #DB handler.
                self.next_rip = self.st.rip;
                return Ok(());
            }
        }
        Ok(())
    }

    fn adv(&mut self, r: usize, delta: u64, asz: u32) {
        let v = self.st.gpr[r].wrapping_add(delta);
        let g = &mut self.st.gpr[r];
        *g = match asz {
            64 => v,
            32 => v & 0xffff_ffff,
            _ => (*g & !0xffff) | (v & 0xffff),
        };
    }

    fn set_count(&mut self, c: u64, asz: u32) {
        let g = &mut self.st.gpr[gpr::RCX];
        *g = match asz {
            64 => c,
            32 => c & 0xffff_ffff,
            _ => (*g & !0xffff) | (c & 0xffff),
        };
    }

    fn set_acc(&mut self, size: u32, v: u64) {
        let g = &mut self.st.gpr[gpr::RAX];
        *g = match size {
            1 => (*g & !0xff) | (v & 0xff),
            2 => (*g & !0xffff) | (v & 0xffff),
            4 => v & 0xffff_ffff,
            _ => v,
        };
    }

    /// Bulk REP MOVS within one source and one destination RAM page (forward direction).
    /// Returns false when the slow path must handle this element.
    fn fast_movs(&mut self, s: usize, si: u64, di: u64, size: u32, am: u64, delta: u64) -> R<bool> {
        // Data breakpoints see every element's access on the slow path.
        if self.bp_data != 0 {
            return Ok(false);
        }
        if delta != size as u64 || am != u64::MAX && am != 0xffff_ffff {
            return Ok(false);
        }
        let count = self.st.gpr[gpr::RCX] & am;
        let src = self.seg_lin(s, si, size, false)?;
        let dst = self.seg_lin(seg::ES, di, size, true)?;
        let room_s = 0x1000 - (src & 0xfff);
        let room_d = 0x1000 - (dst & 0xfff);
        let n = (room_s.min(room_d) / size as u64).min(count);
        if n < 2
            || (si.wrapping_add(n * size as u64) & am) < si
            || (di.wrapping_add(n * size as u64) & am) < di
        {
            return Ok(false);
        }
        let user = self.st.cpl() == 3;
        let es = self.translate(src, crate::mmu::ACC_R, user)?;
        let ed = self.translate(dst, crate::mmu::ACC_W, user)?;
        if es.host.is_null()
            || ed.host.is_null()
            || !self.st.mode64() && !self.flat_ok(s, si, n * size as u64)
        {
            return Ok(false);
        }
        self.note_write(ed.ppage);
        // Overlapping forward copies must behave element by element.
        let bytes = (n * size as u64) as usize;
        // SAFETY: both ranges lie within single RAM pages (n*size <= room in each page).
        unsafe {
            let sp = es.host.add((src & 0xfff) as usize);
            let dp = ed.host.add((dst & 0xfff) as usize);
            let overlap = (dp as usize) > (sp as usize) && (dp as usize) < (sp as usize) + bytes;
            if overlap {
                for i in 0..n as usize {
                    let v = mem::load(sp.add(i * size as usize), size);
                    mem::store(dp.add(i * size as usize), size, v);
                }
            } else {
                std::ptr::copy(sp, dp, bytes);
            }
        }
        let adv = n * size as u64;
        let asz = if am == u64::MAX { 64 } else { 32 };
        self.adv(gpr::RSI, adv, asz);
        self.adv(gpr::RDI, adv, asz);
        self.set_count(count - n, asz);
        Ok(true)
    }

    fn fast_stos(&mut self, di: u64, size: u32, am: u64, delta: u64) -> R<bool> {
        // Data breakpoints see every element's access on the slow path.
        if self.bp_data != 0 {
            return Ok(false);
        }
        if delta != size as u64 || am != u64::MAX && am != 0xffff_ffff {
            return Ok(false);
        }
        let count = self.st.gpr[gpr::RCX] & am;
        let dst = self.seg_lin(seg::ES, di, size, true)?;
        let room = 0x1000 - (dst & 0xfff);
        let n = (room / size as u64).min(count);
        if n < 2 || (di.wrapping_add(n * size as u64) & am) < di {
            return Ok(false);
        }
        if !self.st.mode64() && !self.flat_ok(seg::ES, di, n * size as u64) {
            return Ok(false);
        }
        let user = self.st.cpl() == 3;
        let ed = self.translate(dst, crate::mmu::ACC_W, user)?;
        if ed.host.is_null() {
            return Ok(false);
        }
        self.note_write(ed.ppage);
        let v = self.st.gpr[gpr::RAX];
        // SAFETY: the range lies within one RAM page.
        unsafe {
            let dp = ed.host.add((dst & 0xfff) as usize);
            if size == 1 {
                std::ptr::write_bytes(dp, v as u8, n as usize);
            } else {
                for i in 0..n as usize {
                    mem::store(dp.add(i * size as usize), size, v);
                }
            }
        }
        let asz = if am == u64::MAX { 64 } else { 32 };
        self.adv(gpr::RDI, n * size as u64, asz);
        self.set_count(count - n, asz);
        Ok(true)
    }

    /// The whole `[off, off+len)` passes the segment limit check.
    fn flat_ok(&self, s: usize, off: u64, len: u64) -> bool {
        self.seg_lin(s, off, len.min(u32::MAX as u64) as u32, false)
            .is_ok()
    }
}
