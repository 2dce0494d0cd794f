//! MSI-X table, pending-bit array and delivery.

use std::sync::Arc;

use kvmbox_cpu::MsiLine;

use crate::{Error, Result};

pub mod persist;

/// Bytes per MSI-X table entry.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Bytes per pending-bit-array entry (64 vectors).
pub const MSIX_PBA_ENTRY_SIZE: u64 = 8;
const MAX_VECTORS: usize = 2048;
const VECTOR_CTL_MASK: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctl: u32,
}

impl Default for Entry {
    fn default() -> Self {
        Self {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            ctl: VECTOR_CTL_MASK,
        }
    }
}

/// The MSI-X state of one function: table, pending bits, enable and function mask, and one
/// [`MsiLine`] per vector.
///
/// A vector fires its line only when MSI-X is enabled and neither the function nor the vector
/// is masked; otherwise its pending bit is set and the message goes out when it is unmasked.
/// The line is (re)programmed with the entry's address and data before it first fires after
/// the guest changed them.
pub struct MsixConfig {
    table: Vec<Entry>,
    pba: Vec<u64>,
    lines: Vec<Arc<dyn MsiLine>>,
    programmed: Vec<Option<(u64, u32)>>,
    enabled: bool,
    masked: bool,
}

impl MsixConfig {
    /// One vector per line in `lines` (1..=2048).
    pub fn new(lines: Vec<Arc<dyn MsiLine>>) -> Result<Self> {
        let n = lines.len();
        if n == 0 || n > MAX_VECTORS {
            return Err(Error::MsixVectors(n));
        }
        Ok(Self {
            table: vec![Entry::default(); n],
            pba: vec![0; n.div_ceil(64)],
            lines,
            programmed: vec![None; n],
            enabled: false,
            masked: false,
        })
    }

    /// Number of vectors.
    pub fn num_vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Bytes the table occupies in its BAR.
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Bytes the pending-bit array occupies in its BAR.
    pub fn pba_size(&self) -> u64 {
        self.pba.len() as u64 * MSIX_PBA_ENTRY_SIZE
    }

    /// MSI-X Enable in the capability's message control.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Function Mask in the capability's message control.
    pub fn function_masked(&self) -> bool {
        self.masked
    }

    /// The guest wrote message control.
    pub fn set_control(&mut self, enabled: bool, masked: bool) {
        self.enabled = enabled;
        self.masked = masked;
        self.deliver_pending();
    }

    /// Return to the power-on state (disabled, every vector masked, nothing pending).
    pub fn reset(&mut self) {
        self.table.fill(Entry::default());
        self.pba.fill(0);
        self.programmed.fill(None);
        self.enabled = false;
        self.masked = false;
    }

