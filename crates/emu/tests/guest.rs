//! Small guests run end to end in an EmuVm: results are checked through recorded port writes.

mod common;

use common::*;
use iced_x86::code_asm::*;
use iced_x86::IcedError;
use kvmbox_cpu::{Vcpu, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

#[test]
fn compute_loop_and_port_output() {
    let code = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.xor(eax, eax)?;
        a.mov(ecx, 1000u32)?;
        a.set_label(&mut top)?;
        a.add(rax, rcx)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.mov(dx, 0x3f8u32)?;
        a.out(dx, eax)?;
        // Memory round trip through the stack and a data page.
        a.push(rax)?;
        a.pop(rbx)?;
        a.mov(rdi, DATA)?;
        a.mov(qword_ptr(rdi + 8), rbx)?;
        a.mov(rsi, qword_ptr(rdi + 8))?;
        a.lea(rsi, ptr(rsi + rsi * 2 + 1))?;
        a.mov(eax, esi)?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let (_mem, _vm, mut v) = long_machine(&code);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0x3f8), vec![500500]);
    assert_eq!(io.writes(0xe9), vec![500500 * 3 + 1]);
    assert_eq!(v.stats().unimplemented_total, 0);
}

#[test]
fn exceptions_go_through_the_idt_with_error_codes_and_cr2() {
    // #DE handler: report vector 0 and skip the 2-byte div. #PF handler: report CR2 and the
    // error code, then map the page and retry.
    let de_handler = CODE + 0x1000;
    let pf_handler = CODE + 0x2000;
    let code = asm64(CODE, |a| {
        a.xor(ecx, ecx)?;
        a.mov(eax, 7u32)?;
        a.div(ecx)?; // #DE
        a.mov(rax, 0x100_0123u64)?; // 16 MiB + 0x123: mapped through PT, entry 0 not present
        a.mov(byte_ptr(rax), 0x5au32)?;
        a.movzx(eax, byte_ptr(rax))?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let de = asm64(de_handler, |a| {
        a.mov(eax, 0xdeu32)?;
        a.out(0xe9u32, eax)?;
        a.add(qword_ptr(rsp), 2)?;
        a.iretq()
    });
    let pf = asm64(pf_handler, |a| {
        a.pop(rbx)?; // error code
        a.push(rax)?;
        a.mov(rax, cr2)?;
        a.out(0xe9u32, eax)?;
        a.mov(eax, ebx)?;
        a.out(0xe9u32, eax)?;
        // Map 16 MiB with a present, writable page and flush it.
        a.mov(rax, 0x180_0000u64 | 3)?;
        a.mov(rdi, PT)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.mov(rax, 0x100_0000u64)?;
        a.invlpg(byte_ptr(rax))?;
        a.pop(rax)?;
        a.iretq()
    });
    let (mem, _vm, mut v) = long_machine(&code);
    mem.write_slice(&de, GuestAddress(de_handler)).unwrap();
    mem.write_slice(&pf, GuestAddress(pf_handler)).unwrap();
    set_gate(&mem, 0, de_handler, 0, 0, false);
    set_gate(&mem, 14, pf_handler, 1, 0, false);
    w64(&mem, PD + 8 * 8, PT | 3);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0xe9), vec![0xde, 0x100_0123, 2, 0x5a]);
    // The write went to the page the handler mapped, with A and D set in the PTE.
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x180_0123)).unwrap(), 0x5a);
    assert_eq!(r64(&mem, PT) & 0x60, 0x60);
}

