//! The freestanding test guest on KVM: what the guest itself saw and did.
//! Its heavy loops run in guest ring 3, which runs natively even on this host's kvm_pvm.

mod common;

use common::{kvm_or_skip, run_testguest};
use std::sync::Mutex;

/// Large guests run one at a time.
static BIG: Mutex<()> = Mutex::new(());

#[test]
fn hello_through_pvh_and_linux64_entries() {
    if !kvm_or_skip("hello_through_pvh_and_linux64_entries") {
        return;
    }
    let r = run_testguest("kvm", 1, "128M", "hello", &[]);
    r.assert_guest_ok();
    assert_eq!(r.get("hello", "msg"), "hello-from-guest");
    assert_eq!(r.get("hello", "entry"), "pvh");
    assert_eq!(r.get("hello", "cmdline"), "tests=hello");
    let r = run_testguest("kvm", 1, "128M", "hello", &["--no-pvh"]);
    r.assert_guest_ok();
    assert_eq!(r.get("hello", "entry"), "linux64");
}

#[test]
fn cpuid_and_acpi_show_the_configured_cpus() {
    if !kvm_or_skip("cpuid_and_acpi_show_the_configured_cpus") {
        return;
    }
    let host_vendor = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("vendor_id")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap();
    for cpus in [1u32, 2, 4] {
        let r = run_testguest("kvm", cpus, "128M", "cpuid,acpi", &[]);
        r.assert_guest_ok();
        assert_eq!(r.get("cpuid", "vendor"), host_vendor);
        assert_eq!(r.get("cpuid", "hypervisor"), "KVMKVMKVM");
        assert_eq!(
            r.get("cpuid", "logical"),
            cpus.to_string(),
            "CPUID topology"
        );
        assert_eq!(r.get("acpi", "cpus"), cpus.to_string(), "MADT processors");
        assert_eq!(r.get("acpi", "checksums"), "ok");
        assert_eq!(r.get("acpi", "ioapic"), "0xfec00000");
        let tables = r.get("acpi", "tables");
        for t in ["FACP", "APIC"] {
            assert!(
                tables.split(',').any(|x| x == t),
                "{t} missing from {tables}"
            );
        }
    }
}

#[test]
fn every_vcpu_starts_and_checks_in() {
    if !kvm_or_skip("every_vcpu_starts_and_checks_in") {
        return;
    }
    for cpus in [1u32, 2, 4] {
        let r = run_testguest("kvm", cpus, "128M", "smp", &[]);
        r.assert_guest_ok();
        assert_eq!(r.get("smp", "expected"), cpus.to_string());
        assert_eq!(r.get("smp", "online"), cpus.to_string());
        let ids: Vec<String> = (0..cpus).map(|i| i.to_string()).collect();
        assert_eq!(r.get("smp", "apic_ids"), ids.join(","));
    }
}

#[test]
fn all_guest_ram_holds_a_pattern_128m() {
    if !kvm_or_skip("all_guest_ram_holds_a_pattern_128m") {
        return;
    }
    let r = run_testguest("kvm", 1, "128M", "mem", &[]);
    r.assert_guest_ok();
    assert_eq!(r.get("mem", "errors"), "0");
    let ram: u64 = r.get("mem", "ram_mib").parse().unwrap();
    assert!((126..=128).contains(&ram), "guest saw {ram} MiB of 128");
    let tested: u64 = r.get("mem", "tested_mib").parse().unwrap();
    assert!(tested >= 120, "tested only {tested} MiB");
}

#[test]
fn all_guest_ram_holds_a_pattern_8g() {
    if !kvm_or_skip("all_guest_ram_holds_a_pattern_8g") {
        return;
    }
    let _big = BIG.lock().unwrap_or_else(|e| e.into_inner());
    let r = run_testguest("kvm", 2, "8G", "mem", &[]);
    r.assert_guest_ok();
    assert_eq!(r.get("mem", "errors"), "0");
    let ram: u64 = r.get("mem", "ram_mib").parse().unwrap();
    assert!(
        (8180..=8192).contains(&ram),
        "guest saw {ram} MiB of 8192 (32-bit hole handled?)"
    );
    let tested: u64 = r.get("mem", "tested_mib").parse().unwrap();
    assert!(tested >= 8100, "tested only {tested} MiB");
}

#[test]
fn port_and_mmio_round_trips() {
    if !kvm_or_skip("port_and_mmio_round_trips") {
        return;
    }
    let r = run_testguest("kvm", 1, "128M", "pio:2000,mmio:2000", &[]);
    r.assert_guest_ok();
    assert_eq!(r.get("pio", "count"), "2000");
    assert_eq!(r.get("pio", "bad"), "0");
    assert_eq!(r.get("mmio", "count"), "2000");
    assert_eq!(r.get("mmio", "bad"), "0");
}

