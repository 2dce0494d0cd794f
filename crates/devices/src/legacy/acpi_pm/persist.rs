//! The ACPI PM block's state as plain data: PM1 registers and the PM timer's count, which
//! continues from the saved value.

use super::*;
use serde::{Deserialize, Serialize};

/// PM1 status, enable, control and the PM timer's age.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    pm1_status: u16,
    pm1_enable: u16,
    pm1_control: u16,
    /// Nanoseconds the PM timer had counted.
    timer_ns: u64,
}

impl AcpiPm {
    /// The guest-visible state now.
    pub fn save_state(&self) -> AcpiPmState {
        AcpiPmState {
            pm1_status: self.pm1_status,
            pm1_enable: self.pm1_enable,
            pm1_control: self.pm1_control,
            timer_ns: u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX),
        }
    }

    /// Load a state saved by [`AcpiPm::save_state`].
    pub fn restore_state(&mut self, s: &AcpiPmState) {
        self.pm1_status = s.pm1_status;
        self.pm1_enable = s.pm1_enable;
        self.pm1_control = s.pm1_control;
        let now = Instant::now();
        self.start = now
            .checked_sub(std::time::Duration::from_nanos(s.timer_ns))
            .unwrap_or(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restored_pm_timer_continues_from_the_saved_count() {
        let control = Arc::new(VmControl::new().unwrap());
        let mut a = AcpiPm::new(control.clone(), 5, 1);
        a.pm1_enable = 0x100;
        a.start -= std::time::Duration::from_secs(3);
        let saved = a.save_state();
        let mut b = AcpiPm::new(control, 5, 1);
        b.restore_state(&saved);
        let s = b.save_state();
        assert_eq!((s.pm1_enable, s.pm1_status), (0x100, 0));
        assert!(s.timer_ns >= saved.timer_ns && s.timer_ns < saved.timer_ns + 1_000_000_000);
    }
}
