//! A function's configuration space as plain data: the 256-byte header and capabilities as
//! the guest left them (BAR addresses, command register, MSI-X control).

use super::*;
use serde::{Deserialize, Serialize};

/// The configuration space registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciConfigState {
    regs: Vec<u32>,
}

impl PciConfiguration {
    /// The registers as they are now.
    pub fn save_state(&self) -> PciConfigState {
        PciConfigState {
            regs: self.regs.to_vec(),
        }
    }

    /// Load saved registers. Only bits the guest can write are taken (identity, BAR sizes
    /// and the capability list stay as this build made them); MSI-X control follows.
    pub fn restore_state(&mut self, s: &PciConfigState) -> Result<()> {
        if s.regs.len() != CONFIG_DWORDS {
            return Err(Error::State(format!(
                "configuration space of {} dwords, expected {CONFIG_DWORDS}",
                s.regs.len()
            )));
        }
        for (i, &v) in s.regs.iter().enumerate() {
            let mask = self.wmask[i];
            self.regs[i] = (self.regs[i] & !mask) | (v & mask);
        }
        if let Some(m) = &self.msix {
            let ctl = self.regs[m.cap_offset / 4] >> 16;
            m.config
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_control(ctl & MSIX_ENABLE != 0, ctl & MSIX_FUNCTION_MASK != 0);
        }
        Ok(())
    }
}
