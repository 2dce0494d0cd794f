//! The JIT against the interpreter: random instruction sequences (flag consumers after flag
//! producers, memory operands within a page and across pages, stores into the code's own page,
//! pushes and pops, forward branches, faults in the middle of a block) run on two vCPUs, one
//! with every translated block compiled from its first run and one with the JIT off, and must
//! leave the same registers, defined flags, memory and RIP. And the code cache is never
//! writable and executable at once.

mod common;

use common::*;
use iced_x86::code_asm::*;
use kvmbox_cpu::{Regs, Vcpu, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

/// Where every exception handler halts.
const GP_HANDLER: u64 = 0x20000;
/// Data the sequences address through R15 (two pages: accesses at 4093 cross into the second).
const DATA_BYTES: usize = 8192;
/// Stack bytes compared (below KSTACK: pushes, and the exception frame).
const STACK_BYTES: u64 = 512;
/// Where the exception frame's RFLAGS is, below KSTACK (SS, RSP, RFLAGS, CS, RIP, error).
const FRAME_RFLAGS: u64 = 24;

const R64: [AsmRegister64; 16] = [
    rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15,
];
const R32: [AsmRegister32; 16] = [
    eax, ecx, edx, ebx, esp, ebp, esi, edi, r8d, r9d, r10d, r11d, r12d, r13d, r14d, r15d,
];
const R8: [AsmRegister8; 4] = [al, cl, dl, bl];
/// Low bytes and words by register number (with a REX prefix: SPL..DIL, not AH..BH).
const RB: [AsmRegister8; 16] = [
    al, cl, dl, bl, spl, bpl, sil, dil, r8b, r9b, r10b, r11b, r12b, r13b, r14b, r15b,
];
const RW: [AsmRegister16; 16] = [
    ax, cx, dx, bx, sp, bp, si, di, r8w, r9w, r10w, r11w, r12w, r13w, r14w, r15w,
];

/// Flags each condition code (x86 order) reads.
const COND_READS: [u64; 16] = [
    OF,
    OF,
    CF,
    CF,
    ZF,
    ZF,
    CF | ZF,
    CF | ZF,
    SF,
    SF,
    PF,
    PF,
    SF | OF,
    SF | OF,
    ZF | SF | OF,
    ZF | SF | OF,
];

/// One random sequence: its code, the flags it leaves undefined at its end, and those it
/// leaves undefined anywhere (a fault's frame holds the flags of that point). A quarter of the
/// sequences run as the body of a loop (R12 counts it down), which compiled code may run
/// several times without leaving when the body is one block.
fn sequence(rng: &mut Rng, len: usize) -> (Vec<u8>, u64, u64) {
    let mut undef = 0u64;
    let mut ever = 0u64;
    let looped = rng.below(4) == 0;
    let code = asm64(CODE, |a| {
        // Registers the sequence may write: not RSP, R15 (the data base), R13 (the code
        // page's address) nor R12 (the loop counter).
        let pick = |rng: &mut Rng| {
            let r = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 14][rng.below(12) as usize];
            r as usize
        };
        let mut top = a.create_label();
        if looped {
            a.mov(r12, 1 + rng.below(40))?;
            a.set_label(&mut top)?;
        }
        for _ in 0..len {
            let d = pick(rng);
            let s = pick(rng);
            let disp = (rng.below(DATA_BYTES as u64 / 8 - 1) * 8) as i32;
            let kind = rng.below(26);
            // Flags written, and left undefined, by this instruction.
            let (writes, leaves) = match kind {
                0 => {
                    a.mov(R64[d], R64[s])?;
                    (0, 0)
                }
                1 => {
                    a.mov(R64[d], rng.value())?;
                    (0, 0)
                }
                2 => {
                    a.mov(R64[d], qword_ptr(r15 + disp))?;
                    (0, 0)
                }
                3 => {
                    a.mov(qword_ptr(r15 + disp), R64[s])?;
                    (0, 0)
                }
                4 => {
                    a.mov(dword_ptr(r15 + disp), rng.next() as u32)?;
                    (0, 0)
                }
                5 => {
                    match rng.below(4) {
                        0 => a.add(R64[d], R64[s])?,
                        1 => a.sub(R32[d], R32[s])?,
                        2 => a.adc(R64[d], R64[s])?,
                        _ => a.sbb(R64[d], R64[s])?,
                    }
                    (ALL, 0)
                }
                6 => {
                    match rng.below(3) {
                        0 => a.and(R64[d], R64[s])?,
                        1 => a.or(R32[d], R32[s])?,
                        _ => a.xor(R64[d], R64[s])?,
                    }
                    (ALL, AF)
                }
                7 => {
                    a.cmp(R64[d], rng.next() as i32)?;
                    (ALL, 0)
                }
                8 => {
                    a.add(R64[d], qword_ptr(r15 + disp))?;
                    (ALL, 0)
                }
                9 => {
                    a.cmp(qword_ptr(r15 + disp), R64[s])?;
                    (ALL, 0)
                }
                10 => {
                    a.sub(dword_ptr(r15 + disp), R32[s])?;
                    (ALL, 0)
                }
                11 => {
                    if rng.below(2) == 0 {
                        a.inc(R64[d])?;
                    } else {
                        a.dec(R32[d])?;
                    }
                    (ALL & !CF, 0)
                }
                12 => {
                    let n = 1 + rng.below(63) as u32;
                    match rng.below(5) {
                        0 => a.shl(R64[d], n)?,
                        1 => a.shr(R64[d], n)?,
                        2 => a.sar(R64[d], n)?,
                        // Rotates write CF and OF only (OF only defined for a count of 1);
                        // a 32-bit count is masked to 5 bits, and a zero count writes none.
                        k => {
                            let m = if k == 3 {
                                a.rol(R64[d], n)?;
                                n
                            } else {
                                a.ror(R32[d], n)?;
                                n & 31
                            };
                            let (writes, leaves) = match m {
                                0 => (0, 0),
                                1 => (CF | OF, 0),
                                _ => (CF | OF, OF),
                            };
                            undef = (undef & !writes) | leaves;
                            ever |= leaves;
                            continue;
                        }
                    }
                    (ALL, if n == 1 { AF } else { AF | OF })
                }
                13 => {
                    a.imul_2(R64[d], R64[s])?;
                    (ALL, SF | ZF | AF | PF)
                }
                14 => {
                    a.lea(R64[d], qword_ptr(R64[s] + R64[pick(rng)] * 4 + disp))?;
                    (0, 0)
                }
                15 => {
                    if rng.below(2) == 0 {
                        a.movzx(R32[d], byte_ptr(r15 + disp + 3))?;
                    } else {
                        a.movsx(R64[d], word_ptr(r15 + disp + 2))?;
                    }
                    (0, 0)
                }
                16 | 17 => {
                    // A condition whose flags are all defined now.
                    let ok: Vec<u32> = (0..16u32)
                        .filter(|&c| COND_READS[c as usize] & undef == 0)
                        .collect();
                    if ok.is_empty() {
                        a.nop()?;
                        continue;
                    }
                    let cc = ok[rng.below(ok.len() as u64) as usize];
                    if kind == 16 {
                        let r = R8[rng.below(4) as usize];
                        emit_setcc(a, cc, r)?;
                    } else {
                        emit_cmov(a, cc, R64[d], R64[s])?;
                    }
                    (0, 0)
                }
                18 => {
                    a.push(R64[s])?;
                    a.pop(R64[d])?;
                    (0, 0)
                }
                19 => {
                    // Across a page boundary (the fast path's limit).
                    a.mov(R64[d], qword_ptr(r15 + 4093))?;
                    (0, 0)
                }
                20 => {
                    // A store into the code's own page (after the code): ends a block. (An
                    // ADD there also leaves its flags: the block's last instruction before
                    // the final HLT sometimes.)
                    if rng.below(2) == 0 {
                        a.mov(qword_ptr(r13 + 0x800 + disp % 0x400), R64[s])?;
                        (0, 0)
                    } else {
                        a.add(qword_ptr(r13 + 0x800 + disp % 0x400), R64[s])?;
                        (ALL, 0)
                    }
                }
                21 => {
                    // A forward branch over one instruction, on a defined condition.
                    let ok: Vec<u32> = (0..16u32)
                        .filter(|&c| COND_READS[c as usize] & undef == 0)
                        .collect();
                    let mut over = a.create_label();
                    if ok.is_empty() {
                        a.jmp(over)?;
                    } else {
                        emit_jcc(a, ok[rng.below(ok.len() as u64) as usize], over)?;
                    }
                    a.add(R64[d], 1)?;
                    a.set_label(&mut over)?;
                    a.nop()?;
                    // Taken or not, the flags are defined where they were (the ADD's are).
                    (0, 0)
                }
                22 => {
                    // A fault in the middle: a non-canonical address (#GP, or #SS based on RBP).
                    if rng.below(4) == 0 {
                        a.mov(R64[d], 0x8000_0000_0000_0000u64)?;
                        a.mov(R64[s], qword_ptr(R64[d] + 8))?;
                    } else {
                        a.nop()?;
                    }
                    (0, 0)
                }
                23 => {
                    // A shift by CL (counts past the width are masked; a zero count leaves
                    // the flags).
                    let n = rng.below(72) as u32;
                    a.mov(ecx, n)?;
                    let wide = rng.below(2) == 0;
                    let m = n & if wide { 63 } else { 31 };
                    match (rng.below(3), wide) {
                        (0, true) => a.shl(R64[d], cl)?,
                        (0, false) => a.shl(R32[d], cl)?,
                        (1, true) => a.shr(R64[d], cl)?,
                        (1, false) => a.shr(R32[d], cl)?,
                        (_, true) => a.sar(R64[d], cl)?,
                        (_, false) => a.sar(R32[d], cl)?,
                    }
                    match m {
                        0 => (0, 0),
                        1 => (ALL, AF),
                        _ => (ALL, AF | OF),
                    }
                }
                24 => {
                    // Byte and word operations: they keep the rest of the register.
                    match rng.below(5) {
                        4 => {
                            a.mov(RW[d], word_ptr(r15 + disp))?;
                            (0, 0)
                        }
                        0 => {
                            a.add(RB[d], RB[s])?;
                            (ALL, 0)
                        }
                        1 => {
                            a.mov(RW[d], RW[s])?;
                            (0, 0)
                        }
                        2 => {
                            a.sub(RW[d], rng.below(0x8000) as i32)?;
                            (ALL, 0)
                        }
                        _ => {
                            a.mov(RB[d], RB[s])?;
                            (0, 0)
                        }
                    }
                }
                _ => {
                    a.neg(R64[d])?;
                    (ALL, 0)
                }
            };
            undef = (undef & !writes) | leaves;
            ever |= leaves;
        }
        if looped {
            a.dec(r12)?;
            a.jne(top)?;
            // After the loop: DEC's flags, and CF (never left undefined) from the body.
            undef = 0;
        }
        a.hlt()?;
        Ok(())
    });
    (code, undef, ever)
}

