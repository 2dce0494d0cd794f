//! 32-bit protected mode with 2-level paging (4 MiB PSE pages and a 4 KiB page table): a
//! page fault through a 32-bit interrupt gate (error code, CR2, handler maps the page, IRETD
//! retries), then ring 3 through IRETD and INT 0x80 through a DPL-3 gate with the stack
//! switched to SS0:ESP0 of a 32-bit TSS.

mod common;

use common::{asm, guest_mem, seg, w64, Recorder, CODE};
use iced_x86::code_asm::*;
use kvmbox_cpu::{DescriptorTable, Regs, Segment, SpecialRegs, Vcpu, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

const PD: u64 = 0x1000;
const PT: u64 = 0x2000;
const GDT: u64 = 0x800;
const TSS: u64 = 0x6000;
const IDT: u64 = 0x7000;
const ESP0: u64 = 0x70000;
const USTACK: u64 = 0x90000;

fn gate32(vec: u64, handler: u64, dpl: u64) -> (u64, u64) {
    let v = (handler & 0xffff)
        | (0x08 << 16)
        | ((0x8e | (dpl << 5)) << 40)
        | ((handler >> 16) & 0xffff) << 48;
    (IDT + vec * 8, v)
}

#[test]
fn paging32_page_fault_iret_ring3_and_tss_stack_switch() {
    let pf = CODE + 0x1000;
    let user = CODE + 0x2000;
    let int80 = CODE + 0x3000;
    let code = asm(32, CODE, |a| {
        a.mov(eax, 0x100_0123u32)?;
        a.mov(byte_ptr(eax), 0x5a)?;
        a.movzx(eax, byte_ptr(eax))?;
        a.out(0xe9, eax)?;
        for v in [0x23u32, USTACK as u32, 0x2, 0x1b, user as u32] {
            a.push(v)?;
        }
        a.iretd()
    });
    let pfh = asm(32, pf, |a| {
        a.pop(ebx)?; // error code
        a.push(eax)?;
        a.mov(eax, cr2)?;
        a.out(0xe9, eax)?;
        a.mov(eax, ebx)?;
        a.out(0xe9, eax)?;
        a.mov(dword_ptr(PT as u32), 0x180_0007u32)?;
        a.mov(eax, 0x100_0000u32)?;
        a.invlpg(byte_ptr(eax))?;
        a.pop(eax)?;
        a.iretd()
    });
    let u = asm(32, user, |a| {
        a.mov(eax, 0x80u32)?;
        a.int(0x80)?;
        a.hlt() // not reached
    });
    let i80 = asm(32, int80, |a| {
        a.out(0xe9, eax)?;
        a.mov(eax, esp)?;
        a.out(0xe9, eax)?; // ESP0 - 20
        a.mov(eax, dword_ptr(esp + 4))?; // saved CS
        a.out(0xe9, eax)?;
        a.mov(eax, dword_ptr(esp + 16))?; // saved SS
        a.out(0xe9, eax)?;
        a.hlt()
    });
    let mem = guest_mem();
    for (addr, c) in [(CODE, &code), (pf, &pfh), (user, &u), (int80, &i80)] {
        mem.write_slice(c, GuestAddress(addr)).unwrap();
    }
    // Page directory: 4 MiB user pages for 0..16 MiB, a page table for 16..20 MiB.
    for i in 0..4u64 {
        mem.write_obj(((i << 22) | 0x87) as u32, GuestAddress(PD + i * 4))
            .unwrap();
    }
    mem.write_obj((PT | 7) as u32, GuestAddress(PD + 16))
        .unwrap();
    let gdt: [u64; 5] = [
        0,
        0x00cf_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00cf_fa00_0000_ffff,
        0x00cf_f200_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        w64(&mem, GDT + i as u64 * 8, *d);
    }
    w64(&mem, GDT + 0x28, 0x67 | (TSS << 16) | (0x89 << 40));
    mem.write_obj(ESP0 as u32, GuestAddress(TSS + 4)).unwrap();
    mem.write_obj(0x10u32, GuestAddress(TSS + 8)).unwrap();
    for (a, v) in [gate32(14, pf, 0), gate32(0x80, int80, 3)] {
        w64(&mem, a, v);
    }
    let vm = kvmbox_emu::EmuVm::new(mem.clone());
    let mut v = vm.create_emu_vcpu(0).unwrap();
    let code32 = |sel: u16| Segment {
        l: false,
        db: true,
        ..seg(sel, true, 0)
    };
    v.set_sregs(&SpecialRegs {
        cs: code32(0x08),
        ds: seg(0x10, false, 0),
        es: seg(0x10, false, 0),
        fs: seg(0x10, false, 0),
        gs: seg(0x10, false, 0),
        ss: seg(0x10, false, 0),
        tr: Segment {
            base: TSS,
            limit: 0x67,
            selector: 0x28,
            type_: 0xb,
            present: true,
            ..Segment::default()
        },
        ldt: Segment {
            unusable: true,
            ..Segment::default()
        },
        gdt: DescriptorTable {
            base: GDT,
            limit: 0x2f,
        },
        idt: DescriptorTable {
            base: IDT,
            limit: 0x7ff,
        },
        cr0: 0x8001_0011,
        cr3: PD,
        cr4: 0x10,
        ..SpecialRegs::default()
    })
    .unwrap();
    v.set_regs(&Regs {
        rip: CODE,
        rsp: 0x80000,
        rflags: 2,
        ..Regs::default()
    })
    .unwrap();
    let io = Recorder::default();
    assert_eq!(v.run(&io).unwrap(), VcpuExit::Halted);
    assert_eq!(
        io.writes(0xe9),
        vec![0x100_0123, 2, 0x5a, 0x80, ESP0 - 20, 0x1b, 0x23]
    );
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x180_0123)).unwrap(), 0x5a);
    // A and D set in the 4 KiB PTE, A in the PDE.
    assert_eq!(mem.read_obj::<u32>(GuestAddress(PT)).unwrap() & 0x60, 0x60);
    assert_ne!(
        mem.read_obj::<u32>(GuestAddress(PD + 16)).unwrap() & 0x20,
        0
    );
    assert_eq!(v.state().seg[2].selector, 0x10, "SS0 from the TSS");
}
