//! The test guest on the software engine (`--accel emu`) must report what it reports on KVM,
//! scenario by scenario: same devices, same firmware, same results. Only timings and the CPU
//! model (vendor, family, hypervisor signature) may differ.

mod common;

use common::{kvm_or_skip, run_testguest, RunResult};
use std::collections::BTreeMap;

/// Keys that legitimately differ between engines: timings, and the CPU model each engine
/// presents (KVM passes the host's; the engine lists only what it implements, which has no
/// extended-topology leaf 0xB: the CPU count is compared through leaf 1 and the MADT).
const MODEL_KEYS: &[&str] = &[
    "cycles",
    "vendor",
    "max_leaf",
    "max_ext",
    "family",
    "model",
    "stepping",
    "hypervisor",
    "hv_max",
    "leafb_logical",
    // How ring-3 port I/O got done: natively under IOPL 3 (the engine, hardware KVM) or
    // through the guest's #GP handler (this host's kvm_pvm drops IOPL). Same result either way.
    "mode",
    "trapped",
];

fn comparable(r: &RunResult) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut res = r.results();
    for kv in res.values_mut() {
        kv.retain(|k, _| !MODEL_KEYS.contains(&k.as_str()));
    }
    res
}

fn same_on_both(cpus: u32, memory: &str, scenarios: &str) {
    let emu = run_testguest("emu", cpus, memory, scenarios, &[]);
    emu.assert_guest_ok();
    if !kvm_or_skip(&format!("emu-vs-kvm {scenarios}")) {
        return;
    }
    let kvm = run_testguest("kvm", cpus, memory, scenarios, &[]);
    kvm.assert_guest_ok();
    assert_eq!(
        comparable(&emu),
        comparable(&kvm),
        "{scenarios} with {cpus} vCPUs: emu and kvm disagree\nemu console:\n{}\nkvm console:\n{}",
        emu.stdout,
        kvm.stdout
    );
}

#[test]
fn hello() {
    same_on_both(1, "128M", "hello");
    let r = run_testguest("emu", 1, "128M", "hello", &["--no-pvh"]);
    r.assert_guest_ok();
    assert_eq!(r.get("hello", "entry"), "linux64");
}

#[test]
fn cpuid_and_acpi() {
    for cpus in [1, 2, 4] {
        same_on_both(cpus, "128M", "cpuid,acpi");
    }
}

#[test]
fn smp() {
    for cpus in [1, 2, 4] {
        same_on_both(cpus, "128M", "smp");
    }
}

#[test]
fn mem() {
    same_on_both(1, "128M", "mem");
}

#[test]
fn pio_and_mmio() {
    same_on_both(1, "128M", "pio:500,mmio:500,pio3:50");
}

#[test]
fn compute() {
    same_on_both(1, "128M", "compute:2000000");
}

#[test]
fn serial_interrupt() {
    same_on_both(1, "128M", "irq");
    same_on_both(2, "128M", "irq");
}

#[test]
fn level_triggered_and_pic_interrupts() {
    same_on_both(1, "128M", "irqlevel,irqpic");
}

#[test]
fn exceptions_are_reported_the_same() {
    let emu = run_testguest("emu", 1, "128M", "fault", &[]);
    assert_eq!(emu.status, Some(3), "fault scenario fails on purpose");
    let e = emu.results();
    assert_eq!(e["exception"]["vector"], "14", "page fault");
    if !kvm_or_skip("emu-vs-kvm fault") {
        return;
    }
    let kvm = run_testguest("kvm", 1, "128M", "fault", &[]);
    assert_eq!(comparable(&emu), comparable(&kvm));
}

/// ACPI S3: the guest suspends with an RTC alarm armed; the alarm wakes it and it resumes in
/// real mode at the waking vector it left in the FACS, memory kept (the resume code and its
/// message were written before the suspend), and exits from there.
#[test]
fn s3_suspend_and_rtc_alarm_wake() {
    run_testguest("emu", 1, "128M", "s3", &[]).check_s3();
}

#[test]
fn power_and_reset() {
    for (scenario, status) in [
        ("poweroff", 0),
        ("reboot", 4),
        ("reboot:acpi", 4),
        ("triplefault", 4),
    ] {
        let r = run_testguest("emu", 1, "128M", scenario, &[]);
        assert_eq!(
            r.status,
            Some(status),
            "{scenario}: {}\n{}",
            r.stdout,
            r.stderr
        );
    }
}
