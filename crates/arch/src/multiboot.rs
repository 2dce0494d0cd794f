//! Multiboot (version 1) kernels, as QEMU's `-kernel` boots them: the header is found in the
//! image's first 8 KiB; the image is an ELF32 file or, with the header's "a.out kludge" flag, a
//! flat image whose load addresses the header gives. The kernel starts in 32-bit flat protected
//! mode with paging off, EAX = 0x2BADB002 and EBX = the multiboot information (memory bounds,
//! memory map, command line, modules).
//!
//! kvm-unit-tests are multiboot ELF32 kernels; so is the test guest's multiboot build.

use crate::boot_cpu::{self, CpuMode};
use crate::layout;
use crate::loader::{BootSetup, EntryKind, LoadParams};
use crate::memory::{check_ram, e820_table, in_ram, write, zero};
use crate::{io_msg, Error, Result};
use kvmbox_cpu::GuestMemoryMmap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use vm_memory::{Bytes, GuestAddress};

/// The header's magic number.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What EAX holds at entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must start within this many bytes of the image, 4-byte aligned.
pub const SEARCH_LEN: usize = 8192;

/// Header flags: align modules on pages, provide memory information, provide a video mode
/// (bits 0-2: the "required" bits kvmbox understands; the video request is ignored, as QEMU
/// does), and the a.out kludge (bit 16: load addresses are in the header).
const HF_KNOWN_REQUIRED: u32 = 0x7;
const HF_AOUT_KLUDGE: u32 = 1 << 16;

/// Information flags: mem_lower/upper, cmdline, modules, mmap, boot loader name.
const MBI_MEMORY: u32 = 1 << 0;
const MBI_CMDLINE: u32 = 1 << 2;
const MBI_MODS: u32 = 1 << 3;
const MBI_MMAP: u32 = 1 << 6;
const MBI_LOADER_NAME: u32 = 1 << 9;
/// Size of the multiboot information structure.
const MBI_SIZE: usize = 88;
/// One memory map entry: size (of the rest, 20), base, length, type.
const MMAP_ENTRY_SIZE: u64 = 24;
/// One module entry: start, end, cmdline, reserved.
const MOD_ENTRY_SIZE: u64 = 16;
const LOADER_NAME: &str = "kvmbox";

const PAGE: u64 = 4096;
const KIB: u64 = 1024;

/// A multiboot module: a file loaded into guest memory and named in the module list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// The file.
    pub path: PathBuf,
    /// Its command line (the path, as QEMU gives it, when none is given).
    pub cmdline: Option<String>,
}

impl std::str::FromStr for Module {
    type Err = String;
    /// `PATH[,CMDLINE]`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (path, cmdline) = match s.split_once(',') {
            Some((p, c)) => (p, Some(c.to_string())),
            None => (s, None),
        };
        if path.is_empty() {
            return Err(format!("invalid --module '{s}': expected PATH[,CMDLINE]"));
        }
        Ok(Module {
            path: PathBuf::from(path),
            cmdline,
        })
    }
}

/// The fields of a valid multiboot header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Offset of the header in the file.
    pub offset: usize,
    /// The flags word.
    pub flags: u32,
    /// a.out kludge: header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr.
    pub aout: Option<[u32; 5]>,
}

