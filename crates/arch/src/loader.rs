//! Kernel loading: bzImage through Linux's 64-bit boot protocol, ELF (vmlinux or a freestanding
//! guest) through its PVH entry or its 64-bit entry, the initrd, the command line, and the boot
//! information the entry expects (`boot_params` or `hvm_start_info`).

use crate::boot_cpu::{self, CpuMode};
use crate::layout;
use crate::memory::{check_ram, e820_table, in_ram, write, zero};
use crate::{io_msg, Error, Result};
use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_cpu::{Regs, SpecialRegs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use vm_memory::{ByteValued, Bytes, GuestAddress};

/// What [`load`] needs to know.
#[derive(Debug, Clone)]
pub struct LoadParams<'a> {
    /// bzImage or ELF64 kernel.
    pub kernel: &'a Path,
    /// Initial ramdisk, placed high in RAM below 4 GiB.
    pub initrd: Option<&'a Path>,
    /// Kernel command line (no NUL bytes).
    pub cmdline: &'a str,
    /// Number of vCPUs (for the MP table; ACPI tables are written by [`crate::create_acpi_tables`]).
    pub cpus: u32,
    /// Total guest RAM in bytes; RAM is where [`layout::ram_regions`] puts it.
    pub mem_size: u64,
    /// Use the PVH entry of an ELF kernel that has one (instead of its 64-bit entry).
    pub prefer_pvh: bool,
    /// Guest-physical address of the ACPI RSDP ([`crate::create_acpi_tables`]'s result), put into
    /// `boot_params.acpi_rsdp_addr` / `hvm_start_info.rsdp_paddr`. `None`: the kernel finds no
    /// RSDP through the boot protocol (Linux then scans the BIOS area itself).
    pub rsdp: Option<u64>,
    /// For an LZ4-compressed bzImage (Debian's): decompress it on the host and boot the ELF
    /// vmlinux inside, through its PVH entry if [`LoadParams::prefer_pvh`] (else its 64-bit entry
    /// with the bzImage's setup header in `boot_params`). Skips the in-guest decompressor, which
    /// is tens of millions of instructions. Other bzImages fail with a clear error.
    pub host_decompress: bool,
    /// Multiboot modules after the initrd (which is the first module of a multiboot kernel).
    pub modules: Vec<crate::multiboot::Module>,
}

impl<'a> LoadParams<'a> {
    /// Parameters for one vCPU, no initrd, PVH preferred, no RSDP.
    pub fn new(kernel: &'a Path, cmdline: &'a str, mem_size: u64) -> Self {
        LoadParams {
            kernel,
            initrd: None,
            cmdline,
            cpus: 1,
            mem_size,
            prefer_pvh: true,
            rsdp: None,
            host_decompress: false,
            modules: Vec::new(),
        }
    }
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Multiboot (v1): 32-bit flat protected mode, paging off, EAX = 0x2BADB002, RBX = the
    /// multiboot information ([`crate::multiboot`]).
    Multiboot,
    /// Linux 64-bit boot protocol (bzImage, or an ELF's 64-bit entry): long mode, identity-mapped
    /// first 4 GiB, RSI = `boot_params`.
    Linux64,
    /// PVH: 32-bit flat protected mode, paging off, RBX = `hvm_start_info`.
    Pvh,
}

/// The loaded kernel and the state vCPU 0 starts with.
#[derive(Debug, Clone)]
pub struct BootSetup {
    /// Which entry protocol `regs`/`sregs` are for.
    pub entry_kind: EntryKind,
    /// RIP = entry, RSP = [`layout::BOOT_STACK_POINTER`], RSI (Linux64) = zero page or RBX (PVH) =
    /// start_info, RFLAGS = 0x2.
    pub regs: Regs,
    /// Segments, GDT/IDT, CR0/CR3/CR4, EFER and APIC base of the bootstrap processor.
    pub sregs: SpecialRegs,
    /// Guest-physical memory the kernel owns: `[start, end)` (for a bzImage, load address +
    /// `init_size`).
    pub kernel_range: (u64, u64),
    /// Where the initrd (for a multiboot kernel: the first module) was put, `[start, end)`.
    pub initrd_range: Option<(u64, u64)>,
}