#[test]
fn ring3_syscall_int_and_gp_use_tss_stacks() {
    let user = CODE + 0x1000;
    let sys = CODE + 0x2000;
    let int80 = CODE + 0x3000;
    let gp = CODE + 0x4000;
    let code = asm64(CODE, |a| {
        // STAR: kernel CS 0x08, user base 0x18; LSTAR = sys.
        a.mov(ecx, 0xc000_0081u32)?;
        a.xor(eax, eax)?;
        a.mov(edx, 0x0018_0008u32)?;
        a.wrmsr()?;
        a.mov(ecx, 0xc000_0082u32)?;
        a.mov(eax, sys as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(ecx, 0xc000_0084u32)?;
        a.mov(eax, 0x200u32)?; // SFMASK: clear IF
        a.wrmsr()?;
        // iretq to ring 3.
        for v in [UDATA as u64, USTACK, 0x202, UCODE as u64, user] {
            a.mov(rax, v)?;
            a.push(rax)?;
        }
        a.iretq()
    });
    let u = asm64(user, |a| {
        a.mov(eax, 1u32)?;
        a.syscall()?;
        a.mov(eax, 2u32)?;
        a.int(0x80)?;
        a.cli()?; // #GP in ring 3 with IOPL 0
        a.hlt()
    });
    let s = asm64(sys, |a| {
        a.mov(rbx, rsp)?; // still the user stack (SYSCALL does not switch stacks)
        a.out(0xe9u32, eax)?;
        a.mov(eax, ebx)?;
        a.out(0xe9u32, eax)?;
        a.sysretq()
    });
    let i = asm64(int80, |a| {
        a.out(0xe9u32, eax)?;
        a.mov(rax, rsp)?;
        a.out(0xe9u32, eax)?; // TSS.RSP0 - 5 * 8
        a.mov(rax, qword_ptr(rsp + 8))?; // saved CS
        a.out(0xe9u32, eax)?;
        a.iretq()
    });
    let g = asm64(gp, |a| {
        a.pop(rax)?; // error code
        a.out(0xe9u32, eax)?;
        a.mov(rax, rsp)?;
        a.out(0xe9u32, eax)?; // IST1 - 5 * 8
        a.hlt()
    });
    let (mem, _vm, mut v) = long_machine(&code);
    for (addr, c) in [(user, &u), (sys, &s), (int80, &i), (gp, &g)] {
        mem.write_slice(c, GuestAddress(addr)).unwrap();
    }
    set_gate(&mem, 0x80, int80, 0, 3, false);
    set_gate(&mem, 13, gp, 1, 0, false);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(
        io.writes(0xe9),
        vec![1, USTACK, 2, KSTACK - 40, UCODE as u64, 0, ISTSTACK - 40]
    );
    assert_eq!(v.state().seg[1].selector, KCODE);
}

#[test]
fn real_mode_to_long_mode_like_the_smp_trampoline() {
    // Real mode at 0x8000 (CS=0x800): lgdt, CR0.PE, far jump to 32-bit code, PAE + CR3 +
    // EFER.LME + CR0.PG, far jump to 64-bit code.
    let rm = 0x8000u64;
    let pm = 0x8100u64;
    let lm = 0x8200u64;
    let gdtr = 0x8300u64;
    let r = asm(16, 0, |a| {
        a.cli()?;
        a.mov(ax, 0x800u32)?;
        a.mov(ds, ax)?;
        a.lgdt(ptr(0x300u32))?;
        a.mov(eax, cr0)?;
        a.or(eax, 1)?;
        a.mov(cr0, eax)?;
        // jmp dword 0x18:pm (66 ea imm32 imm16)
        let mut b = vec![0x66, 0xea];
        b.extend_from_slice(&(pm as u32).to_le_bytes());
        b.extend_from_slice(&CODE32.to_le_bytes());
        a.db(&b)
    });
    let p = asm(32, pm, |a| {
        a.mov(ax, KDATA as u32)?;
        a.mov(ds, ax)?;
        a.mov(ss, ax)?;
        a.mov(esp, 0x7ff0u32)?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x20)?;
        a.mov(cr4, eax)?;
        a.mov(eax, PML4 as u32)?;
        a.mov(cr3, eax)?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.or(eax, 0x100)?;
        a.wrmsr()?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0000u32 as i32)?;
        a.mov(cr0, eax)?;
        let mut b = vec![0xea];
        b.extend_from_slice(&(lm as u32).to_le_bytes());
        b.extend_from_slice(&KCODE.to_le_bytes());
        a.db(&b)
    });
    let l = asm64(lm, |a| {
        a.mov(rax, 0x1234_5678_9abc_def0u64)?;
        a.mov(rbx, rax)?;
        a.shr(rbx, 32)?;
        a.out(0xe9u32, eax)?;
        a.mov(eax, ebx)?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let mem = guest_mem();
    build_tables(&mem);
    mem.write_slice(&r, GuestAddress(rm)).unwrap();
    mem.write_slice(&p, GuestAddress(pm)).unwrap();
    mem.write_slice(&l, GuestAddress(lm)).unwrap();
    mem.write_obj(0x3fu16, GuestAddress(gdtr)).unwrap();
    mem.write_obj(GDT as u32, GuestAddress(gdtr + 2)).unwrap();
    let vm = kvmbox_emu::EmuVm::new(mem.clone());
    let mut v = vm.create_emu_vcpu(1).unwrap();
    {
        // As after a SIPI with vector 8.
        let st = v.state_mut();
        st.seg[1].selector = 0x800;
        st.seg[1].base = 0x8000;
        st.rip = 0;
    }
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0xe9), vec![0x9abc_def0, 0x1234_5678]);
    assert!(v.state().mode64());
}

