//! Load Debian's cloud kernel (fetched by guest/linux/fetch-kernel.sh, cached in
//! ~/.cache/kvmbox/linux) and check what the 64-bit boot protocol hands it.

use kvmbox_arch::{
    create_acpi_tables, e820_table, guest_memory, layout, load, EntryKind, LoadParams, E820_RAM,
    E820_RESERVED,
};
use kvmbox_cpu::GuestMemoryMmap;
use linux_loader::loader::bootparam::boot_params;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

/// The bzImage path, fetching it on first use (the script is idempotent and cached).
fn kernel() -> &'static Path {
    static K: OnceLock<PathBuf> = OnceLock::new();
    K.get_or_init(|| {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/linux/fetch-kernel.sh");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        assert!(path.is_file(), "{} is not a file", path.display());
        path
    })
}

/// A file in the temp directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, data: &[u8]) -> Self {
        let p = std::env::temp_dir().join(format!("kvmbox-bz-{}-{name}", std::process::id()));
        std::fs::write(&p, data).unwrap();
        TempFile(p)
    }
    /// A sparse file of `len` zero bytes.
    fn sparse(name: &str, len: u64) -> Self {
        let t = TempFile::new(name, &[]);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&t.0)
            .unwrap()
            .set_len(len)
            .unwrap();
        t
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn u16_at(d: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([d[o], d[o + 1]])
}
fn u32_at(d: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(d[o..o + 4].try_into().unwrap())
}
fn u64_at(d: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(d[o..o + 8].try_into().unwrap())
}