fn emit_setcc(a: &mut CodeAssembler, cc: u32, r: AsmRegister8) -> Result<(), IcedError> {
    match cc {
        0 => a.seto(r),
        1 => a.setno(r),
        2 => a.setb(r),
        3 => a.setae(r),
        4 => a.sete(r),
        5 => a.setne(r),
        6 => a.setbe(r),
        7 => a.seta(r),
        8 => a.sets(r),
        9 => a.setns(r),
        10 => a.setp(r),
        11 => a.setnp(r),
        12 => a.setl(r),
        13 => a.setge(r),
        14 => a.setle(r),
        _ => a.setg(r),
    }
}

fn emit_cmov(
    a: &mut CodeAssembler,
    cc: u32,
    d: AsmRegister64,
    s: AsmRegister64,
) -> Result<(), IcedError> {
    match cc {
        0 => a.cmovo(d, s),
        1 => a.cmovno(d, s),
        2 => a.cmovb(d, s),
        3 => a.cmovae(d, s),
        4 => a.cmove(d, s),
        5 => a.cmovne(d, s),
        6 => a.cmovbe(d, s),
        7 => a.cmova(d, s),
        8 => a.cmovs(d, s),
        9 => a.cmovns(d, s),
        10 => a.cmovp(d, s),
        11 => a.cmovnp(d, s),
        12 => a.cmovl(d, s),
        13 => a.cmovge(d, s),
        14 => a.cmovle(d, s),
        _ => a.cmovg(d, s),
    }
}

