//! Two vCPU threads and the engine's interrupt-controller interface: the BSP starts the AP
//! with INIT/SIPI through xAPIC MMIO at 0xfee00000, the AP runs real-mode code, enables
//! interrupts and halts, and an IPI wakes it through its real-mode IVT. The controller here
//! is a minimal in-test one (the real LAPIC lives in crate kvmbox-irqchip, which implements
//! the same trait); it is enough to exercise the engine side: polling at instruction
//! boundaries, HLT wake-up, wait-for-SIPI, per-vCPU APIC MMIO.

mod common;

use common::*;
use iced_x86::code_asm::*;
use kvmbox_cpu::{Vcpu, VcpuExit};
use kvmbox_emu::{InterruptController, StartupEvent};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

/// Where the tests put their interrupt handler.
const HANDLER: u64 = CODE + 0x1000;

#[derive(Default)]
struct Chip {
    st: Mutex<ChipState>,
    cv: Condvar,
    /// This many polls see no interrupt (one that arrives after them, mid-batch).
    late_by_polls: std::sync::atomic::AtomicU32,
    /// Vcpu 0's notifier (`InterruptController::set_notifier`).
    notifier: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl Chip {
    /// Make `vector` pending for vCPU 0 from another thread, as a device would.
    fn raise(&self, vector: u8) {
        self.st.lock().unwrap().pending[0].push(vector);
        if let Some(n) = self.notifier.lock().unwrap().clone() {
            n();
        }
    }
}

#[derive(Default)]
struct ChipState {
    nmis: u32,
    pending: [Vec<u8>; 2],
    startup: [Option<StartupEvent>; 2],
    acked: Vec<(u32, u8)>,
}

impl InterruptController for Chip {
    fn pending_vector(&self, vcpu: u32) -> Option<u8> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.late_by_polls.load(SeqCst) > 0 {
            self.late_by_polls.fetch_sub(1, SeqCst);
            return None;
        }
        self.st.lock().unwrap().pending[vcpu as usize]
            .first()
            .copied()
    }
    fn ack(&self, vcpu: u32, vector: u8) {
        let mut s = self.st.lock().unwrap();
        s.pending[vcpu as usize].retain(|&v| v != vector);
        s.acked.push((vcpu, vector));
    }
    fn take_nmi(&self, vcpu: u32) -> bool {
        let mut s = self.st.lock().unwrap();
        if vcpu == 0 && s.nmis > 0 {
            s.nmis -= 1;
            return true;
        }
        false
    }
    fn take_startup(&self, vcpu: u32) -> Option<StartupEvent> {
        self.st.lock().unwrap().startup[vcpu as usize].take()
    }
    fn apic_read(&self, vcpu: u32, offset: u64, data: &mut [u8]) {
        // APIC ID register.
        let v: u32 = if offset == 0x20 { vcpu << 24 } else { 0 };
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }
    fn apic_write(&self, _vcpu: u32, offset: u64, data: &[u8]) {
        if offset != 0x300 || data.len() != 4 {
            return;
        }
        let icr = u32::from_le_bytes(data.try_into().unwrap());
        let mut s = self.st.lock().unwrap();
        match (icr >> 8) & 7 {
            5 => s.startup[1] = Some(StartupEvent::Init),
            6 => s.startup[1] = Some(StartupEvent::Sipi(icr as u8)),
            0 => s.pending[1].push(icr as u8),
            _ => {}
        }
        self.cv.notify_all();
    }
    fn set_tpr(&self, _vcpu: u32, _tpr: u8) {}
    fn set_notifier(&self, vcpu: u32, f: Arc<dyn Fn() + Send + Sync>) {
        if vcpu == 0 {
            *self.notifier.lock().unwrap() = Some(f);
        }
    }
    fn wait(&self, _vcpu: u32, timeout: Duration) {
        let s = self.st.lock().unwrap();
        let _ = self.cv.wait_timeout(s, timeout).unwrap();
    }
}

