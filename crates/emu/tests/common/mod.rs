//! Shared helpers for the engine's integration tests: a small long-mode machine (GDT, TSS, IDT,
//! identity page tables) in guest RAM and an IoHandler that records every access.
#![allow(dead_code)]

use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_cpu::{IoHandler, Segment, SpecialRegs, Vcpu};
use kvmbox_emu::{EmuVcpu, EmuVm};
use std::sync::Mutex;
use vm_memory::{Bytes, GuestAddress};

pub const PML4: u64 = 0x1000;
pub const PDPT: u64 = 0x2000;
pub const PD: u64 = 0x3000;
/// A 4 KiB page table for 16 MiB..18 MiB (entries filled by tests).
pub const PT: u64 = 0x4000;
pub const TSS: u64 = 0x6000;
pub const IDT: u64 = 0x7000;
pub const GDT: u64 = 0x800;
pub const CODE: u64 = 0x10000;
pub const DATA: u64 = 0x40000;
pub const KSTACK: u64 = 0x70000;
pub const ISTSTACK: u64 = 0x60000;
pub const USTACK: u64 = 0x90000;
pub const MEM_SIZE: usize = 32 << 20;

pub const KCODE: u16 = 0x08;
pub const KDATA: u16 = 0x10;
pub const CODE32: u16 = 0x18;
pub const UDATA: u16 = 0x23;
pub const UCODE: u16 = 0x2b;
pub const TSS_SEL: u16 = 0x30;

/// Every port and MMIO access, in order.
#[derive(Default)]
pub struct Recorder {
    pub pio: Mutex<Vec<(u16, Vec<u8>)>>,
    pub mmio: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl Recorder {
    /// Values written to `port` as little-endian integers.
    pub fn writes(&self, port: u16) -> Vec<u64> {
        self.pio
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| *p == port)
            .map(|(_, d)| {
                let mut b = [0u8; 8];
                b[..d.len()].copy_from_slice(d);
                u64::from_le_bytes(b)
            })
            .collect()
    }
}

impl IoHandler for Recorder {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (port as u8).wrapping_add(i as u8);
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.lock().unwrap().push((port, data.to_vec()));
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.fill(0xab);
        let _ = addr;
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.lock().unwrap().push((addr, data.to_vec()));
    }
}

pub fn guest_mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

pub fn w64(mem: &GuestMemoryMmap, a: u64, v: u64) {
    mem.write_obj(v, GuestAddress(a)).unwrap();
}

pub fn r64(mem: &GuestMemoryMmap, a: u64) -> u64 {
    mem.read_obj(GuestAddress(a)).unwrap()
}

/// Install an interrupt gate for `vec` at `handler`.
pub fn set_gate(mem: &GuestMemoryMmap, vec: u8, handler: u64, ist: u8, dpl: u8, trap: bool) {
    let ty: u64 = if trap { 0xf } else { 0xe };
    let lo = (handler & 0xffff)
        | ((KCODE as u64) << 16)
        | ((ist as u64 & 7) << 32)
        | (ty << 40)
        | ((dpl as u64) << 45)
        | (1 << 47)
        | ((handler >> 16) & 0xffff) << 48;
    w64(mem, IDT + vec as u64 * 16, lo);
    w64(mem, IDT + vec as u64 * 16 + 8, handler >> 32);
}

/// Identity map of the first GiB with 2 MiB pages (user-accessible), GDT, TSS.
pub fn build_tables(mem: &GuestMemoryMmap) {
    w64(mem, PML4, PDPT | 7);
    w64(mem, PDPT, PD | 7);
    for i in 0..512u64 {
        w64(mem, PD + i * 8, (i << 21) | 0x87);
    }
    let gdt: [u64; 6] = [
        0,
        0x00af_9b00_0000_ffff, // 0x08 kernel code64
        0x00cf_9300_0000_ffff, // 0x10 kernel data
        0x00cf_9b00_0000_ffff, // 0x18 code32
        0x00cf_f300_0000_ffff, // 0x20 user data
        0x00af_fb00_0000_ffff, // 0x28 user code64
    ];
    for (i, d) in gdt.iter().enumerate() {
        w64(mem, GDT + i as u64 * 8, *d);
    }
    // 0x30: 64-bit TSS (available), limit 0x67.
    let tss_lo = 0x67 | ((TSS & 0xff_ffff) << 16) | (0x89u64 << 40) | ((TSS >> 24) & 0xff) << 56;
    w64(mem, GDT + 0x30, tss_lo);
    w64(mem, GDT + 0x38, TSS >> 32);
    w64(mem, TSS + 4, KSTACK);
    w64(mem, TSS + 0x24, ISTSTACK);
}

