//! What a PC BIOS leaves in low memory for the kernel a boot loader starts after it.
//!
//! QEMU runs SeaBIOS before it starts a multiboot `-kernel`, and a multiboot kernel may rely on
//! what SeaBIOS left: kvm-unit-tests' realmode test, for one, switches back to real mode, enables
//! interrupts and halts, and is woken by the BIOS timer tick through the real-mode interrupt
//! vector table. kvmbox runs no BIOS; for multiboot kernels it builds that state instead: this
//! module writes the real-mode interrupt vector table and the handlers it points at (the port
//! side, the PIC's vector bases and masks and the PIT's 18.2 Hz tick, is programmed by the VMM
//! through the port bus, as the BIOS's own `out` instructions would).
//!
//! Every vector points into the BIOS area at [`layout::BIOS_STUBS_START`] (segment 0xf000):
//! the 8 master-PIC IRQ vectors to a handler that acknowledges the master PIC, the 8 slave-PIC
//! vectors to one that acknowledges both, every other vector to a lone `iret`.

use crate::{layout, Error, Result};
use kvmbox_cpu::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

/// Vector of IRQ 0 (master 8259) as a PC BIOS programs it.
pub const BIOS_HWIRQ0_VECTOR: u8 = 0x08;
/// Vector of IRQ 8 (slave 8259) as a PC BIOS programs it.
pub const BIOS_HWIRQ8_VECTOR: u8 = 0x70;

/// Real-mode segment of the handlers.
const STUB_SEGMENT: u16 = 0xf000;
/// `iret`.
const IRET: &[u8] = &[0xcf];
/// `push ax; mov al, 0x20; out 0x20, al; pop ax; iret`: non-specific EOI to the master PIC.
const MASTER_EOI: &[u8] = &[0x50, 0xb0, 0x20, 0xe6, 0x20, 0x58, 0xcf];
/// `push ax; mov al, 0x20; out 0xa0, al; out 0x20, al; pop ax; iret`: EOI to slave and master.
const SLAVE_EOI: &[u8] = &[0x50, 0xb0, 0x20, 0xe6, 0xa0, 0xe6, 0x20, 0x58, 0xcf];

/// Writes the real-mode interrupt vector table (256 `offset:segment` pairs at address 0) and the
/// three handlers it points at.
pub fn write_real_mode_ivt(mem: &GuestMemoryMmap) -> Result<()> {
    let iret = layout::BIOS_STUBS_START;
    let master = iret + IRET.len() as u64;
    let slave = master + MASTER_EOI.len() as u64;
    debug_assert!(slave + (SLAVE_EOI.len() as u64) <= layout::BIOS_STUBS_START + 0x100);
    for (addr, code) in [(iret, IRET), (master, MASTER_EOI), (slave, SLAVE_EOI)] {
        write(mem, "BIOS interrupt handler", addr, code)?;
    }
    let mut ivt = [0u8; 256 * 4];
    for (vector, entry) in ivt.chunks_exact_mut(4).enumerate() {
        let vector = vector as u8;
        let handler = if (BIOS_HWIRQ0_VECTOR..BIOS_HWIRQ0_VECTOR + 8).contains(&vector) {
            master
        } else if (BIOS_HWIRQ8_VECTOR..BIOS_HWIRQ8_VECTOR + 8).contains(&vector) {
            slave
        } else {
            iret
        };
        let offset = (handler - (u64::from(STUB_SEGMENT) << 4)) as u16;
        entry[..2].copy_from_slice(&offset.to_le_bytes());
        entry[2..].copy_from_slice(&STUB_SEGMENT.to_le_bytes());
    }
    write(mem, "real-mode interrupt vector table", 0, &ivt)
}

fn write(mem: &GuestMemoryMmap, what: &'static str, addr: u64, data: &[u8]) -> Result<()> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|_| Error::GuestWrite { what, addr })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real-mode address an IVT entry points at.
    fn target(mem: &GuestMemoryMmap, vector: u64) -> u64 {
        let e: u32 = mem.read_obj(GuestAddress(vector * 4)).unwrap();
        (u64::from(e >> 16) << 4) + u64::from(e & 0xffff)
    }

    fn code(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    #[test]
    fn every_vector_reaches_an_iret_and_irq_vectors_acknowledge_their_pic() {
        let mem = crate::guest_memory(16 << 20).unwrap();
        write_real_mode_ivt(&mem).unwrap();
        for v in 0..256u64 {
            let t = target(&mem, v);
            assert!(
                (layout::BIOS_STUBS_START..layout::BIOS_END).contains(&t),
                "vector {v:#x} -> {t:#x}"
            );
            let c = code(&mem, t, 9);
            let end = c.iter().position(|&b| b == 0xcf).expect("an iret");
            let outs: Vec<u8> = c[..end]
                .windows(2)
                .filter(|w| w[0] == 0xe6)
                .map(|w| w[1])
                .collect();
            let want: &[u8] = match v {
                0x08..=0x0f => &[0x20],
                0x70..=0x77 => &[0xa0, 0x20],
                _ => &[],
            };
            assert_eq!(outs, want, "vector {v:#x}");
        }
    }
}
