//! Rendering and JSON shape, on reports assembled from fixed facts.

use super::*;

fn cpu(vmx: bool) -> CpuInfo {
    CpuInfo {
        vendor: "AuthenticAMD".into(),
        model_name: "AMD EPYC".into(),
        family: 0x17,
        model: 0x31,
        stepping: 0,
        cpuid_vmx: false,
        cpuid_svm: vmx,
        hypervisor: true,
        cpuinfo_vmx: false,
        cpuinfo_svm: vmx,
    }
}

fn host(hw_virt: bool) -> HostReport {
    HostReport {
        kernel: Some("6.18.44".into()),
        cpu: cpu(hw_virt),
        memory_total_bytes: Some(24 << 30),
        memory_available_bytes: Some(20 << 30),
    }
}

fn dev(path: &str, present: bool, errno: Option<i32>) -> DeviceAccess {
    DeviceAccess {
        path: path.into(),
        present,
        openable: errno.is_none() && present,
        error: errno.map(|e| std::io::Error::from_raw_os_error(e).to_string()),
        errno,
    }
}

fn all_caps() -> Vec<Capability> {
    CAPABILITIES
        .iter()
        .map(|&(_, name, required)| Capability {
            name,
            required,
            value: 1,
        })
        .collect()
}

fn rate(iterations: u64, ms: u64) -> LoopRate {
    LoopRate {
        iterations,
        elapsed: Duration::from_millis(ms),
    }
}

fn kvm_ok(pvm: bool, probe: SpeedProbe) -> KvmReport {
    KvmReport {
        device: dev(KVM_PATH, true, None),
        modules: if pvm {
            vec!["kvm".into(), "kvm_pvm".into()]
        } else {
            vec!["kvm".into(), "kvm_amd".into()]
        },
        pvm,
        api_version: Some(12),
        capabilities: all_caps(),
        max_vcpus: Some(1024),
        nr_vcpus: Some(2),
        probe: Some(probe),
        probe_error: None,
        usable: true,
    }
}

fn kvm_absent() -> KvmReport {
    KvmReport {
        device: dev(KVM_PATH, false, Some(libc::ENOENT)),
        modules: vec![],
        pvm: false,
        api_version: None,
        capabilities: vec![],
        max_vcpus: None,
        nr_vcpus: None,
        probe: None,
        probe_error: None,
        usable: false,
    }
}

fn emulated() -> SpeedProbe {
    // 180k iterations in 200 ms (0.9 M/s) vs 512M in 144 ms (3,556 M/s).
    SpeedProbe::new(rate(180_000, 200), rate(512_000_000, 144))
}

fn hardware() -> SpeedProbe {
    SpeedProbe::new(rate(512_000_000, 150), rate(512_000_000, 145))
}

#[test]
fn number_formatting() {
    assert_eq!(thousands(0), "0");
    assert_eq!(thousands(999), "999");
    assert_eq!(thousands(3558), "3,558");
    assert_eq!(thousands(1_234_567), "1,234,567");
    assert_eq!(millions(900_000.0), "0.9");
    assert_eq!(millions(3_558_000_000.0), "3,558");
}

#[test]
fn emulated_ring0_is_stated_in_plain_words() {
    let r = Report::assemble(
        host(false),
        kvm_ok(true, emulated()),
        dev(TUN_PATH, true, None),
    );
    assert_eq!(
        r.kvm.probe.as_ref().map(|p| p.speed),
        Some(KvmSpeed::EmulatedRing0)
    );
    assert!(r.can_run_vms());
    let choice = r.recommended_accel();
    assert_eq!(choice.accel, Accel::Emu);
    assert_eq!(
        choice.reason,
        "guest ring-0 code runs 3,951x slower than ring 3 (0.9 M vs 3,556 M iterations/s): this \
         KVM emulates guest kernel mode (nested virtualization without VMX/SVM, module kvm_pvm); \
         stock kernels will not boot usefully with --accel kvm; use --accel emu"
    );
    let text = r.render_text();
    let speed = text.lines().find(|l| l.contains("kvm speed")).unwrap();
    assert!(speed.starts_with("warn "), "{speed}");
    assert!(
        speed.contains("emulated-ring0: guest ring-0 code runs 3,951x slower"),
        "{speed}"
    );
    assert!(speed.contains("-> fix: use --accel emu"), "{speed}");
    let cpu = text.lines().find(|l| l.contains(" cpu ")).unwrap();
    assert!(
        cpu.starts_with("warn ") && cpu.contains("no vmx/svm"),
        "{cpu}"
    );
    assert!(text.ends_with("verdict: this host can run kvmbox VMs; --accel auto uses emu\n"));
}

