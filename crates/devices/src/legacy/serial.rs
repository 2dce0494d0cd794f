//! 16550A UART (COM1), from vm-superio, with its output going to any writer and its input
//! fed by the VMM's console.

use super::IrqTrigger;
use crate::BusDevice;
use std::io::Write;
use vm_superio::serial::NoEvents;

pub mod persist;

/// Number of ports a 16550 occupies.
pub const SERIAL_PORTS: u64 = 8;

/// A 16550A serial port.
pub struct SerialPort {
    uart: vm_superio::Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialPort {
    /// A UART that raises `irq` and writes what the guest transmits to `out`.
    pub fn new(irq: IrqTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: vm_superio::Serial::new(irq, out),
        }
    }

    /// Queue bytes the user typed for the guest to read. Returns how many fit in the receive
    /// FIFO; the caller retries the rest once the guest has read some.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.uart.fifo_capacity() == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // An error here is a failed write to the console or a failed interrupt: the guest
            // cannot act on either, and the UART state stays consistent.
            let _ = self.uart.write(off, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};

    use crate::legacy::test_util::CountingIrq;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_and_receives() {
        let irq = Arc::new(CountingIrq::default());
        let sink = Sink::default();
        let mut s = SerialPort::new(IrqTrigger(irq.clone()), Box::new(sink.clone()));
        for &c in b"hi" {
            s.write(0x3f8, 0, &[c]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        // Enable the received-data interrupt, then type.
        s.write(0x3f8, 1, &[1]);
        assert_eq!(s.enqueue_input(b"ok"), 2);
        assert!(irq.0.load(Ordering::SeqCst) >= 1);
        let mut lsr = [0u8];
        s.read(0x3f8, 5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        s.read(0x3f8, 0, &mut b);
        assert_eq!(b[0], b'o');
        let big = [b'x'; 200];
        let n = s.enqueue_input(&big);
        assert!(n < 200, "FIFO is bounded");
        assert_eq!(s.enqueue_input(&big), 0, "full FIFO takes nothing");
    }
}
