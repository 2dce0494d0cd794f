//! The software engine's [`kvmbox_emu::InterruptController`] over an [`IrqChip`] (feature
//! `emu`). Calls naming a vCPU the chip does not have do nothing and report nothing.

use std::sync::Arc;
use std::time::Duration;

use kvmbox_cpu::{IrqLine, MsiLine};

use kvmbox_emu::{InterruptController, StartupEvent};

use crate::IrqChip;

impl InterruptController for IrqChip {
    fn pending_vector(&self, vcpu: u32) -> Option<u8> {
        self.vcpu_ref(vcpu)?.pending_interrupt(true)
    }

    fn ack(&self, vcpu: u32, vector: u8) {
        if let Some(v) = self.vcpu_ref(vcpu) {
            v.ack_vector(vector);
        }
    }

    fn take_nmi(&self, vcpu: u32) -> bool {
        self.vcpu_ref(vcpu).is_some_and(|v| v.take_nmi())
    }

    fn take_startup(&self, vcpu: u32) -> Option<StartupEvent> {
        let v = self.vcpu_ref(vcpu)?;
        if v.take_init() {
            return Some(StartupEvent::Init);
        }
        v.take_sipi().map(StartupEvent::Sipi)
    }

    fn apic_read(&self, vcpu: u32, offset: u64, data: &mut [u8]) {
        match self.vcpu_ref(vcpu) {
            Some(v) => v.mmio_read(offset, data),
            None => data.fill(0),
        }
    }

    fn apic_write(&self, vcpu: u32, offset: u64, data: &[u8]) {
        if let Some(v) = self.vcpu_ref(vcpu) {
            v.mmio_write(offset, data);
        }
    }

    fn set_tpr(&self, vcpu: u32, tpr: u8) {
        if let Some(v) = self.vcpu_ref(vcpu) {
            v.set_cr8(u64::from(tpr));
        }
    }

    fn wait(&self, vcpu: u32, timeout: Duration) {
        match self.vcpu_ref(vcpu) {
            Some(v) => {
                v.wait(true, Some(timeout));
            }
            None => std::thread::sleep(timeout),
        }
    }

    fn set_notifier(&self, vcpu: u32, f: Arc<dyn Fn() + Send + Sync>) {
        if let Some(v) = self.vcpu_ref(vcpu) {
            v.set_notifier(f);
        }
    }

    fn irq_line(&self, gsi: u32) -> Option<Arc<dyn IrqLine>> {
        IrqChip::irq_line(self, gsi).ok()
    }

    fn msi_line(&self) -> Option<Arc<dyn MsiLine>> {
        Some(IrqChip::msi_line(self))
    }

    fn save_vcpu(&self, vcpu: u32, state: &mut kvmbox_cpu::VcpuState) {
        self.save_vcpu_state(vcpu, state);
    }

    fn restore_vcpu(&self, vcpu: u32, state: &kvmbox_cpu::VcpuState) -> Result<(), String> {
        self.restore_vcpu_state(vcpu, state)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvmbox_devices::legacy::pit::ManualClock;

    use super::*;

    #[test]
    fn engine_view_of_init_sipi_and_interrupts() {
        let chip = IrqChip::new(2, Arc::new(ManualClock::new(0)), 1_000_000_000).unwrap();
        let ic: Arc<dyn InterruptController> = Arc::new(chip.clone());
        ic.apic_write(0, 0xf0, &0x1ffu32.to_le_bytes());
        ic.apic_write(0, 0x350, &0x1_0700u32.to_le_bytes());
        chip.vcpu(1).unwrap().set_wait_for_sipi();
        ic.apic_write(0, 0x310, &(1u32 << 24).to_le_bytes());
        ic.apic_write(0, 0x300, &0x4500u32.to_le_bytes());
        ic.apic_write(0, 0x300, &0x4610u32.to_le_bytes());
        assert_eq!(ic.take_startup(1), Some(StartupEvent::Init));
        assert_eq!(ic.take_startup(1), Some(StartupEvent::Sipi(0x10)));
        assert_eq!(ic.take_startup(1), None);
        // INIT reset the AP's APIC: it is software-disabled until the AP enables it.
        chip.send_msi(0xfee0_1000, 0x41);
        assert_eq!(ic.pending_vector(1), None);
        ic.apic_write(1, 0xf0, &0x1ffu32.to_le_bytes());
        ic.apic_write(1, 0xb0, &[0; 4]);
        // Peek, a higher vector arrives, the engine commits to the peeked one.
        assert_eq!(ic.pending_vector(1), Some(0x41));
        chip.send_msi(0xfee0_1000, 0x61);
        ic.ack(1, 0x41);
        assert_eq!(
            ic.pending_vector(1),
            Some(0x61),
            "0x61 nests over in-service 0x41"
        );
        ic.set_tpr(1, 7);
        assert_eq!(ic.pending_vector(1), None, "CR8 7 blocks class 6");
        ic.wait(1, Duration::from_millis(1));
        ic.set_tpr(1, 0);
        ic.ack(1, 0x61);
        ic.apic_write(1, 0xb0, &[0; 4]);
        ic.apic_write(1, 0xb0, &[0; 4]);
        assert_eq!(ic.pending_vector(1), None);
        assert_eq!(ic.pending_vector(7), None);
        assert!(!ic.take_nmi(7));
    }
}
