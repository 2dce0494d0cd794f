//! A vCPU saved in the middle of a program and restored into a fresh VM (a copy of guest
//! memory, a new vCPU) finishes the program exactly as an uninterrupted run does.

mod common;

use common::*;
use iced_x86::code_asm::*;
use kvmbox_cpu::{Vcpu, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Integer work in a loop (with SSE and x87 work when `fpu`), a checksum to port 0xe9 every
/// 1024 rounds. (KVM on this kind of host emulates ring 0 and cannot emulate SSE there.)
fn program(fpu: bool) -> Vec<u8> {
    asm64(CODE, |a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.mov(rdi, DATA)?;
        if fpu {
            a.mov(rax, 0x3ff0_0000_0000_0000u64)?; // 1.0
            a.mov(qword_ptr(rdi), rax)?;
            a.movsd_2(xmm0, qword_ptr(rdi))?;
            a.movsd_2(xmm1, xmm0)?;
            a.fldz()?;
        }
        a.xor(ebx, ebx)?;
        a.mov(ecx, 20_000u32)?;
        a.set_label(&mut top)?;
        if fpu {
            a.addsd(xmm1, xmm0)?;
            a.fincstp()?;
        }
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
        if fpu {
            a.cvttsd2si(rax, xmm1)?;
        } else {
            a.mov(rax, rbx)?;
        }
        a.out(0xe9u32, eax)?;
        a.hlt()
    })
}

fn copy_memory(from: &kvmbox_cpu::GuestMemoryMmap) -> kvmbox_cpu::GuestMemoryMmap {
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
    let code = program(true);
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

/// Records port writes like [`Recorder`]; kicks the vCPU after the `kick_at`-th checksum
/// and when the program reports it is done (on KVM, HLT does not leave the kernel).
struct Stopper {
    rec: Recorder,
    kick_at: usize,
    kicker: std::sync::Mutex<Option<std::sync::Arc<dyn kvmbox_cpu::VcpuKicker>>>,
}

impl Stopper {
    fn new(kick_at: usize) -> Self {
        Stopper {
            rec: Recorder::default(),
            kick_at,
            kicker: std::sync::Mutex::new(None),
        }
    }
    fn kick(&self) {
        if let Some(k) = &*self.kicker.lock().unwrap() {
            k.kick();
        }
    }
}

impl kvmbox_cpu::IoHandler for Stopper {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.rec.pio_read(port, data)
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.rec.pio_write(port, data);
        if (port == 0xe9 && self.rec.writes(0xe9).len() == self.kick_at) || port == DONE_PORT {
            self.kick();
        }
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.rec.mmio_read(addr, data)
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.rec.mmio_write(addr, data)
    }
}

const DONE_PORT: u16 = 0xf4;

/// [`program`] without FPU work, with a write to [`DONE_PORT`] before its HLT.
fn program_with_done() -> Vec<u8> {
    let mut code = program(false);
    let hlt = code.pop();
    assert_eq!(hlt, Some(0xf4), "program() ends with HLT");
    // out 0xf4, al; hlt
    code.extend_from_slice(&[0xe6, DONE_PORT as u8, 0xf4]);
    code
}

enum Engine {
    Emu,
    Kvm,
}

/// A fresh VM of `engine` over `mem`, its vCPU 0 showing the engine's CPU model.
fn machine(
    engine: &Engine,
    mem: &kvmbox_cpu::GuestMemoryMmap,
) -> (Box<dyn kvmbox_cpu::Vm>, Box<dyn Vcpu>) {
    let emu = kvmbox_emu::EmuVm::new(mem.clone());
    let mut model = emu.create_emu_vcpu(0).unwrap();
    model
        .configure(&kvmbox_cpu::VcpuConfig { id: 0, count: 1 })
        .unwrap();
    let supported = kvmbox_cpu::kvm::supported_cpuid().unwrap();
    let portable = kvmbox_cpu::portable_cpuid(&model.cpuid().unwrap(), &supported);
    let vm: Box<dyn kvmbox_cpu::Vm> = match engine {
        Engine::Emu => Box::new(emu),
        Engine::Kvm => Box::new(kvmbox_cpu::kvm::KvmVm::new(mem).unwrap()),
    };
    let mut v = vm.create_vcpu(0).unwrap();
    v.configure(&kvmbox_cpu::VcpuConfig { id: 0, count: 1 })
        .unwrap();
    v.set_cpuid(&portable).unwrap();
    (vm, v)
}

