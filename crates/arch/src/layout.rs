//! Guest-physical and port address map. The one place that owns these constants.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA           (RAM)
//! 0x0000_0500  boot GDT, 0x530 boot IDT
//! 0x0000_6000  PVH hvm_start_info, 0x6040 module list, 0x6080 memmap
//!              (or, for a multiboot kernel: multiboot info, 0x6080 mmap, 0x6400 modules)
//! 0x0000_7000  Linux boot_params ("zero page")
//! 0x0000_9000  boot page tables (PML4, PDPT, PDs: identity map of the first 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA / MP table               (reserved)
//! 0x000a_0000  VGA hole + BIOS area          (reserved)
//! 0x000e_0000  ACPI RSDP and tables          (reserved, inside the BIOS area)
//! 0x0010_0000  high RAM: kernels load here (or at their preferred address)
//! 0xc000_0000  32-bit MMIO hole: PCI BARs, virtio-mmio, ECAM, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 4 GiB
//! ```

/// Start of the boot GDT (null, null, code 0x10, data 0x18, TSS 0x20 as a 16-byte descriptor).
pub const BOOT_GDT_START: u64 = 0x500;
/// Entries (8 bytes each) the boot GDT may use: it ends before [`BOOT_IDT_START`].
pub const BOOT_GDT_MAX_ENTRIES: usize = 6;
/// Start of the boot IDT (one empty gate).
pub const BOOT_IDT_START: u64 = 0x530;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (`hvm_modlist_entry`, the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (`hvm_memmap_table_entry` array), up to [`ZERO_PAGE_START`].
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Multiboot information structure (for multiboot kernels; PVH's area, unused then).
pub const MULTIBOOT_INFO_START: u64 = 0x6000;
/// Multiboot memory map (24-byte entries), up to [`MULTIBOOT_MODS_START`].
pub const MULTIBOOT_MMAP_START: u64 = 0x6080;
/// Multiboot module list (16-byte entries), up to [`ZERO_PAGE_START`].
pub const MULTIBOOT_MODS_START: u64 = 0x6400;
/// Lowest address a multiboot kernel may load at: below it are the boot GDT/IDT and the
/// multiboot information (kvm-unit-tests' realmode test loads at 0x8000).
pub const MULTIBOOT_LOAD_MIN: u64 = 0x8000;
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for 64-bit and PVH entries (grows down from just below the page tables,
/// above the zero page).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: PML4, then one PDPT, then four page directories of 2 MiB pages.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (0xb000..0xf000).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Most command-line bytes we place (kernels may accept less: boot_params says how much).
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Extended BIOS data area: RAM below it is usable, from it to 1 MiB is reserved.
pub const EBDA_START: u64 = 0x9_fc00;
/// MP table (for kernels without ACPI).
pub const MPTABLE_START: u64 = 0x9_fc00;
/// ACPI RSDP; the other tables follow it. Inside 0xe0000..0x100000 where Linux scans.
pub const RSDP_START: u64 = 0xe_0000;
/// The real-mode interrupt handlers a multiboot kernel finds, as after a BIOS ([`crate::bios`]):
/// the last 256 bytes below 1 MiB (segment 0xf000); the ACPI tables end below them.
pub const BIOS_STUBS_START: u64 = 0xf_ff00;
/// End of the BIOS area.
pub const BIOS_END: u64 = 0x10_0000;
/// Start of RAM above the legacy hole.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Where an ELF/PVH kernel without a preferred address is loaded.
pub const KERNEL_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole: RAM never maps here.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
/// Size of the 32-bit hole.
pub const MEM_32BIT_GAP_SIZE: u64 = 0x4000_0000;
/// First address above 4 GiB.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;

/// The PCI port window: I/O BARs go here (the top quarter of the port space, as on PCs).
pub const PCI_IO_START: u16 = 0xc000;
/// Size of the PCI port window.
pub const PCI_IO_SIZE: u16 = 0x4000;
/// PCI 32-bit BAR window.
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// Size of the PCI 32-bit BAR window.
pub const PCI_MMIO32_SIZE: u64 = 0x1000_0000;
/// virtio-mmio device windows, one [`VIRTIO_MMIO_SIZE`] each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Interrupt lines for virtio-mmio devices, in order: ISA lines no PC device here uses
/// (not 1 i8042, 4 COM1, 8 RTC, 9 SCI, 12 PS/2 aux).
pub const VIRTIO_MMIO_GSIS: [u32; 7] = [5, 6, 7, 10, 11, 14, 15];
/// A page of MMIO space that no device claims: reads return all ones, writes are dropped.
/// The test guest measures MMIO exit round trips here.
pub const MMIO_PROBE_START: u64 = 0xdf00_0000;
/// PCI Express ECAM (MCFG), bus 0 only.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM window (256 buses x 1 MiB).
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Size of the IOAPIC register page.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Local APIC registers.
pub const APIC_START: u64 = 0xfee0_0000;
/// Size of the local APIC register page.
pub const APIC_SIZE: u64 = 0x1000;

/// Port of the first serial port (COM1).
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 status/command port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 keyboard interrupt line.
pub const I8042_IRQ: u32 = 1;
/// CMOS RTC index port; the data port follows it.
pub const RTC_PORT: u16 = 0x70;
/// CMOS RTC interrupt line.
pub const RTC_IRQ: u32 = 8;
/// CMOS index of the RTC's century byte (the FADT's `century` field names it).
pub const RTC_CENTURY_INDEX: u8 = 0x32;
/// isa-debug-exit compatible port: a write of v exits with `(v << 1) | 1`.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// ACPI PM1a event block (status + enable), 4 bytes.
pub const ACPI_PM1A_EVT_PORT: u16 = 0x600;
/// ACPI PM1a control block, 2 bytes: SLP_TYP/SLP_EN.
pub const ACPI_PM1A_CNT_PORT: u16 = 0x604;
/// ACPI PM timer, 4 bytes.
pub const ACPI_PM_TMR_PORT: u16 = 0x608;
/// The FADT reset register (one byte, value [`ACPI_RESET_VALUE`]). Not 0xcf9: that byte
/// belongs to the PCI configuration-address register at 0xcf8.
pub const ACPI_RESET_PORT: u16 = 0x60c;
/// Value written to [`ACPI_RESET_PORT`] to reset.
pub const ACPI_RESET_VALUE: u8 = 0x6;
/// The SLP_TYP value `_S5` advertises (power off).
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// SLP_TYP of S3 (suspend to RAM) in the DSDT's `\_S3_` package, as QEMU gives it.
pub const ACPI_S3_SLP_TYP: u8 = 1;
/// SCI interrupt line.
pub const ACPI_SCI_IRQ: u32 = 9;
/// QEMU fw_cfg selector port (16-bit); the data port follows it.
pub const FW_CFG_PORT: u16 = 0x510;
/// QEMU fw_cfg DMA address register (8 bytes, big-endian: high half at 0x514, low at 0x518).
pub const FW_CFG_DMA_PORT: u16 = 0x514;
/// QEMU pc-testdev (`--testdev`): 32-bit scratch register.
pub const TESTDEV_IOPORT: u16 = 0xe0;
/// pc-testdev: page-flush port (a 32-bit write of a guest-physical address).
pub const TESTDEV_FLUSH_PORT: u16 = 0xe4;
/// pc-testdev: the same scratch register, accessed a byte at a time.
pub const TESTDEV_IOPORT_BYTE: u16 = 0xe8;
/// pc-testdev: one port per interrupt line 0..[`TESTDEV_IRQ_LINES`]; a byte write sets the line's
/// level (non-zero: high).
pub const TESTDEV_IRQ_PORT: u16 = 0x2000;
/// Interrupt lines pc-testdev drives (the IOAPIC's 24 inputs).
pub const TESTDEV_IRQ_LINES: u64 = 24;
/// pc-testdev: 64 KiB of device memory (MMIO that reads back what was written).
pub const TESTDEV_IOMEM_START: u64 = 0xff00_0000;
/// Size of pc-testdev's device memory.
pub const TESTDEV_IOMEM_SIZE: u64 = 0x1_0000;
/// PCI configuration address / data ports.
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;

/// `kvmbox doctor`'s timing probe runs in a throwaway VM of its own (not a kvmbox guest) with
/// this many bytes of RAM at guest-physical 0. Its page tables sit at [`PML4_START`],
/// [`PDPTE_START`] and [`PDE_START`] and identity-map the first 2 MiB with user-accessible pages;
/// it reports completion by writing [`DEBUG_EXIT_PORT`].
pub const PROBE_MEM_SIZE: u64 = 0x1_0000;
/// The probe VM's GDT (null, kernel code/data, user data/code, a 16-byte TSS descriptor).
pub const PROBE_GDT_START: u64 = 0x1000;
/// The probe VM's 64-bit TSS.
pub const PROBE_TSS_START: u64 = 0x2000;
/// The probe VM's timed loop (runs in ring 0 and in ring 3).
pub const PROBE_CODE_START: u64 = 0x3000;
/// The probe VM's initial stack pointer (also TSS.RSP0).
pub const PROBE_STACK_POINTER: u64 = 0x8ff0;

/// Fewest bytes of guest memory kvmbox accepts.
pub const MIN_MEMORY: u64 = 16 << 20;

/// Guest RAM regions for `mem_size` bytes of memory, leaving the 32-bit hole empty.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MEM_32BIT_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MEM_32BIT_GAP_START),
            (RAM_64BIT_START, mem_size - MEM_32BIT_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_32bit_hole() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        let r = ram_regions(8 << 30);
        assert_eq!(r[0], (0, 0xc000_0000));
        assert_eq!(r[1].0, 0x1_0000_0000);
        assert_eq!(r[0].1 + r[1].1, 8 << 30);
    }
}
