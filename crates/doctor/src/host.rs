//! Facts about the host: CPU, kernel, memory, KVM modules, the TUN device.

use serde::Serialize;

/// The host CPU as CPUID and /proc/cpuinfo describe it.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CpuInfo {
    /// CPUID vendor string ("GenuineIntel", "AuthenticAMD", ...).
    pub vendor: String,
    /// CPUID brand string (falls back to /proc/cpuinfo "model name").
    pub model_name: String,
    /// Display family (CPUID leaf 1, extended family folded in).
    pub family: u32,
    /// Display model.
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
    /// CPUID.1:ECX.VMX (Intel VT-x).
    pub cpuid_vmx: bool,
    /// CPUID.80000001h:ECX.SVM (AMD-V).
    pub cpuid_svm: bool,
    /// CPUID.1:ECX bit 31: this host is itself a virtual machine.
    pub hypervisor: bool,
    /// "vmx" is in /proc/cpuinfo's flags.
    pub cpuinfo_vmx: bool,
    /// "svm" is in /proc/cpuinfo's flags.
    pub cpuinfo_svm: bool,
}

impl CpuInfo {
    /// True when either source shows VT-x or AMD-V.
    pub fn has_hw_virt(&self) -> bool {
        self.cpuid_vmx || self.cpuid_svm || self.cpuinfo_vmx || self.cpuinfo_svm
    }
}

fn cpuid(leaf: u32) -> core::arch::x86_64::CpuidResult {
    // CPUID is available on every x86-64 CPU and has no side effects; `unused_unsafe` covers
    // toolchains where the intrinsic is already safe.
    #[allow(unused_unsafe)]
    // SAFETY: see above.
    unsafe {
        core::arch::x86_64::__cpuid(leaf)
    }
}

fn regs_to_string(regs: &[u32]) -> String {
    let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
    String::from_utf8_lossy(&bytes)
        .trim_matches(char::from(0))
        .trim()
        .to_string()
}

/// Read the host CPU's identity and virtualization flags.
pub fn cpu_info() -> CpuInfo {
    let l0 = cpuid(0);
    let vendor = regs_to_string(&[l0.ebx, l0.edx, l0.ecx]);
    let l1 = cpuid(1);
    let base_family = (l1.eax >> 8) & 0xf;
    let base_model = (l1.eax >> 4) & 0xf;
    let family = if base_family == 0xf {
        base_family + ((l1.eax >> 20) & 0xff)
    } else {
        base_family
    };
    let model = if base_family == 0x6 || base_family == 0xf {
        base_model | (((l1.eax >> 16) & 0xf) << 4)
    } else {
        base_model
    };
    let max_ext = cpuid(0x8000_0000).eax;
    let cpuid_svm = max_ext >= 0x8000_0001 && cpuid(0x8000_0001).ecx & (1 << 2) != 0;
    let mut model_name = String::new();
    if max_ext >= 0x8000_0004 {
        let mut regs = Vec::new();
        for leaf in 0x8000_0002..=0x8000_0004 {
            let r = cpuid(leaf);
            regs.extend([r.eax, r.ebx, r.ecx, r.edx]);
        }
        model_name = regs_to_string(&regs);
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    if model_name.is_empty() {
        model_name = field("model name").unwrap_or_default();
    }
    let flags = field("flags").unwrap_or_default();
    let has_flag = |f: &str| flags.split_whitespace().any(|x| x == f);
    CpuInfo {
        vendor,
        model_name,
        family,
        model,
        stepping: l1.eax & 0xf,
        cpuid_vmx: l1.ecx & (1 << 5) != 0,
        cpuid_svm,
        hypervisor: l1.ecx & (1 << 31) != 0,
        cpuinfo_vmx: has_flag("vmx"),
        cpuinfo_svm: has_flag("svm"),
    }
}

/// The running kernel's release string (`uname -r`).
pub fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Host memory in bytes: (MemTotal, MemAvailable) from /proc/meminfo.
pub fn memory() -> Option<(u64, u64)> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// Parse MemTotal and MemAvailable (kB) out of /proc/meminfo text.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let kb = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|v| v.saturating_mul(1024))
    };
    Some((kb("MemTotal")?, kb("MemAvailable")?))
}

/// KVM kernel modules that are loaded (or built in): any of kvm, kvm_intel, kvm_amd, kvm_pvm.
pub fn kvm_modules() -> Vec<String> {
    ["kvm", "kvm_intel", "kvm_amd", "kvm_pvm"]
        .iter()
        .filter(|m| std::path::Path::new("/sys/module").join(m).exists())
        .map(|m| m.to_string())
        .collect()
}

/// Whether a character device can be opened read/write.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceAccess {
    /// The device path.
    pub path: String,
    /// The node exists.
    pub present: bool,
    /// It opened read/write.
    pub openable: bool,
    /// Why it did not open.
    pub error: Option<String>,
    /// errno of the failed open.
    #[serde(skip)]
    pub errno: Option<i32>,
}

/// Try to open `path` read/write.
pub fn open_rw(path: &str) -> DeviceAccess {
    let present = std::path::Path::new(path).exists();
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => DeviceAccess {
            path: path.to_string(),
            present: true,
            openable: true,
            error: None,
            errno: None,
        },
        Err(e) => DeviceAccess {
            path: path.to_string(),
            present,
            openable: false,
            error: Some(e.to_string()),
            errno: e.raw_os_error(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parses_total_and_available() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some((24_576_000 * 1024, 20_000_000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn cpu_vendor_is_read() {
        let cpu = cpu_info();
        assert_eq!(cpu.vendor.len(), 12, "CPUID vendor string: {cpu:?}");
        assert!(cpu.family > 0, "CPU family 0: {cpu:?}");
    }
}
