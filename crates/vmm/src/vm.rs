//! Building and running one VM.

use crate::config::{VirtioTransport, VmConfig};
use kvmbox_arch::layout;
use kvmbox_cpu::{Accel, Vm};
use kvmbox_devices::legacy::acpi_pm::{AcpiPm, ResetRegister, PM_BLOCK_LEN};
use kvmbox_devices::legacy::debug_exit::{DebugExit, DEBUG_EXIT_PORTS};
use kvmbox_devices::legacy::i8042::I8042;
use kvmbox_devices::legacy::pit::{
    Clock, HostClock, Pit, TimerThread, TimerWaker, PIT_PORT, PIT_PORT_LEN, SPEAKER_PORT,
};
use kvmbox_devices::legacy::rtc::{Rtc, RTC_IRQ, RTC_PORT, RTC_PORT_LEN};
use kvmbox_devices::legacy::serial::{SerialPort, SERIAL_PORTS};
use kvmbox_devices::legacy::IrqTrigger;
use kvmbox_devices::{IoBus, VmControl};
use kvmbox_pci::{PciConfigIo, PciConfigMmio, PciRoot};
use kvmbox_virtio::block::Block;
use kvmbox_virtio::net::Net;
use kvmbox_virtio::rng::Rng;
use kvmbox_virtio::transport::{attach_mmio, attach_pci};
use kvmbox_virtio::VirtioDevice;
use std::sync::{Arc, Mutex};

