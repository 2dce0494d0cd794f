//! Link options of the kvmbox binary.

fn main() {
    // Pack the ~9,000 relative relocations (DT_RELR, glibc >= 2.36): ~4 KiB instead of the
    // ~210 KiB of RELA entries that the dynamic loader reads at every start and that then
    // stay resident.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
}
