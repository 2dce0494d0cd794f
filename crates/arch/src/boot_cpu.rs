//! The boot vCPU's state for each entry protocol, and the GDT, IDT and identity page tables it
//! relies on.

use crate::layout;
use crate::memory::write;
use crate::Result;
use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_cpu::{DescriptorTable, Regs, Segment, SpecialRegs};

/// CR0.PE: protected mode.
pub(crate) const CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub(crate) const CR0_ET: u64 = 1 << 4;
/// CR0.NE: native FPU error reporting.
pub(crate) const CR0_NE: u64 = 1 << 5;
/// CR0.PG: paging.
pub(crate) const CR0_PG: u64 = 1 << 31;
/// CR4.PAE.
pub(crate) const CR4_PAE: u64 = 1 << 5;
/// EFER.LME.
pub(crate) const EFER_LME: u64 = 1 << 8;
/// EFER.LMA.
pub(crate) const EFER_LMA: u64 = 1 << 10;
/// IA32_APIC_BASE for the bootstrap processor: xAPIC enabled at [`layout::APIC_START`].
pub(crate) const APIC_BASE_BSP: u64 = layout::APIC_START | (1 << 11) | (1 << 8);

/// GDT selectors as Linux's boot protocol names them (`__BOOT_CS`, `__BOOT_DS`).
pub(crate) const BOOT_CS: u16 = 0x10;
/// Data segment selector.
pub(crate) const BOOT_DS: u16 = 0x18;
/// TSS selector.
pub(crate) const BOOT_TSS: u16 = 0x20;

/// Build a GDT descriptor from its access/flags word (`flags` holds access byte in bits 0-7,
/// the G/DB/L/AVL nibble in bits 12-15), base and 20-bit limit.
pub(crate) const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The hidden part of a segment register as loading `entry` with selector `selector` sets it.
pub(crate) fn segment_from_gdt(entry: u64, selector: u16) -> Segment {
    let g = (entry >> 55) & 1 == 1;
    let raw_limit = ((entry >> 32) & 0xf_0000) | (entry & 0xffff);
    let limit = if g {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = (entry >> 47) & 1 == 1;
    Segment {
        base: ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: limit as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: (entry >> 54) & 1 == 1,
        s: (entry >> 44) & 1 == 1,
        l: (entry >> 53) & 1 == 1,
        g,
        avl: (entry >> 52) & 1 == 1,
        unusable: !present,
    }
}

/// Which mode the boot vCPU starts in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum CpuMode {
    /// 64-bit long mode with paging (Linux 64-bit boot protocol).
    Long,
    /// 32-bit flat protected mode, paging off (PVH).
    Protected32,
}

/// The boot GDT for `mode`: null, null, code (0x10), data (0x18), 16-byte TSS (0x20).
pub(crate) fn boot_gdt(mode: CpuMode) -> [u64; layout::BOOT_GDT_MAX_ENTRIES] {
    let code = match mode {
        // G=1 L=1 P DPL0 S, execute/read, accessed.
        CpuMode::Long => gdt_entry(0xa09b, 0, 0xfffff),
        // G=1 D=1 P DPL0 S, execute/read, accessed.
        CpuMode::Protected32 => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        0,
        0,
        code,
        // G=1 B=1 P DPL0 S, read/write, accessed.
        gdt_entry(0xc093, 0, 0xfffff),
        // Present, busy 32/64-bit TSS, 104 bytes at 0 (only the hidden part matters).
        gdt_entry(0x008b, 0, 0x67),
        0,
    ]
}

/// Write the GDT and an empty IDT, and return the special registers for `mode` (with CR3
/// pointing at the page tables [`write_page_tables`] builds, in long mode).
pub(crate) fn setup_sregs(mem: &GuestMemoryMmap, mode: CpuMode) -> Result<SpecialRegs> {
    let gdt = boot_gdt(mode);
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    write(mem, "boot GDT", layout::BOOT_GDT_START, &bytes)?;
    write(mem, "boot IDT", layout::BOOT_IDT_START, &0u64.to_le_bytes())?;

    let code = segment_from_gdt(gdt[(BOOT_CS / 8) as usize], BOOT_CS);
    let data = segment_from_gdt(gdt[(BOOT_DS / 8) as usize], BOOT_DS);
    let tss = segment_from_gdt(gdt[(BOOT_TSS / 8) as usize], BOOT_TSS);
    let ldt = Segment {
        type_: 2,
        unusable: true,
        ..Segment::default()
    };
    let mut sregs = SpecialRegs {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: tss,
        ldt,
        gdt: DescriptorTable {
            base: layout::BOOT_GDT_START,
            limit: (bytes.len() - 1) as u16,
        },
        idt: DescriptorTable {
            base: layout::BOOT_IDT_START,
            limit: 7,
        },
        cr0: CR0_PE | CR0_ET | CR0_NE,
        apic_base: APIC_BASE_BSP,
        ..SpecialRegs::default()
    };
    if mode == CpuMode::Long {
        write_page_tables(mem)?;
        sregs.cr0 |= CR0_PG;
        sregs.cr3 = layout::PML4_START;
        sregs.cr4 = CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
    }
    Ok(sregs)
}

