//! kvmbox interrupt controllers for the software CPU engine: a local APIC per vCPU, the
//! IOAPIC and the 8259 PIC pair, in user space (KVM keeps its in-kernel ones).
//!
//! # Pieces
//! - [`Lapic`], [`IoApic`], [`Pic`]: pure state machines; time is passed in as `now`
//!   (nanoseconds of the VM's [`Clock`]), so they unit-test deterministically.
//! - [`IrqChip`]: one VM's controllers behind one lock, wired like a PC: GSIs 0-15 reach the
//!   PIC and the IOAPIC (IRQ 0 on IOAPIC pin 2), 16-23 the IOAPIC; IOAPIC and MSI messages
//!   go to the addressed LAPICs; ICR writes send IPIs; LAPIC EOIs of level-triggered
//!   vectors go back to the IOAPIC. It hands out [`IrqLine`](kvmbox_cpu::IrqLine)s and
//!   [`MsiLine`](kvmbox_cpu::MsiLine)s so devices plug in as on KVM, and bus devices for the
//!   PIC ports and the IOAPIC page ([`IrqChip::attach`]).
//! - [`VcpuIrq`]: what a vCPU thread of the engine uses.
//! - [`time`]: CPUID leaves 0x15/0x16 so Linux trusts the TSC and the APIC timer rate.
//! - With feature `emu`: `impl kvmbox_emu::InterruptController for IrqChip`, the engine's
//!   own polling interface (peek with `pending_vector`, commit with `ack(vector)`).
//!
//! # How the engine drives a vCPU
//! ```no_run
//! # use std::sync::Arc;
//! # use kvmbox_irqchip::{IrqChip, Wake};
//! # use kvmbox_devices::legacy::pit::HostClock;
//! let chip = IrqChip::new(2, Arc::new(HostClock::new()), 2_000_000_000).unwrap();
//! let irq = chip.vcpu(1).unwrap();
//! irq.set_wait_for_sipi(); // an AP
//! # let (mut rflags_if, mut halted, mut shadow) = (false, false, false);
//! loop {
//!     // Every few instructions (or when the notifier fired):
//!     if irq.has_events(rflags_if) {
//!         if irq.take_init() { /* reset CPU state; it now waits for a SIPI */ }
//!         if let Some(v) = irq.take_sipi() { /* CS = v << 8, IP = 0, run */ }
//!         if irq.take_nmi() { /* deliver NMI (vector 2) */ }
//!         if rflags_if && !shadow {
//!             if let Some(v) = irq.ack() { /* deliver vector v */ halted = false; }
//!         }
//!     }
//!     if halted || irq.waiting_for_sipi() {
//!         match irq.wait(rflags_if, None) {
//!             Wake::Kicked => break, // the VMM wants the vCPU back
//!             _ => continue,
//!         }
//!     }
//!     // ... execute instructions; APIC page accesses at irq.apic_mmio_base() go to
//!     // irq.mmio_read/mmio_write, MSRs 0x1b, 0x6e0 and 0x800-0x8ff to irq.read_msr/
//!     // write_msr (Error::GeneralProtection = inject #GP), CR8 to irq.cr8/set_cr8,
//!     // RDTSC to irq.guest_tsc().
//! #   break;
//! }
//! ```
//! The PIT and RTC live in `kvmbox_devices::legacy::{pit, rtc}`; give them
//! [`IrqChip::irq_line`]`(0)` / `(8)` and the chip's [`IrqChip::clock`].

pub mod chip;
#[cfg(feature = "emu")]
pub mod emu;
pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod time;

pub use chip::{IoApicDevice, IrqChip, PicDevice, VcpuIrq, Wake, MAX_VCPUS};
pub use ioapic::{IoApic, IOAPIC_MMIO_SIZE, IOAPIC_PINS};
pub use kvmbox_devices::legacy::pit::Clock;
pub use lapic::{
    Action, DeliveryMode, IrqMessage, Lapic, MpState, Shorthand, APIC_BUS_HZ, MSR_APIC_BASE,
    MSR_TSC_DEADLINE,
};
pub use pic::Pic;

/// Errors of the interrupt controllers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VM asked for an unsupported number of vCPUs.
    #[error("{0} vCPUs is out of range for the software interrupt controller (1..=255)")]
    VcpuCount(u32),
    /// A zero TSC frequency.
    #[error("the guest TSC frequency must be above 0 Hz")]
    TscHz,
    /// No such vCPU.
    #[error("no vCPU {0} in this VM")]
    NoVcpu(u32),
    /// A GSI the IOAPIC does not have.
    #[error("GSI {0} is not an IOAPIC pin (0..24)")]
    BadGsi(u32),
    /// The MSR is not one of the interrupt controller's; the engine handles it elsewhere.
    #[error("MSR {0:#x} is not an interrupt-controller MSR")]
    NotApicMsr(u32),
    /// The guest's MSR access faults: the engine injects #GP.
    #[error("guest access to MSR {msr:#x} faults: {why}")]
    GeneralProtection {
        /// The MSR.
        msr: u32,
        /// Why it faults.
        why: &'static str,
    },
    /// Putting a controller on the bus failed.
    #[error("cannot attach interrupt controller: {0}")]
    Bus(#[from] kvmbox_devices::BusError),
}

/// Whether `msr` belongs to the interrupt controller (APIC base, TSC deadline, x2APIC).
pub fn is_irqchip_msr(msr: u32) -> bool {
    matches!(
        msr,
        MSR_APIC_BASE | MSR_TSC_DEADLINE | lapic::MSR_X2APIC_FIRST..=lapic::MSR_X2APIC_LAST
    )
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_lapic_bus;
