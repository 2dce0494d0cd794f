//! A KVM vCPU's state as [`VcpuState`]: registers, FPU/XSAVE, XCRs, debug registers, the MSRs
//! KVM lists, vCPU events, MP state and the in-kernel local APIC page.

use super::kvm_err;
use crate::state::{
    Fxsave, InjectedInterrupt, LapicState, MpState, PendingException, VcpuEvents, FXSAVE_SIZE,
    LAPIC_PAGE_SIZE,
};
use crate::{CpuidEntry, Error, Result, VcpuState};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_vcpu_events, kvm_xcr, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_UNINITIALIZED, KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SHADOW,
};
use kvm_ioctls::VcpuFd;

/// XSTATE_BV (which components the XSAVE area holds) is the first dword after the legacy
/// 512-byte region.
const XSTATE_BV_WORD: usize = 512 / 4;
/// XSTATE_BV bits of the x87 and SSE components.
const XSTATE_X87: u32 = 1;
const XSTATE_SSE: u32 = 2;

/// KVM_X86_SHADOW_INT_STI: the interrupt shadow of an STI.
const SHADOW_STI: u8 = 2;

/// MSRs that KVM lists but that are read-only or not state (writing them back fails).
const SKIPPED_MSRS: &[u32] = &[
    0x8b,  // IA32_BIOS_SIGN_ID (microcode revision)
    0x345, // IA32_PERF_CAPABILITIES (a capability)
];

/// Read every MSR in `list` that KVM lets this vCPU read (some listed MSRs depend on CPUID
/// features the guest does not have: KVM stops at the first such; skip it and go on).
pub(super) fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest: Vec<u32> = list
        .iter()
        .copied()
        .filter(|i| !SKIPPED_MSRS.contains(i))
        .collect();
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| Error::Unsupported("too many MSRs in one call".into()))?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // Entry `n` could not be read: drop it.
        rest.drain(..(n + 1).min(rest.len()));
    }
    out.sort_unstable_by_key(|m| m.0);
    Ok(out)
}

/// Write MSRs; an MSR KVM refuses is an error naming it.
pub(super) fn write_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<()> {
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let table = Msrs::from_entries(&entries)
        .map_err(|_| Error::Unsupported("too many MSRs in one call".into()))?;
    let written = fd.set_msrs(&table).map_err(kvm_err("KVM_SET_MSRS"))?;
    if written != entries.len() {
        return Err(Error::Unsupported(format!(
            "KVM refused value {:#x} for MSR {:#x}",
            entries[written].data, entries[written].index
        )));
    }
    Ok(())
}

fn fxsave_from_fpu(f: &kvm_fpu) -> Vec<u8> {
    Fxsave {
        fcw: f.fcw,
        fsw: f.fsw,
        ftw: f.ftwx,
        fop: f.last_opcode,
        fip: f.last_ip,
        fdp: f.last_dp,
        mxcsr: f.mxcsr,
        st: f.fpr,
        xmm: f.xmm,
    }
    .to_image()
}

fn fpu_from_fxsave(b: &[u8]) -> Result<kvm_fpu> {
    let f = Fxsave::from_image(b).map_err(Error::Unsupported)?;
    Ok(kvm_fpu {
        fpr: f.st,
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: f.ftw,
        last_opcode: f.fop,
        last_ip: f.fip,
        last_dp: f.fdp,
        xmm: f.xmm,
        mxcsr: f.mxcsr,
        ..Default::default()
    })
}

fn events_from_kvm(e: &kvm_vcpu_events) -> VcpuEvents {
    let x = &e.exception;
    let i = &e.interrupt;
    VcpuEvents {
        exception: (x.injected != 0 || x.pending != 0).then_some(PendingException {
            vector: x.nr,
            error_code: (x.has_error_code != 0).then_some(x.error_code),
            injected: x.injected != 0,
        }),
        interrupt: (i.injected != 0).then_some(InjectedInterrupt {
            vector: i.nr,
            soft: i.soft != 0,
        }),
        interrupt_shadow: i.shadow != 0,
        nmi_injected: e.nmi.injected != 0,
        nmi_pending: e.nmi.pending != 0,
        nmi_masked: e.nmi.masked != 0,
    }
}

