//! The i8042's state as plain data: registers, the half-written command and the bytes the
//! guest has not read yet (a Ctrl+Alt+Del in flight survives a snapshot).

use super::*;
use serde::{Deserialize, Serialize};

/// Registers and the output buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    status: u8,
    ctr: u8,
    outp: u8,
    pending: Option<u8>,
    buffer: Vec<u8>,
}

impl I8042 {
    /// The guest-visible state.
    pub fn save_state(&self) -> I8042State {
        I8042State {
            status: self.status,
            ctr: self.ctr,
            outp: self.outp,
            pending: self.pending,
            buffer: self.buffer.iter().copied().collect(),
        }
    }

    /// Load a saved state; the controller keeps its reset line and interrupt. Checked whole
    /// before anything changes.
    pub fn restore_state(&mut self, s: &I8042State) -> Result<(), String> {
        if s.buffer.len() > BUFFER_LEN {
            return Err(format!(
                "i8042 state holds {} buffered bytes, at most {BUFFER_LEN} fit",
                s.buffer.len()
            ));
        }
        if let Some(c) = s
            .pending
            .filter(|&c| c != CMD_WRITE_CTR && c != CMD_WRITE_OUTP)
        {
            return Err(format!(
                "i8042 state waits for a parameter of command {c:#x}"
            ));
        }
        self.ctr = s.ctr;
        self.outp = s.outp;
        self.pending = s.pending;
        self.buffer = s.buffer.iter().copied().collect();
        // The output-buffer bit follows the buffer, whatever the file says.
        self.status = (s.status & !STS_OBF) | if self.buffer.is_empty() { 0 } else { STS_OBF };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_unread_keys_and_refuses_nonsense() {
        let c = Arc::new(VmControl::new().unwrap());
        let mut a = I8042::new(c.clone(), 0x60, None);
        a.write(0x64, 0, &[CMD_WRITE_CTR]);
        a.write(0x60, 0, &[CTR_RESET | 0x02]);
        a.send_ctrl_alt_del().unwrap();
        let mut first = [0];
        a.read(0x60, 0, &mut first);
        a.write(0x64, 0, &[CMD_WRITE_OUTP]);
        let s = a.save_state();

        let mut b = I8042::new(c, 0x60, None);
        b.restore_state(&s).unwrap();
        assert_eq!(b.save_state(), s);
        b.write(0x60, 0, &[0xdf]);
        assert_eq!(b.outp, 0xdf, "the half-written command completes");
        let mut rest = Vec::new();
        let mut st = [0];
        loop {
            b.read(0x64, 0, &mut st);
            if st[0] & STS_OBF == 0 {
                break;
            }
            let mut x = [0];
            b.read(0x60, 0, &mut x);
            rest.push(x[0]);
        }
        assert_eq!(rest.len(), CTRL_ALT_DEL.len() - 1);
        assert_eq!(rest[0], CTRL_ALT_DEL[1]);

        let mut bad = s.clone();
        bad.buffer = vec![0; BUFFER_LEN + 1];
        assert!(b.restore_state(&bad).is_err());
        let mut bad = s;
        bad.pending = Some(0x20);
        assert!(b.restore_state(&bad).is_err());
    }
}