/// Find the multiboot header in `head` (the image's first bytes). `Ok(None)`: there is no
/// magic number; `Err`: there is one but the header is invalid (bad checksum, required flags
/// kvmbox does not know, truncated a.out fields).
pub fn find_header(head: &[u8]) -> std::result::Result<Option<Header>, String> {
    let u32_at = |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
    let limit = head.len().min(SEARCH_LEN);
    let Some(offset) = (0..limit.saturating_sub(3))
        .step_by(4)
        .find(|&o| u32_at(o) == HEADER_MAGIC)
    else {
        return Ok(None);
    };
    if offset + 12 > head.len() {
        return Err(format!("multiboot header at {offset:#x} is truncated"));
    }
    let flags = u32_at(offset + 4);
    let checksum = u32_at(offset + 8);
    if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
        return Err(format!(
            "multiboot header at {offset:#x} has a bad checksum ({checksum:#x}; magic + flags + \
             checksum must be 0)"
        ));
    }
    let unknown = flags & 0xffff & !HF_KNOWN_REQUIRED;
    if unknown != 0 {
        return Err(format!(
            "multiboot header requires features kvmbox does not provide (flags {unknown:#x})"
        ));
    }
    let aout = if flags & HF_AOUT_KLUDGE != 0 {
        if offset + 32 > head.len() {
            return Err(format!(
                "multiboot header at {offset:#x} is truncated (a.out kludge fields)"
            ));
        }
        let mut f = [0u32; 5];
        for (i, v) in f.iter_mut().enumerate() {
            *v = u32_at(offset + 12 + 4 * i);
        }
        Some(f)
    } else {
        None
    };
    Ok(Some(Header {
        offset,
        flags,
        aout,
    }))
}

/// Whether `head` (the first bytes of a kernel image) makes it a multiboot kernel for
/// [`crate::load`]: it has a multiboot magic number in its first 8 KiB and is not an ELF64 file
/// (ELF64 kernels keep their PVH or 64-bit entry; QEMU too boots a multiboot ELF64 only through
/// the a.out kludge).
pub(crate) fn claims(head: &[u8]) -> bool {
    let elf64 = head.starts_with(b"\x7fELF") && head.get(4) == Some(&2);
    !elf64 && matches!(find_header(head), Ok(Some(_)) | Err(_))
}

/// One piece of the kernel image to put in guest memory.
struct Piece {
    /// Guest-physical address.
    paddr: u64,
    /// Offset in the file.
    offset: u64,
    /// Bytes from the file.
    filesz: u64,
    /// Bytes in memory (the rest is zeroed).
    memsz: u64,
}

/// Ranges of low memory kvmbox's boot structures use: a kernel or module must not overlap them.
fn reserved_ranges() -> [(u64, u64); 3] {
    [
        (0, layout::MULTIBOOT_LOAD_MIN),
        (
            layout::CMDLINE_START,
            layout::CMDLINE_START + layout::CMDLINE_MAX_SIZE as u64,
        ),
        (layout::EBDA_START, layout::HIGH_RAM_START),
    ]
}

fn overlaps_reserved(start: u64, end: u64) -> Option<(u64, u64)> {
    reserved_ranges()
        .into_iter()
        .find(|&(s, e)| start < e && end > s)
}

