//! Regression tests for engine bugs kvm-unit-tests found (scripts/kvm-unit-tests.sh); each
//! test names the kvm-unit-tests test that exposed it. The suite itself stays outside the
//! repository.

mod common;

use common::*;
use iced_x86::code_asm::*;
use kvmbox_cpu::{Vcpu, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

const RF: u64 = 1 << 16;

/// A handler at `at` that reports the pushed RFLAGS (at `flags_slot` bytes above RSP) on port
/// 0xe9 and resumes `skip` bytes after the saved RIP.
fn report_flags_handler(at: u64, flags_slot: i32, skip: i32) -> Vec<u8> {
    asm64(at, |a| {
        a.mov(rax, qword_ptr(rsp + flags_slot))?;
        a.out(0xe9u32, eax)?;
        if skip != 0 {
            a.add(qword_ptr(rsp), skip)?;
        }
        a.iretq()
    })
}

/// idt_test: a fault (#UD, #GP) pushes RFLAGS with RF set; a trap (INT3) pushes it clear.
#[test]
fn faults_push_rf_traps_do_not() {
    let ud = CODE + 0x1000;
    let bp_at = CODE + 0x2000;
    let code = asm64(CODE, |a| {
        a.ud2()?;
        a.int3()?;
        // RF does not stay set after the handler's IRETQ restarted the next instruction.
        a.pushfq()?;
        a.pop(rax)?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let (mem, _vm, mut v) = long_machine(&code);
    mem.write_slice(&report_flags_handler(ud, 16, 2), GuestAddress(ud))
        .unwrap();
    mem.write_slice(&report_flags_handler(bp_at, 16, 0), GuestAddress(bp_at))
        .unwrap();
    set_gate(&mem, 6, ud, 0, 0, false);
    set_gate(&mem, 3, bp_at, 0, 0, false);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    let w = io.writes(0xe9);
    assert_eq!(w.len(), 3, "{w:x?}");
    assert_eq!(w[0] & RF, RF, "#UD frame: {:#x}", w[0]);
    assert_eq!(w[1] & RF, 0, "INT3 frame: {:#x}", w[1]);
    assert_eq!(w[2] & RF, 0, "RFLAGS after the handlers: {:#x}", w[2]);
}

/// Every test's start-up (pmu_init on an AMD CPU): the legacy PerfEvtSel0-3 / PerfCtr0-3 MSRs
/// exist, keep what is written (counters 48 bits wide) and never count.
#[test]
fn amd_legacy_perf_msrs_read_back() {
    let code = asm64(CODE, |a| {
        for (msr, val) in [(0xc001_0000u32, 0x0043_0076u64), (0xc001_0007, u64::MAX)] {
            a.mov(ecx, msr)?;
            a.mov(eax, val as u32)?;
            a.mov(edx, (val >> 32) as u32)?;
            a.wrmsr()?;
            a.rdmsr()?;
            a.shl(rdx, 32)?;
            a.or(rax, rdx)?;
            a.out(0xe9u32, eax)?;
            a.shr(rax, 32)?;
            a.out(0xe9u32, eax)?;
        }
        a.hlt()
    });
    let (_mem, _vm, mut v) = long_machine(&code);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0xe9), vec![0x0043_0076, 0, 0xffff_ffff, 0xffff]);
}

/// apic (x2apic, xapic): setting IA32_APIC_BASE.EXTD on a CPU whose CPUID has no x2APIC is
/// a #GP, and the MSR keeps its value.
#[test]
fn x2apic_enable_without_cpuid_bit_is_gp() {
    let gp = CODE + 0x1000;
    let code = asm64(CODE, |a| {
        a.mov(ecx, 0x1bu32)?;
        a.rdmsr()?;
        a.mov(ebx, eax)?;
        a.or(eax, 1u32 << 10)?;
        a.wrmsr()?; // 2 bytes: the handler skips it
        a.rdmsr()?;
        a.xor(eax, ebx)?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let handler = asm64(gp, |a| {
        a.mov(eax, 0xd0u32)?;
        a.out(0xe9u32, eax)?;
        a.add(qword_ptr(rsp + 8), 2)?; // past the error code: RIP
        a.add(rsp, 8)?;
        a.iretq()
    });
    let (mem, _vm, mut v) = long_machine(&code);
    mem.write_slice(&handler, GuestAddress(gp)).unwrap();
    set_gate(&mem, 13, gp, 0, 0, false);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0xe9), vec![0xd0, 0]);
}

/// syscall: SYSCALL and SYSRET single-step on TF as they leave it: SYSRET that sets TF traps
/// right after it (in user mode); SYSCALL whose SFMASK clears TF does not trap in the kernel.
#[test]
fn syscall_and_sysret_single_step_on_tf_at_their_end() {
    let db = CODE + 0x1000;
    let user = CODE + 0x2000;
    let target = CODE + 0x3000;
    let code = asm64(CODE, |a| {
        let wr = |a: &mut CodeAssembler, msr: u32, v: u64| -> Result<(), IcedError> {
            a.mov(ecx, msr)?;
            a.mov(eax, v as u32)?;
            a.mov(edx, (v >> 32) as u32)?;
            a.wrmsr()
        };
        wr(a, 0xc000_0080, 0x501)?; // EFER: LME, LMA, SCE
        wr(a, 0xc000_0081, (0x18u64 << 48) | (0x08 << 32))?; // STAR
        wr(a, 0xc000_0082, target)?; // LSTAR
        wr(a, 0xc000_0084, 0x100)?; // SFMASK: TF
        a.mov(rcx, user)?;
        a.mov(r11, 0x102u64)?; // TF
        a.sysretq()
    });
    let user_code = asm64(user, |a| {
        a.nop()?;
        a.syscall()
    });
    let target_code = asm64(target, |a| {
        a.mov(eax, 0xaau32)?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let handler = asm64(db, |a| {
        a.mov(rax, qword_ptr(rsp + 8))?; // CS of the trapping code
        a.out(0xe9u32, eax)?;
        a.iretq()
    });
    let (mem, _vm, mut v) = long_machine(&code);
    for (at, c) in [(db, &handler), (user, &user_code), (target, &target_code)] {
        mem.write_slice(c, GuestAddress(at)).unwrap();
    }
    set_gate(&mem, 1, db, 0, 0, false);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    // After SYSRETQ and after NOP, in user mode (CS 0x2b); none after SYSCALL.
    assert_eq!(io.writes(0xe9), vec![0x2b, 0x2b, 0xaa]);
}

/// A #DB handler at `at` that reports the first byte of the instruction it returns to (so
/// the test reads where each trap came without knowing instruction addresses) and DR6 (then
/// clears it) on port 0xe9.
fn report_db_handler(at: u64) -> Vec<u8> {
    asm64(at, |a| {
        a.mov(rax, qword_ptr(rsp))?;
        a.movzx(eax, byte_ptr(rax))?;
        a.out(0xe9u32, eax)?;
        a.mov(rax, dr6)?;
        a.out(0xe9u32, eax)?;
        a.xor(eax, eax)?;
        a.mov(dr6, rax)?;
        a.iretq()
    })
}

/// debug: MOV SS blocks the single-step trap of its own instruction (the next one traps as
/// usual); ICEBP's #DB is its only trap; a HLT's trap comes when the CPU leaves the halt,
/// returning after the HLT.
#[test]
fn single_step_after_mov_ss_icebp_and_hlt() {
    const PUSH_RAX: u64 = 0x50;
    const POPFQ: u64 = 0x9d;
    const HLT: u64 = 0xf4;
    const MOV_EDX: u64 = 0xba;
    const BS: u64 = 1 << 14;
    let db = CODE + 0x1000;
    let code = asm64(CODE, |a| {
        a.pushfq()?;
        a.pop(rax)?;
        a.or(rax, 0x100)?; // TF
        a.push(rax)?;
        a.mov(cx, ss)?;
        a.popfq()?; // TF on: no trap after POPF, which found it clear
        a.mov(ss, cx)?; // no trap: MOV SS blocks it
        a.db(&[0xf1])?; // ICEBP: its #DB (no BS), no single-step trap
        a.and(rax, !0x100)?; // traps before PUSH
        a.push(rax)?; // traps before POPFQ
        a.popfq()?; // TF off, traps (TF was set) before HLT
        a.hlt()?; // first exit
        a.pushfq()?;
        a.pop(rax)?;
        a.or(rax, 0x100)?;
        a.push(rax)?;
        a.popfq()?;
        a.hlt()?; // second exit; its trap when the vCPU runs again
        a.mov(edx, 0u32)?; // the HLT's trap returns here (and TF goes on trapping)
        a.hlt()
    });
    let (mem, _vm, mut v) = long_machine(&code);
    mem.write_slice(&report_db_handler(db), GuestAddress(db))
        .unwrap();
    set_gate(&mem, 1, db, 0, 0, false);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    let w = io.writes(0xe9);
    let traps: Vec<(u64, bool)> = w.chunks(2).map(|p| (p[0], p[1] & BS != 0)).collect();
    assert_eq!(
        traps,
        vec![(0x48, false), (PUSH_RAX, true), (POPFQ, true), (HLT, true)],
        "(first byte at the return address, DR6.BS) of each #DB: {w:x?}"
    );
    // The second HLT halts with TF set and no trap yet; running again leaves the halt.
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0xe9).len(), 8);
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    let w = io.writes(0xe9);
    assert_eq!((w[8], w[9] & BS), (MOV_EDX, BS), "the HLT's trap: {w:x?}");
}

/// A #DB handler at `at` that reports the first byte of the instruction it returns to and
/// DR6 on port 0xe9, clears DR6 and returns with RF set (so an instruction breakpoint lets
/// the instruction run).
fn resume_db_handler(at: u64) -> Vec<u8> {
    asm64(at, |a| {
        a.mov(rax, qword_ptr(rsp))?;
        a.movzx(eax, byte_ptr(rax))?;
        a.out(0xe9u32, eax)?;
        a.mov(rax, dr6)?;
        a.out(0xe9u32, eax)?;
        a.xor(eax, eax)?;
        a.mov(dr6, rax)?;
        a.or(qword_ptr(rsp + 16), RF as i32)?;
        a.iretq()
    })
}

const DR6_FIXED: u64 = 0xffff_0ff0;
const DR6_BD: u64 = 1 << 13;
const DR6_BS: u64 = 1 << 14;

/// debug: an instruction breakpoint (DR0, DR7.G0, R/W 00) is a fault before the instruction,
/// with DR6.B0 set, B1 (left by software) cleared and BS kept; RF from the handler's IRETQ
/// lets the instruction run once, and the next time it faults again. DR7.GD makes a MOV DR a
/// fault with DR6.BD, and entering the handler clears GD.
#[test]
fn instruction_breakpoint_and_general_detect() {
    const NOP: u64 = 0x90;
    const MOV_DR: u64 = 0x0f;
    let target = CODE + 0x800;
    let db = CODE + 0x1000;
    let code = asm64(CODE, |a| {
        a.mov(rax, target)?;
        a.mov(dr0, rax)?;
        a.mov(eax, 0x402u32)?; // G0, R/W0 = 00 (execute), LEN0 = 00
        a.mov(dr7, rax)?;
        a.mov(eax, 0x4002u32)?; // BS and B1
        a.mov(dr6, rax)?;
        a.call(target)?;
        a.call(target)?;
        a.mov(eax, 0x2400u32)?; // GD, no breakpoints
        a.mov(dr7, rax)?;
        a.mov(rax, dr0)?; // #DB with BD; the handler's IRETQ runs it again
        a.mov(rax, dr7)?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let (mem, _vm, mut v) = long_machine(&code);
    let sub = asm64(target, |a| {
        a.nop()?;
        a.ret()
    });
    mem.write_slice(&sub, GuestAddress(target)).unwrap();
    mem.write_slice(&resume_db_handler(db), GuestAddress(db))
        .unwrap();
    set_gate(&mem, 1, db, 0, 0, false);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(
        io.writes(0xe9),
        vec![
            NOP,
            DR6_FIXED | DR6_BS | 1,
            NOP,
            DR6_FIXED | 1,
            MOV_DR,
            DR6_FIXED | DR6_BD,
            0x400,
        ],
        "(first byte at the return address, DR6) of each #DB, then DR7"
    );
}

/// debug: data breakpoints are traps after the access, on the aligned range DR1 and LEN give
/// (4 bytes here): R/W 01 on writes only (plain, LOCK read-modify-write, REP STOS, which traps
/// after the iteration that hit it), R/W 11 on reads too; a MOV SS's hit waits for the end of
/// the next instruction.
#[test]
fn data_breakpoints_trap_after_the_access() {
    const MOV_ECX: u64 = 0xb9;
    const MOV_EDX: u64 = 0xba;
    const REP: u64 = 0xf3;
    const B1: u64 = 2;
    let watched = DATA + 4;
    let db = CODE + 0x1000;
    let code = asm64(CODE, |a| {
        a.mov(cx, ss)?;
        a.mov(word_ptr(watched), cx)?;
        a.mov(rax, watched + 1)?; // aligned down to `watched` by LEN = 4 bytes
        a.mov(dr1, rax)?;
        a.mov(eax, 0xd0_0408u32)?; // G1, R/W1 = 01 (writes), LEN1 = 11 (4 bytes)
        a.mov(dr7, rax)?;
        a.mov(eax, dword_ptr(watched))?; // a read: no trap
        a.mov(byte_ptr(watched + 3), 1)?; // trap
        a.mov(ecx, 1u32)?;
        a.mov(qword_ptr(DATA), rcx)?; // DATA..DATA+8 overlaps: trap
        a.mov(ecx, 2u32)?;
        a.mov(dword_ptr(DATA + 8), ecx)?; // beside it: no trap
        a.lock().inc(dword_ptr(watched))?; // trap
        a.mov(ecx, 3u32)?;
        a.mov(rdi, DATA)?;
        a.mov(ecx, 16u32)?;
        a.rep().stosb()?; // traps after byte 4 (the REP resumes), then after bytes 5-7
        a.mov(eax, 0xf0_0408u32)?; // R/W1 = 11 (reads and writes)
        a.mov(dr7, rax)?;
        a.mov(ss, word_ptr(watched))?; // a read: its trap waits one instruction
        a.nop()?;
        a.mov(edx, 0u32)?;
        a.hlt()
    });
    let (mem, _vm, mut v) = long_machine(&code);
    mem.write_slice(&report_db_handler(db), GuestAddress(db))
        .unwrap();
    set_gate(&mem, 1, db, 0, 0, false);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    let w = io.writes(0xe9);
    let traps: Vec<(u64, u64)> = w.chunks(2).map(|p| (p[0], p[1])).collect();
    let b1 = DR6_FIXED | B1;
    assert_eq!(
        traps,
        vec![
            (MOV_ECX, b1),
            (MOV_ECX, b1),
            (MOV_ECX, b1),
            (REP, b1),
            (REP, b1),
            (REP, b1),
            (REP, b1),
            (MOV_EDX, b1),
        ],
        "(first byte at the return address, DR6) of each #DB: {w:x?}"
    );
}

/// realmode: the decimal-arithmetic instructions and SALC (legacy modes only), each checked
/// against the worked examples of the Intel SDM (DAA, DAS, AAA, AAS) and plain arithmetic (AAM,
/// AAD, SALC). The guest runs each case from a table: AX and FLAGS in, the instruction, AX and
/// FLAGS out.
#[test]
fn decimal_arithmetic_and_salc_in_32_bit_mode() {
    const TABLE: u64 = DATA;
    const CF: u16 = 1;
    const PF: u16 = 4;
    const AF: u16 = 0x10;
    const SF: u16 = 0x80;
    // (instruction, AX in, FLAGS in, AX out, flags out under `check`).
    type Case = (
        fn(&mut CodeAssembler) -> Result<(), IcedError>,
        u16,
        u16,
        u16,
        u16,
        u16,
    );
    let szapc = SF | 0x40 | AF | PF | CF;
    let cases: [Case; 8] = [
        // SDM DAA: ADD AL=79H, 35H gives AEH; DAA gives 14H, OSZAPC = X00111.
        (|a| a.daa(), 0x00ae, 0, 0x0014, AF | PF | CF, szapc),
        // SDM DAS: SUB AL=35H, 47H gives EEH with OSZAPC = 010111; DAS gives 88H, X10111.
        (
            |a| a.das(),
            0x00ee,
            SF | AF | PF | CF,
            0x0088,
            SF | AF | PF | CF,
            szapc,
        ),
        // SDM AAA: ADD AL=05H, 06H gives AX=000BH; AAA gives AX=0101H, AF = CF = 1.
        (|a| a.aaa(), 0x000b, 0, 0x0101, AF | CF, AF | CF),
        // SDM AAS: SUB AL=05H, 06H gives AX=00FFH (AF set); AAS gives AX=FF09H, AF = CF = 1.
        (|a| a.aas(), 0x00ff, AF | CF, 0xff09, AF | CF, AF | CF),
        // AAM: AL=10H (16) = 1 * 10 + 6.
        (|a| a.aam(10), 0x3210, 0, 0x0106, PF, szapc),
        // AAD: 78H + 56H * 10 = 3D4H, AL = D4H, AH = 0.
        (|a| a.aad(10), 0x5678, 0, 0x00d4, SF | PF, szapc),
        // SALC: AL = CF ? FFH : 0, flags unchanged.
        (|a| a.db(&[0xd6]), 0x1234, 0, 0x1200, 0, szapc),
        (|a| a.db(&[0xd6]), 0x1234, CF, 0x12ff, CF, szapc),
    ];
    let mut code = Vec::new();
    let mut at = CODE;
    for (i, case) in cases.iter().enumerate() {
        let slot = (TABLE + i as u64 * 8) as u32;
        let piece = asm(32, at, |a| {
            a.movzx(eax, word_ptr(slot + 2))?;
            a.or(eax, 2)?;
            a.push(eax)?;
            a.popfd()?;
            a.mov(ax, word_ptr(slot))?;
            (case.0)(a)?;
            a.mov(word_ptr(slot + 4), ax)?;
            a.pushfd()?;
            a.pop(eax)?;
            a.mov(word_ptr(slot + 6), ax)
        });
        at += piece.len() as u64;
        code.extend(piece);
    }
    code.extend(asm(32, at, |a| a.hlt()));
    let mem = guest_mem();
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    for (i, c) in cases.iter().enumerate() {
        mem.write_obj(c.1, GuestAddress(TABLE + i as u64 * 8))
            .unwrap();
        mem.write_obj(c.2, GuestAddress(TABLE + i as u64 * 8 + 2))
            .unwrap();
    }
    let mut v = flat32_vcpu(&mem);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    for (i, c) in cases.iter().enumerate() {
        let ax_out: u16 = mem
            .read_obj(GuestAddress(TABLE + i as u64 * 8 + 4))
            .unwrap();
        let fl: u16 = mem
            .read_obj(GuestAddress(TABLE + i as u64 * 8 + 6))
            .unwrap();
        assert_eq!(
            (ax_out, fl & c.5),
            (c.3, c.4),
            "case {i}: AX {:#06x} FLAGS {:#x} in",
            c.1,
            c.2
        );
    }
}

/// A vCPU in flat 32-bit protected mode (no paging) at [`CODE`], stack below 0x80000.
fn flat32_vcpu(mem: &kvmbox_cpu::GuestMemoryMmap) -> kvmbox_emu::EmuVcpu {
    const GDT: u64 = 0x800;
    w64(mem, GDT + 8, 0x00cf_9a00_0000_ffff);
    w64(mem, GDT + 16, 0x00cf_9200_0000_ffff);
    let vm = kvmbox_emu::EmuVm::new(mem.clone());
    let mut v = vm.create_emu_vcpu(0).unwrap();
    let data = seg(0x10, false, 0);
    v.set_sregs(&kvmbox_cpu::SpecialRegs {
        cs: kvmbox_cpu::Segment {
            l: false,
            db: true,
            ..seg(0x08, true, 0)
        },
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        ldt: kvmbox_cpu::Segment {
            unusable: true,
            ..kvmbox_cpu::Segment::default()
        },
        gdt: kvmbox_cpu::DescriptorTable {
            base: GDT,
            limit: 0x17,
        },
        cr0: 0x11,
        ..kvmbox_cpu::SpecialRegs::default()
    })
    .unwrap();
    v.set_regs(&kvmbox_cpu::Regs {
        rip: CODE,
        rsp: 0x80000,
        rflags: 2,
        ..kvmbox_cpu::Regs::default()
    })
    .unwrap();
    v
}

/// realmode: a real-mode IRET loads only the writable FLAGS bits: reserved bits 3, 5 and 15 of
/// the popped word stay clear (they read back set before the fix, and the DAS and SAHF checks,
/// which compare FLAGS, failed).
#[test]
fn real_mode_iret_keeps_reserved_flags_clear() {
    let code = asm(16, 0, |a| {
        let mut do_iret = a.create_label();
        a.mov(ax, 0x8029u32)?; // CF and reserved bits 3, 5, 15
        a.push(ax)?;
        a.push(cs)?;
        a.call(do_iret)?; // pushes the IP IRET returns to
        a.pushf()?;
        a.pop(ax)?;
        a.out(0xe9, ax)?;
        a.hlt()?;
        a.set_label(&mut do_iret)?;
        a.iret()
    });
    let mem = guest_mem();
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    let vm = kvmbox_emu::EmuVm::new(mem.clone());
    let mut v = vm.create_emu_vcpu(0).unwrap();
    {
        let st = v.state_mut();
        st.seg[1].selector = (CODE >> 4) as u16;
        st.seg[1].base = CODE;
        st.rip = 0;
        st.gpr[4] = 0x8000;
    }
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0xe9), vec![0x0003]);
}
