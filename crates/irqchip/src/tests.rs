//! Whole-chip tests: Linux-style sequences across LAPICs, IOAPIC, PIC and the PIT.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvmbox_devices::legacy::pit::{Clock, HostClock, ManualClock, Pit, TimedDevice};
use kvmbox_devices::BusDevice;

use super::*;

const TSC_HZ: u64 = 2_500_000_000;

fn chip(n: u32) -> (IrqChip, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1_000_000));
    (IrqChip::new(n, clock.clone(), TSC_HZ).unwrap(), clock)
}

fn w32(v: &VcpuIrq, off: u64, val: u32) {
    v.mmio_write(off, &val.to_le_bytes());
}

fn r32(v: &VcpuIrq, off: u64) -> u32 {
    let mut d = [0u8; 4];
    v.mmio_read(off, &mut d);
    u32::from_le_bytes(d)
}

fn sw_enable(v: &VcpuIrq) {
    w32(v, 0xf0, 0x1ff);
}

/// setup_local_APIC() once the IOAPIC is in use: LINT0 ExtINT but masked.
fn mask_lint0(v: &VcpuIrq) {
    w32(v, 0x350, 0x1_0700);
}

/// io_apic.c ioapic_write_entry(): high dword first, then low.
fn ioapic_route(io: &mut IoApicDevice, pin: u8, low: u32, high: u32) {
    io.write(0, 0, &[0x10 + 2 * pin + 1]);
    io.write(0, 0x10, &high.to_le_bytes());
    io.write(0, 0, &[0x10 + 2 * pin]);
    io.write(0, 0x10, &low.to_le_bytes());
}

fn ioapic_read(io: &mut IoApicDevice, reg: u8) -> u32 {
    io.write(0, 0, &[reg]);
    let mut d = [0u8; 4];
    io.read(0, 0x10, &mut d);
    u32::from_le_bytes(d)
}

#[test]
fn rejects_bad_configuration() {
    let clock = Arc::new(ManualClock::new(0));
    assert!(matches!(
        IrqChip::new(0, clock.clone(), 1),
        Err(Error::VcpuCount(0))
    ));
    assert!(matches!(
        IrqChip::new(256, clock.clone(), 1),
        Err(Error::VcpuCount(256))
    ));
    assert!(matches!(
        IrqChip::new(1, clock.clone(), 0),
        Err(Error::TscHz)
    ));
    let c = IrqChip::new(2, clock, 1).unwrap();
    assert!(matches!(c.vcpu(2), Err(Error::NoVcpu(2))));
    assert!(matches!(c.set_irq(24, true), Err(Error::BadGsi(24))));
    assert!(c.irq_line(24).is_err());
    assert_eq!(
        Error::BadGsi(24).to_string(),
        "GSI 24 is not an IOAPIC pin (0..24)"
    );
}

#[test]
fn init_sipi_sipi_starts_an_ap() {
    let (c, _) = chip(2);
    let bsp = c.vcpu(0).unwrap();
    let ap = c.vcpu(1).unwrap();
    ap.set_wait_for_sipi();
    assert!(ap.waiting_for_sipi());
    let t = std::thread::spawn(move || {
        let mut inits = 0;
        loop {
            match ap.wait(false, Some(Duration::from_secs(10))) {
                Wake::Init => {
                    assert!(ap.take_init());
                    inits += 1;
                }
                Wake::Sipi => {
                    let v = ap.take_sipi();
                    assert!(!ap.waiting_for_sipi());
                    return (inits, v, ap);
                }
                w => panic!("unexpected wake {w:?}"),
            }
        }
    });
    // arch/x86/kernel/smpboot.c wakeup_secondary_cpu_via_init(): INIT assert, INIT
    // de-assert, then two STARTUPs, each through ICR2 then ICR.
    sw_enable(&bsp);
    w32(&bsp, 0x310, 1 << 24);
    w32(&bsp, 0x300, 0x0000_c500); // INIT, level, assert
    w32(&bsp, 0x310, 1 << 24);
    w32(&bsp, 0x300, 0x0000_8500); // INIT, level, de-assert
    for _ in 0..2 {
        w32(&bsp, 0x310, 1 << 24);
        w32(&bsp, 0x300, 0x0000_069f); // STARTUP, vector 0x9f
    }
    let (inits, v, ap) = t.join().unwrap();
    assert_eq!((inits, v), (1, Some(0x9f)));
    assert_eq!(ap.take_sipi(), None, "the second SIPI finds the AP running");
    assert_eq!(r32(&bsp, 0x280), 0, "no errors");
    // A vCPU waiting for SIPI ignores NMIs (no busy wake-ups).
    ap.set_wait_for_sipi();
    w32(&bsp, 0x300, 0x0000_4400); // NMI to APIC 1
    assert!(ap.has_events(false), "NMI pending");
    assert_eq!(ap.wait(true, Some(Duration::from_millis(2))), Wake::Timeout);
    assert!(ap.take_nmi());
    let ap2 = ap.clone();
    let t = std::thread::spawn(move || ap2.wait(false, Some(Duration::from_secs(10))));
    std::thread::sleep(Duration::from_millis(5));
    w32(&bsp, 0x300, 0x0000_0611); // another STARTUP (vector 0x11), dest 1 from ICR2
    assert_eq!(t.join().unwrap(), Wake::Sipi);
    assert_eq!(ap.take_sipi(), Some(0x11));
}

