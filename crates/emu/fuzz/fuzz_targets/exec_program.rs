//! Structured programs (registers, memory values, encoded instruction sequences) in a small
//! paged guest: see kvmbox_emu::fuzz::run_program.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    kvmbox_emu::fuzz::run_program(data);
});