#[test]
fn compute_is_deterministic() {
    if !kvm_or_skip("compute_is_deterministic") {
        return;
    }
    let a = run_testguest("kvm", 1, "128M", "compute:10000000", &[]);
    a.assert_guest_ok();
    let b = run_testguest("kvm", 2, "256M", "compute:10000000", &[]);
    b.assert_guest_ok();
    assert_eq!(a.get("compute", "iters"), "10000000");
    assert_eq!(a.get("compute", "result"), b.get("compute", "result"));
}

#[test]
fn guest_exit_status_and_config_file() {
    if !kvm_or_skip("guest_exit_status_and_config_file") {
        return;
    }
    // The same VM from a TOML file; the flag overrides the file's cmdline.
    let g = common::testguest();
    let cfg = common::scratch_dir("cfg").join("vm.toml");
    std::fs::write(
        &cfg,
        format!("kernel = {g:?}\ncpus = 2\nmemory = \"128M\"\naccel = \"kvm\"\ncmdline = \"tests=smp\"\n"),
    )
    .unwrap();
    let r = common::run_kvmbox(
        &["run", "--config", cfg.to_str().unwrap()],
        std::time::Duration::from_secs(60),
    );
    r.assert_guest_ok();
    assert_eq!(r.get("smp", "online"), "2");
    let r = common::run_kvmbox(
        &[
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--cmdline",
            "tests=hello",
        ],
        std::time::Duration::from_secs(60),
    );
    r.assert_guest_ok();
    assert_eq!(r.get("hello", "cmdline"), "tests=hello");
}

/// Longest one shell step may take: a whole test-guest run on KVM measured 33 s at load
/// average 53 (see `common::TESTGUEST_TIMEOUT`); a shell step does far less. About 4x that.
const SHELL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Boot the interactive shell and wait until it takes input.
fn shell(cpus: u32) -> common::Interactive {
    let mut vm = common::Interactive::testguest(cpus, "128M", "shell", &[]);
    vm.expect("kvmbox test guest shell: type help", SHELL_TIMEOUT);
    vm.expect("KVMBOX-TEST shell ready", SHELL_TIMEOUT);
    vm.expect("kvmbox-testguest# ", SHELL_TIMEOUT);
    vm
}

#[test]
fn shell_echoes_runs_scenarios_and_powers_off() {
    if !kvm_or_skip("shell_echoes_runs_scenarios_and_powers_off") {
        return;
    }
    let mut vm = shell(2);
    vm.send(b"echo hello world\n");
    // The guest echoes what it receives, then prints the words on their own line.
    vm.expect("echo hello world\r\n", SHELL_TIMEOUT);
    let out = vm.expect("kvmbox-testguest# ", SHELL_TIMEOUT);
    assert_eq!(out, "hello world\r\nkvmbox-testguest# ", "echo output");
    // Backspace (DEL) edits the line before Enter; CR LF is one Enter.
    vm.send(b"echo typx\x7fo\r\n");
    vm.expect("\ntypo\r\n", SHELL_TIMEOUT);
    vm.expect("kvmbox-testguest# ", SHELL_TIMEOUT);
    vm.send(b"cpuid\n");
    let out = vm.expect("kvmbox-testguest# ", SHELL_TIMEOUT);
    assert!(
        out.contains("KVMBOX-TEST cpuid vendor=") && out.contains("logical=2"),
        "cpuid output: {out:?}"
    );
    vm.send(b"smp\n");
    vm.expect(
        "KVMBOX-TEST smp expected=2 online=2 apic_ids=0,1",
        SHELL_TIMEOUT,
    );
    vm.send(b"frobnicate now\n");
    vm.expect("unknown command: frobnicate\r\n", SHELL_TIMEOUT);
    vm.send(b"poweroff\n");
    vm.expect(
        "KVMBOX-TEST poweroff pm1a_cnt=0x604 slp_typ=5",
        SHELL_TIMEOUT,
    );
    assert_eq!(
        vm.wait_exit(SHELL_TIMEOUT),
        Some(0),
        "ACPI S5 from the shell"
    );
}

#[test]
fn shell_ctrl_a_x_quits_while_the_guest_halts() {
    if !kvm_or_skip("shell_ctrl_a_x_quits_while_the_guest_halts") {
        return;
    }
    let mut vm = shell(1);
    // The guest now sits in `sti; hlt` waiting for a key.
    std::thread::sleep(std::time::Duration::from_millis(300));
    vm.send(&[0x01, b'x']);
    assert_eq!(vm.wait_exit(SHELL_TIMEOUT), Some(0), "Ctrl-A x");
}

#[test]
fn shell_exit_gives_the_debug_exit_status() {
    if !kvm_or_skip("shell_exit_gives_the_debug_exit_status") {
        return;
    }
    let mut vm = shell(1);
    vm.send(b"exit 300\n");
    vm.expect("exit: expected a number 0-255", SHELL_TIMEOUT);
    vm.send(b"exit 5\n");
    assert_eq!(vm.wait_exit(SHELL_TIMEOUT), Some(11), "debug-exit 5");
}

