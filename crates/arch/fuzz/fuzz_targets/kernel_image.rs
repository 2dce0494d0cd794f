//! cargo-fuzz target: see kvmbox_arch::fuzzing::kernel_image.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvmbox_arch::fuzzing::kernel_image(data);
});
