//! kvmbox host checks: can this machine run VMs, and which accelerator fits.
//!
//! [`run_checks`] is `kvmbox doctor`: it reads the CPU (CPUID and /proc/cpuinfo), the kernel,
//! memory and KVM modules, opens /dev/kvm and /dev/net/tun, checks the KVM API version,
//! capabilities and vCPU limits, and then creates a throwaway VM ([`probe`]) that times a
//! `dec rcx; jnz` loop in guest ring 0 and in guest ring 3. Every finding is one [`Check`].
//!
//! [`choose_accel`] is the cheap version of the same decision that `--accel auto` runs (a few
//! milliseconds); [`choose_accel_cached`] keeps its answer for the rest of the host's boot.
//!
//! # The decision
//! - KVM is *usable* when /dev/kvm opens read/write, reports API version 12, has every
//!   required capability, and the probe VM runs its loop in both rings.
//! - KVM runs guest ring 0 at *hardware* speed when the ring-0 loop is at most
//!   [`EMULATED_RING0_SLOWDOWN`] times slower than the ring-3 loop; otherwise the host emulates
//!   guest kernel mode (e.g. the `kvm_pvm` module: nested virtualization without VMX/SVM), stock
//!   kernels will not boot usefully on it, and `auto` picks the software engine.
//! - The software engine needs nothing from the kernel; it is usable when the host has at least
//!   [`kvmbox_arch::layout::MIN_MEMORY`] bytes of memory available.
//! - [`Report::can_run_vms`] is true when KVM or the software engine is usable: `kvmbox doctor`
//!   exits 0 then, non-zero otherwise. The report says which accelerator `auto` picks and why.

pub mod accel_cache;
pub mod host;
pub mod probe;

pub use accel_cache::choose_accel_cached;

use std::time::Duration;

use kvm_ioctls::{Cap, Kvm};
use kvmbox_arch::layout::MIN_MEMORY;
use kvmbox_cpu::Accel;
use serde::ser::SerializeStruct;
use serde::Serialize;

pub use host::{CpuInfo, DeviceAccess};
use probe::{Budget, LoopRate, ProbeVm, Ring};

/// Errors of the timing probe.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// Host memory for the probe guest could not be mapped.
    #[error("cannot map probe guest memory: {0}")]
    Mmap(std::io::Error),
    /// The probe guest stopped somewhere other than its final `out`.
    #[error("probe guest in {ring} stopped with {exit} instead of finishing its loop")]
    ProbeExit {
        /// The ring the loop ran in.
        ring: &'static str,
        /// The KVM exit seen.
        exit: String,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The KVM device.
pub const KVM_PATH: &str = "/dev/kvm";
/// The TUN/TAP device.
pub const TUN_PATH: &str = "/dev/net/tun";
/// The only KVM API version there is (KVM_GET_API_VERSION).
pub const KVM_API_VERSION: i32 = 12;
/// Ring 0 slower than ring 3 by more than this factor means the host emulates guest kernel mode.
pub const EMULATED_RING0_SLOWDOWN: f64 = 50.0;

/// Loop sizes for `kvmbox doctor`: each ring's run lasts at least 100 ms. Counts start small and
/// grow 8x, so no run takes much longer than 800 ms however slow a ring is.
const FULL_RING0: Budget = Budget {
    start: 2_000,
    min_time: Duration::from_millis(100),
    max_iterations: 1 << 32,
};
const FULL_RING3: Budget = Budget {
    start: 1_000_000,
    min_time: Duration::from_millis(100),
    max_iterations: 1 << 34,
};
/// Loop sizes for [`choose_accel`]: each ring's run lasts at least 0.5 ms (about 5 ms in all).
const QUICK_RING0: Budget = Budget {
    start: 1_000,
    min_time: Duration::from_micros(500),
    max_iterations: 1 << 28,
};
const QUICK_RING3: Budget = Budget {
    start: 100_000,
    min_time: Duration::from_micros(500),
    max_iterations: 1 << 30,
};

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, with a limitation worth knowing.
    Warn,
    /// Does not work; the check names the remedy.
    Fail,
}

