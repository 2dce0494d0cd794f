//! The default guest kit's busybox initramfs (guest/linux/build-initramfs.sh): what is in it,
//! and that it loads next to Debian's kernel.

use kvmbox_arch::{guest_memory, load, LoadParams};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use vm_memory::{Bytes, GuestAddress};

fn script(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../guest/linux")
        .join(name);
    let out = Command::new(&p).output().unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        p.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(stdout.lines().last().unwrap_or("").trim())
}

/// Entries of a newc cpio archive: name (without a leading "./") -> (mode, data).
fn cpio_newc(mut d: &[u8]) -> HashMap<String, (u32, Vec<u8>)> {
    let hex = |b: &[u8]| u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
    let pad4 = |n: usize| n.next_multiple_of(4);
    let mut out = HashMap::new();
    loop {
        assert_eq!(&d[..6], b"070701", "newc magic");
        let mode = hex(&d[14..22]);
        let size = hex(&d[54..62]) as usize;
        let namesize = hex(&d[94..102]) as usize;
        let name = String::from_utf8(d[110..110 + namesize - 1].to_vec()).unwrap();
        let data_start = pad4(110 + namesize);
        let data = d[data_start..data_start + size].to_vec();
        d = &d[pad4(data_start + size)..];
        if name == "TRAILER!!!" {
            return out;
        }
        out.insert(name.trim_start_matches("./").to_string(), (mode, data));
    }
}

#[test]
fn initramfs_has_busybox_init_and_virtio_modules_in_order() {
    let path = script("build-initramfs.sh");
    // Cached: a second run gives the same file.
    assert_eq!(script("build-initramfs.sh"), path);
    let gz = Command::new("gzip").arg("-dc").arg(&path).output().unwrap();
    assert!(gz.status.success());
    let files = cpio_newc(&gz.stdout);

    let (mode, init) = &files["init"];
    assert_eq!(mode & 0o170_000, 0o100_000, "regular file");
    assert_eq!(mode & 0o111, 0o111, "executable");
    let init = String::from_utf8_lossy(init);
    assert!(init.starts_with("#!/bin/busybox sh\n"));
    assert!(init.contains("poweroff -f"));
    assert!(init.contains("KVMBOX-LINUX userspace-ready"));
    let (_, bb) = &files["bin/busybox"];
    assert_eq!(&bb[..4], b"\x7fELF");
    assert_eq!(files["bin/sh"].0 & 0o170_000, 0o120_000, "sh is a symlink");

    let order = String::from_utf8(files["lib/modules/kvmbox-load-order"].1.clone()).unwrap();
    let paths: Vec<&str> = order.lines().collect();
    // Module names: file names without .ko, with '-' read as '_' as the kernel does.
    let order: Vec<String> = paths
        .iter()
        .map(|p| {
            p.rsplit('/')
                .next()
                .unwrap()
                .trim_end_matches(".ko")
                .replace('-', "_")
        })
        .collect();
    let pos = |m: &str| {
        order
            .iter()
            .position(|x| *x == m)
            .unwrap_or_else(|| panic!("{m} missing"))
    };
    for (dep, m) in [
        ("virtio", "virtio_pci"),
        ("virtio_ring", "virtio_blk"),
        ("virtio_pci_modern_dev", "virtio_pci"),
        ("failover", "net_failover"),
        ("net_failover", "virtio_net"),
        ("virtio", "virtio_rng"),
        ("virtio", "virtio_console"),
    ] {
        assert!(pos(dep) < pos(m), "{dep} loads before {m}");
    }
    for p in &paths {
        let (_, ko) = &files[p.trim_start_matches('/')];
        assert_eq!(&ko[..4], b"\x7fELF", "{p}");
    }

    // It goes in as the initrd of Debian's kernel in a small guest.
    let kernel = script("fetch-kernel.sh");
    let mem = guest_memory(128 << 20).unwrap();
    let mut p = LoadParams::new(&kernel, "console=ttyS0", 128 << 20);
    p.initrd = Some(&path);
    let b = load(&mem, &p).unwrap();
    let (start, end) = b.initrd_range.unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(end - start, bytes.len() as u64);
    let mut back = vec![0u8; bytes.len()];
    mem.read_slice(&mut back, GuestAddress(start)).unwrap();
    assert_eq!(back, bytes);
}
