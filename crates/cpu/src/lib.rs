//! CPU backends for kvmbox.
//!
//! One [`Vm`] / [`Vcpu`] trait pair sits in front of every way kvmbox can run guest code:
//! hardware KVM ([`kvm`]) and the software engine (crate `kvmbox-emu`). Devices never see
//! which backend runs the guest: every port and MMIO access reaches them through the
//! [`IoHandler`] the VMM passes to [`Vcpu::run`], and every interrupt through an [`IrqLine`].

mod dirty;
pub mod kvm;
mod regs;
pub mod state;
pub mod watch;

pub use dirty::{bitmap as region_dirty_bitmap, DirtyLog, DirtyRegion, DIRTY_PAGE_SIZE};
pub use regs::{CpuidEntry, DescriptorTable, Regs, Segment, SpecialRegs};
pub use state::{check_cpuid_compatible, portable_cpuid, VcpuState};

use std::sync::Arc;

/// Guest memory as every backend, device and loader sees it: vm-memory's mmap backend with a
/// dirty-page bitmap per region, which vm-memory sets on every write the VMM makes through it
/// (virtio DMA, firmware loads) and the software engine sets on its own writes (see
/// [`Vm::start_dirty_log`]); the same bitmap reports those writes to the software engine's
/// translated code pages ([`watch`]).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<watch::GuestBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<watch::GuestBitmap>;

/// Errors a CPU backend reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An ioctl on /dev/kvm, the VM or a vCPU failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The backend cannot do what was asked (a limit, a missing capability).
    #[error("{0}")]
    Unsupported(String),
    /// The guest did something the backend cannot continue from; the vCPU stops.
    #[error("guest error: {0}")]
    Guest(String),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Where a guest's port and MMIO accesses go. The VMM implements this with its device bus.
///
/// Both backends call it from the vCPU's own thread, in the middle of the instruction that
/// made the access, so reads return the device's answer to that very instruction.
pub trait IoHandler: Sync {
    /// A port read of `data.len()` bytes (1, 2 or 4).
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// A port write.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// A read of guest-physical `addr` that is not guest RAM.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// A write to guest-physical `addr` that is not guest RAM.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why [`Vcpu::run`] returned. Port and MMIO accesses never show up here: the backend hands
/// them to the [`IoHandler`] and keeps running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// The vCPU executed HLT with interrupts disabled and nothing can wake it (or the backend
    /// has no interrupt controller of its own).
    Halted,
    /// Triple fault or an equivalent shutdown condition: on a PC this resets the machine.
    Shutdown,
    /// The guest asked for a system reset through the hypervisor (KVM_SYSTEM_EVENT_RESET).
    Reset,
    /// The guest asked for power-off through the hypervisor (KVM_SYSTEM_EVENT_SHUTDOWN).
    PowerOff,
    /// [`VcpuKicker::kick`] interrupted the run; the VMM checks its own state and may run again.
    Kicked,
}

/// Static facts a vCPU is configured with before it first runs.
#[derive(Debug, Clone)]
pub struct VcpuConfig {
    /// This vCPU's index (also its initial APIC ID).
    pub id: u32,
    /// How many vCPUs the VM has (for CPUID topology).
    pub count: u32,
}

/// Interrupts a running vCPU from another thread, so the VMM can pause or stop it.
pub trait VcpuKicker: Send + Sync {
    /// Make the vCPU's current or next [`Vcpu::run`] return [`VcpuExit::Kicked`] promptly.
    fn kick(&self);
}

