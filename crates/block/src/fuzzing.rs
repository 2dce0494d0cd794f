//! Entry points for the cargo-fuzz targets in `crates/block/fuzz` (outside the workspace).

use std::io::{IoSlice, IoSliceMut, Write};
use std::os::fd::FromRawFd;

use crate::{open, DiskSpec, Format};

/// Treat `data` as an image file: open it with format detection (read-only, so VDI, VMDK,
/// VHD and VHDX go through their readers too; and read-write as qcow2), then read and write
/// a few places; then check it and repair it (`kvmbox disk check --repair`). Nothing may
/// panic; errors are fine.
pub fn image(data: &[u8]) {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"kvmbox-fuzz-image".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return;
    }
    // SAFETY: fd is a fresh descriptor we own.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    if file.write_all(data).is_err() {
        return;
    }
    let path = format!("/proc/self/fd/{fd}");
    for spec in [
        DiskSpec {
            read_only: true,
            lock: false,
            ..DiskSpec::new(&path)
        },
        DiskSpec {
            format: Some(Format::Qcow2),
            lock: false,
            ..DiskSpec::new(&path)
        },
    ] {
        let Ok(b) = open(&spec) else { continue };
        let size = b.size();
        let mut buf = vec![0u8; 65536];
        for off in [0, size / 2, size.saturating_sub(65536)] {
            let off = off & !511;
            let n = (size - off.min(size)).min(65536) as usize;
            let _ = b.read_vectored_at(&mut [IoSliceMut::new(&mut buf[..n])], off);
            let _ = b.write_vectored_at(&[IoSlice::new(&buf[..n])], off);
        }
        let _ = b.discard(0, size.min(1 << 20));
        let _ = b.flush();
    }
    for repair in [false, true] {
        let _ = crate::image::check(std::path::Path::new(&path), repair, &mut |_, _| {});
    }
}