impl Status {
    /// The word `render_text` prints: "ok", "warn" or "FAIL".
    pub fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// One finding about the host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// Short name ("cpu", "/dev/kvm", "kvm speed", ...).
    pub name: String,
    /// Outcome.
    pub status: Status,
    /// What was found, in plain words.
    pub finding: String,
    /// What to do about a failure or warning.
    pub remedy: Option<String>,
}

impl Check {
    fn new(name: &str, status: Status, finding: String, remedy: Option<&str>) -> Check {
        Check {
            name: name.to_string(),
            status,
            finding,
            remedy: remedy.map(str::to_string),
        }
    }
}

/// One KVM capability kvmbox looks at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capability {
    /// Its name in the kernel's API (`KVM_CAP_...`).
    pub name: &'static str,
    /// kvmbox's KVM backend cannot work without it.
    pub required: bool,
    /// KVM_CHECK_EXTENSION's answer (0 = absent).
    pub value: i32,
}

/// The capabilities kvmbox's KVM backend needs (true) or uses when present (false).
const CAPABILITIES: &[(Cap, &str, bool)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP", true),
    (Cap::SplitIrqchip, "KVM_CAP_SPLIT_IRQCHIP", true),
    (Cap::Hlt, "KVM_CAP_HLT", true),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY", true),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR", true),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID", true),
    (Cap::Irqfd, "KVM_CAP_IRQFD", true),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD", true),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT", true),
    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING", true),
    (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI", true),
    (Cap::TscDeadlineTimer, "KVM_CAP_TSC_DEADLINE_TIMER", false),
    (Cap::MpState, "KVM_CAP_MP_STATE", false),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS", false),
    (Cap::Xsave, "KVM_CAP_XSAVE", false),
    (Cap::Xcrs, "KVM_CAP_XCRS", false),
];

fn capabilities(kvm: &Kvm) -> Vec<Capability> {
    CAPABILITIES
        .iter()
        .map(|&(cap, name, required)| Capability {
            name,
            required,
            value: kvm.check_extension_int(cap),
        })
        .collect()
}

/// Whether KVM runs guest kernel code at hardware speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvmSpeed {
    /// Ring 0 runs about as fast as ring 3: VT-x/AMD-V at work.
    Hardware,
    /// Ring 0 is emulated by the host, orders of magnitude slower than ring 3.
    EmulatedRing0,
}

/// The timed loop in both guest rings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpeedProbe {
    /// Iterations of the ring-0 run.
    pub ring0_iterations: u64,
    /// Its time in seconds (VM entry/exit cost removed).
    pub ring0_seconds: f64,
    /// Ring-0 iterations per second.
    pub ring0_per_sec: f64,
    /// Iterations of the ring-3 run.
    pub ring3_iterations: u64,
    /// Its time in seconds.
    pub ring3_seconds: f64,
    /// Ring-3 iterations per second.
    pub ring3_per_sec: f64,
    /// How many times slower ring 0 ran than ring 3.
    pub ring0_slowdown: f64,
    /// The verdict.
    pub speed: KvmSpeed,
}

impl SpeedProbe {
    fn new(ring0: LoopRate, ring3: LoopRate) -> SpeedProbe {
        let (r0, r3) = (ring0.per_sec(), ring3.per_sec());
        let slowdown = r3 / r0;
        SpeedProbe {
            ring0_iterations: ring0.iterations,
            ring0_seconds: ring0.elapsed.as_secs_f64(),
            ring0_per_sec: r0,
            ring3_iterations: ring3.iterations,
            ring3_seconds: ring3.elapsed.as_secs_f64(),
            ring3_per_sec: r3,
            ring0_slowdown: slowdown,
            speed: if slowdown > EMULATED_RING0_SLOWDOWN {
                KvmSpeed::EmulatedRing0
            } else {
                KvmSpeed::Hardware
            },
        }
    }
}

fn run_probe(kvm: &Kvm, ring0: Budget, ring3: Budget) -> Result<SpeedProbe> {
    let mut vm = ProbeVm::new(kvm)?;
    let r0 = vm.measure(Ring::Zero, ring0)?;
    let r3 = vm.measure(Ring::Three, ring3)?;
    Ok(SpeedProbe::new(r0, r3))
}

