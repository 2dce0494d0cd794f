//! kvmbox's software x86-64 CPU engine.
//!
//! [`EmuVm`] implements [`kvmbox_cpu::Vm`] and its vCPUs ([`EmuVcpu`]) implement
//! [`kvmbox_cpu::Vcpu`]: instructions are decoded with iced-x86 and executed against the guest's
//! mmap'd RAM; port I/O and MMIO go to the VMM's [`kvmbox_cpu::IoHandler`] inline. The engine
//! knows nothing about devices. Interrupts come from an [`InterruptController`] (the local APIC
//! / IOAPIC / PIC of crate `kvmbox-irqchip`) that the vCPUs poll at instruction boundaries.
//!
//! Layout: `state.rs` (architectural state), `mem.rs` (guest-physical access, atomics),
//! `mmu.rs` (page walker + TLB), `cpu.rs` (segmentation, fetch/decode, decoded-instruction
//! cache), `exec/` (semantics by concern), `interrupt.rs` (IDT delivery), `cpuid.rs` (CPU
//! model), `vcpu.rs` (run loop and the trait impl).
//!
//! The rest of this page is the crate's README: design, API, the CPU model, what is
//! implemented, the differential-test coverage table and the benchmark.
#![doc = include_str!("../README.md")]

pub mod cpu;
pub mod cpuid;
pub mod exec;
pub mod fuzz;
pub mod interrupt;
pub mod irq;
mod jit;
pub mod mem;
pub mod mmu;
pub mod persist;
pub mod pvclock;
pub mod state;
mod table;
pub mod vcpu;

pub use cpu::Stats;
pub use irq::{InterruptController, MsrHandler, StartupEvent};
pub use jit::threshold_from_env as jit_threshold_from_env;
pub use pvclock::{KvmClock, SharedKvmClock};
pub use state::CpuState;
pub use vcpu::{EmuVcpu, BATCH};

use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_cpu::{IoEventAddress, IrqLine, MsiLine, Vcpu, Vm};
use std::sync::{Arc, RwLock};

/// Errors of the engine's own API (the trait methods use `kvmbox_cpu::Error`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vCPU index beyond what the engine supports.
    #[error("vCPU index {0} is out of range (the emu engine supports at most {1} vCPUs)")]
    VcpuIndex(u32, u32),
}

impl From<Error> for kvmbox_cpu::Error {
    fn from(e: Error) -> Self {
        kvmbox_cpu::Error::Unsupported(e.to_string())
    }
}

/// Most vCPUs one VM may have (xAPIC IDs are 8 bits).
pub const MAX_VCPUS: u32 = 255;

/// A VM run by the software engine. vCPUs share the guest memory.
pub struct EmuVm {
    phys: mem::PhysMem,
    irq: RwLock<Option<Arc<dyn InterruptController>>>,
    msr: RwLock<Option<Arc<dyn MsrHandler>>>,
    cpuid_overrides: RwLock<Vec<kvmbox_cpu::CpuidEntry>>,
    kvm_clock: RwLock<Option<SharedKvmClock>>,
}

impl EmuVm {
    /// A VM over `mem`.
    pub fn new(mem: GuestMemoryMmap) -> EmuVm {
        EmuVm {
            phys: mem::PhysMem::new(mem),
            irq: RwLock::new(None),
            msr: RwLock::new(None),
            cpuid_overrides: RwLock::new(Vec::new()),
            kvm_clock: RwLock::new(None),
        }
    }

    /// Offer the guest kvm-clock (KVM's paravirtual clock, see [`pvclock`]) with system time
    /// starting now, for a guest TSC (the host's) running at `tsc_hz`; `tsc_stable` when the
    /// host TSC is invariant. Call before creating vCPUs.
    pub fn enable_kvm_clock(&self, tsc_hz: u64, tsc_stable: bool) {
        *self.kvm_clock.write().unwrap_or_else(|e| e.into_inner()) = Some(SharedKvmClock::new(
            KvmClock::starting_now(tsc_hz, tsc_stable),
        ));
    }

    /// The VM's kvm-clock, if offered, as it is now.
    pub fn kvm_clock(&self) -> Option<KvmClock> {
        self.shared_kvm_clock().map(|c| c.get())
    }

