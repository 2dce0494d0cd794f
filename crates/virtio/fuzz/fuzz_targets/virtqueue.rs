//! cargo-fuzz target: see kvmbox_virtio::fuzzing::virtqueue.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kvmbox_virtio::fuzzing::virtqueue(data);
});
