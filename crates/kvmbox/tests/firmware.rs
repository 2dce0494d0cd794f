//! What firmware and test kernels read, checked from inside guests of our own on both engines:
//! a multiboot kernel (the test guest's ELF32 multiboot build) sees its command line, memory
//! map and modules; fw_cfg's items read back through its data port and its DMA interface;
//! pc-testdev's ports are there with `--testdev` and unclaimed without it.

mod common;

use common::{kvm_or_skip, run_kvmbox, run_testguest, testguest_multiboot};
use std::path::PathBuf;
use std::time::Duration;

/// Engines to run on: the software engine always, KVM where /dev/kvm works.
fn engines(test: &str) -> Vec<&'static str> {
    let mut v = vec!["emu"];
    if kvm_or_skip(test) {
        v.push("kvm");
    }
    v
}

/// A file in the temp directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, data: &[u8]) -> Self {
        let p = std::env::temp_dir().join(format!("kvmbox-fw-{}-{name}", std::process::id()));
        std::fs::write(&p, data).unwrap();
        TempFile(p)
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// RAM a 128 MiB guest's memory map lists (e820: 639 KiB low, the rest from 1 MiB).
const RAM_128M_IN_MAP: u64 = 133_823_488;

#[test]
fn multiboot_guest_reads_cmdline_memory_map_and_modules() {
    let first = TempFile::new("mod1", b"first-module-contents");
    let second = TempFile::new("mod2", b"second");
    let guest = testguest_multiboot();
    let spec = format!("{},role=second", second.path());
    for accel in engines("multiboot guest on kvm") {
        let r = run_kvmbox(
            &[
                "run",
                "--accel",
                accel,
                "--kernel",
                guest.to_str().unwrap(),
                "--memory",
                "128M",
                "--cmdline",
                "tests=hello,multiboot",
                "--initrd",
                first.path(),
                "--module",
                &spec,
            ],
            Duration::from_secs(120),
        );
        r.assert_guest_ok();
        assert_eq!(r.get("hello", "entry"), "multiboot", "{accel}");
        // As QEMU: the kernel's path, then the command line.
        assert_eq!(
            r.get("hello", "cmdline"),
            format!("{} tests=hello,multiboot", guest.display()),
            "{accel}"
        );
        assert_eq!(r.get("multiboot", "mem_lower"), "639", "{accel}");
        assert_eq!(r.get("multiboot", "mem_upper"), "130048", "{accel}");
        assert_eq!(
            r.get("multiboot", "mmap_ram"),
            RAM_128M_IN_MAP.to_string(),
            "{accel}"
        );
        assert_eq!(r.get("multiboot", "mods"), "2", "{accel}");
        assert_eq!(r.get("multiboot", "mod_size"), "21", "{accel}");
        assert_eq!(
            r.get("multiboot", "mod_head"),
            "first-module-contents",
            "{accel}"
        );
        assert_eq!(r.get("multiboot", "mod_cmdline"), first.path(), "{accel}");
        let start =
            u64::from_str_radix(r.get("multiboot", "mod_start").trim_start_matches("0x"), 16)
                .unwrap();
        assert_eq!(start % 4096, 0, "{accel}: modules are page-aligned");
        // What a BIOS leaves behind (kvm-unit-tests' realmode test halts with interrupts on
        // and is woken by the BIOS timer tick): IRQ 0 and IRQ 8 vectored through the real-mode
        // IVT to handlers in segment 0xf000 (IRQ 0's starts `push ax`), the PICs at the
        // BIOS's vector bases with only the timer and the cascade unmasked, the PIT counting.
        assert_eq!(r.get("bios", "ivt8"), "f000:ff01", "{accel}");
        assert_eq!(r.get("bios", "ivt70"), "f000:ff08", "{accel}");
        assert_eq!(r.get("bios", "code8"), "0x50", "{accel}");
        assert_eq!(r.get("bios", "master_imr"), "0xfa", "{accel}");
        assert_eq!(r.get("bios", "slave_imr"), "0xff", "{accel}");
        assert_eq!(r.get("bios", "pit"), "counting", "{accel}");
    }
}

#[test]
fn fw_cfg_items_read_back_through_ports_and_dma() {
    for accel in engines("fw_cfg on kvm") {
        let r = run_testguest(accel, 2, "128M", "fwcfg", &[]);
        r.assert_guest_ok();
        let want = [
            ("sig", "QEMU".to_string()),
            ("id", "3".to_string()),
            ("cpus", "2".to_string()),
            ("ram", (128u64 << 20).to_string()),
            ("files", "1".to_string()),
            ("e820_size", "120".to_string()),
            ("dma_status", "0".to_string()),
            ("e820_ram", RAM_128M_IN_MAP.to_string()),
        ];
        for (k, v) in want {
            assert_eq!(r.get("fwcfg", k), v, "{accel}: fwcfg {k}");
        }
    }
}

#[test]
fn testdev_is_off_by_default() {
    for accel in engines("testdev on kvm") {
        let off = run_testguest(accel, 1, "128M", "testdev", &[]);
        off.assert_guest_ok();
        assert_eq!(off.get("testdev", "ioport"), "0xffffffff", "{accel}");
        let on = run_testguest(accel, 1, "128M", "testdev", &["--testdev"]);
        on.assert_guest_ok();
        assert_eq!(on.get("testdev", "ioport"), "0x12345678", "{accel}");
        assert_eq!(on.get("testdev", "byte"), "0x56", "{accel}");
        // pci-testdev on PCI bus 0, its port BAR placed and decoding: test 2 counts 3 writes.
        assert_eq!(off.get("testdev", "pci"), "absent", "{accel}");
        assert_eq!(on.get("testdev", "pci"), "found", "{accel}");
        assert_eq!(on.get("testdev", "pci_test"), "dword", "{accel}");
        assert_eq!(on.get("testdev", "pci_width"), "4", "{accel}");
        assert_eq!(on.get("testdev", "pci_count"), "3", "{accel}");
    }
}

#[test]
fn bad_multiboot_header_is_a_clear_error() {
    let mut img = Vec::new();
    img.extend_from_slice(&0x1bad_b002u32.to_le_bytes());
    img.extend_from_slice(&0u32.to_le_bytes());
    img.extend_from_slice(&1u32.to_le_bytes()); // wrong checksum
    img.resize(256, 0);
    let k = TempFile::new("badmb", &img);
    let r = run_kvmbox(
        &["run", "--accel", "emu", "--kernel", k.path()],
        Duration::from_secs(30),
    );
    assert_eq!(r.status, Some(2), "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("bad checksum") && r.stderr.contains(k.path()),
        "{}",
        r.stderr
    );
    let r = run_kvmbox(
        &[
            "run",
            "--accel",
            "emu",
            "--kernel",
            testguest_multiboot().to_str().unwrap(),
            "--module",
            "/nonexistent/kvmbox-module",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(r.status, Some(2), "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("/nonexistent/kvmbox-module"),
        "{}",
        r.stderr
    );
}
