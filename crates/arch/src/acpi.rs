//! ACPI tables of a (non-hardware-reduced) PC: RSDP, XSDT, FADT + FACS, DSDT, MADT, optionally
//! MCFG and tables other crates build.
//!
//! All of them live in the BIOS area from [`layout::RSDP_START`] to [`layout::BIOS_END`], which the
//! E820 map reserves. The FADT points the guest at the fixed-hardware ports of [`layout`]:
//! PM1a event block ([`layout::ACPI_PM1A_EVT_PORT`], 4 bytes: status, enable), PM1a control
//! ([`layout::ACPI_PM1A_CNT_PORT`], 2 bytes; Linux powers off by writing
//! `SLP_TYP = ACPI_S5_SLP_TYP` (bits 10-12) together with `SLP_EN` (bit 13)), the PM timer
//! ([`layout::ACPI_PM_TMR_PORT`], 24 valid bits at 3.579545 MHz), SCI on
//! [`layout::ACPI_SCI_IRQ`], and the reset register ([`layout::ACPI_RESET_VALUE`] written to port
//! [`layout::ACPI_RESET_PORT`]). No SMI command port: ACPI mode is always on, so the PM1a
//! control register should read back with SCI_EN (bit 0) set.

use crate::layout;
use crate::memory::write;
use crate::mptable::check_cpus;
use crate::{Error, Result};
use acpi_tables::aml::{
    self, AddressSpace as AmlAddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt,
    Name, Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use kvmbox_cpu::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"KVMBOX";
const OEM_REVISION: u32 = 1;

/// IAPC_BOOT_ARCH: the machine has an 8042 keyboard controller.
const BOOT_ARCH_8042: u16 = 1 << 1;
/// IAPC_BOOT_ARCH: VGA is not present.
const BOOT_ARCH_NO_VGA: u16 = 1 << 2;
/// IAPC_BOOT_ARCH: no CMOS RTC.
const BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;

/// MADT local APIC "enabled" flag.
const MADT_CPU_ENABLED: u32 = 1;
/// MADT flags: PCAT_COMPAT (the machine also has 8259 PICs).
const MADT_PCAT_COMPAT: u32 = 1;
/// MPS INTI flags: active high, level triggered.
const MPS_INTI_ACTIVE_HIGH_LEVEL: u16 = 0b1101;

/// One PCI Express ECAM range for the MCFG table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct McfgEntry {
    /// Guest-physical base of the ECAM window (bus `start_bus` at this address).
    pub base: u64,
    /// PCI segment group.
    pub segment: u16,
    /// First bus decoded.
    pub start_bus: u8,
    /// Last bus decoded.
    pub end_bus: u8,
}

/// A PCI host bridge for the DSDT (`\_SB_.PCI0`, `PNP0A08` compatible with `PNP0A03`) and
/// its MCFG entry. [`PciHostBridge::new`] matches [`layout`]: ECAM at
/// [`layout::PCI_ECAM_START`] for bus 0, BARs in [`layout::PCI_MMIO32_START`]..+
/// [`layout::PCI_MMIO32_SIZE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciHostBridge {
    /// ECAM base (the address of bus 0).
    pub ecam_base: u64,
    /// Last bus number decoded (the first is 0).
    pub last_bus: u8,
    /// Memory window for BARs: start and size (below 4 GiB).
    pub mmio32: (u64, u64),
    /// Legacy INTx wiring, as `_PRT` entries; empty means no `_PRT` (MSI/MSI-X only).
    pub intx: Vec<PciIntx>,
}

/// One `_PRT` entry: INTx pin `pin` (0 = INTA .. 3 = INTD) of device `device` on bus 0 drives
/// global system interrupt `gsi`. Linux treats such a GSI as level-triggered, active low.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIntx {
    /// Device number (0-31).
    pub device: u8,
    /// Pin: 0 = INTA, 1 = INTB, 2 = INTC, 3 = INTD.
    pub pin: u8,
    /// The IOAPIC input it is wired to.
    pub gsi: u32,
}

impl PciHostBridge {
    /// Bus 0 only, ECAM and BAR window from [`layout`], no INTx.
    pub fn new() -> Self {
        PciHostBridge {
            ecam_base: layout::PCI_ECAM_START,
            last_bus: 0,
            mmio32: (layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE),
            intx: Vec::new(),
        }
    }

