//! The i8042 PS/2 controller with a keyboard that types one thing: Ctrl+Alt+Del.
//!
//! What guests use of it: command 0xfe on the command port pulses the CPU reset line (Linux's
//! `reboot=k`), and the keyboard behind it delivers the Ctrl+Alt+Del sequence with IRQ 1 when
//! the VMM asks ([`I8042::send_ctrl_alt_del`], the API's `SendCtrlAltDel`), as Firecracker's
//! does: Linux's atkbd turns it into `ctrl_alt_del()`, which restarts the kernel or signals
//! init. The controller runs untranslated (its control register has no XLATE bit, so Linux
//! reads scan code set 2 directly) and has no auxiliary (mouse) port.
//!
//! Linux finds the controller only when told it exists: kvmbox's ACPI tables do not list it
//! (a probe would cost every boot), so the guest needs `i8042.nopnp` on its command line, the
//! same flag Firecracker's documented boot arguments carry.
//!
//! Keyboard commands get an ACK (0xfa), as from a keyboard that accepts everything; GET ID
//! (0xf2) answers an MF2 keyboard's ID and RESET (0xff) passes its self-test, so Linux's
//! probe finds a keyboard without timing out (`i8042.dumbkbd` skips the probe).

pub mod persist;

use crate::{BusDevice, ExitRequest, VmControl};
use kvmbox_cpu::IrqLine;
use std::collections::VecDeque;
use std::sync::Arc;

/// Status register: output buffer full (a byte waits on the data port).
const STS_OBF: u8 = 0x01;
/// Status register: system flag (the controller passed its self-test).
const STS_SYS: u8 = 0x04;
/// Status register: the last write went to the command port.
const STS_CMD: u8 = 0x08;
/// Status register: keyboard not inhibited.
const STS_UNLOCKED: u8 = 0x10;

/// Control register: keyboard interrupt (IRQ 1) enabled.
const CTR_KBD_INT: u8 = 0x01;
/// Control register: system flag.
const CTR_SYS: u8 = 0x04;
/// Control register: keyboard clock disabled.
const CTR_KBD_DISABLE: u8 = 0x10;
/// Control register at power-on: interrupts on, self-test passed, no translation.
const CTR_RESET: u8 = CTR_KBD_INT | CTR_SYS;

/// Controller commands (written to the command port).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

/// Keyboard commands and answers (through the data port).
const KBD_ACK: u8 = 0xfa;
const KBD_ECHO: u8 = 0xee;
const KBD_GET_ID: u8 = 0xf2;
const KBD_RESET: u8 = 0xff;
const KBD_SELF_TEST_OK: u8 = 0xaa;
/// An MF2 keyboard's ID.
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Ctrl, Alt, Del pressed, then released, in scan code set 2 (0xf0 prefixes a release, 0xe0
/// an extended key). Firecracker sends the presses only; the releases leave no key held
/// after a guest that handles the sequence without restarting.
pub const CTRL_ALT_DEL: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, // Ctrl, Alt, Del down
    0xe0, 0xf0, 0x71, // Del up
    0xf0, 0x11, // Alt up
    0xf0, 0x14, // Ctrl up
];

/// Bytes the controller holds for the guest; anything beyond is dropped, as a real keyboard's
/// buffer overflows.
pub const BUFFER_LEN: usize = 16;

/// Pulses the CPU reset line or raises IRQ 1.
pub struct I8042 {
    control: Arc<VmControl>,
    irq: Option<Arc<dyn IrqLine>>,
    data_port: u16,
    status: u8,
    ctr: u8,
    outp: u8,
    /// The command whose parameter byte the next data-port write is.
    pending: Option<u8>,
    buffer: VecDeque<u8>,
}

/// Why a key sequence could not be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The guest has not read what the keyboard sent before.
    #[error("the i8042 buffer holds {0} unread bytes; the guest is not reading its keyboard")]
    BufferFull(usize),
    /// The guest disabled the keyboard (or its interrupt) in the controller.
    #[error("the guest has disabled the i8042 keyboard")]
    Disabled,
    /// Raising IRQ 1 failed on the host.
    #[error("raising IRQ 1: {0}")]
    Irq(String),
}

impl I8042 {
    /// A controller whose data port is `data_port` (the command port is data + 4), whose reset
    /// pulse goes to `control` and whose keyboard interrupts `irq` (IRQ 1).
    pub fn new(control: Arc<VmControl>, data_port: u16, irq: Option<Arc<dyn IrqLine>>) -> Self {
        Self {
            control,
            irq,
            data_port,
            status: STS_SYS | STS_UNLOCKED,
            ctr: CTR_RESET,
            outp: 0,
            pending: None,
            buffer: VecDeque::with_capacity(BUFFER_LEN),
        }
    }