fn read(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// Setup-header facts read straight from the image file.
struct Header {
    setup_sects: u64,
    cmdline_size: usize,
    initrd_addr_max: u64,
    pref_address: u64,
    init_size: u64,
    kernel_alignment: u64,
}

fn header(img: &[u8]) -> Header {
    assert_eq!(&img[0x202..0x206], b"HdrS");
    assert!(u16_at(img, 0x206) >= 0x20c);
    Header {
        setup_sects: img[0x1f1] as u64,
        initrd_addr_max: u32_at(img, 0x22c) as u64,
        kernel_alignment: u32_at(img, 0x230) as u64,
        cmdline_size: u32_at(img, 0x238) as usize,
        pref_address: u64_at(img, 0x258),
        init_size: u32_at(img, 0x260) as u64,
    }
}

#[test]
fn debian_bzimage_boot_params() {
    let img = std::fs::read(kernel()).unwrap();
    let h = header(&img);
    let mem_size = 256 * MIB;
    let mem = guest_memory(mem_size).unwrap();
    let rsdp = create_acpi_tables(&mem, 2).unwrap();
    let initrd: Vec<u8> = (0..3 * MIB as u32 + 123).map(|i| (i % 251) as u8).collect();
    let rd = TempFile::new("initrd", &initrd);
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 reboot=k";
    let mut p = LoadParams::new(kernel(), cmdline, mem_size);
    p.initrd = Some(&rd.0);
    p.cpus = 2;
    p.rsdp = Some(rsdp);
    let b = load(&mem, &p).unwrap();

    // Kernel at its preferred address, 2 MiB aligned, entered at startup_64.
    assert_eq!(b.entry_kind, EntryKind::Linux64);
    assert_eq!(h.pref_address, 16 * MIB);
    assert_eq!(
        b.kernel_range,
        (h.pref_address, h.pref_address + h.init_size)
    );
    assert_eq!(b.kernel_range.0 % (2 * MIB), 0);
    assert_eq!(b.kernel_range.0 % h.kernel_alignment, 0);
    assert_eq!(b.regs.rip, h.pref_address + 0x200);
    assert_eq!(b.regs.rsi, layout::ZERO_PAGE_START);
    assert_eq!(b.regs.rflags, 2);
    assert_eq!((b.sregs.cs.selector, b.sregs.ds.selector), (0x10, 0x18));
    assert!(b.sregs.cs.l);
    let setup_len = ((h.setup_sects + 1) * 512) as usize;
    let payload = &img[setup_len..];
    assert_eq!(read(&mem, h.pref_address, payload.len()), payload);

    let bp: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
    let zp = read(&mem, layout::ZERO_PAGE_START, 4096);
    // The setup header is the image's, except the fields a loader writes.
    let hdr_end = 0x202 + img[0x201] as usize;
    let loader_written = [
        0x1fa..0x1fc, // vid_mode
        0x210..0x212, // type_of_loader, loadflags
        0x214..0x220, // code32_start, ramdisk_image, ramdisk_size
        0x224..0x22c, // heap_end_ptr, ext_loader_*, cmd_line_ptr
    ];
    for off in 0x1f1..hdr_end {
        if !loader_written.iter().any(|r| r.contains(&off)) {
            assert_eq!(zp[off], img[off], "setup header byte {off:#x}");
        }
    }
    assert_eq!(u16_at(&zp, 0x1fa), 0xffff, "vid_mode");
    assert_eq!(zp[0x210], 0xff, "type_of_loader");
    assert_eq!(zp[0x211], img[0x211] | 0x80, "loadflags | CAN_USE_HEAP");
    assert_eq!(u32_at(&zp, 0x214) as u64, h.pref_address, "code32_start");
    assert_eq!(u16_at(&zp, 0x224), 0xfe00, "heap_end_ptr");
    assert_eq!(
        u32_at(&zp, 0x228) as u64,
        layout::CMDLINE_START,
        "cmd_line_ptr"
    );
    let cmd = read(&mem, layout::CMDLINE_START, cmdline.len() + 1);
    assert_eq!(&cmd[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(cmd[cmdline.len()], 0);
    assert_eq!(u64_at(&zp, 0x70), rsdp, "acpi_rsdp_addr");

    // E820: RAM below the EBDA, EBDA..1 MiB reserved, RAM 1 MiB..256 MiB, MMIO reserved.
    let n = bp.e820_entries as usize;
    let e820: Vec<(u64, u64, u32)> = (0..n)
        .map(|i| {
            let e = bp.e820_table[i];
            (e.addr, e.size, e.r#type)
        })
        .collect();
    assert_eq!(e820[0], (0, 0x9_fc00, E820_RAM));
    assert_eq!(e820[1], (0x9_fc00, 0x10_0000 - 0x9_fc00, E820_RESERVED));
    assert_eq!(e820[2], (0x10_0000, mem_size - 0x10_0000, E820_RAM));
    assert!(e820[3..]
        .iter()
        .all(|e| e.2 == E820_RESERVED && e.0 >= 0xc000_0000));
    assert_eq!(
        e820,
        e820_table(mem_size)
            .iter()
            .map(|e| (e.addr, e.size, e.kind))
            .collect::<Vec<_>>()
    );

    // Initrd: page aligned, below initrd_addr_max, not on the kernel, as high as possible.
    let (start, size) = (u32_at(&zp, 0x218) as u64, u32_at(&zp, 0x21c) as u64);
    assert_eq!(b.initrd_range, Some((start, start + size)));
    assert_eq!(size, initrd.len() as u64);
    assert_eq!(start % 4096, 0);
    assert!(start + size - 1 <= h.initrd_addr_max);
    assert!(start >= b.kernel_range.1 || start + size <= b.kernel_range.0);
    assert!(start + size <= mem_size && mem_size - (start + size) < 4096);
    assert_eq!(read(&mem, start, initrd.len()), initrd);
}

#[test]
fn initrd_stays_below_initrd_addr_max_in_a_big_guest() {
    let img = std::fs::read(kernel()).unwrap();
    let h = header(&img);
    assert_eq!(h.initrd_addr_max, 0x7fff_ffff);
    let mem_size = 6 << 30;
    let mem = guest_memory(mem_size).unwrap();
    let rd = TempFile::new("initrd-big", &[0x42; 8192]);
    let mut p = LoadParams::new(kernel(), "", mem_size);
    p.initrd = Some(&rd.0);
    let b = load(&mem, &p).unwrap();
    let (start, end) = b.initrd_range.unwrap();
    assert_eq!(
        end,
        h.initrd_addr_max + 1,
        "highest page below initrd_addr_max"
    );
    assert_eq!(start, end - 8192);
    let bp: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
    let last = bp.e820_table[bp.e820_entries as usize - 1];
    let (a, s, t) = (last.addr, last.size, last.r#type);
    assert_eq!((a, s, t), (1 << 32, (6 << 30) - 0xc000_0000, E820_RAM));
}

#[test]
fn too_small_guest_fails_with_init_size() {
    let img = std::fs::read(kernel()).unwrap();
    let h = header(&img);
    let mem = guest_memory(64 * MIB).unwrap();
    let e = load(&mem, &LoadParams::new(kernel(), "", 64 * MIB))
        .unwrap_err()
        .to_string();
    let need = (h.pref_address + h.init_size).div_ceil(MIB);
    assert_eq!(need, 68, "Debian 6.1 cloud: 16 MiB + ~51.5 MiB");
    assert_eq!(
        e,
        format!(
            "kernel image {}: kernel needs {need} MiB from its load address (init_size) but the \
             guest has 64 MiB",
            kernel().display()
        )
    );
    // Exactly enough RAM (rounded up to a page) works.
    let size = (h.pref_address + h.init_size).next_multiple_of(4096);
    let mem = guest_memory(size).unwrap();
    load(&mem, &LoadParams::new(kernel(), "", size)).unwrap();
}

#[test]
fn too_long_cmdline_names_both_lengths() {
    let img = std::fs::read(kernel()).unwrap();
    let h = header(&img);
    assert_eq!(h.cmdline_size, 2047);
    let mem = guest_memory(256 * MIB).unwrap();
    let long = "a".repeat(h.cmdline_size + 1);
    let e = load(&mem, &LoadParams::new(kernel(), &long, 256 * MIB))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "kernel command line is 2048 bytes but the kernel accepts at most 2047"
    );
    let fits = "a".repeat(h.cmdline_size);
    load(&mem, &LoadParams::new(kernel(), &fits, 256 * MIB)).unwrap();
}

#[test]
fn bad_kernel_files_fail_with_one_line() {
    let mem = guest_memory(256 * MIB).unwrap();
    let garbage = TempFile::new("garbage", &[0xa5; 64 << 10]);
    let e = load(&mem, &LoadParams::new(&garbage.0, "", 256 * MIB))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "kernel image {}: not a bzImage or ELF kernel",
            garbage.0.display()
        )
    );
    let e = load(&mem, &LoadParams::new(Path::new("/x/y"), "", 256 * MIB))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "kernel image /x/y: No such file or directory");

    // The first 8 KiB of the real image: a header, but no kernel after the setup code.
    let img = std::fs::read(kernel()).unwrap();
    let cut = TempFile::new("cut", &img[..8192]);
    let e = load(&mem, &LoadParams::new(&cut.0, "", 256 * MIB))
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("truncated bzImage: no kernel after the setup code"),
        "{e}"
    );
    assert!(!e.contains('\n'));
}

