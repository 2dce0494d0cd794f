//! The CPUID table a KVM vCPU shows: what KVM supports, with this VM's topology and
//! kvmbox's hypervisor leaves.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const ECX_LEVEL_TYPE_SMT: u32 = 1 << 8;
const ECX_LEVEL_TYPE_CORE: u32 = 2 << 8;

/// Bits needed to number `count` items.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Patch KVM's supported CPUID for vCPU `id` of `count`: one socket, one thread per core,
/// `count` cores, APIC ID = vCPU index.
pub(super) fn patch(
    cpuid: &mut CpuId,
    id: u32,
    count: u32,
    tsc_deadline: bool,
) -> Result<(), String> {
    let core_bits = id_bits(count);
    let is_amd = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0)
        .map(|e| e.ebx == u32::from_le_bytes(*b"Auth"))
        .unwrap_or(false);
    for e in cpuid.as_mut_slice().iter_mut() {
        patch_entry(e, id, count, core_bits, tsc_deadline, is_amd);
    }
    // KVM lists only some subleaves of the extended-topology leaves: rebuild them whole
    // (SMT level, core level, terminating invalid level), as their readers walk the subleaves.
    for leaf in [0xb, 0x1f] {
        let present = cpuid.as_slice().iter().any(|e| e.function == leaf);
        if !present {
            continue;
        }
        cpuid.retain(|e| e.function != leaf);
        for index in 0..3 {
            let mut e = kvm_cpuid_entry2 {
                function: leaf,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            };
            patch_entry(&mut e, id, count, core_bits, tsc_deadline, is_amd);
            cpuid
                .push(e)
                .map_err(|_| format!("no room in the CPUID table for leaf {leaf:#x}"))?;
        }
    }
    Ok(())
}

fn patch_entry(
    e: &mut kvm_cpuid_entry2,
    id: u32,
    count: u32,
    core_bits: u32,
    tsc_deadline: bool,
    is_amd: bool,
) {
    match e.function {
        1 => {
            // EBX: [31:24] initial APIC ID, [23:16] logical processors per package, [15:8] CLFLUSH size.
            e.ebx = (id << 24) | ((count.min(255)) << 16) | (8 << 8);
            e.ecx |= LEAF1_ECX_HYPERVISOR;
            if tsc_deadline {
                e.ecx |= LEAF1_ECX_TSC_DEADLINE;
            }
            if count > 1 {
                e.edx |= LEAF1_EDX_HTT;
            } else {
                e.edx &= !LEAF1_EDX_HTT;
            }
        }
        4 if !is_amd => {
            // Deterministic cache parameters: EAX[31:26] = cores per package - 1, [25:14] =
            // logical processors sharing this cache - 1 (one per core: 0).
            e.eax &= 0x3fff;
            e.eax |= ((1u32 << core_bits) - 1) << 26;
        }
        0xb | 0x1f => {
            e.edx = id;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = ECX_LEVEL_TYPE_SMT;
                }
                1 => {
                    e.eax = core_bits;
                    e.ebx = count;
                    e.ecx = ECX_LEVEL_TYPE_CORE | 1;
                }
                n => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = n & 0xff;
                }
            }
        }
        0x8000_0001 if is_amd => {
            // CmpLegacy: no hyper-threading; the core count comes from 0x80000008.
            e.ecx |= 1 << 1;
        }
        0x8000_0008 if is_amd => {
            // ECX[15:12] ApicIdCoreIdSize, [7:0] cores per package - 1.
            e.ecx = (core_bits << 12) | (count.saturating_sub(1) & 0xff);
        }
        0x8000_001e if is_amd => {
            // Extended APIC ID, compute unit (core) ID, node ID.
            e.eax = id;
            e.ebx = id & 0xff;
            e.ecx = 0;
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }

    #[test]
    fn topology_leaves_describe_the_vm() {
        let mut e = kvm_cpuid_entry2 {
            function: 0xb,
            index: 1,
            ..Default::default()
        };
        patch_entry(&mut e, 3, 4, id_bits(4), false, false);
        assert_eq!((e.eax, e.ebx, e.ecx & 0xff00, e.edx), (2, 4, 2 << 8, 3));
        let mut l1 = kvm_cpuid_entry2 {
            function: 1,
            ..Default::default()
        };
        patch_entry(&mut l1, 2, 4, 2, true, false);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
    }
}