/// Run the program on `from` until its 7th checksum, save, restore on `to` over a copy of
/// memory, finish there: the outputs and final registers match an uninterrupted run.
fn move_between(from: Engine, to: Engine) {
    let code = program_with_done();
    let (_m, _vm, mut whole) = long_machine(&code);
    let io_whole = Recorder::default();
    assert_eq!(whole.run(&io_whole).unwrap(), VcpuExit::Halted);

    let (mem, _vm0, _) = long_machine(&code);
    let (_vm1, mut first) = machine(&from, &mem);
    first.set_sregs(&long_sregs()).unwrap();
    first
        .set_regs(&kvmbox_cpu::Regs {
            rip: CODE,
            rsp: KSTACK,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
    // SSE state the program does not touch travels along.
    let mut start = first.save_state().unwrap();
    start.fxsave[160 + 15 * 16..176 + 15 * 16].copy_from_slice(&[0x5a; 16]);
    start.fxsave[24..28].copy_from_slice(&0x1fa0u32.to_le_bytes()); // MXCSR
    if let Some(x) = &mut start.xsave {
        x[..512].copy_from_slice(&start.fxsave);
    }
    first.restore_state(&start).unwrap();
    let io_first = Stopper::new(7);
    *io_first.kicker.lock().unwrap() = Some(first.kicker());
    assert_eq!(first.run(&io_first).unwrap(), VcpuExit::Kicked);
    let mid = first.save_state().unwrap();
    assert_eq!(io_first.rec.writes(0xe9).len(), 7);

    let mem2 = copy_memory(&mem);
    let (_vm2, mut second) = machine(&to, &mem2);
    second.restore_state(&mid).unwrap();
    let io_second = Stopper::new(0);
    *io_second.kicker.lock().unwrap() = Some(second.kicker());
    let exit = second.run(&io_second).unwrap();
    assert!(
        matches!(exit, VcpuExit::Kicked | VcpuExit::Halted),
        "{exit:?}"
    );
    assert_eq!(io_second.rec.writes(u16::from(DONE_PORT as u8)).len(), 1);
    let mut joined = io_first.rec.writes(0xe9);
    joined.extend(io_second.rec.writes(0xe9));
    assert_eq!(joined, io_whole.writes(0xe9));
    let end = whole.save_state().unwrap();
    let after = second.save_state().unwrap();
    assert_eq!(after.regs.rbx, end.regs.rbx);
    assert_eq!(after.regs.rax, end.regs.rax);
    assert_eq!(after.fxsave[400..416], [0x5a; 16], "XMM15");
    assert_eq!(after.fxsave[24..28], 0x1fa0u32.to_le_bytes(), "MXCSR");
}

#[test]
fn engine_state_restores_on_kvm() {
    if !kvmbox_cpu::kvm::available_or_skip("engine_state_restores_on_kvm") {
        return;
    }
    move_between(Engine::Emu, Engine::Kvm);
}

#[test]
fn kvm_state_with_the_portable_cpu_restores_on_the_engine() {
    if !kvmbox_cpu::kvm::available_or_skip("kvm_state_restores_on_the_engine") {
        return;
    }
    move_between(Engine::Kvm, Engine::Emu);
}

#[test]
fn kvm_state_restores_on_kvm() {
    if !kvmbox_cpu::kvm::available_or_skip("kvm_state_restores_on_kvm") {
        return;
    }
    move_between(Engine::Kvm, Engine::Kvm);
}
