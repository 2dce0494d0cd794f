//! ACPI fixed hardware: PM1a event and control blocks, the PM timer, and the reset register.
//!
//! Linux powers off by writing SLP_TYP (from the DSDT's `_S5_`) with SLP_EN to PM1a_CNT, and
//! resets through the FADT reset register. SLP_TYP from `_S3_` suspends to RAM: the VM's vCPUs
//! stop ([`VmControl::suspend`]) until a wake event, the RTC alarm while RTC_EN is set or the
//! power button, sets WAK_STS and has the VMM restart them at the FACS's waking vector. The power button is the fixed-feature one: pressing
//! it sets PWRBTN_STS in PM1a_STS and, while the guest has PWRBTN_EN set, raises the SCI (a
//! level-triggered line that stays up until the guest clears the status bit).

use crate::{BusDevice, ExitRequest, VmControl};
use kvmbox_cpu::IrqLine;
use std::sync::Arc;
use std::time::Instant;

pub mod persist;

/// Length of the PM block: PM1a_EVT (4) + PM1a_CNT (2, padded to 4) + PM_TMR (4).
pub const PM_BLOCK_LEN: u64 = 12;
/// Offset of PM1a_CNT within the block.
const CNT_OFFSET: u64 = 4;
/// Offset of the PM timer within the block.
const TMR_OFFSET: u64 = 8;
const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;
/// PM1 status/enable bit of the fixed-feature power button.
const PWRBTN: u16 = 1 << 8;
/// PM1 status/enable bit of the RTC alarm.
const RTC: u16 = 1 << 10;
/// PM1 status: the system woke from a sleep state.
const WAK_STS: u16 = 1 << 15;
/// PM timer frequency in Hz.
const PM_TIMER_HZ: u128 = 3_579_545;

/// PM1a event/control registers and the PM timer, at consecutive ports.
pub struct AcpiPm {
    control: Arc<VmControl>,
    s5_slp_typ: u8,
    s3_slp_typ: u8,
    /// In S3, waiting for a wake event.
    sleeping: bool,
    pm1_status: u16,
    pm1_enable: u16,
    pm1_control: u16,
    start: Instant,
    sci: Option<Arc<dyn IrqLine>>,
}

impl AcpiPm {
    /// A PM block that powers the VM off when the guest enters sleep type `s5_slp_typ` and
    /// suspends it to RAM on `s3_slp_typ`.
    pub fn new(control: Arc<VmControl>, s5_slp_typ: u8, s3_slp_typ: u8) -> Self {
        Self {
            control,
            s5_slp_typ,
            s3_slp_typ,
            sleeping: false,
            pm1_status: 0,
            pm1_enable: 0,
            pm1_control: SCI_EN,
            start: Instant::now(),
            sci: None,
        }
    }

    /// Raise events on `sci` (the FADT's SCI_INT).
    pub fn set_sci(&mut self, sci: Arc<dyn IrqLine>) {
        self.sci = Some(sci);
    }

    /// Press the power button: PWRBTN_STS, and the SCI if the guest enabled the event. In S3
    /// it wakes the guest.
    pub fn press_power_button(&mut self) -> std::io::Result<()> {
        self.pm1_status |= PWRBTN;
        if self.sleeping {
            self.wake();
        }
        self.update_sci()
    }

    /// The RTC alarm fired: RTC_STS, the SCI if the guest enabled the event, and in S3 a wake
    /// when RTC_EN is set.
    pub fn rtc_alarm(&mut self) -> std::io::Result<()> {
        self.pm1_status |= RTC;
        if self.sleeping && self.pm1_enable & RTC != 0 {
            self.wake();
        }
        self.update_sci()
    }

    /// Whether the guest is in S3.
    pub fn sleeping(&self) -> bool {
        self.sleeping
    }

    fn wake(&mut self) {
        self.sleeping = false;
        self.pm1_status |= WAK_STS;
        self.control.wake();
    }

    /// The SCI is up while an enabled event's status bit is set.
    fn update_sci(&self) -> std::io::Result<()> {
        match &self.sci {
            Some(sci) => sci.set_level(self.pm1_status & self.pm1_enable & (PWRBTN | RTC) != 0),
            None => Ok(()),
        }
    }

