//! Entry points the cargo-fuzz targets (`crates/arch/fuzz`) and the regression tests share: each
//! turns arbitrary bytes into a kernel image, an initrd placement, a firmware-table
//! configuration or a command line and runs the loader on it. Whatever the bytes, the loader
//! must return (a boot setup or an error), never panic, and never write outside guest RAM.

use crate::{layout, AcpiConfig, LoadParams, McfgEntry, PciHostBridge, PciIntx};
use arbitrary::{Result, Unstructured};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;

/// Guest RAM of a fuzz case: small enough to map per case, large enough for real layouts.
pub const FUZZ_MEM: u64 = 64 << 20;

/// A file holding `data`, reachable by path (`/proc/self/fd/N`), gone when dropped.
struct MemFile {
    _file: File,
    path: PathBuf,
}

fn memfile(data: &[u8]) -> MemFile {
    // SAFETY: memfd_create with a valid NUL-terminated name and flags.
    let fd = unsafe { libc::memfd_create(c"kvmbox-fuzz-kernel".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor we own.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(data).expect("write the fuzz image");
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    MemFile { _file: file, path }
}

/// Load a fuzzed kernel image. The first byte picks the options (PVH preference, host
/// decompression, vCPUs, an initrd) and a skeleton: the rest of the input is used as is, or
/// given the bzImage signature (`HdrS`, protocol 2.12+, 64-bit entry) or the ELF64 x86-64
/// signature, so the search reaches the parsers behind the magic numbers.
pub fn kernel_image(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut img = rest.to_vec();
    match sel & 3 {
        1 => {
            img.resize(img.len().max(0x1000), 0);
            img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
            img[0x202..0x206].copy_from_slice(b"HdrS");
            if u16::from_le_bytes([img[0x206], img[0x207]]) < 0x020c {
                img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
            }
            img[0x236] |= 1; // xloadflags: XLF_KERNEL_64
        }
        2 => {
            img.resize(img.len().max(64), 0);
            img[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
            img[18..20].copy_from_slice(&62u16.to_le_bytes());
            img[54..56].copy_from_slice(&56u16.to_le_bytes());
        }
        _ => {}
    }
    let kernel = memfile(&img);
    let initrd = memfile(&vec![0x5a; usize::from(sel >> 5) * 4096]);
    let mut p = LoadParams::new(&kernel.path, "console=ttyS0", FUZZ_MEM);
    p.prefer_pvh = sel & 4 != 0;
    p.host_decompress = sel & 8 != 0;
    p.cpus = 1 + u32::from(sel >> 4 & 1);
    if sel >> 5 != 0 {
        p.initrd = Some(&initrd.path);
    }
    let mem = crate::guest_memory(FUZZ_MEM).expect("fuzz guest memory");
    if let Ok(boot) = crate::load(&mem, &p) {
        assert!(boot.kernel_range.0 < boot.kernel_range.1);
        if let Some((s, e)) = boot.initrd_range {
            assert!(
                s >= layout::HIGH_RAM_START && e <= FUZZ_MEM,
                "initrd {s:#x}..{e:#x}"
            );
            assert!(
                e <= boot.kernel_range.0 || s >= boot.kernel_range.1,
                "initrd {s:#x}..{e:#x} overlaps the kernel {:?}",
                boot.kernel_range
            );
        }
    }
}

/// Place a fuzzed initrd next to a fuzzed kernel range; a placement must be page-aligned, in
/// RAM above 1 MiB, below both limits and clear of the kernel.
pub fn initrd_placement(data: &[u8]) {
    // Integer draws pad a short input with zeros and never fail.
    let Ok((size, limit, low_end, k0, k1)) = read_placement(&mut Unstructured::new(data)) else {
        return;
    };
    if let Some(a) = crate::loader::place_initrd(size, limit, low_end, (k0, k1)) {
        let end = a.checked_add(size).expect("initrd end overflows");
        assert_eq!(a % 4096, 0, "initrd at {a:#x} is not page-aligned");
        assert!(a >= layout::HIGH_RAM_START, "initrd at {a:#x} below 1 MiB");
        assert!(
            end <= low_end,
            "initrd ends at {end:#x} past RAM {low_end:#x}"
        );
        assert!(
            end <= limit.saturating_add(1),
            "initrd ends at {end:#x} past its limit {limit:#x}"
        );
        assert!(
            end <= k0 || a >= k1,
            "initrd {a:#x}..{end:#x} overlaps the kernel {k0:#x}..{k1:#x}"
        );
    }
}

/// Initrd size, limit, end of low RAM and kernel range of [`initrd_placement`]: each a 64-bit
/// value shifted right by a drawn amount, so every magnitude comes up.
fn read_placement(r: &mut Unstructured) -> Result<(u64, u64, u64, u64, u64)> {
    let mut scaled = || -> Result<u64> {
        let v: u64 = r.arbitrary()?;
        Ok(v >> (r.arbitrary::<u8>()? % 64))
    };
    let (size, limit, low_end, k0) = (scaled()?, scaled()?, scaled()?, scaled()?);
    Ok((size, limit, low_end, k0, k0.saturating_add(scaled()?)))
}

/// Build ACPI tables for a fuzzed configuration: vCPU count, devices, PCI host bridge with
/// INTx routes, MCFG entries, extra AML and extra tables.
pub fn acpi_tables(data: &[u8]) {
    // Integer draws pad a short input with zeros and never fail.
    let Ok(cfg) = acpi_config(&mut Unstructured::new(data)) else {
        return;
    };
    let mem = crate::guest_memory(layout::MIN_MEMORY).expect("fuzz guest memory");
    let _ = crate::create_acpi_tables_with(&mem, &cfg);
}

fn acpi_config(r: &mut Unstructured) -> Result<AcpiConfig> {
    let mut cfg = AcpiConfig::new(u32::from(r.arbitrary::<u16>()?) % 300);
    let f: u8 = r.arbitrary()?;
    cfg.com1 = f & 1 != 0;
    cfg.i8042 = f & 2 != 0;
    cfg.rtc = f & 4 != 0;
    cfg.vga = f & 8 != 0;
    if f & 0x10 != 0 {
        let mut pci = PciHostBridge::new();
        if f & 0x20 != 0 {
            pci.ecam_base = r.arbitrary()?;
            pci.last_bus = r.arbitrary()?;
            pci.mmio32 = (
                u64::from(r.arbitrary::<u32>()?),
                u64::from(r.arbitrary::<u32>()?),
            );
        }
        for _ in 0..r.arbitrary::<u8>()? % 40 {
            pci.intx.push(PciIntx {
                device: r.arbitrary()?,
                pin: r.arbitrary()?,
                gsi: r.arbitrary()?,
            });
        }
        cfg.pci = Some(pci);
    }
    for _ in 0..r.arbitrary::<u8>()? % 20 {
        cfg.mcfg.push(McfgEntry {
            base: r.arbitrary()?,
            segment: r.arbitrary()?,
            start_bus: r.arbitrary()?,
            end_bus: r.arbitrary()?,
        });
    }
    let aml_len = usize::from(r.arbitrary::<u16>()?) % 4096;
    cfg.sb_aml = r.bytes(aml_len.min(r.len()))?.to_vec();
    while !r.is_empty() && cfg.extra_tables.len() < 8 {
        let n = usize::from(r.arbitrary::<u16>()?).min(r.len());
        cfg.extra_tables.push(r.bytes(n)?.to_vec());
    }
    Ok(cfg)
}

/// A minimal ELF64 kernel: one PT_LOAD of a HLT loop at 1 MiB, with a PVH entry note.
fn tiny_elf() -> Vec<u8> {
    let code: &[u8] = &[0xf4, 0xeb, 0xfd];
    let (phoff, nph) = (64u64, 2u16);
    let note_off = phoff + 56 * u64::from(nph);
    let mut note = Vec::new();
    for v in [4u32, 4, 18] {
        note.extend_from_slice(&v.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(layout::HIGH_RAM_START as u32).to_le_bytes());
    let code_off = note_off + note.len() as u64;
    let mut e = vec![0u8; 64];
    e[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&layout::HIGH_RAM_START.to_le_bytes());
    e[32..40].copy_from_slice(&phoff.to_le_bytes());
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&nph.to_le_bytes());
    let ph = |t: u32, off: u64, addr: u64, len: u64| {
        let mut p = [0u8; 56];
        p[..4].copy_from_slice(&t.to_le_bytes());
        p[4..8].copy_from_slice(&7u32.to_le_bytes());
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&addr.to_le_bytes());
        p[24..32].copy_from_slice(&addr.to_le_bytes());
        p[32..40].copy_from_slice(&len.to_le_bytes());
        p[40..48].copy_from_slice(&len.to_le_bytes());
        p[48..56].copy_from_slice(&4u64.to_le_bytes());
        p
    };
    e.extend(ph(1, code_off, layout::HIGH_RAM_START, code.len() as u64));
    e.extend(ph(4, note_off, 0, note.len() as u64));
    e.extend_from_slice(&note);
    e.extend_from_slice(code);
    e
}

/// Load a small valid ELF kernel with a fuzzed command line (any bytes, NULs and invalid UTF-8
/// included; the first byte picks the entry). A command line the loader accepts must be in
/// guest memory, NUL-terminated, at [`layout::CMDLINE_START`].
pub fn cmdline(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let line = String::from_utf8_lossy(rest);
    let kernel = memfile(&tiny_elf());
    let mut p = LoadParams::new(&kernel.path, &line, FUZZ_MEM);
    p.prefer_pvh = sel & 1 != 0;
    let mem = crate::guest_memory(FUZZ_MEM).expect("fuzz guest memory");
    if crate::load(&mem, &p).is_ok() {
        use vm_memory::{Bytes, GuestAddress};
        let mut got = vec![0u8; line.len() + 1];
        mem.read_slice(&mut got, GuestAddress(layout::CMDLINE_START))
            .expect("read the command line back");
        assert_eq!(&got[..line.len()], line.as_bytes());
        assert_eq!(got[line.len()], 0);
    }
}