#[test]
fn initrd_that_does_not_fit_fails() {
    let mem = guest_memory(256 * MIB).unwrap();
    let rd = TempFile::sparse("huge-initrd", 200 * MIB);
    let mut p = LoadParams::new(kernel(), "", 256 * MIB);
    p.initrd = Some(&rd.0);
    let e = load(&mem, &p).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "initrd {} is {} bytes but at most",
            rd.0.display(),
            200 * MIB
        )),
        "{e}"
    );
    assert!(
        e.ends_with("bytes of guest RAM below 0x10000000 are free next to the kernel"),
        "{e}"
    );
}

#[test]
fn host_decompressed_bzimage_boots_the_vmlinux_inside() {
    let img = std::fs::read(kernel()).unwrap();
    let h = header(&img);
    let t = std::time::Instant::now();
    let elf = kvmbox_arch::extract_vmlinux(kernel()).unwrap();
    eprintln!("extract_vmlinux: {} bytes in {:?}", elf.len(), t.elapsed());
    assert_eq!(&elf[..4], b"\x7fELF");
    // The kernel build appends the decompressed size to the payload.
    let (off, len) = (u32_at(&img, 0x248) as usize, u32_at(&img, 0x24c) as usize);
    let payload_end = (h.setup_sects as usize + 1) * 512 + off + len;
    assert_eq!(elf.len(), u32_at(&img, payload_end - 4) as usize);
    // First PT_LOAD of vmlinux: file offset and physical address.
    let phoff = u64_at(&elf, 32) as usize;
    let (seg_off, seg_paddr) = (u64_at(&elf, phoff + 8), u64_at(&elf, phoff + 24));
    assert_eq!(
        seg_paddr, h.pref_address,
        "vmlinux runs at LOAD_PHYSICAL_ADDR"
    );

    let mem_size = 256 * MIB;
    let mem = guest_memory(mem_size).unwrap();
    let rd = TempFile::new("initrd-hd", &[7u8; 5000]);
    let mut p = LoadParams::new(kernel(), "console=ttyS0", mem_size);
    p.host_decompress = true;
    p.initrd = Some(&rd.0);
    p.rsdp = Some(create_acpi_tables(&mem, 1).unwrap());
    let b = load(&mem, &p).unwrap();
    assert_eq!(
        b.entry_kind,
        EntryKind::Pvh,
        "Debian's kernel has CONFIG_PVH"
    );
    assert_eq!(b.regs.rbx, layout::PVH_INFO_START);
    assert!(b.regs.rip > seg_paddr && b.regs.rip < b.kernel_range.1);
    assert_eq!(b.kernel_range.0, seg_paddr);
    assert_eq!(
        read(&mem, seg_paddr, 4096),
        &elf[seg_off as usize..seg_off as usize + 4096]
    );
    let (start, end) = b.initrd_range.unwrap();
    assert!(start >= b.kernel_range.1 && end <= mem_size);

    // The same through the 64-bit entry: e_entry, and the bzImage's own setup header.
    p.prefer_pvh = false;
    let b = load(&mem, &p).unwrap();
    assert_eq!(b.entry_kind, EntryKind::Linux64);
    assert_eq!(b.regs.rip, u64_at(&elf, 24));
    let zp = read(&mem, layout::ZERO_PAGE_START, 4096);
    assert_eq!(&zp[0x202..0x206], b"HdrS");
    assert_eq!(
        u16_at(&zp, 0x206),
        u16_at(&img, 0x206),
        "protocol version from the image"
    );
    assert_eq!(zp[0x210], 0xff);
    assert_eq!(u32_at(&zp, 0x214) as u64, seg_paddr, "code32_start");
    assert_eq!(u32_at(&zp, 0x218) as u64, start, "ramdisk_image");
    assert_eq!(u32_at(&zp, 0x21c), 5000, "ramdisk_size");
    assert_eq!(u32_at(&zp, 0x228) as u64, layout::CMDLINE_START);
    assert_eq!(u64_at(&zp, 0x70), layout::RSDP_START);

    // Only LZ4 payloads can be decompressed here: flip the magic and it is a clear error.
    let mut other = img.clone();
    let pstart = (h.setup_sects as usize + 1) * 512 + off;
    other[pstart] ^= 0xff;
    let f = TempFile::new("not-lz4", &other);
    let mut p = LoadParams::new(&f.0, "", mem_size);
    p.host_decompress = true;
    let e = load(&mem, &p).unwrap_err().to_string();
    assert!(e.contains("not LZ4-compressed"), "{e}");
}

