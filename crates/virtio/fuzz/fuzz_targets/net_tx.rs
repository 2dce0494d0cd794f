//! cargo-fuzz target: see kvmbox_virtio::fuzzing::net_tx.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = kvmbox_virtio::fuzzing::net_tx(data);
});
