//! The KVM backend: a [`KvmVm`] owns the VM fd (with a split irqchip: local APICs in the kernel,
//! IOAPIC/PIC/PIT in user space), the GSI routing table and the guest memory slots; each
//! [`KvmVcpu`] owns one vCPU fd.

mod cpuid;
mod persist;
mod regs;
mod vcpu;

pub use vcpu::KvmVcpu;

use crate::GuestMemoryMmap;
use crate::{Error, IoEventAddress, IrqLine, LapicBus, MsiLine, PlatformIrq, Result, Vcpu, Vm};
use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_msi, kvm_userspace_memory_region, CpuId,
    KvmIrqRouting, KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Cap, Kvm, NoDatamatch, VmFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// KVM's API version that kvmbox speaks.
pub const KVM_API_VERSION: i32 = 12;
/// Where KVM puts the three-page TSS region that VMX needs (just below the IOAPIC/BIOS area).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// IOAPIC pins: GSIs 0-23 are routed as the user-space IOAPIC's messages (KVM reserves them
/// with KVM_CAP_SPLIT_IRQCHIP so it knows which vectors are level-triggered).
const IOAPIC_PINS: u32 = 24;

fn kvm_err(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
    move |e| Error::Kvm {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// For test suites: true when /dev/kvm can be opened. Otherwise prints one loud
/// `SKIP: <test>: ...` line to stderr, appends it to the file named by `KVMBOX_SKIP_LOG` (the
/// project's test script counts them) and returns false.
pub fn available_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            report_skip(
                test,
                &format!("/dev/kvm unavailable ({e}); this test needs KVM"),
            );
            false
        }
    }
}

/// The CPUID features this host's KVM can show a guest (KVM_GET_SUPPORTED_CPUID), for
/// [`crate::portable_cpuid`].
pub fn supported_cpuid() -> Result<Vec<crate::CpuidEntry>> {
    let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
    let table = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(vcpu::entries(&table))
}

/// For test suites: report a skipped test as [`available_or_skip`] does.
pub fn report_skip(test: &str, why: &str) {
    use std::io::Write;
    let line = format!("SKIP: {test}: {why}");
    eprintln!("{line}");
    if let Ok(log) = std::env::var("KVMBOX_SKIP_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(log)
        {
            // The log only feeds a count printed at the end; the line is on stderr anyway.
            let _ = writeln!(f, "{line}");
        }
    }
}

/// The capabilities without which kvmbox cannot run a PC guest on KVM.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::SplitIrqchip, "KVM_CAP_SPLIT_IRQCHIP"),
    (Cap::Hlt, "KVM_CAP_HLT"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
    (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// A VM on /dev/kvm with a split irqchip: the local APICs are KVM's, in the kernel; the IOAPIC,
/// the 8259 pair and the PIT are kvmbox's user-space models (a [`PlatformIrq`] attached with
/// [`KvmVm::set_platform_irq`]), the same ones the software engine uses.
///
/// Why not KVM's full in-kernel irqchip and PIT: creating them makes KVM wait for SRCU grace
/// periods when memory slots are set (~4 ms here) and when the VM is destroyed (up to ~14 ms in
/// `kvm_free_pit`), which is most of a tiny guest's run time; and with them the interrupt
/// controllers' state would differ between the two engines.
pub struct KvmVm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    supported_cpuid: CpuId,
    routes: Arc<Mutex<Routes>>,
    max_vcpus: u32,
    lapics: Arc<KvmLapics>,
    platform: OnceLock<Arc<dyn PlatformIrq>>,
    /// Guest memory (its vm-memory dirty bitmaps hold the VMM's writes) and the memory slots
    /// made from it, for the dirty log.
    mem: GuestMemoryMmap,
    slots: Mutex<Vec<kvm_userspace_memory_region>>,
    dirty_log: std::sync::atomic::AtomicBool,
}

struct Routes {
    table: Vec<kvm_irq_routing_entry>,
    next_gsi: u32,
}

impl KvmVm {
    /// Open /dev/kvm, check what kvmbox needs, create a VM with in-kernel local APICs and a
    /// user-space IOAPIC/PIC (KVM_CAP_SPLIT_IRQCHIP, 24 routes reserved for IOAPIC pins), and
    /// map `mem` into it. Attach the user-space controllers with [`KvmVm::set_platform_irq`]
    /// before creating vCPUs.
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| Error::Kvm {
            op: "open /dev/kvm",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(Error::Unsupported(format!(
                "/dev/kvm speaks API version {version}, kvmbox needs {KVM_API_VERSION}"
            )));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(Error::Unsupported(format!(
                    "this KVM lacks {name}, which kvmbox needs"
                )));
            }
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        let mut split = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        split.args[0] = u64::from(IOAPIC_PINS);
        fd.enable_cap(&split)
            .map_err(kvm_err("KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)"))?;

        let mut slots = Vec::new();
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: u32::try_from(slot)
                    .map_err(|_| Error::Unsupported("too many memory regions".into()))?,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the VMM keeps alive for
            // as long as the VM exists; its host address and length come from vm-memory.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
            slots.push(region_desc);
        }

        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let max_vcpus = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
        let fd = Arc::new(fd);
        // KVM starts with an empty routing table; ours is committed when it first changes.
        let routes = Arc::new(Mutex::new(Routes {
            table: (0..IOAPIC_PINS).map(|pin| msi_route(pin, 0, 0)).collect(),
            next_gsi: IOAPIC_PINS,
        }));
        Ok(KvmVm {
            kvm,
            lapics: Arc::new(KvmLapics {
                vm: fd.clone(),
                routes: routes.clone(),
                bsp: OnceLock::new(),
                failed: AtomicU64::new(0),
            }),
            fd,
            supported_cpuid,
            routes,
            max_vcpus,
            platform: OnceLock::new(),
            mem: mem.clone(),
            slots: Mutex::new(slots),
            dirty_log: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Where the user-space IOAPIC and PIC deliver to this VM's in-kernel local APICs.
    pub fn lapic_bus(&self) -> Arc<dyn LapicBus> {
        self.lapics.clone()
    }

    /// Attach the user-space IOAPIC/PIC that devices' lines reach ([`Vm::irq_line`]), that
    /// takes level-triggered EOIs and that supplies ExtINT vectors to the boot CPU. Call once,
    /// before creating vCPUs; a second call is refused.
    pub fn set_platform_irq(&self, irq: Arc<dyn PlatformIrq>) -> Result<()> {
        self.platform
            .set(irq)
            .map_err(|_| Error::Unsupported("the interrupt controller is already attached".into()))
    }

    /// How many interrupt messages or routing updates KVM refused so far.
    pub fn failed_interrupts(&self) -> u64 {
        self.lapics.failed.load(Ordering::Relaxed)
    }

    /// An eventfd that injects GSI `gsi` when written (KVM_IRQFD).
    fn irqfd(&self, gsi: u32) -> Result<EventFd> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Kvm {
            op: "eventfd",
            source: e,
        })?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))?;
        Ok(evt)
    }

    /// The VM fd, for KVM-specific features (dirty logging, clocks).
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The /dev/kvm handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }
}

