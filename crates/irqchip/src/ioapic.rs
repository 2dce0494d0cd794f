//! 82093AA-style IOAPIC with 24 pins: redirection table, edge and level triggering,
//! remote IRR and the version 0x20 EOI register.
//!
//! A pure state machine: inputs are pin levels, register accesses and EOIs; outputs are the
//! [`IrqMessage`]s to deliver to local APICs.

use crate::lapic::{DeliveryMode, IrqMessage, Shorthand};

/// Number of IOAPIC pins (GSIs 0-23).
pub const IOAPIC_PINS: usize = 24;
/// Size of the IOAPIC's MMIO window at `layout::IOAPIC_START`.
pub const IOAPIC_MMIO_SIZE: u64 = 0x1000;

const VERSION: u32 = 0x20 | ((IOAPIC_PINS as u32 - 1) << 16);
const RTE_MASKED: u64 = 1 << 16;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_DELIVERY_STATUS: u64 = 1 << 12;
/// Bits the guest can write: vector, delivery mode, destination mode, polarity, trigger,
/// mask, destination (incl. the extended destination ID byte).
const RTE_WRITABLE: u64 = 0xffff_0000_0001_afff;

/// The IOAPIC registers and pin state.
#[derive(Debug, Clone)]
pub struct IoApic {
    id: u32,
    regsel: u8,
    redir: [u64; IOAPIC_PINS],
    /// Pins whose interrupt is pending delivery (edge seen, or level asserted).
    irr: u32,
    /// Current input levels.
    level: u32,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new()
    }
}

impl IoApic {
    /// An IOAPIC in its reset state: every pin masked.
    pub fn new() -> Self {
        Self {
            id: 0,
            regsel: 0,
            redir: [RTE_MASKED; IOAPIC_PINS],
            irr: 0,
            level: 0,
        }
    }

    /// The redirection entry of `pin`.
    pub fn entry(&self, pin: usize) -> Option<u64> {
        self.redir.get(pin).copied()
    }

    /// The message pin `pin` sends when it fires, as its redirection entry says now.
    pub fn pin_message(&self, pin: usize) -> Option<IrqMessage> {
        self.entry(pin).map(Self::message)
    }

    fn message(entry: u64) -> IrqMessage {
        IrqMessage {
            vector: (entry & 0xff) as u8,
            delivery: DeliveryMode::from_bits(entry as u32),
            logical: entry & (1 << 11) != 0,
            dest: ((entry >> 56) & 0xff) as u32,
            x2apic_dest: false,
            shorthand: Shorthand::None,
            level_triggered: entry & RTE_LEVEL != 0,
            assert: true,
        }
    }

    /// Deliver `pin` if it is pending and deliverable.
    fn service(&mut self, pin: usize, out: &mut Vec<IrqMessage>) {
        let bit = 1u32 << pin;
        let e = self.redir[pin];
        if self.irr & bit == 0 || e & RTE_MASKED != 0 {
            return;
        }
        if e & RTE_LEVEL != 0 {
            if e & RTE_REMOTE_IRR != 0 {
                return;
            }
            self.redir[pin] |= RTE_REMOTE_IRR;
        } else {
            self.irr &= !bit;
        }
        out.push(Self::message(e));
    }

    /// Drive input `pin` (logical assertion; polarity is not applied). Pins out of range
    /// are ignored.
    pub fn set_irq(&mut self, pin: usize, level: bool, out: &mut Vec<IrqMessage>) {
        if pin >= IOAPIC_PINS {
            return;
        }
        let bit = 1u32 << pin;
        let old = self.level & bit != 0;
        if level {
            self.level |= bit;
        } else {
            self.level &= !bit;
        }
        if self.redir[pin] & RTE_LEVEL != 0 {
            if level {
                self.irr |= bit;
                self.service(pin, out);
            } else {
                self.irr &= !bit;
            }
        } else if level && !old {
            self.irr |= bit;
            self.service(pin, out);
        }
    }

    /// A local APIC EOI of level-triggered `vector`: clear remote IRR of the pins using it
    /// and re-deliver those whose line is still asserted.
    pub fn eoi(&mut self, vector: u8, out: &mut Vec<IrqMessage>) {
        for pin in 0..IOAPIC_PINS {
            let e = self.redir[pin];
            if (e & 0xff) as u8 != vector || e & RTE_REMOTE_IRR == 0 {
                continue;
            }
            self.redir[pin] &= !RTE_REMOTE_IRR;
            if self.level & (1 << pin) != 0 && e & RTE_LEVEL != 0 {
                self.irr |= 1 << pin;
                self.service(pin, out);
            }
        }
    }