/// Why a VM could not be built or run. Each is one line naming the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] crate::ConfigError),
    /// Loading the kernel, building memory or firmware tables.
    #[error(transparent)]
    Boot(#[from] kvmbox_arch::Error),
    /// The CPU backend.
    #[error("{0}")]
    Cpu(#[from] kvmbox_cpu::Error),
    /// Asking for more vCPUs than the backend has.
    #[error("--cpus {asked} is more than {backend} supports ({max})")]
    TooManyCpus {
        /// Requested.
        asked: u32,
        /// Backend name.
        backend: &'static str,
        /// Its maximum.
        max: u32,
    },
    /// Device setup.
    #[error("device setup: {0}")]
    Device(String),
    /// Placing a device on the bus.
    #[error("device setup: {0}")]
    Bus(#[from] kvmbox_devices::BusError),
    /// A virtio device or its transport (a bad disk image or TAP, for instance).
    #[error("device setup: {0}")]
    Virtio(#[from] kvmbox_virtio::Error),
    /// The interrupt controllers.
    #[error("device setup: {0}")]
    IrqChip(#[from] kvmbox_irqchip::Error),
    /// A snapshot file (missing, damaged, another version, too small).
    #[error("{0}")]
    SnapshotFile(#[from] kvmbox_snapshot::Error),
    /// A snapshot that this VM cannot take or restore (what is wrong is named).
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// Host resources (threads, fds).
    #[error("{0}")]
    Host(String),
}

pub(crate) type Result<T> = std::result::Result<T, Error>;

/// Where the console forwarder finds the running VM's UART (None between boots).
pub(crate) type SerialSlot = Arc<Mutex<Option<Arc<Mutex<SerialPort>>>>>;

impl Error {
    /// Whether the user's input (configuration, images, API bodies) is at fault rather than
    /// the host: the API answers 400 for these and 500 for the rest.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::Config(_)
                | Error::Boot(_)
                | Error::TooManyCpus { .. }
                | Error::Device(_)
                | Error::Virtio(_)
                | Error::Snapshot(_)
        ) || matches!(self, Error::SnapshotFile(e) if e.is_user_error())
    }
}

/// The interrupt controllers and timer both backends share, one object each whatever runs the
/// guest: kvmbox's IOAPIC and 8259 pair (`kvmbox-irqchip`, which on the software engine also
/// holds the local APICs; on KVM those are the kernel's, reached through a split irqchip) and
/// the PIT with its timer thread. Their bus devices live on the bus; the timer thread here.
pub struct IrqPlatform {
    /// The IOAPIC and PIC (and the engine's LAPICs); the bus and the backend hold clones too.
    pub chip: kvmbox_irqchip::IrqChip,
    /// The PIT.
    pub pit: Arc<Mutex<Pit>>,
    _pit_timer: TimerThread,
}

pub(crate) fn create_backend(
    accel: Accel,
    mem: &kvmbox_cpu::GuestMemory,
    cpus: u32,
    io: &IoBus,
) -> Result<(Box<dyn Vm>, IrqPlatform)> {
    let clock: Arc<dyn Clock> = Arc::new(HostClock::new());
    let (vm, chip): (Box<dyn Vm>, kvmbox_irqchip::IrqChip) = match accel {
        Accel::Kvm => {
            let vm = kvmbox_cpu::kvm::KvmVm::new(mem)?;
            let chip = kvmbox_irqchip::IrqChip::with_lapic_bus(clock.clone(), vm.lapic_bus());
            vm.set_platform_irq(Arc::new(chip.clone()))?;
            (Box::new(vm), chip)
        }
        Accel::Emu => {
            check_cpus(cpus, "emu", kvmbox_emu::MAX_VCPUS)?;
            kvmbox_emu::jit_threshold_from_env()
                .map_err(|e| Error::Config(crate::ConfigError::Invalid(e)))?;
            // The engine's RDTSC reads the host TSC: tell the guest its rate.
            let chip = kvmbox_irqchip::IrqChip::new(cpus, clock.clone(), host_tsc_hz())?;
            let vm = kvmbox_emu::EmuVm::new(mem.clone());
            vm.set_interrupt_controller(Arc::new(chip.clone()));
            // kvm-clock, as Linux has it under KVM: it becomes the watchdog that verifies the
            // TSC, and it follows the host TSC as the TSC does, however late timer interrupts
            // arrive on a busy host (KVM offers it natively; see kvmbox_emu::pvclock).
            vm.enable_kvm_clock(host_tsc_hz(), host_tsc_is_invariant());
            vm.set_cpuid_overrides(engine_cpuid_overrides());
            (Box::new(vm), chip)
        }
    };
    chip.attach(io)?;
    let waker = Arc::new(TimerWaker::new());
    let mut pit = Pit::new(Some(chip.irq_line(0)?), clock.clone());
    pit.set_waker(waker.clone());
    let pit = Arc::new(Mutex::new(pit));
    chip.set_ack_notifier(0, Pit::ack_notifier(&pit))?;
    io.pio
        .insert(pit.clone(), u64::from(PIT_PORT), PIT_PORT_LEN)?;
    io.pio.insert(pit.clone(), u64::from(SPEAKER_PORT), 1)?;
    let pit_timer = TimerThread::spawn("pit", pit.clone(), clock, waker)
        .map_err(|e| Error::Host(format!("cannot start the PIT timer thread: {e}")))?;
    Ok((
        vm,
        IrqPlatform {
            chip,
            pit,
            _pit_timer: pit_timer,
        },
    ))
}

/// What the VMM adds to the engine's own CPU model.
fn engine_cpuid_overrides() -> Vec<kvmbox_cpu::CpuidEntry> {
    let mut o = Vec::new();
    if host_tsc_is_invariant() {
        // The engine's RDTSC is the host's TSC: where that one is invariant (constant rate,
        // running in every state, one across CPUs), say so, and Linux keeps the TSC as its
        // clocksource instead of declaring it unsynchronized.
        o.push(kvmbox_cpu::CpuidEntry {
            function: 0x8000_0007,
            edx: INVARIANT_TSC,
            ..Default::default()
        });
    }
    o
}

/// `--cpu-model portable` for vCPU `id` of `count`: the engine's CPU model (as the engine
/// shows it) less what this host's KVM cannot offer. Without KVM it is the engine's model.
pub(crate) fn portable_cpuid(id: u32, count: u32) -> Vec<kvmbox_cpu::CpuidEntry> {
    let engine = kvmbox_emu::cpuid::build(id, count, true, true, &engine_cpuid_overrides());
    match kvmbox_cpu::kvm::supported_cpuid() {
        Ok(kvm) => kvmbox_cpu::portable_cpuid(&engine, &kvm),
        Err(_) => engine,
    }
}

pub(crate) fn check_cpus(asked: u32, backend: &'static str, max: u32) -> Result<()> {
    if asked > max {
        return Err(Error::TooManyCpus {
            asked,
            backend,
            max,
        });
    }
    Ok(())
}

/// CPUID 0x8000_0007 EDX: the TSC runs at a constant rate in every C-, P- and T-state.
const INVARIANT_TSC: u32 = 1 << 8;

fn host_tsc_is_invariant() -> bool {
    use core::arch::x86_64::__cpuid;
    __cpuid(0x8000_0000).eax >= 0x8000_0007 && __cpuid(0x8000_0007).edx & INVARIANT_TSC != 0
}

/// The host's TSC frequency, measured once per process against the monotonic clock over
/// 50 ms. Each end is the best of several (clock, TSC) pairs bracketed by two TSC reads, so
/// a preemption of this thread in the middle of a reading (common on a loaded host) cannot
/// skew the rate; the result is good to ~1e-5.
fn host_tsc_hz() -> u64 {
    static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HZ.get_or_init(measure_host_tsc_hz)
}

/// A (monotonic clock, TSC) pair read as close together as this thread managed.
fn tsc_clock_pair() -> (std::time::Instant, u64) {
    let mut best: Option<(u64, std::time::Instant, u64)> = None;
    for _ in 0..16 {
        // SAFETY: RDTSC only reads the time-stamp counter.
        let before = unsafe { core::arch::x86_64::_rdtsc() };
        let t = std::time::Instant::now();
        // SAFETY: as above.
        let after = unsafe { core::arch::x86_64::_rdtsc() };
        let spread = after.wrapping_sub(before);
        if best.is_none_or(|(s, _, _)| spread < s) {
            best = Some((spread, t, before + spread / 2));
        }
    }
    let (_, t, tsc) = best.expect("at least one sample");
    (t, tsc)
}

fn measure_host_tsc_hz() -> u64 {
    let (t0, c0) = tsc_clock_pair();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let (t1, c1) = tsc_clock_pair();
    let secs = t1.duration_since(t0).as_secs_f64();
    (c1.wrapping_sub(c0) as f64 / secs) as u64
}

/// The PC platform devices a VM keeps while it runs.
pub struct Platform {
    /// COM1.
    pub serial: Arc<Mutex<SerialPort>>,
    /// The i8042 (reset line, the keyboard's Ctrl+Alt+Del).
    pub i8042: Arc<Mutex<I8042>>,
    /// The ACPI PM block (power button, sleep states).
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    /// The CMOS RTC.
    pub rtc: Arc<Mutex<Rtc>>,
    /// Drives the RTC's periodic/alarm/update interrupts; stops when dropped.
    _rtc_timer: TimerThread,
}

/// Put the PC platform devices on the bus.
pub(crate) fn add_legacy_devices(
    vm: &dyn Vm,
    io: &IoBus,
    control: &Arc<VmControl>,
) -> Result<Platform> {
    let com1_irq = vm.irq_line(layout::COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialPort::new(
        IrqTrigger(com1_irq),
        Box::new(std::io::stdout()),
    )));
    io.pio
        .insert(serial.clone(), u64::from(layout::COM1_PORT), SERIAL_PORTS)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        control.clone(),
        layout::I8042_DATA_PORT,
        Some(vm.irq_line(layout::I8042_IRQ)?),
    )));
    for port in [layout::I8042_DATA_PORT, layout::I8042_COMMAND_PORT] {
        io.pio.insert(i8042.clone(), u64::from(port), 1)?;
    }
    io.pio.insert(
        Arc::new(Mutex::new(DebugExit::new(control.clone()))),
        u64::from(layout::DEBUG_EXIT_PORT),
        DEBUG_EXIT_PORTS,
    )?;
    let mut pm = AcpiPm::new(
        control.clone(),
        layout::ACPI_S5_SLP_TYP,
        layout::ACPI_S3_SLP_TYP,
    );
    pm.set_sci(vm.irq_line(layout::ACPI_SCI_IRQ)?);
    let acpi_pm = Arc::new(Mutex::new(pm));
    io.pio.insert(
        acpi_pm.clone(),
        u64::from(layout::ACPI_PM1A_EVT_PORT),
        PM_BLOCK_LEN,
    )?;
    io.pio.insert(
        Arc::new(Mutex::new(ResetRegister::new(
            control.clone(),
            layout::ACPI_RESET_VALUE,
        ))),
        u64::from(layout::ACPI_RESET_PORT),
        1,
    )?;

    let clock: Arc<dyn Clock> = Arc::new(HostClock::new());
    let waker = Arc::new(TimerWaker::new());
    let mut rtc = Rtc::with_host_time(Some(vm.irq_line(RTC_IRQ)?), clock.clone(), 0);
    rtc.set_waker(waker.clone());
    // The RTC alarm is the chipset's RTC wake event: RTC_STS in the PM block (which wakes the
    // guest from S3 when it enabled RTC_EN). Lock order: RTC, then PM.
    let pm_for_rtc = acpi_pm.clone();
    rtc.set_alarm_hook(Arc::new(move || {
        let mut pm = pm_for_rtc.lock().unwrap_or_else(|e| e.into_inner());
        // A line that cannot be driven is the backend's failure; the guest sees no SCI.
        let _ = pm.rtc_alarm();
    }));
    let rtc = Arc::new(Mutex::new(rtc));
    io.pio
        .insert(rtc.clone(), u64::from(RTC_PORT), RTC_PORT_LEN)?;
    let rtc_timer = TimerThread::spawn("rtc", rtc.clone(), clock, waker)
        .map_err(|e| Error::Host(format!("cannot start the RTC timer thread: {e}")))?;
    Ok(Platform {
        serial,
        i8042,
        acpi_pm,
        rtc,
        _rtc_timer: rtc_timer,
    })
}

