//! Architectural state of one emulated vCPU: registers, segments with their hidden parts,
//! control registers, MSR-backed state, SSE and x87 state.

use kvmbox_cpu::{DescriptorTable, Segment};

/// Debug-register bits.
pub mod dr {
    /// DR6.B0-B3: which of DR0-DR3 matched.
    pub const DR6_B: u64 = 0xf;
    /// DR6.BD: a MOV DR while DR7.GD was set.
    pub const DR6_BD: u64 = 1 << 13;
    /// DR6.BS: single step.
    pub const DR6_BS: u64 = 1 << 14;
    /// DR7.GD: general detect.
    pub const DR7_GD: u64 = 1 << 13;
}

/// RFLAGS bits.
pub mod flags {
    /// Carry.
    pub const CF: u64 = 1 << 0;
    /// Always-one bit 1.
    pub const FIXED: u64 = 1 << 1;
    /// Parity.
    pub const PF: u64 = 1 << 2;
    /// Auxiliary carry.
    pub const AF: u64 = 1 << 4;
    /// Zero.
    pub const ZF: u64 = 1 << 6;
    /// Sign.
    pub const SF: u64 = 1 << 7;
    /// Trap (single step).
    pub const TF: u64 = 1 << 8;
    /// Interrupt enable.
    pub const IF: u64 = 1 << 9;
    /// Direction.
    pub const DF: u64 = 1 << 10;
    /// Overflow.
    pub const OF: u64 = 1 << 11;
    /// I/O privilege level (2 bits).
    pub const IOPL: u64 = 3 << 12;
    /// Nested task.
    pub const NT: u64 = 1 << 14;
    /// Resume.
    pub const RF: u64 = 1 << 16;
    /// Virtual-8086 mode (never set by this engine).
    pub const VM: u64 = 1 << 17;
    /// Alignment check.
    pub const AC: u64 = 1 << 18;
    /// CPUID-available flag.
    pub const ID: u64 = 1 << 21;
    /// The six arithmetic status flags.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
    /// Bits software can change at all (POPF/IRET further restrict by privilege).
    pub const WRITABLE: u64 = STATUS | TF | IF | DF | IOPL | NT | RF | AC | ID;
}

/// CR0 bits.
pub mod cr0 {
    /// Protection enable.
    pub const PE: u64 = 1 << 0;
    /// Monitor coprocessor.
    pub const MP: u64 = 1 << 1;
    /// x87 emulation.
    pub const EM: u64 = 1 << 2;
    /// Task switched.
    pub const TS: u64 = 1 << 3;
    /// Extension type (hard-wired 1).
    pub const ET: u64 = 1 << 4;
    /// Numeric error.
    pub const NE: u64 = 1 << 5;
    /// Write protect.
    pub const WP: u64 = 1 << 16;
    /// Alignment mask.
    pub const AM: u64 = 1 << 18;
    /// Not write-through.
    pub const NW: u64 = 1 << 29;
    /// Cache disable.
    pub const CD: u64 = 1 << 30;
    /// Paging.
    pub const PG: u64 = 1 << 31;
    /// Bits the guest may set.
    pub const VALID: u64 = PE | MP | EM | TS | ET | NE | WP | AM | NW | CD | PG;
}

/// CR4 bits.
pub mod cr4 {
    /// Time stamp disable (RDTSC privileged).
    pub const TSD: u64 = 1 << 2;
    /// Debugging extensions.
    pub const DE: u64 = 1 << 3;
    /// Page size extensions (4 MiB pages in 32-bit paging).
    pub const PSE: u64 = 1 << 4;
    /// Physical address extension.
    pub const PAE: u64 = 1 << 5;
    /// Machine check enable.
    pub const MCE: u64 = 1 << 6;
    /// Global pages.
    pub const PGE: u64 = 1 << 7;
    /// RDPMC at any privilege.
    pub const PCE: u64 = 1 << 8;
    /// FXSAVE/FXRSTOR and SSE enabled by the OS.
    pub const OSFXSR: u64 = 1 << 9;
    /// Unmasked SSE exceptions supported by the OS.
    pub const OSXMMEXCPT: u64 = 1 << 10;
    /// Bits the guest may set (everything else is #GP).
    pub const VALID: u64 = TSD | DE | PSE | PAE | MCE | PGE | PCE | OSFXSR | OSXMMEXCPT;
}

