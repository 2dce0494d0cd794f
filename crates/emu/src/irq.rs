//! The interface an interrupt controller (local APIC + IOAPIC + PIC, crate `kvmbox-irqchip`)
//! implements so the engine's vCPUs can take interrupts. The engine polls it at instruction
//! boundaries; it never calls back into the engine.

use kvmbox_cpu::{IrqLine, MsiLine};
use std::sync::Arc;
use std::time::Duration;

/// INIT / SIPI delivered to a vCPU through its local APIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartupEvent {
    /// INIT: the vCPU resets to real mode and waits for a SIPI.
    Init,
    /// Startup IPI with its vector: the vCPU starts in real mode at `vector << 12`.
    Sipi(u8),
}

/// Per-VM interrupt controller, shared by all vCPUs (each call names the vCPU).
pub trait InterruptController: Send + Sync {
    /// Highest-priority interrupt vector the local APIC of `vcpu` would deliver now,
    /// without accepting it. Called only when RFLAGS.IF=1 and no interrupt shadow is active.
    fn pending_vector(&self, vcpu: u32) -> Option<u8>;
    /// The vCPU accepted `vector` (IRR -> ISR) and is about to deliver it through the IDT.
    fn ack(&self, vcpu: u32, vector: u8);
    /// A pending NMI for `vcpu`, consumed by this call.
    fn take_nmi(&self, vcpu: u32) -> bool;
    /// A pending INIT or SIPI for `vcpu`, consumed by this call.
    fn take_startup(&self, vcpu: u32) -> Option<StartupEvent>;
    /// Read of the xAPIC register page (`offset` within the 4 KiB page at the APIC base).
    fn apic_read(&self, vcpu: u32, offset: u64, data: &mut [u8]);
    /// Write to the xAPIC register page.
    fn apic_write(&self, vcpu: u32, offset: u64, data: &[u8]);
    /// The guest wrote CR8 (task priority, 4 bits).
    fn set_tpr(&self, vcpu: u32, tpr: u8);
    /// Block for at most `timeout` until something may be pending for `vcpu` (HLT with
    /// interrupts enabled, or wait-for-SIPI). May return early and spuriously.
    fn wait(&self, vcpu: u32, timeout: Duration);
    /// Have `f` called (on the sender's thread, quickly) whenever `vcpu` gets something to
    /// act on (an interrupt, NMI, INIT, SIPI), so a running vCPU stops its batch at once
    /// instead of at its end. The default never calls it: events then wait for the batch's
    /// end (`vcpu::BATCH` instructions).
    fn set_notifier(&self, vcpu: u32, f: Arc<dyn Fn() + Send + Sync>) {
        let _ = (vcpu, f);
    }
    /// An interrupt line to GSI `gsi`, so `EmuVm::irq_line` can hand it to devices as the
    /// KVM backend does. The default (no lines) keeps `irq_line` returning `Unsupported`.
    fn irq_line(&self, gsi: u32) -> Option<Arc<dyn IrqLine>> {
        let _ = gsi;
        None
    }
    /// A new MSI line, for `EmuVm::msi_line`. Default: none.
    fn msi_line(&self) -> Option<Arc<dyn MsiLine>> {
        None
    }
    /// Add vCPU `vcpu`'s part of the controller to a snapshot: the local APIC page, a pending
    /// NMI (`events.nmi_pending`), a pending INIT/SIPI (`mp_state`), IA32_TSC_DEADLINE.
    fn save_vcpu(&self, vcpu: u32, state: &mut kvmbox_cpu::VcpuState) {
        let _ = (vcpu, state);
    }
    /// Load vCPU `vcpu`'s part from a snapshot (see [`InterruptController::save_vcpu`]).
    fn restore_vcpu(&self, vcpu: u32, state: &kvmbox_cpu::VcpuState) -> Result<(), String> {
        let _ = (vcpu, state);
        Ok(())
    }
}

/// MSRs the engine does not implement itself (e.g. the KVM paravirtual clock), handled by
/// the VMM or the interrupt controller. Consulted only for indices the engine does not know.
pub trait MsrHandler: Send + Sync {
    /// RDMSR of `index` on `vcpu`; `None` makes the guest's RDMSR raise #GP.
    fn read_msr(&self, vcpu: u32, index: u32) -> Option<u64>;
    /// WRMSR; `false` makes the guest's WRMSR raise #GP.
    fn write_msr(&self, vcpu: u32, index: u32, value: u64) -> bool;
}