#[test]
fn ipis_fixed_self_and_all_but_self() {
    let (c, _) = chip(3);
    let v: Vec<_> = (0..3).map(|i| c.vcpu(i).unwrap()).collect();
    v.iter().for_each(sw_enable);
    // Fixed IPI to APIC 2, physical.
    w32(&v[0], 0x310, 2 << 24);
    w32(&v[0], 0x300, 0x40f3);
    assert_eq!(v[2].pending_interrupt(true), Some(0xf3));
    assert_eq!(v[1].pending_interrupt(true), None);
    assert_eq!(v[2].ack(), Some(0xf3));
    w32(&v[2], 0xb0, 0);
    // All-but-self.
    w32(&v[1], 0x300, 0x000c_40f4);
    assert_eq!(v[0].ack(), Some(0xf4));
    assert_eq!(v[2].ack(), Some(0xf4));
    assert_eq!(v[1].ack(), None);
    // Self.
    w32(&v[1], 0x300, 0x0004_40f5);
    assert_eq!(v[1].ack(), Some(0xf5));
    assert_eq!(r32(&v[1], 0xa0), 0xf0, "PPR follows the in-service class");
    w32(&v[1], 0xb0, 0);
    // NMI to all including self.
    w32(&v[0], 0x300, 0x0008_4400);
    assert!(v.iter().all(|x| x.has_events(false) && x.take_nmi()));
    // x2APIC ICR MSR: one 64-bit write.
    v[0].write_msr(
        MSR_APIC_BASE,
        0xfee0_0000 | (1 << 11) | (1 << 10) | (1 << 8),
    )
    .unwrap();
    v[0].write_msr(0x830, (1u64 << 32) | 0x40e0).unwrap();
    assert_eq!(v[1].ack(), Some(0xe0));
    assert!(is_irqchip_msr(0x830) && !is_irqchip_msr(0x10));
}

