//! The fuzz harness: arbitrary bytes become code, page-table entries and descriptor-table
//! entries of a small guest that then runs for a bounded number of instructions. Used by the
//! cargo-fuzz targets in `fuzz/` and by the `fuzz_smoke` test. Whatever the bytes, the engine
//! must return (an exit or an error), never panic or hang.
//!
//! Two input shapes: [`run_bytes`] executes the bytes themselves; [`run_program`] reads initial
//! registers, memory contents and a sequence of instruction records that it encodes into real
//! x86 instructions (prefixes, REX, opcode map, ModRM/SIB, displacement and immediate), so the
//! search spends its time on instruction sequences rather than on single decode errors.

use crate::EmuVm;
use arbitrary::{Result, Unstructured};
use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_cpu::{IoHandler, Regs, Segment, SpecialRegs, Vcpu};
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 4 << 20;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
const GDT: u64 = 0x5000;
const IDT: u64 = 0x6000;
const TSS: u64 = 0x7000;
const CODE: u64 = 0x10000;
/// Instructions each input may run.
pub const STEPS: u64 = 4000;

/// Accepts and drops every access; reads return all ones.
struct NullIo;

impl IoHandler for NullIo {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn pio_write(&self, _port: u16, _data: &[u8]) {}
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
}

fn seg(sel: u16, code: bool, long: bool, dpl: u8) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: sel,
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl,
        db: !long,
        s: true,
        l: long && code,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// Run one input: byte 0 is the CPU mode, the rest is the code; its tail (up to 256 bytes) also
