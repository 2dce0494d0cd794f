use super::*;
use std::collections::HashMap;
use vm_memory::{Bytes, GuestAddress};

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn sum(d: &[u8]) -> u8 {
    d.iter().fold(0u8, |a, b| a.wrapping_add(*b))
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

/// A table at `addr`, checked: length from its header, checksum 0.
fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
    let hdr = read(mem, addr, 36);
    let len = u32_at(&hdr, 4) as usize;
    assert!(len >= 36, "table at {addr:#x} too short");
    let t = read(mem, addr, len);
    assert_eq!(
        sum(&t),
        0,
        "checksum of {}",
        String::from_utf8_lossy(&t[..4])
    );
    assert!(addr + len as u64 <= layout::BIOS_STUBS_START);
    t
}

/// Follow RSDP -> XSDT -> tables (and FADT -> DSDT/FACS); return them by signature.
fn tables(mem: &GuestMemoryMmap, rsdp_addr: u64) -> HashMap<String, (u64, Vec<u8>)> {
    let rsdp = read(mem, rsdp_addr, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    assert_eq!(rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(&rsdp, 20), 36);
    let xsdt_addr = u64_at(&rsdp, 24);
    let xsdt = table(mem, xsdt_addr);
    assert_eq!(&xsdt[..4], b"XSDT");
    let mut out = HashMap::new();
    for i in 0..(xsdt.len() - 36) / 8 {
        let a = u64_at(&xsdt, 36 + 8 * i);
        let t = table(mem, a);
        out.insert(String::from_utf8_lossy(&t[..4]).into_owned(), (a, t));
    }
    let fadt = out["FACP"].1.clone();
    let dsdt_addr = u64_at(&fadt, 140);
    out.insert("DSDT".into(), (dsdt_addr, table(mem, dsdt_addr)));
    // FIRMWARE_CTRL (32 bits, as QEMU gives it: kvm-unit-tests reads only this one); then
    // X_FIRMWARE_CTRL must be 0.
    let facs_addr = u64::from(u32_at(&fadt, 36));
    assert_eq!(facs_addr, super::facs_address());
    assert!(facs_addr < 1 << 20, "FACS below 1 MiB: {facs_addr:#x}");
    assert_eq!(
        u64_at(&fadt, 132),
        0,
        "X_FIRMWARE_CTRL beside FIRMWARE_CTRL"
    );
    out.insert("FACS".into(), (facs_addr, read(mem, facs_addr, 64)));
    out
}

#[test]
fn tables_chain_and_checksum() {
    let mem = crate::guest_memory(64 << 20).unwrap();
    let rsdp = create_acpi_tables(&mem, 2).unwrap();
    assert_eq!(rsdp, layout::RSDP_START);
    let t = tables(&mem, rsdp);
    for sig in ["FACP", "APIC", "DSDT", "FACS"] {
        assert!(t.contains_key(sig), "{sig} missing");
    }
    assert!(!t.contains_key("MCFG"));
    let (facs_addr, facs) = &t["FACS"];
    assert_eq!(&facs[..4], b"FACS");
    assert_eq!(u32_at(facs, 4), 64);
    assert_eq!(facs_addr % 64, 0, "FACS is 64-byte aligned");
}

#[test]
fn fadt_fixed_hardware() {
    let mem = crate::guest_memory(64 << 20).unwrap();
    let t = tables(&mem, create_acpi_tables(&mem, 1).unwrap());
    let f = &t["FACP"].1;
    assert_eq!(f.len(), 276, "FADT revision 6 length");
    assert_eq!(f[8], 6, "FADT major revision");
    assert_eq!(u16_at(f, 46), layout::ACPI_SCI_IRQ as u16, "SCI_INT");
    assert_eq!(u32_at(f, 48), 0, "no SMI_CMD: ACPI mode always on");
    assert_eq!(u32_at(f, 56), layout::ACPI_PM1A_EVT_PORT as u32);
    assert_eq!(u32_at(f, 64), layout::ACPI_PM1A_CNT_PORT as u32);
    assert_eq!(u32_at(f, 76), layout::ACPI_PM_TMR_PORT as u32);
    assert_eq!(
        (f[88], f[89], f[91]),
        (4, 2, 4),
        "PM1_EVT_LEN, PM1_CNT_LEN, PM_TMR_LEN"
    );
    let flags = u32_at(f, 112);
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_eq!(flags & (1 << 20), 0, "not HW_REDUCED_ACPI");
    // RESET_REG: system I/O, 8 bits, at the reset port; RESET_VALUE.
    assert_eq!(f[116], 1);
    assert_eq!(f[117], 8);
    assert_eq!(u64_at(f, 120), layout::ACPI_RESET_PORT as u64);
    assert_eq!(f[128], layout::ACPI_RESET_VALUE);
    let boot_arch = u16_at(f, 109);
    assert_ne!(boot_arch & BOOT_ARCH_8042, 0);
    assert_ne!(boot_arch & BOOT_ARCH_NO_VGA, 0);
    assert_eq!(boot_arch & BOOT_ARCH_NO_CMOS_RTC, 0, "the PC has an RTC");
    assert_eq!(f[108], layout::RTC_CENTURY_INDEX, "CENTURY");
    // X_PM1a_EVT_BLK / X_PM1a_CNT_BLK / X_PM_TMR_BLK agree with the 32-bit fields.
    for (off, port, bits) in [
        (148, layout::ACPI_PM1A_EVT_PORT, 32),
        (172, layout::ACPI_PM1A_CNT_PORT, 16),
        (208, layout::ACPI_PM_TMR_PORT, 32),
    ] {
        assert_eq!(f[off], 1, "system I/O");
        assert_eq!(f[off + 1], bits);
        assert_eq!(u64_at(f, off + 4), port as u64);
    }
    // The DSDT address comes through the 64-bit field only, the FACS's through the 32-bit one.
    assert_eq!(u32_at(f, 40), 0);
    assert_eq!(u64_at(f, 132), 0);
}

/// Count MADT entries of `kind`.
fn madt_entries(madt: &[u8], kind: u8) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut off = 44;
    while off < madt.len() {
        let len = madt[off + 1] as usize;
        assert!(len >= 2 && off + len <= madt.len(), "malformed MADT entry");
        if madt[off] == kind {
            out.push(&madt[off..off + len]);
        }
        off += len;
    }
    assert_eq!(off, madt.len());
    out
}