#[test]
fn ioapic_level_irq_eoi_broadcast() {
    let (c, _) = chip(2);
    let bsp = c.vcpu(0).unwrap();
    let ap = c.vcpu(1).unwrap();
    sw_enable(&bsp);
    sw_enable(&ap);
    mask_lint0(&bsp);
    let mut io = c.ioapic_device();
    // Pin 11: level, active low, vector 0x51, physical dest 1.
    ioapic_route(&mut io, 11, 0x0000_a051, 0x0100_0000);
    let line = c.irq_line(11).unwrap();
    line.set_level(true).unwrap();
    assert_eq!(bsp.pending_interrupt(true), None);
    assert_eq!(ap.pending_interrupt(true), Some(0x51));
    assert_eq!(ap.pending_interrupt(false), None);
    assert_eq!(ap.ack(), Some(0x51));
    assert_eq!(r32(&ap, 0x180 + 0x20) & (1 << 0x11), 1 << 0x11, "TMR");
    assert_ne!(ioapic_read(&mut io, 0x10 + 22) & (1 << 14), 0, "remote IRR");
    // EOI with the line still asserted: re-delivered.
    w32(&ap, 0xb0, 0);
    assert_eq!(ap.ack(), Some(0x51));
    // The device deasserts; EOI clears remote IRR and nothing comes back.
    line.set_level(false).unwrap();
    w32(&ap, 0xb0, 0);
    assert_eq!(ioapic_read(&mut io, 0x10 + 22) & (1 << 14), 0);
    assert_eq!(ap.pending_interrupt(true), None);
    // Edge pin 4 to logical flat dest 0x01 (BSP; Linux's default LDR for CPU 0).
    w32(&bsp, 0xe0, 0xffff_ffff);
    w32(&bsp, 0xd0, 0x0100_0000);
    ioapic_route(&mut io, 4, 0x0000_0834, 0x0100_0000);
    let com1 = c.irq_line(4).unwrap();
    com1.trigger().unwrap();
    assert_eq!(bsp.ack(), Some(0x34));
    w32(&bsp, 0xb0, 0);
    assert_eq!(bsp.ack(), None);
}

#[test]
fn shared_level_lines_are_wired_or() {
    let (c, _) = chip(1);
    let bsp = c.vcpu(0).unwrap();
    sw_enable(&bsp);
    let mut io = c.ioapic_device();
    ioapic_route(&mut io, 16, 0x0000_a061, 0);
    let a = c.irq_line(16).unwrap();
    let b = c.irq_line(16).unwrap();
    a.set_level(true).unwrap();
    b.set_level(true).unwrap();
    a.set_level(false).unwrap();
    assert_eq!(bsp.ack(), Some(0x61));
    w32(&bsp, 0xb0, 0);
    assert_eq!(bsp.ack(), Some(0x61), "b still holds the line");
    b.set_level(false).unwrap();
    w32(&bsp, 0xb0, 0);
    assert_eq!(bsp.ack(), None);
}

#[test]
fn pic_extint_through_lint0_and_spurious() {
    let (c, _) = chip(2);
    let bsp = c.vcpu(0).unwrap();
    let ap = c.vcpu(1).unwrap();
    let mut pic = c.pic_device();
    let out = |p: &mut PicDevice, port: u64, v: u8| {
        let base = port & !1;
        p.write(base, port - base, &[v]);
    };
    for (port, v) in [
        (0x21, 0xff),
        (0xa1, 0xff),
        (0x20, 0x11),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x38),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, 0xeb), // IRQ 2 and 4 unmasked
    ] {
        out(&mut pic, port, v);
    }
    c.irq_line(4).unwrap().trigger().unwrap();
    // The BSP's LINT0 is in ExtINT mode from reset even with the APIC software-disabled.
    assert!(bsp.has_events(true));
    assert!(!bsp.has_events(false));
    assert_eq!(bsp.pending_interrupt(true), Some(0x34));
    assert_eq!(ap.pending_interrupt(true), None, "APs' LINT0 is masked");
    assert_eq!(bsp.ack(), Some(0x34));
    out(&mut pic, 0x20, 0x20);
    // ELCR: IRQ 5 level; the device drops the line before the CPU acknowledges.
    pic.write(0x4d0, 0, &[0x20]);
    out(&mut pic, 0x21, 0xcb);
    c.set_irq(5, true).unwrap();
    assert_eq!(bsp.pending_interrupt(true), Some(0x35));
    c.set_irq(5, false).unwrap();
    assert_eq!(bsp.pending_interrupt(true), None);
    // Linux masks LINT0 once the IOAPIC takes over: the PIC no longer reaches the CPU.
    sw_enable(&bsp);
    w32(&bsp, 0x350, 0x1_0700);
    c.set_irq(5, true).unwrap();
    assert_eq!(bsp.pending_interrupt(true), None);
    // Byte-only ports: wider reads are all ones.
    let mut d = [0u8; 2];
    pic.read(0x20, 0, &mut d);
    assert_eq!(d, [0xff, 0xff]);
}