/// EFER bits.
pub mod efer {
    /// SYSCALL enable.
    pub const SCE: u64 = 1 << 0;
    /// Long mode enable.
    pub const LME: u64 = 1 << 8;
    /// Long mode active (read-only).
    pub const LMA: u64 = 1 << 10;
    /// No-execute enable.
    pub const NXE: u64 = 1 << 11;
    /// Bits the guest may write.
    pub const VALID: u64 = SCE | LME | LMA | NXE;
}

/// Segment register indices as x86 encodes them.
pub mod seg {
    /// ES.
    pub const ES: usize = 0;
    /// CS.
    pub const CS: usize = 1;
    /// SS.
    pub const SS: usize = 2;
    /// DS.
    pub const DS: usize = 3;
    /// FS.
    pub const FS: usize = 4;
    /// GS.
    pub const GS: usize = 5;
}

/// GPR indices.
pub mod gpr {
    /// RAX.
    pub const RAX: usize = 0;
    /// RCX.
    pub const RCX: usize = 1;
    /// RDX.
    pub const RDX: usize = 2;
    /// RBX.
    pub const RBX: usize = 3;
    /// RSP.
    pub const RSP: usize = 4;
    /// RBP.
    pub const RBP: usize = 5;
    /// RSI.
    pub const RSI: usize = 6;
    /// RDI.
    pub const RDI: usize = 7;
    /// R11.
    pub const R11: usize = 11;
}

/// x87 state (kept as FXSAVE stores it: 80-bit registers in 16-byte slots).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct X87 {
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word (one bit per register, 1 = valid).
    pub ftw: u8,
    /// Last opcode.
    pub fop: u16,
    /// Last instruction pointer.
    pub fip: u64,
    /// Last data pointer.
    pub fdp: u64,
    /// ST0..ST7 / MM0..MM7, 80 bits used of each 16-byte slot.
    pub st: [[u8; 16]; 8],
}

impl Default for X87 {
    fn default() -> Self {
        X87 {
            fcw: 0x37f,
            fsw: 0,
            ftw: 0,
            fop: 0,
            fip: 0,
            fdp: 0,
            st: [[0; 16]; 8],
        }
    }
}

/// Everything architectural about one vCPU.
#[derive(Debug, Clone)]
pub struct CpuState {
    /// RAX..R15 in encoding order.
    pub gpr: [u64; 16],
    /// Instruction pointer (offset in CS).
    pub rip: u64,
    /// Flags.
    pub rflags: u64,
    /// ES, CS, SS, DS, FS, GS (see [`seg`]).
    pub seg: [Segment; 6],
    /// Task register.
    pub tr: Segment,
    /// LDT register.
    pub ldtr: Segment,
    /// GDTR.
    pub gdtr: DescriptorTable,
    /// IDTR.
    pub idtr: DescriptorTable,
    /// CR0.
    pub cr0: u64,
    /// CR2 (last page-fault address).
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8 (task priority).
    pub cr8: u64,
    /// EFER.
    pub efer: u64,
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// DR0..DR3, DR6, DR7 (DR4/DR5 unused: they alias DR6/DR7). DR7's instruction and data
    /// breakpoints and GD are implemented, I/O breakpoints are not.
    pub dr: [u64; 8],
    /// STAR.
    pub star: u64,
    /// LSTAR.
    pub lstar: u64,
    /// CSTAR.
    pub cstar: u64,
    /// SFMASK.
    pub sfmask: u64,
    /// KERNEL_GS_BASE (swapped with GS.base by SWAPGS).
    pub kernel_gs_base: u64,
    /// SYSENTER_CS/ESP/EIP (stored only).
    pub sysenter: [u64; 3],
    /// IA32_PAT.
    pub pat: u64,
    /// TSC_AUX (RDTSCP's ECX).
    pub tsc_aux: u64,
    /// Guest TSC minus host TSC.
    pub tsc_offset: u64,
    /// AMD legacy PerfEvtSel0-3 and PerfCtr0-3 (stored; they never count).
    pub k7_perf: [u64; 8],
    /// MSR_KVM_SYSTEM_TIME_NEW as the guest last wrote it: GPA of this vCPU's kvm-clock
    /// record, bit 0 = enabled (see `crate::pvclock`).
    pub kvm_system_time: u64,
    /// MSR_KVM_WALL_CLOCK_NEW as the guest last wrote it (GPA of the wall-clock record).
    pub kvm_wall_clock: u64,
    /// XMM0..XMM15.
    pub xmm: [u128; 16],
    /// MXCSR.
    pub mxcsr: u32,
    /// x87 state.
    pub x87: X87,
}

