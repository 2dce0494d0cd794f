//! Random bytes executed as code (plus page-table and descriptor noise) in a small paged guest.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kvmbox_emu::fuzz::run_bytes(data);
});
