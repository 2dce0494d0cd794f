//! Differential tests: each instruction form runs natively on the host CPU (in an executable
//! page, from a given register/flags/memory state) and in the engine from the same state,
//! for many random inputs. Results, memory and every defined flag must agree.
//!
//! The forms and their flag masks are listed in `forms()`; the coverage table in the crate's
//! README is this list.

#![allow(clippy::vec_init_then_push)]

mod common;

use common::*;
use iced_x86::code_asm::*;
use kvmbox_cpu::GuestMemoryMmap;
use kvmbox_cpu::{Regs, Vcpu, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

const CASES: usize = 300;

/// Host-side register file the native stub loads and stores (RAX..R15, RFLAGS, saved RSP).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq)]
struct HostState {
    regs: [u64; 16],
    flags: u64,
    saved_rsp: u64,
    /// XMM0..XMM3 (offset 144).
    xmm: [u128; 4],
}

type Asm = fn(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>;

/// One instruction form.
struct Form {
    name: &'static str,
    asm: Asm,
    /// Defined flags given the input registers.
    flags: fn(&[u64; 16]) -> u64,
    /// Adjust random inputs (avoid #DE, undefined results).
    fix: fn(&mut [u64; 16]),
}

fn all(_: &[u64; 16]) -> u64 {
    ALL
}
fn no_af(_: &[u64; 16]) -> u64 {
    ALL & !AF
}
fn mul_flags(_: &[u64; 16]) -> u64 {
    CF | OF
}
fn none_flags(_: &[u64; 16]) -> u64 {
    0
}
fn bt_flags(_: &[u64; 16]) -> u64 {
    CF | ZF
}
fn zf_only(_: &[u64; 16]) -> u64 {
    ZF
}
/// Shift by CL: OF is defined only for a masked count of 1, AF never.
fn shift_cl(r: &[u64; 16]) -> u64 {
    if r[1] & 31 == 1 {
        ALL & !AF
    } else {
        ALL & !(AF | OF)
    }
}
fn shift_cl64(r: &[u64; 16]) -> u64 {
    if r[1] & 63 == 1 {
        ALL & !AF
    } else {
        ALL & !(AF | OF)
    }
}
fn shift_n(_: &[u64; 16]) -> u64 {
    ALL & !(AF | OF)
}
fn nofix(_: &mut [u64; 16]) {}

/// Keep CL small enough that 16-bit SHLD/SHRD and 8/16-bit RCL/RCR are well defined.
fn cl_le_16(r: &mut [u64; 16]) {
    r[1] = (r[1] & !0xff) | ((r[1] & 0xff) % 17);
}

/// DIV: divisor (RBX family) nonzero and high half below it (no #DE).
fn div_fix(bits: u32, r: &mut [u64; 16]) {
    let m = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    if r[3] & m == 0 {
        r[3] |= 1;
    }
    let d = r[3] & m;
    if bits == 8 {
        let hi8 = ((r[0] >> 8) & 0xff) % d;
        r[0] = (r[0] & !0xff00) | (hi8 << 8);
    } else {
        let hi = (r[2] & m) % d;
        r[2] = (r[2] & !m) | hi;
    }
}
fn div8(r: &mut [u64; 16]) {
    div_fix(8, r)
}
fn div16(r: &mut [u64; 16]) {
    div_fix(16, r)
}
fn div32(r: &mut [u64; 16]) {
    div_fix(32, r)
}
fn div64(r: &mut [u64; 16]) {
    div_fix(64, r)
}
/// IDIV: dividend = sign extension of a value whose quotient fits; divisor != 0, not -1 with MIN.
fn idiv_fix(bits: u32, r: &mut [u64; 16]) {
    let m = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    if r[3] & m == 0 {
        r[3] |= 1;
    }
    let sign = 1u64 << (bits - 1);
    // Dividend low half random, high half its sign: |quotient| <= |low| fits unless low=MIN, d=-1.
    if r[0] & m == sign && r[3] & m == m {
        r[0] ^= 1;
    }
    let neg = r[0] & sign != 0;
    if bits == 8 {
        let hi8: u64 = if neg { 0xff } else { 0 };
        r[0] = (r[0] & !0xff00) | (hi8 << 8);
    } else {
        r[2] = (r[2] & !m) | if neg { m } else { 0 };
    }
}
fn idiv8(r: &mut [u64; 16]) {
    idiv_fix(8, r)
}
fn idiv16(r: &mut [u64; 16]) {
    idiv_fix(16, r)
}
fn idiv32(r: &mut [u64; 16]) {
    idiv_fix(32, r)
}
fn idiv64(r: &mut [u64; 16]) {
    idiv_fix(64, r)
}

macro_rules! f {
    ($v:ident, $name:expr, $flags:expr, $fix:expr, |$a:ident| $body:expr) => {
        $v.push(Form {
            name: $name,
            asm: |$a| $body,
            flags: $flags,
            fix: $fix,
        })
    };
    ($v:ident, $name:expr, $flags:expr, |$a:ident| $body:expr) => {
        f!($v, $name, $flags, nofix, |$a| $body)
    };
}

/// Two-operand ALU op in every operand form.
macro_rules! alu2 {
    ($v:ident, $op:ident, $fl:expr) => {
        f!($v, concat!(stringify!($op), " bl,cl"), $fl, |a| a
            .$op(bl, cl));
        f!($v, concat!(stringify!($op), " ah,dl"), $fl, |a| a
            .$op(ah, dl));
        f!($v, concat!(stringify!($op), " bx,cx"), $fl, |a| a
            .$op(bx, cx));
        f!($v, concat!(stringify!($op), " ebx,ecx"), $fl, |a| a
            .$op(ebx, ecx));
        f!($v, concat!(stringify!($op), " rbx,rcx"), $fl, |a| a
            .$op(rbx, rcx));
        f!($v, concat!(stringify!($op), " bl,imm8"), $fl, |a| a
            .$op(bl, 0x5a));
        f!($v, concat!(stringify!($op), " bx,imm16"), $fl, |a| a
            .$op(bx, 0x1234));
        f!($v, concat!(stringify!($op), " bx,simm8"), $fl, |a| a
            .$op(bx, -3));
        f!($v, concat!(stringify!($op), " ebx,imm32"), $fl, |a| a
            .$op(ebx, 0x7654_3210));
        f!($v, concat!(stringify!($op), " rbx,simm32"), $fl, |a| a
            .$op(rbx, -0x1234_5678));
        f!($v, concat!(stringify!($op), " rbx,simm8"), $fl, |a| a
            .$op(rbx, 0x7f));
        f!($v, concat!(stringify!($op), " byte [r15],cl"), $fl, |a| a
            .$op(byte_ptr(r15 + 3), cl));
        f!($v, concat!(stringify!($op), " dword [r15],ecx"), $fl, |a| a
            .$op(dword_ptr(r15 + 5), ecx));
        f!($v, concat!(stringify!($op), " qword [r15],rcx"), $fl, |a| a
            .$op(qword_ptr(r15 + 8), rcx));
        f!($v, concat!(stringify!($op), " word [r15],imm"), $fl, |a| a
            .$op(word_ptr(r15 + 2), 0x4321));
        f!($v, concat!(stringify!($op), " rcx,[r15]"), $fl, |a| a
            .$op(rcx, qword_ptr(r15 + 16)));
    };
}

macro_rules! unary {
    ($v:ident, $op:ident, $fl:expr) => {
        f!($v, concat!(stringify!($op), " bl"), $fl, |a| a.$op(bl));
        f!($v, concat!(stringify!($op), " bh"), $fl, |a| a.$op(bh));
        f!($v, concat!(stringify!($op), " bx"), $fl, |a| a.$op(bx));
        f!($v, concat!(stringify!($op), " ebx"), $fl, |a| a.$op(ebx));
        f!($v, concat!(stringify!($op), " rbx"), $fl, |a| a.$op(rbx));
        f!($v, concat!(stringify!($op), " dword [r15]"), $fl, |a| a
            .$op(dword_ptr(r15 + 4)));
    };
}

macro_rules! shift {
    ($v:ident, $op:ident, $one:expr, $n:expr, $cl:expr, $cl64:expr, $fix:expr) => {
        f!($v, concat!(stringify!($op), " bl,1"), $one, |a| a
            .$op(bl, 1));
        f!($v, concat!(stringify!($op), " bl,cl"), $cl, $fix, |a| a
            .$op(bl, cl));
        f!($v, concat!(stringify!($op), " bl,3"), $n, |a| a.$op(bl, 3));
        f!($v, concat!(stringify!($op), " bx,1"), $one, |a| a
            .$op(bx, 1));
        f!($v, concat!(stringify!($op), " bx,cl"), $cl, $fix, |a| a
            .$op(bx, cl));
        f!($v, concat!(stringify!($op), " bx,9"), $n, |a| a.$op(bx, 9));
        f!($v, concat!(stringify!($op), " ebx,1"), $one, |a| a
            .$op(ebx, 1));
        f!($v, concat!(stringify!($op), " ebx,cl"), $cl, $fix, |a| a
            .$op(ebx, cl));
        f!($v, concat!(stringify!($op), " ebx,17"), $n, |a| a
            .$op(ebx, 17));
        f!($v, concat!(stringify!($op), " rbx,1"), $one, |a| a
            .$op(rbx, 1));
        f!($v, concat!(stringify!($op), " rbx,cl"), $cl64, $fix, |a| a
            .$op(rbx, cl));
        f!($v, concat!(stringify!($op), " rbx,45"), $n, |a| a
            .$op(rbx, 45));
        f!(
            $v,
            concat!(stringify!($op), " dword [r15],cl"),
            $cl,
            $fix,
            |a| a.$op(dword_ptr(r15), cl)
        );
    };
}

/// Rotates leave SF ZF PF AF alone; OF defined only for count 1.
fn rot_cl(r: &[u64; 16]) -> u64 {
    if r[1] & 31 == 1 {
        ALL
    } else {
        ALL & !OF
    }
}
fn rot_cl64(r: &[u64; 16]) -> u64 {
    if r[1] & 63 == 1 {
        ALL
    } else {
        ALL & !OF
    }
}
fn rot_n(_: &[u64; 16]) -> u64 {
    ALL & !OF
}
fn rot1_all(_: &[u64; 16]) -> u64 {
    ALL
}

fn forms() -> Vec<Form> {
    let mut v = Vec::new();
    alu2!(v, add, all);
    alu2!(v, adc, all);
    alu2!(v, sub, all);
    alu2!(v, sbb, all);
    alu2!(v, cmp, all);
    alu2!(v, and, no_af);
    alu2!(v, or, no_af);
    alu2!(v, xor, no_af);
    f!(v, "test bl,cl", no_af, |a| a.test(bl, cl));
    f!(v, "test bx,cx", no_af, |a| a.test(bx, cx));
    f!(v, "test ebx,ecx", no_af, |a| a.test(ebx, ecx));
    f!(v, "test rbx,rcx", no_af, |a| a.test(rbx, rcx));
    f!(v, "test rbx,simm32", no_af, |a| a.test(rbx, -0x100));
    f!(v, "test ah,imm8", no_af, |a| a.test(ah, 0x42));
    f!(v, "test bh,imm8", no_af, |a| a.test(bh, 0x81));
    f!(v, "test dword [r15],ecx", no_af, |a| a
        .test(dword_ptr(r15 + 1), ecx));
    unary!(v, inc, all);
    unary!(v, dec, all);
    unary!(v, neg, all);
    unary!(v, not, all);
    shift!(v, shl, shift_n_one, shift_n, shift_cl, shift_cl64, nofix);
    shift!(v, shr, shift_n_one, shift_n, shift_cl, shift_cl64, nofix);
    shift!(v, sar, shift_n_one, shift_n, shift_cl, shift_cl64, nofix);
    shift!(v, rol, rot1_all, rot_n, rot_cl, rot_cl64, nofix);
    shift!(v, ror, rot1_all, rot_n, rot_cl, rot_cl64, nofix);
    shift!(v, rcl, rot1_all, rot_n, rot_cl, rot_cl64, cl_le_16);
    shift!(v, rcr, rot1_all, rot_n, rot_cl, rot_cl64, cl_le_16);
    // MUL / IMUL / DIV / IDIV.
    f!(v, "mul bl", mul_flags, |a| a.mul(bl));
    f!(v, "mul bx", mul_flags, |a| a.mul(bx));
    f!(v, "mul ebx", mul_flags, |a| a.mul(ebx));
    f!(v, "mul rbx", mul_flags, |a| a.mul(rbx));
    f!(v, "mul qword [r15]", mul_flags, |a| a
        .mul(qword_ptr(r15 + 8)));
    f!(v, "imul bl", mul_flags, |a| a.imul(bl));
    f!(v, "imul bx", mul_flags, |a| a.imul(bx));
    f!(v, "imul ebx", mul_flags, |a| a.imul(ebx));
    f!(v, "imul rbx", mul_flags, |a| a.imul(rbx));
    f!(v, "imul bx,cx", mul_flags, |a| a.imul_2(bx, cx));
    f!(v, "imul ebx,ecx", mul_flags, |a| a.imul_2(ebx, ecx));
    f!(v, "imul rbx,rcx", mul_flags, |a| a.imul_2(rbx, rcx));
    f!(v, "imul rbx,[r15]", mul_flags, |a| a
        .imul_2(rbx, qword_ptr(r15)));
    f!(v, "imul bx,cx,imm", mul_flags, |a| a.imul_3(bx, cx, 0x1234));
    f!(v, "imul ebx,ecx,simm8", mul_flags, |a| a
        .imul_3(ebx, ecx, -7));
    f!(v, "imul rbx,rcx,imm32", mul_flags, |a| a
        .imul_3(rbx, rcx, 0x12_3456));
    f!(v, "div bl", none_flags, div8, |a| a.div(bl));
    f!(v, "div bx", none_flags, div16, |a| a.div(bx));
    f!(v, "div ebx", none_flags, div32, |a| a.div(ebx));
    f!(v, "div rbx", none_flags, div64, |a| a.div(rbx));
    f!(v, "idiv bl", none_flags, idiv8, |a| a.idiv(bl));
    f!(v, "idiv bx", none_flags, idiv16, |a| a.idiv(bx));
    f!(v, "idiv ebx", none_flags, idiv32, |a| a.idiv(ebx));
    f!(v, "idiv rbx", none_flags, idiv64, |a| a.idiv(rbx));
    // Bit scans and tests.
    f!(v, "bsf bx,cx", zf_only, nonzero_rcx, |a| a.bsf(bx, cx));
    f!(v, "bsf ebx,ecx", zf_only, nonzero_rcx, |a| a.bsf(ebx, ecx));
    f!(v, "bsf rbx,rcx", zf_only, nonzero_rcx, |a| a.bsf(rbx, rcx));
    f!(v, "bsr bx,cx", zf_only, nonzero_rcx, |a| a.bsr(bx, cx));
    f!(v, "bsr ebx,ecx", zf_only, nonzero_rcx, |a| a.bsr(ebx, ecx));
    f!(v, "bsr rbx,rcx", zf_only, nonzero_rcx, |a| a.bsr(rbx, rcx));
    f!(v, "bsf rbx,[r15]", zf_only, |a| a
        .bsf(rbx, qword_ptr(r15 + 24)));
    f!(v, "popcnt ebx,ecx", all, |a| a.popcnt(ebx, ecx));
    f!(v, "popcnt rbx,rcx", all, |a| a.popcnt(rbx, rcx));
    f!(v, "popcnt bx,cx", all, |a| a.popcnt(bx, cx));
    for_bt(&mut v);
    flag_chains(&mut v);
    // SETcc / CMOVcc (no flags change: all compared).
    f!(v, "seto bl", all, |a| a.seto(bl));
    f!(v, "setno bl", all, |a| a.setno(bl));
    f!(v, "setb bl", all, |a| a.setb(bl));
    f!(v, "setae bl", all, |a| a.setae(bl));
    f!(v, "sete bl", all, |a| a.sete(bl));
    f!(v, "setne bl", all, |a| a.setne(bl));
    f!(v, "setbe bl", all, |a| a.setbe(bl));
    f!(v, "seta bl", all, |a| a.seta(bl));
    f!(v, "sets bl", all, |a| a.sets(bl));
    f!(v, "setns bl", all, |a| a.setns(bl));
    f!(v, "setp bl", all, |a| a.setp(bl));
    f!(v, "setnp bl", all, |a| a.setnp(bl));
    f!(v, "setl bl", all, |a| a.setl(bl));
    f!(v, "setge bl", all, |a| a.setge(bl));
    f!(v, "setle bl", all, |a| a.setle(bl));
    f!(v, "setg bl", all, |a| a.setg(bl));
    f!(v, "setg byte [r15]", all, |a| a.setg(byte_ptr(r15 + 7)));
    f!(v, "cmovo ebx,ecx", all, |a| a.cmovo(ebx, ecx));
    f!(v, "cmovno rbx,rcx", all, |a| a.cmovno(rbx, rcx));
    f!(v, "cmovb ebx,ecx", all, |a| a.cmovb(ebx, ecx));
    f!(v, "cmovae rbx,rcx", all, |a| a.cmovae(rbx, rcx));
    f!(v, "cmove ebx,ecx", all, |a| a.cmove(ebx, ecx));
    f!(v, "cmovne rbx,rcx", all, |a| a.cmovne(rbx, rcx));
    f!(v, "cmovbe ebx,ecx", all, |a| a.cmovbe(ebx, ecx));
    f!(v, "cmova rbx,rcx", all, |a| a.cmova(rbx, rcx));
    f!(v, "cmovs ebx,ecx", all, |a| a.cmovs(ebx, ecx));
    f!(v, "cmovns rbx,rcx", all, |a| a.cmovns(rbx, rcx));
    f!(v, "cmovp ebx,ecx", all, |a| a.cmovp(ebx, ecx));
    f!(v, "cmovnp rbx,rcx", all, |a| a.cmovnp(rbx, rcx));
    f!(v, "cmovl ebx,ecx", all, |a| a.cmovl(ebx, ecx));
    f!(v, "cmovge rbx,rcx", all, |a| a.cmovge(rbx, rcx));
    f!(v, "cmovle ebx,ecx", all, |a| a.cmovle(ebx, ecx));
    f!(v, "cmovg rbx,rcx", all, |a| a.cmovg(rbx, rcx));
    f!(v, "cmovg bx,cx", all, |a| a.cmovg(bx, cx));
    f!(v, "cmove rbx,[r15]", all, |a| a.cmove(rbx, qword_ptr(r15)));
    // Moves with extension, LEA, BSWAP.
    f!(v, "movzx bx,cl", all, |a| a.movzx(bx, cl));
    f!(v, "movzx ebx,cl", all, |a| a.movzx(ebx, cl));
    f!(v, "movzx rbx,ch", all, |a| a.movzx(ebx, ch));
    f!(v, "movzx ebx,cx", all, |a| a.movzx(ebx, cx));
    f!(v, "movzx rbx,word [r15]", all, |a| a
        .movzx(rbx, word_ptr(r15 + 3)));
    f!(v, "movsx bx,cl", all, |a| a.movsx(bx, cl));
    f!(v, "movsx ebx,cl", all, |a| a.movsx(ebx, cl));
    f!(v, "movsx rbx,cl", all, |a| a.movsx(rbx, cl));
    f!(v, "movsx ebx,cx", all, |a| a.movsx(ebx, cx));
    f!(v, "movsx rbx,cx", all, |a| a.movsx(rbx, cx));
    f!(v, "movsxd rbx,ecx", all, |a| a.movsxd(rbx, ecx));
    f!(v, "movsxd rbx,dword [r15]", all, |a| a
        .movsxd(rbx, dword_ptr(r15 + 12)));
    f!(v, "lea rbx,[rcx+rdx*4+disp]", all, |a| a
        .lea(rbx, ptr(rcx + rdx * 4 + 0x1234)));
    f!(v, "lea ebx,[rcx+rdx*8-disp]", all, |a| a
        .lea(ebx, ptr(rcx + rdx * 8 - 0x80)));
    f!(v, "lea bx,[rcx+rsi]", all, |a| a.lea(bx, ptr(rcx + rsi)));
    f!(v, "lea rbx,[ecx+edx*2]", all, |a| a
        .lea(rbx, ptr(ecx + edx * 2)));
    f!(v, "bswap ebx", all, |a| a.bswap(ebx));
    f!(v, "bswap rbx", all, |a| a.bswap(rbx));
    // XADD / CMPXCHG (plain and LOCK on memory).
    f!(v, "xadd bl,cl", all, |a| a.xadd(bl, cl));
    f!(v, "xadd bx,cx", all, |a| a.xadd(bx, cx));
    f!(v, "xadd ebx,ecx", all, |a| a.xadd(ebx, ecx));
    f!(v, "xadd rbx,rcx", all, |a| a.xadd(rbx, rcx));
    f!(v, "lock xadd qword [r15],rcx", all, |a| a
        .lock()
        .xadd(qword_ptr(r15 + 8), rcx));
    f!(v, "cmpxchg bl,cl", all, eq_sometimes, |a| a.cmpxchg(bl, cl));
    f!(v, "cmpxchg bx,cx", all, eq_sometimes, |a| a.cmpxchg(bx, cx));
    f!(v, "cmpxchg ebx,ecx", all, eq_sometimes, |a| a
        .cmpxchg(ebx, ecx));
    f!(v, "cmpxchg rbx,rcx", all, eq_sometimes, |a| a
        .cmpxchg(rbx, rcx));
    f!(v, "lock cmpxchg qword [r15],rcx", all, |a| a
        .lock()
        .cmpxchg(qword_ptr(r15), rcx));
    f!(v, "lock cmpxchg8b [r15]", all, |a| a
        .lock()
        .cmpxchg8b(qword_ptr(r15)));
    f!(v, "cmpxchg16b [r15]", zf_only, |a| a
        .cmpxchg16b(xmmword_ptr(r15)));
    f!(v, "lock cmpxchg16b [r15+16]", zf_only, |a| a
        .lock()
        .cmpxchg16b(xmmword_ptr(r15 + 16)));
    f!(v, "xchg rbx,rcx", all, |a| a.xchg(rbx, rcx));
    f!(v, "xchg [r15],ecx", all, |a| a
        .xchg(dword_ptr(r15 + 4), ecx));
    f!(v, "lock or dword [r15],ecx", no_af, |a| a
        .lock()
        .or(dword_ptr(r15 + 4), ecx));
    f!(v, "lock btr qword [r15],rcx", bt_flags, small_rcx, |a| a
        .lock()
        .btr(qword_ptr(r15), rcx));
    // SHLD / SHRD.
    f!(v, "shld bx,cx,5", shift_n, |a| a.shld(bx, cx, 5));
    f!(v, "shld bx,cx,cl", shift_cl, cl_le_16, |a| a
        .shld(bx, cx, cl));
    f!(v, "shld ebx,ecx,1", no_af, |a| a.shld(ebx, ecx, 1));
    f!(v, "shld ebx,ecx,cl", shift_cl, |a| a.shld(ebx, ecx, cl));
    f!(v, "shld rbx,rcx,33", shift_n, |a| a.shld(rbx, rcx, 33));
    f!(v, "shld rbx,rcx,cl", shift_cl64, |a| a.shld(rbx, rcx, cl));
    f!(v, "shrd bx,cx,5", shift_n, |a| a.shrd(bx, cx, 5));
    f!(v, "shrd bx,cx,cl", shift_cl, cl_le_16, |a| a
        .shrd(bx, cx, cl));
    f!(v, "shrd ebx,ecx,1", no_af, |a| a.shrd(ebx, ecx, 1));
    f!(v, "shrd ebx,ecx,cl", shift_cl, |a| a.shrd(ebx, ecx, cl));
    f!(v, "shrd rbx,rcx,33", shift_n, |a| a.shrd(rbx, rcx, 33));
    f!(v, "shrd rbx,rcx,cl", shift_cl64, |a| a.shrd(rbx, rcx, cl));
    f!(v, "shrd dword [r15],ecx,cl", shift_cl, |a| a.shrd(
        dword_ptr(r15),
        ecx,
        cl
    ));
    // Flag instructions and conversions.
    f!(v, "cbw", all, |a| a.cbw());
    f!(v, "cwde", all, |a| a.cwde());
    f!(v, "cdqe", all, |a| a.cdqe());
    f!(v, "cwd", all, |a| a.cwd());
    f!(v, "cdq", all, |a| a.cdq());
    f!(v, "cqo", all, |a| a.cqo());
    f!(v, "lahf", all, |a| a.lahf());
    f!(v, "sahf", all, |a| a.sahf());
    f!(v, "cmc", all, |a| a.cmc());
    fast_forms(&mut v);
    v
}

/// Forms with a decode-time handler (`exec/fast.rs`) that the lists above leave out: MOV in
/// every operand shape and width, ALU ops with memory and immediates at every width, shifts
/// of memory by immediates, PUSH/POP, near CALL/RET/JMP (direct, through a register and
/// through memory), RIP-relative operands, multi-byte NOP. Every form in the crate runs
/// through the run loop, so every form listed in this file exercises the handlers.
fn fast_forms(v: &mut Vec<Form>) {
    f!(v, "mov bl,cl", all, |a| a.mov(bl, cl));
    f!(v, "mov bx,cx", all, |a| a.mov(bx, cx));
    f!(v, "mov ebx,ecx", all, |a| a.mov(ebx, ecx));
    f!(v, "mov rbx,rcx", all, |a| a.mov(rbx, rcx));
    f!(v, "mov r9b,sil", all, |a| a.mov(r9b, sil));
    f!(v, "mov bl,imm8", all, |a| a.mov(bl, 0x9a));
    f!(v, "mov bx,imm16", all, |a| a.mov(bx, 0xfedc));
    f!(v, "mov ebx,imm32", all, |a| a.mov(ebx, 0x8765_4321u32));
    f!(v, "mov rbx,simm32", all, |a| a.mov(rbx, -0x1234_5678i64));
    f!(v, "mov rbx,imm64", all, |a| a
        .mov(rbx, 0x1234_5678_9abc_def0u64));
    f!(v, "mov cl,[r15]", all, |a| a.mov(cl, byte_ptr(r15 + 9)));
    f!(v, "mov cx,[r15]", all, |a| a.mov(cx, word_ptr(r15 + 10)));
    f!(v, "mov ecx,[r15]", all, |a| a.mov(ecx, dword_ptr(r15 + 12)));
    f!(v, "mov rcx,[r15+rdx*8]", all, small_rdx, |a| a
        .mov(rcx, qword_ptr(r15 + rdx * 8 + 8)));
    f!(v, "mov [r15],bl", all, |a| a.mov(byte_ptr(r15 + 1), bl));
    f!(v, "mov [r15],bx", all, |a| a.mov(word_ptr(r15 + 2), bx));
    f!(v, "mov [r15],ebx", all, |a| a.mov(dword_ptr(r15 + 5), ebx));
    f!(v, "mov [r15+rsi*4],rbx", all, small_rsi, |a| a
        .mov(qword_ptr(r15 + rsi * 4 + 4), rbx));
    f!(v, "mov byte [r15],imm8", all, |a| a
        .mov(byte_ptr(r15 + 3), 0x80));
    f!(v, "mov word [r15],imm16", all, |a| a
        .mov(word_ptr(r15 + 6), 0x8001));
    f!(v, "mov dword [r15],imm32", all, |a| a
        .mov(dword_ptr(r15 + 20), 0x7fff_fffe));
    f!(v, "mov qword [r15],simm32", all, |a| a
        .mov(qword_ptr(r15 + 24), -2));
    // ALU ops with memory at the widths alu2! leaves out.
    macro_rules! alu_mem {
        ($op:ident, $fl:expr) => {
            f!(v, concat!(stringify!($op), " byte [r15],imm8"), $fl, |a| a
                .$op(byte_ptr(r15 + 5), 0xa5));
            f!(
                v,
                concat!(stringify!($op), " qword [r15],simm8"),
                $fl,
                |a| a.$op(qword_ptr(r15 + 16), -5)
            );
            f!(
                v,
                concat!(stringify!($op), " dword [r15],imm32"),
                $fl,
                |a| a.$op(dword_ptr(r15 + 36), 0x1234_5678)
            );
            f!(v, concat!(stringify!($op), " word [r15],bx"), $fl, |a| a
                .$op(word_ptr(r15 + 40), bx));
            f!(v, concat!(stringify!($op), " bl,[r15]"), $fl, |a| a
                .$op(bl, byte_ptr(r15 + 44)));
            f!(v, concat!(stringify!($op), " bx,[r15]"), $fl, |a| a
                .$op(bx, word_ptr(r15 + 46)));
            f!(v, concat!(stringify!($op), " ebx,[r15]"), $fl, |a| a
                .$op(ebx, dword_ptr(r15 + 48)));
            f!(v, concat!(stringify!($op), " al,imm8"), $fl, |a| a
                .$op(al, 0x7f));
            f!(v, concat!(stringify!($op), " eax,imm32"), $fl, |a| a
                .$op(eax, 0x8000_0001u32 as i32));
        };
    }
    alu_mem!(add, all);
    alu_mem!(adc, all);
    alu_mem!(sub, all);
    alu_mem!(sbb, all);
    alu_mem!(cmp, all);
    alu_mem!(and, no_af);
    alu_mem!(or, no_af);
    alu_mem!(xor, no_af);
    f!(v, "test byte [r15],imm8", no_af, |a| a
        .test(byte_ptr(r15 + 5), 0x81));
    f!(v, "test qword [r15],simm32", no_af, |a| a
        .test(qword_ptr(r15 + 8), -0x100));
    f!(v, "test al,imm8", no_af, |a| a.test(al, 0x40));
    f!(v, "test word [r15],cx", no_af, |a| a
        .test(word_ptr(r15 + 2), cx));
    f!(v, "inc byte [r15]", all, |a| a.inc(byte_ptr(r15 + 7)));
    f!(v, "dec word [r15]", all, |a| a.dec(word_ptr(r15 + 6)));
    f!(v, "dec qword [r15]", all, |a| a.dec(qword_ptr(r15 + 8)));
    f!(v, "shl qword [r15],5", shift_n, |a| a
        .shl(qword_ptr(r15 + 8), 5));
    f!(v, "shr byte [r15],1", shift_n_one, |a| a
        .shr(byte_ptr(r15 + 1), 1));
    f!(v, "sar word [r15],3", shift_n, |a| a
        .sar(word_ptr(r15 + 2), 3));
    f!(v, "rol dword [r15],7", rot_n, |a| a
        .rol(dword_ptr(r15 + 4), 7));
    f!(v, "ror qword [r15],1", rot1_all, |a| a
        .ror(qword_ptr(r15 + 16), 1));
    f!(v, "imul ecx,[r15],simm8", mul_flags, |a| a.imul_3(
        ecx,
        dword_ptr(r15 + 4),
        -3
    ));
    f!(v, "imul bx,[r15]", mul_flags, |a| a
        .imul_2(bx, word_ptr(r15 + 2)));
    f!(v, "cmovl ecx,[r15]", all, |a| a
        .cmovl(ecx, dword_ptr(r15 + 4)));
    f!(v, "cmovbe bx,[r15]", all, |a| a
        .cmovbe(bx, word_ptr(r15 + 2)));
    f!(v, "sets byte [r15]", all, |a| a.sets(byte_ptr(r15 + 1)));
    f!(v, "setnp r10b", all, |a| a.setnp(r10b));
    f!(v, "movzx ecx,byte [r15]", all, |a| a
        .movzx(ecx, byte_ptr(r15 + 5)));
    f!(v, "movsx cx,byte [r15]", all, |a| a
        .movsx(cx, byte_ptr(r15 + 5)));
    f!(v, "movsx rcx,word [r15]", all, |a| a
        .movsx(rcx, word_ptr(r15 + 6)));
    f!(v, "nop dword [rax+rax]", all, |a| a
        .nop_1(dword_ptr(rax + rax)));
    // Stack: what is pushed comes back (RSP itself is not compared, memory below it isn't
    // either).
    f!(v, "push rbx; pop rcx", all, |a| {
        a.push(rbx)?;
        a.pop(rcx)
    });
    f!(v, "push bx; pop cx", all, |a| {
        a.push(bx)?;
        a.pop(cx)
    });
    f!(v, "push simm8; pop rdx; push imm32; pop rsi", all, |a| {
        a.push(-7)?;
        a.pop(rdx)?;
        a.push(0x1234_5678)?;
        a.pop(rsi)
    });
    f!(v, "push rsp; pop rbx; sub rbx,rsp", all, |a| {
        a.push(rsp)?;
        a.pop(rbx)?;
        a.sub(rbx, rsp)
    });
    // Near branches: the target adds to RBX; return addresses and code addresses are
    // cleared again, as host and engine run the code at different addresses.
    f!(v, "call rel; ret", all, |a| {
        let mut f = a.create_label();
        let mut done = a.create_label();
        a.call(f)?;
        a.jmp(done)?;
        a.set_label(&mut f)?;
        a.add(rbx, 7)?;
        a.ret()?;
        a.set_label(&mut done)?;
        a.nop()
    });
    f!(v, "push; call rel; ret imm16", all, |a| {
        let mut f = a.create_label();
        let mut done = a.create_label();
        a.push(rcx)?;
        a.call(f)?;
        a.jmp(done)?;
        a.set_label(&mut f)?;
        a.xor(rbx, rcx)?;
        a.ret_1(8)?;
        a.set_label(&mut done)?;
        a.nop()
    });
    f!(v, "call rdx; jmp rdx", all, |a| {
        let mut f = a.create_label();
        let mut g = a.create_label();
        let mut done = a.create_label();
        a.lea(rdx, ptr(f))?;
        a.call(rdx)?;
        a.lea(rdx, ptr(g))?;
        a.jmp(rdx)?;
        a.set_label(&mut f)?;
        a.add(ebx, ecx)?;
        a.ret()?;
        a.set_label(&mut g)?;
        a.sub(ebx, 3)?;
        a.jmp(done)?;
        a.set_label(&mut done)?;
        a.xor(edx, edx)
    });
    f!(v, "call [r15]; jmp [r15]", all, |a| {
        let mut f = a.create_label();
        let mut g = a.create_label();
        let mut done = a.create_label();
        a.lea(rdx, ptr(f))?;
        a.mov(qword_ptr(r15 + 8), rdx)?;
        a.call(qword_ptr(r15 + 8))?;
        a.lea(rdx, ptr(g))?;
        a.mov(qword_ptr(r15 + 8), rdx)?;
        a.jmp(qword_ptr(r15 + 8))?;
        a.set_label(&mut f)?;
        a.shl(ebx, 1)?;
        a.ret()?;
        a.set_label(&mut g)?;
        a.mov(qword_ptr(r15 + 8), 0)?;
        a.xor(edx, edx)?;
        a.jmp(done)?;
        a.set_label(&mut done)?;
        a.nop()
    });
    // RIP-relative operands: data inside the code, read and written.
    f!(v, "mov/add/cmp rip-relative", all, |a| {
        let mut d = a.create_label();
        let mut over = a.create_label();
        a.jmp(over)?;
        a.set_label(&mut d)?;
        a.dq(&[0x8000_0000_1234_5678])?;
        a.set_label(&mut over)?;
        a.mov(rcx, qword_ptr(d))?;
        a.add(ebx, dword_ptr(d))?;
        a.cmp(word_ptr(d), bx)
    });
}

fn small_rdx(r: &mut [u64; 16]) {
    r[2] %= 6;
}
fn small_rsi(r: &mut [u64; 16]) {
    r[6] %= 8;
}

fn shift_n_one(_: &[u64; 16]) -> u64 {
    ALL & !AF
}

fn nonzero_rcx(r: &mut [u64; 16]) {
    if r[1] & 0xffff == 0 {
        r[1] |= 0x100;
    }
}
fn small_rcx(r: &mut [u64; 16]) {
    r[1] &= 63;
}
fn eq_sometimes(r: &mut [u64; 16]) {
    if r[0] & 1 == 0 {
        r[3] = r[0];
    }
}
fn bt_mem_off(r: &mut [u64; 16]) {
    // Bit offsets -64..192 relative to [r15+32]: stays inside the 64-byte buffer.
    r[1] = ((r[1] % 256) as i64 - 64) as u64;
}

fn for_bt(v: &mut Vec<Form>) {
    f!(v, "bt bx,cx", bt_flags, |a| a.bt(bx, cx));
    f!(v, "bt ebx,ecx", bt_flags, |a| a.bt(ebx, ecx));
    f!(v, "bt rbx,rcx", bt_flags, |a| a.bt(rbx, rcx));
    f!(v, "bt rbx,imm", bt_flags, |a| a.bt(rbx, 45));
    f!(v, "bts ebx,ecx", bt_flags, |a| a.bts(ebx, ecx));
    f!(v, "bts rbx,imm", bt_flags, |a| a.bts(rbx, 63));
    f!(v, "btr bx,cx", bt_flags, |a| a.btr(bx, cx));
    f!(v, "btr rbx,rcx", bt_flags, |a| a.btr(rbx, rcx));
    f!(v, "btc ebx,imm", bt_flags, |a| a.btc(ebx, 7));
    f!(v, "btc rbx,rcx", bt_flags, |a| a.btc(rbx, rcx));
    f!(v, "bt dword [r15],ecx", bt_flags, bt_mem_off, |a| a
        .bt(dword_ptr(r15 + 32), ecx));
    f!(v, "bts qword [r15],rcx", bt_flags, bt_mem_off, |a| a
        .bts(qword_ptr(r15 + 32), rcx));
    f!(v, "btc word [r15],cx", bt_flags, bt_mem_off_16, |a| a
        .btc(word_ptr(r15 + 32), cx));
    f!(v, "btr dword [r15],imm", bt_flags, |a| a
        .btr(dword_ptr(r15 + 4), 31));
}

/// Every condition code (bit n = condition n in x86 order O NO B AE E NE BE A S NS P NP L GE
/// LE G).
const ALL_CC: u16 = 0xffff;
/// The conditions that do not read OF (after a shift by more than 1, where OF is undefined).
const CC_NO_OF: u16 = 0x0ffc;
/// O NO B AE: the conditions that read only CF and OF (after IMUL).
const CC_CF_OF: u16 = 0x000f;

/// SETcc of each condition in `conds` into byte 32 + n of the buffer R15 points at.
fn set_conds(a: &mut CodeAssembler, conds: u16) -> Result<(), iced_x86::IcedError> {
    for cc in 0..16 {
        if conds & (1 << cc) == 0 {
            continue;
        }
        let m = byte_ptr(r15 + 32 + cc);
        match cc {
            0 => a.seto(m),
            1 => a.setno(m),
            2 => a.setb(m),
            3 => a.setae(m),
            4 => a.sete(m),
            5 => a.setne(m),
            6 => a.setbe(m),
            7 => a.seta(m),
            8 => a.sets(m),
            9 => a.setns(m),
            10 => a.setp(m),
            11 => a.setnp(m),
            12 => a.setl(m),
            13 => a.setge(m),
            14 => a.setle(m),
            _ => a.setg(m),
        }?;
    }
    Ok(())
}

/// A flag producer (or a short chain of them) followed by SETcc of the conditions `$conds`:
/// checks the flags each producer leaves for the instructions that read them, not only as
/// RFLAGS after the last instruction.
macro_rules! chain {
    ($v:ident, $name:expr, $flags:expr, $fix:expr, $conds:expr, |$a:ident| $body:expr) => {
        $v.push(Form {
            name: $name,
            asm: |$a| {
                $body?;
                set_conds($a, $conds)
            },
            flags: $flags,
            fix: $fix,
        })
    };
}

/// RBX equals RCX in the low 8/16/32/64 bits in some cases, so ZF and the signed/unsigned
/// boundaries get exercised.
fn eq_bc(r: &mut [u64; 16]) {
    match r[0] % 4 {
        0 => r[3] = r[1],
        1 => r[3] = (r[3] & !0xff) | (r[1] & 0xff),
        2 => r[3] = (r[3] & !0xffff_ffff) | (r[1] & 0xffff_ffff),
        _ => {}
    }
}
/// CL is 0 or 1: a shift by CL either keeps every flag or defines them all but AF.
fn cl_0_or_1(r: &mut [u64; 16]) {
    r[1] &= !0xff;
    r[1] |= r[0] & 1;
}
/// A flag result defined only for a masked count of 1 after a chain ending in a shift by CL
/// in 0..=1 whose preceding producer defines all flags.
fn chain_shift_cl(r: &[u64; 16]) -> u64 {
    if r[1] & 1 == 1 {
        ALL & !AF
    } else {
        ALL
    }
}

/// Producers followed by flag consumers (SETcc, Jcc, CMOVcc, ADC/SBB, LAHF, PUSHF), in the
/// widths whose sign bit differs. Each consumer must see the flags of the producer before it
/// (or of the one before that, across INC/DEC for CF and across shifts by 0), not only the
/// RFLAGS left at the end: an engine that defers flag computation to the reader (lazy flags)
/// has one path per (producer, consumer) pair, and these pairs are the ones to get right.
fn flag_chains(v: &mut Vec<Form>) {
    chain!(v, "cmp bl,cl; setcc", all, eq_bc, ALL_CC, |a| a.cmp(bl, cl));
    chain!(v, "test ch,imm8; setcc", no_af, nofix, ALL_CC, |a| a
        .test(ch, 0x10));
    chain!(v, "cmp bx,cx; setcc", all, eq_bc, ALL_CC, |a| a.cmp(bx, cx));
    chain!(v, "cmp ebx,ecx; setcc", all, eq_bc, ALL_CC, |a| a
        .cmp(ebx, ecx));
    chain!(v, "cmp rbx,rcx; setcc", all, eq_bc, ALL_CC, |a| a
        .cmp(rbx, rcx));
    chain!(v, "cmp rbx,simm8; setcc", all, nofix, ALL_CC, |a| a
        .cmp(rbx, -1));
    chain!(v, "cmp dword [r15],ecx; setcc", all, nofix, ALL_CC, |a| a
        .cmp(dword_ptr(r15 + 4), ecx));
    chain!(v, "sub bl,cl; setcc", all, eq_bc, ALL_CC, |a| a.sub(bl, cl));
    chain!(v, "sub rbx,rcx; setcc", all, eq_bc, ALL_CC, |a| a
        .sub(rbx, rcx));
    chain!(v, "neg ebx; setcc", all, nofix, ALL_CC, |a| a.neg(ebx));
    chain!(v, "add bl,cl; setcc", all, eq_bc, ALL_CC, |a| a.add(bl, cl));
    chain!(v, "add bx,cx; setcc", all, eq_bc, ALL_CC, |a| a.add(bx, cx));
    chain!(v, "add rbx,rcx; setcc", all, eq_bc, ALL_CC, |a| a
        .add(rbx, rcx));
    chain!(v, "adc ebx,ecx; setcc", all, eq_bc, ALL_CC, |a| a
        .adc(ebx, ecx));
    chain!(v, "sbb bx,cx; setcc", all, eq_bc, ALL_CC, |a| a.sbb(bx, cx));
    chain!(v, "sbb rbx,rcx; setcc", all, eq_bc, ALL_CC, |a| a
        .sbb(rbx, rcx));
    chain!(v, "test bl,cl; setcc", no_af, eq_bc, ALL_CC, |a| a
        .test(bl, cl));
    chain!(v, "test rbx,rcx; setcc", no_af, eq_bc, ALL_CC, |a| a
        .test(rbx, rcx));
    chain!(v, "and bx,cx; setcc", no_af, eq_bc, ALL_CC, |a| a
        .and(bx, cx));
    chain!(v, "xor ebx,ecx; setcc", no_af, eq_bc, ALL_CC, |a| a
        .xor(ebx, ecx));
    chain!(v, "or rbx,rcx; setcc", no_af, eq_bc, ALL_CC, |a| a
        .or(rbx, rcx));
    chain!(v, "inc bl; setcc", all, nofix, ALL_CC, |a| a.inc(bl));
    chain!(v, "dec rbx; setcc", all, nofix, ALL_CC, |a| a.dec(rbx));
    // INC/DEC keep the CF of the producer before them.
    chain!(v, "cmp rbx,rcx; inc edx; setcc", all, eq_bc, ALL_CC, |a| {
        a.cmp(rbx, rcx)?;
        a.inc(edx)
    });
    chain!(v, "add bl,cl; dec dx; setcc", all, eq_bc, ALL_CC, |a| {
        a.add(bl, cl)?;
        a.dec(dx)
    });
    chain!(v, "shl rbx,1; inc ecx; setcc", all, nofix, ALL_CC, |a| {
        a.shl(rbx, 1)?;
        a.inc(ecx)
    });
    chain!(v, "shl bl,1; setcc", no_af, nofix, ALL_CC, |a| a.shl(bl, 1));
    chain!(v, "shr ebx,1; setcc", no_af, nofix, ALL_CC, |a| a
        .shr(ebx, 1));
    chain!(v, "sar bx,1; setcc", no_af, nofix, ALL_CC, |a| a.sar(bx, 1));
    chain!(v, "shl rbx,13; setcc", shift_n, nofix, CC_NO_OF, |a| a
        .shl(rbx, 13));
    chain!(v, "shr rbx,7; setcc", shift_n, nofix, CC_NO_OF, |a| a
        .shr(rbx, 7));
    chain!(v, "sar ebx,31; setcc", shift_n, nofix, CC_NO_OF, |a| a
        .sar(ebx, 31));
    chain!(
        v,
        "shl dword [r15],3; setcc",
        shift_n,
        nofix,
        CC_NO_OF,
        |a| a.shl(dword_ptr(r15 + 8), 3)
    );
    // A shift by a count of 0 keeps every flag of the producer before it.
    chain!(
        v,
        "cmp rdx,rsi; shl rbx,cl(0/1); setcc",
        chain_shift_cl,
        cl_0_or_1,
        ALL_CC,
        |a| {
            a.cmp(rdx, rsi)?;
            a.shl(rbx, cl)
        }
    );
    chain!(
        v,
        "add edx,esi; sar ebx,cl(0/1); setcc",
        chain_shift_cl,
        cl_0_or_1,
        ALL_CC,
        |a| {
            a.add(edx, esi)?;
            a.sar(ebx, cl)
        }
    );
    chain!(
        v,
        "sub dl,dh; shr bx,cl(0/1); setcc",
        chain_shift_cl,
        cl_0_or_1,
        ALL_CC,
        |a| {
            a.sub(dl, dh)?;
            a.shr(bx, cl)
        }
    );
    chain!(
        v,
        "cmp rdx,rsi; shl rbx,64; setcc",
        all,
        nofix,
        ALL_CC,
        |a| {
            a.cmp(rdx, rsi)?;
            a.shl(rbx, 64)
        }
    );
    chain!(v, "imul rbx,rcx; setcc", mul_flags, nofix, CC_CF_OF, |a| a
        .imul_2(rbx, rcx));
    chain!(
        v,
        "imul ebx,ecx,imm; setcc",
        mul_flags,
        nofix,
        CC_CF_OF,
        |a| a.imul_3(ebx, ecx, 0x1234_5678)
    );
    chain!(v, "imul bx,cx; setcc", mul_flags, nofix, CC_CF_OF, |a| a
        .imul_2(bx, cx));
    // ADC/SBB carry chains read CF from every kind of producer.
    chain!(v, "add; adc; adc; setcc", all, nofix, ALL_CC, |a| {
        a.add(rbx, rcx)?;
        a.adc(rdx, rsi)?;
        a.adc(edi, r8d)
    });
    chain!(v, "sub; sbb; sbb; setcc", all, nofix, ALL_CC, |a| {
        a.sub(rbx, rcx)?;
        a.sbb(rdx, rsi)?;
        a.sbb(di, r8w)
    });
    chain!(v, "cmp; adc; sbb; setcc", all, eq_bc, ALL_CC, |a| {
        a.cmp(ebx, ecx)?;
        a.adc(dl, sil)?;
        a.sbb(rdi, r8)
    });
    chain!(v, "xor; adc; setcc", all, nofix, ALL_CC, |a| {
        a.xor(ebx, ecx)?;
        a.adc(rdx, rsi)
    });
    chain!(v, "inc; sbb; setcc", all, nofix, ALL_CC, |a| {
        a.inc(rbx)?;
        a.sbb(rdx, rsi)
    });
    chain!(v, "shr rbx,5; adc; setcc", all, nofix, ALL_CC, |a| {
        a.shr(rbx, 5)?;
        a.adc(rdx, rsi)
    });
    chain!(
        v,
        "sar ebx,cl(0/1); sbb; setcc",
        all,
        cl_0_or_1,
        ALL_CC,
        |a| {
            a.sar(ebx, cl)?;
            a.sbb(rdx, rsi)
        }
    );
    chain!(v, "imul; adc; setcc", all, nofix, ALL_CC, |a| {
        a.imul_2(rbx, rcx)?;
        a.adc(rdx, rsi)
    });
    chain!(v, "neg; sbb; setcc", all, nofix, ALL_CC, |a| {
        a.neg(rbx)?;
        a.sbb(edx, esi)
    });
    chain!(
        v,
        "add byte [r15],cl; adc; setcc",
        all,
        nofix,
        ALL_CC,
        |a| {
            a.add(byte_ptr(r15 + 2), cl)?;
            a.adc(bl, dl)
        }
    );
    chain!(v, "cmp; cmc; setcc", all, eq_bc, ALL_CC, |a| {
        a.cmp(rbx, rcx)?;
        a.cmc()
    });
    chain!(v, "sub; clc; setcc", all, eq_bc, ALL_CC, |a| {
        a.sub(bx, cx)?;
        a.clc()
    });
    chain!(v, "test; stc; setcc", no_af, eq_bc, ALL_CC, |a| {
        a.test(bl, cl)?;
        a.stc()
    });
    chain!(
        v,
        "add; bt; setcc",
        bt_flags,
        nofix,
        CC_NO_OF & 0x00fc,
        |a| {
            a.add(rdx, rsi)?;
            a.bt(rbx, rcx)
        }
    );
    // Readers of the whole flag set.
    chain!(v, "cmp bl,cl; lahf", all, eq_bc, 0, |a| {
        a.cmp(bl, cl)?;
        a.lahf()
    });
    chain!(v, "add; pushfq; pop", all, nofix, 0, |a| {
        a.add(rbx, rcx)?;
        a.pushfq()?;
        a.pop(rax)?;
        a.and(eax, 0x8d5)?;
        a.add(edx, esi)
    });
    chain!(v, "cmp; sahf; setcc", all, eq_bc, ALL_CC, |a| {
        a.cmp(rbx, rcx)?;
        a.sahf()
    });
    chain!(v, "cmp; cmovcc", all, eq_bc, 0, |a| {
        a.cmp(rbx, rcx)?;
        a.cmovl(rdx, rsi)?;
        a.cmovbe(edi, r8d)?;
        a.cmovg(r9w, r10w)?;
        a.cmovae(r11, r12)?;
        a.cmovne(r13, r14)
    });
    chain!(v, "test; cmovcc", no_af, eq_bc, 0, |a| {
        a.test(ebx, ecx)?;
        a.cmovle(rdx, rsi)?;
        a.cmovs(edi, r8d)?;
        a.cmove(r9, r10)?;
        a.cmova(r11, r12)
    });
    chain!(v, "cmp; jcc (signed)", all, eq_bc, 0, |a| jcc_chain(
        a, false
    ));
    chain!(v, "sub; jcc (unsigned)", all, eq_bc, 0, |a| jcc_chain(
        a, true
    ));
}

/// A compare (or subtract) followed by four conditional jumps; each jump taken or not leaves
/// a different mark in EAX.
fn jcc_chain(a: &mut CodeAssembler, unsigned: bool) -> Result<(), iced_x86::IcedError> {
    if unsigned {
        a.sub(ecx, ebx)?;
    } else {
        a.cmp(rbx, rcx)?;
    }
    a.xor(eax, eax)?;
    // XOR changed the flags: compare again so the jumps see the compare's.
    if unsigned {
        a.cmp(cx, bx)?;
    } else {
        a.cmp(rbx, rcx)?;
    }
    for (i, cc) in [12u32, 14, 2, 6, 4].into_iter().enumerate() {
        let mut skip = a.create_label();
        let cc = if unsigned { cc ^ 1 } else { cc };
        match cc {
            2 => a.jb(skip),
            3 => a.jae(skip),
            4 => a.je(skip),
            5 => a.jne(skip),
            6 => a.jbe(skip),
            7 => a.ja(skip),
            12 => a.jl(skip),
            13 => a.jge(skip),
            14 => a.jle(skip),
            _ => a.jg(skip),
        }?;
        a.or(eax, 1 << i)?;
        a.set_label(&mut skip)?;
        // OR changed the flags: compare again for the next jump.
        if unsigned {
            a.cmp(cx, bx)?;
        } else {
            a.cmp(rbx, rcx)?;
        }
    }
    Ok(())
}

fn bt_mem_off_16(r: &mut [u64; 16]) {
    let off = ((r[1] % 256) as i64 - 64) as u64;
    r[1] = (r[1] & !0xffff) | (off & 0xffff);
}

/// An executable page running one instruction between a register load and store.
struct Native {
    page: *mut u8,
    state: Box<HostState>,
}

impl Native {
    fn new() -> Native {
        // SAFETY: anonymous private mapping; checked for MAP_FAILED below.
        let page = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(page, libc::MAP_FAILED, "mmap of an executable page failed");
        Native {
            page: page as *mut u8,
            state: Box::default(),
        }
    }

    /// Generate the stub around `insn`.
    fn load(&mut self, insn: &[u8]) {
        let st_ptr = &mut *self.state as *mut HostState as u64;
        let order = [
            (rcx, 8),
            (rdx, 16),
            (rbx, 24),
            (rbp, 40),
            (rsi, 48),
            (rdi, 56),
            (r8, 64),
            (r9, 72),
            (r10, 80),
            (r11, 88),
            (r12, 96),
            (r13, 104),
            (r14, 112),
            (r15, 120),
        ];
        let code = asm64(self.page as u64, |a| {
            for r in [rbx, rbp, r12, r13, r14, r15] {
                a.push(r)?;
            }
            a.mov(rax, st_ptr)?;
            a.mov(qword_ptr(rax + 136), rsp)?;
            for (i, x) in [xmm0, xmm1, xmm2, xmm3].into_iter().enumerate() {
                a.movdqu(x, xmmword_ptr(rax + 144 + 16 * i as i32))?;
            }
            a.push(qword_ptr(rax + 128))?;
            a.popfq()?;
            for (r, off) in order {
                a.mov(r, qword_ptr(rax + off))?;
            }
            a.mov(rax, qword_ptr(rax))?;
            a.db(insn)?;
            a.pushfq()?;
            a.push(rax)?;
            a.mov(rax, st_ptr)?;
            for (r, off) in order {
                a.mov(qword_ptr(rax + off), r)?;
            }
            for (i, x) in [xmm0, xmm1, xmm2, xmm3].into_iter().enumerate() {
                a.movdqu(xmmword_ptr(rax + 144 + 16 * i as i32), x)?;
            }
            a.pop(rcx)?;
            a.mov(qword_ptr(rax), rcx)?;
            a.pop(rcx)?;
            a.mov(qword_ptr(rax + 128), rcx)?;
            a.mov(rsp, qword_ptr(rax + 136))?;
            for r in [r15, r14, r13, r12, rbp, rbx] {
                a.pop(r)?;
            }
            a.ret()
        });
        assert!(code.len() <= 4096);
        // SAFETY: the page is 4096 writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.page, code.len()) };
    }

    fn run(&mut self) {
        // SAFETY: the page holds the stub generated by load(): it saves and restores the
        // callee-saved registers and RSP and returns; the instruction inside only touches
        // registers and the 64-byte buffer R15 points to.
        let f: extern "C" fn() = unsafe { std::mem::transmute(self.page) };
        f();
    }
}

impl Drop for Native {
    fn drop(&mut self) {
        // SAFETY: unmapping the page mapped in new().
        unsafe { libc::munmap(self.page as *mut libc::c_void, 4096) };
    }
}

struct Emu {
    mem: GuestMemoryMmap,
    vcpu: kvmbox_emu::EmuVcpu,
    _vm: kvmbox_emu::EmuVm,
}

impl Emu {
    fn new() -> Emu {
        let (mem, vm, vcpu) = long_machine(&[0xf4]);
        Emu { mem, vcpu, _vm: vm }
    }

    fn run(
        &mut self,
        insn: &[u8],
        regs: &[u64; 16],
        flags: u64,
        buf: &mut [u8; 64],
    ) -> ([u64; 16], u64) {
        self.run_x(insn, regs, flags, buf, &mut [0; 4])
    }

    /// Run `insn` twice from the same inputs: first as the first instruction after a state
    /// load (the code TLB is empty, so it goes through `step`), then behind a NOP that fills
    /// the TLB (so it runs in a translated block). Both runs must agree; returns the second.
    fn run_x(
        &mut self,
        insn: &[u8],
        regs: &[u64; 16],
        flags: u64,
        buf: &mut [u8; 64],
        xmm: &mut [u128; 4],
    ) -> ([u64; 16], u64) {
        let (mut buf_stepped, mut xmm_stepped) = (*buf, *xmm);
        let stepped = self.run_once(insn, false, regs, flags, &mut buf_stepped, &mut xmm_stepped);
        let in_block = self.run_once(insn, true, regs, flags, buf, xmm);
        assert!(
            stepped == in_block && buf_stepped == *buf && xmm_stepped == *xmm,
            "{insn:02x?}: step and the translated block differ: {stepped:x?} vs {in_block:x?}"
        );
        in_block
    }

    fn run_once(
        &mut self,
        insn: &[u8],
        behind_nop: bool,
        regs: &[u64; 16],
        flags: u64,
        buf: &mut [u8; 64],
        xmm: &mut [u128; 4],
    ) -> ([u64; 16], u64) {
        let lead = usize::from(behind_nop);
        let mut code = vec![0x90; lead];
        code.extend_from_slice(insn);
        code.push(0xf4);
        self.mem.write_slice(&code, GuestAddress(CODE)).unwrap();
        self.mem.write_slice(buf, GuestAddress(DATA)).unwrap();
        let mut r = *regs;
        r[4] = KSTACK;
        r[15] = DATA;
        self.vcpu
            .set_regs(&Regs::from_gprs(r, CODE, flags))
            .unwrap();
        self.vcpu.state_mut().xmm[..4].copy_from_slice(xmm);
        let io = Recorder::default();
        let exit = self.vcpu.run(&io).unwrap();
        assert_eq!(
            exit,
            VcpuExit::Halted,
            "emulator stopped at rip {:#x}; unimplemented: {:?}",
            self.vcpu.state().rip,
            self.vcpu.stats().unimplemented
        );
        xmm.copy_from_slice(&self.vcpu.state().xmm[..4]);
        let o = self.vcpu.regs().unwrap();
        assert_eq!(
            o.rip,
            CODE + code.len() as u64,
            "emulator did not run the instruction"
        );
        self.mem.read_slice(buf, GuestAddress(DATA)).unwrap();
        (o.gprs(), o.rflags)
    }
}

/// The native run's memory buffer, aligned for CMPXCHG16B.
#[repr(C, align(16))]
struct Align16([u8; 64]);

#[test]
fn instruction_forms_match_the_host_cpu() {
    let mut native = Native::new();
    let mut emu = Emu::new();
    emu.vcpu.set_jit_threshold(0);
    // The same forms compiled by the JIT from their first run.
    let mut jit = Emu::new();
    jit.vcpu.set_jit_threshold(1);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let forms = forms();
    let mut failures = Vec::new();
    let mut compared = 0usize;
    for form in &forms {
        let insn = asm64(0, form.asm);
        native.load(&insn);
        for case in 0..CASES {
            let mut regs = [0u64; 16];
            for r in regs.iter_mut() {
                *r = rng.value();
            }
            (form.fix)(&mut regs);
            let flags_in = (rng.next() & ALL) | 2;
            let mut mem_in = [0u8; 64];
            for chunk in mem_in.chunks_mut(8) {
                chunk.copy_from_slice(&rng.value().to_le_bytes());
            }
            if form.name.contains("cmpxchg") && case % 2 == 0 {
                // Make the compare succeed half the time.
                mem_in[..8].copy_from_slice(&regs[0].to_le_bytes());
                if form.name.contains("8b") {
                    mem_in[4..8].copy_from_slice(&(regs[2] as u32).to_le_bytes());
                }
                if form.name.contains("16b") {
                    // RDX:RAX against [r15] and [r15+16] (the two CMPXCHG16B forms).
                    for at in [0, 16] {
                        mem_in[at..at + 8].copy_from_slice(&regs[0].to_le_bytes());
                        mem_in[at + 8..at + 16].copy_from_slice(&regs[2].to_le_bytes());
                    }
                }
            }
            // Native.
            // 16-byte aligned, as CMPXCHG16B requires (DATA in the guest is).
            let mut host_buf = Box::new(Align16(mem_in));
            let mut hs = regs;
            hs[15] = host_buf.0.as_mut_ptr() as u64;
            hs[4] = 0;
            *native.state = HostState {
                regs: hs,
                flags: flags_in | 0x200,
                saved_rsp: 0,
                xmm: [0; 4],
            };
            native.run();
            let n_regs = native.state.regs;
            let n_flags = native.state.flags;
            // Emulated.
            let mut emu_buf = mem_in;
            let (e_regs, e_flags) = emu.run(&insn, &regs, flags_in, &mut emu_buf);
            // And compiled by the JIT (the first run compiles the block, later cases reuse it).
            let mut jit_buf = mem_in;
            let (j_regs, j_flags) =
                jit.run_once(&insn, true, &regs, flags_in, &mut jit_buf, &mut [0; 4]);
            let fmask = (form.flags)(&regs);
            let mut bad = Vec::new();
            for (who, e_regs, e_flags, emu_buf) in [
                ("emu", e_regs, e_flags, emu_buf),
                ("jit", j_regs, j_flags, jit_buf),
            ] {
                for i in 0..15 {
                    if i == 4 {
                        continue;
                    }
                    if n_regs[i] != e_regs[i] {
                        bad.push(format!(
                            "r{i}: host {:#x} {who} {:#x}",
                            n_regs[i], e_regs[i]
                        ));
                    }
                }
                if (n_flags ^ e_flags) & fmask != 0 {
                    bad.push(format!(
                        "flags: host {:#x} {who} {:#x} (compared {:#x})",
                        n_flags & ALL,
                        e_flags & ALL,
                        fmask
                    ));
                }
                if host_buf.0 != emu_buf {
                    bad.push(format!("memory differs ({who})"));
                }
            }
            compared += 1;
            if !bad.is_empty() {
                failures.push(format!(
                    "{}: in regs {:x?} flags {:#x}: {}",
                    form.name,
                    &regs[..4],
                    flags_in,
                    bad.join("; ")
                ));
                break;
            }
        }
    }
    let in_blocks = emu.vcpu.stats().block_instructions;
    println!(
        "{} forms, {compared} cases compared (instructions in translated blocks: {in_blocks})",
        forms.len()
    );
    // Most forms have a decode-time handler, so their second run is in a block.
    assert!(in_blocks > compared as u64 / 2, "{in_blocks} of {compared}");
    let s = jit.vcpu.stats();
    println!(
        "JIT: {} blocks compiled, {} instructions run in JIT code",
        s.jit_blocks, s.jit_instructions
    );
    assert!(s.jit_instructions > compared as u64 / 2, "{s:?}");
    assert!(
        failures.is_empty(),
        "{} forms differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Lane kind of an SSE form's random inputs.
#[derive(Clone, Copy, PartialEq)]
enum Lanes {
    /// Random bits.
    Int,
    /// Finite single-precision values.
    F32,
    /// Finite double-precision values.
    F64,
}

struct SseForm {
    name: &'static str,
    asm: Asm,
    lanes: Lanes,
}

macro_rules! s {
    ($v:ident, $name:expr, $lanes:expr, |$a:ident| $body:expr) => {
        $v.push(SseForm {
            name: $name,
            asm: |$a| $body,
            lanes: $lanes,
        })
    };
}

macro_rules! sse_rr {
    ($v:ident, $lanes:expr, $($op:ident),*) => {
        $( s!($v, concat!(stringify!($op), " xmm0,xmm1"), $lanes, |a| a.$op(xmm0, xmm1)); )*
    };
}

fn sse_forms() -> Vec<SseForm> {
    use Lanes::*;
    let mut v = Vec::new();
    sse_rr!(v, Int, pxor, por, pand, pandn, xorps, andps, orps, andnps, xorpd, andpd, orpd);
    sse_rr!(v, Int, paddb, paddw, paddd, paddq, psubb, psubw, psubd, psubq);
    sse_rr!(v, Int, paddusb, paddusw, psubusb, psubusw, paddsb, paddsw, psubsb, psubsw);
    sse_rr!(v, Int, pcmpeqb, pcmpeqw, pcmpeqd, pcmpgtb, pcmpgtw, pcmpgtd);
    sse_rr!(v, Int, pminub, pmaxub, pminsw, pmaxsw, pavgb, pavgw);
    sse_rr!(v, Int, pmullw, pmulhw, pmulhuw, pmuludq, pmaddwd, psadbw);
    sse_rr!(v, Int, punpcklbw, punpcklwd, punpckldq, punpcklqdq);
    sse_rr!(v, Int, punpckhbw, punpckhwd, punpckhdq, punpckhqdq);
    sse_rr!(v, Int, unpcklps, unpckhps, unpcklpd, unpckhpd);
    sse_rr!(v, Int, packsswb, packssdw, packuswb);
    sse_rr!(v, Int, movdqa, movdqu, movaps, movups, movss, movhlps, movlhps);
    s!(v, "movsd xmm0,xmm1", Int, |a| a.movsd_2(xmm0, xmm1));
    s!(v, "pshufd xmm0,xmm1,0x1b", Int, |a| a
        .pshufd(xmm0, xmm1, 0x1b));
    s!(v, "pshuflw xmm0,xmm1,0x4e", Int, |a| a
        .pshuflw(xmm0, xmm1, 0x4e));
    s!(v, "pshufhw xmm0,xmm1,0xb1", Int, |a| a
        .pshufhw(xmm0, xmm1, 0xb1));
    s!(v, "shufps xmm0,xmm1,0x9c", Int, |a| a
        .shufps(xmm0, xmm1, 0x9c));
    s!(v, "shufpd xmm0,xmm1,1", Int, |a| a.shufpd(xmm0, xmm1, 1));
    s!(v, "psllw xmm0,3", Int, |a| a.psllw(xmm0, 3));
    s!(v, "pslld xmm0,17", Int, |a| a.pslld(xmm0, 17));
    s!(v, "psllq xmm0,33", Int, |a| a.psllq(xmm0, 33));
    s!(v, "psrlw xmm0,15", Int, |a| a.psrlw(xmm0, 15));
    s!(v, "psrld xmm0,1", Int, |a| a.psrld(xmm0, 1));
    s!(v, "psrlq xmm0,63", Int, |a| a.psrlq(xmm0, 63));
    s!(v, "psraw xmm0,4", Int, |a| a.psraw(xmm0, 4));
    s!(v, "psrad xmm0,31", Int, |a| a.psrad(xmm0, 31));
    s!(v, "psrlw xmm0,xmm2", Int, |a| a.psrlw(xmm0, xmm2));
    s!(v, "psllq xmm0,xmm2", Int, |a| a.psllq(xmm0, xmm2));
    s!(v, "psrad xmm0,xmm2", Int, |a| a.psrad(xmm0, xmm2));
    s!(v, "pslldq xmm0,5", Int, |a| a.pslldq(xmm0, 5));
    s!(v, "psrldq xmm0,9", Int, |a| a.psrldq(xmm0, 9));
    s!(v, "pmovmskb eax,xmm1", Int, |a| a.pmovmskb(eax, xmm1));
    s!(v, "movmskps eax,xmm1", Int, |a| a.movmskps(eax, xmm1));
    s!(v, "movmskpd eax,xmm1", Int, |a| a.movmskpd(eax, xmm1));
    s!(v, "movd eax,xmm1", Int, |a| a.movd(eax, xmm1));
    s!(v, "movd xmm0,ecx", Int, |a| a.movd(xmm0, ecx));
    s!(v, "movq rax,xmm1", Int, |a| a.movq(rax, xmm1));
    s!(v, "movq xmm0,rcx", Int, |a| a.movq(xmm0, rcx));
    s!(v, "movq xmm0,xmm1", Int, |a| a.movq(xmm0, xmm1));
    s!(v, "movq xmm0,[r15]", Int, |a| a
        .movq(xmm0, qword_ptr(r15 + 8)));
    s!(v, "movq [r15],xmm1", Int, |a| a
        .movq(qword_ptr(r15 + 4), xmm1));
    s!(v, "movdqu xmm0,[r15]", Int, |a| a
        .movdqu(xmm0, xmmword_ptr(r15 + 3)));
    s!(v, "movdqu [r15],xmm1", Int, |a| a
        .movdqu(xmmword_ptr(r15 + 5), xmm1));
    s!(v, "movups xmm0,[r15]", Int, |a| a
        .movups(xmm0, xmmword_ptr(r15 + 7)));
    s!(v, "movss xmm0,[r15]", Int, |a| a
        .movss(xmm0, dword_ptr(r15 + 4)));
    s!(v, "movsd [r15],xmm1", Int, |a| a
        .movsd_2(qword_ptr(r15 + 8), xmm1));
    s!(v, "movsd xmm0,[r15]", Int, |a| a
        .movsd_2(xmm0, qword_ptr(r15 + 8)));
    s!(v, "movhps xmm0,[r15]", Int, |a| a
        .movhps(xmm0, qword_ptr(r15 + 16)));
    s!(v, "movlps xmm0,[r15]", Int, |a| a
        .movlps(xmm0, qword_ptr(r15 + 16)));
    s!(v, "movhpd [r15],xmm1", Int, |a| a
        .movhpd(qword_ptr(r15 + 16), xmm1));
    s!(v, "pextrw eax,xmm1,3", Int, |a| a.pextrw(eax, xmm1, 3));
    s!(v, "pinsrw xmm0,ecx,5", Int, |a| a.pinsrw(xmm0, ecx, 5));
    s!(v, "pcmpeqb xmm0,[r15]", Int, |a| a
        .pcmpeqb(xmm0, xmmword_ptr(r15 + 16)));
    sse_rr!(v, F64, addsd, subsd, mulsd, divsd, minsd, maxsd, addpd, subpd, mulpd, divpd);
    sse_rr!(v, F64, minpd, maxpd, comisd, ucomisd, cvtsd2ss, cvttpd2dq, cvtpd2ps);
    sse_rr!(v, F32, addss, subss, mulss, divss, minss, maxss, addps, subps, mulps, divps);
    sse_rr!(v, F32, minps, maxps, comiss, ucomiss, cvtss2sd, cvttps2dq, cvtps2pd);
    sse_rr!(v, Int, cvtdq2pd, cvtdq2ps);
    s!(v, "sqrtsd xmm0,xmm1", F64, |a| a.sqrtsd(xmm0, xmm1));
    s!(v, "sqrtps xmm0,xmm1", F32, |a| a.sqrtps(xmm0, xmm1));
    s!(v, "cvtsi2sd xmm0,rcx", F64, |a| a.cvtsi2sd(xmm0, rcx));
    s!(v, "cvtsi2sd xmm0,ecx", F64, |a| a.cvtsi2sd(xmm0, ecx));
    s!(v, "cvtsi2ss xmm0,rcx", F32, |a| a.cvtsi2ss(xmm0, rcx));
    s!(v, "cvttsd2si rax,xmm1", F64, |a| a.cvttsd2si(rax, xmm1));
    s!(v, "cvtsd2si eax,xmm1", F64, |a| a.cvtsd2si(eax, xmm1));
    s!(v, "cvttss2si eax,xmm1", F32, |a| a.cvttss2si(eax, xmm1));
    s!(v, "cvtss2si rax,xmm1", F32, |a| a.cvtss2si(rax, xmm1));
    s!(v, "addsd xmm0,[r15]", F64, |a| a
        .addsd(xmm0, qword_ptr(r15 + 8)));
    s!(v, "cmpsd xmm0,xmm1,eq", F64, |a| a.cmpsd_3(xmm0, xmm1, 0));
    s!(v, "cmpsd xmm0,xmm1,lt", F64, |a| a.cmpsd_3(xmm0, xmm1, 1));
    s!(v, "cmpsd xmm0,xmm1,nle", F64, |a| a.cmpsd_3(xmm0, xmm1, 6));
    s!(v, "cmpss xmm0,xmm1,le", F32, |a| a.cmpss(xmm0, xmm1, 2));
    s!(v, "cmpps xmm0,xmm1,neq", F32, |a| a.cmpps(xmm0, xmm1, 4));
    s!(v, "cmppd xmm0,xmm1,nlt", F64, |a| a.cmppd(xmm0, xmm1, 5));
    s!(v, "cmppd xmm0,xmm1,ord", F64, |a| a.cmppd(xmm0, xmm1, 7));
    s!(v, "mulps xmm0,[r15]", F32, |a| a
        .mulps(xmm0, xmmword_ptr(r15 + 16)));
    v
}

impl Rng {
    fn f64v(&mut self) -> f64 {
        match self.next() % 6 {
            0 => 0.0,
            1 => -((self.next() % 1000) as f64),
            2 => (self.next() % 1_000_000) as f64 / ((self.next() % 997) as f64 + 1.0),
            3 => ((self.next() as i64) >> 20) as f64 * 1.5,
            4 => (self.next() % 7) as f64 + 0.5,
            _ => -((self.next() % 100_000) as f64) / 3.0,
        }
    }
    fn xmm(&mut self, lanes: Lanes) -> u128 {
        match lanes {
            Lanes::Int => (self.value() as u128) | ((self.value() as u128) << 64),
            Lanes::F64 => (self.f64v().to_bits() as u128) | ((self.f64v().to_bits() as u128) << 64),
            Lanes::F32 => {
                let mut r = 0u128;
                for i in 0..4 {
                    r |= ((self.f64v() as f32).to_bits() as u128) << (32 * i);
                }
                r
            }
        }
    }
}

#[test]
fn sse_forms_match_the_host_cpu() {
    let mut native = Native::new();
    let mut emu = Emu::new();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let forms = sse_forms();
    let mut failures = Vec::new();
    let mut compared = 0usize;
    for form in &forms {
        let insn = asm64(0, form.asm);
        native.load(&insn);
        for _ in 0..CASES {
            let mut regs = [0u64; 16];
            for r in regs.iter_mut() {
                *r = rng.value();
            }
            if form.lanes != Lanes::Int {
                // Integer sources of conversions: keep them moderate.
                regs[1] = ((regs[1] as i64) >> 8) as u64;
            }
            let mut xmm = [0u128; 4];
            for x in xmm.iter_mut() {
                *x = rng.xmm(form.lanes);
            }
            // Shift counts in XMM2: sometimes in range.
            if rng.next().is_multiple_of(2) {
                xmm[2] = (rng.next() % 70) as u128;
            }
            let flags_in = (rng.next() & ALL) | 2;
            let mut mem_in = [0u8; 64];
            for chunk in mem_in.chunks_mut(16) {
                chunk.copy_from_slice(&rng.xmm(form.lanes).to_le_bytes());
            }
            let mut host_buf = Box::new(mem_in);
            let mut hs = regs;
            hs[15] = host_buf.as_mut_ptr() as u64;
            *native.state = HostState {
                regs: hs,
                flags: flags_in | 0x200,
                saved_rsp: 0,
                xmm,
            };
            native.run();
            let (n_regs, n_flags, n_xmm) =
                (native.state.regs, native.state.flags, native.state.xmm);
            let mut emu_buf = mem_in;
            let mut e_xmm = xmm;
            let (e_regs, e_flags) = emu.run_x(&insn, &regs, flags_in, &mut emu_buf, &mut e_xmm);
            compared += 1;
            let mut bad = Vec::new();
            for i in (0..15).filter(|&i| i != 4) {
                if n_regs[i] != e_regs[i] {
                    bad.push(format!("r{i}: host {:#x} emu {:#x}", n_regs[i], e_regs[i]));
                }
            }
            for i in 0..4 {
                if n_xmm[i] != e_xmm[i] {
                    bad.push(format!(
                        "xmm{i}: host {:#034x} emu {:#034x}",
                        n_xmm[i], e_xmm[i]
                    ));
                }
            }
            if (n_flags ^ e_flags) & ALL != 0 {
                bad.push(format!(
                    "flags: host {:#x} emu {:#x}",
                    n_flags & ALL,
                    e_flags & ALL
                ));
            }
            if *host_buf != emu_buf {
                bad.push("memory differs".to_string());
            }
            if !bad.is_empty() {
                failures.push(format!(
                    "{}: in xmm0 {:#034x} xmm1 {:#034x} rcx {:#x}: {}",
                    form.name,
                    xmm[0],
                    xmm[1],
                    regs[1],
                    bad.join("; ")
                ));
                break;
            }
        }
    }
    println!("{} SSE forms, {compared} cases compared", forms.len());
    assert!(
        failures.is_empty(),
        "{} forms differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
