//! The i8042 keyboard controller, as far as guests use it: the reset line.

use crate::{BusDevice, ExitRequest, VmControl};
use std::sync::Arc;

/// Pulses the CPU reset line: the VM resets.
pub struct ResetTrigger(pub Arc<VmControl>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitRequest::Reset);
        Ok(())
    }
}

/// i8042 at ports 0x60 and 0x64 (insert it at 0x60 with length 5). Command 0xfe on 0x64
/// resets the machine, which is how Linux reboots with `reboot=k`.
pub struct I8042 {
    dev: vm_superio::I8042Device<ResetTrigger>,
}

impl I8042 {
    /// An i8042 whose reset pulse goes to `control`.
    pub fn new(control: Arc<VmControl>) -> Self {
        Self {
            dev: vm_superio::I8042Device::new(ResetTrigger(control)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.dev.read(off);
        }
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
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
        let mut d = I8042::new(c.clone());
        d.write(0x60, 4, &[0xd1]);
        assert_eq!(c.pending(), None);
        d.write(0x60, 4, &[0xfe]);
        assert_eq!(c.pending(), Some(ExitRequest::Reset));
    }
}