fn emit_jcc(a: &mut CodeAssembler, cc: u32, l: CodeLabel) -> Result<(), IcedError> {
    match cc {
        0 => a.jo(l),
        1 => a.jno(l),
        2 => a.jb(l),
        3 => a.jae(l),
        4 => a.je(l),
        5 => a.jne(l),
        6 => a.jbe(l),
        7 => a.ja(l),
        8 => a.js(l),
        9 => a.jns(l),
        10 => a.jp(l),
        11 => a.jnp(l),
        12 => a.jl(l),
        13 => a.jge(l),
        14 => a.jle(l),
        _ => a.jg(l),
    }
}

/// A vCPU with its memory, exception handlers that halt installed.
struct Machine {
    mem: kvmbox_cpu::GuestMemoryMmap,
    vcpu: kvmbox_emu::EmuVcpu,
    _vm: kvmbox_emu::EmuVm,
}

/// What a run leaves: registers, RIP, flags, data, stack, and the code page's tail.
#[derive(PartialEq)]
struct Outcome {
    regs: [u64; 16],
    rip: u64,
    flags: u64,
    data: Vec<u8>,
    stack: Vec<u8>,
    code_tail: Vec<u8>,
}

impl Machine {
    fn new(jit_threshold: u32) -> Machine {
        let (mem, vm, mut vcpu) = long_machine(&[0xf4]);
        // Every exception halts (#GP, or #SS for a stack-segment address).
        for vector in 0..32 {
            set_gate(&mem, vector, GP_HANDLER, 0, 0, false);
        }
        mem.write_slice(&[0xf4], GuestAddress(GP_HANDLER)).unwrap();
        vcpu.set_jit_threshold(jit_threshold);
        Machine { mem, vcpu, _vm: vm }
    }

    fn run(&mut self, code: &[u8], regs: &[u64; 16], flags: u64, data: &[u8]) -> Outcome {
        self.mem.write_slice(code, GuestAddress(CODE)).unwrap();
        self.mem
            .write_slice(&[0u8; 0x800], GuestAddress(CODE + 0x800))
            .unwrap();
        self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
        self.mem
            .write_slice(
                &[0u8; STACK_BYTES as usize],
                GuestAddress(KSTACK - STACK_BYTES),
            )
            .unwrap();
        self.vcpu
            .set_regs(&Regs::from_gprs(*regs, CODE, flags))
            .unwrap();
        // Bounded: a sequence runs at most 40 x 50 instructions, so a broken loop fails here
        // instead of hanging.
        let exit = self
            .vcpu
            .run_steps(&Recorder::default(), 1_000_000)
            .unwrap();
        assert_eq!(
            exit,
            Some(VcpuExit::Halted),
            "rip {:#x} code {code:02x?}",
            self.vcpu.regs().unwrap().rip
        );
        let o = self.vcpu.regs().unwrap();
        let mut data = vec![0u8; DATA_BYTES];
        self.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        let mut stack = vec![0u8; STACK_BYTES as usize];
        self.mem
            .read_slice(&mut stack, GuestAddress(KSTACK - STACK_BYTES))
            .unwrap();
        let mut code_tail = vec![0u8; 0x800];
        self.mem
            .read_slice(&mut code_tail, GuestAddress(CODE + 0x800))
            .unwrap();
        Outcome {
            regs: o.gprs(),
            rip: o.rip,
            flags: o.rflags,
            data,
            stack,
            code_tail,
        }
    }
}

