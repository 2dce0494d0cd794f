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
