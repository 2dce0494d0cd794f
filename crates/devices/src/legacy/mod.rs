//! PC platform devices: serial port, i8042, debug-exit port, ACPI power management.

pub mod acpi_pm;
pub mod debug_exit;
pub mod i8042;
pub mod pit;
pub mod rtc;
pub mod serial;

use kvmbox_cpu::IrqLine;
use std::sync::Arc;

/// An interrupt line as vm-superio's devices want it.
pub struct IrqTrigger(pub Arc<dyn IrqLine>);

impl vm_superio::Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use kvmbox_cpu::IrqLine;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// An interrupt line that counts edge triggers and remembers its level.
    #[derive(Default)]
    pub(crate) struct CountingIrq(pub(crate) AtomicU64, AtomicBool);

    impl CountingIrq {
        /// The level last driven.
        pub(crate) fn level(&self) -> bool {
            self.1.load(Ordering::SeqCst)
        }
    }

    impl IrqLine for CountingIrq {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn set_level(&self, high: bool) -> std::io::Result<()> {
            self.1.store(high, Ordering::SeqCst);
            Ok(())
        }
    }
}