#[test]
fn msi_physical_logical_and_lowest_priority() {
    let (c, _) = chip(4);
    let v: Vec<_> = (0..4).map(|i| c.vcpu(i).unwrap()).collect();
    for (i, x) in v.iter().enumerate() {
        sw_enable(x);
        w32(x, 0xd0, 1 << (24 + i));
    }
    let msi = c.msi_line();
    msi.set_message(0xfee0_0000 | (3 << 12), 0x41).unwrap();
    msi.trigger().unwrap();
    assert_eq!(v[3].ack(), Some(0x41));
    assert!(v[..3].iter().all(|x| x.ack().is_none()));
    let eoi = |x: &VcpuIrq| w32(x, 0xb0, 0);
    eoi(&v[3]);
    // Logical, fixed, to CPUs 2 and 3.
    msi.set_message(0xfee0_0004 | (0x0c << 12), 0x42).unwrap();
    msi.trigger().unwrap();
    assert_eq!((v[2].ack(), v[3].ack()), (Some(0x42), Some(0x42)));
    eoi(&v[2]);
    eoi(&v[3]);
    // Lowest priority: only one of them, the one with the lower priority.
    w32(&v[2], 0x80, 0x20);
    msi.set_message(0xfee0_0004 | (0x0c << 12), 0x143).unwrap();
    msi.trigger().unwrap();
    assert_eq!((v[2].ack(), v[3].ack()), (None, Some(0x43)));
    // Not an APIC address: dropped and counted.
    msi.set_message(0xdead_0000, 0x44).unwrap();
    msi.trigger().unwrap();
    assert_eq!(c.dropped_msis(), 1);
    assert!(v.iter().all(|x| x.ack().is_none()));
}

/// Linux's calibrate_APIC_clock() without a known crystal: the PIT's channel 0 ticks at HZ
/// through IOAPIC pin 2; the handler samples the LAPIC current count (divide by 16, initial
/// 0xffffffff) and the TSC on each tick for HZ/10 ticks.
#[test]
fn lapic_timer_calibration_against_pit_irq0() {
    let (c, clock) = chip(1);
    let bsp = c.vcpu(0).unwrap();
    sw_enable(&bsp);
    mask_lint0(&bsp);
    let mut pit = Pit::new(Some(c.irq_line(0).unwrap()), clock.clone());
    let mut io = c.ioapic_device();
    ioapic_route(&mut io, 2, 0x30, 0);
    // PIT: HZ=250 periodic (LATCH = 1193182/250 rounded).
    let latch = 4773u16;
    pit.write_port(0x43, 0x34);
    pit.write_port(0x40, latch as u8);
    pit.write_port(0x40, (latch >> 8) as u8);
    // __setup_APIC_LVTT(0xffffffff, 0, 0): one-shot, masked, divide 16.
    w32(&bsp, 0x3e0, 0x3);
    w32(&bsp, 0x320, 0x1_00ec);
    w32(&bsp, 0x380, 0xffff_ffff);
    let loops = 25;
    let mut samples = Vec::new();
    while samples.len() <= loops {
        let d = pit.next_deadline().unwrap();
        clock.set(d);
        pit.tick(d);
        assert_eq!(bsp.ack(), Some(0x30), "PIT tick through the IOAPIC");
        samples.push((r32(&bsp, 0x390), bsp.guest_tsc()));
        w32(&bsp, 0xb0, 0);
    }
    let (a0, t0) = samples[0];
    let (a1, t1) = samples[loops];
    let period_ns = u64::from(latch) as f64 * 1e9 / 1_193_182.0;
    let secs = period_ns * loops as f64 / 1e9;
    let apic_hz = f64::from(a0 - a1) * 16.0 / secs;
    let tsc_hz = (t1 - t0) as f64 / secs;
    assert!(
        (apic_hz / APIC_BUS_HZ as f64 - 1.0).abs() < 1e-4,
        "APIC {apic_hz}"
    );
    assert!((tsc_hz / TSC_HZ as f64 - 1.0).abs() < 1e-4, "TSC {tsc_hz}");
}