/// becomes page-table and descriptor noise. Returns the number of instructions retired.
pub fn run_bytes(data: &[u8]) -> u64 {
    let Some((&mode, rest)) = data.split_first() else {
        return 0;
    };
    let mut seed = (mode as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let regs = Regs {
        rax: next(),
        rbx: next() & 0x3f_ffff,
        rcx: next() & 0xffff,
        rdx: next(),
        rsi: next() & 0x3f_ffff,
        rdi: next() & 0x3f_ffff,
        rsp: 0x8000,
        rbp: next(),
        r8: next(),
        r9: next(),
        rflags: 2 | (next() & 0xcd5),
        ..Regs::default()
    };
    let noise = &rest[rest.len() - (rest.len() / 2).min(256)..];
    run(mode, rest, noise, regs, &[])
}

/// Longest code a [`run_program`] input encodes.
pub const MAX_PROGRAM: usize = 4096;

/// Encode one instruction record of [`run_program`]: two header bytes choose the prefixes
/// (operand size / REP / REPNE, LOCK, FS/GS, REX with its WRXB bits), the opcode map (one-byte,
/// 0F, 0F38, 0F3A), whether a ModRM byte follows and the immediate size; then the opcode, the
/// ModRM (with the SIB and displacement it calls for) and the immediate.
fn encode_insn(r: &mut Unstructured, code: &mut Vec<u8>) -> Result<()> {
    let (h, h2): (u8, u8) = (r.arbitrary()?, r.arbitrary()?);
    match h2 >> 6 {
        1 => code.push(0x64),
        2 => code.push(0x65),
        _ => {}
    }
    if h2 & 2 != 0 {
        code.push(0xf0);
    }
    match h & 3 {
        1 => code.push(0x66),
        2 => code.push(0xf3),
        3 => code.push(0xf2),
        _ => {}
    }
    if h & 4 != 0 {
        code.push(0x40 | (h2 >> 2 & 0xf));
    }
    match h >> 3 & 3 {
        1 => code.push(0x0f),
        2 => code.extend_from_slice(&[0x0f, 0x38]),
        3 => code.extend_from_slice(&[0x0f, 0x3a]),
        _ => {}
    }
    code.push(r.arbitrary()?);
    if h2 & 1 != 0 {
        let modrm: u8 = r.arbitrary()?;
        code.push(modrm);
        let (md, rm) = (modrm >> 6, modrm & 7);
        let mut disp = match md {
            1 => 1,
            2 => 4,
            0 if rm == 5 => 4,
            _ => 0,
        };
        if md != 3 && rm == 4 {
            let sib: u8 = r.arbitrary()?;
            code.push(sib);
            if md == 0 && sib & 7 == 5 {
                disp = 4;
            }
        }
        code.extend_from_slice(&r.arbitrary::<[u8; 4]>()?[..disp]);
    }
    let imm = [0, 0, 1, 1, 2, 4, 4, 8][usize::from(h >> 5)];
    code.extend_from_slice(&r.arbitrary::<[u8; 8]>()?[..imm]);
    Ok(())
}

/// Run a structured input: the CPU mode, sixteen general registers (a mask byte pair chooses
/// which of them are turned into addresses inside guest memory), RFLAGS, up to 31 64-bit
/// values written into the data area, then instruction records ([`encode_insn`]) up to
/// [`MAX_PROGRAM`] bytes of code. Returns the number of instructions retired.
pub fn run_program(data: &[u8]) -> u64 {
    // Integer draws pad a short input with zeros and never fail.
    let Ok(p) = read_program(&mut Unstructured::new(data)) else {
        return 0;
    };
    run(p.mode, &p.code, &[], p.regs, &p.writes)
}

/// What a [`run_program`] input becomes.
struct Program {
    mode: u8,
    code: Vec<u8>,
    regs: Regs,
    /// (address, value) pairs written into guest memory.
    writes: Vec<(u64, u64)>,
}

fn read_program(r: &mut Unstructured) -> Result<Program> {
    let mode: u8 = r.arbitrary()?;
    let in_mem: u16 = r.arbitrary()?;
    let mut g = [0u64; 16];
    for (i, v) in g.iter_mut().enumerate() {
        *v = r.arbitrary()?;
        if in_mem & (1 << i) != 0 {
            *v &= 0x3f_fff8;
        }
    }
    if in_mem & (1 << 4) == 0 {
        g[4] = 0x8000; // RSP
    }
    let rflags = 2 | (u64::from(r.arbitrary::<u16>()?) & 0xcd5);
    let mut writes = Vec::new();
    for _ in 0..r.arbitrary::<u8>()? % 32 {
        let at = DATA + (u64::from(r.arbitrary::<u16>()?) * 8) % 0x1f_0000;
        writes.push((at, r.arbitrary()?));
    }
    let mut code = Vec::new();
    while !r.is_empty() && code.len() < MAX_PROGRAM {
        encode_insn(r, &mut code)?;
    }
    Ok(Program {
        mode,
        code,
        regs: Regs::from_gprs(g, 0, rflags),
        writes,
    })
}

/// Where [`run_program`]'s memory values go: the second 2 MiB, mapped through the page table.
const DATA: u64 = 0x20_0000;

/// Build the guest for `mode` (real, 32-bit protected, 64-bit kernel or user), put `code` at the
/// entry, `noise` into page-table and descriptor entries and `writes` into memory, and run
/// [`STEPS`] instructions from `regs` (RIP is set here).
fn run(mode: u8, code: &[u8], noise: &[u8], mut regs: Regs, writes: &[(u64, u64)]) -> u64 {
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return 0;
    };
    let w = |a: u64, v: u64| {
        let _ = mem.write_obj(v, GuestAddress(a));
    };
    // Identity map of 4 MiB: the first 2 MiB with a 2 MiB page, the second through a
    // page table whose entries come from the input.
    w(PML4, PDPT | 7);
    w(PDPT, PD | 7);
    w(PD, 0x87);
    w(PD + 8, PT | 7);
    for i in 0..512u64 {
        w(PT + i * 8, (0x20_0000 + (i << 12)) | 7);
    }
    let gdt: [u64; 7] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_9b00_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
        0x0000_8900_0000_0067 | (TSS << 16),
    ];
    for (i, d) in gdt.iter().enumerate() {
        w(GDT + i as u64 * 8, *d);
    }
    w(GDT + 56, 0);
    // Every IDT vector points at a HLT at 0xff000 (64-bit gates; also a valid-looking
    // 8-byte gate array for 32-bit mode in the first half).
    let _ = mem.write_obj(0xf4u8, GuestAddress(0xff000));
    for v in 0..256u64 {
        let h = 0xff000u64;
        let lo = (h & 0xffff) | (0x08 << 16) | (0x8e << 40) | ((h >> 16) & 0xffff) << 48;
        w(IDT + v * 16, lo);
        w(IDT + v * 16 + 8, 0);
    }
    w(TSS + 4, 0x9000);
    w(TSS + 0x24, 0xa000);
    for &(a, v) in writes {
        w(a, v);
    }
    for (i, chunk) in noise.chunks(9).enumerate() {
        if chunk.len() < 9 {
            break;
        }
        let mut b = [0u8; 8];
        b.copy_from_slice(&chunk[1..]);
        let v = u64::from_le_bytes(b);
        // Where the noise goes: a page-table entry, a GDT entry or an IDT entry.
        let a = match chunk[0] % 4 {
            0 => PT + (chunk[0] as u64 % 64) * 8,
            1 => GDT + (chunk[0] as u64 % 8) * 8,
            2 => IDT + (chunk[0] as u64 % 32) * 8,
            _ => 0x20_0000 + i as u64 * 64,
        };
        w(a, v);
    }
    let _ = mem.write_slice(code, GuestAddress(CODE));
    let vm = EmuVm::new(mem.clone());
    let Ok(mut v) = vm.create_emu_vcpu(0) else {
        return 0;
    };
    let long = mode & 3 != 3;
    let user = mode & 3 == 1;
    let pm32 = mode & 3 == 2;
    let mut sregs = SpecialRegs {
        cs: seg(0x08, true, true, 0),
        ds: seg(0x10, false, true, 0),
        es: seg(0x10, false, true, 0),
        fs: seg(0x10, false, true, 0),
        gs: seg(0x10, false, true, 0),
        ss: seg(0x10, false, true, 0),
        tr: Segment {
            base: TSS,
            limit: 0x67,
            selector: 0x30,
            type_: 0xb,
            present: true,
            ..Segment::default()
        },
        ldt: Segment {
            unusable: true,
            ..Segment::default()
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
    };
    if user {
        sregs.cs = seg(0x2b, true, true, 3);
        sregs.ss = seg(0x23, false, true, 3);
        sregs.ds = sregs.ss;
    }
    if pm32 {
        sregs.cs = seg(0x18, true, false, 0);
        sregs.efer = 0x800;
        sregs.cr0 = 0x11;
        sregs.cr4 = 0x200;
    }
    if !long {
        // Real mode.
        sregs.cr0 = 0x10;
        sregs.efer = 0;
        sregs.cr4 = 0;
        sregs.cs = Segment {
            base: CODE,
            limit: 0xffff,
            selector: (CODE >> 4) as u16,
            type_: 0xb,
            present: true,
            s: true,
            ..Segment::default()
        };
        for s in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            *s = Segment {
                limit: 0xffff,
                type_: 3,
                present: true,
                s: true,
                ..Segment::default()
            };
        }
        sregs.idt = kvmbox_cpu::DescriptorTable {
            base: 0,
            limit: 0x3ff,
        };
    }
    let _ = v.set_sregs(&sregs);
    regs.rip = if long { CODE } else { 0 };
    let _ = v.set_regs(&regs);
    let _ = v.run_steps(&NullIo, STEPS);
    v.stats().instructions
}