/// Load the multiboot kernel `p.kernel` (whose first bytes are `head`), its modules (the initrd
/// first, then `p.modules`), write the multiboot information and return vCPU 0's state.
pub(crate) fn load(
    mem: &GuestMemoryMmap,
    p: &LoadParams,
    file: &mut File,
    file_len: u64,
    head: &[u8],
) -> Result<BootSetup> {
    let path = p.kernel.to_path_buf();
    let kerr = |msg: String| Error::Kernel {
        path: path.clone(),
        msg,
    };
    let low_end = check_ram(mem, p.mem_size)?;
    let hdr = find_header(head)
        .map_err(kerr)?
        .ok_or_else(|| kerr("no multiboot header in the first 8 KiB".into()))?;
    let (pieces, entry) = match hdr.aout {
        Some(a) => aout_pieces(&hdr, a, file_len).map_err(kerr)?,
        None => elf32_pieces(file, head).map_err(kerr)?,
    };
    let mut kernel_start = u64::MAX;
    let mut kernel_end = 0;
    for pc in &pieces {
        let end = pc.paddr + pc.memsz;
        if !in_ram(p.mem_size, pc.paddr, end) || end > low_end {
            return Err(Error::SegmentOutsideRam {
                path: path.clone(),
                start: pc.paddr,
                end,
            });
        }
        if let Some((s, e)) = overlaps_reserved(pc.paddr, end) {
            return Err(kerr(format!(
                "segment {:#x}..{end:#x} overlaps {s:#x}..{e:#x}, where kvmbox puts its boot \
                 structures",
                pc.paddr
            )));
        }
        kernel_start = kernel_start.min(pc.paddr);
        kernel_end = kernel_end.max(end);
    }
    if !(kernel_start..kernel_end).contains(&entry) {
        return Err(kerr(format!(
            "entry point {entry:#x} is outside the loaded image {kernel_start:#x}..{kernel_end:#x}"
        )));
    }
    for pc in &pieces {
        let len = usize::try_from(pc.filesz).map_err(|_| kerr("segment too large".into()))?;
        file.seek(SeekFrom::Start(pc.offset))
            .map_err(|e| kerr(io_msg(&e)))?;
        mem.read_exact_volatile_from(GuestAddress(pc.paddr), file, len)
            .map_err(|e| kerr(format!("cannot read it into guest memory: {e}")))?;
        if pc.memsz > pc.filesz {
            zero(
                mem,
                "multiboot bss",
                pc.paddr + pc.filesz,
                pc.memsz - pc.filesz,
            )?;
        }
    }

    // Strings: the kernel's command line (its path first, as QEMU passes it), module command
    // lines, the boot loader's name; NUL-terminated, one after another.
    let mut strings = Strings::default();
    let cmdline = strings.add(&format!("{} {}", p.kernel.display(), p.cmdline))?;
    let loader_name = strings.add(LOADER_NAME)?;

    let mut modules: Vec<Module> = Vec::new();
    if let Some(initrd) = p.initrd {
        modules.push(Module {
            path: initrd.to_path_buf(),
            cmdline: None,
        });
    }
    modules.extend(p.modules.iter().cloned());
    check_room(
        "multiboot module list",
        modules.len(),
        MOD_ENTRY_SIZE,
        layout::MULTIBOOT_MODS_START,
        layout::ZERO_PAGE_START,
    )?;
    let mut next = kernel_end.next_multiple_of(PAGE);
    let mut first_module = None;
    for (i, m) in modules.iter().enumerate() {
        let (start, end) = load_module(mem, m, &mut next, low_end)?;
        first_module.get_or_insert((start, end));
        let text = match &m.cmdline {
            Some(c) => format!("{} {c}", m.path.display()),
            None => m.path.display().to_string(),
        };
        let name = strings.add(&text)?;
        let mut ent = [0u8; MOD_ENTRY_SIZE as usize];
        // Below 4 GiB: modules are placed under `low_end`.
        ent[0..4].copy_from_slice(&(start as u32).to_le_bytes());
        ent[4..8].copy_from_slice(&(end as u32).to_le_bytes());
        ent[8..12].copy_from_slice(&name.to_le_bytes());
        write(
            mem,
            "multiboot module list",
            layout::MULTIBOOT_MODS_START + i as u64 * MOD_ENTRY_SIZE,
            &ent,
        )?;
    }
    write(
        mem,
        "multiboot strings",
        layout::CMDLINE_START,
        &strings.bytes,
    )?;

    let e820 = e820_table(p.mem_size);
    check_room(
        "multiboot memory map",
        e820.len(),
        MMAP_ENTRY_SIZE,
        layout::MULTIBOOT_MMAP_START,
        layout::MULTIBOOT_MODS_START,
    )?;
    let mut mmap = Vec::new();
    for e in &e820 {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.addr.to_le_bytes());
        mmap.extend_from_slice(&e.size.to_le_bytes());
        mmap.extend_from_slice(&e.kind.to_le_bytes());
    }
    write(
        mem,
        "multiboot memory map",
        layout::MULTIBOOT_MMAP_START,
        &mmap,
    )?;

    let mut mbi = [0u8; MBI_SIZE];
    let mut put = |off: usize, v: u32| mbi[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(
        0,
        MBI_MEMORY | MBI_CMDLINE | MBI_MODS | MBI_MMAP | MBI_LOADER_NAME,
    );
    // mem_lower: KiB of RAM from 0 (to the EBDA, 639); mem_upper: KiB from 1 MiB to the first
    // hole (QEMU gives the same).
    put(4, (layout::EBDA_START / KIB) as u32);
    put(8, ((low_end - layout::HIGH_RAM_START) / KIB) as u32);
    put(16, cmdline);
    put(20, modules.len() as u32);
    put(24, layout::MULTIBOOT_MODS_START as u32);
    put(44, mmap.len() as u32);
    put(48, layout::MULTIBOOT_MMAP_START as u32);
    put(64, loader_name);
    write(
        mem,
        "multiboot information",
        layout::MULTIBOOT_INFO_START,
        &mbi,
    )?;

    crate::setup_mptable(mem, p.cpus)?;
    let sregs = boot_cpu::setup_sregs(mem, CpuMode::Protected32)?;
    let mut regs = boot_cpu::boot_regs(entry, CpuMode::Protected32);
    regs.rax = u64::from(BOOTLOADER_MAGIC);
    regs.rbx = layout::MULTIBOOT_INFO_START;
    Ok(BootSetup {
        entry_kind: EntryKind::Multiboot,
        regs,
        sregs,
        kernel_range: (kernel_start, kernel_end),
        initrd_range: first_module,
    })
}