/// The rate limiters of a VM's devices, in configuration order, for live updates.
#[derive(Default, Clone)]
pub struct DeviceLimiters {
    /// One per disk.
    pub disks: Vec<kvmbox_virtio::SharedLimiter>,
    /// (receive, transmit) per network interface.
    pub nets: Vec<(kvmbox_virtio::SharedLimiter, kvmbox_virtio::SharedLimiter)>,
}

/// The virtio devices the configuration asks for, opened now so that a bad image or TAP name
/// is reported before anything runs.
pub(crate) fn virtio_devices(cfg: &VmConfig) -> Result<OpenedVirtio> {
    let mut devs: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut limiters = DeviceLimiters::default();
    let mut disks = Vec::new();
    for d in &cfg.disks {
        let b = Block::new(d)?;
        limiters.disks.push(b.rate_limiter());
        disks.push(b.backend());
        devs.push(Box::new(b));
    }
    for n in &cfg.nets {
        let n = Net::new(n)?;
        limiters.nets.push(n.rate_limiters());
        devs.push(Box::new(n));
    }
    if cfg.rng {
        devs.push(Box::new(Rng::new()));
    }
    if let Some(v) = &cfg.vsock {
        devs.push(Box::new(kvmbox_virtio::vsock::Vsock::new(v)?));
    }
    Ok(OpenedVirtio {
        devices: devs,
        limiters,
        disks,
    })
}