/// Facts about the kernel needed after it is in memory.
struct Kernel {
    mode: CpuMode,
    entry: u64,
    range: (u64, u64),
    /// The setup header of a bzImage (with code32_start at the load address).
    header: Option<setup_header>,
    /// Highest address the initrd may occupy (inclusive).
    initrd_addr_max: u64,
}

/// `boot_params.hdr.header`: "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `boot_params.hdr.boot_flag`.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Offset of the setup header in a bzImage / in `boot_params`.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// `type_of_loader` for a loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags` CAN_USE_HEAP.
const CAN_USE_HEAP: u8 = 0x80;
/// `heap_end_ptr` as QEMU sets it: setup heap/stack up to 0xfe00 past the real-mode code.
const HEAP_END_PTR: u16 = 0xfe00;
/// `xloadflags` XLF_KERNEL_64: the kernel has the 64-bit entry at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry from the protected-mode load address.
const STARTUP_64_OFFSET: u64 = 0x200;
/// `vid_mode` "normal".
const VID_MODE_NORMAL: u16 = 0xffff;
/// The `kernel_alignment` Linux's vmlinux is built for (CONFIG_PHYSICAL_ALIGN on x86-64).
const ELF_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Protocol defaults for kernels older than the fields that carry them.
const OLD_CMDLINE_SIZE: usize = 255;
const OLD_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// How much of the image is read to tell its kind (a multiboot header may be anywhere in it).
const HEAD_SIZE: usize = crate::multiboot::SEARCH_LEN;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// Load the kernel (and initrd) described by `p` into `mem`, write the command line, the boot
/// GDT/IDT/page tables and the boot information the entry expects, and return vCPU 0's state.
///
/// ACPI is separate: call [`crate::create_acpi_tables`] first and pass its result in
/// [`LoadParams::rsdp`]. `mem` must back the RAM of a `p.mem_size` guest (as
/// [`crate::guest_memory`] creates it). Nothing outside the kernel, initrd, command line and the
/// boot structures below 1 MiB is written, so the function can run again on the same memory.
pub fn load(mem: &GuestMemoryMmap, p: &LoadParams) -> Result<BootSetup> {
    let low_end = check_ram(mem, p.mem_size)?;
    crate::mptable::check_cpus(p.cpus)?;
    if p.cmdline.as_bytes().contains(&0) {
        return Err(Error::CmdlineNul);
    }

    let kerr = |msg: String| Error::Kernel {
        path: p.kernel.to_path_buf(),
        msg,
    };
    let mut file = File::open(p.kernel).map_err(|e| kerr(io_msg(&e)))?;
    let meta = file.metadata().map_err(|e| kerr(io_msg(&e)))?;
    if meta.is_dir() {
        return Err(kerr("is a directory".into()));
    }
    let file_len = meta.len();
    let mut head = vec![0u8; HEAD_SIZE];
    let n = read_up_to(&mut file, &mut head).map_err(|e| kerr(io_msg(&e)))?;
    head.truncate(n);

    let kernel = if is_bzimage(&head) && p.host_decompress {
        load_decompressed(mem, p, &mut file, &head, low_end)?
    } else if is_bzimage(&head) {
        load_bzimage(mem, p, &mut file, file_len, &head, low_end)?
    } else if crate::multiboot::claims(&head) {
        return crate::multiboot::load(mem, p, &mut file, file_len, &head);
    } else if head.starts_with(b"\x7fELF") {
        load_elf(mem, p, &mut file, &head, low_end)?
    } else {
        return Err(kerr("not a bzImage or ELF kernel".into()));
    };

    // Command line.
    let mut cmdline = p.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    write(mem, "kernel command line", layout::CMDLINE_START, &cmdline)?;

    let initrd_range = match p.initrd {
        Some(path) => Some(load_initrd(mem, path, &kernel, low_end)?),
        None => None,
    };

    let e820 = e820_table(p.mem_size);
    let entry_kind = match kernel.mode {
        CpuMode::Long => {
            let bp = build_boot_params(&kernel, p, initrd_range, &e820)?;
            write(mem, "boot_params", layout::ZERO_PAGE_START, bp.as_slice())?;
            EntryKind::Linux64
        }
        CpuMode::Protected32 => {
            write_start_info(mem, p, initrd_range, &e820)?;
            EntryKind::Pvh
        }
    };
    // An MP table too, for kernels built without ACPI (Linux prefers ACPI when both exist).
    crate::setup_mptable(mem, p.cpus)?;

    let sregs = boot_cpu::setup_sregs(mem, kernel.mode)?;
    let regs = boot_cpu::boot_regs(kernel.entry, kernel.mode);
    Ok(BootSetup {
        entry_kind,
        regs,
        sregs,
        kernel_range: kernel.range,
        initrd_range,
    })
}