#[test]
fn hardware_kvm_is_picked() {
    let r = Report::assemble(
        host(true),
        kvm_ok(false, hardware()),
        dev(TUN_PATH, true, None),
    );
    assert_eq!(r.recommended_accel().accel, Accel::Kvm);
    assert!(r
        .recommended_accel()
        .reason
        .starts_with("KVM runs guest ring 0 at hardware speed"));
    let text = r.render_text();
    assert!(!text.contains("FAIL") && !text.contains("warn"), "{text}");
    assert_eq!(text.lines().count(), r.checks.len() + 1);
}

#[test]
fn every_failure_names_its_remedy() {
    let r = Report::assemble(
        host(false),
        kvm_absent(),
        dev(TUN_PATH, false, Some(libc::ENOENT)),
    );
    let text = r.render_text();
    for c in &r.checks {
        if c.status != Status::Ok {
            assert!(c.remedy.is_some(), "{c:?} without remedy");
        }
    }
    let kvm = text
        .lines()
        .find(|l| l.contains("/dev/kvm absent"))
        .unwrap();
    assert!(kvm.starts_with("FAIL "), "{kvm}");
    assert!(
        kvm.contains("modprobe kvm_intel") && kvm.contains("VT-x/AMD-V/SVM"),
        "{kvm}"
    );
    assert!(text.contains("-> fix: `modprobe tun`"), "{text}");
    // No KVM, but the software engine still runs guests.
    assert!(r.can_run_vms());
    assert_eq!(r.recommended_accel().accel, Accel::Emu);
    assert!(r.recommended_accel().reason.contains("/dev/kvm"));
}

#[test]
fn permission_denied_points_at_the_kvm_group() {
    let mut kvm = kvm_absent();
    kvm.device = dev(KVM_PATH, true, Some(libc::EACCES));
    kvm.modules = vec!["kvm".into(), "kvm_intel".into()];
    let r = Report::assemble(host(true), kvm, dev(TUN_PATH, true, None));
    let line = r
        .render_text()
        .lines()
        .find(|l| l.contains("not openable"))
        .unwrap()
        .to_string();
    assert!(
        line.starts_with("FAIL ") && line.contains("kvm group"),
        "{line}"
    );
}

#[test]
fn missing_required_capability_makes_kvm_unusable() {
    let mut kvm = kvm_ok(false, hardware());
    kvm.capabilities[0].value = 0;
    kvm.usable = false;
    let r = Report::assemble(host(true), kvm, dev(TUN_PATH, true, None));
    let caps = r.checks.iter().find(|c| c.name == "kvm caps").unwrap();
    assert_eq!(caps.status, Status::Fail);
    assert!(caps.finding.contains("KVM_CAP_IRQCHIP"));
    assert_eq!(r.recommended_accel().accel, Accel::Emu);
}

#[test]
fn nothing_runs_without_memory_or_kvm() {
    let mut h = host(false);
    h.memory_available_bytes = Some(1 << 20);
    let r = Report::assemble(h, kvm_absent(), dev(TUN_PATH, true, None));
    assert!(!r.can_run_vms());
    assert!(r
        .render_text()
        .contains("verdict: this host cannot run kvmbox VMs"));
    assert_eq!(r.to_json()["can_run_vms"], false);
}

#[test]
fn json_is_one_object_with_every_section() {
    let r = Report::assemble(
        host(false),
        kvm_ok(true, emulated()),
        dev(TUN_PATH, true, None),
    );
    let j = r.to_json();
    let obj = j.as_object().expect("one JSON object");
    for key in [
        "host",
        "kvm",
        "tun",
        "emu_usable",
        "checks",
        "can_run_vms",
        "recommended_accel",
    ] {
        assert!(obj.contains_key(key), "missing {key}: {j}");
    }
    assert_eq!(j["recommended_accel"]["accel"], "emu");
    assert_eq!(j["kvm"]["probe"]["speed"], "emulated-ring0");
    assert_eq!(j["kvm"]["pvm"], true);
    assert_eq!(j["kvm"]["api_version"], 12);
    assert_eq!(j["host"]["kernel"], "6.18.44");
    assert_eq!(j["host"]["cpu"]["vendor"], "AuthenticAMD");
    assert!(j["kvm"]["probe"]["ring3_per_sec"].as_f64().unwrap() > 3e9);
    let caps = j["kvm"]["capabilities"].as_array().unwrap();
    assert!(caps
        .iter()
        .any(|c| c["name"] == "KVM_CAP_IRQFD" && c["required"] == true));
    assert!(caps
        .iter()
        .any(|c| c["name"] == "KVM_CAP_TSC_DEADLINE_TIMER" && c["required"] == false));
    let checks = j["checks"].as_array().unwrap();
    assert_eq!(checks.len(), r.checks.len());
    assert!(checks
        .iter()
        .all(|c| ["ok", "warn", "fail"].contains(&c["status"].as_str().unwrap())));
    // Round-trips through text as one object.
    let reparsed: serde_json::Value = serde_json::from_str(&j.to_string()).unwrap();
    assert_eq!(reparsed, j);
}