    /// `Device (PCI0)` with `_HID`, `_CID`, `_SEG`, `_BBN`, `_UID`, `_CRS` (bus numbers, the
    /// 0xCF8 config ports, I/O windows around them, the BAR memory window) and `_PRT` if wired.
    fn aml(&self) -> Vec<u8> {
        let bus = AmlAddressSpace::<u16>::new_bus_number(0, u16::from(self.last_bus));
        let cfg_ports = IO::new(
            layout::PCI_CONFIG_ADDRESS_PORT,
            layout::PCI_CONFIG_ADDRESS_PORT,
            1,
            8,
        );
        let io_low = AmlAddressSpace::<u16>::new_io(0, layout::PCI_CONFIG_ADDRESS_PORT - 1, None);
        let io_high =
            AmlAddressSpace::<u16>::new_io(layout::PCI_CONFIG_ADDRESS_PORT + 8, 0xffff, None);
        let (start, size) = self.mmio32;
        let mem = AmlAddressSpace::<u32>::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            start as u32,
            (start + size - 1) as u32,
            None,
        );
        let crs = ResourceTemplate::new(vec![&bus, &cfg_ports, &io_low, &io_high, &mem]);
        let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A08"));
        let cid = Name::new(Path::new("_CID"), &EISAName::new("PNP0A03"));
        let seg = Name::new(Path::new("_SEG"), &aml::ZERO);
        let bbn = Name::new(Path::new("_BBN"), &aml::ZERO);
        let uid = Name::new(Path::new("_UID"), &aml::ZERO);
        let crs = Name::new(Path::new("_CRS"), &crs);
        let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &seg, &bbn, &uid, &crs];
        let routes: Vec<(u32, u8, u32)> = self
            .intx
            .iter()
            .map(|r| ((u32::from(r.device) << 16) | 0xffff, r.pin, r.gsi))
            .collect();
        let entries: Vec<Package> = routes
            .iter()
            .map(|(adr, pin, gsi)| Package::new(vec![adr, pin, &aml::ZERO, gsi]))
            .collect();
        let prt_pkg = Package::new(entries.iter().map(|e| e as &dyn Aml).collect());
        let prt = Name::new(Path::new("_PRT"), &prt_pkg);
        if !routes.is_empty() {
            children.push(&prt);
        }
        aml_bytes(&Device::new(Path::new("PCI0"), children))
    }
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

/// What [`create_acpi_tables_with`] describes. [`AcpiConfig::new`] gives a PC with COM1, an
/// i8042 and a CMOS RTC, without VGA; other crates add their parts through the public fields.
#[derive(Debug, Clone)]
pub struct AcpiConfig {
    /// vCPUs: one MADT local APIC (ID = index) and one `ACPI0007` processor device each.
    pub cpus: u32,
    /// COM1 (`PNP0501`, port [`layout::COM1_PORT`], IRQ [`layout::COM1_IRQ`]) in the DSDT.
    pub com1: bool,
    /// An i8042 (`PNP0303` keyboard at [`layout::I8042_DATA_PORT`] and
    /// [`layout::I8042_COMMAND_PORT`], IRQ [`layout::I8042_IRQ`]) in the DSDT and IAPC_BOOT_ARCH.
    pub i8042: bool,
    /// A CMOS RTC (`PNP0B00` at [`layout::RTC_PORT`], IRQ [`layout::RTC_IRQ`], century byte at
    /// CMOS index [`layout::RTC_CENTURY_INDEX`]); otherwise the FADT says NO_CMOS_RTC.
    pub rtc: bool,
    /// VGA exists (otherwise the FADT says NO_VGA).
    pub vga: bool,
    /// A PCI host bridge: `\_SB_.PCI0` in the DSDT and its ECAM in the MCFG.
    pub pci: Option<PciHostBridge>,
    /// More PCI Express ECAM ranges for the MCFG (the MCFG exists when this or `pci` says so).
    pub mcfg: Vec<McfgEntry>,
    /// Extra AML placed inside `Scope(\_SB_)` of the DSDT (e.g. a PCI host bridge device),
    /// as `acpi_tables::aml` serializes it.
    pub sb_aml: Vec<u8>,
    /// Complete extra tables (header with checksum included) referenced from the XSDT.
    pub extra_tables: Vec<Vec<u8>>,
}

