//! The RTC's state as plain data: CMOS bytes and the guest's wall-clock time at the save. A
//! restored RTC continues from that time (the guest's clocks do not jump while it was saved).

use super::*;
use serde::{Deserialize, Serialize};

/// CMOS contents, index register and guest time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    cmos: Vec<u8>,
    index: u8,
    /// Guest time in ns since the Unix epoch when saved.
    unix_ns: i128,
}

impl Rtc {
    /// The guest-visible state now.
    pub fn save_state(&self) -> RtcState {
        let now = self.clock.now_ns();
        RtcState {
            cmos: self.cmos.to_vec(),
            index: self.index,
            unix_ns: self.unix_ns(now),
        }
    }

    /// Load a state saved by [`Rtc::save_state`].
    pub fn restore_state(&mut self, s: &RtcState) -> Result<(), String> {
        self.cmos = s
            .cmos
            .as_slice()
            .try_into()
            .map_err(|_| format!("RTC state has {} CMOS bytes, expected 128", s.cmos.len()))?;
        let now = self.clock.now_ns();
        self.index = s.index & 0x7f;
        self.base_unix_ns = s.unix_ns;
        self.base_mono = now;
        // Flags (update-ended, periodic, alarm) are evaluated from the restore on.
        self.flags_at = now;
        if let Some(w) = &self.waker {
            w.wake();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::legacy::pit::ManualClock;

    #[test]
    fn restored_rtc_shows_the_saved_time_and_cmos() {
        let clock = Arc::new(ManualClock::new(0));
        let mut a = Rtc::new(None, clock.clone(), 1_700_000_000 * NS_PER_SEC);
        a.set_cmos_byte(0x34, 0x5a);
        clock.advance(90 * 1_000_000_000);
        let saved = a.save_state();
        let clock2 = Arc::new(ManualClock::new(123_456_789));
        let mut b = Rtc::new(None, clock2, 0);
        b.restore_state(&saved).unwrap();
        assert_eq!(b.time(), a.time());
        assert_eq!(b.save_state(), saved);
        let mut short = saved.clone();
        short.cmos.pop();
        assert!(b.restore_state(&short).is_err());
    }
}