/// Run `v0` and a second vCPU of `vm` at the same code (long mode, CODE, its own stack) on
/// two threads, each until it halts.
fn run_with_a_second_vcpu_to_halt(vm: &kvmbox_emu::EmuVm, v0: kvmbox_emu::EmuVcpu) {
    let mut v1 = vm.create_emu_vcpu(1).unwrap();
    v1.set_sregs(&long_sregs()).unwrap();
    v1.set_regs(&kvmbox_cpu::Regs {
        rip: CODE,
        rsp: KSTACK - 0x1000,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
    let hs: Vec<_> = [v0, v1]
        .into_iter()
        .map(|mut v| {
            std::thread::spawn(move || {
                let io = Recorder::default();
                v.run(&io).unwrap()
            })
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), VcpuExit::Halted);
    }
}

#[test]
fn locked_increments_are_atomic_across_vcpu_threads() {
    const N: u32 = 20_000;
    let code = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.mov(rdi, DATA)?;
        a.mov(ecx, N)?;
        a.set_label(&mut top)?;
        a.lock().inc(qword_ptr(rdi))?;
        a.mov(eax, 1u32)?;
        a.lock().xadd(qword_ptr(rdi + 8), rax)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    let (mem, vm, v0) = long_machine(&code);
    run_with_a_second_vcpu_to_halt(&vm, v0);
    assert_eq!(r64(&mem, DATA), 2 * N as u64);
    assert_eq!(r64(&mem, DATA + 8), 2 * N as u64);
}

#[test]
fn string_ops_port_io_and_mmio() {
    let code = asm64(CODE, |a| {
        // rep stosb 100 bytes of 0x11 at DATA, rep movsq 8 qwords DATA -> DATA+0x1000.
        a.mov(rdi, DATA)?;
        a.mov(al, 0x11)?;
        a.mov(ecx, 100u32)?;
        a.rep().stosb()?;
        a.mov(rsi, DATA)?;
        a.mov(rdi, DATA + 0x1000)?;
        a.mov(ecx, 8u32)?;
        a.rep().movsq()?;
        a.mov(rax, qword_ptr(DATA + 0x1000 + 56))?;
        a.out(0xe9u32, eax)?;
        // repne scasb for 0 in "abc\0".
        a.mov(rdi, DATA + 0x2000)?;
        a.mov(dword_ptr(rdi), 0x0063_6261u32)?;
        a.xor(eax, eax)?;
        a.mov(rcx, -1i64)?;
        a.repne().scasb()?;
        a.not(rcx)?;
        a.dec(rcx)?;
        a.mov(eax, ecx)?;
        a.out(0xe9u32, eax)?;
        // rep outsb of "abc" to port 0x80; in from port 0x60.
        a.mov(rsi, DATA + 0x2000)?;
        a.mov(ecx, 3u32)?;
        a.mov(dx, 0x80u32)?;
        a.rep().outsb()?;
        a.in_(al, 0x60)?;
        a.out(0xe9u32, al)?;
        // MMIO (outside RAM) read and write.
        a.mov(rdi, 0xd000_0000u64)?;
        a.mov(dword_ptr(rdi + 4), 0xcafe_f00du32)?;
        a.mov(eax, dword_ptr(rdi))?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let (_mem, _vm, mut v) = long_machine(&code);
    let io = Recorder::default();
    // The first GiB is mapped; 0xd0000000 is above it: map 3 GiB..4 GiB via PDPT[3].
    let mem = _mem;
    w64(&mem, PDPT + 3 * 8, 0xc000_0000 | 0x83);
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0xe9), vec![0x1111_1111, 3, 0x60, 0xabab_abab]);
    assert_eq!(io.writes(0x80), vec![0x61, 0x62, 0x63]);
    assert_eq!(
        io.mmio.lock().unwrap().clone(),
        vec![(0xd000_0004, 0xcafe_f00du32.to_le_bytes().to_vec())]
    );
}

#[test]
fn unimplemented_instruction_raises_ud_and_is_counted() {
    let ud = CODE + 0x1000;
    let code = asm64(CODE, |a| {
        a.vaddps(ymm0, ymm1, ymm2)?; // AVX: not implemented, not advertised
        a.hlt()
    });
    let h = asm64(ud, |a| {
        a.mov(eax, 6u32)?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let (mem, _vm, mut v) = long_machine(&code);
    mem.write_slice(&h, GuestAddress(ud)).unwrap();
    set_gate(&mem, 6, ud, 0, 0, false);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0xe9), vec![6]);
    assert_eq!(v.stats().unimplemented_total, 1);
}

#[test]
fn triple_fault_is_a_shutdown() {
    // No IDT entries at all: #UD -> #GP (not present gate => #NP) -> #DF -> shutdown.
    let code = asm64(CODE, |a| a.ud2());
    let (_mem, _vm, mut v) = long_machine(&code);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Shutdown);
}

#[test]
fn kicker_interrupts_an_endless_loop() {
    let code = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.jmp(top)
    });
    let (_mem, _vm, mut v) = long_machine(&code);
    let k = v.kicker();
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        k.kick();
    });
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Kicked);
    t.join().unwrap();
}

#[test]
fn sse2_and_fxsave() {
    let code = asm64(CODE, |a| {
        a.mov(rdi, DATA)?;
        a.mov(dword_ptr(rdi), 0x0044_4241u32)?; // "ABD\0"
        a.movdqu(xmm0, xmmword_ptr(rdi))?;
        a.pxor(xmm1, xmm1)?;
        a.pcmpeqb(xmm1, xmm0)?;
        a.pmovmskb(eax, xmm1)?;
        a.bsf(eax, eax)?;
        a.out(0xe9u32, eax)?; // strlen = 3
        a.mov(rax, 0x4009_21fb_5444_2d18u64)?; // pi
        a.movq(xmm2, rax)?;
        a.addsd(xmm2, xmm2)?;
        a.cvttsd2si(eax, xmm2)?;
        a.out(0xe9u32, eax)?; // 6
        a.fxsave64(ptr(rdi + 0x100))?;
        a.mov(eax, dword_ptr(rdi + 0x100 + 24))?; // MXCSR
        a.out(0xe9u32, eax)?;
        a.mov(rax, qword_ptr(rdi + 0x100 + 160 + 32))?; // XMM2 low
        a.shr(rax, 32)?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let (_mem, _vm, mut v) = long_machine(&code);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0xe9), vec![3, 6, 0x1f80, 0x4019_21fb]);
}

#[test]
fn cpuid_lists_the_engine_model() {
    let (_mem, _vm, mut v) = long_machine(&[0xf4]);
    v.configure(&kvmbox_cpu::VcpuConfig { id: 1, count: 2 })
        .unwrap();
    let t = v.cpuid().unwrap();
    let l1 = t.iter().find(|e| e.function == 1).unwrap();
    assert_eq!(l1.ebx >> 24, 1, "APIC ID");
    assert_eq!((l1.ebx >> 16) & 0xff, 2, "logical count");
    assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
    assert_eq!(l1.ecx & (1 << 28), 0, "no AVX");
    assert_eq!(l1.ecx & (1 << 26), 0, "no XSAVE");
    assert_ne!(l1.ecx & (1 << 13), 0, "CX16 (CMPXCHG16B)");
    let h = t.iter().find(|e| e.function == 0x4000_0000).unwrap();
    let mut sig = Vec::new();
    for r in [h.ebx, h.ecx, h.edx] {
        sig.extend_from_slice(&r.to_le_bytes());
    }
    assert_eq!(&sig, b"KVMBOXEMU\0\0\0");
}