#[test]
fn poweroff_reboot_and_triple_fault_statuses() {
    if !kvm_or_skip("poweroff_reboot_and_triple_fault_statuses") {
        return;
    }
    let r = run_testguest("kvm", 1, "128M", "poweroff", &[]);
    assert_eq!(r.status, Some(0), "ACPI S5; console:\n{}", r.stdout);
    assert_eq!(r.get("poweroff", "pm1a_cnt"), "0x604");
    assert_eq!(r.get("poweroff", "slp_typ"), "5");
    for (scenario, line, method) in [
        ("reboot", "reboot", "i8042"),
        ("reboot:acpi", "reboot", "acpi"),
        ("triplefault", "triplefault", ""),
    ] {
        let r = run_testguest("kvm", 1, "128M", scenario, &[]);
        assert_eq!(
            r.status,
            Some(4),
            "{scenario} must reset; console:\n{}\nstderr:\n{}",
            r.stdout,
            r.stderr
        );
        assert!(
            r.results().contains_key(line),
            "{scenario}: no KVMBOX-TEST {line} line:\n{}",
            r.stdout
        );
        if !method.is_empty() {
            assert_eq!(r.get(line, "method"), method);
        }
        assert!(!r.stdout.contains("error="), "{scenario}: {}", r.stdout);
    }
    let r = run_testguest("kvm", 1, "128M", "reboot:acpi", &[]);
    assert_eq!(r.get("reboot", "port"), "0x60c");
    assert_eq!(r.get("reboot", "value"), "0x6");
}

/// ACPI S3 on KVM: suspend, RTC alarm wake, resume at the waking vector (see
/// testguest_emu.rs).
#[test]
fn s3_suspend_and_rtc_alarm_wake() {
    if !kvm_or_skip("s3_suspend_and_rtc_alarm_wake") {
        return;
    }
    run_testguest("kvm", 1, "128M", "s3", &[]).check_s3();
}

#[test]
fn reboot_with_restart_boots_again_and_again() {
    if !kvm_or_skip("reboot_with_restart_boots_again_and_again") {
        return;
    }
    let mut vm =
        common::Interactive::testguest(1, "128M", "hello,reboot", &["--on-reboot", "restart"]);
    for _ in 0..3 {
        vm.expect("KVMBOX-TEST hello msg=hello-from-guest", SHELL_TIMEOUT);
        vm.expect("KVMBOX-TEST reboot method=i8042", SHELL_TIMEOUT);
    }
    assert!(vm.count("KVMBOX-TEST hello") >= 3);
    assert!(vm.kill(), "kvmbox should still be rebooting the guest");
}

#[test]
fn serial_interrupt_reaches_the_guest() {
    if !kvm_or_skip("serial_interrupt_reaches_the_guest") {
        return;
    }
    for cpus in [1u32, 2] {
        let r = run_testguest("kvm", cpus, "128M", "irq", &[]);
        r.assert_guest_ok();
        assert_eq!(r.get("irq", "vector"), "0x24");
        assert_eq!(r.get("irq", "gsi"), "4");
        let n: u32 = r.get("irq", "count").parse().unwrap();
        assert!(n >= 1, "no COM1 interrupt: {}", r.stdout);
    }
}

/// The split irqchip's two other paths into KVM's in-kernel local APICs. `irqlevel`: COM1's
/// IOAPIC pin level-triggered, so each interrupt sets remote IRR in kvmbox's user-space IOAPIC
/// and only the LAPIC's EOI (a KVM_EXIT_IOAPIC_EOI, known to KVM through the pin's MSI route)
/// clears it; eight interrupts in a row need eight EOIs to come back. `irqpic`: the pin
/// masked and IRQ 4 taken through the 8259 as ExtINT (KVM_INTERRUPT on the boot CPU), eight
/// times, each ended by the PIC's EOI.
#[test]
fn level_triggered_eoi_and_extint_through_the_pic() {
    if !kvm_or_skip("level_triggered_eoi_and_extint_through_the_pic") {
        return;
    }
    for cpus in [1u32, 2] {
        let r = run_testguest("kvm", cpus, "128M", "irqlevel,irqpic", &[]);
        r.assert_guest_ok();
        assert_eq!(r.get("irqlevel", "rounds"), "8", "{}", r.stdout);
        assert_eq!(r.get("irqlevel", "level"), "1");
        assert_eq!(r.get("irqlevel", "remote_irr"), "0");
        assert_eq!(r.get("irqpic", "rounds"), "8", "{}", r.stdout);
        assert_eq!(r.get("irqpic", "vector"), "0x24");
        assert_eq!(r.get("irqpic", "isr"), "0x0");
    }
}