#[test]
fn load_time() {
    let _ = kernel(); // fetch outside the timed part
    let mem_size = 256 * MIB;
    let mem = guest_memory(mem_size).unwrap();
    let t = std::time::Instant::now();
    create_acpi_tables(&mem, 2).unwrap();
    let acpi = t.elapsed();
    let mut bz = std::time::Duration::MAX;
    for _ in 0..3 {
        // Best of three: the first also faults in the guest pages it writes.
        let t = std::time::Instant::now();
        load(&mem, &LoadParams::new(kernel(), "console=ttyS0", mem_size)).unwrap();
        bz = bz.min(t.elapsed());
    }
    let mut p = LoadParams::new(kernel(), "console=ttyS0", mem_size);
    p.host_decompress = true;
    let t = std::time::Instant::now();
    load(&mem, &p).unwrap();
    let hd = t.elapsed();
    eprintln!("create_acpi_tables {acpi:?}, load bzImage {bz:?}, load host-decompressed {hd:?}");
    // Loose bounds that only catch something badly wrong (debug build, shared host).
    assert!(bz.as_secs() < 5 && hd.as_secs() < 20);
}

#[test]
fn mangled_bzimage_headers_fail_cleanly() {
    // The setup code of the real image with random bytes in its setup header, and a short
    // payload: every load (in-guest or host-decompressed) returns, none panics.
    let img = std::fs::read(kernel()).unwrap();
    let h = header(&img);
    let setup = (h.setup_sects as usize + 1) * 512;
    let base = &img[..setup + 64 * 1024];
    let mem = guest_memory(128 * MIB).unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut ok, mut err) = (0, 0);
    for i in 0..300 {
        let mut m = base.to_vec();
        for _ in 0..1 + next() % 3 {
            let at = 0x1f1 + (next() % 0x7b) as usize; // inside the setup header
            m[at] = next() as u8;
        }
        let f = TempFile::new(&format!("mangled-{i}"), &m);
        let mut p = LoadParams::new(&f.0, "console=ttyS0", 128 * MIB);
        p.host_decompress = i % 2 == 1;
        match load(&mem, &p) {
            Ok(_) => ok += 1,
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.contains('\n'), "{msg}");
                err += 1;
            }
        }
    }
    assert!(err > 0, "ok={ok} err={err}");
}