#[test]
fn madt_describes_cpus_ioapic_and_overrides() {
    let mem = crate::guest_memory(64 << 20).unwrap();
    for cpus in [1u32, 3, 64, 254] {
        let t = tables(&mem, create_acpi_tables(&mem, cpus).unwrap());
        let m = &t["APIC"].1;
        assert_eq!(u32_at(m, 36), layout::APIC_START as u32);
        assert_eq!(u32_at(m, 40) & 1, 1, "PCAT_COMPAT");
        let lapics = madt_entries(m, 0);
        assert_eq!(lapics.len(), cpus as usize);
        for (i, e) in lapics.iter().enumerate() {
            assert_eq!((e[2], e[3]), (i as u8, i as u8), "UID and APIC ID");
            assert_eq!(u32_at(e, 4) & 1, 1, "enabled");
        }
        let ioapics = madt_entries(m, 1);
        assert_eq!(ioapics.len(), 1);
        assert_eq!(u32_at(ioapics[0], 4), layout::IOAPIC_START as u32);
        assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");
        let isos = madt_entries(m, 2);
        assert_eq!(isos.len(), 2);
        assert_eq!((isos[0][3], u32_at(isos[0], 4)), (0, 2), "IRQ0 -> GSI2");
        assert_eq!((isos[1][3], u32_at(isos[1], 4)), (9, 9));
        assert_eq!(u16_at(isos[1], 8), 0xd, "SCI level, active high");
        // The DSDT has one processor device per vCPU.
        let dsdt = &t["DSDT"].1;
        let hid = b"ACPI0007\0";
        let n = dsdt.windows(hid.len()).filter(|w| w == hid).count();
        assert_eq!(n, cpus as usize);
    }
}