/// Host facts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostReport {
    /// Kernel release (`uname -r`).
    pub kernel: Option<String>,
    /// The CPU.
    pub cpu: CpuInfo,
    /// MemTotal in bytes.
    pub memory_total_bytes: Option<u64>,
    /// MemAvailable in bytes.
    pub memory_available_bytes: Option<u64>,
}

/// What /dev/kvm offers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KvmReport {
    /// Opening /dev/kvm read/write.
    pub device: DeviceAccess,
    /// Loaded KVM modules (kvm, kvm_intel, kvm_amd, kvm_pvm).
    pub modules: Vec<String>,
    /// /sys/module/kvm_pvm exists: pagetable-based nested KVM that emulates guest ring 0.
    pub pvm: bool,
    /// KVM_GET_API_VERSION.
    pub api_version: Option<i32>,
    /// Capabilities kvmbox looks at.
    pub capabilities: Vec<Capability>,
    /// KVM_CAP_MAX_VCPUS.
    pub max_vcpus: Option<usize>,
    /// KVM_CAP_NR_VCPUS (recommended maximum).
    pub nr_vcpus: Option<usize>,
    /// The ring-0/ring-3 timing, when the probe VM ran.
    pub probe: Option<SpeedProbe>,
    /// Why the probe VM did not run.
    pub probe_error: Option<String>,
    /// KVM can run kvmbox VMs (see the crate docs).
    pub usable: bool,
}

impl KvmReport {
    fn missing(&self, required: bool) -> Vec<&'static str> {
        self.capabilities
            .iter()
            .filter(|c| c.required == required && c.value == 0)
            .map(|c| c.name)
            .collect()
    }
}

/// The accelerator `--accel auto` uses, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    /// The accelerator.
    pub accel: Accel,
    /// One sentence of why.
    pub reason: String,
}

impl Serialize for AccelChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("AccelChoice", 2)?;
        st.serialize_field("accel", accel_name(self.accel))?;
        st.serialize_field("reason", &self.reason)?;
        st.end()
    }
}

fn accel_name(a: Accel) -> &'static str {
    match a {
        Accel::Kvm => "kvm",
        Accel::Emu => "emu",
    }
}

/// Everything `kvmbox doctor` found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Host facts.
    pub host: HostReport,
    /// KVM facts.
    pub kvm: KvmReport,
    /// Opening /dev/net/tun read/write.
    pub tun: DeviceAccess,
    /// The software engine can run a guest.
    pub emu_usable: bool,
    /// One line each, in order.
    pub checks: Vec<Check>,
    /// KVM or the software engine can run VMs.
    pub can_run_vms: bool,
    /// What `--accel auto` picks.
    pub recommended_accel: AccelChoice,
}

/// "0.9" for 0.9 M, "3,558" for 3,558 M: millions with a decimal only below 10.
fn millions(per_sec: f64) -> String {
    let m = per_sec / 1e6;
    if m < 10.0 {
        format!("{m:.1}")
    } else {
        thousands(m.round() as u64)
    }
}

/// 3558 -> "3,558".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let first = match digits.len() % 3 {
        0 => 3,
        r => r,
    };
    let (head, rest) = digits.split_at(first.min(digits.len()));
    let mut out = head.to_string();
    for group in rest.as_bytes().chunks(3) {
        out.push(',');
        out.extend(group.iter().map(|&b| char::from(b)));
    }
    out
}

/// Why ring 0 is emulated, as far as the host tells.
fn emulation_cause(pvm: bool, hw_virt: bool) -> &'static str {
    match (pvm, hw_virt) {
        (true, false) => " (nested virtualization without VMX/SVM, module kvm_pvm)",
        (true, true) => " (module kvm_pvm)",
        (false, false) => " (no VMX/SVM on this CPU)",
        (false, true) => "",
    }
}

/// The plain-words speed verdict.
fn speed_sentence(p: &SpeedProbe, pvm: bool, hw_virt: bool) -> String {
    let rates = format!(
        "{} M vs {} M iterations/s",
        millions(p.ring0_per_sec),
        millions(p.ring3_per_sec)
    );
    match p.speed {
        KvmSpeed::EmulatedRing0 => format!(
            "guest ring-0 code runs {}x slower than ring 3 ({rates}): this KVM emulates guest \
             kernel mode{}; stock kernels will not boot usefully with --accel kvm; use --accel emu",
            thousands(p.ring0_slowdown.round() as u64),
            emulation_cause(pvm, hw_virt)
        ),
        KvmSpeed::Hardware => format!(
            "KVM runs guest ring 0 at hardware speed (ring 0 vs ring 3: {rates}, {:.1}x)",
            p.ring0_slowdown
        ),
    }
}