impl AcpiConfig {
    /// A PC with `cpus` vCPUs, COM1, an i8042 and a CMOS RTC; no VGA, no PCI.
    pub fn new(cpus: u32) -> Self {
        AcpiConfig {
            cpus,
            com1: true,
            i8042: true,
            rtc: true,
            vga: false,
            pci: None,
            mcfg: Vec::new(),
            sb_aml: Vec::new(),
            extra_tables: Vec::new(),
        }
    }
}

/// Write the ACPI tables for a PC with `cpus` vCPUs ([`AcpiConfig::new`]) and return the RSDP's
/// guest-physical address (always [`layout::RSDP_START`]); pass it to [`crate::load`] through
/// [`crate::LoadParams::rsdp`].
///
/// The tables (RSDP rev 2, XSDT, FADT rev 6 + FACS, DSDT, MADT, optional MCFG) fill
/// [`layout::RSDP_START`]..[`layout::BIOS_END`], which the E820 map reserves. What the devices
/// must implement for them to be true:
/// - PM1a event block at [`layout::ACPI_PM1A_EVT_PORT`] (4 bytes: status, enable) and PM1a
///   control at [`layout::ACPI_PM1A_CNT_PORT`] (2 bytes). There is no SMI command port, so ACPI
///   mode is always on: PM1a_CNT should read back with SCI_EN (bit 0) set. Linux powers off by
///   writing `SLP_TYP = ACPI_S5_SLP_TYP` (bits 10-12) with `SLP_EN` (bit 13).
/// - PM timer at [`layout::ACPI_PM_TMR_PORT`]: 24 valid bits counting at 3.579545 MHz.
/// - SCI on [`layout::ACPI_SCI_IRQ`] (level, active high). The MADT routes ISA IRQ 0 (the PIT) to
///   GSI 2 and every other ISA IRQ n to GSI n, as QEMU's PC does: the interrupt controller must
///   deliver the PIT on IOAPIC pin 2.
/// - Reset: [`layout::ACPI_RESET_VALUE`] written to port [`layout::ACPI_RESET_PORT`].
/// - COM1 at [`layout::COM1_PORT`] / IRQ [`layout::COM1_IRQ`], an i8042 at 0x60/0x64 with IRQ
///   [`layout::I8042_IRQ`], a CMOS RTC at [`layout::RTC_PORT`] with IRQ [`layout::RTC_IRQ`] and
///   its century byte at index [`layout::RTC_CENTURY_INDEX`]; no VGA (change [`AcpiConfig`]
///   otherwise).
pub fn create_acpi_tables(mem: &GuestMemoryMmap, cpus: u32) -> Result<u64> {
    create_acpi_tables_with(mem, &AcpiConfig::new(cpus))
}

fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

fn table_id(sig: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"KVMBOX__";
    id[4..].copy_from_slice(sig);
    id
}

/// The DSDT: `\_S3_`, `\_S5_`, processors, COM1, i8042 and `cfg.sb_aml` under `\_SB_`.
fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut body = Vec::new();
    let s5 = layout::ACPI_S5_SLP_TYP;
    let s3 = layout::ACPI_S3_SLP_TYP;
    let zero = 0u8;
    body.extend(aml_bytes(&Name::new(
        Path::new("_S3_"),
        &Package::new(vec![&s3, &s3, &zero, &zero]),
    )));
    body.extend(aml_bytes(&Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&s5, &s5, &zero, &zero]),
    )));

    let mut sb = Vec::new();
    for i in 0..cfg.cpus {
        let name = format!("C{i:03X}");
        sb.extend(aml_bytes(&Device::new(
            Path::new(&name),
            vec![
                &Name::new(Path::new("_HID"), &"ACPI0007"),
                &Name::new(Path::new("_UID"), &i),
            ],
        )));
    }
    if cfg.com1 {
        let ports = IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8);
        let irq = Interrupt::new(true, true, false, false, layout::COM1_IRQ);
        let crs = ResourceTemplate::new(vec![&ports, &irq]);
        sb.extend(aml_bytes(&Device::new(
            Path::new("COM1"),
            vec![
                &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
                &Name::new(Path::new("_UID"), &aml::ONE),
                &Name::new(Path::new("_CRS"), &crs),
            ],
        )));
    }
    if cfg.i8042 {
        let data = layout::I8042_DATA_PORT;
        let cmd = layout::I8042_COMMAND_PORT;
        let data_port = IO::new(data, data, 1, 1);
        let cmd_port = IO::new(cmd, cmd, 1, 1);
        let irq = Interrupt::new(true, true, false, false, layout::I8042_IRQ);
        let crs = ResourceTemplate::new(vec![&data_port, &cmd_port, &irq]);
        sb.extend(aml_bytes(&Device::new(
            Path::new("PS2K"),
            vec![
                &Name::new(Path::new("_HID"), &EISAName::new("PNP0303")),
                &Name::new(Path::new("_CRS"), &crs),
            ],
        )));
    }
    if cfg.rtc {
        let ports = IO::new(layout::RTC_PORT, layout::RTC_PORT, 1, 2);
        let irq = Interrupt::new(true, true, false, false, layout::RTC_IRQ);
        let crs = ResourceTemplate::new(vec![&ports, &irq]);
        sb.extend(aml_bytes(&Device::new(
            Path::new("RTC_"),
            vec![
                &Name::new(Path::new("_HID"), &EISAName::new("PNP0B00")),
                &Name::new(Path::new("_CRS"), &crs),
            ],
        )));
    }
    if let Some(pci) = &cfg.pci {
        sb.extend(pci.aml());
    }
    sb.extend_from_slice(&cfg.sb_aml);
    body.extend(Scope::raw(Path::new("\\_SB_"), sb));

    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, table_id(b"DSDT"), OEM_REVISION);
    t.append_slice(&body);
    t.as_slice().to_vec()
}

