//! The whole state of one vCPU as plain data, the same shape on every backend, so a vCPU
//! saved on one engine restores on the other ([`crate::Vcpu::save_state`] /
//! [`crate::Vcpu::restore_state`]).

use crate::{CpuidEntry, Regs, SpecialRegs};
use serde::{Deserialize, Serialize};

/// Size of the legacy FXSAVE area (x87, MXCSR, XMM0-15).
pub const FXSAVE_SIZE: usize = 512;
/// Size of the local APIC register page saved with a vCPU (KVM's `kvm_lapic_state`).
pub const LAPIC_PAGE_SIZE: usize = 1024;

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE (the LAPIC timer in TSC-deadline mode).
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The fields of an FXSAVE image (64-bit format), to build or read one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fxsave {
    /// x87 control word.
    pub fcw: u16,
    /// x87 status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftw: u8,
    /// Last x87 opcode.
    pub fop: u16,
    /// Last x87 instruction pointer.
    pub fip: u64,
    /// Last x87 data pointer.
    pub fdp: u64,
    /// MXCSR.
    pub mxcsr: u32,
    /// ST0-ST7 / MM0-MM7 in 16-byte slots.
    pub st: [[u8; 16]; 8],
    /// XMM0-XMM15.
    pub xmm: [[u8; 16]; 16],
}

impl Fxsave {
    /// The [`FXSAVE_SIZE`]-byte image.
    pub fn to_image(&self) -> Vec<u8> {
        let mut b = vec![0u8; FXSAVE_SIZE];
        b[0..2].copy_from_slice(&self.fcw.to_le_bytes());
        b[2..4].copy_from_slice(&self.fsw.to_le_bytes());
        b[4] = self.ftw;
        b[6..8].copy_from_slice(&self.fop.to_le_bytes());
        b[8..16].copy_from_slice(&self.fip.to_le_bytes());
        b[16..24].copy_from_slice(&self.fdp.to_le_bytes());
        b[24..28].copy_from_slice(&self.mxcsr.to_le_bytes());
        b[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        for (i, r) in self.st.iter().enumerate() {
            b[32 + i * 16..48 + i * 16].copy_from_slice(r);
        }
        for (i, r) in self.xmm.iter().enumerate() {
            b[160 + i * 16..176 + i * 16].copy_from_slice(r);
        }
        b
    }

    /// Read an image (an XSAVE area's first 512 bytes are one too).
    pub fn from_image(b: &[u8]) -> std::result::Result<Self, String> {
        if b.len() < FXSAVE_SIZE {
            return Err(format!(
                "FXSAVE image of {} bytes, expected {FXSAVE_SIZE}",
                b.len()
            ));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        let slot = |o: usize| {
            let mut v = [0u8; 16];
            v.copy_from_slice(&b[o..o + 16]);
            v
        };
        Ok(Fxsave {
            fcw: u16_at(0),
            fsw: u16_at(2),
            ftw: b[4],
            fop: u16_at(6),
            fip: u64_at(8),
            fdp: u64_at(16),
            mxcsr: u32_at(24),
            st: std::array::from_fn(|i| slot(32 + i * 16)),
            xmm: std::array::from_fn(|i| slot(160 + i * 16)),
        })
    }
}

/// Where a vCPU is in its life besides running instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MpState {
    /// Running (or ready to run).
    Runnable,
    /// Stopped by HLT until an interrupt arrives.
    Halted,
    /// An application processor waiting for INIT/SIPI (never started, or after INIT).
    WaitForSipi,
}

/// An exception the vCPU was about to deliver (KVM holds these across exits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingException {
    /// Vector.
    pub vector: u8,
    /// The error code it pushes, if any.
    pub error_code: Option<u32>,
    /// Already being injected (true) or only pending (false).
    pub injected: bool,
}

/// An interrupt the vCPU was in the middle of injecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectedInterrupt {
    /// Vector.
    pub vector: u8,
    /// A software interrupt (INTn) rather than an external one.
    pub soft: bool,
}

/// Events between instructions: pending exceptions and interrupts, shadows, NMI state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuEvents {
    /// Exception pending or being injected.
    pub exception: Option<PendingException>,
    /// Interrupt being injected.
    pub interrupt: Option<InjectedInterrupt>,
    /// Interrupt shadow (after STI or MOV SS): interrupts wait one instruction.
    pub interrupt_shadow: bool,
    /// An NMI is being injected.
    pub nmi_injected: bool,
    /// An NMI is pending.
    pub nmi_pending: bool,
    /// NMIs are blocked (inside an NMI handler, until IRET).
    pub nmi_masked: bool,
}

