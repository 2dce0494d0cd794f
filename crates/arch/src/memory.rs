//! Guest RAM: creating it from [`layout::ram_regions`] and describing it to the guest as a PC's
//! E820 map.

use crate::layout;
use crate::{Error, Result};
use kvmbox_cpu::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One entry of the guest's memory map (E820 for Linux, the PVH memmap for PVH kernels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest-physical byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

const MIB: u64 = 1 << 20;

/// A size in bytes shown in the largest binary unit that divides it exactly ("4 GiB",
/// "1536 MiB", "4095 bytes"), so that a message never rounds a size away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0;
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if n != 0 && n.trailing_zeros() >= shift {
                return write!(f, "{} {unit}", n >> shift);
            }
        }
        write!(f, "{n} bytes")
    }
}

/// Map `mem_size` bytes of guest RAM at the places [`layout::ram_regions`] gives (split around
/// the 32-bit MMIO hole above 3 GiB).
pub fn guest_memory(mem_size: u64) -> Result<GuestMemoryMmap> {
    let err = |msg: String| Error::GuestMemory {
        size: ByteSize(mem_size),
        msg,
    };
    if mem_size < layout::MIN_MEMORY {
        return Err(err(format!(
            "less than the minimum of {} MiB",
            layout::MIN_MEMORY / MIB
        )));
    }
    if !mem_size.is_multiple_of(4096) {
        return Err(err(format!(
            "{mem_size} bytes is not a multiple of the 4 KiB page size"
        )));
    }
    let mut ranges = Vec::new();
    for (start, len) in layout::ram_regions(mem_size) {
        let len = usize::try_from(len).map_err(|_| err("too large for this host".into()))?;
        ranges.push((GuestAddress(start), len));
    }
    let mem =
        GuestMemoryMmap::from_ranges(&ranges).map_err(|e| err(format!("cannot map it: {e}")))?;
    advise_huge_pages(&mem);
    Ok(mem)
}

