//! cargo-fuzz target: see kvmbox_arch::fuzzing::acpi_tables.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvmbox_arch::fuzzing::acpi_tables(data);
});