    fn read_register(&self) -> u32 {
        match self.regsel {
            0x00 => self.id << 24,
            0x01 => VERSION,
            0x02 => self.id << 24,
            r @ 0x10..=0x3f => {
                let pin = usize::from((r - 0x10) / 2);
                let mut e = self.redir[pin];
                e &= !RTE_DELIVERY_STATUS;
                if r & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0xffff_ffff,
        }
    }

    fn write_register(&mut self, value: u32, out: &mut Vec<IrqMessage>) {
        match self.regsel {
            0x00 => self.id = (value >> 24) & 0xf,
            r @ 0x10..=0x3f => {
                let pin = usize::from((r - 0x10) / 2);
                let old = self.redir[pin];
                let new = if r & 1 == 0 {
                    (old & 0xffff_ffff_0000_0000) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                let mut e = (new & RTE_WRITABLE) | (old & RTE_REMOTE_IRR);
                if e & RTE_LEVEL == 0 {
                    // Switching to edge clears remote IRR (Linux's EOI for old IOAPICs).
                    e &= !RTE_REMOTE_IRR;
                }
                self.redir[pin] = e;
                if e & RTE_LEVEL != 0 && self.level & (1 << pin) != 0 {
                    self.irr |= 1 << pin;
                }
                self.service(pin, out);
            }
            _ => {}
        }
    }

    /// A guest read at `offset` in the MMIO window: IOREGSEL (0x00), IOWIN (0x10).
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let v = match offset {
            0x00 => u32::from(self.regsel),
            0x10 => self.read_register(),
            _ => return,
        };
        let n = data.len().min(4);
        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
    }

    /// A guest write at `offset`: IOREGSEL (0x00), IOWIN (0x10), EOI (0x40).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], out: &mut Vec<IrqMessage>) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            0x00 => self.regsel = v as u8,
            0x10 if data.len() == 4 => self.write_register(v, out),
            0x40 => self.eoi(v as u8, out),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wr(io: &mut IoApic, reg: u8, v: u32, out: &mut Vec<IrqMessage>) {
        io.mmio_write(0, &[reg], out);
        io.mmio_write(0x10, &v.to_le_bytes(), out);
    }

    fn rd(io: &mut IoApic, reg: u8) -> u32 {
        let mut out = Vec::new();
        io.mmio_write(0, &[reg], &mut out);
        let mut d = [0u8; 4];
        io.mmio_read(0x10, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn version_and_id() {
        let mut io = IoApic::new();
        assert_eq!(rd(&mut io, 1), 0x0017_0020);
        let mut out = Vec::new();
        wr(&mut io, 0, 0x0200_0000, &mut out);
        assert_eq!(rd(&mut io, 0), 0x0200_0000);
        assert_eq!(rd(&mut io, 0x10), 0x0001_0000, "masked at reset");
        assert_eq!(rd(&mut io, 0x50), 0xffff_ffff);
    }

    #[test]
    fn edge_pin_delivers_on_rising_edge_and_holds_while_masked() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        // Linux: pin 4 (COM1) edge, vector 0x24, physical dest 1, masked first.
        wr(&mut io, 0x19, 0x0100_0000, &mut out);
        wr(&mut io, 0x18, 0x0001_0024, &mut out);
        io.set_irq(4, true, &mut out);
        io.set_irq(4, false, &mut out);
        assert!(out.is_empty(), "masked");
        wr(&mut io, 0x18, 0x0000_0024, &mut out);
        assert_eq!(
            out,
            vec![IrqMessage::fixed(0x24, 1)],
            "held edge delivered on unmask"
        );
        out.clear();
        io.set_irq(4, true, &mut out);
        io.set_irq(4, true, &mut out);
        assert_eq!(out.len(), 1, "no edge while high");
    }

    #[test]
    fn level_pin_remote_irr_and_eoi() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        wr(&mut io, 0x10 + 2 * 10, 0x0000_a041, &mut out); // level, active low, vector 0x41
        io.set_irq(10, true, &mut out);
        assert_eq!(out.len(), 1);
        assert!(out[0].level_triggered);
        assert_ne!(rd(&mut io, 0x24) & (1 << 14), 0, "remote IRR");
        io.set_irq(10, true, &mut out);
        assert_eq!(out.len(), 1, "no re-delivery before EOI");
        // EOI while still asserted re-delivers.
        io.eoi(0x41, &mut out);
        assert_eq!(out.len(), 2);
        // Device deasserts, then EOI: nothing more.
        io.set_irq(10, false, &mut out);
        io.eoi(0x41, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(rd(&mut io, 0x24) & (1 << 14), 0);
        // EOI through the version 0x20 EOI register.
        io.set_irq(10, true, &mut out);
        assert_eq!(out.len(), 3);
        io.set_irq(10, false, &mut out);
        io.mmio_write(0x40, &[0x41, 0, 0, 0], &mut out);
        assert_eq!(rd(&mut io, 0x24) & (1 << 14), 0);
        // Old-style EOI: flip to edge and back clears remote IRR.
        io.set_irq(10, true, &mut out);
        wr(&mut io, 0x24, 0x0000_2041, &mut out);
        assert_eq!(rd(&mut io, 0x24) & (1 << 14), 0);
    }

    #[test]
    fn hostile_accesses() {
        let mut io = IoApic::new();
        let mut out = Vec::new();
        for r in 0..=255u8 {
            wr(&mut io, r, 0xffff_ffff, &mut out);
            let _ = rd(&mut io, r);
        }
        io.set_irq(99, true, &mut out);
        io.mmio_write(0x10, &[1, 2, 3, 4, 5, 6, 7, 8], &mut out);
        let mut d = [0u8; 8];
        io.mmio_read(0x10, &mut d);
        io.mmio_read(0xfff, &mut d[..1]);
    }
}