fn madt(cpus: u32) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, table_id(b"APIC"), OEM_REVISION);
    t.write_u32(36, layout::APIC_START as u32);
    t.write_u32(40, MADT_PCAT_COMPAT);
    let mut e = Vec::new();
    for id in 0..cpus {
        // Processor local APIC: type 0, length 8, UID, APIC ID, flags.
        e.extend_from_slice(&[0, 8, id as u8, id as u8]);
        e.extend_from_slice(&MADT_CPU_ENABLED.to_le_bytes());
    }
    // IOAPIC: type 1, length 12, ID 0, reserved, address, GSI base 0.
    e.extend_from_slice(&[1, 12, 0, 0]);
    e.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source overrides (type 2, length 10, bus 0 ISA): the PIT's IRQ 0 is GSI 2, and
    // the SCI is level-triggered active-high, as on QEMU's PC.
    for (irq, gsi, flags) in [
        (0u8, 2u32, 0u16),
        (
            layout::ACPI_SCI_IRQ as u8,
            layout::ACPI_SCI_IRQ,
            MPS_INTI_ACTIVE_HIGH_LEVEL,
        ),
    ] {
        e.extend_from_slice(&[2, 10, 0, irq]);
        e.extend_from_slice(&gsi.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
    }
    // Local APIC NMI: type 4, length 6, all processors, flags 0, LINT1.
    e.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.append_slice(&e);
    t.as_slice().to_vec()
}

fn fadt(cfg: &AcpiConfig, dsdt_addr: u64) -> Vec<u8> {
    let io = |bits: u8, port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            bits,
            0,
            AccessSize::Undefined,
            port.into(),
        )
    };
    let mut boot_arch = 0;
    if cfg.i8042 {
        boot_arch |= BOOT_ARCH_8042;
    }
    if !cfg.vga {
        boot_arch |= BOOT_ARCH_NO_VGA;
    }
    if !cfg.rtc {
        boot_arch |= BOOT_ARCH_NO_CMOS_RTC;
    }
    // FIRMWARE_CTRL rather than X_FIRMWARE_CTRL (one of them, ACPI says), as QEMU does: the
    // FACS lies below 1 MiB (`facs_address`), and kvm-unit-tests' s3 reads only this field.
    let mut f = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_32(facs_address() as u32)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // No PWR_BUTTON flag: the power button is the fixed-feature one (PWRBTN_STS/EN in the
        // PM1a event block, signalled by the SCI), which kvmbox's power-button action presses.
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    f.sci_int = (layout::ACPI_SCI_IRQ as u16).into();
    f.pm1a_evt_blk = u32::from(layout::ACPI_PM1A_EVT_PORT).into();
    f.pm1a_cnt_blk = u32::from(layout::ACPI_PM1A_CNT_PORT).into();
    f.pm_tmr_blk = u32::from(layout::ACPI_PM_TMR_PORT).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.pm_tmr_len = 4;
    f.x_pm1a_evt_blk = io(32, layout::ACPI_PM1A_EVT_PORT);
    f.x_pm1a_cnt_blk = io(16, layout::ACPI_PM1A_CNT_PORT);
    f.x_pm_tmr_blk = io(32, layout::ACPI_PM_TMR_PORT);
    // C2/C3 latencies above 100/1000 us mean "not supported".
    f.p_lvl2_lat = 101u16.into();
    f.p_lvl3_lat = 1001u16.into();
    f.iapc_boot_arch = boot_arch.into();
    if cfg.rtc {
        f.century = layout::RTC_CENTURY_INDEX;
    }
    f.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        layout::ACPI_RESET_PORT.into(),
    );
    f.reset_value = layout::ACPI_RESET_VALUE;
    aml_bytes(&f.finalize())
}