/// Missed PIT periods (the timer thread and the vCPU ran late on a busy host) reach the guest
/// one per EOI, back to back, through the IOAPIC (LAPIC EOI) and through the PIC (EOI to
/// port 0x20, and auto-EOI), as Linux's `timer_irq_works()` needs them.
#[test]
fn missed_pit_periods_arrive_one_per_eoi_through_ioapic_and_pic() {
    use std::sync::Mutex;
    let (c, clock) = chip(1);
    let bsp = c.vcpu(0).unwrap();
    sw_enable(&bsp);
    mask_lint0(&bsp);
    let mut io = c.ioapic_device();
    ioapic_route(&mut io, 2, 0x30, 0);
    let pit = Arc::new(Mutex::new(Pit::new(
        Some(c.irq_line(0).unwrap()),
        clock.clone(),
    )));
    c.set_ack_notifier(0, Pit::ack_notifier(&pit)).unwrap();
    let latch = 1194u16; // HZ=1000
    {
        let mut p = pit.lock().unwrap();
        p.write_port(0x43, 0x34);
        p.write_port(0x40, latch as u8);
        p.write_port(0x40, (latch >> 8) as u8);
    }
    let period = u64::from(latch) * 1_000_000_000 / 1_193_182 + 1;
    clock.advance(8 * period);
    pit.lock().unwrap().tick(clock.now_ns());
    let mut taken = 0;
    while let Some(v) = bsp.ack() {
        assert_eq!(v, 0x30);
        taken += 1;
        assert!(taken <= 8, "more interrupts than periods");
        w32(&bsp, 0xb0, 0); // the EOI raises the next missed period at once
    }
    assert_eq!(taken, 8, "every missed period, one per EOI");
    assert_eq!(pit.lock().unwrap().backlog(), 0);

    // The same through the PIC (check_timer()'s fallback): IOAPIC pin masked, LINT0 ExtINT.
    ioapic_route(&mut io, 2, 0x1_0030, 0);
    w32(&bsp, 0x350, 0x700);
    let mut pic = c.pic_device();
    let out = |p: &mut PicDevice, port: u64, v: u8| {
        let base = port & !1;
        p.write(base, port - base, &[v]);
    };
    for (port, v) in [
        (0x20, 0x11),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, 0xfe),
    ] {
        out(&mut pic, port, v);
    }
    // The edge raised meanwhile (pin masked) waits in the PIC's IRR; a period's retry
    // would raise it again had it been lost.
    clock.advance(4 * period);
    pit.lock().unwrap().tick(clock.now_ns());
    let mut taken = 0;
    while let Some(v) = bsp.ack() {
        assert_eq!(v, 0x30);
        taken += 1;
        assert!(taken <= 5, "more interrupts than periods");
        out(&mut pic, 0x20, 0x20); // non-specific EOI
    }
    assert!(taken >= 4, "only {taken} of 4 missed periods");
    // Auto-EOI mode: the acknowledge itself ends the service.
    for (port, v) in [
        (0x20, 0x11),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x03),
        (0x21, 0xfe),
    ] {
        out(&mut pic, port, v);
    }
    clock.advance(3 * period);
    pit.lock().unwrap().tick(clock.now_ns());
    let mut taken = 0;
    while let Some(v) = bsp.ack() {
        assert_eq!(v, 0x30);
        taken += 1;
        assert!(taken <= 4, "more interrupts than periods");
    }
    assert!(taken >= 3, "only {taken} of 3 missed periods");
}