/// The local APIC: its register page as the xAPIC MMIO page shows it (including the timer's
/// initial and current count and divide configuration; IA32_TSC_DEADLINE is in the MSRs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LapicState {
    /// [`LAPIC_PAGE_SIZE`] bytes.
    pub regs: Vec<u8>,
}

impl LapicState {
    /// The 32-bit register at page offset `off`.
    pub fn reg(&self, off: usize) -> u32 {
        self.regs
            .get(off..off + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Set the 32-bit register at page offset `off`.
    pub fn set_reg(&mut self, off: usize, v: u32) {
        if let Some(b) = self.regs.get_mut(off..off + 4) {
            b.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Everything about one vCPU that the guest can observe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: Regs,
    /// Segment, descriptor-table and control registers, EFER, APIC base.
    pub sregs: SpecialRegs,
    /// DR0-DR3, DR6, DR7.
    pub debugregs: [u64; 6],
    /// x87/MMX/SSE state as FXSAVE stores it ([`FXSAVE_SIZE`] bytes).
    pub fxsave: Vec<u8>,
    /// The full XSAVE area where the backend has one (KVM); its first 512 bytes repeat
    /// `fxsave`. A backend without XSAVE restores from `fxsave` alone.
    pub xsave: Option<Vec<u8>>,
    /// Extended control registers (XCR0), index and value.
    pub xcrs: Vec<(u32, u64)>,
    /// Model-specific registers, index and value, sorted by index. Includes IA32_TSC and
    /// IA32_TSC_DEADLINE.
    pub msrs: Vec<(u32, u64)>,
    /// Pending and injected events.
    pub events: VcpuEvents,
    /// Running, halted or waiting for SIPI.
    pub mp_state: MpState,
    /// The local APIC.
    pub lapic: LapicState,
    /// The CPUID table the guest saw: a restore target must be able to show the same.
    pub cpuid: Vec<CpuidEntry>,
}

impl VcpuState {
    /// The value of MSR `index`, if saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.0 == index).map(|m| m.1)
    }

    /// Set (or add) MSR `index`, keeping the list sorted.
    pub fn set_msr(&mut self, index: u32, value: u64) {
        match self.msrs.binary_search_by_key(&index, |m| m.0) {
            Ok(i) => self.msrs[i].1 = value,
            Err(i) => self.msrs.insert(i, (index, value)),
        }
    }

    /// The guest TSC at the moment of saving.
    pub fn tsc(&self) -> u64 {
        self.msr(MSR_IA32_TSC).unwrap_or(0)
    }
}

/// Feature registers: (leaf, subleaf, register).
const FEATURES: &[(u32, u32, char)] = &[
    (1, 0, 'c'),
    (1, 0, 'd'),
    (7, 0, 'b'),
    (7, 0, 'c'),
    (7, 0, 'd'),
    (0xd, 1, 'a'),
    (0x8000_0001, 0, 'c'),
    (0x8000_0001, 0, 'd'),
];

fn reg(e: &mut CpuidEntry, r: char) -> &mut u32 {
    match r {
        'a' => &mut e.eax,
        'b' => &mut e.ebx,
        'c' => &mut e.ecx,
        _ => &mut e.edx,
    }
}

/// Feature bits that describe the vCPU's state or the platform (OSXSAVE, hypervisor
/// present, TSC-deadline timer: every kvmbox backend has one; HTT: more than one vCPU)
/// rather than a CPU capability.
fn platform_bits(leaf: u32, r: char) -> u32 {
    match (leaf, r) {
        (1, 'c') => (1 << 27) | (1 << 31) | (1 << 24),
        (1, 'd') => 1 << 28,
        _ => 0,
    }
}

/// The portable CPU model: the engine's CPUID table `engine` with every feature that KVM
/// (`kvm_supported`, its KVM_GET_SUPPORTED_CPUID) cannot offer removed, so a guest started
/// with it on either backend can be moved to the other.
pub fn portable_cpuid(engine: &[CpuidEntry], kvm_supported: &[CpuidEntry]) -> Vec<CpuidEntry> {
    let mut t = engine.to_vec();
    for &(f, i, r) in FEATURES {
        let offered = kvm_supported
            .iter()
            .find(|e| e.function == f && (!e.significant_index || e.index == i))
            .map_or(0, |e| *reg(&mut e.clone(), r));
        for e in t
            .iter_mut()
            .filter(|e| e.function == f && (!e.significant_index || e.index == i))
        {
            *reg(e, r) &= offered | platform_bits(f, r);
        }
    }
    t
}

/// Check that a vCPU offering the features in `target` can show a guest the table `saved`:
/// every feature bit the guest saw must be offered. (Vendor, family and model strings are
/// whatever the saved table says: the restored vCPU shows the saved table itself.) Returns
/// what is missing.
pub fn check_cpuid_compatible(
    saved: &[CpuidEntry],
    target: &[CpuidEntry],
) -> std::result::Result<(), String> {
    let find = |t: &[CpuidEntry], f: u32, i: u32| {
        t.iter()
            .find(|e| e.function == f && (!e.significant_index || e.index == i))
            .copied()
    };
    for &(f, i, r) in FEATURES {
        let Some(s) = find(saved, f, i) else { continue };
        let t = find(target, f, i).unwrap_or(CpuidEntry {
            function: f,
            index: i,
            ..Default::default()
        });
        let need = *reg(&mut s.clone(), r) & !platform_bits(f, r);
        let missing = need & !*reg(&mut t.clone(), r);
        if missing != 0 {
            return Err(format!(
                "CPUID.{f:#x}.{i}:e{r}x bits {missing:#x} that the guest saw are not offered here"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, ecx: u32, edx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn cpuid_check_refuses_missing_features_and_accepts_subsets() {
        let saved = vec![leaf(0, 1, 2), leaf(1, 0b0101, 0)];
        let more = vec![leaf(0, 1, 2), leaf(1, 0b1111, 0)];
        let less = vec![leaf(0, 1, 2), leaf(1, 0b0001, 0)];
        assert_eq!(check_cpuid_compatible(&saved, &more), Ok(()));
        let err = check_cpuid_compatible(&saved, &less).unwrap_err();
        assert!(err.contains("0x1.0:ecx bits 0x4"), "{err}");
        let no_ext = vec![leaf(0, 1, 2), leaf(1, 0b0101, 0)];
        let with_ext = vec![leaf(0x8000_0001, 0, 1 << 29)];
        assert!(check_cpuid_compatible(&with_ext, &no_ext)
            .unwrap_err()
            .contains("0x80000001.0:edx bits 0x20000000"));
    }

    #[test]
    fn fxsave_image_round_trips() {
        let f = Fxsave {
            fcw: 0x27f,
            fsw: 0x3800,
            ftw: 0x81,
            fop: 0x55,
            fip: 0x1234_5678_9abc,
            fdp: 0xdead_beef_0000,
            mxcsr: 0x1fc0,
            st: std::array::from_fn(|i| [i as u8; 16]),
            xmm: std::array::from_fn(|i| [0x80 | i as u8; 16]),
        };
        let img = f.to_image();
        assert_eq!(img.len(), FXSAVE_SIZE);
        assert_eq!(Fxsave::from_image(&img), Ok(f));
        assert!(Fxsave::from_image(&img[..100]).is_err());
    }

    #[test]
    fn portable_model_is_what_both_offer() {
        let engine = vec![leaf(0, 1, 2), leaf(1, 0b0111 | 1 << 31, 0b1)];
        let kvm = vec![leaf(1, 0b1100, 0b11)];
        let p = portable_cpuid(&engine, &kvm);
        assert_eq!(p[1].ecx, 0b0100 | 1 << 31);
        assert_eq!(p[1].edx, 0b1);
        assert_eq!(check_cpuid_compatible(&p, &kvm), Ok(()));
        assert_eq!(check_cpuid_compatible(&p, &engine), Ok(()));
    }

    #[test]
    fn msrs_stay_sorted() {
        let mut s = VcpuState {
            regs: Regs::default(),
            sregs: SpecialRegs::default(),
            debugregs: [0; 6],
            fxsave: vec![0; FXSAVE_SIZE],
            xsave: None,
            xcrs: Vec::new(),
            msrs: Vec::new(),
            events: VcpuEvents::default(),
            mp_state: MpState::Runnable,
            lapic: LapicState {
                regs: vec![0; LAPIC_PAGE_SIZE],
            },
            cpuid: Vec::new(),
        };
        s.set_msr(0x6e0, 5);
        s.set_msr(MSR_IA32_TSC, 7);
        s.set_msr(0x6e0, 6);
        assert_eq!(s.msrs, vec![(0x10, 7), (0x6e0, 6)]);
        assert_eq!(s.tsc(), 7);
        s.lapic.set_reg(0x380, 0x1234);
        assert_eq!(s.lapic.reg(0x380), 0x1234);
    }
}
