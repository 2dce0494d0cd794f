//! One KVM vCPU and how another thread interrupts it.

use super::regs::{regs_from_kvm, regs_to_kvm, sregs_from_kvm, sregs_into_kvm};
use super::{cpuid, kvm_err};
use crate::{
    CpuidEntry, Error, IoHandler, PlatformIrq, Regs, Result, SpecialRegs, Vcpu, VcpuConfig,
    VcpuExit, VcpuKicker,
};
use kvm_bindings::{
    kvm_fpu, kvm_interrupt, kvm_mp_state, kvm_msr_entry, kvm_run, CpuId, Msrs,
    KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use vmm_sys_util::ioctl::ioctl_with_ref;

// MSRs set at boot, as Firecracker and Cloud Hypervisor do.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

// Local APIC register offsets and LVT delivery modes (for LINT0 = ExtINT, LINT1 = NMI).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

thread_local! {
    /// The kvm_run page of the vCPU this thread runs, so the kick signal handler can set
    /// `immediate_exit` and close the race between checking the kick flag and KVM_RUN.
    static RUN_PAGE: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

static SIGNAL_SETUP: Once = Once::new();

// KVM_INTERRUPT (kvm-ioctls has no wrapper): with a split irqchip it queues an ExtINT vector
// for the in-kernel local APIC.
vmm_sys_util::ioctl_iow_nr!(KVM_INTERRUPT, kvm_bindings::KVMIO, 0x86, kvm_interrupt);

/// The signal that interrupts KVM_RUN.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let page = RUN_PAGE.with(Cell::get);
    if !page.is_null() {
        // SAFETY: the pointer was set by this very thread to its vCPU's kvm_run mapping, which
        // stays mapped while that thread is inside `KvmVcpu::run` (it clears the pointer on
        // the way out). A single byte store is async-signal-safe.
        unsafe { (*page).immediate_exit = 1 };
    }
}

fn install_kick_handler() -> Result<()> {
    let mut result = Ok(());
    SIGNAL_SETUP.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
            .map_err(kvm_err("installing the vCPU kick signal handler"));
    });
    result
}

pub(super) struct KvmKicker {
    kicked: AtomicBool,
    /// pthread_t of the thread running this vCPU (0 until it first runs).
    thread: AtomicU64,
}

impl KvmKicker {
    /// Get the vCPU out of KVM_RUN (or keep it from entering) without ending
    /// [`Vcpu::run`]: it looks at pending ExtINTs and enters the guest again.
    pub(super) fn nudge(&self) {
        let t = self.thread.load(Ordering::SeqCst);
        if t != 0 {
            // SAFETY: `t` is the pthread_t of a vCPU thread, recorded by that thread itself;
            // the VMM joins vCPU threads only after it stops kicking them, and the VM (whose
            // interrupt controller nudges) goes away after them. The signal has a handler
            // installed (install_kick_handler), so it cannot kill the process.
            unsafe { libc::pthread_kill(t as libc::pthread_t, kick_signal()) };
        }
    }
}

impl VcpuKicker for KvmKicker {
    fn kick(&self) {
        self.kicked.store(true, Ordering::SeqCst);
        self.nudge();
    }
}

/// A vCPU on KVM.
pub struct KvmVcpu {
    fd: VcpuFd,
    supported_cpuid: CpuId,
    tsc_deadline: bool,
    cpuid: Option<CpuId>,
    kicker: Arc<KvmKicker>,
    /// The user-space IOAPIC/PIC: takes this vCPU's level-triggered EOIs.
    platform: Option<Arc<dyn PlatformIrq>>,
    /// The boot CPU takes the PIC's ExtINTs (its LINT0 is the PIC's INTR input).
    bsp: bool,
}

impl KvmVcpu {
    pub(super) fn new(
        fd: VcpuFd,
        supported_cpuid: CpuId,
        tsc_deadline: bool,
        platform: Option<Arc<dyn PlatformIrq>>,
        bsp: bool,
    ) -> Self {
        Self {
            fd,
            supported_cpuid,
            tsc_deadline,
            cpuid: None,
            kicker: Arc::new(KvmKicker {
                kicked: AtomicBool::new(false),
                thread: AtomicU64::new(0),
            }),
            platform,
            bsp,
        }
    }