/// The same measurement against PIT channel 2 (pit_calibrate_tsc() style): gate on through
/// port 0x61, mode 0 for 50 ms, poll OUT2.
#[test]
fn lapic_timer_calibration_against_pit_channel2() {
    let (c, clock) = chip(1);
    let bsp = c.vcpu(0).unwrap();
    sw_enable(&bsp);
    let mut pit = Pit::new(None, clock.clone());
    w32(&bsp, 0x3e0, 0xb); // divide by 1
    w32(&bsp, 0x320, 0x1_00ec);
    w32(&bsp, 0x380, 0xffff_ffff);
    let latch = (1_193_182 / 20) as u16;
    let p61 = pit.read_port(0x61);
    pit.write_port(0x61, (p61 & !0x02) | 0x01);
    pit.write_port(0x43, 0xb0);
    pit.write_port(0x42, latch as u8);
    pit.write_port(0x42, (latch >> 8) as u8);
    let (c0, t0) = (r32(&bsp, 0x390), bsp.guest_tsc());
    let mut polls = 0;
    while pit.read_port(0x61) & 0x20 == 0 {
        clock.advance(3_000); // the cost of one inb on this machine, roughly
        polls += 1;
        assert!(polls < 100_000);
    }
    let (c1, t1) = (r32(&bsp, 0x390), bsp.guest_tsc());
    let secs = f64::from(latch) / 1_193_182.0;
    let apic_hz = f64::from(c0 - c1) / secs;
    let tsc_hz = (t1 - t0) as f64 / secs;
    assert!(
        (apic_hz / APIC_BUS_HZ as f64 - 1.0).abs() < 1e-3,
        "APIC {apic_hz}"
    );
    assert!((tsc_hz / TSC_HZ as f64 - 1.0).abs() < 1e-3, "TSC {tsc_hz}");
}

#[test]
fn halted_vcpu_wakes_for_its_timer_and_for_ipis() {
    let clock = Arc::new(HostClock::new());
    let c = IrqChip::new(2, clock.clone(), TSC_HZ).unwrap();
    let bsp = c.vcpu(0).unwrap();
    let ap = c.vcpu(1).unwrap();
    sw_enable(&bsp);
    sw_enable(&ap);
    // One-shot 3 ms at divide 1.
    w32(&bsp, 0x3e0, 0xb);
    w32(&bsp, 0x320, 0xec);
    w32(&bsp, 0x380, 3_000_000);
    let start = Instant::now();
    assert_eq!(
        bsp.wait(true, Some(Duration::from_secs(5))),
        Wake::Interrupt
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(3) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(bsp.ack(), Some(0xec));
    w32(&bsp, 0xb0, 0);
    // IF clear: the timer's interrupt does not wake a HLT, the timeout does.
    w32(&bsp, 0x380, 1_000);
    assert_eq!(
        bsp.wait(false, Some(Duration::from_millis(5))),
        Wake::Timeout
    );
    assert_eq!(bsp.ack(), Some(0xec));
    w32(&bsp, 0xb0, 0);
    // TSC-deadline 2 ms ahead.
    w32(&bsp, 0x320, 0x4_00ed);
    bsp.write_msr(MSR_TSC_DEADLINE, bsp.guest_tsc() + TSC_HZ / 500)
        .unwrap();
    assert_eq!(
        bsp.wait(true, Some(Duration::from_secs(5))),
        Wake::Interrupt
    );
    assert_eq!(bsp.ack(), Some(0xed));
    // An IPI from another thread wakes a halted AP, and its notifier runs.
    let notes = Arc::new(AtomicU32::new(0));
    let n2 = notes.clone();
    ap.set_notifier(Arc::new(move || {
        n2.fetch_add(1, Ordering::SeqCst);
    }));
    let sender = bsp.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        w32(&sender, 0x310, 1 << 24);
        w32(&sender, 0x300, 0x40d0);
    });
    assert_eq!(ap.wait(true, Some(Duration::from_secs(5))), Wake::Interrupt);
    t.join().unwrap();
    assert_eq!(ap.ack(), Some(0xd0));
    assert!(notes.load(Ordering::SeqCst) >= 1);
    // Kicks.
    let k = ap.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(10));
        kvmbox_cpu::VcpuKicker::kick(&k);
    });
    assert_eq!(ap.wait(false, None), Wake::Kicked);
    t.join().unwrap();
    ap.kick();
    assert!(ap.has_events(false));
    assert!(ap.take_kick());
    assert!(!ap.has_events(true));
}

#[test]
fn attach_puts_pic_and_ioapic_on_the_bus() {
    use kvmbox_cpu::IoHandler;
    let (c, _) = chip(1);
    let bus = kvmbox_devices::IoBus::default();
    c.attach(&bus).unwrap();
    bus.pio_write(0x21, &[0x5a]);
    let mut b = [0u8];
    bus.pio_read(0x21, &mut b);
    assert_eq!(b[0], 0x5a);
    bus.pio_write(0x4d1, &[0xff]);
    bus.pio_read(0x4d1, &mut b);
    assert_eq!(b[0], 0xde);
    bus.mmio_write(kvmbox_arch::layout::IOAPIC_START, &[1, 0, 0, 0]);
    let mut d = [0u8; 4];
    bus.mmio_read(kvmbox_arch::layout::IOAPIC_START + 0x10, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x0017_0020);
    assert!(c.attach(&bus).is_err(), "twice overlaps");
}

