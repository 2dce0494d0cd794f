//! The MSI-X table and pending bits as plain data.

use super::*;
use serde::{Deserialize, Serialize};

/// Table entries (address low/high, data, vector control), pending bits, enable and mask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    table: Vec<[u32; 4]>,
    pba: Vec<u64>,
    enabled: bool,
    masked: bool,
}

impl MsixConfig {
    /// The table as the guest programmed it.
    pub fn save_state(&self) -> MsixState {
        MsixState {
            table: self
                .table
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.ctl])
                .collect(),
            pba: self.pba.clone(),
            enabled: self.enabled,
            masked: self.masked,
        }
    }

    /// Load a saved table (same vector count); lines are reprogrammed on their next message.
    pub fn restore_state(&mut self, s: &MsixState) -> Result<()> {
        if s.table.len() != self.table.len() || s.pba.len() != self.pba.len() {
            return Err(Error::State(format!(
                "MSI-X state with {} vectors, this device has {}",
                s.table.len(),
                self.table.len()
            )));
        }
        for (e, &[addr_lo, addr_hi, data, ctl]) in self.table.iter_mut().zip(&s.table) {
            *e = Entry {
                addr_lo,
                addr_hi,
                data,
                ctl: ctl & VECTOR_CTL_MASK,
            };
        }
        self.pba.copy_from_slice(&s.pba);
        self.programmed.fill(None);
        self.enabled = s.enabled;
        self.masked = s.masked;
        self.deliver_pending();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::RecordingMsi;
    use super::*;

    #[test]
    fn restored_table_delivers_to_the_saved_address() {
        let line = Arc::new(RecordingMsi::default());
        let mut a = MsixConfig::new(vec![line.clone(), line.clone()]).unwrap();
        a.write_table(16, &0xfee0_1000u32.to_le_bytes());
        a.write_table(24, &0x41u32.to_le_bytes());
        a.write_table(28, &0u32.to_le_bytes());
        a.set_control(true, false);
        let saved = a.save_state();

        let line2 = Arc::new(RecordingMsi::default());
        let mut b = MsixConfig::new(vec![line2.clone(), line2.clone()]).unwrap();
        b.restore_state(&saved).unwrap();
        assert_eq!(b.save_state(), saved);
        b.trigger(1).unwrap();
        assert_eq!(*line2.fired.lock().unwrap(), vec![(0xfee0_1000, 0x41)]);
        let mut c = MsixConfig::new(vec![line2.clone()]).unwrap();
        assert!(c.restore_state(&saved).is_err());
    }
}
