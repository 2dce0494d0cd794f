//! Loader tests with small ELF images built here (the real bzImage is in tests/bzimage.rs).

use super::*;
use crate::{e820_table, E820Entry, E820_RAM};
use std::sync::atomic::{AtomicU32, Ordering};

/// A file in the temp directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(data: &[u8]) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "kvmbox-arch-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&p, data).unwrap();
        TempFile(p)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A PT_LOAD segment: physical address, file bytes, memory size.
struct Seg<'a> {
    paddr: u64,
    data: &'a [u8],
    memsz: u64,
}

/// An ELF64 x86-64 executable with `segs` and, if `pvh` is set, a XEN_ELFNOTE_PHYS32_ENTRY note.
fn make_elf(entry: u64, pvh: Option<u32>, segs: &[Seg]) -> Vec<u8> {
    let nph = segs.len() + pvh.is_some() as usize;
    let note_off = 64 + nph * 56;
    let note: Vec<u8> = match pvh {
        Some(addr) => {
            let mut n = Vec::new();
            n.extend_from_slice(&4u32.to_le_bytes()); // namesz
            n.extend_from_slice(&4u32.to_le_bytes()); // descsz
            n.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            n.extend_from_slice(b"Xen\0");
            n.extend_from_slice(&addr.to_le_bytes());
            n
        }
        None => Vec::new(),
    };
    let mut data_off = (note_off + note.len()).next_multiple_of(16);
    let mut e = vec![0u8; 64];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // ELFCLASS64
    e[5] = 1; // little endian
    e[6] = 1; // version
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&entry.to_le_bytes());
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    e[56..58].copy_from_slice(&(nph as u16).to_le_bytes());
    let mut body = Vec::new();
    let ph = |t: u32, off: u64, paddr: u64, filesz: u64, memsz: u64| {
        let mut p = vec![0u8; 56];
        p[..4].copy_from_slice(&t.to_le_bytes());
        p[4..8].copy_from_slice(&7u32.to_le_bytes());
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&paddr.to_le_bytes());
        p[24..32].copy_from_slice(&paddr.to_le_bytes());
        p[32..40].copy_from_slice(&filesz.to_le_bytes());
        p[40..48].copy_from_slice(&memsz.to_le_bytes());
        p[48..56].copy_from_slice(&4u64.to_le_bytes());
        p
    };
    for s in segs {
        e.extend(ph(
            1,
            data_off as u64,
            s.paddr,
            s.data.len() as u64,
            s.memsz,
        ));
        body.push((data_off, s.data));
        data_off = (data_off + s.data.len()).next_multiple_of(16);
    }
    if pvh.is_some() {
        e.extend(ph(
            4,
            note_off as u64,
            0,
            note.len() as u64,
            note.len() as u64,
        ));
    }
    e.extend_from_slice(&note);
    for (off, d) in body {
        e.resize(off, 0);
        e.extend_from_slice(d);
    }
    e
}

const CODE: &[u8] = &[0xf4, 0xeb, 0xfd, 0x90, 0x11, 0x22, 0x33, 0x44];

fn test_elf(pvh: bool) -> TempFile {
    TempFile::new(&make_elf(
        0x20_0000,
        pvh.then_some(0x10_0000),
        &[
            Seg {
                paddr: 0x10_0000,
                data: CODE,
                memsz: 0x2000,
            },
            Seg {
                paddr: 0x20_0000,
                data: &[0xfa, 0xf4],
                memsz: 2,
            },
        ],
    ))
}

fn mem(size: u64) -> GuestMemoryMmap {
    let m = crate::guest_memory(size).unwrap();
    // Dirty the kernel area so bss clearing is observable.
    m.write_slice(&[0xffu8; 0x4000], GuestAddress(0x10_0000))
        .unwrap();
    m
}

