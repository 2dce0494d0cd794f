//! Multiboot loader tests with small images built here (the real guests are kvm-unit-tests and
//! the test guest's multiboot build, booted in crates/kvmbox/tests).

use super::*;
use crate::test_util::TempFile;

fn header(flags: u32, aout: Option<[u32; 5]>) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&HEADER_MAGIC.to_le_bytes());
    h.extend_from_slice(&flags.to_le_bytes());
    h.extend_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags))).to_le_bytes());
    for v in aout.unwrap_or_default() {
        if aout.is_some() {
            h.extend_from_slice(&v.to_le_bytes());
        }
    }
    h
}

/// An ELF32 i386 image: one PT_LOAD of `code` at `paddr` with `bss` extra bytes, the multiboot
/// header at the start of the code.
fn make_elf32(paddr: u32, entry: u32, code: &[u8], bss: u32) -> Vec<u8> {
    let mut e = vec![0u8; 52];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 1; // ELFCLASS32
    e[5] = 1;
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes());
    e[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..28].copy_from_slice(&entry.to_le_bytes());
    e[28..32].copy_from_slice(&52u32.to_le_bytes()); // e_phoff
    e[40..42].copy_from_slice(&52u16.to_le_bytes());
    e[42..44].copy_from_slice(&32u16.to_le_bytes());
    e[44..46].copy_from_slice(&1u16.to_le_bytes());
    let off = 0x100u32;
    let mut ph = vec![0u8; 32];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes());
    ph[4..8].copy_from_slice(&off.to_le_bytes());
    ph[8..12].copy_from_slice(&paddr.to_le_bytes());
    ph[12..16].copy_from_slice(&paddr.to_le_bytes());
    ph[16..20].copy_from_slice(&(code.len() as u32).to_le_bytes());
    ph[20..24].copy_from_slice(&(code.len() as u32 + bss).to_le_bytes());
    e.extend_from_slice(&ph);
    e.resize(off as usize, 0);
    e.extend_from_slice(code);
    e
}

const MEM: u64 = 64 << 20;

fn u32_at(mem: &GuestMemoryMmap, a: u64) -> u32 {
    mem.read_obj(GuestAddress(a)).unwrap()
}

fn cstr(mem: &GuestMemoryMmap, a: u64) -> String {
    let mut v = Vec::new();
    for i in 0.. {
        let b: u8 = mem.read_obj(GuestAddress(a + i)).unwrap();
        if b == 0 {
            break;
        }
        v.push(b);
    }
    String::from_utf8(v).unwrap()
}

#[test]
fn elf32_kernel_with_modules() {
    let mut code = header(0x3, None);
    code.extend_from_slice(&[0xf4; 20]);
    let k = TempFile::new(&make_elf32(0x40_0000, 0x40_000c, &code, 0x2000));
    let m1 = TempFile::new(b"first module");
    let m2 = TempFile::new(&[7u8; 5000]);
    let mem = crate::guest_memory(MEM).unwrap();
    // Stale bytes where the bss goes must be cleared.
    mem.write_slice(&[0xaa; 16], GuestAddress(0x40_0000 + code.len() as u64))
        .unwrap();
    let mut p = LoadParams::new(&k.0, "a b", MEM);
    p.initrd = Some(&m1.0);
    p.modules = vec![format!("{},x=1", m2.0.display()).parse().unwrap()];
    let b = crate::load(&mem, &p).unwrap();
    assert_eq!(b.entry_kind, EntryKind::Multiboot);
    assert_eq!(b.regs.rip, 0x40_000c);
    assert_eq!(b.regs.rax, u64::from(BOOTLOADER_MAGIC));
    assert_eq!(b.regs.rbx, layout::MULTIBOOT_INFO_START);
    assert_eq!(b.sregs.cr0 & 0x8000_0001, 1, "protected mode, paging off");
    assert!(b.sregs.cs.db && !b.sregs.cs.l);
    let bss: [u8; 16] = mem
        .read_obj(GuestAddress(0x40_0000 + code.len() as u64))
        .unwrap();
    assert_eq!(bss, [0; 16]);

    let mbi = layout::MULTIBOOT_INFO_START;
    assert_eq!(u32_at(&mem, mbi) & 0x4d, 0x4d);
    assert_eq!(u32_at(&mem, mbi + 4), 639);
    assert_eq!(u64::from(u32_at(&mem, mbi + 8)), (MEM - (1 << 20)) / 1024);
    assert_eq!(
        cstr(&mem, u64::from(u32_at(&mem, mbi + 16))),
        format!("{} a b", k.0.display())
    );
    assert_eq!(cstr(&mem, u64::from(u32_at(&mem, mbi + 64))), "kvmbox");
    assert_eq!(u32_at(&mem, mbi + 20), 2);
    let mods = u64::from(u32_at(&mem, mbi + 24));
    let (s1, e1) = (
        u64::from(u32_at(&mem, mods)),
        u64::from(u32_at(&mem, mods + 4)),
    );
    assert_eq!(
        s1, 0x40_3000,
        "first module on the page after the kernel's bss"
    );
    assert_eq!(e1 - s1, 12);
    let mut buf = [0u8; 12];
    mem.read_slice(&mut buf, GuestAddress(s1)).unwrap();
    assert_eq!(&buf, b"first module");
    assert_eq!(
        cstr(&mem, u64::from(u32_at(&mem, mods + 8))),
        m1.0.display().to_string()
    );
    let (s2, e2) = (
        u64::from(u32_at(&mem, mods + 16)),
        u64::from(u32_at(&mem, mods + 20)),
    );
    assert_eq!((s2 % 4096, e2 - s2), (0, 5000));
    assert!(s2 >= e1);
    assert_eq!(
        cstr(&mem, u64::from(u32_at(&mem, mods + 24))),
        format!("{} x=1", m2.0.display())
    );
    assert_eq!(b.initrd_range, Some((s1, e1)));

    // The memory map is the e820 table.
    let e820 = e820_table(MEM);
    assert_eq!(u32_at(&mem, mbi + 44) as usize, e820.len() * 24);
    let mm = u64::from(u32_at(&mem, mbi + 48));
    for (i, e) in e820.iter().enumerate() {
        let at = mm + i as u64 * 24;
        assert_eq!(u32_at(&mem, at), 20);
        let base: u64 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        let len: u64 = mem.read_obj(GuestAddress(at + 12)).unwrap();
        assert_eq!((base, len, u32_at(&mem, at + 20)), (e.addr, e.size, e.kind));
    }
}

