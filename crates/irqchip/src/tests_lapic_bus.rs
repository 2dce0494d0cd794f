//! The chip with its local APICs elsewhere ([`IrqChip::with_lapic_bus`], KVM's split irqchip):
//! what reaches the [`LapicBus`] and what the boot CPU's backend gets back. The same paths run
//! for real in `crates/kvmbox/tests/testguest_kvm.rs` (`irqlevel`, `irqpic`).

use std::sync::{Arc, Mutex};

use kvmbox_cpu::{LapicBus, PlatformIrq};
use kvmbox_devices::legacy::pit::ManualClock;
use kvmbox_devices::BusDevice;

use crate::IrqChip;

#[derive(Default)]
struct Recorder {
    msis: Mutex<Vec<(u64, u32)>>,
    routes: Mutex<Vec<Vec<(u64, u32)>>>,
    extints: Mutex<u32>,
}

impl LapicBus for Recorder {
    fn send_msi(&self, addr: u64, data: u32) {
        self.msis.lock().unwrap().push((addr, data));
    }
    fn set_ioapic_routes(&self, routes: &[(u64, u32)]) {
        self.routes.lock().unwrap().push(routes.to_vec());
    }
    fn extint_raised(&self) {
        *self.extints.lock().unwrap() += 1;
    }
}

fn split_chip() -> (IrqChip, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let chip = IrqChip::with_lapic_bus(Arc::new(ManualClock::new(0)), rec.clone());
    (chip, rec)
}

fn ioapic_write(chip: &IrqChip, reg: u32, value: u32) {
    let mut dev = chip.ioapic_device();
    dev.write(0, 0x00, &reg.to_le_bytes());
    dev.write(0, 0x10, &value.to_le_bytes());
}

fn ioapic_read(chip: &IrqChip, reg: u32) -> u32 {
    let mut dev = chip.ioapic_device();
    dev.write(0, 0x00, &reg.to_le_bytes());
    let mut d = [0u8; 4];
    dev.read(0, 0x10, &mut d);
    u32::from_le_bytes(d)
}

const LEVEL: u32 = 1 << 15;
const REMOTE_IRR: u32 = 1 << 14;

#[test]
fn level_pin_sends_level_msis_and_waits_for_the_eoi() {
    let (chip, rec) = split_chip();
    // Pin 20 (a PCI GSI: the PIC does not see it): vector 0x41, level, destination APIC 1.
    ioapic_write(&chip, 0x10 + 2 * 20 + 1, 1 << 24);
    ioapic_write(&chip, 0x10 + 2 * 20, LEVEL | 0x41);
    let routes = rec.routes.lock().unwrap().last().cloned().unwrap();
    assert_eq!(routes.len(), 24);
    assert_eq!(
        routes[20],
        (0xfee0_1000, 0xc041),
        "the pin's route says level (KVM's EOI-exit bitmap)"
    );
    assert_eq!(routes[3].1 & (1 << 15), 0, "edge pins are not level");

    chip.set_irq(20, true).unwrap();
    assert_eq!(*rec.msis.lock().unwrap(), vec![(0xfee0_1000, 0xc041)]);
    assert_ne!(ioapic_read(&chip, 0x10 + 2 * 20) & REMOTE_IRR, 0);
    chip.set_irq(20, true).unwrap();
    assert_eq!(
        rec.msis.lock().unwrap().len(),
        1,
        "no re-delivery before the EOI"
    );
    // EOI while the line is still high: delivered again.
    chip.eoi(0x41);
    assert_eq!(rec.msis.lock().unwrap().len(), 2);
    // The line drops; the EOI clears remote IRR and sends nothing.
    chip.set_irq(20, false).unwrap();
    chip.eoi(0x41);
    assert_eq!(rec.msis.lock().unwrap().len(), 2);
    assert_eq!(ioapic_read(&chip, 0x10 + 2 * 20) & REMOTE_IRR, 0);
    // An EOI of another vector changes nothing.
    chip.set_irq(20, true).unwrap();
    chip.eoi(0x42);
    assert_eq!(rec.msis.lock().unwrap().len(), 3);
    assert_ne!(ioapic_read(&chip, 0x10 + 2 * 20) & REMOTE_IRR, 0);
    assert_eq!(
        *rec.extints.lock().unwrap(),
        0,
        "GSI 20 does not reach the PIC"
    );
}

