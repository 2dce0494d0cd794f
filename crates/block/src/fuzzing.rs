//! Entry points for the cargo-fuzz targets in `crates/block/fuzz` (outside the workspace).

use std::io::{IoSlice, IoSliceMut, Write};
use std::os::fd::FromRawFd;

use crate::{open, DiskSpec, Format};

/// Treat `data` as an image file: open it with format detection (read-only, so VDI, VMDK,
/// VHD and VHDX go through their readers too; and read-write as qcow2), then read and write
/// a few places. Nothing may panic; errors are fine. Returns how many of the two opens
/// succeeded.
pub fn image(data: &[u8]) -> usize {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"kvmbox-fuzz-image".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return 0;
    }
    // SAFETY: fd is a fresh descriptor we own.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    if file.write_all(data).is_err() {
        return 0;
    }
    let path = format!("/proc/self/fd/{fd}");
    let mut opened = 0;
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
        opened += 1;
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
    opened
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    /// Real images of every format kvmbox reads, made by `qemu-img` from 1 MiB of patterned
    /// data (so their tables are populated), then damaged at random in their metadata (the
    /// first 64 KiB and the last 512 bytes) and truncated: the CI twin of the `image_open`
    /// fuzz target. Every undamaged image must open (the inputs reach the parsers), and no
    /// damaged one may panic.
    #[test]
    fn damaged_images_never_panic() {
        let dir = std::env::temp_dir().join(format!("kvmbox-fuzz-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let raw = dir.join("data.raw");
        let data: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i / 4096 * 7 + i % 251) as u8)
            .collect();
        std::fs::write(&raw, &data).expect("write data.raw");
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for (fmt, opts) in [
            ("qcow2", "cluster_size=4096"),
            ("qcow2", "compat=0.10,cluster_size=65536"),
            ("vdi", ""),
            ("vmdk", ""),
            ("vpc", ""),
            ("vhdx", ""),
        ] {
            let img = dir.join(format!("image.{fmt}"));
            let mut cmd = Command::new("qemu-img");
            cmd.args(["convert", "-q", "-f", "raw", "-O", fmt]);
            if !opts.is_empty() {
                cmd.args(["-o", opts]);
            }
            match cmd.arg(&raw).arg(&img).status() {
                Ok(s) => assert!(s.success(), "qemu-img convert to {fmt} failed"),
                Err(e) => {
                    eprintln!("SKIP damaged_images_never_panic: qemu-img: {e} (scripts/setup.sh)");
                    let _ = std::fs::remove_dir_all(&dir);
                    return;
                }
            }
            let good = std::fs::read(&img).expect("read the image");
            assert!(
                super::image(&good) >= 1,
                "the undamaged {fmt} image did not open"
            );
            for case in 0..150 {
                let mut bad = good.clone();
                for _ in 0..1 + rnd() % 8 {
                    let at = match rnd() % 3 {
                        0 => bad.len() - 1 - (rnd() % 512) as usize,
                        1 => (rnd() % 4096) as usize % bad.len(),
                        _ => (rnd() % 65536) as usize % bad.len(),
                    };
                    bad[at] = rnd() as u8;
                }
                if case % 10 == 9 {
                    bad.truncate((rnd() % bad.len() as u64) as usize);
                }
                super::image(&bad);
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
