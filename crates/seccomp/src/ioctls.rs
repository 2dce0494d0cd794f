//! The ioctl request numbers kvmbox's threads may issue, by what they act on. The numbers are
//! the kernel's ABI (`linux/kvm.h`, `linux/if_tun.h`, `linux/fs.h`, `asm-generic/ioctls.h`);
//! the KVM ones are derived as kvm-ioctls derives them (it keeps its own private).

#![allow(non_snake_case)] // the generated functions carry the kernel's upper-case names

use kvm_bindings::*;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

// /dev/kvm itself.
ioctl_io_nr!(KVM_GET_API_VERSION, KVMIO, 0x00);
ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);
ioctl_iowr_nr!(KVM_GET_MSR_FEATURE_INDEX_LIST, KVMIO, 0x0a, kvm_msr_list);
// A VM.
ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
ioctl_iow_nr!(KVM_SET_IDENTITY_MAP_ADDR, KVMIO, 0x48, u64);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO, 0xa3, kvm_enable_cap);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);
// A vCPU.
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);
ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);

/// What only the VMM thread does with KVM: open it, build a VM, its memory map, its vCPUs,
/// read or set the VM-wide clock, and start and read the dirty-page log (snapshots).
pub(crate) fn kvm_setup() -> Vec<u64> {
    vec![
        KVM_GET_API_VERSION(),
        KVM_CREATE_VM(),
        KVM_GET_MSR_INDEX_LIST(),
        KVM_CHECK_EXTENSION(),
        KVM_GET_VCPU_MMAP_SIZE(),
        KVM_GET_SUPPORTED_CPUID(),
        KVM_GET_MSR_FEATURE_INDEX_LIST(),
        KVM_CREATE_VCPU(),
        KVM_SET_USER_MEMORY_REGION(),
        KVM_GET_DIRTY_LOG(),
        KVM_SET_TSS_ADDR(),
        KVM_SET_IDENTITY_MAP_ADDR(),
        KVM_ENABLE_CAP(),
        KVM_SET_CLOCK(),
        KVM_GET_CLOCK(),
    ]
}

/// A vCPU's own requests: run it, and save or restore its state (a vCPU thread saves and
/// restores its own registers for snapshots and resets).
pub(crate) fn kvm_vcpu() -> Vec<u64> {
    vec![
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_SET_SREGS(),
        KVM_INTERRUPT(),
        KVM_GET_MSRS(),
        KVM_SET_MSRS(),
        KVM_GET_FPU(),
        KVM_SET_FPU(),
        KVM_GET_LAPIC(),
        KVM_SET_LAPIC(),
        KVM_SET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_SET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_SET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_SET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_SET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_SET_XCRS(),
        KVM_GET_XSAVE2(),
    ]
}

/// What the guest's own writes make a vCPU thread change on the VM: the eventfds behind
/// moved BARs and MSI-X vectors.
pub(crate) fn kvm_guest_programmed() -> Vec<u64> {
    vec![KVM_IRQFD(), KVM_IOEVENTFD()]
}

/// Raising an interrupt: an MSI through the user-space IOAPIC into KVM's local APICs, and the
/// GSI route of an MSI-X vector, which a device brings up to date with the vector's table
/// entry as it raises it (on whichever thread that is).
pub(crate) fn kvm_interrupts() -> Vec<u64> {
    vec![KVM_SIGNAL_MSI(), KVM_SET_GSI_ROUTING()]
}

/// `tcgetattr`/`tcsetattr(TCSANOW)` on the terminal.
pub(crate) const TCGETS: u64 = 0x5401;
pub(crate) const TCSETS: u64 = 0x5402;

/// The TAP device: attach (`TUNSETIFF`), header size, offloads (the last one also after the
/// guest negotiates features, on a vCPU thread).
pub(crate) const TUNSETIFF: u64 = 0x4004_54ca;
pub(crate) const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;
pub(crate) const TUNSETOFFLOAD: u64 = 0x4004_54d0;

/// The size of a block device used as a disk.
pub(crate) const BLKGETSIZE64: u64 = 0x8008_1272;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_the_kernel_headers() {
        // Spot checks against linux/kvm.h as strace decodes them.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_SIGNAL_MSI(), 0x4020_aea5);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_aea4);
    }
}