/// Where two outcomes differ, briefly.
fn differences(want: &Outcome, got: &Outcome) -> String {
    let mut d = Vec::new();
    for i in 0..16 {
        if want.regs[i] != got.regs[i] {
            d.push(format!("r{i}: {:#x} vs {:#x}", want.regs[i], got.regs[i]));
        }
    }
    if want.rip != got.rip {
        d.push(format!("rip: {:#x} vs {:#x}", want.rip, got.rip));
    }
    if want.flags != got.flags {
        d.push(format!("flags: {:#x} vs {:#x}", want.flags, got.flags));
    }
    for (name, w, g) in [
        ("data", &want.data, &got.data),
        ("stack", &want.stack, &got.stack),
        ("code page", &want.code_tail, &got.code_tail),
    ] {
        if let Some(at) = (0..w.len()).find(|&i| w[i] != g[i]) {
            d.push(format!(
                "{name} from byte {at:#x}: {:02x?} vs {:02x?}",
                &w[at..(at + 8).min(w.len())],
                &g[at..(at + 8).min(g.len())]
            ));
        }
    }
    format!("interpreter vs JIT: {}", d.join("; "))
}

#[test]
fn jit_matches_the_interpreter_on_random_sequences() {
    let mut interp = Machine::new(0);
    let mut jit = Machine::new(1);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut faults = 0;
    for case in 0..3000 {
        let len = 1 + rng.below(24) as usize;
        let (code, undef_end, undef_ever) = sequence(&mut rng, len);
        let mut regs = [0u64; 16];
        for r in regs.iter_mut() {
            *r = rng.value();
        }
        regs[4] = KSTACK;
        regs[13] = CODE;
        regs[15] = DATA;
        let flags = (rng.next() & ALL) | 2;
        let mut data = vec![0u8; DATA_BYTES];
        for chunk in data.chunks_mut(8) {
            chunk.copy_from_slice(&rng.value().to_le_bytes());
        }
        let want = interp.run(&code, &regs, flags, &data);
        let faulted = want.rip == GP_HANDLER + 1;
        faults += usize::from(faulted);
        // Twice: the first run compiles the blocks (compiled code runs once sealed), the second
        // runs the same code again, compiled.
        for run in 0..2 {
            let mut got = jit.run(&code, &regs, flags, &data);
            // Flags the sequence left undefined may differ (the JIT takes the host's): at its
            // end, or (after a fault) where it faulted, in RFLAGS and in the exception frame.
            let undef = if faulted { undef_ever } else { undef_end };
            got.flags = (got.flags & !undef) | (want.flags & undef);
            if faulted {
                let at = (STACK_BYTES - FRAME_RFLAGS) as usize;
                let w = u64::from_le_bytes(want.stack[at..at + 8].try_into().unwrap());
                let g = u64::from_le_bytes(got.stack[at..at + 8].try_into().unwrap());
                let g = (g & !undef) | (w & undef);
                got.stack[at..at + 8].copy_from_slice(&g.to_le_bytes());
            }
            assert!(
                got == want,
                "case {case}, run {run}: code {code:02x?}: {}",
                differences(&want, &got)
            );
        }
    }
    let s = jit.vcpu.stats();
    println!(
        "JIT: {} blocks compiled, {} of {} instructions in JIT code; {faults} sequences faulted",
        s.jit_blocks, s.jit_instructions, s.instructions
    );
    assert!(faults > 50, "{faults} sequences faulted");
    assert!(s.jit_instructions > s.instructions / 2, "{s:?}");
}

/// The code cache's pages are writable only while code is copied in, then executable: no
/// mapping of the process is ever both (checked after compiling many blocks).
#[test]
fn the_code_cache_is_never_writable_and_executable() {
    let mut m = Machine::new(1);
    let mut rng = Rng(7);
    for _ in 0..200 {
        let (code, ..) = sequence(&mut rng, 12);
        m.run(&code, &[DATA; 16], 2, &[0u8; DATA_BYTES]);
    }
    assert!(m.vcpu.stats().jit_blocks > 100);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let wx: Vec<&str> = maps
        .lines()
        .filter(|l| {
            let perms = l.split_whitespace().nth(1).unwrap_or("");
            perms.contains('w') && perms.contains('x')
        })
        .collect();
    assert!(wx.is_empty(), "writable and executable mappings: {wx:#?}");
}

