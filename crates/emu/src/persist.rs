//! The engine's vCPU state as [`kvmbox_cpu::VcpuState`], the shape KVM uses too: the FXSAVE
//! image of the x87/SSE state, the MSRs the engine implements, and events between
//! instructions.

use crate::exec::{host_tsc, msr};
use crate::state::{CpuState, X87};
use kvmbox_cpu::state::{Fxsave, FXSAVE_SIZE, MSR_IA32_TSC};
use kvmbox_cpu::VcpuState;

/// The MSRs the engine keeps in [`CpuState`] and a snapshot carries (EFER, APIC_BASE and the
/// segment bases travel in the special registers).
const SAVED_MSRS: [u32; 10] = [
    msr::SYSENTER_CS,
    msr::SYSENTER_ESP,
    msr::SYSENTER_EIP,
    msr::PAT,
    msr::STAR,
    msr::LSTAR,
    msr::CSTAR,
    msr::SFMASK,
    msr::KERNEL_GS_BASE,
    msr::TSC_AUX,
];

/// The FXSAVE image (64-bit format) of the engine's x87 and SSE state.
pub fn fxsave_image(st: &CpuState) -> Vec<u8> {
    let x = &st.x87;
    Fxsave {
        fcw: x.fcw,
        fsw: x.fsw,
        ftw: x.ftw,
        fop: x.fop,
        fip: x.fip,
        fdp: x.fdp,
        mxcsr: st.mxcsr,
        st: x.st,
        xmm: st.xmm.map(u128::to_le_bytes),
    }
    .to_image()
}

/// Load x87 and SSE state from an FXSAVE image (the first 512 bytes of an XSAVE area too).
pub fn load_fxsave(st: &mut CpuState, b: &[u8]) -> Result<(), String> {
    let f = Fxsave::from_image(b)?;
    st.x87 = X87 {
        fcw: f.fcw,
        fsw: f.fsw,
        ftw: f.ftw,
        fop: f.fop,
        fip: f.fip,
        fdp: f.fdp,
        st: f.st,
    };
    st.mxcsr = f.mxcsr & 0xffff;
    st.xmm = f.xmm.map(u128::from_le_bytes);
    Ok(())
}

/// Fill the MSRs, debug registers and FPU image of `out` from the engine's state.
pub fn save_cpu_state(st: &CpuState, out: &mut VcpuState) {
    out.debugregs = [st.dr[0], st.dr[1], st.dr[2], st.dr[3], st.dr[6], st.dr[7]];
    out.fxsave = fxsave_image(st);
    out.xsave = None;
    for index in SAVED_MSRS {
        out.set_msr(index, read_saved_msr(st, index));
    }
    out.set_msr(MSR_IA32_TSC, host_tsc().wrapping_add(st.tsc_offset));
    // kvm-clock's MSRs as the guest wrote them: restoring goes through WRMSR, which rewrites
    // the records in guest memory (KVM takes the same MSRs).
    for (index, v) in [
        (crate::pvclock::MSR_KVM_SYSTEM_TIME_NEW, st.kvm_system_time),
        (crate::pvclock::MSR_KVM_WALL_CLOCK_NEW, st.kvm_wall_clock),
    ] {
        if v != 0 {
            out.set_msr(index, v);
        }
    }
}

fn read_saved_msr(st: &CpuState, index: u32) -> u64 {
    match index {
        msr::SYSENTER_CS => st.sysenter[0],
        msr::SYSENTER_ESP => st.sysenter[1],
        msr::SYSENTER_EIP => st.sysenter[2],
        msr::PAT => st.pat,
        msr::STAR => st.star,
        msr::LSTAR => st.lstar,
        msr::CSTAR => st.cstar,
        msr::SFMASK => st.sfmask,
        msr::KERNEL_GS_BASE => st.kernel_gs_base,
        _ => st.tsc_aux,
    }
}

/// Load the MSRs, debug registers and FPU image of `s` into the engine's state. The guest
/// TSC continues from the saved value (the time the VM spent saved does not pass for it).
/// MSRs the engine does not keep itself are returned for the MSR handler.
pub fn load_cpu_state(st: &mut CpuState, s: &VcpuState) -> Result<Vec<(u32, u64)>, String> {
    let xsave_legacy = s.xsave.as_deref().filter(|x| x.len() >= FXSAVE_SIZE);
    load_fxsave(st, xsave_legacy.unwrap_or(&s.fxsave))?;
    let d = s.debugregs;
    st.dr = [d[0], d[1], d[2], d[3], st.dr[4], st.dr[5], d[4], d[5]];
    let mut others = Vec::new();
    for &(index, v) in &s.msrs {
        match index {
            msr::SYSENTER_CS => st.sysenter[0] = v,
            msr::SYSENTER_ESP => st.sysenter[1] = v,
            msr::SYSENTER_EIP => st.sysenter[2] = v,
            msr::PAT => st.pat = v,
            msr::STAR => st.star = v,
            msr::LSTAR => st.lstar = v,
            msr::CSTAR => st.cstar = v,
            msr::SFMASK => st.sfmask = v,
            msr::KERNEL_GS_BASE => st.kernel_gs_base = v,
            msr::TSC_AUX => st.tsc_aux = v & 0xffff_ffff,
            MSR_IA32_TSC => st.tsc_offset = v.wrapping_sub(host_tsc()),
            _ => others.push((index, v)),
        }
    }
    Ok(others)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fxsave_image_round_trips() {
        let mut st = CpuState::default();
        st.x87.fcw = 0x27f;
        st.x87.fsw = 0x3800;
        st.x87.ftw = 0x81;
        st.x87.st[7] = [9; 16];
        st.x87.fip = 0x1234_5678_9abc;
        st.mxcsr = 0x1fc0;
        st.xmm[15] = 0x0102_0304_0506_0708_090a_0b0c_0d0e_0f10;
        let img = fxsave_image(&st);
        let mut back = CpuState::default();
        load_fxsave(&mut back, &img).unwrap();
        assert_eq!(back.x87, st.x87);
        assert_eq!((back.mxcsr, back.xmm), (st.mxcsr, st.xmm));
        assert!(load_fxsave(&mut back, &img[..100]).is_err());
    }
}