/// Replace KVM's GSI routing table with `routes` (KVM_SET_GSI_ROUTING always takes the whole table).
fn commit_routes(fd: &VmFd, routes: &Routes) -> Result<()> {
    let mut table = KvmIrqRouting::new(0)
        .map_err(|_| Error::Unsupported("cannot build the GSI routing table".into()))?;
    for e in &routes.table {
        table
            .push(*e)
            .map_err(|_| Error::Unsupported("GSI routing table is full".into()))?;
    }
    fd.set_gsi_routing(&table)
        .map_err(kvm_err("KVM_SET_GSI_ROUTING"))
}

/// GSI `gsi` routed as the MSI `data` written to `addr`.
fn msi_route(gsi: u32, addr: u64, data: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = addr as u32;
    e.u.msi.address_hi = (addr >> 32) as u32;
    e.u.msi.data = data;
    e
}

/// Set the message of MSI route `gsi` in `routes`; true when it changed (and needs a commit).
fn update_msi_route(routes: &mut Routes, gsi: u32, addr: u64, data: u32) -> bool {
    let Some(entry) = routes.table.iter_mut().find(|e| e.gsi == gsi) else {
        return false;
    };
    let new = msi_route(gsi, addr, data);
    // SAFETY: every entry of this table is made by `msi_route`, as KVM_IRQ_ROUTING_MSI, so
    // `msi` is the live union field of both.
    let (old, want) = unsafe { (entry.u.msi, new.u.msi) };
    if (old.address_lo, old.address_hi, old.data) == (want.address_lo, want.address_hi, want.data) {
        return false;
    }
    *entry = new;
    true
}

/// The in-kernel local APICs as the user-space IOAPIC and PIC see them.
struct KvmLapics {
    vm: Arc<VmFd>,
    routes: Arc<Mutex<Routes>>,
    /// The boot CPU's kicker, for ExtINT (set when vCPU 0 is created).
    bsp: OnceLock<Arc<vcpu::KvmKicker>>,
    /// KVM_SIGNAL_MSI or KVM_SET_GSI_ROUTING calls KVM refused.
    failed: AtomicU64,
}