#[test]
fn init_sipi_and_ipi_between_two_vcpu_threads() {
    const FLAG: u64 = 0x9000;
    let ap_code = 0x8000u64;
    let bsp = asm64(CODE, |a| {
        let mut wait = a.create_label();
        a.mov(rdi, 0xfee0_0000u64)?;
        a.mov(eax, dword_ptr(rdi + 0x20))?; // own APIC ID
        a.shr(eax, 24)?;
        a.out(0xe9u32, eax)?;
        a.mov(dword_ptr(rdi + 0x300), 0x4500u32)?; // INIT
        a.mov(dword_ptr(rdi + 0x300), 0x4608u32)?; // SIPI vector 8
        a.set_label(&mut wait)?;
        a.pause()?;
        a.cmp(word_ptr(FLAG), 0x1234)?;
        a.jne(wait)?;
        a.mov(dword_ptr(rdi + 0x300), 0x0040u32)?; // fixed IPI, vector 0x40
        a.mov(eax, 0xb5u32)?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    // AP: real mode, CS=0x800. Set the flag, enable interrupts and halt; vector 0x40's IVT
    // entry points at 0x0000:0x8100.
    let ap = asm(16, 0, |a| {
        a.xor(ax, ax)?;
        a.mov(ds, ax)?;
        a.mov(ss, ax)?;
        a.mov(sp, 0x7000u32)?;
        a.mov(word_ptr(0x100u32), 0x8100u32)?; // IVT[0x40].offset
        a.mov(word_ptr(0x102u32), 0u32)?; // IVT[0x40].segment
        a.mov(word_ptr(FLAG as u32), 0x1234u32)?;
        a.sti()?;
        a.hlt()?;
        a.hlt()
    });
    let ap_isr = asm(16, 0x8100, |a| {
        a.mov(al, 0x40)?;
        a.out(0xe9, al)?;
        a.cli()?;
        a.hlt()
    });
    let mem = guest_mem();
    build_tables(&mem);
    w64(&mem, PDPT + 3 * 8, 0xc000_0000 | 0x83);
    mem.write_slice(&bsp, GuestAddress(CODE)).unwrap();
    mem.write_slice(&ap, GuestAddress(ap_code)).unwrap();
    mem.write_slice(&ap_isr, GuestAddress(0x8100)).unwrap();
    let ap_isr_len = ap_isr.len();
    let vm = kvmbox_emu::EmuVm::new(mem.clone());
    let chip = Arc::new(Chip::default());
    vm.set_interrupt_controller(chip.clone());
    let mut v0 = vm.create_emu_vcpu(0).unwrap();
    let mut v1 = vm.create_emu_vcpu(1).unwrap();
    v0.configure(&kvmbox_cpu::VcpuConfig { id: 0, count: 2 })
        .unwrap();
    v1.configure(&kvmbox_cpu::VcpuConfig { id: 1, count: 2 })
        .unwrap();
    let l1 = v1
        .cpuid()
        .unwrap()
        .into_iter()
        .find(|e| e.function == 1)
        .unwrap();
    assert_ne!(l1.edx & (1 << 9), 0, "APIC advertised with a controller");
    v0.set_sregs(&long_sregs()).unwrap();
    v0.set_regs(&kvmbox_cpu::Regs {
        rip: CODE,
        rsp: KSTACK,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
    v1.set_wait_for_sipi().unwrap();
    let io = Arc::new(Recorder::default());
    let io1 = io.clone();
    let ap_thread = std::thread::spawn(move || {
        let r = v1.run(&*io1).unwrap();
        (r, v1)
    });
    assert_eq!(v0.run(&*io).unwrap(), VcpuExit::Halted);
    let (r1, v1) = ap_thread.join().unwrap();
    assert_eq!(r1, VcpuExit::Halted);
    let mut w = io.writes(0xe9);
    w.sort();
    assert_eq!(w, vec![0, 0x40, 0xb5]);
    assert_eq!(chip.st.lock().unwrap().acked, vec![(1, 0x40)]);
    // The AP ended in the real-mode ISR, reached through IVT[0x40] (CS 0, IP past its HLT).
    assert_eq!(v1.state().seg[1].selector, 0);
    assert_eq!(v1.state().rip, 0x8100 + ap_isr_len as u64);
}

struct Line {
    chip: Arc<Chip>,
    vector: u8,
}

impl kvmbox_cpu::IrqLine for Line {
    fn trigger(&self) -> std::io::Result<()> {
        self.chip.st.lock().unwrap().pending[0].push(self.vector);
        self.chip.cv.notify_all();
        Ok(())
    }
    fn set_level(&self, high: bool) -> std::io::Result<()> {
        if high {
            self.trigger()?;
        }
        Ok(())
    }
}

/// Lines come from the controller: wraps the in-test chip and hands out GSI lines.
struct LineChip(Arc<Chip>);

impl InterruptController for LineChip {
    fn pending_vector(&self, vcpu: u32) -> Option<u8> {
        self.0.pending_vector(vcpu)
    }
    fn ack(&self, vcpu: u32, vector: u8) {
        self.0.ack(vcpu, vector)
    }
    fn take_nmi(&self, vcpu: u32) -> bool {
        self.0.take_nmi(vcpu)
    }
    fn take_startup(&self, vcpu: u32) -> Option<StartupEvent> {
        self.0.take_startup(vcpu)
    }
    fn apic_read(&self, vcpu: u32, offset: u64, data: &mut [u8]) {
        self.0.apic_read(vcpu, offset, data)
    }
    fn apic_write(&self, vcpu: u32, offset: u64, data: &[u8]) {
        self.0.apic_write(vcpu, offset, data)
    }
    fn set_tpr(&self, vcpu: u32, tpr: u8) {
        self.0.set_tpr(vcpu, tpr)
    }
    fn wait(&self, vcpu: u32, timeout: Duration) {
        self.0.wait(vcpu, timeout)
    }
    fn irq_line(&self, gsi: u32) -> Option<Arc<dyn kvmbox_cpu::IrqLine>> {
        Some(Arc::new(Line {
            chip: self.0.clone(),
            vector: 0x20 + gsi as u8,
        }))
    }
}

#[test]
fn vm_irq_line_interrupts_a_spinning_vcpu_through_the_idt() {
    use kvmbox_cpu::Vm;
    let code = asm64(CODE, |a| {
        let mut spin = a.create_label();
        a.sti()?;
        a.set_label(&mut spin)?;
        a.pause()?;
        a.jmp(spin)
    });
    let h = asm64(HANDLER, |a| {
        a.mov(eax, 0x24u32)?;
        a.out(0xe9u32, eax)?;
        a.cli()?;
        a.hlt()
    });
    let mem = guest_mem();
    build_tables(&mem);
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    mem.write_slice(&h, GuestAddress(HANDLER)).unwrap();
    set_gate(&mem, 0x24, HANDLER, 0, 0, false);
    let bare = kvmbox_emu::EmuVm::new(mem.clone());
    let err = bare
        .irq_line(4)
        .err()
        .expect("no controller, no lines")
        .to_string();
    assert!(err.contains("GSI 4"), "{err}");
    let vm = kvmbox_emu::EmuVm::new(mem);
    vm.set_interrupt_controller(Arc::new(LineChip(Arc::new(Chip::default()))));
    let line = vm.irq_line(4).unwrap();
    let mut v = vm.create_emu_vcpu(0).unwrap();
    v.set_sregs(&long_sregs()).unwrap();
    v.set_regs(&kvmbox_cpu::Regs {
        rip: CODE,
        rsp: KSTACK,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        line.trigger().unwrap();
    });
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    t.join().unwrap();
    assert_eq!(io.writes(0xe9), vec![0x24]);
}

/// vCPU 0 in long mode at CODE with interrupts enabled, `code` there, `handler` at `HANDLER`
/// as the gate of vector 0x30, and `chip` its interrupt controller (set up first).
fn with_handler(
    code: &[u8],
    handler: &[u8],
    chip: &Arc<Chip>,
) -> (
    kvmbox_cpu::GuestMemoryMmap,
    kvmbox_emu::EmuVm,
    kvmbox_emu::EmuVcpu,
) {
    let mem = guest_mem();
    build_tables(&mem);
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    mem.write_slice(handler, GuestAddress(HANDLER)).unwrap();
    set_gate(&mem, 0x30, HANDLER, 0, 0, false);
    let vm = kvmbox_emu::EmuVm::new(mem.clone());
    vm.set_interrupt_controller(chip.clone());
    let mut v = vm.create_emu_vcpu(0).unwrap();
    v.set_sregs(&long_sregs()).unwrap();
    v.set_regs(&kvmbox_cpu::Regs {
        rip: CODE,
        rsp: KSTACK,
        rflags: 0x202,
        ..Default::default()
    })
    .unwrap();
    (mem, vm, v)
}

/// A controller with vector 0x30 pending for vCPU 0 that the first `polls` polls miss (it
/// arrives after them).
fn pending_after_polls(polls: u32) -> Arc<Chip> {
    let chip = Arc::new(Chip::default());
    chip.st.lock().unwrap().pending[0].push(0x30);
    chip.late_by_polls
        .store(polls, std::sync::atomic::Ordering::SeqCst);
    chip
}

/// A handler counting its runs at DATA.
fn counting_handler() -> Vec<u8> {
    asm64(HANDLER, |a| {
        a.inc(dword_ptr(DATA))?;
        a.iretq()
    })
}

/// An interrupt that came due while the vCPU's thread was not running (it arrives after the
/// batch began) is taken before the guest reads the TSC: Linux's TSC-timed delay in
/// `timer_irq_works()` must see the timer ticks of the time it measured.
#[test]
fn a_pending_interrupt_is_taken_before_rdtsc() {
    let code = asm64(CODE, |a| {
        a.rdtsc()?;
        a.mov(eax, dword_ptr(DATA))?;
        a.mov(dword_ptr(DATA + 4), eax)?;
        a.cli()?;
        a.hlt()
    });
    // The poll at the start of the batch misses it.
    let chip = pending_after_polls(1);
    let (mem, _vm, mut v) = with_handler(&code, &counting_handler(), &chip);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(chip.st.lock().unwrap().acked, vec![(0, 0x30)]);
    let seen: u32 = mem.read_obj(GuestAddress(DATA + 4)).unwrap();
    assert_eq!(seen, 1, "the handler ran before RDTSC");
}

/// The same inside a block (RDTSC is not its first instruction), compiled: the block stops at
/// the RDTSC that finds the interrupt due, the interrupt is taken, and RDTSC then runs; every
/// RDTSC of the loop returns a later time than the one before.
#[test]
fn a_pending_interrupt_is_taken_before_rdtsc_inside_compiled_code() {
    let code = asm64(CODE, |a| {
        let mut top = a.create_label();
        let mut bad = a.create_label();
        a.mov(ecx, 200)?;
        a.xor(r11d, r11d)?;
        a.set_label(&mut top)?;
        a.mov(r9d, dword_ptr(DATA))?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.cmp(rax, r11)?;
        a.jbe(bad)?;
        a.mov(r11, rax)?;
        a.dec(ecx)?;
        a.jne(top)?;
        a.cli()?;
        a.hlt()?;
        a.set_label(&mut bad)?;
        a.mov(dword_ptr(DATA + 8), 1)?;
        a.cli()?;
        a.hlt()
    });
    // Seen from about the 100th RDTSC on, once the loop's block is compiled.
    let chip = pending_after_polls(100);
    let (mem, _vm, mut v) = with_handler(&code, &counting_handler(), &chip);
    v.set_jit_threshold(1);
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(chip.st.lock().unwrap().acked, vec![(0, 0x30)]);
    let regs = v.regs().unwrap();
    assert_eq!(regs.rcx, 0, "the loop ran to its end");
    let bad: u32 = mem.read_obj(GuestAddress(DATA + 8)).unwrap();
    assert_eq!(
        bad, 0,
        "an RDTSC returned no later time than the one before"
    );
    let ran: u32 = mem.read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(ran, 1, "the handler ran once");
    let s = v.stats();
    assert!(s.jit_instructions > 500, "{s:?}");
}

/// An interrupt another thread raises while compiled code loops is taken within a few
/// iterations, not at the end of the run loop's batch (`vcpu::BATCH` instructions): the
/// controller's notifier stops the code at its next block boundary.
#[test]
fn an_interrupt_raised_by_another_thread_stops_compiled_code_at_once() {
    // Three instructions per iteration, counted at DATA, until the handler sets DATA + 4.
    let code = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.inc(dword_ptr(DATA))?;
        a.cmp(dword_ptr(DATA + 4), 0)?;
        a.je(top)?;
        a.cli()?;
        a.hlt()
    });
    // The count when the interrupt was taken, at DATA + 8.
    let h = asm64(HANDLER, |a| {
        a.mov(eax, dword_ptr(DATA))?;
        a.mov(dword_ptr(DATA + 8), eax)?;
        a.mov(dword_ptr(DATA + 4), 1)?;
        a.iretq()
    });
    let chip = Arc::new(Chip::default());
    let (mem, _vm, mut v) = with_handler(&code, &h, &chip);
    let raiser = {
        let (chip, mem) = (chip.clone(), mem.clone());
        std::thread::spawn(move || {
            let count = || mem.read_obj::<u32>(GuestAddress(DATA)).unwrap();
            // Long compiled by now.
            while count() < 1_000_000 {
                std::thread::yield_now();
            }
            chip.raise(0x30);
            // At least the count when it was raised (this thread may lose the CPU before).
            count()
        })
    };
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    let after_raise = raiser.join().unwrap();
    let at_handler: u32 = mem.read_obj(GuestAddress(DATA + 8)).unwrap();
    assert!(
        at_handler <= after_raise + 100,
        "{} iterations ran after the raise (a batch is {} instructions)",
        at_handler - after_raise,
        kvmbox_emu::BATCH
    );
    let s = v.stats();
    assert!(s.jit_instructions > 1_000_000, "{s:?}");
}

/// Spin at CODE with the NMI handler `h` at `HANDLER` and two NMIs pending, until the
/// vCPU halts; the memory and the port writes.
fn run_with_two_nmis(h: &[u8]) -> (kvmbox_cpu::GuestMemoryMmap, Recorder) {
    let code = asm64(CODE, |a| {
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.pause()?;
        a.jmp(spin)
    });
    let mem = guest_mem();
    build_tables(&mem);
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    mem.write_slice(h, GuestAddress(HANDLER)).unwrap();
    set_gate(&mem, 2, HANDLER, 0, 0, false);
    let vm = kvmbox_emu::EmuVm::new(mem.clone());
    let chip = Arc::new(Chip::default());
    chip.st.lock().unwrap().nmis = 2;
    vm.set_interrupt_controller(chip);
    let mut v = vm.create_emu_vcpu(0).unwrap();
    v.set_sregs(&long_sregs()).unwrap();
    v.set_regs(&kvmbox_cpu::Regs {
        rip: CODE,
        rsp: KSTACK,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    (mem, io)
}

#[test]
fn nmis_do_not_nest_until_iret() {
    let h = asm64(HANDLER, |a| {
        let mut again = a.create_label();
        a.mov(rax, rsp)?;
        a.out(0xe9u32, eax)?;
        // Work long enough for a nested NMI to show up if NMIs were not blocked.
        a.mov(ecx, 5000u32)?;
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.dec(ecx)?;
        a.jnz(l)?;
        a.inc(qword_ptr(DATA))?;
        a.cmp(qword_ptr(DATA), 2)?;
        a.jne(again)?;
        a.hlt()?;
        a.set_label(&mut again)?;
        a.iretq()
    });
    let (mem, io) = run_with_two_nmis(&h);
    // Both NMIs entered on the same stack depth: the second waited for the first's IRETQ.
    assert_eq!(io.writes(0xe9), vec![KSTACK - 40, KSTACK - 40]);
    assert_eq!(r64(&mem, DATA), 2);
}

#[test]
fn one_instruction_interrupt_window_after_sti_is_honoured() {
    use kvmbox_cpu::Vm;
    // sti; nop; cli; jmp: IF=1 with no shadow only at the boundary after the NOP, and the
    // 4-instruction loop divides the engine's batch size, so batch boundaries alone would
    // never land in the window.
    let code = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.sti()?;
        a.nop()?;
        a.cli()?;
        a.jmp(top)
    });
    let h = asm64(HANDLER, |a| {
        a.mov(eax, 0x25u32)?;
        a.out(0xe9u32, eax)?;
        a.cli()?;
        a.hlt()
    });
    let mem = guest_mem();
    build_tables(&mem);
    mem.write_slice(&code, GuestAddress(CODE)).unwrap();
    mem.write_slice(&h, GuestAddress(HANDLER)).unwrap();
    set_gate(&mem, 0x25, HANDLER, 0, 0, false);
    let vm = kvmbox_emu::EmuVm::new(mem);
    vm.set_interrupt_controller(Arc::new(LineChip(Arc::new(Chip::default()))));
    let line = vm.irq_line(5).unwrap();
    let mut v = vm.create_emu_vcpu(0).unwrap();
    v.set_sregs(&long_sregs()).unwrap();
    v.set_regs(&kvmbox_cpu::Regs {
        rip: CODE,
        rsp: KSTACK,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
    line.trigger().unwrap();
    let io = Recorder::default();
    // Bounded: the interrupt must be taken within the first few loop iterations.
    let r = v.run_steps(&io, 100_000).unwrap();
    assert_eq!(r, Some(VcpuExit::Halted));
    assert_eq!(io.writes(0xe9), vec![0x25]);
}

/// kvm-unit-tests eventinj ("NMI" through a handler that IRETs to a frame of its own): an NMI
/// that arrived while NMIs were blocked is taken right after the IRET that unblocks them, on
/// the instruction IRET returned to, not at some later batch boundary.
#[test]
fn pending_nmi_is_taken_right_after_the_unblocking_iret() {
    let h = asm64(HANDLER, |a| {
        let mut second = a.create_label();
        let mut after = a.create_label();
        a.inc(qword_ptr(DATA))?;
        a.cmp(qword_ptr(DATA), 2)?;
        a.je(second)?;
        // First NMI: IRETQ to `after` through a frame built here (NMIs unblock).
        a.lea(rbx, ptr(after))?;
        a.mov(eax, ebx)?;
        a.out(0xe9u32, eax)?;
        a.mov(rax, rsp)?;
        a.push(0x10)?;
        a.push(rax)?;
        a.pushfq()?;
        a.push(0x08)?;
        a.push(rbx)?;
        a.iretq()?;
        a.set_label(&mut after)?;
        a.mov(eax, 0xbadu32)?;
        a.out(0xe9u32, eax)?;
        a.cli()?;
        a.hlt()?;
        // Second NMI: where was it taken?
        a.set_label(&mut second)?;
        a.mov(rax, qword_ptr(rsp))?;
        a.out(0xe9u32, eax)?;
        a.hlt()
    });
    let (_mem, io) = run_with_two_nmis(&h);
    let w = io.writes(0xe9);
    assert_eq!(w.len(), 2, "{w:x?}");
    assert_eq!(
        w[1], w[0],
        "second NMI taken at {:#x}, not at {:#x}",
        w[1], w[0]
    );
}
