//! cargo-fuzz target: see kvmbox_arch::fuzzing::initrd_placement.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvmbox_arch::fuzzing::initrd_placement(data);
});