fn read(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn read_boot_params(m: &GuestMemoryMmap) -> boot_params {
    m.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap()
}

fn memmap(m: &GuestMemoryMmap, info: &hvm_start_info) -> Vec<E820Entry> {
    (0..info.memmap_entries as u64)
        .map(|i| {
            let e: hvm_memmap_table_entry = m
                .read_obj(GuestAddress(info.memmap_paddr + i * 24))
                .unwrap();
            E820Entry {
                addr: e.addr,
                size: e.size,
                kind: e.type_,
            }
        })
        .collect()
}

#[test]
fn pvh_elf_enters_through_the_note() {
    let m = mem(128 << 20);
    let k = test_elf(true);
    let mut p = LoadParams::new(&k.0, "console=ttyS0 reboot=k", 128 << 20);
    p.rsdp = Some(layout::RSDP_START);
    let b = load(&m, &p).unwrap();
    assert_eq!(b.entry_kind, EntryKind::Pvh);
    assert_eq!(b.regs.rip, 0x10_0000);
    assert_eq!(b.regs.rbx, layout::PVH_INFO_START);
    assert_eq!(b.regs.rflags, 2);
    assert_eq!(b.sregs.cr0 & boot_cpu::CR0_PG, 0);
    assert_eq!(b.sregs.cs.selector, 0x10);
    assert!(b.sregs.cs.db);
    assert_eq!(b.kernel_range, (0x10_0000, 0x20_0002));
    assert_eq!(b.initrd_range, None);
    // Segments loaded, bss cleared.
    assert_eq!(read(&m, 0x10_0000, CODE.len()), CODE);
    assert!(read(&m, 0x10_0000 + CODE.len() as u64, 0x2000 - CODE.len())
        .iter()
        .all(|&b| b == 0));
    assert_eq!(read(&m, 0x10_2000, 4), [0xff; 4], "past memsz untouched");
    assert_eq!(read(&m, 0x20_0000, 2), [0xfa, 0xf4]);

    let info: hvm_start_info = m.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
    assert_eq!(info.magic, 0x336e_c578);
    assert_eq!(info.version, 1);
    assert_eq!(info.cmdline_paddr, layout::CMDLINE_START);
    assert_eq!(info.rsdp_paddr, layout::RSDP_START);
    assert_eq!(info.nr_modules, 0);
    assert_eq!(memmap(&m, &info), e820_table(128 << 20));
    let cmd = read(&m, layout::CMDLINE_START, 23);
    assert_eq!(&cmd, b"console=ttyS0 reboot=k\0");
}

#[test]
fn elf_without_pvh_preference_uses_the_64bit_entry() {
    let m = mem(128 << 20);
    let k = test_elf(true);
    let mut p = LoadParams::new(&k.0, "quiet", 128 << 20);
    p.prefer_pvh = false;
    p.rsdp = Some(0xe_0000);
    let b = load(&m, &p).unwrap();
    assert_eq!(b.entry_kind, EntryKind::Linux64);
    assert_eq!(b.regs.rip, 0x20_0000);
    assert_eq!(b.regs.rsi, layout::ZERO_PAGE_START);
    assert_eq!(b.sregs.efer & 0x500, 0x500);
    assert!(b.sregs.cs.l);
    let bp = read_boot_params(&m);
    let (magic, flag, loader, cmd_ptr, rsdp) = (
        bp.hdr.header,
        bp.hdr.boot_flag,
        bp.hdr.type_of_loader,
        bp.hdr.cmd_line_ptr,
        bp.acpi_rsdp_addr,
    );
    assert_eq!((magic, flag, loader), (0x5372_6448, 0xaa55, 0xff));
    assert_eq!(cmd_ptr as u64, layout::CMDLINE_START);
    assert_eq!(rsdp, 0xe_0000);
    assert_eq!(bp.e820_entries as usize, e820_table(128 << 20).len());
    let e0 = bp.e820_table[0];
    let (a, s, t) = (e0.addr, e0.size, e0.r#type);
    assert_eq!((a, s, t), (0, layout::EBDA_START, E820_RAM));
    // An ELF without a PVH note enters the same way even when PVH is preferred.
    let k2 = test_elf(false);
    let b2 = load(&m, &LoadParams::new(&k2.0, "", 128 << 20)).unwrap();
    assert_eq!(
        (b2.entry_kind, b2.regs.rip),
        (EntryKind::Linux64, 0x20_0000)
    );
}

#[test]
fn pvh_initrd_is_a_module_high_in_low_ram() {
    let m = mem(64 << 20);
    let k = test_elf(true);
    let initrd: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let rd = TempFile::new(&initrd);
    let mut p = LoadParams::new(&k.0, "", 64 << 20);
    p.initrd = Some(&rd.0);
    let b = load(&m, &p).unwrap();
    let (start, end) = b.initrd_range.unwrap();
    assert_eq!(start % 4096, 0);
    assert_eq!(end - start, 10_000);
    assert!(
        end <= 64 << 20 && (64 << 20) - end < 4096,
        "as high as it goes"
    );
    assert_eq!(read(&m, start, 10_000), initrd);
    let info: hvm_start_info = m.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
    assert_eq!(info.nr_modules, 1);
    let md: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
    assert_eq!((md.paddr, md.size), (start, 10_000));
}

#[test]
fn initrd_placement_avoids_the_kernel() {
    let mib = 1u64 << 20;
    // Room above the kernel: top of RAM.
    assert_eq!(
        place_initrd(5000, u64::MAX, 64 * mib, (16 * mib, 32 * mib)),
        Some(64 * mib - 8192)
    );
    // Limit below RAM end: stays under initrd_addr_max.
    assert_eq!(
        place_initrd(4096, 48 * mib - 1, 64 * mib, (16 * mib, 32 * mib)),
        Some(48 * mib - 4096)
    );
    // Kernel at the top: goes below it.
    assert_eq!(
        place_initrd(mib, u64::MAX, 64 * mib, (60 * mib, 64 * mib)),
        Some(59 * mib)
    );
    // Does not fit on either side.
    assert_eq!(
        place_initrd(20 * mib, u64::MAX, 64 * mib, (16 * mib, 50 * mib)),
        None
    );
    assert_eq!(
        place_initrd(128 * mib, u64::MAX, 64 * mib, (16 * mib, 17 * mib)),
        None
    );
    // Never below 1 MiB.
    assert_eq!(
        place_initrd(mib, u64::MAX, 16 * mib, (mib + 4096, 16 * mib)),
        None
    );
}

#[test]
fn initrd_too_large_names_sizes() {
    let m = mem(32 << 20);
    let k = test_elf(true);
    let rd = TempFile::new(&vec![0u8; 40 << 20]);
    let mut p = LoadParams::new(&k.0, "", 32 << 20);
    p.initrd = Some(&rd.0);
    let e = load(&m, &p).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("initrd {} is 41943040 bytes", rd.0.display())),
        "{e}"
    );
    let missing = PathBuf::from("/nonexistent/initrd.img");
    p.initrd = Some(&missing);
    let e = load(&m, &p).unwrap_err().to_string();
    assert_eq!(
        e,
        "initrd /nonexistent/initrd.img: No such file or directory"
    );
}

