//! A vCPU saved in the middle of a program and restored into a fresh VM (a copy of guest
//! memory, a new vCPU) finishes the program exactly as an uninterrupted run does.

mod common;

use common::*;
use iced_x86::code_asm::*;
use kvmbox_cpu::{Vcpu, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Integer, SSE and x87 work in a loop, a checksum to port 0xe9 every 1000 rounds.
fn program() -> Vec<u8> {
    asm64(CODE, |a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.mov(rdi, DATA)?;
        a.mov(rax, 0x3ff0_0000_0000_0000u64)?; // 1.0
        a.mov(qword_ptr(rdi), rax)?;
        a.movsd_2(xmm0, qword_ptr(rdi))?;
        a.movsd_2(xmm1, xmm0)?;
        a.fldz()?;
        a.xor(ebx, ebx)?;
        a.mov(ecx, 20_000u32)?;
        a.set_label(&mut top)?;
        a.addsd(xmm1, xmm0)?;
        a.fincstp()?;
        a.imul_3(rbx, rbx, 31)?;
        a.add(rbx, rcx)?;
        a.mov(edx, ecx)?;
        a.and(edx, 0x3ffu32)?;
        a.mov(qword_ptr(rdi + rdx * 8 + 64), rbx)?;
        a.test(ecx, 1023u32)?;
        a.jnz(skip)?;
        a.mov(eax, ebx)?;
        a.out(0xe9u32, eax)?;
        a.set_label(&mut skip)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.cvttsd2si(rax, xmm1)?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    })
}

fn copy_memory(from: &vm_memory::GuestMemoryMmap) -> vm_memory::GuestMemoryMmap {
    let to = guest_mem();
    for r in from.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        from.read_slice(&mut buf, r.start_addr()).unwrap();
        to.write_slice(&buf, r.start_addr()).unwrap();
    }
    to
}

#[test]
fn engine_vcpu_saved_mid_run_finishes_like_an_uninterrupted_run() {
    let code = program();
    let (_mem, _vm, mut whole) = long_machine(&code);
    let io_whole = Recorder::default();
    let exit = whole.run(&io_whole).unwrap();
    assert_eq!(
        exit,
        VcpuExit::Halted,
        "rip {:#x} {:?}",
        whole.state().rip,
        whole.stats()
    );
    let end = whole.save_state().unwrap();

    let (mem, _vm2, mut first) = long_machine(&code);
    let io_first = Recorder::default();
    assert_eq!(first.run_steps(&io_first, 70_001).unwrap(), None);
    let mid = first.save_state().unwrap();
    assert!(
        !io_first.writes(0xe9).is_empty() && io_first.writes(0xe9).len() < 19,
        "saved in the middle: {:?}",
        io_first.writes(0xe9)
    );

    let mem2 = copy_memory(&mem);
    let vm3 = kvmbox_emu::EmuVm::new(mem2.clone());
    let mut second = vm3.create_emu_vcpu(0).unwrap();
    second.restore_state(&mid).unwrap();
    assert_eq!(second.save_state().unwrap().regs, mid.regs);
    let io_second = Recorder::default();
    assert_eq!(second.run(&io_second).unwrap(), VcpuExit::Halted);

    let mut joined = io_first.writes(0xe9);
    joined.extend(io_second.writes(0xe9));
    assert_eq!(joined, io_whole.writes(0xe9));
    let after = second.save_state().unwrap();
    assert_eq!(
        (after.regs, after.sregs, &after.fxsave),
        (end.regs, end.sregs, &end.fxsave)
    );
    let mut a = vec![0u8; 0x3000];
    let mut b = vec![0u8; 0x3000];
    _mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
    mem2.read_slice(&mut b, GuestAddress(DATA)).unwrap();
    assert!(a == b, "guest memory differs after the restored run");
}