/// A compiled block goes on in the compiled block its direct branch leads to in the same page
/// (a link) only while that block's bytes are the ones it was compiled from: code in another
/// page rewrites an immediate of the linked-to block halfway through a loop, and the passes
/// after it add the new value, with the JIT as without it.
#[test]
fn a_linked_block_rewritten_from_another_page_runs_its_new_bytes() {
    let patch_at = CODE + 0x1000;
    let looped = |imm_at: u64| {
        asm64(CODE, |a| {
            let mut top = a.create_label();
            let mut b = a.create_label();
            let mut skip = a.create_label();
            a.mov(ecx, 40u32)?;
            a.xor(edx, edx)?;
            a.set_label(&mut top)?;
            a.add(ebx, 1)?;
            a.jmp(b)?;
            a.nop()?;
            a.set_label(&mut b)?;
            a.mov(eax, 0x1111_1111u32)?;
            a.add(edx, eax)?;
            a.cmp(ecx, 20)?;
            a.jne(skip)?;
            // Halfway: the code in the next page rewrites the MOV's immediate.
            a.mov(rsi, imm_at)?;
            a.call(patch_at)?;
            a.set_label(&mut skip)?;
            a.dec(ecx)?;
            a.jne(top)?;
            a.hlt()?;
            Ok(())
        })
    };
    // Where the immediate is.
    let first = looped(0);
    let imm_at = CODE + first.windows(4).position(|w| w == [0x11; 4]).unwrap() as u64;
    let code = looped(imm_at);
    let patch = asm64(patch_at, |a| {
        a.mov(dword_ptr(rsi), 0x2222_2222u32)?;
        a.ret()?;
        Ok(())
    });
    let mut regs = [0u64; 16];
    regs[4] = KSTACK;
    // 21 passes before the rewrite, 19 after.
    let want = (21u64 * 0x1111_1111 + 19 * 0x2222_2222) & 0xffff_ffff;
    let mut stopped = Vec::new();
    for threshold in [0, 1] {
        let mut m = Machine::new(threshold);
        m.mem.write_slice(&patch, GuestAddress(patch_at)).unwrap();
        let o = m.run(&code, &regs, 2, &[0u8; DATA_BYTES]);
        assert_eq!(
            o.regs[2], want,
            "JIT threshold {threshold}: RDX {:#x}",
            o.regs[2]
        );
        assert_eq!(o.regs[3], 40, "JIT threshold {threshold}: RBX");
        // Linked blocks stay within the instructions a run may execute: the loop again (its
        // blocks compiled and linked now), stopped after exactly `steps`.
        for steps in [1, 5, 6, 7, 50, 201] {
            m.mem.write_slice(&code, GuestAddress(CODE)).unwrap();
            m.vcpu.set_regs(&Regs::from_gprs(regs, CODE, 2)).unwrap();
            let before = m.vcpu.stats().instructions;
            let exit = m.vcpu.run_steps(&Recorder::default(), steps).unwrap();
            assert_eq!(
                exit,
                None,
                "JIT threshold {threshold}, {steps} steps: rip {:#x}",
                m.vcpu.regs().unwrap().rip
            );
            assert_eq!(
                m.vcpu.stats().instructions - before,
                steps,
                "JIT threshold {threshold}"
            );
            let r = m.vcpu.regs().unwrap();
            stopped.push((threshold, steps, r.rip, r.gprs()));
        }
    }
    // And where they stopped, the state is the interpreter's.
    let (interp, jit) = stopped.split_at(stopped.len() / 2);
    for (i, j) in interp.iter().zip(jit) {
        assert_eq!((i.2, i.3), (j.2, j.3), "after {} steps", i.1);
    }
}

/// A link into another page makes that page the one whose stores end a block: the loop jumps
/// to the next page, where a block rewrites the immediate of its own next instruction (so the
/// rest of it must run from the new bytes); back in the first page the loop puts the byte
/// back, so the next pass enters that block through its link again, from a chain that began
/// in the first page. With the JIT as without it.
#[test]
fn a_block_entered_through_a_link_from_another_page_sees_stores_into_its_own() {
    let q = CODE + 0x1000;
    let page_q = |imm_at: u64| {
        asm64(q, |a| {
            a.mov(byte_ptr(imm_at), cl)?;
            a.mov(eax, 0x100u32)?;
            a.jmp(CODE + 0x20)?;
            Ok(())
        })
    };
    let first = page_q(0);
    let imm_at = q
        + 1
        + first
            .windows(5)
            .position(|w| w == [0xb8, 0, 1, 0, 0])
            .unwrap() as u64;
    let page_q = page_q(imm_at);
    // CODE: the start; CODE + 0x10: the loop's top (to the next page); CODE + 0x20: where it
    // comes back.
    let parts = [
        asm64(CODE, |a| {
            a.mov(ecx, 30u32)?;
            a.xor(edx, edx)?;
            a.jmp(CODE + 0x10)?;
            Ok(())
        }),
        asm64(CODE + 0x10, |a| {
            a.jmp(q)?;
            Ok(())
        }),
        asm64(CODE + 0x20, |a| {
            a.mov(byte_ptr(imm_at), 0)?;
            a.add(edx, eax)?;
            a.dec(ecx)?;
            a.jne(CODE + 0x10)?;
            a.hlt()?;
            Ok(())
        }),
    ];
    let mut code = vec![0x90u8; 0x40];
    for (i, p) in parts.iter().enumerate() {
        code[0x10 * i..0x10 * i + p.len()].copy_from_slice(p);
    }
    let mut regs = [0u64; 16];
    regs[4] = KSTACK;
    // Each pass adds 0x100 + its count (30 down to 1).
    let want = 30 * 0x100 + (1..=30).sum::<u64>();
    for threshold in [0, 1] {
        let mut m = Machine::new(threshold);
        m.mem.write_slice(&page_q, GuestAddress(q)).unwrap();
        let o = m.run(&code, &regs, 2, &[0u8; DATA_BYTES]);
        assert_eq!(
            o.regs[2], want,
            "JIT threshold {threshold}: RDX {:#x}",
            o.regs[2]
        );
    }
}