/// One virtual CPU. Owned by, and run on, one host thread.
pub trait Vcpu: Send {
    /// Set up CPUID, MSRs, FPU and local APIC as the backend requires for a PC guest.
    fn configure(&mut self, cfg: &VcpuConfig) -> Result<()>;
    /// General-purpose registers, RIP and RFLAGS.
    fn regs(&self) -> Result<Regs>;
    /// Set general-purpose registers, RIP and RFLAGS.
    fn set_regs(&mut self, regs: &Regs) -> Result<()>;
    /// Segment, descriptor-table and control registers, EFER, APIC base.
    fn sregs(&self) -> Result<SpecialRegs>;
    /// Set segment, descriptor-table and control registers.
    fn set_sregs(&mut self, sregs: &SpecialRegs) -> Result<()>;
    /// Write model-specific registers (index, value).
    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<()>;
    /// The CPUID table this vCPU shows the guest.
    fn cpuid(&self) -> Result<Vec<CpuidEntry>>;
    /// Mark this vCPU as an application processor that waits for INIT/SIPI before running.
    fn set_wait_for_sipi(&mut self) -> Result<()>;
    /// Run guest code until something the VMM must handle happens.
    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit>;
    /// A handle that interrupts [`Vcpu::run`] from another thread.
    fn kicker(&self) -> Arc<dyn VcpuKicker>;
    /// Show the guest this CPUID table instead of the backend's own (before the first run):
    /// `--cpu-model portable` and restores use it. Refused when the backend cannot offer a
    /// feature the table lists.
    fn set_cpuid(&mut self, entries: &[CpuidEntry]) -> Result<()>;
    /// Everything the guest can observe about this vCPU. Called on the vCPU's own thread,
    /// between [`Vcpu::run`] calls.
    fn save_state(&mut self) -> Result<VcpuState>;
    /// Load a state saved by [`Vcpu::save_state`] on either backend, into a vCPU that was
    /// created and configured (with the same id and count) but has not run. Nothing is
    /// changed when the state is refused (a CPUID this backend cannot offer).
    fn restore_state(&mut self, state: &VcpuState) -> Result<()>;
}

/// An interrupt line into the guest's interrupt controllers (a GSI).
pub trait IrqLine: Send + Sync {
    /// Raise an edge-triggered interrupt (raise and lower the line).
    fn trigger(&self) -> std::io::Result<()>;
    /// Drive a level-triggered line.
    fn set_level(&self, high: bool) -> std::io::Result<()>;
}

/// A message-signalled interrupt (MSI / MSI-X vector) into the guest.
pub trait MsiLine: Send + Sync {
    /// Program the message the device sends (as the guest wrote it into the MSI-X table).
    fn set_message(&self, addr: u64, data: u32) -> std::io::Result<()>;
    /// Send the programmed message.
    fn trigger(&self) -> std::io::Result<()>;
}

/// The interrupt controllers kvmbox models in user space for every backend: the IOAPIC and
/// the 8259 pair (crate `kvmbox-irqchip`; on the software engine the same object also holds
/// the local APICs). A backend whose local APICs live elsewhere (KVM's in-kernel ones with a
/// split irqchip) gets devices' lines from it, hands it the EOIs of level-triggered vectors
/// and takes the PIC's ExtINT vectors from it.
pub trait PlatformIrq: Send + Sync {
    /// An interrupt line to global system interrupt `gsi` (IOAPIC pin; 0-15 also reach the PIC).
    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>>;
    /// A local APIC signalled the EOI of `vector` to the IOAPIC (a level-triggered vector the
    /// IOAPIC delivered, or one whose pin has an acknowledge notifier, such as the PIT's):
    /// clear its remote IRR and deliver again while the line is still high.
    fn eoi(&self, vector: u8);
    /// Whether the PIC's INTR output is raised (an ExtINT waits for the boot CPU).
    fn extint_pending(&self) -> bool;
    /// The interrupt-acknowledge cycle: the PIC's vector to inject now, if it still has one.
    fn extint_ack(&self) -> Option<u8>;
}

