//! The cascaded 8259A pair of a PC: master at 0x20/0x21, slave at 0xa0/0xa1 on master IRQ 2,
//! and the edge/level control registers at 0x4d0/0x4d1.
//!
//! ICW1-4, OCW1-3 (IMR, EOI variants, priority rotation, read IRR/ISR, poll, special mask
//! mode), auto-EOI, special fully nested mode, and spurious IRQ 7/15 when the request goes
//! away before the CPU acknowledges it. Pure state machine; the INTR output is
//! [`Pic::intr`], the acknowledge cycle [`Pic::ack`].

/// Master command port.
pub const PIC_MASTER_PORT: u16 = 0x20;
/// Slave command port.
pub const PIC_SLAVE_PORT: u16 = 0xa0;
/// Edge/level control register of the master; the slave's follows.
pub const PIC_ELCR_PORT: u16 = 0x4d0;

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Chip {
    /// Line levels, for edge detection.
    last_irr: u8,
    irr: u8,
    imr: u8,
    isr: u8,
    priority_add: u8,
    irq_base: u8,
    read_isr: bool,
    poll: bool,
    special_mask: bool,
    init_state: u8,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    init4: bool,
    single: bool,
    elcr: u8,
    elcr_mask: u8,
    master: bool,
    /// IRQs whose service ended (EOI, or auto-EOI at the acknowledge) since the last
    /// [`Pic::take_acked`]; read after every access, so never part of a snapshot.
    #[serde(skip)]
    acked: u8,
}

impl Chip {
    fn new(master: bool) -> Self {
        Self {
            elcr_mask: if master { 0xf8 } else { 0xde },
            master,
            ..Default::default()
        }
    }

    fn init_reset(&mut self) {
        self.last_irr = 0;
        self.irr &= self.elcr;
        self.imr = 0;
        self.isr = 0;
        self.priority_add = 0;
        self.irq_base = 0;
        self.read_isr = false;
        self.poll = false;
        self.special_mask = false;
        self.init_state = 0;
        self.auto_eoi = false;
        self.rotate_on_auto_eoi = false;
        self.special_fully_nested = false;
        self.init4 = false;
        self.single = false;
    }

    fn set_irq(&mut self, irq: u8, level: bool) {
        let mask = 1u8 << irq;
        if self.elcr & mask != 0 {
            if level {
                self.irr |= mask;
                self.last_irr |= mask;
            } else {
                self.irr &= !mask;
                self.last_irr &= !mask;
            }
        } else if level {
            if self.last_irr & mask == 0 {
                self.irr |= mask;
            }
            self.last_irr |= mask;
        } else {
            self.last_irr &= !mask;
        }
    }

    /// Priority (0 = highest) of the highest-priority bit in `mask`, 8 if none.
    fn priority(&self, mask: u8) -> u8 {
        if mask == 0 {
            return 8;
        }
        let mut p = 0;
        while mask & (1 << ((p + self.priority_add) & 7)) == 0 {
            p += 1;
        }
        p
    }

    /// The IRQ this chip asks the CPU (or the master) to service, if any.
    fn get_irq(&self) -> Option<u8> {
        let p = self.priority(self.irr & !self.imr);
        if p == 8 {
            return None;
        }
        let mut mask = self.isr;
        if self.special_mask {
            mask &= !self.imr;
        }
        if self.special_fully_nested && self.master {
            mask &= !(1 << 2);
        }
        (p < self.priority(mask)).then_some((p + self.priority_add) & 7)
    }

    fn intack(&mut self, irq: u8) {
        if self.auto_eoi {
            self.acked |= 1 << irq;
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= 1 << irq;
        }
        if self.elcr & (1 << irq) == 0 {
            self.irr &= !(1 << irq);
        }
    }