fn events_to_kvm(e: &VcpuEvents) -> kvm_vcpu_events {
    let mut k = kvm_vcpu_events {
        flags: KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW,
        ..Default::default()
    };
    if let Some(x) = e.exception {
        // Without KVM_CAP_EXCEPTION_PAYLOAD KVM takes every exception as injected.
        k.exception.injected = 1;
        k.exception.nr = x.vector;
        k.exception.has_error_code = u8::from(x.error_code.is_some());
        k.exception.error_code = x.error_code.unwrap_or(0);
    }
    if let Some(i) = e.interrupt {
        k.interrupt.injected = 1;
        k.interrupt.nr = i.vector;
        k.interrupt.soft = u8::from(i.soft);
    }
    k.interrupt.shadow = if e.interrupt_shadow { SHADOW_STI } else { 0 };
    k.nmi.injected = u8::from(e.nmi_injected);
    k.nmi.pending = u8::from(e.nmi_pending);
    k.nmi.masked = u8::from(e.nmi_masked);
    k
}

fn mp_state_from_kvm(m: u32) -> MpState {
    match m {
        KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => MpState::WaitForSipi,
        KVM_MP_STATE_HALTED => MpState::Halted,
        _ => MpState::Runnable,
    }
}

fn mp_state_to_kvm(m: MpState) -> u32 {
    match m {
        MpState::WaitForSipi => KVM_MP_STATE_UNINITIALIZED,
        MpState::Halted => KVM_MP_STATE_HALTED,
        MpState::Runnable => KVM_MP_STATE_RUNNABLE,
    }
}