pub fn seg(sel: u16, code: bool, dpl: u8) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl,
        db: !code,
        s: true,
        l: code,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// 64-bit ring-0 sregs for the tables of [`build_tables`].
pub fn long_sregs() -> SpecialRegs {
    SpecialRegs {
        cs: seg(KCODE, true, 0),
        ds: seg(KDATA, false, 0),
        es: seg(KDATA, false, 0),
        fs: seg(KDATA, false, 0),
        gs: seg(KDATA, false, 0),
        ss: seg(KDATA, false, 0),
        tr: Segment {
            base: TSS,
            limit: 0x67,
            selector: TSS_SEL,
            type_: 0xb,
            present: true,
            ..Default::default()
        },
        ldt: Segment {
            unusable: true,
            ..Default::default()
        },
        gdt: kvmbox_cpu::DescriptorTable {
            base: GDT,
            limit: 0x3f,
        },
        idt: kvmbox_cpu::DescriptorTable {
            base: IDT,
            limit: 0xfff,
        },
        cr0: 0x8005_0033,
        cr2: 0,
        cr3: PML4,
        cr4: 0x6a0,
        cr8: 0,
        efer: 0xd01,
        apic_base: 0xfee0_0900,
    }
}

/// A long-mode machine with `code` at [`CODE`] and RSP at [`KSTACK`].
pub fn long_machine(code: &[u8]) -> (GuestMemoryMmap, EmuVm, EmuVcpu) {
    let mem = guest_mem();
    build_tables(&mem);
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let vm = EmuVm::new(mem.clone());
    let v = long_vcpu(&vm);
    (mem, vm, v)
}

/// vCPU 0 of `vm` (configured as the only one), in long mode at [`CODE`] with RSP at
/// [`KSTACK`]. Attach controllers, handlers and CPUID changes to `vm` before calling.
pub fn long_vcpu(vm: &EmuVm) -> EmuVcpu {
    let mut v = vm.create_emu_vcpu(0).unwrap();
    v.configure(&kvmbox_cpu::VcpuConfig { id: 0, count: 1 })
        .unwrap();
    v.set_sregs(&long_sregs()).unwrap();
    v.set_regs(&kvmbox_cpu::Regs {
        rip: CODE,
        rsp: KSTACK,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
    v
}

/// Assemble 64-bit code at `ip`.
pub fn asm64(
    ip: u64,
    f: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> Vec<u8> {
    asm(64, ip, f)
}

pub fn asm(
    bits: u32,
    ip: u64,
    f: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler) -> Result<(), iced_x86::IcedError>,
) -> Vec<u8> {
    let mut a = iced_x86::code_asm::CodeAssembler::new(bits).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

/// RFLAGS' arithmetic flags.
pub const CF: u64 = 1;
pub const PF: u64 = 4;
pub const AF: u64 = 0x10;
pub const ZF: u64 = 0x40;
pub const SF: u64 = 0x80;
pub const OF: u64 = 0x800;
pub const ALL: u64 = CF | PF | AF | ZF | SF | OF;

/// A xorshift generator for random test inputs.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Random values with a bias towards edge cases.
    pub fn value(&mut self) -> u64 {
        const EDGE: [u64; 10] = [
            0,
            1,
            u64::MAX,
            0x8000_0000_0000_0000,
            0x7fff_ffff_ffff_ffff,
            0x8000_0000,
            0x7fff_ffff,
            0xffff_ffff,
            0x80,
            0x7fff,
        ];
        match self.next() % 8 {
            0 => EDGE[(self.next() % 10) as usize],
            1 => self.next() & 0xff,
            2 => self.next() & 0xffff,
            3 => (self.next() as i8) as i64 as u64,
            _ => self.next(),
        }
    }

    /// A value below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