    pub(super) fn kick_handle(&self) -> Arc<KvmKicker> {
        self.kicker.clone()
    }

    /// Before entering the guest on the boot CPU: inject the PIC's pending ExtINT when KVM
    /// says the vCPU can take one (IF set, no interrupt shadow, LINT0 accepts it, none
    /// queued), and otherwise ask KVM to exit as soon as it can (as QEMU does with
    /// kernel-irqchip=split).
    fn inject_extint(&mut self) -> Result<()> {
        let Some(pic) = self.platform.as_ref().filter(|_| self.bsp) else {
            return Ok(());
        };
        let run = self.fd.get_kvm_run();
        let mut pending = pic.extint_pending();
        if pending && run.ready_for_interrupt_injection != 0 && run.if_flag != 0 {
            if let Some(vector) = pic.extint_ack() {
                let irq = kvm_interrupt {
                    irq: u32::from(vector),
                };
                // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from the pointer, which is a
                // live local of the right type; the fd is this vCPU's.
                let ret = unsafe { ioctl_with_ref(&self.fd, KVM_INTERRUPT(), &irq) };
                if ret < 0 {
                    return Err(kvm_err("KVM_INTERRUPT")(vmm_sys_util::errno::Error::last()));
                }
            }
            pending = pic.extint_pending();
        }
        self.fd.get_kvm_run().request_interrupt_window = u8::from(pending);
        Ok(())
    }

    /// The vCPU fd, for KVM-specific state (snapshots).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn set_lint(&self) -> Result<()> {
        let mut lapic = self.fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let mut bytes = [0u8; 4];
            for (b, r) in bytes.iter_mut().zip(&lapic.regs[off..off + 4]) {
                *b = *r as u8;
            }
            let v = u32::from_le_bytes(bytes);
            let v = (v & !0x700) | (mode << 8);
            for (r, b) in lapic.regs[off..off + 4].iter_mut().zip(v.to_le_bytes()) {
                *r = b as libc::c_char;
            }
        }
        self.fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
    }

    fn handle(
        exit: KvmExit<'_>,
        io: &dyn IoHandler,
        io_size: usize,
        platform: Option<&Arc<dyn PlatformIrq>>,
    ) -> Result<Option<VcpuExit>> {
        match exit {
            KvmExit::IoIn(port, data) => {
                for chunk in data.chunks_mut(io_size.max(1)) {
                    io.pio_read(port, chunk);
                }
                Ok(None)
            }
            KvmExit::IoOut(port, data) => {
                for chunk in data.chunks(io_size.max(1)) {
                    io.pio_write(port, chunk);
                }
                Ok(None)
            }
            KvmExit::MmioRead(addr, data) => {
                io.mmio_read(addr, data);
                Ok(None)
            }
            KvmExit::MmioWrite(addr, data) => {
                io.mmio_write(addr, data);
                Ok(None)
            }
            KvmExit::IoapicEoi(vector) => {
                if let Some(p) = platform {
                    p.eoi(vector);
                }
                Ok(None)
            }
            KvmExit::Hlt => Ok(Some(VcpuExit::Halted)),
            KvmExit::Shutdown => Ok(Some(VcpuExit::Shutdown)),
            KvmExit::SystemEvent(kind, _) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Ok(Some(VcpuExit::PowerOff)),
                KVM_SYSTEM_EVENT_RESET => Ok(Some(VcpuExit::Reset)),
                KVM_SYSTEM_EVENT_CRASH => Err(Error::Guest("guest crashed (system event)".into())),
                other => Err(Error::Guest(format!("unknown KVM system event {other}"))),
            },
            KvmExit::FailEntry(reason, cpu) => Err(Error::Guest(format!(
                "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
            ))),
            KvmExit::InternalError => Err(Error::Guest(
                "KVM internal error (the guest ran something KVM cannot emulate)".into(),
            )),
            KvmExit::Intr => Ok(Some(VcpuExit::Kicked)),
            KvmExit::IrqWindowOpen | KvmExit::Unknown => Ok(None),
            other => Err(Error::Guest(format!("unexpected KVM exit {other:?}"))),
        }
    }
}