#[test]
fn hostile_guest_cannot_panic_the_chip() {
    let (c, clock) = chip(2);
    let v = c.vcpu(0).unwrap();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let r = rnd();
        let off = (r >> 8) & 0xfff;
        let val = (rnd() & 0xffff_ffff) as u32;
        match r & 7 {
            0 => w32(&v, off & !0xf, val),
            1 => v.mmio_write(off, &val.to_le_bytes()[..(r as usize >> 20) % 5]),
            2 => {
                let mut d = [0u8; 8];
                v.mmio_read(off, &mut d[..(r as usize >> 20) % 9]);
            }
            3 => {
                let msr = [0x1b, 0x6e0, 0x800 + (off as u32 & 0xff)][(r as usize >> 24) % 3];
                let _ = v.write_msr(msr, rnd());
                let _ = v.read_msr(msr);
            }
            4 => c.send_msi(0xfee0_0000 | (rnd() & 0xf_fffc), val),
            5 => {
                let _ = c.set_irq(val % 24, r & 0x100 != 0);
            }
            6 => {
                let _ = v.ack();
                let _ = v.take_nmi();
                let _ = v.take_init();
                let _ = v.take_sipi();
            }
            _ => clock.advance(val.into()),
        }
        let _ = v.has_events(true);
    }
    // Still a working chip afterwards: reset to xAPIC and deliver.
    for g in 0..24 {
        c.set_irq(g, false).unwrap();
    }
    let _ = v.write_msr(MSR_APIC_BASE, 0);
    v.write_msr(MSR_APIC_BASE, 0xfee0_0900).unwrap();
    sw_enable(&v);
    mask_lint0(&v);
    for _ in 0..600 {
        if v.ack().is_none() {
            break;
        }
        w32(&v, 0xb0, 0);
    }
    c.send_msi(0xfee0_0000, 0xfe);
    assert_eq!(v.ack(), Some(0xfe));
    assert!(clock.now_ns() > 0);
}

/// The PIT on its own timer thread drives IRQ 0 through IOAPIC pin 2 into a vCPU that
/// halts between ticks, all on the host clock.
#[test]
fn pit_thread_wakes_a_halted_vcpu_at_1khz() {
    use kvmbox_devices::legacy::pit::{TimerThread, TimerWaker};
    use std::sync::Mutex;
    let clock: Arc<dyn Clock> = Arc::new(HostClock::new());
    let c = IrqChip::new(1, clock.clone(), TSC_HZ).unwrap();
    let bsp = c.vcpu(0).unwrap();
    sw_enable(&bsp);
    mask_lint0(&bsp);
    ioapic_route(&mut c.ioapic_device(), 2, 0x30, 0);
    let waker = Arc::new(TimerWaker::new());
    let mut pit = Pit::new(Some(c.irq_line(0).unwrap()), clock.clone());
    pit.set_waker(waker.clone());
    let pit = Arc::new(Mutex::new(pit));
    c.set_ack_notifier(0, Pit::ack_notifier(&pit)).unwrap();
    let thread = TimerThread::spawn("pit", pit.clone(), clock.clone(), waker).unwrap();
    {
        let mut p = pit.lock().unwrap();
        p.write_port(0x43, 0x34);
        p.write_port(0x40, 0xa9);
        p.write_port(0x40, 0x04);
    }
    // Count 100 ticks. A loaded host delays ticks (this counted fewer than 50 in 100 ms at
    // load average 31 when late ticks were coalesced; missed ones now come back to back after
    // each EOI), so the count within a fixed time proves nothing; instead the 100 ticks must
    // all come, and never faster than the 1 kHz the PIT was set to. The 60 s bound only
    // catches a PIT that stopped.
    let start = Instant::now();
    let mut ticks = 0;
    while ticks < 100 && start.elapsed() < Duration::from_secs(60) {
        if bsp.wait(true, Some(Duration::from_millis(50))) == Wake::Interrupt {
            assert_eq!(bsp.ack(), Some(0x30));
            w32(&bsp, 0xb0, 0);
            ticks += 1;
        }
    }
    let ms = start.elapsed().as_secs_f64() * 1e3;
    drop(thread);
    assert_eq!(ticks, 100, "only {ticks} ticks in {ms:.0} ms");
    // The first tick comes at most 1 ms after `start`, the 100th 99 periods later.
    assert!(ms >= 98.0, "100 ticks in {ms:.1} ms: faster than 1 kHz");
}