    fn reg(&self, offset: u64) -> u32 {
        match offset {
            0..=3 => u32::from(self.pm1_status) | (u32::from(self.pm1_enable) << 16),
            4..=7 => u32::from(self.pm1_control),
            _ => {
                let ticks = self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000;
                ticks as u32
            }
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let aligned = offset & !3;
        let value = u64::from(self.reg(aligned)) | (u64::from(self.reg(aligned + 4)) << 32);
        let shift = (offset - aligned) * 8;
        let bytes = (value >> shift).to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(v);
        match (offset, n) {
            // PM1a_STS: write-one-to-clear.
            (0, _) => {
                self.pm1_status &= !(value as u16);
                if n == 4 {
                    self.pm1_enable = (value >> 16) as u16;
                }
            }
            (2, _) => self.pm1_enable = value as u16,
            (1, _) => self.pm1_status &= !((value as u16) << 8),
            (CNT_OFFSET, _) => {
                let cnt = value as u16;
                self.pm1_control = (cnt & !SLP_EN) | SCI_EN;
                let slp_typ = ((cnt >> 10) & 7) as u8;
                if cnt & SLP_EN != 0 && slp_typ == self.s5_slp_typ {
                    self.control.request(ExitRequest::PowerOff);
                } else if cnt & SLP_EN != 0 && slp_typ == self.s3_slp_typ {
                    self.sleeping = true;
                    self.pm1_status &= !WAK_STS;
                    self.control.suspend();
                }
            }
            (TMR_OFFSET, _) => {}
            _ => {}
        }
        if offset < CNT_OFFSET {
            // A line that cannot be driven is the backend's failure; the guest sees no SCI.
            let _ = self.update_sci();
        }
    }
}

/// The FADT reset register: writing the reset value resets the VM.
pub struct ResetRegister {
    control: Arc<VmControl>,
    value: u8,
}

impl ResetRegister {
    /// A reset register that resets on `value`.
    pub fn new(control: Arc<VmControl>, value: u8) -> Self {
        Self { control, value }
    }
}

impl BusDevice for ResetRegister {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        if data.first() == Some(&self.value) {
            self.control.request(ExitRequest::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm() -> (Arc<VmControl>, AcpiPm) {
        let c = Arc::new(VmControl::new().unwrap());
        (c.clone(), AcpiPm::new(c, 5, 1))
    }

    #[test]
    fn s5_powers_off_and_other_states_do_not() {
        let (c, mut d) = pm();
        d.write(0x600, 4, &((3u16 << 10) | SLP_EN).to_le_bytes());
        assert_eq!(c.pending(), None, "S1 (not offered) is not power-off");
        assert!(!c.asleep(), "nor a suspend");
        d.write(0x600, 4, &(5u16 << 10).to_le_bytes());
        assert_eq!(c.pending(), None, "no SLP_EN");
        d.write(0x600, 4, &((5u16 << 10) | SLP_EN).to_le_bytes());
        assert_eq!(c.pending(), Some(ExitRequest::PowerOff));
    }

    #[test]
    fn s3_sleeps_until_an_enabled_rtc_alarm_or_the_power_button() {
        let (c, mut d) = pm();
        let s3 = (1u16 << 10) | SLP_EN;
        d.write(0x600, 4, &s3.to_le_bytes());
        assert!(c.asleep() && d.sleeping());
        assert_eq!(c.pending(), None, "S3 is no exit");
        d.rtc_alarm().unwrap();
        assert!(!c.take_wake(), "RTC_EN clear: no wake");
        d.write(0x600, 2, &RTC.to_le_bytes());
        d.rtc_alarm().unwrap();
        assert!(c.take_wake() && !d.sleeping());
        let mut b = [0u8; 2];
        d.read(0x600, 0, &mut b);
        assert_eq!(u16::from_le_bytes(b), WAK_STS | RTC);
        c.resumed();
        d.write(0x600, 0, &(WAK_STS | RTC).to_le_bytes());
        d.write(0x600, 4, &s3.to_le_bytes());
        d.press_power_button().unwrap();
        assert!(c.take_wake(), "the power button wakes");
    }

    #[test]
    fn sci_enabled_and_timer_advances() {
        let (_c, mut d) = pm();
        let mut b = [0u8; 2];
        d.read(0x600, 4, &mut b);
        assert_eq!(u16::from_le_bytes(b) & SCI_EN, SCI_EN);
        let mut t0 = [0u8; 4];
        d.read(0x600, 8, &mut t0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut t1 = [0u8; 4];
        d.read(0x600, 8, &mut t1);
        let dt = u32::from_le_bytes(t1).wrapping_sub(u32::from_le_bytes(t0));
        assert!(dt >= 7000, "2 ms is >= 7159 PM timer ticks, got {dt}");
    }

    #[test]
    fn power_button_raises_sci_until_cleared() {
        use crate::legacy::test_util::CountingIrq;
        let (_c, mut d) = pm();
        let sci = Arc::new(CountingIrq::default());
        d.set_sci(sci.clone());
        d.press_power_button().unwrap();
        assert!(!sci.level(), "not enabled: status only");
        let mut b = [0u8; 2];
        d.read(0x600, 0, &mut b);
        assert_eq!(u16::from_le_bytes(b) & PWRBTN, PWRBTN);
        d.write(0x600, 2, &PWRBTN.to_le_bytes());
        assert!(sci.level(), "enabled: SCI up");
        d.write(0x600, 0, &PWRBTN.to_le_bytes());
        assert!(!sci.level(), "status cleared: SCI down");
        d.read(0x600, 0, &mut b);
        assert_eq!(u16::from_le_bytes(b) & PWRBTN, 0);
    }

    #[test]
    fn reset_register() {
        let c = Arc::new(VmControl::new().unwrap());
        let mut r = ResetRegister::new(c.clone(), 6);
        r.write(0, 0, &[2]);
        assert_eq!(c.pending(), None);
        r.write(0, 0, &[6]);
        assert_eq!(c.pending(), Some(ExitRequest::Reset));
    }
}