/// `count` entries of `size` bytes must fit in `[start, end)`.
fn check_room(what: &'static str, count: usize, size: u64, start: u64, end: u64) -> Result<()> {
    if count as u64 * size > end - start {
        return Err(Error::TablesTooLarge {
            what,
            size: count as u64 * size,
            start,
            end,
        });
    }
    Ok(())
}

/// NUL-terminated strings packed into the command-line area.
#[derive(Default)]
struct Strings {
    bytes: Vec<u8>,
}

impl Strings {
    /// Append `s`; returns its guest-physical address.
    fn add(&mut self, s: &str) -> Result<u32> {
        if s.as_bytes().contains(&0) {
            return Err(Error::CmdlineNul);
        }
        let at = layout::CMDLINE_START + self.bytes.len() as u64;
        self.bytes.extend_from_slice(s.as_bytes());
        self.bytes.push(0);
        if self.bytes.len() > layout::CMDLINE_MAX_SIZE {
            return Err(Error::CmdlineTooLong {
                len: self.bytes.len(),
                max: layout::CMDLINE_MAX_SIZE - 1,
            });
        }
        Ok(at as u32)
    }
}

/// Put module `m` at the first page at or after `*next` that is RAM below `low_end` and clear of
/// the boot structures; advance `*next` past it.
fn load_module(
    mem: &GuestMemoryMmap,
    m: &Module,
    next: &mut u64,
    low_end: u64,
) -> Result<(u64, u64)> {
    let merr = |msg: String| Error::Initrd {
        path: m.path.clone(),
        msg,
    };
    let mut file = File::open(&m.path).map_err(|e| merr(io_msg(&e)))?;
    let meta = file.metadata().map_err(|e| merr(io_msg(&e)))?;
    if meta.is_dir() {
        return Err(merr("is a directory".into()));
    }
    let size = meta.len();
    let mut start = *next;
    while let Some((_, e)) = overlaps_reserved(start, start.saturating_add(size.max(1))) {
        start = e;
    }
    let end = start.saturating_add(size);
    if end > low_end {
        return Err(Error::InitrdTooLarge {
            path: m.path.clone(),
            size,
            room: low_end.saturating_sub(start),
            limit: low_end,
        });
    }
    let len = usize::try_from(size).map_err(|_| merr("too large".into()))?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, len)
        .map_err(|e| merr(format!("cannot read it into guest memory: {e}")))?;
    *next = end.next_multiple_of(PAGE);
    Ok((start, end))
}