impl Default for CpuState {
    fn default() -> Self {
        let mut s = CpuState {
            gpr: [0; 16],
            rip: 0,
            rflags: flags::FIXED,
            seg: [Segment::default(); 6],
            tr: Segment::default(),
            ldtr: Segment::default(),
            gdtr: DescriptorTable::default(),
            idtr: DescriptorTable::default(),
            cr0: cr0::ET | cr0::CD | cr0::NW,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            apic_base: 0xfee0_0000 | (1 << 11),
            dr: [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400],
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            kernel_gs_base: 0,
            sysenter: [0; 3],
            pat: 0x0007_0406_0007_0406,
            tsc_aux: 0,
            tsc_offset: 0,
            k7_perf: [0; 8],
            kvm_system_time: 0,
            kvm_wall_clock: 0,
            xmm: [0; 16],
            mxcsr: 0x1f80,
            x87: X87::default(),
        };
        s.reset_segments();
        s
    }
}

impl CpuState {
    /// Segment state after RESET/INIT: real mode, CS base 0xffff0000.
    pub fn reset_segments(&mut self) {
        let data = Segment {
            base: 0,
            limit: 0xffff,
            selector: 0,
            type_: 3,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: false,
            g: false,
            avl: false,
            unusable: false,
        };
        for s in self.seg.iter_mut() {
            *s = data;
        }
        self.seg[seg::CS] = Segment {
            base: 0xffff_0000,
            selector: 0xf000,
            type_: 0xb,
            ..data
        };
        self.tr = Segment {
            type_: 0xb,
            s: false,
            ..data
        };
        self.ldtr = Segment {
            type_: 2,
            s: false,
            ..data
        };
        self.gdtr = DescriptorTable {
            base: 0,
            limit: 0xffff,
        };
        self.idtr = DescriptorTable {
            base: 0,
            limit: 0xffff,
        };
    }

    /// Current privilege level.
    #[inline]
    pub fn cpl(&self) -> u8 {
        if self.cr0 & cr0::PE == 0 {
            0
        } else {
            self.seg[seg::CS].dpl & 3
        }
    }

    /// Long mode active.
    #[inline]
    pub fn long_mode(&self) -> bool {
        self.efer & efer::LMA != 0
    }

    /// Executing 64-bit code (long mode with CS.L).
    #[inline]
    pub fn mode64(&self) -> bool {
        self.long_mode() && self.seg[seg::CS].l
    }

    /// Default code size in bits (16, 32 or 64).
    #[inline]
    pub fn code_bits(&self) -> u32 {
        if self.mode64() {
            64
        } else if self.cr0 & cr0::PE != 0 && self.seg[seg::CS].db {
            32
        } else {
            16
        }
    }

    /// Stack address width in bits.
    #[inline]
    pub fn stack_bits(&self) -> u32 {
        if self.mode64() {
            64
        } else if self.seg[seg::SS].db {
            32
        } else {
            16
        }
    }

    /// Current I/O privilege level.
    #[inline]
    pub fn iopl(&self) -> u8 {
        ((self.rflags >> 12) & 3) as u8
    }
}