impl Vcpu for KvmVcpu {
    fn configure(&mut self, cfg: &VcpuConfig) -> Result<()> {
        let mut table = self.supported_cpuid.clone();
        cpuid::patch(&mut table, cfg.id, cfg.count, self.tsc_deadline)
            .map_err(Error::Unsupported)?;
        self.fd
            .set_cpuid2(&table)
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        self.cpuid = Some(table);

        let boot_msrs = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
            (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
        ];
        self.set_msrs(&boot_msrs)?;

        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        self.set_lint()
    }

    fn regs(&self) -> Result<Regs> {
        let r = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        Ok(regs_from_kvm(&r))
    }

    fn set_regs(&mut self, regs: &Regs) -> Result<()> {
        self.fd
            .set_regs(&regs_to_kvm(regs))
            .map_err(kvm_err("KVM_SET_REGS"))
    }

    fn sregs(&self) -> Result<SpecialRegs> {
        let s = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        Ok(sregs_from_kvm(&s))
    }

    fn set_sregs(&mut self, sregs: &SpecialRegs) -> Result<()> {
        let mut k = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        sregs_into_kvm(sregs, &mut k);
        self.fd.set_sregs(&k).map_err(kvm_err("KVM_SET_SREGS"))
    }

    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let table = Msrs::from_entries(&entries)
            .map_err(|_| Error::Unsupported("too many MSRs in one call".into()))?;
        let written = self.fd.set_msrs(&table).map_err(kvm_err("KVM_SET_MSRS"))?;
        if written != entries.len() {
            return Err(Error::Unsupported(format!(
                "KVM refused MSR {:#x}",
                entries[written].index
            )));
        }
        Ok(())
    }

    fn cpuid(&self) -> Result<Vec<CpuidEntry>> {
        let table = self.cpuid.as_ref().unwrap_or(&self.supported_cpuid);
        Ok(table
            .as_slice()
            .iter()
            .map(|e| CpuidEntry {
                function: e.function,
                index: e.index,
                significant_index: e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect())
    }

    fn set_wait_for_sipi(&mut self) -> Result<()> {
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_UNINITIALIZED,
            })
            .map_err(kvm_err("KVM_SET_MP_STATE"))
    }

    fn run(&mut self, io: &dyn IoHandler) -> Result<VcpuExit> {
        install_kick_handler()?;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as u64;
        self.kicker.thread.store(me, Ordering::SeqCst);
        let page: *mut kvm_run = self.fd.get_kvm_run();
        RUN_PAGE.with(|p| p.set(page));
        let result = loop {
            if self.kicker.kicked.swap(false, Ordering::SeqCst) {
                self.fd.set_kvm_immediate_exit(0);
                break Ok(VcpuExit::Kicked);
            }
            if let Err(e) = self.inject_extint() {
                break Err(e);
            }
            let platform = self.platform.clone();
            let outcome = match self.fd.run() {
                Ok(exit) => {
                    // SAFETY: `page` is this vCPU's kvm_run mapping; after an I/O exit the
                    // kernel has filled `io`, whose size field we read to split string I/O.
                    let io_size = unsafe { usize::from((*page).__bindgen_anon_1.io.size) };
                    Self::handle(exit, io, io_size, platform.as_ref())
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Ok(Some(VcpuExit::Kicked))
                }
                Err(e) => Err(kvm_err("KVM_RUN")(e)),
            };
            match outcome {
                Ok(None) => continue,
                Ok(Some(VcpuExit::Kicked)) => {
                    // A signal got us out: a kick ends this run; a nudge (an ExtINT for the
                    // boot CPU) only needs the injection check at the top of the loop.
                    self.fd.set_kvm_immediate_exit(0);
                    if self.kicker.kicked.swap(false, Ordering::SeqCst) {
                        break Ok(VcpuExit::Kicked);
                    }
                }
                Ok(Some(exit)) => break Ok(exit),
                Err(e) => break Err(e),
            }
        };
        RUN_PAGE.with(|p| p.set(std::ptr::null_mut()));
        result
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kicker.clone()
    }
}