/// Read until `buf` is full or the file ends.
fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn is_bzimage(head: &[u8]) -> bool {
    head.len() >= SETUP_HEADER_OFFSET + std::mem::size_of::<setup_header>()
        && head[0x202..0x206] == HDRS_MAGIC.to_le_bytes()
}

fn read_setup_header(head: &[u8]) -> setup_header {
    let mut h = setup_header::default();
    let n = std::mem::size_of::<setup_header>();
    h.as_mut_slice()
        .copy_from_slice(&head[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + n]);
    h
}

/// `linux_loader` error text without its "Kernel Loader: " prefixes.
fn loader_msg(e: &linux_loader::loader::Error) -> String {
    e.to_string().replace("Kernel Loader: ", "")
}

fn check_cmdline(p: &LoadParams, max: usize) -> Result<()> {
    let max = max.min(layout::CMDLINE_MAX_SIZE - 1);
    if p.cmdline.len() > max {
        return Err(Error::CmdlineTooLong {
            len: p.cmdline.len(),
            max,
        });
    }
    Ok(())
}

fn load_bzimage(
    mem: &GuestMemoryMmap,
    p: &LoadParams,
    file: &mut File,
    file_len: u64,
    head: &[u8],
    low_end: u64,
) -> Result<Kernel> {
    let path = p.kernel.to_path_buf();
    let kerr = |msg: String| Error::Kernel {
        path: path.clone(),
        msg,
    };
    let h = read_setup_header(head);
    let version = h.version;
    let (xloadflags, init_size, pref_address) = (h.xloadflags, h.init_size, h.pref_address);
    if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(kerr(format!(
            "bzImage (boot protocol {}.{:02}) has no 64-bit entry point",
            version >> 8,
            version & 0xff
        )));
    }
    let setup_sects = if h.setup_sects == 0 {
        4
    } else {
        u64::from(h.setup_sects)
    };
    let payload = file_len
        .checked_sub((setup_sects + 1) * 512)
        .filter(|&n| n > 0)
        .ok_or_else(|| kerr("truncated bzImage: no kernel after the setup code".into()))?;
    // Protocol >= 2.10 has pref_address and init_size: load where the kernel wants to run, so the
    // decompressor need not move itself, and leave room for the whole decompressed kernel.
    let load_addr = if version >= 0x020a && pref_address >= layout::HIGH_RAM_START {
        pref_address
    } else {
        layout::KERNEL_START
    };
    let need = if version >= 0x020a {
        u64::from(init_size).max(payload)
    } else {
        payload
    };
    let end = load_addr.saturating_add(need);
    if end > low_end {
        return Err(Error::KernelTooBig {
            path,
            needed_mib: end.div_ceil(MIB),
            guest_mib: p.mem_size / MIB,
        });
    }
    let cmdline_max = if version >= 0x0206 {
        h.cmdline_size as usize
    } else {
        OLD_CMDLINE_SIZE
    };
    check_cmdline(p, cmdline_max)?;
    let initrd_addr_max = if version >= 0x0203 {
        u64::from(h.initrd_addr_max)
    } else {
        OLD_INITRD_ADDR_MAX
    };

    file.seek(SeekFrom::Start(0))
        .map_err(|e| kerr(io_msg(&e)))?;
    let res = BzImage::load(mem, Some(GuestAddress(load_addr)), file, None)
        .map_err(|e| kerr(loader_msg(&e)))?;
    let header = res
        .setup_header
        .ok_or_else(|| kerr("bzImage loader returned no setup header".into()))?;
    Ok(Kernel {
        mode: CpuMode::Long,
        entry: load_addr + STARTUP_64_OFFSET,
        range: (load_addr, end),
        header: Some(header),
        initrd_addr_max,
    })
}