/// A page the remapping tests map at `REMAPPED` (16 MiB): first to `FIRST`, then (the guest
/// rewrites its page-table entry and flushes it with INVLPG: `remap`) to `SECOND`.
const REMAPPED: u64 = 0x100_0000;
const FIRST: u64 = 0x180_0000;
const SECOND: u64 = 0x180_2000;

/// The guest's remapping of `REMAPPED` to `SECOND`.
fn remap(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rax, SECOND | 3)?;
    a.mov(qword_ptr(PT), rax)?;
    a.invlpg(byte_ptr(REMAPPED))
}

/// A machine whose page `REMAPPED` maps `FIRST`, holding `first`, and `SECOND` holding
/// `second`.
fn remapping_machine(threshold: u32, first: &[u8], second: &[u8]) -> Machine {
    let m = Machine::new(threshold);
    w64(&m.mem, PD + 8 * 8, PT | 3);
    w64(&m.mem, PT, FIRST | 3);
    m.mem.write_slice(first, GuestAddress(FIRST)).unwrap();
    m.mem.write_slice(second, GuestAddress(SECOND)).unwrap();
    m
}

/// A link into another page follows the page tables: the guest remaps the called page (and
/// flushes it with INVLPG) halfway through a loop, and the calls after it run the new page's
/// code, with the JIT as without it.
#[test]
fn a_link_into_another_page_follows_a_remapping() {
    let callee = |n: u32| {
        asm64(REMAPPED, |a| {
            a.mov(eax, n)?;
            a.ret()?;
            Ok(())
        })
    };
    let code = asm64(CODE, |a| {
        let mut top = a.create_label();
        let mut skip = a.create_label();
        a.xor(edx, edx)?;
        a.mov(ecx, 20u32)?;
        a.set_label(&mut top)?;
        a.call(REMAPPED)?;
        a.add(edx, eax)?;
        a.cmp(ecx, 10)?;
        a.jne(skip)?;
        remap(a)?;
        a.set_label(&mut skip)?;
        a.dec(ecx)?;
        a.jne(top)?;
        a.hlt()?;
        Ok(())
    });
    let mut regs = [0u64; 16];
    regs[4] = KSTACK;
    for threshold in [0, 1] {
        let mut m = remapping_machine(threshold, &callee(1), &callee(2));
        let o = m.run(&code, &regs, 2, &[0u8; DATA_BYTES]);
        // 11 calls before the remapping, 9 after.
        assert_eq!(o.regs[2], 11 + 9 * 2, "JIT threshold {threshold}");
    }
}

/// Code rewritten through guest memory (as a device's DMA or the VMM writes it, not the vCPU)
/// runs its new bytes, though its blocks were compiled and linked: the same loop runs twice,
/// the second time with another immediate, with the JIT as without it.
#[test]
fn code_rewritten_through_guest_memory_runs_its_new_bytes() {
    let looped = |imm: u32| {
        asm64(CODE, |a| {
            let mut top = a.create_label();
            a.mov(ecx, 30u32)?;
            a.xor(edx, edx)?;
            a.set_label(&mut top)?;
            a.call(CODE + 0x100)?;
            a.add(edx, imm)?;
            a.dec(ecx)?;
            a.jne(top)?;
            a.hlt()?;
            Ok(())
        })
    };
    let callee = asm64(CODE + 0x100, |a| {
        a.ret()?;
        Ok(())
    });
    let mut regs = [0u64; 16];
    regs[4] = KSTACK;
    for threshold in [0, 1] {
        let mut m = Machine::new(threshold);
        for imm in [0x1111_1111u32, 0x2222_2222, 0x1111_1111] {
            let mut code = looped(imm);
            code.resize(0x100, 0x90);
            code.extend_from_slice(&callee);
            let o = m.run(&code, &regs, 2, &[0u8; DATA_BYTES]);
            assert_eq!(
                o.regs[2],
                (30 * imm as u64) & 0xffff_ffff,
                "JIT threshold {threshold}, immediate {imm:#x}"
            );
        }
    }
}

/// A return goes on in the compiled block it returns to (the return cache) only while that
/// block's bytes are the ones it was compiled from: halfway through a loop the called code,
/// in another page, rewrites the immediate of the instruction it returns to, and the passes
/// from then on add the new value, with the JIT as without it.
#[test]
fn a_return_into_rewritten_code_runs_its_new_bytes() {
    let callee_at = CODE + 0x1000;
    let looped = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.mov(ecx, 20u32)?;
        a.xor(edx, edx)?;
        a.set_label(&mut top)?;
        a.call(callee_at)?;
        a.add(edx, 0x0101_0101u32)?;
        a.dec(ecx)?;
        a.jne(top)?;
        a.hlt()?;
        Ok(())
    });
    let imm_at = CODE + looped.windows(4).position(|w| w == [1; 4]).unwrap() as u64;
    let callee = asm64(callee_at, |a| {
        let mut back = a.create_label();
        a.cmp(ecx, 10)?;
        a.jne(back)?;
        a.mov(dword_ptr(imm_at), 0x0202_0202u32)?;
        a.set_label(&mut back)?;
        a.ret()?;
        Ok(())
    });
    let mut regs = [0u64; 16];
    regs[4] = KSTACK;
    // Passes with ECX 20 to 11 add the first value, 10 to 1 the second.
    let want = 10 * 0x0101_0101u64 + 10 * 0x0202_0202;
    for threshold in [0, 1] {
        let mut m = Machine::new(threshold);
        m.mem.write_slice(&callee, GuestAddress(callee_at)).unwrap();
        let o = m.run(&looped, &regs, 2, &[0u8; DATA_BYTES]);
        assert_eq!(o.regs[2], want, "JIT threshold {threshold}");
    }
}

