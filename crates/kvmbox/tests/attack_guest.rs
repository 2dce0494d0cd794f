//! A guest that attacks the VMM on purpose (guest/testguest/attack.c), on both engines: port
//! sweeps, reads and writes across every MMIO hole, MSR and CPUID probing, and malformed
//! virtqueues on virtio-rng and virtio-blk. kvmbox must stay up, every bad request must fail
//! (a #GP for a bad MSR, a rejected chain or a broken queue for a bad virtqueue), the device
//! must work again after a reset, the disk image must be untouched, and the guest must finish
//! and report.

mod common;

use common::{kvm_or_skip, run_testguest, RunResult};

/// A 16 MiB disk image of zeros for this test, removed on drop.
struct Disk(std::path::PathBuf);

impl Disk {
    fn new(name: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("kvmbox-attack-{name}-{}.img", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(16 << 20).unwrap();
        Disk(p)
    }

    /// The image is still 16 MiB of zeros: nothing the guest did reached it.
    fn assert_untouched(&self) {
        let data = std::fs::read(&self.0).unwrap();
        assert_eq!(data.len(), 16 << 20, "disk image size changed");
        assert!(
            data.iter().all(|&b| b == 0),
            "the attacks wrote to the disk"
        );
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// kvmbox itself said nothing of a bug.
fn assert_no_vmm_failure(r: &RunResult) {
    for bad in ["internal error", "panicked", "vCPU", "stopping"] {
        assert!(
            !r.stderr.contains(bad),
            "kvmbox reported '{bad}':\n{}",
            r.stderr
        );
    }
}

/// Every virtqueue attack failed (never served), interrupt floods left the device serving,
/// and the device served a good request after each attack.
fn check_virtqueue_attacks(r: &RunResult, line_type: &str) {
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with(&format!("KVMBOX-TEST attackvq type={line_type} ")))
        .unwrap_or_else(|| panic!("no attackvq type={line_type} line:\n{}", r.stdout));
    for kv in line.split_whitespace().skip(3) {
        let (k, v) = kv.split_once('=').unwrap();
        match k {
            "attacks" => assert_eq!(v, "15", "{line}"),
            "recovered" => assert_eq!(v, "15", "{line}"),
            // Interrupt floods: good requests, served while MSIs go to garbage or pile up.
            "msix_garbage" | "msix_storm" => assert_eq!(v, "survived", "{line}"),
            _ => assert!(
                ["rejected", "broken", "ignored", "refused"].contains(&v),
                "attack {k} was {v}: {line}"
            ),
        }
    }
    // The attacks that can only fail one way.
    for (k, v) in [
        ("loop", "rejected"),
        ("long_chain", "rejected"),
        ("addr_outside", "rejected"),
        ("huge_len", "rejected"),
        ("rings_high", "broken"),
        ("rings_hole", "broken"),
        ("msix_bad_vector", "refused"),
    ] {
        assert!(line.contains(&format!(" {k}={v} ")), "{k} not {v}: {line}");
    }
}

fn check_msr_and_mmio(r: &RunResult) {
    let invalid = r.get("attackmsr", "invalid");
    assert_eq!(
        r.get("attackmsr", "invalid_gp"),
        invalid,
        "every access to a nonexistent MSR must raise #GP"
    );
    assert_eq!(r.get("attackmsr", "cpuid_stable"), "1");
    assert_eq!(r.get("attackmsr", "cpuid_leaves"), "6144");
    assert_eq!(r.get("attackmmio", "ram_top"), "0x8000000");
}

fn attack(accel: &str, ports: &str) {
    let disk = Disk::new(accel);
    let scenarios = format!("{ports},attackmmio,attackmsr,attackvq,attackvq:2");
    let r = run_testguest(
        accel,
        1,
        "128M",
        &scenarios,
        &["--rng", "--disk", disk.0.to_str().unwrap()],
    );
    r.assert_guest_ok();
    assert_no_vmm_failure(&r);
    check_msr_and_mmio(&r);
    check_virtqueue_attacks(&r, "4");
    check_virtqueue_attacks(&r, "2");
    disk.assert_untouched();
}

#[test]
fn attacks_on_kvm() {
    if !kvm_or_skip("attacks_on_kvm") {
        return;
    }
    // Legacy ports only: each port access costs a full exit through emulated ring 0 here.
    attack("kvm", "attackportlow:4");
}

#[test]
fn attacks_on_the_engine() {
    attack("emu", "attackportlow:4");
}

/// Every byte value to every port 0-0xffff (word and dword too), on the engine, where the
/// exits are cheap: kvmbox's bus and every device on it must take all of it.
#[test]
fn every_value_to_every_port_on_the_engine() {
    let r = run_testguest("emu", 1, "128M", "attackport:256", &["--rng"]);
    r.assert_guest_ok();
    assert_no_vmm_failure(&r);
    assert_eq!(r.get("attackport", "values"), "256");
    assert_eq!(
        r.get("attackport", "ports").parse::<u32>().unwrap()
            + r.get("attackport", "skipped").parse::<u32>().unwrap(),
        0x10000
    );
}

/// The MMIO sweep again with the devices on virtio-mmio: every register of the first two
/// windows gets all-ones and zero (queue sizes, addresses, ready, status with DRIVER_OK).
#[test]
fn mmio_sweep_over_virtio_mmio_devices() {
    for accel in ["emu", "kvm"] {
        if accel == "kvm" && !kvm_or_skip("mmio_sweep_over_virtio_mmio_devices") {
            return;
        }
        let disk = Disk::new(&format!("mmio-{accel}"));
        let r = run_testguest(
            accel,
            1,
            "128M",
            "attackmmio",
            &[
                "--virtio",
                "mmio",
                "--rng",
                "--disk",
                disk.0.to_str().unwrap(),
            ],
        );
        r.assert_guest_ok();
        assert_no_vmm_failure(&r);
        disk.assert_untouched();
    }
}
