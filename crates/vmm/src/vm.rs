//! Building and running one VM.

use crate::config::{AccelChoice, OnReboot, VirtioTransport, VmConfig};
use crate::console::{spawn_stdin_forwarder, RawTerminal};
use crate::{EXIT_ERROR, EXIT_POWEROFF, EXIT_REBOOT};
use kvmbox_arch::layout;
use kvmbox_cpu::{Accel, Vcpu, VcpuConfig, VcpuExit, VcpuKicker, Vm};
use kvmbox_devices::legacy::acpi_pm::{AcpiPm, ResetRegister, PM_BLOCK_LEN};
use kvmbox_devices::legacy::debug_exit::{DebugExit, DEBUG_EXIT_PORTS};
use kvmbox_devices::legacy::i8042::I8042;
use kvmbox_devices::legacy::pit::{
    Clock, HostClock, Pit, TimerThread, TimerWaker, PIT_PORT, PIT_PORT_LEN, SPEAKER_PORT,
};
use kvmbox_devices::legacy::rtc::{Rtc, RTC_IRQ, RTC_PORT, RTC_PORT_LEN};
use kvmbox_devices::legacy::serial::{SerialPort, SERIAL_PORTS};
use kvmbox_devices::legacy::IrqTrigger;
use kvmbox_devices::{ExitRequest, IoBus, VmControl};
use kvmbox_pci::{PciConfigIo, PciConfigMmio, PciRoot};
use kvmbox_virtio::block::Block;
use kvmbox_virtio::net::Net;
use kvmbox_virtio::rng::Rng;
use kvmbox_virtio::transport::{attach_mmio, attach_pci};
use kvmbox_virtio::VirtioDevice;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// Host resources (threads, fds).
    #[error("{0}")]
    Host(String),
}

type Result<T> = std::result::Result<T, Error>;

/// Everything that outlives one boot of the VM: the console and the stop signal.
struct Session {
    control: Arc<VmControl>,
    serial_slot: Arc<Mutex<Option<Arc<Mutex<SerialPort>>>>>,
}

/// Run the VM described by `cfg` until it ends; returns kvmbox's exit status.
pub fn run(cfg: &VmConfig) -> Result<i32> {
    let accel = match cfg.accel {
        AccelChoice::Fixed(a) => a,
        AccelChoice::Auto => kvmbox_doctor::choose_accel_cached().accel,
    };
    let session = Session {
        control: Arc::new(VmControl::new().map_err(|e| Error::Host(format!("eventfd: {e}")))?),
        serial_slot: Arc::new(Mutex::new(None)),
    };
    let raw = RawTerminal::enable(libc::STDIN_FILENO);
    spawn_stdin_forwarder(session.serial_slot.clone(), session.control.clone());
    loop {
        let outcome = boot_once(cfg, accel, &session)?;
        match outcome {
            ExitRequest::Reset if cfg.on_reboot == OnReboot::Restart => {
                session.control.clear();
                continue;
            }
            ExitRequest::Reset => return Ok(EXIT_REBOOT),
            ExitRequest::UserQuit => {
                if raw.is_some() {
                    // The guest's last line may be a prompt: leave the user's shell a fresh line.
                    eprint!("\r\n");
                }
                return Ok(EXIT_POWEROFF);
            }
            ExitRequest::PowerOff => return Ok(EXIT_POWEROFF),
            ExitRequest::DebugExit(v) => return Ok(DebugExit::status(v)),
            ExitRequest::Error => return Ok(EXIT_ERROR),
        }
    }
}

/// The interrupt controllers and timer both backends share, one object each whatever runs the
/// guest: kvmbox's IOAPIC and 8259 pair (`kvmbox-irqchip`, which on the software engine also
/// holds the local APICs; on KVM those are the kernel's, reached through a split irqchip) and
/// the PIT with its timer thread. Their bus devices live on the bus; the timer thread here.
struct IrqPlatform {
    /// Kept for the VM's lifetime (the bus and the backend hold clones too).
    _chip: kvmbox_irqchip::IrqChip,
    _pit_timer: TimerThread,
}