    fn shared_kvm_clock(&self) -> Option<SharedKvmClock> {
        self.kvm_clock
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Handle MSRs the engine does not implement (e.g. kvmclock) in `h`. Call before
    /// creating vCPUs.
    pub fn set_msr_handler(&self, h: Arc<dyn MsrHandler>) {
        *self.msr.write().unwrap_or_else(|e| e.into_inner()) = Some(h);
    }

    /// Add or replace CPUID entries of every vCPU created afterwards (applied by
    /// `Vcpu::configure`), e.g. TSC-frequency or paravirtual-clock leaves. Only advertise
    /// what the engine, the interrupt controller or the MSR handler implements.
    pub fn set_cpuid_overrides(&self, entries: Vec<kvmbox_cpu::CpuidEntry>) {
        *self
            .cpuid_overrides
            .write()
            .unwrap_or_else(|e| e.into_inner()) = entries;
    }

    /// Attach the interrupt controller. vCPUs created afterwards poll it (and advertise an
    /// APIC in CPUID); call before creating vCPUs.
    pub fn set_interrupt_controller(&self, irq: Arc<dyn InterruptController>) {
        *self.irq.write().unwrap_or_else(|e| e.into_inner()) = Some(irq);
    }

    /// Create vCPU `id` as the concrete engine type (tests and tools use its extra methods).
    pub fn create_emu_vcpu(&self, id: u32) -> Result<EmuVcpu, Error> {
        if id >= MAX_VCPUS {
            return Err(Error::VcpuIndex(id, MAX_VCPUS));
        }
        let mut c = cpu::Cpu::new(self.phys.clone(), id);
        c.irq = self.irq.read().unwrap_or_else(|e| e.into_inner()).clone();
        c.notify_attention();
        c.msr_hook = self.msr.read().unwrap_or_else(|e| e.into_inner()).clone();
        c.cpuid_overrides = self
            .cpuid_overrides
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        c.kvm_clock = self.shared_kvm_clock();
        c.cpuid = cpuid::build(
            id,
            1,
            c.irq.is_some(),
            c.kvm_clock.is_some(),
            &c.cpuid_overrides,
        );
        Ok(EmuVcpu::new(c))
    }
}

impl Vm for EmuVm {
    fn name(&self) -> &'static str {
        "emu"
    }

    fn create_vcpu(&self, id: u32) -> kvmbox_cpu::Result<Box<dyn Vcpu>> {
        Ok(Box::new(self.create_emu_vcpu(id)?))
    }

    fn irq_line(&self, gsi: u32) -> kvmbox_cpu::Result<Arc<dyn IrqLine>> {
        let irq = self.irq.read().unwrap_or_else(|e| e.into_inner()).clone();
        irq.and_then(|c| c.irq_line(gsi)).ok_or_else(|| {
            kvmbox_cpu::Error::Unsupported(format!(
                "the emu engine has no interrupt controller that provides GSI {gsi} (attach kvmbox-irqchip with EmuVm::set_interrupt_controller)"
            ))
        })
    }

    fn msi_line(&self) -> kvmbox_cpu::Result<Arc<dyn MsiLine>> {
        let irq = self.irq.read().unwrap_or_else(|e| e.into_inner()).clone();
        irq.and_then(|c| c.msi_line()).ok_or_else(|| {
            kvmbox_cpu::Error::Unsupported(
                "the emu engine has no interrupt controller that provides MSI lines (attach kvmbox-irqchip with EmuVm::set_interrupt_controller)".into(),
            )
        })
    }

    fn register_ioevent(
        &self,
        _fd: &vmm_sys_util::eventfd::EventFd,
        _addr: IoEventAddress,
        _datamatch: Option<u32>,
    ) -> kvmbox_cpu::Result<()> {
        Err(kvmbox_cpu::Error::Unsupported(
            "the emu engine has no ioeventfd shortcut; writes reach devices through the bus".into(),
        ))
    }

    fn max_vcpus(&self) -> u32 {
        MAX_VCPUS
    }

    /// kvm-clock's system time now: what a snapshot carries as the VM's clock (the same
    /// quantity as KVM's KVM_GET_CLOCK, so a snapshot moves between the backends).
    fn clock_ns(&self) -> kvmbox_cpu::Result<Option<u64>> {
        Ok(self.kvm_clock().map(|c| c.system_time_at(exec::host_tsc())))
    }

    /// Continue kvm-clock from a snapshot's `ns` (a new process's host TSC has nothing to do
    /// with the old one's origin). Call before restoring the vCPUs: their kvm-clock MSRs
    /// rewrite the time records in guest memory with the new origin.
    fn set_clock_ns(&self, ns: u64) -> kvmbox_cpu::Result<()> {
        if let Some(c) = self.shared_kvm_clock() {
            c.update(|c| c.rebase(ns, exec::host_tsc()));
        }
        Ok(())
    }

    /// The engine marks its own writes in vm-memory's bitmaps, where the VMM's are
    /// (`mem::DirtyState`).
    fn start_dirty_log(&self) -> kvmbox_cpu::Result<()> {
        if !self.phys.dirty().on() {
            self.phys.dirty().start();
        }
        Ok(())
    }

    fn dirty_log_active(&self) -> bool {
        self.phys.dirty().on()
    }

    fn take_dirty_log(&self) -> kvmbox_cpu::Result<kvmbox_cpu::DirtyLog> {
        if !self.phys.dirty().on() {
            return Err(kvmbox_cpu::Error::Unsupported(
                "dirty-page logging is not on".into(),
            ));
        }
        // Clear first, then make the vCPUs drop their writable translations: a page written
        // through an old translation after the clear was marked when that translation was
        // made, so it is in this log.
        let log = kvmbox_cpu::DirtyLog::take_from_memory(self.phys.memory());
        self.phys.dirty().taken();
        Ok(log)
    }
}
