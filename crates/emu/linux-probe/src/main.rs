//! Engine bring-up tool: boots a Linux kernel (bzImage, decompressed on the host) with an
//! optional initramfs on kvmbox-emu, with kvmbox-irqchip (LAPIC/IOAPIC/PIC), the PIT, COM1,
//! the CMOS RTC and the ACPI PM block, with kvm-clock offered as the VMM offers it, and prints
//! the console and the engine's counters. Not the VMM: `kvmbox run --accel emu` is; this
//! exists to find engine gaps with real kernels.
//!
//! Usage: linux-probe KERNEL [INITRD] [EXTRA-CMDLINE] [MAX-INSTRUCTIONS] [VCPUS]

use kvmbox_cpu::{IoHandler, Vcpu, VcpuExit};
use kvmbox_devices::legacy::pit::{Clock, HostClock, Pit, TimerThread, TimerWaker};
use kvmbox_devices::{IoBus, VmControl};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The platform's buses plus a count of port accesses (printed at the end).
struct Platform {
    bus: IoBus,
    ports: Mutex<std::collections::BTreeMap<u16, u64>>,
}

impl Platform {
    fn count(&self, port: u16) {
        *self.ports.lock().unwrap().entry(port).or_default() += 1;
    }
}

impl IoHandler for Platform {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.count(port);
        self.bus.pio_read(port, data);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.count(port);
        self.bus.pio_write(port, data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.bus.mmio_read(addr, data);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.bus.mmio_write(addr, data);
    }
}