fn create_backend(
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
            // The engine's RDTSC reads the host TSC: tell the guest its rate.
            let chip = kvmbox_irqchip::IrqChip::new(cpus, clock.clone(), host_tsc_hz())?;
            let vm = kvmbox_emu::EmuVm::new(mem.clone());
            vm.set_interrupt_controller(Arc::new(chip.clone()));
            // kvm-clock, as Linux has it under KVM: it becomes the watchdog that verifies the
            // TSC, and it follows the host TSC as the TSC does, however late timer interrupts
            // arrive on a busy host (KVM offers it natively; see kvmbox_emu::pvclock).
            vm.enable_kvm_clock(host_tsc_hz(), host_tsc_is_invariant());
            if host_tsc_is_invariant() {
                // The engine's RDTSC is the host's TSC: where that one is invariant (constant
                // rate, running in every state, one across CPUs), say so, and Linux keeps the
                // TSC as its clocksource instead of declaring it unsynchronized.
                vm.set_cpuid_overrides(vec![kvmbox_cpu::CpuidEntry {
                    function: 0x8000_0007,
                    edx: INVARIANT_TSC,
                    ..Default::default()
                }]);
            }
            (Box::new(vm), chip)
        }
    };
    chip.attach(io)?;
    let waker = Arc::new(TimerWaker::new());
    let mut pit = Pit::new(Some(chip.irq_line(0)?), clock.clone());
    pit.set_waker(waker.clone());
    let pit = Arc::new(Mutex::new(pit));
    io.pio
        .insert(pit.clone(), u64::from(PIT_PORT), PIT_PORT_LEN)?;
    io.pio.insert(pit.clone(), u64::from(SPEAKER_PORT), 1)?;
    let pit_timer = TimerThread::spawn("pit", pit, clock, waker)
        .map_err(|e| Error::Host(format!("cannot start the PIT timer thread: {e}")))?;
    Ok((
        vm,
        IrqPlatform {
            _chip: chip,
            _pit_timer: pit_timer,
        },
    ))
}

fn check_cpus(asked: u32, backend: &'static str, max: u32) -> Result<()> {
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
struct Platform {
    serial: Arc<Mutex<SerialPort>>,
    /// Drives the RTC's periodic/alarm/update interrupts; stops when dropped.
    _rtc_timer: TimerThread,
}

/// Put the PC platform devices on the bus.
fn add_legacy_devices(vm: &dyn Vm, io: &IoBus, control: &Arc<VmControl>) -> Result<Platform> {
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
    )));
    for port in [layout::I8042_DATA_PORT, layout::I8042_COMMAND_PORT] {
        io.pio.insert(i8042.clone(), u64::from(port), 1)?;
    }
    io.pio.insert(
        Arc::new(Mutex::new(DebugExit::new(control.clone()))),
        u64::from(layout::DEBUG_EXIT_PORT),
        DEBUG_EXIT_PORTS,
    )?;
    io.pio.insert(
        Arc::new(Mutex::new(AcpiPm::new(
            control.clone(),
            layout::ACPI_S5_SLP_TYP,
        ))),
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
    let rtc = Arc::new(Mutex::new(rtc));
    io.pio
        .insert(rtc.clone(), u64::from(RTC_PORT), RTC_PORT_LEN)?;
    let rtc_timer = TimerThread::spawn("rtc", rtc, clock, waker)
        .map_err(|e| Error::Host(format!("cannot start the RTC timer thread: {e}")))?;
    Ok(Platform {
        serial,
        _rtc_timer: rtc_timer,
    })
}

/// The virtio devices the configuration asks for, opened now so that a bad image or TAP name
/// is reported before anything runs.
fn virtio_devices(cfg: &VmConfig) -> Result<Vec<Box<dyn VirtioDevice>>> {
    let mut devs: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for d in &cfg.disks {
        devs.push(Box::new(Block::new(d)?));
    }
    for n in &cfg.nets {
        devs.push(Box::new(Net::new(n)?));
    }
    if cfg.rng {
        devs.push(Box::new(Rng::new()));
    }
    Ok(devs)
}

/// MMIO window and interrupt line of each virtio-mmio device (none with PCI).
fn mmio_slots(cfg: &VmConfig, count: usize) -> Result<Vec<(u64, u32)>> {
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
fn attach_virtio(
    cfg: &VmConfig,
    vm: &dyn Vm,
    io: &Arc<IoBus>,
    mem: &kvmbox_cpu::GuestMemory,
    devices: Vec<Box<dyn VirtioDevice>>,
    mmio_slots: &[(u64, u32)],
) -> Result<()> {
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
                attach_pci(&root, vm, mem, dev, None)?;
            }
        }
        VirtioTransport::Mmio => {
            for (dev, &(base, gsi)) in devices.into_iter().zip(mmio_slots) {
                attach_mmio(io, vm, mem, dev, base, gsi)?;
            }
        }
    }
    Ok(())
}