fn accel_for_speed(p: &SpeedProbe, pvm: bool, hw_virt: bool) -> AccelChoice {
    AccelChoice {
        accel: match p.speed {
            KvmSpeed::Hardware => Accel::Kvm,
            KvmSpeed::EmulatedRing0 => Accel::Emu,
        },
        reason: speed_sentence(p, pvm, hw_virt),
    }
}

fn emu(reason: String) -> AccelChoice {
    AccelChoice {
        accel: Accel::Emu,
        reason,
    }
}

fn pvm_loaded() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Cheap probe used by `--accel auto` at every start: KVM only when guest ring-0 code runs at
/// hardware speed. Opens /dev/kvm, checks the API version and required capabilities, and times
/// a short ring-0 loop against a ring-3 loop (a few ms). Never fails: any problem means `Emu`,
/// with the problem as the reason.
pub fn choose_accel() -> AccelChoice {
    choose_accel_probed().0
}

/// [`choose_accel`], and whether the answer came from a completed timing probe (the answers
/// worth keeping for the rest of the boot, see [`accel_cache`]).
fn choose_accel_probed() -> (AccelChoice, bool) {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            return (
                emu(format!(
                    "cannot open {KVM_PATH} ({}): using the software engine",
                    std::io::Error::from_raw_os_error(e.errno())
                )),
                false,
            )
        }
    };
    let api = kvm.get_api_version();
    if api != KVM_API_VERSION {
        return (
            emu(format!(
                "KVM API version {api} (kvmbox needs {KVM_API_VERSION}): using the software engine"
            )),
            false,
        );
    }
    let missing: Vec<&str> = CAPABILITIES
        .iter()
        .filter(|&&(cap, _, required)| required && !kvm.check_extension(cap))
        .map(|&(_, name, _)| name)
        .collect();
    if !missing.is_empty() {
        return (
            emu(format!(
                "KVM lacks {}: using the software engine",
                missing.join(", ")
            )),
            false,
        );
    }
    match run_probe(&kvm, QUICK_RING0, QUICK_RING3) {
        Ok(p) => (
            accel_for_speed(&p, pvm_loaded(), host::cpu_info().has_hw_virt()),
            true,
        ),
        Err(e) => (
            emu(format!(
                "KVM cannot run a test guest ({e}): using the software engine"
            )),
            false,
        ),
    }
}

/// Run every check for real (opens devices, creates a VM, times guest code: about half a
/// second). Never panics; every problem becomes a failed or warning [`Check`].
pub fn run_checks() -> Report {
    let cpu = host::cpu_info();
    let (total, avail) = host::memory().map_or((None, None), |(t, a)| (Some(t), Some(a)));
    let host = HostReport {
        kernel: host::kernel_release(),
        cpu,
        memory_total_bytes: total,
        memory_available_bytes: avail,
    };
    let modules = host::kvm_modules();
    let mut kvm = KvmReport {
        device: host::open_rw(KVM_PATH),
        pvm: modules.iter().any(|m| m == "kvm_pvm"),
        modules,
        api_version: None,
        capabilities: Vec::new(),
        max_vcpus: None,
        nr_vcpus: None,
        probe: None,
        probe_error: None,
        usable: false,
    };
    if kvm.device.openable {
        match Kvm::new() {
            Ok(k) => {
                kvm.api_version = Some(k.get_api_version());
                kvm.capabilities = capabilities(&k);
                kvm.max_vcpus = Some(k.get_max_vcpus());
                kvm.nr_vcpus = Some(k.get_nr_vcpus());
                match run_probe(&k, FULL_RING0, FULL_RING3) {
                    Ok(p) => kvm.probe = Some(p),
                    Err(e) => kvm.probe_error = Some(e.to_string()),
                }
            }
            Err(e) => {
                kvm.device.openable = false;
                kvm.device.error = Some(std::io::Error::from_raw_os_error(e.errno()).to_string());
                kvm.device.errno = Some(e.errno());
            }
        }
    }
    kvm.usable = kvm.device.openable
        && kvm.api_version == Some(KVM_API_VERSION)
        && kvm.missing(true).is_empty()
        && kvm.probe.is_some();
    let tun = host::open_rw(TUN_PATH);
    Report::assemble(host, kvm, tun)
}

