//! cargo-fuzz target: see kvmbox_virtio::fuzzing::net_rx.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvmbox_virtio::fuzzing::net_rx(data);
});