    fn write_cmd(&mut self, v: u8) {
        if v & 0x10 != 0 {
            // ICW1
            self.init_reset();
            self.init_state = 1;
            self.init4 = v & 1 != 0;
            self.single = v & 2 != 0;
        } else if v & 0x08 != 0 {
            // OCW3
            if v & 0x04 != 0 {
                self.poll = true;
            }
            if v & 0x02 != 0 {
                self.read_isr = v & 1 != 0;
            }
            if v & 0x40 != 0 {
                self.special_mask = v & 0x20 != 0;
            }
        } else {
            // OCW2
            let isr = self.isr;
            match v >> 5 {
                0 | 4 => self.rotate_on_auto_eoi = v >> 7 != 0,
                c @ (1 | 5) => {
                    let p = self.priority(self.isr);
                    if p != 8 {
                        let irq = (p + self.priority_add) & 7;
                        self.isr &= !(1 << irq);
                        if c == 5 {
                            self.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                3 => self.isr &= !(1 << (v & 7)),
                6 => self.priority_add = (v + 1) & 7,
                7 => {
                    let irq = v & 7;
                    self.isr &= !(1 << irq);
                    self.priority_add = (irq + 1) & 7;
                }
                _ => {}
            }
            self.acked |= isr & !self.isr;
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.init_state {
            0 => self.imr = v,
            1 => {
                self.irq_base = v & 0xf8;
                self.init_state = match (self.single, self.init4) {
                    (false, _) => 2,
                    (true, true) => 3,
                    (true, false) => 0,
                };
            }
            2 => self.init_state = if self.init4 { 3 } else { 0 },
            _ => {
                self.special_fully_nested = v & 0x10 != 0;
                self.auto_eoi = v & 0x02 != 0;
                self.init_state = 0;
            }
        }
    }
}

/// The master/slave 8259A pair.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Pic {
    chips: [Chip; 2],
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// Both chips in their power-on state (uninitialized, nothing masked, no requests).
    pub fn new() -> Self {
        Self {
            chips: [Chip::new(true), Chip::new(false)],
        }
    }

    /// Propagate the slave's output to master IRQ 2.
    fn update(&mut self) {
        let slave_out = self.chips[1].get_irq().is_some();
        self.chips[0].set_irq(2, slave_out);
    }

    /// Drive ISA IRQ `irq` (0-15; 2 is the cascade and ignored).
    pub fn set_irq(&mut self, irq: u32, level: bool) {
        match irq {
            0 | 1 | 3..=7 => self.chips[0].set_irq(irq as u8, level),
            8..=15 => self.chips[1].set_irq((irq - 8) as u8, level),
            _ => return,
        }
        self.update();
    }

    /// ISA IRQs (bit n = IRQ n; never the cascade) whose service ended since the last call:
    /// an EOI cleared their in-service bit, or the CPU took them in auto-EOI mode.
    pub fn take_acked(&mut self) -> u16 {
        let m = std::mem::take(&mut self.chips[0].acked) & !(1 << 2);
        let s = std::mem::take(&mut self.chips[1].acked);
        u16::from(m) | (u16::from(s) << 8)
    }

    /// The master's INTR output: an interrupt waits for the CPU.
    pub fn intr(&self) -> bool {
        self.chips[0].get_irq().is_some()
    }

    /// The vector [`Pic::ack`] would return now, without acknowledging.
    pub fn peek_vector(&self) -> Option<u8> {
        let m = &self.chips[0];
        let irq = m.get_irq()?;
        if irq == 2 {
            let s = &self.chips[1];
            return Some(s.irq_base | s.get_irq().unwrap_or(7));
        }
        Some(m.irq_base | irq)
    }

    /// The CPU's interrupt acknowledge cycle: the vector to run. When the request vanished
    /// (a level line dropped), this is the spurious IRQ 7 (or IRQ 15 from the slave) vector
    /// with no ISR bit set, as Linux's spurious-IRQ handling expects.
    pub fn ack(&mut self) -> u8 {
        let vector;
        match self.chips[0].get_irq() {
            Some(2) => {
                let s = &mut self.chips[1];
                let irq2 = match s.get_irq() {
                    Some(i) => {
                        s.intack(i);
                        i
                    }
                    None => 7,
                };
                vector = s.irq_base | irq2;
                self.chips[0].intack(2);
            }
            Some(irq) => {
                vector = self.chips[0].irq_base | irq;
                self.chips[0].intack(irq);
            }
            None => vector = self.chips[0].irq_base | 7,
        }
        self.update();
        vector
    }

    /// Acknowledge the IRQ whose vector is `vector` if it is requested and unmasked (an
    /// acknowledge cycle that happened before a higher-priority request arrived). False
    /// when no such request exists (the caller's vector was stale).
    pub fn ack_vector(&mut self, vector: u8) -> bool {
        let irq = vector & 7;
        let requested = |c: &Chip| c.irr & !c.imr & (1 << irq) != 0;
        let done = if vector & 0xf8 == self.chips[0].irq_base && irq != 2 {
            if requested(&self.chips[0]) {
                self.chips[0].intack(irq);
                true
            } else {
                false
            }
        } else if vector & 0xf8 == self.chips[1].irq_base && requested(&self.chips[1]) {
            self.chips[1].intack(irq);
            self.chips[0].intack(2);
            true
        } else {
            false
        };
        self.update();
        done
    }

    /// A byte read from `port` (0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1).
    pub fn read_port(&mut self, port: u16) -> u8 {
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 => {
                let idx = usize::from(port >= 0xa0);
                let c = &mut self.chips[idx];
                if c.poll {
                    c.poll = false;
                    let r = match c.get_irq() {
                        Some(i) => {
                            c.intack(i);
                            0x80 | i
                        }
                        None => 0,
                    };
                    self.update();
                    return r;
                }
                if port & 1 == 0 {
                    if c.read_isr {
                        c.isr
                    } else {
                        c.irr
                    }
                } else {
                    c.imr
                }
            }
            0x4d0 | 0x4d1 => self.chips[usize::from(port - 0x4d0)].elcr,
            _ => 0xff,
        }
    }

    /// A byte written to `port`.
    pub fn write_port(&mut self, port: u16, v: u8) {
        match port {
            0x20 | 0x21 | 0xa0 | 0xa1 => {
                let c = &mut self.chips[usize::from(port >= 0xa0)];
                if port & 1 == 0 {
                    c.write_cmd(v);
                } else {
                    c.write_data(v);
                }
            }
            0x4d0 | 0x4d1 => {
                let c = &mut self.chips[usize::from(port - 0x4d0)];
                c.elcr = v & c.elcr_mask;
            }
            _ => return,
        }
        self.update();
    }

    /// IMR of the master (low byte) and slave (high byte).
    pub fn imr(&self) -> u16 {
        u16::from(self.chips[0].imr) | (u16::from(self.chips[1].imr) << 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// arch/x86/kernel/i8259.c init_8259A().
    fn linux_init(p: &mut Pic, auto_eoi: bool) {
        p.write_port(0x21, 0xff);
        p.write_port(0xa1, 0xff);
        p.write_port(0x20, 0x11);
        p.write_port(0x21, 0x30);
        p.write_port(0x21, 1 << 2);
        p.write_port(0x21, if auto_eoi { 0x03 } else { 0x01 });
        p.write_port(0xa0, 0x11);
        p.write_port(0xa1, 0x38);
        p.write_port(0xa1, 2);
        p.write_port(0xa1, 0x01);
        p.write_port(0x21, 0xfb); // cached masks: everything but the cascade
        p.write_port(0xa1, 0xff);
    }

    #[test]
    fn linux_init_then_timer_and_slave_irqs() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        assert_eq!(p.imr(), 0xfffb);
        p.set_irq(0, true);
        p.set_irq(0, false);
        assert!(!p.intr(), "masked");
        p.write_port(0x21, 0xfa);
        assert!(p.intr(), "edge latched in IRR while masked");
        assert_eq!(p.peek_vector(), Some(0x30));
        assert_eq!(p.ack(), 0x30);
        assert!(!p.intr());
        // Linux's mask_and_ack_8259A: mask, specific EOI.
        p.write_port(0x21, 0xfb);
        p.write_port(0x20, 0x60);
        p.write_port(0x21, 0xfa);
        // Slave IRQ 12 (mouse): slave specific EOI, then master specific EOI for IRQ 2.
        p.write_port(0xa1, 0xef);
        p.set_irq(12, true);
        assert_eq!(p.ack(), 0x3c);
        p.write_port(0x0a0, 0x0b);
        assert_eq!(p.read_port(0xa0), 1 << 4, "slave ISR");
        p.write_port(0x20, 0x0b);
        assert_eq!(p.read_port(0x20), 1 << 2, "master ISR: cascade");
        p.write_port(0xa0, 0x60 + 4);
        p.write_port(0x20, 0x60 + 2);
        p.write_port(0x20, 0x0a);
        assert_eq!(p.read_port(0x20) & 0x04, 0);
        p.write_port(0xa0, 0x0b);
        assert_eq!(p.read_port(0xa0), 0);
    }

    #[test]
    fn priority_nesting_and_nonspecific_eoi() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        p.write_port(0x21, 0x00);
        p.set_irq(4, true);
        assert_eq!(p.ack(), 0x34);
        p.set_irq(6, true);
        assert!(!p.intr(), "IRQ 6 waits behind in-service IRQ 4");
        p.set_irq(1, true);
        assert_eq!(p.ack(), 0x31, "higher priority nests");
        p.write_port(0x20, 0x20); // EOI clears IRQ 1
        p.write_port(0x20, 0x20); // EOI clears IRQ 4
        assert_eq!(p.ack(), 0x36);
    }

    #[test]
    fn spurious_irq7_and_irq15() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        p.write_port(0x21, 0x00);
        p.write_port(0xa1, 0x00);
        p.write_port(0x4d0, 0x20); // IRQ 5 level-triggered
        p.write_port(0x4d1, 0x08); // IRQ 11 level-triggered
        assert_eq!(p.read_port(0x4d0), 0x20);
        p.set_irq(5, true);
        assert!(p.intr());
        p.set_irq(5, false);
        assert_eq!(p.ack(), 0x37, "request vanished: spurious IRQ 7");
        p.write_port(0x20, 0x0b);
        assert_eq!(p.read_port(0x20), 0, "no ISR bit for a spurious IRQ");
        // Slave: level IRQ 11 drops between the cascade request and INTA.
        p.set_irq(11, true);
        assert!(p.intr());
        p.chips[1].set_irq(3, false); // drop at the slave without updating the master
        assert_eq!(p.ack(), 0x3f, "spurious IRQ 15");
        p.write_port(0xa0, 0x0b);
        assert_eq!(p.read_port(0xa0), 0);
        // Level interrupts stay requested while the line is high, and re-assert after EOI.
        p.write_port(0x20, 0x20);
        p.set_irq(5, true);
        assert_eq!(p.ack(), 0x35);
        p.write_port(0x20, 0x65);
        assert_eq!(p.ack(), 0x35);
    }

    #[test]
    fn auto_eoi_poll_special_mask_and_rotation() {
        let mut p = Pic::new();
        linux_init(&mut p, true);
        p.write_port(0x21, 0x00);
        p.set_irq(3, true);
        assert_eq!(p.ack(), 0x33);
        p.write_port(0x20, 0x0b);
        assert_eq!(p.read_port(0x20), 0, "auto-EOI sets no ISR bit");
        // Poll mode.
        let mut p = Pic::new();
        linux_init(&mut p, false);
        p.write_port(0x21, 0x00);
        p.set_irq(6, true);
        p.write_port(0x20, 0x0c);
        assert_eq!(p.read_port(0x20), 0x86);
        p.write_port(0x20, 0x0c);
        assert_eq!(p.read_port(0x20), 0);
        // Special mask mode: masking the in-service IRQ 6 lets lower IRQ 7 through.
        p.set_irq(7, true);
        assert!(!p.intr());
        p.write_port(0x21, 0x40);
        p.write_port(0x20, 0x68);
        assert!(p.intr());
        assert_eq!(p.ack(), 0x37);
        p.write_port(0x20, 0x48);
        // Rotate on non-specific EOI makes the serviced IRQ lowest priority.
        let mut p = Pic::new();
        linux_init(&mut p, false);
        p.write_port(0x21, 0x00);
        p.set_irq(1, true);
        assert_eq!(p.ack(), 0x31);
        p.write_port(0x20, 0xa0);
        p.set_irq(1, false);
        p.set_irq(1, true);
        p.set_irq(5, true);
        assert_eq!(p.ack(), 0x35);
    }

    #[test]
    fn ack_of_a_specific_vector() {
        let mut p = Pic::new();
        linux_init(&mut p, false);
        p.write_port(0x21, 0x00);
        p.write_port(0xa1, 0x00);
        p.set_irq(5, true);
        assert_eq!(p.peek_vector(), Some(0x35));
        p.set_irq(1, true); // arrives after the CPU saw 0x35
        assert!(p.ack_vector(0x35));
        p.write_port(0x20, 0x0b);
        assert_eq!(p.read_port(0x20), 1 << 5);
        assert_eq!(p.ack(), 0x31, "IRQ 1 still requested and nests");
        assert!(!p.ack_vector(0x36));
        p.set_irq(9, true);
        p.write_port(0x20, 0x20);
        p.write_port(0x20, 0x20);
        assert!(p.ack_vector(0x39));
        p.write_port(0xa0, 0x0b);
        assert_eq!(p.read_port(0xa0), 1 << 1);
    }

    #[test]
    fn hostile_port_writes() {
        let mut p = Pic::new();
        for v in 0..=255u8 {
            for port in [0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x99] {
                p.write_port(port, v);
                let _ = p.read_port(port);
            }
            p.set_irq(u32::from(v), v & 1 == 1);
            let _ = p.ack();
        }
    }
}