/// Identity-map the first 4 GiB with 2 MiB pages: PML4[0] -> PDPT, PDPT[0..4] -> four PDs.
pub(crate) fn write_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    let mut pml4 = [0u8; 4096];
    pml4[..8].copy_from_slice(&(layout::PDPTE_START | PRESENT_RW).to_le_bytes());
    write(mem, "boot PML4", layout::PML4_START, &pml4)?;

    let mut pdpt = [0u8; 4096];
    for i in 0..4u64 {
        let pd = layout::PDE_START + i * 0x1000;
        pdpt[i as usize * 8..][..8].copy_from_slice(&(pd | PRESENT_RW).to_le_bytes());
    }
    write(mem, "boot PDPT", layout::PDPTE_START, &pdpt)?;

    for i in 0..4u64 {
        let mut pd = [0u8; 4096];
        for j in 0..512u64 {
            let addr = ((i * 512 + j) << 21) | PRESENT_RW | PAGE_SIZE_2M;
            pd[j as usize * 8..][..8].copy_from_slice(&addr.to_le_bytes());
        }
        write(
            mem,
            "boot page directory",
            layout::PDE_START + i * 0x1000,
            &pd,
        )?;
    }
    Ok(())
}

/// General registers at entry: RIP, a stack, RFLAGS with only the reserved bit set, and the
/// boot-information pointer (RSI for Linux's zero page, RBX for PVH's start_info).
pub(crate) fn boot_regs(entry: u64, mode: CpuMode) -> Regs {
    let mut regs = Regs {
        rip: entry,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rflags: 0x2,
        ..Regs::default()
    };
    match mode {
        CpuMode::Long => regs.rsi = layout::ZERO_PAGE_START,
        CpuMode::Protected32 => regs.rbx = layout::PVH_INFO_START,
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn gdt_entries_decode_like_the_cpu_does() {
        let gdt = boot_gdt(CpuMode::Long);
        assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(gdt[2], BOOT_CS);
        assert!(cs.l && !cs.db && cs.present && cs.s && cs.g);
        assert_eq!(
            (cs.type_, cs.limit, cs.base, cs.dpl),
            (0xb, 0xffff_ffff, 0, 0)
        );
        let cs32 = segment_from_gdt(boot_gdt(CpuMode::Protected32)[2], BOOT_CS);
        assert_eq!(boot_gdt(CpuMode::Protected32)[2], 0x00cf_9b00_0000_ffff);
        assert!(!cs32.l && cs32.db);
        let tr = segment_from_gdt(gdt[4], BOOT_TSS);
        assert_eq!(
            (tr.type_, tr.limit, tr.s, tr.present),
            (0xb, 0x67, false, true)
        );
        assert_eq!(segment_from_gdt(0x12ab_cdef_3456_789a, 8).base, 0x12ef_3456);
    }

    #[test]
    fn long_mode_state_and_page_tables() {
        let mem = crate::guest_memory(64 << 20).unwrap();
        let s = setup_sregs(&mem, CpuMode::Long).unwrap();
        assert_eq!(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, layout::PML4_START);
        assert_eq!(
            (s.cs.selector, s.ds.selector, s.ss.selector, s.tr.selector),
            (0x10, 0x18, 0x18, 0x20)
        );
        assert_eq!(s.gdt.limit as usize, layout::BOOT_GDT_MAX_ENTRIES * 8 - 1);
        assert!(layout::BOOT_GDT_START + (s.gdt.limit as u64) < layout::BOOT_IDT_START);
        // The GDT in memory is the one the hidden parts came from.
        let e: u64 = mem
            .read_obj(GuestAddress(layout::BOOT_GDT_START + 0x10))
            .unwrap();
        assert_eq!(segment_from_gdt(e, 0x10), s.cs);
        // Walk the page tables for a few addresses.
        for va in [0u64, 0x1234_5678, 0xbfff_ffff, 0xffff_ffff] {
            let pml4e: u64 = mem
                .read_obj(GuestAddress(s.cr3 + ((va >> 39) & 0x1ff) * 8))
                .unwrap();
            assert_eq!(pml4e & 1, 1);
            let pdpte: u64 = mem
                .read_obj(GuestAddress((pml4e & !0xfff) + ((va >> 30) & 0x1ff) * 8))
                .unwrap();
            assert_eq!(pdpte & 1, 1);
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 0x1ff) * 8))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83);
            assert_eq!((pde & !0x1f_ffff & ((1 << 52) - 1)) | (va & 0x1f_ffff), va);
        }
    }

    #[test]
    fn pvh_state_is_flat_32bit_without_paging() {
        let mem = crate::guest_memory(64 << 20).unwrap();
        let s = setup_sregs(&mem, CpuMode::Protected32).unwrap();
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.cr0 & CR0_PE, CR0_PE);
        assert_eq!((s.efer, s.cr4), (0, 0));
        assert!(s.cs.db && !s.cs.l && s.cs.limit == 0xffff_ffff);
        let r = boot_regs(0x10_0000, CpuMode::Protected32);
        assert_eq!(
            (r.rip, r.rbx, r.rflags),
            (0x10_0000, layout::PVH_INFO_START, 2)
        );
    }
}
