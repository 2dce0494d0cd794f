//! The i8042 keyboard controller, as far as guests use it: the reset line.

use crate::{BusDevice, ExitRequest, VmControl};
use std::sync::Arc;

/// Register offset (as vm-superio numbers them: from the data port) of an access.
fn register(data_port: u16, base: u64, offset: u64) -> Option<u8> {
    let port = base.checked_add(offset)?;
    u8::try_from(port.checked_sub(u64::from(data_port))?).ok()
}

/// Pulses the CPU reset line: the VM resets.
pub struct ResetTrigger(pub Arc<VmControl>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitRequest::Reset);
        Ok(())
    }
}

/// i8042 at its data port (0x60 on a PC) and command port (data + 4): insert it twice, one
/// port each (0x61 between them is the PIT's). Command 0xfe on the command port resets the
/// machine, which is how Linux reboots with `reboot=k`.
pub struct I8042 {
    dev: vm_superio::I8042Device<ResetTrigger>,
    data_port: u16,
}

impl I8042 {
    /// An i8042 whose data port is `data_port` and whose reset pulse goes to `control`.
    pub fn new(control: Arc<VmControl>, data_port: u16) -> Self {
        Self {
            dev: vm_superio::I8042Device::new(ResetTrigger(control)),
            data_port,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Some(off)) = (data.first_mut(), register(self.data_port, base, offset)) {
            *b = self.dev.read(off);
        }
    }
    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        if let (Some(&b), Some(off)) = (data.first(), register(self.data_port, base, offset)) {
            // The trigger cannot fail.
            let _ = self.dev.write(off, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_resets() {
        let c = Arc::new(VmControl::new().unwrap());
        let mut d = I8042::new(c.clone(), 0x60);
        d.write(0x64, 0, &[0xd1]);
        assert_eq!(c.pending(), None);
        d.write(0x60, 0, &[0xfe]);
        assert_eq!(c.pending(), None, "0xfe on the data port is not a reset");
        d.write(0x64, 0, &[0xfe]);
        assert_eq!(c.pending(), Some(ExitRequest::Reset));
    }
}
