//! The PIT's state as plain data. Each channel's count so far is folded into its tick
//! count at the save, so a restored PIT continues from the same count on the new process's
//! clock: no burst of missed ticks, no counter running backwards. Channel 0's missed periods
//! not yet raised (and whether a raised edge awaits its acknowledgement) are kept: the
//! restored guest still gets them, one per acknowledgement.

use super::*;
use serde::{Deserialize, Serialize};

/// The three channels (counted ticks folded in, `run_since` and `raised_at` 0, channel 0's
/// missed periods) and port 0x61.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PitState {
    channels: Vec<Channel>,
    port61: u8,
}

impl Pit {
    /// The guest-visible state now.
    pub fn save_state(&self) -> PitState {
        let now = self.clock.now_ns();
        let mut channels = self.channels.to_vec();
        for c in &mut channels {
            if c.armed {
                c.base_ticks = c.ticks(now);
            }
            c.run_since = 0;
            c.raised_at = 0;
        }
        PitState {
            channels,
            port61: self.port61,
        }
    }

    /// Load a state saved by [`Pit::save_state`]; the caller wakes the timer thread.
    pub fn restore_state(&mut self, s: &PitState) -> Result<(), String> {
        let mut channels: [Channel; 3] = s
            .channels
            .clone()
            .try_into()
            .map_err(|_| format!("PIT state has {} channels, expected 3", s.channels.len()))?;
        let now = self.clock.now_ns();
        for c in &mut channels {
            c.run_since = now;
            // An edge still unacknowledged is retried a period from now.
            c.raised_at = now;
        }
        self.channels = channels;
        self.port61 = s.port61;
        if let Some(w) = &self.waker {
            w.wake();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_count(pit: &mut Pit) -> u16 {
        pit.write_port(PIT_PORT + 3, 0x00); // latch channel 0
        let lo = pit.read_port(PIT_PORT);
        let hi = pit.read_port(PIT_PORT);
        u16::from_le_bytes([lo, hi])
    }

    #[test]
    fn restored_pit_counts_on_from_the_saved_count_on_a_new_clock() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let mut a = Pit::new(None, clock.clone());
        a.write_port(PIT_PORT + 3, 0x34); // channel 0, word, mode 2
        a.write_port(PIT_PORT, 0x00);
        a.write_port(PIT_PORT, 0x80); // 0x8000
        clock.advance(5_000_000);
        let before = read_count(&mut a);
        let saved = a.save_state();

        // A new process: its clock started later and reads something else entirely.
        let clock2 = Arc::new(ManualClock::new(77));
        let mut b = Pit::new(None, clock2.clone());
        b.restore_state(&saved).unwrap();
        assert_eq!(read_count(&mut b), before);
        clock.advance(1_000_000);
        clock2.advance(1_000_000);
        // The fraction of a tick (< 838 ns) counted at the save is not kept.
        let (nb, na) = (read_count(&mut b), read_count(&mut a));
        assert!(na.abs_diff(nb) <= 1, "restored {nb}, original {na}");
        // Missed periods travel with the state and are raised one per acknowledgement.
        let irq = Arc::new(crate::legacy::test_util::CountingIrq::default());
        let mut c = Pit::new(Some(irq.clone()), clock.clone());
        c.restore_state(&saved).unwrap();
        clock.advance(10 * ticks_to_ns(0x8000));
        c.tick(clock.now_ns());
        assert_eq!(c.backlog(), 9);
        let mut d = Pit::new(Some(irq.clone()), clock2.clone());
        d.restore_state(&c.save_state()).unwrap();
        assert_eq!(d.backlog(), 9);
        d.irq_acked();
        assert_eq!((d.backlog(), irq.0.load(Ordering::SeqCst)), (8, 2));
        let bad = PitState {
            channels: Vec::new(),
            port61: 0,
        };
        assert!(b.restore_state(&bad).is_err());
    }
}
