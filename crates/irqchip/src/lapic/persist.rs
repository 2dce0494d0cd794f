//! A [`Lapic`] as the 1 KiB register page KVM's `kvm_lapic_state` holds, so a local APIC
//! saved on the engine restores into KVM's in-kernel one and back. The timer travels as its
//! initial and current count: on restore it continues from the current count, relative to
//! the new clock.

use super::*;
use kvmbox_cpu::state::{LapicState, MpState as SavedMpState, LAPIC_PAGE_SIZE};

impl Lapic {
    /// The register page at clock time `now` (the timer's current count as of `now`). In
    /// x2APIC mode the ID register holds the APIC ID in bits 24-31, as KVM stores it.
    pub fn save_page(&self, now: u64) -> LapicState {
        let mut page = LapicState {
            regs: vec![0; LAPIC_PAGE_SIZE],
        };
        for reg in (0..LAPIC_PAGE_SIZE as u32).step_by(16) {
            page.set_reg(reg as usize, self.peek_reg(reg, now));
        }
        if self.x2apic() {
            page.set_reg(REG_ID as usize, (self.apic_id & 0xff) << 24);
        }
        page
    }

    /// Load a register page saved by [`Lapic::save_page`] (or KVM) at clock time `now`, with
    /// `apic_base` (IA32_APIC_BASE) and `tsc_deadline` (IA32_TSC_DEADLINE). The guest TSC
    /// must already be set ([`Lapic::set_guest_tsc`]) for the deadline to land right.
    pub fn load_page(
        &mut self,
        page: &LapicState,
        apic_base: u64,
        tsc_deadline: u64,
        now: u64,
    ) -> Result<(), String> {
        if page.regs.len() != LAPIC_PAGE_SIZE {
            return Err(format!(
                "saved LAPIC page of {} bytes, expected {LAPIC_PAGE_SIZE}",
                page.regs.len()
            ));
        }
        let r = |off: u32| page.reg(off as usize);
        let bsp = if self.bsp { APIC_BASE_BSP } else { 0 };
        self.base = (apic_base & (APIC_BASE_ADDR_MASK | APIC_BASE_EN | APIC_BASE_EXTD)) | bsp;
        self.id_reg = r(REG_ID) & 0xff00_0000;
        self.tpr = r(REG_TPR) & 0xff;
        self.ldr = if self.x2apic() {
            self.x2apic_ldr()
        } else {
            r(REG_LDR) & 0xff00_0000
        };
        self.dfr = r(REG_DFR) | 0x0fff_ffff;
        self.svr = r(REG_SVR) & 0x13ff;
        for i in 0..8u32 {
            self.isr.0[i as usize] = r(REG_ISR + i * 16);
            self.tmr.0[i as usize] = r(REG_TMR + i * 16);
            self.irr.0[i as usize] = r(REG_IRR + i * 16);
        }
        self.esr = r(REG_ESR);
        self.esr_pending = 0;
        self.icr_lo = r(REG_ICR_LO) & !(1 << 12);
        self.icr_hi = r(REG_ICR_HI);
        for (off, i) in (REG_LVT_CMCI..=REG_LVT_ERROR)
            .step_by(16)
            .filter_map(|off| lvt_index(off).map(|i| (off, i)))
        {
            self.lvt[i] = r(off) & (LVT_WRITABLE[i] | LVT_MASKED);
        }
        self.timer_init = r(REG_TIMER_INIT);
        self.timer_div_reg = r(REG_TIMER_DIV) & 0xb;
        self.stop_timer();
        self.tsc_deadline = 0;
        match self.timer_mode() {
            TimerMode::TscDeadline => self.set_tsc_deadline(tsc_deadline, now),
            _ => self.start_count(u64::from(r(REG_TIMER_CUR)), now),
        }
        Ok(())
    }

    /// The pending-event part of a saved vCPU: NMI pending and MP state.
    pub fn save_events(&self) -> (bool, SavedMpState) {
        let mp = match self.mp_state {
            MpState::WaitForSipi => SavedMpState::WaitForSipi,
            MpState::Running => SavedMpState::Runnable,
        };
        (self.nmi_pending, mp)
    }

    /// Load the pending-event part (see [`Lapic::save_events`]).
    pub fn load_events(&mut self, nmi_pending: bool, mp: SavedMpState) {
        self.nmi_pending = nmi_pending;
        self.init_pending = false;
        self.sipi_vector = None;
        self.mp_state = match mp {
            SavedMpState::WaitForSipi => MpState::WaitForSipi,
            _ => MpState::Running,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_round_trip_keeps_registers_and_the_running_timer() {
        let mut a = Lapic::new(1, false, 1_000_000_000);
        a.write_reg(REG_SVR, 0x1ff, 0);
        a.write_reg(REG_TPR, 0x20, 0);
        a.write_reg(REG_LVT_TIMER, 0x2_0030, 0); // periodic, vector 0x30
        a.write_reg(REG_TIMER_DIV, 0xb, 0); // divide by 1
        a.write_reg(REG_TIMER_INIT, 100_000, 0);
        a.accept(&IrqMessage::fixed(0x41, 1));
        let page = a.save_page(40_000);
        assert_eq!(page.reg(REG_TIMER_CUR as usize), 60_000);
        assert_eq!(page.reg(REG_ID as usize), 1 << 24);

        // Restore into a fresh LAPIC on a clock that reads 5 s later.
        let later = 5_000_000_000;
        let mut b = Lapic::new(1, false, 1_000_000_000);
        b.load_page(&page, a.apic_base(), 0, later).unwrap();
        assert_eq!(b.save_page(later).regs, page.regs);
        assert_eq!(b.read_reg(REG_TIMER_CUR, later + 100), 59_900);
        assert_eq!(b.deliverable(), Some(0x41));
        // It fires once at the saved remaining count, then every period: no storm.
        assert!(!b.timer_tick(later + 59_999));
        assert!(b.timer_tick(later + 60_000));
        assert_eq!(b.next_timer_deadline(), Some(later + 160_000));

        let short = LapicState { regs: vec![0; 10] };
        assert!(b.load_page(&short, 0, 0, 0).is_err());
    }
}
