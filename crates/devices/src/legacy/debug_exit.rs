//! isa-debug-exit compatible port: the guest ends the VM with a status of its choice.

use crate::{BusDevice, ExitRequest, VmControl};
use std::sync::Arc;

/// Ports the device answers (a 4-byte window, as QEMU's `iosize=4`).
pub const DEBUG_EXIT_PORTS: u64 = 4;

/// A write of value v ends the VM; kvmbox exits with `(v << 1) | 1`, exactly as QEMU's
/// `isa-debug-exit`, so test guests written for QEMU work unchanged.
pub struct DebugExit {
    control: Arc<VmControl>,
}

impl DebugExit {
    /// A debug-exit port that reports to `control`.
    pub fn new(control: Arc<VmControl>) -> Self {
        Self { control }
    }

    /// The process exit status for a guest write of `v`.
    pub fn status(v: u8) -> i32 {
        ((i32::from(v) << 1) | 1) & 0xff
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.control.request(ExitRequest::DebugExit(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_matches_qemu() {
        assert_eq!(DebugExit::status(0), 1);
        assert_eq!(DebugExit::status(1), 3);
        assert_eq!(DebugExit::status(0x10), 33);
        assert_eq!(DebugExit::status(0x7f), 255);
        assert_eq!(DebugExit::status(0x80), 1);
    }

    #[test]
    fn write_requests_exit() {
        let c = Arc::new(VmControl::new().unwrap());
        let mut d = DebugExit::new(c.clone());
        d.write(0xf4, 0, &[7, 0, 0, 0]);
        assert_eq!(c.pending(), Some(ExitRequest::DebugExit(7)));
    }
}