impl Report {
    /// Derive the checks, the verdict and the accelerator choice from the facts.
    pub fn assemble(host: HostReport, kvm: KvmReport, tun: DeviceAccess) -> Report {
        let emu_usable = host.memory_available_bytes.is_none_or(|a| a >= MIN_MEMORY);
        let hw_virt = host.cpu.has_hw_virt();
        let recommended_accel = if !kvm.usable {
            emu(format!(
                "KVM is not usable here ({}): the software engine runs the guest",
                kvm_problem(&kvm)
            ))
        } else if let Some(p) = &kvm.probe {
            accel_for_speed(p, kvm.pvm, hw_virt)
        } else {
            emu("KVM was not timed: the software engine runs the guest".to_string())
        };
        let mut checks = vec![
            cpu_check(&host.cpu),
            Check::new(
                "kernel",
                Status::Ok,
                host.kernel
                    .clone()
                    .unwrap_or_else(|| "unknown (no /proc/sys/kernel/osrelease)".into()),
                None,
            ),
            memory_check(&host),
            module_check(&kvm),
        ];
        checks.extend(kvm_checks(&kvm, hw_virt));
        checks.push(tun_check(&tun));
        checks.push(if emu_usable {
            Check::new(
                "software engine",
                Status::Ok,
                "kvmbox's x86-64 engine needs no kernel support: usable".into(),
                None,
            )
        } else {
            Check::new(
                "software engine",
                Status::Fail,
                format!(
                    "less than {} MiB of memory available for a guest",
                    MIN_MEMORY >> 20
                ),
                Some("free host memory"),
            )
        });
        checks.push(Check::new(
            "accel auto",
            Status::Ok,
            format!(
                "picks {}: {}",
                accel_name(recommended_accel.accel),
                recommended_accel.reason
            ),
            None,
        ));
        Report {
            host,
            can_run_vms: kvm.usable || emu_usable,
            kvm,
            tun,
            emu_usable,
            checks,
            recommended_accel,
        }
    }

    /// VMs can run here (KVM or the software engine): `kvmbox doctor` exits 0 when true.
    pub fn can_run_vms(&self) -> bool {
        self.can_run_vms
    }

    /// Human text: one line per check ("ok"/"warn"/"FAIL", the name, the finding and, for a
    /// failure or warning, its remedy after "fix:"), then a verdict line.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            out.push_str(&format!(
                "{:<4}  {:<16} {}",
                c.status.label(),
                c.name,
                c.finding
            ));
            if let Some(r) = &c.remedy {
                out.push_str(&format!(" -> fix: {r}"));
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "verdict: {}; --accel auto uses {}\n",
            if self.can_run_vms {
                "this host can run kvmbox VMs"
            } else {
                "this host cannot run kvmbox VMs"
            },
            accel_name(self.recommended_accel.accel)
        ));
        out
    }

    /// The whole report as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(
            |e| serde_json::json!({ "error": format!("report not serializable: {e}") }),
        )
    }

    /// What `--accel auto` picks, and why.
    pub fn recommended_accel(&self) -> AccelChoice {
        self.recommended_accel.clone()
    }
}

fn kvm_problem(kvm: &KvmReport) -> String {
    if !kvm.device.openable {
        return format!(
            "{KVM_PATH}: {}",
            kvm.device.error.as_deref().unwrap_or("cannot open")
        );
    }
    if let Some(v) = kvm.api_version.filter(|&v| v != KVM_API_VERSION) {
        return format!("API version {v}");
    }
    let missing = kvm.missing(true);
    if !missing.is_empty() {
        return format!("missing {}", missing.join(", "));
    }
    kvm.probe_error
        .clone()
        .unwrap_or_else(|| "test guest did not run".into())
}