/// Build the VM, run it until something asks it to stop, tear it down. Returns the request.
fn boot_once(cfg: &VmConfig, accel: Accel, session: &Session) -> Result<ExitRequest> {
    let mem = kvmbox_arch::guest_memory(cfg.memory)?;
    // The kernel goes in first: a bad image is the user's most likely mistake, and it should be
    // reported as such whatever the backend.
    let devices = virtio_devices(cfg)?;
    let mmio_slots = mmio_slots(cfg, devices.len())?;
    let mut cmdline = cfg.cmdline.clone();
    for &(base, gsi) in &mmio_slots {
        cmdline.push(' ');
        cmdline.push_str(&kvmbox_virtio::transport::cmdline_arg(base, gsi));
    }
    let mut acpi = kvmbox_arch::AcpiConfig::new(cfg.cpus);
    // kvmbox's i8042 is only the reset line (Linux's reboot=k writes 0xfe to port 0x64 either
    // way): advertising a PS/2 controller would make Linux probe a keyboard that is not there.
    acpi.i8042 = false;
    if cfg.virtio == VirtioTransport::Pci {
        acpi.pci = Some(kvmbox_arch::PciHostBridge::new());
    }
    let rsdp = kvmbox_arch::create_acpi_tables_with(&mem, &acpi)?;
    let mut params = kvmbox_arch::LoadParams::new(&cfg.kernel, &cmdline, cfg.memory);
    params.initrd = cfg.initrd.as_deref();
    params.cpus = cfg.cpus;
    params.prefer_pvh = cfg.pvh;
    params.rsdp = Some(rsdp);
    // The software engine would spend tens of millions of instructions in a bzImage's own
    // decompressor: unpack the kernel on the host instead.
    params.host_decompress = accel == Accel::Emu;
    let boot = kvmbox_arch::load(&mem, &params)?;
    let io = Arc::new(IoBus::default());
    let (vm, irq_platform) = create_backend(accel, &mem, cfg.cpus, &io)?;
    check_cpus(cfg.cpus, vm.name(), vm.max_vcpus())?;
    let control = session.control.clone();
    let platform = add_legacy_devices(vm.as_ref(), &io, &control)?;
    attach_virtio(cfg, vm.as_ref(), &io, &mem, devices, &mmio_slots)?;

    let mut vcpus: Vec<Box<dyn Vcpu>> = Vec::new();
    for id in 0..cfg.cpus {
        let mut vcpu = vm.create_vcpu(id)?;
        vcpu.configure(&VcpuConfig {
            id,
            count: cfg.cpus,
        })?;
        if id == 0 {
            vcpu.set_sregs(&boot.sregs)?;
            vcpu.set_regs(&boot.regs)?;
        } else {
            vcpu.set_wait_for_sipi()?;
        }
        vcpus.push(vcpu);
    }
    *session
        .serial_slot
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(platform.serial.clone());

    let kickers: Vec<Arc<dyn VcpuKicker>> = vcpus.iter().map(|v| v.kicker()).collect();
    let halted = Arc::new(AtomicUsize::new(0));
    let count = vcpus.len();
    let mut threads = Vec::new();
    for (id, vcpu) in vcpus.into_iter().enumerate() {
        let io = io.clone();
        let control = control.clone();
        let halted = halted.clone();
        let t = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    vcpu_loop(id, vcpu, &io, &control, &halted, count)
                }));
                if ran.is_err() {
                    // The panic hook printed the message; stop the VM rather than hang it.
                    control.request(ExitRequest::Error);
                }
            })
            .map_err(|e| Error::Host(format!("cannot start vCPU thread: {e}")))?;
        threads.push(t);
    }

    let request = wait_for_request(&control);
    for k in &kickers {
        k.kick();
    }
    for t in threads {
        // A vCPU thread that panicked has already reported through the panic hook.
        let _ = t.join();
    }
    *session
        .serial_slot
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = None;
    // Device threads stop before the backend (and its guest memory mappings) goes away.
    drop(platform);
    drop(irq_platform);
    drop(vm);
    Ok(request)
}

fn wait_for_request(control: &VmControl) -> ExitRequest {
    loop {
        if let Some(r) = control.pending() {
            return r;
        }
        let mut pfd = libc::pollfd {
            fd: control.event().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, and its count.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
    }
}

fn vcpu_loop(
    id: usize,
    mut vcpu: Box<dyn Vcpu>,
    io: &IoBus,
    control: &VmControl,
    halted: &AtomicUsize,
    count: usize,
) {
    loop {
        match vcpu.run(io) {
            Ok(VcpuExit::Kicked) => {
                if control.pending().is_some() {
                    return;
                }
            }
            Ok(VcpuExit::Halted) => {
                // Halted with interrupts off: this vCPU is done until the VM stops. (A guest
                // often halts right after asking to stop: that is no error.)
                if control.pending().is_none() && halted.fetch_add(1, Ordering::SeqCst) + 1 == count
                {
                    eprintln!("kvmbox: every vCPU halted with interrupts disabled; stopping");
                    control.request(ExitRequest::Error);
                }
                while control.pending().is_none() {
                    std::thread::park_timeout(std::time::Duration::from_millis(50));
                }
                return;
            }
            Ok(VcpuExit::Shutdown) | Ok(VcpuExit::Reset) => {
                control.request(ExitRequest::Reset);
                return;
            }
            Ok(VcpuExit::PowerOff) => {
                control.request(ExitRequest::PowerOff);
                return;
            }
            Err(e) => {
                eprintln!("\r\nkvmbox: vCPU {id} stopped: {e}");
                control.request(ExitRequest::Error);
                return;
            }
        }
    }
}
