//! Intel MultiProcessor Specification 1.4 tables, for kernels built without ACPI.
//!
//! The floating pointer sits at [`layout::MPTABLE_START`] (the last KiB of base memory, where
//! Linux scans); the configuration table follows it and may run on towards the ACPI area.

use crate::layout;
use crate::memory::write;
use crate::{Error, Result};
use kvmbox_cpu::GuestMemoryMmap;

/// Most vCPUs the boot tables describe: xAPIC IDs are 8 bits, 0xff is broadcast, and the MP
/// table's IOAPIC takes the ID after the last CPU.
pub const MAX_CPUS: u32 = 254;

/// Local APIC version the tables report (integrated APIC).
const APIC_VERSION: u8 = 0x14;
/// IOAPIC version.
const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature: family 6.
const CPU_SIGNATURE: u32 = 0x600;
/// Feature flags: FPU and on-chip APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// ISA interrupts routed through the IOAPIC.
const ISA_IRQS: u8 = 16;

/// Check that `cpus` vCPUs can be described to a guest.
pub(crate) fn check_cpus(cpus: u32) -> Result<()> {
    if cpus == 0 {
        return Err(Error::Cpus {
            cpus,
            msg: "a guest needs at least one vCPU",
        });
    }
    if cpus > MAX_CPUS {
        return Err(Error::Cpus {
            cpus,
            msg: "more than the 254 the xAPIC boot tables can describe",
        });
    }
    Ok(())
}

fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(data.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The MP configuration table (header and entries) for `cpus` vCPUs, with its checksum.
fn config_table(cpus: u32) -> Vec<u8> {
    let ioapic_id = cpus as u8;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        // Processor: type 0.
        let flags = if id == 0 { 0x3 } else { 0x1 }; // enabled, bootstrap
        entries.extend_from_slice(&[0, id as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    // IOAPIC: enabled.
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // I/O interrupts: ISA IRQ n -> IOAPIC pin n, except the timer (IRQ 0 -> pin 2, as the MADT
    // says) and the cascade (IRQ 2, none).
    for irq in 0..ISA_IRQS {
        let pin = match irq {
            0 => 2,
            2 => continue,
            n => n,
        };
        // type 3, INT, flags 0 (conforms to bus), bus 0, bus irq, IOAPIC, pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, pin]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0 of the BSP, NMI on LINT1 of every CPU.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let len = (44 + entries.len()) as u16;
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(b"PCMP");
    t.extend_from_slice(&len.to_le_bytes());
    t.push(4); // spec revision 1.4
    t.push(0); // checksum
    t.extend_from_slice(b"KVMBOX  ");
    t.extend_from_slice(b"KVMBOX-PC   ");
    t.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    t.extend_from_slice(&0u16.to_le_bytes());
    t.extend_from_slice(&count.to_le_bytes());
    t.extend_from_slice(&(layout::APIC_START as u32).to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    t.push(0); // extended table checksum
    t.push(0);
    t.extend_from_slice(&entries);
    t[7] = checksum(&t);
    t
}

/// Write an MP floating pointer at [`layout::MPTABLE_START`] and the configuration table for
/// `cpus` vCPUs after it: one processor entry per vCPU (APIC ID = index, vCPU 0 the bootstrap
/// processor), ISA bus 0, the IOAPIC at [`layout::IOAPIC_START`], ISA IRQs 0-15 on IOAPIC pins
/// (IRQ 0 on pin 2), ExtINT on LINT0 and NMI on LINT1. [`crate::load`] calls this.
pub fn setup_mptable(mem: &GuestMemoryMmap, cpus: u32) -> Result<()> {
    check_cpus(cpus)?;
    let table = config_table(cpus);
    let table_addr = layout::MPTABLE_START + 16;
    let end = table_addr + table.len() as u64;
    if end > layout::RSDP_START {
        return Err(Error::TablesTooLarge {
            what: "MP tables",
            size: end - layout::MPTABLE_START,
            start: layout::MPTABLE_START,
            end: layout::RSDP_START,
        });
    }
    let mut mpf = [0u8; 16];
    mpf[..4].copy_from_slice(b"_MP_");
    mpf[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = 4; // spec revision 1.4
    mpf[10] = checksum(&mpf);
    write(mem, "MP floating pointer", layout::MPTABLE_START, &mpf)?;
    write(mem, "MP configuration table", table_addr, &table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn sum(d: &[u8]) -> u8 {
        d.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn mptable_checksums_and_counts() {
        let mem = crate::guest_memory(64 << 20).unwrap();
        for cpus in [1u32, 4, 254] {
            setup_mptable(&mem, cpus).unwrap();
            let mut mpf = [0u8; 16];
            mem.read_slice(&mut mpf, GuestAddress(layout::MPTABLE_START))
                .unwrap();
            assert_eq!(&mpf[..4], b"_MP_");
            assert_eq!(sum(&mpf), 0);
            let addr = u32::from_le_bytes(mpf[4..8].try_into().unwrap()) as u64;
            let mut hdr = [0u8; 44];
            mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
            assert_eq!(&hdr[..4], b"PCMP");
            let len = u16::from_le_bytes([hdr[4], hdr[5]]) as usize;
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            assert_eq!(sum(&t), 0);
            // Count processor entries by walking the entries.
            let (mut off, mut cpu_entries, mut n) = (44, 0, 0);
            while off < len {
                let step = if t[off] == 0 { 20 } else { 8 };
                if t[off] == 0 {
                    cpu_entries += 1;
                    assert_eq!(
                        t[off + 3] & 2 != 0,
                        t[off + 1] == 0,
                        "only CPU 0 is the BSP"
                    );
                }
                off += step;
                n += 1;
            }
            assert_eq!(off, len);
            assert_eq!(cpu_entries, cpus);
            assert_eq!(n, u16::from_le_bytes([hdr[34], hdr[35]]) as u32);
        }
    }

    #[test]
    fn mptable_rejects_bad_cpu_counts() {
        let mem = crate::guest_memory(64 << 20).unwrap();
        assert!(setup_mptable(&mem, 0)
            .unwrap_err()
            .to_string()
            .contains("at least one"));
        assert!(setup_mptable(&mem, 255)
            .unwrap_err()
            .to_string()
            .starts_with("255 vCPUs"));
    }
}