#[test]
fn edge_pin_and_unchanged_routes() {
    let (chip, rec) = split_chip();
    ioapic_write(&chip, 0x10 + 2 * 4, 0x24);
    let commits = rec.routes.lock().unwrap().len();
    // IOREGSEL writes alone do not re-send the routes.
    chip.ioapic_device().write(0, 0x00, &[0x18]);
    assert_eq!(rec.routes.lock().unwrap().len(), commits);
    chip.set_irq(4, true).unwrap();
    chip.set_irq(4, false).unwrap();
    chip.set_irq(4, true).unwrap();
    let msis = rec.msis.lock().unwrap().clone();
    assert_eq!(msis, vec![(0xfee0_0000, 0x4024), (0xfee0_0000, 0x4024)]);
}

#[test]
fn pic_output_is_taken_by_the_boot_cpu_backend() {
    let (chip, rec) = split_chip();
    let mut pic = chip.pic_device();
    // init_8259A with vectors 0x20.., then only IRQ 4 unmasked.
    for (port, v) in [
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 4),
        (0x21, 1),
        (0xa0, 0x11),
        (0xa1, 0x28),
        (0xa1, 2),
        (0xa1, 1),
        (0x21, 0xef),
        (0xa1, 0xff),
    ] {
        pic.write(port, 0, &[v]);
    }
    assert!(!chip.extint_pending());
    assert_eq!(chip.extint_ack(), None);
    chip.set_irq(4, true).unwrap();
    chip.set_irq(4, false).unwrap();
    assert!(chip.extint_pending());
    assert_eq!(*rec.extints.lock().unwrap(), 1, "one nudge per request");
    chip.set_irq(4, true).unwrap();
    assert_eq!(*rec.extints.lock().unwrap(), 1);
    assert_eq!(chip.extint_ack(), Some(0x24));
    assert!(!chip.extint_pending(), "IRQ 4 in service");
    // Non-specific EOI; the next edge raises INTR and nudges again.
    pic.write(0x20, 0, &[0x20]);
    chip.set_irq(4, false).unwrap();
    chip.set_irq(4, true).unwrap();
    assert_eq!(*rec.extints.lock().unwrap(), 2);
    assert_eq!(chip.extint_ack(), Some(0x24));
    assert!(
        rec.msis.lock().unwrap().is_empty(),
        "IOAPIC pin 4 is masked"
    );
}

/// On KVM the local APICs are the kernel's: IOAPIC pin 2 (IRQ 0) gets a route marked level so
/// that KVM exits on the EOI of its vector, while the message sent stays edge; that EOI, and
/// the PIC's EOI of IRQ 0, reach the PIT's acknowledge notifier.
#[test]
fn irq0_acknowledgements_reach_the_notifier_on_a_split_irqchip() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let (chip, rec) = split_chip();
    let acks = Arc::new(AtomicU32::new(0));
    let a = acks.clone();
    chip.set_ack_notifier(
        0,
        Arc::new(move || {
            a.fetch_add(1, Ordering::SeqCst);
        }),
    )
    .unwrap();
    ioapic_write(&chip, 0x10 + 2 * 2 + 1, 0);
    ioapic_write(&chip, 0x10 + 2 * 2, 0x30);
    ioapic_write(&chip, 0x10 + 2 * 4, 0x34);
    let routes = rec.routes.lock().unwrap().last().cloned().unwrap();
    assert_eq!(routes[2].1, 0xc030, "pin 2's route asks for EOI exits");
    assert_eq!(routes[4].1 & (1 << 15), 0, "other edge pins do not");
    chip.irq_line(0).unwrap().trigger().unwrap();
    assert_eq!(
        rec.msis.lock().unwrap().last().copied(),
        Some((0xfee0_0000, 0x4030)),
        "the message itself is edge"
    );
    chip.eoi(0x34);
    assert_eq!(acks.load(Ordering::SeqCst), 0, "another pin's vector");
    chip.eoi(0x30);
    assert_eq!(acks.load(Ordering::SeqCst), 1);
    // Through the PIC: ExtINT to the boot CPU, then the guest's EOI to port 0x20.
    let mut pic = chip.pic_device();
    for (port, v) in [
        (0x20u64, 0x11u8),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, 0xfe),
    ] {
        pic.write(port & !1, port & 1, &[v]);
    }
    chip.irq_line(0).unwrap().trigger().unwrap();
    assert_eq!(chip.extint_ack(), Some(0x30));
    assert_eq!(
        acks.load(Ordering::SeqCst),
        1,
        "taken, not yet acknowledged"
    );
    pic.write(0x20, 0, &[0x20]);
    assert_eq!(acks.load(Ordering::SeqCst), 2);
    assert!(chip.set_ack_notifier(24, Arc::new(|| {})).is_err());
}