/// A virtio device, before it goes on its transport.
type VirtioDeviceBox = Box<dyn VirtioDevice>;

/// The virtio devices a configuration asks for, opened, with what the VMM keeps of them.
pub(crate) struct OpenedVirtio {
    /// The devices, to go on their transport.
    pub devices: Vec<VirtioDeviceBox>,
    /// Their rate limiters, for live updates.
    pub limiters: DeviceLimiters,
    /// The disks' open images (in `cfg.disks`' order), for live disk snapshots.
    pub disks: Vec<DiskBackend>,
}

/// A virtio-blk disk's open image.
pub type DiskBackend = std::sync::Arc<dyn kvmbox_block::BlockBackend>;

/// MMIO window and interrupt line of each virtio-mmio device (none with PCI).
pub(crate) fn mmio_slots(cfg: &VmConfig, count: usize) -> Result<Vec<(u64, u32)>> {
    if cfg.virtio != VirtioTransport::Mmio {
        return Ok(Vec::new());
    }
    if count > layout::VIRTIO_MMIO_GSIS.len() {
        return Err(Error::Device(format!(
            "{count} virtio devices, but --virtio mmio has interrupt lines for {}",
            layout::VIRTIO_MMIO_GSIS.len()
        )));
    }
    Ok(layout::VIRTIO_MMIO_GSIS
        .iter()
        .take(count)
        .enumerate()
        .map(|(i, &gsi)| {
            (
                layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE,
                gsi,
            )
        })
        .collect())
}

/// Put the virtio devices on PCI bus 0 (with the host bridge, CF8/CFC and ECAM) or at their
/// virtio-mmio windows.
pub(crate) fn attach_virtio(
    cfg: &VmConfig,
    vm: &dyn Vm,
    io: &Arc<IoBus>,
    mem: &kvmbox_cpu::GuestMemory,
    devices: Vec<VirtioDeviceBox>,
    limiters: DeviceLimiters,
    mmio_slots: &[(u64, u32)],
) -> Result<VirtioDevices> {
    let mut attached = VirtioDevices {
        limiters,
        ..Default::default()
    };
    match cfg.virtio {
        VirtioTransport::Pci => {
            let root = Arc::new(Mutex::new(PciRoot::new(Arc::downgrade(io))));
            io.pio.insert(
                Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
                u64::from(layout::PCI_CONFIG_ADDRESS_PORT),
                8,
            )?;
            io.mmio.insert(
                Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
                layout::PCI_ECAM_START,
                layout::PCI_ECAM_SIZE,
            )?;
            for dev in devices {
                attached.pci.push(attach_pci(&root, vm, mem, dev, None)?.1);
            }
            attached.pci_root = Some(root);
        }
        VirtioTransport::Mmio => {
            for (dev, &(base, gsi)) in devices.into_iter().zip(mmio_slots) {
                attached
                    .mmio
                    .push(attach_mmio(io, vm, mem, dev, base, gsi)?.1);
            }
        }
    }
    Ok(attached)
}

/// The virtio devices of a VM, in configuration order (disks, nets, rng, vsock), on their
/// transport.
#[derive(Default)]
pub struct VirtioDevices {
    /// PCI bus 0 (with `--virtio pci`).
    pub pci_root: Option<Arc<Mutex<PciRoot>>>,
    /// virtio-pci functions.
    pub pci: Vec<Arc<Mutex<kvmbox_virtio::transport::VirtioPciDevice>>>,
    /// virtio-mmio devices.
    pub mmio: Vec<Arc<Mutex<kvmbox_virtio::transport::MmioTransport>>>,
    /// The devices' rate limiters.
    pub limiters: DeviceLimiters,
}