/// ELF64 header fields we check before handing the file to `linux_loader`.
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
/// The most program headers an ELF kernel may have (vmlinux has 5, freestanding guests a few):
/// bounds the work a crafted image can ask for.
const MAX_ELF_PHDRS: usize = 64;

struct Segment {
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Decompress the bzImage in `file` on the host and load the vmlinux inside as an ELF kernel.
fn load_decompressed(
    mem: &GuestMemoryMmap,
    p: &LoadParams,
    file: &mut File,
    head: &[u8],
    low_end: u64,
) -> Result<Kernel> {
    let kerr = |msg: String| Error::Kernel {
        path: p.kernel.to_path_buf(),
        msg,
    };
    let h = read_setup_header(head);
    let mut img = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut img))
        .map_err(|e| kerr(io_msg(&e)))?;
    let elf = crate::vmlinux::vmlinux_from_bzimage(p.kernel, &img)?;
    drop(img);
    if h.version >= 0x0206 {
        check_cmdline(p, h.cmdline_size as usize)?;
    }
    let elf_head = elf[..elf.len().min(HEAD_SIZE)].to_vec();
    let mut k = load_elf(mem, p, &mut std::io::Cursor::new(elf), &elf_head, low_end)?;
    if k.mode == CpuMode::Long {
        let mut hdr = h;
        hdr.code32_start = k.range.0 as u32;
        k.header = Some(hdr);
    }
    if h.version >= 0x0203 {
        k.initrd_addr_max = k.initrd_addr_max.min(u64::from(h.initrd_addr_max));
    }
    Ok(k)
}