#[test]
fn dsdt_has_s3_s5_and_com1() {
    let mem = crate::guest_memory(64 << 20).unwrap();
    let t = tables(&mem, create_acpi_tables(&mem, 1).unwrap());
    let d = &t["DSDT"].1;
    // NameOp "_S5_" PackageOp PkgLength(1 byte) NumElements=4 BytePrefix 5 BytePrefix 5 Zero Zero
    let s5 = d.windows(4).position(|w| w == b"_S5_").expect("_S5_");
    assert_eq!(d[s5 - 1], 0x08, "NameOp");
    assert_eq!(d[s5 + 4], 0x12, "PackageOp");
    let typ = layout::ACPI_S5_SLP_TYP;
    assert_eq!(&d[s5 + 6..s5 + 12], &[4, 0x0a, typ, 0x0a, typ, 0][..]);
    // "_S3_": SLP_TYP 1 (QEMU's, and what kvm-unit-tests' s3 writes), as OneOp.
    assert_eq!(layout::ACPI_S3_SLP_TYP, 1);
    let s3 = d.windows(4).position(|w| w == b"_S3_").expect("_S3_");
    assert_eq!(&d[s3 + 4..s3 + 11], &[0x12, 6, 4, 0x01, 0x01, 0, 0][..]);
    assert!(d.windows(4).any(|w| w == b"COM1"));
    // EISAID("PNP0501") as AML DWord (0x0105d041).
    assert!(d.windows(5).any(|w| w == [0x0c, 0x41, 0xd0, 0x05, 0x01]));
    // IO descriptor for 0x3f8, 8 ports.
    assert!(d.windows(8).any(|w| w == [0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]));
    // RTC: PNP0B00 with ports 0x70-0x71; the i8042 keyboard PNP0303.
    assert!(d.windows(5).any(|w| w == [0x0c, 0x41, 0xd0, 0x0b, 0x00]));
    assert!(d.windows(8).any(|w| w == [0x47, 1, 0x70, 0, 0x70, 0, 1, 2]));
    assert!(d.windows(5).any(|w| w == [0x0c, 0x41, 0xd0, 0x03, 0x03]));
}

#[test]
fn devices_can_be_left_out() {
    let mem = crate::guest_memory(64 << 20).unwrap();
    let mut cfg = AcpiConfig::new(1);
    cfg.rtc = false;
    cfg.i8042 = false;
    cfg.com1 = false;
    let t = tables(&mem, create_acpi_tables_with(&mem, &cfg).unwrap());
    let f = &t["FACP"].1;
    let boot_arch = u16_at(f, 109);
    assert_eq!(boot_arch & BOOT_ARCH_8042, 0);
    assert_ne!(boot_arch & BOOT_ARCH_NO_CMOS_RTC, 0);
    assert_eq!(f[108], 0);
    let d = &t["DSDT"].1;
    for name in [b"COM1", b"PS2K", b"RTC_"] {
        assert!(!d.windows(4).any(|w| w == name));
    }
    assert!(d.windows(4).any(|w| w == b"_S5_"));
}

#[test]
fn extras_add_mcfg_aml_and_tables() {
    let mem = crate::guest_memory(64 << 20).unwrap();
    let mut cfg = AcpiConfig::new(2);
    cfg.mcfg.push(McfgEntry {
        base: layout::PCI_ECAM_START,
        segment: 0,
        start_bus: 0,
        end_bus: 0,
    });
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A08"));
    cfg.sb_aml = aml_bytes(&Device::new(Path::new("PCI0"), vec![&hid]));
    let mut extra = Sdt::new(*b"TEST", 40, 1, OEM_ID, table_id(b"TEST"), 1);
    extra.write_u32(36, 0xdead_beef);
    cfg.extra_tables.push(extra.as_slice().to_vec());
    let t = tables(&mem, create_acpi_tables_with(&mem, &cfg).unwrap());
    let m = &t["MCFG"].1;
    assert_eq!(m.len(), 44 + 16);
    assert_eq!(u64_at(m, 44), layout::PCI_ECAM_START);
    assert_eq!(u32_at(&t["TEST"].1, 36), 0xdead_beef);
    assert!(t["DSDT"].1.windows(4).any(|w| w == b"PCI0"));
}