#[test]
fn aout_kludge_image() {
    // A flat image: 0x40 bytes of padding, the header at 0x40 claiming it sits at 0x20_0040,
    // so the file loads from offset 0 at 0x20_0000.
    let load = 0x20_0000u32;
    let mut img = vec![0x90u8; 0x40];
    img.extend_from_slice(&header(
        HF_AOUT_KLUDGE,
        Some([load + 0x40, load, 0, load + 0x1000, load + 0x60]),
    ));
    img.resize(0x80, 0xf4);
    let k = TempFile::new(&img);
    let mem = crate::guest_memory(MEM).unwrap();
    let b = crate::load(&mem, &LoadParams::new(&k.0, "", MEM)).unwrap();
    assert_eq!(b.regs.rip, 0x20_0060);
    assert_eq!(b.kernel_range, (0x20_0000, 0x20_1000));
    let mut buf = vec![0u8; 0x80];
    mem.read_slice(&mut buf, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(buf, img);
}

#[test]
fn bad_headers_are_named() {
    let mem = crate::guest_memory(MEM).unwrap();
    let err = |img: Vec<u8>| {
        let k = TempFile::new(&img);
        crate::load(&mem, &LoadParams::new(&k.0, "", MEM))
            .unwrap_err()
            .to_string()
    };
    let mut bad_sum = header(0, None);
    bad_sum[8] ^= 1;
    bad_sum.resize(64, 0);
    assert!(err(bad_sum).contains("bad checksum"));
    let mut unknown = header(1 << 5, None);
    unknown.resize(64, 0);
    assert!(err(unknown).contains("requires features"));
    let mut not_elf = header(0, None);
    not_elf.resize(64, 0);
    assert!(err(not_elf).contains("not ELF"));
    let mut truncated = vec![0u8; 8];
    truncated.extend_from_slice(&header(HF_AOUT_KLUDGE, None));
    assert!(err(truncated).contains("truncated"));
    // a.out fields that point past the file.
    let mut past = header(
        HF_AOUT_KLUDGE,
        Some([0x20_0000, 0x20_0000, 0x30_0000, 0, 0x20_0000]),
    );
    past.resize(64, 0);
    assert!(err(past).contains("past the end of the file"));
    // A segment over kvmbox's boot structures.
    let mut code = header(0, None);
    code.extend_from_slice(&[0xf4; 4]);
    assert!(err(make_elf32(0x1000, 0x100c, &code, 0)).contains("boot structures"));
    // A segment beyond RAM.
    assert!(err(make_elf32(0x800_0000, 0x800_000c, &code, 0)).contains("outside guest RAM"));
    // An entry point outside the image.
    assert!(err(make_elf32(0x40_0000, 0x50_0000, &code, 0)).contains("entry point"));
}

#[test]
fn header_must_be_in_the_first_8k() {
    let mut img = vec![0u8; SEARCH_LEN];
    img.extend_from_slice(&header(0, None));
    assert_eq!(find_header(&img), Ok(None));
    assert!(!claims(&img));
    let mut img = vec![0u8; SEARCH_LEN - 12];
    img.extend_from_slice(&header(0, None));
    assert_eq!(find_header(&img).unwrap().unwrap().offset, SEARCH_LEN - 12);
}

#[test]
fn module_specs() {
    let m: Module = "a/b.img".parse().unwrap();
    assert_eq!((m.path, m.cmdline), (PathBuf::from("a/b.img"), None));
    let m: Module = "x,y z,w".parse().unwrap();
    assert_eq!(
        (m.path, m.cmdline),
        (PathBuf::from("x"), Some("y z,w".into()))
    );
    assert!(",foo".parse::<Module>().is_err());
}