/// The a.out kludge: the file from `header_addr - (load_addr - offset)` is loaded at
/// `load_addr` up to `load_end_addr` (0: end of file), zeroed to `bss_end_addr` (0: none).
fn aout_pieces(
    hdr: &Header,
    a: [u32; 5],
    file_len: u64,
) -> std::result::Result<(Vec<Piece>, u64), String> {
    let [header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr] = a.map(u64::from);
    if load_addr > header_addr {
        return Err(format!(
            "multiboot a.out kludge: load_addr {load_addr:#x} is above header_addr \
             {header_addr:#x}"
        ));
    }
    let offset = (hdr.offset as u64)
        .checked_sub(header_addr - load_addr)
        .ok_or_else(|| {
            format!(
                "multiboot a.out kludge: header_addr {header_addr:#x} - load_addr {load_addr:#x} \
                 is beyond the header's place in the file ({:#x})",
                hdr.offset
            )
        })?;
    let filesz = if load_end_addr == 0 {
        file_len - offset
    } else if load_end_addr < load_addr {
        return Err(format!(
            "multiboot a.out kludge: load_end_addr {load_end_addr:#x} is below load_addr \
             {load_addr:#x}"
        ));
    } else {
        load_end_addr - load_addr
    };
    if offset + filesz > file_len {
        return Err(format!(
            "multiboot a.out kludge: {filesz:#x} bytes from file offset {offset:#x} run past the \
             end of the file ({file_len:#x} bytes)"
        ));
    }
    let memsz = if bss_end_addr == 0 {
        filesz
    } else if bss_end_addr < load_addr + filesz {
        return Err(format!(
            "multiboot a.out kludge: bss_end_addr {bss_end_addr:#x} is below the loaded end \
             {:#x}",
            load_addr + filesz
        ));
    } else {
        bss_end_addr - load_addr
    };
    Ok((
        vec![Piece {
            paddr: load_addr,
            offset,
            filesz,
            memsz,
        }],
        entry_addr,
    ))
}

const EHDR32_SIZE: usize = 52;
const PHDR32_SIZE: usize = 32;
const EM_386: u16 = 3;
const PT_LOAD: u32 = 1;
/// More program headers than any multiboot kernel has: a bound on what we read.
const MAX_PHDRS: usize = 64;

/// The PT_LOAD segments (by physical address) and entry point of an ELF32 i386 image.
fn elf32_pieces<R: Read + Seek>(
    file: &mut R,
    head: &[u8],
) -> std::result::Result<(Vec<Piece>, u64), String> {
    if !head.starts_with(b"\x7fELF") {
        return Err(
            "multiboot header without the a.out kludge flag, but the image is not ELF".into(),
        );
    }
    if head.len() < EHDR32_SIZE || head[4] != 1 {
        return Err("multiboot ELF image is not ELF32".into());
    }
    if head[5] != 1 {
        return Err("big-endian ELF".into());
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let machine = u16_at(head, 18);
    if machine != EM_386 {
        return Err(format!(
            "multiboot ELF32 for machine {machine}, not i386 ({EM_386})"
        ));
    }
    let entry = u64::from(u32_at(head, 24));
    let phoff = u64::from(u32_at(head, 28));
    let phentsize = usize::from(u16_at(head, 42));
    let phnum = usize::from(u16_at(head, 44));
    if phentsize != PHDR32_SIZE {
        return Err(format!(
            "ELF program header size {phentsize}, expected {PHDR32_SIZE}"
        ));
    }
    if phnum > MAX_PHDRS {
        return Err(format!(
            "ELF has {phnum} program headers (at most {MAX_PHDRS})"
        ));
    }
    let mut phdrs = vec![0u8; phnum * PHDR32_SIZE];
    file.seek(SeekFrom::Start(phoff))
        .and_then(|_| file.read_exact(&mut phdrs))
        .map_err(|e| format!("cannot read ELF program headers: {}", io_msg(&e)))?;
    let mut pieces = Vec::new();
    for ph in phdrs.chunks_exact(PHDR32_SIZE) {
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let (offset, paddr, filesz, memsz) = (
            u64::from(u32_at(ph, 4)),
            u64::from(u32_at(ph, 12)),
            u64::from(u32_at(ph, 16)),
            u64::from(u32_at(ph, 20)),
        );
        if memsz < filesz {
            return Err(format!(
                "ELF segment at {paddr:#x} has p_memsz {memsz:#x} < p_filesz {filesz:#x}"
            ));
        }
        if memsz == 0 {
            continue;
        }
        pieces.push(Piece {
            paddr,
            offset,
            filesz,
            memsz,
        });
    }
    if pieces.is_empty() {
        return Err("ELF has no loadable segment".into());
    }
    Ok((pieces, entry))
}

#[cfg(test)]
mod tests;
