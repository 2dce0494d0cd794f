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
