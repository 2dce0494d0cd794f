//! Exception and interrupt delivery through the IVT (real mode) or the IDT (protected and
//! long mode), with privilege-level stack switches from the TSS, IST, and #DF / triple fault.

use crate::cpu::{gp, np, Cpu, Fault, R};
use crate::exec::alu::mask;
use crate::state::{cr0, flags::*, gpr, seg};
use kvmbox_cpu::Segment;

/// What kind of event is being delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A fault or trap raised by the CPU.
    Exception,
    /// INT n (gate DPL checked against CPL).
    Software,
    /// INT3 / INTO (gate DPL checked, but they are exceptions).
    SoftwareException,
    /// An external interrupt or NMI.
    External,
}

/// Fault-class exceptions (the saved RIP is the faulting instruction's) that push RF = 1. #DB
/// is left out: its instruction-breakpoint and general-detect forms are faults that push RF
/// as it is (the handler sets it to resume past an instruction breakpoint), the others traps.
fn is_fault(v: u8) -> bool {
    matches!(
        v,
        0 | 5 | 6 | 7 | 10 | 11 | 12 | 13 | 14 | 16 | 17 | 19 | 20 | 21
    )
}

fn contributory(v: u8) -> bool {
    matches!(v, 0 | 10 | 11 | 12 | 13)
}