/// A return follows the page tables: halfway through a loop the called code remaps the page
/// the loop runs in (and flushes it with INVLPG) to a copy that adds another value, and the
/// return goes on in the copy, with the JIT as without it.
#[test]
fn a_return_follows_a_remapping_of_the_page_it_returns_to() {
    let callee_at = CODE + 0x100;
    let looped = |n: u32| {
        asm64(REMAPPED, |a| {
            let mut top = a.create_label();
            a.set_label(&mut top)?;
            a.call(callee_at)?;
            a.add(edx, n)?;
            a.dec(ecx)?;
            a.jne(top)?;
            a.hlt()?;
            Ok(())
        })
    };
    let mut code = asm64(CODE, |a| {
        a.mov(ecx, 20u32)?;
        a.xor(edx, edx)?;
        a.jmp(REMAPPED)?;
        Ok(())
    });
    code.resize(0x100, 0x90);
    code.extend(asm64(callee_at, |a| {
        let mut back = a.create_label();
        a.cmp(ecx, 10)?;
        a.jne(back)?;
        remap(a)?;
        a.set_label(&mut back)?;
        a.ret()?;
        Ok(())
    }));
    let mut regs = [0u64; 16];
    regs[4] = KSTACK;
    for threshold in [0, 1] {
        let mut m = remapping_machine(threshold, &looped(1), &looped(2));
        let o = m.run(&code, &regs, 2, &[0u8; DATA_BYTES]);
        // Passes with ECX 20 to 11 run the first copy, 10 to 1 the second.
        assert_eq!(o.regs[2], 10 + 10 * 2, "JIT threshold {threshold}");
    }
}

/// Compiled stores to a page that is not RAM (far above it: 512 GiB) reach the device, every
/// one of them, with the JIT as without it.
#[test]
fn compiled_stores_to_a_device_page_far_above_ram_reach_the_device() {
    // The last 2 MiB of the identity-mapped first GiB, remapped to 512 GiB.
    let (v, pa) = (0x3fe0_0000u64, 0x80_0000_0000u64);
    let code = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.mov(ecx, 20u32)?;
        a.mov(rdi, v + 0x10)?;
        a.set_label(&mut top)?;
        a.mov(dword_ptr(rdi), ecx)?;
        a.dec(ecx)?;
        a.jne(top)?;
        a.hlt()?;
        Ok(())
    });
    for threshold in [0, 1] {
        let m = Machine::new(threshold);
        let mut vcpu = m.vcpu;
        w64(&m.mem, PD + 511 * 8, pa | 0x87);
        m.mem.write_slice(&code, GuestAddress(CODE)).unwrap();
        let mut regs = [0u64; 16];
        regs[4] = KSTACK;
        vcpu.set_regs(&Regs::from_gprs(regs, CODE, 2)).unwrap();
        let rec = Recorder::default();
        let exit = vcpu.run_steps(&rec, 1_000_000).unwrap();
        assert_eq!(exit, Some(VcpuExit::Halted), "JIT threshold {threshold}");
        let writes = rec.mmio.lock().unwrap().clone();
        let want: Vec<(u64, Vec<u8>)> = (1..=20u32)
            .rev()
            .map(|n| (pa + 0x10, n.to_le_bytes().to_vec()))
            .collect();
        assert_eq!(writes, want, "JIT threshold {threshold}");
    }
}