struct Msrs(std::sync::Mutex<Vec<(u32, u32, u64)>>);
impl kvmbox_emu::MsrHandler for Msrs {
    fn read_msr(&self, _vcpu: u32, index: u32) -> Option<u64> {
        (index == 0x4b56_4d01).then_some(0x77)
    }
    fn write_msr(&self, vcpu: u32, index: u32, value: u64) -> bool {
        self.0.lock().unwrap().push((vcpu, index, value));
        index == 0x4b56_4d01
    }
}

#[test]
fn cpuid_overrides_and_msr_handler_reach_the_guest() {
    let gp = CODE + 0x1000;
    let code = asm64(CODE, |a| {
        a.mov(eax, 0x15u32)?;
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.out(0xe9u32, eax)?;
        a.xor(eax, eax)?;
        a.cpuid()?;
        a.out(0xe9u32, eax)?; // max basic leaf raised to 0x15
        a.mov(ecx, 0x4b56_4d01u32)?;
        a.mov(eax, 0x1001u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.rdmsr()?;
        a.out(0xe9u32, eax)?;
        a.mov(ecx, 0x4b56_4d00u32)?;
        a.rdmsr()?; // unknown to both: #GP
        a.hlt()
    });
    let h = asm64(gp, |a| {
        a.mov(eax, 13u32)?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let mem = guest_mem();
    build_tables(&mem);
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    mem.write_slice(&h, GuestAddress(gp)).unwrap();
    set_gate(&mem, 13, gp, 0, 0, false);
    let vm = kvmbox_emu::EmuVm::new(mem.clone());
    let msrs = std::sync::Arc::new(Msrs(Default::default()));
    vm.set_msr_handler(msrs.clone());
    vm.set_cpuid_overrides(vec![kvmbox_cpu::CpuidEntry {
        function: 0x15,
        eax: 1,
        ebx: 100,
        ecx: 25_000_000,
        ..Default::default()
    }]);
    let mut v = long_vcpu(&vm);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0xe9), vec![1, 0x15, 0x77, 13]);
    assert_eq!(
        msrs.0.lock().unwrap().clone(),
        vec![(0, 0x4b56_4d01, 0x1001)]
    );
}

/// kvm-clock as Linux's kvmclock_init() uses it: the KVM signature and features in CPUID,
/// the per-vCPU record and the wall clock written where the guest asks, a record outside RAM
/// ignored, the record rewritten when the guest moves its TSC.
#[test]
fn kvm_clock_through_cpuid_and_msrs() {
    const RECORD: u64 = DATA + 0x40;
    const WALL: u64 = DATA + 0x100;
    let code = asm64(CODE, |a| {
        a.mov(eax, 0x4000_0000u32)?;
        a.cpuid()?;
        a.out(0xe9u32, eax)?;
        a.mov(eax, ebx)?;
        a.out(0xe9u32, eax)?;
        a.mov(eax, 0x4000_0001u32)?;
        a.cpuid()?;
        a.out(0xe9u32, eax)?;
        a.mov(ecx, 0x4b56_4d01u32)?;
        a.mov(eax, (RECORD | 1) as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.rdmsr()?;
        a.out(0xe9u32, eax)?;
        a.mov(ecx, 0x4b56_4d00u32)?;
        a.mov(eax, WALL as u32)?;
        a.wrmsr()?;
        a.hlt()?;
        // Second run: a record beyond RAM is accepted and not written; then back, and the
        // guest sets its TSC to 0.
        a.mov(ecx, 0x4b56_4d01u32)?;
        a.mov(eax, 0xffff_f001u32)?;
        a.mov(edx, 0x10u32)?;
        a.wrmsr()?;
        a.mov(eax, (RECORD | 1) as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(ecx, 0x10u32)?;
        a.xor(eax, eax)?;
        a.wrmsr()?;
        a.hlt()
    });
    let (mem, vm, _) = long_machine(&code);
    let hz = 2_000_000_000;
    vm.enable_kvm_clock(hz, true);
    let clock = vm.kvm_clock().unwrap();
    let mut v = long_vcpu(&vm);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(
        io.writes(0xe9),
        vec![
            0x4000_0001,
            u64::from(u32::from_le_bytes(*b"KVMK")),
            (1 << 3) | (1 << 24),
            RECORD | 1
        ]
    );
    let record = |mem: &kvmbox_cpu::GuestMemoryMmap| {
        let mut b = [0u8; 32];
        mem.read_slice(&mut b, GuestAddress(RECORD)).unwrap();
        b
    };
    let b = record(&mem);
    let version = u32::from_le_bytes(b[0..4].try_into().unwrap());
    assert!(version != 0 && version % 2 == 0, "version {version}");
    let info = clock.time_info(version, 0);
    assert_eq!(b, info.to_bytes());
    assert_eq!(b[29], 1, "PVCLOCK_TSC_STABLE_BIT");
    // Guest time at the host TSC now: no more than the time since enable_kvm_clock.
    // SAFETY: RDTSC only reads the time-stamp counter.
    let now = unsafe { core::arch::x86_64::_rdtsc() };
    let elapsed = (now - clock.host_tsc_origin) as f64 / hz as f64 * 1e9;
    assert!((info.ns_at(now) as f64 - elapsed).abs() < 1e3);
    // The wall clock: Unix time at system time 0, i.e. about now.
    let mut w = [0u8; 12];
    mem.read_slice(&mut w, GuestAddress(WALL)).unwrap();
    let sec = u64::from(u32::from_le_bytes(w[4..8].try_into().unwrap()));
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(unix.abs_diff(sec) <= 2, "wall clock {sec} vs {unix}");
    assert_eq!(u32::from_le_bytes(w[0..4].try_into().unwrap()) % 2, 0);

    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    let b = record(&mem);
    let moved = v.state().tsc_offset;
    let after = u32::from_le_bytes(b[0..4].try_into().unwrap());
    assert_eq!(b, clock.time_info(after, moved).to_bytes());
    assert!(after > version, "rewritten after the TSC write");
    assert_eq!(v.state().kvm_system_time, RECORD | 1);
}

#[test]
fn x87_loads_and_stores() {
    // Linux's AMD FXSAVE-leak workaround runs FNCLEX; EMMS; FILD before FXRSTOR.
    let code = asm64(CODE, |a| {
        a.mov(rdi, DATA)?;
        a.mov(qword_ptr(rdi), -123_456_789i32)?;
        a.fnclex()?;
        a.emms()?;
        a.fild(qword_ptr(rdi))?;
        a.fld1()?;
        a.fxch(st0, st1)?;
        a.fistp(dword_ptr(rdi + 8))?; // -123456789
        a.fistp(word_ptr(rdi + 12))?; // 1
        a.mov(eax, dword_ptr(rdi + 8))?;
        a.out(0xe9u32, eax)?;
        a.movzx(eax, word_ptr(rdi + 12))?;
        a.out(0xe9u32, eax)?;
        a.mov(rax, 0x4009_21fb_5444_2d18u64)?; // pi
        a.mov(qword_ptr(rdi + 16), rax)?;
        a.fld(qword_ptr(rdi + 16))?;
        a.fchs()?;
        a.fstp(qword_ptr(rdi + 24))?;
        a.mov(rax, qword_ptr(rdi + 24))?;
        a.shr(rax, 32)?;
        a.out(0xe9u32, eax)?;
        a.fnstsw(ax)?;
        a.movzx(eax, ax)?;
        a.out(0xe9u32, eax)?; // TOP back to 0
        a.hlt()
    });
    let (_mem, _vm, mut v) = long_machine(&code);
    let io = Recorder::default();
    let r = v.run(&io).unwrap();
    assert_eq!(
        r,
        VcpuExit::Halted,
        "{:?} rip {:#x}",
        v.stats().unimplemented,
        v.state().rip
    );
    assert_eq!(
        io.writes(0xe9),
        vec![(-123_456_789i32) as u32 as u64, 1, 0xc009_21fb, 0]
    );
}

#[test]
fn compatibility_mode_int_and_syscall() {
    let compat = CODE + 0x1000;
    let int80 = CODE + 0x2000;
    let cstar = CODE + 0x3000;
    let code = asm64(CODE, |a| {
        a.mov(ecx, 0xc000_0081u32)?; // STAR: kernel CS 0x08
        a.xor(eax, eax)?;
        a.mov(edx, 0x0018_0008u32)?;
        a.wrmsr()?;
        a.mov(ecx, 0xc000_0083u32)?; // CSTAR
        a.mov(eax, cstar as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        for v in [UDATA as u64, USTACK, 0x2, 0x43, compat] {
            a.mov(rax, v)?;
            a.push(rax)?;
        }
        a.iretq()
    });
    let c = asm(32, compat, |a| {
        a.mov(eax, 7u32)?;
        a.int(0x80)?;
        a.mov(eax, 9u32)?;
        a.syscall()?;
        a.hlt()
    });
    let i = asm64(int80, |a| {
        a.out(0xe9u32, eax)?;
        a.mov(rax, qword_ptr(rsp + 8))?; // saved CS: the compat selector
        a.out(0xe9u32, eax)?;
        a.iretq()
    });
    let s = asm64(cstar, |a| {
        a.out(0xe9u32, eax)?;
        a.mov(eax, ecx)?; // return EIP
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let (mem, _vm, mut v) = long_machine(&code);
    for (addr, b) in [(compat, &c), (int80, &i), (cstar, &s)] {
        mem.write_slice(b, GuestAddress(addr)).unwrap();
    }
    // 0x40: 32-bit user code segment.
    w64(&mem, GDT + 0x40, 0x00cf_fa00_0000_ffff);
    let mut sregs = long_sregs();
    sregs.gdt.limit = 0x47;
    v.set_sregs(&sregs).unwrap();
    set_gate(&mem, 0x80, int80, 0, 3, false);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    let ret = compat + c.len() as u64 - 1; // the HLT after SYSCALL
    assert_eq!(io.writes(0xe9), vec![7, 0x43, 9, ret]);
}

#[test]
fn cmpxchg16b_compares_swaps_faults_and_sets_dirty_bits() {
    // Writes out ZF, then RAX and RDX (low halves) after each CMPXCHG16B that completes.
    let gp_handler = CODE + 0x1000;
    let pf_handler = CODE + 0x2000;
    let report = |a: &mut CodeAssembler| -> Result<(), iced_x86::IcedError> {
        a.setz(bl)?;
        a.movzx(ebx, bl)?;
        a.push(rax)?;
        a.mov(eax, ebx)?;
        a.out(0xe9u32, eax)?;
        a.pop(rax)?;
        a.out(0xe9u32, eax)?;
        a.push(rax)?;
        a.mov(eax, edx)?;
        a.out(0xe9u32, eax)?;
        a.pop(rax)
    };
    let code = asm64(CODE, |a| {
        a.mov(rdi, DATA)?;
        // Success: [DATA] = (1, 2) becomes (0x11, 0x22); RDX:RAX stay.
        a.mov(eax, 1u32)?;
        a.mov(edx, 2u32)?;
        a.mov(ebx, 0x11u32)?;
        a.mov(ecx, 0x22u32)?;
        a.cmpxchg16b(xmmword_ptr(rdi))?;
        report(a)?;
        // Failure (LOCK): memory stays (0x11, 0x22) and is loaded into RDX:RAX.
        a.mov(eax, 5u32)?;
        a.mov(edx, 6u32)?;
        a.mov(ebx, 0x99u32)?;
        a.mov(ecx, 0x99u32)?;
        a.lock().cmpxchg16b(xmmword_ptr(rdi))?;
        report(a)?;
        // Misaligned: #GP(0) (the handler skips the 5-byte instruction), nothing written.
        a.cmpxchg16b(xmmword_ptr(rdi + 8))?;
        // Read-only page: a failing compare is still a write: #PF with P|W, nothing written
        // (the handler skips the 4-byte instruction).
        a.mov(rsi, 0x100_1000u64)?;
        a.mov(ebx, 0x77u32)?;
        a.cmpxchg16b(xmmword_ptr(rsi))?;
        // Writable page, compare fails: the PTE gets A and D (the old value is written back).
        a.mov(rsi, 0x100_0000u64)?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.cmpxchg16b(xmmword_ptr(rsi))?;
        report(a)?;
        a.hlt()
    });
    let gp = asm64(gp_handler, |a| {
        a.pop(rbx)?; // error code
        a.mov(eax, 0xdu32)?;
        a.out(0xe9u32, eax)?;
        a.mov(eax, ebx)?;
        a.out(0xe9u32, eax)?;
        a.add(qword_ptr(rsp), 5)?;
        a.iretq()
    });
    let pf = asm64(pf_handler, |a| {
        a.pop(rbx)?; // error code
        a.mov(rax, cr2)?;
        a.out(0xe9u32, eax)?;
        a.mov(eax, ebx)?;
        a.out(0xe9u32, eax)?;
        a.add(qword_ptr(rsp), 4)?;
        a.iretq()
    });
    let (mem, _vm, mut v) = long_machine(&code);
    mem.write_slice(&gp, GuestAddress(gp_handler)).unwrap();
    mem.write_slice(&pf, GuestAddress(pf_handler)).unwrap();
    set_gate(&mem, 13, gp_handler, 1, 0, false);
    set_gate(&mem, 14, pf_handler, 1, 0, false);
    // 16 MiB -> 0x180_0000 writable, 16 MiB + 4 KiB -> 0x180_1000 read-only; no A/D bits.
    w64(&mem, PD + 8 * 8, PT | 3);
    w64(&mem, PT, 0x180_0000 | 3);
    w64(&mem, PT + 8, 0x180_1000 | 1);
    w64(&mem, DATA, 1);
    w64(&mem, DATA + 8, 2);
    w64(&mem, DATA + 16, 3);
    w64(&mem, 0x180_0000, 7);
    w64(&mem, 0x180_0008, 8);
    w64(&mem, 0x180_1000, 0x55);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(
        io.writes(0xe9),
        vec![
            1, 1, 2, // success: ZF, RAX, RDX unchanged
            0, 0x11, 0x22, // failure: ZF clear, RDX:RAX = memory
            0xd, 0, // misaligned: #GP(0)
            0x100_1000, 3, // read-only page: #PF, CR2, P|W
            0, 7, 8, // writable page, compare fails: memory loaded
        ]
    );
    assert_eq!(
        [DATA, DATA + 8, DATA + 16].map(|a| r64(&mem, a)),
        [0x11, 0x22, 3]
    );
    assert_eq!(r64(&mem, 0x180_1000), 0x55);
    assert_eq!(
        r64(&mem, PT + 8) & 0x40,
        0,
        "no D bit on the read-only page"
    );
    assert_eq!([r64(&mem, 0x180_0000), r64(&mem, 0x180_0008)], [7, 8]);
    assert_eq!(
        r64(&mem, PT) & 0x60,
        0x60,
        "A and D set by the failed compare"
    );
    assert_eq!(v.stats().unimplemented_total, 0);
}

#[test]
fn cmpxchg16b_is_atomic_across_vcpu_threads() {
    // Each vCPU adds 1 to both halves of a 16-byte counter N times with a CMPXCHG16B retry
    // loop; a torn or lost update would leave the halves unequal or short of 2N.
    const N: u32 = 200_000;
    let code = asm64(CODE, |a| {
        let mut top = a.create_label();
        let mut retry = a.create_label();
        a.mov(rdi, DATA)?;
        a.mov(esi, N)?;
        a.set_label(&mut top)?;
        a.mov(rax, qword_ptr(rdi))?;
        a.mov(rdx, qword_ptr(rdi + 8))?;
        a.set_label(&mut retry)?;
        a.lea(rbx, ptr(rax + 1))?;
        a.lea(rcx, ptr(rdx + 1))?;
        a.lock().cmpxchg16b(xmmword_ptr(rdi))?;
        a.jnz(retry)?;
        a.dec(esi)?;
        a.jnz(top)?;
        a.hlt()
    });
    let (mem, vm, v0) = long_machine(&code);
    w64(&mem, DATA + 8, 1 << 40);
    run_with_a_second_vcpu_to_halt(&vm, v0);
    assert_eq!(r64(&mem, DATA), 2 * N as u64);
    assert_eq!(r64(&mem, DATA + 8), (1 << 40) + 2 * N as u64);
}

/// Locked read-modify-writes that cross a 4 KiB page (x86 allows these split locks; the engine
/// has no single host pointer for them) are atomic across vCPU threads too: LOCK XADD (64-bit),
/// LOCK ADD (32-bit) and a LOCK CMPXCHG8B retry loop, each on a counter straddling a page.
/// Before the split lock covered them they lost updates (found by the Linux SMP atomics test).
#[test]
fn locked_rmw_across_a_page_is_atomic_across_vcpu_threads() {
    const N: u32 = 20_000;
    let code = asm64(CODE, |a| {
        let mut top = a.create_label();
        let mut retry = a.create_label();
        a.mov(rdi, DATA)?;
        a.mov(esi, N)?;
        a.set_label(&mut top)?;
        a.mov(eax, 1u32)?;
        a.lock().xadd(qword_ptr(rdi + 0xffc), rax)?;
        a.lock().add(dword_ptr(rdi + 0x1ffe), 3)?;
        a.mov(eax, dword_ptr(rdi + 0x2ffa))?;
        a.mov(edx, dword_ptr(rdi + 0x2ffe))?;
        a.set_label(&mut retry)?;
        a.lea(ebx, ptr(rax + 1))?;
        a.mov(ecx, edx)?;
        a.lock().cmpxchg8b(qword_ptr(rdi + 0x2ffa))?;
        a.jnz(retry)?;
        a.dec(esi)?;
        a.jnz(top)?;
        a.hlt()
    });
    let (mem, vm, v0) = long_machine(&code);
    run_with_a_second_vcpu_to_halt(&vm, v0);
    assert_eq!(r64(&mem, DATA + 0xffc), 2 * N as u64, "lock xadd");
    assert_eq!(r64(&mem, DATA + 0x1ffe) as u32, 6 * N, "lock add");
    assert_eq!(r64(&mem, DATA + 0x2ffa), 2 * N as u64, "lock cmpxchg8b");
}

/// Self-modifying code inside one translated block: the store rewrites the immediate of the
/// very next instruction, which the block already holds decoded. The write into the block's
/// own page must end the block, so the new bytes run (42, not 1).
#[test]
fn a_store_into_the_next_instruction_of_a_block_runs_the_new_bytes() {
    let code = asm64(CODE, |a| {
        let mut patch = a.create_label();
        // The first instruction fills the TLB (a block starts at a TLB-resident RIP).
        a.nop()?;
        a.lea(rdi, ptr(patch))?;
        a.mov(byte_ptr(rdi + 1), 42)?;
        a.set_label(&mut patch)?;
        a.mov(eax, 1u32)?; // B8 01 00 00 00: the immediate's low byte is at +1
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let (_mem, _vm, mut v) = long_machine(&code);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0xe9), vec![42]);
    let st = v.stats();
    assert!(st.blocks >= 1 && st.block_instructions >= 3, "{st:?}");
}

/// Self-modifying code in a loop: every iteration stores the counter into the immediate of
/// a later instruction of the loop body (`add ebx, imm8`) and then runs it, so the sum is
/// 10 + 9 + ... + 1 only if each iteration runs the bytes it just wrote (both the block entry
/// check and the end of a block at a write into its page are needed for that).
#[test]
fn a_loop_patching_a_later_instruction_of_its_body_runs_the_new_bytes() {
    let code = asm64(CODE, |a| {
        let mut top = a.create_label();
        let mut target = a.create_label();
        a.xor(ebx, ebx)?;
        a.mov(ecx, 10u32)?;
        a.lea(rdi, ptr(target))?;
        a.set_label(&mut top)?;
        a.mov(byte_ptr(rdi + 2), cl)?;
        a.set_label(&mut target)?;
        a.add(ebx, 0x7f)?; // 83 C3 7F: the imm8 is at +2
        a.dec(ecx)?;
        a.jnz(top)?;
        a.mov(eax, ebx)?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    assert!(code.windows(3).any(|w| w == [0x83, 0xc3, 0x7f]));
    let (_mem, _vm, mut v) = long_machine(&code);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0xe9), vec![55]);
    assert!(v.stats().blocks >= 10, "{:?}", v.stats());
}

/// Code changed between two runs of a translated block (as a device's DMA or another vCPU
/// would change it: no write by this vCPU ends the block) runs the new bytes: the block's
/// entry check compares all of its bytes, for a short block (its bytes kept in the block
/// table's entry) and a long one (over 60 bytes, kept beside it), where the changed byte is
/// near the end.
fn block_patched_between_runs(fillers: usize) {
    let code = asm64(CODE, |a| {
        // The first instruction fills the TLB (a block starts at a TLB-resident RIP).
        a.nop()?;
        for r in [r8, r9, r10, r11, r12, r13, r14].into_iter().take(fillers) {
            a.mov(r, 0x1122_3344_5566_7788u64)?; // 10 bytes each
        }
        a.mov(rax, 0x0101_0101_0101_0101u64)?; // 48 B8 imm64: the low byte at +2
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let imm = CODE + 1 + 10 * fillers as u64 + 2;
    let (mem, _vm, mut v) = long_machine(&code);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    let first = v.stats();
    mem.write_slice(&[42], GuestAddress(imm)).unwrap();
    v.state_mut().rip = CODE;
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0xe9), vec![0x0101_0101, 0x0101_012a]);
    // One block per run, of all the MOVs; the second run found it changed and rebuilt it.
    let st = v.stats();
    assert_eq!((first.blocks, st.blocks), (1, 2), "{st:?}");
    assert_eq!(st.block_instructions, 2 * (fillers as u64 + 1), "{st:?}");
    assert_eq!(st.block_builds, first.block_builds + 1, "{st:?}");
}

#[test]
fn a_short_block_changed_between_runs_runs_the_new_bytes() {
    block_patched_between_runs(0);
}

#[test]
fn a_long_block_changed_near_its_end_between_runs_runs_the_new_bytes() {
    block_patched_between_runs(7);
}

/// `run_steps(n)` runs exactly n instructions even where a translated block is longer.
#[test]
fn run_steps_stops_inside_a_translated_block() {
    let code = asm64(CODE, |a| {
        for _ in 0..40 {
            a.inc(eax)?;
        }
        a.hlt()
    });
    let (_mem, _vm, mut v) = long_machine(&code);
    let io = Recorder::default();
    assert_eq!(v.run_steps(&io, 3).unwrap(), None);
    let r = v.regs().unwrap();
    assert_eq!((r.rax, r.rip), (3, CODE + 6));
    assert_eq!(v.run_steps(&io, 35).unwrap(), None);
    let r = v.regs().unwrap();
    assert_eq!((r.rax, r.rip), (38, CODE + 76));
    let st = v.stats();
    assert_eq!(st.instructions, 38);
    // All but the first (which filled the TLB) ran in blocks.
    assert_eq!(st.block_instructions, 37, "{st:?}");
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(v.regs().unwrap().rax, 40);
}

/// A fault in the middle of a translated block: the instructions before it have completed,
/// the ones after it have not, and the exception frame holds the faulting instruction's RIP.
#[test]
fn a_fault_inside_a_translated_block_reports_the_faulting_instruction() {
    let pf_handler = CODE + 0x2000;
    let before = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.nop()?; // fills the TLB, so the rest runs as a block
        a.mov(eax, 1u32)?;
        a.mov(ecx, 2u32)?;
        a.mov(rsi, 0x100_0123u64) // 16 MiB + 0x123: not present (PT entry 0)
    };
    let faulting = CODE + asm64(CODE, before).len() as u64;
    let code = asm64(CODE, |a| {
        before(a)?;
        a.mov(dl, byte_ptr(rsi))?; // #PF
        a.mov(ebx, 3u32)?;
        a.hlt()
    });
    let pf = asm64(pf_handler, |a| {
        a.mov(rax, qword_ptr(rsp + 8))?; // RIP (after the error code)
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let (mem, _vm, mut v) = long_machine(&code);
    mem.write_slice(&pf, GuestAddress(pf_handler)).unwrap();
    set_gate(&mem, 14, pf_handler, 1, 0, false);
    w64(&mem, PD + 8 * 8, PT | 3);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(io.writes(0xe9), vec![faulting & 0xffff_ffff]);
    let r = v.regs().unwrap();
    assert_eq!((r.rcx, r.rsi, r.rbx), (2, 0x100_0123, 0));
    let st = v.stats();
    assert!(st.block_instructions >= 3, "{st:?}");
}

/// Two blocks whose physical addresses fall into the same set of the block cache stay cached
/// together (it has two ways): a loop alternating between them builds each once, not once per
/// pass.
#[test]
fn two_blocks_of_one_cache_set_stay_cached() {
    // 0x30030 shares the set of CODE + 0x10 (0x10010; the table's hash of the physical
    // address).
    let other = 0x30030;
    let code = asm64(CODE, |a| {
        a.mov(ecx, 1000u32)?;
        a.jmp(CODE + 0x10)?;
        a.nop()?;
        Ok(())
    });
    let top = asm64(CODE + 0x10, |a| {
        let mut out = a.create_label();
        a.dec(ecx)?;
        a.jz(out)?;
        a.jmp(other)?;
        a.set_label(&mut out)?;
        a.hlt()?;
        Ok(())
    });
    let back = asm64(other, |a| {
        a.add(edx, 1)?;
        a.jmp(CODE + 0x10)?;
        Ok(())
    });
    let mut all = vec![0x90u8; 0x10];
    all[..code.len()].copy_from_slice(&code);
    all.extend_from_slice(&top);
    let (mem, _vm, mut v) = long_machine(&all);
    mem.write_slice(&back, GuestAddress(other)).unwrap();
    v.set_jit_threshold(0);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(v.regs().unwrap().rdx, 999);
    let st = v.stats();
    assert!(st.block_builds < 10, "{st:?}");
}

/// MOV from a segment register: the selector, zero-extended into a 32- or 64-bit register, the
/// rest of a 16-bit one kept (in a loop, so it also runs in translated and compiled blocks).
#[test]
fn mov_from_segment_registers_reads_selectors() {
    let code = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.mov(esi, 40u32)?;
        a.set_label(&mut top)?;
        a.mov(rax, -1i64)?;
        a.mov(eax, cs)?;
        a.mov(rbx, -1i64)?;
        a.mov(rbx, ss)?;
        a.mov(rcx, -1i64)?;
        a.mov(cx, ds)?;
        a.dec(esi)?;
        a.jnz(top)?;
        a.hlt()
    });
    let (_mem, _vm, mut v) = long_machine(&code);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    let r = v.regs().unwrap();
    assert_eq!(
        (r.rax, r.rbx, r.rcx),
        (
            u64::from(KCODE),
            u64::from(KDATA),
            0xffff_ffff_ffff_0000 | u64::from(KDATA)
        )
    );
}