#[test]
fn rejects_bad_cpu_counts_and_oversized_tables() {
    let mem = crate::guest_memory(64 << 20).unwrap();
    assert!(create_acpi_tables(&mem, 0).is_err());
    let e = create_acpi_tables(&mem, 255).unwrap_err().to_string();
    assert!(e.contains("255 vCPUs"), "{e}");
    let mut cfg = AcpiConfig::new(1);
    cfg.sb_aml = vec![0xa3; 200 << 10]; // Noop opcodes, more than the BIOS area holds
    let e = create_acpi_tables_with(&mem, &cfg).unwrap_err().to_string();
    assert!(e.contains("ACPI tables need"), "{e}");
}

#[test]
fn pci_host_bridge_in_dsdt_and_mcfg() {
    let mem = crate::guest_memory(64 << 20).unwrap();
    let mut cfg = AcpiConfig::new(1);
    let mut pci = PciHostBridge::new();
    pci.intx.push(PciIntx {
        device: 3,
        pin: 0,
        gsi: 16,
    });
    cfg.pci = Some(pci);
    let t = tables(&mem, create_acpi_tables_with(&mem, &cfg).unwrap());
    let m = &t["MCFG"].1;
    assert_eq!(m.len(), 44 + 16, "one ECAM entry");
    assert_eq!(u64_at(m, 44), layout::PCI_ECAM_START);
    assert_eq!(
        (u16_at(m, 52), m[54], m[55]),
        (0, 0, 0),
        "segment 0, buses 0-0"
    );
    let d = &t["DSDT"].1;
    assert!(d.windows(4).any(|w| w == b"PCI0"));
    // EISAID PNP0A08 and PNP0A03.
    assert!(d.windows(5).any(|w| w == [0x0c, 0x41, 0xd0, 0x0a, 0x08]));
    assert!(d.windows(5).any(|w| w == [0x0c, 0x41, 0xd0, 0x0a, 0x03]));
    // DWordMemory window: descriptor 0x87, min 0xc0000000, max 0xcfffffff.
    let start = layout::PCI_MMIO32_START as u32;
    let end = (layout::PCI_MMIO32_START + layout::PCI_MMIO32_SIZE - 1) as u32;
    let mut win = start.to_le_bytes().to_vec();
    win.extend_from_slice(&end.to_le_bytes());
    let p = d
        .windows(8)
        .position(|w| w == win.as_slice())
        .expect("memory window");
    assert_eq!(d[p - 10], 0x87, "DWord address space descriptor");
    assert_eq!(d[p - 7], 0, "memory resource type");
    // Config ports 0xcf8-0xcff consumed; WordIO windows around them.
    assert!(d
        .windows(8)
        .any(|w| w == [0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]));
    // _PRT: Package { 0x0003ffff, 0 (INTA), Zero, 16 }.
    let prt = d.windows(4).position(|w| w == b"_PRT").expect("_PRT");
    let entry = [
        0x12, 0x0b, 0x04, 0x0c, 0xff, 0xff, 0x03, 0x00, 0x00, 0x00, 0x0a, 0x10,
    ];
    assert!(d[prt..].windows(entry.len()).any(|w| w == entry));
    // Without INTx there is no _PRT.
    cfg.pci = Some(PciHostBridge::new());
    let t = tables(&mem, create_acpi_tables_with(&mem, &cfg).unwrap());
    assert!(!t["DSDT"].1.windows(4).any(|w| w == b"_PRT"));
}
