//! Any bytes as a disk image: qcow2 header and tables (through imago), VDI, VMDK, VHD and VHDX
//! readers. Opening, reading, writing and discarding must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvmbox_block::fuzzing::image(data);
});