    /// Press and release Ctrl+Alt+Del.
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), KeyError> {
        if self.ctr & CTR_KBD_DISABLE != 0 {
            return Err(KeyError::Disabled);
        }
        if BUFFER_LEN - self.buffer.len() < CTRL_ALT_DEL.len() {
            return Err(KeyError::BufferFull(self.buffer.len()));
        }
        for b in CTRL_ALT_DEL {
            self.push(b);
        }
        self.interrupt().map_err(|e| KeyError::Irq(e.to_string()))
    }

    /// Bytes waiting for the guest.
    pub fn pending_bytes(&self) -> usize {
        self.buffer.len()
    }

    /// Queue a byte for the data port (dropped when the buffer is full).
    fn push(&mut self, b: u8) {
        if self.buffer.len() < BUFFER_LEN {
            self.buffer.push_back(b);
        }
        self.status |= STS_OBF;
    }

    /// A controller answer replaces whatever the guest had not read, so it is the next byte.
    fn answer(&mut self, bytes: &[u8]) {
        self.buffer.clear();
        for &b in bytes {
            self.push(b);
        }
    }

    /// IRQ 1, when a byte waits and the guest enabled the keyboard interrupt (an edge: the
    /// guest reads one byte per interrupt, and each read with more waiting raises another).
    fn interrupt(&self) -> std::io::Result<()> {
        match &self.irq {
            Some(irq) if self.status & STS_OBF != 0 && self.ctr & CTR_KBD_INT != 0 => irq.trigger(),
            _ => Ok(()),
        }
    }

    fn read_data(&mut self) -> u8 {
        let b = self.buffer.pop_front().unwrap_or(0);
        if self.buffer.is_empty() {
            self.status &= !STS_OBF;
        }
        // A failed interrupt cannot be reported to the guest; it reads on at its next one.
        let _ = self.interrupt();
        b
    }

    fn write_command(&mut self, cmd: u8) {
        self.status |= STS_CMD;
        self.pending = None;
        match cmd {
            CMD_READ_CTR => self.answer(&[self.ctr]),
            CMD_READ_OUTP => self.answer(&[self.outp]),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUT | CMD_WRITE_AUX_OUT
            | CMD_WRITE_AUX => self.pending = Some(cmd),
            CMD_SELF_TEST => self.answer(&[0x55]),
            CMD_KBD_TEST => self.answer(&[0x00]),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLE,
            CMD_RESET_CPU => self.control.request(ExitRequest::Reset),
            // Mouse-port commands and the output-line pulses other than reset (0xff is
            // Linux's "null command"): nothing to do for a controller without a mouse.
            _ => {}
        }
    }

    fn write_data(&mut self, b: u8) {
        self.status &= !STS_CMD;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = b,
            Some(CMD_WRITE_OUTP) => self.outp = b,
            // The byte comes back as if the keyboard had sent it.
            Some(CMD_WRITE_KBD_OUT) => {
                self.answer(&[b]);
                let _ = self.interrupt();
            }
            // For the mouse port, which this controller does not have.
            Some(_) => {}
            None => {
                match b {
                    KBD_GET_ID => self.answer(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
                    KBD_RESET => self.answer(&[KBD_ACK, KBD_SELF_TEST_OK]),
                    KBD_ECHO => self.answer(&[KBD_ECHO]),
                    _ => self.answer(&[KBD_ACK]),
                }
                let _ = self.interrupt();
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let port = base.checked_add(offset);
        let Some(b) = data.first_mut() else { return };
        if port == Some(u64::from(self.data_port)) {
            *b = self.read_data();
        } else if port == Some(u64::from(self.data_port) + 4) {
            *b = self.status;
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let port = base.checked_add(offset);
        let Some(&b) = data.first() else { return };
        if port == Some(u64::from(self.data_port)) {
            self.write_data(b);
        } else if port == Some(u64::from(self.data_port) + 4) {
            self.write_command(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_util::CountingIrq;
    use std::sync::atomic::Ordering;

    fn device() -> (I8042, Arc<VmControl>, Arc<CountingIrq>) {
        let c = Arc::new(VmControl::new().unwrap());
        let irq = Arc::new(CountingIrq::default());
        let d = I8042::new(c.clone(), 0x60, Some(irq.clone()));
        (d, c, irq)
    }

    fn inb(d: &mut I8042, port: u64) -> u8 {
        let mut b = [0xff];
        d.read(port, 0, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_resets() {
        let (mut d, c, _) = device();
        d.write(0x64, 0, &[0xd1]);
        assert_eq!(c.pending(), None);
        d.write(0x60, 0, &[0xfe]);
        assert_eq!(c.pending(), None, "0xfe on the data port is not a reset");
        d.write(0x64, 0, &[0xff]);
        assert_eq!(c.pending(), None, "0xff is Linux's null command");
        d.write(0x64, 0, &[0xfe]);
        assert_eq!(c.pending(), Some(ExitRequest::Reset));
    }

    #[test]
    fn controller_commands_answer_on_the_data_port() {
        let (mut d, _, _) = device();
        assert_eq!(inb(&mut d, 0x64) & STS_OBF, 0);
        d.write(0x64, 0, &[CMD_READ_CTR]);
        assert_eq!(inb(&mut d, 0x64) & STS_OBF, STS_OBF);
        assert_eq!(inb(&mut d, 0x60), CTR_RESET, "untranslated, interrupts on");
        assert_eq!(inb(&mut d, 0x64) & STS_OBF, 0);
        d.write(0x64, 0, &[CMD_WRITE_CTR]);
        d.write(0x60, 0, &[0x47]);
        d.write(0x64, 0, &[CMD_READ_CTR]);
        assert_eq!(inb(&mut d, 0x60), 0x47);
        d.write(0x64, 0, &[CMD_WRITE_OUTP]);
        d.write(0x60, 0, &[0xdf]);
        d.write(0x64, 0, &[CMD_READ_OUTP]);
        assert_eq!(inb(&mut d, 0x60), 0xdf);
        d.write(0x64, 0, &[CMD_SELF_TEST]);
        assert_eq!(inb(&mut d, 0x60), 0x55);
        d.write(0x64, 0, &[CMD_WRITE_KBD_OUT]);
        d.write(0x60, 0, &[0x5a]);
        assert_eq!(inb(&mut d, 0x60), 0x5a);
        // Bytes for the absent mouse go nowhere (not to the keyboard, which would answer).
        d.write(0x64, 0, &[CMD_WRITE_AUX_OUT]);
        d.write(0x60, 0, &[0x5a]);
        assert_eq!(inb(&mut d, 0x64) & STS_OBF, 0);
        // An empty buffer reads 0.
        assert_eq!(inb(&mut d, 0x60), 0);
    }

    #[test]
    fn keyboard_commands_are_acknowledged_with_an_interrupt() {
        let (mut d, _, irq) = device();
        d.write(0x60, 0, &[KBD_GET_ID]);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(inb(&mut d, 0x60), KBD_ACK);
        assert_eq!(inb(&mut d, 0x60), 0xab);
        assert_eq!(inb(&mut d, 0x60), 0x83);
        assert_eq!(irq.0.load(Ordering::SeqCst), 3, "one interrupt per byte");
        d.write(0x60, 0, &[0xed]);
        assert_eq!(inb(&mut d, 0x60), KBD_ACK);
    }

    #[test]
    fn ctrl_alt_del_arrives_byte_by_byte_with_irq1() {
        let (mut d, _, irq) = device();
        d.send_ctrl_alt_del().unwrap();
        let mut got = Vec::new();
        while inb(&mut d, 0x64) & STS_OBF != 0 {
            got.push(inb(&mut d, 0x60));
        }
        assert_eq!(got, CTRL_ALT_DEL);
        // As a set-2 decoder reads it: (extended, released, code) per key event.
        let (mut ext, mut up, mut events) = (false, false, Vec::new());
        for b in got {
            match b {
                0xe0 => ext = true,
                0xf0 => up = true,
                code => {
                    events.push((ext, up, code));
                    (ext, up) = (false, false);
                }
            }
        }
        let (ctrl, alt, del) = ((false, 0x14), (false, 0x11), (true, 0x71));
        let ev = |(e, c): (bool, u8), released| (e, released, c);
        assert_eq!(
            events,
            [
                ev(ctrl, false),
                ev(alt, false),
                ev(del, false),
                ev(del, true),
                ev(alt, true),
                ev(ctrl, true)
            ]
        );
        assert_eq!(irq.0.load(Ordering::SeqCst), CTRL_ALT_DEL.len() as u64);

        // A guest that does not read its keyboard: the second press is refused, not cut.
        d.send_ctrl_alt_del().unwrap();
        assert_eq!(d.send_ctrl_alt_del(), Err(KeyError::BufferFull(11)));
        assert_eq!(d.pending_bytes(), 11);
        // A guest that disabled its keyboard gets nothing.
        d.write(0x64, 0, &[CMD_KBD_DISABLE]);
        assert_eq!(d.send_ctrl_alt_del(), Err(KeyError::Disabled));
    }

    #[test]
    fn no_interrupt_while_the_guest_masks_it() {
        let (mut d, _, irq) = device();
        d.write(0x64, 0, &[CMD_WRITE_CTR]);
        d.write(0x60, 0, &[CTR_SYS]);
        d.send_ctrl_alt_del().unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 0);
        assert_eq!(inb(&mut d, 0x60), 0x14, "polled bytes still arrive");
    }
}