impl Cpu {
    /// Deliver a fault raised by the current instruction (RIP points at it), applying the
    /// double-fault rules. Returns Err only for conditions that stop the vCPU.
    pub(crate) fn raise(&mut self, vector: u8, err: Option<u32>) -> R<()> {
        self.stats.exceptions += 1;
        let rip = self.st.rip;
        let first = self.deliver(vector, err, EventKind::Exception, rip);
        let Err(f) = first else {
            return Ok(());
        };
        let Fault::Exc(v2, e2) = f else {
            return Err(f);
        };
        if vector == 8 {
            return Err(Fault::Shutdown);
        }
        let df = (contributory(vector) || vector == 14)
            && (contributory(v2) || v2 == 14)
            && !(contributory(vector) && v2 == 14);
        let (nv, ne) = if df { (8, Some(0)) } else { (v2, e2) };
        match self.deliver(nv, ne, EventKind::Exception, rip) {
            Ok(()) => Ok(()),
            Err(Fault::Exc(..)) => {
                if nv == 8 {
                    return Err(Fault::Shutdown);
                }
                match self.deliver(8, Some(0), EventKind::Exception, rip) {
                    Ok(()) => Ok(()),
                    Err(Fault::Exc(..)) => Err(Fault::Shutdown),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Deliver `vector` with the return address `ret_rip`. Nothing in the architectural
    /// state changes unless delivery succeeds.
    pub(crate) fn deliver(
        &mut self,
        vector: u8,
        err: Option<u32>,
        kind: EventKind,
        ret_rip: u64,
    ) -> R<()> {
        let ext = if kind == EventKind::External || kind == EventKind::Exception {
            1
        } else {
            0
        };
        let idt_err = (vector as u32) * 8 + 2 + ext;
        if self.st.cr0 & cr0::PE == 0 {
            self.deliver_real(vector, ret_rip)?;
            self.debug_entered(vector, kind);
            return Ok(());
        }
        let long = self.st.long_mode();
        let gsize: u64 = if long { 16 } else { 8 };
        if (vector as u64) * gsize + gsize - 1 > self.st.idtr.limit as u64 {
            return Err(gp(idt_err));
        }
        let ga = self.st.idtr.base.wrapping_add(vector as u64 * gsize);
        let ga = if long { ga } else { ga & 0xffff_ffff };
        let lo = self.read_lin_priv(ga, 8, false)?;
        let hi = if long {
            self.read_lin_priv(ga.wrapping_add(8), 8, false)?
        } else {
            0
        };
        let gtype = ((lo >> 40) & 0xf) as u8;
        let gdpl = ((lo >> 45) & 3) as u8;
        let present = lo & (1 << 47) != 0;
        let cpl = self.st.cpl();
        let (is32, trap) = match (long, gtype) {
            (true, 0xe) => (true, false),
            (true, 0xf) => (true, true),
            (false, 0xe) => (true, false),
            (false, 0xf) => (true, true),
            (false, 0x6) => (false, false),
            (false, 0x7) => (false, true),
            (false, 0x5) => {
                return Err(Fault::Stop(format!(
                    "task gate in IDT vector {vector} (hardware task switching is not supported)"
                )))
            }
            _ => return Err(gp(idt_err)),
        };
        if matches!(kind, EventKind::Software | EventKind::SoftwareException) && gdpl < cpl {
            return Err(gp(idt_err));
        }
        if !present {
            return Err(np(idt_err));
        }
        let sel = ((lo >> 16) & 0xffff) as u16;
        let mut off = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000);
        if long {
            off |= (hi & 0xffff_ffff) << 32;
        }
        if !is32 {
            off &= 0xffff;
        }
        let ist = if long { (lo >> 32) & 7 } else { 0 };
        // Target code segment.
        if sel & !3 == 0 {
            return Err(gp(ext));
        }
        let serr = (sel as u32 & 0xfffc) | ext;
        let daddr = self.descriptor_addr(sel, 8).map_err(|_| gp(serr))?;
        let raw = self.read_lin_priv(daddr, 8, false)?;
        let mut cs = crate::exec::parse_descriptor(raw);
        if !cs.s || cs.type_ & 8 == 0 || cs.dpl > cpl {
            return Err(gp(serr));
        }
        if !cs.present {
            return Err(np(serr));
        }
        if long && (!cs.l || cs.db) {
            return Err(gp(serr));
        }
        let conforming = cs.type_ & 4 != 0;
        let new_cpl = if conforming { cpl } else { cs.dpl };
        cs.selector = (sel & !3) | new_cpl as u16;
        cs.dpl = new_cpl;
        let old_cs = self.st.seg[seg::CS].selector as u64;
        let old_ss = self.st.seg[seg::SS];
        let old_rsp = self.st.gpr[gpr::RSP];
        // A fault pushes RF = 1 (the handler's IRET then restarts the instruction without
        // re-triggering an instruction breakpoint); traps, interrupts and INT n push RF as is.
        let old_flags = if kind == EventKind::Exception && is_fault(vector) {
            self.st.rflags | RF
        } else {
            self.st.rflags
        };
        let errv = err.map(|e| e as u64);
        if long {
            let switch = new_cpl < cpl;
            let mut rsp = if ist != 0 {
                self.tss_read(0x24 + (ist - 1) * 8, 8)?
            } else if switch {
                self.tss_read(4 + new_cpl as u64 * 8, 8)?
            } else {
                old_rsp
            };
            if !crate::cpu::canonical(rsp) {
                return Err(Fault::Exc(12, Some(0)));
            }
            rsp &= !0xf;
            let mut frame = vec![old_ss.selector as u64, old_rsp, old_flags, old_cs, ret_rip];
            if let Some(e) = errv {
                frame.push(e);
            }
            // Write the frame (supervisor accesses), then commit.
            let mut a = rsp;
            for v in &frame {
                a = a.wrapping_sub(8);
                self.write_lin_priv(a, 8, *v, false)?;
            }
            if switch {
                self.st.seg[seg::SS] = Segment {
                    selector: new_cpl as u16,
                    unusable: true,
                    dpl: new_cpl,
                    db: true,
                    ..Segment::default()
                };
            }
            self.st.seg[seg::CS] = cs;
            self.st.gpr[gpr::RSP] = a;
        } else {
            let switch = new_cpl < cpl;
            let wsize: u64 = if is32 { 4 } else { 2 };
            let mut frame = Vec::with_capacity(6);
            let (new_ss, mut sp) = if switch {
                let (esp, ss) = if self.st.tr.type_ & 8 != 0 {
                    (
                        self.tss_read(4 + new_cpl as u64 * 8, 4)?,
                        self.tss_read(8 + new_cpl as u64 * 8, 2)? as u16,
                    )
                } else {
                    (
                        self.tss_read(2 + new_cpl as u64 * 4, 2)?,
                        self.tss_read(4 + new_cpl as u64 * 4, 2)? as u16,
                    )
                };
                frame.push(old_ss.selector as u64);
                frame.push(old_rsp);
                // Validate the new SS as a CPL-new_cpl stack.
                let saved = self.st.seg[seg::SS];
                self.load_seg_for_cpl(seg::SS, ss, new_cpl)
                    .map_err(|_| Fault::Exc(10, Some(ss as u32 & 0xfffc)))?;
                let nss = self.st.seg[seg::SS];
                self.st.seg[seg::SS] = saved;
                (Some(nss), esp)
            } else {
                (None, old_rsp)
            };
            frame.push(old_flags);
            frame.push(old_cs);
            frame.push(ret_rip);
            if let Some(e) = errv {
                frame.push(e);
            }
            let ss_seg = new_ss.unwrap_or(old_ss);
            let spm = if ss_seg.db { 0xffff_ffff } else { 0xffff };
            let mut writes = Vec::with_capacity(frame.len());
            for v in &frame {
                sp = sp.wrapping_sub(wsize) & spm;
                if sp.wrapping_add(wsize - 1) > ss_seg.limit as u64 {
                    return Err(Fault::Exc(12, Some(0)));
                }
                writes.push((ss_seg.base.wrapping_add(sp) & 0xffff_ffff, *v));
            }
            for (a, v) in writes {
                self.write_lin_priv(a, wsize as u32, v, false)?;
            }
            if let Some(nss) = new_ss {
                self.st.seg[seg::SS] = nss;
            }
            self.st.seg[seg::CS] = cs;
            let full = (old_rsp & !spm) | sp;
            self.st.gpr[gpr::RSP] = if new_ss.is_some() { sp } else { full };
            if new_ss.is_some() && !ss_seg.db {
                self.st.gpr[gpr::RSP] = (old_rsp & !0xffff) | sp;
            }
        }
        self.st.rflags &= !(TF | NT | RF | VM);
        if !trap {
            self.st.rflags &= !IF;
        }
        self.st.rip = off;
        self.next_rip = off;
        self.halted = false;
        self.debug_entered(vector, kind);
        Ok(())
    }

    /// Entering a #DB handler clears DR7.GD, so that the handler may use the debug registers.
    fn debug_entered(&mut self, vector: u8, kind: EventKind) {
        if vector == 1 && kind == EventKind::Exception {
            self.st.dr[7] &= !crate::state::dr::DR7_GD;
        }
    }

    fn deliver_real(&mut self, vector: u8, ret_rip: u64) -> R<()> {
        let a = vector as u64 * 4;
        if a + 3 > self.st.idtr.limit as u64 {
            return Err(gp(0));
        }
        let ent = self.read_lin_priv(self.st.idtr.base.wrapping_add(a) & 0xffff_ffff, 4, false)?;
        let sp0 = self.st.gpr[gpr::RSP];
        let cs = self.st.seg[seg::CS].selector as u64;
        let fl = self.st.rflags & 0xffff;
        let r = (|| -> R<()> {
            self.push(fl, 2)?;
            self.push(cs, 2)?;
            self.push(ret_rip & 0xffff, 2)
        })();
        if let Err(e) = r {
            self.st.gpr[gpr::RSP] = sp0;
            return Err(e);
        }
        let sel = (ent >> 16) as u16;
        let c = &mut self.st.seg[seg::CS];
        c.selector = sel;
        c.base = (sel as u64) << 4;
        self.st.rflags &= !(IF | TF | AC | RF);
        self.st.rip = ent & 0xffff;
        self.next_rip = self.st.rip;
        self.halted = false;
        Ok(())
    }

    /// Read `size` bytes at `off` in the current TSS.
    fn tss_read(&mut self, off: u64, size: u32) -> R<u64> {
        let tr = self.st.tr;
        if tr.unusable || !tr.present || off + size as u64 - 1 > tr.limit as u64 {
            return Err(Fault::Exc(10, Some(tr.selector as u32 & 0xfffc)));
        }
        let a = tr.base.wrapping_add(off);
        let a = if self.st.long_mode() {
            a
        } else {
            a & 0xffff_ffff
        };
        Ok(self.read_lin_priv(a, size, false)? & mask(size * 8))
    }
}