/// Prints what the engine pays per poll and per cross-thread wake-up.
/// `cargo test -p kvmbox-irqchip measure -- --ignored --nocapture`
#[test]
#[ignore = "measurement, prints numbers"]
fn measure_poll_and_wake_costs() {
    let clock: Arc<dyn Clock> = Arc::new(HostClock::new());
    let c = IrqChip::new(2, clock, TSC_HZ).unwrap();
    let bsp = c.vcpu(0).unwrap();
    let ap = c.vcpu(1).unwrap();
    sw_enable(&bsp);
    sw_enable(&ap);
    let n = 1_000_000u32;
    let t = Instant::now();
    let mut k = 0;
    for _ in 0..n {
        k += u32::from(bsp.has_events(true));
    }
    let has = t.elapsed() / n;
    let t = Instant::now();
    for _ in 0..n {
        k += u32::from(bsp.pending_interrupt(true).is_some());
    }
    let pend = t.elapsed() / n;
    assert_eq!(k, 0);
    let rounds = 2000u32;
    let ap2 = ap.clone();
    let waiter = std::thread::spawn(move || {
        for _ in 0..rounds {
            while ap2.wait(true, Some(Duration::from_secs(5))) != Wake::Interrupt {}
            ap2.ack().unwrap();
            w32(&ap2, 0xb0, 0);
        }
    });
    let t = Instant::now();
    for _ in 0..rounds {
        w32(&bsp, 0x310, 1 << 24);
        w32(&bsp, 0x300, 0x40d0);
        while ap.has_events(true) || r32(&ap, 0x100 + 0x60) != 0 {
            std::hint::spin_loop();
        }
    }
    let ipi = t.elapsed() / rounds;
    waiter.join().unwrap();
    println!("has_events {has:?}/call, pending_interrupt {pend:?}/call, IPI to halted vCPU and back {ipi:?}");
}

/// The CMOS RTC's periodic interrupt reaches the BSP as IRQ 8 through the slave PIC.
#[test]
fn rtc_periodic_irq8_through_the_slave_pic() {
    use kvmbox_devices::legacy::rtc::Rtc;
    let (c, clock) = chip(1);
    let bsp = c.vcpu(0).unwrap();
    let mut pic = c.pic_device();
    for (port, v) in [
        (0x20u64, 0x11u8),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x38),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, 0xfb),
        (0xa1, 0xfe),
    ] {
        pic.write(port & !1, port & 1, &[v]);
    }
    let mut rtc = Rtc::new(Some(c.irq_line(8).unwrap()), clock.clone(), 0);
    rtc.write(0x70, 0, &[0x0b]);
    rtc.write(0x70, 1, &[0x42]);
    let d = rtc.next_deadline().unwrap();
    clock.set(d);
    rtc.tick(d);
    assert_eq!(bsp.ack(), Some(0x38));
    // Linux's rtc handler reads register C, then EOIs slave and master.
    rtc.write(0x70, 0, &[0x0c]);
    let mut b = [0u8];
    rtc.read(0x70, 1, &mut b);
    assert_eq!(b[0] & 0xc0, 0xc0);
    pic.write(0xa0, 0, &[0x20]);
    pic.write(0x20, 0, &[0x20]);
    let d = rtc.next_deadline().unwrap();
    clock.set(d);
    rtc.tick(d);
    assert_eq!(bsp.ack(), Some(0x38));
}
