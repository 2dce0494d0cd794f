//! Saving and restoring an [`IrqChip`]: the IOAPIC, the PIC pair and the line levels as one
//! [`IrqChipState`]; each local APIC travels with its vCPU in [`kvmbox_cpu::VcpuState`].

use super::*;
use kvmbox_cpu::state::MSR_IA32_TSC_DEADLINE;
use kvmbox_cpu::VcpuState;
use serde::{Deserialize, Serialize};

/// The VM-wide part of the interrupt controllers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IrqChipState {
    /// The IOAPIC.
    pub ioapic: IoApic,
    /// The 8259 pair.
    pub pic: Pic,
    /// Per GSI, which interrupt sources hold the line high.
    pub sources: Vec<u64>,
}

impl IrqChip {
    /// The IOAPIC, PIC and line levels.
    pub fn save_state(&self) -> IrqChipState {
        let st = self.sh.lock();
        IrqChipState {
            ioapic: st.ioapic.clone(),
            pic: st.pic.clone(),
            sources: st.sources.to_vec(),
        }
    }

    /// Load a state saved by [`IrqChip::save_state`].
    pub fn restore_state(&self, s: &IrqChipState) -> Result<(), Error> {
        let sources: [u64; IOAPIC_PINS] = s.sources.as_slice().try_into().map_err(|_| {
            Error::State(format!(
                "{} interrupt lines saved, expected {IOAPIC_PINS}",
                s.sources.len()
            ))
        })?;
        self.sh.with(|st| {
            st.ioapic = s.ioapic.clone();
            st.pic = s.pic.clone();
            st.sources = sources;
            // KVM's routes follow the restored redirection table (EOI exits of its pins).
            st.sync_ioapic_routes();
        });
        Ok(())
    }

    /// Add vCPU `id`'s local APIC (page, TSC deadline), pending NMI and INIT/SIPI state to
    /// `out`.
    ///
    /// A timer that came due since the vCPU last looked (a paused vCPU does not) fires first,
    /// so its interrupt is saved pending in the IRR: the page has no other place for it (an
    /// expired one-shot count reads 0 and restores as a stopped timer).
    pub fn save_vcpu_state(&self, id: u32, out: &mut VcpuState) {
        let Some(v) = self.vcpu_ref(id) else { return };
        let now = v.now();
        self.sh.with(|st| {
            let l = &mut st.lapics[v.id];
            l.timer_tick(now);
            out.lapic = l.save_page(now);
            out.set_msr(MSR_IA32_TSC_DEADLINE, l.tsc_deadline());
            let (nmi, mp) = l.save_events();
            out.events.nmi_pending |= nmi;
            if mp == kvmbox_cpu::state::MpState::WaitForSipi {
                out.mp_state = mp;
            }
        });
    }

    /// Load vCPU `id`'s local APIC and pending events from `s`; the guest TSC continues from
    /// the saved value.
    pub fn restore_vcpu_state(&self, id: u32, s: &VcpuState) -> Result<(), String> {
        let v = self
            .vcpu_ref(id)
            .ok_or_else(|| format!("vCPU {id} has no local APIC here"))?;
        let now = v.now();
        let mut l = self.sh.lock().lapics[v.id].clone();
        l.set_guest_tsc(s.tsc(), now);
        let deadline = s.msr(MSR_IA32_TSC_DEADLINE).unwrap_or(0);
        l.load_page(&s.lapic, s.sregs.apic_base, deadline, now)?;
        l.load_events(s.events.nmi_pending, s.mp_state);
        self.sh.with(|st| st.lapics[v.id] = l);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmbox_cpu::state::{LapicState, MpState, VcpuEvents, LAPIC_PAGE_SIZE};
    use kvmbox_devices::legacy::pit::ManualClock;
    use std::sync::Arc;

    /// A one-shot timer that came due while its vCPU was paused (nobody ran the timer since)
    /// is saved as a pending interrupt, and the restored vCPU takes it. Saved as "current
    /// count 0" alone, it restored as a stopped timer, and a guest halted until its next timer
    /// interrupt slept forever.
    #[test]
    fn a_timer_that_expired_while_paused_is_saved_pending() {
        let clock = Arc::new(ManualClock::new(0));
        let chip = IrqChip::new(1, clock.clone(), 1_000_000_000).unwrap();
        let v = chip.vcpu_ref(0).unwrap();
        v.mmio_write(0xf0, &0x1ffu32.to_le_bytes()); // enabled
        v.mmio_write(0x3e0, &0xbu32.to_le_bytes()); // divide by 1: 1 ns per count
        v.mmio_write(0x320, &0xecu32.to_le_bytes()); // one-shot, vector 0xec
        v.mmio_write(0x380, &1_000_000u32.to_le_bytes()); // 1 ms
        clock.advance(5_000_000);
        let mut saved = VcpuState {
            regs: Default::default(),
            sregs: Default::default(),
            debugregs: [0; 6],
            fxsave: Vec::new(),
            xsave: None,
            xcrs: Vec::new(),
            msrs: Vec::new(),
            events: VcpuEvents::default(),
            mp_state: MpState::Halted,
            lapic: LapicState {
                regs: vec![0; LAPIC_PAGE_SIZE],
            },
            cpuid: Vec::new(),
        };
        saved.sregs.apic_base = 0xfee0_0900; // enabled, BSP
        chip.save_vcpu_state(0, &mut saved);

        let back =
            IrqChip::new(1, Arc::new(ManualClock::new(9_000_000_000)), 1_000_000_000).unwrap();
        back.restore_vcpu_state(0, &saved).unwrap();
        let v = back.vcpu_ref(0).unwrap();
        assert_eq!(v.pending_interrupt(true), Some(0xec));
        v.ack_vector(0xec);
        v.mmio_write(0xb0, &[0; 4]); // EOI
        assert_eq!(
            v.pending_interrupt(true),
            None,
            "one interrupt, not a storm"
        );
    }
}