/// Instructions without a form of their own run inside blocks through the generic `exec`
/// (locked and plain read-modify-writes, BT on memory, REP STOS ending its block, SSE), with
/// the results of running them one by one, compiled or not; a DIV that faults in the middle of
/// such a block reports its own address.
#[test]
fn instructions_the_generic_exec_runs_inside_blocks_give_their_results() {
    let code = asm64(CODE, |a| {
        let mut top = a.create_label();
        a.mov(ecx, 20u32)?;
        a.xor(ebx, ebx)?;
        a.xor(esi, esi)?;
        a.set_label(&mut top)?;
        a.mov(eax, ecx)?;
        a.lock().xadd(dword_ptr(DATA), eax)?;
        a.add(esi, eax)?;
        a.bt(dword_ptr(DATA + 16), ecx)?;
        a.adc(ebx, 0)?;
        a.movd(xmm0, ecx)?;
        a.pxor(xmm1, xmm1)?;
        a.pcmpeqb(xmm1, xmm0)?;
        a.pmovmskb(eax, xmm1)?;
        a.add(ebx, eax)?;
        a.mov(rdi, DATA + 64)?;
        a.mov(eax, ecx)?;
        a.mov(r8, rcx)?;
        a.mov(ecx, 8u32)?;
        a.rep().stosb()?;
        // A block with one in its middle, ending in a branch that falls through once.
        a.mov(rcx, r8)?;
        a.mov(eax, ecx)?;
        a.mov(edx, 0x100u32)?;
        a.cmpxchg(dword_ptr(DATA + 8), edx)?;
        a.inc(r9d)?;
        a.dec(ecx)?;
        a.jne(top)?;
        // Divides by zero: the handler halts with the frame's RIP this instruction's.
        a.xor(edx, edx)?;
        a.mov(eax, 1u32)?;
        a.div(dword_ptr(DATA + 24))?;
        a.hlt()?;
        Ok(())
    });
    let div_at = CODE + code.len() as u64 - 8;
    let mut data = [0u8; DATA_BYTES];
    data[8..12].copy_from_slice(&7u32.to_le_bytes());
    data[16..20].copy_from_slice(&0x0f0f_0f0fu32.to_le_bytes());
    let mut regs = [0u64; 16];
    regs[4] = KSTACK;
    // XADD: the running sum (each pass's old value the sum of the counts before it); CMPXCHG
    // stores 0x100 when ECX is 7 and then never matches; BT: the set bits of 0x0f0f0f0f among
    // 1..=20 (1-3, 8-11, 16-19); PMOVMSKB: 15 bytes of ECX are zero.
    let sums: u64 = (1..=20u64).sum();
    let before: u64 = (1..=20u64).map(|n| (n + 1..=20).sum::<u64>()).sum();
    let bits = 11;
    let mask = 20 * 0xfffe;
    for threshold in [0, 1] {
        let mut m = Machine::new(threshold);
        let o = m.run(&code, &regs, 2, &data);
        let d = |at: usize| u32::from_le_bytes(o.data[at..at + 4].try_into().unwrap()) as u64;
        assert_eq!(d(0), sums, "JIT threshold {threshold}: XADD");
        assert_eq!(
            o.regs[6], before,
            "JIT threshold {threshold}: XADD's old values"
        );
        assert_eq!(d(8), 0x100, "JIT threshold {threshold}: CMPXCHG");
        assert_eq!(
            o.regs[3],
            bits + mask,
            "JIT threshold {threshold}: BT, PMOVMSKB"
        );
        assert_eq!(
            &o.data[64..72],
            &[1u8; 8],
            "JIT threshold {threshold}: REP STOSB"
        );
        assert_eq!(o.regs[7], DATA + 72, "JIT threshold {threshold}: RDI");
        assert_eq!(o.regs[9], 20, "JIT threshold {threshold}: passes");
        assert_eq!(o.rip, GP_HANDLER + 1, "JIT threshold {threshold}");
        let frame_rip = u64::from_le_bytes(
            o.stack[o.stack.len() - 40..o.stack.len() - 32]
                .try_into()
                .unwrap(),
        );
        assert_eq!(frame_rip, div_at, "JIT threshold {threshold}: #DE's RIP");
    }
}

/// Indirect calls and jumps go on in the compiled block the jump cache links their target to,
/// whichever target each takes, and only while that block's bytes are the ones it was
/// compiled from: a loop calls two functions (whose addresses share an entry of the cache)
/// through a register in turn and jumps back
/// through memory; halfway, it rewrites the immediate of the second function, and the calls
/// after that add the new value, with the JIT as without it.
#[test]
fn indirect_branches_go_to_their_current_target_and_its_current_bytes() {
    // Two targets that share their jump cache entry (`(rip ^ rip >> 10) % 4096`).
    let (f1, f2) = (CODE + 0x1000, CODE + 0x5010);
    let callee = |at: u64, n: u32| {
        asm64(at, |a| {
            a.add(edx, n)?;
            a.ret()?;
            Ok(())
        })
    };
    let imm_at = f2 + 2;
    let top_at = CODE + 0x100;
    let mut code = asm64(CODE, |a| {
        a.mov(ecx, 40u32)?;
        a.xor(edx, edx)?;
        a.jmp(top_at)?;
        Ok(())
    });
    code.resize(0x100, 0x90);
    code.extend(asm64(top_at, |a| {
        let mut skip = a.create_label();
        a.mov(eax, ecx)?;
        a.and(eax, 1)?;
        a.mov(rax, qword_ptr(rax * 8 + DATA))?;
        a.call(rax)?;
        a.cmp(ecx, 20)?;
        a.jne(skip)?;
        a.mov(dword_ptr(imm_at), 0x300u32)?;
        a.set_label(&mut skip)?;
        a.dec(ecx)?;
        a.jz(CODE + 0x7f0)?;
        a.jmp(qword_ptr(DATA + 24))?;
        Ok(())
    }));
    code.resize(0x7f0, 0x90);
    code.push(0xf4);
    let mut data = [0u8; DATA_BYTES];
    data[0..8].copy_from_slice(&f2.to_le_bytes());
    data[8..16].copy_from_slice(&f1.to_le_bytes());
    data[24..32].copy_from_slice(&top_at.to_le_bytes());
    let mut regs = [0u64; 16];
    regs[4] = KSTACK;
    // Odd counts call f1 (1), even ones f2 (0x200 down to the count 20, whose pass rewrites
    // it after the call, then 0x300).
    let want = 20 + 11 * 0x200 + 9 * 0x300;
    for threshold in [0, 1] {
        let mut m = Machine::new(threshold);
        m.mem.write_slice(&callee(f1, 1), GuestAddress(f1)).unwrap();
        m.mem
            .write_slice(&callee(f2, 0x200), GuestAddress(f2))
            .unwrap();
        let o = m.run(&code, &regs, 2, &data);
        assert_eq!(o.regs[2], want, "JIT threshold {threshold}");
    }
}