fn load_elf<R: Read + Seek + vm_memory::ReadVolatile>(
    mem: &GuestMemoryMmap,
    p: &LoadParams,
    file: &mut R,
    head: &[u8],
    low_end: u64,
) -> Result<Kernel> {
    let path = p.kernel.to_path_buf();
    let kerr = |msg: String| Error::Kernel {
        path: path.clone(),
        msg,
    };
    if head.len() < EHDR_SIZE {
        return Err(kerr("not a bzImage or ELF kernel".into()));
    }
    if head[4] != ELFCLASS64 {
        return Err(kerr(
            "32-bit ELF kernels are not supported (link it as ELF64, e.g. ld -m elf_x86_64)".into(),
        ));
    }
    if head[5] != 1 {
        return Err(kerr("big-endian ELF".into()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let machine = u16_at(18);
    if machine != EM_X86_64 {
        return Err(kerr(format!(
            "ELF for machine {machine}, not x86-64 ({EM_X86_64})"
        )));
    }
    let e_entry = u64_at(head, 24);
    let e_phoff = u64_at(head, 32);
    let phentsize = u16_at(54) as usize;
    let phnum = u16_at(56) as usize;
    if phentsize != PHDR_SIZE {
        return Err(kerr(format!(
            "ELF program header size {phentsize}, expected {PHDR_SIZE}"
        )));
    }
    if phnum > MAX_ELF_PHDRS {
        return Err(kerr(format!(
            "ELF has {phnum} program headers, more than kvmbox accepts ({MAX_ELF_PHDRS})"
        )));
    }
    let file_len = file.seek(SeekFrom::End(0)).map_err(|e| kerr(io_msg(&e)))?;
    let mut phdrs = vec![0u8; phnum * PHDR_SIZE];
    file.seek(SeekFrom::Start(e_phoff))
        .and_then(|_| file.read_exact(&mut phdrs))
        .map_err(|e| kerr(format!("cannot read ELF program headers: {}", io_msg(&e))))?;
    let mut segs = Vec::new();
    for ph in phdrs.chunks_exact(PHDR_SIZE) {
        let p_type = u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]);
        if p_type != PT_LOAD {
            continue;
        }
        let (offset, paddr, filesz, memsz) = (
            u64_at(ph, 8),
            u64_at(ph, 24),
            u64_at(ph, 32),
            u64_at(ph, 40),
        );
        if filesz > memsz {
            return Err(kerr(format!(
                "ELF segment at {paddr:#x} has p_filesz {filesz:#x} > p_memsz {memsz:#x}"
            )));
        }
        if offset.checked_add(filesz).is_none_or(|end| end > file_len) {
            return Err(kerr(format!(
                "ELF segment at {paddr:#x} (file bytes {offset:#x}+{filesz:#x}) ends past the \
                 end of the file ({file_len:#x})"
            )));
        }
        // linux_loader skips PT_LOAD with p_filesz == 0, so do we (bss-only segments are not
        // part of Linux or of freestanding guests' layouts).
        if filesz == 0 {
            continue;
        }
        let end = paddr.checked_add(memsz);
        match end {
            Some(end) if paddr >= layout::HIGH_RAM_START && in_ram(p.mem_size, paddr, end) => {}
            _ => {
                return Err(Error::SegmentOutsideRam {
                    path,
                    start: paddr,
                    end: end.unwrap_or(u64::MAX),
                })
            }
        }
        segs.push(Segment {
            paddr,
            filesz,
            memsz,
        });
    }
    // Loaded segments may not overlap (each byte of the image has one place), which also bounds
    // the copying to the guest's RAM size.
    segs.sort_by_key(|s| s.paddr);
    if let Some(w) = segs
        .windows(2)
        .find(|w| w[1].paddr < w[0].paddr + w[0].memsz)
    {
        return Err(kerr(format!(
            "ELF segments {:#x}..{:#x} and {:#x}..{:#x} overlap",
            w[0].paddr,
            w[0].paddr + w[0].memsz,
            w[1].paddr,
            w[1].paddr + w[1].memsz
        )));
    }
    let start = segs.iter().map(|s| s.paddr).min();
    let end = segs.iter().map(|s| s.paddr + s.memsz).max();
    let (Some(start), Some(end)) = (start, end) else {
        return Err(kerr("ELF has no loadable segment".into()));
    };

    check_cmdline(p, layout::CMDLINE_MAX_SIZE - 1)?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| kerr(io_msg(&e)))?;
    let res = Elf::load(mem, None, file, None).map_err(|e| kerr(loader_msg(&e)))?;
    // linux_loader copies p_filesz bytes only: clear the rest of each segment (bss), in case this
    // memory held something before.
    for s in &segs {
        if s.memsz > s.filesz {
            zero(mem, "ELF bss", s.paddr + s.filesz, s.memsz - s.filesz)?;
        }
    }

    let pvh = match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
        _ => None,
    };
    let (mode, entry) = match pvh {
        Some(a) if p.prefer_pvh => (CpuMode::Protected32, a),
        _ => (CpuMode::Long, e_entry),
    };
    if !(start..end).contains(&entry) {
        return Err(kerr(format!(
            "entry point {entry:#x} is outside the loaded segments {start:#x}..{end:#x}"
        )));
    }
    Ok(Kernel {
        mode,
        entry,
        range: (start, end),
        header: None,
        initrd_addr_max: low_end - 1,
    })
}

/// The highest page-aligned place for `size` bytes ending at or below `min(limit, low_end)` and
/// at or above 1 MiB that does not overlap `kernel`.
pub(crate) fn place_initrd(size: u64, limit: u64, low_end: u64, kernel: (u64, u64)) -> Option<u64> {
    let top = limit.saturating_add(1).min(low_end);
    let fits = |a: u64| a >= layout::HIGH_RAM_START && a + size <= top;
    let addr = top.checked_sub(size)? & !(PAGE - 1);
    if addr >= kernel.1 || addr + size <= kernel.0 {
        return fits(addr).then_some(addr);
    }
    let below = kernel.0.checked_sub(size)? & !(PAGE - 1);
    fits(below).then_some(below)
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &Kernel,
    low_end: u64,
) -> Result<(u64, u64)> {
    let ierr = |msg: String| Error::Initrd {
        path: PathBuf::from(path),
        msg,
    };
    let mut file = File::open(path).map_err(|e| ierr(io_msg(&e)))?;
    let meta = file.metadata().map_err(|e| ierr(io_msg(&e)))?;
    if meta.is_dir() {
        return Err(ierr("is a directory".into()));
    }
    let size = meta.len();
    let top = kernel.initrd_addr_max.saturating_add(1).min(low_end);
    let Some(addr) = place_initrd(size, kernel.initrd_addr_max, low_end, kernel.range) else {
        let above = top.saturating_sub(kernel.range.1.max(layout::HIGH_RAM_START));
        let below = kernel
            .range
            .0
            .min(top)
            .saturating_sub(layout::HIGH_RAM_START);
        return Err(Error::InitrdTooLarge {
            path: PathBuf::from(path),
            size,
            room: above.max(below) & !(PAGE - 1),
            limit: top,
        });
    };
    let len = usize::try_from(size).map_err(|_| ierr("too large".into()))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| ierr(format!("cannot read it into guest memory: {e}")))?;
    Ok((addr, addr + size))
}