/// Where a [`PlatformIrq`] sends what it delivers to local APICs that are not its own
/// (implemented by a backend with its own LAPICs, e.g. KVM's split irqchip).
pub trait LapicBus: Send + Sync {
    /// Deliver the message an IOAPIC pin produced, in MSI form (`addr` 0xfeeX_XXXX, `data`
    /// with vector, delivery mode, level-assert and trigger-mode bits).
    fn send_msi(&self, addr: u64, data: u32);
    /// The IOAPIC's redirection table changed: `routes[pin]` is the message pin `pin` sends,
    /// in the same form (so the backend learns which vectors are level-triggered and must
    /// report their EOIs).
    fn set_ioapic_routes(&self, routes: &[(u64, u32)]);
    /// The PIC's INTR output is raised: get the boot CPU to call
    /// [`PlatformIrq::extint_ack`] when it can take an external interrupt.
    fn extint_raised(&self);
}

/// Where a guest write can signal an eventfd without a trip through the VMM's bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoEventAddress {
    /// A port.
    Pio(u16),
    /// A guest-physical MMIO address.
    Mmio(u64),
}

/// A virtual machine: guest memory, interrupt controllers and vCPUs of one backend.
pub trait Vm: Send + Sync {
    /// Backend name for messages ("kvm", "emu").
    fn name(&self) -> &'static str;
    /// Create vCPU `id`. Called once per vCPU, in order, from the VMM thread.
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// An interrupt line to global system interrupt `gsi` (IOAPIC pin; 0-15 also reach the PIC).
    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>>;
    /// A new MSI line (on KVM: a GSI routed as MSI, with an irqfd).
    fn msi_line(&self) -> Result<Arc<dyn MsiLine>>;
    /// Have guest writes of `datamatch` (any value when `None`) to `addr` signal `fd` directly
    /// (KVM ioeventfd). Backends without such a shortcut return `Unsupported`; the write then
    /// reaches the device through the bus as usual, so devices must handle both.
    fn register_ioevent(
        &self,
        fd: &vmm_sys_util::eventfd::EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()>;
    /// The largest vCPU count this backend supports.
    fn max_vcpus(&self) -> u32;
    /// The descriptor that keeps this VM alive in the kernel, if it has one (KVM's VM fd):
    /// when kvmbox exits it hands the VM's release to a short-lived child process, so that
    /// the kernel's teardown is not on its own exit path (`kvmbox_vmm::Ended::exit_process`).
    fn kernel_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The VM-wide guest clock a snapshot carries, in nanoseconds (KVM's kvmclock,
    /// KVM_GET_CLOCK); `None` where the backend keeps time per vCPU only.
    fn clock_ns(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Set the VM-wide guest clock on restore (KVM_SET_CLOCK), so guest time continues from
    /// the saved value instead of jumping.
    fn set_clock_ns(&self, ns: u64) -> Result<()> {
        let _ = ns;
        Ok(())
    }
    /// Start logging which guest-RAM pages are written, by the guest (KVM's dirty log; the
    /// engine's own marks) and by the VMM (vm-memory's bitmaps, which run from the memory's
    /// creation) alike. Called before the guest first runs, the log then holds every page
    /// written since the guest memory was created or mapped from a snapshot file, until the
    /// next [`Vm::take_dirty_log`]. Idempotent.
    fn start_dirty_log(&self) -> Result<()>;
    /// Whether [`Vm::start_dirty_log`] was called.
    fn dirty_log_active(&self) -> bool;
    /// The pages written since the log was started or last taken; taking clears it. Refused
    /// when the log was not started. Exact when the vCPUs are paused (snapshots). With
    /// running vCPUs (live migration), on KVM a page written during the call is in this log
    /// or the next; the engine's vCPUs drop their write translations at their next run-loop
    /// check after the call, so pages must be read only after every vCPU has been kicked and
    /// has run again.
    fn take_dirty_log(&self) -> Result<DirtyLog>;
}

/// Which CPU backend runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// kvmbox's software x86-64 engine.
    Emu,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "emu" => Ok(Accel::Emu),
            other => Err(format!(
                "unknown accelerator '{other}' (expected kvm or emu)"
            )),
        }
    }
}

/// Guest memory as every backend sees it.
pub type GuestMemory = GuestMemoryMmap;