fn cpu_check(cpu: &CpuInfo) -> Check {
    let id = format!(
        "{} {} (family {:#x}, model {:#x}, stepping {})",
        cpu.vendor, cpu.model_name, cpu.family, cpu.model, cpu.stepping
    );
    let hv = if cpu.hypervisor {
        "; this host is itself a virtual machine"
    } else {
        ""
    };
    if cpu.has_hw_virt() {
        let which = if cpu.cpuid_vmx || cpu.cpuinfo_vmx {
            "vmx (VT-x)"
        } else {
            "svm (AMD-V)"
        };
        Check::new("cpu", Status::Ok, format!("{id}: {which}{hv}"), None)
    } else {
        Check::new(
            "cpu",
            Status::Warn,
            format!("{id}: no vmx/svm flag in CPUID or /proc/cpuinfo{hv}"),
            Some(
                "enable virtualization (VT-x/AMD-V/SVM) in firmware, or nested virtualization \
                 for this VM on its host",
            ),
        )
    }
}

fn memory_check(host: &HostReport) -> Check {
    match (host.memory_total_bytes, host.memory_available_bytes) {
        (Some(t), Some(a)) => Check::new(
            "memory",
            if a >= MIN_MEMORY {
                Status::Ok
            } else {
                Status::Fail
            },
            format!(
                "{} MiB total, {} MiB available",
                thousands(t >> 20),
                thousands(a >> 20)
            ),
            (a < MIN_MEMORY).then_some("free host memory"),
        ),
        _ => Check::new(
            "memory",
            Status::Warn,
            "unknown (cannot read /proc/meminfo)".into(),
            Some("mount /proc"),
        ),
    }
}

const KVM_MODULE_REMEDY: &str = "load kvm_intel (Intel) or kvm_amd (AMD): `modprobe kvm_intel` \
     or `modprobe kvm_amd`; if that fails, enable virtualization (VT-x/AMD-V/SVM) in firmware";

fn module_check(kvm: &KvmReport) -> Check {
    let vendor: Vec<&str> = kvm
        .modules
        .iter()
        .map(String::as_str)
        .filter(|m| *m != "kvm")
        .collect();
    if !vendor.is_empty() {
        let pvm = if kvm.pvm {
            " (kvm_pvm: pagetable-based nested virtualization, emulates guest ring 0)"
        } else {
            ""
        };
        Check::new(
            "kvm module",
            Status::Ok,
            format!("{} loaded{pvm}", vendor.join(", ")),
            None,
        )
    } else if kvm.device.present {
        Check::new(
            "kvm module",
            Status::Ok,
            "no kvm_intel/kvm_amd/kvm_pvm in /sys/module, but /dev/kvm exists (built in)".into(),
            None,
        )
    } else {
        Check::new(
            "kvm module",
            Status::Fail,
            "no KVM module loaded (kvm_intel, kvm_amd)".into(),
            Some(KVM_MODULE_REMEDY),
        )
    }
}