/// Where the FACS lies: first after the RSDP, 64-byte aligned, below 1 MiB. The guest writes
/// its waking vector there before it enters S3.
pub fn facs_address() -> u64 {
    align(layout::RSDP_START + Rsdp::len() as u64, 64)
}

/// The 64-byte FACS (no waking vector, no global lock owner).
fn facs() -> Vec<u8> {
    aml_bytes(&acpi_tables::facs::FACS::new())
}

fn mcfg(entries: &[McfgEntry]) -> Vec<u8> {
    let mut t = MCFG::new(OEM_ID, table_id(b"MCFG"), OEM_REVISION);
    for e in entries {
        t.add_ecam(e.base, e.segment, e.start_bus, e.end_bus);
    }
    aml_bytes(&t)
}

fn align(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Write the tables `cfg` describes and return the RSDP's address ([`layout::RSDP_START`]).
pub fn create_acpi_tables_with(mem: &GuestMemoryMmap, cfg: &AcpiConfig) -> Result<u64> {
    check_cpus(cfg.cpus)?;
    if let Some(pci) = &cfg.pci {
        let (start, size) = pci.mmio32;
        if size == 0 || start.checked_add(size).is_none_or(|end| end > 1 << 32) {
            return Err(Error::PciWindow { start, size });
        }
    }
    let fadt_len = acpi_tables::fadt::FADT::len() as u64;

    // Place everything first: sizes do not depend on addresses.
    let rsdp_addr = layout::RSDP_START;
    let mut next = align(rsdp_addr + Rsdp::len() as u64, 64);
    let mut place = |len: u64, a: u64| {
        let at = align(next, a);
        next = at + len;
        at
    };
    let facs = facs();
    let facs_addr = place(facs.len() as u64, 64);
    debug_assert_eq!(facs_addr, facs_address());
    let dsdt = dsdt(cfg);
    let dsdt_addr = place(dsdt.len() as u64, 16);
    let fadt_addr = place(fadt_len, 16);
    let madt = madt(cfg.cpus);
    let madt_addr = place(madt.len() as u64, 16);
    let mut others: Vec<Vec<u8>> = Vec::new();
    let mut ecams = cfg.mcfg.clone();
    if let Some(pci) = &cfg.pci {
        ecams.insert(
            0,
            McfgEntry {
                base: pci.ecam_base,
                segment: 0,
                start_bus: 0,
                end_bus: pci.last_bus,
            },
        );
    }
    if !ecams.is_empty() {
        others.push(mcfg(&ecams));
    }
    others.extend(cfg.extra_tables.iter().cloned());
    let other_addrs: Vec<u64> = others.iter().map(|t| place(t.len() as u64, 16)).collect();
    let xsdt_entries = 2 + others.len() as u64;
    let xsdt_addr = place(36 + 8 * xsdt_entries, 16);
    if next > layout::BIOS_STUBS_START {
        return Err(Error::TablesTooLarge {
            what: "ACPI tables",
            size: next - rsdp_addr,
            start: rsdp_addr,
            end: layout::BIOS_STUBS_START,
        });
    }

    let fadt = fadt(cfg, dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    for &a in &other_addrs {
        xsdt.add_entry(a);
    }
    let xsdt = aml_bytes(&xsdt);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    write(mem, "ACPI FACS", facs_addr, &facs)?;
    write(mem, "ACPI DSDT", dsdt_addr, &dsdt)?;
    write(mem, "ACPI FADT", fadt_addr, &fadt)?;
    write(mem, "ACPI MADT", madt_addr, &madt)?;
    for (t, &a) in others.iter().zip(&other_addrs) {
        write(mem, "ACPI table", a, t)?;
    }
    write(mem, "ACPI XSDT", xsdt_addr, &xsdt)?;
    write(mem, "ACPI RSDP", rsdp_addr, &rsdp)?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests;