#[test]
fn elf_errors_are_one_line_and_name_the_file() {
    let m = mem(64 << 20);
    let outside = TempFile::new(&make_elf(
        0x10_0000,
        None,
        &[Seg {
            paddr: 0x10_0000,
            data: CODE,
            memsz: 128 << 20,
        }],
    ));
    let e = load(&m, &LoadParams::new(&outside.0, "", 64 << 20))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "kernel image {}: ELF segment 0x100000..0x8100000 is outside guest RAM above 1 MiB",
            outside.0.display()
        )
    );
    let low = TempFile::new(&make_elf(
        0x8000,
        None,
        &[Seg {
            paddr: 0x8000,
            data: CODE,
            memsz: 8,
        }],
    ));
    let e = load(&m, &LoadParams::new(&low.0, "", 64 << 20))
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside guest RAM above 1 MiB"), "{e}");

    let mut elf32 = make_elf(0x10_0000, None, &[]);
    elf32[4] = 1;
    let f = TempFile::new(&elf32);
    let e = load(&m, &LoadParams::new(&f.0, "", 64 << 20))
        .unwrap_err()
        .to_string();
    assert!(e.contains("32-bit ELF kernels are not supported"), "{e}");

    let bad_entry = TempFile::new(&make_elf(
        0x50_0000,
        None,
        &[Seg {
            paddr: 0x10_0000,
            data: CODE,
            memsz: 8,
        }],
    ));
    let e = load(&m, &LoadParams::new(&bad_entry.0, "", 64 << 20))
        .unwrap_err()
        .to_string();
    assert!(e.contains("entry point 0x500000 is outside"), "{e}");

    let garbage = TempFile::new(&[0x5a; 10_000]);
    let e = load(&m, &LoadParams::new(&garbage.0, "", 64 << 20))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "kernel image {}: not a bzImage or ELF kernel",
            garbage.0.display()
        )
    );
    let empty = TempFile::new(&[]);
    let e = load(&m, &LoadParams::new(&empty.0, "", 64 << 20))
        .unwrap_err()
        .to_string();
    assert!(e.ends_with("not a bzImage or ELF kernel"), "{e}");
    let e = load(&m, &LoadParams::new(Path::new("/x/y"), "", 64 << 20))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "kernel image /x/y: No such file or directory");
    let e = load(&m, &LoadParams::new(Path::new("/"), "", 64 << 20))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "kernel image /: is a directory");
}

#[test]
fn command_line_limits() {
    let m = mem(64 << 20);
    let k = test_elf(true);
    let long = "x".repeat(layout::CMDLINE_MAX_SIZE);
    let e = load(&m, &LoadParams::new(&k.0, &long, 64 << 20))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "kernel command line is {} bytes but the kernel accepts at most {}",
            layout::CMDLINE_MAX_SIZE,
            layout::CMDLINE_MAX_SIZE - 1
        )
    );
    let e = load(&m, &LoadParams::new(&k.0, "a\0b", 64 << 20))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "kernel command line contains a NUL byte");
    let ok = "y".repeat(layout::CMDLINE_MAX_SIZE - 1);
    load(&m, &LoadParams::new(&k.0, &ok, 64 << 20)).unwrap();
    assert_eq!(read(&m, layout::CMDLINE_START + ok.len() as u64, 1), [0]);
}

