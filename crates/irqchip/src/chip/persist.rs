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
    pub fn save_vcpu_state(&self, id: u32, out: &mut VcpuState) {
        let Some(v) = self.vcpu_ref(id) else { return };
        let now = v.now();
        let st = self.sh.lock();
        let l = &st.lapics[v.id];
        out.lapic = l.save_page(now);
        out.set_msr(MSR_IA32_TSC_DEADLINE, l.tsc_deadline());
        let (nmi, mp) = l.save_events();
        out.events.nmi_pending |= nmi;
        if mp == kvmbox_cpu::state::MpState::WaitForSipi {
            out.mp_state = mp;
        }
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
