//! What a seccomp filter adds to one system call: time `ioctl(-1, KVM_RUN)` (the kernel
//! answers EBADF at once, so the call is all entry, filter and exit), with no filter or under
//! the vCPU thread's filter, which a vCPU thread evaluates on every KVM_RUN, once per exit.
//! `scripts/bench-seccomp.py` runs it alternately both ways.
//!
//! Usage: filter-cost none|vcpu [CALLS]   (prints nanoseconds per call)

use std::time::Instant;

const KVM_RUN: libc::c_ulong = 0xae80;

fn ns_per_call(calls: u32) -> f64 {
    let start = Instant::now();
    for _ in 0..calls {
        // SAFETY: an ioctl on descriptor -1 only fails with EBADF.
        unsafe { libc::ioctl(-1, KVM_RUN, 0) };
    }
    start.elapsed().as_nanos() as f64 / f64::from(calls)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let filtered = match args.next().as_deref() {
        Some("vcpu") => true,
        Some("none") => false,
        _ => panic!("usage: filter-cost none|vcpu [CALLS]"),
    };
    let calls: u32 = args
        .next()
        .map_or(1_000_000, |a| a.parse().expect("CALLS: a number"));
    if filtered {
        kvmbox_seccomp::enable().expect("enable");
        kvmbox_seccomp::apply(kvmbox_seccomp::ThreadKind::Vcpu).expect("vCPU filter");
    }
    ns_per_call(calls / 10); // warm up
    println!("{:.1}", ns_per_call(calls));
}
