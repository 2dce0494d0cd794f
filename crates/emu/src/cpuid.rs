//! The engine's CPU model: CPUID lists exactly what the engine implements.

use crate::cpu::Cpu;
use kvmbox_cpu::CpuidEntry;

/// Hypervisor signature in leaf 0x40000000 (EBX, ECX, EDX).
pub const HYPERVISOR_SIGNATURE: &[u8; 12] = b"KVMBOXEMU\0\0\0";
/// Vendor string (leaf 0).
pub const VENDOR: &[u8; 12] = b"AuthenticAMD";
const BRAND: &[u8; 48] = b"kvmbox software x86-64 CPU engine\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

fn le3(s: &[u8]) -> [u32; 3] {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    [w(0), w(4), w(8)]
}

/// Leaf 1 EDX: FPU PSE TSC MSR PAE CX8 [APIC] PGE CMOV PAT CLFSH FXSR SSE SSE2 [HTT].
const L1_EDX: u32 = 1
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 13)
    | (1 << 15)
    | (1 << 16)
    | (1 << 19)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);
/// Leaf 1 ECX: CX16, POPCNT, hypervisor.
const L1_ECX: u32 = (1 << 13) | (1 << 23) | (1 << 31);
/// 0x80000001 EDX: SYSCALL NX Page1GB RDTSCP LM.
const E1_EDX: u32 = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29);
/// 0x80000001 ECX: LAHF/SAHF in 64-bit mode.
const E1_ECX: u32 = 1;

/// Build the CPUID table for vCPU `id` of `count`; `apic` says whether an interrupt
/// controller (local APIC) is attached, `kvm_clock` whether the engine offers kvm-clock
/// (then leaves 0x4000_0000/1 are KVM's, see [`crate::pvclock`]). `overrides` replace or add
/// entries (matched by leaf and, when significant, subleaf); the maximum-leaf values follow
/// the entries present.
pub fn build(
    id: u32,
    count: u32,
    apic: bool,
    kvm_clock: bool,
    overrides: &[CpuidEntry],
) -> Vec<CpuidEntry> {
    let mut t = base_table(id, count, apic);
    if kvm_clock {
        t.retain(|e| e.function != 0x4000_0000);
        t.extend(crate::pvclock::KvmClock::cpuid_leaves());
    }
    for o in overrides {
        match t
            .iter_mut()
            .find(|e| e.function == o.function && (!o.significant_index || e.index == o.index))
        {
            Some(e) => *e = *o,
            None => t.push(*o),
        }
    }
    for base in [0u32, 0x4000_0000, 0x8000_0000] {
        let top = t
            .iter()
            .filter(|e| e.function >= base && e.function < base.wrapping_add(0x1000_0000))
            .map(|e| e.function)
            .max();
        if let (Some(top), Some(e)) = (top, t.iter_mut().find(|e| e.function == base)) {
            e.eax = e.eax.max(top);
        }
    }
    t
}

fn base_table(id: u32, count: u32, apic: bool) -> Vec<CpuidEntry> {
    let e = |function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32| CpuidEntry {
        function,
        index: 0,
        significant_index: false,
        eax,
        ebx,
        ecx,
        edx,
    };
    let v = le3(VENDOR);
    let h = le3(HYPERVISOR_SIGNATURE);
    let count = count.clamp(1, 255);
    let mut edx1 = L1_EDX;
    if apic {
        edx1 |= 1 << 9;
    }
    if count > 1 {
        edx1 |= 1 << 28;
    }
    // Family 15, model 107, stepping 1 (as QEMU's qemu64 model, which Linux knows well).
    let sig = (0xf << 8) | (0x6 << 16) | (0xb << 4) | 1;
    let ebx1 = (8 << 8) | (count << 16) | ((id & 0xff) << 24);
    let mut ecx_e1 = E1_ECX;
    if count > 1 {
        ecx_e1 |= 1 << 1; // CmpLegacy
    }
    let mut t = vec![
        e(0, 1, v[0], v[2], v[1]),
        e(1, sig, ebx1, L1_ECX, edx1),
        e(0x4000_0000, 0x4000_0000, h[0], h[1], h[2]),
        e(0x8000_0000, 0x8000_0008, v[0], v[2], v[1]),
        e(0x8000_0001, sig, 0, ecx_e1, E1_EDX),
    ];
    for i in 0..3u32 {
        let b = &BRAND[i as usize * 16..i as usize * 16 + 16];
        let w = |k: usize| u32::from_le_bytes([b[k], b[k + 1], b[k + 2], b[k + 3]]);
        t.push(e(0x8000_0002 + i, w(0), w(4), w(8), w(12)));
    }
    t.push(e(0x8000_0005, 0, 0, 0, 0));
    t.push(e(0x8000_0006, 0, 0, 0, 0));
    t.push(e(0x8000_0007, 0, 0, 0, 0));
    // Physical 40 bits, linear 48; NC = count - 1.
    t.push(e(
        0x8000_0008,
        (48 << 8) | crate::mmu::MAXPHYADDR,
        0,
        count - 1,
        0,
    ));
    t
}

impl Cpu {
    /// CPUID as the guest sees it (leaves outside the table read as zero, as on AMD).
    pub(crate) fn cpuid_query(&self, leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
        for e in &self.cpuid {
            if e.function == leaf && (!e.significant_index || e.index == sub) {
                return (e.eax, e.ebx, e.ecx, e.edx);
            }
        }
        (0, 0, 0, 0)
    }
}