#[test]
fn guest_and_cpu_count_are_checked() {
    let m = mem(64 << 20);
    let k = test_elf(true);
    let e = load(&m, &LoadParams::new(&k.0, "", 128 << 20))
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not back RAM"), "{e}");
    let mut p = LoadParams::new(&k.0, "", 64 << 20);
    p.cpus = 0;
    assert!(load(&m, &p).is_err());
    p.cpus = 8;
    load(&m, &p).unwrap();
    let mpf = read(&m, layout::MPTABLE_START, 4);
    assert_eq!(&mpf, b"_MP_");
}

#[test]
fn large_guest_memory_map_reaches_above_4g() {
    let size = 16u64 << 30;
    let m = crate::guest_memory(size).unwrap();
    let k = test_elf(true);
    let mut p = LoadParams::new(&k.0, "", size);
    p.prefer_pvh = false;
    load(&m, &p).unwrap();
    let bp = read_boot_params(&m);
    let n = bp.e820_entries as usize;
    let last = bp.e820_table[n - 1];
    let (a, s, t) = (last.addr, last.size, last.r#type);
    assert_eq!((a, s, t), (1 << 32, size - 0xc000_0000, E820_RAM));
    // And the PVH map says the same.
    load(&m, &LoadParams::new(&k.0, "", size)).unwrap();
    let info: hvm_start_info = m.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap();
    assert_eq!(memmap(&m, &info), e820_table(size));
}

/// xorshift64: deterministic bytes for the mutation tests.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn mangled_elf_images_fail_cleanly() {
    // Random byte flips in the headers, notes and program headers of a valid PVH ELF: every
    // load returns (Ok or a one-line error), none panics.
    let m = mem(64 << 20);
    let base = make_elf(
        0x10_0000,
        Some(0x10_0000),
        &[Seg {
            paddr: 0x10_0000,
            data: CODE,
            memsz: 0x1000,
        }],
    );
    assert!(base.len() > 0xd0);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut ok, mut err) = (0, 0);
    for _ in 0..400 {
        let mut img = base.clone();
        for _ in 0..1 + rng.next() % 4 {
            let at = (rng.next() % 0xd0) as usize; // ELF header, phdrs and the note
            img[at] = rng.next() as u8;
        }
        let f = TempFile::new(&img);
        match load(&m, &LoadParams::new(&f.0, "", 64 << 20)) {
            Ok(_) => ok += 1,
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.contains('\n') && !msg.is_empty());
                err += 1;
            }
        }
    }
    assert!(ok > 0 && err > 0, "ok={ok} err={err}");
}

#[test]
fn invalid_elf_segments_are_refused() {
    let m = mem(64 << 20);
    let load_err = |img: Vec<u8>| {
        let f = TempFile::new(&img);
        load(&m, &LoadParams::new(&f.0, "", 64 << 20))
            .unwrap_err()
            .to_string()
    };
    let seg = |paddr: u64, memsz: u64| Seg {
        paddr,
        data: CODE,
        memsz,
    };
    // p_filesz > p_memsz: the spec says the file part never exceeds the memory part.
    let e = load_err(make_elf(0x10_0000, None, &[seg(0x10_0000, 4)]));
    assert!(e.contains("p_filesz 0x8 > p_memsz 0x4"), "{e}");
    // Overlapping loaded segments.
    let e = load_err(make_elf(
        0x10_0000,
        None,
        &[seg(0x10_0000, 0x2000), seg(0x10_1000, 0x10)],
    ));
    assert!(
        e.contains("ELF segments 0x100000..0x102000 and 0x101000..0x101010 overlap"),
        "{e}"
    );
    // File bytes past the end of the file.
    let mut img = make_elf(0x10_0000, None, &[seg(0x10_0000, 0x10)]);
    let off = 64 + 32; // first program header's p_filesz
    img[off..off + 8].copy_from_slice(&0x1_0000u64.to_le_bytes());
    img[off + 8..off + 16].copy_from_slice(&0x1_0000u64.to_le_bytes());
    let e = load_err(img);
    assert!(e.contains("ends past the end of the file"), "{e}");
    // 10,000 overlapping 64 MiB segments: refused at once, not loaded one by one.
    let many: Vec<Seg> = (0..10_000).map(|_| seg(0x10_0000, 64 << 20)).collect();
    let e = load_err(make_elf(0x10_0000, None, &many));
    assert!(
        e.contains("10000 program headers, more than kvmbox accepts (64)"),
        "{e}"
    );
    // Many small overlapping segments under the header limit: the overlap check catches them.
    let few: Vec<Seg> = (0..60).map(|_| seg(0x10_0000, 0x10)).collect();
    assert!(load_err(make_elf(0x10_0000, None, &few)).contains("overlap"));
}
