//! Conversions between kvmbox's register structs and KVM's.

use crate::{DescriptorTable, Regs, Segment, SpecialRegs};
use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

pub(super) fn regs_to_kvm(r: &Regs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub(super) fn regs_from_kvm(r: &kvm_regs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

fn seg_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn dt_to_kvm(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

fn dt_from_kvm(d: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: d.base,
        limit: d.limit,
    }
}

/// Fill `k` from `s`, keeping the fields kvmbox does not model (the pending-interrupt bitmap).
pub(super) fn sregs_into_kvm(s: &SpecialRegs, k: &mut kvm_sregs) {
    k.cs = seg_to_kvm(&s.cs);
    k.ds = seg_to_kvm(&s.ds);
    k.es = seg_to_kvm(&s.es);
    k.fs = seg_to_kvm(&s.fs);
    k.gs = seg_to_kvm(&s.gs);
    k.ss = seg_to_kvm(&s.ss);
    k.tr = seg_to_kvm(&s.tr);
    k.ldt = seg_to_kvm(&s.ldt);
    k.gdt = dt_to_kvm(&s.gdt);
    k.idt = dt_to_kvm(&s.idt);
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.cr8 = s.cr8;
    k.efer = s.efer;
    k.apic_base = s.apic_base;
}

pub(super) fn sregs_from_kvm(k: &kvm_sregs) -> SpecialRegs {
    SpecialRegs {
        cs: seg_from_kvm(&k.cs),
        ds: seg_from_kvm(&k.ds),
        es: seg_from_kvm(&k.es),
        fs: seg_from_kvm(&k.fs),
        gs: seg_from_kvm(&k.gs),
        ss: seg_from_kvm(&k.ss),
        tr: seg_from_kvm(&k.tr),
        ldt: seg_from_kvm(&k.ldt),
        gdt: dt_from_kvm(&k.gdt),
        idt: dt_from_kvm(&k.idt),
        cr0: k.cr0,
        cr2: k.cr2,
        cr3: k.cr3,
        cr4: k.cr4,
        cr8: k.cr8,
        efer: k.efer,
        apic_base: k.apic_base,
    }
}
