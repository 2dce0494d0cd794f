//! The loader fuzz entry points (`kvmbox_arch::fuzzing`, behind the cargo-fuzz targets in
//! `crates/arch/fuzz`) on deterministic random inputs, and every input the fuzzers found a
//! crash with (see FUZZING.md at the repository root).

use kvmbox_arch::fuzzing;

/// xorshift64 inputs of up to `max` bytes: deterministic, so a failure names its case.
fn cases(seed: u64, n: usize, max: u64, mut f: impl FnMut(&[u8])) {
    let mut x = seed;
    let mut buf = Vec::new();
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % max) as usize;
        buf.clear();
        let mut y = x;
        for _ in 0..len {
            y ^= y << 13;
            y ^= y >> 7;
            y ^= y << 17;
            buf.push(y as u8);
        }
        f(&buf);
    }
}

#[test]
fn random_kernel_images() {
    cases(1, 200, 9000, fuzzing::kernel_image);
}

#[test]
fn random_initrd_placements() {
    cases(2, 5000, 64, fuzzing::initrd_placement);
}

#[test]
fn random_acpi_configurations() {
    cases(3, 300, 3000, fuzzing::acpi_tables);
}

#[test]
fn random_command_lines() {
    cases(4, 200, 5000, fuzzing::cmdline);
}

/// Found by `acpi_tables` (FUZZING.md): a PCI host bridge with an empty BAR window (start 0,
/// size 0) made the DSDT's `_CRS` compute `start + size - 1` and panic on the underflow. Now
/// an error names the window.
#[test]
fn acpi_empty_pci_window_is_an_error() {
    fuzzing::acpi_tables(&[0x28, 0x7f, 0x3f]);
    let mem = kvmbox_arch::guest_memory(16 << 20).unwrap();
    let mut cfg = kvmbox_arch::AcpiConfig::new(1);
    let mut pci = kvmbox_arch::PciHostBridge::new();
    pci.mmio32 = (0, 0);
    cfg.pci = Some(pci.clone());
    let e = kvmbox_arch::create_acpi_tables_with(&mem, &cfg).unwrap_err();
    assert_eq!(
        e.to_string(),
        "PCI memory window of 0x0 bytes at 0x0 is empty or not below 4 GiB"
    );
    pci.mmio32 = (0xffff_f000, 0x2000);
    cfg.pci = Some(pci);
    assert!(kvmbox_arch::create_acpi_tables_with(&mem, &cfg).is_err());
}