struct Stdout;
impl Write for Stdout {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut o = std::io::stdout();
        o.write_all(b)?;
        o.flush()?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Disassemble guest kernel text around `rip` (kernel text is mapped at
/// 0xffffffff80000000 + physical).
fn disasm(mem: &kvmbox_cpu::GuestMemoryMmap, rip: u64) {
    use iced_x86::Formatter;
    use vm_memory::Bytes;
    let start = rip.wrapping_sub(24);
    let pa = start.wrapping_sub(0xffff_ffff_8000_0000);
    let mut buf = [0u8; 64];
    if mem.read_slice(&mut buf, vm_memory::GuestAddress(pa)).is_err() {
        return;
    }
    // Resynchronise: try start offsets until one decodes an instruction at exactly rip.
    for skew in 0..16 {
        let mut d = iced_x86::Decoder::with_ip(64, &buf[skew..], start + skew as u64, 0);
        let mut lines = Vec::new();
        let mut hit = false;
        let mut f = iced_x86::GasFormatter::new();
        while d.can_decode() && lines.len() < 14 {
            let ins = d.decode();
            if ins.ip() == rip {
                hit = true;
            }
            let mut out = String::new();
            f.format(&ins, &mut out);
            lines.push(format!("{}{:#x}: {out}", if ins.ip() == rip { "=> " } else { "   " }, ins.ip()));
        }
        if hit {
            for l in lines {
                eprintln!("{l}");
            }
            return;
        }
    }
}

fn host_tsc_hz() -> u64 {
    let t0 = Instant::now();
    // SAFETY: RDTSC has no memory effects.
    let c0 = unsafe { core::arch::x86_64::_rdtsc() };
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: as above.
    let c1 = unsafe { core::arch::x86_64::_rdtsc() };
    ((c1 - c0) as f64 / t0.elapsed().as_secs_f64()) as u64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(kernel) = args.get(1).map(std::path::PathBuf::from) else {
        eprintln!("usage: linux-probe KERNEL [INITRD] [EXTRA-CMDLINE] [MAX-INSTRUCTIONS]");
        std::process::exit(2);
    };
    let initrd = args.get(2).filter(|s| !s.is_empty()).map(std::path::PathBuf::from);
    let cmdline = format!("console=ttyS0 {}", args.get(3).cloned().unwrap_or_default());
    let max: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(20_000_000_000);
    let cpus: u32 = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(1);
    let mem_size = 256u64 << 20;
    let mem = kvmbox_arch::guest_memory(mem_size).expect("guest memory");
    let rsdp = kvmbox_arch::create_acpi_tables(&mem, cpus).expect("ACPI tables");
    let mut p = kvmbox_arch::LoadParams::new(&kernel, &cmdline, mem_size);
    p.rsdp = Some(rsdp);
    p.initrd = initrd.as_deref();
    p.host_decompress = true;
    p.prefer_pvh = false;
    p.cpus = cpus;
    let setup = kvmbox_arch::load(&mem, &p).expect("kernel load");

    let clock: Arc<dyn Clock> = Arc::new(HostClock::new());
    let chip = kvmbox_irqchip::IrqChip::new(cpus, clock.clone(), host_tsc_hz()).expect("irqchip");
    let io = Arc::new(Platform {
        bus: IoBus::default(),
        ports: Mutex::default(),
    });
    chip.attach(&io.bus).expect("irqchip bus devices");
    let serial = kvmbox_devices::legacy::serial::SerialPort::new(
        kvmbox_devices::legacy::IrqTrigger(chip.irq_line(4).expect("IRQ 4")),
        Box::new(Stdout),
    );
    io.bus.pio.insert(Arc::new(Mutex::new(serial)), 0x3f8, 8).unwrap();
    let waker = Arc::new(TimerWaker::new());
    let mut pit = Pit::new(Some(chip.irq_line(0).expect("IRQ 0")), clock.clone());
    pit.set_waker(waker.clone());
    let pit = Arc::new(Mutex::new(pit));
    chip.set_ack_notifier(0, Pit::ack_notifier(&pit)).expect("IRQ 0 acknowledgements");
    io.bus.pio.insert(pit.clone(), 0x40, 4).unwrap();
    io.bus.pio.insert(pit.clone(), 0x61, 1).unwrap();
    let _pit_thread = TimerThread::spawn("pit", pit, clock.clone(), waker).expect("PIT thread");
    // The CMOS RTC, as the VMM has it (without one, reads of ports 0x70/0x71 return 0xff: UIP
    // always set, and Linux's RTC reads spin in udelay waiting for it to clear).
    let rtc = kvmbox_devices::legacy::rtc::Rtc::with_host_time(None, clock.clone(), 0);
    io.bus.pio.insert(Arc::new(Mutex::new(rtc)), 0x70, 2).unwrap();
    let control = Arc::new(VmControl::new().expect("eventfd"));
    let pm = kvmbox_devices::legacy::acpi_pm::AcpiPm::new(
        control.clone(),
        kvmbox_arch::layout::ACPI_S5_SLP_TYP,
        kvmbox_arch::layout::ACPI_S3_SLP_TYP,
    );
    io.bus
        .pio
        .insert(Arc::new(Mutex::new(pm)), 0x600, kvmbox_devices::legacy::acpi_pm::PM_BLOCK_LEN)
        .unwrap();

    let vm = kvmbox_emu::EmuVm::new(mem.clone());
    // kvm-clock, as `kvmbox run --accel emu` offers it (PROBE_NO_KVM_CLOCK=1: without).
    if std::env::var_os("PROBE_NO_KVM_CLOCK").is_none() {
        vm.enable_kvm_clock(host_tsc_hz(), true);
    }
    let mem2 = mem.clone();
    vm.set_interrupt_controller(Arc::new(chip));
    let mut v = vm.create_emu_vcpu(0).expect("vCPU");
    v.configure(&kvmbox_cpu::VcpuConfig { id: 0, count: cpus }).unwrap();
    v.set_sregs(&setup.sregs).unwrap();
    v.set_regs(&setup.regs).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut aps = Vec::new();
    for id in 1..cpus {
        let mut ap = vm.create_emu_vcpu(id).expect("AP");
        ap.configure(&kvmbox_cpu::VcpuConfig { id, count: cpus }).unwrap();
        ap.set_wait_for_sipi().unwrap();
        let io = io.clone();
        let stop = stop.clone();
        let mem2 = mem2.clone();
        aps.push(std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match ap.run_steps(&*io, 1_000_000) {
                    Ok(None) | Ok(Some(VcpuExit::Halted)) => {}
                    other => {
                        eprintln!("\nAP {id} stopped: {other:?}");
                        break;
                    }
                }
            }
            let st = ap.state();
            eprintln!("AP {id} regs {:x?}", st.gpr);
            disasm(&mem2, st.rip);
            eprintln!(
                "AP {id}: rip {:#x} cs {:#x} cr0 {:#x} efer {:#x} rflags {:#x} waiting-for-SIPI {} halted {}; {:?}",
                st.rip,
                st.seg[1].selector,
                st.cr0,
                st.efer,
                st.rflags,
                ap.waiting_for_sipi(),
                ap.halted(),
                ap.stats()
            );
            ap.stats().instructions
        }));
    }
    let t = Instant::now();
    let mut done = 0u64;
    // PROBE_WATCH=<kernel virtual address>: print the u64 there every 100 M instructions.
    let watch = std::env::var("PROBE_WATCH")
        .ok()
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok());
    // PROBE_PROFILE=<file>: run in slices of PROBE_SAMPLE (default 10000) instructions, count
    // the BSP's RIP after each, and write "rip count" lines (hex, decimal) there at the end; a
    // slice that ran nothing (halted) counts as RIP 0, and 5 s halted in all ends the run.
    // Symbolize with the kernel's symbols (/proc/kallsyms of a `nokaslr` boot).
    let profile = std::env::var("PROBE_PROFILE").ok();
    let sample: u64 = std::env::var("PROBE_SAMPLE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let mut hist: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut halted_time = Duration::ZERO;
    let why = loop {
        if let Some(a) = watch {
            if done.is_multiple_of(100_000_000) {
                use vm_memory::Bytes;
                let val: u64 = mem
                    .read_obj(vm_memory::GuestAddress(a.wrapping_sub(0xffff_ffff_8000_0000)))
                    .unwrap_or(0);
                eprintln!("[watch] {done}: {a:#x} = {val:#x}; BSP rip {:#x} rflags {:#x} halted {} insns {} irqs {:?}", v.state().rip, v.state().rflags, v.halted(), v.stats().instructions, v.stats().interrupts);
            }
        }
        if v.stats().instructions >= max {
            break "instruction limit".to_string();
        }
        if let Some(req) = control.pending() {
            break format!("platform request {req:?}");
        }
        if profile.is_some() {
            let before = v.stats().instructions;
            let t0 = Instant::now();
            let r = v.run_steps(&*io, sample);
            if v.stats().instructions == before {
                halted_time += t0.elapsed();
                *hist.entry(0).or_default() += 1;
                if halted_time > Duration::from_secs(5) {
                    break "halted for 5 s".to_string();
                }
            } else {
                *hist.entry(v.state().rip).or_default() += 1;
            }
            match r {
                Ok(None) | Ok(Some(VcpuExit::Halted)) => {}
                other => break format!("{other:?}"),
            }
            done = v.stats().instructions / 10_000_000 * 10_000_000;
            continue;
        }
        match v.run_steps(&*io, 10_000_000) {
            Ok(None) | Ok(Some(VcpuExit::Halted)) => {}
            other => break format!("{other:?}"),
        }
        done += 10_000_000;
    };
    if let Some(path) = &profile {
        let mut out = String::new();
        for (rip, n) in &hist {
            out.push_str(&format!("{rip:x} {n}\n"));
        }
        if let Err(e) = std::fs::write(path, out) {
            eprintln!("cannot write the profile {path}: {e}");
        }
        eprintln!(
            "profile: {} samples of {sample} instructions; halted {:.2} s",
            hist.values().sum::<u64>(),
            halted_time.as_secs_f64()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for (i, h) in aps.into_iter().enumerate() {
        eprintln!("AP {}: {} instructions", i + 1, h.join().unwrap_or(0));
    }
    let st = v.stats();
    let s = v.state();
    eprintln!("BSP regs {:x?}", s.gpr);
    disasm(&mem, s.rip);
    eprintln!(
        "\nstopped: {why}\n{} instructions in {:.1} s ({:.1} M/s); rip {:#x}; exceptions {}; TLB misses {}; decoded-cache hits {}, decodes {}; generic {}; translated blocks {} ({} instructions, mean length {:.1}; block cache {} hits, {} builds); JIT {} blocks, {} instructions, {} flushes; unimplemented {:?}",
        st.instructions,
        t.elapsed().as_secs_f64(),
        st.instructions as f64 / t.elapsed().as_secs_f64() / 1e6,
        s.rip,
        st.exceptions,
        st.tlb_misses,
        st.decode_hits,
        st.decodes,
        st.generic,
        st.blocks,
        st.block_instructions,
        st.block_instructions as f64 / st.blocks.max(1) as f64,
        st.block_hits,
        st.block_builds,
        st.jit_blocks,
        st.jit_instructions,
        st.jit_flushes,
        st.unimplemented
    );
    eprintln!("port accesses: {:x?}", io.ports.lock().unwrap());
}
