#!/usr/bin/env python3
"""What KVM's interrupt-controller choice costs at VM creation and destruction, without a guest.

For each mode, N times: create a VM, set it up as kvmbox does (TSS address, then the interrupt
controllers, then one 128 MiB memory slot), create vCPU 0, close everything. Modes:
  split - KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP, 24 IOAPIC routes): kvmbox's choice,
  full  - KVM_CREATE_IRQCHIP + KVM_CREATE_PIT2: KVM's in-kernel IOAPIC, PIC and PIT,
  none  - no in-kernel interrupt controller at all (for reference).
Prints medians of the memory-slot ioctl, of closing the VM and of the whole sequence, modes
alternating round by round. The differences are SRCU grace periods the kernel waits for.

Usage: scripts/bench-vm-setup.py [--runs N]   (needs /dev/kvm)
"""
import argparse, ctypes, fcntl, mmap, os, statistics, struct, time

KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41
KVM_SET_TSS_ADDR = 0xAE47
KVM_CREATE_IRQCHIP = 0xAE60
KVM_CREATE_PIT2 = 0x4040AE77  # _IOW(KVMIO, 0x77, struct kvm_pit_config)
KVM_SET_USER_MEMORY_REGION = 0x4020AE46  # _IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)
KVM_ENABLE_CAP = 0x4068AEA3  # _IOW(KVMIO, 0xa3, struct kvm_enable_cap)
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_PIT_SPEAKER_DUMMY = 1
MEM = 128 << 20


def one(mode):
    kvm = os.open("/dev/kvm", os.O_RDWR)
    mem = mmap.mmap(-1, MEM, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)  # NORESERVE
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    t0 = time.perf_counter()
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    fcntl.ioctl(vm, KVM_SET_TSS_ADDR, 0xFFFBD000 - (1 << 32))
    if mode == "split":
        fcntl.ioctl(vm, KVM_ENABLE_CAP,
                    struct.pack("II4Q64s", KVM_CAP_SPLIT_IRQCHIP, 0, 24, 0, 0, 0, b""))
    elif mode == "full":
        fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
        fcntl.ioctl(vm, KVM_CREATE_PIT2, struct.pack("I15I", KVM_PIT_SPEAKER_DUMMY, *[0] * 15))
    t1 = time.perf_counter()
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("IIQQQ", 0, 0, 0, MEM, addr))
    t2 = time.perf_counter()
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    t3 = time.perf_counter()
    os.close(vcpu)
    os.close(vm)
    t4 = time.perf_counter()
    os.close(kvm)
    del addr
    return {"memory slot": (t2 - t1) * 1e3, "close": (t4 - t3) * 1e3, "total": (t4 - t0) * 1e3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    a = ap.parse_args()
    modes = ("split", "full", "none")
    res = {m: [] for m in modes}
    for _ in range(a.runs):
        for m in modes:
            res[m].append(one(m))
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, runs: {a.runs}, "
          f"load average: {os.getloadavg()[0]:.1f}; medians in ms")
    for m in modes:
        print(f"  {m:6} " + "  ".join(
            f"{k} {statistics.median(r[k] for r in res[m]):7.2f}" for k in res[m][0]))


if __name__ == "__main__":
    main()