/// Ask the kernel to back guest RAM with transparent huge pages where it can (QEMU does the
/// same for its RAM): the devices' copies between the page cache and guest memory and the
/// guest's own accesses then take fewer TLB misses (1 MiB `preadv` into huge pages was about
/// 15 % faster here). Only advice: where the kernel has no THP or says no, RAM stays as it is.
fn advise_huge_pages(mem: &GuestMemoryMmap) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for r in mem.iter() {
        let len = r.len() as usize;
        // SAFETY: the range is exactly one region's anonymous mapping, alive while `mem` is;
        // MADV_HUGEPAGE changes how the kernel backs it, never its contents.
        unsafe { libc::madvise(r.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
    }
}

/// The memory map a PC with `mem_size` bytes of RAM reports: RAM below the EBDA, the EBDA and
/// BIOS area reserved, RAM from 1 MiB to the 32-bit hole, the PCI ECAM window and the IOAPIC and
/// local APIC pages reserved, and RAM above 4 GiB. Sorted by address.
pub fn e820_table(mem_size: u64) -> Vec<E820Entry> {
    let low_end = mem_size.min(layout::MEM_32BIT_GAP_START);
    let mut t = vec![
        E820Entry {
            addr: 0,
            size: layout::EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: layout::EBDA_START,
            size: layout::BIOS_END - layout::EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    if low_end > layout::HIGH_RAM_START {
        t.push(E820Entry {
            addr: layout::HIGH_RAM_START,
            size: low_end - layout::HIGH_RAM_START,
            kind: E820_RAM,
        });
    }
    for (addr, size) in [
        (layout::PCI_ECAM_START, layout::PCI_ECAM_SIZE),
        (layout::IOAPIC_START, layout::IOAPIC_SIZE),
        (layout::APIC_START, layout::APIC_SIZE),
    ] {
        t.push(E820Entry {
            addr,
            size,
            kind: E820_RESERVED,
        });
    }
    if mem_size > layout::MEM_32BIT_GAP_START {
        t.push(E820Entry {
            addr: layout::RAM_64BIT_START,
            size: mem_size - layout::MEM_32BIT_GAP_START,
            kind: E820_RAM,
        });
    }
    t
}

/// Check that `mem` backs every RAM region of a `mem_size`-byte guest; returns the end of the
/// RAM below 4 GiB.
pub(crate) fn check_ram(mem: &GuestMemoryMmap, mem_size: u64) -> Result<u64> {
    let err = |msg: String| Error::GuestMemory {
        size: ByteSize(mem_size),
        msg,
    };
    if mem_size < layout::MIN_MEMORY {
        return Err(err(format!(
            "less than the minimum of {} MiB",
            layout::MIN_MEMORY / MIB
        )));
    }
    for (start, len) in layout::ram_regions(mem_size) {
        let last = GuestAddress(start + len - 1);
        let ok = mem
            .find_region(GuestAddress(start))
            .zip(mem.find_region(last))
            .is_some();
        if !ok {
            return Err(err(format!(
                "the guest memory given does not back RAM {start:#x}..{:#x}",
                start + len
            )));
        }
    }
    Ok(mem_size.min(layout::MEM_32BIT_GAP_START))
}

/// Whether `[start, end)` lies inside one RAM region of a `mem_size`-byte guest.
pub(crate) fn in_ram(mem_size: u64, start: u64, end: u64) -> bool {
    start <= end
        && layout::ram_regions(mem_size)
            .iter()
            .any(|&(s, l)| start >= s && end <= s + l)
}

/// Write `data` at `addr`, naming `what` in the error.
pub(crate) fn write(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    data: &[u8],
) -> Result<()> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|_| Error::GuestWrite { what, addr })
}

/// Zero `[addr, addr + len)`.
pub(crate) fn zero(mem: &GuestMemoryMmap, what: &'static str, addr: u64, len: u64) -> Result<()> {
    // A page of zeroes to copy from (a bigger buffer on the stack would stay resident for
    // the life of the process).
    const CHUNK: u64 = 4 << 10;
    static ZEROS: [u8; CHUNK as usize] = [0; CHUNK as usize];
    let zeros = &ZEROS;
    let mut off = 0;
    while off < len {
        let n = (len - off).min(CHUNK);
        write(mem, what, addr + off, &zeros[..n as usize])?;
        off += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_has_pc_holes() {
        let t = e820_table(256 << 20);
        assert_eq!(
            t[0],
            E820Entry {
                addr: 0,
                size: 0x9_fc00,
                kind: E820_RAM
            }
        );
        assert_eq!(t[1].addr, 0x9_fc00);
        assert_eq!(t[1].addr + t[1].size, 0x10_0000);
        assert_eq!(t[1].kind, E820_RESERVED);
        assert_eq!(
            t[2],
            E820Entry {
                addr: 0x10_0000,
                size: (256 << 20) - 0x10_0000,
                kind: E820_RAM
            }
        );
        let ram: u64 = t
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Same total as Firecracker / Cloud Hypervisor / QEMU give a PVH guest.
        assert_eq!(
            e820_table(512 << 20)
                .iter()
                .filter(|e| e.kind == E820_RAM)
                .map(|e| e.size)
                .sum::<u64>(),
            536_476_672
        );
        assert_eq!(ram, (256 << 20) - (0x10_0000 - 0x9_fc00));
        for w in t.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "sorted, no overlap");
        }
    }

    #[test]
    fn e820_splits_around_the_32bit_hole() {
        let t = e820_table(16 << 30);
        let high = t.last().unwrap();
        assert_eq!(high.addr, 1 << 32);
        assert_eq!(high.size, (16 << 30) - 0xc000_0000);
        assert_eq!(high.kind, E820_RAM);
        let low = t[2];
        assert_eq!(low.addr + low.size, 0xc000_0000);
        let ram: u64 = t
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (16 << 30) - 0x6_0400);
    }

    #[test]
    fn byte_sizes_are_exact() {
        assert_eq!(ByteSize(4095).to_string(), "4095 bytes");
        assert_eq!(ByteSize(64 << 10).to_string(), "64 KiB");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536 MiB");
        assert_eq!(ByteSize(16 << 40).to_string(), "16 TiB");
        assert_eq!(ByteSize(0).to_string(), "0 bytes");
        let e = guest_memory(4095).unwrap_err().to_string();
        assert_eq!(
            e,
            "guest memory of 4095 bytes: less than the minimum of 16 MiB"
        );
    }

    #[test]
    fn guest_memory_checks_size() {
        let e = guest_memory(1 << 20).unwrap_err().to_string();
        assert!(e.contains("minimum of 16 MiB"), "{e}");
        let e = guest_memory((64 << 20) + 1).unwrap_err().to_string();
        assert!(e.contains("page size"), "{e}");
        let m = guest_memory(64 << 20).unwrap();
        assert_eq!(check_ram(&m, 64 << 20).unwrap(), 64 << 20);
        let e = check_ram(&m, 128 << 20).unwrap_err().to_string();
        assert!(e.contains("does not back RAM"), "{e}");
    }

    #[test]
    fn sixteen_gib_guest_maps_around_the_hole() {
        // Mapping is lazy: 16 GiB of address space costs nothing until touched.
        let m = guest_memory(16 << 30).unwrap();
        assert_eq!(check_ram(&m, 16 << 30).unwrap(), 0xc000_0000);
        assert!(m.find_region(GuestAddress(0xc000_0000)).is_none());
        assert!(m
            .find_region(GuestAddress((1 << 32) + (13 << 30) - 1))
            .is_some());
        write(&m, "probe", (1 << 32) + 4096, &[1, 2, 3]).unwrap();
        assert!(write(&m, "probe", 0xd000_0000, &[1]).is_err());
    }
}
