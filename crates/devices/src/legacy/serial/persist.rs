//! The UART's state as plain data (vm-superio's `SerialState`, mirrored with serde).

use super::*;
use serde::{Deserialize, Serialize};

/// Registers and the receive FIFO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialPortState {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl SerialPort {
    /// The guest-visible state.
    pub fn save_state(&self) -> SerialPortState {
        let s = self.uart.state();
        SerialPortState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Load a saved state; the UART keeps its interrupt line and output.
    pub fn restore_state(&mut self, s: &SerialPortState) -> Result<(), String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let line = self.uart.interrupt_evt().0.clone();
        let sink = || Box::new(std::io::sink()) as Box<dyn Write + Send>;
        let bad = |e| format!("serial state: {e:?}");
        // Checked first with a throwaway output, so a bad state changes nothing.
        vm_superio::Serial::from_state(&state, IrqTrigger(line.clone()), NoEvents, sink())
            .map_err(bad)?;
        let placeholder = vm_superio::Serial::new(IrqTrigger(line.clone()), sink());
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        self.uart =
            vm_superio::Serial::from_state(&state, IrqTrigger(line), NoEvents, out).map_err(bad)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::test_util::CountingIrq;

    #[test]
    fn restored_uart_keeps_registers_and_pending_input() {
        let irq = || IrqTrigger(std::sync::Arc::new(CountingIrq::default()));
        let mut a = SerialPort::new(irq(), Box::new(std::io::sink()));
        a.write(0x3f8, 7, &[0x42]); // scratch
        a.write(0x3f8, 3, &[0x03]); // 8N1
        a.write(0x3f8, 1, &[0x01]); // receive interrupts on
        assert_eq!(a.enqueue_input(b"hi"), 2);
        let saved = a.save_state();
        let mut b = SerialPort::new(irq(), Box::new(std::io::sink()));
        b.restore_state(&saved).unwrap();
        assert_eq!(b.save_state(), saved);
        let mut byte = [0u8];
        b.read(0x3f8, 7, &mut byte);
        assert_eq!(byte[0], 0x42);
        b.read(0x3f8, 0, &mut byte);
        assert_eq!(byte[0], b'h');
    }
}