    /// Guest read of the table at `offset` (4 or 8 aligned bytes; others read as zero).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((idx, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = &self.table[idx];
        let fields = [e.addr_lo, e.addr_hi, e.data, e.ctl];
        let v =
            u64::from(fields[field]) | u64::from(fields.get(field + 1).copied().unwrap_or(0)) << 32;
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }

    /// Guest write of the table at `offset` (4 or 8 aligned bytes; others are ignored).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((idx, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let mut raw = [0u8; 8];
        raw[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(raw);
        let was_masked = self.vector_masked(idx);
        let e = &mut self.table[idx];
        let mut set = |f: usize, val: u32| match f {
            0 => e.addr_lo = val,
            1 => e.addr_hi = val,
            2 => e.data = val,
            _ => e.ctl = val & VECTOR_CTL_MASK,
        };
        set(field, v as u32);
        if data.len() == 8 {
            set(field + 1, (v >> 32) as u32);
        }
        if was_masked && !self.vector_masked(idx) {
            self.deliver_pending();
        }
    }

    /// Guest read of the pending-bit array (4 or 8 aligned bytes; others read as zero).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || !offset.is_multiple_of(data.len() as u64) {
            return;
        }
        let Some(&qword) = usize::try_from(offset / 8)
            .ok()
            .and_then(|i| self.pba.get(i))
        else {
            return;
        };
        let v = if data.len() == 8 {
            qword
        } else {
            qword >> ((offset % 8) * 8)
        };
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
    }

    /// Whether `vector`'s pending bit is set.
    pub fn pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        v < self.table.len() && self.pba[v / 64] & (1 << (v % 64)) != 0
    }

    /// Signal `vector`: send its message now, or mark it pending while masked or disabled.
    /// Vectors the function does not have are ignored.
    pub fn trigger(&mut self, vector: u16) -> std::io::Result<()> {
        let v = usize::from(vector);
        if v >= self.table.len() {
            return Ok(());
        }
        if !self.enabled || self.vector_masked(v) {
            self.pba[v / 64] |= 1 << (v % 64);
            return Ok(());
        }
        self.send(v)
    }

    fn send(&mut self, v: usize) -> std::io::Result<()> {
        let e = self.table[v];
        let msg = (u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo), e.data);
        if self.programmed[v] != Some(msg) {
            self.lines[v].set_message(msg.0, msg.1)?;
            self.programmed[v] = Some(msg);
        }
        self.lines[v].trigger()
    }

    fn vector_masked(&self, v: usize) -> bool {
        self.masked || self.table[v].ctl & VECTOR_CTL_MASK != 0
    }

    fn deliver_pending(&mut self) {
        if !self.enabled || self.masked {
            return;
        }
        for v in 0..self.table.len() {
            if self.pba[v / 64] & (1 << (v % 64)) != 0 && !self.vector_masked(v) {
                self.pba[v / 64] &= !(1 << (v % 64));
                // A failing line loses this one message; the guest is not stalled by it.
                let _ = self.send(v);
            }
        }
    }

    /// (entry, field) of an aligned 4- or 8-byte access inside the table.
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        if !matches!(len, 4 | 8) || !offset.is_multiple_of(len as u64) {
            return None;
        }
        let idx = usize::try_from(offset / MSIX_TABLE_ENTRY_SIZE).ok()?;
        if idx >= self.table.len() {
            return None;
        }
        Some((idx, (offset % MSIX_TABLE_ENTRY_SIZE / 4) as usize))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what a vector was asked to do, as KVM's routing table + irqfd would see it.
    #[derive(Default)]
    pub(crate) struct RecordingMsi {
        pub(crate) msgs: Mutex<Vec<(u64, u32)>>,
        pub(crate) fired: Mutex<Vec<(u64, u32)>>,
        current: Mutex<Option<(u64, u32)>>,
    }

    impl MsiLine for RecordingMsi {
        fn set_message(&self, addr: u64, data: u32) -> std::io::Result<()> {
            self.msgs.lock().unwrap().push((addr, data));
            *self.current.lock().unwrap() = Some((addr, data));
            Ok(())
        }
        fn trigger(&self) -> std::io::Result<()> {
            let cur = self.current.lock().unwrap().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "unprogrammed")
            })?;
            self.fired.lock().unwrap().push(cur);
            Ok(())
        }
    }

    fn setup(n: usize) -> (MsixConfig, Vec<Arc<RecordingMsi>>) {
        let rec: Vec<_> = (0..n).map(|_| Arc::new(RecordingMsi::default())).collect();
        let lines = rec
            .iter()
            .map(|r| r.clone() as Arc<dyn MsiLine>)
            .collect::<Vec<_>>();
        (MsixConfig::new(lines).unwrap(), rec)
    }

    fn program(m: &mut MsixConfig, v: u64, addr: u64, data: u32) {
        m.write_table(v * 16, &addr.to_le_bytes());
        m.write_table(v * 16 + 8, &data.to_le_bytes());
    }

    #[test]
    fn vector_count_limits() {
        assert!(MsixConfig::new(Vec::new()).is_err());
        let (m, _) = setup(65);
        assert_eq!(m.table_size(), 65 * 16);
        assert_eq!(m.pba_size(), 16);
    }

    #[test]
    fn masked_vectors_pend_then_deliver_on_unmask() {
        let (mut m, rec) = setup(3);
        program(&mut m, 1, 0xfee0_0000, 0x4041);
        let mut b = [0u8; 4];
        m.read_table(16 + 12, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1, "entries start masked");
        m.trigger(1).unwrap();
        assert!(m.pending(1), "disabled: pending");
        m.set_control(true, false);
        assert!(m.pending(1), "still masked per vector");
        assert!(rec[1].fired.lock().unwrap().is_empty());
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert!(!m.pending(1));
        assert_eq!(*rec[1].fired.lock().unwrap(), vec![(0xfee0_0000, 0x4041)]);
        // Function mask.
        m.set_control(true, true);
        m.trigger(1).unwrap();
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        m.set_control(true, false);
        assert_eq!(rec[1].fired.lock().unwrap().len(), 2);
        // Reprogramming reaches the line before the next message; unchanged ones do not.
        m.trigger(1).unwrap();
        assert_eq!(rec[1].msgs.lock().unwrap().len(), 1);
        program(&mut m, 1, 0xfee0_1000, 0x4042);
        m.trigger(1).unwrap();
        assert_eq!(
            *rec[1].msgs.lock().unwrap(),
            vec![(0xfee0_0000, 0x4041), (0xfee0_1000, 0x4042)]
        );
        assert!(rec[0].fired.lock().unwrap().is_empty());
        assert!(m.trigger(99).is_ok(), "nonexistent vector is ignored");
        m.reset();
        assert!(!m.enabled());
        m.read_table(16, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn odd_table_accesses_are_harmless() {
        let (mut m, _) = setup(2);
        let mut b = [0xaau8; 2];
        m.read_table(0, &mut b);
        assert_eq!(b, [0, 0]);
        m.write_table(2, &[1, 2, 3, 4]);
        m.write_table(32, &[1, 2, 3, 4]);
        m.write_table(u64::MAX - 3, &[1, 2, 3, 4]);
        let mut b4 = [0u8; 4];
        m.read_table(u64::MAX - 3, &mut b4);
        m.read_pba(u64::MAX - 7, &mut b4);
        m.read_pba(3, &mut b4);
        assert_eq!(b4, [0; 4]);
        m.write_table(4, &0xdead_beefu32.to_le_bytes());
        m.read_table(4, &mut b4);
        assert_eq!(u32::from_le_bytes(b4), 0xdead_beef);
        let mut b8 = [0u8; 8];
        m.read_table(8, &mut b8);
        assert_eq!(u64::from_le_bytes(b8), 1 << 32, "data 0, ctl masked");
    }
}