fn build_boot_params(
    kernel: &Kernel,
    p: &LoadParams,
    initrd: Option<(u64, u64)>,
    e820: &[crate::E820Entry],
) -> Result<boot_params> {
    let mut bp = boot_params::default();
    match kernel.header {
        Some(h) => {
            bp.hdr = h;
            bp.hdr.loadflags = h.loadflags | CAN_USE_HEAP;
            bp.hdr.heap_end_ptr = HEAP_END_PTR;
        }
        None => {
            // ELF vmlinux: no setup header in the image; give the fields the kernel reads.
            bp.hdr.header = HDRS_MAGIC;
            bp.hdr.boot_flag = BOOT_FLAG_MAGIC;
            bp.hdr.kernel_alignment = ELF_KERNEL_ALIGNMENT;
            bp.hdr.cmdline_size = (layout::CMDLINE_MAX_SIZE - 1) as u32;
        }
    }
    bp.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    bp.hdr.vid_mode = VID_MODE_NORMAL;
    bp.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    if let Some((start, end)) = initrd {
        // Placed below 4 GiB by construction.
        bp.hdr.ramdisk_image = start as u32;
        bp.hdr.ramdisk_size = (end - start) as u32;
    }
    if let Some(rsdp) = p.rsdp {
        bp.acpi_rsdp_addr = rsdp;
    }
    if e820.len() > bp.e820_table.len() {
        return Err(Error::TablesTooLarge {
            what: "E820 entries",
            size: e820.len() as u64,
            start: 0,
            end: bp.e820_table.len() as u64,
        });
    }
    let mut table = bp.e820_table;
    for (slot, e) in table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    bp.e820_table = table;
    bp.e820_entries = e820.len() as u8;
    Ok(bp)
}

fn write_start_info(
    mem: &GuestMemoryMmap,
    p: &LoadParams,
    initrd: Option<(u64, u64)>,
    e820: &[crate::E820Entry],
) -> Result<()> {
    let entry_size = std::mem::size_of::<hvm_memmap_table_entry>() as u64;
    let room = layout::ZERO_PAGE_START - layout::PVH_MEMMAP_START;
    if e820.len() as u64 * entry_size > room {
        return Err(Error::TablesTooLarge {
            what: "PVH memory map entries",
            size: e820.len() as u64 * entry_size,
            start: layout::PVH_MEMMAP_START,
            end: layout::ZERO_PAGE_START,
        });
    }
    for (i, e) in e820.iter().enumerate() {
        let ent = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        let at = layout::PVH_MEMMAP_START + i as u64 * entry_size;
        mem.write_obj(ent, GuestAddress(at))
            .map_err(|_| Error::GuestWrite {
                what: "PVH memory map",
                addr: at,
            })?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: p.rsdp.unwrap_or(0),
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((start, end)) = initrd {
        let module = hvm_modlist_entry {
            paddr: start,
            size: end - start,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(layout::PVH_MODLIST_START))
            .map_err(|_| Error::GuestWrite {
                what: "PVH module list",
                addr: layout::PVH_MODLIST_START,
            })?;
        info.nr_modules = 1;
        info.modlist_paddr = layout::PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(layout::PVH_INFO_START))
        .map_err(|_| Error::GuestWrite {
            what: "PVH start_info",
            addr: layout::PVH_INFO_START,
        })
}

#[cfg(test)]
mod tests;
