//! The KVM backend: a [`KvmVm`] owns the VM fd, the in-kernel irqchip and PIT, the GSI routing
//! table and the guest memory slots; each [`KvmVcpu`] owns one vCPU fd.

mod cpuid;
mod persist;
mod regs;
mod vcpu;

pub use vcpu::KvmVcpu;

use crate::{Error, IoEventAddress, IrqLine, MsiLine, Result, Vcpu, Vm};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region, CpuId, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, NoDatamatch, VmFd};
use std::sync::{Arc, Mutex};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// KVM's API version that kvmbox speaks.
pub const KVM_API_VERSION: i32 = 12;
/// Where KVM puts the three-page TSS region that VMX needs (just below the IOAPIC/BIOS area).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// IOAPIC pins of the in-kernel IOAPIC.
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
    (Cap::Hlt, "KVM_CAP_HLT"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// A VM on /dev/kvm with an in-kernel LAPIC/IOAPIC/PIC and PIT.
pub struct KvmVm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    supported_cpuid: CpuId,
    routes: Arc<Mutex<Routes>>,
    max_vcpus: u32,
}

struct Routes {
    table: Vec<kvm_irq_routing_entry>,
    next_gsi: u32,
}

impl KvmVm {
    /// Open /dev/kvm, check what kvmbox needs, create a VM with the in-kernel irqchip and PIT,
    /// and map `mem` into it.
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
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

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
        }

        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let max_vcpus = u32::try_from(kvm.get_max_vcpus()).unwrap_or(u32::MAX);
        let vm = KvmVm {
            kvm,
            fd: Arc::new(fd),
            supported_cpuid,
            routes: Arc::new(Mutex::new(Routes {
                table: default_routes(),
                next_gsi: IOAPIC_PINS,
            })),
            max_vcpus,
        };
        commit_routes(&vm.fd, &vm.routes.lock().unwrap_or_else(|e| e.into_inner()))?;
        Ok(vm)
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

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// The routing a PC has, as QEMU sets it up: ISA IRQs 0-15 go to both PICs (except the
/// cascade, 2) and to the IOAPIC, with IRQ 0 (PIT) on IOAPIC pin 2 to match the MADT's
/// interrupt source override; GSIs 16-23 only to the IOAPIC.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut t = Vec::new();
    for i in 0..16 {
        if i == 2 {
            continue;
        }
        let chip = if i < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        t.push(irqchip_route(i, chip, i % 8));
    }
    for i in 0..IOAPIC_PINS {
        match i {
            0 => t.push(irqchip_route(0, KVM_IRQCHIP_IOAPIC, 2)),
            2 => {}
            _ => t.push(irqchip_route(i, KVM_IRQCHIP_IOAPIC, i)),
        }
    }
    t
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
        Ok(Box::new(KvmVcpu::new(
            fd,
            self.supported_cpuid.clone(),
            self.kvm.check_extension(Cap::TscDeadlineTimer),
            self.kvm
                .get_msr_index_list()
                .map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?
                .as_slice()
                .to_vec(),
        )))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        if gsi >= IOAPIC_PINS {
            return Err(Error::Unsupported(format!(
                "GSI {gsi} is not an IOAPIC pin (0..{IOAPIC_PINS})"
            )));
        }
        let evt = self.irqfd(gsi)?;
        Ok(Arc::new(KvmIrqLine {
            vm: self.fd.clone(),
            gsi,
            evt,
        }))
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
        routes.table.push(kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        });
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
}

struct KvmIrqLine {
    vm: Arc<VmFd>,
    gsi: u32,
    evt: EventFd,
}

impl IrqLine for KvmIrqLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
    fn set_level(&self, high: bool) -> std::io::Result<()> {
        self.vm
            .set_irq_line(self.gsi, high)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
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
        let entry = routes
            .table
            .iter_mut()
            .find(|e| e.gsi == self.gsi)
            .ok_or_else(|| std::io::Error::other("MSI route vanished"))?;
        // SAFETY: this entry was created as KVM_IRQ_ROUTING_MSI, so `msi` is the live union field.
        let msi = unsafe { &mut entry.u.msi };
        if msi.address_lo == addr as u32
            && msi.address_hi == (addr >> 32) as u32
            && msi.data == data
        {
            return Ok(());
        }
        msi.address_lo = addr as u32;
        msi.address_hi = (addr >> 32) as u32;
        msi.data = data;
        commit_routes(&self.vm, &routes).map_err(std::io::Error::other)
    }

    fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}