impl LapicBus for KvmLapics {
    fn send_msi(&self, addr: u64, data: u32) {
        let msi = kvm_msi {
            address_lo: addr as u32,
            address_hi: (addr >> 32) as u32,
            data,
            ..Default::default()
        };
        if self.vm.signal_msi(msi).is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn set_ioapic_routes(&self, pins: &[(u64, u32)]) {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for (pin, &(addr, data)) in (0..IOAPIC_PINS).zip(pins) {
            changed |= update_msi_route(&mut routes, pin, addr, data);
        }
        // A refused commit leaves KVM with the previous table: EOIs of a re-programmed
        // level-triggered pin may then not come back (the guest sees a stuck line), counted.
        if changed && commit_routes(&self.vm, &routes).is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn extint_raised(&self) {
        if let Some(k) = self.bsp.get() {
            k.nudge();
        }
    }
}

impl Vm for KvmVm {
    fn name(&self) -> &'static str {
        "kvm"
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let vcpu = KvmVcpu::new(
            fd,
            self.supported_cpuid.clone(),
            self.kvm.check_extension(Cap::TscDeadlineTimer),
            self.kvm
                .get_msr_index_list()
                .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
                .as_slice()
                .to_vec(),
            self.platform.get().cloned(),
            id == 0,
        );
        if id == 0 {
            // KVM refuses a second vCPU 0, so this is set once per VM.
            let _ = self.lapics.bsp.set(vcpu.kick_handle());
        }
        Ok(Box::new(vcpu))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        match self.platform.get() {
            Some(p) => p.irq_line(gsi),
            None => Err(Error::Unsupported(format!(
                "no user-space interrupt controller is attached for GSI {gsi} (KvmVm::set_platform_irq)"
            ))),
        }
    }

    fn msi_line(&self) -> Result<Arc<dyn MsiLine>> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        let gsi = routes.next_gsi;
        let max = u32::try_from(self.kvm.check_extension_int(Cap::IrqRouting)).unwrap_or(0);
        if gsi >= max {
            return Err(Error::Unsupported(format!(
                "out of GSIs for MSI routes (KVM allows {max})"
            )));
        }
        // Until the guest programs it, the message is all zeroes: not an APIC message
        // address, so KVM drops it.
        routes.table.push(msi_route(gsi, 0, 0));
        commit_routes(&self.fd, &routes)?;
        routes.next_gsi += 1;
        let evt = self.irqfd(gsi)?;
        Ok(Arc::new(KvmMsiLine {
            vm: self.fd.clone(),
            routes: self.routes.clone(),
            gsi,
            evt,
        }))
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let addr = match addr {
            IoEventAddress::Pio(p) => kvm_ioctls::IoEventAddress::Pio(u64::from(p)),
            IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
        };
        match datamatch {
            Some(v) => self.fd.register_ioevent(fd, &addr, v),
            None => self.fd.register_ioevent(fd, &addr, NoDatamatch),
        }
        .map_err(kvm_err("KVM_IOEVENTFD"))
    }

    fn max_vcpus(&self) -> u32 {
        self.max_vcpus
    }

    fn kernel_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        Some(self.fd.as_raw_fd())
    }

    fn clock_ns(&self) -> Result<Option<u64>> {
        let c = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        Ok(Some(c.clock))
    }

    fn set_clock_ns(&self, ns: u64) -> Result<()> {
        let c = kvm_bindings::kvm_clock_data {
            clock: ns,
            ..Default::default()
        };
        self.fd.set_clock(&c).map_err(kvm_err("KVM_SET_CLOCK"))
    }

    fn start_dirty_log(&self) -> Result<()> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if self.dirty_log.load(Ordering::SeqCst) {
            return Ok(());
        }
        for s in slots.iter_mut() {
            let logged = kvm_userspace_memory_region {
                flags: s.flags | KVM_MEM_LOG_DIRTY_PAGES,
                ..*s
            };
            // SAFETY: the same slot, host mapping (kept alive by `self.mem`) and size as
            // registered in `new`; only the flags change.
            unsafe { self.fd.set_user_memory_region(logged) }.map_err(kvm_err(
                "KVM_SET_USER_MEMORY_REGION(KVM_MEM_LOG_DIRTY_PAGES)",
            ))?;
            *s = logged;
        }
        self.dirty_log.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn dirty_log_active(&self) -> bool {
        self.dirty_log.load(Ordering::SeqCst)
    }

    fn take_dirty_log(&self) -> Result<crate::DirtyLog> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if !self.dirty_log.load(Ordering::SeqCst) {
            return Err(Error::Unsupported("dirty-page logging is not on".into()));
        }
        // KVM's log first: a page the VMM writes meanwhile is in vm-memory's bitmap, taken
        // after it.
        let mut kvm_logs = Vec::with_capacity(slots.len());
        for s in slots.iter() {
            let bits = self
                .fd
                .get_dirty_log(s.slot, s.memory_size as usize)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            kvm_logs.push((s.guest_phys_addr, bits));
        }
        let mut log = crate::DirtyLog::take_from_memory(&self.mem);
        for (start, bits) in kvm_logs {
            log.merge(start, &bits);
        }
        Ok(log)
    }
}

struct KvmMsiLine {
    vm: Arc<VmFd>,
    routes: Arc<Mutex<Routes>>,
    gsi: u32,
    evt: EventFd,
}

impl MsiLine for KvmMsiLine {
    fn set_message(&self, addr: u64, data: u32) -> std::io::Result<()> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if !update_msi_route(&mut routes, self.gsi, addr, data) {
            return Ok(());
        }
        commit_routes(&self.vm, &routes).map_err(std::io::Error::other)
    }

    fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}