/// The CPUID table in KVM's form.
pub(super) fn cpuid_to_kvm(entries: &[CpuidEntry]) -> Result<CpuId> {
    let kvm: Vec<kvm_cpuid_entry2> = entries
        .iter()
        .map(|e| kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: if e.significant_index {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    CpuId::from_entries(&kvm).map_err(|_| Error::Unsupported("CPUID table too large".into()))
}

/// Read everything but the CPUID (the caller knows the table it set).
pub(super) fn save(
    fd: &VcpuFd,
    msr_list: &[u32],
    cpuid: Vec<CpuidEntry>,
    regs: crate::Regs,
    sregs: crate::SpecialRegs,
) -> Result<VcpuState> {
    let fpu = fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?;
    let xsave = fd.get_xsave().ok().map(|x: kvm_xsave| {
        x.region
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect::<Vec<u8>>()
    });
    let xcrs = match fd.get_xcrs() {
        Ok(x) => x.xcrs[..(x.nr_xcrs as usize).min(x.xcrs.len())]
            .iter()
            .map(|x| (x.xcr, x.value))
            .collect(),
        Err(_) => Vec::new(),
    };
    let d = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let events = fd
        .get_vcpu_events()
        .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    let mp = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    let lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, msr_list)?;
    Ok(VcpuState {
        regs,
        sregs,
        debugregs: [d.db[0], d.db[1], d.db[2], d.db[3], d.dr6, d.dr7],
        // The XSAVE area's legacy region is an FXSAVE image as the CPU wrote it (some KVMs
        // leave KVM_GET_FPU's MXCSR at 0); KVM_GET_FPU is for hosts without XSAVE.
        fxsave: match &xsave {
            Some(x) => x[..FXSAVE_SIZE].to_vec(),
            None => fxsave_from_fpu(&fpu),
        },
        xsave,
        xcrs,
        msrs,
        events: events_from_kvm(&events),
        mp_state: mp_state_from_kvm(mp.mp_state),
        lapic: LapicState {
            regs: lapic.regs.iter().map(|&b| b as u8).collect(),
        },
        cpuid,
    })
}

/// Load `s` (CPUID, registers and segments already set by the caller).
pub(super) fn restore(fd: &VcpuFd, s: &VcpuState) -> Result<()> {
    // The FXSAVE image is the x87/SSE state on every backend; the XSAVE area (KVM only)
    // adds the extended components. Load both through KVM_SET_XSAVE where KVM has it, with
    // the legacy region taken from the FXSAVE image and marked in use (XSTATE_BV bits 0-1),
    // so state saved by the engine or by KVM_GET_FPU is not lost to an "init" XSTATE_BV.
    let fpu = fpu_from_fxsave(&s.fxsave)?;
    match fd.get_xsave() {
        Ok(mut area) => {
            let saved = s
                .xsave
                .as_deref()
                .filter(|x| x.len() == std::mem::size_of::<kvm_xsave>());
            if let Some(x) = saved {
                for (w, b) in area.region.iter_mut().zip(x.chunks_exact(4)) {
                    *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            for (w, b) in area.region.iter_mut().zip(s.fxsave.chunks_exact(4)) {
                *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            area.region[XSTATE_BV_WORD] |= XSTATE_X87 | XSTATE_SSE;
            // SAFETY: `area` is a complete kvm_xsave as KVM_GET_XSAVE returned it, of the
            // size KVM_SET_XSAVE reads (the legacy 4 KiB area).
            unsafe { fd.set_xsave(&area) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        }
        Err(_) => fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?,
    }
    if !s.xcrs.is_empty() {
        let mut x = kvm_xcrs {
            nr_xcrs: s.xcrs.len().min(16) as u32,
            ..Default::default()
        };
        for (k, &(xcr, value)) in x.xcrs.iter_mut().zip(&s.xcrs) {
            *k = kvm_xcr {
                xcr,
                value,
                ..Default::default()
            };
        }
        fd.set_xcrs(&x).map_err(kvm_err("KVM_SET_XCRS"))?;
    }
    let d = s.debugregs;
    fd.set_debug_regs(&kvm_debugregs {
        db: [d[0], d[1], d[2], d[3]],
        dr6: d[4],
        dr7: d[5],
        ..Default::default()
    })
    .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    if s.lapic.regs.len() != LAPIC_PAGE_SIZE {
        return Err(Error::Unsupported(format!(
            "saved LAPIC page of {} bytes, expected {LAPIC_PAGE_SIZE}",
            s.lapic.regs.len()
        )));
    }
    let mut lapic = kvm_lapic_state::default();
    for (r, &b) in lapic.regs.iter_mut().zip(&s.lapic.regs) {
        *r = b as libc::c_char;
    }
    fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    // After the LAPIC: KVM ignores IA32_TSC_DEADLINE unless its timer is in deadline mode.
    write_msrs(fd, &s.msrs)?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: mp_state_to_kvm(s.mp_state),
    })
    .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    fd.set_vcpu_events(&events_to_kvm(&s.events))
        .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_fpu_convert_both_ways() {
        let e = VcpuEvents {
            exception: Some(PendingException {
                vector: 14,
                error_code: Some(2),
                injected: true,
            }),
            interrupt: Some(InjectedInterrupt {
                vector: 0x30,
                soft: false,
            }),
            interrupt_shadow: true,
            nmi_injected: false,
            nmi_pending: true,
            nmi_masked: true,
        };
        assert_eq!(events_from_kvm(&events_to_kvm(&e)), e);
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            fpr: [[3; 16]; 8],
            xmm: [[7; 16]; 16],
            last_ip: 99,
            ..Default::default()
        };
        assert_eq!(fpu_from_fxsave(&fxsave_from_fpu(&fpu)).unwrap(), fpu);
        for m in [MpState::Runnable, MpState::Halted, MpState::WaitForSipi] {
            assert_eq!(mp_state_from_kvm(mp_state_to_kvm(m)), m);
        }
    }
}