fn kvm_checks(kvm: &KvmReport, hw_virt: bool) -> Vec<Check> {
    let dev = &kvm.device;
    if !dev.openable {
        let err = dev.error.as_deref().unwrap_or("cannot open");
        let denied = matches!(dev.errno, Some(libc::EACCES) | Some(libc::EPERM));
        let (finding, remedy) = if !dev.present {
            (format!("{KVM_PATH} absent"), KVM_MODULE_REMEDY)
        } else if denied {
            (
                format!("{KVM_PATH} present but not openable read/write: {err}"),
                "add the user to the kvm group (`usermod -aG kvm $USER`, then log in again) or \
                 fix /dev/kvm permissions (`chown root:kvm /dev/kvm; chmod 660 /dev/kvm`)",
            )
        } else {
            (
                format!("{KVM_PATH} present but does not open: {err}"),
                "check `dmesg` for KVM errors and reload kvm_intel/kvm_amd; enable virtualization \
                 (VT-x/AMD-V/SVM) in firmware",
            )
        };
        return vec![Check::new(KVM_PATH, Status::Fail, finding, Some(remedy))];
    }
    let mut checks = vec![Check::new(
        KVM_PATH,
        Status::Ok,
        format!("{KVM_PATH} opens read/write"),
        None,
    )];
    match kvm.api_version {
        Some(KVM_API_VERSION) => checks.push(Check::new(
            "kvm api",
            Status::Ok,
            format!("API version {KVM_API_VERSION}"),
            None,
        )),
        v => checks.push(Check::new(
            "kvm api",
            Status::Fail,
            format!(
                "API version {} (kvmbox needs {KVM_API_VERSION})",
                v.map_or("unknown".into(), |v| v.to_string())
            ),
            Some("upgrade the host kernel"),
        )),
    }
    let required: Vec<&str> = kvm
        .capabilities
        .iter()
        .filter(|c| c.required)
        .map(|c| c.name)
        .collect();
    let missing = kvm.missing(true);
    checks.push(if missing.is_empty() {
        Check::new(
            "kvm caps",
            Status::Ok,
            format!(
                "all {} required present ({})",
                required.len(),
                required.join(" ")
            ),
            None,
        )
    } else {
        Check::new(
            "kvm caps",
            Status::Fail,
            format!("required capabilities missing: {}", missing.join(" ")),
            Some("upgrade the host kernel, or use --accel emu"),
        )
    });
    let nice_missing = kvm.missing(false);
    let nice: Vec<&str> = kvm
        .capabilities
        .iter()
        .filter(|c| !c.required)
        .map(|c| c.name)
        .collect();
    checks.push(if nice_missing.is_empty() {
        Check::new(
            "kvm optional",
            Status::Ok,
            format!("all {} optional present ({})", nice.len(), nice.join(" ")),
            None,
        )
    } else {
        Check::new(
            "kvm optional",
            Status::Warn,
            format!(
                "optional capabilities missing: {} (kvmbox does without)",
                nice_missing.join(" ")
            ),
            Some("upgrade the host kernel to get them"),
        )
    });
    checks.push(Check::new(
        "kvm vcpus",
        Status::Ok,
        format!(
            "up to {} vCPUs per VM (KVM_CAP_MAX_VCPUS), {} recommended (KVM_CAP_NR_VCPUS)",
            kvm.max_vcpus.unwrap_or(0),
            kvm.nr_vcpus.unwrap_or(0)
        ),
        None,
    ));
    checks.push(match (&kvm.probe, &kvm.probe_error) {
        (Some(p), _) => match p.speed {
            KvmSpeed::Hardware => Check::new(
                "kvm speed",
                Status::Ok,
                format!("hardware: {}", speed_sentence(p, kvm.pvm, hw_virt)),
                None,
            ),
            KvmSpeed::EmulatedRing0 => Check::new(
                "kvm speed",
                Status::Warn,
                format!("emulated-ring0: {}", speed_sentence(p, kvm.pvm, hw_virt)),
                Some(
                    "use --accel emu (what --accel auto picks here), or a host with VT-x/AMD-V \
                     (kvm_intel/kvm_amd) for KVM",
                ),
            ),
        },
        (None, err) => Check::new(
            "kvm speed",
            Status::Fail,
            format!(
                "could not run a test guest: {}",
                err.as_deref().unwrap_or("not attempted")
            ),
            Some("check `dmesg` for KVM errors; use --accel emu meanwhile"),
        ),
    });
    checks
}

fn tun_check(tun: &DeviceAccess) -> Check {
    if tun.openable {
        return Check::new(
            "tun",
            Status::Ok,
            format!("{TUN_PATH} opens read/write (tap networking available)"),
            None,
        );
    }
    let err = tun.error.as_deref().unwrap_or("cannot open");
    let (finding, remedy) = if !tun.present {
        (format!("{TUN_PATH} absent"), "`modprobe tun`")
    } else if matches!(tun.errno, Some(libc::EACCES) | Some(libc::EPERM)) {
        (
            format!("{TUN_PATH} not openable: {err}"),
            "run kvmbox as root, or give the user access to /dev/net/tun and CAP_NET_ADMIN",
        )
    } else {
        (format!("{TUN_PATH} does not open: {err}"), "`modprobe tun`")
    };
    Check::new(
        "tun",
        Status::Warn,
        format!("{finding}: tap networking unavailable (VMs without --net still run)"),
        Some(remedy),
    )
}

#[cfg(test)]
mod tests;
